"""Patching with the model and the prompts on a device: the exact engine, AtP* (QK fix, GradDrop), Gaussian-noise
corruption, bootstrap intervals and ``shortlist_and_confirm`` give on every available device the values they give
on the CPU (float64 models: to rounding), and their results stay on the model's device.

Only the CPU runs where no GPU is present; there the device tests still check the device-agnostic paths against an
independent computation (the naive one-forward-per-cell method), and :func:`test_no_device_less_tensor_in_patching`
checks that no tensor the patching code makes is left on the CPU by default (every factory call there names its
device), the CPU-only assumption a GPU run would fail on."""

import copy
import warnings
from pathlib import Path

import pytest
import torch
from _devices import DEVICES, DeviceLessFactories
from test_patching_arch import LLAMA, model_and_prompts  # the architecture tests' settings and builder

import pypattern.patching as patching
from pypattern.patching import (
    KL,
    ExactEngine,
    GaussianNoise,
    LogitDiff,
    PatchResult,
    activation_patching,
    attribution_patching,
    shortlist_and_confirm,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-10  # float64 models: the same computation on two devices differs in the order of its sums only

ARCHS = {
    "gpt2": dict(act_fn="gelu_new"),
    # rotary positions with grouped-query attention and a sliding window
    "llama_window": {**LLAMA, "sliding_window": 3},
    # parallel attention and MLP, partial rotary
    "neox": dict(parallel_attn_mlp=True, positional_embedding_type="rotary", rotary_dim=2),
    # ALiBi score biases, a LayerNorm on the embedding
    "bloom": dict(positional_embedding_type="alibi", post_embedding_ln=True, act_fn="bloom_gelu"),
    # ALiBi with grouped-query attention
    "alibi_gqa": {**LLAMA, "positional_embedding_type": "alibi"},
}
SITES = ["resid_pre", "resid_mid", "attn_out", "mlp_out", "resid_post", "z", "q", "k", "v", "pattern"]


def build(arch: str, **kw):
    """:func:`test_patching_arch.model_and_prompts` for one of this file's architectures (on the CPU)."""
    return model_and_prompts({**ARCHS[arch], **kw})


def on(device: str, model, *tensors):
    """A copy of ``model`` and ``tensors`` on ``device`` (the CPU originals stay for the reference)."""
    return (copy.deepcopy(model).to(device), *(t.to(device) for t in tensors))


def sites_of(model) -> list[str]:
    return [s for s in SITES if not (s == "resid_mid" and model.cfg.parallel_attn_mlp)]


def metrics(ans, wrong, device):
    """Metrics at the last position, at an earlier one (the engine truncates the prompts) and at positions
    varying per example (on the device, as a user who moved everything there gives them)."""
    return {
        "last": lambda: LogitDiff(ans, wrong),
        "pos3": lambda: LogitDiff(ans, wrong, position=3),
        "per_example": lambda: LogitDiff(ans, wrong, position=torch.tensor([5, 2, 4], device=device)),
        "kl": lambda: KL(position=torch.tensor([4, 5, 3], device=device)),
    }


def close(a: torch.Tensor, b: torch.Tensor, what: str, tol: float = TOL) -> None:
    assert a.shape == b.shape, (what, a.shape, b.shape)
    err = (a.detach().cpu() - b.detach().cpu()).abs().max().item() if a.numel() else 0.0
    assert err <= tol, f"{what}: differ by {err}"


def same_device(t: torch.Tensor, device: str) -> bool:
    return t.device.type == torch.device(device).type


# ----- exact patching ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("per_position", [True, False])
def test_exact_engine_on_device_equals_cpu(device, arch, per_position, monkeypatch):
    """Every site, metric positions at the end, before it and varying per example: the exact engine on the device
    equals it on the CPU, its values stay on the device; on the device it equals the naive method for a few sites
    (an independent computation, so that the CPU run checks something too)."""
    monkeypatch.setattr(ExactEngine, "CHUNK_ROWS", 40)  # uneven chunks of cells in a block
    model, clean, corr, ans, wrong = build(arch)
    dm, dclean, dcorr, dans, dwrong = on(device, model, clean, corr, ans, wrong)
    ref_metrics, dev_metrics = metrics(ans, wrong, "cpu"), metrics(dans, dwrong, device)
    for name in ref_metrics:
        # every site at the last position and at per-example positions; a few at the others
        some = ["resid_pre", "attn_out", "z", "q", "k"]
        for site in sites_of(model) if name in ("last", "per_example") else some:
            kw = dict(per_position=per_position, method="exact", max_batch=5)
            ref = activation_patching(model, site, clean, corr, metric=ref_metrics[name](), **kw)
            got = activation_patching(dm, site, dclean, dcorr, metric=dev_metrics[name](), **kw)
            assert same_device(got.values, device) and same_device(got.clean, device)
            close(got.values, ref.values, f"{arch} {site} {name} per_position={per_position}")
            close(got.corrupted, ref.corrupted, f"{arch} {site} {name} corrupted")
        for site in ("resid_pre", "k", "q") if name == "per_example" else ():
            a = activation_patching(dm, site, dclean, dcorr, metric=dev_metrics[name](), method="exact")
            b = activation_patching(dm, site, dclean, dcorr, metric=dev_metrics[name](), method="naive")
            close(a.values, b.values, f"{arch} {site} exact vs naive on {device}", 1e-9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_gaussian_noise_on_device_equals_cpu(device, direction):
    """Gaussian noise on chosen positions, drawn on the CPU from its seed: the same noise and so the same values on
    the device (exact engine, also over windows of layers)."""
    model, clean, _, ans, wrong = build("llama_window")
    dm, dclean, dans, dwrong = on(device, model, clean, ans, wrong)
    noise = GaussianNoise(positions=[1, 3], std_multiplier=2.0, seed=5)
    for site in ("resid_pre", "z", "k", "mlp_out"):
        kw = dict(corruption=noise, direction=direction, method="exact")
        ref = activation_patching(model, site, clean, metric=LogitDiff(ans, wrong), **kw)
        got = activation_patching(dm, site, dclean, metric=LogitDiff(dans, dwrong), **kw)
        close(got.values, ref.values, f"{site} {direction}")
        close(got.corrupted, ref.corrupted, f"{site} {direction} corrupted run")
        # the noise moved the metric: the corrupted run is not the clean one
        assert (ref.clean - ref.corrupted).abs().max() > 1e-3
        win = activation_patching(dm, site, dclean, metric=LogitDiff(dans, dwrong), window=2, **kw)
        ref_win = activation_patching(model, site, clean, metric=LogitDiff(ans, wrong), window=2, **kw)
        close(win.values, ref_win.values, f"{site} {direction} window")


# ----- attribution patching --------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["llama_window", "bloom", "alibi_gqa", "neox"])
@pytest.mark.parametrize("per_position", [True, False])
def test_atp_star_on_device_equals_cpu(device, arch, per_position):
    """AtP* (the QK fix of queries and keys, GradDrop) with per-example metric positions, in one pass and in parts
    of two prompts: the estimates and GradDrop scores on the device equal those on the CPU."""
    model, clean, corr, ans, wrong = build(arch)
    dm, dclean, dcorr, dans, dwrong = on(device, model, clean, corr, ans, wrong)
    sites = ["q", "k", "z", "resid_pre", "attn_out"]
    kw = dict(sites=sites, per_position=per_position, qk_fix=True, grad_drop=True)
    for max_batch in (None, 2):
        pos = torch.tensor([5, 3, 4])
        ref = attribution_patching(
            model, clean, corr, metric=LogitDiff(ans, wrong, position=pos), max_batch=max_batch, **kw
        )
        got = attribution_patching(
            dm,
            dclean,
            dcorr,
            metric=LogitDiff(dans, dwrong, position=pos.to(device)),
            max_batch=max_batch,
            **kw,
        )
        for site in sites:
            assert same_device(got[site].values, device)
            close(got[site].values, ref[site].values, f"{arch} {site} max_batch={max_batch}")
            close(got[site].info["graddrop"], ref[site].info["graddrop"], f"{arch} {site} graddrop")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("max_batch", [None, 2])
def test_atp_gaussian_noise_on_device_equals_cpu(device, max_batch):
    """AtP* with Gaussian noise (denoising: the noise on the target run; noising: on the source run), in one pass
    and in parts (the noise drawn once for all the prompts)."""
    model, clean, _, ans, wrong = build("alibi_gqa")
    dm, dclean, dans, dwrong = on(device, model, clean, ans, wrong)
    noise = GaussianNoise(positions=[0, 2, 4], seed=2)
    for direction in ("denoising", "noising"):
        kw = dict(
            sites=["q", "k", "resid_pre"],
            corruption=noise,
            direction=direction,
            qk_fix=True,
            grad_drop=True,
            max_batch=max_batch,
        )
        ref = attribution_patching(model, clean, metric=LogitDiff(ans, wrong), **kw)
        got = attribution_patching(dm, dclean, metric=LogitDiff(dans, dwrong), **kw)
        for site, r in ref.items():
            close(got[site].values, r.values, f"{site} {direction}")
            close(got[site].info["graddrop"], r.info["graddrop"], f"{site} {direction} graddrop")


# ----- results and shortlisting ----------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_confidence_interval_on_device_equals_cpu(device):
    """The bootstrap interval (resamples drawn on the CPU from the seed) of a result on the device: the same
    interval, on the device; a normalised interval whose resamples all have no gap is NaN, on the device."""
    model, clean, corr, ans, wrong = build("gpt2")
    dm, dclean, dcorr, dans, dwrong = on(device, model, clean, corr, ans, wrong)
    ref = activation_patching(model, "z", clean, corr, metric=LogitDiff(ans, wrong))
    got = activation_patching(dm, "z", dclean, dcorr, metric=LogitDiff(dans, dwrong))
    for normalized in (True, False):
        lo, hi = got.ci(num_resamples=200, seed=4, normalized=normalized)
        rlo, rhi = ref.ci(num_resamples=200, seed=4, normalized=normalized)
        assert same_device(lo, device) and same_device(hi, device)
        close(lo, rlo, f"ci low normalized={normalized}")
        close(hi, rhi, f"ci high normalized={normalized}")
    recs, ref_recs = got.to_records(), ref.to_records()
    for a, b in zip(recs, ref_recs):
        assert a.keys() == b.keys()
        for k in ("mean", "se", "ci_low", "ci_high"):
            assert abs(a[k] - b[k]) <= TOL, (k, a, b)
    flat = PatchResult(
        values=got.values,
        clean=got.clean,
        corrupted=got.clean.clone(),
        axes=got.axes,
        coords=got.coords,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lo, hi = flat.ci(num_resamples=20)
    assert same_device(lo, device) and bool(lo.isnan().all()) and bool(hi.isnan().all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("site", ["k", "q", "resid_pre", "z"])
def test_shortlist_and_confirm_on_device_equals_cpu(device, site):
    """AtP* shortlisting and exact confirmation on the device: the same cells, estimates and exact effects."""
    model, clean, corr, ans, wrong = build("alibi_gqa")
    dm, dclean, dcorr, dans, dwrong = on(device, model, clean, corr, ans, wrong)
    pos = torch.tensor([5, 2, 4])
    kw = dict(k=6, qk_fix=True, grad_drop=True, max_batch=2)
    ref = shortlist_and_confirm(model, site, clean, corr, metric=LogitDiff(ans, wrong, position=pos), **kw)
    got = shortlist_and_confirm(
        dm, site, dclean, dcorr, metric=LogitDiff(dans, dwrong, position=pos.to(device)), **kw
    )
    key = lambda r: tuple(r.get(a, -1) for a in ("layer", "head", "pos"))
    assert sorted(map(key, got)) == sorted(map(key, ref))
    by = {key(r): r for r in ref}
    for r in got:
        assert abs(r["atp"] - by[key(r)]["atp"]) <= TOL and abs(r["exact"] - by[key(r)]["exact"]) <= TOL, r
    assert any(abs(r["exact"]) > 1e-3 for r in ref)  # the confirmed cells move the metric


# ----- a CPU check of the device handling ------------------------------------------------------------------------
PATCHING = Path(patching.__file__).resolve().parent
#: the modules whose tensors must follow the model's device (api.py and sites.py are checked elsewhere)
CHECKED = {
    PATCHING / f for f in ("engine.py", "attribution.py", "corruptions.py", "results.py", "metrics.py")
}


def test_device_less_factories_detector_sees_a_call():
    """The detector itself: a device-less factory call in a watched file is recorded, one naming its device is
    not."""
    with DeviceLessFactories([__file__]) as mode:
        torch.arange(3)
        torch.zeros(2, device="cpu")
        torch.as_tensor(torch.ones(1, device="cpu"))
    assert len(mode.found) == 1 and "torch.arange" in next(iter(mode.found))


def test_no_device_less_tensor_in_patching(monkeypatch):
    """Every path of exact patching (each kind of site, per position or not, per-example metric positions), AtP*
    (QK fix, GradDrop, in parts), Gaussian noise, the bootstrap interval and ``shortlist_and_confirm``, run on the
    CPU under :class:`DeviceLessFactories`: the patching modules make no tensor without naming its device, so none
    is left on the CPU when the model is on a GPU (a mask, an index or a buffer that meets the model's
    activations)."""
    monkeypatch.setattr(ExactEngine, "CHUNK_ROWS", 40)
    with DeviceLessFactories(CHECKED) as mode:
        for arch in ("llama_window", "alibi_gqa", "neox"):
            model, clean, corr, ans, wrong = build(arch)
            for per_position in (True, False):
                for position in (-1, 3, torch.tensor([5, 2, 4])):
                    met = LogitDiff(ans, wrong, position=position)
                    for site in sites_of(model):
                        activation_patching(model, site, clean, corr, metric=met, per_position=per_position)
                        # a window of two layers: the patch applies again inside the next block
                        activation_patching(
                            model, site, clean, corr, metric=met, per_position=per_position, window=2
                        )
                res = attribution_patching(
                    model, clean, corr, metric=LogitDiff(ans, wrong, position=torch.tensor([5, 2, 4])),
                    sites=["q", "k", "z", "resid_pre"], per_position=per_position, qk_fix=True, grad_drop=True,
                    max_batch=2,
                )  # fmt: skip
            res["z"].ci(num_resamples=20)
            # answers and per-example positions given as lists, split over parts of the prompts
            listed = LogitDiff([1, 2, 3], [4, 5, 6], position=[5, 2, 4])
            attribution_patching(model, clean, corr, metric=listed, sites=["k"], qk_fix=True, max_batch=2)
            noise = GaussianNoise(positions=[1, 3], seed=1)
            activation_patching(model, "resid_pre", clean, metric=LogitDiff(ans, wrong), corruption=noise)
            attribution_patching(
                model, clean, metric=LogitDiff(ans, wrong), corruption=noise, sites=["k"], qk_fix=True
            )
            shortlist_and_confirm(model, "k", clean, corr, metric=LogitDiff(ans, wrong), k=3, grad_drop=True)
    assert not mode.found, (
        f"tensors made without a device (on the CPU whatever the model's): {sorted(mode.found)}"
    )


@pytest.mark.parametrize("device", DEVICES)
def test_prompts_kept_on_the_cpu_run_where_the_model_is(device):
    """Prompts (clean, corrupted) left on the CPU with the model on the device: exact patching, the naive loop
    and AtP run them there, with the values of prompts given on the device."""
    model, clean, corr, ans, wrong = build("llama_window")
    dm, dc, dk = on(device, model, clean, corr)
    met = LogitDiff(ans.to(device), wrong.to(device))
    for method in ("exact", "naive"):
        a = activation_patching(dm, "resid_pre", clean, corr, metric=met, method=method, quiet=True)
        b = activation_patching(dm, "resid_pre", dc, dk, metric=met, method=method, quiet=True)
        assert torch.equal(a.values, b.values)
    a = attribution_patching(dm, clean, corr, metric=met, sites=["z", "k"], qk_fix=True)
    b = attribution_patching(dm, dc, dk, metric=met, sites=["z", "k"], qk_fix=True)
    assert all(torch.equal(a[s].values, b[s].values) for s in ("z", "k"))
