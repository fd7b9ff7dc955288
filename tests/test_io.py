"""pypattern.io: every result round-trips through one format; pickles, truncated files and other results are refused
with an error naming the file, and nothing in a crafted file is executed."""

import json
import os
import pathlib
import pickle
import zipfile

import numpy as np
import pytest
import torch
from _result_cases import bif_result, npy, susceptibility_result

from pypattern import io
from pypattern.patching.results import PatchResult
from pypattern.sampling import CalibrationResult, LLCResult, SampleResult


def _sample_result():
    rng = np.random.default_rng(0)
    return SampleResult(
        loss_trace=rng.normal(size=(2, 5)),
        init_loss=0.25,
        init_losses=np.array([0.2, 0.3]),
        observables={"phi": rng.normal(size=(2, 5)), "vec": rng.normal(size=(2, 5, 3))},
        config={"step_size": 1e-3, "seed": [1, 2], "bounding_box": None, "restrict_to": ["a.*"]},
        r_hat=1.01,
        ess=7.5,
        seconds=0.5,
        batched=True,
    )


def _results() -> list:
    rng = np.random.default_rng(1)
    s = _sample_result()
    llc = LLCResult(
        llc_mean=1.5,
        llc_std=0.1,
        llc_per_chain=np.array([1.4, 1.6]),
        llc_trace=rng.normal(size=(2, 5)),
        loss_trace=s.loss_trace,
        init_loss=s.init_loss,
        nbeta=10.0,
        r_hat=float("nan"),
        ess=3.0,
        sample=s,
    )
    cal = CalibrationResult(
        step_sizes=np.array([1e-4, 1e-3]),
        llc_mean=np.array([1.0, 1.1]),
        llc_std=np.array([0.1, 0.2]),
        r_hat=np.array([1.0, 1.02]),
        ess=np.array([10.0, 9.0]),
        diverged=np.array([False, True]),
        healthy=np.array([True, False]),
        recommended=1e-4,
        reasons=["ok", "diverged (chain 0, draw 3)"],
    )
    sus = susceptibility_result(rng, settings={"seed": 0, "step_size": 1e-3})
    bif = bif_result(rng)
    pca = sus.pca(2)
    patch = PatchResult(
        values=torch.randn(3, 2, 4),
        clean=torch.randn(3),
        corrupted=torch.randn(3).to(torch.bfloat16),
        axes=("layer", "head"),
        coords={"layer": [0, 1], "head": [0, 1, 2, 3]},
        site="z",
        metric="logit_diff",
        info={"window": (1, 2), "per_position": False, 3: "int key"},
    )
    patch_no_corrupt = PatchResult(
        values=torch.randn(2, 3),
        clean=torch.randn(2),
        corrupted=None,
        axes=("pos",),
        coords={"pos": [0, 1, 2]},
    )
    return [s, llc, cal, sus, bif, pca, patch, patch_no_corrupt]


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)
    if isinstance(a, float) and np.isnan(a):
        return isinstance(b, float) and np.isnan(b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, tuple | list):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if hasattr(a, "__dataclass_fields__"):
        return type(a) is type(b) and all(
            _equal(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__
        )
    return type(a) is type(b) and a == b


RESULTS = _results()
IDS = [f"{type(r).__name__}{i}" for i, r in enumerate(RESULTS)]


@pytest.mark.parametrize("res", RESULTS, ids=IDS)
def test_round_trip(res, tmp_path):
    path = tmp_path / "r.npz"
    res.save(path)
    back = type(res).load(path)
    assert _equal(res, back)
    with np.load(path, allow_pickle=False) as z:  # a plain npz: numpy reads it without pickle
        assert "__meta_json__" in z.files


class _Exploit:
    """Unpickling this writes a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.write_text, (pathlib.Path(self.marker), "executed"))


@pytest.mark.parametrize("res", RESULTS, ids=IDS)
@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_crafted_pickle_is_refused_and_never_run(res, how, tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.npz"
    payload = {"values": _Exploit(marker)}
    if how == "pickle":
        with open(path, "wb") as f:
            pickle.dump(payload, f)
        with open(tmp_path / "check.pkl", "wb") as f:  # the crafted file does run code when unpickled
            pickle.dump(_Exploit(tmp_path / "control"), f)
        with open(tmp_path / "check.pkl", "rb") as f:
            pickle.load(f)
        assert (tmp_path / "control").exists()
    else:
        torch.save(payload, path)
    with pytest.raises(io.FormatError, match="evil.npz") as e:
        type(res).load(path)
    assert type(res).__name__ in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize("res", RESULTS, ids=IDS)
def test_truncated_file_is_refused(res, tmp_path):
    path = tmp_path / "cut.npz"
    res.save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(io.FormatError, match="cut.npz.*truncated or corrupt"):
        type(res).load(path)
    path.write_bytes(b"")
    with pytest.raises(io.FormatError, match="cut.npz"):
        type(res).load(path)


def test_another_result_type_is_refused(tmp_path):
    s, llc = RESULTS[0], RESULTS[1]
    s.save(tmp_path / "s.npz")
    with pytest.raises(
        io.FormatError, match=r"s.npz.*holds a 'SampleResult', expected a pypattern LLCResult"
    ):
        LLCResult.load(tmp_path / "s.npz")
    llc.save(tmp_path / "l.npz")
    with pytest.raises(io.FormatError, match="PatchResult"):
        PatchResult.load(tmp_path / "l.npz")


@pytest.mark.parametrize(
    "fields,arrays,match",
    [
        ({}, {}, "its fields do not make a LLCResult"),
        (
            {"llc_mean": {"__tensor__": "a", "dtype": "load"}},
            {"a": np.zeros(3)},
            "dtype 'load' is not a torch",
        ),
        (
            {"llc_mean": {"__tensor__": "a", "dtype": "float64"}, "nbeta": 1.0},
            {"a": np.zeros(3)},
            "(fields do not|field 'llc_mean' holds Tensor)",
        ),
    ],
    ids=["no-fields", "dtype-names-a-function", "fields-missing"],
)
def test_damaged_headers_are_format_errors(fields, arrays, match, tmp_path):
    """A well-formed file whose header does not describe a result (fields missing, a dtype that names a torch
    function) is a FormatError naming the file, never a TypeError from inside the loader."""
    header = {"format": io.FORMAT, "version": io.VERSION, "kind": "LLCResult", "fields": fields}
    path = tmp_path / "d.npz"
    np.savez(path, **arrays, __meta_json__=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8))
    with pytest.raises(io.FormatError, match=rf"d.npz.*{match}"):
        LLCResult.load(path)


def test_plain_npz_and_object_arrays_are_refused(tmp_path):
    np.savez(tmp_path / "plain.npz", a=np.zeros(3))
    with pytest.raises(io.FormatError, match="plain.npz.*without pypattern's header"):
        SampleResult.load(tmp_path / "plain.npz")
    with pytest.raises(TypeError, match="dtype object"):
        io.save(tmp_path / "o.npz", {"a": np.array([{}], dtype=object)}, {}, kind="x")


def test_save_is_atomic(tmp_path, monkeypatch):
    """A writer killed mid-file leaves the previous file intact and no temporary file behind."""
    path = tmp_path / "r.npz"
    RESULTS[0].save(path)
    before = path.read_bytes()

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(KeyboardInterrupt):
        RESULTS[1].save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["r.npz"]


def test_fingerprint_canonical_and_first_difference():
    a = io.fingerprint(seed=(1, 2), w=torch.arange(4.0), step_size=np.float32(0.5), fn=np.mean)
    b = io.fingerprint(seed=[1, 2], w=torch.arange(4.0), step_size=0.5, fn=np.mean)
    assert a == b
    io.check_fingerprint(a, b, "ck.npz")
    c = io.fingerprint(seed=[1, 2], w=-torch.arange(4.0), step_size=0.25, fn=np.mean)
    with pytest.raises(io.FingerprintMismatch, match="ck.npz.*: w = ") as e:
        io.check_fingerprint(a, c, "ck.npz")
    assert e.value.item == "w"  # the first differing item, in the current call's order
    with pytest.raises(io.FingerprintMismatch, match="extra = 1 there, \\(not set: the default\\) now"):
        io.check_fingerprint({**b, "extra": 1}, b, "ck.npz")
    # an item left out at its default is shown as the default's value when the caller knows it
    with pytest.raises(io.FingerprintMismatch, match="extra = 1 there, 200 \\(the default\\) now") as e:
        io.check_fingerprint({**b, "extra": 1}, b, "ck.npz", defaults={"extra": 200})
    assert e.value.item == "extra" and e.value.stored == 1
    with pytest.raises(io.FingerprintMismatch, match="extra = 200 \\(the default\\) there, 7 now"):
        io.check_fingerprint(b, {**b, "extra": 7}, "ck.npz", defaults={"extra": 200})
    # hashes see every bit: -0.0 and 0.0, a negated tensor, another dtype
    assert io.hash_tensor(torch.zeros(2)) != io.hash_tensor(-torch.zeros(2))
    assert io.hash_tensor(torch.zeros(2)) != io.hash_tensor(torch.zeros(2, dtype=torch.float64))
    assert io.hash_batch((torch.ones(2), torch.tensor([1]))) == io.hash_batch(
        [torch.ones(2), torch.tensor([1])]
    )


def test_json_text_writes_null_for_non_finite_numbers():
    """Reports are standard JSON: NaN and +-inf (Python, NumPy, 0-d tensors, in arrays) are written as null,
    everything else as json.dumps writes it."""
    obj = {
        "nan": float("nan"),
        "inf": np.float32("inf"),
        "t": torch.tensor(float("-inf")),
        "arr": np.array([1.0, np.nan]),
        "ok": (1, 2.5, np.int64(3), True, None, "s"),
        1: {None: 0.5, True: 1},
    }
    text = io.json_text(obj)
    back = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} written"))
    assert back == {
        "nan": None,
        "inf": None,
        "t": None,
        "arr": [1.0, None],
        "ok": [1, 2.5, 3, True, None, "s"],
        "1": {"null": 0.5, "true": 1},
    }
    assert json.loads(io.json_text({"x": object()}, default=lambda o: float("nan"))) == {"x": None}


@pytest.mark.parametrize("name", ["EdgeScores", "Circuit"])
def test_circuit_results_refuse_pickles_and_truncated_files(name, tmp_path):
    """The circuit results read through the same module: the same refusals."""
    from pypattern.circuits import results as circuit_results

    cls = getattr(circuit_results, name)
    marker = tmp_path / "marker"
    with open(tmp_path / "evil.npz", "wb") as f:
        pickle.dump({"mask": _Exploit(marker)}, f)
    with pytest.raises(io.FormatError, match=f"evil.npz.*{name}"):
        cls.load(tmp_path / "evil.npz")
    assert not marker.exists()
    RESULTS[0].save(tmp_path / "other.npz")
    with pytest.raises(io.FormatError, match=f"holds a 'SampleResult', expected a pypattern {name}"):
        cls.load(tmp_path / "other.npz")
    data = (tmp_path / "other.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 3])
    with pytest.raises(io.FormatError, match="cut.npz.*truncated or corrupt"):
        cls.load(tmp_path / "cut.npz")


def test_zero_d_values_and_colliding_member_names_round_trip(tmp_path):
    """A 0-d tensor or array keeps its shape; a mapping key that spells another value's member path ("blocks/0"
    beside "blocks": [...]) does not overwrite it."""
    r = PatchResult(
        values=torch.randn(2, 3),
        clean=torch.zeros(2),
        corrupted=None,
        axes=("layer",),
        coords={"layer": [0, 1, 2]},
        info={
            "gap": torch.tensor(0.5, dtype=torch.float64),
            "thr": np.array(3.0),
            "blocks": [np.arange(3)],
            "blocks/0": np.arange(10, 15),
        },
    )
    r.save(tmp_path / "r.npz")
    q = PatchResult.load(tmp_path / "r.npz")
    assert q.info["gap"].shape == () and q.info["gap"].dtype == torch.float64 and float(q.info["gap"]) == 0.5
    assert q.info["thr"].shape == () and float(q.info["thr"]) == 3.0
    np.testing.assert_array_equal(q.info["blocks"][0], np.arange(3))
    np.testing.assert_array_equal(q.info["blocks/0"], np.arange(10, 15))


@pytest.mark.parametrize("name", ["EdgeScores", "Circuit"])
def test_circuit_results_keep_bfloat16(name, tmp_path):
    """Scores of a bfloat16 model come back in bfloat16 (stored as float32, exactly)."""
    from pypattern.circuits import Circuit, EdgeGraph, EdgeScores

    g = EdgeGraph(2, 2)
    s = torch.randn(3, len(g)).bfloat16()
    if name == "Circuit":
        r = Circuit(g, torch.ones(len(g), dtype=torch.bool), s[0], 0.5, "acdc")
    else:
        r = EdgeScores(g, s, "eap", "denoising", "resample", "logit_diff", s[:, 0], s[:, 1])
    r.save(tmp_path / "r.npz")
    q = type(r).load(tmp_path / "r.npz")
    for field in ("scores",) if name == "Circuit" else ("values", "m_base", "m_clean"):
        a, b = getattr(r, field), getattr(q, field)
        assert b.dtype == torch.bfloat16 and torch.equal(a, b), field


def _loss_a(x, y, scale=1.0):
    return (x - y).pow(2).mean() * scale


def test_callable_identity_holds_what_changes_the_result():
    """Two callables of one name that compute different things differ: a partial's keyword values, a
    function's constants, defaults and closure, a loss module's settings and weights. The same callable made
    twice is the same (no memory address enters)."""
    import functools

    cid = io.callable_id
    assert cid(functools.partial(_loss_a, scale=1.0)) == cid(functools.partial(_loss_a, scale=1.0))
    assert cid(functools.partial(_loss_a, scale=1.0)) != cid(functools.partial(_loss_a, scale=2.0))
    assert cid(functools.partial(_loss_a, 1.0)) != cid(functools.partial(_loss_a, 2.0))
    assert cid(lambda x: x * 2) != cid(lambda x: x * 3)

    def make(k, obj=None):
        return lambda x: x * k

    assert cid(make(2)) == cid(make(2)) and cid(make(2)) != cid(make(3))
    assert cid(make(2, object())) == cid(make(2, object()))

    def with_default(x, k=2):
        return x * k

    def with_default_3(x, k=3):
        return x * k

    with_default_3.__qualname__ = with_default.__qualname__
    assert cid(with_default) != cid(with_default_3)
    ce = torch.nn.CrossEntropyLoss
    assert cid(ce()) == cid(ce()) and cid(ce()) != cid(ce(label_smoothing=0.1))
    assert cid(ce(weight=torch.ones(3))) != cid(ce(weight=2 * torch.ones(3)))
    # a mismatch names where the two differ
    a = io.fingerprint(loss_fn=functools.partial(_loss_a, scale=1.0))
    b = io.fingerprint(loss_fn=functools.partial(_loss_a, scale=2.0))
    with pytest.raises(
        io.FingerprintMismatch, match=r"first difference: loss_fn.keywords.scale = 1.0 there, 2.0 now"
    ):
        io.check_fingerprint(a, b, "ck.npz")


def test_temporaries_of_killed_writers_are_removed(tmp_path):
    """A writer killed outright (no cleanup) leaves its temporary file; the next write of that file removes the
    temporaries of processes no longer running once they are ten minutes old, and keeps a running writer's, a fresh
    one and another file's."""
    import subprocess
    import sys
    import time

    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead = int(done.stdout)
    old = time.time() - 3600
    names = {
        "stale": f".tmp-r.npz-{dead}-abc.npz",
        "fresh": f".tmp-r.npz-{dead}-def.npz",
        "running": f".tmp-r.npz-{os.getppid()}-ghi.npz",
        "other file": f".tmp-s.npz-{dead}-jkl.npz",
    }
    for what, name in names.items():
        (tmp_path / name).write_bytes(b"partial")
        if what != "fresh":
            os.utime(tmp_path / name, (old, old))
    RESULTS[0].save(tmp_path / "r.npz")
    left = set(os.listdir(tmp_path))
    assert names["stale"] not in left
    assert {names["fresh"], names["running"], names["other file"], "r.npz"} == left
    assert io.load(tmp_path / "r.npz")[1]["kind"]


