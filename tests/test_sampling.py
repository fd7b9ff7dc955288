"""pypattern.sampling: the SGLD optimizer against the fused op, batched == sequential chains, checkpoints that
resume to the identical result, divergence errors, diagnostics, result files, devinterp-compatible names."""

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pypattern.ops.sgld import sgld_step_
from pypattern.sampling import (
    SGLD,
    LLCResult,
    NonStationaryWarning,
    SampleResult,
    SamplingDivergedError,
    calibrate_step_size,
    chain_seed,
    check_stationarity,
    default_nbeta,
    ess,
    estimate_learning_coeff,
    estimate_learning_coeff_with_summary,
    estimate_llc,
    r_hat,
    sample,
)
from pypattern.truth import DeepLinearNetwork, make_regression_data

BACKENDS = ["reference", "cpp"]


def _mlp_task(seed=0, n=96, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=dtype)
    y = (x[:, :3].sum(1) > 0).long()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2)).to(dtype)
    ds = torch.utils.data.TensorDataset(x, y)
    loader = torch.utils.data.DataLoader(ds, batch_size=16, shuffle=True)
    return model, loader


# ---------------------------------------------------------------------------------------------------------------
# optimizer
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_sgld_optimizer_equals_op_calls(backend):
    model, loader = _mlp_task()
    ref = [p.detach().clone() for p in model.parameters()]
    anchors = [p.clone() for p in ref]
    opt = SGLD(
        model.parameters(), lr=1e-2, nbeta=5.0, localization=3.0, weight_decay=0.1, seed=7, backend=backend
    )
    x, y = next(iter(loader))
    for step in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        sgld_step_(
            ref,
            grads,
            anchors,
            step_size=1e-2,
            nbeta=5.0,
            localization=3.0,
            weight_decay=0.1,
            seed=7,
            step=step,
            backend=backend,
        )
        for a, b in zip(model.parameters(), ref):
            torch.testing.assert_close(a.detach(), b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fast_path_equals_public_op(backend):
    torch.manual_seed(0)
    ps = [torch.randn(5, 3), torch.randn(7)]
    gs = [torch.randn_like(p) for p in ps]
    an = [torch.randn_like(p) for p in ps]
    q = [p.clone() for p in ps]
    kw = dict(
        step_size=1e-2,
        nbeta=3.0,
        localization=2.0,
        weight_decay=0.5,
        noise_scale=0.7,
        bounding_box=0.9,
        seed=2**63 + 5,
        step=2**40 + 3,
    )
    sgld_step_(ps, gs, an, backend=backend, **kw)
    sgld_step_(q, gs, an, backend=backend, validate=False, **kw)
    for a, b in zip(ps, q):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    gs[1][2] = float("nan")
    with pytest.raises(FloatingPointError):
        sgld_step_(q, gs, an, backend=backend, validate=False, **kw)


def test_sgld_deterministic_update_and_restrictions():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = SGLD(
        model.named_parameters(),
        lr=0.1,
        nbeta=2.0,
        localization=4.0,
        noise_level=0.0,
        restrict_to="0.*",
        masks={"0.bias": torch.tensor([1.0, 0.0])},
    )
    assert opt.param_names == ["0.weight", "0.bias"]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    p = dict(model.named_parameters())
    # first step: w = w0, so the update is -lr/2 * nbeta * g
    torch.testing.assert_close(p["0.weight"].detach(), w0["0.weight"] - 0.05 * 2.0)
    torch.testing.assert_close(p["0.bias"].detach(), w0["0.bias"] - torch.tensor([0.1, 0.0]))
    torch.testing.assert_close(p["1.weight"].detach(), w0["1.weight"])  # not restricted to: frozen
    with pytest.raises(ValueError, match="lr"):
        SGLD(model.parameters(), lr=-1.0)
    with pytest.raises(ValueError, match="matches no parameter"):
        SGLD(model.named_parameters(), restrict_to="nothing.*")


def test_sgld_param_groups_step_with_their_own_hyperparameters_and_noise():
    """devinterp's SGLD is a torch optimizer and takes param-group dicts: each group steps with its own
    hyperparameters (either library's names, over the constructor's), group k with noise seed group_seed(seed, k),
    equal to one op call per group; a scheduler drives each group's step size; state_dict resumes; a bad value in a
    group is refused naming the group."""
    from pypattern.sampling.optim import group_seed

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4))
    w0 = [p.detach().clone() for p in model.parameters()]
    groups = [
        {"params": model[0].parameters()},
        {"params": model[1].parameters(), "lr": 1e-3, "noise_level": 0.5, "localization": 7.0},
    ]
    opt = SGLD(groups, lr=1e-2, nbeta=3.0, localization=2.0, seed=11)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    ref0, ref1 = [w.clone() for w in w0[:2]], [w.clone() for w in w0[2:]]
    x = torch.randn(5, 3)
    for step in range(3):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        lr0, lr1 = opt.param_groups[0]["lr"], opt.param_groups[1]["lr"]
        assert (lr0, lr1) == pytest.approx((1e-2 * 0.5**step, 1e-3 * 0.5**step))
        opt.step()
        sched.step()
        sgld_step_(ref0, grads[:2], w0[:2], step_size=lr0, nbeta=3.0, localization=2.0, seed=11, step=step)
        sgld_step_(
            ref1, grads[2:], w0[2:], step_size=lr1, nbeta=3.0, localization=7.0, noise_scale=0.5,
            seed=group_seed(11, 1), step=step,
        )  # fmt: skip
        for a, b in zip(model.parameters(), ref0 + ref1):
            torch.testing.assert_close(a.detach(), b, rtol=0, atol=0)
    assert group_seed(11, 1) != 11  # the second group's noise is its own stream
    # one dict group is the same optimizer as the tensors themselves
    m1, m2 = (nn.Linear(3, 2) for _ in range(2))
    m2.load_state_dict(m1.state_dict())
    o1, o2 = SGLD(m1.parameters(), lr=0.1, seed=3), SGLD([{"params": list(m2.parameters())}], lr=0.1, seed=3)
    for m, o in ((m1, o1), (m2, o2)):
        m(x).sum().backward()
        o.step()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # resume: a fresh optimizer loaded from state_dict continues the same trajectory
    state = {k: v for k, v in opt.state_dict().items()}
    after = [p.detach().clone() for p in model.parameters()]
    model(x).pow(2).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    expect = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p, a in zip(model.parameters(), after):
            p.copy_(a)
    fresh = SGLD(
        [{"params": model[0].parameters()}, {"params": model[1].parameters(), "lr": 1.0}], lr=1.0, seed=0
    )
    fresh.load_state_dict(state)
    for p, g in zip(model.parameters(), grads):
        p.grad = g
    fresh.step()
    for a, b in zip(model.parameters(), expect):
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"params\[1\]: step_size \(lr\) must be"):
        SGLD([{"params": model[0].parameters()}, {"params": model[1].parameters(), "lr": -1.0}])
    with pytest.raises(ValueError, match=r"params\[1\].*foo"):
        SGLD([{"params": model[0].parameters()}, {"params": model[1].parameters(), "foo": 1.0}])
    with pytest.raises(TypeError, match=r"params\[1\] must be a param-group dict"):
        SGLD([{"params": model[0].parameters()}, list(model[1].parameters())])


def test_sgld_add_param_group_steps_the_new_group_and_step_errors_name_the_group():
    """torch's add_param_group: the added group steps from its value when added, with its own hyperparameters and
    noise seed group_seed(seed, 1), equal to one op call; a group's step size set to 0 by hand is refused at the
    next step naming the group."""
    from pypattern.sampling.optim import group_seed

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    opt = SGLD(net[0].parameters(), lr=1e-2, nbeta=10.0, seed=4)
    opt.add_param_group({"params": net[1].parameters(), "lr": 1e-3, "noise_level": 0.5})
    assert opt.param_groups[1]["lr"] == 1e-3 and opt.param_groups[1]["nbeta"] == 10.0
    w1 = [p.detach().clone() for p in net[1].parameters()]
    ref = [w.clone() for w in w1]
    x = torch.randn(5, 4)
    for step in range(2):
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        grads = [p.grad.clone() for p in net[1].parameters()]
        opt.step()
        sgld_step_(
            ref,
            grads,
            w1,
            step_size=1e-3,
            nbeta=10.0,
            localization=0.0,
            noise_scale=0.5,
            seed=group_seed(4, 1),
            step=step,
        )
        for a, b in zip(net[1].parameters(), ref):
            torch.testing.assert_close(a.detach(), b, rtol=0, atol=0)
    opt.param_groups[1]["lr"] = 0.0
    with pytest.raises(ValueError, match=r"param group 1: step_size \(lr\) must be a finite number > 0"):
        opt.step()
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": net[0].parameters()})


def test_sgld_group_masks_as_devinterp_passes_them():
    """devinterp's sampler builds one group per parameter with a "mask" key: the same steps as masks= by name
    (one group) after the first group's seed, bit for bit per group; a mask of the wrong shape, or a tensor masked
    both ways, is refused naming it."""
    from pypattern.sampling.optim import group_seed

    torch.manual_seed(0)
    net = nn.Linear(3, 4)
    m_w = (torch.rand(4, 3) > 0.5).float()
    x = torch.randn(6, 3)
    w0 = [p.detach().clone() for p in net.parameters()]
    groups = [{"params": net.weight, "mask": m_w}, {"params": net.bias, "mask": None}]
    opt = SGLD(groups, lr=1e-2, nbeta=5.0, localization=1.0, seed=9)
    net(x).pow(2).sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    opt.step()
    ref_w, ref_b = [w0[0].clone()], [w0[1].clone()]
    kw = dict(step_size=1e-2, nbeta=5.0, localization=1.0, step=0)
    sgld_step_(ref_w, grads[:1], w0[:1], masks=[m_w], seed=9, **kw)
    sgld_step_(ref_b, grads[1:], w0[1:], seed=group_seed(9, 1), **kw)
    torch.testing.assert_close(net.weight.detach(), ref_w[0], rtol=0, atol=0)
    torch.testing.assert_close(net.bias.detach(), ref_b[0], rtol=0, atol=0)
    assert torch.equal(net.weight.detach()[m_w == 0], w0[0][m_w == 0])  # masked entries stay
    # devinterp 1.x's name for the group mask, and its constructor argument: the same step
    for make in (
        lambda ps: SGLD([{"params": ps[0], "optimize_over": m_w}, {"params": ps[1]}], lr=1e-2, nbeta=5.0,
                        localization=1.0, seed=9),
        lambda ps: SGLD([{"params": ps[0]}, {"params": ps[1], "optimize_over": None}], lr=1e-2, nbeta=5.0,
                        localization=1.0, seed=9, optimize_over=m_w),
    ):  # fmt: skip
        ps = [w.clone().requires_grad_(True) for w in w0]
        for p_, g_ in zip(ps, grads):
            p_.grad = g_
        make(ps).step()
        torch.testing.assert_close(ps[0].detach(), ref_w[0], rtol=0, atol=0)
    SGLD(
        net.parameters(), lr=1e-2, save_noise=False, save_mala_vars=False, metrics=None
    )  # devinterp 1.x's, off
    with pytest.raises(NotImplementedError, match=r"save_mala_vars=True.*not recorded"):
        SGLD(net.parameters(), lr=1e-2, save_mala_vars=True)
    with pytest.raises(NotImplementedError, match=r"metrics=\['grad_norm'\]"):
        SGLD(net.parameters(), lr=1e-2, metrics=["grad_norm"])
    with pytest.raises(ValueError, match="gives 'mask' and 'optimize_over'"):
        SGLD([{"params": net.weight, "mask": m_w, "optimize_over": m_w}])
    with pytest.raises(ValueError, match=r"params\[0\]\['mask'\] for tensor 0 must have its shape \(4, 3\)"):
        SGLD([{"params": net.weight, "mask": torch.ones(3, 4)}])
    with pytest.raises(ValueError, match="weight has a mask in masks= and in its group's 'mask'"):
        SGLD([{"params": [("weight", net.weight)], "mask": m_w}], masks={"weight": m_w})


def test_group_masks_of_every_fused_sampler_added_groups_and_resume():
    """SGNHT and RMSprop-SGLD honour a group's mask as masks= by name does (their masked entries stay); a key that
    is no hyperparameter of theirs is refused; a group added to SGLD takes the constructor's optimize_over; a
    state saved with other masks is refused on load."""
    from pypattern.sampling import SGNHT, RMSpropSGLD

    torch.manual_seed(0)
    x = torch.randn(5, 3)
    m = (torch.rand(4, 3) > 0.5).float()
    for cls in (SGNHT, RMSpropSGLD):
        a, b = nn.Linear(3, 4), nn.Linear(3, 4)
        b.load_state_dict(a.state_dict())
        w0 = a.weight.detach().clone()
        oa = cls([{"params": [("weight", a.weight), ("bias", a.bias)]}], lr=1e-2, masks={"weight": m}, seed=2)
        ob = cls([{"params": [b.weight, b.bias], "mask": [m, None]}], lr=1e-2, seed=2)
        for net, opt in ((a, oa), (b, ob)):
            net(x).pow(2).sum().backward()
            opt.step()
        torch.testing.assert_close(b.weight, a.weight, rtol=0, atol=0)
        assert torch.equal(b.weight.detach()[m == 0], w0[m == 0]) and not torch.equal(b.weight.detach(), w0)
        with pytest.raises(ValueError, match=r"params\[0\] has \['foo'\], not hyperparameters of"):
            cls([{"params": [b.weight], "foo": 1}], lr=1e-2)
        with pytest.raises(ValueError, match="saved by .* with other masks"):
            cls([{"params": [b.weight, b.bias]}], lr=1e-2).load_state_dict(ob.state_dict())
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(3, 4))
    opt = SGLD([{"params": [net[0].weight]}], lr=1e-2, optimize_over=m)
    opt.add_param_group({"params": [net[1].weight]})
    w1 = net[1].weight.detach().clone()
    net[1](x).pow(2).sum().backward()
    opt.step()
    assert torch.equal(net[1].weight.detach()[m == 0], w1[m == 0]) and not torch.equal(
        net[1].weight.detach(), w1
    )
    with pytest.raises(ValueError, match="saved by an SGLD with other masks"):
        SGLD([{"params": [net[0].weight]}, {"params": [net[1].weight]}], lr=1e-2).load_state_dict(
            opt.state_dict()
        )
    again = SGLD([{"params": [net[0].weight]}], lr=1e-2, optimize_over=m)
    again.add_param_group({"params": [net[1].weight]})
    again.load_state_dict(opt.state_dict())  # the same masks: resumes


