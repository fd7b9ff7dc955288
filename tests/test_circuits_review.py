"""Arguments of pypattern.circuits refused by name before they fail deep inside or give a silently wrong result:
mask shapes, graph= of another type, counts and fractions of circuits and curves, seq_len, NaN scores; and the
warning of first-order scores whose metric has no gradient at the base run."""

import math

import pytest
import torch

from pypattern.circuits import edges
from pypattern.models import Transformer, TransformerConfig
from pypattern.patching import LogitDiff

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(**kw):
    cfg = dict(n_layers=2, d_model=16, n_heads=2, d_mlp=32, d_vocab=20, n_ctx=8, seed=3, dtype=torch.float64)
    cfg.update(kw)
    return Transformer(TransformerConfig(**cfg))


def _prompts():
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 20, (3, 6), generator=g)
    corr = torch.randint(0, 20, (3, 6), generator=g)
    return clean, corr, LogitDiff(torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]))


@pytest.mark.parametrize("seq_len", [True, 0, -2, 2.0, "6"])
def test_a_bad_seq_len_is_refused_by_its_own_name(seq_len):
    with pytest.raises(ValueError, match=rf"^seq_len={seq_len!r} is not valid; .*positive int"):
        edges(_model(), per_position=True, seq_len=seq_len)


def test_a_numpy_seq_len_gives_an_int_n_pos():
    import numpy as np

    g = edges(_model(), per_position=True, seq_len=np.int64(6))
    assert g.n_pos == 6 and type(g.n_pos) is int and len(g) == 6 * len(edges(_model()))


@pytest.mark.parametrize("call", ["patch_edges", "faithfulness"])
def test_a_mask_of_another_shape_is_refused_before_the_engine(call):
    from pypattern import circuits

    model = _model()
    clean, corr, metric = _prompts()
    E = len(edges(model))
    f = getattr(circuits, call)
    for bad in (torch.ones(2, 2, E, dtype=torch.bool), torch.tensor(True)):
        with pytest.raises(
            ValueError, match=r"edges is a tensor of shape .*\(num_edges,\).*\(C, num_edges\)"
        ):
            f(model, bad, clean, corr, metric=metric)
    with pytest.raises(ValueError, match=r"edges\[1\] is a tensor of shape \(1, \d+\); .*\(num_edges,\)"):
        f(
            model,
            [torch.ones(E, dtype=torch.bool), torch.ones(1, E, dtype=torch.bool)],
            clean,
            corr,
            metric=metric,
        )
    # the shapes that are masks still work: one set and a batch of two
    one = f(model, torch.ones(E, dtype=torch.bool), clean, corr, metric=metric)
    two = f(model, torch.ones(2, E, dtype=torch.bool), clean, corr, metric=metric)
    assert len(two) == 2 and torch.allclose(two[0].double(), torch.as_tensor(one, dtype=torch.float64))


def test_a_graph_that_is_not_an_edge_graph_is_refused_by_name():
    from pypattern.circuits import (
        acdc,
        circuit_from_edges,
        draw_circuit,
        edge_attribution,
        faithfulness,
        patch_edges,
        pruning_curve,
    )

    model = _model()
    clean, corr, metric = _prompts()
    g = edges(model)
    two = g.edges[:2]
    sc = torch.ones(len(g))
    calls = {
        "patch_edges": lambda: patch_edges(model, two, clean, corr, metric=metric, graph=g.edges),
        "faithfulness": lambda: faithfulness(model, two, clean, corr, metric=metric, graph=g.edges),
        "edge_attribution": lambda: edge_attribution(model, clean, corr, metric=metric, graph=g.edges),
        "pruning_curve": lambda: pruning_curve(model, sc, clean, corr, metric=metric, graph=g.edges),
        "acdc": lambda: acdc(model, clean, corr, metric=metric, threshold=0.1, graph=g.edges),
    }
    for call in calls.values():
        with pytest.raises(TypeError, match=r"^graph= is a list; give an EdgeGraph"):
            call()
    with pytest.raises(TypeError, match=r"^graph is a list; give an EdgeGraph"):
        circuit_from_edges(g.edges, two)
    with pytest.raises(TypeError, match=r"^graph is a list; give an EdgeGraph"):
        draw_circuit(g.edges, torch.ones(len(g), dtype=torch.bool))
    assert len(circuit_from_edges(g, two)) == 2


