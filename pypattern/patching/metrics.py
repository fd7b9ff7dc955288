"""Patching metrics: logit difference, probability, log-probability and KL divergence to the clean run.

A metric maps the logits at its ``position`` to one value per example. Every metric is "higher = more like
the clean run", so the normalised score ``(m_patched - m_corrupt) / (m_clean - m_corrupt)`` is 1 when a patch
fully restores the clean behaviour and 0 at the corrupted level.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import torch

from .._checks import is_count, refuse_meta

__all__ = [
    "Metric",
    "LogitDiff",
    "Prob",
    "LogProb",
    "KL",
    "logit_diff",
    "prob",
    "logprob",
    "kl_div",
    "logits_at",
    "metric_positions",
    "check_metric_output",
    "check_metric_on_stacks",
    "token_ids",
    "bind_metric",
    "finite_examples",
    "name_examples",
    "warn_nonfinite_examples",
]


def _wide(logits: torch.Tensor) -> torch.Tensor:
    """16-bit logits in float32 (a softmax, a KL or a difference of logits rounded to 16 bits loses several
    percent), any other dtype as it is."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _pick(logits: torch.Tensor, idx: torch.Tensor, name: str = "answer") -> torch.Tensor:
    """``logits (..., batch, vocab)``, ``idx`` ``()`` (the same token for every example), ``(batch,)`` or
    ``(batch, k)`` -> ``(..., batch)`` (mean over k). ``name`` names the argument in errors."""
    idx = token_ids(idx, logits.shape[-2], logits.shape[-1], name).to(logits.device)
    g = torch.gather(logits, -1, idx.expand(*logits.shape[:-1], idx.shape[-1]))
    return g.mean(-1)


def _ids_arg(ids, name: str) -> torch.Tensor:
    """A metric's token ids as given (an int, a sequence, an array or a tensor) as a tensor; what holds no ids
    (None, a string, a meta tensor) is refused naming the argument (the ids' dtype, shape and range are checked
    against the logits when the metric is read: :func:`token_ids`)."""
    if isinstance(ids, torch.Tensor):
        refuse_meta(ids, name, "the token ids themselves")
        return ids
    if ids is None or isinstance(ids, str | bytes):
        raise TypeError(
            f"{name}={ids!r} is not valid; give integer token ids (an int, a list or a LongTensor)"
        )
    try:
        return torch.as_tensor(ids, device="cpu")  # moved to the logits' device where they are read
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"{name} must hold integer token ids: {e}") from None


def token_ids(idx: torch.Tensor, B: int, V: int, name: str = "answer") -> torch.Tensor:
    """A metric's token ids for a batch of ``B`` examples over a vocabulary of ``V``, checked: ``(B, k)``, int64
    (ids of any integer dtype are read as ids: a uint8 tensor used as an index would be a mask)."""
    if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got a {idx.dtype} tensor")
    if idx.dim() == 0:
        idx = idx.expand(B)
    if idx.dim() > 2 or idx.shape[0] != B:
        raise ValueError(
            f"{name} has shape {tuple(idx.shape)}; give one token id per example ({B},), several ({B}, k), or one "
            f"id for every example (a scalar)"
        )
    if idx.dim() == 2 and idx.shape[1] == 0 and B:
        raise ValueError(
            f"{name} has shape {tuple(idx.shape)}: no token for each example (the mean over no ids is NaN); give at "
            "least one token id per example"
        )
    if idx.numel():
        if idx.dtype in (torch.uint16, torch.uint32, torch.uint64):  # no min/max in torch: read with numpy
            arr = idx.detach().cpu().numpy()
            lo, hi = int(arr.min()), int(arr.max())
        else:
            lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= V:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"{name} contains the token id {bad}; the logits have {V} entries (ids 0..{V - 1})"
            )
    idx = idx.long()
    return idx[:, None] if idx.dim() == 1 else idx


def first_order_tol(dtype: torch.dtype) -> float:
    """The relative level below which first-order scores (AtP, EAP) of a metric in ``dtype`` count as rounding."""
    return min(1e3 * torch.finfo(dtype).eps, 1e-4)


