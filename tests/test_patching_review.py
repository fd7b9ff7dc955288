"""Patching inputs found by review: a metric that is not finite on the unpatched model, batch limits of the naive
path, restrictions that select no cell."""

import pytest
import torch

import pypattern as pp
from pypattern.models import Transformer, TransformerConfig


@pytest.fixture(scope="module")
def setup():
    m = Transformer(
        TransformerConfig(
            n_layers=2, d_model=16, n_heads=4, d_mlp=32, d_vocab=20, n_ctx=8, dtype=torch.float64
        )
    )
    c = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(0))
    return m, c, (c + 1) % 20, pp.LogitDiff(torch.tensor([1, 2]), torch.tensor([3, 4]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_metric_that_is_not_finite_on_the_clean_run_is_refused_or_flagged(setup, bad):
    """Not finite for every example: refused (nothing to measure); for some: a warning naming them, the others
    measured as usual."""
    m, c, k, md = setup

    def metric(lg):
        return lg[..., 0] * bad

    def some(lg):
        v = md(lg)
        return torch.cat([v[..., :1] * bad, v[..., 1:]], -1)

    for f in (
        lambda mt: pp.activation_patching(m, "resid_pre", c, k, metric=mt),
        lambda mt: pp.activation_patching(m, "resid_pre", c, k, metric=mt, method="naive"),
        lambda mt: pp.attribution_patching(m, c, k, metric=mt),
    ):
        with pytest.raises(ValueError, match="on the clean run: every example"):
            f(metric)
        with pytest.warns(RuntimeWarning, match="for example 0 on the clean run"):
            r = f(some)
        r = r if isinstance(r, pp.PatchResult) else next(iter(r.values()))  # AtP: one result per site
        assert torch.isfinite(r.values[1]).all()


@pytest.mark.parametrize("kw", [dict(max_batch=0), dict(max_batch="x"), dict(max_memory=-5)])
def test_the_naive_path_checks_its_batch_limits(setup, kw):
    m, c, k, md = setup
    with pytest.raises(ValueError, match="is not valid"):
        pp.activation_patching(m, "resid_pre", c, k, metric=md, method="naive", **kw)


@pytest.mark.parametrize(
    "site, kw",
    [("resid_pre", dict(positions=[])), ("resid_pre", dict(layers=[])), ("z", dict(heads=[]))],
)
def test_restrictions_that_select_nothing_are_refused(setup, site, kw):
    m, c, k, md = setup
    with pytest.raises(ValueError, match="is empty"):
        pp.activation_patching(m, site, c, k, metric=md, **kw)


@pytest.mark.parametrize("method", ["exact", "naive"])
def test_an_example_whose_metric_is_not_finite_is_left_out_of_the_means(method):
    """A metric NaN for example 0 on the clean run: the warning names it and says the means leave it out, and
    the means, errors, intervals and normalised values equal those of the run on the other examples alone."""
    m = Transformer(
        TransformerConfig(
            n_layers=2, d_model=16, n_heads=4, d_mlp=32, d_vocab=20, n_ctx=8, dtype=torch.float64
        )
    )
    g = torch.Generator().manual_seed(1)
    c, k = torch.randint(0, 20, (4, 5), generator=g), torch.randint(0, 20, (4, 5), generator=g)
    ans, wrong = torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6, 7, 8])
    ld = pp.LogitDiff(ans, wrong)

    def nan_on_0(lg):
        v = ld(lg)
        return torch.where(torch.arange(lg.shape[-2]) == 0, float("nan"), v)

    with pytest.warns(
        RuntimeWarning, match=r"nan for example 0 on the clean run: that example is left out of every mean"
    ):
        r = pp.activation_patching(m, "resid_pre", c, k, metric=nan_on_0, method=method, quiet=True)
    ref = pp.activation_patching(
        m, "resid_pre", c[1:], k[1:], metric=pp.LogitDiff(ans[1:], wrong[1:]), method=method, quiet=True
    )
    assert r.finite_examples.tolist() == [False, True, True, True]
    assert torch.isnan(r.values[0]).all()
    torch.testing.assert_close(r.values[1:], ref.values, rtol=1e-12, atol=1e-12)
    for normalized in (False, True):
        torch.testing.assert_close(r.mean(normalized), ref.mean(normalized), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(r.se(normalized), ref.se(normalized), rtol=1e-12, atol=1e-12)
        for a, b in zip(r.ci(normalized=normalized), ref.ci(normalized=normalized)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r.normalized[1:], ref.normalized, rtol=1e-12, atol=1e-12)
    assert [c for c, _ in r.top(3)] == [c for c, _ in ref.top(3)]


def test_a_metric_not_finite_on_the_corrupted_run_is_named_or_refused(setup):
    """Infinite on the corrupted run for example 1: named, and left out of the means; for every example: refused
    (no example is finite on both unpatched runs)."""
    m, c, k, md = setup

    corrupted_logits = m(k)[:, -1]

    def metric_of(rows):
        def metric(lg):
            v = md(lg)
            is_corr = torch.isclose(lg, corrupted_logits).all(-1)
            return torch.where(is_corr & torch.isin(torch.arange(2), torch.tensor(rows)), float("inf"), v)

        return metric

    with pytest.warns(
        RuntimeWarning, match=r"inf for example 1 on the corrupted run: that example is left out"
    ):
        r = pp.activation_patching(m, "resid_pre", c, k, metric=metric_of([1]), quiet=True)
    assert r.finite_examples.tolist() == [True, False]
    torch.testing.assert_close(r.mean(False), r.values[0])
    with pytest.raises(
        ValueError, match=r"not finite on the clean run or on the corrupted run for every example"
    ):
        pp.activation_patching(m, "resid_pre", c, k, metric=metric_of([0, 1]), quiet=True)


def _four(seed=1):
    """A float64 model, four prompt pairs and their LogitDiff answers."""
    m = Transformer(
        TransformerConfig(
            n_layers=2, d_model=16, n_heads=4, d_mlp=32, d_vocab=20, n_ctx=8, dtype=torch.float64
        )
    )
    g = torch.Generator().manual_seed(seed)
    c, k = torch.randint(0, 20, (4, 5), generator=g), torch.randint(0, 20, (4, 5), generator=g)
    return m, c, k, torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6, 7, 8])


