"""The sampling, susceptibility, distributed and circuits entry points: numpy integers read as ints, bad values
refused naming the argument, unknown keywords refused with the closest accepted name, ``max_memory=`` as the
circuits' ``memory_budget``, and Parameters sections that list every signature parameter."""

import importlib
import inspect
import math
import re
import warnings

import numpy as np
import pytest
import torch

import pypattern as pp
import pypattern.circuits as pc
import pypattern.sampling as ps
from pypattern import distributed, truth
from pypattern.circuits import api as circuits_api


def _regular():
    torch.manual_seed(0)
    model = truth.DeepLinearNetwork((3, 2), dtype=torch.float64)
    ds = truth.make_regression_data(model, 3, dtype=torch.float64)
    return model, torch.utils.data.DataLoader(ds, batch_size=len(ds))


SKW = dict(num_chains=2, num_draws=4, step_size=1e-4, nbeta=100.0, localization=1.0, quiet=True)


def _tiny_transformer():
    model = pp.Transformer(n_layers=1, d_model=16, n_heads=2, d_vocab=8, n_ctx=8, d_mlp=32).double()
    gen = torch.Generator().manual_seed(1)
    clean = torch.randint(0, 8, (4, 6), generator=gen)
    corrupted = torch.randint(0, 8, (4, 6), generator=gen)
    metric = pp.LogitDiff(torch.tensor([1, 2, 3, 4]), torch.tensor([0, 0, 0, 0]))
    return model, clean, corrupted, metric


# ------------------------------------------------------------------------------------------------ numpy integers


def test_chain_seed_reads_numpy_integers_as_ints():
    for seed, chain, stream in [(0, 1, 0), (7, 3, 2), (2**40, 5, 1)]:
        want = ps.chain_seed(seed, chain, stream)
        got = ps.chain_seed(np.int64(seed), np.uint32(chain), np.int8(stream))
        assert got == want and type(got) is int
    assert len({ps.chain_seed(0, c) for c in range(8)}) == 8  # distinct keys per chain
    with pytest.raises(TypeError, match=r"chain='a'"):
        ps.chain_seed(0, "a")
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        ps.chain_seed(-1, 0)


def test_default_nbeta_numpy_integers_and_bad_batch_sizes():
    for m, accum in [(4, 1), (16, 1), (4, 2)]:
        want = m * accum / math.log(m * accum)  # devinterp's m / ln m, computed here
        assert ps.default_nbeta(np.int64(m), np.int64(accum)) == pytest.approx(want, rel=1e-15)
        assert ps.default_nbeta(m, accum) == pytest.approx(want, rel=1e-15)
    for bad in (-3, 0, np.int64(-1)):
        with pytest.raises(ValueError, match=r"batch size \(int >= 1\)"):
            ps.default_nbeta(bad)
    with pytest.raises(ValueError, match="grad_accum_steps an int >= 1"):
        ps.default_nbeta(4, 2.5)


