"""pypattern.circuits with the model and the prompts on each available device (the CPU, and CUDA where there is
one), against the same computation on the CPU: exact edge patching, faithfulness, pruning curves, ACDC and edge
attribution (EAP, EAP-IG, exact), on flat and per-position graphs, for a GPT-2-like model, a rotary model with
grouped-query attention (Llama-like) and a rotary model with parallel attention and MLP (GPT-NeoX-like). Public
result objects (EdgeScores, Circuit, PruningCurve, faithfulness values) are on the CPU; patch_edges' values are on
the model's device."""

from __future__ import annotations

import copy

import pytest
import torch
from _circuits_reference import ARCHS, prompts, tiny
from _devices import DEVICES

from pypattern.circuits import acdc, edge_attribution, edges, faithfulness, patch_edges, pruning_curve
from pypattern.patching import LogitDiff

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-10  # float64 models: the devices' sums differ only by rounding order


def _setup(arch: str, device: str, seed: int = 0, per_example: bool = False, **kw):
    """A float64 model on the CPU and its copy on ``device``, the prompts and the metric for each."""
    model = tiny(seed=seed, **{**ARCHS[arch], **kw})
    moved = copy.deepcopy(model).to(device)
    clean, corr, ans, wrong = prompts(model, seed=seed + 1)
    pos = torch.tensor([5, 3, 4, 5, 2]) if per_example else -1
    metric = LogitDiff(ans, wrong, position=pos)
    pos_d = pos.to(device) if per_example else pos
    metric_d = LogitDiff(ans.to(device), wrong.to(device), position=pos_d)
    cpu = (model, clean, corr, metric)
    dev = (moved, clean.to(device), corr.to(device), metric_d)
    return cpu, dev


