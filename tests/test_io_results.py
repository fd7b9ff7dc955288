"""Loading results whose arrays were edited: each result class checks that its arrays agree with each other (shapes,
numbers) and refuses a file where they do not with a FormatError naming the file and the field."""

import zipfile

import numpy as np
import pytest
from _result_cases import bif_result, npy, susceptibility_result

from pypattern import io
from pypattern.patterning import Intervention, invert
from pypattern.sampling.results import LLCResult, SampleResult, check_arrays


def _sample():
    rng = np.random.default_rng(0)
    return SampleResult(
        loss_trace=rng.normal(size=(2, 5)),
        init_loss=0.25,
        init_losses=np.array([0.2, 0.3]),
        observables={"phi": rng.normal(size=(2, 5)), "vec": rng.normal(size=(2, 5, 3))},
    )


def _llc():
    s = _sample()
    return LLCResult(
        llc_mean=1.5,
        llc_std=0.1,
        llc_per_chain=np.array([1.4, 1.6]),
        llc_trace=10.0 * (s.loss_trace - s.init_loss),
        loss_trace=s.loss_trace,
        init_loss=s.init_loss,
        nbeta=10.0,
        sample=s,
    )


def _susceptibility():
    return susceptibility_result(np.random.default_rng(1), probe_counted=np.array([True, True, False, True]))


def _bif():
    return bif_result(np.random.default_rng(2))


def _intervention():
    return invert(
        np.array([[1.0, -0.5, 0.2], [0.3, 0.8, -0.4]]), np.array([0.1, -0.05]), method="constrained"
    )


MAKERS = {
    "SampleResult": _sample,
    "LLCResult": _llc,
    "SusceptibilityResult": _susceptibility,
    "BIFResult": _bif,
    "PCAResult": lambda: _susceptibility().pca(2),
    "Intervention": _intervention,
}


