"""``pypattern llc|chi|patch --model DIR --data FILE`` on a user's model: the chains run batched where they fit,
with the same draws (up to float rounding) as chains run one after another; ``device=`` reaches the model
directly; and ``pypattern demo equivalence --threads N`` runs every process training the pool on N threads."""

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import pypattern.circuits.cli as circuits_cli  # noqa: E402
import pypattern.experiments.interpretive as interpretive  # noqa: E402
import pypattern.experiments.user_model as user_model  # noqa: E402
from pypattern import LLCResult, SusceptibilityResult  # noqa: E402
from pypattern.cli import main  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::pypattern.sampling.NonStationaryWarning"),
]

V = 23


class Reached(Exception):
    """Raised by a recording stand-in: the run got as far as its computation."""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("user_runs")
    cfg = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d / "llama", safe_serialization=True)
    np.save(d / "tokens.npy", np.random.default_rng(0).integers(0, V, size=(6, 6)))
    return d


def _one_after_another(monkeypatch):
    """The command's sampling by the sampler's default rule (``batched=None``: the calibration's trials stacked,
    as they fit), with that rule running the draws' chains one after another."""
    from pypattern.sampling import runner

    monkeypatch.setattr(user_model, "_sampled", lambda run, model, stacked_chains: run(None))
    monkeypatch.setattr(runner, "batches_by_default", lambda model, num_chains: False)


LLC_SETTINGS = dict(num_chains=3, num_draws=12, num_burnin_steps=12, seed=5)


@pytest.mark.parametrize("step_size", [1e-3, "auto"])
def test_llc_chains_batched_give_the_draws_of_chains_one_after_another(
    files, tmp_path, monkeypatch, step_size
):
    # the calibration's trials are as long as the run at most: a short run keeps them short; at nbeta 1 and
    # localization 10 its scan passes at 0.025 after 4 trials (13 at the command's defaults)
    kw = (
        dict(LLC_SETTINGS, step_size=step_size)
        if step_size != "auto"
        else dict(LLC_SETTINGS, num_draws=8, num_burnin_steps=8, nbeta=1.0, localization=10.0)
    )
    fast = user_model.run_user_llc(str(files / "llama"), str(files / "tokens.npy"), str(tmp_path / "a"), **kw)
    res = LLCResult.load(fast["result"])
    # 3 chains of a model of more than 4096 parameters: stacked, they fit, and the command batches them
    assert sum(p.numel() for p in circuits_cli.load_model_dir(str(files / "llama")).parameters()) > 4096
    assert res.sample.batched
    with monkeypatch.context() as m:
        _one_after_another(m)
        slow = user_model.run_user_llc(
            str(files / "llama"), str(files / "tokens.npy"), str(tmp_path / "b"), **kw
        )
    ref = LLCResult.load(slow["result"])
    assert not ref.sample.batched
    assert fast["step_size"] == slow["step_size"]  # the calibration chose the same step
    np.testing.assert_allclose(res.sample.loss_trace, ref.sample.loss_trace, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fast["llc_per_chain"], slow["llc_per_chain"], rtol=1e-4, atol=1e-6)


def test_chi_chains_batched_give_the_estimate_of_the_default_rule(files, tmp_path, monkeypatch):
    kw = dict(num_chains=1, num_draws=8, num_burnin_steps=8, step_size=1e-3, num_probe=2, seed=1)
    calls = []
    real = user_model._sampled

    def spy(run, model, stacked_chains):
        calls.append(stacked_chains)
        return real(run, model, stacked_chains)

    monkeypatch.setattr(user_model, "_sampled", spy)
    fast = user_model.run_user_chi(str(files / "llama"), str(files / "tokens.npy"), str(tmp_path / "a"), **kw)
    # every component's chain stacks with the others: chains x components
    assert calls == [len(fast["components"])] == [4]
    _one_after_another(monkeypatch)
    slow = user_model.run_user_chi(str(files / "llama"), str(files / "tokens.npy"), str(tmp_path / "b"), **kw)
    a, b = SusceptibilityResult.load(fast["result"]), SusceptibilityResult.load(slow["result"])
    assert list(a.components) == list(b.components)
    np.testing.assert_allclose(np.asarray(a.chi), np.asarray(b.chi), rtol=1e-4, atol=1e-6)


def test_a_model_that_does_not_run_under_vmap_runs_by_the_default_rule(monkeypatch):
    """batched=True refuses such a model at its first step; the run is then made with batched=None."""
    seen = []

    def run(batched):
        seen.append(batched)
        if batched:
            raise RuntimeError("batched=True but the model or loss_fn does not run under vmap: ...")
        return "ran"

    model = torch.nn.Linear(3, 2)
    assert user_model._sampled(run, model, 4) == "ran"
    assert seen == [True, None]
    seen.clear()
    # too many stacked parameters for batched chains: the default rule, without trying
    monkeypatch.setattr("pypattern.sampling.runner.BATCHED_MAX_STACKED", 4 * 8 - 1)
    assert user_model._sampled(run, model, 4) == "ran"
    assert seen == [None]
    # another error propagates as it is
    with pytest.raises(RuntimeError, match="other"):
        user_model._sampled(lambda b: (_ for _ in ()).throw(RuntimeError("other")), model, 1)


