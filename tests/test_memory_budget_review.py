"""Memory settings bound what they say: circuits' ``memory_budget`` (patched runs and EAP-IG passes) and
activation patching's ``max_memory`` count the logits over the vocabulary and the metric's temporaries; numpy
integers are accepted as counts and byte budgets. The peak-memory checks run in a fresh process each (peak RSS),
on a model with a GPT-2-sized vocabulary and a tiny width, where the logits are nearly all of a run's memory."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import pypattern as pp
from pypattern import circuits as C

_PRELUDE = r"""
import resource, sys, warnings
import torch, pypattern as pp
from pypattern import circuits as C
warnings.simplefilter("ignore")
V, B, T = 50257, {B}, 4
m = pp.Transformer(pp.TransformerConfig(n_layers=2, d_model=32, n_heads={H}, d_vocab=V, n_ctx=16, d_mlp=64, seed=0))
g = torch.Generator().manual_seed(1)
clean = torch.randint(0, V, (B, T), generator=g)
corr = clean.clone()
corr[:, 1] = (corr[:, 1] + 5) % V
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
"""


def _child(body: str, B: int = 32, H: int = 4) -> dict:
    """Run ``body`` after the prelude in a fresh process; it prints ``key=value`` lines, returned as floats."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    code = _PRELUDE.format(B=B, H=H) + body
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return {k: float(v) for k, v in (line.split("=") for line in out.stdout.split() if "=" in line)}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS in bytes of ru_maxrss * 1024")
def test_circuits_memory_budget_bounds_a_batched_patched_run_with_a_large_vocabulary():
    budget = 3e8
    got = _child(
        f"""
masks = torch.rand(48, len(C.edges(m)), generator=g) < 0.5
eng, _ = C.prepare_runs(m, C.edges(m), clean, corr, pp.KL(), memory_budget={budget})
p0 = peak()
eng.run(masks)
print(f"chunk={{eng.chunk_size()}} extra={{peak() - p0}}")
"""
    )
    assert 1 <= got["chunk"] < 48
    assert got["extra"] <= 1.5 * budget, got  # about 1.4 GB before the logits were counted


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS in bytes of ru_maxrss * 1024")
def test_eap_ig_memory_budget_counts_the_logits_and_their_gradients():
    budget = 2e8
    got = _child(
        f"""
kw = dict(metric=pp.KL(), method="eap-ig", steps=16)
one = C.edge_attribution(m, clean, corr, max_batch=1, **kw)  # one run per pass: the baseline peak
p0 = peak()
res = C.edge_attribution(m, clean, corr, memory_budget={budget}, **kw)
torch.testing.assert_close(res.values, one.values, rtol=1e-4, atol=1e-6)
print(f"passes={{res.info['passes']}} extra={{peak() - p0}}")
"""
    )
    assert got["passes"] > 1
    assert got["extra"] <= 1.5 * budget, got  # about 1 GB before (all 16 runs in one pass)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS in bytes of ru_maxrss * 1024")
def test_activation_patching_max_memory_counts_the_logits_and_the_rows_unembedded_together():
    max_memory = 2e8
    got = _child(
        f"""
kw = dict(metric=pp.KL(), per_position=False, quiet=True)
pp.activation_patching(m, "z", clean, corr, layers=[1], heads=[0], **kw)  # one cell: the baseline peak
p0 = peak()
res = pp.activation_patching(m, "z", clean, corr, max_memory={int(max_memory)}, **kw)
extra = peak() - p0  # the bounded call's own peak (the reference below runs after it)
ref = pp.activation_patching(m, "z", clean, corr, max_batch=1, **kw)
torch.testing.assert_close(res.values, ref.values, rtol=1e-5, atol=1e-6)
print(f"batch={{res.info['max_batch']}} extra={{extra}}")
""",
        B=64,
        H=8,
    )
    assert got["batch"] < 16
    assert got["extra"] <= 1.5 * max_memory, got  # about 0.9 GB before (16 cells unembedded together)


def test_metric_row_bytes_counts_full_softmax_metrics_and_not_logit_differences():
    from pypattern.patching.engine import metric_row_bytes

    m = pp.Transformer(pp.TransformerConfig(n_layers=1, d_model=16, n_heads=2, d_vocab=3000, n_ctx=8, seed=0))
    x = torch.randn(4, 16)
    kl = pp.KL()
    kl.bind(torch.randn(4, 3000))
    row = 3000 * 4
    assert metric_row_bytes(m, x, kl) >= 3 * row  # the logits, the log-softmax and the divergence's terms
    ld = pp.LogitDiff(torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long))
    assert metric_row_bytes(m, x, ld) < row  # two columns read: no logits over the vocabulary


