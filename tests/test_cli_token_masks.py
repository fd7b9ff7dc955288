"""`pypattern llc|chi|patch|circuit --model DIR --data FILE` on padded token files: an ``.npz`` holding an
``attention_mask`` beside its ``tokens`` (or ``input_ids``), padded on the left or on the right."""

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from pypattern.cli import main  # noqa: E402
from pypattern.experiments.user_model import load_tokens  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # the runs here are a few steps long: only what they read is checked, not the draws' convergence
    pytest.mark.filterwarnings("ignore:.*step_size=0.0001 is too small for this run"),
]

V = 23
LENGTHS = [7, 5, 3, 7, 4, 6]  # real tokens per sequence; 7 columns


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=16,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d, safe_serialization=True)
    return d


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """Learned absolute positions: a left-padded row read at shifted positions would give other losses."""
    d = tmp_path_factory.mktemp("gpt2")
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=16, n_layer=2, n_head=2, n_positions=16)
    torch.manual_seed(1)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(d, safe_serialization=True)
    return d


def _padded(side: str, pad: int = 0, seed: int = 0):
    """Sequences of LENGTHS real tokens padded with ``pad`` on ``side``: (ids, mask, the real rows)."""
    rng = np.random.default_rng(seed)
    T = max(LENGTHS)
    ids = np.full((len(LENGTHS), T), pad, dtype=np.int64)
    mask = np.zeros((len(LENGTHS), T), dtype=np.int64)
    rows = []
    for i, n in enumerate(LENGTHS):
        r = rng.integers(1, V, size=n)
        cols = slice(T - n, T) if side == "left" else slice(0, n)
        ids[i, cols], mask[i, cols] = r, 1
        rows.append(r)
    return ids, mask, rows


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("masked")
    out = {}
    for side in ("left", "right"):
        ids, mask, rows = _padded(side)
        np.savez(d / f"{side}.npz", tokens=ids, attention_mask=mask)
        # the corrupted prompts: one real token of each row replaced (its third from the end), the same mask
        corr = ids.copy()
        last = (mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)) if side == "right" else np.full(6, 6)
        for i, col in enumerate(last - 2):
            corr[i, col] = (corr[i, col] + 7) % V
        np.savez(d / f"{side}_corrupted.npz", input_ids=corr, attention_mask=mask)
        out[side] = (d / f"{side}.npz", d / f"{side}_corrupted.npz", ids, mask, corr, rows)
    return d, out


