"""Per-sample gradient Gram of a model: ``G_ij = <grad l_i, grad l_j>`` over the parameters of its *sites*.

:func:`per_sample_grad_gram` records each site's input and output with forward hooks, takes one backward pass of
``sum_i l_i`` for the output gradients, and sums the Grams of the sites, each from the tensor kernels of
:mod:`pypattern.ops.grad_gram` (:func:`~pypattern.ops.grad_gram.grad_gram_linear`,
:func:`~pypattern.ops.grad_gram.grad_gram_embedding`; LayerNorm and positional embeddings from their per-sample
gradients directly), and checks that the captured per-sample gradients account for the parameters' gradients
(``check``). Its specification :func:`per_sample_grad_gram_reference` materialises every per-sample gradient
with ``torch.func.vmap(grad)``.

A site (:class:`GramSite`) is one place where parameters act linearly. :func:`default_sites` gives every
``nn.Linear``, ``nn.Embedding``, affine ``nn.LayerNorm`` and RMS norm with a weight (``nn.RMSNorm``, Hugging
Face's Llama-family ``*RMSNorm``); :func:`transformer_lens_sites` covers every
parameter of a TransformerLens-layout transformer (``pypattern.models.Transformer`` and the models converted into
it), the default for that model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_flag, is_count, refuse_inference_parameters
from .ops.grad_gram import center_gram, grad_gram_dense, grad_gram_embedding, grad_gram_linear

__all__ = [
    "GramSite",
    "default_sites",
    "gram_parameters",
    "per_sample_grad_gram",
    "per_sample_grad_gram_reference",
    "transformer_lens_sites",
]


def _as_btd(name: str, t: torch.Tensor) -> torch.Tensor:
    """``(B, d)`` -> ``(B, 1, d)``; ``(B, ..., d)`` -> ``(B, T, d)`` with the middle dimensions as positions."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() < 2:
        raise ValueError(f"{name} must have shape (B, d) or (B, ..., d), got {tuple(t.shape)}")
    return t.reshape(t.shape[0], math.prod(t.shape[1:-1]), t.shape[-1])


@dataclass(frozen=True)
class GramSite:
    """One place where parameters act linearly, for :func:`per_sample_grad_gram`.

    A capture ``(module name, "input" | "output")`` names a tensor seen by a forward hook on that submodule
    (its first positional input, or its output); the first dimension of every captured tensor is the batch. A
    site's output captured as a module's ``"input"``, or as a :class:`~pypattern.models.hooks.HookPoint`'s
    ``"output"``, is the value arriving there; at a hook point that is before any function attached to it, since
    a hook that scales or replaces an activation changes what the model computes next, not the map's own output.
    A site's input at a hook point is the value after its functions (what the map read).

    Kinds:

    * ``"linear"``: ``y = x W + b`` per position. ``x`` from ``inp`` with its last ``in_dims`` dimensions as
      features, ``y`` from ``out`` (the output the weight's gradient flows through, *including* the bias) with its
      last ``out_dims`` dimensions as features. ``params = (weight name, bias name or None)``.
    * ``"embedding"``: ``y = W[ids]``: ids from ``inp``, ``y`` from ``out``; ``params = (weight name,)``.
    * ``"positional"``: ``y[:, t] = W[t]`` for every sample (ids are the positions); ``params = (weight name,)``.
      With ``inp = (module name, "input")`` naming a module whose ``forward`` takes ``position_ids`` (pypattern's
      ``PosEmbed``), ``y[b, t] = W[position_ids[b, t]]`` where the call is given them (a left-padded batch's
      positions counted from each row's first real token), the columns where it is not.
    * ``"layernorm"``: ``y = xhat * w + b`` with ``xhat = layer_norm(x, eps)`` over the last dimension; ``x`` from
      ``inp``, ``params = (w name, b name or None)``.
    * ``"rmsnorm"``: ``y = xhat * w`` (or ``xhat * (offset + w)``: the gradient is the same) with ``xhat = x /
      sqrt(mean(x^2) + eps)`` over the last dimension; ``x`` from ``inp``, ``params = (w name,)``.

    ``scale`` (embeddings only): the lookup's output is ``W[ids] * scale`` (Gemma's scaled embedding).

    ``logits = (scaling, cap)`` (linear sites, and the second use of a tied embedding): the captured output is
    ``y = cap * tanh(z / scaling / cap)`` of the map's output ``z`` (an unembedding's ``logits_scaling`` and
    soft cap; either may be None), so its gradient is ``dy * (1 - (y / cap)^2) / scaling``.

    ``clip`` (linear sites): the captured output is ``z`` clamped to ``[-clip, clip]`` (OLMo's ``clip_qkv``), so
    the gradient passes where ``|y| < clip`` (a value exactly at the bound counts as clamped).

    ``compute_dtype`` (norms only): ``xhat`` is computed in this dtype and cast back to the input's, as the norm
    module does (a converted Llama-family model normalises in float32 also when cast to float64). A norm that also
    applies its weight in that dtype (Gemma's order) takes its own weight gradient there too: with
    ``weight_in_compute_dtype`` the site takes each sample's weight gradient as that norm's backward does (the
    products and the sum over positions in ``compute_dtype``, then widened); without it, in float64, which agrees
    with the norm's own to that dtype's rounding (about 1e-9 relative for float32 in a float64 model).

    ``tied`` (embeddings only): the ``(output, input)`` captures of the weight's second use, as the linear map ``y =
    x W^T`` (an unembedding tied to the embedding). The site's Gram is then that of the sum of both uses' gradients,
    their cross terms included.

    The weight may have any layout that is a reshape or permutation of the ``(d_in, d_out)`` map (e.g.
    ``W_Q (n_heads, d_model, d_head)``): Gram matrices do not depend on the order of the parameter entries.
    """

    name: str
    kind: str
    params: tuple[str | None, ...]
    out: tuple[str, str]
    inp: tuple[str, str] | None = None
    in_dims: int = 1
    out_dims: int = 1
    padding_idx: int | None = None
    eps: float = 1e-5
    tied: tuple[tuple[str, str], tuple[str, str]] | None = None
    compute_dtype: torch.dtype | None = None
    scale: float | None = None
    logits: tuple[float | None, float | None] | None = None
    clip: float | None = None
    weight_in_compute_dtype: bool = False


def _check_model(model, who: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"{who}: model is a {type(model).__name__}; give the torch.nn.Module whose parameters to cover"
        )
    if _is_bridge(model):
        # a bridge names its parameters by the wrapped modules' own (through wrappers the sites cannot follow)
        raise ValueError(
            f"{who}: model is a TransformerLens bridge ({type(model).__name__}); convert it first, model = "
            "pp.from_hf(bridge), and write loss_fn for the converted model (its forward takes "
            "return_type='per_token_loss')"
        )


def _resolved_modules(model: nn.Module, modules) -> list[tuple[str, nn.Module]]:
    """``modules`` (submodule names or modules of ``model``, one or a list) as ``(name, module)`` pairs, each
    refused by name when it is not part of the model."""
    named = dict(model.named_modules())
    if isinstance(modules, str | nn.Module):
        modules = [modules]
    try:
        modules = list(modules)
    except TypeError:
        raise TypeError(
            f"modules={modules!r} is not valid; give a list of submodule names or modules of the model, or None"
        ) from None
    out = []
    for m in modules:
        if not isinstance(m, str | nn.Module):
            raise TypeError(f"modules contains {m!r} ({type(m).__name__}); give submodule names or modules")
        if isinstance(m, str):
            if m not in named:
                raise ValueError(f"modules: {m!r} is not a submodule name of the model")
            out.append((m, named[m]))
        else:
            name = next((n for n, x in named.items() if x is m), None)
            if name is None:
                raise ValueError(f"modules: {type(m).__name__} instance is not part of the model")
            out.append((name, m))
    return out


def _supported(m: nn.Module) -> bool:
    """Whether :func:`default_sites` has a site for ``m``: an ``nn.Linear``, Hugging Face ``Conv1D``,
    ``nn.Embedding``, ``nn.LayerNorm``, or an RMS norm with a weight whose form :func:`_rms_norm_form` recognises."""
    return (
        isinstance(m, nn.Linear | nn.Embedding | nn.LayerNorm)
        or _is_conv1d(m)
        or _rms_norm_form(m) is not None
    )


def _is_conv1d(m: nn.Module) -> bool:
    """Whether ``m`` is Hugging Face's ``Conv1D`` (``transformers.pytorch_utils``; GPT-2's projections): ``y = x W +
    b`` with ``W (in, out)``, a linear map whose per-sample weight gradient is that of ``nn.Linear`` transposed, so
    its Gram is the same."""
    w = getattr(m, "weight", None)
    return (
        type(m).__name__ == "Conv1D"
        and type(m).__module__.startswith("transformers.")
        and isinstance(w, torch.Tensor)
        and w.dim() == 2
        and getattr(m, "nf", None) == w.shape[1]
    )


def _rms_norm_form(m: nn.Module) -> tuple[float, torch.dtype | None, float, bool] | None:
    """``(eps, compute_dtype, offset, weight_in_compute_dtype)`` of an RMS norm over the last dimension with a
    weight of its own, or None for any other module.

    The candidates are ``torch.nn.RMSNorm`` and the Hugging Face ``*RMSNorm`` modules of one weight ``(d,)`` and an
    ``eps`` or ``variance_epsilon`` (Llama, Mistral, Qwen2, Qwen3, OLMo 2, Granite, Phi-3, Gemma, ...). The form is
    read from what the module's own ``forward`` gives on a probe input (run without its hooks), among: ``xhat = x /
    sqrt(mean(x^2) + eps)`` in the input's dtype or in float32, then ``w * xhat`` cast back first (Llama's order)
    or ``xhat * (1 + w)`` cast back last (Gemma's order; ``offset`` 1 or 0). A module whose output is none of
    these to its dtype's rounding (a norm gated by a second input, T5's float32 variance times a float64 input)
    has no site. The probe runs on every call (the form depends on the module's dtype, which ``.double()``
    changes)."""
    if not (isinstance(m, nn.RMSNorm) or type(m).__name__.endswith("RMSNorm")):
        return None
    if isinstance(m, nn.RMSNorm) and len(m.normalized_shape) != 1:
        return None
    w = m._parameters.get("weight")
    if (
        isinstance(w, torch.Tensor)
        and [k for k, _ in m.named_parameters()] == ["weight"]
        and w.dim() == 1
        and w.is_floating_point()
        and w.numel() > 0
    ):
        return _probe_rms_form(m, w)
    return None


