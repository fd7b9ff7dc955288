"""Public entry points: exact edge patching, edge attribution (EAP, EAP-IG, exact), faithfulness, pruning curves
and ACDC-style greedy pruning.

Conventions (see :mod:`pypattern.circuits.engine` for the definitions):

- ``mode="noise"``: the clean run with the patched edges reading the ablated value (corrupted run, mean or zero);
  ``mode="denoise"``: the corrupted run with the patched edges reading the clean values.
- Scores estimate ``M(run with the edge patched) - M(base run)`` per example; circuits are ranked by ``|score|``.
- A *circuit* is a set of edges. In the noising frame it is evaluated on the clean run with every edge outside it
  ablated (auto-circuit's "tree patching"); in the denoising frame, on the corrupted run with its edges restored
  from the clean run (auto-circuit's "edge patching").
  Faithfulness = ``(M_circuit - M_empty) / (M_full - M_empty)`` on means over the examples: 1 = the full model's
  behaviour, 0 = the fully ablated model's. Means over examples leave out the examples whose metric is not finite
  on the clean or the base run (with a warning naming them); no example left is refused.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
import warnings
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from .. import _backends
from .._checks import is_count, is_real
from .._masks import zero_one_mask
from .._memory import warn_budget_too_small
from .._progress import progress_bar, sigterm_as_interrupt
from .._train_checkpoint import check_checkpoint_arg
from ..models.convert import converted_if_convertible
from ..ops.dots import row_dots
from ..patching.api import (
    CHECKPOINT_VERSION_KEY,
    check_checkpoint_version,
    half_precision_warned,
    warn_half_precision,
)
from ..patching.metrics import (
    finite_examples,
    first_order_says_nothing,
    first_order_tol,
    name_examples,
    no_op_causes,
    one_prompt,
    result_name,
    same_prompts,
    warn_no_op,
    warn_nonfinite_examples,
)
from .engine import _CALL_WARNED, EdgeEngine, call_warned, corruption_args, prepare_runs
from .graph import Edge, EdgeGraph, check_graph_arg
from .results import Circuit, EdgeScores, PruningCurve, rank_order

__all__ = ["patch_edges", "edge_attribution", "faithfulness", "pruning_curve", "acdc"]

_METHODS = ("eap", "eap-ig", "exact")


def _converted(model, call: str):
    """``model`` as the public function ``call`` runs it (pypattern's Transformer, converted where it converts),
    with a warning where it computes in float16 or bfloat16 (its edge scores and patched metrics are mostly
    rounding)."""
    warn_half_precision(model, "circuits", call)
    return converted_if_convertible(model)


def _metric_name(metric) -> str:
    return result_name(metric)


def _graph_for(model, graph: EdgeGraph | None, per_position: bool, seq_len: int) -> EdgeGraph:
    if graph is not None:
        if per_position and not graph.per_position:
            raise ValueError(
                "per_position=True and graph= a graph of one edge per node pair: give a per-position graph "
                "(edges(model, per_position=True, seq_len=...)) or leave per_position out"
            )
        return graph
    return EdgeGraph.from_model(model, per_position=per_position, seq_len=seq_len if per_position else None)


def _measured(m_clean: torch.Tensor, m_base: torch.Tensor, mode: str) -> torch.Tensor:
    """``(batch,)`` bool on the CPU: the examples whose metric is finite on the clean and on the base run, those
    the means over examples (faithfulness, pruning curves, ACDC, edge scores) are taken over. The clean run's
    non-finite examples were named when it ran; the base run's (denoising: the corrupted run) are named here. No
    example left is refused."""
    keep = finite_examples(m_clean, m_base)
    if not bool(keep.any()):
        raise ValueError(
            "metric is not finite on the clean or the base run for every example: no example is left to measure; "
            "give a metric that is finite on the unpatched runs"
        )
    if mode == "denoise":  # the base run is the corrupted run; its examples that are finite on the clean run
        clean_ok = torch.isfinite(m_clean.detach()).to(m_base.device)
        warn_nonfinite_examples(torch.where(clean_ok, m_base.detach(), 0.0), "the corrupted run")
    return keep


def _example_mean(vals: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Means over the examples ``keep`` (:func:`_measured`) of ``vals (C, batch)``, on the CPU."""
    if not bool(keep.all()):
        vals = vals[:, keep.to(vals.device)]
    return vals.mean(1).cpu()


def _seq_len(clean) -> int:
    """The prompts' length, read before :func:`~pypattern.patching.api.check_tokens` checks them in full: a list
    or a dict of prompts is refused here with the same message."""
    if not isinstance(clean, torch.Tensor):
        from collections.abc import Mapping

        from ..patching.api import _mapping_prompts

        if isinstance(clean, Mapping):  # a tokenizer's output not read by _read_prompts
            raise TypeError(_mapping_prompts(clean, "clean"))
        raise TypeError(f"clean is a {type(clean).__name__}; give a LongTensor (batch, pos)")
    return clean.shape[-1]


def _read_prompts(clean, corrupted, attention_mask):
    """``(clean, corrupted, attention_mask)`` with a tokenizer's output (a dict or ``BatchEncoding``) given as
    ``clean`` or ``corrupted`` read as its ids and mask (:func:`~pypattern.patching.api.read_prompts`: one mask
    for both, equal to ``attention_mask`` when that is given too)."""
    from ..patching.api import read_prompts

    return read_prompts(clean, corrupted, attention_mask, names=("clean", "corrupted"))


def _reference_prompts(corrupted, ablation, mean_mask, mode):
    """``(corrupted, mean_mask)`` with a mean ablation's reference prompts given as a tokenizer's output (noising
    with ``ablation="mean"`` and ``corrupted`` a dict or ``BatchEncoding`` holding ``input_ids`` and
    ``attention_mask``): its ``attention_mask`` is the mean's ``mean_mask`` (the mean at each position over the
    reference prompts real there; right padding only, as ``mean_mask``), and ``corrupted`` is returned without it
    (the reference prompts run unmasked, each real token computed as in its prompt alone under right padding).
    Anything else is returned as given (:func:`_read_prompts` reads it)."""
    from collections.abc import Mapping

    from ..patching.api import _as_array
    from ..patching.corruptions import mean_mask as checked_mean_mask

    if not (isinstance(corrupted, Mapping) and isinstance(ablation, str) and ablation == "mean"):
        return corrupted, mean_mask
    if mode != "noise" or corrupted.get("attention_mask") is None or "input_ids" not in corrupted:
        return corrupted, mean_mask
    if mean_mask is not None:
        raise ValueError(
            "corrupted holds an attention_mask (the mask of the mean's reference prompts) and mean_mask is given "
            "too: give the mask of the mean once"
        )
    am, ids = corrupted["attention_mask"], corrupted["input_ids"]
    am = am if isinstance(am, torch.Tensor) else _as_array(am, "corrupted['attention_mask']")
    ids = ids if isinstance(ids, torch.Tensor) else _as_array(ids, "corrupted['input_ids']")
    shape = tuple(ids.shape) if ids.dim() == 2 else None  # other shapes: refused as prompts by name
    mask = checked_mean_mask(am, "corrupted['attention_mask']", shape)
    rest = {k: v for k, v in corrupted.items() if k not in ("attention_mask", "position_ids")}
    return {**rest, "input_ids": ids}, mask


def _circuit_mask(edges, graph: EdgeGraph | None):
    """A found :class:`Circuit` (acdc, ``EdgeScores.circuit``) as its mask on its graph (``graph`` when given);
    any other ``edges`` unchanged."""
    if isinstance(edges, Circuit):
        if graph is not None and (
            len(edges.graph) != len(graph) or edges.graph.per_position != graph.per_position
        ):
            raise ValueError(
                f"edges is a Circuit on a graph of {len(edges.graph)} edges (per_position="
                f"{edges.graph.per_position}); graph= is one of {len(graph)} (per_position={graph.per_position}): "
                "give the circuit with its own graph (leave graph= out) or a circuit of that graph"
            )
        return edges.mask, edges.graph if graph is None else graph
    if isinstance(edges, (list, tuple)) and any(isinstance(e, Circuit) for e in edges):
        # a batch of sets holding found circuits: each as its mask, on one graph
        graphs = [e.graph for e in edges if isinstance(e, Circuit)]
        if graph is None:
            graph = graphs[0]
        for i, e in enumerate(edges):
            if isinstance(e, Circuit) and (
                len(e.graph) != len(graph) or e.graph.per_position != graph.per_position
            ):
                raise ValueError(
                    f"edges[{i}] is a Circuit on a graph of {len(e.graph)} edges (per_position="
                    f"{e.graph.per_position}); the others are on one of {len(graph)} (per_position="
                    f"{graph.per_position}): give circuits of one model's graph"
                )
        return [e.mask if isinstance(e, Circuit) else e for e in edges], graph
    return edges, graph


def _check_mask_shapes(edges) -> None:
    """Refuse a mask tensor that is neither one set ``(num_edges,)`` nor a batch ``(C, num_edges)`` (and, in a list
    of sets, a tensor that is not one set) before the graph or the engine reads it."""
    if isinstance(edges, torch.Tensor):
        if edges.dim() not in (1, 2):
            raise ValueError(
                f"edges is a tensor of shape {tuple(edges.shape)}; give a boolean mask (num_edges,) for one set of "
                "edges or (C, num_edges) for a batch of C sets"
            )
        return
    if isinstance(edges, (list, tuple)):
        for i, e in enumerate(edges):
            if isinstance(e, torch.Tensor) and e.dim() != 1:
                raise ValueError(
                    f"edges[{i}] is a tensor of shape {tuple(e.shape)}; each set in a list of sets is a boolean "
                    "mask (num_edges,) (or give the batch as one tensor (C, num_edges))"
                )


def _as_masks(graph: EdgeGraph, edges) -> tuple[torch.Tensor, bool]:
    """``edges`` -> boolean masks ``(C, num_edges)`` and whether a single set was given (one edge or edge name
    is a set of one)."""
    if isinstance(edges, torch.Tensor):
        m = graph.mask(edges).cpu()  # masks are read on the CPU (a GPU model's engine moves them once)
        return (m[None], True) if m.dim() == 1 else (m, False)
    if isinstance(edges, (Edge, str)):
        edges = [edges]
    edges = list(edges)
    if edges and all(_scored_pair(e) for e in edges):  # EdgeScores.top(n): (edge, score) pairs, one set
        edges = [e[0] for e in edges]
    if edges and not isinstance(edges[0], (Edge, str)):
        return torch.stack([graph.mask(e).cpu() for e in edges]), False
    return graph.mask(edges)[None], True


def _scored_pair(item) -> bool:
    """Whether ``item`` is an ``(edge, score)`` pair as :meth:`EdgeScores.top` lists them."""
    return (
        isinstance(item, tuple)
        and len(item) == 2
        and isinstance(item[0], (Edge, str))
        and isinstance(item[1], (int, float))
        and not isinstance(item[1], bool)
    )


def _materialised(edges):
    """``edges`` read once into a list when it is an iterator or generator (the per-position test and the masks
    both read it: a generator would lose its first item to the first)."""
    if (
        isinstance(edges, np.ndarray) and edges.dtype.kind in "biuf"
    ):  # a mask (or a batch of masks) over edges
        return torch.from_numpy(np.ascontiguousarray(edges))
    if isinstance(edges, (torch.Tensor, Edge, str, list, tuple)):
        return edges
    if isinstance(edges, EdgeScores):
        raise TypeError(
            f"edges={edges!r} scores every edge; give a set of edges: edges.circuit(n=...) (the top n by |score|) "
            "or edges.top(n)"
        )
    try:
        return list(edges)
    except TypeError:
        raise TypeError(
            f"edges={edges!r} is not valid; give edges or edge names, a boolean mask, or a list of such sets"
        ) from None


def _infer_per_position(edges, model, T: int) -> bool:
    if isinstance(edges, torch.Tensor):
        if zero_one_mask(edges) is None:  # not a mask: what it is, before its length is compared
            bad = (edges != 0) & (edges != 1)
            what = (
                f"values such as {edges[bad][0].item()!r} (give edges.bool() of a threshold)"
                if edges.is_floating_point() or edges.is_complex()
                else "values other than 0 and 1 (to select edges by index, give [graph.edges[i] for i in idx] or "
                "their names)"
            )
            raise ValueError(f"edges is a {edges.dtype} tensor holding {what}; a mask over edges is boolean")
        n = edges.shape[-1]
        flat = len(EdgeGraph.from_model(model))
        if n == flat:
            return False
        if n == flat * T:
            return True
        raise ValueError(
            f"edges is a mask over {n} edges; the model has {flat} edges ({flat * T} per position over {T})"
        )
    if isinstance(edges, (Edge, str)):
        edges = [edges]
    try:
        items = iter(edges)
    except TypeError:
        raise TypeError(
            f"edges={edges!r} is not valid; give edges or edge names, a boolean mask, or a list of such sets"
        ) from None
    for e in items:
        if isinstance(e, Edge):
            return e.pos is not None
        if isinstance(e, str):
            return "@" in e
        if not isinstance(e, (torch.Tensor, list, tuple, set, frozenset)):
            raise TypeError(
                f"edges contains {e!r} ({type(e).__name__}); give Edge objects or names such as 'L0H1->L1H2.k' "
                "(graph.edges[i] for an index i), a boolean mask, or a list of such sets"
            )
        if not isinstance(e, torch.Tensor) and len(e) == 0:
            continue  # an empty set says nothing: the next set decides
        return _infer_per_position(e, model, T)
    return False


def _edge_sets(model, edges, graph: EdgeGraph | None, clean) -> tuple[EdgeGraph, torch.Tensor, bool]:
    """The graph, the masks ``(C, num_edges)`` and whether one set was given, for ``edges`` as
    :func:`patch_edges` and :func:`faithfulness` take them: a :class:`Circuit` as its mask on its graph, ``edges``
    read once, the masks' shapes checked, and without ``graph`` the model's graph, per position when the edges
    name positions (over the length of ``clean``)."""
    edges, graph = _circuit_mask(edges, graph)
    edges = _materialised(edges)
    _check_mask_shapes(edges)
    T = _seq_len(clean)
    if graph is None:
        graph = _graph_for(model, None, _infer_per_position(edges, model, T), T)
    masks, single = _as_masks(graph, edges)
    return graph, masks, single


def patch_edges(
    model,
    edges,
    clean: torch.Tensor,
    corrupted: torch.Tensor | None = None,
    *,
    metric,
    mode: str = "noise",
    ablation: str = "resample",
    graph: EdgeGraph | None = None,
    mean_mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    max_batch: int | None = None,
    memory_budget: float = 1e9,
    max_memory: int | None = None,
) -> torch.Tensor:
    """Metric of the run with a set of edges patched, exactly; many sets in one call are batched.

    Parameters
    ----------
    model : Transformer
    edges : Edge, edge name, iterable of Edge or edge names, BoolTensor ``(num_edges,)``, a :class:`Circuit`, or
        a batch of sets: a list of such iterables or a BoolTensor ``(C, num_edges)``.
    clean, corrupted : LongTensor ``(batch, pos)``
        ``corrupted`` may be None for ``mode="noise"`` with ``ablation="mean"`` (mean over the clean batch) or
        ``"zero"``. With ``mode="noise"`` and ``ablation="mean"`` it is read only through its per-position mean, so
        it may hold any number of prompts (of the clean prompts' length): the reference batch of the mean.
        ``TokenReplacement(tokens)`` of :mod:`pypattern.patching` is its ``tokens``. A tokenizer's output (a dict
        or ``BatchEncoding`` holding ``input_ids`` and optionally ``attention_mask``, padded on either side) is read
        as its ids and ``attention_mask``; the corrupted prompts' mask must be the clean ones', and one given as
        ``attention_mask=`` too must be the same. A mean ablation's reference prompts (``mode="noise"``,
        ``ablation="mean"``) given so are the exception: their ``attention_mask`` is the mean's ``mean_mask`` (right
        padding; left padding is refused), whatever the clean prompts' mask.
    metric : Metric
        Maps logits ``(..., batch, vocab)`` at ``metric.position`` to ``(..., batch)`` (e.g.
        :class:`~pypattern.patching.LogitDiff`).
    mode : {"noise", "denoise"}
        Noising: the clean run with the patched edges reading the ablated values (necessity). Denoising: the
        corrupted run with the patched edges reading the clean values (sufficiency).
    ablation : {"resample", "mean", "zero"}
        What a patched edge carries: the source node's output on the other prompts (corrupted for noising, clean
        for denoising), its per-position mean over that batch, or zero. Without ``mean_mask`` the mean takes every
        prompt at each position, padding or not: over right-padded prompts it averages the padding's outputs into
        the real positions of the longer prompts (the result then depends on the pad token); for a mean over real
        tokens only, give ``mean_mask``, or as ``corrupted`` (noising) prompts of the same length that are real at
        every position. :mod:`pypattern.patching`'s corruptions are read as what they mean: ``ZeroAblation()`` is
        ``"zero"``; ``MeanAblation()`` is ``"mean"`` over the clean batch (noising without ``corrupted``, or
        denoising), ``MeanAblation(reference_tokens=r, attention_mask=m)`` is ``"mean"`` with ``corrupted=r`` and
        ``mean_mask=m`` (noising only). ``GaussianNoise``, which the circuits' runs cannot compute, is refused, as
        is a setting given twice (``corrupted`` next to a ``MeanAblation`` that names its own prompts).
    graph : EdgeGraph, optional
        Default: :func:`edges` of the model (per position when the edges name positions).
    mean_mask : Tensor ``(batch, pos)``, optional
        With ``ablation="mean"`` only: the attention mask of the prompts the mean is over (``corrupted`` for
        noising, of its shape, or ``clean`` when ``corrupted`` is None; ``clean`` for denoising), 1 at a real token
        and 0 at padding (bool, int or float values 0 and 1), right-padded. The mean at each position is then over the
        prompts real there only, independent of the pad token; a position where none is real gets 0 (with right
        padding it follows every real token of those prompts, so it cannot change a metric read at a real
        position of theirs). As ``MeanAblation(attention_mask=...)`` in :mod:`pypattern.patching`.
    attention_mask : Tensor ``(batch, pos)``, optional
        The clean prompts' padding (shared by the corrupted prompts), 1 at a real token and 0 at padding, on either
        side (a Llama-family tokenizer pads on the left). Every run (the base, source and patched runs; EAP's and
        EAP-IG's forwards and backwards) computes under it as the model's masked forward does: padding keys are
        masked out of every attention, a query with no key left gets a zero pattern, and each row's real tokens
        are at positions ``0 .. n-1`` (learned, rotary and ALiBi positions), so each row's values are those of its
        prompt alone. The metric must read real tokens (a ``position=`` per example over right padding; the last
        position over left padding). ``ablation="mean"`` over the clean prompts takes it as ``mean_mask`` (right
        padding; left padding is refused: a column of left-padded prompts holds tokens at other positions); a
        mean over ``corrupted`` reference prompts runs them unmasked, under their own ``mean_mask``. Without
        padding (None, or all ones) the runs take no mask.
    max_batch : int, optional
        Edge sets per forward; default: as many as ``memory_budget`` allows.
    memory_budget : float
        Bytes (approximate, default 1e9) that the batched patched runs may take beyond the recorded runs: per edge
        set its run's node outputs and stage inputs and its logits over the vocabulary with the metric's
        temporaries (counted once on the clean run). At least one edge set per forward whatever the budget; the
        batch is also kept small enough that one stage's inputs take at most 32 MiB (faster on a CPU), so above a
        model-dependent budget a larger one changes nothing. The preparation's runs (the clean, corrupted and
        source runs, and the metric checked on three runs' logits at once) come on top.
    max_memory : int, optional
        The same setting under the name :mod:`pypattern.patching` uses (bytes, e.g. ``2**30``): given, it is
        ``memory_budget``. Giving both with different values (``memory_budget`` other than its default 1e9) is a
        ValueError.

    Returns
    -------
    Tensor ``(batch,)`` for one set, ``(C, batch)`` for a batch of sets, on the model's device (the metric's
    values as the runs computed them; prompts on another device are moved to the model's). Where patching cannot
    change the metric whatever the model (corrupted prompts equal to the clean ones, a mean ablation over one
    prompt, a ``LogitDiff`` whose answer and wrong tokens are the same), a RuntimeWarning says so, as
    :func:`edge_attribution` does.
    """
    memory_budget = _memory_setting(memory_budget, max_memory)
    corrupted, mean_mask = _reference_prompts(corrupted, ablation, mean_mask, mode)
    clean, corrupted, attention_mask = _read_prompts(clean, corrupted, attention_mask)
    corrupted, ablation, mean_mask = corruption_args(corrupted, ablation, mean_mask, mode, "patch_edges")
    model = _converted(model, "patch_edges")
    check_graph_arg(graph)
    graph, masks, single = _edge_sets(model, edges, graph, clean)
    engine, _ = prepare_runs(
        model,
        graph,
        clean,
        corrupted,
        metric,
        mode,
        ablation,
        max_batch=max_batch,
        memory_budget=memory_budget,
        call="patch_edges",
        mean_mask=mean_mask,
        attention_mask=attention_mask,
    )
    if not _CALL_WARNED.get():  # (edge_attribution's own check of its scores calls patch_edges: warned there)
        _warn_if_no_op(
            "patch_edges", clean, corrupted, metric, ablation, "patched edge's effect", attention_mask
        )
    vals = engine.run(masks)
    return vals[0] if single else vals


# ----------------------------------------------------------------------------------------------- attribution


class _ScoreSink:
    """Edge scores of a flat graph from the destination inputs' gradients as :meth:`EdgeEngine.gradients` hands
    them over (its ``sink``), summed over the gradient passes: each destination input's products with every source
    it reads, ``(A_u - out_u) . G_v`` summed over positions and features per prompt, accumulate in one ``(B, n_src,
    n_dst)`` table, from which :meth:`scores` reads each edge's.

    The entries of one call that read the same rows are one :func:`row_dots` product over the most sources any of
    them reads (sources are in topological order: each entry's are a prefix), so that each source row is read once
    for all of them: an attention's query, key and value inputs, and the MLP inputs and the logits, which have one
    gradient row each and would otherwise read the sources once per row. An entry joins a product only while the
    products it does not need (sources past its own) stay at most as many as those it does."""

    def __init__(self, engine: EdgeEngine):
        self.engine = engine
        self.table = None

    def __call__(self, entries: list) -> None:
        eng = self.engine
        g, D = eng.graph, eng.D  # D (n_src, B, T, d)
        B = D.shape[1]
        if self.table is None:
            self.table = D.new_zeros(B, g.n_src, g.n_dst)
        n_of = [_n_sources(eng, dsts) for dsts, _, _ in entries]
        for members in _product_groups(entries, n_of):
            n, rows = max(n_of[i] for i in members), entries[members[0]][1]
            Ds = _source_rows(D, n, rows)  # (n, B, R, d)
            K = Ds.shape[2] * Ds.shape[3]
            Gs = [entries[i][2].transpose(0, 1).reshape(B, entries[i][2].shape[0], K) for i in members]
            S = row_dots(  # (B, n, V_1 + V_2 + ...)
                Ds.transpose(0, 1).reshape(B, n, K),
                Gs,
                backend=_backends.internal_backend("row_dots", D.device),
            )
            at = 0
            for i in members:
                dsts = entries[i][0]
                self.table[:, : n_of[i]].index_add_(2, dsts, S[:, : n_of[i], at : at + len(dsts)])
                at += len(dsts)

    def scores(self, scale: float = 1.0) -> torch.Tensor:
        """Per-example scores ``(batch, num_edges)``, times ``scale``."""
        src, dst, _ = self.engine.graph.index_tensors(self.table.device)
        out = self.table[:, src, dst]
        return out.mul_(scale) if scale != 1 else out


def _product_groups(entries: list, n_of: list[int]) -> list[list[int]]:
    """The entries ``(dsts, rows, G)`` of one sink call in groups that are one :func:`row_dots` product each:
    entries at the same rows, most sources first, an entry joining a group while its sources times all its
    gradient rows are at most twice the products its members need (``n_of``: each entry's sources)."""
    groups: list[list[int]] = []
    for i in sorted(range(len(entries)), key=lambda i: -n_of[i]):  # stable: equal counts keep their order
        V = entries[i][2].shape[0]
        for grp in groups:
            if not torch.equal(entries[grp[0]][1], entries[i][1]):
                continue
            n = n_of[grp[0]]  # the group's most
            useful = sum(n_of[j] * entries[j][2].shape[0] for j in grp) + n_of[i] * V
            if n * (sum(entries[j][2].shape[0] for j in grp) + V) <= 2 * useful:
                grp.append(i)
                break
        else:
            groups.append([i])
    return groups


def _n_sources(engine: EdgeEngine, dsts: torch.Tensor) -> int:
    """How many sources the destination inputs ``dsts`` (of one stage) read: sources are in topological order,
    so those read at a stage are a prefix."""
    return engine.n_read[int(engine.graph.dst_stage[int(dsts[0])])]


def _source_rows(D: torch.Tensor, n: int, rows: torch.Tensor) -> torch.Tensor:
    """The first ``n`` sources' differences ``D (n_src, B, T, d)`` at positions ``rows``: ``(n, B, R, d)``."""
    return D[:n, :, rows] if len(rows) != D.shape[2] else D[:n]


def _gradient_scores(engine: EdgeEngine, grads: list) -> torch.Tensor:
    """Per-example scores ``(batch, num_edges)`` of a per-position graph: ``(A_u - out_u) . G_v`` at the edge's
    position, summed over features, from the per-stage gradients of :meth:`EdgeEngine.gradients` (flat graphs
    take :class:`_ScoreSink` during the backward).

    Each stage's products of every source read there with every destination input of it are one einsum per
    position; every edge then reads its product from their concatenation by one gather, its index computed for
    all edges at once."""
    g = engine.graph
    D = engine.D  # (n_src, B, T, d)
    B = D.shape[1]
    n_pos = g.n_pos or 1
    entry = torch.full((g.n_dst,), -1, dtype=torch.long)  # which stage entry holds each destination input
    dst_pos = torch.zeros(g.n_dst, dtype=torch.long)  # its place among that entry's destinations
    cols = torch.full((len(grads), n_pos), -1, dtype=torch.long)  # per entry: position -> its row, or -1
    V = torch.empty(len(grads), dtype=torch.long)
    Rn = torch.ones(len(grads), dtype=torch.long)
    offset = torch.zeros(len(grads), dtype=torch.long)
    flat, at = [], 0
    for i, (dsts, rows, G) in enumerate(grads):  # G (V, B, R, d)
        Ds = _source_rows(D, _n_sources(engine, dsts), rows)
        S = torch.einsum("ubtd,vbtd->buvt", Ds, G)  # (B, n, V, R)
        dsts, rows = dsts.cpu(), rows.cpu()  # the bookkeeping is on the CPU (the products on D's device)
        entry[dsts] = i
        dst_pos[dsts] = torch.arange(len(dsts))
        cols[i, rows] = torch.arange(len(rows))
        Rn[i] = len(rows)
        V[i], offset[i] = len(dsts), at
        flat.append(S.reshape(B, -1))
        at += flat[-1].shape[1]
    e = entry[g.dst_idx]
    none = e < 0  # a destination input without a gradient entry (none in the engine's graphs): score 0
    e = e.clamp(min=0)
    col = cols[e, g.pos_idx] if g.per_position else cols[e, 0]
    idx = offset[e] + (g.src_idx * V[e] + dst_pos[g.dst_idx]) * Rn[e] + col.clamp(min=0)
    out = torch.cat(flat, 1)[:, idx.to(D.device)]
    zero = none | (col < 0)  # or at a position where its destination's gradient is zero
    if bool(zero.any()):
        out[:, zero.to(D.device)] = 0
    return out


def edge_attribution(
    model,
    clean: torch.Tensor,
    corrupted: torch.Tensor | None = None,
    *,
    metric,
    method: str = "eap",
    steps: int = 5,
    mode: str = "noise",
    ablation: str = "resample",
    per_position: bool = False,
    graph: EdgeGraph | None = None,
    mean_mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    max_batch: int | None = None,
    memory_budget: float = 1e9,
    max_memory: int | None = None,
    quiet: bool = False,
    checkpoint: str | None = None,
) -> EdgeScores:
    """Score every edge by the change of ``metric`` when that edge alone is patched.

    Parameters
    ----------
    model, clean, corrupted, metric, ablation, graph, mean_mask, attention_mask
        As in :func:`patch_edges`.
    method : {"eap", "eap-ig", "exact"}
        ``"eap"`` (Syed et al. 2023): ``(A_u - out_u) . dM/d(input of v)`` with the gradient at the base run;
        one forward per prompt set and one backward. ``"eap-ig"`` (Hanna et al. 2024): the gradient averaged over
        ``steps`` runs whose input embedding is interpolated from the ablated embedding to the base embedding,
        ``e_j = e_abl + (j / steps) (e_base - e_abl)``, ``j = 1 .. steps`` (``steps=1`` equals EAP); the
        interpolated runs are batched (as many per pass as ``memory_budget`` allows). A right Riemann sum: Hanna
        et al.'s code takes ``j = 0 .. steps - 1`` (the ablated end, not the base end), so at equal ``steps`` the
        two differ by ``1 / steps`` of the difference between the gradient score at the base end (EAP's) and at the
        ablated end; both converge to the same integral. ``"exact"``: each edge
        patched alone (:func:`patch_edges`, batched with causal reuse).
    steps : int
        Interpolation steps of EAP-IG, a positive int (checked with every method); ``"eap"`` is EAP-IG with one
        step and ``"exact"`` interpolates nothing, so those read no steps (``info["steps"]`` is None; a ``steps``
        other than the default warns that it is not read, but for ``steps=1`` with ``"eap"``, which it is).
    mode, ablation :
        As in :func:`patch_edges`; the score estimates ``M(patched) - M(base)``.
    per_position : bool
        Score each edge at each position (a per-position graph over the prompts' length). The positions after an
        example's metric position score exactly 0 (a causal model's metric there does not read them): over
        right-padded prompts read at each one's last real token, its padding scores 0.
    max_batch : int, optional
        ``"exact"``: edges patched per forward (one edge set each); ``"eap-ig"``: interpolated runs per gradient
        pass; not read by ``"eap"`` (one forward and one backward over the prompts: given, it warns so). Default:
        as many as ``memory_budget`` allows.
    memory_budget : float
        Bytes (approximate, default 1e9) for those batches: ``"exact"`` as in :func:`patch_edges`; ``"eap-ig"``:
        per interpolated run, the activations its backward keeps and its logits over the vocabulary with the
        metric's temporaries and their gradients (at least one run per pass); not read by ``"eap"`` (one other
        than the default warns so).
    max_memory : int, optional
        The same setting under the name :mod:`pypattern.patching` uses (bytes, e.g. ``2**30``): given, it is
        ``memory_budget``. Giving both with different values (``memory_budget`` other than its default 1e9) is a
        ValueError.
    quiet : bool
        ``"exact"``: no progress bar (by default one counts the edges scored, shown once a call has run for two
        seconds: all the edges of a GPT-2-small-sized model take hours on a CPU).
    checkpoint : str, optional
        ``"exact"`` only: a file the scores so far are written to as they are computed (atomically, no pickle;
        every 30 s, at the end, and when the scoring stops on an exception; a stop by Ctrl-C or SIGTERM writes them
        too), from which a call with the same model weights, prompts (and attention mask), metric, graph, mode and
        ablation resumes, computing only the rest; a call that differs in any of them is refused
        (:class:`pypattern.io.FingerprintMismatch` naming what differs). The finished scores stay in it: the same
        call again returns them at once.

    Returns
    -------
    EdgeScores
        ``values (batch, num_edges)``; ``scores`` is their mean over the examples scored. An example whose metric
        is not finite on the clean or the base run (or, EAP-IG, on an interpolated run: its gradient says nothing
        about the edges) is not scored: its values are NaN, and it is named in a warning; no example left to score
        is refused. Settings under which every score is 0 whatever the model (corrupted prompts equal to the
        clean ones, a mean ablation over one prompt, a ``LogitDiff`` whose answer and wrong tokens are the same)
        are named in a ``RuntimeWarning``.
    """
    memory_arg = "max_memory" if max_memory is not None else "memory_budget"
    memory_budget = _memory_setting(memory_budget, max_memory)
    corrupted, mean_mask = _reference_prompts(corrupted, ablation, mean_mask, mode)
    clean, corrupted, attention_mask = _read_prompts(clean, corrupted, attention_mask)
    corrupted, ablation, mean_mask = corruption_args(corrupted, ablation, mean_mask, mode, "edge_attribution")
    model = _converted(model, "edge_attribution")
    check_graph_arg(graph)
    if method not in _METHODS:
        raise ValueError(f"method={method!r} is not valid; choose one of {_METHODS}")
    if method != "exact" and torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"edge_attribution(method={method!r}) takes gradients, which torch.inference_mode() does not allow "
            "(torch.enable_grad() cannot lift it); call it outside inference mode (inside torch.no_grad() is fine), "
            "or use method='exact'"
        )
    if method != "exact" and any(p.is_inference() for p in model.parameters()):
        raise ValueError(
            f"edge_attribution(method={method!r}) takes gradients through the model, but its parameters are "
            "inference tensors (made or loaded under torch.inference_mode()), which autograd cannot use; build or "
            "load the model outside inference mode (torch.no_grad() is fine), or use method='exact'"
        )
    if not is_count(steps) or steps < 1:
        raise ValueError(f"steps={steps!r} is not valid; give a positive int")
    steps = int(steps)
    _warn_if_unread_settings(method, steps, max_batch, memory_budget, memory_arg)
    if not isinstance(per_position, bool):
        raise TypeError(f"per_position={per_position!r} is not valid; give True or False")
    if not isinstance(quiet, bool):
        raise TypeError(f"quiet={quiet!r} is not valid; give True or False")
    if checkpoint is not None:
        if method != "exact":
            raise ValueError(
                f"checkpoint= applies to method='exact' only (method={method!r} is one pass or a few: nothing to "
                "resume)"
            )
        if not isinstance(checkpoint, str | os.PathLike):
            raise TypeError(f"checkpoint={checkpoint!r} is not valid; give a file path")
        from ..sampling.plan import check_checkpoint_file

        check_checkpoint_file(checkpoint)  # before any work: a path that cannot be a file is refused by name
    T = _seq_len(clean)
    graph = _graph_for(model, graph, per_position, T)
    t0 = time.perf_counter()
    engine, info = prepare_runs(
        model,
        graph,
        clean,
        corrupted,
        metric,
        mode,
        ablation,
        max_batch=max_batch,
        memory_budget=memory_budget,
        defer_base=method != "exact",  # the gradient run of the base prompts records the base run
        call="edge_attribution",
        mean_mask=mean_mask,
        attention_mask=attention_mask,
    )
    _warn_if_no_op("edge_attribution", clean, corrupted, metric, ablation, "edge score", attention_mask)
    passes = 0
    if method == "exact":
        # the unpatched runs are recorded: their non-finite examples named (none left refused) before any scoring
        used = _scored_examples(info["m_clean"], info["m_base"], None, mode, method)
        values = _exact_scores(
            engine, graph, model, clean, corrupted, metric, mode, ablation, quiet, checkpoint
        )
        if not bool(used.all()):
            values[~used] = float("nan")
        passes = None
    else:
        e_base = engine.base_embed
        # flat graphs: scores formed as the backward goes (each layer's head-input cotangents used and freed)
        sink = None if graph.per_position else _ScoreSink(engine)
        finite_runs = None  # per example: the metric finite on every run the gradients were taken on
        if method == "eap":
            grads, m_runs = engine.gradients(e_base[None], record=0, sink=sink)
            finite_runs = torch.isfinite(m_runs.detach()).all(0).cpu()
            passes = 1
        else:
            e_abl = engine.src_embed
            chunk = _ig_chunk(engine, steps)
            grads = None
            # the pass holding the base run (j = steps) first: it records the base run and binds the metric
            for j0 in reversed(range(1, steps + 1, chunk)):
                js = torch.arange(
                    j0, min(steps, j0 + chunk - 1) + 1, dtype=e_base.dtype, device=e_base.device
                )
                alpha = (js / steps).view(-1, 1, 1, 1)
                emb = e_abl[None] + alpha * (e_base - e_abl)[None]
                record = None
                if int(js[-1]) == steps:  # the last run is the base run itself: exactly its embedding
                    emb[-1] = e_base
                    record = len(js) - 1
                gj, m_runs = engine.gradients(emb, record=record, sink=sink)
                ok = torch.isfinite(m_runs.detach()).all(0).cpu()
                finite_runs = ok if finite_runs is None else finite_runs & ok
                grads = gj if grads is None else [(d, r, G + Gj) for (d, r, G), (_, _, Gj) in zip(grads, gj)]
                passes += 1
            grads = [(d, r, G / steps) for d, r, G in grads]
        info["m_base"] = engine.base_metric()
        if info["m_clean"] is None:  # noising: the base run is the clean run
            info["m_clean"] = info["m_base"]
        if sink is None:
            values = _gradient_scores(engine, grads)
        else:
            values = sink.scores(1.0 / steps if method == "eap-ig" else 1.0)
        used = _scored_examples(info["m_clean"], info["m_base"], finite_runs, mode, method)
        if not bool(used.all()):  # a gradient through a non-finite metric says nothing about the edges
            values[~used.to(values.device)] = float("nan")
        u = used.to(values.device)
        # the run patch_edges may make: warned of above (half precision, corrupted prompts not read, rounding)
        with half_precision_warned(), call_warned():
            _warn_if_no_gradient(
                values[u],
                info["m_base"][u.to(info["m_base"].device)],
                info["m_clean"][u.to(info["m_clean"].device)],
                method,
                steps,
                lambda: patch_edges(  # every edge patched, at the examples scored
                    model,
                    torch.ones(len(graph), dtype=torch.bool),
                    clean,
                    corrupted,
                    metric=metric,
                    mode=mode,
                    ablation=ablation,
                    graph=graph,
                    mean_mask=mean_mask,
                    attention_mask=attention_mask,
                    max_batch=max_batch,
                    memory_budget=memory_budget,
                )[u.to(info["m_base"].device)],
            )
    # the scores live on the CPU whatever the model's device (saved, tabled and drawn from numpy), moved once
    return EdgeScores(
        graph=graph,
        values=_widen(values.detach()).cpu(),
        method=method,
        mode=mode,
        ablation=ablation,
        metric=_metric_name(metric),
        m_base=_widen(info["m_base"].detach()).cpu(),
        m_clean=_widen(info["m_clean"].detach()).cpu(),
        info={
            "steps": steps if method == "eap-ig" else None,
            "seconds": time.perf_counter() - t0,
            "passes": passes,
            "scored_examples": used.cpu(),
            "attention_mask": attention_mask is not None,
        },
    )


