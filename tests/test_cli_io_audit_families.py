"""`pypattern patch|llc|chi|circuit --model DIR --data FILE` on save_pretrained folders of six families (GPT-2,
GPT-NeoX with partial rotary and parallel attention + MLP, Llama with grouped-query attention and tied embeddings,
Mistral with sliding-window attention, Qwen2, Phi), each with token ids in another of the documented formats: the
patching grids written equal a patching loop written here with forward hooks on the Hugging Face model itself, and
the files written read back with the library's loaders. Then the result files: every result kind round-trips
save -> load exactly, and what load refuses, save refuses by field, writing nothing."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import pickle

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import pypattern as pp  # noqa: E402
from pypattern import io  # noqa: E402
from pypattern.cli import main  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::pypattern.NonStationaryWarning"),
]

VOCAB = 31
SHAPE = (4, 6)

CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=12, n_layer=2, n_head=3, n_positions=16, bos_token_id=0, eos_token_id=0
    ),
    "neox": lambda: transformers.GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=20,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        rotary_pct=0.5,
        use_parallel_residual=True,
    ),
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=24,
        intermediate_size=20,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=16,
        tie_word_embeddings=True,
    ),
    # a window shorter than the sequences: the last position reads positions 3..5 only
    "mistral": lambda: transformers.MistralConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=20,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=4,
        max_position_embeddings=16,
        sliding_window=3,
    ),
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=20,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
    ),
    "phi": lambda: transformers.PhiConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=20,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        partial_rotary_factor=0.5,
    ),
}

#: the token file format each family's run reads
FORMATS = {
    "gpt2": "tokens.npy",
    "neox": "tokens.txt",
    "llama": "tokens.csv",
    "mistral": "tokens.tsv",
    "qwen2": "tokens.npz",
    "phi": "only.npz",
}


def _write_tokens(folder, stem: str, ids: np.ndarray) -> None:
    np.save(folder / f"{stem}.npy", ids)
    np.savez(folder / f"{stem}.npz", tokens=ids)
    np.savez(folder / f"only_{stem}.npz", ids.astype(np.int32))  # its one array, not named tokens
    (folder / f"{stem}.txt").write_text("\n".join(" ".join(map(str, r)) for r in ids) + "\n")
    (folder / f"{stem}.csv").write_text("\r\n".join(",".join(map(str, r)) for r in ids))
    (folder / f"{stem}.tsv").write_text("\n".join("\t".join(map(str, r)) for r in ids))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    for arch, cfg in CONFIGS.items():
        torch.manual_seed(0)
        hf = transformers.AutoModelForCausalLM.from_config(cfg()).eval()
        with torch.no_grad():  # weights far enough from the initialisation that every site matters
            for p in hf.parameters():
                p.add_(0.3 * torch.randn_like(p))
        hf.save_pretrained(root / arch)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCAB, size=SHAPE)
    corrupted = tokens.copy()
    corrupted[:, 3] = (corrupted[:, 3] + 1 + rng.integers(0, VOCAB - 1, size=SHAPE[0])) % VOCAB
    _write_tokens(root, "tokens", tokens)
    _write_tokens(root, "corrupted", corrupted)
    (root / "only.npz").write_bytes((root / "only_tokens.npz").read_bytes())
    return root, tokens, corrupted


def _code(argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def _layers(hf):
    for path in ("transformer.h", "gpt_neox.layers", "model.layers"):
        obj = hf
        try:
            for name in path.split("."):
                obj = getattr(obj, name)
        except AttributeError:
            continue
        return list(obj)
    raise AssertionError(type(hf).__name__)


def _hf_last_log_probs(hf, tokens, hook=None):
    handles = []
    if hook is not None:
        layer, fn = hook
        handles.append(_layers(hf)[layer].register_forward_pre_hook(fn, with_kwargs=True))
    try:
        with torch.no_grad():
            return torch.log_softmax(hf(torch.as_tensor(tokens)).logits[:, -1].double(), -1)
    finally:
        for h in handles:
            h.remove()


def _resid_pre_inputs(hf, tokens) -> list[torch.Tensor]:
    """The hidden states entering each decoder layer (the residual stream before it) on ``tokens``."""
    seen = []

    def grab(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    handles = [layer.register_forward_pre_hook(grab, with_kwargs=True) for layer in _layers(hf)]
    try:
        with torch.no_grad():
            hf(torch.as_tensor(tokens))
    finally:
        for h in handles:
            h.remove()
    return seen


def _naive_resid_pre_grid(hf, clean, corrupted) -> np.ndarray:
    """Denoising at resid_pre, one HF forward per (layer, position): the corrupted run with the clean hidden
    state restored at that layer's input and position; the metric KL(P_clean || P_run) at the last position,
    normalised as the command's table: mean over prompts of (m - m_corr) / mean(m_clean - m_corr)."""
    clean_lp = _hf_last_log_probs(hf, clean)

    def kl(lp):
        return (clean_lp.exp() * (clean_lp - lp)).sum(-1)

    m_corr = kl(_hf_last_log_probs(hf, corrupted))
    gap = (0.0 - m_corr).mean()
    cache = _resid_pre_inputs(hf, clean)
    n_layers, seq = len(cache), clean.shape[1]
    grid = np.zeros((n_layers, seq))
    for layer in range(n_layers):
        for pos in range(seq):

            def restore(module, args, kwargs, layer=layer, pos=pos):
                h = (args[0] if args else kwargs["hidden_states"]).clone()
                h[:, pos] = cache[layer][:, pos]
                if args:
                    return (h, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": h}

            m = kl(_hf_last_log_probs(hf, corrupted, (layer, restore)))
            grid[layer, pos] = float(((m - m_corr) / gap).mean())
    return grid


def _csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("float64", [False, True], ids=["float32", "float64"])
@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_patch_grid_of_each_family_is_a_hooked_loop_on_the_hf_model(arch, float64, folders, tmp_path):
    """`patch --model DIR --data FILE --corrupted FILE2` (and with --float64): patch_resid_pre.csv equals the
    patching loop above on the HF model itself (no conversion, no engine; in float64 to 1e-10), each family
    reading its tokens from another format; the default sites all written (resid_pre alone in float64); a sliding
    window's positions out of reach patch nothing."""
    root, tokens, corrupted = folders
    out = tmp_path / "out"
    data, corr = FORMATS[arch], FORMATS[arch].replace("tokens", "corrupted").replace("only", "only_corrupted")
    argv = ["patch", "--model", str(root / arch), "--data", str(root / data), "--corrupted", str(root / corr)]
    argv += ["--sites", "resid_pre", "--float64"] if float64 else []
    assert main([*argv, "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "patch_summary.json").read_text())
    assert set(summary["sites"]) == ({"resid_pre"} if float64 else {"resid_pre", "attn_out", "mlp_out", "z"})
    assert summary["prompts"] == SHAPE[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(root / arch).eval()
    want = _naive_resid_pre_grid(hf.double() if float64 else hf, tokens, corrupted)
    rows = _csv(out / "patch_resid_pre.csv")
    got = np.full_like(want, np.nan)
    for r in rows:
        got[int(r["layer"]), int(r["pos"])] = float(r["mean"])
    if float64:
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert np.abs(want).max() > 0.05  # the patch acted
    if arch == "mistral":  # layer 1 at position 5 reads layer-1 inputs 3..5, which read layer-0 inputs 1..5
        assert np.abs(want[0, 0]) < 1e-6 and np.abs(want[1, :3]).max() < 1e-6
        assert np.abs(got[0, 0]) < 1e-6 and np.abs(got[1, :3]).max() < 1e-6
        assert np.abs(got[0, 1:]).max() > 1e-3


def test_a_bfloat16_checkpoint_is_patched_as_its_exact_float32_copy(folders, tmp_path):
    """A bfloat16 save_pretrained folder: patched as its float32 copy (said in a warning), the grid that of the
    hooked loop on the HF model with the same weights in float64, up to float32 rounding."""
    root, tokens, corrupted = folders
    hf = transformers.AutoModelForCausalLM.from_pretrained(root / "qwen2").to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "bf16")
    argv = ["patch", "--model", str(tmp_path / "bf16"), "--data", str(root / "tokens.npy")]
    argv += ["--corrupted", str(root / "corrupted.npy"), "--sites", "resid_pre", "--out", str(tmp_path / "o")]
    with pytest.warns(UserWarning, match="holds torch.bfloat16 weights .* patching its float32 copy"):
        assert main([*argv, "--quiet"]) == 0
    want = _naive_resid_pre_grid(hf.double().eval(), tokens, corrupted)
    got = np.full_like(want, np.nan)
    for r in _csv(tmp_path / "o" / "patch_resid_pre.csv"):
        got[int(r["layer"]), int(r["pos"])] = float(r["mean"])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["mistral", "phi"])
def test_default_patch_is_activation_patching_with_gaussian_noise(arch, folders, tmp_path):
    """Without --corrupted and --sites: every default site's table is activation_patching's grid (Gaussian noise
    of seed 0, KL metric) normalised, computed here on the converted model."""
    from pypattern.patching import KL, GaussianNoise

    root, tokens, _ = folders
    out = tmp_path / "out"
    assert (
        main(["patch", "--model", str(root / arch), "--data", str(root / "tokens.npy"), "--out", str(out)])
        == 0
    )
    model = pp.from_pretrained(root / arch).eval()
    for site in ("resid_pre", "attn_out", "mlp_out", "z"):
        res = pp.activation_patching(
            model,
            site,
            torch.from_numpy(tokens),
            None,
            metric=KL(),
            corruption=GaussianNoise(seed=0),
            quiet=True,
        )
        gap = (res.clean - res.corrupted).double().mean()
        c = res.corrupted.double().view(-1, *([1] * (res.values.dim() - 1)))
        want = ((res.values.double() - c) / gap).mean(0)
        rows = _csv(out / f"patch_{site}.csv")
        assert len(rows) == want.numel()
        for r in rows:
            cell = tuple(int(r[a]) for a in res.axes)
            # float32 runs: the command's and this one's may round differently
            assert float(r["mean"]) == pytest.approx(float(want[cell]), rel=1e-5, abs=1e-6), (site, cell)
        assert float(want.abs().max()) > 0.01


SAMPLER = ["--num-chains=2", "--num-draws=3", "--num-burnin-steps=2", "--step-size=1e-4", "--batch-size=2"]


@pytest.mark.parametrize("arch", ["mistral", "phi"])
def test_llc_chi_and_circuit_files_read_back_with_the_loaders(arch, folders, tmp_path):
    """llc.npz and chi.npz load with LLCResult.load and SusceptibilityResult.load and hold the numbers of the
    summaries and of chi.csv; circuit writes its tables, whose edges are the model's graph."""
    from pypattern.circuits import edges

    root, tokens, corrupted = folders
    model_data = ["--model", str(root / arch), "--data", str(root / FORMATS[arch])]
    assert main(["llc", *model_data, "--out", str(tmp_path / "llc"), *SAMPLER, "--quiet"]) == 0
    summary = json.loads((tmp_path / "llc" / "llc_summary.json").read_text())
    llc = pp.LLCResult.load(tmp_path / "llc" / "llc.npz")
    assert summary["llc_mean"] == float(llc.llc_mean) and math.isfinite(summary["llc_mean"])
    assert np.asarray(llc.sample.loss_trace).shape[:2] == (2, 3)
    assert (summary["sequences"], summary["seq_len"]) == SHAPE

    assert main(["chi", *model_data, "--out", str(tmp_path / "chi"), *SAMPLER, "--num-probe=1"]) == 0
    chi = pp.SusceptibilityResult.load(tmp_path / "chi" / "chi.npz")
    lines = (tmp_path / "chi" / "chi.csv").read_text().splitlines()
    table = np.array([[float(v) for v in r.split(",")[1:]] for r in lines[1:]])
    assert [r.split(",")[0] for r in lines[1:]] == list(chi.components)
    np.testing.assert_array_equal(table, np.asarray(chi.chi))
    assert table.shape == (len(chi.components), SHAPE[1] - 1) and np.abs(table).max() > 0

    out = tmp_path / "circuit"
    argv = ["circuit", *model_data, "--corrupted", str(root / "corrupted.npy"), "--methods", "eap"]
    assert main([*argv, "--out", str(out), "--quiet"]) == 0
    rows = _csv(out / "edge_scores.csv")
    names = [e.name for e in edges(pp.from_pretrained(root / arch))]
    assert sorted(r["name"] for r in rows) == sorted(names)
    assert all(math.isfinite(float(r["score"])) for r in rows)
    for name in ("circuit.csv", "pruning_curve.csv", "pruning_curve.png", "circuit.png"):
        assert (out / name).stat().st_size > 0


@pytest.fixture
def bad_files(folders, tmp_path):
    root, tokens, _ = folders
    np.save(tmp_path / "beyond.npy", np.where(tokens == tokens.max(), VOCAB, tokens))
    np.save(tmp_path / "floats.npy", tokens.astype(np.float32))
    (tmp_path / "empty.txt").write_text("")
    np.save(tmp_path / "empty.npy", np.zeros((0, 6), dtype=np.int64))
    np.save(tmp_path / "flat.npy", tokens.ravel())
    np.save(tmp_path / "cube.npy", tokens[None])
    (tmp_path / "neg.csv").write_text("1,2,-3\n4,5,6\n")
    return tmp_path


BAD_TOKENS = {
    "beyond.npy": rf"token ids must lie in \[0, {VOCAB}\) for this model; found 0\.\.{VOCAB}",
    "floats.npy": "expected a non-empty integer array .* float32",
    "empty.txt": "holds no token id",
    "empty.npy": r"expected a non-empty integer array .*\(0, 6\)",
    "flat.npy": "holds a 1-D array of 24 ids; expected \\(num_sequences, seq_len\\)",
    "cube.npy": r"expected a non-empty integer array \(num_sequences, seq_len\), got shape \(1, 4, 6\)",
    "neg.csv": r"token ids must be >= 0; found -3\.\.6",
}


@pytest.mark.parametrize("cmd", ["llc", "patch", "chi", "circuit"])
@pytest.mark.parametrize("name", sorted(BAD_TOKENS))
def test_token_files_the_model_cannot_read_end_in_one_line_naming_data(cmd, name, folders, bad_files, capsys):
    root, _, _ = folders
    argv = [
        cmd,
        "--model",
        str(root / "mistral"),
        "--data",
        str(bad_files / name),
        "--out",
        str(bad_files / "o"),
    ]
    assert _code(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "--data" in err and name in err, err
    assert __import__("re").search(BAD_TOKENS[name], err), err


@pytest.fixture
def no_unpickling(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("something was unpickled")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)


@pytest.mark.parametrize("cmd", ["llc", "patch", "chi", "circuit"])
def test_model_folders_that_cannot_be_read_are_refused_without_unpickling(
    cmd, folders, tmp_path, capsys, no_unpickling
):
    """A missing folder, one without config.json and a .bin (pickle) checkpoint are refused in one line naming
    --model, and nothing is unpickled."""
    root, _, _ = folders
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(CONFIGS["qwen2"]())
    (tmp_path / "bin").mkdir()
    hf.config.save_pretrained(tmp_path / "bin")
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")  # the checkpoint older releases write
    (tmp_path / "noconfig").mkdir()
    (tmp_path / "noconfig" / "model.safetensors").write_bytes(
        (root / "qwen2" / "model.safetensors").read_bytes()
    )
    for folder, words in (
        (tmp_path / "missing", ["missing"]),
        (tmp_path / "noconfig", ["config.json"]),
        (tmp_path / "bin", ["pytorch_model.bin", "safetensors"]),
    ):
        argv = [cmd, "--model", str(folder), "--data", str(root / "tokens.npy"), "--out", str(tmp_path / "o")]
        assert _code(argv) == 2, folder
        err = capsys.readouterr().err.strip()
        assert "Traceback" not in err and "--model" in err, err
        assert all(w in err for w in words), err
        assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


# ------------------------------------------------------------------------------------------------ result files


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and torch.equal(a, b)
            or (
                isinstance(b, torch.Tensor)
                and a.dtype == b.dtype
                and a.shape == b.shape
                and torch.equal(torch.isnan(a), torch.isnan(b))
                and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))
            )
        )
    if isinstance(a, np.ndarray):
        return (
            isinstance(b, np.ndarray)
            and a.dtype == b.dtype
            and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")
        )
    if isinstance(a, np.generic):
        return type(a) is type(b) and (a == b or (np.isnan(a) and np.isnan(b)))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if dataclasses.is_dataclass(a):
        return type(a) is type(b) and all(
            _same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a)
        )
    return type(a) is type(b) and a == b


