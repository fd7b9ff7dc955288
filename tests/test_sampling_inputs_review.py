"""Sampling, susceptibility and BIF inputs: runaway chains in short runs and in burn-in, non-finite losses at the
initial weights, and arguments refused by name instead of failing inside torch or returning a wrong number."""

import numpy as np
import pytest
import torch
from torch import nn

import pypattern as pp
from pypattern.sampling import SamplingDivergedError

KW = dict(num_chains=2, num_draws=5, step_size=1e-4, quiet=True)


def _task(seed=0):
    torch.manual_seed(seed)
    X = torch.randn(256, 4)
    y = X @ torch.randn(4, 1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=32, shuffle=True)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    return model, loader, X, y


@pytest.mark.parametrize("batched", [False, True])
def test_short_run_that_blows_up_is_an_error(batched):
    """Five draws whose loss grows a thousandfold per step never stay above the runaway limit at five
    consecutive steps (the first is at w*): the mean of the chain's draws, far above the limit, stops it."""
    model, loader, _, _ = _task()
    with pytest.raises(SamplingDivergedError, match=r"ran away: its mean over the chain's 5 draws") as e:
        pp.estimate_llc(
            model,
            loader,
            num_chains=4,
            num_draws=5,
            step_size=1.0,
            localization=10.0,
            quiet=True,
            batched=batched,
        )
    assert e.value.suggested_step_size == pytest.approx(0.1)


@pytest.mark.parametrize("batched", [False, True])
def test_runaway_in_burn_in_is_an_error(batched):
    """Burn-in steps count towards the runaway check: three burn-in steps and four draws that run away."""
    model, loader, _, _ = _task()
    with pytest.raises(SamplingDivergedError, match=r"ran away") as e:
        pp.estimate_llc(
            model,
            loader,
            num_chains=4,
            num_burnin_steps=3,
            num_draws=4,
            step_size=0.3,
            localization=10.0,
            quiet=True,
            batched=batched,
        )
    assert e.value.step >= 4


def test_runaway_during_burn_in_is_caught_before_any_draw():
    """A run whose burn-in alone is long enough: the chain stops in burn-in, at the fifth step above the limit."""
    model, loader, _, _ = _task()
    with pytest.raises(SamplingDivergedError, match=r"during burn-in .*ran away.* at the last 5 steps") as e:
        pp.estimate_llc(
            model,
            loader,
            num_chains=2,
            num_burnin_steps=40,
            num_draws=3,
            step_size=0.3,
            localization=10.0,
            quiet=True,
        )
    assert e.value.draw == -1 and e.value.step < 40


def test_short_healthy_runs_are_not_flagged():
    model, loader, _, _ = _task()
    for draws in (1, 2, 5):
        res = pp.estimate_llc(model, loader, num_chains=2, num_draws=draws, step_size=1e-4, quiet=True)
        assert np.isfinite(res.llc_mean) and abs(res.llc_mean) < 50


def test_nan_in_training_data_blames_the_data_not_the_step():
    from pypattern.sampling import NonFiniteLossError

    model, _, X, y = _task()
    Xn = X.clone()
    Xn[3, 0] = float("nan")
    # L_n(w*) over a few batches does not meet the bad row; a chain does, and the loss at w* on its batch is NaN
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(Xn, y), batch_size=32, shuffle=True)
    for batched in (False, True):
        with pytest.raises(
            NonFiniteLossError, match=r"at the initial weights w\* on the same batch.*before any step"
        ):
            pp.estimate_llc(model, loader, num_init_loss_batches=1, seed=0, batched=batched, **KW)
    with pytest.raises(
        NonFiniteLossError,
        match=r"loader: the loss at the initial weights w\* is not finite.*whether its own logits are finite",
    ) as e:
        pp.estimate_llc(model, [(Xn[:32], y[:32])], **KW)
    assert isinstance(e.value, ValueError) and e.value.suggested_step_size is None
    # a step size that is the cause still gets the divergence message and a smaller step
    with pytest.raises(SamplingDivergedError, match="smaller step_size") as e:
        pp.estimate_llc(
            model, [(X[:32], y[:32])], num_chains=2, num_draws=50, step_size=1e6, nbeta=1e6, quiet=True
        )
    assert not isinstance(e.value, NonFiniteLossError)


def test_nan_in_probe_is_named_at_the_initial_weights():
    model, loader, X, y = _task()
    Xn = X[:8].clone()
    Xn[5, 1] = float("nan")
    with pytest.raises(
        ValueError, match=r"probe: .*non-finite loss at the initial weights w\*.*samples \[5\]"
    ):
        pp.susceptibilities(model, loader, (Xn, y[:8]), ["0"], **KW)
    with pytest.raises(
        ValueError, match=r"probe: .*non-finite loss at the initial weights w\*.*samples \[5\]"
    ):
        pp.bif(model, loader, (Xn, y[:8]), **KW)


