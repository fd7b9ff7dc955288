"""`pypattern llc|patch|chi --model DIR --data FILE` on a local save_pretrained directory and a token file."""

import json
import re

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from pypattern.cli import main  # noqa: E402
from pypattern.experiments.user_model import load_tokens  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    cfg = transformers.LlamaConfig(
        vocab_size=23,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d, safe_serialization=True)
    return d


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 23, size=(8, 7))
    np.save(d / "tokens.npy", tokens)
    corrupted = tokens.copy()
    corrupted[:, 2] = (corrupted[:, 2] + 5) % 23
    np.save(d / "corrupted.npy", corrupted)
    (d / "tokens.txt").write_text("\n".join(" ".join(map(str, r)) for r in tokens))
    return d, tokens


def test_token_files(data, tmp_path):
    d, tokens = data
    assert torch.equal(load_tokens(d / "tokens.npy"), torch.from_numpy(tokens))
    assert torch.equal(load_tokens(d / "tokens.txt"), torch.from_numpy(tokens))
    np.savez(tmp_path / "t.npz", tokens=tokens)
    assert torch.equal(load_tokens(tmp_path / "t.npz"), torch.from_numpy(tokens))
    with pytest.raises(ValueError, match=r"\[0, 20\)"):
        load_tokens(d / "tokens.npy", vocab_size=20)
    with pytest.raises(ValueError, match="n_ctx"):
        load_tokens(d / "tokens.npy", n_ctx=5)
    (tmp_path / "neg.txt").write_text("1 2 3\n4 5 -1\n")  # checked before the model's vocabulary is known
    with pytest.raises(ValueError, match=r"token ids must be >= 0; found -1\.\.5"):
        load_tokens(tmp_path / "neg.txt")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="obj.npy"):  # never unpickled
        load_tokens(tmp_path / "obj.npy")
    (tmp_path / "ragged.txt").write_text("1 2 3\n4 5\n")
    with pytest.raises(ValueError, match="ragged"):
        load_tokens(tmp_path / "ragged.txt")
    # a flat stream of ids is not read as one sequence: (num_sequences, seq_len) is expected
    np.save(tmp_path / "flat.npy", tokens.ravel())
    np.savez(tmp_path / "flat.npz", tokens=tokens.ravel())
    for name in ("flat.npy", "flat.npz"):
        with pytest.raises(
            ValueError, match=r"data='.*flat\.np[yz]' holds a 1-D array of 56 ids; expected \(num_seq"
        ):
            load_tokens(tmp_path / name)
    # past the positions a LongRoPE / dynamic NTK scaling holds for
    with pytest.raises(
        ValueError, match=r"sequences have 7 tokens; the model's rotary scaling .* holds for 6 positions"
    ):
        load_tokens(d / "tokens.npy", rotary_limit=6)
    assert load_tokens(d / "tokens.npy", rotary_limit=7).shape == (8, 7)


def test_data_beyond_a_dynamic_rotary_scaling_is_refused_when_read(data, tmp_path, capsys, monkeypatch):
    """A dynamic-NTK Llama holds its frequencies for original_max_position_embeddings positions (the forward
    refuses later ones): --data (and --corrupted) with longer sequences is refused when the file is read, naming
    it, before any forward; a 1-D --data is refused naming (num_sequences, seq_len)."""
    import pypattern.patching as patching

    cfg = transformers.LlamaConfig(
        vocab_size=23, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=6, rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "dyn", safe_serialization=True)
    d, tokens = data  # sequences of 7 tokens
    np.save(tmp_path / "short.npy", tokens[:, :6])

    def no_forward(*args, **kwargs):
        raise AssertionError("the model ran before --data was checked")

    monkeypatch.setattr(patching, "activation_patching", no_forward)
    base = ["--model", str(tmp_path / "dyn"), "--out", str(tmp_path / "o")]
    for cmd in (["patch"], ["circuit"], ["llc", "--num-draws", "3"], ["chi", "--num-draws", "3"]):
        err = _err([*cmd, *base, "--data", str(d / "tokens.npy")], capsys)
        assert (
            f"error: --data {str(d / 'tokens.npy')!r}: sequences have 7 tokens; the model's rotary scaling"
            in err
        )
        assert "holds for 6 positions" in err and "Traceback" not in err
    for cmd in ("patch", "circuit"):
        err = _err(
            [cmd, *base, "--data", str(tmp_path / "short.npy"), "--corrupted", str(d / "tokens.npy")], capsys
        )
        assert "error: --corrupted '" in err and "sequences have 7 tokens; the model's rotary scaling" in err
    np.save(tmp_path / "flat.npy", tokens.ravel())
    err = _err(["patch", *base, "--data", str(tmp_path / "flat.npy")], capsys)
    assert "holds a 1-D array of 56 ids; expected (num_sequences, seq_len)" in err


def test_llc_on_user_model(model_dir, data, tmp_path, capsys):
    d, _ = data
    out = tmp_path / "llc"
    args = ["llc", "--model", str(model_dir), "--data", str(d / "tokens.npy"), "--out", str(out)]
    # a given step (the default "auto" calibrates first: tests/test_auto_step.py covers it)
    assert (
        main(args + ["--num-chains", "2", "--num-draws", "5", "--batch-size", "4", "--step-size", "1e-4"])
        == 0
    )
    summary = json.loads((out / "llc_summary.json").read_text())
    assert np.isfinite(summary["llc_mean"]) and len(summary["llc_per_chain"]) == 2
    assert summary["step_size"] == 1e-4 and summary["auto_step"] is None
    printed = capsys.readouterr().out
    assert "LLC of" in printed and "step_size: 0.0001" in printed
    with pytest.raises(SystemExit):
        main(args + ["--step-size", "fast"])
    from pypattern import LLCResult

    saved = LLCResult.load(out / "llc.npz")
    assert saved.llc_mean == pytest.approx(summary["llc_mean"]) and saved.llc_se == pytest.approx(
        summary["llc_se"]
    )
    assert f"+- {summary['llc_se']:.2g} (standard error" in printed