def _scores(values=None):
    """EdgeScores of the tiny model's graph with given per-example values (no model run)."""
    from pypattern.circuits import EdgeScores

    g = edges(_model())
    if values is None:
        values = torch.arange(2 * len(g), dtype=torch.float64).view(2, -1) - len(g)
    z = torch.zeros(values.shape[0], dtype=torch.float64)
    return EdgeScores(g, values, "eap", "noise", "resample", "LogitDiff", z, z)


def test_circuit_and_top_refuse_counts_and_fractions_that_are_not_numbers_of_edges():
    sc = _scores()
    E = len(sc.graph)
    for n in (2.5, True, -1, E + 1, "3"):
        with pytest.raises(ValueError, match=rf"^n={n!r} is not valid; give an int in 0\.\.{E}"):
            sc.circuit(n=n)
    for fraction in (True, float("nan"), 1.5, "0.5"):
        with pytest.raises(
            ValueError, match=rf"^fraction={fraction!r} is not valid; give a number in \[0, 1\]"
        ):
            sc.circuit(fraction=fraction)
    for n in (2.5, True, -1):
        with pytest.raises(ValueError, match=rf"^n={n!r} is not valid; give an int >= 0"):
            sc.top(n)
    with pytest.raises(ValueError, match=r"^n=2\.5 is not valid"):
        sc.draw(2.5)
    # ints of either kind, fractions as numbers, and more than the graph's edges for top()
    import numpy as np

    assert len(sc.circuit(n=np.int64(3))) == 3 and len(sc.circuit(fraction=1)) == E
    big = sc.scores.abs() > 10
    assert len(sc.circuit(n=big.sum())) == int(big.sum()) > 0
    assert len(sc.circuit(fraction=torch.tensor(0.5))) == round(0.5 * E)
    with pytest.raises(ValueError, match=r"^n=True is not valid"):
        sc.circuit(n=torch.tensor(True))
    assert len(sc.top(E + 5)) == E and sc.top(1)[0][0] == sc.graph[int(sc.ranking()[0])]


def _curve(counts, faith):
    from pypattern.circuits import PruningCurve

    return PruningCurve(counts, 10, {"m": faith}, {}, 1.0, 0.0, "noise", "resample", "LogitDiff")


def test_pruning_curve_at_and_draw_circuit_refuse_bad_numbers():
    from pypattern.circuits import draw_circuit

    pc = _curve(torch.tensor([0, 5, 10]), torch.tensor([0.0, 0.5, 1.0]))
    assert pc.at(0.4) == {"m": 0.5}
    for fraction in (True, float("nan"), "0.5", -0.1):
        with pytest.raises(ValueError, match=rf"^fraction={fraction!r} is not valid"):
            pc.at(fraction)
    empty = _curve(torch.zeros(0, dtype=torch.long), torch.zeros(0))
    with pytest.raises(ValueError, match="the curve has no points"):
        empty.at(0.1)
    g = edges(_model())
    mask = torch.ones(len(g), dtype=torch.bool)
    with pytest.raises(ValueError, match=r"^max_edges=2\.5 is not valid"):
        draw_circuit(g, mask, max_edges=2.5)
    with pytest.raises(ValueError, match=r"^annotate=-1 is not valid"):
        draw_circuit(g, mask, annotate=-1)


def test_pruning_curve_refuses_no_points_and_sorts_counts_like_fractions():
    from pypattern.circuits import edge_attribution, pruning_curve

    model = _model()
    clean, corr, metric = _prompts()
    sc = edge_attribution(model, clean, corr, metric=metric)
    for kw in (dict(counts=[]), dict(fractions=[]), dict(fractions=())):
        name = next(iter(kw))
        with pytest.raises(ValueError, match=rf"^{name} is empty; give at least one point"):
            pruning_curve(model, sc, clean, corr, metric=metric, **kw)
    for kw in (dict(counts=5), dict(counts="5"), dict(fractions=0.5)):
        with pytest.raises(
            TypeError, match=rf"^{next(iter(kw))}=.* is not valid; give a sequence of numbers"
        ):
            pruning_curve(model, sc, clean, corr, metric=metric, **kw)
    with pytest.raises(ValueError, match=r"fractions must be numbers .*got \[True\]"):
        pruning_curve(model, sc, clean, corr, metric=metric, fractions=[True])
    got = pruning_curve(model, sc, clean, corr, metric=metric, counts=[10, 3, 3])
    want = pruning_curve(model, sc, clean, corr, metric=metric, counts=[3, 10])
    assert got.counts.tolist() == [3, 10] and got.info["num_runs"] == want.info["num_runs"]
    torch.testing.assert_close(got.faithfulness["eap"], want.faithfulness["eap"])
    E = len(sc.graph)
    by_fraction = pruning_curve(model, sc, clean, corr, metric=metric, fractions=[1.0, 10 / E, 3 / E, 3 / E])
    assert by_fraction.counts.tolist() == [3, 10, E]
    assert got.at(0.0)["eap"] == float(got.faithfulness["eap"][0])


