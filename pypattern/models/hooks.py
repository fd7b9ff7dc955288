"""Hook points with TransformerLens names, for pypattern's own model and for any ``nn.Module``.

A :class:`HookPoint` is an identity module that sits on an activation; functions attached to it may read
the activation or return a replacement. :class:`HookedRootModule` gives a model ``run_with_hooks`` and
``run_with_cache`` (both context-managed: hooks are removed even when the forward raises).
:class:`HookedModule` wraps *any* ``nn.Module`` and places hook points on the inputs or outputs of its
sub-modules named by module path (through PyTorch forward hooks), so the same patching code runs on it.
"""

from __future__ import annotations

import contextlib
import copy
import numbers
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .._checks import is_count
from . import cache_analysis

HookFn = Callable[[torch.Tensor, "HookPoint"], "torch.Tensor | None"]

__all__ = ["HookPoint", "HookedRootModule", "ActivationCache", "HookedModule", "get_act_name"]


class HookPoint(nn.Module):
    """Identity on an activation, with attachable forward (and backward) functions.

    Each attached function is called as ``fn(activation, hook)`` (as ``fn(activation, hook=hook)`` when it takes
    ``hook`` by keyword only, TransformerLens' call); if it returns a tensor, that tensor replaces the activation for
    the rest of the forward (TransformerLens' convention). A backward function (``dir="bwd"``) is called as
    ``fn(grad, hook)`` with the gradient of the loss with respect to the activation when the backward pass reaches
    it (attached while the forward runs, so it runs even when the hook is removed before the backward); a tensor it
    returns replaces that gradient. Backward functions attach to the activation after the forward functions ran,
    so they see the gradient of the activation the rest of the forward uses (TransformerLens' order).

    ``ctx`` is a dict hook functions may keep state in (TransformerLens' ``hook.ctx``); ``clear_context`` empties it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.name: str = ""
        self._fns: list[HookFn] = []
        self.ctx: dict = {}

    def clear_context(self) -> None:
        """Empty :attr:`ctx`."""
        self.ctx = {}

    def add_hook(
        self,
        fn: HookFn,
        dir: str = "fwd",
        is_permanent: bool = False,
        prepend: bool = False,
        level: Any = None,
    ) -> Callable[[], None]:
        """Attach ``fn`` (``dir="fwd"``: on the activation, ``"bwd"``: on its gradient); returns a function that
        removes it. ``is_permanent``: kept by :meth:`remove_hooks` / ``reset_hooks`` unless
        ``including_permanent=True``; ``prepend``: run before the functions attached already; ``level``: a tag that
        ``remove_hooks(level=...)`` selects by (TransformerLens' arguments)."""
        if dir not in ("fwd", "bwd"):
            raise ValueError(f"dir={dir!r} is not valid; give 'fwd' or 'bwd'")
        if not callable(fn):
            raise TypeError(f"the hook function {fn!r} is not callable")
        entry = _as_called(fn)
        if dir == "bwd":
            entry = _on_gradient(entry)
        # a wrapper of its own: it carries the flags, and remove() takes off this registration only
        if entry is fn:
            entry = _forward_to(fn)
        entry._pp_dir, entry._pp_permanent, entry._pp_level = dir, bool(is_permanent), level
        if prepend:
            self._fns.insert(0, entry)
        else:
            self._fns.append(entry)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._fns.remove(entry)

        return remove

    def add_perma_hook(self, fn: HookFn, dir: str = "fwd") -> Callable[[], None]:
        """:meth:`add_hook` with ``is_permanent=True``."""
        return self.add_hook(fn, dir=dir, is_permanent=True)

    def remove_hooks(self, dir: str = "fwd", including_permanent: bool = False, level: Any = None) -> None:
        """Remove the attached functions of direction ``dir`` (``"fwd"``, the default as in TransformerLens,
        ``"bwd"`` or ``"both"``): the non-permanent ones (of ``level`` only, when given), every one with
        ``including_permanent``."""
        if dir not in ("fwd", "bwd", "both"):
            raise ValueError(f"dir={dir!r} is not valid; give 'fwd', 'bwd' or 'both'")

        def removed(f: Callable) -> bool:
            if dir not in ("both", getattr(f, "_pp_dir", "fwd")):
                return False
            if getattr(f, "_pp_permanent", False) and not including_permanent:
                return False
            return level is None or getattr(f, "_pp_level", None) == level

        self._fns[:] = [f for f in self._fns if not removed(f)]

    def layer(self) -> int:
        """The layer index of a hook point named ``blocks.{layer}....`` (TransformerLens' ``hook.layer()``)."""
        parts = self.name.split(".")
        if len(parts) < 2 or parts[0] != "blocks" or not parts[1].isdigit():
            raise ValueError(f"hook point {self.name!r} is not in a block (blocks.N...): it has no layer")
        return int(parts[1])

    @property
    def active(self) -> bool:
        """Whether any function is attached (an inactive hook point is the identity)."""
        return bool(self._fns)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fns = [f for f in self._fns if getattr(f, "_pp_dir", "fwd") != "bwd"]
        on_grad = [f._pp_on_grad for f in self._fns if getattr(f, "_pp_dir", "fwd") == "bwd"]
        for fn in fns:
            out = fn(x, self)
            if out is not None:
                if not isinstance(out, torch.Tensor):
                    raise TypeError(
                        f"a hook function on {self.name!r} returned an object of type {type(out).__name__}; "
                        "return None (the activation unchanged) or a tensor to replace it"
                    )
                if isinstance(x, torch.Tensor) and out.shape != x.shape:
                    raise ValueError(
                        f"a hook function on {self.name!r} returned a tensor of shape {tuple(out.shape)} for an "
                        f"activation of shape {tuple(x.shape)}; a replacement must have the activation's shape"
                    )
                x = out
        if on_grad and isinstance(x, torch.Tensor) and x.requires_grad:
            # on the final activation's gradient: one view (a hook on the activation itself would stay on it after
            # the forward), the functions in the order attached, each given the incoming gradient; the last tensor
            # returned replaces it (TransformerLens' full backward hooks)
            hp = self

            def grad_hook(g: torch.Tensor) -> torch.Tensor | None:
                new = None
                for f in on_grad:
                    r = f(g, hp)
                    if isinstance(r, tuple) and len(r) == 1:  # TransformerLens also takes (grad,)
                        r = r[0]
                    if r is not None:
                        if not isinstance(r, torch.Tensor) or r.shape != g.shape:
                            raise TypeError(
                                f"a backward hook function on {hp.name!r} returned {_describe(r)} for a gradient "
                                f"of shape {tuple(g.shape)}; return None or a tensor (or (tensor,)) of that shape"
                            )
                        new = r
                return new

            x = x.view_as(x)
            x.register_hook(grad_hook)
        return x

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


def _as_called(fn: Callable) -> Callable:
    """``fn`` itself when it can be called as ``fn(activation, hook)``; a wrapper calling ``fn(activation,
    hook=hook)`` when it takes ``hook`` by keyword only (TransformerLens calls every hook function that way)."""
    import inspect

    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: called positionally
        return fn
    try:
        sig.bind(None, None)
        return fn
    except TypeError:
        pass
    try:
        sig.bind(None, hook=None)
    except TypeError:
        raise TypeError(
            f"the hook function {getattr(fn, '__name__', fn)!r} cannot be called as fn(activation, hook) nor as "
            "fn(activation, hook=hook); give a function of the activation and the hook point"
        ) from None

    def by_keyword(x: torch.Tensor, hook: HookPoint) -> Any:
        return fn(x, hook=hook)

    return by_keyword


def _forward_to(fn: Callable) -> Callable:
    def entry(x: torch.Tensor, hook: HookPoint) -> Any:
        return fn(x, hook)

    return entry


def _on_gradient(fn: Callable) -> Callable:
    """An entry of :attr:`HookPoint._fns` for the backward function ``fn`` (called as ``fn(grad, hook)``): does
    nothing in the forward; :meth:`HookPoint.forward` attaches ``fn`` to the final activation's gradient."""

    def entry(x: torch.Tensor, hook: HookPoint) -> None:
        return None

    entry._pp_on_grad = fn
    return entry


def attached_hooks(model: nn.Module) -> list[str]:
    """Where functions are attached that change what ``model``'s forward computes: its hook points with a function
    attached, its modules with torch forward hooks or pre-hooks, and torch's global module hooks. The estimators that
    compute from a model's weights without running its forward (the exact patching engine, the circuits) refuse or
    avoid a model where this is not empty: they would ignore the hooks."""
    from torch.nn.modules import module as _module

    out = [
        f"torch.nn.modules.module.{k}"
        for k in ("_global_forward_hooks", "_global_forward_pre_hooks")
        if getattr(_module, k, None)
    ]
    for name, m in model.named_modules():
        where = name or "(the model)"
        if isinstance(m, HookPoint) and m.active:
            out.append(f"{where} (hook point)")
        elif any(
            changes_output(fn) for d in (m._forward_hooks, m._forward_pre_hooks) for fn in (d or {}).values()
        ):
            out.append(f"{where} (torch forward hook)")
    return out


def changes_output(fn) -> bool:
    """Whether the torch forward hook or pre-hook ``fn`` may change what its module computes: False for one of
    pypattern's adapters (:class:`HookedModule`, :func:`~pypattern.hooked_hf`) whose hook point has nothing
    attached, for a function marked ``fn.changes_output = False`` (an adapter's bookkeeping), and for
    transformers' own (they record outputs for ``output_hidden_states`` / attentions)."""
    if (getattr(fn, "__module__", None) or "").startswith("transformers."):
        return False
    if getattr(fn, "changes_output", True) is False:  # an adapter's bookkeeping (hooked_hf's checkpointing)
        return False
    hp = getattr(fn, "hook_point", None)
    return hp is None or bool(getattr(hp, "active", True))


def _make_filter(names: Any) -> Callable[[str], bool]:
    if names is None:
        return lambda n: True
    if isinstance(names, str):
        return lambda n: n == names
    if callable(names):
        return names
    if isinstance(names, Iterable):
        s = set(names)
        return lambda n: n in s
    raise TypeError(f"names_filter={names!r} is not valid: give None, a name, a list of names or a callable")


_ATTN_ACTS = ("k", "v", "q", "z", "rot_k", "rot_q", "result", "pattern", "attn_scores")
_MLP_ACTS = ("pre", "post", "mid", "pre_linear")
_ACT_ALIASES = {
    "attn": "pattern",
    "attn_logits": "attn_scores",
    "key": "k",
    "query": "q",
    "value": "v",
    "mlp_pre": "pre",
    "mlp_mid": "mid",
    "mlp_post": "post",
}
_LAYER_TYPE_ALIASES = {"a": "attn", "m": "mlp", "b": "", "block": "", "blocks": "", "attention": "attn"}


def get_act_name(name: str, layer: int | str | None = None, layer_type: str | None = None) -> str:
    """A hook name from TransformerLens' shorthand (``transformer_lens.utils.get_act_name``): ``("pattern", 0)`` ->
    ``"blocks.0.attn.hook_pattern"``, ``("resid_pre", 1)`` -> ``"blocks.1.hook_resid_pre"``, ``("z", 0, "attn")``,
    ``("normalized", 1, "ln2")``, ``"k6"`` -> ``"blocks.6.attn.hook_k"``, ``"embed"`` -> ``"hook_embed"``; a full
    name is returned as it is."""
    import re

    if ("." in name or name.startswith("hook_")) and layer is None and layer_type is None:
        return name
    match = re.match(r"([a-z]+)(\d+)([a-z]?.*)", name)
    if match is not None:
        name, layer, layer_type = match.groups(0)
    name = _ACT_ALIASES.get(name, name)
    full = "" if layer is None else f"blocks.{layer}."
    if name in _ATTN_ACTS:
        layer_type = "attn"
    elif name in _MLP_ACTS:
        layer_type = "mlp"
    elif layer_type in _LAYER_TYPE_ALIASES:
        layer_type = _LAYER_TYPE_ALIASES[layer_type]
    if layer_type:
        full += f"{layer_type}."
    full += f"hook_{name}"
    if name in ("scale", "normalized") and layer is None:
        full = f"ln_final.{full}"
    return full


class ActivationCache(dict):
    """Activations by hook name (a plain dict with a few helpers).

    ``cache["blocks.0.attn.hook_z"]`` has the shape of that hook point, e.g. ``(batch, pos, n_heads, d_head)``.
    TransformerLens' shorthand keys read the same entries: ``cache["z", 0]``, ``cache["pattern", -1]`` (a negative
    layer counts from the last), ``cache["normalized", 1, "ln2"]``, ``cache["embed"]`` (see :func:`get_act_name`).

    TransformerLens' analysis methods, with its arguments and defaults: :meth:`accumulated_resid` (logit lens),
    :meth:`decompose_resid`, :meth:`stack_head_results` (with :meth:`compute_head_results`),
    :meth:`stack_neuron_results`, :meth:`get_full_resid_decomposition`, :meth:`stack_activation`,
    :meth:`apply_ln_to_stack` and :meth:`logit_attrs` (direct logit attribution). They read the pypattern
    :class:`~pypattern.models.transformer.Transformer` that produced the cache, ``model`` (set by
    ``run_with_cache``; ``cache.model = None`` drops the reference); a cache without one raises ``ValueError``.
    Norms are applied with their weight (pypattern does not fold them): see :meth:`apply_ln_to_stack`.
    """

    n_layers: int | None = None  # set by run_with_cache (negative layers); else read from the keys
    has_batch_dim: bool = True  # False after run_with_cache(remove_batch_dim=True)
    model: Any = None  # run_with_cache sets it: the model that produced the cache

    def __getitem__(self, key: Any) -> torch.Tensor:
        if isinstance(key, str | tuple) and dict.__contains__(self, key):
            return dict.__getitem__(self, key)
        try:
            full = self._full_name(key)
        except (TypeError, ValueError):
            full = None
        if full is None or not dict.__contains__(self, full):
            if isinstance(key, str):
                return dict.__getitem__(self, key)  # KeyError naming the key
            raise KeyError(key if full is None else f"{key!r} (hook {full!r}) is not in the cache")
        return dict.__getitem__(self, full)

    def _full_name(self, key: Any) -> str | None:
        if isinstance(key, str):
            return get_act_name(key)
        if not isinstance(key, tuple) or not key or not isinstance(key[0], str) or len(key) > 3:
            return None
        if len(key) > 1 and isinstance(key[1], int) and not isinstance(key[1], bool) and key[1] < 0:
            n = self.n_layers
            if n is None:
                layers = [
                    int(k.split(".")[1])
                    for k in self
                    if k.startswith("blocks.") and k.split(".")[1].isdigit()
                ]
                n = max(layers) + 1 if layers else None
            if n is None:
                return None
            key = (key[0], n + key[1], *key[2:])
        return get_act_name(*key)

    def remove_batch_dim(self) -> ActivationCache:
        """Replace every activation by its row 0 (a cache of a batch of one; another batch size raises
        ``ValueError``), in place, and return the cache (TransformerLens' ``cache.remove_batch_dim()``); nothing to
        do when it has no batch axis already (``has_batch_dim`` False)."""
        if not self.has_batch_dim:
            return self
        bad = {k: tuple(v.shape) for k, v in self.items() if v.dim() == 0 or v.shape[0] != 1}
        if bad:
            raise ValueError(
                f"remove_batch_dim() needs a cache of a batch of one; these activations are not: {bad}"
            )
        for k in list(self):
            dict.__setitem__(self, k, dict.__getitem__(self, k)[0])
        self.has_batch_dim = False
        return self

    def to(self, device: torch.device | str) -> ActivationCache:
        """Move every activation to ``device``, in place, and return the cache (TransformerLens' ``cache.to``)."""
        for k in list(self):
            dict.__setitem__(self, k, dict.__getitem__(self, k).to(device))
        return self

    def stack(self, names: Sequence[str]) -> torch.Tensor:
        """Stack the activations ``names`` along a new leading dimension."""
        return torch.stack([self[n] for n in names])

    # ----- TransformerLens' analysis methods: the functions of pypattern.models.cache_analysis (their signatures and
    # docstrings), the cache as their first argument; they need ``model`` ---------

    accumulated_resid = cache_analysis.accumulated_resid
    decompose_resid = cache_analysis.decompose_resid
    compute_head_results = cache_analysis.compute_head_results
    stack_head_results = cache_analysis.stack_head_results
    stack_activation = cache_analysis.stack_activation
    get_neuron_results = cache_analysis.get_neuron_results
    stack_neuron_results = cache_analysis.stack_neuron_results
    apply_ln_to_stack = cache_analysis.apply_ln_to_stack
    logit_attrs = cache_analysis.logit_attrs
    get_full_resid_decomposition = cache_analysis.get_full_resid_decomposition


class HookedRootModule(nn.Module):
    """Mixin for a model whose activations are :class:`HookPoint` modules; call :meth:`setup_hooks` last."""

    hook_dict: dict[str, HookPoint]

    def setup_hooks(self) -> None:
        """Name every :class:`HookPoint` by its module path and index them in ``hook_dict``."""
        self.hook_dict = {}
        for name, mod in self.named_modules():
            if isinstance(mod, HookPoint):
                mod.name = name
                self.hook_dict[name] = mod

    def setup(self) -> None:
        """:meth:`setup_hooks` (TransformerLens' name, called last in a subclass's ``__init__``)."""
        self.setup_hooks()

    def hook_names(self) -> list[str]:
        return list(self.hook_dict)

    def hook_points(self) -> Iterable[HookPoint]:
        """The hook points (``hook_dict``'s values)."""
        return self.hook_dict.values()

    @property
    def mod_dict(self) -> dict[str, nn.Module]:
        """Every sub-module by its path (TransformerLens' ``mod_dict``; the model itself is not in it)."""
        return {name: mod for name, mod in self.named_modules() if name}

    def clear_contexts(self) -> None:
        """Empty every hook point's ``ctx``."""
        for hp in self.hook_points():
            hp.clear_context()

    def remove_all_hook_fns(
        self, direction: str = "both", including_permanent: bool = False, level: Any = None
    ) -> None:
        """Remove the functions attached to the hook points (of ``direction``: ``"fwd"``, ``"bwd"`` or
        ``"both"``; of ``level`` only, when given), the permanent ones too with ``including_permanent``."""
        for hp in self.hook_points():
            hp.remove_hooks(direction, including_permanent=including_permanent, level=level)

    def reset_hooks(
        self,
        clear_contexts: bool = True,
        direction: str = "both",
        including_permanent: bool = False,
        level: Any = None,
    ) -> None:
        """Remove the functions attached to the hook points (of ``direction``: ``"fwd"``, ``"bwd"`` or
        ``"both"``; of ``level`` only, when given), the permanent ones too with ``including_permanent``, and
        empty the hook points' ``ctx`` with ``clear_contexts`` (TransformerLens' arguments)."""
        if clear_contexts:
            self.clear_contexts()
        self.remove_all_hook_fns(direction, including_permanent=including_permanent, level=level)

    def _hook_points(self, names: Any) -> list[HookPoint]:
        """The hook points ``names`` selects (a name, a list of names, or a filter function on names); a name not
        in the model raises ``KeyError``, a filter may match none."""
        flt = _make_filter(names)
        matched = [hp for n, hp in self.hook_dict.items() if flt(n)]
        if isinstance(names, str) and not matched:
            raise KeyError(f"hook name {names!r} not found; valid names include {self.hook_names()[:8]}")
        if not isinstance(names, str) and not callable(names) and names is not None:
            unknown = [n for n in names if n not in self.hook_dict]
            if unknown:  # a typo in a list would attach nothing there, silently
                raise KeyError(f"hook names {unknown} not found; valid names include {self.hook_names()[:8]}")
        return matched

    def add_hook(
        self,
        name: Any,
        hook: HookFn,
        dir: str = "fwd",
        is_permanent: bool = False,
        level: Any = None,
        prepend: bool = False,
    ) -> Callable[[], None]:
        """Attach ``hook`` to the hook point ``name`` (or every hook point a filter function ``name`` selects) until
        it is removed (``reset_hooks``, or the function returned); ``dir="bwd"`` attaches it to the activation's
        gradient (TransformerLens' ``add_hook``; see :class:`HookPoint`)."""
        if dir not in ("fwd", "bwd"):
            raise ValueError(f"dir={dir!r} is not valid; give 'fwd' or 'bwd'")
        removers = [
            hp.add_hook(hook, dir=dir, is_permanent=is_permanent, prepend=prepend, level=level)
            for hp in self._hook_points(name)
        ]

        def remove() -> None:
            for r in removers:
                r()

        return remove

    def add_perma_hook(self, name: Any, hook: HookFn, dir: str = "fwd") -> Callable[[], None]:
        """:meth:`add_hook` with ``is_permanent=True`` (kept by ``reset_hooks()`` unless
        ``including_permanent=True``)."""
        return self.add_hook(name, hook, dir=dir, is_permanent=True)

    @contextlib.contextmanager
    def hooks(
        self,
        fwd_hooks: Sequence[tuple[Any, HookFn]] = (),
        bwd_hooks: Sequence[tuple[Any, HookFn]] = (),
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
    ) -> Iterator[HookedRootModule]:
        """Attach ``fwd_hooks`` (pairs of hook name, list of names or filter, and function) and ``bwd_hooks`` (the
        same, on the activations' gradients) for the block.

        Every hook added here is removed on exit, also when the block raises (``reset_hooks_end=False``: kept;
        ``clear_contexts``: every hook point's ``ctx`` is emptied too when they are removed).
        A name (or a name in a list) that is not a hook point of the model raises ``KeyError``; a filter function
        may match none. A backward hook is attached to the activation during the forward, so it runs in a
        backward pass taken after the block too.
        """
        removers: list[Callable[[], None]] = []
        try:
            for dir, pairs in (("fwd", fwd_hooks), ("bwd", bwd_hooks)):
                for names, fn in pairs:
                    for hp in self._hook_points(names):
                        removers.append(hp.add_hook(fn, dir=dir))
            yield self
        finally:
            if reset_hooks_end:
                for r in removers:
                    r()
                if clear_contexts:
                    self.clear_contexts()

    def run_with_hooks(
        self,
        *args: Any,
        fwd_hooks: Sequence[tuple[Any, HookFn]] = (),
        bwd_hooks: Sequence[tuple[Any, HookFn]] = (),
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Run ``forward(*args, **kwargs)`` with ``fwd_hooks`` (and ``bwd_hooks``, on the activations' gradients:
        they run in a later ``backward()`` of the output) attached; they are removed afterwards unless
        ``reset_hooks_end=False`` (TransformerLens' arguments)."""
        with self.hooks(fwd_hooks, bwd_hooks, reset_hooks_end=reset_hooks_end, clear_contexts=clear_contexts):
            return self(*args, **kwargs)

    def run_with_cache(
        self,
        *args: Any,
        names_filter: Any = None,
        device: Any = None,
        remove_batch_dim: bool = False,
        incl_bwd: bool = False,
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
        pos_slice: Any = None,
        return_cache_object: bool = True,
        detach: bool = True,
        **kwargs: Any,
    ) -> tuple[Any, ActivationCache | dict[str, torch.Tensor]]:
        """Run ``forward(*args, **kwargs)`` and return ``(output, cache)``: the activations of the hook points
        ``names_filter`` selects, by hook name in the order the forward reached them (TransformerLens' arguments).

        Parameters
        ----------
        names_filter : str, list of str, callable or None
            The hook points to cache: one name, a list of names (a name not in the model raises ``KeyError``),
            a function on names, or None for all.
        device : torch.device or str, optional
            Where the cached activations are stored (default: where they are computed).
        remove_batch_dim : bool
            Store ``activation[0]``: only for a batch of one (another batch size raises ``ValueError``).
        incl_bwd : bool
            Also call ``output.backward()`` (the output must be a scalar, e.g. ``return_type="loss"``) and cache
            the gradient of each selected activation as ``name + "_grad"``.
        reset_hooks_end : bool
            Remove the caching functions afterwards (False: they stay, and later forwards fill the same cache).
        clear_contexts : bool
            Empty every hook point's ``ctx`` when the functions are removed.
        pos_slice : int, tuple, slice, list or 1-d tensor of positions, optional
            Keep only these positions of each activation (as TransformerLens' ``run_with_cache``: an int keeps
            the position axis with that one position, a TransformerLens ``Slice`` of an int drops it, a tuple is
            ``slice(*tuple)``; a numpy integer or 0-d integer tensor is an int); the position axis is the third
            from last for ``hook_q``, ``hook_k``, ``hook_v``, ``hook_z``, ``hook_result``, ``hook_rot_q``,
            ``hook_rot_k`` and every other 4-d activation (the per-head ``q_norm`` / ``k_norm`` hooks), the second
            from last otherwise (the query position of ``hook_pattern`` / ``hook_attn_scores``).
        return_cache_object : bool
            True: an :class:`ActivationCache` (a dict with TransformerLens' shorthand keys); False: a plain dict.
        detach : bool
            Store detached activations (False: the activations themselves, in the autograd graph).
        """
        cache: dict[str, torch.Tensor] = ActivationCache() if return_cache_object else {}
        if return_cache_object:
            n_layers = getattr(getattr(self, "cfg", None), "n_layers", None) or getattr(
                self, "n_layers", None
            )
            if isinstance(n_layers, int):
                cache.n_layers = n_layers
            cache.has_batch_dim = not remove_batch_dim
            cache.model = self
        cache, fwd, bwd = self.get_caching_hooks(
            names_filter, incl_bwd, device, remove_batch_dim, cache=cache, pos_slice=pos_slice, detach=detach
        )
        with self.hooks(fwd, bwd, reset_hooks_end, clear_contexts):
            out = self(*args, **kwargs)
            if incl_bwd:
                if not isinstance(out, torch.Tensor) or out.numel() != 1:
                    raise ValueError(
                        "run_with_cache(incl_bwd=True) calls backward() on the output, which must be a scalar "
                        f"tensor (e.g. return_type='loss'); got {_describe(out)}"
                    )
                out.backward()
        return out, cache

    def get_caching_hooks(
        self,
        names_filter: Any = None,
        incl_bwd: bool = False,
        device: Any = None,
        remove_batch_dim: bool = False,
        cache: dict | None = None,
        pos_slice: Any = None,
        detach: bool = True,
    ) -> tuple[dict, list[tuple[str, HookFn]], list[tuple[str, HookFn]]]:
        """``(cache, fwd_hooks, bwd_hooks)``: pairs (hook name, function) that store the activations (and with
        ``incl_bwd`` their gradients, as ``name + "_grad"``) of the hook points ``names_filter`` selects in
        ``cache`` (a new dict when None), for :meth:`hooks` / :meth:`run_with_hooks`; nothing is attached here
        (TransformerLens' ``get_caching_hooks``; the arguments are :meth:`run_with_cache`'s)."""
        if not isinstance(remove_batch_dim, bool):
            raise TypeError(f"remove_batch_dim={remove_batch_dim!r} is not valid; give True or False")
        if device is not None:
            device = torch.device(device)
        # as TransformerLens' run_with_cache (Slice.unwrap): a plain int keeps the position axis (one position);
        # a Slice object made from an int drops it
        scalar = _as_int(pos_slice)
        if scalar is not None:
            pos_slice = [scalar]
        take = _pos_slicer(pos_slice)
        if cache is None:
            cache = {}

        def saver(suffix: str) -> HookFn:
            def save(x: torch.Tensor, hook: HookPoint) -> None:
                y = x.detach() if detach else x
                if remove_batch_dim:
                    if y.dim() == 0 or y.shape[0] != 1:
                        raise ValueError(
                            f"run_with_cache(remove_batch_dim=True) needs a batch of one; the activation "
                            f"{hook.name!r} has shape {tuple(y.shape)}"
                        )
                    y = y[0]
                if take is not None:
                    # the position axis is axis 1 of the batched activation, except the query axis (-2) of
                    # hook_pattern / hook_attn_scores: -3 for per-head activations (hook_q, ..., the per-head
                    # q_norm / k_norm hooks, all 4-d), -2 otherwise
                    per_head = hook.name.endswith(_HEAD_AXIS_HOOKS) or (
                        x.dim() >= 4 and not hook.name.endswith(_QUERY_AXIS_HOOKS)
                    )
                    axis = -3 if per_head else -2
                    if y.dim() >= -axis:
                        y = take(y, axis)
                cache[hook.name + suffix] = y if device is None else y.to(device)

            return save

        names = [hp.name for hp in self._hook_points(names_filter)]
        fwd, bwd = saver(""), saver("_grad")
        return cache, [(n, fwd) for n in names], [(n, bwd) for n in names] if incl_bwd else []


_HEAD_AXIS_HOOKS = ("hook_q", "hook_k", "hook_v", "hook_z", "hook_result", "hook_rot_q", "hook_rot_k")
_QUERY_AXIS_HOOKS = ("hook_pattern", "hook_attn_scores")


def _as_int(value: Any) -> int | None:
    """``value`` as a Python int when it is an integer scalar (an int, a numpy integer, a 0-d integer tensor or
    array; not a bool), else None (TransformerLens' ``to_python_int``)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, torch.Tensor) or type(value).__name__ == "ndarray":
        dt = str(value.dtype)  # torch.int64, int32, uint8, ... (bool, float and complex are not)
        if value.ndim == 0 and "int" in dt:
            return int(value.item())
    return None


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)}"
    return f"a {type(x).__name__}"


def _pos_slicer(pos_slice: Any) -> Callable[[torch.Tensor, int], torch.Tensor] | None:
    """A function ``(tensor, axis) -> tensor`` keeping the positions ``pos_slice`` selects on ``axis``
    (TransformerLens' ``Slice``); None for ``pos_slice=None``."""
    if pos_slice is None:
        return None
    if hasattr(pos_slice, "slice") and hasattr(pos_slice, "mode"):  # a TransformerLens Slice
        pos_slice = pos_slice.slice
    scalar = _as_int(pos_slice)  # a numpy integer or a 0-d integer tensor indexes as an int
    if scalar is not None:
        pos_slice = scalar
    if isinstance(pos_slice, bool):
        pass
    elif isinstance(pos_slice, int):
        return lambda t, axis: t.select(axis, pos_slice)
    elif isinstance(pos_slice, tuple) and all(
        v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in pos_slice
    ):
        s = slice(*pos_slice)
        return lambda t, axis: t[(slice(None),) * (t.dim() + axis) + (s,)]
    elif isinstance(pos_slice, slice):
        return lambda t, axis: t[(slice(None),) * (t.dim() + axis) + (pos_slice,)]
    elif isinstance(pos_slice, list | torch.Tensor) or type(pos_slice).__name__ == "ndarray":
        idx = torch.as_tensor(pos_slice)
        if idx.dim() == 1 and not idx.is_floating_point() and idx.dtype != torch.bool:

            def take(t: torch.Tensor, axis: int) -> torch.Tensor:
                n = t.shape[axis]
                if len(idx) and (int(idx.min()) < -n or int(idx.max()) >= n):
                    raise IndexError(f"pos_slice={pos_slice!r}: a position is outside the {n} positions")
                return t.index_select(
                    t.dim() + axis, (idx % max(n, 1)).to(t.device)
                )  # negative: from the end

            return take
    raise ValueError(
        f"pos_slice={pos_slice!r} is not valid; give None, an int, a (start, stop[, step]) tuple, a slice, or a "
        "list / 1-d integer tensor of positions"
    )


def _activation(hp: HookPoint, x: Any, where: str) -> torch.Tensor:
    """``x`` when it is a tensor; otherwise a ``TypeError`` naming the hook point (its functions would be handed
    a dict, a model output or ``None``, and the cache and the patching functions fail far from the cause)."""
    if isinstance(x, torch.Tensor):
        return x
    raise TypeError(
        f"hook point {hp.name!r}: the module's {where} is a {type(x).__name__}, not a tensor (nor a tuple starting "
        "with one); place the hook point on a module whose "
        f"{where} is the activation (e.g. a decoder layer or its attention, not the whole model)"
    )


def _inert(*args: Any) -> None:
    """What a wrapper's torch hook becomes in a pickled (or copied) model: nothing (the hook points it fired are the
    wrapper's, which the copy has not)."""
    return None


_inert.changes_output = False  # read by changes_output()


def _inert_hook() -> Callable:
    return _inert


def _remove_handles(handles: list) -> None:
    """Remove the torch hook handles ``handles`` (a collected :class:`HookedModule`'s) and empty the list."""
    for h in handles:
        h.remove()
    handles.clear()


class _WrapperHook:
    """A :class:`HookedModule`'s torch forward (pre-)hook on ``module``: ``fn``, called only on ``module`` itself (a
    ``copy.deepcopy`` of the wrapped model, or of one of its modules, copies its hooks, whose hook points are the
    wrapper's, not the copy's). Pickled (``torch.save(model)``, a spawned process) as a hook that does nothing, so
    that a wrapped model pickles as it did before it was wrapped."""

    def __init__(self, module: nn.Module, fn: Callable) -> None:
        self.owner = weakref.ref(module)
        self.fn = fn
        for attr in ("hook_point", "changes_output"):  # read by changes_output()
            if hasattr(fn, attr):
                setattr(self, attr, getattr(fn, attr))

    def __call__(self, mod: nn.Module, *rest: Any) -> Any:
        if mod is not self.owner():
            return None
        return self.fn(mod, *rest)

    def __reduce__(self) -> tuple:
        return (_inert_hook, ())


class HookedModule(HookedRootModule):
    """Any ``nn.Module`` with hook points placed by module path.

    Parameters
    ----------
    module : nn.Module
        The wrapped model; ``forward`` calls it unchanged.
    hook_points : dict[str, str]
        Hook name -> module path. A path ending in ``":input"`` hooks the first positional input of that
        sub-module (a forward pre-hook), otherwise its output. When the input/output is a tuple (an output also a
        list), the hook point sees (and may replace) element 0, e.g. the hidden states of a Hugging Face block.
    n_layers : int, optional
        Number of blocks (patching grids need it).

    Examples
    --------
    >>> hm = HookedModule(gpt2, {"blocks.0.hook_resid_pre": "transformer.h.0:input",
    ...                          "blocks.0.hook_resid_post": "transformer.h.0"})  # doctest: +SKIP
    """

    def __init__(self, module: nn.Module, hook_points: dict[str, str], n_layers: int | None = None) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module is a {type(module).__name__}; give the torch.nn.Module to hook")
        if not isinstance(hook_points, Mapping):
            raise TypeError(
                f"hook_points is a {type(hook_points).__name__}; give a dict hook name -> module path, e.g. "
                "{'blocks.0.hook_resid_post': 'transformer.h.0'}"
            )
        if n_layers is not None and (not is_count(n_layers) or n_layers < 1):
            raise ValueError(
                f"n_layers={n_layers!r} is not valid; give the number of blocks (an int >= 1), or None"
            )
        self.module = module
        self.n_layers = None if n_layers is None else int(n_layers)
        self._hook_paths = dict(hook_points)
        self._points = nn.ModuleDict()
        self._handles = []
        # a wrapper dropped without remove_hooks() takes its torch hooks off the module when it is collected
        weakref.finalize(self, _remove_handles, self._handles)
        self._hooks_removed = False
        self.hook_dict = {}
        mods = dict(module.named_modules())
        for name, path in hook_points.items():
            if not isinstance(name, str) or not isinstance(path, str):
                raise TypeError(
                    f"hook_points[{name!r}]={path!r} is not valid; give hook names and module paths as strings, "
                    "e.g. {'blocks.0.hook_resid_post': 'transformer.h.0'}"
                )
            is_input = path.endswith(":input")
            mpath = path[: -len(":input")] if is_input else path
            if mpath not in mods:
                raise KeyError(
                    f"hook_points[{name!r}]={path!r}: no sub-module {mpath!r} in the wrapped module"
                )
            hp = HookPoint()
            hp.name = name
            self.hook_dict[name] = hp
            self._points[name.replace(".", "__")] = hp
            if is_input:
                self._register(mods[mpath], self._pre(hp), pre=True, with_kwargs=True)
            else:
                self._register(mods[mpath], self._post(hp))

    def _register(self, module: nn.Module, fn: Callable, *, pre: bool = False, **kwargs) -> None:
        """Register ``fn`` as a forward (pre-)hook of ``module`` (``kwargs`` to torch's registration), keeping its
        handle. The hook does nothing when it is called on another module: a ``copy.deepcopy`` of the wrapped model
        (or of one of its modules) copies its hooks, whose hook points are this wrapper's, not the copy's."""
        hook = _WrapperHook(module, fn)
        register = module.register_forward_pre_hook if pre else module.register_forward_hook
        self._handles.append(register(hook, **kwargs))

    def __getstate__(self) -> dict:
        raise TypeError(
            f"a {type(self).__name__} is not pickled: its hook points live in torch hooks on the wrapped model, which "
            "a pickled copy would not fire; save the wrapped model (its state_dict, or save_pretrained) and wrap it "
            "again after loading"
        )

    def __deepcopy__(self, memo: dict) -> HookedModule:
        """A wrapper of a copy of the wrapped module, with its own hook points (carrying the functions attached to
        this wrapper's): torch's copy of the module alone would copy this wrapper's hooks with it, firing this
        wrapper's hook points from the copy's forward. The wrapped module is copied without them."""
        saved = []  # the hook dictionaries this wrapper's hooks are in, as they are (order included)
        for h in self._handles:
            for ref in (h.hooks_dict_ref, *getattr(h, "extra_dict_ref", ())):
                d = ref()
                if d is not None and h.id in d and not any(d is e for e, _ in saved):
                    saved.append((d, list(d.items())))
        ours = {h.id for h in self._handles}
        for d, _ in saved:
            for i in ours & d.keys():
                del d[i]
        try:
            module = copy.deepcopy(self.module, memo)
        finally:
            for d, items in saved:
                d.clear()
                d.update(items)
        new = self._wrapped_copy(module)
        memo[id(self)] = new
        for name, hp in self.hook_dict.items():
            new.hook_dict[name]._fns[:] = hp._fns
        built = set(new.__dict__)
        for k, v in self.__dict__.items():  # attributes set on the wrapper after it was built
            if k not in built:
                new.__dict__[k] = copy.deepcopy(v, memo)
        new.training = self.training
        return new

    def _wrapped_copy(self, module: nn.Module) -> HookedModule:
        """This wrapper's kind of wrapper around ``module`` (a copy of the wrapped module)."""
        return HookedModule(module, self._hook_paths, self.n_layers)

    def remove_hooks(self) -> None:
        """Take this wrapper's hooks off the wrapped module (it then runs as before it was wrapped); the wrapper's
        hook points no longer fire, and a forward with functions attached to them raises ``RuntimeError`` (they
        would not run: an empty cache, a patch not applied)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._hooks_removed = True

    def _check_hooks_on(self) -> None:
        """Refuse a forward with functions attached to hook points whose hooks :meth:`remove_hooks` took off."""
        if self._hooks_removed:
            attached = [n for n, hp in self.hook_dict.items() if hp._fns]
            if attached:
                raise RuntimeError(
                    f"functions are attached to hook points {attached[:4]}{' ...' if len(attached) > 4 else ''} of a "
                    f"{type(self).__name__} whose hooks remove_hooks() took off the wrapped model: they would not "
                    "run (an empty cache, a patch not applied); wrap the model again"
                )

    @staticmethod
    def _pre(hp: HookPoint) -> Callable:
        def fn(mod: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
            if not hp._fns:
                return None
            if args:
                return (hp(_activation(hp, args[0], "input")), *args[1:]), kwargs
            if "hidden_states" in kwargs:  # Hugging Face blocks may be called with keywords
                x = _activation(hp, kwargs["hidden_states"], "input")
                return args, {**kwargs, "hidden_states": hp(x)}
            raise RuntimeError(f"hook point {hp.name!r}: the module got no positional input to hook")

        fn.hook_point = hp  # the identity while hp has no function attached (read by the converters)
        return fn

    @staticmethod
    def _post(hp: HookPoint) -> Callable:
        def fn(mod: nn.Module, args: tuple, out: Any) -> Any:
            if not hp._fns:
                return None
            # a Hugging Face block's (hidden_states, ...), or GPT-1's list
            if isinstance(out, tuple | list) and out:
                new = hp(_activation(hp, out[0], "output"))
                return (new, *out[1:]) if isinstance(out, tuple) else [new, *out[1:]]
            return hp(_activation(hp, out, "output"))

        fn.hook_point = hp
        return fn

    def setup_hooks(self) -> None:  # names are given, nothing to discover
        return None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._check_hooks_on()
        return self.module(*args, **kwargs)
