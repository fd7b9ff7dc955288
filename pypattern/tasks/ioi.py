"""An IOI-like task with clean/corrupted prompt pairs for activation patching.

Prompt ``[BOS, A, f, B, f, f, S]``: two distinct names ``A`` and ``B``, random filler tokens ``f`` and, last, the
subject ``S`` (``A`` or ``B``). The answer at the last position is the *other* name (the "indirect object").
The symmetric corruption replaces ``S`` by the other name, which swaps the answer: clean and corrupted prompts
have the same length, the same template and differ in one token, as best practice for patching asks.
"""

from __future__ import annotations

import numpy as np
import torch

from .._checks import is_count
from .base import IGNORE, Task, TaskBatch, count_arg, generator, offset_seed

__all__ = ["IOITask", "symmetric_pairs"]


class IOITask(Task):
    """Indirect-object-like name task (see the module docstring).

    Token ids: names ``0 .. n_names-1``, fillers ``n_names .. n_names+n_fillers-1``, then ``BOS``.
    ``extra``: ``answer``, ``wrong`` (the clean answer and the name that would be the answer after the
    corruption), ``subject_pos`` (the earlier mention of the subject: 1 when it is ``A``, else 3) and ``name_pos``
    (the mention of the indirect object, the answer: the other of 1 and 3), each ``(num_samples,)``.

    Parameters
    ----------
    n_names : int
        Number of name tokens (at least 2).
    n_fillers : int
        Number of filler tokens (at least 1).

    Raises
    ------
    ValueError
        A count that is not an int of at least that value, naming it.
    """

    name = "ioi"
    template = ("BOS", "A", "f", "B", "f", "f", "S")

    def __init__(self, n_names: int = 8, n_fillers: int = 8) -> None:
        n_names, n_fillers = count_arg(n_names, "n_names", 2), count_arg(n_fillers, "n_fillers", 1)
        self.n_names, self.n_fillers = n_names, n_fillers
        self.bos = n_names + n_fillers
        self.d_vocab = n_names + n_fillers + 1
        self.n_ctx = len(self.template)

    def sample(self, num_samples: int, seed: int | None = None) -> TaskBatch:
        n = count_arg(num_samples, "num_samples")
        g = generator(seed)
        a = torch.randint(0, self.n_names, (n,), generator=g)
        b = (a + torch.randint(1, self.n_names, (n,), generator=g)) % self.n_names
        subj_is_a = torch.rand(n, generator=g) < 0.5
        s = torch.where(subj_is_a, a, b)
        ans = torch.where(subj_is_a, b, a)
        f = self.n_names + torch.randint(0, self.n_fillers, (n, 3), generator=g)
        tokens = torch.stack([torch.full((n,), self.bos), a, f[:, 0], b, f[:, 1], f[:, 2], s], 1)
        targets = torch.full_like(tokens, IGNORE)
        targets[:, -1] = ans
        subject_pos = torch.where(subj_is_a, 1, 3)
        extra = {"answer": ans, "wrong": s, "subject_pos": subject_pos, "name_pos": 4 - subject_pos}
        return TaskBatch(tokens, targets, extra)

    def patching_pairs(self, num_samples: int, seed: int | None = 0, corruption: str = "subject"):
        """Clean and corrupted prompts for patching.

        Parameters
        ----------
        num_samples : int
            Prompt pairs.
        seed : int or None
            Draws the prompts (and, with ``"abc"``, the third names, from ``seed + 7919``).
        corruption : {"subject", "abc"}
            ``"subject"``: the final subject is swapped for the other name (symmetric token replacement; the
            answer flips). ``"abc"``: the *earlier* mention of the subject is replaced by a third name ``C``, so
            no name is duplicated (the IOI paper's "ABC" distribution): the information the model needs now
            sits at an earlier position, which makes the position-by-layer picture informative.

        Returns
        -------
        clean, corrupted : LongTensor ``(num_samples, 7)``
        answer, wrong : LongTensor ``(num_samples,)``
            The clean answer (indirect object) and the subject; ``logit_diff(answer, wrong)`` is positive on
            clean prompts and lower (negative for ``"subject"``) on corrupted ones for a trained model.
        """
        if corruption not in ("subject", "abc"):
            raise ValueError(f"corruption={corruption!r} is not valid; choose 'subject' or 'abc'")
        batch = self.sample(num_samples, seed)
        clean = batch.tokens
        corrupted = clean.clone()
        ans, subj = batch.extra["answer"], batch.extra["wrong"]
        if corruption == "subject":
            corrupted[:, -1] = ans
        else:
            if self.n_names < 3:
                raise ValueError("corruption='abc' needs n_names >= 3")
            g = generator(None if seed is None else offset_seed(seed, 7919))
            c = torch.randint(0, self.n_names - 2, (num_samples,), generator=g)
            lo, hi = torch.minimum(ans, subj), torch.maximum(ans, subj)
            c = c + (c >= lo).long()
            c = c + (c >= hi).long()
            first = torch.where(clean[:, 1] == subj, 1, 3)
            corrupted[torch.arange(num_samples), first] = c
        return clean, corrupted, ans, subj

    def model_config(self, **overrides):
        from ..models.transformer import TransformerConfig

        cfg = dict(n_layers=2, d_model=64, n_heads=4, d_mlp=128, d_vocab=self.d_vocab, n_ctx=self.n_ctx)
        cfg.update(overrides)
        return TransformerConfig(**cfg)


