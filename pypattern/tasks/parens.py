"""Parentheses balancing with several algorithms that all reach perfect training accuracy.

Sequences are ``[BOS, p_1 .. p_n, QUERY]`` with ``p_i`` in ``{"(", ")"}``; the model answers ``TRUE`` or
``FALSE`` at ``QUERY``. The *training* distribution holds balanced strings (label True) and strings with unequal
counts of "(" and ")" (label False). On it, these algorithms are all 100% correct:

- ``"equal_counts"``: True iff #"(" == #")";
- ``"equal_counts_first_open"``: equal counts and the string starts with "(";
- ``"balanced"``: equal counts and every prefix has depth >= 0 (the intended rule).

They disagree only on strings with equal counts and a negative prefix depth, which training never shows. The
held-out probe sets (:meth:`ParenthesesTask.probes`) separate them: ``"open_first_negative"`` (starts with "(",
dips below 0 later: True, True, False) and ``"close_first"`` (starts with ")": True, False, False).
:func:`algorithm_scores` measures which algorithm a trained model implements.
"""

from __future__ import annotations

import itertools

import torch

from .base import IGNORE, Task, TaskBatch, _gen

__all__ = ["ParenthesesTask", "algorithm_scores", "ALGORITHMS"]

OPEN, CLOSE, BOS, QUERY, FALSE, TRUE = range(6)


def _equal_counts(s: torch.Tensor) -> torch.Tensor:
    return (s == OPEN).sum(-1) == (s == CLOSE).sum(-1)


def _min_depth(s: torch.Tensor) -> torch.Tensor:
    return torch.cumsum((s == OPEN).long() - (s == CLOSE).long(), -1).min(-1).values


ALGORITHMS = {
    "equal_counts": _equal_counts,
    "equal_counts_first_open": lambda s: _equal_counts(s) & (s[..., 0] == OPEN),
    "balanced": lambda s: _equal_counts(s) & (_min_depth(s) >= 0),
}


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
        if length < 4 or length % 2 or length > 20:
            raise ValueError(f"length={length} is not valid; give an even number in 4..20")
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
        g = _gen(seed)
        bal = torch.rand(num_samples, generator=g) < self.p_balanced
        a, b = self._sets["balanced"], self._sets["unequal"]
        ia = torch.randint(0, len(a), (num_samples,), generator=g)
        ib = torch.randint(0, len(b), (num_samples,), generator=g)
        s = torch.where(bal[:, None], a[ia], b[ib])
        return self._batch(s, bal, bal.long())

    def probes(self, kind: str = "all") -> TaskBatch:
        """Held-out strings with equal counts and a negative prefix depth (never in training).

        ``kind``: ``"open_first_negative"``, ``"close_first"`` or ``"all"``. Targets hold the *balanced* label
        (False); ``extra["kind"]`` is 2 for open-first, 3 for close-first.
        """
        kinds = ["open_first_negative", "close_first"] if kind == "all" else [kind]
        if any(k not in ("open_first_negative", "close_first") for k in kinds):
            raise ValueError(
                f"kind={kind!r} is not valid; choose 'open_first_negative', 'close_first' or 'all'"
            )
        s = torch.cat([self._sets[k] for k in kinds])
        kid = torch.cat(
            [torch.full((len(self._sets[k]),), 2 if k == "open_first_negative" else 3) for k in kinds]
        )
        return self._batch(s, torch.zeros(len(s), dtype=torch.bool), kid)

    def model_config(self, **overrides):
        from ..models.transformer import TransformerConfig

        cfg = dict(n_layers=1, d_model=64, n_heads=4, d_mlp=128, d_vocab=self.d_vocab, n_ctx=self.n_ctx)
        cfg.update(overrides)
        return TransformerConfig(**cfg)

    @torch.no_grad()
    def predict(self, model, batch: TaskBatch) -> torch.Tensor:
        """The model's answer (True/False) at the query position: ``(num_samples,)`` bool."""
        logits = model(batch.tokens)[:, -1]
        return logits[:, TRUE] > logits[:, FALSE]


@torch.no_grad()
def algorithm_scores(
    model, task: ParenthesesTask, num_train: int = 2000, seed: int = 12345
) -> dict[str, float]:
    """Agreement of the model with each algorithm in :data:`ALGORITHMS`.

    Returns a dict with ``"train/<alg>"`` (agreement on fresh training-distribution samples, where every
    algorithm is correct), ``"probe/<alg>"`` (agreement on all held-out probes), ``"probe_<kind>/<alg>"`` per
    probe set, and ``"best"``: the name of the algorithm with the highest probe agreement.
    """
    out: dict = {}
    train = task.sample(num_train, seed=seed)
    pred = task.predict(model, train)
    strings = train.tokens[:, 1:-1]
    for name, alg in ALGORITHMS.items():
        out[f"train/{name}"] = float((pred == alg(strings)).float().mean())
    probes = task.probes("all")
    pp = task.predict(model, probes)
    ps = probes.tokens[:, 1:-1]
    for name, alg in ALGORITHMS.items():
        out[f"probe/{name}"] = float((pp == alg(ps)).float().mean())
        for kid, kname in ((2, "open_first_negative"), (3, "close_first")):
            m = probes.extra["kind"] == kid
            out[f"probe_{kname}/{name}"] = float((pp[m] == alg(ps[m])).float().mean())
    out["best"] = max(ALGORITHMS, key=lambda a: out[f"probe/{a}"])
    return out
