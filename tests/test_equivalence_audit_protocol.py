"""interpretive_equivalence against hand computations: how a tie counts (half a win: the similarity cannot tell the
two apart)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from pypattern.equivalence import (
    EquivalenceResult,
    interpretive_equivalence,
)
from pypattern.io import _write_result

N, D = 40, 3


def _tagged(tag: int) -> torch.Tensor:
    """A representation that carries an id in its first entry (the rest random, so that it varies)."""
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(1000 + tag), dtype=torch.float64)
    x[0, 0] = tag
    return x


def _table_similarity(x, y) -> float:
    """A similarity with many ties: a small integer that depends only on the two ids."""
    i, j = int(x[0, 0]), int(y[0, 0])
    return float((3 * i + 5 * j + i * j) % 3)


def _sampler(offset: int):
    return lambda seed: _tagged(offset + seed)


def test_ties_count_half_a_win_comparing_implementations():
    """Trial ``t`` (seed 0) draws ``a = sample_a(4t)``, ``a' = sample_a(4t + 2)``, ``b = sample_b(4t + 1)``,
    ``b' = sample_b(4t + 3)``; a win is ``s(a, a') > s(a, b)`` (and ``s(b, b') > s(b, a)``); a tie counts half."""
    T = 6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = interpretive_equivalence(
            None,
            None,
            _sampler(0),
            _sampler(0),
            num_trials=T,
            similarity=_table_similarity,
            compare="implementations",
        )
    wins = ties = 0
    for t in range(T):
        a, a2, b, b2 = 4 * t, 4 * t + 2, 4 * t + 1, 4 * t + 3
        s = lambda i, j: float((3 * i + 5 * j + i * j) % 3)  # noqa: E731
        for own, other in ((s(a, a2), s(a, b)), (s(b, b2), s(b, a))):
            wins += (own > other) + 0.5 * (own == other)
            ties += own == other
    assert 0 < ties < 2 * T  # the construction has ties, and not only ties
    assert res.ties == ties
    assert res.wins == wins
    assert res.score == pytest.approx(1.0 - abs(wins / T - 1.0), abs=1e-15)
    assert res.win_rate == pytest.approx(wins / (2 * T))


def test_ties_count_half_a_win_comparing_with_the_model():
    """compare='model' counts the same way: strict wins plus half the ties, hand-computed from the table of similarities."""
    T = 5
    rep_a, rep_b = _tagged(-1), _tagged(-2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = interpretive_equivalence(
            rep_a, rep_b, _sampler(0), _sampler(0), num_trials=T, similarity=_table_similarity, seed=0
        )
    s = lambda i, j: float((3 * i + 5 * j + i * j) % 3)  # noqa: E731
    wins = ties = 0
    for t in range(T):
        a, b = 2 * t, 2 * t + 1
        # A against its own implementation and against B itself; B likewise
        for own, other in ((s(-1, a), s(-1, -2)), (s(-2, b), s(-2, -1))):
            wins += (own > other) + 0.5 * (own == other)
            ties += own == other
    assert 0 < ties < 2 * T
    assert (res.wins, res.ties) == (wins, ties)
    assert res.score == pytest.approx(1.0 - abs(wins / T - 1.0), abs=1e-15)


def test_a_result_with_ties_round_trips_and_a_wrong_win_count_is_refused(tmp_path):
    """The saved result checks that ``wins`` counts the strict wins plus half the ties."""
    own = np.array([[1.0, 0.5], [0.2, 0.3]])
    other = np.array([[0.5, 0.5], [0.2, 0.1]])
    wins = 3.0  # (1.0 > 0.5) and (0.3 > 0.1), and half of each of two ties
    res = EquivalenceResult(
        score=1.0 - abs(wins / 2 - 1.0), wins=wins, num_trials=2, own=own, other=other, ties=2
    )
    res.save(tmp_path / "r")
    back = EquivalenceResult.load(tmp_path / "r")
    assert (back.wins, back.ties, back.score) == (3.0, 2, 0.5)
    strict = EquivalenceResult(score=1.0, wins=2.0, num_trials=2, own=own, other=other, ties=2)
    with pytest.raises(ValueError, match="wins=2.0"):  # save refuses what load would refuse
        strict.save(tmp_path / "h")
    _write_result(strict, tmp_path / "h")  # a file written without that check
    with pytest.raises(ValueError, match="wins=2.0"):
        EquivalenceResult.load(tmp_path / "h")


def test_every_comparison_tied_is_nan_and_most_tied_warns():
    rep = _tagged(-1)
    with pytest.warns(UserWarning, match="tied"):
        flat = interpretive_equivalence(
            rep, rep, _sampler(0), _sampler(0), num_trials=3, similarity=lambda x, y: 0.0
        )
    assert flat.ties == 6 and flat.wins == 3.0 and math.isnan(flat.score)

    def mostly_tied(x, y):  # only A (id -1) against a (id 0) is above 0
        return 1.0 if int(x[0, 0]) == -1 and int(y[0, 0]) == 0 else 0.0

    with pytest.warns(UserWarning, match="half a win"):
        some = interpretive_equivalence(
            rep, rep, _sampler(0), _sampler(0), num_trials=3, similarity=mostly_tied
        )
    # trial 0: A is closer to a (1) than to B itself (0), a win; B's comparison and both of trials 1 and 2 tie:
    # one win and five halves
    assert (some.wins, some.ties) == (3.5, 5)
    assert some.score == pytest.approx(1.0 - abs(3.5 / 3 - 1.0))
