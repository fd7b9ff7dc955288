"""Representation similarity, interpretive equivalence, flags and patterning on inputs as users hold them:
activations that track gradients, float32 products of offset data, target columns of mixed scales, pooling over
padded prompts and at one position, options a method does not read, ties, vocabularies of converted models."""

import warnings

import numpy as np
import pytest
import torch

import pypattern as pp
from pypattern.equivalence import representations, ridge_similarity_cv
from pypattern.interpretive import accumulated_residual, win_test

pytestmark = pytest.mark.usefixtures("one_thread")


def test_similarities_read_activations_that_track_gradients():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 40, generator=g, requires_grad=True)
    x = torch.randn(10, 8, generator=g) @ w  # (10, 40): fewer samples than features, so the Gram form
    y = torch.randn(10, 40, generator=g)
    want = pp.cka_matrix([x.detach(), y])
    for method in ("auto", "gram", "features"):
        got = pp.cka_matrix([x, y], method=method)
        assert not got.requires_grad
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert pp.linear_cka(x, y) == pytest.approx(pp.linear_cka(x.detach(), y), rel=1e-12)
    assert pp.permutation_test(x, y, num_permutations=20).statistic == pytest.approx(
        pp.permutation_test(x.detach(), y, num_permutations=20).statistic, rel=1e-12
    )


def test_float32_products_of_offset_data_are_centred_first():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 12, generator=g, dtype=torch.float64)
    y = x @ torch.randn(12, 12, generator=g, dtype=torch.float64) + 0.5 * torch.randn(
        64, 12, generator=g, dtype=torch.float64
    )
    want = pp.linear_cka(x, y)
    for offset in (1e6, 1e8):
        assert pp.linear_cka(x + offset, y - offset, dtype=torch.float32) == pytest.approx(want, abs=1e-5)
        m = pp.cka_matrix([x + offset], [y], dtype=torch.float32)
        assert float(m[0, 0]) == pytest.approx(want, abs=1e-5)
    # float64 data beyond float32's range are brought to unit scale before the cast
    assert pp.linear_cka(x * 1e150, y, dtype=torch.float32) == pytest.approx(want, abs=1e-5)


def test_ridge_similarity_does_not_depend_on_one_columns_scale():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5))
    y = np.c_[x[:, 0] + 0.1 * rng.normal(size=200), rng.normal(size=200)]
    base = ridge_similarity_cv(torch.tensor(x), torch.tensor(y), sqrt=False)
    for s in (1e-5, 1e-7, 1e-9):
        got = ridge_similarity_cv(torch.tensor(x), torch.tensor(y * np.array([1.0, s])), sqrt=False)
        assert got == pytest.approx(base, abs=2e-3)  # the low-scale column still counts (its R^2 is ~0)
    const = np.c_[y, np.full(200, 3.0)]  # an exactly constant column is left out
    assert ridge_similarity_cv(torch.tensor(x), torch.tensor(const), sqrt=False) == pytest.approx(
        base, abs=1e-9
    )


def test_invert_refuses_options_its_method_does_not_read():
    chi = np.random.default_rng(0).normal(size=(2, 6))
    tgt = np.array([0.1, -0.2])
    with pytest.raises(ValueError, match="alpha=5.0 applies to method='ridge' or 'constrained' only"):
        pp.invert(chi, tgt, method="pinv", alpha=5.0)
    for method, kw in (("ridge", dict(alpha=1.0)), ("constrained", {})):
        with pytest.raises(ValueError, match="rcond applies to method='pinv' only"):
            pp.invert(chi, tgt, method=method, rcond=1e-3, **kw)
    assert pp.invert(chi, tgt, method="pinv", rcond=1e-3).weights.shape == (6,)


def _model():
    return pp.Transformer(
        pp.TransformerConfig(n_layers=2, d_model=16, n_heads=2, d_mlp=32, d_vocab=30, n_ctx=12, seed=0)
    )


