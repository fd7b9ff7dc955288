"""The estimators with the model and data on a device: susceptibilities, bif, per_sample_grad_gram, sample and the
LLC with masks, for a model already on the device and for a CPU model given ``device=``, against the same call on
the CPU.

Every test runs on the CPU and, where torch sees a GPU, on ``cuda``. On the CPU the device run is the CPU run
itself (same tensors, same kernels): its results must be equal bit for bit. On a GPU the SGLD noise is keyed (the
same numbers on every device) but the forwards, the GEMMs and the noise's transcendental functions round
differently, so the chains differ by rounding: the models are float64 and the chains short, where those
differences stay near 1e-12 relative, and the GPU results are compared to the CPU's at 1e-6 relative (of the
largest entry), far above rounding and far below any real difference (a wrong batch, mask or probe changes the
estimates at order one).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _devices import DEVICES
from _devices import assert_close_on as _close
from torch import nn

import pypattern
from pypattern.gram import per_sample_grad_gram, per_sample_grad_gram_reference
from pypattern.sampling import estimate_learning_coeff_with_summary, sample
from pypattern.susceptibility import bif, susceptibilities

HOW = [
    "model_on_device",
    "device_argument",
]  # the model (and data) moved by the caller, or device= on a CPU model

SETTINGS = dict(
    num_chains=2,
    num_draws=12,
    num_burnin_steps=4,
    num_steps_bw_draws=1,
    step_size=1e-3,
    nbeta=20.0,
    localization=50.0,
    seed=3,
    quiet=True,
    warn_nonstationary=False,
)


def _to(batch, device):
    return tuple(t.to(device) for t in batch)


def _task():
    """A float64 classifier (3 classes), its data, and a probe with an ignored (-100) target: that sample does
    not count (left out of the mean probe loss, chi 0)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, generator=g, dtype=torch.float64)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    py = y[:6].clone()
    py[2] = -100
    return model, x, y, (x[:6], py)


def _components():
    mask = torch.zeros(5, 3, dtype=torch.bool)  # a CPU mask whatever the model's device
    mask[:3] = True
    return {"masked": {"0.weight": mask}, "head": ["2.weight", "2.bias"]}


def _placed(device: str, how: str, model, batches):
    """(model, batches, extra keyword arguments) for a run on ``device`` done ``how``."""
    if how == "model_on_device":
        return copy.deepcopy(model).to(device), [_to(b, device) for b in batches], {}
    return model, batches, {"device": device}


_REFERENCE: dict = {}


def _reference(key, compute):
    if key not in _REFERENCE:
        _REFERENCE[key] = compute()
    return _REFERENCE[key]


