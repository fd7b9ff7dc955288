"""``pypattern demo --seed`` (main and flags) against the demo modules' own runs at that seed; ``patch --model
--seed`` against ``run_user_patch``; the help text against the parser; and ``calibrate_step_size`` warning when no
step size of the sweep is healthy."""

import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch

import pypattern as pp
from pypattern import cli
from pypattern.sampling import calibrate_step_size
from pypattern.truth import DeepLinearNetwork, make_regression_data

pytestmark = pytest.mark.usefixtures("one_thread")


def _llc_arrays(folder) -> dict:
    r = pp.LLCResult.load(folder / "llc_result.npz")
    return {"per_chain": np.asarray(r.llc_per_chain), "mean": r.llc_mean, "init_loss": r.init_loss}


def _patch_table(folder) -> str:
    return (folder / "patching_table.csv").read_text()


@pytest.mark.filterwarnings("ignore::pypattern.sampling.diagnostics.NonStationaryWarning")
def test_demo_seed_equals_the_modules_run_at_that_seed_and_the_default_is_seed_0(tmp_path, capsys):
    from pypattern.experiments import llc_demo, patching_demo

    assert cli.main(["demo", "--quick", "--out", str(tmp_path / "d0")]) == 0
    assert cli.main(["demo", "--quick", "--seed", "3", "--out", str(tmp_path / "d3")]) == 0
    # the modules' own command lines: their default run and their run with --seed 3
    llc_demo.main([str(tmp_path / "l0"), "--quick"])
    llc_demo.main([str(tmp_path / "l3"), "--quick", "--seed", "3"])
    patching_demo.main([str(tmp_path / "p0"), "--quick"])
    patching_demo.main([str(tmp_path / "p3"), "--quick", "--seed", "3"])
    capsys.readouterr()
    for demo, llc, patch in (("d0", "l0", "p0"), ("d3", "l3", "p3")):
        got, want = _llc_arrays(tmp_path / demo / "llc"), _llc_arrays(tmp_path / llc)
        np.testing.assert_array_equal(got["per_chain"], want["per_chain"])
        assert (got["mean"], got["init_loss"]) == (want["mean"], want["init_loss"])
        assert _patch_table(tmp_path / demo / "patch") == _patch_table(tmp_path / patch)
        summary = json.loads((tmp_path / demo / "patch" / "patching_summary.json").read_text())
        assert summary["settings"]["seed"] == (3 if demo == "d3" else 0)
    # seed 3 is another run than the default
    a, b = _llc_arrays(tmp_path / "d0" / "llc"), _llc_arrays(tmp_path / "d3" / "llc")
    assert not np.array_equal(a["per_chain"], b["per_chain"]) and a["init_loss"] != b["init_loss"]
    assert _patch_table(tmp_path / "d0" / "patch") != _patch_table(tmp_path / "d3" / "patch")


def test_demo_sgld_part_takes_the_seed():
    """The fused-step timing part of the main demo builds its MLP and data from the seed (its result is only the
    backend and times)."""
    for seed in (3, 0):
        res = cli._demo_sgld(steps=1, seed=seed)
        assert torch.initial_seed() == seed and res["backend"] == "cpp"


