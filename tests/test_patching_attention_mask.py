"""Activation and attribution patching of padded prompts given an attention mask (left padding included).

Ground truth: each prompt alone, unpadded. A row of a padded batch patched with its mask must give, at each of
its real columns, the grid of its prompt alone (the column shifted by its padding), to rounding in float64; cells
at padding columns give effect 0. Tiny float64 Hugging Face models built from configs (GPT-2 with learned
positions, Llama with rotary positions and grouped-query attention, eager attention), converted with
``pypattern.from_hf``, and the Hugging Face model given directly (wrapped by ``hooked_hf``: residual sites).
"""

from __future__ import annotations

import pytest
import torch
import transformers as T

import pypattern as pp
from pypattern.io import FingerprintMismatch
from pypattern.patching import LogitDiff, MeanAblation, activation_patching, attribution_patching

V = 40
LENGTHS = [5, 3, 4]  # real tokens per prompt, left-padded to 5
ANSWER, WRONG = torch.tensor([5, 6, 7]), torch.tensor([8, 9, 10])
TOL = 1e-9
_MODELS: dict = {}


def hf(name: str) -> torch.nn.Module:
    if name not in _MODELS:
        torch.manual_seed(0)
        if name == "gpt2":
            cfg = T.GPT2Config(
                vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
                attn_pdrop=0.0, initializer_range=0.25, attn_implementation="eager", bos_token_id=0,
                eos_token_id=1,
            )  # fmt: skip
            m = T.GPT2LMHeadModel(cfg)
        else:
            cfg = T.LlamaConfig(
                vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=48, max_position_embeddings=32, initializer_range=0.25, pad_token_id=None,
                attn_implementation="eager",
            )  # fmt: skip
            m = T.LlamaForCausalLM(cfg)
        _MODELS[name] = m.double().eval()
    return _MODELS[name]


def converted(name: str):
    key = name + "/pp"
    if key not in _MODELS:
        _MODELS[key] = pp.from_hf(hf(name))
    return _MODELS[key]


def prompts(side: str = "left", pad_id: int = 0):
    """``(clean, corrupted, mask, seqs)``: three prompts of LENGTHS padded to 5 on ``side``; the corrupted ones
    differ from the clean ones from their second real token on."""
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(2, V, (n,), generator=g) for n in LENGTHS]
    corr = [torch.cat([s[:1], torch.randint(2, V, (len(s) - 1,), generator=g)]) for s in seqs]
    Tn = max(LENGTHS)
    clean = torch.full((3, Tn), pad_id)
    corrupted = torch.full((3, Tn), pad_id)
    mask = torch.zeros(3, Tn, dtype=torch.long)
    for b, (s, c) in enumerate(zip(seqs, corr)):
        cols = slice(Tn - len(s), Tn) if side == "left" else slice(0, len(s))
        clean[b, cols], corrupted[b, cols], mask[b, cols] = s, c, 1
    return clean, corrupted, mask, list(zip(seqs, corr))


def last_real(mask):
    return torch.tensor([int(r.nonzero().max()) for r in mask])


def metric(mask=None, rows=slice(None)):
    pos = -1 if mask is None else last_real(mask)
    return LogitDiff(ANSWER[rows], WRONG[rows], position=pos)


