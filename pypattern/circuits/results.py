"""Result objects of circuit discovery: edge scores, circuits and pruning curves (tables, plots, npz files)."""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import io
from .._checks import is_count, is_real
from .._plotting import figure_axes, finish
from ..sampling.diagnostics import user_stacklevel
from ..sampling.results import check_arrays
from .graph import Edge, EdgeGraph, check_graph_arg

__all__ = ["EdgeScores", "Circuit", "PruningCurve", "draw_circuit"]


def _graph_meta(g: EdgeGraph) -> dict:
    return {
        "n_layers": g.n_layers,
        "n_heads": g.n_heads,
        "has_mlp": g.has_mlp,
        "parallel": g.parallel,
        "n_pos": g.n_pos,
        "n_kv_heads": g.n_kv_heads,
    }


def _save(path, arrays: dict, meta: dict, kind: str, info: dict, rebuild) -> None:
    """Write through :mod:`pypattern.io` (``.npz`` with a JSON header, atomic). bfloat16 tensors, which numpy
    does not hold, are stored as float32 (exactly) and named in the header, so :func:`_load` restores them.
    ``info`` is stored as results store their fields (:func:`pypattern.io.save_result`): NumPy scalars with their
    dtype, tuples, nested containers, and arrays and tensors as members ``info/...``; a value that cannot be
    saved is a TypeError naming its key. ``rebuild(arrays, header)`` is how ``load`` makes the result from what it
    reads (and checks it): a result it would refuse is a ValueError naming what load refuses, and nothing is
    written (as :func:`pypattern.io.save_result` refuses a registered result)."""
    if not isinstance(info, dict):
        raise TypeError(f"info is {_short_text(info)}; a {kind}'s info must be a dict to be saved")
    enc = io._Encoder()
    meta = {**meta, "info": enc(info, "info")}
    bf16 = sorted(k for k, v in arrays.items() if isinstance(v, torch.Tensor) and v.dtype == torch.bfloat16)
    meta = {**meta, "bfloat16": bf16} if bf16 else meta
    members = {k: np.asarray(_numpy_dtype(v)) for k, v in arrays.items()}
    _check_readable(path, kind, members, enc.arrays, meta, bf16, rebuild)
    io.save(path, {**members, **enc.arrays}, meta, kind=kind)


def _check_readable(
    path, kind: str, members: dict, info_arrays: dict, meta: dict, bf16: list, rebuild
) -> None:
    """Read the file about to be written as :func:`_load` and ``load`` would (the header through JSON, the
    members as tensors, bfloat16 restored) and build the result with ``rebuild``; a ValueError naming what ``load``
    would refuse, before anything is written (the rule and words of :func:`pypattern.io.save_result`'s check)."""
    p = os.fspath(path)

    def build(header: dict) -> None:
        for k, v in members.items():
            if v.dtype.hasobject or v.dtype.kind not in "biufc":
                raise io.FormatError(f"{k} is {_short_text(v)}, not an array of numbers")
        header["info"] = io._decode(header["info"], lambda k: np.asarray(info_arrays[k]), p)
        a = {
            k: torch.from_numpy(np.array(v)).to(torch.bfloat16)
            if k in bf16
            else torch.from_numpy(np.array(v))
            for k, v in members.items()
        }
        rebuild(a, header)

    io._check_readable(kind, p, meta, build)


def _numpy_dtype(v):
    """A tensor as numpy reads it: on the CPU, detached, its conjugate and negative bits resolved, and bfloat16 (a
    bfloat16 model's scores) as float32, which numpy holds; anything else unchanged."""
    if not isinstance(v, torch.Tensor):
        return v
    # numpy reads CPU tensors (results hold CPU tensors already: no copy then) without autograd or lazy bits
    v = v.detach().cpu().resolve_conj().resolve_neg()
    return v.float() if v.dtype == torch.bfloat16 else v


@contextlib.contextmanager
def _damaged(path, kind: str):
    """A file of the right kind whose arrays or header do not make a ``kind`` is a ``FormatError`` naming it."""
    try:
        yield
    except io._DAMAGED as e:
        raise io.FormatError(f"{os.fspath(path)!r} is corrupt: it does not make a {kind} ({e!r})") from None


def _load(path, kind: str):
    """Read through :mod:`pypattern.io`: a pickle, a truncated file or another kind is a ``FormatError``. Arrays
    come back as tensors, in bfloat16 where :func:`_save` recorded it."""
    a, m = io.load(path, kind=kind)
    path = os.fspath(path)
    members = _MEMBERS[kind]
    info = m.get("info", {})
    with _damaged(path, kind):
        used = io._members(info, set())
    extra = sorted(k for k in a if k not in members and k not in used)
    if extra:
        raise io.FormatError(
            f"{path!r} is corrupt: it holds members {extra} that a {kind} does not have (it has "
            f"{list(members)}, and those its info names)"
        )

    def member(name) -> np.ndarray:
        if not isinstance(name, str) or name in members or name not in a:
            raise io.FormatError(
                f"{path!r} is corrupt: its info names array {name!r} that the file does not hold"
            )
        return a[name]

    with _damaged(path, kind):
        m = {**m, "info": io._decode(info, member, path)}
    bf16 = m.get("bfloat16", [])
    if not isinstance(bf16, list) or not all(k in a and k in members for k in bf16):
        raise io.FormatError(
            f"{path!r} is corrupt: its header's bfloat16 entry {_short_text(bf16)} does not name its members"
        )
    with _damaged(path, kind):
        out = {
            k: torch.from_numpy(v).to(torch.bfloat16) if k in bf16 else torch.from_numpy(v)
            for k, v in a.items()
            if k in members
        }
    return out, m


