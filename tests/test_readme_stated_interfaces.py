"""Interfaces the README states, checked against independent computations: ``rbf_cka`` against a loop over the
Song et al. estimator, ``ridge_similarity_cv(multioutput=)``'s rotation (in)variance, the forward's
``stop_at_layer`` / ``start_at_layer`` / ``loss_per_token`` against the cache and a hand cross-entropy,
``run_with_cache``'s ``pos_slice``, ``flag_loss(attention_mask=)`` against a loop over the real labelled
positions, the memory estimate and warning of a patching result, and the LLC of weights the loss never reads."""

import math
import warnings

import numpy as np
import pytest
import torch

import pypattern as pp

pytestmark = pytest.mark.usefixtures("one_thread")


def _unbiased_hsic(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    """Song et al. (2012), term by term."""
    n = k.shape[0]
    kt, lt = k.copy(), l.copy()
    np.fill_diagonal(kt, 0.0)
    np.fill_diagonal(lt, 0.0)
    one = np.ones(n)
    return (
        np.trace(kt @ lt)
        + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
        - 2.0 / (n - 2) * one @ kt @ lt @ one
    ) / (n * (n - 3))


def _rbf(x: np.ndarray, threshold: float) -> np.ndarray:
    n = x.shape[0]
    d = np.array([[float(((x[i] - x[j]) ** 2).sum()) for j in range(n)] for i in range(n)])
    return np.exp(-d / (2.0 * threshold**2 * np.median(d)))  # median over all n^2 pairs, diagonal included


def test_rbf_cka_is_the_unbiased_hsic_ratio_of_median_bandwidth_gaussian_kernels():
    from pypattern.equivalence import rbf_cka

    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 5, generator=g, dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(5, 4, generator=g, dtype=torch.float64)) + 0.3 * torch.randn(
        30, 4, generator=g, dtype=torch.float64
    )
    for threshold in (1.0, 0.5):
        k, l = _rbf(x.numpy(), threshold), _rbf(y.numpy(), threshold)  # noqa: E741
        want = _unbiased_hsic(k, l) / math.sqrt(_unbiased_hsic(k, k) * _unbiased_hsic(l, l))
        assert rbf_cka(x, y, threshold=threshold) == pytest.approx(want, rel=1e-10)
    # the bandwidth follows the scale: a rotated, scaled and shifted copy gives the same value
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    assert rbf_cka(3.0 * x @ q + 1.0, y) == pytest.approx(rbf_cka(x, y), rel=1e-9)


def test_ridge_similarity_cv_variance_weighted_is_invariant_to_a_rotation_of_the_target():
    from pypattern.equivalence import ridge_similarity_cv

    g = torch.Generator().manual_seed(1)
    x = torch.randn(80, 6, generator=g, dtype=torch.float64)
    # columns of very different scales and fits: the uniform mean of their R^2 moves under a rotation
    y = torch.cat(
        [x[:, :1] * 5.0, 0.2 * torch.randn(80, 1, generator=g, dtype=torch.float64) + x[:, 1:2] * 0.05], 1
    )
    rot = torch.tensor([[math.cos(0.7), -math.sin(0.7)], [math.sin(0.7), math.cos(0.7)]], dtype=torch.float64)
    kw = dict(alphas=(1.0,), seed=3, sqrt=False)
    pooled = ridge_similarity_cv(x, y, multioutput="variance_weighted", **kw)
    assert ridge_similarity_cv(x, y @ rot, multioutput="variance_weighted", **kw) == pytest.approx(
        pooled, rel=1e-9
    )
    uniform = ridge_similarity_cv(x, y, **kw)
    assert abs(ridge_similarity_cv(x, y @ rot, **kw) - uniform) > 1e-3
    # one column: the two scores are the same R^2
    assert ridge_similarity_cv(x, y[:, :1], multioutput="variance_weighted", **kw) == pytest.approx(
        ridge_similarity_cv(x, y[:, :1], **kw), rel=1e-12
    )
    with pytest.raises(ValueError, match="multioutput"):
        ridge_similarity_cv(x, y, multioutput="raw_values")


@pytest.fixture(scope="module")
def small_model():
    task = pp.InductionTask(d_vocab=16, seq_len=13)
    model = pp.Transformer(task.model_config(n_layers=2, d_model=16, n_heads=2, seed=0)).double()
    return model, task.sample(4, seed=2).tokens


