"""sample / estimate_llc on unconverted Hugging Face GPT-2 and Llama built from small random configs, with
Hugging Face dict batches (attention_mask, right padding, a smaller last batch), float64 and float32, several
chains, no burn-in and a single draw, against a naive SGLD loop written here: with noise_scale=0 every draw's loss
equals the naive drift loop's (w <- w - eps/2 (nbeta grad L + gamma (w - w*))) on the same batches, and L_n(w*)
is the mean of the naive per-batch losses (next-token cross-entropy over the tokens attention_mask counts); with
noise, batched and sequential chains agree."""

import copy
import warnings

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from pypattern.sampling import estimate_llc, sample  # noqa: E402

EPS, NBETA, GAMMA = 1e-2, 5.0, 10.0


def _model(kind, dtype):
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(
            n_layer=2,
            n_embd=32,
            n_head=4,
            vocab_size=50,
            n_positions=16,
            resid_pdrop=0,
            embd_pdrop=0,
            attn_pdrop=0,
        )
        cfg.bos_token_id = cfg.eos_token_id = 0
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            vocab_size=50,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=0,
        )
        model = transformers.LlamaForCausalLM(cfg)
    return model.to(dtype).eval()


def _padded_batches():
    """Three batches of 3, 3 and 2 sequences; the first sequence of each padded on the right after 5 tokens."""
    g = torch.Generator().manual_seed(1)
    out = []
    for bs in (3, 3, 2):
        ids = torch.randint(1, 50, (bs, 8), generator=g)
        mask = torch.ones(bs, 8, dtype=torch.long)
        mask[0, 5:] = 0
        ids[0, 5:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _naive_loss(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].double(), -1)
    target, counted = batch["input_ids"][:, 1:], batch["attention_mask"][:, 1:].bool()
    nll = -logp.gather(-1, target[..., None])[..., 0]
    return nll[counted].sum() / counted.sum()


def _naive_drift(model, loader, steps):
    """The losses of a noiseless SGLD chain reading the list's batches in order."""
    work = copy.deepcopy(model)
    w_star = {n: p.detach().clone() for n, p in work.named_parameters()}
    losses = []
    for t in range(steps):
        loss = _naive_loss(work, loader[t % len(loader)])
        losses.append(float(loss.detach()))
        grads = torch.autograd.grad(loss, list(work.parameters()), allow_unused=True)
        with torch.no_grad():
            for (n, p), g in zip(work.named_parameters(), grads, strict=True):
                g = torch.zeros_like(p) if g is None else g
                p.add_(-(EPS / 2) * (NBETA * g + GAMMA * (p - w_star[n])))
    return np.asarray(losses)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_noiseless_draws_equal_a_naive_drift_loop_on_padded_dict_batches(kind, dtype):
    model, loader = _model(kind, dtype), _padded_batches()
    with torch.no_grad():
        init = float(np.mean([float(_naive_loss(model, b)) for b in loader]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = sample(
            model,
            loader,
            num_chains=2,
            num_draws=4,
            num_burnin_steps=0,
            step_size=EPS,
            nbeta=NBETA,
            localization=GAMMA,
            noise_scale=0.0,
            seed=0,
            quiet=True,
            warn_nonstationary=False,
        )
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert res.init_loss == pytest.approx(init, abs=tol, rel=tol)
    want = _naive_drift(model, loader, 4)
    np.testing.assert_allclose(res.loss_trace, np.stack([want, want]), rtol=tol, atol=tol)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_a_single_draw_without_burn_in_is_the_loss_at_w_star_of_the_first_batch(kind):
    model, loader = _model(kind, torch.float64), _padded_batches()
    with torch.no_grad():
        losses = [float(_naive_loss(model, b)) for b in loader]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = estimate_llc(
            model,
            loader,
            num_chains=3,
            num_draws=1,
            num_burnin_steps=0,
            step_size=EPS,
            nbeta=NBETA,
            localization=GAMMA,
            seed=0,
            quiet=True,
        )
    want = NBETA * (losses[0] - np.mean(losses))
    np.testing.assert_allclose(res.llc_per_chain, [want] * 3, rtol=1e-10, atol=1e-12)
    assert np.isnan(res.r_hat) and np.isnan(res.ess)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_batched_and_sequential_chains_agree_with_noise_on_unpadded_batches(kind):
    model = _model(kind, torch.float32)
    loader = [{"input_ids": b["input_ids"][:2, :]} for b in _padded_batches()]
    kw = dict(
        num_chains=3, num_draws=3, num_burnin_steps=1, step_size=1e-3, nbeta=NBETA, localization=GAMMA, seed=0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bat = sample(model, loader, batched=True, quiet=True, **kw)
        seq = sample(model, loader, batched=False, quiet=True, **kw)
    assert bat.batched and not seq.batched
    np.testing.assert_allclose(bat.loss_trace, seq.loss_trace, rtol=1e-5, atol=1e-6)
    assert bat.loss_trace.std(axis=0).max() > 1e-3  # the chains' noise differs


def test_batched_true_with_an_attention_mask_names_the_reason_and_the_way_out():
    model, loader = _model("gpt2", torch.float32), _padded_batches()
    with pytest.raises(RuntimeError, match="batched=True.*attention_mask.*batched=False"):
        sample(
            model,
            loader,
            num_chains=2,
            num_draws=2,
            step_size=1e-3,
            nbeta=NBETA,
            localization=GAMMA,
            quiet=True,
            batched=True,
        )
