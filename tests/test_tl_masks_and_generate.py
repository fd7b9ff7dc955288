"""TransformerLens models with padded batches and under generation: a converted ``HookedTransformer`` (TransformerLens
2.x / 3.x) or ``TransformerBridge`` around its ``NativeModel`` (4.x) takes the positions TransformerLens takes from an
``attention_mask`` (left, right and gapped masks: logits and cached activations at real tokens equal TransformerLens'
own), and ``flags.steer(..., positions=...)`` steers the absolute positions under TransformerLens' ``generate``,
with and without its key-value cache, as pypattern's generation without a cache does. Skipped where TransformerLens
is not installed (the bench venv of bench/envs/tl.sh has 4.x)."""

import warnings

import pytest
import torch

import pypattern
from pypattern.flags import FlagSpec, generate, steer

pytestmark = pytest.mark.usefixtures("one_thread")

MASKS = {
    "left": [[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1]],
    "right": [[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0]],
    "gap": [[1, 0, 1, 1, 0, 1, 1], [1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 0, 1, 1]],
}
SPEC = FlagSpec(
    hook="blocks.1.hook_resid_pre", dims=(0, 1, 2, 3), num_concepts=2, on_value=4.0, off_value=-4.0
)


def _hooked_transformer(pos: str, n_kv=None):
    pytest.importorskip("transformer_lens")
    try:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    except ImportError:
        pytest.skip("TransformerLens 4.x has no HookedTransformer (2.x / 3.x have)")
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=16,
        n_ctx=24,
        d_head=4,
        n_heads=4,
        d_vocab=30,
        act_fn="gelu",
        positional_embedding_type=pos,
        n_key_value_heads=n_kv,
        dtype=torch.float64,
        seed=1,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = HookedTransformer(cfg).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    return m


