"""The edge graph of a transformer: nodes that write to the residual stream and the inputs that read from it.

Source nodes (writers), in topological order: ``embed`` (token + position embedding, one node), each head's output
``L{l}H{h}`` (``z_h @ W_O[h]``), each MLP's output ``MLP{l}``. Destinations (readers): each head's query, key and
value input separately (``L{l}H{h}`` with ``qkv`` ``"q"``, ``"k"``, ``"v"``), each MLP's input ``MLP{l}`` and the
final residual read by the unembedding, ``logits``. An edge ``u -> v`` is ``u``'s contribution to ``v``'s input;
it exists when ``u`` is computed before ``v`` reads: a head of layer ``l`` feeds layer ``l``'s MLP (sequential
blocks) and every later layer; heads of one layer do not feed each other. In a parallel block (attention and MLP
reading the same residual) the MLP of layer ``l`` does not read layer ``l``'s heads.

Grouped-query and multi-query attention (``n_kv_heads < n_heads``): key/value head ``g`` is shared by query heads
``g * G .. (g + 1) * G - 1`` (``G = n_heads // n_kv_heads``). It has one key input and one value input,
``L{l}KV{g}.k`` and ``L{l}KV{g}.v``, read by the whole group (as TransformerLens splits the key/value inputs of
grouped-query attention per key/value head): patching an edge into it changes the keys or values every head of the
group attends with. Query inputs stay per head, ``L{l}H{h}.q``.

Count (``L`` layers, ``H`` heads, ``H_kv`` key/value heads, MLPs; ``n_l = 1 + l(H + 1)`` sources before layer
``l``): ``sum_l [(H + 2 H_kv) n_l + n_l + H] + (1 + L(H + 1))`` for sequential blocks (without the ``+ H`` for
parallel ones); 2 layers, 4 heads: ``12 + 5 + 72 + 10 + 11 = 110`` (102 parallel, 82 with 2 key/value heads).
With ``per_position`` every edge exists once per position (the contribution at position ``t`` to the input at
position ``t``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .._masks import zero_one_mask
from ..models.convert import converted_if_convertible
from ..models.transformer import Transformer

__all__ = ["Edge", "EdgeGraph", "UnknownEdgeError", "edges"]


class UnknownEdgeError(KeyError, ValueError):
    """An edge (or edge name) that is not in the graph: a ``KeyError`` for a lookup (:meth:`EdgeGraph.index`), a
    ``ValueError`` for an argument (``edges=`` of the circuits functions); shown as its message, unquoted."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


QKV = ("q", "k", "v")


@dataclass(frozen=True)
class Edge:
    """One edge: ``src``'s write read by ``dst``'s input (``qkv`` for a head's query/key/value input).

    ``pos`` is the position for per-position graphs, else None. ``str(edge)`` is ``"L0H1->L1H2.k"`` (and
    ``"@3"`` for position 3); :meth:`EdgeGraph.index` accepts either form.
    """

    src: str
    dst: str
    qkv: str | None = None
    pos: int | None = None

    @property
    def dst_input(self) -> str:
        """The destination input's name: ``"L1H2.k"``, ``"MLP0"`` or ``"logits"``."""
        return f"{self.dst}.{self.qkv}" if self.qkv else self.dst

    @property
    def name(self) -> str:
        p = f"@{self.pos}" if self.pos is not None else ""
        return f"{self.src}->{self.dst_input}{p}"

    def __str__(self) -> str:
        return self.name


# an edge name: source -> destination input [@position] (EdgeGraph's naming; L{l}KV{g} under grouped-query attention)
_EDGE_NAME = re.compile(r"(embed|L\d+H\d+|MLP\d+)->(L\d+H\d+\.[qkv]|L\d+KV\d+\.[kv]|MLP\d+|logits)(@\d+)?")


def is_edge_name(name: str) -> bool:
    """Whether ``name`` is spelled as an edge name (``"L0H1->L1H2.k"``, ``"embed->logits@3"``), whether or not a
    given graph has that edge."""
    return _EDGE_NAME.fullmatch(name) is not None


