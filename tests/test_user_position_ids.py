"""Bring-your-own-model batches: position ids a Hugging Face user writes by hand, checked before any forward."""

import pytest
import torch
import torch.nn.functional as F

import pypattern as pp

transformers = pytest.importorskip("transformers")

SMALL = dict(num_chains=1, num_draws=2, num_burnin_steps=0, step_size=1e-4, localization=100.0, quiet=True)


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(cfg).double().eval()


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.LlamaForCausalLM(cfg).double().eval()


def _left_padded():
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(1, 64, (n,), generator=g) for n in (8, 5, 3, 8)]
    ids = torch.zeros(4, 8, dtype=torch.long)
    mask = torch.zeros(4, 8, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, 8 - len(r) :] = r
        mask[i, 8 - len(r) :] = 1
    return ids, mask, rows


def test_negative_position_ids_of_a_learned_position_model_are_named_and_the_remedy_is_exact():
    hf = _gpt2()
    ids, mask, rows = _left_padded()
    raw = mask.cumsum(-1) - 1  # -1 at the left padding
    batch = {"input_ids": ids, "attention_mask": mask, "position_ids": raw}
    with pytest.raises(ValueError, match=r"loader: batch\['position_ids'\] contains -1.*clamp\(min=0\)"):
        pp.estimate_llc(hf, [batch], **SMALL)
    with pytest.raises(ValueError, match=r"probe: batch\['position_ids'\] contains -1"):
        pp.susceptibilities(hf, [ids], batch, ["blocks.0.attn.head.0"], **SMALL)
    with pytest.raises(ValueError, match=r"loader: batch\['position_ids'\] contains -1"):
        pp.estimate_llc(pp.hooked_hf(hf), [batch], **SMALL)
    # the remedy the message gives: each row's counted losses are those of its prompt alone
    fixed = dict(batch, position_ids=raw.clamp(min=0))
    terms, counted = pp.losses.token_losses(hf, fixed, fill=0.0)
    for i, r in enumerate(rows):
        with torch.no_grad():
            alone = F.cross_entropy(hf(r[None]).logits[0, :-1], r[1:], reduction="none")
        assert int(counted[i].sum()) == len(r) - 1
        torch.testing.assert_close(terms[i, 8 - len(r) :], alone, rtol=0, atol=1e-12)
    pp.estimate_llc(hf, [fixed], warn_nonstationary=False, **SMALL)


def test_fractional_position_ids_are_refused_naming_the_key_for_every_model():
    hf = _llama()
    ids, mask, _ = _left_padded()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    for model in (hf, pp.from_hf(hf)):
        batch = {"input_ids": ids, "attention_mask": mask, "position_ids": pos.double()}
        with pytest.raises(
            TypeError, match=r"loader: batch\['position_ids'\] must hold integers.*\.long\(\)"
        ):
            pp.estimate_llc(model, [batch], **SMALL)
        with pytest.raises(TypeError, match=r"batch\['position_ids'\] must hold integers"):
            pp.losses.token_losses(model, batch)
        # integer positions of any width are read as they are
        a = pp.losses.token_losses(model, dict(batch, position_ids=pos.int()), fill=0.0)[0]
        b = pp.losses.token_losses(model, dict(batch, position_ids=pos), fill=0.0)[0]
        torch.testing.assert_close(a, b, rtol=0, atol=0)
