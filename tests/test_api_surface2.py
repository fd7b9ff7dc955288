"""The public surface of patching, equivalence, flags, tasks, patterning, ridge and CCA: numpy integers accepted
wherever an int is, bad values refused with an error that names the argument, messages that name importable
things, ``attribution_patching(max_memory=)`` bounding its memory, and every documented signature complete."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import pypattern as pp

N = np.int64


def _model(V=8, n_ctx=8, n_layers=1):
    cfg = pp.TransformerConfig(
        n_layers=n_layers, d_model=16, n_heads=2, d_vocab=V, n_ctx=n_ctx, d_mlp=32, seed=0
    )
    return pp.Transformer(cfg).double()


def _prompts(V=8):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, V, (4, 6), generator=g), torch.randint(0, V, (4, 6), generator=g)


def _ld():
    return pp.LogitDiff(torch.tensor([1, 2, 3, 4]), torch.tensor([0, 0, 0, 0]))


# ------------------------------------------------------------------ numpy integers are ints


def test_patching_counts_accept_numpy_integers():
    m, (clean, corr) = _model(n_layers=2), _prompts()
    kw = dict(metric=_ld(), quiet=True)
    got = pp.activation_patching(m, "z", clean, corr, window=N(2), **kw)
    ref = pp.activation_patching(m, "z", clean, corr, window=2, **kw)
    torch.testing.assert_close(got.values, ref.values)
    assert type(got.info["window"]) is int  # recorded (and saved) as an int
    a = pp.shortlist_and_confirm(m, "z", clean, corr, metric=_ld(), k=N(3))
    b = pp.shortlist_and_confirm(m, "z", clean, corr, metric=_ld(), k=3)
    assert a == b and len(a) == 3


def test_topic_task_and_flag_report_accept_numpy_integers():
    kw = dict(num_topics=2, tokens_per_topic=2, num_shared=2, seq_len=6, min_prefix=2)
    t_np = pp.TopicTask(**{k: N(v) for k, v in kw.items()})
    t = pp.TopicTask(**kw)
    assert t_np.d_vocab == t.d_vocab and type(t_np.n_ctx) is int
    assert torch.equal(t_np.sample(5, seed=N(3)).tokens, t.sample(5, seed=3).tokens)
    model = pp.Transformer(pp.TransformerConfig(n_layers=1, d_model=16, n_heads=2, d_vocab=t.d_vocab, n_ctx=8,
                                                d_mlp=32, seed=0))  # fmt: skip
    spec = pp.FlagSpec(hook="blocks.0.hook_resid_pre", dims=(0, 1), num_concepts=2)
    a = pp.flag_report(model, t, spec, num_samples=N(8), prompt_len=N(3), gen_steps=N(1), seed=N(4))
    b = pp.flag_report(model, t, spec, num_samples=8, prompt_len=3, gen_steps=1, seed=4)
    assert dataclasses.asdict(a) == dataclasses.asdict(b)
    assert pp.probe_accuracy(model, t, spec, num_samples=8, seed=N(5)) == pp.probe_accuracy(
        model, t, spec, num_samples=8, seed=5
    )


def test_task_seeds_accept_numpy_integers():
    parens = pp.ParenthesesTask(length=4)
    pm = pp.Transformer(pp.TransformerConfig(n_layers=1, d_model=16, n_heads=2, d_vocab=parens.d_vocab,
                                             n_ctx=parens.n_ctx, d_mlp=32, seed=0))  # fmt: skip
    np.testing.assert_equal(  # NaN equal to NaN (the empty probe cells of length 4)
        pp.algorithm_scores(pm, parens, num_train=N(20), seed=N(7)),
        pp.algorithm_scores(pm, parens, num_train=20, seed=7),
    )
    im = _model(V=16, n_ctx=17).float()
    torch.testing.assert_close(
        pp.prefix_matching_score(im, half_len=N(4), num_samples=N(2), seed=N(1)),
        pp.prefix_matching_score(im, half_len=4, num_samples=2, seed=1),
    )
    for task in (pp.IOITask(n_names=N(3), n_fillers=N(2)), pp.InductionTask(d_vocab=N(16), seq_len=N(9))):
        assert torch.equal(task.sample(N(3), seed=N(2)).tokens, task.sample(3, seed=2).tokens)


# ------------------------------------------------------------------ bad values refused by name


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: pp.ParenthesesTask(length=4, p_balanced=2.5), "p_balanced"),
        (lambda: pp.ParenthesesTask(length=4, p_balanced="x"), "p_balanced"),
        (lambda: pp.ParenthesesTask(length=4, p_balanced=float("nan")), "p_balanced"),
        (lambda: pp.ParenthesesTask(length="4"), "length"),
        (lambda: pp.IOITask(n_fillers=-3), "n_fillers"),
        (lambda: pp.IOITask(n_names=2.5), "n_names"),
        (lambda: pp.InductionTask(d_vocab=16, seq_len=9, repeat_len="x"), "repeat_len"),
        (lambda: pp.TopicTask(shared_prob=None), "shared_prob"),
        (lambda: pp.TopicTask(switch_prob="x"), "switch_prob"),
        (lambda: pp.TopicTask().sample(-2), "num_samples"),
        (lambda: pp.ParenthesesTask(length=4).sample(3, seed="x"), "seed"),
        (lambda: pp.IOITask().sample(2.5), "num_samples"),
    ],
)
def test_task_constructors_and_samplers_refuse_bad_values_by_name(make, name):
    with pytest.raises((TypeError, ValueError), match=name):
        make()


def test_parentheses_p_balanced_is_the_fraction_of_balanced_samples():
    # the check above keeps valid fractions working: p_balanced=1 gives only balanced strings, 0 none
    for p in (0.0, 1.0, np.float64(1.0)):
        kind = pp.ParenthesesTask(length=4, p_balanced=p).sample(64, seed=0).extra["kind"]
        assert float(kind.float().mean()) == float(p)


@pytest.mark.parametrize(
    "kw, name",
    [({"threshold": "x"}, "threshold"), ({"threshold": 1.5}, "threshold"), ({"fit_threshold": None},
     "fit_threshold"), ({"num_train": 0}, "num_train"), ({"seed": 2.5}, "seed")],
)  # fmt: skip
def test_algorithm_scores_refuses_bad_values_by_name(kw, name):
    parens = pp.ParenthesesTask(length=4)
    pm = pp.Transformer(pp.TransformerConfig(n_layers=1, d_model=16, n_heads=2, d_vocab=parens.d_vocab,
                                             n_ctx=parens.n_ctx, d_mlp=32, seed=0))  # fmt: skip
    with pytest.raises((TypeError, ValueError), match=name):
        pp.algorithm_scores(pm, parens, **{"num_train": 20, **kw})


def test_prefix_matching_score_refuses_bad_values_by_name():
    im = _model(V=16, n_ctx=17)
    for kw, name in (({"half_len": -3}, "half_len"), ({"num_samples": 0}, "num_samples")):
        with pytest.raises(ValueError, match=name):
            pp.prefix_matching_score(im, **kw)
    with pytest.raises(TypeError, match="model"):
        pp.prefix_matching_score(None)


@pytest.mark.parametrize("position", ["x", 2.5, None, [], [1.5, 2.0], torch.zeros(2, 2, dtype=torch.long)])
def test_metric_position_is_checked_by_name(position):
    with pytest.raises((TypeError, ValueError), match="position"):
        pp.KL(position=position)


def test_metric_positions_numpy_and_per_example_still_work():
    m, (clean, corr) = _model(), _prompts()
    kw = dict(quiet=True, per_position=False)
    ref = pp.activation_patching(m, "z", clean, corr, metric=pp.KL(position=4), **kw)
    for pos in (N(4), torch.tensor(4), [4, 4, 4, 4], np.array([4, 4, 4, 4]), torch.full((4,), 4)):
        got = pp.activation_patching(m, "z", clean, corr, metric=pp.KL(position=pos), **kw)
        torch.testing.assert_close(got.values, ref.values)
    met = pp.KL()
    met.position = "x"  # set after construction: named where the run reads it
    with pytest.raises(TypeError, match="metric.position"):
        pp.activation_patching(m, "z", clean, corr, metric=met, **kw)


def test_cka_matrix_names_a_non_sequence_argument():
    xs = [torch.randn(20, 3, dtype=torch.float64)]
    with pytest.raises(TypeError, match="ys"):
        pp.cka_matrix(xs, -3)
    with pytest.raises(TypeError, match="xs"):
        pp.cka_matrix(None)
    torch.testing.assert_close(pp.cka_matrix(xs), torch.ones(1, 1, dtype=torch.float64))


def test_flag_functions_name_an_unreadable_tensor_argument():
    spec = pp.FlagSpec(hook="blocks.0.hook_resid_pre", dims=(0, 1), num_concepts=2)
    acts = torch.randn(4, 6, 16)
    for labels in (None, "x", object()):
        with pytest.raises(TypeError, match="concept_labels"):
            pp.flag_loss(acts, labels, spec)
    with pytest.raises(TypeError, match="values"):
        pp.overwrite_flags(acts, spec, None)
    with pytest.raises(TypeError, match="mask"):
        pp.overwrite_flags(acts, spec, torch.zeros(2), mask=object())


def test_messages_name_importable_things():
    import pypattern.models
    from pypattern.models import HookedModule

    class Identity(torch.nn.Module):
        def forward(self, x):
            return x

    clean, corr = _prompts()
    with pytest.raises(ValueError) as e:
        pp.activation_patching(HookedModule(Identity(), {"hook_x": ""}), "resid_pre", clean, corr, metric=_ld(),
                               quiet=True)  # fmt: skip
    assert "pypattern.models.HookedModule(" in str(e.value) and hasattr(pypattern.models, "HookedModule")
    with pytest.raises(TypeError) as e:
        pp.equivalence.representations(_model(), {"input_ids": clean})
    assert "pypattern.interpretive.accumulated_residual(" in str(e.value)
    assert callable(importlib.import_module("pypattern.interpretive").accumulated_residual)
    with pytest.raises(TypeError, match="model is a NoneType"):
        pp.attribution_patching(None, clean, corr, metric=_ld())


# ------------------------------------------------------------------ attribution_patching(max_memory=)


def test_attribution_patching_max_memory_splits_the_prompts_and_keeps_the_result():
    from pypattern.patching.attribution import atp_prompt_bytes

    m, (clean, corr) = _model(n_layers=2), _prompts()
    kw = dict(metric=_ld(), sites=("z", "resid_pre"), grad_drop=True)
    one = pp.attribution_patching(m, clean, corr, max_batch=1, **kw)
    per = atp_prompt_bytes(m, clean.shape[1], _ld(), grad_drop=True)
    for max_memory in (per, N(2 * per + 1), 10**12):
        got = pp.attribution_patching(m, clean, corr, max_memory=max_memory, **kw)
        for site in one:
            torch.testing.assert_close(got[site].values, one[site].values)
            torch.testing.assert_close(got[site].info["graddrop"], one[site].info["graddrop"])
    for bad in (0, -1.0, "1GB", True, float("inf")):
        with pytest.raises(ValueError, match="max_memory"):
            pp.attribution_patching(m, clean, corr, max_memory=bad, **kw)
    with pytest.raises(ValueError, match="max_memory"):  # splitting needs a Metric
        pp.attribution_patching(m, clean, corr, metric=lambda lg: lg[..., 0], sites=("z",), max_memory=per)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS in bytes of ru_maxrss * 1024")
def test_attribution_patching_max_memory_bounds_the_peak():
    max_memory = int(1e8)
    code = f"""
