"""Left-padded Hugging Face style batches on converted models, estimator by estimator.

Tiny random float64 GPT-2 (learned positions) and Llama (rotary, grouped-query attention) models are converted with
:func:`pypattern.from_hf`. A left-padded batch (``input_ids``, ``attention_mask``, with and without ``position_ids =
(mask.cumsum(-1) - 1).clamp(min=0)``) on the converted model must give what the Hugging Face model gives on the same
batch, and, with those positions, what each sequence alone, unpadded, gives: the per-sample gradient Gram (against
per-sample autograd gradients of the Hugging Face model), the LLC's losses and traces, the BIF and the
susceptibilities (the same SGLD steps with the noise off), the activation cache and its analyses (against the Hugging
Face hidden states), and :func:`pypattern.interpretive.accumulated_residual` (against each input run alone).
"""

import warnings

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import pypattern as pp  # noqa: E402
from pypattern import losses as L  # noqa: E402
from pypattern.interpretive import accumulated_residual  # noqa: E402
from pypattern.models import cache_analysis as CA  # noqa: E402
from pypattern.models.hf import finite_padding  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

V, T = 97, 8
COMMON = dict(vocab_size=V, bos_token_id=0, eos_token_id=1, pad_token_id=None)
CASES = {
    "gpt2": (
        transformers.GPT2Config,
        transformers.GPT2LMHeadModel,
        dict(n_layer=2, n_embd=16, n_head=2, n_positions=32),
    ),
    "llama": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=24,
        ),
    ),
}


def hf_model(case: str):
    config_cls, model_cls, kw = CASES[case]
    torch.manual_seed(sum(map(ord, case)))
    model = model_cls(config_cls(**COMMON, **kw))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.15 * torch.randn(p.shape, generator=gen))
    return model.double().eval()


def cumsum_positions(am):
    return (am.cumsum(-1) - 1).clamp(min=0)


def left_batch(n: int = 4, positions: bool = True, seed: int = 3) -> dict:
    """``n`` rows of ``T`` tokens; rows 0, 1 (and 3) padded on the left, row 2 not padded."""
    ids = torch.randint(2, V, (n, T), generator=torch.Generator().manual_seed(seed))
    am = torch.ones(n, T, dtype=torch.long)
    am[0, :3] = 0
    am[1, :1] = 0
    if n > 3:
        am[3, :5] = 0
    b = {"input_ids": ids, "attention_mask": am}
    if positions:
        b["position_ids"] = cumsum_positions(am)
    return b


def right_padded(b: dict) -> dict:
    """The sequences of a left-padded batch moved to the left of their rows (right padding; positions the columns)."""
    ids, am = b["input_ids"].clone(), torch.zeros_like(b["attention_mask"])
    for i in range(ids.shape[0]):
        n = int(b["attention_mask"][i].sum())
        ids[i, :n] = b["input_ids"][i, T - n :]
        am[i, :n] = 1
    return {"input_ids": ids, "attention_mask": am}


@pytest.fixture(scope="module")
def models():
    out = {}
    for case in CASES:
        hf = hf_model(case)
        out[case] = (hf, pp.from_hf(hf))
    return out


def rel(a, b) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max())


