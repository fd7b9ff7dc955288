"""Batches as Hugging Face users hold them (padded dicts, tokenizer outputs, generate()-style position_ids):
a probe function of one's own reads the counted mask as the default one does, rows without a counted token are
named as the cause of a NaN loss, prompts given as a tokenizer's output are refused with what to give instead,
right-padded batches with generate()-style position_ids are read, and the errors for batches that are not one
batch say so."""

import numpy as np
import pytest
import torch

import pypattern as pp
from pypattern import losses as L

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

V = 40
KW = dict(
    num_chains=2,
    num_draws=4,
    num_burnin_steps=0,
    step_size=1e-3,
    localization=100.0,
    quiet=True,
    seed=0,
    warn_nonstationary=False,
)


def _llama():
    cfg = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=16,
        intermediate_size=20,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).double().eval()


def _seqs(lens, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, V, (n,), generator=g) for n in lens]


def _pad(seqs, side="right", labels=True):
    T = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    am = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
        ids[i, sl], am[i, sl] = s, 1
    b = {"input_ids": ids, "attention_mask": am}
    if labels:
        b["labels"] = torch.where(am.bool(), ids, -100)
    return b


@pytest.fixture(scope="module")
def llama():
    return _llama()


@pytest.fixture(scope="module")
def loader():
    return [_pad(_seqs([9, 5, 7, 4], seed=2)), _pad(_seqs([8, 6, 9, 3], seed=3))]


@pytest.fixture(scope="module")
def probe():
    return _pad(_seqs([7, 4, 6], seed=4))


# 1. a probe function of one's own whose losses have the counted mask's shape reads that mask


@pytest.mark.parametrize(
    "own",
    [
        lambda m, b: L.probe_losses(m, b),
        lambda m, b: L.token_losses(m, b, fill=0.0)[0],
        lambda m, b: L.token_losses(m, b)[0],  # NaN at the padding: read as 0, as the sampler's loss reads it
    ],
    ids=["probe_losses", "token_losses_fill0", "token_losses_nan_fill"],
)
def test_own_per_token_probe_fn_counts_like_the_default(llama, loader, probe, own):
    comps = ["blocks.0.mlp", "blocks.1.attn.head.1"]
    ref = pp.susceptibilities(llama, loader, probe, comps, **KW)
    got = pp.susceptibilities(llama, loader, probe, comps, per_sample_loss_fn=own, **KW)
    assert ref.probe_counted is not None and got.probe_counted is not None
    np.testing.assert_array_equal(got.probe_counted, ref.probe_counted)
    assert np.abs(ref.chi[:, ref.probe_counted]).max() > 0
    np.testing.assert_allclose(got.chi, ref.chi, rtol=1e-9, atol=1e-15)
    assert (got.chi[:, ~got.probe_counted] == 0).all()  # padding columns get no susceptibility
    np.testing.assert_array_equal(got.probe_token, ref.probe_token)


def test_own_per_token_probe_fn_per_sample_and_bif_like_the_default(llama, loader, probe):
    own = lambda m, b: L.token_losses(m, b, fill=0.0)[0]  # noqa: E731
    ref = pp.susceptibilities(llama, loader, probe, ["blocks.0.mlp"], per_token=False, **KW)
    got = pp.susceptibilities(
        llama, loader, probe, ["blocks.0.mlp"], per_token=False, per_sample_loss_fn=own, **KW
    )
    np.testing.assert_allclose(got.chi, ref.chi, rtol=1e-9, atol=1e-15)
    b_ref = pp.bif(llama, loader, probe, **KW)
    b_got = pp.bif(llama, loader, probe, per_sample_loss_fn=own, **KW)
    np.testing.assert_array_equal(b_got.probe_counted, b_ref.probe_counted)
    np.testing.assert_allclose(b_got.bif, b_ref.bif, rtol=1e-9, atol=1e-15)


def test_own_per_token_probe_fn_per_sample_refuses_a_sample_without_counted_token(llama, loader):
    probe = _pad([*_seqs([7, 4], seed=4), torch.tensor([5])])  # one token: no next-token target
    own = lambda m, b: L.token_losses(m, b, fill=0.0)[0]  # noqa: E731
    with pytest.raises(ValueError, match=r"probe samples \[2\] have no counted token"):
        pp.bif(llama, loader, probe, per_token=False, per_sample_loss_fn=own, **KW)


# 3. rows with no counted token named as the cause of a non-finite per-sample loss