COMPUTES = {
    "run_user_llc": ("pypattern.sampling", "estimate_llc", dict(num_chains=1, num_draws=2)),
    "run_user_chi": ("pypattern.susceptibility", "susceptibilities", dict(num_chains=1, num_draws=2)),
    "run_user_patch": ("pypattern.patching", "activation_patching", dict(sites=("resid_pre",))),
}


@pytest.mark.parametrize("fn", sorted(COMPUTES))
def test_device_argument_reaches_the_model(files, tmp_path, monkeypatch, fn):
    """``device=`` is where the model computes, with no ``models_on`` block around the call (a stand-in device,
    meta, that the check lets through: a second real device need not exist)."""
    import importlib

    module, name, kw = COMPUTES[fn]
    seen = {}

    def stand_in(model, *args, **kwargs):
        seen["device"] = next(model.parameters()).device
        raise Reached

    monkeypatch.setattr(importlib.import_module(module), name, stand_in)
    monkeypatch.setattr(circuits_cli, "check_device", lambda device, argument="device": torch.device(device))
    with pytest.raises(Reached):
        getattr(user_model, fn)(
            str(files / "llama"), str(files / "tokens.npy"), str(tmp_path / "o"), device="meta", **kw
        )
    assert seen["device"].type == "meta"
    seen.clear()
    with pytest.raises(Reached):
        getattr(user_model, fn)(str(files / "llama"), str(files / "tokens.npy"), str(tmp_path / "o"), **kw)
    assert seen["device"].type == "cpu"


@pytest.mark.parametrize("cmd", ["llc", "chi", "patch"])
def test_command_passes_device_to_the_run(files, tmp_path, monkeypatch, cmd):
    seen = {}

    def stand_in(*args, **kwargs):
        seen.update(kwargs)
        raise Reached

    monkeypatch.setattr(user_model, f"run_user_{cmd}", stand_in)
    argv = [cmd, "--model", str(files / "llama"), "--data", str(files / "tokens.npy"), "--out", str(tmp_path)]
    with pytest.raises(Reached):
        main([*argv, "--device", "cpu"])
    assert seen["device"] == torch.device("cpu")
    seen.clear()
    with pytest.raises(Reached):
        main(argv)
    assert seen["device"] is None


def _record_training_threads(monkeypatch) -> list:
    seen = []

    def stand_in(*args, **kwargs):
        seen.append(torch.get_num_threads())
        raise Reached

    monkeypatch.setattr(interpretive, "train", stand_in)
    return seen


def test_demo_equivalence_threads_reach_the_training(tmp_path, monkeypatch):
    seen = _record_training_threads(monkeypatch)
    before = torch.get_num_threads()
    with pytest.raises(Reached):
        main(["demo", "equivalence", "--quick", "--threads", "2", "--out", str(tmp_path)])
    assert seen == [2]
    assert torch.get_num_threads() == before
    seen.clear()
    with pytest.raises(Reached):
        main(["demo", "interpretive", "--quick", "--out", str(tmp_path)])
    assert seen == [1]  # the demo's own count


class InProcessPool:
    """A stand-in for the worker pool running each job here, after the worker's thread count was reset (each
    spawned process starts with torch's own count)."""

    def __init__(self, workers, mp_context=None):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, fn, jobs):
        for job in jobs:
            torch.set_num_threads(1)
            yield fn(job)


def test_every_worker_process_takes_the_threads(tmp_path, monkeypatch):
    seen = _record_training_threads(monkeypatch)
    monkeypatch.setattr(interpretive, "ProcessPoolExecutor", InProcessPool)
    assert interpretive.reduced_interpretive_settings().num_workers > 1  # the pool path, not the loop
    before = torch.get_num_threads()
    try:
        with pytest.raises(Reached):
            interpretive.run_interpretive_demo(str(tmp_path), threads=3, log=None)
    finally:
        torch.set_num_threads(before)
    assert seen == [3]
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match=r"threads=.* is not valid; give the number of threads"):
            interpretive.run_interpretive_demo(str(tmp_path), threads=bad, log=None)


def test_threads_are_recorded_in_the_report_settings_not_the_pool_key():
    s = interpretive.quick_interpretive_settings()
    import dataclasses

    other = dataclasses.replace(s, num_threads=4)
    assert interpretive._member_key("sort", "L1d48h4", 0, s) == interpretive._member_key(
        "sort", "L1d48h4", 0, other
    )
    assert json.loads(json.dumps(dataclasses.asdict(other)))["num_threads"] == 4