def _native_bridge(**kw):
    bridge_mod = pytest.importorskip("transformer_lens.model_bridge")
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("TransformerBridge.boot_native of TransformerLens 4.x")
    pytest.importorskip("transformer_lens.model_bridge.sources.native")
    from transformer_lens.config import TransformerBridgeConfig

    cfg = TransformerBridgeConfig(
        n_layers=2, d_model=24, n_ctx=20, d_head=6, n_heads=4, d_vocab=37, seed=0, act_fn="gelu", **kw
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        br = bridge_mod.TransformerBridge.boot_native(cfg, dtype=torch.float64).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in br.original_model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
    return br


def _converted(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pypattern.from_hf(model)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


HT_CASES = [("standard", None), ("rotary", None), ("rotary", 2), ("standard", 2), ("alibi", None)]


@pytest.mark.parametrize("pos,n_kv", HT_CASES)
def test_hooked_transformer_padded_batches_equal_transformer_lens(pos, n_kv):
    m = _hooked_transformer(pos, n_kv)
    ours = _converted(m)
    # TransformerLens counts learned and rotary positions from the mask, and its ALiBi bias reads the columns
    assert ours.cfg.positions_from_mask is (pos != "alibi")
    tokens = torch.randint(0, 30, (3, 7), generator=torch.Generator().manual_seed(3))
    names = [
        "blocks.0.hook_resid_mid",
        "blocks.1.hook_resid_pre",
        "blocks.1.attn.hook_z",
        "blocks.1.mlp.hook_post",
        "blocks.1.hook_resid_post",
    ]
    for kind, mask in MASKS.items():
        am = torch.tensor(mask)
        real = am.bool()
        with torch.no_grad():
            ref, ref_cache = m.run_with_cache(tokens, attention_mask=am)
            got, cache = ours.run_with_cache(tokens, attention_mask=am)
        assert _rel_err(got[real], ref[real]) < 1e-12, (kind, _rel_err(got[real], ref[real]))
        for n in names:
            assert _rel_err(cache[n][real], ref_cache[n][real]) < 1e-12, (kind, n)
        # attention patterns of real queries: equal over every key (0 at masked keys in both)
        pat, ref_pat = cache["blocks.1.attn.hook_pattern"], ref_cache["blocks.1.attn.hook_pattern"]
        assert _rel_err(pat.transpose(1, 2)[real], ref_pat.transpose(1, 2)[real]) < 1e-12, kind


@pytest.mark.parametrize(
    "kw", [dict(), dict(positional_embedding_type="rotary", rotary_dim=4, n_key_value_heads=2)]
)
def test_native_bridge_padded_batches_equal_the_bridge(kw):
    br = _native_bridge(**kw)
    ours = _converted(br)
    # the bridge's forward gives NativeModel positions counted from the mask
    assert ours.cfg.positions_from_mask is True
    tokens = torch.randint(0, 37, (3, 7), generator=torch.Generator().manual_seed(4))
    for kind, mask in MASKS.items():
        am = torch.tensor(mask)
        real = am.bool()
        with torch.no_grad():
            ref, got = br(tokens, attention_mask=am), ours(tokens, attention_mask=am)
        assert _rel_err(got[real], ref[real]) < 1e-12, (kind, _rel_err(got[real], ref[real]))


def test_bloom_positions_from_mask_set_and_gapped_mask_equals_hugging_face():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BloomConfig(vocab_size=40, hidden_size=16, n_layer=2, n_head=4)
    torch.manual_seed(0)
    hf = transformers.BloomForCausalLM(cfg).to(torch.float64).eval()
    ours = _converted(hf)
    assert ours.cfg.positions_from_mask is True
    tokens = torch.randint(0, 40, (3, 7), generator=torch.Generator().manual_seed(5))
    compared = 0
    for mask in MASKS.values():
        am = torch.tensor(mask)
        with torch.no_grad():
            ref = hf(tokens, attention_mask=am).logits
            got = ours(tokens, attention_mask=am)
        # rows the Hugging Face forward computes (its float64 masking can give NaN in a row with leading padding)
        for b in range(3):
            real = am[b].bool()
            if bool(ref[b][real].isfinite().all()):
                assert _rel_err(got[b][real], ref[b][real]) < 1e-10
                compared += int(not bool(real.all()))
    assert compared >= 2


def _tl_generate(model, prompt, steps, use_cache, positions):
    with steer(model, SPEC, 1, positions=positions):
        return model.generate(
            prompt,
            max_new_tokens=steps,
            use_past_kv_cache=use_cache,
            do_sample=False,
            verbose=False,
            stop_at_eos=False,
        )


@pytest.mark.parametrize("use_cache", [False, True])
def test_steer_positions_under_hooked_transformer_generate(use_cache):
    m = _hooked_transformer("rotary")
    ours = _converted(m)
    prompt = torch.randint(0, 30, (2, 5), generator=torch.Generator().manual_seed(6))
    for positions in (6, torch.tensor([False] * 5 + [True, False, True, True])):
        ref = generate(ours, prompt, 4, SPEC, 1, positions=positions, greedy=True)
        out = _tl_generate(m, prompt, 4, use_cache, positions)
        assert torch.equal(out, ref), (positions, out, ref)
    # the positions decide: steering every position generates other tokens
    assert not torch.equal(ref, generate(ours, prompt, 4, SPEC, 1, positions=None, greedy=True))


def test_steer_positions_under_hooked_transformer_cache_logits():
    """A forward given TransformerLens' key-value cache steers the absolute positions of its new tokens: its logits
    equal those of the whole sequence steered without a cache."""
    m = _hooked_transformer("standard")
    tl_utils = pytest.importorskip("transformer_lens.cache.key_value_cache")
    ours = _converted(m)
    tokens = torch.randint(0, 30, (2, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad(), steer(ours, SPEC, 0, positions=6):
        want = ours(tokens)
    cache = tl_utils.TransformerLensKeyValueCache.init_cache(m.cfg, m.cfg.device, 2)
    with torch.no_grad(), steer(m, SPEC, 0, positions=6):
        ones = torch.ones_like(tokens)  # without a tokenizer TransformerLens needs the mask under its cache
        first = m(tokens[:, :5], past_kv_cache=cache, attention_mask=ones[:, :5])
        rest = [
            m.forward(tokens[:, i : i + 1], past_kv_cache=cache, attention_mask=ones[:, i : i + 1])
            for i in range(5, 9)
        ]
    got = torch.cat([first, *rest], dim=1)
    assert _rel_err(got, want) < 1e-12
    with torch.no_grad():
        unsteered = ours(tokens)
    assert _rel_err(unsteered, want) > 1e-3  # positions 6.. steered, the others not
    assert _rel_err(unsteered[:, :6], want[:, :6]) < 1e-12


@pytest.mark.parametrize("use_cache", [False, True])
def test_steer_positions_under_bridge_generate(use_cache):
    br = _native_bridge(positional_embedding_type="rotary", rotary_dim=4)
    ours = _converted(br)
    prompt = torch.randint(0, 37, (2, 5), generator=torch.Generator().manual_seed(8))
    ref = generate(ours, prompt, 4, SPEC, 1, positions=6, greedy=True)
    assert torch.equal(_tl_generate(br, prompt, 4, use_cache, 6), ref)
    assert not torch.equal(ref, generate(ours, prompt, 4, SPEC, 1, positions=None, greedy=True))


def test_steer_restores_hooked_transformer_forward():
    m = _hooked_transformer("standard")
    assert "forward" not in vars(m)
    with steer(m, SPEC, 1, positions=2):
        assert "forward" in vars(m)
    assert "forward" not in vars(m)
    with pytest.raises(ValueError, match="not valid"), steer(m, SPEC, 1, positions=-1):
        m(torch.zeros(1, 3, dtype=torch.long))
    assert "forward" not in vars(m)
