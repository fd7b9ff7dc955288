"""Edge attribution, exact edge patching and pruning curves: our speed against the multiply-add bound of each
piece of work, and against auto-circuit 1.0.1 (bench-only peer in .bench-venvs/autocircuit).

Setup: a random-weight model (n_layers=4, d_model=256, n_heads=8, d_head=32, d_mlp=1024, d_vocab=1000,
n_ctx=64, gelu, LayerNorm), batch 8 x 32 tokens, logit difference at the last position; 1519 edges.

Bounds (``madds`` in the table; measured as the plain model doing that arithmetic, role ``bound``):

- EAP: one forward per prompt set and one backward: the corrupted forward (no grad), the clean forward with
  gradients and its backward to the embeddings (about twice a forward).
- EAP-IG (k = 5): the corrupted forward plus k forwards and backwards (interpolated inputs, batched).
- A pruning-curve point: one patched forward. A circuit's complement includes edges into layer 0, so causal reuse
  skips nothing but the last layer's rows other than the metric's: the bound is one forward (logits at the
  metric row only).
- Exact scores of all edges: for each edge, the layers from its destination on (the edge's destination head
  alone at its entry layer); ``madds_exact_all`` counts them. The naive loop is one full forward per edge.

Our runs do more arithmetic than the plain model in one place the bound does not count: each destination input
is formed separately (per-head query/key/value inputs, 3 H layer-norms per layer) and, in a patched run, the
patched sources are summed into it (``n_src x n_dst x B x T x d`` multiply-adds at most).

Run: ``.venv/bin/python -m pytest -q bench/bench_circuits.py --benchmark-only -s`` (ours and the bounds), or
after ``bash bench/envs/autocircuit.sh`` with ``.bench-venvs/autocircuit/bin/python`` (adds auto-circuit). At
scale: ``python bench/bench_circuits.py --gpt2`` (EAP-IG, k = 5, on a GPT-2-small-shaped model, time and peak RSS).
"""

from __future__ import annotations

import importlib.util
import sys
import time

import pytest
import torch

from pypattern.circuits import edge_attribution, edges
from pypattern.circuits.engine import prepare_runs
from pypattern.models import Transformer, TransformerConfig
from pypattern.patching import LogitDiff

HAS_AC = importlib.util.find_spec("auto_circuit") is not None
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
        print("\n[bench_circuits] " + "; ".join(f"{k}={v}" for k, v in REPORT.items()))


# ----- multiply-add counts -----------------------------------------------------------------------------------
def _row(c, keys, heads=None):
    H = c["n_heads"] if heads is None else heads
    dh, d, dm = c["d_head"], c["d_model"], c["d_mlp"]
    return 4 * d * H * dh + 2 * keys * H * dh, 2 * d * dm


def macs_forward(c, T, last_row_only=True):
    """One forward; the last layer only at the metric row (plus its keys/values), logits at that row."""
    L, H, dh, d, V = c["n_layers"], c["n_heads"], c["d_head"], c["d_model"], c["d_vocab"]
    total = 0
    for layer in range(L):
        for t in range(T):
            a, m = _row(c, t + 1)
            if layer == L - 1 and last_row_only and t != T - 1:
                total += 2 * d * H * dh  # keys and values only
            else:
                total += a + m
    return total + d * V


def macs_exact_all(c, T, graph):
    """Sum over edges of what a single-edge patch changes (entry at the edge's destination)."""
    L, H, dh, d = c["n_layers"], c["n_heads"], c["d_head"], c["d_model"]
    full = [sum(sum(_row(c, t + 1)) for t in range(T)) for _ in range(L)]
    last = sum(2 * d * H * dh for _ in range(T - 1)) + sum(_row(c, T))
    V = c["d_vocab"]
    total = 0
    for s in graph.edge_stage().tolist():
        layer = s // 2
        if s == 2 * L:
            total += d * V
            continue
        cost = 0
        if s % 2 == 0:  # one head at its entry layer
            if layer == L - 1:
                cost += 3 * d * dh * T + 2 * T * dh + dh * d + 2 * d * c["d_mlp"]
            else:
                cost += sum(4 * d * dh + 2 * (t + 1) * dh + 2 * d * c["d_mlp"] for t in range(T))
        else:
            cost += 2 * d * c["d_mlp"] * (1 if layer == L - 1 else T)
        cost += sum(full[lay] for lay in range(layer + 1, L - 1)) + (last if layer < L - 1 else 0)
        total += cost + d * V
    return total