#: the members a file of each kind may hold
_MEMBERS = {
    "EdgeScores": ("values", "m_base", "m_clean", "scored_examples"),
    "Circuit": ("mask", "scores"),
}


def _check_settings(obj, names: tuple[str, ...]) -> None:
    """The recorded settings ``names`` of ``obj`` (a result read by ``load``) are strings (the circuits functions'
    ``method``, ``mode``, ``ablation`` and metric name), else a ValueError naming the setting."""
    for name in names:
        v = getattr(obj, name)
        if not isinstance(v, str):
            raise ValueError(f"{name} is {_short_text(v)}; expected a string")


def _number(v) -> float | None:
    """A circuit's ``faithfulness`` as the file holds it: None, or a real number as a Python float (one of a batch
    of circuits' faithfulness tensor, a 0-d tensor, or a NumPy number, is read as its value); else a TypeError."""
    if v is None:
        return None
    if isinstance(v, torch.Tensor) and v.numel() == 1 and v.is_floating_point():
        return float(v)
    if isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool | np.bool_):
        return float(v)
    raise TypeError(f"faithfulness={_short_text(v)} cannot be saved; give a real number or None")


#: what :func:`~pypattern.circuits.acdc` records of its run in a circuit's ``info`` (numbers)
_ACDC_RECORD = ("threshold", "m_circuit", "m_full", "m_empty")


def _check_real(name: str, v: torch.Tensor) -> None:
    """``v`` holds real floating-point numbers (a file read by ``load``), else a ValueError naming ``name``."""
    if not v.is_floating_point():
        raise ValueError(f"{name} holds {v.dtype} values; expected real floating-point numbers")


def _short_text(v) -> str:
    if isinstance(v, torch.Tensor | np.ndarray):
        return f"{type(v).__name__} of {v.dtype} of shape {tuple(v.shape)}"
    text = repr(v)
    return f"{type(v).__name__} {text if len(text) <= 60 else text[:60] + '...'}"


def _check_count(name: str, v, upper: int | None = None) -> int:
    """``v`` as a number of edges: an int (not a bool) from 0 (to ``upper`` when given), else a ValueError naming
    ``name``. A one-element integer tensor (a count of edges computed in torch) is read as its int."""
    if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_floating_point() and not v.is_complex():
        v = v.item()
    ok = (
        isinstance(v, int | np.integer)
        and not isinstance(v, bool)
        and v >= 0
        and (upper is None or v <= upper)
    )
    if not ok:
        what = "an int >= 0" if upper is None else f"an int in 0..{upper}"
        raise ValueError(f"{name}={v!r} is not valid; give {what} (a number of edges)")
    return int(v)


def _check_fraction(name: str, v) -> float:
    """``v`` as a fraction of the edges: a real number in [0, 1] (not a bool; a one-element tensor is read as its
    number), else a ValueError naming ``name``."""
    if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_complex():
        v = v.item()
    ok = isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool) and 0 <= v <= 1
    if not ok:  # NaN fails the comparison
        raise ValueError(f"{name}={v!r} is not valid; give a number in [0, 1] (a fraction of the edges)")
    return float(v)


def rank_order(scores: torch.Tensor, name: str, graph: EdgeGraph) -> torch.Tensor:
    """Edge indices by descending ``|score|`` (ties in graph order) of ``scores`` ``(num_edges,)``; scores holding
    NaN are refused, naming ``name`` and the edges (ranking would put them at an arbitrary place)."""
    nan = torch.isnan(scores)
    if bool(nan.any()):
        idx = nan.nonzero().flatten().tolist()
        some = ", ".join(graph[i].name for i in idx[:3]) + (", ..." if len(idx) > 3 else "")
        raise ValueError(
            f"{name} holds NaN for {len(idx)} of {len(scores)} edges ({some}); edges cannot be ranked by |score| "
            "with NaN among them: recompute the scores (a metric that is NaN on the run with an edge patched makes "
            "that edge's score NaN) or replace the NaN (e.g. with nan_to_num) before ranking"
        )
    return torch.sort(-scores.abs(), stable=True).indices


def edge_mask(graph: EdgeGraph, edges, name: str) -> torch.Tensor:
    """``edges`` as a bool mask ``(num_edges,)`` over ``graph``: a bool mask (or one of 0s and 1s) of that shape,
    or an iterable of edges or edge names; anything else a ValueError or TypeError naming ``name``."""
    if isinstance(edges, torch.Tensor | np.ndarray):
        t = torch.as_tensor(edges)
        if t.dim() != 1 or t.shape[0] != len(graph):
            raise ValueError(
                f"{name} is a mask of shape {tuple(t.shape)}; the graph has {len(graph)} edges: give a bool mask "
                f"({len(graph)},), or the edges (or their names)"
            )
        edges = t
    try:
        return graph.mask(edges)
    except (ValueError, TypeError) as e:
        raise type(e)(f"{name}: {e}") from None


def edge_values(graph: EdgeGraph, scores, name: str) -> torch.Tensor | None:
    """``scores`` (None, or one real number per edge of ``graph``) as a tensor ``(num_edges,)``, else a ValueError
    naming ``name``."""
    if scores is None:
        return None
    t = torch.as_tensor(scores)
    if tuple(t.shape) != (len(graph),) or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(
            f"{name} is {t.dtype} of shape {tuple(t.shape)}; give one real number per edge ({len(graph)},), or None"
        )
    return t