def test_patch_on_user_model_equals_patching_the_converted_model(model_dir, data, tmp_path, capsys):
    d, tokens = data
    out = tmp_path / "patch"
    args = ["patch", "--model", str(model_dir), "--data", str(d / "tokens.npy"), "--out", str(out)]
    assert main(args + ["--corrupted", str(d / "corrupted.npy"), "--sites", "resid_pre,z"]) == 0
    summary = json.loads((out / "patch_summary.json").read_text())
    assert set(summary["sites"]) == {"resid_pre", "z"}
    assert summary["corruption"] == {"corrupted": str(d / "corrupted.npy")}
    import pypattern
    from pypattern.patching import KL

    model = pypattern.from_pretrained(model_dir)
    clean, corr = torch.from_numpy(tokens), torch.from_numpy(np.load(d / "corrupted.npy"))
    ref = pypattern.activation_patching(model, "resid_pre", clean, corr, metric=KL())
    rows = (out / "patch_resid_pre.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + ref.values[0].numel()  # header + one row per cell
    # the largest effects are the table's: normalised (1 = the clean run restored), and said to be
    assert summary["sites"]["resid_pre"]["normalized"]
    top = summary["sites"]["resid_pre"]["top"][0][1]
    assert top == pytest.approx(float(ref.top(1, normalized=True)[0][1]), rel=1e-5, abs=1e-7)
    means = [float(r.split(",")[rows[0].split(",").index("mean")]) for r in rows[1:]]
    assert top == pytest.approx(max(means, key=abs), rel=1e-5, abs=1e-7)
    assert "largest effects (normalised: 1 = clean run restored, as in the table)" in capsys.readouterr().out
    assert float(ref.values.abs().max()) > 0  # the patch acted


def test_chi_on_user_model(model_dir, data, tmp_path):
    d, _ = data
    out = tmp_path / "chi"
    args = ["chi", "--model", str(model_dir), "--data", str(d / "tokens.txt"), "--out", str(out)]
    assert (
        main(
            args
            + [
                "--num-chains",
                "2",
                "--num-draws",
                "4",
                "--num-probe",
                "2",
                "--batch-size",
                "4",
                "--step-size",
                "1e-4",
            ]
        )
        == 0
    )
    summary = json.loads((out / "chi_summary.json").read_text())
    # 2 layers x (4 heads + 2 shared kv heads + mlp) + embed
    assert summary["chi_shape"] == [1 + 2 * (4 + 2 + 1), 2 * 6]
    # one row per component, named in the first column; one column per probe token
    lines = (out / "chi.csv").read_text().splitlines()
    assert lines[0].split(",")[:3] == ["component", "s0p1", "s0p2"] and len(lines) == 1 + 15
    assert [r.split(",")[0] for r in lines[1:]] == summary["components"]
    chi = np.array([[float(v) for v in r.split(",")[1:]] for r in lines[1:]])
    assert chi.shape == tuple(summary["chi_shape"])
    assert np.isfinite(chi).all() and np.abs(chi).max() > 0


def test_llc_on_a_bfloat16_checkpoint_samples_its_float32_copy(model_dir, data, tmp_path):
    """Checkpoints are mostly saved in bfloat16, and the samplers move float32 / float64 parameters: the command
    samples the exactly upcast float32 copy (with a warning) instead of failing inside the sampler."""
    d, _ = data
    bf16 = tmp_path / "bf16"
    transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).save_pretrained(bf16)
    out = tmp_path / "llc"
    args = [
        "llc",
        "--model",
        str(bf16),
        "--data",
        str(d / "tokens.npy"),
        "--out",
        str(out),
        "--num-chains",
        "1",
    ]
    with pytest.warns(UserWarning, match=r"torch\.bfloat16 weights .* sampling its float32 copy"):
        assert main(args + ["--num-draws", "3", "--step-size", "1e-4"]) == 0
    assert np.isfinite(json.loads((out / "llc_summary.json").read_text())["llc_mean"])


def test_user_commands_need_both_model_and_data(data, model_dir, capsys):
    d, _ = data
    for argv, need in [
        (["llc", "--data", str(d / "tokens.npy")], "--data needs --model DIR"),
        (["patch", "--model", str(model_dir)], "--model needs --data FILE"),
        (["circuit", "--model", str(model_dir)], "--model needs --data FILE"),
        (["circuit", "--data", str(d / "tokens.npy")], "--data needs --model DIR"),
        (["llc", "--model", str(model_dir), "--data", ""], "--data is empty: give a file path"),
        (["circuit", "--model", str(model_dir), "--data", ""], "--data is empty: give a file path"),
        (
            ["patch", "--model", "", "--data", str(d / "tokens.npy")],
            "--model is empty: give a directory path",
        ),
    ]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert f"pypattern {argv[0]}: error: {need}" in capsys.readouterr().err


