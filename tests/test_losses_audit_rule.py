"""The default losses against a naive computation written here: each sequence run alone, unpadded, and the
cross-entropy of every counted next token (labels unshifted, as Hugging Face's; a target counts when it and the
token it is predicted from are real), averaged over the batch's counted tokens (``batch_loss``) or each row's
(``sample_losses``). Token tensors of int32 and non-contiguous ids, right and left padding, a row of one real
token, a row of padding only, labels with -100, float16 models; Hugging Face's own ``.loss`` where the rule
equals it; and a row of padding only in a float64 Hugging Face model with eager attention, whose NaN activations
must not reach the gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

import pypattern as pp
from pypattern.losses import batch_loss, sample_losses, token_losses
from pypattern.models import Transformer
from pypattern.models.hf import HAS_TRANSFORMERS
from pypattern.sampling.runner import default_loss_fn

pytestmark = pytest.mark.usefixtures("one_thread")
needs_hf = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed")

V, T = 23, 8


def _tf(dtype=torch.float64):
    return Transformer(
        n_layers=2, d_model=16, n_heads=2, d_mlp=32, d_vocab=V, n_ctx=T, act_fn="gelu", normalization_type="LN",
        seed=0, dtype=dtype,
    )  # fmt: skip


def _hf(kind, attn="sdpa", dtype=torch.float64):
    import transformers as tr

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        if kind == "gpt2":
            cfg = tr.GPT2Config(
                vocab_size=V, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
            )
        else:
            cfg = tr.LlamaConfig(
                vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=24, max_position_embeddings=16, bos_token_id=0, eos_token_id=0,
            )  # fmt: skip
        return tr.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).to(dtype).eval()


_CACHE: dict = {}


def _model(kind):
    if kind not in _CACHE:
        if kind != "tf" and not HAS_TRANSFORMERS:
            pytest.skip("transformers is not installed")
        _CACHE[kind] = _tf() if kind == "tf" else _hf(kind)
    return _CACHE[kind]


def _naive(model, ids, am=None, labels=None):
    """Per row, the cross-entropies (float64) of its counted next tokens, the row run alone without padding."""
    rows = []
    for i in range(ids.shape[0]):
        real = torch.ones(ids.shape[1], dtype=torch.bool) if am is None else am[i].bool()
        idx = torch.nonzero(real).flatten()
        s = ids[i, idx].long()
        lab = s if labels is None else labels[i, idx].long()
        ce = []
        if len(idx) >= 2:
            out = model(s[None])
            lg = (out.logits if hasattr(out, "logits") else out)[0].double()
            for t in range(len(idx) - 1):
                if lab[t + 1] != -100 and idx[t + 1] == idx[t] + 1:
                    ce.append(-torch.log_softmax(lg[t], -1)[lab[t + 1]])
        rows.append(torch.stack(ce) if ce else torch.zeros(0, dtype=torch.float64))
    return rows


def _assert_rule(model, batch, ids, am=None, labels=None, tol=1e-9):
    with torch.no_grad():
        rows = _naive(model, ids, am, labels)
        mean = torch.cat(rows).mean()
        per_row = torch.stack(
            [r.mean() if len(r) else torch.tensor(math.nan, dtype=torch.float64) for r in rows]
        )
        kw = dict(rtol=tol, atol=tol)
        torch.testing.assert_close(batch_loss(model, batch).double(), mean, **kw)
        torch.testing.assert_close(default_loss_fn(model, batch).double(), mean, **kw)
        torch.testing.assert_close(sample_losses(model, batch).double(), per_row, equal_nan=True, **kw)
        terms, mask = token_losses(model, batch, fill=0.0)
        assert [int(m.sum()) for m in mask] == [len(r) for r in rows]
        for i, r in enumerate(rows):
            torch.testing.assert_close(terms[i][mask[i]].double(), r, **kw)
            assert (terms[i][~mask[i]] == 0).all()


def _padded(lengths, side, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids, am = torch.zeros(len(lengths), T, dtype=torch.long), torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        sl = slice(0, n) if side == "right" else slice(T - n, T)
        ids[i, sl], am[i, sl] = torch.randint(1, V, (n,), generator=g), 1
    return ids, am


@pytest.mark.parametrize("kind", ["tf", "gpt2", "llama"])
def test_token_tensors_of_any_integer_layout(kind):
    model = _model(kind)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, V, (3, T), generator=g)
    wide = torch.randint(0, V, (T, 5), generator=g).t()[:3]  # non-contiguous
    assert not wide.is_contiguous()
    for batch, ref in [(ids, ids), (ids.int(), ids), (wide, wide), ([ids], ids), (ids[0], ids[:1])]:
        _assert_rule(model, batch, ref)
    _assert_rule(model, {"input_ids": ids.int()}, ids)


@pytest.mark.parametrize("kind", ["tf", "gpt2", "llama"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize(
    "lengths", [(8, 5, 3), (8, 1, 4), (6, 0, 3)], ids=["ragged", "one-token row", "empty row"]
)
def test_padded_dicts_with_and_without_labels(kind, side, lengths):
    model = _model(kind)
    if side == "left" and kind == "tf":
        pytest.skip("refused for a model that takes no mask (tested in test_losses)")
    ids, am = _padded(lengths, side)
    batch = {"input_ids": ids, "attention_mask": am}
    if side == "left":
        batch["position_ids"] = (am.cumsum(-1) - 1).clamp(min=0)
    _assert_rule(model, batch, ids, am)
    _assert_rule(model, {**batch, "input_ids": ids.int(), "attention_mask": am.bool()}, ids, am)
    labels = ids.masked_fill(am == 0, -100)
    labels[:, T - 3] = -100
    _assert_rule(model, {**batch, "labels": labels}, ids, am, labels)
    _assert_rule(model, {**batch, "labels": labels.int()}, ids, am, labels)
    if kind != "tf" and side == "right":  # the rule equals Hugging Face's own loss with pads labelled -100
        with torch.no_grad():
            own = model(input_ids=ids, attention_mask=am, labels=labels).loss
        torch.testing.assert_close(
            batch_loss(model, {**batch, "labels": labels}), own.double(), rtol=1e-6, atol=0
        )


@pytest.mark.parametrize("kind", ["tf", "gpt2", "llama"])
def test_float16_models_are_scored_in_float32(kind):
    model = _tf(torch.float16) if kind == "tf" else _hf(kind, dtype=torch.float16)
    ids, am = _padded((8, 5, 3), "right")
    for batch, a in [(ids, None), ({"input_ids": ids, "attention_mask": am}, am)]:
        _assert_rule(model, batch, ids, a, tol=1e-5)
        assert batch_loss(model, batch).dtype == torch.float32
        assert sample_losses(model, batch).dtype == torch.float32


def _grads(model, batch):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(batch_loss(model, batch), params)


@needs_hf
@pytest.mark.filterwarnings("ignore::pypattern.NonStationaryWarning")
def test_a_row_of_padding_only_leaves_the_gradient_of_an_eager_float64_model_finite():
    """Llama in float64 with eager attention takes its softmax in float32, where a row whose keys are all masked
    is NaN; the row has no counted target, so the loss and its gradient must equal those of the batch without it."""
    model = _hf("llama", attn="eager")
    ids, am = _padded((8, 5, 3), "right")
    ids_pad, am_pad = (
        torch.cat([ids[:1], torch.zeros_like(ids[:1]), ids[1:]]),
        torch.cat([am[:1], torch.zeros_like(am[:1]), am[1:]]),
    )
    with torch.no_grad():  # the model's own forward: NaN at the row of padding only
        assert torch.isnan(model(input_ids=ids_pad, attention_mask=am_pad).logits[1]).all()
    full = {"input_ids": ids_pad, "attention_mask": am_pad}
    without = {"input_ids": ids, "attention_mask": am}
    torch.testing.assert_close(batch_loss(model, full), batch_loss(model, without), rtol=1e-12, atol=0)
    for a, b in zip(_grads(model, full), _grads(model, without), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    kw = dict(num_chains=1, num_draws=3, num_burnin_steps=0, step_size=1e-5, nbeta=1.0, seed=0, quiet=True)
    got = pp.estimate_llc(model, [full], **kw).loss_trace
    want = pp.estimate_llc(model, [without], **kw).loss_trace
    torch.testing.assert_close(torch.as_tensor(got), torch.as_tensor(want), rtol=1e-9, atol=0)


def test_pairs_against_torch_losses():
    """(x, y) pairs: class indices with -100 (int32 too), per-position classes, regression."""
    torch.manual_seed(0)
    lin, emb = torch.nn.Linear(4, 5), torch.nn.Embedding(7, 5)
    x, y = torch.randn(6, 4), torch.tensor([0, 4, -100, 2, 1, 3])
    with torch.no_grad():
        torch.testing.assert_close(batch_loss(lin, (x, y.int())), F.cross_entropy(lin(x), y))
        torch.testing.assert_close(sample_losses(lin, (x, y)), F.cross_entropy(lin(x), y, reduction="none"))
        xs, ys = torch.randint(0, 7, (3, 4)), torch.randint(0, 5, (3, 4))
        ys[1, :3], ys[0, 2] = -100, -100
        want = F.cross_entropy(emb(xs).transpose(1, 2), ys, reduction="none")
        torch.testing.assert_close(batch_loss(emb, (xs, ys)), want[ys != -100].mean())
        torch.testing.assert_close(
            sample_losses(emb, (xs, ys)), torch.stack([want[i][ys[i] != -100].mean() for i in range(3)])
        )
        yr = torch.randn(6, 5)
        torch.testing.assert_close(batch_loss(lin, (x, yr)), F.mse_loss(lin(x), yr))
        torch.testing.assert_close(sample_losses(lin, (x, yr)), ((lin(x) - yr) ** 2).mean(1))
