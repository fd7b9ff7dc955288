"""Representation similarity on configurations the other tests do not name, each against an independent naive
computation: debiased CKA of representations whose U-centred Gram is zero (samples mutually orthogonal, such as
one-hot codes), pooling of padded prompts by 16-bit Hugging Face models with large residual dimensions, and
padded batches of two Hugging Face models of different widths compared layer by layer."""

import copy
import math

import pytest
import torch

import pypattern as pp
from pypattern.equivalence import hsic
from pypattern.interpretive import accumulated_residual

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------ naive formulas


def _unbiased_hsic_loops(k: torch.Tensor, l: torch.Tensor) -> float:  # noqa: E741
    """Song et al. (2012), term by term: ``[tr(K~ L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] /
    (n (n - 3))`` with ``K~`` the Gram with its diagonal zeroed."""
    k, l = k.double().tolist(), l.double().tolist()  # noqa: E741
    n = len(k)
    tr = sum(k[i][j] * l[j][i] for i in range(n) for j in range(n) if i != j)
    sk = sum(k[i][j] for i in range(n) for j in range(n) if i != j)
    sl = sum(l[i][j] for i in range(n) for j in range(n) if i != j)
    row_k = [sum(k[i][j] for j in range(n) if j != i) for i in range(n)]
    row_l = [sum(l[i][j] for j in range(n) if j != i) for i in range(n)]
    cross = sum(row_k[i] * row_l[i] for i in range(n))
    return (tr + sk * sl / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * cross) / (n * (n - 3))


def _naive_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double().reshape(len(x), -1), y.double().reshape(len(y), -1)
    k, l = x @ x.T, y @ y.T  # noqa: E741
    xx, yy = _unbiased_hsic_loops(k, k), _unbiased_hsic_loops(l, l)
    if xx == 0.0 or yy == 0.0:
        return math.nan
    return _unbiased_hsic_loops(k, l) / math.sqrt(xx * yy)


# ------------------------------------------------------------------------------------------------ debiased CKA


def _orthogonal_rows(n: int, width: int, seed: int) -> torch.Tensor:
    """``(n, width)``: each sample a different coordinate with a random nonzero value (one-hot codes of distinct
    inputs, scaled), so the Gram is diagonal."""
    g = torch.Generator().manual_seed(seed)
    cols = torch.randperm(width, generator=g)[:n]
    x = torch.zeros(n, width, dtype=torch.float64)
    x[torch.arange(n), cols] = torch.rand(n, generator=g, dtype=torch.float64) * 3 + 0.5
    return x


@pytest.mark.parametrize("n", [6, 20, 64])
def test_debiased_cka_with_a_zero_u_centred_gram_is_undefined(n):
    """Samples that are mutually orthogonal have a diagonal Gram, whose U-centring is exactly 0: every unbiased
    HSIC with it is 0 and debiased CKA is 0 / 0. The naive estimator says so exactly; every form of the library
    must say NaN (the products otherwise leave rounding, read as CKA of any value, 3.9 for x with itself)."""
    g = torch.Generator().manual_seed(n)
    y = torch.randn(n, 7, generator=g, dtype=torch.float64)
    single = torch.zeros(n, 3, dtype=torch.float64)  # a representation that is zero but on one sample
    single[2] = torch.tensor([1.5, -2.0, 0.7], dtype=torch.float64)
    for x in (_orthogonal_rows(n, n, 0), _orthogonal_rows(n, n + 40, 1), single):
        k = x @ x.T
        assert _unbiased_hsic_loops(k, k) == 0.0 and _unbiased_hsic_loops(k, y @ y.T) == 0.0
        assert math.isnan(_naive_cka(x, y))
        assert math.isnan(pp.linear_cka(x, y)) and math.isnan(pp.linear_cka(x, x))
        assert math.isnan(pp.linear_cka(y, x))
        for method in ("gram", "features"):
            for dtype in (torch.float64, torch.float32):
                m = pp.cka_matrix([x, y], [y, x], method=method, dtype=dtype)
                assert torch.isnan(m[0]).all() and torch.isnan(m[:, 1]).all(), (method, dtype, m)
                # y against y is defined and is the naive value
                assert m[1, 0].item() == pytest.approx(_naive_cka(y, y), rel=1e-6)
        acc = pp.MinibatchCKA(2, 1).update([x, y], [y]).update([x, y], [y])
        out = acc.compute()
        assert math.isnan(out[0, 0].item())
        assert out[1, 0].item() == pytest.approx(1.0, rel=1e-12)
        with pytest.raises(ValueError, match="U-centred Gram of x is zero"):
            pp.permutation_test(x, y, num_permutations=3)
        with pytest.raises(ValueError, match="U-centred Gram of y is zero"):
            pp.permutation_test(y, x, num_permutations=3)
        # the biased estimator is defined: the naive Kornblith formula
        xc, yc = x - x.mean(0), y - y.mean(0)
        biased = (xc.T @ yc).square().sum() / ((xc.T @ xc).norm() * (yc.T @ yc).norm())
        assert pp.linear_cka(x, y, debiased=False) == pytest.approx(float(biased), rel=1e-10)


