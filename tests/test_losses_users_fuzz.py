"""The default losses on batches as users build them, against independent computations: Hugging Face's own ``.loss``
(next-token shift, -100 labels, padding), per-row losses of the unpadded sequences, naive loops over positions,
torch's cross-entropy and squared error for ``(x, y)`` pairs, every kind of model output, malformed batches, and the
argument checks of ``pypattern._checks``."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pypattern import losses
from pypattern._checks import check_flag, is_count, is_real
from pypattern.losses import batch_loss, check_batch, parse_batch, sample_losses, token_losses
from pypattern.models import Transformer
from pypattern.models.hf import HAS_TRANSFORMERS

pytestmark = pytest.mark.usefixtures("one_thread")
needs_hf = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed")

V = 19
HF_KINDS = ["gpt2", "llama", "neox"]
_CACHE: dict = {}


def _hf(kind: str):
    if kind not in _CACHE:
        import transformers as tr

        torch.manual_seed(3)
        if kind == "gpt2":
            cfg = tr.GPT2Config(
                vocab_size=V, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
            )
        elif kind == "neox":
            cfg = tr.GPTNeoXConfig(
                vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=0,
            )  # fmt: skip
        else:
            cfg = tr.LlamaConfig(
                vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=24, max_position_embeddings=16, bos_token_id=0, eos_token_id=0,
            )  # fmt: skip
        _CACHE[kind] = tr.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").double().eval()
    return _CACHE[kind]


def _tf():
    if "tf" not in _CACHE:
        _CACHE["tf"] = Transformer(
            n_layers=1, d_model=16, n_heads=2, d_mlp=32, d_vocab=V, n_ctx=8, act_fn="gelu",
            normalization_type="LN", seed=0, dtype=torch.float64,
        )  # fmt: skip
    return _CACHE["tf"]


def _padded(rows: list[torch.Tensor], sides: list[str]):
    """Rows of unequal lengths padded to one (id 0 at the padding), each on its side; ids, mask, position ids."""
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, (r, side) in enumerate(zip(rows, sides)):
        sl = slice(0, len(r)) if side == "right" else slice(T - len(r), T)
        ids[i, sl] = r
        mask[i, sl] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


def _close_hf(ours: torch.Tensor, hf: torch.Tensor) -> None:
    """Hugging Face computes its ``.loss`` in float32 (it casts the logits), ours in the logits' float64."""
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, hf.to(ours.dtype), rtol=2e-6, atol=2e-6)


def _row_losses(model, row: torch.Tensor) -> torch.Tensor:
    """Next-token losses of one unpadded sequence, position by position."""
    with torch.no_grad():
        logits = model(input_ids=row[None]).logits[0]
    return torch.stack([-torch.log_softmax(logits[t], -1)[row[t + 1]] for t in range(len(row) - 1)])


def _rows(seed: int, lengths: list[int]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, V, (n,), generator=g) for n in lengths]


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face models: the mean, per-sample and per-token losses against HF's .loss and unpadded rows


@needs_hf
@pytest.mark.parametrize("kind", HF_KINDS)
def test_right_padding_with_labels_equals_hf_loss(kind):
    model = _hf(kind)
    rows = _rows(0, [7, 4, 2])
    ids, mask, _ = _padded(rows, ["right"] * 3)
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 3] = -100  # a target the user leaves out
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    with torch.no_grad():
        hf = model(**batch).loss
        ours = batch_loss(model, batch)
        # derived from input_ids: the padding's targets are not counted, as HF's with -100 at the padding
        derived = batch_loss(model, {"input_ids": ids, "attention_mask": mask})
        hf_masked = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        hf_unmasked = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    _close_hf(ours, hf)
    _close_hf(derived, hf_masked)
    # labels that are not the input ids (another target at each position) are what is scored
    other = ((ids + 1) % V).masked_fill(mask == 0, -100)
    with torch.no_grad():
        _close_hf(
            batch_loss(model, {"input_ids": ids, "attention_mask": mask, "labels": other}),
            model(input_ids=ids, attention_mask=mask, labels=other).loss,
        )
    assert not torch.isclose(derived, hf_unmasked.double())  # HF with labels=input_ids scores the padding too

    # per-token and per-sample: each row's own unpadded sequence, position by position
    terms, counted = token_losses(model, {"input_ids": ids, "attention_mask": mask})
    per_sample = sample_losses(model, {"input_ids": ids, "attention_mask": mask})
    for i, r in enumerate(rows):
        naive = _row_losses(model, r)
        n = len(r) - 1
        torch.testing.assert_close(terms[i, :n].detach(), naive, rtol=1e-6, atol=1e-6)
        assert counted[i, :n].all() and not counted[i, n:].any()
        assert torch.isnan(terms[i, n:]).all()
        torch.testing.assert_close(per_sample[i].detach(), naive.mean(), rtol=1e-6, atol=1e-6)


