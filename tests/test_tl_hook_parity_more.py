"""TransformerLens models converted to pypattern at real tokens of padded batches.

A ``TransformerBridge`` (TransformerLens 4.x) around a Hugging Face model counts positions from the attention mask
in its forward (each row's real tokens from 0 where a masked token precedes a real one), which the Hugging Face
forward alone does not: the converted model takes the bridge's positions, and its logits equal the bridge's on
left-padded and gapped masks. A ``HookedTransformer`` (TransformerLens 2.x / 3.x) converted to pypattern has every
hook point the two models share equal to TransformerLens' at real tokens, for every normalization type, processed
weights or not, without a mask and with right- and left-padded masks; ``hook_normalized`` of a norm with a weight is
the norm's output (after its weight and bias), which TransformerLens' hook holds before them where its norm places
it so. Skipped where TransformerLens is not installed."""

import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import pypattern

pytestmark = pytest.mark.usefixtures("one_thread")

MASKS = {
    "left": [[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1]],
    "right": [[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0]],
    "gap": [[1, 0, 1, 1, 0, 1, 1], [1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 0, 1, 1]],
}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-300))


# ---------------------------------------------------------------------------------------------------------------
# TransformerBridge around a Hugging Face model: positions from the mask


# (case of tests/test_convert.py, dtype, tolerance): learned positions (GPT-2, GPT-Neo with local attention) in
# float64; Llama's rotary positions in float32 (its float64 bridge gives NaN in rows with leading padding)
BRIDGE_CASES = [
    ("gpt2-tied", torch.float64, 1e-10),
    ("gptneo-global-local-tied", torch.float64, 1e-10),
    ("llama-gqa2-biases-tied-headdim", torch.float32, 1e-5),
]


def _hf_bridge(case, dtype, tmp_path):
    bridge_mod = pytest.importorskip("transformer_lens.model_bridge")
    pytest.importorskip("transformers")
    sys.path.insert(0, str(Path(__file__).parent))
    import test_convert as tc

    hf = tc.hf_model(case, dtype)
    hf.config.architectures = [type(hf).__name__]  # what the bridge picks its adapter by
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bridge_mod.TransformerBridge.boot_transformers(
            case, hf_model=hf, dtype=dtype, device="cpu", tokenizer=tc._local_tokenizer(tmp_path)
        )


@pytest.mark.parametrize("case,dtype,tol", BRIDGE_CASES)
def test_hf_bridge_padded_batches_equal_the_bridge(case, dtype, tol, tmp_path):
    br = _hf_bridge(case, dtype, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = pypattern.from_hf(br)
    # the bridge's forward hands the Hugging Face model positions counted from the mask
    assert ours.cfg.positions_from_mask is True and ours.cfg.mask_positions
    tokens = torch.randint(0, ours.cfg.d_vocab, (3, 7), generator=torch.Generator().manual_seed(3))
    moved = 0
    for kind, mask in MASKS.items():
        am = torch.tensor(mask)
        real = am.bool()
        with torch.no_grad():
            ref = br(tokens, attention_mask=am)
            got = ours(tokens, attention_mask=am)
            # the columns as positions (the Hugging Face forward's own convention)
            cols = ours(tokens, attention_mask=am, position_ids=torch.arange(7).expand(3, 7))
        assert bool(ref[real].isfinite().all()), kind
        assert _rel_err(got[real], ref[real]) < tol, (kind, _rel_err(got[real], ref[real]))
        moved += _rel_err(cols[real], ref[real]) > 1e-3
    assert moved >= 1  # a gapped mask moves the positions: the columns compute another function


def test_hf_bridge_without_mask_positions_keeps_the_classs_convention(tmp_path):
    """An OPT bridge leaves the positions to OPT's own embedding, which reads the mask; its conversion reads them
    from the mask as OPT's does, and equals the bridge on padded batches."""
    br = _hf_bridge("opt-relu", torch.float32, tmp_path)
    if br._accepts_derived_position_ids():
        pytest.skip("this TransformerLens version hands OPT positions of its own")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = pypattern.from_hf(br)
    assert ours.cfg.mask_positions
    tokens = torch.randint(0, ours.cfg.d_vocab, (3, 7), generator=torch.Generator().manual_seed(4))
    for kind, mask in MASKS.items():
        am = torch.tensor(mask)
        real = am.bool()
        with torch.no_grad():
            ref, got = br(tokens, attention_mask=am), ours(tokens, attention_mask=am)
        assert _rel_err(got[real], ref[real]) < 1e-5, kind


# ---------------------------------------------------------------------------------------------------------------
# HookedTransformer: every shared hook point


def _hooked(norm, pos="standard", gated=False):
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
        d_mlp=32,
        d_vocab=30,
        act_fn="silu" if gated else "gelu",
        gated_mlp=gated,
        n_key_value_heads=2 if gated else None,
        normalization_type=norm,
        positional_embedding_type=pos,
        dtype=torch.float64,
        seed=1,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = HookedTransformer(cfg).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if gated and n.endswith("mlp.b_in"):
                continue  # TransformerLens adds a gated MLP's b_in after the product: only zero converts
            # norm weights away from 0, so that dividing by them is well conditioned
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5 + n.endswith(".w"))
    return m