def test_shortlist_and_confirm_averages_over_the_finite_examples():
    """A metric NaN for example 0: the ranking and both columns are those of the call on the other examples
    alone (not NaN)."""
    from pypattern.patching.attribution import shortlist_and_confirm

    m, c, k, ans, wrong = _four()
    ld = pp.LogitDiff(ans, wrong)

    def nan_on_0(lg):
        return torch.where(torch.arange(lg.shape[-2]) == 0, float("nan"), ld(lg))

    with pytest.warns(RuntimeWarning, match=r"for example 0 on the clean run"):
        out = shortlist_and_confirm(m, "resid_pre", c, k, metric=nan_on_0, k=3)
    ref = shortlist_and_confirm(m, "resid_pre", c[1:], k[1:], metric=pp.LogitDiff(ans[1:], wrong[1:]), k=3)
    assert [(r["layer"], r["pos"]) for r in out] == [(r["layer"], r["pos"]) for r in ref]
    for r, e in zip(out, ref):
        assert r["atp"] == pytest.approx(e["atp"], rel=1e-9, abs=1e-12)
        assert r["exact"] == pytest.approx(e["exact"], rel=1e-9, abs=1e-12)


class _InfOnCorrupted(pp.LogitDiff):
    """LogitDiff whose value is infinite on the corrupted run (logits ``corr_logits (batch, vocab)``) of the
    examples ``rows``; its per-example tensors are declared, so ``max_batch`` splits them with the prompts."""

    per_example = ("answer", "wrong", "corr_logits", "rows")

    def __init__(self, answer, wrong, corr_logits, rows):
        super().__init__(answer, wrong)
        self.corr_logits = corr_logits
        self.rows = torch.isin(torch.arange(len(answer)), torch.tensor(rows))

    def __call__(self, lg):
        hit = torch.isclose(lg, self.corr_logits).all(-1) & self.rows
        return torch.where(hit, float("inf"), super().__call__(lg))


@pytest.mark.parametrize("direction", ["noising", "denoising"])
@pytest.mark.parametrize("max_batch", [None, 2])
def test_attribution_patching_names_or_refuses_a_corrupted_run_that_is_not_finite(direction, max_batch):
    """Infinite on the corrupted run for example 3 (with max_batch=2, in the second part: named by its index in the
    whole batch): named and left out of the means; for every example: refused, as exact patching does."""
    m, c, k, ans, wrong = _four()
    corr_logits = m(k)[:, -1].detach()

    def atp(rows):
        return pp.attribution_patching(
            m,
            c,
            k,
            metric=_InfOnCorrupted(ans, wrong, corr_logits, rows),
            sites=["resid_pre"],
            direction=direction,
            max_batch=max_batch,
        )["resid_pre"]

    with pytest.warns(
        RuntimeWarning, match=r"inf for example 3 on the corrupted run: that example is left out"
    ):
        r = atp([3])
    assert r.finite_examples.tolist() == [True, True, True, False]
    assert torch.isfinite(r.mean(False)).all()
    with pytest.raises(
        ValueError, match=r"not finite on the clean run or on the corrupted run for every example"
    ):
        atp([0, 1, 2, 3])


def test_warnings_of_non_finite_examples_point_at_the_callers_line():
    """The warnings naming non-finite examples (clean run, corrupted run; exact and attribution patching) are
    attributed to the line that called pypattern, not to a line inside it."""
    m, c, k, ans, wrong = _four()
    corr_logits = m(k)[:, -1].detach()
    ld = pp.LogitDiff(ans, wrong)

    def nan_on_0(lg):
        return torch.where(torch.arange(lg.shape[-2]) == 0, float("nan"), ld(lg))

    on_corr = _InfOnCorrupted(ans, wrong, corr_logits, [3])
    for call, run in (
        (lambda: pp.activation_patching(m, "resid_pre", c, k, metric=nan_on_0, quiet=True), "clean"),
        (lambda: pp.activation_patching(m, "resid_pre", c, k, metric=on_corr, quiet=True), "corrupted"),
        (lambda: pp.attribution_patching(m, c, k, metric=nan_on_0, sites=["resid_pre"]), "clean"),
        (lambda: pp.attribution_patching(m, c, k, metric=on_corr, sites=["resid_pre"]), "corrupted"),
    ):
        with pytest.warns(RuntimeWarning, match=f"on the {run} run") as rec:
            call()
        named = [w for w in rec if f"on the {run} run" in str(w.message)]
        assert named and all(w.filename == __file__ for w in named), [w.filename for w in named]
