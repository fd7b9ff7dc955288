"""``Transformer`` / ``TransformerConfig`` as a TransformerLens user meets them: every config field refuses bad
values by name, the forward on random configurations equals a naive float64 implementation written from the
config's documented semantics, and the hooked-model API (caches, hooks, return types, state dicts, casts, copies)
behaves as TransformerLens' does."""

import copy
import math
import random

import pytest
import torch

from pypattern.models.transformer import Transformer, TransformerConfig

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = dict(n_layers=1, d_model=16, n_heads=4, d_mlp=32, d_vocab=11, n_ctx=8)


# ----- a naive implementation, from the documented semantics ----------------------------------------------------


def _act(name, x):
    if name == "gelu":
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    if name == "gelu_new":
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    if name == "relu":
        return torch.clamp(x, min=0)
    if name == "silu":
        return x / (1 + torch.exp(-x))
    if name == "tanh":
        return torch.tanh(x)
    raise AssertionError(name)


def _norm(cfg, p, name, x):
    kind = cfg.normalization_type
    if kind is None:
        return x
    if kind in ("LN", "LNPre"):
        c = x - x.mean(-1, keepdim=True)
        y = c / torch.sqrt((c * c).mean(-1, keepdim=True) + cfg.ln_eps)
    else:
        y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.ln_eps)
    if kind == "LN":
        return y * p[f"{name}.w"] + p[f"{name}.b"]
    if kind == "RMS":
        return y * p[f"{name}.w"]
    return y


def _rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _cap(x, cap):
    return x if cap is None else cap * torch.tanh(x / cap)


