"""Convergence diagnostics across chains: split R-hat and effective sample size (Gelman et al., BDA3 ch. 11;
the ESS uses Geyer's initial monotone sequence on the multi-chain autocorrelation, as Stan does, without the
one-lag term Stan and ArviZ add after the truncation). By default neither is rank-normalised: both read the trace's
values, so a heavy-tailed trace is judged by its variance; ``r_hat(trace, method="rank")`` and ``ess(trace,
method="bulk" | "tail")`` are the rank-normalised versions of Vehtari et al. (2021), as ArviZ and Stan compute
them (the run's own checks and the results' ``r_hat`` and ``ess`` use the defaults)."""

from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
import os
import sys
import warnings

import numpy as np

__all__ = [
    "NonFiniteLossError",
    "DriftWarning",
    "NonStationaryWarning",
    "SamplingDivergedError",
    "StepBiasWarning",
    "check_drift",
    "check_mixing",
    "check_relaxation",
    "check_stationarity",
    "check_step_bias",
    "checking_run",
    "ess",
    "naming_runs",
    "outer_run_name",
    "r_hat",
    "R_HAT_METHODS",
    "ESS_METHODS",
    "step_bias",
    "user_stacklevel",
]


_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # pypattern/


def _passed_files() -> tuple[str, ...]:
    """The files whose frames a warning's line passes over: pypattern's, ``contextlib``'s (its context managers)
    and torch's context-decorator module (``torch.no_grad()`` and ``torch.enable_grad()`` as decorators wrap
    pypattern's functions in its frames)."""
    out = [_PACKAGE, os.path.abspath(contextlib.__file__)]
    try:
        import torch.utils._contextlib as torch_contextlib

        out.append(os.path.abspath(torch_contextlib.__file__))
    except ImportError:  # a torch without that module: no frames of it to pass
        pass
    return tuple(out)


_PASSED = _passed_files()


def user_stacklevel(extra: int = 0) -> int:
    """The ``stacklevel`` for ``warnings.warn`` called in the function that calls this one, at which the warning
    points at the first line outside pypattern (the caller's code, whichever entry point it called: ``sample``,
    ``estimate_llc``, ``susceptibilities``, ...). ``extra`` counts frames between the ``warnings.warn`` call and
    the function that calls this one (a context manager's generator entered from it: 2)."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PASSED):
        frame, level = frame.f_back, level + 1
    return level + extra


class _RunNames:
    """The names of a sampler call's runs (:func:`naming_runs`) and the run whose checks are under way."""

    def __init__(self, names) -> None:
        self.names = tuple(str(n) for n in names)
        self.current: int | None = None


_RUN_NAMES: contextvars.ContextVar[_RunNames | None] = contextvars.ContextVar(
    "pypattern_run_names", default=None
)


@contextlib.contextmanager
def naming_runs(names):
    """Within it, the diagnostic warnings of a sampler call begin with the name of the run they concern:
    ``names[r]`` for run ``r`` (an estimator that samples once per component names them, e.g.
    ``"susceptibilities(), component 'blocks.0.mlp'"``). The sampler marks the run it checks with
    :func:`checking_run`; a call of one run is named by ``names[0]``, and one of several runs, none of them
    marked, by all of their names."""
    token = _RUN_NAMES.set(_RunNames(names))
    try:
        yield
    finally:
        _RUN_NAMES.reset(token)


def outer_run_name() -> str | None:
    """The name of the run under way when :func:`naming_runs` names one run only (an estimator calling another
    names the inner runs after it), else None."""
    state = _RUN_NAMES.get()
    if state is None or not state.names:
        return None
    if state.current is not None and 0 <= state.current < len(state.names):
        return state.names[state.current]
    return state.names[0] if len(state.names) == 1 else None


def checking_run(r: int) -> None:
    """Mark run ``r`` of the sampler call as the one whose checks follow (see :func:`naming_runs`; nothing
    outside it)."""
    state = _RUN_NAMES.get()
    if state is not None:
        state.current = int(r)


def _named(message: str) -> str:
    """``message`` after the name of the run it concerns (:func:`naming_runs`), or as it is outside one."""
    state = _RUN_NAMES.get()
    if state is None or not state.names:
        return message
    if state.current is not None and 0 <= state.current < len(state.names):
        who = state.names[state.current]
    elif len(state.names) == 1:
        who = state.names[0]
    else:
        who = "one of the runs " + "; ".join(state.names)
    return f"{who}: {message}"


def _warn(message: str, category: type[Warning]) -> None:
    """Warn ``category`` with ``message`` named by its run (:func:`_named`), pointing at the caller's code."""
    warnings.warn(_named(message), category, stacklevel=user_stacklevel())


