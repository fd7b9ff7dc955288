"""`pypattern llc|patch|chi|circuit --model DIR --data FILE` as a user with a save_pretrained folder runs them:
sharded checkpoints of four families, every number written equal to the Python API's on the same model, data and
seed, folders and token files refused in one line, result files of an earlier run in --out, and no code path that
unpickles."""

import ast
import csv
import json
import pathlib
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import pypattern as pp  # noqa: E402
from pypattern.cli import main  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # a few draws of a tiny run: the sampler's warning that they are too few is expected
    pytest.mark.filterwarnings("ignore::pypattern.NonStationaryWarning"),
]

VOCAB = 29

CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0
    ),
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
    ),  # fmt: skip
    "neox": lambda: transformers.GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
    ),  # fmt: skip
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
    ),  # fmt: skip
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Per family: the model saved whole ("<arch>") and in shards of 2 KB ("<arch>_sharded"); the token ids in
    each format the docs promise, and corrupted prompts."""
    root = tmp_path_factory.mktemp("users")
    for arch, cfg in CONFIGS.items():
        torch.manual_seed(0)
        hf = transformers.AutoModelForCausalLM.from_config(cfg())
        hf.save_pretrained(root / arch)
        hf.save_pretrained(root / f"{arch}_sharded", max_shard_size="2KB")
        assert len(list((root / f"{arch}_sharded").glob("*.safetensors"))) > 1
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=(8, 7))
    np.save(root / "tokens.npy", tokens)
    np.savez(root / "tokens.npz", tokens=tokens)
    (root / "tokens.txt").write_text("\n".join(" ".join(map(str, r)) for r in tokens) + "\n")
    (root / "tokens.csv").write_text("\r\n".join(",".join(map(str, r)) for r in tokens))
    (root / "tokens.tsv").write_text("\n".join("\t".join(map(str, r)) for r in tokens))
    corrupted = tokens.copy()
    corrupted[:, 2] = (corrupted[:, 2] + 5) % VOCAB
    np.save(root / "corrupted.npy", corrupted)
    return root, tokens, corrupted


def _code(argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def _loader(tokens, batch_size):
    data = torch.utils.data.TensorDataset(torch.from_numpy(tokens))
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True)


SAMPLER = {"num_chains": 2, "num_draws": 3, "num_burnin_steps": 2, "step_size": 1e-3, "localization": 50.0}


def _sampler_argv(seed: int, batch_size: int) -> list[str]:
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in SAMPLER.items()]
    return [*argv, f"--seed={seed}", f"--batch-size={batch_size}", "--quiet"]


@pytest.mark.parametrize(
    "arch, data",
    [("gpt2", "tokens.npy"), ("llama", "tokens.txt"), ("neox", "tokens.csv"), ("qwen2", "tokens.npz")],
)
def test_llc_of_a_sharded_checkpoint_is_the_api_estimate_of_the_whole_one(arch, data, folders, tmp_path):
    """llc_summary.json and llc.npz of `llc --model <sharded folder> --data <file>` hold the numbers
    estimate_llc gives on the unsharded folder's model with the same batches and seed, bit for bit."""
    from pypattern.losses import batch_loss

    root, tokens, _ = folders
    out = tmp_path / "llc"
    argv = ["llc", "--model", str(root / f"{arch}_sharded"), "--data", str(root / data), "--out", str(out)]
    assert main([*argv, *_sampler_argv(seed=5, batch_size=4)]) == 0
    summary = json.loads((out / "llc_summary.json").read_text())
    model = pp.from_pretrained(root / arch).eval()
    ref = pp.estimate_llc(model, _loader(tokens, 4), loss_fn=batch_loss, seed=5, quiet=True, **SAMPLER)
    assert summary["llc_mean"] == float(ref.llc_mean) and summary["llc_se"] == float(ref.llc_se)
    assert summary["llc_std"] == float(ref.llc_std)
    assert summary["llc_per_chain"] == [float(v) for v in np.asarray(ref.llc_per_chain).ravel()]
    saved = pp.LLCResult.load(out / "llc.npz")
    assert np.array_equal(np.asarray(saved.sample.loss_trace), np.asarray(ref.sample.loss_trace))
    assert (summary["sequences"], summary["seq_len"]) == tokens.shape


