"""Attribution patching (AtP) and AtP*: first-order estimates of every cell of a patching grid.

AtP estimates the effect of patching activation ``a`` (from the source run into the target run) as
``(a_source - a_target) . dM/da`` with the gradient taken on the target run. All cells of all sites come from
two forwards (source and target) and one backward, batched over examples.

AtP* (Kramar et al. 2024) adds two fixes:

- *QK fix*: for query and key sites the softmax is recomputed exactly (for a single key the new pattern has a
  closed form), and only the step from the attention pattern on is linearised;
- *GradDrop*: for each layer l, a backward pass with the gradient through layer l's outputs (``attn_out``,
  ``mlp_out``) set to zero; the score ``sum_l |AtP_l| / (L - 1)`` exposes effects that cancel in plain AtP
  (the mean over the passes that can move a component: its own layer's pass gives it no gradient). A
  residual-stream site (``resid_pre``, ``resid_mid``, ``resid_post``) has a gradient in every pass, so its score
  is ``sum_l |AtP_l| / L``, the same mean.
  Such a pass changes no gradient after layer l, zeroes those inside layer l's attention and MLP, and passes
  the residual gradient after layer l unchanged to layer l's input; so it is computed as a backward from layer
  l's input (with the full pass's gradient after layer l) through layers ``0 .. l - 1`` only; on a model with
  functions attached (which may change the residual stream inside a layer), as a backward from the metric with
  the gradient zeroed at layer l's ``attn_out`` and ``mlp_out``.

Use AtP to shortlist cells and exact patching to confirm them: :func:`shortlist_and_confirm`.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from .._checks import is_count, refuse_inference_parameters
from .._memory import keep_freed_heap
from .._training import frozen_parameters
from ..models.packed import block_weight_bytes, pack_budget
from .api import (
    check_batch_limits,
    check_corruption_tokens,
    check_finite_examples,
    check_positions_real,
    check_real_length,
    check_tokens,
    engine_batch,
    half_precision_warned,
    long_token_args,
    masking_kwargs,
    mean_with_mask,
    patching_mask,
    read_prompts,
    reference_masking,
    resolve_corruption,
    warn_half_precision,
    warn_if_no_op,
)
from .corruptions import (
    Corruption,
    GaussianNoise,
    MeanAblation,
    TokenReplacement,
    ZeroAblation,
    embedding_noise_hook,
    masked_mean,
    position_axis,
)
from .inert import changed_at, set_inert
from .metrics import (
    KL,
    Metric,
    bind_metric,
    check_metric_on_stacks,
    check_metric_output,
    first_order_says_nothing,
    first_order_tol,
    logits_at,
    metric_on,
    metric_positions,
    result_name,
)
from .results import PatchResult
from .sites import HEAD_SITES, Cell, check_site, hook_name, make_cells, site_heads

__all__ = ["attribution_patching", "shortlist_and_confirm"]


def _wide(x: torch.Tensor) -> torch.Tensor:
    """A float16 or bfloat16 tensor in float32 (any other as it is): the estimates' products and sums are taken in
    it, so that a 16-bit model's estimates are those of its activations and gradients, not rounded to 16 bits at
    every step (a product rounded to 8 bits, and sums of such products that cancel, lose the estimate)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _reduce(site: str, x: torch.Tensor, per_position: bool) -> torch.Tensor:
    """Per-element contributions -> per-cell ``(batch, [head,] [pos])``."""
    if site == "pattern":  # (B, H, Tq, Tk): sum over keys, cells are (head, query pos)
        r = x.sum(-1)
        return r if per_position else r.sum(-1)
    if site in HEAD_SITES:  # (B, T, H, dh)
        r = x.sum(-1).transpose(1, 2)  # (B, H, T)
        return r if per_position else r.sum(-1)
    r = x.sum(-1)  # (B, T)
    return r if per_position else r.sum(-1)


def _group_sum(x: torch.Tensor, n_groups: int) -> torch.Tensor:
    """``(B, n_heads, ...)`` -> ``(B, n_key_value_heads, ...)``: the sum over each key/value head's query heads."""
    if n_groups == 1:
        return x
    B, H = x.shape[:2]
    return x.reshape(B, H // n_groups, n_groups, *x.shape[2:]).sum(2)


def _qk_fixed(
    site,
    attn,
    q_t,
    k_t,
    q_s,
    k_s,
    pat_t,
    g_pat,
    per_position,
    cache: dict | None = None,
    masking: dict | None = None,
):
    """Exact softmax for a query or key patch, linear from the pattern on: ``(B, heads, T)`` or ``(B, heads)``
    (query heads for ``q``, key/value heads for ``k``).

    ``q_t``/``q_s (B, T, n_heads, d_head)`` and ``k_t``/``k_s (B, T, n_key_value_heads, d_head)`` are the target
    and source queries and keys as the scores read them (rotated, with rotary positions: a query or key patched at
    a position is rotated there, so its rotated value is the source run's); ``pat_t (B, H, T, T)`` the target
    pattern and ``g_pat`` the metric's gradient at it. Scores, scale and mask are the model's (``attn``). What
    does not depend on ``g_pat`` is kept in ``cache`` (one dict per layer and site: GradDrop's passes reuse it).
    ``masking``: the forward's ``attention_mask`` (bool ``(B, T)``) and ``position_ids``, or None: padding keys
    are masked out of the recomputed softmax as the forward masks them, and a query with no key (padding before a
    row's first real token) has a pattern of zeros, as in the forward."""
    G = attn.cfg.n_groups
    cache = {} if cache is None else cache
    g_pat = _wide(g_pat)  # a 16-bit model's estimate taken in float32 from its patterns and gradient
    if site == "q" or not per_position:
        if "moved" not in cache:
            T = pat_t.shape[-1]
            pos = torch.arange(T, device=pat_t.device)  # the mask and an ALiBi bias meet the scores there
            q = q_s if site == "q" else q_t
            k = k_s if site == "k" else k_t
            # the new pattern as the model computes it (in its dtype), its change in float32
            if not masking:
                new = attn.softmax(attn.scores(q, k, pos, pos))
            else:
                keep = masking["attention_mask"]
                scores = attn.scores(
                    q, k, pos, pos, key_mask=keep, bias_positions=masking.get("position_ids")
                )
                new = attn.dead_softmax(scores, attn.dead_queries(keep))  # as the forward: no key, zeros
            cache["moved"] = _wide(new) - _wide(pat_t)
        est = (cache["moved"] * g_pat).sum(-1)  # (B, H, Tq)
        if site == "k":  # one cell per key/value head: the sum over the query heads that read it
            est = _group_sum(est, G)
        return est if per_position else est.sum(-1)
    # one key s replaced (per position): closed form for every (query t, key s) pair, from the target scores (a
    # pattern rounded to the softmax's dtype underflows to 0 where a raised score matters)
    if "key" not in cache:
        cache["key"] = _key_fix_terms(attn, q_t, k_t, k_s, pat_t, masking)
    c = cache["key"]
    g = g_pat
    w_other = torch.where(  # sum_{j != s} e^{z_j - ref_s} g_j
        c["is_max"], (c["e2"] * g).sum(-1, keepdim=True), (c["e1"] * g).sum(-1, keepdim=True) - c["e1"] * g
    )
    other_pg = c["to_old"] * w_other  # sum_{j != s} p_j g_j
    other_new = torch.where(w_other == 0, 0.0, c["to_new"] * w_other)  # sum_{j != s} p'_j g_j
    rescale = torch.where(c["small"], other_pg * c["expm1"], other_new - other_pg)
    est_ts = (rescale + c["dp"] * g).masked_fill(c["mask"], 0.0)
    return _group_sum(est_ts.sum(-2), G)  # over queries t -> (B, Hkv, S)


def _key_fix_terms(attn, q_t, k_t, k_s, pat_t, masking: dict | None = None) -> dict:
    """The part of the per-position key fix that does not depend on the metric's gradient (see
    :func:`_qk_fixed`), every tensor ``(B, H, T, T)`` (queries t, keys s) or ``(B, H, T, 1)``.

    Replacing key s's score z_s by z_s + delta: the new normaliser is lse'_s = log(sum_{j != s} e^{z_j} +
    e^{z_s + delta}), p'_s = e^{z_s + delta - lse'_s}, every other key's weight is rescaled by e^{lse - lse'_s},
    and the metric moves by sum_{j != s} (p'_j - p_j) g_j + (p'_s - p_s) g_s. The sums over the keys other than s
    are taken relative to the row's largest score m1, or, for the key that holds it, to the second largest m2: then
    each sum has a term equal to 1 and none overflows, and nothing is a difference of nearly equal numbers where a
    weight is near 1 (1 - p_s, or "all but s" from the full sum, lose every digit there).

    ``masking`` (the forward's ``attention_mask`` and ``position_ids``): padding keys are masked as the forward
    masks them (the mask is then ``(B, 1, T, T)``), ALiBi biases read each row's positions, and a query row with
    no key is computed over zeros and masked whole (its estimate is 0: its pattern is 0 whatever the keys)."""
    T = pat_t.shape[-1]
    pos = torch.arange(T, device=pat_t.device)  # the mask fills the scores on their device
    mask = attn.attn_mask(pos, pos)
    pids = None
    if masking:
        mask = mask | ~masking["attention_mask"][:, None, None, :]  # (B, 1, T, T)
        pids = masking.get("position_ids")
    half = pat_t.dtype in (torch.float16, torch.bfloat16)

    def scored(k: torch.Tensor) -> torch.Tensor:
        """The scores of the target queries with keys ``k`` as the model computes them, before the mask; a 16-bit
        model's in the dtype the model takes them in (its own, or ``attn_scores_dtype``), others' in the pattern's."""
        qc, kc = attn.qk_cast(q_t, attn.expand_kv(k))
        raw = attn.scale_scores(torch.einsum("bthe,bshe->bhts", qc, kc))
        return raw if half else raw.to(pat_t.dtype)

    raw = scored(k_t)
    bias = attn.position_bias(T if pids is None else pids, raw.dtype, raw.device)
    if bias is not None:  # (H, T), or (B, H, T) per row: over the queries
        bias = bias[:, None, :] if bias.dim() == 2 else bias[:, :, None, :]
    raw = raw if bias is None else raw + bias
    capped = attn.cap(raw)
    if half:
        # a 16-bit model: the new scores as the model computes (and rounds) them, and every step from the scores
        # on in float32 (a normaliser rounded to 8 bits moves each weight by up to e^(|score| / 256))
        new = scored(k_s)
        new = attn.cap(new if bias is None else new + bias)
        wide = torch.promote_types(capped.dtype, torch.float32)
        capped = capped.to(wide)
        delta = new.to(wide) - capped
    else:
        delta = scored(k_s - k_t)
        if attn.cfg.attn_scores_soft_cap is not None:  # capped scores: the change of the capped score
            delta = attn.cap(raw + delta) - capped
    z = capped.masked_fill(mask, float("-inf"))
    if masking:  # a query row with no key: zeros (finite terms), masked whole below
        z = z.masked_fill(mask.all(-1, keepdim=True), 0.0)
    m1, arg = z.max(-1, keepdim=True)  # every query row reads at least one key
    is_max = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, arg, True)
    e1 = torch.exp(z - m1)
    s1 = e1.sum(-1, keepdim=True)
    lse = m1 + torch.log(s1)
    z2 = z.masked_fill(is_max, float("-inf"))
    m2 = z2.max(-1, keepdim=True).values
    # a row of one key has no second score (its sums over j != s are 0)
    m2 = torch.where(torch.isfinite(m2), m2, m1)
    e2 = torch.exp(z2 - m2)
    ref = torch.where(is_max, m2, m1)  # the reference of the sums over j != s
    # log sum_{j != s} e^{z_j}
    log_other = ref + torch.log(torch.where(is_max, e2.sum(-1, keepdim=True), s1 - e1))
    lse_new = torch.logaddexp(log_other, z + delta)
    shift = lse - lse_new
    small = shift.abs() < 1.0  # a small change of the normaliser: expm1 keeps its digits
    return {
        "mask": mask,
        "is_max": is_max,
        "e1": e1,
        "e2": e2,
        "to_old": torch.exp(ref - lse),
        # e^{ref - lse'_s} <= 1 wherever another key exists (lse'_s >= log_other >= ref); where none does, the
        # sum it scales is 0 (and the factor is not used)
        "to_new": torch.exp(ref - lse_new),
        "small": small,
        "expm1": torch.expm1(torch.where(small, shift, 0.0)),
        "dp": torch.exp(z + delta - lse_new) - torch.exp(z - lse),  # p'_s - p_s
    }