def _with_empty_row(batch: dict) -> dict:
    out = {k: v.clone() for k, v in batch.items()}
    out["attention_mask"][-1] = 0
    out["labels"][-1] = -100
    return out


def test_loader_row_without_counted_token_is_named(llama, loader, probe):
    bad = [_with_empty_row(loader[0]), loader[1]]
    with pytest.raises(pp.sampling.NonFiniteLossError) as e:
        pp.bif(llama, bad, probe, per_sample_loss_fn=L.sample_losses, **KW)
    msg = str(e.value)
    assert "batch 0" in msg and "rows [3]" in msg and "no counted token" in msg, msg
    assert "sample_losses gives NaN" in msg and "drop such rows" in msg, msg
    assert "model's weights" not in msg, msg
    with pytest.raises(ValueError) as e:
        pp.susceptibilities(llama, bad, probe, ["blocks.0.mlp"], per_sample_loss_fn=L.sample_losses, **KW)
    msg = str(e.value)
    assert "phi is nan" in msg and "rows [3] have no counted token" in msg and "drop such rows" in msg, msg
    assert "model's weights" not in msg, msg


def test_probe_row_without_counted_token_is_named(llama, loader, probe):
    with pytest.raises(ValueError) as e:
        pp.bif(llama, loader, _with_empty_row(probe), per_sample_loss_fn=L.sample_losses, **KW)
    msg = str(e.value)
    assert "probe samples [2], which have no counted token" in msg and "drop those samples" in msg, msg
    assert "model's weights" not in msg, msg


def test_loader_row_without_counted_token_is_fine_for_per_token_losses(llama, loader, probe):
    """Per-token losses of one's own are averaged over the counted tokens: a row without any is no cause."""
    bad = [_with_empty_row(loader[0]), loader[1]]
    own = lambda m, b: L.token_losses(m, b)[0]  # noqa: E731
    ref = pp.bif(llama, bad, probe, **KW)
    got = pp.bif(llama, bad, probe, per_sample_loss_fn=own, **KW)
    np.testing.assert_allclose(got.bif, ref.bif, rtol=1e-9, atol=1e-15)


def test_genuine_nan_keeps_the_data_or_weights_message(llama, loader, probe):
    def nan_row0(m, b):
        v = L.sample_losses(m, b)
        return torch.where(torch.arange(v.shape[0]) == 0, torch.nan, v)

    with pytest.raises(ValueError, match=r"probe samples \[0\]: the probe data or the model") as e:
        pp.bif(llama, loader, probe, per_sample_loss_fn=nan_row0, **KW)
    assert "no counted token" not in str(e.value)


# 2. prompts given as a tokenizer's output


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.filterwarnings("ignore:edge_attribution. every edge score is 0:RuntimeWarning")
def test_a_tokenizer_output_is_read_by_patching_and_by_circuits(llama, side):
    """Patching and the circuit functions read a tokenizer's output as its ids and mask: left-padded, the
    metric's last position is each prompt's last real token; right-padded, it falls on padding and is refused,
    naming the row. The circuits' engine, handed one directly, refuses it, saying what to give."""
    enc = transformers.BatchEncoding(_pad(_seqs([7, 5, 6], seed=7), side, labels=False))
    metric = pp.LogitDiff(torch.tensor([3, 4, 5]), torch.tensor([6, 7, 8]))
    calls = [
        lambda: pp.activation_patching(llama, "resid_pre", enc, enc, metric=metric, quiet=True),
        lambda: pp.attribution_patching(llama, dict(enc), dict(enc), metric=metric),
        lambda: pp.circuits.edge_attribution(llama, enc, enc, metric=metric),
    ]
    for call in calls:
        if side == "left":
            call()
        else:
            with pytest.raises(
                ValueError, match=r"position 6 of row 1, which attention_mask marks as padding"
            ):
                call()
    from pypattern.circuits.engine import prepare_runs

    with pytest.raises(TypeError) as e:
        prepare_runs(pp.from_hf(llama), None, enc, enc, metric)
    msg = str(e.value)
    assert msg.startswith("clean is a BatchEncoding") and "input_ids" in msg, msg
    assert "attention_mask=" in msg and "edge_attribution" in msg, msg


