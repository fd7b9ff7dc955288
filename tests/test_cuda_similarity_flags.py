"""The similarity measures (ridge with leave-one-out, the CCA family, CKA, Procrustes, interpretive equivalence) and
the concept flags (training, report, probes) on the device the data and the model live on.

Every test is parametrized over the devices present: the CPU always, CUDA when torch sees a GPU. Each computes the
same thing from CPU inputs and from inputs (or a model) on the device and compares the two, and checks that
tensors come back on the device of the data. On a machine without a GPU only the CPU parameter runs (it checks the
code paths and their determinism); with one, the CUDA parameter catches any tensor the library makes on the CPU and
mixes with the user's CUDA tensors.
"""

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from _devices import DEVICES, DeviceLessFactories

import pypattern
from pypattern.cca import cca, pwcca, svcca
from pypattern.equivalence import (
    MinibatchCKA,
    cka_matrix,
    interpretive_equivalence,
    linear_cka,
    permutation_test,
    procrustes,
    representations,
    resample_implementations,
)
from pypattern.flags import FlagSpec, flag_report, generate, probe_accuracy, train_flags
from pypattern.interpretive import accumulated_residual, similarity
from pypattern.models import Transformer
from pypattern.patterning import reweight
from pypattern.ridge import RidgeLOO, ridge_cv, ridge_similarity_cv
from pypattern.tasks.topics import TopicTask

pytestmark = pytest.mark.usefixtures("one_thread")


# float64 linear algebra on another device (other eigensolvers, other summation orders) agrees to rounding
TIGHT = dict(rtol=1e-7, atol=1e-9)


