"""The command line's errors: flags checked when parsed (naming the flag), flags refused where they do not apply,
and errors met while running ending in one line `pypattern <command>: error: ...` (exit status 2), not a
traceback. None of these runs a model: each ends before any work."""

import subprocess
import sys

import numpy as np
import pytest

from pypattern import cli


def _fails(argv, capsys) -> str:
    """Run the command, check it exits with status 2 and return stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2, argv
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


M = ["--model", "m", "--data", "d.npy"]  # never read: every case below fails first


@pytest.mark.parametrize("value", ["-1", "0", "2.5", "x"])
@pytest.mark.parametrize(
    "cmd, flag",
    [
        (["patch", *M], "--max-prompts"),
        (["chi", *M], "--num-probe"),
        (["chi", *M], "--batch-size"),
        (["llc", *M], "--batch-size"),
        (["llc", *M], "--num-chains"),
        (["chi", *M], "--num-draws"),
        (["circuit"], "--steps"),
        (["circuit"], "--ig-steps"),
    ],
)
def test_counts_are_positive_integers(cmd, flag, value, capsys):
    err = _fails([*cmd, flag, value], capsys)
    assert f"argument {flag}: must be an integer >= 1, got '{value}'" in err


def test_burn_in_may_be_zero_but_not_negative(capsys):
    err = _fails(["llc", *M, "--num-burnin-steps", "-1"], capsys)
    assert "argument --num-burnin-steps: must be an integer >= 0" in err
    args = cli._parser().parse_args(["llc", *M, "--num-burnin-steps", "0"])
    assert args.num_burnin_steps == 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["patch", *M, "--sites", ""], "argument --sites: give one or more of resid_pre"),
        (["patch", *M, "--sites", " , "], "argument --sites: give one or more of"),
        (["patch", *M, "--sites", "z,resid"], "argument --sites: unknown site(s) resid"),
        (["circuit", "--fraction", "2"], "argument --fraction: must be a number in (0, 1]"),
        (["circuit", "--fraction", "0"], "argument --fraction: must be a number in (0, 1]"),
        (["circuit", "--methods", ""], "argument --methods: give one or more of eap, eap-ig, exact"),
        (["circuit", "--methods", "eap,acdc"], "argument --methods: give one or more of"),
        (["llc", *M, "--step-size", "-1"], "argument --step-size: must be a number > 0 or 'auto'"),
        (["llc", *M, "--localization", "0"], "argument --localization: must be a number > 0"),
        (["chi", *M, "--nbeta", "-3"], "argument --nbeta: must be a number > 0"),
    ],
)
def test_values_are_checked_when_parsed(argv, message, capsys):
    assert message in _fails(argv, capsys)


def test_parsed_lists_and_defaults():
    args = cli._parser().parse_args(["patch", *M, "--sites", "z, resid_pre,z"])
    cli._resolve(cli._parser().commands["patch"], args)
    assert args.sites == ("z", "resid_pre") and args.max_prompts == 8 and args.corrupted is None
    args = cli._parser().parse_args(["llc", *M])
    cli._resolve(cli._parser().commands["llc"], args)
    assert (args.num_chains, args.num_draws, args.num_burnin_steps, args.step_size) == (4, 100, 100, "auto")
    assert args.checkpoint is None and not args.quiet and not args.float64
    args = cli._parser().parse_args(["chi", *M])
    cli._resolve(cli._parser().commands["chi"], args)
    assert (args.num_probe, args.num_draws, args.num_burnin_steps) == (8, 50, 50)


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["llc", "--num-chains", "2", "--nbeta", "3"],
            "--num-chains, --nbeta apply only with --model DIR --data FILE",
        ),
        (["llc", "--num-draws", "5"], "--num-draws applies only with --model DIR --data FILE"),
        (
            ["llc", "--step-size", "1e-4", "--localization", "10", "--seed", "1"],
            "--step-size, --localization apply only with --model DIR --data FILE (not to the built-in demo)",
        ),
        (
            ["llc", "--batch-size", "4", "--num-burnin-steps", "3"],
            "--batch-size, --num-burnin-steps apply only",
        ),
        (["llc", "--checkpoint", "ck", "--float64"], "--float64, --checkpoint apply only with --model"),
        (["patch", "--sites", "z", "--max-prompts", "3"], "--sites, --max-prompts apply only with --model"),
        (["patch", "--corrupted", "c.npy"], "--corrupted applies only with --model DIR --data FILE"),
        (["circuit", "--corrupted", "c.npy"], "--corrupted applies only with --model DIR --data FILE"),
        (["patch", *M, "--quick"], "--quick applies only to the built-in demo"),
        (["llc", *M, "--quick"], "--quick applies only to the built-in demo"),
        (["circuit", *M, "--steps", "3", "--seed", "2"], "--seed, --steps apply only to the built-in task"),
        (["circuit", *M, "--quick"], "--quick applies only to the built-in task"),
        (["circuit", "--quick", "--steps", "5"], "--quick sets the training steps; give --quick or --steps"),
    ],
)
def test_flags_given_where_they_do_not_apply_are_refused(argv, message, capsys):
    err = _fails(argv, capsys)
    assert f"pypattern {argv[0]}: error: {message}" in err


def test_an_existing_file_as_out_or_checkpoint_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --out folder is created in the working directory
    f = tmp_path / "file"
    f.write_text("x")
    for argv in (["llc", "--quick"], ["patch", "--quick"], ["circuit"], ["demo", "cka", "--quick"]):
        err = _fails([*argv, "--out", str(f)], capsys)
        assert f"pypattern {argv[0]}: error: --out {str(f)!r} is an existing file; give a folder" in err
    err = _fails(["llc", *M, "--checkpoint", str(f)], capsys)
    assert "--checkpoint" in err and "is an existing file" in err
    assert f.read_text() == "x"


@pytest.mark.parametrize("below", ["a path below a file", "/proc"])
def test_an_out_folder_that_cannot_be_created_is_refused_before_any_work(
    below, tmp_path, capsys, monkeypatch
):
    """--out (and --checkpoint) below an existing file, or in a file system where no folder can be made, is
    refused naming the flag before any model is read, sampled or trained (each command's work is replaced here
    by a failure)."""
    import pypattern.circuits.cli as circuits_cli
    import pypattern.experiments.user_model as user_model

    def no_work(*args, **kwargs):
        raise AssertionError("work started before --out was checked")

    monkeypatch.setattr(user_model, "_model_and_tokens", no_work)
    monkeypatch.setattr(circuits_cli, "run_circuit_demo", no_work)
    monkeypatch.setattr(cli, "_llc_demo", no_work)
    monkeypatch.setattr(cli, "_patch_demo", no_work)
    f = tmp_path / "file"
    f.write_text("x")
    out = str(f / "sub") if below != "/proc" else "/proc/pypattern-out"
    np.save(tmp_path / "t.npy", np.zeros((2, 3), dtype=np.int64))
    model = ["--model", str(tmp_path), "--data", str(tmp_path / "t.npy")]
    for argv in (
        ["llc", *model],
        ["chi", *model],
        ["patch", *model],
        ["circuit", *model],
        ["llc", "--quick"],
        ["patch", "--quick"],
        ["circuit", "--quick"],
        ["demo", "--quick"],
    ):
        err = _fails([*argv, "--out", out], capsys)
        assert f"pypattern {argv[0]}: error: --out {out!r} cannot be used as a folder to write into" in err, (
            err
        )
    err = _fails(["llc", *model, "--out", str(tmp_path / "o"), "--checkpoint", out], capsys)
    assert f"--checkpoint {out!r} cannot be used as a folder" in err
    assert f.read_text() == "x"


def test_errors_while_running_end_in_one_line_or_a_traceback_with_pypattern_debug(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # the default --out folder is created in the working directory
    np.save(tmp_path / "t.npy", np.zeros((2, 3), dtype=np.int64))
    argv = ["patch", "--model", str(tmp_path / "no-such-model"), "--data", str(tmp_path / "t.npy")]
    argv += ["--out", str(tmp_path / "out")]
    err = _fails(argv, capsys)
    assert err.startswith("pypattern patch: error: ") and err.count("\n") == 1
    assert "no-such-model" in err
    # a token file of an unsupported format: refused before the model is read, in one line
    (tmp_path / "t.pt").write_bytes(b"\x80\x02not a token file")
    err = _fails([*argv[:3], "--data", str(tmp_path / "t.pt")], capsys)
    assert err.startswith("pypattern patch: error: ") and "unsupported token file format '.pt'" in err
    monkeypatch.setenv("PYPATTERN_DEBUG", "1")
    with pytest.raises((ValueError, OSError)):
        cli.main(argv)


def test_circuit_library_errors_end_in_one_line(tmp_path, capsys):
    """A ValueError raised inside the run (here: a prompt file that is not one) is printed in one line."""
    (tmp_path / "cfg").mkdir()
    argv = ["circuit", "--model", str(tmp_path / "cfg"), "--data", str(tmp_path / "p.npz")]
    err = _fails([*argv, "--quiet", "--out", str(tmp_path / "out")], capsys)
    assert err.startswith("pypattern circuit: error: ") and "config.json" in err


def test_llc_demo_shows_progress_unless_quiet(monkeypatch, tmp_path):
    import pypattern.experiments.llc_demo as demo

    seen = []

    def fake(out, **kw):
        seen.append(kw)
        return {"result": "r", "plot": "p"}

    monkeypatch.setattr(demo, "run_llc_demo", fake)
    assert cli.main(["llc", "--out", str(tmp_path)]) == 0
    assert cli.main(["llc", "--quiet", "--out", str(tmp_path)]) == 0
    assert [kw["quiet"] for kw in seen] == [False, True]


def test_a_closed_stdout_ends_quietly():
    """`pypattern backends | head -3`: the reader closes the pipe before the output is written."""
    r = subprocess.Popen(
        [sys.executable, "-m", "pypattern", "backends"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    r.stdout.close()  # before the interpreter has even imported pypattern
    err = r.stderr.read().decode()
    r.wait(timeout=300)
    assert "BrokenPipeError" not in err and "Traceback" not in err, err
    assert r.returncode in (0, 1)


def test_circuit_quick_runs_the_built_in_task(tmp_path, capsys):
    from pypattern.cli import main

    assert main(["circuit", "--quick", "--quiet", "--out", str(tmp_path)]) == 0
    for f in ("edge_scores.csv", "circuit.csv", "pruning_curve.png", "circuit.png"):
        assert (tmp_path / f).stat().st_size > 0


def test_a_model_path_that_is_not_a_directory_and_a_negative_seed_are_named(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --out folder is created in the working directory
    tok = tmp_path / "tok.npy"
    np.save(tok, np.zeros((2, 4), dtype=np.int64))
    err = _fails(["llc", "--model", str(tmp_path / "absent"), "--data", str(tok)], capsys)
    assert "does not exist" in err
    err = _fails(["circuit", "--model", str(tok), "--data", str(tok)], capsys)
    assert "is a file, not a directory" in err
    err = _fails(["llc", "--model", str(tmp_path), "--data", str(tok), "--seed", "-1"], capsys)
    assert "argument --seed" in err


def test_an_empty_text_token_file_is_said_to_be_empty(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --out folder is created in the working directory
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    err = _fails(["llc", "--model", str(tmp_path), "--data", str(empty)], capsys)
    assert "holds no token id" in err


def test_a_token_file_numpy_cannot_read_as_numbers_is_not_offered_for_unpickling(tmp_path):
    """Bytes that are not an array file (or an object array) are refused as such: numpy's own message advised
    loading the file unsafely with allow_pickle, which pypattern never does."""
    from pypattern.circuits.cli import load_prompts
    from pypattern.experiments.user_model import load_tokens

    junk = tmp_path / "junk.npy"
    junk.write_bytes(bytes(range(256)) * 4)
    objects = tmp_path / "objects.npy"
    np.save(objects, np.array([[1, "a"]], dtype=object), allow_pickle=True)
    for path in (junk, objects):
        with pytest.raises(ValueError, match="never loads") as e:
            load_tokens(str(path))
        assert "allow_pickle" not in str(e.value) and "data=" in str(e.value)
    with pytest.raises(ValueError, match="never loads") as e:
        load_prompts(str(objects))
    assert "allow_pickle" not in str(e.value)
    # an .npz archive (the prompt files' format) whose member is an object array: numpy reads members lazily
    member = tmp_path / "member.npz"
    np.savez(member, clean=np.array([[1, "a"]], dtype=object), corrupted=np.zeros((1, 2), dtype=np.int64))
    for load in (load_tokens, load_prompts):
        with pytest.raises(ValueError, match="member 'clean' is not an array of numbers.*never loads") as e:
            load(str(member))
        assert "allow_pickle" not in str(e.value)


@pytest.mark.parametrize("quiet", [True, False])
def test_circuit_quiet_asks_for_no_progress_bar(tmp_path, monkeypatch, quiet):
    """--quiet reaches the exact scoring's progress bar (shown after two seconds otherwise): no bar is asked for;
    without --quiet it is."""
    import contextlib

    import pypattern.circuits.api as api
    from pypattern.cli import main

    asked = []

    @contextlib.contextmanager
    def recording(q, **bar):
        asked.append(q)
        yield None

    monkeypatch.setattr(api, "progress_bar", recording)
    argv = ["circuit", "--quick", "--methods", "exact", "--out", str(tmp_path)] + (
        ["--quiet"] if quiet else []
    )
    assert main(argv) == 0
    assert asked and all(asked) is quiet


@pytest.mark.parametrize("checkpoint", [False, True])
def test_an_interrupt_ends_in_one_line_and_status_130(tmp_path, capsys, monkeypatch, checkpoint):
    """Ctrl-C: one line on stderr (saying how to resume when there is a checkpoint) and exit status 130; the
    traceback with PYPATTERN_DEBUG=1."""

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run", interrupted)
    np.save(tmp_path / "t.npy", np.zeros((2, 3), dtype=np.int64))
    (tmp_path / "m").mkdir()
    argv = [
        "llc",
        "--model",
        str(tmp_path / "m"),
        "--data",
        str(tmp_path / "t.npy"),
        "--out",
        str(tmp_path / "o"),
    ]
    if checkpoint:
        argv += ["--checkpoint", str(tmp_path / "ck")]
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 130
    err = capsys.readouterr().err
    assert err.startswith("pypattern llc: interrupted") and err.count("\n") == 1
    assert ("resumes" in err) is checkpoint
    monkeypatch.setenv("PYPATTERN_DEBUG", "1")
    with pytest.raises(KeyboardInterrupt):
        cli.main(argv)


@pytest.mark.parametrize(
    "argv, flag, what",
    [
        (["demo", "cka", "--quick", "--out", ""], "--out", "folder"),
        (["demo", "--quick", "--out", ""], "--out", "folder"),
        (["llc", "--quick", "--out", ""], "--out", "folder"),
        (["patch", "--quick", "--out", ""], "--out", "folder"),
        (["circuit", "--quick", "--out", ""], "--out", "folder"),
        (["llc", *M, "--out", ""], "--out", "folder"),
        (["chi", *M, "--out", ""], "--out", "folder"),
        (["llc", *M, "--checkpoint", ""], "--checkpoint", "folder"),
        (["chi", *M, "--checkpoint", ""], "--checkpoint", "folder"),
        (["patch", *M, "--corrupted", ""], "--corrupted", "file"),
        (["circuit", *M, "--corrupted", ""], "--corrupted", "file"),
        (["circuit", "--model", "", "--data", "d.npy"], "--model", "directory"),
    ],
)
def test_an_empty_path_is_refused_when_parsed_naming_the_option(
    argv, flag, what, tmp_path, capsys, monkeypatch
):
    """An empty path option is no folder or file: refused before any work (``demo cka --out ''`` would write into
    the filesystem root), naming the option; nothing is written."""
    import pypattern.circuits.cli as circuits_cli
    import pypattern.experiments.equivalence_demo as equivalence_demo
    import pypattern.experiments.user_model as user_model

    def no_work(*args, **kwargs):
        raise AssertionError("work started with an empty path")

    for mod, name in (
        (user_model, "_model_and_tokens"),
        (circuits_cli, "run_circuit_demo"),
        (equivalence_demo, "run_equivalence_demo"),
        (cli, "_llc_demo"),
        (cli, "_patch_demo"),
        (cli, "_demo_sgld"),
    ):
        monkeypatch.setattr(mod, name, no_work)
    monkeypatch.chdir(tmp_path)
    err = _fails(argv, capsys)
    assert f"pypattern {argv[0]}: error: {flag} is empty: give a {what} path" in err
    assert list(tmp_path.iterdir()) == []


def test_the_circuit_module_refuses_an_empty_path_naming_the_option(capsys):
    from pypattern.circuits.cli import main

    for argv, flag in ((["--out", ""], "--out"), (["--model", "m", "--data", ""], "--data")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert f"pypattern circuit: error: {flag} is empty" in capsys.readouterr().err


def test_demo_folders_are_joined_below_out(tmp_path, monkeypatch, capsys):
    """Each demo writes into its folder below --out (joined as a path, so a trailing separator adds none)."""
    import pypattern.experiments.equivalence_demo as equivalence_demo

    seen = []

    def fake(out, settings=None):
        seen.append(out)
        return {}

    monkeypatch.setattr(equivalence_demo, "run_equivalence_demo", fake)
    out = str(tmp_path / "o") + "/"
    assert cli.main(["demo", "cka", "--quick", "--out", out]) == 0
    assert seen == [str(tmp_path / "o" / "cka")]


def test_library_errors_name_the_command_line_options():
    """A library message naming a function's argument (``data='t.npy'``) is printed with the option it came from;
    the same words elsewhere in the message (not followed by a quoted value, or inside another name) stay."""
    from pypattern.cli import _as_flags

    assert (
        _as_flags("data='t.npy': token ids must lie in [0, 5)")
        == "--data 't.npy': token ids must lie in [0, 5)"
    )
    assert _as_flags('corrupted="c.txt" has shape (2, 3)') == '--corrupted "c.txt" has shape (2, 3)'
    assert (
        _as_flags("model_dir='/m' has no config.json; out='/o'")
        == "--model '/m' has no config.json; --out '/o'"
    )
    for kept in ("the data=3 batches", "my_data='x'", "metadata='x'", "data.corrupted='x'", "data = 'x'"):
        assert _as_flags(kept) == kept


def test_seeds_are_checked_when_parsed_in_every_command(capsys):
    """--seed is an int in [0, 2**63) for llc, chi and circuit alike (circuit took -1, and failed on a seed past
    int64 with an overflow message that named no option)."""
    for argv in (["circuit", "--quick"], ["llc"], ["chi", "--model", "m", "--data", "d"]):
        for bad in ("-1", str(2**63), "1.5"):
            with pytest.raises(SystemExit) as e:
                cli.main([*argv, "--seed", bad])
            assert e.value.code == 2
            assert "argument --seed: must be an integer in [0, 2**63)" in capsys.readouterr().err


def test_a_memory_error_is_one_line(monkeypatch, capsys):
    """A run that asks for more memory than there is ends with the one-line error and status 2, not a traceback."""

    def too_big(args):
        raise MemoryError("Unable to allocate 14.6 TiB for an array with shape (2, 1000000000000)")

    monkeypatch.setattr(cli, "_run", too_big)
    with pytest.raises(SystemExit) as e:
        cli.main(["llc"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "pypattern llc: error: Unable to allocate 14.6 TiB" in err
    assert "Traceback" not in err


def test_quiet_turns_off_transformers_progress_bars_for_the_command(monkeypatch):
    """--quiet silences transformers' own bars (loading a model's weights) while the command runs, and leaves
    them as they were after."""
    tf_logging = pytest.importorskip("transformers.utils.logging")
    seen = []
    monkeypatch.setattr(cli, "_run", lambda args: seen.append(tf_logging.is_progress_bar_enabled()) or 0)
    assert tf_logging.is_progress_bar_enabled()
    cli.main(["llc", "--quiet"])
    cli.main(["llc"])
    assert seen == [False, True] and tf_logging.is_progress_bar_enabled()


def test_the_circuit_prompt_file_is_named_by_its_option():
    from pypattern.cli import _as_flags

    assert _as_flags("tokens='p.npz': corrupted equals clean") == "--data 'p.npz': corrupted equals clean"
    assert _as_flags("op='nosuch' is not an operator") == "--op 'nosuch' is not an operator"
