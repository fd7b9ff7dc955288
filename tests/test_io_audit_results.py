"""Saving and loading every result type: exact round trips (dtypes, shapes, NaN, NumPy scalars, nested metadata),
paths, and damaged files refused with a FormatError naming the file, without unpickling anything."""

import io as _bytes_io
import json
import os
import pickle
import tempfile
import zipfile

import numpy as np
import pytest
import torch
from _result_cases import npy

from pypattern import io
from pypattern.circuits.graph import EdgeGraph
from pypattern.circuits.results import Circuit, EdgeScores, PruningCurve
from pypattern.patching.results import PatchResult
from pypattern.sampling.checkpoint import load_checkpoint_state
from pypattern.sampling.results import LLCResult, SampleResult

GRAPH = EdgeGraph(n_layers=1, n_heads=2)
E = len(GRAPH)


def _edge_scores(dtype=torch.float32, info=None) -> EdgeScores:
    g = torch.Generator().manual_seed(0)
    values = torch.randn(E, 3, generator=g).to(dtype).T  # (3, E), not contiguous
    values[1, 2] = float("inf")
    return EdgeScores(
        GRAPH,
        values,
        "eap",
        "denoising",
        "zero",
        "logit_diff ü",
        torch.randn(3, generator=g).to(dtype),
        torch.randn(3, generator=g).to(dtype),
        {"steps": None, "seconds": 0.5} if info is None else info,
    )


def _circuit(dtype=torch.float32, info=None) -> Circuit:
    mask = torch.arange(E) % 3 == 0
    scores = torch.linspace(-1, 1, E).to(dtype)
    return Circuit(GRAPH, mask, scores, 0.25, "eap", {"n": int(mask.sum())} if info is None else info)


def _curve(dtype=torch.float32) -> PruningCurve:
    mv = torch.tensor([1.0, 2.0, 3.0], dtype=dtype)
    faith = (mv - 1.0) / (3.0 - 1.0)
    return PruningCurve(
        torch.tensor([0, 2, E]),
        E,
        {"eap": faith},
        {"eap": mv},
        3.0,
        1.0,
        "denoising",
        "zero",
        "m",
        {"t": (1, 2)},
    )


def _patch(dtype=torch.float32) -> PatchResult:
    v = torch.arange(24, dtype=torch.float32).reshape(2, 4, 3).to(dtype).transpose(1, 2)  # (2, 3, 4)
    v[0, 0, 0] = float("nan")
    return PatchResult(
        v,
        torch.tensor([1.0, 2.0]).to(dtype),
        torch.tensor([0.0, 0.5]).to(dtype),
        ("layer", "pos"),
        {"layer": ["ä", "β", "c"], "pos": [0, 1, 2, np.int64(3)]},
        site="résidu",
        metric="m",
        info={"graddrop": v.clone(), "n": np.int32(4), "nested": {"a": [1, (2, 3)]}},
    )


def _llc() -> LLCResult:
    rng = np.random.default_rng(0)
    loss = rng.normal(size=(3, 2)).astype(np.float32).T  # (2, 3), not contiguous
    s = SampleResult(loss, np.float32(0.5), np.array([0.5]), config={"step_size": np.float64(1e-3), 7: "x"})
    return LLCResult(1.0, 0.1, np.array([0.9, 1.1]), 2.0 * (loss - 0.5), loss, 0.5, 2.0, sample=s)


MAKERS = {
    "PatchResult": _patch,
    "EdgeScores": _edge_scores,
    "Circuit": _circuit,
    "PruningCurve": _curve,
    "LLCResult": _llc,
    "SampleResult": lambda: _llc().sample,
}
CLASSES = {
    "PatchResult": PatchResult,
    "EdgeScores": EdgeScores,
    "Circuit": Circuit,
    "PruningCurve": PruningCurve,
    "LLCResult": LLCResult,
    "SampleResult": SampleResult,
}


def _same(a, b) -> bool:
    """Equal values of equal types: tensors and arrays by dtype, shape and values (NaN equal to NaN)."""
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a.isnan(), b.isnan())
            and torch.equal(torch.nan_to_num(a.detach()), torch.nan_to_num(b))
        )
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, float) and a != a:
        return isinstance(b, float) and b != b
    return type(a) is type(b) and a == b


@pytest.fixture
def no_unpickling(monkeypatch):
    """pickle.load / pickle.loads and numpy's allow_pickle=True raise while the test runs."""

    def refuse(*a, **k):
        raise AssertionError("a loader unpickled")

    np_load = np.load

    def guarded(*a, **k):
        if k.get("allow_pickle"):
            raise AssertionError("a loader called numpy.load with allow_pickle=True")
        return np_load(*a, **k)

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(np, "load", guarded)