@dataclass
class EdgeScores:
    """Per-edge scores from :func:`~pypattern.circuits.edge_attribution`.

    Attributes
    ----------
    graph : EdgeGraph
    values : Tensor ``(batch, num_edges)``
        Per-example estimate (EAP, EAP-IG) or exact value of ``M(edge patched) - M(base run)``; NaN for every edge
        of an example that is not scored (its metric not finite on an unpatched run, or on an interpolated run of
        EAP-IG's).
    method, mode, ablation, metric : str
    m_base, m_clean : Tensor ``(batch,)``
        Metric of the base run (clean for noising, corrupted for denoising) and of the clean run.
    info : dict
        ``"steps"``, ``"seconds"``, ``"passes"``, ``"attention_mask"`` (whether the prompts ran under an attention
        mask, ``attention_mask=`` or a tokenizer's output holding one, as :mod:`pypattern.patching`'s results record
        it), and ``"scored_examples"``: the examples scored, a bool tensor ``(batch,)`` (:attr:`scored_examples`).

    :attr:`scores` and the standard errors of :meth:`to_pandas` are over :attr:`scored_examples`.
    """

    graph: EdgeGraph
    values: torch.Tensor
    method: str
    mode: str
    ablation: str
    metric: str
    m_base: torch.Tensor
    m_clean: torch.Tensor
    info: dict = field(default_factory=dict)

    @property
    def scored_examples(self) -> torch.Tensor:
        """``(batch,)`` bool: the examples scored, those whose metric is finite on the base and the clean run (and,
        EAP-IG, on every interpolated run), as :func:`~pypattern.circuits.edge_attribution` recorded them in
        ``info["scored_examples"]``. An example scored whose patched runs make the metric NaN keeps its NaN values
        in :attr:`scores` (which :meth:`ranking` then refuses, naming the edges). Scores without that record (made
        by hand, or a file written without it) take the examples whose metric is finite on the base and the clean
        run and whose values are not NaN for every edge."""
        rec = self.info.get("scored_examples")
        if rec is not None:
            return torch.as_tensor(rec, dtype=torch.bool).to(self.values.device)
        keep = torch.isfinite(self.m_base) & torch.isfinite(self.m_clean)
        keep = keep.to(self.values.device)
        if self.values.shape[1]:
            keep = keep & ~self.values.isnan().all(1)
        return keep

    def _scored(self) -> torch.Tensor:
        """The values of :attr:`scored_examples` ``(n, num_edges)``."""
        keep = self.scored_examples
        return self.values if bool(keep.all()) else self.values[keep]

    @property
    def scores(self) -> torch.Tensor:
        """Score of every edge ``(num_edges,)``: the mean of :attr:`values` over :attr:`scored_examples`."""
        return self._scored().mean(0)

    def ranking(self) -> torch.Tensor:
        """Edge indices by descending ``|score|`` (ties in graph order); scores holding NaN are refused."""
        return rank_order(self.scores, "scores", self.graph)

    def top(self, n: int = 10) -> list[tuple[Edge, float]]:
        """The ``n`` edges with the largest ``|score|`` and their scores."""
        n = _check_count("n", n)
        s = self.scores
        return [(self.graph[i], float(s[i])) for i in self.ranking()[:n].tolist()]

    def circuit(self, n: int | None = None, fraction: float | None = None) -> Circuit:
        """The circuit of the top ``n`` edges (or the top ``fraction`` of them) by ``|score|``."""
        E = len(self.graph)
        if (n is None) == (fraction is None):
            raise ValueError("give exactly one of n=... or fraction=...")
        if fraction is not None:
            n = int(round(_check_fraction("fraction", fraction) * E))
        n = _check_count("n", n, E)
        mask = torch.zeros(E, dtype=torch.bool)
        mask[self.ranking()[:n]] = True
        return Circuit(self.graph, mask, self.scores, None, self.method, {"n": n})

    def to_pandas(self):
        """One row per edge: ``src``, ``dst``, ``qkv``, ``pos``, ``score`` (batch mean), ``se`` (standard error over
        the batch) and ``rank`` (1 = largest ``|score|``), sorted by rank. Edges whose score is NaN (a metric NaN on
        a patched run) come last with rank NaN: the table shows them where :meth:`ranking` refuses to order them."""
        df = self.graph.to_pandas()
        s = self.scores
        v = self._scored()
        B = v.shape[0]
        se = v.std(0) / max(B, 1) ** 0.5 if B > 1 else torch.full_like(s, float("nan"))
        df["score"] = s.double().numpy()
        df["se"] = se.double().numpy()
        nan = torch.isnan(s)
        has_nan = bool(nan.any())
        key = torch.where(nan, torch.full_like(s, float("inf")), -s.abs())  # NaN after every number
        rank = torch.empty(len(s), dtype=torch.float64 if has_nan else torch.long)
        rank[torch.sort(key, stable=True).indices] = torch.arange(1, len(s) + 1, dtype=rank.dtype)
        if has_nan:
            rank[nan] = float("nan")
        df["rank"] = rank.numpy()
        df["method"] = self.method
        return df.sort_values("rank", na_position="last").reset_index(drop=True)

    def draw(self, n: int | None = None, **kwargs):
        """Graph drawing of the top ``n`` edges (default: 20, or every edge of a smaller graph; see
        :func:`draw_circuit`)."""
        return self.circuit(n=min(20, len(self.graph)) if n is None else n).draw(**kwargs)

    plot = draw

    def __repr__(self) -> str:
        """What the scores are, without their tensors (an error message quoting them stays readable)."""
        return (
            f"EdgeScores({self.method}, {self.mode}, {self.ablation} ablation, metric {self.metric!r}: "
            f"{self.values.shape[1]} edges x {self.values.shape[0]} examples; {self.graph!r})"
        )

    def save(self, path) -> None:
        """Write to ``path`` (.npz with a JSON header; loading never unpickles). ``info`` comes back as it was:
        NumPy scalars with their dtype, tuples, nested containers, arrays and tensors (a value that cannot be saved,
        such as a function, is a TypeError naming its key)."""
        meta = {
            "graph": _graph_meta(self.graph),
            "method": self.method,
            "mode": self.mode,
            "ablation": self.ablation,
            "metric": self.metric,
        }
        arrays = {"values": self.values, "m_base": self.m_base, "m_clean": self.m_clean}
        info = dict(self.info) if isinstance(self.info, dict) else self.info
        if (
            isinstance(info, dict) and info.get("scored_examples") is not None
        ):  # a member of its own (older files hold it so)
            arrays["scored_examples"] = torch.as_tensor(info.pop("scored_examples"), dtype=torch.bool)
        _save(path, arrays, meta, "EdgeScores", info, EdgeScores._from_file)

    @classmethod
    def load(cls, path) -> EdgeScores:
        a, m = _load(path, "EdgeScores")
        with _damaged(path, "EdgeScores"):
            return cls._from_file(a, m)

    @classmethod
    def _from_file(cls, a: dict, m: dict) -> EdgeScores:
        """The scores a file's members ``a`` and header ``m`` make, checked (:meth:`_check_loaded`)."""
        graph = EdgeGraph(**m["graph"])
        out = cls(
            graph,
            a["values"],
            m["method"],
            m["mode"],
            m["ablation"],
            m["metric"],
            a["m_base"],
            a["m_clean"],
            dict(m.get("info", {})),
        )
        if "scored_examples" in a:  # files written without it: inferred (scored_examples)
            out.info["scored_examples"] = a["scored_examples"]
        out._check_loaded()
        return out

    def _check_loaded(self) -> None:
        """The members agree (a file read by :meth:`load`): ``values (batch, num_edges)`` with a column per edge of
        the graph, one ``m_base`` and ``m_clean`` per example, and ``info["scored_examples"]`` (when there) a flag
        per example, False only where the values are NaN and True only where both metrics are finite."""
        E = len(self.graph)
        _check_settings(self, ("method", "mode", "ablation", "metric"))
        if not isinstance(self.info, dict):
            raise ValueError(f"info is {_short_text(self.info)}; expected a dict")
        if self.values.dim() != 2 or self.values.shape[1] != E:
            raise ValueError(f"values has shape {tuple(self.values.shape)} for a graph of {E} edges")
        _check_real("values", self.values)
        batch = self.values.shape[0]
        for name in ("m_base", "m_clean"):
            v = getattr(self, name)
            _check_real(name, v)
            if tuple(v.shape) != (batch,) or v.is_complex():
                raise ValueError(
                    f"{name} is {v.dtype} of shape {tuple(v.shape)}; expected real numbers ({batch},), one per "
                    f"example as in values {tuple(self.values.shape)}"
                )
        scored = self.info.get("scored_examples")
        if scored is not None and (scored.dtype != torch.bool or tuple(scored.shape) != (batch,)):
            raise ValueError(
                f"scored_examples has shape {tuple(scored.shape)} and dtype {scored.dtype}; expected bool ({batch},)"
            )
        if scored is None:
            return
        # as edge_attribution records them: an example left out has NaN for every edge; one scored has a finite
        # metric on the base and the clean run (a flag changed alone would change the scores' means silently)
        stray = ~scored & ~self.values.isnan().all(1) if E else torch.zeros_like(scored)
        unmeasured = scored & ~(torch.isfinite(self.m_base) & torch.isfinite(self.m_clean))
        if bool(stray.any()):
            i = int(stray.nonzero()[0])
            raise ValueError(
                f"scored_examples leaves out example {i}, whose values are not NaN: an example the scores leave out "
                "has NaN for every edge"
            )
        if bool(unmeasured.any()):
            i = int(unmeasured.nonzero()[0])
            raise ValueError(
                f"scored_examples counts example {i}, whose metric is not finite on the base or the clean run "
                f"(m_base {float(self.m_base[i])!r}, m_clean {float(self.m_clean[i])!r}): such an example is not "
                "scored"
            )


