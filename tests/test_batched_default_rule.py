"""``batched=None``'s rule (``batches_by_default``), as measured by bench/bench_batched_chains.py: on a CPU, chains
of models up to ``BATCHED_MAX_PARAMS`` parameters run batched and larger ones one after another, however many
chains; on a GPU, 8 or more chains of a larger model run batched too; the stacked parameters stay under
``BATCHED_MAX_STACKED`` either way."""

import pytest
import torch

from pypattern.sampling import runner
from pypattern.sampling.runner import (
    BATCHED_MAX_PARAMS,
    BATCHED_MAX_STACKED,
    BATCHED_MIN_CHAINS,
    batches_by_default,
)


def _model(n: int, device="cpu") -> torch.nn.Module:
    m = torch.nn.Linear(n - 1, 1, device=device)  # n parameters
    assert sum(p.numel() for p in m.parameters()) == n
    return m


def test_thresholds():
    assert BATCHED_MAX_PARAMS == 1 << 17 and BATCHED_MIN_CHAINS == 8 and BATCHED_MAX_STACKED == 1 << 24


@pytest.mark.parametrize(
    "n, chains, want",
    [
        (10, 1, False),  # one chain: nothing to stack
        (10, 2, True),
        (20_752, 4, True),  # 1.33x faster batched on a CPU
        (BATCHED_MAX_PARAMS, 4, True),
        (BATCHED_MAX_PARAMS + 1, 4, False),
        (262_912, 8, False),  # 0.86x: slower batched on a CPU, however many chains
        (262_912, 20, False),
        (BATCHED_MAX_PARAMS, BATCHED_MAX_STACKED // BATCHED_MAX_PARAMS, True),
        (BATCHED_MAX_PARAMS, BATCHED_MAX_STACKED // BATCHED_MAX_PARAMS + 1, False),  # stacked over the cap
    ],
)
def test_cpu_rule(n, chains, want):
    assert batches_by_default(_model(n), chains) is want


def test_frozen_parameters_do_not_count():
    """The count is of the parameters that move: a large frozen part leaves a small model to sample."""
    m = torch.nn.Sequential(_model(BATCHED_MAX_PARAMS + 100), torch.nn.Linear(1, 1))
    assert not batches_by_default(m, 4)
    m[0].requires_grad_(False)
    assert batches_by_default(m, 4)


def test_gpu_rule_batches_many_chains_of_larger_models(monkeypatch):
    """Read through the model's device: 8 or more chains of a model over the threshold batch on a GPU only."""
    m = _model(262_912)
    monkeypatch.setattr(runner, "model_device", lambda model, default=None: torch.device("cuda"))
    assert batches_by_default(m, BATCHED_MIN_CHAINS)
    assert not batches_by_default(m, BATCHED_MIN_CHAINS - 1)
    assert not batches_by_default(m, BATCHED_MAX_STACKED // 262_912 + 1)  # the stacked cap holds on a GPU too


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_rule_on_a_cuda_model():
    m = _model(262_912, device="cuda")
    assert batches_by_default(m, BATCHED_MIN_CHAINS) and not batches_by_default(
        _model(262_912), BATCHED_MIN_CHAINS
    )