def test_patch_on_gemma2_and_circuit_refused_in_one_line(data, tmp_path, capsys):
    """A Gemma 2 directory: `patch` runs (exact grids through the sandwich norms); `circuit` ends with the reason
    edges are not defined there, as a one-line message rather than a traceback."""
    d, _ = data
    cfg = transformers.Gemma2Config(
        vocab_size=23,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=4,
        max_position_embeddings=16,
        sliding_window=3,
    )
    torch.manual_seed(0)
    model_dir = tmp_path / "gemma2"
    transformers.Gemma2ForCausalLM(cfg).save_pretrained(model_dir, safe_serialization=True)
    out = tmp_path / "out"
    argv = ["--model", str(model_dir), "--data", str(d / "tokens.npy"), "--out", str(out)]
    assert main(["patch", *argv, "--sites", "resid_pre,z"]) == 0
    summary = json.loads((out / "patch_summary.json").read_text())
    assert set(summary["sites"]) == {"resid_pre", "z"}
    assert summary["corruption"] == {"gaussian_noise": {"std_multiplier": 3.0, "seed": 0}}  # no --corrupted
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["circuit", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "pypattern circuit: error: use_normalization_before_and_after=True" in err
    assert "Traceback" not in err


def test_token_file_formats_refused_with_a_clear_message(data, tmp_path):
    """Only .npy, .npz and text are read; a zip archive named .npy (torch.save output) is refused; nothing is
    unpickled."""
    d, tokens = data
    np.savetxt(tmp_path / "t.csv", tokens, fmt="%d", delimiter=",")
    assert torch.equal(load_tokens(tmp_path / "t.csv"), torch.from_numpy(tokens))
    for suffix in (".pt", ".json", ".safetensors"):
        (tmp_path / f"t{suffix}").write_bytes(b"\x80\x02 anything")
        with pytest.raises(
            ValueError, match=f"unsupported token file format '\\{suffix}': give .npy, .npz or a text"
        ):
            load_tokens(tmp_path / f"t{suffix}")
    torch.save(torch.from_numpy(tokens), tmp_path / "saved.npy")  # a zip archive holding a pickle
    with pytest.raises(ValueError, match=r"saved\.npy.*a zip archive but not NumPy's \.npy or \.npz"):
        load_tokens(tmp_path / "saved.npy")
    torch.save(torch.from_numpy(tokens), tmp_path / "saved.npz")
    with pytest.raises(ValueError, match="a zip archive but not NumPy's"):
        load_tokens(tmp_path / "saved.npz")
    np.savez(tmp_path / "renamed.npy", tokens=tokens)  # np.savez adds .npz: rename it .npy
    (tmp_path / "renamed.npy.npz").rename(tmp_path / "renamed.npy")
    assert torch.equal(load_tokens(tmp_path / "renamed.npy"), torch.from_numpy(tokens))
    (tmp_path / "f.txt").write_text("1 2 3\n4 5.5 6\n")
    with pytest.raises(ValueError, match=r"line 2: '5\.5' is not an integer token id"):
        load_tokens(tmp_path / "f.txt")
    # decimal ASCII digits only: Python's int() would read these as ids
    for token in ("1_0", "+1", "\u0661", "１"):
        (tmp_path / "g.txt").write_text(f"1 2 3\n4 {token} 6\n", encoding="utf-8")
        with pytest.raises(ValueError, match=re.escape(f"line 2: '{token}' is not an integer token id")):
            load_tokens(tmp_path / "g.txt")
    (tmp_path / "neg.txt").write_text("1 2 3\n4 -5 6\n")
    with pytest.raises(ValueError, match="token ids must be >= 0; found -5"):
        load_tokens(tmp_path / "neg.txt")
    # an id past int64 is named (it was "Python int too large to convert to C long")
    (tmp_path / "big.txt").write_text("1 2 3\n4 99999999999999999999999 6\n")
    with pytest.raises(
        ValueError, match=r"it holds the id 99999999999999999999999; token ids must lie below 2\*\*63"
    ):
        load_tokens(tmp_path / "big.txt")


def test_patch_and_circuit_run_a_bfloat16_checkpoint_as_its_float32_copy(model_dir, data, tmp_path):
    """Effects computed in bfloat16 are mostly rounding noise: `patch` and `circuit` upcast (with a warning) as
    `llc` and `chi` do, and give the float32 copy's results."""
    d, tokens = data
    bf16 = tmp_path / "bf16"
    transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).save_pretrained(bf16)
    out = tmp_path / "patch"
    argv = ["patch", "--model", str(bf16), "--data", str(d / "tokens.npy"), "--out", str(out)]
    # named as --model, as the errors name it (llc and chi warn alike)
    with pytest.warns(
        UserWarning,
        match=rf"^--model {re.escape(repr(str(bf16)))} holds torch\.bfloat16 weights .* patching its float32",
    ):
        assert main([*argv, "--corrupted", str(d / "corrupted.npy"), "--sites", "resid_pre"]) == 0
    import pypattern
    from pypattern.patching import KL

    model = pypattern.from_pretrained(bf16, dtype=torch.float32)
    clean, corr = torch.from_numpy(tokens), torch.from_numpy(np.load(d / "corrupted.npy"))
    ref = pypattern.activation_patching(model, "resid_pre", clean, corr, metric=KL())
    top = json.loads((out / "patch_summary.json").read_text())["sites"]["resid_pre"]["top"][0][1]
    assert top == pytest.approx(float(ref.top(1, normalized=True)[0][1]), rel=1e-5, abs=1e-7)
    out = tmp_path / "circuit"
    argv = ["circuit", "--model", str(bf16), "--data", str(d / "tokens.npy"), "--out", str(out), "--quiet"]
    with pytest.warns(
        UserWarning,
        match=rf"^--model {re.escape(repr(str(bf16)))} holds torch\.bfloat16 weights .* scoring its float32",
    ):
        assert main([*argv, "--methods", "eap"]) == 0


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A GPT-2 of context 8 (learned positions: prompts longer than 8 do not fit)."""
    d = tmp_path_factory.mktemp("gpt2")
    cfg = transformers.GPT2Config(vocab_size=23, n_embd=16, n_layer=1, n_head=2, n_positions=8)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(d, safe_serialization=True)
    return d


def test_circuit_prompt_files_are_checked(gpt2_dir, tmp_path, capsys):
    """An .npz of prompts: integer arrays only (never truncated), answers in the vocabulary and one per prompt,
    clean and corrupted of one shape, prompts within the context; each refused in one line naming the array."""
    rng = np.random.default_rng(0)
    clean = rng.integers(0, 23, size=(4, 6))
    corr = clean.copy()
    corr[:, 2] = (corr[:, 2] + 1) % 23
    ans = rng.integers(0, 23, size=4)
    good = dict(clean=clean, corrupted=corr, answer=ans, wrong=(ans + 1) % 23)
    cases = {
        "float": (
            dict(good, clean=clean + 0.5),
            "'clean' holds float64 values; token ids must be an integer",
        ),
        "float_answer": (dict(good, answer=ans.astype(np.float32)), "'answer' holds float32 values"),
        "oov_answer": (dict(good, answer=ans + 30), r"answer ids must lie in \[0, 23\) for this model"),
        "negative_wrong": (dict(good, wrong=ans - 30), r"wrong ids must lie in \[0, 23\)"),
        "oov_clean": (dict(good, clean=clean + 20), r"clean ids must lie in \[0, 23\)"),
        "short_answer": (
            dict(good, answer=ans[:3]),
            r"answer has shape \(3,\); it needs one id per prompt \(4,\)",
        ),
        "2d_answer": (dict(good, answer=ans[:, None]), r"'answer' must be a non-empty \(batch,\) array"),
        "shape": (dict(good, corrupted=corr[:, :5]), r"corrupted has shape \(4, 5\); it must match clean's"),
        "long": (
            dict(good, clean=rng.integers(0, 23, (4, 9)), corrupted=rng.integers(0, 23, (4, 9))),
            "prompts have 9 tokens; the model's n_ctx is 8",
        ),
    }
    from pypattern.circuits.cli import load_prompts

    for name, (arrays, message) in cases.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, **arrays)
        with pytest.raises(ValueError, match=message):
            load_prompts(str(path), vocab_size=23, n_ctx=8)
        argv = [
            "circuit",
            "--model",
            str(gpt2_dir),
            "--data",
            str(path),
            "--out",
            str(tmp_path / "o"),
            "--quiet",
        ]
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "\npypattern circuit: error: --data " in "\n" + err and "Traceback" not in err, name
    np.savez(tmp_path / "good.npz", **good)
    clean_t, corr_t, _ = load_prompts(str(tmp_path / "good.npz"), vocab_size=23, n_ctx=8)
    assert torch.equal(clean_t, torch.from_numpy(clean)) and torch.equal(corr_t, torch.from_numpy(corr))


def test_circuit_on_user_model_shows_progress_unless_quiet(model_dir, data, tmp_path, capsys):
    d, _ = data
    argv = ["circuit", "--model", str(model_dir), "--data", str(d / "tokens.npy"), "--methods", "eap,exact"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "circuit: eap: scored" in err and "circuit: exact: scored" in err and "pruning curve" in err
    assert main([*argv, "--out", str(tmp_path / "b"), "--quiet"]) == 0
    assert "circuit:" not in capsys.readouterr().err


def test_counts_larger_than_the_data_are_warned_of_and_use_all(model_dir, data, tmp_path):
    d, tokens = data  # 8 sequences
    out = tmp_path / "patch"
    argv = ["patch", "--model", str(model_dir), "--data", str(d / "tokens.npy"), "--out", str(out)]
    with pytest.warns(
        UserWarning, match="--max-prompts 100 is more than the 8 sequences in --data: patching all 8"
    ):
        assert main([*argv, "--sites", "resid_pre", "--max-prompts", "100"]) == 0
    assert json.loads((out / "patch_summary.json").read_text())["prompts"] == 8
    # on the command line the warning is one line, as the command's own
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "pypattern", *argv, "--sites", "z", "--max-prompts", "100"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr
    assert "\npypattern patch: warning: --max-prompts 100 is more than the 8 sequences" in "\n" + r.stderr
    assert "UserWarning" not in r.stderr


def test_llc_one_chain_progress_burn_in_and_checkpoint(model_dir, data, tmp_path, capsys, monkeypatch):
    """Progress bars by default (--quiet silences them); burn-in steps by default and settable; with one chain
    the estimate alone (no '+- nan'); --checkpoint resumes a killed run to the uninterrupted run's result and
    refuses a run with other settings."""
    d, _ = data
    monkeypatch.setattr("pypattern._progress.BAR_DELAY_S", 0.0)  # the bars of this short run shown at once
    argv = ["llc", "--model", str(model_dir), "--data", str(d / "tokens.npy"), "--step-size", "1e-4"]
    argv += ["--num-chains", "1", "--num-draws", "6"]
    assert main([*argv, "--out", str(tmp_path / "plain")]) == 0
    out, err = capsys.readouterr()
    assert "SGLD" in err  # the sampler's progress bar
    assert "nan" not in out and "1 chain: no standard error" in out and "burn-in 100 steps" in out
    # standard JSON: the standard deviation and error of one chain, undefined, are null (no bare NaN)
    text = (tmp_path / "plain" / "llc_summary.json").read_text()
    plain = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in llc_summary.json"))
    assert plain["llc_std"] is None and plain["llc_se"] is None and len(plain["llc_per_chain"]) == 1
    assert plain["num_burnin_steps"] == 100
    from pypattern import LLCResult

    assert LLCResult.load(tmp_path / "plain" / "llc.npz").sample.config["num_burnin_steps"] == 100

    # killed after a few steps: the same command resumes from the checkpoint, to the same result
    import pypattern.sampling as sampling

    real = sampling.estimate_llc

    class Killed(KeyboardInterrupt):
        pass

    def killed_after(*a, **kw):
        n = {"calls": 0}

        def cb(*_, **__):
            n["calls"] += 1
            if n["calls"] == 3:  # after 3 of the 6 draws
                raise Killed()

        return real(*a, callbacks=[cb], **kw)

    ck = tmp_path / "ck"
    monkeypatch.setattr(sampling, "estimate_llc", killed_after)
    with pytest.raises(SystemExit) as e:
        main([*argv, "--out", str(tmp_path / "ck_out"), "--checkpoint", str(ck), "--quiet"])
    assert e.value.code == 130
    assert f"the same command with --checkpoint {ck} resumes" in capsys.readouterr().err
    assert (ck / "llc_checkpoint.npz").exists()
    monkeypatch.setattr(sampling, "estimate_llc", real)
    assert main([*argv, "--out", str(tmp_path / "ck_out"), "--checkpoint", str(ck), "--quiet"]) == 0
    assert "SGLD" not in capsys.readouterr().err
    resumed = json.loads((tmp_path / "ck_out" / "llc_summary.json").read_text())
    assert resumed["llc_per_chain"] == pytest.approx(plain["llc_per_chain"], rel=1e-6)
    # another run with this checkpoint is refused, in one line
    with pytest.raises(SystemExit) as e:
        main([*argv, "--num-burnin-steps", "5", "--out", str(tmp_path / "o2"), "--checkpoint", str(ck)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "pypattern llc: error: checkpoint" in err and "different run" in err and "Traceback" not in err
    # another batch size changes the default nbeta: the refusal names it and says why
    with pytest.raises(SystemExit) as e:
        main([*argv, "--batch-size", "2", "--out", str(tmp_path / "o3"), "--checkpoint", str(ck)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "different run: nbeta" in err and "a changed --batch-size changes it" in err


def test_chi_burn_in_checkpoint_and_probe_count(model_dir, data, tmp_path, capsys, monkeypatch):
    d, _ = data
    monkeypatch.setattr("pypattern._progress.BAR_DELAY_S", 0.0)  # the bars of this short run shown at once
    argv = ["chi", "--model", str(model_dir), "--data", str(d / "tokens.npy"), "--step-size", "1e-4"]
    argv += ["--num-chains", "2", "--num-draws", "3", "--num-burnin-steps", "7", "--num-probe", "100"]
    ck = tmp_path / "ck"
    with pytest.warns(
        UserWarning, match="--num-probe 100 is more than the 8 sequences in --data: probing all 8"
    ):
        assert main([*argv, "--out", str(tmp_path / "a"), "--checkpoint", str(ck)]) == 0
    a = json.loads((tmp_path / "a" / "chi_summary.json").read_text())
    assert a["num_burnin_steps"] == 7 and a["chi_shape"][1] == 8 * 6
    assert "SGLD" in capsys.readouterr().err
    assert any(f.name.startswith("component.") for f in ck.iterdir())
    assert main([*argv, "--out", str(tmp_path / "b"), "--checkpoint", str(ck), "--quiet"]) == 0  # reloaded
    assert (tmp_path / "a" / "chi.csv").read_text() == (tmp_path / "b" / "chi.csv").read_text()
    with pytest.raises(SystemExit) as e:
        main([*argv[:-4], "--num-burnin-steps", "8", "--out", str(tmp_path / "c"), "--checkpoint", str(ck)])
    assert e.value.code == 2
    assert "different run" in capsys.readouterr().err
    # a value given that equals the sampler's default (which the fingerprint leaves out) is shown as the value
    other = [v if v != "3" else "200" for v in argv]
    with pytest.raises(SystemExit) as e:
        main([*other, "--out", str(tmp_path / "c"), "--checkpoint", str(ck), "--quiet"])
    assert e.value.code == 2
    assert "num_draws = 3 there, 200 (the default) now" in capsys.readouterr().err
    # a fingerprint item named by the library is told by the option behind it
    with pytest.raises(SystemExit) as e:
        main(
            [*argv[:-2], "--num-probe", "4", "--out", str(tmp_path / "c"), "--checkpoint", str(ck), "--quiet"]
        )
    assert e.value.code == 2
    assert "(on the command line: --num-probe or --data" in capsys.readouterr().err


def test_corrupted_files_are_named_and_checked_before_the_prompt_cut(model_dir, data, tmp_path, capsys):
    """Errors in the --corrupted file name corrupted=; its shape is compared with the data's whole file, before
    --max-prompts cuts both; a text file with an id past int64 or a byte-order mark is read or refused cleanly; a
    site the model does not have (resid_mid with attention and MLP in parallel) is refused, not skipped."""
    d, tokens = data
    bad = tokens.copy()
    bad[0, 0] = 99
    np.save(tmp_path / "bad.npy", bad)
    np.save(tmp_path / "long.npy", np.concatenate([tokens, tokens]))
    argv = ["--model", str(model_dir), "--data", str(d / "tokens.npy"), "--out", str(tmp_path / "o")]
    for corr, match in (
        ("bad.npy", "--corrupted '.*bad.npy': token ids must lie"),
        ("long.npy", r"\(16, 7\)"),
    ):
        for cmd in ("patch", "circuit"):
            with pytest.raises(SystemExit) as e:
                main(
                    [
                        cmd,
                        *argv,
                        "--corrupted",
                        str(tmp_path / corr),
                        *(["--max-prompts", "4"] if cmd == "patch" else []),
                    ]
                )
            assert e.value.code == 2
            err = capsys.readouterr().err
            assert f"pypattern {cmd}: error:" in err and "Traceback" not in err
            assert re.search(match, err), err
    (tmp_path / "big.txt").write_text("1 2 99999999999999999999999\n")
    with pytest.raises(ValueError, match="data='.*big.txt': cannot read token ids"):
        load_tokens(tmp_path / "big.txt")
    (tmp_path / "bom.txt").write_text("\ufeff1 2 3\n4 5 6\n", encoding="utf-8")
    assert load_tokens(tmp_path / "bom.txt").tolist() == [[1, 2, 3], [4, 5, 6]]
    neox = tmp_path / "neox"
    cfg = transformers.GPTNeoXConfig(
        vocab_size=23,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
    )
    transformers.GPTNeoXForCausalLM(cfg).save_pretrained(neox, safe_serialization=True)
    with pytest.raises(SystemExit) as e:
        main(["patch", "--model", str(neox), "--data", str(d / "tokens.npy"), "--out", str(tmp_path / "n"),
              "--sites", "resid_pre,resid_mid"])  # fmt: skip
    assert e.value.code == 2
    assert "'resid_mid' does not exist in this model" in capsys.readouterr().err


def test_checkpoint_folder_resumes_only_the_same_token_sequences(model_dir, data, tmp_path, capsys):
    """The checkpoint's fingerprint holds every sequence: a file that differs in its last sequence is refused; the
    same tokens from another file format resume."""
    d, tokens = data
    other = tokens.copy()
    other[-1, -1] = (other[-1, -1] + 1) % 23
    np.save(tmp_path / "other.npy", other)
    ck = tmp_path / "ck"
    argv = ["llc", "--model", str(model_dir), "--num-chains", "1", "--num-draws", "3", "--step-size", "1e-4",
            "--checkpoint", str(ck), "--quiet"]  # fmt: skip
    assert main([*argv, "--data", str(d / "tokens.npy"), "--out", str(tmp_path / "a")]) == 0
    assert (
        main([*argv, "--data", str(d / "tokens.txt"), "--out", str(tmp_path / "b")]) == 0
    )  # the same tokens
    with pytest.raises(SystemExit) as e:
        main([*argv, "--data", str(tmp_path / "other.npy"), "--out", str(tmp_path / "c")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "pypattern llc: error: checkpoint" in err and "data = " in err and "Traceback" not in err


def test_llc_data_is_a_shuffled_loader_whose_short_batch_chains_skip(model_dir, tmp_path):
    """Nine sequences in batches of 8: L_n(w*) is the loss over all nine (the short batch weighted by its one
    sequence), as estimate_llc gives on a shuffled DataLoader of the same tokens and seed."""
    import pypattern as pp
    from pypattern import LLCResult
    from pypattern.losses import batch_loss

    tokens = np.random.default_rng(3).integers(0, 23, size=(9, 7))
    np.save(tmp_path / "nine.npy", tokens)
    argv = ["llc", "--model", str(model_dir), "--data", str(tmp_path / "nine.npy"), "--num-chains", "2",
            "--num-draws", "3", "--num-burnin-steps", "2", "--step-size", "1e-4", "--quiet"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    res = LLCResult.load(tmp_path / "a" / "llc.npz")
    model = pp.from_pretrained(model_dir).float()
    t = torch.from_numpy(tokens)
    with torch.no_grad():
        naive = float(batch_loss(model, t))  # equal lengths: every sequence weighs the same
    assert res.init_loss == pytest.approx(naive, rel=1e-5)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(t), batch_size=8, shuffle=True)
    cfg = res.sample.config  # the command's own localization and nbeta
    api = pp.estimate_llc(
        model, loader, loss_fn=batch_loss, num_chains=2, num_draws=3, num_burnin_steps=2, step_size=1e-4,
        localization=cfg["localization"], nbeta=cfg["nbeta"], seed=0, quiet=True, warn_nonstationary=False,
    )  # fmt: skip
    np.testing.assert_allclose(np.asarray(res.llc_per_chain), np.asarray(api.llc_per_chain), rtol=1e-5)


def _err(argv, capsys) -> str:
    """The one-line error of a refused command (exit status 2)."""
    code = None
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    assert code == 2
    return capsys.readouterr().err


def test_patch_refuses_corrupted_prompts_equal_to_the_clean_ones(model_dir, data, tmp_path, capsys):
    d, _ = data
    err = _err(["patch", "--model", str(model_dir), "--data", str(d / "tokens.npy"), "--corrupted",
                str(d / "tokens.npy"), "--out", str(tmp_path)], capsys)  # fmt: skip
    assert "equals data on the 8 prompts patched" in err
    assert not (tmp_path / "patch_summary.json").exists()


def _native_folder(path, model) -> str:
    """A pypattern model folder (config.json + weights.npz), as ``circuit --model`` reads."""
    import dataclasses

    path.mkdir()
    cfg = {
        k: (str(v).replace("torch.", "") if isinstance(v, torch.dtype) else v)
        for k, v in dataclasses.asdict(model.cfg).items()
    }
    (path / "config.json").write_text(json.dumps(cfg))
    np.savez(path / "weights.npz", **{k: v.detach().numpy() for k, v in model.state_dict().items()})
    return str(path)


def test_patch_writes_raw_changes_where_the_corrupted_run_moves_no_metric(data, tmp_path):
    """A model blind to which token it reads (every embedding row the same): the corrupted prompts differ, but
    the clean and corrupted metrics coincide, so the normalisation would be 0/0; the raw changes are written
    and the summary is strict JSON (no NaN)."""
    import pypattern as pp

    d, tokens = data
    m = pp.Transformer(pp.TransformerConfig(n_layers=1, d_model=8, n_heads=2, d_mlp=16, d_vocab=23, n_ctx=16))
    with torch.no_grad():
        m.embed.W_E.copy_(m.embed.W_E[:1].expand_as(m.embed.W_E))
    folder = _native_folder(tmp_path / "blind", m)
    assert main(["patch", "--model", folder, "--data", str(d / "tokens.npy"), "--corrupted",
                 str(d / "corrupted.npy"), "--sites", "resid_pre", "--out", str(tmp_path / "p")]) == 0  # fmt: skip
    text = (tmp_path / "p" / "patch_summary.json").read_text()
    summary = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the summary"))
    assert summary["sites"]["resid_pre"]["normalized"] is False
    assert all(abs(v) < 1e-6 for _, v in summary["sites"]["resid_pre"]["top"])
    assert "nan" not in (tmp_path / "p" / "patch_resid_pre.csv").read_text().split("\n", 2)[1]


def test_a_pypattern_model_folder_runs_every_command(data, tmp_path, capsys):
    """The folder circuit reads (config.json + weights.npz of a pypattern Transformer) serves llc, patch and chi
    too; patch's default sites leave out those an attention-only model lacks."""
    import pypattern as pp

    d, _ = data
    m = pp.Transformer(
        pp.TransformerConfig(n_layers=1, d_model=8, n_heads=2, d_mlp=None, d_vocab=23, n_ctx=16)
    )
    folder = _native_folder(tmp_path / "native", m)
    assert (
        main(["patch", "--model", str(folder), "--data", str(d / "tokens.npy"), "--out", str(tmp_path / "p")])
        == 0
    )
    summary = json.loads((tmp_path / "p" / "patch_summary.json").read_text())
    assert set(summary["sites"]) == {"resid_pre", "attn_out", "z"}
    argv = ["--model", str(folder), "--data", str(d / "tokens.npy"), "--num-draws", "3", "--num-chains", "2",
            "--step-size", "1e-4", "--num-burnin-steps", "0", "--quiet"]  # fmt: skip
    assert main(["llc", *argv, "--out", str(tmp_path / "l")]) == 0
    assert main(["chi", *argv, "--num-probe", "2", "--out", str(tmp_path / "c")]) == 0
    capsys.readouterr()