def _masks(n_edges: int, seed: int, n: int = 6, p: float = 0.3) -> torch.Tensor:
    """Single edges and random sets of edges, ``(C, n_edges)``."""
    gen = torch.Generator().manual_seed(seed)
    single = torch.eye(n_edges, dtype=torch.bool)[:: max(1, n_edges // 12)]
    return torch.cat([single, torch.rand(n, n_edges, generator=gen) < p])


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert (a.detach().cpu() - b.detach().cpu()).abs().max() <= TOL


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
@pytest.mark.parametrize("per_position", [False, True])
def test_patch_edges_on_device_equals_cpu(device, arch, per_position):
    (model, clean, corr, metric), (model_d, clean_d, corr_d, metric_d) = _setup(arch, device, seed=3)
    g = edges(model, per_position=per_position, seq_len=clean.shape[1] if per_position else None)
    masks = _masks(len(g), seed=4)
    for mode, ablation in (
        ("noise", "resample"),
        ("denoise", "resample"),
        ("noise", "mean"),
        ("noise", "zero"),
    ):
        ref = patch_edges(model, masks, clean, corr, metric=metric, mode=mode, ablation=ablation, graph=g)
        got = patch_edges(
            model_d, masks, clean_d, corr_d, metric=metric_d, mode=mode, ablation=ablation, graph=g
        )
        assert got.device.type == torch.device(device).type  # the metric's values, on the model's device
        _close(got, ref)
    # masks given on the device (a circuit's mask moved there by the user), and a small max_batch (several chunks)
    got = patch_edges(model_d, masks.to(device), clean_d, corr_d, metric=metric_d, graph=g, max_batch=2)
    _close(got, patch_edges(model, masks, clean, corr, metric=metric, graph=g))


@pytest.mark.parametrize("device", DEVICES)
def test_patch_edges_per_example_positions_and_cpu_prompts(device):
    (model, clean, corr, metric), (model_d, clean_d, corr_d, metric_d) = _setup(
        "llama", device, seed=5, per_example=True
    )
    for per_position in (False, True):
        g = edges(model, per_position=per_position, seq_len=clean.shape[1] if per_position else None)
        masks = _masks(len(g), seed=6)
        ref = patch_edges(model, masks, clean, corr, metric=metric, graph=g)
        _close(patch_edges(model_d, masks, clean_d, corr_d, metric=metric_d, graph=g), ref)
        # prompts left on the CPU are moved to the model's device
        _close(patch_edges(model_d, masks, clean, corr, metric=metric_d, graph=g), ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_faithfulness_and_pruning_curve_on_device(device, arch):
    (model, clean, corr, metric), (model_d, clean_d, corr_d, metric_d) = _setup(arch, device, seed=7)
    g = edges(model)
    circuits = _masks(len(g), seed=8, n=5, p=0.6)[-5:]
    for mode in ("noise", "denoise"):
        ref = faithfulness(model, circuits, clean, corr, metric=metric, mode=mode)
        got = faithfulness(model_d, circuits, clean_d, corr_d, metric=metric_d, mode=mode)
        assert got.device.type == "cpu"
        _close(got, ref)
        one = faithfulness(model_d, circuits[0], clean_d, corr_d, metric=metric_d, mode=mode)
        assert isinstance(one, float) and abs(one - float(ref[0])) <= TOL
    scores = edge_attribution(model, clean, corr, metric=metric, method="eap")
    ref = pruning_curve(model, scores, clean, corr, metric=metric, counts=[0, 5, 20, len(g)])
    got = pruning_curve(model_d, scores, clean_d, corr_d, metric=metric_d, counts=[0, 5, 20, len(g)])
    for name in ref.faithfulness:
        assert got.faithfulness[name].device.type == "cpu" and got.metric_values[name].device.type == "cpu"
        _close(got.faithfulness[name], ref.faithfulness[name])
        _close(got.metric_values[name], ref.metric_values[name])
    assert abs(got.m_full - ref.m_full) <= TOL and abs(got.m_empty - ref.m_empty) <= TOL
    # scores given as a tensor on the device
    got = pruning_curve(
        model_d, scores.scores.to(device), clean_d, corr_d, metric=metric_d, counts=[0, 5, 20]
    )
    ref = pruning_curve(model, scores.scores, clean, corr, metric=metric, counts=[0, 5, 20])
    _close(got.faithfulness["scores"], ref.faithfulness["scores"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("per_position", [False, True])
def test_acdc_on_device_equals_cpu(device, arch, per_position):
    kw = dict(layers=1, heads=2) if arch == "gpt2" else dict(layers=1)  # llama: 4 heads, 2 key/value heads
    (model, clean, corr, metric), (model_d, clean_d, corr_d, metric_d) = _setup(arch, device, seed=9, **kw)
    clean, corr, clean_d, corr_d = clean[:, :4], corr[:, :4], clean_d[:, :4], corr_d[:, :4]
    for threshold in (0.0, 0.05):
        ref = acdc(
            model, clean, corr, metric=metric, threshold=threshold, per_position=per_position, quiet=True
        )
        got = acdc(
            model_d,
            clean_d,
            corr_d,
            metric=metric_d,
            threshold=threshold,
            per_position=per_position,
            quiet=True,
        )
        assert got.mask.device.type == "cpu" and got.scores.device.type == "cpu"
        assert torch.equal(got.mask, ref.mask)
        _close(got.scores, ref.scores)
        assert abs(got.faithfulness - ref.faithfulness) <= TOL or (got.faithfulness != got.faithfulness)
        assert got.info["num_runs"] == ref.info["num_runs"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
@pytest.mark.parametrize("per_position", [False, True])
@pytest.mark.parametrize("method", ["eap", "eap-ig", "exact"])
def test_edge_attribution_on_device_equals_cpu(device, arch, per_position, method):
    (model, clean, corr, metric), (model_d, clean_d, corr_d, metric_d) = _setup(arch, device, seed=11)
    kw = dict(method=method, steps=3, per_position=per_position, quiet=True)
    for mode, ablation in (("noise", "resample"), ("denoise", "mean")):
        ref = edge_attribution(model, clean, corr, metric=metric, mode=mode, ablation=ablation, **kw)
        got = edge_attribution(model_d, clean_d, corr_d, metric=metric_d, mode=mode, ablation=ablation, **kw)
        for name in ("values", "m_base", "m_clean"):
            assert getattr(got, name).device.type == "cpu"  # results live on the CPU
            _close(getattr(got, name), getattr(ref, name))
    # EAP-IG in chunks of interpolation steps (several gradient passes), per-example metric positions
    (model, clean, corr, metric), (model_d, clean_d, corr_d, metric_d) = _setup(
        arch, device, seed=12, per_example=True
    )
    ref = edge_attribution(model, clean, corr, metric=metric, max_batch=2, **kw)
    got = edge_attribution(model_d, clean_d, corr_d, metric=metric_d, max_batch=2, **kw)
    _close(got.values, ref.values)