def _scored(site: str, layer: int, cfg) -> str:
    """Hook name of the queries (``site="q"``) or keys as the scores read them: rotated with rotary positions."""
    return f"blocks.{layer}.attn.hook_rot_{site}" if cfg.rotary else hook_name(site, layer)


def _source_names(cfg, sites: list[str], qk_fix: bool) -> set[str]:
    """The hooks whose source-run activations the estimates read: every site at every layer, and with the QK fix
    for ``q``/``k`` the patterns and the queries and keys as the scores read them (rotated, with rotary
    positions)."""
    L = cfg.n_layers
    names = {hook_name(s, layer) for s in sites for layer in range(L)}
    if qk_fix and any(s in ("q", "k") for s in sites):
        names |= {hook_name("pattern", layer) for layer in range(L)}
        names |= {_scored(s, layer, cfg) for s in ("q", "k") for layer in range(L)}
    return names


def _layer_of(name: str) -> int:
    return int(name.split(".")[1])


def _drop_pass(
    layer: int, gnames: list[str], full: dict, captured: dict, zeros: dict
) -> dict[str, torch.Tensor]:
    """The gradients of GradDrop's pass at ``layer`` (no gradient through that layer's ``attn_out`` and
    ``mlp_out``) from the full pass's gradients ``full``: unchanged after the layer (the same tensors: the
    scores computed from them are reused); at the layer, zero inside the attention and MLP (one tensor per name,
    ``zeros``) and the residual gradient after the layer at ``resid_pre``/``resid_mid``/``resid_post``; before
    the layer, a backward from the layer's input with that residual gradient."""
    g_post = full[hook_name("resid_post", layer)]
    out = {}
    below = []
    for n in gnames:
        at = _layer_of(n)
        if at > layer:
            out[n] = full[n]
        elif at == layer:
            resid = n.endswith(("hook_resid_pre", "hook_resid_mid", "hook_resid_post"))
            if resid:
                out[n] = g_post
            else:
                if n not in zeros:
                    zeros[n] = torch.zeros_like(captured[n])
                out[n] = zeros[n]
        else:
            below.append(n)
    if below:
        gs = torch.autograd.grad(
            captured[hook_name("resid_pre", layer)],
            [captured[n] for n in below],
            grad_outputs=g_post,
            retain_graph=True,
            allow_unused=True,
        )
        for n, g in zip(below, gs):
            out[n] = g if g is not None else torch.zeros_like(captured[n])
    return out


def _final_rows(model, tokens: torch.Tensor, pos, masking: dict | None = None) -> torch.Tensor:
    """The model's forward up to the unembedding, at the metric position(s) only: the normalised final residual
    rows ``(batch, [k,] d_model)`` that :meth:`unembed` turns into the metric's logits. ``masking``: the
    forward's ``attention_mask`` and ``position_ids`` (:func:`~pypattern.patching.api.masking_kwargs`)."""
    masking = masking or {}
    x = model.embed_tokens(tokens, masking.get("position_ids"))
    for block in model.blocks:
        x = block(x, **masking)
    return model.ln_final(logits_at(x, pos))  # the residual rows at pos


def _unembed_together(model, *rows: torch.Tensor) -> list[torch.Tensor]:
    """The logits of several runs' final rows from one matmul over the unembedding (at a few rows per run the
    product is bound by reading ``W_U``, which one pass then reads once)."""
    if len(rows) == 1:
        return [model.unembed(rows[0])]
    logits = model.unembed(torch.cat(rows, 0))
    return list(logits.split([r.shape[0] for r in rows], 0))


#: the sites :func:`attribution_patching` estimates by default (``mlp_out`` left out on an attention-only model)
DEFAULT_SITES = ("resid_pre", "attn_out", "mlp_out", "z")


