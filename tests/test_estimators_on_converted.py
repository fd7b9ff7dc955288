"""Every sampling estimator on Hugging Face models converted with from_hf, checked against the same estimator on
the unconverted model. With the noise off, SGLD is a deterministic drift whose update is elementwise, and a
conversion only reorders, splits or transposes weight entries: so the converted and the unconverted model follow
the same trajectory, chains differing only through their keyed data order. Loss traces, LLCs, per-head
susceptibilities (masks built independently on each side: pypattern's layout vs the Hugging Face fused/split one)
and BIFs must therefore agree to float rounding; a wrongly mapped weight or mask would not."""

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import pypattern as pp  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

V, T = 19, 8


def _hf(arch: str):
    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=V,
            n_positions=16,
            n_embd=12,
            n_layer=2,
            n_head=3,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        m = transformers.GPT2LMHeadModel(cfg)
    elif arch == "neox":
        cfg = transformers.GPTNeoXConfig(
            vocab_size=V,
            hidden_size=12,
            num_hidden_layers=2,
            num_attention_heads=3,
            intermediate_size=20,
            rotary_pct=0.5,
            max_position_embeddings=16,
            hidden_dropout=0.0,
            attention_dropout=0.0,
        )
        m = transformers.GPTNeoXForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(
            vocab_size=V,
            hidden_size=16,
            intermediate_size=20,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=16,
        )
        m = transformers.LlamaForCausalLM(cfg)
    return m.double().eval()


def _loader():
    """A shuffled loader: each chain reads its own keyed order, so the chains differ with the noise off."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, V, (12, T), generator=g)
    return torch.utils.data.DataLoader(tokens, batch_size=4, shuffle=True)


KW = dict(
    num_chains=3, num_draws=6, num_burnin_steps=2, step_size=1e-3, localization=10.0, noise_scale=0.0, seed=4
)


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_llc_and_bif_on_converted_equal_unconverted(arch):
    hf = _hf(arch)
    tf = pp.from_hf(hf)
    loader = _loader()
    a = pp.estimate_llc(tf, loader, **KW)
    b = pp.estimate_llc(hf, loader, **KW)
    np.testing.assert_allclose(a.loss_trace, b.loss_trace, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(a.llc_per_chain, b.llc_per_chain, rtol=1e-7, atol=1e-9)
    assert np.ptp(a.loss_trace[:, -1]) > 0  # the chains moved, and differently
    probe = loader.dataset[:2]
    ba = pp.bif(tf, loader, probe, **KW)
    bb = pp.bif(hf, loader, probe, **KW)
    np.testing.assert_allclose(ba.bif, bb.bif, rtol=1e-6, atol=1e-14)
    assert np.abs(ba.bif).max() > 0


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_per_head_susceptibilities_on_converted_equal_unconverted(arch):
    hf = _hf(arch)
    tf = pp.from_hf(hf)
    loader = _loader()
    comps = ["blocks.1.attn.head.1", "blocks.0.mlp", "embed"]
    if arch == "llama":
        comps.append("blocks.1.attn.kv_head.1")
    probe = loader.dataset[4:6]
    ours = pp.susceptibilities(tf, loader, probe, comps, **KW)
    native = {c: pp.component_masks(hf, c) for c in comps}  # masks over HF's own layout
    theirs = pp.susceptibilities(hf, loader, probe, native, **KW)
    np.testing.assert_allclose(ours.chi, theirs.chi, rtol=1e-6, atol=1e-12)
    assert (np.abs(ours.chi).max(axis=1) > 0).all()  # every component's chains moved
