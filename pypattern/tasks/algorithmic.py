"""Algorithmic pipeline tasks: routines on sequences of 10 tokens from a vocabulary of 11, and algorithms that chain
2-4 routines (the toy case study of interpretive equivalence, Sun & Toneva).

Routines
--------
Each routine maps a sequence ``x = (x_0, ..., x_9)``, ``x_i`` in ``{0, ..., 10}``, to a sequence ``y`` of the same
length and vocabulary (indices and arithmetic as written; ``mod`` is modulo 11 and indices wrap modulo 10):

- ``"sort"``: ``y`` = ``x`` sorted ascending.
- ``"diff_next"``: ``y_i = (x_{i+1} - x_i) mod 11`` (``x_10`` means ``x_0``).
- ``"sum_next"``: ``y_i = (x_i + x_{i+1}) mod 11`` (``x_10`` means ``x_0``).
- ``"add_index"``: ``y_i = (x_i + i) mod 11``.
- ``"count_smaller"``: ``y_i = #{j : x_j < x_i}`` (in ``0..9``).
- ``"interleave_reverse"``: ``y = (x_0, x_9, x_1, x_8, x_2, x_7, x_3, x_6, x_4, x_5)``: ``y_{2j} = x_j``,
  ``y_{2j+1} = x_{9-j}``.
- ``"negate_odd"``: ``y_i = x_i`` at even ``i``, ``(11 - x_i) mod 11`` at odd ``i`` (parity alternation).

:data:`ALGORITHMS` chains them; several algorithms share routines.

Model format
------------
pypattern's :class:`~pypattern.models.Transformer` is causal, so a routine is posed as *read, then write*: the
sequence is ``[x_0 .. x_9, Q, Q, ..., Q]`` (20 positions; ``Q = 11`` is a query token, ``d_vocab = 12``) and the
model must output ``y_i`` at position ``10 + i``. Every output position sees the whole input, so routines that
need all of it (sort, count of smaller elements) are within reach of a causal model, in one forward pass (no
autoregressive decoding). Positions 0..9 are not scored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .base import IGNORE, Task, TaskBatch, _logits, count_arg, fraction_arg, generator

__all__ = [
    "SEQ_LEN",
    "VOCAB",
    "QUERY",
    "ROUTINES",
    "ALGORITHMS",
    "run_routine",
    "run_algorithm",
    "stage_inputs",
    "RoutineTask",
    "encode",
    "decode",
]

SEQ_LEN = 10
VOCAB = 11
QUERY = VOCAB  # the query token at the output positions


def _sort(x: torch.Tensor) -> torch.Tensor:
    return x.sort(-1).values


def _diff_next(x: torch.Tensor) -> torch.Tensor:
    return (x.roll(-1, -1) - x) % VOCAB


def _sum_next(x: torch.Tensor) -> torch.Tensor:
    return (x + x.roll(-1, -1)) % VOCAB


def _add_index(x: torch.Tensor) -> torch.Tensor:
    return (x + torch.arange(x.shape[-1], device=x.device)) % VOCAB


def _count_smaller(x: torch.Tensor) -> torch.Tensor:
    return (x[..., None, :] < x[..., :, None]).sum(-1)


_INTERLEAVE = [j for pair in zip(range(5), range(9, 4, -1)) for j in pair]  # 0, 9, 1, 8, 2, 7, 3, 6, 4, 5


def _interleave_reverse(x: torch.Tensor) -> torch.Tensor:
    return x[..., _INTERLEAVE]


def _negate_odd(x: torch.Tensor) -> torch.Tensor:
    odd = torch.arange(x.shape[-1], device=x.device) % 2 == 1
    return torch.where(odd, (VOCAB - x) % VOCAB, x)


ROUTINES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sort": _sort,
    "diff_next": _diff_next,
    "sum_next": _sum_next,
    "add_index": _add_index,
    "count_smaller": _count_smaller,
    "interleave_reverse": _interleave_reverse,
    "negate_odd": _negate_odd,
}
"""Routine name -> function ``LongTensor (..., 10)`` -> ``LongTensor (..., 10)`` (see the module docstring)."""

ALGORITHMS: dict[str, tuple[str, ...]] = {
    "sort_diff": ("sort", "diff_next"),
    "sort_sum": ("sort", "sum_next"),
    "index_count": ("add_index", "count_smaller"),
    "index_interleave_diff": ("add_index", "interleave_reverse", "diff_next"),
    "negate_sum_count": ("negate_odd", "sum_next", "count_smaller"),
    "interleave_index_sort_diff": ("interleave_reverse", "add_index", "sort", "diff_next"),
}
"""Algorithm name -> its routines in order (2-4 each; ``sort``, ``diff_next``, ``sum_next``, ``add_index``,
``count_smaller`` and ``interleave_reverse`` each appear in two algorithms)."""


def _check_x(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor) or x.dtype != torch.long or x.shape[-1:] != (SEQ_LEN,):
        raise ValueError(
            f"{name} must be a LongTensor of shape (..., {SEQ_LEN}), got "
            f"{getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}"
        )
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= VOCAB):
        raise ValueError(f"{name} must hold tokens in 0..{VOCAB - 1}, got {int(x.min())}..{int(x.max())}")


def run_routine(name: str, x: torch.Tensor) -> torch.Tensor:
    """The routine ``name`` on ``x (..., 10)``."""
    if name not in ROUTINES:
        raise ValueError(f"routine={name!r} is not known; choose one of {sorted(ROUTINES)}")
    _check_x(x)
    return ROUTINES[name](x)


def run_algorithm(name_or_routines: str | Sequence[str], x: torch.Tensor) -> list[torch.Tensor]:
    """Every stage's input and the final output: ``[x, y_1, ..., y_R]`` for an algorithm of ``R`` routines (a key
    of :data:`ALGORITHMS`, or a sequence of routine names)."""
    if isinstance(name_or_routines, str) and name_or_routines not in ALGORITHMS:
        raise ValueError(f"algorithm={name_or_routines!r} is not known; choose one of {sorted(ALGORITHMS)}")
    routines = ALGORITHMS[name_or_routines] if isinstance(name_or_routines, str) else name_or_routines
    _check_x(x)
    out = [x]
    for r in routines:
        out.append(run_routine(r, out[-1]))
    return out


def stage_inputs(routine: str, x: torch.Tensor) -> list[torch.Tensor]:
    """The inputs ``routine`` receives inside every algorithm of :data:`ALGORITHMS` that uses it, when the
    algorithm is run on ``x``: one tensor per occurrence."""
    if not isinstance(routine, str) or routine not in ROUTINES:
        raise ValueError(f"routine={routine!r} is not known; choose one of {sorted(ROUTINES)}")
    out = []
    for routines in ALGORITHMS.values():
        for i, r in enumerate(routines):
            if r == routine:
                out.append(run_algorithm(routines[:i], x)[-1])
    return out


def encode(x: torch.Tensor) -> torch.Tensor:
    """``(n, 10)`` -> the model's tokens ``(n, 20)``: the input, then 10 query tokens."""
    _check_x(x)
    return torch.cat([x, torch.full_like(x, QUERY)], -1)