def first_order_says_nothing(peak: float, size: float, change: float, tol: float) -> bool:
    """Whether first-order scores whose largest magnitude is ``peak`` say nothing: at rounding level (``tol``, see
    :func:`first_order_tol`) of the metric's size (``size``, its largest magnitude) or of 1, while patching
    everything changes the metric by ``change``, itself above rounding, and the scores are rounding against it (the
    metric's gradient vanishes at the base run)."""
    return peak <= tol * max(1.0, size) and change > tol * size and peak <= tol * change


def _position_arg(position):
    """A metric's ``position`` checked: an int (numpy's, or a 0-d integer tensor: the int it holds) or per-example
    integer positions (a 1-D integer tensor, array, list or tuple, kept as given); anything else is refused by
    name."""
    bad = (
        f"position={position!r} is not valid; give an int (negative counts from the end) or per-example int "
        "positions (a LongTensor (batch,))"
    )
    if is_count(position):
        return int(position)
    if isinstance(position, bool | np.bool_):
        raise ValueError(bad)
    if isinstance(
        position, list | tuple | np.ndarray
    ):  # read with numpy: no tensor is made before the run's device
        try:
            arr = np.asarray(position)
        except (TypeError, ValueError):  # ragged
            raise TypeError(bad) from None
        kind, numel, shape, dtype = arr.dtype.kind, arr.size, arr.shape, arr.dtype
        if kind not in "biufc":  # not numbers
            raise TypeError(bad)
        is_bool, is_real = kind == "b", kind in "fc"
    elif isinstance(position, torch.Tensor):
        numel, shape, dtype = position.numel(), tuple(position.shape), position.dtype
        is_bool, is_real = dtype == torch.bool, position.is_floating_point() or position.is_complex()
    else:
        raise TypeError(bad)
    if is_bool or not numel:
        raise ValueError(f"{bad}; got {'bool values' if numel else 'no positions'}")
    if is_real:
        raise TypeError(
            f"metric.position must be an int or integer positions, got {dtype} values (they would be "
            f"truncated): {bad}"
        )
    if len(shape) == 0:  # one position given as a 0-d integer tensor (or array) is the int it holds
        return int(position.item() if isinstance(position, torch.Tensor) else arr)
    if len(shape) != 1:
        raise ValueError(f"{bad}; got shape {tuple(shape)}")
    return position  # per-example positions, kept as given


class Metric:
    """Base class. ``position``: int (the same for every example; negative counts from the end) or a LongTensor
    ``(batch,)`` of per-example positions. ``__call__(logits (..., batch, vocab)) -> (..., batch)``."""

    name = "metric"

    def __init__(self, position: int | torch.Tensor = -1) -> None:
        self.position = _position_arg(position)

    #: attributes that hold one entry per example (first dimension ``batch``); :meth:`select` indexes them
    per_example: tuple[str, ...] = ()

    def bind(self, clean_logits: torch.Tensor) -> None:
        """Called with the clean run's logits at ``position`` ``(batch, vocab)`` before patching."""

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def of_rows(self, model, x: torch.Tensor) -> torch.Tensor | None:
        """The metric computed from the final-norm rows ``x (..., batch, d_model)`` without the full logits, or None
        when it needs them (the default)."""
        return None

    def select(self, index: torch.Tensor | slice) -> Metric:
        """A copy of the metric for the examples ``index`` of its batch (per-example answers, positions and a
        bound clean run indexed; values shared by every example kept as they are)."""
        new = copy.copy(self)
        for name in ("position", *self.per_example):
            v = getattr(self, name, None)
            if isinstance(v, (list, tuple, np.ndarray)):  # per-example positions given as a list or array
                v = torch.as_tensor(v, device="cpu")
            if isinstance(v, torch.Tensor) and v.dim() >= 1:
                setattr(new, name, v[index])
        return new