#: the kinds other tests round-trip as the API makes them: tests/test_results_api_round_trip.py (AutoStepReport
#: nested in an LLCResult of step_size="auto"), tests/test_circuits_eval.py (PruningCurve),
#: tests/test_equivalence_users_fuzz.py (EquivalenceResult) and tests/test_train_result_saves.py (TrainResult)
ROUND_TRIPPED_ELSEWHERE = {
    "AutoStepReport",
    "CalibrationResult",
    "EquivalenceResult",
    "FlagReport",
    "FlagTrainResult",
    "Intervention",
    "LLCResult",
    "OnlineLLCResult",
    "PruningCurve",
    "RefinedLLCResult",
    "SimilarityTest",
    "TrainResult",
}


def _regression_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 3, generator=g)
    y = x @ torch.randn(3, 1, generator=g) + 0.1 * torch.randn(24, 1, generator=g)
    return [(x[i : i + 8], y[i : i + 8]) for i in range(0, 24, 8)], x, y


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))


KW = dict(
    num_chains=2, num_draws=4, num_burnin_steps=1, step_size=1e-3, nbeta=10.0, localization=10.0, quiet=True
)


def _results_made_by_the_api() -> dict:
    from pypattern.patching import KL

    data, x, y = _regression_data()
    out = {}
    out["SampleResult"] = pp.sample(_mlp(), data, **KW)
    chi = pp.susceptibilities(
        _mlp(), data, (x[:3], y[:3]), {"first": ["0.weight"], "last": ["2.weight"]}, **KW
    )
    out["SusceptibilityResult"] = chi
    out["PCAResult"] = chi.pca(1)
    out["BIFResult"] = pp.bif(_mlp(), data, (x[:3], y[:3]), **KW)
    cfg = pp.TransformerConfig(n_layers=2, d_model=8, n_heads=2, d_mlp=16, d_vocab=12, n_ctx=8, seed=0)
    model = pp.Transformer(cfg)
    clean = torch.randint(0, 12, (3, 8), generator=torch.Generator().manual_seed(1))
    out["PatchResult"] = pp.activation_patching(model, "z", clean, clean.flip(0), metric=KL(), quiet=True)
    atp = pp.attribution_patching(model, clean, clean.flip(0), metric=KL(), sites=("z",), grad_drop=True)
    out["PatchResult (AtP*)"] = atp["z"]  # its info holds the GradDrop scores, a tensor
    return out