import resource, warnings
import torch, pypattern as pp
warnings.simplefilter("ignore")
V, B, T = 50257, 32, 4
m = pp.Transformer(pp.TransformerConfig(n_layers=2, d_model=32, n_heads=4, d_vocab=V, n_ctx=16, d_mlp=64, seed=0))
g = torch.Generator().manual_seed(1)
clean = torch.randint(0, V, (B, T), generator=g)
corr = clean.clone()
corr[:, 1] = (corr[:, 1] + 5) % V
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
kw = dict(metric=pp.KL(), sites=("z", "resid_pre"))
pp.attribution_patching(m, clean[:1], corr[:1], **kw)  # one prompt: the baseline peak
p0 = peak()
res = pp.attribution_patching(m, clean, corr, max_memory={max_memory}, **kw)
extra = peak() - p0  # the bounded call's own peak (the reference below runs after it)
ref = pp.attribution_patching(m, clean, corr, max_batch=1, **kw)
for s in ref:
    torch.testing.assert_close(res[s].values, ref[s].values, rtol=1e-5, atol=1e-6)
print(f"extra={{extra}}")
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    extra = float(out.stdout.split("extra=")[1])
    assert extra <= 1.5 * max_memory, extra  # about 180 MB unbounded (32 prompts' logits and KL temporaries)