def test_empty_probe_is_refused_by_name():
    model, loader, X, y = _task()
    with pytest.raises(ValueError, match=r"probe has no samples .*shape \(0, 4\)"):
        pp.susceptibilities(model, loader, (X[:0], y[:0]), ["0"], **KW)
    with pytest.raises(ValueError, match=r"probe has no samples"):
        pp.bif(model, loader, (X[:0], y[:0]), **KW)


def test_model_and_loader_that_are_not_are_refused_by_name():
    model, loader, X, y = _task()
    for bad in (None, lambda x: x):
        with pytest.raises(TypeError, match=r"model must be a torch.nn.Module"):
            pp.estimate_llc(bad, loader, **KW)
        with pytest.raises(TypeError, match=r"model must be a torch.nn.Module"):
            pp.susceptibilities(bad, loader, (X[:8], y[:8]), ["0"], **KW)
    for bad in (None, 5):
        with pytest.raises(
            TypeError, match=rf"loader must be an iterable of batches .*got {type(bad).__name__}"
        ):
            pp.estimate_llc(model, bad, **KW)
        with pytest.raises(TypeError, match=r"loader must be an iterable of batches"):
            pp.bif(model, bad, (X[:8], y[:8]), **KW)
    meta = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).to("meta")
    with pytest.raises(ValueError, match=r"model has parameters on the meta device.*'0.weight'"):
        pp.estimate_llc(meta, loader, **KW)


def test_refined_llc_components_and_data_are_named():
    model, loader, X, y = _task()
    with pytest.raises(TypeError, match=r"components=3 is not valid"):
        pp.refined_llc(model, loader, components=3, **KW)
    with pytest.raises(ValueError, match=r"^data yielded no batch"):
        pp.refined_llc(model, loader, components=["0"], data=[], **KW)
    with pytest.raises(TypeError, match=r"^data must be an iterable of batches"):
        pp.refined_llc(model, loader, components=["0"], data=5, **KW)


def test_vector_observable_is_refused():
    model, loader, X, y = _task()
    with pytest.raises(
        ValueError, match=r"observable returned shape \(4,\) at w\*; it must return one number"
    ):
        pp.susceptibilities(
            model, loader, (X[:8], y[:8]), ["0"], observable=lambda m: m[0].weight.sum(0), **KW
        )


def test_dtype_mismatch_names_both_dtypes():
    model, loader, X, y = _task()
    with pytest.raises(
        TypeError, match=r"loader: the batch holds torch.float32 .* parameters are torch.float64"
    ):
        pp.estimate_llc(model.double(), loader, **KW)
    model.float()
    with pytest.raises(
        TypeError, match=r"probe: the batch holds torch.float64 .* parameters are torch.float32"
    ):
        pp.susceptibilities(model, loader, (X[:8].double(), y[:8].double()), ["0"], **KW)


def test_sequence_longer_than_learned_positions_is_refused():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_positions=32, n_embd=16, n_layer=1, n_head=2, vocab_size=50, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(cfg).eval()
    tokens = torch.randint(0, 50, (2, 40))
    with pytest.raises(
        ValueError, match=r"loader: sequences of length 40, but GPT2LMHeadModel has 32 learned"
    ):
        pp.estimate_llc(model, [tokens], **KW)
    with pytest.raises(ValueError, match=r"probe: sequences of length 40"):
        pp.bif(model, [tokens[:, :16]], tokens, **KW)
    positions = torch.arange(16).expand(2, 16) + 20  # position ids beyond the table
    with pytest.raises(ValueError, match=r"loader: position_ids reach 36"):
        pp.estimate_llc(model, [{"input_ids": tokens[:, :16], "position_ids": positions}], **KW)


def test_batches_of_more_than_two_elements_are_refused_with_the_default_loss():
    model, _, X, y = _task()
    w = torch.ones(32)
    with pytest.raises(ValueError, match=r"loader: the default loss reads \(inputs, targets\).*loss_fn"):
        pp.estimate_llc(model, [(X[:32], y[:32], w)], **KW)

    def weighted(m, batch):
        x, t, wt = batch
        return (wt * (m(x).squeeze(-1) - t.squeeze(-1)) ** 2).mean()

    res = pp.estimate_llc(model, [(X[:32], y[:32], w)], loss_fn=weighted, warn_nonstationary=False, **KW)
    assert np.isfinite(res.llc_mean)