def test_demo_flags_seed_reaches_the_settings(tmp_path, monkeypatch, capsys):
    """``demo flags --seed 3`` runs the flags demo on its own settings with seed 3; without --seed, on its own
    settings unchanged (seed 0)."""
    from pypattern.experiments import flags_demo

    seen = []

    def record(out_dir, s=None):
        seen.append(s)
        return {"seconds": 0.0}

    monkeypatch.setattr(flags_demo, "run_flags_demo", record)
    for argv in (["--quick"], ["--quick", "--seed", "3"], [], ["--seed", "5"]):
        assert cli.main(["demo", "flags", *argv, "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    quick, full = flags_demo.FlagsDemoSettings.quick(), flags_demo.FlagsDemoSettings()
    assert seen == [quick, dataclasses.replace(quick, seed=3), full, dataclasses.replace(full, seed=5)]
    assert full.seed == 0 and quick.seed == 0


@pytest.mark.parametrize("bad", ["-1", "1.5", "x", str(2**63)])
def test_demo_refuses_a_seed_that_is_not_an_int_in_range(bad, capsys):
    for what in ([], ["flags"]):
        with pytest.raises(SystemExit) as e:
            cli.main(["demo", *what, "--seed", bad])
        assert e.value.code == 2
        assert "argument --seed: must be an integer in [0, 2**63)" in capsys.readouterr().err


@pytest.mark.parametrize("what", ["patterning", "equivalence", "interpretive", "cka"])
def test_demos_of_several_seeds_refuse_seed(what, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", what, "--seed", "1", "--quick"])
    assert e.value.code == 2
    assert f"--seed applies to 'main' and 'flags' only, not to {what!r}" in capsys.readouterr().err


def test_help_documents_seed_and_the_readme_metavars(capsys):
    subs = cli._parser().commands
    demo = subs["demo"].format_help()
    assert "--seed N" in demo and "main and flags only" in demo and "(default: 0)" in demo
    for name in ("llc", "patch", "chi"):
        text = subs[name].format_help()
        assert "--model DIR" in text and "--data FILE" in text, name
    assert "--corrupted FILE" in subs["patch"].format_help()
    assert "--seed N" in subs["patch"].format_help()
    args = cli._parser().parse_args(["demo"])
    cli._resolve(subs["demo"], args)
    assert args.seed == 0


@pytest.fixture
def user_model(tmp_path):
    torch.manual_seed(0)
    m = pp.Transformer(pp.TransformerConfig(n_layers=1, d_model=8, n_heads=2, d_mlp=16, d_vocab=23, n_ctx=16))
    folder = tmp_path / "model"
    folder.mkdir()
    cfg = {
        k: (str(v).replace("torch.", "") if isinstance(v, torch.dtype) else v)
        for k, v in dataclasses.asdict(m.cfg).items()
    }
    (folder / "config.json").write_text(json.dumps(cfg))
    np.savez(folder / "weights.npz", **{k: v.detach().numpy() for k, v in m.state_dict().items()})
    tokens = torch.randint(0, 23, (4, 6), generator=torch.Generator().manual_seed(1)).numpy()
    np.save(tmp_path / "tokens.npy", tokens)
    return str(folder), str(tmp_path / "tokens.npy")


def test_patch_seed_seeds_the_gaussian_noise_of_a_user_model(user_model, tmp_path, capsys):
    from pypattern.experiments.user_model import run_user_patch

    folder, data = user_model
    base = ["patch", "--model", folder, "--data", data, "--sites", "resid_pre", "--quiet"]
    assert cli.main([*base, "--out", str(tmp_path / "c0")]) == 0
    assert cli.main([*base, "--seed", "3", "--out", str(tmp_path / "c3")]) == 0
    run_user_patch(folder, data, str(tmp_path / "r3"), sites=("resid_pre",), seed=3, quiet=True)
    capsys.readouterr()
    table = {k: (tmp_path / k / "patch_resid_pre.csv").read_text() for k in ("c0", "c3", "r3")}
    assert table["c3"] == table["r3"] and table["c0"] != table["c3"]
    noise = json.loads((tmp_path / "c3" / "patch_summary.json").read_text())["corruption"]["gaussian_noise"]
    assert noise["seed"] == 3
    # a checkpoint of seed 0 resumed with --seed 3 is refused, naming the option
    ck = [*base, "--checkpoint", str(tmp_path / "ck"), "--out", str(tmp_path / "k")]
    assert cli.main(ck) == 0
    with pytest.raises(SystemExit) as e:
        cli.main([*ck, "--seed", "3"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "corruption.seed = 0 there, 3 now" in err
    assert (
        "(on the command line: --seed: the Gaussian noise of the corrupted run drawn with another seed)"
        in err
    )
    # --seed seeds the noise that --corrupted replaces: refused with it, and without --model
    for argv, message in (
        ([*base, "--corrupted", data, "--seed", "2"], "--seed with --model seeds the Gaussian noise"),
        (["patch", "--max-prompts", "3"], "--max-prompts applies only with --model DIR --data FILE"),
    ):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err


def _regression():
    model = DeepLinearNetwork((2, 2), dtype=torch.float64)
    with torch.no_grad():
        model.layers[0].weight.copy_(torch.tensor([[1.0, -0.5], [0.3, 2.0]]))
    ds = make_regression_data(model, 2, dtype=torch.float64)
    return model, torch.utils.data.DataLoader(ds, batch_size=len(ds))


def test_calibration_without_a_healthy_step_warns_what_failed_and_what_to_try():
    model, loader = _regression()
    kw = dict(nbeta=100.0, localization=1.0, num_chains=2, num_draws=40, num_burnin_steps=0, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cal = calibrate_step_size(model, loader, step_sizes=[1e-7, 1.0, 10.0], **kw)
    # the table itself: 1e-7 barely moves from w* (a drifting trace), 1.0 and 10.0 diverge
    assert cal.recommended is None and not cal.healthy.any()
    assert cal.diverged.tolist() == [False, True, True]
    assert cal.reasons[0].startswith("not stationary") and cal.reasons[1].startswith("diverged")
    mine = [w for w in caught if "no step size of the sweep is healthy" in str(w.message)]
    assert len(mine) == 1 and issubclass(mine[0].category, UserWarning)
    assert mine[0].filename == __file__  # points at the caller
    text = str(mine[0].message)
    for size, reason in zip(["1e-07", "1", "10"], cal.reasons):
        assert f"{size}: {reason}" in text
    assert "recommended is None" in text
    assert "smaller step sizes (below 1e-07" in text
    assert "num_burnin_steps (now 0)" in text and "num_draws (now 40)" in text
    assert "larger localization (now 1.0)" in text


def test_calibration_with_a_healthy_step_gives_no_such_warning():
    model, loader = _regression()
    kw = dict(nbeta=100.0, localization=1.0, num_chains=2, num_draws=100, num_burnin_steps=50, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cal = calibrate_step_size(model, loader, step_sizes=[3e-3, 10.0], **kw)
    assert cal.healthy.tolist() == [True, False] and cal.recommended == 3e-3
    assert not [w for w in caught if "no step size of the sweep is healthy" in str(w.message)]