class LogitDiff(Metric):
    """``logit(answer) - logit(wrong)`` (means over several answers per example when ``(batch, k)`` is given).
    The recommended metric for patching."""

    name = "logit_diff"
    per_example = ("answer", "wrong")

    def __init__(self, answer: torch.Tensor, wrong: torch.Tensor, position: int | torch.Tensor = -1) -> None:
        super().__init__(position)
        self.answer, self.wrong = _ids_arg(answer, "answer"), _ids_arg(wrong, "wrong")

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        logits = _wide(logits)
        return _pick(logits, self.answer, "answer") - _pick(logits, self.wrong, "wrong")

    def of_rows(self, model, x: torch.Tensor) -> torch.Tensor | None:
        """The metric from the final-norm rows ``x (..., batch, d_model)`` directly: only the answer and wrong
        columns of the unembedding (``2 k d_model`` multiply-adds per row instead of ``d_vocab d_model``); None
        when the model's unembedding has no weight matrix (then the logits are computed in full)."""
        if type(self).__call__ is not LogitDiff.__call__:  # a subclass with its own formula
            return None
        un = model.unembed
        W_U = getattr(un, "W_U", None)
        if not isinstance(W_U, torch.Tensor):
            return None
        B, V = x.shape[-2], W_U.shape[-1]

        def mean_logit(idx: torch.Tensor, name: str) -> torch.Tensor:
            ids = token_ids(idx, B, V, name).to(x.device)  # (B, k)
            W = W_U[:, ids.reshape(-1)].reshape(W_U.shape[0], B, ids.shape[1])  # (d, B, k)
            lg = torch.einsum("...bd,dbk->...bk", x, W)
            if getattr(un, "b_U", None) is not None:
                lg = lg + un.b_U[ids]
            if hasattr(un, "cap"):
                lg = un.cap(lg)  # the division by logits_scaling and the final soft cap: per logit
            return _wide(lg).mean(-1)

        return mean_logit(self.answer, "answer") - mean_logit(self.wrong, "wrong")


class Prob(Metric):
    """Probability of ``answer`` (its floor at 0 hides negative effects: prefer :class:`LogitDiff`).

    With several answers per example (``answer`` of shape ``(batch, k)``) the value is the mean of their ``k``
    probabilities, not the probability of the set (their sum): ``k`` times smaller than that sum."""

    name = "prob"
    per_example = ("answer",)

    def __init__(self, answer: torch.Tensor, position: int | torch.Tensor = -1) -> None:
        super().__init__(position)
        self.answer = _ids_arg(answer, "answer")

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return _pick(torch.softmax(_wide(logits), -1), self.answer)


class LogProb(Metric):
    """Log-probability of ``answer``.

    With several answers per example (``answer`` of shape ``(batch, k)``) the value is the mean of their ``k``
    log-probabilities (the log of their geometric mean), not the log-probability of the set (the log of the sum
    of their probabilities)."""

    name = "logprob"
    per_example = ("answer",)

    def __init__(self, answer: torch.Tensor, position: int | torch.Tensor = -1) -> None:
        super().__init__(position)
        self.answer = _ids_arg(answer, "answer")

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return _pick(torch.log_softmax(_wide(logits), -1), self.answer)


class KL(Metric):
    """``-KL(P_clean || P)``: 0 on the clean run, so ``m_patched - m_corrupt`` is the KL effect
    ``D(P_cl||P_*) - D(P_cl||P_pt)``. A token the clean run rules out (a logit of -inf, a vocabulary mask) weighs
    nothing (``0 log 0 = 0``); one the clean run allows and a patched run rules out gives ``-inf``.

    Near the clean run (every logit within 0.5 of the clean one, after the clean logits' own shift) the divergence
    is computed as ``-sum p_cl d + log1p(sum p_cl expm1(d))`` from the logit differences ``d``, whose terms are as
    small as the divergence's first order: a patch that restores the clean run up to the last bits of float32 gives
    a divergence of the order of those bits squared (clamped at 0 where rounding takes it below) (the textbook sum ``sum p_cl (log p_cl -
    log p)`` cancels two terms of the size of the logits and can come out at -1e-7 in float32)."""

    name = "neg_kl"
    per_example = ("clean_logp", "clean_logits")

    #: largest logit difference at which the near-clean form is used
    NEAR = 0.5

    def __init__(self, position: int | torch.Tensor = -1) -> None:
        super().__init__(position)
        self.clean_logp: torch.Tensor | None = None
        self.clean_logits: torch.Tensor | None = None

    def bind(self, clean_logits: torch.Tensor) -> None:
        self.clean_logits = _wide(clean_logits.detach())
        self.clean_logp = torch.log_softmax(self.clean_logits, -1)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.clean_logp is None:
            raise RuntimeError("KL metric is not bound to a clean run: call metric.bind(clean_logits) first")
        x = _wide(logits)
        if x.dim() < 2 or x.shape[-2:] != self.clean_logp.shape[-2:]:
            raise ValueError(
                f"KL metric is bound to clean logits of shape {tuple(self.clean_logp.shape)} (batch, vocab) and was "
                f"given logits of shape {tuple(x.shape)}; give logits (..., {self.clean_logp.shape[0]}, "
                f"{self.clean_logp.shape[1]}) of the same examples (metric.select(index) for a subset of them)"
            )
        lp = torch.log_softmax(x, -1)
        cl = self.clean_logp.to(lp.dtype)
        p = cl.exp()
        # 0 log 0 = 0: a token the clean run rules out (a logit of -inf) weighs nothing, whatever its patched logit
        kl = (p * torch.where(p > 0, cl - lp, 0.0)).sum(-1)
        if self.clean_logits is None or self.clean_logits.shape[-1] != x.shape[-1]:
            return -kl
        c = self.clean_logits.to(x.dtype)
        d = x - c
        # a common shift of the logits changes no probability: measured from the clean run's top token (finite)
        top = c.detach().argmax(-1, keepdim=True).expand(*d.shape[:-1], 1)
        d = d - d.detach().gather(-1, top)
        masked = torch.isneginf(x) & torch.isneginf(c)  # ruled out on both runs: no difference
        d = torch.where(masked, 0.0, d)
        near = d.detach().abs().amax(-1) <= self.NEAR  # False where a difference is infinite or NaN
        if not bool(near.any()):
            return -kl
        # finite in both branches (torch.where differentiates both)
        dn = torch.where(torch.isfinite(d), d, 0.0).clamp(-self.NEAR, self.NEAR)
        # a divergence is never negative: rounding below 0 (~1e-13 in float32) is clamped
        close = (torch.log1p((p * torch.expm1(dn)).sum(-1)) - (p * dn).sum(-1)).clamp_min(0)
        return -torch.where(near, close, kl)


