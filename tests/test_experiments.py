"""The patterning experiments end to end at tiny sizes: chi estimated, weights valid, re-weighted training runs,
onsets and learned algorithms measured. The headline effect sizes are measured by the demo, not asserted in these tests."""

import json
import math

import numpy as np
import pytest
import torch

from pypattern.experiments import patterning_demo as demo_cli
from pypattern.experiments.induction import (
    GroupWeightedInduction,
    InductionSettings,
    onset_step,
    run_induction_experiment,
    summarize_onsets,
    token_groups,
)
from pypattern.experiments.parens import (
    PARENS_GROUP_NAMES,
    GroupWeightedParentheses,
    ParensSettings,
    run_parens_experiment,
    sample_groups,
    select_weights,
    solution_losses,
)
from pypattern.models.transformer import Transformer
from pypattern.tasks import ALGORITHMS
from pypattern.tasks.base import IGNORE
from pypattern.tasks.parens import CLOSE, FALSE, OPEN, PROBE_CELLS, TRUE, ParenthesesTask, algorithm_scores

TINY_IND = dict(
    d_vocab=12, seq_len=13, d_model=16, n_heads=2, batch_size=16, checkpoint_step=20, max_steps=60, eval_every=10,
    num_eval=32, probe_size=3, chi_num_chains=2, chi_num_draws=6, chi_num_burnin_steps=2, threshold=2.0,
)  # fmt: skip
TINY_PAR = dict(
    length=6, d_model=16, d_mlp=16, batch_size=32, checkpoint_step=10, steps=40, probe_train_size=48,
    chi_num_chains=2, chi_num_draws=6, chi_num_burnin_steps=2,
)  # fmt: skip


def test_token_groups_match_the_segments():
    task = GroupWeightedInduction(16, 19)
    b = task.sample(64, seed=3)
    g = b.extra["token_group"]
    np.testing.assert_array_equal(g.numpy(), token_groups(b).numpy())
    k = task.repeat_len
    np.testing.assert_array_equal((g == 0).numpy(), b.extra["induction_flag"].numpy())
    for i in range(64):
        s = int(b.extra["source_start"][i])
        ones = torch.nonzero(g[i] == 1).flatten().tolist()
        assert ones == list(range(s, s + k - 1))
        # a first-copy position and its next token reappear, shifted, in the second copy
        d = int(b.extra["dest_start"][i])
        np.testing.assert_array_equal(b.tokens[i, s : s + k].numpy(), b.tokens[i, d : d + k].numpy())


