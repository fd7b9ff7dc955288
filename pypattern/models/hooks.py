"""Hook points with TransformerLens names, for pypattern's own model and for any ``nn.Module``.

A :class:`HookPoint` is an identity module that sits on an activation; functions attached to it may read
the activation or return a replacement. :class:`HookedRootModule` gives a model ``run_with_hooks`` and
``run_with_cache`` (both context-managed: hooks are removed even when the forward raises).
:class:`HookedModule` wraps *any* ``nn.Module`` and places hook points on the inputs or outputs of its
sub-modules named by module path (through PyTorch forward hooks), so the same patching code runs on it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

HookFn = Callable[[torch.Tensor, "HookPoint"], "torch.Tensor | None"]

__all__ = ["HookPoint", "HookedRootModule", "ActivationCache", "HookedModule"]


class HookPoint(nn.Module):
    """Identity on an activation, with attachable forward functions.

    Each attached function is called as ``fn(activation, hook)``; if it returns a tensor, that tensor
    replaces the activation for the rest of the forward (TransformerLens' convention).
    """

    def __init__(self) -> None:
        super().__init__()
        self.name: str = ""
        self._fns: list[HookFn] = []

    def add_hook(self, fn: HookFn) -> Callable[[], None]:
        """Attach ``fn``; returns a function that removes it."""
        self._fns.append(fn)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._fns.remove(fn)

        return remove

    def remove_hooks(self) -> None:
        self._fns.clear()

    @property
    def active(self) -> bool:
        """Whether any function is attached (an inactive hook point is the identity)."""
        return bool(self._fns)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for fn in self._fns:
            out = fn(x, self)
            if out is not None:
                x = out
        return x

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


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
    attached, and for transformers' own (they record outputs for ``output_hidden_states`` / attentions)."""
    if (getattr(fn, "__module__", None) or "").startswith("transformers."):
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


class ActivationCache(dict):
    """Activations by hook name (a plain dict with a few helpers).

    ``cache["blocks.0.attn.hook_z"]`` has the shape of that hook point, e.g. ``(batch, pos, n_heads, d_head)``.
    """

    def stack(self, names: Sequence[str]) -> torch.Tensor:
        """Stack the activations ``names`` along a new leading dimension."""
        return torch.stack([self[n] for n in names])


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

    def hook_names(self) -> list[str]:
        return list(self.hook_dict)

    def reset_hooks(self) -> None:
        for hp in self.hook_dict.values():
            hp.remove_hooks()

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Sequence[tuple[Any, HookFn]] = ()) -> Iterator[HookedRootModule]:
        """Attach ``fwd_hooks`` (pairs of hook name, list of names or filter, and function) for the block.

        Every hook added here is removed on exit, also when the block raises. A name (or a name in a list) that is
        not a hook point of the model raises ``KeyError``; a filter function may match none.
        """
        removers: list[Callable[[], None]] = []
        try:
            for names, fn in fwd_hooks:
                flt = _make_filter(names)
                matched = [hp for n, hp in self.hook_dict.items() if flt(n)]
                if isinstance(names, str) and not matched:
                    raise KeyError(
                        f"hook name {names!r} not found; valid names include {self.hook_names()[:8]}"
                    )
                if not isinstance(names, str) and not callable(names) and names is not None:
                    unknown = [n for n in names if n not in self.hook_dict]
                    if unknown:  # a typo in a list would attach nothing there, silently
                        raise KeyError(
                            f"hook names {unknown} not found; valid names include {self.hook_names()[:8]}"
                        )
                for hp in matched:
                    removers.append(hp.add_hook(fn))
            yield self
        finally:
            for r in removers:
                r()

    def run_with_hooks(self, *args: Any, fwd_hooks: Sequence[tuple[Any, HookFn]] = (), **kwargs: Any) -> Any:
        """Run ``forward(*args, **kwargs)`` with ``fwd_hooks`` attached; they are always removed afterwards."""
        with self.hooks(fwd_hooks):
            return self(*args, **kwargs)

    def run_with_cache(
        self, *args: Any, names_filter: Any = None, detach: bool = True, **kwargs: Any
    ) -> tuple[Any, ActivationCache]:
        """Run the forward and return ``(output, cache)`` with the activations of the selected hook points."""
        cache = ActivationCache()

        def save(x: torch.Tensor, hook: HookPoint) -> None:
            cache[hook.name] = x.detach() if detach else x

        with self.hooks([(names_filter if names_filter is not None else (lambda n: True), save)]):
            out = self(*args, **kwargs)
        return out, cache


class HookedModule(HookedRootModule):
    """Any ``nn.Module`` with hook points placed by module path.

    Parameters
    ----------
    module : nn.Module
        The wrapped model; ``forward`` calls it unchanged.
    hook_points : dict[str, str]
        Hook name -> module path. A path ending in ``":input"`` hooks the first positional input of that
        sub-module (a forward pre-hook), otherwise its output. When the input/output is a tuple, the hook
        point sees (and may replace) element 0, e.g. the hidden states of a Hugging Face block.
    n_layers : int, optional
        Number of blocks (patching grids need it).

    Examples
    --------
    >>> hm = HookedModule(gpt2, {"blocks.0.hook_resid_pre": "transformer.h.0:input",
    ...                          "blocks.0.hook_resid_post": "transformer.h.0"})  # doctest: +SKIP
    """

    def __init__(self, module: nn.Module, hook_points: dict[str, str], n_layers: int | None = None) -> None:
        super().__init__()
        self.module = module
        self.n_layers = n_layers
        self._points = nn.ModuleDict()
        self._handles = []
        self.hook_dict = {}
        mods = dict(module.named_modules())
        for name, path in hook_points.items():
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
                self._handles.append(mods[mpath].register_forward_pre_hook(self._pre(hp), with_kwargs=True))
            else:
                self._handles.append(mods[mpath].register_forward_hook(self._post(hp)))

    def remove_hooks(self) -> None:
        """Take this wrapper's hooks off the wrapped module (it then runs as before it was wrapped); the wrapper's
        hook points no longer fire."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @staticmethod
    def _pre(hp: HookPoint) -> Callable:
        def fn(mod: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
            if not hp._fns:
                return None
            if args:
                return (hp(args[0]), *args[1:]), kwargs
            if "hidden_states" in kwargs:  # Hugging Face blocks may be called with keywords
                return args, {**kwargs, "hidden_states": hp(kwargs["hidden_states"])}
            raise RuntimeError(f"hook point {hp.name!r}: the module got no positional input to hook")

        fn.hook_point = hp  # the identity while hp has no function attached (read by the converters)
        return fn

    @staticmethod
    def _post(hp: HookPoint) -> Callable:
        def fn(mod: nn.Module, args: tuple, out: Any) -> Any:
            if not hp._fns:
                return None
            if isinstance(out, tuple):
                return (hp(out[0]), *out[1:])
            return hp(out)

        fn.hook_point = hp
        return fn

    def setup_hooks(self) -> None:  # names are given, nothing to discover
        return None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)
