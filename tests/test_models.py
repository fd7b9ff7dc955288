import copy
import math

import pytest
import torch
import torch.nn.functional as F

from pypattern.models.hf import HAS_TRANSFORMERS, gpt2_from_config, gpt2_hook_points, hooked_gpt2
from pypattern.models.hooks import HookedModule
from pypattern.models.transformer import Transformer, TransformerConfig, component_masks, gelu_new

pytestmark = pytest.mark.usefixtures("one_thread")


def small(**kw):
    cfg = dict(n_layers=2, d_model=32, n_heads=4, d_mlp=64, d_vocab=11, n_ctx=9, seed=1, dtype=torch.float64)
    cfg.update(kw)
    return Transformer(TransformerConfig(**cfg))


def reference_forward(model, tokens):
    """Independent implementation (F.layer_norm, scaled_dot_product_attention) of the same architecture."""
    cfg = model.cfg
    p = dict(model.named_parameters())
    x = p["embed.W_E"][tokens]
    if cfg.positional_embedding:
        x = x + p["pos_embed.W_pos"][: tokens.shape[1]]

    def ln(x, name):
        if cfg.normalization_type is None:
            return x
        return F.layer_norm(x, (cfg.d_model,), p[f"{name}.w"], p[f"{name}.b"], eps=cfg.ln_eps)

    for layer in range(cfg.n_layers):
        a = f"blocks.{layer}.attn"
        h = ln(x, f"blocks.{layer}.ln1")
        q = torch.einsum("bpd,hde->bhpe", h, p[f"{a}.W_Q"]) + p[f"{a}.b_Q"][None, :, None]
        k = torch.einsum("bpd,hde->bhpe", h, p[f"{a}.W_K"]) + p[f"{a}.b_K"][None, :, None]
        v = torch.einsum("bpd,hde->bhpe", h, p[f"{a}.W_V"]) + p[f"{a}.b_V"][None, :, None]
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + torch.einsum("bhpe,hed->bpd", z, p[f"{a}.W_O"]) + p[f"{a}.b_O"]
        if not cfg.attn_only:
            m = f"blocks.{layer}.mlp"
            h = ln(x, f"blocks.{layer}.ln2") @ p[f"{m}.W_in"] + p[f"{m}.b_in"]
            act = {"gelu": F.gelu, "relu": F.relu, "gelu_new": lambda t: F.gelu(t, approximate="tanh")}
            x = x + act[cfg.act_fn](h) @ p[f"{m}.W_out"] + p[f"{m}.b_out"]
    return ln(x, "ln_final") @ p["unembed.W_U"] + p["unembed.b_U"]


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"d_mlp": None},
        {"act_fn": "relu", "normalization_type": None},
        {"act_fn": "gelu_new", "positional_embedding": False, "n_layers": 3},
    ],
)
def test_forward_matches_independent_reference(kw):
    model = small(**kw)
    with torch.no_grad():  # make biases non-zero so that they are tested too
        for n, prm in model.named_parameters():
            if ".b" in n or n.endswith(".w"):
                prm.add_(0.1 * torch.randn_like(prm))
    tokens = torch.randint(0, 11, (3, 9))
    torch.testing.assert_close(model(tokens), reference_forward(model, tokens), rtol=1e-10, atol=1e-10)


def test_gelu_new_is_tanh_gelu():
    x = torch.linspace(-5, 5, 101, dtype=torch.float64)
    torch.testing.assert_close(gelu_new(x), F.gelu(x, approximate="tanh"))


def test_hook_names_and_shapes():
    model = small()
    tokens = torch.randint(0, 11, (2, 9))
    _, cache = model.run_with_cache(tokens)
    for name in ["hook_embed", "hook_pos_embed", "ln_final.hook_normalized", "ln_final.hook_scale"]:
        assert name in cache
    for layer in range(2):
        b = f"blocks.{layer}"
        for n in ["hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out"]:
            assert cache[f"{b}.{n}"].shape == (2, 9, 32)
        for n in ["hook_q", "hook_k", "hook_v", "hook_z"]:
            assert cache[f"{b}.attn.{n}"].shape == (2, 9, 4, 8)
        pat = cache[f"{b}.attn.hook_pattern"]
        assert pat.shape == (2, 4, 9, 9)
        torch.testing.assert_close(pat.sum(-1), torch.ones(2, 4, 9, dtype=pat.dtype))
        assert torch.all(pat.triu(1) == 0)  # causal
        torch.testing.assert_close(
            cache[f"{b}.hook_resid_mid"], cache[f"{b}.hook_resid_pre"] + cache[f"{b}.hook_attn_out"]
        )
    # attention-only models have no MLP hooks
    _, c2 = small(d_mlp=None).run_with_cache(tokens)
    assert "blocks.0.hook_mlp_out" not in c2 and "blocks.0.hook_resid_mid" not in c2


