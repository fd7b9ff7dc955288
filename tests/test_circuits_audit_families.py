"""Circuit discovery on converted Hugging Face models (GPT-2, GPT-NeoX with and without parallel residual and partial
rotary, Llama / Mistral / Qwen2 with grouped- and multi-query attention, tied and untied embeddings) against the
hook-based reference of ``tests/_circuits_reference.py``, which runs the model's own forward and rebuilds each
destination input (each head's query, each key/value head's key and value, each MLP's input, the logits' input) as
its clean residual minus the patched sources' (base - ablated) outputs.

Covers random edge sets in every mode and ablation, metrics read at a non-final position (one per example), batch 1
and prompts of length 1 and 2, per-position graphs, EAP and EAP-IG against autograd through the reference, exact
scores, ``mean_mask``, the forms an edge set can be given in (names, Edge objects, duplicates, sets, empty, every
edge), faithfulness, pruning curves and ACDC against the reference, and the drawing's note on the edges it leaves
out.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from _circuits_reference import naive_first_order, naive_patch, naive_run, tiny

import pypattern
from pypattern.circuits import (
    acdc,
    circuit_from_edges,
    draw_circuit,
    edge_attribution,
    edges,
    faithfulness,
    patch_edges,
    pruning_curve,
)
from pypattern.models import Transformer
from pypattern.patching import LogitDiff

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

V = 11
TOL = 1e-9


def _hf(kind: str, tie: bool = False, hk: int = 4, parallel: bool = True, rotary_pct: float = 0.5):
    """A tiny float64 Hugging Face causal LM (4 heads) with non-trivial norm weights and biases."""
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=V, n_embd=16, n_layer=2, n_head=4, n_positions=8, n_inner=24, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.3, tie_word_embeddings=tie,
        )  # fmt: skip
        hf = transformers.GPT2LMHeadModel(cfg)
    elif kind == "neox":
        cfg = transformers.GPTNeoXConfig(
            vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24,
            rotary_pct=rotary_pct, max_position_embeddings=8, use_parallel_residual=parallel,
            tie_word_embeddings=tie, initializer_range=0.3, hidden_dropout=0.0, attention_dropout=0.0,
        )  # fmt: skip
        hf = transformers.GPTNeoXForCausalLM(cfg)
    else:
        conf, cls = {
            "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
            "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
            "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        }[kind]
        extra = {"sliding_window": 3} if kind == "mistral" else {}
        cfg = conf(
            vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=hk,
            intermediate_size=24, max_position_embeddings=8, initializer_range=0.3, tie_word_embeddings=tie,
            bos_token_id=0, eos_token_id=1, pad_token_id=None, **extra,
        )  # fmt: skip
        hf = cls(cfg)
    hf = hf.to(torch.float64).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return hf


def _model(kind: str, **kw) -> Transformer:
    """The converted model with its float32 internals (RMSNorm, rotary, scores, softmax) in float64, so that the
    comparison is at float64 rounding."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = pypattern.from_hf(_hf(kind, **kw))
    cfg = dataclasses.replace(
        model.cfg,
        norm_dtype=None,
        attn_softmax_dtype=None,
        attn_scores_dtype=None,
        rotary_dtype=None,
        rotary_freq_dtype=None,
        rotary_input_dtype=None,
    )
    out = Transformer(cfg)
    out.load_state_dict(model.state_dict())
    return out.eval()


def _prompts(B: int, T: int, seed: int = 2, position=None):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, V, (B, T), generator=g)
    corr = torch.randint(0, V, (B, T), generator=g)
    ans = torch.randint(0, V, (B,), generator=g)
    wrong = (ans + 1 + torch.randint(0, V - 1, (B,), generator=g)) % V
    if position is None:  # one position per example, not always the last
        position = torch.randint(0, T, (B,), generator=g)
    return clean, corr, LogitDiff(ans, wrong, position=position)


