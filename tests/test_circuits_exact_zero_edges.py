"""Edges whose patch cannot change an example's metric give the base run's metric exactly in the circuit functions.

Against a float64 reference written here from the model's weights (a forward in which every destination input is
``(residual before it) - sum over its patched edges of (out_u - A_u)``, optionally at one position), on a float32
model: an edge out of a source whose corrupted output equals its clean one at the edge's row (the rows before the
first corrupted token; every row of an example whose corrupted prompt is its clean one), an edge into the last
layer's query / MLP inputs or the logits at a row other than the metric's, and an edge after the metric's row
change nothing. ``patch_edges``, ``edge_attribution(method="exact")``, ``faithfulness``, ``pruning_curve`` and
``acdc`` must then give the base run's metric (an effect of exactly 0, as EAP gives), not its rounding in a
patched run computed in other shapes, and every other value as before.
"""

from __future__ import annotations

import math

import pytest
import torch

from pypattern.circuits import acdc, edge_attribution, edges, faithfulness, patch_edges, pruning_curve
from pypattern.models import Transformer, TransformerConfig
from pypattern.patching import LogitDiff

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::RuntimeWarning")]

V = 13
B, T, FIRST = 3, 6, 3  # corrupted from position FIRST on; example 2 not corrupted at all


def make_model(dtype=torch.float32, seed=1, **kw) -> Transformer:
    cfg = dict(
        n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=24, d_vocab=V, n_ctx=8, dtype=dtype, seed=seed
    )
    cfg = TransformerConfig(**{**cfg, **kw})
    model = Transformer(cfg)
    g = torch.Generator().manual_seed(seed + 10)
    with torch.no_grad():  # biases and norm weights away from 0 and 1
        for name, p in model.named_parameters():
            if not name.rsplit(".", 1)[-1].startswith("W_"):
                p.add_(0.1 * torch.randn(p.shape, generator=g).to(p.dtype))
    return model


def make_prompts(seed=0):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, V, (B, T), generator=g)
    corr = clean.clone()
    corr[:, FIRST:] = (clean[:, FIRST:] + 1 + torch.randint(0, V - 1, (B, T - FIRST), generator=g)) % V
    corr[2] = clean[2]
    return clean, corr


# ------------------------------------------------------------------------------------- the float64 reference


def _ln(x, w, b):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * w + b


def _gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def ref_run(P, tokens, patched=(), A=None):
    """Logits ``(B, T, V)`` and node outputs of the model with weights ``P`` (float64), with the edges ``patched``
    (``(src, dst, pos or None)``) reading ``A[src]`` in place of the run's own ``out[src]``."""
    L, H = P["L"], P["H"]
    by_dst: dict = {}
    for s, d, p in patched:
        by_dst.setdefault(d, []).append((s, p))
    outs: dict = {}

    def inp(dst, x):
        x = x.clone()
        for s, p in by_dst.get(dst, []):
            diff = outs[s] - A[s]
            if p is None:
                x = x - diff
            else:
                x[:, p] = x[:, p] - diff[:, p]
        return x

    Tn = tokens.shape[1]
    x = P["W_E"][tokens] + P["W_pos"][:Tn]
    outs["embed"] = x
    causal = torch.ones(Tn, Tn, dtype=torch.bool).tril()
    if P.get("window"):
        causal &= ~torch.ones(Tn, Tn, dtype=torch.bool).tril(-P["window"])
    for layer in range(L):
        w = P[layer]
        attn = torch.zeros_like(x)
        for h in range(H):
            nm = f"L{layer}H{h}"
            q = _ln(inp(f"{nm}.q", x), w["ln1w"], w["ln1b"]) @ w["W_Q"][h] + w["b_Q"][h]
            k = _ln(inp(f"{nm}.k", x), w["ln1w"], w["ln1b"]) @ w["W_K"][h] + w["b_K"][h]
            v = _ln(inp(f"{nm}.v", x), w["ln1w"], w["ln1b"]) @ w["W_V"][h] + w["b_V"][h]
            s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
            s = s.masked_fill(~causal, float("-inf")).softmax(-1)
            outs[nm] = (s @ v) @ w["W_O"][h]
            attn = attn + outs[nm]
        x = x + attn + w["b_O"]
        hid = _gelu(_ln(inp(f"MLP{layer}", x), w["ln2w"], w["ln2b"]) @ w["W_in"] + w["b_in"])
        outs[f"MLP{layer}"] = hid @ w["W_out"] + w["b_out"]
        x = x + outs[f"MLP{layer}"]
    logits = _ln(inp("logits", x), P["lnfw"], P["lnfb"]) @ P["W_U"] + P["b_U"]
    return logits, outs


