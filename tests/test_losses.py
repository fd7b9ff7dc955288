"""The shared loss rule: batches as users hold them x the model kinds, against naive loops over unpadded sequences,
Hugging Face's own ``.loss``, pypattern's previous defaults for ``(x, y)``, and under ``vmap``."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from pypattern import losses
from pypattern.losses import batch_loss, batch_size, parse_batch, probe_losses, sample_losses, token_losses
from pypattern.models import Transformer
from pypattern.models.hf import HAS_TRANSFORMERS, hooked_hf
from pypattern.sampling.runner import default_loss_fn
from pypattern.susceptibility import per_sample_losses

pytestmark = pytest.mark.usefixtures("one_thread")
needs_hf = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed")

V, T = 23, 8
LENGTHS = [8, 5, 3]


def _tf():
    return Transformer(
        n_layers=2, d_model=16, n_heads=2, d_mlp=32, d_vocab=V, n_ctx=T, act_fn="gelu", normalization_type="LN",
        seed=0, dtype=torch.float64,
    )  # fmt: skip


def _hf(kind: str, attn: str = "eager"):
    import transformers as tr

    torch.manual_seed(1)
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
            intermediate_size=24, max_position_embeddings=16,
        )  # fmt: skip
    return tr.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).double().eval()


class TLStyle(nn.Module):
    """A TransformerLens-style model: ``forward(input, return_type="logits", attention_mask=None)``."""

    def __init__(self):
        super().__init__()
        self.inner = _tf()
        self.masks = []

    def forward(self, input, return_type="logits", attention_mask=None):
        self.masks.append(attention_mask)
        return self.inner(input)


MODELS = ["tf", "tl", "gpt2", "neox", "llama", "hooked_llama"]
_CACHE: dict = {}


def _model(kind):
    if kind not in _CACHE:
        if kind in ("gpt2", "neox", "llama", "hooked_llama") and not HAS_TRANSFORMERS:
            pytest.skip("transformers is not installed")
        _CACHE[kind] = {
            "tf": _tf,
            "tl": TLStyle,
            "gpt2": lambda: _hf("gpt2"),
            "neox": lambda: _hf("neox"),
            "llama": lambda: _hf("llama"),
            "hooked_llama": lambda: hooked_hf(_hf("llama")),
        }[kind]()
    return _CACHE[kind]


def _logits(model, toks):
    """Logits of the model on unpadded tokens, called the way each kind is documented to be called."""
    out = model(toks)
    return out.logits if hasattr(out, "logits") else out


def _naive(model, seqs):
    """Per-sample mean next-token loss, one unpadded sequence at a time."""
    out = []
    for s in seqs:
        lg = _logits(model, s[None])[0, :-1]
        out.append(F.cross_entropy(lg, s[1:]))
    return torch.stack(out)


def _seqs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, V, (n,), generator=g) for n in LENGTHS]


def _padded(seqs, side="right", pad=0):
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    am = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
        ids[i, sl], am[i, sl] = s, 1
    return ids, am


# ------------------------------------------------------------------------------------------ token batches


@pytest.mark.parametrize("kind", MODELS)
def test_token_tensor_matches_naive_loop(kind):
    model = _model(kind)
    toks = torch.randint(0, V, (3, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = _naive(model, list(toks))
        torch.testing.assert_close(sample_losses(model, toks), want)
        torch.testing.assert_close(batch_loss(model, toks), want.mean())
        tl, mask = token_losses(model, toks)
        assert tl.shape == mask.shape == (3, T - 1) and bool(mask.all())
        torch.testing.assert_close(tl.mean(1), want)
        torch.testing.assert_close(sample_losses(model, toks[0]), want[:1])  # 1-D: one sequence
        assert batch_size(toks) == 3 and batch_size(toks[0]) == 1


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("form", ["dict", "batch_encoding", "labels"])
def test_right_padded_batches_equal_unpadded_sequences(kind, form):
    model = _model(kind)
    seqs = _seqs()
    ids, am = _padded(seqs)
    batch = {"input_ids": ids, "attention_mask": am}
    if form == "labels":  # labels given explicitly, -100 at the padding, attention_mask left out
        batch = {"input_ids": ids, "labels": ids.masked_fill(am == 0, -100)}
    elif form == "batch_encoding":
        if not HAS_TRANSFORMERS:
            pytest.skip("transformers is not installed")
        from transformers import BatchEncoding

        batch = BatchEncoding(batch)
    with torch.no_grad():
        want = _naive(model, seqs)
        torch.testing.assert_close(sample_losses(model, batch), want)
        tl, mask = token_losses(model, batch)
        lengths = torch.tensor(LENGTHS)
        assert torch.equal(mask, torch.arange(T - 1)[None] < (lengths - 1)[:, None])
        assert bool(torch.isnan(tl[~mask]).all()) and bool(torch.isfinite(tl[mask]).all())
        tokens_mean = torch.cat([_logits_nll(model, s) for s in seqs]).mean()
        torch.testing.assert_close(
            batch_loss(model, batch), tokens_mean
        )  # every counted token weighs the same
        filled = probe_losses(model, batch)
        assert bool((filled[~mask] == 0).all())
        torch.testing.assert_close(filled[mask], tl[mask])
    assert batch_size(batch) == 3
    if kind == "tl" and form != "labels":
        assert model.masks[-1] is am  # a TransformerLens-style forward gets the attention mask


def _logits_nll(model, s):
    return F.cross_entropy(_logits(model, s[None])[0, :-1], s[1:], reduction="none")


@needs_hf
@pytest.mark.parametrize("kind", ["gpt2", "llama", "hooked_llama"])
def test_left_padding_with_position_ids_equals_unpadded_sequences(kind):
    # sdpa: Llama's eager attention in float64 turns fully masked padding rows into NaN (its mask value overflows),
    # which then reaches the real tokens through the values
    model = hooked_hf(_hf("llama", "sdpa")) if kind == "hooked_llama" else _hf(kind, "sdpa")
    seqs = _seqs(3)
    ids, am = _padded(seqs, side="left")
    pos = (am.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        got = sample_losses(model, {"input_ids": ids, "attention_mask": am, "position_ids": pos})
        torch.testing.assert_close(got, _naive(model, seqs))


class _NoMask(nn.Module):
    """A user's model whose forward takes token ids only (no attention_mask, no position_ids)."""

    def __init__(self):
        super().__init__()
        self.inner = _tf()

    def forward(self, tokens):
        return self.inner(tokens)