def symmetric_pairs(tokens: torch.Tensor, pairs, positions=None) -> torch.Tensor:
    """Corrupt ``tokens`` by symmetric token replacement.

    Parameters
    ----------
    tokens : LongTensor ``(batch, pos)``
    pairs : sequence of (int, int)
        Each pair ``(a, b)`` swaps ``a`` -> ``b`` and ``b`` -> ``a`` (e.g. two names of equal token length).
    positions : int, sequence of int or None
        Positions to corrupt; all positions when None.

    Returns
    -------
    LongTensor ``(batch, pos)``: the corrupted prompts (same length, same template).

    Raises
    ------
    ValueError
        ``tokens`` not an integer ``(batch, pos)`` tensor, a token in two pairs (``(a, b), (b, c)``: the swap
        would not be symmetric), a pair of one token twice, or a position outside ``-pos .. pos - 1``; each
        naming the argument.
    """
    if (
        not isinstance(tokens, torch.Tensor)
        or tokens.ndim != 2
        or tokens.is_floating_point()
        or tokens.is_complex()
    ):
        raise ValueError(
            f"tokens must be an integer tensor of shape (batch, pos), got {getattr(tokens, 'dtype', type(tokens))} "
            f"{tuple(getattr(tokens, 'shape', ()))}"
        )

    def as_int(v):  # a 0-d integer tensor or array stands for its int
        if isinstance(v, np.ndarray) and v.ndim == 0 and v.dtype.kind in "iu":
            return int(v)
        if (
            isinstance(v, torch.Tensor)
            and v.ndim == 0
            and not v.is_floating_point()
            and v.dtype != torch.bool
        ):
            return int(v)
        return v

    try:
        pairs = [(as_int(a), as_int(b)) for a, b in pairs]
    except (TypeError, ValueError):
        raise ValueError(f"pairs={pairs!r} is not valid; give a sequence of (int, int) pairs") from None
    seen = set()
    for a, b in pairs:
        if not (is_count(a) and is_count(b)) or a == b or a in seen or b in seen:
            raise ValueError(
                f"pairs: {(a, b)!r} is not valid; give pairs of two different ints, no token in two pairs"
            )
        seen.update((int(a), int(b)))
    pos = tokens.shape[1]
    positions = as_int(positions)
    cols = range(pos) if positions is None else ([positions] if is_count(positions) else positions)
    try:
        cols = [as_int(c) for c in cols]
    except TypeError:
        raise ValueError(
            f"positions={positions!r} is not valid; give an int, a sequence of ints or None"
        ) from None
    if not all(is_count(c) and -pos <= c < pos for c in cols):
        raise ValueError(f"positions={positions!r} is not valid; give ints in -{pos} .. {pos - 1}, or None")
    out = tokens.clone()
    for c in cols:
        col = tokens[:, c]
        new = col.clone()
        for a, b in pairs:
            new = torch.where(col == a, torch.as_tensor(b), new)
            new = torch.where(col == b, torch.as_tensor(a), new)
        out[:, c] = new
    return out
