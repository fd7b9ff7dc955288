"""pypattern.circuits: saving refuses what loading refuses; pypattern.patching's corruption objects in the circuits
functions; mean ablation over reference prompts of another batch size (against naive per-edge hooks, float64);
pruning curves evaluated in the frame their scores were computed in."""

from __future__ import annotations

import dataclasses
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_circuits_audit_configs_more import (  # noqa: E402
    TOL,
    make_model,
    naive_first_order,
    naive_metric,
    naive_run,
    node_outputs,
    prompts,
    random_sets,
    read,
)

from pypattern.circuits import (  # noqa: E402
    Circuit,
    EdgeScores,
    acdc,
    edge_attribution,
    edges,
    faithfulness,
    patch_edges,
    pruning_curve,
)
from pypattern.patching import (  # noqa: E402
    GaussianNoise,
    LogitDiff,
    MeanAblation,
    TokenReplacement,
    ZeroAblation,
)

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::RuntimeWarning")]


@pytest.fixture(scope="module")
def setup():
    model = make_model()
    clean, corr = prompts(3, 4)
    met = LogitDiff(torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]))
    return model, clean, corr, met


# ------------------------------------------------------------------------------------- save refuses what load does


def _bad_scores(sc: EdgeScores) -> dict:
    return {
        "integer values": (dataclasses.replace(sc, values=sc.values.long()), "values holds torch.int64"),
        "m_base of another length": (dataclasses.replace(sc, m_base=sc.m_base[:2]), "m_base"),
        "values of other columns": (dataclasses.replace(sc, values=sc.values[:, :3]), "values has shape"),
        "method not a string": (dataclasses.replace(sc, method=3), "method is int 3"),
        "scored flag on a NaN-free left-out example": (
            dataclasses.replace(sc, info={**sc.info, "scored_examples": torch.tensor([True, False, True])}),
            "scored_examples leaves out example 1",
        ),
        "complex m_clean": (
            dataclasses.replace(sc, m_clean=sc.m_clean.to(torch.complex128)),
            "m_clean holds",
        ),
    }


def test_edge_scores_save_refuses_what_load_refuses_and_writes_nothing(setup, tmp_path):
    model, clean, corr, met = setup
    sc = edge_attribution(model, clean, corr, metric=met)
    good = tmp_path / "good.npz"
    sc.save(good)
    back = EdgeScores.load(good)
    assert torch.equal(back.values, sc.values) and torch.equal(back.m_base, sc.m_base)
    before = good.read_bytes()
    for name, (bad, says) in _bad_scores(sc).items():
        p = tmp_path / "bad.npz"
        with pytest.raises(ValueError, match="cannot save this EdgeScores") as e:
            bad.save(p)
        assert says in str(e.value), name
        assert not p.exists(), name
        with pytest.raises(ValueError):  # an existing file is left as it was
            bad.save(good)
        assert good.read_bytes() == before, name


def test_circuit_save_refuses_what_load_refuses(setup, tmp_path):
    model, clean, corr, met = setup
    sc = edge_attribution(model, clean, corr, metric=met)
    c = sc.circuit(n=4)
    c.save(tmp_path / "ok.npz")
    assert torch.equal(Circuit.load(tmp_path / "ok.npz").mask, c.mask)
    for bad, says in [
        (dataclasses.replace(c, method=7), "method is int 7"),
        (dataclasses.replace(c, faithfulness=float("inf")), "faithfulness"),
    ]:
        p = tmp_path / "bad.npz"
        with pytest.raises(ValueError, match=says):
            bad.save(p)
        assert not p.exists()


# ---------------------------------------------------------------------------- patching's corruption objects


