"""Patching metrics and corruptions against naive definitions: logit difference, probability, log-probability and
KL to the clean run per example and batched, read-out positions, token ids of every integer dtype and shape,
16-bit logits, ``select``, ruled-out tokens, normalisation, Gaussian noise (scale, seed, global RNG) and mean
ablation over the real tokens of a padded batch."""

import math
import warnings

import numpy as np
import pytest
import torch

from pypattern.models import Transformer, TransformerConfig
from pypattern.patching import activation_patching
from pypattern.patching.corruptions import (
    GaussianNoise,
    MeanAblation,
    embedding_noise_hook,
    masked_mean,
)
from pypattern.patching.metrics import (
    KL,
    LogitDiff,
    LogProb,
    Prob,
    logits_at,
    metric_positions,
)
from pypattern.patching.results import PatchResult

pytestmark = pytest.mark.usefixtures("one_thread")

B, V = 5, 11
INT_DTYPES = [
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.uint16,
    torch.uint32,
    torch.uint64,
]


def _logits(seed=0, shape=(B, V), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)


def _naive_logp(row):
    """log softmax of one row of logits, written out (float64)."""
    row = [float(v) for v in row]
    top = max(row)
    lse = top + math.log(sum(math.exp(v - top) for v in row if v != -math.inf))
    return [v - lse for v in row]


def _naive(metric_name, row, answers, wrongs=None):
    lp = _naive_logp(row)
    if metric_name == "logit_diff":
        return sum(float(row[a]) for a in answers) / len(answers) - sum(float(row[w]) for w in wrongs) / len(
            wrongs
        )
    if metric_name == "prob":
        return sum(math.exp(lp[a]) for a in answers) / len(answers)
    return sum(lp[a] for a in answers) / len(answers)


def _naive_kl(clean_row, row):
    """KL(P_clean || P) for one example, with 0 log 0 = 0."""
    lc, lx = _naive_logp(clean_row), _naive_logp(row)
    total = 0.0
    for a, b in zip(lc, lx):
        if a == -math.inf:
            continue
        total += math.exp(a) * (a - b)
    return total


def _rows(ids, n):
    t = ids.to(torch.int64) if isinstance(ids, torch.Tensor) else torch.as_tensor(ids)
    if t.dim() == 0:
        return [[int(t)]] * n
    if t.dim() == 1:
        return [[int(v)] for v in t]
    return [[int(v) for v in r] for r in t]


@pytest.mark.parametrize("dtype", INT_DTYPES)
def test_token_ids_of_every_integer_dtype_give_the_naive_values(dtype):
    """Answers and wrong tokens of every integer dtype (scalar, (B,), (B, k)) give the naive per-example values:
    the unsigned dtypes without min/max in torch (uint16/32/64) included."""
    L = _logits()
    g = torch.Generator().manual_seed(1)
    per = torch.randint(0, V, (B,), generator=g).to(dtype)
    multi = torch.randint(0, V, (B, 3), generator=g).to(dtype)
    scalar = torch.tensor(7).to(dtype)
    for ans, wrong in ((per, multi), (multi, scalar), (scalar, per)):
        a_rows, w_rows = _rows(ans, B), _rows(wrong, B)
        got = {
            "logit_diff": LogitDiff(ans, wrong)(L),
            "prob": Prob(ans)(L),
            "logprob": LogProb(ans)(L),
        }
        for name, values in got.items():
            assert values.shape == (B,)
            want = [_naive(name, L[i], a_rows[i], w_rows[i]) for i in range(B)]
            assert torch.allclose(values, torch.tensor(want, dtype=values.dtype), rtol=1e-10, atol=1e-12), (
                name
            )


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64])
def test_wide_unsigned_ids_out_of_range_are_refused_by_name(dtype):
    L = _logits()
    with pytest.raises(ValueError, match=f"wrong contains the token id {V + 2}; the logits have {V} entries"):
        LogitDiff(torch.zeros(B, dtype=dtype), torch.full((B,), V + 2, dtype=dtype))(L)


