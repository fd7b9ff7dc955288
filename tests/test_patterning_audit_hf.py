"""Patterning end to end on Hugging Face models (small random GPT-2 and Llama): per-token susceptibilities of a
padded probe with -100 labels inverted over their counted tokens, per-sample ones inside the training data
(num_data), each plan against an independent float64 solution, saved and loaded, and the re-weighted data."""

import warnings

import numpy as np
import pytest
import torch

import pypattern as pp
from pypattern.patterning import Intervention

tr = pytest.importorskip("transformers")

V = 13
_SETTINGS = dict(
    num_chains=2,
    num_draws=4,
    num_burnin_steps=2,
    step_size=1e-5,
    localization=1e3,
    nbeta=10.0,
    seed=1,
    quiet=True,
)


def _gpt2():
    torch.manual_seed(0)
    cfg = tr.GPT2Config(
        vocab_size=V,
        n_embd=16,
        n_layer=1,
        n_head=2,
        n_positions=16,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return tr.GPT2LMHeadModel(cfg).double().eval()


def _llama():
    torch.manual_seed(0)
    cfg = tr.LlamaConfig(
        vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=16,
    )  # fmt: skip
    return tr.LlamaForCausalLM(cfg).double().eval()


def _min_norm(chi, target, m):
    """The weights ``w`` (mean 1) with ``chi (w - 1) / m = target`` of least ``|w - 1|``, by numpy's least squares
    on ``chi`` restricted to sum-zero perturbations (an explicit basis of them)."""
    n = chi.shape[1]
    basis = np.linalg.svd(np.ones((1, n)))[2][1:].T  # (n, n - 1), orthonormal, orthogonal to ones
    y = np.linalg.lstsq(chi @ basis / m, target, rcond=None)[0]
    return 1.0 + basis @ y


@pytest.mark.parametrize("make", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_per_token_chi_of_a_padded_probe_inverts_over_its_counted_tokens(make, tmp_path):
    hf = make()
    data = torch.randint(0, V, (12, 8), generator=torch.Generator().manual_seed(0))
    probe = {
        "input_ids": data[:3],
        "attention_mask": torch.ones(3, 8, dtype=torch.long),
        "labels": data[:3].clone(),
    }
    probe["attention_mask"][0, 6:] = 0
    probe["labels"][0, 6:] = -100
    probe["labels"][2, 3] = -100
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (a few draws: not stationary)
        res = pp.susceptibilities(
            hf, [data], probe, ["blocks.0.attn.head.0", "blocks.0.mlp", "embed"], **_SETTINGS
        )
    counted = res.probe_counted
    assert res.chi.shape == (3, counted.size) and counted.sum() == counted.size - 3
    assert not res.chi[:, ~counted].any() and np.isfinite(res.chi).all()
    chi = res.chi[:, counted]
    target = 0.5 * chi[:, 0] - 0.25 * chi[:, -1]  # reachable: a combination of columns
    for num_data in (None, 500):
        m = int(counted.sum()) if num_data is None else num_data
        plan = pp.invert(res.chi, target, counted=counted, num_data=num_data)
        want = _min_norm(chi, target, m)
        np.testing.assert_allclose(plan.weights[counted], want, rtol=1e-9, atol=1e-9 * np.abs(want - 1).max())
        assert (plan.weights[~counted] == 1).all() and (plan.h[~counted] == 0).all()
        np.testing.assert_allclose(plan.weights[counted].mean(), 1.0, rtol=1e-12)
        np.testing.assert_allclose(plan.predicted, target, rtol=1e-8, atol=1e-12 * np.abs(target).max())
        np.testing.assert_allclose(plan.h[counted], (plan.weights[counted] - 1) / m, rtol=1e-12, atol=0)
    # a bare chi (no counted) warns, and its weights re-balance the padding: not those of the counted plan
    with pytest.warns(UserWarning, match="counted"):
        bare = pp.invert(res.chi, target)
    assert not np.allclose(bare.weights[counted], plan.weights[counted])
    # bounded: feasible, and no worse than the best the bounds allow (the projected-gradient fixed point)
    box = pp.invert(res.chi, 20 * target, counted=counted, method="constrained", max_weight=3.0)
    w = box.weights[counted]
    assert w.min() >= 0 and w.max() <= 3.0 + 1e-12 and (box.weights[~counted] == 1).all()
    np.testing.assert_allclose(w.mean(), 1.0, rtol=1e-12)
    n = chi.shape[1]
    grad = chi.T @ (chi @ (w - 1) / n - 20 * target) / n
    # KKT: with lam the total's multiplier, grad + lam >= 0 where w = 0, <= 0 where w = 3, = 0 between
    lo, hi = w <= 1e-9, w >= 3.0 - 1e-9
    free = ~lo & ~hi
    tol = 1e-8 * np.abs(grad).max()
    # lam >= -grad at the lower bound, <= -grad at the upper one, = -grad where free
    low, high = (-grad[lo]).max(initial=-np.inf), (-grad[hi]).min(initial=np.inf)
    if free.any():
        lam = -grad[free].mean()
        assert np.abs(grad[free] + lam).max() <= tol
        assert low <= lam + tol and lam <= high + tol
    else:
        assert low <= high + tol
    # save / load round trip
    box.save(tmp_path / "plan.npz")
    back = Intervention.load(tmp_path / "plan.npz")
    for f in ("h", "weights", "predicted", "target"):
        np.testing.assert_array_equal(getattr(back, f), getattr(box, f))
    assert back.residual == box.residual and back.method == "constrained"


def test_per_sample_chi_of_training_rows_reweights_a_llama_training_step():
    hf = _llama()
    data = torch.randint(0, V, (16, 8), generator=torch.Generator().manual_seed(1))
    rows = np.array([1, 4, 7, 10, 13])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = pp.susceptibilities(
            hf, [data], data[rows], ["blocks.0.attn", "blocks.0.mlp"], per_token=False, **_SETTINGS
        )
    assert res.chi.shape == (2, rows.size)
    target = res.chi @ np.array([1.0, -0.5, 0.0, 0.25, -0.75]) / 16
    plan = pp.invert(res.chi, target, method="constrained", num_data=16)
    w = np.ones(16)
    w[rows] = plan.weights
    assert w.min() >= 0
    np.testing.assert_allclose(res.chi @ ((w[rows] - 1) / 16), plan.predicted, rtol=1e-10, atol=1e-15)
    # the weighted training loss of the whole data: per-sample losses times reweight's mode="loss" weights is the
    # hand-written sum over rows of w_i * loss_i / sum(w)
    lw = pp.reweight(data, w, mode="loss")
    torch.testing.assert_close(lw.double(), torch.as_tensor(w * 16 / w.sum()), rtol=1e-6, atol=0)
    with torch.no_grad():
        logits = hf(input_ids=data).logits[:, :-1]
        per = torch.nn.functional.cross_entropy(logits.transpose(1, 2), data[:, 1:], reduction="none").mean(1)
    want = float((per * torch.as_tensor(w)).sum() / w.sum())
    got = float((per * lw.double()).mean())
    assert abs(got - want) < 1e-6 * abs(want)
    # the sampler never draws a row of weight 0 and draws the others in proportion
    loader = pp.reweight(data, w, batch_size=64, num_samples=4096, generator=torch.Generator().manual_seed(0))
    drawn = torch.cat([b[0] for b in loader])
    index = {tuple(r.tolist()): i for i, r in enumerate(data)}
    counts = np.bincount([index[tuple(r.tolist())] for r in drawn], minlength=16)
    p = w / w.sum()
    assert (counts[p == 0] == 0).all()
    assert np.abs(counts / counts.sum() - p).max() < 5 * np.sqrt(p * (1 - p) / counts.sum()).max()