class SamplingDivergedError(FloatingPointError):
    """A chain diverged: its loss, gradient or parameters became NaN or Inf, or its loss ran away (see
    :func:`pypattern.sample`). Attributes: ``chain``, ``draw``, ``step``, ``step_size`` (the one used), and
    ``suggested_step_size`` (a tenth of it, or None)."""

    def __init__(self, msg, *, chain, draw, step, step_size, suggested_step_size=None):
        super().__init__(msg)
        self.chain, self.draw, self.step, self.step_size = chain, draw, step, step_size
        self.suggested_step_size = suggested_step_size


class NonFiniteLossError(SamplingDivergedError, ValueError):
    """The loss is not finite at the initial weights ``w*`` (on the data or with the model given): the inputs are
    the cause, not the step size, so no smaller step is suggested (``suggested_step_size`` is None) and a run at a
    calibrated step is not run again. A :class:`SamplingDivergedError` and a :class:`ValueError`."""


class NonStationaryWarning(UserWarning):
    """The loss trace drifts (split R-hat above the threshold) or mixes too slowly to tell (effective sample size
    below 100, or below a quarter of a short run's draws): the chains may not have reached equilibrium."""


class DriftWarning(NonStationaryWarning):
    """The chains keep moving away from ``w*``: their squared distance ``|w - w*|^2`` grows from the first to the
    last quarter of the draws (:func:`check_drift`), along directions nothing holds them in within the run
    (``localization=0``, or one too weak to act in the run's steps)."""


class StepBiasWarning(UserWarning):
    """A given step size is large enough that its discretisation bias likely raises the estimate by more than
    :data:`MAX_STEP_BIAS` (:func:`check_step_bias`)."""


def _detached(v):
    """A torch tensor ``v`` as a float64 CPU tensor without grad (numpy reads it then: bfloat16, CUDA and tensors
    that require grad are not readable as they are); anything else as it is."""
    torch = sys.modules.get("torch")  # not imported here when not loaded: a trace from torch loaded it
    if torch is None or not isinstance(v, torch.Tensor):
        return v
    return v.detach().to("cpu", dtype=torch.float64) if not v.is_complex() else v.detach().cpu()


def _as_2d(trace, name="trace") -> np.ndarray:
    """``trace`` as a float64 array ``(num_chains, num_draws)`` (a 1-d trace is one chain). Chains of unequal
    lengths, and values that are not numbers, are refused (ValueError naming ``name``): the diagnostics compare
    chains draw by draw; trim the chains to a common length first. Tensors are read as they are (any float dtype,
    device, with or without grad); complex values are refused."""
    trace = _detached(trace)
    if isinstance(trace, list | tuple):
        trace = [_detached(c) for c in trace]
    complex_values = False
    try:
        x = np.asarray(trace)
        complex_values = x.dtype.kind == "c"
        x = np.asarray(x, dtype=np.float64) if not complex_values else x
    except (TypeError, ValueError):
        lengths = None
        with contextlib.suppress(TypeError):
            lengths = sorted({len(c) for c in trace})
        if lengths is not None and len(lengths) > 1:
            raise ValueError(
                f"{name} holds chains of unequal lengths ({', '.join(map(str, lengths))} draws); give an array "
                "(num_chains, num_draws) of chains of one length (trim them to the shortest)"
            ) from None
        raise ValueError(
            f"{name} must be an array of numbers of shape (num_chains, num_draws), got {trace!r:.80}"
        ) from None
    if complex_values:
        raise ValueError(f"{name} must hold real numbers, got complex values")
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (num_chains, num_draws), got {x.shape}")
    return x


R_HAT_METHODS = ("split", "rank")
ESS_METHODS = ("mean", "bulk", "tail")


def _method(method, valid: tuple[str, ...]) -> str:
    if not isinstance(method, str) or method not in valid:
        raise ValueError(f"method={method!r} is not valid; give one of {', '.join(map(repr, valid))}")
    return method


