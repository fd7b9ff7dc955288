"""TransformerLens parity of pypattern's hook API and of the TransformerLens converters, on pypattern's own model and
on stand-ins (TransformerLens is not installed here): TransformerLens' hook idioms (``hook.layer()``, a keyword-only
``hook``, shorthand cache keys, ``add_hook`` / ``reset_hooks``, backward hooks), an attention row a hook masked
entirely reading nothing (TransformerLens' NaN -> 0), the conversion check running past a local-attention window,
a bridge with hooks attached refused by name, a HookedTransformer's mask buffer compared with its cfg, and the
refusals of non-positive attention scales and of ALiBi slopes no copy converts."""

import types

import pytest
import torch
from torch import nn

import pypattern
from pypattern.models import Transformer, TransformerConfig, UnsupportedModelError
from pypattern.models.hooks import attached_hooks

pytestmark = pytest.mark.usefixtures("one_thread")


def small(**kw):
    cfg = dict(n_layers=2, d_model=16, n_heads=2, d_mlp=24, d_vocab=11, n_ctx=24, dtype=torch.float64, seed=0)
    return Transformer(TransformerConfig(**{**cfg, **kw})).eval()


def toks(n=12, b=2):
    return torch.randint(0, 11, (b, n), generator=torch.Generator().manual_seed(0))


def test_transformer_lens_hook_idioms():
    model, x = small(), toks()
    seen = {}

    def by_layer(t, hook):  # hook.layer()
        seen[hook.name] = hook.layer()

    def keyword_only(t, *, hook):  # TransformerLens calls fn(activation, hook=hook_point)
        return t * 0.5

    plain = model(x)
    out = model.run_with_hooks(
        x, fwd_hooks=[(lambda n: n.endswith("hook_z"), by_layer), ("blocks.1.attn.hook_z", keyword_only)]
    )
    assert seen == {"blocks.0.attn.hook_z": 0, "blocks.1.attn.hook_z": 1}
    assert not torch.allclose(out, plain)
    with pytest.raises(ValueError, match="no layer"):
        model.hook_embed.layer()
    # TransformerLens' shorthand cache keys (utils.get_act_name)
    _, cache = model.run_with_cache(x)
    assert cache["pattern", 0] is cache["blocks.0.attn.hook_pattern"]
    assert cache["resid_pre", 1] is cache["blocks.1.hook_resid_pre"]
    assert cache["z", 0, "attn"] is cache["blocks.0.attn.hook_z"]
    assert cache["resid_pre", -1] is cache["blocks.1.hook_resid_pre"]
    assert cache["normalized", 1, "ln2"] is cache["blocks.1.ln2.hook_normalized"]
    assert cache["embed"] is cache["hook_embed"] and cache["k1"] is cache["blocks.1.attn.hook_k"]
    with pytest.raises(KeyError):
        cache["pattern", 5]
    # add_hook stays until reset_hooks; a permanent one until reset_hooks(including_permanent=True)
    model.add_hook("blocks.1.attn.hook_z", keyword_only)
    torch.testing.assert_close(model(x), out)
    model.reset_hooks()
    torch.testing.assert_close(model(x), plain)
    model.add_perma_hook("blocks.1.attn.hook_z", keyword_only)
    model.reset_hooks()
    torch.testing.assert_close(model(x), out)
    model.reset_hooks(including_permanent=True)
    torch.testing.assert_close(model(x), plain)
    # run_with_hooks(..., reset_hooks_end=False) keeps its hooks
    model.run_with_hooks(x, fwd_hooks=[("blocks.1.attn.hook_z", keyword_only)], reset_hooks_end=False)
    torch.testing.assert_close(model(x), out)
    model.reset_hooks()


def test_backward_hooks_see_and_replace_the_activation_gradient():
    model, x = small(), toks()
    name = "blocks.1.hook_resid_pre"
    kept = {}
    out = model.run_with_hooks(x, fwd_hooks=[(name, lambda t, hook: kept.__setitem__("a", t))])
    want = torch.autograd.grad(out.sum(), kept["a"])[0]
    grads = []
    out = model.run_with_hooks(x, bwd_hooks=[(name, lambda g, hook: grads.append((hook.name, g)))])
    out.sum().backward()  # after run_with_hooks returned: the hook is attached to the activation
    assert [n for n, _ in grads] == [name]
    torch.testing.assert_close(grads[0][1], want, rtol=0, atol=0)
    # a tensor returned replaces the gradient: zero at block 1's input cuts every gradient into block 0
    model.zero_grad()
    model.run_with_hooks(x, bwd_hooks=[(name, lambda g, hook: torch.zeros_like(g))]).sum().backward()
    assert model.blocks[0].attn.W_Q.grad is None or not model.blocks[0].attn.W_Q.grad.any()
    assert model.blocks[1].attn.W_Q.grad.any()
    model.add_hook(name, lambda g, hook: None, dir="bwd")
    assert any(name in w for w in attached_hooks(model))
    model.reset_hooks(direction="fwd")
    assert model.hook_dict[name].active  # the backward hook stays
    model.reset_hooks(direction="bwd")
    assert not model.hook_dict[name].active