def test_ids_given_as_lists_arrays_and_numpy_scalars():
    L = _logits()
    lists = [[1, 2, 3, 4, 5], (1, 2, 3, 4, 5), np.array([1, 2, 3, 4, 5], dtype=np.uint16)]
    for ids in lists:
        want = [_naive("logit_diff", L[i], [i + 1], [0]) for i in range(B)]
        assert torch.allclose(LogitDiff(ids, np.int8(0))(L), torch.tensor(want, dtype=torch.float64))


def test_batched_stack_of_runs_equals_each_run_alone():
    """Metrics read stacks of runs ``(cells, batch, vocab)``: each run's values are those of the run alone."""
    runs = torch.stack([_logits(s) for s in range(3)])
    ans, wrong = torch.arange(B), torch.full((B,), 9)
    for m in (LogitDiff(ans, wrong), Prob(ans), LogProb(ans)):
        out = m(runs)
        assert out.shape == (3, B)
        for c in range(3):
            assert torch.allclose(out[c], m(runs[c]))
    kl = KL()
    kl.bind(runs[0])
    out = kl(runs)
    assert out.shape == (3, B)
    for c in range(3):
        want = [-_naive_kl(runs[0, i], runs[c, i]) for i in range(B)]
        assert torch.allclose(out[c], torch.tensor(want, dtype=torch.float64), atol=1e-12)


def test_kl_direction_reference_and_near_clean_values():
    """KL's value is -D(P_clean || P) (not D(P || P_clean)), 0 on the clean run, also near it (the near-clean
    form), with the clean run's bound logits as the reference."""
    C, X = _logits(0), _logits(1)
    m = KL()
    m.bind(C)
    assert torch.equal(m(C), torch.zeros(B, dtype=torch.float64))
    for other in (
        X,
        C + 1e-3 * _logits(2),
        C + 0.4 * _logits(3) / 3,
        C + 7.0,
    ):  # far, near, at the edge, shifted
        want = torch.tensor([-_naive_kl(C[i], other[i]) for i in range(B)], dtype=torch.float64)
        reverse = torch.tensor([-_naive_kl(other[i], C[i]) for i in range(B)], dtype=torch.float64)
        got = m(other)
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-15)
        if not torch.allclose(want, reverse, rtol=1e-3):
            assert not torch.allclose(got, reverse, rtol=1e-3)
    # the KL effect D(P_cl || P_*) - D(P_cl || P_pt) is m(patched) - m(corrupted)
    P = C + 0.1 * _logits(4)
    eff = m(P) - m(X)
    want = [_naive_kl(C[i], X[i]) - _naive_kl(C[i], P[i]) for i in range(B)]
    assert torch.allclose(eff, torch.tensor(want, dtype=torch.float64), rtol=1e-9)


def test_kl_refuses_logits_of_other_examples_than_the_bound_run():
    """Bound to one clean row, KL silently compared every example of a larger batch with it (broadcasting); a
    batch or vocabulary other than the bound run's is refused by name."""
    C = _logits(0)
    m = KL()
    m.bind(C[:1])
    with pytest.raises(ValueError, match=r"KL metric is bound to clean logits of shape \(1, 11\)"):
        m(_logits(1))
    m.bind(C)
    with pytest.raises(ValueError, match=r"given logits of shape \(5, 12\)"):
        m(_logits(1, (B, V + 1)))
    with pytest.raises(ValueError, match=r"given logits of shape \(3, 11\)"):
        m(_logits(1)[:3])
    # a subset through select() is read against its own clean rows
    idx = torch.tensor([4, 1])
    X = _logits(1)
    assert torch.allclose(m.select(idx)(X[idx]), m(X)[idx])


