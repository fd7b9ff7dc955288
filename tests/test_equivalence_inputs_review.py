"""Argument checks of representations, resample_implementations, interpretive_equivalence, permutation_test and
distinguishability_grid: a bad argument is refused by name, instead of a silently wrong number (a negative token
id read from the end of the vocabulary, a bool head taken as the whole activation) or an error from inside
torch."""

import pytest
import torch

from pypattern import InductionTask, Transformer
from pypattern.equivalence import representations

TASK = InductionTask(d_vocab=16, seq_len=13)


def _model():
    return Transformer(TASK.model_config(d_model=16, n_heads=2, seed=0))


def _tokens(n=8, seed=1):
    return TASK.sample(n, seed=seed).tokens


# ----------------------------------------------------------------------------------------------- representations


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda t: t - 3, ValueError, r"tokens contains token id -\d+; valid ids are 0 \.\. 15"),
        (lambda t: t + 16, ValueError, r"tokens contains token id \d+; valid ids are 0 \.\. 15"),
        (lambda t: t.float(), TypeError, "tokens has dtype torch.float32; give integer token ids"),
        (lambda t: t[:0], ValueError, "tokens has shape"),
        (lambda t: torch.cat([t, t], 1), ValueError, "tokens has 26 positions; the model has 13 learned"),
    ],
)
def test_representations_refuse_token_ids_the_model_cannot_read(change, error, match):
    model, tok = _model(), _tokens()
    with pytest.raises(error, match=match):
        representations(model, change(tok))


def test_representations_of_a_negative_id_are_not_those_of_the_vocabulary_end():
    # the defect: id -3 was read as id 13 (the embedding's row from the end) and gave the same features
    model, tok = _model(), _tokens()
    wrapped = tok.clone()
    wrapped[0, 0] = 13
    negative = tok.clone()
    negative[0, 0] = -3
    assert representations(model, wrapped).shape == (8, 2 * 13 * 16)
    with pytest.raises(ValueError, match="token id -3"):
        representations(model, negative)


def test_representations_take_one_hook_name_and_refuse_no_hooks():
    model, tok = _model(), _tokens()
    one = representations(model, tok, hooks="blocks.1.hook_resid_post")
    torch.testing.assert_close(one, representations(model, tok, hooks=["blocks.1.hook_resid_post"]))
    assert one.shape == (8, 13 * 16)
    with pytest.raises(ValueError, match="hooks is empty"):
        representations(model, tok, hooks=[])
    with pytest.raises(TypeError, match="hooks holds 3"):
        representations(model, tok, hooks=["blocks.1.hook_resid_post", 3])
    with pytest.raises(TypeError, match="hooks is a set"):
        representations(model, tok, hooks={"blocks.1.hook_resid_post"})
