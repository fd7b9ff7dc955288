"""Destination inputs formed from the better-conditioned side: zero ablation of a model without biases is exact
where every edge into an input is patched, and float32 agrees with the same model in float64 at every circuit size
(the float64 values checked in turn against the hook-based reference)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

from pypattern.circuits import edges, patch_edges
from pypattern.circuits import engine as engine_module
from pypattern.circuits.engine import prepare_runs
from pypattern.patching import LogitDiff

sys.path.insert(0, str(Path(__file__).parent))
from _circuits_reference import ARCHS, _node_outputs, naive_patch, prompts, tiny  # noqa: E402


def _pair(arch, layers=3):
    """The float32 model of ``arch`` and its exact float64 copy."""
    m32 = tiny(seed=7, layers=layers, dtype=torch.float32, **ARCHS[arch])
    m64 = tiny(seed=7, layers=layers, **ARCHS[arch])
    m64.load_state_dict({k: v.double() for k, v in m32.state_dict().items()})
    return m32, m64


def _no_rounding_warning(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, failing on any RuntimeWarning (the cancellation warning among them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        warnings.simplefilter("ignore", UserWarning)
        return fn(*args, **kwargs)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen2"])
@pytest.mark.parametrize("ablation", ["zero", "mean", "resample"])
def test_float32_agrees_with_float64_at_every_circuit_size(arch, ablation):
    m32, m64 = _pair(arch)
    clean, corr, ans, wrong = prompts(m64, seed=8)
    metric = LogitDiff(ans, wrong)
    g = edges(m64)
    E = len(g)
    c = corr if ablation == "resample" else None
    kw = dict(metric=metric, ablation=ablation)
    size = float(patch_edges(m64, torch.zeros(1, E, dtype=torch.bool), clean, c, **kw).abs().mean())
    gen = torch.Generator().manual_seed(1)
    for p in (0.05, 0.1, 0.2, 0.5):
        keep = torch.rand(6, E, generator=gen) < p
        got = _no_rounding_warning(patch_edges, m32, ~keep, clean, c, **kw).double()
        ref = patch_edges(m64, ~keep, clean, c, **kw)
        # the float64 values are the hook-based reference's (an independent computation)
        naive = naive_patch(
            m64, [g[i] for i in (~keep[0]).nonzero().flatten()], clean, c, metric, "noise", ablation
        )
        torch.testing.assert_close(ref[0], naive, rtol=1e-9, atol=1e-9)
        # float32 rounding: before, zero ablation was off by 1-5 times the clean metric at 5-10% kept
        assert float((got - ref).abs().max()) <= 1e-4 * size, (p, float((got - ref).abs().max()) / size)


@pytest.mark.parametrize("sparse", [0.0, 1.0])  # every stage's inputs as dense sums / term by term
@pytest.mark.parametrize("per_position", [False, True])
def test_both_forms_of_an_input_on_every_path(monkeypatch, sparse, per_position):
    """The dense sums (a matmul over every source, or per position an einsum) choose each input's form by its
    conditioning; the term-by-term sums by their count of terms: on every path float32 zero ablation of a Llama
    agrees with the hook-based reference in float64, at circuits from small to large."""
    monkeypatch.setattr(engine_module, "_SPARSE", sparse)
    m32, m64 = _pair("llama", layers=2)
    clean, _, ans, wrong = prompts(m64, seed=8)
    metric = LogitDiff(ans, wrong)
    g = edges(m64, per_position=per_position)
    E = len(g)
    gen = torch.Generator().manual_seed(3)
    keep = torch.rand(4, E, generator=gen) < torch.tensor([0.03, 0.1, 0.3, 0.7])[:, None]
    got = _no_rounding_warning(
        lambda: patch_edges(m32, ~keep, clean, graph=g, metric=metric, ablation="zero")
    )
    naive = torch.stack(
        [
            naive_patch(m64, [g[i] for i in m.nonzero().flatten()], clean, None, metric, "noise", "zero")
            for m in ~keep
        ]
    )
    size = float(naive.abs().max())
    assert float((got.double() - naive).abs().max()) <= 1e-4 * size


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_the_all_ablated_input_is_its_terms_sum(arch, ablation):
    """Every stage's all-ablated input is ``sum_u A_u`` plus the attention output biases written before it: for zero
    ablation of a model without biases exactly zero (it was the residual minus every node's output, rounding of
    the residual's size), and in general the sum over the reference's node outputs."""
    m32, m64 = _pair(arch)
    clean, _, ans, wrong = prompts(m64, seed=8)
    for model in (m32, m64):
        eng, _ = prepare_runs(model, edges(model), clean, None, LogitDiff(ans, wrong), "noise", ablation)
        outs = _node_outputs(model, clean)
        names = eng.graph.src_names
        rows = torch.arange(eng.T)
        for s in eng.graph.stages:
            want = torch.zeros_like(outs["embed"][:, : eng.T])
            for name in names[: eng.n_read[s]]:
                if ablation == "mean":
                    want = want + outs[name][:, : eng.T].mean(0, keepdim=True)
            for layer, blk in enumerate(model.blocks):
                if 2 * layer < s and getattr(blk.attn, "b_O", None) is not None:
                    want = want + blk.attn.b_O
            got = eng._ablated_input(s, rows)
            if ablation == "zero" and arch == "llama":
                assert bool((got == 0).all()), s
            tol = 1e-5 if model is m32 else 1e-12
            torch.testing.assert_close(got, want.expand_as(got), rtol=tol, atol=tol)


def test_a_kept_set_that_cancels_is_warned_of_in_float32():
    """Two heads reading alike and writing opposite outputs: an input that keeps only them is their sum, near zero
    from terms of full size (the inherent ill-conditioning, whichever form): float32 warns, float64 does not."""
    m32, m64 = _pair("llama", layers=2)
    for m in (m32, m64):
        with torch.no_grad():
            attn = m.blocks[0].attn
            attn.W_Q[1] = attn.W_Q[0]  # heads 0 and 1 share key/value head 0
            attn.W_O[1] = -attn.W_O[0]
    clean, _, ans, wrong = prompts(m64, seed=8)
    metric = LogitDiff(ans, wrong)
    g = edges(m64)
    # the two heads read the embedding; the MLP of layer 0 keeps only their writes (of its embedding and four heads)
    kept = {"embed->L0H0.q", "embed->L0H1.q", "embed->L0KV0.k", "embed->L0KV0.v", "L0H0->MLP0", "L0H1->MLP0"}
    keep = torch.tensor([e.name in kept for e in g])
    assert int(keep.sum()) == len(kept)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        patch_edges(m32, ~keep[None], clean, metric=metric, ablation="zero")
        patch_edges(m64, ~keep[None], clean, metric=metric, ablation="zero")
    msgs = [str(w.message) for w in rec if "nearly cancel" in str(w.message)]
    assert len(msgs) == 1 and msgs[0].startswith("patch_edges: in float32"), msgs