def test_stop_and_start_at_layer_split_the_forward_at_the_cached_stream(small_model):
    model, tokens = small_model
    logits, cache = model.run_with_cache(tokens)
    for layer in range(3):
        torch.testing.assert_close(model(tokens, stop_at_layer=layer), cache[f"blocks.{layer}.hook_resid_pre"]
                                   if layer < 2 else cache["blocks.1.hook_resid_post"], rtol=0, atol=1e-12)  # fmt: skip
    torch.testing.assert_close(
        model(tokens, stop_at_layer=-1), cache["blocks.1.hook_resid_pre"], rtol=0, atol=1e-12
    )
    for layer in (0, 1):
        resid = cache[f"blocks.{layer}.hook_resid_pre"]
        torch.testing.assert_close(model(resid, start_at_layer=layer), logits, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="return_type"):
        model(cache["blocks.1.hook_resid_pre"], start_at_layer=1, return_type="loss")
    # loss_per_token: the next-token cross-entropy at each position, by hand
    per_tok = model(tokens, return_type="loss", loss_per_token=True)
    lp = torch.log_softmax(logits[:, :-1], -1)
    want = -lp.gather(-1, tokens[:, 1:, None])[..., 0]
    torch.testing.assert_close(per_tok, want, rtol=0, atol=1e-12)
    both_logits, both_loss = model(tokens, return_type="both", loss_per_token=True)
    torch.testing.assert_close(both_loss, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(model(tokens, return_type="loss"), want.mean(), rtol=0, atol=1e-12)


def test_run_with_cache_int_pos_slice_keeps_the_axis_and_a_list_counts_negatives_from_the_end(small_model):
    model, tokens = small_model
    names = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z"]
    _, full = model.run_with_cache(tokens, names_filter=names)
    _, one = model.run_with_cache(tokens, names_filter=names, pos_slice=-1)
    _, some = model.run_with_cache(tokens, names_filter=names, pos_slice=[0, -2])
    resid, z = full[names[0]], full[names[1]]
    assert one[names[0]].shape == (4, 1, 16)
    torch.testing.assert_close(one[names[0]], resid[:, [12]], rtol=0, atol=0)
    torch.testing.assert_close(one[names[1]], z[:, [12]], rtol=0, atol=0)  # (batch, pos, head, d_head)
    torch.testing.assert_close(some[names[0]], resid[:, [0, 11]], rtol=0, atol=0)
    # the cache methods' int pos_slice drops the axis, as TransformerLens' do
    _, whole = model.run_with_cache(tokens)
    assert whole.accumulated_resid(layer=1, pos_slice=-1).shape == (2, 4, 16)


def test_flag_loss_attention_mask_leaves_padding_out():
    spec = pp.FlagSpec("blocks.0.hook_resid_pre", dims=(1, 3), num_concepts=2)
    g = torch.Generator().manual_seed(4)
    acts = torch.randn(3, 5, 8, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 1])  # one per sequence
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    code = spec.code(torch.float64, acts.device)
    terms = [
        float(((acts[b, t, [1, 3]] - code[labels[b]]) ** 2).mean())
        for b in range(3)
        for t in range(5)
        if mask[b, t]
    ]
    got = pp.flag_loss(acts, labels, spec, attention_mask=mask)
    assert float(got) == pytest.approx(sum(terms) / len(terms), rel=1e-12)
    # the same as labelling the padding -1
    per_pos = torch.where(mask.bool(), labels[:, None], torch.tensor(-1))
    assert float(pp.flag_loss(acts, per_pos, spec)) == pytest.approx(float(got), rel=1e-12)
    assert float(pp.flag_loss(acts, labels, spec, attention_mask=torch.zeros(3, 5))) == 0.0


def test_patching_results_report_their_batch_and_memory_estimate_and_warn_below_one_unit():
    ioi = pp.IOITask()
    net = pp.Transformer(ioi.model_config(seed=0))
    clean, corrupted, answer, wrong = ioi.patching_pairs(4, seed=1, corruption="abc")
    metric = pp.LogitDiff(answer, wrong)
    free = pp.activation_patching(
        net, "resid_pre", clean, corrupted, metric=metric, max_memory=None, quiet=True
    )
    assert free.info["memory_estimate"] > 0
    with pytest.warns(RuntimeWarning, match=r"max_memory=1000 bytes is below .* one cell"):
        tight = pp.activation_patching(
            net, "resid_pre", clean, corrupted, metric=metric, max_memory=1000, quiet=True
        )
    assert tight.info["max_batch"] == 1 and tight.info["memory_estimate"] > 1000
    torch.testing.assert_close(tight.values, free.values, rtol=1e-5, atol=1e-5)
    atp = pp.attribution_patching(net, clean, corrupted, metric=metric, sites=["z"])["z"]
    assert atp.info["max_batch"] == 4 and atp.info["memory_estimate"] > 0
    with pytest.warns(RuntimeWarning, match=r"max_memory=100 bytes is below .* one prompt"):
        small = pp.attribution_patching(net, clean, corrupted, metric=metric, sites=["z"], max_memory=100)[
            "z"
        ]
    assert small.info["max_batch"] == 1
    # one prompt per pass costs a quarter of four (the estimate is per prompt)
    assert small.info["memory_estimate"] * 4 == atp.info["memory_estimate"]
    torch.testing.assert_close(small.values, atp.values, rtol=1e-5, atol=1e-6)


def test_llc_of_weights_the_loss_never_reads_is_zero_with_a_warning_naming_them():
    class TwoHeads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.read = torch.nn.Linear(4, 2)
            self.unread = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.read(x)

    torch.manual_seed(0)
    x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    kw = dict(num_chains=2, num_draws=5, step_size=1e-3, localization=10.0, quiet=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = pp.estimate_llc(TwoHeads(), loader, restrict_to="unread", **kw)
    assert res.llc_mean == 0.0 and res.llc_se == 0.0
    assert any("'unread'" in str(w.message) and "LLC is 0" in str(w.message) for w in caught)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read = pp.estimate_llc(TwoHeads(), loader, restrict_to="read", **kw)
    assert read.llc_mean != 0.0 and not any("LLC is 0" in str(w.message) for w in caught)
