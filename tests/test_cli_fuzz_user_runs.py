"""The command line as a user with a model folder and a token file runs it: chi's draws per chain, the circuit
module run as a program, and resumes refused by patch and circuit naming the options behind them."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from pypattern.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A pypattern model folder (config.json + weights.npz; 1 layer with an MLP, vocabulary 11, 8 positions), a
    token file of 4 prompts of 6 tokens, the same prompts with another id at position 2, and ids out of the
    vocabulary."""
    import pypattern as pp

    root = tmp_path_factory.mktemp("user")
    model = pp.Transformer(
        pp.TransformerConfig(n_layers=1, d_model=8, n_heads=2, d_mlp=16, d_vocab=11, n_ctx=8, seed=3)
    )
    folder = root / "model"
    folder.mkdir()
    cfg = {
        k: (str(v).replace("torch.", "") if isinstance(v, torch.dtype) else v)
        for k, v in dataclasses.asdict(model.cfg).items()
    }
    (folder / "config.json").write_text(json.dumps(cfg))
    np.savez(folder / "weights.npz", **{k: v.detach().numpy() for k, v in model.state_dict().items()})
    tokens = np.random.default_rng(0).integers(0, 11, size=(4, 6))
    np.save(root / "tokens.npy", tokens)
    other = tokens.copy()
    other[:, 2] = (other[:, 2] + 4) % 11
    np.save(root / "corrupted.npy", other)
    np.save(root / "other.npy", other)
    np.save(root / "oov.npy", np.full((2, 6), 11))
    return root


def _error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_chi_needs_two_draws_per_chain_whatever_the_number_of_chains(files, tmp_path, capsys):
    """chi's covariance is over each chain's own draws: --num-draws 1 is refused naming the option, with any
    number of chains (more chains do not help, so the message does not advise them), before any work; two draws
    of one chain run."""
    base = ["chi", "--model", str(files / "model"), "--data", str(files / "tokens.npy"), "--quiet"]
    base += ["--step-size", "1e-4", "--num-burnin-steps", "0", "--num-probe", "2"]
    for chains in ("1", "3"):
        out = tmp_path / f"c{chains}"
        err = _error([*base, "--num-chains", chains, "--num-draws", "1", "--out", str(out)], capsys)
        assert "pypattern chi: error: --num-draws 1 is too few" in err, err
        assert "at least 2 draws per chain" in err and "give --num-draws 2 or more" in err, err
        assert "--num-chains" not in err.split(";")[-1]  # the advice: more draws, not more chains
        assert not out.exists()  # refused as the options are read, before the folder is made
    out = tmp_path / "ok"
    assert main([*base, "--num-chains", "1", "--num-draws", "2", "--out", str(out)]) == 0
    summary = json.loads((out / "chi_summary.json").read_text())
    # the token and position embeddings, 2 heads and the MLP of the 1 layer x 2 probe prompts of 5 next-token
    # positions
    assert summary["components"] == [
        "embed",
        "pos_embed",
        "blocks.0.attn.head.0",
        "blocks.0.attn.head.1",
        "blocks.0.mlp",
    ]
    assert summary["chi_shape"] == [5, 10]
    capsys.readouterr()


def test_the_circuit_module_run_as_a_program_ends_errors_in_one_line(files, tmp_path):
    """``python -m pypattern.circuits.cli`` (the circuit demo's documented command) runs as ``pypattern circuit``:
    an error met while running (ids out of the model's vocabulary) ends in one line and exit status 2, not a
    traceback; a good run writes the tables and prints the summary."""
    import pypattern

    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.path.dirname(os.path.dirname(pypattern.__file__)),
    }
    env.pop("PYPATTERN_DEBUG", None)
    argv = [sys.executable, "-m", "pypattern.circuits.cli", "--model", str(files / "model"), "--quiet"]
    argv += ["--methods", "eap", "--out", str(tmp_path / "out")]
    bad = subprocess.run(
        [*argv, "--data", str(files / "oov.npy")], env=env, capture_output=True, text=True, timeout=300
    )
    assert bad.returncode == 2, bad.stderr
    assert "Traceback" not in bad.stderr
    lines = bad.stderr.strip().splitlines()
    assert lines == [
        f"pypattern circuit: error: --data '{files / 'oov.npy'}': token ids must lie in [0, 11) for this model; "
        "found 11..11"
    ]
    good = subprocess.run(
        [*argv, "--data", str(files / "tokens.npy")], env=env, capture_output=True, text=True, timeout=300
    )
    assert good.returncode == 0, good.stderr
    summary = json.loads((tmp_path / "out" / "circuit_summary.json").read_text())
    # edges of 1 layer, 2 heads, an MLP: embed -> (2 heads x q,k,v + MLP + logits) and each head -> (MLP, logits),
    # MLP -> logits
    assert summary["num_edges"] == 8 + 2 * 2 + 1
    assert f"summary: {tmp_path / 'out' / 'circuit_summary.json'}" in good.stdout


