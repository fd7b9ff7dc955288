"""``tasks.train``'s result saves and loads like every other result (no pickle)."""

import pytest
import torch

import pypattern as pp
from pypattern.io import FormatError


def test_a_training_result_saves_and_loads(tmp_path):
    task = pp.tasks.InductionTask(d_vocab=12, seq_len=9)
    model = pp.Transformer(task.model_config(seed=0))
    res = pp.tasks.train(model, task, steps=4, log_every=1, quiet=True)
    assert len(res.losses) == len(res.steps) >= 2
    path = tmp_path / "train.npz"
    res.save(path)
    back = pp.tasks.TrainResult.load(path)
    assert back.steps == res.steps and back.losses == res.losses
    torch.save({"a": 1}, tmp_path / "p.npz")  # a pickle under the result's suffix is refused, never unpickled
    with pytest.raises(FormatError):
        pp.tasks.TrainResult.load(tmp_path / "p.npz")