def decode(logits: torch.Tensor) -> torch.Tensor:
    """The model's answer ``(n, 10)``: the argmax over the routine's vocabulary (the query token excluded) at
    positions 10..19 of ``logits (n, 20, d_vocab)``."""
    if (
        not isinstance(logits, torch.Tensor)
        or logits.ndim != 3
        or logits.shape[1:2] != (2 * SEQ_LEN,)
        or (logits.shape[2] < VOCAB)
    ):
        raise ValueError(
            f"logits must be a tensor of shape (n, {2 * SEQ_LEN}, d_vocab >= {VOCAB}), got "
            f"{tuple(getattr(logits, 'shape', ()))}"
        )
    return logits[:, SEQ_LEN:, :VOCAB].argmax(-1)


class RoutineTask(Task):
    """One routine as a training task: ``[x, Q x 10]`` -> targets ``y`` at positions 10..19.

    Inputs are drawn half uniformly from ``{0..10}^10`` and half from what the routine receives inside the
    algorithms that use it (:func:`stage_inputs` of uniform inputs), so a chained model sees its in-pipeline
    distribution (sorted sequences, counts, ...) during training.

    Parameters
    ----------
    routine : str
        A key of :data:`ROUTINES`.
    pipeline_fraction : float
        Share of inputs drawn from the pipelines (0 to train on uniform inputs only).
    """

    d_vocab = VOCAB + 1
    n_ctx = 2 * SEQ_LEN
    default_batch_size = 128
    default_lr = 3e-3

    def __init__(self, routine: str, pipeline_fraction: float = 0.5) -> None:
        if not isinstance(routine, str) or routine not in ROUTINES:
            raise ValueError(f"routine={routine!r} is not known; choose one of {sorted(ROUTINES)}")
        pipeline_fraction = fraction_arg(pipeline_fraction, "pipeline_fraction")
        self.routine = routine
        self.name = f"routine_{routine}"
        self.pipeline_fraction = pipeline_fraction

    def inputs(self, num_samples: int, seed: int | None = None) -> torch.Tensor:
        """``(num_samples, 10)`` training inputs (see the class docstring)."""
        num_samples = count_arg(num_samples, "num_samples")
        g = generator(seed)
        x = torch.randint(0, VOCAB, (num_samples, SEQ_LEN), generator=g)
        if self.pipeline_fraction > 0:
            stages = stage_inputs(self.routine, x)
            stages = [s for s in stages if not torch.equal(s, x)]  # a first stage adds nothing
            if stages:
                pick = torch.rand(num_samples, generator=g) < self.pipeline_fraction
                which = torch.randint(0, len(stages), (num_samples,), generator=g)
                alt = torch.stack(stages)[which, torch.arange(num_samples)]
                x = torch.where(pick[:, None], alt, x)
        return x

    def sample(self, num_samples: int, seed: int | None = None) -> TaskBatch:
        x = self.inputs(num_samples, seed)
        y = run_routine(self.routine, x)
        targets = torch.cat([torch.full_like(x, IGNORE), y], -1)
        return TaskBatch(encode(x), targets, {"x": x, "y": y})

    def model_config(self, **overrides):
        from ..models.transformer import TransformerConfig

        kw = dict(
            n_layers=2, d_model=48, n_heads=4, d_mlp=4 * overrides.get("d_model", 48), d_vocab=self.d_vocab,
            n_ctx=self.n_ctx, act_fn="relu", seed=0,
        )  # fmt: skip
        kw.update(overrides)
        return TransformerConfig(**kw)

    @torch.no_grad()
    def sequence_accuracy(self, model, batch: TaskBatch) -> float:
        """Fraction of inputs whose 10 outputs are all right."""
        return float((decode(_logits(model, batch.tokens)) == batch.extra["y"]).all(-1).float().mean())
