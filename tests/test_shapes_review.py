"""Degenerate shapes and no-op settings found by review: a probe on no feature or scored on labels without
variance, a ridge similarity to a constant target, a susceptibility probe of one entry, and patching calls whose
corruption (or metric) makes every effect 0. Each is refused or reported, not returned as a number that looks like
an answer."""

import math
import warnings

import numpy as np
import pytest
import torch

import pypattern as pp
from pypattern import circuits
from pypattern import equivalence as E
from pypattern.flags import _ridge_probe
from pypattern.patching.metrics import LogitDiff, logit_diff_is_zero
from pypattern.ridge import ridge_similarity_cv, train_test_split

pytestmark = pytest.mark.usefixtures("one_thread")

NO_OP = "whatever the model"


def _no_op_warnings(record) -> list[str]:
    return [str(w.message) for w in record if NO_OP in str(w.message)]


# ----------------------------------------------------------------------------------------------- flags' probes


def _topics_model(d_model: int = 2):
    topics = pp.TopicTask(num_topics=2, tokens_per_topic=1, seq_len=5)
    lm = pp.Transformer(topics.model_config(n_layers=1, d_model=d_model, n_heads=1, d_mlp=2, seed=0))
    return topics, lm


def test_probe_on_no_non_flag_dimension_is_refused():
    topics, lm = _topics_model(d_model=2)
    spec = pp.FlagSpec("blocks.0.hook_resid_pre", dims=(0, 1), num_concepts=2)  # every dimension a flag
    with pytest.raises(
        ValueError, match=r"which='non_flag' selects no residual dimension: spec.dims=\(0, 1\)"
    ):
        pp.probe_accuracy(lm, topics, spec, which="non_flag", num_samples=16)
    with pytest.raises(ValueError, match=r"flag_report: spec.dims=\(0, 1\) covers all 2 dimensions"):
        pp.flag_report(lm, topics, spec, num_samples=16)
    # the flag dimensions themselves are probed as before
    acc, r2 = pp.probe_accuracy(lm, topics, spec, which="flag", num_samples=16)
    assert 0.0 <= acc <= 1.0 and math.isfinite(r2) and r2 <= 1.0


def test_probe_r2_of_held_out_labels_without_variance_is_nan_with_a_warning():
    topics, lm = _topics_model(d_model=4)
    spec = pp.FlagSpec("blocks.0.hook_resid_pre", dims=(0, 1), num_concepts=2)
    # one sequence per split carries one concept: the held-out one-hot is constant
    with pytest.warns(
        RuntimeWarning, match="held-out positions has concept 1, so the one-hot concept has no var"
    ):
        acc, r2 = pp.probe_accuracy(lm, topics, spec, which="flag", num_samples=1)
    assert math.isnan(r2)
    assert acc == 0.0  # fit on the other concept only: every held-out position is misread, an honest 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        acc, r2 = pp.probe_accuracy(lm, topics, spec, which="non_flag", num_samples=16)
    assert math.isfinite(r2) and 0.0 <= acc <= 1.0


def test_ridge_probe_returns_nan_r2_for_constant_held_out_labels():
    g = torch.Generator().manual_seed(0)
    x_fit, x_eval = torch.randn(20, 3, generator=g), torch.randn(6, 3, generator=g)
    y_fit = torch.arange(20) % 2
    acc, r2 = _ridge_probe(x_fit, y_fit, x_eval, torch.ones(6, dtype=torch.long), 2, 1e-2)
    assert math.isnan(r2) and 0.0 <= acc <= 1.0
    acc2, r2b = _ridge_probe(x_fit, y_fit, x_eval, torch.tensor([0, 1, 0, 1, 0, 1]), 2, 1e-2)
    # the one-hot R^2 computed by hand from the same least-squares fit
    mu, sd = x_fit.double().mean(0), x_fit.double().std(0)
    xf = torch.cat([(x_fit.double() - mu) / sd, torch.ones(20, 1, dtype=torch.float64)], 1)
    xe = torch.cat([(x_eval.double() - mu) / sd, torch.ones(6, 1, dtype=torch.float64)], 1)
    yf = torch.nn.functional.one_hot(y_fit, 2).double()
    reg = 1e-2 * torch.eye(4, dtype=torch.float64)
    reg[-1, -1] = 0
    pred = xe @ torch.linalg.solve(xf.T @ xf + reg, xf.T @ yf)
    ye = torch.nn.functional.one_hot(torch.tensor([0, 1, 0, 1, 0, 1]), 2).double()
    want = 1 - float(((pred - ye) ** 2).sum() / ((ye - ye.mean(0)) ** 2).sum())
    assert r2b == pytest.approx(want, rel=1e-12)


