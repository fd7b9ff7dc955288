"""per_sample_grad_gram(model, None, batch): the library's one rule for each sample's loss (its mean over its
counted tokens), against a Gram of per-sample gradients taken one sample at a time with autograd."""

import pytest
import torch
import torch.nn.functional as F

import pypattern as pp
from pypattern.models.hf import HAS_TRANSFORMERS

pytestmark = pytest.mark.usefixtures("one_thread")


def _naive_gram(model, losses_of_row, B):
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(B):
        g = torch.autograd.grad(losses_of_row(i), params, allow_unused=True)
        rows.append(
            torch.cat([(torch.zeros_like(p) if x is None else x).reshape(-1) for x, p in zip(g, params)])
        )
    G = torch.stack(rows)
    return G @ G.T


def _token_mean_loss(logits, ids, counted):
    """Mean next-token cross-entropy of one row over the targets ``counted`` marks."""
    ce = F.cross_entropy(logits[:-1].double(), ids[1:], reduction="none")
    return (ce * counted[1:]).sum() / counted[1:].sum()


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed")
def test_a_padded_hugging_face_dict_batch_against_per_sample_autograd():
    import transformers as tr

    torch.manual_seed(0)
    cfg = tr.LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=16,
    )  # fmt: skip
    hf = tr.LlamaForCausalLM(cfg).double().eval()
    ids = torch.randint(0, 40, (5, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding
    mask[3, 4:] = 0
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[2, 3] = -100  # a target left out by its label
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    G = pp.per_sample_grad_gram(hf, None, batch)

    def loss_of(i):
        logits = hf(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1]).logits[0]
        return _token_mean_loss(logits, ids[i], (labels[i] != -100).double())

    ref = _naive_gram(hf, loss_of, 5)
    assert G.shape == (5, 5)
    torch.testing.assert_close(G, ref, rtol=1e-9, atol=1e-12)


def test_token_ids_on_pypatterns_model_and_an_x_y_pair_on_an_mlp():
    torch.manual_seed(0)
    model = pp.Transformer(pp.TransformerConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, d_vocab=30, n_ctx=12,
                                                dtype=torch.float64))  # fmt: skip
    ids = torch.randint(0, 30, (4, 7))
    G = pp.per_sample_grad_gram(model, None, ids)
    ones = torch.ones(7, dtype=torch.float64)
    ref = _naive_gram(model, lambda i: _token_mean_loss(model(ids[i : i + 1])[0], ids[i], ones), 4)
    torch.testing.assert_close(G, ref, rtol=1e-9, atol=1e-12)

    mlp = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 4, (6,))
    G = pp.per_sample_grad_gram(mlp, None, (x, y))
    ref = _naive_gram(mlp, lambda i: F.cross_entropy(mlp(x[i : i + 1]), y[i : i + 1]), 6)
    torch.testing.assert_close(G, ref, rtol=1e-9, atol=1e-12)


def test_the_default_refuses_several_inputs_and_a_sample_with_no_counted_token():
    torch.manual_seed(0)
    model = pp.Transformer(
        pp.TransformerConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_vocab=20, n_ctx=8)
    )
    ids = torch.randint(0, 20, (3, 6))
    with pytest.raises(TypeError, match=r"loss_fn=None reads one batch .*got 2 inputs"):
        pp.per_sample_grad_gram(model, None, ids, ids)
    labels = ids.clone()
    labels[1] = -100
    with pytest.raises(ValueError, match=r"loss_fn=None: samples \[1\] of the batch have no counted token"):
        pp.per_sample_grad_gram(model, None, {"input_ids": ids, "labels": labels})


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed")
@pytest.mark.parametrize("arch", ["gpt2", "gpt_neo"])
def test_a_raw_gpt2_and_gpt_neo_are_covered_whole_also_left_padded(arch):
    # Conv1D projections (GPT-2) and learned positions looked up once for the batch, read per sample where they
    # are added to the token embeddings; a left-padded batch gives its own position_ids
    import transformers as tr

    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = tr.GPT2Config(vocab_size=30, n_embd=16, n_layer=2, n_head=2, n_positions=12)
        hf = tr.GPT2LMHeadModel(cfg)
    else:
        cfg = tr.GPTNeoConfig(vocab_size=30, hidden_size=16, num_layers=2, num_heads=2, max_position_embeddings=12,
                              attention_types=[[["global", "local"], 1]], window_size=3)  # fmt: skip
        hf = tr.GPTNeoForCausalLM(cfg)
    hf = hf.double().eval()
    ids = torch.randint(0, 30, (4, 7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :1] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    for b in (ids, batch):
        G = pp.per_sample_grad_gram(hf, None, b, check=True)
        ref = _naive_gram(hf, lambda i, b=b: pp.losses.sample_losses(hf, b)[i], 4)
        torch.testing.assert_close(G, ref, rtol=1e-9, atol=1e-12)