def test_left_padding_is_refused_for_a_model_that_takes_no_mask():
    """A model whose forward takes no attention_mask: with left padding its real tokens would attend to the
    padding (losses silently unlike a masked model's), so the entry points refuse the batch; right padding is exact
    for a causal model and passes, and a model that takes the mask (pypattern's Transformer, a TransformerLens-style
    forward) gets left padding too: the Transformer's losses with position ids are the unpadded sequences'."""
    import pypattern as pp

    ids, am = _padded(_seqs(3), side="left")
    left = {"input_ids": ids, "attention_mask": am}
    nomask = _NoMask()
    with pytest.raises(ValueError, match=r"probe: attention_mask row 1 has padding before real tokens"):
        losses.check_batch(nomask, left, "probe")
    with pytest.raises(ValueError, match=r"loader: .*left padding.*_NoMask\.forward takes no attention_mask"):
        pp.estimate_llc(
            nomask, [left], num_chains=1, num_draws=1, num_burnin_steps=0, step_size=1e-6, quiet=True
        )
    with pytest.raises(ValueError, match=r"loader: .*left padding"):  # the library's loss passed by name
        pp.estimate_llc(
            nomask, [left], loss_fn=batch_loss, num_chains=1, num_draws=1, num_burnin_steps=0,
            step_size=1e-6, quiet=True,
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"probe: .*left padding"):
        pp.susceptibilities(
            nomask, [ids], left, ["inner.blocks.0.mlp"], per_sample_loss_fn=sample_losses, num_chains=1,
            num_draws=2, num_burnin_steps=0, step_size=1e-6, quiet=True,
        )  # fmt: skip
    ids_r, am_r = _padded(_seqs(3))
    losses.check_batch(nomask, {"input_ids": ids_r, "attention_mask": am_r}, "probe")
    losses.check_batch(_model("tl"), left, "probe")
    with pytest.warns(UserWarning, match=r"probe: left padding without position_ids: Transformer"):
        losses.check_batch(_model("tf"), left, "probe")  # learned positions read from the first column
    pos = (am.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        got = sample_losses(_model("tf"), {**left, "position_ids": pos})
        torch.testing.assert_close(got, _naive(_model("tf"), _seqs(3)))


def test_attention_mask_values_other_than_zero_and_one_are_refused():
    """A mask of 2s (or -1s, 0.5s) is not a padding mask: reading it as 'nonzero = real' would hide a caller's bug."""
    import pypattern as pp
    from pypattern.interpretive import accumulated_residual

    ids, am = _padded(_seqs(3))
    for bad in (2, -1, 0.5):
        m = am.clone().to(torch.float32 if bad == 0.5 else am.dtype)
        m[0, 0] = bad
        with pytest.raises(
            ValueError, match=r"batch\['attention_mask'\] must hold 1 .* or 0 .*got the value"
        ):
            parse_batch({"input_ids": ids, "attention_mask": m})
        with pytest.raises(ValueError, match=r"attention_mask"):
            pp.estimate_llc(
                _model("tf"), [{"input_ids": ids, "attention_mask": m}], num_chains=1, num_draws=1,
                num_burnin_steps=0, step_size=1e-6, quiet=True,
            )  # fmt: skip
        with pytest.raises(ValueError, match=r"^attention_mask must hold 1"):
            accumulated_residual(_model("tf"), ids, attention_mask=m)
    for ok in (am, am.bool(), am.float()):  # 0/1 in any dtype is read as before
        assert torch.equal(parse_batch({"input_ids": ids, "attention_mask": ok}).attention_mask, ok)


def test_position_and_token_type_ids_are_refused_for_a_model_that_takes_none():
    """Packed sequences (position_ids restarting inside a row) would be read at positions 0, 1, 2, ... by a model
    whose forward takes no position_ids: refused naming the row; plain positions pass (and pypattern's Transformer
    takes position ids). token_type_ids likewise."""
    ids = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(0))
    packed = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 1, 2]])
    with pytest.raises(ValueError, match=r"probe: batch\['position_ids'\] row 1 is not 0 \.\. 5.*takes no"):
        losses.check_batch(_NoMask(), {"input_ids": ids, "position_ids": packed}, "probe")
    plain = torch.arange(6).expand(2, 6)
    losses.check_batch(_NoMask(), {"input_ids": ids, "position_ids": plain}, "probe")
    losses.check_batch(_model("tf"), {"input_ids": ids, "position_ids": packed}, "probe")
    # token_type_ids change a Hugging Face GPT-2's output (their embeddings are added) and would be ignored
    with pytest.raises(ValueError, match=r"probe: the batch has 'token_type_ids'.*drop the key"):
        losses.check_batch(_model("tf"), {"input_ids": ids, "token_type_ids": torch.zeros_like(ids)}, "probe")


