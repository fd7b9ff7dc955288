"""The local learning coefficient estimator, and devinterp 1.x's function names.

``llc = nbeta * (E_w[L_n(w)] - L_n(w*))`` with the expectation over SGLD draws from the localized tempered
posterior ``p(w) ~ exp(-nbeta L_n(w) - localization/2 |w - w*|^2)``; per chain, then mean and standard
deviation over chains.
"""

from __future__ import annotations

import inspect
import math
import numbers
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .._checks import device_arg
from .auto import UNRELAXED_NOTE
from .diagnostics import NonStationaryWarning, _named, ess, r_hat, user_stacklevel
from .optim import SGLD
from .plan import init_loss_value, refuse_unknown_keywords, without_diagnostic_switches
from .results import LLCResult, SampleResult
from .runner import by_default_rule, calibration_of, loss_argument, run_name, sample
from .samplers import sampler_name
from .vocabulary import DEVINTERP_NAMES, HYPERPARAMETERS, translate

__all__ = [
    "default_nbeta",
    "estimate_learning_coeff",
    "estimate_learning_coeff_with_summary",
    "estimate_llc",
    "llc_from_sample",
]


def llc_from_sample(res: SampleResult, name: str | None = None) -> LLCResult:
    """The LLC of a finished :class:`SampleResult` (float64 throughout). Chains that did not run (``chains=`` a
    subset: their rows of the trace are NaN) are left out of the mean, spread and diagnostics (their
    ``llc_per_chain`` entries stay NaN). A result none of whose chains ran (every row NaN, e.g. a run of
    ``runs=`` whose chains ``chains=`` left out) has no estimate: ValueError naming it.

    A run whose moving weights the loss never gave a gradient (``config["unread"]``: the loss does not read
    them, so ``E_w[L_n(w)] = L_n(w*)`` exactly) has LLC 0 (trace, per chain, mean, spread and standard error),
    with a ``RuntimeWarning`` naming the run (``name``, else its ``restrict_to``)."""
    nbeta = float(res.config["nbeta"])
    llc_trace = nbeta * (res.loss_trace - res.init_loss)
    if res.config.get("unread"):
        what = repr(name) if name is not None else f"restrict_to={res.config.get('restrict_to')!r}"
        warnings.warn(
            f"the loss gave none of the moving weights of {what} a gradient in any step (it does not read "
            "them, or reads them detached): their LLC is 0, reported as such (the loss trace only varies "
            "with the batches). Check the component, or the loss function, if it should read them",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )
        llc_trace = np.where(np.isnan(res.loss_trace), np.nan, 0.0)
    per_chain = llc_trace.mean(axis=1)
    ran = ~np.isnan(np.asarray(res.loss_trace)).all(axis=1) if np.ndim(res.loss_trace) == 2 else None
    if ran is not None and not ran.any():
        raise ValueError(
            f"the sample result has no draw: none of its {len(ran)} chains ran (its loss trace is all NaN, as "
            "sample(chains=...) leaves the chains it does not run): an LLC needs at least one chain's draws; run "
            "them (chains=None runs all)"
        )
    run = per_chain if ran is None or ran.all() or not ran.any() else per_chain[ran]
    trace = res.loss_trace if ran is None or ran.all() or not ran.any() else res.loss_trace[ran]
    std = float(run.std(ddof=1)) if len(run) > 1 else float("nan")
    init_se = float(res.init_loss_se)
    se = float(np.hypot(std / np.sqrt(len(run)), nbeta * init_se))
    if res.config.get("unread"):  # exactly 0: neither the chains nor L_n(w*)'s estimate add an error
        std, se = (0.0 if len(run) > 1 else float("nan")), 0.0
    return LLCResult(
        llc_mean=float(run.mean()),
        llc_std=std,
        llc_per_chain=per_chain,
        llc_trace=llc_trace,
        loss_trace=res.loss_trace,
        init_loss=res.init_loss,
        nbeta=nbeta,
        r_hat=r_hat(trace),
        ess=ess(trace),
        sample=res,
        llc_se=se,
        init_loss_se=init_se,
    )


def estimate_llc(model: nn.Module, loader, **kwargs) -> LLCResult | list[LLCResult]:
    """Estimate the local learning coefficient of ``model`` at its current weights.

    Takes every keyword argument of :func:`pypattern.sample` (:func:`pypattern.sampling.sample`), documented
    there; any other keyword is a ``TypeError`` naming it and the closest accepted name (``loss_fn``, ``num_chains=4``,
    ``num_draws=200``, ``num_burnin_steps``, ``num_steps_bw_draws``, ``step_size``, ``nbeta``, ``localization``,
    ``seed``, ``checkpoint``, ``batched``, ``quiet``, ``auto_step_options`` (the settings of the
    ``step_size="auto"`` calibration, e.g. ``{"calibration_steps": 800}``), ...).

    When the step is calibrated (``step_size="auto"``, the default) and no ``num_burnin_steps`` is given (here it
    defaults to :func:`pypattern.sample`'s ``num_burnin_steps="auto"``), the run burns in for as long as its chosen
    step needs for the chains to relax from ``w*``
    (:func:`pypattern.sampling.auto.burnin_for_run`: ``relaxation_times``, default 3, relaxation times of the
    flattest direction, ``2 * 3 / (step_size * (localization + weight_decay))`` steps, at least the draws' steps
    and at most ``max_burnin_factor``, default 40, times them, settings of ``auto_step_options``); the result's
    ``config["auto_step"]["burnin"]`` says how many and why, and ``config["num_burnin_steps"]`` holds them. A given
    ``num_burnin_steps`` is kept as given.

    Returns
    -------
    LLCResult (a list of them, one per run, with ``runs=``)
        ``llc_mean``, ``llc_std`` (over chains, ddof=1), ``llc_se`` (standard error of ``llc_mean``, the error
        of ``L_n(w*)`` included), ``llc_per_chain`` ``(num_chains,)``, ``llc_trace`` and
        ``loss_trace`` ``(num_chains, num_draws)``, ``init_loss`` (``L_n(w*)`` over several batches), R-hat and
        ESS of the loss trace; ``.save()``, ``.load()``, ``.plot()``, ``.to_devinterp()``.

    Examples
    --------
    >>> res = estimate_llc(model, loader, step_size=1e-4, localization=100.0, num_chains=4, num_draws=200)
    >>> res.llc_mean, res.llc_std
    """
    refuse_unknown_keywords(
        kwargs, _SAMPLE_ARGUMENTS, "estimate_llc()", "pypattern.sample()'s keywords (documented there)"
    )
    if kwargs.get("num_burnin_steps") is None:  # a calibrated step's run burns in as long as the step needs
        kwargs = dict(kwargs, num_burnin_steps="auto")
    return llc_of_samples(
        sample(model, loader, **kwargs), model, kwargs.get("masks"), kwargs.get("warn_nonstationary", True)
    )