def r_hat(trace, *, method: str = "split") -> float:
    """Split R-hat of a trace, shape ``(num_chains, num_draws)`` (or ``(num_draws,)`` for one chain).

    Each chain is split in halves (the first and last ``num_draws // 2`` draws), so a drift within one chain also
    raises it. Near 1 (< 1.01-1.1) when the chains agree; ``nan`` with no chain, fewer than 4 draws per chain or
    a non-finite value; exactly 1 for a trace whose values are all equal (whatever the value: the rounding of its
    mean is not read as variation).

    ``method``: ``"split"`` (the default; the values themselves, BDA3) or ``"rank"``: rank-normalised split
    R-hat (Vehtari et al. 2021; ArviZ's ``rhat`` default and Stan's), the larger of the split R-hats of the
    normal scores of the ranks of the halves' draws (pooled, average ranks for ties, Blom's ``(r - 3/8) / (S +
    1/4)``) and of the folded draws ``|x - median|``: insensitive to heavy tails and also sensitive to chains that
    differ in spread.
    """
    method = _method(method, R_HAT_METHODS)
    x = _as_2d(trace)
    n = x.shape[1] // 2
    if n < 2 or x.shape[0] == 0:
        return float("nan")
    if not np.isfinite(x).all():
        return float("nan")
    if _all_equal(x):
        return 1.0
    x = _power_of_two_scaled(x)
    halves = np.concatenate([x[:, :n], x[:, x.shape[1] - n :]], axis=0)
    if method == "rank":
        bulk = _r_hat_of_chains(_normal_scores(halves))
        tail = _r_hat_of_chains(_normal_scores(np.abs(halves - np.median(halves))))
        return float(max(bulk, tail))
    return _r_hat_of_chains(halves)


def _r_hat_of_chains(halves: np.ndarray) -> float:
    """R-hat (BDA3 eq. 11.4) of the chains ``halves`` ``(chains, draws)`` as they are (already split)."""
    n = halves.shape[1]
    means = halves.mean(axis=1)
    # a half whose values are all equal has no variance (not the rounding of its mean): halves that never moved
    # but differ give R-hat = inf
    still = (halves == halves[:, :1]).all(axis=1)
    W = np.where(still, 0.0, halves.var(axis=1, ddof=1)).mean()
    B = n * means.var(ddof=1)
    if W == 0:
        return 1.0 if B == 0 else float("inf")
    var_plus = (n - 1) / n * W + B / n
    return float(np.sqrt(var_plus / W))


def _normal_scores(x: np.ndarray) -> np.ndarray:
    """The rank normalisation of Vehtari et al. (2021): the draws ``x`` (all chains pooled) replaced by
    ``Phi^-1((r - 3/8) / (S + 1/4))``, ``r`` their rank (ties share their average rank), ``S`` their count."""
    from scipy.special import ndtri
    from scipy.stats import rankdata

    r = rankdata(x, method="average").reshape(x.shape)
    return ndtri((r - 0.375) / (x.size + 0.25))


def _all_equal(x: np.ndarray) -> bool:
    """Every value of ``x`` (finite) equals the first: a trace that never moved. Decided on the values themselves,
    not on a variance after subtracting a mean, whose rounding (a mean of 0.1s is not 0.1) would read as noise."""
    return bool(x.size) and bool(np.isfinite(x.flat[0])) and bool((x == x.flat[0]).all())


def _power_of_two_scaled(x: np.ndarray) -> np.ndarray:
    """``x`` (finite) times the power of two that brings its largest magnitude into [0.5, 1): R-hat and the ESS
    do not depend on the scale, and the products and sums of squares behind them then neither overflow (values
    near 1e200) nor underflow (near 1e-200). Exact: the same numbers as unscaled wherever those are finite."""
    top = float(np.abs(x).max())
    if top == 0:
        return x
    return np.ldexp(x, -math.frexp(top)[1])


def _autocov(x: np.ndarray) -> np.ndarray:
    """Autocovariance of each row (biased, FFT), shape ``(num_chains, num_draws)``."""
    n = x.shape[1]
    xc = x - x.mean(axis=1, keepdims=True)
    size = 1 << (2 * n - 1).bit_length()
    f = np.fft.rfft(xc, size, axis=1)
    return np.fft.irfft(f * np.conj(f), size, axis=1)[:, :n] / n


