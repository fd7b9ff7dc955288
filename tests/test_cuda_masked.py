"""Patching and circuits under an attention mask (left and right padding) with the model and the prompts on each
available device (the CPU, and CUDA where torch sees a GPU), against the same computation on the CPU: the exact
engine and the naive loop, AtP* (QK fix, GradDrop), Gaussian noise counted over real tokens, mean ablation over
right padding, EAP and exact edge patching.

Where no GPU is present the device tests still check the masked paths against an independent computation (the
naive one-forward-per-cell loop, the exact edge scores), and :func:`test_no_device_less_tensor_in_masked_paths` runs
every masked path under :class:`DeviceLessFactories`: a tensor made there without naming its device would stay on
the CPU when the model is on a GPU."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from _devices import DEVICES, DeviceLessFactories
from test_patching_arch import LLAMA, model_and_prompts

import pypattern.circuits as circuits
import pypattern.patching as patching
from pypattern.circuits import edge_attribution, patch_edges
from pypattern.patching import (
    GaussianNoise,
    LogitDiff,
    MeanAblation,
    activation_patching,
    attribution_patching,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-10  # float64 models: two devices differ in the order of their sums only
ARCHS = {
    "gpt2": dict(act_fn="gelu_new"),  # learned absolute positions: a shifted real token changes its values
    "llama": LLAMA,  # rotary positions, grouped-query attention
}
LENGTHS = [6, 4, 3]  # real tokens of each prompt (the first unpadded)


def padded(arch: str, side: str):
    """The architecture tests' model and prompts with rows 1 and 2 padded on ``side`` (pad id 0), the mask, and the
    per-prompt metric position of each last real token."""
    model, clean, corr, ans, wrong = model_and_prompts(ARCHS[arch])
    T = clean.shape[1]
    mask = torch.zeros(len(LENGTHS), T, dtype=torch.long)
    for b, n in enumerate(LENGTHS):
        mask[b, T - n :] = 1 if side == "left" else 0
        mask[b, :n] = 1 if side == "right" else mask[b, :n]
    clean, corr = clean.masked_fill(mask == 0, 0), corr.masked_fill(mask == 0, 0)
    last = -1 if side == "left" else mask.sum(1) - 1
    return model, clean, corr, ans, wrong, mask, last


def on(device: str, model, *tensors):
    return (
        copy.deepcopy(model).to(device),
        *(t.to(device) if isinstance(t, torch.Tensor) else t for t in tensors),
    )


def close(a: torch.Tensor, b: torch.Tensor, what: str, tol: float = TOL) -> None:
    assert a.shape == b.shape, (what, a.shape, b.shape)
    err = (a.detach().cpu() - b.detach().cpu()).abs().max().item() if a.numel() else 0.0
    assert err <= tol, f"{what}: differ by {err}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("side", ["left", "right"])
def test_masked_patching_on_device_equals_cpu(device, arch, side):
    """Exact patching of several sites, Gaussian noise at real-token positions, and AtP* under the mask: the values
    on the device equal the CPU's and stay on the device; on the device the exact engine equals the masked naive
    loop (an independent computation, so that the CPU run checks something too)."""
    model, clean, corr, ans, wrong, mask, last = padded(arch, side)
    dm, dclean, dcorr, dans, dwrong, dmask, dlast = on(device, model, clean, corr, ans, wrong, mask, last)
    met, dmet = LogitDiff(ans, wrong, position=last), LogitDiff(dans, dwrong, position=dlast)
    for site in ("resid_pre", "attn_out", "z", "k", "pattern"):
        kw = dict(method="exact", quiet=True)
        ref = activation_patching(model, site, clean, corr, metric=met, attention_mask=mask, **kw)
        got = activation_patching(dm, site, dclean, dcorr, metric=dmet, attention_mask=dmask, **kw)
        assert got.values.device.type == torch.device(device).type
        close(got.values, ref.values, f"{arch} {side} {site}")
        naive = activation_patching(
            dm, site, dclean, dcorr, metric=dmet, attention_mask=dmask, method="naive", quiet=True
        )
        close(got.values, naive.values, f"{arch} {side} {site} exact vs naive on {device}", 1e-9)
    noise = GaussianNoise(positions=[0, -1], std=0.7, seed=4)
    for site in ("resid_pre", "v"):
        kw = dict(corruption=noise, attention_mask=mask, quiet=True)
        ref = activation_patching(model, site, clean, metric=met, **kw)
        got = activation_patching(dm, site, dclean, metric=dmet, **{**kw, "attention_mask": dmask})
        close(got.values, ref.values, f"{arch} {side} {site} noise")
        assert float((ref.clean - ref.corrupted).abs().max()) > 1e-3  # the noise moved the metric
    kw = dict(sites=["z", "q", "k", "resid_pre"], qk_fix=True, grad_drop=True)
    ref = attribution_patching(model, clean, corr, metric=met, attention_mask=mask, **kw)
    got = attribution_patching(dm, dclean, dcorr, metric=dmet, attention_mask=dmask, **kw)
    for site in kw["sites"]:
        assert got[site].values.device.type == torch.device(device).type
        close(got[site].values, ref[site].values, f"{arch} {side} AtP* {site}", 1e-9)
    if side == "right":  # mean ablation over the prompts real at each position
        ref = activation_patching(
            model, "resid_pre", clean, metric=met, corruption=MeanAblation(), direction="noising",
            attention_mask=mask, quiet=True,
        )  # fmt: skip
        got = activation_patching(
            dm, "resid_pre", dclean, metric=dmet, corruption=MeanAblation(), direction="noising",
            attention_mask=dmask, quiet=True,
        )  # fmt: skip
        close(got.values, ref.values, f"{arch} mean ablation")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_masked_circuits_on_device_equals_cpu(device, side):
    """EAP and exact edge scores and a patched edge set under the mask on the device equal the CPU's; on the device
    the exact scores of single edges equal patch_edges of each edge (an independent path through the engine)."""
    model, clean, corr, ans, wrong, mask, last = padded("llama", side)
    dm, dclean, dcorr, dans, dwrong, dmask, dlast = on(device, model, clean, corr, ans, wrong, mask, last)
    met, dmet = LogitDiff(ans, wrong, position=last), LogitDiff(dans, dwrong, position=dlast)
    for method in ("eap", "exact"):
        ref = edge_attribution(model, clean, corr, metric=met, method=method, attention_mask=mask, quiet=True)
        got = edge_attribution(
            dm, dclean, dcorr, metric=dmet, method=method, attention_mask=dmask, quiet=True
        )
        close(got.scores, ref.scores, f"{side} {method}", 1e-9)
        assert float(ref.scores.abs().max()) > 0
    g = circuits.edges(model)
    sets = torch.zeros(3, len(g), dtype=torch.bool)
    sets[0, ::3], sets[1, 1::4], sets[2, :] = True, True, True
    ref = patch_edges(model, sets, clean, corr, metric=met, graph=g, attention_mask=mask)
    got = patch_edges(dm, sets, dclean, dcorr, metric=dmet, graph=g, attention_mask=dmask)
    close(got, ref, f"{side} patch_edges")
    single = torch.eye(len(g), dtype=torch.bool)[:12]
    one = patch_edges(dm, single, dclean, dcorr, metric=dmet, graph=g, attention_mask=dmask, mode="noise")
    exact = edge_attribution(dm, dclean, dcorr, metric=dmet, method="exact", attention_mask=dmask, quiet=True)
    base = patch_edges(
        dm, single[:1] & False, dclean, dcorr, metric=dmet, graph=g, attention_mask=dmask, mode="noise"
    )
    close((one - base).mean(-1), exact.scores[:12], f"{side} exact scores vs single-edge patches", 1e-9)


PATCHING = Path(patching.__file__).parent
CIRCUITS = Path(circuits.__file__).parent
CHECKED = {
    PATCHING / f for f in ("api.py", "engine.py", "attribution.py", "corruptions.py", "metrics.py")
} | {CIRCUITS / f for f in ("api.py", "engine.py", "model_view.py")}


def test_no_device_less_tensor_in_masked_paths():
    """Every masked path of patching (exact, naive, AtP* in parts, Gaussian noise at real tokens, mean ablation)
    and of the circuits (EAP, EAP-IG, exact scores, patched edge sets), left and right padding, run on the CPU
    under :class:`DeviceLessFactories`: the modules make no tensor without naming its device there."""
    with DeviceLessFactories(CHECKED) as mode:
        for side in ("left", "right"):
            model, clean, corr, ans, wrong, mask, last = padded("llama", side)
            met = LogitDiff(ans, wrong, position=last)
            for method in ("exact", "naive"):
                for site in ("resid_pre", "z", "k", "pattern"):
                    activation_patching(
                        model, site, clean, corr, metric=met, attention_mask=mask, method=method, quiet=True
                    )
            noise = GaussianNoise(positions=[0, -1], std=0.7, seed=4)
            activation_patching(model, "resid_pre", clean, metric=met, corruption=noise, attention_mask=mask)
            attribution_patching(
                model, clean, corr, metric=met, attention_mask=mask, sites=["z", "q", "k"], qk_fix=True,
                grad_drop=True, max_batch=2,
            )  # fmt: skip
            attribution_patching(model, clean, metric=met, corruption=noise, attention_mask=mask, sites=["k"])
            if side == "right":
                activation_patching(
                    model, "z", clean, metric=met, corruption=MeanAblation(), direction="noising",
                    attention_mask=mask, quiet=True,
                )  # fmt: skip
            for method in ("eap", "eap-ig", "exact"):
                edge_attribution(
                    model, clean, corr, metric=met, method=method, attention_mask=mask, quiet=True
                )
            g = circuits.edges(model)
            sets = torch.zeros(2, len(g), dtype=torch.bool)
            sets[0, ::3] = True
            patch_edges(model, sets, clean, corr, metric=met, graph=g, attention_mask=mask)
    assert not mode.found, (
        f"tensors made without a device (on the CPU whatever the model's): {sorted(mode.found)}"
    )