@dataclass
class Circuit:
    """A set of edges of ``graph`` (``mask (num_edges,)``), with optional per-edge ``scores`` and its
    ``faithfulness``.

    ``info`` records how the circuit was found, and :meth:`save` and :meth:`load` refuse a circuit that disagrees
    with its record (a file edited by hand, or a mask changed after the search): ``info["n"]``
    (:meth:`EdgeScores.circuit`) is its number of edges; an ACDC circuit's ``threshold``, ``m_circuit``, ``m_full``,
    ``m_empty`` and ``num_untested`` (:func:`~pypattern.circuits.acdc`) give its faithfulness
    ``(m_circuit - m_empty) / (m_full - m_empty)`` and its edges, those whose drop (``scores``) reached the
    threshold, at most ``num_untested`` of the others removed untested (drop 0). To keep a changed circuit, drop the
    record (``circuit.info = {}``).
    """

    graph: EdgeGraph
    mask: torch.Tensor
    scores: torch.Tensor | None = None
    faithfulness: float | None = None
    method: str = ""
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        """The circuit's edges as a bool mask over its graph (``mask`` may be a bool mask, one of 0s and 1s, or the
        edges or their names) and ``scores`` one number per edge; anything else is refused, naming it."""
        check_graph_arg(self.graph, "graph", optional=False)
        self.mask = edge_mask(self.graph, self.mask, "mask")
        self.scores = edge_values(self.graph, self.scores, "scores")

    def __len__(self) -> int:
        return int(self.mask.sum())

    def __contains__(self, edge) -> bool:
        """Whether ``edge`` (an :class:`Edge` or its name) is in the circuit: False for a well-formed edge that is
        not, or that the graph lacks; a name not spelled as an edge name is a ``ValueError``, anything else a
        ``TypeError``."""
        if edge not in self.graph:  # checks the spelling
            return False
        return bool(self.mask[self.graph.index(edge)])

    @property
    def edges(self) -> list[Edge]:
        return [self.graph[i] for i in self.mask.nonzero().flatten().tolist()]

    @property
    def fraction(self) -> float:
        return len(self) / max(len(self.graph), 1)

    def to_pandas(self):
        """One row per edge of the circuit (``src``, ``dst``, ``qkv``, ``pos``, ``name``, ``score``), by
        descending ``|score|``, ties in graph order as :meth:`EdgeScores.ranking` orders them (edges whose score is
        NaN last)."""
        df = self.graph.to_pandas()
        df["score"] = self.scores.double().numpy() if self.scores is not None else np.nan
        df = df[self.mask.numpy()]
        key = -df["score"].abs().to_numpy()
        key[np.isnan(key)] = np.inf  # NaN after every number
        return df.iloc[np.argsort(key, kind="stable")].reset_index(drop=True)

    def draw(self, path: str | None = None, ax=None, title: str | None = None, **kwargs):
        """Graph drawing of the circuit with its edge scores (see :func:`draw_circuit`)."""
        if title is None:
            f = "" if self.faithfulness is None else f", faithfulness {self.faithfulness:.3f}"
            title = f"{self.method + ' ' if self.method else ''}circuit: {len(self)} of {len(self.graph)} edges{f}"
        return draw_circuit(self.graph, self.mask, self.scores, path=path, ax=ax, title=title, **kwargs)

    plot = draw

    def __repr__(self) -> str:
        """What the circuit is, without its tensors (an error message quoting it stays readable)."""
        f = "" if self.faithfulness is None else f", faithfulness {self.faithfulness:.4g}"
        how = f"{self.method} " if self.method else ""
        return f"Circuit({how}{len(self)} of {len(self.graph)} edges{f}; {self.graph!r})"

    def save(self, path) -> None:
        """Write to ``path`` (.npz with a JSON header). A circuit that disagrees with its record in ``info`` (see
        the class docstring) is refused (ValueError): :meth:`load` would refuse the file. ``info`` comes back as it
        was (as :meth:`EdgeScores.save` keeps it)."""
        self._check_record()
        arrays = {"mask": self.mask}
        if self.scores is not None:
            arrays["scores"] = self.scores
        meta = {
            "graph": _graph_meta(self.graph),
            "faithfulness": _number(self.faithfulness),
            "method": self.method,
        }
        _save(path, arrays, meta, "Circuit", self.info, Circuit._from_file)

    @classmethod
    def load(cls, path) -> Circuit:
        a, m = _load(path, "Circuit")
        with _damaged(path, "Circuit"):
            return cls._from_file(a, m)

    @classmethod
    def _from_file(cls, a: dict, m: dict) -> Circuit:
        """The circuit a file's members ``a`` and header ``m`` make, checked (:meth:`_check_loaded`)."""
        graph = EdgeGraph(**m["graph"])
        sc = a.get("scores")
        if a["mask"].dtype != torch.bool:  # written as bool: another dtype is not a file save wrote
            raise ValueError(f"mask is {a['mask'].dtype}; expected bool")
        out = cls(graph, a["mask"], sc, m["faithfulness"], m["method"], m.get("info", {}))
        out._check_loaded()
        return out

    def _check_loaded(self) -> None:
        """The members agree (a file read by :meth:`load`): a bool ``mask`` and real ``scores`` (when there), one
        entry per edge of the graph."""
        E = len(self.graph)
        _check_settings(self, ("method",))
        if not isinstance(self.info, dict):
            raise ValueError(f"info is {_short_text(self.info)}; expected a dict")
        if tuple(self.mask.shape) != (E,) or self.mask.dtype != torch.bool:
            raise ValueError(
                f"mask is {self.mask.dtype} of shape {tuple(self.mask.shape)}; expected bool ({E},)"
            )
        sc = self.scores
        if sc is not None and (tuple(sc.shape) != (E,) or sc.is_complex() or sc.dtype == torch.bool):
            raise ValueError(f"scores is {sc.dtype} of shape {tuple(sc.shape)}; expected real numbers ({E},)")
        f = self.faithfulness
        if f is not None and (isinstance(f, bool) or not isinstance(f, int | float)):
            raise ValueError(f"faithfulness must be a number or None, got {f!r}")
        self._check_record()

    def _check_record(self) -> None:
        """The circuit agrees with what ``info`` records of its making (see the class docstring), else a
        ValueError naming what disagrees."""
        f = _number(self.faithfulness)
        if f is not None and math.isinf(f):  # a ratio of finite means, or NaN where it is undefined
            raise ValueError(
                f"faithfulness={f!r} is not valid; a circuit's faithfulness is a finite number or NaN"
            )
        info = self.info if isinstance(self.info, dict) else {}
        n = info.get("n")
        if is_count(n) and n >= 0 and int(n) != len(self):
            raise ValueError(
                f"info['n']={n!r} records the circuit's number of edges, but its mask holds {len(self)}; drop the "
                "record (circuit.info = {}) to keep a changed circuit"
            )
        if self.method == "acdc" and all(is_real(info.get(k)) for k in _ACDC_RECORD):
            self._check_acdc_record(info, f)

    def _check_acdc_record(self, info: dict, f: float | None) -> None:
        """An ACDC circuit (:func:`~pypattern.circuits.acdc`) agrees with its recorded run: the faithfulness of
        its recorded metrics, and the edges its drops and threshold keep."""
        m_c, m_full, m_empty, thr = (float(info[k]) for k in ("m_circuit", "m_full", "m_empty", "threshold"))
        den = m_full - m_empty
        want = (m_c - m_empty) / den if math.isfinite(den) and den != 0 else math.nan
        if f is not None and not (
            (math.isnan(f) and math.isnan(want)) or math.isclose(f, want, rel_tol=1e-6, abs_tol=1e-9)
        ):
            raise ValueError(
                f"faithfulness={f!r} is not (m_circuit - m_empty) / (m_full - m_empty) = {want!r} of the ACDC run "
                f"recorded in info (m_circuit={m_c!r}, m_full={m_full!r}, m_empty={m_empty!r}); drop the record "
                "(circuit.info = {}) to keep another faithfulness"
            )
        if self.scores is None:
            return
        drop = self.scores.double()
        # drops stored in float32 (a 16-bit model's) are compared to their rounding
        tol = 4 * torch.finfo(self.scores.dtype).eps * torch.clamp(drop.abs(), min=abs(thr))
        kept_low = self.mask & (drop < thr - tol)
        gone_high = ~self.mask & (drop >= thr + tol)
        if bool(kept_low.any() or gone_high.any()):
            i = int((kept_low | gone_high).nonzero()[0])
            how = "keeps" if bool(self.mask[i]) else "removes"
            raise ValueError(
                f"the ACDC circuit {how} {self.graph[i].name}, whose drop {float(drop[i])!r} is "
                f"{'below' if how == 'keeps' else 'at or above'} its recorded threshold {thr!r}: ACDC keeps exactly "
                "the edges whose drop reached the threshold; drop the record (circuit.info = {}) to keep a changed "
                "circuit"
            )
        untested = info.get("num_untested")
        zero_removed = int((~self.mask & (drop == 0)).sum())
        if untested is not None and (
            not (is_count(untested) and untested >= 0) or int(untested) > zero_removed
        ):
            raise ValueError(
                f"info['num_untested']={untested!r} is not valid: the edges removed untested keep a drop of 0, and "
                f"{zero_removed} removed edges have one"
            )


