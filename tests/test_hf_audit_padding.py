"""Padded batches through Hugging Face models used natively (hooked_hf): in float64 with eager attention, Llama's
float32 softmax turns a fully masked query row into NaN; the adapter must keep it out of every real token's value,
of the cache and of the losses. Everything is compared with the same model run on each prompt alone, unpadded."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from pypattern.losses import batch_loss, sample_losses, token_losses  # noqa: E402
from pypattern.models.hf import hooked_hf  # noqa: E402

V = 40


def _model(kind: str) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if kind == "gpt2":
            cfg = transformers.GPT2Config(
                vocab_size=V, n_positions=32, n_embd=24, n_layer=2, n_head=3, bos_token_id=0, eos_token_id=0
            )
            m = transformers.GPT2LMHeadModel(cfg)
        elif kind == "llama":
            cfg = transformers.LlamaConfig(
                vocab_size=V,
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=32,
                bos_token_id=0,
                eos_token_id=0,
            )
            m = transformers.LlamaForCausalLM(cfg)
        else:
            cfg = transformers.Qwen2Config(
                vocab_size=V,
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=1,
                max_position_embeddings=32,
                bos_token_id=0,
                eos_token_id=0,
            )
            m = transformers.Qwen2ForCausalLM(cfg)
    m.config._attn_implementation = "eager"
    return m.double().eval()


def _batch():
    """Prompts of lengths 5, 8, 3 (ids) and the padded batch: row 0 left-padded, row 2 right-padded, row 3 all
    padding."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, V, (n,), generator=g) for n in (5, 8, 3)]
    ids = torch.zeros(4, 8, dtype=torch.long)
    am = torch.zeros(4, 8, dtype=torch.long)
    ids[0, 3:], am[0, 3:] = prompts[0], 1
    ids[1], am[1] = prompts[1], 1
    ids[2, :3], am[2, :3] = prompts[2], 1
    pos = (am.cumsum(1) - 1).clamp(min=0)  # each prompt's own positions (GPT-2's are learned)
    where = [(0, slice(3, 8)), (1, slice(0, 8)), (2, slice(0, 3))]
    return prompts, ids, am, pos, where


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
def test_padded_float64_eager_matches_prompts_alone(kind):
    m = _model(kind)
    prompts, ids, am, pos, where = _batch()
    with torch.no_grad():
        alone = [m(input_ids=p[None]).logits[0] for p in prompts]
    hm = hooked_hf(m)
    names = lambda n: n.endswith(("resid_post", "attn_out", "resid_mid"))  # noqa: E731
    with torch.no_grad():
        logits, cache = hm.run_with_cache(ids, attention_mask=am, position_ids=pos, names_filter=names)
        _, caches_alone = zip(*(hm.run_with_cache(p[None], names_filter=names) for p in prompts), strict=True)
    assert torch.isfinite(logits).all()
    for k, v in cache.items():
        assert torch.isfinite(v).all(), k
    for (row, sl), want, c1 in zip(where, alone, caches_alone, strict=True):
        torch.testing.assert_close(logits[row, sl], want, rtol=1e-10, atol=1e-10)
        for k, v in cache.items():
            torch.testing.assert_close(v[row, sl], c1[k][0], rtol=1e-10, atol=1e-10)

    # the losses: each prompt's mean next-token cross-entropy, from its own unpadded logits
    batch = {"input_ids": ids, "attention_mask": am, "position_ids": pos}
    per_prompt = [
        torch.nn.functional.cross_entropy(lg[:-1], p[1:], reduction="none")
        for lg, p in zip(alone, prompts, strict=True)
    ]
    want_mean = torch.cat(per_prompt).mean()
    loss = batch_loss(hm, batch)
    torch.testing.assert_close(loss, want_mean, rtol=1e-10, atol=1e-12)
    samples = sample_losses(hm, batch)
    torch.testing.assert_close(
        samples[:3], torch.stack([t.mean() for t in per_prompt]), rtol=1e-10, atol=1e-12
    )
    terms, mask = token_losses(hm, batch, fill=0.0)
    assert torch.isfinite(terms).all() and int(mask.sum()) == sum(len(p) - 1 for p in prompts)

    # gradients: the padded batch's against the sum of the prompts' own (weights by token count)
    params = [p for p in m.parameters() if p.requires_grad]
    g_batch = torch.autograd.grad(batch_loss(hm, batch), params, allow_unused=True)
    total = sum(len(p) - 1 for p in prompts)
    loss_alone = sum(
        torch.nn.functional.cross_entropy(m(input_ids=p[None]).logits[0, :-1], p[1:], reduction="sum")
        for p in prompts
    )
    g_alone = torch.autograd.grad(loss_alone / total, params, allow_unused=True)
    for a, b in zip(g_batch, g_alone, strict=True):
        if a is None or b is None:
            assert a is None or not a.any()
            continue
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def test_unpadded_batch_untouched():
    """Without padding (or with it, at real tokens) the adapter's logits are the model's own, bit for bit."""
    m = _model("llama")
    _, ids, am, _, where = _batch()
    with torch.no_grad():
        full = m(input_ids=ids[1:2]).logits
        hm = hooked_hf(m)
        torch.testing.assert_close(hm(ids[1:2]), full, rtol=0, atol=0)
        m32 = _model("llama").float()
        raw = m32(input_ids=ids, attention_mask=am).logits  # float32: no NaN, padding rows uniform attention
        got = hooked_hf(m32)(ids, attention_mask=am)
    torch.testing.assert_close(got, raw, rtol=0, atol=0)