def naive_gram(model, batch) -> torch.Tensor:
    """The Gram of per-sample gradients, one autograd pass per sample (its row of the padded batch alone)."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(batch["input_ids"].shape[0]):
        loss = L.sample_losses(model, {k: v[i : i + 1] for k, v in batch.items()})[0]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        rows.append(
            torch.cat(
                [(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)]
            )
        )
    g = torch.stack(rows)
    return g @ g.T


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("positions", [True, False])
def test_grad_gram_of_left_padded_batch_equals_hf_per_sample_gradients(models, case, positions):
    """The positional embedding's per-sample gradient is read at each row's own ``position_ids`` (a gather), not
    at the columns."""
    hf, conv = models[case]
    b = left_batch(positions=positions)
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # GPT-2 without position_ids: shifted positions, the same on both models
        want = naive_gram(hf, b)
        for check in (False, True):
            got = pp.per_sample_grad_gram(conv, L.sample_losses, b, check=check)
            assert rel(got, want) <= 1e-10, (case, positions, check)
    if (
        positions
    ):  # the padded rows' Gram with positions from the mask: that of the sequences alone, right-padded
        torch.testing.assert_close(
            pp.per_sample_grad_gram(conv, L.sample_losses, right_padded(b)), want, rtol=1e-10, atol=0
        )


@pytest.mark.parametrize("case", list(CASES))
def test_llc_bif_and_susceptibilities_with_left_padding_equal_hf(models, case):
    hf, conv = models[case]
    kw = dict(
        num_chains=2, num_draws=3, num_burnin_steps=1, step_size=1e-3, localization=10.0, noise_scale=0.0, seed=4,
        quiet=True, warn_nonstationary=False,
    )  # fmt: skip
    positions = case == "gpt2"  # learned positions with mask positions; rotary with the columns
    loader = [left_batch(positions=positions), left_batch(positions=positions, seed=5)]
    a, b = pp.estimate_llc(conv, loader, **kw), pp.estimate_llc(hf, loader, **kw)
    assert a.init_loss == pytest.approx(b.init_loss, rel=1e-12)
    np.testing.assert_allclose(a.loss_trace, b.loss_trace, rtol=1e-10, atol=0)
    assert np.ptp(a.loss_trace) > 0  # the chains moved
    probe = left_batch(3, positions=positions, seed=7)
    ba, bb = pp.bif(conv, loader, probe, **kw), pp.bif(hf, loader, probe, **kw)
    np.testing.assert_allclose(ba.bif, bb.bif, rtol=1e-8, atol=1e-15)
    assert np.abs(ba.bif).max() > 0
    comps = ["blocks.1.attn.head.1", "blocks.0.mlp", "embed"]
    ours = pp.susceptibilities(conv, loader, probe, comps, **kw)
    theirs = pp.susceptibilities(hf, loader, probe, {c: pp.component_masks(hf, c) for c in comps}, **kw)
    np.testing.assert_allclose(ours.chi, theirs.chi, rtol=1e-8, atol=1e-15)
    # the padding's terms do not count (their chi is 0), and the counted ones are the sequences' own: those of the
    # right-padded probe, shifted by each row's padding
    am = probe["attention_mask"]
    counted = (am[:, 1:] & am[:, :-1]).bool().flatten().numpy()
    np.testing.assert_array_equal(ours.probe_counted, counted)
    assert (ours.chi[:, ~counted] == 0).all()
    if positions:
        right = pp.susceptibilities(conv, loader, right_padded(probe), comps, **kw)
        chi_l, chi_r = ours.chi.reshape(len(comps), 3, T - 1), right.chi.reshape(len(comps), 3, T - 1)
        for i in range(3):
            n = int(am[i].sum())
            np.testing.assert_allclose(chi_l[:, i, T - n :], chi_r[:, i, : n - 1], rtol=1e-7, atol=1e-16)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("positions", [True, False])
def test_cache_of_left_padded_batch_equals_hf_hidden_states(models, case, positions):
    hf, conv = models[case]
    b = left_batch(positions=positions)
    ids, am = b["input_ids"], b["attention_mask"]
    kw = {"position_ids": b["position_ids"]} if positions else {}
    with torch.no_grad(), finite_padding(hf, am):
        hs = hf(
            input_ids=ids, attention_mask=am, use_cache=False, output_hidden_states=True, **kw
        ).hidden_states
        _, cache = conv.run_with_cache(ids, attention_mask=am, **kw)
    real = am.bool()
    n = conv.cfg.n_layers
    for layer in range(n):
        assert rel(cache[f"blocks.{layer}.hook_resid_pre"][real], hs[layer][real]) <= 1e-12, (case, layer)
    for layer in range(n):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
        assert torch.isfinite(pattern).all()
        assert (pattern.masked_select(~real[:, None, None, :].expand_as(pattern)) == 0).all()
        torch.testing.assert_close(  # every real query's pattern sums to one over the real keys
            pattern.sum(-1).permute(0, 2, 1)[real], torch.ones_like(pattern.sum(-1).permute(0, 2, 1)[real])
        )
    # the logit lens' last stream (through ln_final with its own statistics) is Hugging Face's last hidden state
    acc = CA.accumulated_resid(cache, apply_ln=True)
    assert rel(acc[-1][real], hs[-1][real]) <= 1e-12
    full = CA.get_full_resid_decomposition(cache)
    final = cache[f"blocks.{n - 1}.hook_resid_post"]
    assert rel(full.sum(0)[real], final[real]) <= 1e-12


@pytest.mark.parametrize("case", list(CASES))
def test_accumulated_residual_of_left_padded_batch_equals_each_input_alone(models, case):
    """Left padding reaches the converted model's forward with its mask; positions index each input's real
    tokens, the padding weighs 0."""
    hf, conv = models[case]
    b = left_batch(positions=True)
    ids, am = b["input_ids"], b["attention_mask"]
    per_input = torch.tensor([[0], [1], [2], [2]])
    for positions in (None, -1, [0, 1], slice(1, None), slice(-2, None), per_input):
        rep, _ = accumulated_residual(conv, b, positions=positions)
        for i in range(4):
            n = int(am[i].sum())
            own = positions[i : i + 1] if isinstance(positions, torch.Tensor) else positions
            alone, _ = accumulated_residual(conv, ids[i : i + 1, T - n :], positions=own)
            assert rel(rep[i], alone[0]) <= 1e-12, (case, positions, i)
    keyword, _ = accumulated_residual(conv, ids, attention_mask=am, position_ids=b["position_ids"])
    torch.testing.assert_close(keyword, accumulated_residual(conv, b)[0], rtol=0, atol=0)
    # without position_ids: the model's own positions (those of the Hugging Face model given the same batch);
    # a model reading learned positions from the first column warns
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rep, _ = accumulated_residual(conv, {"input_ids": ids, "attention_mask": am})
    assert any("position_ids" in str(w.message) for w in caught) == (case == "gpt2")
    with torch.no_grad(), finite_padding(hf, am):
        hs = hf(input_ids=ids, attention_mask=am, use_cache=False, output_hidden_states=True).hidden_states
    d, real = hs[0].shape[-1], am.bool()
    for layer in range(
        conv.cfg.n_layers
    ):  # Hugging Face's last hidden state is after the final norm: left out
        want = (hs[layer] * real[..., None]).sum(1) / real.sum(1, keepdim=True)
        assert rel(rep[:, layer * d : (layer + 1) * d], want) <= 1e-12, (case, layer)
    with pytest.raises(ValueError, match="no real token among positions"):
        accumulated_residual(
            conv, b, positions=torch.tensor([[0], [1], [2], [3]])
        )  # input 3 has 3 real tokens


def test_reweighted_left_padded_rows_keep_their_mask_and_positions():
    data = left_batch(n=4, positions=True)
    loader = pp.reweight(
        data, np.array([1.0, 0.0, 2.0, 1.0]), batch_size=8, generator=torch.Generator().manual_seed(0)
    )
    batch = next(iter(loader))
    rows = [int((data["input_ids"] == r).all(-1).nonzero()[0, 0]) for r in batch["input_ids"]]
    assert 1 not in rows  # weight 0
    for k in ("attention_mask", "position_ids"):
        torch.testing.assert_close(batch[k], data[k][rows])