logit_diff, prob, logprob, kl_div = LogitDiff, Prob, LogProb, KL


def metric_positions(metric: Metric, batch: int, seq_len: int):
    """The metric's read-out position(s) for prompts ``(batch, seq_len)``, made non-negative: an int, or a
    LongTensor ``(batch,)``. Raises ValueError when out of range or of the wrong shape."""
    pos = getattr(metric, "position", -1)  # a plain callable reads the last position
    if is_count(pos):  # a numpy integer too
        pos = int(pos)
    if isinstance(pos, int):
        if not -seq_len <= pos < seq_len:
            raise ValueError(f"metric.position={pos} is out of range for prompts of {seq_len} positions")
        return pos % seq_len
    if not isinstance(pos, torch.Tensor):  # a list or array of positions (a tensor keeps its device)
        try:
            pos = torch.as_tensor(pos, device="cpu")
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(
                f"metric.position={pos!r} is not valid; give an int or per-example int positions (a LongTensor "
                f"({batch},))"
            ) from None
    if pos.is_floating_point() or pos.is_complex() or pos.dtype == torch.bool:
        raise TypeError(
            f"metric.position must be an int or integer positions, got {pos.dtype} values (they would be truncated)"
        )
    pos = pos.long()
    if pos.shape != (batch,):
        raise ValueError(
            f"metric.position has shape {tuple(pos.shape)}; give an int or a LongTensor ({batch},)"
        )
    if bool(((pos < -seq_len) | (pos >= seq_len)).any()):
        raise ValueError(f"metric.position has entries out of range for prompts of {seq_len} positions")
    return pos % seq_len


def logits_at(logits: torch.Tensor, pos) -> torch.Tensor:
    """``logits (batch, pos, vocab)`` at ``pos`` (an int, or one position per example ``(batch,)``):
    ``(batch, vocab)``."""
    if isinstance(pos, int):
        return logits[:, pos]
    rows = torch.arange(logits.shape[0], device=logits.device)
    # as int64: a uint8 (or bool) tensor used as an index would be a mask, not positions
    return logits[rows, torch.as_tensor(pos, device=logits.device).long()]


def metric_on(metric, logits: torch.Tensor, batch: int) -> torch.Tensor:
    """``metric(logits)`` on the first run it reads, checked by :func:`check_metric_output`; an error raised inside
    the metric gets a note saying what it was given and what it must return (a user's function is most often
    written for another layout, e.g. logits at every position)."""
    try:
        values = metric(logits)
    except Exception as e:
        e.add_note(
            f"pypattern called metric={_metric_name(metric)} with logits of shape {tuple(logits.shape)} "
            f"(batch {batch} x vocab, at the metric's position: the last one for a plain function); it must map "
            f"logits (..., batch, vocab) to per-example values (..., batch)"
        )
        raise
    return check_metric_output(values, batch)


