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
        TransformerConfig(normalization_type="RMS")
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
    with pytest.raises(ValueError, match="matches no parameter"):
        component_masks(model, "blocks.5.mlp")


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


def test_layernorm_fused_path_equals_explicit_one():
    """Without a hook on hook_scale LayerNorm runs torch's fused kernel; with one, the explicit form."""
    from pypattern.models.transformer import LayerNorm

    torch.manual_seed(0)
    ln = LayerNorm(16, 1e-5, torch.float64)
    with torch.no_grad():
        ln.w.normal_()
        ln.b.normal_()
    x = torch.randn(3, 5, 16, dtype=torch.float64) * 4 + 2
    fused = ln(x)
    seen = []
    remove = ln.hook_scale.add_hook(lambda t, hook: seen.append(t))
    explicit = ln(x)
    remove()
    assert len(seen) == 1 and seen[0].shape == (3, 5, 1)
    torch.testing.assert_close(fused, explicit, rtol=1e-12, atol=1e-12)
