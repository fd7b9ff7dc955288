"""The README's python examples run as written, in order, in one namespace (they share the set-up block), and
give results of the documented shapes, checked against independent computations where cheap."""

import logging
import pathlib
import re
import warnings

import numpy as np
import pytest
import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_every_estimator_has_an_example():
    code = "\n".join(_blocks())
    for name in (
        "sgld_step_",
        "estimate_llc",
        "sample",
        "susceptibilities",
        ".pca(",
        "bif",
        "invert",
        "reweight",
        "activation_patching",
        "attribution_patching",
        "linear_cka",
        "cka_matrix",
        "procrustes",
        "train_flags",
        "steer",
    ):
        assert f"pp.{name}" in code or name in code, name


class _Records(logging.Handler):
    """The records of warnings and errors a logger (Hugging Face's) emits."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}")


@pytest.fixture(scope="module")
def env(tmp_path_factory, one_thread):
    """Runs the blocks in order in one namespace; ``__warned__[i]`` holds block ``i``, the warnings it raised
    (category, message) and the warnings Hugging Face's logger printed while it ran."""
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("readme"))
    records = _Records()
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(records)
    # Hugging Face prints some warnings once per process (Logger.warning_once): an earlier test must not hide them
    once = getattr(logging.Logger, "warning_once", None)
    if hasattr(once, "cache_clear"):
        once.cache_clear()
    try:
        ns: dict = {"__folder__": pathlib.Path(os.getcwd()), "__warned__": {}}
        for i, block in enumerate(_blocks()):
            records.messages = []
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                exec(compile(block, f"README.md python block {i}", "exec"), ns)
            ns["__warned__"][i] = (block, [(w.category, str(w.message)) for w in caught], records.messages)
        yield ns
    finally:
        hf_logger.removeHandler(records)
        os.chdir(cwd)


def test_sgld_step_example(env):
    """The step with zero noise would be plain gradient descent; the documented update is checked by recomputing
    it with the same noise from the reference backend."""
    import pypattern as pp

    params0 = env["anchors"]  # clones of the parameters before the step
    again = [p.clone() for p in params0]
    pp.sgld_step_(
        again, env["grads"], env["anchors"], step_size=1e-4, nbeta=50.0, localization=100.0, seed=0, step=0,
        backend="reference",
    )  # fmt: skip
    for a, b in zip(env["params"], again):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(env["params"], params0))


def test_sgld_chains_step_example(env):
    """Each chain's row is the step of that chain alone with its seed (the rows started as the stepped params)."""
    import pypattern as pp

    flags = env["flags"]
    assert flags.shape == (4, len(env["params"])) and flags.dtype == torch.int32 and not bool(flags.any())
    for c in range(4):
        alone = [p.clone() for p in env["params"]]
        pp.sgld_step_(
            alone, [g[c] for g in env["chain_grads"]], env["anchors"], step_size=1e-4, nbeta=50.0,
            localization=100.0, seed=c, step=0,
        )  # fmt: skip
        for row, want in zip((x[c] for x in env["chains"]), alone):
            assert torch.equal(row, want)
        assert not torch.equal(alone[0], env["params"][0])  # the step moved it


def test_llc_and_sample_examples(env):
    res = env["res"]
    assert np.isfinite(res.llc_mean) and res.llc_per_chain.shape == (2,)
    assert env["samples"].loss_trace.shape == (2, 10)
    sgnht = env["sgnht"]
    assert sgnht.sample.config["sampler"] == "sgnht" and sgnht.sample.config["diffusion_factor"] == 0.01
    assert np.isfinite(sgnht.llc_mean)
    # the LLC of the SGNHT draws, recomputed from its loss trace
    assert sgnht.llc_mean == pytest.approx(float(np.mean(sgnht.nbeta * (sgnht.loss_trace - sgnht.init_loss))))
    from pypattern import LLCResult

    assert LLCResult.load(env["__folder__"] / "llc.npz").llc_mean == res.llc_mean


def test_sampling_examples_run_without_diagnostic_warnings(env):
    """The README's LLC, sample, susceptibility and BIF examples, and the converted model's LLC, use settings the
    sampler's diagnostics accept: a warning there (a given step that falls short or is biased, a drifting or
    unmixed trace) is what every new user would meet first."""
    from pypattern.sampling import NonStationaryWarning, StepBiasWarning

    checked = 0
    for i, (block, caught, _) in env["__warned__"].items():
        if not any(
            call in block for call in ("pp.sample(", "pp.susceptibilities(", "pp.bif(", "pp.estimate_llc(")
        ):
            continue
        checked += 1
        bad = [m for c, m in caught if issubclass(c, NonStationaryWarning | StepBiasWarning)]
        assert not bad, (i, bad)
    assert checked >= 3


def test_every_example_runs_without_warnings(env):
    """No block warns: no Python warning of any category (pypattern's, torch's, Hugging Face's), and no warning
    printed by Hugging Face's logger (the tiny configurations keep their special token ids inside the vocabulary)."""
    assert len(env["__warned__"]) == len(_blocks())
    for i, (block, caught, logged) in env["__warned__"].items():
        assert not caught, (i, block.splitlines()[0], [(c.__name__, m) for c, m in caught])
        assert not logged, (i, block.splitlines()[0], logged)