def _tl_hook_normalized_before_weight(norm_module) -> bool:
    """Whether TransformerLens' norm module fires its ``hook_normalized`` before its weight (and bias), measured on
    the module alone: the value the hook sees against the normalisation computed here."""
    seen = []
    handle = norm_module.hook_normalized.register_forward_hook(lambda mod, args, out: seen.append(out))
    try:
        x = torch.randn(
            2, 3, norm_module.w.shape[0], generator=torch.Generator().manual_seed(9), dtype=torch.float64
        )
        with torch.no_grad():
            out = norm_module(x)
    finally:
        handle.remove()
    if hasattr(norm_module, "b"):
        plain = F.layer_norm(x, x.shape[-1:], eps=norm_module.eps)
    else:
        plain = x / (x.pow(2).mean(-1, keepdim=True) + norm_module.eps).sqrt()
    before = _rel_err(seen[0], plain) < 1e-12
    after = _rel_err(seen[0], out) < 1e-12
    assert before != after, "TransformerLens' hook_normalized is neither before nor after the norm's weight"
    return before


HOOK_CASES = [
    ("LN", "none", False),
    ("LN", "processed", False),
    ("LNPre", "none", True),
    ("RMS", "none", True),
    ("RMS", "processed", True),
    ("RMSPre", "none", False),
    (None, "none", True),
]


@pytest.mark.parametrize("norm,weights,gated", HOOK_CASES)
def test_hooked_transformer_every_shared_hook_equals_transformer_lens(norm, weights, gated):
    m = _hooked(norm, gated=gated)
    if weights == "processed":  # LN -> LNPre, RMS -> RMSPre, writing weights and unembedding centred
        m.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = pypattern.from_hf(m)
    # where TransformerLens fires hook_normalized before the weight (and bias), its value times the weight (plus
    # the bias) is the norm's output, which the converted model's hook holds
    before = {
        name: _tl_hook_normalized_before_weight(mod)
        for name, mod in m.named_modules()
        if hasattr(mod, "hook_normalized") and hasattr(mod, "w")
    }
    tokens = torch.randint(0, 30, (3, 7), generator=torch.Generator().manual_seed(3))
    compared = 0
    for kind, mask in {"none": None, "right": MASKS["right"], "left": MASKS["left"]}.items():
        am = None if mask is None else torch.tensor(mask)
        real = torch.ones(3, 7, dtype=torch.bool) if am is None else am.bool()
        with torch.no_grad():
            ref, ref_cache = m.run_with_cache(tokens, attention_mask=am)
            got, cache = ours.run_with_cache(tokens, attention_mask=am)
        assert _rel_err(got[real], ref[real]) < 1e-12, kind
        shared = sorted(set(cache.keys()) & set(ref_cache.keys()))
        # TransformerLens' own unembed.hook_in / hook_out: ln_final's output and the logits
        assert set(ref_cache.keys()) - set(cache.keys()) <= {"unembed.hook_in", "unembed.hook_out"}
        assert set(cache.keys()) <= set(ref_cache.keys())
        for name in shared:
            a, b = cache[name], ref_cache[name]
            assert a.shape == b.shape, name
            if name.endswith(("hook_pattern", "hook_attn_scores")):  # (batch, head, query, key): real queries
                a, b = a.transpose(1, 2)[real], b.transpose(1, 2)[real]
                finite = b.isfinite()  # masked keys: -inf scores in both
                assert torch.equal(finite, a.isfinite()), (kind, name)
                a, b = a[finite], b[finite]
            else:
                a, b = a[real], b[real]
            norm_name = name.removesuffix(".hook_normalized")
            if norm_name in before and before[norm_name]:
                mod = m.get_submodule(norm_name)
                b = b * mod.w + (mod.b if hasattr(mod, "b") else 0)
            assert _rel_err(a, b) < 1e-12, (kind, name, _rel_err(a, b))
            compared += 1
    assert compared >= 3 * (18 if norm else 12)
