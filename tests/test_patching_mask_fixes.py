"""Patching under an attention mask: Gaussian noise counted over each row's real tokens, token files padded past
the learned positions read by the command line, a wrapped forward taking ``**kwargs``, and a mean ablation's
reference prompts given as a tokenizer's output padded past the learned positions.

Ground truth: each prompt run alone, unpadded (its noise built here from the seed), float64; a naive per-position
mean over the reference prompts' real tokens, each run alone."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

import pypattern as pp
from pypattern.models import HookedModule, Transformer, TransformerConfig
from pypattern.patching import (
    GaussianNoise,
    LogitDiff,
    MeanAblation,
    activation_patching,
    attribution_patching,
)
from pypattern.patching.corruptions import noise_under_mask

pytestmark = pytest.mark.usefixtures("one_thread")

V, D, TOL = 20, 16, 1e-10
LENGTHS = [6, 3, 4]  # real tokens per prompt, padded to 6 (row 0 unpadded)
ANSWER, WRONG = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])


def tiny(n_ctx: int = 8) -> Transformer:
    """Learned absolute positions: a real token read at a shifted position changes its values."""
    cfg = TransformerConfig(
        n_layers=2, d_model=D, n_heads=2, d_mlp=32, d_vocab=V, n_ctx=n_ctx, dtype=torch.float64
    )
    return Transformer(cfg).eval()


def padded(lengths, T: int, side: str, seed: int = 1):
    """``(tokens, mask, rows)``: prompts of ``lengths`` real tokens padded with id 0 on ``side`` to ``T``."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    rows = []
    for b, n in enumerate(lengths):
        r = torch.randint(7, V, (n,), generator=g)
        cols = slice(T - n, T) if side == "left" else slice(0, n)
        tokens[b, cols], mask[b, cols] = r, 1
        rows.append(r)
    return tokens, mask, rows


class FixedNoise(GaussianNoise):
    """The noise given, whatever the prompts (a row alone gets the noise its row of a batch has)."""

    def __init__(self, fixed: torch.Tensor) -> None:
        super().__init__(std=1.0)
        self.fixed = fixed

    def noise(self, model, batch, seq_len, d_model, dtype):
        return self.fixed.to(dtype)


def expected_noise(positions, lengths, T: int, std: float, seed: int) -> list[torch.Tensor]:
    """Row ``b``'s noise ``(1, n_b, D)`` over its real tokens: entry ``[b, p]`` of the seed's ``(batch, T, D)`` draw
    at each noised real position ``p`` (``positions`` counted over the row's real tokens), 0 elsewhere."""
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(len(lengths), T, D, generator=g, dtype=torch.float64) * std
    out = []
    for b, n in enumerate(lengths):
        if positions is None:
            ps = range(n)
        elif isinstance(positions, int):
            ps = [positions]
        elif isinstance(positions[0], list):
            ps = positions[b]
        else:
            ps = positions
        sel = torch.zeros(n, 1, dtype=torch.float64)
        for p in ps:
            sel[p % n] = 1.0
        out.append((full[b, :n] * sel)[None])
    return out


@pytest.mark.parametrize("positions", [None, 0, -1, [0, 2], [[0, 5], [1, 2], [-2]]])
def test_noise_positions_count_real_tokens_each_row_equals_its_prompt_alone(positions):
    """Left-padded prompts under their mask: every row's values (exact and naive engines, and AtP) are those of
    its prompt alone, unpadded, given that row's noise: position p is the row's p-th real token."""
    m = tiny()
    T = max(LENGTHS)
    clean, mask, rows = padded(LENGTHS, T, "left")
    noise = GaussianNoise(std=0.7, seed=3, positions=positions)
    met = LogitDiff(ANSWER, WRONG, position=-1)
    got = activation_patching(
        m, "resid_pre", clean, corruption=noise, metric=met, attention_mask=mask, quiet=True
    )
    naive = activation_patching(
        m, "resid_pre", clean, corruption=noise, metric=met, attention_mask=mask, method="naive", quiet=True
    )
    atp = attribution_patching(m, clean, metric=met, sites="resid_pre", corruption=noise, attention_mask=mask)
    torch.testing.assert_close(got.values, naive.values, atol=TOL, rtol=0)
    for b, (n, want) in enumerate(zip(LENGTHS, expected_noise(positions, LENGTHS, T, 0.7, 3))):
        alone = dict(
            metric=LogitDiff(ANSWER[b : b + 1], WRONG[b : b + 1], position=-1), corruption=FixedNoise(want)
        )
        ref = activation_patching(m, "resid_pre", rows[b][None], method="naive", quiet=True, **alone)
        torch.testing.assert_close(got.corrupted[b], ref.corrupted[0], atol=TOL, rtol=0)
        torch.testing.assert_close(got.values[b][:, T - n :], ref.values[0], atol=TOL, rtol=0)
        assert bool((got.values[b][:, : T - n] == got.corrupted[b]).all())  # a padding column: no effect
        ref_atp = attribution_patching(m, rows[b][None], sites="resid_pre", **alone)
        torch.testing.assert_close(
            atp["resid_pre"].values[b][:, T - n :], ref_atp["resid_pre"].values[0], atol=TOL, rtol=0
        )
    assert float((got.corrupted - got.clean).abs().min()) > 0  # every row is noised


