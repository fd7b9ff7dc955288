"""The local learning coefficient estimator, and devinterp 1.x's function names.

``llc = nbeta * (E_w[L_n(w)] - L_n(w*))`` with the expectation over SGLD draws from the localized tempered
posterior ``p(w) ~ exp(-nbeta L_n(w) - localization/2 |w - w*|^2)``; per chain, then mean and standard
deviation over chains.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .diagnostics import ess, r_hat
from .results import LLCResult, SampleResult
from .runner import default_nbeta, sample
from .vocabulary import translate

__all__ = [
    "estimate_learning_coeff",
    "estimate_learning_coeff_with_summary",
    "estimate_llc",
    "llc_from_sample",
]


def llc_from_sample(res: SampleResult) -> LLCResult:
    """The LLC of a finished :class:`SampleResult` (float64 throughout)."""
    nbeta = float(res.config["nbeta"])
    llc_trace = nbeta * (res.loss_trace - res.init_loss)
    per_chain = llc_trace.mean(axis=1)
    std = float(per_chain.std(ddof=1)) if len(per_chain) > 1 else float("nan")
    return LLCResult(
        llc_mean=float(per_chain.mean()),
        llc_std=std,
        llc_per_chain=per_chain,
        llc_trace=llc_trace,
        loss_trace=res.loss_trace,
        init_loss=res.init_loss,
        nbeta=nbeta,
        r_hat=r_hat(res.loss_trace),
        ess=ess(res.loss_trace),
        sample=res,
    )


def estimate_llc(model: nn.Module, loader, **kwargs) -> LLCResult:
    """Estimate the local learning coefficient of ``model`` at its current weights.

    Takes every keyword argument of :func:`pypattern.sampling.sample` (``loss_fn``, ``num_chains=4``,
    ``num_draws=200``, ``num_burnin_steps``, ``num_steps_bw_draws``, ``step_size``, ``nbeta``, ``localization``,
    ``seed``, ``checkpoint``, ``batched``, ``quiet``, ...).

    Returns
    -------
    LLCResult
        ``llc_mean``, ``llc_std`` (over chains, ddof=1), ``llc_per_chain`` ``(num_chains,)``, ``llc_trace`` and
        ``loss_trace`` ``(num_chains, num_draws)``, ``init_loss`` (``L_n(w*)`` over several batches), R-hat and
        ESS of the loss trace; ``.save()``, ``.load()``, ``.plot()``, ``.to_devinterp()``.

    Examples
    --------
    >>> res = estimate_llc(model, loader, step_size=1e-4, localization=100.0, num_chains=4, num_draws=200)
    >>> res.llc_mean, res.llc_std
    """
    return llc_from_sample(sample(model, loader, **kwargs))


# ----------------------------------------------------------------------------------------------------------------
# devinterp 1.x compatibility
# ----------------------------------------------------------------------------------------------------------------
def _devinterp_kwargs(
    loader,
    evaluate,
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
) -> dict[str, Any]:
    from .optim import SGLD

    if (
        sampling_method is not None
        and sampling_method is not SGLD
        and getattr(sampling_method, "__name__", "") != "SGLD"
    ):
        raise NotImplementedError(
            f"sampling_method={getattr(sampling_method, '__name__', sampling_method)!r}: only SGLD is implemented"
        )
    if use_amp:
        raise NotImplementedError("use_amp=True is not supported")
    if gpu_idxs:
        raise NotImplementedError("gpu_idxs: run on one device (pass the model on it)")
    del device  # chains run on the model's device
    okw = {k: v for k, v in dict(optimizer_kwargs or {}).items() if k not in ("save_noise", "save_mala_vars")}
    okw = translate(okw, where="optimizer_kwargs", drop_none=False)
    okw.setdefault("step_size", 0.01)  # devinterp's SGLD default
    if okw.get("nbeta") is None:
        okw["nbeta"] = default_nbeta(loader, grad_accum_steps)
    masks = None
    if optimize_over_per_model_param:
        masks = {k: torch.as_tensor(v) for k, v in optimize_over_per_model_param.items()}
    kw = dict(
        loss_fn=evaluate,
        optimizer_kwargs=okw,
        seed=0 if seed is None else ([int(v) for v in seed] if isinstance(seed, Sequence) else int(seed)),
        grad_accum_steps=int(grad_accum_steps),
        masks=masks,
        num_init_loss_batches=num_chains,
        quiet=not verbose,
        cores=int(cores or 1),
    )
    kw.update(extra)
    return kw


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
    seed: int | None = None,
    device=None,
    gpu_idxs=None,
    verbose: bool = True,
    optimize_over_per_model_param: Mapping[str, torch.Tensor] | None = None,
    online: bool = False,
    use_amp: bool = False,
    **kwargs,
) -> dict:
    """devinterp 1.x's ``estimate_learning_coeff_with_summary``, same arguments and defaults; runs on pypattern.

    ``evaluate(model, batch)`` returns the loss (or a tuple/dict with it); ``optimizer_kwargs`` holds ``lr``
    (default 0.01), ``nbeta`` (default ``batch_size / ln(batch_size)``), ``localization``, ``weight_decay``,
    ``noise_level``, ``bounding_box_size``; ``L_n(w*)`` defaults to the mean over ``num_chains`` batches, as in
    devinterp. ``cores`` runs that many chains at once (threads, see :func:`sample`). Extra keyword arguments go to
    :func:`pypattern.sampling.sample` (e.g. ``checkpoint``, ``batched``).

    Returns
    -------
    dict
        ``{"llc/mean", "llc/std", "llc-chain/<i>", "loss/trace" (num_chains, num_draws), "init_loss"}``; with
        ``online=True`` devinterp's online keys ``{"llc/means", "llc/stds", "llc/trace", "loss/trace",
        "init_loss"}`` (the running mean over draws per chain, then mean and std over chains at each draw).
    """
    if evaluate is None:
        warnings.warn("evaluate not given: using cross-entropy/MSE on (x, y) batches", stacklevel=2)
    kw = _devinterp_kwargs(
        loader,
        evaluate,
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
    res = estimate_llc(
        model,
        loader,
        callbacks=list(callbacks),
        num_draws=num_draws,
        num_chains=num_chains,
        num_burnin_steps=num_burnin_steps,
        num_steps_bw_draws=num_steps_bw_draws,
        init_loss=init_loss,
        **kw,
    )
    if not online:
        return res.to_devinterp()
    t = np.arange(1, res.llc_trace.shape[1] + 1)
    running = np.cumsum(res.llc_trace, axis=1) / t
    return {
        "init_loss": float(res.init_loss),
        "llc/means": running.mean(axis=0).astype(np.float32),
        "llc/stds": running.std(axis=0, ddof=1).astype(np.float32),
        "llc/trace": running.astype(np.float32),
        "loss/trace": res.loss_trace.astype(np.float32),
    }


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
    seed: int | None = None,
    device=None,
    verbose: bool = True,
    optimize_over_per_model_param: Mapping[str, torch.Tensor] | None = None,
    **kwargs,
) -> float:
    """devinterp 1.x's ``estimate_learning_coeff``: the ``llc/mean`` of
    :func:`estimate_learning_coeff_with_summary` with the same arguments."""
    return estimate_learning_coeff_with_summary(
        model,
        loader,
        callbacks=callbacks,
        evaluate=evaluate,
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