def _tiny():
    m = pp.Transformer(
        pp.TransformerConfig(n_layers=1, d_model=16, n_heads=2, d_vocab=20, n_ctx=8, d_mlp=32, seed=0)
    )
    g = torch.Generator().manual_seed(0)
    clean, corr = torch.randint(0, 20, (3, 5), generator=g), torch.randint(0, 20, (3, 5), generator=g)
    return m, clean, corr, pp.LogitDiff(torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]))


@pytest.mark.parametrize(
    "kw",
    [
        {"max_batch": np.int64(4)},
        {"max_memory": np.int64(2**30)},
        {"max_batch": np.int32(2), "max_memory": np.float64(1e9)},
    ],
)
def test_activation_patching_accepts_numpy_counts_and_bytes(kw):
    m, clean, corr, met = _tiny()
    got = pp.activation_patching(m, "z", clean, corr, metric=met, quiet=True, **kw)
    ref = pp.activation_patching(m, "z", clean, corr, metric=met, quiet=True)
    torch.testing.assert_close(got.values, ref.values)


@pytest.mark.parametrize("kw", [{"memory_budget": np.int64(10**9)}, {"max_batch": np.int64(2)}])
def test_circuits_accept_numpy_counts_and_bytes(kw):
    m, clean, corr, met = _tiny()
    E = len(C.edges(m))
    masks = torch.rand(5, E, generator=torch.Generator().manual_seed(2)) < 0.5
    got = C.patch_edges(m, masks, clean, corr, metric=met, **kw)
    ref = C.patch_edges(m, masks, clean, corr, metric=met)
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize(
    "kw, name",
    [
        ({"max_batch": np.bool_(True)}, "max_batch"),
        ({"max_batch": True}, "max_batch"),
        ({"max_batch": np.float64(2.0)}, "max_batch"),
        ({"max_memory": np.bool_(True)}, "max_memory"),
    ],
)
def test_activation_patching_still_refuses_bools_and_floats_as_counts(kw, name):
    m, clean, corr, met = _tiny()
    with pytest.raises(ValueError, match=name):
        pp.activation_patching(m, "z", clean, corr, metric=met, quiet=True, **kw)


@pytest.mark.parametrize(
    "kw, name", [({"memory_budget": np.bool_(True)}, "memory_budget"), ({"max_batch": True}, "max_batch")]
)
def test_circuits_still_refuse_bools(kw, name):
    m, clean, corr, met = _tiny()
    with pytest.raises(ValueError, match=name):
        C.patch_edges(m, [], clean, corr, metric=met, **kw)


def test_circuit_functions_document_their_memory_settings():
    for f in (C.patch_edges, C.edge_attribution, C.faithfulness, C.pruning_curve, C.acdc):
        doc = f.__doc__ or ""
        assert "max_batch :" in doc and "memory_budget :" in doc, f.__name__