@pytest.mark.parametrize("cls_name", ["SGLD", "SGNHT", "RMSpropSGLD"])
def test_load_state_dict_refuses_a_state_of_other_parameters_before_loading_anything(cls_name):
    """A state saved for parameters of another shape (which Tensor.copy_ would broadcast into the anchors) or of
    another dtype is refused naming the parameter's index and the expected and given shapes, with the step
    counter, seed, hyperparameters, anchors and sampler state left as they were; the same optimizer's state loads
    and resumes the same trajectory."""
    import pypattern.sampling as sampling

    cls = getattr(sampling, cls_name)
    torch.manual_seed(0)

    def build(*shapes, seed=0, lr=1e-3, dtype=torch.float32):
        ps = [nn.Parameter(torch.randn(*s, dtype=dtype)) for s in shapes]
        return ps, cls(ps, lr=lr, localization=1.0, seed=seed)

    def stepped(opt, ps, n=2):
        for _ in range(n):
            for p in ps:
                p.grad = torch.randn_like(p)
            opt.step()
        return opt

    def snapshot(opt):
        anchors = opt.anchors if cls_name == "SGLD" else opt.anchors[0]
        tensors = [a.clone() for a in anchors]
        tensors += [t.clone() for st in opt.state.values() for t in st.values()]
        tensors += [g["thermostat"].clone() for g in opt.param_groups if "thermostat" in g]
        return opt.num_steps, opt.seed, opt.param_groups[0]["lr"], tensors

    ps, opt = build((4, 4), (3,))
    stepped(opt, ps, 1)
    before = snapshot(opt)
    others = {
        r"params\[0\] has shape \(4, 1\), expected \(4, 4\)": build((4, 1), (3,), seed=7, lr=0.5),
        r"params\[1\] has shape \(5,\), expected \(3,\)": build((4, 4), (5,), seed=7, lr=0.5),
        r"params\[0\] has dtype torch.float64, expected torch.float32": build(
            (4, 4), (3,), seed=7, lr=0.5, dtype=torch.float64
        ),
    }
    for match, (qs, other) in others.items():
        state = stepped(other, qs, 3).state_dict()
        with pytest.raises((ValueError, TypeError), match=match):
            opt.load_state_dict(state)
        now = snapshot(opt)
        assert now[:3] == before[:3]
        assert all(torch.equal(x, y) for x, y in zip(now[3], before[3]))
    # one tensor too few in the group
    qs, other = build((4, 4), seed=7)
    with pytest.raises(ValueError, match="1 parameters in group 0, this optimizer 2"):
        opt.load_state_dict(stepped(other, qs).state_dict())
    # a matching state resumes the trajectory of the optimizer that saved it
    state = copy.deepcopy(opt.state_dict())  # the live state dict holds the optimizer's own tensors
    saved = [p.detach().clone() for p in ps]
    grads = [torch.randn_like(p) for p in ps]
    for p, g in zip(ps, grads):
        p.grad = g
    opt.step()
    want = [p.detach().clone() for p in ps]
    qs, fresh = build((4, 4), (3,), seed=3, lr=0.5)
    with torch.no_grad():
        for q, p0, g in zip(qs, saved, grads):
            q.copy_(p0)
            q.grad = g
    fresh.load_state_dict(state)
    fresh.step()
    for q, w in zip(qs, want):
        torch.testing.assert_close(q.detach(), w, rtol=0, atol=0)


def test_chain_seed():
    seeds = {chain_seed(0, c) for c in range(1000)}
    assert len(seeds) == 1000 and all(0 <= s < 2**64 for s in seeds)
    assert chain_seed(3, 1) == chain_seed(3, 1) != chain_seed(4, 1)
    assert chain_seed(3, 1, stream=1) != chain_seed(3, 1)


# ---------------------------------------------------------------------------------------------------------------
# runner
# ---------------------------------------------------------------------------------------------------------------
def _run(model, loader, **kw):
    base = dict(
        num_chains=3,
        num_draws=12,
        num_burnin_steps=4,
        num_steps_bw_draws=2,
        step_size=1e-3,
        localization=10.0,
        nbeta=20.0,
        seed=5,
        quiet=True,
        warn_nonstationary=False,
    )
    base.update(kw)
    return sample(model, loader, **base)