def test_class_targets_for_one_output_are_refused():
    model, _, X, y = _task()
    with pytest.raises(ValueError, match=r"loader: .*integers .*one class.*identically 0.*float targets"):
        pp.estimate_llc(model, [(X[:32], torch.zeros(32, dtype=torch.long))], **KW)
    with pytest.raises(ValueError, match=r"probe: .*one class"):
        pp.bif(model, [(X[:32], y[:32])], (X[:8], torch.zeros(8, dtype=torch.long)), **KW)


@pytest.mark.parametrize("chains", [1, 2])
def test_one_draw_is_refused_by_covariance_estimators(chains):
    model, loader, X, y = _task()
    kw = dict(KW, num_draws=1, num_chains=chains)
    with pytest.raises(ValueError, match=r"num_draws=1 is too few.*at least 2 draws"):
        pp.susceptibilities(model, loader, (X[:8], y[:8]), ["0"], **kw)
    with pytest.raises(ValueError, match=r"num_draws=1 is too few"):
        pp.bif(model, loader, (X[:8], y[:8]), **kw)


def test_per_token_must_be_a_bool():
    model, loader, X, y = _task()
    with pytest.raises(TypeError, match=r"per_token='yes' is not valid; give True or False"):
        pp.susceptibilities(model, loader, (X[:8], y[:8]), ["0"], per_token="yes", **KW)
    with pytest.raises(TypeError, match=r"per_token=1 is not valid"):
        pp.bif(model, loader, (X[:8], y[:8]), per_token=1, **KW)


class _FunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 1)

    def forward(self, x):
        return self.lin(nn.functional.dropout(x, 0.5, training=self.training))


def _regression_loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    y = x @ torch.randn(4, 1, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def test_a_forward_drawing_random_numbers_the_seed_does_not_key_is_named_in_a_warning():
    """Functional dropout in training mode is not a module the sampler can switch off: the loss at w* computed
    twice differs, and the run says that the same seed will not repeat its draws; in eval mode nothing is said."""
    import warnings

    kw = dict(num_chains=1, num_draws=3, step_size=1e-4, nbeta=10.0, localization=10.0, quiet=True, seed=1)
    kw["warn_nonstationary"] = False
    model = _FunctionalDropout().train()
    with pytest.warns(
        UserWarning, match=r"draws random numbers .*functional\.dropout.*same seed will not repeat"
    ):
        pp.estimate_llc(model, _regression_loader(), **kw)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = pp.estimate_llc(model, _regression_loader(), **kw)
        b = pp.estimate_llc(model, _regression_loader(), **kw)
    np.testing.assert_array_equal(a.loss_trace, b.loss_trace)
    # a random loss function of a model in training mode is caught the same way (a model in eval mode is not
    # probed: its forward's random ops follow the training flag)
    lin = nn.Linear(4, 1).train()
    with pytest.warns(UserWarning, match=r"draws random numbers"):
        pp.estimate_llc(
            lin,
            _regression_loader(),
            loss_fn=lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]) * (1 + 0.01 * torch.rand(())),
            **kw,
        )


def test_restrict_to_lists_masks_and_optimizer_seeds_are_checked_by_name():
    """A mistyped pattern among several would leave its parameters at w* while the config records it; an empty list
    would sample every parameter; masks given as a list would fail inside dict(); a float seed would be
    truncated. Each refused naming the argument, in pypattern.sample and in the SGLD optimizer."""
    from pypattern.sampling.optim import SGLD

    model, loader, _, _ = _task()
    for bad, error, match in [
        (
            dict(restrict_to=["0.weight", "2.wieght"]),
            ValueError,
            r"restrict_to: \['2\.wieght'\] matches no parameter",
        ),
        (dict(restrict_to=[]), ValueError, "restrict_to is empty: give None to sample every parameter"),
        (dict(masks=[torch.ones(8, 4)]), TypeError, "masks must be a dict of parameter name"),
    ]:
        with pytest.raises(error, match=match):
            pp.sample(model, loader, **bad, **KW)
    named = list(model.named_parameters())
    with pytest.raises(ValueError, match=r"\['2\.wieght'\] match"):
        SGLD(named, lr=1e-3, restrict_to=["0.weight", "2.wieght"])
    with pytest.raises(TypeError, match="seed must be an int, got float"):
        SGLD(named, lr=1e-3, seed=1.9)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64\)"):
        SGLD(named, lr=1e-3, seed=-1)
    res = pp.sample(model, loader, restrict_to=["0.weight", "2.weight"], **KW)
    assert res.config["restrict_to"] == ["0.weight", "2.weight"]