def test_ruled_out_tokens():
    """-inf logits: a ruled-out answer has probability 0 and log-probability -inf; ruled-out other tokens weigh
    nothing; KL skips tokens the clean run rules out and is -inf when a patched run rules out a clean token."""
    L = _logits()
    L[:, 3] = -math.inf
    L[0, 5] = -math.inf
    ans = torch.tensor([3, 1, 2, 4, 6])
    prob, lp, ld = Prob(ans)(L), LogProb(ans)(L), LogitDiff(ans, 9)(L)
    for i in range(B):
        assert math.isclose(float(prob[i]), _naive("prob", L[i], [int(ans[i])]), rel_tol=1e-12, abs_tol=0)
        want = _naive("logprob", L[i], [int(ans[i])])
        assert float(lp[i]) == want if want == -math.inf else math.isclose(float(lp[i]), want, rel_tol=1e-12)
    assert float(ld[0]) == -math.inf and float(ld[1]) == float(L[1, 1] - L[1, 9])
    m = KL()
    m.bind(L)
    X = _logits(1)  # the ruled-out tokens allowed again: no contribution
    want = torch.tensor([-_naive_kl(L[i], X[i]) for i in range(B)], dtype=torch.float64)
    assert torch.allclose(m(X), want, rtol=1e-9)
    assert torch.equal(m(L), torch.zeros(B, dtype=torch.float64))
    Y = L.clone()
    Y[2, 7] = -math.inf  # a token the clean run allows is ruled out
    out = m(Y)
    assert float(out[2]) == -math.inf and torch.equal(out[[0, 1, 3, 4]], torch.zeros(4, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_logits_are_computed_in_float32(dtype):
    L = _logits(dtype=dtype)
    L32 = L.float()
    ans, wrong = torch.arange(B), torch.tensor([[6, 7]] * B)
    for m in (LogitDiff(ans, wrong), Prob(ans), LogProb(ans)):
        out = m(L)
        assert out.dtype == torch.float32
        assert torch.allclose(out, m(L32), rtol=1e-6, atol=1e-7)
    m = KL()
    m.bind(L)
    X = _logits(1, dtype=dtype)
    out = m(X)
    assert out.dtype == torch.float32
    want = [-_naive_kl(L32[i], X.float()[i]) for i in range(B)]
    assert torch.allclose(out.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-4)


def test_positions_last_per_example_and_padded_last_real_token():
    """metric_positions + logits_at read the last token, per-example positions given as a tensor of any integer
    dtype, a list or an array, and a right-padded batch's last real token."""
    T = 6
    full = _logits(0, (B, T, V))
    assert torch.equal(logits_at(full, metric_positions(LogitDiff(0, 1), B, T)), full[:, T - 1])
    assert torch.equal(logits_at(full, metric_positions(LogitDiff(0, 1, position=-3), B, T)), full[:, T - 3])
    mask = torch.tensor([[1] * n + [0] * (T - n) for n in (6, 3, 1, 4, 5)])
    last = mask.sum(1) - 1
    want = torch.stack([full[i, int(last[i])] for i in range(B)])
    for pos in (last, last.tolist(), last.numpy(), *(last.to(d) for d in INT_DTYPES)):
        m = LogitDiff(0, 1, position=pos)
        assert torch.equal(logits_at(full, metric_positions(m, B, T)), want)
    for d in INT_DTYPES:  # logits_at read directly with positions of a small dtype (a uint8 one is no mask)
        assert torch.equal(logits_at(full, last.to(d)), want)


def test_select_of_a_batch_subset():
    """select() keeps each example's answers, wrong tokens, position and bound clean run; shared ids stay."""
    T = 6
    full = _logits(0, (B, T, V))
    pos = torch.tensor([5, 2, 0, 3, 4])
    ans, wrong = torch.arange(B), torch.tensor([[6, 7]] * B)
    for index in (torch.tensor([3, 0]), slice(1, 4), torch.tensor([True, False, True, False, True]), [4, 2]):
        sub = torch.arange(B)[index]
        for m in (LogitDiff(ans, wrong, pos), Prob(ans, pos.tolist()), LogProb(7, pos.numpy()), KL(pos)):
            if isinstance(m, KL):
                m.bind(logits_at(full, metric_positions(m, B, T)))
            whole = m(logits_at(full, metric_positions(m, B, T)))
            s = m.select(index)
            part = s(logits_at(full[sub], metric_positions(s, len(sub), T)))
            assert torch.allclose(part, whole[sub])


def test_normalisation_and_equal_clean_and_corrupted():
    """normalized = (patched - corrupted) / mean(clean - corrupted); a zero gap gives NaN with a warning, never
    an infinity."""
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(4, generator=g, dtype=torch.float64) + 3
    corr = torch.randn(4, generator=g, dtype=torch.float64)
    vals = torch.randn(4, 3, generator=g, dtype=torch.float64)
    r = PatchResult(vals, clean, corr, ("layer",), {"layer": [0, 1, 2]})
    gap = sum(float(clean[i] - corr[i]) for i in range(4)) / 4
    want = torch.tensor([[(float(vals[i, j]) - float(corr[i])) / gap for j in range(3)] for i in range(4)])
    assert torch.allclose(r.normalized, want.double())
    full = PatchResult(clean[:, None].expand(4, 3).clone(), clean, corr, ("layer",), {"layer": [0, 1, 2]})
    assert torch.allclose(full.mean(), torch.ones(3, dtype=torch.float64))
    same = PatchResult(vals, corr.clone(), corr, ("layer",), {"layer": [0, 1, 2]})
    with pytest.warns(RuntimeWarning, match="normalised values are undefined and returned as NaN"):
        n = same.normalized
    assert bool(torch.isnan(n).all())


def _model(d_vocab=40):
    cfg = dict(
        n_layers=1, d_model=16, n_heads=2, d_mlp=32, d_vocab=d_vocab, n_ctx=8, dtype=torch.float64, seed=3
    )
    return Transformer(TransformerConfig(**cfg))


def test_gaussian_noise_scale_seed_and_global_rng():
    """std = 3 x W_E.std() (over every token and dimension) by default, zero outside ``positions``, the same
    noise for the same seed, other noise for another, and the global RNG left as it was."""
    model = _model(d_vocab=2000)
    W_E = model.embed.W_E.detach()
    want_std = 3 * float(W_E.std())
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    noise = GaussianNoise(positions=[1, -1], seed=7).noise(model, 64, 8, 16, torch.float64)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(noise[:, [0, 2, 3, 4, 5, 6]], torch.zeros(64, 6, 16, dtype=torch.float64))
    sample = noise[:, [1, 7]].flatten()
    se = want_std / math.sqrt(2 * (sample.numel() - 1))  # standard error of a Gaussian sample's std
    assert abs(float(sample.std()) - want_std) < 4 * se
    assert torch.equal(noise, GaussianNoise(positions=[1, 7], seed=7).noise(model, 64, 8, 16, torch.float64))
    assert not torch.equal(
        noise, GaussianNoise(positions=[1, 7], seed=8).noise(model, 64, 8, 16, torch.float64)
    )
    # the same draw scaled by std_multiplier, or replaced by std=
    half = GaussianNoise(positions=[1, 7], seed=7, std_multiplier=1.5).noise(model, 64, 8, 16, torch.float64)
    assert torch.allclose(half * 2, noise)
    given = GaussianNoise(positions=[1, 7], seed=7, std=want_std).noise(model, 64, 8, 16, torch.float64)
    assert torch.allclose(given, noise)
    # numpy numbers are numbers
    as_np = GaussianNoise(positions=[1, 7], seed=np.uint32(7), std_multiplier=np.float32(1.5))
    assert torch.allclose(as_np.noise(model, 64, 8, 16, torch.float64), half)


def test_gaussian_noise_refuses_bad_scales_by_name():
    """A numpy float32 or a tensor scale was refused as "not a finite number >= 0" although np.float32(3) is one."""
    for bad in (torch.tensor(3.0), "3", True, None):
        with pytest.raises(TypeError, match="GaussianNoise.std_multiplier=.* is not valid"):
            GaussianNoise(std_multiplier=bad)
    for bad in (-1, float("nan"), np.float32("inf")):
        with pytest.raises(ValueError, match="GaussianNoise.std=.* give a finite number >= 0"):
            GaussianNoise(std=bad)


def test_gaussian_noise_reaches_the_embeddings_and_the_corrupted_run():
    """The corrupted run is the clean prompt with the noise added at hook_embed: activation_patching's corrupted
    metric equals the metric of that run computed by hand."""
    model = _model()
    g = torch.Generator().manual_seed(2)
    toks = torch.randint(0, 40, (3, 6), generator=g)
    corr = GaussianNoise(positions=[[0, 1], [2], [1, 3]], seed=5)
    noise = corr.noise(model, 3, 6, 16, torch.float64)
    assert torch.equal(
        (noise != 0).any(-1),
        torch.tensor([[1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0], [0, 1, 0, 1, 0, 0]]).bool(),
    )
    with torch.no_grad():
        _, c0 = model.run_with_cache(toks, names_filter="hook_embed")
        with model.hooks([("hook_embed", embedding_noise_hook(noise))]):
            logits, c1 = model.run_with_cache(toks, names_filter="hook_embed")
    assert torch.allclose(c1["hook_embed"] - c0["hook_embed"], noise)
    metric = LogitDiff(torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]))
    r = activation_patching(model, "resid_pre", toks, corruption=corr, metric=metric, quiet=True)
    assert torch.allclose(r.corrupted, metric(logits[:, -1]), rtol=1e-9)