def test_scores_holding_nan_are_refused_wherever_they_are_ranked():
    from pypattern.circuits import pruning_curve

    model = _model()
    clean, corr, metric = _prompts()
    sc = _scores()
    top = int(sc.ranking()[0])
    v = sc.values.clone()
    v[0, top] = float("nan")  # the top edge, NaN on one example: it used to be ranked last
    bad = _scores(v)
    name = sc.graph[top].name
    for call in (bad.ranking, lambda: bad.circuit(n=1), lambda: bad.top(1)):
        with pytest.raises(ValueError, match=rf"^scores holds NaN for 1 of \d+ edges \({name}\)"):
            call()
    # the table shows every edge: the NaN one last, rank NaN, the others ranked as without it
    df, ok = bad.to_pandas(), sc.to_pandas()
    assert len(df) == len(sc.graph) and math.isnan(df["score"].iloc[-1]) and math.isnan(df["rank"].iloc[-1])
    assert df["rank"].iloc[:-1].tolist() == list(range(1, len(sc.graph)))
    assert df["name"].iloc[:-1].tolist() == [n for n in ok["name"].tolist() if n != name]
    all_nan = torch.full((len(sc.graph),), float("nan"), dtype=torch.float64)
    with pytest.raises(ValueError, match=r"^scores holds NaN for (\d+) of \1 edges"):
        pruning_curve(model, all_nan, clean, corr, metric=metric, counts=[0, 5])
    with pytest.raises(ValueError, match=r"^scores\['b'\] holds NaN for 1 of"):
        pruning_curve(model, {"a": sc, "b": bad}, clean, corr, metric=metric, counts=[0, 5])
    # finite scores rank as before
    assert sc.circuit(n=1).mask[top] and sc.top(1)[0][0].name == name


