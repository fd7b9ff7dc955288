"""Circuit functions that ignored what they were given: corrupted prompts zero noising never reads (every entry point
warns once), the command line's checkpoint and --quiet skipping the pruning curve, checkpoints that did not name an
architecture change, float32 zero ablation's rounding on bias-free models, and settings a method does not read."""

import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import pypattern as pp
from pypattern import io
from pypattern.circuits import acdc, edge_attribution, edges, faithfulness, patch_edges, pruning_curve
from pypattern.circuits.engine import EdgeEngine
from pypattern.patching import KL, LogitDiff

sys.path.insert(0, str(Path(__file__).parent))
from _circuits_reference import ARCHS, prompts, tiny  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _caught(text, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` and the messages of the warnings it gave that hold ``text`` (every one, repeats
    too)."""
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    return out, [str(w.message) for w in got if text in str(w.message)]


# ------------------------------------------------------------------ corrupted prompts zero noising does not read


def test_every_circuit_function_warns_once_that_zero_noising_does_not_read_corrupted():
    model = tiny()
    clean, corr, ans, wrong = prompts(model)
    metric = LogitDiff(ans, wrong)
    g = edges(model)
    names = [str(e) for e in g][:4]
    scores = torch.linspace(-1, 1, len(g))
    kw = dict(metric=metric, mode="noise", ablation="zero")
    calls = {
        "patch_edges": lambda c: patch_edges(model, names, clean, c, **kw),
        "faithfulness": lambda c: faithfulness(model, names, clean, c, **kw),
        "edge_attribution": lambda c: edge_attribution(model, clean, c, **kw).values,
        "pruning_curve": lambda c: pruning_curve(model, scores, clean, c, counts=[3, 30], **kw).metric_values,
        "acdc": lambda c: acdc(model, clean, c, threshold=0.3, quiet=True, **kw).mask,
    }
    for name, call in calls.items():
        given, msgs = _caught("corrupted is given but not read", call, corr)
        assert len(msgs) == 1 and msgs[0].startswith(f"{name}: "), (name, msgs)
        without, msgs = _caught("corrupted is given but not read", call, None)
        assert msgs == [], name
        # what the warning says: the corrupted prompts change nothing
        if isinstance(given, dict):
            for k in given:
                torch.testing.assert_close(given[k], without[k], rtol=0, atol=0)
        else:
            torch.testing.assert_close(given, without, rtol=0, atol=0)
    # edge_attribution's own check of vanishing scores patches every edge (KL's gradient is 0 at the clean run):
    # still one warning for the call
    _, msgs = _caught(
        "not read", edge_attribution, model, clean, corr, metric=KL(), mode="noise", ablation="zero"
    )
    assert len(msgs) == 1, msgs


# ------------------------------------------------------------------ pypattern circuit --checkpoint and --quiet


@pytest.fixture()
def model_and_prompts(tmp_path):
    """A pypattern model folder (config.json + weights.npz) and a prompt file for ``pypattern circuit``."""
    cfg = dict(n_layers=2, d_model=16, n_heads=2, d_mlp=32, d_vocab=12, n_ctx=6, dtype="float64", seed=3,
               init_range=0.4, act_fn="gelu")  # fmt: skip
    model = pp.models.Transformer(pp.models.TransformerConfig(**{**cfg, "dtype": torch.float64}))
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    np.savez(d / "weights.npz", **{k: v.numpy() for k, v in model.state_dict().items()})
    clean, corr, ans, wrong = prompts(model, B=4, seed=5)
    tok = tmp_path / "prompts.npz"
    np.savez(tok, clean=clean.numpy(), corrupted=corr.numpy(), answer=ans.numpy(), wrong=wrong.numpy())
    return str(d), str(tok)


def test_circuit_checkpoint_covers_the_pruning_curve_and_resumes_it(
    model_and_prompts, tmp_path, monkeypatch, capsys
):
    from pypattern.circuits import api
    from pypattern.cli import main

    d, tok = model_and_prompts
    monkeypatch.setattr(api, "_CHECKPOINT_EVERY_S", 0.0)
    monkeypatch.setattr(EdgeEngine, "chunk_size", lambda self: 2)  # the curve's 13 circuits in 7 blocks
    argv = ["circuit", "--model", d, "--data", tok, "--methods", "eap,exact", "--quiet"]
    in_curve, runs = [False], []  # the circuits of each engine call the pruning curve makes
    real_curve, real_run = api.pruning_curve, EdgeEngine.run

    def curve(*a, **k):
        in_curve[0] = True
        try:
            return real_curve(*a, **k)
        finally:
            in_curve[0] = False

    def run(self, masks, stop_at=None):
        if in_curve[0]:
            runs.append(masks.shape[0])
            if stop_at is not None and len(runs) == stop_at:
                raise KeyboardInterrupt
        return real_run(self, masks)

    monkeypatch.setattr(api, "pruning_curve", curve)
    monkeypatch.setattr(EdgeEngine, "run", lambda self, masks: run(self, masks))
    ref = str(tmp_path / "ref")
    assert main([*argv, "--out", str(tmp_path / "a"), "--checkpoint", ref]) == 0
    assert sorted(os.listdir(ref)) == ["exact_edge_scores.npz", "pruning_curve.npz"]
    want = (tmp_path / "a" / "pruning_curve.csv").read_text()
    total = sum(runs)  # both methods' curves and the two ends, in blocks of 2
    assert len(runs) > 3

    # stopped by Ctrl-C in the pruning curve's third block: the two blocks done are in the checkpoint
    runs.clear()
    monkeypatch.setattr(EdgeEngine, "run", lambda self, masks: run(self, masks, stop_at=3))
    ck = str(tmp_path / "ck")
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--out", str(tmp_path / "b"), "--checkpoint", ck])
    assert stop.value.code == 130
    _, meta = io.load(os.path.join(ck, "pruning_curve.npz"), kind="PruningCurveCheckpoint")
    assert meta["done"] == 4
    # resumed: only the circuits not done are run, and the curve equals the uninterrupted one, bit for bit
    runs.clear()
    monkeypatch.setattr(EdgeEngine, "run", lambda self, masks: run(self, masks))
    assert main([*argv, "--out", str(tmp_path / "c"), "--checkpoint", ck]) == 0
    assert sum(runs) == total - 4
    assert (tmp_path / "c" / "pruning_curve.csv").read_text() == want
    # another run (other scores: eap only) is refused by the curve's checkpoint, naming what differs
    with pytest.raises(SystemExit) as refused:
        main(["circuit", "--model", d, "--data", tok, "--methods", "eap", "--quiet", "--out",
              str(tmp_path / "d"), "--checkpoint", ck])  # fmt: skip
    assert refused.value.code == 2
    assert "pruning_curve.npz' was written by a different run: scores" in capsys.readouterr().err


def test_circuit_quiet_reaches_every_long_stage(model_and_prompts, tmp_path, monkeypatch):
    from pypattern import _progress
    from pypattern.cli import main

    d, tok = model_and_prompts
    seen = []
    real = _progress.progress_bar

    def spy(quiet, **bar):
        seen.append((bar.get("desc"), quiet))
        return real(quiet, **bar)

    monkeypatch.setattr("pypattern.circuits.api.progress_bar", spy)
    argv = ["circuit", "--model", d, "--data", tok, "--methods", "eap,exact"]
    assert main([*argv, "--out", str(tmp_path / "a"), "--checkpoint", str(tmp_path / "ck1")]) == 0
    assert {desc for desc, quiet in seen if not quiet} == {"exact edge scores", "pruning curve"}
    seen.clear()
    assert main([*argv, "--out", str(tmp_path / "b"), "--checkpoint", str(tmp_path / "ck2"), "--quiet"]) == 0
    assert {desc for desc, _ in seen} == {"exact edge scores", "pruning curve"} and all(q for _, q in seen)


# ------------------------------------------------------------------ fingerprints name the architecture


def test_a_config_change_that_keeps_the_weights_is_refused_as_another_architecture(tmp_path):
    m1, m2 = tiny(seed=4, act="gelu"), tiny(seed=4, act="relu")
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    clean, corr, ans, wrong = prompts(m1)
    metric = LogitDiff(ans, wrong)
    g = edges(m1)
    runs = {
        "acdc": lambda m, p: acdc(m, clean, corr, metric=metric, threshold=0.3, quiet=True, checkpoint=p),
        "exact": lambda m, p: edge_attribution(
            m, clean, corr, metric=metric, method="exact", quiet=True, checkpoint=p
        ),
        "curve": lambda m, p: pruning_curve(
            m, torch.linspace(0, 1, len(g)), clean, corr, metric=metric, counts=[2, 20], checkpoint=p
        ),
    }
    for kind, call in runs.items():
        path = str(tmp_path / f"{kind}.npz")
        call(m1, path)
        with pytest.raises(
            io.FingerprintMismatch, match="architecture = .* module tree and configuration"
        ) as e:
            call(m2, path)
        assert e.value.item == "architecture", kind
        call(m1, path)  # the same run resumes (finished: read back)


# ------------------------------------------------------------------ float32 zero ablation on bias-free models


def _pair(arch, layers=3):
    """The float32 model of ``arch`` and its exact float64 copy."""
    m32 = tiny(seed=7, layers=layers, dtype=torch.float32, **ARCHS[arch])
    m64 = tiny(seed=7, layers=layers, **ARCHS[arch])
    m64.load_state_dict({k: v.double() for k, v in m32.state_dict().items()})
    return m32, m64


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_float32_zero_ablation_of_a_bias_free_model_agrees_with_float64(arch):
    """An input with most of its edges patched is summed from what it keeps (the all-ablated input exactly zero),
    not formed as the residual minus nearly all of it: float32 agrees with float64, and nothing is warned of."""
    m32, m64 = _pair(arch)
    clean, _, ans, wrong = prompts(m64, seed=8)
    metric = LogitDiff(ans, wrong)
    E = len(edges(m64))
    keep = torch.rand(6, E, generator=torch.Generator().manual_seed(1)) < 0.15  # small circuits
    text = "nearly cancel"
    for call in (
        lambda m: patch_edges(m, ~keep, clean, metric=metric, ablation="zero"),
        lambda m: patch_edges(m, ~keep, clean, metric=metric, ablation="mean"),
        lambda m: patch_edges(m, torch.eye(E, dtype=torch.bool)[::7], clean, metric=metric, ablation="zero"),
    ):
        got, msgs = _caught(text, call, m32)
        assert msgs == []
        ref = call(m64)
        assert float((got.double() - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
    for fn in (
        lambda: faithfulness(m32, keep[0], clean, metric=metric, ablation="zero"),
        lambda: pruning_curve(m32, torch.rand(E), clean, metric=metric, ablation="zero", counts=[3, 30]),
    ):
        assert _caught(text, fn)[1] == []


def test_float32_zero_ablation_of_a_model_with_biases_is_not_warned_of():
    """Attention output biases write to the residual stream: the all-ablated input is theirs, not rounding, and
    float32 agrees with float64 on small circuits."""
    m32, m64 = _pair("gpt2")
    clean, _, ans, wrong = prompts(m64, seed=8)
    metric = LogitDiff(ans, wrong)
    keep = torch.rand(6, len(edges(m64)), generator=torch.Generator().manual_seed(1)) < 0.15
    got, msgs = _caught("zero ablation", patch_edges, m32, ~keep, clean, metric=metric, ablation="zero")
    assert msgs == []
    ref = patch_edges(m64, ~keep, clean, metric=metric, ablation="zero")
    assert float((got.double() - ref).abs().max()) <= 1e-4 * float(ref.abs().max())


# ------------------------------------------------------------------ settings a method does not read


def test_settings_a_method_does_not_read_are_named():
    model = tiny()
    clean, corr, ans, wrong = prompts(model)
    metric = LogitDiff(ans, wrong)
    plain = {
        m: edge_attribution(model, clean, corr, metric=metric, method=m).values for m in ("eap", "exact")
    }
    for method, kw, named in (
        ("eap", dict(max_batch=2), "max_batch=2"),
        ("eap", dict(memory_budget=1e6), "memory_budget=1000000.0"),
        ("eap", dict(steps=7), "steps=7"),
        ("exact", dict(steps=1), "steps=1"),
    ):
        sc, msgs = _caught(
            "does not read", edge_attribution, model, clean, corr, metric=metric, method=method, **kw
        )
        assert len(msgs) == 1 and named in msgs[0] and f"method={method!r}" in msgs[0], msgs
        torch.testing.assert_close(sc.values, plain[method], rtol=0, atol=0)  # indeed not read
    for method, kw in (
        ("eap", dict(steps=1)),
        ("eap-ig", dict(steps=3, max_batch=2)),
        ("exact", dict(max_batch=3)),
    ):
        _, msgs = _caught(
            "does not read", edge_attribution, model, clean, corr, metric=metric, method=method, **kw
        )
        assert msgs == [], (method, kw)
    # a pruning curve's points are counts or fractions: both given is refused (fractions were dropped)
    scores = torch.linspace(0, 1, len(edges(model)))
    with pytest.raises(ValueError, match="fractions= and counts= are both given"):
        pruning_curve(model, scores, clean, corr, metric=metric, fractions=[0.5], counts=[3])


def test_run_circuit_demo_refuses_settings_its_run_does_not_read(model_and_prompts, tmp_path, monkeypatch):
    from pypattern.circuits import api
    from pypattern.circuits.cli import run_circuit_demo

    d, tok = model_and_prompts
    monkeypatch.setattr(api, "prepare_runs", lambda *a, **k: pytest.fail("work began before the check"))
    for kw, named in ((dict(seed=3), "seed=3"), (dict(steps=50), "steps=50")):
        with pytest.raises(ValueError, match=f"{named} applies to the built-in task's training only"):
            run_circuit_demo(str(tmp_path / "o"), model_dir=d, tokens=tok, **kw)
    with pytest.raises(ValueError, match="ig_steps=3 is the interpolation steps of eap-ig"):
        run_circuit_demo(str(tmp_path / "o"), model_dir=d, tokens=tok, methods=("eap", "exact"), ig_steps=3)