def _is_int(v) -> bool:
    """Whether ``v`` is an int (a Python or numpy integer, not a bool)."""
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def check_graph_arg(graph, label: str = "graph=", optional: bool = True) -> None:
    """Refuse a graph argument (passed as ``label``) that is not an :class:`EdgeGraph` (a list of edges, say)
    before anything reads it; None passes where the argument is ``optional``."""
    if isinstance(graph, EdgeGraph) or (optional and graph is None):
        return
    raise TypeError(
        f"{label} is a {type(graph).__name__}; give an EdgeGraph (edges(model), or the .graph of scores or a "
        "circuit)" + (", or leave it out" if optional else "")
    )


class EdgeGraph:
    """All edges of a model (see the module docstring), with the index arrays the engines use.

    Attributes
    ----------
    n_layers, n_heads, n_kv_heads : int
    has_mlp, parallel : bool
    n_pos : int or None
        Positions of a per-position graph (None: each edge covers every position).
    src_names : list[str]
        Source nodes in topological order; ``src_stage (n_src,)`` their stage (``-1`` for the embedding).
    dst_names : list[str]
        Destination inputs (``"L0H1.q"``, ``"MLP0"``, ``"logits"``) ordered by stage; ``dst_stage (n_dst,)``.
    stages : list[int]
        Stages with destinations, in order: ``2l`` attention of layer ``l``, ``2l + 1`` its MLP (``2l`` as well in
        a parallel block), ``2L`` the logits.
    valid : BoolTensor ``(n_src, n_dst)``
        Whether ``src -> dst`` is an edge.
    src_idx, dst_idx : LongTensor ``(num_edges,)``; pos_idx : LongTensor ``(num_edges,)`` or None
        Each edge's source, destination (and position). Edges are ordered by destination, then position, then
        source.
    """

    def __init__(
        self,
        n_layers: int,
        n_heads: int,
        has_mlp: bool = True,
        parallel: bool = False,
        n_pos: int | None = None,
        n_kv_heads: int | None = None,
    ) -> None:
        for k, v in (("n_layers", n_layers), ("n_heads", n_heads)):
            if not _is_int(v) or v < 1:
                raise ValueError(f"{k}={v!r} is not valid; give a positive int")
        if n_pos is not None and (not _is_int(n_pos) or n_pos < 1):
            raise ValueError(f"n_pos={n_pos!r} is not valid; give a positive int or None")
        for k, v in (("has_mlp", has_mlp), ("parallel", parallel)):
            if not isinstance(v, bool | np.bool_):
                raise TypeError(f"{k}={v!r} is not valid; give True or False")
        has_mlp, parallel = bool(has_mlp), bool(parallel)
        n_layers, n_heads = int(n_layers), int(n_heads)
        n_pos = None if n_pos is None else int(n_pos)
        self.n_layers, self.n_heads = n_layers, n_heads
        kv = n_heads if n_kv_heads is None else n_kv_heads
        if not _is_int(kv) or kv < 1 or n_heads % kv:  # a Python or NumPy int, not a bool
            raise ValueError(
                f"n_kv_heads={kv!r} is not valid; give a positive divisor of n_heads={n_heads} (or None)"
            )
        self.n_kv_heads = kv = int(kv)
        self.has_mlp, self.parallel, self.n_pos = has_mlp, bool(parallel and has_mlp), n_pos
        H, Hk, L = n_heads, self.n_kv_heads, n_layers
        kv_name = (lambda lay, g: f"L{lay}H{g}") if Hk == H else (lambda lay, g: f"L{lay}KV{g}")

        src_names, src_stage = ["embed"], [-1]
        dst_names, dst_node, dst_qkv, dst_stage = [], [], [], []
        for lay in range(L):
            sa = 2 * lay
            sm = 2 * lay if self.parallel else 2 * lay + 1
            for which, n in (("q", H), ("k", Hk), ("v", Hk)):
                for g in range(n):
                    nm = f"L{lay}H{g}" if which == "q" else kv_name(lay, g)
                    dst_names.append(f"{nm}.{which}")
                    dst_node.append(nm)
                    dst_qkv.append(which)
                    dst_stage.append(sa)
            src_names += [f"L{lay}H{h}" for h in range(H)]
            src_stage += [sa] * H
            if has_mlp:
                dst_names.append(f"MLP{lay}")
                dst_node.append(f"MLP{lay}")
                dst_qkv.append(None)
                dst_stage.append(sm)
                src_names.append(f"MLP{lay}")
                src_stage.append(sm)
        dst_names.append("logits")
        dst_node.append("logits")
        dst_qkv.append(None)
        dst_stage.append(2 * L)
        self.src_names, self.dst_names = src_names, dst_names
        self.dst_node, self.dst_qkv = dst_node, dst_qkv
        self.src_stage = torch.tensor(src_stage)
        self.dst_stage = torch.tensor(dst_stage)
        self.stages = sorted(set(dst_stage))
        self.valid = self.src_stage[:, None] < self.dst_stage[None, :]
        d_idx, s_idx = self.valid.T.nonzero(as_tuple=True)  # destination-major
        if n_pos is None:
            self.src_idx, self.dst_idx, self.pos_idx = s_idx, d_idx, None
        else:
            P = n_pos
            k = len(s_idx)
            # destination, then position, then source
            per_dst = torch.bincount(d_idx, minlength=len(dst_names))
            starts = torch.cumsum(per_dst, 0) - per_dst
            rows = []
            for d in range(len(dst_names)):
                seg = s_idx[starts[d] : starts[d] + per_dst[d]]
                n = len(seg)
                rows.append(
                    (
                        seg.repeat(P),
                        torch.full((n * P,), d, dtype=torch.long),
                        torch.arange(P).repeat_interleave(n),
                    )
                )
            self.src_idx = torch.cat([r[0] for r in rows]) if k else torch.zeros(0, dtype=torch.long)
            self.dst_idx = torch.cat([r[1] for r in rows]) if k else torch.zeros(0, dtype=torch.long)
            self.pos_idx = torch.cat([r[2] for r in rows]) if k else torch.zeros(0, dtype=torch.long)
        self._src_pos = {n: i for i, n in enumerate(src_names)}
        self._dst_pos = {n: i for i, n in enumerate(dst_names)}
        self._edges: list[Edge] | None = None
        self._index: dict | None = None
        self._on_device: dict = {}  # device -> the edge index tensors there (index_tensors)

    # ----- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model, per_position: bool = False, seq_len: int | None = None) -> EdgeGraph:
        """The graph of a :class:`~pypattern.models.Transformer` (``seq_len`` defaults to ``n_ctx``)."""
        cfg = getattr(model, "cfg", None)
        if cfg is None or not hasattr(cfg, "n_heads"):
            raise TypeError(
                f"model is a {type(model).__name__}; the circuits module needs pypattern's Transformer "
                "(convert other models with pypattern.models first)"
            )
        n_pos = None
        if per_position:
            if seq_len is not None and (not _is_int(seq_len) or seq_len < 1):
                raise ValueError(
                    f"seq_len={seq_len!r} is not valid; give the number of positions of the per-position edges, "
                    "a positive int (or None for the model's n_ctx)"
                )
            n_pos = cfg.n_ctx if seq_len is None else int(seq_len)
        return cls(
            cfg.n_layers,
            cfg.n_heads,
            has_mlp=not cfg.attn_only,
            parallel=bool(getattr(cfg, "parallel_attn_mlp", False)),
            n_pos=n_pos,
            n_kv_heads=getattr(cfg, "n_key_value_heads", None),
        )

    # ----- sizes and lookup ---------------------------------------------------------------------------------
    @property
    def n_src(self) -> int:
        return len(self.src_names)

    @property
    def n_dst(self) -> int:
        return len(self.dst_names)

    @property
    def per_position(self) -> bool:
        return self.n_pos is not None

    def __len__(self) -> int:
        return len(self.src_idx)

    @property
    def edges(self) -> list[Edge]:
        """Every edge, in the graph's order."""
        if self._edges is None:
            pos = self.pos_idx.tolist() if self.pos_idx is not None else [None] * len(self)
            self._edges = [
                Edge(self.src_names[s], self.dst_node[d], self.dst_qkv[d], p)
                for s, d, p in zip(self.src_idx.tolist(), self.dst_idx.tolist(), pos)
            ]
        return self._edges

    def __iter__(self) -> Iterator[Edge]:
        return iter(self.edges)

    def __getitem__(self, i: int) -> Edge:
        return self.edges[i]

    def __repr__(self) -> str:
        pp = f", n_pos={self.n_pos}" if self.per_position else ""
        if self.n_kv_heads != self.n_heads:
            pp = f", n_kv_heads={self.n_kv_heads}" + pp
        if self.parallel:
            pp = ", parallel=True" + pp
        return (
            f"EdgeGraph(n_layers={self.n_layers}, n_heads={self.n_heads}, has_mlp={self.has_mlp}{pp}: "
            f"{len(self)} edges, {self.n_src} sources, {self.n_dst} destination inputs)"
        )

    def index(self, edge: Edge | str) -> int:
        """Position of ``edge`` (an :class:`Edge` or its name, e.g. ``"L0H1->L1H2.k"``) in the graph's order."""
        if self._index is None:
            self._index = {}
            for i, e in enumerate(self.edges):
                self._index[e] = i
                self._index[e.name] = i
        key = edge if isinstance(edge, (Edge, str)) else None
        if key is None or key not in self._index:
            raise UnknownEdgeError(self._unknown(edge))
        return self._index[key]

    def __contains__(self, edge) -> bool:
        """Whether ``edge`` (an :class:`Edge` or its name) is in the graph: False for a well-formed edge the graph
        lacks; a name not spelled as an edge name is a ``ValueError``, anything else a ``TypeError``."""
        self.check_edge_spelling(edge)
        try:
            self.index(edge)
        except UnknownEdgeError:
            return False
        return True

    def check_edge_spelling(self, edge, label: str = "edge") -> None:
        """Refuse ``edge`` unless it is an :class:`Edge` or a string, spelled as an edge name (``label`` names the
        argument): a ``TypeError`` for another type, a ``ValueError`` naming the graph's kinds of names."""
        if not isinstance(edge, (Edge, str)):
            raise TypeError(
                f"{label}={edge!r} ({type(edge).__name__}) is not valid; give an Edge or an edge name such as "
                f"{self.edges[0].name if self.edges else 'L0H1->L1H2.k'!r}"
            )
        name = edge.name if isinstance(edge, Edge) else edge
        if not is_edge_name(name):
            kinds: dict[str, str] = {}
            for e in self.edges:
                kinds.setdefault(re.sub(r"\d+", "", e.dst_input), e.name)
            looks = ", ".join(repr(n) for n in kinds.values()) or "'L0H1->L1H2.k'"
            raise ValueError(
                f"{label}={name!r} is not an edge name: give source->input[@position], names such as {looks}"
                f"{self._closest(name)}"
            )

    def _unknown(self, edge) -> str:
        """The message for an edge that is not in the graph: example names of each kind of destination input and,
        for a head's key or value input under grouped-query attention, the name of its key/value head's input."""
        kinds: dict[str, str] = {}
        for e in self.edges:
            kinds.setdefault(re.sub(r"\d+", "", e.dst_input), e.name)  # q, k, v, MLP, logits
        msg = f"edge {edge!r} is not in the graph; names look like " + ", ".join(
            repr(n) for n in kinds.values()
        )
        if not self.edges:
            msg = f"edge {edge!r} is not in the graph (it has no edges)"
        name = edge.name if isinstance(edge, Edge) else edge if isinstance(edge, str) else None
        hit = re.fullmatch(r"(.+->)L(\d+)H(\d+)\.([kv])(@\d+)?", name) if name is not None else None
        if hit is not None and self.n_kv_heads != self.n_heads:
            src, lay, h, which, pos = hit.groups()
            msg += (
                f". With grouped-query attention ({self.n_heads} query heads, {self.n_kv_heads} key/value heads) the "
                "key and value inputs belong to the key/value heads, named L{layer}KV{group}"
            )
            g = int(h) // (self.n_heads // self.n_kv_heads)
            suggestion = f"{src}L{lay}KV{g}.{which}{pos or ''}"
            if int(h) < self.n_heads and suggestion in self._index:  # only a name the graph has
                msg += f": head {h}'s is {suggestion}"
        return msg

    def mask(self, edges: Iterable[Edge | str] | torch.Tensor) -> torch.Tensor:
        """A boolean mask ``(num_edges,)`` of ``edges`` (an iterable of edges or names, or a mask already: a bool
        tensor or NumPy array, or one of 0s and 1s)."""
        if isinstance(edges, np.ndarray) and edges.dtype.kind in "biufc":  # a NumPy mask, read as torch's
            edges = torch.from_numpy(edges)
        if isinstance(edges, torch.Tensor):
            m = zero_one_mask(edges)
            if m is None:
                bad = (edges != 0) & (edges != 1)
                what = (
                    f"values such as {edges[bad][0].item()!r} (give edges.bool() of a threshold)"
                    if edges.is_floating_point() or edges.is_complex()
                    else "values other than 0 and 1 (to select edges by index, give graph.edges[i] or their names)"
                )
                raise ValueError(
                    f"a mask over edges must be boolean (or hold only 0 and 1); got {edges.dtype} {what}"
                )
            if m.shape[-1] != len(self):
                n, E = int(m.shape[-1]), len(self)
                hint = " (a mask over another graph: a circuit's mask goes with its own .graph"
                if self.per_position and E % self.n_pos == 0 and n == E // self.n_pos:
                    hint += f"; {n} is the count of this model's edges without positions"
                elif not self.per_position and E and n % E == 0 and n > E:
                    hint += f"; {n} is the count of this model's per-position edges over {n // E} positions"
                raise ValueError(f"a mask over edges has {E} entries; got shape {tuple(m.shape)}{hint})")
            return m
        if isinstance(edges, (Edge, str)):
            edges = [edges]
        try:
            items = list(edges)
        except TypeError:
            raise TypeError(
                f"edges={edges!r} is not valid; give an iterable of edges or edge names, or a boolean mask "
                f"({len(self)},)"
            ) from None
        m = torch.zeros(len(self), dtype=torch.bool)
        for e in items:
            if not isinstance(e, (Edge, str)):
                raise TypeError(
                    f"edges contains {e!r} ({type(e).__name__}); give Edge objects or names such as "
                    f"{self.edges[0].name!r} (graph.edges[i] for an index i)"
                )
            try:
                m[self.index(e)] = True
            except UnknownEdgeError as err:
                raise UnknownEdgeError(f"edges: {err}{self._closest(e)}") from None
        return m

    def _closest(self, edge) -> str:
        """A hint naming the graph's edge name closest to ``edge`` (difflib), or pointing at the list of names."""
        import difflib

        name = edge.name if isinstance(edge, Edge) else str(edge)
        names = [e.name for e in self.edges]
        # a name in other case or with spaces: that name, not its nearest neighbour
        plain = {n.lower(): n for n in names}
        folded = "".join(name.split()).lower()
        if folded in plain:
            return f"; did you mean {plain[folded]!r}? (names are case-sensitive, without spaces)"
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
        if close:
            return f"; did you mean {close[0]!r}?"
        return "; [e.name for e in graph.edges] lists them (graph = pypattern.circuits.edges(model))"

    def index_tensors(self, device=None) -> tuple:
        """``(src_idx, dst_idx, pos_idx)`` on ``device`` (None or the CPU: the graph's own tensors), copied there
        once per device and kept (``pos_idx`` None for a graph without positions)."""
        dev = torch.device("cpu") if device is None else torch.device(device)
        if dev.type == "cpu":
            return self.src_idx, self.dst_idx, self.pos_idx
        if dev not in self._on_device:
            self._on_device[dev] = tuple(
                None if t is None else t.to(dev) for t in (self.src_idx, self.dst_idx, self.pos_idx)
            )
        return self._on_device[dev]

    def dense(self, masks: torch.Tensor, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
        """Masks ``(C, num_edges)`` -> ``(C, n_src, n_dst)`` (or ``(C, n_src, n_dst, n_pos)``) of ``dtype``, on
        ``device`` (default: the masks' device)."""
        C = masks.shape[0]
        dev = masks.device if device is None else torch.device(device)
        src, dst, pos = self.index_tensors(dev)
        vals = masks.to(device=dev, dtype=dtype)
        if self.per_position:
            out = torch.zeros(C, self.n_src, self.n_dst, self.n_pos, dtype=dtype, device=dev)
            out[:, src, dst, pos] = vals
        else:
            out = torch.zeros(C, self.n_src, self.n_dst, dtype=dtype, device=dev)
            out[:, src, dst] = vals
        return out

    def edge_stage(self) -> torch.Tensor:
        """Stage of each edge's destination ``(num_edges,)``."""
        return self.dst_stage[self.dst_idx]

    def to_pandas(self):
        """One row per edge: ``src``, ``dst``, ``qkv``, ``pos`` and ``name``."""
        import pandas as pd

        return pd.DataFrame(
            {
                "src": [e.src for e in self.edges],
                "dst": [e.dst for e in self.edges],
                "qkv": [e.qkv for e in self.edges],
                "pos": [e.pos for e in self.edges],
                "name": [e.name for e in self.edges],
            }
        )


def edges(model, *, per_position: bool = False, seq_len: int | None = None) -> EdgeGraph:
    """The edge graph of ``model`` (see :mod:`pypattern.circuits.graph`).

    Parameters
    ----------
    model : Transformer
        Only its configuration is read: a model on the meta device (shapes without weights) is fine. Other models
        (a Hugging Face causal LM, a HookedTransformer) are converted first, which needs their weights.
    per_position : bool
        One edge per position (``seq_len`` of them; default the model's ``n_ctx``, when that gives at most
        :data:`MAX_DEFAULT_POSITION_EDGES` edges: else ``seq_len`` must be given).
    seq_len : int, optional
        The positions of per-position edges (only with ``per_position=True``).

    Returns
    -------
    EdgeGraph
        Iterable of :class:`Edge`; ``len(graph)`` is the number of edges (110 for 2 layers, 4 heads, MLPs).

    Examples
    --------
    >>> from pypattern.models import Transformer, TransformerConfig
    >>> len(edges(Transformer(TransformerConfig(n_layers=2, n_heads=4, d_model=16, d_mlp=32))))
    110
    """
    if not isinstance(per_position, bool):
        raise TypeError(f"per_position={per_position!r} is not valid; give True or False")
    if seq_len is not None and not per_position:
        raise ValueError(
            f"seq_len={seq_len!r} counts the positions of per-position edges; with per_position=False the edges "
            "have no position: give per_position=True, or leave seq_len out"
        )
    if not isinstance(
        model, Transformer
    ):  # pypattern's model: its configuration alone (weights may be on meta)
        model = converted_if_convertible(model)
    if isinstance(model, Transformer):  # as every function that patches or scores its edges does
        from .model_view import refuse_unsupported

        refuse_unsupported(model.cfg)
    if per_position and seq_len is None:
        n_ctx = int(model.cfg.n_ctx)
        total = len(EdgeGraph.from_model(model)) * n_ctx
        if total > MAX_DEFAULT_POSITION_EDGES:
            raise ValueError(
                f"per_position=True without seq_len gives every edge once per position of the model's n_ctx "
                f"({n_ctx}): {total:,} edges; give seq_len=, the length of the prompts to patch (the patching "
                "and attribution functions take it from their prompts)"
            )
    return EdgeGraph.from_model(model, per_position=per_position, seq_len=seq_len)


#: the most edges :func:`edges` lays out per position by default (over the model's whole ``n_ctx``); beyond it a
#: ``seq_len`` must be given (a model with rotary positions has an ``n_ctx`` of its longest context, 131,072 for
#: recent Llama configurations)
MAX_DEFAULT_POSITION_EDGES = 1 << 22