def llc_of_samples(
    out, model: nn.Module, masks=None, warn_nonstationary: bool = True
) -> LLCResult | list[LLCResult]:
    """The LLC of a :func:`pypattern.sample` result (a list of them with ``runs=``: one LLC per run), with
    :func:`estimate_llc`'s warnings (a calibrated step's estimated bias; an estimate above ``d / 2`` when the run
    moved every weight, ``masks`` None; a capped burn-in, with ``warn_nonstationary`` as the sampler's own
    non-stationarity warnings and those of susceptibilities)."""
    if isinstance(out, list):  # runs=: one result per (restrict_to, masks) run
        results = [llc_from_sample(r) for r in out]
        # one calibration for every run: its bias warned of once, at the first run it concerns
        for res in results:
            if _warn_auto_bias(res):
                break
        if results:
            _warn_auto_unrelaxed(results[0], capped=warn_nonstationary)  # one calibration for every run: once
        return results
    res = llc_from_sample(out)
    _warn_auto_bias(res)
    _warn_auto_unrelaxed(res, model, masks, capped=warn_nonstationary)
    if masks is None:
        _warn_above_half_dimension(res, model)
    return res


def _warn_of_run(res: LLCResult, message: str, category: type[Warning] = UserWarning) -> None:
    """Warn ``category`` with ``message`` after the name of the run ``res`` is of, as the sampler's warnings are
    named (:func:`~pypattern.sampling.diagnostics.naming_runs`): the name its run had when it was sampled (an
    estimator that samples several runs names each, e.g. ``"refined_llc(), component 'a'"``), else the run under
    way (e.g. ``"OnlineLLC at step 10"``), else none."""
    name = run_name(getattr(res, "sample", None))
    text = f"{name}: {message}" if name else _named(message)
    warnings.warn(text, category, stacklevel=user_stacklevel())


def _warn_above_half_dimension(res: LLCResult, model: nn.Module) -> None:
    """Warn when the estimate exceeds ``d / 2`` (``d`` moving parameters: no learning coefficient is larger, and
    the localized, tempered posterior of a minimum gives less) by more than three standard errors: the step is too
    large (discretisation bias) or the chains left ``w*``'s basin; with ``weight_decay`` > 0, which centres the
    chains' distribution away from ``w*``, the warning names it instead."""
    config = getattr(res.sample, "config", None)
    if not isinstance(config, dict) or config.get("restrict_to") is not None:
        return
    if float(config.get("noise_scale", 1.0)) != 1.0:  # another stationary distribution: no such bound
        return
    d = sum(p.numel() for p in model.parameters() if p.requires_grad)
    m, se = float(res.llc_mean), float(res.llc_se)
    if not (d and math.isfinite(m) and math.isfinite(se) and m - 3 * se > d / 2):
        return
    wd = float(config.get("weight_decay", 0.0) or 0.0)
    if (
        wd > 0
    ):  # the chains' distribution is centred away from w*: the bound does not hold, the step is not to blame
        _warn_of_run(
            res,
            f"the LLC estimate {m:.4g} (standard error {se:.3g}) exceeds d/2 = {d / 2:g}, half the number of moving "
            f"parameters, which bounds the learning coefficient: weight_decay={wd:g} pulls the chains towards "
            "w = 0, away from w*, so their mean loss holds the loss of that shift too (nbeta times it), which no "
            "step size removes. Give weight_decay=0 for the LLC at w*",
        )
        return
    _warn_of_run(
        res,
        f"the LLC estimate {m:.4g} (standard error {se:.3g}) exceeds d/2 = {d / 2:g}, half the number of moving "
        "parameters, which bounds the learning coefficient (and the localized, tempered posterior at a minimum "
        "gives less): the step size is probably too large (discretisation bias) or the chains left the basin "
        "of w*. Give a smaller step_size (or step_size='auto') and check the loss trace",
    )


def _warn_auto_bias(res: LLCResult) -> bool:
    """Warn when the automatic step's own bias estimate (the estimate at twice the step minus at the step)
    exceeds both the run's standard error, which does not include it, and the calibration's relative floor
    (``atol_rel`` of the estimate: a change it counts as immaterial whatever the standard errors, as it chose the
    step by it). Once per calibration: the runs of one sampler call (``runs=``, one calibration for all of them)
    after the first it warned about are not warned about again. Returns whether it warned (or had warned about
    that calibration)."""
    calibration = calibration_of(getattr(res, "sample", None))
    if calibration is not None and calibration.bias_warned:
        return True
    config = getattr(res.sample, "config", None)
    auto = config.get("auto_step") if isinstance(config, dict) else None
    bias = auto.get("bias") if isinstance(auto, dict) else None
    se = float(res.llc_se)
    settings = auto.get("settings") if isinstance(auto, dict) else None
    rel = settings.get("atol_rel", 0.0) if isinstance(settings, dict) else 0.0
    mean = float(getattr(res, "llc_mean", float("nan")))
    floor = float(rel) * abs(mean) if math.isfinite(mean) and isinstance(rel, int | float) else 0.0
    if not (bias is not None and math.isfinite(bias) and math.isfinite(se) and abs(bias) > max(se, floor)):
        return False
    if calibration is not None:
        calibration.bias_warned = True
    _warn_of_run(
        res,
        f"step_size='auto' chose {auto.get('chosen'):.3g}, whose estimated discretisation bias ({bias:+.3g}: "
        f"the estimate at twice the step minus at the step) is larger than llc_se ({se:.3g}), which does not "
        f"include it{f', and than {rel:.0%} of the estimate' if floor > 0 else ''}: the estimate may be off by "
        "more than its standard error. The calibration accepted that bias against the larger of its prediction "
        "of this run's standard error, a multiple of the change's own standard error and a relative floor "
        "(config['auto_step']['reason']); the run's llc_se came out smaller than that. Give a smaller "
        "step_size (half the chosen one, say) with more draws",
    )
    return True


