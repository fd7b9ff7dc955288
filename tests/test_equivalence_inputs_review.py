"""Argument checks of representations, resample_implementations, interpretive_equivalence, permutation_test and
distinguishability_grid: a bad argument is refused by name, instead of a silently wrong number (a negative token
id read from the end of the vocabulary, a bool head taken as the whole activation) or an error from inside
torch."""

import pytest
import torch

from pypattern import InductionTask, Transformer
from pypattern.equivalence import representations

TASK = InductionTask(d_vocab=16, seq_len=13)


def _model():
    return Transformer(TASK.model_config(d_model=16, n_heads=2, seed=0))


def _tokens(n=8, seed=1):
    return TASK.sample(n, seed=seed).tokens


# ----------------------------------------------------------------------------------------------- representations


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda t: t - 3, ValueError, r"tokens contains token id -\d+; valid ids are 0 \.\. 15"),
        (lambda t: t + 16, ValueError, r"tokens contains token id \d+; valid ids are 0 \.\. 15"),
        (lambda t: t.float(), TypeError, "tokens has dtype torch.float32; give integer token ids"),
        (lambda t: t[:0], ValueError, "tokens has shape"),
        (lambda t: torch.cat([t, t], 1), ValueError, "tokens has 26 positions; the model has 13 learned"),
    ],
)
def test_representations_refuse_token_ids_the_model_cannot_read(change, error, match):
    model, tok = _model(), _tokens()
    with pytest.raises(error, match=match):
        representations(model, change(tok))


def test_representations_of_a_negative_id_are_not_those_of_the_vocabulary_end():
    # the defect: id -3 was read as id 13 (the embedding's row from the end) and gave the same features
    model, tok = _model(), _tokens()
    wrapped = tok.clone()
    wrapped[0, 0] = 13
    negative = tok.clone()
    negative[0, 0] = -3
    assert representations(model, wrapped).shape == (8, 2 * 13 * 16)
    with pytest.raises(ValueError, match="token id -3"):
        representations(model, negative)


def test_representations_take_one_hook_name_and_refuse_no_hooks():
    model, tok = _model(), _tokens()
    one = representations(model, tok, hooks="blocks.1.hook_resid_post")
    torch.testing.assert_close(one, representations(model, tok, hooks=["blocks.1.hook_resid_post"]))
    assert one.shape == (8, 13 * 16)
    with pytest.raises(ValueError, match="hooks is empty"):
        representations(model, tok, hooks=[])
    with pytest.raises(TypeError, match="hooks holds 3"):
        representations(model, tok, hooks=["blocks.1.hook_resid_post", 3])
    with pytest.raises(TypeError, match="hooks is a set"):
        representations(model, tok, hooks={"blocks.1.hook_resid_post"})


# ----------------------------------------------------------------------------------------------- resample_implementations


def test_resample_implementations_check_tokens_and_counterfactual():
    from pypattern.equivalence import resample_implementations

    model, tok = _model(), _tokens()
    site = [("blocks.1.attn.hook_z", 1)]
    with pytest.raises(ValueError, match="tokens contains token id -3"):
        resample_implementations(model, tok - 3, site)
    with pytest.raises(ValueError, match="counterfactual contains token id -3"):
        resample_implementations(model, tok, site, counterfactual=tok - 3)
    with pytest.raises(ValueError, match=r"counterfactual contains token id \d+; valid ids are 0 \.\. 15"):
        resample_implementations(model, tok, site, counterfactual=tok + 16)
    with pytest.raises(TypeError, match="counterfactual has dtype torch.float32"):
        resample_implementations(model, tok, site, counterfactual=tok.float())
    with pytest.raises(ValueError, match=r"counterfactual has shape \(0, 13\)"):
        resample_implementations(model, tok, site, counterfactual=tok[:0])
    with pytest.raises(TypeError, match="tokens is a dict.*padding would enter the features"):
        resample_implementations(model, {"input_ids": tok, "attention_mask": torch.ones_like(tok)}, site)
    with pytest.raises(TypeError, match="tokens is a list"):
        resample_implementations(model, tok.tolist(), site)


