"""`pypattern llc|patch --seed N` on the built-in demo (the seed of the demo module's own run), and the metavars of
`pypattern circuit --help` (DIR and FILE, as the other commands and the README write them)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from pypattern import cli
from pypattern.experiments import llc_demo, patching_demo


def test_circuit_help_names_dir_and_file_as_the_other_commands_do():
    subs = cli._parser().commands
    text = subs["circuit"].format_help()
    for shown in ("--model-dir DIR", "--model DIR", "--tokens FILE", "--data FILE", "--corrupted FILE"):
        assert shown in text, shown
    for old in ("MODEL_DIR", "TOKENS", "CORRUPTED"):
        assert old not in text, old
    for name in ("llc", "patch"):  # the same words as the commands that take a model and a token file
        other = subs[name].format_help()
        assert "--model DIR" in other and "--data FILE" in other


def _llc_result(folder) -> dict:
    with np.load(folder / "llc_result.npz") as z:
        arrays = {k: z[k] for k in z.files if k != "__meta_json__"}
    settings = json.loads((folder / "llc_summary.json").read_text())["settings"]
    return {"arrays": arrays, "settings": settings}


def _same_llc(a: dict, b: dict) -> bool:
    return a["settings"] == b["settings"] and all(
        np.array_equal(a["arrays"][k], b["arrays"][k]) for k in a["arrays"]
    )


def test_llc_builtin_demo_takes_seed_as_the_demo_module_does(tmp_path, capsys):
    assert cli.main(["llc", "--quick", "--quiet", "--seed", "3", "--out", str(tmp_path / "cli3")]) == 0
    llc_demo.main([str(tmp_path / "mod3"), "--quick", "--seed", "3"])
    assert cli.main(["llc", "--quick", "--quiet", "--out", str(tmp_path / "cli")]) == 0
    capsys.readouterr()
    cli3, mod3, default = (_llc_result(tmp_path / d) for d in ("cli3", "mod3", "cli"))
    assert cli3["settings"]["seed"] == 3 and default["settings"]["seed"] == 0
    assert _same_llc(cli3, mod3)  # the demo module's own run with seed 3, bit for bit
    assert not np.array_equal(cli3["arrays"]["llc_per_chain"], default["arrays"]["llc_per_chain"])
    assert not np.array_equal(cli3["arrays"]["loss_trace"], default["arrays"]["loss_trace"])


def _patch_result(folder) -> tuple[dict, list]:
    summary = json.loads((folder / "patching_summary.json").read_text())
    kept = {
        k: v
        for k, v in summary.items()
        if not k.startswith("seconds_") and k not in ("heatmap", "table", "summary")
    }
    with open(folder / "patching_table.csv", newline="") as f:
        return kept, list(csv.reader(f))


def test_patch_builtin_demo_takes_seed_as_the_demo_module_does(tmp_path, capsys):
    assert cli.main(["patch", "--quick", "--seed", "3", "--out", str(tmp_path / "cli3")]) == 0
    patching_demo.main([str(tmp_path / "mod3"), "--quick", "--seed", "3"])
    assert cli.main(["patch", "--quick", "--out", str(tmp_path / "cli")]) == 0
    capsys.readouterr()
    (s3, t3), (m3, tm3), (s0, t0) = (_patch_result(tmp_path / d) for d in ("cli3", "mod3", "cli"))
    assert s3["settings"]["seed"] == 3 and s0["settings"]["seed"] == 0
    assert (s3, t3) == (m3, tm3)  # the demo module's own run with seed 3
    assert t3 != t0 and s3["logit_diff_clean"] != s0["logit_diff_clean"]


@pytest.mark.parametrize("name", ["llc", "patch"])
def test_seed_on_the_builtin_demo_is_checked_and_documented(name, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([name, "--quick", "--seed", "-1"])
    assert e.value.code == 2
    assert "argument --seed: must be an integer in [0, 2**63)" in capsys.readouterr().err
    sub = cli._parser().commands[name]
    assert "built-in demo" in next(a for a in sub._actions if "--seed" in a.option_strings).help