# ------------------------------------------------------------------------------------------------ round trips


INFO = {
    "steps": None,
    "seconds": 0.5,
    "count": np.int64(4),
    "scale": np.float32(2.5),
    "flag": np.bool_(True),
    "nan": float("nan"),
    "pair": (1, "b"),
    "nested": {"ü": [1, {"x": np.uint8(3)}], 2: "int key"},
    "array": np.array([[1.5, np.inf]], dtype=np.float16),
    "tensor": torch.tensor([1.0, -2.0], dtype=torch.bfloat16),
}


@pytest.mark.parametrize("kind", ["EdgeScores", "Circuit"])
def test_circuits_info_round_trips_exactly(tmp_path, kind, no_unpickling):
    info = dict(INFO)
    if kind == "Circuit":
        info["n"] = np.int64(int((torch.arange(E) % 3 == 0).sum()))  # the record load checks
    obj = _edge_scores(info=info) if kind == "EdgeScores" else _circuit(info=info)
    obj.save(tmp_path / "r.npz")
    back = type(obj).load(tmp_path / "r.npz")
    assert _same(info, back.info)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["PatchResult", "EdgeScores", "Circuit", "PruningCurve"])
def test_tensor_results_round_trip_dtypes(tmp_path, kind, dtype, no_unpickling):
    obj = MAKERS[kind](dtype)
    obj.save(str(tmp_path / "r"))  # no suffix: the file is the path given
    back = CLASSES[kind].load(str(tmp_path / "r"))
    for f in {
        "PatchResult": ("values", "clean", "corrupted", "axes", "coords", "site", "info"),
        "EdgeScores": ("values", "m_base", "m_clean", "method", "metric", "info"),
        "Circuit": ("mask", "scores", "faithfulness", "method", "info"),
        "PruningCurve": ("counts", "num_edges", "faithfulness", "metric_values", "m_full", "info"),
    }[kind]:
        assert _same(getattr(obj, f), getattr(back, f)), f


def test_llc_result_round_trip(tmp_path, no_unpickling):
    obj = _llc()
    obj.save(tmp_path / "deep" / "new" / "llc ü.npz")  # folders that do not exist are made
    back = LLCResult.load(tmp_path / "deep" / "new" / "llc ü.npz")
    for f in ("llc_per_chain", "llc_trace", "loss_trace", "llc_mean", "nbeta"):
        assert _same(getattr(obj, f), getattr(back, f)), f
    for f in ("loss_trace", "init_loss", "init_losses", "config", "observables"):
        assert _same(getattr(obj.sample, f), getattr(back.sample, f)), f


def test_empty_results_round_trip(tmp_path):
    pr = PatchResult(torch.empty(0, 0, 3), torch.empty(0), None, ("a", "b"), {"a": [], "b": [1, 2, 3]})
    pr.save(tmp_path / "p.npz")
    back = PatchResult.load(tmp_path / "p.npz")
    assert back.values.shape == (0, 0, 3) and back.corrupted is None and back.coords == pr.coords
    c = Circuit(GRAPH, torch.zeros(E, dtype=torch.bool))
    c.save(tmp_path / "c.npz")
    back = Circuit.load(tmp_path / "c.npz")
    assert len(back) == 0 and back.scores is None and back.faithfulness is None
    es = EdgeScores(GRAPH, torch.empty(0, E), "eap", "noising", "zero", "m", torch.empty(0), torch.empty(0))
    es.save(tmp_path / "e.npz")
    assert EdgeScores.load(tmp_path / "e.npz").values.shape == (0, E)
    s = SampleResult(np.empty((0, 0)), float("nan"), np.empty(0))
    s.save(tmp_path / "s.npz")
    assert SampleResult.load(tmp_path / "s.npz").loss_trace.shape == (0, 0)


def test_circuits_save_tensors_with_autograd_and_negative_bit(tmp_path):
    values = torch.randn(3, E, requires_grad=True) * 2.0  # part of a graph
    neg = torch._neg_view(torch.randn(3))  # a lazy negation (as some torch ops return)
    es = EdgeScores(GRAPH, values, "eap", "denoising", "zero", "m", neg, torch.randn(3, requires_grad=True))
    es.save(tmp_path / "e.npz")
    back = EdgeScores.load(tmp_path / "e.npz")
    assert torch.equal(back.values, values.detach()) and not back.values.requires_grad
    assert torch.equal(back.m_base, neg.resolve_neg())
    assert torch.equal(back.m_clean, es.m_clean.detach())
    scores = torch.linspace(-1, 1, E, requires_grad=True) * 1.0
    c = Circuit(GRAPH, torch.arange(E) < 3, scores, 0.5, "eap")
    c.save(tmp_path / "c.npz")
    assert torch.equal(Circuit.load(tmp_path / "c.npz").scores, scores.detach())


