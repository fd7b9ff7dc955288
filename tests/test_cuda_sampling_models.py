"""Sampling and the models with the weights on a device and the user's data where the user keeps it (on the CPU),
against the same call on the CPU: SGLD, SGNHT and RMSprop-SGLD chains (sequential and batched) on a shuffled
``TensorDataset`` loader, the default losses on token batches and on Hugging Face dicts with ``attention_mask`` and
``labels``, checkpoint and resume, ``refined_llc``; pypattern's Transformer built under a default device
(``with torch.device(...)``) and run there; ``from_hf`` on Hugging Face models whose weights are on the device (its
verification forward included), also when converted under a default device.

Every test runs on the CPU and, where torch sees a GPU, on ``cuda``. On the CPU the device run is the CPU run itself:
results must be equal bit for bit. On a GPU the noise is keyed (the same numbers on every device) but the forwards
round differently: the models are float64 and the chains short, and results are compared at 1e-6 relative (of the
largest entry), far above rounding and far below a wrong batch, mask or order (which changes them at order one).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from _devices import DEVICES
from _devices import assert_close_on as _close
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pypattern
from pypattern.models import Transformer, TransformerConfig
from pypattern.models.hf import HAS_TRANSFORMERS
from pypattern.sampling import sample

pytestmark = pytest.mark.usefixtures("one_thread")


KW = dict(
    num_chains=2,
    num_draws=5,
    num_burnin_steps=2,
    step_size=1e-3,
    nbeta=10.0,
    localization=20.0,
    seed=3,
    quiet=True,
    warn_nonstationary=False,
)


def _mlp():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 3, generator=g, dtype=torch.float64)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    return model, x, y


def _lm(**opts) -> Transformer:
    cfg = dict(n_layers=1, d_model=8, n_heads=2, d_mlp=16, d_vocab=11, n_ctx=6, dtype=torch.float64, seed=1)
    return Transformer(TransformerConfig(**{**cfg, **opts}))


_LLAMA = dict(
    normalization_type="RMS",
    positional_embedding_type="rotary",
    gated_mlp=True,
    n_key_value_heads=1,
    attn_bias=False,
    mlp_bias=False,
    act_fn="silu",
)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("sampler", ["sgld", "sgnht", "rmsprop_sgld"])
def test_chains_on_a_device_read_cpu_data_as_the_cpu_run(device, batched, sampler):
    """A shuffled TensorDataset loader on the CPU (the keyed permutation drawn on the CPU, the rows moved to the
    model's device), with masks= and restrict_to= given as CPU tensors and names, and an observable."""
    model, x, y = _mlp()
    loader = DataLoader(TensorDataset(x, y), batch_size=6, shuffle=True)
    mask = torch.zeros(5, 3, dtype=torch.bool)
    mask[:3] = True
    kw = dict(
        KW,
        batched=batched,
        sampler=sampler,
        masks={"0.weight": mask},
        restrict_to=["0.weight", "2.bias"],
        observables={"w": lambda m, b: m[0].weight.sum()},
    )
    ref = sample(model, loader, **kw)
    got = sample(copy.deepcopy(model).to(device), loader, **kw)
    _close(got.loss_trace, ref.loss_trace, device)
    _close(got.observables["w"], ref.observables["w"], device)
    _close(got.init_loss, ref.init_loss, device)


def _token_data():
    g = torch.Generator().manual_seed(2)
    toks = torch.randint(0, 11, (12, 6), generator=g)
    am = torch.ones_like(toks)
    am[::2, -2:] = 0  # right padding in every other sequence
    labels = toks.masked_fill(am == 0, -100)
    labels[:, 1] = -100
    dicts = [
        {"input_ids": toks[i : i + 4], "attention_mask": am[i : i + 4], "labels": labels[i : i + 4]}
        for i in (0, 4, 8)
    ]
    return toks, dicts


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["tokens", "dicts"])
def test_default_losses_on_a_device_equal_the_cpu_run(device, kind):
    """The default loss (next-token cross-entropy over the counted tokens) on token batches and on Hugging Face
    dicts with attention_mask and labels kept on the CPU, for a rotary grouped-query model on the device."""
    model = _lm(**_LLAMA)
    toks, dicts = _token_data()
    loader = DataLoader(toks, batch_size=4) if kind == "tokens" else dicts
    ref = pypattern.estimate_llc(model, loader, batched=False, **KW)
    got = pypattern.estimate_llc(copy.deepcopy(model).to(device), loader, batched=False, **KW)
    _close(got.loss_trace, ref.loss_trace, device)
    _close(got.llc_per_chain, ref.llc_per_chain, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["tokens", "dict", "pair"])
def test_loss_functions_called_directly_move_a_cpu_batch_to_the_model(device, kind):
    """pypattern.losses' functions called by a user with the batch on the CPU and the model on the device: the
    batch is read where the model computes, in a direct call as in the estimators (which move their batches
    first)."""
    from pypattern import losses

    if kind == "pair":
        model, x, y = _mlp()
        batch = (x[:6], y[:6])
    else:
        model = _lm(**_LLAMA)
        toks, dicts = _token_data()
        batch = toks[:4] if kind == "tokens" else dicts[0]
    on = copy.deepcopy(model).to(device)
    for fn in (losses.batch_loss, losses.sample_losses, losses.probe_losses):
        ref = fn(model, batch)
        got = fn(on, batch)
        assert got.device.type == torch.device(device).type
        _close(got, ref, device)
    ref_terms, ref_mask = losses.token_losses(model, batch)
    terms, mask = losses.token_losses(on, batch)
    assert torch.equal(mask.cpu(), ref_mask)
    _close(terms.nan_to_num(), ref_terms.nan_to_num(), device)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batched", [False, True])