def ess(trace, *, method: str = "mean") -> float:
    """Effective sample size of the mean of a trace ``(num_chains, num_draws)``, pooled over chains.

    Equals ``num_chains * num_draws`` for independent draws and about ``N (1 - rho) / (1 + rho)`` for an AR(1)
    trace with coefficient ``rho``. At most ``N log10(N)`` (``N = num_chains * num_draws``; antithetic chains), as
    Stan and ArviZ cap it. ``nan`` with no chain, fewer than 4 draws per chain or a non-finite value;
    ``num_chains * num_draws`` for a trace whose values are all equal (whatever the value), as ArviZ has it.

    ``method``: ``"mean"`` (the default: the chains as they are, unsplit, Geyer's initial monotone sequence
    without Stan's one-lag term), ``"bulk"`` or ``"tail"``, as ArviZ's ``ess`` and Stan compute them (Vehtari et
    al. 2021: chains split in halves, Stan's one-lag term after the truncation): ``"bulk"`` of the rank-normalised
    draws (see :func:`r_hat`), ``"tail"`` the smaller of the ESS of the indicators ``x <= q`` of the 5% and 95%
    quantiles ``q`` (R's type 7, numpy's default): how well the chains pin the 90% interval.
    """
    method = _method(method, ESS_METHODS)
    x = _as_2d(trace)
    m, n = x.shape
    if n < 4 or m == 0 or not np.isfinite(x).all():
        return float("nan")
    if _all_equal(x):
        return float(m * n)
    x = _power_of_two_scaled(x)
    if method == "bulk":
        return _split_ess(_normal_scores(_halves(x)))
    if method == "tail":
        low, high = np.quantile(x, [0.05, 0.95])
        return min(_split_ess(_halves((x <= q).astype(np.float64))) for q in (low, high))
    return _mean_ess(x)


def _halves(x: np.ndarray) -> np.ndarray:
    """The chains of ``x`` split in halves: the first and the last ``num_draws // 2`` draws of each, stacked."""
    h = x.shape[1] // 2
    return np.concatenate([x[:, :h], x[:, x.shape[1] - h :]], axis=0)


def _split_ess(x: np.ndarray) -> float:
    """The ESS of the chains ``x`` (already split) as Stan's ``compute_effective_sample_size`` and ArviZ's
    ``_ess`` have it: Geyer's initial positive sequence over lags below ``num_draws - 3``, the one-lag term of the
    truncation, then the monotone sequence; at most ``N log10(N)``."""
    m, n = x.shape
    if _all_equal(x):
        return float(m * n)
    acov = _autocov(x)
    W = acov[:, 0].mean() * n / (n - 1)
    var_plus = W * (n - 1) / n + (x.mean(axis=1).var(ddof=1) if m > 1 else 0.0)
    rho = np.zeros(n)
    even, odd = 1.0, 1.0 - (W - acov[:, 1].mean()) / var_plus
    rho[0], rho[1] = even, odd
    t = 1
    while t < n - 3 and even + odd > 0.0:
        even = 1.0 - (W - acov[:, t + 1].mean()) / var_plus
        odd = 1.0 - (W - acov[:, t + 2].mean()) / var_plus
        if even + odd >= 0:
            rho[t + 1], rho[t + 2] = even, odd
        t += 2
    max_t = t - 2
    if even > 0:  # the one-lag term: the even lag of the pair that ended the sequence
        rho[max_t + 1] = even
    t = 1
    while t <= max_t - 2:  # monotone
        if rho[t + 1] + rho[t + 2] > rho[t - 1] + rho[t]:
            rho[t + 1] = rho[t + 2] = (rho[t - 1] + rho[t]) / 2.0
        t += 2
    tau = -1.0 + 2.0 * rho[: max_t + 1].sum() + rho[max_t + 1 : max_t + 2].sum()
    tau = max(tau, 1.0 / np.log10(m * n))
    return float(m * n / tau) if np.isfinite(rho).all() else float("nan")


def _mean_ess(x: np.ndarray) -> float:
    """:func:`ess`'s ``"mean"`` of ``x`` (finite, not all equal): the chains unsplit."""
    m, n = x.shape
    acov = _autocov(x)
    chain_var = acov[:, 0] * n / (n - 1)
    W = chain_var.mean()
    var_plus = W * (n - 1) / n + (x.mean(axis=1).var(ddof=1) if m > 1 else 0.0)
    if var_plus == 0:
        return float(m * n)
    rho = 1.0 - (W - acov.mean(axis=0)) / var_plus
    rho[0] = 1.0
    # Geyer: sums of pairs, truncated at the first negative pair, made monotone
    t = 0
    pair_sums = []
    while t + 1 < n:
        p = rho[t] + rho[t + 1]
        if p < 0:
            break
        if pair_sums and p > pair_sums[-1]:
            p = pair_sums[-1]
        pair_sums.append(p)
        t += 2
    tau = -1.0 + 2.0 * float(np.sum(pair_sums))
    # at least 1 / log10(N), as Stan and ArviZ have it (antithetic chains): the ESS is at most N log10(N)
    tau = max(tau, 1.0 / np.log10(m * n))
    return float(m * n / tau)


MIN_ESS = 100  # below this pooled effective sample size a run's draws are too correlated to judge


