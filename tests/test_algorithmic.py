"""Routines and algorithms of pypattern.tasks.algorithmic against plain-Python implementations."""

import pytest
import torch

from pypattern.tasks.algorithmic import (
    ALGORITHMS,
    IGNORE,
    QUERY,
    ROUTINES,
    RoutineTask,
    decode,
    encode,
    run_algorithm,
    run_routine,
    stage_inputs,
)

PLAIN = {
    "sort": lambda x: sorted(x),
    "diff_next": lambda x: [(x[(i + 1) % 10] - x[i]) % 11 for i in range(10)],
    "sum_next": lambda x: [(x[i] + x[(i + 1) % 10]) % 11 for i in range(10)],
    "add_index": lambda x: [(v + i) % 11 for i, v in enumerate(x)],
    "count_smaller": lambda x: [sum(1 for u in x if u < v) for v in x],
    "interleave_reverse": lambda x: [x[i // 2] if i % 2 == 0 else x[9 - i // 2] for i in range(10)],
    "negate_odd": lambda x: [v if i % 2 == 0 else (11 - v) % 11 for i, v in enumerate(x)],
}


def _inputs(n=300, seed=0):
    x = torch.randint(0, 11, (n, 10), generator=torch.Generator().manual_seed(seed))
    x[0] = 0  # edge cases: all equal, extremes, sorted, reversed
    x[1] = 10
    x[2] = torch.arange(10)
    x[3] = torch.arange(10, 0, -1)
    return x


@pytest.mark.parametrize("name", sorted(ROUTINES))
def test_routine_matches_plain_python(name):
    x = _inputs()
    got = run_routine(name, x)
    assert got.shape == x.shape and got.dtype == torch.long
    assert int(got.min()) >= 0 and int(got.max()) <= 10
    for row, out in zip(x.tolist(), got.tolist()):
        assert out == PLAIN[name](row)


def test_algorithms_chain_routines_and_share_them():
    assert set(PLAIN) == set(ROUTINES)
    assert len(ALGORITHMS) >= 5
    uses = {}
    for routines in ALGORITHMS.values():
        assert 2 <= len(routines) <= 4
        for r in routines:
            uses[r] = uses.get(r, 0) + 1
    assert sum(1 for v in uses.values() if v >= 2) >= 3  # several routines are shared
    x = _inputs(50, 1)
    for name, routines in ALGORITHMS.items():
        stages = run_algorithm(name, x)
        assert len(stages) == len(routines) + 1
        for row, out in zip(x.tolist(), stages[-1].tolist()):
            v = row
            for r in routines:
                v = PLAIN[r](v)
            assert out == v
    with pytest.raises(ValueError, match="routine"):
        run_routine("shuffle", x)
    with pytest.raises(ValueError, match="0..10"):
        run_routine("sort", x + 5)


def test_routine_task_format_and_training_distribution():
    task = RoutineTask("diff_next")
    b = task.sample(400, seed=3)
    assert b.tokens.shape == (400, 20) and (b.tokens[:, 10:] == QUERY).all()
    assert (b.targets[:, :10] == IGNORE).all()
    assert torch.equal(b.targets[:, 10:], run_routine("diff_next", b.extra["x"]))
    assert torch.equal(encode(b.extra["x"]), b.tokens)
    # half of the inputs come from inside the pipelines: for diff_next, sorted sequences among them
    sorted_rows = (b.extra["x"][:, 1:] >= b.extra["x"][:, :-1]).all(1).float().mean()
    assert 0.1 < float(sorted_rows) < 0.5
    uniform = RoutineTask("diff_next", pipeline_fraction=0.0).inputs(400, seed=3)
    assert float((uniform[:, 1:] >= uniform[:, :-1]).all(1).float().mean()) < 0.01
    assert len(stage_inputs("sort", b.extra["x"])) == 3
    logits = torch.zeros(2, 20, 12)
    logits[:, 10:, QUERY] = 5.0  # the query token is never an answer
    logits[0, 10:, 3] = 1.0
    assert decode(logits)[0].tolist() == [3] * 10