def _probe_rms_form(m: nn.Module, w: torch.Tensor):
    eps = getattr(m, "variance_epsilon", getattr(m, "eps", None))
    if eps is None and isinstance(m, nn.RMSNorm):
        eps = torch.finfo(w.dtype).eps  # torch's default: the input dtype's machine epsilon
    if isinstance(eps, torch.Tensor) and eps.numel() == 1:
        eps = float(eps)
    if not isinstance(eps, int | float) or isinstance(eps, bool):
        return None
    eps = float(eps)
    d = w.shape[0]
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, d, generator=g, dtype=torch.float64) * torch.tensor([[0.5], [1.0], [3.0]])).to(w)
    try:
        with torch.no_grad():
            y = type(m).forward(m, x)  # the module's own map, without the hooks a call would run
    except Exception:  # a forward of other arguments (a gated norm): not this form
        return None
    if not isinstance(y, torch.Tensor) or y.shape != x.shape or y.dtype != x.dtype:
        return None
    tol = 8 * torch.finfo(x.dtype).eps
    with torch.no_grad():
        wd = w.detach()
        for cd in (None, torch.float32):
            if cd is not None and x.dtype == cd:
                continue
            h = x if cd is None else x.to(cd)
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
            for offset in (0.0, 1.0):
                for late in (False, True):  # Llama's order, then Gemma's
                    if late and cd is None:
                        continue
                    want = (
                        (h * (offset + wd.to(h.dtype))).to(x.dtype) if late else (offset + wd) * h.to(x.dtype)
                    )
                    scale = float(want.abs().max()) if want.numel() else 0.0
                    if torch.equal(y, want) or float((y - want).abs().max()) <= tol * scale:
                        return (eps, cd, offset, late)
    return None


def _named_site_modules(model: nn.Module, modules) -> list[tuple[str, nn.Module]]:
    _check_model(model, "default_sites")
    if modules is None:
        return [(n, m) for n, m in model.named_modules() if _supported(m)]
    out = []
    for n, m in _resolved_modules(model, modules):
        if _supported(m):
            out.append((n, m))
            continue
        # a container (a block, an attention, an MLP): the supported modules inside it, which must cover its
        # trainable parameters (a Conv1D weight inside would be left out without a word)
        inside = [(_pname(n, k), x) for k, x in m.named_modules() if k and _supported(x)]
        if not inside:
            raise TypeError(
                f"modules: {n!r} is a {type(m).__name__} holding no nn.Linear, nn.Embedding, nn.LayerNorm or RMS "
                "norm; supported are those modules and modules holding them (give sites= for other layers, or "
                "convert a Hugging Face model with pypattern.from_hf)"
            )
        covered = {id(p) for _, x in inside for p in x.parameters(recurse=False)}
        left = [_pname(n, k) for k, p in m.named_parameters() if p.requires_grad and id(p) not in covered]
        if left:
            raise ValueError(
                f"modules: {n!r} (a {type(m).__name__}) holds trainable parameters outside its nn.Linear, "
                f"nn.Embedding, nn.LayerNorm and RMS norm modules ({left[:4]}{' ...' if len(left) > 4 else ''}; "
                "e.g. a Hugging Face Conv1D weight), which the Gram would leave out: name the modules inside "
                "it to cover, freeze the parameters to leave out (requires_grad_(False)), give sites=, or convert "
                "a Hugging Face model with pypattern.from_hf"
            )
        out += inside
    names = [k for k, _ in out]  # once each: a module named twice, or inside another named one
    return [(k, x) for i, (k, x) in enumerate(out) if k not in names[:i]]