def test_accumulated_residual_pools_real_tokens_and_reads_one_position():
    model = _model()
    g = torch.Generator().manual_seed(2)
    toks = torch.randint(1, 30, (4, 9), generator=g)
    lengths = [9, 6, 7, 4]
    am = (torch.arange(9)[None] < torch.tensor(lengths)[:, None]).long()
    rep = {}
    for pad in (0, 29):
        padded = torch.where(am.bool(), toks, pad)
        rep[pad], _ = accumulated_residual(model, {"input_ids": padded, "attention_mask": am})
        alone, _ = accumulated_residual(model, padded, attention_mask=am)
        torch.testing.assert_close(alone, rep[pad], rtol=0, atol=0)
    torch.testing.assert_close(rep[0], rep[29], rtol=1e-6, atol=1e-6)  # the pad id does not matter
    for i, n in enumerate(lengths):  # each input pooled over its own real tokens, run unpadded
        want, _ = accumulated_residual(model, toks[i : i + 1, :n])
        torch.testing.assert_close(rep[0][i : i + 1], want, rtol=1e-5, atol=1e-6)
    last, _ = accumulated_residual(model, toks, positions=-1)
    torch.testing.assert_close(last, accumulated_residual(model, toks, positions=slice(-1, None))[0])
    two, _ = accumulated_residual(model, toks, positions=2)
    torch.testing.assert_close(two, accumulated_residual(model, toks, positions=slice(2, 3))[0])
    # left padding: each input's real tokens moved to the end, with position ids counted from the first of them,
    # pool what the right-padded batch pools (the forward masks the padding keys)
    left_am = am.flip(1)
    left = torch.zeros_like(toks)
    for i, n in enumerate(lengths):
        left[i, 9 - n :] = toks[i, :n]
    pos = (left_am.cumsum(1) - 1).clamp(min=0)
    got, _ = accumulated_residual(model, left, attention_mask=left_am, position_ids=pos)
    torch.testing.assert_close(got, rep[0], rtol=1e-5, atol=1e-6)
    with pytest.warns(UserWarning, match="left padding without position_ids"):  # learned positions, shifted
        accumulated_residual(model, left, attention_mask=left_am)
    with pytest.raises(ValueError, match="out of range"):
        accumulated_residual(model, toks, positions=9)
    with pytest.raises(TypeError, match="from_hf"):
        accumulated_residual(torch.nn.Linear(2, 2), toks)


def test_representations_refuse_what_they_cannot_read():
    model = _model()
    toks = torch.randint(0, 30, (3, 5))
    with pytest.raises(TypeError, match="padding would enter the features"):
        representations(model, {"input_ids": toks, "attention_mask": torch.ones_like(toks)})
    with pytest.raises(TypeError, match="from_hf"):
        representations(torch.nn.Linear(2, 2), toks)
    with pytest.raises(KeyError, match="not hook points of the model"):
        representations(model, toks, hooks=["blocks.0.attn.hook_nothing"])


def test_win_test_warns_when_every_comparison_ties():
    g = torch.Generator().manual_seed(3)
    reps = [torch.randn(12, 200, generator=g) for _ in range(4)]  # few inputs against features: R^2 <= 0
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        r = win_test(reps[:2], reps[2:], measure="ridge", num_trials=3, num_repeats=2)
    assert bool((r.own == r.other).all())  # every held-out R^2 clamps to 0
    assert any("all 6 comparisons tied" in str(x.message) for x in w)


def test_flags_check_the_vocabularies_and_generate_refuses_an_empty_prompt():
    topics = pp.TopicTask(num_topics=2, tokens_per_topic=4, seq_len=10)
    tv = len(topics.token_concepts)
    spec = pp.FlagSpec("blocks.1.hook_resid_pre", dims=(0, 1), num_concepts=2)
    small = pp.Transformer(
        pp.TransformerConfig(n_layers=2, d_model=16, n_heads=2, d_mlp=32, d_vocab=tv - 2, n_ctx=12)
    )
    with pytest.raises(ValueError, match=f"fewer than the task's {tv}"):
        pp.train_flags(small, topics, spec, stage1_steps=1, stage2_steps=1, log_every=0)
    big = pp.Transformer(
        pp.TransformerConfig(n_layers=2, d_model=16, n_heads=2, d_mlp=32, d_vocab=tv + 40, n_ctx=12, seed=1)
    )
    rep = pp.flag_report(big, topics, spec, num_samples=16)  # sampled ids beyond the task's carry no concept
    assert 0.0 <= rep.steer_success <= 1.0
    with pytest.raises(ValueError, match="prompt is empty"):
        pp.generate(big, torch.zeros(2, 0, dtype=torch.long), 3)
