"""Induction: random token sequences in which a subsequence repeats; flags mark tokens predictable by induction."""

from __future__ import annotations

import torch

from .._checks import is_count
from .base import IGNORE, Task, TaskBatch, _logits, count_arg, generator

__all__ = [
    "InductionTask",
    "prefix_matching_score",
    "previous_token_score",
    "repeated_tokens",
    "induction_probe",
]


class InductionTask(Task):
    """``[BOS, random tokens ...]`` with one segment of length ``repeat_len`` copied later in the sequence.

    The distance between the two copies is uniform over every value that fits, so no fixed-distance
    (positional) head solves the task. With the defaults, the 2-layer attention-only model of
    :meth:`model_config` reaches about 0.9 accuracy on flagged positions after 800 steps (batch 64, AdamW
    3e-3; about 10-25 s on one core) and forms a head with a prefix-matching score of about 0.5-0.6.

    Targets are the next token at every position (language modelling); ``extra["induction_flag"]``
    ``(num_samples, pos)`` is True at positions whose next token is predictable by induction: every token of the
    second copy but its last (the current token, and from the copy's second token on its predecessors too, match
    the first copy). ``extra["source_start"]`` and ``extra["dest_start"]`` ``(num_samples,)`` are the positions
    of the two copies' first tokens.

    Parameters
    ----------
    d_vocab : int
        Vocabulary size; token ``d_vocab - 1`` is BOS and never appears elsewhere.
    seq_len : int
        Number of positions including BOS.
    repeat_len : int or None
        Length of the repeated segment, ``2 .. (seq_len - 1) // 2`` (so ``seq_len`` is at least 5); default
        ``(seq_len - 1) // 3``, at least 2. Both copies are placed at random, so a fixed positional offset cannot
        solve the task: the model has to learn induction.
    min_distance : int or None
        Least distance ``d`` between the two copies' first tokens, ``2 .. seq_len - 1 - repeat_len``; ``d`` is
        uniform over ``min_distance .. seq_len - 1 - repeat_len``. Default (None): ``repeat_len``, the copies never
        overlap. Below ``repeat_len`` the copies may overlap, and the copied stretch is then periodic with period
        ``d`` (every token of the second copy still equals the token ``d`` before it). With a least distance of
        ``repeat_len`` (10 by default) a 2-layer model can store the pair (token, next token) of the first copy at
        a position up to about ``repeat_len`` later than the pair, through layer-0 heads that attend back by a
        position-dependent offset, and match on that position instead of the token after the earlier occurrence:
        it solves the task without a previous-token head. Short distances (``min_distance=2``) leave no room for
        that: the pair must be available one or two positions after it, which a previous-token head provides.
    """

    name = "induction"

    def __init__(
        self,
        d_vocab: int = 64,
        seq_len: int = 33,
        repeat_len: int | None = None,
        min_distance: int | None = None,
    ) -> None:
        d_vocab, seq_len = count_arg(d_vocab, "d_vocab", 3), count_arg(seq_len, "seq_len")
        if repeat_len is not None and not is_count(repeat_len):
            raise ValueError(f"repeat_len={repeat_len!r} is not valid; give an int or None")
        longest = (seq_len - 1) // 2  # the two copies fit after BOS
        if longest < 2:
            raise ValueError(
                f"seq_len={seq_len} is too short: the two copies of a repeated segment of at least 2 tokens need "
                "seq_len >= 5 (BOS included)"
            )
        self.d_vocab, self.n_ctx = d_vocab, seq_len
        self.repeat_len = max(2, (seq_len - 1) // 3) if repeat_len is None else int(repeat_len)
        if not 2 <= self.repeat_len <= longest:
            raise ValueError(f"repeat_len={repeat_len} is not valid for seq_len={seq_len}; give 2..{longest}")
        farthest = seq_len - 1 - self.repeat_len  # the largest distance that fits
        if min_distance is not None and not (is_count(min_distance) and 2 <= min_distance <= farthest):
            raise ValueError(
                f"min_distance={min_distance!r} is not valid for seq_len={seq_len}, repeat_len={self.repeat_len}; "
                f"give None or an int in 2..{farthest}"
            )
        # kept as given (None: repeat_len), so that a task built without it reads as before (run fingerprints)
        self.min_distance = None if min_distance is None else int(min_distance)
        self.bos = d_vocab - 1

    def sample(self, num_samples: int, seed: int | None = None) -> TaskBatch:
        n, T, k = count_arg(num_samples, "num_samples"), self.n_ctx, self.repeat_len
        g = generator(seed)
        body = torch.randint(0, self.d_vocab - 1, (n, T - 1), generator=g)
        # distance d = j - i uniform over min_distance .. T-1-k, then the source start i uniform: a head that
        # attends at a fixed distance cannot solve the task
        least = k if self.min_distance is None else self.min_distance
        d = torch.randint(least, T - k, (n,), generator=g)
        i = (torch.rand(n, generator=g) * (T - k - d)).long().clamp_max(T - 1 - k - d)
        j = i + d
        ar = torch.arange(k)
        rows = torch.arange(n)[:, None]
        if least >= k:  # the copies never overlap
            body[rows, (j[:, None] + ar)] = body[rows, (i[:, None] + ar)]
        else:  # token by token, so that an overlapping copy reads the tokens already copied (period d)
            for t in range(k):
                body[rows[:, 0], j + t] = body[rows[:, 0], i + t]
        tokens = torch.cat([torch.full((n, 1), self.bos), body], 1)
        targets = torch.full_like(tokens, IGNORE)
        targets[:, :-1] = tokens[:, 1:]
        flag = torch.zeros(n, T, dtype=torch.bool)
        # in ``tokens`` the copy occupies 1 + j .. 1 + j + k - 1; its tokens except the last predict the next one
        pos = 1 + j[:, None] + ar[:-1]
        flag[rows, pos] = True
        return TaskBatch(
            tokens, targets, {"induction_flag": flag, "source_start": 1 + i, "dest_start": 1 + j}
        )

    def model_config(self, **overrides):
        from ..models.transformer import TransformerConfig

        cfg = dict(n_layers=2, d_model=64, n_heads=4, d_mlp=None, d_vocab=self.d_vocab, n_ctx=self.n_ctx)
        cfg.update(overrides)
        return TransformerConfig(**cfg)

    @torch.no_grad()
    def induction_accuracy(self, model, batch: TaskBatch) -> float:
        """Accuracy on the positions flagged as predictable by induction."""
        pred = _logits(model, batch.tokens).argmax(-1)
        f = batch.extra["induction_flag"]
        return float((pred[f] == batch.targets[f]).float().mean())


def repeated_tokens(d_vocab: int, half_len: int, num_samples: int, seed: int = 0, bos: int | None = None):
    """``[BOS, x_1..x_n, x_1..x_n]`` with distinct random ``x`` from ``0 .. d_vocab - 2`` (no accidental repeats).

    Parameters
    ----------
    d_vocab : int
        Vocabulary size (at least 2); the segment's tokens are drawn from ``0 .. d_vocab - 2``.
    half_len : int
        ``n``, the length of the repeated segment: 1 .. ``d_vocab - 1``.
    num_samples : int
        Number of sequences (at least 1).
    seed : int
        Seed of the draw.
    bos : int, optional
        The first token, ``d_vocab - 1`` by default; another must lie outside the tokens drawn (at least
        ``d_vocab - 1``, e.g. a larger model's BOS id).

    Returns
    -------
    LongTensor ``(num_samples, 2n+1)``

    Raises
    ------
    ValueError
        A count that is not an int in range (naming it), ``half_len > d_vocab - 1`` or ``bos`` below
        ``d_vocab - 1``.
    """
    d_vocab, half_len = count_arg(d_vocab, "d_vocab", 2), count_arg(half_len, "half_len", 1)
    num_samples = count_arg(num_samples, "num_samples", 1)
    if half_len > d_vocab - 1:
        raise ValueError(
            f"half_len={half_len} is not valid; give at most d_vocab - 1 = {d_vocab - 1} (distinct tokens)"
        )
    if bos is not None and (not is_count(bos) or bos < d_vocab - 1):
        raise ValueError(
            f"bos={bos!r} is not valid; give None or an int >= d_vocab - 1 = {d_vocab - 1} (the segment's tokens "
            f"are drawn from 0 .. {d_vocab - 2})"
        )
    g = generator(seed)
    bos = d_vocab - 1 if bos is None else int(bos)
    x = torch.stack([torch.randperm(d_vocab - 1, generator=g)[:half_len] for _ in range(num_samples)])
    return torch.cat([torch.full((num_samples, 1), bos), x, x], 1)


def induction_probe(d_vocab: int, n_ctx: int, half_len: int = 8, num_samples: int = 32, seed: int = 0):
    """Prompts ``[BOS, x_1..x_n, f_1..f_g, x_1..x_n]`` with distinct random tokens and a random gap ``g`` per
    prompt (so that a head attending at a fixed distance cannot score).

    ``n`` is ``half_len``, capped at a third of what fits (``(n_ctx - 1) // 3`` and ``(d_vocab - 1) // 3``) so that
    the gap ``g`` varies over at least ``n + 1`` values, ``0 .. max_gap`` (``1 .. max_gap``, two values or more,
    when ``n`` is 1: with no gap the token after a one-token segment's earlier occurrence would be the destination
    itself). ``n_ctx`` is at least 5 and ``d_vocab`` at least 4. Prompts are padded at the end with unused distinct
    tokens to one length.

    Parameters
    ----------
    d_vocab : int
        Vocabulary size (at least 4); ``d_vocab - 1`` is the BOS token.
    n_ctx : int
        Longest prompt (at least 5).
    half_len : int
        Requested segment length ``n`` (at least 1), capped as above.
    num_samples : int
        Number of prompts (at least 1).
    seed : int
        Seed of the draw.

    Returns
    -------
    tokens : LongTensor ``(num_samples, n_ctx')``
    dest, src, prev : LongTensor ``(num_samples, n)``
        Positions of the second copy, of the token after each one's earlier occurrence, and of the position
        before each destination.

    Raises
    ------
    ValueError
        A count that is not an int of at least the least value above, naming it.
    """
    d_vocab, n_ctx = count_arg(d_vocab, "d_vocab", 4), count_arg(n_ctx, "n_ctx", 5)
    half_len, num_samples = count_arg(half_len, "half_len", 1), count_arg(num_samples, "num_samples", 1)
    g = generator(seed)
    # a third of the room at most: the rest is the gap's, so that the distance between the copies varies
    n = min(half_len, (n_ctx - 1) // 3, (d_vocab - 1) // 3)
    max_gap = min(n_ctx - 1 - 2 * n, d_vocab - 1 - n)
    min_gap = 1 if n == 1 else 0
    T = 1 + 2 * n + max_gap
    bos = d_vocab - 1
    rows, dest, src = [], [], []
    for _ in range(num_samples):
        gap = int(torch.randint(min_gap, max_gap + 1, (1,), generator=g))
        perm = torch.randperm(d_vocab - 1, generator=g)
        x, fill = perm[:n], perm[n : n + max_gap]
        tail = fill[gap:]  # pad at the end with unused distinct tokens
        rows.append(torch.cat([torch.tensor([bos]), x, fill[:gap], x, tail]))
        d0 = 1 + n + gap
        dest.append(torch.arange(d0, d0 + n))
        src.append(torch.arange(d0, d0 + n) - (n + gap) + 1)
    dest_t = torch.stack(dest)
    return torch.stack(rows)[:, :T], dest_t, torch.stack(src), dest_t - 1


def _head_scores(model, tokens: torch.Tensor, dest: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    out = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
    b = torch.arange(tokens.shape[0])[:, None]
    for layer in range(model.cfg.n_layers):
        pat = cache[f"blocks.{layer}.attn.hook_pattern"]  # (batch, head, q, k)
        out[layer] = pat.permute(0, 2, 3, 1)[b, dest, src].mean((0, 1)).float()
    return out


def _check_model(model, fn: str) -> None:
    """``model`` reads as pypattern's model for ``fn``: its ``cfg`` gives ``d_vocab`` and ``n_ctx``."""
    cfg = getattr(model, "cfg", None)
    if not callable(model) or not all(hasattr(cfg, a) for a in ("d_vocab", "n_ctx")):
        raise TypeError(
            f"model is a {type(model).__name__}; {fn} needs a hooked model with cfg.d_vocab and cfg.n_ctx "
            "(pypattern's Transformer)"
        )


@torch.no_grad()
def prefix_matching_score(model, half_len: int = 8, num_samples: int = 32, seed: int = 0) -> torch.Tensor:
    """Mean attention from each token of a repeated segment to the token *after* its earlier occurrence.

    Measured on :func:`induction_probe` prompts (random gaps, so fixed-distance heads do not score); near 1
    for an induction head.

    Parameters
    ----------
    model : Transformer
        A hooked model with ``cfg.d_vocab``, ``cfg.n_ctx`` and ``blocks.{l}.attn.hook_pattern``.
    half_len, num_samples, seed
        The probe prompts' settings (:func:`induction_probe`).

    Returns
    -------
    Tensor ``(n_layers, n_heads)``
        Float32 scores in ``[0, 1]``.

    Raises
    ------
    TypeError
        ``model`` has no ``cfg.d_vocab`` / ``cfg.n_ctx``.
    ValueError
        A probe setting out of range (:func:`induction_probe`).
    """
    _check_model(model, "prefix_matching_score")
    tokens, dest, src, _ = induction_probe(model.cfg.d_vocab, model.cfg.n_ctx, half_len, num_samples, seed)
    return _head_scores(model, tokens, dest, src)


@torch.no_grad()
def previous_token_score(model, half_len: int = 8, num_samples: int = 32, seed: int = 0) -> torch.Tensor:
    """Mean attention from each position of the repeated segment to the position before it.

    Parameters
    ----------
    model : Transformer
        A hooked model with ``cfg.d_vocab``, ``cfg.n_ctx`` and ``blocks.{l}.attn.hook_pattern``.
    half_len, num_samples, seed
        The probe prompts' settings (:func:`induction_probe`).

    Returns
    -------
    Tensor ``(n_layers, n_heads)``
        Float32 scores in ``[0, 1]``.

    Raises
    ------
    TypeError
        ``model`` has no ``cfg.d_vocab`` / ``cfg.n_ctx``.
    ValueError
        A probe setting out of range (:func:`induction_probe`).
    """
    _check_model(model, "previous_token_score")
    tokens, dest, _, prev = induction_probe(model.cfg.d_vocab, model.cfg.n_ctx, half_len, num_samples, seed)
    return _head_scores(model, tokens, dest, prev)
