"""Circuit discovery at the level of edges.

Nodes are the embedding, every head's output and every MLP's output; an edge ``u -> v`` is ``u``'s contribution to
the input of ``v`` (a head's query, key or value input, an MLP's input, or the logits). This package provides the
edge graph (:func:`edges`), exact edge patching with causal reuse (:func:`patch_edges`), edge attribution
(:func:`edge_attribution`: EAP, EAP-IG, exact), circuit evaluation (:func:`faithfulness`, :func:`pruning_curve`)
and greedy search (:func:`acdc`). All model arithmetic goes through :class:`ModelView`, which calls the model's own
norms, rotary embedding, attention mask and MLP: every architecture pypattern's Transformer represents is covered
(converted models included: RMSNorm, rotary positions, grouped- and multi-query attention, whose key/value heads
have one key and one value input each, gated MLPs, parallel attention and MLP, missing biases, tied embeddings,
sliding windows, scaled embeddings and soft caps). Models whose heads' writes or queries are normalised together
(sandwich norms, ``qk_norm="all"``) or whose projections are clamped (``clip_qkv``) are refused by
:class:`ModelView`, naming the option. To evaluate many edge sets
on the same prompts without re-running them, build the engine once: ``engine, info = prepare_runs(model, graph,
clean, corrupted, metric)`` and call ``engine.run(masks)``.

Examples
--------
>>> import torch
>>> from pypattern.models import Transformer, TransformerConfig
>>> from pypattern.patching import LogitDiff
>>> from pypattern.circuits import edges, edge_attribution, pruning_curve
>>> model = Transformer(TransformerConfig(n_layers=2, d_model=16, n_heads=4, d_mlp=32, d_vocab=10, n_ctx=6))
>>> clean, corr = torch.randint(0, 10, (4, 6)), torch.randint(0, 10, (4, 6))
>>> metric = LogitDiff(torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6, 7, 8]))
>>> len(edges(model))
110
>>> sc = edge_attribution(model, clean, corr, metric=metric, method="eap-ig", steps=5)
>>> curve = pruning_curve(model, sc, clean, corr, metric=metric)
"""

from .api import acdc, circuit_from_edges, edge_attribution, faithfulness, patch_edges, pruning_curve
from .engine import EdgeEngine, prepare_runs
from .graph import Edge, EdgeGraph, edges
from .model_view import ModelView
from .results import Circuit, EdgeScores, PruningCurve, draw_circuit

__all__ = [
    "edges",
    "Edge",
    "EdgeGraph",
    "patch_edges",
    "edge_attribution",
    "faithfulness",
    "pruning_curve",
    "acdc",
    "circuit_from_edges",
    "EdgeScores",
    "Circuit",
    "PruningCurve",
    "draw_circuit",
    "ModelView",
    "EdgeEngine",
    "prepare_runs",
]