def attribution_patching(
    model,
    clean_tokens: torch.Tensor,
    corrupted_tokens: torch.Tensor | None = None,
    *,
    metric: Metric,
    sites=DEFAULT_SITES,
    corruption: Corruption | None = None,
    direction: str = "denoising",
    per_position: bool = True,
    qk_fix: bool = False,
    grad_drop: bool = False,
    max_batch: int | None = None,
    max_memory: int | None = None,
    attention_mask: torch.Tensor | None = None,
) -> dict[str, PatchResult]:
    """AtP (or AtP* with ``qk_fix=True, grad_drop=True``) for every cell of every site in ``sites``.

    Parameters are those of :func:`~pypattern.patching.activation_patching`; ``model`` is pypattern's
    :class:`~pypattern.models.Transformer` (a Hugging Face or TransformerLens model that :func:`~pypattern.from_hf`
    converts is converted). A model with hook points (a :class:`~pypattern.models.HookedModule`, or a Hugging Face
    causal LM of a family ``from_hf`` does not convert, adapted by :func:`~pypattern.models.hooked_hf` by its
    residual stream) gets plain AtP at the sites it hooks (``resid_pre``, ``resid_post``, ...; by default those of
    the default sites it has): corrupted prompts only, without ``attention_mask`` (padding), ``qk_fix``,
    ``grad_drop`` or ``max_memory`` (one source forward, one target forward and one backward, over parts of
    ``max_batch`` prompts when it is given). ``sites`` lists the sites to estimate (default ``resid_pre``,
    ``attn_out``, ``mlp_out`` and ``z``, without ``mlp_out`` on an attention-only model; all from the same two
    forwards and one backward; with ``grad_drop`` one more backward per layer). Every architecture of the model
    works: under grouped-query attention the ``k``/``v`` cells are key/value heads (as in exact patching); with
    rotary positions the QK fix recomputes the scores from the rotated source queries/keys (a query or key patched
    at a position is rotated there) with the model's scale and (sliding-window) mask. The forwards unembed only
    the metric position(s).

    ``max_batch`` here counts prompts (exact patching's counts cells): at most this many per forward and backward,
    which bounds the memory (the backward keeps every activation of the target run). The estimates are per
    example, so the result equals the one of a single pass over all prompts. It needs a
    :class:`~pypattern.patching.metrics.Metric`, whose per-example answers are split with the prompts (a subclass
    lists its per-example tensors in ``per_example``; one that holds an undeclared tensor with an entry per prompt
    is refused). A ``MeanAblation`` averages over all its reference prompts (``reference_tokens``, or all the clean
    prompts), computed once, in parts of ``max_batch``, before the parts run. On a CPU where oneDNN's matmul is
    the faster (:mod:`pypattern.models.packed`), weights used for many rows are packed for it: at most one copy of
    the blocks' weights on top.

    ``max_memory`` (bytes) bounds the same parts by memory: the prompts per forward and backward are lowered (to
    at least 1) so that an estimate of what they keep for the backward (:func:`atp_prompt_bytes`: every layer's
    activations, the logits at the metric position and the metric's temporaries) stays within it, next to
    ``max_batch`` when both are given; packed weight copies come out of it too
    (:func:`~pypattern.models.packed.pack_budget`, as in :func:`shortlist_and_confirm`'s exact stage). Splitting
    needs a :class:`~pypattern.patching.metrics.Metric`, as with ``max_batch``. A budget below one prompt's
    estimate runs one prompt per part, with a ``RuntimeWarning`` naming the bytes it needs. Each result's
    ``info`` reports the prompts per part (``max_batch``) and their estimate (``memory_estimate``, bytes).

    ``attention_mask (batch, pos)`` (1 at real tokens, 0 at padding, on either side), or a tokenizer's output (a
    dict or ``BatchEncoding`` with ``input_ids`` and ``attention_mask``) given as the prompts, as in
    :func:`~pypattern.patching.activation_patching`: both runs (source and target) and every GradDrop pass run
    with the mask and ``position_ids = real_token_positions(mask)``, each prompt computed as it would be alone, so
    a row's estimates are those of its prompt alone at its columns; the QK fix recomputes the softmax with the
    padding keys masked as the forward masks them (a query with no key: a pattern of zeros). The metric must read
    real tokens (a position on padding is refused, naming the row); a patch at padding has estimate 0. A
    ``MeanAblation`` takes the mask as in exact patching (right padding only). ``info["attention_mask"]`` says
    whether a mask was given.

    Returns
    -------
    dict[str, PatchResult]
        One result per site with ``method="atp"`` (or ``"atp*"``); ``values`` holds ``m_target + estimate``
        so that ``.effect``, ``.normalized`` and ``.mean()`` read as for exact patching. With ``grad_drop``,
        ``info["graddrop"]`` holds the unsigned GradDrop scores ``(batch, *grid)``.
    """
    from ..models.convert import converted_if_convertible
    from ..models.transformer import Transformer

    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "attribution_patching takes gradients, which torch.inference_mode() does not allow (torch.enable_grad() "
            "cannot lift it); call it outside inference mode (inside torch.no_grad() is fine)"
        )
    refuse_inference_parameters(model, "attribution_patching")
    keep_freed_heap()
    warn_half_precision(model, "patching", "attribution_patching")
    clean_tokens, corrupted_tokens, attention_mask = read_prompts(
        clean_tokens, corrupted_tokens, attention_mask
    )
    clean_tokens, corrupted_tokens, corruption = long_token_args(clean_tokens, corrupted_tokens, corruption)
    model = converted_if_convertible(model)
    if not isinstance(model, Transformer):
        from ..models.hf import is_hf_causal_lm
        from .api import _hooked_if_hf

        if isinstance(model, torch.nn.Module):
            # a Hugging Face family from_hf does not convert: its hook points through pypattern.hooked_hf
            model = _hooked_if_hf(model)
        if hasattr(model, "hook_dict") and hasattr(model, "hooks"):
            return _atp_hooked(
                model, clean_tokens, corrupted_tokens, metric=metric, sites=sites, corruption=corruption,
                direction=direction, per_position=per_position, qk_fix=qk_fix, grad_drop=grad_drop,
                attention_mask=attention_mask, max_batch=max_batch, max_memory=max_memory,
            )  # fmt: skip
        hint = (
            "; convert a Hugging Face model with pypattern.from_hf(model)" if is_hf_causal_lm(model) else ""
        )
        raise TypeError(
            f"model is a {type(model).__name__}; attribution_patching needs pypattern's Transformer, or a model "
            f"with hook points (pypattern.hooked_hf, HookedModule) for its residual sites{hint}"
        )
    if sites is DEFAULT_SITES and getattr(model.cfg, "attn_only", False):
        sites = [s for s in DEFAULT_SITES if s != "mlp_out"]  # an attention-only model has no MLP output
    if isinstance(sites, str):
        sites = [sites]
    elif isinstance(sites, list | tuple) and all(isinstance(s, str) for s in sites):
        sites = list(sites)
    else:
        raise TypeError(f"sites={sites!r} is not valid; give a site name or a list of them (e.g. ['z', 'q'])")
    if not sites:
        raise ValueError("sites is empty: give at least one site (e.g. sites=['z'])")
    for name, flag in (("per_position", per_position), ("qk_fix", qk_fix), ("grad_drop", grad_drop)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name}={flag!r} is not valid; give True or False")
    if grad_drop and model.cfg.n_layers < 2:
        raise ValueError(
            "grad_drop=True needs a model of at least 2 layers: GradDrop averages the estimates with the gradient "
            "dropped through each layer other than a node's own, and a 1-layer model has none (its scores would "
            "all be 0); use grad_drop=False"
        )
    if qk_fix and any(s in ("q", "k") for s in sites):
        from ..models.hooks import attached_hooks

        bypassed = [h for h in attached_hooks(model) if ".hook_attn_scores " in h or ".hook_pattern " in h]
        if bypassed:
            warnings.warn(
                f"qk_fix=True recomputes attention patterns from the queries and keys without the functions "
                f"attached at {bypassed[:4]}: the q and k estimates leave them out (qk_fix=False keeps them)",
                stacklevel=2,
            )
    kw = dict(sites=sites, direction=direction, per_position=per_position, qk_fix=qk_fix, grad_drop=grad_drop)
    check_batch_limits(max_batch, max_memory)
    # weights used for many rows (GradDrop's backward passes) may be packed for oneDNN: one copy of the weights,
    # within max_memory when it is given
    packs = block_weight_bytes(model) if max_memory is None else pack_budget(model, max_memory)
    B, T = check_tokens(clean_tokens, "clean_tokens", model.cfg.d_vocab).shape
    keep = patching_mask(attention_mask, (B, T))
    warn_if_no_op("attribution_patching", clean_tokens, corrupted_tokens, corruption, metric, keep)
    corruption = mean_with_mask(corruption, keep)
    if keep is not None:
        check_positions_real(keep, metric_positions(metric, B, T))
        kw["keep"] = None if bool(keep.all()) else keep  # a mask of ones runs as none
    budget = None if max_memory is None else max_memory - packs
    batch, per = _atp_batch(model, T, metric, max_batch, budget, grad_drop, kw)
    memory = {"max_batch": min(batch, B), "memory_estimate": min(batch, B) * per}
    if B > batch:
        limit = "max_batch" if budget is None or batch == max_batch else "max_memory"
        with model.fixed_weights(max_pack_bytes=packs):
            out = _atp_in_parts(
                model, clean_tokens, corrupted_tokens, metric, corruption, batch, kw, limit=limit
            )
    else:
        with model.fixed_weights(max_pack_bytes=packs):
            out = _atp(model, clean_tokens, corrupted_tokens, metric=metric, corruption=corruption, **kw)
    for r in out.values():
        r.info.update(memory)
        r.info["attention_mask"] = keep is not None
    _check_corrupted_run(out)
    _warn_if_no_gradient(out, direction, metric)
    return out