@needs_hf
@pytest.mark.parametrize("kind", HF_KINDS)
def test_left_and_mixed_padding_equal_unpadded_rows(kind):
    model = _hf(kind)
    rows = _rows(1, [6, 3, 5, 2])
    ids, mask, pos = _padded(rows, ["left", "right", "left", "right"])
    batch = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    with torch.no_grad():
        per_sample = sample_losses(model, batch)
        mean = batch_loss(model, batch)
        terms, counted = token_losses(model, batch, fill=0.0)
    naive = [_row_losses(model, r) for r in rows]
    for i in range(len(rows)):
        torch.testing.assert_close(per_sample[i], naive[i].mean(), rtol=1e-6, atol=1e-6)
        assert int(counted[i].sum()) == len(rows[i]) - 1
    torch.testing.assert_close(mean, torch.cat(naive).mean(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(terms.sum(), torch.cat(naive).sum(), rtol=1e-6, atol=1e-6)

    # the documented difference from HF's .loss with left padding: HF keeps the term in which the last padding
    # position predicts the first real token; removing those terms from HF's sum gives ours
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        logits = model(**batch).logits
        hf = model(**batch, labels=labels).loss
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    hf_terms = (labels[:, 1:] != -100).float()
    extra = hf_terms * (mask[:, :-1] == 0).float()  # counted by HF, predicted from padding
    assert int(extra.sum()) == 1  # the one row with left padding (the other left-padded row fills the width)
    torch.testing.assert_close(
        (-(lp * hf_terms).sum() + (lp * extra).sum()) / (hf_terms.sum() - extra.sum()),
        mean,
        rtol=1e-6,
        atol=1e-6,
    )
    _close_hf(-(lp * hf_terms).sum() / hf_terms.sum(), hf)


@needs_hf
@pytest.mark.parametrize("kind", HF_KINDS)
@pytest.mark.parametrize("dtype", [torch.bool, torch.int32, torch.long, torch.float32, torch.float64])
def test_attention_mask_dtypes_agree(kind, dtype):
    model = _hf(kind)
    rows = _rows(2, [5, 3])
    ids, mask, _ = _padded(rows, ["right", "right"])
    with torch.no_grad():
        ours = batch_loss(model, {"input_ids": ids, "attention_mask": mask.to(dtype)})
        per_sample = sample_losses(model, {"input_ids": ids, "attention_mask": mask.to(dtype)})
    naive = [_row_losses(model, r) for r in rows]
    torch.testing.assert_close(ours, torch.cat(naive).mean(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(per_sample, torch.stack([n.mean() for n in naive]), rtol=1e-6, atol=1e-6)


@needs_hf
@pytest.mark.parametrize("kind", HF_KINDS)
def test_all_padding_row_and_single_tokens(kind):
    model = _hf(kind)
    rows = _rows(3, [5, 4])
    ids, mask, _ = _padded(rows, ["right", "right"])
    ids = torch.cat([ids, torch.zeros(1, ids.shape[1], dtype=torch.long)])
    mask = torch.cat([mask, torch.zeros(1, mask.shape[1], dtype=torch.long)])  # a row of padding only
    batch = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        per_sample = sample_losses(model, batch)
        mean = batch_loss(model, batch)
    naive = [_row_losses(model, r) for r in rows]
    torch.testing.assert_close(per_sample[:2], torch.stack([n.mean() for n in naive]), rtol=1e-6, atol=1e-6)
    assert torch.isnan(per_sample[2])  # documented: NaN for a sample with no counted token
    torch.testing.assert_close(mean, torch.cat(naive).mean(), rtol=1e-6, atol=1e-6)

    one = ids[:, :1]
    terms, counted = token_losses(model, one)
    assert terms.shape == (3, 0) and counted.shape == (3, 0)
    with pytest.raises(ValueError, match="no counted target"):
        batch_loss(model, one)
    with pytest.raises(ValueError, match="no counted token"):
        check_batch(model, one, "probe")


@needs_hf
@pytest.mark.parametrize("kind", HF_KINDS)
def test_labels_all_ignored_is_refused_not_nan(kind):
    model = _hf(kind)
    ids = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(4))
    batch = {"input_ids": ids, "labels": torch.full_like(ids, -100)}
    with pytest.raises(ValueError, match="no counted target"):
        batch_loss(model, batch)
    with pytest.raises(ValueError, match="no counted token"):
        check_batch(model, batch, "probe")
    # labels counted only where the padding is: nothing counts either
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    labels = torch.full_like(ids, -100)
    labels[1, 3] = ids[1, 3]
    with pytest.raises(ValueError, match="no counted target"):
        batch_loss(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
    # per-sample losses of such rows are documented NaN (the mean of no term), per-token losses masked out
    with torch.no_grad():
        assert torch.isnan(sample_losses(model, batch)).all()
        _, counted = token_losses(model, batch)
    assert not counted.any()


@needs_hf
def test_position_ids_and_token_type_ids_are_passed_on():
    model = _hf("gpt2")
    ids = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(5))
    pos = torch.tensor([[3, 4, 5, 6, 7, 8], [0, 1, 2, 3, 4, 5]])
    tt = torch.tensor([[0, 1, 1, 0, 1, 0], [1, 1, 0, 0, 0, 1]])
    with torch.no_grad():
        for extra in (
            {"position_ids": pos},
            {"token_type_ids": tt},
            {"position_ids": pos, "token_type_ids": tt},
        ):
            ours = batch_loss(model, {"input_ids": ids, **extra})
            hf = model(input_ids=ids, labels=ids, **extra).loss
            _close_hf(ours, hf)
            assert not torch.isclose(
                ours, model(input_ids=ids, labels=ids).loss.double()
            )  # the key changed the loss
        for kind in ("llama", "neox"):
            m = _hf(kind)
            _close_hf(
                batch_loss(m, {"input_ids": ids, "position_ids": pos}),
                m(input_ids=ids, position_ids=pos, labels=ids).loss,
            )


@needs_hf
def test_hf_return_dict_false_and_batch_encoding():
    import transformers as tr

    model = _hf("llama")
    ids = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(6))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])

    class Tuples(nn.Module):
        """Hugging Face's ``return_dict=False`` outputs: ``(logits,)`` or, given labels, ``(loss, logits)``."""

        def __init__(self, inner, with_loss):
            super().__init__()
            self.inner, self.with_loss = inner, with_loss

        def forward(self, input_ids, attention_mask=None, use_cache=None):
            labels = input_ids if self.with_loss else None
            return self.inner(
                input_ids=input_ids,
                attention_mask=attention_mask,
                labels=labels,
                use_cache=False,
                return_dict=False,
            )

    with torch.no_grad():
        want = batch_loss(model, {"input_ids": ids, "attention_mask": mask})
        for wrapped in (Tuples(model, False), Tuples(model, True)):
            torch.testing.assert_close(batch_loss(wrapped, {"input_ids": ids, "attention_mask": mask}), want)
        enc = tr.BatchEncoding({"input_ids": ids, "attention_mask": mask})
        torch.testing.assert_close(batch_loss(model, enc), want)