def _rounding_warnings(*args, **kw):
    import warnings

    from pypattern.circuits import edge_attribution

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        sc = edge_attribution(*args, **kw)
    return sc, [str(x.message) for x in w if "rounding level" in str(x.message)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_first_order_scores_of_a_metric_without_gradient_at_the_base_run_warn(dtype):
    from pypattern.patching import KL

    model = _model(dtype=dtype)
    clean, corr, _ = _prompts()
    # KL from the clean run is smallest at the clean run, the base run of noising: its gradient there is zero
    for method, steps in (("eap", 5), ("eap-ig", 1)):
        sc, msgs = _rounding_warnings(model, clean, corr, metric=KL(), method=method, steps=steps)
        assert float(sc.values.abs().max()) < 100 * torch.finfo(dtype).eps
        assert (
            len(msgs) == 1
            and f"edge_attribution(method={method!r}): every edge score is at rounding" in msgs[0]
        )
        assert "gradient vanishes at the base run" in msgs[0] and "method='exact'" in msgs[0]
    assert "method='eap-ig'" in _rounding_warnings(model, clean, corr, metric=KL())[1][0]
    # along the interpolation, and in the denoising frame, the gradient is not zero: no warning
    for kw in (dict(method="eap-ig", steps=5), dict(mode="denoise")):
        sc, msgs = _rounding_warnings(model, clean, corr, metric=KL(), **kw)
        assert not msgs and float(sc.values.abs().max()) > 1e-3


def test_small_scores_that_are_not_rounding_do_not_warn():
    model = _model()
    clean, corr, metric = _prompts()
    ref, msgs = _rounding_warnings(model, clean, corr, metric=metric)
    assert not msgs
    # outputs 1e-12 times smaller: scores of about 1e-13, as small as the metric's changes, are not rounding
    with torch.no_grad():
        model.unembed.W_U.mul_(1e-12)
        model.unembed.b_U.mul_(1e-12)
    sc, msgs = _rounding_warnings(model, clean, corr, metric=metric)
    assert not msgs and float(sc.values.abs().max()) < 1e-9
    torch.testing.assert_close(sc.values, ref.values * 1e-12)
    # identical prompts: every score is zero, and so is every change of the metric: nothing to warn about
    sc, msgs = _rounding_warnings(model, clean, clean, metric=metric)
    assert not msgs and not bool(sc.values.any())


def test_draw_of_a_graph_smaller_than_the_default_count_and_prepare_runs_graph_type():
    """EdgeScores.draw() on a graph of fewer than 20 edges draws every edge (the default count no longer exceeds
    the graph); prepare_runs names a graph= that is not an EdgeGraph."""
    import matplotlib

    matplotlib.use("Agg")
    from pypattern.circuits import edge_attribution, edges
    from pypattern.circuits.engine import prepare_runs
    from pypattern.models import Transformer, TransformerConfig
    from pypattern.patching import LogitDiff

    model = Transformer(TransformerConfig(n_layers=1, d_model=8, n_heads=1, d_mlp=0, d_vocab=11, n_ctx=6))
    g = edges(model)
    assert len(g) < 20
    x, y = torch.randint(0, 11, (2, 4)), torch.randint(0, 11, (2, 4))
    metric = LogitDiff([1, 2], [3, 4])
    sc = edge_attribution(model, x, y, metric=metric)
    sc.draw()
    with pytest.raises(TypeError, match=r"^graph= is a list; give an EdgeGraph"):
        prepare_runs(model, list(g.edges), x, y, metric)


@pytest.mark.parametrize("call", ["patch_edges", "faithfulness"])
def test_a_list_of_found_circuits_is_a_batch_of_their_masks(call):
    from pypattern import circuits

    model = _model()
    clean, corr, metric = _prompts()
    sc = circuits.edge_attribution(model, clean, corr, metric=metric, method="eap")
    c1, c2 = sc.circuit(n=5), sc.circuit(n=12)
    f = getattr(circuits, call)
    got = f(model, [c1, c2], clean, corr, metric=metric)
    ref = f(model, torch.stack([c1.mask, c2.mask]), clean, corr, metric=metric)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    mixed = f(model, [c1, c2.mask], clean, corr, metric=metric)  # circuits and masks in one batch
    torch.testing.assert_close(mixed, ref, rtol=0, atol=0)
    one = torch.as_tensor(f(model, c1, clean, corr, metric=metric), dtype=ref.dtype)
    torch.testing.assert_close(one, ref[0], rtol=1e-12, atol=1e-12)  # alone: another batching, same values
    other = circuits.edge_attribution(model, clean, corr, metric=metric, method="eap", per_position=True)
    with pytest.raises(
        ValueError, match=r"edges\[1\] is a Circuit on a graph of \d+ edges \(per_position=True\)"
    ):
        f(model, [c1, other.circuit(n=5)], clean, corr, metric=metric)


def test_acdc_reads_rounding_level_drops_as_zero_and_keeps_16_bit_drops_in_float32():
    """threshold=0 keeps every tested edge whose removal changes the metric by rounding only (its stored drop is
    0), whatever the batching of the tests; a bfloat16 model's drops are float32 and agree with the decisions."""
    from pypattern import circuits

    model = _model(n_heads=4, n_key_value_heads=2)
    clean, corr, metric = _prompts()
    graph = edges(model, per_position=True, seq_len=clean.shape[1])
    runs = [
        circuits.acdc(model, clean, corr, metric=metric, threshold=0.0, graph=graph, max_batch=mb, quiet=True)
        for mb in (None, 1, 3)
    ]
    for c in runs:
        s = c.scores
        assert s.dtype == torch.float64
        assert not bool(((s.abs() < 1e-12) & (s != 0)).any())  # no rounding-level drop is stored
        assert bool((c.mask | (s < 0)).all())  # threshold 0: only edges whose removal raises the metric go
        assert bool(((s == 0) & c.mask).sum() > 0)  # edges without effect were tested and kept
        assert torch.equal(c.mask, runs[0].mask)
    half = _model(n_heads=4, n_key_value_heads=2, dtype=torch.bfloat16)
    for thr in (0.02, 0.05):
        c = circuits.acdc(half, clean, corr, metric=metric, threshold=thr, quiet=True)
        assert c.scores.dtype == torch.float32
        tested = c.scores != 0
        assert not bool((c.mask & tested & (c.scores < thr)).any())
        assert not bool((~c.mask & tested & (c.scores >= thr)).any())


@pytest.mark.parametrize("mode", ["noise", "denoise"])
def test_an_accuracy_metrics_recorded_runs_are_float_values(mode):
    """An accuracy metric (bool per example): the clean and base runs' metric values in the scores are floats, as
    the scores are (their batch means are what faithfulness divides by)."""
    from pypattern.circuits import edge_attribution

    model = _model()
    clean, corr, _ = _prompts()
    with torch.no_grad():
        top = model(clean)[:, -1].argmax(-1)
    sc = edge_attribution(
        model, clean, corr, metric=lambda lg: lg.argmax(-1) == top, method="exact", mode=mode, quiet=True
    )
    for name in ("m_clean", "m_base"):
        v = getattr(sc, name, None)
        if v is None:
            v = sc.info.get(name)
        assert v is not None and torch.as_tensor(v).is_floating_point(), name
        assert 0.0 <= float(torch.as_tensor(v).mean()) <= 1.0


# ----------------------------------------------------------------------------- a metric not finite on one example


def _nan_on_0(metric):
    """``metric`` with example 0's value NaN on every run."""

    def f(lg):
        v = metric(lg)
        return torch.where(torch.arange(lg.shape[-2]) == 0, float("nan"), v)

    return f


def _four_prompts():
    g = torch.Generator().manual_seed(1)
    clean, corr = torch.randint(0, 20, (4, 6), generator=g), torch.randint(0, 20, (4, 6), generator=g)
    return clean, corr, torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6, 7, 8])