#: relaxation times of the flattest direction, in the chosen step's trials, below which estimate_llc warns
FLAT_RELAXATION_WARN = 1.0


def capped_burnin_message(auto: Mapping, estimate: str = "the estimate", se: str = "llc_se") -> str | None:
    """What a run warns (:class:`NonStationaryWarning`) when the burn-in chosen for its calibrated step
    (``auto``: the calibration's report as a dict, whose ``burnin`` :func:`~pypattern.sampling.auto.burnin_for_run`
    filled) was capped at ``max_burnin_factor`` times the draws' steps, shorter than its flattest direction needs to
    relax from ``w*``; None when it was not capped (or not chosen by the rule). ``estimate`` and ``se`` name what
    may be biased and its standard error (``"chi"``, ``"chi_se"`` for :func:`pypattern.susceptibilities`): one
    message for every estimator."""
    burnin = auto.get("burnin") if isinstance(auto, Mapping) else None
    if not isinstance(burnin, Mapping) or burnin.get("needed") is None or not burnin.get("capped"):
        return None
    chosen = auto.get("chosen")
    step = f"{chosen:.3g}" if isinstance(chosen, int | float) else "the chosen step"
    return (
        f"step_size='auto' chose {step}, and the run's burn-in of {burnin.get('num_burnin_steps')} steps is "
        f"shorter than the {burnin.get('needed')} its flattest direction needs to relax from w* "
        f"({burnin.get('reason')}): on a singular model {estimate} may still be drifting along it, by more than "
        f"{se} shows (run-to-run spread across seeds is a check). Give num_burnin_steps (or "
        "auto_step_options={'max_burnin_factor': ...}) for at least "
        f"{burnin.get('needed')} steps, or a larger localization"
    )


def _warn_auto_unrelaxed(
    res: LLCResult, model: nn.Module | None = None, masks=None, capped: bool = True
) -> None:
    """Warn when the automatic step's trials covered fewer than :data:`FLAT_RELAXATION_WARN` relaxation times of
    the flattest direction (``eps * localization * steps / 2``, which its reason notes, ending with
    :data:`~pypattern.sampling.auto.UNRELAXED_NOTE`): on a singular model the estimate may still be creeping up
    along such directions, by more than its standard error shows. Not when every direction is stiff against the
    localization: an estimate of the whole model (``masks`` None, no ``restrict_to``) within 10% of ``d / 2``
    (``d`` moving parameters; a regular model), where the flattest direction's bound is loose.

    A run whose burn-in :func:`estimate_llc` chose by the flattest direction's relaxation
    (``config["auto_step"]["burnin"]``) relaxed from ``w*`` in it, unless the burn-in was capped
    (``max_burnin_factor``): warned only then, saying so."""
    config = getattr(res.sample, "config", None)
    auto = config.get("auto_step") if isinstance(config, dict) else None
    reason = auto.get("reason") if isinstance(auto, dict) else None
    settings = auto.get("settings") if isinstance(auto, dict) else None
    flat = settings.get("flattest_relaxation_times") if isinstance(settings, dict) else None
    burnin = auto.get("burnin") if isinstance(auto, dict) else None
    chosen_burnin = isinstance(burnin, dict) and burnin.get("needed") is not None
    if chosen_burnin and not (burnin.get("capped") and capped):
        # the run's burn-in covered relaxation_times relaxation times of the flattest direction (or it was capped
        # and the caller turned the run's non-stationarity warnings off, ``capped`` False)
        return
    if not chosen_burnin:
        if not isinstance(reason, str) or UNRELAXED_NOTE not in reason or not isinstance(flat, int | float):
            return
        if not flat < FLAT_RELAXATION_WARN:
            return
    if model is not None and masks is None and config.get("restrict_to") is None:
        d = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if d and float(res.llc_mean) >= 0.9 * d / 2:
            return
    chosen = auto.get("chosen")
    step = f"{chosen:.3g}" if isinstance(chosen, int | float) else "the chosen step"
    if chosen_burnin:  # capped
        _warn_of_run(res, capped_burnin_message(auto), NonStationaryWarning)
        return
    at = reason.rfind("its trials cover at most")
    note = reason[at:] if at >= 0 else reason
    _warn_of_run(
        res,
        f"step_size='auto' chose {step}, but the calibration's trials were short for the flattest directions "
        f"({note}): on a singular model the estimate may still be rising along them, by more than llc_se shows "
        "(run-to-run spread across seeds is a check). Run longer at that step (num_burnin_steps, num_draws: "
        "several times the relaxation time of the flattest direction, 2 / (step_size * localization) steps), or "
        "give a larger localization",
        NonStationaryWarning,
    )


_SAMPLE_ARGUMENTS = frozenset(inspect.signature(sample).parameters) - {"model", "loader"}