def _check_corrupted_run(out: dict) -> None:
    """Name the examples whose metric is not finite on the corrupted run of ``out`` (site -> PatchResult; the
    examples of every part of a split batch, by their index in the whole batch), and refuse a run on which no
    example is finite on both the clean and the corrupted run, as exact patching does. Nothing to check without
    a corrupted run (zero and mean ablation)."""
    first = next(iter(out.values()))
    if first.corrupted is not None:
        check_finite_examples(first.clean, first.corrupted, "the corrupted run")


def _warn_if_no_gradient(out: dict, direction: str, metric) -> None:
    """Warn when the estimates of ``out`` (site -> PatchResult) say nothing: with KL when noising (a divergence
    from the clean run has gradient 0 at the clean run, the base run: every estimate is 0, whatever the
    corruption), and with any metric when every estimate is at rounding level while the clean and corrupted runs'
    metrics differ (the metric's gradient vanishes at the base run, or the sites asked for carry none of the
    change). Without a corrupted run (zero and mean ablation) only the first is told."""
    first = next(iter(out.values()))
    if not first.clean.is_floating_point():
        return
    if isinstance(metric, KL) and direction == "noising":
        why = "KL from the clean run has gradient 0 at the clean run, the base run when noising"
        warnings.warn(
            f"attribution_patching: {why}, so every first-order estimate is 0 and says nothing about the cells; "
            "use exact patching (activation_patching), direction='denoising', or a metric with a gradient there "
            "(LogitDiff)",
            RuntimeWarning,
            stacklevel=3,
        )
        return
    if first.corrupted is None:
        return
    peak = max((float(r.effect.abs().max()) for r in out.values() if r.effect.numel()), default=0.0)
    size = max(float(first.clean.abs().max()), float(first.corrupted.abs().max()))
    change = float((first.clean - first.corrupted).abs().max())
    if first_order_says_nothing(peak, size, change, first_order_tol(first.clean.dtype)):
        base = "corrupted" if direction == "denoising" else "clean"
        warnings.warn(
            f"attribution_patching: every estimate is at rounding level (the largest |effect| is {peak:.2g}, while "
            f"the clean and corrupted runs' metrics differ by up to {change:.3g}): the metric's gradient vanishes at "
            f"the {base} run, or the sites asked for carry none of the change; first-order estimates cannot tell "
            "which: use exact patching (activation_patching) to see",
            RuntimeWarning,
            stacklevel=3,
        )


def _site_width(cfg, site: str, seq_len: int) -> int:
    """Items per example and position of ``site``'s activation."""
    if site in ("z", "q"):
        return cfg.n_heads * cfg.d_head
    if site in ("k", "v"):
        return cfg.n_key_value_heads * cfg.d_head
    if site == "pattern":
        return cfg.n_heads * seq_len
    return cfg.d_model


#: the sites :func:`atp_prompt_bytes` counts when none are named
_ALL_SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z", "q", "k", "v", "pattern")


def atp_prompt_bytes(
    model, seq_len: int, metric, grad_drop: bool = False, sites=None, qk_fix: bool | None = None
) -> int:
    """Memory that one prompt of ``seq_len`` positions adds to :func:`attribution_patching`'s forwards and
    backward, an estimate (an upper bound). Per layer and position, in the model's item size:

    - what the target run keeps for the backward: the residual, its norms and the branches' outputs
      (``8 d_model``), q/k/v/z and the rotated queries and keys (``5 n_heads d_head``, and ``2 (n_heads +
      n_key_value_heads) d_head`` with rotary positions; keys and values repeated over the query heads under
      grouped-query attention), the MLP's activations (``2 d_mlp``, ``4 d_mlp`` when gated) and the scores and
      pattern (``2 n_heads seq_len``), and as much again for one layer (the backward's gradients of a layer);
    - for each site in ``sites`` (default every site), the source run's activation and the gradient there (with
      ``grad_drop`` one more gradient); with ``qk_fix`` (default: ``grad_drop``) and a ``q`` or ``k`` site, the
      recomputed scores and pattern (``2 n_heads seq_len``);

    and at the metric position, the logits over the vocabulary of the clean, corrupted and target runs and their
    gradient, and the metric's temporaries three times (its forward's, those its backward keeps and the
    backward's own; :func:`~pypattern.patching.engine.metric_row_bytes`). Against the peak of the tensors a call
    makes, measured op by op on small models (GPT-2-, NeoX- and Llama-shaped, every site, AtP and AtP*), it is
    1.2-2x the increase per prompt (``tests/test_patching_audit_memory.py``)."""
    from .engine import metric_row_bytes

    cfg = model.cfg
    dtype = next(model.parameters()).dtype
    own = dtype.itemsize
    item = max(own, 4)  # a 16-bit model's metric is computed in float32
    d, H, Hkv, dh, T = cfg.d_model, cfg.n_heads, cfg.n_key_value_heads, cfg.d_head, int(seq_len)
    mlp = 0 if cfg.attn_only else (4 if cfg.gated_mlp else 2) * cfg.d_mlp
    per_row = 8 * d + 5 * H * dh + mlp + 2 * H * T
    if cfg.rotary:
        per_row += 2 * (H + Hkv) * dh
    if Hkv < H:  # the keys and values repeated over the query heads of their group
        per_row += 2 * (H - Hkv) * dh
    sites = _ALL_SITES if sites is None else [sites] if isinstance(sites, str) else list(sites)
    qk_fix = grad_drop if qk_fix is None else qk_fix
    per_row += (3 if grad_drop else 2) * sum(_site_width(cfg, s, T) for s in sites)
    if qk_fix and any(s in ("q", "k") for s in sites):
        per_row += 2 * H * T
    acts = (cfg.n_layers + 1) * T * per_row * own  # and one layer's gradients at once in the backward
    device = next(model.parameters()).device
    one = metric.select(slice(0, 1)) if isinstance(metric, Metric) else metric
    if isinstance(
        one, KL
    ):  # counted bound to a clean row, as the runs bind it (a copy: the metric is untouched)
        one.bind(torch.zeros(1, cfg.d_vocab, dtype=dtype, device=device))
    x = torch.zeros(1, cfg.d_model, dtype=dtype, device=device)
    return int(acts + 4 * cfg.d_vocab * item + 3 * metric_row_bytes(model, x, one))