def _csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_patch_grids_written_are_the_api_grids_normalised(folders, tmp_path):
    """Every cell of patch_<site>.csv (GQA Llama from shards, resid_pre and z) is the mean over the prompts of
    (m_patched - m_corrupted) / mean(m_clean - m_corrupted), computed here from activation_patching's raw
    values on the unsharded model."""
    from pypattern.patching import KL

    root, tokens, corrupted = folders
    out = tmp_path / "patch"
    argv = ["patch", "--model", str(root / "llama_sharded"), "--data", str(root / "tokens.tsv")]
    argv += [
        "--corrupted",
        str(root / "corrupted.npy"),
        "--sites",
        "resid_pre,z",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(argv) == 0
    model = pp.from_pretrained(root / "llama").eval()
    clean, corr = torch.from_numpy(tokens), torch.from_numpy(corrupted)
    for site, axes in (("resid_pre", ("layer", "pos")), ("z", ("layer", "head", "pos"))):
        res = pp.activation_patching(model, site, clean, corr, metric=KL())
        gap = (res.clean - res.corrupted).double().mean()
        c = res.corrupted.double().view(-1, *([1] * (res.values.dim() - 1)))
        want = ((res.values.double() - c) / gap).mean(0)
        rows = _csv(out / f"patch_{site}.csv")
        assert len(rows) == want.numel()
        for r in rows:
            cell = tuple(int(r[a]) for a in axes)
            assert float(r["mean"]) == pytest.approx(float(want[cell]), rel=1e-6, abs=1e-9), (site, cell)
        assert float(want.abs().max()) > 0.1  # the patch acted


def test_chi_table_is_the_api_chi(folders, tmp_path):
    """chi.csv of `chi` on a sharded Qwen2 folder is susceptibilities() on the unsharded model, every value bit
    for bit, and its rows are the components named in the summary."""
    root, tokens, _ = folders
    out = tmp_path / "chi"
    argv = [
        "chi",
        "--model",
        str(root / "qwen2_sharded"),
        "--data",
        str(root / "tokens.npy"),
        "--out",
        str(out),
    ]
    assert main([*argv, *_sampler_argv(seed=2, batch_size=4), "--num-probe", "2"]) == 0
    model = pp.from_pretrained(root / "qwen2").eval()
    components = [c for c in model.components() if c != "unembed"]
    ref = pp.susceptibilities(
        model, _loader(tokens, 4), torch.from_numpy(tokens[:2]), components, seed=2, quiet=True, **SAMPLER
    )
    lines = (out / "chi.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in lines[1:]] == list(ref.components) == components
    chi = np.array([[float(v) for v in r.split(",")[1:]] for r in lines[1:]])
    assert np.array_equal(chi, np.asarray(ref.chi)) and np.abs(chi).max() > 0
    summary = json.loads((out / "chi_summary.json").read_text())
    assert summary["chi_shape"] == list(np.asarray(ref.chi).shape)


def test_circuit_edge_scores_are_the_api_scores(folders, tmp_path):
    """edge_scores.csv of `circuit` on a GPT-NeoX folder and a corrupted file is edge_attribution's scores (eap,
    exact) with the metric the command documents: the log-probability of the model's own top prediction."""
    from pypattern.circuits import edge_attribution
    from pypattern.patching import LogProb

    root, tokens, corrupted = folders
    out = tmp_path / "circuit"
    argv = ["circuit", "--model", str(root / "neox_sharded"), "--data", str(root / "tokens.npy")]
    argv += [
        "--corrupted",
        str(root / "corrupted.npy"),
        "--methods",
        "eap,exact",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(argv) == 0
    rows = _csv(out / "edge_scores.csv")
    model = pp.from_pretrained(root / "neox").eval()
    clean, corr = torch.from_numpy(tokens), torch.from_numpy(corrupted)
    with torch.no_grad():
        answer = model(clean)[:, -1].argmax(-1)
    for method in ("eap", "exact"):
        ref = edge_attribution(
            model, clean, corr, metric=LogProb(answer), method=method, per_position=False, quiet=True
        ).to_pandas()
        got = [r for r in rows if r["method"] == method]
        assert [r["name"] for r in got] == list(ref["name"])
        assert [float(r["score"]) for r in got] == pytest.approx(list(ref["score"]), rel=1e-6, abs=1e-9)
        assert max(abs(float(r["score"])) for r in got) > 0


@pytest.fixture(scope="module")
def bad_folders(folders, tmp_path_factory):
    """Model folders a user may hold: weights only as pytorch_model.bin (a pickle), no config.json, an
    architecture pypattern does not convert, a config without weights, and one with a tokenizer."""
    import shutil

    from safetensors.torch import load_file

    root, _, _ = folders
    d = tmp_path_factory.mktemp("folders")
    shutil.copytree(root / "gpt2", d / "bin_only")
    state = load_file(d / "bin_only" / "model.safetensors")
    (d / "bin_only" / "model.safetensors").unlink()
    torch.save(state, d / "bin_only" / "pytorch_model.bin")
    shutil.copytree(root / "gpt2", d / "no_config")
    (d / "no_config" / "config.json").unlink()
    torch.manual_seed(0)
    transformers.BertForMaskedLM(
        transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
        )
    ).save_pretrained(d / "bert")
    (d / "no_weights").mkdir()
    shutil.copy(root / "llama" / "config.json", d / "no_weights" / "config.json")
    return d


@pytest.fixture
def torch_load_spy(monkeypatch):
    calls = []

    def spy(f, *args, **kwargs):
        calls.append(f)
        raise AssertionError(f"torch.load({f!r}) was called")

    monkeypatch.setattr(torch, "load", spy)
    monkeypatch.setattr(torch.serialization, "load", spy)
    return calls


@pytest.mark.parametrize(
    "folder, message",
    [
        (
            "bin_only",
            r"has no \.safetensors weights \(only pickle-based files \['pytorch_model\.bin'\].*re-save",
        ),
        ("no_config", r"has no config\.json"),
        ("bert", r"config\.json architectures=\['BertForMaskedLM'\] is not supported; pypattern converts"),
        ("no_weights", r"has no \.safetensors weights; re-save"),
    ],
)
def test_model_folders_that_cannot_be_read_end_every_command_in_one_line(
    folder, message, folders, bad_folders, tmp_path, capsys, torch_load_spy
):
    """Each command refuses the folder with exit status 2 and one line naming --model and why, before any
    output is written, and never calls torch.load (a .bin is never unpickled)."""
    import re

    root, _, _ = folders
    path = bad_folders / folder
    for cmd in ("llc", "patch", "chi", "circuit"):
        out = tmp_path / cmd
        argv = [cmd, "--model", str(path), "--data", str(root / "tokens.npy"), "--out", str(out)]
        assert _code(argv) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("pypattern")]
        assert len(lines) == 1 and lines[0].startswith(f"pypattern {cmd}: error: --model {str(path)!r}"), err
        assert re.search(message, lines[0]), lines[0]
        assert "Traceback" not in err and list(out.iterdir()) == []
    assert torch_load_spy == []


def test_a_folder_holding_a_tokenizer_runs_as_the_one_without(folders, tmp_path):
    """A save_pretrained folder that also holds the tokenizer's files gives the same patching table."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers

    root, _, _ = folders
    shutil.copytree(root / "llama", tmp_path / "with_tokenizer")
    tok = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(
        tmp_path / "with_tokenizer"
    )
    assert (tmp_path / "with_tokenizer" / "tokenizer.json").is_file()
    tables = []
    for model in (root / "llama", tmp_path / "with_tokenizer"):
        out = tmp_path / f"out_{model.name}"
        argv = ["patch", "--model", str(model), "--data", str(root / "tokens.npy"), "--out", str(out)]
        assert (
            main([*argv, "--corrupted", str(root / "corrupted.npy"), "--sites", "resid_pre", "--quiet"]) == 0
        )
        tables.append((out / "patch_resid_pre.csv").read_text())
    assert tables[0] == tables[1]


def _write(path, content):
    if isinstance(content, str):
        path.write_text(content)
    else:
        np.save(path, content)
    return path


@pytest.mark.parametrize(
    "name, content, message",
    [
        (
            "empty.npy",
            np.zeros((0, 5), np.int64),
            r"expected a non-empty integer array .* got shape \(0, 5\)",
        ),
        ("empty.txt", "", r"it holds no token id"),
        ("ragged.txt", "1 2 3\n4 5\n", r"different numbers of tokens"),
        (
            "over.npy",
            np.array([[1, 2, VOCAB], [3, 4, 5]]),
            rf"must lie in \[0, {VOCAB}\) .*; found 1\.\.{VOCAB}$",
        ),
        ("over.csv", f"1,2,3\n4,{VOCAB + 7},5\n", rf"must lie in \[0, {VOCAB}\) .*; found 1\.\.{VOCAB + 7}$"),
        ("negative.npy", np.array([[1, -2, 3], [3, 4, 5]]), r"token ids must be >= 0; found -2\.\.5$"),
        ("floats.npy", np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), r"integer array .* of float64$"),
        ("floats.txt", "1 2.0 3\n4 5 6\n", r"line 1: '2\.0' is not an integer token id"),
        ("huge.npy", np.array([[1, 2**62], [3, 4]]), rf"must lie in \[0, {VOCAB}\) .*; found 1\.\.{2**62}$"),
        ("huge.txt", "1 2 3\n4 5 123456789012345678901234567890\n", r"the id 123456789012345678901234567890"),
        (
            "uint64.npy",
            np.array([[1, 2**64 - 1], [3, 4]], np.uint64),
            r"below 2\*\*63 .*; found 1\.\.18446744073",
        ),
    ],
)
def test_token_files_users_write_are_refused_naming_the_file_and_the_ids(
    name, content, message, folders, tmp_path, capsys
):
    import re

    root, _, _ = folders
    path = _write(tmp_path / name, content)
    argv = ["patch", "--model", str(root / "gpt2"), "--data", str(path), "--out", str(tmp_path / "o")]
    assert _code(argv) == 2
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"pypattern patch: error: --data {str(path)!r}"), err
    assert re.search(message, line), line
    assert "Traceback" not in err and list((tmp_path / "o").iterdir()) == []


def test_one_sequence_runs_and_an_empty_npz_is_said_to_hold_no_array(folders, tmp_path, capsys):
    """A token file of one row is run (patch; llc with --nbeta, the default needing 2 sequences); an .npz with
    no array (numpy.savez()) is refused as such, not as a torch.save archive."""
    root, tokens, _ = folders
    np.save(tmp_path / "one.npy", tokens[:1])
    base = ["--model", str(root / "gpt2"), "--data", str(tmp_path / "one.npy")]
    assert main(["patch", *base, "--out", str(tmp_path / "p"), "--quiet", "--sites", "resid_pre"]) == 0
    assert json.loads((tmp_path / "p" / "patch_summary.json").read_text())["prompts"] == 1
    llc = ["llc", *base, "--out", str(tmp_path / "l"), "--num-chains", "1", "--num-draws", "2", "--quiet"]
    llc += ["--num-burnin-steps", "0"]
    assert main([*llc, "--step-size", "1e-4", "--nbeta", "2"]) == 0
    assert json.loads((tmp_path / "l" / "llc_summary.json").read_text())["sequences"] == 1
    capsys.readouterr()
    np.savez(tmp_path / "nothing.npz")
    assert _code(["patch", "--model", str(root / "gpt2"), "--data", str(tmp_path / "nothing.npz")]) == 2
    err = capsys.readouterr().err
    assert "nothing.npz" in err and "holds no array" in err and "torch.save" not in err, err


def test_patch_tables_of_an_earlier_run_left_in_out_are_named(folders, tmp_path, capsys):
    """A patch run into an --out holding an earlier run's tables of other sites warns naming them (they would
    pass for this run's); tables it rewrote are not named; a run that writes every file warns of nothing."""
    root, _, _ = folders
    out = tmp_path / "out"
    base = ["patch", "--data", str(root / "tokens.npy"), "--out", str(out), "--quiet"]
    corrupted = ["--corrupted", str(root / "corrupted.npy")]
    assert main([*base, "--model", str(root / "llama"), *corrupted, "--sites", "resid_pre,z,mlp_out"]) == 0
    capsys.readouterr()
    with pytest.warns(UserWarning) as record:
        assert main([*base, "--model", str(root / "gpt2"), "--sites", "resid_pre"]) == 0
    messages = [str(w.message) for w in record if "earlier run" in str(w.message)]
    assert len(messages) == 1, [str(w.message) for w in record]
    assert messages[0].startswith(
        f"--out {str(out)!r} also holds patch_mlp_out.csv, patch_z.csv from an earlier"
    )
    assert "patch_resid_pre.csv" not in messages[0] and "patch_summary.json" not in messages[0]
    summary = json.loads((out / "patch_summary.json").read_text())
    assert list(summary["sites"]) == ["resid_pre"] and summary["model"] == str(root / "gpt2")
    # the same sites again: every result file is rewritten, nothing to name
    tables = ["--sites", "resid_pre,z,mlp_out"]
    assert main([*base, "--model", str(root / "llama"), *corrupted, *tables]) == 0
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert main([*base, "--model", str(root / "llama"), *corrupted, *tables]) == 0
    assert not [w for w in record if "earlier run" in str(w.message)]


def test_a_stopped_run_says_that_out_mixes_its_files_with_an_earlier_runs(
    folders, tmp_path, capsys, monkeypatch
):
    """A patch run stopped (Ctrl-C) after its first site's table says that --out now holds that table beside
    an earlier run's summary and tables, which do not belong together; a run stopped before writing says
    nothing of the kind."""
    import pypattern.patching as patching

    root, _, _ = folders
    out = tmp_path / "out"
    argv = ["patch", "--model", str(root / "llama"), "--data", str(root / "tokens.npy"), "--out", str(out)]
    argv += ["--sites", "resid_pre,z", "--quiet"]
    assert main(argv) == 0
    capsys.readouterr()
    real = patching.activation_patching
    calls = []

    def stopped_at_the_second_site(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(patching, "activation_patching", stopped_at_the_second_site)
    assert _code([*argv, "--corrupted", str(root / "corrupted.npy")]) == 130
    err = capsys.readouterr().err
    assert "pypattern patch: interrupted" in err
    assert (
        f"pypattern patch: note: --out {str(out)!r} now holds patch_resid_pre.csv of this stopped run beside "
        "patch_summary.json, patch_z.csv of an earlier run" in err
    ), err
    calls.clear()
    monkeypatch.setattr(
        patching, "activation_patching", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt)
    )
    assert _code(argv) == 130
    assert "note:" not in capsys.readouterr().err


def test_a_resumed_llc_with_one_option_changed_is_refused_naming_it(folders, tmp_path, capsys):
    """An llc --checkpoint met by a run with another --num-chains, --num-burnin-steps, --batch-size or --data
    (same shape, one id changed) is refused in one line naming the option behind the difference."""
    root, tokens, _ = folders
    other = tokens.copy()
    other[3, 4] = (other[3, 4] + 1) % VOCAB
    np.save(tmp_path / "other.npy", other)
    base = [
        "llc",
        "--model",
        str(root / "qwen2"),
        "--out",
        str(tmp_path / "o"),
        "--checkpoint",
        str(tmp_path / "ck"),
    ]
    run = {
        "--data": str(root / "tokens.npy"),
        "--num-chains": "2",
        "--num-burnin-steps": "1",
        "--batch-size": "4",
    }
    fixed = ["--num-draws", "2", "--step-size", "1e-4", "--quiet"]
    assert main([*base, *fixed, *[a for kv in run.items() for a in kv]]) == 0
    capsys.readouterr()
    for flag, value, hint in (
        ("--num-chains", "3", "--num-chains: another number of chains"),
        ("--num-burnin-steps", "2", "--num-burnin-steps: another number of burn-in steps"),
        ("--batch-size", "2", "--data or --batch-size: other data or batches"),
        ("--data", str(tmp_path / "other.npy"), "--data or --batch-size: other data or batches"),
    ):
        changed = {**run, flag: value}
        assert _code([*base, *fixed, *[a for kv in changed.items() for a in kv]]) == 2
        err = capsys.readouterr().err
        assert "was written by a different run" in err and f"(on the command line: {hint})" in err, (
            flag,
            err,
        )
        assert err.count("\n") == 1 and "Traceback" not in err


def test_the_program_exits_2_with_one_line_for_a_pickle_only_folder(folders, bad_folders, tmp_path):
    """`python -m pypattern llc` on a folder with only pytorch_model.bin: exit status 2, one line on stderr."""
    root, _, _ = folders
    argv = ["llc", "--model", str(bad_folders / "bin_only"), "--data", str(root / "tokens.npy")]
    proc = subprocess.run(
        [sys.executable, "-m", "pypattern", *argv, "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "never loads because that would unpickle" in proc.stderr


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func), {k.arg: k.value for k in node.keywords}


def test_no_code_path_of_the_library_unpickles():
    """In pypattern/: torch.load only with weights_only=True, numpy's load only with allow_pickle=False, no
    pickle / marshal / torch.jit loads; results are written with numpy.savez (pypattern.io) and JSON."""
    package = pathlib.Path(pp.__file__).resolve().parent
    loads, saves = [], []
    for f in sorted(package.rglob("*.py")):
        for node, name, kw in _calls(ast.parse(f.read_text())):
            where = f"{f.relative_to(package)}:{node.lineno} {name}"
            if name.split(".")[-1] in ("load", "loads") and name.split(".")[0] in (
                "torch", "pickle", "cPickle", "dill", "joblib", "marshal", "np", "numpy", "shelve"
            ):  # fmt: skip
                flag = {"torch": "weights_only", "np": "allow_pickle", "numpy": "allow_pickle"}.get(
                    name.split(".")[0]
                )
                want = flag == "weights_only"
                ok = flag is not None and isinstance(kw.get(flag), ast.Constant) and kw[flag].value is want
                loads.append((where, ok))
            if name in ("torch.save", "pickle.dump", "pickle.dumps", "np.save", "numpy.save"):
                saves.append(where)
    assert [w for w, ok in loads if not ok] == []
    assert any(
        w.startswith("io.py") and w.endswith("np.load") for w, _ in loads
    )  # np_load, allow_pickle=False
    assert saves == []
