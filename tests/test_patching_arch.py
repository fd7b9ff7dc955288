"""Exact patching and AtP on every architecture pypattern's Transformer represents (GPT-2, GPT-NeoX, Llama,
Qwen2, Mistral-like option sets), each against an independent computation written here: a hooked forward per
cell, the cells side by side in the rows of one batch (for the exact engine), and autograd directional derivatives
(for AtP)."""

import functools

import pytest
import torch
from _hook_names import HEADS, HOOKS

from pypattern.models import Transformer, TransformerConfig
from pypattern.patching import KL, ExactEngine, LogitDiff, LogProb, activation_patching, attribution_patching

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = dict(n_layers=2, d_model=16, n_heads=4, d_head=4, d_mlp=24, d_vocab=12, n_ctx=8, dtype=torch.float64)
LLAMA = dict(
    normalization_type="RMS",
    positional_embedding_type="rotary",
    gated_mlp=True,
    act_fn="silu",
    n_key_value_heads=2,
    attn_bias=False,
    attn_out_bias=False,
    mlp_bias=False,
    unembed_bias=False,
)
ARCHS = {
    "gpt2": dict(act_fn="gelu_new"),
    "neox": dict(parallel_attn_mlp=True, positional_embedding_type="rotary", rotary_dim=2),
    "llama": LLAMA,
    "qwen2": {**LLAMA, "attn_bias": True, "tie_word_embeddings": True},
    "qwen3": {**LLAMA, "qk_norm": True},
    "neo": dict(sliding_window=(None, 3), attn_scale=1.0, attn_bias=False, act_fn="gelu_new"),
    # GPT-Neo's float32 query-key products in a float64 model, the softmax in float64
    "neo_scores32": dict(
        sliding_window=(3, None),
        attn_scale=1.0,
        attn_bias=False,
        attn_scores_dtype=torch.float32,
        attn_softmax_dtype=torch.float64,
    ),
    "mqa_gptj": {**LLAMA, "n_key_value_heads": 1, "rotary_adjacent_pairs": True, "rotary_base": 50.0},
    "mistral_window": {**LLAMA, "sliding_window": 3},
    "tied": dict(tie_word_embeddings=True, unembed_bias=False, attn_scale=3.0),
    # Gemma 2: scaled embeddings, 1 + w norms, sandwich norms, soft-capped scores and logits, local layers
    "gemma2": {
        **LLAMA,
        "act_fn": "gelu_pytorch_tanh",
        "embed_scale": 4.0,
        "norm_weight_offset": 1.0,
        "use_normalization_before_and_after": True,
        "attn_scores_soft_cap": 1.5,
        "output_logits_soft_cap": 4.0,
        "sliding_window": (3, None),
        "attn_scale": 3.0,
        "tie_word_embeddings": True,
    },
    # OLMo 2 / 3: no pre-norms, norms after the sublayers, one query/key norm across all heads, a local layer
    "olmo2": {
        **LLAMA,
        "pre_norms": False,
        "use_normalization_before_and_after": True,
        "qk_norm": "all",
        "sliding_window": (3, None),
    },
    # GPT-J (eager): one LayerNorm for attention and MLP, adjacent rotary pairs, float32 scores multiplied
    "gptj": dict(
        parallel_attn_mlp=True,
        parallel_shared_norm=True,
        positional_embedding_type="rotary",
        rotary_dim=2,
        rotary_adjacent_pairs=True,
        attn_bias=False,
        attn_out_bias=False,
        attn_scores_dtype=torch.float32,
        attn_scores_multiplier=0.3,
        attn_softmax_dtype=torch.float64,
    ),
    # OPT with parameter-free LayerNorms: learned positions, no biases
    "opt_lnpre": dict(
        normalization_type="LNPre", attn_bias=False, attn_out_bias=False, mlp_bias=False, act_fn="relu"
    ),
    # a TransformerLens Llama after fold_ln: RMSNorms without weights
    "rmspre": {**LLAMA, "normalization_type": "RMSPre"},
    # OLMo: LayerNorms without parameters, clamped query/key/value projections
    "olmo": {**LLAMA, "normalization_type": "LNPre", "clip_qkv": 0.5},
    # Phi-2: attention and MLP in parallel reading one LayerNorm, partial rotary, biases everywhere
    "phi": dict(
        parallel_attn_mlp=True,
        parallel_shared_norm=True,
        positional_embedding_type="rotary",
        rotary_dim=2,
        act_fn="gelu_new",
    ),
    # Gemma 3: query/key norms, local and global layers with their own rotary bases and scalings
    "gemma3": {
        **LLAMA,
        "embed_scale": 4.0,
        "norm_weight_offset": 1.0,
        "use_normalization_before_and_after": True,
        "qk_norm": True,
        "sliding_window": (3, None),
        "rotary_base": (100.0, 1e4),
        "rotary_scaling": (None, {"rope_type": "linear", "factor": 2.0}),
    },
    # a mixture of experts (Mixtral): 4 gated experts, 2 per token, renormalised, float32 routing weights
    "moe": {
        **LLAMA,
        "n_experts": 4,
        "experts_per_token": 2,
        "moe_renormalize": True,
        "moe_float32_weights": True,
    },
    # Granite: scaled embedding, score multiplier, writes scaled before the residual, logits divided
    "granite": {
        **LLAMA,
        "embed_scale": 3.0,
        "attn_scores_multiplier": 0.2,
        "residual_multiplier": 0.3,
        "logits_scaling": 4.0,
    },
    # SmolLM3: a layer without rotary positions (NoPE) and a rotating one
    "nope": {**LLAMA, "rotary_layers": (False, True)},
    # ERNIE 4.5: rotary pairs (2i, 2i + 1) turned in float32 in a float64 model
    "ernie": {**LLAMA, "rotary_adjacent_pairs": True, "rotary_input_dtype": torch.float32},
    # Qwen2-MoE: routed experts plus a gated shared expert
    "moe_shared": {**LLAMA, "n_experts": 3, "experts_per_token": 1, "moe_shared_d_mlp": 8},
    # GPT-2 with scale_attn_by_inverse_layer_idx: a score multiplier per layer
    "gpt2_inverse_layer": dict(act_fn="gelu_new", attn_scores_multiplier=(0.5, 0.25)),
    # BLOOM: ALiBi score biases, a LayerNorm on the embedding, BLOOM's GELU, float32 softmax
    "bloom": dict(
        positional_embedding_type="alibi",
        post_embedding_ln=True,
        act_fn="bloom_gelu",
        attn_softmax_dtype=torch.float32,
    ),
    # ALiBi with grouped-query attention (every grouped path of the score bias)
    "alibi_gqa": {**LLAMA, "positional_embedding_type": "alibi"},
    # YaRN: blended frequencies, cosines and sines scaled by the attention factor
    "yarn": {
        **LLAMA,
        "rotary_scaling": {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 64,
            "beta_fast": 8.0,
            "beta_slow": 1.0,
            "attention_factor": 1.2,
        },
        "rotary_base": 100.0,
    },
}


