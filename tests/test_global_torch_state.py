"""The estimators under the global torch state users run with.

Data made under ``torch.inference_mode()`` (token batches of a loader, the inputs of the per-sample gradient Gram)
give the same results as ordinary copies of them, and the Gram equals one ``autograd.grad`` per sample; a model
whose parameters are inference tensors is refused by every gradient estimator with a message naming them. Under
``torch.no_grad()``, deterministic algorithms, anomaly detection and a float64 default dtype, the estimators give
the numbers of a plain call and leave the global state (default dtype, grad mode, torch's and numpy's global
generators, thread count, flags) and the model (weights, train/eval mode, ``requires_grad``, hooks) as they were.
"""

import contextlib
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pypattern as pp
from pypattern import Transformer, TransformerConfig
from pypattern.circuits.api import edge_attribution
from pypattern.patching import LogitDiff

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::pypattern.sampling.diagnostics.StepBiasWarning"),
    pytest.mark.filterwarnings("ignore::pypattern.sampling.diagnostics.NonStationaryWarning"),
]

V = 23
RUN = dict(num_chains=2, num_draws=4, step_size=1e-3, nbeta=10.0, quiet=True, seed=0)


def tiny(dtype=torch.float32):
    cfg = TransformerConfig(n_layers=2, d_model=16, n_heads=2, d_vocab=V, n_ctx=8, dtype=dtype, seed=0)
    return Transformer(cfg)


def tokens():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, V, (3, 6), generator=g), torch.randint(0, V, (3, 6), generator=g)


def metric():
    return LogitDiff(torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]))


def sample_losses(model, x):
    logits = model(x)[:, :-1]
    return (
        F.cross_entropy(logits.reshape(-1, V), x[:, 1:].reshape(-1), reduction="none")
        .view(x.shape[0], -1)
        .mean(1)
    )


def test_loaders_of_inference_tensors_sample_as_their_ordinary_copies():
    model = tiny()
    clean, corr = tokens()
    with torch.inference_mode():
        ci, co = clean.clone(), corr.clone()
    assert ci.is_inference()
    got = pp.sample(model, [ci, co], **RUN).loss_trace
    want = pp.sample(model, [clean, corr], **RUN).loss_trace
    np.testing.assert_array_equal(got, want)
    got = pp.bif(model, [ci, co], clean, **RUN).bif
    want = pp.bif(model, [clean, corr], clean, **RUN).bif
    np.testing.assert_array_equal(got, want)


def test_gram_of_inference_tensor_inputs_equals_per_sample_autograd():
    model = tiny(torch.float64)
    clean, _ = tokens()
    with torch.inference_mode():
        ci = clean.clone()
    got = pp.per_sample_grad_gram(model, sample_losses, ci)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for i in range(clean.shape[0]):
        g = torch.autograd.grad(sample_losses(model, clean[i : i + 1]).sum(), params, allow_unused=True)
        grads.append(
            torch.cat([(z if z is not None else torch.zeros_like(p)).reshape(-1) for z, p in zip(g, params)])
        )
    G = torch.stack(grads)
    torch.testing.assert_close(got, G @ G.T, rtol=1e-9, atol=1e-12)


def test_a_model_with_inference_tensor_parameters_is_refused_by_the_gradient_estimators():
    with torch.inference_mode():
        model = tiny()
    clean, corr = tokens()
    calls = {
        "sample": lambda: pp.sample(model, [clean, corr], **RUN),
        "estimate_llc": lambda: pp.estimate_llc(model, [clean, corr], **RUN),
        "per_sample_grad_gram": lambda: pp.per_sample_grad_gram(model, sample_losses, clean),
        "attribution_patching": lambda: pp.attribution_patching(model, clean, corr, metric=metric()),
    }
    for name, call in calls.items():
        who = "sample()" if name in ("sample", "estimate_llc") else name  # the LLC runs sample()
        with pytest.raises(ValueError, match=rf"{re.escape(who)} .*'embed.W_E'.* inference tensors"):
            call()


@pytest.mark.parametrize("method", ["exact", "naive"])
def test_patching_takes_no_gradient_so_reads_a_model_made_under_inference_mode(method):
    with torch.inference_mode():
        made_there = tiny()
    ordinary = tiny()  # the same seed: the same weights, as ordinary tensors
    clean, corr = tokens()
    kw = dict(metric=metric(), method=method, quiet=True)
    got = pp.activation_patching(made_there, "resid_pre", clean, corr, **kw).values
    want = pp.activation_patching(ordinary, "resid_pre", clean, corr, **kw).values
    assert torch.equal(got, want)
    # the naive patch of one cell: the corrupted run with the clean layer-1 residual at position 2, by hand
    cache = ordinary.run_with_cache(clean, names_filter=["blocks.1.hook_resid_pre"])[1][
        "blocks.1.hook_resid_pre"
    ]

    def patch(x, hook):
        x = x.clone()
        x[:, 2] = cache[:, 2]
        return x

    with torch.no_grad():
        logits = ordinary.run_with_hooks(corr, fwd_hooks=[("blocks.1.hook_resid_pre", patch)])
    by_hand = logits[torch.arange(3), -1, [1, 2, 3]] - logits[torch.arange(3), -1, [4, 5, 6]]
    torch.testing.assert_close(got[:, 1, 2].to(by_hand.dtype), by_hand, rtol=1e-4, atol=1e-5)


@contextlib.contextmanager
def _deterministic():
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


@contextlib.contextmanager
def _float64_default():
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(torch.float32)


STATES = {
    "no_grad": torch.no_grad,
    "deterministic": _deterministic,
    "anomaly": lambda: torch.autograd.set_detect_anomaly(True),
    "float64_default": _float64_default,
}


def _state(model):
    return dict(
        dtype=torch.get_default_dtype(),
        grad=torch.is_grad_enabled(),
        rng=torch.get_rng_state(),
        np=np.random.get_state()[1].copy(),
        threads=torch.get_num_threads(),
        det=torch.are_deterministic_algorithms_enabled(),
        anomaly=torch.is_anomaly_enabled(),
        training=[m.training for m in model.modules()],
        requires_grad=[p.requires_grad for p in model.parameters()],
        hooks=sum(
            len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
            for m in model.modules()
        ),
        weights=[p.detach().clone() for p in model.parameters()],
    )


def _same_state(a, b):
    for k in a:
        if k in ("rng", "weights", "np"):
            pairs = zip(a[k], b[k]) if k == "weights" else [(a[k], b[k])]
            assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in pairs), k
        else:
            assert a[k] == b[k], k


@pytest.mark.parametrize("state", list(STATES))
def test_estimators_under_a_global_state_give_the_plain_numbers_and_leave_it_as_it_was(state):
    model = tiny().train()
    model.embed.W_E.requires_grad_(False)
    clean, corr = tokens()
    calls = {
        "llc": lambda: pp.estimate_llc(model, [clean, corr], **RUN).llc_mean,
        "gram": lambda: pp.per_sample_grad_gram(model, sample_losses, clean),
        "exact": lambda: pp.activation_patching(model, "z", clean, corr, metric=metric(), quiet=True).values,
        "atp": lambda: pp.attribution_patching(model, clean, corr, metric=metric())["z"].values,
        "eap": lambda: edge_attribution(model, clean, corr, metric=metric(), method="eap").values,
    }
    for name, call in calls.items():
        want = torch.as_tensor(np.asarray(call(), dtype=np.float64))
        torch.manual_seed(7)
        np.random.seed(7)
        before = _state(model)
        with STATES[state]():
            got = torch.as_tensor(np.asarray(call(), dtype=np.float64))
        _same_state(before, _state(model))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
