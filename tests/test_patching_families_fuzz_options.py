"""Exact activation patching on converted Hugging Face models of several families in float32 (prefix_attention's
float32 kernel, and the torch fallback), and in float64 under random settings (3-layer models, windows of 2
layers, prompt lengths 7-12, per-example and earlier metric positions, batch caps, row chunks, noising), each
against the hooked forwards of test_patching_families_fuzz (one per cell)."""

import random

import pytest
import torch

pytest.importorskip("transformers")

from test_patching_families_fuzz import (  # noqa: E402
    FAMILIES,
    converted,
    kernel_calls,  # noqa: F401 (a fixture)
    prompts,
    reference_grid,
    rel_err,
    sites_of,
    tolerance,
)

from pypattern.patching import ExactEngine, LogitDiff, activation_patching  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# family -> whether the float32 model's attention runs through prefix_attention's kernel (a float32 softmax is the
# model's own dtype there; ALiBi and soft caps take the torch fallback)
FLOAT32 = {
    "gpt2": True,
    "neox-eager-rot0.25": True,
    "llama-gqa2": True,
    "mistral-window3": True,
    "gemma3-local-global": True,
    "phi3-mqa-window": True,
    "falcon-new-architecture-gqa": True,
    "mixtral-moe-window": True,
    "gemma2-capped-window": False,
    "bloom-alibi": False,
}


@pytest.mark.parametrize("name", list(FLOAT32))
def test_float32_every_site_equals_hooked_forwards(name, kernel_calls):  # noqa: F811
    model = converted(name, torch.float32)
    assert next(model.parameters()).dtype == torch.float32
    clean, corr, ans, wrong = prompts(B=2, T=10, seed=5)
    for site in sites_of(model):
        for per_position in (True, False):
            res = activation_patching(
                model,
                site,
                clean,
                corr,
                metric=LogitDiff(ans, wrong),
                per_position=per_position,
                method="exact",
                quiet=True,
            )
            ref = reference_grid(model, site, clean, corr, ans, wrong, per_position)
            err = rel_err(res.values, ref)
            assert err <= 1e-4, f"{name} float32 {site} per_position={per_position}: relative error {err:.3g}"
    if kernel_calls is not None:
        assert (kernel_calls[0] > 0) == FLOAT32[name], (
            f"{name}: prefix_attention called {kernel_calls[0]} times"
        )


@pytest.mark.parametrize("seed", range(14))
def test_random_settings_equal_hooked_forwards(seed, monkeypatch):
    rng = random.Random(seed)
    name = rng.choice(sorted(FAMILIES))
    L, T, B = rng.choice([2, 3]), rng.randint(7, 12), rng.choice([2, 3])
    model = converted(name, n_layers=L)
    clean, corr, ans, wrong = prompts(B=B, T=T, seed=100 + seed)
    kind = rng.choice(["last", "int", "per_example"])
    if kind == "last":
        pos, position = None, -1
    elif kind == "int":  # an earlier position for every example: the engine cuts the prompts after it
        position = rng.randint(2, T - 2)
        pos = torch.full((B,), position)
    else:
        pos = torch.tensor([rng.randint(1, T - 1) for _ in range(B)])
        position = pos
    window = rng.choice([1, 2]) if L == 3 else 1
    direction = rng.choice(["denoising", "noising"])
    max_batch = rng.choice([None, 1, 3, 7])
    chunk = rng.choice([None, 1, 5, 40])
    if chunk is not None:
        monkeypatch.setattr(ExactEngine, "CHUNK_ROWS", chunk)
    what = (
        f"{name} L={L} T={T} B={B} position={position} window={window} {direction} max_batch={max_batch} "
        f"chunk={chunk}"
    )
    for site in rng.sample(sites_of(model), 4):
        per_position = rng.random() < 0.7
        res = activation_patching(
            model,
            site,
            clean,
            corr,
            metric=LogitDiff(ans, wrong, position=position),
            per_position=per_position,
            direction=direction,
            window=window,
            max_batch=max_batch,
            method="exact",
            quiet=True,
        )
        ref = reference_grid(
            model, site, clean, corr, ans, wrong, per_position, pos=pos, direction=direction, window=window
        )
        assert res.values.shape == ref.shape, (what, site, res.values.shape, ref.shape)
        err = rel_err(res.values, ref)
        assert err <= tolerance(model), f"{what} {site} per_position={per_position}: relative error {err:.3g}"