def test_resample_implementations_refuse_sites_that_are_not_hook_head_pairs():
    import numpy as np

    from pypattern.equivalence import resample_implementations

    model, tok = _model(), _tokens()
    # a bool head was taken as an index and resampled every head of the hook
    with pytest.raises(TypeError, match=r"sites\[0\] has head True \(bool\); give a head index"):
        resample_implementations(model, tok, [("blocks.1.attn.hook_z", True)])
    with pytest.raises(TypeError, match=r"sites\[1\] has head 1.5 \(float\)"):
        resample_implementations(model, tok, [("blocks.1.attn.hook_z", 0), ("blocks.1.attn.hook_z", 1.5)])
    with pytest.raises(TypeError, match=r"sites\[0\] is 'blocks.1.hook_attn_out'; give \(hook name, head"):
        resample_implementations(model, tok, ["blocks.1.hook_attn_out"])
    with pytest.raises(TypeError, match="sites is a str; give a list of"):
        resample_implementations(model, tok, "blocks.1.hook_attn_out")
    with pytest.raises(TypeError, match=r"sites\[0\] has hook name 3"):
        resample_implementations(model, tok, [(3, None)])
    # a numpy integer head is an int head
    a = resample_implementations(model, tok, [("blocks.1.attn.hook_z", np.int64(1))])(4)
    torch.testing.assert_close(a, resample_implementations(model, tok, [("blocks.1.attn.hook_z", 1)])(4))


def test_resample_implementations_refuse_an_unconverted_model_and_bad_hooks():
    from pypattern.equivalence import resample_implementations

    model, tok = _model(), _tokens()
    with pytest.raises(TypeError, match=r"model is a Linear; resample_implementations .*pypattern.from_hf"):
        resample_implementations(torch.nn.Linear(2, 2), tok, [("blocks.1.attn.hook_z", 1)])
    with pytest.raises(ValueError, match="hooks is empty"):
        resample_implementations(model, tok, [("blocks.1.attn.hook_z", 1)], hooks=[])
    with pytest.raises(KeyError, match="not hook points of the model"):
        resample_implementations(model, tok, [("blocks.1.attn.hook_z", 1)], hooks=["blocks.1.hook_nothing"])
    one = resample_implementations(
        model, tok, [("blocks.1.attn.hook_z", 1)], hooks="blocks.1.hook_resid_post"
    )
    assert one(0).shape == (8, 13 * 16)


def test_resample_implementations_of_a_head_convert_an_unconverted_hugging_face_model():
    # the adapter (pypattern.hooked_hf) has no per-head hook_z: a head's site runs on the converted model, whose
    # implementations these are
    transformers = pytest.importorskip("transformers")
    import pypattern as pp
    from pypattern.equivalence import resample_implementations

    cfg = transformers.GPT2Config(
        n_layer=1, n_embd=8, n_head=2, vocab_size=20, n_positions=8, bos_token_id=0, eos_token_id=0
    )
    hf = transformers.GPT2LMHeadModel(cfg).double()
    tok = torch.randint(0, 20, (3, 4))
    site = [("blocks.0.attn.hook_z", 0)]
    ours = resample_implementations(hf, tok, site)(1)
    torch.testing.assert_close(
        ours, resample_implementations(pp.from_hf(hf), tok, site)(1), rtol=1e-12, atol=1e-12
    )


# ----------------------------------------------------------------------------------------------- interpretive_equivalence


def _reps():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 5, generator=g, dtype=torch.float64)

    def sample(k):
        return x + 0.1 * torch.randn(12, 5, generator=torch.Generator().manual_seed(k), dtype=torch.float64)

    return x, sample


