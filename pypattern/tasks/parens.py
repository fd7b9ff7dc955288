"""Parentheses balancing with several algorithms that all reach perfect training accuracy.

Sequences are ``[BOS, p_1 .. p_n, QUERY]`` with ``p_i`` in ``{"(", ")"}``; the model answers ``TRUE`` or
``FALSE`` at ``QUERY``. The *training* distribution holds balanced strings (label True) and strings with unequal
counts of "(" and ")" (label False). On it, every rule "equal counts and C" is 100% correct when the condition C
holds for all balanced strings. :data:`ALGORITHMS` lists the plausible ones:

- ``"equal_counts"``: True iff #"(" == #")";
- ``"equal_counts_first_open"``: equal counts and the string starts with "(";
- ``"equal_counts_last_close"``: equal counts and the string ends with ")";
- ``"equal_counts_first_open_last_close"``: equal counts, starts with "(" and ends with ")" (every balanced
  string does both; trained one-layer models often implement this one);
- ``"balanced"``: equal counts and every prefix has depth >= 0 (the intended rule).

They disagree only on strings with equal counts and a negative prefix depth, which training never shows. The
held-out probes (:meth:`ParenthesesTask.probes`) are all such strings, split by first and last token into four
cells (``"open_first_close_last"``, ``"open_first_open_last"``, ``"close_first_close_last"``,
``"close_first_open_last"``); the five algorithms answer (T,T,T,T), (T,T,F,F), (T,F,T,F), (T,F,F,F) and
(F,F,F,F) on them, so every pair differs on at least one cell. :func:`algorithm_scores` measures which
algorithm a trained model implements, and calls it ``"other"`` when it implements none of them.
"""

from __future__ import annotations

import itertools

import torch

from .._checks import is_count
from .base import IGNORE, Task, TaskBatch, _logits, count_arg, fraction_arg, generator

__all__ = [
    "ParenthesesTask",
    "algorithm_scores",
    "ALGORITHMS",
    "PROBE_CELLS",
    "IDENTIFY_THRESHOLD",
    "FIT_THRESHOLD",
]

OPEN, CLOSE, BOS, QUERY, FALSE, TRUE = range(6)


def _equal_counts(s: torch.Tensor) -> torch.Tensor:
    return (s == OPEN).sum(-1) == (s == CLOSE).sum(-1)


def _min_depth(s: torch.Tensor) -> torch.Tensor:
    return torch.cumsum((s == OPEN).long() - (s == CLOSE).long(), -1).min(-1).values


ALGORITHMS = {
    "equal_counts": _equal_counts,
    "equal_counts_first_open": lambda s: _equal_counts(s) & (s[..., 0] == OPEN),
    "equal_counts_last_close": lambda s: _equal_counts(s) & (s[..., -1] == CLOSE),
    "equal_counts_first_open_last_close": lambda s: (
        _equal_counts(s) & (s[..., 0] == OPEN) & (s[..., -1] == CLOSE)
    ),
    "balanced": lambda s: _equal_counts(s) & (_min_depth(s) >= 0),
}

#: The four cells of held-out probes (equal counts, negative prefix depth), by first and last token.
PROBE_CELLS = (
    "open_first_close_last",
    "open_first_open_last",
    "close_first_close_last",
    "close_first_open_last",
)

#: Minimum agreement with an algorithm (the mean over the four probe cells) for :func:`algorithm_scores` to name
#: it as the one a model implements ...
IDENTIFY_THRESHOLD = 0.9
#: ... and minimum training accuracy (below it the model fits no algorithm: ``"other"``).
FIT_THRESHOLD = 0.98