def test_corruption_objects_map_exactly_to_the_circuits_settings(setup):
    model, clean, corr, met = setup
    g = edges(model)
    sets = random_sets(g, 2, 0.4)
    ref = prompts(5, 4, seed=9)[0]
    mask = torch.ones(5, 4, dtype=torch.long)
    mask[1, 2:] = 0
    mask[3, 3:] = 0
    cases = [
        (dict(corrupted=TokenReplacement(corr)), dict(corrupted=corr)),
        (dict(ablation=ZeroAblation()), dict(ablation="zero")),
        (dict(ablation=MeanAblation()), dict(ablation="mean")),
        (dict(ablation=MeanAblation(reference_tokens=corr)), dict(corrupted=corr, ablation="mean")),
        (
            dict(ablation=MeanAblation(reference_tokens=ref, attention_mask=mask)),
            dict(corrupted=ref, ablation="mean", mean_mask=mask),
        ),
        (
            dict(corrupted=TokenReplacement(corr), mode="denoise", ablation=MeanAblation()),
            dict(corrupted=corr, mode="denoise", ablation="mean"),
        ),
        (
            dict(corrupted=TokenReplacement(corr), mode="denoise", ablation=ZeroAblation()),
            dict(corrupted=corr, mode="denoise", ablation="zero"),
        ),
    ]
    for given, means in cases:
        got = patch_edges(model, sets, clean, metric=met, **given)
        want = patch_edges(model, sets, clean, metric=met, **means)
        assert torch.equal(got, want), given
        sc = edge_attribution(model, clean, metric=met, **given)
        sw = edge_attribution(model, clean, metric=met, **means)
        assert torch.equal(sc.values, sw.values), given
        assert sc.ablation == sw.ablation and isinstance(sc.ablation, str)
        f = faithfulness(model, sets, clean, metric=met, **given)
        assert torch.equal(f, faithfulness(model, sets, clean, metric=met, **means))
        curve = pruning_curve(model, sc, clean, metric=met, counts=[0, 5, 20], **given)
        assert torch.equal(
            curve.faithfulness["eap"],
            pruning_curve(model, sw, clean, metric=met, counts=[0, 5, 20], **means).faithfulness["eap"],
        )
        assert isinstance(curve.ablation, str)
    # the mapping is exact against naive hooks: a mean over reference prompts of another batch size
    got = patch_edges(model, sets, clean, metric=met, ablation=MeanAblation(reference_tokens=ref))
    want = torch.stack([naive_metric(model, s, clean, ref, met, "noise", "mean") for s in sets])
    assert (got - want).abs().max() <= TOL
    c = acdc(model, clean, metric=met, ablation=ZeroAblation(), threshold=0.05)
    assert c.info["ablation"] == "zero"
    assert torch.equal(c.mask, acdc(model, clean, metric=met, ablation="zero", threshold=0.05).mask)


def test_corruption_objects_without_an_exact_counterpart_are_refused_by_name(setup):
    model, clean, corr, met = setup
    g = edges(model)
    one = [g.edges[0].name]
    refused = [
        (dict(corrupted=GaussianNoise()), "GaussianNoise"),
        (dict(ablation=GaussianNoise()), "GaussianNoise"),
        (dict(corrupted=corr, ablation=MeanAblation()), "MeanAblation\\(reference_tokens=corrupted\\)"),
        (dict(corrupted=corr, ablation=MeanAblation(reference_tokens=corr)), "reference prompts once"),
        (
            dict(corrupted=corr, mode="denoise", ablation=MeanAblation(reference_tokens=corr)),
            "mode='denoise'",
        ),
        (dict(corrupted=ZeroAblation()), "give it as ablation=ZeroAblation"),
        (dict(corrupted=corr, ablation=TokenReplacement(corr)), "corrupted="),
        (
            dict(ablation=MeanAblation(attention_mask=torch.ones(3, 4)), mean_mask=torch.ones(3, 4)),
            "mask of the mean once",
        ),
    ]
    for kw, says in refused:
        for fn in (
            lambda kw=kw: patch_edges(model, one, clean, metric=met, **kw),
            lambda kw=kw: edge_attribution(model, clean, metric=met, **kw),
            lambda kw=kw: pruning_curve(model, torch.ones(len(g)), clean, metric=met, counts=[1], **kw),
        ):
            with pytest.raises((TypeError, ValueError), match=says):
                fn()


# ------------------------------------------------------------------ mean ablation over another reference batch


def _masked_reference(model, ref, mask, B):
    """Node outputs' per-position mean over the reference prompts real there (0 where none is), expanded."""
    outs = node_outputs(model, ref)
    w = mask.to(torch.float64)[:, :, None]
    n = w.sum(0).clamp(min=1)
    return {k: ((v * w).sum(0) / n).expand(B, *v.shape[1:]) for k, v in outs.items()}