def test_saved_files_get_the_mode_a_plain_open_gives(tmp_path):
    """A result is written to a temporary file and moved into place; the file ends with the mode open() would give:
    the umask as it is at the call for a new file, an existing file's own mode when it is written over (the
    temporary's 0600 had left the .npz unreadable to others beside the .csv and .json next to it)."""
    import stat

    from pypattern import io

    def mode(p):
        return stat.S_IMODE(os.stat(p).st_mode)

    old = os.umask(0o022)
    try:
        for mask in (0o022, 0o077, 0o002):
            os.umask(mask)
            io.save(str(tmp_path / f"a{mask}.npz"), {"x": np.zeros(3)}, {"k": 1}, kind="test-kind")
            (tmp_path / f"b{mask}.txt").write_text("x")
            assert mode(tmp_path / f"a{mask}.npz") == mode(tmp_path / f"b{mask}.txt") == 0o666 & ~mask
        os.umask(0o022)
        os.chmod(tmp_path / "a18.npz", 0o600)  # a file the user made private stays private when written over
        io.save(str(tmp_path / "a18.npz"), {"x": np.ones(3)}, {"k": 2}, kind="test-kind")
        assert mode(tmp_path / "a18.npz") == 0o600
    finally:
        os.umask(old)


def _rewrite(src, dst, members=None, header=None, compression=zipfile.ZIP_STORED):
    """Copy the archive ``src`` to ``dst`` with ``members`` (name -> array) replaced or added and the header's
    fields edited in place by ``header(fields)`` (the members it no longer names left out); every member
    written with ``compression``."""
    with zipfile.ZipFile(src) as z:
        data = {n: z.read(n) for n in z.namelist()}
    for name, a in (members or {}).items():
        data[f"{name}.npy"] = npy(a)
    if header is not None:
        with zipfile.ZipFile(src) as z, z.open("__meta_json__.npy") as f:
            meta = json.loads(np.lib.format.read_array(f).tobytes())
        header(meta["fields"])
        text = json.dumps(meta)
        data["__meta_json__.npy"] = npy(np.frombuffer(text.encode(), dtype=np.uint8))
        # members the edited header no longer names are left out (a file holding them is refused for that)
        data = {
            n: b for n, b in data.items() if n.startswith("__") or json.dumps(n.removesuffix(".npy")) in text
        }
    with zipfile.ZipFile(dst, "w", compression) as z:
        for n, b in data.items():
            z.writestr(n, b)
    return dst