def test_run_with_hooks_replaces_and_always_removes():
    model = small()
    tokens = torch.randint(0, 11, (2, 9))
    base = model(tokens)

    def zero(x, hook):
        return torch.zeros_like(x)

    out = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_resid_post", zero)])
    torch.testing.assert_close(out, model.unembed(model.ln_final(torch.zeros(2, 9, 32, dtype=torch.float64))))

    def boom(x, hook):
        raise RuntimeError("inside hook")

    with pytest.raises(RuntimeError):
        model.run_with_hooks(tokens, fwd_hooks=[(lambda n: n.endswith("hook_z"), boom)])
    assert all(not hp._fns for hp in model.hook_dict.values())
    torch.testing.assert_close(model(tokens), base)
    with pytest.raises(KeyError):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.9.hook_nothing", zero)])


def test_losses_consistent():
    model = small()
    tokens = torch.randint(0, 11, (2, 9))
    logits = model(tokens)
    per = model(tokens, return_type="per_token_loss")
    assert per.shape == (2, 8)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 11), tokens[:, 1:].reshape(-1))
    torch.testing.assert_close(model(tokens, return_type="loss"), ref)
    torch.testing.assert_close(per.mean(), ref)
    with pytest.raises(ValueError, match="return_type"):
        model(tokens, return_type="bogus")


def test_config_validation():
    with pytest.raises(ValueError, match="act_fn"):
        TransformerConfig(act_fn="swish")
    with pytest.raises(ValueError, match="normalization_type"):
        TransformerConfig(normalization_type="BatchNorm")
    assert TransformerConfig(d_model=64, n_heads=4).d_head == 16


def test_component_masks_select_exactly_one_head():
    model = small()
    masks = component_masks(model, "blocks.1.attn.head.2")
    assert set(masks) == {f"blocks.1.attn.{n}" for n in ["W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V"]}
    for m in masks.values():
        assert m[2].all() and m.sum() == m[2].numel()
    # moving only the masked weights changes only that head's z
    tokens = torch.randint(0, 11, (2, 9))
    _, before = model.run_with_cache(tokens)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in masks:
                p.add_(masks[n] * torch.randn_like(p))
    _, after = model.run_with_cache(tokens)
    z0, z1 = before["blocks.1.attn.hook_z"], after["blocks.1.attn.hook_z"]
    assert not torch.allclose(z0[:, :, 2], z1[:, :, 2])
    torch.testing.assert_close(z0[:, :, [0, 1, 3]], z1[:, :, [0, 1, 3]])
    allm = model.component_masks("blocks.0.mlp", all_params=True)
    assert set(allm) == {n for n, _ in model.named_parameters()}
    assert sum(int(m.sum()) for m in allm.values()) == sum(
        p.numel() for n, p in model.named_parameters() if n.startswith("blocks.0.mlp.")
    )
    assert set(component_masks(model, "embed")) == {"embed.W_E"}
    assert "blocks.0.attn.head.3" in model.components() and "blocks.1.mlp" in model.components()
    with pytest.raises(ValueError, match="head 7"):
        component_masks(model, "blocks.0.attn.head.7")
    with pytest.raises(ValueError, match="layer 5 is out of range; the model has 2 layers"):
        component_masks(model, "blocks.5.mlp")
    with pytest.raises(ValueError, match="matches no parameter"):
        component_masks(model, "blocks.1.nothing")


def test_generic_module_paths_match_native_hooks():
    model = small()
    tokens = torch.randint(0, 11, (2, 9))
    _, cache = model.run_with_cache(tokens)
    pts = {}
    for layer in range(2):
        pts[f"blocks.{layer}.hook_resid_pre"] = f"blocks.{layer}:input"
        pts[f"blocks.{layer}.hook_resid_post"] = f"blocks.{layer}"
        pts[f"blocks.{layer}.hook_attn_out"] = f"blocks.{layer}.attn"
        pts[f"blocks.{layer}.hook_mlp_out"] = f"blocks.{layer}.mlp"
    hm = HookedModule(model, pts)
    out, gcache = hm.run_with_cache(tokens)
    torch.testing.assert_close(out, model(tokens))
    for n in pts:
        torch.testing.assert_close(gcache[n], cache[n])

    def zero_pos3(x, hook):
        x = x.clone()
        x[:, 3] = 0
        return x

    a = hm.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_attn_out", zero_pos3)])
    b = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_attn_out", zero_pos3)])
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, out)
    torch.testing.assert_close(hm(tokens), out)  # removed again
    with pytest.raises(KeyError, match="no sub-module"):
        HookedModule(model, {"x": "blocks.7"})