def build(arch, **kw):
    return model_and_prompts({**ARCHS[arch], **kw})


def model_and_prompts(opts: dict):
    """A tiny float64 model of ``BASE`` with ``opts`` (biases and norm weights moved off their initialisation),
    prompts ``(3, 6)``, corrupted prompts that differ at two positions, answer and wrong tokens."""
    model = Transformer(TransformerConfig(**{**BASE, "seed": 3, **opts}))
    with torch.no_grad():  # biases and norm weights away from their zero / one initialisation
        g = torch.Generator().manual_seed(11)
        for name, prm in model.named_parameters():
            if not name.rsplit(".", 1)[-1].startswith("W_"):
                prm.add_(0.3 * torch.randn(prm.shape, generator=g, dtype=prm.dtype))
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, 12, (3, 6), generator=g)
    corr = clean.clone()
    corr[:, 1] = (clean[:, 1] + 3) % 12
    corr[:, 3] = (clean[:, 3] + 5) % 12
    ans, wrong = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    return model, clean, corr, ans, wrong


def sites_of(model):
    cfg = model.cfg
    out = list(HOOKS)
    if cfg.parallel_attn_mlp or cfg.attn_only:
        out.remove("resid_mid")
    return out


def replace(x, src, site, head, pos):
    x = x.clone()
    p = slice(None) if pos is None else pos
    if site == "pattern":
        x[:, head, p] = src[:, head, p]
    elif site in HEADS:
        x[:, p, head] = src[:, p, head]
    else:
        x[:, p] = src[:, p]
    return x


