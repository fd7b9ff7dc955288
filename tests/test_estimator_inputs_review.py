"""Batches the estimators' default losses cannot read, as a user would hand them over (found by review): each gets
an error that says what was expected, never torch's error from inside or a silently different loss."""

import warnings

import pytest
import torch

import pypattern as pp

transformers = pytest.importorskip("transformers")

K = dict(num_chains=2, num_draws=3, step_size=1e-4, nbeta=10.0, quiet=True)


@pytest.fixture(scope="module")
def lm():
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=16)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _ids(n=4):
    return torch.randint(0, 64, (n, 10), generator=torch.Generator().manual_seed(0))


def test_float_labels_in_a_dict_batch_are_refused_naming_the_argument(lm):
    ids = _ids()
    with pytest.raises(TypeError, match="loader: batch\\['labels'\\] must hold integer token ids"):
        pp.estimate_llc(lm, [dict(input_ids=ids, labels=ids.float())], **K)
    with pytest.raises(TypeError, match="probe: batch\\['labels'\\] must hold integer token ids"):
        pp.bif(lm, [ids], dict(input_ids=ids[:2], labels=ids[:2].float()), **K)


def test_float_tokens_through_the_devinterp_entry_point_and_susceptibilities_name_the_loader(lm):
    ids = _ids()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TypeError, match="loader: a torch.float32 tensor batch"):
            pp.estimate_learning_coeff_with_summary(
                lm, loader=[ids.float()], num_chains=1, num_draws=2, optimizer_kwargs=dict(lr=1e-4, nbeta=1.0)
            )
    with pytest.raises(TypeError, match="^loader: "):
        pp.susceptibilities(lm, [ids.float()], ids[:2], ["blocks.0.attn.head.1"], **K)


def test_a_pair_of_the_tokens_with_themselves_is_refused_for_a_language_model(lm):
    ids = _ids()
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, ids), batch_size=4)
    with pytest.raises(ValueError, match="y equal to x for a language model"):
        pp.estimate_llc(lm, dl, **K)
    # the forms the message points to give the next-token loss
    a = pp.estimate_llc(lm, [ids], **K).init_loss
    b = pp.estimate_llc(lm, [dict(input_ids=ids, labels=ids)], **K).init_loss
    assert a == pytest.approx(b, rel=1e-6)


def test_class_targets_of_the_wrong_shape_or_range_are_refused():
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
    with pytest.raises(ValueError, match="squeeze its last dimension"):
        pp.estimate_llc(mlp, [(X, Y[:, None])], **K)
    with pytest.raises(ValueError, match="contain class 1[0-3]; the model scores 4 classes"):
        pp.estimate_llc(mlp, [(X, Y + 10)], **K)
    with pytest.raises(ValueError, match="the model scores 4 classes"):
        pp.bif(mlp, [(X, Y)], (X[:4], Y[:4] + 10), **K)
    ok = pp.estimate_llc(mlp, [(X, Y)], **K)
    assert torch.isfinite(torch.as_tensor(ok.llc_mean))
    y_ignore = Y.clone()
    y_ignore[0] = -100  # ignored targets stay allowed
    pp.estimate_llc(mlp, [(X, y_ignore)], **K)


def test_bif_refuses_checkpoint_settings_it_would_ignore(lm):
    ids = _ids()
    for key, val in (("checkpoint", "b.npz"), ("checkpoint_every", 2)):
        with pytest.raises(TypeError, match=f"bif takes no {key}="):
            pp.bif(lm, [ids], ids[:2], **{key: val}, **K)


def test_a_list_of_token_sequences_is_refused_with_the_stacked_form(lm):
    """A probe handed over as a list of 1-D token sequences: two of them would be read as a pair (x, y), more as a
    batch with extra elements; each refused naming the argument and pointing to torch.stack, which works."""
    ids = _ids()
    with pytest.raises(ValueError, match=r"probe: two 1-D token tensors of 10 ids.*torch\.stack"):
        pp.bif(lm, [ids], [ids[0], ids[1]], **K)
    with pytest.raises(
        ValueError, match=r"^probe: .*for 3 token sequences give them as one tensor, torch\.stack"
    ):
        pp.susceptibilities(lm, [ids], [ids[0], ids[1], ids[2]], ["blocks.0.attn"], **K)
    res = pp.bif(lm, [ids], torch.stack([ids[0], ids[1]]), **K)
    assert res.bif.shape[0] == res.bif.shape[1]


def test_one_token_per_sample_pairs_stay_valid_for_a_users_token_classifier():
    """(x, y) pairs of 1-D token ids and labels are a valid batch for a module that embeds one token per sample
    (only sequence models, pypattern's, TransformerLens' and Hugging Face's, read (batch, pos) batches)."""

    class TokClassifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 8)
            self.out = torch.nn.Linear(8, 10)

        def get_input_embeddings(self):
            return self.emb

        def forward(self, x):
            return self.out(self.emb(x))

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 10, (64,), generator=g)
    torch.manual_seed(0)
    res = pp.estimate_llc(TokClassifier(), [(x, (x + 3) % 10)], localization=100.0, **K)
    assert torch.isfinite(torch.tensor(res.llc_mean))