#: edge_attribution's defaults of the settings some methods do not read
_DEFAULT_STEPS = 5
_DEFAULT_MEMORY_BUDGET = 1e9


def _memory_setting(memory_budget, max_memory):
    """The byte budget of the batched runs: ``memory_budget``, or ``max_memory`` (the name
    :mod:`pypattern.patching` gives the setting) when that is given; both given with different values (a
    ``memory_budget`` other than its default) is refused, naming both."""
    if max_memory is None:
        return memory_budget
    if not is_real(max_memory) or not (math.isfinite(max_memory) and max_memory > 0):
        raise ValueError(
            f"max_memory={max_memory!r} is not valid; give a finite number of bytes > 0, or None"
        )
    if memory_budget != _DEFAULT_MEMORY_BUDGET and memory_budget != max_memory:
        raise ValueError(
            f"memory_budget={memory_budget!r} and max_memory={max_memory!r} are one setting (bytes for the batched "
            "runs) given two values; give one of them"
        )
    return max_memory


def _warn_if_unread_settings(
    method: str, steps: int, max_batch, memory_budget, memory_arg: str = "memory_budget"
) -> None:
    """Warn, naming them, of settings given to :func:`edge_attribution` that ``method`` does not read: ``steps``
    other than the default for ``"exact"`` (nothing interpolated) and for ``"eap"`` (one step, so ``steps=1`` is
    consistent), and ``max_batch`` or a ``memory_budget`` other than the default for ``"eap"`` (one forward and one
    backward over the prompts)."""
    unread = []
    if method != "eap-ig" and steps != _DEFAULT_STEPS and not (method == "eap" and steps == 1):
        unread.append(f"steps={steps!r} (the interpolation steps of method='eap-ig')")
    if method == "eap":
        if max_batch is not None:
            unread.append(f"max_batch={max_batch!r}")
        if memory_budget != _DEFAULT_MEMORY_BUDGET:
            unread.append(f"{memory_arg}={memory_budget!r}")
    if not unread:
        return
    from ..sampling.diagnostics import user_stacklevel

    what = {"eap": "is one forward and one backward over the prompts", "exact": "interpolates nothing"}[
        method
    ]
    warnings.warn(
        f"edge_attribution(method={method!r}) does not read {' or '.join(unread)}: the method {what}; leave "
        f"{'it' if len(unread) == 1 else 'them'} out"
        + (", or use method='eap-ig'" if any(u.startswith("steps") for u in unread) else ""),
        UserWarning,
        stacklevel=user_stacklevel(),
    )