MODES = {
    "sequential": dict(batched=False),
    "batched": dict(batched=True),
    "batched_one_run_per_group": dict(batched=True, group_size=1),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("mode", list(MODES))
def test_susceptibilities_on_a_device_equal_the_cpu_run(device, how, mode):
    """Dict-of-masks and named components, a probe with an ignored sample, phi on the sampling batch: on the
    device as on the CPU, sequential, batched and one run per group."""
    model, x, y, probe = _task()
    loader = [(x[:16], y[:16]), (x[16:], y[16:])]

    def run(m, ld, pr, **extra):
        return susceptibilities(m, ld, pr, _components(), **SETTINGS, **MODES[mode], **extra)

    ref = _reference(("sus", mode), lambda: run(model, loader, probe))
    m, ld, extra = _placed(device, how, model, loader)
    pr = _to(probe, device) if how == "model_on_device" else probe
    got = run(m, ld, pr, **extra)
    for key in ("chi", "chi_se", "chi_chains", "phi_mean", "loss_mean"):
        _close(getattr(got, key), getattr(ref, key), device)
    np.testing.assert_array_equal(got.probe_counted, ref.probe_counted)
    assert not got.probe_counted[2] and (got.chi[:, 2] == 0).all()
    assert np.isfinite(got.chi).all() and np.abs(got.chi).max() > 0
    assert all(p.device.type == "cpu" for p in model.parameters())  # device= samples a copy


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("how", HOW)
def test_fused_full_batch_susceptibilities_on_a_device(device, how):
    """Full-batch SGLD on the probe itself: the probe losses and phi come from the sampler's own forward (one
    forward per step) also when the probe and the loader's batch reach the device as separate copies."""
    model, x, y, _ = _task()
    steps = SETTINGS["num_burnin_steps"] + SETTINGS["num_draws"]

    def run(m, ld, pr, **extra):
        calls = []
        hook = m.register_forward_pre_hook(lambda mod, args: calls.append(1))
        try:
            res = susceptibilities(m, ld, pr, _components(), **SETTINGS, batched=True, **extra)
        finally:
            hook.remove()
        return res, len(calls)

    ref, ref_calls = _reference("fused", lambda: run(model, [(x, y)], (x, y)))
    assert ref_calls <= steps + 8  # fused: one (vmap-ed) forward per step for every chain and component
    m, ld, extra = _placed(device, how, model, [(x, y)])
    got, calls = run(m, ld, ld[0], **extra)
    assert calls <= steps + 8
    for key in ("chi", "chi_se", "phi_mean", "loss_mean"):
        _close(getattr(got, key), getattr(ref, key), device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_token", [True, False])
def test_transformer_components_per_token_on_a_device(device, per_token):
    """Named components of pypattern's Transformer (masks the model makes, on its device), token probe."""
    from pypattern.models.transformer import Transformer, TransformerConfig

    cfg = TransformerConfig(
        n_layers=1,
        d_model=8,
        n_heads=2,
        d_head=4,
        d_mlp=None,
        d_vocab=7,
        n_ctx=6,
        dtype=torch.float64,
        seed=0,
    )
    model = Transformer(cfg)
    data = torch.randint(0, 7, (16, 6), generator=torch.Generator().manual_seed(1))
    loader = [data[:8], data[8:]]
    comps = ["blocks.0.attn.head.1", "embed"]

    def run(m, ld, pr, **extra):
        return susceptibilities(m, ld, pr, comps, per_token=per_token, **SETTINGS, **extra)

    ref = _reference(("transformer", per_token), lambda: run(model, loader, data[:2]))
    got = run(copy.deepcopy(model).to(device), [b.to(device) for b in loader], data[:2].to(device))
    for key in ("chi", "phi_mean", "loss_mean"):
        _close(getattr(got, key), getattr(ref, key), device)
    np.testing.assert_array_equal(got.probe_token, ref.probe_token)
    assert got.chi.shape == (2, 2 * 5 if per_token else 2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("how", HOW)
def test_bif_on_a_device_equals_the_cpu_run(device, how):
    model, x, y, probe = _task()
    loader = [(x[:16], y[:16]), (x[16:], y[16:])]
    ref = _reference("bif", lambda: bif(model, loader, probe, **SETTINGS))
    m, ld, extra = _placed(device, how, model, loader)
    pr = _to(probe, device) if how == "model_on_device" else probe
    got = bif(m, ld, pr, **SETTINGS, **extra)
    for key in ("bif", "loss_mean"):
        _close(getattr(got, key), getattr(ref, key), device)
    _close(np.nan_to_num(got.corr), np.nan_to_num(ref.corr), device)
    np.testing.assert_array_equal(got.probe_counted, ref.probe_counted)


class _TiedNet(nn.Module):
    """An embedding with a padding row whose weight the unembedding reuses, a linear map and a LayerNorm."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6, padding_idx=2)
        self.mix = nn.Linear(6, 6)
        self.ln = nn.LayerNorm(6)
        self.unembed = nn.Linear(6, 11)
        self.unembed.weight = self.embed.weight

    def forward(self, ids):
        return self.unembed(self.ln(torch.tanh(self.mix(self.embed(ids)))))


def _seq_loss(model, ids, targets):
    return F.cross_entropy(model(ids).transpose(1, 2), targets, reduction="none")


@pytest.mark.parametrize("device", DEVICES)
def test_per_sample_grad_gram_on_a_device(device):
    with torch.random.fork_rng():
        torch.manual_seed(4)
        net = _TiedNet().double()
    g = torch.Generator().manual_seed(5)
    ids, targets = torch.randint(0, 11, (6, 5), generator=g), torch.randint(0, 11, (6, 5), generator=g)
    ids[0, 1] = 2  # the padding row
    ref = per_sample_grad_gram(net, _seq_loss, ids, targets, check=True)
    on = copy.deepcopy(net).to(device)
    got = per_sample_grad_gram(on, _seq_loss, ids.to(device), targets.to(device), check=True)
    assert got.device.type == device and got.dtype == torch.float64
    _close(got.cpu().numpy(), ref.numpy(), device)
    spec = per_sample_grad_gram_reference(on, _seq_loss, ids.to(device), targets.to(device))
    torch.testing.assert_close(got, spec, rtol=1e-10, atol=1e-10 * float(spec.abs().max()))
    parts = per_sample_grad_gram(
        on, _seq_loss, ids.to(device), targets.to(device), per_module=True, centered=True
    )
    assert all(v.device.type == device for v in parts.values())


def _mlp_task():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(48, 4, generator=g, dtype=torch.float64)
    y = (x[:, :2].sum(1, keepdim=True) + 0.1 * torch.randn(48, 1, generator=g, dtype=torch.float64)).tanh()
    with torch.random.fork_rng():
        torch.manual_seed(2)
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    mask = torch.zeros(6, 4)  # a float 0/1 mask on the CPU
    mask[::2] = 1.0
    return model, [(x[i : i + 16], y[i : i + 16]) for i in range(0, 48, 16)], mask


def _mse(m, batch):
    x, y = batch
    return F.mse_loss(m(x), y)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batched", [True, False])
def test_sample_and_llc_with_cpu_masks_on_a_device(device, batched):
    """masks= (sample, estimate_llc) and optimize_over_per_model_param= (with device=) given as CPU tensors for a
    model on the device, chains batched or sequential: the masked entries stay at w*, the draws equal the CPU's."""
    model, loader, mask = _mlp_task()
    kw = dict(SETTINGS, loss_fn=_mse, batched=batched)
    w0 = model[0].weight.detach().clone()

    def frozen_entries_kept(m, ld):
        seen = []

        def cb(model):
            seen.append(bool((model[0].weight.detach().cpu()[mask == 0] == w0[mask == 0]).all()))

        sample(m, ld, masks={"0.weight": mask}, callbacks=[cb], **kw)
        return seen and all(seen)

    ref = _reference(("sample", batched), lambda: sample(model, loader, masks={"0.weight": mask}, **kw))
    m, ld, _ = _placed(device, "model_on_device", model, loader)
    got = sample(m, ld, masks={"0.weight": mask}, **kw)
    _close(got.loss_trace, ref.loss_trace, device)
    assert frozen_entries_kept(m, ld)

    llc_ref = _reference(
        ("llc", batched), lambda: pypattern.estimate_llc(model, loader, masks={"0.weight": mask}, **kw)
    )
    llc = pypattern.estimate_llc(m, ld, masks={"0.weight": mask}, **kw)
    _close(llc.llc_per_chain, llc_ref.llc_per_chain, device)

    dkw = dict(
        evaluate=_mse,
        num_chains=2,
        num_draws=10,
        num_burnin_steps=2,
        seed=1,
        verbose=False,
        optimizer_kwargs=dict(lr=1e-3, nbeta=20.0, localization=50.0),
        optimize_over_per_model_param={"0.weight": mask},
        batched=batched,
    )
    out_ref = _reference(
        ("devinterp", batched), lambda: estimate_learning_coeff_with_summary(model, loader, **dkw)
    )
    out = estimate_learning_coeff_with_summary(model, loader, device=device, **dkw)
    assert set(out) == set(out_ref)
    for key, v in out_ref.items():
        _close(out[key], v, device)
    assert all(p.device.type == "cpu" for p in model.parameters())
