"""Refined LLCs of every head of a 2-layer, 8-head attention-only transformer: pypattern batched (all 16
restricted runs in one ``sample(runs=)`` call, one ``vmap``-ed forward and backward per step) against the same
runs one after another, and against the forward + backward floor of all restricted runs (``vmap(grad)`` over the
stacked chains of every run, no sampler).

Run (one thread)::

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_refined_llc.py

Work: d_model 64, 8 heads of 8, d_vocab 32, n_ctx 16, batch 16 token sequences; 2 chains per head x 50 draws,
step 1e-4, localization 100, nbeta 10. Estimates must agree between the two ways (same seeds: same numbers).
The comparison with devinterp 2.0.1 head by head needs its bench venv (``bash bench/envs/devinterp.sh``).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from pypattern.models.transformer import Transformer, TransformerConfig, component_masks
from pypattern.sampling import estimate_llc, refined_llc

KW = dict(num_chains=2, num_draws=50, step_size=1e-4, localization=100.0, nbeta=10.0, seed=0)


def lm_loss(m, batch):
    return m(batch, return_type="loss")


def setup():
    cfg = TransformerConfig(
        n_layers=2, d_model=64, n_heads=8, d_head=8, d_mlp=None, d_vocab=32, n_ctx=16, seed=0
    )
    model = Transformer(cfg).eval()
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 32, (64, 16), generator=g)
    loader = [data[i : i + 16] for i in range(0, 64, 16)]
    heads = [f"blocks.{layer}.attn.head.{h}" for layer in range(2) for h in range(8)]
    return model, loader, heads


def floor_seconds(model, loader, heads, steps: int) -> float:
    """vmap(grad) of the loss over R x C stacked copies of the weights: one forward + backward per step."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    n = len(heads) * KW["num_chains"]
    stacked = {k: v.unsqueeze(0).expand(n, *v.shape).clone() for k, v in params.items()}
    batch = loader[0]

    def loss(p):
        return lm_loss(
            lambda b, return_type: functional_call(model, p, (b,), {"return_type": return_type}), batch
        )

    g = vmap(grad(loss))
    g(stacked)
    t0 = time.perf_counter()
    for _ in range(steps):
        g(stacked)
    return time.perf_counter() - t0


def run() -> dict:
    torch.set_num_threads(1)
    model, loader, heads = setup()
    t0 = time.perf_counter()
    res = refined_llc(
        model, loader, components=heads, include_full=False, loss_fn=lm_loss, batched=True, **KW
    )
    t_batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    alone = []
    for h in heads:
        m = component_masks(model, h)
        r = estimate_llc(model, loader, loss_fn=lm_loss, restrict_to=list(m), masks=m, quiet=True, **KW)
        alone.append(r.llc_mean)
    t_alone = time.perf_counter() - t0
    t_floor = floor_seconds(model, loader, heads, KW["num_draws"])
    return dict(
        batched_s=t_batched,
        one_by_one_s=t_alone,
        floor_s=t_floor,
        max_abs_diff=float(np.max(np.abs(res.llc_mean - np.array(alone)))),
        llc_range=(float(res.llc_mean.min()), float(res.llc_mean.max())),
    )


def test_refined_llc_bench_runs():
    """The batched and one-by-one estimates agree (same seeds)."""
    out = run()
    assert out["max_abs_diff"] < 1e-3 * max(1.0, abs(out["llc_range"][1]))


if __name__ == "__main__":
    out = run()
    print(
        f"16 heads x {KW['num_chains']} chains x {KW['num_draws']} steps, 1 thread: batched {out['batched_s']:.2f} s, "
        f"one by one {out['one_by_one_s']:.2f} s ({out['one_by_one_s'] / out['batched_s']:.1f}x), "
        f"vmap(grad) floor {out['floor_s']:.2f} s (batched / floor {out['batched_s'] / out['floor_s']:.2f}); "
        f"max |diff| {out['max_abs_diff']:.2e}, LLC range {out['llc_range']}"
    )