def _scored_examples(m_clean, m_base, finite_runs, mode: str, method: str) -> torch.Tensor:
    """``(batch,)`` bool on the CPU: the examples whose edge scores are measured (:func:`_measured`: the metric
    finite on the clean and the base run) and, for the gradient methods, finite on every run the gradient was taken
    on (``finite_runs``, an interpolated run of EAP-IG's); the others' values are NaN and the scores leave them
    out. Those of the last kind are named in a warning (the others were when their run was made)."""
    keep = _measured(m_clean, m_base, mode)
    if finite_runs is not None and not bool((keep <= finite_runs).all()):
        rows = (keep & ~finite_runs).nonzero().flatten().tolist()
        keep = keep & finite_runs
        if not bool(keep.any()):
            raise ValueError(
                f"edge_attribution(method={method!r}): the metric is not finite on some interpolated run of every "
                "example: no example is left to score; give a metric that is finite along the interpolation, or "
                "use method='exact'"
            )
        warnings.warn(
            f"edge_attribution(method={method!r}): the metric is not finite on an interpolated run of "
            f"{name_examples(rows)}: a gradient through it says nothing about the edges, so "
            f"{'its values are' if len(rows) == 1 else 'their values are'} NaN and the scores (means over "
            f"examples) leave {'it' if len(rows) == 1 else 'them'} out; the other examples are scored as usual",
            RuntimeWarning,
            stacklevel=3,
        )
    return keep


