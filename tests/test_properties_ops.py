"""Property-based tests of the ops (hypothesis): generated shapes, dtypes, strides, empty and non-finite inputs and
bad hyperparameters, each call checked against one invariant: either a clear error (its type expected and its
message naming an offending argument) or a result equal to the reference computation.

* :func:`pypattern.sgld_step_` on every available backend against the ``reference`` backend, and the same call on
  contiguous copies (the noise is keyed by the logical element index, so the layout must not matter);
* :class:`pypattern.CrossCovariance` (every backend of its chunk update, any chunking, buffering and auto mode)
  against ``numpy.cov`` of all draws at once;
* :func:`pypattern.per_sample_grad_gram` against per-sample gradients taken one sample at a time by autograd.

The budget is the ``pypattern`` hypothesis profile of ``tests/conftest.py`` (derandomized, bounded examples).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from _backend_cases import backend_devices

import pypattern

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import event, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _available(op: str) -> list[tuple[str, str]]:
    """The (backend, device) pairs of ``op`` that can run here (tests/_backend_cases.py decides the devices)."""
    return [tuple(p.values) for p in backend_devices(op) if not p.marks]


SGLD_BACKENDS = _available("sgld_step_")
COV_BACKENDS = _available("covariance_update_")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
LAYOUTS = ("contiguous", "transposed", "strided", "offset")


def _make(values: np.ndarray, dtype: torch.dtype, layout: str, device: str) -> torch.Tensor:
    """A tensor holding ``values`` with the given memory layout: contiguous, a transposed view, a view with a
    step of 2 in the last dimension, or a view at a storage offset."""
    shape = values.shape
    if layout == "transposed" and len(shape) >= 2:
        return torch.tensor(
            np.ascontiguousarray(values.swapaxes(-1, -2)), dtype=dtype, device=device
        ).transpose(-1, -2)
    if layout == "strided" and len(shape) >= 1:
        buf = torch.full((*shape[:-1], 2 * shape[-1] + 1), 7.0, dtype=dtype, device=device)
        view = buf[..., 1::2]
        view.copy_(torch.tensor(values, dtype=dtype))
        return view
    if layout == "offset":
        n = int(np.prod(shape))
        buf = torch.full((n + 3,), 7.0, dtype=dtype, device=device)
        view = buf[3:].view(shape)
        view.copy_(torch.tensor(values, dtype=dtype))
        return view
    return torch.tensor(values, dtype=dtype, device=device)


def _names_one_of(message: str, names) -> bool:
    return any(re.search(rf"(?<![A-Za-z_]){re.escape(n)}(?![A-Za-z_])", message) for n in names)


# ------------------------------------------------------------------------------------------------ sgld_step_

_GOOD_HYPER = {
    "step_size": st.floats(1e-6, 0.1),
    "nbeta": st.floats(0.0, 1e3),
    "localization": st.floats(0.0, 1e3),
    "weight_decay": st.floats(0.0, 1.0),
    "noise_scale": st.sampled_from([0.0, 1.0, 0.3]),
}
_BAD_HYPER = st.sampled_from([-1.0, float("nan"), float("inf"), -float("inf"), "fast", None])


@st.composite
def sgld_case(draw):
    dtype = draw(st.sampled_from(list(DTYPES)))
    count = draw(st.integers(0, 3))
    tensors = []
    faults: list[str] = []  # the arguments a correct error may name
    for i in range(count):
        shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=3)))
        seed = draw(st.integers(0, 2**16))
        rng = np.random.default_rng(seed)
        w = np.array(rng.standard_normal(shape))  # np.array: 0-d arrays stay arrays (writable in place)
        a = np.array(w + 0.1 * rng.standard_normal(shape))
        big = float(np.finfo(np.float32 if dtype == "float32" else np.float64).max)
        # gradients up to the largest finite values: the update of a finite gradient may overflow
        g = np.array(
            rng.standard_normal(shape) * draw(st.sampled_from([1.0, 1e3, big / 1e3, big / 4, 1e300]))
        )
        with np.errstate(over="ignore"):
            cast_inf = dtype == "float32" and np.isinf(g.astype(np.float32)).any()
        if cast_inf:  # the cast to float32 makes it inf: a non-finite gradient
            faults.append(f"grads[{i}]")
        spec = {
            "w": w,
            "g": g,
            "a": a,
            "layouts": [draw(st.sampled_from(LAYOUTS)) for _ in range(4)],
            "mask": draw(st.sampled_from([None, "bool", "float"])),
            "alias": False,
        }
        if spec["mask"] is not None:
            m = rng.random(shape)
            spec["mask_values"] = np.array(
                (m > 0.3) if spec["mask"] == "bool" else np.where(m > 0.3, m * 2, 0.0)
            )
        fault = draw(
            st.sampled_from(
                [None] * 20
                + ["grad_nan", "grad_inf", "grad_nan", "grad_inf", "anchor_nan", "mask_nan"]
                + ["grad_shape", "grad_dtype", "alias", "int"]
            )
        )
        numel = int(np.prod(shape))
        if fault in ("grad_nan", "grad_inf", "anchor_nan", "mask_nan", "alias") and numel == 0:
            fault = None  # nothing to poison in an empty tensor
        if fault == "mask_nan" and spec["mask"] != "float":
            spec["mask"], spec["mask_values"] = "float", np.ones(shape)
        spec["fault"] = fault
        if fault in ("grad_nan", "grad_inf"):
            g.reshape(-1)[draw(st.integers(0, numel - 1))] = np.nan if fault == "grad_nan" else -np.inf
            faults.append(f"grads[{i}]")
        elif fault == "anchor_nan":
            a.reshape(-1)[draw(st.integers(0, numel - 1))] = np.nan
            faults.append(f"anchors[{i}]")
        elif fault == "mask_nan":
            spec["mask_values"].reshape(-1)[draw(st.integers(0, numel - 1))] = np.nan
            faults.append(f"masks[{i}]")
        elif fault in ("grad_shape", "grad_dtype", "int"):
            faults.append(
                {"grad_shape": f"grads[{i}]", "grad_dtype": f"grads[{i}]", "int": f"params[{i}]"}[fault]
            )
        elif fault == "alias":
            spec["alias"] = True
            faults.append(f"anchors[{i}]")
        tensors.append(spec)
    hyper = {k: draw(s) for k, s in _GOOD_HYPER.items()}
    hyper["bounding_box"] = draw(st.sampled_from([None, 0.05, 1.0]))
    bad_names = []
    if draw(st.sampled_from([False] * 4 + [True])):  # one call in five gets one or two bad hyperparameters
        names = st.sampled_from([*_GOOD_HYPER, "bounding_box"])
        bad_names = draw(st.lists(names, min_size=1, max_size=2, unique=True))
    for name in bad_names:
        bad = draw(_BAD_HYPER)
        if bad is None and name != "bounding_box":
            bad = -0.0 if name == "step_size" else float("nan")  # None is valid only for the box
        if bad is None:
            continue
        hyper[name] = bad
        faults.append(name)
    hyper["seed"] = draw(st.integers(0, 2**64 - 1))
    hyper["step"] = draw(st.integers(0, 2**64 - 1))
    if draw(st.sampled_from([False] * 9 + [True])):
        hyper["seed"] = draw(st.sampled_from([-1, 2**64, 1.5]))
        faults.append("seed")
    return dtype, tensors, hyper, faults


def _sgld_inputs(tensors, dtype_name: str, device: str, contiguous: bool):
    dtype = DTYPES[dtype_name]
    params, grads, anchors, masks = [], [], [], []
    for spec in tensors:
        lw, lg, la, lm = ("contiguous",) * 4 if contiguous else spec["layouts"]
        pdt = torch.int64 if spec["fault"] == "int" else dtype
        w = _make(spec["w"], pdt, lw, device)
        g = spec["g"]
        if spec["fault"] == "grad_shape":
            g = np.concatenate([g.reshape(-1), [0.0]])
        gdt = (
            (torch.float64 if dtype == torch.float32 else torch.float32)
            if spec["fault"] == "grad_dtype"
            else dtype
        )
        with np.errstate(over="ignore"):
            grads.append(_make(g, gdt, lg, device))
        params.append(w)
        anchors.append(w if spec["alias"] else _make(spec["a"], dtype, la, device))
        if spec["mask"] is None:
            masks.append(None)
        else:
            mdt = torch.bool if spec["mask"] == "bool" else dtype
            masks.append(_make(spec["mask_values"], mdt, lm, device))
    return params, grads, anchors, (masks if any(m is not None for m in masks) else None)


def _step(backend, device, dtype_name, tensors, hyper, *, contiguous=False, sanitize=False):
    """(params before the call, params after it, the exception or None). ``sanitize``: the gradients' non-finite
    entries set to 0 and frozen by the masks (what the fast kernels do with them: they leave exactly those entries
    unchanged and step the others)."""
    params, grads, anchors, masks = _sgld_inputs(tensors, dtype_name, device, contiguous)
    if sanitize:
        masks = list(masks) if masks is not None else [None] * len(params)
        for i, g in enumerate(grads):
            if g.is_floating_point() and g.shape == params[i].shape and not bool(torch.isfinite(g).all()):
                ok = torch.isfinite(g)
                grads[i] = torch.where(ok, g, torch.zeros_like(g))
                m = masks[i]
                masks[i] = ok if m is None else (m & ok if m.dtype == torch.bool else m * ok)
    before = [p.detach().to("cpu", torch.float64).clone() for p in params]
    try:
        pypattern.sgld_step_(params, grads, anchors, masks=masks, backend=backend, **hyper)
        err = None
    except (ValueError, TypeError, FloatingPointError) as e:
        err = e
    return before, [p.detach().to("cpu", torch.float64) for p in params], err


def _sgld_tolerance(tensors, hyper, dtype_name):
    """Elementwise bound on the rounding difference of two correct implementations: a few ulps of every term of
    the update (the noise differs in the last bits between math libraries)."""
    tol = 2e-6 if dtype_name == "float32" else 1e-12
    noise_tol = 2e-6  # the fast kernels draw the normals in float32 for both dtypes (see tests/test_sgld.py)
    out = []
    eps = float(hyper["step_size"])
    for spec in tensors:
        with np.errstate(over="ignore", invalid="ignore"):
            w, g, a = (np.abs(np.nan_to_num(spec[k], posinf=0, neginf=0)) for k in ("w", "g", "a"))
            terms = (
                w
                + 0.5 * eps * (float(hyper["nbeta"]) * g + float(hyper["localization"]) * (w + a))
                + 0.5 * eps * float(hyper["weight_decay"]) * w
            )
        out.append(tol * (1.0 + terms) + noise_tol * 6.0 * math.sqrt(eps) * float(hyper["noise_scale"]))
    return out


@pytest.mark.skipif(len(SGLD_BACKENDS) < 1, reason="no backend")
@given(sgld_case())
def test_sgld_step_is_an_error_naming_an_argument_or_equals_the_reference(case):
    dtype_name, tensors, hyper, faults = case
    before, ref, ref_err = _step("reference", "cpu", dtype_name, tensors, hyper)
    overflow = isinstance(ref_err, FloatingPointError) and "overflowed" in str(ref_err)
    event("result: " + ("overflow" if overflow else type(ref_err).__name__ if ref_err else "stepped"))
    if ref_err is not None:
        msg = str(ref_err)
        named = faults + ([f"params[{i}]" for i in range(len(tensors))] if overflow else [])
        assert _names_one_of(msg, named), (type(ref_err).__name__, msg, faults)
        if faults and not isinstance(ref_err, FloatingPointError):
            assert isinstance(ref_err, ValueError | TypeError)
    else:
        assert not faults, f"no error for the faulty arguments {faults}"
    if ref_err is not None and not isinstance(ref_err, FloatingPointError):
        for b, r in zip(before, ref):  # refused before any write
            assert torch.equal(torch.nan_to_num(b, nan=0.5), torch.nan_to_num(r, nan=0.5))
    tol = None  # computed once the hyperparameters are known to be valid
    for backend, device in SGLD_BACKENDS:
        _, out, err = _step(backend, device, dtype_name, tensors, hyper)
        # the same error (same type, same message: validation happens before the backend is chosen) ...
        assert type(err) is type(ref_err), (backend, err, ref_err)
        if err is not None and not isinstance(err, FloatingPointError):
            assert str(err) == str(ref_err)
            continue
        if backend == "reference":
            continue
        # ... and the same parameters after the call (entries with a non-finite gradient left unchanged)
        tol = tol or _sgld_tolerance(tensors, hyper, dtype_name)
        for i, (o, r, t) in enumerate(zip(out, ref, tol)):
            t = torch.as_tensor(t, dtype=torch.float64).reshape(r.shape)
            same_nonfinite = torch.equal(torch.isfinite(o), torch.isfinite(r)) and torch.equal(
                o[~torch.isfinite(o)], r[~torch.isfinite(r)]
            )
            assert same_nonfinite, (backend, i, "non-finite entries differ", o, r)
            fin = torch.isfinite(r)
            assert bool(((o[fin] - r[fin]).abs() <= t[fin]).all()), (backend, i, (o - r).abs().max())
        # the layout does not change the result: the same backend on contiguous copies, bit for bit
        _, out_c, err_c = _step(backend, device, dtype_name, tensors, hyper, contiguous=True)
        assert type(err_c) is type(err)
        for o, c in zip(out, out_c):
            assert torch.equal(torch.nan_to_num(o, nan=1.5), torch.nan_to_num(c, nan=1.5)), backend


@pytest.mark.parametrize("backend, device", [c for c in SGLD_BACKENDS if c[0] != "reference"])
def test_reference_overflows_where_the_kernels_do(backend, device):
    """The reference folds ``eps / 2 * nbeta`` before the gradient as the kernels do, so a gradient whose
    ``nbeta * g`` alone would overflow gives the same finite update everywhere (found by the property test)."""
    kw = dict(step_size=0.0625, nbeta=603.0, localization=0.0, noise_scale=0.0, seed=0, step=0)
    g = torch.tensor([-5.647923228673162e35])  # nbeta * g > float32 max; eps * nbeta / 2 * g = 1.06e37 is not
    results = []
    for b, d in (("reference", "cpu"), (backend, device)):
        w = torch.tensor([0.71200979], device=d)
        try:
            pypattern.sgld_step_([w], [g.to(d)], [torch.tensor([0.94429022], device=d)], backend=b, **kw)
            results.append(w.cpu())
        except FloatingPointError as e:
            results.append(e)
    assert not isinstance(results[0], Exception) and not isinstance(results[1], Exception), results
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------------------ CrossCovariance


@st.composite
def covariance_case(draw):
    k, n = draw(st.integers(0, 4)), draw(st.integers(0, 4))
    dtype = draw(st.sampled_from(list(DTYPES)))
    sizes = draw(st.lists(st.integers(0, 7), min_size=0, max_size=5))
    offset = draw(st.sampled_from([0.0, 1.0, 1e6]))
    scale = draw(st.sampled_from([1.0, 1e-3]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    chunks = []
    for m in sizes:
        a = offset + scale * rng.standard_normal((m, k))
        b = -offset + scale * rng.standard_normal((m, n))
        chunks.append((a, b, draw(st.sampled_from(LAYOUTS)), draw(st.sampled_from(LAYOUTS))))
    fault = draw(st.sampled_from([None] * 5 + ["nan", "inf", "shape", "rows", "int", "3d"]))
    if fault in ("nan", "inf") and not any(a.size for a, *_ in chunks):
        fault = None
    if fault in ("shape", "rows", "int", "3d") and not chunks:
        fault = None
    if fault in ("nan", "inf"):
        j = next(i for i, (a, *_) in enumerate(chunks) if a.size)
        chunks[j][0].reshape(-1)[0] = np.nan if fault == "nan" else np.inf
    return dict(
        k=k,
        n=n,
        dtype=dtype,
        chunks=chunks,
        fault=fault,
        buffer_draws=draw(st.sampled_from([0, 1, 3, 64])),
        track_auto=draw(st.sampled_from(["none", "var", "full"])),
        backend=draw(st.sampled_from(COV_BACKENDS)),
    )


@pytest.mark.skipif(len(COV_BACKENDS) < 1, reason="no backend")
@pytest.mark.filterwarnings("ignore:CrossCovariance:UserWarning")
@given(covariance_case())
def test_cross_covariance_is_an_error_naming_an_argument_or_equals_numpy(case):
    backend, device = case["backend"]
    dtype = DTYPES[case["dtype"]]
    k, n = case["k"], case["n"]
    acc = pypattern.CrossCovariance(
        k, n, track_auto=case["track_auto"], buffer_draws=case["buffer_draws"], backend=backend, device=device
    )
    fault = case["fault"]
    for j, (a, b, la, lb) in enumerate(case["chunks"]):
        ta, tb = _make(a, dtype, la, device), _make(b, dtype, lb, device)
        if fault is not None and j == len(case["chunks"]) - 1 and fault in ("shape", "rows", "int", "3d"):
            if fault == "shape":
                ta = torch.zeros(ta.shape[0], k + 1, dtype=dtype, device=device)
            elif fault == "rows":
                tb = torch.zeros(tb.shape[0] + 1, n, dtype=dtype, device=device)
            elif fault == "int":
                ta = ta.to(torch.int64)
            else:
                ta = ta[None]
            with pytest.raises((ValueError, TypeError)) as e:
                acc.update(ta, tb)
            assert _names_one_of(str(e.value), ["a", "b"]), str(e.value)
            return
        acc.update(ta, tb)
    a = np.concatenate([c[0] for c in case["chunks"]], 0) if case["chunks"] else np.zeros((0, k))
    b = np.concatenate([c[1] for c in case["chunks"]], 0) if case["chunks"] else np.zeros((0, n))
    # the reference: the draws as the accumulator saw them (cast to the chunk dtype), in float64, all at once
    a = a.astype(np.float32).astype(np.float64) if dtype == torch.float32 else a
    b = b.astype(np.float32).astype(np.float64) if dtype == torch.float32 else b
    m = a.shape[0]
    assert acc.count == m
    cov = acc.cov().cpu().numpy()
    assert cov.shape == (k, n) and cov.dtype == np.float64
    if m < 2:
        assert np.isnan(cov).all()
        return
    with np.errstate(invalid="ignore"):
        ref = (a - a.mean(0)).T @ (b - b.mean(0)) / (m - 1)
        mean_a = a.mean(0)
        spread = np.sqrt(np.outer(a.var(0), b.var(0)))
    fin = np.isfinite(ref)
    assert np.array_equal(np.isfinite(cov), fin), (cov, ref)  # non-finite draws poison exactly their rows
    err = np.abs(cov[fin] - ref[fin])
    assert (err <= 1e-9 * (np.abs(ref[fin]) + spread[fin] + 1e-300)).all(), (cov, ref)
    got = (
        acc.mean_a.cpu().numpy()
    )  # an infinite draw gives a NaN mean here (inf - inf after the shift), inf in numpy
    assert np.array_equal(np.isfinite(got), np.isfinite(mean_a))
    np.testing.assert_allclose(got[np.isfinite(got)], mean_a[np.isfinite(mean_a)], rtol=1e-12, atol=0)
    if case["track_auto"] != "none":
        with np.errstate(invalid="ignore"):
            var_a = a.var(0, ddof=1)
        got = acc.var_a().cpu().numpy()
        assert np.array_equal(np.isfinite(got), np.isfinite(var_a))
        np.testing.assert_allclose(got[np.isfinite(got)], var_a[np.isfinite(var_a)], rtol=1e-9, atol=0)


# ------------------------------------------------------------------------------------------------ per-sample Gram


def _gram_by_autograd(model, loss_fn, x, y) -> torch.Tensor:
    """The specification: each sample's loss differentiated alone, gradients flattened, all inner products."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        li = loss_fn(model, x[i : i + 1], y[i : i + 1]).sum()
        gs = torch.autograd.grad(li, params, allow_unused=True)
        rows.append(
            torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, gs)])
        )
    if not rows:
        return torch.zeros(0, 0, dtype=torch.float64)
    flat = torch.stack(rows).to(torch.float64)
    return flat @ flat.T