def test_a_query_row_masked_entirely_by_a_hook_reads_nothing():
    """TransformerLens turns the NaN a fully masked score row gives into 0 (the query reads nothing from that
    head): the same as a pattern row of zeros."""
    model, x = small(), toks()

    def mask_row(t, hook):
        t[:, 1, 5, :] = float("-inf")

    def zero_row(t, hook):
        t[:, 1, 5, :] = 0.0

    got = model.run_with_hooks(x, fwd_hooks=[("blocks.0.attn.hook_attn_scores", mask_row)])
    want = model.run_with_hooks(x, fwd_hooks=[("blocks.0.attn.hook_pattern", zero_row)])
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_the_conversion_check_runs_past_a_local_attention_window():
    """A source whose window (16) differs from the converted model's (10) agrees on 8 tokens; the check runs
    past the larger window and refuses."""
    from pypattern.models.convert import _verify

    converted = small(sliding_window=10)
    source = small(sliding_window=16)
    source.load_state_dict(converted.state_dict())
    _verify(
        converted, small(sliding_window=10), "HookedTransformer", torch.float64, hooked=True
    )  # same: passes
    with pytest.raises(UnsupportedModelError, match="differ from the model's own"):
        _verify(source, converted, "HookedTransformer", torch.float64, hooked=True)


def _bridge_stand_in(hooked: bool) -> nn.Module:
    """A module that TransformerLens' 4.x bridge looks like to the converter: defined in ``transformer_lens``,
    ``original_model`` a Hugging Face GPT-2, a ``HookPoint`` (TransformerLens') with a function attached."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=16, vocab_size=11)
    hp_cls = type("HookPoint", (nn.Module,), {"__module__": "transformer_lens.hook_points"})
    bridge_cls = type(
        "TransformerBridge", (nn.Module,), {"__module__": "transformer_lens.model_bridge.bridge"}
    )
    bridge = bridge_cls()
    bridge.original_model = transformers.GPT2LMHeadModel(cfg)
    bridge.hook_z = hp_cls()
    bridge.hook_dict = {"blocks.0.attn.hook_z": bridge.hook_z}
    if hooked:
        bridge.hook_z.register_forward_hook(lambda m, i, o: o * 0)
    return bridge


def test_a_bridge_with_hooks_attached_is_refused_naming_them():
    with pytest.raises(UnsupportedModelError, match=r"hooks attached at \['blocks.0.attn.hook_z'\]"):
        pypattern.from_hf(_bridge_stand_in(hooked=True))
    try:  # no hook attached: no hook refusal (the stand-in has no attention components of a real bridge)
        pypattern.from_hf(_bridge_stand_in(hooked=False))
    except UnsupportedModelError as e:
        assert "hooks attached" not in str(e)


def _hooked_cfg(**kw):
    base = dict(
        attention_dir="causal",
        n_layers=1,
        d_model=8,
        n_heads=2,
        d_head=4,
        d_mlp=16,
        d_vocab=5,
        n_ctx=12,
        act_fn="gelu",
        normalization_type="LN",
        positional_embedding_type="standard",
        eps=1e-5,
        dtype=torch.float32,
        attn_scale=2.0,
        use_attn_scale=True,
    )
    return types.SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize("scale", [-2.0, 0.0, float("nan")])
def test_a_non_positive_attention_scale_is_refused_naming_the_option(scale):
    from pypattern.models.convert import hooked_transformer

    with pytest.raises(UnsupportedModelError, match="attn_scale="):
        hooked_transformer._config(types.SimpleNamespace(cfg=_hooked_cfg(attn_scale=scale)))


def test_a_mask_buffer_that_differs_from_the_cfg_is_refused():
    """TransformerLens builds each attention's ``mask`` buffer from ``window_size`` when the model is built; a cfg
    edited afterwards leaves it, and the conversion (which reads the cfg) is refused."""
    from pypattern.models.convert import hooked_transformer

    c = _hooked_cfg(use_local_attn=True, window_size=6, attn_types=["local"])
    causal = torch.tril(torch.ones(12, 12, dtype=torch.bool))
    banded = torch.triu(causal, 1 - 4)  # built with window_size=4
    model = types.SimpleNamespace(
        cfg=c, blocks=[types.SimpleNamespace(attn=types.SimpleNamespace(mask=banded))]
    )
    cfg = hooked_transformer._config(model)
    with pytest.raises(UnsupportedModelError, match="window_size=6.*blocks.0.attn.mask.*last 4 positions"):
        hooked_transformer._check_masks(model, cfg)
    model.blocks[0].attn.mask = torch.triu(causal, 1 - 6)
    hooked_transformer._check_masks(model, cfg)


def test_alibi_advice_names_what_converts():
    from pypattern.models.convert.hooked_transformer import _alibi_matches

    with pytest.raises(UnsupportedModelError) as e:
        _alibi_matches(5, torch.float64)
    assert "float32 copy converts" not in str(e.value) and "power of 2" in str(e.value)
    with pytest.raises(UnsupportedModelError, match="power of 2"):
        _alibi_matches(5, torch.float32)
    for n in (1, 2, 4, 8, 16, 32):
        try:
            _alibi_matches(n, torch.float64)
        except UnsupportedModelError as e:  # float32 rounding only: a float32 copy does convert
            assert "float32 copy" in str(e)
            _alibi_matches(n, torch.float32)