def _intervention():
    from pypattern.patterning import Intervention

    return Intervention(
        h=np.array([0.5, -0.25]),
        weights=np.array([1.5, 0.75]),
        predicted=np.array([0.1]),
        target=np.array([0.1]),
        residual=0.0,
        method="pinv",
    )


@pytest.mark.parametrize(
    "res,member,array,match",
    [
        (_intervention(), "weights", np.array(["a", "b"]), "field 'weights' holds ndarray of <U1"),
        (RESULTS[1], "loss_trace", np.array([["x"] * 5] * 2), "field 'loss_trace' holds ndarray of <U1"),
        (RESULTS[2], "llc_mean", np.array([b"ab", b"cd"]), "field 'llc_mean' holds ndarray of |S2"),
        (
            RESULTS[0],
            "loss_trace",
            np.zeros((2, 5), dtype=[("a", "f8")]),
            r"field 'loss_trace' holds ndarray of \[\('a', '<f8'\)\]",
        ),
        (
            RESULTS[2],
            "step_sizes",
            np.array(["2020-01-01"], dtype="M8[D]"),
            "field 'step_sizes' holds ndarray",
        ),
        (RESULTS[6], "values", np.array(["a", "b"]), "member 'values' holds <U1 values, .* a float32 tensor"),
        (
            RESULTS[6],
            "clean",
            np.zeros(3, dtype=np.int64),
            "member 'clean' holds int64 values, .* a float32 tensor",
        ),
        (
            RESULTS[6],
            "corrupted",
            np.zeros(3, dtype=np.float64),
            "member 'corrupted' holds float64 .* bfloat16",
        ),
    ],
    ids=[
        "strings",
        "strings-2d",
        "bytes",
        "records",
        "dates",
        "tensor-strings",
        "tensor-int",
        "bfloat16-float64",
    ],
)
def test_edited_members_of_the_wrong_dtype_are_refused(res, member, array, match, tmp_path):
    """A member edited to hold strings, bytes, records or dates where the field declares an array of numbers, or
    a dtype other than the one the header gives its tensor, is a FormatError naming the file and the field."""
    res.save(tmp_path / "r.npz")
    bad = _rewrite(tmp_path / "r.npz", tmp_path / "bad.npz", members={member: array})
    with pytest.raises(io.FormatError, match=rf"bad.npz.*{match}"):
        type(res).load(bad)