# ----- fixtures ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup():
    model = Transformer(TransformerConfig(**CFG, seed=0))
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, CFG["d_vocab"], (B, T), generator=g)
    corr = clean.clone()
    corr[:, : T // 2] = torch.randint(0, CFG["d_vocab"], (B, T // 2), generator=g)
    ans = torch.randint(0, CFG["d_vocab"], (B,), generator=g)
    wrong = (ans + 1) % CFG["d_vocab"]
    return model, clean, corr, LogitDiff(ans, wrong)


def _info(benchmark, role, madds):
    benchmark.extra_info.update(role=role, madds=int(madds))


# ----- EAP ---------------------------------------------------------------------------------------------------
@pytest.mark.benchmark(group="circuits-eap")
def test_eap_ours(benchmark, setup):
    model, clean, corr, metric = setup
    _info(benchmark, "ours", 4 * macs_forward(CFG, T))
    sc = benchmark(lambda: edge_attribution(model, clean, corr, metric=metric, method="eap"))
    REPORT["edges"] = len(sc.graph)


def _fwd_bwd(model, tokens, k=1, alpha_src=None):
    emb = model.embed_tokens(tokens)
    if k > 1:
        emb = emb.repeat(k, 1, 1)
    emb = emb.detach().requires_grad_(True)
    x = emb
    for blk in model.blocks:
        x = blk(x)
    logits = model.unembed(model.ln_final(x[:, -1]))
    (g,) = torch.autograd.grad(logits[:, 0].sum(), emb)
    return g


@pytest.mark.benchmark(group="circuits-eap")
def test_eap_bound(benchmark, setup):
    model, clean, corr, metric = setup
    _info(benchmark, "bound", 4 * macs_forward(CFG, T))

    def work():
        with torch.no_grad():
            model(corr)
        return _fwd_bwd(model, clean)

    benchmark(work)


# ----- EAP-IG ------------------------------------------------------------------------------------------------
@pytest.mark.benchmark(group="circuits-eap-ig")
def test_eap_ig_ours(benchmark, setup):
    model, clean, corr, metric = setup
    _info(benchmark, "ours", (1 + 3 * 5) * macs_forward(CFG, T))
    benchmark(lambda: edge_attribution(model, clean, corr, metric=metric, method="eap-ig", steps=5))


@pytest.mark.benchmark(group="circuits-eap-ig")
def test_eap_ig_bound(benchmark, setup):
    model, clean, corr, metric = setup
    _info(benchmark, "bound", (1 + 3 * 5) * macs_forward(CFG, T))

    def work():
        with torch.no_grad():
            model(corr)
        return _fwd_bwd(model, clean, k=5)

    benchmark(work)


# ----- a pruning-curve point ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(setup):
    model, clean, corr, metric = setup
    eng, _ = prepare_runs(model, edges(model), clean, corr, metric)
    return eng


@pytest.mark.benchmark(group="circuits-point")
def test_point_ours(benchmark, setup, engine):
    gen = torch.Generator().manual_seed(0)
    circuit = torch.rand(len(engine.graph), generator=gen) < 0.05
    _info(benchmark, "ours", macs_forward(CFG, T))
    benchmark(lambda: engine.run(~circuit[None]))


@pytest.mark.benchmark(group="circuits-point")
def test_point_ours_batched_10(benchmark, setup, engine):
    """Ten points in one call (per point: time / 10)."""
    gen = torch.Generator().manual_seed(0)
    circuits = torch.rand(10, len(engine.graph), generator=gen) < 0.05
    _info(benchmark, "ours", 10 * macs_forward(CFG, T))
    benchmark(lambda: engine.run(~circuits))


@pytest.mark.benchmark(group="circuits-point")
def test_point_bound(benchmark, setup):
    model, clean, corr, metric = setup
    _info(benchmark, "bound", macs_forward(CFG, T))

    @torch.no_grad()
    def work():
        x = model.embed_tokens(clean)
        for blk in model.blocks:
            x = blk(x)
        return model.unembed(model.ln_final(x[:, -1]))

    benchmark(work)


# ----- exact scores of every edge ----------------------------------------------------------------------------
@pytest.mark.benchmark(group="circuits-exact")
def test_exact_all_edges_ours(benchmark, setup, engine):
    g = engine.graph
    _info(benchmark, "ours", macs_exact_all(CFG, T, g))
    eye = torch.eye(len(g), dtype=torch.bool)
    benchmark.pedantic(lambda: engine.run(eye), rounds=1, iterations=1)
    REPORT["madds_exact_all/forward"] = round(macs_exact_all(CFG, T, g) / macs_forward(CFG, T, False), 1)


@pytest.mark.benchmark(group="circuits-exact")
def test_exact_all_edges_bound(benchmark, setup, engine):
    """The bound's arithmetic done by the plain model: full forwards scaled to ``madds_exact_all``."""
    model, clean, corr, metric = setup
    g = engine.graph
    ratio = macs_exact_all(CFG, T, g) / macs_forward(CFG, T, False)
    n = max(1, round(ratio))
    _info(benchmark, "bound", n * macs_forward(CFG, T, False))

    @torch.no_grad()
    def work():
        for _ in range(n):
            model(clean)

    benchmark.pedantic(work, rounds=1, iterations=1)


# ----- auto-circuit 1.0.1 ------------------------------------------------------------------------------------
def _tl_model(model, dtype=torch.float32):
    """The same weights as a TransformerLens HookedTransformer set up the way auto-circuit needs."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    c = model.cfg
    cfg = HookedTransformerConfig(
        n_layers=c.n_layers,
        d_model=c.d_model,
        n_heads=c.n_heads,
        d_head=c.d_head,
        d_mlp=c.d_mlp,
        d_vocab=c.d_vocab,
        n_ctx=c.n_ctx,
        act_fn=c.act_fn,
        normalization_type="LN",
        dtype=dtype,
    )
    tl = HookedTransformer(cfg)
    missing, unexpected = tl.load_state_dict(
        {k: v.to(dtype) for k, v in model.state_dict().items()}, strict=False
    )
    assert not unexpected and all("IGNORE" in k or "mask" in k for k in missing), (missing, unexpected)
    tl.set_use_attn_result(True)
    tl.set_use_split_qkv_input(True)
    tl.set_use_hook_mlp_in(True)
    tl.eval()
    return tl


_AC_SRC = {"Resid Start": "embed"}


def _ac_name(edge) -> str:
    """auto-circuit's edge name -> ours (``A0.1`` -> ``L0H1``, ``MLP 0`` -> ``MLP0``, ``Resid End`` -> logits)."""

    def node(n, dst):
        if n == "Resid Start":
            return "embed"
        if n == "Resid End":
            return "logits"
        if n.startswith("MLP "):
            return "MLP" + n.split()[1]
        parts = n[1:].split(".")
        out = f"L{parts[0]}H{parts[1]}"
        return out + (f".{parts[2].lower()}" if dst and len(parts) > 2 else "")

    return f"{node(edge.src.name, False)}->{node(edge.dest.name, True)}"


@pytest.fixture(scope="module")
def ac(setup):
    if not HAS_AC:
        pytest.skip("auto-circuit is not installed (bash bench/envs/autocircuit.sh)")
    from auto_circuit.types import AblationType
    from auto_circuit.utils.ablation_activations import src_ablations
    from auto_circuit.utils.graph_utils import patchable_model

    model, clean, corr, metric = setup
    acm = patchable_model(_tl_model(model), factorized=True, slice_output="last_seq", separate_qkv=True)
    return acm, AblationType, src_ablations


def _ac_eap(acm, AblationType, src_ablations, clean, corr, metric):
    from auto_circuit.utils.graph_utils import patch_mode, set_all_masks, train_mask_mode

    src = src_ablations(acm, corr, AblationType.RESAMPLE)
    with train_mask_mode(acm):
        set_all_masks(acm, val=0.0)
        with patch_mode(acm, src):
            logits = acm(clean)[acm.out_slice]
            metric(logits).sum().backward()
    return {_ac_name(e): float(e.patch_mask(acm).grad[e.patch_idx]) for e in acm.edges}


@pytest.mark.benchmark(group="circuits-eap")
def test_eap_autocircuit(benchmark, setup, ac):
    model, clean, corr, metric = setup
    acm, AblationType, src_ablations = ac
    _info(benchmark, "peer", 4 * macs_forward(CFG, T))
    theirs = benchmark(lambda: _ac_eap(acm, AblationType, src_ablations, clean, corr, metric))
    ours = edge_attribution(model, clean, corr, metric=metric, method="eap")
    g = ours.graph
    assert len(theirs) == len(g)
    a = torch.tensor([theirs[e.name] for e in g]) / B  # their gradient is of the batch sum
    err = float((a - ours.scores).abs().max() / ours.scores.abs().max())
    REPORT["eap_rel_diff_vs_autocircuit"] = f"{err:.1e}"
    assert err < 1e-3


@pytest.mark.benchmark(group="circuits-point")
def test_point_autocircuit(benchmark, setup, ac, engine):
    from auto_circuit.utils.graph_utils import patch_mode

    model, clean, corr, metric = setup
    acm, AblationType, src_ablations = ac
    gen = torch.Generator().manual_seed(0)
    circuit = torch.rand(len(engine.graph), generator=gen) < 0.05
    patched = {engine.graph[i].name for i in (~circuit).nonzero().flatten().tolist()}
    names = [e for e in acm.edges if _ac_name(e) in patched]
    assert len(names) == len(patched)
    src = src_ablations(acm, corr, AblationType.RESAMPLE)
    _info(benchmark, "peer", macs_forward(CFG, T))

    @torch.no_grad()
    def work():
        with patch_mode(acm, src, edges=names):
            return metric(acm(clean)[acm.out_slice])

    theirs = benchmark(work)
    ours = engine.run(~circuit[None])[0]
    err = float((theirs - ours).abs().max())
    REPORT["point_abs_diff_vs_autocircuit_fp32"] = f"{err:.1e}"
    assert err < 1e-3


def test_exact_agreement_autocircuit_float64(setup):
    """The same edge sets patched by both libraries in float64: equal to 1e-6."""
    if not HAS_AC:
        pytest.skip("auto-circuit is not installed")
    from auto_circuit.types import AblationType
    from auto_circuit.utils.ablation_activations import src_ablations
    from auto_circuit.utils.graph_utils import patch_mode, patchable_model

    model, clean, corr, metric = setup
    m64 = Transformer(TransformerConfig(**CFG, seed=0, dtype=torch.float64))
    acm = patchable_model(
        _tl_model(m64, torch.float64), factorized=True, slice_output="last_seq", separate_qkv=True
    )
    src = src_ablations(acm, corr, AblationType.RESAMPLE)
    g = edges(m64)
    gen = torch.Generator().manual_seed(1)
    sets = torch.rand(6, len(g), generator=gen) < torch.tensor([0.001, 0.01, 0.05, 0.2, 0.5, 0.95])[:, None]
    eng, _ = prepare_runs(m64, g, clean, corr, metric)
    ours = eng.run(sets)
    worst = 0.0
    for i, m in enumerate(sets):
        names = {g[j].name for j in m.nonzero().flatten().tolist()}
        with torch.no_grad(), patch_mode(acm, src, edges=[e for e in acm.edges if _ac_name(e) in names]):
            theirs = metric(acm(clean)[acm.out_slice])
        worst = max(worst, float((theirs - ours[i]).abs().max()))
    REPORT["exact_abs_diff_vs_autocircuit_fp64"] = f"{worst:.1e}"
    assert worst < 1e-6


# ----- at scale ----------------------------------------------------------------------------------------------
def gpt2_scale(steps: int = 5, memory_budget: float = 2e9) -> dict:
    """EAP-IG over every edge of a GPT-2-small-shaped model (12 layers, d 768, 12 heads, random weights), batch
    8 x 32: wall time and peak resident memory."""
    import resource

    torch.set_num_threads(1)
    cfg = TransformerConfig(
        n_layers=12, d_model=768, n_heads=12, d_mlp=3072, d_vocab=50257, n_ctx=1024, act_fn="gelu_new", seed=0
    )
    model = Transformer(cfg)
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, cfg.d_vocab, (8, 32), generator=g)
    corr = clean.clone()
    corr[:, :16] = torch.randint(0, cfg.d_vocab, (8, 16), generator=g)
    metric = LogitDiff(
        torch.randint(0, cfg.d_vocab, (8,), generator=g), torch.randint(0, cfg.d_vocab, (8,), generator=g)
    )
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    sc = edge_attribution(
        model, clean, corr, metric=metric, method="eap-ig", steps=steps, memory_budget=memory_budget
    )
    dt = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "edges": len(sc.graph),
        "seconds": round(dt, 1),
        "passes": sc.info["passes"],
        "peak_rss_MiB": round(rss),
        "rss_before_MiB": round(rss0),
        "memory_budget": memory_budget,
        "threads": torch.get_num_threads(),
    }


if __name__ == "__main__":
    if "--gpt2" in sys.argv:
        budget = float(sys.argv[sys.argv.index("--budget") + 1]) if "--budget" in sys.argv else 2e9
        print(gpt2_scale(memory_budget=budget))
