"""Models computing in float16/bfloat16 and token ids of every integer dtype.

- faithfulness and pruning_curve read a gap ``M_full - M_empty`` at the rounding level of the model's dtype as
  rounding (a warning), as they do for float32's;
- flag_report computes a 16-bit model's losses in float32 (from its logits widened);
- the patching and circuit functions warn once per call of a model that computes in 16 bits;
- patching and circuits take token ids of any integer dtype (as the samplers do), and give the same values as
  with int64 ids.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import pypattern as pp
import pypattern.circuits as pc
from pypattern.patching import MeanAblation, shortlist_and_confirm

GAP = "faithfulness divides by a gap at rounding level"
HALF = "computed in half precision are mostly rounding noise"


def _recorded(fn):
    """``fn()`` and the messages of the warnings it gave."""
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in got]


def _gpt2(dtype):
    """A tiny random GPT-2 whose weights are rounded to bfloat16 (the same numbers in every ``dtype``), converted,
    with prompts whose corruption moves LogitDiff by 0.7% of its size: above float32's rounding, below
    bfloat16's."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    hf = transformers.GPT2LMHeadModel(cfg).eval().to(torch.bfloat16).to(dtype)
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, 64, (4, 8), generator=g)
    corr = clean.clone()
    corr[:, 2] = (corr[:, 2] + 7) % 64
    metric = pp.LogitDiff(torch.tensor([3, 5, 7, 9]), torch.tensor([4, 6, 8, 10]))
    return pp.from_hf(hf), clean, corr, metric


def test_faithfulness_gap_at_16bit_rounding_warns():
    ref, clean, corr, metric = _gpt2(torch.float64)
    edges = pc.edges(ref).edges
    circ = [edges[i] for i in range(0, len(edges), 2)]
    full, empty = (
        float(v) for v in pc.patch_edges(ref, [[], list(edges)], clean, corr, metric=metric).mean(1)
    )
    gap = abs(full - empty) / max(abs(full), abs(empty))
    assert 1e-6 < gap < 8 * torch.finfo(torch.bfloat16).eps  # the case: resolved in float32, not in bfloat16
    f64, said = _recorded(lambda: pc.faithfulness(ref, circ, clean, corr, metric=metric))
    assert f64 == pytest.approx(-0.5017, abs=2e-3) and not any(GAP in s for s in said)
    f32, said = _recorded(lambda: pc.faithfulness(ref.float(), circ, clean, corr, metric=metric))
    assert f32 == pytest.approx(f64, abs=1e-3) and not any(GAP in s for s in said)
    # bfloat16: the value is rounding (of the wrong sign here), and it says so
    bf16, _, _, _ = _gpt2(torch.bfloat16)
    got, said = _recorded(lambda: pc.faithfulness(bf16, circ, clean, corr, metric=metric))
    assert abs(got - f64) > 0.1
    gap_said = [s for s in said if GAP in s]
    assert len(gap_said) == 1 and "rounding level of the model's torch.bfloat16" in gap_said[0]
    scores = torch.arange(len(edges), dtype=torch.float32)
    curve, said = _recorded(
        lambda: pc.pruning_curve(bf16, scores, clean, corr, metric=metric, fractions=[0.2, 0.5])
    )
    assert sum(GAP in s for s in said) == 1
    assert curve.m_full == pytest.approx(full, abs=1e-3) and curve.m_empty == pytest.approx(empty, abs=1e-3)


def test_flag_report_losses_of_a_16bit_model_in_float32():
    topics = pp.TopicTask(num_topics=2, tokens_per_topic=8, seq_len=16)
    lm = pp.Transformer(topics.model_config(n_layers=2, d_model=32, n_heads=2, d_mlp=64, seed=0))
    spec = pp.FlagSpec("blocks.1.hook_resid_pre", dims=(0, 1, 2, 3), num_concepts=2)
    bf16 = copy.deepcopy(lm).to(torch.bfloat16)
    f64 = copy.deepcopy(bf16).to(torch.float64)  # the same (bfloat16-rounded) weights
    got = pp.flag_report(bf16, topics, spec, num_samples=64, gen_steps=2)
    want = pp.flag_report(f64, topics, spec, num_samples=64, gen_steps=2)
    # the loss of the bfloat16 logits widened: exactly what float32 arithmetic gives on them
    data = topics.sample(64, seed=0)
    with torch.no_grad():
        logits = bf16(data.tokens).float()
    mask = data.targets != -100
    ce = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), data.targets.clamp_min(0), reduction="none"
    )
    assert got.loss_clean == pytest.approx(float((ce * mask).sum() / mask.sum()), rel=1e-5)
    # and so within the logits' own rounding of the float64 copy's (a loss reduced in bfloat16 is 1e-2 off)
    assert got.loss_clean == pytest.approx(want.loss_clean, abs=1e-3)
    assert got.loss_ablated == pytest.approx(want.loss_ablated, abs=1e-3)


CFG = dict(n_layers=2, d_model=16, n_heads=2, d_mlp=32, d_vocab=20, n_ctx=8, seed=0)


def _native(dtype):
    model = pp.Transformer(pp.TransformerConfig(**CFG, dtype=dtype))
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 20, (3, 6), generator=g)
    corr = torch.randint(0, 20, (3, 6), generator=g)
    return model, clean, corr, pp.LogitDiff(torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]))