def reference_grid(model, site, clean, corr, ans, wrong, per_position):
    """Denoising: for each cell, a forward of the corrupted prompts with the clean activation written into the hook
    point; the logit difference at the last position. ``(batch, layer[, head][, pos])``. The cells of a layer run
    in one forward of the corrupted prompts repeated once per cell, each cell's patch written into its own rows
    only (every row of the model's forward is computed on its own)."""
    L, (B, T) = model.cfg.n_layers, clean.shape
    names = [HOOKS[site].format(layer) for layer in range(L)]
    with torch.no_grad():
        _, cache = model.run_with_cache(clean, names_filter=names)
    if site in HEADS:
        n_heads = cache[names[0]].shape[1 if site == "pattern" else 2]  # the hook point's own head axis
    positions = list(range(T)) if per_position else [None]
    out = torch.empty(
        clean.shape[0], L, *([n_heads] if site in HEADS else []), len(positions), dtype=torch.float64
    )
    cells = [
        (h, i, p) for h in (range(n_heads) if site in HEADS else [None]) for i, p in enumerate(positions)
    ]
    for layer, name in enumerate(names):

        def fn(x, hook, s=cache[name]):
            return torch.cat([replace(part, s, site, h, p) for part, (h, _, p) in zip(x.split(B), cells)])

        with torch.no_grad():
            logits = model.run_with_hooks(corr.repeat(len(cells), 1), fwd_hooks=[(name, fn)])[:, -1]
        ld = logits.gather(-1, ans.repeat(len(cells))[:, None]) - logits.gather(
            -1, wrong.repeat(len(cells))[:, None]
        )
        for (h, i, _), part in zip(cells, ld[:, 0].split(B)):
            out[(slice(None), layer) + ((h,) if h is not None else ()) + (i,)] = part
    return out if per_position else out[..., 0]


@functools.cache
def reference_grids(arch, per_position):
    """``{site: reference_grid(...)}`` of ``build(arch)`` (a model of its own, never patched by the engine): the
    reference does not read the engine's ``CHUNK_ROWS``, so each chunking's test compares with the same grids."""
    model, clean, corr, ans, wrong = build(arch)
    return {
        site: reference_grid(model, site, clean, corr, ans, wrong, per_position) for site in sites_of(model)
    }


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("per_position", [True, False])
@pytest.mark.parametrize("chunk_rows", [None, 1, 40])
def test_every_site_equals_one_forward_per_cell(arch, per_position, chunk_rows, monkeypatch):
    if chunk_rows is not None:  # blocks over one cell at a time, or uneven chunks of cells
        monkeypatch.setattr(ExactEngine, "CHUNK_ROWS", chunk_rows)
    model, clean, corr, ans, wrong = build(arch)
    refs = reference_grids(arch, per_position)
    assert list(refs) == sites_of(model)
    for site in sites_of(model):
        res = activation_patching(
            model, site, clean, corr, metric=LogitDiff(ans, wrong), per_position=per_position, method="exact"
        )
        ref = refs[site]
        assert res.values.shape == ref.shape, (site, res.values.shape, ref.shape)
        err = (res.values - ref).abs().max().item()
        assert err <= 1e-9, f"{arch} {site} per_position={per_position}: engine and reference differ by {err}"
        # the patches act: some cell moves the metric away from the corrupted run
        moved = (ref - res.corrupted.view(-1, *[1] * (ref.dim() - 1))).abs().max().item()
        assert moved > 1e-3, f"{arch} {site}: no cell changed the metric"