def _tied_partners(model: nn.Module, named: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """The other use of a weight tied between an ``nn.Embedding`` and an ``nn.Linear`` (an unembedding tied to the
    embedding: a Hugging Face ``lm_head`` whose weight is ``embed_tokens.weight``) when only one of the two is among
    ``named``: the Gram over that weight counts both uses, as the gradient of the weight does. The partner covers
    the tied weight only (a linear map's bias stays out unless its module is named)."""
    have = {id(m) for _, m in named}
    kinds = {nn.Linear: nn.Embedding, nn.Embedding: nn.Linear}
    want = {(id(m.weight), kinds[k]) for _, m in named for k in kinds if isinstance(m, k)}
    out = []
    for n, m in model.named_modules():
        if id(m) in have or not isinstance(m, nn.Linear | nn.Embedding):
            continue
        kind = nn.Linear if isinstance(m, nn.Linear) else nn.Embedding
        if (id(m.weight), kind) in want:
            out.append((n, m))
            have.add(id(m))
    return out


def _pname(mod_name: str, attr: str) -> str:
    return f"{mod_name}.{attr}" if mod_name else attr


# Hugging Face decoders whose learned position embedding ``wpe`` is looked up once for the whole batch (positions
# ``(1, pos)``) and added to the token embeddings, and whose dropout ``drop`` then reads that sum
_SHARED_POSITIONS = ("GPT2Model", "GPTNeoModel")


def _shared_positions_sum(model: nn.Module, name: str, m: nn.Embedding) -> str | None:
    """The name of the module whose input is the per-sample sum a shared position lookup ``m`` (``name``) is added
    into (GPT-2's and GPT-Neo's ``drop``), or None for any other embedding. There the gradient of each sample's
    position vectors is read: at ``m``'s own output, broadcast over the batch, only their sum over the samples is."""
    owner, _, attr = name.rpartition(".")
    parent = model.get_submodule(owner) if owner else model
    if attr != "wpe" or type(parent).__name__ not in _SHARED_POSITIONS:
        return None
    if getattr(parent, "wpe", None) is not m or not isinstance(getattr(parent, "drop", None), nn.Dropout):
        return None
    return _pname(owner, "drop")


def default_sites(model: nn.Module, modules=None) -> list[GramSite]:
    """Sites of every ``nn.Linear`` (and Hugging Face ``Conv1D``), ``nn.Embedding``, affine ``nn.LayerNorm`` (over
    the last dimension) and RMS
    norm with a weight whose form :func:`_rms_norm_form` recognises (``nn.RMSNorm``; Hugging Face's Llama, Mistral,
    Qwen, OLMo 2, Granite, Phi-3 and Gemma ``*RMSNorm``, normalising in float32 also in a float64 model), or of
    those among ``modules`` and inside them (see :func:`per_sample_grad_gram`). A weight tied between an embedding
    and a linear map (a Hugging Face ``lm_head`` tied to ``embed_tokens``) counts both uses when ``modules`` names
    either of them: the tied weight is one parameter, and its gradient is the sum over both."""
    sites = []
    named = _named_site_modules(model, modules)
    partners = [] if modules is None else _tied_partners(model, named)
    partner_ids = {id(m) for _, m in partners}
    for n, m in named + partners:
        if _computed_weights(n, m):  # parametrized, all of its parameters frozen: nothing to cover
            continue
        if isinstance(m, nn.Linear) or _is_conv1d(m):
            bias = _pname(n, "bias") if m.bias is not None and id(m) not in partner_ids else None
            sites.append(GramSite(n, "linear", (_pname(n, "weight"), bias), (n, "output"), (n, "input")))
        elif isinstance(m, nn.Embedding):
            if m.scale_grad_by_freq or m.max_norm is not None:
                raise NotImplementedError(
                    f"{n}: nn.Embedding with scale_grad_by_freq or max_norm is not supported"
                )
            drop = _shared_positions_sum(model, n, m)
            if drop is not None:  # looked up once for the batch: read per sample where it is added
                sites.append(GramSite(n, "positional", (_pname(n, "weight"),), (drop, "input"), (n, "input")))
                continue
            sites.append(
                GramSite(
                    n,
                    "embedding",
                    (_pname(n, "weight"),),
                    (n, "output"),
                    (n, "input"),
                    padding_idx=m.padding_idx,
                    scale=_embedding_scale(n, m),
                )
            )
        elif isinstance(m, nn.LayerNorm) and m.weight is not None:
            if len(m.normalized_shape) != 1:
                raise NotImplementedError(
                    f"{n}: nn.LayerNorm over more than the last dimension is not supported"
                )
            bias = _pname(n, "bias") if m.bias is not None else None
            sites.append(
                GramSite(n, "layernorm", (_pname(n, "weight"), bias), (n, "output"), (n, "input"), eps=m.eps)
            )
        elif (form := _rms_norm_form(m)) is not None:
            eps, cd, _, late = form
            sites.append(
                GramSite(
                    n,
                    "rmsnorm",
                    (_pname(n, "weight"),),
                    (n, "output"),
                    (n, "input"),
                    eps=eps,
                    compute_dtype=cd,
                    weight_in_compute_dtype=late,
                )
            )
    return _tie_embeddings(model, sites)


def _computed_weights(name: str, m: nn.Module) -> bool:
    """Whether ``m``'s weight or bias is computed from other parameters (``torch.nn.utils.parametrize``,
    ``weight_norm``, ``spectral_norm``) rather than a parameter of its own; raises when any of those parameters is
    trainable: the site's per-sample gradient would be that of the computed tensor, not of the parameters."""
    computed = [a for a in ("weight", "bias") if getattr(m, a, None) is not None and a not in m._parameters]
    if not computed:
        return False
    trainable = [_pname(name, k) for k, p in m.named_parameters() if p.requires_grad]
    if trainable:
        raise NotImplementedError(
            f"{name or 'model'}: the {' and '.join(computed)} of this {type(m).__name__} is computed from other "
            "parameters (torch.nn.utils.parametrize, weight_norm or spectral_norm), not a parameter of its own: "
            f"its site cannot give the per-sample gradients of its trainable parameters ({trainable[:4]}"
            f"{' ...' if len(trainable) > 4 else ''}); freeze them (requires_grad_(False)), or use "
            "pypattern.gram.per_sample_grad_gram_reference"
        )
    return True


def _embedding_scale(name: str, m: nn.Embedding) -> float | None:
    """The factor a scaled word embedding multiplies its lookup by (Hugging Face's ``*ScaledWordEmbedding``:
    ``forward`` returns ``W[ids] * embed_scale``, Gemma's and BART's), as the module multiplies by it: a number of
    the weight's dtype; None for a plain ``nn.Embedding``. Its output is the site's captured output, so the lookup's
    gradient is the output gradient times this factor."""
    scale = getattr(m, "embed_scale", None)
    if scale is None or type(m).forward is nn.Embedding.forward:
        return None
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise NotImplementedError(
                f"{name}: an embedding whose embed_scale has shape {tuple(scale.shape)} is not supported (a number "
                "is); give sites= of your own"
            )
        return float(scale.detach().to(m.weight.dtype).cpu())
    if isinstance(scale, int | float) and not isinstance(scale, bool):
        return float(torch.tensor(float(scale), dtype=m.weight.dtype))
    raise NotImplementedError(
        f"{name}: an embedding whose embed_scale is a {type(scale).__name__} is not supported (a number or a "
        "one-element tensor is); give sites= of your own"
    )


def _tie_embeddings(model: nn.Module, sites: list[GramSite]) -> list[GramSite]:
    """An ``nn.Linear`` whose weight is an ``nn.Embedding``'s (an unembedding tied to the embedding) becomes the
    embedding site's second use (``GramSite.tied``, cross terms included); its bias, if any, stays a linear site of
    its own."""
    mods = dict(model.named_modules())
    owner = {
        id(mods[st.name].weight): st.name
        for st in sites
        if st.kind == "embedding" and isinstance(mods.get(st.name), nn.Embedding)
    }
    out: list[GramSite] = []
    tied: dict[str, tuple] = {}
    for st in sites:
        m = mods.get(st.name)
        emb = owner.get(id(m.weight)) if st.kind == "linear" and isinstance(m, nn.Linear) else None
        if emb is None:
            out.append(st)
            continue
        if emb in tied:
            raise NotImplementedError(
                f"{st.name}.weight is the weight of {emb} and of {tied[emb][0][0]}: an embedding tied to more than "
                "one linear map is not supported"
            )
        tied[emb] = ((st.name, "output"), (st.name, "input"))
        if st.params[1] is not None:  # the bias alone
            out.append(dataclasses.replace(st, params=(None, st.params[1])))
    return [dataclasses.replace(st, tied=tied[st.name]) if st.name in tied else st for st in out]


def transformer_lens_sites(model: nn.Module) -> list[GramSite]:
    """Every parameter of a TransformerLens-layout model (``pypattern.models.Transformer``, converted models
    included) as sites.

    Each linear map's output is read where the map hands it on: the query and key projections at ``hook_q`` /
    ``hook_k`` (at the input of ``q_norm`` / ``k_norm`` with query/key norms), values at ``hook_v``, the attention's
    output projection and the MLP's ``W_out`` as the attention and MLP modules' outputs (before sandwich norms and
    residual multipliers), ``mlp.hook_pre`` / ``hook_pre_linear``, ``hook_embed`` (``embed.ln``'s input with an
    embedding LayerNorm), ``hook_pos_embed`` and the unembedding's output; norms at their ``hook_normalized``.
    Covered: LayerNorm and RMSNorm (with or without a weight offset, pre- or post-sublayer and sandwich norms,
    per-head or all-head query/key norms, an embedding LayerNorm), plain and gated MLPs, grouped-query attention,
    parallel attention and MLP (one shared norm or two), missing biases, residual multipliers, a scaled embedding
    and an unembedding tied to the embedding (one site for both uses, cross terms included). Parts the model
    lacks (positional embedding, MLPs, norm weights) are skipped. The unembedding's ``logits_scaling`` and soft cap
    are undone on its gradient (``GramSite.logits``), and so is ``clip_qkv``'s clamp (``GramSite.clip``). Mixtures
    of experts are refused by name.
    """
    _check_model(model, "transformer_lens_sites")
    cfg = getattr(model, "cfg", None)
    experts = getattr(cfg, "n_experts", None)
    if experts is not None:
        raise NotImplementedError(
            f"transformer_lens_sites: the model's config has n_experts={experts!r}, which these sites do not cover "
            "(no hook sees an expert's own input and output); give the sites of the parts you need with GramSite, "
            "or use pypattern.gram.per_sample_grad_gram_reference for an exact Gram"
        )
    mods = dict(model.named_modules())
    params = dict(model.named_parameters())
    sites: list[GramSite] = []

    def has(*names):
        return all(n in params for n in names)

    def opt(name):
        return name if has(name) else None

    def add_norm(ln):
        m = mods.get(ln)
        if m is None or not has(f"{ln}.w"):
            return
        kind = "rmsnorm" if type(m).__name__ == "RMSNorm" else "layernorm"
        if kind == "layernorm" and type(m).__name__ != "LayerNorm":
            raise NotImplementedError(
                f"transformer_lens_sites: {ln} is a {type(m).__name__}, not a known norm"
            )
        ps = (f"{ln}.w",) if kind == "rmsnorm" else (f"{ln}.w", opt(f"{ln}.b"))
        cd = getattr(m, "compute_dtype", None)
        # Gemma's order (the weight applied before the cast back): its gradient taken in compute_dtype too
        late = kind == "rmsnorm" and cd is not None and bool(m.offset or m.weight_before_cast)
        # the norm's own output: what arrives at its hook_normalized (before a user's function there)
        out = (f"{ln}.hook_normalized", "output") if f"{ln}.hook_normalized" in mods else (ln, "output")
        sites.append(
            GramSite(
                ln, kind, ps, out, (ln, "input"), eps=m.eps, compute_dtype=cd, weight_in_compute_dtype=late
            )
        )

    def linear(name, weight, bias, out, inp, **kw):
        sites.append(GramSite(name, "linear", (opt(weight), opt(bias)), out, inp, **kw))

    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    post_ln = "embed.ln" in mods
    # the unembedding's division and soft cap after its product
    logits = (getattr(cfg, "logits_scaling", None), getattr(cfg, "output_logits_soft_cap", None))
    logits = None if logits == (None, None) else logits
    if has("embed.W_E"):
        pad = getattr(cfg, "padding_idx", None)
        scale = getattr(cfg, "embed_scale", None)
        if scale is not None:  # the factor as the model multiplies by it: a number of the weights' dtype
            scale = float(torch.tensor(scale, dtype=params["embed.W_E"].dtype))
        sites.append(
            GramSite(
                "embed",
                "embedding",
                ("embed.W_E",),
                ("embed.ln", "input") if post_ln else ("hook_embed", "output"),
                ("embed", "input"),
                padding_idx=pad,
                tied=(("unembed", "output"), ("unembed", "input")) if tied else None,
                scale=scale,
                logits=logits if tied else None,
            )
        )
    if post_ln:
        add_norm("embed.ln")
    if has("pos_embed.W_pos"):
        sites.append(
            GramSite(
                "pos_embed",
                "positional",
                ("pos_embed.W_pos",),
                ("hook_pos_embed", "output"),
                inp=("pos_embed", "input") if _reads_position_ids(mods.get("pos_embed")) else None,
            )
        )
    n_layers = len(getattr(model, "blocks", []))
    shared = bool(getattr(cfg, "parallel_shared_norm", False))
    qk_norm = getattr(cfg, "qk_norm", None)
    clip = getattr(cfg, "clip_qkv", None)  # projections clamped before their hooks (and query/key norms)
    for layer in range(n_layers):
        p = f"blocks.{layer}"
        add_norm(f"{p}.ln1")
        for x in "QKV":
            out, out_dims = (f"{p}.attn.hook_{x.lower()}", "output"), 2
            if qk_norm and x in "QK":  # the projection as it enters its norm (all heads flattened with "all")
                out, out_dims = (f"{p}.attn.{x.lower()}_norm", "input"), (1 if qk_norm == "all" else 2)
            linear(f"{p}.attn.W_{x}", f"{p}.attn.W_{x}", f"{p}.attn.b_{x}", out, (f"{p}.ln1", "output"),
                   out_dims=out_dims, clip=clip)  # fmt: skip
        if qk_norm:
            add_norm(f"{p}.attn.q_norm")
            add_norm(f"{p}.attn.k_norm")
        linear(
            f"{p}.attn.W_O",
            f"{p}.attn.W_O",
            f"{p}.attn.b_O",
            (f"{p}.attn", "output"),
            (f"{p}.attn.hook_z", "output"),
            in_dims=2,
        )
        add_norm(f"{p}.ln1_post")
        if has(f"{p}.mlp.W_in"):
            if not shared:
                add_norm(f"{p}.ln2")
            mlp_in = (f"{p}.ln1" if shared else f"{p}.ln2", "output")
            if has(f"{p}.mlp.W_gate"):
                linear(
                    f"{p}.mlp.W_gate",
                    f"{p}.mlp.W_gate",
                    f"{p}.mlp.b_gate",
                    (f"{p}.mlp.hook_pre", "output"),
                    mlp_in,
                )
                pre_in = (f"{p}.mlp.hook_pre_linear", "output")
            else:
                pre_in = (f"{p}.mlp.hook_pre", "output")
            linear(f"{p}.mlp.W_in", f"{p}.mlp.W_in", f"{p}.mlp.b_in", pre_in, mlp_in)
            linear(
                f"{p}.mlp.W_out",
                f"{p}.mlp.W_out",
                f"{p}.mlp.b_out",
                (f"{p}.mlp", "output"),
                (f"{p}.mlp.hook_post", "output"),
            )
            add_norm(f"{p}.ln2_post")
    add_norm("ln_final")
    # tied: the weight is the embedding's site; the bias alone here. The unembedding's input is its own (what it
    # multiplied): ln_final may run where the unembedding does not (a forward with return_type=None)
    if has("unembed.W_U") or has("unembed.b_U"):
        linear(
            "unembed",
            "unembed.W_U",
            "unembed.b_U",
            ("unembed", "output"),
            ("unembed", "input"),
            logits=logits,
        )
    return sites


def _check_sites(model: nn.Module, sites: Sequence[GramSite]) -> dict[str, torch.nn.Parameter]:
    """The trainable parameters the sites cover (by name); raises on unknown names or shared parameters."""
    params = dict(model.named_parameters(remove_duplicate=False))
    mods = dict(model.named_modules())
    seen: dict[int, str] = {}
    out = {}
    for st in sites:
        if st.kind not in ("linear", "embedding", "positional", "layernorm", "rmsnorm"):
            raise ValueError(
                f"site {st.name!r}: kind {st.kind!r} is not one of linear, embedding, positional, layernorm, "
                "rmsnorm"
            )
        if st.tied is not None and st.kind != "embedding":
            raise ValueError(f"site {st.name!r}: tied= is for embedding sites, not {st.kind!r}")
        for cap in (st.out, st.inp, *(st.tied or ())):
            if cap is not None and (cap[0] not in mods or cap[1] not in ("input", "output")):
                raise ValueError(
                    f"site {st.name!r}: capture {cap!r} needs a submodule name and 'input' or 'output'"
                )
        for pn in st.params:
            if pn is None:
                continue
            if pn not in params:
                raise ValueError(f"site {st.name!r}: {pn!r} is not a parameter name of the model")
            p = params[pn]
            if not p.requires_grad:
                continue
            if id(p) in seen and seen[id(p)] != pn:
                raise NotImplementedError(
                    f"{pn} is the same tensor as {seen[id(p)]} (tied weights): their cross terms are not supported"
                )
            if id(p) in seen:
                raise ValueError(f"parameter {pn} appears in two sites")
            seen[id(p)] = pn
            out[pn] = p
    return out


def _sites_of(model: nn.Module, modules, sites) -> Sequence[GramSite]:
    """The sites asked for: ``sites``; else pypattern's Transformer (converted models included) whole by
    :func:`transformer_lens_sites` when no ``modules`` are named; else :func:`default_sites`."""
    _check_model(model, "per_sample_grad_gram")
    if sites is not None:
        if isinstance(sites, GramSite):
            sites = [sites]
        try:
            sites = list(sites)
        except TypeError:
            raise TypeError(f"sites={sites!r} is not valid; give a list of GramSite, or None") from None
        bad = [s for s in sites if not isinstance(s, GramSite)]
        if bad:
            raise TypeError(f"sites contains {bad[0]!r} ({type(bad[0]).__name__}); give GramSite objects")
        if not sites:
            raise ValueError(
                "sites=[] holds no GramSite, so the Gram would cover no parameter: give at least one site, or "
                "sites=None for the default ones"
            )
        return sites
    from .models.transformer import Transformer

    if modules is not None and not isinstance(modules, str | nn.Module):
        given = modules
        try:
            modules = list(modules)
        except TypeError:
            raise TypeError(
                f"modules={modules!r} is not valid; give a list of submodule names or modules of the model, or None"
            ) from None
        if not modules:
            raise ValueError(
                f"modules={given!r} names no module, so the Gram would cover no parameter: give the submodules whose "
                "parameters to cover (names or modules), or modules=None for the default sites"
            )
    if isinstance(model, Transformer):
        if modules is None:
            return transformer_lens_sites(model)
        return _transformer_sites_in(model, modules)
    return default_sites(model, modules)


def _transformer_sites_in(model: nn.Module, modules) -> list[GramSite]:
    """The default sites of pypattern's Transformer restricted to ``modules``: the :func:`transformer_lens_sites`
    whose parameters all lie in one of them (``"blocks.0.attn"``, ``"blocks.1"``, ``"embed"``, ...), and the
    :func:`default_sites` of an ``nn.Linear``, ``nn.Embedding``, ``nn.LayerNorm`` or RMS norm added to the model. A
    module
    whose trainable parameters these sites do not all cover is refused by name."""
    resolved = _resolved_modules(model, modules)
    own = [(n, m) for n, m in resolved if _supported(m)]
    out = default_sites(model, [m for _, m in own]) if own else []
    whole = transformer_lens_sites(model) if len(own) < len(resolved) else []
    for n, m in resolved:
        if _supported(m):
            continue
        if not any(True for _ in m.parameters()):
            raise ValueError(
                f"modules: {n!r} (a {type(m).__name__}) holds no parameter; name modules with weights (a block, its "
                "attention or MLP, a norm, 'embed', 'unembed')"
            )
        prefix = f"{n}." if n else ""
        inside = [st for st in whole if all(pn.startswith(prefix) for pn in st.params if pn is not None)]
        covered = {pn for st in inside for pn in st.params if pn is not None}
        left = [
            _pname(n, k) for k, p in m.named_parameters() if p.requires_grad and _pname(n, k) not in covered
        ]
        if left:
            raise ValueError(
                f"modules: {n!r} holds trainable parameters the Transformer's sites (transformer_lens_sites) do not "
                f"cover within it ({left[:4]}{' ...' if len(left) > 4 else ''}): name a module the sites cover whole "
                "(a block, its attention or MLP, a norm, 'embed', 'unembed'), or give sites= of your own"
            )
        out += [st for st in inside if all(st is not o for o in out)]
    names = [st.name for st in out]  # once each: a module named twice, or inside another named one
    return [st for k, st in enumerate(out) if st.name not in names[:k]]


def gram_parameters(model: nn.Module, modules=None, sites: Sequence[GramSite] | None = None):
    """The parameters (by full name) whose gradients :func:`per_sample_grad_gram` covers."""
    return _check_sites(model, _sites_of(model, modules, sites))


def _site_gram(st, params, cap, batch, method, backend):
    """Gram of one site from the captured tensors (lists over calls), or None when nothing flowed."""
    outs = cap[("out", st.out)]
    grads = [g for _, g in outs]
    live = [k for k, g in enumerate(grads) if g is not None]
    if not live and st.tied is None:
        return None
    w_name, b_name = st.params[0], (st.params[1] if len(st.params) > 1 else None)
    w_on = params.get(w_name) is not None
    b_on = b_name is not None and params.get(b_name) is not None
    if st.kind == "positional":
        ds = [_as_btd("grad", grads[k]) for k in live]
        ins = cap.get(("in", st.inp), []) if st.inp is not None else []
        if any(k < len(ins) and torch.is_tensor(ins[k][0]) for k in live):
            # a call given position_ids (batch, pos) reads W[position_ids]: an embedding lookup of those ids (the
            # calls without them read the columns 0 .. pos - 1)
            ids = torch.cat(
                [
                    ins[k][0].expand(batch, *ins[k][0].shape[1:]).reshape(batch, -1)
                    if k < len(ins) and torch.is_tensor(ins[k][0])
                    else torch.arange(ds[j].shape[1], device=ds[j].device).expand(batch, -1)
                    for j, k in enumerate(live)
                ],
                1,
            )
            return grad_gram_embedding(ids, torch.cat(ds, 1), method=method, backend=backend)
        # the per-sample gradient of W[:T] is the output gradient itself (each call's at its own first positions)
        T = max(x.shape[1] for x in ds)
        d = sum(torch.nn.functional.pad(x, (0, 0, 0, T - x.shape[1])) for x in ds)
        return grad_gram_dense(d.reshape(batch, -1))
    ins = cap[("in", st.inp)]
    if len(ins) != len(outs):
        raise ValueError(f"site {st.name!r}: {len(ins)} calls of {st.inp[0]} but {len(outs)} of {st.out[0]}")
    if st.kind == "embedding":
        if not live:  # the lookup gave nothing a gradient (its output replaced): the tied use alone
            return _tied_terms(st, cap, batch, None, None, method, backend)
        ids = torch.cat([ins[k][0].reshape(batch, -1) for k in live], 1)
        d = torch.cat([_as_btd("grad", grads[k]) for k in live], 1)
        if st.scale is not None:  # y = W[ids] * scale: the lookup's gradient is the scaled output gradient
            d = d * st.scale
        g = grad_gram_embedding(ids, d, padding_idx=st.padding_idx, method=method, backend=backend)
        if st.tied is not None:
            g = g + _tied_terms(st, cap, batch, ids, d, method, backend)
        return g
    if st.kind in ("layernorm", "rmsnorm"):
        parts = []
        xs = [ins[k][0] for k in live]
        ds = [grads[k] for k in live]
        if w_on and st.weight_in_compute_dtype and st.compute_dtype is not None:
            # Gemma's order: the norm's backward forms (x_hat * dy) and its sum over positions in compute_dtype
            cd = st.compute_dtype
            parts.append(
                sum(
                    (_normalized(st, x, cast=False) * d.to(cd))
                    .reshape(batch, -1, d.shape[-1])
                    .sum(1)
                    .to(torch.float64)
                    for x, d in zip(xs, ds)
                )
            )
        elif w_on:
            parts.append(
                sum(
                    (_normalized(st, x) * d).reshape(batch, -1, d.shape[-1]).sum(1, dtype=torch.float64)
                    for x, d in zip(xs, ds)
                )
            )
        if b_on:
            parts.append(sum(d.reshape(batch, -1, d.shape[-1]).sum(1, dtype=torch.float64) for d in ds))
        if not parts:
            return None
        g = torch.cat(parts, 1)
        return g @ g.T
    a = torch.cat(
        [_as_btd("input", ins[k][0].flatten(-st.in_dims) if st.in_dims > 1 else ins[k][0]) for k in live], 1
    )
    d = torch.cat(
        [
            _as_btd("grad", g.flatten(-st.out_dims) if st.out_dims > 1 else g)
            for g in (_map_grad(st, outs[k][0], grads[k]) for k in live)
        ],
        1,
    )
    if not (w_on or b_on):
        return None
    return grad_gram_linear(a, d, bias=b_on, weight=w_on, method=method, backend=backend)


#: centring a site's Gram ``G`` leaves ``max_i (HGH)_ii`` of its ``max_i G_ii``; above this ratio a site whose
#: captured tensors are below float64 is computed again from float64 copies of them: its float32 products' rounding,
#: about ``3 eps max_i G_ii``, would otherwise be the ratio times larger relative to the centred Gram (2e-5 at 64)
CENTRED_RECOMPUTE_RATIO = 64.0


def _site_keys(st: GramSite) -> list[tuple[str, tuple[str, str]]]:
    """The captures a site's Gram reads, as keys of the captured records."""
    keys = [("out", st.out)] + ([("in", st.inp)] if st.inp is not None else [])
    if st.tied is not None:
        keys += [("out", st.tied[0]), ("in", st.tied[1])]
    return keys


def _f64(t):
    return t.to(torch.float64) if torch.is_tensor(t) and t.is_floating_point() else t


def _centred_site_gram(st, g, params, cap, batch, method, backend) -> torch.Tensor:
    """``H G H`` of one site: from ``g`` itself, or, when centring cancels more than
    :data:`CENTRED_RECOMPUTE_RATIO` of it and some captured tensor is below float64, from the site's Gram computed
    again on float64 copies of its captures (see ``centered`` in :func:`per_sample_grad_gram`)."""
    gc = center_gram(g)
    keys = [k for k in _site_keys(st) if k in cap]
    narrow = any(
        torch.is_tensor(t) and t.is_floating_point() and t.dtype != torch.float64
        for k in keys
        for rec in cap[k]
        for t in rec
    )
    if not narrow or batch == 0:
        return gc
    top, low = float(g.diagonal().max()), float(gc.diagonal().max())
    if not top > CENTRED_RECOMPUTE_RATIO * max(low, 0.0):
        return gc
    wide = dict(cap)
    for k in keys:
        wide[k] = [tuple(_f64(t) for t in rec) for rec in cap[k]]
    g64 = _site_gram(st, params, wide, batch, method, backend)
    return gc if g64 is None else center_gram(g64)


def _map_grad(st: GramSite, y: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """The gradient at the map's own output ``z`` from the captured output ``y`` and its gradient ``dy`` (see
    ``GramSite.logits``); ``dy`` itself without ``logits``."""
    if st.clip is not None:
        return dy * (y.abs() < st.clip).to(dy.dtype)
    if st.logits is None:
        return dy
    scaling, cap = st.logits
    if cap is not None:
        dy = dy * (1 - (y.to(dy.dtype) / cap) ** 2)
    return dy if scaling is None else dy / scaling


def _normalized(st: GramSite, x: torch.Tensor, cast: bool = True) -> torch.Tensor:
    """``xhat`` of a norm site: ``layer_norm(x)`` or ``x / sqrt(mean(x^2) + eps)`` over the last dimension, cast
    back to ``x``'s dtype (``cast``) or left in the site's ``compute_dtype``."""
    h = x if st.compute_dtype is None else x.to(st.compute_dtype)
    if st.kind == "rmsnorm":
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + st.eps)
    else:
        h = F.layer_norm(h, h.shape[-1:], eps=st.eps)
    return h.to(x.dtype) if cast else h


#: workspace of the tied-weight cross terms (bytes; :func:`_tied_terms` takes slices of the batch under it)
TIED_WORKSPACE_BYTES = 64 * 2**20


def _tied_terms(st, cap, batch, ids, dE, method, backend) -> torch.Tensor:
    """What a weight tied to an embedding adds to the embedding's Gram: the Gram of its second use ``y = x W^T``
    and the cross terms ``<g_E_i, g_U_j> + <g_U_i, g_E_j>`` of the two uses' per-sample gradients.

    ``g_E_i[v] = sum_{t: ids_it = v} dE_it`` (no padding rows) and ``g_U_j[v] = sum_s dU_js[v] x_js``, so
    ``<g_E_i, g_U_j> = sum_{t, s} dU_js[ids_it] (dE_it . x_js)``: products of ``(B T, d) x (d, B S)``, in float64,
    over slices of the samples ``j`` and of the rows ``(i, t)`` of at most :data:`TIED_WORKSPACE_BYTES` (one
    sample's ``S`` positions for one row at least: long sequences are sliced by rows too). ``ids (B, T)``, ``dE
    (B, T, d)``."""
    out_cap, in_cap = st.tied
    outs, ins = cap[("out", out_cap)], cap[("in", in_cap)]
    if len(ins) != len(outs):
        raise ValueError(f"site {st.name!r}: {len(ins)} calls of {in_cap[0]} but {len(outs)} of {out_cap[0]}")
    live = [k for k, (_, g) in enumerate(outs) if g is not None]
    if not live:
        return None if dE is None else torch.zeros(batch, batch, dtype=torch.float64, device=dE.device)
    x = torch.cat([_as_btd("input", ins[k][0]) for k in live], 1)  # (B, S, d)
    dU = torch.cat([_as_btd("grad", _map_grad(st, outs[k][0], outs[k][1])) for k in live], 1)  # (B, S, V)
    g = grad_gram_linear(x, dU, bias=False, weight=True, method=method, backend=backend)
    if dE is None:  # no gradient through the lookup: no cross terms
        return g
    B, T, d = dE.shape
    S = x.shape[1]
    e = dE.to(torch.float64)
    if st.padding_idx is not None:  # the lookup gives the padding row no gradient
        e = e * (ids != st.padding_idx).unsqueeze(-1)
    e = e.reshape(B * T, d)
    flat_ids = ids.reshape(-1).to(dU.device)
    sample_of_row = torch.arange(B, device=dE.device).repeat_interleave(T)
    cross = torch.zeros(batch, batch, dtype=torch.float64, device=dE.device)
    # P and Q below take 2 * 8 * rows * J * S bytes: slices of J samples (all rows) or of rows (one sample)
    step = max(1, min(B, TIED_WORKSPACE_BYTES // max(1, 2 * 8 * B * T * S)))
    for j0 in range(0, B, step):
        j1 = min(B, j0 + step)
        xs = x[j0:j1].to(torch.float64).reshape(-1, d)  # (J S, d)
        rows = max(1, TIED_WORKSPACE_BYTES // max(1, 2 * 8 * (j1 - j0) * S))
        for r0 in range(0, B * T, rows):
            r1 = min(B * T, r0 + rows)
            P = e[r0:r1] @ xs.T  # (R, J S): dE_it . x_js
            Q = dU[j0:j1].index_select(-1, flat_ids[r0:r1]).to(torch.float64)  # (J, S, R): dU_js[ids_it]
            Q = Q.permute(2, 0, 1).reshape(r1 - r0, -1)
            part = (P * Q).view(r1 - r0, j1 - j0, S).sum(-1)  # (R, J)
            cross[:, j0:j1].index_add_(0, sample_of_row[r0:r1], part)
    return g + cross + cross.T


def _no_site(model: nn.Module) -> ValueError:
    """The error for site lists that cover no trainable parameter (the Gram would be all zeros)."""
    from .models.transformer import Transformer

    if isinstance(model, Transformer):
        default = "the default sites cover the whole model (transformer_lens_sites)"
        hint = "unfreeze the parameters to cover (requires_grad_(True))"
    else:
        default = (
            "the default sites are the model's nn.Linear, nn.Embedding, nn.LayerNorm and RMS norm modules"
        )
        hint = "give sites= or modules= for the trainable parameters"
    return ValueError(
        f"no site covers a parameter that requires grad ({default}), so the Gram would be all zeros: {hint}"
    )


#: per model, the calls whose capture passed the check (``check="once"``): :func:`_verification_key`
_VERIFIED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _input_signature(x) -> object:
    """The shapes, dtypes and devices of the tensors in an input, in its structure (a mapping's keys, a tuple's or
    list's order), and the type of anything else: hashable."""
    if torch.is_tensor(x):
        return (tuple(x.shape), x.dtype, x.device)
    if isinstance(x, Mapping):
        return (type(x).__name__, tuple((k, _input_signature(v)) for k, v in x.items()))
    if isinstance(x, tuple | list):
        return (type(x).__name__, tuple(_input_signature(v) for v in x))
    return type(x).__name__


def _verification_key(sites, params, loss_fn, inputs, model) -> tuple:
    """What a passed check of :func:`per_sample_grad_gram` depends on besides the values: the sites and their
    parameters, ``loss_fn``'s code, the shapes, dtypes and devices of the inputs' tensors (also inside a mapping
    such as a Hugging Face batch, or a tuple; a model may compute otherwise on a GPU: a fused kernel that runs no
    module hook), the training mode of every module (a batch norm switched to training mode alone mixes the
    samples) and the modules' hooks."""
    fn = getattr(loss_fn, "__func__", loss_fn)
    code = getattr(fn, "__code__", None)
    shapes = tuple(_input_signature(x) for x in inputs)
    hooks = tuple(
        (name, tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for name, m in model.named_modules()
    )
    return (
        tuple((st.name, tuple(st.params)) for st in sites),
        tuple(sorted(params)),
        code if code is not None else id(loss_fn),
        shapes,
        tuple(m.training for m in model.modules()),
        hooks,
    )


def _check_tolerance(dtypes) -> tuple[float, float]:
    """``(rtol, eps)`` of :func:`_check_capture` for the least precise of ``dtypes``."""
    eps = max(torch.finfo(t).eps for t in dtypes if t.is_floating_point)
    return (1e-9 if eps <= 1e-15 else 1e-4 if eps <= 2e-7 else 5e-2), eps


def _site_magnitude(st: GramSite, cap, batch: int) -> torch.Tensor:
    """``(B,)`` float64: per sample, the sum over a site's calls and positions of the norms of each position's
    contribution to its gradient (``||x_t|| ||dz_t||`` for a weight, ``||dz_t||`` for a bias or a lookup, at most
    ``sqrt(d) ||dy_t||`` for a norm's weight). Rounding in summing the contributions is at most ``eps`` times
    this, also where they cancel."""
    mag = torch.zeros(batch, dtype=torch.float64)

    def norms(t, dims=1):  # (B, ..., features) -> (B, positions) norms over the last ``dims`` dimensions
        t = t.flatten(-dims) if dims > 1 else t
        return t.detach().to(torch.float64).reshape(batch, -1, t.shape[-1]).norm(dim=-1).cpu()

    outs = cap[("out", st.out)]
    ins = cap[("in", st.inp)] if st.inp is not None else []
    for k, (y, g) in enumerate(outs):
        if g is None:
            continue
        if st.kind == "linear":
            dz = norms(_map_grad(st, y, g), st.out_dims)
            x = norms(ins[k][0], st.in_dims) if k < len(ins) and torch.is_tensor(ins[k][0]) else 0.0
            mag += (dz * (x + 1)).sum(1)
        elif st.kind in ("layernorm", "rmsnorm"):
            mag += norms(g).sum(1) * (math.sqrt(g.shape[-1]) + 1)
        else:
            mag += norms(g).sum(1) * abs(st.scale if st.scale is not None else 1.0)
    if st.tied is not None:
        for (y, g), (x, _) in zip(cap[("out", st.tied[0])], cap[("in", st.tied[1])]):
            if g is not None:
                mag += (norms(_map_grad(st, y, g)) * norms(x)).sum(1)
    return mag


def _differ(u2: float, v2: float, scale: float, m: float, rtol: float, eps: float) -> bool:
    """Do two squared norms ``u2``, ``v2`` that should agree differ beyond :func:`_check_capture`'s tolerance?
    Non-finite values (an overflow, a NaN input) are not compared."""
    r = 64 * eps * m
    tol = rtol * scale + r * (math.sqrt(abs(u2)) + math.sqrt(abs(v2))) + r * r
    return math.isfinite(u2) and math.isfinite(v2) and math.isfinite(tol) and abs(u2 - v2) > tol


def _check_sample(losses: torch.Tensor) -> int:
    """The sample of :func:`_check_capture`'s single-sample comparison: the largest finite ``|l_i|`` (a sample
    with a nonzero loss; a masked-out one has no gradient to compare)."""
    v = losses.detach().reshape(losses.shape[0], -1).sum(1, dtype=torch.float64).abs()
    return int(torch.argmax(torch.where(torch.isfinite(v), v, torch.full_like(v, -1.0))))


def _check_capture(model, sites, params, result, total_grads, i, single_grads, losses, cap) -> None:
    """Raise when the captured per-sample gradients do not account for the covered parameters' gradients.

    Per site ``s`` with Gram ``G_s`` (uncentred) and parameters ``p_s``:

    * the sum over samples: ``1^T G_s 1 = ||sum_i g_si||^2`` against ``||grad_{p_s} sum_i l_i||^2``
      (``total_grads``; a use of the parameters outside the site's recorded calls, a term of ``loss_fn`` on the
      parameters themselves);
    * one sample ``i`` (:func:`_check_sample`): ``G_s[i, i]`` against ``||grad_{p_s} l_i||^2`` (``single_grads``,
      from one more backward pass; also catches rows grouped by a wrong batch axis, which keep the sum).

    Tolerance, for ``|u^2 - v^2|`` of two norms that should agree: ``rtol * scale + r (u + v) + r^2``. ``rtol``
    is 1e-9 for float64 and 1e-4 for float32 (:func:`_check_tolerance`, of the site's parameters, captured
    tensors, norm compute dtype and losses); ``scale`` is ``(sum_i ||g_si||)^2`` for the sum (per-sample
    gradients that cancel across samples leave a small sum with the rounding of the large terms) and the larger
    side for the diagonal. ``r = 64 eps M`` bounds the rounding of a gradient whose terms cancel within the
    samples too (a key bias ahead of a softmax: its gradient is rounding only), ``M`` the sum of the norms of its
    terms (:func:`_site_magnitude`).
    """

    def sq(g):
        return 0.0 if g is None else float((g.detach().to(torch.float64) ** 2).sum())

    bad = []
    for st in sites:
        ps = [pn for pn in dict.fromkeys(st.params) if pn is not None and pn in params]
        gs = result[st.name]
        dtypes = {params[pn].dtype for pn in ps} | {losses.dtype}
        if st.compute_dtype is not None:
            dtypes.add(st.compute_dtype)
        for c in (st.out, st.inp, *(st.tied or ())):
            for role in ("out", "in"):
                for t, g in cap.get((role, c), ()):
                    dtypes |= {x.dtype for x in (t, g) if torch.is_tensor(x)}
        rtol, eps = _check_tolerance(dtypes)
        total = sum(sq(total_grads[pn]) for pn in ps)
        summed = float(gs.sum())
        spread = float(gs.diagonal().clamp(min=0).sqrt().sum()) ** 2
        one = sum(sq(single_grads[pn]) for pn in ps)
        gii = float(gs[i, i])
        mag = torch.zeros(len(gs), dtype=torch.float64)
        if _differ(summed, total, max(spread, total), 0.0, rtol, eps) or _differ(
            gii, one, max(abs(gii), one), 0.0, rtol, eps
        ):  # the rounding bound of terms that cancel, only where it matters
            mag = _site_magnitude(st, cap, len(gs))
        wrong = []
        if _differ(summed, total, max(spread, total), float(mag.sum()), rtol, eps):
            wrong.append(f"sum over samples 1^T G 1 = {summed:.6g}, ||grad of sum_i l_i||^2 = {total:.6g}")
        if _differ(gii, one, max(abs(gii), one), float(mag[i]), rtol, eps):
            wrong.append(f"sample {i}: G[{i},{i}] = {gii:.6g}, ||grad of l_{i}||^2 = {one:.6g}")
        if wrong:
            calls = len(cap[("out", st.out)])
            bad.append((st, ps, calls, wrong))
    if not bad:
        return
    aliases: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(n)
    lines = []
    for st, ps, calls, wrong in bad:
        also = [a for pn in ps for a in aliases.get(id(params[pn]), []) if a not in ps]
        line = f"site {st.name!r} (parameters {ps}): {'; '.join(wrong)}"
        if calls == 0:
            line += f"; its output capture {st.out!r} recorded no call in the forward"
        if also:
            line += f"; the same tensor is also {also}"
        lines.append(line)
    mixing = [
        n or type(m).__name__
        for n, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats)
    ]
    if mixing:  # samples mixed by a batch norm: named, as no site's description can mend it
        lines.append(
            f"the model mixes the samples: {mixing[:4]}{' ...' if len(mixing) > 4 else ''} normalise with the "
            "batch's statistics (a batch norm in training mode, or without running statistics), so each loss "
            "depends on every sample; run it in eval() mode (running statistics)"
        )
    raise ValueError(
        "sites / modules: the per-sample gradients captured at the sites do not account for the gradient of their "
        "parameters (expected the captured per-sample gradients to sum to the parameters' gradient of sum_i l_i "
        "and each to be that of its own l_i):\n  "
        + "\n  ".join(lines)
        + "\nLikely causes: a covered parameter also used outside its site's recorded calls (a weight tied to or "
        "reused by a module that is not a site, e.g. a Hugging Face lm_head tied to the embedding; a functional "
        "use such as F.linear(x, m.weight) or x @ m.weight.T; the module called as m.forward(x), which runs no "
        "hooks); a term of loss_fn on the parameters themselves (e.g. an L2 penalty: add it outside the per-sample "
        "losses); a captured tensor whose first dimension is not the batch (a batch-independent tensor, e.g. a "
        "grid broadcast over the batch, whose leading size equals the batch size); a GramSite that does not "
        "describe its map. Cover the other uses with sites (GramSite(tied=...) for an unembedding tied to the "
        "embedding), call the modules themselves, or use pypattern.gram.per_sample_grad_gram_reference"
    )


@contextlib.contextmanager
def _checkpointing_off(model: nn.Module):
    """``model`` without activation checkpointing for the block (Hugging Face's
    ``model.gradient_checkpointing_enable()``: each module's ``gradient_checkpointing`` flag, and the forward hook
    ``make_inputs_require_grads`` it puts on the input embedding), every flag and hook put back afterwards.

    Checkpointing changes how the backward pass gets the activations (recomputed, not stored), not what the model
    computes: the Gram is the same without it. Left on, ``torch.func`` cannot run the model (the hook's
    ``requires_grad_()`` and a reentrant checkpoint are refused under ``vmap(grad)``), and a reentrant checkpoint
    refuses ``torch.autograd.grad`` with respect to the activations the sites read."""
    flags = [m for m in model.modules() if getattr(m, "gradient_checkpointing", None) is True]
    hooked = []  # (a module's forward hooks, all of them in order) where Hugging Face's hook is one
    for m in model.modules():
        d = m._forward_hooks
        if any(getattr(h, "__name__", None) == "make_inputs_require_grads" for h in d.values()):
            hooked.append((d, list(d.items())))
    try:
        for m in flags:
            m.gradient_checkpointing = False
        for d, items in hooked:
            for k, h in items:
                if getattr(h, "__name__", None) == "make_inputs_require_grads":
                    del d[k]
        yield
    finally:
        for m in flags:
            m.gradient_checkpointing = True
        for d, items in hooked:  # the same dict, in its order (the handles hold a reference to it)
            d.clear()
            d.update(items)


def _by_sample(rec: list, batch: int) -> tuple:
    """``(tensor, its gradient)`` of a record whose leading size is ``k B`` (a module run on the batch's rows
    flattened with the positions, ``(B T, ...)``, as OPT's MLP is) as ``(B, k, ...)``: sample-major rows, as
    ``reshape(-1, d)`` of a ``(B, T, d)`` tensor lays them out (the check of :func:`per_sample_grad_gram` refuses
    rows laid out otherwise)."""

    def split(t):
        return None if t is None else t.reshape(batch, t.shape[0] // batch, *t.shape[1:])

    return split(rec[0].detach()), split(rec[1])


def _own_lookup_ids(mod: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The ids a learned positional embedding that computes them itself looks up (an ``nn.Embedding`` subclass
    with an integer ``offset`` whose ``forward(attention_mask, cache_length, position_ids)`` looks up
    ``position_ids + offset``, the positions from the mask's cumulative sum when not given: Hugging Face's OPT and
    BioGPT); None for every other module (its first input is its ids)."""
    if (
        not isinstance(mod, nn.Embedding)
        or type(mod).forward is nn.Embedding.forward
        or not isinstance(getattr(mod, "offset", None), int)
    ):
        return None
    import inspect

    sig = inspect.signature(mod.forward)
    names = list(sig.parameters)
    if len(names) != 3 or names[2] != "position_ids":
        return None
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    pos = bound.arguments["position_ids"]
    if pos is None:
        mask, cache = bound.arguments[names[0]], bound.arguments[names[1]]
        if not torch.is_tensor(mask):
            return None
        pos = (torch.cumsum(mask, dim=1) * mask - 1).long()[:, int(cache or 0) :]
    return pos.detach() + mod.offset


def _reads_position_ids(mod: nn.Module | None) -> bool:
    """Whether ``mod`` is a learned positional embedding of pypattern's layout (a ``W_pos`` weight) whose
    ``forward`` takes ``position_ids`` (pypattern's ``PosEmbed``)."""
    if mod is None or not isinstance(getattr(mod, "W_pos", None), torch.Tensor):
        return False
    from .losses import _forward_params  # the forward's parameter names, read once per class

    return "position_ids" in _forward_params(mod)


def _given_position_ids(mod: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The ``position_ids`` a call of a positional embedding whose ``forward`` takes them was given (its lookup
    ids, ``(batch, pos)``), detached; None when the call reads the columns ``0 .. pos - 1``."""
    import inspect

    try:
        bound = inspect.signature(mod.forward).bind(*args, **kwargs)
    except TypeError:
        return None
    pos = bound.arguments.get("position_ids")
    return pos.detach() if torch.is_tensor(pos) else None


def _check_per_sample_losses(losses) -> None:
    """Refuse what ``loss_fn`` returned unless it is per-sample losses: a tensor with a batch dimension."""
    if not isinstance(losses, torch.Tensor) or losses.dim() == 0:
        raise ValueError(
            "loss_fn must return per-sample losses of shape (B,) or (B, ...) (reduction='none'), got a "
            f"{'scalar' if isinstance(losses, torch.Tensor) else type(losses).__name__}; a batch-mean loss would "
            "scale every per-sample gradient by 1/B"
        )


def _is_bridge(model) -> bool:
    """Whether ``model`` is a TransformerLens bridge (TransformerLens 4.x's ``TransformerBridge``): a module of
    the ``transformer_lens`` package other than a ``HookedTransformer``, whose parameters carry the wrapped Hugging
    Face modules' names rather than TransformerLens' component names."""
    from .models.convert import is_hooked_transformer, is_transformer_lens

    return isinstance(model, nn.Module) and is_transformer_lens(model) and not is_hooked_transformer(model)


def _eval_mode_throughout(fn: Callable | None = None, *, context: Callable | None = None) -> Callable:
    """Decorator: ``fn(model, ...)`` with ``model`` in eval mode for the whole call when its ``train()`` forward is
    random (dropout; warned, every module's mode restored afterwards), as the estimators read it: a Gram of the
    gradients of one random forward, or draws of one, would change from call to call.

    ``context(model)`` gives the context manager that does it; default
    :func:`pypattern._training.eval_mode_if_random`, whose warning says that ``fn`` runs the model so. Used bare
    (``@_eval_mode_throughout``) or with ``context`` (``@_eval_mode_throughout(context=...)``)."""
    import functools

    def wrap(fn: Callable) -> Callable:
        if context is None:
            from ._training import eval_mode_if_random

            def enter(model):
                return eval_mode_if_random(model, f"{fn.__name__} runs it")
        else:
            enter = context

        @functools.wraps(fn)
        def in_eval_mode(*args, **kwargs):
            model = args[0] if args else kwargs.get("model")
            with enter(model):
                return fn(*args, **kwargs)

        return in_eval_mode

    return wrap if fn is None else wrap(fn)


def _rule_sample_losses(model: nn.Module, batch) -> torch.Tensor:
    """``per_sample_grad_gram``'s default ``loss_fn``: each sample's mean loss over its counted tokens by the
    library's one rule (:func:`pypattern.losses.sample_losses`); a sample with no counted token (all padding or
    ``-100``), whose mean is not defined, is refused by its row."""
    from .losses import token_losses

    terms, mask = token_losses(model, batch, fill=0.0)
    if terms.dim() == 1:
        return terms
    counts = mask.sum(-1)
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if empty:
        raise ValueError(
            f"loss_fn=None: samples {empty[:8]} of the batch have no counted token (all padding or -100 labels), "
            "so their mean loss is not defined; leave them out of the batch or give a loss_fn of your own"
        )
    return terms.sum(-1) / counts


@_eval_mode_throughout
@torch.enable_grad()  # gradients are what it computes: also called under torch.no_grad()
def per_sample_grad_gram(
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    *inputs,
    modules: Sequence[str | nn.Module] | None = None,
    sites: Sequence[GramSite] | None = None,
    centered: bool = False,
    per_module: bool = False,
    method: str = "auto",
    backend: str | None = None,
    check: bool | str = "once",
) -> torch.Tensor | dict[str, torch.Tensor]:
    """``G_ij = <grad l_i, grad l_j>`` over the parameters of every site, from one forward and one backward pass.

    Default sites: for pypattern's ``Transformer`` (and every model converted into it) the whole model by
    :func:`transformer_lens_sites`; for other models every ``nn.Linear``, ``nn.Embedding``, affine
    ``nn.LayerNorm`` and RMS norm with a weight (``nn.RMSNorm``, Hugging Face's Llama-family and Gemma
    ``*RMSNorm``: a raw Hugging Face Llama, Mistral, Qwen2 or Gemma is covered whole; see :func:`default_sites`).
    Forward hooks record each site's
    input and output; one ``torch.autograd.grad`` of ``sum_i l_i`` gives the output gradients; the Gram of each
    site comes from :func:`grad_gram_linear` / :func:`grad_gram_embedding` (LayerNorm: its ``2 d`` per-sample
    gradients directly) and they are summed. A module called several times in one forward counts all its calls
    (concatenated as extra positions, which is exact). A module run on the batch's rows flattened with the
    positions, a captured tensor of leading size ``k B`` (OPT's MLP runs on ``(B T, d)``), is read as ``(B, k,
    ...)``: sample-major rows, as ``reshape(-1, d)`` of a ``(B, T, d)`` tensor lays them out (``check`` refuses
    rows laid out otherwise). Activation checkpointing (Hugging Face's ``gradient_checkpointing_enable()``) is
    switched off for the call and back on afterwards: it changes how the backward pass gets the activations, not
    the Gram. Frozen parameters are left out. Parameters' ``.grad`` are not touched.

    Parameters
    ----------
    model : nn.Module
        Must treat samples independently (no batch norm in training mode). A model in ``train()`` mode whose
        forward is random there (dropout) is run with its ``eval()`` forward, with a warning, and left in its mode.
    loss_fn : callable or None
        ``loss_fn(model, *inputs)`` returns the per-sample losses, shape ``(B,)`` or ``(B, ...)`` (then summed
        over the trailing dimensions, e.g. per-token losses): ``reduction="none"``, never the batch mean
        (a mean would put a factor ``1/B`` in every gradient). None: the library's one rule on one batch
        (token ids, a Hugging Face dict with ``attention_mask`` / ``labels``, an ``(x, y)`` pair), each sample's
        mean loss over its counted tokens (:func:`pypattern.losses.sample_losses`); a sample with no counted
        token is refused.
    *inputs
        Passed to ``loss_fn``; their first dimension is the batch.
    modules : list of names or modules, optional
        Restrict the default sites to these modules (one name or module alone is read as a list of it): for
        pypattern's Transformer the :func:`transformer_lens_sites` inside them (``"blocks.0.attn"``,
        ``"blocks.1.mlp"``, ``"blocks.1"``, ``"embed"``, ...; an embedding tied to the unembedding counts both
        uses), else their ``nn.Linear``, ``nn.Embedding``, ``nn.LayerNorm`` and RMS norm sites (such a module itself,
        or those inside a container such as a Hugging Face model's ``"model.layers.0"``; a container holding
        trainable parameters outside them, e.g. a ``Conv1D`` weight, is refused, naming them). An empty list is
        refused.
    sites : list of GramSite, optional
        Use these sites instead of the default ones (one GramSite alone is read as a list of it; an empty list is
        refused).
    centered : bool
        Return ``H G H`` (see :func:`center_gram`), the Gram of the per-sample gradients minus their mean. Centring
        cancels the common part of the gradients: a site whose products were taken in float32 and whose ``max_i
        G_ii`` exceeds :data:`CENTRED_RECOMPUTE_RATIO` times that of ``H G H`` (per-sample gradients sharing a
        large common part: inputs near a common point, a model far from a minimum) is computed again from float64
        copies of its captured tensors, so that the result keeps float64 products' accuracy instead of losing the
        ratio's digits (about ``3e-7`` times the ratio, relative, in float32). Only that site's captures are copied,
        and the site's Gram costs float64 products' time.
    per_module : bool
        Return ``{site name: (B, B)}`` instead of the sum.
    method, backend : str
        Passed to :func:`grad_gram_linear` / :func:`grad_gram_pairwise`.
    check : {"once", True, False}
        Verify that the captured per-sample gradients account for the covered parameters' gradients, and raise
        ``ValueError`` naming the sites where they do not: ``True`` on every call; ``"once"`` (default) on the
        first call for a model with the same sites, ``loss_fn`` (its code), input shapes and dtypes and every
        module's training mode, and not again once that call passed (what it catches depends on how the model
        and ``loss_fn`` compute, not on the values); ``False`` never. Per site, ``1^T G 1`` (the squared norm
        of the summed per-sample gradients) must equal ``||grad sum_i l_i||^2`` over its parameters, and one
        diagonal entry ``G[i, i]`` must equal ``||grad l_i||^2`` (``i`` the sample of the largest ``|l_i|``),
        to 1e-9 relative in float64 and 1e-4 in float32. This catches a use of a covered parameter the hooks do
        not see (a weight tied to a module that is not a site, a functional use such as ``F.linear(x,
        m.weight)``, a module called as ``m.forward(x)``, a penalty on the parameters inside ``loss_fn``) and a
        captured tensor whose leading dimension is not the batch although its size is, wherever it changes
        those squared norms by more than the tolerance. Cost: the backward pass
        also forms the covered parameters' gradients, plus one more backward pass (of ``l_i``), the graph kept
        until then: about one backward pass more, 70-90% of the time without the check on small CPU models (a
        2-layer, d_model 64 Transformer at B=16, T=32: 15 ms without, 26 ms with it), less where the Gram
        itself dominates. ``check=False`` skips it, e.g. in a loop over batches of a model and sites already
        checked, where the extra backward pass and the kept graph's memory matter; the Gram is then only as
        right as the sites' description of the model.

    Returns
    -------
    Tensor ``(B, B)`` float64, or a dict of them (every site, a zero Gram for a site whose calls gave its
    parameters no gradient or that recorded no call); ``(0, 0)`` for inputs of no sample (every tensor of the
    inputs of leading size 0: the model is not run).
    """
    if check not in (True, False, "once") or isinstance(check, int) and not isinstance(check, bool):
        raise ValueError(f"check={check!r} is not valid; give 'once', True or False")
    _check_model(model, "per_sample_grad_gram")
    if loss_fn is None:
        if len(inputs) != 1:
            raise TypeError(
                f"loss_fn=None reads one batch (token ids, a Hugging Face dict or an (x, y) pair) by the library's "
                f"rule; got {len(inputs)} inputs: give them as one batch, or give loss_fn(model, *inputs)"
            )
        loss_fn = _rule_sample_losses
    check_flag(centered, "centered")
    check_flag(per_module, "per_module")
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "per_sample_grad_gram takes gradients, which torch.inference_mode() does not allow (torch.no_grad() "
            "is fine: gradients are enabled inside); call it outside the inference-mode block"
        )
    refuse_inference_parameters(model, "per_sample_grad_gram")
    # inputs made under inference mode: autograd cannot save them for the backward, ordinary copies it can
    from .losses import map_batch

    inputs = tuple(
        map_batch(lambda x: x.clone() if isinstance(x, torch.Tensor) and x.is_inference() else x, inputs)
    )
    defaults = sites is None and modules is None
    if defaults:
        from ._checks import compiled_inner
        from .models.transformer import Transformer

        if isinstance(compiled_inner(model), Transformer):  # torch.compile's wrapper of pypattern's model
            model = compiled_inner(model)
    sites = _sites_of(model, modules, sites)
    params = _check_sites(model, sites)
    verified_key = None
    if check == "once":
        verified_key = _verification_key(sites, params, loss_fn, inputs, model)
        check = verified_key not in _VERIFIED.get(model, ())
    sites = [st for st in sites if any(pn in params for pn in st.params if pn is not None)]
    if not sites:
        raise _no_site(model)
    if defaults:  # the Gram over "the model's parameters" must not leave trainable ones out without a word
        covered = {id(p) for p in params.values()}
        left = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
        if left:
            from .models.transformer import Transformer

            if isinstance(model, Transformer):
                what, example, fix = (
                    "transformer_lens_sites, pypattern's Transformer's",
                    "a module added to the model",
                    "give sites= with a GramSite for each (transformer_lens_sites(model) plus yours)",
                )
            else:
                what, example, fix = (
                    "nn.Linear, nn.Embedding, affine nn.LayerNorm and RMS norm modules",
                    "a convolution, a norm of another form",
                    "name the modules to cover (modules=), give sites= (for a Hugging Face model, convert it "
                    "with pypattern.from_hf: its default sites cover it whole)",
                )
            raise ValueError(
                f"the default sites ({what}) leave out {len(left)} trainable parameters "
                f"({left[:4]}{' ...' if len(left) > 4 else ''}; e.g. {example}), so the Gram would not "
                f"be over all of them: {fix}, freeze the parameters to leave out (requires_grad_(False)), or use "
                "pypattern.gram.per_sample_grad_gram_reference"
            )
    for st in sites:
        for pn in st.params:
            if pn is not None and pn in params and params[pn].dtype not in (torch.float32, torch.float64):
                raise TypeError(
                    f"parameter {pn!r} has dtype {params[pn].dtype}; the per-sample gradient Gram is computed for "
                    "float32 and float64 models (cast a copy with .float())"
                )
    if not callable(loss_fn):
        raise TypeError(
            f"loss_fn is a {type(loss_fn).__name__}, not callable; give loss_fn(model, *inputs) returning the "
            "per-sample losses (B,)"
        )
    from .losses import batch_tensors

    given = [t for x in inputs for t in batch_tensors(x) if t.dim() > 0]
    if given and all(t.shape[0] == 0 for t in given):
        # no sample: the (0, 0) Gram, as the reference gives. loss_fn's contract is still checked where the model
        # runs on a batch of none (a Hugging Face forward cannot reshape one: then there is nothing to check)
        try:
            with torch.no_grad(), _checkpointing_off(model):
                losses = loss_fn(model, *inputs)
        except RuntimeError:
            losses = None
        if losses is not None:
            _check_per_sample_losses(losses)
        empty = torch.zeros(0, 0, dtype=torch.float64, device=given[0].device)
        return {st.name: empty.clone() for st in sites} if per_module else empty
    from .models.hooks import HookPoint

    # a site's output is the value its map produced: at a hook point, what arrives there, before any function
    # attached to it (a user's hook may scale or replace it); a site's input is what the map read: a hook point's
    # value after its functions
    roles = {("out", st.out) for st in sites} | {("out", st.tied[0]) for st in sites if st.tied is not None}
    roles |= {("in", c) for st in sites for c in (st.inp, st.tied[1] if st.tied is not None else None) if c}
    mods = dict(model.named_modules())

    def key(role, c):  # the record that serves capture c in that role: a site output's arriving value
        mod_name, what = c
        if role == "out" and (what == "input" or isinstance(mods[mod_name], HookPoint)):
            return (mod_name, "arriving")
        return c

    need: dict[str, set] = {}
    for role, c in roles:
        mod_name, what = key(role, c)
        need.setdefault(mod_name, set()).add(what)
    scales = [
        mods[f"{st.name}.hook_scale"]
        for st in sites
        if st.kind in ("layernorm", "rmsnorm") and isinstance(mods.get(f"{st.name}.hook_scale"), HookPoint)
    ]

    def capture(clone: bool):
        """Run ``loss_fn`` with every needed module's input and output recorded (``[tensor, grad, version]``).
        With ``clone`` each recorded output is handed on as a copy, so that an in-place op after the module (a
        ``ReLU(inplace=True)``, a hook function editing its activation) changes the copy, not the tensor whose
        gradient is taken."""
        records: dict[tuple[str, str], list] = {
            (mod_name, w): [] for mod_name, ws in need.items() for w in ws
        }

        def make_hook(mod_name, whats):
            def hook(mod, args, kwargs, out):
                if "input" in whats:
                    # the layer's input, positional or by keyword (nn.Linear's and nn.Embedding's is "input"); a
                    # positional embedding that computes its ids itself: those ids
                    x = _own_lookup_ids(mod, args, kwargs)
                    if x is None and _reads_position_ids(mod):  # a positional site's: the positions it reads
                        x = _given_position_ids(mod, args, kwargs)
                    elif x is None:
                        x = args[0] if args else kwargs.get("input", next(iter(kwargs.values()), None))
                    records[(mod_name, "input")].append([x.detach() if torch.is_tensor(x) else x, None, None])
                if "output" in whats:
                    version = out._version if torch.is_tensor(out) else None
                    records[(mod_name, "output")].append([out, None, version])
                    if clone and torch.is_tensor(out):
                        return out.clone()
                return None

            return hook

        def make_pre_hook(mod_name):
            def pre_hook(mod, args):
                x = args[0]
                records[(mod_name, "arriving")].append([x, None, x._version if torch.is_tensor(x) else None])
                if clone and torch.is_tensor(x):  # the hook point's functions act on a copy
                    return (x.clone(), *args[1:])
                return None

            return pre_hook

        scale_versions: dict[int, int] = {}

        def scale_check(mod, args, out):
            x = args[0]
            if out is not x or scale_versions[id(mod)] != x._version:
                raise NotImplementedError(
                    f"a function on {mod.name or 'a norm hook_scale'} replaced or edited the norm's scale: the "
                    "Gram's norm sites recompute it from the norm's input; remove that hook, or use "
                    "pypattern.gram.per_sample_grad_gram_reference"
                )

        def scale_version(mod, args):
            scale_versions[id(mod)] = args[0]._version

        handles = []
        try:
            for mod_name, whats in need.items():
                m = mods[mod_name]
                if "arriving" in whats:
                    handles.append(m.register_forward_pre_hook(make_pre_hook(mod_name)))
                if whats - {"arriving"}:
                    handles.append(m.register_forward_hook(make_hook(mod_name, whats), with_kwargs=True))
            for m in scales:
                handles.append(m.register_forward_pre_hook(scale_version))
                handles.append(m.register_forward_hook(scale_check))
            with _checkpointing_off(model):
                losses = loss_fn(model, *inputs)
        finally:
            for h in handles:
                h.remove()
        return records, losses

    records, losses = capture(clone=False)
    changed = any(
        rec[2] is not None and rec[0]._version != rec[2] for recs in records.values() for rec in recs
    )
    if changed:  # a recorded tensor was overwritten in place after it was recorded: run again on copies
        records, losses = capture(clone=True)
    _check_per_sample_losses(losses)
    batch = losses.shape[0]
    out_keys = {key(r, c) for r, c in roles if r == "out"}
    shared_ids = {key("in", st.inp) for st in sites if st.kind == "positional" and st.inp is not None}
    targets = []
    rows = set()  # records of a module that runs on the batch's rows flattened with the positions (B T, ...)
    for c, recs in records.items():
        for rec in recs:
            t = rec[0]
            if (
                torch.is_tensor(t)
                and t.dim() > 0
                and batch
                and t.shape[0] > batch
                and t.shape[0] % batch == 0
            ):
                rows.add(id(rec))
            elif c in shared_ids and torch.is_tensor(t) and t.dim() > 0 and t.shape[0] == 1:
                pass  # positions looked up once for the batch (GPT-2's wpe): the same ids for every sample
            elif torch.is_tensor(t) and t.dim() > 0 and t.shape[0] != batch:
                shared = (
                    " (a module applied once for the whole batch, such as a learned position embedding looked up "
                    "for positions shared by every sample: per-sample gradients cannot be read at it; leave the "
                    "module out with modules=, convert a Hugging Face model with pypattern.from_hf(model) where it "
                    "converts, or use pypattern.gram.per_sample_grad_gram_reference, which covers every weight)"
                    if t.shape[0] == 1
                    else ""
                )
                raise ValueError(
                    f"{c[0]}: its {c[1]} has leading size {t.shape[0]} but the losses have batch {batch}; "
                    f"the first dimension of every captured tensor must be the batch{shared}"
                )
            if c in out_keys and torch.is_tensor(t) and t.requires_grad:
                targets.append(rec)
    # the check's gradients: the covered parameters' in the same backward pass, and one sample's in one more
    names = list(params) if check and batch and losses.requires_grad else []
    wrt = [r[0] for r in targets] + [params[pn] for pn in names]
    grads = (
        torch.autograd.grad(losses.sum(), wrt, allow_unused=True, retain_graph=bool(names))
        if wrt and (targets or losses.requires_grad)
        else [None] * len(wrt)
    )
    sample, single = 0, [None] * len(names)
    if names:
        sample = _check_sample(losses)
        single = torch.autograd.grad(
            losses.reshape(batch, -1)[sample].sum(), [params[pn] for pn in names], allow_unused=True
        )
    for rec, g in zip(targets, grads):
        rec[1] = g
    cap = {
        (r, c): [
            _by_sample(x, batch)
            if id(x) in rows
            else (x[0].detach() if torch.is_tensor(x[0]) else x[0], x[1])
            for x in records[key(r, c)]
        ]
        for r, c in roles
    }
    result: dict[str, torch.Tensor] = {}
    for st in sites:
        # no sample (an empty batch): the (0, 0) Gram; else the site's, from its captured calls
        g = _site_gram(st, params, cap, batch, method, backend) if batch else None
        # a site whose calls gave its parameters no gradient (or that recorded no call): its Gram is zero
        result[st.name] = (
            torch.zeros(batch, batch, dtype=torch.float64, device=losses.device) if g is None else g
        )
    if names:
        total_grads = dict(zip(names, grads[len(targets) :]))
        _check_capture(
            model, sites, params, result, total_grads, sample, dict(zip(names, single)), losses, cap
        )
    if names and verified_key is not None:
        _VERIFIED.setdefault(model, set()).add(verified_key)
    if centered and batch:
        result = {
            st.name: _centred_site_gram(st, result[st.name], params, cap, batch, method, backend)
            for st in sites
        }
    if per_module:
        return result
    total = torch.zeros(batch, batch, dtype=torch.float64, device=losses.device)
    for v in result.values():
        total += v.to(total.device)
    return total


@_eval_mode_throughout
def per_sample_grad_gram_reference(
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    *inputs,
    modules: Sequence[str | nn.Module] | None = None,
    sites: Sequence[GramSite] | None = None,
    centered: bool = False,
    chunk_size: int | None = None,
    gram_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Specification of :func:`per_sample_grad_gram`: ``torch.func.vmap(grad)`` per-sample gradients, flattened.

    Without ``sites`` or ``modules``, the model is covered whole: every trainable parameter (for pypattern's
    Transformer also under options :func:`transformer_lens_sites` refuses, and for any other model also the
    weights its default sites leave out, such as Hugging Face GPT-2's ``Conv1D`` projections). Each sample ``i`` runs alone as a batch of one (``loss_fn(model, *[x[i:i+1] for x in inputs]).sum()``).
    An input may be a tensor, or a mapping (a Hugging Face batch: ``dict`` or ``BatchEncoding``), tuple or list of
    them: each of its tensors is cut along its first axis, the batch, which they must share; other values are
    passed to every sample as they are.
    Memory ``B x (number of covered parameters)`` several times over: the gradients, their flattened copy and its
    cast to ``gram_dtype`` (``chunk_size`` bounds only the intermediates of ``vmap``, not these). The Gram is
    taken in ``gram_dtype`` (float64 for tests; float32 is the plain, faster baseline). Returns ``(B, B)`` (``(0, 0)``
    for inputs of no sample). Hugging Face's activation checkpointing (``gradient_checkpointing_enable()``), which
    ``torch.func`` cannot run through, is switched off for the call and back on afterwards (the Gram does not
    depend on it).

    Raises
    ------
    ValueError
        When the inputs hold no tensor with a batch axis, or their tensors' first axes differ, or a mapping's
        ``attention_mask`` holds other values than 0 and 1 (or pads on the left for a model that takes no mask),
        naming the input.
    """
    from torch.func import functional_call, grad, vmap
    from torch.utils._pytree import tree_flatten, tree_map

    from .losses import (
        _describe,
        as_pytree,
        check_attention_mask,
        check_batch_values,
        parse_batch,
        stacked_batches_checked,
    )

    if chunk_size is not None and not (is_count(chunk_size) and chunk_size >= 1):
        raise ValueError(
            f"per_sample_grad_gram_reference: chunk_size={chunk_size!r} is not valid; give a positive int (samples "
            "per vmap chunk) or None"
        )
    chunk_size = None if chunk_size is None else int(chunk_size)
    trees, rebuilds = zip(*(as_pytree(x) for x in inputs)) if inputs else ((), ())
    sizes = {}
    for k, (x, tree) in enumerate(zip(inputs, trees)):
        for t in tree_flatten(tree)[0]:
            if torch.is_tensor(t):
                if t.dim() == 0:
                    raise ValueError(
                        f"per_sample_grad_gram_reference: inputs[{k}] ({_describe(x)}) holds a 0-dim tensor; every "
                        "tensor of the inputs must have the batch as its first axis"
                    )
                sizes.setdefault(int(t.shape[0]), k)
    if len(sizes) != 1:
        got = ", ".join(f"{b} (inputs[{k}])" for b, k in sizes.items()) if sizes else "no tensor"
        raise ValueError(
            "per_sample_grad_gram_reference: the inputs' tensors must share their first axis, the batch (a tensor, "
            f"or a mapping, tuple or list of tensors, e.g. a Hugging Face batch); got {got}: "
            + "; ".join(f"inputs[{k}] {_describe(x)}" for k, x in enumerate(inputs))
        )
    in_dims = tuple(tree_map(lambda t: 0 if torch.is_tensor(t) else None, tree) for tree in trees)
    # the values the default losses check and cannot read under vmap (an attention mask's 0s and 1s, no left
    # padding for a model that takes no mask): checked here, on the whole inputs, and left out under vmap
    for k, x in enumerate(inputs):
        if isinstance(x, Mapping) and torch.is_tensor(x.get("attention_mask")):
            check_attention_mask(x["attention_mask"], f"inputs[{k}]['attention_mask']")
            try:
                parse_batch(x)
            except (TypeError, ValueError):
                continue  # a batch of loss_fn's own form: read as loss_fn reads it
            check_batch_values(model, x, f"inputs[{k}]")

    if sites is None and modules is None:  # every trainable parameter
        covered = {k: v for k, v in model.named_parameters() if v.requires_grad}
    else:
        covered = gram_parameters(model, modules, sites)
    params = {k: v.detach() for k, v in covered.items()}
    if not params:
        raise _no_site(model)
    if next(iter(sizes)) == 0:  # no sample: the (0, 0) Gram (vmap over no sample runs nothing)
        first = next(t for tree in trees for t in tree_flatten(tree)[0] if torch.is_tensor(t))
        return torch.zeros(0, 0, dtype=gram_dtype, device=first.device)

    class _Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *xs):
            return loss_fn(self.model, *xs)

    wrap = _Wrap()

    def single(p, *xs):
        # each sample as a batch of one, in its input's own kinds of mapping
        ones = tuple(
            rebuild(tree_map(lambda t: t.unsqueeze(0) if torch.is_tensor(t) else t, x))
            for rebuild, x in zip(rebuilds, xs)
        )
        out = functional_call(wrap, {f"model.{k}": v for k, v in p.items()}, ones)
        return out.sum()

    try:
        with stacked_batches_checked(), _checkpointing_off(model):
            grads = vmap(grad(single), in_dims=(None, *in_dims), chunk_size=chunk_size)(params, *trees)
    except RuntimeError as e:
        if "functorch transform" in str(e) or "checkpoint" in str(e):
            raise RuntimeError(
                "per_sample_grad_gram_reference: torch.func.vmap(grad) cannot run loss_fn on "
                f"{type(model).__name__}: something in its forward or in loss_fn calls requires_grad_() or "
                "torch.autograd, as activation checkpointing (torch.utils.checkpoint) does; Hugging Face's "
                "gradient_checkpointing_enable() is switched off for the call already, so turn off checkpointing "
                "of your own for it (the Gram does not depend on it), or use pypattern.gram.per_sample_grad_gram: "
                + str(e)
            ) from e
        if ".item()" not in str(e) and "data-dependent" not in str(e):
            raise
        raise RuntimeError(
            "per_sample_grad_gram_reference: torch.func.vmap cannot run loss_fn on "
            f"{type(model).__name__}: a value is read with .item() or decides the control flow, in the model's "
            "forward (as Hugging Face's code does with an attention_mask passed to the model, and in a mixture of "
            "experts' routing) or in loss_fn; compute the loss "
            "without reading values, or, for a Hugging Face model that pypattern.from_hf converts, convert it "
            "first (its forward vmap runs): " + str(e)
        ) from e
    flat = torch.cat([g.detach().reshape(g.shape[0], -1).to(gram_dtype) for g in grads.values()], 1)
    g = flat @ flat.T
    return center_gram(g) if centered else g