def _edited(src, dst, member, array):
    """``src`` with its member ``member`` (an array's ``.npy``) replaced by ``array``, written to ``dst``."""
    with zipfile.ZipFile(src) as z:
        members = {n: z.read(n) for n in z.namelist()}
    assert member in members, sorted(members)
    members[member] = npy(array)
    with zipfile.ZipFile(dst, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return dst


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_results_whose_arrays_agree_load(name, tmp_path):
    res = MAKERS[name]()
    res.save(tmp_path / "r.npz")
    back = type(res).load(tmp_path / "r.npz")
    for f in res.__dataclass_fields__:
        a, b = getattr(res, f), getattr(back, f)
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(b, a)


@pytest.mark.parametrize(
    ("name", "member", "array", "match"),
    [
        (
            "SampleResult",
            "loss_trace.npy",
            np.zeros(7),
            r"loss_trace \(7,\) is not of shape \(chains, draws\)",
        ),
        (
            "SampleResult",
            "observables/vec.npy",
            np.zeros((2, 4, 3)),
            r"observables\['vec'\] \(2, 4, 3\) is not of shape",
        ),
        (
            "SampleResult",
            "observables/phi.npy",
            np.array([["a"] * 5] * 2),
            r"observables\['phi'\] must hold real",
        ),
        (
            "SampleResult",
            "init_losses.npy",
            np.zeros((2, 1)),
            r"init_losses \(2, 1\) is not of shape \(batches,\)",
        ),
        (
            "LLCResult",
            "llc_per_chain.npy",
            np.zeros(3),
            r"llc_per_chain \(3,\) is not of shape \(chains,\) with ",
        ),
        (
            "LLCResult",
            "llc_trace.npy",
            np.zeros((2, 4)),
            r"llc_trace \(2, 4\) is not of shape .* draws = 5",
        ),
        (
            "LLCResult",
            "sample.loss_trace.npy",
            np.zeros(10),
            r"loss_trace \(10,\) is not of shape \(chains, dr",
        ),
        (
            "Intervention",
            "weights.npy",
            np.ones(2),
            r"weights \(2,\) is not of shape \(N,\) with N = 3 as in h",
        ),
        ("Intervention", "target.npy", np.ones(3), r"target \(3,\) is not of shape \(K,\) with K = 2"),
        ("Intervention", "h.npy", np.zeros((3, 1)), r"h \(3, 1\) is not of shape \(N,\)"),
        (
            "SusceptibilityResult",
            "chi_se.npy",
            np.zeros((4, 2)),
            r"chi_se \(4, 2\) is not of shape \(compon",
        ),
        ("SusceptibilityResult", "chi_chains.npy", np.zeros((2, 2, 4)), r"with num_chains = 3"),
        (
            "SusceptibilityResult",
            "probe_counted.npy",
            np.ones(5, bool),
            r"probe_counted \(5,\) is not of shape",
        ),
        (
            "SusceptibilityResult",
            "phi_mean.npy",
            np.zeros(3),
            r"phi_mean \(3,\) is not of shape \(components,\)",
        ),
        ("BIFResult", "corr.npy", np.zeros((4, 3)), r"corr \(4, 3\) is not of shape \(probe, probe\)"),
        ("BIFResult", "probe_token.npy", np.zeros(5), r"probe_token \(5,\) is not of shape \(probe,\)"),
        (
            "PCAResult",
            "scores.npy",
            np.zeros((4, 3)),
            r"scores \(4, 3\) is not of shape \(probe, n_pcs\)",
        ),
        ("PCAResult", "mean.npy", np.zeros(3), r"mean \(3,\) is not of shape \(components,\)"),
    ],
)
def test_edited_arrays_that_disagree_are_refused_naming_the_file_and_field(
    name, member, array, match, tmp_path
):
    res = MAKERS[name]()
    res.save(tmp_path / "r.npz")
    bad = _edited(tmp_path / "r.npz", tmp_path / "bad.npz", member, array)
    with pytest.raises(io.FormatError, match=r"bad\.npz") as e:
        type(res).load(bad)
    assert e.match(match)


def test_loaded_fields_other_than_arrays_are_checked(tmp_path):
    """A method invert does not have, an LLCResult's sample of other draws, components that do not name chi's
    rows."""
    iv = _intervention()
    with pytest.raises(ValueError, match=r"method must be 'pinv', 'ridge' or 'constrained', got 'lstsq'"):
        Intervention(iv.h, iv.weights, iv.predicted, iv.target, iv.residual, "lstsq")._check_loaded()
    llc, other = _llc(), _sample()
    other.loss_trace = other.loss_trace[:, :3]
    llc.sample = other
    with pytest.raises(ValueError, match=r"sample.loss_trace \(2, 3\) is not of loss_trace's shape \(2, 5\)"):
        llc._check_loaded()
    sus = _susceptibility()
    sus.components = ["embed"]
    with pytest.raises(
        ValueError, match=r"components must be a list of 2 names, one per row of chi, got list"
    ):
        sus._check_loaded()


def test_check_arrays_binds_each_size_once_and_refuses_other_values():
    sizes = check_arrays(
        {"a": np.zeros((2, 3)), "b": np.zeros(3, dtype=np.int32), "c": np.zeros((2, 3, 4, 5)), "d": None},
        {"a": ("m", "n"), "b": ("n",), "c": ("m", "n", ...), "d": ("m",)},
    )
    assert sizes == {"m": 2, "n": 3}
    for value, match in (
        (np.array(["x", "y", "z"]), r"b must hold real numbers, got <U1 values"),
        (np.zeros(3, dtype=complex), r"b must hold real numbers, got complex128 values"),
        (np.zeros(3, dtype=object), r"b must hold real numbers, got object values"),
        ([0.0, 0.0, 0.0], r"b must be an array \(n,\), got list"),
        (np.zeros(2), r"b \(2,\) is not of shape \(n,\) with n = 3 as in a \(2, 3\)"),
    ):
        with pytest.raises(ValueError, match=match):
            check_arrays({"a": np.zeros((2, 3)), "b": value}, {"a": ("m", "n"), "b": ("n",)})
    with pytest.raises(ValueError, match=r"c \(2,\) is not of shape \(m, n, \.\.\.\)"):
        check_arrays({"c": np.zeros(2)}, {"c": ("m", "n", ...)})
