"""Exact activation patching and AtP against TransformerLens 4.3.0 (bench-only peer, in .bench-venvs/tl).

Setup: a random-weight TransformerBridge.boot_native model (n_layers=4, d_model=256, n_heads=8,
d_head=32, d_mlp=1024, d_vocab=1000, n_ctx=64, gelu), batch 8 x 32 tokens, logit-difference metric. The same
weights are converted into pypattern's Transformer; both grids must agree (1e-4 in float32).

Bound: the multiply-adds that a patch can actually change (layers >= L, positions >= p; in the last block
only the keys/values of the changed rows and the metric row's query, attention, MLP and unembedding) against
what TransformerLens computes per cell (a full forward with logits at every position). ``macs_per_cell`` and
``macs_full_forward`` count them; the ratio of the grid sums is the speed-up that the arithmetic allows
(5.5x for the resid_pre grid, 8.7x for the per-head z grid; a rougher count, which keeps every row of
the last block, gives about 3.4x). Measured speed-ups above the bound mean TransformerLens also loses time
outside its arithmetic (hooks, Python per cell).

Run: ``bash bench/envs/tl.sh`` once, then
``.bench-venvs/tl/bin/python -m pytest -q bench/bench_patching.py --benchmark-only -s``. Without
TransformerLens only the pypattern benchmarks run (the comparisons are skipped). One thread throughout.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import time

import pytest
import torch

from pypattern.models import Transformer, TransformerConfig
from pypattern.patching import LogitDiff, activation_patching
from pypattern.patching.attribution import attribution_patching

HAS_TL = importlib.util.find_spec("transformer_lens") is not None
CFG = dict(n_layers=4, d_model=256, n_heads=8, d_head=32, d_mlp=1024, d_vocab=1000, n_ctx=64)
B, T = 8, 32
REPORT: dict = {}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
    if REPORT:
        print("\n[bench_patching] " + "; ".join(f"{k}={v}" for k, v in REPORT.items()))


# ----- the bound ---------------------------------------------------------------------------------------------
def _row_macs(c, keys):
    """Multiply-adds of one full block row with ``keys`` attended keys."""
    H, dh, d, dm = c["n_heads"], c["d_head"], c["d_model"], c["d_mlp"]
    return 4 * d * H * dh + 2 * keys * H * dh + 2 * d * dm


def macs_full_forward(c, T):
    """TransformerLens per cell: every row of every layer plus logits at every position."""
    return sum(c["n_layers"] * _row_macs(c, t + 1) for t in range(T)) + T * c["d_model"] * c["d_vocab"]


def macs_per_cell(c, site, layer, p, T):
    """Multiply-adds that can change when ``site`` is patched at (layer, p), metric at position T - 1."""
    H, dh, d, dm, L, V = c["n_heads"], c["d_head"], c["d_model"], c["d_mlp"], c["n_layers"], c["d_vocab"]
    m = T - 1
    rows = range(p, T)
    total = 0
    last = layer == L - 1
    # the patched layer
    if site == "resid_pre":
        total += 3 * d * H * dh  # q, k, v of row p
        out_rows = [m] if last else rows
        for t in out_rows:
            total += 2 * (t + 1) * H * dh + d * H * dh + 2 * d * dm  # scores, z, W_O, MLP
    elif site == "z":  # one head's z at row p: W_O slice, MLP at row p
        if last and p != m:
            return d * V
        total += dh * d + 2 * d * dm
    # later layers: rows >= p; the last layer only the metric's row (plus keys/values of the changed rows)
    for lay in range(layer + 1, L):
        if lay == L - 1:
            total += 2 * d * H * dh * len(rows) + _row_macs(c, m + 1) - 2 * d * H * dh
        else:
            total += sum(_row_macs(c, t + 1) for t in rows)
    return total + d * V  # the metric's logits


def bound(site):
    c = CFG
    heads = c["n_heads"] if site == "z" else 1
    tl = c["n_layers"] * T * heads * macs_full_forward(c, T)
    ours = heads * sum(
        macs_per_cell(c, site, layer, p, T) for layer in range(c["n_layers"]) for p in range(T)
    )
    return tl / ours


# ----- models ------------------------------------------------------------------------------------------------
def _prompts():
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, CFG["d_vocab"], (B, T), generator=g)
    corr = clean.clone()
    corr[:, 5] = (clean[:, 5] + 1) % CFG["d_vocab"]
    corr[:, 20] = (clean[:, 20] + 7) % CFG["d_vocab"]
    ans = torch.randint(0, CFG["d_vocab"], (B,), generator=g)
    wrong = torch.randint(0, CFG["d_vocab"], (B,), generator=g)
    return clean, corr, ans, wrong


def _tl_model(dtype=torch.float32):
    import transformer_lens.model_bridge.sources.native  # noqa: F401  (attaches boot_native)
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    cfg = TransformerBridgeConfig(**CFG, act_fn="gelu", seed=0)
    bridge = TransformerBridge.boot_native(cfg, dtype=dtype)
    bridge.eval()
    return bridge


def _native(bridge):
    from transformer_lens.model_bridge.sources.native.model import NativeModel

    nat = bridge.original_model
    if not isinstance(nat, NativeModel):
        raise TypeError(f"expected a NativeModel under the bridge, found {type(nat).__name__}")
    return nat


def convert_tl_native(bridge, dtype=torch.float32) -> Transformer:
    """TransformerLens' native model (split q/k/v/o ``nn.Linear``) -> pypattern's TL-layout weights."""
    nat = _native(bridge)
    c = CFG
    H, dh, d = c["n_heads"], c["d_head"], c["d_model"]
    model = Transformer(TransformerConfig(**c, act_fn="gelu", dtype=dtype, ln_eps=nat.cfg.eps))
    sd = {"embed.W_E": nat.tok_embed.weight, "pos_embed.W_pos": nat.pos.weight}
    for i, blk in enumerate(nat.layers):
        p = f"blocks.{i}."
        a = blk.attn
        for name, lin in (("Q", a.q), ("K", a.k), ("V", a.v)):
            sd[p + f"attn.W_{name}"] = lin.weight.view(H, dh, d).transpose(1, 2)
            sd[p + f"attn.b_{name}"] = lin.bias.view(H, dh)
        sd[p + "attn.W_O"] = a.o.weight.T.reshape(H, dh, d)
        sd[p + "attn.b_O"] = a.o.bias
        sd[p + "ln1.w"], sd[p + "ln1.b"] = blk.ln1.weight, blk.ln1.bias
        sd[p + "ln2.w"], sd[p + "ln2.b"] = blk.ln2.weight, blk.ln2.bias
        sd[p + "mlp.W_in"], sd[p + "mlp.b_in"] = blk.mlp.fc_in.weight.T, blk.mlp.fc_in.bias
        sd[p + "mlp.W_out"], sd[p + "mlp.b_out"] = blk.mlp.fc_out.weight.T, blk.mlp.fc_out.bias
    sd["ln_final.w"], sd["ln_final.b"] = nat.ln_out.weight, nat.ln_out.bias
    sd["unembed.W_U"] = nat.head.weight.T
    sd["unembed.b_U"] = torch.zeros(c["d_vocab"])
    model.load_state_dict({k: v.detach().to(dtype).contiguous() for k, v in sd.items()})
    return model


def _tl_grid(bridge, site, clean, corr, ans, wrong):
    import transformer_lens.patching as P

    _, clean_cache = bridge.run_with_cache(clean)

    def metric(logits):
        last = logits[:, -1]
        return (last.gather(-1, ans[:, None]) - last.gather(-1, wrong[:, None])).mean()

    fn = P.get_act_patch_resid_pre if site == "resid_pre" else P.get_act_patch_attn_head_out_by_pos
    with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):  # silence the per-cell progress bar
        return fn(bridge, corr, clean_cache, metric)


def _ours(model, site, clean, corr, ans, wrong):
    r = activation_patching(model, site, clean, corr, metric=LogitDiff(ans, wrong))
    return r.values.mean(0)  # (layer, pos) or (layer, head, pos)


def _ours_random(dtype=torch.float32):
    return Transformer(TransformerConfig(**CFG, act_fn="gelu", dtype=dtype, seed=0))


# ----- benchmarks --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("site", ["resid_pre", "z"])
def test_bench_exact_grid_pypattern(benchmark, site):
    model = _ours_random()
    clean, corr, ans, wrong = _prompts()
    benchmark.pedantic(
        _ours, args=(model, site, clean, corr, ans, wrong), rounds=3, iterations=1, warmup_rounds=1
    )
    REPORT[f"bound_{site}"] = round(bound(site), 2)


def test_bench_atp_whole_grid(benchmark):
    model = _ours_random()
    clean, corr, ans, wrong = _prompts()
    benchmark.pedantic(
        lambda: attribution_patching(
            model, clean, corr, metric=LogitDiff(ans, wrong), sites=["resid_pre", "z"]
        ),
        rounds=5,
        iterations=1,
        warmup_rounds=1,
    )


@pytest.mark.skipif(not HAS_TL, reason="transformer_lens is not installed (run bash bench/envs/tl.sh)")
@pytest.mark.parametrize("site", ["resid_pre", "z"])
def test_bench_exact_grid_transformerlens(benchmark, site):
    bridge = _tl_model()
    clean, corr, ans, wrong = _prompts()
    benchmark.pedantic(_tl_grid, args=(bridge, site, clean, corr, ans, wrong), rounds=1, iterations=1)


@pytest.mark.skipif(not HAS_TL, reason="transformer_lens is not installed (run bash bench/envs/tl.sh)")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-6)])
def test_equal_to_transformerlens_and_speedup(dtype, tol):
    """Same weights, same grids (within tol), and the measured speed-ups against the bound."""
    bridge = _tl_model(dtype)
    model = convert_tl_native(bridge, dtype)
    clean, corr, ans, wrong = _prompts()
    with torch.no_grad():
        torch.testing.assert_close(model(clean), bridge(clean).to(dtype), rtol=0, atol=tol * 10)
    for site in ("resid_pre", "z"):
        t0 = time.perf_counter()
        ref = _tl_grid(bridge, site, clean, corr, ans, wrong)
        t_tl = time.perf_counter() - t0
        t_ours = min(_timed(_ours, model, site, clean, corr, ans, wrong) for _ in range(3))
        ours = _ours(model, site, clean, corr, ans, wrong)
        if site == "z":
            ours = ours.permute(0, 2, 1)  # TL: (layer, pos, head)
        err = (ours.to(torch.float64) - ref.to(torch.float64)).abs().max().item()
        assert err <= tol, f"{site}: pypattern and TransformerLens differ by {err}"
        if dtype == torch.float32:
            REPORT[f"{site}_tl_s"] = round(t_tl, 3)
            REPORT[f"{site}_ours_s"] = round(t_ours, 3)
            REPORT[f"{site}_speedup"] = round(t_tl / t_ours, 2)
            REPORT[f"{site}_bound"] = round(bound(site), 2)
            REPORT[f"{site}_of_bound"] = round(bound(site) / (t_tl / t_ours), 2)
            if site == "z":
                t_atp = min(
                    _timed(
                        lambda: attribution_patching(
                            model, clean, corr, metric=LogitDiff(ans, wrong), sites=["z"]
                        )
                    )
                    for _ in range(5)
                )
                REPORT["atp_z_s"] = round(t_atp, 4)
                REPORT["atp_vs_tl_exact_z"] = round(t_tl / t_atp, 1)
        REPORT[f"{site}_maxerr_{str(dtype).split('.')[-1]}"] = f"{err:.1e}"


def _timed(fn, *args):
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t