def weights(model):
    d = lambda t: t.detach().double()  # noqa: E731
    P = {
        "L": model.cfg.n_layers,
        "H": model.cfg.n_heads,
        "window": model.cfg.sliding_window,
        "W_E": d(model.embed.W_E),
        "W_pos": d(model.pos_embed.W_pos),
    }
    for layer, blk in enumerate(model.blocks):
        a, m = blk.attn, blk.mlp
        P[layer] = {
            "ln1w": d(blk.ln1.w), "ln1b": d(blk.ln1.b), "ln2w": d(blk.ln2.w), "ln2b": d(blk.ln2.b),
            "W_Q": d(a.W_Q), "W_K": d(a.W_K), "W_V": d(a.W_V), "W_O": d(a.W_O),
            "b_Q": d(a.b_Q), "b_K": d(a.b_K), "b_V": d(a.b_V), "b_O": d(a.b_O),
            "W_in": d(m.W_in), "b_in": d(m.b_in), "W_out": d(m.W_out), "b_out": d(m.b_out),
        }  # fmt: skip
    P.update(
        lnfw=d(model.ln_final.w), lnfb=d(model.ln_final.b), W_U=d(model.unembed.W_U), b_U=d(model.unembed.b_U)
    )
    return P


def ref_metric(P, names, clean, corr, metric, pos, ablation="resample"):
    """The float64 metric ``(B,)`` of the clean run with the edges ``names`` reading the corrupted run's values
    (``ablation="mean"``: the clean batch's mean per position; ``"zero"``: zero)."""
    if ablation == "resample":
        A = ref_run(P, corr)[1]
    else:
        outs = ref_run(P, clean)[1]
        A = {
            k: v.mean(0, keepdim=True).expand_as(v) if ablation == "mean" else 0 * v for k, v in outs.items()
        }
    patched = []
    for name in names:
        p = None
        if "@" in name:
            name, at = name.split("@")
            p = int(at)
        s, d = name.split("->")
        patched.append((s, d, p))
    logits = ref_run(P, clean, patched, A)[0]
    return metric(logits[torch.arange(B), pos])


def inert_by_reference(P, graph, clean, corr, metric, pos, tol=1e-12, ablation="resample"):
    """``(B, E)`` bool: where the float64 reference gives each edge, patched alone, no effect at all."""
    base = ref_metric(P, [], clean, corr, metric, pos, ablation)
    eff = torch.stack(
        [ref_metric(P, [e.name], clean, corr, metric, pos, ablation) - base for e in graph.edges], 1
    )
    return eff.abs() <= tol, eff


# ------------------------------------------------------------------------------------------------------- tests


def test_reference_is_the_model():
    model = make_model(torch.float64)
    clean, _ = make_prompts()
    logits, _ = ref_run(weights(model), clean)
    assert torch.allclose(logits, model(clean), atol=1e-12, rtol=0)


@pytest.mark.parametrize("per_position", [False, True])
@pytest.mark.parametrize("positions", ["last", "per_example"])
def test_exact_scores_are_zero_where_no_patch_can_change_the_metric(per_position, positions):
    model = make_model()
    P = weights(model)
    clean, corr = make_prompts()
    pos = torch.full((B,), T - 1) if positions == "last" else torch.tensor([FIRST, T - 1, T - 2])
    at = -1 if positions == "last" else pos
    metric = LogitDiff(torch.arange(1, B + 1), torch.arange(4, B + 4), position=at)
    graph = edges(model, per_position=per_position, seq_len=T if per_position else None)
    exact = edge_attribution(
        model, clean, corr, metric=metric, method="exact", graph=graph, quiet=True
    ).values
    eap = edge_attribution(model, clean, corr, metric=metric, method="eap", graph=graph, quiet=True).values
    none, eff = inert_by_reference(P, graph, clean, corr, metric, pos)
    assert bool(none[2].all())  # example 2 is not corrupted: no edge changes its metric
    # where the patch can change nothing (in float64), the exact score is 0, exactly, as EAP's
    assert bool((exact[none] == 0).all()), exact[none].abs().max()
    assert bool((eap[none] == 0).all())
    # where EAP gives exactly 0 the exact score does too (these are the same edges here)
    assert bool((exact[eap == 0] == 0).all())
    # every other score as the reference's
    assert torch.allclose(exact.double(), eff, atol=2e-5, rtol=1e-4)