def test_checkpoint_resume_on_a_device_equals_the_uninterrupted_cpu_run(device, batched, tmp_path):
    """A run stopped by a callback and resumed from its checkpoint (SGNHT: its momenta and thermostat saved and
    loaded onto the device) gives the uninterrupted CPU run."""
    model, x, y = _mlp()
    loader = DataLoader(TensorDataset(x, y), batch_size=6, shuffle=True)
    kw = dict(KW, batched=batched, sampler="sgnht")
    ref = sample(model, loader, **kw)

    def stop(chain, draw):
        if chain == 1 and draw == 2:
            raise _Stop

    m = copy.deepcopy(model).to(device)
    path = tmp_path / "run.npz"
    with pytest.raises(_Stop):
        sample(m, loader, checkpoint=path, callbacks=[stop], **kw)
    got = sample(m, loader, checkpoint=path, **kw)
    _close(got.loss_trace, ref.loss_trace, device)


@pytest.mark.parametrize("device", DEVICES)
def test_refined_llc_on_a_device_equals_the_cpu_run(device):
    model = _lm()
    toks, _ = _token_data()
    loader = DataLoader(toks, batch_size=4)
    kw = dict(KW, components=["blocks.0.attn.head.1", "blocks.0.mlp"])
    ref = pypattern.refined_llc(model, loader, **kw)
    got = pypattern.refined_llc(copy.deepcopy(model).to(device), loader, **kw)
    _close(np.asarray(got.llc_mean, dtype=float), np.asarray(ref.llc_mean, dtype=float), device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "opts",
    [
        {},
        _LLAMA,
        dict(positional_embedding_type="alibi"),
        dict(parallel_attn_mlp=True, positional_embedding_type="rotary", rotary_dim=2),
    ],
    ids=["gpt2", "llama", "alibi", "parallel"],
)
def test_transformer_built_under_a_default_device(device, opts):
    """Transformer(cfg) under ``with torch.device(device)`` (its weights drawn from a CPU generator, then copied)
    has the CPU-built model's weights, and runs (forward, run_with_cache, hooks) there as the CPU model does."""
    ref = _lm(**opts)
    with torch.device(device):
        got = _lm(**opts)
    for (n, p), q in zip(ref.named_parameters(), got.parameters()):
        assert q.device.type == torch.device(device).type, n
        torch.testing.assert_close(q.cpu(), p, rtol=0, atol=0)
    toks, _ = _token_data()
    logits, cache = got.run_with_cache(toks.to(device))
    ref_logits, ref_cache = ref.run_with_cache(toks)
    _close(logits.cpu(), ref_logits, device)
    _close(cache["blocks.0.attn.hook_pattern"].cpu(), ref_cache["blocks.0.attn.hook_pattern"], device)
    hooked = got.run_with_hooks(
        toks.to(device), fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: x * 0.5)]
    )
    ref_hooked = ref.run_with_hooks(toks, fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: x * 0.5)])
    _close(hooked.cpu(), ref_hooked, device)


def _hf(arch: str):
    import transformers as tr

    if arch == "gpt2":
        cfg = tr.GPT2Config(
            vocab_size=37, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
        )
    elif arch == "llama":
        cfg = tr.LlamaConfig(
            vocab_size=37, max_position_embeddings=16, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=24, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
    elif arch == "gpt_neo":
        cfg = tr.GPTNeoConfig(
            vocab_size=37, max_position_embeddings=16, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=24,
            attention_types=[[["global", "local"], 1]], window_size=3, bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
    else:
        cfg = tr.GPTJConfig(
            vocab_size=37, n_positions=16, n_embd=16, n_layer=2, n_head=2, rotary_dim=4, bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(7)
        return tr.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").double().eval()


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neo", "gptj"])
def test_from_hf_on_a_device(device, arch):
    """from_hf of a Hugging Face model on the device (verified against its forward there) equals the conversion of
    the CPU model; converting under ``with torch.device(device)`` (the converters' checks read CPU copies) too."""
    hf = _hf(arch)
    ref = pypattern.from_hf(hf)
    dev_hf = copy.deepcopy(hf).to(device)
    got = pypattern.from_hf(dev_hf)
    with torch.device(device):
        again = pypattern.from_hf(dev_hf)
    toks, _ = _token_data()
    want = ref(toks)
    for m in (got, again):
        assert next(m.parameters()).device.type == torch.device(device).type
        _close(m(toks.to(device)).cpu(), want, device)


@pytest.mark.parametrize("device", DEVICES)
def test_sample_and_estimate_llc_take_device(device):
    """``device=``: the chains run on a copy of the model there (the caller's model stays where it is), the CPU
    data moved as read; the same draws as the CPU run. A device torch cannot use is refused by name."""
    model, x, y = _mlp()
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    before = copy.deepcopy(model.state_dict())
    ref = sample(model, loader, **KW)
    got = sample(model, loader, device=device, **KW)
    _close(got.loss_trace, ref.loss_trace, device)
    llc = pypattern.estimate_llc(model, loader, device=device, **KW)
    _close(llc.llc_per_chain, pypattern.estimate_llc(model, loader, **KW).llc_per_chain, device)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="device='nowhere'"):
        sample(model, loader, device="nowhere", **KW)