def test_estimate_llc_with_runs_and_with_a_subset_of_chains():
    """runs= gives one LLCResult per run, each that of the run's samples; chains= a subset gives the estimate
    and diagnostics of the chains that ran (not NaN), the others' per-chain entries NaN."""
    model, loader, _, _ = _task()
    kw = dict(num_chains=2, num_draws=6, step_size=1e-4, localization=100.0, quiet=True, seed=3)
    with np.errstate(all="ignore"):
        both = pp.estimate_llc(model, loader, runs=[(None, None), ("2.weight", None)], **kw)
        assert isinstance(both, list) and len(both) == 2
        samples = pp.sample(model, loader, runs=[(None, None), ("2.weight", None)], **kw)
        for got, s in zip(both, samples):
            want = s.config["nbeta"] * (s.loss_trace.mean() - s.init_loss)
            assert got.llc_mean == pytest.approx(want, rel=1e-9)
        part = pp.estimate_llc(model, loader, chains=[0], **kw)
    full = pp.estimate_llc(model, loader, **kw)
    assert np.isnan(part.llc_per_chain[1]) and part.llc_per_chain[0] == pytest.approx(full.llc_per_chain[0])
    assert part.llc_mean == pytest.approx(full.llc_per_chain[0]) and np.isfinite(part.r_hat)


def test_restrict_to_patterns_naming_frozen_parameters_stay_valid():
    """A pattern that names only frozen parameters is no typo: they stay at w* as every frozen parameter does (the
    same list the SGLD optimizer accepts); a module prefix whose parameters are all frozen likewise."""
    model, loader, _, _ = _task()
    for n, p in model.named_parameters():
        p.requires_grad_(n == "2.weight")
    for restrict in (["2.weight", "2.bias"], ["0", "2"]):
        res = pp.sample(model, loader, restrict_to=restrict, **KW)
        assert res.config["restrict_to"] == restrict
    with pytest.raises(ValueError, match=r"\['2\.wieght'\] matches no parameter"):
        pp.sample(model, loader, restrict_to=["2.weight", "2.wieght"], **KW)