# ---------------------------------------------------------------------------------------------------------------
# pypattern's Transformer


def test_transformer_tokens_and_right_padding():
    model = _tf()
    ids = torch.randint(0, V, (3, 8), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits = model(ids)
        naive = torch.stack(
            [
                torch.stack([-torch.log_softmax(logits[b, t], -1)[ids[b, t + 1]] for t in range(7)])
                for b in range(3)
            ]
        )
        torch.testing.assert_close(batch_loss(model, ids), naive.mean())
        torch.testing.assert_close(batch_loss(model, ids), model(ids, return_type="loss"))
        torch.testing.assert_close(sample_losses(model, ids), naive.mean(1))
        torch.testing.assert_close(token_losses(model, ids)[0], naive)
        torch.testing.assert_close(batch_loss(model, (ids,)), naive.mean())
        for narrow in (torch.int32, torch.int16, torch.uint8):  # ids of a memory-mapped token file
            torch.testing.assert_close(batch_loss(model, ids.to(narrow)), naive.mean())
        # right padding: each row's loss is its unpadded sequence's (a causal model without a mask)
        mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3, [1] * 2 + [0] * 6])
        per_sample = sample_losses(model, {"input_ids": ids, "attention_mask": mask})
        for b, n in enumerate((8, 5, 2)):
            alone = model(ids[b : b + 1, :n], return_type="loss")
            torch.testing.assert_close(per_sample[b], alone)
        labels = ids.masked_fill(mask == 0, -100)
        torch.testing.assert_close(
            batch_loss(model, {"input_ids": ids, "labels": labels}),
            naive[labels[:, 1:] != -100].mean(),
        )
    # left padding: the forward masks the padding keys; with position ids counted from each row's first real
    # token every row's loss is its unpadded sequence's
    left = mask.flip(-1)
    pos = (left.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        per_left = sample_losses(model, {"input_ids": ids, "attention_mask": left, "position_ids": pos})
        for b, n in enumerate((8, 5, 2)):
            torch.testing.assert_close(per_left[b], model(ids[b : b + 1, 8 - n :], return_type="loss"))
    with pytest.raises(ValueError, match="token_type_ids"):
        check_batch(model, {"input_ids": ids, "token_type_ids": torch.zeros_like(ids)}, "probe")


# ---------------------------------------------------------------------------------------------------------------
# (x, y) pairs


class Lin(nn.Module):
    def __init__(self, d_in, d_out, squeeze=False):
        super().__init__()
        torch.manual_seed(8)
        self.lin = nn.Linear(d_in, d_out)
        self.squeeze = squeeze

    def forward(self, x):
        out = self.lin(x)
        return out.squeeze(-1) if self.squeeze else out


@pytest.mark.parametrize("ydtype", [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8])
def test_pair_classification_integer_dtypes(ydtype):
    model = Lin(4, 3)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(6, 4, generator=g)
    y = torch.randint(0, 3, (6,), generator=g)
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(batch_loss(model, (x, y.to(ydtype))), F.cross_entropy(out, y))
        torch.testing.assert_close(
            sample_losses(model, [x, y.to(ydtype)]), F.cross_entropy(out, y, reduction="none")
        )
    if ydtype != torch.uint8:  # -100 ignored: 0 per sample, left out of the mean
        yi = y.clone()
        yi[2] = -100
        with torch.no_grad():
            torch.testing.assert_close(batch_loss(model, (x, yi.to(ydtype))), F.cross_entropy(out, yi))
            per = sample_losses(model, (x, yi.to(ydtype)))
        assert per[2] == 0
        terms, counted = token_losses(model, (x, yi.to(ydtype)))
        assert torch.isnan(terms[2]) and not counted[2] and counted.sum() == 5


def test_pair_classification_shapes_and_sequences():
    g = torch.Generator().manual_seed(10)
    x = torch.randn(4, 4, generator=g)
    model = Lin(4, 3)
    with pytest.raises(ValueError, match=r"squeeze its last dimension"):
        batch_loss(model, (x, torch.randint(0, 3, (4, 1), generator=g)))
    with pytest.raises(ValueError, match="contain class 3"):
        batch_loss(model, (x, torch.tensor([0, 1, 3, 2])))
    with pytest.raises(ValueError, match="no counted target"):
        batch_loss(model, (x, torch.full((4,), -100)))
    with pytest.raises(ValueError, match="no counted target"):
        check_batch(model, (x, torch.full((4,), -100)), "data")
    with pytest.raises(ValueError, match="one class"):
        batch_loss(Lin(4, 1), (x, torch.tensor([0, 0, 0, 0])))
    with pytest.raises(ValueError, match="no class axis"):
        batch_loss(Lin(4, 1, squeeze=True), (x, torch.tensor([0, 1, 1, 0])))
    with pytest.raises(ValueError, match="no class axis"):
        sample_losses(Lin(4, 1, squeeze=True), (x, torch.tensor([0, 1, 1, 0])))
    for bad in (torch.tensor([True, False, True, True]), torch.zeros(4, 3, dtype=torch.complex64)):
        with pytest.raises(TypeError, match="needs integer y"):
            batch_loss(model, (x, bad))
    # per-position classes: (batch, pos, classes) scores, (batch, pos) targets
    xs = torch.randn(3, 5, 4, generator=g)
    ys = torch.randint(0, 3, (3, 5), generator=g)
    ys[1, 2:] = -100
    with torch.no_grad():
        out = model(xs)
        torch.testing.assert_close(
            batch_loss(model, (xs, ys.int())), F.cross_entropy(out.reshape(-1, 3), ys.reshape(-1))
        )
        per = sample_losses(model, (xs, ys))
        flat = F.cross_entropy(out.reshape(-1, 3), ys.reshape(-1), reduction="none").reshape(3, 5)
        for b in range(3):
            keep = ys[b] != -100
            torch.testing.assert_close(per[b], flat[b][keep].mean())


@pytest.mark.parametrize(
    "d_out, yshape, squeeze",
    [(1, (5,), False), (1, (5, 1), False), (1, (5,), True), (1, (5, 1), True), (3, (5, 3), False)],
)
def test_pair_regression_shapes(d_out, yshape, squeeze):
    model = Lin(4, d_out, squeeze)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(5, 4, generator=g)
    y = torch.randn(*yshape, generator=g)
    with torch.no_grad():
        out = model(x).reshape(5, -1)
        want = ((out - y.reshape(5, -1)) ** 2).mean()
        torch.testing.assert_close(batch_loss(model, (x, y)), want)
        torch.testing.assert_close(sample_losses(model, (x, y)), ((out - y.reshape(5, -1)) ** 2).mean(1))
        torch.testing.assert_close(batch_loss(model, (x, y.double())), want.double())


def test_pair_regression_sequence_targets_and_mismatch():
    model = Lin(4, 1)
    g = torch.Generator().manual_seed(12)
    x = torch.randn(3, 6, 4, generator=g)
    y = torch.randn(3, 6, generator=g)
    with torch.no_grad():
        out = model(x).squeeze(-1)
        torch.testing.assert_close(batch_loss(model, (x, y)), F.mse_loss(out, y))
        torch.testing.assert_close(sample_losses(model, (x, y)), ((out - y) ** 2).mean(1))
    with pytest.raises(ValueError, match="regression loss needs one shape"):
        batch_loss(Lin(4, 3), (torch.randn(5, 4), torch.randn(5)))


# ---------------------------------------------------------------------------------------------------------------
# what the model returns


class Returns(nn.Module):
    def __init__(self, make):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(()))
        self.make = make

    def forward(self, tokens):
        g = torch.Generator().manual_seed(13)
        logits = torch.randn(*tokens.shape, V, generator=g, dtype=torch.float64) + self.p
        return self.make(logits)