def test_masked_mean_over_real_tokens():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, 3, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]]).bool()
    x[~mask] = math.inf  # padding's values never enter the mean
    got = masked_mean(x, mask, 0, 1)
    for t in range(5):
        real = [i for i in range(4) if mask[i, t]]
        want = sum(x[i, t] for i in real) / len(real)
        assert torch.allclose(got[0, t], want)
    # a tokenizer's output: its mask is the mean's, checked for left padding and values
    ids = torch.randint(0, 9, (4, 5), generator=g)
    ab = MeanAblation({"input_ids": ids, "attention_mask": mask.long().tolist()})
    assert torch.equal(ab.attention_mask, mask) and torch.equal(ab.reference_tokens, ids)
    with pytest.raises(ValueError, match="MeanAblation.attention_mask is left-padded"):
        MeanAblation(ids, attention_mask=mask.flip(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MeanAblation(ids, attention_mask=mask.float())


def test_mean_ablation_with_a_mask_patches_the_masked_mean():
    """Noising resid_pre of layer 0 at one position with MeanAblation(attention_mask) gives the metric of the run
    with that activation replaced by the mean over the prompts real there."""
    model = _model()
    g = torch.Generator().manual_seed(4)
    toks = torch.randint(0, 40, (4, 6), generator=g)
    mask = torch.tensor([[1] * n + [0] * (6 - n) for n in (6, 4, 2, 5)])
    last = mask.sum(1) - 1
    metric = LogProb(torch.tensor([1, 2, 3, 4]), position=last)
    r = activation_patching(
        model,
        "resid_pre",
        toks,
        corruption=MeanAblation(attention_mask=mask),
        direction="noising",
        metric=metric,
        layers=[0],
        quiet=True,
    )
    with torch.no_grad():
        _, cache = model.run_with_cache(toks, names_filter="blocks.0.hook_resid_pre")
        act = cache["blocks.0.hook_resid_pre"]
        for p in (1, 3):
            real = [i for i in range(4) if mask[i, p]]
            mean = sum(act[i, p] for i in real) / len(real)

            def put(x, hook, p=p, mean=mean):
                x = x.clone()
                x[:, p] = mean
                return x

            with model.hooks([("blocks.0.hook_resid_pre", put)]):
                logits = model(toks)
            want = metric(logits_at(logits, last))
            assert torch.allclose(r.values[:, 0, p], want, rtol=1e-9)