def test_right_padding_with_per_example_positions_is_exact(llama):
    """The recipe the refusal and the README give: right-padded prompts, the metric read at each one's last real
    token, give each prompt's effects alone at its real positions."""
    clean = _seqs([7, 5, 6], seed=7)
    corrupted = [s.clone() for s in clean]
    for s in corrupted:
        s[1] = s[1] % (V - 1) + 1
    ans, wrong = torch.tensor([3, 4, 5]), torch.tensor([6, 7, 8])
    enc, enc_c = _pad(clean, labels=False), _pad(corrupted, labels=False)
    metric = pp.LogitDiff(ans, wrong, position=enc["attention_mask"].sum(1) - 1)
    grid = pp.activation_patching(
        llama, "resid_pre", enc["input_ids"], enc_c["input_ids"], metric=metric, quiet=True
    )
    for i, s in enumerate(clean):
        alone = pp.activation_patching(
            llama,
            "resid_pre",
            s[None],
            corrupted[i][None],
            metric=pp.LogitDiff(ans[i : i + 1], wrong[i : i + 1]),
            quiet=True,
        )
        torch.testing.assert_close(
            grid.values[i][:, : len(s)], alone.values[0], rtol=1e-6, atol=1e-8, check_dtype=False
        )


# 4. right-padded batches with generate()-style position_ids on a converted model


def test_converted_model_reads_right_padding_with_generate_position_ids(llama):
    conv = pp.from_hf(llama)
    b = _pad(_seqs([9, 6, 4], seed=5))
    am = b["attention_mask"]
    with_pos = dict(b, position_ids=(am.cumsum(-1) - 1).masked_fill(am == 0, 1))
    torch.testing.assert_close(L.sample_losses(conv, with_pos), L.sample_losses(llama, b))
    kw = dict(num_chains=1, num_draws=2, step_size=1e-5, nbeta=2.0, quiet=True)
    r_pos = pp.estimate_llc(conv, [with_pos], **kw)
    r_ref = pp.estimate_llc(conv, [b], **kw)
    assert r_pos.init_loss == r_ref.init_loss
    # left padding with position ids, and position ids other than the columns: the converted forward reads both,
    # as the Hugging Face model does
    left = _pad(_seqs([9, 6, 4], seed=5), "left")
    left["position_ids"] = (left["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    torch.testing.assert_close(L.sample_losses(conv, left), L.sample_losses(llama, left))
    torch.testing.assert_close(L.sample_losses(conv, left), L.sample_losses(llama, b))
    assert np.isfinite(pp.estimate_llc(conv, [left], **kw).init_loss)
    shifted = dict(b, position_ids=b["attention_mask"].cumsum(-1))
    torch.testing.assert_close(L.sample_losses(conv, shifted), L.sample_losses(llama, shifted))


# 5. batched=True on a Hugging Face model with masked batches


def test_batched_true_on_hf_masked_batches_says_to_leave_batched_default(llama, loader):
    with pytest.raises(RuntimeError) as e:
        pp.estimate_llc(llama, loader, batched=True, num_chains=2, num_draws=2, step_size=1e-5, quiet=True)
    msg = str(e.value)
    assert "Hugging Face models build their attention mask with data-dependent code" in msg, msg
    assert "batched=False" in msg and "default" in msg, msg


# 6. wording


@pytest.mark.parametrize("n", [2, 3])
def test_unequal_length_sequences_are_told_to_pad(llama, n):
    batch = _seqs([12, 5, 7][:n])
    for call in (
        lambda: L.check_batch(llama, batch, "batch"),
        lambda: L.sample_losses(llama, batch),
        lambda: pp.estimate_llc(llama, [batch], num_chains=1, num_draws=2, step_size=1e-5, quiet=True),
    ):
        with pytest.raises(ValueError) as e:
            call()
        msg = str(e.value)
        assert "unequal lengths" in msg and "attention_mask" in msg and "torch.stack" in msg, msg
        assert "pair (x, y)" not in msg, msg


def test_accumulated_residual_of_a_left_padded_batch_pools_each_input_alone(llama):
    """A converted model takes the mask: left padding pools each input's real tokens, as the input alone."""
    from pypattern import interpretive

    conv = pp.from_hf(llama)
    seqs = _seqs([9, 6, 4], seed=5)
    b = _pad(seqs, "left", labels=False)
    got, _ = interpretive.accumulated_residual(conv, b["input_ids"], attention_mask=b["attention_mask"])
    for i, s in enumerate(seqs):
        want, _ = interpretive.accumulated_residual(conv, s[None])
        torch.testing.assert_close(got[i : i + 1], want, rtol=1e-9, atol=1e-9)
