"""TransformerLens' analysis methods of an activation cache, for caches of pypattern's :class:`Transformer`.

The functions here take the cache as their first argument; :class:`~pypattern.models.hooks.ActivationCache` has
them as its methods (the same functions, so one signature and one docstring each), with TransformerLens' names,
arguments and defaults (``cache.decompose_resid(...)``). They read the
model that produced the cache (``cache.model``, set by ``run_with_cache``) for its configuration and weights.

Norms. TransformerLens' ``apply_ln_to_stack`` divides (centred) components by the norm's cached scale and leaves
the norm's weight and bias to ``fold_ln``, which folds them into the next layer. pypattern's models keep their
norm weights, so here the linear part of the norm is applied: centring (LayerNorm), division by the cached
``hook_scale`` and multiplication by the norm's weight. The norm's bias is a constant of the stream, not of any
component, and is not added: the components of a stream sum to the norm's output minus its bias. Products with
``W_U`` (or ``W_Q``, ...) then equal TransformerLens' on the same model loaded with ``fold_ln=True``, whose folded
unembedding bias is ``b_U + ln_final.b @ W_U``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .hooks import ActivationCache

__all__ = [
    "accumulated_resid",
    "decompose_resid",
    "compute_head_results",
    "stack_head_results",
    "stack_activation",
    "stack_neuron_results",
    "apply_ln_to_stack",
    "logit_attrs",
    "get_full_resid_decomposition",
]


# ------------------------------------------------------------------------------------------------ helpers


def _model(cache: ActivationCache) -> Any:
    """The :class:`Transformer` that produced ``cache``; a clear error when there is none."""
    from .transformer import Transformer

    model = getattr(cache, "model", None)
    if model is None:
        raise ValueError(
            "this ActivationCache has no model (cache.model is None): the analysis methods read the model's "
            "configuration and weights (W_U, W_O, ln_final, ...). Build the cache with model.run_with_cache(...), "
            "or set cache.model = model (the Transformer that produced it)"
        )
    if not isinstance(model, Transformer):
        raise TypeError(
            f"cache.model is a {type(model).__name__}; the analysis methods need pypattern's Transformer (its hook "
            "names, weights and norms), e.g. a model from pypattern.from_hf or Transformer(cfg)"
        )
    return model


def _get(cache: ActivationCache, name: str, why: str) -> torch.Tensor:
    """``cache[name]``, or a KeyError saying which hook is missing and what needed it."""
    if dict.__contains__(cache, name):
        return dict.__getitem__(cache, name)
    raise KeyError(
        f"{why} needs the activation {name!r}, which is not in the cache; run run_with_cache without a "
        "names_filter (or with one that keeps it)"
    )


def _slicer(pos_slice: Any):
    """``(tensor, axis) -> tensor`` for ``pos_slice`` (TransformerLens' ``Slice``: an int drops the axis), the
    identity for None."""
    from .hooks import _pos_slicer

    take = _pos_slicer(pos_slice)
    return (lambda t, axis: t) if take is None else take


def _layer(model: Any, layer: Any, name: str = "layer") -> int:
    """``layer`` as an index in ``[0, n_layers]`` (None and -1 mean ``n_layers``: the unembedding's input)."""
    n = model.cfg.n_layers
    if layer is None:
        return n
    if isinstance(layer, bool) or not isinstance(layer, int) or not -1 <= layer <= n:
        raise ValueError(
            f"{name}={layer!r} is not valid; give an int in [0, {n}] (n_layers = {n} is the unembedding's "
            "input), -1 or None (the same as n_layers)"
        )
    return n if layer == -1 else layer


def _check_mlp_input(model: Any, layer: int, mlp_input: bool) -> None:
    if not mlp_input:
        return
    if layer == model.cfg.n_layers:
        raise ValueError(
            f"mlp_input=True with layer={layer} (n_layers, the unembedding's input) is not valid: there is no MLP "
            "there; give a layer below n_layers, or mlp_input=False"
        )
    if model.cfg.attn_only:
        raise ValueError("mlp_input=True is not valid: the model is attention-only (no MLP, no ln2)")


def _resid_at(cache: ActivationCache, model: Any, layer: int, mlp_input: bool, why: str) -> torch.Tensor:
    """The residual stream entering layer ``layer`` (its MLP with ``mlp_input``; the unembedding at n_layers)."""
    if layer == model.cfg.n_layers:
        return _get(cache, f"blocks.{layer - 1}.hook_resid_post", why)
    if mlp_input and not model.cfg.parallel_attn_mlp:
        return _get(cache, f"blocks.{layer}.hook_resid_mid", why)
    return _get(cache, f"blocks.{layer}.hook_resid_pre", why)


def _no_sandwich(model: Any, what: str) -> None:
    if model.cfg.use_normalization_before_and_after:
        raise ValueError(
            f"{what} is not available for this model: with use_normalization_before_and_after the attention's and "
            "the MLP's outputs pass through a norm (ln1_post / ln2_post) before they reach the residual stream, so "
            "they are not sums of per-head or per-neuron terms"
        )


def _multiplier(model: Any) -> float:
    m = model.cfg.residual_multiplier
    return 1.0 if m is None else float(m)


def _norm_kind(norm: nn.Module) -> str | None:
    """ "LN" (centres), "RMS", or None (no norm)."""
    from .transformer import LayerNorm, LayerNormPre, RMSNorm, RMSNormPre

    if isinstance(norm, RMSNorm | RMSNormPre):
        return "RMS"
    if isinstance(norm, LayerNorm | LayerNormPre):
        return "LN"
    return None


def _target_norm(model: Any, layer: int, mlp_input: bool) -> tuple[nn.Module, str]:
    if layer == model.cfg.n_layers:
        return model.ln_final, "ln_final"
    which = "ln2" if mlp_input else "ln1"
    if mlp_input and model.cfg.parallel_shared_norm:
        which = "ln1"  # one norm read by both sublayers
    return getattr(model.blocks[layer], which), f"blocks.{layer}.{which}"


def _gain(norm: nn.Module) -> torch.Tensor | None:
    return getattr(norm, "gain", None)


def _full_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` computed from its statistics of ``x`` itself (weight and bias included), without running the
    module's hook points."""
    from .transformer import RMSNormPre

    kind = _norm_kind(norm)
    if kind is None:
        return x
    # the norm's own arithmetic (its forward, without its hook points): torch's layer_norm for LayerNorm, Hugging
    # Face's x * rsqrt(mean(x^2) + eps) for RMSNorm, in the compute dtype, the weight after the cast back (before
    # it with an offset or weight_before_cast, Gemma's and Helium's order)
    cd = getattr(norm, "compute_dtype", None)
    h = x if cd is None else x.to(cd)
    w, b = getattr(norm, "w", None), getattr(norm, "b", None)
    if kind == "LN" and w is not None:  # LayerNorm, its weight plus any offset (Nemotron's 1 + w)
        gain = getattr(norm, "gain", w)
        if cd in (None, x.dtype):  # one fused pass
            return torch.nn.functional.layer_norm(x, x.shape[-1:], gain, b, norm.eps)
        h = torch.nn.functional.layer_norm(h, h.shape[-1:], eps=norm.eps).to(x.dtype)
        return torch.addcmul(b, h, gain)
    if kind == "LN":
        h = torch.nn.functional.layer_norm(h, h.shape[-1:], eps=norm.eps)
    elif isinstance(norm, RMSNormPre):  # TransformerLens' RMSPre: x / sqrt(mean(x^2) + eps)
        h = h / (h.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()
    else:
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps)
    if w is not None and (getattr(norm, "offset", 0.0) or getattr(norm, "weight_before_cast", False)):
        return (h * (norm.offset + w.to(h.dtype))).to(x.dtype)
    y = h.to(x.dtype)
    if w is not None and b is not None:
        return torch.addcmul(b, y, w)
    return y if w is None else y * w


def _projection(model: Any, project_output_onto: Any) -> tuple[torch.Tensor | None, bool]:
    """``project_output_onto`` as ``(d_model, num_outputs)`` and whether it was ``(d_model,)`` (the output's last
    axis is then dropped); ``(None, False)`` for None."""
    if project_output_onto is None:
        return None, False
    d = model.cfg.d_model
    if not isinstance(project_output_onto, torch.Tensor):
        raise TypeError(
            f"project_output_onto is a {type(project_output_onto).__name__}; give a tensor of shape (d_model,) or "
            f"(d_model, num_outputs), d_model = {d}"
        )
    p = project_output_onto
    if p.dim() not in (1, 2) or p.shape[0] != d or not (p.is_floating_point() or p.is_complex()):
        raise ValueError(
            f"project_output_onto has shape {tuple(p.shape)} and dtype {p.dtype}; give a floating tensor of shape "
            f"(d_model,) or (d_model, num_outputs), d_model = {d}"
        )
    return (p[:, None] if p.dim() == 1 else p), p.dim() == 1


def _stack(parts: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    if parts:
        return torch.stack(parts, dim=0)
    return like.new_zeros((0, *like.shape))


# ------------------------------------------------------------------------------------------------ norms


def apply_ln_to_stack(
    cache: ActivationCache,
    residual_stack: torch.Tensor,
    layer: int | None = None,
    mlp_input: bool = False,
    pos_slice: Any = None,
    batch_slice: Any = None,
    has_batch_dim: bool = True,
    recompute_ln: bool = False,
) -> torch.Tensor:
    """Treat each component of ``residual_stack (num_components, *batch_and_pos_dims, d_model)`` as part of
    the input of ``layer``'s ``ln1`` (``ln2`` with ``mlp_input``; ``ln_final`` at ``n_layers``, -1 or None)
    and apply the norm's linear part with the scale cached in the forward: centre (LayerNorm), divide by
    ``hook_scale``, multiply by the norm's weight. The norm's bias is not added (it belongs to no component):
    the components of a whole stream sum to the norm's output minus its bias. A layer without a norm returns
    the stack unchanged. With ``recompute_ln`` at ``n_layers``, each component goes through ``ln_final`` with
    its own statistics (weight and bias included).

    ``pos_slice`` and ``batch_slice`` are the slices the stack was taken with (applied to the cached scale;
    ``batch_slice`` to the stack's axis 1 too when ``has_batch_dim``). A stack whose batch/position dims do not
    match the sliced scale raises ``ValueError``; a cache without the scale raises ``KeyError``.
    """
    model = _model(cache)
    if not isinstance(residual_stack, torch.Tensor):
        raise TypeError(
            f"residual_stack is a {type(residual_stack).__name__}; give a tensor (num_components, ...)"
        )
    d = model.cfg.d_model
    if residual_stack.dim() < 2 or residual_stack.shape[-1] != d:
        raise ValueError(
            f"residual_stack has shape {tuple(residual_stack.shape)}; give (num_components, *batch_and_pos_dims, "
            f"d_model={d})"
        )
    layer = _layer(model, layer)
    _check_mlp_input(model, layer, mlp_input)
    take_pos, take_batch = _slicer(pos_slice), _slicer(batch_slice)
    if has_batch_dim and batch_slice is not None:
        residual_stack = take_batch(residual_stack, -residual_stack.dim() + 1)
    norm, where = _target_norm(model, layer, mlp_input)
    kind = _norm_kind(norm)
    if kind is None:  # no norm there: the stream enters the layer as it is
        return residual_stack
    if recompute_ln and layer == model.cfg.n_layers:
        return _full_norm(norm, residual_stack)
    scale = _get(cache, f"{where}.hook_scale", "apply_ln (the cached norm scale)")
    scale = take_pos(scale, -2)
    if batch_slice is not None and cache.has_batch_dim:
        scale = take_batch(scale, -scale.dim())
    if tuple(residual_stack.shape[1:-1]) != tuple(scale.shape[:-1]):
        raise ValueError(
            f"residual_stack has batch/position dims {tuple(residual_stack.shape[1:-1])} but the cached scale "
            f"{where}.hook_scale (after pos_slice={pos_slice!r}, batch_slice={batch_slice!r}) has "
            f"{tuple(scale.shape[:-1])}; give the same pos_slice / batch_slice the stack was taken with (and "
            "has_batch_dim=False for a stack without a batch axis)"
        )
    if kind == "LN":
        residual_stack = residual_stack - residual_stack.mean(-1, keepdim=True)
    out = residual_stack / scale
    g = _gain(norm)
    return out if g is None else out * g


# ------------------------------------------------------------------------------------------------ stacks


def accumulated_resid(
    cache: ActivationCache,
    layer: int | None = None,
    incl_mid: bool = False,
    apply_ln: bool = False,
    pos_slice: Any = None,
    mlp_input: bool = False,
    return_labels: bool = False,
):
    """The residual stream at the input of each layer up to ``layer`` (logit-lens style), stacked:
    ``(num_streams, *batch_and_pos_dims, d_model)``; labels ``"0_pre"``, ``"0_mid"``, ..., ``"final_post"``.

    Parameters
    ----------
    cache : ActivationCache
        The cache to read (``self`` when called as its method).
    layer : int or None
        Streams up to the input of this layer (its ``hook_resid_pre``, not its mid or post): in ``[0,
        n_layers]``; ``n_layers``, -1 or None include the final ``hook_resid_post`` (the unembedding's input).
    incl_mid : bool
        Also each earlier layer's ``hook_resid_mid``.
    apply_ln : bool
        Normalise as the input of ``layer``: at ``n_layers`` each stream through ``ln_final`` with its own
        statistics (weight and bias included: ``@ W_U + b_U`` gives the logit lens' logits); below, by the
        cached scale of that layer's ``ln1`` (``ln2`` with ``mlp_input``), see :meth:`apply_ln_to_stack`.
    pos_slice : int, tuple, slice, list or 1-d tensor, optional
        Positions to keep (TransformerLens' ``Slice``: an int drops the position axis).
    mlp_input : bool
        Also ``hook_resid_mid`` of ``layer`` itself (the MLP's input).
    return_labels : bool
        Return ``(stack, labels)``.
    """
    model = _model(cache)
    n = model.cfg.n_layers
    layer = _layer(model, layer)
    _check_mlp_input(model, layer, mlp_input)
    if (incl_mid or mlp_input) and (model.cfg.parallel_attn_mlp or model.cfg.attn_only):
        arg = "incl_mid" if incl_mid else "mlp_input"
        raise ValueError(
            f"{arg}=True is not valid: the model's blocks have no hook_resid_mid "
            f"({'attention-only' if model.cfg.attn_only else 'parallel attention and MLP'})"
        )
    take = _slicer(pos_slice)
    why = "accumulated_resid"
    parts, labels = [], []
    for ell in range(layer + 1):
        if ell == n:
            parts.append(_get(cache, f"blocks.{n - 1}.hook_resid_post", why))
            labels.append("final_post")
            continue
        parts.append(_get(cache, f"blocks.{ell}.hook_resid_pre", why))
        labels.append(f"{ell}_pre")
        if (incl_mid and ell < layer) or (mlp_input and ell == layer):
            parts.append(_get(cache, f"blocks.{ell}.hook_resid_mid", why))
            labels.append(f"{ell}_mid")
    out = torch.stack([take(p, -2) for p in parts], dim=0)
    if apply_ln:
        out = apply_ln_to_stack(
            cache, out, layer, mlp_input=mlp_input, pos_slice=pos_slice, recompute_ln=layer == n
        )
    return (out, labels) if return_labels else out


def decompose_resid(
    cache: ActivationCache,
    layer: int | None = None,
    mlp_input: bool = False,
    mode: str = "all",
    apply_ln: bool = False,
    pos_slice: Any = None,
    incl_embeds: bool = True,
    return_labels: bool = False,
):
    """The residual stream at the input of ``layer`` as the stack of what wrote it: ``hook_embed``,
    ``hook_pos_embed`` (when the model has learned positions), then each earlier layer's ``hook_attn_out`` and
    ``hook_mlp_out``: ``(num_components, *batch_and_pos_dims, d_model)``, summing to ``hook_resid_pre`` of
    ``layer`` (``hook_resid_post`` of the last layer at ``n_layers``). Labels ``"embed"``, ``"pos_embed"``,
    ``"0_attn_out"``, ``"0_mlp_out"``, ...

    Parameters
    ----------
    cache : ActivationCache
        The cache to read (``self`` when called as its method).
    layer : int or None
        In ``[0, n_layers]``; ``n_layers``, -1 or None: the unembedding's input.
    mlp_input : bool
        Decompose the input of ``layer``'s MLP instead (adds ``layer``'s ``hook_attn_out`` in a sequential
        block; a parallel block's MLP reads ``hook_resid_pre``).
    mode : {"all", "mlp", "attn"}
        Which sublayers' outputs to include.
    apply_ln : bool
        :meth:`apply_ln_to_stack` as the input of ``layer`` (cached scale).
    pos_slice : int, tuple, slice, list or 1-d tensor, optional
        Positions to keep (an int drops the position axis).
    incl_embeds : bool
        Include the embeddings.
    return_labels : bool
        Return ``(stack, labels)``.
    """
    model = _model(cache)
    if mode not in ("all", "mlp", "attn"):
        raise ValueError(f"mode={mode!r} is not valid; give 'all', 'mlp' or 'attn'")
    layer = _layer(model, layer)
    _check_mlp_input(model, layer, mlp_input)
    take = _slicer(pos_slice)
    why = "decompose_resid"
    incl_attn = mode != "mlp"
    incl_mlp = mode != "attn" and not model.cfg.attn_only
    parts, labels = [], []
    if incl_embeds:
        for name, label in (("hook_embed", "embed"), ("hook_pos_embed", "pos_embed")):
            if dict.__contains__(cache, name):
                parts.append(dict.__getitem__(cache, name))
                labels.append(label)
        if not dict.__contains__(cache, "hook_embed"):
            _get(cache, "hook_embed", "decompose_resid(incl_embeds=True)")
    for ell in range(layer):
        if incl_attn:
            parts.append(_get(cache, f"blocks.{ell}.hook_attn_out", why))
            labels.append(f"{ell}_attn_out")
        if incl_mlp:
            parts.append(_get(cache, f"blocks.{ell}.hook_mlp_out", why))
            labels.append(f"{ell}_mlp_out")
    if mlp_input and incl_attn and not model.cfg.parallel_attn_mlp:
        parts.append(_get(cache, f"blocks.{layer}.hook_attn_out", why))
        labels.append(f"{layer}_attn_out")
    like = take(_get(cache, "blocks.0.hook_resid_pre", why), -2)
    out = _stack([take(p, -2) for p in parts], like)
    if apply_ln:
        out = apply_ln_to_stack(cache, out, layer, mlp_input=mlp_input, pos_slice=pos_slice)
    return (out, labels) if return_labels else out


def compute_head_results(cache: ActivationCache) -> None:
    """Store each head's write to the residual stream, ``blocks.{l}.attn.hook_result (*batch_and_pos_dims,
    n_heads, d_model)`` = ``hook_z`` times the head's ``W_O`` (times ``residual_multiplier`` when set), in the
    cache; summed over heads plus ``b_O`` it is ``hook_attn_out``. Layers already holding it are kept. Models
    with ``use_normalization_before_and_after`` are refused (their attention output is normalised)."""
    model = _model(cache)
    _no_sandwich(model, "compute_head_results")
    m = _multiplier(model)
    for ell, block in enumerate(model.blocks):
        key = f"blocks.{ell}.attn.hook_result"
        if dict.__contains__(cache, key) and dict.__getitem__(cache, key).dim() >= 3:
            continue
        z = _get(cache, f"blocks.{ell}.attn.hook_z", "compute_head_results")
        W_O = block.attn.W_O.to(z.dtype)
        res = torch.einsum("...hd,hdm->...hm", z, W_O)
        dict.__setitem__(cache, key, res * m if m != 1.0 else res)


def stack_head_results(
    cache: ActivationCache,
    layer: int | None = -1,
    return_labels: bool = False,
    incl_remainder: bool = False,
    pos_slice: Any = None,
    apply_ln: bool = False,
):
    """Every head's result in the layers before ``layer``: ``(layer * n_heads, *batch_and_pos_dims,
    d_model)``, labels ``"L0H0"``, ``"L0H1"``, ...

    Parameters
    ----------
    cache : ActivationCache
        The cache to read (``self`` when called as its method).
    layer : int or None
        Heads of layers strictly before it, in ``[0, n_layers]``; -1 or None: every layer.
    return_labels : bool
        Return ``(stack, labels)``.
    incl_remainder : bool
        Append ``"remainder"``: the stream at the input of ``layer`` minus the heads' sum.
    pos_slice : int, tuple, slice, list or 1-d tensor, optional
        Positions to keep (an int drops the position axis).
    apply_ln : bool
        :meth:`apply_ln_to_stack` as the input of ``layer``.
    """
    model = _model(cache)
    layer = _layer(model, layer)
    compute_head_results(cache)
    take = _slicer(pos_slice)
    why = "stack_head_results"
    parts, labels = [], []
    for ell in range(layer):
        r = take(dict.__getitem__(cache, f"blocks.{ell}.attn.hook_result"), -3)  # (..., n_heads, d_model)
        parts.append(r.movedim(-2, 0))
        labels.extend(f"L{ell}H{h}" for h in range(model.cfg.n_heads))
    return _finish_stack(
        cache, model, parts, labels, layer, take, why, incl_remainder, apply_ln, pos_slice, return_labels
    )


def _finish_stack(
    cache,
    model,
    parts,
    labels,
    layer,
    take,
    why,
    incl_remainder,
    apply_ln,
    pos_slice,
    return_labels,
    mlp_input=False,
):
    """The per-head or per-neuron stack from its ``parts`` (each ``(k, *batch_and_pos_dims, d_model)``), with the
    ``"remainder"`` of the stream at the input of ``layer`` (``incl_remainder``) and the norm applied
    (``apply_ln``); ``(stack, labels)`` with ``return_labels``."""
    like = take(_get(cache, "blocks.0.hook_resid_pre", why), -2)
    out = torch.cat(parts, dim=0) if parts else like.new_zeros((0, *like.shape))
    if incl_remainder:
        total = take(_resid_at(cache, model, layer, mlp_input, why), -2)
        out = torch.cat([out, (total - out.sum(0))[None]], dim=0)
        labels.append("remainder")
    if apply_ln:
        out = apply_ln_to_stack(cache, out, layer, mlp_input=mlp_input, pos_slice=pos_slice)
    return (out, labels) if return_labels else out


def get_neuron_results(
    cache: ActivationCache,
    layer: int,
    neuron_slice: Any = None,
    pos_slice: Any = None,
    project_output_onto: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each MLP neuron's write to the residual stream in ``layer``: ``hook_post`` times its row of ``W_out``,
    ``(*batch_and_pos_dims, d_mlp, d_model)`` (``neuron_slice`` keeps some neurons; an int keeps an axis of
    one). Summed over neurons plus ``b_out`` it is ``hook_mlp_out``. ``project_output_onto`` (``(d_model,)`` or
    ``(d_model, num_outputs)``, TransformerLens' argument) gives each write's projection instead, the last axis
    ``num_outputs`` (dropped for a vector), without forming the ``d_model`` axis."""
    model = _model(cache)
    proj, squeeze = _projection(model, project_output_onto)
    acts, W_out = _neuron_acts(cache, model, layer, neuron_slice, pos_slice)
    if proj is not None:
        W_out = W_out @ proj.to(W_out.device, W_out.dtype)  # (d_mlp, num_outputs)
    out = acts[..., None] * W_out
    return out[..., 0] if squeeze else out


def _neuron_acts(
    cache: ActivationCache, model: Any, layer: int, neuron_slice: Any, pos_slice: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hook_post * residual_multiplier, W_out)`` of ``layer``'s kept neurons and positions:
    ``(*batch_and_pos_dims, d_mlp)`` and ``(d_mlp, d_model)``."""
    _no_sandwich(model, "get_neuron_results")
    if model.cfg.attn_only:
        raise ValueError("get_neuron_results: the model is attention-only (no MLP neurons)")
    if model.cfg.n_experts is not None:
        raise ValueError(
            "get_neuron_results: the model's MLPs are mixtures of experts, whose neurons are not one hook_post "
            "each; use decompose_resid(mode='mlp') or get_full_resid_decomposition(expand_neurons=False)"
        )
    n = model.cfg.n_layers
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
        raise ValueError(f"layer={layer!r} is not valid; give an int in [0, {n - 1}]")
    take_pos = _slicer(pos_slice)
    acts = take_pos(_get(cache, f"blocks.{layer}.mlp.hook_post", "get_neuron_results"), -2)
    W_out = model.blocks[layer].mlp.W_out.to(acts.dtype)
    if neuron_slice is not None:
        if isinstance(neuron_slice, int) and not isinstance(neuron_slice, bool):
            neuron_slice = [neuron_slice]  # keep the neuron axis
        take_n = _slicer(neuron_slice)
        acts, W_out = take_n(acts, -1), take_n(W_out, -2)
    m = _multiplier(model)
    return (acts * m if m != 1.0 else acts), W_out


def stack_neuron_results(
    cache: ActivationCache,
    layer: int,
    pos_slice: Any = None,
    neuron_slice: Any = None,
    return_labels: bool = False,
    incl_remainder: bool = False,
    apply_ln: bool = False,
    project_output_onto: torch.Tensor | None = None,
    mlp_input: bool = False,
):
    """Every neuron's result in the layers before ``layer``: ``(layer * d_mlp, *batch_and_pos_dims,
    d_model)``, labels ``"L0N0"``, ...; arguments as :meth:`stack_head_results`, and (TransformerLens'):

    project_output_onto : tensor (d_model,) or (d_model, num_outputs), optional
        Each component's projection instead of its ``d_model`` vector (after the norm with ``apply_ln``),
        computed without forming the ``(..., d_mlp, d_model)`` products; a vector drops the last axis.
    mlp_input : bool
        The stack as the input of ``layer``'s MLP: the remainder fills it up to ``hook_resid_mid`` (the
        stream a parallel block's MLP reads, ``hook_resid_pre``), and ``apply_ln`` uses ``ln2``'s scale. The
        neurons stacked are the same.
    """
    model = _model(cache)
    layer = _layer(model, layer)
    _check_mlp_input(model, layer, mlp_input)
    proj, squeeze = _projection(model, project_output_onto)
    take = _slicer(pos_slice)
    why = "stack_neuron_results"
    if isinstance(neuron_slice, int) and not isinstance(neuron_slice, bool):
        neuron_slice = [neuron_slice]  # keep the neuron axis
    folded = apply_ln and proj is not None
    kind = scale = gain = None
    if folded and layer > 0:
        norm, where = _target_norm(model, layer, mlp_input)
        kind, gain = _norm_kind(norm), _gain(norm)
        if kind is not None:
            scale = take(_get(cache, f"{where}.hook_scale", "apply_ln (the cached norm scale)"), -2)
    parts, labels = [], []
    for ell in range(layer):
        if folded and kind is not None:
            # norm(a_n W_n) @ P = (a_n / scale) * (((W_n - mean W_n) * gain) @ P): linear in each write
            acts, W = _neuron_acts(cache, model, ell, neuron_slice, pos_slice)
            if kind == "LN":
                W = W - W.mean(-1, keepdim=True)
            if gain is not None:
                W = W * gain.to(W.dtype)
            if tuple(acts.shape[:-1]) != tuple(scale.shape[:-1]):
                raise ValueError(
                    f"stack_neuron_results: the neurons' batch/position dims {tuple(acts.shape[:-1])} do not match "
                    f"the cached norm scale's {tuple(scale.shape[:-1])}"
                )
            r = (acts / scale)[..., None] * (W @ proj.to(W.device, W.dtype))
        else:
            # no norm there (folded) or no apply_ln: a plain projection, when one is given
            r = get_neuron_results(
                cache, ell, neuron_slice=neuron_slice, pos_slice=pos_slice, project_output_onto=proj
            )
        parts.append(r.movedim(-2, 0))
        d_mlp = model.cfg.d_mlp
        idx = torch.arange(d_mlp)
        idx = idx if neuron_slice is None else _slicer(neuron_slice)(idx, -1)
        idx = idx.tolist()
        labels.extend(f"L{ell}N{i}" for i in idx)
    if proj is None:
        return _finish_stack(
            cache,
            model,
            parts,
            labels,
            layer,
            take,
            why,
            incl_remainder,
            apply_ln,
            pos_slice,
            return_labels,
            mlp_input=mlp_input,
        )
    like = take(_get(cache, "blocks.0.hook_resid_pre", why), -2)
    out = torch.cat(parts, dim=0) if parts else like.new_zeros((0, *like.shape[:-1], proj.shape[-1]))
    if incl_remainder:
        total = take(_resid_at(cache, model, layer, mlp_input, why), -2)
        if apply_ln:
            total = apply_ln_to_stack(cache, total[None], layer, mlp_input=mlp_input, pos_slice=pos_slice)[0]
        total = total @ proj.to(total.device, total.dtype)
        out = torch.cat([out, (total - out.sum(0))[None]], dim=0)
        labels.append("remainder")
    if squeeze:
        out = out[..., 0]
    return (out, labels) if return_labels else out


def stack_activation(
    cache: ActivationCache, activation_name: str, layer: int | None = -1, sublayer_type: str | None = None
) -> torch.Tensor:
    """The activation ``activation_name`` (shorthand, :func:`get_act_name`) of every layer strictly before
    ``layer`` (-1 or None: all), stacked: ``(layers, *activation_shape)``."""
    from .hooks import get_act_name

    model = _model(cache)
    layer = _layer(model, layer)
    if not isinstance(activation_name, str):
        raise TypeError(
            f"activation_name={activation_name!r} is not valid; give a name such as 'resid_pre' or 'z'"
        )
    if layer == 0:
        raise ValueError(
            "layer=0 stacks no layer (layers strictly before it); give a layer in [1, n_layers] or -1"
        )
    names = [get_act_name(activation_name, ell, sublayer_type) for ell in range(layer)]
    return torch.stack([_get(cache, nm, f"stack_activation({activation_name!r})") for nm in names], dim=0)


# ------------------------------------------------------------------------------------------------ logits


def _token_ids(model: Any, tokens: Any, name: str) -> torch.Tensor:
    if isinstance(tokens, str):
        tok = getattr(model, "to_single_token", None)
        if tok is None:
            raise TypeError(
                f"{name}={tokens!r}: the model has no tokenizer; give token ids (an int or an integer tensor)"
            )
        tokens = tok(tokens)
    if isinstance(tokens, bool) or not isinstance(tokens, int | torch.Tensor):
        raise TypeError(f"{name} is a {type(tokens).__name__}; give an int or an integer tensor of token ids")
    t = torch.as_tensor(tokens)
    if t.is_floating_point() or t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} has dtype {t.dtype}; give integer token ids")
    V = model.cfg.d_vocab
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= V):
        raise ValueError(f"{name} holds ids outside [0, {V}) (d_vocab = {V})")
    return t


def tokens_to_residual_directions(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """``W_U[:, tokens]`` moved to ``(*tokens.shape, d_model)``."""
    W_U = model.W_U
    return W_U[:, tokens.to(W_U.device)].movedim(0, -1)


def logit_attrs(
    cache: ActivationCache,
    residual_stack: torch.Tensor,
    tokens: Any,
    incorrect_tokens: Any = None,
    pos_slice: Any = None,
    batch_slice: Any = None,
    has_batch_dim: bool = True,
) -> torch.Tensor:
    """Direct logit attribution: each component of ``residual_stack (num_components, *batch_and_pos_dims,
    d_model)``, normalised by ``ln_final``'s cached scale (:meth:`apply_ln_to_stack`), dotted with
    ``W_U[:, tokens]`` (minus ``W_U[:, incorrect_tokens]`` when given): ``(num_components,
    *batch_and_pos_dims)``. ``tokens`` is one id or ids of shape ``batch_and_pos_dims``; for a ``(batch, pos)``
    stack also ``(batch,)`` (one id per example at every position, also when batch = pos) or ``(pos,)`` /
    ``(1, pos)`` (one id per position), as TransformerLens 4.x; ``incorrect_tokens`` has the shape of
    ``tokens``. For the whole final stream the components sum to the logit (difference) less
    the unembedding bias and ``ln_final.b @ W_U`` (TransformerLens' folded ``b_U``), before any
    ``logits_scaling`` or soft cap."""
    model = _model(cache)
    tok = _token_ids(model, tokens, "tokens")
    if incorrect_tokens is not None:
        bad = _token_ids(model, incorrect_tokens, "incorrect_tokens")
        if bad.shape != tok.shape:
            raise ValueError(
                f"tokens has shape {tuple(tok.shape)} and incorrect_tokens {tuple(bad.shape)}; give the same shape"
            )
    scaled = apply_ln_to_stack(
        cache,
        residual_stack,
        layer=-1,
        pos_slice=pos_slice,
        batch_slice=batch_slice,
        has_batch_dim=has_batch_dim,
    )
    dims = tuple(scaled.shape[1:-1])
    per_example = False
    if tok.dim() and tuple(tok.shape) != dims:
        # TransformerLens' broadcasts over a (batch, pos) stack: (batch,) one id per example at every position
        # (also when batch = pos), another 1-d length one id per position, (1, pos) per position too
        ok = has_batch_dim and len(dims) == 2
        if ok and tok.dim() == 1 and tok.shape[0] == dims[0]:
            per_example = True
        elif not (ok and (tuple(tok.shape) in ((dims[1],), (1, dims[1])))):
            raise ValueError(
                f"tokens has shape {tuple(tok.shape)} but the residual stack's batch/position dims are {dims}; "
                f"give one token id, or ids of shape {dims} (for a (batch, pos) stack also (batch,): one id per "
                "example at every position, or (pos,) / (1, pos): one id per position)"
            )
    dirs = tokens_to_residual_directions(model, tok)
    if incorrect_tokens is not None:
        dirs = dirs - tokens_to_residual_directions(model, bad)
    if per_example:
        dirs = dirs[:, None]
    return (scaled * dirs.to(scaled.dtype)).sum(-1)


# ------------------------------------------------------------------------------------------------ full decomposition


def accumulated_bias(
    model: Any, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True
) -> torch.Tensor:
    """The biases written to the residual stream before the input of ``layer`` (``(d_model,)``): each earlier
    attention's ``b_O`` (and, with ``include_mlp_biases``, each MLP's ``b_out``), and with ``mlp_input`` the
    attention of ``layer`` itself (sequential blocks); times ``residual_multiplier`` when set."""
    W = model.W_U
    acc = W.new_zeros(model.cfg.d_model)
    blocks = list(model.blocks[:layer])
    for block in blocks:
        if block.attn.b_O is not None:
            acc = acc + block.attn.b_O
        if include_mlp_biases and not model.cfg.attn_only and getattr(block.mlp, "b_out", None) is not None:
            acc = acc + block.mlp.b_out
    if mlp_input and not model.cfg.parallel_attn_mlp and model.blocks[layer].attn.b_O is not None:
        acc = acc + model.blocks[layer].attn.b_O
    return acc * _multiplier(model)


def get_full_resid_decomposition(
    cache: ActivationCache,
    layer: int | None = None,
    mlp_input: bool = False,
    expand_neurons: bool = True,
    apply_ln: bool = False,
    pos_slice: Any = None,
    return_labels: bool = False,
    project_output_onto: torch.Tensor | None = None,
):
    """The input of ``layer`` (its MLP with ``mlp_input``) as every head's result, every neuron's result
    (``expand_neurons``; else each MLP's ``hook_mlp_out``), ``embed``, ``pos_embed`` and ``"bias"`` (the
    attention ``b_O`` and, with ``expand_neurons``, MLP ``b_out`` biases written so far), stacked:
    ``(num_components, *batch_and_pos_dims, d_model)``, summing to that stream. Other arguments as
    :meth:`decompose_resid`; ``project_output_onto`` (``(d_model,)`` or ``(d_model, num_outputs)``,
    TransformerLens' argument) projects each component (after the norm with ``apply_ln``), the neurons' without
    forming their ``d_model`` vectors; a vector drops the last axis. Sandwich-norm models are refused, and
    ``expand_neurons`` for mixtures of experts."""
    model = _model(cache)
    _no_sandwich(model, "get_full_resid_decomposition")
    layer = _layer(model, layer)
    _check_mlp_input(model, layer, mlp_input)
    proj, squeeze = _projection(model, project_output_onto)
    take = _slicer(pos_slice)

    def finish(x: torch.Tensor) -> torch.Tensor:
        if apply_ln:
            x = apply_ln_to_stack(cache, x, layer, mlp_input=mlp_input, pos_slice=pos_slice)
        return x if proj is None else x @ proj.to(x.device, x.dtype)

    heads_to = layer + (1 if mlp_input and not model.cfg.parallel_attn_mlp else 0)
    head_stack, labels = stack_head_results(cache, heads_to, return_labels=True, pos_slice=pos_slice)
    parts = [finish(head_stack)]
    if not model.cfg.attn_only and layer > 0:
        if expand_neurons:
            st, lab = stack_neuron_results(
                cache,
                layer,
                pos_slice=pos_slice,
                return_labels=True,
                apply_ln=apply_ln,
                project_output_onto=proj,
                mlp_input=mlp_input,
            )
        else:
            st, lab = decompose_resid(
                cache, layer, pos_slice=pos_slice, incl_embeds=False, mode="mlp", return_labels=True
            )
            st = finish(st)
        parts.append(st)
        labels.extend(lab)
    _get(cache, "hook_embed", "get_full_resid_decomposition")
    for name, label in (("hook_embed", "embed"), ("hook_pos_embed", "pos_embed")):
        if dict.__contains__(cache, name):
            parts.append(finish(take(dict.__getitem__(cache, name), -2)[None]))
            labels.append(label)
    bias = accumulated_bias(model, layer, mlp_input, include_mlp_biases=expand_neurons)
    parts.append(finish(bias.to(head_stack.dtype).expand((1, *head_stack.shape[1:]))))
    labels.append("bias")
    out = torch.cat(parts, dim=0)
    if squeeze:
        out = out[..., 0]
    return (out, labels) if return_labels else out