def test_estimate_learning_coeff_counts():
    model, loader = _regular()
    okw = dict(lr=1e-4, nbeta=100.0, localization=1.0)
    args = dict(num_chains=2, num_draws=4, optimizer_kwargs=okw, evaluate=None, verbose=False, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = ps.estimate_learning_coeff(model, loader, cores=1, **args)
        got = ps.estimate_learning_coeff(
            model, loader, cores=np.int64(1), grad_accum_steps=np.int64(1), **args
        )
    assert got == want and math.isfinite(got)
    # devinterp runs cores=0 one chain at a time: the same as 1
    assert ps.estimate_learning_coeff(model, loader, cores=0, **args) == want
    for bad in (-3, 1.5):
        with pytest.raises(ValueError, match=rf"cores={bad} is not valid.*int >= 1"):
            ps.estimate_learning_coeff(model, loader, cores=bad, **args)
    with pytest.raises(NotImplementedError, match="a list of devices"):
        ps.estimate_learning_coeff(model, loader, cores=["cpu", "cpu"], **args)
    with pytest.raises(ValueError, match=r"grad_accum_steps=2.5 is not valid"):
        ps.estimate_learning_coeff(model, loader, grad_accum_steps=2.5, **args)
    with pytest.raises(TypeError, match=r"model=None is not valid; give a torch.nn.Module"):
        ps.estimate_learning_coeff(None, loader, **args)
    from pypattern.devinterp import v1

    with pytest.raises(TypeError, match=r"model=None is not valid"):
        v1.sample(None, loader, [], num_chains=1, num_draws=2)


def test_sample_noise_coupling_numpy_and_optimizer_kwargs_type():
    model, loader = _regular()
    a = ps.sample(model, loader, noise_coupling=1, **SKW)
    b = ps.sample(model, loader, noise_coupling=np.int64(1), **SKW)
    np.testing.assert_array_equal(a.loss_trace, b.loss_trace)
    with pytest.raises(TypeError, match=r"optimizer_kwargs='x' is not valid; give a dict"):
        ps.sample(model, loader, optimizer_kwargs="x", **SKW)
    for call in (ps.sample, ps.estimate_llc, lambda m, ld, **k: ps.OnlineLLC(ld, every=1, **k)):
        with pytest.raises(TypeError, match=r"chains='ab' is not valid"):
            call(model, loader, chains="ab", **SKW)


def test_edge_attribution_steps_numpy():
    model, clean, corrupted, metric = _tiny_transformer()
    kw = dict(metric=metric, method="eap-ig", quiet=True)
    a = pc.edge_attribution(model, clean, corrupted, steps=3, **kw)
    b = pc.edge_attribution(model, clean, corrupted, steps=np.int64(3), **kw)
    torch.testing.assert_close(a.values, b.values, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"steps=2.5 is not valid"):
        pc.edge_attribution(model, clean, corrupted, steps=2.5, **kw)


# ------------------------------------------------------------------------------------------- values refused


def test_backend_refused_when_built():
    model, loader = _regular()
    for cls in (ps.SGLD, ps.SGNHT, ps.RMSpropSGLD):
        with pytest.raises(ValueError, match=r"backend='bogus' is not a backend; give one of 'cuda'"):
            cls(model.parameters(), step_size=1e-4, nbeta=1.0, backend="bogus")
        assert cls(model.parameters(), step_size=1e-4, nbeta=1.0, backend="reference").backend == "reference"
    with pytest.raises(ValueError, match=r"backend='bogus' is not a backend"):
        ps.sample(model, loader, backend="bogus", **SKW)


def test_calibrate_and_stationarity_thresholds():
    model, loader = _regular()
    kw = dict(step_sizes=(1e-4,), num_chains=2, num_draws=4, nbeta=100.0, localization=1.0)
    for name, bad in [
        ("plateau_tol", "x"),
        ("plateau_tol", -0.1),
        ("max_r_hat", float("nan")),
        ("max_r_hat", 0),
    ]:
        with pytest.raises(ValueError, match=rf"{name}={re.escape(repr(bad))} is not valid"):
            ps.calibrate_step_size(model, loader, **kw, **{name: bad})
    rng = np.random.default_rng(0)
    still = rng.normal(size=(4, 200))  # stationary: R-hat near 1
    moving = still + np.linspace(0, 20, 200)[None] * np.arange(4)[:, None]  # chains drifting apart
    assert ps.check_stationarity(still, threshold=1.1) is True
    with pytest.warns(ps.NonStationaryWarning):
        assert ps.check_stationarity(moving, threshold=1.1) is False
    for bad in (float("nan"), "x", None):
        with pytest.raises(ValueError, match=r"threshold=.* is not valid; give a number"):
            ps.check_stationarity(still, threshold=bad)


def test_susceptibilities_arguments_named():
    model, loader = _regular()
    probe = next(iter(loader))
    with pytest.raises(TypeError, match=r"observable='x' is not callable"):
        pp.susceptibilities(model, loader, probe, ["layers.0.weight"], observable="x", **SKW)
    with pytest.raises(TypeError, match=r"checkpoint=5 is not valid; give a folder path"):
        pp.susceptibilities(model, loader, probe, ["layers.0.weight"], checkpoint=5, **SKW)
    with pytest.raises(ValueError, match=r"group_size must be an int >= 1 or None, got 0"):
        pp.susceptibilities(model, loader, probe, ["layers.0.weight"], group_size=0, **SKW)


# --------------------------------------------------------------------------------------------- unknown keywords


def _calls():
    model, loader = _regular()
    probe = next(iter(loader))
    return [
        ("estimate_llc()", lambda **k: ps.estimate_llc(model, loader, **k), ps.estimate_llc),
        (
            "refined_llc()",
            lambda **k: ps.refined_llc(model, loader, components=["layers.0.weight"], **k),
            ps.refined_llc,
        ),
        (
            "calibrate_step_size()",
            lambda **k: ps.calibrate_step_size(model, loader, **k),
            ps.calibrate_step_size,
        ),
        ("OnlineLLC", lambda **k: ps.OnlineLLC(loader, every=1, **k), ps.OnlineLLC),
        (
            "susceptibilities()",
            lambda **k: pp.susceptibilities(model, loader, probe, ["layers.0.weight"], **k),
            None,
        ),
        ("bif()", lambda **k: pp.bif(model, loader, probe, **k), pp.bif),
        ("estimate_learning_coeff", lambda **k: ps.estimate_learning_coeff(model, loader, **k), None),
    ]


def test_unknown_keywords_named_with_the_closest():
    for who, call, _ in _calls():
        with pytest.raises(
            TypeError, match=rf"{re.escape(who)}.*\['num_drawz'\] \(did you mean 'num_draws'\?\)"
        ):
            call(num_drawz=3)
        with pytest.raises(TypeError) as e:  # nothing close: no suggestion, the accepted names listed
            call(zzzz=1)
        assert "did you mean" not in str(e.value) and "num_draws" in str(e.value)
    # the docstrings say where the keywords are documented
    for who, _, fn in _calls():
        if fn is not None:
            assert "pypattern.sample" in inspect.getdoc(fn), who
    assert "where they are documented" in " ".join(inspect.getdoc(pp.susceptibilities).split())


def test_distributed_takes_auto_step_options(tmp_path):
    import torch.distributed as dist

    model, loader = _regular()
    kw = dict(nbeta=1000.0, localization=1.0, num_chains=2, num_draws=40, seed=0, quiet=True)
    opts = {"calibration_steps": 200}
    want = ps.estimate_llc(model, loader, auto_step_options=opts, **kw)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        got = distributed.estimate_llc(model, loader, auto_step_options=opts, **kw)
        with pytest.raises(TypeError, match=r"\['num_drawz'\] \(did you mean 'num_draws'\?\)") as e:
            distributed.sample(model, loader, num_drawz=3, **SKW)
        # the keywords it takes leave out chains, which it assigns per rank (and refuses)
        assert "chains," not in str(e.value).split("it takes", 1)[1].replace("num_chains,", "")
    finally:
        dist.destroy_process_group()
    assert got.sample.config["step_size"] == want.sample.config["step_size"]
    np.testing.assert_allclose(got.loss_trace, want.loss_trace, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------- circuits


def test_edges_not_in_the_graph_named():
    model, clean, corrupted, metric = _tiny_transformer()
    g = pc.edges(model)
    name = g.edges[3].name
    calls = [
        lambda e: pc.faithfulness(model, e, clean, corrupted, metric=metric),
        lambda e: pc.patch_edges(model, e, clean, corrupted, metric=metric),
        lambda e: pc.circuit_from_edges(g, [e] if isinstance(e, str) else e),
    ]
    for call in calls:
        for edges in ("bogus", ["bogus"]):
            with pytest.raises(ValueError, match=r"^edges: edge 'bogus' is not in the graph.*graph\.edges"):
                call(edges)
        with pytest.raises(KeyError, match=rf"did you mean {re.escape(repr(name))}\?"):  # a near miss
            call(name + "x")
    with pytest.raises(KeyError):  # a lookup by index stays a KeyError
        g.index("bogus")


def test_circuits_max_memory_is_memory_budget(monkeypatch):
    model, clean, corrupted, metric = _tiny_transformer()
    g = pc.edges(model)
    seen = []
    real = circuits_api.prepare_runs

    def spy(*a, **k):
        seen.append(k["memory_budget"])
        return real(*a, **k)

    monkeypatch.setattr(circuits_api, "prepare_runs", spy)
    sets = [g.edges[:5], g.edges[5:20]]
    kw = dict(metric=metric)
    a = pc.faithfulness(model, sets, clean, corrupted, memory_budget=2e5, **kw)
    b = pc.faithfulness(model, sets, clean, corrupted, max_memory=200_000, **kw)
    c = pc.faithfulness(model, sets, clean, corrupted, memory_budget=2e5, max_memory=200_000, **kw)
    pc.patch_edges(model, sets, clean, corrupted, max_memory=3 * 10**5, **kw)
    pc.edge_attribution(
        model, clean, corrupted, method="eap-ig", steps=2, max_memory=4 * 10**5, quiet=True, **kw
    )
    scores = pc.edge_attribution(model, clean, corrupted, quiet=True, **kw)
    pc.pruning_curve(model, scores, clean, corrupted, counts=[0, 3], max_memory=5 * 10**5, **kw)
    pc.acdc(model, clean, corrupted, threshold=1e9, max_memory=6 * 10**5, quiet=True, **kw)
    assert seen == [2e5, 200_000, 200_000, 3e5, 4e5, 1e9, 5e5, 6e5]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"memory_budget=300000.0 and max_memory=200000 are one setting"):
        pc.faithfulness(model, sets, clean, corrupted, memory_budget=3e5, max_memory=200_000, **kw)
    for bad in (0, -1, float("inf"), "x"):
        with pytest.raises(ValueError, match=r"max_memory=.* is not valid"):
            pc.faithfulness(model, sets, clean, corrupted, max_memory=bad, **kw)
    with pytest.warns(UserWarning, match=r"does not read max_memory=400000"):
        pc.edge_attribution(model, clean, corrupted, method="eap", max_memory=4 * 10**5, quiet=True, **kw)


# ----------------------------------------------------------------------------------------------- docstrings


MODULES = [
    "pypattern.sampling.auto",
    "pypattern.sampling.batched",
    "pypattern.sampling.calibrate",
    "pypattern.sampling.checkpoint",
    "pypattern.sampling.context",
    "pypattern.sampling.data",
    "pypattern.sampling.diagnostics",
    "pypattern.sampling.llc",
    "pypattern.sampling.online",
    "pypattern.sampling.optim",
    "pypattern.sampling.plan",
    "pypattern.sampling.refined",
    "pypattern.sampling.results",
    "pypattern.sampling.runner",
    "pypattern.sampling.samplers",
    "pypattern.sampling.sequential",
    "pypattern.susceptibility",
    "pypattern.distributed",
    "pypattern.circuits.api",
    "pypattern.circuits.cli",
    "pypattern.circuits.results",
    "pypattern.circuits.graph",
]


def _documented(doc: str) -> list[str] | None:
    """The names a numpydoc Parameters section lists (``a, b : type`` lines), None without one."""
    lines = inspect.cleandoc(doc).splitlines()
    for i, line in enumerate(lines[:-1]):
        if line.strip() == "Parameters" and set(lines[i + 1].strip()) == {"-"}:
            names = []
            for j in range(i + 2, len(lines)):
                ln = lines[j]
                if ln.strip() and j + 1 < len(lines) and set(lines[j + 1].strip()) == {"-"}:
                    break  # the next section
                if ln.strip() and not ln.startswith(" "):
                    for nm in ln.split(" : ")[0].split(","):
                        nm = nm.strip().lstrip("*")
                        if re.fullmatch(r"[A-Za-z_]\w*", nm):
                            names.append(nm)
            return names
    return None


def test_parameters_sections_list_the_signature():
    missing = {}
    for modname in MODULES:
        mod = importlib.import_module(modname)
        for name, obj in vars(mod).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != modname:
                continue
            targets = [(name, obj)]
            if inspect.isclass(obj):
                targets += [(f"{name}.{k}", v) for k, v in vars(obj).items() if inspect.isfunction(v)]
            for qual, fn in targets:
                if not (inspect.isfunction(fn) or inspect.isclass(fn)) or not fn.__doc__:
                    continue
                names = _documented(fn.__doc__)
                if names is None:
                    continue
                try:
                    params = inspect.signature(fn).parameters.values()
                except (TypeError, ValueError):
                    continue
                kinds = (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
                lacking = [p.name for p in params if p.kind not in kinds and p.name not in ("self", "cls")]
                lacking = [n for n in lacking if n not in names]
                if lacking:
                    missing[f"{modname}.{qual}"] = lacking
    assert not missing, missing