def test_batched_equals_sequential():
    model, loader = _mlp_task()
    obs = {
        "w_norm": lambda m, b: sum((p**2).sum() for p in m.parameters()) if hasattr(m, "parameters") else 0,
        "logit0": lambda m, b: m(b[0])[0],
    }
    a = _run(model, loader, batched=True, observables={"logit0": obs["logit0"]})
    b = _run(model, loader, batched=False, observables={"logit0": obs["logit0"]})
    assert a.batched and not b.batched
    assert np.isfinite(a.loss_trace).all() and a.loss_trace.shape == (3, 12)
    np.testing.assert_allclose(a.loss_trace, b.loss_trace, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(a.observables["logit0"], b.observables["logit0"], rtol=2e-5, atol=1e-5)
    assert a.observables["logit0"].shape == (3, 12, 2)
    assert a.init_loss == b.init_loss
    # different chains see different noise and different batches
    assert not np.allclose(a.loss_trace[0], a.loss_trace[1])
    # the user's model is untouched
    m2, _ = _mlp_task()
    for p, q in zip(model.parameters(), m2.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("batched", [False, True])
def test_runs_equal_separate_restricted_calls(batched):
    """Several restricted samplers in one call: each run equals its own call with that restriction (same noise
    and data per chain), batched or not; callbacks see the global chain index and the run."""
    model, loader = _mlp_task()
    mask = {"0.weight": torch.rand(8, 6, generator=torch.Generator().manual_seed(1)) > 0.5}
    specs = [("0.*", None), ("2.*", None), (["0.weight"], mask), (None, None)]
    seen = set()
    obs = {"logit0": lambda m, b: m(b[0])[0]}
    together = _run(
        model,
        loader,
        batched=batched,
        runs=specs,
        observables=obs,
        callbacks=[lambda chain, run: seen.add((chain, run))],
    )
    assert len(together) == len(specs) and seen == {(r * 3 + c, r) for r in range(4) for c in range(3)}
    for (restrict, masks), res in zip(specs, together):
        alone = _run(model, loader, batched=batched, restrict_to=restrict, masks=masks, observables=obs)
        assert res.batched == alone.batched == batched and res.loss_trace.shape == (3, 12)
        np.testing.assert_allclose(res.loss_trace, alone.loss_trace, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(
            res.observables["logit0"], alone.observables["logit0"], rtol=1e-5, atol=1e-6
        )
    # the runs really differ: a restricted run stays closer to w*'s loss than the unrestricted one
    assert not np.allclose(together[0].loss_trace, together[1].loss_trace)
    # and they split over threads the same way (cores=2: the 12 chains in two groups)
    threaded = _run(model, loader, batched=batched, runs=specs, observables=obs, cores=2)
    for a, b in zip(threaded, together):
        np.testing.assert_allclose(a.loss_trace, b.loss_trace, rtol=1e-6, atol=1e-7)
    # unrecorded observables reach the callbacks only
    got = []
    res = _run(
        model,
        loader,
        batched=batched,
        observables=obs,
        record_observables=False,
        callbacks=[lambda observables: got.append(observables["logit0"])],
    )
    assert res.observables == {} and len(got) == 3 * 12 and got[0].shape == (2,)
    with pytest.raises(ValueError, match="runs is empty"):
        _run(model, loader, runs=[])
    with pytest.raises(ValueError, match="not next to it"):
        _run(model, loader, runs=specs, restrict_to="0.*")
    with pytest.raises(ValueError, match=r"runs\[1\]: restrict_to='nope' matches no parameter"):
        _run(model, loader, runs=[("0.*", None), ("nope", None)])
    with pytest.raises(ValueError, match=r"runs\[0\]: masks has names that are not \(moving\)"):
        _run(model, loader, runs=[("2.*", mask)])


def test_init_loss_is_mean_over_several_batches():
    model, loader = _mlp_task()
    r = _run(model, loader, num_chains=2, num_init_loss_batches=5)
    assert r.init_losses.shape == (5,)
    assert r.init_loss == pytest.approx(r.init_losses.mean())
    assert np.ptp(r.init_losses) > 0  # really different batches
    full = torch.stack([nn.functional.cross_entropy(model(x), y) for x, y in loader]).mean()
    assert abs(r.init_loss - float(full.detach())) < 0.2
    r1 = _run(model, loader, num_chains=2, init_loss=0.25)
    assert r1.init_loss == 0.25


class _Stop(Exception):
    pass


@pytest.mark.parametrize("batched", [False, True])
def test_checkpoint_resume_identical(tmp_path, batched):
    model, loader = _mlp_task()
    full = _run(model, loader, batched=batched)
    path = tmp_path / "run.npz"
    calls = []

    def killer(chain, draw):
        calls.append((chain, draw))
        if chain == 1 and draw == 7:
            raise _Stop

    with pytest.raises(_Stop):
        _run(model, loader, batched=batched, checkpoint=path, callbacks=[killer])
    assert path.exists()
    with np.load(path, allow_pickle=False) as z:  # no pickle needed
        done = z["done"]
    assert done.sum() > 0 and done.sum() < 3 * 12
    seen = []
    res = _run(
        model,
        loader,
        batched=batched,
        checkpoint=path,
        callbacks=[lambda chain, draw: seen.append((chain, draw))],
    )
    np.testing.assert_array_equal(res.loss_trace, full.loss_trace)
    assert res.init_loss == full.init_loss
    # no finished draw was redone
    finished = {(c, d) for c in range(3) for d in range(int(done[c]))}
    assert not finished & set(seen)
    # the same call again returns the stored result without sampling
    again = _run(model, loader, batched=batched, checkpoint=path, callbacks=[killer])
    np.testing.assert_array_equal(again.loss_trace, full.loss_trace)
    with pytest.raises(ValueError, match="step_size = "):
        _run(model, loader, batched=batched, checkpoint=path, step_size=2e-3)


def _other_loss(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1]) * 1.0


def _negate_first_layer(model):
    with torch.no_grad():
        model[0].weight.neg_()  # sum |w| per tensor unchanged: only a hash of the bytes tells


@pytest.mark.parametrize(
    "change, item",
    [
        (lambda m, ld: (_negate_first_layer(m), dict())[1], "weights[0.weight]"),
        (lambda m, ld: dict(masks={"0.weight": (torch.arange(48).reshape(8, 6) % 3 == 0)}), "masks"),
        (lambda m, ld: dict(loss_fn=_other_loss), "loss_fn"),
        (lambda m, ld: dict(step_size=2e-3), "step_size"),
        (lambda m, ld: dict(seed=[5, 6]), "seed"),
        (lambda m, ld: dict(loader=_mlp_task(seed=1)[1]), "data"),
    ],
    ids=["negated-layer", "masks", "loss_fn", "step_size", "seed", "data"],
)
def test_checkpoint_of_another_run_is_refused(tmp_path, change, item):
    """A checkpoint identifies its run: other weights, masks, loss function, hyperparameters, seed or data are
    refused, naming the first differing item."""
    from pypattern.io import FingerprintMismatch

    model, loader = _mlp_task()
    path = tmp_path / "run.npz"
    kw = dict(num_chains=2, num_draws=4, num_burnin_steps=0, num_steps_bw_draws=1, checkpoint=path)
    _run(model, loader, masks={"0.weight": torch.ones(8, 6)}, **kw)
    other = change(model, loader)
    loader = other.pop("loader", loader)
    other.setdefault("masks", {"0.weight": torch.ones(8, 6)})
    with pytest.raises(
        FingerprintMismatch, match=rf"run.npz.*: {item.replace('[', '.').replace(']', '.')} = "
    ) as e:
        _run(model, loader, **{**kw, **other})
    assert e.value.item == item


def test_checkpoint_resumes_with_equal_inputs_in_other_containers(tmp_path):
    """A tuple seed and a list seed, a bool mask and a float mask of the same values: the same run."""
    model, loader = _mlp_task()
    path = tmp_path / "run.npz"
    kw = dict(num_chains=2, num_draws=6, checkpoint=path)
    calls = []

    def killer(chain, draw):
        if draw == 3:
            raise _Stop

    with pytest.raises(_Stop):
        _run(
            model,
            loader,
            seed=(5, 6),
            masks={"0.weight": torch.ones(8, 6, dtype=torch.bool)},
            callbacks=[killer],
            **kw,
        )
    res = _run(
        model,
        loader,
        seed=[5, 6],
        masks={"0.weight": torch.ones(8, 6)},
        callbacks=[lambda draw: calls.append(draw)],
        **kw,
    )
    full = _run(model, loader, seed=[5, 6], masks={"0.weight": torch.ones(8, 6)}, num_chains=2, num_draws=6)
    assert calls and min(calls) >= 3  # resumed, not restarted
    np.testing.assert_array_equal(res.loss_trace, full.loss_trace)


@pytest.mark.parametrize("batched", [False, True])
def test_callback_outputs_join_the_gradient_accumulation_micro_batches(batched):
    """With grad_accum_steps = 2 a callback's ``outputs`` hold both micro-batches: per-sample losses concatenated
    (the first half is the draw's ``batch``, recomputed on the chain's model), a number per micro-batch stacked."""
    model, loader = _mlp_task()
    got = []

    def lf(m, b):
        per = nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")
        return per.mean(), per, per.mean()

    def cb(model, batch, outputs):
        with torch.no_grad():
            first = nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")
        got.append((outputs[0].shape, outputs[1].shape, first, outputs[0], outputs[1]))

    _run(
        model,
        loader,
        loss_fn=lf,
        grad_accum_steps=2,
        batched=batched,
        num_chains=2,
        num_draws=3,
        callbacks=[cb],
    )
    assert len(got) == 2 * 3
    for per_shape, mean_shape, first, per, means in got:
        assert per_shape == (32,) and mean_shape == (2,)
        torch.testing.assert_close(per[:16], first, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(means, per.view(2, 16).mean(1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batched", [False, True])
def test_callback_outputs_of_micro_batches_of_different_lengths_are_a_list(batched):
    """Batches padded to their own lengths: a per-token output cannot be concatenated over the micro-batches, so a
    callback gets the list of them (in order, each the micro-batch's own); without callbacks nothing is joined."""
    from pypattern.models.transformer import Transformer, TransformerConfig

    torch.manual_seed(0)
    model = Transformer(TransformerConfig(n_layers=1, d_model=16, n_heads=2, d_mlp=32, d_vocab=20, n_ctx=16))
    loader = [torch.randint(0, 20, (4, n)) for n in (6, 9, 7, 10)]

    def lf(m, toks):
        per_tok = m(toks, return_type="per_token_loss")
        return per_tok.mean(), per_tok

    kw = dict(num_chains=2, num_draws=3, step_size=1e-4, nbeta=10.0, grad_accum_steps=2, batched=batched)
    kw.update(quiet=True, warn_nonstationary=False, loss_fn=lf)
    sample(model, loader, **kw)
    got = []
    sample(model, loader, callbacks=[lambda outputs, batch: got.append((outputs[0], batch))], **kw)
    assert len(got) == 2 * 3
    for out, batch in got:
        assert isinstance(out, list) and len(out) == 2
        assert out[0].shape == (4, batch.shape[1] - 1)  # the first micro-batch is the draw's batch
        assert {o.shape[1] + 1 for o in out} in ({6, 9}, {7, 10})


@pytest.mark.parametrize("batched", [False, True])
def test_cores_same_draws_callbacks_in_order_checkpoint_and_errors(tmp_path, batched):
    """cores=2 runs the chains in two threads: same draws as one group, every draw reaches the callbacks once and
    in order per chain, a checkpointed run killed in one thread resumes to the same result, and a diverging chain
    in one thread stops the other and raises."""
    model, loader = _mlp_task()
    obs = {"logit0": lambda m, b: m(b[0])[0]}
    one = _run(model, loader, batched=batched, observables=obs, num_chains=4)
    seen = []
    two = _run(
        model,
        loader,
        batched=batched,
        observables=obs,
        num_chains=4,
        cores=2,
        callbacks=[lambda chain, draw: seen.append((chain, draw))],
    )
    np.testing.assert_allclose(two.loss_trace, one.loss_trace, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(two.observables["logit0"], one.observables["logit0"], rtol=1e-5, atol=1e-6)
    assert sorted(seen) == [(c, d) for c in range(4) for d in range(12)]
    for c in range(4):
        assert [d for cc, d in seen if cc == c] == list(range(12))
    assert torch.get_num_threads() >= 1  # restored (pinned to 1 only inside)

    path = tmp_path / "run.npz"

    def killer(chain, draw):
        if chain == 1 and draw == 7:
            raise _Stop

    with pytest.raises(_Stop):
        _run(model, loader, batched=batched, num_chains=4, cores=2, checkpoint=path, callbacks=[killer])
    with np.load(path, allow_pickle=False) as z:
        assert 0 < z["done"].sum() < 4 * 12
    resumed = _run(model, loader, batched=batched, num_chains=4, cores=2, checkpoint=path)
    np.testing.assert_allclose(resumed.loss_trace, one.loss_trace, rtol=1e-6, atol=1e-7)

    with pytest.raises(SamplingDivergedError, match="chain"):
        _run(model, loader, batched=batched, num_chains=4, cores=2, step_size=1e6, nbeta=1e6)
    with pytest.raises(ValueError, match="cores must be an int >= 1"):
        _run(model, loader, cores=0)


def test_per_chain_seeds_and_grad_accum_steps():
    """devinterp's per-chain seed lists and gradient accumulation."""
    model, loader = _mlp_task()
    # chain c of seed=[s_0, s_1, ...] is chain c of seed=s_c
    listed = _run(model, loader, seed=[5, 6, 7])
    for c, s in enumerate([5, 6, 7]):
        np.testing.assert_array_equal(listed.loss_trace[c], _run(model, loader, seed=s).loss_trace[c])
    with pytest.raises(ValueError, match="seed has 2 entries but num_chains=3"):
        _run(model, loader, seed=[1, 2])
    with pytest.raises(ValueError, match="seed must be an int"):
        _run(model, loader, seed=[1, -2, 3])

    # grad_accum_steps=2 on an unshuffled loader: step t uses batches 2t and 2t+1, the mean loss and gradient
    x, y = loader.dataset.tensors
    plain = torch.utils.data.DataLoader(loader.dataset, batch_size=16, shuffle=False)
    kw = dict(num_chains=1, num_draws=5, num_burnin_steps=0, num_steps_bw_draws=1, step_size=1e-3, nbeta=10.0)
    kw.update(localization=5.0, seed=3)
    for batched in (False, True):
        res = _run(model, plain, grad_accum_steps=2, batched=batched, **kw)
        work = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
        names = [n for n, _ in model.named_parameters()]
        opt = SGLD(list(zip(names, work)), lr=1e-3, nbeta=10.0, localization=5.0, seed=chain_seed(3, 0))
        want = []
        for t in range(5):
            vals = []
            for p in work:
                p.grad = None
            for j in (2 * t, 2 * t + 1):
                xb, yb = x[16 * (j % 6) : 16 * (j % 6) + 16], y[16 * (j % 6) : 16 * (j % 6) + 16]
                out = torch.func.functional_call(model, dict(zip(names, work)), (xb,))
                loss = nn.functional.cross_entropy(out, yb)
                (loss / 2).backward()
                vals.append(float(loss.detach()))
            want.append(np.mean(vals))
            opt.sgld_step()
        np.testing.assert_allclose(res.loss_trace[0], want, rtol=1e-5)
    assert default_nbeta(plain, 2) == pytest.approx(32 / math.log(32))


def test_divergence_names_chain_draw_and_step_size():
    model, loader = _mlp_task()
    with pytest.raises(SamplingDivergedError, match=r"chain \d+ diverged .*step_size=1e\+06") as e:
        _run(model, loader, step_size=1e6, nbeta=1e6, num_burnin_steps=0)
    assert "smaller step_size" in str(e.value) and "localization" in str(e.value)
    assert e.value.chain >= 0 and e.value.step_size == 1e6

    def bad_loss(m, batch):
        out = nn.functional.cross_entropy(m(batch[0]), batch[1])
        return out * float("nan")

    for batched in (False, True):
        with pytest.raises(SamplingDivergedError, match="not finite|nan"):
            _run(model, loader, loss_fn=bad_loss, init_loss=1.0, batched=batched)


def test_restricted_sampling_moves_only_component():
    model, loader = _mlp_task()
    seen = []

    def cb(model, draw):
        if draw == 11:
            seen.append({n: p.detach().clone() for n, p in model.named_parameters()})

    _run(model, loader, num_chains=1, batched=False, restrict_to="2.*", callbacks=[cb])
    w0 = dict(model.named_parameters())
    assert torch.equal(seen[0]["0.weight"], w0["0.weight"])
    assert not torch.equal(seen[0]["2.weight"], w0["2.weight"])


def test_quiet_and_progress(capsys, monkeypatch):
    monkeypatch.setattr("pypattern._progress.BAR_DELAY_S", 0.0)  # this short run's bar shown at once
    model, loader = _mlp_task()
    _run(model, loader, quiet=True)
    assert capsys.readouterr().err == ""
    _run(model, loader, quiet=False)
    assert "SGLD" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# results, diagnostics, LLC, compat
# ---------------------------------------------------------------------------------------------------------------
def test_result_files_roundtrip(tmp_path):
    model, loader = _mlp_task()
    r = estimate_llc(
        model,
        loader,
        num_chains=2,
        num_draws=10,
        step_size=1e-3,
        localization=10.0,
        quiet=True,
        observables={"out": lambda m, b: m(b[0]).mean(), "vec": lambda m, b: m(b[0])[0]},
        warn_nonstationary=False,
    )
    # long tables: one row per (chain, draw); scalar observables become columns
    t = r.to_pandas()
    assert list(t.columns) == ["chain", "draw", "loss", "llc"] and len(t) == 2 * 10
    row = t[(t.chain == 1) & (t.draw == 3)].iloc[0]
    assert row.loss == r.loss_trace[1, 3] and row.llc == pytest.approx(
        r.nbeta * (r.loss_trace[1, 3] - r.init_loss)
    )
    ts = r.sample.to_pandas()
    assert list(ts.columns) == ["chain", "draw", "loss", "out"]
    assert ts[(ts.chain == 0) & (ts.draw == 9)].iloc[0].out == r.sample.observables["out"][0, 9]
    r.save(tmp_path / "llc.npz")
    q = LLCResult.load(tmp_path / "llc.npz")
    assert q.llc_mean == r.llc_mean and q.llc_std == r.llc_std
    np.testing.assert_array_equal(q.loss_trace, r.loss_trace)
    np.testing.assert_array_equal(q.sample.observables["out"], r.sample.observables["out"])
    assert q.sample.config == r.sample.config
    r.sample.save(tmp_path / "s.npz")
    s = SampleResult.load(tmp_path / "s.npz")
    np.testing.assert_array_equal(s.loss_trace, r.sample.loss_trace)
    with pytest.raises(ValueError, match="SampleResult"):
        LLCResult.load(tmp_path / "s.npz")
    # definition
    np.testing.assert_allclose(r.llc_per_chain, r.nbeta * (r.loss_trace.mean(1) - r.init_loss))
    assert r.llc_std == pytest.approx(np.std(r.llc_per_chain, ddof=1))


def test_rhat_ess_known_cases():
    rng = np.random.default_rng(0)
    iid = rng.standard_normal((4, 2000))
    assert abs(r_hat(iid) - 1) < 0.01
    assert ess(iid) == pytest.approx(8000, rel=0.15)
    rho = 0.9
    ar = np.zeros((4, 4000))
    e = rng.standard_normal((4, 4000))
    for t in range(1, 4000):
        ar[:, t] = rho * ar[:, t - 1] + e[:, t]
    assert ess(ar) == pytest.approx(16000 * (1 - rho) / (1 + rho), rel=0.25)
    drift = iid + np.linspace(0, 3, 2000)
    assert r_hat(drift) > 1.1
    with pytest.warns(NonStationaryWarning, match="R-hat"):
        assert not check_stationarity(drift)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_stationarity(iid)


def test_a_trace_too_correlated_to_judge_warns_with_its_ess_and_drift():
    """Chains that relax from w* more slowly than the run is long pass split R-hat < 1.1 yet hold a few dozen
    effective draws: check_mixing names the ESS and the first and last thirds' means; the runner says it once."""
    from pypattern.sampling import check_mixing

    rng = np.random.default_rng(1)
    rho, n = 0.99, 300
    x = np.zeros((4, n))
    e = rng.standard_normal((4, n)) * np.sqrt(1 - rho**2)
    x[:, 0] = -3.0  # started far from equilibrium (0), relaxing over ~100 draws
    for t in range(1, n):
        x[:, t] = rho * x[:, t - 1] + e[:, t]
    assert ess(x) < 100
    with pytest.warns(
        NonStationaryWarning,
        match=r"effective sample size of \d+ of its 1200 draws \(below 100\).*first third",
    ):
        assert check_mixing(x) is False
    iid = rng.standard_normal((4, 200))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_mixing(iid) is True
        assert check_mixing(x, warn=False) is False
        assert check_mixing(iid[:, :3]) is False  # no ESS from 3 draws: not claimed, not warned
        assert check_mixing(iid[:2, :40]) is True  # 80 draws: judged against 20, not 100
    with pytest.warns(NonStationaryWarning, match=r"of its 80 draws \(below 20\)"):
        assert check_mixing(x[:2, :40]) is False  # ... and correlated draws still warn
    # through the sampler: a 10-parameter regression whose curvatures differ 900-fold, run short at a small step
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 10, generator=g) * torch.logspace(0, 1.5, 10)
    Y = X @ torch.randn(10, 1, generator=g)
    model = nn.Linear(10, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(X, Y).solution.T)
    loader = DataLoader(TensorDataset(X, Y), batch_size=64)
    kw = dict(num_chains=4, num_draws=200, step_size=1e-5, nbeta=10.0, localization=1.0, quiet=True, seed=0)
    with pytest.warns(NonStationaryWarning) as got:
        estimate_llc(model, loader, **kw)
    assert sum("effective sample size" in str(w.message) or "R-hat" in str(w.message) for w in got) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        estimate_llc(model, loader, warn_nonstationary=False, **kw)


def test_devinterp_compatible_names():
    model, loader = _mlp_task()
    okw = dict(lr=1e-3, localization=10.0, nbeta=20.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = estimate_learning_coeff_with_summary(
            model,
            loader,
            evaluate=lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]),
            optimizer_kwargs=okw,
            num_chains=3,
            num_draws=15,
            seed=1,
            verbose=False,
        )
        v = estimate_learning_coeff(
            model, loader, optimizer_kwargs=okw, num_chains=3, num_draws=15, seed=1, verbose=False
        )
        on = estimate_learning_coeff_with_summary(
            model,
            loader,
            optimizer_kwargs=okw,
            num_chains=3,
            num_draws=15,
            seed=1,
            verbose=False,
            online=True,
        )
    # devinterp 1.3.2's summary keys, no others
    assert set(s) == {"llc/mean", "llc/std", "llc-chain/0", "llc-chain/1", "llc-chain/2", "loss/trace"}
    assert s["loss/trace"].shape == (3, 15)
    # the same chains; the two losses (evaluate= and the default) round differently in float32
    assert v == pytest.approx(s["llc/mean"], rel=1e-5)
    assert s["llc/mean"] == pytest.approx(np.mean([s[f"llc-chain/{i}"] for i in range(3)]), rel=1e-5)
    assert on["llc/trace"].shape == (3, 15) and on["llc/means"].shape == (15,)
    # devinterp's online keys: per-draw nbeta (loss - init_loss) per chain, mean over chains at each draw
    assert on["llc/means"].mean() == pytest.approx(s["llc/mean"], rel=1e-4)
    np.testing.assert_allclose(on["llc/means"], on["llc/trace"].mean(0), rtol=1e-5)
    assert default_nbeta(loader) == pytest.approx(16 / math.log(16))
    # sample() and estimate_llc() default to it too (nbeta not given, or given as None in optimizer_kwargs)
    # (a step is given: without one the step is calibrated first, which this test is not about)
    for kw in (
        {"step_size": 1e-3},
        {"step_size": 1e-3, "optimizer_kwargs": {"nbeta": None}},
        {"optimizer_kwargs": {"lr": 1e-3}},
    ):
        res = sample(model, loader, num_chains=1, num_draws=2, quiet=True, warn_nonstationary=False, **kw)
        assert res.config["nbeta"] == pytest.approx(16 / math.log(16))
    assert (
        SGLD(model.parameters()).param_groups[0]["nbeta"] == 1.0
    )  # the optimizer's own default, as devinterp's
    # devinterp's per-chain seeds, gradient accumulation and cores (threads here) carry over
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kw = dict(optimizer_kwargs=okw, num_chains=3, num_draws=15, verbose=False)
        per = estimate_learning_coeff_with_summary(model, loader, seed=[1, 2, 3], cores=2, **kw)
        one = estimate_learning_coeff_with_summary(model, loader, seed=2, **kw)
        acc = estimate_learning_coeff_with_summary(model, loader, seed=1, grad_accum_steps=2, **kw)
    np.testing.assert_allclose(per["loss/trace"][1], one["loss/trace"][1], rtol=1e-6)
    assert acc["loss/trace"].shape == (3, 15) and np.isfinite(acc["llc/mean"])
    assert not np.allclose(acc["loss/trace"], s["loss/trace"])


def test_one_vocabulary_and_the_temperature_rule():
    """pypattern's names inside (param groups, config, checkpoints); devinterp's names translated at every entry;
    temperature is nbeta everywhere; two names of one hyperparameter that disagree are refused, naming both."""
    from pypattern.susceptibility import susceptibilities

    model, loader = _mlp_task()
    opt = SGLD(model.parameters(), lr=1e-3, noise_level=0.5, bounding_box_size=2.0, temperature=7.0)
    group = opt.param_groups[0]
    assert {k: group[k] for k in ("step_size", "nbeta", "noise_scale", "bounding_box")} == dict(
        step_size=1e-3, nbeta=7.0, noise_scale=0.5, bounding_box=2.0
    )
    assert not {"lr", "noise_level", "bounding_box_size", "temperature"} & set(group)
    same = SGLD(model.parameters(), step_size=1e-3, noise_scale=0.5, bounding_box=2.0, nbeta=7.0)
    assert same.param_groups[0].keys() == group.keys()
    assert all(
        same.param_groups[0][k] == group[k] for k in ("step_size", "nbeta", "noise_scale", "bounding_box")
    )
    SGLD(model.parameters(), lr=1e-3, step_size=1e-3)  # equal values under two names: fine
    with pytest.raises(ValueError, match="nbeta=2.0 and temperature=3.0.*older name"):
        SGLD(model.parameters(), nbeta=2.0, temperature=3.0)
    with pytest.raises(ValueError, match="noise_scale=1.0 and noise_level=0.5"):
        SGLD(model.parameters(), noise_scale=1.0, noise_level=0.5)
    SGLD(model.parameters(), lr=np.float32(1e-3))  # numpy scalars are numbers

    kw = dict(num_chains=2, num_draws=5)
    ref = _run(model, loader, step_size=1e-3, nbeta=20.0, noise_scale=0.5, **kw)
    assert {"step_size", "nbeta", "noise_scale", "bounding_box"} <= set(ref.config)
    assert not {"lr", "noise_level", "bounding_box_size"} & set(ref.config)
    for other in (
        dict(noise_level=0.5, nbeta=None, temperature=20.0),
        dict(noise_scale=None, optimizer_kwargs=dict(lr=1e-3, temperature=20.0, noise_level=0.5)),
        dict(noise_scale=None, optimizer_kwargs=dict(step_size=1e-3, nbeta=20.0, noise_scale=0.5)),
    ):
        res = _run(model, loader, **{**dict(step_size=1e-3, nbeta=20.0, noise_scale=0.5), **kw, **other})
        np.testing.assert_array_equal(res.loss_trace, ref.loss_trace)
        assert res.config == ref.config
    with pytest.raises(ValueError, match="nbeta=20.0 and temperature=3.0"):
        _run(model, loader, temperature=3.0, **kw)
    with pytest.raises(ValueError, match="optimizer_kwargs gives nbeta=2.0 and temperature=3.0"):
        _run(model, loader, optimizer_kwargs=dict(nbeta=2.0, temperature=3.0), **kw)
    with pytest.raises(ValueError, match="optimizer_kwargs gives nbeta=2.0 and temperature=3.0"):
        estimate_learning_coeff(
            model,
            loader,
            optimizer_kwargs=dict(nbeta=2.0, temperature=3.0),
            num_chains=2,
            num_draws=3,
            verbose=False,
        )
    with pytest.raises(ValueError, match="nbeta=2.0 and temperature=3.0"):
        susceptibilities(model, loader, next(iter(loader)), [["0.weight"]], nbeta=2.0, temperature=3.0)


def test_calibration_flags_divergence_and_recommends_healthy():
    model = DeepLinearNetwork((2, 2), dtype=torch.float64)
    with torch.no_grad():
        model.layers[0].weight.copy_(torch.tensor([[1.0, -0.5], [0.3, 2.0]]))
    ds = make_regression_data(model, 2, dtype=torch.float64)
    loader = torch.utils.data.DataLoader(ds, batch_size=len(ds))
    cal = calibrate_step_size(
        model,
        loader,
        step_sizes=[1e-5, 1e-3, 3e-3, 1.0],
        nbeta=100.0,
        localization=1.0,
        num_chains=4,
        num_draws=300,
        num_burnin_steps=100,
    )
    assert cal.diverged.tolist() == [False, False, False, True]
    # too small a step: the chains are still relaxing from w* (drifting trace)
    assert cal.healthy.tolist() == [False, True, True, False]
    assert "not stationary" in cal.reasons[0] and "diverged" in cal.reasons[3]
    assert cal.recommended == 3e-3
    assert "recommended" in str(cal)
    # regular model with d = 4: lambda = 2 (the healthy rows agree with it)
    np.testing.assert_allclose(cal.llc_mean[1:3], 2.0, rtol=0.2)


@pytest.mark.parametrize("batched", [False, True])
def test_runaway_chain_is_an_error_not_a_number(batched, monkeypatch):
    """A step size 1000x too large (eps * localization / 2 > 2: the localization step amplifies) drives the loss
    up by orders of magnitude while it stays finite; the sampler stops with the chain, draw and a smaller step."""
    import pypattern.sampling.context as context

    model, loader = _mlp_task()
    kw = dict(num_chains=2, num_draws=10, nbeta=20.0, localization=100.0, batched=batched)
    sane = _run(model, loader, step_size=1e-4, num_burnin_steps=0, num_steps_bw_draws=1, **kw)
    assert np.nanmax(sane.loss_trace) < 2 * sane.init_loss
    with pytest.raises(
        SamplingDivergedError, match=r"chain \d diverged at draw \d+ .*ran away.*e\.g\. 0\.01"
    ) as e:
        _run(model, loader, step_size=0.1, num_burnin_steps=0, num_steps_bw_draws=1, **kw)
    assert (
        e.value.chain in (0, 1) and e.value.draw >= 4 and e.value.suggested_step_size == pytest.approx(0.01)
    )
    # without the check the same call returns a finite, meaningless estimate: what the check prevents
    monkeypatch.setattr(context, "runaway_limit", lambda *args: float("inf"))
    res = _run(model, loader, step_size=0.1, num_burnin_steps=0, num_steps_bw_draws=1, **kw)
    assert np.isfinite(res.loss_trace).all() and res.loss_trace.max() > 1e3 * res.init_loss


def test_dropout_model_in_train_mode_runs_in_eval_mode(tmp_path):
    """Dropout in training mode would make the draws random: the sampler runs the model in eval mode (warning),
    restores its mode, and the draws are deterministic and resume exactly."""
    _, loader = _mlp_task()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.Tanh(), nn.Linear(8, 2))
    model.train()
    with pytest.warns(UserWarning, match="training mode and has dropout.*eval mode"):
        a = _run(model, loader, batched=False)
    assert model.training and model[1].training  # restored
    with pytest.warns(UserWarning, match="dropout"):
        b = _run(model, loader, batched=False)
    np.testing.assert_array_equal(a.loss_trace, b.loss_trace)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = _run(model, loader, batched=False)
    np.testing.assert_array_equal(a.loss_trace, c.loss_trace)
    model.train()
    path = tmp_path / "run.npz"

    def killer(chain, draw):
        if chain == 1 and draw == 5:
            raise _Stop

    with pytest.warns(UserWarning, match="dropout"), pytest.raises(_Stop):
        _run(model, loader, batched=False, checkpoint=path, callbacks=[killer])
    assert model.training
    with pytest.warns(UserWarning, match="dropout"):
        resumed = _run(model, loader, batched=False, checkpoint=path)
    np.testing.assert_array_equal(resumed.loss_trace, a.loss_trace)


def test_attention_dropout_of_hugging_face_attention_runs_in_eval_mode():
    """Hugging Face's Llama-family attention holds its dropout as a float ``attention_dropout`` (no Dropout module)
    applied in training mode: the sampler switches such a model to eval mode too, so the draws are deterministic."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=11, hidden_size=8, num_attention_heads=2, num_hidden_layers=1, intermediate_size=8,
        max_position_embeddings=8, attention_dropout=0.5,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).train()
    tokens = torch.randint(0, 11, (4, 6), generator=torch.Generator().manual_seed(0))
    kw = dict(num_chains=1, num_draws=3, num_burnin_steps=0, step_size=1e-5, localization=10.0, quiet=True)
    with pytest.warns(UserWarning, match="training mode and has dropout"):
        a = sample(model, [tokens], **kw)
    with pytest.warns(UserWarning, match="training mode and has dropout"):
        b = sample(model, [tokens], **kw)
    assert model.training
    np.testing.assert_array_equal(a.loss_trace, b.loss_trace)


@pytest.mark.parametrize("family", ["opt", "mixtral"])
def test_dropout_rates_held_as_numbers_and_router_jitter_run_in_eval_mode(family):
    """OPT keeps its dropout and layer drop as numbers on its modules, Mixtral its router jitter: random in training
    mode without a Dropout module. The sampler finds them, warns naming them, and samples deterministically."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if family == "opt":
        cfg = transformers.OPTConfig(
            vocab_size=11, hidden_size=8, num_attention_heads=2, num_hidden_layers=1, ffn_dim=8,
            word_embed_proj_dim=8, max_position_embeddings=8, dropout=0.3, attention_dropout=0.0,
        )  # fmt: skip
        model, names = transformers.OPTForCausalLM(cfg).train(), r"\.dropout=0\.3"
    else:
        cfg = transformers.MixtralConfig(
            vocab_size=11, hidden_size=8, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1,
            intermediate_size=8, num_local_experts=3, num_experts_per_tok=2, router_jitter_noise=0.3,
            max_position_embeddings=8,
        )  # fmt: skip
        model, names = transformers.MixtralForCausalLM(cfg).train(), r"jitter_noise=0\.3"
    tokens = torch.randint(0, 11, (4, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.equal(model(tokens).logits, model(tokens).logits)  # random in training mode
    kw = dict(num_chains=1, num_draws=3, num_burnin_steps=0, step_size=1e-4, localization=10.0, quiet=True)
    kw["noise_scale"] = 0.0
    with pytest.warns(UserWarning, match="training mode and has dropout .*" + names):
        a = sample(model, [tokens], **kw)
    with pytest.warns(UserWarning, match="training mode and has dropout"):
        b = sample(model, [tokens], **kw)
    assert model.training
    np.testing.assert_array_equal(a.loss_trace, b.loss_trace)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_parameters_are_refused_by_name(dtype):
    """The samplers' kernels move float32 and float64: a half-precision parameter is named before anything runs."""
    model, loader = _mlp_task()
    model[2].to(dtype)
    with pytest.raises(TypeError, match=rf"model parameter '2.weight' has dtype {dtype}.*float32 copy"):
        _run(model, loader)


def test_empty_or_exhausted_data_is_a_clear_error():
    """An empty loader or a generator that is exhausted after one pass: a ValueError naming the loader, never a
    bare StopIteration (which would silently end a caller's loop)."""
    model, loader = _mlp_task()
    with pytest.raises(ValueError, match="loader yielded no batch"):
        _run(model, [], nbeta=None)
    with pytest.raises(ValueError, match="loader yielded no batch"):
        _run(model, [], nbeta=20.0)
    batches = list(loader)[:2]
    with pytest.raises(ValueError, match="loader yielded no batch.*generator is read only once"):
        _run(model, (b for b in batches), nbeta=20.0, init_loss=0.5)
    # an empty DataLoader (not reported as a diverged chain) and a generator exhausted before the call
    empty = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(0, 6)), batch_size=4)
    for nbeta in (None, 20.0):
        with pytest.raises(ValueError, match="loader yielded no batch"):
            _run(model, empty, nbeta=nbeta)
    spent = (b for b in batches)
    list(spent)
    for kw in (dict(nbeta=20.0), dict(nbeta=20.0, init_loss=0.5)):
        with pytest.raises(ValueError, match="loader yielded no batch"):
            _run(model, spent, **kw)


def test_empty_data_in_a_callers_loop_raises_instead_of_ending_it():
    """A bare StopIteration escaping a call inside a generator would end the caller's loop silently (PEP 479
    turns it into RuntimeError only inside generators): every estimator raises ValueError instead."""
    from pypattern.susceptibility import bif, susceptibilities

    model, loader = _mlp_task()
    probe = next(iter(loader))
    kw = dict(num_chains=1, num_draws=2, step_size=1e-3, quiet=True)
    calls = [
        lambda data: sample(model, data, nbeta=20.0, **kw),
        lambda data: estimate_llc(model, data, **kw),
        lambda data: susceptibilities(model, data, probe, [["0.weight"]], nbeta=20.0, **kw),
        lambda data: bif(model, data, probe, nbeta=20.0, **kw),
    ]
    for call in calls:
        for data in ([], iter([])):
            with pytest.raises(ValueError, match="loader yielded no batch"):
                call(data)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(init_loss=float("nan")), "init_loss must be a finite number or None, got nan"),
        (dict(init_loss=float("inf")), "init_loss must be a finite number or None, got inf"),
        (dict(init_loss="0.5"), "init_loss must be a finite number or None, got '0.5'"),
        (dict(num_init_loss_batches=-1), "num_init_loss_batches must be an int >= 1, got -1"),
        (dict(num_init_loss_batches=0), "num_init_loss_batches must be an int >= 1, got 0"),
    ],
)
def test_init_loss_arguments_that_would_give_nan_are_refused(kw, match):
    """A NaN init_loss or a non-positive number of init-loss batches would make every LLC NaN: refused up front."""
    model, loader = _mlp_task()
    with pytest.raises(ValueError, match=match):
        _run(model, loader, **kw)


