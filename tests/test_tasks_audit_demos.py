"""The demos' quick modes write the files they document, and their summaries agree with numbers recomputed from
those files."""

import csv
import json
import math

import numpy as np
import pytest

from pypattern.experiments import llc_demo, patching_demo
from pypattern.experiments.equivalence_demo import EquivalenceDemoSettings, run_equivalence_demo
from pypattern.experiments.patterning_demo import headline, run_patterning_demo
from pypattern.tasks import InductionTask


def test_llc_demo_chain_estimates_are_nbeta_times_the_mean_loss_rise(tmp_path):
    out = llc_demo.run_llc_demo(tmp_path, quiet=True, **llc_demo.QUICK)
    for key in ("plot", "result", "summary"):
        assert (tmp_path / out[key].split("/")[-1]).is_file()
    summary = json.loads((tmp_path / "llc_summary.json").read_text())
    z = np.load(tmp_path / "llc_result.npz", allow_pickle=False)
    nbeta = summary["settings"]["nbeta"]
    bs = llc_demo.QUICK["batch_size"]
    assert nbeta == pytest.approx(bs / math.log(bs))  # devinterp's default, as documented
    per_chain = nbeta * (z["loss_trace"].mean(1) - summary["init_loss"])
    np.testing.assert_allclose(summary["llc_per_chain"], per_chain, rtol=1e-6, atol=1e-9)
    assert summary["llc_mean"] == pytest.approx(per_chain.mean(), rel=1e-6)
    assert summary["llc_std"] == pytest.approx(per_chain.std(ddof=1), rel=1e-6)


def test_patch_demo_top_cells_are_the_largest_rows_of_its_table(tmp_path):
    out = patching_demo.run_patch_demo(str(tmp_path), **patching_demo.QUICK)
    for key in ("heatmap", "table", "summary"):
        assert (tmp_path / out[key].split("/")[-1]).is_file()
    with open(tmp_path / "patching_table.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["method"] == "exact" and r["site"] == "resid_pre"]
    assert len(rows) == 2 * 7  # layers x positions of the IOI template
    rows.sort(key=lambda r: -abs(float(r["mean"])))
    want = "; ".join(f"layer {r['layer']} pos {r['pos']}: {float(r['mean']):+.3f}" for r in rows[:3])
    assert out["top_resid_pre"] == want
    written = json.loads((tmp_path / "patching_summary.json").read_text())
    assert written["top_resid_pre"] == want and written["accuracy"] == out["accuracy"]


def test_cka_demo_counts_the_induction_tokens_and_prints_the_written_numbers(tmp_path):
    s = EquivalenceDemoSettings.quick()
    out = run_equivalence_demo(tmp_path, s)
    assert (tmp_path / "equivalence_cka.png").is_file()
    res = json.loads((tmp_path / "equivalence.json").read_text())
    task = InductionTask(d_vocab=s.d_vocab, seq_len=s.seq_len)
    assert res["num_induction_tokens"] == s.num_inputs * (task.repeat_len - 1)  # each copy flags k - 1 tokens
    assert set(res["pairs"]) == {"0-1", "0-2", "1-2"}
    for key, p in res["pairs"].items():
        cka = np.asarray(p["cka"])
        assert cka.shape == (2, 2)
        line = out[f"seeds {key}: CKA layer 0 / layer 1 (p)"]
        assert line == (
            f"{cka[0, 0]:.3f} ({p['cka_p_value'][0]:.3f}) / {cka[1, 1]:.3f} ({p['cka_p_value'][1]:.3f})"
        )
        # a permutation p-value of n permutations is at least 1 / (n + 1)
        assert min(p["cka_p_value"]) >= 1 / (s.num_permutations + 1) - 1e-12


def test_patterning_demo_quick_writes_its_files_and_its_headline_reads_the_report(tmp_path):
    res = run_patterning_demo(tmp_path, quick=True, log=None)
    names = {"induction_onset.png", "induction_chi_directions.png", "parens_algorithms.png"}
    assert names | {"patterning_summary.json"} <= {p.name for p in tmp_path.iterdir()}
    rep = json.loads((tmp_path / "patterning_summary.json").read_text())
    ind, par = rep["induction"], rep["parens"]
    for name in ("accelerate", "delay"):  # shifts against the baseline, from the written onsets
        for b, o, got in zip(ind["onset"]["baseline"], ind["onset"][name], ind["relative_shift"][name]):
            if b is None or o is None:  # not finite: written as null
                continue
            assert got == pytest.approx(o / b - 1)
    for target, rate in par["target_hit_rate"].items():  # selection rates, from the written scores
        learned = [sc["learned"] for sc in par["scores"][f"target:{target}"]]
        assert rate == pytest.approx(np.mean([x == target for x in learned]))
        base = [sc["learned"] for sc in par["scores"]["baseline"]]
        assert par["baseline_rate"][target] == pytest.approx(np.mean([x == target for x in base]))
    lines = headline(res)
    assert lines["report"] == str(tmp_path / "patterning_summary.json")
