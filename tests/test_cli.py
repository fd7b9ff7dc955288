"""The command line: every sub-command parses, and the cheap ones run."""

import json

import pytest

from pypattern import cli


def test_backends_command(capsys):
    assert cli.main(["backends"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["cpp"]["available"] and out["reference"]["available"]


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