class ParenthesesTask(Task):
    """Parentheses balancing as classification at the final (``QUERY``) position.

    Parameters
    ----------
    length : int
        Number of parentheses (even); sequences have ``length + 2`` tokens.
    p_balanced : float
        Fraction of training samples that are balanced.
    """

    name = "parentheses"
    d_vocab = 6
    default_lr = 1e-3
    default_batch_size = 128

    def __init__(self, length: int = 12, p_balanced: float = 0.5) -> None:
        if not is_count(length) or length < 4 or length % 2 or length > 20:
            raise ValueError(f"length={length!r} is not valid; give an even number in 4..20")
        length, p_balanced = int(length), fraction_arg(p_balanced, "p_balanced")
        self.length, self.n_ctx, self.p_balanced = length, length + 2, p_balanced
        allstr = torch.tensor(list(itertools.product([OPEN, CLOSE], repeat=length)), dtype=torch.long)
        eq, md = _equal_counts(allstr), _min_depth(allstr)
        self._sets = {
            "balanced": allstr[eq & (md >= 0)],
            "unequal": allstr[~eq],
            "open_first_negative": allstr[eq & (md < 0) & (allstr[:, 0] == OPEN)],
            "close_first": allstr[eq & (allstr[:, 0] == CLOSE)],
        }

    def _batch(self, s: torch.Tensor, label: torch.Tensor, kind: torch.Tensor) -> TaskBatch:
        n = s.shape[0]
        tokens = torch.cat([torch.full((n, 1), BOS), s, torch.full((n, 1), QUERY)], 1)
        targets = torch.full_like(tokens, IGNORE)
        targets[:, -1] = torch.where(label, TRUE, FALSE)
        return TaskBatch(tokens, targets, {"label": label, "kind": kind})

    def sample(self, num_samples: int, seed: int | None = None) -> TaskBatch:
        """Training distribution: balanced strings and strings with unequal counts (``extra["kind"]`` 1 / 0)."""
        num_samples = count_arg(num_samples, "num_samples")
        g = generator(seed)
        bal = torch.rand(num_samples, generator=g) < self.p_balanced
        a, b = self._sets["balanced"], self._sets["unequal"]
        ia = torch.randint(0, len(a), (num_samples,), generator=g)
        ib = torch.randint(0, len(b), (num_samples,), generator=g)
        s = torch.where(bal[:, None], a[ia], b[ib])
        return self._batch(s, bal, bal.long())

    def probes(self, kind: str = "all") -> TaskBatch:
        """Held-out strings with equal counts and a negative prefix depth (never in training).

        ``kind``: ``"all"``, ``"open_first_negative"`` (starts with "("), ``"close_first"`` or one of the four
        :data:`PROBE_CELLS`. Targets hold the *balanced* label (False); ``extra["kind"]`` is 2 for open-first,
        3 for close-first; ``extra["cell"]`` is the index of the string's cell in :data:`PROBE_CELLS`.
        """
        groups = {"all": PROBE_CELLS, "open_first_negative": PROBE_CELLS[:2], "close_first": PROBE_CELLS[2:]}
        groups.update({c: (c,) for c in PROBE_CELLS})
        if kind not in groups:
            raise ValueError(f"kind={kind!r} is not valid; choose one of {sorted(groups)}")
        s = torch.cat([self._sets["open_first_negative"], self._sets["close_first"]])
        cell = 2 * (s[:, 0] == CLOSE).long() + (s[:, -1] == OPEN).long()
        keep = torch.isin(cell, torch.tensor([PROBE_CELLS.index(c) for c in groups[kind]]))
        s, cell = s[keep], cell[keep]
        out = self._batch(s, torch.zeros(len(s), dtype=torch.bool), torch.where(cell < 2, 2, 3))
        out.extra["cell"] = cell
        return out

    def model_config(self, **overrides):
        from ..models.transformer import TransformerConfig

        cfg = dict(n_layers=1, d_model=64, n_heads=4, d_mlp=128, d_vocab=self.d_vocab, n_ctx=self.n_ctx)
        cfg.update(overrides)
        return TransformerConfig(**cfg)

    @torch.no_grad()
    def predict(self, model, batch: TaskBatch) -> torch.Tensor:
        """The model's answer (True/False) at the query position: ``(num_samples,)`` bool."""
        logits = _logits(model, batch.tokens)[:, -1]
        return logits[:, TRUE] > logits[:, FALSE]