def test_noise_lands_on_real_tokens_only_and_without_a_mask_is_drawn_as_before():
    m = tiny()
    B, T = 3, 6
    _, mask, _ = padded(LENGTHS, T, "left")
    keep = mask.bool()
    under = noise_under_mask(GaussianNoise(std=1.0, seed=4), keep).noise(m, B, T, D, torch.float64)
    assert bool((under[~keep] == 0).all()) and bool((under[keep] != 0).all())
    # right padding under its mask: the unmasked draw at every real token, none on the padding
    _, right, _ = padded(LENGTHS, T, "right")
    plain = GaussianNoise(std=1.0, seed=4).noise(m, B, T, D, torch.float64)
    rmask = right.bool()
    got = noise_under_mask(GaussianNoise(std=1.0, seed=4), rmask).noise(m, B, T, D, torch.float64)
    assert torch.equal(got[rmask], plain[rmask]) and bool((got[~rmask] == 0).all())
    # without a mask (or under one without padding) the noise is the seed's draw at the columns given
    g = torch.Generator().manual_seed(4)
    full = torch.randn(B, T, D, generator=g, dtype=torch.float64) * 0.5
    sel = torch.zeros(B, T, dtype=torch.bool)
    sel[:, [0, -1]] = True
    noise = GaussianNoise(std=0.5, seed=4, positions=[0, -1])
    assert torch.equal(noise.noise(m, B, T, D, torch.float64), full * sel[:, :, None])
    assert noise_under_mask(noise, torch.ones(B, T, dtype=torch.bool)) is noise


def test_noise_positions_past_a_rows_real_tokens_are_refused_naming_the_row():
    m = tiny()
    clean, mask, _ = padded(LENGTHS, 6, "left")
    kw = dict(metric=LogitDiff(ANSWER, WRONG, position=-1), attention_mask=mask, quiet=True)
    with pytest.raises(
        ValueError, match=r"GaussianNoise.positions contains \[3\]: .*row 1 has 3 \(positions -3 .. 2\)"
    ):
        activation_patching(m, "resid_pre", clean, corruption=GaussianNoise(positions=3), **kw)
    with pytest.raises(ValueError, match=r"GaussianNoise.positions\[2\] contains \[-5\]: .*row 2 has 4"):
        bad = GaussianNoise(positions=[[0], [1], [-5]])
        attribution_patching(
            m, clean, sites="resid_pre", corruption=bad, metric=kw["metric"], attention_mask=mask
        )