@needs_hf
@pytest.mark.parametrize("kind", ["gpt2", "neox", "llama"])
def test_mean_equals_hugging_face_loss(kind):
    model = _model(kind)
    ids, am = _padded(_seqs(4))
    labels = ids.masked_fill(am == 0, -100)
    labels[:, :2] = -100  # score only the continuation after a two-token prompt
    with torch.no_grad():
        for batch in ({"input_ids": ids, "attention_mask": am, "labels": labels}, ids):
            hf = model(**batch).loss if isinstance(batch, dict) else model(ids, labels=ids).loss
            # Hugging Face computes its loss in float32 (it upcasts the logits), ours in the logits' dtype
            torch.testing.assert_close(batch_loss(model, batch), hf.double(), rtol=1e-6, atol=1e-6)


class _LossModule(nn.Module):
    """One of the default losses (``fn``: "batch", "sample" or "token") of ``model`` as a module of the batch, for
    torch.func.functional_call over stacked parameters."""

    LOSSES = {
        "batch": batch_loss,
        "sample": sample_losses,
        "token": lambda m, b: token_losses(m, b, fill=0.0)[0],
    }

    def __init__(self, model, fn: str):
        super().__init__()
        self.model, self.fn = model, self.LOSSES[fn]

    def forward(self, batch):
        return self.fn(self.model, batch)