@io.register
@dataclass
class PruningCurve(io.Saveable):
    """Faithfulness against the number of top-scored edges kept, one curve per scoring method.

    Attributes
    ----------
    counts : LongTensor ``(n,)``
        Edges kept at each point, increasing.
    faithfulness, metric_values : dict[str, Tensor ``(n,)``]
        Per method: faithfulness and the batch-mean metric of each circuit, ``faithfulness = (metric_values -
        m_empty) / (m_full - m_empty)`` (NaN where ``m_full == m_empty``).
    m_full, m_empty : float
        Batch-mean metric of the full model and of the fully ablated one.
    info : dict
        ``"seconds"``, ``"num_runs"`` (patched runs) and ``"attention_mask"`` (whether the prompts ran under an
        attention mask) of :func:`~pypattern.circuits.pruning_curve`.

    :meth:`load` refuses a file whose counts do not increase or whose faithfulness is not that of its metric
    values (``pypattern.io.FormatError`` naming the file).
    """

    counts: torch.Tensor
    num_edges: int
    faithfulness: dict
    metric_values: dict
    m_full: float
    m_empty: float
    mode: str
    ablation: str
    metric: str
    info: dict = field(default_factory=dict)

    def _check_loaded(self) -> None:
        """The members agree (a file read by :meth:`load`): ``counts (n,)`` of edges in ``0..num_edges``, and per
        method (the same in ``faithfulness`` and ``metric_values``) a curve of ``n`` real numbers."""
        if isinstance(self.num_edges, bool) or self.num_edges < 0:
            raise ValueError(f"num_edges must be an int >= 0, got {self.num_edges!r}")
        for name in ("faithfulness", "metric_values"):
            d = getattr(self, name)
            if not isinstance(d, dict) or not all(isinstance(k, str) for k in d):
                raise ValueError(f"{name} must be a dict of method name (str) to curve, got {_short_text(d)}")
        if list(self.faithfulness) != list(self.metric_values):
            raise ValueError(
                f"faithfulness has curves {list(self.faithfulness)}, metric_values {list(self.metric_values)}; "
                "each method has one of each"
            )
        curves = {
            f"{n}[{k!r}]": v for n in ("faithfulness", "metric_values") for k, v in getattr(self, n).items()
        }
        check_arrays({"counts": self.counts, **curves}, {"counts": ("n",), **dict.fromkeys(curves, ("n",))})
        if self.counts.is_floating_point() or self.counts.dtype == torch.bool:
            raise ValueError(f"counts must hold numbers of edges (integers), got {self.counts.dtype} values")
        for k, v in curves.items():
            if not isinstance(v, torch.Tensor) or not v.is_floating_point():
                raise ValueError(f"{k} must be a tensor of real numbers, got {_short_text(v)}")
        bad = (self.counts < 0) | (self.counts > self.num_edges)
        if bool(bad.any()):
            raise ValueError(
                f"counts holds {int(self.counts[bad][0])}, outside 0..num_edges={self.num_edges}"
            )
        if bool((self.counts[1:] <= self.counts[:-1]).any()):
            raise ValueError(f"counts {self.counts.tolist()} are not increasing (each point once, sorted)")
        if not isinstance(self.info, dict):
            raise ValueError(f"info is {_short_text(self.info)}; expected a dict")
        for name, f in self.faithfulness.items():  # the definition, on the curve's own metric values
            v = self.metric_values[name]
            full, empty = (torch.tensor(x, dtype=v.dtype) for x in (self.m_full, self.m_empty))
            den = full - empty
            want = (
                (v - empty) / den
                if bool(torch.isfinite(den)) and float(den) != 0
                else torch.full_like(v, math.nan)
            )
            if not torch.allclose(f.to(v.dtype), want, rtol=1e-5, atol=1e-8, equal_nan=True):
                raise ValueError(
                    f"faithfulness[{name!r}] is not (metric_values - m_empty) / (m_full - m_empty) of the curve's "
                    f"metric values {v.tolist()[:4]}, m_full={self.m_full!r} and m_empty={self.m_empty!r}"
                )

    @property
    def fractions(self) -> torch.Tensor:
        return self.counts.double() / self.num_edges

    def at(self, fraction: float) -> dict:
        """Faithfulness of each method at the point nearest ``fraction`` of the edges."""
        fraction = _check_fraction("fraction", fraction)
        if len(self.counts) == 0:
            raise ValueError("the curve has no points: nothing is near any fraction")
        i = int((self.fractions - fraction).abs().argmin())
        return {k: float(v[i]) for k, v in self.faithfulness.items()}

    def to_pandas(self):
        """Rows ``method``, ``edges``, ``fraction``, ``faithfulness``, ``metric``."""
        import pandas as pd

        rows = []
        for name, f in self.faithfulness.items():
            for i, c in enumerate(self.counts.tolist()):
                rows.append(
                    {
                        "method": name,
                        "edges": c,
                        "fraction": c / self.num_edges,
                        "faithfulness": float(f[i]),
                        "metric": float(self.metric_values[name][i]),
                    }
                )
        return pd.DataFrame(rows)

    def plot(self, path: str | None = None, ax=None, log_x: bool = True, title: str | None = None):
        """Faithfulness against the number of edges kept (one line per method), written to ``path`` when given
        (on ``ax``'s figure when ``ax`` is given). ``log_x``: a logarithmic axis of edges kept, linear from 0 to 1
        when the curve holds the empty circuit (0 edges), which is drawn too."""
        fig, ax, own = figure_axes(path, ax, (6, 4))
        x = self.counts.numpy()
        for name, f in self.faithfulness.items():
            ax.plot(x, _numpy_dtype(f).numpy(), marker="o", ms=3, label=name)
        if log_x:
            if bool((x == 0).any()):
                ax.set_xscale("symlog", linthresh=1)
            else:
                ax.set_xscale("log")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.axhline(0.0, color="grey", lw=0.8, ls=":")
        ax.set_xlabel(f"edges kept (of {self.num_edges})")
        ax.set_ylabel("faithfulness")
        ax.set_title(
            title or f"pruning curves ({self.mode}, {self.ablation} ablation, {self.metric})", fontsize=10
        )
        ax.legend(fontsize=8)
        finish(fig, path, own)
        return ax