def test_edited_members_of_other_numeric_dtypes_load(tmp_path):
    """Flags and integers are arrays of numbers: an edit to them passes the dtype check (which dtype a field
    takes, and its shape, are the class's own check)."""
    res = _intervention()
    res.save(tmp_path / "r.npz")
    n = len(res.weights)
    ok = _rewrite(tmp_path / "r.npz", tmp_path / "ok.npz", members={"weights": np.arange(n)})
    assert type(res).load(ok).weights.tolist() == list(range(n))


def _nested_intervention(fields):
    fields["sample"] = {
        "__result__": "Intervention",
        "fields": {
            "h": {"__array__": "llc_per_chain"},
            "weights": {"__array__": "llc_per_chain"},
            "predicted": {"__array__": "llc_per_chain"},
            "target": {"__array__": "llc_per_chain"},
            "residual": 0.0,
            "method": "pinv",
        },
    }


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda f: f["sample"]["fields"].update(observables={"__items__": [1]}), "TypeError"),
        (lambda f: f["sample"]["fields"].update(observables={"__tuple__": 3}), "expected a list"),
        (
            lambda f: f.update(sample={"__result__": "SampleResult", "fields": 5}),
            "nested SampleResult has no fields",
        ),
        (lambda f: f.update(sample={"__array__": ["x"]}), r"__array__ holds \['x'\], not a name"),
        (
            lambda f: f.update(sample={"__array__": "__meta_json__"}),
            "names array '__meta_json__' that the file",
        ),
        (
            lambda f: f.update(sample={"__array__": "nothing"}),
            "names array 'nothing' that the file does not hold",
        ),
        (lambda f: f.update(llc_mean={"__scalar__": 1.0, "dtype": "U3"}), "a NumPy scalar 1.0 of dtype 'U3'"),
        (lambda f: f.update(llc_mean={"__scalar__": "1", "dtype": "float32"}), "a NumPy scalar '1' of dtype"),
        (
            lambda f: f.update(llc_mean={"__scalar__": 300, "dtype": "uint8"}),
            "a NumPy scalar 300 of dtype 'uint8'",
        ),
        (_nested_intervention, "field 'sample' holds Intervention"),
    ],
    ids=[
        "items-not-pairs",
        "tuple-not-list",
        "nested-fields-not-dict",
        "array-ref-not-name",
        "array-ref-header",
        "array-ref-missing",
        "scalar-dtype",
        "scalar-value",
        "scalar-overflow",
        "nested-wrong-class",
    ],
)
def test_malformed_headers_are_format_errors(edit, match, tmp_path):
    """Header values that do not decode (tags holding the wrong JSON types, references that are not member names)
    and a nested result of another class than the field declares are FormatErrors naming the file."""
    RESULTS[1].save(tmp_path / "r.npz")
    bad = _rewrite(tmp_path / "r.npz", tmp_path / "bad.npz", header=edit)
    with pytest.raises(io.FormatError, match=rf"bad.npz.*{match}"):
        LLCResult.load(bad)


