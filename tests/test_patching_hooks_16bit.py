"""Patching a model that has hooks attached, metrics of 16-bit models, and per-example positions as numpy arrays.

The exact engine computes from the weights and does not run functions attached to the model's hook points or
modules: a model with any is patched one forward per cell (``method="auto"``, with a warning) or refused
(``method="exact"``), and :func:`shortlist_and_confirm` confirms its cells the same way. Checked against the naive
loop, which runs the model's forward, hooks included."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import pypattern as pp

CFG = dict(n_layers=2, d_model=32, n_heads=4, d_mlp=64, d_vocab=50, n_ctx=16, seed=0)


def _setup(dtype=torch.float64):
    model = pp.Transformer(pp.TransformerConfig(**CFG, dtype=dtype))
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 50, (2, 5), generator=g)
    corr = torch.randint(0, 50, (2, 5), generator=g)
    return model, clean, corr, pp.LogitDiff(torch.tensor([1, 2]), torch.tensor([3, 4]))


def _zero_head0(z, hook):
    return torch.cat([torch.zeros_like(z[:, :, :1]), z[:, :, 1:]], 2)


def _naive(model, site, clean, corr, metric, **kw):
    return pp.activation_patching(model, site, clean, corr, metric=metric, method="naive", **kw)


@pytest.mark.parametrize("site", ["resid_pre", "attn_out", "z"])
def test_hook_point_hook_gets_the_naive_loop(site):
    model, clean, corr, metric = _setup()
    remove = model.blocks[1].attn.hook_z.add_hook(_zero_head0)
    try:
        with pytest.warns(UserWarning, match=r"hooks attached at \['blocks\.1\.attn\.hook_z"):
            got = pp.activation_patching(model, site, clean, corr, metric=metric)
        want = _naive(model, site, clean, corr, metric)
        with pytest.raises(ValueError, match="method='exact' cannot run this model: it has hooks attached"):
            pp.activation_patching(model, site, clean, corr, metric=metric, method="exact")
    finally:
        remove()
    assert got.method == "naive"
    torch.testing.assert_close(got.values, want.values, rtol=0, atol=1e-12)
    # the hook changes the results: without it, the exact engine's grid differs
    plain = pp.activation_patching(model, site, clean, corr, metric=metric)
    assert plain.method == "exact"
    assert float((plain.values - got.values).abs().max()) > 1e-3


def test_all_position_patch_of_the_first_layer_gives_the_clean_metric_under_a_hook():
    model, clean, corr, metric = _setup()
    remove = model.blocks[1].attn.hook_z.add_hook(_zero_head0)
    try:
        with pytest.warns(UserWarning, match="hooks attached"):
            res = pp.activation_patching(
                model, "resid_pre", clean, corr, metric=metric, per_position=False, layers=[0]
            )
    finally:
        remove()
    torch.testing.assert_close(res.values[:, 0], res.clean, rtol=0, atol=1e-12)


def test_torch_forward_hook_gets_the_naive_loop():
    model, clean, corr, metric = _setup()
    h = model.blocks[0].register_forward_hook(lambda m, i, o: o * 0.5)
    try:
        with pytest.warns(UserWarning, match=r"blocks\.0 \(torch forward hook\)"):
            got = pp.activation_patching(model, "resid_pre", clean, corr, metric=metric)
        want = _naive(model, "resid_pre", clean, corr, metric)
    finally:
        h.remove()
    torch.testing.assert_close(got.values, want.values, rtol=0, atol=1e-12)


def test_shortlist_confirms_with_the_hooks():
    model, clean, corr, metric = _setup()
    remove = model.blocks[1].attn.hook_z.add_hook(_zero_head0)
    try:
        with pytest.warns(UserWarning, match="hooks attached"):
            rows = pp.shortlist_and_confirm(model, "resid_pre", clean, corr, metric=metric, k=3)
        grid = _naive(model, "resid_pre", clean, corr, metric)
    finally:
        remove()
    assert len(rows) == 3
    for r in rows:
        want = float((grid.values[:, r["layer"], r["pos"]] - grid.corrupted).mean())
        assert r["exact"] == pytest.approx(want, abs=1e-12)


def test_circuits_refuse_global_module_hooks():
    from torch.nn.modules.module import register_module_forward_hook

    model, clean, corr, metric = _setup()
    h = register_module_forward_hook(lambda m, i, o: None)
    try:
        with pytest.raises(ValueError, match="_global_forward_hooks"):
            pp.circuits.edge_attribution(model, clean, corr, metric=metric)
    finally:
        h.remove()


def test_numpy_positions_in_attribution_patching_in_parts():
    model = pp.Transformer(pp.TransformerConfig(**CFG, dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 50, (3, 6), generator=g)
    corr = torch.randint(0, 50, (3, 6), generator=g)
    ans, wrong = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    ref = pp.attribution_patching(
        model, clean, corr, metric=pp.LogitDiff(ans, wrong, position=torch.tensor([2, 5, 3])), sites=["z"]
    )["z"].values
    got = pp.attribution_patching(
        model,
        clean,
        corr,
        metric=pp.LogitDiff(ans, wrong, position=np.array([2, 5, 3])),
        sites=["z"],
        max_batch=1,
    )["z"].values
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["kl", "prob", "logprob", "logit_diff"])
def test_metrics_of_16_bit_models_in_float32(dtype, kind):
    model, clean, corr, _ = _setup(dtype)
    ans, wrong = torch.tensor([1, 2]), torch.tensor([3, 4])
    metric = {
        "kl": pp.KL(),
        "prob": pp.Prob(ans),
        "logprob": pp.LogProb(ans),
        "logit_diff": pp.LogitDiff(ans, wrong),
    }[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = pp.activation_patching(model, "resid_pre", clean, corr, metric=metric)
    assert res.values.dtype == torch.float32 and res.corrupted.dtype == torch.float32
    # the same 16-bit logits, the metric in float64
    with torch.no_grad():
        lc, lx = model(clean)[:, -1].double(), model(corr)[:, -1].double()
    if kind == "kl":
        pc = lc.log_softmax(-1)
        want = -(pc.exp() * (pc - lx.log_softmax(-1))).sum(-1)
    elif kind == "prob":
        want = lx.softmax(-1)[torch.arange(2), ans]
    elif kind == "logprob":
        want = lx.log_softmax(-1)[torch.arange(2), ans]
    else:
        want = lx[torch.arange(2), ans] - lx[torch.arange(2), wrong]
    torch.testing.assert_close(res.corrupted.double(), want, rtol=1e-5, atol=1e-6)


def test_qk_fix_warns_that_pattern_hooks_are_left_out():
    """AtP*'s QK fix recomputes patterns from queries and keys: functions on hook_pattern / hook_attn_scores are
    not in its q and k estimates, which it says; other sites and hook points raise no warning."""
    model, clean, corr, metric = _setup()
    remove = model.blocks[1].attn.hook_pattern.add_hook(lambda p, hook: p * 1.0)
    try:
        with pytest.warns(
            UserWarning, match=r"qk_fix=True recomputes attention patterns .*blocks\.1\.attn\.hook_pattern"
        ):
            pp.attribution_patching(model, clean, corr, metric=metric, sites=["q", "z"], qk_fix=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            pp.attribution_patching(model, clean, corr, metric=metric, sites=["z"], qk_fix=True)
            pp.attribution_patching(model, clean, corr, metric=metric, sites=["q"], qk_fix=False)
    finally:
        remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pp.attribution_patching(model, clean, corr, metric=metric, sites=["k"], qk_fix=True)