@pytest.mark.parametrize("batched", [True, False])
def test_divergence_in_one_of_several_runs_names_the_run_and_its_chain(batched):
    """Chains are numbered over the runs of a call (chain g is chain g % num_chains of run g // num_chains): a
    divergence names the run and the chain within it, and what the run moves (a one-chain call over several
    components said 'chain 2 diverged')."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, generator=g)
    data = [(x, x.sum(1, keepdim=True))]
    with pytest.raises(pp.SamplingDivergedError) as e:
        pp.sample(
            model, data, runs=[(["0.bias"], None), (["2.weight"], None)], num_chains=1, num_draws=4, num_burnin_steps=200,
            step_size=50.0, nbeta=100.0, quiet=True, batched=batched,
        )  # fmt: skip
    run = e.value.chain
    assert run in (0, 1)
    moved = ["'0.bias'", "'2.weight'"][run]
    assert f"chain {run} (chain 0 of run {run} of 2, which moves {moved})" in str(e.value)


def test_calibration_names_bad_step_sizes_and_warns_without_a_plateau():
    model = torch.nn.Linear(3, 1)
    with torch.no_grad():  # at the minimum of the regression below
        model.weight.fill_(1.0)
        model.bias.zero_()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, generator=g)
    data = [(x, x.sum(1, keepdim=True) + 0.1 * torch.randn(32, 1, generator=g))]
    kw = dict(num_chains=2, num_draws=50, nbeta=10.0, localization=10.0)
    for bad in (("a",), [1e-3, None], [float("inf")], [0.0]):
        with pytest.raises(ValueError, match="step_sizes must be"):
            pp.calibrate_step_size(model, data, step_sizes=bad, **kw)
    # plateau_tol=0: no two healthy steps agree, so the smallest healthy one is recommended, with a warning
    with pytest.warns(UserWarning, match="no healthy step size agrees.*biased low"):
        cal = pp.calibrate_step_size(model, data, step_sizes=[1e-5, 1e-4], plateau_tol=0.0, **kw)
    assert cal.healthy.all() and cal.recommended == 1e-5
    with pytest.warns(UserWarning, match="only one step size is healthy"):
        cal = pp.calibrate_step_size(model, data, step_sizes=[1e-5], **kw)
    assert cal.recommended == 1e-5


def test_the_meta_device_is_refused_naming_device():
    model, loader, _, _ = _task()
    probe = next(iter(loader))
    kw = dict(KW, localization=10.0, device="meta")
    for run in (
        lambda: pp.estimate_llc(model, loader, **kw),
        lambda: pp.susceptibilities(model, loader, probe, [["0.weight"]], **kw),
        lambda: pp.bif(model, loader, probe, **kw),
    ):
        with pytest.raises(ValueError, match=r"device='meta': the meta device holds shapes without values"):
            run()


def _line_task():
    torch.manual_seed(0)
    x = torch.randn(16, 2)
    return nn.Linear(2, 1), [(x[:8], x[:8].sum(1, keepdim=True)), (x[8:], x[8:].sum(1, keepdim=True))]


def test_a_zero_dim_tensor_hyperparameter_is_its_number():
    model, data = _line_task()
    kw = dict(num_chains=2, num_draws=4, localization=10.0, quiet=True, warn_nonstationary=False)
    a = pp.sample(
        model, data, step_size=torch.tensor(1e-3, dtype=torch.float64), nbeta=torch.tensor(2.0), **kw
    )
    b = pp.sample(model, data, step_size=1e-3, nbeta=2.0, **kw)
    assert a.config["step_size"] == 1e-3 and a.config["nbeta"] == 2.0
    np.testing.assert_array_equal(a.loss_trace, b.loss_trace)
    with pytest.raises(
        ValueError, match=r"step_size \(lr\) must be a finite number > 0, got tensor\(\[0.0010"
    ):
        pp.sample(model, data, step_size=torch.tensor([1e-3]), **kw)
    with pytest.raises(ValueError, match=r"nbeta must be a finite number > 0, got -2.0"):
        pp.sample(model, data, step_size=1e-3, nbeta=torch.tensor(-2.0), **kw)


def test_per_chain_seeds_as_an_integer_array_and_repeated_chains():
    model, data = _line_task()
    kw = dict(num_chains=2, num_draws=4, step_size=1e-3, nbeta=2.0, quiet=True, warn_nonstationary=False)
    a = pp.sample(model, data, seed=np.array([3, 5]), **kw)
    b = pp.sample(model, data, seed=[3, 5], **kw)
    np.testing.assert_array_equal(a.loss_trace, b.loss_trace)
    assert a.config["seed"] == [3, 5]
    with pytest.raises(ValueError, match=r"seed has 3 entries but num_chains=2"):
        pp.sample(model, data, seed=np.array([3, 5, 7]), **kw)
    with pytest.raises(
        ValueError, match=r"or a list \(or 1-D integer array\) of one per chain, got array\(\[0.5"
    ):
        pp.sample(model, data, seed=np.array([0.5, 1.5]), **kw)
    with pytest.raises(
        ValueError, match=r"chains has repeated indices \[0\]: give each chain once, got \[0, 0\]"
    ):
        pp.sample(model, data, chains=[0, 0], **kw)


@pytest.mark.parametrize("batched", [False, True])
def test_a_loss_module_or_a_complex_loss_is_refused_naming_loss_fn(batched):
    model, data = _line_task()
    kw = dict(num_chains=2, num_draws=3, step_size=1e-3, nbeta=2.0, quiet=True, batched=batched)
    with pytest.raises(
        TypeError, match=r"loss_fn=MSELoss\(\) is a torch loss module, called as loss_fn\(outputs"
    ):
        pp.sample(model, data, loss_fn=nn.MSELoss(), **kw)

    def complex_loss(model, batch):
        return ((model(batch[0]) - batch[1]) ** 2).mean().to(torch.complex64)

    with pytest.raises(
        ValueError, match=r"loss_fn returned a complex loss \(dtype torch.complex64\); it must be a real"
    ):
        pp.sample(model, data, loss_fn=complex_loss, **kw)


@pytest.mark.parametrize("batched", [False, True])
def test_an_observable_that_turns_nan_mid_chain_warns_once(batched):
    model, data = _line_task()

    w0 = model.weight.detach().clone()

    def obs(model, batch):  # 1 at w* (each chain's first draw), NaN once the weights have moved
        moved = (model.weight - w0).abs().sum()
        return torch.where(moved > 0, torch.nan, 1.0)

    kw = dict(num_chains=2, num_draws=4, step_size=1e-3, nbeta=2.0, quiet=True, batched=batched)
    with pytest.warns(
        RuntimeWarning, match=r"observable 'o' returned a non-finite value \(NaN or Inf\) at draw"
    ) as rec:
        r = pp.sample(model, data, observables={"o": obs}, warn_nonstationary=False, **kw)
    assert sum("observable 'o'" in str(w.message) for w in rec) == 1
    assert rec[0].filename == __file__
    t = r.observables["o"]
    assert np.isnan(t).sum() == t.size - 2 and (t[np.isfinite(t)] == 1.0).all()
