"""Susceptibilities and the Bayesian influence function of Hugging Face models on padded Hugging Face batches,
checked against each other through the fluctuation-dissipation identity on the same draws."""

import warnings

import numpy as np
import pytest
import torch

import pypattern as pp
from pypattern.losses import token_losses

transformers = pytest.importorskip("transformers")


def _model(kind):
    if kind == "gpt2":
        cfg = transformers.GPT2Config(
            n_layer=2, n_embd=16, n_head=2, vocab_size=30, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        return transformers.GPT2LMHeadModel(cfg)
    if kind == "neox":
        cfg = transformers.GPTNeoXConfig(
            num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32, vocab_size=30,
            max_position_embeddings=16,
        )  # fmt: skip
        return transformers.GPTNeoXForCausalLM(cfg)
    cfg = transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=16, num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
        vocab_size=30, max_position_embeddings=16,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


@pytest.mark.parametrize(
    ("kind", "dtype", "tol"),
    [("gpt2", torch.float64, 1e-9), ("neox", torch.float64, 1e-9), ("llama", torch.float64, 1e-9),
     ("llama", torch.float32, 1e-3)],
)  # fmt: skip
def test_chi_of_one_tokens_loss_is_nbeta_times_the_bif_row(kind, dtype, tol):
    """With the component moving every weight and ``phi = l_k`` (one probe token's loss), the physics chi is
    ``-nβ (Cov(l_k, l_z) - Cov(l_k, Lbar))`` on the unrestricted posterior, whose ``-Cov(l_i, l_j)`` bif reports
    from the same draws (same seed): ``chi_z = nβ (BIF[k, z] - mean over counted z' of BIF[k, z'])``, 0 at the
    padded entries, which are left out of ``Lbar``. Right-padded Hugging Face batch, per-token entries."""
    warnings.simplefilter("ignore")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    m = _model(kind).to(dtype).eval()
    ids = torch.randint(1, 30, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 3:] = 0
    batch = {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}
    nbeta = 10.0
    kw = dict(
        num_chains=2, num_draws=20, num_burnin_steps=5, step_size=1e-4, nbeta=nbeta, seed=3, quiet=True,
        warn_nonstationary=False,
    )  # fmt: skip

    def phi(model):
        return token_losses(model, batch, fill=0.0)[0][0, 2]

    everything = [n for n, _ in m.named_parameters()]
    r = pp.susceptibilities(m, [batch], batch, {"all": everything}, observable=phi, **kw)
    b = pp.bif(m, [batch], batch, **kw)
    counted = b.probe_counted
    assert counted.tolist() == (mask[:, 1:] == 1).reshape(-1).tolist()
    assert np.array_equal(r.probe_counted, counted)
    k = 2  # entry (sample 0, target position 2)
    want = nbeta * (b.bif[k] - b.bif[k][counted].mean())
    want[~counted] = 0.0
    assert np.all(r.chi[0][~counted] == 0.0)
    scale = np.abs(want).max()
    assert scale > 0
    np.testing.assert_allclose(r.chi[0], want, rtol=0, atol=tol * scale)


def test_single_sample_probe_and_per_head_component_of_an_hf_model():
    """A probe of one padded-free sample gives one column per target token; a per-head component of a Hugging
    Face model (converted for the estimators) gives a finite row with a finite standard error."""
    warnings.simplefilter("ignore")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(1)
    m = _model("neox").double().eval()
    one = {"input_ids": torch.randint(1, 30, (1, 6)), "attention_mask": torch.ones(1, 6, dtype=torch.long)}
    kw = dict(
        num_chains=2, num_draws=10, num_burnin_steps=5, step_size=1e-4, nbeta=10.0, seed=0, quiet=True,
        warn_nonstationary=False,
    )  # fmt: skip
    r = pp.susceptibilities(m, [one], one, ["blocks.0.attn.head.1", "blocks.1.mlp"], **kw)
    assert r.chi.shape == (2, 5)
    assert np.isfinite(r.chi).all() and np.isfinite(r.chi_se).all()
    assert np.abs(r.chi).max() > 0