@torch.no_grad()
def algorithm_scores(
    model,
    task: ParenthesesTask,
    num_train: int = 2000,
    seed: int = 12345,
    threshold: float = IDENTIFY_THRESHOLD,
    fit_threshold: float = FIT_THRESHOLD,
) -> dict:
    """Agreement of the model with each algorithm in :data:`ALGORITHMS`, and which one it implements.

    Parameters
    ----------
    model : callable
        A model trained on ``task`` (tokens -> logits).
    task : ParenthesesTask
        The task whose probes and training distribution are scored.
    num_train : int
        Fresh training samples, drawn with ``seed`` (at least 1).
    seed : int
        Seed of those samples.
    threshold, fit_threshold : float
        In ``[0, 1]``: the agreement and training accuracy that name an algorithm (:data:`IDENTIFY_THRESHOLD`,
        :data:`FIT_THRESHOLD`).

    Returns
    -------
    dict
        ``"train/<alg>"`` (agreement on fresh training-distribution samples, where every algorithm is correct),
        ``"probe/<alg>"`` (agreement on all held-out probes), ``"probe_<kind>/<alg>"`` for
        ``"open_first_negative"``, ``"close_first"`` and each of :data:`PROBE_CELLS`, ``"cells/<alg>"`` (the mean of
        the four cells' agreements: every cell counts equally, however many strings it holds), ``"best"`` (the
        algorithm with the highest ``cells/`` agreement) and ``"learned"``: ``"best"`` if the model's training
        accuracy is at least ``fit_threshold`` and its ``cells/`` agreement with ``"best"`` at least ``threshold``,
        else ``"other"`` (it does not fit the training data, or fits it with none of the listed algorithms).

    Raises
    ------
    TypeError
        ``task`` is not a :class:`ParenthesesTask` or ``model`` is not callable.
    ValueError
        ``num_train``, ``threshold`` or ``fit_threshold`` out of range, naming it.
    """
    if not isinstance(task, ParenthesesTask):
        raise TypeError(f"task is a {type(task).__name__}; give a ParenthesesTask")
    if not callable(model):
        raise TypeError(f"model is a {type(model).__name__}; give a model trained on the task")
    num_train = count_arg(num_train, "num_train", 1)
    threshold, fit_threshold = (
        fraction_arg(threshold, "threshold"),
        fraction_arg(fit_threshold, "fit_threshold"),
    )
    out: dict = {}
    train = task.sample(num_train, seed=seed)
    pred = task.predict(model, train)
    strings = train.tokens[:, 1:-1]
    for name, alg in ALGORITHMS.items():
        out[f"train/{name}"] = float((pred == alg(strings)).float().mean())
    probes = task.probes("all")
    pp = task.predict(model, probes)
    ps = probes.tokens[:, 1:-1]
    cell = probes.extra["cell"]
    for name, alg in ALGORITHMS.items():
        agree = (pp == alg(ps)).float()
        out[f"probe/{name}"] = float(agree.mean())
        out[f"probe_open_first_negative/{name}"] = float(agree[cell < 2].mean())
        out[f"probe_close_first/{name}"] = float(agree[cell >= 2].mean())
        per_cell = [float(agree[cell == i].mean()) for i in range(len(PROBE_CELLS))]  # NaN: empty (length 4)
        for c, v in zip(PROBE_CELLS, per_cell):
            out[f"probe_{c}/{name}"] = v
        present = [v for v in per_cell if v == v]
        out[f"cells/{name}"] = sum(present) / len(present)
    best = max(ALGORITHMS, key=lambda a: out[f"cells/{a}"])
    out["best"] = best
    fits = out[f"train/{best}"] >= fit_threshold and out[f"cells/{best}"] >= threshold
    out["learned"] = best if fits else "other"
    return out