# ------------------------------------------------------------------------------------------------ drawing


def _layout(graph: EdgeGraph) -> dict[str, tuple[float, float]]:
    """Node positions: embedding at the bottom, each layer's heads in a row (shared key/value heads, which only
    receive edges, just below their group), its MLP above (beside the heads in a parallel block), logits on top."""
    H = graph.n_heads
    xs = lambda n: [(i - (n - 1) / 2) * 1.2 for i in range(n)]
    pos = {"embed": (0.0, 0.0)}
    y = 1.0
    for layer in range(graph.n_layers):
        for h, x in enumerate(xs(H)):
            pos[f"L{layer}H{h}"] = (x, y)
        if graph.n_kv_heads != H:  # shared key/value heads: below the middle of their group of query heads
            G = H // graph.n_kv_heads
            for kv in range(graph.n_kv_heads):
                x = sum(xs(H)[kv * G : (kv + 1) * G]) / G
                pos[f"L{layer}KV{kv}"] = (x, y - 0.4)
        if graph.has_mlp:
            if graph.parallel:
                pos[f"MLP{layer}"] = ((H / 2 + 0.5) * 1.2, y)
            else:
                y += 1.0
                pos[f"MLP{layer}"] = (0.0, y)
        y += 1.0
    pos["logits"] = (0.0, y)
    return pos