def _metric_name(metric) -> str:
    return getattr(metric, "__qualname__", None) or type(metric).__name__


def result_name(metric) -> str:
    """The name a result records for ``metric``: a :class:`Metric`'s ``name`` (``"logit_diff"``), a plain
    function's own name (``"my_metric"``, ``"<lambda>"``), else its class's name (a callable object's)."""
    name = getattr(metric, "name", None)
    if isinstance(name, str):
        return name
    name = getattr(metric, "__name__", None)
    return name if isinstance(name, str) else type(metric).__name__


def check_metric_output(values, batch: int) -> torch.Tensor:
    """Enforce the metric contract on the clean run: one value per example, a tensor of shape ``(batch,)``.

    A metric that returns a batch mean (a scalar) would make every attribution estimate ``1/batch`` of its
    size, so it is refused here for exact and attribution patching alike. Returns ``values``."""
    if not isinstance(values, torch.Tensor):
        raise TypeError(
            f"metric returned {type(values).__name__}; it must return a tensor of per-example values "
            f"of shape ({batch},) (logits (..., batch, vocab) -> (..., batch))"
        )
    if values.is_complex():
        raise ValueError(
            f"metric returned complex values ({values.dtype}); it must map logits (..., batch, vocab) to real "
            f"per-example values (..., batch)"
        )
    if tuple(values.shape) != (batch,):
        raise ValueError(
            f"metric returned shape {tuple(values.shape)} on the clean logits ({batch}, vocab); expected "
            f"per-example values of shape ({batch},) (logits (..., batch, vocab) -> (..., batch)), "
            "not a batch mean or sum"
        )
    bad = ~torch.isfinite(values.detach())
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        if len(rows) == batch:  # nothing left to measure
            raise ValueError(
                f"metric returned {values.detach()[rows[0]].item()} for example {rows[0]}"
                f"{f' (and {len(rows) - 1} more)' if len(rows) > 1 else ''} on the clean run: every example; give a "
                "metric that is finite on the unpatched model"
            )
        warn_nonfinite_examples(values, "the clean run")
    return values


def name_examples(rows: list[int]) -> str:
    """``"example 3"`` or ``"examples 0, 3, 5"`` (the first ten, then how many more)."""
    if len(rows) == 1:
        return f"example {rows[0]}"
    more = f" and {len(rows) - 10} more" if len(rows) > 10 else ""
    return f"examples {', '.join(str(r) for r in rows[:10])}{more}"


def warn_nonfinite_examples(values: torch.Tensor, run: str) -> None:
    """Warn, naming them, of the examples whose metric ``values (batch,)`` on ``run`` (an unpatched run: "the
    clean run", "the corrupted run") is not finite: they are left out of every mean over examples. The warning
    points at the first line outside pypattern on the stack (the user's call)."""
    from ..sampling.diagnostics import user_stacklevel

    v = values.detach()
    rows = (~torch.isfinite(v)).nonzero().flatten().tolist()
    if not rows:
        return
    one = len(rows) == 1
    seen = sorted({str(x) for x in v[rows].tolist()})
    warnings.warn(
        f"metric returned {' or '.join(seen)} for {name_examples(rows)} on {run}: "
        f"{'that example is' if one else 'those examples are'} left out of every mean over examples "
        "(PatchResult's means, errors and intervals; edge scores; faithfulness, pruning curves and ACDC), and "
        f"{'its' if one else 'their'} own results are not meaningful; the other examples are measured as usual",
        RuntimeWarning,
        stacklevel=user_stacklevel(),
    )