@pytest.mark.parametrize("arch", ["neox", "llama", "mistral_window", "qwen3"])
@pytest.mark.parametrize("per_position", [True, False])
def test_attention_softmax_dtype_is_the_models(arch, per_position):
    """A model taking its attention softmax in another dtype (``attn_softmax_dtype``, as a converted Hugging Face
    eager model does in float32; bfloat16 here, so that a softmax in float64 would differ far beyond the tolerance):
    the engine's recomputed patterns equal the model's own forward."""
    model, clean, corr, ans, wrong = build(arch, attn_softmax_dtype=torch.bfloat16)
    for site in sites_of(model):
        res = activation_patching(
            model, site, clean, corr, metric=LogitDiff(ans, wrong), per_position=per_position, method="exact"
        )
        ref = reference_grid(model, site, clean, corr, ans, wrong, per_position)
        err = (res.values - ref).abs().max().item()
        assert err <= 1e-9, f"{arch} {site} per_position={per_position}: engine and reference differ by {err}"


@pytest.mark.parametrize("arch", ["neox", "mistral_window"])
def test_naive_method_equals_reference(arch):
    model, clean, corr, ans, wrong = build(arch)
    for site in ["k", "pattern", "mlp_out"]:
        res = activation_patching(model, site, clean, corr, metric=LogitDiff(ans, wrong), method="naive")
        ref = reference_grid(model, site, clean, corr, ans, wrong, True)
        torch.testing.assert_close(res.values, ref, rtol=0, atol=1e-12)


def window_cases(ans, wrong):
    """``[(sites, activation_patching keywords)]``: windows, noising on some layers, metric positions."""
    return [
        (["resid_pre", "k", "pattern"], dict(metric=KL(), window=2)),
        (["q", "v", "attn_out"], dict(metric=LogProb(ans), direction="noising", layers=[1, 2])),
        (["z", "k", "resid_pre"], dict(metric=LogitDiff(ans, wrong, position=torch.tensor([5, 2, 4])))),
        (["q", "v", "mlp_out"], dict(metric=LogitDiff(ans, wrong, position=3), per_position=False)),
    ]


@functools.cache
def naive_window_values(arch):
    """The naive loop's values of every case of :func:`window_cases` on ``build(arch, n_layers=3)`` (a model of its
    own): the loop does not read the engine's ``CHUNK_ROWS``, so each chunking's test compares with the same."""
    model, clean, corr, ans, wrong = build(arch, n_layers=3)
    return [
        [activation_patching(model, site, clean, corr, method="naive", **kw).values for site in sites]
        for sites, kw in window_cases(ans, wrong)
    ]


@pytest.mark.parametrize("arch", ["neox", "mistral_window", "mqa_gptj"])
@pytest.mark.parametrize("chunk_rows", [None, 1, 40])
def test_windows_noising_and_metric_positions(arch, chunk_rows, monkeypatch):
    if chunk_rows is not None:
        monkeypatch.setattr(ExactEngine, "CHUNK_ROWS", chunk_rows)
    model, clean, corr, ans, wrong = build(arch, n_layers=3)
    for (sites, kw), naive in zip(window_cases(ans, wrong), naive_window_values(arch), strict=True):
        for site, b in zip(sites, naive, strict=True):
            a = activation_patching(model, site, clean, corr, method="exact", **kw)
            err = (a.values - b).abs().max().item()
            assert err <= 1e-9, f"{arch} {site} {kw}: {err}"


def test_gqa_key_value_heads_and_errors():
    model, clean, corr, ans, wrong = build("llama")
    met = LogitDiff(ans, wrong)
    r = activation_patching(model, "k", clean, corr, metric=met)
    assert r.coords["head"] == [0, 1] and r.values.shape == (3, 2, 2, 6)  # key/value heads
    assert activation_patching(model, "q", clean, corr, metric=met).coords["head"] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="key/value heads 0..1"):
        activation_patching(model, "v", clean, corr, metric=met, heads=[2])
    neox = build("neox")[0]
    with pytest.raises(ValueError, match="parallel_attn_mlp"):
        activation_patching(neox, "resid_mid", clean, corr, metric=met)
    with pytest.raises(ValueError, match="parallel_attn_mlp"):
        attribution_patching(neox, clean, corr, metric=met, sites=["resid_mid"])
    with pytest.raises(ValueError, match="max_batch="):
        activation_patching(model, "z", clean, corr, metric=met, max_batch=0)


