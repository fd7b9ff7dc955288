"""``shortlist_and_confirm`` on left-padded prompts given an attention mask: its AtP stage equals
``attribution_patching`` with the mask, its exact stage ``activation_patching`` with the mask (itself checked
against each prompt alone in tests/test_patching_attention_mask.py), on a tiny float64 Llama (rotary positions,
grouped-query attention) converted from its Hugging Face form; the mask's padding changes the numbers (the same
prompts without it give others)."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import pypattern as pp
from pypattern.patching import LogitDiff, activation_patching, attribution_patching
from pypattern.patching.attribution import shortlist_and_confirm

V = 40


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = T.LlamaConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, max_position_embeddings=32, initializer_range=0.25, pad_token_id=None,
        attn_implementation="eager",
    )  # fmt: skip
    return pp.from_hf(T.LlamaForCausalLM(cfg).double().eval())


def _prompts():
    g = torch.Generator().manual_seed(3)
    lengths = [5, 3, 4]
    clean = torch.zeros(3, 5, dtype=torch.long)
    corr = torch.zeros(3, 5, dtype=torch.long)
    mask = torch.zeros(3, 5, dtype=torch.long)
    for b, n in enumerate(lengths):
        s = torch.randint(2, V, (n,), generator=g)
        c = torch.cat([s[:1], torch.randint(2, V, (n - 1,), generator=g)])
        clean[b, 5 - n :], corr[b, 5 - n :], mask[b, 5 - n :] = s, c, 1
    return clean, corr, mask


@pytest.mark.parametrize("site", ["z", "resid_pre"])
@pytest.mark.parametrize("method_hooks", [False, True])
def test_both_stages_take_the_mask(model, site, method_hooks):
    clean, corr, mask = _prompts()
    metric = LogitDiff(torch.tensor([5, 6, 7]), torch.tensor([8, 9, 10]))
    if method_hooks:  # an attached function: the exact stage runs the naive loop
        with (
            model.hooks([("hook_embed", lambda x, hook: x)]),
            pytest.warns(UserWarning, match="one forward per"),
        ):
            got = shortlist_and_confirm(model, site, clean, corr, metric=metric, k=6, attention_mask=mask)
    else:
        got = shortlist_and_confirm(model, site, clean, corr, metric=metric, k=6, attention_mask=mask)
    atp = attribution_patching(
        model, clean, corr, metric=metric, sites=[site], qk_fix=True, attention_mask=mask
    )
    exact = activation_patching(model, site, clean, corr, metric=metric, attention_mask=mask)
    atp_mean = atp[site].effect.mean(0)
    exact_mean = exact.effect.mean(0)
    axes = atp[site].axes  # (layer[, head], pos); effect is (batch, *axes)
    assert len(got) == 6
    for row in got:
        ix = tuple(atp[site].coords[a].index(row[a]) for a in axes)
        assert row["atp"] == pytest.approx(float(atp_mean[ix]), abs=1e-9)
        assert row["exact"] == pytest.approx(float(exact_mean[ix]), abs=1e-9)
    # the mask matters: the same prompts run unmasked score otherwise
    plain = activation_patching(model, site, clean, corr, metric=metric).effect.mean(0)
    assert (plain - exact_mean).abs().max() > 1e-3


def test_a_tokenizer_output_equals_tensors_and_mask(model):
    clean, corr, mask = _prompts()
    metric = LogitDiff(torch.tensor([5, 6, 7]), torch.tensor([8, 9, 10]))
    a = shortlist_and_confirm(model, "z", clean, corr, metric=metric, k=4, attention_mask=mask)
    b = shortlist_and_confirm(
        model,
        "z",
        {"input_ids": clean, "attention_mask": mask},
        {"input_ids": corr, "attention_mask": mask},
        metric=metric,
        k=4,
    )
    assert a == b
    with pytest.raises(ValueError, match="attention_mask"):
        shortlist_and_confirm(model, "z", clean, corr, metric=metric, k=4, attention_mask=mask[:, :4])
