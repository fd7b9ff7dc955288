"""The command line: every sub-command parses, and the cheap ones run."""

import json

import pytest

import pypattern as pp
from pypattern import cli


def test_backends_command(capsys):
    assert cli.main(["backends"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["cpp"]["available"] and out["reference"]["available"]
    assert cli.main(["backends", "--op", "row_dots"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["cpp"]["available"] and not out["triton"]["available"]
    assert "no Triton kernel registered" in out["triton"]["reason"]
    assert cli.main(["backends", "--op", "all"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"sgld_step_", "gelu_tanh", "row_dots", "grad_gram_pairwise"} <= set(out)
    with pytest.raises(SystemExit) as e:
        cli.main(["backends", "--op", "nope"])
    assert e.value.code == 2
    assert "--op 'nope' is not an operator of pypattern" in capsys.readouterr().err


def test_sgld_demo_part_runs():
    res = cli._demo_sgld(steps=5)
    assert res["backend"] == "cpp"
    assert all(v > 0 for k, v in res.items() if k.startswith("ms_per_step"))


@pytest.mark.parametrize(
    "argv", [["demo", "--help"], ["demo", "patterning", "--help"], ["llc", "--help"], ["patch", "--help"]]
)
def test_help(argv):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 0


def test_unknown_command_fails():
    with pytest.raises(SystemExit) as e:
        cli.main(["nope"])
    assert e.value.code != 0


def _subparsers():
    parser = cli._parser()
    (sub,) = [a for a in parser._actions if a.dest == "cmd"]
    return parser, sub.choices


def test_every_option_is_explained_and_help_has_no_raw_markup(capsys):
    parser, subs = _subparsers()
    assert set(subs) == {"demo", "llc", "patch", "chi", "circuit", "backends"}
    for name, p in [("pypattern", parser), *subs.items()]:
        for action in p._actions:
            if action.dest in ("help", "cmd"):
                continue
            assert action.help, f"{name}: option {action.dest!r} has no help text"
        text = p.format_help()
        assert "``" not in text, name
    for argv in (["--help"], *([c, "--help"] for c in subs)):
        with pytest.raises(SystemExit):
            cli.main(argv)
        assert "``" not in capsys.readouterr().out


def test_llc_quick_ends_with_a_short_summary(tmp_path, capsys):
    assert cli.main(["llc", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "LLC =" in out and str(tmp_path / "llc_result.npz") in out
    assert len(out) < 2000
    summary = json.loads((tmp_path / "llc_summary.json").read_text())
    back = pp.LLCResult.load(tmp_path / "llc_result.npz")
    assert summary["llc_mean"] == back.llc_mean and summary["result"] == str(tmp_path / "llc_result.npz")
    assert summary["llc_se"] == back.llc_se and summary["llc_se"] > 0  # as the --model path writes it


def test_demo_patterning_quick_prints_a_headline_not_the_report(tmp_path, capsys):
    assert cli.main(["demo", "patterning", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    report = tmp_path / "patterning_summary.json"
    assert f"report: {report}" in out and "induction seed 0" in out
    assert len(out) < 2500 < report.stat().st_size


def test_full_and_quick_exclude_each_other_and_full_is_for_patterning_and_equivalence(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "patterning", "--full", "--quick"])
    assert e.value.code != 0
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "flags", "--full"])
    assert e.value.code == 2
    assert (
        "pypattern demo: error: --full applies to 'patterning' and 'equivalence' only"
        in capsys.readouterr().err
    )


def test_python_dash_m_runs_the_command_line():
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "pypattern", "backends"], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert "reference" in json.loads(r.stdout[r.stdout.index("{") :])
    r = subprocess.run([sys.executable, "-m", "pypattern", "no-such-command"], capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice" in r.stderr