@needs_hf
@pytest.mark.filterwarnings(
    "ignore:There is a performance drop"
)  # sdpa has no batching rule: a loop inside vmap
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("fn", ["batch", "sample", "token"])
def test_under_vmap_and_functional_call(attn, fn):
    """Many parameter sets at once (as the batched sampler runs chains): equal to one call per parameter set."""
    ids, am = _padded(_seqs(5))
    for model in (_tf(), _hf("gpt2", attn), _hf("llama", attn)):
        w = _LossModule(model, fn)
        g = torch.Generator().manual_seed(0)
        params = {
            k: v.detach() + 0.01 * torch.randn((3, *v.shape), generator=g, dtype=v.dtype)
            for k, v in w.named_parameters()
        }
        for batch in (ids, {"input_ids": ids, "attention_mask": am}):
            with torch.no_grad():
                got = vmap(lambda p, b=batch, w=w: functional_call(w, p, (b,)))(params)
                for c in range(3):
                    one = functional_call(w, {k: v[c] for k, v in params.items()}, (batch,))
                    torch.testing.assert_close(got[c], one)


# ------------------------------------------------------------------------------------------ model outputs


class _Out(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.inner, self.how = _tf(), how

    def forward(self, tokens):
        lg = self.inner(tokens)
        if self.how == "tuple":
            return lg, None
        if self.how == "dict":
            return {"logits": lg}
        if self.how == "model_output":
            from transformers.modeling_outputs import CausalLMOutput

            return CausalLMOutput(logits=lg)
        if self.how == "scalar":
            return self.inner(tokens, return_type="loss")
        return "not an output"


@pytest.mark.parametrize("how", ["tuple", "dict", "model_output", "scalar"])
def test_model_output_forms(how):
    if how == "model_output" and not HAS_TRANSFORMERS:
        pytest.skip("transformers is not installed")
    m = _Out(how)
    toks = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(6))
    want = m.inner(toks, return_type="per_token_loss")
    torch.testing.assert_close(batch_loss(m, toks), want.mean())
    if how == "scalar":
        with pytest.raises(TypeError, match="scalar"):
            sample_losses(m, toks)
    else:
        torch.testing.assert_close(sample_losses(m, toks), want.mean(1))
        torch.testing.assert_close(probe_losses(m, toks), want)


class _PerSequence(nn.Module):
    """One row of logits per sequence: not a language model's output."""

    def forward(self, tokens):
        return torch.zeros(tokens.shape[0], 5)


def test_unreadable_output_and_wrong_logits_shape():
    with pytest.raises(TypeError, match="cannot read logits.*str"):
        batch_loss(_Out("junk"), torch.zeros(2, T, dtype=torch.long))
    with pytest.raises(ValueError, match=r"logits \(batch, pos, vocab\).*\(2, 5\)"):
        batch_loss(_PerSequence(), torch.zeros(2, T, dtype=torch.long))
    assert losses.read_loss((torch.tensor(1.0), 2)) == 1.0
    assert losses.read_loss({"loss": torch.tensor(2.0)}) == 2.0
    with pytest.raises(TypeError, match="tuple"):
        losses.read_loss(3)