def test_interpretive_equivalence_checks_seed_samplers_and_similarity_by_name():
    import numpy as np

    from pypattern.equivalence import interpretive_equivalence

    x, sample = _reps()
    with pytest.raises(TypeError, match="seed=None is not valid; give an int"):
        interpretive_equivalence(x, x, sample, sample, num_trials=2, seed=None)
    with pytest.raises(TypeError, match="seed=1.5 is not valid"):
        interpretive_equivalence(x, x, sample, sample, num_trials=2, seed=1.5)
    with pytest.raises(ValueError, match=r"\|seed\| < 2\*\*44"):
        interpretive_equivalence(x, x, sample, sample, num_trials=2, seed=2**60)
    with pytest.raises(TypeError, match="sample_b is a Tensor; give a callable seed -> Tensor"):
        interpretive_equivalence(x, x, sample, x, num_trials=2)
    with pytest.raises(TypeError, match="sample_a is a NoneType"):
        interpretive_equivalence(x, x, None, sample, num_trials=2)
    with pytest.raises(
        TypeError, match=r"similarity\(x, y\) returned a Tensor of shape \(5,\); give a callable"
    ):
        interpretive_equivalence(x, x, sample, sample, num_trials=2, similarity=lambda a, b: (a - b).sum(0))
    with pytest.raises(TypeError, match=r"similarity\(x, y\) returned None"):
        interpretive_equivalence(x, x, sample, sample, num_trials=2, similarity=lambda a, b: None)
    # a numpy integer seed is that int; a one-element similarity is its number
    a = interpretive_equivalence(x, x * 2, sample, sample, num_trials=2, seed=np.int64(3), similarity="cka")
    b = interpretive_equivalence(x, x * 2, sample, sample, num_trials=2, seed=3, similarity="cka")
    np.testing.assert_array_equal(a.own, b.own)

    def cka1(u, v):
        from pypattern.equivalence import linear_cka

        return torch.tensor([linear_cka(u, v)])

    c = interpretive_equivalence(x, x * 2, sample, sample, num_trials=2, seed=3, similarity=cka1)
    np.testing.assert_allclose(c.own, b.own)


# ----------------------------------------------------------------------------------------------- permutation_test


@pytest.mark.parametrize(
    "kw, error, match",
    [
        ({"num_permutations": 2.5}, TypeError, "num_permutations=2.5 is not valid; give a positive int"),
        ({"num_permutations": "10"}, TypeError, "num_permutations='10' is not valid"),
        ({"num_permutations": True}, TypeError, "num_permutations=True is not valid"),
        ({"seed": None}, TypeError, "seed=None is not valid; give an int"),
        ({"seed": "0"}, TypeError, "seed='0' is not valid"),
    ],
)
def test_permutation_test_checks_num_permutations_and_seed_by_name(kw, error, match):
    from pypattern.equivalence import permutation_test

    x, sample = _reps()
    with pytest.raises(error, match=match):
        permutation_test(x, sample(1), **kw)


def test_permutation_test_takes_numpy_integers():
    import numpy as np

    from pypattern.equivalence import permutation_test

    x, sample = _reps()
    a = permutation_test(x, sample(1), num_permutations=np.int64(5), seed=np.int64(2))
    b = permutation_test(x, sample(1), num_permutations=5, seed=2)
    assert a.null.shape == (5,)
    np.testing.assert_array_equal(a.null, b.null)


# ----------------------------------------------------------------------------------------------- distinguishability_grid