def test_gpt2_hook_point_paths():
    pts = gpt2_hook_points(2)
    assert pts["blocks.1.hook_resid_pre"] == "transformer.h.1:input"
    assert pts["blocks.0.hook_mlp_out"] == "transformer.h.0.mlp"


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed (optional dependency)")
def test_hf_gpt2_from_config_hooks():
    gpt2 = gpt2_from_config(n_layers=2, d_model=32, n_heads=4, d_vocab=20, n_ctx=8)
    hm = hooked_gpt2(gpt2)
    tokens = torch.randint(0, 20, (2, 8))
    out, cache = hm.run_with_cache(tokens)
    assert out.shape == (2, 8, 20)
    torch.testing.assert_close(cache["blocks.0.hook_resid_post"], cache["blocks.1.hook_resid_pre"])


def test_gpt2_without_transformers_raises_clearly():
    if HAS_TRANSFORMERS:
        pytest.skip("transformers is installed")
    with pytest.raises(ImportError, match="transformers"):
        gpt2_from_config()


def test_float32_default_and_init_scale():
    model = Transformer(TransformerConfig(n_layers=1, d_model=64, n_heads=4, d_mlp=None, d_vocab=50, n_ctx=8))
    assert model.embed.W_E.dtype == torch.float32
    assert abs(model.embed.W_E.std().item() - 0.8 / math.sqrt(64)) < 0.01
    m2 = Transformer(TransformerConfig(n_layers=1, d_model=64, n_heads=4, d_mlp=None, d_vocab=50, n_ctx=8))
    torch.testing.assert_close(m2.embed.W_E, model.embed.W_E)  # seeded