CALLS = {
    "activation_patching": lambda m, c, x, mt: (
        pp.activation_patching(m, "z", c, x, metric=mt, quiet=True).values
    ),
    "attribution_patching": lambda m, c, x, mt: (
        pp.attribution_patching(m, c, x, metric=mt, sites=["z"])["z"].values
    ),
    "shortlist_and_confirm": lambda m, c, x, mt: torch.tensor(
        [d["exact"] for d in shortlist_and_confirm(m, "z", c, x, metric=mt, k=2)]
    ),
    "edge_attribution": lambda m, c, x, mt: (
        pc.edge_attribution(m, c, x, metric=mt, method="exact", quiet=True).values
    ),
    "patch_edges": lambda m, c, x, mt: pc.patch_edges(m, [[]], c, x, metric=mt),
    "faithfulness": lambda m, c, x, mt: torch.tensor(
        pc.faithfulness(m, pc.edges(m).edges[:5], c, x, metric=mt)
    ),
    "pruning_curve": lambda m, c, x, mt: pc.pruning_curve(
        m, torch.arange(len(pc.edges(m)), dtype=torch.float32), c, x, metric=mt, counts=[3]
    ).metric_values["scores"],
    "acdc": lambda m, c, x, mt: pc.acdc(m, c, x, metric=mt, threshold=0.05, quiet=True).mask,
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("call", list(CALLS))
def test_16bit_model_warns_once_per_call(call, dtype):
    model, clean, corr, metric = _native(dtype)
    got, said = _recorded(lambda: CALLS[call](model, clean, corr, metric))
    half = [s for s in said if HALF in s]
    assert len(half) == 1, said
    assert half[0].startswith(f"{call}: the model computes in {dtype}") and "model.float()" in half[0]
    # the numbers are those of the run without the warning
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = CALLS[call](model, clean, corr, metric)
    torch.testing.assert_close(got, again, rtol=0, atol=0)
    # a float32 model: no warning
    model, clean, corr, metric = _native(torch.float32)
    _, said = _recorded(lambda: CALLS[call](model, clean, corr, metric))
    assert not any(HALF in s for s in said)


def test_16bit_warning_points_at_the_callers_line():
    model, clean, corr, metric = _native(torch.bfloat16)
    with pytest.warns(UserWarning, match="activation_patching: the model computes in torch.bfloat16") as rec:
        pp.activation_patching(model, "resid_pre", clean, corr, metric=metric, quiet=True)
    assert {w.filename for w in rec if HALF in str(w.message)} == {__file__}
    with pytest.warns(UserWarning, match="acdc: the model computes in torch.bfloat16") as rec:
        pc.acdc(model, clean, corr, metric=metric, threshold=0.05, quiet=True)
    assert {w.filename for w in rec if HALF in str(w.message)} == {__file__}


@pytest.mark.parametrize("dtype", [torch.int16, torch.uint8, torch.int8, torch.int32])
def test_token_ids_of_every_integer_dtype(dtype):
    model, clean, corr, metric = _native(torch.float64)
    ref = torch.randint(0, 20, (4, 6), generator=torch.Generator().manual_seed(2))
    runs = {
        "exact": lambda c, x, r: pp.activation_patching(model, "z", c, x, metric=metric, quiet=True).values,
        "naive": lambda c, x, r: (
            pp.activation_patching(model, "resid_pre", c, x, metric=metric, method="naive", quiet=True).values
        ),
        "mean": lambda c, x, r: (
            pp.activation_patching(
                model,
                "resid_pre",
                c,
                corruption=MeanAblation(reference_tokens=r),
                direction="noising",
                metric=metric,
                quiet=True,
            ).values
        ),
        "atp parts": lambda c, x, r: (
            pp.attribution_patching(model, c, x, metric=metric, sites=["z"], qk_fix=True, max_batch=2)[
                "z"
            ].values
        ),
        "atp mean": lambda c, x, r: (
            pp.attribution_patching(
                model,
                c,
                corruption=MeanAblation(reference_tokens=r),
                direction="noising",
                metric=metric,
                sites=["z"],
            )["z"].values
        ),
        "shortlist": lambda c, x, r: torch.tensor(
            [d["exact"] for d in shortlist_and_confirm(model, "z", c, x, metric=metric, k=3)]
        ),
        "patch_edges": lambda c, x, r: pc.patch_edges(
            model, [pc.edges(model).edges[:7]], c, x, metric=metric
        ),
    }
    for name, run in runs.items():
        want = run(clean, corr, ref)
        got = run(clean.to(dtype), corr.to(dtype), ref.to(dtype))
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
    # a corruption holding them is not changed
    mean = MeanAblation(reference_tokens=ref.to(dtype))
    pp.activation_patching(model, "resid_pre", clean, corruption=mean, direction="noising", metric=metric)
    assert mean.reference_tokens.dtype == dtype


@pytest.mark.parametrize("bad", [torch.float32, torch.bool])
def test_float_and_bool_tokens_still_refused(bad):
    model, clean, corr, metric = _native(torch.float64)
    with pytest.raises(
        TypeError, match=rf"clean_tokens has dtype {bad}; give integer token ids \(torch.long\)"
    ):
        pp.activation_patching(model, "z", clean.to(bad), corr, metric=metric)
    with pytest.raises(TypeError, match=rf"corrupted_tokens has dtype {bad}; give integer token ids"):
        pp.attribution_patching(model, clean, corr.to(bad), metric=metric, sites=["z"])
    with pytest.raises(TypeError, match=rf"clean has dtype {bad}; give integer token ids"):
        pc.patch_edges(model, [[]], clean.to(bad), corr, metric=metric)