def test_debiased_cka_of_few_samples_against_many_features_stays_defined():
    """The undefined case is told apart from data whose unbiased self-HSIC is small but real: 5 samples of 6000
    independent features (self-HSIC about 1e-4 of the squared Gram) are the naive value in every form, and a
    one-hot representation with a little noise added is defined again."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 6000, generator=g, dtype=torch.float64)
    y = x[:, :2000] @ torch.randn(2000, 50, generator=g, dtype=torch.float64) * 0.01 + torch.randn(
        5, 50, generator=g, dtype=torch.float64
    )
    want = _naive_cka(x, y)
    assert math.isfinite(want)
    for method in ("gram", "features"):
        assert pp.cka_matrix([x], [y], method=method)[0, 0].item() == pytest.approx(want, rel=1e-8, abs=1e-10)
    assert pp.permutation_test(x, y, num_permutations=3).statistic == pytest.approx(want, rel=1e-8)
    noisy = _orthogonal_rows(12, 30, 2) + 1e-3 * torch.randn(12, 30, generator=g, dtype=torch.float64)
    z = torch.randn(12, 4, generator=g, dtype=torch.float64)
    want = _naive_cka(noisy, z)
    for method in ("gram", "features"):
        assert pp.cka_matrix([noisy], [z], method=method)[0, 0].item() == pytest.approx(want, rel=1e-6)


# ------------------------------------------------------------------------------------------------ Hugging Face models

transformers = pytest.importorskip("transformers")

V, T = 40, 48


def _gpt2(seed: int, width: int):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=V,
        n_positions=T,
        n_embd=width,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


def _llama(seed: int, width: int):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=T,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def _padded_batch(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (n, T), generator=g)
    lengths = torch.randint(4, T + 1, (n,), generator=g)
    lengths[0] = T
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    return tokens.masked_fill(mask == 0, 0), mask, lengths


def _naive_pooled(model, tokens, lengths) -> torch.Tensor:
    """Each input's embedding and every block's output, averaged in float64 over that input's real tokens only,
    from the model's own activations (cast back to its dtype)."""
    names = ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.hook_resid_post" for i in range(model.cfg.n_layers)]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=names)
    rows = []
    for i, n in enumerate(lengths.tolist()):
        parts = []
        for name in names:
            acts = cache[name][i].double()
            parts.append(sum(acts[p] for p in range(n)) / n)
        rows.append(torch.cat(parts))
    return torch.stack(rows).to(cache[names[0]].dtype)


