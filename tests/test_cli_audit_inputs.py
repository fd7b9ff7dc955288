"""The command line on local save_pretrained directories (GPT-2, GPT-NeoX, Llama) and token files in each documented
format: the results are written where the help says, and bad inputs end in one error line naming the option."""

import csv
import json
import pickle

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from pypattern.cli import main  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:.*step_size=1e-05 is too small"),
    pytest.mark.filterwarnings("ignore:.*effective sample size"),
]

V = 29
ARCHS = {
    "gpt2": lambda: transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=V, n_embd=16, n_layer=2, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0
        )
    ),
    "neox": lambda: transformers.GPTNeoXForCausalLM(
        transformers.GPTNeoXConfig(
            vocab_size=V,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=16,
        )
    ),
    "llama": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=V,
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=16,
        )
    ),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_inputs")
    torch.manual_seed(0)
    for name, build in ARCHS.items():
        build().save_pretrained(d / name, safe_serialization=True)
    bert = transformers.BertConfig(
        vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    transformers.BertModel(bert).save_pretrained(d / "bert", safe_serialization=True)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, V, size=(4, 6))
    corrupted = tokens.copy()
    corrupted[:, 2] = (corrupted[:, 2] + 3) % V  # one position differs
    np.save(d / "tokens.npy", tokens)
    np.savez(d / "tokens.npz", tokens=tokens)
    (d / "tokens.txt").write_text("\n".join(" ".join(map(str, r)) for r in tokens) + "\n")
    (d / "tokens.csv").write_text("\n".join(",".join(map(str, r)) for r in tokens) + "\n")
    (d / "tokens.tsv").write_text("\n".join("\t".join(map(str, r)) for r in tokens) + "\n")
    np.save(d / "corrupted.npy", corrupted)
    # bad token files
    (d / "empty.txt").write_text("")
    np.save(d / "empty.npy", np.zeros((0, 6), dtype=np.int64))
    np.save(d / "oov.npy", tokens + V)
    np.save(d / "negative.npy", tokens - V)
    np.save(d / "float.npy", tokens.astype(np.float32))
    np.save(d / "bool.npy", tokens > 3)
    with open(d / "pickled.pkl", "wb") as f:
        pickle.dump(tokens, f)
    with open(d / "pickled.npy", "wb") as f:
        pickle.dump(tokens, f)
    torch.save(torch.from_numpy(tokens), d / "saved.pt")
    torch.save(torch.from_numpy(tokens), d / "saved.npy")
    np.save(d / "object.npy", np.array([[1, 2], [3, 4]], dtype=object), allow_pickle=True)
    np.savez(d / "object.npz", tokens=np.array([[1, 2], [3, 4]], dtype=object))
    return d, tokens


SAMPLING = ["--num-chains", "2", "--num-draws", "2", "--num-burnin-steps", "1", "--step-size", "1e-5"]
#: per command: its tiny-run options and the files the help says it writes into --out
RUNS = {
    "llc": (SAMPLING, ["llc.npz", "llc_trace.png", "llc_summary.json"]),
    "chi": ([*SAMPLING, "--num-probe", "2"], ["chi.npz", "chi.csv", "chi_summary.json"]),
    "patch": (["--sites", "resid_pre"], ["patch_resid_pre.csv", "patch_summary.json"]),
    "circuit": (
        ["--methods", "eap"],
        [
            "edge_scores.csv",
            "circuit.csv",
            "pruning_curve.png",
            "pruning_curve.csv",
            "circuit.png",
            "circuit_summary.json",
        ],
    ),
}


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr()


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("cmd", sorted(RUNS))
def test_results_written_where_documented(files, tmp_path, capsys, arch, cmd):
    d, tokens = files
    # each command on a token file of another documented format
    data = {"llc": "tokens.npy", "chi": "tokens.txt", "patch": "tokens.csv", "circuit": "tokens.tsv"}[cmd]
    out = tmp_path / "out"
    extra, written = RUNS[cmd]
    code, cap = _run([cmd, "--model", d / arch, "--data", d / data, "--out", out, "--quiet", *extra], capsys)
    assert code == 0, cap.err
    assert sorted(p.name for p in out.iterdir()) == sorted(written)
    summary_file = next(out.glob("*summary.json"))
    assert str(summary_file) in cap.out  # where the full result went is printed
    summary = json.loads(summary_file.read_text())
    if cmd == "llc":
        assert summary["sequences"] == tokens.shape[0] and summary["seq_len"] == tokens.shape[1]
        assert summary["llc_mean"] == pytest.approx(np.mean(summary["llc_per_chain"]))
    if cmd == "chi":
        with open(out / "chi.csv") as f:
            rows = list(csv.reader(f))
        # one column per probe token of the 2 sequences probed: each token after the first (a next-token loss)
        T = tokens.shape[1]
        assert rows[0] == ["component", *(f"s{i}p{j}" for i in range(2) for j in range(1, T))]
        assert summary["chi_shape"] == [len(rows) - 1, 2 * (T - 1)]