# ----------------------------------------------------------------------------------------------- similarities


def test_ridge_similarities_of_a_constant_target_warn_naming_it():
    rng = np.random.default_rng(0)
    x, c = rng.standard_normal((8, 3)), np.ones((8, 2))
    with pytest.warns(RuntimeWarning, match="ridge_similarity: y is constant over the samples"):
        assert math.isnan(E.ridge_similarity(x, c))
    with pytest.warns(RuntimeWarning, match="ridge_similarity_cv: ys is constant over the samples"):
        assert math.isnan(ridge_similarity_cv(x, c))
    with pytest.warns(RuntimeWarning, match=r"ridge_similarity_cv: ys\[1\] is constant over the samples"):
        got = ridge_similarity_cv(x, [x, c])
    assert got[0] == pytest.approx(ridge_similarity_cv(x, x)) and got[0] > 0.9 and math.isnan(got[1])
    # a target that varies, but not over the held-out samples of the split: named as such
    n = 10
    xs = rng.standard_normal((n, 3))
    tr, _ = train_test_split(n, 0.9, 0)
    y = np.zeros((n, 1))
    y[tr.numpy()] = rng.standard_normal((len(tr), 1))
    with pytest.warns(RuntimeWarning, match=r"ys is constant over the 2 held-out samples of this split"):
        assert math.isnan(ridge_similarity_cv(xs, y, train_fraction=0.9))
    # a constant x predicts only the mean: similarity 0, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert E.ridge_similarity(c, x) == 0.0
        assert ridge_similarity_cv(c, x) == 0.0


def test_minibatch_cka_documents_nan_for_a_constant_representation():
    rng = np.random.default_rng(0)
    x, c = rng.standard_normal((8, 3)), np.ones((8, 2))
    mb = pp.MinibatchCKA(1, 1)
    mb.update([torch.tensor(c)], [torch.tensor(x)])
    assert math.isnan(float(mb.compute()[0, 0])) and math.isnan(pp.linear_cka(c, x))
    doc = pp.MinibatchCKA.compute.__doc__
    assert "NaN" in doc and "constant" in doc


# ----------------------------------------------------------------------------------------------- susceptibilities

_S = dict(nbeta=10.0, num_chains=2, num_draws=4, step_size=1e-3, localization=100.0, quiet=True)