def _atp_batch(
    model, seq_len: int, metric, max_batch, max_memory, grad_drop: bool, kw=None
) -> tuple[int, int]:
    """Prompts per forward and backward of :func:`attribution_patching` and :func:`atp_prompt_bytes` of one:
    ``max_batch`` (checked), lowered so that that many prompts stay within ``max_memory`` bytes (at least 1,
    with a ``RuntimeWarning`` when not even one does); no bound is a huge count."""
    kw = kw or {}
    per = atp_prompt_bytes(model, seq_len, metric, grad_drop, kw.get("sites"), kw.get("qk_fix"))
    batch = 2**62 if max_batch is None else int(max_batch)
    if max_memory is not None:
        fit = int(max_memory // per)
        if fit < 1:
            from .._memory import warn_budget_too_small

            warn_budget_too_small("max_memory", max_memory, per, "one prompt of attribution patching", 3)
        batch = min(batch, max(1, fit))
    return batch, per


def _atp_in_parts(
    model,
    clean_tokens,
    corrupted_tokens,
    metric,
    corruption,
    max_batch: int,
    kw: dict,
    limit: str = "max_batch",
) -> dict:
    """:func:`attribution_patching` over consecutive parts of at most ``max_batch`` prompts (``clean_tokens``
    already checked; ``kw["keep"]``, the attention mask, split with them), joined; ``limit`` names the argument
    that made the parts."""
    import dataclasses

    if not isinstance(metric, Metric):
        raise ValueError(
            f"{limit} needs a Metric (LogitDiff, Prob, LogProb, KL), whose per-example answers are split with "
            f"the prompts; got metric of type {type(metric).__name__} (give {limit}=None)"
        )
    cfg = model.cfg
    corruption = resolve_corruption(corrupted_tokens, corruption)
    B, T = clean_tokens.shape
    check_corruption_tokens(corruption, cfg.d_vocab, (B, T))
    metric_positions(metric, B, T)
    split = ("position", *metric.per_example)
    # a per-example tensor the metric does not declare would not be split
    for name, v in vars(metric).items():
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == B and name not in split:
            raise ValueError(
                f"metric.{name} has {B} entries, one per prompt: list it in {type(metric).__name__}.per_example "
                f"so that {limit} splits it with the prompts, or give {limit}=None"
            )
    noise = None
    if isinstance(corruption, GaussianNoise):  # drawn once for all the prompts, as a single pass draws it
        noise = corruption.noise(model, B, T, cfg.d_model, next(model.parameters()).dtype)
    if isinstance(corruption, MeanAblation):  # the mean over all the reference prompts, computed once
        corruption = _Means(_mean_activations(model, corruption, clean_tokens, max_batch, kw))
    parts = []
    for s in range(0, B, max_batch):
        idx = slice(s, min(s + max_batch, B))
        if isinstance(corruption, TokenReplacement):
            part = TokenReplacement(corruption.corrupted_tokens[idx])
        elif noise is not None:
            part = _FixedNoise(fixed=noise[idx])
        else:
            part = corruption
        keep = kw.get("keep")
        kw_part = {**kw, "keep": None if keep is None else keep[idx]}
        parts.append(
            _atp(model, clean_tokens[idx], None, metric=metric.select(idx), corruption=part, **kw_part)
        )
    out = {}
    for site, first in parts[0].items():
        rs = [p[site] for p in parts]
        info = dict(first.info)
        if "graddrop" in info:
            info["graddrop"] = torch.cat([r.info["graddrop"] for r in rs])
        out[site] = dataclasses.replace(
            first,
            values=torch.cat([r.values for r in rs]),
            clean=torch.cat([r.clean for r in rs]),
            corrupted=None if first.corrupted is None else torch.cat([r.corrupted for r in rs]),
            info=info,
        )
    return out


@torch.no_grad()
def _mean_activations(model, corruption, clean_tokens, max_batch: int, kw: dict) -> dict[str, torch.Tensor]:
    """Mean ablation's source activations: each hook of :func:`_source_names` averaged over the reference prompts
    (``corruption.reference_tokens``, or the clean prompts), run in parts of at most ``max_batch``: ``(1, ...)``."""
    # reference prompts given on another device than the clean ones: run where the model is (as the clean ones)
    ref = (
        clean_tokens
        if corruption.reference_tokens is None
        else corruption.reference_tokens.to(clean_tokens.device)
    )
    names = _source_names(model.cfg, kw["sites"], kw["qk_fix"])
    mask = _mean_mask(corruption, ref)
    # under a right-padded attention mask the clean prompts' real tokens are those of the masked forward (no real
    # token reads the later padding), and the mask leaves the padding out of the mean
    # given a mask, the mean over the prompts real at each position: each part's masked mean, weighted
    if mask is not None:
        counts = mask.sum(0)  # (pos,) the real prompts at each position
    sums: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    part: list = [None]

    def add(x, hook):
        dtypes[hook.name] = x.dtype
        if mask is None:
            s = x.sum(0, keepdim=True)
        else:  # the part's masked mean times its real prompts per position (0 where none is)
            m = mask[part[0]]
            pd = position_axis(hook.name)
            w = m.sum(0).to(device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
            shape = [1] * x.dim()
            shape[pd] = w.shape[0]
            s = masked_mean(x, m, 0, pd).to(w.dtype) * w.view(shape)
        sums[hook.name] = s if hook.name not in sums else sums[hook.name] + s

    # prompts wider than the learned positions run under the ablation's mask (each row's real tokens at 0 .. n-1)
    ref_kw = reference_masking(model, corruption, model.cfg.max_positions, ref.device, ref)
    for s in range(0, ref.shape[0], max_batch):
        part[0] = slice(s, s + max_batch)
        with model.hooks([(lambda n: n in names, add)]):
            model(ref[s : s + max_batch], return_type=None, **{k: v[part[0]] for k, v in ref_kw.items()})
    if mask is None:
        return {n: t / ref.shape[0] for n, t in sums.items()}
    out = {}
    for n, t in sums.items():
        shape = [1] * t.dim()
        shape[position_axis(n)] = counts.shape[0]
        c = counts.to(device=t.device, dtype=t.dtype).clamp(min=1).view(shape)
        out[n] = (t / c).to(dtypes[n])
    return out


def _mean_mask(corruption, ref: torch.Tensor) -> torch.Tensor | None:
    """A :class:`MeanAblation`'s mask ``(batch, pos)`` bool of the reference prompts ``ref`` on their device, or
    None (every prompt counts)."""
    mask = getattr(corruption, "attention_mask", None)
    return None if mask is None else mask.to(ref.device)


class _Means(MeanAblation):
    """Mean ablation with its means already computed (``means``: hook name -> ``(1, ...)``)."""

    def __init__(self, means: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.means = means


class _FixedNoise(GaussianNoise):
    """Gaussian noise already drawn: ``noise()`` returns ``fixed`` (a part of the prompts of a larger draw)."""

    def __init__(self, fixed: torch.Tensor) -> None:
        super().__init__()
        self.fixed = fixed

    def noise(self, model, batch: int, seq_len: int, d_model: int, dtype: torch.dtype) -> torch.Tensor:
        return self.fixed.to(dtype)


def _atp(
    model,
    clean_tokens: torch.Tensor,
    corrupted_tokens: torch.Tensor | None = None,
    *,
    metric: Metric,
    sites,
    corruption: Corruption | None,
    direction: str,
    per_position: bool,
    qk_fix: bool,
    grad_drop: bool,
    keep: torch.Tensor | None = None,
) -> dict[str, PatchResult]:
    """:func:`attribution_patching` in one pass over all the prompts; ``keep``: the attention mask (bool ``(batch,
    pos)``, checked) or None."""
    cfg = model.cfg
    sites = [sites] if isinstance(sites, str) else list(sites)
    for s in sites:
        check_site(cfg, s, "sites entry")
    if direction not in ("denoising", "noising"):
        raise ValueError(f"direction={direction!r} is not valid; choose 'denoising' or 'noising'")
    corruption = resolve_corruption(corrupted_tokens, corruption)
    # under a mask with padding the learned positions bound each row's real tokens, not the columns
    check_tokens(clean_tokens, "clean_tokens", cfg.d_vocab, n_ctx=cfg.max_positions if keep is None else None)
    check_real_length(keep, cfg.max_positions, clean_tokens.shape[1])
    check_corruption_tokens(corruption, cfg.d_vocab, tuple(clean_tokens.shape))
    if corruption.is_ablation and direction != "noising":
        raise ValueError(
            f"{type(corruption).__name__} replaces activations of the clean run: use direction='noising'"
        )
    L, B, T = cfg.n_layers, *clean_tokens.shape
    # prompts run where the model is (kept on the CPU with a model on a GPU)
    clean_tokens = clean_tokens.to(next(model.parameters()).device)
    pos = metric_positions(metric, B, T)
    check_positions_real(keep, pos)
    masking = masking_kwargs(model, keep, clean_tokens.device)
    noise = None
    if isinstance(corruption, GaussianNoise):
        noise = corruption.noise(model, B, T, cfg.d_model, next(model.parameters()).dtype)
    corr_tokens = (
        corruption.corrupted_tokens.to(clean_tokens.device)
        if isinstance(corruption, TokenReplacement)
        else clean_tokens
    )
    need_qk = qk_fix and any(s in ("q", "k") for s in sites)
    names = _source_names(cfg, sites, qk_fix)
    grad_names = {hook_name(s, layer) for s in sites for layer in range(L)}
    if need_qk:
        grad_names |= {hook_name("pattern", layer) for layer in range(L) if "q" in sites or "k" in sites}
    # GradDrop starts the backward of layer l's pass at layer l's input, with the full gradient after layer l
    resid = (
        {hook_name(s, layer) for s in ("resid_pre", "resid_post") for layer in range(L)}
        if grad_drop
        else set()
    )
    tnames = names | resid
    # functions attached to the model may change the residual stream inside a layer (a hook at resid_mid or
    # resid_post, on the activation or its gradient): then the residual gradient after layer l does not reach layer
    # l's input unchanged, and each GradDrop pass is a backward from the metric with the gradient zeroed at layer
    # l's attn_out and mlp_out (``drop`` names the layer whose gradient is zeroed)
    from ..models.hooks import attached_hooks

    gated = grad_drop and bool(attached_hooks(model))
    drop: list[int | None] = [None]
    gate_names = {hook_name(s, layer) for s in ("attn_out", "mlp_out") for layer in range(L)}

    def gate(x, hook):
        if not x.requires_grad:
            return x
        layer = _layer_of(hook.name)
        y = x.view_as(x)
        y.register_hook(lambda g: torch.zeros_like(g) if drop[0] == layer else g)
        return y

    def cache_run(tokens, nz, rows: bool = True):
        """``(final rows at the metric position (B, d_model), cache of names)``, without gradients; ``rows=False``
        (reference prompts of another batch, whose metric positions are not the clean batch's): no rows."""
        cache = {}
        hooks = [("hook_embed", embedding_noise_hook(nz))] if nz is not None else []
        hooks.append((lambda n: n in names, lambda x, hook: cache.__setitem__(hook.name, x.detach())))
        with torch.no_grad(), model.hooks(hooks):
            if not rows:  # the reference prompts: under their own mask when wider than the learned positions
                model(
                    tokens,
                    return_type=None,
                    **reference_masking(model, corruption, cfg.max_positions, tokens.device),
                )
                return None, cache
            return _final_rows(model, tokens, pos, masking), cache

    # forward 1: the source run (no gradient): the clean run (denoising) or the corrupted one (noising with
    # corrupted tokens or noise; ablations have none). Its rows are unembedded with the target's, after forward 2.
    src_rows = None
    if direction == "denoising":
        src_rows, src_cache = cache_run(clean_tokens, None)
        tgt_tokens, tgt_noise = corr_tokens, noise
    else:
        if not isinstance(corruption, (ZeroAblation, MeanAblation)):
            src_rows, src_cache = cache_run(corr_tokens, noise)
        tgt_tokens, tgt_noise = clean_tokens, None
    # forward 2: the target run with gradients at every site
    captured: dict[str, torch.Tensor] = {}
    capture = _capturing(captured)
    hooks = [(lambda n: n in tnames, capture)]
    if gated:  # after the capture: a captured attn_out or mlp_out is the gated tensor's input
        hooks.append((lambda n: n in gate_names, gate))
    if tgt_noise is not None:
        hooks.insert(0, ("hook_embed", embedding_noise_hook(tgt_noise)))
    with torch.enable_grad():
        with frozen_parameters(model):  # as the caller had them afterwards (a frozen parameter stays frozen)
            emb_req = [("hook_embed", lambda x, hook: x.detach().requires_grad_(True))]
            with model.hooks(emb_req + hooks):
                rows = _final_rows(model, tgt_tokens, pos, masking)
            # a metric that reads a few logit columns (LogitDiff) and binds to nothing is computed from them
            vals = None
            if isinstance(metric, Metric) and type(metric).bind is Metric.bind:
                vals = metric.of_rows(model, torch.stack([rows if src_rows is None else src_rows, rows]))
            if vals is None:
                if src_rows is None:
                    (logits,) = _unembed_together(model, rows)  # (B, vocab) at the metric position
                else:
                    src_logits, logits = _unembed_together(model, src_rows, rows)
                    src_logits = src_logits.detach()
        if vals is not None:  # (source run, target run)
            m_tgt_full = vals[1]
            clean_vals = vals[0] if direction == "denoising" else m_tgt_full
            m_clean = check_metric_output(clean_vals.detach(), B)
        else:
            clean_logits = src_logits if direction == "denoising" else logits.detach()
            m_clean, m_tgt_full = _metric_of_runs(metric, clean_logits, logits, B)
        _require_gradient(m_tgt_full)
        m_tgt = m_tgt_full.detach()
        gnames = sorted(grad_names)
        post = [hook_name("resid_post", layer) for layer in range(L)] if grad_drop else []
        wanted = gnames + [n for n in post if n not in grad_names]
        gs = torch.autograd.grad(
            m_tgt_full.sum(), [captured[n] for n in wanted], retain_graph=grad_drop, allow_unused=True
        )
        full = {n: (g if g is not None else torch.zeros_like(captured[n])) for n, g in zip(wanted, gs)}
        grads_per_pass = [{n: full[n] for n in gnames}]
        zeros: dict = {}
        for layer in range(L) if grad_drop else []:
            if not gated:
                grads_per_pass.append(_drop_pass(layer, gnames, full, captured, zeros))
                continue
            drop[0] = layer
            gs = torch.autograd.grad(
                m_tgt_full.sum(), [captured[n] for n in gnames], retain_graph=layer < L - 1, allow_unused=True
            )
            grads_per_pass.append(
                {n: (g if g is not None else torch.zeros_like(captured[n])) for n, g in zip(gnames, gs)}
            )
        drop[0] = None
    tgt_cache = {n: x.detach() for n, x in captured.items()}
    m_corr = None
    if direction == "noising":
        if isinstance(corruption, ZeroAblation):
            src_cache = {n: torch.zeros_like(tgt_cache[n]) for n in names}
        elif isinstance(corruption, MeanAblation):
            means = getattr(corruption, "means", None)  # given by _atp_in_parts
            if means is None:
                ref = tgt_cache
                if corruption.reference_tokens is not None:
                    _, ref = cache_run(corruption.reference_tokens, None, rows=False)
                # over the prompts real at each position, given the ablation's mask
                mask = getattr(corruption, "attention_mask", None)
                means = {n: masked_mean(ref[n], mask, 0, position_axis(n)) for n in names}
            src_cache = {n: means[n].expand_as(tgt_cache[n]) for n in names}
        else:  # the corrupted run (forward 1 of noising)
            m_corr = (vals[0] if vals is not None else metric(src_logits)).detach()
    else:
        m_corr = m_tgt
    out = {}
    for site in sites:
        _, axes, coords, shape = make_cells(site, L, site_heads(cfg, site), T, per_position)
        by_pass: list[list[torch.Tensor]] = [[] for _ in grads_per_pass]
        for layer in range(L):  # the passes of a layer share the QK fix's softmax terms
            n = hook_name(site, layer)
            fixed: dict = {}
            diff = None
            same = None  # the QK fix: (B, heads[, T]) where the source equals the target
            # GradDrop's passes hand the same gradient tensor to the layers they leave alone (and one zero
            # tensor to the dropped layer): a score is computed once per gradient tensor
            done: dict[int, torch.Tensor] = {}
            fixes = qk_fix and site in ("q", "k")
            pn = hook_name("pattern", layer)  # the QK fix reads the gradient at the pattern
            for k, grads in enumerate(grads_per_pass):
                g = grads[pn if fixes else n]
                if id(g) in done:
                    by_pass[k].append(done[id(g)])
                    continue
                if fixes:
                    qn, kn = _scored("q", layer, cfg), _scored("k", layer, cfg)
                    est = _qk_fixed(
                        site,
                        model.blocks[layer].attn,
                        tgt_cache[qn],
                        tgt_cache[kn],
                        src_cache[qn],
                        src_cache[kn],
                        tgt_cache[pn],
                        g,
                        per_position,
                        cache=fixed,
                        masking=masking,
                    )
                    # the softmax recomputed for an unchanged query or key is the target's pattern to rounding
                    # only: where the patch writes what the target holds, the estimate is 0, exactly
                    if same is None:
                        same = ~changed_at(src_cache[n], tgt_cache[n], site).transpose(1, 2)  # (B, heads, T)
                        same = same if per_position else same.all(-1)
                    est = est.masked_fill(same, 0.0)
                else:
                    if diff is None:  # the activation's change, once per layer (a 16-bit one in float32)
                        diff = _wide(src_cache[n]) - _wide(tgt_cache[n])
                    est = _reduce(site, diff * _wide(g), per_position)
                done[id(g)] = est
                by_pass[k].append(est)
        per_pass = [torch.stack(layers_est, 1) for layers_est in by_pass]  # each (B, L, ...)
        est = per_pass[0]
        values = m_tgt.view(-1, *([1] * (est.dim() - 1))) + est
        info = {"per_position": per_position}
        if grad_drop:
            # the mean over the passes that can move the node: a component's own layer's pass gives it no gradient
            # (L - 1 passes); a residual-stream node gets one from every pass (L)
            passes = L if site in ("resid_pre", "resid_mid", "resid_post") else max(L - 1, 1)
            info["graddrop"] = torch.stack([p.abs() for p in per_pass[1:]]).sum(0) / passes
        out[site] = PatchResult(
            values=values.detach(),
            clean=m_clean,
            corrupted=m_corr,
            axes=axes,
            coords=coords,
            site=site,
            direction=direction,
            metric=result_name(metric),
            method="atp*" if (qk_fix or grad_drop) else "atp",
            info=info,
        )
    return out


def _capturing(captured: dict):
    """A hook function keeping each activation it sees in ``captured`` (by hook name), for the gradient there: one
    that does not require a gradient (the first site of a forward under frozen parameters) becomes a leaf that
    does, so the later sites depend on it."""

    def capture(x, hook):
        if not x.requires_grad:
            x = x.detach().requires_grad_(True)
        captured[hook.name] = x
        return x

    return capture


def _metric_of_runs(metric, clean_logits: torch.Tensor, logits: torch.Tensor, batch: int):
    """``(metric of the clean run (detached), metric of the target run (with its gradient))``: the metric binds
    to the clean run's logits (at the metric position) before it reads any run, and is refused when it couples
    the examples (or the runs), which would hand the backward the gradient of its sum."""
    bind_metric(metric, clean_logits)
    m_clean = metric_on(metric, clean_logits, batch).detach()
    check_metric_on_stacks(metric, clean_logits.detach(), m_clean, per_example=True)
    return m_clean, metric(logits)


def _require_gradient(values: torch.Tensor) -> None:
    """Refuse metric values without a gradient (a detached metric, an accuracy): AtP differentiates them."""
    if not values.requires_grad:
        raise ValueError(
            f"metric returned values without a gradient ({values.dtype}: detached, or an accuracy); "
            "attribution patching differentiates the metric: give a differentiable one, or use "
            "activation_patching for exact effects"
        )


def _atp_hooked(
    model,
    clean_tokens: torch.Tensor,
    corrupted_tokens: torch.Tensor | None,
    *,
    metric,
    sites,
    corruption,
    direction: str,
    per_position: bool,
    qk_fix: bool,
    grad_drop: bool,
    attention_mask,
    max_batch=None,
    max_memory=None,
) -> dict[str, PatchResult]:
    """:func:`attribution_patching` on a model with hook points (a :class:`~pypattern.models.HookedModule`, such
    as :func:`~pypattern.models.hooked_hf`'s adapter of a family :func:`~pypattern.from_hf` does not convert), at
    the sites it has hook points for (``resid_pre``, ``resid_post``, ``attn_out``, ...): one source forward, one
    target forward and one backward, the estimate of a cell ``(a_source - a_target) . dm/da`` at the target run.
    Corrupted prompts only (no ablation, no Gaussian noise), no attention mask with padding, no ``qk_fix`` /
    ``grad_drop`` / ``max_memory`` (refused by name); ``max_batch`` splits the prompts into parts that run one
    after another (:func:`_atp_hooked_pass`), joined: the estimates are per example, so the result is that of
    one pass."""
    from .._checks import model_device
    from ..losses import position_limit
    from .api import _generic_note, _layers, _vocab

    what = f"attribution_patching on {type(model).__name__} (a model with hook points, not pypattern's Transformer)"
    for name, flag in (("qk_fix", qk_fix), ("grad_drop", grad_drop)):
        if flag:
            raise ValueError(
                f"{name}=True needs pypattern's Transformer; {what} computes plain AtP: leave it out"
            )
    if attention_mask is not None and not bool(torch.as_tensor(attention_mask).bool().all()):
        raise ValueError(
            f"attention_mask: {what} runs prompts of one length without a mask (padding is not masked); give "
            "unpadded prompts"
        )
    check_batch_limits(max_batch, max_memory)
    if max_memory is not None:
        raise ValueError(
            f"max_memory={max_memory!r}: {what} has no estimate of its memory; bound the prompts per forward "
            "and backward with max_batch instead (and give max_memory=None)"
        )
    if direction not in ("denoising", "noising"):
        raise ValueError(f"direction={direction!r} is not valid; choose 'denoising' or 'noising'")
    corruption = resolve_corruption(corrupted_tokens, corruption)
    if not isinstance(corruption, TokenReplacement):
        raise ValueError(
            f"corruption={type(corruption).__name__}: {what} patches from corrupted prompts only; give "
            "corrupted_tokens"
        )
    L = _layers(model)
    if sites is DEFAULT_SITES:  # those of the defaults the model has hook points for
        sites = [s for s in DEFAULT_SITES if hook_name(s, 0) in model.hook_dict]
    elif isinstance(sites, str):
        sites = [sites]
    elif isinstance(sites, list | tuple) and all(isinstance(s, str) for s in sites):
        sites = list(sites)
    else:
        raise TypeError(
            f"sites={sites!r} is not valid; give a site name or a list of them (e.g. ['resid_pre'])"
        )
    if not sites:
        raise ValueError("sites is empty: give at least one site (e.g. sites=['resid_pre'])")
    for s in sites:
        check_site(None, s, "sites entry")
    vocab = _vocab(model)
    B, T = check_tokens(clean_tokens, "clean_tokens", vocab, n_ctx=position_limit(model)).shape
    check_corruption_tokens(corruption, vocab, (B, T))
    for site in sites:
        missing = [
            hook_name(site, layer) for layer in range(L) if hook_name(site, layer) not in model.hook_dict
        ]
        if site in HEAD_SITES or missing:
            note = _generic_note(model)
            raise ValueError(
                f"sites entry {site!r}: {what} has no hook point "
                f"{missing[0] if missing else hook_name(site, 0)!r}" + (f" ({note})" if note else "")
            )
    if (max_batch is not None and B > max_batch) and not isinstance(metric, Metric):
        raise ValueError(
            "max_batch needs a Metric (LogitDiff, Prob, LogProb, KL), whose per-example answers are split with "
            f"the prompts; got metric of type {type(metric).__name__} (give max_batch=None)"
        )
    metric_positions(metric, B, T)  # the metric's positions fit the prompts (the parts read their own)
    step = B if max_batch is None else int(max_batch)
    dev = model_device(model, clean_tokens.device)
    site_of = {hook_name(s, layer): s for s in sites for layer in range(L)}  # hook name -> its site
    passes = []  # per part of at most max_batch prompts: (m_clean, m_corr, {hook name: estimate})
    for i in range(0, B, step):
        part = slice(i, min(i + step, B))
        met = metric if step >= B else metric.select(part)
        clean, corr = clean_tokens[part].to(dev), corruption.corrupted_tokens[part].to(dev)
        src, tgt = (clean, corr) if direction == "denoising" else (corr, clean)
        passes.append(_atp_hooked_pass(model, src, tgt, met, site_of, direction, per_position))
    m_clean = torch.cat([p[0] for p in passes])
    m_corr = torch.cat([p[1] for p in passes])
    m_tgt = m_corr if direction == "denoising" else m_clean
    out = {}
    for site in sites:
        _, axes, coords, _ = make_cells(site, L, 0, T, per_position)
        est = torch.stack(
            [torch.cat([p[2][hook_name(site, layer)] for p in passes]) for layer in range(L)], 1
        )
        out[site] = PatchResult(
            values=m_tgt.view(-1, *([1] * (est.dim() - 1))) + est,  # est: (B, L[, T])
            clean=m_clean,
            corrupted=m_corr,
            axes=axes,
            coords=coords,
            site=site,
            direction=direction,
            metric=result_name(metric),
            method="atp",
            info={"per_position": per_position, "hooked": True, "max_batch": min(step, B)},
        )
    _check_corrupted_run(out)
    _warn_if_no_gradient(out, direction, metric)
    return out


def _atp_hooked_pass(model, src, tgt, metric, site_of: dict, direction: str, per_position: bool):
    """One source forward, one target forward and one backward of :func:`_atp_hooked` over prompts ``src`` /
    ``tgt`` (checked, where the model is), at the hook points ``site_of`` names (hook name -> site): ``(clean
    run's metric, corrupted run's metric, {hook name: estimate (batch[, pos])})``, all detached."""
    from ..losses import read_logits

    pos = metric_positions(metric, *src.shape)

    def at_pos(tokens):
        return logits_at(read_logits(model(tokens)), pos)

    names = site_of.keys()
    src_cache: dict[str, torch.Tensor] = {}
    with (
        torch.no_grad(),
        model.hooks([(lambda n: n in names, lambda x, hook: src_cache.__setitem__(hook.name, x.detach()))]),
    ):
        src_logits = at_pos(src)
    captured: dict[str, torch.Tensor] = {}
    with (
        torch.enable_grad(),
        frozen_parameters(model),
        model.hooks([(lambda n: n in names, _capturing(captured))]),
    ):
        logits = at_pos(tgt)
        clean_logits = src_logits if direction == "denoising" else logits.detach()
        m_clean, m_tgt_full = _metric_of_runs(metric, clean_logits, logits, src.shape[0])
        _require_gradient(m_tgt_full)
        wanted = sorted(names)
        gs = torch.autograd.grad(m_tgt_full.sum(), [captured[n] for n in wanted], allow_unused=True)
    m_tgt = m_tgt_full.detach()
    m_corr = m_tgt if direction == "denoising" else metric(src_logits).detach()
    est = {}
    for n, g in zip(wanted, gs):
        g = g if g is not None else torch.zeros_like(captured[n])
        diff = _wide(src_cache[n]) - _wide(captured[n].detach())
        est[n] = _reduce(site_of[n], diff * _wide(g), per_position).detach()
    return m_clean, m_corr, est


class _ExactStageMemory(int):
    """:func:`shortlist_and_confirm`'s default ``max_memory`` (``2**30`` bytes), told apart from a value the caller
    gives: the default bounds the exact stage only, a given value both stages."""

    def __repr__(self) -> str:
        return "2**30"


_EXACT_STAGE_MEMORY = _ExactStageMemory(2**30)


def shortlist_and_confirm(
    model,
    site: str,
    clean_tokens: torch.Tensor,
    corrupted_tokens: torch.Tensor | None = None,
    *,
    metric: Metric,
    k: int = 10,
    corruption: Corruption | None = None,
    direction: str = "denoising",
    per_position: bool = True,
    qk_fix: bool = True,
    grad_drop: bool = False,
    max_batch: int | None = None,
    max_memory: int | None = _EXACT_STAGE_MEMORY,
    attention_mask: torch.Tensor | None = None,
) -> list[dict]:
    """AtP over the whole grid of ``site``, then exact patching of the ``k`` cells whose AtP estimate, averaged
    over the examples, is largest in absolute value (with ``grad_drop``: whose mean GradDrop score is largest). Both means are over the examples whose metric is finite on
    the clean and the corrupted run (the others are named in a warning, as in
    :func:`~pypattern.patching.activation_patching`).

    Parameters
    ----------
    model, site, clean_tokens, metric
        As in :func:`~pypattern.patching.activation_patching` (``site`` one site name).
    corrupted_tokens, corruption, direction, per_position
        As in :func:`~pypattern.patching.activation_patching`, the same for both stages.
    k : int
        Cells confirmed by exact patching: the ``k`` ranked highest by AtP (every cell of the grid when it has
        fewer).
    qk_fix, grad_drop
        AtP* 's corrections (:func:`attribution_patching`) in the shortlisting stage. With ``grad_drop`` the cells
        are ranked by their GradDrop score averaged over the examples (``info["graddrop"]``, AtP*'s ranking),
        else by the absolute value of their mean AtP estimate.
    max_batch : int, optional
        Bounds the memory of both stages in their own units: prompts per forward and backward of AtP (then it needs
        a :class:`~pypattern.patching.metrics.Metric`, as there), cells per batch of the exact engine.
    max_memory : int, optional
        Bytes of working memory per batch of the exact stage, as in
        :func:`~pypattern.patching.activation_patching`, and, when given, per part of the AtP stage, as in
        :func:`attribution_patching` (then, when the prompts must be split to fit, it needs a
        :class:`~pypattern.patching.metrics.Metric`, as there). Left at its default (``2**30``), it bounds the
        exact stage only; ``None`` bounds neither.
    attention_mask : Tensor ``(batch, pos)``, optional
        The prompts' mask, as in :func:`~pypattern.patching.activation_patching` (or a tokenizer's output given
        as the prompts): both stages run every forward with it and each row's real tokens at positions
        ``0 .. n-1``.

    Returns
    -------
    list of dict
        ``{"layer", ["head",] ["pos",] ["graddrop",] "atp": mean estimated effect, "exact": mean exact effect}``
        sorted by ``|atp|``, or with ``grad_drop`` by ``graddrop``, the mean GradDrop score (effects on the raw
        metric scale: ``m_patched - m_target``; ``pos`` only per position; ties in grid order).
    """
    from ..models.convert import converted_if_convertible
    from .api import _exact_or_naive, _inert, _naive, engine_on_runs, prepare_runs, warn_if_over_budget

    if not is_count(k) or k < 1:
        raise ValueError(f"k={k!r} is not valid; give the number of cells to confirm, an int >= 1")
    k = int(k)
    check_batch_limits(max_batch, max_memory)
    # the default bounds the exact stage only (a plain callable metric keeps working unsplit); a given value both
    atp_memory = None if type(max_memory) is _ExactStageMemory else max_memory
    if type(max_memory) is _ExactStageMemory:
        max_memory = int(max_memory)
    warn_half_precision(model, "patching", "shortlist_and_confirm")
    clean_tokens, corrupted_tokens, attention_mask = read_prompts(
        clean_tokens, corrupted_tokens, attention_mask
    )
    clean_tokens, corrupted_tokens, corruption = long_token_args(clean_tokens, corrupted_tokens, corruption)
    model = converted_if_convertible(model)  # the exact stage needs pypattern's model too
    with half_precision_warned():  # warned above
        atp = attribution_patching(
            model, clean_tokens, corrupted_tokens, metric=metric, sites=[site], corruption=corruption,
            direction=direction, per_position=per_position, qk_fix=qk_fix, grad_drop=grad_drop,
            max_batch=max_batch, max_memory=atp_memory, attention_mask=attention_mask,
        )[site]  # fmt: skip
    # the mask as attribution_patching checked it (None for none); prepare_runs masks the exact stage's runs
    # where the engine must read it
    mask = None if attention_mask is None else patching_mask(attention_mask, tuple(clean_tokens.shape))
    keep = atp.finite_examples  # the examples finite on the clean and the corrupted run: those averaged
    m = atp._kept(atp.effect).mean(0)
    # the ranking score: |mean AtP| or, with GradDrop, AtP*'s mean GradDrop score (stable: ties in grid order)
    gd = atp._kept(atp.info["graddrop"]).mean(0) if grad_drop else None
    score = m.flatten().abs() if gd is None else gd.flatten()
    order = torch.argsort(score, descending=True, stable=True)[:k].tolist()
    cells, picked = [], []
    for i in order:
        ix = np.unravel_index(i, tuple(m.shape))
        c = {a: atp.coords[a][int(j)] for a, j in zip(atp.axes, ix)}
        if gd is not None:
            c = {**c, "graddrop": float(gd.flatten()[i])}
        cells.append(Cell(c["layer"], c.get("head", -1), c.get("pos", -1)))
        picked.append((c, float(m.flatten()[i])))
    site_hooks = sorted({hook_name(site, c.layer) for c in cells})
    if (
        _exact_or_naive(model, "auto", stacklevel=3) == "naive"
    ):  # hooks attached: one forward per cell runs them
        runs = prepare_runs(
            model, site_hooks, clean_tokens, corrupted_tokens, metric, corruption, direction, False, mask
        )
        inert, tgt = _inert(model, site, cells, runs, direction, causal=False)
        vals = (
            dict(zip(cells, set_inert(_naive(model, site, cells, runs, metric), inert, tgt))) if cells else {}
        )
    else:
        packs = pack_budget(model, max_memory)
        # one block for the recorded runs and the engine: the layouts (and packs) made once
        with model.fixed_weights(max_pack_bytes=packs):
            runs = prepare_runs(
                model, site_hooks, clean_tokens, corrupted_tokens, metric, corruption, direction, True, mask
            )
            T_eff = runs.metric_rows
            # where a cell's patch cannot change the metric (the target's own activation, out of its reach), its
            # value is the target's, exactly (computed, it is rounding noise)
            inert, tgt = _inert(model, site, cells, runs, direction, causal=True)
            live_at = [i for i, c in enumerate(cells) if c.pos < T_eff]
            live = [cells[i] for i in live_at]
            budget = max_memory if not packs else max_memory - packs
            batch = engine_batch(model.cfg, runs.B, T_eff, max_batch, budget)
            # the engine lowers the batch so that its logits (and the metric's temporaries) fit too
            eng = engine_on_runs(
                model, runs, site, metric, batch, packs, max_memory=None if max_memory is None else budget,
                warn_budget=False,
            )  # fmt: skip
            warn_if_over_budget(eng, max_memory, packs, stacklevel=2)
            vals = dict(zip(live, set_inert(eng.run(live), inert[live_at], tgt))) if live else {}
    out = []
    for c, (coord, a) in zip(cells, picked):
        exact = float((vals[c] - tgt)[keep.to(tgt.device)].mean().detach()) if c in vals else 0.0
        out.append({**coord, "atp": a, "exact": exact})
    return out