def check_mixing(
    trace, *, min_ess: float | None = None, what: str = "loss trace", warn: bool = True, hint: str = ""
) -> bool:
    """True when the effective sample size (:func:`ess`) of ``trace`` ``(num_chains, num_draws)`` is at least
    ``min_ess`` (default: 100, or a quarter of the draws for a run of fewer than 400: a short run is judged by how
    correlated its draws are); else warn (:class:`NonStationaryWarning`) and return False. Below about 100
    effective draws the standard error and split R-hat are themselves poorly estimated, and chains started at
    ``w*`` whose slowest direction relaxes over more steps than the run has are still drifting (on a regular
    10-parameter regression whose curvatures differ 900-fold, 4 chains x 300 draws at the calibrated step: ESS 26,
    split R-hat 1.09, the LLC 37% below its exact value). Fewer than 4 draws per chain (no ESS) return False without a warning."""
    if min_ess is not None and (
        isinstance(min_ess, bool | np.bool_)
        or not isinstance(min_ess, numbers.Real)
        or math.isnan(min_ess)
        or min_ess < 0
    ):
        raise ValueError(
            f"min_ess={min_ess!r} is not valid; give a number >= 0 (the least effective sample size accepted), "
            "or None for the default"
        )
    x = _as_2d(trace)
    e = ess(x)
    if math.isnan(e):
        return False
    if min_ess is None:
        min_ess = min(MIN_ESS, x.size / 4)
    ok = e >= min_ess
    if not ok and warn:
        k = max(1, x.shape[1] // 3)
        first, last = float(x[:, :k].mean()), float(x[:, -k:].mean())
        _warn(
            f"the {what} has an effective sample size of {e:.0f} of its {x.size} draws (below "
            f"{min_ess:.4g}): the draws are strongly autocorrelated, so its standard error and R-hat are "
            "unreliable and the chains may not have reached equilibrium (mean over the first third of "
            f"the draws {first:.6g}, over the last third {last:.6g}). Use more draws (num_draws, "
            "num_steps_bw_draws) and burn-in steps (num_burnin_steps), or pass warn_nonstationary=False "
            f"to silence this.{hint}",
            NonStationaryWarning,
        )
    return ok


def check_stationarity(
    trace, *, threshold: float = 1.1, what: str = "loss trace", warn: bool = True, hint: str = ""
) -> bool:
    """True when split R-hat of ``trace`` is below ``threshold``; else warn (:class:`NonStationaryWarning`, ending
    with ``hint``). False when R-hat cannot be computed: without a warning for fewer than 4 draws per chain, with
    one for a trace holding non-finite values. ``threshold`` must be a number (not NaN): ValueError naming it."""
    if (
        isinstance(threshold, bool | np.bool_)
        or not isinstance(threshold, numbers.Real)
        or math.isnan(threshold)
    ):
        raise ValueError(
            f"threshold={threshold!r} is not valid; give a number (the largest split R-hat accepted)"
        )
    rh = r_hat(trace)
    if math.isnan(rh):
        if warn and not bool(np.isfinite(_as_2d(trace)).all()):
            _warn(
                f"the {what} holds non-finite values: its split R-hat cannot be computed and "
                "stationarity is not checked",
                NonStationaryWarning,
            )
        return False
    ok = not (rh > threshold)
    if not ok and warn:
        _warn(
            f"the {what} is not stationary: split R-hat = {rh:.3f} > {threshold}. Use more burn-in steps "
            f"(num_burnin_steps), more draws, or check the step size (see calibrate_step_size).{hint}",
            NonStationaryWarning,
        )
    return ok


#: the largest shortfall of a run's draws from their stationary value (a typical direction's, as a fraction) that a
#: run at a given step may have without a warning
MAX_SHORTFALL = 0.1


def draw_shortfall(rate: float, draw_steps) -> float:
    """The fraction by which the draws of a run from ``w*`` fall short, on average, of their stationary value along
    a direction relaxing at ``rate`` per step: its variance relaxes at twice the rate, so a draw at step ``t`` is
    short by ``exp(-2 rate t)``; the mean over the draws' steps ``draw_steps`` (burn-in included)."""
    t = np.asarray(draw_steps, dtype=float)
    if t.size == 0 or not rate > 0:
        return 1.0 if t.size else 0.0
    if math.isinf(rate):
        return 0.0
    return float(np.mean(np.exp(-2.0 * rate * t)))


def relaxation_bounds(
    llc_mean: float,
    *,
    step_size: float,
    gamma: float,
    num_params: int,
    total_steps: int,
    mean_draw_step: float,
    noise_scale: float = 1.0,
) -> tuple[float, float]:
    """Two lower bounds on the relaxation times an SGLD run from ``w*`` covered, from its step and its estimate.

    The drift ``-(eps / 2) (nbeta grad L + gamma (w - w*))`` relaxes a direction of curvature ``c`` of ``nbeta L +
    gamma |w - w*|^2 / 2`` at ``eps c / 2`` per step, so a run of ``S`` steps covers ``eps c S / 2`` relaxation
    times of it. Returns ``(flat, trace)``: ``flat = eps gamma S / 2``, the flattest direction's, and ``trace = llc
    S / (d t)``, a typical direction's as seen by the estimate (``d`` moving parameters, ``t`` the mean step of
    the draws): chains that have not relaxed diffuse freely from ``w*`` and raise ``nbeta L`` by ``nbeta tr(H) eps
    t / 2`` by step ``t``, which gives the typical curvature ``nbeta tr(H) / d`` back; chains that have relaxed have
    a smaller estimate than that growth, so it bounds the typical direction's relaxation times from below."""
    eps, S = float(step_size), int(total_steps)
    flat = eps * max(float(gamma), 0.0) * S / 2
    if not (num_params > 0 and math.isfinite(llc_mean)):
        return flat, float("inf")
    if not mean_draw_step > 0:  # every draw at w* itself (one draw, no burn-in): no relaxation covered
        return flat, 0.0
    return flat, float(llc_mean) * S / (num_params * mean_draw_step * float(noise_scale) ** 2)


def check_relaxation(
    rate: float,
    draw_steps,
    *,
    step_size: float,
    llc_mean: float,
    curvature: float,
    max_shortfall: float = MAX_SHORTFALL,
    warn: bool = True,
) -> bool:
    """True when the draws of a run at a given step, at steps ``draw_steps`` from ``w*`` (burn-in included), fall
    short of their stationary value by at most ``max_shortfall`` along a typical direction (curvature
    ``curvature`` of ``nbeta L + gamma |w - w*|^2 / 2``, the mean over directions, measured at ``w*``; it relaxes
    at ``rate = eps curvature / 2`` per step: :func:`draw_shortfall`); else warn (:class:`NonStationaryWarning`)
    and return False. Such chains have not relaxed from ``w*`` by the time of their draws, while with minibatches
    the loss trace is mostly batch noise, which passes split R-hat and the effective sample size."""
    steps = np.asarray(draw_steps, dtype=float)
    short = draw_shortfall(rate, steps)
    ok = not (short > max_shortfall)
    if not ok and warn:
        burnin, last = (int(steps[0]), int(steps[-1])) if steps.size else (0, 0)
        more = ""
        if rate > 0 and steps.size:
            # the burn-in after which the draws' mean is short by max_shortfall: exp(-2 rate B) mean_i exp(-2 rate
            # (t_i - t_0)) = max_shortfall
            tail = float(np.mean(np.exp(-2.0 * rate * (steps - steps[0]))))
            need = math.ceil(max(math.log(tail / max_shortfall), 0.0) / (2.0 * rate))
            more = f" (about {need:,} burn-in steps at this step leave {max_shortfall:.0%})"
        _warn(
            f"step_size={step_size:g} is too small for this run: a typical direction (curvature "
            f"{curvature:.3g} of nbeta L + localization |w - w*|^2 / 2, the mean over the moving "
            f"parameters, measured at w*) relaxes about {rate * max(last, 1):.2g} times by the last draw "
            f"(steps {burnin} to {last}), so the draws fall short of their stationary value by about "
            f"{short:.0%} on average and the LLC estimate ({llc_mean:.4g}) is too low, whatever R-hat "
            "and the effective sample size say (with minibatches the loss trace is mostly batch noise). "
            f"Use more burn-in steps (num_burnin_steps){more} or draws (num_draws), a larger step_size, "
            "or step_size='auto'; warn_nonstationary=False silences this.",
            NonStationaryWarning,
        )
    return ok


#: the largest discretisation bias of a given step (relative to the estimate) that a run may have without a warning
MAX_STEP_BIAS = 0.1


def step_bias(
    step_size: float, nbeta: float, trace_hessian: float, llc: float, noise_scale: float = 1.0
) -> float:
    """The relative discretisation bias of an SGLD estimate ``llc`` at ``step_size``, from the trace ``tr(H)`` of
    the Hessian of the loss where the chains are (``trace_hessian``, the posterior mean).

    On a quadratic, the Euler step ``w <- w - (eps / 2) c w + sqrt(eps) sigma xi`` along a direction of curvature
    ``c`` (of ``nbeta L + gamma |w - w*|^2 / 2``) has the stationary variance ``sigma^2 / (c (1 - x))``, ``x = eps c
    / 4``, instead of ``sigma^2 / c``. A direction of loss curvature ``h`` adds ``sigma^2 nbeta h / (2 c)`` to the
    estimate, so the estimate grows by ``sigma^2 eps nbeta tr(H) / 8`` to first order, whatever the localization
    ``gamma``: ``x = sigma^2 eps nbeta tr(H) / (8 llc_0)`` with ``llc_0`` the unbiased estimate, and the bias is
    ``x / (1 - x)`` for one effective curvature. The estimate measured, ``llc = llc_0 / (1 - x)``, gives ``x (1 -
    x) = sigma^2 eps nbeta tr(H) / (8 llc)``, whose smaller root is returned as ``x / (1 - x)``; ``inf`` when it has
    none (``x > 1 / 2``: a bias of 100% or more) and ``nan`` when ``llc`` or ``tr(H)`` is not positive. Directions
    of unequal curvature (Jensen) and minibatch gradient noise make the true bias larger: it is a lower estimate
    (measured on normal crossings and deep linear networks at steps 1e-3 to 1e-2: 0.5 to 2 times the bias against
    the small-step limit)."""
    eps, tr, lam = float(step_size), float(trace_hessian), float(llc)
    if not (eps > 0 and tr > 0 and lam > 0 and math.isfinite(tr) and math.isfinite(lam)):
        return float("nan")
    m = float(noise_scale) ** 2 * eps * float(nbeta) * tr / (8.0 * lam)
    if m >= 0.25:
        return float("inf")
    x = (1.0 - math.sqrt(1.0 - 4.0 * m)) / 2.0
    return x / (1.0 - x)


def check_step_bias(
    bias: float,
    *,
    step_size: float,
    llc_mean: float,
    curvature: float,
    max_bias: float = MAX_STEP_BIAS,
    warn: bool = True,
    calibrated: bool = False,
    localization: float = 0.0,
    sampler: str = "sgld",
) -> bool:
    """True when the estimated discretisation bias ``bias`` (relative, :func:`step_bias`) of a run at a given
    step is at most ``max_bias`` (or cannot be estimated); else warn (:class:`StepBiasWarning`) and return False.
    ``curvature`` is the effective curvature the bias comes from (``nbeta tr(H) / (2 llc)`` for SGLD).
    ``calibrated``: the step came from ``step_size='auto'`` on a run that ``localization`` does not hold (checked
    only there): the advice is a localization, not the automatic step. ``sampler`` names the sampler in the
    message."""
    ok = not (bias > max_bias)
    if not ok and warn:
        size = "100% or more" if math.isinf(bias) else f"about {bias:+.0%}"
        smaller = (
            step_size * min(0.5, max_bias / bias) if math.isfinite(bias) and bias > 0 else step_size / 10
        )
        label = " of RMSprop-SGLD" if sampler == "rmsprop_sgld" else ""
        what = (
            f"the discretisation bias{label} raises the LLC estimate ({llc_mean:.4g}) by {size} (the curvature where "
            f"the chains are, {curvature:.3g} measured at their last weights, gives step_size * curvature / 4 = "
            f"{step_size * curvature / 4:.2g}; an estimate from the curvature: uneven curvatures and minibatch "
            "noise add to it)"
        )
        if calibrated:
            held = "with localization=0" if not localization else f"with localization={localization:g}"
            advice = (
                f"step_size='auto' chose {step_size:g}, but {held} nothing holds the chains near w* within the run: "
                "they go where the loss's curvature is as large as the step allows, so halving the step in the "
                f"calibration's trials did not change the estimate, and {what}. Give localization (e.g. "
                "localization=100, as the README's examples do), or a smaller step_size with proportionally more "
                "steps; warn_nonstationary=False silences this."
            )
        else:
            advice = (
                f"step_size={step_size:g} is too large for this model: {what}. Use step_size='auto' (pypattern's "
                f"own calls, e.g. estimate_llc and sample, or leave the step out there), or a smaller step_size (lr in "
                f"devinterp-style calls; about {smaller:.2g} or less) with proportionally more steps "
                "(num_burnin_steps, num_draws); warn_nonstationary=False silences this."
            )
        _warn(advice, StepBiasWarning)
    return ok


#: the pooled z-score of the rise of ``log |w - w*|^2`` between the first and last quarters of the draws above which
#: :func:`check_drift` warns (with :data:`DRIFT_RATIO`)
DRIFT_Z = 6.0
#: the least growth of the chains' mean ``|w - w*|^2`` from the first to the last quarter of the draws it warns of
DRIFT_RATIO = 1.2


def drift_statistic(dist) -> tuple[float, float] | None:
    """``(ratio, z)`` of the squared distances ``dist`` ``(num_chains, num_draws)`` from ``w*``: ``ratio`` is the
    chains' mean ``|w - w*|^2`` over the last quarter of the draws divided by that over the first quarter; ``z``
    pools the chains' z-scores of the rise of ``log |w - w*|^2`` between those quarters (Geweke's comparison of
    two windows, each window's variance divided by its effective sample size), ``sum_c z_c / sqrt(C)``. None for
    fewer than 8 finite draws per chain, or a chain that never left ``w*``. Chains with a non-finite value (not
    run, or recorded before a resume from a checkpoint that did not keep the distances) are left out."""
    x = np.asarray(dist, dtype=np.float64)
    if x.ndim != 2:
        return None
    x = x[np.isfinite(x).all(axis=1)]
    C, n = x.shape
    q = n // 4
    if C == 0 or q < 2 or not (x > 0).all():
        return None
    log = np.log(x)
    zs = []
    for c in range(C):
        a, b = log[c, :q], log[c, -q:]
        ea, eb = ess(a[None]), ess(b[None])
        va = a.var(ddof=1) / max(ea if math.isfinite(ea) else 1.0, 1.0)
        vb = b.var(ddof=1) / max(eb if math.isfinite(eb) else 1.0, 1.0)
        if not va + vb > 0:
            return None
        zs.append((b.mean() - a.mean()) / math.sqrt(va + vb))
    ratio = float(x[:, -q:].mean() / x[:, :q].mean())
    return ratio, float(np.sum(zs) / math.sqrt(C))


def check_drift(
    dist, *, localization: float, step_size: float, warn: bool = True, hold_steps: float | None = None
) -> bool:
    """True unless the chains keep moving away from ``w*``: their mean ``|w - w*|^2`` (``dist``, ``(num_chains,
    num_draws)``, over the moving weights) grows by more than :data:`DRIFT_RATIO` from the first to the last
    quarter of the draws, with a pooled z-score above :data:`DRIFT_Z` (:func:`drift_statistic`); then warn
    (:class:`DriftWarning`) and return False.

    Without localization the posterior of a singular model is not confined along its flat directions: the chains
    diffuse along them, farther the longer they run, where the loss's curvature across them can grow until the step
    diverges (a normal crossing ``w1^2 w2^4`` at ``localization=0`` and its calibrated step 0.0125: a run 16 times
    longer ran away). The loss trace alone can look stationary meanwhile (flat directions do not change the loss).
    At the calibrated step with 4 chains x 200 draws this fired on 6 of 10 seeds of an unlocalized deep linear
    network (4, 3, 8) and 5 of 20 of the normal crossing ``w1^2 w2^4`` (more chains and draws resolve it better:
    the windows' effective sample sizes are small), and on none of 20 of a regular linear regression without
    localization, 10 of it with localization 1 and 8 of an MLP with localization 100 (the largest pooled z there
    5.7; 4.0 would have fired on 1 of the 20).

    A localization too weak to act within the run (``localization=1e-6``) drifts as much as none: a run checks it
    where the flattest directions relax over fewer than 0.1 relaxation times in its steps
    (:data:`pypattern.sampling.runner.WEAK_HOLD`); ``hold_steps``, the steps over which it relaxes them
    (``2 / (eps gamma)`` for SGLD), goes into the message."""
    s = drift_statistic(dist)
    if s is None:
        return True
    ratio, z = s
    ok = not (ratio > DRIFT_RATIO and z > DRIFT_Z)
    if not ok and warn:
        held = (
            "with localization=0 nothing holds them near w*: along the loss's flat directions they diffuse farther "
            "the longer they run (the posterior is not confined there), and the step can diverge where the loss's "
            "curvature grows. Give localization (e.g. localization=100, as the README's examples do)"
            if not localization
            else f"localization={localization:g} is too weak to hold them within the run (it relaxes the flattest "
            f"directions over about {hold_steps:.3g} steps): along the loss's flat directions they diffuse as "
            "without localization. Give a larger localization (e.g. localization=100, as the README's examples "
            "do) or more burn-in steps (num_burnin_steps)"
            if hold_steps is not None and math.isfinite(hold_steps)
            else f"localization={localization:g} has not held them yet: give more burn-in steps (num_burnin_steps) "
            "or a larger localization"
        )
        _warn(
            "the chains keep moving away from w*: their mean squared distance |w - w*|^2 grew "
            f"{ratio:.3g}-fold from the first to the last quarter of the draws (z = {z:.3g}) at "
            f"step_size={step_size:g}; {held}, or pass warn_nonstationary=False to silence this.",
            DriftWarning,
        )
    return ok