def test_group_weighted_induction_loss():
    task = GroupWeightedInduction(16, 19, group_weights=[2.0, 0.5, 1.0])
    f = task.group_fractions.numpy()
    assert abs(f.sum() - 1) < 1e-12 and (f > 0).all()
    assert abs(float(task.group_weights.double() @ task.group_fractions) - 1) < 1e-6  # token-mean 1
    model = Transformer(task.model_config(d_model=16, n_heads=2, seed=0))
    b = task.sample(8, seed=1)
    logits = model(b.tokens)
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), b.targets.clamp_min(0), reduction="none")
    mask = b.targets != IGNORE
    w = task.group_weights[b.extra["token_group"]]
    expect = (ce * w * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(task.per_sample_loss(logits, b), expect)
    uniform = GroupWeightedInduction(16, 19)
    torch.testing.assert_close(uniform.per_sample_loss(logits, b), (ce * mask).sum(1) / mask.sum(1))
    with pytest.raises(ValueError, match="group_weights"):
        GroupWeightedInduction(16, 19, group_weights=[1.0, -1.0, 1.0])


def test_onset_step():
    steps = [0, 10, 20, 30]
    assert onset_step(steps, [3.0, 2.0, 1.0, 0.5], 1.5) == pytest.approx(15.0)
    assert onset_step(steps, [1.0, 1.0, 1.0, 1.0], 1.5) == 0.0
    assert math.isinf(onset_step(steps, [3.0, 2.0, 2.0, 2.0], 1.5))


def test_induction_experiment_end_to_end():
    s = InductionSettings(**TINY_IND)
    res = run_induction_experiment(seeds=(0,), s=s)
    r = res["per_seed"][0]
    chi = r["chi"]
    assert chi.chi.shape == (5, s.probe_size * (s.seq_len - 1))
    assert np.isfinite(chi.chi).all() and np.abs(chi.chi).max() > 0
    assert chi.components[-1] == "embed"
    assert r["column_groups"].shape == (chi.chi.shape[1],) and set(np.unique(r["column_groups"])) <= {0, 1, 2}
    pw = r["patterning"]
    for name in ("accelerate", "delay"):
        iv = pw[name]["intervention"]
        assert iv.weights.min() >= s.min_weight - 1e-9 and iv.weights.max() <= s.max_weight + 1e-9
        # the data-weighted mean is 1 by construction, so the weights are used as the inversion returned them
        assert abs(iv.weights @ np.asarray(r["group_fractions"]) - 1) < 1e-9
        np.testing.assert_allclose(r["runs"][name]["group_weights"], iv.weights, rtol=1e-6)
        # the predicted response moves along the requested pole of the direction
        assert iv.predicted @ iv.target > 0
        gw = np.asarray(r["runs"][name]["group_weights"])
        assert abs(gw @ np.asarray(r["group_fractions"]) - 1) < 1e-5  # token-mean 1 under the data
    assert pw["accelerate"]["weights"][0] >= pw["delay"]["weights"][0]
    assert r["runs"]["baseline"]["group_weights"] is None
    for run in r["runs"].values():
        c = run["curve"]
        assert c.shape[1] == 4 and c[-1, 0] > s.checkpoint_step and np.isfinite(c[:, 1:]).all()
        assert ((c[:, 3] >= 0) & (c[:, 3] <= 1)).all()  # prefix-matching score: an attention probability
        assert math.isinf(run["onset"]) == (run["censored_at"] is not None)
    # the patterned runs start from the same checkpoint: identical curves up to it
    pre = r["runs"]["baseline"]["curve"][r["runs"]["baseline"]["curve"][:, 0] <= s.checkpoint_step]
    np.testing.assert_array_equal(pre, r["runs"]["delay"]["curve"][: len(pre)])
    assert set(res["summary"]["relative_shift"]) == {"accelerate", "delay"}


def test_onset_summary_with_censored_runs():
    """Shifts against the baseline: censored patterned runs give lower bounds; a seed whose baseline never formed
    the circuit has no shift (NaN / None), and the all-seeds goal flags then do not claim it."""
    s = InductionSettings(checkpoint_step=200)

    def seed(i, base, acc, delay, delay_cap=None, base_cap=None):
        run = lambda o, cap: {"onset": o, "censored_at": cap}  # noqa: E731
        return {
            "seed": i,
            "patterning": {"pc": 0},
            "runs": {
                "baseline": run(base, base_cap),
                "accelerate": run(acc, None),
                "delay": run(delay, delay_cap),
            },
        }

    per_seed = [
        seed(0, 1000.0, 700.0, math.inf, delay_cap=1600),  # -30%, delay >= +60%
        seed(1, math.inf, 731.0, math.inf, delay_cap=5000, base_cap=5000),  # baseline never formed
        seed(2, 1000.0, 900.0, 1100.0),  # -10%, +10%
    ]
    sm = summarize_onsets(per_seed, s)
    np.testing.assert_allclose(sm["relative_shift"]["accelerate"], [-0.3, np.nan, -0.1])
    np.testing.assert_allclose(sm["relative_shift_lower_bound"]["delay"], [0.6, np.nan, 0.1])
    np.testing.assert_allclose(sm["relative_shift_after_checkpoint"]["accelerate"], [-0.375, np.nan, -0.125])
    assert sm["accelerate_ge_20pct"] == [True, None, False]
    assert sm["delay_ge_20pct"] == [True, None, False]
    assert sm["baseline_censored_at"] == [None, 5000, None]
    assert not sm["accelerate_all_ge_20pct"] and not sm["delay_all_ge_20pct"]
    sm = summarize_onsets(per_seed[:2], s)
    assert not sm["accelerate_all_ge_20pct"]  # seed 1 is not measurable, so "all seeds" is not claimed
    assert summarize_onsets(per_seed[:1], s)["delay_all_ge_20pct"]


def test_parens_groups_and_solution_losses():
    task = GroupWeightedParentheses(6)
    b = task.sample(200, seed=0)
    g = sample_groups(b)
    for i in range(200):
        s = b.tokens[i, 1:-1].tolist()
        depth = np.cumsum([1 if t == OPEN else -1 for t in s])
        bal = s.count(OPEN) == s.count(CLOSE) and depth.min() >= 0
        assert bool(b.extra["label"][i]) == bal
        want = 0 if bal else 1 + 2 * (s[0] == CLOSE) + (s[-1] == OPEN)
        assert int(g[i]) == want
    assert set(g.tolist()) == set(range(len(PARENS_GROUP_NAMES)))
    model = Transformer(task.model_config(d_model=16, d_mlp=16, seed=0))
    probes = task.probes("all")
    lp = torch.log_softmax(model(probes.tokens)[:, -1], -1)
    cell = probes.extra["cell"]
    for name, fn in solution_losses(task).items():
        lab = ALGORITHMS[name](probes.tokens[:, 1:-1])
        ce = -torch.where(lab, lp[:, TRUE], lp[:, FALSE])
        # every probe cell counts equally
        direct = torch.stack([ce[cell == c].mean() for c in range(len(PROBE_CELLS))]).mean()
        torch.testing.assert_close(fn(model), direct)


class _Rule(torch.nn.Module):
    """Answers at the query position with a given rule of the string."""

    def __init__(self, rule):
        super().__init__()
        self.rule = rule

    def forward(self, tokens):
        out = torch.zeros(*tokens.shape, 6)
        out[:, -1, TRUE] = self.rule(tokens[:, 1:-1]).float()
        return out


def test_parens_algorithms_are_separated_by_probe_cells_and_others_are_other():
    task = ParenthesesTask(length=8)
    probes = task.probes("all")
    ps, cell = probes.tokens[:, 1:-1], probes.extra["cell"]
    answers = {}
    train = task.sample(500, seed=1)
    for name, alg in ALGORITHMS.items():
        assert torch.equal(alg(train.tokens[:, 1:-1]), train.extra["label"])  # fits the training data
        a = alg(ps)
        # each algorithm gives one answer per probe cell ...
        answers[name] = tuple(int(a[cell == c].all()) for c in range(4))
        assert all(bool(a[cell == c].all()) or not bool(a[cell == c].any()) for c in range(4))
    # ... and no two algorithms answer alike on all cells
    assert len(set(answers.values())) == len(ALGORITHMS)
    for name, alg in ALGORITHMS.items():
        sc = algorithm_scores(_Rule(alg), task, num_train=300)
        assert sc["learned"] == sc["best"] == name and sc[f"cells/{name}"] == 1.0

    # fits the training data but implements none of the listed algorithms: "equal counts, depth never below -1"
    def dip1(s):
        depth = torch.cumsum((s == OPEN).long() - (s == CLOSE).long(), -1)
        return ALGORITHMS["equal_counts"](s) & (depth.min(-1).values >= -1)

    sc = algorithm_scores(_Rule(dip1), task, num_train=300)
    assert sc["train/balanced"] == 1.0 and sc["learned"] == "other"
    # does not fit the training data: "first token is '('"
    sc = algorithm_scores(_Rule(lambda s: s[:, 0] == OPEN), task, num_train=300)
    assert sc["train/balanced"] < 0.9 and sc["learned"] == "other"


def test_select_weights_contrast():
    """A planted chi where only group 3 lowers the target's loss relative to the others: it is up-weighted; the
    balanced group keeps weight 1 and the unequal groups keep their share of the data."""
    names = list(ALGORITHMS)
    groups = np.repeat(np.arange(len(PARENS_GROUP_NAMES)), 5)
    chi = np.zeros((len(names), len(groups)))
    chi[names.index("balanced"), groups == 3] = -1.0
    chi[names.index("balanced"), groups == 1] = 1.0
    # a response to the balanced group, whose weight is never changed
    chi[:, groups == 0] = -5.0
    s = ParensSettings()
    f = np.array([0.5, 0.1, 0.15, 0.15, 0.1])
    w, iv, chi_g = select_weights(chi, groups, names, "balanced", s, f)
    assert chi_g.shape == (len(names), len(PARENS_GROUP_NAMES))
    assert w[0] == 1.0 and int(np.argmax(w)) == 3
    assert iv.weights[2] == pytest.approx(s.max_weight, abs=1e-6)  # iv: the four unequal groups
    assert iv.weights[0] == pytest.approx(s.min_weight, abs=1e-6)
    assert abs(w @ f - 1) < 1e-9 and abs(w[1:] @ f[1:] - f[1:].sum()) < 1e-9
    # the share of the unequal groups is a constraint of the inversion: no rescaling afterwards
    np.testing.assert_allclose(w[1:], iv.weights, atol=1e-12)
    assert (iv.predicted < 0).all()  # every contrast mu_balanced - mu_B is predicted to go down


def test_parens_experiment_end_to_end():
    s = ParensSettings(**TINY_PAR)
    res = run_parens_experiment(seeds=(0,), s=s)
    r = res["per_seed"][0]
    assert r["chi"].shape == (len(ALGORITHMS), s.probe_train_size) and np.isfinite(r["chi"]).all()
    assert r["chi_observables"] == list(ALGORITHMS) and r["algorithms"] == [*ALGORITHMS, "other"]
    assert set(r["runs"]) == {"baseline"} | {f"target:{t}" for t in s.targets}
    for name, run in r["runs"].items():
        assert run["learned"] in r["algorithms"]
        assert all(0.0 <= v <= 1.0 for k, v in run["scores"].items() if k not in ("best", "learned"))
        w = np.asarray(run["group_weights"])
        assert (w >= 0).all() and abs(w @ np.asarray(r["group_fractions"]) - 1) < 1e-5
        assert w[0] == pytest.approx(1.0, abs=1e-5)  # the class balance is never changed
        if name == "baseline":
            assert np.allclose(w, 1.0)
    rates = res["summary"]["rates"]
    assert all(abs(sum(v.values()) - 1) < 1e-12 for v in rates.values())
    assert set(res["summary"]["baseline_rate"]) == set(s.targets)


def test_parens_online_patterning_reestimates():
    s = ParensSettings(**{**TINY_PAR, "targets": ("balanced",), "online_every": 10, "online_until": 25})
    r = run_parens_experiment(seeds=(0,), s=s)["per_seed"][0]
    hist = r["runs"]["target:balanced"]["online_weights"]
    assert [h[0] for h in hist] == [0, 10, 20]  # re-estimated every 10 steps until step 25
    f = np.asarray(r["group_fractions"])
    for _, w in hist:
        w = np.asarray(w)
        assert w[0] == 1.0 and abs(w[1:] @ f[1:] - f[1:].sum()) < 1e-3  # class balance kept
        assert w.min() >= s.min_weight * 0.5 and w.max() <= s.max_weight * 2
    np.testing.assert_allclose(r["runs"]["target:balanced"]["group_weights"], hist[-1][1], atol=1e-3)
    assert r["runs"]["baseline"]["online_weights"] == []


def test_demo_writes_plots_and_a_short_headline(tmp_path):
    out = demo_cli.run_patterning_demo(tmp_path, log=None, quick=True)
    for p in out["plots"]:
        assert (tmp_path / p.split("/")[-1]).stat().st_size > 1000
    report = json.loads((tmp_path / "patterning_summary.json").read_text())
    assert out["report"] == str(tmp_path / "patterning_summary.json")
    assert report["induction"]["seeds"] == [0] and report["parens"]["seeds"] == [0]
    assert set(out["induction"]["onset"]) == {"baseline", "accelerate", "delay"}
    head = demo_cli.headline(out)
    assert head["report"] == out["report"]
    assert len(str(head)) < 1500 < len(json.dumps(report))  # a summary, not the report


def test_quick_settings_are_the_tiny_test_sizes():
    ik, ind, pk, par = demo_cli.quick_settings()
    assert ind == InductionSettings(**TINY_IND) and par == ParensSettings(**TINY_PAR)
    assert ik["seeds"] == (0,) and pk["seeds"] == (0,)
    with pytest.raises(ValueError, match="full=True and quick=True"):
        demo_cli.run_patterning_demo("unused", full=True, quick=True)


def test_online_patterning_starts_from_the_single_shot_weights(monkeypatch):
    """The first online estimate inverts the same chi with the same group fractions as the single-shot path: the
    same weights, inside the bounds."""
    import numpy as np

    import pypattern.experiments.parens as P
    from pypattern.experiments.patterning_demo import quick_settings

    _, _, _, s = quick_settings()
    s.online_every, s.online_until = 5, 10
    rng = np.random.default_rng(0)
    names = list(P.ALGORITHMS)
    groups = rng.integers(0, P.NUM_GROUPS, 200)
    chi = rng.normal(size=(len(names), 200))
    monkeypatch.setattr(
        P, "estimate_solution_chi", lambda model, s, seed=0: (chi, chi * 0, groups, names, 1.0)
    )
    fr = P.GroupWeightedParentheses(s.length).group_fractions.numpy()
    single, _, _ = P.select_weights(chi, groups, names, names[0], s, fr)
    _, history = P._online_callback(None, P.GroupWeightedParentheses(s.length), names[0], s, 0)
    online = np.array(history[0][1])
    np.testing.assert_allclose(online, single, atol=1e-3)
    assert online.min() >= s.min_weight - 1e-9 and online.max() <= s.max_weight + 1e-9