def _cka_child(body: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    code = (
        "import resource, torch, pypattern as pp\nfrom pypattern import equivalence as eq\n"
        "g = torch.Generator().manual_seed(0)\n"
        "def rss():\n    with open('/proc/self/statm') as f:\n        return int(f.read().split()[1]) * 4096\n"
        "def peak():\n    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n" + body
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return {k: float(v) for k, v in (line.split("=") for line in out.stdout.split() if "=" in line)}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS from /proc and ru_maxrss")
def test_cka_feature_form_keeps_its_products_within_the_chunk_and_one_copy_of_the_inputs():
    got = _cka_child(
        """
eq._CHUNK_ELEMENTS = 2**21  # 16 MB products
x = torch.randn(64, 4096, generator=g, dtype=torch.float64)
y = torch.randn(64, 4096, generator=g, dtype=torch.float64)
pp.cka_matrix([x[:, :600]], [y[:, :600]], method="features")  # the first products' own set-up, before measuring
r0 = max(rss(), peak())
pp.cka_matrix([x], [y], method="features")  # X^T Y, X^T X, Y^T Y: 128 MB each unsplit
print(f"features={peak() - r0}")
"""
    )
    got.update(
        _cka_child(
            """
a = torch.randn(4096, 1024, generator=g, dtype=torch.float64)
b = torch.randn(4096, 1024, generator=g, dtype=torch.float64)
pp.linear_cka(a[:, :8], b[:, :8])  # the first products' own set-up, before measuring
r1 = max(rss(), peak())
pp.linear_cka(a, b)  # inputs 64 MB: one scaled copy of each, centred in place
print(f"linear={peak() - r1}")
"""
        )
    )
    assert got["features"] <= 160 * 2**20, got  # about 400 MB before (the self terms were one product each)
    assert got["linear"] <= 160 * 2**20, got  # about 200 MB before (two float64 copies of each input, |x|)


def test_cka_values_do_not_change_with_the_chunk_size_or_the_form(monkeypatch):
    from pypattern import equivalence as eq

    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(12, d, generator=g, dtype=torch.float64) * 5 + 2 for d in (3, 9, 20)]
    xs.append(torch.ones(12, 4, dtype=torch.float64))  # constant: NaN
    ys = [torch.randn(12, d, generator=g) for d in (7, 2)]
    copies = [x.clone() for x in xs]
    for dtype in (torch.float64, torch.float32):
        for debiased in (True, False):
            whole = eq.cka_matrix(xs, ys, method="features", debiased=debiased, dtype=dtype)
            gram = eq.cka_matrix(xs, ys, method="gram", debiased=debiased, dtype=dtype)
            monkeypatch.setattr(eq, "_CHUNK_ELEMENTS", 5)  # every product in blocks of a column or two
            split = eq.cka_matrix(xs, ys, method="features", debiased=debiased, dtype=dtype)
            same = eq.cka_matrix(xs, None, method="features", debiased=debiased, dtype=dtype)
            monkeypatch.undo()
            tol = 1e-12 if dtype == torch.float64 else 1e-5
            torch.testing.assert_close(split, whole, rtol=tol, atol=tol, equal_nan=True)
            torch.testing.assert_close(gram, whole, rtol=tol, atol=tol, equal_nan=True)
            torch.testing.assert_close(
                same,
                eq.cka_matrix(xs, None, method="gram", debiased=debiased, dtype=dtype),
                rtol=tol,
                atol=tol,
                equal_nan=True,
            )
            assert torch.isnan(whole[3]).all() and torch.isfinite(whole[:3]).all()
    for x, c in zip(xs, copies):
        assert torch.equal(x, c)  # the inputs are read, never centred in place
    lin = eq.linear_cka(xs[1], ys[0])
    assert lin == pytest.approx(float(eq.cka_matrix([xs[1]], [ys[0]], method="gram")[0, 0]), rel=1e-12)


def test_attribution_patching_accepts_a_numpy_max_batch():
    m, clean, corr, met = _tiny()
    got = pp.attribution_patching(m, clean, corr, metric=met, sites=["z"], max_batch=np.int64(2))["z"]
    ref = pp.attribution_patching(m, clean, corr, metric=met, sites=["z"])["z"]
    torch.testing.assert_close(got.values, ref.values)
    with pytest.raises(ValueError, match="max_batch=True"):
        pp.attribution_patching(m, clean, corr, metric=met, sites=["z"], max_batch=True)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS in bytes of ru_maxrss * 1024")
def test_shortlist_and_confirm_fits_its_confirming_batch_to_max_memory():
    max_memory = 2e8
    got = _child(
        f"""
from pypattern.patching import shortlist_and_confirm
kw = dict(metric=pp.KL(), per_position=False)
# one confirmed cell at a time: the reference values and the baseline peak (that of one confirmed cell)
ref = shortlist_and_confirm(m, "z", clean, corr, k=16, max_batch=1, **kw)
p0 = peak()
rows = shortlist_and_confirm(m, "z", clean, corr, k=16, max_memory={int(max_memory)}, **kw)
assert [r["exact"] for r in rows] == [r["exact"] for r in ref] or max(
    abs(a["exact"] - b["exact"]) for a, b in zip(rows, ref)) < 1e-5
print(f"extra={{peak() - p0}}")
""",
        B=64,
        H=8,
    )
    assert got["extra"] <= 1.5 * max_memory, got  # about 0.75 GB with all 16 cells confirmed together


def test_grad_gram_reference_refuses_a_chunk_size_that_is_not_a_count():
    from pypattern.gram import per_sample_grad_gram_reference

    model = torch.nn.Linear(3, 1)
    x = torch.randn(4, 3)

    def loss(mdl, xb):
        return mdl(xb).square().sum()

    ref = per_sample_grad_gram_reference(model, loss, x)
    torch.testing.assert_close(per_sample_grad_gram_reference(model, loss, x, chunk_size=np.int64(2)), ref)
    for bad in (0, -1, 1.5, 2.0, float("inf"), True, "2", torch.tensor(2)):
        with pytest.raises(ValueError, match="chunk_size="):
            per_sample_grad_gram_reference(model, loss, x, chunk_size=bad)