# ------------------------------------------------------------------------------------------ (x, y) pairs


class _Classifier(nn.Module):
    def __init__(self, out=3, seq=False, hf_output=False):
        super().__init__()
        self.lin = nn.Linear(5, out)
        self.seq, self.hf_output = seq, hf_output

    def forward(self, x):
        y = self.lin(x)
        if self.hf_output:
            from transformers.modeling_outputs import SequenceClassifierOutput

            return SequenceClassifierOutput(logits=y)
        return y


@pytest.mark.parametrize(
    "case", ["class", "class_ignore", "regress", "regress_2d", "seq", "list", "hf_output"]
)
def test_pairs_keep_the_previous_defaults(case):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 5, generator=g)
    model = _Classifier()
    y = torch.randint(0, 3, (6,), generator=g)
    if case == "class_ignore":
        y[1] = -100
    elif case == "regress":
        model, y = _Classifier(out=1), torch.randn(6, 1, generator=g)
    elif case == "regress_2d":
        y = torch.randn(6, 3, generator=g)
    elif case == "seq":
        x = torch.randn(6, 4, 5, generator=g)
        y = torch.randint(0, 3, (6, 4), generator=g)
    elif case == "hf_output":
        if not HAS_TRANSFORMERS:
            pytest.skip("transformers is not installed")
        model = _Classifier(hf_output=True)
    batch = [x, y] if case == "list" else (x, y)
    lg = model(x).logits if case == "hf_output" else model(x)
    if case != "seq" and case != "hf_output":
        # the sampler's default sums the per-sample losses in float64 (equal to float32 rounding)
        torch.testing.assert_close(batch_loss(model, batch), default_loss_fn(model, batch), check_dtype=False)
        torch.testing.assert_close(probe_losses(model, batch), per_sample_losses(model, batch))
    if case == "seq":
        torch.testing.assert_close(batch_loss(model, batch), F.cross_entropy(lg.transpose(1, 2), y))
        torch.testing.assert_close(
            probe_losses(model, batch), per_sample_losses(model, batch)
        )  # (batch, pos)
        torch.testing.assert_close(sample_losses(model, batch), per_sample_losses(model, batch).mean(1))
    elif y.is_floating_point():
        torch.testing.assert_close(sample_losses(model, batch), ((lg - y) ** 2).mean(1))
    else:
        want = F.cross_entropy(lg, y, reduction="none")
        torch.testing.assert_close(sample_losses(model, batch), want)
        tl, mask = token_losses(model, batch)
        assert torch.equal(mask, y != -100)
        torch.testing.assert_close(tl[mask], want[mask])
        torch.testing.assert_close(batch_loss(model, batch), F.cross_entropy(lg, y))
    assert batch_size(batch) == 6