def test_numpy_scalars_are_numbers_in_sample():
    """np.float32 step sizes (and numpy ints and floats for every other number) are accepted and give the draws
    of the equal Python numbers; a checkpoint written with one resumes with the other (the same run)."""
    model, loader = _mlp_task()
    plain = dict(step_size=float(np.float32(1e-3)), nbeta=20.0, localization=10.0, num_chains=2, num_draws=6)
    numpy = dict(
        step_size=np.float32(1e-3),
        nbeta=np.float64(20.0),
        localization=np.float32(10.0),
        num_chains=np.int64(2),
        num_draws=np.int32(6),
        num_burnin_steps=np.int64(4),
        num_steps_bw_draws=np.int16(2),
        seed=np.int64(5),
        init_loss=np.float32(0.5),
    )
    ref = _run(model, loader, **plain, init_loss=0.5)
    res = _run(model, loader, **numpy)
    np.testing.assert_array_equal(res.loss_trace, ref.loss_trace)
    assert res.config["step_size"] == ref.config["step_size"]
    with pytest.raises(ValueError, match="num_draws must be an int >= 1, got 2.5"):
        _run(model, loader, num_draws=2.5)
    with pytest.raises(ValueError, match="num_chains must be an int >= 1, got np.True_"):
        _run(model, loader, num_chains=np.bool_(True))