def _warn_if_no_op(
    call: str, clean, corrupted, metric, ablation: str, what: str, attention_mask=None
) -> None:
    """Warn, once for the call, when patching any edge changes nothing whatever the model: resampling from corrupted
    prompts equal to the clean ones (at their real tokens, under ``attention_mask``, which the runs have checked),
    a mean ablation over one prompt (every clean and corrupted prompt the same: a batch of one without corrupted
    prompts), or a ``LogitDiff`` whose answer and wrong tokens are the same (0 on every run). As
    :func:`faithfulness` warns when its runs leave the metric unchanged."""
    from ..patching.api import _same_real_tokens, patching_mask

    keep = None
    if attention_mask is not None and isinstance(clean, torch.Tensor):
        keep = patching_mask(attention_mask, tuple(clean.shape))
    same = ablation == "resample" and (
        same_prompts(clean, corrupted) or _same_real_tokens(clean, corrupted, keep)
    )
    mean_of_one = None
    if ablation == "mean" and one_prompt(clean, corrupted):
        mean_of_one = int(clean.shape[0])  # the batch averaged (corrupted or clean): all that one prompt
    hint = " (or ablation='zero', or corrupted prompts with ablation='resample')"
    warn_no_op(call, no_op_causes(metric, same=same, mean_of_one=mean_of_one, mean_hint=hint), what)


def _warn_if_no_gradient(values, m_base, m_clean, method, steps, all_patched) -> None:
    """Warn when first-order scores ``values (batch, num_edges)`` are all at rounding level while patching every
    edge changes the metric: the metric's gradient vanishes at the base run (a divergence from the clean run, at
    the clean run), and the scores say nothing about the edges. Scores are compared with the change of the metric
    when every edge is patched, so scores that are small because the model's outputs are small do not warn; that
    run (``all_patched()``) is made only when the scores are at most rounding level of the metric's size or of 1."""
    tol = first_order_tol(values.dtype)
    peak = float(values.abs().max()) if values.numel() else 0.0
    size = max(float(m_base.abs().max()), float(m_clean.abs().max()))
    if not peak <= tol * max(1.0, size):  # the usual case, and NaN: no extra run
        return
    m_all = all_patched().to(m_base.dtype)
    change = float((m_all - m_base).abs().max())
    if not first_order_says_nothing(peak, max(size, float(m_all.abs().max())), change, tol):
        return
    if method == "eap":
        hint = "method='eap-ig' (its gradients are taken on the way from the ablated run) or method='exact'"
    else:
        hint = "method='exact'" + (" or more steps" if steps == 1 else "")
    warnings.warn(
        f"edge_attribution(method={method!r}): every edge score is at rounding level (the largest |score| is "
        f"{peak:.2g}, while patching every edge changes the metric by up to {change:.3g}): the metric's gradient "
        "vanishes at the base run (as that of a divergence from the clean run does at the clean run, in "
        f"mode='noise'), so these first-order scores say nothing about the edges; use {hint}",
        RuntimeWarning,
        stacklevel=3,
    )


#: seconds between two writes of an exact scoring's checkpoint (and one at the end)
_CHECKPOINT_EVERY_S = 30.0

#: the layout of each circuits checkpoint kind (its header's ``checkpoint_version``; a file without one is of
#: version 1, see :func:`~pypattern.patching.api.check_checkpoint_version`)
_EXACT_SCORES_KIND, _EXACT_SCORES_VERSION = "ExactEdgeScoresCheckpoint", 1
_CURVE_KIND, _CURVE_VERSION = "PruningCurveCheckpoint", 1
_ACDC_KIND, _ACDC_VERSION = "ACDCCheckpoint", 1


def _exact_scores(engine, graph, model, clean, corrupted, metric, mode, ablation, quiet, checkpoint):
    """Each edge patched alone, ``(batch, E)``: the edges in blocks of whole engine batches, with a progress bar
    and (``checkpoint``) the scores so far written every 30 s, at the end and when the scoring stops on an
    exception or Ctrl-C, and read back by a call of the same run."""
    from .. import io

    E = len(graph)
    base = engine.base_metric()
    block = max(1, engine.chunk_size())  # one engine batch per run call
    values = torch.empty(engine.B, E, dtype=base.dtype, device="cpu")
    done = 0
    fp = None
    if checkpoint is not None:
        fp = _run_fingerprint(
            "exact edge scores", engine, graph, model, clean, corrupted, metric, mode, ablation
        )
        if os.path.exists(checkpoint):
            arrays, meta = io.load(checkpoint, kind=_EXACT_SCORES_KIND)
            check_checkpoint_version(meta, checkpoint, _EXACT_SCORES_VERSION)
            io.check_fingerprint(meta.get("fingerprint"), fp, checkpoint)
            done, got = meta.get("done"), arrays.get("values")
            # the scores as save() writes them: a count of finished edges and their values in the widened dtype
            want = torch.empty(0, dtype=_widen(values).dtype).numpy().dtype
            if (
                isinstance(done, bool)
                or not isinstance(done, int)
                or not 0 <= done <= E
                or got is None
                or tuple(got.shape) != (engine.B, done)
                or got.dtype != want
            ):
                raise io.FormatError(
                    f"checkpoint {os.fspath(checkpoint)!r} is damaged: it holds no partial scores ({want}, "
                    f"{engine.B} prompts x up to {E} edges) of this run; delete it to start afresh"
                )
            values[:, :done] = torch.from_numpy(got).to(values.dtype)
    saved = time.perf_counter()
    # one fixed-weights block for every run call: layouts and packed weights made once
    with (
        engine.fixed_weights(),
        sigterm_as_interrupt(),  # SIGTERM writes the finished blocks, as Ctrl-C does
        progress_bar(quiet or done >= E, total=E, initial=done, desc="exact edge scores", unit="edge") as bar,
    ):

        def save(done: int) -> None:
            io.save(
                checkpoint,
                {"values": _widen(values[:, :done]).numpy()},
                {CHECKPOINT_VERSION_KEY: _EXACT_SCORES_VERSION, "fingerprint": fp, "done": done},
                kind=_EXACT_SCORES_KIND,
            )

        def run_block(start: int, stop: int) -> None:
            masks = torch.zeros(stop - start, E, dtype=torch.bool, device="cpu")
            masks[torch.arange(stop - start, device="cpu"), torch.arange(start, stop, device="cpu")] = True
            values[:, start:stop] = (engine.run(masks) - base[None]).T

        _run_in_blocks(done, E, block, run_block, None if checkpoint is None else save, bar, saved, False)
    if graph.per_position and not engine.uniform:
        # an edge at a position after an example's metric position cannot change that example's metric (a causal
        # model reads no later position): exactly 0, as the gradient methods give, not the rounding by which a
        # patched run (computed in another batch) differs from the base run
        later = graph.pos_idx.to(values.device)[None, :] > engine.pos.to(values.device)[:, None]
        values[later] = 0
    return values