# ----------------------------------------------------------------------------------------------------------------
# devinterp 1.x compatibility
# ----------------------------------------------------------------------------------------------------------------
def default_nbeta(
    dataloader, grad_accum_steps: int = 1, *, gradient_accumulation_steps: int | None = None
) -> float:
    """devinterp's default inverse temperature ``nbeta = m / ln m``, ``m = batch_size * grad_accum_steps``.

    Parameters
    ----------
    dataloader : DataLoader, int or iterable of batches
        A ``DataLoader`` (its ``batch_size``; the length of its data set when that is smaller and it keeps its
        last batch, the batch the chains read, as :func:`pypattern.sample`'s default ``nbeta``), the batch size
        itself, or any loader (the batch size of its first batch).
    grad_accum_steps, gradient_accumulation_steps : int
        Batches per step (devinterp 1.x's name and devinterp 2.x's; give one). An int >= 1 (numpy integers
        count).

    Returns
    -------
    float
        ``m / ln m``; ``1.0`` with a warning when ``m <= 1`` (devinterp's fallback: ``ln 1 = 0``). A batch size
        given as an int below 1 is a ValueError.
    """
    if gradient_accumulation_steps is not None:
        if grad_accum_steps != 1:
            raise ValueError("give grad_accum_steps or gradient_accumulation_steps (one name), not both")
        grad_accum_steps = gradient_accumulation_steps
    if (
        isinstance(dataloader, bool | np.bool_)
        or (_is_int(dataloader) and dataloader < 1)
        or not _is_int(grad_accum_steps)
        or grad_accum_steps < 1
    ):
        raise ValueError(
            f"default_nbeta(dataloader={dataloader!r}, grad_accum_steps={grad_accum_steps!r}): give a DataLoader "
            "or a batch size (int >= 1) and grad_accum_steps an int >= 1"
        )
    if _is_int(dataloader):
        bs = int(dataloader)
    else:
        bs = getattr(dataloader, "batch_size", None)
        if bs is not None and not getattr(dataloader, "drop_last", False):
            # as the sampler's default: a data set smaller than the batch size is one batch of all of it
            try:
                bs = min(int(bs), len(dataloader.dataset) or int(bs))
            except (TypeError, AttributeError):
                pass
        if bs is None:
            from .data import batch_size_of

            try:
                bs = batch_size_of(next(iter(dataloader)))
            except StopIteration:
                raise ValueError("default_nbeta: the loader yielded no batch") from None
    m = int(bs) * int(grad_accum_steps)
    if m <= 1:
        warnings.warn(
            f"default nbeta is undefined for batch_size * grad_accum_steps = {m} (ln 1 = 0): using nbeta = 1",
            stacklevel=user_stacklevel(),
        )
        return 1.0
    return m / float(np.log(m))


