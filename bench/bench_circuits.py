"""Edge attribution, exact edge patching and pruning curves: our speed against the multiply-add bound of each
piece of work, and against auto-circuit 1.0.1 (bench-only peer in .bench-venvs/autocircuit).

Setup: a random-weight model (n_layers=4, d_model=256, n_heads=8, d_head=32, d_mlp=1024, d_vocab=1000,
n_ctx=64, gelu, LayerNorm), batch 8 x 32 tokens, logit difference at the last position; 1519 edges.

Bounds (``madds``; measured as the plain model doing that arithmetic, :func:`plain_forward`: every layer at every
position except the last layer, which computes keys and values at every position and the rest at the metric row
only, and the unembedding at that row):

- EAP: one forward per prompt set and one backward: the corrupted forward (no grad), the clean forward with
  gradients and its backward to the embeddings (about twice a forward).
- EAP-IG (k = 5): the corrupted forward plus k forwards and backwards (interpolated inputs, batched).
- A pruning-curve point: one patched forward. A circuit's complement includes edges into layer 0, so causal reuse
  skips nothing but the last layer's rows other than the metric's: the bound is one forward.
- Exact scores of all edges: for each edge, the layers from its destination on (the edge's destination head
  alone at its entry layer); ``madds_exact_all`` counts them. The naive loop is one full forward per edge.

Work that edge-level results need and the plain model does not do, stated as separate named terms
(:func:`edge_terms`) and reported beside the plain bound ("bound + terms": the plain bound's time scaled by
``(bound + term) / bound`` multiply-adds, i.e. the term at the plain forward's rate):

- ``contraction`` (EAP, EAP-IG): every edge's score is a dot product, per prompt, of its source's difference and
  its destination input's gradient over the rows where that gradient can be non-zero: ``sum over edges of B x R x
  d`` (R = T, or 1 for the last layer's query inputs, its MLP and the logits).
- ``input sums`` (a pruning point): each destination input is formed from the residual and its own patched
  sources, ``R + sum_{u patched} (A_u - out_u)``, or from the all-ablated input (the same in every run) and its
  unpatched sources when fewer: ``sum over destination inputs of min(k, n - k) x B x R x d`` (``k`` of its ``n``
  sources patched; R as above).

Not counted anywhere (elementwise work, no multiply-adds): each destination input normalised on its own (3H + 1
norms per layer where the plain model has 2) and, for EAP, each head input's norm VJP.

Run: ``.venv/bin/python -m pytest -q bench/bench_circuits.py --benchmark-only -s`` (ours and the bounds), or
after ``bash bench/envs/autocircuit.sh`` with ``.bench-venvs/autocircuit/bin/python`` (adds auto-circuit). The
table of the docs, in CPU time with interleaved rounds: ``OMP_NUM_THREADS=1 python bench/bench_circuits.py --table
--rounds 7`` (``--shape gpt2``: the same table on a GPT-2-small-shaped model). At scale: ``python bench/bench_circuits.py --gpt2`` (EAP-IG, k = 5, on a GPT-2-small-shaped model,
time and peak RSS). Per-call overhead apart from the arithmetic: ``python bench/bench_circuits.py --overhead``.
"""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch

from pypattern.circuits import edge_attribution, edges
from pypattern.circuits.engine import prepare_runs
from pypattern.models import Transformer, TransformerConfig
from pypattern.models.packed import frozen_fixed_weights
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
    """One forward of one prompt of ``T`` tokens (multiply by the batch for a batch's): the last layer only at the
    metric row (plus its keys/values), logits at that row."""
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


def _rows_of(graph, T: int) -> torch.Tensor:
    """Rows at which each destination input can change the metric (last position): 1 for the last layer's query
    inputs, its MLP and the logits, T otherwise ``(n_dst,)``."""
    L = graph.n_layers
    out = torch.full((graph.n_dst,), T)
    for i, (s, qkv) in enumerate(zip(graph.dst_stage.tolist(), graph.dst_qkv)):
        if s >= 2 * L - 1 or (s == 2 * (L - 1) and qkv == "q"):
            out[i] = 1
    return out