def _naive_loss(model_dir, rows) -> float:
    """The mean next-token loss over every real token of every sequence, each sequence run alone, unpadded,
    through the Hugging Face model's own forward (float64 sums)."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir).float().eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for r in rows:
            ids = torch.as_tensor(r)[None]
            logits = hf(input_ids=ids).logits[0, :-1].double()
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += len(r) - 1
    return total / count


def _err(argv, capsys) -> str:
    code = None
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err  # one line
    return err


SAMPLING = [
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


@pytest.mark.parametrize("side", ["left", "right"])
def test_llc_loss_at_w_star_is_the_masked_loss_of_each_sequence_alone(side, gpt2_dir, files, tmp_path):
    """One batch of all six sequences: L_n(w*) is the mean over every real next-token term, equal to the loss of
    each sequence run alone, unpadded, through the Hugging Face model (left-padded rows at their own positions
    0..n-1: the model reads learned absolute positions)."""
    from pypattern import LLCResult

    path, _, ids, mask, _, rows = files[1][side]
    out = tmp_path / "llc"
    argv = ["llc", "--model", str(gpt2_dir), "--data", str(path), "--batch-size", "6", "--out", str(out)]
    assert main(argv + SAMPLING) == 0
    res = LLCResult.load(out / "llc.npz")
    naive = _naive_loss(gpt2_dir, rows)
    assert res.init_loss == pytest.approx(naive, rel=1e-5)
    summary = json.loads((out / "llc_summary.json").read_text())
    assert summary["real_tokens"] == sum(LENGTHS) and summary["seq_len"] == 7
    # the library's own masked loss on the dict batch (as the command builds it) agrees
    import pypattern
    from pypattern.losses import batch_loss
    from pypattern.models.transformer import real_token_positions

    model = pypattern.from_pretrained(gpt2_dir).float()
    batch = {"input_ids": torch.as_tensor(ids), "attention_mask": torch.as_tensor(mask)}
    if side == "left":
        batch["position_ids"] = real_token_positions(batch["attention_mask"].bool())
    with torch.no_grad():
        assert float(batch_loss(model, batch)) == pytest.approx(naive, rel=1e-5)
    # other pad ids at the padding: the same loss (padding is left out)
    other = np.where(mask == 1, ids, 9)
    np.savez(tmp_path / "pad9.npz", tokens=other, attention_mask=mask)
    out9 = tmp_path / "llc9"
    argv9 = ["llc", "--model", str(gpt2_dir), "--data", str(tmp_path / "pad9.npz"), "--batch-size", "6"]
    assert main(argv9 + ["--out", str(out9)] + SAMPLING) == 0
    assert LLCResult.load(out9 / "llc.npz").init_loss == pytest.approx(res.init_loss, rel=1e-6)


def test_batches_keep_each_rows_ids_and_mask_together(files):
    """Shuffled batches of 4 (the last short one too) hold each sequence's ids with its own mask (and, left-padded,
    its own positions from 0)."""
    from pypattern.experiments.user_model import _batches

    for side in ("left", "right"):
        _, _, ids, mask, _, _ = files[1][side]
        loader = _batches(torch.as_tensor(ids), 4, torch.as_tensor(mask))
        torch.manual_seed(3)
        seen = []
        for b in loader:
            assert set(b) == ({"input_ids", "attention_mask", "position_ids"} if side == "left" else
                              {"input_ids", "attention_mask"})  # fmt: skip
            for i in range(b["input_ids"].shape[0]):
                row = int(np.flatnonzero((ids == b["input_ids"][i].numpy()).all(1))[0])
                assert np.array_equal(b["attention_mask"][i].numpy(), mask[row])
                if side == "left":
                    n = LENGTHS[row]
                    assert b["position_ids"][i, -n:].tolist() == list(range(n))
                seen.append(row)
        assert sorted(seen) == list(range(6)) and seen != list(range(6))  # every row once, shuffled


def test_a_resume_with_another_mask_is_another_run(gpt2_dir, files, tmp_path, capsys):
    """The checkpoint fingerprints the mask: the same tokens with another mask are refused as another run; the
    same file resumes."""
    path, _, ids, mask, _, _ = files[1]["right"]
    other = mask.copy()
    other[1, 5] = 1  # one more real token in row 1 (its id was padding)
    assert not np.array_equal(other, mask)
    np.savez(tmp_path / "other.npz", tokens=ids, attention_mask=other)
    ck = tmp_path / "ck"
    argv = ["llc", "--model", str(gpt2_dir), "--batch-size", "3", "--checkpoint", str(ck), *SAMPLING]
    assert main([*argv, "--data", str(path), "--out", str(tmp_path / "a")]) == 0
    assert main([*argv, "--data", str(path), "--out", str(tmp_path / "b")]) == 0  # resumed
    err = _err([*argv, "--data", str(tmp_path / "other.npz"), "--out", str(tmp_path / "c")], capsys)
    assert "pypattern llc: error: checkpoint" in err and "data = " in err


@pytest.mark.parametrize("side", ["left", "right"])
def test_patch_equals_activation_patching_with_the_mask(side, llama_dir, files, tmp_path, capsys):
    """patch on a padded file is activation_patching(..., attention_mask=mask) with KL read at each prompt's last
    real token (the last column when left-padded, per prompt when right-padded)."""
    import pypattern
    from pypattern.patching import KL

    path, cpath, ids, mask, corr, _ = files[1][side]
    out = tmp_path / "patch"
    argv = [
        "patch",
        "--model",
        str(llama_dir),
        "--data",
        str(path),
        "--corrupted",
        str(cpath),
        "--out",
        str(out),
    ]
    assert main(argv + ["--sites", "resid_pre", "--quiet"]) == 0
    assert "metric: KL at each prompt's last real token" in capsys.readouterr().out
    model = pypattern.from_pretrained(llama_dir)
    m = torch.as_tensor(mask)
    last = torch.as_tensor([6] * 6) if side == "left" else m.shape[1] - 1 - m.flip(-1).argmax(-1)
    assert last.tolist() == ([6] * 6 if side == "left" else [n - 1 for n in LENGTHS])
    ref = pypattern.activation_patching(
        model, "resid_pre", torch.as_tensor(ids), torch.as_tensor(corr), metric=KL(position=last),
        attention_mask=m, quiet=True,
    )  # fmt: skip
    ref.to_csv(str(tmp_path / "ref.csv"), normalized=True)
    got = np.genfromtxt(out / "patch_resid_pre.csv", delimiter=",", names=True, dtype=None, encoding=None)
    want = np.genfromtxt(tmp_path / "ref.csv", delimiter=",", names=True, dtype=None, encoding=None)
    assert got.dtype.names == want.dtype.names and len(got) == len(want) == 2 * 7
    np.testing.assert_allclose(got["mean"], want["mean"], rtol=1e-5, atol=1e-7)
    assert np.abs(got["mean"]).max() > 0.1  # the patch acts
    summary = json.loads((out / "patch_summary.json").read_text())
    assert summary["attention_mask"] is True and summary["sites"]["resid_pre"]["normalized"]
    if side == "right":
        assert summary["metric_position"] == [n - 1 for n in LENGTHS]
        # the last column (padding) would read another metric
        col = pypattern.activation_patching(
            model, "resid_pre", torch.as_tensor(ids), torch.as_tensor(corr), metric=KL(), quiet=True
        )
        assert not torch.allclose(col.values, ref.values)


def test_padded_files_refused_with_one_line_errors(llama_dir, files, tmp_path, capsys):
    d, f = files
    path, cpath, ids, mask, corr, _ = f["right"]
    base = ["--model", str(llama_dir), "--out", str(tmp_path / "o")]
    np.savez(tmp_path / "shape.npz", tokens=ids, attention_mask=mask[:, :6])
    err = _err(["llc", *base, "--data", str(tmp_path / "shape.npz"), *SAMPLING], capsys)
    assert (
        f"pypattern llc: error: --data {str(tmp_path / 'shape.npz')!r}: its array 'attention_mask' has shape "
        in err
    )
    assert "(6, 6); it must equal the shape of its token array 'tokens', (6, 7)" in err
    bad = mask.copy()
    bad[2, 3] = 2
    np.savez(tmp_path / "values.npz", input_ids=ids, attention_mask=bad)
    err = _err(["patch", *base, "--data", str(tmp_path / "values.npz")], capsys)
    assert (
        "pypattern patch: error: --data" in err and "'attention_mask' must hold 1 (a real token) or 0" in err
    )
    assert "found 2 at row 2, column 3" in err
    empty = mask.copy()
    empty[4] = 0
    np.savez(tmp_path / "empty.npz", tokens=ids, attention_mask=empty)
    err = _err(["chi", *base, "--data", str(tmp_path / "empty.npz"), *SAMPLING], capsys)
    assert "'attention_mask' row 4 is all 0 (padding only)" in err
    # the corrupted prompts' mask must be the data's
    other = mask.copy()
    other[0, 6] = 0
    np.savez(tmp_path / "cmask.npz", tokens=corr, attention_mask=other)
    err = _err(["patch", *base, "--data", str(path), "--corrupted", str(tmp_path / "cmask.npz")], capsys)
    assert (
        f"error: --corrupted {str(tmp_path / 'cmask.npz')!r}: its array 'attention_mask' differs from the mask"
        in err
    )
    assert "(first at row 0)" in err
    np.save(tmp_path / "plain.npy", ids)
    err = _err(["patch", *base, "--data", str(tmp_path / "plain.npy"), "--corrupted", str(cpath)], capsys)
    assert "differs from the mask of --data" in err and "(it has none: all 1s)" in err
    # several arrays, none named tokens or input_ids: refused naming them, as before
    np.savez(tmp_path / "names.npz", ids=ids, attention_mask=mask)
    err = _err(["llc", *base, "--data", str(tmp_path / "names.npz"), *SAMPLING], capsys)
    assert "holds ['ids', 'attention_mask']: name the token array 'tokens' (or 'input_ids')" in err


def test_token_files_read_with_and_without_a_mask(files, tmp_path):
    """load_tokens: ``input_ids`` is read as ``tokens``; a file without a mask gives None and the same ids as
    before; without ``with_mask`` a mask is refused (its padding would be read as text)."""
    path, cpath, ids, mask, corr, _ = files[1]["left"]
    t, m = load_tokens(path, with_mask=True)
    assert torch.equal(t, torch.as_tensor(ids)) and torch.equal(m, torch.as_tensor(mask))
    t, m = load_tokens(cpath, with_mask=True)
    assert torch.equal(t, torch.as_tensor(corr)) and torch.equal(m, torch.as_tensor(mask))
    np.savez(tmp_path / "plain.npz", tokens=ids)
    for p in (tmp_path / "plain.npz",):
        t, m = load_tokens(p, with_mask=True)
        assert m is None and torch.equal(t, load_tokens(p)) and torch.equal(t, torch.as_tensor(ids))
    (tmp_path / "t.txt").write_text("\n".join(" ".join(map(str, r)) for r in ids))
    assert load_tokens(tmp_path / "t.txt", with_mask=True)[1] is None
    bools = mask.astype(bool)
    np.savez(tmp_path / "bool.npz", tokens=ids, attention_mask=bools)
    assert torch.equal(load_tokens(tmp_path / "bool.npz", with_mask=True)[1], torch.as_tensor(mask))
    with pytest.raises(
        ValueError, match=r"holds \['attention_mask'\] besides 'tokens'.*padding would be scored"
    ):
        load_tokens(path)


def test_a_file_without_a_mask_samples_as_before(gpt2_dir, tmp_path):
    """An .npz of tokens alone: plain token batches (a TensorDataset loader), the draws of estimate_llc on that
    loader."""
    import pypattern as pp
    from pypattern import LLCResult
    from pypattern.experiments.user_model import _batches
    from pypattern.losses import batch_loss

    ids, _, _ = _padded("right")
    ids = np.random.default_rng(5).integers(0, V, size=ids.shape)
    np.savez(tmp_path / "plain.npz", tokens=ids)
    assert isinstance(_batches(torch.as_tensor(ids), 3).dataset, torch.utils.data.TensorDataset)
    argv = ["llc", "--model", str(gpt2_dir), "--data", str(tmp_path / "plain.npz"), "--batch-size", "3"]
    assert main([*argv, "--out", str(tmp_path / "a"), *SAMPLING]) == 0
    res = LLCResult.load(tmp_path / "a" / "llc.npz")
    model = pp.from_pretrained(gpt2_dir).float()
    t = torch.as_tensor(ids)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(t), batch_size=3, shuffle=True)
    cfg = res.sample.config
    api = pp.estimate_llc(
        model, loader, loss_fn=batch_loss, num_chains=1, num_draws=2, num_burnin_steps=1, step_size=1e-4,
        localization=cfg["localization"], nbeta=cfg["nbeta"], seed=0, quiet=True, warn_nonstationary=False,
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(res.llc_per_chain), np.asarray(api.llc_per_chain))


def test_chi_probes_the_real_tokens_of_a_padded_file(llama_dir, files, tmp_path):
    """chi on a right-padded file: the probe's padding columns hold 0 (not counted), the real ones are finite."""
    path, _, ids, mask, _, _ = files[1]["right"]
    out = tmp_path / "chi"
    argv = ["chi", "--model", str(llama_dir), "--data", str(path), "--out", str(out), "--num-probe", "3",
            "--batch-size", "3", "--num-chains", "2", "--num-draws", "2", "--num-burnin-steps", "1",
            "--step-size", "1e-4", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    lines = (out / "chi.csv").read_text().splitlines()
    cols = lines[0].split(",")[1:]
    chi = np.array([[float(v) for v in r.split(",")[1:]] for r in lines[1:]])
    # column s<i>p<j> scores the token at position j of sequence i (predicted at j - 1): counted when it is real
    counted = np.array([mask[int(c[1 : c.index("p")]), int(c[c.index("p") + 1 :])] == 1 for c in cols])
    assert not counted.all() and counted.any()
    assert np.all(chi[:, ~counted] == 0) and np.isfinite(chi).all() and np.abs(chi[:, counted]).max() > 0


# ------------------------------------------------------------------------------------------------------- circuit


def _hf_last_logprobs(model_dir, ids, mask) -> torch.Tensor:
    """Each row's real tokens run alone, unpadded, through the Hugging Face model's own forward: the log-softmax at
    its last real token, ``(rows, vocab)``."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir).float().eval()
    out = []
    with torch.no_grad():
        for r, m in zip(ids, mask, strict=True):
            real = torch.as_tensor(r[m == 1])[None]
            out.append(torch.log_softmax(hf(input_ids=real).logits[0, -1].double(), -1))
    return torch.stack(out)


def _edge_scores(path, method: str) -> dict:
    """``{edge name: score}`` of one method in the command's ``edge_scores.csv``."""
    import pandas as pd

    df = pd.read_csv(path)
    df = df[df["method"] == method]
    return dict(zip(df["name"], df["score"], strict=True))


def _check_scores(got: dict, ref) -> None:
    want = dict(zip(ref.to_pandas()["name"], ref.to_pandas()["score"], strict=True))
    assert set(got) == set(want) and len(got) > 20
    names = sorted(want)
    np.testing.assert_allclose([got[n] for n in names], [want[n] for n in names], rtol=1e-5, atol=1e-9)
    assert max(abs(v) for v in want.values()) > 1e-4  # the edges act


@pytest.mark.parametrize("side", ["left", "right"])
def test_circuit_scores_equal_edge_attribution_with_the_mask(side, llama_dir, files, tmp_path):
    """circuit on a padded file with --corrupted: every method's scores are edge_attribution(...,
    attention_mask=mask) with the log-probability of the model's own top prediction read at each prompt's last real
    token (the last column when left-padded, per prompt when right-padded); that prediction, and the pruning curve's
    clean and corrupted ends, are those of each prompt run alone, unpadded, through the Hugging Face model."""
    import pypattern
    from pypattern.circuits import edge_attribution
    from pypattern.patching import LogProb

    path, cpath, ids, mask, corr, _ = files[1][side]
    out = tmp_path / "circuit"
    argv = ["circuit", "--model", str(llama_dir), "--data", str(path), "--corrupted", str(cpath),
            "--methods", "eap,exact", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((out / "circuit_summary.json").read_text())
    last = [6] * 6 if side == "left" else [n - 1 for n in LENGTHS]
    assert summary["attention_mask"] is True and summary["ablation"] == "resample"
    assert summary["metric_position"] == (
        "the last column (each prompt's last real token)" if side == "left" else last
    )
    clean_lp = _hf_last_logprobs(llama_dir, ids, mask)
    corr_lp = _hf_last_logprobs(llama_dir, corr, mask)
    answer = clean_lp.argmax(-1)
    # the curve's ends: every edge kept is the clean run, none kept the corrupted run (mean over the prompts)
    import pandas as pd

    curve = pd.read_csv(out / "pruning_curve.csv")
    exact = curve[curve["method"] == "exact"]
    full = float(exact[exact["edges"] == summary["num_edges"]]["metric"].iloc[0])
    empty = float(exact[exact["edges"] == 0]["metric"].iloc[0])
    rows = torch.arange(6)
    assert full == pytest.approx(float(clean_lp[rows, answer].mean()), rel=1e-5)
    assert empty == pytest.approx(float(corr_lp[rows, answer].mean()), rel=1e-5)
    assert abs(full - empty) > 1e-4  # the corrupted token moves the metric, well beyond rel=1e-5
    model = pypattern.from_pretrained(llama_dir)
    position = -1 if side == "left" else torch.as_tensor(last)
    metric = LogProb(answer, position=position)
    t, c, m = torch.as_tensor(ids), torch.as_tensor(corr), torch.as_tensor(mask)
    for method in ("eap", "exact"):
        ref = edge_attribution(model, t, c, metric=metric, method=method, attention_mask=m, quiet=True)
        _check_scores(_edge_scores(out / "edge_scores.csv", method), ref)
    # without the mask, reading the last column (padding read as text, and read by the metric when right-padded):
    # other scores
    other = edge_attribution(model, t, c, metric=LogProb(answer), method="exact", quiet=True)
    got = _edge_scores(out / "edge_scores.csv", "exact")
    names = [str(n) for n in other.to_pandas()["name"]]
    assert not np.allclose([got[n] for n in names], other.to_pandas()["score"], rtol=1e-3, atol=1e-6)


def test_circuit_mean_ablation_over_right_padding(llama_dir, files, tmp_path):
    """Without --corrupted, a right-padded file: each edge carries its mean over the prompts real at each position
    (edge_attribution(..., ablation="mean", attention_mask=mask))."""
    import pypattern
    from pypattern.circuits import edge_attribution
    from pypattern.patching import LogProb

    path, _, ids, mask, _, _ = files[1]["right"]
    out = tmp_path / "mean"
    argv = ["circuit", "--model", str(llama_dir), "--data", str(path), "--methods", "eap", "--out", str(out)]
    assert main([*argv, "--quiet"]) == 0
    summary = json.loads((out / "circuit_summary.json").read_text())
    assert summary["ablation"] == "mean" and summary["metric_position"] == [n - 1 for n in LENGTHS]
    answer = _hf_last_logprobs(llama_dir, ids, mask).argmax(-1)
    model = pypattern.from_pretrained(llama_dir)
    metric = LogProb(answer, position=torch.as_tensor([n - 1 for n in LENGTHS]))
    ref = edge_attribution(
        model, torch.as_tensor(ids), None, metric=metric, method="eap", ablation="mean",
        attention_mask=torch.as_tensor(mask), quiet=True,
    )  # fmt: skip
    _check_scores(_edge_scores(out / "edge_scores.csv", "eap"), ref)


def test_circuit_prompt_file_with_an_attention_mask(llama_dir, files, tmp_path, capsys):
    """A prompt .npz (clean, corrupted, answer, wrong) may hold an attention_mask shared by clean and corrupted:
    the logit difference is read at each prompt's last real token, every run under the mask."""
    import pypattern
    from pypattern.circuits import edge_attribution
    from pypattern.circuits.cli import load_prompts
    from pypattern.patching import LogitDiff

    _, _, ids, mask, corr, _ = files[1]["right"]
    ans, wrong = np.arange(6) + 1, np.arange(6) + 8
    np.savez(tmp_path / "p.npz", clean=ids, corrupted=corr, answer=ans, wrong=wrong, attention_mask=mask)
    out = tmp_path / "o"
    argv = ["circuit", "--model", str(llama_dir), "--data", str(tmp_path / "p.npz"), "--methods", "eap"]
    assert main([*argv, "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "circuit_summary.json").read_text())
    assert summary["attention_mask"] is True and summary["metric_position"] == [n - 1 for n in LENGTHS]
    model = pypattern.from_pretrained(llama_dir)
    last = torch.as_tensor([n - 1 for n in LENGTHS])
    ref = edge_attribution(
        model, torch.as_tensor(ids), torch.as_tensor(corr), metric=LogitDiff(torch.as_tensor(ans),
        torch.as_tensor(wrong), position=last), method="eap", attention_mask=torch.as_tensor(mask), quiet=True,
    )  # fmt: skip
    _check_scores(_edge_scores(out / "edge_scores.csv", "eap"), ref)
    # the Python reader: the mask with with_mask=True, refused without it
    c, _, metric, m = load_prompts(str(tmp_path / "p.npz"), with_mask=True)
    assert torch.equal(m, torch.as_tensor(mask)) and torch.equal(metric.position, last)
    with pytest.raises(ValueError, match=r"holds \['attention_mask'\] besides .*with_mask=True"):
        load_prompts(str(tmp_path / "p.npz"))
    # a mask of another shape, refused naming the array
    np.savez(tmp_path / "bad.npz", clean=ids, corrupted=corr, answer=ans, attention_mask=mask[:, :5])
    capsys.readouterr()
    err = _err([*argv[:4], str(tmp_path / "bad.npz"), "--out", str(tmp_path / "b"), "--quiet"], capsys)
    assert (
        "its array 'attention_mask' has shape (6, 5); it must equal the shape of its token array 'clean'"
        in err
    )


def test_circuit_refuses_masks_it_cannot_read(llama_dir, files, tmp_path, capsys):
    """One-line errors: a corrupted file whose mask is not the data's; left padding without --corrupted (the mean
    ablation would average each column over tokens at other positions); corrupted prompts equal to the clean ones
    on every real token (they differ at the padding only)."""
    _, f = files
    base = ["circuit", "--model", str(llama_dir), "--out", str(tmp_path / "o"), "--methods", "eap", "--quiet"]
    path, cpath, ids, mask, corr, _ = f["left"]
    other = mask.copy()
    other[2, 3] = 1
    np.savez(tmp_path / "cmask.npz", tokens=corr, attention_mask=other)
    err = _err([*base, "--data", str(path), "--corrupted", str(tmp_path / "cmask.npz")], capsys)
    assert (
        f"pypattern circuit: error: --corrupted {str(tmp_path / 'cmask.npz')!r}: its array 'attention_mask' "
        f"differs from the mask of --data {str(path)!r} (first at row 2)" in err
    )
    np.save(tmp_path / "plain.npy", ids)
    err = _err([*base, "--data", str(tmp_path / "plain.npy"), "--corrupted", str(cpath)], capsys)
    assert "differs from the mask of --data" in err and "(it has none: all 1s)" in err
    err = _err([*base, "--data", str(path)], capsys)
    assert f"pypattern circuit: error: --data {str(path)!r} is left-padded" in err
    assert "give corrupted prompts of the same mask (--corrupted FILE) or pad the prompts on the right" in err
    pad = np.where(mask == 1, ids, 5)
    np.savez(tmp_path / "pad5.npz", tokens=pad, attention_mask=mask)
    err = _err([*base, "--data", str(path), "--corrupted", str(tmp_path / "pad5.npz")], capsys)
    assert "equals the token file --data" in err and "on every real token (attention_mask 1)" in err


def test_circuit_resume_with_another_mask_is_another_run(llama_dir, files, tmp_path, capsys):
    """--checkpoint fingerprints the mask: the same tokens under another mask are refused; the same files resume
    with the same scores."""
    path, cpath, ids, mask, corr, _ = files[1]["right"]
    other = mask.copy()
    other[2, 3:] = 1  # row 2 reads its padding as text
    np.savez(tmp_path / "d.npz", tokens=ids, attention_mask=other)
    np.savez(tmp_path / "c.npz", tokens=corr, attention_mask=other)
    ck = tmp_path / "ck"
    argv = ["circuit", "--model", str(llama_dir), "--methods", "exact", "--checkpoint", str(ck), "--quiet"]
    assert main([*argv, "--data", str(path), "--corrupted", str(cpath), "--out", str(tmp_path / "a")]) == 0
    assert main([*argv, "--data", str(path), "--corrupted", str(cpath), "--out", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    a, b = (_edge_scores(tmp_path / x / "edge_scores.csv", "exact") for x in "ab")
    assert a == b
    err = _err([*argv, "--data", str(tmp_path / "d.npz"), "--corrupted", str(tmp_path / "c.npz"),
                "--out", str(tmp_path / "c")], capsys)  # fmt: skip
    assert "pypattern circuit: error: checkpoint" in err and "exact_edge_scores.npz" in err
    assert "was written by a different run" in err


def test_circuit_without_a_mask_as_before(llama_dir, tmp_path):
    """A token file without a mask, and the same tokens with a mask of no padding: the same scores, those of
    edge_attribution without a mask read at the last column; the summary of the file without a mask names none."""
    import pypattern
    from pypattern.circuits import edge_attribution
    from pypattern.patching import LogProb

    rng = np.random.default_rng(7)
    ids = rng.integers(1, V, size=(4, 5))
    corr = ids.copy()
    corr[:, 2] = (corr[:, 2] + 3) % V
    np.savez(tmp_path / "t.npz", tokens=ids)
    np.savez(tmp_path / "c.npz", tokens=corr)
    np.savez(tmp_path / "tm.npz", tokens=ids, attention_mask=np.ones_like(ids))
    base = ["circuit", "--model", str(llama_dir), "--methods", "eap", "--quiet"]
    assert main([*base, "--data", str(tmp_path / "t.npz"), "--corrupted", str(tmp_path / "c.npz"),
                 "--out", str(tmp_path / "a")]) == 0  # fmt: skip
    assert main([*base, "--data", str(tmp_path / "tm.npz"), "--corrupted", str(tmp_path / "c.npz"),
                 "--out", str(tmp_path / "b")]) == 0  # fmt: skip
    plain = json.loads((tmp_path / "a" / "circuit_summary.json").read_text())
    assert "attention_mask" not in plain and "metric_position" not in plain
    got = _edge_scores(tmp_path / "a" / "edge_scores.csv", "eap")
    assert got == _edge_scores(tmp_path / "b" / "edge_scores.csv", "eap")
    answer = _hf_last_logprobs(llama_dir, ids, np.ones_like(ids)).argmax(-1)
    model = pypattern.from_pretrained(llama_dir)
    ref = edge_attribution(
        model, torch.as_tensor(ids), torch.as_tensor(corr), metric=LogProb(answer), method="eap", quiet=True
    )
    _check_scores(got, ref)


def test_patch_resume_with_another_mask_names_the_data(llama_dir, files, tmp_path, capsys):
    """A patch run resumed on the same tokens under another attention mask is refused as another run, and the
    error's hint names where the mask came from (--data)."""
    path, _, ids, mask, _, _ = files[1]["left"]
    other = mask.copy()
    row = int(np.argmax(other.sum(1) > 1))
    other[row, int(np.argmax(other[row]))] = 0  # the row's first real token becomes padding
    other_path = tmp_path / "other.npz"
    np.savez(other_path, tokens=ids, attention_mask=other)
    ck = tmp_path / "ck"
    argv = ["patch", "--model", str(llama_dir), "--sites", "resid_pre", "--quiet", "--checkpoint", str(ck)]
    assert main(argv + ["--data", str(path), "--out", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    err = _err(argv + ["--data", str(other_path), "--out", str(tmp_path / "b")], capsys)
    assert "attention_mask" in err and "(on the command line: --data: another attention_mask array" in err