def test_checkpoint_written_with_numpy_numbers_resumes_with_python_numbers(tmp_path):
    model, loader = _mlp_task()
    path = tmp_path / "run.npz"
    ref = _run(model, loader, num_chains=2)

    def killer(chain, draw):
        if chain == 1 and draw == 3:
            raise _Stop

    with pytest.raises(_Stop):
        _run(model, loader, num_chains=np.int64(2), seed=np.int64(5), checkpoint=path, callbacks=[killer])
    res = _run(model, loader, num_chains=2, checkpoint=path)
    np.testing.assert_array_equal(res.loss_trace, ref.loss_trace)


@pytest.mark.parametrize("batched", [False, None, True])
@pytest.mark.parametrize(
    "loss_fn, exc, match",
    [
        (
            lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")[:, None],
            ValueError,
            r"\(16, 1\)",
        ),
        (lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="none"), ValueError, r"\(16,\)"),
        (lambda m, b: (nn.functional.cross_entropy(m(b[0]), b[1]).item(),), TypeError, "of type float"),
    ],
    ids=["B-1", "B", "float"],
)
def test_loss_fn_must_return_one_number(loss_fn, exc, match, batched):
    """A loss of shape (B, 1) or (B,) (per-sample losses), or a Python float, is refused naming loss_fn, the
    shape and what is expected, in the sequential and the batched chains (init_loss given: no w* pass)."""
    model, loader = _mlp_task()
    if batched and exc is TypeError:  # .item() cannot run under vmap: that is what batched=True reports
        with pytest.raises(RuntimeError, match="loss_fn does not run under vmap: .*item()"):
            _run(model, loader, loss_fn=loss_fn, batched=batched, init_loss=0.5)
        return
    with pytest.raises(exc, match=rf"loss_fn returned a loss .*{match}"):
        _run(model, loader, loss_fn=loss_fn, batched=batched, init_loss=0.5)
    with pytest.raises(exc, match=rf"loss_fn returned a loss .*{match}"):
        _run(model, loader, loss_fn=loss_fn, batched=batched)
    one = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]).reshape(1, 1)  # one element: a number
    # the same float32 loss as a number (the default loss sums in float64: equal only to rounding)
    ref = _run(
        model, loader, batched=batched, loss_fn=lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])
    )
    np.testing.assert_array_equal(
        _run(model, loader, loss_fn=one, batched=batched).loss_trace, ref.loss_trace
    )


def test_token_loader_the_default_loss_cannot_read_is_named():
    """Float or out-of-vocabulary token batches (default loss): the error names the loader and the valid ids."""
    from pypattern.models import Transformer, TransformerConfig

    model = Transformer(TransformerConfig(n_layers=1, d_model=8, n_heads=2, d_mlp=None, d_vocab=7, n_ctx=6))
    data = torch.randint(0, 7, (8, 6), generator=torch.Generator().manual_seed(0))
    kw = dict(num_chains=1, num_draws=2, nbeta=5.0)
    with pytest.raises(TypeError, match="loader: a tensor batch must hold integer token ids"):
        _run(model, [data.float()], **kw)
    for bad in (7, -1):
        d = data.clone()
        d[3, 2] = bad
        with pytest.raises(ValueError, match=rf"loader contains token id {bad}; valid ids are 0 .. 6"):
            _run(model, [d], **kw)


def _damage(path, change):
    from pypattern import io

    arrays, meta = io.load(path, kind="sample-checkpoint")
    change(arrays)
    io.save(path, arrays, meta, kind="sample-checkpoint")


@pytest.mark.parametrize(
    "change, match",
    [
        ("truncate", "is truncated or corrupt"),
        (lambda a: a.pop("done"), "lacks the array 'done'"),
        (lambda a: a.update(done=np.zeros(4, np.int64)), r"'done' has shape \(4,\), expected \(3,\)"),
        (
            lambda a: a.update(next_step=np.zeros(2, np.int64)),
            r"'next_step' has shape \(2,\), expected \(3,\)",
        ),
        (
            lambda a: a.update(loss_trace=np.zeros((3, 5))),
            r"'loss_trace' has shape \(3, 5\), expected \(3, 12\)",
        ),
        (lambda a: a.update(done=np.array([99, 0, 0])), "'done' .* is out of range"),
        (lambda a: a.update(init_losses=np.zeros(0)), "'init_losses'"),
        (
            lambda a: a.update(done=a["done"].astype(np.float64)),
            "'done' has dtype float64, expected integers",
        ),
        (
            lambda a: a.update({"params/1/0.weight": np.zeros((6, 8), np.float32)}),
            r"params/1/0.weight.*\(8, 6\)",
        ),
        (
            lambda a: a.update({"params/7/0.weight": np.zeros((8, 6), np.float32)}),
            "not a parameter of a chain",
        ),
    ],
    ids=[
        "truncated",
        "missing",
        "done",
        "next_step",
        "loss",
        "done-range",
        "init",
        "dtype",
        "params",
        "chain",
    ],
)
def test_damaged_checkpoint_is_refused_naming_the_path(tmp_path, change, match):
    """A checkpoint cut short or with arrays of the wrong shape, dtype or range is refused with a FormatError
    naming the file (never an internal indexing error, never a silently wrong resume)."""
    from pypattern.io import FormatError

    model, loader = _mlp_task()
    path = tmp_path / "run.npz"

    def killer(chain, draw):
        if chain == 1 and draw == 3:
            raise _Stop

    with pytest.raises(_Stop):
        _run(model, loader, batched=False, checkpoint=path, callbacks=[killer])
    if change == "truncate":
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
    else:
        _damage(path, change)
    with pytest.raises(FormatError, match=rf"{path}.*{match}"):
        _run(model, loader, batched=False, checkpoint=path)


def test_lr_scheduler_drives_step_size_and_is_checked():
    """torch's schedulers write group["lr"]: it is the step size; a value a scheduler drives out of range is
    refused at the next step, naming the hyperparameter, before any weight changes."""
    model, _ = _mlp_task()
    opt = SGLD(model.parameters(), lr=1e-2, nbeta=5.0, seed=1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: [1.0, 0.5, -1.0][e])
    ref = SGLD([p.detach().clone().requires_grad_() for p in model.parameters()], lr=1e-2, nbeta=5.0, seed=1)
    for p, q in zip(model.parameters(), ref.param_groups[0]["params"]):
        p.grad = q.grad = torch.ones_like(p)
    opt.step()
    ref.step()
    sched.step()
    assert opt.param_groups[0]["step_size"] == 5e-3 and opt.param_groups[0]["lr"] == 5e-3
    opt.step()
    ref.param_groups[0]["step_size"] = 5e-3
    ref.step()
    for p, q in zip(model.parameters(), ref.param_groups[0]["params"]):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    sched.step()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"step_size \(lr\) must be a finite number > 0, got -0.01"):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_masks_that_freeze_everything_or_hold_nan_are_refused():
    model, loader = _mlp_task()
    zero = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="masks are zero everywhere"):
        _run(model, loader, masks=zero)
    with pytest.raises(ValueError, match=r"runs\[1\]: masks are zero everywhere"):
        _run(model, loader, runs=[(None, None), ("0.weight", {"0.weight": torch.zeros(8, 6)})])
    nan = torch.ones(8, 6)
    nan[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"masks\['0.weight'\] has NaN"):
        _run(model, loader, masks={"0.weight": nan})


def test_devinterp_lr_is_the_step_size_at_every_entry_point():
    """``lr`` (devinterp's name) works as a keyword of sample() and estimate_llc(), gives the same run as
    ``step_size``, and the two disagreeing is refused; an unknown keyword of estimate_llc() is named as its own."""
    from pypattern import estimate_llc

    model, loader = _mlp_task()
    kw = dict(num_chains=2, num_draws=5, nbeta=20.0, localization=10.0, quiet=True, warn_nonstationary=False)
    a = sample(model, loader, lr=1e-3, **kw)
    b = sample(model, loader, step_size=1e-3, **kw)
    np.testing.assert_array_equal(a.loss_trace, b.loss_trace)
    assert a.config["step_size"] == 1e-3
    np.testing.assert_array_equal(estimate_llc(model, loader, lr=1e-3, **kw).loss_trace, b.loss_trace)
    with pytest.raises(ValueError, match="step_size=0.0001 and lr=0.001"):
        sample(model, loader, lr=1e-3, step_size=1e-4, **kw)
    with pytest.raises(TypeError, match=r"estimate_llc\(\) got unexpected keyword arguments \['step_sise'\]"):
        estimate_llc(model, loader, step_sise=1e-3)


def test_a_tensor_given_as_the_loader_is_refused_and_1d_sequences_count_as_one():
    """Iterating a token tensor would make each row a batch of one 1-D sequence: refused by name. A 1-D token
    sequence is one sample (the loss rule's count), so the default nbeta refuses it as a batch of 1."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=11, n_embd=8, n_layer=1, n_head=2, n_positions=16)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    tokens = torch.randint(0, 11, (4, 8), generator=torch.Generator().manual_seed(0))
    kw = dict(num_chains=1, num_draws=3, step_size=1e-4, localization=10.0, quiet=True)
    with pytest.raises(TypeError, match=r"loader is a tensor of shape \(4, 8\).*\[tokens\]"):
        sample(model, tokens, **kw)
    with pytest.raises(ValueError, match="default nbeta needs batch_size .* >= 2, got 1"):
        sample(model, [tokens[0]], **kw)
    with pytest.raises(ValueError, match="got 1"):
        sample(model, [{"input_ids": tokens[0]}], **kw)
    res = sample(model, [tokens], **kw, warn_nonstationary=False)
    assert res.config["nbeta"] == pytest.approx(4 / np.log(4))


def test_batched_chains_show_their_own_weights_to_losses_observables_and_callbacks():
    """With chains batched (vmap), a loss with a weight penalty, an observable reading a submodule's weight and a
    callback reading ``model.parameters()`` see the chain's weights, exactly as in the sequential loop."""
    model, loader = _mlp_task(dtype=torch.float64)
    w_star = torch.cat([p.detach().flatten() for p in model.parameters()])

    def penalised(m, batch):
        x, y = batch
        pen = sum(p.pow(2).sum() for p in m.parameters())
        return nn.functional.cross_entropy(m(x), y) + 0.1 * pen

    obs = {
        "w0": lambda m, batch: m[0].weight.norm(),
        "n": lambda m, b: dict(m.named_parameters())["2.bias"].sum(),
    }
    out = {}
    for batched in (False, True):
        seen = []

        def cb(model, chain, draw, seen=seen):
            seen.append(
                float((torch.cat([p.detach().flatten() for p in model.parameters()]) - w_star).norm())
            )

        r = _run(model, loader, loss_fn=penalised, batched=batched, observables=obs, callbacks=[cb])
        out[batched] = (r, np.array(seen))
    (a, sa), (b, sb) = out[False], out[True]
    np.testing.assert_allclose(b.loss_trace, a.loss_trace, rtol=1e-9)
    for k in obs:
        np.testing.assert_allclose(b.observables[k], a.observables[k], rtol=1e-9)
    np.testing.assert_allclose(np.sort(sb), np.sort(sa), rtol=1e-9)
    assert sb.max() > 1e-3  # the chains moved, and the callback saw it