def test_sixteen_bit_pooling_of_large_residual_dimensions_is_finite_and_the_mean():
    """A float16 model whose residual stream has a dimension of size 2000 (large language models have such
    outlier dimensions): the mean over the real tokens of a padded batch is 2000 there, but a float16 sum over
    48 positions passes 65504, the end of float16. The pooled representation must be the mean (computed naively in
    float64 here), with an attention mask and with per-input positions alike."""
    hf = _gpt2(0, 24)
    with torch.no_grad():
        hf.transformer.wte.weight[:, 3] = 2000.0
    tokens, mask, lengths = _padded_batch(6, 1)
    for dtype in (torch.float16, torch.bfloat16):
        model = pp.from_hf(copy.deepcopy(hf).to(dtype))
        want = _naive_pooled(model, tokens, lengths)
        got, _ = accumulated_residual(model, tokens, attention_mask=mask)
        assert got.dtype == dtype and bool(torch.isfinite(got).all())
        torch.testing.assert_close(
            got.float(), want.float(), rtol=1e-2 if dtype == torch.bfloat16 else 2e-3, atol=1e-2
        )
        # every position of each input as per-input positions (a 2000-sized dimension over 48 positions)
        every = torch.arange(T).expand(6, T)
        got_all, _ = accumulated_residual(model, tokens, positions=every)
        want_all = _naive_pooled(model, tokens, torch.full((6,), T))
        assert bool(torch.isfinite(got_all).all())
        torch.testing.assert_close(
            got_all.float(), want_all.float(), rtol=1e-2 if dtype == torch.bfloat16 else 2e-3, atol=1e-2
        )


def test_padded_batches_of_two_hugging_face_models_of_different_widths_compare_as_unpadded_inputs():
    """GPT-2 (width 24, 2 layers) and Llama (width 16, 3 layers, grouped-query attention) with random weights on a
    right-padded batch: the pooled representations equal each input run alone without padding, padding tokens of
    any id change nothing, and every layer pair's CKA is the naive formula on those unpadded representations."""
    gpt, llama = pp.from_hf(_gpt2(0, 24)), pp.from_hf(_llama(1, 16))
    tokens, mask, lengths = _padded_batch(10, 2)
    reps = {}
    for name, model in (("gpt", gpt), ("llama", llama)):
        got, _ = accumulated_residual(model, tokens, attention_mask=mask)
        other_pad, _ = accumulated_residual(model, tokens.masked_fill(mask == 0, 7), attention_mask=mask)
        torch.testing.assert_close(other_pad, got, rtol=0, atol=0)
        alone = []
        for i, n in enumerate(lengths.tolist()):
            rep, _ = accumulated_residual(model, tokens[i : i + 1, :n])
            alone.append(rep[0])
        torch.testing.assert_close(got, torch.stack(alone), rtol=1e-5, atol=1e-5)
        reps[name] = got
    layers_a = list(reps["gpt"].split(24, 1))
    layers_b = list(reps["llama"].split(16, 1))
    assert len(layers_a) == 3 and len(layers_b) == 4
    got = pp.cka_matrix(layers_a, layers_b)
    want = torch.tensor([[_naive_cka(a, b) for b in layers_b] for a in layers_a], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert pp.linear_cka(reps["gpt"], reps["llama"]) == pytest.approx(
        _naive_cka(reps["gpt"], reps["llama"]), rel=1e-9, abs=1e-12
    )


def test_hsic_of_grams_of_extreme_scales_is_the_naive_value_or_a_named_overflow():
    """HSIC is bilinear: Grams of 30 samples of scale 1e307 and 1e-10 have an HSIC of about 1e297, which float64
    holds, though the first one's row sums (a Gaussian kernel's Gram, all entries positive) pass its range. Beyond it the value is refused naming
    ``k`` and ``l``, not returned as inf or NaN."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(30, 4, generator=g, dtype=torch.float64)
    y = x[:, :2] @ torch.randn(2, 3, generator=g, dtype=torch.float64) + torch.randn(
        30, 3, generator=g, dtype=torch.float64
    )
    k, l = torch.exp(-(torch.cdist(x, x) ** 2) / 8), y @ y.T  # noqa: E741  (a Gaussian kernel: positive entries)
    kmax, lmax = float(k.abs().max()), float(l.abs().max())
    big, small = k / kmax * 1e307, l / lmax * 1e-10
    want = _unbiased_hsic_loops(k, l) / kmax / lmax * 1e297
    assert hsic(big, small).item() == pytest.approx(want, rel=1e-10)
    n = len(k)
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    biased = float(torch.trace(k @ h @ l @ h)) / (n - 1) ** 2 / kmax / lmax * 1e297
    assert hsic(big, small, debiased=False).item() == pytest.approx(biased, rel=1e-10)
    for debiased in (True, False):
        with pytest.raises(
            ValueError, match=r"HSIC of k \(entries up to 1e\+307\) and l \(entries up to 1e\+307\) is beyond"
        ):
            hsic(big, big, debiased=debiased)