def test_patch_and_circuit_resumes_of_another_run_name_the_options(files, tmp_path, capsys):
    """A patch or circuit checkpoint met by another run is refused (exit 2, one line) saying which options
    are behind the differing item: the prompts, the corrupted prompts, the metric's model or dtype, the ablation,
    the edge graph, the methods scored."""
    model, data = str(files / "model"), str(files / "tokens.npy")
    ck = tmp_path / "patch_ck"
    patch = ["patch", "--model", model, "--quiet", "--sites", "resid_pre", "--checkpoint", str(ck)]
    patch += ["--out", str(tmp_path / "p")]
    assert main([*patch, "--data", data]) == 0
    for change, hint in (
        (["--data", str(files / "other.npy")], "--data or --max-prompts: other prompts"),
        (["--data", data, "--max-prompts", "2"], "--data or --max-prompts: other prompts"),
        (
            ["--data", data, "--corrupted", str(files / "corrupted.npy")],
            "--corrupted: other corrupted prompts, or Gaussian noise (no --corrupted) against a file",
        ),
        (["--data", data, "--float64"], "--model or --float64: other weights or another dtype"),
    ):
        err = _error([*patch, *change], capsys)
        assert "was written by a different run" in err, err
        assert f"(on the command line: {hint}" in err, (change, err)

    ck = tmp_path / "circuit_ck"
    circuit = ["circuit", "--model", model, "--quiet", "--checkpoint", str(ck), "--out", str(tmp_path / "c")]
    both = ["--methods", "eap,exact"]
    assert main([*circuit, *both, "--data", data]) == 0
    first = (tmp_path / "c" / "edge_scores.csv").read_text()
    assert main([*circuit, *both, "--data", data]) == 0  # the same run: read back, the same table
    assert (tmp_path / "c" / "edge_scores.csv").read_text() == first
    for change, hint in (
        ([*both, "--data", str(files / "other.npy")], "--data: other prompts"),
        (
            [*both, "--data", data, "--corrupted", str(files / "corrupted.npy")],
            "--corrupted or --data: corrupted prompts (resample ablation) against none (mean ablation)",
        ),
        ([*both, "--data", data, "--per-position", "yes"], "--per-position or --model: another edge graph"),
        (["--methods", "exact", "--data", data], "--methods or --ig-steps: other methods' scores"),
    ):
        err = _error([*circuit, *change], capsys)
        assert "was written by a different run" in err, err
        assert f"(on the command line: {hint}" in err, (change, err)
        assert "--float64" not in err.split("(on the command line:")[-1]  # circuit takes no --float64
    capsys.readouterr()


def test_sampler_warnings_name_the_command_line_options():
    """A sampler warning printed by a sampling command names the options the command takes (``num_burnin_steps``
    as ``--num-burnin-steps``, ``step_size=1e-06`` as ``--step-size 1e-06``, ``step_size='auto'`` as ``--step-size
    auto``) and marks the library's settings the command line lacks; a command without such an option keeps the
    library's name."""
    from pypattern.cli import _warning_as_flags

    opts = {"--num-burnin-steps", "--num-draws", "--step-size", "--localization"}
    msg = (
        "step_size=1e-06 is too small: use more burn-in steps (num_burnin_steps) or draws (num_draws), a larger "
        "step_size, or step_size='auto'; more draws between them (num_steps_bw_draws); warn_nonstationary=False "
        "silences this (see calibrate_step_size); localization=100 held them"
    )
    assert _warning_as_flags(msg, opts) == (
        "--step-size 1e-06 is too small: use more burn-in steps (--num-burnin-steps) or draws (--num-draws), a "
        "larger --step-size, or --step-size auto; more draws between them (num_steps_bw_draws [a library setting, "
        "no option]); warn_nonstationary=False [a library setting, no option] silences this (see "
        "calibrate_step_size [a library function, no option]); --localization 100 held them"
    )
    assert _warning_as_flags("raise num_draws", {"--num-burnin-steps"}) == "raise num_draws"