def _run_in_blocks(done, total, block, run_block, save, bar, saved: float, unsaved: bool) -> None:
    """``run_block(start, stop)`` over consecutive blocks of ``block`` from ``done`` to ``total``. With ``save``
    (a checkpoint's writer, ``save(done)``), the finished blocks are written at the last block, every
    :data:`_CHECKPOINT_EVERY_S` seconds after ``saved`` (the last write's time), when the loop ends with blocks not
    yet written (``unsaved`` on entry: a file to write although no block runs), and when a block is stopped
    (Ctrl-C, an error in it), before the exception goes on."""
    try:
        while done < total:
            stop = min(total, done + block)
            run_block(done, stop)
            done, unsaved = stop, True
            if save is not None and (done == total or time.perf_counter() - saved >= _CHECKPOINT_EVERY_S):
                save(done)
                saved, unsaved = time.perf_counter(), False
            if bar is not None:
                bar.update(stop - bar.n)
        if save is not None and unsaved:
            save(done)
    except BaseException:  # stopped: the finished blocks are written
        if save is not None and unsaved:
            save(done)
        raise


def _run_fingerprint(kind, engine, graph, model, clean, corrupted, metric, mode, ablation, **more) -> dict:
    """What makes a checkpointed circuit computation the same run: its kind, mode and ablation, the model's
    architecture (:func:`~pypattern.sampling.checkpoint.model_architecture`: its module tree and configuration, which
    the weights do not show), the graph's nodes and edges, the prompts (and their attention mask when it holds
    padding), the metric (its code and the values it gives
    on the base run: a change its name hides), the model's weights and ``more``."""
    from .. import io
    from ..sampling.checkpoint import model_architecture

    return io.fingerprint(
        kind=kind,
        mode=mode,
        ablation=ablation,
        architecture=model_architecture(model),
        nodes=hashlib.sha256("\n".join([*graph.src_names, "", *graph.dst_names]).encode()).hexdigest(),
        edges=[graph.src_idx, graph.dst_idx, graph.pos_idx],
        clean=clean,
        corrupted=corrupted,
        metric=metric,
        **{f"weights[{n}]": t for n, t in model.state_dict().items()},
        base_metric=engine.base_metric(),
        # a mean ablation's mask (left out without one, as fingerprints leave items at their defaults out)
        **({} if engine.mean_mask is None else {"mean_mask": engine.mean_mask.cpu()}),
        # the runs' attention mask when it holds padding (the runs without padding take none)
        **({} if engine.keep is None else {"attention_mask": engine.keep.cpu()}),
        **more,
    )