# ------------------------------------------------------------------ docstrings document every parameter

_MODULES = [
    "pypattern.patching.api", "pypattern.patching.metrics", "pypattern.patching.attribution",
    "pypattern.patching.corruptions", "pypattern.patching.results", "pypattern.patching.sites",
    "pypattern.equivalence", "pypattern.flags", "pypattern.interpretive", "pypattern.patterning", "pypattern.ridge",
    "pypattern.cca", "pypattern.tasks", "pypattern.tasks.base", "pypattern.tasks.algorithmic",
    "pypattern.tasks.induction", "pypattern.tasks.ioi", "pypattern.tasks.parens", "pypattern.tasks.topics",
    "pypattern.tasks.training",
]  # fmt: skip


def _documented(doc: str) -> list[str] | None:
    """The names of a numpydoc Parameters section (None without one)."""
    lines = inspect.cleandoc(doc).splitlines()
    for i, ln in enumerate(lines[:-1]):
        if ln.strip() == "Parameters" and set(lines[i + 1].strip()) == {"-"}:
            names = []
            for j in range(i + 2, len(lines)):
                ln2 = lines[j]
                if ln2.strip() and j + 1 < len(lines) and set(lines[j + 1].strip()) == {"-"}:
                    break  # the next section
                if ln2.strip() and not ln2.startswith(" "):
                    head = ln2.split(" : ")[0]
                    names += [n.strip().lstrip("*") for n in head.split(",")]
            return [n for n in names if re.fullmatch(r"[A-Za-z_]\w*", n)]
    return None


def _public_callables():
    for name in _MODULES:
        mod = importlib.import_module(name)
        for attr in getattr(mod, "__all__", []):
            obj = getattr(mod, attr, None)
            if not (inspect.isfunction(obj) or inspect.isclass(obj)) or not obj.__module__.startswith(
                "pypattern"
            ):
                continue
            yield f"{obj.__module__}.{obj.__qualname__}", obj
            if inspect.isclass(obj):
                for an, av in vars(obj).items():
                    if not an.startswith("_") and inspect.isfunction(av):
                        yield f"{obj.__module__}.{obj.__qualname__}.{an}", av


def test_parameters_sections_list_every_parameter():
    missing = {}
    for qual, obj in dict(_public_callables()).items():
        names = _documented(obj.__doc__ or "")
        if names is None:
            continue
        try:
            sig = inspect.signature(obj)
        except (TypeError, ValueError):
            continue
        skip = (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
        gone = [p for p in sig.parameters.values() if p.name not in ("self", "cls") and p.kind not in skip
                and p.name not in names]  # fmt: skip
        if gone:
            missing[qual] = [p.name for p in gone]
    assert not missing, missing