@pytest.mark.parametrize("data", ["tokens.npy", "tokens.npz", "tokens.txt", "tokens.csv", "tokens.tsv"])
def test_every_token_format_gives_the_same_numbers(files, tmp_path, capsys, data):
    """Exact patching of resid_pre at layer 0 where clean and corrupted differ restores the clean run (1), and
    where they agree changes nothing (0): the same table from every token format."""
    d, tokens = files
    out = tmp_path / "out"
    argv = ["patch", "--model", d / "neox", "--data", d / data, "--corrupted", d / "corrupted.npy"]
    code, cap = _run([*argv, "--out", out, "--sites", "resid_pre", "--quiet"], capsys)
    assert code == 0, cap.err
    with open(out / "patch_resid_pre.csv") as f:
        rows = {(int(r["layer"]), int(r["pos"])): float(r["mean"]) for r in csv.DictReader(f)}
    assert len(rows) == 2 * tokens.shape[1]
    for pos in range(tokens.shape[1]):
        assert rows[(0, pos)] == pytest.approx(1.0 if pos == 2 else 0.0, abs=1e-4)
        if pos < 2:  # causally before the corrupted token: both runs agree
            assert rows[(1, pos)] == pytest.approx(0.0, abs=1e-4)


BAD_DATA = {
    "empty.txt": "holds no token id",
    "empty.npy": r"expected a non-empty integer array .* got shape \(0, 6\)",
    "oov.npy": rf"token ids must lie in \[0, {V}\) for this model",
    "negative.npy": "token ids must",
    "float.npy": "expected a non-empty integer array .* of float32",
    "bool.npy": "expected a non-empty integer array .* of bool",
    "pickled.pkl": "it is a pickle .* which pypattern never loads",
    "pickled.npy": "pickled .* which pypattern never loads",
    "saved.pt": "torch.save file, a pickle that pypattern never loads",
    "saved.npy": "torch.save writes such files",
    "object.npy": "pickled .* which pypattern never loads",
    "object.npz": "pickled .* which pypattern never loads",
    "missing.npy": "is not a file",
}


@pytest.mark.parametrize("cmd", sorted(RUNS))
def test_bad_token_files_are_refused_naming_data(files, tmp_path, capsys, monkeypatch, cmd):
    d, _ = files

    def no_unpickling(*args, **kwargs):
        raise AssertionError("a file was unpickled")

    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(pickle, "Unpickler", no_unpickling)
    out = tmp_path / "out"
    for name, message in BAD_DATA.items():
        with pytest.raises(SystemExit) as e:
            main([cmd, "--model", str(d / "llama"), "--data", str(d / name), "--out", str(out), "--quiet"])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"pypattern {cmd}: error: --data '{d / name}'"), (name, err)
        assert __import__("re").search(message, err), (name, err)
        assert not list(out.iterdir())  # nothing written


@pytest.mark.parametrize("cmd", sorted(RUNS))
def test_bad_model_dirs_are_refused_naming_model(files, tmp_path, capsys, cmd):
    d, _ = files
    cases = {
        d / "missing": "the model directory does not exist",
        d / "tokens.npy": "the model directory is a file, not a directory",
        d: "has no config.json",
        d / "bert": r"architectures=\['BertModel'\] is not supported",
    }
    for model, message in cases.items():
        with pytest.raises(SystemExit) as e:
            main(
                [cmd, "--model", str(model), "--data", str(d / "tokens.npy"), "--out", str(tmp_path / "out")]
            )
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"pypattern {cmd}: error: --model '{model}'"), err
        assert __import__("re").search(message, err), err


@pytest.mark.parametrize("cmd", sorted(RUNS))
def test_bad_token_file_is_refused_before_the_model_is_converted(files, tmp_path, capsys, monkeypatch, cmd):
    """A file that cannot be token ids is refused before any work on the model (which can take minutes)."""
    import pypattern.models.convert as convert

    d, _ = files

    def no_conversion(*args, **kwargs):
        raise AssertionError("the model was converted before the token file was checked")

    monkeypatch.setattr(convert, "from_pretrained", no_conversion)
    for name in ("float.npy", "pickled.npy", "empty.txt", "negative.npy"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--model", str(d / "llama"), "--data", str(d / name), "--out", str(tmp_path / "out")])
        assert e.value.code == 2
        assert f"error: --data '{d / name}'" in capsys.readouterr().err
    corrupted = ["--corrupted", str(d / "float.npy")] if cmd in ("patch", "circuit") else []
    if corrupted:
        data = ["--data", str(d / "tokens.npy")]
        with pytest.raises(SystemExit):
            main([cmd, "--model", str(d / "llama"), *data, *corrupted, "--out", str(tmp_path / "out")])
        assert f"error: --corrupted '{d / 'float.npy'}'" in capsys.readouterr().err
