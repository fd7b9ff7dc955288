"""Patterning against independent computations: inversions of per-token chi with columns that are not data
points, rank-deficient and unreachable cases, input dtypes and layouts, bounded weights against a generic
constrained solver, and weighted training steps (pypattern's trainer and a Hugging Face loop) against
hand-written ones."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

import pypattern as pp
from pypattern.losses import sample_losses
from pypattern.patterning import Intervention, OnlinePatterner, invert, reweight
from pypattern.tasks import train

transformers = pytest.importorskip("transformers")


def _sum_zero_basis(n: int) -> np.ndarray:
    """An orthonormal basis ``(n, n - 1)`` of the vectors summing to 0."""
    q, _ = np.linalg.qr(np.eye(n)[:, : n - 1] - np.eye(n)[:, n - 1 : n])
    return q


def _min_norm_sum_zero(chi: np.ndarray, t: np.ndarray) -> np.ndarray:
    """The minimum-norm least-squares ``h`` with ``sum(h) = 0``, by lstsq in the sum-zero subspace."""
    q = _sum_zero_basis(chi.shape[1])
    return q @ np.linalg.lstsq(chi @ q, t, rcond=None)[0]


def _padded_chi(seed: int, k: int = 3, n: int = 12):
    rng = np.random.default_rng(seed)
    chi = rng.normal(size=(k, n))
    counted = np.ones(n, bool)
    counted[rng.choice(n, size=4, replace=False)] = False  # padding and -100 labels: chi 0
    chi[:, ~counted] = 0.0
    return chi, counted, rng.normal(size=k) * 0.05


# ------------------------------------------------------------------------------------- columns that are not data


@pytest.mark.parametrize("seed", range(3))
def test_counted_columns_alone_carry_the_reweighting_of_a_padded_chi(seed):
    """With counted=, the inversion of a chi with padded columns is the one of its counted columns alone (min-norm
    sum-zero lstsq there), the padded columns keep weight 1, and the counted tokens' weights, applied as a
    distribution over them, move mu by the target."""
    chi, counted, t = _padded_chi(seed)
    n = int(counted.sum())
    iv = invert(chi, t, counted=counted)
    h = _min_norm_sum_zero(chi[:, counted], t)
    np.testing.assert_allclose(iv.h[counted], h, atol=1e-12)
    np.testing.assert_allclose(iv.weights[counted], 1 + n * h, atol=1e-10)
    assert (iv.h[~counted] == 0).all() and (iv.weights[~counted] == 1).all()
    w = iv.weights[counted]
    response = chi[:, counted] @ (w / w.mean() - 1) / n  # the re-weighted token distribution's response
    np.testing.assert_allclose(response, t, atol=1e-12)
    np.testing.assert_allclose(iv.predicted, t, atol=1e-12)
    assert iv.residual < 1e-10
    # ridge: the shrunk solution on the counted columns, V diag(s / (s^2 + alpha)) U^T t in the sum-zero subspace
    alpha = 0.3
    q = _sum_zero_basis(n)
    u, s, vt = np.linalg.svd(chi[:, counted] @ q, full_matrices=False)
    want = q @ (vt.T @ (s / (s**2 + alpha) * (u.T @ t)))
    r = invert(chi, t, method="ridge", alpha=alpha, counted=counted)
    np.testing.assert_allclose(r.h[counted], want, atol=1e-12)
    assert (r.weights[~counted] == 1).all()


def test_a_bare_padded_chi_warns_naming_counted_and_its_weights_miss_the_target():
    """Without counted=, exactly-zero columns are data points: invert says so by name; their weights shift the
    counted tokens' total, so that applied to the counted tokens alone they do not give the target."""
    chi, counted, t = _padded_chi(5)
    with pytest.warns(UserWarning, match=r"columns exactly 0.*counted=result\.probe_counted"):
        iv = invert(chi, t)
    w, n = iv.weights[counted], int(counted.sum())
    response = chi[:, counted] @ (w / w.mean() - 1) / n
    assert np.linalg.norm(response - t) > 1e-3 * np.linalg.norm(t)
    with warnings.catch_warnings():  # every column said to count: no warning, the bare solve
        warnings.simplefilter("error")
        same = invert(chi, t, counted=np.ones(chi.shape[1], bool))
    np.testing.assert_array_equal(same.weights, iv.weights)