def edge_terms(graph, c, B: int, T: int, patched: torch.Tensor | None = None) -> dict:
    """The named terms of edge-level work the plain model does not do (see the module docstring), in
    multiply-adds for the whole batch of ``B`` prompts: ``contraction`` (every edge's score) and, for a patched
    mask ``(num_edges,)``, ``input sums`` (each destination input from the cheaper side)."""
    d = c["d_model"]
    R = _rows_of(graph, T)
    out = {"contraction": int((R[graph.dst_idx] * B * d).sum())}
    if patched is not None:
        n = graph.valid.sum(0)  # sources read by each destination input
        k = torch.bincount(graph.dst_idx[patched], minlength=graph.n_dst)
        out["input sums"] = int((torch.minimum(k, n - k) * R * B * d).sum())
    return out


def plain_forward(model, x: torch.Tensor) -> torch.Tensor:
    """The plain model's forward doing exactly the arithmetic :func:`macs_forward` counts, from embeddings ``x
    (..., T, d)``: every layer at every row except the last, whose queries, attention output and MLP run at the last
    row only (its keys and values at every row); logits at the last row ``(..., vocab)``. Sequential blocks."""
    from pypattern.circuits.model_view import ModelView

    view = ModelView(model, check=False)  # the arithmetic only
    T = x.shape[-2]
    rows, last = torch.arange(T), torch.tensor([T - 1])
    for layer in range(view.n_layers):
        qrows = last if layer == view.n_layers - 1 else rows
        hn = view.attn_norm(layer, x)
        hq = hn if len(qrows) == T else hn[..., qrows, :]
        q, k, v = view.qkv_shared(layer, hq, hn, qrows, rows)
        attn = view.head_out_sum(layer, view.attention(layer, q, k, v, qrows, rows))
        xq = x if len(qrows) == T else x[..., qrows, :]
        mid = view.add_attn_bias(layer, xq + attn)
        x = mid + view.mlp(layer, mid)
    return view.unembed(x[..., -1, :])