def test_loss_callbacks_restrictions_and_masks_of_the_wrong_kind_are_named():
    model, loader = _mlp_task()
    with pytest.raises(TypeError, match="loss_fn=3 is not callable"):
        _run(model, loader, loss_fn=3)
    with pytest.raises(TypeError, match=r"callbacks\[0\]=3 is not callable"):
        _run(model, loader, callbacks=[3])
    with pytest.raises(TypeError, match="restrict_to=3 is not valid"):
        _run(model, loader, restrict_to=3)
    with pytest.raises(
        ValueError, match=r"masks\['0.weight'\] has shape \(3,\); the parameter's is \(8, 6\)"
    ):
        _run(model, loader, masks={"0.weight": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(TypeError, match=r"masks\['0.weight'\] has dtype torch.int64"):
        _run(model, loader, masks={"0.weight": torch.ones(8, 6, dtype=torch.long)})
    for batched in (False, True):
        with pytest.raises(ValueError, match="loss_fn returned a loss with no gradient"):
            _run(
                model,
                loader,
                batched=batched,
                loss_fn=lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]).detach(),
            )


def test_cores_give_the_same_draws_with_the_default_batching():
    """batched=None is decided for the whole run, so splitting 3 chains over 2 cores (groups of 2 and 1) draws
    exactly what one core does."""
    model, loader = _mlp_task()
    a = _run(model, loader, cores=1)
    b = _run(model, loader, cores=2)
    np.testing.assert_array_equal(b.loss_trace, a.loss_trace)


def test_restrict_to_takes_a_module_name_as_components_do():
    model, loader = _mlp_task()
    a = _run(model, loader, restrict_to="0")
    b = _run(model, loader, restrict_to=["0.weight", "0.bias"])
    np.testing.assert_array_equal(a.loss_trace, b.loss_trace)


class _WithUnused(nn.Module):
    """A linear model with a parameter its forward never reads (and an empty one)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 1)
        self.extra = nn.Parameter(torch.randn(3))
        self.empty = nn.Parameter(torch.zeros(0))

    def forward(self, x):
        return self.a(x)


def _regression_loader():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 5, generator=g)
    y = X @ torch.randn(5, 1, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=16)


def test_a_parameter_the_loss_does_not_read_has_gradient_zero_in_batched_chains():
    """Batched chains (vmap) treat a parameter outside the graph as the sequential chains do: gradient zero, so it
    moves by noise and localization only, and both layouts give the same draws."""
    torch.manual_seed(0)
    model = _WithUnused()
    kw = dict(num_chains=2, num_draws=4, step_size=1e-3, localization=10.0, quiet=True, seed=5)
    out = {b: sample(model, _regression_loader(), batched=b, **kw) for b in (True, False)}
    assert out[True].batched and not out[False].batched
    np.testing.assert_allclose(out[True].loss_trace, out[False].loss_trace, rtol=1e-5)
    llc = estimate_llc(model, _regression_loader(), **kw)
    assert np.isfinite(llc.llc_mean)


def test_resume_with_another_number_of_init_loss_batches_is_refused(tmp_path):
    from pypattern.io import FingerprintMismatch

    kw = dict(num_chains=1, num_draws=3, step_size=1e-3, localization=10.0, quiet=True, seed=3)
    path = tmp_path / "run.npz"
    model = nn.Linear(5, 1)
    estimate_llc(model, _regression_loader(), checkpoint=path, **kw)
    with pytest.raises(FingerprintMismatch, match="num_init_loss_batches"):
        estimate_llc(model, _regression_loader(), checkpoint=path, num_init_loss_batches=2, **kw)
    again = estimate_llc(model, _regression_loader(), checkpoint=path, **kw)  # the same run still resumes
    assert np.isfinite(again.llc_mean)


def test_observables_with_one_name_and_non_bool_flags_are_refused():
    kw = dict(num_chains=1, num_draws=2, step_size=1e-3, localization=10.0, quiet=True)
    model, loader = nn.Linear(5, 1), _regression_loader()
    same = [lambda m, b: torch.tensor(1.0), lambda m, b: torch.tensor(2.0)]
    with pytest.raises(ValueError, match="two observables are named '<lambda>'"):
        sample(model, loader, observables=same, **kw)
    named = sample(model, loader, observables={"one": same[0], "two": same[1]}, **kw)
    assert set(named.observables) == {"one", "two"}
    for flag in ("batched", "quiet", "warn_nonstationary", "record_observables"):
        with pytest.raises(TypeError, match=f"{flag}='no' is not valid"):
            sample(model, loader, **{**kw, flag: "no"})


def test_damaged_checkpoints_are_refused_not_resumed(tmp_path):
    """A checkpoint whose unfinished chain lacks its weights, whose resume step disagrees with its draws, or whose
    header is not a mapping is a FormatError naming the file (it resumed to other numbers before)."""
    from pypattern import io

    kw = dict(num_chains=2, num_draws=5, step_size=1e-3, localization=10.0, quiet=True, seed=1, batched=False)
    model = nn.Linear(5, 1)
    path = tmp_path / "run.npz"

    def stop_at(chain, draw):
        if chain == 1 and draw == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sample(model, _regression_loader(), checkpoint=path, callbacks=[stop_at], **kw)
    arrays, meta = io.load(path, kind="sample-checkpoint")
    cases = {
        "noparams": ({k: v for k, v in arrays.items() if not k.startswith("params/")}, meta, "weights"),
        "step": ({**arrays, "next_step": np.zeros_like(arrays["next_step"])}, meta, "resumes at step 0"),
        "header": (arrays, {**meta, "checkpoint": []}, "header is not a mapping"),
    }
    for name, (a, m, match) in cases.items():
        io.save(tmp_path / f"{name}.npz", a, m, kind="sample-checkpoint")
        with pytest.raises(io.FormatError, match=match):
            sample(model, _regression_loader(), checkpoint=tmp_path / f"{name}.npz", **kw)
    full = sample(model, _regression_loader(), **kw)
    resumed = sample(model, _regression_loader(), checkpoint=path, **kw)
    np.testing.assert_array_equal(resumed.loss_trace, full.loss_trace)


def test_resume_refuses_another_architecture_or_recording_and_sub_runs_have_their_own_files(tmp_path):
    """Same weights, another activation: refused (the fingerprint hashes the module tree and config); observables
    recorded or not: refused; refined_llc with a second data set, calibrate_step_size and OnlineLLC keep one
    checkpoint file per sampler run (each ran into the previous one's file before)."""
    from pypattern.io import FingerprintMismatch
    from pypattern.sampling import OnlineLLC, refined_llc

    kw = dict(num_chains=1, num_draws=3, step_size=1e-3, localization=10.0, quiet=True, seed=2)
    torch.manual_seed(0)
    tanh = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1))
    relu = nn.Sequential(tanh[0], nn.ReLU(), tanh[2])
    sample(tanh, _regression_loader(), checkpoint=tmp_path / "a.npz", **kw)
    with pytest.raises(
        FingerprintMismatch,
        match=r"architecture = .* now \(a hash of the model.s module tree and configuration",
    ):
        sample(relu, _regression_loader(), checkpoint=tmp_path / "a.npz", **kw)
    obs = {"o": lambda m, b: m[0].weight.sum()}
    sample(
        tanh,
        _regression_loader(),
        checkpoint=tmp_path / "o.npz",
        observables=obs,
        record_observables=False,
        **kw,
    )
    with pytest.raises(FingerprintMismatch, match="record_observables"):
        sample(tanh, _regression_loader(), checkpoint=tmp_path / "o.npz", observables=obs, **kw)
    r1 = refined_llc(
        tanh,
        _regression_loader(),
        components=["0"],
        data=_regression_loader(),
        checkpoint=tmp_path / "r.npz",
        **kw,
    )
    r2 = refined_llc(
        tanh,
        _regression_loader(),
        components=["0"],
        data=_regression_loader(),
        checkpoint=tmp_path / "r.npz",
        **kw,
    )
    np.testing.assert_array_equal(r1.llc_mean, r2.llc_mean)
    assert (tmp_path / "r.npz").exists() and (tmp_path / "r.data.npz").exists()
    cal = calibrate_step_size(tanh, _regression_loader(), step_sizes=[1e-4, 1e-3], checkpoint=tmp_path / "c.npz",
                              **{k: v for k, v in kw.items() if k != "step_size"})  # fmt: skip
    assert len(cal.step_sizes) == 2 and (tmp_path / "c.step1.npz").exists()
    online = OnlineLLC(_regression_loader(), every=1, checkpoint=tmp_path / "on.npz", **kw)
    online(tanh, 0)
    online(tanh, 1)
    assert (tmp_path / "on.step0.npz").exists() and (tmp_path / "on.step1.npz").exists()


def _moved(model, run) -> set:
    """The parameters of ``model`` a sampling call ``run(callback)`` moved at any draw."""
    w0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    moved = set()

    def cb(model, **_):
        moved.update(k for k, v in model.named_parameters() if not torch.equal(v.detach(), w0[k]))

    run(cb)
    return moved


def test_masks_without_restrict_to_move_only_the_masked_parameters():
    import pypattern as pp
    from pypattern import truth

    mlp, data = truth.make_teacher_task((8, 16, 4), n=128, seed=0)
    loader = torch.utils.data.DataLoader(data, batch_size=32)
    mask = torch.zeros_like(mlp[0].weight, dtype=torch.bool)
    mask[:4] = True
    kw = dict(num_chains=1, num_draws=3, step_size=1e-3, localization=100.0, nbeta=10.0, quiet=True)
    # masks alone: only 0.weight moves, and only its masked rows
    last = {}

    def keep_last(model, **_):
        last["w"] = model[0].weight.detach().clone()

    moved = _moved(
        mlp,
        lambda cb: pp.estimate_llc(mlp, loader, masks={"0.weight": mask}, callbacks=[cb, keep_last], **kw),
    )
    assert moved == {"0.weight"}
    assert torch.equal(last["w"][~mask], mlp[0].weight.detach()[~mask])
    # with restrict_to, a listed parameter without a mask moves entirely
    moved = _moved(
        mlp,
        lambda cb: pp.estimate_llc(
            mlp, loader, restrict_to=["0.weight", "2.bias"], masks={"0.weight": mask}, callbacks=[cb], **kw
        ),
    )
    assert moved == {"0.weight", "2.bias"}
    # devinterp 1.x: optimize_over_per_model_param names what moves
    moved = _moved(
        mlp,
        lambda cb: pp.estimate_learning_coeff_with_summary(
            mlp,
            loader,
            callbacks=[cb],
            num_chains=1,
            num_draws=3,
            verbose=False,
            optimize_over_per_model_param={"0.weight": mask},
            optimizer_kwargs=dict(lr=1e-3, localization=100.0),
        ),
    )
    assert moved == {"0.weight"}
    with pytest.raises(ValueError, match="not parameters"):
        pp.estimate_llc(mlp, loader, masks={"nope": torch.ones(1)}, **kw)