def logit_diff_is_zero(metric) -> bool:
    """Whether ``metric`` is a :class:`LogitDiff` whose answer and wrong tokens are the same for every example (the
    same ids, or several ids in the same proportions): it is then 0 on every run, whatever is patched. Ids that
    are not valid are left to the metric's own checks (False here)."""
    if not isinstance(metric, LogitDiff) or type(metric).__call__ is not LogitDiff.__call__:
        return False
    ids = []
    for t in (metric.answer, metric.wrong):
        if not isinstance(t, torch.Tensor) or t.is_meta or t.dtype == torch.bool:
            return False  # not integer ids: refused where the metric reads them
        if t.is_floating_point() or t.is_complex():
            return False
        t = t.reshape(1, 1) if t.dim() == 0 else (t[:, None] if t.dim() == 1 else t)
        if t.dim() != 2 or t.numel() == 0:
            return False
        ids.append(t.detach().cpu().long())
    a, w = ids
    if a.shape[0] != w.shape[0]:  # one id (or row) for every example against per-example ids
        if a.shape[0] == 1:
            a = a.expand(w.shape[0], -1)
        elif w.shape[0] == 1:
            w = w.expand(a.shape[0], -1)
        else:
            return False
    if a.shape[1] == w.shape[1]:
        return torch.equal(a.sort(1).values, w.sort(1).values)
    u = torch.unique(torch.cat([a.flatten(), w.flatten()]))
    if a.shape[0] * max(a.shape[1], w.shape[1]) * u.numel() > 10**7:
        return False  # too large to compare cheaply: left unchecked
    ca, cw = (a[..., None] == u).sum(1), (w[..., None] == u).sum(1)  # (batch, ids): each id's count
    return bool((ca * w.shape[1] == cw * a.shape[1]).all())


def same_prompts(clean, other) -> bool:
    """Whether ``other`` holds exactly the prompts of ``clean`` (token tensors of one shape with values; False
    otherwise: prompts that are not valid are left to the caller's checks)."""
    return (
        isinstance(clean, torch.Tensor)
        and isinstance(other, torch.Tensor)
        and not (clean.is_meta or other.is_meta)
        and clean.shape == other.shape
        and torch.equal(clean.detach().cpu(), other.detach().cpu())
    )


def one_prompt(*batches) -> bool:
    """Whether the rows of the token tensors ``batches`` ``(batch, pos)`` (of one length) are all the same prompt:
    then a mean over them is each of them, and a mean ablation replaces an activation by itself."""
    if any(isinstance(b, torch.Tensor) and b.is_meta for b in batches):
        return False  # no values: refused by the caller's checks
    rows = [b.detach().cpu() for b in batches if isinstance(b, torch.Tensor)]
    if not rows or any(r.dim() != 2 or r.shape[1] != rows[0].shape[1] or r.shape[0] == 0 for r in rows):
        return False
    t = torch.cat(rows)
    return bool((t == t[:1]).all())


def no_op_causes(
    metric,
    *,
    same: bool = False,
    mean_of_one: int | None = None,
    mean_hint: str = "",
    no_noise: bool = False,
) -> list[str]:
    """Why every effect of a patching call is 0 whatever the model (each cause a clause naming it and its fix):
    ``same``, the corrupted prompts equal the clean ones; ``mean_of_one``, a mean ablation averages that many
    rows that are all the clean prompt (``mean_hint`` says what to give instead); ``no_noise``, a Gaussian-noise
    corruption of standard deviation 0; and a :class:`LogitDiff` whose answer and wrong tokens are the same
    (:func:`logit_diff_is_zero`)."""
    causes = []
    if same:
        causes.append(
            "the corrupted prompts equal the clean ones, so every patched activation is the one it replaces (the "
            "clean and corrupted prompts leave the metric unchanged); give corrupted prompts that differ"
        )
    if no_noise:
        causes.append(
            "GaussianNoise has standard deviation 0 (std=0 or std_multiplier=0), so the corrupted run is the clean "
            "one; give a positive std or std_multiplier"
        )
    if mean_of_one is not None:
        over = "one prompt" if mean_of_one == 1 else f"{mean_of_one} copies of one prompt"
        causes.append(
            f"the mean ablation averages over {over}, the clean prompt itself, so every ablated activation is the "
            f"one it replaces (the ablation leaves the metric unchanged); give a batch of different prompts{mean_hint}"
        )
    if logit_diff_is_zero(metric):
        causes.append(
            "LogitDiff's answer and wrong tokens are the same for every example, so the metric is 0 on every run; "
            "give wrong tokens that differ from the answers"
        )
    return causes