def test_model_outputs_read_alike():
    import transformers as tr

    ids = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(14))
    logits = Returns(lambda lg: lg)(ids).detach()
    want = F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    scalar = torch.tensor(7.0)
    reads_logits = [
        lambda lg: lg,
        lambda lg: (lg,),
        lambda lg: [lg, torch.zeros(3)],
        lambda lg: (scalar, lg),
        lambda lg: {"logits": lg},
        lambda lg: {"loss": scalar, "logits": lg},
        lambda lg: tr.modeling_outputs.CausalLMOutput(logits=lg),
        lambda lg: tr.modeling_outputs.CausalLMOutput(loss=scalar, logits=lg),
    ]
    for make in reads_logits:
        m = Returns(make)
        torch.testing.assert_close(batch_loss(m, ids).detach(), want)
        assert token_losses(m, ids)[0].shape == (2, 4)
    reads_loss = [
        lambda lg: scalar + 0 * lg.sum(),
        lambda lg: (scalar,),
        lambda lg: {"loss": scalar},
        lambda lg: {"loss": scalar, "logits": None},
        lambda lg: tr.modeling_outputs.CausalLMOutput(loss=scalar),
    ]
    for make in reads_loss:
        m = Returns(make)
        assert float(batch_loss(m, ids)) == 7.0
        with pytest.raises(TypeError, match="returned a scalar"):
            sample_losses(m, ids)
    # a loss that is no scalar is not the batch's mean loss; nor is an output without logits readable
    for make in (
        lambda lg: {"loss": torch.ones(2)},
        lambda lg: {"hidden": lg},
        lambda lg: None,
        lambda lg: [],
    ):
        with pytest.raises(TypeError, match="cannot read logits"):
            batch_loss(Returns(make), ids)
    with pytest.raises(ValueError, match="needs logits"):
        batch_loss(Returns(lambda lg: lg[:, 0]), ids)


