"""The library's one rule for the estimators' default losses, on batches as users hold them (found by review): pairs
that a DataLoader over a TensorDataset of a language model's tensors yields, the devinterp entry points and
susceptibilities checking every loader batch they score by the rule, one sampler loss for bif and
susceptibilities, the per-sample gradient Gram's reference on mapping batches, and models returning
``(loss, logits)``."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pypattern as pp
from pypattern import gram
from pypattern import losses as L

transformers = pytest.importorskip("transformers")

K = dict(
    num_chains=2, num_draws=2, num_burnin_steps=0, step_size=1e-4, localization=100.0, nbeta=2.0, quiet=True
)
SHIM = dict(num_chains=2, num_draws=2, num_burnin_steps=0, verbose=False)
SHIM_OPT = dict(lr=1e-4, localization=100.0, nbeta=2.0)


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, intermediate_size=40, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


def _batch():
    ids = torch.randint(1, 50, (4, 8), generator=torch.Generator().manual_seed(0))
    am = torch.ones_like(ids)
    am[0, 5:] = 0
    am[2, 6:] = 0
    return ids, am, ids.masked_fill(am == 0, -100)


def _shim(model, loader):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pp.estimate_learning_coeff_with_summary(model, loader, optimizer_kwargs=SHIM_OPT, **SHIM)


# ------------------------------------------------------------------ pairs a TensorDataset of LM tensors yields


def test_ids_with_hugging_face_labels_as_a_pair_are_refused_like_ids_with_themselves(lm):
    ids, am, labels = _batch()
    with pytest.raises(
        ValueError, match=r"^loader: a pair \(x, y\) with y equal to x for a language model"
    ) as e:
        L.check_batch(lm, (ids, labels), "loader")
    assert "{'input_ids': x, 'labels': y}" in str(e.value) and "(x[:, :-1], y[:, 1:])" in str(e.value)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, labels), batch_size=4)
    with pytest.raises(ValueError, match="^loader: a pair .* y equal to x"):
        pp.estimate_llc(lm, loader, **K)
    # the default losses refuse it too (the per-sample gradient Gram reads them without check_batch)
    for f in (L.batch_loss, L.sample_losses, L.probe_losses):
        with pytest.raises(ValueError, match="y equal to x for a language model"):
            f(lm, (ids, labels))
    # the forms the message names: pairs shifted by the user are read as they are, and give the next-token loss
    shifted = pp.estimate_llc(lm, [(ids[:, :-1], labels[:, 1:])], **K).init_loss
    as_dict = pp.estimate_llc(lm, [{"input_ids": ids, "labels": labels}], **K).init_loss
    assert shifted == pytest.approx(as_dict, rel=1e-5)


def test_ids_with_their_attention_mask_as_a_pair_are_refused_for_a_language_model(lm):
    ids, am, _ = _batch()
    with pytest.raises(ValueError, match="pattern of an attention mask .* scores 50 classes per position"):
        L.batch_loss(lm, (ids, am))
    with pytest.raises(ValueError, match="pattern of an attention mask"):
        L.token_losses(lm, (ids, am.flip(-1)))  # left padding
    with pytest.raises(ValueError, match="pattern of an attention mask"):
        L.batch_loss(lm, (ids, torch.ones_like(ids)))  # no padding at all
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, am), batch_size=4)
    with pytest.raises(ValueError, match=r"^loader: .*\{'input_ids': x, 'attention_mask': y\}"):
        pp.estimate_llc(lm, loader, **K)
    with pytest.raises(ValueError, match="^probe: .*pattern of an attention mask"):
        pp.bif(lm, [ids], (ids, am), **K)
    # per-position 0/1 targets that are not a mask's pattern are read as they are
    alternating = torch.arange(8).remainder(2).expand(4, 8).contiguous()
    assert torch.isfinite(L.batch_loss(lm, (ids, alternating)))


def test_per_position_binary_targets_of_a_two_class_tagger_are_read_as_they_are():
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.e, self.o = nn.Embedding(50, 8), nn.Linear(8, 2)

        def get_input_embeddings(self):
            return self.e

        def forward(self, x):
            return self.o(self.e(x))

    torch.manual_seed(0)
    tagger = Tagger()
    ids, am, _ = _batch()
    tags = am.clone()  # a monotone 0/1 pattern, here the tagger's two classes
    want = F.cross_entropy(tagger(ids).transpose(1, 2), tags)
    torch.testing.assert_close(L.batch_loss(tagger, (ids, tags)), want)
    res = pp.estimate_llc(tagger, [(ids, tags)], **K)
    assert res.init_loss == pytest.approx(float(want.detach()), rel=1e-6)


def test_a_pair_whose_targets_are_all_ignored_is_refused_by_name(lm):
    ids, _, _ = _batch()
    y = torch.full((4, 7), -100)
    with pytest.raises(ValueError, match="^loader: the pair .* has no counted target: every y is -100"):
        pp.estimate_llc(lm, [(ids[:, :-1], y)], **K)


# ------------------------------------------------------------- the devinterp entry points check by the rule


def test_devinterp_entry_points_check_the_batches_the_rule_scores(lm):
    ids, am, labels = _batch()
    bad_label = labels.clone()
    bad_label[2, 4] = 77
    cases = [
        ([(ids, ids), (ids, ids)], r"^loader: a pair \(x, y\) with y equal to x"),
        ([(ids, labels)], r"^loader: a pair \(x, y\) with y equal to x"),
        ([(ids, am)], "^loader: .*pattern of an attention mask"),
        ([{"input_ids": ids, "labels": torch.full_like(ids, -100)}], "^loader: .* has no counted token"),
        ([ids.masked_fill(am == 0, 50)], "^loader contains token id 50; valid ids are 0 .. 49"),
        ([{"input_ids": ids, "labels": bad_label}], r"^loader: batch\['labels'\] contains 77"),
    ]
    for loader, match in cases:
        with pytest.raises(ValueError, match=match):
            _shim(lm, loader)
        with pytest.raises(ValueError, match=match):
            pp.estimate_llc(lm, loader, **K)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"^loader: a pair \(x, y\) with y equal to x"):
            pp.estimate_learning_coeff(lm, [(ids, ids)], optimizer_kwargs=SHIM_OPT, **SHIM)
    # batches the rule reads run, on its loss (a step of 1e-4 stays near L_n(w*))
    out = _shim(lm, [{"input_ids": ids, "attention_mask": am}])
    want = pp.estimate_llc(lm, [{"input_ids": ids, "attention_mask": am}], **K).init_loss
    assert out["loss/trace"] == pytest.approx(want, rel=1e-2)


def test_a_model_returning_its_own_loss_through_the_devinterp_default_is_not_checked_by_the_rule():
    class OwnLoss(nn.Module):
        """Reads (x, y) pairs itself and returns their loss (devinterp's default evaluate, model(batch))."""

        def __init__(self):
            super().__init__()
            self.e, self.o = nn.Embedding(20, 8), nn.Linear(8, 20)

        def get_input_embeddings(self):
            return self.e

        def forward(self, data):
            x, y = data
            return F.cross_entropy(self.o(self.e(x)).transpose(1, 2), y)

    torch.manual_seed(0)
    model = OwnLoss()
    x = torch.randint(0, 20, (4, 6), generator=torch.Generator().manual_seed(0))
    out = _shim(model, [(x, x)])  # the model's own "copy" loss: its choice, not the rule's reading
    with torch.no_grad():
        want = float(model((x, x)))
    assert out["loss/trace"] == pytest.approx(want, rel=1e-2)


# ------------------------------------------------------ susceptibilities check every loader batch by the rule


@pytest.mark.parametrize("fault", ["token id", "label", "no counted token"])
def test_susceptibilities_check_later_loader_batches_by_the_rule(lm, fault):
    ids, _, _ = _batch()
    first = {"input_ids": ids}
    if fault == "token id":
        bad = ids.clone()
        bad[1, 3] = 50
        first, match = ids, "^loader contains token id 50"
    elif fault == "label":
        labels = ids.clone()
        labels[2, 4] = 77
        bad, match = {"input_ids": ids, "labels": labels}, r"^loader: batch\['labels'\] contains 77"
    else:
        bad, match = (
            {"input_ids": ids, "labels": torch.full_like(ids, -100)},
            "^loader: .* has no counted token",
        )
    with pytest.raises(ValueError, match=match):
        pp.susceptibilities(lm, [first, bad], first, ["blocks.0.mlp"], **K)


# ---------------------------------------------------------------- one sampler loss for bif and susceptibilities


def _padded_batch():
    ids = torch.randint(1, 50, (4, 8), generator=torch.Generator().manual_seed(1))
    am = torch.ones_like(ids)
    am[0, 3:] = 0
    am[2, 5:] = 0
    return {"input_ids": ids, "attention_mask": am}


def test_the_chain_loss_of_own_per_token_losses_is_their_mean_over_counted_tokens(lm):
    from pypattern.susceptibility import _chain_loss, per_sample_losses

    batch = _padded_batch()
    per_tok_nan = lambda m, b: L.token_losses(m, b)[0]  # noqa: E731 - NaN at padding
    per_tok_zero = lambda m, b: L.token_losses(m, b, fill=0.0)[0]  # noqa: E731 - 0 at padding
    with torch.no_grad():
        v, mask = L.token_losses(lm, batch)
        naive = v[mask].mean()  # by hand: the counted tokens' losses, each weighing the same
        for fn in (per_tok_nan, per_tok_zero):
            loss, outputs = _chain_loss(fn)(lm, batch)
            torch.testing.assert_close(loss, naive, check_dtype=False)  # summed in float64
            assert outputs.shape == v.shape
        torch.testing.assert_close(_chain_loss(per_sample_losses)(lm, batch)[0], naive, check_dtype=False)
        torch.testing.assert_close(L.batch_loss(lm, batch), naive)
        # per-sample losses: their mean over the samples
        loss, _ = _chain_loss(L.sample_losses)(lm, batch)
        torch.testing.assert_close(loss, L.sample_losses(lm, batch).mean())
        # a pair's ignored targets are left out too
        x, y = (
            batch["input_ids"][:, :-1],
            batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100),
        )
        per_pos = lambda m, b: L.token_losses(m, b, fill=0.0)[0]  # noqa: E731
        loss, _ = _chain_loss(per_pos)(lm, (x, y))
        torch.testing.assert_close(loss, F.cross_entropy(lm(x).logits.transpose(1, 2), y))