def warn_no_op(call: str, causes: list[str], what: str) -> None:
    """One warning for the call ``call`` (e.g. ``"edge_attribution"``) when ``causes`` (:func:`no_op_causes`) is
    not empty: every ``what`` (``"effect"``, ``"edge score"``) it returns is 0, up to rounding, and says nothing
    about the model. The warning points at the first line outside pypattern on the stack (the user's call)."""
    if not causes:
        return
    from ..sampling.diagnostics import user_stacklevel

    warnings.warn(
        f"{call}: every {what} is 0 (up to rounding) whatever the model: {'; and '.join(causes)}",
        RuntimeWarning,
        stacklevel=user_stacklevel(),
    )


def finite_examples(*runs: torch.Tensor | None) -> torch.Tensor:
    """``(batch,)`` bool on the CPU: the examples whose metric is finite on every one of ``runs`` (each the metric
    of an unpatched run ``(batch,)``, or None); means over examples are taken over these."""
    keep = None
    for m in runs:
        if m is None:
            continue
        ok = torch.isfinite(m.detach()).cpu()
        keep = ok if keep is None else keep & ok
    return keep


def check_metric_on_stacks(
    metric, clean_logits: torch.Tensor, values: torch.Tensor, *, per_example: bool = False
) -> None:
    """The exact engines call the metric on stacks of runs ``(cells, batch, vocab)``: check, on the clean logits
    ``(batch, vocab)`` stacked with another run (the examples reversed, the vocabulary shifted) and with the clean
    run with example 0's logits changed, that it returns ``(3, batch)``, that each run's values are its own
    (``values``: the metric of the clean logits alone), not coupled across the stack (a mean over every axis, say),
    and, with ``per_example`` (the gradient methods, which differentiate the sum over examples), that each
    example's value is its own (a change of example 0 leaves the others alone). Exact patching reads whole runs:
    a metric relating a run's examples (centred over the batch, say) is allowed there."""
    B = clean_logits.shape[0]
    other = torch.roll(clean_logits.flip(0), 1, -1)  # another run: other values in every example
    # a third run: the clean logits with example 0's changed, which must leave every other example's value alone
    one = clean_logits.clone()
    one[0] = torch.roll(one[0], 1, -1)
    try:
        stacked = metric(torch.stack([clean_logits, other, one]))
    except Exception as e:
        raise ValueError(
            f"metric fails on a stack of runs (3, {B}, vocab) ({type(e).__name__}: {e}); it must map logits "
            f"(..., batch, vocab) to (..., batch): index the last two axes (logits[..., i, token]), not the first"
        ) from e
    if not isinstance(stacked, torch.Tensor) or tuple(stacked.shape) != (3, B):
        got = tuple(stacked.shape) if isinstance(stacked, torch.Tensor) else type(stacked).__name__
        raise ValueError(
            f"metric returned {got} on a stack of runs (3, {B}, vocab); it must map logits (..., batch, vocab) to "
            f"(..., batch)"
        )
    a, b = stacked[0].detach().double(), values.detach().double()
    finite = b[torch.isfinite(b)]  # a NaN or inf value for some example does not set the tolerance
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    if not torch.allclose(a, b, rtol=1e-4, atol=1e-6 * (1.0 + scale), equal_nan=True):
        raise ValueError(
            "metric gives other values for the same logits when they are stacked with another run's (it couples "
            "the runs, e.g. a mean over every axis); it must compute each run and example from its own logits"
        )
    c = stacked[2, 1:].detach().double()
    if (
        per_example
        and B > 1
        and not torch.allclose(c, b[1:], rtol=1e-4, atol=1e-6 * (1.0 + scale), equal_nan=True)
    ):
        raise ValueError(
            "metric gives other values for an example when another example's logits change (it couples the "
            "examples, e.g. subtracts the batch mean); it must compute each example from its own logits (a "
            "gradient method would see the coupling's sum, not the examples)"
        )


def bind_metric(metric, clean_logits: torch.Tensor) -> None:
    """Hand the clean run's logits at the metric position ``(batch, vocab)`` to ``metric.bind`` when it has one
    (a :class:`Metric`; a plain callable ``logits (..., batch, vocab) -> (..., batch)`` has nothing to bind).

    Raises
    ------
    TypeError
        When ``metric`` is not callable."""
    if not callable(metric):
        raise TypeError(
            f"metric must be a Metric (LogitDiff, Prob, LogProb, KL) or a callable logits (..., batch, vocab) -> "
            f"(..., batch), got {type(metric).__name__}"
        )
    bind = getattr(metric, "bind", None)
    if callable(bind):
        bind(clean_logits)
