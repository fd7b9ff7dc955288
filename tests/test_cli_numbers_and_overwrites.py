"""The command line: values that argparse would take for options, and what the commands write."""

import numpy as np
import pytest

from pypattern.cli import main


@pytest.mark.parametrize(
    "argv, flag, value",
    [
        (["llc", "--step-size", "-1e-4"], "--step-size", "-1e-4"),
        (["llc", "--localization", "-1e3"], "--localization", "-1e3"),
        (["llc", "--nbeta", "-inf"], "--nbeta", "-inf"),
        (["chi", "--nbeta", "-NaN"], "--nbeta", "-NaN"),
        (["llc", "--num-chains", "-1e3"], "--num-chains", "-1e3"),
        (["circuit", "--ig-steps", "-1e2"], "--ig-steps", "-1e2"),
    ],
)
def test_negative_numbers_in_exponent_or_inf_form_are_named_with_what_is_expected(argv, flag, value, capsys):
    argv = argv + ["--model", "m", "--data", "t.npy"] if argv[0] != "circuit" else argv
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: must be" in err, err
    assert repr(value) in err, err
    assert "expected one argument" not in err


@pytest.mark.parametrize(
    "cmd, flag, name, where",
    [
        ("chi", "--data", "chi.csv", "--out"),
        ("llc", "--data", "llc.npz", "--out"),
        ("llc", "--data", "llc_checkpoint.npz", "--checkpoint"),
        ("patch", "--data", "patch_z.csv", "--out"),
        ("patch", "--corrupted", "patch_summary.json", "--out"),
        ("patch", "--data", "patch_resid_pre.npz", "--checkpoint"),
        ("chi", "--data", "component.embed.npz", "--checkpoint"),
        ("circuit", "--data", "circuit.csv", "--out"),
        ("circuit", "--corrupted", "edge_scores.csv", "--out"),
    ],
)
def test_a_token_file_the_command_would_overwrite_is_refused_before_any_work(
    cmd, flag, name, where, tmp_path, capsys
):
    folder = tmp_path / "res"
    folder.mkdir()
    token_file = folder / name
    if name.endswith(".npz"):
        with open(token_file, "wb") as f:
            np.savez(f, tokens=np.array([[1, 2, 3], [4, 5, 6]]))
    else:
        token_file.write_text("1 2 3\n4 5 6\n")
    before = token_file.read_bytes()
    other = tmp_path / "other.txt"
    other.write_text("1 2 3\n4 5 7\n")
    files = {"--data": str(other), "--corrupted": None, flag: str(token_file)}
    argv = [cmd, "--model", str(tmp_path / "no_model")]
    argv += [] if where == "--out" else ["--out", str(tmp_path / "o")]
    argv += [a for k, v in files.items() if v is not None for a in (k, v)]
    argv += [where, str(folder)]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"{flag} {str(token_file)!r} is a file that {cmd} writes into {where} {str(folder)!r}" in err, err
    assert token_file.read_bytes() == before
    # the same name in another folder is read (the run then stops at the missing model)
    argv[argv.index(where) + 1] = str(tmp_path / "elsewhere")
    with pytest.raises(SystemExit):
        main(argv)
    err = capsys.readouterr().err
    assert "no_model" in err and "writes into" not in err, err