@pytest.mark.filterwarnings("ignore:the loss trace is not stationary")
def test_bif_and_susceptibilities_sample_on_one_chain_loss_with_own_per_token_losses(lm):
    model = lm.double()
    try:
        batch = _padded_batch()

        def per_tok(m, b):  # per-token losses, 0 at padding, on another scale than the default's
            return 2.0 * L.token_losses(m, b, fill=0.0)[0]

        def by_hand(m, b):  # their mean over the counted tokens
            v, mask = L.token_losses(m, b, fill=0.0)
            return 2.0 * v.sum() / mask.sum()

        kw = dict(K, num_draws=6, step_size=1e-3, localization=10.0, nbeta=20.0, seed=0)
        args = (model, [batch], batch)
        b_default = pp.bif(*args, per_sample_loss_fn=per_tok, **kw).bif
        b_hand = pp.bif(*args, per_sample_loss_fn=per_tok, loss_fn=by_hand, **kw).bif
        b_plain = pp.bif(*args, per_sample_loss_fn=per_tok, loss_fn=L.batch_loss, **kw).bif
        torch.testing.assert_close(torch.as_tensor(b_default), torch.as_tensor(b_hand), rtol=1e-8, atol=1e-12)
        assert abs(b_default - b_plain).max() > 1e-3 * abs(b_default).max()
        comp = ["blocks.0.mlp"]
        c_default = pp.susceptibilities(*args, comp, per_sample_loss_fn=per_tok, **kw).chi
        c_hand = pp.susceptibilities(*args, comp, per_sample_loss_fn=per_tok, loss_fn=by_hand, **kw).chi
        torch.testing.assert_close(torch.as_tensor(c_default), torch.as_tensor(c_hand), rtol=1e-8, atol=1e-12)
    finally:
        lm.float()


