"""Representation similarities on inputs found by review: a constant column that centres to rounding noise, data
at extreme scales, a target constant up to rounding, Gram matrices that are not, position selections that select
nothing, arguments of the wrong type."""

import math

import numpy as np
import pytest
import torch

from pypattern import equivalence as E
from pypattern import interpretive as I
from pypattern.models import Transformer, TransformerConfig


def test_cca_family_ignores_a_constant_column_whatever_its_value():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(40, 5)), rng.normal(size=(40, 4))
    for c in (0.1, 1 / 3, 7.3e5, -2.2e-7):
        xc = np.c_[x, np.full(40, c)]
        torch.testing.assert_close(E.cca(xc, y), E.cca(x, y), rtol=1e-10, atol=1e-12)
        assert E.svcca(xc, y) == pytest.approx(E.svcca(x, y), rel=1e-10)
        assert E.pwcca(xc, y) == pytest.approx(E.pwcca(x, y), rel=1e-10)


@pytest.mark.parametrize("s", [1e155, 1e-160])
def test_cca_and_ridge_similarity_at_extreme_scales(s):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 5))
    y = x[:, :3] @ rng.normal(size=(3, 4)) + 0.5 * rng.normal(size=(40, 4))
    torch.testing.assert_close(E.cca(x * s, y), E.cca(x, y), rtol=1e-9, atol=1e-12)
    assert E.svcca(x * s, y) == pytest.approx(E.svcca(x, y), rel=1e-9)
    assert E.ridge_similarity(x * s, y) == pytest.approx(E.ridge_similarity(x, y), rel=1e-9)
    assert E.ridge_similarity(x, y * s) == pytest.approx(E.ridge_similarity(x, y), rel=1e-9)


def test_cca_reads_tensors_that_track_gradients_detached():
    x = torch.randn(30, 5, requires_grad=True)
    r = E.cca(x, torch.randn(30, 3))
    assert not r.requires_grad


def test_ridge_similarity_of_a_target_constant_up_to_rounding_is_nan():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 4))
    assert math.isnan(E.ridge_similarity(x, np.tile([0.3, 0.7, 1.1], (30, 1))))
    y = torch.tensor(rng.normal(size=(30, 2)))
    before = y.clone()
    E.ridge_similarity(x, y)
    assert torch.equal(y, before)  # inputs untouched by the scaling


def test_hsic_and_u_center_check_their_gram_matrices():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(8, 3))
    K = f @ f.T
    ref = E.hsic(torch.tensor(K), torch.tensor(K))
    assert float(E.hsic(K, K)) == pytest.approx(float(ref))  # numpy accepted
    bad = K.copy()
    bad[0, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        E.hsic(torch.tensor(bad), torch.tensor(K))
    with pytest.raises(ValueError, match="not symmetric"):
        E.hsic(torch.tensor(rng.normal(size=(8, 8))), torch.tensor(K))
    with pytest.raises(ValueError, match="square"):
        E.u_center(torch.tensor(0.0))
    with pytest.raises(TypeError, match="inplace=True"):
        E.u_center(torch.tensor(K).long(), inplace=True)
    assert E.u_center(torch.tensor(K).round().long()).dtype == torch.float64


def test_accumulated_residual_position_selections():
    m = Transformer(
        TransformerConfig(n_layers=2, d_model=16, n_heads=2, d_vocab=11, n_ctx=10, d_mlp=32, seed=0)
    )
    tok = torch.randint(0, 11, (4, 10), generator=torch.Generator().manual_seed(0))
    last = I.accumulated_residual(m, tok, positions=-1)[0]
    assert last.shape == (4, 48)
    for same in ([9], slice(-1, None), torch.arange(10) == 9):
        torch.testing.assert_close(I.accumulated_residual(m, tok, positions=same)[0], last, rtol=0, atol=0)
    for empty in (slice(5, 5), [], torch.zeros(10, dtype=torch.bool)):
        with pytest.raises(ValueError, match="selects no position"):
            I.accumulated_residual(m, tok, positions=empty)
    for bad in (True, 2.5, [1.5], torch.tensor(3)):
        with pytest.raises(TypeError, match="positions"):
            I.accumulated_residual(m, tok, positions=bad)
    with pytest.raises(ValueError, match="out of range"):
        I.accumulated_residual(m, tok, positions=[3, 10])


def test_similarity_and_tests_refuse_arguments_of_the_wrong_type():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 4)), rng.normal(size=(20, 3))
    with pytest.raises(TypeError, match="x must be"):
        I.similarity("cka", x.tolist(), [y], seed=1)
    with pytest.raises(TypeError, match="ys must be a list"):
        I.similarity("ridge", x, torch.tensor(y), seed=1)
    with pytest.raises(TypeError, match="num_trials"):
        E.interpretive_equivalence(None, None, None, None, num_trials=2.5)


def test_meta_tensors_are_refused_by_name():
    """A meta tensor (a shape without values) is named as such, not failed on inside torch."""
    meta, real = torch.empty(20, 5, device="meta"), torch.randn(20, 4, dtype=torch.float64)
    calls = {
        "linear_cka": E.linear_cka,
        "procrustes": E.procrustes,
        "cca": E.cca,
        "svcca": E.svcca,
        "pwcca": E.pwcca,
        "ridge_similarity": E.ridge_similarity,
        "ridge_cv": E.ridge_cv,
    }
    for f in calls.values():
        for args, which in (((meta, real), "x"), ((real, meta), "y")):
            with pytest.raises(ValueError, match=f"{which} is a meta tensor"):
                f(*args)
    with pytest.raises(ValueError, match="meta tensor"):
        E.cka_matrix([meta, real])
    gm = torch.empty(20, 20, device="meta")
    with pytest.raises(ValueError, match="meta tensor"):
        E.hsic(gm, torch.eye(20))
    with pytest.raises(ValueError, match="meta tensor"):
        E.u_center(gm)


def test_float32_inputs_with_a_common_offset_are_centred_in_float64_before_a_float32_measure():
    """dtype=torch.float32 centres the columns in float64 whatever the input's dtype: float32 activations far
    from zero (offset 1e3-1e4, spread 1e-2-1e-1) give the float64 input's CKA, not one off by 1e-5."""
    import pypattern as pp

    rng = np.random.default_rng(0)
    n, d = 64, 32
    for off, sc in [(1e3, 1e-1), (1e3, 1e-2), (1e4, 1e-1)]:
        noise = rng.normal(size=(n, d)) * sc
        a = (off + noise).astype(np.float32)
        b = (off + noise @ rng.normal(size=(d, d)) / np.sqrt(d) + 0.5 * sc * rng.normal(size=(n, d))).astype(
            np.float32
        )
        ref = pp.linear_cka(a, b)  # float64 throughout
        assert abs(pp.linear_cka(a, b, dtype=torch.float32) - ref) < 1e-6
        assert (
            abs(pp.linear_cka(a.astype(np.float64), b.astype(np.float64), dtype=torch.float32) - ref) < 1e-6
        )
        m = pp.cka_matrix([torch.from_numpy(a)], [torch.from_numpy(b)], dtype=torch.float32)
        assert abs(float(m[0, 0]) - ref) < 1e-6