def _damaged_folders(root, model) -> dict:
    """pypattern model folders, each damaged in one way, with the file and the words its error names."""
    import shutil

    ok = _native_folder(root / "ok", model)
    cases = {}

    def copy(name):
        d = root / name
        shutil.copytree(ok, d)
        return d

    d = copy("truncated_npz")
    w = (d / "weights.npz").read_bytes()
    (d / "weights.npz").write_bytes(w[: len(w) // 2])
    cases[d] = ("weights.npz", "cannot be read (BadZipFile")
    d = copy("damaged_safetensors")
    (d / "weights.npz").unlink()
    (d / "model.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0garbage")
    cases[d] = ("model.safetensors", "cannot be read (SafetensorError")
    for name, field, value, words in (
        ("dtype_typo", "dtype", "float33", "is not a valid TransformerConfig (dtype='float33' is not valid"),
        ("dtype_int", "dtype", "int64", "is not a valid TransformerConfig (dtype=torch.int64 is not valid"),
        ("field_typo", "n_layerz", 2, "has fields TransformerConfig does not know: ['n_layerz']"),
        ("bad_value", "n_key_value_heads", 3, "is not a valid TransformerConfig (n_key_value_heads=3"),
    ):
        d = copy(name)
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, field: value}))
        cases[d] = ("config.json", words)
    d = copy("other_shapes")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "d_vocab": 30}))
    cases[d] = ("weights.npz", "holds embed.W_E (23, 8) (the config's (30, 8))")
    d = copy("missing_tensor")
    with np.load(d / "weights.npz") as z:
        np.savez(d / "weights.npz", **{k: z[k] for k in z.files if k != "unembed.W_U"})
    cases[d] = ("weights.npz", "lacks unembed.W_U")
    d = copy("nan_weight")
    with np.load(d / "weights.npz") as z:
        arrays = {k: z[k].copy() for k in z.files}
    arrays["blocks.0.mlp.W_in"].flat[3] = np.nan
    np.savez(d / "weights.npz", **arrays)
    cases[d] = ("weights.npz", "holds values that are not finite (NaN or infinite) in blocks.0.mlp.W_in")
    return cases