# ---------------------------------------------------------------------------------------------------------------
# malformed batches


_IDS = torch.randint(0, V, (2, 4), generator=torch.Generator().manual_seed(15))
_MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
MALFORMED = [
    (_IDS.float(), TypeError, "integer token ids"),
    (_IDS[None], ValueError, r"shape \(batch, pos\)"),
    (torch.tensor(3), ValueError, r"shape \(batch, pos\)"),
    ({"attention_mask": _MASK}, TypeError, "needs a tensor 'input_ids'"),
    ({"input_ids": _IDS.tolist()}, TypeError, "return_tensors='pt'"),
    ({"input_ids": _IDS, "attention_mask": _MASK[:, :3]}, ValueError, r"shape of input_ids \(2, 4\)"),
    ({"input_ids": _IDS, "attention_mask": _MASK * 2}, ValueError, "got the value 2"),
    ({"input_ids": _IDS, "attention_mask": _MASK.float() * 0.5}, ValueError, "got the value 0.5"),
    ({"input_ids": _IDS, "labels": _IDS.float()}, TypeError, "'labels'. must hold integer"),
    ({"input_ids": _IDS, "position_ids": [0, 1, 2, 3]}, TypeError, "'position_ids'. must be a tensor"),
    ((_IDS, _IDS, _IDS), ValueError, "would ignore the other elements"),
    ((_IDS.numpy(), _IDS), TypeError, "must hold two tensors"),
    ((torch.tensor([1, 2, 3]), torch.tensor([1, 2])), ValueError, "unequal lengths"),
    ((torch.randn(2, 3), torch.tensor([True, False])), TypeError, "needs integer y"),
    ({"input_ids": _IDS, "labels": torch.tensor([0, 1])}, ValueError, r"one class label per sequence"),
    (
        {"input_ids": _IDS, "token_type_ids": torch.zeros(2, 3, dtype=torch.long)},
        ValueError,
        "one entry per token",
    ),
    ([], TypeError, "cannot read a list of 0"),
    (None, TypeError, "cannot read a NoneType"),
    ("text", TypeError, "cannot read a str"),
]