def test_component_masks_as_masks_sample_that_component_alone():
    import pypattern as pp

    m = pp.Transformer(n_layers=2, d_model=16, n_heads=4, d_head=4, d_mlp=24, d_vocab=20, n_ctx=8)
    tokens = [torch.randint(0, 20, (4, 8), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    head = pp.component_masks(m, "blocks.1.attn.head.2")
    moved = _moved(
        m,
        lambda cb: pp.estimate_llc(
            m,
            tokens,
            masks=head,
            callbacks=[cb],
            num_chains=1,
            num_draws=3,
            step_size=1e-4,
            nbeta=10.0,
            quiet=True,
        ),
    )
    assert moved and moved <= set(head), moved


def test_a_ragged_last_batch_is_not_read_by_the_chains():
    import pypattern as pp
    from pypattern import truth
    from pypattern.sampling.data import ChainData, batches_per_epoch, ragged_last_batch

    torch.manual_seed(0)
    mlp, data = truth.make_teacher_task((8, 16, 4), n=512, seed=0)
    truth.train(mlp, data, steps=100, batch_size=64, lr=3e-3)
    ragged = torch.utils.data.DataLoader(data, batch_size=500, shuffle=True)
    assert ragged_last_batch(ragged) and batches_per_epoch(ragged) == 1
    even = torch.utils.data.DataLoader(data, batch_size=256, shuffle=True)
    assert not ragged_last_batch(even) and batches_per_epoch(even) == 2
    assert not ragged_last_batch(torch.utils.data.DataLoader(data, batch_size=500, drop_last=True))
    # the stream never yields the 12-sample batch, on the fast path and through the loader's own iterator
    for loader in (
        ragged,
        torch.utils.data.DataLoader(list(zip(*data.tensors)), batch_size=500, shuffle=True),
    ):
        stream = ChainData(loader, 7, {})
        assert all(pp.sampling.data.batch_size_of(stream.next()) == 500 for _ in range(6))
        # resuming mid-stream reads what the uninterrupted stream reads
        a, b = ChainData(loader, 3, {}), ChainData(loader, 3, {})
        for _ in range(5):
            a.next()
        b.skip(5)
        torch.testing.assert_close(a.next(), b.next())
    kw = dict(
        num_chains=4,
        num_draws=60,
        num_burnin_steps=60,
        step_size=1e-3,
        localization=100.0,
        nbeta=50.0,
        quiet=True,
    )
    r_ragged = pp.estimate_llc(mlp, ragged, **kw)
    r_even = pp.estimate_llc(mlp, even, **kw)
    # L_n(w*) over the whole epoch counts the ragged batch by its samples: the loss over every sample, any order
    x, y = data.tensors
    with torch.no_grad():
        full = float(torch.nn.functional.cross_entropy(mlp(x), y))
    for seed in (0, 1, 2):
        r = pp.estimate_llc(mlp, ragged, **{**kw, "num_draws": 2, "num_burnin_steps": 0}, seed=seed)
        assert r.init_loss == pytest.approx(full, rel=1e-6) and r.init_loss_se == 0.0
    # a 12-sample batch counted like a 500-sample one gave 2.6 times the LLC
    assert abs(r_ragged.llc_mean - r_even.llc_mean) < 4 * math.hypot(r_ragged.llc_se, r_even.llc_se)


def _later_batches_changed(kind: str):
    """The task's data with the labels of the last 16 samples flipped: chain 0's first batch is unchanged."""
    model, loader = _mlp_task()
    x, y = loader.dataset.tensors
    y2 = y.clone()
    y2[-16:] = 1 - y2[-16:]
    if kind == "tensor-dataset":
        make = lambda yy: torch.utils.data.DataLoader(  # noqa: E731
            torch.utils.data.TensorDataset(x, yy), batch_size=16, shuffle=False
        )
    elif kind == "list":
        make = lambda yy: [(x[i : i + 16], yy[i : i + 16]) for i in range(0, len(x), 16)]  # noqa: E731
    else:  # a DataLoader over a plain list of samples (read through the collate)
        make = lambda yy: torch.utils.data.DataLoader(  # noqa: E731
            list(zip(x, yy)), batch_size=16, shuffle=True
        )
    return model, make(y), make(y2)


@pytest.mark.parametrize("kind", ["tensor-dataset", "list", "dataloader"])
def test_checkpoint_refuses_data_that_differs_after_the_first_batch(tmp_path, kind):
    """The data fingerprint covers all of the data, not the first batch chain 0 reads."""
    from pypattern.io import FingerprintMismatch

    model, loader, other = _later_batches_changed(kind)
    path = tmp_path / "run.npz"
    kw = dict(num_chains=2, num_draws=3, num_burnin_steps=0, num_steps_bw_draws=1, checkpoint=path)
    first = _run(model, loader, **kw)
    again = _run(model, loader, **kw)  # the same data: the stored run
    np.testing.assert_array_equal(first.loss_trace, again.loss_trace)
    with pytest.raises(FingerprintMismatch, match="data = ") as e:
        _run(model, other, **kw)
    assert e.value.item == "data"


def test_checkpoint_that_cannot_be_a_file_is_refused_before_sampling(tmp_path):
    """A folder, a path ending in a separator or a path under a file is refused naming checkpoint, before any
    draw (no callback runs)."""
    model, loader = _mlp_task()
    (tmp_path / "afile").write_text("x")
    seen = []
    kw = dict(num_chains=1, num_draws=2, callbacks=[lambda *a: seen.append(a)])
    for bad, match in [
        (tmp_path, "is a folder"),
        (f"{tmp_path}/sub/", "is a folder"),
        (tmp_path / "afile" / "run.npz", "which is a file"),
    ]:
        with pytest.raises(ValueError, match=f"checkpoint=.*{match}"):
            _run(model, loader, checkpoint=bad, **kw)
    with pytest.raises(TypeError, match="checkpoint must be a file path"):
        _run(model, loader, checkpoint=3, **kw)
    assert not seen


def test_one_shuffled_batch_is_read_in_a_keyed_order():
    """A shuffling DataLoader with one batch gives the same draws in every call of one seed, whatever torch's
    global random state (its rows are permuted in a fixed order, so float32 sums do not change)."""
    model, loader = _mlp_task(n=16)
    one = torch.utils.data.DataLoader(loader.dataset, batch_size=16, shuffle=True)
    runs = []
    for g in (1, 2):
        torch.manual_seed(g)
        runs.append(_run(model, one, num_chains=2, num_draws=4))
    np.testing.assert_array_equal(runs[0].loss_trace, runs[1].loss_trace)
    assert runs[0].init_loss == runs[1].init_loss


def test_default_nbeta_reads_a_data_set_smaller_than_the_batch_size():
    """A DataLoader over fewer samples than its batch_size yields one batch of them all: the sampler's default
    nbeta counts those samples (pypattern.default_nbeta stays devinterp's, from batch_size)."""
    import math

    from pypattern.sampling.plan import default_nbeta

    ds = torch.utils.data.TensorDataset(torch.randn(5, 2))
    assert default_nbeta(torch.utils.data.DataLoader(ds, batch_size=8)) == pytest.approx(5 / math.log(5))
    assert default_nbeta(torch.utils.data.DataLoader(ds, batch_size=4)) == pytest.approx(4 / math.log(4))
    with pytest.raises(ValueError, match="batch_size \\* grad_accum_steps >= 2, got 1"):
        default_nbeta(
            torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(1, 2)), batch_size=8)
        )


def test_an_unshuffled_ragged_last_batch_is_left_out_of_the_reference_loss():
    """Without shuffling the ragged batch holds the same samples in every epoch and no chain reads them:
    L_n(w*) is the loss over the samples the chains read (with shuffling: over every sample)."""
    import pypattern as pp
    from pypattern import truth

    mlp, data = truth.make_teacher_task((8, 16, 4), n=512, seed=0)
    x, y = data.tensors
    kw = dict(num_chains=1, num_draws=2, num_burnin_steps=0, step_size=1e-4, localization=100.0, nbeta=50.0)
    with torch.no_grad():
        read = float(torch.nn.functional.cross_entropy(mlp(x[:500]), y[:500]))
        every = float(torch.nn.functional.cross_entropy(mlp(x), y))
    for loader in (
        torch.utils.data.DataLoader(data, batch_size=250, shuffle=False),
        torch.utils.data.DataLoader(list(zip(x, y)), batch_size=250, shuffle=False),
    ):
        r = pp.estimate_llc(mlp, loader, quiet=True, warn_nonstationary=False, **kw)
        assert r.init_loss == pytest.approx(read, rel=1e-6)
    shuffled = torch.utils.data.DataLoader(data, batch_size=250, shuffle=True)
    r = pp.estimate_llc(mlp, shuffled, quiet=True, warn_nonstationary=False, **kw)
    assert r.init_loss == pytest.approx(every, rel=1e-6)


def test_masks_other_than_zero_and_one_are_refused():
    model, loader = _mlp_task()
    with pytest.raises(ValueError, match=r"masks\['0.weight'\] has values other than 0 and 1 \(\[0.5"):
        _run(model, loader, masks={"0.weight": torch.full((8, 6), 0.5)}, num_draws=2)
    ok = _run(model, loader, masks={"0.weight": torch.ones(8, 6)}, num_chains=1, num_draws=2)
    assert np.isfinite(ok.loss_trace).all()


def test_numpy_scalars_are_sampler_hyperparameters():
    model, loader = _mlp_task()
    kw = dict(num_chains=1, num_draws=3)
    a = _run(model, loader, sampler="sgnht", optimizer_kwargs={"diffusion_factor": np.float32(0.25)}, **kw)
    b = _run(model, loader, sampler="sgnht", optimizer_kwargs={"diffusion_factor": 0.25}, **kw)
    np.testing.assert_array_equal(a.loss_trace, b.loss_trace)
    a = _run(model, loader, sampler="rmsprop_sgld", optimizer_kwargs={"alpha": np.float64(0.9)}, **kw)
    b = _run(model, loader, sampler="rmsprop_sgld", optimizer_kwargs={"alpha": 0.9}, **kw)
    np.testing.assert_array_equal(a.loss_trace, b.loss_trace)


class _Counting(nn.Module):
    """A layer whose forward updates a buffer it reads (a running mean of its input, as BatchNorm keeps)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 2)
        self.register_buffer("running", torch.zeros(6))

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                self.running.mul_(0.5).add_(0.5 * x.mean(0))
        return self.lin(x - self.running)


def test_sequential_chains_start_from_the_callers_buffers():
    """Each sequential chain starts from the buffers as the call found them: a chain's draws do not depend on
    which chains ran before it (chains= alone, or in another order)."""
    _, loader = _mlp_task()
    torch.manual_seed(0)
    model = _Counting().train()
    full = _run(model, loader, num_chains=3, num_draws=4, batched=False)
    alone = _run(model, loader, num_chains=3, num_draws=4, batched=False, chains=[2])
    np.testing.assert_array_equal(full.loss_trace[2], alone.loss_trace[2])
    assert torch.equal(model.running, torch.zeros(6))  # the caller's buffers are kept


def test_load_chain_state_refuses_a_state_of_other_parameters_before_copying():
    """A chain's saved sampler state (SGNHT's momenta and thermostat) of other parameter shapes is refused naming
    the entry, with nothing copied; the matching state restores the chain's own."""
    from pypattern.sampling.samplers import SGNHT

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = SGNHT(model.named_parameters(), step_size=1e-3, nbeta=10.0)
    x = torch.randn(8, 3)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    saved = opt.chain_state()
    bad = dict(saved)
    bad["momentum/weight"] = torch.zeros(2, 1, dtype=saved["momentum/weight"].dtype)  # broadcastable
    before = opt.chain_state()
    with pytest.raises(
        ValueError, match=r"state\['momentum/weight'\] is \(2, 1\) torch.float32; this sampler holds \(2, 3\)"
    ):
        opt.load_chain_state(bad)
    with pytest.raises(ValueError, match="no entry 'thermostat'"):
        opt.load_chain_state({k: v for k, v in saved.items() if k != "thermostat"})
    after = opt.chain_state()
    assert all(torch.equal(before[k], after[k]) for k in before)
    opt.load_chain_state({k: v + 1 for k, v in saved.items()})
    assert all(torch.equal(opt.chain_state()[k], saved[k] + 1) for k in saved)


def test_burn_in_defaults_to_the_draws_steps_at_a_calibrated_step():
    """num_burnin_steps=None (the default): a calibrated step burns in as many steps as the draws take (the share
    of burn-in its trials judged it with), a given step none (devinterp's default); a given count is kept."""
    import pypattern.sampling.runner as runner

    model, loader = _mlp_task()
    kw = dict(num_chains=2, num_draws=10, num_steps_bw_draws=3, quiet=True, warn_nonstationary=False)
    assert sample(model, loader, step_size=1e-3, **kw).config["num_burnin_steps"] == 0
    assert sample(model, loader, step_size=1e-3, num_burnin_steps=7, **kw).config["num_burnin_steps"] == 7
    assert runner.default_burnin(True, 10, 3) == 30 and runner.default_burnin(False, 10, 3) == 0
    assert runner.default_burnin(True, np.int64(10), 3) == 30  # numpy counts too
    assert runner.default_burnin(True, 1.5, 3) == 0  # left for the run's own check to name
    auto = sample(model, loader, step_size="auto", **kw)
    assert auto.config["auto_step"] is not None and auto.config["num_burnin_steps"] == 30
    # susceptibilities and bif calibrate first and give the run the step: the same rule, resolved there (without
    # localization or weight decay nothing bounds the flattest direction: the draws' steps)
    from pypattern.sampling.auto import AutoStepReport
    from pypattern.susceptibility import _resolve_burnin

    def report():
        return AutoStepReport(chosen=1e-3, settings={"gamma": 0.0, "relaxation_times": 3.0})

    for auto_step, given, want in ((report(), None, 30), (None, None, 0), (report(), 4, 4)):
        s = dict(num_draws=10, num_steps_bw_draws=3, num_burnin_steps=given)
        _resolve_burnin(s, auto_step)
        assert s["num_burnin_steps"] == want


def test_a_drifting_run_without_localization_names_it():
    """A run that is not stationary with localization=0 says that nothing holds the chains near w* (the likeliest
    cause of a drift); with a localization the warning does not."""
    from pypattern.sampling.diagnostics import NonStationaryWarning

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    model = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(4.0)  # far from the minimum: the chains descend, the loss trace drifts
    loader = [(x, y)]
    kw = dict(num_chains=4, num_draws=40, step_size=1e-4, nbeta=10.0, quiet=True, loss_fn=None)
    for loc, named in ((0.0, True), (1e-3, False)):
        with pytest.warns(NonStationaryWarning) as rec:
            sample(model, loader, localization=loc, **kw)
        text = " ".join(str(w.message) for w in rec if issubclass(w.category, NonStationaryWarning))
        assert ("With localization=0 nothing holds the chains near w*" in text) == named, text


