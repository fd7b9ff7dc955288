"""Batches holding lists or arrays of ids (a tokenizer's output without return_tensors) are refused with a hint to
make them tensors; batches of tensors get no such hint."""

import numpy as np
import pytest
import torch

import pypattern as pp
from pypattern.losses import parse_batch
from pypattern.models import Transformer, TransformerConfig

HINT = "make them tensors, torch.tensor(...), or ask the tokenizer for return_tensors='pt'"


@pytest.mark.parametrize(
    "batch",
    [
        {"input_ids": [[1, 2, 3], [4, 5, 6]]},
        {"input_ids": [[1, 2, 3]], "attention_mask": [[1, 1, 1]]},
        {"input_ids": np.array([[1, 2, 3]])},
        [[1, 2, 3], [4, 5, 6]],
        (np.zeros((2, 3)), np.zeros(2)),
    ],
)
def test_lists_and_arrays_of_ids_get_the_hint(batch):
    with pytest.raises(
        TypeError, match=r"lists or arrays of ids: " + HINT.replace("(", r"\(").replace(")", r"\)")
    ):
        parse_batch(batch)
    model = Transformer(TransformerConfig(n_layers=1, d_model=8, n_heads=2, d_vocab=10, n_ctx=4, seed=0))
    with pytest.raises(ValueError, match="loader: .*lists or arrays of ids"):
        pp.estimate_llc(model, [batch], num_chains=1, num_draws=2, step_size=1e-4, quiet=True)


@pytest.mark.parametrize("batch", [{"input_ids": "abc"}, (torch.zeros(2, 3), "y")])
def test_other_non_tensors_get_no_hint(batch):
    with pytest.raises(TypeError) as info:
        parse_batch(batch)
    assert "lists or arrays" not in str(info.value)