def test_batch_cap_gives_the_same_grid():
    model, clean, corr, ans, wrong = build("llama")
    met = LogitDiff(ans, wrong)
    for site in ["z", "resid_pre", "k"]:
        full = activation_patching(model, site, clean, corr, metric=met)
        one = activation_patching(model, site, clean, corr, metric=met, max_batch=1)
        tiny = activation_patching(model, site, clean, corr, metric=met, max_memory=1)
        assert one.info["max_batch"] == 1 and tiny.info["max_batch"] == 1 and full.info["max_batch"] > 8
        torch.testing.assert_close(one.values, full.values, rtol=0, atol=1e-12)
        torch.testing.assert_close(tiny.values, full.values, rtol=0, atol=1e-12)


# ----- AtP ----------------------------------------------------------------------------------------------------
def first_order(model, site, clean, corr, ans, wrong, layer, head, pos):
    """d/dt of the logit difference when the cell's activation moves from corrupted to clean by t, at t = 0:
    ``(batch,)``, by autograd through one forward (independent of AtP's cached gradients)."""
    name = HOOKS[site].format(layer)
    with torch.no_grad():
        _, cache = model.run_with_cache(clean, names_filter=[name])
    t = torch.zeros(clean.shape[0], dtype=torch.float64, requires_grad=True)

    def move(x, hook):
        target = replace(x.detach(), cache[name], site, head, pos)
        return x + t.view(-1, *[1] * (x.dim() - 1)) * (target - x.detach())

    logits = model.run_with_hooks(corr, fwd_hooks=[(name, move)])[:, -1]
    ld = logits.gather(-1, ans[:, None]) - logits.gather(-1, wrong[:, None])
    (g,) = torch.autograd.grad(ld.sum(), t)
    return g


@pytest.mark.parametrize(
    "arch",
    [
        "neox",
        "llama",
        "mistral_window",
        "mqa_gptj",
        "qwen2",
        "qwen3",
        "gemma2",
        "gemma3",
        "olmo2",
        "phi",
        "bloom",
        "alibi_gqa",
        "rmspre",
    ],
)
def test_atp_equals_autograd_directional_derivative(arch):
    model, clean, corr, ans, wrong = build(arch)
    sites = [s for s in sites_of(model)]
    atp = attribution_patching(model, clean, corr, metric=LogitDiff(ans, wrong), sites=sites)
    for site in sites:
        eff = atp[site].effect  # (batch, layer[, head], pos)
        for layer in range(2):
            for head in [eff.shape[2] - 1] if site in HEADS else [None]:
                for pos in (1, 5):
                    want = first_order(model, site, clean, corr, ans, wrong, layer, head, pos)
                    got = eff[(slice(None), layer) + ((head,) if head is not None else ()) + (pos,)]
                    torch.testing.assert_close(got, want, rtol=0, atol=1e-9, msg=f"{arch} {site} {layer}")
        assert eff.abs().max() > 1e-3


@pytest.mark.parametrize(
    "arch", ["neox", "llama", "mistral_window", "mqa_gptj", "tied", "gemma2", "bloom", "alibi_gqa"]
)
@pytest.mark.parametrize("per_position", [True, False])
def test_atp_star_qk_fix_exact_where_the_rest_is_linear(arch, per_position):
    """Attention-only and without norms, the last layer is linear from its pattern on: AtP with the QK fix
    (softmax recomputed from the rotated source queries/keys, key/value heads of their group; soft-capped scores
    capped, for a key patched at one position too) is exact there."""
    linear = dict(
        norm_weight_offset=0.0, use_normalization_before_and_after=False, output_logits_soft_cap=None
    )
    extra = linear if arch == "gemma2" else {}
    model, clean, corr, ans, wrong = build(
        arch, d_mlp=None, gated_mlp=False, normalization_type=None, **extra
    )
    with torch.no_grad():  # sharper attention: the softmax is far from linear in the patched queries and keys
        for blk in model.blocks:
            blk.attn.W_Q.mul_(4.0)
            blk.attn.W_K.mul_(4.0)
    met = LogitDiff(ans, wrong)
    star = attribution_patching(
        model, clean, corr, metric=met, sites=["q", "k", "v", "z"], per_position=per_position, qk_fix=True
    )
    plain = attribution_patching(model, clean, corr, metric=met, sites=["q", "k"], per_position=per_position)
    # a float32 softmax (BLOOM's) rounds the exact grid's patterns; the per-position key fix is computed from the
    # scores in float64 (in log space: where the float32 pattern underflows to 0, a raised score still counts)
    tol = 1e-6 if model.cfg.attn_softmax_dtype == torch.float32 else 1e-9
    for site in ["q", "k", "v", "z"]:
        exact = activation_patching(model, site, clean, corr, metric=met, per_position=per_position)
        assert star[site].values.shape == exact.values.shape
        torch.testing.assert_close(star[site].values[:, 1], exact.values[:, 1], rtol=0, atol=tol)
        assert exact.effect[:, 1].abs().max() > 1e-5  # well above the tolerance
    for site in ["q", "k"]:
        exact = activation_patching(model, site, clean, corr, metric=met, per_position=per_position)
        assert (plain[site].values[:, 1] - exact.values[:, 1]).abs().max() > 1e-5  # plain AtP: first order