@st.composite
def gram_case(draw):
    return dict(
        batch=draw(st.integers(0, 5)),
        d_in=draw(st.integers(1, 4)),
        hidden=draw(st.integers(1, 5)),
        d_out=draw(st.integers(1, 3)),
        seq=draw(st.sampled_from([None, 1, 3])),
        dtype=draw(st.sampled_from(list(DTYPES))),
        layout=draw(st.sampled_from(LAYOUTS)),
        bias=draw(st.booleans()),
        frozen=draw(st.booleans()),
        nonfinite=draw(st.sampled_from([None] * 4 + ["nan", "inf"])),
        loss=draw(st.sampled_from(["per_sample"] * 4 + ["mean", "float"])),
        centered=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


@given(gram_case())
def test_per_sample_grad_gram_is_an_error_naming_an_argument_or_equals_autograd(case):
    dtype = DTYPES[case["dtype"]]
    torch.manual_seed(case["seed"])
    model = torch.nn.Sequential(
        torch.nn.Linear(case["d_in"], case["hidden"], bias=case["bias"]),
        torch.nn.Tanh(),
        torch.nn.Linear(case["hidden"], case["d_out"]),
    ).to(dtype)
    if case["frozen"]:
        model[2].bias.requires_grad_(False)
    rng = np.random.default_rng(case["seed"])
    B, T = case["batch"], case["seq"]
    shape = (B, case["d_in"]) if T is None else (B, T, case["d_in"])
    xv = rng.standard_normal(shape)
    if case["nonfinite"] and B:
        xv.reshape(-1)[0] = np.nan if case["nonfinite"] == "nan" else np.inf
    x = _make(xv, dtype, case["layout"], "cpu")
    y = torch.tensor(rng.standard_normal((*shape[:-1], case["d_out"])), dtype=dtype)

    def per_sample(m, x, y):
        err = ((m(x) - y) ** 2).sum(-1)
        return err if case["loss"] == "per_sample" else err.mean() if case["loss"] == "mean" else 1.0

    if case["loss"] != "per_sample":
        with pytest.raises(ValueError, match=r"loss_fn must return per-sample losses of shape \(B,\)"):
            pypattern.per_sample_grad_gram(model, per_sample, x, y)
        return
    g = pypattern.per_sample_grad_gram(model, per_sample, x, y, centered=case["centered"])
    ref = _gram_by_autograd(model, per_sample, x, y)
    if case["centered"] and B:
        h = torch.eye(B, dtype=torch.float64) - 1.0 / B
        ref = h @ ref @ h
    assert g.shape == (B, B) and g.dtype == torch.float64
    assert torch.equal(torch.isfinite(g), torch.isfinite(ref)), (g, ref)
    fin = torch.isfinite(ref)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    scale = 1.0 + ref[fin].abs().max() if bool(fin.any()) else 1.0
    torch.testing.assert_close(g[fin], ref[fin], rtol=tol, atol=tol * scale)