def resolve_device(device, model: nn.Module) -> torch.device:
    """The device a devinterp-style ``device=`` names (None: the model's), checked to exist; the meta device
    (shapes without values) is refused with a ValueError naming ``device``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model={model!r} is not valid; give a torch.nn.Module (the model at w*)")
    if device is None:
        p = next(iter(model.parameters()), None)
        return p.device if p is not None else torch.device("cpu")
    dev = device_arg(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"device={device!r}: torch reports no usable CUDA device (torch.cuda.is_available() is False); "
                "pass device='cpu' or install a CUDA build of torch"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible "
                f"(valid: cuda:0 .. cuda:{torch.cuda.device_count() - 1})"
            )
    elif dev.type == "meta":
        raise ValueError(
            f"device={device!r}: the meta device holds shapes without values, and sampling computes losses and "
            "gradients; pass 'cpu' or 'cuda'"
        )
    elif dev.type not in ("cpu", "mps", "xpu"):
        raise NotImplementedError(f"device={device!r}: pypattern samples on cpu or cuda devices")
    return dev


def on_device(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` if its parameters are on ``device``, else a copy moved there (the caller's model stays where it
    is). ``cuda`` without an index is the current CUDA device (a model already there is not copied)."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if all(p.device == device for p in model.parameters()) and all(
        b.device == device for b in model.buffers()
    ):
        return model
    import copy

    return copy.deepcopy(model).to(device)


def criterion_evaluate(criterion: Callable) -> Callable:
    """devinterp's ``evaluate`` for a loss module: ``criterion(model(x), y)`` on ``(x, y)`` batches, the output
    handed on after the loss (devinterp's ``(loss, {"output": y_pred})``)."""

    def evaluate(model, data):
        if not isinstance(data, tuple | list) or len(data) != 2:
            raise TypeError(
                f"criterion= needs (x, y) batches (it is called as criterion(model(x), y)); got a "
                f"{type(data).__name__}: pass evaluate(model, batch) for other batches"
            )
        x, y = data
        out = model(x)
        return criterion(out, y), out

    evaluate.__name__ = f"criterion_{getattr(criterion, '__name__', type(criterion).__name__)}"
    return evaluate


# (model class, batch kind) -> whether model(batch) returned the loss: decided at the first batch of that kind in
# a call (cleared when a devinterp entry point starts)
_MODEL_RETURNS_LOSS: dict[tuple[type, str], bool] = {}


def _loss_of(out):
    """The loss in what ``model(batch)`` returned, by devinterp's ``split_results`` (a dict's ``"loss"``, a
    tuple's first element, a tensor, an object's ``.loss``), when it is one number; else None."""
    if isinstance(out, Mapping):
        loss = out.get("loss")
    elif isinstance(out, tuple | list):
        loss = out[0] if out else None
    elif isinstance(out, torch.Tensor):
        loss = out
    else:
        loss = getattr(out, "loss", None)
    return loss if isinstance(loss, torch.Tensor) and loss.numel() == 1 else None


def _batch_kind(data) -> str:
    if isinstance(data, torch.Tensor):
        return "tensor"
    if isinstance(data, tuple | list):
        return f"sequence{len(data)}"
    if isinstance(data, Mapping):
        return "mapping"
    return "other"


def _rule_kind(data) -> bool:
    """Whether ``data`` is of a kind the library's one rule reads (token tensors, a
    ``DataLoader(TensorDataset(tokens))``'s one-element batches, pairs, mappings with ``input_ids``)."""
    tokens = isinstance(data, torch.Tensor) and not (data.is_floating_point() or data.is_complex())
    one = isinstance(data, tuple | list) and len(data) == 1 and isinstance(data[0], torch.Tensor)
    return (
        tokens
        or one
        or (isinstance(data, tuple | list) and len(data) == 2)
        or (isinstance(data, Mapping) and "input_ids" in data)
    )


def _rule_reads(data) -> bool:
    """Whether the library's one rule reads ``data``'s form (:func:`pypattern.losses.parse_batch` takes it)."""
    from ..losses import parse_batch

    try:
        parse_batch(data)
    except (TypeError, ValueError):
        return False
    return True


def _rule_computes(model, data) -> bool:
    """Whether :func:`_default_evaluate` computes ``data``'s loss by the library's one rule (then the sampler
    checks the batch by it first, :func:`pypattern.sampling.runner.by_default_rule`): a batch of a kind the rule
    reads, for a model that does not return its own loss for that kind; where ``model(data)`` fails, a batch whose
    form the rule reads. Decided as :func:`_default_evaluate` decides, at the first batch of each kind for each
    model class (one extra forward)."""
    if not _rule_kind(data):
        return False
    decided = _MODEL_RETURNS_LOSS.get((type(model), _batch_kind(data)))
    if decided is not None:
        return not decided
    try:
        out = model(data)
    except Exception:  # noqa: BLE001 - devinterp's call failed: the rule computes the loss if it reads the batch
        return _rule_reads(data)
    decided = _loss_of(out) is not None
    _MODEL_RETURNS_LOSS[(type(model), _batch_kind(data))] = decided
    return not decided


def _default_evaluate(model, data):
    """devinterp 1.3's default ``evaluate``: ``model(data)``, whose loss (one number: the output itself, a tuple's
    first element, a dict's ``"loss"`` or an object's ``.loss``) is the batch's loss. Where ``model(data)`` fails
    or returns something else (logits), batches the library's one rule reads (token tensors, a
    ``DataLoader(TensorDataset(tokens))``'s one-element batches, Hugging Face dicts with ``input_ids``, ``(x, y)``
    pairs) get its loss (:func:`pypattern.losses.batch_loss`: next-token cross-entropy over the counted tokens;
    cross-entropy of ``model(x)`` for integer ``y``, else the mean squared error), checked by the rule as every
    estimator's default loss is (:func:`_rule_computes`); other batches raise ``model(data)``'s error, as do
    batches whose form the rule does not read either. Which of the two applies is decided at the first batch of
    each kind for each model class (one extra forward)."""
    tokens = isinstance(data, torch.Tensor) and not (data.is_floating_point() or data.is_complex())
    if isinstance(data, torch.Tensor) and not tokens:
        from ..losses import vocab_size

        if vocab_size(model) is not None:  # a language model: model(data) would fail inside its embedding
            raise TypeError(
                f"loader: a {data.dtype} tensor batch of shape {tuple(data.shape)} for a language model, which reads "
                "integer token ids; give integer ids (or pass evaluate(model, batch))"
            )
    if _rule_kind(data):
        from .runner import default_loss_fn

        key = (type(model), _batch_kind(data))
        decided = _MODEL_RETURNS_LOSS.get(key)
        if decided is False:
            return default_loss_fn(model, data)
        if decided is None:
            try:
                out = model(data)
            except Exception as e:  # noqa: BLE001 - devinterp's call failed: the library's loss, else this error
                try:
                    loss = default_loss_fn(model, data)
                except (TypeError, ValueError) as refusal:
                    # the rule reads the batch's form and refuses it: its error names why
                    if _rule_reads(data):
                        raise refusal from None
                    raise e from None
                except Exception:  # noqa: BLE001 - neither reads the batch: devinterp's error stands
                    raise e from None
                _MODEL_RETURNS_LOSS[key] = False
                return loss
            if _loss_of(out) is None:
                _MODEL_RETURNS_LOSS[key] = False
                return default_loss_fn(model, data)
            _MODEL_RETURNS_LOSS[key] = True
            return out
    out = model(data)
    if _loss_of(out) is None:
        raise TypeError(
            "evaluate not given: devinterp's default evaluate is model(batch), which must return the loss (a "
            "scalar, a tuple or dict with it, or an object with .loss); got "
            f"{getattr(out, 'shape', type(out).__name__)}. Pass evaluate(model, batch) or criterion(outputs, targets)"
        )
    return out


by_default_rule(_default_evaluate, _rule_computes)


def _devinterp_kwargs(
    model,
    loader,
    evaluate,
    criterion,
    sampling_method,
    optimizer_kwargs,
    grad_accum_steps,
    cores,
    device,
    gpu_idxs,
    optimize_over_per_model_param,
    use_amp,
    seed,
    num_chains,
    verbose,
    extra,
) -> tuple[nn.Module, dict[str, Any]]:
    name = sampler_name(extra.get("sampler"), sampling_method)  # checked here, before any other work
    if evaluate is not None and criterion is not None:
        raise ValueError(
            "evaluate= and criterion= are both given: pass one (criterion(outputs, targets) is turned into "
            "evaluate(model, (x, y)) = criterion(model(x), y))"
        )
    if evaluate is not None and not callable(evaluate):
        raise TypeError(
            f"evaluate={evaluate!r} is not callable; give a function (model, batch) -> loss or (loss, outputs)"
        )
    if criterion is not None:
        if not callable(criterion):
            raise TypeError(
                f"criterion={criterion!r} is not callable; give a function (outputs, targets) -> loss, e.g. "
                "torch.nn.functional.cross_entropy"
            )
        evaluate = criterion_evaluate(criterion)
    dev = resolve_device(device, model)
    if gpu_idxs:
        raise NotImplementedError(
            f"gpu_idxs={gpu_idxs!r}: multi-GPU sampling is not supported; run on one device (device='cuda:0') "
            "or spread chains over processes with pypattern.distributed"
        )
    if use_amp:
        if dev.type == "cpu":  # devinterp disables AMP on CPU with a warning
            warnings.warn(
                "use_amp=True is not supported on CPU devices: sampling in full precision",
                stacklevel=user_stacklevel(),
            )
        else:
            raise NotImplementedError(
                f"use_amp=True on device {dev}: mixed-precision sampling is not supported; leave use_amp=False"
            )
    if isinstance(cores, Sequence) and not isinstance(cores, str | bytes):
        raise NotImplementedError(
            f"cores={cores!r}: a list of devices is not supported; give the number of chains to run at once"
        )
    # 0 runs the chains one at a time, as devinterp does
    if cores is not None and not (_is_int(cores) and cores >= 0):
        raise ValueError(
            f"cores={cores!r} is not valid; give the number of chains to run at once, an int >= 1 (0: one at a "
            "time, as 1)"
        )
    if not (_is_int(grad_accum_steps) and grad_accum_steps >= 1):
        raise ValueError(
            f"grad_accum_steps={grad_accum_steps!r} is not valid; give the number of batches per step, an int >= 1"
        )
    okw = dict(optimizer_kwargs or {})
    if okw.get("add_grad_correction"):
        raise NotImplementedError(
            "optimizer_kwargs add_grad_correction=True is not supported: RMSprop-SGLD leaves out the term in the "
            "derivative of its preconditioner (devinterp's default, add_grad_correction=False)"
        )
    # devinterp's switches for its optimizers' own metrics (off: nothing to do; on: NotImplementedError, as
    # pypattern's SGLD), and the correction it leaves out by default
    okw = without_diagnostic_switches(okw)
    okw = {k: v for k, v in okw.items() if k != "add_grad_correction"}
    okw = translate(okw, where="optimizer_kwargs", drop_none=False)
    # hyperparameters given as keywords (pypattern.sample's names, or devinterp's) count as optimizer_kwargs
    top = {k: extra.pop(k) for k in list(extra) if k in _HYPER_KEYWORDS and extra[k] is not None}
    for k, v in translate(top, where="the call").items():
        if okw.get(k) is not None and okw[k] != v:
            raise ValueError(
                f"{k} is given twice with different values: {v!r} as a keyword argument and {okw[k]!r} in "
                "optimizer_kwargs; give it once"
            )
        okw[k] = v
    okw.setdefault("step_size", 0.01)  # devinterp's SGLD default
    if okw.get("nbeta") is None:
        okw["nbeta"] = default_nbeta(loader, grad_accum_steps)
    masks = None
    if optimize_over_per_model_param:
        masks = {k: torch.as_tensor(v) for k, v in optimize_over_per_model_param.items()}
    if evaluate is None:
        # whether model(batch) returns the loss is decided afresh for each call (per model class within it: the
        # chains' copies of the model share the decision), not carried over from another model of the class
        _MODEL_RETURNS_LOSS.clear()
    kw = dict(
        loss_fn=evaluate if evaluate is not None else _default_evaluate,
        optimizer_kwargs=okw,
        seed=_devinterp_seed(seed),
        grad_accum_steps=int(grad_accum_steps),
        masks=masks,
        num_init_loss_batches=num_chains * int(grad_accum_steps),  # devinterp's init loss batches
        quiet=not verbose,
        cores=max(int(cores or 1), 1),
        sampler=name,
    )
    extra = {k: v for k, v in extra.items() if k != "sampler"}
    _check_extra(extra)
    kw.update(extra)
    return on_device(model, dev), kw


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool | np.bool_)