def test_a_wrapped_forward_taking_kwargs_patches_under_a_mask():
    """A module whose forward is ``forward(input_ids, **kw)`` handing the mask and positions to a Hugging Face
    model: the losses' rule accepts it, and its values are those of the model patched directly."""
    transformers = pytest.importorskip("transformers")
    from pypattern.models.hf import hf_hook_points

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=D, n_layer=2, n_head=2, n_positions=8)
    hf = transformers.GPT2LMHeadModel(cfg).double().eval()

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, **kw):
            return self.inner(input_ids=input_ids, use_cache=False, **kw).logits

    pts = {k: "inner." + v for k, v in hf_hook_points(hf).items() if k != "hook_pos_embed"}
    wrapped = HookedModule(Wrapper(hf), pts, n_layers=2)
    clean, mask, _ = padded(LENGTHS, 6, "left")
    corrupted = clean.clone()
    corrupted[:, -2] = (corrupted[:, -2] + 3) % V
    kw = dict(metric=LogitDiff(ANSWER, WRONG, position=-1), attention_mask=mask, quiet=True)
    for site in ("resid_pre", "attn_out"):
        got = activation_patching(wrapped, site, clean, corrupted, **kw)
        want = activation_patching(hf, site, clean, corrupted, **kw)
        torch.testing.assert_close(got.values, want.values, atol=1e-12, rtol=0)
        assert float(got.values.abs().max()) > 0


def test_mean_ablation_reference_dict_padded_past_the_learned_positions():
    """Reference prompts given as a tokenizer's output with its own (right-padded) mask, 10 columns for a model of
    8 learned positions, every row's real tokens fitting: the mean over their real tokens at each position, as a
    naive loop computes it from each prompt alone. A row of too many real tokens, and left padding, are refused."""
    m = tiny(n_ctx=8)
    T = 10
    clean, mask, rows = padded([8, 5, 6], T, "right")
    ref, ref_mask, ref_rows = padded([8, 3, 7, 2], T, "right", seed=2)
    met = LogitDiff(ANSWER, WRONG, position=mask.sum(1) - 1)
    enc = {"input_ids": ref.numpy(), "attention_mask": ref_mask.numpy()}
    kw = dict(direction="noising", metric=met, attention_mask=mask, quiet=True)
    got = activation_patching(m, "resid_pre", clean, corruption=MeanAblation(reference_tokens=enc), **kw)
    naive = activation_patching(
        m, "resid_pre", clean, corruption=MeanAblation(reference_tokens=enc), method="naive", **kw
    )
    torch.testing.assert_close(got.values, naive.values, atol=TOL, rtol=0)
    # the naive mean: each reference prompt alone, its real tokens only, per position
    means = {}
    for layer in range(2):
        name = f"blocks.{layer}.hook_resid_pre"
        total, count = torch.zeros(8, D, dtype=torch.float64), torch.zeros(8, 1, dtype=torch.float64)
        for r in ref_rows:
            _, cache = m.run_with_cache(r[None], names_filter=name)
            total[: len(r)] += cache[name][0]
            count[: len(r)] += 1
        means[layer] = total / count.clamp(min=1)
    for b, r in enumerate(rows):
        for layer in range(2):
            for p in range(len(r)):

                def put(x, hook, p=p, layer=layer):
                    x = x.clone()
                    x[:, p] = means[layer][p]
                    return x

                with torch.no_grad():
                    logits = m.run_with_hooks(r[None], fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", put)])
                want = logits[0, -1, ANSWER[b]] - logits[0, -1, WRONG[b]]
                assert abs(float(got.values[b, layer, p]) - float(want)) < TOL
    assert float(got.values.std()) > 0
    over = ref_mask.clone()
    over[1, :9] = 1
    with pytest.raises(
        ValueError, match=r"MeanAblation.reference_tokens row 1 has 9 real tokens .* \(n_ctx\)"
    ):
        activation_patching(
            m, "resid_pre", clean, corruption=MeanAblation(reference_tokens={"input_ids": ref, "attention_mask": over}),
            **kw,
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"MeanAblation.reference_tokens has 10 positions; the model has 8"):
        activation_patching(m, "resid_pre", clean, corruption=MeanAblation(reference_tokens=ref), **kw)
    left, left_mask, _ = padded([8, 3, 7, 2], T, "left", seed=2)
    # named as given: the tokenizer output's entry
    with pytest.raises(
        ValueError, match=r"MeanAblation.reference_tokens\['attention_mask'\] is left-padded \(row 0"
    ):
        MeanAblation(reference_tokens={"input_ids": left, "attention_mask": left_mask})


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("gpt2")
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=D, n_layer=2, n_head=2, n_positions=8)
    torch.manual_seed(1)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(d, safe_serialization=True)
    return d


