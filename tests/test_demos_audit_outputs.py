"""The demos' printed numbers against independent computations from what they write, their onset summaries and
headline on edge cases, and paths they cannot write refused before any work."""

import csv
import itertools
import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from pypattern.experiments import patching_demo
from pypattern.experiments.equivalence_demo import EquivalenceDemoSettings, run_equivalence_demo
from pypattern.experiments.flags_demo import FlagsDemoSettings, run_flags_demo
from pypattern.experiments.induction import InductionSettings, summarize_onsets
from pypattern.experiments.patterning_demo import _jsonable, headline, run_patterning_demo
from pypattern.models.transformer import Transformer
from pypattern.tasks import InductionTask, IOITask
from pypattern.tasks.training import train


def _seed(i, base, acc, delay, acc_cap=None, delay_cap=None):
    run = lambda o, cap: {"onset": o, "censored_at": cap}  # noqa: E731
    return {
        "seed": i,
        "patterning": {"pc": 0},
        "runs": {
            "baseline": run(base, None),
            "accelerate": run(acc, acc_cap),
            "delay": run(delay, delay_cap),
        },
    }


def test_patch_demo_spearman_ties_the_cells_patching_cannot_change(tmp_path):
    """Cells whose clean and corrupted activations agree on every prompt have exact effect 0 (AtP gives exactly
    0 there); the printed rank correlation treats them as ties, not by the order of the exact run's rounding."""
    q = patching_demo.QUICK
    out = patching_demo.run_patch_demo(str(tmp_path), **q)
    clean, corr, _, _ = IOITask().patching_pairs(q["num_prompts"], seed=1, corruption="abc")
    differs = clean != corr  # (prompts, pos)
    # layer 0 reads each token alone; later layers see every position from the first one that differs on
    first = int(differs.any(0).nonzero()[0])
    with open(tmp_path / "patching_table.csv") as f:
        rows = list(csv.DictReader(f))
    for site, key in (("resid_pre", "spearman_atp_exact_resid_pre"), ("z", "spearman_atp_exact_heads")):
        ex = {
            (r["layer"], r["head"], r["pos"]): float(r["mean"])
            for r in rows
            if r["method"] == "exact" and r["site"] == site
        }
        at = {
            (r["layer"], r["head"], r["pos"]): float(r["mean"])
            for r in rows
            if r["method"] == "atp" and r["site"] == site
        }
        cells = sorted(ex)
        e = np.array([ex[c] for c in cells])
        a = np.array([at[c] for c in cells])
        if site == "resid_pre":
            layer = np.array([int(c[0]) for c in cells])
            pos = np.array([int(c[2]) for c in cells])
            same = np.where(layer == 0, ~differs.any(0).numpy()[pos], pos < first)
            assert same.sum() >= 3 and np.all(a[same] == 0.0) and np.abs(e[same]).max() < 1e-5
            e[same] = 0.0
        # the table holds normalised means: one positive factor from the effects, the same ranks
        assert out[key] == pytest.approx(spearmanr(e, a)[0], abs=1e-9)


def test_induction_shift_after_checkpoint_with_the_baseline_onset_at_the_checkpoint():
    """Every run shares the curve up to the checkpoint: a baseline onset there leaves no shift after it (NaN),
    where dividing by its distance to the checkpoint failed; other seeds keep (o - c) / (b - c) - 1."""
    s = InductionSettings(checkpoint_step=200)
    sm = summarize_onsets([_seed(0, 200.0, 200.0, 200.0), _seed(1, 1000.0, 600.0, 1400.0)], s)
    np.testing.assert_allclose(sm["relative_shift"]["accelerate"], [0.0, 600 / 1000 - 1])
    np.testing.assert_allclose(sm["relative_shift_after_checkpoint"]["accelerate"], [np.nan, 400 / 800 - 1])
    np.testing.assert_allclose(sm["relative_shift_after_checkpoint"]["delay"], [np.nan, 1200 / 800 - 1])
    before = summarize_onsets([_seed(0, 150.0, 150.0, 150.0)], s)  # onset before the checkpoint
    assert math.isnan(before["relative_shift_after_checkpoint"]["delay"][0])


def test_patterning_headline_marks_censored_shifts_as_bounds_and_reads_the_written_report():
    """A run with no onset by its cap shows the lower bound its last step gives (``>= +x%``), for either pole;
    the headline also reads the JSON report, where the onsets that are not finite are null."""
    s = InductionSettings(checkpoint_step=200)
    per = [
        _seed(0, 1000.0, math.inf, math.inf, acc_cap=1600, delay_cap=1600),
        _seed(1, 1000.0, 700.0, 1300.0),
    ]
    ind = summarize_onsets(per, s)
    par = {"target_hit_rate": {"balanced": 0.5}, "baseline_rate": {"balanced": 0.0}, "seeds": [0, 1]}
    res = {"induction": ind, "parens": par, "plots": [], "seconds": {"total": 1.0}, "report": "r.json"}
    key = "induction seed {}: onset step baseline / accelerate / delay"
    lines = headline(res)
    assert lines[key.format(0)] == "1000 / none / none (shift >= +60% / >= +60%)"
    assert lines[key.format(1)] == "1000 / 700 / 1300 (shift -30% / +30%)"
    written = json.loads(json.dumps(_jsonable(res)))
    assert written["induction"]["onset"]["accelerate"][0] is None
    assert headline(written) == lines