# ---------------------------------------------------------------------- the per-sample gradient Gram's inputs


@pytest.fixture(scope="module")
def converted():
    torch.manual_seed(0)
    neox = transformers.GPTNeoXForCausalLM(
        transformers.GPTNeoXConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32, max_position_embeddings=16)
    ).eval()  # fmt: skip
    return pp.from_hf(neox).double()


def test_the_gram_reference_reads_mapping_batches(converted):
    ids = torch.randint(1, 30, (3, 6), generator=torch.Generator().manual_seed(0))
    am = torch.ones_like(ids)
    am[0, 4:] = 0
    batch = {"input_ids": ids, "attention_mask": am}
    ref = gram.per_sample_grad_gram_reference(converted, L.sample_losses, batch)
    torch.testing.assert_close(
        ref, pp.per_sample_grad_gram(converted, L.sample_losses, batch), rtol=1e-10, atol=1e-12
    )
    enc = transformers.BatchEncoding(batch)
    torch.testing.assert_close(gram.per_sample_grad_gram_reference(converted, L.sample_losses, enc), ref)
    with pytest.raises(ValueError, match=r"must share their first axis, the batch.*3 \(inputs\[0\]\), 2"):
        gram.per_sample_grad_gram_reference(converted, lambda m, b, y: L.sample_losses(m, b), batch, ids[:2])
    with pytest.raises(ValueError, match=r"inputs\[0\]\['attention_mask'\] must hold 1 .* or 0"):
        gram.per_sample_grad_gram_reference(
            converted, L.sample_losses, {"input_ids": ids, "attention_mask": am * 2}
        )