def _devinterp_seed(seed):
    """devinterp 1.x's ``seed`` (an int, a sequence of ints, one per chain, or None) with numpy integers as ints;
    anything else (a float, a bool, a string, a list holding one) is a ``TypeError`` naming it, as devinterp
    raises. Its range and length are checked by :func:`pypattern.sample`. None is seed 0: a run is the same run
    from call to call (and resumes from its checkpoint), where devinterp leaves unseeded chains to torch's global
    generator; replicates need seeds of their own."""
    if seed is None:
        return 0
    if isinstance(seed, np.ndarray) and seed.ndim <= 1 and seed.dtype.kind in "iu":
        seed = seed.tolist()
    if _is_int(seed):
        return int(seed)
    if isinstance(seed, Sequence) and not isinstance(seed, str | bytes) and all(_is_int(v) for v in seed):
        return [int(v) for v in seed]
    raise TypeError(
        f"seed={seed!r} is not valid; give an int, a list of ints (one per chain) or None (a float, bool or string "
        "is not converted)"
    )


# the SGLD hyperparameters by either vocabulary (pypattern's and devinterp's names)
_HYPER_KEYWORDS = frozenset(HYPERPARAMETERS) | frozenset(DEVINTERP_NAMES)


def _check_extra(extra: Mapping[str, Any]) -> None:
    """Keyword arguments beyond devinterp 1.x's go to :func:`pypattern.sample`: refuse any it does not take,
    naming them (not as a TypeError of an internal call)."""
    import inspect

    taken = set(inspect.signature(sample).parameters) - {"model", "loader"}
    ours = {
        "loss_fn",
        "optimizer_kwargs",
        "seed",
        "grad_accum_steps",
        "masks",
        "num_init_loss_batches",
        "quiet",
    }
    ours |= {"cores", "callbacks", "num_draws", "num_chains", "num_burnin_steps", "num_steps_bw_draws"}
    ours |= {"init_loss"}
    devinterp = set(inspect.signature(estimate_learning_coeff_with_summary).parameters) - {"kwargs"}
    refuse_unknown_keywords(
        extra,
        (devinterp - {"model", "loader"}) | (taken - ours),
        "estimate_learning_coeff(_with_summary)",
        "devinterp 1.x's arguments (documented in estimate_learning_coeff_with_summary) and these of "
        "pypattern.sample (documented there)",
        what="unsupported keyword argument(s)",
    )