def _data(n, p, seed, dtype=torch.float64):
    return torch.randn(n, p, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _close(dev_value, cpu_value, **tol):
    """A result from the device equals the CPU one (tensors are moved to the CPU first)."""
    tol = tol or TIGHT
    if isinstance(dev_value, torch.Tensor):
        torch.testing.assert_close(dev_value.cpu(), cpu_value, **tol)
    else:
        assert dev_value == pytest.approx(cpu_value, rel=tol["rtol"], abs=tol["atol"], nan_ok=True)


def _on(t, device):
    assert t.device.type == torch.device(device).type, f"{t.device} is not {device}"


# ----- ridge with leave-one-out -------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n, p", [(12, 30), (40, 6)], ids=["gram", "features"])
@pytest.mark.parametrize("fit_intercept", [True, False], ids=["intercept", "no_intercept"])
@pytest.mark.parametrize("alpha_per_target", [False, True], ids=["one_alpha", "alpha_per_target"])
def test_ridge_loo_on_device(device, n, p, fit_intercept, alpha_per_target):
    x = _data(n, p, 0)
    y = x[:, :3] @ _data(3, 4, 1) + 0.3 * _data(n, 4, 2)
    alphas = (0.01, 0.1, 1.0, 10.0)
    ref = ridge_cv(x, y, alphas, fit_intercept=fit_intercept, alpha_per_target=alpha_per_target)
    solver = RidgeLOO(x.to(device), fit_intercept=fit_intercept)
    assert solver.gram_mode == (n <= p)
    res = solver.fit(y.to(device), alphas, alpha_per_target=alpha_per_target)
    for name in ("alphas", "loo_mse", "coef", "intercept"):
        _on(getattr(res, name), device)
        _close(getattr(res, name), getattr(ref, name))
    if alpha_per_target:
        _on(res.alpha, device)
        assert torch.equal(res.alpha.cpu(), ref.alpha)
    else:
        assert res.alpha == ref.alpha
    # predictions of new rows on the device, and of rows given on the CPU or as numpy
    x_new = _data(5, p, 3)
    want = ref.predict(x_new)
    for given in (x_new.to(device), x_new, x_new.numpy()):
        got = res.predict(given)
        _on(got, device)
        _close(got, want)
    # the functional form, targets given on the CPU while the design matrix is on the device
    again = ridge_cv(x.to(device), y, alphas, fit_intercept=fit_intercept, alpha_per_target=alpha_per_target)
    _close(again.coef, ref.coef)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n, p", [(30, 50), (60, 5)], ids=["gram", "features"])
def test_ridge_similarity_cv_on_device(device, n, p):
    z = _data(
        n, 3, 4
    )  # a few latent variables, read by both sides: predictable with fewer samples than features
    x = z @ _data(3, p, 5) + 0.1 * _data(n, p, 6)
    ys = [z @ _data(3, 6, 7) + 0.1 * _data(n, 6, 8), _data(n, 3, 9)]
    ref = ridge_similarity_cv(x, ys, seed=3, train_fraction=0.7)
    got = ridge_similarity_cv(x.to(device), [y.to(device) for y in ys], seed=3, train_fraction=0.7)
    assert len(got) == 2 and ref[0] > 0.5
    for g, r in zip(got, ref):
        _close(g, r)
    _close(
        ridge_similarity_cv(x.to(device), ys[0].to(device), seed=3, sqrt=False),
        ridge_similarity_cv(x, ys[0], seed=3, sqrt=False),
    )


# ----- the CCA family -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_cca_family_on_device(device):
    x = _data(50, 6, 8)
    y = torch.cat([x[:, :3] @ _data(3, 3, 9), _data(50, 2, 10)], 1) + 0.2 * _data(50, 5, 11)
    xd, yd = x.to(device), y.to(device)
    for kw in ({}, {"ridge": 0.1}):
        got = cca(xd, yd, **kw)
        _on(got, device)
        _close(got, cca(x, y, **kw))
        _close(pwcca(xd, yd, **kw), pwcca(x, y, **kw))
    for threshold in (0.99, 0.8, 1.0):  # the reduction to the leading directions (searchsorted on the device)
        _close(svcca(xd, yd, threshold=threshold), svcca(x, y, threshold=threshold))
        got = svcca(xd, yd, threshold=threshold, reduce="none")
        _on(got, device)
        _close(got, svcca(x, y, threshold=threshold, reduce="none"))
    # wide data (more features than samples): the SVD path, with a ridge
    xw, yw = _data(20, 30, 12), _data(20, 25, 13)
    _close(cca(xw.to(device), yw.to(device), ridge=0.5), cca(xw, yw, ridge=0.5))
    _close(
        svcca(xw.to(device), yw.to(device), threshold=0.9, ridge=0.5), svcca(xw, yw, threshold=0.9, ridge=0.5)
    )
    # ill-conditioned data (the SVD path without a ridge) and a rank-deficient one
    xi = x * torch.logspace(0, -5, 6, dtype=torch.float64)
    _close(cca(xi.to(device), yd.to(device)), cca(xi, y), rtol=1e-6, atol=1e-8)
    xr = torch.cat([x[:, :3], x[:, :3] @ _data(3, 2, 14)], 1)
    got = cca(xr.to(device), yd)
    assert got.numel() == 3
    _close(got, cca(xr, y))


@pytest.mark.parametrize("device", DEVICES)
def test_cca_refuses_inputs_on_two_devices_by_name(device):
    if device == "cpu":
        pytest.skip("needs a second device")
    x = _data(20, 3, 15)
    with pytest.raises(ValueError, match="same device"):
        cca(x.to(device), x)


# ----- CKA, Procrustes, permutation tests ------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_cka_procrustes_and_permutation_tests_on_device(device):
    x = _data(24, 10, 16)
    y = x @ _data(10, 8, 17) + 0.5 * _data(24, 8, 18)
    w = _data(24, 40, 19)  # wider than the samples: the Gram form
    xd, yd, wd = x.to(device), y.to(device), w.to(device)
    for debiased in (True, False):
        _close(linear_cka(xd, yd, debiased=debiased), linear_cka(x, y, debiased=debiased))
        _close(linear_cka(xd, wd, debiased=debiased), linear_cka(x, w, debiased=debiased))
    for method in ("gram", "features"):
        for ys in (None, [yd, wd]):
            got = cka_matrix([xd, wd], ys, method=method)
            _on(got, device)
            _close(got, cka_matrix([x, w], None if ys is None else [y, w], method=method))
    got = cka_matrix([xd, wd], [yd], dtype=torch.float32)
    _close(got, cka_matrix([x, w], [y], dtype=torch.float32), rtol=1e-5, atol=1e-6)
    acc, ref = MinibatchCKA(2, 1), MinibatchCKA(2, 1)
    for lo in (0, 12):
        acc.update([xd[lo : lo + 12], wd[lo : lo + 12]], [yd[lo : lo + 12]])
        ref.update([x[lo : lo + 12], w[lo : lo + 12]], [y[lo : lo + 12]])
    _close(acc.compute(), ref.compute())
    _close(acc.standard_error(), ref.standard_error())
    for angular in (False, True):
        _close(procrustes(xd, yd, angular=angular), procrustes(x, y, angular=angular))
        _close(procrustes(wd, xd, angular=angular), procrustes(w, x, angular=angular))
    _close(procrustes(xd, xd.clone()), 0.0)
    for measure in ("cka", "cka_biased", "procrustes", "procrustes_angular"):
        got, want = (
            permutation_test(xd, yd, measure, num_permutations=5),
            permutation_test(x, y, measure, num_permutations=5),
        )
        _close(got.statistic, want.statistic)
        np.testing.assert_allclose(got.null, want.null, **TIGHT)
        assert got.p_value == want.p_value


# ----- interpretive equivalence ---------------------------------------------------------------------------------
def _planted(seed, device, n=40, width=60):
    """A model's representation (``n`` inputs, ``width`` features: fewer inputs than features, the ridge's Gram
    form), a read-out of two of four latent variables (which two: ``seed``'s parity), and a sampler of noisy
    implementations of it, on ``device``."""
    z = _data(n, 4, 100)
    use = slice(0, 2) if seed % 2 else slice(2, 4)
    base = torch.tanh(z[:, use] @ _data(2, width, seed))

    def sample(s):
        g = torch.Generator().manual_seed(s)
        return (base + 0.1 * torch.randn(n, width, generator=g, dtype=torch.float64)).to(device)

    return base.to(device), sample


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("measure", ["ridge", "cka"])
@pytest.mark.parametrize("compare", ["model", "implementations"])
def test_interpretive_equivalence_on_device(device, measure, compare):
    def run(dev):
        ra, sa = _planted(1, dev)
        rb, sb = _planted(2, dev)
        return interpretive_equivalence(ra, rb, sa, sb, num_trials=3, similarity=measure, compare=compare)

    got, want = run(device), run("cpu")
    assert want.ties == 0 and want.wins == 6  # informative: always closer to its own implementation
    np.testing.assert_allclose(got.own, want.own, **TIGHT)
    np.testing.assert_allclose(got.other, want.other, **TIGHT)
    assert got.wins == want.wins and got.ties == want.ties


@pytest.mark.parametrize("device", DEVICES)
def test_interpretive_similarity_on_device(device):
    x, _ = _planted(3, device)
    ys = [_planted(4, device)[0], _planted(3, device)[1](7)]
    for m in ("ridge", "cka", "procrustes"):
        got = similarity(m, x, ys, seed=2)
        want = similarity(m, x.cpu(), [y.cpu() for y in ys], seed=2)
        np.testing.assert_allclose(got, want, **TIGHT)


def _induction_model(device):
    from pypattern import InductionTask

    task = InductionTask(d_vocab=16, seq_len=9)
    model = Transformer(task.model_config(d_model=16, n_heads=2, seed=0)).to(device)
    return model, task.sample(12, seed=1).tokens.to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_representations_and_resampled_implementations_on_device(device):
    (model, tokens), (ref_model, ref_tokens) = _induction_model(device), _induction_model("cpu")
    tol = dict(rtol=1e-4, atol=1e-5)  # float32 forwards
    got = representations(model, tokens)
    _on(got, device)
    _close(got, representations(ref_model, ref_tokens), **tol)
    # prompts kept on the CPU: run where the model is
    assert torch.equal(representations(model, tokens.cpu()), got)
    sites = [("blocks.0.attn.hook_z", 1), ("blocks.1.hook_attn_out", None)]
    samp, ref = (
        resample_implementations(model, tokens, sites),
        resample_implementations(ref_model, ref_tokens, sites),
    )
    _close(samp(5), ref(5), **tol)
    mask = torch.ones_like(ref_tokens)
    mask[:3, -2:] = 0  # right padding
    rep, _ = accumulated_residual(model, tokens, attention_mask=mask, positions=slice(1, None))
    _on(rep, device)
    _close(
        rep,
        accumulated_residual(ref_model, ref_tokens, attention_mask=mask, positions=slice(1, None))[0],
        **tol,
    )


# ----- concept flags --------------------------------------------------------------------------------------------
TASK = TopicTask(num_topics=2, tokens_per_topic=8, num_shared=4, seq_len=16)
SPEC = FlagSpec("blocks.1.hook_resid_pre", dims=(0, 1, 2, 3), num_concepts=2)


@pytest.mark.parametrize("device", DEVICES)
def test_train_flags_and_flag_report_on_device(device):
    """Both stages of training (the stage-2 overwrite included), the report (read-out, ablation, steered and free
    generation, probes, a reference model) and the probe alone, with the model on the device."""
    base = Transformer(TASK.model_config(seed=0))
    kw = dict(stage1_steps=2, stage2_steps=2, batch_size=8, switch_prob=1.0, seed=1, log_every=1)
    ref_model, model = copy.deepcopy(base), copy.deepcopy(base).to(device)
    want, got = train_flags(ref_model, TASK, SPEC, **kw), train_flags(model, TASK, SPEC, **kw)
    tol = dict(rtol=1e-4, atol=1e-5)  # float32 training steps
    assert got.steps == want.steps and got.stages == want.stages == [1, 1, 2, 2]
    np.testing.assert_allclose(got.lm_losses, want.lm_losses, **tol)
    np.testing.assert_allclose(got.flag_losses, want.flag_losses, **tol)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        _on(p, device)
        _close(p.detach(), q.detach(), rtol=1e-3, atol=1e-4)

    rkw = dict(num_samples=16, gen_steps=2, seed=0)
    rep = flag_report(model, TASK, SPEC, reference_model=copy.deepcopy(base).to(device), **rkw)
    ref = flag_report(ref_model, TASK, SPEC, reference_model=copy.deepcopy(base), **rkw)
    for name in ("loss_clean", "loss_ablated", "reliance"):
        _close(getattr(rep, name), getattr(ref, name), rtol=1e-4, atol=1e-4)
    # fractions: a float32 forward on another device may flip a near-tie (an argmin, a sampled token)
    loose = 0.0 if device == "cpu" else 0.2
    for name in (
        "flag_accuracy",
        "steer_success",
        "steer_baseline",
        "steer_prompt_concept",
        "probe_non_flag",
        "probe_non_flag_shared",
        "probe_flag",
    ):
        assert getattr(rep, name) == pytest.approx(getattr(ref, name), abs=loose), name
    assert rep.reference.keys() == ref.reference.keys()
    for k, v in rep.reference.items():
        assert v == pytest.approx(ref.reference[k], abs=loose + 1e-9, nan_ok=True), k

    for which in ("non_flag", "flag", "all"):
        for shared in (False, True):
            got_p = probe_accuracy(model, TASK, SPEC, which=which, num_samples=16, only_shared_tokens=shared)
            want_p = probe_accuracy(
                ref_model, TASK, SPEC, which=which, num_samples=16, only_shared_tokens=shared
            )
            assert got_p == pytest.approx(want_p, abs=loose + 1e-9, nan_ok=True)


@pytest.mark.parametrize("device", DEVICES)
def test_generate_steered_by_a_concept_tensor_on_device(device):
    base = Transformer(TASK.model_config(seed=0))
    model = copy.deepcopy(base).to(device)
    prompt = TASK.sample(4, seed=3).tokens[:, :4]
    concept = torch.tensor([0, 1, 1, 0])
    out = generate(model, prompt.to(device), 3, SPEC, concept.to(device), greedy=True)
    _on(out, device)
    # a prompt kept on the CPU is continued where the model is
    assert torch.equal(generate(model, prompt, 3, SPEC, concept.to(device), greedy=True), out)
    want = generate(base, prompt, 3, SPEC, concept, greedy=True)
    if device == "cpu":
        assert torch.equal(out, want)
    assert out.shape == want.shape and torch.equal(out[:, :4].cpu(), prompt)


# ----- loss weights ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_reweight_loss_weights_on_the_losses_device(device):
    data = torch.arange(6.0)[:, None]
    w = np.array([1.0, 2.0, 0.0, 1.0, 3.0, 1.0])
    default = reweight(data, w, mode="loss")
    assert default.device.type == "cpu" and default.dtype == torch.float32  # the default is unchanged
    got = reweight(data, w, mode="loss", device=device)
    _on(got, device)
    assert torch.equal(got.cpu(), default)
    losses = torch.rand(6, device=device)
    _close((losses * got).mean(), (losses.cpu() * default).mean(), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="device applies to mode='loss'"):
        reweight(data, w, device=device)
    with pytest.raises(ValueError, match="not a torch device"):
        reweight(data, w, mode="loss", device="no-such-device")
    assert math.isclose(float(got.mean()), 1.0, rel_tol=1e-6)


# ----- no tensor made on the CPU by accident ----------------------------------------------------------------------
CHECKED = [
    Path(pypattern.__file__).parent / f"{m}.py"
    for m in ("ridge", "cca", "flags", "equivalence", "interpretive", "patterning")
]


def test_no_device_less_tensor_in_similarities_and_flags():
    """The paths above, run on the CPU under :class:`DeviceLessFactories`: the similarity, flag and re-weighting
    modules make no tensor without naming its device, so none is left on the CPU when the data (or the model) is on
    a GPU. This is what a machine without a GPU can check of the CUDA paths."""
    with DeviceLessFactories(CHECKED) as mode:
        for n, p in ((12, 30), (40, 6)):
            x, y = _data(n, p, 0), _data(n, 4, 1)
            for fit_intercept in (True, False):
                for per_target in (False, True):
                    ridge_cv(x, y, fit_intercept=fit_intercept, alpha_per_target=per_target).predict(x)
        z = _data(30, 3, 2)
        ridge_similarity_cv(z @ _data(3, 50, 3), [z @ _data(3, 4, 4), _data(30, 2, 5)], seed=1)
        a, b = _data(50, 6, 6), _data(50, 5, 7)
        cca(a, b), cca(a, b, ridge=0.1), svcca(a, b), svcca(a, b, threshold=0.8, reduce="none"), pwcca(a, b)
        cca(a * torch.logspace(0, -5, 6, dtype=torch.float64, device="cpu"), b)
        linear_cka(a, b), linear_cka(a, b, debiased=False), procrustes(a, b, angular=True)
        for method in ("gram", "features"):
            cka_matrix([a, b], method=method), cka_matrix([a], [b], method=method)
        MinibatchCKA(1, 1).update([a[:25]], [b[:25]]).update([a[25:]], [b[25:]]).standard_error()
        for measure in ("cka", "procrustes"):
            permutation_test(a, b, measure, num_permutations=2)
        for compare in ("model", "implementations"):
            for measure in ("ridge", "cka"):
                ra, sa = _planted(1, "cpu")
                rb, sb = _planted(2, "cpu")
                interpretive_equivalence(ra, rb, sa, sb, num_trials=2, similarity=measure, compare=compare)
        for m in ("ridge", "cka", "procrustes"):
            similarity(m, ra, [rb], seed=0)
        model, tokens = _induction_model("cpu")
        mask = torch.ones_like(tokens)
        mask[:2, -1] = 0
        accumulated_residual(model, tokens, attention_mask=mask, positions=slice(1, None))
        accumulated_residual(model, tokens, positions=-1)
        resample_implementations(model, tokens, [("blocks.0.attn.hook_z", 1)])(3)
        flagged = Transformer(TASK.model_config(seed=0))
        train_flags(flagged, TASK, SPEC, stage1_steps=1, stage2_steps=1, batch_size=4, switch_prob=1.0)
        flag_report(flagged, TASK, SPEC, num_samples=8, gen_steps=1, reference_model=flagged)
        probe_accuracy(flagged, TASK, SPEC, num_samples=8, only_shared_tokens=True)
        generate(flagged, TASK.sample(2, seed=0).tokens[:, :3], 2, SPEC, torch.tensor([0, 1], device="cpu"))
        reweight(torch.zeros(3, 1, device="cpu"), [1.0, 2.0, 3.0], mode="loss")
    assert not mode.found, sorted(mode.found)