@pytest.mark.parametrize("side", ["left", "right"])
def test_cli_reads_files_padded_past_the_learned_positions(side, gpt2_dir, tmp_path, capsys):
    """A 10-column file for a model of 8 learned positions whose rows hold at most 8 real tokens: load_tokens reads
    it, ``patch`` gives activation_patching's values under the mask (a corrupted file without a mask takes the
    data's), ``llc`` runs; a row of 9 real tokens is refused naming it, and a file without a mask by its width."""
    from pypattern.cli import main
    from pypattern.experiments.user_model import load_tokens
    from pypattern.patching import KL

    T, lengths = 10, [8, 5, 3, 6]
    ids, mask, _ = padded(lengths, T, side)
    corr = ids.clone()
    last = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)
    corr[torch.arange(4), last - 1] = (corr[torch.arange(4), last - 1] + 5) % V
    path, cpath = tmp_path / "data.npz", tmp_path / "corr.npz"
    np.savez(path, tokens=ids.numpy(), attention_mask=mask.numpy())
    np.savez(cpath, tokens=corr.numpy())
    t, m = load_tokens(path, n_ctx=8, with_mask=True)
    assert torch.equal(t, ids) and torch.equal(m, mask)
    out = tmp_path / "patch"
    argv = [
        "patch",
        "--model",
        str(gpt2_dir),
        "--data",
        str(path),
        "--corrupted",
        str(cpath),
        "--out",
        str(out),
    ]
    assert main([*argv, "--sites", "resid_pre", "--quiet"]) == 0
    model = pp.from_pretrained(gpt2_dir)
    ref = activation_patching(
        model, "resid_pre", ids, corr, metric=KL(position=-1 if side == "left" else last), attention_mask=mask,
        quiet=True,
    )  # fmt: skip
    ref.to_csv(str(tmp_path / "ref.csv"), normalized=True)
    got = np.genfromtxt(out / "patch_resid_pre.csv", delimiter=",", names=True, dtype=None, encoding=None)
    want = np.genfromtxt(tmp_path / "ref.csv", delimiter=",", names=True, dtype=None, encoding=None)
    np.testing.assert_allclose(got["mean"], want["mean"], rtol=1e-5, atol=1e-7)
    assert np.abs(got["mean"]).max() > 0.1
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
    llc_out = tmp_path / "llc"
    with (
        warnings.catch_warnings()
    ):  # a run this short may warn of its step size: only that it runs is checked
        warnings.simplefilter("ignore")
        assert (
            main(["llc", "--model", str(gpt2_dir), "--data", str(path), "--out", str(llc_out), *sampling])
            == 0
        )
    assert np.isfinite(json.loads((llc_out / "llc_summary.json").read_text())["llc_mean"])
    capsys.readouterr()
    over = mask.clone()
    over[2] = 0
    over[2, :9] = 1 if side == "right" else 0
    if side == "left":
        over[2, 1:] = 1
    np.savez(tmp_path / "over.npz", tokens=ids.numpy(), attention_mask=over.numpy())
    with pytest.raises(
        ValueError, match=r"row 2 has 9 real tokens under its 'attention_mask'; the model's n_ctx is 8"
    ):
        load_tokens(tmp_path / "over.npz", n_ctx=8, with_mask=True)
    np.savez(tmp_path / "plain.npz", tokens=ids.numpy())
    with pytest.raises(ValueError, match=r"sequences have 10 tokens; the model's n_ctx is 8"):
        load_tokens(tmp_path / "plain.npz", n_ctx=8, with_mask=True)
    with pytest.raises(SystemExit):
        main(["patch", "--model", str(gpt2_dir), "--data", str(tmp_path / "over.npz"), "--out", str(out)])
    assert "row 2 has 9 real tokens" in capsys.readouterr().err