def estimate_learning_coeff_with_summary(
    model: nn.Module,
    loader,
    callbacks: Sequence[Callable] = (),
    evaluate: Callable | None = None,
    sampling_method=None,
    optimizer_kwargs: Mapping[str, Any] | None = None,
    num_draws: int = 100,
    num_chains: int = 10,
    num_burnin_steps: int = 0,
    num_steps_bw_draws: int = 1,
    init_loss: float | None = None,
    grad_accum_steps: int = 1,
    cores: int = 1,
    seed: int | Sequence[int] | None = None,
    device: str | torch.device | None = None,
    gpu_idxs: Sequence[int] | None = None,
    verbose: bool = True,
    optimize_over_per_model_param: Mapping[str, torch.Tensor] | None = None,
    online: bool = False,
    use_amp: bool = False,
    criterion: Callable | None = None,
    **kwargs,
) -> dict:
    """devinterp 1.x's ``estimate_learning_coeff_with_summary``, same arguments and defaults; runs on pypattern.

    Parameters
    ----------
    model, loader
        The model at ``w*`` (not modified) and a ``DataLoader`` (or any re-iterable of batches).
    callbacks : sequence of callable
        Called at every draw with devinterp's keywords (``chain``, ``draw``, ``loss`` as a 0-d tensor, ``model``,
        ``data``; see :mod:`pypattern.devinterp.v1`); a callback with ``finalize()`` is finalized after the run,
        and one with ``get_results()`` adds its dict to the summary (devinterp's contract).
    evaluate : callable(model, batch) -> loss, optional
        The loss, or a tuple (loss first), a dict with ``"loss"`` or an object with ``.loss``. Default (as in
        devinterp 1.3): ``model(batch)`` when it returns the loss; where it fails or returns logits, token batches
        and dicts with ``input_ids`` get the next-token cross-entropy and ``(x, y)`` batches cross-entropy of
        ``model(x)`` (integer ``y``) or MSE.
    criterion : callable(outputs, targets) -> loss, optional
        devinterp 0.x's loss module (e.g. ``nn.CrossEntropyLoss()``): ``evaluate = criterion(model(x), y)`` on
        ``(x, y)`` batches. Give ``evaluate`` or ``criterion``, not both.
    sampling_method
        The sampler: :class:`SGLD` (default), :class:`SGNHT` or :class:`RMSpropSGLD` (devinterp's classes or
        pypattern's, by name), or a name (``"sgld"``, ``"sgnht"``, ``"rmsprop_sgld"``); see
        :func:`pypattern.sample`'s ``sampler`` (also accepted here; both given must agree). devinterp 1.3.2's
        ``SGMCMC.sgnht`` (whose chains barely move: LLC ~0.01 where its own ``SGNHT`` class gives ~8) is mapped to
        pypattern's :class:`SGNHT`, which matches devinterp's ``SGNHT`` class.
    optimizer_kwargs : dict
        ``lr`` (default 0.01), ``nbeta`` (default :func:`default_nbeta`; ``temperature`` is its old name),
        ``localization``, ``weight_decay``, ``noise_level``, ``bounding_box_size``; SGNHT's
        ``diffusion_factor``, RMSprop-SGLD's ``alpha`` and ``eps``. devinterp's switches for its optimizers'
        own metrics (``save_noise``, ``save_mala_vars``, ``noise_norm``, ``grad_norm``, ``weight_norm``,
        ``distance``, ``metrics``) are accepted off (``False``, ``metrics=[]`` or ``None``: no effect) and raise
        ``NotImplementedError`` on (these diagnostics are not recorded), as :class:`SGLD` does;
        ``add_grad_correction=False`` has no effect.
    num_draws, num_chains, num_burnin_steps, num_steps_bw_draws, grad_accum_steps : int
        devinterp's chain layout.
    init_loss : float, optional
        ``L_n(w*)`` (a one-element tensor or array is read as its number); default (or a falsy value, as in
        devinterp) the mean over ``num_chains * grad_accum_steps`` batches, as in devinterp.
    cores : int
        Chains run at once (threads, see :func:`pypattern.sample`); the draws do not depend on it (bitwise
        against a run in one torch thread, which each group runs in; against more intra-op threads, whose
        reductions add in another order, up to float rounding).
    seed : int or sequence of ``num_chains`` ints, optional
        Keys the noise and data order (None: 0, the same run on every call; devinterp's unseeded chains
        follow torch's global generator, so replicates keyed by ``torch.manual_seed`` need ``seed=`` here).
        The draws are pypattern's keyed draws, not devinterp's. Numpy integers count as ints; a float, bool or
        string is a ``TypeError`` (not truncated).
    device : str or torch.device, optional
        Where to sample (default: where the model is). A model elsewhere is copied there (the caller's model
        is not moved) and batches follow it. A CUDA device where torch sees none is a ``RuntimeError``.
    gpu_idxs, use_amp
        Multi-GPU and mixed precision are not supported (``NotImplementedError``); ``use_amp=True`` on a CPU
        device is ignored with a warning, as devinterp does.
    verbose : bool
        Progress bar.
    optimize_over_per_model_param : dict of str to Tensor, optional
        Per-parameter masks (1 moves, 0 stays).
    online : bool
        devinterp's online summary (see Returns).
    **kwargs
        Passed to :func:`pypattern.sample` (``checkpoint``, ``batched``, ...).

    Returns
    -------
    dict
        devinterp 1.3.2's keys: ``{"llc/mean", "llc/std" (over chains, ddof=1), "llc-chain/<i>", "loss/trace"
        (num_chains, num_draws)}`` (:meth:`LLCResult.to_devinterp` of :func:`estimate_llc` adds ``llc/trace`` and
        ``init_loss``); with ``online=True`` devinterp's online keys ``{"init_loss", "llc/means"
        (num_draws,), "llc/stds" (num_draws,), "llc/trace" (num_chains, num_draws), "loss/trace"}``: the
        per-draw ``nbeta * (loss - init_loss)`` of each chain, and its mean and standard deviation (ddof=1)
        over chains at each draw.
    """
    wrapped = kwargs.pop("_wrapped_callbacks", False)  # from pypattern.devinterp.v1.sample
    # a one-element tensor or array is its number (devinterp takes a tensor); checked before any work
    init_loss = init_loss_value(init_loss)
    if evaluate is None and criterion is None:
        warnings.warn(
            "evaluate not given: the loss is model(batch) when the model returns one (devinterp's default); "
            "otherwise token batches and dicts with input_ids get the next-token cross-entropy over their counted "
            "tokens, (x, y) batches cross-entropy of model(x) (integer y) or MSE",
            stacklevel=user_stacklevel(),
        )
    model, kw = _devinterp_kwargs(
        model,
        loader,
        evaluate,
        criterion,
        sampling_method,
        optimizer_kwargs,
        grad_accum_steps,
        cores,
        device,
        gpu_idxs,
        optimize_over_per_model_param,
        use_amp,
        seed,
        num_chains,
        verbose,
        kwargs,
    )
    from ..devinterp.v1 import devinterp_callbacks

    # called with devinterp's keywords (the loss a 0-d tensor, ``data``), unless sample() already wrapped them
    callbacks = list(callbacks) if wrapped else devinterp_callbacks(callbacks)
    from ..devinterp.v1 import LLCEstimator

    # devinterp's sample_single_chain locals, which it hands every callback
    accum = int(grad_accum_steps)
    settings = dict(
        ref_model=model,
        loader=loader,
        evaluate=kw["loss_fn"],
        optimizer_kwargs={**dict(optimizer_kwargs or {}), "nbeta": kw["optimizer_kwargs"]["nbeta"]},
        sampling_method=sampling_method if sampling_method is not None else SGLD,
        num_draws=num_draws,
        num_burnin_steps=num_burnin_steps * accum,
        num_steps_bw_draws=num_steps_bw_draws * accum,
        grad_accum_steps=accum,
        num_steps=(num_draws * num_steps_bw_draws + num_burnin_steps) * accum,
        device=resolve_device(device, model),
        seed=kw["seed"],
        verbose=verbose,
        use_amp=use_amp,
        callbacks=[getattr(cb, "inner", cb) for cb in callbacks],
        optimize_over_per_model_param=optimize_over_per_model_param,
    )
    for cb in callbacks:
        if isinstance(getattr(cb, "devinterp_locals", None), dict):
            cb.devinterp_locals.update(settings)
    # callbacks that read the chain's optimizer or model (its gradients) get them from chains run one after
    # another, as devinterp runs them (unless batched is given)
    if kw.get("batched") is None and any(
        not isinstance(getattr(cb, "inner", cb), LLCEstimator) and getattr(cb, "reads_chain", True)
        for cb in callbacks
    ):
        kw["batched"] = False
    # the sampler's errors about the loss name the argument the caller gave it in (evaluate's default included)
    with loss_argument("criterion" if criterion is not None else "evaluate"):
        res = estimate_llc(
            model,
            loader,
            callbacks=callbacks,
            num_draws=num_draws,
            num_chains=num_chains,
            # devinterp 1.x draws at the step that ends each stretch of num_steps_bw_draws steps after the burn-in
            # (burn-in + (d + 1) * num_steps_bw_draws - 1, the last draw at the chain's last step); pypattern's
            # sampler at the first step of each (burn-in + d * num_steps_bw_draws, devinterp 2.x's schedule)
            num_burnin_steps=num_burnin_steps + num_steps_bw_draws - 1,
            num_steps_bw_draws=num_steps_bw_draws,
            init_loss=init_loss if init_loss else None,  # devinterp recomputes a falsy init_loss
            **kw,
        )
    if not online:  # devinterp 1.3.2's LLCEstimator keys, no others
        out = {k: v for k, v in res.to_devinterp().items() if k not in ("init_loss", "llc/trace")}
    else:
        out = {
            "init_loss": float(res.init_loss),
            "llc/means": res.llc_trace.mean(axis=0).astype(np.float32),
            "llc/stds": res.llc_trace.std(axis=0, ddof=1).astype(np.float32),
            "llc/trace": res.llc_trace.astype(np.float32),
            "loss/trace": res.loss_trace.astype(np.float32),
        }
    trace = np.asarray(res.loss_trace, dtype=np.float32)
    for cb in callbacks:
        inner = getattr(cb, "inner", cb)
        if not isinstance(inner, LLCEstimator):
            continue
        # devinterp 1.x's sample(), which its estimate_learning_coeff_with_summary calls too, gives its L_n(w*)
        # (given or computed) to every LLC estimator among the callbacks
        inner.init_loss = float(res.init_loss)
        # a resumed run hands callbacks only the draws it takes itself: the library's own estimators get the
        # checkpoint's draws from the run's trace
        if inner.eval_field == "loss" and tuple(inner.losses.shape) == trace.shape:
            missing = ~inner._seen
            for c, d in zip(*np.nonzero(missing), strict=True):
                inner.update(int(c), int(d), float(trace[c, d]))
    for cb in callbacks:
        if callable(getattr(cb, "finalize", None)):
            cb.finalize()
        if not wrapped and callable(getattr(cb, "get_results", None)):  # devinterp 1.x's sample() merges none
            out.update(cb.get_results())
    return out