def test_distinguishability_grid_refuses_no_algorithms():
    from pypattern.interpretive import distinguishability_grid

    with pytest.raises(ValueError, match="impls is empty"):
        distinguishability_grid({})
    reps = [torch.randn(12, 3, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    with pytest.raises(TypeError, match="impls is a list; give a mapping"):
        distinguishability_grid([reps])
    grid = distinguishability_grid({"a": reps}, measure="cka", num_trials=2, num_repeats=1)
    assert grid.names == ["a"] and grid.fraction.shape == (1, 1)


# ------------------------------------------------------------------------------- similarity measures' arguments
def test_similarity_arguments_are_refused_by_name():
    """Flags, counts, seeds and penalties of the similarity measures: a string flag would read as true, a float
    count or seed would fail inside torch or be truncated, a tensor where a list is expected would be iterated by
    rows; each is refused naming the argument."""
    import numpy as np

    from pypattern.cca import cca
    from pypattern.equivalence import MinibatchCKA, linear_cka, procrustes, ridge_similarity
    from pypattern.ridge import ridge_cv, ridge_similarity_cv

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 5, generator=g), torch.randn(20, 4, generator=g)
    cases = [
        (lambda: linear_cka(x, y, debiased="no"), TypeError, "debiased='no' is not valid"),
        (lambda: procrustes(x, y, angular="no"), TypeError, "angular='no' is not valid"),
        (lambda: MinibatchCKA(num_x=1.5), ValueError, "num_x=1.5 is not valid"),
        (lambda: MinibatchCKA(2, num_y=0), ValueError, "num_y=0 is not valid"),
        (lambda: MinibatchCKA(1, 1).update(x, [y]), TypeError, r"xs is a single Tensor of shape \(20, 5\)"),
        (lambda: ridge_similarity(x, y, seed="a"), TypeError, "seed='a' is not valid"),
        (lambda: ridge_similarity_cv(x, y, seed=1.5), ValueError, "seed=1.5 is not valid"),
        (lambda: cca(x, y, ridge="a"), ValueError, "ridge must be a finite number >= 0, got 'a'"),
        (lambda: cca(x, y, ridge=None), ValueError, "ridge must be a finite number >= 0, got None"),
        (lambda: ridge_cv(x, y, 1.0), ValueError, "alphas must be a non-empty 1-d sequence"),
    ]
    for fn, error, match in cases:
        with pytest.raises(error, match=match):
            fn()
    assert isinstance(linear_cka(x, y, debiased=np.bool_(False)), float)
    assert MinibatchCKA(np.int64(2)).num_x == 2


def test_ridge_measures_read_inputs_that_track_gradients_as_values():
    """As the other measures do: no gradient tracked into the fit, no torch warning about it."""
    import warnings

    from pypattern.ridge import ridge_cv, ridge_similarity_cv

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(30, 5, generator=g).requires_grad_(True), torch.randn(30, 3, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ridge_similarity_cv(x, y) == ridge_similarity_cv(x.detach(), y)
        assert not ridge_cv(x, y).coef.requires_grad


def test_equivalence_ties_warn_and_implementations_read_one_representation():
    """Representations at a scale where the ridge penalties swamp the fit: identical models tie in most
    comparisons, which pull the score towards 1; that is said in a warning naming the cause. With
    compare="implementations" the representations are not read: one of them alone is accepted (and checked)."""
    import warnings

    from pypattern.equivalence import interpretive_equivalence

    g = torch.Generator().manual_seed(0)
    rep = 0.02 * torch.randn(60, 96, generator=g)

    def sample(seed):
        return rep + 0.3 * rep.std() * torch.randn(rep.shape, generator=torch.Generator().manual_seed(seed))

    with pytest.warns(UserWarning, match=r"40 comparisons tied .* penalties \{0\.1, 1, 10\} are absolute"):
        res = interpretive_equivalence(rep, rep.clone(), sample, sample, num_trials=20)
    assert 2 * res.ties > 40
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # ties again: only the acceptance of one representation is checked here
        r = interpretive_equivalence(rep, None, sample, sample, num_trials=4, compare="implementations")
    assert r.own.shape == (4, 2) and r.num_trials == 4
    with pytest.raises(ValueError, match="rep_a"):
        interpretive_equivalence(rep[:10], None, sample, sample, num_trials=2, compare="implementations")


def test_selectivity_curve_names_a_patched_representation_of_other_inputs():
    from pypattern.interpretive import selectivity_curve

    g = torch.Generator().manual_seed(2)
    impl_a = [torch.randn(20, 6, generator=g) for _ in range(2)]
    others = [[torch.randn(20, 6, generator=g)]]
    with pytest.raises(ValueError, match=r"patched_a\(\d, 0\) has 5 rows but impl_a\[\d\] has 20"):
        selectivity_curve(impl_a, lambda i, k: impl_a[i][:5], others, budgets=[0], num_trials=1)