def test_susceptibility_examples(env):
    chi, probe = env["chi"], env["probe"]
    assert chi.chi.shape == (2, probe.shape[0] * (probe.shape[1] - 1))  # next-token losses
    assert np.isfinite(chi.chi).all()
    assert env["pca"].directions.shape[1] == 2
    b = env["influence"].bif
    assert b.shape == (8, 8)
    np.testing.assert_allclose(b, b.T, atol=1e-10)


def test_patterning_examples(env):
    plan, chi_groups = env["plan"], env["chi_groups"]
    w = np.asarray(plan.weights)
    assert w.min() >= -1e-9 and abs(w.mean() - 1) < 1e-6
    np.testing.assert_allclose(plan.predicted, chi_groups @ np.asarray(plan.h), atol=1e-8)
    loader = env["weighted"]
    assert isinstance(loader.sampler, torch.utils.data.WeightedRandomSampler)
    assert len(loader.sampler) == len(env["data"]) and loader.batch_size == 64


def test_patching_examples(env):
    grid, clean = env["grid"], env["clean"]
    assert grid.mean().shape == (env["net"].cfg.n_layers, clean.shape[1])
    assert len(env["atp"]["z"].top(3)) == 3


def test_circuits_example(env):
    """The graph's edge count; the circuit's faithfulness equal to the pruning curve's at its size, and to its
    definition from the curve's patched metrics (the circuit alone, every edge ablated, none ablated)."""
    assert len(env["graph"]) == 110 and int(env["circ"].mask.sum()) == 11
    curve = env["curve"]
    assert curve.counts.tolist() == [0, 11, 55, 110]
    assert float(curve.faithfulness["eap-ig"][1]) == pytest.approx(env["faith"], abs=1e-5)
    m = curve.metric_values["eap-ig"]
    assert float(m[0]) == pytest.approx(curve.m_empty) and float(m[-1]) == pytest.approx(curve.m_full)
    assert env["faith"] == pytest.approx(float((m[1] - m[0]) / (m[-1] - m[0])), abs=1e-5)
    assert len(env["scores"].top(3)) == 3


def test_similarity_examples(env):
    import pypattern as pp

    m = pp.cka_matrix(env["acts_a"], env["acts_b"])
    assert m.shape == (2, 2) and torch.isfinite(m).all()
    assert abs(float(m[1, 1]) - pp.linear_cka(env["acts_a"][1], env["acts_b"][1])) < 1e-9
    # a model against itself: every layer matches itself exactly
    torch.testing.assert_close(
        torch.diagonal(pp.cka_matrix(env["acts_a"], env["acts_a"])), torch.ones(2, dtype=torch.float64)
    )
    from pypattern.equivalence import rbf_cka

    assert 0.0 < rbf_cka(env["acts_a"][1], env["acts_b"][1]) < 1.0
    assert rbf_cka(env["acts_a"][1], env["acts_a"][1]) == pytest.approx(1.0, abs=1e-12)


def test_residual_stream_split_example(env):
    """``stop_at_layer=1`` returns the cached stream entering block 1."""
    _, cache = env["model"].run_with_cache(env["prompts"], names_filter="blocks.1.hook_resid_pre")
    torch.testing.assert_close(env["resid"], cache["blocks.1.hook_resid_pre"], rtol=0, atol=0)


def test_flags_example(env):
    assert env["text"].shape == (4, 4 + 6)
    assert 0.0 <= env["report"].steer_success <= 1.0


def test_own_model_example(env):
    """The converted Llama patches and samples; the unconverted model's head mask covers exactly q_proj rows and
    o_proj columns of head 1 (d_head 8), as an independent slice says."""
    heads, llc, mask = env["heads"], env["llama_llc"], env["head_mask"]
    assert heads.values.shape == (4, 2, 4, 12) and float(heads.values.abs().max()) > 0
    assert np.isfinite(llc.llc_mean) and llc.llc_per_chain.shape == (4,)
    # 4 chains x 25 draws, mixed (split R-hat below the 1.1 at which the sampler warns)
    assert llc.loss_trace.shape == (4, 25) and llc.r_hat < 1.1
    q = mask["model.layers.0.self_attn.q_proj.weight"]
    expect = torch.zeros_like(q)
    expect[8:16] = True
    assert torch.equal(q, expect)
    o = mask["model.layers.0.self_attn.o_proj.weight"]
    assert o[:, 8:16].all() and o.sum() == o[:, 8:16].numel()
    assert set(mask) == {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"}
    from pypattern.gram import per_sample_grad_gram_reference

    ref = per_sample_grad_gram_reference(env["llama"], env["per_token"], env["tokens"])
    torch.testing.assert_close(env["gram"], ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()))
    # the family without a converter: exact (one forward per cell) and AtP grids over its residual stream; before
    # the corrupted position 3 both runs hold the same residual, so a patch there changes nothing, exactly
    resid, atp = env["cohere_resid"], env["cohere_atp"]
    assert resid.method == "naive" and atp.method == "atp"
    assert resid.values.shape == atp.values.shape == (4, 2, 12)
    for r in (resid, atp):
        assert torch.equal(r.values[:, :, :3], r.corrupted[:, None, None].expand(4, 2, 3).to(r.values.dtype))
    assert float((resid.values[:, 0, 3] - resid.corrupted).abs().max()) > 0