class _PooledRegression(nn.Module):
    """A linear readout of the mean over positions: reads sequences of any length, runs under vmap."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, x):
        return self.lin(x).mean(1)


class _LengthsKeyedByEpoch:
    """Four batches an epoch, ``(x, y)`` with ``x`` of shape ``(2, L, 3)``: the first three of length 4, the last
    of a length drawn from torch's RNG (which each chain's stream keys per epoch), so that chains read batches of
    one shape for some steps and of different shapes at a later one."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(8, 9, 3, generator=g)
        self.y = torch.randn(8, 1, generator=g)

    def __len__(self):
        return 4

    def __iter__(self):
        L = 2 + int(
            torch.randint(0, 7, ())
        )  # drawn as the epoch starts, as a shuffling sampler draws its order
        for i in range(3):
            yield self.x[2 * i : 2 * i + 2, :4], self.y[2 * i : 2 * i + 2]
        yield self.x[6:, :L], self.y[6:]


@pytest.mark.parametrize("sampler", ["sgld", "sgnht", "rmsprop_sgld"])
def test_batches_of_different_shapes_run_chains_one_after_another_from_where_they_differ(sampler):
    """batched=None: the chains run batched until their batches of a step differ in shape, then one after another
    from that step (result.batched False), with the draws of a sequential run up to float rounding; batched=True
    is refused naming the loader and the shapes."""
    torch.manual_seed(0)
    model = _PooledRegression()
    loader = _LengthsKeyedByEpoch()
    order = []
    kw = dict(num_chains=2, num_draws=12, step_size=1e-3, nbeta=4.0, localization=10.0, quiet=True)
    kw.update(
        warn_nonstationary=False, sampler=sampler
    )  # the sampler's state is handed over with the weights
    auto = sample(
        model, loader, batched=None, callbacks=[lambda chain, draw: order.append((chain, draw))], **kw
    )
    seq = sample(model, loader, batched=False, **kw)
    assert auto.batched is False
    np.testing.assert_allclose(auto.loss_trace, seq.loss_trace, rtol=1e-5)
    # the two chains' streams first read batches of different lengths at step 7 (the last batch of their second
    # epoch): draws 0..6 were taken batched (the chains side by side), the rest one chain after another
    assert order[:14] == [(c, d) for d in range(7) for c in (0, 1)]
    assert order[14:] == [(0, d) for d in range(7, 12)] + [(1, d) for d in range(7, 12)]
    with pytest.raises(ValueError, match=r"batched=True but the loader's batches differ between chains") as e:
        sample(model, loader, batched=True, **kw)
    assert "at step 7 cannot be stacked along a chain axis: tensors of different shapes" in str(e.value)
    assert "a tuple of 2 element(s) (a torch.float32 tensor of shape (2," in str(e.value)


def test_padded_batches_of_their_own_lengths_run_with_the_default_batched():
    """A collate that pads each batch to its own longest sequence, shuffled: the chains' batches differ in shape
    at the first step; estimate_llc and susceptibilities run the chains one after another."""
    import pypattern as pp

    torch.manual_seed(0)
    seqs = [torch.randn(int(torch.randint(2, 7, ())), 3) for _ in range(16)]

    def collate(batch):
        L = max(len(s) for s in batch)
        x = torch.zeros(len(batch), L, 3)
        for i, s in enumerate(batch):
            x[i, : len(s)] = s
        return x, x.sum((1, 2)).unsqueeze(1)

    loader = DataLoader(seqs, batch_size=4, shuffle=True, collate_fn=collate)
    model = _PooledRegression()
    kw = dict(num_chains=8, num_draws=4, step_size=1e-4, nbeta=4.0, localization=100.0, quiet=True)
    kw["warn_nonstationary"] = False
    r = pp.estimate_llc(model, loader, **kw)
    ref = pp.estimate_llc(model, loader, batched=False, **kw)
    assert r.sample.batched is False
    np.testing.assert_allclose(r.loss_trace, ref.loss_trace, rtol=1e-6)
    chi = pp.susceptibilities(model, loader, collate(seqs[:4]), [["lin.weight"]], **kw)
    assert np.isfinite(np.asarray(chi.chi)).all()
    with pytest.raises(ValueError, match=r"batched=True but the loader's batches differ.*at step 0"):
        pp.estimate_llc(model, loader, batched=True, **kw)


def test_batch_encoding_batches_run_batched_and_keep_their_kind():
    """transformers.BatchEncoding batches (a UserDict) are stacked and moved as dicts are, and the loss function
    gets BatchEncodings under vmap too: the same draws as dict batches."""
    from transformers import BatchEncoding

    from pypattern.sampling.data import to_device

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 3, generator=g), torch.randn(12, 1, generator=g)
    dicts = [{"x": x[i : i + 4], "y": y[i : i + 4]} for i in range(0, 12, 4)]
    encs = [BatchEncoding(d) for d in dicts]
    kinds = set()

    def loss_fn(model, batch):
        kinds.add(type(batch).__name__)
        return ((model(batch["x"]) - batch["y"]) ** 2).mean()

    model = nn.Linear(3, 1)
    kw = dict(
        num_chains=3, num_draws=5, step_size=1e-3, nbeta=4.0, localization=10.0, quiet=True, loss_fn=loss_fn
    )
    kw["warn_nonstationary"] = False
    a = sample(model, encs, batched=True, **kw)
    assert a.batched and kinds == {"BatchEncoding"}
    b = sample(model, dicts, batched=True, **kw)
    np.testing.assert_array_equal(a.loss_trace, b.loss_trace)
    moved = to_device(encs[0], torch.device("meta"))
    assert (
        isinstance(moved, BatchEncoding)
        and moved["x"].device.type == "meta"
        and encs[0]["x"].device.type == "cpu"
    )


def test_a_glob_in_restrict_to_is_not_read_as_a_regex(tmp_path):
    """restrict_to="1.*" is a glob: '.' is a plain character, so parameters 10.* and 11.* do not move; a compiled
    regex selects by regex."""
    import re

    from pypattern.sampling.optim import matches

    assert matches("1.weight", ["1.*"]) and not matches("10.weight", ["1.*"])
    assert matches("10.weight", [re.compile(r"1\d?\..*")]) and not matches(
        "2.weight", [re.compile(r"1\d?\..*")]
    )
    assert not matches("1.weight", ["1+.weight"])  # a string without a backslash is a glob, never a regex
    # a string holding a backslash (re.escape's output), which as a glob matches nothing, is a regex
    assert matches("1.weight", [r"1\.weight"]) and not matches("1_weight", [r"1\.weight"])
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(12)])
    x = torch.randn(8, 2)
    data = [(x, x.flip(1))]
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    moved = set()

    def cb(model):
        moved.update(n.split(".")[0] for n, p in model.named_parameters() if not torch.equal(p, w0[n]))

    kw = dict(
        num_chains=1, num_draws=2, step_size=1e-3, nbeta=2.0, localization=10.0, quiet=True, callbacks=[cb]
    )
    kw["warn_nonstationary"] = False
    sample(model, data, restrict_to="1.*", batched=False, **kw)
    assert moved == {"1"}
    moved.clear()
    r = sample(model, data, restrict_to=re.compile(r"1\d?\..*"), batched=False, **kw)
    assert moved == {"1", "10", "11"}
    assert r.config["restrict_to"] == [{"regex": r"1\d?\..*"}]
    # the result saves and loads; SGNHT and RMSprop-SGLD take a compiled regex too
    r.save(tmp_path / "r.npz")
    assert type(r).load(tmp_path / "r.npz").config["restrict_to"] == [{"regex": r"1\d?\..*"}]
    for sampler in ("sgnht", "rmsprop_sgld"):
        moved.clear()
        sample(model, data, restrict_to=re.compile(r"1\d?\..*"), sampler=sampler, batched=False, **kw)
        assert moved == {"1", "10", "11"}
    from pypattern.sampling.samplers import SGNHT, RMSpropSGLD

    for cls in (SGNHT, RMSpropSGLD):
        opt = cls(model.named_parameters(), step_size=1e-3, nbeta=2.0, restrict_to=re.compile(r"1\d?\..*"))
        assert sorted(n.split(".")[0] for ns in opt.param_names for n in ns) == [
            "1",
            "1",
            "10",
            "10",
            "11",
            "11",
        ]


def test_reference_loss_of_a_shuffling_loader_with_drop_last_covers_every_row():
    """10 rows in batches of 4, shuffled, drop_last: each epoch drops 2 rows, other ones each epoch, and the
    chains read all 10 over their epochs, so L_n(w*) is the mean squared error over all 10 (by hand); without
    shuffling the same 2 rows are dropped every epoch and L_n(w*) is the mean over the first 8."""
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    x, y = torch.randn(10, 2), 3 * torch.randn(10, 1)
    with torch.no_grad():
        per_row = ((model(x) - y) ** 2).squeeze(1).double()
    every, first8 = float(per_row.mean()), float(per_row[:8].mean())
    assert abs(every - first8) > 0.5  # the two are told apart
    kw = dict(num_chains=2, num_draws=3, step_size=1e-4, nbeta=4.0, localization=10.0, quiet=True)
    kw["warn_nonstationary"] = False
    pairs = list(zip(x, y))  # a dataset read through the loader's collate
    for data in (TensorDataset(x, y), pairs):
        shuffled = DataLoader(data, batch_size=4, shuffle=True, drop_last=True)
        r = sample(model, shuffled, **kw)
        assert r.init_loss == pytest.approx(every, rel=1e-6)
        assert r.init_loss_se == 0.0 and len(r.init_losses) == 2
        in_order = DataLoader(data, batch_size=4, shuffle=False, drop_last=True)
        assert sample(model, in_order, **kw).init_loss == pytest.approx(first8, rel=1e-6)
    # a shuffled subset: the rows it can yield
    subset = DataLoader(
        TensorDataset(x, y), batch_size=4, sampler=torch.utils.data.SubsetRandomSampler([0, 2, 3, 5, 6, 7, 9]),
        drop_last=True,
    )  # fmt: skip
    want = float(per_row[[0, 2, 3, 5, 6, 7, 9]].mean())
    assert sample(model, subset, **kw).init_loss == pytest.approx(want, rel=1e-6)


def test_a_checkpoint_records_which_modules_are_in_training_mode(tmp_path):
    """A BatchNorm model's loss differs between train() and eval() mode: a run interrupted in train() mode resumes
    in train() mode to the uninterrupted run's draws and is refused in eval() mode (FingerprintMismatch naming
    "training"); a dropout model, which the sampler runs in eval() mode, resumes in either mode."""
    from pypattern.io import FingerprintMismatch
    from pypattern.sampling.checkpoint import training_modes

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(32, 3), torch.randint(0, 2, (32,))
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    kw = dict(
        num_chains=2, num_draws=6, step_size=1e-3, nbeta=4.0, localization=10.0, quiet=True, batched=False
    )
    kw["warn_nonstationary"] = False

    class Stop(Exception):
        pass

    def stop(chain, draw):
        if chain == 1 and draw == 3:
            raise Stop

    def interrupted(path):
        with pytest.raises(Stop):
            sample(model, loader, checkpoint=path, callbacks=[stop], **kw)

    model.train()
    assert training_modes(model) == ["1"]
    whole = sample(model, loader, **kw)
    interrupted(tmp_path / "a.npz")
    resumed = sample(model, loader, checkpoint=tmp_path / "a.npz", **kw)
    np.testing.assert_array_equal(resumed.loss_trace, whole.loss_trace)
    interrupted(tmp_path / "b.npz")
    model.eval()
    assert training_modes(model) is None
    with pytest.raises(FingerprintMismatch, match=r"training = \['1'\] there") as e:
        sample(model, loader, checkpoint=tmp_path / "b.npz", **kw)
    assert e.value.item == "training"
    model[1].train()  # the BatchNorm in train() mode, the rest in eval(): the same loss, the same run
    assert training_modes(model) == ["1"]
    again = sample(model, loader, checkpoint=tmp_path / "b.npz", **kw)
    np.testing.assert_array_equal(again.loss_trace, whole.loss_trace)
    # a model whose forward reads no mode resumes in either mode
    plain = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).train()
    assert training_modes(plain) is None
    with pytest.raises(Stop):
        sample(plain, loader, checkpoint=tmp_path / "p.npz", callbacks=[stop], **kw)
    plain.eval()
    np.testing.assert_array_equal(
        sample(plain, loader, checkpoint=tmp_path / "p.npz", **kw).loss_trace,
        sample(plain, loader, **kw).loss_trace,
    )
    # dropout: the sampler runs the model in eval() mode whatever the caller's mode, and fingerprints it so
    drop = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Tanh(), nn.Linear(4, 2)).train()
    assert training_modes(drop) is None
    with pytest.warns(UserWarning, match="training mode and has dropout"), pytest.raises(Stop):
        sample(drop, loader, checkpoint=tmp_path / "c.npz", callbacks=[stop], **kw)
    drop.eval()
    again = sample(drop, loader, checkpoint=tmp_path / "c.npz", **kw)
    np.testing.assert_array_equal(again.loss_trace, sample(drop, loader, **kw).loss_trace)


def test_the_sampler_warnings_point_at_the_callers_line():
    """NonStationaryWarning (through sample or estimate_llc) and the dropout warning name the line that called
    pypattern, whichever entry point it called."""
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    data = [torch.zeros(4, 2)]

    def drifting(model, batch):  # no minimum: the chains drift, the trace is not stationary
        return model.weight.sum() + 0 * batch.sum()

    kw = dict(loss_fn=drifting, num_chains=2, num_draws=40, step_size=1e-2, nbeta=50.0, quiet=True)
    for run in (sample, estimate_llc):
        with pytest.warns(NonStationaryWarning) as rec:
            run(model, data, **kw)
        assert {w.filename for w in rec if w.category is NonStationaryWarning} == {__file__}
    drop = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.Linear(2, 1)).train()
    x = torch.randn(8, 2)
    with pytest.warns(UserWarning, match="training mode and has dropout") as rec:
        estimate_llc(drop, [(x, x[:, :1])], num_chains=1, num_draws=2, step_size=1e-4, nbeta=2.0, quiet=True)
    assert [w.filename for w in rec if "dropout" in str(w.message)] == [__file__]