def estimate_learning_coeff(
    model: nn.Module,
    loader,
    callbacks: Sequence[Callable] = (),
    evaluate: Callable | None = None,
    sampling_method=None,
    optimizer_kwargs: Mapping[str, Any] | None = None,
    num_draws: int = 100,
    num_chains: int = 10,
    num_burnin_steps: int = 0,
    num_steps_bw_draws: int = 1,
    init_loss: float | None = None,
    grad_accum_steps: int = 1,
    cores: int = 1,
    seed: int | Sequence[int] | None = None,
    device: str | torch.device | None = None,
    verbose: bool = True,
    optimize_over_per_model_param: Mapping[str, torch.Tensor] | None = None,
    criterion: Callable | None = None,
    **kwargs,
) -> float:
    """devinterp 1.x's ``estimate_learning_coeff``: the ``llc/mean`` of
    :func:`estimate_learning_coeff_with_summary` with the same arguments."""
    return estimate_learning_coeff_with_summary(
        model,
        loader,
        callbacks=callbacks,
        evaluate=evaluate,
        criterion=criterion,
        sampling_method=sampling_method,
        optimizer_kwargs=optimizer_kwargs,
        num_draws=num_draws,
        num_chains=num_chains,
        num_burnin_steps=num_burnin_steps,
        num_steps_bw_draws=num_steps_bw_draws,
        init_loss=init_loss,
        grad_accum_steps=grad_accum_steps,
        cores=cores,
        seed=seed,
        device=device,
        verbose=verbose,
        optimize_over_per_model_param=optimize_over_per_model_param,
        **kwargs,
    )["llc/mean"]