@pytest.mark.filterwarnings("ignore:acdc\\(mode='denoise'\\)")
@pytest.mark.parametrize("mode", ["noise", "denoise"])
def test_an_example_whose_metric_is_not_finite_is_left_out_of_faithfulness_curves_and_acdc(mode):
    """A metric NaN on example 0: a warning names it and says the means leave it out, and faithfulness, a pruning
    curve and ACDC equal those of the run on the other examples alone (not NaN, not every edge kept)."""
    from pypattern.circuits import acdc, faithfulness, pruning_curve

    model = _model()
    clean, corr, ans, wrong = _four_prompts()
    nan_metric = _nan_on_0(LogitDiff(ans, wrong))
    rest = dict(metric=LogitDiff(ans[1:], wrong[1:]), mode=mode)
    E = len(edges(model))
    half = torch.arange(E) % 2 == 0
    with pytest.warns(RuntimeWarning, match=r"nan for example 0 on the clean run: that example is left out"):
        f = faithfulness(model, [half, ~half], clean, corr, metric=nan_metric, mode=mode)
    f_rest = faithfulness(model, [half, ~half], clean[1:], corr[1:], **rest)
    assert torch.isfinite(f).all()
    torch.testing.assert_close(f, f_rest, rtol=1e-9, atol=1e-12)
    scores = torch.linspace(-1, 1, E, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="left out of every mean"):
        c = pruning_curve(model, scores, clean, corr, metric=nan_metric, mode=mode, counts=[0, 10, E])
    c_rest = pruning_curve(model, scores, clean[1:], corr[1:], counts=[0, 10, E], **rest)
    torch.testing.assert_close(c.faithfulness["scores"], c_rest.faithfulness["scores"], rtol=1e-9, atol=1e-12)
    assert c.m_full == pytest.approx(c_rest.m_full, rel=1e-12)
    thr = 0.05 * abs(c_rest.m_full - c_rest.m_empty)
    with pytest.warns(RuntimeWarning, match="left out of every mean"):
        a = acdc(model, clean, corr, metric=nan_metric, threshold=thr, mode=mode, quiet=True)
    a_rest = acdc(model, clean[1:], corr[1:], threshold=thr, quiet=True, **rest)
    assert torch.equal(a.mask, a_rest.mask) and 0 < len(a) < E
    torch.testing.assert_close(a.scores, a_rest.scores, rtol=1e-9, atol=1e-12)
    assert a.faithfulness == pytest.approx(a_rest.faithfulness, rel=1e-9)


