"""Hugging Face causal LMs used as users hold them (the raw model, or hooked_hf of it) in the workflows of the default
losses, the samplers and the per-sample gradient Gram: left-padded float64 batches (Hugging Face's eager attention
takes the softmax in float32, where a fully masked query row is NaN), batched chains on padded batches, and the
native per-head masks against the converted model's. Everything is compared with an independent computation: each
prompt alone (unpadded), the other code path on the same weights, or the gradient of the loss itself."""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import pypattern as pp  # noqa: E402
from pypattern.gram import per_sample_grad_gram  # noqa: E402
from pypattern.losses import batch_loss, sample_losses, token_losses  # noqa: E402
from pypattern.models.hf import hooked_hf  # noqa: E402
from pypattern.models.hf_masks import hf_component_masks, hf_components  # noqa: E402

V = 32


def _model(kind: str, dtype: torch.dtype = torch.float64, attn: str = "eager") -> torch.nn.Module:
    """A 2-layer model with grouped-query attention (4 query heads, 2 key/value heads); Qwen2's embeddings tied."""
    cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[kind]
    cfg = cls[0](
        vocab_size=V,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=kind == "qwen2",
        bos_token_id=0,
        eos_token_id=0,
    )
    cfg._attn_implementation = attn
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = cls[1](cfg)
    return m.to(dtype).eval()