# ----- fixtures ----------------------------------------------------------------------------------------------
def make_setup(dtype=torch.float32, cfg: dict = CFG, batch: int = B):
    """The bench model (``cfg``) and ``batch`` prompts of ``T`` tokens, corrupted in their first half."""
    model = Transformer(TransformerConfig(**cfg, seed=0, dtype=dtype))
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, cfg["d_vocab"], (batch, T), generator=g)
    corr = clean.clone()
    corr[:, : T // 2] = torch.randint(0, cfg["d_vocab"], (batch, T // 2), generator=g)
    ans = torch.randint(0, cfg["d_vocab"], (batch,), generator=g)
    wrong = (ans + 1) % cfg["d_vocab"]
    return model, clean, corr, LogitDiff(ans, wrong)


@pytest.fixture(scope="module")
def setup():
    return make_setup()


def _info(benchmark, role, madds):
    """``madds``: per prompt (as :func:`macs_forward` counts); recorded for the batch of ``B`` prompts."""
    benchmark.extra_info.update(role=role, madds=int(madds) * B)


def same_gemm(model):
    """The bounds' products through the same GEMM path as ours: the circuits engine computes with the weights held
    fixed and frozen (``EdgeEngine.fixed_weights``: oneDNN's matmul for the MLPs where it is the faster on the
    CPU), so the plain model doing the bound's arithmetic runs under the same block."""
    return frozen_fixed_weights(model)


def bound_eap(model, clean, corr, k: int = 1):
    """The EAP (k = 1) or EAP-IG bound's arithmetic: the corrupted forward, k forwards with gradients and their
    backward to the embeddings."""
    with same_gemm(model):
        with torch.no_grad():
            plain_forward(model, model.embed_tokens(corr))
        emb = model.embed_tokens(clean)
        emb = (emb[None].expand(k, *emb.shape) if k > 1 else emb).detach().requires_grad_(True)
        (g,) = torch.autograd.grad(plain_forward(model, emb)[..., 0].sum(), emb)
    return g


@torch.no_grad()
def bound_point(model, clean):
    """One plain forward (the pruning point's bound)."""
    with same_gemm(model):
        return plain_forward(model, model.embed_tokens(clean))


def point_circuit(graph) -> torch.Tensor:
    """The bench's pruning point: a random 5% circuit (its complement patched)."""
    return torch.rand(len(graph), generator=torch.Generator().manual_seed(0)) < 0.05


# ----- EAP ---------------------------------------------------------------------------------------------------
@pytest.mark.benchmark(group="circuits-eap")
def test_eap_ours(benchmark, setup):
    model, clean, corr, metric = setup
    _info(benchmark, "ours", 4 * macs_forward(CFG, T))
    sc = benchmark(lambda: edge_attribution(model, clean, corr, metric=metric, method="eap"))
    REPORT["edges"] = len(sc.graph)
    REPORT["contraction/forward"] = round(
        edge_terms(sc.graph, CFG, B, T)["contraction"] / (B * macs_forward(CFG, T)), 3
    )


@pytest.mark.benchmark(group="circuits-eap")
def test_eap_bound(benchmark, setup):
    model, clean, corr, metric = setup
    _info(benchmark, "bound", 4 * macs_forward(CFG, T))
    benchmark(lambda: bound_eap(model, clean, corr))


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
    benchmark(lambda: bound_eap(model, clean, corr, 5))


# ----- a pruning-curve point ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(setup):
    model, clean, corr, metric = setup
    eng, _ = prepare_runs(model, edges(model), clean, corr, metric)
    return eng


@pytest.mark.benchmark(group="circuits-point")
def test_point_ours(benchmark, setup, engine):
    circuit = point_circuit(engine.graph)
    _info(benchmark, "ours", macs_forward(CFG, T))
    benchmark(lambda: engine.run(~circuit[None]))
    REPORT["input_sums/forward"] = round(
        edge_terms(engine.graph, CFG, B, T, ~circuit)["input sums"] / (B * macs_forward(CFG, T)), 4
    )


@pytest.mark.benchmark(group="circuits-point")
def test_point_ours_batched_10(benchmark, setup, engine):
    """Ten points in one call (per point: time / 10)."""
    gen = torch.Generator().manual_seed(0)
    circuits = torch.rand(10, len(engine.graph), generator=gen) < 0.05
    _info(benchmark, "ours", 10 * macs_forward(CFG, T))
    benchmark.extra_info["bound_units"] = 10  # against the bound of one point
    benchmark(lambda: engine.run(~circuits))


@pytest.mark.benchmark(group="circuits-point")
def test_point_bound(benchmark, setup):
    model, clean, corr, metric = setup
    _info(benchmark, "bound", macs_forward(CFG, T))
    benchmark(lambda: bound_point(model, clean))


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


def ac_model(model, dtype=torch.float32):
    """auto-circuit's patchable model of the same weights (separate q/k/v inputs, output at the last position)."""
    from auto_circuit.utils.graph_utils import patchable_model

    return patchable_model(
        _tl_model(model, dtype), factorized=True, slice_output="last_seq", separate_qkv=True
    )


def ac_eap(acm, clean, corr, metric):
    """auto-circuit's EAP: mask gradients with every edge reading the corrupted values, by our edge names."""
    from auto_circuit.types import AblationType
    from auto_circuit.utils.ablation_activations import src_ablations
    from auto_circuit.utils.graph_utils import patch_mode, set_all_masks, train_mask_mode

    src = src_ablations(acm, corr, AblationType.RESAMPLE)
    with train_mask_mode(acm):
        set_all_masks(acm, val=0.0)
        with patch_mode(acm, src):
            logits = acm(clean)[acm.out_slice]
            metric(logits).sum().backward()
    return {_ac_name(e): float(e.patch_mask(acm).grad[e.patch_idx]) for e in acm.edges}


def ac_patcher(acm, graph, clean, corr, metric):
    """``patch(mask)``: the metric of auto-circuit's run with the edges of ``mask (num_edges,)`` patched (the
    corrupted values computed once, outside)."""
    from auto_circuit.types import AblationType
    from auto_circuit.utils.ablation_activations import src_ablations
    from auto_circuit.utils.graph_utils import patch_mode

    src = src_ablations(acm, corr, AblationType.RESAMPLE)
    by_name = {_ac_name(e): e for e in acm.edges}
    assert len(by_name) == len(graph)

    @torch.no_grad()
    def patch(mask):
        names = [by_name[graph[i].name] for i in mask.nonzero().flatten().tolist()]
        with patch_mode(acm, src, edges=names):
            return metric(acm(clean)[acm.out_slice])

    return patch


def eap_rel_diff(ours, theirs: dict) -> float:
    a = torch.tensor([theirs[e.name] for e in ours.graph]) / B  # their gradient is of the batch sum
    return float((a - ours.scores).abs().max() / ours.scores.abs().max())


def exact_agreement_fp64() -> float:
    """Six edge sets (0.1% .. 95% of the edges) patched by both libraries in float64: the largest difference."""
    m64, clean, corr, metric = make_setup(torch.float64)
    g = edges(m64)
    patch = ac_patcher(ac_model(m64, torch.float64), g, clean, corr, metric)
    gen = torch.Generator().manual_seed(1)
    sets = torch.rand(6, len(g), generator=gen) < torch.tensor([0.001, 0.01, 0.05, 0.2, 0.5, 0.95])[:, None]
    eng, _ = prepare_runs(m64, g, clean, corr, metric)
    ours = eng.run(sets)
    return max(float((patch(m) - ours[i]).abs().max()) for i, m in enumerate(sets))


@pytest.fixture(scope="module")
def ac(setup):
    if not HAS_AC:
        pytest.skip("auto-circuit is not installed (bash bench/envs/autocircuit.sh)")
    return ac_model(setup[0])


@pytest.mark.benchmark(group="circuits-eap")
def test_eap_autocircuit(benchmark, setup, ac):
    model, clean, corr, metric = setup
    _info(benchmark, "peer", 4 * macs_forward(CFG, T))
    theirs = benchmark(lambda: ac_eap(ac, clean, corr, metric))
    ours = edge_attribution(model, clean, corr, metric=metric, method="eap")
    assert len(theirs) == len(ours.graph)
    err = eap_rel_diff(ours, theirs)
    REPORT["eap_rel_diff_vs_autocircuit"] = f"{err:.1e}"
    assert err < 1e-3


@pytest.mark.benchmark(group="circuits-point")
def test_point_autocircuit(benchmark, setup, ac, engine):
    model, clean, corr, metric = setup
    circuit = point_circuit(engine.graph)
    patch = ac_patcher(ac, engine.graph, clean, corr, metric)
    _info(benchmark, "peer", macs_forward(CFG, T))
    theirs = benchmark(lambda: patch(~circuit))
    ours = engine.run(~circuit[None])[0]
    err = float((theirs - ours).abs().max())
    REPORT["point_abs_diff_vs_autocircuit_fp32"] = f"{err:.1e}"
    assert err < 1e-3


def test_exact_agreement_autocircuit_float64():
    """The same edge sets patched by both libraries in float64: equal to 1e-6."""
    if not HAS_AC:
        pytest.skip("auto-circuit is not installed")
    worst = exact_agreement_fp64()
    REPORT["exact_abs_diff_vs_autocircuit_fp64"] = f"{worst:.1e}"
    assert worst < 1e-6


# ----- the speed table: CPU time, interleaved rounds ------------------------------------------------------------
#: the GPT-2-small shape (random weights) for ``--table --shape gpt2``: the same pieces where the per-call work
#: outside the products is a smaller share than on the bench model
GPT2_CFG = dict(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, d_vocab=50257, n_ctx=64)


def speed_table(rounds: int = 7, reps: int = 3, cfg: dict = CFG) -> None:
    """Each round times ours, the bound and auto-circuit (when installed) on every piece in this process, ``reps``
    calls of each interleaved call by call (CPU time, ``time.process_time``, after a warm-up call); a round's ratio
    is the median over its calls of the ratio within a call triple. Prints every round and, per piece, the median
    and range over rounds of ours / bound, ours / (bound + term) and auto-circuit / ours. ``cfg``: the model's
    shape (default the bench model; auto-circuit runs on the bench model only)."""
    import statistics

    with_ac = HAS_AC and cfg is CFG
    if not with_ac:
        why = "not importable here" if not HAS_AC else "runs on the bench model only (--shape bench)"
        print(f"peer auto-circuit skipped: {why}; ours against the bound only", flush=True)
    torch.set_num_threads(1)
    model, clean, corr, metric = make_setup(cfg=cfg)
    eng, _ = prepare_runs(model, edges(model), clean, corr, metric)
    g = eng.graph
    circuit = point_circuit(g)
    F = B * macs_forward(cfg, T)  # the batch's, as the terms count
    contraction = edge_terms(g, cfg, B, T)["contraction"]
    sums = edge_terms(g, cfg, B, T, ~circuit)["input sums"]
    circuits10 = torch.rand(10, len(g), generator=torch.Generator().manual_seed(0)) < 0.05
    sums10 = sum(edge_terms(g, cfg, B, T, ~c)["input sums"] for c in circuits10)
    pieces = {
        "EAP": dict(
            ours=lambda: edge_attribution(model, clean, corr, metric=metric, method="eap"),
            bound=lambda: bound_eap(model, clean, corr),
            madds=4 * F,
            term=("contraction", contraction),
        ),
        "EAP-IG, k = 5": dict(
            ours=lambda: edge_attribution(model, clean, corr, metric=metric, method="eap-ig", steps=5),
            bound=lambda: bound_eap(model, clean, corr, 5),
            madds=16 * F,
            term=("contraction", contraction),
        ),
        "one pruning point": dict(
            ours=lambda: eng.run(~circuit[None]),
            bound=lambda: bound_point(model, clean),
            madds=F,
            term=("input sums", sums),
        ),
        "ten pruning points, one call": dict(
            ours=lambda: eng.run(~circuits10),
            bound=lambda: [bound_point(model, clean) for _ in range(10)],
            madds=10 * F,
            term=("input sums", sums10),
        ),
    }
    if with_ac:
        acm = ac_model(model)
        patch = ac_patcher(acm, g, clean, corr, metric)
        pieces["EAP"]["ac"] = lambda: ac_eap(acm, clean, corr, metric)
        pieces["one pruning point"]["ac"] = lambda: patch(~circuit)
        pieces["ten pruning points, one call"]["ac"] = lambda: [patch(~c) for c in circuits10]

    def cpu_s(f) -> float:
        t0 = time.process_time()
        f()
        return time.process_time() - t0

    def timed(p) -> dict:
        """``reps`` calls of every role, interleaved call by call after a warm-up call of each: the minimum time
        of each role and, per role, the median over calls of its time over ours in the same call (drifts of the
        CPU's speed over seconds cancel in those)."""
        roles = [r for r in ("ours", "bound", "ac") if r in p]
        for r in roles:
            p[r]()
        ts = {r: [] for r in roles}
        for _ in range(reps):
            for r in roles:
                ts[r].append(cpu_s(p[r]))
        row = {r: min(v) * 1e3 for r, v in ts.items()}
        for r in roles[1:]:
            row[r + "/ours"] = statistics.median(b / a for a, b in zip(ts["ours"], ts[r]))
        return row

    if with_ac:  # the same results before anything is timed
        ours = edge_attribution(model, clean, corr, metric=metric, method="eap")
        print(
            f"EAP scores, relative difference to auto-circuit (float32): {eap_rel_diff(ours, ac_eap(acm, clean, corr, metric)):.1e}"
        )
        print(
            f"one pruning point, absolute difference (float32): {float((patch(~circuit) - eng.run(~circuit[None])[0]).abs().max()):.1e}"
        )
        print(
            f"exact patching of 6 edge sets, largest absolute difference (float64): {exact_agreement_fp64():.1e}"
        )
    print(
        f"CPU {_cpu_model()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}",
        flush=True,
    )
    runs = {name: [] for name in pieces}
    for r in range(rounds):
        for name, p in pieces.items():
            row = timed(p)
            runs[name].append(row)
            print(
                f"round {r} {name}: "
                + ", ".join(f"{k} {v:.1f} ms" for k, v in row.items() if "/" not in k)
                + f"; ours/bound {1 / row['bound/ours']:.2f}",
                flush=True,
            )

    def med(xs):
        return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"

    print(f"\nCPU time, one thread, {rounds} rounds; median (range) over rounds of same-round ratios")
    for name, p in pieces.items():
        rs = runs[name]
        tname, tm = p["term"]
        scale = (p["madds"] + tm) / p["madds"]
        line = (
            f"{name}: ours {min(x['ours'] for x in rs):.1f}-{max(x['ours'] for x in rs):.1f} ms, "
            f"bound {min(x['bound'] for x in rs):.1f}-{max(x['bound'] for x in rs):.1f} ms; "
            f"ours/bound {med([1 / x['bound/ours'] for x in rs])}; "
            f"{tname} = {tm / 1e6:.1f}M madds = {tm / p['madds']:.3f} x bound; "
            f"ours/(bound + {tname}) {med([1 / (x['bound/ours'] * scale) for x in rs])}"
        )
        if "ac" in p:
            line += (
                f"; auto-circuit {min(x['ac'] for x in rs):.1f}-{max(x['ac'] for x in rs):.1f} ms, "
                f"auto-circuit/ours {med([x['ac/ours'] for x in rs])}"
            )
        print(line)


def _cpu_model() -> str:
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _rounds import cpu_model

    return cpu_model()


def overhead(n: int = 100) -> dict:
    """The per-call cost of a pruning point and of EAP apart from their arithmetic: the bench's graph (4 layers, 8
    heads, 1519 edges, the same 5% circuit) on a model with d_model 16 (d_head 2, d_mlp 16) and one prompt of 32
    tokens, where the arithmetic is negligible; median CPU time of ``n`` calls, ms, beside the plain forward's and
    EAP's bound's."""
    import statistics

    torch.set_num_threads(1)
    model, clean, corr, metric = make_setup(cfg=dict(CFG, d_model=16, d_head=2, d_mlp=16), batch=1)
    eng, _ = prepare_runs(model, edges(model), clean, corr, metric)
    circuit = point_circuit(eng.graph)
    fns = {
        "point": lambda: eng.run(~circuit[None]),
        "point_bound": lambda: bound_point(model, clean),
        "eap": lambda: edge_attribution(model, clean, corr, metric=metric, method="eap"),
        "eap_bound": lambda: bound_eap(model, clean, corr),
    }
    out = {}
    for name, f in fns.items():
        f()
        ts = []
        for _ in range(n):
            t0 = time.process_time()
            f()
            ts.append(time.process_time() - t0)
        out[name] = round(statistics.median(ts) * 1e3, 2)
    return out


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
    import argparse

    ap = argparse.ArgumentParser(
        description="Edge attribution, exact edge patching and pruning curves against their bounds (and "
        "auto-circuit where importable). Under pytest: the benchmarks; run as a script: the pieces chosen below."
    )
    ap.add_argument("--table", action="store_true", help="the speed table: CPU time, interleaved rounds")
    ap.add_argument("--rounds", type=int, default=7, help="rounds of --table (default 7)")
    ap.add_argument("--reps", type=int, default=3, help="calls per piece and round of --table (default 3)")
    ap.add_argument(
        "--shape",
        choices=("bench", "gpt2"),
        default="bench",
        help="model of --table: the bench's or GPT-2-small's",
    )
    ap.add_argument("--overhead", action="store_true", help="per-call cost apart from the arithmetic, ms")
    ap.add_argument("--gpt2", action="store_true", help="EAP-IG (k = 5) at GPT-2-small shape: time, peak RSS")
    ap.add_argument("--budget", type=float, default=2e9, help="memory_budget of --gpt2, bytes (default 2e9)")
    args = ap.parse_args()
    if not (args.table or args.overhead or args.gpt2):
        ap.error("choose at least one of --table, --overhead, --gpt2")
    if args.table:
        speed_table(rounds=args.rounds, reps=args.reps, cfg=GPT2_CFG if args.shape == "gpt2" else CFG)
    if args.overhead:
        print("per-call median CPU time, ms:", overhead())
    if args.gpt2:
        print(gpt2_scale(memory_budget=args.budget))