def test_deeply_nested_headers_are_refused(tmp_path):
    """A header nested deeper than MAX_DEPTH is refused before it is parsed (no RecursionError), by load_result
    and load alike; save refuses to write one."""
    RESULTS[1].save(tmp_path / "r.npz")
    deep = {"format": io.FORMAT, "version": io.VERSION, "kind": "LLCResult", "fields": {}}
    text = json.dumps(deep)[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    np.savez(tmp_path / "deep.npz", __meta_json__=np.frombuffer(text.encode(), dtype=np.uint8))
    with pytest.raises(io.FormatError, match=r"deep.npz.*nests 100001 containers deep, at most 100"):
        LLCResult.load(tmp_path / "deep.npz")
    with pytest.raises(io.FormatError, match=r"deep.npz.*nests 100001"):
        io.load(tmp_path / "deep.npz")
    # brackets inside strings do not count; a header just within the limit loads
    shallow = {"note": "[" * 500, "v": json.loads("[" * 90 + "]" * 90)}
    io.save(tmp_path / "ok.npz", {}, shallow, kind="x")
    assert io.load(tmp_path / "ok.npz", kind="x")[1]["note"] == "[" * 500
    with pytest.raises(ValueError, match="nest 102 containers deep; files hold at most 100"):
        io.save(tmp_path / "no.npz", {}, {"v": json.loads("[" * 101 + "]" * 101)}, kind="x")


def test_unreferenced_and_inflating_members_are_refused(tmp_path, monkeypatch):
    """A member the header does not reference is refused without being read; a member that declares far more
    bytes than it stores (a deflated run of zeros) is refused before it is decompressed."""
    iv = _intervention()
    iv.save(tmp_path / "r.npz")
    zeros = np.zeros(2_000_000)
    read = []
    real = np.lib.format.read_array
    monkeypatch.setattr(np.lib.format, "read_array", lambda f, **k: read.append(f.name) or real(f, **k))
    extra = _rewrite(tmp_path / "r.npz", tmp_path / "extra.npz", members={"unused": zeros})
    with pytest.raises(
        io.FormatError, match=r"extra.npz.*holds members \['unused'\] that its header does not"
    ):
        type(iv).load(extra)
    assert read == ["__meta_json__.npy"]  # nothing but the header was read
    bomb = _rewrite(
        tmp_path / "r.npz", tmp_path / "bomb.npz", members={"h": zeros}, compression=zipfile.ZIP_DEFLATED
    )
    read.clear()
    with pytest.raises(io.FormatError, match=r"bomb.npz.*member 'h' declares 16000128 bytes from \d+ stored"):
        type(iv).load(bomb)
    with pytest.raises(io.FormatError, match=r"bomb.npz.*member 'h' declares 16000128 bytes"):
        io.load(bomb)
    assert "h.npy" not in read
    # deflated members of ordinary size load: only the expansion is bounded
    small = _rewrite(tmp_path / "r.npz", tmp_path / "small.npz", compression=zipfile.ZIP_DEFLATED)
    np.testing.assert_array_equal(type(iv).load(small).weights, iv.weights)


def test_numpy_scalars_keep_their_type(tmp_path):
    """NumPy scalars in fields and containers come back as the NumPy scalars they were, with their values."""
    s = SampleResult(
        loss_trace=np.zeros((1, 2)),
        init_loss=np.float32(0.1),
        init_losses=np.zeros(1),
        r_hat=np.float64(1.25),
        ess=np.float16(3.5),
        batched=np.bool_(True),
        config={
            "seed": np.int64(2**40),
            "n": np.uint8(7),
            "flags": (np.bool_(False), 1.5),
            np.int32(3): "key",
        },
    )
    s.save(tmp_path / "s.npz")
    back = SampleResult.load(tmp_path / "s.npz")
    assert _equal(s, back)
    assert type(back.init_loss) is np.float32 and back.init_loss == np.float32(0.1)
    assert type(back.config["seed"]) is np.int64 and back.config["seed"] == 2**40
    assert type(back.batched) is np.bool_ and list(back.config) == ["seed", "n", "flags", 3]


@pytest.mark.skipif(os.name == "nt", reason="symbolic links need privileges on Windows")
def test_save_writes_through_a_symbolic_link(tmp_path):
    """Saving to a symbolic link replaces the file it points to, as numpy.savez does; the link stays."""
    (tmp_path / "store").mkdir()
    target = tmp_path / "store" / "r.npz"
    RESULTS[0].save(target)
    link = tmp_path / "link.npz"
    link.symlink_to(target)
    RESULTS[1].save(link)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert _equal(LLCResult.load(target), RESULTS[1])
    assert sorted(os.listdir(tmp_path / "store")) == ["r.npz"]


def _header_version(path) -> int:
    with zipfile.ZipFile(path) as z:
        raw = np.load(z.open(io._META + ".npy"), allow_pickle=False)
    return json.loads(raw.tobytes().decode())["version"]


def test_files_are_written_as_the_oldest_version_that_holds_them(tmp_path):
    """A file without NumPy scalars is format version 1 (what earlier readers read); one with them is version 2,
    which earlier readers refuse instead of misreading the tagged scalars. Both load; other versions are refused."""
    RESULTS[0].save(tmp_path / "plain.npz")
    assert _header_version(tmp_path / "plain.npz") == 1
    s = SampleResult(loss_trace=np.zeros((1, 2)), init_loss=np.float32(0.5), init_losses=np.zeros(1))
    s.save(tmp_path / "scalar.npz")
    assert _header_version(tmp_path / "scalar.npz") == 2
    assert type(SampleResult.load(tmp_path / "scalar.npz").init_loss) is np.float32
    assert _equal(type(RESULTS[0]).load(tmp_path / "plain.npz"), RESULTS[0])
    for version in (0, 3, "2", 2.0, True, None):
        header = {"format": io.FORMAT, "version": version, "kind": "LLCResult", "fields": {}}
        np.savez(tmp_path / "v.npz", **{io._META: np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)})
        with pytest.raises(io.FormatError, match="format version .*reads versions 1, 2"):
            io.load(tmp_path / "v.npz")


def test_the_header_items_are_the_files_own(tmp_path):
    """``meta`` items named like the header's own (as ``load`` returns them) are replaced by the file's: a loaded
    header saved again is a file of the kind and version written, not of the stale values."""
    io.save(
        tmp_path / "x.npz", {}, {"version": 7, "kind": "other", "format": "x", "fields": {}}, kind="LLCResult"
    )
    assert _header_version(tmp_path / "x.npz") == 1
    arrays, meta = io.load(tmp_path / "x.npz", kind="LLCResult")
    assert meta["format"] == io.FORMAT and meta["kind"] == "LLCResult" and meta["fields"] == {}
    io.save(tmp_path / "y.npz", arrays, meta, kind="LLCResult")
    assert io.load(tmp_path / "y.npz", kind="LLCResult")[1] == meta