def _random_sets(graph, n: int, seed: int) -> list[list]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(1, len(graph), (1,), generator=g))
        out.append([graph.edges[i] for i in torch.randperm(len(graph), generator=g)[:k].tolist()])
    return out


def _quiet(f, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return f(*a, **kw)


FAMILIES = {
    "gpt2-tied": ("gpt2", dict(tie=True)),
    "gpt2-untied": ("gpt2", dict(tie=False)),
    "neox-parallel-pct0.25": ("neox", dict(parallel=True, rotary_pct=0.25)),
    "neox-sequential-pct0.5": ("neox", dict(parallel=False, rotary_pct=0.5)),
    "neox-sequential-pct0.25-tied": ("neox", dict(parallel=False, rotary_pct=0.25, tie=True)),
    "llama-mqa": ("llama", dict(hk=1)),
    "llama-gqa2-tied": ("llama", dict(hk=2, tie=True)),
    "mistral-gqa2": ("mistral", dict(hk=2)),
    "qwen2-mqa-tied": ("qwen2", dict(hk=1, tie=True)),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_patch_edges_and_eap_match_the_reference(family):
    kind, kw = FAMILIES[family]
    model = _model(kind, **kw)
    clean, corr, metric = _prompts(3, 5)
    graph = edges(model)
    sets = _random_sets(graph, 3, seed=3)
    for mode in ("noise", "denoise"):
        for ablation in ("resample", "mean", "zero"):
            got = _quiet(patch_edges, model, sets, clean, corr, metric=metric, mode=mode, ablation=ablation)
            ref = torch.stack([naive_patch(model, s, clean, corr, metric, mode, ablation) for s in sets])
            assert (got - ref).abs().max() <= TOL, (mode, ablation)
    for mode, ablation in (("noise", "resample"), ("denoise", "mean")):
        sc = _quiet(
            edge_attribution, model, clean, corr, metric=metric, method="eap", mode=mode, ablation=ablation
        )
        ref = naive_first_order(model, graph, clean, corr, metric, mode, ablation)
        assert (sc.values - ref).abs().max() <= TOL, (mode, ablation)


@pytest.mark.parametrize("B,T", [(1, 1), (1, 2), (2, 2)])
@pytest.mark.parametrize("per_position", [False, True])
def test_short_prompts_single_examples_and_per_position_graphs(B, T, per_position):
    """Grouped-query Llama, metric at position 0: every edge alone (exact scores and patch_edges), EAP and EAP-IG
    against autograd through the reference."""
    model = _model("llama", hk=1)
    clean, corr, metric = _prompts(B, T, seed=5, position=0)
    graph = edges(model, per_position=True, seq_len=T) if per_position else edges(model)
    one_each = torch.eye(len(graph), dtype=torch.bool)
    combos = (("noise", "resample"), ("denoise", "zero")) + (() if per_position else (("noise", "mean"),))
    for mode, ablation in combos:
        kw = dict(metric=metric, mode=mode, ablation=ablation, graph=graph)
        got = _quiet(patch_edges, model, one_each, clean, corr, **kw)
        ref = torch.stack([naive_patch(model, [e], clean, corr, metric, mode, ablation) for e in graph])
        assert (got - ref).abs().max() <= TOL
        base = naive_patch(model, [], clean, corr, metric, mode, ablation)
        exact = _quiet(edge_attribution, model, clean, corr, method="exact", **kw)
        assert (exact.values - (ref - base).T).abs().max() <= TOL
        eap = _quiet(edge_attribution, model, clean, corr, method="eap", **kw)
        assert (
            eap.values - naive_first_order(model, graph, clean, corr, metric, mode, ablation)
        ).abs().max() <= TOL
        ig = _quiet(edge_attribution, model, clean, corr, method="eap-ig", steps=3, **kw)
        ref_ig = naive_first_order(
            model, graph, clean, corr, metric, mode, ablation, alphas=(1 / 3, 2 / 3, 1.0)
        )
        assert (ig.values - ref_ig).abs().max() <= TOL


def test_mean_mask_averages_over_real_tokens_only():
    """Mean ablation with ``mean_mask``: the ablated value at each position is the mean over the prompts real
    there (0 where none is)."""
    model = _model("neox", parallel=False, rotary_pct=0.25)
    B, T = 4, 5
    clean, corr, metric = _prompts(B, T, seed=7, position=torch.tensor([4, 2, 3, 1]))
    lengths = torch.tensor([5, 3, 4, 2])
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    corr = torch.where(mask.bool(), corr, torch.full_like(corr, V - 1))  # right padding
    graph = edges(model)
    sets = _random_sets(graph, 3, seed=8)
    _, cache = model.run_with_cache(corr)
    outs = {"embed": cache["blocks.0.hook_resid_pre"]}
    for layer, blk in enumerate(model.blocks):
        z = cache[f"blocks.{layer}.attn.hook_z"]
        for h in range(model.cfg.n_heads):
            outs[f"L{layer}H{h}"] = z[:, :, h] @ blk.attn.W_O[h]
        outs[f"MLP{layer}"] = cache[f"blocks.{layer}.hook_mlp_out"]
    w = mask.to(torch.float64)[:, :, None]
    count = w.sum(0)
    src = {k: ((v * w).sum(0) / count.clamp(min=1)).expand_as(v) for k, v in outs.items()}
    got = patch_edges(model, sets, clean, corr, metric=metric, ablation="mean", mean_mask=mask)
    for s, g in zip(sets, got):
        with torch.no_grad():
            logits = naive_run(model, s, clean, src)
        ref = metric(logits[torch.arange(B), metric.position])
        assert (g - ref).abs().max() <= TOL
    plain = patch_edges(model, sets[0], clean, corr, metric=metric, ablation="mean")
    assert (plain - got[0]).abs().max() > 1e-6  # the mask changes the numbers


def test_edge_sets_in_every_form_agree_with_the_reference():
    model = _model("qwen2", hk=1, tie=True)
    clean, corr, metric = _prompts(3, 4, seed=9)
    graph = edges(model)
    E = list(graph)
    some = E[5:40:3]
    ref = naive_patch(model, some, clean, corr, metric, "noise", "resample")
    names = [e.name for e in some]
    mask = torch.zeros(len(graph), dtype=torch.bool)
    mask[torch.arange(5, 40, 3)] = True
    forms = {
        "edges": some,
        "names": names,
        "duplicates": some + some[:3],
        "duplicate names": names + names[::2],
        "set of names": set(names),
        "tuple": tuple(some),
        "mask": mask,
        "numpy mask": mask.numpy(),
        "0/1 mask": mask.long(),
        "circuit": circuit_from_edges(graph, names + names[:2]),
        "generator": (e for e in some),
    }
    for what, form in forms.items():
        got = patch_edges(model, form, clean, corr, metric=metric)
        assert got.shape == (3,), what
        assert (got - ref).abs().max() <= TOL, what
    assert len(circuit_from_edges(graph, some + some)) == len(some)
    empty = patch_edges(model, [], clean, corr, metric=metric)
    assert (empty - naive_patch(model, [], clean, corr, metric, "noise", "resample")).abs().max() <= TOL
    every = patch_edges(model, E, clean, corr, metric=metric)
    assert (every - naive_patch(model, E, clean, corr, metric, "noise", "resample")).abs().max() <= TOL
    batch = patch_edges(model, [[], some, names, E], clean, corr, metric=metric)
    assert batch.shape == (4, 3)
    assert (batch[0] - empty).abs().max() <= TOL and (batch[3] - every).abs().max() <= TOL
    assert (batch[1:3] - ref).abs().max() <= TOL
    # a per-position edge by name reads the position it names
    pe = [f"{e.name}@1" for e in some]
    pgraph = edges(model, per_position=True, seq_len=4)
    got = patch_edges(model, pe, clean, corr, metric=metric)
    want = naive_patch(
        model, [pgraph.edges[pgraph.index(n)] for n in pe], clean, corr, metric, "noise", "resample"
    )
    assert (got - want).abs().max() <= TOL


@pytest.mark.parametrize(
    "bad, match",
    [
        (["L0H1->L9H2.q"], r"^edges: edge 'L0H1->L9H2\.q' is not in the graph.*did you mean 'L0H1->L1H2\.q'"),
        (["MLP1->L0H0.q"], r"^edges: edge 'MLP1->L0H0\.q' is not in the graph"),
        (
            ["embed->L0H0.q", "L0H0->MLP0.q"],
            r"^edges: edge 'L0H0->MLP0\.q' is not in the graph.*'L0H0->MLP0'",
        ),
        (["embed->L0H0.q@7"], r"^edges: edge 'embed->L0H0\.q@7' is not in the graph"),
        ([0, 1, 2], r"^edges contains 0 \(int\); give Edge objects or names"),
        (torch.tensor([0, 5, 7]), r"^edges is a torch\.int64 tensor holding values other than 0 and 1"),
        (np.array([0, 5, 7]), r"^edges is a torch\.int64 tensor holding values other than 0 and 1"),
        (torch.ones(3, dtype=torch.bool), r"^edges is a mask over 3 edges; the model has \d+ edges"),
    ],
)
def test_bad_edges_are_refused_naming_the_argument(bad, match):
    model = _model("gpt2")
    clean, corr, metric = _prompts(2, 4, seed=10)
    with pytest.raises((ValueError, TypeError, KeyError), match=match):
        patch_edges(model, bad, clean, corr, metric=metric)
    if not isinstance(bad, (torch.Tensor, np.ndarray)) and isinstance(bad[0], str):
        with pytest.raises((ValueError, KeyError), match=match):
            faithfulness(model, bad, clean, corr, metric=metric)


@pytest.mark.parametrize("mode", ["noise", "denoise"])
def test_faithfulness_and_pruning_curve_match_the_reference(mode):
    model = _model("llama", hk=2, tie=True)
    clean, corr, metric = _prompts(3, 4, seed=11)
    graph = edges(model)
    E = list(graph)

    def m(patched):
        return float(naive_patch(model, patched, clean, corr, metric, mode, "resample").mean())

    # noising: the circuit's complement is patched (the empty circuit patches every edge); denoising: the circuit
    full, empty = (m([]), m(E)) if mode == "noise" else (m(E), m([]))

    def m_circuit(kept):
        return m([e for e in E if e not in set(kept)]) if mode == "noise" else m(kept)

    sc = _quiet(edge_attribution, model, clean, corr, metric=metric, method="eap", mode=mode)
    order = torch.sort(sc.scores.abs(), descending=True, stable=True).indices.tolist()
    for k in (1, 7, 40):
        kept = [E[i] for i in order[:k]]
        want = (m_circuit(kept) - empty) / (full - empty)
        assert _quiet(faithfulness, model, kept, clean, corr, metric=metric, mode=mode) == pytest.approx(
            want, abs=TOL
        )
    curve = _quiet(pruning_curve, model, sc, clean, corr, metric=metric, mode=mode, counts=[0, 3, 20, len(E)])
    assert curve.m_full == pytest.approx(full, abs=TOL) and curve.m_empty == pytest.approx(empty, abs=TOL)
    for n, f in zip(curve.counts.tolist(), curve.faithfulness["eap"].tolist()):
        want = (m_circuit([E[i] for i in order[:n]]) - empty) / (full - empty)
        assert f == pytest.approx(want, abs=1e-8), n


@pytest.mark.parametrize("per_position", [False, True])
def test_acdc_matches_a_greedy_search_on_the_reference(per_position):
    """ACDC (noising, threshold > 0, metric at one position per example) against the greedy search written out on
    the reference: destinations from the logits down, each one's incoming edges latest position first and latest
    source first within a position, removed when the mean metric drops by less than the threshold."""
    if per_position:
        model = _model("llama", hk=1)
        clean, corr, metric = _prompts(3, 3, seed=12, position=torch.tensor([2, 0, 1]))
        graph = edges(model, per_position=True, seq_len=3)
    else:
        model = _model("neox", parallel=True, rotary_pct=0.25)
        clean, corr, metric = _prompts(3, 4, seed=12)
        graph = edges(model)
    E = list(graph)
    threshold = 0.05

    def m(kept: torch.Tensor) -> float:
        return float(naive_patch(model, [E[i] for i in (~kept).nonzero().flatten()], clean, corr, metric,
                                 "noise", "resample").mean())  # fmt: skip

    keep = torch.ones(len(E), dtype=torch.bool)
    cur = m(keep)
    for d in sorted(set(graph.dst_idx.tolist()), reverse=True):
        into = (graph.dst_idx == d).nonzero().flatten().tolist()
        for i in sorted(into, key=lambda i: (int(graph.pos_idx[i]) if per_position else 0, i), reverse=True):
            keep[i] = False
            new = m(keep)
            if cur - new < threshold:
                cur = new
            else:
                keep[i] = True
    found = _quiet(acdc, model, clean, corr, metric=metric, threshold=threshold, quiet=True, graph=graph)
    assert torch.equal(found.mask, keep)
    assert found.faithfulness is not None
    assert 0 < int(keep.sum()) < len(E)  # the search removed some edges and kept some


def test_draw_circuit_says_when_it_leaves_edges_out(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure
    from matplotlib.patches import FancyArrowPatch

    model = _model("gpt2")
    graph = edges(model)
    scores = torch.linspace(-1, 1, len(graph), dtype=torch.float64)
    mask = torch.zeros(len(graph), dtype=torch.bool)
    mask[:30] = True

    def arrows(ax):
        return [p for p in ax.patches if isinstance(p, FancyArrowPatch)]

    ax = Figure().subplots()
    with pytest.warns(UserWarning, match=r"draws 10 of the 30 edges .* leaves out 20; give max_edges=None"):
        draw_circuit(graph, mask, scores, ax=ax, max_edges=10)
    assert len(arrows(ax)) == 10
    assert any("10 of 30 edges drawn" in t.get_text() for t in ax.texts)
    # every edge drawn: nothing to say
    for max_edges in (None, 30):
        ax = Figure().subplots()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            draw_circuit(graph, mask, scores, ax=ax, max_edges=max_edges)
        assert len(arrows(ax)) == 30
        assert not any("edges drawn" in t.get_text() for t in ax.texts)
    # through Circuit.draw, on a per-position graph: node pairs (summed over positions) are what is counted
    pgraph = edges(model, per_position=True, seq_len=3)
    circuit = circuit_from_edges(pgraph, list(pgraph))
    pairs = rf"draws 50 of the {len(graph)} node pairs \(per-position edges summed"
    with pytest.warns(UserWarning, match=pairs) as record:
        circuit.draw(path=str(tmp_path / "c.png"), max_edges=50)
    assert (tmp_path / "c.png").exists()
    assert record[0].filename == __file__  # the warning points at the user's line
    # the default max_edges=200 on a graph of more edges
    big = edges(tiny(layers=3, heads=4))
    assert len(big) > 200
    with pytest.warns(UserWarning, match=rf"draws 200 of the {len(big)} edges"):
        draw_circuit(big, torch.ones(len(big), dtype=torch.bool), ax=Figure().subplots())


def test_draw_circuit_puts_nan_scores_last():
    """NaN scores neither scramble which edges are drawn nor make every arrow's width NaN."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure
    from matplotlib.patches import FancyArrowPatch

    graph = edges(tiny())
    scores = torch.linspace(0.1, 1.0, len(graph), dtype=torch.float64)
    scores[::3] = float("nan")
    ax = Figure().subplots()
    _quiet(
        draw_circuit, graph, torch.ones(len(graph), dtype=torch.bool), scores, ax=ax, max_edges=5, annotate=5
    )
    widths = [p.get_linewidth() for p in ax.patches if isinstance(p, FancyArrowPatch)]
    finite = scores[~scores.isnan()]
    top5 = torch.sort(finite, descending=True).values[:5]
    assert widths == pytest.approx((0.5 + 4.5 * top5 / top5[0]).tolist())
    labels = [t.get_text() for t in ax.texts][:5]
    assert labels == [f"{v:.2g}" for v in top5.tolist()]
    # every edge drawn: the NaN ones thin and grey, after the numbers
    ax = Figure().subplots()
    draw_circuit(graph, torch.ones(len(graph), dtype=torch.bool), scores, ax=ax, max_edges=None)
    arrows = [p for p in ax.patches if isinstance(p, FancyArrowPatch)]
    n_nan = int(scores.isnan().sum())
    assert len(arrows) == len(graph)
    assert all(a.get_linewidth() == 0.5 for a in arrows[-n_nan:])
    assert not any(np.isnan(a.get_linewidth()) for a in arrows)


def test_patch_edges_warns_when_patching_cannot_change_the_metric():
    """As edge_attribution: corrupted prompts equal to the clean ones, a mean over one prompt, or a LogitDiff of a
    token against itself leave every patched metric at the unpatched run's (checked on the reference), and a
    warning names the cause; patching that can change the metric is not warned of."""
    model = _model("gpt2")
    clean, corr, metric = _prompts(3, 3, seed=3)
    some = edges(model).edges[:60]
    one = LogitDiff(metric.answer[:1], metric.wrong[:1], position=metric.position[:1])
    cases = [
        ((clean, clean, metric), {}, "the corrupted prompts equal the clean ones"),
        ((clean[:1], None, one), {"ablation": "mean"}, "the mean ablation averages over one prompt"),
        ((clean, corr, LogitDiff(metric.answer, metric.answer)), {}, "answer and wrong tokens are the same"),
    ]
    for (c, x, met), kw, cause in cases:
        with pytest.warns(RuntimeWarning, match=rf"^patch_edges: every patched edge's effect is 0 .*{cause}"):
            got = patch_edges(model, some, c, x, metric=met, **kw)
        unpatched = naive_patch(model, [], c, x, met, "noise", kw.get("ablation", "resample"))
        assert (got - unpatched).abs().max() <= TOL
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patch_edges(model, some, clean, corr, metric=metric)
    # edge_attribution warns once, not again through its own internal patching
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        edge_attribution(model, clean, clean, metric=metric, method="eap")
    no_op = [w for w in caught if "is 0 (up to rounding) whatever the model" in str(w.message)]
    assert len(no_op) == 1 and str(no_op[0].message).startswith("edge_attribution")


def test_edge_scores_given_as_edges_and_names_in_other_case_get_a_hint():
    model = _model("gpt2")
    clean, corr, metric = _prompts(2, 3, seed=4)
    sc = edge_attribution(model, clean, corr, metric=metric, method="eap")
    for call in (patch_edges, faithfulness):
        with pytest.raises(TypeError, match=r"^edges=EdgeScores\(.*scores every edge; give a set of edges: "
                           r"edges\.circuit\(n=\.\.\.\)"):  # fmt: skip
            call(model, sc, clean, corr, metric=metric)
    # the hinted forms are accepted and equal the reference
    want = naive_patch(model, [e for e, _ in sc.top(4)], clean, corr, metric, "noise", "resample")
    for form in (sc.circuit(n=4), sc.top(4)):
        assert (patch_edges(model, form, clean, corr, metric=metric) - want).abs().max() <= TOL
    for bad in ("EMBED->logits", "embed -> logits", "Embed->L0H1.Q"):
        want = "embed->logits" if "logits" in bad else "embed->L0H1.q"
        with pytest.raises(
            KeyError, match=rf"did you mean '{want}'\? \(names are case-sensitive, without spaces\)"
        ):
            patch_edges(model, [bad], clean, corr, metric=metric)