def test_generic_module_with_keyword_inputs_and_tuple_outputs():
    """Hugging Face blocks are called with ``hidden_states=`` and return tuples: both are hooked."""

    class Blk(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, hidden_states=None, extra=None):
            return (self.lin(hidden_states), None)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.h = torch.nn.ModuleList([Blk(), Blk()])

        def forward(self, x):
            for b in self.h:
                x = b(hidden_states=x)[0]
            return x

    net = Net()
    hm = HookedModule(
        net, {"blocks.1.hook_resid_pre": "h.1:input", "blocks.0.hook_resid_post": "h.0"}, n_layers=2
    )
    x = torch.randn(2, 3, 4)
    _, cache = hm.run_with_cache(x)
    torch.testing.assert_close(cache["blocks.1.hook_resid_pre"], cache["blocks.0.hook_resid_post"])
    out = hm.run_with_hooks(x, fwd_hooks=[("blocks.1.hook_resid_pre", lambda t, h: torch.zeros_like(t))])
    torch.testing.assert_close(out, net.h[1].lin.bias.detach().expand_as(out))


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("compute_dtype", [None, torch.float32])
def test_layernorm_fused_path_equals_explicit_one(affine, compute_dtype):
    """LayerNorm (and the parameter-free LNPre) runs torch's fused kernel; a hook that only reads hook_scale leaves
    the output bit-identical (a cached run equals the plain one), and one that replaces the scale switches to the
    explicit form ``(x - mean) / scale``."""
    from pypattern.models.transformer import LayerNorm, LayerNormPre

    torch.manual_seed(0)
    ln = (LayerNorm if affine else LayerNormPre)(16, 1e-5, torch.float64, compute_dtype)
    if affine:
        with torch.no_grad():
            ln.w.normal_()
            ln.b.normal_()
    x = torch.randn(3, 5, 16, dtype=torch.float64) * 4 + 2
    fused = ln(x)
    seen = []
    remove = ln.hook_scale.add_hook(lambda t, hook: seen.append(t))
    read = ln(x)
    remove()
    assert len(seen) == 1 and seen[0].shape == (3, 5, 1)
    assert torch.equal(fused, read)
    remove = ln.hook_scale.add_hook(lambda t, hook: t * 2)  # halves the normalised input
    doubled = ln(x)
    remove()
    tol = 1e-12 if compute_dtype is None else 1e-6
    w = ln.w.detach() if affine else 1.0
    b = ln.b.detach() if affine else 0.0
    torch.testing.assert_close((doubled - b) * 2 + b, fused, rtol=tol, atol=tol)
    xhat = (x - x.mean(-1, keepdim=True)) / (x.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    torch.testing.assert_close(fused, xhat * w + b, rtol=tol, atol=tol)


@pytest.mark.parametrize("compute_dtype", [None, torch.float32])
def test_rms_norm_pre_is_rmsnorm_without_weight(compute_dtype):
    """RMSPre (TransformerLens' name for an RMSNorm whose weight was folded away): ``x / sqrt(mean(x^2) + eps)`` in
    its compute dtype, cast back; a hook replacing ``hook_scale`` replaces the divisor; the model has no norm
    parameters and its forward equals an RMS model's with unit weights."""
    from pypattern.models.transformer import RMSNormPre

    torch.manual_seed(0)
    norm = RMSNormPre(16, 1e-5, torch.float64, compute_dtype)
    x = torch.randn(3, 5, 16, dtype=torch.float64) * 4 + 2
    h = x if compute_dtype is None else x.to(compute_dtype)
    want = (h / (h.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()).to(torch.float64)
    torch.testing.assert_close(norm(x), want, rtol=0, atol=0)
    remove = norm.hook_scale.add_hook(lambda t, hook: t * 2)
    torch.testing.assert_close(norm(x), want / 2, rtol=1e-15, atol=0)
    remove()
    assert list(norm.parameters()) == []
    kw = dict(n_layers=2, d_model=16, n_heads=4, d_mlp=24, d_vocab=11, dtype=torch.float64, seed=1)
    pre = Transformer(TransformerConfig(normalization_type="RMSPre", **kw))
    rms = Transformer(TransformerConfig(normalization_type="RMS", **kw))
    assert not any(".ln" in n for n, _ in pre.named_parameters())
    state = {k: v for k, v in rms.state_dict().items() if ".w" not in k or "ln" not in k}
    pre.load_state_dict(state, strict=True)
    tokens = torch.randint(0, 11, (2, 7))
    torch.testing.assert_close(pre(tokens), rms(tokens), rtol=1e-13, atol=1e-13)
    with pytest.raises(ValueError, match="norm_weight_offset"):
        TransformerConfig(normalization_type="RMSPre", norm_weight_offset=1.0)


# ----- architecture options (RMSNorm, rotary, GQA, gated MLP, parallel blocks, biases, tied embeddings) ---------


def rich(**kw):
    cfg = dict(
        n_layers=2,
        d_model=40,
        n_heads=4,
        d_head=12,
        d_mlp=56,
        d_vocab=13,
        n_ctx=10,
        seed=3,
        dtype=torch.float64,
    )
    cfg.update(kw)
    model = Transformer(TransformerConfig(**cfg))
    with torch.no_grad():  # non-trivial biases and norm weights
        for n, prm in model.named_parameters():
            if ".b" in n or n.endswith(".w"):
                prm.add_(0.2 * torch.randn_like(prm))
    return model


def _rotate_complex(x, pos, r, base, adjacent):
    """Rotary embedding as a complex multiplication (independent of the model's rotate_half form)."""
    xr, xp = x[..., :r], x[..., r:]
    if adjacent:
        pairs = torch.complex(xr[..., 0::2], xr[..., 1::2])
    else:
        pairs = torch.complex(xr[..., : r // 2], xr[..., r // 2 :])
    theta = pos[:, None].double() / base ** (torch.arange(0, r, 2, dtype=torch.float64) / r)
    turned = pairs * torch.polar(torch.ones_like(theta), theta)[:, None, :]
    if adjacent:
        out = torch.stack((turned.real, turned.imag), -1).flatten(-2)
    else:
        out = torch.cat((turned.real, turned.imag), -1)
    return torch.cat((out, xp), -1)


def reference_forward_general(model, tokens):
    """Independent forward for every option: explicit norms, complex rotary, repeated K/V with an explicit mask."""
    cfg = model.cfg
    p = dict(model.named_parameters())
    g = p.get
    T = tokens.shape[1]
    pos = torch.arange(T)
    x = p["embed.W_E"][tokens]
    if cfg.positional_embedding_type == "standard":
        x = x + p["pos_embed.W_pos"][:T]

    def norm(x, name):
        if cfg.normalization_type == "LN":
            return F.layer_norm(x, (cfg.d_model,), p[f"{name}.w"], p[f"{name}.b"], eps=cfg.ln_eps)
        if cfg.normalization_type == "RMS":
            return p[f"{name}.w"] * x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.ln_eps)
        return x

    def lin(x, W, b):
        return x @ W + (0 if b is None else b)

    def heads(x, W, b):
        y = torch.einsum("bpd,hde->bphe", x, W)
        return y if b is None else y + b

    acts = {"gelu": F.gelu, "relu": F.relu, "silu": lambda t: t * torch.sigmoid(t)}
    allowed = (pos[None, :] <= pos[:, None]) & (
        (pos[:, None] - pos[None, :] < cfg.sliding_window) if cfg.sliding_window else True
    )
    for layer in range(cfg.n_layers):
        a, m = f"blocks.{layer}.attn", f"blocks.{layer}.mlp"
        h = norm(x, f"blocks.{layer}.ln1")
        q = heads(h, p[f"{a}.W_Q"], g(f"{a}.b_Q"))
        k = heads(h, p[f"{a}.W_K"], g(f"{a}.b_K"))
        v = heads(h, p[f"{a}.W_V"], g(f"{a}.b_V"))
        if cfg.positional_embedding_type == "rotary":
            args = (pos, cfg.rotary_dim, cfg.rotary_base, cfg.rotary_adjacent_pairs)
            q, k = _rotate_complex(q, *args), _rotate_complex(k, *args)
        rep = cfg.n_heads // k.shape[2]
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        s = torch.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(cfg.d_head)
        s = torch.where(allowed, s, torch.tensor(-1e300, dtype=s.dtype))
        z = torch.einsum("bhqk,bkhe->bqhe", s.softmax(-1), v)
        attn_out = torch.einsum("bqhe,hed->bqd", z, p[f"{a}.W_O"]) + (
            0 if g(f"{a}.b_O") is None else p[f"{a}.b_O"]
        )
        if cfg.attn_only:
            x = x + attn_out
            continue
        mid = x if cfg.parallel_attn_mlp else x + attn_out
        h = norm(mid, f"blocks.{layer}.ln2")
        act = acts[cfg.act_fn]
        if cfg.gated_mlp:
            post = act(lin(h, p[f"{m}.W_gate"], g(f"{m}.b_gate"))) * lin(h, p[f"{m}.W_in"], g(f"{m}.b_in"))
        else:
            post = act(lin(h, p[f"{m}.W_in"], g(f"{m}.b_in")))
        x = mid + lin(post, p[f"{m}.W_out"], g(f"{m}.b_out")) + (attn_out if cfg.parallel_attn_mlp else 0)
    W_U = p["embed.W_E"].T if cfg.tie_word_embeddings else p["unembed.W_U"]
    return lin(norm(x, "ln_final"), W_U, g("unembed.b_U"))


RICH_CASES = [
    dict(normalization_type="RMS", positional_embedding_type="rotary", gated_mlp=True, act_fn="silu"),
    dict(positional_embedding_type="rotary", rotary_dim=4, parallel_attn_mlp=True, n_key_value_heads=2),
    dict(positional_embedding_type="rotary", rotary_dim=6, rotary_adjacent_pairs=True, n_key_value_heads=1),
    dict(
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_base=500.0,
        n_key_value_heads=2,
        gated_mlp=True,
        act_fn="silu",
        attn_bias=True,
        attn_out_bias=False,
        mlp_bias=False,
        unembed_bias=False,
        tie_word_embeddings=True,
        sliding_window=3,
    ),
    dict(positional_embedding=False, attn_bias=False, mlp_bias=True, parallel_attn_mlp=True, act_fn="relu"),
    dict(normalization_type=None, d_mlp=None, positional_embedding_type="rotary", tie_word_embeddings=True),
]


@pytest.mark.parametrize("kw", RICH_CASES)
def test_architecture_options_match_independent_reference(kw):
    model = rich(**kw)
    tokens = torch.randint(0, 13, (3, 10))
    torch.testing.assert_close(
        model(tokens), reference_forward_general(model, tokens), rtol=1e-10, atol=1e-10
    )


@pytest.mark.parametrize("kw", RICH_CASES)
def test_architecture_options_hooks_and_parameters(kw):
    model = rich(**kw)
    cfg = model.cfg
    params = dict(model.named_parameters())
    a = "blocks.0.attn"
    assert params[f"{a}.W_K"].shape == (cfg.n_key_value_heads, 40, 12)
    assert (f"{a}.b_Q" in params) == cfg.attn_bias and (f"{a}.b_O" in params) == cfg.attn_out_bias
    assert ("unembed.W_U" in params) == (not cfg.tie_word_embeddings)
    assert ("unembed.b_U" in params) == cfg.unembed_bias
    assert ("pos_embed.W_pos" in params) == (cfg.positional_embedding_type == "standard")
    if not cfg.attn_only:
        assert ("blocks.0.mlp.W_gate" in params) == cfg.gated_mlp
        assert ("blocks.0.mlp.b_in" in params) == cfg.mlp_bias
    if cfg.normalization_type == "RMS":
        assert "blocks.0.ln1.w" in params and "blocks.0.ln1.b" not in params
    tokens = torch.randint(0, 13, (2, 10))
    _, cache = model.run_with_cache(tokens)
    assert set(cache) == set(model.hook_dict)
    H, Hkv = cfg.n_heads, cfg.n_key_value_heads
    assert cache[f"{a}.hook_q"].shape == (2, 10, H, 12)
    assert cache[f"{a}.hook_k"].shape == cache[f"{a}.hook_v"].shape == (2, 10, Hkv, 12)
    assert cache[f"{a}.hook_z"].shape == (2, 10, H, 12)
    assert cache[f"{a}.hook_pattern"].shape == (2, H, 10, 10)
    rot = cfg.positional_embedding_type == "rotary"
    assert (f"{a}.hook_rot_q" in cache) == rot and (f"{a}.hook_rot_k" in cache) == rot
    if rot:
        r = cfg.rotary_dim
        assert cache[f"{a}.hook_rot_k"].shape == (2, 10, Hkv, 12)
        # the first rotary_dim dims turn (position 0 does not), the rest pass through
        torch.testing.assert_close(cache[f"{a}.hook_rot_q"][..., r:], cache[f"{a}.hook_q"][..., r:])
        torch.testing.assert_close(cache[f"{a}.hook_rot_q"][:, 0], cache[f"{a}.hook_q"][:, 0])
        assert not torch.allclose(cache[f"{a}.hook_rot_q"][:, 1:, :, :r], cache[f"{a}.hook_q"][:, 1:, :, :r])
    if cfg.sliding_window:
        pat = cache[f"{a}.hook_pattern"]
        qi, ki = torch.meshgrid(torch.arange(10), torch.arange(10), indexing="ij")
        assert torch.all(pat[..., qi - ki >= cfg.sliding_window] == 0)
    if not cfg.attn_only:
        assert ("blocks.0.hook_resid_mid" in cache) == (not cfg.parallel_attn_mlp)
        assert ("blocks.0.mlp.hook_pre_linear" in cache) == cfg.gated_mlp
        resid = (
            cache["blocks.0.hook_resid_pre"]
            + cache["blocks.0.hook_attn_out"]
            + cache["blocks.0.hook_mlp_out"]
        )
        torch.testing.assert_close(cache["blocks.0.hook_resid_post"], resid)
        if cfg.gated_mlp:
            act = F.silu(cache["blocks.0.mlp.hook_pre"]) * cache["blocks.0.mlp.hook_pre_linear"]
            torch.testing.assert_close(cache["blocks.0.mlp.hook_post"], act)
    if cfg.normalization_type is not None:
        assert cache["blocks.0.ln1.hook_scale"].shape == (2, 10, 1)


def test_rms_norm_hooked_scale_equals_fast_path():
    from pypattern.models.transformer import RMSNorm

    for cd in (None, torch.float32):
        n = RMSNorm(16, 1e-6, torch.float64, compute_dtype=cd)
        with torch.no_grad():
            n.w.normal_()
        x = torch.randn(3, 5, 16, dtype=torch.float64) * 3 + 1
        fast = n(x)
        seen = []
        remove = n.hook_scale.add_hook(lambda t, hook, seen=seen: seen.append(t))
        slow = n(x)
        remove()
        tol = 1e-12 if cd is None else 1e-6
        torch.testing.assert_close(fast, slow, rtol=tol, atol=tol)
        ref = n.w * x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
        torch.testing.assert_close(fast, ref, rtol=tol, atol=tol)
        assert fast.dtype == torch.float64 and seen[0].shape == (3, 5, 1)


def test_gqa_head_mask_moves_exactly_that_head_and_kv_head_its_group():
    model = rich(n_key_value_heads=2, positional_embedding_type="rotary", gated_mlp=True, act_fn="silu")
    Hkv = 2  # of 4 heads: heads 0, 1 read kv head 0; heads 2, 3 read kv head 1
    a = "blocks.1.attn"
    head = component_masks(model, f"{a}.head.3")
    assert set(head) == {f"{a}.{n}" for n in ["W_Q", "W_O", "b_Q"]}
    for n in ("W_Q", "W_O", "b_Q"):
        assert head[f"{a}.{n}"][3].all() and head[f"{a}.{n}"].sum() == head[f"{a}.{n}"][3].numel()
    kv = component_masks(model, f"{a}.kv_head.1")
    assert set(kv) == {f"{a}.{n}" for n in ["W_K", "W_V", "b_K", "b_V"]}
    for n in ("W_K", "W_V", "b_K", "b_V"):
        assert kv[f"{a}.{n}"].shape[0] == Hkv
        assert kv[f"{a}.{n}"][1].all() and kv[f"{a}.{n}"].sum() == kv[f"{a}.{n}"][1].numel()
    both = component_masks(model, f"{a}.head.3", include_shared_kv=True)
    assert set(both) == set(head) | set(kv)
    # heads, kv heads and b_O partition the attention's parameters
    comps = [c for c in model.components() if c.startswith(a + ".")]
    assert comps == [f"{a}.head.{h}" for h in range(4)] + [f"{a}.kv_head.{g}" for g in range(Hkv)]
    cover = {
        n: torch.zeros_like(p, dtype=torch.int64) for n, p in model.named_parameters() if n.startswith(a)
    }
    for c in comps:
        for n, m in component_masks(model, c).items():
            cover[n] += m.long()
    for n, c in cover.items():
        assert (c == (0 if n.endswith("b_O") else 1)).all(), n
    with pytest.raises(ValueError, match="kv_head"):
        component_masks(rich(), f"{a}.kv_head.0")
    tokens = torch.randint(0, 13, (2, 10))

    def moved(masks):
        m = copy.deepcopy(model)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n in masks:
                    p.add_(masks[n] * torch.randn_like(p))
        return m.run_with_cache(tokens)[1][f"{a}.hook_z"]

    z0 = model.run_with_cache(tokens)[1][f"{a}.hook_z"]
    z1 = moved(head)  # exactly head 3 moves
    torch.testing.assert_close(z0[:, :, :3], z1[:, :, :3], rtol=0, atol=0)
    assert not torch.allclose(z0[:, :, 3], z1[:, :, 3])
    z2 = moved(kv)  # kv head 1 moves heads 2 and 3, not the other group
    torch.testing.assert_close(z0[:, :, :2], z2[:, :, :2], rtol=0, atol=0)
    assert not torch.allclose(z0[:, :, 2], z2[:, :, 2]) and not torch.allclose(z0[:, :, 3], z2[:, :, 3])
    # the MLP component includes the gate
    assert "blocks.0.mlp.W_gate" in component_masks(model, "blocks.0.mlp")


def test_tied_embeddings_are_one_parameter():
    tied = rich(tie_word_embeddings=True, unembed_bias=False)
    names = [n for n, _ in tied.named_parameters()]
    assert "unembed.W_U" not in names and names.count("embed.W_E") == 1
    assert [n for n, _ in tied.named_parameters(remove_duplicate=False)] == names
    assert tied.unembed.W_U.shape == (40, 13) and torch.equal(tied.unembed.W_U, tied.embed.W_E.T)
    assert "unembed" not in tied.components()
    twin = copy.deepcopy(tied)  # the copy's unembedding reads the copy's embedding
    with torch.no_grad():
        twin.embed.W_E.mul_(2.0)
    assert torch.equal(twin.unembed.W_U, twin.embed.W_E.T) and not torch.equal(
        twin.unembed.W_U, tied.unembed.W_U
    )
    assert set(component_masks(tied, "unembed")) == {"embed.W_E"}
    # the gradient of the one weight is the sum of its two uses (an untied copy gives both separately)
    untied = rich(tie_word_embeddings=False, unembed_bias=False)
    sd = {k: v for k, v in tied.state_dict().items()}
    sd["unembed.W_U"] = tied.embed.W_E.detach().T.clone()
    untied.load_state_dict(sd)
    tokens = torch.randint(0, 13, (2, 10))
    torch.testing.assert_close(tied(tokens), untied(tokens))
    (g_tied,) = torch.autograd.grad(tied(tokens, return_type="loss"), [tied.embed.W_E])
    g_e, g_u = torch.autograd.grad(untied(tokens, return_type="loss"), [untied.embed.W_E, untied.unembed.W_U])
    torch.testing.assert_close(g_tied, g_e + g_u.T)
    # functional_call with a replaced embedding changes both uses
    new = {n: p.detach() * 1.5 if n == "embed.W_E" else p.detach() for n, p in tied.named_parameters()}
    sd["unembed.W_U"] = new["embed.W_E"].T.clone()
    sd["embed.W_E"] = new["embed.W_E"]
    untied.load_state_dict(sd)
    torch.testing.assert_close(torch.func.functional_call(tied, new, (tokens,)), untied(tokens))


@pytest.mark.parametrize("kw", [RICH_CASES[1], RICH_CASES[3]])
def test_functional_call_vmap_grads_equal_per_copy_grads(kw):
    model = rich(**kw)
    names = [n for n, _ in model.named_parameters()]
    base = {n: p.detach() for n, p in model.named_parameters()}
    stacked = {
        n: torch.stack([p + 0.01 * k * torch.randn_like(p) for k in range(3)]) for n, p in base.items()
    }
    tokens = torch.randint(0, 13, (2, 10))

    def loss(params):
        return torch.func.functional_call(model, params, (tokens,), {"return_type": "loss"})

    grads = torch.func.vmap(torch.func.grad(loss))(stacked)
    for k in range(3):
        one = {n: stacked[n][k].clone().requires_grad_(True) for n in names}
        g = torch.autograd.grad(loss(one), [one[n] for n in names])
        for n, gn in zip(names, g):
            torch.testing.assert_close(grads[n][k], gn, rtol=1e-10, atol=1e-12)


def test_new_config_validation():
    with pytest.raises(ValueError, match="n_key_value_heads"):
        TransformerConfig(n_heads=4, n_key_value_heads=3)
    with pytest.raises(ValueError, match="rotary_dim"):
        TransformerConfig(d_model=64, n_heads=4, positional_embedding_type="rotary", rotary_dim=5)
    with pytest.raises(ValueError, match="rotary_dim"):
        TransformerConfig(d_model=64, n_heads=4, positional_embedding_type="rotary", rotary_dim=18)
    with pytest.raises(ValueError, match="rotary_dim=4 is given but positional_embedding_type='standard'"):
        TransformerConfig(d_model=64, n_heads=4, rotary_dim=4)
    with pytest.raises(ValueError, match="positional_embedding_type"):
        TransformerConfig(positional_embedding_type="relative")
    with pytest.raises(ValueError, match="contradicts"):
        TransformerConfig(positional_embedding=False, positional_embedding_type="standard")
    with pytest.raises(ValueError, match="gated_mlp"):
        TransformerConfig(d_mlp=None, gated_mlp=True)
    with pytest.raises(ValueError, match="sliding_window"):
        TransformerConfig(sliding_window=0)
    c = TransformerConfig(positional_embedding=False)
    assert c.positional_embedding_type == "none" and c.positional_embedding is False
    c = TransformerConfig(positional_embedding_type="rotary", rotary_dtype=torch.float32)
    assert c.positional_embedding is False and c.rotary_dim == c.d_head and c.n_key_value_heads == c.n_heads
    assert TransformerConfig(**c.to_dict()) == c
    c = TransformerConfig(dtype=torch.float64, attn_softmax_dtype="float32")
    assert c.attn_softmax_dtype == torch.float32 and c.to_dict()["attn_softmax_dtype"] == "float32"
    assert TransformerConfig(**c.to_dict()) == c
    with pytest.raises(ValueError, match="attn_softmax_dtype"):
        TransformerConfig(attn_softmax_dtype="float99")


@pytest.mark.parametrize(
    "kw", [{}, dict(n_key_value_heads=2, positional_embedding_type="rotary"), dict(attn_bias=False)]
)
def test_fixed_weights_reuses_layouts_and_keeps_results_and_gradients(kw):
    torch.manual_seed(0)
    m = Transformer(
        n_layers=2, d_model=24, n_heads=4, d_head=6, d_mlp=32, d_vocab=17, n_ctx=8, dtype=torch.float64, **kw
    )
    tok = torch.randint(0, 17, (3, 8))
    with torch.no_grad():
        ref = m(tok)
    for p in m.parameters():
        p.requires_grad_(False)
    with torch.no_grad(), m.fixed_weights():
        out = m(tok)
        layouts = [dict(blk.attn._layouts) for blk in m.blocks]
        again = m(tok)
        assert all(set(lay) == {"Q", "K", "V"} for lay in layouts)
        # the second forward reads the same laid-out tensors, not new copies
        assert all(blk.attn._layouts[k] is lay[k] for blk, lay in zip(m.blocks, layouts) for k in lay)
        with m.fixed_weights():  # nested: shares the outer block's layouts
            assert m.blocks[0].attn._layouts is not None and m.blocks[0].attn._layouts["Q"] is layouts[0]["Q"]
        assert m.blocks[0].attn._layouts is not None  # the outer block is still on
    assert all(blk.attn._layouts is None for blk in m.blocks)  # dropped when the block ends
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(again, ref, rtol=0, atol=1e-12)
    # a gradient into the weights bypasses the layouts: equal to the gradient outside the block
    for p in m.parameters():
        p.requires_grad_(True)
    m.zero_grad()
    m(tok).square().mean().backward()
    g_ref = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    with m.fixed_weights():
        m(tok).square().mean().backward()
        assert all(not blk.attn._layouts for blk in m.blocks)
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, g_ref[n], rtol=0, atol=1e-12, msg=n)


def test_affine_adds_the_bias_in_place_and_under_vmap():
    from pypattern.models.transformer import affine

    torch.manual_seed(0)
    x, W, b = (
        torch.randn(2, 5, 7, dtype=torch.float64),
        torch.randn(7, 3, dtype=torch.float64),
        torch.randn(3, dtype=torch.float64),
    )
    ref = torch.einsum("bti,io->bto", x, W) + b
    torch.testing.assert_close(affine(x, W, b), ref, rtol=0, atol=1e-12)
    Ws = torch.randn(4, 7, 3, dtype=torch.float64)
    bs = torch.randn(4, 3, dtype=torch.float64)
    got = torch.func.vmap(lambda w, bb: affine(x, w, bb))(Ws, bs)
    torch.testing.assert_close(
        got, torch.einsum("bti,kio->kbto", x, Ws) + bs[:, None, None], rtol=0, atol=1e-12
    )
    xs = torch.randn(4, 2, 5, 7, dtype=torch.float64)
    got = torch.func.vmap(lambda xx: affine(xx, W, b))(xs)
    torch.testing.assert_close(got, torch.einsum("kbti,io->kbto", xs, W) + b, rtol=0, atol=1e-12)
