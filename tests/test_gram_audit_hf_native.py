"""Per-sample gradient Grams of Hugging Face models run as they are (not converted): activation checkpointing
switched on, and OPT, whose MLP runs on the batch's rows flattened with the positions and whose learned positional
embedding computes its own ids. Each Gram is checked against a naive loop of one autograd backward per sample."""

import warnings

import pytest
import torch

from pypattern.gram import per_sample_grad_gram, per_sample_grad_gram_reference

transformers = pytest.importorskip("transformers")


def _quiet():
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*")
    warnings.filterwarnings("ignore", message=".*batching rule.*")
    transformers.logging.set_verbosity_error()


def _ids_loss(m, ids):
    logits = m(input_ids=ids).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").sum(1)


def _masked_loss(m, batch):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logits = m(input_ids=ids, attention_mask=mask).logits[:, :-1]
    tok = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    return (tok * mask[:, 1:]).sum(1)


def _naive_gram(model, loss_fn, batch, b):
    """``G_ij = <grad l_i, grad l_j>`` from one backward pass per sample (each sample alone, a batch of one)."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(b):
        one = {k: v[i : i + 1] for k, v in batch.items()} if isinstance(batch, dict) else batch[i : i + 1]
        gs = torch.autograd.grad(loss_fn(model, one).sum(), params)
        rows.append(torch.cat([g.reshape(-1) for g in gs]).to(torch.float64))
    r = torch.stack(rows)
    return r @ r.T


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _neox():
    cfg = transformers.GPTNeoXConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=50,
        max_position_embeddings=16,
    )  # fmt: skip
    return transformers.GPTNeoXForCausalLM(cfg).double().train()


@pytest.mark.parametrize("reentrant", [False, True])
def test_gram_of_a_model_with_gradient_checkpointing_is_its_gram_without(reentrant):
    """``gradient_checkpointing_enable()`` changes how the backward pass gets the activations, not the function:
    both Grams equal the naive loop's (before: the reference failed with functorch's bare requires_grad_() error,
    the fast path with use_reentrant=True with torch.utils.checkpoint's .grad() error). The model's checkpointing
    flags and its input-embedding hook are all still there afterwards."""
    _quiet()
    torch.manual_seed(0)
    m = _neox()
    ids = torch.randint(0, 50, (3, 6))
    want = _naive_gram(m, _ids_loss, ids, 3)
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    flags = {
        n: mod.gradient_checkpointing
        for n, mod in m.named_modules()
        if hasattr(mod, "gradient_checkpointing")
    }
    emb = m.get_input_embeddings()
    hooks = list(emb._forward_hooks.items())
    assert any(h.__name__ == "make_inputs_require_grads" for _, h in hooks)
    assert _rel(per_sample_grad_gram_reference(m, _ids_loss, ids), want) < 1e-12
    assert _rel(per_sample_grad_gram(m, _ids_loss, ids, check=True), want) < 1e-12
    assert {n: mod.gradient_checkpointing for n, mod in m.named_modules() if n in flags} == flags
    assert any(flags.values()) and m.is_gradient_checkpointing
    assert list(emb._forward_hooks.items()) == hooks
    assert m.training


def test_reference_gram_of_gpt2_with_gradient_checkpointing():
    """GPT-2 (Conv1D projections: the reference covers every parameter) with checkpointing on, in train mode
    without dropout: the reference Gram equals the naive loop's."""
    _quiet()
    torch.manual_seed(1)
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    m = transformers.GPT2LMHeadModel(cfg).double().train()
    ids = torch.randint(0, 50, (3, 5))
    want = _naive_gram(m, _ids_loss, ids, 3)
    m.gradient_checkpointing_enable()
    assert _rel(per_sample_grad_gram_reference(m, _ids_loss, ids), want) < 1e-12


def _opt(proj, dtype):
    cfg = transformers.OPTConfig(
        num_hidden_layers=2, hidden_size=32, ffn_dim=64, num_attention_heads=4, vocab_size=50,
        max_position_embeddings=32, word_embed_proj_dim=proj, pad_token_id=1, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.OPTForCausalLM(cfg).to(dtype).eval()


@pytest.mark.parametrize(
    ("proj", "dtype", "tol"),
    [(32, torch.float64, 1e-11), (16, torch.float64, 1e-11), (32, torch.float32, 1e-4)],
)
def test_opt_default_sites_gram_matches_a_naive_loop(proj, dtype, tol):
    """OPT's MLP and final layer norm run on ``(B T, d)`` rows (before: "fc1: its output has leading size 18 but
    the losses have batch 3"); its positional embedding looks up ``cumsum(mask) - 1 + 2``, not its first input.
    The default sites' Gram, plain ids and a right-padded Hugging Face batch, equals the naive loop's."""
    _quiet()
    torch.manual_seed(2)
    m = _opt(proj, dtype)
    ids = torch.randint(2, 50, (3, 6))
    assert _rel(per_sample_grad_gram(m, _ids_loss, ids, check=True), _naive_gram(m, _ids_loss, ids, 3)) < tol
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    batch = {"input_ids": ids.masked_fill(mask == 0, 1), "attention_mask": mask}
    g = per_sample_grad_gram(m, _masked_loss, batch, check=True)
    assert _rel(g, _naive_gram(m, _masked_loss, batch, 3)) < tol
    per = per_sample_grad_gram(m, _masked_loss, batch, per_module=True, check=False)
    pos = per["model.decoder.embed_positions"]  # the padded positions give their rows no gradient
    assert float(pos.diagonal().min()) > 0


def test_rows_laid_out_position_major_are_refused_by_the_check():
    """A module run on ``(T B, d)`` rows (positions first) is read sample-major as ``(B, T, d)``: the wrong samples'
    rows. The check compares a diagonal entry with its own sample's gradient and refuses it by name."""

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)

        def forward(self, x):  # x (B, T, 3)
            rows = x.transpose(0, 1).reshape(-1, 3)  # (T B, 3)
            return self.lin(rows).reshape(x.shape[1], x.shape[0], 2).transpose(0, 1)

    torch.manual_seed(3)
    m = M().double()
    x = torch.randn(4, 3, 3, dtype=torch.float64)

    def loss(model, x):
        return (model(x) ** 2).sum((1, 2))

    with pytest.raises(ValueError, match=r"site 'lin' .*sample \d+: G"):
        per_sample_grad_gram(m, loss, x, check=True)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-11), (torch.float32, 1e-4)])
def test_neox_gram_of_a_padded_hf_batch_matches_a_naive_loop(dtype, tol):
    """GPT-NeoX (its default sites cover every parameter) on a right-padded Hugging Face batch: the Gram equals
    the naive loop's, and a batch of no sample gives ``(0, 0)`` (whole and per site) without running the model,
    whose forward cannot reshape an empty batch (before: torch's bare "cannot reshape tensor of 0 elements")."""
    _quiet()
    torch.manual_seed(4)
    m = _neox().to(dtype).eval()
    ids = torch.randint(1, 50, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, 5:] = 0
    mask[2, 3:] = 0
    batch = {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}
    g = per_sample_grad_gram(m, _masked_loss, batch, check=True)
    assert _rel(g, _naive_gram(m, _masked_loss, batch, 3)) < tol
    empty = {k: v[:0] for k, v in batch.items()}
    assert per_sample_grad_gram(m, _masked_loss, empty).shape == (0, 0)
    per = per_sample_grad_gram(m, _masked_loss, empty, per_module=True)
    assert set(per) == set(per_sample_grad_gram(m, _masked_loss, batch, per_module=True))
    assert all(v.shape == (0, 0) for v in per.values())
