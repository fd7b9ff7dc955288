"""pypattern.circuits against a naive edge patcher written with forward hooks on the plain model, in float64.

The reference here shares nothing with :mod:`pypattern.circuits` but the model itself: every destination input is
re-formed inside the model's own forward (``hook_q``/``hook_k``/``hook_v`` recompute the patched heads from their
own input, a forward pre-hook on the MLP and on the final norm replaces their input), as
``in_v = (residual before v) - sum_{u in S} (out_u - A_u)`` with ``out_u`` read from the same run. First-order
terms come from autograd through a scalar per edge and example multiplying that difference. Configurations: one
layer, one head, attention only, RMSNorm, no norm, rotary, grouped- and multi-query attention, parallel attention
and MLP, no biases, per-position edges, batch 1, one position, converted GPT-NeoX and Llama models; every ablation
in both directions; logit difference, probability, KL and a user callable.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from pypattern.circuits import (
    Circuit,
    EdgeScores,
    PruningCurve,
    acdc,
    edge_attribution,
    edges,
    faithfulness,
    patch_edges,
    pruning_curve,
)
from pypattern.models import Transformer, TransformerConfig
from pypattern.patching import KL, LogitDiff, Prob

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::RuntimeWarning")]

TOL = 1e-9
V = 11


def make_model(**kw) -> Transformer:
    cfg = dict(
        n_layers=2,
        d_model=16,
        n_heads=4,
        d_head=4,
        d_mlp=24,
        d_vocab=V,
        n_ctx=8,
        dtype=torch.float64,
        seed=1,
        init_range=0.3,
    )
    cfg.update(kw)
    model = Transformer(TransformerConfig(**cfg))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # biases and norm weights away from their initial 0 and 1
        for name, p in model.named_parameters():
            if not name.rsplit(".", 1)[-1].startswith("W_"):
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


# ----------------------------------------------------------------------------------------- the naive reference


def _parse(name: str):
    pos = None
    if "@" in name:
        name, p = name.split("@")
        pos = int(p)
    src, dst = name.split("->")
    return src, dst, pos


def naive_run(model, tokens, patched, abl, alphas=None, base_outs=None, embed=None):
    """Logits ``(B, T, V)`` and node outputs of ``model`` on ``tokens`` with the edges ``patched`` (names)
    carrying ``abl[src]``. ``alphas[name] (B,)`` scales an edge's difference (first-order terms); ``base_outs``
    replaces the run's own node outputs in the differences and ``embed`` the embedding (EAP-IG's runs)."""
    cfg = model.cfg
    H = cfg.n_heads
    Hk = cfg.n_key_value_heads or H

    def kv_name(layer, g):
        return f"L{layer}H{g}" if Hk == H else f"L{layer}KV{g}"

    by_dst: dict = {}
    for name in patched:
        s, d, p = _parse(name)
        by_dst.setdefault(d, []).append((s, p, name))
    outs: dict = {}
    state: dict = {}

    def patched_input(dst, x):
        x = x.clone()
        for s, p, name in by_dst.get(dst, []):
            cur = outs[s] if base_outs is None else base_outs[s]
            diff = cur - abl[s]
            if alphas is not None:
                diff = diff * alphas[name].view(-1, 1, 1)
            if p is None:
                x = x - diff
            else:
                x[:, p] = x[:, p] - diff[:, p]
        return x

    hooks = []
    for layer in range(cfg.n_layers):

        def resid_pre(t, hook, layer=layer):
            if layer == 0:
                t = t if embed is None else embed
                outs["embed"] = t
            state[("pre", layer)] = t
            return t

        def fix(t, hook, layer=layer, which="q"):
            blk = model.blocks[layer]
            t = t.clone()
            for h in range(H if which == "q" else Hk):
                dst = f"L{layer}H{h}.q" if which == "q" else f"{kv_name(layer, h)}.{which}"
                if dst in by_dst:
                    fn = {"q": blk.attn.compute_q, "k": blk.attn.compute_k, "v": blk.attn.compute_v}[which]
                    t[..., h, :] = fn(blk.ln1(patched_input(dst, state[("pre", layer)])))[..., h, :]
            return t

        def z_hook(z, hook, layer=layer):
            W_O = model.blocks[layer].attn.W_O
            for h in range(H):
                outs[f"L{layer}H{h}"] = z[..., h, :] @ W_O[h]

        hooks += [
            (f"blocks.{layer}.hook_resid_pre", resid_pre),
            (f"blocks.{layer}.attn.hook_q", lambda t, hook, layer=layer: fix(t, hook, layer, "q")),
            (f"blocks.{layer}.attn.hook_k", lambda t, hook, layer=layer: fix(t, hook, layer, "k")),
            (f"blocks.{layer}.attn.hook_v", lambda t, hook, layer=layer: fix(t, hook, layer, "v")),
            (f"blocks.{layer}.attn.hook_z", z_hook),
        ]
        if not cfg.attn_only:
            if not cfg.parallel_attn_mlp:
                hooks.append(
                    (
                        f"blocks.{layer}.hook_resid_mid",
                        lambda t, hook, layer=layer: state.__setitem__(("mid", layer), t),
                    )
                )
            hooks.append(
                (
                    f"blocks.{layer}.hook_mlp_out",
                    lambda t, hook, layer=layer: outs.__setitem__(f"MLP{layer}", t),
                )
            )
    handles = []
    for layer, blk in enumerate(model.blocks):
        if cfg.attn_only:
            continue

        def mlp_pre(mod, args, layer=layer):
            if f"MLP{layer}" not in by_dst:
                return None
            key = ("pre", layer) if cfg.parallel_attn_mlp else ("mid", layer)
            return (model.blocks[layer].ln2(patched_input(f"MLP{layer}", state[key])),)

        handles.append(blk.mlp.register_forward_pre_hook(mlp_pre))

    def final_pre(mod, args):
        return None if "logits" not in by_dst else (patched_input("logits", args[0]),)

    handles.append(model.ln_final.register_forward_pre_hook(final_pre))
    try:
        with model.hooks(fwd_hooks=hooks):
            logits = model(tokens)
    finally:
        for h in handles:
            h.remove()
    return logits, outs


def node_outputs(model, tokens):
    return {k: v.detach() for k, v in naive_run(model, tokens, [], {})[1].items()}


def ablated(model, source, ablation, B):
    outs = node_outputs(model, source)
    if ablation == "mean":
        outs = {k: v.mean(0, keepdim=True) for k, v in outs.items()}
    elif ablation == "zero":
        outs = {k: torch.zeros_like(v[:1]) for k, v in outs.items()}
    return {k: v.expand(B, *v.shape[1:]) if v.shape[0] != B else v for k, v in outs.items()}


def frames(clean, corrupted, mode):
    base, src = (clean, corrupted) if mode == "noise" else (corrupted, clean)
    return base, (base if src is None else src)


def read(logits, metric):
    pos = getattr(metric, "position", -1)
    if isinstance(pos, int):
        return metric(logits[:, pos])
    return metric(logits[torch.arange(logits.shape[0]), pos % logits.shape[1]])


def naive_metric(model, names, clean, corrupted, metric, mode="noise", ablation="resample"):
    base, src = frames(clean, corrupted, mode)
    abl = ablated(model, src, ablation, base.shape[0])
    return read(naive_run(model, base, list(names), abl)[0], metric)


def naive_first_order(model, graph, clean, corrupted, metric, mode, ablation, steps=1):
    """EAP (steps=1) or EAP-IG (right Riemann sum from the ablated to the base embedding) by autograd through one
    scalar per edge and example: ``(B, num_edges)``."""
    base, src = frames(clean, corrupted, mode)
    B = base.shape[0]
    A = ablated(model, src, ablation, B)
    O = node_outputs(model, base)
    names = [e.name for e in graph.edges]
    total = torch.zeros(B, len(names), dtype=torch.float64)
    for j in range(1, steps + 1):
        emb = A["embed"] + j / steps * (O["embed"] - A["embed"])
        alphas = {n: torch.zeros(B, dtype=torch.float64, requires_grad=True) for n in names}
        logits, _ = naive_run(model, base, names, A, alphas, base_outs=O, embed=emb)
        grads = torch.autograd.grad(read(logits, metric).sum(), list(alphas.values()), allow_unused=True)
        total += torch.stack([torch.zeros(B, dtype=torch.float64) if g is None else g for g in grads], 1)
    return total / steps


def prompts(B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)


def random_sets(graph, n, p, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [[e.name for e in graph.edges if torch.rand(1, generator=g) < p] for _ in range(n)]


def metrics(B):
    return {
        "logit_diff": LogitDiff(torch.arange(1, B + 1), torch.arange(4, B + 4)),
        "prob": Prob(torch.arange(1, B + 1), position=0),
        "kl": KL(),
        "callable": lambda lg: lg[..., 0] * lg[..., 3],
    }


def bind_clean(metric, model, clean):
    if isinstance(metric, KL):
        pos = metric.position
        metric.bind(model(clean)[:, pos])


CONFIGS = {
    "one_layer": dict(n_layers=1),
    "one_head": dict(n_heads=1, d_head=8),
    "attn_only": dict(d_mlp=None),
    "rms": dict(normalization_type="RMS", gated_mlp=True, act_fn="silu"),
    "no_norm": dict(normalization_type=None),
    "rotary": dict(positional_embedding_type="rotary", rotary_dim=2),
    "gqa": dict(n_key_value_heads=2, positional_embedding_type="rotary", normalization_type="RMS"),
    "mqa": dict(n_key_value_heads=1),
    "parallel": dict(parallel_attn_mlp=True, positional_embedding_type="rotary"),
    "no_biases": dict(attn_bias=False, mlp_bias=False, attn_out_bias=False),
}


# ---------------------------------------------------------------------------------------------- exact patching


@pytest.mark.parametrize("name", list(CONFIGS))
def test_patch_edges_equals_naive_hooks_every_frame_and_metric(name):
    model = make_model(**CONFIGS[name])
    g = edges(model)
    B = 2
    clean, corr = prompts(B, 4)
    sets = random_sets(g, 1, 0.35) + [[g.edges[len(g) // 2].name]]
    for (mname, met), mode, abl in itertools.product(
        metrics(B).items(), ("noise", "denoise"), ("resample", "mean", "zero")
    ):
        bind_clean(met, model, clean)
        got = patch_edges(model, sets, clean, corr, metric=met, mode=mode, ablation=abl)
        bind_clean(met, model, clean)
        want = torch.stack([naive_metric(model, s, clean, corr, met, mode, abl) for s in sets])
        assert (got - want).abs().max() <= TOL, (name, mname, mode, abl)
    # the patches change the metric: the comparison is not between two unpatched runs
    met = metrics(B)["logit_diff"]
    assert (
        naive_metric(model, sets[0], clean, corr, met) - naive_metric(model, [], clean, corr, met)
    ).abs().max() > 1e-3


@pytest.mark.parametrize(("B", "T"), [(1, 1), (1, 4), (2, 1)])
def test_patch_edges_small_batches_positions_and_special_sets(B, T):
    model = make_model(n_key_value_heads=2, positional_embedding_type="rotary")
    clean, corr = prompts(B, T, seed=B + T)
    met = LogitDiff(torch.ones(B, dtype=torch.long), torch.full((B,), 4))
    for graph in (edges(model), edges(model, per_position=True, seq_len=T)):
        some = random_sets(graph, 1, 0.3, seed=T)[0]
        sets = [some, [], [e.name for e in graph.edges], some + some[:3]]  # empty, all, duplicated edges
        for mode, abl in itertools.product(("noise", "denoise"), ("resample", "mean", "zero")):
            got = patch_edges(model, sets, clean, corr, metric=met, mode=mode, ablation=abl, graph=graph)
            want = torch.stack(
                [naive_metric(model, list(dict.fromkeys(s)), clean, corr, met, mode, abl) for s in sets]
            )
            assert (got - want).abs().max() <= TOL, (graph.per_position, mode, abl)


@pytest.mark.parametrize("family", ["neox", "llama"])
def test_converted_hf_models_match_naive_hooks(family):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if family == "neox":  # parallel attention and MLP, partial rotary
        hf = transformers.GPTNeoXForCausalLM(
            transformers.GPTNeoXConfig(
                vocab_size=13,
                hidden_size=16,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=24,
                rotary_pct=0.5,
                max_position_embeddings=16,
                use_parallel_residual=True,
            )
        )
    else:  # grouped-query attention, RMSNorm, gated MLP
        hf = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                vocab_size=13,
                hidden_size=16,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=24,
                max_position_embeddings=16,
            )
        )
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.add_(0.1 * torch.randn_like(p))
    hf = hf.double().eval()
    import pypattern

    model = pypattern.from_hf(hf)
    g = edges(hf)
    assert len(g) == (102 if family == "neox" else 82)
    clean = torch.randint(0, 13, (2, 5))
    corr = torch.randint(0, 13, (2, 5))
    met = LogitDiff(torch.tensor([1, 2]), torch.tensor([4, 5]))
    sets = random_sets(g, 2, 0.3)
    for mode, abl in itertools.product(("noise", "denoise"), ("resample", "mean", "zero")):
        got = patch_edges(hf, sets, clean, corr, metric=met, mode=mode, ablation=abl)
        want = torch.stack([naive_metric(model, s, clean, corr, met, mode, abl) for s in sets])
        assert (got - want).abs().max() <= TOL, (mode, abl)
    sc = edge_attribution(hf, clean, corr, metric=met, method="exact", quiet=True)
    m0 = naive_metric(model, [], clean, corr, met)
    want = torch.stack([naive_metric(model, [e.name], clean, corr, met) - m0 for e in g.edges], 1)
    assert (sc.values - want).abs().max() <= TOL


def test_exact_scores_per_example_positions_per_position_graph():
    model = make_model(n_layers=3, n_heads=3, d_head=5, n_key_value_heads=1)
    clean, corr = prompts(3, 4)
    met = LogitDiff(torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]), position=torch.tensor([-1, -2, 0]))
    for pp in (False, True):
        sc = edge_attribution(model, clean, corr, metric=met, method="exact", per_position=pp, quiet=True)
        idx = torch.randperm(len(sc.graph), generator=torch.Generator().manual_seed(1))[:30]
        m0 = naive_metric(model, [], clean, corr, met)
        want = torch.stack(
            [naive_metric(model, [sc.graph[i].name], clean, corr, met) - m0 for i in idx.tolist()], 1
        )
        assert (sc.values[:, idx] - want).abs().max() <= TOL


# ------------------------------------------------------------------------------------------ EAP and EAP-IG


@pytest.mark.parametrize(
    "kw",
    [
        dict(n_key_value_heads=2, positional_embedding_type="rotary", normalization_type="RMS"),
        dict(parallel_attn_mlp=True),
        dict(n_layers=1, d_mlp=None, normalization_type=None),
    ],
)
def test_eap_equals_autograd_first_order_through_per_edge_hooks(kw):
    model = make_model(**kw)
    for B, T, pp in [(2, 3, False), (1, 3, True), (2, 1, False)]:
        clean, corr = prompts(B, T, seed=T)
        ms = metrics(B)
        for mname in ("logit_diff", "prob", "callable"):
            met = ms[mname]
            for mode, abl in itertools.product(("noise", "denoise"), ("resample", "mean", "zero")):
                sc = edge_attribution(
                    model, clean, corr, metric=met, mode=mode, ablation=abl, per_position=pp
                )
                want = naive_first_order(model, sc.graph, clean, corr, met, mode, abl)
                assert (sc.values - want).abs().max() <= TOL, (B, T, pp, mname, mode, abl)


def test_eap_ig_equals_autograd_over_interpolated_runs():
    model = make_model(n_key_value_heads=2, positional_embedding_type="rotary", normalization_type="RMS")
    clean, corr = prompts(2, 4)
    met = LogitDiff(torch.tensor([1, 2]), torch.tensor([4, 5]), position=torch.tensor([2, 3]))
    kl = KL(position=torch.tensor([2, 3]))
    for mode, abl, pp, metric in [
        ("noise", "resample", False, met),
        ("denoise", "mean", True, met),
        ("noise", "zero", True, met),
        ("denoise", "resample", False, kl),
        ("noise", "resample", False, kl),
    ]:
        sc = edge_attribution(
            model,
            clean,
            corr,
            metric=metric,
            method="eap-ig",
            steps=3,
            mode=mode,
            ablation=abl,
            per_position=pp,
            max_batch=2,
        )
        if isinstance(metric, KL):
            metric.bind(model(clean)[torch.arange(2), metric.position])
        want = naive_first_order(model, sc.graph, clean, corr, metric, mode, abl, steps=3)
        assert want.abs().max() > 1e-3
        assert (sc.values - want).abs().max() <= TOL, (mode, abl, pp)


def test_eap_ig_converges_to_the_all_edges_effect():
    """Summed over the edges out of the embedding, EAP-IG's scores are a Riemann sum of the integral of dM/de along
    the straight path from the corrupted to the clean embedding: exact on a model linear in its embedding, with
    an error shrinking like 1/steps otherwise."""
    # linear: no norm, attention only, uniform attention (W_Q = 0), logit difference
    lin = make_model(n_layers=2, d_mlp=None, normalization_type=None)
    with torch.no_grad():
        for blk in lin.blocks:
            blk.attn.W_Q.zero_()
            blk.attn.b_Q.zero_()
    clean, corr = prompts(2, 4)
    met = LogitDiff(torch.tensor([1, 2]), torch.tensor([4, 5]))
    for model, mode in [(lin, "noise"), (lin, "denoise")]:
        g = edges(model)
        from_embed = torch.tensor([e.src == "embed" for e in g.edges])
        effect = patch_edges(model, torch.ones(len(g), dtype=torch.bool), clean, corr, metric=met, mode=mode)
        for steps in (1, 3):
            sc = edge_attribution(model, clean, corr, metric=met, method="eap-ig", steps=steps, mode=mode)
            assert (sc.values[:, from_embed].sum(1) - (effect - sc.m_base)).abs().max() <= TOL
            exact = edge_attribution(model, clean, corr, metric=met, method="exact", mode=mode, quiet=True)
            assert (sc.values - exact.values).abs().max() <= TOL  # linear: first order is exact, edge by edge
    model = make_model(n_key_value_heads=2, positional_embedding_type="rotary")
    g = edges(model)
    from_embed = torch.tensor([e.src == "embed" for e in g.edges])
    effect = patch_edges(model, torch.ones(len(g), dtype=torch.bool), clean, corr, metric=met)
    errs = []
    for steps in (2, 8, 32):
        sc = edge_attribution(model, clean, corr, metric=met, method="eap-ig", steps=steps)
        errs.append(float((sc.values[:, from_embed].sum(1) - (effect - sc.m_base)).abs().max()))
    assert errs[0] > 0.2  # a nonlinear model: a few steps are far from the integral
    assert errs[2] < errs[1] < errs[0] and errs[2] < errs[0] / 8, errs


# ------------------------------------------------------------------------------------------------ edge count


def _brute_count(L, H, Hk, mlp, parallel):
    n, srcs = 0, 1
    for _ in range(L):
        n += (H + 2 * Hk) * srcs
        if mlp:
            n += srcs if parallel else srcs + H
            srcs += H + 1
        else:
            srcs += H
    return n + srcs


@pytest.mark.parametrize(
    ("L", "H", "Hk", "mlp", "parallel"),
    [
        (2, 4, 4, True, False),
        (1, 1, 1, False, False),
        (3, 4, 2, True, True),
        (2, 6, 3, False, False),
        (1, 2, 1, True, False),
    ],
)
def test_edge_count_matches_a_brute_force_count(L, H, Hk, mlp, parallel):
    m = Transformer(
        TransformerConfig(
            n_layers=L,
            d_model=12,
            n_heads=H,
            d_head=3,
            n_key_value_heads=Hk,
            d_mlp=8 if mlp else None,
            parallel_attn_mlp=parallel,
            d_vocab=5,
            n_ctx=4,
        )
    )
    n = _brute_count(L, H, Hk, mlp, parallel)
    assert len(edges(m)) == n
    assert len(edges(m, per_position=True, seq_len=3)) == 3 * n
    if (L, H, Hk, mlp, parallel) == (2, 4, 4, True, False):
        assert n == 110


# ------------------------------------------------------------------------- faithfulness, curves and ACDC


def _circuit_metric(model, g, keep, clean, corr, met, mode, abl):
    patched = ~keep if mode == "noise" else keep
    return float(
        naive_metric(
            model, [g[i].name for i in patched.nonzero().flatten().tolist()], clean, corr, met, mode, abl
        ).mean()
    )


def _naive_faith(model, g, keep, clean, corr, met, mode, abl):
    E = len(g)
    mc = _circuit_metric(model, g, keep, clean, corr, met, mode, abl)
    mf = _circuit_metric(model, g, torch.ones(E, dtype=torch.bool), clean, corr, met, mode, abl)
    me = _circuit_metric(model, g, torch.zeros(E, dtype=torch.bool), clean, corr, met, mode, abl)
    return (mc - me) / (mf - me)


def test_faithfulness_and_pruning_curve_follow_the_definition():
    model = make_model(
        n_layers=1, n_key_value_heads=2, positional_embedding_type="rotary", normalization_type="RMS"
    )
    g = edges(model)
    clean, corr = prompts(3, 4)
    met = LogitDiff(torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]))
    gen = torch.Generator().manual_seed(5)
    for mode, abl in itertools.product(("noise", "denoise"), ("resample", "mean", "zero")):
        keep = torch.rand(len(g), generator=gen) < 0.5
        f = faithfulness(model, keep, clean, corr, metric=met, mode=mode, ablation=abl)
        assert abs(f - _naive_faith(model, g, keep, clean, corr, met, mode, abl)) <= TOL
        sc = edge_attribution(model, clean, corr, metric=met, mode=mode, ablation=abl)
        counts = [0, 3, 7, len(g)]
        pc = pruning_curve(model, sc, clean, corr, metric=met, counts=counts, mode=mode, ablation=abl)
        order = sorted(range(len(g)), key=lambda i: (-abs(float(sc.scores[i])), i))
        for j, c in enumerate(pc.counts.tolist()):
            keep = torch.zeros(len(g), dtype=torch.bool)
            keep[order[:c]] = True
            assert (
                abs(
                    float(pc.faithfulness["eap"][j])
                    - _naive_faith(model, g, keep, clean, corr, met, mode, abl)
                )
                <= TOL
            )


def _naive_acdc(model, g, clean, corr, met, mode, abl, threshold):
    keep = torch.ones(len(g), dtype=torch.bool)
    drops = torch.zeros(len(g), dtype=torch.float64)
    m_cur = _circuit_metric(model, g, keep, clean, corr, met, mode, abl)
    for d in reversed(range(g.n_dst)):
        for e in reversed((g.dst_idx == d).nonzero().flatten().tolist()):
            trial = keep.clone()
            trial[e] = False
            m = _circuit_metric(model, g, trial, clean, corr, met, mode, abl)
            drop = m_cur - m
            if abs(drop) <= 1e-12 * max(abs(m), abs(m_cur)):
                drop = 0.0
            drops[e] = drop
            if drop < threshold:
                keep, m_cur = trial, m
    return keep, m_cur, drops


@pytest.mark.parametrize(
    ("kw", "per_position"),
    [
        (dict(n_layers=1, d_mlp=None), False),
        (dict(n_layers=2, n_heads=2, d_head=8, parallel_attn_mlp=True), False),
        (dict(n_layers=2, n_heads=2, d_head=8, n_key_value_heads=1), True),
    ],
)
def test_acdc_equals_a_naive_greedy_search(kw, per_position):
    model = make_model(**kw)
    T = 3
    clean, corr = prompts(2, T)
    g = edges(model, per_position=True, seq_len=T) if per_position else edges(model)
    met = LogitDiff(torch.tensor([1, 2]), torch.tensor([4, 5]), position=torch.tensor([1, 2]))
    runs = [("noise", "resample", 0.0), ("noise", "mean", 0.05), ("denoise", "resample", 0.03)]
    if per_position:
        runs = [("noise", "resample", 0.02), ("denoise", "zero", 0.05)]
    for mode, abl, thr in runs:
        c = acdc(
            model,
            clean,
            corr,
            metric=met,
            threshold=thr,
            mode=mode,
            ablation=abl,
            per_position=per_position,
            quiet=True,
        )
        keep, m, drops = _naive_acdc(model, g, clean, corr, met, mode, abl, thr)
        assert torch.equal(c.mask, keep), (mode, abl, thr)
        assert (
            c.scores - drops
        ).abs().max() <= TOL  # the drop measured at each test (0 where no test can see one)
        assert abs(c.info["m_circuit"] - m) <= TOL
        assert abs(c.faithfulness - _naive_faith(model, g, keep, clean, corr, met, mode, abl)) <= TOL


def test_results_round_trip_on_grouped_parallel_per_position_graphs(tmp_path):
    model = make_model(n_key_value_heads=2, parallel_attn_mlp=True)
    clean, corr = prompts(2, 3)
    met = LogitDiff(torch.tensor([1, 2]), torch.tensor([4, 5]))
    for pp in (False, True):
        sc = edge_attribution(model, clean, corr, metric=met, method="eap-ig", steps=2, per_position=pp)
        sc.save(tmp_path / f"s{pp}.npz")
        back = EdgeScores.load(tmp_path / f"s{pp}.npz")
        assert torch.equal(back.values, sc.values)
        assert [e.name for e in back.graph] == [e.name for e in sc.graph]
        c = sc.circuit(fraction=0.2)
        c.save(tmp_path / f"c{pp}.npz")
        assert torch.equal(Circuit.load(tmp_path / f"c{pp}.npz").mask, c.mask)
        pc = pruning_curve(model, {"a": sc, "b": sc.scores}, clean, corr, metric=met, counts=[0, 2, 5])
        pc.save(tmp_path / f"p{pp}.npz")
        back = PruningCurve.load(tmp_path / f"p{pp}.npz")
        for k in pc.faithfulness:
            assert torch.equal(back.faithfulness[k], pc.faithfulness[k])
        c.draw(str(tmp_path / f"c{pp}.png"))
        assert (tmp_path / f"c{pp}.png").stat().st_size > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_exact_per_position_scores_after_each_examples_metric_position_are_zero(dtype):
    """Documented for every method: on a per-position graph, the positions after an example's metric position
    score exactly 0. The exact scores of prompts read at different positions were the rounding by which a patched
    run differs from the base run (1e-16 in float64, 1e-7 in float32), not 0."""
    model = make_model(n_key_value_heads=2, parallel_attn_mlp=True).to(dtype)
    clean, corr = prompts(2, 5, seed=11)
    position = torch.tensor([1, 3])
    met = LogitDiff(torch.tensor([1, 2]), torch.tensor([4, 5]), position=position)
    for mode in ("noise", "denoise"):
        for method in ("exact", "eap"):
            sc = edge_attribution(
                model, clean, corr, metric=met, method=method, per_position=True, mode=mode, quiet=True
            )
            after = sc.graph.pos_idx[None, :] > position[:, None]
            assert bool((sc.values[after] == 0).all()), (mode, method)
            assert bool((sc.values[~after] != 0).any())