@pytest.mark.parametrize(
    "method, mode", [("eap", "noise"), ("eap", "denoise"), ("eap-ig", "noise"), ("exact", "noise")]
)
def test_edge_scores_leave_out_an_example_whose_metric_is_not_finite(method, mode):
    """Its values are NaN (a gradient through a NaN metric is no score: zero, through torch.where), and the scores
    are the mean over the other examples: those of the run on them alone."""
    from pypattern.circuits import edge_attribution

    model = _model()
    clean, corr, ans, wrong = _four_prompts()
    kw = dict(method=method, mode=mode, steps=3, quiet=True)
    with pytest.warns(RuntimeWarning, match=r"for example 0 on the clean run: that example is left out"):
        s = edge_attribution(model, clean, corr, metric=_nan_on_0(LogitDiff(ans, wrong)), **kw)
    ref = edge_attribution(model, clean[1:], corr[1:], metric=LogitDiff(ans[1:], wrong[1:]), **kw)
    assert torch.isnan(s.values[0]).all() and s.scored_examples.tolist() == [False, True, True, True]
    torch.testing.assert_close(s.values[1:], ref.values, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(s.scores, ref.scores, rtol=1e-9, atol=1e-12)
    assert torch.isfinite(s.scores).all()

    def se(scores):  # the standard errors in the graph's order
        df = scores.to_pandas().set_index(["src", "dst", "qkv"])
        return torch.tensor(
            df.loc[scores.graph.to_pandas().set_index(["src", "dst", "qkv"]).index, "se"].to_numpy()
        )

    assert torch.isfinite(se(s)).all()
    torch.testing.assert_close(se(s), se(ref), rtol=1e-9, atol=1e-12)


def test_a_metric_not_finite_on_every_base_run_is_refused_and_on_some_named():
    """Denoising: the base run is the corrupted run; an example whose metric is infinite there is named and left
    out; every example is refused (nothing left to measure)."""
    from pypattern.circuits import edge_attribution, faithfulness

    model = _model()
    clean, corr, ans, wrong = _four_prompts()
    ld = LogitDiff(ans, wrong)
    corr_logits = model(corr)[:, -1]

    def inf_on_corrupted(rows):
        def f(lg):
            hit = torch.isclose(lg, corr_logits, rtol=0, atol=1e-12).all(-1) & torch.isin(
                torch.arange(4), torch.tensor(rows)
            )
            return torch.where(hit, float("inf"), ld(lg))

        return f

    full = torch.ones(len(edges(model)), dtype=torch.bool)
    with pytest.warns(
        RuntimeWarning, match=r"inf for examples 1, 2 on the corrupted run: those examples are left"
    ):
        f = faithfulness(model, full, clean, corr, metric=inf_on_corrupted([1, 2]), mode="denoise")
    assert f == pytest.approx(1.0)
    with pytest.warns(RuntimeWarning, match=r"for examples 1, 2 on the corrupted run"):
        s = edge_attribution(model, clean, corr, metric=inf_on_corrupted([1, 2]), mode="denoise", quiet=True)
    assert s.scored_examples.tolist() == [True, False, False, True]
    for call in (
        lambda m: faithfulness(model, full, clean, corr, metric=m, mode="denoise"),
        lambda m: edge_attribution(model, clean, corr, metric=m, mode="denoise", quiet=True),
    ):
        with pytest.raises(ValueError, match="not finite on the clean or the base run for every example"):
            call(inf_on_corrupted([0, 1, 2, 3]))


def test_eap_ig_leaves_out_an_example_whose_metric_is_not_finite_on_an_interpolated_run():
    """Finite on the clean and the base run but NaN on the interpolated runs of example 1: named in a warning, its
    values NaN, the scores those of the other examples alone."""
    from pypattern.circuits import edge_attribution

    model = _model()
    clean, corr, ans, wrong = _four_prompts()
    ld = LogitDiff(ans, wrong)
    ends = torch.stack([model(clean)[:, -1], model(corr)[:, -1]])

    def nan_between(lg):  # NaN for example 1 unless its logits are those of the clean or the corrupted run
        at_end = torch.isclose(lg[..., 1, :], ends[:, 1].view(2, *[1] * (lg.dim() - 2), -1), atol=1e-9)
        inside = ~at_end.all(-1).any(0)
        return torch.where((torch.arange(4) == 1) & inside[..., None], float("nan"), ld(lg))

    with pytest.warns(
        RuntimeWarning, match=r"not finite on an interpolated run of example 1: .* leave it out"
    ):
        s = edge_attribution(model, clean, corr, metric=nan_between, method="eap-ig", steps=3, quiet=True)
    assert torch.isnan(s.values[1]).all() and torch.isfinite(s.m_base).all()
    keep = torch.tensor([0, 2, 3])
    ref = edge_attribution(
        model,
        clean[keep],
        corr[keep],
        metric=LogitDiff(ans[keep], wrong[keep]),
        method="eap-ig",
        steps=3,
        quiet=True,
    )
    torch.testing.assert_close(s.scores, ref.scores, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- exact scores, ACDC, edges


def test_exact_scores_interrupted_before_a_timed_write_keep_the_finished_blocks(tmp_path, monkeypatch):
    """Ctrl-C part-way, before any write is due: the blocks finished are written, and a call of the same run
    computes only the rest and gives the uninterrupted scores exactly."""
    from pypattern import io
    from pypattern.circuits import edge_attribution
    from pypattern.circuits.engine import EdgeEngine

    model = _model()
    clean, corr, metric = _prompts()
    kw = dict(metric=metric, method="exact", max_batch=5, quiet=True)
    ref = edge_attribution(model, clean, corr, **kw)
    E = len(ref.graph)
    path = str(tmp_path / "exact.npz")
    real_run, masks_run = EdgeEngine.run, []

    def stopping_run(self, masks):
        if len(masks_run) == 4:
            raise KeyboardInterrupt
        masks_run.append(len(masks))
        return real_run(self, masks)

    monkeypatch.setattr(EdgeEngine, "run", stopping_run)
    with pytest.raises(KeyboardInterrupt):
        edge_attribution(model, clean, corr, checkpoint=path, **kw)
    arrays, meta = io.load(path, kind="ExactEdgeScoresCheckpoint")
    assert meta["done"] == 20 == sum(masks_run)  # four blocks of five edges
    assert torch.equal(torch.from_numpy(arrays["values"]), ref.values[:, :20])
    calls = []
    monkeypatch.setattr(
        EdgeEngine, "run", lambda self, masks: calls.append(len(masks)) or real_run(self, masks)
    )
    resumed = edge_attribution(model, clean, corr, checkpoint=path, **kw)
    assert torch.equal(resumed.values, ref.values)
    assert sum(calls) == E - 20


def test_acdc_denoise_warns_when_most_tested_drops_are_exactly_zero():
    """Denoising from the full circuit (the clean run): leaving out an edge whose source's inputs are all restored
    changes nothing, so almost every test reads a drop of exactly 0 and the threshold alone decides; a warning says
    so and points to mode='noise' (which, on the same prompts, measures its drops and does not warn)."""
    import warnings

    from pypattern.circuits import acdc

    model = _model()
    clean, corr, metric = _prompts()
    with pytest.warns(
        RuntimeWarning, match=r"acdc\(mode='denoise'\): (\d+) of the (\d+) edges tested .*mode='noise'"
    ) as rec:
        c = acdc(model, clean, corr, metric=metric, threshold=0.0, mode="denoise", quiet=True)
    tested = len(c.mask) - c.info["num_untested"]
    zeros = int((c.scores == 0).sum()) - c.info["num_untested"]
    assert zeros > tested / 2
    msg = next(str(w.message) for w in rec if "acdc(mode='denoise')" in str(w.message))
    assert f"{zeros} of the {tested} edges tested" in msg
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        n = acdc(model, clean, corr, metric=metric, threshold=0.0, mode="noise", quiet=True)
    assert int((n.scores == 0).sum()) <= len(n.mask) / 2


@pytest.mark.parametrize("threshold", [-1e-6, -1e9])
def test_acdc_refuses_a_negative_threshold_by_name(threshold):
    from pypattern.circuits import acdc

    model = _model()
    clean, corr, metric = _prompts()
    with pytest.raises(ValueError, match=rf"^threshold={threshold!r} is not valid: .*a number >= 0"):
        acdc(model, clean, corr, metric=metric, threshold=threshold)


def test_edges_of_a_model_on_the_meta_device_read_its_configuration_only():
    with torch.device("meta"):
        meta = _model()
    assert next(meta.parameters()).is_meta
    real = _model()
    for kw in ({}, dict(per_position=True, seq_len=5)):
        g, h = edges(meta, **kw), edges(real, **kw)
        assert len(g) == len(h) > 0 and [e.name for e in g] == [e.name for e in h]


# ----------------------------------------------------------------------------- examples not finite: order, record


def _inf_on_corrupted(model, corr, ld, rows):
    """``ld`` with the value infinite on the corrupted run of the examples ``rows``."""
    corr_logits = model(corr)[:, -1].detach()

    def f(lg):
        hit = torch.isclose(lg, corr_logits, rtol=0, atol=1e-12).all(-1) & torch.isin(
            torch.arange(lg.shape[-2]), torch.tensor(rows)
        )
        return torch.where(hit, float("inf"), ld(lg))

    return f


def test_exact_edge_scores_check_the_examples_before_scoring_any_edge(monkeypatch):
    """method='exact': an example not finite on the base run is named, and a metric not finite on it for every
    example refused, before any edge is scored."""
    import warnings

    import pypattern.circuits.api as api
    from pypattern.circuits import edge_attribution

    def no_scoring(*a, **kw):
        raise RuntimeError("edges scored")

    monkeypatch.setattr(api, "_exact_scores", no_scoring)
    model = _model()
    clean, corr, ans, wrong = _four_prompts()
    ld = LogitDiff(ans, wrong)
    kw = dict(method="exact", mode="denoise", quiet=True)
    with pytest.raises(ValueError, match="not finite on the clean or the base run for every example"):
        edge_attribution(model, clean, corr, metric=_inf_on_corrupted(model, corr, ld, [0, 1, 2, 3]), **kw)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match="edges scored"):
            edge_attribution(model, clean, corr, metric=_inf_on_corrupted(model, corr, ld, [2]), **kw)
    assert any("inf for example 2 on the corrupted run" in str(w.message) for w in rec)


def test_an_example_scored_whose_patched_runs_are_nan_stays_among_the_scored(tmp_path):
    """Finite on the clean and the base run, NaN on every run with an edge patched: example 0 is scored (as
    edge_attribution recorded it), so its NaN reaches the scores (ranking refuses them, naming the edges) rather
    than being dropped as if it were not scored; saved and loaded, the record is kept. Scores without the record
    (made by hand, older files) infer the examples scored from their values."""
    from pypattern.circuits import EdgeScores, edge_attribution

    model = _model()
    clean, corr, ans, wrong = _four_prompts()
    ld = LogitDiff(ans, wrong)
    clean_logits = model(clean)[:, -1].detach()

    def nan_when_patched(lg):  # NaN for example 0 unless its logits are the clean (base) run's
        same = torch.isclose(lg[..., 0, :], clean_logits[0], rtol=0, atol=1e-12).all(-1)
        return torch.where((torch.arange(4) == 0) & ~same[..., None], float("nan"), ld(lg))

    s = edge_attribution(
        model, clean, corr, metric=nan_when_patched, method="exact", mode="noise", quiet=True
    )
    assert torch.isfinite(s.m_base).all() and torch.isfinite(s.m_clean).all()
    assert torch.isnan(s.values[0]).all() and torch.isfinite(s.values[1:]).all()
    assert s.scored_examples.tolist() == [True, True, True, True]
    assert torch.isnan(s.scores).all()
    with pytest.raises(ValueError, match="scores holds NaN"):
        s.ranking()
    s.save(tmp_path / "s.npz")
    back = EdgeScores.load(tmp_path / "s.npz")
    assert back.scored_examples.tolist() == [True, True, True, True]
    torch.testing.assert_close(back.values, s.values, equal_nan=True)
    # no record (a file written without it): inferred from the values
    bare = EdgeScores(s.graph, s.values, s.method, s.mode, s.ablation, s.metric, s.m_base, s.m_clean)
    assert bare.scored_examples.tolist() == [False, True, True, True]
    bare.save(tmp_path / "bare.npz")
    assert EdgeScores.load(tmp_path / "bare.npz").scored_examples.tolist() == [False, True, True, True]


def test_circuit_warnings_of_non_finite_examples_point_at_the_callers_line():
    """The warnings naming an example not finite on the clean or the corrupted run are attributed to the line
    that called pypattern."""
    from pypattern.circuits import edge_attribution, faithfulness

    model = _model()
    clean, corr, ans, wrong = _four_prompts()
    ld = LogitDiff(ans, wrong)
    full = torch.ones(len(edges(model)), dtype=torch.bool)
    on_corr = _inf_on_corrupted(model, corr, ld, [1])
    for call, run in (
        (lambda: edge_attribution(model, clean, corr, metric=_nan_on_0(ld), quiet=True), "clean"),
        (
            lambda: edge_attribution(model, clean, corr, metric=_nan_on_0(ld), method="exact", quiet=True),
            "clean",
        ),
        (
            lambda: edge_attribution(model, clean, corr, metric=on_corr, mode="denoise", quiet=True),
            "corrupted",
        ),
        (lambda: faithfulness(model, full, clean, corr, metric=on_corr, mode="denoise"), "corrupted"),
    ):
        with pytest.warns(RuntimeWarning, match=f"on the {run} run") as rec:
            call()
        named = [w for w in rec if f"on the {run} run" in str(w.message)]
        assert named and all(w.filename == __file__ for w in named), [w.filename for w in named]
