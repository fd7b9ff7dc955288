"""`pypattern llc|patch|chi --model DIR --data FILE` on a local save_pretrained directory and a token file."""

import json

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
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="obj.npy"):  # never unpickled
        load_tokens(tmp_path / "obj.npy")
    (tmp_path / "ragged.txt").write_text("1 2 3\n4 5\n")
    with pytest.raises(ValueError, match="ragged"):
        load_tokens(tmp_path / "ragged.txt")


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


def test_patch_on_user_model_equals_patching_the_converted_model(model_dir, data, tmp_path):
    d, tokens = data
    out = tmp_path / "patch"
    args = ["patch", "--model", str(model_dir), "--data", str(d / "tokens.npy"), "--out", str(out)]
    assert main(args + ["--corrupted", str(d / "corrupted.npy"), "--sites", "resid_pre,z"]) == 0
    summary = json.loads((out / "patch_summary.json").read_text())
    assert set(summary["sites"]) == {"resid_pre", "z"}
    import pypattern
    from pypattern.patching import KL

    model = pypattern.from_pretrained(model_dir)
    clean, corr = torch.from_numpy(tokens), torch.from_numpy(np.load(d / "corrupted.npy"))
    ref = pypattern.activation_patching(model, "resid_pre", clean, corr, metric=KL())
    rows = (out / "patch_resid_pre.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + ref.values[0].numel()  # header + one row per cell
    top = summary["sites"]["resid_pre"]["top"][0][1]
    assert top == pytest.approx(float(ref.top(1)[0][1]), rel=1e-5, abs=1e-7)
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
    chi = np.loadtxt(out / "chi.csv", delimiter=",")
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


def test_user_commands_need_both_model_and_data(data):
    d, _ = data
    with pytest.raises(SystemExit, match="--model DIR and --data FILE"):
        main(["llc", "--data", str(d / "tokens.npy")])


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
    with pytest.raises(SystemExit, match="pypattern circuit: use_normalization_before_and_after=True"):
        main(["circuit", *argv])