def test_counted_constrained_with_bounds_fractions_and_num_data_match_a_generic_solver():
    """method="constrained" on the counted columns: the optimum of |chi_c (w - 1)/n - t|^2 + alpha |w - 1|^2 / n
    under lo <= w <= hi and f @ w = sum f (SLSQP); padded weights 1. num_data scales the response by n / M."""
    chi, counted, _ = _padded_chi(7, k=2, n=10)
    t = np.array([0.4, -0.3])  # far: the bounds bind
    lo, hi, alpha = 0.2, 2.5, 0.05
    rng = np.random.default_rng(1)
    frac = rng.uniform(0.5, 2.0, size=chi.shape[1])
    a, n = chi[:, counted], int(counted.sum())
    f = frac[counted] * n / frac[counted].sum()

    def obj(w):
        r = a @ (w - 1) / n - t
        return r @ r + alpha * (w - 1) @ (w - 1) / n

    ref = minimize(
        obj,
        np.ones(n),
        method="SLSQP",
        bounds=[(lo, hi)] * n,
        constraints=[{"type": "eq", "fun": lambda w: f @ w - f.sum()}],
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    iv = invert(
        chi,
        t,
        method="constrained",
        min_weight=lo,
        max_weight=hi,
        alpha=alpha,
        fractions=frac,
        counted=counted,
    )
    w = iv.weights[counted]
    assert (w >= lo - 1e-12).all() and (w <= hi + 1e-12).all()
    assert f @ w == pytest.approx(f.sum(), rel=1e-12)
    assert obj(w) <= ref.fun + 1e-10
    np.testing.assert_allclose(w, ref.x, atol=2e-4)
    assert (iv.weights[~counted] == 1).all()
    # num_data: the n counted columns are part of M tokens; the same weights then move mu n / M as far
    m = 4 * n
    p = invert(chi, t * 0.01, counted=counted, num_data=m)
    np.testing.assert_allclose(chi @ p.h, t * 0.01, atol=1e-12)
    np.testing.assert_allclose(p.h[counted], (p.weights[counted] - 1) / m, atol=1e-15)
    with pytest.raises(ValueError, match=rf"num_data=5 is not valid.*{n} counted columns"):
        invert(chi, t, counted=counted, num_data=5)


def test_a_padded_probes_susceptibilities_invert_over_their_counted_tokens():
    """End to end on a Hugging Face GPT-2: a probe with padding and -100 labels gives chi 0 at its uncounted
    columns; invert warns on the bare matrix, and with counted=result.probe_counted is the inversion of the
    counted columns alone."""
    model = pp.from_hf(_gpt2(11, 8).eval())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 11, (6, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    mask[4, 5:] = 0
    labels = torch.where(mask.bool(), ids, -100)
    labels[2, 3] = -100
    probe = {"input_ids": ids[:4], "attention_mask": mask[:4], "labels": labels[:4]}
    comps = ["blocks.0.mlp", "blocks.0.attn.head.0", "blocks.0.attn.head.1"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = pp.susceptibilities(
            model, [{"input_ids": ids, "attention_mask": mask}], probe, comps, num_chains=2, num_draws=4,
            num_burnin_steps=1, step_size=1e-4, localization=10.0, quiet=True, seed=0,
        )  # fmt: skip
    counted = np.asarray(res.probe_counted)
    assert 0 < counted.sum() < counted.size and (res.chi[:, ~counted] == 0).all()
    t = 1e-3 * np.abs(res.chi).max() * np.array([1.0, -0.5, 0.25])
    with pytest.warns(UserWarning, match="counted=result.probe_counted"):
        invert(res.chi, t)
    with pytest.raises(TypeError, match=r"give its matrix, result\.chi.*counted=result\.probe_counted"):
        invert(res, t)
    iv = invert(res.chi, t, counted=res.probe_counted)
    np.testing.assert_allclose(
        iv.h[counted], _min_norm_sum_zero(res.chi[:, counted], t), atol=1e-12 * t.max()
    )
    assert (iv.weights[~counted] == 1).all()
    assert iv.weights[counted].mean() == pytest.approx(1.0, abs=1e-12)


def test_counted_is_checked_by_name():
    chi, counted, t = _padded_chi(0)
    with pytest.raises(TypeError, match="counted must be an array of bools"):
        invert(chi, t, counted=counted.astype(int))
    with pytest.raises(ValueError, match=r"counted has shape \(11,\); give one bool per column"):
        invert(chi, t, counted=counted[:-1])
    with pytest.raises(ValueError, match="counted is False at every column"):
        invert(chi, t, counted=np.zeros(chi.shape[1], bool))
    with pytest.raises(ValueError, match="fractions must be 12 finite positive"):
        invert(chi, t, method="constrained", counted=counted, fractions=np.ones(int(counted.sum())))
    # OnlinePatterner passes it on
    online = OnlinePatterner(lambda step: chi, t, invert_kwargs={"method": "pinv", "counted": counted})
    np.testing.assert_array_equal(online.weights_for(0), invert(chi, t, counted=counted).weights)
    # a torch mask is read as its values
    iv = invert(chi, t, counted=torch.from_numpy(counted))
    np.testing.assert_array_equal(iv.weights, invert(chi, t, counted=counted).weights)


# ------------------------------------------------------------------------------------- rank, reach, dtypes, shapes


@pytest.mark.parametrize("seed", range(3))
def test_rank_deficient_chi_and_unreachable_targets_are_the_sum_zero_least_squares(seed):
    """chi of rank 2 with 4 observables: pinv is the min-norm sum-zero lstsq, the residual its relative misfit;
    ridge with a tiny alpha approaches it."""
    rng = np.random.default_rng(seed)
    chi = rng.normal(size=(4, 2)) @ rng.normal(size=(2, 9))
    t = rng.normal(size=4)  # generically out of the 2-dimensional span
    h = _min_norm_sum_zero(chi, t)
    iv = invert(chi, t)
    np.testing.assert_allclose(iv.h, h, atol=1e-10)
    miss = np.linalg.norm(chi @ h - t) / np.linalg.norm(t)
    assert 0.05 < miss < 1
    assert iv.residual == pytest.approx(miss, rel=1e-9)
    np.testing.assert_allclose(iv.predicted, chi @ h, atol=1e-10)
    r = invert(chi, t, method="ridge", alpha=1e-10)
    np.testing.assert_allclose(r.h, h, atol=1e-6)
    # a target orthogonal to every achievable response: nothing reached, residual 1, uniform weights
    q = _sum_zero_basis(9)
    u = np.linalg.svd(chi @ q)[0]
    iv0 = invert(chi, u[:, -1])
    assert iv0.residual == pytest.approx(1.0, abs=1e-9)
    np.testing.assert_allclose(iv0.weights, 1.0, atol=1e-8)


def test_float32_torch_and_non_contiguous_inputs_give_the_float64_answer():
    rng = np.random.default_rng(3)
    base = rng.normal(size=(6, 20))
    chi = base[::2, ::2]  # non-contiguous (3, 10)
    t = rng.normal(size=3) * 0.1
    want = invert(np.ascontiguousarray(chi), t)
    for given in (
        chi,
        np.asfortranarray(chi),
        torch.from_numpy(base)[::2, ::2],
        torch.from_numpy(chi.T.copy()).T,
    ):
        # (the same values: equal up to the rounding of LAPACK on another memory layout)
        np.testing.assert_allclose(invert(given, t).weights, want.weights, rtol=0, atol=1e-14)
    c32 = chi.astype(np.float32)
    got32 = invert(c32, torch.tensor(t, dtype=torch.float32)[None, :])  # float32 chi, a row target
    exact = invert(c32.astype(np.float64), t.astype(np.float32).astype(np.float64))
    np.testing.assert_allclose(got32.weights, exact.weights, rtol=0, atol=1e-14)
    assert got32.weights.dtype == np.float64
    np.testing.assert_allclose(got32.weights, want.weights, rtol=0, atol=1e-5)
    for method, kw in (("constrained", {}), ("ridge", {"alpha": 0.1})):
        a = invert(torch.from_numpy(base)[::2, ::2].float(), t, method=method, **kw)
        b = invert(c32.astype(np.float64), t, method=method, **kw)
        np.testing.assert_allclose(a.weights, b.weights, atol=1e-12)


def test_one_observable_and_one_sample():
    """One observable (a 1-D chi): the min-norm sum-zero h is chi_c / |chi_c|^2 t. One sample: nothing to
    re-weight, weight 1, residual 1 and a warning."""
    chi = np.array([0.5, -1.0, 2.0, 0.7, 1.5])
    cc = chi - chi.mean()
    iv = invert(chi, [0.2])
    np.testing.assert_allclose(iv.h, cc / (cc @ cc) * 0.2, atol=1e-14)
    np.testing.assert_allclose(iv.predicted, [0.2], atol=1e-14)
    with pytest.warns(UserWarning, match="the same for every data point"):
        one = invert(np.array([[3.0], [1.0]]), np.array([0.1, 0.2]))
    assert one.weights.tolist() == [1.0] and one.residual == pytest.approx(1.0)
    with pytest.warns(UserWarning, match="the same for every data point"):
        c1 = invert(np.array([[3.0]]), [0.1], method="constrained")
    assert c1.weights.tolist() == [1.0]


# ------------------------------------------------------------------------------------- weighted training steps


def _gpt2(vocab: int, n_ctx: int, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=vocab, n_positions=n_ctx, n_embd=16, n_layer=1, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg).double()


def _own_per_sample(logits, targets):
    """Mean cross-entropy over each row's scored positions (targets -100 elsewhere), written out."""
    logp = torch.log_softmax(logits, -1)
    ok = targets != -100
    nll = -logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return torch.where(ok, nll, 0.0).sum(1) / ok.sum(1)


def test_trainer_with_inverted_weights_is_the_hand_written_weighted_adamw_step():
    """pypattern's trainer on a Hugging Face GPT-2 with an Intervention's weights: each step is AdamW on
    mean(w_i loss_i) over the rows drawn by torch.randint from the seed's generator, the weights normalised to
    mean 1 and the loss over scored positions only (extra -100 targets excluded)."""
    task = pp.InductionTask(d_vocab=12, seq_len=9)
    data = task.sample(10, seed=4)
    targets = data.targets.clone()
    targets[0, :] = -100
    targets[0, -1] = data.targets[0, -1].clamp(min=0)  # row 0 scored at its last position only
    targets[3, ::2] = -100
    data = dataclasses.replace(data, targets=targets)
    assert (targets != -100).any(1).all()
    rng = np.random.default_rng(0)
    iv = invert(rng.normal(size=(2, 10)), np.array([0.3, -0.2]), method="constrained", min_weight=0.1)
    w = torch.as_tensor(iv.weights)
    assert not np.allclose(iv.weights, 1)
    steps, bs, lr, wd, seed = 3, 6, 1e-2, 0.01, 11
    model, ref = _gpt2(12, task.n_ctx), _gpt2(12, task.n_ctx)
    train(model, task, steps=steps, batch_size=bs, lr=lr, weight_decay=wd, data=data, sample_weights=iv,
          seed=seed, log_every=0, quiet=True)  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(ref.parameters(), lr=lr, weight_decay=wd)
    wn = w / w.mean()
    for _ in range(steps):
        idx = torch.randint(0, 10, (bs,), generator=g)
        per = _own_per_sample(ref(data.tokens[idx]).logits, targets[idx])
        loss = (wn[idx] * per).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11, msg=name)
    # the same seed again: the same weights bit for bit; another seed: other draws
    again, other = _gpt2(12, task.n_ctx), _gpt2(12, task.n_ctx)
    kw = dict(steps=steps, batch_size=bs, lr=lr, data=data, sample_weights=iv, log_every=0, quiet=True)
    train(again, task, weight_decay=wd, seed=seed, **kw)
    train(other, task, weight_decay=wd, seed=seed + 1, **kw)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), other.parameters()))
    with pytest.raises(ValueError, match=r"sample_weights has shape \(9,\).*give 10"):
        train(_gpt2(12, task.n_ctx), task, **{**kw, "sample_weights": w[:9]})
    bad = w.clone()
    bad[2] = float("nan")
    with pytest.raises(ValueError, match="sample_weights has shape"):
        train(_gpt2(12, task.n_ctx), task, **{**kw, "sample_weights": bad})