def _ig_chunk(engine: EdgeEngine, steps: int) -> int:
    if engine.max_batch is not None:
        return max(1, min(steps, int(engine.max_batch)))
    per = _ig_bytes_per_run(engine)
    if int(engine.memory_budget // per) < 1 and not engine._budget_warned:
        engine._budget_warned = True
        from ..sampling.diagnostics import user_stacklevel

        warn_budget_too_small(
            "memory_budget",
            engine.memory_budget,
            per,
            "one interpolated run of EAP-IG",
            stacklevel=user_stacklevel(),
        )
    return max(1, min(steps, int(engine.memory_budget // per)))


def _ig_bytes_per_run(engine: EdgeEngine) -> int:
    """What one interpolated run adds to a gradient pass, approximately: the activations each layer keeps for the
    backward, per token about 14 residual-sized tensors (the block's input and its norm, queries, keys, values,
    the heads' outputs and their sum, the MLP's input and output) and the MLP's hidden activations (two per
    hidden width, three for a gated MLP, times the experts each token uses), and the attention's probabilities.
    The per-head input cotangents are not per run (summed over the runs, contracted and freed layer by layer).
    Measured on the GPT-2-small shape (batch 8 x 32): 223 MB per run, against 217 MB estimated. On top: the run's
    logits over the vocabulary, the unembedding's and the metric's temporaries and their gradients
    (:meth:`EdgeEngine.vocab_bytes_per_run`), which dominate for a large vocabulary and short prompts."""
    cfg = engine.view.model.cfg
    d_mlp = cfg.d_mlp or 0
    hidden = d_mlp * (3 if cfg.gated_mlp else 2) * (cfg.experts_per_token or 1 if cfg.n_experts else 1)
    hidden += (cfg.moe_shared_d_mlp or 0) * 3
    per_token = 14 * engine.d + hidden + 2 * engine.H * engine.T
    blocks = engine.view.n_layers * engine.B * engine.T * per_token * engine.base_embed.element_size()
    return blocks + engine.vocab_bytes_per_run(grad=True)


# ----------------------------------------------------------------------------------------------- evaluation


def _circuit_to_patch(circuits: torch.Tensor, mode: str) -> torch.Tensor:
    """Circuit masks (edges kept) -> patched-edge masks: noising ablates the complement, denoising restores the
    circuit."""
    return ~circuits if mode == "noise" else circuits


def _widen(t: torch.Tensor) -> torch.Tensor:
    """Metric values of a half-precision model in float32: averaged, normalised and saved (numpy has no
    bfloat16) without further rounding."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


#: a gap ``M_full - M_empty`` within this many roundings of the metric's size (in the model's dtype) is at rounding
#: level; at least 1e-6 of the size (float32's level, kept for float64 models)
_FAITH_GAP_ULPS = 8


def _faith(vals: torch.Tensor, full: torch.Tensor, empty: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Faithfulness ``(vals - empty) / (full - empty)``, with a warning where the gap is at the rounding level of
    ``dtype``, the dtype the model computes in: a 16-bit model's metric is computed in float32 from activations
    rounded to 16 bits, so its values are only resolved to that dtype's rounding times the metric's size."""
    den = full - empty
    if not math.isfinite(float(den)):
        warnings.warn(
            f"faithfulness is undefined here: the metric's mean over the examples is {float(full):.6g} for the full "
            f"circuit and {float(empty):.6g} for the empty one (the metric is not finite on one of those runs for "
            "an example it is finite on the unpatched runs); NaN is returned",
            RuntimeWarning,
            stacklevel=3,
        )
        return torch.full_like(vals, float("nan"))
    if float(abs(den)) > 0:
        scale = max(float(abs(full)), float(abs(empty)))
        level = max(1e-6, _FAITH_GAP_ULPS * torch.finfo(dtype).eps)
        if float(abs(den)) <= level * scale:
            half = dtype in (torch.float16, torch.bfloat16)
            warnings.warn(
                f"faithfulness divides by a gap at rounding level: the metric's mean is {float(full):.9g} "
                f"with no edge patched and {float(empty):.9g} with every edge patched (a difference of "
                f"{float(abs(den)) / scale:.2g} of its size"
                + (f", at most {level:.2g}, the rounding level of the model's {dtype}" if half else "")
                + "), so the values returned are mostly rounding; choose prompts or an ablation that move the "
                + ("metric, or pass model.float()" if half else "metric"),
                RuntimeWarning,
                stacklevel=3,
            )
        return (vals - empty) / den
    warnings.warn(
        f"faithfulness is undefined here: the metric's mean over the examples is the same ({float(full):.6g}) with "
        "every edge patched and with none (the clean and corrupted prompts, or the ablation, leave it unchanged); NaN is "
        "returned",
        RuntimeWarning,
        stacklevel=3,
    )
    return torch.full_like(vals, float("nan"))


def faithfulness(
    model,
    edges,
    clean: torch.Tensor,
    corrupted: torch.Tensor | None = None,
    *,
    metric,
    mode: str = "noise",
    ablation: str = "resample",
    graph: EdgeGraph | None = None,
    mean_mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    max_batch: int | None = None,
    memory_budget: float = 1e9,
    max_memory: int | None = None,
):
    """Faithfulness ``(M_circuit - M_empty) / (M_full - M_empty)`` of a circuit (or a batch of circuits).

    ``M`` is the mean of ``metric`` over the examples (those whose metric is finite on the clean and the base run:
    an example whose metric is NaN or infinite there is left out, with a warning naming it). Noising (default): ``M_circuit`` is the clean run with every edge
    *outside* the circuit ablated, ``M_full`` the clean run, ``M_empty`` the run with every edge ablated.
    Denoising: the corrupted run with the circuit's edges restored from the clean run (``M_full`` = clean,
    ``M_empty`` = corrupted, for resample ablation).

    Parameters
    ----------
    model, edges, clean, corrupted, metric, mode, ablation, graph, mean_mask, attention_mask
        As in :func:`patch_edges`.
    max_batch : int, optional
        Circuits (edge sets) evaluated per forward; default: as many as ``memory_budget`` allows.
    memory_budget : float
        As in :func:`patch_edges`.
    max_memory : int, optional
        ``memory_budget`` under :mod:`pypattern.patching`'s name, as in :func:`patch_edges`.

    Returns
    -------
    float for one circuit, Tensor ``(C,)`` on the CPU for a batch (same forms of ``edges`` as
    :func:`patch_edges`).
    """
    memory_budget = _memory_setting(memory_budget, max_memory)
    corrupted, mean_mask = _reference_prompts(corrupted, ablation, mean_mask, mode)
    clean, corrupted, attention_mask = _read_prompts(clean, corrupted, attention_mask)
    corrupted, ablation, mean_mask = corruption_args(corrupted, ablation, mean_mask, mode, "faithfulness")
    model = _converted(model, "faithfulness")
    check_graph_arg(graph)
    graph, masks, single = _edge_sets(model, edges, graph, clean)
    engine, info = prepare_runs(
        model,
        graph,
        clean,
        corrupted,
        metric,
        mode,
        ablation,
        max_batch=max_batch,
        memory_budget=memory_budget,
        call="faithfulness",
        mean_mask=mean_mask,
        attention_mask=attention_mask,
    )
    keep = _measured(info["m_clean"], info["m_base"], mode)
    E = len(graph)
    ends = torch.stack([torch.ones(E, dtype=torch.bool), torch.zeros(E, dtype=torch.bool)])
    # the means on the CPU (a GPU model's too): C + 2 numbers, moved once
    vals = _example_mean(_widen(engine.run(_circuit_to_patch(torch.cat([masks, ends]), mode))), keep)
    f = _faith(vals[:-2], vals[-2], vals[-1], engine.dtype)
    return float(f[0]) if single else f


def _listed(name: str, values) -> list:
    """``values`` (``counts`` or ``fractions``) as a non-empty list, else an error naming ``name``."""
    if isinstance(values, str | bytes | dict) or (
        isinstance(values, torch.Tensor | np.ndarray) and values.ndim != 1
    ):
        values = None
    if isinstance(values, torch.Tensor):  # its numbers, as a numpy array's (0-d tensors are no ints)
        values = values.tolist()
    try:
        out = list(values)
    except TypeError:
        out = None
    if out is None:
        raise TypeError(
            f"{name}={values!r} is not valid; give a sequence of numbers (one per point of the curve)"
        )
    if not out:
        raise ValueError(f"{name} is empty; give at least one point of the curve")
    return out


def _counts(E: int, fractions, counts) -> torch.Tensor:
    """The numbers of edges kept at the curve's points: ``counts``, or ``fractions`` of ``E`` rounded; sorted,
    each once."""
    if counts is not None:
        counts = _listed("counts", counts)
        bad = [c for c in counts if isinstance(c, bool) or not isinstance(c, int | np.integer)]
        if bad:
            raise ValueError(f"counts must be ints (numbers of edges kept); got {bad[:3]}")
        c = torch.as_tensor([int(x) for x in counts], dtype=torch.long)
        if bool(((c < 0) | (c > E)).any()):
            raise ValueError(f"counts must lie in 0..{E}; got {c.tolist()}")
        return torch.unique(c)
    fractions = _listed("fractions", fractions)
    bad = [
        f
        for f in fractions
        if isinstance(f, bool) or not isinstance(f, int | float | np.integer | np.floating)
    ]
    if bad:
        raise ValueError(f"fractions must be numbers (fractions of the edges kept); got {bad[:3]}")
    fr = torch.as_tensor([float(f) for f in fractions], dtype=torch.float64)
    if not bool(((fr >= 0) & (fr <= 1)).all()):  # NaN fails both
        raise ValueError(f"fractions must lie in [0, 1]; got {fr.tolist()}")
    return torch.unique(torch.round(fr * E).long())


DEFAULT_FRACTIONS = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)


def _curve_runs(engine, masks: torch.Tensor, quiet: bool, checkpoint, fp) -> tuple[torch.Tensor, float]:
    """The metric of each patched run ``masks (C, num_edges)``, ``(C, batch)`` (a 16-bit model's in float32): with
    a ``checkpoint``, in blocks of whole engine batches with a progress bar, those finished written every 30 s, at
    the end and when the runs stop on an exception or Ctrl-C, and read back by a call of the same run (``fp``);
    without, in one engine call. Also the seconds the runs read back took."""
    from .. import io

    C = masks.shape[0]
    dtype = _widen(torch.empty(0, dtype=torch.promote_types(engine.dtype, torch.float32))).dtype
    values = torch.empty(C, engine.B, dtype=dtype, device=engine.device)
    done, before = 0, 0.0
    if checkpoint is not None and os.path.exists(checkpoint):
        arrays, meta = io.load(checkpoint, kind=_CURVE_KIND)
        check_checkpoint_version(meta, checkpoint, _CURVE_VERSION)
        io.check_fingerprint(meta.get("fingerprint"), fp, checkpoint)
        done, before, got = meta.get("done"), meta.get("seconds"), arrays.get("values")
        if (
            isinstance(done, bool)
            or not isinstance(done, int)
            or not 0 <= done <= C
            or isinstance(before, bool)
            or not isinstance(before, int | float)
            or not 0 <= before < math.inf
            or got is None
            or got.shape != (done, engine.B)
            or got.dtype != torch.empty(0, dtype=dtype).numpy().dtype
        ):
            raise io.FormatError(
                f"checkpoint {os.fspath(checkpoint)!r} is damaged: it holds no metric values ({str(dtype)[6:]}, "
                f"up to {C} circuits x {engine.B} prompts) of this curve; delete it to start afresh"
            )
        values[:done] = torch.from_numpy(got).to(values.device)
    # with a checkpoint, one engine batch per run call (the blocks written); without, every circuit in one call
    block = C if checkpoint is None else max(1, engine.chunk_size())
    t0 = saved = time.perf_counter()
    with (
        engine.fixed_weights(),
        sigterm_as_interrupt(),  # SIGTERM writes the finished blocks, as Ctrl-C does
        # a bar over the blocks (without a checkpoint, one engine call: nothing to count)
        progress_bar(
            quiet or done >= C or checkpoint is None,
            total=C,
            initial=done,
            desc="pruning curve",
            unit="circuit",
        ) as bar,
    ):

        def save(done: int) -> None:
            io.save(
                checkpoint,
                {"values": values[:done].cpu().numpy()},
                {
                    CHECKPOINT_VERSION_KEY: _CURVE_VERSION,
                    "fingerprint": fp,
                    "done": done,
                    "seconds": before + time.perf_counter() - t0,
                },
                kind=_CURVE_KIND,
            )

        def run_block(start: int, stop: int) -> None:
            values[start:stop] = _widen(engine.run(masks[start:stop]))

        # a new file is written even when no block runs (a curve of no circuits left)
        unsaved = checkpoint is not None and not os.path.exists(checkpoint)
        _run_in_blocks(done, C, block, run_block, None if checkpoint is None else save, bar, saved, unsaved)
    return values, before


def _curve_frame(scores: dict, mode, ablation) -> tuple:
    """:func:`pruning_curve`'s ``mode`` and ``ablation``: as given, else those the ``EdgeScores`` among ``scores``
    were computed in (``"noise"`` and ``"resample"`` without any); scores of different frames need the setting
    given, naming them."""
    for name, default in (("mode", "noise"), ("ablation", "resample")):
        if (mode if name == "mode" else ablation) is not None:
            continue
        frames = {
            k: getattr(sc, name)
            for k, sc in scores.items()
            if isinstance(sc, EdgeScores) and isinstance(getattr(sc, name), str)
        }
        values = set(frames.values())
        if len(values) > 1:
            listed = ", ".join(f"scores[{k!r}].{name}={v!r}" for k, v in frames.items())
            raise ValueError(
                f"pruning_curve: {name} is not given and the scores were computed with different ones ({listed}): "
                f"give {name}=... (the frame every curve is evaluated in)"
            )
        value = values.pop() if values else default
        if name == "mode":
            mode = value
        else:
            ablation = value
    return mode, ablation


def pruning_curve(
    model,
    scores,
    clean: torch.Tensor,
    corrupted: torch.Tensor | None = None,
    *,
    metric,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    counts: Sequence[int] | None = None,
    mode: str | None = None,
    ablation: str | None = None,
    graph: EdgeGraph | None = None,
    mean_mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    max_batch: int | None = None,
    memory_budget: float = 1e9,
    max_memory: int | None = None,
    quiet: bool = False,
    checkpoint: str | os.PathLike | None = None,
) -> PruningCurve:
    """Faithfulness of the circuits made of the top-``n`` edges by ``|score|``, for each ``n``.

    Parameters
    ----------
    model, clean, corrupted, metric, graph, mean_mask, attention_mask
        As in :func:`patch_edges`.
    scores : EdgeScores, Tensor ``(num_edges,)``, or a dict ``{name: EdgeScores or Tensor}`` (one curve each);
        scores holding NaN are refused
    mode, ablation : str, optional
        As in :func:`patch_edges`. Not given, the frame the ``EdgeScores`` were computed in (their ``mode`` and
        ``ablation``), so the circuits are evaluated as they were scored; ``"noise"`` and ``"resample"`` for
        tensors of scores. ``EdgeScores`` of different frames need both given (else a ValueError naming them).
        Given, they are used as given, whatever frame the scores were computed in.
    fractions : sequence of float
        Fractions of the edges kept (rounded to counts).
    counts : sequence of int, optional
        Numbers of edges kept, each in ``0..num_edges``, instead of ``fractions`` (giving both is refused).
    max_batch : int, optional
        Points of the curves (circuits) evaluated per forward; default: as many as ``memory_budget`` allows.
    memory_budget : float
        As in :func:`patch_edges`.
    max_memory : int, optional
        ``memory_budget`` under :mod:`pypattern.patching`'s name, as in :func:`patch_edges`.
    quiet : bool
        No progress bar (by default, with a ``checkpoint``, one counts the circuits evaluated, shown once a call has
        run for two seconds).
    checkpoint : str, optional
        A file the metric values of the circuits evaluated so far are written to (atomically, no pickle). With it
        the circuits are evaluated in blocks of one engine batch (without it, all in one engine call, which may
        round differently, as a batch's composition can): the blocks finished are written every 30 seconds, at the
        end, and when the call is stopped (Ctrl-C, SIGTERM or an error). A call with the same model weights,
        prompts, metric, graph, mode, ablation, scores and points resumes from it, evaluating only the circuits not
        done, with the same curves, bit for bit, as an uninterrupted call with a checkpoint (and the same
        ``max_batch`` and ``memory_budget``; other ones resume too, the remaining blocks then equal to rounding); a
        call that differs in any of them is refused (:class:`pypattern.io.FingerprintMismatch` naming what
        differs). The finished call stays in it: the same call again returns its curves without a patched run.

    The metric is averaged over the examples as in :func:`faithfulness` (an example whose metric is not finite on
    the clean or the base run is left out).

    The points of the curve (``counts`` given or rounded from ``fractions``) are sorted and each is evaluated once
    (a repeated count or two fractions rounding to the same count make one point); an empty sequence is refused.

    Returns
    -------
    PruningCurve
        Every point of every curve is one patched run, all evaluated in batches.
    """
    memory_budget = _memory_setting(memory_budget, max_memory)
    model = _converted(model, "pruning_curve")
    check_graph_arg(graph)
    check_checkpoint_arg(checkpoint, quiet)
    one = not isinstance(scores, dict)
    if one:
        name = scores.method if isinstance(scores, EdgeScores) else "scores"
        scores = {name: scores}
    if not scores:
        raise ValueError("scores is an empty dict: give at least one set of edge scores ({name: EdgeScores})")
    for name, sc in scores.items():
        if not isinstance(sc, EdgeScores | torch.Tensor | np.ndarray | list | tuple):
            label = "scores" if one else f"scores[{name!r}]"
            hint = (
                " (a Circuit is one set of edges: give it to faithfulness(), or its scores, circuit.scores)"
                if isinstance(sc, Circuit)
                else ""
            )
            raise TypeError(
                f"{label} is a {type(sc).__name__}; give EdgeScores (edge_attribution's result), a tensor of one "
                f"score per edge, or a dict of them{hint}"
            )
    mode, ablation = _curve_frame(scores, mode, ablation)
    corrupted, mean_mask = _reference_prompts(corrupted, ablation, mean_mask, mode)
    clean, corrupted, attention_mask = _read_prompts(clean, corrupted, attention_mask)
    corrupted, ablation, mean_mask = corruption_args(corrupted, ablation, mean_mask, mode, "pruning_curve")
    first_name, first = next(iter(scores.items()))
    graph_from = "graph="
    if graph is None:
        if isinstance(first, EdgeScores):
            graph, graph_from = first.graph, ("scores" if one else f"scores[{first_name!r}]")
        else:
            graph, graph_from = (
                EdgeGraph.from_model(model),
                f"scores[{first_name!r}] (a tensor: edges(model))",
            )
    E = len(graph)
    # EdgeScores carry their graph: one of another shape than the graph used is refused naming both
    for name, sc in scores.items():
        if isinstance(sc, EdgeScores) and (len(sc.graph) != E or sc.graph.per_position != graph.per_position):
            label = "scores" if one else f"scores[{name!r}]"
            raise ValueError(
                f"{label} is on a graph of {len(sc.graph)} edges (per_position={sc.graph.per_position}), "
                f"{graph_from} on one of {E} (per_position={graph.per_position}): give scores of one graph"
            )
    if counts is not None and fractions is not DEFAULT_FRACTIONS:
        raise ValueError(
            "fractions= and counts= are both given; the curve's points are one or the other: give counts (numbers "
            "of edges kept) or fractions (of the edges), not both"
        )
    cnt = _counts(E, fractions, counts)
    masks, names, given = [], [], {}
    for name, sc in scores.items():
        s = (sc.scores if isinstance(sc, EdgeScores) else torch.as_tensor(sc)).cpu()
        given[str(name)] = s
        label = "scores" if one else f"scores[{name!r}]"
        if s.shape != (E,):
            T = clean.shape[-1] if isinstance(clean, torch.Tensor) and clean.dim() else None
            hint = (
                f" (scores over {s.shape[0]} edges are the per-position graph's over {T} positions: give "
                f"graph=edges(model, per_position=True, seq_len={T}), or EdgeScores, which carry their graph)"
                if T and not graph.per_position and s.dim() == 1 and s.shape[0] == E * T
                else ""
            )
            raise ValueError(f"{label} has shape {tuple(s.shape)}; the graph has {E} edges{hint}")
        order = rank_order(s, label, graph)
        rank = torch.empty(E, dtype=torch.long)
        rank[order] = torch.arange(E)
        masks.append(rank[None, :] < cnt[:, None])
        names.append(name)
    engine, info = prepare_runs(
        model,
        graph,
        clean,
        corrupted,
        metric,
        mode,
        ablation,
        max_batch=max_batch,
        memory_budget=memory_budget,
        call="pruning_curve",
        mean_mask=mean_mask,
        attention_mask=attention_mask,
    )
    keep = _measured(info["m_clean"], info["m_base"], mode)
    ends = torch.stack([torch.ones(E, dtype=torch.bool), torch.zeros(E, dtype=torch.bool)])
    allm = torch.cat(masks + [ends])
    t0 = time.perf_counter()
    fp = None
    if checkpoint is not None:
        fp = _run_fingerprint(
            "pruning curve",
            engine,
            graph,
            model,
            clean,
            corrupted,
            metric,
            mode,
            ablation,
            scores=given,
            counts=cnt.tolist(),
        )
    raw, before = _curve_runs(engine, _circuit_to_patch(allm, mode), quiet, checkpoint, fp)
    # the curves live on the CPU (a GPU model's too: PruningCurve is saved and plotted from numpy), moved once
    vals = _example_mean(raw, keep)
    seconds = before + time.perf_counter() - t0
    full, empty = vals[-2], vals[-1]
    n = len(cnt)
    faith, mvals = {}, {}
    for i, name in enumerate(names):
        v = vals[i * n : (i + 1) * n]
        mvals[name] = v
        faith[name] = _faith(v, full, empty, engine.dtype)
    return PruningCurve(
        counts=cnt,
        num_edges=E,
        faithfulness=faith,
        metric_values=mvals,
        m_full=float(full),
        m_empty=float(empty),
        mode=mode,
        ablation=ablation,
        metric=_metric_name(metric),
        info={
            "seconds": seconds,
            "num_runs": int(allm.shape[0]),
            "attention_mask": attention_mask is not None,
        },
    )


# ----------------------------------------------------------------------------------------------- ACDC


def _metric_rows(engine: EdgeEngine) -> torch.Tensor:
    """The positions at which the metric reads the logits (any example)."""
    return torch.tensor([engine.pos]) if engine.uniform else torch.unique(engine.pos).cpu()


class _Reach:
    """Which destination inputs (at which positions) can still change the metric, given the edges decided so far.

    An edge ``u -> v`` carries ``u``'s output in the run being evaluated when it is not patched (noising: a kept
    edge; denoising: an edge left out of the circuit) and the fixed value ``A_u`` when patched. A source ``u`` (at
    position ``t``) reaches the metric when one of its outgoing edges (at ``t``) carries its output into a
    destination input that reaches the metric. A head's query input and an MLP's input at ``t`` reach it through
    their own node at ``t``; a key or value input at ``t`` through the query heads of its group at every position
    ``>= t`` (causal attention); the logits at the metric's positions. Without positions everything is at one
    position. This over-approximates (a sliding window reaches fewer positions): a destination said to reach the
    metric is tested as usual.
    """

    def __init__(self, graph: EdgeGraph, engine: EdgeEngine, mode: str) -> None:
        self.g, self.mode = graph, mode
        P = graph.n_pos or 1
        self.epos = graph.pos_idx if graph.per_position else torch.zeros(len(graph), dtype=torch.long)
        self.live = torch.zeros(graph.n_dst, P, dtype=torch.bool)  # (destination input, position)
        logits = graph.dst_names.index("logits")
        if graph.per_position:
            self.live[logits, _metric_rows(engine)] = True
        else:
            self.live[logits] = True
        src_of = {n: i for i, n in enumerate(graph.src_names)}
        G = graph.n_heads // graph.n_kv_heads
        self.writers = []
        for node in graph.dst_node:
            if node == "logits":
                self.writers.append(None)
            elif node in src_of:
                self.writers.append(torch.tensor([src_of[node]]))
            else:  # a shared key/value head: the query heads of its group
                layer, kv = node[1:].split("KV")
                hs = range(int(kv) * G, (int(kv) + 1) * G)
                self.writers.append(torch.tensor([src_of[f"L{layer}H{h}"] for h in hs]))

    def update(self, d: int, keep: torch.Tensor) -> torch.Tensor:
        """Positions ``(P,)`` at which destination input ``d`` reaches the metric; every destination read after
        ``d`` must be decided."""
        g = self.g
        w = self.writers[d]
        if w is not None:
            carries = keep if self.mode == "noise" else ~keep
            out = carries & self.live[g.dst_idx, self.epos] & torch.isin(g.src_idx, w)
            at = torch.zeros(self.live.shape[1], dtype=torch.bool)
            at[self.epos[out]] = True
            if g.per_position and g.dst_qkv[d] in ("k", "v"):  # read by the queries at t and after
                at = at.flip(0).cummax(0).values.flip(0)
            self.live[d] = at
        return self.live[d]


def acdc(
    model,
    clean: torch.Tensor,
    corrupted: torch.Tensor | None = None,
    *,
    metric,
    threshold: float,
    mode: str = "noise",
    ablation: str = "resample",
    per_position: bool = False,
    graph: EdgeGraph | None = None,
    mean_mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    max_batch: int | None = None,
    memory_budget: float = 1e9,
    max_memory: int | None = None,
    quiet: bool = False,
    checkpoint: str | None = None,
) -> Circuit:
    """ACDC-style greedy pruning (Conmy et al. 2023).

    Start from the full circuit (every edge). Visit the destination inputs in reverse topological order (the
    logits, then the last layer's MLP input, then its heads' query, key and value inputs, ... down to layer 0);
    for each, try its incoming edges one at a time in reverse graph order (sources in reverse topological order;
    on a per-position graph, positions from the last to the first and sources in reverse order within each):
    remove the edge if the mean metric (over the examples, as in :func:`faithfulness`) of the circuit without it is lower than the current circuit's by less
    than ``threshold`` (``M_current - M_without < threshold``; an edge whose removal raises the metric is removed
    too), and keep the new circuit. A drop within 16 roundings of the metric (relative to it, in the metric's
    dtype: float32 for a 16-bit model) is read as 0, so with ``threshold=0`` an edge whose removal changes the
    metric only by the metric's own rounding is kept, wherever in a batch its test ran. Rounding that the model
    amplifies can be larger (a norm over an input ablated to all but zero: drops of 1e-13 in float64) and then its
    sign decides; a small positive ``threshold`` above it removes every such edge alike. A 16-bit model's metric
    is read from activations rounded to its dtype, far coarser than this tolerance: such a model is run with a
    warning (as in every circuit function); pass ``model.float()`` for a search that rounding does not decide.

    With ``threshold > 0``, the edges into a destination input that can no longer change the metric are removed
    without a test (their removal changes nothing, so the test would remove them): noising, a node none of whose
    outgoing edges is kept into an input that still matters; denoising, a node all of whose outgoing edges into
    inputs that still matter are in the circuit (the circuit's edges read its clean value; the others read its
    output in the patched run). On a per-position graph this holds per position: a node's output at position ``t``
    is read at ``t`` only, a key or value input at ``t`` matters through its heads' queries at ``t`` and after, and
    the logits only at the metric's positions.

    Each test is one patched forward starting at the destination's layer (causal reuse); the tests for the
    remaining inputs of one destination are batched speculatively (a batch evaluated against the current circuit;
    the first removal invalidates the rest of it, which is re-evaluated), which gives the same decisions as testing
    one at a time.

    Parameters
    ----------
    model, clean, corrupted, metric, ablation, graph, mean_mask, attention_mask
        As in :func:`patch_edges`.
    threshold : float
        The largest drop of the metric at which an edge is removed, ``>= 0``, in units of the metric (e.g. logit
        difference); 0 keeps every edge whose removal lowers the metric measurably.
    mode : {"noise", "denoise"}
        Noising (ACDC as Conmy et al. run it): a circuit is evaluated on the clean run with every edge outside it
        ablated; denoising: on the corrupted run with its edges restored from the clean run. In the denoising frame
        the search starts from the full circuit, which is the clean run: an edge ``u -> v`` left out of it then
        reads ``u``'s output in the patched run, which is still ``u``'s clean output as long as ``u``'s own inputs
        are restored, so its removal changes nothing and its test reads a drop of exactly 0; visited from the
        logits down, most edges are decided this way before any of their sources' inputs is removed, by the
        threshold alone (0 keeps them, any positive threshold removes them). A warning says so when most tested
        drops are exactly 0; prefer ``mode="noise"`` (or rank edges with :func:`edge_attribution` in the denoising
        frame and read :func:`pruning_curve`).
    per_position : bool
        Prune a per-position graph over the prompts' length (or give ``graph=edges(model, per_position=True,
        seq_len=T)``).
    max_batch : int, optional
        Edge tests (circuits, one edge removed each) evaluated per forward; default: as many as ``memory_budget``
        allows.
    memory_budget : float
        As in :func:`patch_edges`.
    max_memory : int, optional
        ``memory_budget`` under :mod:`pypattern.patching`'s name, as in :func:`patch_edges`.
    quiet : bool
        No progress bar (by default one counts the destination inputs visited, shown once a call has run for
        two seconds).
    checkpoint : str, optional
        A file the search's state is written to (atomically, no pickle): when a destination input is done and 30
        seconds have passed since the last write, at the end, and when the search is stopped (a stop by Ctrl-C or
        SIGTERM writes it too, as does an error: the state after the last destination input done); a call with the
        same model weights, prompts (and attention mask), metric, graph, mode, ablation and threshold resumes from
        it with the same result as an uninterrupted call. A call that differs in any of them is refused
        (:class:`pypattern.io.FingerprintMismatch` naming what differs). The finished search stays in it: the same
        call again returns its circuit at once.

    Returns
    -------
    Circuit
        The kept edges, with ``scores`` = the metric drop measured when each edge was tested (0 for edges removed
        without a test) and ``faithfulness`` of the result; ``info`` holds the number of patched runs
        (``num_runs``) and of the edges removed without a test (``num_untested``), and whether the prompts ran under
        an attention mask (``attention_mask``, as :mod:`pypattern.patching`'s results record it).
    """
    memory_budget = _memory_setting(memory_budget, max_memory)
    corrupted, mean_mask = _reference_prompts(corrupted, ablation, mean_mask, mode)
    clean, corrupted, attention_mask = _read_prompts(clean, corrupted, attention_mask)
    corrupted, ablation, mean_mask = corruption_args(corrupted, ablation, mean_mask, mode, "acdc")
    model = _converted(model, "acdc")
    check_graph_arg(graph)
    if isinstance(threshold, torch.Tensor) and threshold.numel() == 1 and threshold.dtype != torch.bool:
        threshold = threshold.item()  # a 0-d (or one-element) tensor of a number
    if not is_real(threshold) or not math.isfinite(float(threshold)):
        raise ValueError(f"threshold={threshold!r} is not valid; give a finite number in units of the metric")
    threshold = float(threshold)
    if threshold < 0:
        raise ValueError(
            f"threshold={threshold!r} is not valid: it is the largest drop of the metric at which an edge is removed, "
            "a number >= 0 in units of the metric (0 keeps every edge whose removal lowers the metric measurably)"
        )
    threshold = float(threshold)
    check_checkpoint_arg(checkpoint, quiet)  # before any work
    T = _seq_len(clean)
    graph = _graph_for(model, graph, per_position, T)
    t0 = time.perf_counter()
    engine, info = prepare_runs(
        model,
        graph,
        clean,
        corrupted,
        metric,
        mode,
        ablation,
        max_batch=max_batch,
        memory_budget=memory_budget,
        call="acdc",
        mean_mask=mean_mask,
        attention_mask=attention_mask,
    )
    E = len(graph)
    keep = torch.ones(E, dtype=torch.bool)
    measured = _measured(info["m_clean"], info["m_base"], mode)

    def evaluate(
        circ: torch.Tensor,
    ) -> torch.Tensor:  # the measured examples' metrics (C, examples), on the CPU
        vals = engine.run(_circuit_to_patch(circ, mode))
        return (vals if bool(measured.all()) else vals[:, measured.to(vals.device)]).cpu()

    # the edges whose test cannot change an example's metric (rows before the first corrupted token, rows the
    # metric cannot read): the example keeps the current circuit's metric exactly, not the rounding of a patched run
    inert = engine.inert_edges()[:, measured]

    reach = _Reach(graph, engine, mode)
    state = None
    fp = None
    if checkpoint is not None:
        fp = _run_fingerprint(
            "acdc", engine, graph, model, clean, corrupted, metric, mode, ablation, threshold=threshold
        )
        if os.path.exists(checkpoint):
            state = _acdc_resume(checkpoint, fp, graph, reach)
    # one fixed-weights block for every test: layouts and packed weights made once
    first = graph.n_dst if state is None else state["next"]
    with (
        engine.fixed_weights(),
        sigterm_as_interrupt(),  # SIGTERM writes the state so far, as Ctrl-C does
        progress_bar(
            quiet or first == 0, total=graph.n_dst, initial=graph.n_dst - first, desc="ACDC", unit="input"
        ) as bar,
    ):
        if state is None:
            rows = evaluate(torch.stack([torch.ones(E, dtype=torch.bool), torch.zeros(E, dtype=torch.bool)]))
            ends = rows.mean(1)
            m_full, m_empty = float(ends[0]), float(ends[1])
            m_cur, cur = m_full, rows[0]
            drop = torch.zeros(E, dtype=torch.float64)
            runs, untested = 2, 0
            skipped = torch.zeros(E, dtype=torch.bool)
        else:
            keep, drop, skipped = state["keep"], state["drop"], state["skipped"]
            m_full, m_empty, m_cur = state["m_full"], state["m_empty"], state["m_cur"]
            runs, untested = state["runs"], state["untested"]
            cur = state["cur"]
            if cur is None or cur.shape != (int(measured.sum()),):  # a state without the examples' metrics
                cur = evaluate(keep[None])[0]
        window = engine.chunk_size()
        # drops within a few roundings of the metric (float32 for a 16-bit model's metrics) count as 0: a circuit
        # evaluated at another place in a batch may round differently, and threshold 0 must not decide on that
        tie = _ACDC_TIE_ULPS * torch.finfo(torch.promote_types(engine.dtype, torch.float32)).eps
        saved = time.perf_counter()
        done = None  # the state once the last finished destination input was decided, not yet written
        try:
            for d in reversed(range(first)):
                m_cur, cur, runs, untested = _acdc_destination(
                    d,
                    graph,
                    reach,
                    keep,
                    drop,
                    evaluate,
                    window,
                    threshold,
                    tie,
                    m_cur,
                    runs,
                    untested,
                    inert,
                    cur,
                    skipped,
                )
                if checkpoint is None:
                    pass
                elif d == 0 or time.perf_counter() - saved >= _CHECKPOINT_EVERY_S:
                    saved, done = time.perf_counter(), None
                    _acdc_save(
                        checkpoint, fp, d, keep, drop, reach.live, m_full, m_empty, m_cur, runs, untested, cur,
                        skipped,
                    )  # fmt: skip
                else:
                    done = (
                        d, keep.clone(), drop.clone(), reach.live.clone(), m_cur, runs, untested, cur,
                        None if skipped is None else skipped.clone(),
                    )  # fmt: skip
                if bar is not None:
                    bar.update(1)
        except BaseException:  # stopped (Ctrl-C, an error): the destination inputs decided so far are written
            if done is not None:
                nxt, k, dr, live, mc, r, u, c, sk = done
                _acdc_save(checkpoint, fp, nxt, k, dr, live, m_full, m_empty, mc, r, u, c, sk)
            raise
    tested, zeros, counted = _acdc_tested_zeros(graph, drop, untested, skipped, attention_mask, clean)
    if mode == "denoise" and tested and zeros > tested / 2:
        warnings.warn(
            f"acdc(mode='denoise'): {zeros} of the {tested} edges tested{counted} changed the metric by exactly 0 "
            "when left out: the search starts from the full circuit, the clean run, where an edge out of a node "
            "whose own inputs are still restored carries that node's clean output either way, so its test cannot "
            "see it and "
            f"threshold={threshold:g} alone decided it (0 keeps such edges, any positive threshold removes them); "
            "use mode='noise' for ACDC's search, or rank the edges with edge_attribution(mode='denoise') and read "
            "pruning_curve",
            RuntimeWarning,
            stacklevel=2,
        )
    m3 = torch.tensor([m_cur, m_full, m_empty], dtype=torch.float64)
    f = float(_faith(m3[0], m3[1], m3[2], engine.dtype))  # NaN, with a warning, where undefined
    return Circuit(
        graph=graph,
        mask=keep,
        scores=drop.to(torch.promote_types(engine.dtype, torch.float32)),  # a 16-bit model's drops in float32
        faithfulness=f,
        method="acdc",
        info={
            "threshold": threshold,
            "num_runs": runs,
            "num_untested": untested,
            "seconds": time.perf_counter() - t0,
            "metric": _metric_name(metric),
            "m_circuit": m_cur,
            "m_full": m_full,
            "m_empty": m_empty,
            "mode": mode,
            "ablation": ablation,
            "attention_mask": attention_mask is not None,
        },
    )


# ACDC's drops within this many roundings (of the metric's dtype, relative to the metric) are ties (0)
_ACDC_TIE_ULPS = 16


def _acdc_tested_zeros(graph, drop, untested, skipped, attention_mask, clean) -> tuple[int, int, str]:
    """The counts of ACDC's denoising warning: ``(tested, zeros, what)``, the edges tested and those among them
    whose test read a drop of exactly 0. On a per-position graph under an attention mask, only edges at a position
    real in some prompt count (an edge at a position every prompt pads cannot change the metric: counting it would
    make a padded batch's counts differ from its prompts' unpadded); ``what`` then says so in the warning (empty
    otherwise). ``skipped``: the edges removed without a test (None when unknown: every edge counts)."""
    from ..patching.api import patching_mask

    E = len(graph)
    counted = torch.ones(E, dtype=torch.bool)
    what = ""
    if graph.per_position and attention_mask is not None and skipped is not None:
        keep = patching_mask(attention_mask, tuple(clean.shape))  # (checked by the runs)
        real = keep.any(0)[graph.pos_idx]
        if not bool(real.all()):
            counted = real
            what = (
                f" at real tokens (the {int((~real).sum())} edges at positions that attention_mask marks as padding "
                "in every prompt, which cannot change the metric, are not counted)"
            )
    if skipped is None:  # an edge removed without a test keeps its drop of 0
        return E - untested, int((drop == 0).sum()) - untested, what
    tested = counted & ~skipped
    return int(tested.sum()), int((tested & (drop == 0)).sum()), what


def _acdc_destination(
    d, graph, reach, keep, drop, evaluate, window, threshold, tie, m_cur, runs, untested, inert, cur, skipped=None
):  # fmt: skip
    """ACDC's tests of the edges into destination input ``d`` (updating ``keep`` and ``drop`` in place): each edge,
    latest source first, is left out of the current circuit and removed when the metric moves by less than
    ``threshold``; up to ``window`` candidates are evaluated per batch. ``cur``: the current circuit's metric per
    measured example (mean ``m_cur``); an edge that cannot change an example's metric (``inert (E, examples)``)
    leaves it at ``cur`` exactly, and one that can change none of them moves the mean by exactly 0. Returns the new
    ``(m_cur, cur, runs, untested)``. ``skipped (E,)`` (bool, or None): the edges removed without a test are set
    in it."""
    cand = (graph.dst_idx == d).nonzero().flatten().flip(0)
    if threshold > 0:
        live = reach.update(d, keep)[reach.epos[cand]]
        keep[cand[~live]] = False
        untested += int((~live).sum())
        if skipped is not None:
            skipped[cand[~live]] = True
        cand = cand[live]
    remaining = cand.tolist()
    while remaining:
        batch = remaining[:window]
        trial = keep[None].repeat(len(batch), 1)
        trial[torch.arange(len(batch)), torch.tensor(batch)] = False
        rows = evaluate(trial)
        still = inert[torch.tensor(batch)]  # (batch, examples)
        rows = torch.where(still, cur[None], rows)
        vals = rows.mean(1)
        runs += len(batch)
        removed_at = None
        for i, e in enumerate(batch):
            val = m_cur if bool(still[i].all()) else float(vals[i])
            delta = m_cur - val
            if abs(delta) <= tie * max(abs(m_cur), abs(val)):
                delta = 0.0  # a difference at rounding level: the edge changes nothing measurable
            drop[e] = delta
            if delta < threshold:
                keep[e] = False
                m_cur, cur = val, rows[i]
                removed_at = i
                break
        remaining = remaining[len(batch) if removed_at is None else removed_at + 1 :]
    return m_cur, cur, runs, untested


def _acdc_save(
    path, fp, nxt, keep, drop, live, m_full, m_empty, m_cur, runs, untested, cur, skipped=None
) -> None:
    """ACDC's state once the destination inputs from ``nxt`` on are decided (the next to visit is ``nxt - 1``);
    ``cur``: the current circuit's metric per measured example; ``skipped``: the edges removed without a test
    (bool ``(E,)``, or None when unknown)."""
    from .. import io

    io.save(
        path,
        {
            "keep": keep.numpy(),
            "drop": drop.numpy(),
            "live": live.numpy(),
            "cur": cur.detach().to(torch.float64).numpy(),
            **({} if skipped is None else {"skipped": skipped.numpy()}),
        },
        {
            CHECKPOINT_VERSION_KEY: _ACDC_VERSION,
            "fingerprint": fp,
            "next": int(nxt),
            "m_full": m_full,
            "m_empty": m_empty,
            "m_cur": m_cur,
            "runs": int(runs),
            "untested": int(untested),
            "cur_dtype": str(cur.dtype),
        },
        kind=_ACDC_KIND,
    )


def _acdc_resume(path, fp, graph: EdgeGraph, reach: _Reach) -> dict:
    """The state :func:`_acdc_save` wrote for this run (its fingerprint checked); ``reach`` takes its reach."""
    from .. import io

    arrays, meta = io.load(path, kind=_ACDC_KIND)
    check_checkpoint_version(meta, path, _ACDC_VERSION)
    io.check_fingerprint(meta.get("fingerprint"), fp, path)
    E = len(graph)
    shapes = {"keep": (E,), "drop": (E,), "live": tuple(reach.live.shape)}
    dtypes = {"keep": np.bool_, "drop": np.float64, "live": np.bool_}
    nxt = meta.get("next")
    scalars = [meta.get(k) for k in ("m_full", "m_empty", "m_cur", "runs", "untested")]
    if (
        any(
            k not in arrays or arrays[k].shape != v or arrays[k].dtype != dtypes[k] for k, v in shapes.items()
        )
        or isinstance(nxt, bool)
        or not isinstance(nxt, int)
        or not 0 <= nxt < graph.n_dst
        or any(not isinstance(v, int | float) for v in scalars)
    ):
        raise io.FormatError(f"{os.fspath(path)!r} holds no consistent ACDC state")
    reach.live.copy_(torch.from_numpy(arrays["live"]))
    m_full, m_empty, m_cur, runs, untested = scalars
    cur = None  # the current circuit's metric per example (a state written without it: computed again)
    got, kind = arrays.get("cur"), meta.get("cur_dtype")
    if got is not None and kind is not None and got.ndim == 1 and got.dtype == np.float64:
        dtype = {str(t): t for t in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}.get(
            str(kind)
        )
        cur = torch.from_numpy(got.copy()).to(dtype) if dtype is not None else None
    # the edges removed without a test (a state written without them: unknown, None)
    skipped = arrays.get("skipped")
    ok = skipped is not None and skipped.shape == (E,) and skipped.dtype == np.bool_
    skipped = torch.from_numpy(skipped.copy()) if ok and int(skipped.sum()) == int(untested) else None
    return {
        "skipped": skipped,
        "cur": cur,
        "next": nxt,
        "keep": torch.from_numpy(arrays["keep"].copy()),
        "drop": torch.from_numpy(arrays["drop"].copy()),
        "m_full": float(m_full),
        "m_empty": float(m_empty),
        "m_cur": float(m_cur),
        "runs": int(runs),
        "untested": int(untested),
    }


def circuit_from_edges(graph: EdgeGraph, edges: Iterable[Edge | str], scores=None) -> Circuit:
    """A :class:`Circuit` holding ``edges`` of ``graph`` (for drawing or saving a hand-made circuit)."""
    check_graph_arg(graph, "graph", optional=False)
    return Circuit(
        graph=graph, mask=graph.mask(edges), scores=scores, faithfulness=None, method="given", info={}
    )
