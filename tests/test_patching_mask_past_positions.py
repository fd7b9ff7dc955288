"""Prompts padded past a model's learned positions (a tokenizer's ``padding="max_length"``): under an attention
mask each row's real tokens sit at positions ``0 .. n-1``, so a batch wider than ``n_ctx`` whose rows fit runs,
and each row's values equal its prompt alone (exact engine, naive loop, AtP); a row of more real tokens than the
model has positions, or a mask without padding over too many columns, is refused by name."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import pypattern as pp
from pypattern.patching import LogitDiff, activation_patching, attribution_patching

V, N_POS, WIDTH = 40, 8, 10
LENGTHS = [6, 3, 1]
ANSWER, WRONG = torch.tensor([5, 6, 7]), torch.tensor([8, 9, 10])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = T.GPT2Config(
        vocab_size=V, n_embd=16, n_layer=2, n_head=2, n_positions=N_POS, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, initializer_range=0.25, attn_implementation="eager", bos_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return pp.from_hf(T.GPT2LMHeadModel(cfg).double().eval())


def _batch():
    g = torch.Generator().manual_seed(2)
    rows = [torch.randint(2, V, (n,), generator=g) for n in LENGTHS]
    corr = [r.clone() for r in rows]
    for r in corr:
        r[-1] = (r[-1] + 3) % (V - 2) + 2
    clean = torch.zeros(3, WIDTH, dtype=torch.long)
    corrupted = torch.zeros(3, WIDTH, dtype=torch.long)
    mask = torch.zeros(3, WIDTH, dtype=torch.long)
    for b, (r, c) in enumerate(zip(rows, corr)):
        clean[b, WIDTH - len(r) :], corrupted[b, WIDTH - len(r) :], mask[b, WIDTH - len(r) :] = r, c, 1
    return clean, corrupted, mask, list(zip(rows, corr))


@pytest.mark.parametrize("method", ["exact", "naive"])
def test_rows_padded_past_the_learned_positions_equal_each_prompt_alone(model, method):
    clean, corr, mask, rows = _batch()
    metric = LogitDiff(ANSWER, WRONG)
    got = activation_patching(
        model, "resid_pre", clean, corr, metric=metric, attention_mask=mask, method=method
    )
    atp = attribution_patching(model, clean, corr, metric=metric, sites=["z"], attention_mask=mask)["z"]
    for b, (r, c) in enumerate(rows):
        n = len(r)
        m1 = LogitDiff(ANSWER[b : b + 1], WRONG[b : b + 1])
        alone = activation_patching(model, "resid_pre", r[None], c[None], metric=m1)
        torch.testing.assert_close(got.values[b, :, WIDTH - n :], alone.values[0], rtol=0, atol=1e-9)
        alone_atp = attribution_patching(model, r[None], c[None], metric=m1, sites=["z"])["z"]
        torch.testing.assert_close(atp.values[b, ..., WIDTH - n :], alone_atp.values[0], rtol=0, atol=1e-9)
    assert got.info["method"] == method


def test_too_many_real_tokens_or_columns_are_refused(model):
    clean, corr, mask, _ = _batch()
    metric = LogitDiff(ANSWER, WRONG)
    full = mask.clone()
    full[0, :] = 1  # row 0: 10 real tokens, past the 8 positions
    with pytest.raises(ValueError, match=r"row 0 has 10 real tokens under attention_mask; the model has 8"):
        activation_patching(model, "resid_pre", clean, corr, metric=metric, attention_mask=full)
    with pytest.raises(ValueError, match=r"row 0 has 10 real tokens under attention_mask"):
        attribution_patching(model, clean, corr, metric=metric, sites=["z"], attention_mask=full)
    ones = torch.ones_like(mask)
    with pytest.raises(ValueError, match=r"10 positions; the model has 8 learned positions"):
        activation_patching(model, "resid_pre", clean, corr, metric=metric, attention_mask=ones)
    with pytest.raises(ValueError, match=r"10 positions; the model has 8 learned positions"):
        activation_patching(model, "resid_pre", clean, corr, metric=metric)