def test_circuits_info_that_cannot_be_saved_is_refused(tmp_path):
    with pytest.raises(TypeError, match="info/fn: a function cannot be saved"):
        _edge_scores(info={"fn": lambda x: x}).save(tmp_path / "e.npz")
    c = _circuit()
    c.info = [1, 2]
    with pytest.raises(TypeError, match="info must be a dict"):
        c.save(tmp_path / "c.npz")
    assert not os.listdir(tmp_path)  # nothing written


def test_edge_scores_file_with_plain_info_loads(tmp_path):
    """A file whose info holds plain JSON values (numbers, strings, None) reads as it did."""
    es = _edge_scores()
    meta = {
        "graph": {
            "n_layers": 1,
            "n_heads": 2,
            "has_mlp": True,
            "parallel": False,
            "n_pos": None,
            "n_kv_heads": 2,
        },
        "method": "eap",
        "mode": "denoising",
        "ablation": "zero",
        "metric": "m",
        "info": {"steps": 5, "seconds": 0.25, "passes": None},
    }
    arrays = {k: getattr(es, k).contiguous().numpy() for k in ("values", "m_base", "m_clean")}
    io.save(tmp_path / "old.npz", arrays, meta, kind="EdgeScores")
    back = EdgeScores.load(tmp_path / "old.npz")
    assert back.info == {"steps": 5, "seconds": 0.25, "passes": None}
    assert torch.equal(back.values, es.values)


# ------------------------------------------------------------------------------------------------ paths


def test_bytes_path(tmp_path):
    p = os.fsencode(str(tmp_path / "b.npz"))
    _llc().save(p)
    assert LLCResult.load(p).loss_trace.shape == (2, 3)
    _circuit().save(p)  # the circuits' own writers go through the same file functions
    assert len(Circuit.load(p)) == len(_circuit())


def test_empty_path_refused(tmp_path, monkeypatch):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    for save in (_llc().save, _circuit().save, _edge_scores().save):
        with pytest.raises(ValueError, match="path='' is not valid: it is empty"):
            save("")
    for cls in (LLCResult, Circuit, EdgeScores, PruningCurve):
        with pytest.raises(ValueError, match="path='' is not valid: it is empty"):
            cls.load("")
    assert sorted(os.listdir(tmp_path)) == ["cwd"] and not os.listdir(work)  # nothing written anywhere