def test_every_result_kind_round_trips_exactly(tmp_path):
    """Each registered result kind not round-tripped in test_results_api_round_trip, made by the API, comes back
    field for field (dtypes, NaN, tuples, NumPy scalars and nested results included); the kinds made here and those
    round-tripped elsewhere are every registered kind."""
    made = _results_made_by_the_api()
    kinds = {type(r).__name__ for r in made.values()}
    # the library's kinds (a test module may register classes of its own in the same process)
    library = {k for k, c in io._RESULTS.items() if c.__module__.startswith("pypattern")}
    assert kinds | ROUND_TRIPPED_ELSEWHERE >= library, library - kinds - ROUND_TRIPPED_ELSEWHERE
    for name, res in made.items():
        path = tmp_path / f"{name}.npz"
        res.save(path)
        back = type(res).load(path)
        assert _same(res, back), name


def _patch_result(**change):
    from pypattern.patching.results import PatchResult

    fields = dict(
        values=torch.rand(2, 3, dtype=torch.float64),
        clean=torch.zeros(2, dtype=torch.float64),
        corrupted=torch.ones(2, dtype=torch.float64),
        axes=("layer",),
        coords={"layer": [0, 1, 2]},
        site="resid_pre",
        metric="kl",
    )
    return PatchResult(**{**fields, **change})