def _rotate(cfg, x, layer_pos, base=None):
    """Rotary embedding of ``x (batch, pos, heads, d_head)``, pair by pair with explicit cosines and sines: pair
    ``i`` is dimensions ``(i, i + r/2)`` (GPT-NeoX / Llama) or ``(2i, 2i+1)`` (GPT-J), turned by ``pos * base **
    (-2 i / r)``."""
    r = cfg.rotary_dim
    base = cfg.rotary_base if base is None else base
    out = x.clone()
    for i in range(r // 2):
        a, b = (2 * i, 2 * i + 1) if cfg.rotary_adjacent_pairs else (i, i + r // 2)
        theta = layer_pos.double() * base ** (-2.0 * i / r)  # (pos,)
        c, s = torch.cos(theta)[None, :, None], torch.sin(theta)[None, :, None]
        xa, xb = x[..., a], x[..., b]
        out[..., a] = xa * c - xb * s
        out[..., b] = xb * c + xa * s
    return out


def _alibi_slopes(n):
    """Press et al.'s slopes: ``2 ** (-8 i / m)`` for ``m`` the largest power of two <= n, then every other slope of
    the ``2 m`` sequence."""
    m = 2 ** int(math.floor(math.log2(n)))
    slopes = [2 ** (-8 * i / m) for i in range(1, m + 1)]
    slopes += [2 ** (-8 * i / (2 * m)) for i in range(1, 2 * m + 1, 2)][: n - m]
    return slopes


def naive_forward(model, tokens):
    """Logits ``(batch, pos, d_vocab)`` of ``model``'s configuration computed with explicit loops over heads and
    query positions (float64)."""
    cfg = model.cfg
    p = {n: t.detach().double() for n, t in model.named_parameters()}
    g = p.get
    B, T = tokens.shape
    pos = torch.arange(T)
    x = p["embed.W_E"][tokens] * (1.0 if cfg.embed_scale is None else cfg.embed_scale)
    if cfg.positional_embedding_type == "standard":
        x = x + p["pos_embed.W_pos"][:T]
    res = 1.0 if cfg.residual_multiplier is None else cfg.residual_multiplier
    groups = cfg.n_heads // cfg.n_key_value_heads
    for layer in range(cfg.n_layers):
        a, m = f"blocks.{layer}.attn", f"blocks.{layer}.mlp"
        h = _norm(cfg, p, f"blocks.{layer}.ln1", x)

        def proj(W, b, h=h):
            y = torch.einsum("bpd,hde->bphe", h, W)
            y = y if b is None else y + b
            return y if cfg.clip_qkv is None else torch.clamp(y, -cfg.clip_qkv, cfg.clip_qkv)

        q = proj(p[f"{a}.W_Q"], g(f"{a}.b_Q"))
        k = proj(p[f"{a}.W_K"], g(f"{a}.b_K"))
        v = proj(p[f"{a}.W_V"], g(f"{a}.b_V"))
        if cfg.qk_norm is True:  # per head, over d_head
            q, k = _rms(q, p[f"{a}.q_norm.w"], cfg.ln_eps), _rms(k, p[f"{a}.k_norm.w"], cfg.ln_eps)
        elif cfg.qk_norm == "all":  # over every head's projection at once
            q = _rms(q.flatten(-2), p[f"{a}.q_norm.w"], cfg.ln_eps).view(q.shape)
            k = _rms(k.flatten(-2), p[f"{a}.k_norm.w"], cfg.ln_eps).view(k.shape)
        if cfg.rotates(layer):
            q, k = _rotate(cfg, q, pos, cfg.rope_base(layer)), _rotate(cfg, k, pos, cfg.rope_base(layer))
        window = cfg.window(layer)
        z = torch.zeros(B, T, cfg.n_heads, cfg.d_head, dtype=torch.float64)
        slopes = _alibi_slopes(cfg.n_heads)
        for head in range(cfg.n_heads):
            kv = head // groups
            for i in range(T):
                keys = [j for j in range(i + 1) if window is None or i - j < window]
                s = torch.stack([(q[:, i, head] * k[:, j, kv]).sum(-1) for j in keys], -1) / cfg.attn_scale
                if cfg.positional_embedding_type == "alibi":
                    s = s + torch.tensor([slopes[head] * j for j in keys], dtype=torch.float64)
                s = _cap(s, cfg.attn_scores_soft_cap)
                w = torch.exp(s - s.max(-1, keepdim=True).values)
                w = w / w.sum(-1, keepdim=True)
                z[:, i, head] = sum(w[:, n, None] * v[:, j, kv] for n, j in enumerate(keys))
        attn_out = torch.einsum("bphe,hed->bpd", z, p[f"{a}.W_O"])
        if g(f"{a}.b_O") is not None:
            attn_out = attn_out + p[f"{a}.b_O"]
        if cfg.use_normalization_before_and_after:
            attn_out = _norm(cfg, p, f"blocks.{layer}.ln1_post", attn_out)
        attn_out = attn_out * res
        if cfg.attn_only:
            x = x + attn_out
            continue
        mid = x if cfg.parallel_attn_mlp else x + attn_out
        ln2 = f"blocks.{layer}.ln1" if cfg.parallel_shared_norm else f"blocks.{layer}.ln2"
        h2 = _norm(cfg, p, ln2, mid)

        def lin(W, b, inp=h2):
            return inp @ W + (0 if b is None else b)

        if cfg.gated_mlp:
            post = _act(cfg.act_fn, lin(p[f"{m}.W_gate"], g(f"{m}.b_gate"))) * lin(
                p[f"{m}.W_in"], g(f"{m}.b_in")
            )
        else:
            post = _act(cfg.act_fn, lin(p[f"{m}.W_in"], g(f"{m}.b_in")))
        mlp_out = lin(p[f"{m}.W_out"], g(f"{m}.b_out"), post)
        if cfg.use_normalization_before_and_after:
            mlp_out = _norm(cfg, p, f"blocks.{layer}.ln2_post", mlp_out)
        mlp_out = mlp_out * res
        x = mid + mlp_out + (attn_out if cfg.parallel_attn_mlp else 0)
    x = _norm(cfg, p, "ln_final", x)
    W_U = p["embed.W_E"].T if cfg.tie_word_embeddings else p["unembed.W_U"]
    logits = x @ W_U
    logits = logits if g("unembed.b_U") is None else logits + p["unembed.b_U"]
    logits = logits if cfg.logits_scaling is None else logits / cfg.logits_scaling
    return _cap(logits, cfg.output_logits_soft_cap)


def naive_per_token_loss(logits, tokens):
    """``-log softmax(logits[:, t])[tokens[:, t + 1]]`` from the log-sum-exp."""
    lg = logits[:, :-1]
    lse = torch.logsumexp(lg, -1)
    return lse - lg.gather(-1, tokens[:, 1:, None]).squeeze(-1)


def random_config(seed):
    """A random small configuration over the architecture options (float64)."""
    rng = random.Random(seed)
    n_heads = rng.choice([1, 2, 3, 4])
    d_head = rng.choice([2, 4, 6])
    pos = rng.choice(["standard", "rotary", "rotary", "none", "alibi"])
    kw = dict(
        n_layers=rng.randint(1, 3),
        n_heads=n_heads,
        d_model=rng.choice([6, 8, 12]),
        d_mlp=rng.choice([None, 0, 10, 10, 12, 12]),
        d_vocab=rng.randint(5, 13),
        n_ctx=rng.randint(6, 9),
        act_fn=rng.choice(["gelu", "gelu_new", "relu", "silu", "tanh"]),
        normalization_type=rng.choice(["LN", "LNPre", "RMS", "RMSPre", None]),
        positional_embedding_type=pos,
        n_key_value_heads=rng.choice([d for d in range(1, n_heads + 1) if n_heads % d == 0]),
        attn_bias=rng.random() < 0.5,
        attn_out_bias=rng.random() < 0.5,
        unembed_bias=rng.random() < 0.5,
        tie_word_embeddings=rng.random() < 0.3,
        sliding_window=rng.choice([None, None, 1, 3, "per layer"]),
        dtype=torch.float64,
        seed=seed,
    )
    if rng.random() < 0.7:
        kw["d_head"] = d_head
    else:
        kw["d_model"] = n_heads * d_head  # d_head from d_model / n_heads
    if kw["sliding_window"] == "per layer":
        kw["sliding_window"] = [rng.choice([None, 1, 2]) for _ in range(kw["n_layers"])]
    if rng.random() < 0.3:
        kw["attn_scale"] = rng.uniform(0.5, 4.0)
    # the options of Gemma, Granite and OLMo, now and then
    for k, lo, hi in [
        ("embed_scale", 0.5, 3.0),
        ("residual_multiplier", 0.3, 1.5),
        ("logits_scaling", 0.5, 4.0),
        ("attn_scores_soft_cap", 0.5, 3.0),
        ("output_logits_soft_cap", 0.5, 3.0),
        ("clip_qkv", 0.2, 1.0),
    ]:
        if rng.random() < 0.15:
            kw[k] = rng.uniform(lo, hi)
    if rng.random() < 0.25:
        kw["qk_norm"] = rng.choice([True, "all"])
    if kw["normalization_type"] is not None and rng.random() < 0.2:
        kw["use_normalization_before_and_after"] = True
    if kw["d_mlp"]:
        kw["gated_mlp"] = rng.random() < 0.5
        kw["mlp_bias"] = rng.random() < 0.5
        kw["parallel_attn_mlp"] = rng.random() < 0.4
        kw["parallel_shared_norm"] = kw["parallel_attn_mlp"] and rng.random() < 0.5
    if pos == "rotary":
        kw["rotary_dim"] = rng.choice([r for r in (2, 4, 6) if r <= d_head])
        kw["rotary_adjacent_pairs"] = rng.random() < 0.5
        kw["rotary_base"] = rng.choice([10000.0, 50.0, 3.0])
        if rng.random() < 0.3:
            kw["rotary_base"] = [rng.choice([10000.0, 7.0]) for _ in range(kw["n_layers"])]
        if rng.random() < 0.3:
            kw["rotary_layers"] = [rng.random() < 0.5 for _ in range(kw["n_layers"])]
    return kw


def perturbed(cfg_kw):
    """The model with its biases and norm weights moved off their zero / one initial values."""
    model = Transformer(TransformerConfig(**cfg_kw))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, prm in model.named_parameters():
            if not n.rsplit(".", 1)[-1].startswith("W_"):
                prm.add_(0.3 * torch.randn(prm.shape, generator=gen, dtype=prm.dtype))
    return model


@pytest.mark.parametrize("seed", range(60))
def test_forward_and_losses_equal_a_naive_implementation(seed):
    kw = random_config(seed)
    model = perturbed(kw)
    cfg = model.cfg
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.d_vocab, (2, cfg.n_ctx), generator=gen)
    want = naive_forward(model, tokens)
    torch.testing.assert_close(model(tokens), want, rtol=1e-10, atol=1e-10)
    per = naive_per_token_loss(want, tokens)
    torch.testing.assert_close(model(tokens, return_type="per_token_loss"), per, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(model(tokens, return_type="loss"), per.mean(), rtol=1e-10, atol=1e-10)
    logits, loss = model(tokens, return_type="both")
    torch.testing.assert_close(logits, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(loss, per.mean(), rtol=1e-10, atol=1e-10)
    assert model(tokens, return_type=None) is None
    # one sequence given as (pos,) is read as a batch of one
    torch.testing.assert_close(model(tokens[1]), want[1:], rtol=1e-10, atol=1e-10)


# ----- rotary convention: Hugging Face's, as the converters map it -----------------------------------------------


@pytest.mark.parametrize("adjacent", [False, True])
@pytest.mark.parametrize("rotary_dim", [4, 8])
def test_rotation_equals_hugging_face_apply_rotary_pos_emb(adjacent, rotary_dim):
    """``Attention.rotate`` turns queries as Llama's ``apply_rotary_pos_emb`` (``rotate_half`` pairing, partial
    rotary as GPT-NeoX) and as GPT-J's (adjacent pairs) do."""
    pytest.importorskip("transformers")
    cfg = TransformerConfig(
        n_layers=1,
        d_model=16,
        n_heads=2,
        d_head=8,
        d_vocab=5,
        n_ctx=7,
        positional_embedding_type="rotary",
        rotary_dim=rotary_dim,
        rotary_adjacent_pairs=adjacent,
        rotary_base=100.0,
        dtype=torch.float64,
    )
    attn = Transformer(cfg).blocks[0].attn
    x = torch.randn(2, 7, 2, 8, dtype=torch.float64)
    pos = torch.arange(7)
    inv_freq = 1.0 / (100.0 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    freqs = pos[:, None].double() * inv_freq[None]
    xr, xp = x[..., :rotary_dim], x[..., rotary_dim:]
    if adjacent:
        from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb

        sincos = torch.cat((freqs.sin(), freqs.cos()), -1)[None]
        sin, cos = torch.split(sincos, rotary_dim // 2, dim=-1)
        turned = apply_rotary_pos_emb(xr, sin, cos)  # (batch, pos, rotary_dim / 2) each
    else:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        emb = torch.cat((freqs, freqs), -1)[None]
        turned, _ = apply_rotary_pos_emb(
            xr.transpose(1, 2), xr.transpose(1, 2), emb.cos(), emb.sin(), unsqueeze_dim=1
        )
        turned = turned.transpose(1, 2)
    torch.testing.assert_close(attn.rotate(x), torch.cat((turned, xp), -1), rtol=1e-12, atol=1e-12)
    # and equals the naive pair-by-pair rotation
    torch.testing.assert_close(attn.rotate(x), _rotate(cfg, x, pos), rtol=1e-12, atol=1e-12)


# ----- configuration validation ---------------------------------------------------------------------------------

BAD_CONFIGS = [
    (dict(n_heads=0), r"n_heads=0 .*positive int"),
    (dict(n_heads=-2), r"n_heads=-2"),
    (dict(n_layers=0), r"n_layers=0"),
    (dict(d_model=16.5), r"d_model=16.5"),
    (dict(d_head=0), r"d_head=0"),
    (dict(d_mlp=-1), r"d_mlp=-1"),
    (dict(n_ctx=0), r"n_ctx=0"),
    (dict(d_vocab=0), r"d_vocab=0"),
    (dict(d_model=10, n_heads=4), r"d_model=10 .*n_heads=4.*d_head"),
    (dict(d_model=3, n_heads=4), r"d_model=3 .*n_heads=4"),
    (dict(n_key_value_heads=3), r"n_key_value_heads=3 .*divisor of n_heads=4"),
    (dict(n_key_value_heads=8), r"n_key_value_heads=8"),
    (dict(positional_embedding_type="rotary", rotary_dim=3), r"rotary_dim=3 .*even"),
    (dict(positional_embedding_type="rotary", rotary_dim=6), r"rotary_dim=6 .*d_head=4"),
    (dict(positional_embedding_type="rotary", d_head=5), r"rotary_dim=5 \(its default, d_head\) .*even"),
    (dict(rotary_dim=2), r"rotary_dim=2 .*positional_embedding_type='standard'"),
    (dict(rotary_adjacent_pairs=True), r"rotary_adjacent_pairs=True .*positional_embedding_type='standard'"),
    (dict(rotary_base=500.0), r"rotary_base=500.0 .*positional_embedding_type='standard'"),
    (dict(rotary_dtype=torch.float64), r"rotary_dtype=torch.float64 .*'standard'"),
    (dict(rotary_freq_dtype="float16"), r"rotary_freq_dtype=torch.float16 .*'standard'"),
    (
        dict(positional_embedding_type="alibi", rotary_input_dtype=torch.float32),
        r"rotary_input_dtype=torch.float32 .*'alibi'",
    ),
    (
        dict(positional_embedding_type="none", rotary_adjacent_pairs=True),
        r"rotary_adjacent_pairs=True .*'none'",
    ),
    (dict(positional_embedding_type="rotary", rotary_base=float("inf")), r"rotary_base=.*inf"),
    (
        dict(positional_embedding_type="rotary", rotary_scaling={"rope_type": "linear", "factor": math.inf}),
        r"rotary_scaling\['factor'\]=inf",
    ),
    (dict(act_fn="swish"), r"act_fn='swish' .*gelu"),
    (dict(normalization_type="ln"), r"normalization_type='ln' .*'LN'"),
    (dict(positional_embedding_type="learned"), r"positional_embedding_type='learned' .*standard"),
    (dict(sliding_window=0), r"sliding_window=0"),
    (dict(sliding_window=2.5), r"sliding_window=2.5"),
    (dict(sliding_window=[1, 2]), r"sliding_window=.*1 layers"),
    (dict(dtype="int64"), r"dtype=torch.int64 .*floating"),
    (dict(dtype="float99"), r"dtype='float99'"),
    (dict(norm_dtype=torch.int64), r"norm_dtype=torch.int64 .*floating"),
    (dict(attn_softmax_dtype="int32"), r"attn_softmax_dtype=torch.int32 .*floating"),
    (dict(attn_scores_dtype=torch.bool), r"attn_scores_dtype=torch.bool .*floating"),
    (
        dict(positional_embedding_type="rotary", rotary_dtype="complex64"),
        r"rotary_dtype=torch.complex64 .*floating",
    ),
    (dict(moe_renormalize=True), r"moe_renormalize=True .*n_experts"),
    (dict(moe_float32_weights=True), r"moe_float32_weights=True .*n_experts"),
    (dict(attn_scale=2.0, attn_scores_multiplier=0.25), r"attn_scale=2.0 .*attn_scores_multiplier=0.25"),
    (dict(attn_scores_soft_cap=math.inf), r"attn_scores_soft_cap=inf .*finite"),
    (dict(output_logits_soft_cap=math.inf), r"output_logits_soft_cap=inf"),
    (dict(embed_scale=math.inf), r"embed_scale=inf"),
    (dict(residual_multiplier=math.inf), r"residual_multiplier=inf"),
    (dict(logits_scaling=math.inf), r"logits_scaling=inf"),
    (dict(clip_qkv=-1.0), r"clip_qkv=-1.0"),
    (
        dict(normalization_type=None, use_normalization_before_and_after=True),
        r"use_normalization_before_and_after=True .*normalization_type=None",
    ),
    (dict(parallel_shared_norm=True), r"parallel_shared_norm"),
    (dict(qk_norm=1), r"qk_norm=1"),
    (dict(qk_norm="yes"), r"qk_norm='yes'"),
    (dict(seed=2**70), r"seed=1180591620717411303424"),
    (dict(seed=1.5), r"seed=1.5"),
    (dict(ln_eps=-1), r"ln_eps=-1"),
    (dict(init_range=-1.0), r"init_range=-1.0"),
    (dict(extra=[1]), r"extra=\[1\] .*dict"),
    (dict(padding_idx=11), r"padding_idx=11 .*d_vocab=11"),
    (dict(gated_mlp=True, d_mlp=0), r"gated_mlp"),
    (dict(n_experts=2, experts_per_token=3, gated_mlp=True, mlp_bias=False), r"experts_per_token=3"),
    (dict(experts_per_token=1), r"experts_per_token=1 needs n_experts"),
    (dict(positional_embedding_type="rotary", rotary_layers=[True, False]), r"rotary_layers"),
    (dict(rotary_scaling={"rope_type": "linear", "factor": 2.0}), r"rotary_scaling.*'rotary'"),
    (
        dict(normalization_type="LNPre", norm_weight_offset=1.0),
        r"norm_weight_offset=1.0 .*norms with a weight",
    ),
    (dict(tie_word_embeddings="yes"), r"tie_word_embeddings='yes'"),
    (dict(positional_embedding=False, positional_embedding_type="standard"), r"contradicts"),
    (
        dict(positional_embedding=True, positional_embedding_type="rotary"),
        r"positional_embedding=True .*contradicts positional_embedding_type='rotary'",
    ),
]


@pytest.mark.parametrize(
    "kw,match", BAD_CONFIGS, ids=[",".join(f"{k}={v!r}" for k, v in kw.items()) for kw, _ in BAD_CONFIGS]
)
def test_bad_config_is_refused_by_name(kw, match):
    with pytest.raises(ValueError, match=match):
        TransformerConfig(**{**BASE, **kw})


def test_defaults_and_consistent_combinations_are_accepted():
    cfg = TransformerConfig(**BASE)
    assert cfg.d_head == 4 and cfg.n_key_value_heads == 4 and cfg.attn_scale == 2.0
    # d_head given: n_heads * d_head may differ from d_model
    assert TransformerConfig(**{**BASE, "d_model": 10, "d_head": 3}).d_head == 3
    # a multiplier and the scale it implies together
    c = TransformerConfig(**{**BASE, "attn_scale": 4.0, "attn_scores_multiplier": 0.25})
    assert c.attn_scale == 4.0 and c.attn_scores_multiplier == 0.25
    assert TransformerConfig(**c.to_dict()) == c
    # one multiplier per layer and the scale of layer 0 (GPT-2's scale_attn_by_inverse_layer_idx)
    c = TransformerConfig(**{**BASE, "n_layers": 2, "attn_scale": 1.0, "attn_scores_multiplier": [1.0, 0.5]})
    assert TransformerConfig(**c.to_dict()) == c
    # rotary fields of a model converted without rotation (a rotary_dim of 0) are kept, not refused
    c = TransformerConfig(
        **{**BASE, "positional_embedding_type": "none", "rotary_base": 500.0, "rotary_dtype": torch.float32}
    )
    assert TransformerConfig(**c.to_dict()) == c
    # numpy scalars and dtype names
    import numpy as np

    c = TransformerConfig(**{**BASE, "n_heads": np.int64(4), "qk_norm": np.bool_(True), "dtype": "float64"})
    assert c.n_heads == 4 and type(c.n_heads) is int and c.qk_norm is True and c.dtype == torch.float64
    for kw in [random_config(s) for s in range(60)]:
        c = TransformerConfig(**kw)
        assert TransformerConfig(**c.to_dict()) == c


# ----- forward inputs -------------------------------------------------------------------------------------------


def _small(**kw):
    return Transformer(TransformerConfig(**{**BASE, "n_layers": 2, "dtype": torch.float64, **kw}))


def test_sequences_longer_than_learned_positions_are_refused_naming_n_ctx():
    model = _small()
    with pytest.raises(ValueError, match=r"9 positions.*n_ctx.*8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    # rotary / no positions: no learned table, longer sequences read as Hugging Face's models read them
    rot = _small(positional_embedding_type="rotary")
    assert rot(torch.zeros(1, 12, dtype=torch.long)).shape == (1, 12, 11)


@pytest.mark.parametrize(
    "tokens,err,match",
    [
        (torch.tensor(3), ValueError, r"tokens has shape \(\).*\(batch, pos\)"),
        (torch.zeros(2, 3, 4, dtype=torch.long), ValueError, r"tokens has shape \(2, 3, 4\)"),
        ([[1, 2, 3]], TypeError, r"tokens is a list"),
        ("some text", TypeError, r"tokens is a str.*no tokenizer"),
        (torch.zeros(2, 3), TypeError, r"tokens has dtype torch.float32"),
        (torch.tensor([[1, 11]]), ValueError, r"token id 11"),
        (torch.tensor([[1, -1]]), ValueError, r"token id -1"),
    ],
)
def test_bad_tokens_are_refused_by_name(tokens, err, match):
    with pytest.raises(err, match=match):
        _small()(tokens)


@pytest.mark.parametrize("return_type", ["loss", "both"])
@pytest.mark.parametrize("shape", [(2, 1), (2, 0), (0, 5)])
def test_a_mean_loss_over_no_next_token_is_refused(return_type, shape):
    """The mean loss over no (position, next token) pair is undefined (torch returns NaN): refused by name. The
    per-token losses of such input are an empty tensor, as they should be."""
    model = _small()
    tokens = torch.zeros(shape, dtype=torch.long)
    with pytest.raises(ValueError, match=r"tokens has shape .*loss"):
        model(tokens, return_type=return_type)
    per = model(tokens, return_type="per_token_loss")
    assert per.shape == (shape[0], max(shape[1] - 1, 0))


def test_bad_return_type_is_refused_before_the_forward_runs():
    model = _small()
    seen = []
    model.add_hook("blocks.0.hook_resid_pre", lambda x, hook: seen.append(1))
    with pytest.raises(ValueError, match=r"return_type='logit' .*'logits'"):
        model(torch.zeros(1, 3, dtype=torch.long), return_type="logit")
    assert seen == []


# ----- the hooked-model API -------------------------------------------------------------------------------------


def _api_model():
    return perturbed(
        {
            **BASE,
            "n_layers": 2,
            "dtype": torch.float64,
            "positional_embedding_type": "rotary",
            "n_key_value_heads": 2,
            "normalization_type": "RMS",
            "gated_mlp": True,
            "act_fn": "silu",
        }
    )


def test_run_with_cache_keys_filters_and_values():
    model = _api_model()
    tokens = torch.randint(0, 11, (3, 7), generator=torch.Generator().manual_seed(0))
    logits, cache = model.run_with_cache(tokens)
    assert set(cache) == set(model.hook_dict)
    torch.testing.assert_close(logits, naive_forward(model, tokens), rtol=1e-10, atol=1e-10)
    # the residual stream at the end, unembedded naively, gives the logits
    p = dict(model.named_parameters())
    resid = cache["blocks.1.hook_resid_post"]
    final = resid / torch.sqrt(resid.pow(2).mean(-1, keepdim=True) + model.cfg.ln_eps) * p["ln_final.w"]
    torch.testing.assert_close(final @ p["unembed.W_U"] + p["unembed.b_U"], logits, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(cache["ln_final.hook_normalized"], final, rtol=1e-10, atol=1e-10)
    # the token embedding and the pattern's rows
    torch.testing.assert_close(cache["hook_embed"], p["embed.W_E"][tokens].detach())
    pat = cache["pattern", 1]
    assert pat.shape == (3, 4, 7, 7)
    torch.testing.assert_close(pat.sum(-1), torch.ones(3, 4, 7, dtype=torch.float64))
    assert torch.all(pat.triu(1) == 0)
    assert cache["resid_pre", -1] is cache["blocks.1.hook_resid_pre"]
    assert cache["blocks.0.attn.hook_k"].shape == (3, 7, 2, 4)
    assert not any(t.requires_grad for t in cache.values())
    # filters: a name, a list, a function
    for flt, want in [
        ("blocks.0.attn.hook_z", {"blocks.0.attn.hook_z"}),
        (["hook_embed", "blocks.1.hook_mlp_out"], {"hook_embed", "blocks.1.hook_mlp_out"}),
        (lambda n: n.endswith("hook_rot_q"), {"blocks.0.attn.hook_rot_q", "blocks.1.attn.hook_rot_q"}),
    ]:
        out, c = model.run_with_cache(tokens, names_filter=flt)
        assert set(c) == want
        torch.testing.assert_close(out, logits, rtol=0, atol=0)
        for k in want:
            torch.testing.assert_close(c[k], cache[k], rtol=0, atol=0)
    with pytest.raises(KeyError, match="hook_nope"):
        model.run_with_cache(tokens, names_filter=["hook_nope"])
    assert not any(hp._fns for hp in model.hook_dict.values())


def test_run_with_hooks_replacement_equals_the_naive_continuation():
    """Replacing the last residual stream with a tensor R gives the naive unembedding of R; zero-ablating a
    head's z equals the naive forward of the model whose W_O rows of that head are zero."""
    model = _api_model()
    tokens = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(1))
    R = torch.randn(2, 6, 16, dtype=torch.float64)
    out = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_resid_post", lambda x, hook: R)])
    p = dict(model.named_parameters())
    final = R / torch.sqrt(R.pow(2).mean(-1, keepdim=True) + model.cfg.ln_eps) * p["ln_final.w"]
    torch.testing.assert_close(out, final @ p["unembed.W_U"] + p["unembed.b_U"], rtol=1e-10, atol=1e-10)

    def ablate(z, hook):
        z = z.clone()
        z[:, :, 2] = 0
        return z

    ablated = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_z", ablate)])
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.blocks[0].attn.W_O[2] = 0
    torch.testing.assert_close(ablated, naive_forward(other, tokens), rtol=1e-10, atol=1e-10)
    assert not any(hp._fns for hp in model.hook_dict.values())
    torch.testing.assert_close(model(tokens), naive_forward(model, tokens), rtol=1e-10, atol=1e-10)


def test_hooks_context_add_hook_and_reset_hooks():
    model = _api_model()
    tokens = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(2))
    clean = model(tokens)
    double = [("blocks.0.hook_attn_out", lambda x, hook: 2 * x)]
    with model.hooks(fwd_hooks=double):
        hooked = model(tokens)
    assert not torch.allclose(hooked, clean)
    torch.testing.assert_close(model(tokens), clean, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="inside"):
        with model.hooks(fwd_hooks=double):
            raise RuntimeError("inside")
    torch.testing.assert_close(model(tokens), clean, rtol=0, atol=0)
    # add_hook / reset_hooks, permanent hooks, keyword-only hook functions (TransformerLens' call)
    model.add_hook("blocks.0.hook_attn_out", lambda x, *, hook: 2 * x)
    torch.testing.assert_close(model(tokens), hooked, rtol=0, atol=0)
    model.reset_hooks()
    torch.testing.assert_close(model(tokens), clean, rtol=0, atol=0)
    model.add_hook("blocks.0.hook_attn_out", lambda x, hook: 2 * x, is_permanent=True)
    model.reset_hooks()
    torch.testing.assert_close(model(tokens), hooked, rtol=0, atol=0)
    model.reset_hooks(including_permanent=True)
    torch.testing.assert_close(model(tokens), clean, rtol=0, atol=0)
    # a backward hook sees the gradient of the loss with respect to the activation
    grads = []
    loss = model.run_with_hooks(
        tokens,
        return_type="loss",
        bwd_hooks=[("blocks.1.hook_resid_post", lambda g, hook: grads.append(g))],
    )
    loss.backward()
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter="blocks.1.hook_resid_post")
    r = cache["blocks.1.hook_resid_post"].clone().requires_grad_(True)
    p = dict(model.named_parameters())
    final = r / torch.sqrt(r.pow(2).mean(-1, keepdim=True) + model.cfg.ln_eps) * p["ln_final.w"]
    lg = final @ p["unembed.W_U"] + p["unembed.b_U"]
    (want,) = torch.autograd.grad(naive_per_token_loss(lg, tokens).mean(), r)
    torch.testing.assert_close(grads[0], want, rtol=1e-10, atol=1e-12)


def test_state_dict_round_trip_and_another_config_refused():
    model = _api_model()
    tokens = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(3))
    fresh = Transformer(TransformerConfig(**{**model.cfg.to_dict(), "seed": 99}))
    assert not torch.allclose(fresh(tokens), model(tokens))
    fresh.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(fresh(tokens), model(tokens), rtol=0, atol=0)
    other = Transformer(TransformerConfig(**{**model.cfg.to_dict(), "n_key_value_heads": 4}))
    with pytest.raises(RuntimeError, match=r"size mismatch for blocks\.0\.attn\.W_K"):
        other.load_state_dict(model.state_dict())
    tied = Transformer(TransformerConfig(**{**model.cfg.to_dict(), "tie_word_embeddings": True}))
    with pytest.raises(RuntimeError, match=r"unembed\.W_U"):
        tied.load_state_dict(model.state_dict())
    # a tied model's state has the embedding once
    assert "unembed.W_U" not in tied.state_dict() and "embed.W_E" in tied.state_dict()


def test_casts_keep_cfg_dtype_in_step_and_compute_in_the_new_dtype():
    model = _api_model()
    tokens = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(4))
    want = naive_forward(model, tokens)
    for cast, dtype in [
        (lambda m: m.float(), torch.float32),
        (lambda m: m.half(), torch.float16),
        (lambda m: m.to(torch.bfloat16), torch.bfloat16),
        (lambda m: m.to(dtype=torch.float32), torch.float32),
    ]:
        m = cast(copy.deepcopy(model))
        assert m.cfg.dtype == dtype and all(p.dtype == dtype for p in m.parameters())
        out = m(tokens)
        assert out.dtype == dtype
        tol = {torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 2e-1}[dtype]
        torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
        assert TransformerConfig(**m.cfg.to_dict()) == m.cfg
        back = m.double()
        assert back.cfg.dtype == torch.float64
    # the original is untouched; a cast to a device only keeps the dtype
    assert model.cfg.dtype == torch.float64
    model.to("cpu")
    assert model.cfg.dtype == torch.float64


def test_deepcopy_hooks_fire_on_the_copy_only():
    model = _api_model()
    twin = copy.deepcopy(model)
    tokens = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(5))
    fired = []
    twin.add_hook("blocks.0.attn.hook_pattern", lambda x, hook: fired.append(hook.name))
    model(tokens)
    assert fired == []
    twin(tokens)
    assert fired == ["blocks.0.attn.hook_pattern"]
    assert twin.hook_dict["blocks.0.attn.hook_pattern"] is twin.blocks[0].attn.hook_pattern
    assert not model.hook_dict["blocks.0.attn.hook_pattern"]._fns
    # the copy's weights are its own (tied embeddings and a shared parallel norm too)
    tied = _small(tie_word_embeddings=True, parallel_attn_mlp=True, parallel_shared_norm=True)
    t2 = copy.deepcopy(tied)
    with torch.no_grad():
        t2.embed.W_E.add_(1.0)
    assert torch.equal(t2.unembed.W_U, t2.embed.W_E.T) and not torch.equal(tied.embed.W_E, t2.embed.W_E)
    assert t2.blocks[0].ln2 is t2.blocks[0].ln1 and t2.blocks[0].ln1 is not tied.blocks[0].ln1


@pytest.mark.parametrize("seed", [0, 3, 7])
def test_right_and_left_padded_losses_equal_the_unpadded_sequences(seed):
    """The model is causal, so right padding is exact without a mask: the real positions' logits of a padded row
    equal the row's own, and the library's masked loss equals the naive mean over the real next-token terms. Left
    padding with the mask and position ids counted from each row's first real token gives the same loss."""
    from pypattern.losses import batch_loss

    kw = random_config(seed)
    model = perturbed(kw)
    V, T = model.cfg.d_vocab, model.cfg.n_ctx
    gen = torch.Generator().manual_seed(seed)
    lengths = [T, 2, T - 1]
    rows = [torch.randint(0, V, (n,), generator=gen) for n in lengths]
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    logits = model(ids)
    terms = []
    for i, r in enumerate(rows):
        own = naive_forward(model, r[None])
        torch.testing.assert_close(logits[i, : len(r)], own[0], rtol=1e-10, atol=1e-10)
        terms.append(naive_per_token_loss(own, r[None])[0])
    want = torch.cat(terms).mean()
    got = batch_loss(model, {"input_ids": ids, "attention_mask": mask})
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # left padding: the padding keys are masked, and with position ids counted from each row's first real token
    # the loss is the same mean over the real next-token terms
    left, left_ids = mask.flip(1), ids.flip(1)
    for i, r in enumerate(rows):
        left_ids[i, T - len(r) :] = r
    pos = (left.cumsum(1) - 1).clamp(min=0)
    got_left = batch_loss(model, {"input_ids": left_ids, "attention_mask": left, "position_ids": pos})
    torch.testing.assert_close(got_left, want, rtol=1e-10, atol=1e-10)


def test_transformer_lens_weight_accessors():
    """``model.W_Q`` and friends stack the layers' weights as TransformerLens' ``HookedTransformer`` does
    (grouped key/value heads repeated for their query heads); ``b_U`` is zeros without an unembedding bias."""
    model = _api_model()  # rotary, n_key_value_heads=2 of 4, RMS, gated MLP with biases
    cfg = model.cfg
    L, H, d, dh = cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_head
    assert model.W_E is model.embed.W_E and model.W_U is model.unembed.W_U
    assert torch.equal(model.b_U, model.unembed.b_U)
    for name, shape in [
        ("W_Q", (L, H, d, dh)),
        ("W_K", (L, H, d, dh)),
        ("W_V", (L, H, d, dh)),
        ("W_O", (L, H, dh, d)),
        ("b_Q", (L, H, dh)),
        ("b_K", (L, H, dh)),
        ("b_O", (L, d)),
        ("W_in", (L, d, cfg.d_mlp)),
        ("W_gate", (L, d, cfg.d_mlp)),
        ("W_out", (L, cfg.d_mlp, d)),
        ("b_in", (L, cfg.d_mlp)),
        ("b_out", (L, d)),
    ]:
        assert getattr(model, name).shape == shape, name
    for layer, blk in enumerate(model.blocks):
        for h in range(H):
            torch.testing.assert_close(model.W_Q[layer, h], blk.attn.W_Q[h], rtol=0, atol=0)
            torch.testing.assert_close(model.W_K[layer, h], blk.attn.W_K[h // 2], rtol=0, atol=0)
            torch.testing.assert_close(model.b_V[layer, h], blk.attn.b_V[h // 2], rtol=0, atol=0)
        torch.testing.assert_close(model.W_out[layer], blk.mlp.W_out, rtol=0, atol=0)
    # the OV circuit of a head, from the accessors, gives the head's write of the values (hook_v -> hook_z path)
    tokens = torch.randint(0, 11, (1, 5), generator=torch.Generator().manual_seed(6))
    _, cache = model.run_with_cache(tokens)
    x = cache["blocks.0.ln1.hook_normalized"]
    v = torch.einsum("bpd,hde->bphe", x, model.W_V[0]) + model.b_V[0]
    z = torch.einsum("bhqk,bkhe->bqhe", cache["pattern", 0], v)
    torch.testing.assert_close(z, cache["z", 0], rtol=1e-10, atol=1e-12)
    # tied embeddings, no biases, learned positions absent
    bare = _small(
        tie_word_embeddings=True,
        unembed_bias=False,
        attn_bias=False,
        positional_embedding_type="rotary",
        d_mlp=None,
    )
    torch.testing.assert_close(bare.W_U, bare.W_E.T, rtol=0, atol=0)
    assert torch.equal(bare.b_U, torch.zeros(11, dtype=torch.float64))
    assert not hasattr(bare, "W_pos") and not hasattr(bare, "b_Q") and not hasattr(bare, "W_in")
    learned = _small()
    assert learned.W_pos is learned.pos_embed.W_pos and learned.W_pos.shape == (8, 16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_rotary_angles_are_not_rounded_to_16_bits(dtype):
    """A rotary model in 16 bits (built so, or cast with ``.half()``) turns its queries by angles computed in
    float32, as Hugging Face and TransformerLens compute them: in 16 bits an angle of a few hundred radians is
    rounded by whole radians. The rotation then differs from the exact one by the 16-bit rounding of its inputs and
    output only."""
    cfg = TransformerConfig(
        n_layers=1,
        d_model=64,
        n_heads=2,
        d_mlp=None,
        d_vocab=11,
        n_ctx=8,
        positional_embedding_type="rotary",
        dtype=torch.float64,
    )
    x = torch.randn(1, 512, 2, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(dtype)
    exact = _rotate(cfg, x.double(), torch.arange(512))
    for attn in (
        Transformer(TransformerConfig(**{**cfg.to_dict(), "dtype": dtype})).blocks[0].attn,
        Transformer(cfg).to(dtype).blocks[0].attn,
    ):
        got = attn.rotate(x)
        assert got.dtype == dtype
        eps = torch.finfo(dtype).eps
        # the cosines, sines, products and sum each rounded once in 16 bits (16-bit angles: 25 to 100 times more)
        assert (got.double() - exact).abs().max() < 4 * eps * x.double().abs().max()