def test_unwritable_folder_named(tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    for obj in (_llc(), _circuit(), _curve()):
        with pytest.raises(
            PermissionError, match=r"cannot write '.*r\.npz': its folder .* does not take a new file"
        ):
            obj.save(tmp_path / "r.npz")


def test_folder_and_missing_file(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a folder"):
        _circuit().save(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        EdgeScores.load(tmp_path / "nope.npz")
    with pytest.raises(TypeError, match="path=3 is not valid"):
        PatchResult.load(3)


# ------------------------------------------------------------------------------------------------ damaged files


def _rewrite(src, dst, meta=None, replace=None, extra=None) -> None:
    """A copy of archive ``src`` at ``dst`` with its header edited by ``meta(header)`` and members replaced or
    added (raw .npy bytes)."""
    with zipfile.ZipFile(src) as z:
        members = {n: z.read(n) for n in z.namelist()}
    header = json.loads(np.lib.format.read_array(_bytes_io.BytesIO(members["__meta_json__.npy"])).tobytes())
    if meta is not None:
        meta(header)
    members["__meta_json__.npy"] = npy(np.frombuffer(json.dumps(header).encode(), dtype=np.uint8))
    members.update(replace or {})
    members.update(extra or {})
    with zipfile.ZipFile(dst, "w") as z:
        for n, b in members.items():
            z.writestr(n, b)


def _object_npy() -> bytes:
    b = _bytes_io.BytesIO()
    np.save(b, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    return b.getvalue()


def _first_member(path) -> str:
    return next(n for n in zipfile.ZipFile(path).namelist() if n != "__meta_json__.npy")


DAMAGES = {
    "truncated": lambda src, dst: open(dst, "wb").write(open(src, "rb").read()[:-200]),
    "empty file": lambda src, dst: open(dst, "wb").close(),
    "pickle": lambda src, dst: pickle.dump({"values": [1.0]}, open(dst, "wb")),
    "plain npz": lambda src, dst: np.savez(open(dst, "wb"), values=np.ones(3)),
    "future version": lambda src, dst: _rewrite(src, dst, lambda m: m.update(version=io.VERSION + 1)),
    "version not a number": lambda src, dst: _rewrite(src, dst, lambda m: m.update(version="2")),
    "object member": lambda src, dst: _rewrite(src, dst, replace={_first_member(src): _object_npy()}),
    "extra object member": lambda src, dst: _rewrite(src, dst, extra={"more.npy": _object_npy()}),
    "member of another shape": lambda src, dst: _rewrite(
        src, dst, replace={_first_member(src): npy(np.zeros((7, 5, 3), np.float32))}
    ),
    "header not JSON": lambda src, dst: _rewrite(
        src, dst, replace={"__meta_json__.npy": npy(np.frombuffer(b'{"format": "pyp', dtype=np.uint8))}
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
@pytest.mark.parametrize("kind", list(CLASSES))
def test_damaged_file_refused_naming_it(tmp_path, kind, damage, no_unpickling):
    src, dst = tmp_path / "good.npz", tmp_path / f"damaged {damage}.npz"
    MAKERS[kind]().save(src)
    DAMAGES[damage](src, dst)
    with pytest.raises(io.FormatError) as e:
        CLASSES[kind].load(dst)
    assert repr(str(dst)) in str(e.value)
    if damage == "future version":
        assert "upgrade pypattern" in str(e.value)


@pytest.mark.parametrize("kind", list(CLASSES))
def test_another_kind_refused(tmp_path, kind, no_unpickling):
    for other in CLASSES:
        if other != kind:
            MAKERS[other]().save(tmp_path / f"{other}.npz")
            with pytest.raises(io.FormatError, match=f"holds a '{other}', expected a pypattern {kind} file"):
                CLASSES[kind].load(tmp_path / f"{other}.npz")


def test_every_registered_loader_refuses_without_unpickling(tmp_path, no_unpickling):
    """Every result class :mod:`pypattern.io` knows, and the checkpoint reader: a pickle, a file of another kind,
    an object member and a future version are refused naming the file."""
    src = tmp_path / "llc.npz"
    _llc().save(src)
    pkl = tmp_path / "x.pkl"
    pickle.dump([1, 2], open(pkl, "wb"))
    for name, cls in sorted(io._RESULTS.items()):
        cases = [pkl]
        if name != "LLCResult":
            cases.append(src)
        for label, edit in (
            ("object", lambda m, name=name: m.update(kind=name)),
            ("version", lambda m, name=name: m.update(kind=name, version=io.VERSION + 1)),
        ):
            p = tmp_path / f"{name}-{label}.npz"
            _rewrite(src, p, edit, extra={"loss.npy": _object_npy()})
            cases.append(p)
        for p in cases:
            with pytest.raises(io.FormatError) as e:
                cls.load(p)
            assert repr(str(p)) in str(e.value), (name, p)
    for p in (pkl, src):
        with pytest.raises(io.FormatError, match=repr(str(p))):
            load_checkpoint_state(p)


def test_circuits_info_members_checked(tmp_path, no_unpickling):
    src = tmp_path / "e.npz"
    _edge_scores(info={"t": torch.ones(2)}).save(src)
    cases = {
        "names array 'values'": lambda m: m["info"].update(u={"__array__": "values"}),
        "names array 'gone'": lambda m: m["info"].update(u={"__array__": "gone"}),
        "holds members \\['info/t'\\]": lambda m: m["info"].pop("t"),
        "dtype .nope. is not a torch dtype": lambda m: m["info"].update(
            t={"__tensor__": "info/t", "dtype": "nope"}
        ),
    }
    for i, (msg, edit) in enumerate(cases.items()):
        p = tmp_path / f"bad{i}.npz"
        _rewrite(src, p, edit)
        with pytest.raises(io.FormatError, match=msg):
            EdgeScores.load(p)


def test_read_only_file_not_replaced(tmp_path, monkeypatch):
    target = tmp_path / "r.npz"
    _llc().save(target)
    before = target.read_bytes()
    os.chmod(target, 0o444)
    access = os.access

    def read_only(p, mode, *a, **k):  # as an unprivileged user sees a 0444 file (root may write any file)
        if os.fspath(p) == str(target) and mode & os.W_OK:
            return False
        return access(p, mode, *a, **k)

    monkeypatch.setattr(os, "access", read_only)
    for obj in (_llc(), _circuit(), _edge_scores(), _curve()):
        with pytest.raises(PermissionError, match="r.npz': the file there is read-only"):
            obj.save(target)
    assert target.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["r.npz"]  # no temporary left
