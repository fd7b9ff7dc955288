"""The demo scripts: command lines, what their summaries record, and the global state they leave alone."""

from __future__ import annotations

import json

import matplotlib
import numpy as np
import pytest
import torch

from pypattern.experiments import auto_step_hf, llc_demo, patching_demo

LLC_TINY = dict(llc_demo.QUICK, num_chains=2, quiet=True)


def _global_state():
    import matplotlib.pyplot as plt

    return dict(
        backend=matplotlib.get_backend(),
        figures=list(plt.get_fignums()),
        rng=torch.random.get_rng_state().clone(),
        dtype=torch.get_default_dtype(),
        grad=torch.is_grad_enabled(),
        threads=torch.get_num_threads(),
    )


def _assert_same(before, after):
    for key in ("backend", "figures", "dtype", "grad", "threads"):
        assert after[key] == before[key], key
    assert torch.equal(after["rng"], before["rng"]), "global torch RNG state changed"


@pytest.fixture
def svg_backend():
    old = matplotlib.get_backend()
    matplotlib.use("svg")
    yield
    matplotlib.use(old)


@pytest.mark.parametrize(
    "run",
    [
        lambda out: llc_demo.run_llc_demo(out, **LLC_TINY),
        lambda out: patching_demo.run_patch_demo(out, **patching_demo.QUICK),
    ],
    ids=["llc_demo", "patching_demo"],
)
def test_demo_functions_leave_global_state(run, tmp_path, svg_backend, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(123)
    before = _global_state()
    run(tmp_path / "out")
    _assert_same(before, _global_state())
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_llc_summary_records_settings_and_matches_result(tmp_path):
    from pypattern.sampling.results import LLCResult

    s = llc_demo.run_llc_demo(tmp_path, seed=3, **LLC_TINY)
    saved = json.loads((tmp_path / "llc_summary.json").read_text())
    st = saved["settings"]
    assert st["seed"] == 3 and st["num_chains"] == 2 and st["num_draws"] == llc_demo.QUICK["num_draws"]
    assert st["sizes"] == list(llc_demo.QUICK["sizes"])
    # the mean over chains, recomputed from the per-chain values and from the saved result
    assert saved["llc_mean"] == pytest.approx(float(np.mean(saved["llc_per_chain"])), rel=1e-9)
    res = LLCResult.load(s["result"])
    assert saved["llc_mean"] == pytest.approx(float(res.llc_mean), rel=1e-9)


def test_patch_summary_records_settings(tmp_path):
    patching_demo.run_patch_demo(tmp_path, seed=2, **patching_demo.QUICK)
    saved = json.loads((tmp_path / "patching_summary.json").read_text())
    assert saved["settings"] == {"steps": patching_demo.QUICK["steps"], "num_prompts": 12, "seed": 2}


@pytest.mark.parametrize("module", [llc_demo, patching_demo])
def test_script_help_prints_usage_and_writes_nothing(module, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0
    assert "out_dir" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--seeds", "a,b"], "--seeds"),
        (["--families", "gpt2,bert"], "--families"),
        (["--num-draws", "0"], "--num-draws"),
        (["--train-steps", "x"], "--train-steps"),
        (["--d-model", "30"], "--d-model"),
    ],
)
def test_auto_step_hf_bad_values_are_argparse_errors(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        auto_step_hf.main(argv)
    assert e.value.code == 2
    assert flag in capsys.readouterr().err


def test_experiment_modules_run_with_python_m_without_runpys_warning():
    """The package imports its modules when first read, so ``python -m pypattern.experiments.<module>`` runs a
    module the package has not imported already (runpy warned "found in sys.modules" before)."""
    import os
    import subprocess
    import sys

    import pypattern.experiments as ex

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("induction", "chi_settings"):
        r = subprocess.run(
            [sys.executable, "-W", "error::RuntimeWarning", "-m", f"pypattern.experiments.{name}"],
            capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
        assert r.returncode == 0 and "found in sys.modules" not in r.stderr, r.stderr[-2000:]
    assert ex.run_patterning_demo.__module__ == "pypattern.experiments.patterning_demo"
    assert "InductionSettings" in dir(ex)