@pytest.mark.parametrize("arch", ["neox", "llama"])
def test_atp_star_qk_fix_takes_the_models_softmax(arch):
    """The QK fix recomputes the softmax as the model takes it (``attn_softmax_dtype``; bfloat16 here, far from
    float64): exact where the rest is linear, for whole-sequence query and key patches."""
    model, clean, corr, ans, wrong = build(
        arch, d_mlp=None, gated_mlp=False, normalization_type=None, attn_softmax_dtype=torch.bfloat16
    )
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.W_Q.mul_(4.0)
            blk.attn.W_K.mul_(4.0)
    met = LogitDiff(ans, wrong)
    star = attribution_patching(
        model, clean, corr, metric=met, sites=["q", "k"], per_position=False, qk_fix=True
    )
    for site in ["q", "k"]:
        exact = activation_patching(model, site, clean, corr, metric=met, per_position=False)
        torch.testing.assert_close(star[site].values[:, 1], exact.values[:, 1], rtol=0, atol=1e-9)
        assert exact.effect[:, 1].abs().max() > 1e-5


@pytest.mark.parametrize("arch", ["llama", "neox", "alibi_gqa"])
@pytest.mark.parametrize("sharpness", [40.0, 100.0])
def test_atp_star_key_fix_on_saturated_attention(arch, sharpness):
    """The per-position key fix where attention weights round to 1 (sharp queries and keys): computed from
    log-sums over the other keys, it is exact where the rest is linear in float64 and equals the float64 value
    in float32 (the form with 1 - p and "all but one" differences gave NaN in float32 and lost every digit in
    float64)."""
    model, clean, corr, ans, wrong = build(arch, d_mlp=None, gated_mlp=False, normalization_type=None)
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.W_Q.mul_(sharpness)
            blk.attn.W_K.mul_(sharpness)
    _, cache = model.run_with_cache(clean)
    pat = cache["blocks.1.attn.hook_pattern"][:, :, 1:]
    assert int((pat == 1).sum()) > 0  # saturated rows: weights that round to 1
    met = LogitDiff(ans, wrong)
    star = attribution_patching(model, clean, corr, metric=met, sites=["k"], qk_fix=True)["k"]
    exact = activation_patching(model, "k", clean, corr, metric=met)
    tol = 1e-6 if model.cfg.attn_softmax_dtype == torch.float32 else 1e-9
    torch.testing.assert_close(star.values[:, 1], exact.values[:, 1], rtol=0, atol=tol)
    m32 = Transformer(TransformerConfig(**{**model.cfg.to_dict(), "dtype": "float32"}))
    m32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    s32 = attribution_patching(m32, clean, corr, metric=met, sites=["k"], qk_fix=True)["k"].effect
    assert torch.isfinite(s32).all()
    scale = float(star.effect.abs().max())
    # float32 scores of size ~1e4 round at ~1e-3: the estimate keeps about five digits of the float64 one
    assert (s32.double() - star.effect).abs().max() <= 1e-4 * max(scale, 1.0)