def alone(b: int, seqs):
    s, c = seqs[b]
    return s[None], c[None], LogitDiff(ANSWER[b : b + 1], WRONG[b : b + 1])


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("site", ["resid_pre", "attn_out", "z"])
@pytest.mark.parametrize("direction", ["denoising", "noising"])
@pytest.mark.parametrize("method", ["auto", "naive"])
def test_left_padded_rows_equal_each_prompt_alone(name, site, direction, method):
    m = converted(name)
    clean, corrupted, mask, seqs = prompts()
    kw = dict(direction=direction, quiet=True)
    got = activation_patching(
        m, site, clean, corrupted, metric=metric(mask), attention_mask=mask, method=method, **kw
    )
    # left padding runs the exact engine with the mask under "auto"
    ran = "exact" if method == "auto" else "naive"
    assert got.info["attention_mask"] is True and got.method == ran and got.info["method"] == ran
    Tn = clean.shape[1]
    for b, n in enumerate(LENGTHS):
        c, k, met = alone(b, seqs)
        ref = activation_patching(m, site, c, k, metric=met, method="naive", **kw)
        row = got.values[b]
        torch.testing.assert_close(row[..., Tn - n :], ref.values[0], atol=TOL, rtol=0)
        target = got.corrupted[b] if direction == "denoising" else got.clean[b]
        assert bool((row[..., : Tn - n] == target).all())  # padding columns: effect 0 exactly
        torch.testing.assert_close(got.clean[b], ref.clean[0], atol=TOL, rtol=0)
        torch.testing.assert_close(got.corrupted[b], ref.corrupted[0], atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_hugging_face_model_given_directly_equals_the_converted_one(name):
    clean, corrupted, mask, _ = prompts()
    for site, direction in (("resid_pre", "denoising"), ("attn_out", "noising"), ("mlp_out", "denoising")):
        kw = dict(metric=metric(mask), attention_mask=mask, direction=direction, quiet=True)
        direct = activation_patching(hf(name), site, clean, corrupted, **kw)
        conv = activation_patching(converted(name), site, clean, corrupted, **kw)
        assert direct.method == "naive"
        torch.testing.assert_close(direct.values, conv.values, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_right_padded_mask_exact_equals_naive_with_mask(name):
    m = converted(name)
    clean, corrupted, mask, seqs = prompts("right", pad_id=3)
    for site in ("resid_pre", "z"):
        kw = dict(metric=metric(mask), attention_mask=mask, quiet=True)
        exact = activation_patching(m, site, clean, corrupted, method="exact", **kw)
        auto = activation_patching(m, site, clean, corrupted, **kw)
        naive = activation_patching(m, site, clean, corrupted, method="naive", **kw)
        assert exact.method == auto.method == "exact" and naive.method == "naive"
        torch.testing.assert_close(exact.values, naive.values, atol=TOL, rtol=0)
        torch.testing.assert_close(auto.values, naive.values, atol=TOL, rtol=0)
        # and each row is its prompt alone at its first columns
        for b, n in enumerate(LENGTHS):
            c, k, met = alone(b, seqs)
            ref = activation_patching(m, site, c, k, metric=met, method="naive", quiet=True)
            torch.testing.assert_close(naive.values[b][..., :n], ref.values[0], atol=TOL, rtol=0)


def test_right_padded_mean_ablation_takes_the_mask_and_exact_equals_naive():
    m = converted("llama")
    clean, _, mask, _ = prompts("right", pad_id=3)
    kw = dict(metric=metric(mask), attention_mask=mask, direction="noising", quiet=True)
    outs = [
        activation_patching(m, "resid_pre", clean, corruption=MeanAblation(), method=meth, **kw).values
        for meth in ("exact", "naive")
    ]
    torch.testing.assert_close(outs[0], outs[1], atol=TOL, rtol=0)
    own = activation_patching(
        m, "resid_pre", clean, corruption=MeanAblation(attention_mask=mask), method="naive", **kw
    ).values
    torch.testing.assert_close(own, outs[1], atol=0, rtol=0)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_attribution_patching_with_a_mask_equals_each_prompt_alone(name):
    m = converted(name)
    clean, corrupted, mask, seqs = prompts()
    Tn = clean.shape[1]
    for opts in (
        dict(sites=["z", "resid_pre"]),
        dict(sites=["z", "k", "q", "resid_pre"], qk_fix=True, grad_drop=True),
    ):
        for direction in ("denoising", "noising"):
            got = attribution_patching(
                m, clean, corrupted, metric=metric(mask), attention_mask=mask, direction=direction, **opts
            )
            for b, n in enumerate(LENGTHS):
                c, k, met = alone(b, seqs)
                ref = attribution_patching(m, c, k, metric=met, direction=direction, **opts)
                for site, r in got.items():
                    assert r.info["attention_mask"] is True
                    row, want = r.values[b], ref[site].values[0]
                    torch.testing.assert_close(row[..., Tn - n :], want, atol=TOL, rtol=0)
                    assert bool((r.effect[b][..., : Tn - n] == 0).all()), site
                    if "graddrop" in r.info:
                        gd, gd_ref = r.info["graddrop"][b], ref[site].info["graddrop"][0]
                        torch.testing.assert_close(gd[..., Tn - n :], gd_ref, atol=TOL, rtol=0)


def test_attribution_patching_in_parts_with_a_mask_equals_one_pass():
    m = converted("llama")
    clean, corrupted, mask, _ = prompts()
    kw = dict(metric=metric(mask), attention_mask=mask, sites=["z", "k"], qk_fix=True)
    one = attribution_patching(m, clean, corrupted, **kw)
    parts = attribution_patching(m, clean, corrupted, max_batch=1, **kw)
    for site in one:
        torch.testing.assert_close(parts[site].values, one[site].values, atol=TOL, rtol=0)


def test_a_tokenizer_output_equals_tensors_and_mask():
    m = converted("llama")
    clean, corrupted, mask, _ = prompts()
    enc_c = T.BatchEncoding({"input_ids": clean, "attention_mask": mask})
    enc_k = {"input_ids": corrupted.tolist(), "attention_mask": mask.numpy()}
    kw = dict(metric=metric(mask), quiet=True)
    a = activation_patching(m, "resid_pre", enc_c, enc_k, **kw)
    b = activation_patching(m, "resid_pre", clean, corrupted, attention_mask=mask.bool(), **kw)
    c = activation_patching(m, "resid_pre", enc_c, corrupted, attention_mask=mask.double(), **kw)
    assert torch.equal(a.values, b.values) and torch.equal(a.values, c.values)
    x = attribution_patching(m, enc_c, enc_k, metric=metric(mask), sites=["z"])["z"]
    y = attribution_patching(m, clean, corrupted, metric=metric(mask), sites=["z"], attention_mask=mask)["z"]
    assert torch.equal(x.values, y.values)


def test_refusals_name_attention_mask_and_say_what_is_expected():
    m = converted("llama")
    clean, corrupted, mask, _ = prompts()
    met = metric(mask)
    ap = lambda **kw: activation_patching(
        m, "resid_pre", clean, corrupted, quiet=True, **{"metric": met, **kw}
    )  # noqa: E731
    with pytest.raises(ValueError, match=r"attention_mask has shape \(3, 4\); it must equal .* \(3, 5\)"):
        ap(attention_mask=mask[:, 1:])
    with pytest.raises(ValueError, match=r"attention_mask must hold 1 .* or 0 .*, got the value 2"):
        ap(attention_mask=mask * 2)
    with pytest.raises(ValueError, match=r"attention_mask row 0 is all 0"):
        ap(attention_mask=torch.cat([torch.zeros(1, 5, dtype=torch.long), mask[1:]]))
    with pytest.raises(TypeError, match=r"attention_mask is a str"):
        ap(attention_mask="mask")
    # the metric at the last column of right padding falls on padding of row 1
    r_clean, r_corr, r_mask, _ = prompts("right")
    for call in (
        lambda: activation_patching(
            m, "z", r_clean, r_corr, metric=metric(), attention_mask=r_mask, quiet=True
        ),
        lambda: attribution_patching(m, r_clean, r_corr, metric=metric(), attention_mask=r_mask),
    ):
        with pytest.raises(
            ValueError, match=r"position 4 of row 1, which attention_mask marks as padding.*\[4, 2, 3\]"
        ):
            call()
    other = mask.clone()
    other[0, 0] = 0
    enc = {"input_ids": clean, "attention_mask": mask}
    with pytest.raises(ValueError, match="attention_mask is given and clean_tokens holds another one"):
        activation_patching(m, "resid_pre", enc, corrupted, metric=met, attention_mask=other, quiet=True)
    with pytest.raises(ValueError, match="corrupted_tokens holds an attention_mask other than the clean"):
        attribution_patching(m, enc, {"input_ids": corrupted, "attention_mask": other}, metric=met)
    for call in (
        lambda c: activation_patching(m, "z", clean, corruption=c, direction="noising", metric=met,
                                      attention_mask=mask, quiet=True),
        lambda c: attribution_patching(m, clean, corruption=c, direction="noising", metric=met, attention_mask=mask),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=r"MeanAblation with a left-padded attention_mask \(row 1"):
            call(MeanAblation())


def test_a_hooked_module_without_a_mask_argument_is_refused_padding():
    class Plain(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, tokens):
            return self.inner(tokens)

    wrapped = pp.models.HookedModule(
        Plain(converted("gpt2")), {"blocks.0.hook_resid_pre": "inner.blocks.0:input"}, n_layers=1
    )
    clean, corrupted, mask, _ = prompts()
    with pytest.raises(ValueError, match="attention_mask holds padding, but the model's forward"):
        activation_patching(
            wrapped, "resid_pre", clean, corrupted, metric=metric(mask), attention_mask=mask, quiet=True
        )


def test_a_checkpoint_of_another_mask_is_refused(tmp_path):
    m = converted("gpt2")
    clean, corrupted, mask, _ = prompts()
    path = tmp_path / "grid.npz"
    kw = dict(metric=metric(mask), quiet=True, checkpoint=path)
    first = activation_patching(m, "resid_pre", clean, corrupted, attention_mask=mask, **kw)
    again = activation_patching(m, "resid_pre", clean, corrupted, attention_mask=mask.bool(), **kw)
    assert torch.equal(first.values, again.values)
    other = mask.clone()
    other[0, 0] = 0  # row 0 with one token less; its metric position still real
    with pytest.raises(FingerprintMismatch, match="attention_mask"):
        activation_patching(m, "resid_pre", clean, corrupted, attention_mask=other, **kw)
    with pytest.raises(FingerprintMismatch):
        activation_patching(m, "resid_pre", clean, corrupted, **{**kw, "metric": metric()})


def test_cells_at_padding_are_inert_whatever_the_pad_ids():
    """Clean and corrupted prompts padded with other ids: a patch at a padding column writes another activation
    but reaches no real token (its key is masked), so it is skipped as inert; the values equal the prompts alone."""
    m = converted("llama")
    clean, corrupted, mask, seqs = prompts()
    rows = slice(1, 3)  # both padded at columns 0 and 1
    clean, corrupted, mask = clean[rows], corrupted[rows].clone(), mask[rows]
    corrupted[mask == 0] = 1
    for method in ("naive", "auto"):
        got = activation_patching(
            m, "resid_pre", clean, corrupted, metric=metric(mask, rows), attention_mask=mask, quiet=True,
            method=method,
        )  # fmt: skip
        if method == "naive":  # one forward per cell: each inert cell skipped (columns 0, 1 of both layers)
            assert got.info["inert_skipped"] == 2 * 2
        else:  # the exact engine: one block of cells, computed whole, the inert ones set to the target's metric
            assert got.method == "exact" and got.info["inert_skipped"] == 0
        assert bool((got.values[:, :, :2] == got.corrupted[:, None, None]).all())
        for i, b in enumerate((1, 2)):
            c, k, met = alone(b, seqs)
            ref = activation_patching(m, "resid_pre", c, k, metric=met, quiet=True)
            torch.testing.assert_close(got.values[i][..., 5 - LENGTHS[b] :], ref.values[0], atol=TOL, rtol=0)