def draw_circuit(
    graph: EdgeGraph,
    mask: torch.Tensor,
    scores: torch.Tensor | None = None,
    path: str | None = None,
    ax=None,
    title: str | None = None,
    max_edges: int | None = 200,
    annotate: int = 8,
):
    """Draw the edges of ``mask`` as a layered graph (matplotlib only).

    Edge width is proportional to ``|score|`` (blue: positive, red: negative); an edge into a head's query ends
    left of the head, key at its centre, value right, with solid / dashed / dotted lines. Per-position edges are
    summed over positions. Nodes without a kept edge are drawn faintly. The ``annotate`` edges with the largest
    ``|score|`` are labelled with their score (an edge whose score is NaN comes after every number, thin and grey).
    At most ``max_edges`` edges (those with the largest ``|score|``) are drawn: with more in ``mask`` a warning
    says how many were left out and the figure carries a note (``max_edges=None`` draws every one). ``mask``: a
    bool mask ``(num_edges,)`` (or one of 0s and 1s), or the edges or their names; ``scores``: one number per edge.
    With ``path`` the figure is written there (``ax``'s figure when ``ax`` is given; else a figure outside pyplot,
    leaving matplotlib's backend and pyplot's figures as they are).
    """
    check_graph_arg(graph, "graph", optional=False)
    mask = edge_mask(graph, mask, "mask")
    scores = edge_values(graph, scores, "scores")
    if max_edges is not None:
        _check_count("max_edges", max_edges)
    _check_count("annotate", annotate)
    from matplotlib.lines import Line2D
    from matplotlib.patches import FancyArrowPatch

    pos = _layout(graph)
    idx = mask.nonzero().flatten()
    sc = scores if scores is not None else torch.ones(len(graph))
    # aggregate per-position edges
    agg: dict[tuple, float] = {}
    for i in idx.tolist():
        e = graph[i]
        key = (e.src, e.dst, e.qkv)
        agg[key] = agg.get(key, 0.0) + float(sc[i])
    # largest |score| first; NaN scores last (a NaN compares false both ways, so it would scramble the order)
    items = sorted(agg.items(), key=lambda kv: (math.isnan(kv[1]), 0.0 if math.isnan(kv[1]) else -abs(kv[1])))
    dropped = 0 if max_edges is None else max(0, len(items) - max_edges)
    if dropped:
        what = "node pairs (per-position edges summed over positions)" if graph.per_position else "edges"
        warnings.warn(
            f"draw_circuit draws {max_edges} of the {len(items)} {what} of the mask, those with the largest "
            f"|score|, and leaves out {dropped}; give max_edges=None (or a larger number) to draw every one",
            stacklevel=user_stacklevel(),
        )
        items = items[:max_edges]
    smax = max([abs(v) for _, v in items if math.isfinite(v)], default=1.0) or 1.0
    w = max(6.0, 1.3 * graph.n_heads + 2)
    h = max(4.0, 1.1 * (max(p[1] for p in pos.values()) + 1))
    fig, ax, own = figure_axes(path, ax, (w, h))
    used = {k[0] for k, _ in items} | {k[1] for k, _ in items}
    off = {"q": -0.22, "k": 0.0, "v": 0.22, None: 0.0}
    style = {"q": "-", "k": "--", "v": ":", None: "-"}
    for rank, ((src, dst, qkv), v) in enumerate(items):
        x0, y0 = pos[src]
        x1, y1 = pos[dst]
        lw = 0.5 if math.isnan(v) else 5.0 if math.isinf(v) else 0.5 + 4.5 * abs(v) / smax
        color = "grey" if math.isnan(v) else "tab:blue" if v >= 0 else "tab:red"
        rad = 0.15 if abs(x1 - x0) < 1e-6 and abs(y1 - y0) > 1.5 else 0.05
        arr = FancyArrowPatch(
            (x0, y0 + 0.12),
            (x1 + off[qkv], y1 - 0.14),
            arrowstyle="-|>",
            mutation_scale=8,
            lw=lw,
            color=color,
            alpha=0.75,
            linestyle=style[qkv],
            connectionstyle=f"arc3,rad={rad}",
        )
        ax.add_patch(arr)
        if scores is not None and rank < annotate:
            xm, ym = (x0 + x1 + off[qkv]) / 2, (y0 + y1) / 2
            ax.text(xm, ym, f"{v:.2g}", fontsize=6, color=color, ha="center", va="center")
    for name, (x, y) in pos.items():
        faint = name not in used
        ax.text(
            x,
            y,
            name,
            ha="center",
            va="center",
            fontsize=8,
            color="grey" if faint else "black",
            bbox={
                "boxstyle": "round,pad=0.25",
                "fc": "white",
                "ec": "lightgrey" if faint else "black",
                "lw": 0.8,
            },
        )
    xs = [p[0] for p in pos.values()]
    ys = [p[1] for p in pos.values()]
    ax.set_xlim(min(xs) - 1, max(xs) + 1)
    ax.set_ylim(min(ys) - 0.6, max(ys) + 0.6)
    ax.axis("off")
    legend = [
        Line2D([0], [0], color="black", ls="-", label="-> q / MLP / logits"),
        Line2D([0], [0], color="black", ls="--", label="-> k"),
        Line2D([0], [0], color="black", ls=":", label="-> v"),
        Line2D([0], [0], color="tab:blue", lw=3, label="score > 0"),
        Line2D([0], [0], color="tab:red", lw=3, label="score < 0"),
    ]
    ax.legend(handles=legend, loc="upper left", fontsize=7, frameon=False)
    if dropped:
        ax.text(
            0.99,
            0.01,
            f"{max_edges} of {len(items) + dropped} edges drawn (largest |score|; max_edges={max_edges})",
            transform=ax.transAxes,
            ha="right",
            va="bottom",
            fontsize=7,
            color="grey",
        )
    if title:
        ax.set_title(title, fontsize=10)
    finish(fig, path, own)
    return ax
