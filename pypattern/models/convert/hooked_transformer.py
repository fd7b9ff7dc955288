"""TransformerLens ``HookedTransformer`` (TransformerLens 2.x and 3.x) -> pypattern ``Transformer``.

pypattern's model keeps TransformerLens' parameter and hook names, so a ``HookedTransformer`` maps over almost one
to one: its ``cfg`` gives the options, its parameters the weights (grouped-query attention's ``_W_K`` / ``_W_V`` /
``_b_K`` / ``_b_V`` are the key/value heads). The model is converted as it is, processed or not: after
``fold_ln`` its norms are ``LNPre`` / ``RMSPre`` and the converted model's are the same (``fold_ln`` leaves a
LayerNorm on the embedding, BLOOM's as ``from_pretrained`` loads it: the converted model's norms are then all
LayerNorms, the folded ones of weight 1 and bias 0, which compute the same values). TransformerLens' gated MLP
adds ``b_in`` after the product ``act(x W_gate) * (x W_in)``, where pypattern's adds it to ``x W_in``: such a model
converts when ``b_in`` is zero (every model TransformerLens loads from Hugging Face), else it is refused. Every
option TransformerLens has and pypattern does not reproduce exactly (shortformer or T5 positions, SoLU, a final
RMSNorm under LayerNorms, mixtures of experts, 16-bit models whose norms TransformerLens computes in float32, an
output vocabulary other than the input one, ...) is refused by name. Options that only add hook points
(``use_attn_result``, ``use_split_qkv_input``, ``use_attn_in``, ``use_hook_mlp_in``, ``use_hook_tokens``) convert
with a warning naming the hook points the converted model lacks. The hook points both models have hold the same
values (at real tokens of a padded batch too), except ``hook_normalized`` of a norm with a weight (``LN``, ``RMS``):
pypattern's is the norm's output, after its weight (and bias); TransformerLens' RMSNorm, and its LayerNorm from
3.x on, fire it before them (2.x's LayerNorm after), so that theirs times ``w`` (plus ``b``) is pypattern's. After
``fold_ln`` (``LNPre`` / ``RMSPre``) the two are the same. TransformerLens itself is never imported.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ._common import UnsupportedModelError, refuse

_NORMS = ("LN", "LNPre", "RMS", "RMSPre", None)

# options that add hook points pypattern's model does not have (the forward is the same): the hook points each adds
# ("N": every block)
_OPTIONAL_HOOKS = {
    "use_attn_result": ("blocks.N.attn.hook_result",),
    "use_split_qkv_input": ("blocks.N.hook_q_input", "blocks.N.hook_k_input", "blocks.N.hook_v_input"),
    "use_attn_in": ("blocks.N.hook_attn_in",),
    "use_hook_mlp_in": ("blocks.N.hook_mlp_in",),
    "use_hook_tokens": ("hook_tokens",),
}
_ACTS = ("gelu", "relu", "silu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh")


def is_hooked_transformer(model: Any) -> bool:
    """True for a TransformerLens ``HookedTransformer`` (or a subclass of it)."""
    return any(
        c.__name__ == "HookedTransformer" and (c.__module__ or "").startswith("transformer_lens")
        for c in type(model).__mro__
    )


def _get(c: Any, name: str, default: Any = None) -> Any:
    return getattr(c, name, default)


def _check_hooks(model: nn.Module) -> None:
    """Hooks attached to the model (``add_hook``, ``add_perma_hook``, torch's forward and backward hooks) would
    change its output or its gradients; the converted model would not have them."""
    for name, m in model.named_modules():
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
            raise UnsupportedModelError(
                f"the HookedTransformer has hooks attached at {name or 'the model'!r}: the converted model would "
                "not run them; remove them first (model.reset_hooks(including_permanent=True))"
            )


def _alibi_matches(n_heads: int, dtype: torch.dtype) -> None:
    """TransformerLens' ALiBi slopes (float32 ``start * start ** h``, ``start = 2 ** (-8 / n_heads)``) against
    pypattern's (BLOOM's float32 powers): equal bit for bit, or (a float32 model) within one float32 rounding."""
    from ..transformer import alibi_slopes

    start = 2 ** (-8 / n_heads)
    tl = start * (start ** torch.arange(n_heads))  # TransformerLens' create_alibi_multipliers, float32
    ours = alibi_slopes(n_heads)
    if torch.equal(tl, ours):
        return
    within_ulp = torch.allclose(tl, ours, rtol=2.4e-7, atol=0.0)
    if dtype == torch.float32 and within_ulp:
        return  # one float32 ulp in a slope: below the model's own rounding
    if within_ulp:  # a float64 model: the slopes differ by float32 rounding, which float64 would show
        advice = (
            "; they differ by one float32 rounding, below a float32 model's own: a float32 copy "
            "(model.to(torch.float32), with its cfg.dtype) converts"
        )
    else:
        power = 1 << max(0, (n_heads - 1).bit_length())
        advice = (
            f"; BLOOM interpolates the slopes of a number of heads that is not a power of 2, TransformerLens does "
            f"not, so no copy of this model converts (in any dtype): only ALiBi models whose n_heads is a power of "
            f"2 ({power // 2 or 1}, {power}, ...) do"
        )
    refuse(
        "positional_embedding_type",
        "alibi",
        f"TransformerLens' ALiBi slopes with n_heads={n_heads} differ from BLOOM's, which pypattern uses "
        f"(largest relative difference {float(((tl - ours) / ours).abs().max()):.1e})" + advice,
    )


def _warn_optional_hooks(c: Any) -> None:
    """A warning naming the options set that add hook points the converted model lacks, and those hook points."""
    import warnings

    on = [opt for opt in _OPTIONAL_HOOKS if bool(_get(c, opt, False))]
    if not on:
        return
    missing = [h for opt in on for h in _OPTIONAL_HOOKS[opt]]
    per_head = [opt for opt in ("use_split_qkv_input", "use_attn_in") if opt in on]
    warnings.warn(
        f"the HookedTransformer sets {', '.join(f'{opt}=True' for opt in on)}: the converted model computes the "
        f"same function but has no hook points {missing}"
        + (
            f"; with {' / '.join(per_head)} TransformerLens applies ln1 per head, and the converted model's "
            "blocks.N.ln1.hook_normalized / hook_scale have no head_index dimension ([batch, pos, d_model])"
            if per_head
            else ""
        )
        + "; read them on the HookedTransformer, or patch the sites the converted model has",
        UserWarning,
        stacklevel=6,  # from_hf's caller
    )


def _warn_ungrouped_kv(c: Any) -> None:
    """A warning when TransformerLens repeats grouped keys and values per query head in its hooks
    (``ungroup_grouped_query_attention``): the converted model computes the same function with one key/value
    head per group in its hooks."""
    import warnings

    n_kv = _get(c, "n_key_value_heads")
    if not (_get(c, "ungroup_grouped_query_attention", False) and n_kv is not None and n_kv < c.n_heads):
        return
    warnings.warn(
        f"the HookedTransformer sets ungroup_grouped_query_attention=True: its hook_k / hook_v / hook_rot_k hold "
        f"{c.n_heads} heads (each key/value head repeated for its queries); the converted model computes the same "
        f"function and its hooks hold the {n_kv} key/value heads ([batch, pos, {n_kv}, d_head]): patch a "
        "key/value head there, which moves every query head of its group",
        UserWarning,
        stacklevel=6,  # from_hf's caller
    )


def _config(model: nn.Module) -> dict:
    c = model.cfg
    for opt, bad, why in (
        ("attention_dir", lambda v: v != "causal", "only causal attention is converted"),
        (
            "num_experts",
            lambda v: v not in (None, 0),
            "TransformerLens mixtures of experts are not converted",
        ),
        ("load_in_4bit", bool, "quantized weights are not converted"),
    ):
        v = _get(c, opt)
        if v is not None and bad(v):
            refuse(opt, v, why)
    if _get(c, "final_rms", False) and c.normalization_type in ("LN", "LNPre"):
        # with RMS blocks the final norm is an RMSNorm anyway (every Llama-family TransformerLens config sets it)
        refuse("final_rms", True, f"a final RMSNorm under {c.normalization_type} blocks is not converted")
    d_vocab_out = _get(c, "d_vocab_out", c.d_vocab)
    if d_vocab_out not in (None, -1, c.d_vocab):
        refuse(
            "d_vocab_out",
            d_vocab_out,
            f"pypattern's model unembeds into its input vocabulary (d_vocab={c.d_vocab})",
        )
    norm = c.normalization_type
    if norm not in _NORMS:
        refuse("normalization_type", norm, f"the norms converted are {_NORMS}")
    attn_only = bool(_get(c, "attn_only", False))
    act = _get(c, "act_fn")
    if not attn_only and act not in _ACTS:
        refuse("act_fn", act, f"the activations converted are {_ACTS}")
    dtype = c.dtype
    if dtype not in (torch.float32, torch.float64):
        refuse(
            "dtype",
            dtype,
            "TransformerLens computes a 16-bit model's norms and attention scores in float32, which the conversion "
            "does not reproduce; convert a float32 copy (model.to(torch.float32), with its cfg.dtype)",
        )
    pos = c.positional_embedding_type
    if pos not in ("standard", "rotary", "alibi"):
        refuse(
            "positional_embedding_type", pos, "the positions converted are 'standard', 'rotary' and 'alibi'"
        )
    if pos == "alibi":
        _alibi_matches(c.n_heads, dtype)
    _warn_optional_hooks(c)
    _warn_ungrouped_kv(c)
    out: dict = dict(
        n_layers=c.n_layers,
        d_model=c.d_model,
        n_heads=c.n_heads,
        d_head=c.d_head,
        d_mlp=None if attn_only else c.d_mlp,
        d_vocab=c.d_vocab,
        n_ctx=c.n_ctx,
        act_fn="gelu" if attn_only else act,
        normalization_type=norm,
        positional_embedding_type=pos,
        ln_eps=float(c.eps),
        n_key_value_heads=_get(c, "n_key_value_heads"),
        gated_mlp=bool(_get(c, "gated_mlp", False)) and not attn_only,
        parallel_attn_mlp=bool(_get(c, "parallel_attn_mlp", False)) and not attn_only,
        attn_bias=True,
        attn_out_bias=True,
        mlp_bias=True,
        unembed_bias=True,
        tie_word_embeddings=False,
        post_embedding_ln=bool(_get(c, "post_embedding_ln", False)),
        use_normalization_before_and_after=bool(_get(c, "use_normalization_before_and_after", False)),
        qk_norm=bool(_get(c, "use_qk_norm", False)),
        # the positions a forward given an attention_mask reads, as TransformerLens takes them: its learned and
        # rotary positions count each row's real tokens from the mask (get_offset_position_ids), its ALiBi bias is
        # slope * (key column - query column) whatever the mask (the columns: equal at real tokens for a left- or
        # right-padded batch, and the same values where the mask has gaps)
        positions_from_mask=pos != "alibi",
    )
    if out["post_embedding_ln"] and norm not in ("LN", "LNPre"):
        refuse(
            "post_embedding_ln",
            True,
            f"with normalization_type={norm!r}: TransformerLens' embedding norm is a LayerNorm with a weight and a "
            "bias, and pypattern's model has one norm type (LN, or LNPre blocks, which convert as LN)",
        )
    if pos == "rotary":
        rd = _get(c, "rotary_dim") or c.d_head
        out["rotary_dim"] = int(rd)
        out["rotary_base"] = float(_get(c, "rotary_base", 10000))
        out["rotary_adjacent_pairs"] = bool(_get(c, "rotary_adjacent_pairs", False))
        if _get(c, "use_NTK_by_parts_rope", False):
            if dtype == torch.float64:
                refuse(
                    "use_NTK_by_parts_rope",
                    True,
                    "in a float64 model: TransformerLens computes these frequencies in float32 and inverts them "
                    "there, which the conversion reproduces to float32 rounding only; convert a float32 model",
                )
            out["rotary_scaling"] = {
                "rope_type": "llama3",
                "factor": float(c.NTK_by_parts_factor),
                "low_freq_factor": float(c.NTK_by_parts_low_freq_factor),
                "high_freq_factor": float(c.NTK_by_parts_high_freq_factor),
                "original_max_position_embeddings": int(c.NTK_original_ctx_len),
            }
            out["rotary_freq_dtype"] = torch.float32  # TransformerLens computes these frequencies in float32
    scale = float(c.attn_scale) if _get(c, "use_attn_scale", True) else 1.0
    if not (math.isfinite(scale) and scale > 0):
        refuse(
            "attn_scale",
            c.attn_scale,
            "pypattern's model divides the attention scores by a positive, finite scale, and TransformerLens "
            "divides them by cfg.attn_scale as it is (only attn_scale=-1 given to the config becomes "
            "sqrt(d_head)); give a positive attn_scale (or use_attn_scale=False)",
        )
    if _get(c, "scale_attn_by_inverse_layer_idx", False):
        out["attn_scores_multiplier"] = tuple(1.0 / (scale * (i + 1)) for i in range(c.n_layers))
    else:
        out["attn_scale"] = scale
    if _get(c, "use_local_attn", False):
        types = list(_get(c, "attn_types") or [])
        if len(types) != c.n_layers or set(types) - {"global", "local"}:
            refuse("attn_types", types, f"give 'global' or 'local' for each of the {c.n_layers} layers")
        out["sliding_window"] = tuple(int(c.window_size) if t == "local" else None for t in types)
    cap = _get(c, "attn_scores_soft_cap", -1.0)
    if cap is not None and cap > 0:
        if pos == "alibi":
            refuse(
                "attn_scores_soft_cap",
                cap,
                "with ALiBi positions TransformerLens caps the scores before it adds the ALiBi bias, pypattern's "
                "model after (no Hugging Face family combines the two)",
            )
        out["attn_scores_soft_cap"] = float(cap)
    cap = _get(c, "output_logits_soft_cap", -1.0)
    if cap is not None and cap > 0:
        out["output_logits_soft_cap"] = float(cap)
    return out


def _check_rotary_tables(model: nn.Module, cfg: dict) -> None:
    """A float64 model's rotary tables as TransformerLens computes them for a float64 model: one built in float32
    and moved with ``.to(torch.float64)`` keeps its float32 tables (rounded at 1e-7), which pypattern's float64
    model would not reproduce."""
    if model.cfg.dtype != torch.float64 or cfg["positional_embedding_type"] != "rotary":
        return
    attn = model.blocks[0].attn
    sin = getattr(attn, "rotary_sin", None)
    if not isinstance(sin, torch.Tensor) or cfg.get("rotary_scaling") is not None:
        return
    rd = cfg["rotary_dim"]
    # on the CPU whatever torch's default device: compared with the table read to the CPU
    pos = torch.arange(sin.shape[0], dtype=torch.float64, device="cpu")
    freq = cfg["rotary_base"] ** (torch.arange(rd // 2, dtype=torch.float64, device="cpu") / (rd / 2))
    freq = freq.repeat_interleave(2) if cfg["rotary_adjacent_pairs"] else freq.repeat(2)
    want = torch.sin(pos[:, None] / freq[None, :])
    if not torch.allclose(sin.detach().cpu().to(torch.float64), want, rtol=0, atol=1e-12):
        refuse(
            "dtype",
            torch.float64,
            "the model's rotary tables (blocks.0.attn.rotary_sin) were computed in float32 (a float32 model moved "
            "to float64, or weights processed by process_weights_ / from_pretrained's fold_ln, which recompute "
            "them in float32), which the converted float64 model would not reproduce; convert the float32 model, "
            "or a float64 HookedTransformer built with dtype=torch.float64 and not processed",
        )


def _post_norm_weights(cfg: dict, w: dict) -> None:
    """Sandwich norms after folding (TransformerLens keeps ``ln1_post`` / ``ln2_post`` with their weights while
    the pre-norms become RMSPre / LNPre): pypattern's model has one norm type, so every norm keeps a weight, the
    folded ones a weight of 1 (and a bias of 0), which multiplies exactly."""
    norm = cfg["normalization_type"]
    if not cfg["use_normalization_before_and_after"] or norm not in ("RMSPre", "LNPre"):
        return
    if "blocks.0.ln1_post.w" not in w:
        return
    cfg["normalization_type"] = "RMS" if norm == "RMSPre" else "LN"
    like = w["blocks.0.ln1_post.w"]
    pre = ("ln1",) if cfg.get("d_mlp") is None else ("ln1", "ln2")  # an attention-only block has no ln2
    names = [f"blocks.{i}.{n}" for i in range(cfg["n_layers"]) for n in pre] + ["ln_final"]
    for n in names:
        w.setdefault(f"{n}.w", torch.ones_like(like))
        if cfg["normalization_type"] == "LN":
            w.setdefault(f"{n}.b", torch.zeros_like(like))


def _embedding_norm_weights(cfg: dict, w: dict) -> None:
    """A LayerNorm on the embedding under LNPre blocks (``fold_ln`` folds the blocks' and the final norms, not the
    embedding's: BLOOM as ``HookedTransformer.from_pretrained`` loads it): pypattern's model has one norm type, so
    every norm is a LayerNorm, the folded ones with a weight of 1 and a bias of 0, which compute the same values."""
    if not cfg["post_embedding_ln"] or cfg["normalization_type"] != "LNPre":
        return
    cfg["normalization_type"] = "LN"
    like = w["embed.ln.w"]
    pre = ("ln1",) if cfg.get("d_mlp") is None else ("ln1", "ln2")  # an attention-only block has no ln2
    for n in [f"blocks.{i}.{n}" for i in range(cfg["n_layers"]) for n in pre] + ["ln_final"]:
        w.setdefault(f"{n}.w", torch.ones_like(like))
        w.setdefault(f"{n}.b", torch.zeros_like(like))


def _check_masks(model: nn.Module, cfg: dict) -> None:
    """Each block's attention mask buffer (``blocks.N.attn.mask``, True where a query may attend, built when the
    model was built) against the mask the configuration gives (causal, banded by ``window_size`` in the local
    layers): a ``cfg`` edited after the model was built (``window_size``, ``attn_types``) leaves the old mask, which
    the converted model would not reproduce."""
    windows = cfg.get("sliding_window")
    for i, block in enumerate(model.blocks):
        mask = getattr(getattr(block, "attn", None), "mask", None)
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[0] != mask.shape[1]:
            continue
        n = mask.shape[0]
        q = torch.arange(n)[:, None]
        k = torch.arange(n)[None, :]
        want = k <= q
        window = windows[i] if windows is not None else None
        if window is not None:
            want &= q - k < window
        got = mask.detach().cpu().bool()
        if not torch.equal(got, want):
            band = int((q - k)[got].max()) + 1 if bool(got.any()) else 0
            refuse(
                "window_size" if _get(model.cfg, "use_local_attn", False) else "use_local_attn",
                _get(model.cfg, "window_size") if _get(model.cfg, "use_local_attn", False) else False,
                f"blocks.{i}.attn.mask (built with the model) lets each query attend to its last {band} positions, "
                f"but the configuration says {'all' if window is None else window}: the cfg was edited after the model "
                "was built (window_size / attn_types / use_local_attn), and the converted model would compute as the "
                "cfg says; build the HookedTransformer from the configuration it should have",
            )


def _check_shapes(cfg: dict, w: dict) -> None:
    """The model's parameters against those the configuration gives (names and shapes, on the meta device): a
    ``cfg`` edited after the model was built (``n_ctx``, ``d_mlp``, ``normalization_type``, ...) leaves modules and
    weights of the old configuration, refused naming the first parameter that differs."""
    from ..transformer import Transformer, TransformerConfig

    with torch.device("meta"):
        want = {
            n: tuple(p.shape) for n, p in Transformer(TransformerConfig(**cfg, seed=None)).named_parameters()
        }
    have = {n: tuple(t.shape) for n, t in w.items() if t is not None}
    surplus, missing = sorted(set(have) - set(want)), sorted(set(want) - set(have))
    wrong = [n for n in sorted(set(have) & set(want)) if have[n] != want[n]]
    if not (surplus or missing or wrong):
        return
    if wrong:
        what = f"{wrong[0]} has shape {have[wrong[0]]}, where the cfg gives {want[wrong[0]]}"
    elif surplus:
        what = f"it has parameters {surplus[:4]} the cfg does not give"
    else:
        what = f"it lacks parameters {missing[:4]} the cfg gives"
    raise UnsupportedModelError(
        f"the HookedTransformer's parameters do not match its cfg: {what} (cfg edited after the model was built, a "
        "module swapped?); build the HookedTransformer from the configuration it should have"
    )


def convert(model: nn.Module) -> tuple[dict, dict]:
    """``(config kwargs, weights by pypattern name)`` of a ``HookedTransformer``."""
    _check_hooks(model)
    cfg = _config(model)
    _check_rotary_tables(model, cfg)
    _check_masks(model, cfg)
    params = dict(model.named_parameters())
    w: dict[str, torch.Tensor | None] = {}
    for name, p in params.items():
        parts = name.split(".")
        if parts[-1] in ("_W_K", "_W_V", "_b_K", "_b_V"):  # grouped-query attention: the key/value heads
            parts[-1] = parts[-1][1:]
        w[".".join(parts)] = p
    if cfg["positional_embedding_type"] != "standard":
        w.pop("pos_embed.W_pos", None)  # TransformerLens keeps an unused table with ALiBi
    if cfg["gated_mlp"]:
        for i in range(cfg["n_layers"]):
            p = f"blocks.{i}.mlp"
            b_in = w[f"{p}.b_in"]
            if b_in is not None and bool((b_in != 0).any()):
                refuse(
                    f"{p}.b_in",
                    "non-zero",
                    "TransformerLens' gated MLP adds b_in after act(x W_gate) * (x W_in); pypattern's adds it to "
                    "x W_in, so only a zero b_in converts exactly",
                )
            w[f"{p}.b_gate"] = torch.zeros_like(b_in)
    _post_norm_weights(cfg, w)
    _embedding_norm_weights(cfg, w)
    if not math.isfinite(cfg["ln_eps"]):
        refuse("eps", cfg["ln_eps"], "give a finite epsilon")
    _check_shapes(cfg, w)
    return cfg, w