def _intervention(**change):
    from pypattern.patterning import Intervention

    fields = dict(
        h=np.array([0.5, -0.5]),
        weights=np.array([2.0, 0.0]),
        predicted=np.array([1.0]),
        target=np.array([1.0]),
        residual=0.0,
        method="pinv",
    )
    return Intervention(**{**fields, **change})


def _llc_with_a_short_trace():
    data, _, _ = _regression_data()
    res = pp.estimate_llc(_mlp(), data, **KW)
    trace = np.asarray(res.sample.loss_trace)[:, :2]
    return dataclasses.replace(res, sample=dataclasses.replace(res.sample, loss_trace=trace))


#: results load refuses, and the words its refusal (and save's) names them by
REFUSED = {
    "integer patch values": (
        lambda: _patch_result(values=torch.ones(2, 3, dtype=torch.int64)),
        "values",
        "int64",
    ),
    "patch values as an ndarray": (lambda: _patch_result(values=np.ones((2, 3))), "values", "Tensor"),
    "axes of another length": (lambda: _patch_result(axes=("layer", "pos")), "axes", "grid dimensions"),
    "NaN in an intervention": (lambda: _intervention(h=np.array([np.nan, 0.0])), "h", "NaN"),
    "a negative residual": (lambda: _intervention(residual=-1.0), "residual", ">= 0"),
    "an unknown method": (lambda: _intervention(method="lstsq"), "method", "lstsq"),
    "a nested result that disagrees": (_llc_with_a_short_trace, "loss_trace", "(2, 2)"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_save_refuses_by_field_what_load_refuses_and_writes_nothing(case, tmp_path):
    """Each result above, written unchecked (io._write_result, as tests build damaged files), is refused by load
    naming the field; save refuses it first, naming the class, the field and the file, and leaves the file that
    was at the path as it was (and writes none where there was none)."""
    make, field, detail = REFUSED[case]
    res = make()
    cls = type(res)
    io._write_result(res, tmp_path / "written.npz")
    with pytest.raises(io.FormatError) as loaded:
        cls.load(tmp_path / "written.npz")
    assert field in str(loaded.value) and detail in str(loaded.value)
    with pytest.raises(ValueError) as saved:
        res.save(tmp_path / "new.npz")
    msg = str(saved.value)
    assert not isinstance(saved.value, io.FormatError)
    assert (
        f"cannot save this {cls.__name__}" in msg and "new.npz" in msg and field in msg and detail in msg
    ), msg
    assert not (tmp_path / "new.npz").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["written.npz"]  # no temporary left
    before = (tmp_path / "written.npz").read_bytes()
    with pytest.raises(ValueError, match="cannot save"):
        res.save(tmp_path / "written.npz")
    assert (tmp_path / "written.npz").read_bytes() == before


def test_results_save_checks_do_not_copy_or_change_what_they_save(tmp_path):
    """The check save runs reads the result's own tensors and arrays (a read-only array and a bfloat16 tensor
    included) and leaves them as they were; what it wrote loads equal."""
    values = torch.rand(2, 3).to(torch.bfloat16)
    res = _patch_result(values=values, clean=torch.zeros(2, dtype=torch.bfloat16), corrupted=None)
    res.info["frozen"] = np.broadcast_to(np.arange(3.0), (2, 3))  # read-only
    res.save(tmp_path / "r.npz")
    back = type(res).load(tmp_path / "r.npz")
    assert back.values.dtype == torch.bfloat16 and torch.equal(back.values, values)
    assert res.values is values and not res.info["frozen"].flags.writeable
    np.testing.assert_array_equal(back.info["frozen"], res.info["frozen"])


UNSAVEABLE = {
    "longdouble": (lambda: np.longdouble(1) / 3, "a NumPy float128 cannot be saved"),
    "clongdouble": (lambda: np.clongdouble(1j), "a NumPy complex256 cannot be saved"),
    "sparse": (lambda: torch.eye(2).to_sparse(), "layout torch.sparse_coo cannot be saved"),
    "csr": (lambda: torch.eye(2).to_sparse_csr(), "layout torch.sparse_csr cannot be saved"),
    "meta": (lambda: torch.empty(2, device="meta"), "a meta tensor"),
    "complex32": (lambda: torch.zeros(1, dtype=torch.complex32), "dtype complex32 cannot be saved"),
}


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("case", sorted(UNSAVEABLE))
def test_values_a_file_cannot_hold_are_refused_naming_the_field(case, tmp_path):
    """A NumPy scalar wider than JSON's float64 and a tensor NumPy cannot hold (sparse, meta, complex32) in a
    result: a TypeError naming the field's path, not numpy's or json's own error, and no file."""
    if case in ("longdouble", "clongdouble") and np.dtype(np.longdouble).itemsize <= 8:
        pytest.skip("long double is a float64 here")
    make, words = UNSAVEABLE[case]
    with pytest.raises(TypeError) as e:
        _patch_result(info={"deep": [make()]}).save(tmp_path / "r.npz")
    assert str(e.value).startswith("info/deep/0: ") and words in str(e.value), str(e.value)
    assert not (tmp_path / "r.npz").exists()