def test_the_gram_check_once_runs_again_for_mapping_inputs_of_another_shape(converted, monkeypatch):
    calls = []
    real = gram._check_capture
    monkeypatch.setattr(gram, "_check_capture", lambda *a, **k: calls.append(1) or real(*a, **k))

    def lf(m, b):
        return L.sample_losses(m, b)

    ids = torch.randint(1, 30, (3, 6), generator=torch.Generator().manual_seed(0))
    pp.per_sample_grad_gram(converted, lf, {"input_ids": ids})
    pp.per_sample_grad_gram(converted, lf, {"input_ids": ids})
    assert len(calls) == 1  # the same shapes: checked once
    pp.per_sample_grad_gram(converted, lf, {"input_ids": ids[:, :4]})
    assert len(calls) == 2  # another shape inside the mapping: checked again


# -------------------------------------------------------------------------- models returning (loss, logits)


class _LossAndLogits(nn.Module):
    def __init__(self, alone: bool = False):
        super().__init__()
        self.e, self.o, self.alone = nn.Embedding(20, 8), nn.Linear(8, 20), alone

    def forward(self, x):
        lg = self.o(self.e(x))
        loss = F.cross_entropy(lg[:, :-1].reshape(-1, 20), x[:, 1:].reshape(-1))
        return (loss,) if self.alone else (loss, lg)


def test_a_model_returning_loss_and_logits_is_read_by_its_logits():
    torch.manual_seed(0)
    model = _LossAndLogits()
    x = torch.randint(0, 20, (4, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(x)[0]
        torch.testing.assert_close(L.batch_loss(model, x), want)
    assert L.token_losses(model, x)[0].shape == (4, 5)
    res = pp.estimate_llc(model, [x], **K)
    assert res.init_loss == pytest.approx(float(want), rel=1e-6)
    # a tuple of the loss alone is the loss, as a 0-dim output is
    alone = _LossAndLogits(alone=True)
    alone.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(L.batch_loss(alone, x), want)