@pytest.mark.parametrize("B_ref", [1, 5])
def test_mean_ablation_over_a_reference_batch_of_another_size_equals_naive_hooks(B_ref):
    model = make_model(n_key_value_heads=2, positional_embedding_type="rotary")
    B, T = 3, 4
    clean, _ = prompts(B, T)
    ref = prompts(B_ref, T, seed=5)[0]
    met = LogitDiff(torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]), position=torch.tensor([3, 2, 3]))
    for pp in (False, True):
        g = edges(model, per_position=True, seq_len=T) if pp else edges(model)
        sets = random_sets(g, 2, 0.4) + [[e.name for e in g.edges]]
        got = patch_edges(model, sets, clean, ref, metric=met, ablation="mean", graph=g)
        want = torch.stack([naive_metric(model, s, clean, ref, met, "noise", "mean") for s in sets])
        assert (want[-1] - naive_metric(model, [], clean, ref, met, "noise", "mean")).abs().max() > 1e-3
        assert (got - want).abs().max() <= TOL, pp
        for method in ("eap", "exact"):
            sc = edge_attribution(
                model, clean, ref, metric=met, ablation="mean", method=method, per_position=pp
            )
            if method == "eap":
                want = naive_first_order(model, sc.graph, clean, ref, met, "noise", "mean")
            else:
                m0 = naive_metric(model, [], clean, ref, met, "noise", "mean")
                idx = list(range(0, len(g), 7))
                want = torch.full_like(sc.values, float("nan"))
                for i in idx:
                    want[:, i] = naive_metric(model, [g[i].name], clean, ref, met, "noise", "mean") - m0
                sc = dataclasses.replace(sc, values=sc.values[:, idx])
                want = want[:, idx]
            assert (sc.values - want).abs().max() <= TOL, (pp, method)
    # EAP-IG: its interpolation starts at the reference prompts' mean embedding
    sc = edge_attribution(model, clean, ref, metric=met, ablation="mean", method="eap-ig", steps=3)
    want = naive_first_order(model, sc.graph, clean, ref, met, "noise", "mean", steps=3)
    assert (sc.values - want).abs().max() <= TOL
    # with the reference prompts' attention mask: the mean at each position over the prompts real there
    if B_ref > 1:
        mask = torch.ones(B_ref, T, dtype=torch.long)
        mask[0, 2:] = 0
        mask[-1, 1:] = 0
        g = edges(model)
        sets = random_sets(g, 2, 0.5, seed=4)
        got = patch_edges(model, sets, clean, ref, metric=met, ablation="mean", mean_mask=mask)
        abl = _masked_reference(model, ref, mask, B)
        want = torch.stack([read(naive_run(model, clean, s, abl)[0], met) for s in sets])
        assert (got - want).abs().max() <= TOL
        with pytest.raises(ValueError, match="mean_mask has shape"):
            patch_edges(model, sets, clean, ref, metric=met, ablation="mean", mean_mask=torch.ones(B, T))
        f = faithfulness(model, sets, clean, ref, metric=met, ablation="mean", mean_mask=mask)
        full = read(naive_run(model, clean, [], abl)[0], met).mean()
        empty = read(naive_run(model, clean, [e.name for e in g.edges], abl)[0], met).mean()
        kept = [
            read(naive_run(model, clean, [e.name for e in g.edges if e.name not in s], abl)[0], met).mean()
            for s in sets
        ]  # a circuit: every edge outside it ablated
        assert (f - (torch.stack(kept) - empty) / (full - empty)).abs().max() <= 1e-8


def test_a_reference_batch_of_another_size_is_refused_where_it_is_read_per_example(setup):
    model, clean, corr, met = setup
    ref = prompts(5, 4, seed=5)[0]
    one = [edges(model).edges[0].name]
    for kw in (dict(ablation="resample"), dict(mode="denoise", ablation="mean")):
        with pytest.raises(ValueError, match="it must equal the clean shape"):
            patch_edges(model, one, clean, ref, metric=met, **kw)
    with pytest.raises(ValueError, match="it must equal the clean shape"):  # another length
        patch_edges(model, one, clean, ref[:, :3], metric=met, ablation="mean")


# --------------------------------------------------------------------------- pruning curves follow the scores


def test_pruning_curve_evaluates_in_the_frame_of_its_scores(setup):
    model, clean, corr, met = setup
    counts = [0, 3, 10, 40]
    for mode, abl in (("denoise", "mean"), ("noise", "zero"), ("denoise", "resample")):
        sc = edge_attribution(model, clean, corr, metric=met, mode=mode, ablation=abl)
        curve = pruning_curve(model, sc, clean, corr, metric=met, counts=counts)
        assert (curve.mode, curve.ablation) == (mode, abl)
        # the circuits evaluated as the scores were computed: the definition on naive hooks
        g = sc.graph
        order = sc.ranking()
        full = naive_metric(model, [], clean, corr, met, mode, abl).mean()
        allnames = [e.name for e in g.edges]
        empty = naive_metric(model, allnames, clean, corr, met, mode, abl).mean()
        if mode == "denoise":  # the circuit's edges restored: full = all patched, empty = none
            full, empty = empty, full
        for i, n in enumerate(counts):
            kept = {g[j].name for j in order[:n].tolist()}
            patched = [e for e in allnames if (e in kept) == (mode == "denoise")]
            v = naive_metric(model, patched, clean, corr, met, mode, abl).mean()
            assert abs(float(curve.metric_values["eap"][i]) - float(v)) <= TOL
            assert abs(float(curve.faithfulness["eap"][i]) - float((v - empty) / (full - empty))) <= 1e-8
        # given explicitly, the settings are used as given
        other = pruning_curve(
            model, sc, clean, corr, metric=met, counts=counts, mode="noise", ablation="resample"
        )
        assert (other.mode, other.ablation) == ("noise", "resample")
    # tensors of scores: the defaults
    curve = pruning_curve(model, sc.scores, clean, corr, metric=met, counts=counts)
    assert (curve.mode, curve.ablation) == ("noise", "resample")
    # scores of different frames: the setting that differs must be given
    a = edge_attribution(model, clean, corr, metric=met, mode="denoise")
    b = edge_attribution(model, clean, corr, metric=met, method="exact", quiet=True)
    with pytest.raises(ValueError, match="mode is not given.*give mode="):
        pruning_curve(model, {"a": a, "b": b}, clean, corr, metric=met, counts=counts)
    curve = pruning_curve(model, {"a": a, "b": b}, clean, corr, metric=met, counts=counts, mode="noise")
    assert (curve.mode, curve.ablation) == ("noise", "resample")