def test_damaged_pypattern_model_folders_are_refused_naming_model_and_the_file(data, tmp_path, capsys):
    """A pypattern --model folder with a damaged weights file, a config.json that is no TransformerConfig or
    weights of other names or shapes ends every command in one line naming --model and the file (exit status 2)."""
    import pypattern as pp

    d, _ = data
    m = pp.Transformer(pp.TransformerConfig(n_layers=1, d_model=8, n_heads=2, d_mlp=16, d_vocab=23, n_ctx=16))
    tok = str(d / "tokens.npy")
    for folder, (file, words) in _damaged_folders(tmp_path, m).items():
        for cmd in (["patch"], ["circuit"], ["llc", "--num-draws", "3"]):
            err = _err([*cmd, "--model", str(folder), "--data", tok, "--out", str(tmp_path / "out")], capsys)
            assert err.startswith(f"pypattern {cmd[0]}: error: --model {str(folder)!r}: "), err
            assert err.count("\n") == 1 and "Traceback" not in err, err
            assert str(folder / file) in err and words in err, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_damaged_hugging_face_model_folders_are_refused_naming_model(data, tmp_path, capsys):
    """A save_pretrained --model folder whose weights file is damaged ends the command in one line naming
    --model (the library's own message names the folder as path=)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    d, _ = data
    folder = tmp_path / "hf"
    GPT2LMHeadModel(
        GPT2Config(
            n_layer=1, n_embd=8, n_head=2, vocab_size=23, n_positions=16, bos_token_id=0, eos_token_id=0
        )
    ).save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"damaged")
    capsys.readouterr()  # save_pretrained's progress bar
    err = _err(["patch", "--model", str(folder), "--data", str(d / "tokens.npy")], capsys)
    assert err.startswith(f"pypattern patch: error: --model {str(folder)!r}: "), err
    assert err.count("\n") == 1 and "path=" not in err and "could not be loaded" in err, err
    # finite-looking files with a NaN weight: named as such (not as a module that differs from its config)
    hf = GPT2LMHeadModel(
        GPT2Config(
            n_layer=1, n_embd=8, n_head=2, vocab_size=23, n_positions=16, bos_token_id=0, eos_token_id=0
        )
    )
    with torch.no_grad():
        hf.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    hf.save_pretrained(tmp_path / "hf_nan")
    capsys.readouterr()
    for cmd in (["patch"], ["circuit"], ["llc", "--num-draws", "3"]):
        err = _err([*cmd, "--model", str(tmp_path / "hf_nan"), "--data", str(d / "tokens.npy")], capsys)
        last = err.strip().splitlines()[-1]  # after transformers' own loading bar
        assert last.startswith(f"pypattern {cmd[0]}: error: --model "), err
        assert (
            "'transformer.h.0.mlp.c_fc.weight' holds values that are not finite" in last
            and "Traceback" not in err
        )


def test_run_functions_check_out_before_reading_the_model(data, tmp_path, monkeypatch):
    """run_user_llc / run_user_chi / run_user_patch refuse an ``out`` (or ``checkpoint``) that cannot be a folder
    before the model is read, naming the argument."""
    import pypattern.experiments.user_model as user_model

    def no_work(*args, **kwargs):
        raise AssertionError("the model was read before out was checked")

    monkeypatch.setattr(user_model, "_model_and_tokens", no_work)
    d, _ = data
    f = tmp_path / "file"
    f.write_text("x")
    for run in (user_model.run_user_llc, user_model.run_user_chi, user_model.run_user_patch):
        with pytest.raises(ValueError, match=r"out='.*file/sub' cannot be used as a folder to write into"):
            run("m", str(d / "tokens.npy"), str(f / "sub"))
    for run in (user_model.run_user_llc, user_model.run_user_chi):
        with pytest.raises(ValueError, match=r"checkpoint='.*file' is an existing file"):
            run("m", str(d / "tokens.npy"), str(tmp_path / "o"), checkpoint=str(f))


def test_small_data_and_counts_are_refused_naming_the_options(model_dir, data, tmp_path, capsys):
    d, tokens = data
    np.save(tmp_path / "one_seq.npy", tokens[:1])
    np.save(tmp_path / "one_tok.npy", tokens[:, :1])
    base = [
        "--model",
        str(model_dir),
        "--step-size",
        "1e-4",
        "--num-draws",
        "3",
        "--quiet",
        "--out",
        str(tmp_path),
    ]
    err = _err(["llc", *base, "--data", str(tmp_path / "one_seq.npy")], capsys)
    assert "holds 1 sequence: the default --nbeta" in err and "give --nbeta" in err
    err = _err(["chi", *base, "--data", str(d / "tokens.npy"), "--batch-size", "1"], capsys)
    assert "--batch-size is 1: the default --nbeta" in err
    for cmd in ("llc", "chi"):
        err = _err([cmd, *base, "--data", str(tmp_path / "one_tok.npy")], capsys)
        assert "its sequences have 1 token; the next-token loss" in err
    err = _err(
        ["chi", *base, "--data", str(d / "tokens.npy"), "--num-chains", "1", "--num-draws", "1"], capsys
    )
    assert "--num-chains 1 x --num-draws 1 gives 1 draw" in err


def test_npz_token_files_with_other_arrays_are_refused(data, tmp_path):
    d, tokens = data
    np.savez(tmp_path / "padded.npz", tokens=tokens, attention_mask=np.ones_like(tokens))
    with pytest.raises(
        ValueError, match=r"holds \['attention_mask'\] besides 'tokens'.*padding would be scored"
    ):
        load_tokens(tmp_path / "padded.npz")
    np.savez(tmp_path / "extra.npz", tokens=tokens, answer=tokens[:, 0])
    with pytest.raises(
        ValueError, match=r"holds \['answer'\] besides 'tokens', which the command line does not read;"
    ):
        load_tokens(tmp_path / "extra.npz")


def test_circuit_ig_steps_without_eap_ig_is_refused(model_dir, data, tmp_path, capsys):
    d, _ = data
    err = _err(["circuit", "--model", str(model_dir), "--data", str(d / "tokens.npy"), "--methods", "eap",
                "--ig-steps", "7", "--out", str(tmp_path)], capsys)  # fmt: skip
    assert "--ig-steps applies only with eap-ig among --methods (given: eap)" in err


def test_circuit_refuses_prompts_whose_ablation_changes_nothing(gpt2_dir, tmp_path, capsys):
    """Without a corrupted file the edges are mean-ablated over the prompts: one prompt (or copies of one) would
    give every edge a score of 0 and undefined faithfulness; a corrupted file equal to the token file likewise.
    Each refused in one line before anything is written."""
    rng = np.random.default_rng(0)
    one = rng.integers(0, 23, size=(1, 6))
    np.save(tmp_path / "one.npy", one)
    np.save(tmp_path / "copies.npy", np.repeat(one, 3, axis=0))
    two = np.concatenate([one, rng.integers(0, 23, size=(1, 6))])
    np.save(tmp_path / "two.npy", two)
    cases = [
        (["--data", str(tmp_path / "one.npy")], "holds one prompt: without a corrupted file"),
        (["--data", str(tmp_path / "copies.npy")], "holds 3 prompts, all the same"),
        (
            ["--data", str(tmp_path / "two.npy"), "--corrupted", str(tmp_path / "two.npy")],
            "equals the token file",
        ),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as e:
            main(["circuit", "--model", str(gpt2_dir), *extra, "--out", str(tmp_path / "o"), "--quiet"])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (extra, err)
        assert not list((tmp_path / "o").iterdir())  # nothing written


def test_circuit_prompt_files_are_refused_as_the_token_file_path_refuses(gpt2_dir, tmp_path, capsys):
    """A prompt .npz gets the refusals of a token file with --corrupted: corrupted equal to clean (every score 0)
    is refused, as are wrong equal to answer (a logit difference of 0 whatever the model computes) and arrays the
    command does not read; each in one line naming the file, before anything is written."""
    from pypattern.circuits.cli import load_prompts

    rng = np.random.default_rng(0)
    clean = rng.integers(0, 23, size=(4, 6))
    corr = clean.copy()
    corr[:, 2] = (corr[:, 2] + 1) % 23
    ans = rng.integers(0, 23, size=4)
    wrong = (ans + 1) % 23
    one_same = wrong.copy()
    one_same[2] = ans[2]
    cases = {
        "same": (
            dict(clean=clean, corrupted=clean, answer=ans, wrong=wrong),
            "corrupted equals clean: every edge would carry its clean value, so every score is 0",
        ),
        "aw": (
            dict(clean=clean, corrupted=corr, answer=ans, wrong=ans),
            "wrong equals answer on every prompt: the logit difference there is 0",
        ),
        "one_aw": (
            dict(clean=clean, corrupted=corr, answer=ans, wrong=one_same),
            r"wrong equals answer on 1 of 4 prompts \(the first: 2\)",
        ),
        "extra": (
            dict(clean=clean, corrupted=corr, answer=ans, junk=clean),
            r"holds \['junk'\] besides \['clean', 'corrupted', 'answer'\], which circuit does not read",
        ),
    }
    for name, (arrays, message) in cases.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, **arrays)
        with pytest.raises(ValueError, match=message):
            load_prompts(str(path), vocab_size=23, n_ctx=8)
        out = tmp_path / f"o_{name}"
        err = _err(
            ["circuit", "--model", str(gpt2_dir), "--data", str(path), "--out", str(out), "--quiet"], capsys
        )
        assert f"pypattern circuit: error: --data {str(path)!r}" in err and "Traceback" not in err, name
        assert re.search(message, err), (name, err)
        assert list(out.iterdir()) == []  # nothing written
    np.savez(tmp_path / "good.npz", clean=clean, corrupted=corr, answer=ans, wrong=wrong)
    clean_t, corr_t, metric = load_prompts(str(tmp_path / "good.npz"), vocab_size=23, n_ctx=8)
    assert torch.equal(clean_t, torch.from_numpy(clean)) and torch.equal(corr_t, torch.from_numpy(corr))
    assert metric.answer.tolist() == ans.tolist() and metric.wrong.tolist() == wrong.tolist()


def test_a_resume_with_another_architecture_or_settings_names_the_options(
    model_dir, gpt2_dir, data, tmp_path, capsys
):
    """A checkpoint refused on a fingerprint item named by the library (moving, num_draws, seed, localization,
    step_size, nbeta) says which command-line option is behind it."""
    d, _ = data
    ck = tmp_path / "ck"
    base = ["llc", "--data", str(d / "tokens.npy"), "--num-chains", "1", "--num-burnin-steps", "1", "--quiet",
            "--out", str(tmp_path / "o"), "--checkpoint", str(ck)]  # fmt: skip
    run = ["--num-draws", "2", "--step-size", "1e-4", "--seed", "0", "--localization", "100", "--nbeta", "2"]
    assert main([*base, "--model", str(gpt2_dir), *run]) == 0
    for model, change, item, hint in (
        (model_dir, [], "moving", "--model or --float64: another model (other parameters sampled) or dtype"),
        (gpt2_dir, ["--num-draws", "3"], "num_draws", "--num-draws: another number of draws per chain"),
        (gpt2_dir, ["--seed", "1"], "seed", "--seed: another seed"),
        (
            gpt2_dir,
            ["--step-size", "2e-4"],
            "step_size",
            "--step-size: another step size, or with 'auto' another step chosen on other data or model",
        ),
        (gpt2_dir, ["--localization", "10"], "localization", "--localization: another localization"),
        (gpt2_dir, ["--nbeta", "3"], "nbeta", "--nbeta: another inverse temperature"),
    ):
        argv = [*run]
        for flag, value in zip(change[::2], change[1::2]):
            argv[argv.index(flag) + 1] = value
        err = _err([*base, "--model", str(model), *argv], capsys)
        assert f"was written by a different run: {item} = " in err, err
        assert err.rstrip().endswith(f"(on the command line: {hint})"), err


def test_token_files_without_a_suffix_or_binary_named_as_text_are_refused(data, tmp_path):
    """Text token files are .txt, .csv or .tsv in UTF-8: a file without a suffix is refused listing the formats
    (one in NumPy's formats is told the suffix to give it), and a binary file named as text is refused saying
    what it is rather than failing to decode; an empty cell between commas is refused naming its line."""
    d, tokens = data
    formats = "give .npy, .npz or a text file (.txt, .csv, .tsv"
    (tmp_path / "plain").write_text("1 2 3\n4 5 6\n")
    with pytest.raises(
        ValueError, match=re.escape(f"/plain': a file without a suffix (its format is not known): {formats}")
    ):
        load_tokens(tmp_path / "plain")
    np.save(tmp_path / "npy", tokens)
    (tmp_path / "npy.npy").rename(tmp_path / "npy")  # np.save adds .npy
    with pytest.raises(
        ValueError,
        match=r"without a suffix.*\(it starts as a NumPy \.npy file: name it with the suffix \.npy\)",
    ):
        load_tokens(tmp_path / "npy")
    np.save(tmp_path / "npy.txt", tokens)
    (tmp_path / "npy.txt.npy").rename(tmp_path / "npy.txt")
    with pytest.raises(
        ValueError, match=r"npy\.txt': cannot read token ids \(it starts as a NumPy \.npy file"
    ):
        load_tokens(tmp_path / "npy.txt")
    np.savez(tmp_path / "z.csv", tokens=tokens)
    (tmp_path / "z.csv.npz").rename(tmp_path / "z.csv")
    with pytest.raises(
        ValueError, match=r"it is a zip archive, as numpy\.savez writes: name it with the suffix \.npz"
    ):
        load_tokens(tmp_path / "z.csv")
    (tmp_path / "nul.txt").write_bytes(b"1 2 3\n4 5\x00 6\n")
    with pytest.raises(
        ValueError, match=r"it holds NUL bytes \(the first at byte 9\): a binary file, not text"
    ):
        load_tokens(tmp_path / "nul.txt")
    (tmp_path / "latin1.txt").write_bytes("1 2 3\n4 5 6 \xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"it is not UTF-8 text \(byte 0xe9 at 12\)"):
        load_tokens(tmp_path / "latin1.txt")
    for n, text in ((2, "1,2,3\n4,,6\n"), (1, "1,2,3,\n4,5,6\n"), (3, "1,2,3\n4,5,6\n,7,8\n")):
        (tmp_path / "cells.csv").write_text(text)
        with pytest.raises(ValueError, match=rf"line {n} has an empty cell \(nothing between two commas"):
            load_tokens(tmp_path / "cells.csv")
    (tmp_path / "spaced.csv").write_text("1, 2, 3\n4 ,5 , 6\n\n")
    assert load_tokens(tmp_path / "spaced.csv").tolist() == [[1, 2, 3], [4, 5, 6]]


def test_circuit_with_a_fraction_of_no_edge_takes_the_top_edge(gpt2_dir, tmp_path, capsys):
    """--fraction so small that it rounds to no edge: the circuit holds the top edge, with a warning naming the
    option; the circuit table has that one edge."""
    rng = np.random.default_rng(1)
    np.save(tmp_path / "t.npy", rng.integers(0, 23, size=(4, 6)))
    out = tmp_path / "o"
    argv = ["circuit", "--model", str(gpt2_dir), "--data", str(tmp_path / "t.npy"), "--methods", "eap",
            "--fraction", "1e-6", "--out", str(out), "--quiet"]  # fmt: skip
    with pytest.warns(
        UserWarning, match=r"--fraction 1e-06 of the \d+ edges rounds to no edge: the circuit holds"
    ):
        assert main(argv) == 0
    import pandas as pd

    table = pd.read_csv(out / "circuit.csv")
    scores = pd.read_csv(out / "edge_scores.csv")
    assert len(table) == 1
    assert table["name"][0] == scores.loc[scores["score"].abs().idxmax(), "name"]


def test_a_checkpoint_folder_holding_a_folder_named_as_the_checkpoint_file_is_refused(
    model_dir, data, tmp_path, capsys
):
    d, _ = data
    ck = tmp_path / "ck"
    (ck / "llc_checkpoint.npz").mkdir(parents=True)
    err = _err(["llc", "--model", str(model_dir), "--data", str(d / "tokens.npy"), "--num-draws", "2",
                "--step-size", "1e-4", "--out", str(tmp_path / "o"), "--checkpoint", str(ck)], capsys)  # fmt: skip
    assert (
        f"pypattern llc: error: checkpoint={str(ck)!r} holds a folder {str(ck / 'llc_checkpoint.npz')!r} where the "
        "checkpoint file goes; give another checkpoint folder (on the command line: --checkpoint DIR)"
    ) in err


def test_the_token_file_is_read_once_and_checked_against_the_model(
    model_dir, data, tmp_path, capsys, monkeypatch
):
    """llc, chi and patch read --data once (checked before the model is converted), then check those ids against
    the model: ids past its vocabulary are refused naming the file, as when the file is read with the model's
    limits."""
    import pypattern.experiments.user_model as user_model

    d, tokens = data
    reads = []
    real = user_model.load_tokens

    def counting(path, **kw):
        reads.append(str(path))
        return real(path, **kw)

    monkeypatch.setattr(user_model, "load_tokens", counting)
    data_file = str(d / "tokens.npy")
    base = ["--model", str(model_dir), "--data", data_file]
    sampling = [
        "--num-chains",
        "1",
        "--num-draws",
        "2",
        "--num-burnin-steps",
        "1",
        "--step-size",
        "1e-4",
        "--quiet",
    ]
    for cmd in (
        ["llc", *sampling],
        ["chi", *sampling, "--num-probe", "1"],
        ["patch", "--sites", "resid_pre"],
    ):
        reads.clear()
        assert main([*cmd, *base, "--out", str(tmp_path / cmd[0])]) == 0
        assert reads == [data_file], (cmd[0], reads)
    big = tokens.copy()
    big[3, 4] = 30  # past the model's 23 ids
    np.save(tmp_path / "big.npy", big)
    err = _err(
        ["patch", *base[:2], "--data", str(tmp_path / "big.npy"), "--out", str(tmp_path / "o")], capsys
    )
    assert (
        f"error: --data {str(tmp_path / 'big.npy')!r}: token ids must lie in [0, 23) for this model; found 0..30"
        in err
    )
    np.save(tmp_path / "u64.npy", np.array([[1, 2], [3, 2**63]], dtype=np.uint64))
    with pytest.raises(
        ValueError, match=re.escape("token ids must lie below 2**63 (int64); found 1..9223372036854775808")
    ):
        real(tmp_path / "u64.npy")