def _left_padded():
    """Rows 0-1 unpadded, rows 2-3 left-padded by 3 positions: ``(batch, prompts of rows 2-3 alone)``."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, V, (4, 10), generator=g)
    am = torch.ones_like(ids)
    am[2:, :3] = 0
    return {"input_ids": ids, "attention_mask": am}, ids[2:, 3:]


def _hooks(m: torch.nn.Module) -> int:
    return sum(len(x._forward_hooks) + len(x._forward_pre_hooks) for x in m.modules())


@pytest.mark.parametrize(("kind", "attn"), [("llama", "eager"), ("qwen2", "eager"), ("mistral", "sdpa")])
def test_a_float64_models_left_padded_losses_equal_its_prompts_alone_raw_or_hooked(kind, attn):
    m = _model(kind, attn=attn)
    batch, alone = _left_padded()
    before = _hooks(m)
    with torch.no_grad():
        ref = sample_losses(m, alone)  # each prompt alone, unpadded (rotary positions: the offset cancels)
        for raw in (True, False):
            model = m if raw else hooked_hf(m)
            per_sample = sample_losses(model, batch)
            assert torch.isfinite(per_sample).all()
            torch.testing.assert_close(per_sample[2:], ref, rtol=0, atol=1e-8)
            terms, mask = token_losses(model, batch, fill=0.0)
            naive = (terms * mask).sum() / mask.sum()
            torch.testing.assert_close(batch_loss(model, batch), naive, rtol=1e-12, atol=0)
            if raw:
                assert _hooks(m) == before  # the raw model's forward leaves no hook behind


def test_a_float64_models_left_padded_gradients_and_gram_equal_its_prompts_alone():
    m = _model("llama")
    batch, alone = _left_padded()
    mods = ["model.layers.0.mlp", "model.layers.1.self_attn.q_proj"]
    G = per_sample_grad_gram(m, sample_losses, batch, modules=mods)
    Ga = per_sample_grad_gram(m, sample_losses, alone, modules=mods)
    assert torch.isfinite(G).all()
    torch.testing.assert_close(G[2:, 2:], Ga, rtol=1e-6, atol=1e-9)
    # the gradient of the padded rows' summed loss is that of the prompts alone, in every parameter
    params = [p for p in m.parameters()]
    g = torch.autograd.grad(sample_losses(m, batch)[2:].sum(), params)
    ga = torch.autograd.grad(sample_losses(m, alone).sum(), params)
    for a, b in zip(g, ga):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_llc_of_a_left_padded_batch_is_finite_and_one_number_raw_hooked_and_batched(dtype):
    m = _model("llama", dtype=dtype)
    batch, _ = _left_padded()
    kw = dict(
        num_chains=2, num_draws=4, num_burnin_steps=2, step_size=1e-4, nbeta=10.0, localization=100.0, seed=3
    )
    kw["quiet"] = True
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model in (m, None):  # the adapter after the raw model: its hooks stay on m
            model = hooked_hf(m) if model is None else model
            for batched in (False, True):
                r = pp.estimate_llc(model, [batch], batched=batched, **kw)
                out.append(torch.as_tensor(r.llc_per_chain))
    assert torch.isfinite(out[0]).all()
    for o in out[1:]:
        torch.testing.assert_close(o, out[0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_native_component_masks_select_the_converted_models_entries_by_their_gradients(kind):
    """Each component of the native model (grouped-query heads: query and output slices; the shared key/value
    heads; tied embeddings) has as many entries as the converted model's, and the gradient of one padded batch's
    loss restricted to it has the same norm."""
    m = _model(kind)
    conv = pp.from_hf(m)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, V, (3, 9), generator=g)
    am = torch.ones_like(ids)
    am[0, 6:] = 0
    batch = {"input_ids": ids, "attention_mask": am}

    def norms(model, masks_of):
        params = dict(model.named_parameters())
        grads = dict(zip(params, torch.autograd.grad(batch_loss(model, batch), list(params.values()))))
        out = {}
        for c in hf_components(m):
            mk = masks_of(model, c)
            out[c] = (
                sum(int(v.sum()) for v in mk.values()),
                sum(float((grads[n] * mk[n]).pow(2).sum()) for n in mk),
            )
        return out

    native = norms(m, hf_component_masks)
    converted = norms(conv, pp.component_masks)
    assert any(".kv_head." in c for c in native)
    for c, (count, sq) in native.items():
        assert count == converted[c][0], c
        assert sq == pytest.approx(converted[c][1], rel=1e-9, abs=1e-20), c


def _other_family(kind: str) -> torch.nn.Module:
    """OPT, BLOOM and Falcon (masked and converted, not adapted): float64, eager attention."""
    if kind == "opt":
        cfg = transformers.OPTConfig(
            vocab_size=V,
            hidden_size=32,
            num_hidden_layers=2,
            ffn_dim=64,
            num_attention_heads=4,
            max_position_embeddings=16,
            word_embed_proj_dim=32,
        )
        cls = transformers.OPTForCausalLM
    elif kind == "bloom":
        cfg = transformers.BloomConfig(vocab_size=V, hidden_size=32, n_layer=2, n_head=4)
        cls = transformers.BloomForCausalLM
    else:
        cfg = transformers.FalconConfig(
            vocab_size=V,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            new_decoder_architecture=True,
            num_kv_heads=2,
        )
        cls = transformers.FalconForCausalLM
    cfg._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return cls(cfg).double().eval()


@pytest.mark.parametrize("kind", ["opt", "bloom", "falcon"])
def test_left_padded_float64_losses_and_gradients_of_other_families_equal_the_prompts_alone(kind):
    m = _other_family(kind)
    batch, alone = _left_padded()
    # OPT's learned positions count the real tokens from the mask; BLOOM's ALiBi and Falcon's rotary are relative
    per_sample = sample_losses(m, batch)
    ref = sample_losses(m, alone)
    assert torch.isfinite(per_sample).all()
    torch.testing.assert_close(per_sample[2:], ref, rtol=0, atol=1e-8)
    params = list(m.parameters())
    g = torch.autograd.grad(per_sample[2:].sum(), params)
    ga = torch.autograd.grad(ref.sum(), params)
    for a, b in zip(g, ga):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


class _PeftLike(torch.nn.Module):
    """A wrapper holding the causal LM as ``.base_model`` (as PEFT's), forwarding to it."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.base_model = model

    def forward(self, input_ids=None, **kwargs):
        return self.base_model(input_ids=input_ids, **kwargs)


def test_a_wrapped_float64_models_left_padded_losses_equal_the_prompts_alone():
    m = _model("llama")
    batch, alone = _left_padded()
    with torch.no_grad():
        per_sample = sample_losses(_PeftLike(m), batch)
        torch.testing.assert_close(per_sample[2:], sample_losses(m, alone), rtol=0, atol=1e-8)
    assert _hooks(m) == 0


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int32, torch.float32, torch.float64])
def test_a_padding_mask_of_any_dtype_gives_the_losses_of_the_int64_mask_raw_and_hooked(mask_dtype):
    m = _model("llama")
    batch, alone = _left_padded()
    other = {**batch, "attention_mask": batch["attention_mask"].to(mask_dtype)}
    with torch.no_grad():
        ref = sample_losses(m, alone)
        for model in (m, None):  # the adapter after the raw model: its hooks stay on m
            model = hooked_hf(m) if model is None else model
            got = sample_losses(model, other)
            torch.testing.assert_close(got, sample_losses(model, batch), rtol=0, atol=0)
            torch.testing.assert_close(got[2:], ref, rtol=0, atol=1e-8)


def test_a_sliding_window_models_right_padded_float64_losses_equal_the_converted_and_hooked_models():
    """Mistral's sliding window (4 positions) hides every key from a right-padding query 4 positions past the last
    real token: the raw model, its adapter and the converted model give one loss per token, and finite
    gradients."""
    cfg = transformers.MistralConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        sliding_window=4,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    m = transformers.MistralForCausalLM(cfg).double().eval()
    torch.manual_seed(1)
    ids = torch.randint(0, V, (3, 12))
    am = torch.ones_like(ids)
    am[0, 8:] = 0
    batch = {"input_ids": ids, "attention_mask": am}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        conv = pp.from_hf(m)
    want, mask = token_losses(conv, batch, fill=0.0)
    for model in (m, None):  # the adapter after the raw model: its hooks stay on m
        model = hooked_hf(m) if model is None else model
        got, got_mask = token_losses(model, batch, fill=0.0)
        assert torch.equal(got_mask, mask)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    grads = torch.autograd.grad(batch_loss(m, batch), list(m.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)