def test_cka_demo_matches_a_naive_debiased_cka_and_reruns_identically(tmp_path):
    """The written CKA of every pair and layer, against the unbiased HSIC of Song et al. (2012) written out with
    explicit sums, on the models retrained as the demo documents; a second run into the same folder overwrites
    it with the same numbers."""
    s = EquivalenceDemoSettings.quick()
    out = run_equivalence_demo(tmp_path, s)
    first = json.loads((tmp_path / "equivalence.json").read_text())
    assert (tmp_path / "equivalence_cka.png").stat().st_size > 5000
    task = InductionTask(d_vocab=s.d_vocab, seq_len=s.seq_len)
    batch = task.sample(s.num_inputs, seed=99)
    flag = batch.extra["induction_flag"]
    reps = {}
    for seed in s.seeds:
        m = Transformer(task.model_config(d_model=s.d_model, n_heads=s.n_heads, seed=seed))
        train(m, task, steps=s.steps, batch_size=s.batch_size, lr=s.lr, seed=seed, log_every=0, quiet=True)
        m.eval()
        with torch.no_grad():
            _, cache = m.run_with_cache(batch.tokens)
        reps[seed] = [cache[f"blocks.{i}.hook_resid_post"][flag].double().numpy() for i in range(2)]

    def hsic(k, l):
        n = len(k)
        k, l = k.copy(), l.copy()
        np.fill_diagonal(k, 0.0)
        np.fill_diagonal(l, 0.0)
        one = np.ones(n)
        t = (
            np.trace(k @ l)
            + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
            - 2 * one @ k @ l @ one / (n - 2)
        )
        return t / (n * (n - 3))

    for a, b in itertools.combinations(s.seeds, 2):
        got = np.asarray(first["pairs"][f"{a}-{b}"]["cka"])
        for i, j in itertools.product(range(2), range(2)):
            k, l = reps[a][i] @ reps[a][i].T, reps[b][j] @ reps[b][j].T
            want = hsic(k, l) / math.sqrt(hsic(k, k) * hsic(l, l))
            assert got[i, j] == pytest.approx(want, rel=1e-6, abs=1e-9)
        assert out[f"seeds {a}-{b}: CKA layer 0 / layer 1 (p)"].startswith(f"{got[0, 0]:.3f} (")
    run_equivalence_demo(tmp_path, s)
    again = json.loads((tmp_path / "equivalence.json").read_text())
    first.pop("seconds"), again.pop("seconds")
    assert again == first


def test_demos_refuse_a_folder_where_they_write_a_file_before_any_work(tmp_path, monkeypatch):
    import pypattern.experiments.flags_demo as flags_mod
    import pypattern.experiments.induction as induction_mod

    def no_training(*a, **k):
        raise AssertionError("trained before the output paths were checked")

    monkeypatch.setattr(flags_mod, "train", no_training)
    monkeypatch.setattr(induction_mod, "train", no_training)
    (tmp_path / "flags_report.json").mkdir()
    with pytest.raises(ValueError, match="flags_report.json.*is a folder"):
        run_flags_demo(tmp_path, FlagsDemoSettings.quick())
    (tmp_path / "parens_algorithms.png").mkdir()
    with pytest.raises(ValueError, match="parens_algorithms.png.*is a folder"):
        run_patterning_demo(tmp_path, quick=True, log=None)
    with pytest.raises(ValueError, match="llc_result.npz.*is a folder"):
        (tmp_path / "llc" / "llc_result.npz").mkdir(parents=True)
        from pypattern.experiments.llc_demo import run_llc_demo

        run_llc_demo(tmp_path / "llc", quiet=True)
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(ValueError, match="existing file"):
        patching_demo.run_patch_demo(str(afile), **patching_demo.QUICK)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("hook", "blocks.5.hook_resid_pre", "is not a hook point"),
        ("hook", "blocks.1.attn.hook_z", "not a residual-stream hook"),
        ("num_flag_dims", 40, "entries >= d_model=32"),
        ("num_samples", 1, "num_samples=1 is not valid"),
        ("aux_weight", float("nan"), "aux_weight=nan is not valid"),
        ("stage2_steps", -1, "stage2_steps=-1 is not valid"),
        ("seed", -1, "seed=-1 is not valid"),
    ],
)
def test_flags_demo_refuses_settings_it_would_fail_on_before_any_training(
    field, value, match, monkeypatch, tmp_path
):
    import dataclasses

    import pypattern.experiments.flags_demo as flags_mod

    def no_training(*a, **k):
        raise AssertionError("trained before the settings were checked")

    monkeypatch.setattr(flags_mod, "train", no_training)
    monkeypatch.setattr(flags_mod, "train_flags", no_training)
    with pytest.raises(ValueError, match=match):
        run_flags_demo(tmp_path, dataclasses.replace(FlagsDemoSettings.quick(), **{field: value}))