@pytest.mark.parametrize("batch, error, match", MALFORMED, ids=[f"m{i}" for i in range(len(MALFORMED))])
def test_malformed_batches_are_named(batch, error, match):
    with pytest.raises(error, match=match):
        parse_batch(batch)
    with pytest.raises(error, match="^probe: .*" + match):
        check_batch(_tf(), batch, "probe")


def test_token_ids_and_labels_outside_the_vocabulary():
    model = _tf()
    with pytest.raises(ValueError, match=f"token id {V}"):
        check_batch(model, torch.tensor([[1, 2, V]]), "probe")
    with pytest.raises(ValueError, match="token id -1"):
        check_batch(model, torch.tensor([[1, -1, 2]]), "probe")
    with pytest.raises(ValueError, match=r"labels'\] contains -5"):
        check_batch(
            model, {"input_ids": torch.tensor([[1, 2, 3]]), "labels": torch.tensor([[1, -5, 3]])}, "probe"
        )
    # a label out of range at a position that is not scored (the first, or padding) is not read
    ok = {
        "input_ids": torch.tensor([[1, 2, 3]]),
        "attention_mask": torch.tensor([[1, 1, 0]]),
        "labels": torch.tensor([[V + 5, 2, V + 9]]),
    }
    check_batch(model, ok, "probe")
    with torch.no_grad():
        torch.testing.assert_close(
            batch_loss(model, ok), -torch.log_softmax(model(torch.tensor([[1, 2]]))[0, 0], -1)[2]
        )


# ---------------------------------------------------------------------------------------------------------------
# argument checks


@pytest.mark.parametrize(
    "value, count, real",
    [
        (3, True, True),
        (np.int64(3), True, True),
        (np.int32(-2), True, True),
        (np.uint8(7), True, True),
        (2**70, True, True),
        (True, False, False),
        (np.bool_(False), False, False),
        (3.0, False, True),
        (np.float32(1.5), False, True),
        (np.float64(2.0), False, True),
        (1 + 0j, False, False),
        ("3", False, False),
        (None, False, False),
        (torch.tensor(3), False, False),
        (torch.tensor(3.0), False, False),
        (torch.tensor(True), False, False),
        (np.array(3), False, False),
        ([3], False, False),
    ],
)
def test_is_count_and_is_real(value, count, real):
    assert is_count(value) is count
    assert is_real(value) is real


def test_check_flag():
    check_flag(True, "x")
    check_flag(np.bool_(False), "x")
    for bad in ("no", 1, 0, None, torch.tensor(True)):
        with pytest.raises(TypeError, match="x=.* is not valid; give True or False"):
            check_flag(bad, "x")


def test_losses_module_exports_documented_names():
    for name in losses.__all__:
        assert hasattr(losses, name)