class _Rows(torch.utils.data.Dataset):
    """Hugging Face style rows: input_ids, attention_mask (right padding), labels (-100 at padding and at some
    real tokens), and the row's index."""

    def __init__(self, n: int, seq: int, vocab: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, seq), generator=g)
        lengths = torch.randint(3, seq + 1, (n,), generator=g)
        self.mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        self.labels = torch.where(self.mask.bool(), self.ids, -100)
        self.labels[::3, 1] = -100

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i], "row": i}


def test_reweighted_dict_batches_and_the_weighted_loss_step_of_a_hugging_face_model():
    """reweight on a data set of dict rows: dict batches of the drawn rows, reproducible by generator seed, drawn
    in proportion to the weights; mode="loss" weights on sample_losses give the hand-written SGD step (per-row
    mean over counted labels, padding excluded)."""
    ds = _Rows(8, 7, 11)
    w = np.array([0.0, 1.0, 2.0, 0.5, 3.0, 1.0, 0.25, 0.25])

    def drawn(seed, num=None):
        loader = reweight(ds, w, batch_size=4, num_samples=num, generator=torch.Generator().manual_seed(seed))
        out = []
        for b in loader:
            assert set(b) == {"input_ids", "attention_mask", "labels", "row"}
            torch.testing.assert_close(b["input_ids"], ds.ids[b["row"]])
            torch.testing.assert_close(b["labels"], ds.labels[b["row"]])
            out.append(b["row"])
        return torch.cat(out)

    a, b = drawn(0), drawn(0)
    assert torch.equal(a, b) and len(a) == 8 and not torch.equal(a, drawn(1))
    rows = drawn(2, num=6000)
    freq = torch.bincount(rows, minlength=8).double() / len(rows)
    p = torch.as_tensor(w / w.sum())
    assert freq[0] == 0
    assert (freq - p).abs().max() < 5 * torch.sqrt(p * (1 - p) / len(rows)).max()
    # the weighted loss step of one batch with mode="loss" weights (mean 1)
    lw = reweight(ds, w, mode="loss")
    torch.testing.assert_close(lw.double(), torch.as_tensor(w / w.mean()), rtol=1e-6, atol=0)
    model, ref = _gpt2(11, 7), _gpt2(11, 7)
    batch = {k: v for k, v in next(iter(torch.utils.data.DataLoader(ds, batch_size=8))).items() if k != "row"}
    loss = (sample_losses(model, batch) * lw.to(torch.float64)).mean()
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    logits = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    own = _own_per_sample(logits, batch["labels"][:, 1:])
    (own * torch.as_tensor(w / w.mean())).mean().backward()
    torch.optim.SGD(ref.parameters(), lr=0.5).step()
    for p1, p2 in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-6, atol=1e-9)


def test_reweight_refuses_bad_weights_naming_them():
    ds = _Rows(5, 6, 11)
    for bad, msg in (
        (np.ones(4), r"weights has 4 entries but the data has 5 samples"),
        (np.array([1.0, -0.5, 1.0, 1.0, 1.0]), "weights must be finite and non-negative"),
        (np.array([1.0, np.nan, 1.0, 1.0, 1.0]), "weights must be finite and non-negative"),
        (np.zeros(5), "weights are all zero"),
    ):
        with pytest.raises(ValueError, match=msg):
            reweight(ds, bad)
        with pytest.raises(ValueError, match=msg):
            reweight(ds, bad, mode="loss")
    iv = Intervention(
        h=np.zeros(5), weights=np.array([1.0, -1.0, 1.0, 1.0, 3.0]), predicted=np.zeros(1), target=np.ones(1),
        residual=1.0, method="pinv",
    )  # fmt: skip
    with pytest.raises(ValueError, match="weights must be finite and non-negative.*constrained"):
        reweight(ds, iv)