def test_token_tensor_defaults_agree_with_the_previous_probe_default():
    model = _tf()
    toks = torch.randint(0, V, (3, T), generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(probe_losses(model, toks), per_sample_losses(model, toks))
    torch.testing.assert_close(batch_loss(model, toks), model(toks, return_type="loss"))


# ------------------------------------------------------------------------------------------ bad batches


@pytest.mark.parametrize(
    ("batch", "exc", "pattern"),
    [
        (torch.randn(4, 5), TypeError, r"integer token ids.*torch\.float32 tensor of shape \(4, 5\)"),
        (torch.zeros(2, 3, 4, dtype=torch.long), ValueError, r"\(batch, pos\).*\(2, 3, 4\)"),
        (
            {"x": torch.zeros(2, 3)},
            TypeError,
            r"'input_ids'.*dict with keys \{'x': \(2, 3\) torch\.float32\}",
        ),
        (
            {"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 4)},
            ValueError,
            r"batch\['attention_mask'\].*\(2, 3\).*'attention_mask': \(2, 4\)",
        ),
        ({"input_ids": torch.zeros(2, 3, dtype=torch.long), "labels": [1, 2]}, TypeError, r"'labels': list"),
        ((torch.zeros(2, 3),), TypeError, r"one-element batch's tensor.*integer token ids"),
        (("text",), TypeError, r"cannot read a tuple of 1 element"),
        ((torch.zeros(2, 3), [1, 2]), TypeError, r"two tensors.*tuple of 2 element\(s\) \(a torch\.float32"),
        ("some text", TypeError, r"cannot read a str.*token tensor"),
    ],
)
def test_bad_batches_say_what_was_expected_and_what_arrived(batch, exc, pattern):
    model = _tf()
    for fn in (batch_loss, sample_losses, lambda m, b: token_losses(m, b)):
        with pytest.raises(exc, match=pattern):
            fn(model, batch)


def test_labels_out_of_the_vocabulary_are_named():
    """A scored label that is neither a token id nor -100 (e.g. -1 as the ignore value) is refused naming
    batch['labels'], instead of an index error inside the loss; labels that are not scored are not checked."""
    ids = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(0))
    am = torch.ones_like(ids)
    am[1, 3:] = 0
    for bad in (-1, V):
        labels = ids.clone()
        labels[0, 2] = bad
        with pytest.raises(
            ValueError, match=rf"probe: batch\['labels'\] contains {bad}; .*0 \.\. {V - 1}.* or -100"
        ):
            losses.check_batch(_model("tf"), {"input_ids": ids, "labels": labels}, "probe")
    labels = ids.clone()
    labels[:, 0] = -1  # position 0 is never a target
    labels[1, 4] = V  # behind the padding
    batch = {"input_ids": ids, "attention_mask": am, "labels": labels}
    losses.check_batch(_model("tf"), batch, "probe")
    assert torch.isfinite(batch_loss(_model("tf"), batch))


def test_batch_size_of_other_batches():
    assert batch_size({"input_ids": torch.zeros(5, 3, dtype=torch.long)}) == 5
    assert batch_size((torch.zeros(7, 2), torch.zeros(7))) == 7
    assert batch_size({"pixels": torch.zeros(4, 3, 2)}) == 4  # read by a custom loss: first tensor's length
    with pytest.raises(
        ValueError, match=r"no tensor with a batch axis \(a mapping batch needs a tensor 'input_ids'"
    ):
        batch_size({"text": "abc"})
    assert parse_batch({"input_ids": torch.zeros(3, dtype=torch.long)}).inputs.shape == (1, 3)


def test_a_tensor_dataset_of_tokens_reads_as_its_tokens():
    """``DataLoader(TensorDataset(tokens))`` yields one-element lists: the default losses read the tokens."""
    from torch.utils.data import DataLoader, TensorDataset

    from pypattern.sampling.data import batch_size_of

    model = _tf()
    ids = torch.randint(0, V, (6, 5), generator=torch.Generator().manual_seed(2))
    (batch,) = DataLoader(TensorDataset(ids), batch_size=6)
    assert isinstance(batch, list) and len(batch) == 1
    torch.testing.assert_close(batch_loss(model, batch), batch_loss(model, ids), rtol=0, atol=0)
    torch.testing.assert_close(token_losses(model, (ids,)), token_losses(model, ids), rtol=0, atol=0)
    assert batch_size(batch) == 6 and batch_size_of(batch) == 6
    with pytest.raises(
        ValueError, match=r"loader: cannot count the samples of a list.*expected a token tensor"
    ):
        batch_size_of([{"input_ids": [1, 2, 3]}])


def test_regression_shapes_mask_keyword_and_scalar_batches():
    """A (batch, 1) output against (batch,) float targets is one shape (the losses equal the hand computation;
    they broadcast to (batch, batch) before), other mismatches are refused; a model whose forward takes input_ids
    but no attention_mask is called without one; a pair of 0-d tensors has no batch axis (a named ValueError)."""
    from pypattern import losses as L

    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 1)
    x, y = torch.randn(5, 3), torch.randn(5)
    with torch.no_grad():
        want = (lin(x).squeeze(1) - y) ** 2
        torch.testing.assert_close(L.batch_loss(lin, (x, y)), want.mean())
        torch.testing.assert_close(L.sample_losses(lin, (x, y)), want)
    with pytest.raises(ValueError, match="one shape"):
        L.batch_loss(lin, (x, torch.randn(5, 2)))

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(7, 7)

        def forward(self, input_ids):
            return self.emb(input_ids)

    ids = torch.randint(0, 7, (2, 4))
    mask = torch.ones_like(ids)
    mask[1, -1] = 0
    v = L.batch_loss(LM(), {"input_ids": ids, "attention_mask": mask})
    assert torch.isfinite(v)
    with pytest.raises(ValueError, match="no tensor with a batch axis"):
        L.batch_size((torch.tensor(1.0), torch.tensor(2.0)))