def _chi_model():
    m = pp.Transformer(
        pp.TransformerConfig(n_layers=1, d_model=4, n_heads=2, d_vocab=3, n_ctx=4, d_mlp=4, seed=0)
    )
    train = [torch.randint(0, 3, (4, 4), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    return m, train


def test_susceptibilities_of_a_one_entry_probe_warn_that_chi_is_zero():
    m, train = _chi_model()
    with pytest.warns(RuntimeWarning, match=r"one counted entry \(probe sample 0, position 1\).*chi is 0"):
        r = pp.susceptibilities(m, train, torch.tensor([[0, 1]]), ["blocks.0.mlp", "embed"], **_S)
    assert np.all(r.chi == 0.0)
    with pytest.warns(
        RuntimeWarning, match=r"one counted entry \(probe sample 0\).*at least two counted samples"
    ):
        r = pp.susceptibilities(
            m, train, torch.tensor([[0, 1, 2, 0]]), ["blocks.0.mlp"], per_token=False, **_S
        )
    assert np.all(r.chi == 0.0)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        r = pp.susceptibilities(m, train, torch.tensor([[0, 1, 2]]), ["blocks.0.mlp"], **_S)
    assert not [w for w in rec if "one counted entry" in str(w.message)]
    assert np.abs(r.chi).max() > 0


# ----------------------------------------------------------------------------------------------- no-op patching


def _patch_model():
    return pp.Transformer(
        pp.TransformerConfig(n_layers=2, d_model=4, n_heads=2, d_vocab=3, n_ctx=3, d_mlp=4, seed=0)
    )


def test_logit_diff_is_zero_reads_answers_elementwise():
    t = torch.tensor
    assert logit_diff_is_zero(LogitDiff(t([1, 2]), t([1, 2])))
    assert logit_diff_is_zero(LogitDiff(1, t([1, 1])))
    assert logit_diff_is_zero(LogitDiff(t([[1, 2]]), t([[2, 1]])))  # the same ids, in another order
    assert logit_diff_is_zero(LogitDiff(t([[1, 1]]), t([[1]])))  # the same proportions
    assert not logit_diff_is_zero(LogitDiff(t([1, 2]), t([1, 0])))  # example 1 differs
    assert not logit_diff_is_zero(LogitDiff(t([[1, 2]]), t([[1, 1]])))
    assert not logit_diff_is_zero(pp.LogProb(t([1])))


def test_activation_patching_warns_when_every_effect_is_forced_to_zero():
    m = _patch_model()
    clean = torch.tensor([[0, 1, 2]])
    ld = pp.LogitDiff(torch.tensor([1]), torch.tensor([2]))
    with pytest.warns(
        RuntimeWarning, match="mean ablation averages over one prompt, the clean prompt itself"
    ):
        r = pp.activation_patching(
            m, "z", clean, metric=ld, corruption=pp.MeanAblation(), direction="noising", quiet=True
        )
    assert float(r.effect.abs().max()) < 1e-5
    with pytest.warns(RuntimeWarning, match="the corrupted prompts equal the clean ones"):
        r = pp.activation_patching(m, "resid_pre", clean, clean.clone(), metric=ld, quiet=True)
    assert float(r.effect.abs().max()) < 1e-5  # 0 up to the rounding of the engine's recomputation
    same = pp.LogitDiff(torch.tensor([1]), torch.tensor([1]))
    with pytest.warns(
        RuntimeWarning, match="LogitDiff's answer and wrong tokens are the same for every example"
    ):
        r = pp.activation_patching(m, "resid_pre", clean, torch.tensor([[1, 2, 0]]), metric=same, quiet=True)
    assert float(r.values.abs().max()) == 0.0
    # the same calls on prompts that differ: no such warning, and effects that are not 0
    two = torch.tensor([[0, 1, 2], [2, 0, 1]])
    ld2 = pp.LogitDiff(torch.tensor([1, 0]), torch.tensor([2, 2]))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        r = pp.activation_patching(
            m, "z", two, metric=ld2, corruption=pp.MeanAblation(), direction="noising", quiet=True
        )
        r2 = pp.activation_patching(m, "resid_pre", clean, torch.tensor([[1, 2, 0]]), metric=ld, quiet=True)
    assert not _no_op_warnings(rec)
    assert float(r.effect.abs().max()) > 1e-4 and float(r2.effect.abs().max()) > 1e-4


def test_no_op_warning_is_given_once_per_call_naming_every_cause():
    m = _patch_model()
    clean = torch.tensor([[0, 1, 2]])
    same = pp.LogitDiff(torch.tensor([1]), torch.tensor([1]))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        pp.activation_patching(m, "resid_pre", clean, clean.clone(), metric=same, quiet=True)
    msgs = _no_op_warnings(rec)
    assert len(msgs) == 1
    assert "corrupted prompts equal the clean ones" in msgs[0] and "LogitDiff's answer and wrong" in msgs[0]


def test_attribution_patching_warns_on_corrupted_prompts_equal_to_clean():
    m = _patch_model()
    clean = torch.tensor([[0, 1, 2]])
    ld = pp.LogitDiff(torch.tensor([1]), torch.tensor([2]))
    with pytest.warns(
        RuntimeWarning, match="attribution_patching: every effect is 0.*corrupted prompts equal"
    ):
        out = pp.attribution_patching(m, clean, clean.clone(), metric=ld, sites=["resid_pre"])
    assert float(out["resid_pre"].effect.abs().max()) == 0.0


def test_edge_attribution_warns_when_every_score_is_forced_to_zero():
    m = _patch_model()
    clean = torch.tensor([[0, 1, 2]])
    ld = pp.LogitDiff(torch.tensor([1]), torch.tensor([2]))
    with pytest.warns(
        RuntimeWarning, match="edge_attribution: every edge score is 0.*mean ablation averages over one"
    ):
        e = circuits.edge_attribution(m, clean, metric=ld, ablation="mean", method="exact", quiet=True)
    assert float(e.scores.abs().max()) == 0.0
    with pytest.warns(
        RuntimeWarning, match="edge_attribution: every edge score is 0.*corrupted prompts equal"
    ):
        e = circuits.edge_attribution(m, clean, clean.clone(), metric=ld, method="eap")
    assert float(e.scores.abs().max()) == 0.0
    same = pp.LogitDiff(torch.tensor([1]), torch.tensor([1]))
    with pytest.warns(RuntimeWarning, match="edge_attribution: every edge score is 0.*LogitDiff's answer"):
        e = circuits.edge_attribution(m, clean, torch.tensor([[1, 2, 0]]), metric=same, method="eap")
    assert float(e.scores.abs().max()) == 0.0
    # mean ablation over the corrupted prompts (a batch of one that differs from the clean one) is no no-op
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        e = circuits.edge_attribution(
            m, clean, torch.tensor([[1, 2, 0]]), metric=ld, ablation="mean", method="exact", quiet=True
        )
    assert not _no_op_warnings(rec)
    assert float(e.scores.abs().max()) > 1e-4