def test_exact_scores_with_a_sliding_window_are_zero_where_no_patch_reaches_the_metric():
    # keys out of the window of every query that reaches the metric, and the rows after it, change nothing
    model = make_model(n_layers=3, sliding_window=2)
    P = weights(model)
    clean, corr = make_prompts(4)
    corr[2, 0] = (clean[2, 0] + 1) % V  # every example corrupted, from a different row
    pos = torch.tensor([T - 2, T - 1, T - 1])
    metric = LogitDiff(torch.arange(1, B + 1), torch.arange(4, B + 4), position=pos)
    graph = edges(model, per_position=True, seq_len=T)
    exact = edge_attribution(
        model, clean, corr, metric=metric, method="exact", graph=graph, quiet=True
    ).values
    eap = edge_attribution(model, clean, corr, metric=metric, method="eap", graph=graph, quiet=True).values
    none, eff = inert_by_reference(P, graph, clean, corr, metric, pos)
    far = graph.pos_idx[None] < pos[:, None] - 3  # beyond the windows' reach from the metric's row
    assert bool(none[far].all()) and int(far.sum()) > 0
    assert bool((exact[none] == 0).all()), exact[none].abs().max()
    assert bool((exact[eap == 0] == 0).all())
    assert torch.allclose(exact.double(), eff, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("ablation", ["mean", "zero"])
def test_exact_scores_of_first_row_queries_are_zero_with_mean_and_zero_ablation(ablation):
    # the query at the first row attends one key, whatever the query: its input's edges change nothing
    model = make_model()
    P = weights(model)
    clean, _ = make_prompts()
    metric = LogitDiff(torch.arange(1, B + 1), torch.arange(4, B + 4))
    graph = edges(model, per_position=True, seq_len=T)
    exact = edge_attribution(
        model, clean, metric=metric, method="exact", graph=graph, ablation=ablation, quiet=True
    )
    exact = exact.values
    pos = torch.full((B,), T - 1)
    none, eff = inert_by_reference(P, graph, clean, None, metric, pos, ablation=ablation)
    first_q = torch.tensor([graph.dst_names[d].endswith(".q") for d in graph.dst_idx.tolist()]) & (
        graph.pos_idx == 0
    )
    assert bool(none[:, first_q].all())
    assert bool((exact[:, first_q] == 0).all()), exact[:, first_q].abs().max()
    assert torch.allclose(exact.double(), eff, atol=2e-5, rtol=1e-4)


def test_patch_edges_sets_of_inert_edges_give_the_base_metric_and_others_the_reference():
    model = make_model()
    P = weights(model)
    clean, corr = make_prompts(1)
    pos = torch.tensor([FIRST + 1, T - 1, T - 2])
    metric = LogitDiff(torch.arange(1, B + 1), torch.arange(4, B + 4), position=pos)
    graph = edges(model, per_position=True, seq_len=T)
    names = [e.name for e in graph.edges]
    t = graph.pos_idx
    last = [
        i for i, n in enumerate(graph.dst_names) if n.startswith("L1H") and n.endswith(".q") or n == "MLP1"
    ]
    early = (t < FIRST).nonzero().flatten().tolist()
    # the last layer's query and MLP inputs at rows that are no example's metric row
    rows = [i for i in range(len(graph)) if int(graph.dst_idx[i]) in last and int(t[i]) < FIRST]
    g = torch.Generator().manual_seed(5)
    sets = []
    for _ in range(
        6
    ):  # inert for every example: before the first corrupted token, or rows the metric cannot read
        pick = torch.rand(len(early), generator=g) < 0.3
        sets.append([names[i] for i, k in zip(early, pick.tolist()) if k] + [names[i] for i in rows[:3]])
    mixed = [
        s + [names[i] for i in torch.randint(0, len(names), (8,), generator=g).tolist()] for s in sets[:3]
    ]
    got = patch_edges(model, sets + mixed, clean, corr, metric=metric, graph=graph)
    base = patch_edges(model, [], clean, corr, metric=metric, graph=graph)
    assert bool((got[: len(sets)] == base[None]).all())
    want = torch.stack([ref_metric(P, s, clean, corr, metric, pos) for s in sets + mixed])
    assert torch.allclose(got.double(), want, atol=2e-5, rtol=1e-4)
    # an edge at a row after an example's metric row, with one that is inert at another example only
    after = names.index(f"embed->L0H0.q@{T - 1}")  # after example 0's metric row, read by example 1's
    both = patch_edges(model, [names[after]], clean, corr, metric=metric, graph=graph)
    assert float(both[0]) == float(base[0]) and float(both[2]) == float(base[2])  # example 2 is not corrupted
    assert abs(float(both[1]) - float(ref_metric(P, [names[after]], clean, corr, metric, pos)[1])) < 2e-5


def test_faithfulness_and_pruning_curve_of_the_circuit_without_inert_edges_are_one():
    model = make_model()
    clean, corr = make_prompts(2)
    clean, corr = clean[:2], corr[:2]  # both examples corrupted from FIRST on
    metric = LogitDiff(torch.tensor([1, 2]), torch.tensor([4, 5]))
    graph = edges(model, per_position=True, seq_len=T)
    eap = edge_attribution(model, clean, corr, metric=metric, method="eap", graph=graph, quiet=True)
    live = (eap.values != 0).any(0)
    assert 0 < int(live.sum()) < len(graph)
    f = faithfulness(model, live, clean, corr, metric=metric, graph=graph)
    assert float(f) == 1.0
    curve = pruning_curve(model, eap, clean, corr, metric=metric, counts=[int(live.sum()), len(graph)])
    (values,) = curve.faithfulness.values()
    assert bool((values == 1.0).all()), values


def _acdc_reference(model, graph, clean, corr, metric, pos, threshold):
    """ACDC one edge at a time on the float64 reference (noising, ``threshold`` on the mean drop)."""
    P = weights(model)
    names = [e.name for e in graph.edges]
    removed: list[str] = []
    cur = float(ref_metric(P, removed, clean, corr, metric, pos).mean())
    keep = torch.ones(len(graph), dtype=torch.bool)
    order = []
    for d in reversed(range(graph.n_dst)):
        order += (graph.dst_idx == d).nonzero().flatten().flip(0).tolist()
    for e in order:
        val = float(ref_metric(P, [*removed, names[e]], clean, corr, metric, pos).mean())
        if abs(cur - val) <= 1e-12 * max(1.0, abs(cur)):
            val = cur
        if cur - val < threshold:
            keep[e] = False
            removed.append(names[e])
            cur = val
    return keep


def test_acdc_keeps_every_inert_edge_at_threshold_zero_with_a_drop_of_exactly_zero():
    # a configuration where a patched run's rounding (beyond ACDC's tie of 16 roundings) removed such an edge
    model = make_model(seed=1)
    clean, corr = make_prompts(1)
    metric = LogitDiff(torch.arange(1, B + 1), torch.arange(4, B + 4))
    graph = edges(model, per_position=True, seq_len=T)
    circ = acdc(model, clean, corr, metric=metric, threshold=0.0, graph=graph, quiet=True)
    eap = edge_attribution(model, clean, corr, metric=metric, method="eap", graph=graph, quiet=True).values
    inert = (graph.pos_idx < FIRST) | ((eap == 0).all(0) & (graph.pos_idx < T - 1))
    # threshold 0 removes an edge only where its removal raises the metric: never an edge that cannot change it
    assert bool(circ.mask[graph.pos_idx < FIRST].all())
    assert bool((circ.scores[graph.pos_idx < FIRST] == 0).all())
    assert int(inert.sum()) > 0
    want = _acdc_reference(model, graph, clean, corr, metric, torch.full((B,), T - 1), 0.0)
    assert bool((circ.mask[graph.pos_idx < FIRST] == want[graph.pos_idx < FIRST]).all())