@needs_hf
@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.parametrize("fn", ["batch", "sample", "token"])
def test_under_vmap_over_stacked_dict_batches(fn):
    """Each parameter set with its own padded dict batch (as batched chains read theirs): the mask checks cannot
    read values under vmap; inside stacked_batches_checked (the caller checked each batch before stacking) they are
    left out, and the losses equal one call per set."""
    ids, am = _padded(_seqs(5))
    batches = [{"input_ids": ids.roll(c, 0), "attention_mask": am.roll(c, 0)} for c in range(3)]
    stacked = {k: torch.stack([b[k] for b in batches]) for k in batches[0]}
    for model in (_tf(), _hf("gpt2", "eager")):
        w = _LossModule(model, fn)
        params = {k: v.detach() for k, v in w.named_parameters()}
        for b in batches:
            losses.check_batch_values(model, b)
        call = vmap(lambda b, w=w, params=params: functional_call(w, params, (b,)))
        with torch.no_grad():
            with losses.stacked_batches_checked():
                got = call(stacked)
            for c in range(3):
                torch.testing.assert_close(got[c], functional_call(w, params, (batches[c],)))
            # without the caller's word that it checked them, the checks run, and vmap cannot read the values
            with pytest.raises(RuntimeError, match="data-dependent control flow"):
                call(stacked)
    left_ids, left_am = _padded(_seqs(5), side="left")
    with pytest.raises(ValueError, match="left padding"):
        losses.check_batch_values(_NoMask(), {"input_ids": left_ids, "attention_mask": left_am}, "loader")
    with pytest.raises(ValueError, match="must hold 1"):
        losses.check_batch_values(_tf(), {"input_ids": ids, "attention_mask": am * 2}, "loader")


@needs_hf
@pytest.mark.parametrize("fn", [token_losses, sample_losses, probe_losses])
def test_per_token_losses_name_ids_out_of_a_hugging_face_models_range(fn):
    """GPT-2 looks every position id and token id up in an embedding: ids out of range get the batch's error
    naming the id and the range, not the embedding's bare IndexError; ids in range give the losses as before."""
    model = _hf("gpt2")  # 16 learned positions, V token ids
    x = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(6).expand(2, 6)
    with pytest.raises(ValueError, match=r"batch: position_ids reach 17, but GPT2LMHeadModel has 16 learned"):
        fn(model, {"input_ids": x, "position_ids": pos + 11})
    with pytest.raises(ValueError, match=r"batch\['position_ids'\] contains -2 \(row 0, column 0\)"):
        fn(model, {"input_ids": x, "position_ids": pos - 2})
    with pytest.raises(ValueError, match=rf"contains token id {V}; valid ids are 0 \.\. {V - 1}"):
        fn(model, {"input_ids": torch.where(x == x[0, 0], V, x)})
    first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731 (token_losses: with its mask)
    shifted = first(fn(model, {"input_ids": x, "position_ids": pos + 10}))  # the last learned position is 15
    plain = first(fn(model, {"input_ids": x}))
    assert shifted.shape == plain.shape and torch.isfinite(shifted).all()
    assert not torch.equal(shifted, plain)