@pytest.mark.parametrize("own_reference", [True, False])
@pytest.mark.parametrize("max_batch", [None, 2])
def test_attribution_mean_ablation_padded_past_the_learned_positions(own_reference, max_batch):
    """AtP's mean ablation over prompts 10 columns wide (right-padded, every row's real tokens within the 8 learned
    positions): the reference prompts (their own, or the clean ones) run under their mask, so the scores equal those
    of the same prompts cut to their 8 columns of real tokens (the padding columns past 8 are never real), and a
    padding column's estimate is the clean run's metric (its patch changes nothing). Whole batch and in parts of
    ``max_batch``."""
    m = tiny(n_ctx=8)
    T = 10
    clean, mask, _ = padded([8, 5, 6], T, "right")
    ref, ref_mask, _ = padded([8, 3, 7, 2], T, "right", seed=2)
    met = LogitDiff(ANSWER, WRONG, position=mask.sum(1) - 1)

    def corruption(width):
        if not own_reference:
            return MeanAblation()
        return MeanAblation(
            reference_tokens={"input_ids": ref[:, :width], "attention_mask": ref_mask[:, :width]}
        )

    kw = dict(direction="noising", metric=met, sites=["z", "resid_pre"], max_batch=max_batch)
    got = attribution_patching(m, clean, corruption=corruption(T), attention_mask=mask, **kw)
    cut = attribution_patching(m, clean[:, :8], corruption=corruption(8), attention_mask=mask[:, :8], **kw)
    for site in ("z", "resid_pre"):
        g, c = got[site].values, cut[site].values
        torch.testing.assert_close(g[..., :8], c, atol=TOL, rtol=0)
        clean_metric = got[site].clean.view(-1, *[1] * (g.dim() - 1))
        assert bool((g[..., 8:] == clean_metric).all())
        assert float((c - clean_metric).abs().max()) > 0


def test_circuit_command_reads_files_padded_past_the_learned_positions(gpt2_dir, tmp_path, capsys):
    """``circuit`` on 10-column right-padded files for a model of 8 learned positions (every row's real tokens fit):
    a token file with a mask and a corrupted file without one (it takes the data's), and a prompt file with its
    mask, give the edge scores of the same files cut to their first 8 columns (the columns past 8 are padding in
    every row); a row of 9 real tokens is refused naming it."""
    import pandas as pd

    from pypattern.cli import main

    T, lengths = 10, [8, 5, 3, 6]
    ids, mask, _ = padded(lengths, T, "right")
    corr = ids.clone()
    last = mask.sum(1) - 1
    corr[torch.arange(4), last - 1] = (corr[torch.arange(4), last - 1] + 5) % V
    answer = torch.tensor([1, 2, 3, 4])

    def files(width, tag):
        data, cfile, prompts = (tmp_path / f"{tag}_{n}.npz" for n in ("data", "corr", "prompts"))
        np.savez(data, tokens=ids[:, :width].numpy(), attention_mask=mask[:, :width].numpy())
        np.savez(cfile, tokens=corr[:, :width].numpy())
        np.savez(
            prompts, clean=ids[:, :width].numpy(), corrupted=corr[:, :width].numpy(), answer=answer.numpy(),
            attention_mask=mask[:, :width].numpy(),
        )  # fmt: skip
        return data, cfile, prompts

    def scores(args, out):
        argv = ["circuit", "--model", str(gpt2_dir), *args, "--methods", "eap", "--out", str(out), "--quiet"]
        assert main(argv) == 0
        return pd.read_csv(out / "edge_scores.csv").set_index("name")["score"]

    wide, cut = files(T, "wide"), files(8, "cut")
    for kind, pick in (("tokens", lambda f: ["--data", str(f[0]), "--corrupted", str(f[1])]),
                       ("prompts", lambda f: ["--data", str(f[2])])):  # fmt: skip
        got = scores(pick(wide), tmp_path / f"wide_{kind}")
        want = scores(pick(cut), tmp_path / f"cut_{kind}")
        np.testing.assert_allclose(got[want.index].to_numpy(), want.to_numpy(), rtol=1e-6, atol=1e-9)
        assert float(np.abs(want.to_numpy()).max()) > 0
    over = mask.clone()
    over[2, :9] = 1
    np.savez(tmp_path / "over.npz", clean=ids.numpy(), corrupted=corr.numpy(), answer=answer.numpy(),
             attention_mask=over.numpy())  # fmt: skip
    capsys.readouterr()
    argv = [
        "circuit",
        "--model",
        str(gpt2_dir),
        "--data",
        str(tmp_path / "over.npz"),
        "--out",
        str(tmp_path / "o"),
    ]
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--quiet"])
    assert stop.value.code == 2
    assert (
        "row 2 has 9 real tokens under its 'attention_mask'; the model's n_ctx is 8"
        in capsys.readouterr().err
    )
