"""refined_llc: every component's restricted run batched in one call equals running each alone (same seeds, same
numbers); truth on a regular model whose blocks are independent (a block's LLC = its parameter count / 2); the
data-refined LLC equals the LLC with the loss on the other data set."""

import warnings

import numpy as np
import pytest
import torch

from pypattern import truth
from pypattern.models.transformer import Transformer, TransformerConfig, component_masks
from pypattern.sampling import estimate_llc, refined_llc


def lm_loss(m, batch):
    return m(batch, return_type="loss")


def _lm():
    cfg = TransformerConfig(
        n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32, d_vocab=11, n_ctx=8, seed=0
    )
    model = Transformer(cfg)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 11, (32, 8), generator=g)
    return model, [data[i : i + 8] for i in range(0, 32, 8)], [torch.randint(0, 11, (8, 8), generator=g)]


KW = dict(
    num_chains=2,
    num_draws=12,
    step_size=1e-4,
    localization=100.0,
    nbeta=10.0,
    seed=3,
    warn_nonstationary=False,
)


def test_batched_equals_separate_runs_and_data_refined():
    model, loader, other = _lm()
    comps = ["blocks.0.attn.head.1", "blocks.1.mlp", "embed"]
    res = refined_llc(model, loader, components=comps, data=other, loss_fn=lm_loss, batched=True, **KW)
    assert res.component == ["full", *comps, "full", *comps]
    assert res.data == ["train"] * 4 + ["data"] * 4
    for i, (c, d) in enumerate(zip(res.component, res.data, strict=True)):
        masks = None if c == "full" else component_masks(model, c)
        alone = estimate_llc(
            model,
            loader if d == "train" else other,
            loss_fn=lm_loss,
            restrict_to=None if masks is None else list(masks),
            masks=masks,
            batched=False,
            quiet=True,
            **KW,
        )
        np.testing.assert_allclose(res.llc_per_chain[i], alone.llc_per_chain, rtol=1e-4, atol=1e-6)
        assert res.num_params[i] == (
            sum(p.numel() for p in model.parameters())
            if masks is None
            else sum(int(m.sum()) for m in masks.values())
        )
    assert res.llc("full", "data") == res.llc_mean[4]
    # moving fewer weights gives a smaller LLC than moving all of them
    assert np.all(res.llc_mean[1:4] < res.llc_mean[0])
    df = res.to_pandas()
    assert list(df.columns[:3]) == ["component", "data", "num_params"] and len(df) == 8
    import matplotlib

    matplotlib.use("Agg")
    assert res.plot() is not None


def test_heads_default_lists_every_component():
    model, loader, _ = _lm()
    res = refined_llc(model, loader, loss_fn=lm_loss, num_chains=2, num_draws=4, step_size=1e-5, seed=0)
    assert res.component == ["full", *model.components(heads=True)]
    with pytest.raises(ValueError, match="components="):
        refined_llc(model, loader, components="layers", loss_fn=lm_loss)
    with pytest.raises(ValueError, match="runs is set by refined_llc"):
        refined_llc(model, loader, loss_fn=lm_loss, runs=[])


def test_independent_regular_blocks_have_llc_count_over_2():
    # y = W x, W 2x3 (orthonormal design, MSE): K(W) = |W - W*|^2 / 2, each row of W an independent regular block
    # of 3 parameters (LLC 1.5), the whole map 6 (LLC 3). Settings of tests/test_llc.py's regular-model test.
    torch.manual_seed(0)
    model = truth.DeepLinearNetwork((3, 2), dtype=torch.float64)
    ds = truth.make_regression_data(model, 3, dtype=torch.float64)
    loader = torch.utils.data.DataLoader(ds, batch_size=len(ds))
    rows = {}
    for i in range(2):
        m = torch.zeros(2, 3, dtype=torch.bool)
        m[i] = True
        rows[f"row{i}"] = {"layers.0.weight": m}
    res = refined_llc(
        model,
        loader,
        components=rows,
        step_size=1e-4,
        nbeta=1000.0,
        localization=1.0,
        num_chains=8,
        num_draws=400,
        num_steps_bw_draws=5,
        num_burnin_steps=100,
        seed=0,
    )
    assert list(res.num_params) == [6, 3, 3]
    for name, lam in [("full", 3.0), ("row0", 1.5), ("row1", 1.5)]:
        assert abs(res.llc(name) - lam) / lam < 0.15, (name, res.llc(name))


def test_frozen_parameters_are_left_out_of_components_as_in_estimate_llc():
    import warnings

    import pypattern as pp
    from pypattern import truth

    mlp, data = truth.make_teacher_task((6, 12, 3), n=96, seed=0)
    mlp[2].bias.requires_grad_(False)
    loader = torch.utils.data.DataLoader(data, batch_size=32)
    kw = dict(num_chains=2, num_draws=20, step_size=1e-3, localization=100.0, nbeta=10.0, seed=3, quiet=True)
    r = pp.refined_llc(mlp, loader, components={"last": ["2.weight", "2.bias"]}, include_full=False, **kw)
    want = pp.estimate_llc(mlp, loader, restrict_to=["2.weight"], **kw)
    assert r.llc("last") == pytest.approx(want.llc_mean, rel=1e-6, abs=1e-9)
    with pytest.raises(ValueError, match="all frozen"):
        pp.refined_llc(mlp, loader, components={"bias": ["2.bias"]}, **kw)
    model = pp.Transformer(n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=8, d_vocab=11, n_ctx=6)
    model.embed.W_E.requires_grad_(False)
    toks = [torch.randint(0, 11, (4, 6), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res = pp.refined_llc(model, toks, components="heads", **kw)
    assert any("only frozen parameters" in str(x.message) for x in w)
    assert "embed" not in res.component and "blocks.0.attn.head.0" in res.component


def test_heads_on_an_unconverted_hugging_face_model():
    """components='heads' / 'blocks' on an unconverted Hugging Face model: its own component names (the masks of
    hf_component_masks), as on pypattern's Transformer."""
    tr = pytest.importorskip("transformers")
    from pypattern.models.hf_masks import hf_components

    torch.manual_seed(0)
    m = tr.GPT2LMHeadModel(
        tr.GPT2Config(vocab_size=41, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    ).eval()
    x = torch.randint(0, 41, (8, 6))
    for kind in ("heads", "blocks"):
        r = refined_llc(m, [x], components=kind, num_chains=2, num_draws=4, step_size=1e-4, quiet=True)
        names = hf_components(m, heads=kind == "heads")
        assert set(names) <= set(r.to_pandas()["component"]), kind


def test_components_with_unknown_names_no_parameters_or_fractional_masks_are_refused():
    """A list or mask component naming no parameter of the model, an empty component and a mask of values other
    than 0 and 1 are refused naming the component, before any sampling."""
    import pypattern as pp
    from pypattern import truth

    torch.manual_seed(0)
    mlp, data = truth.make_teacher_task((4, 6, 3), n=16, seed=0)
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    kw = dict(num_chains=1, num_draws=2, step_size=1e-3, nbeta=10.0, quiet=True, warn_nonstationary=False)
    for comp, msg in (
        ({"c": ["nosuch.weight"]}, r"component 'c' names 'nosuch.weight', not a parameter of the model"),
        ({"c": {"nosuch.weight": torch.ones(3)}}, r"component 'c' names 'nosuch.weight'"),
        ({"c": []}, r"component 'c' is empty"),
        (
            {"c": {"0.weight": torch.full((6, 4), 0.5)}},
            r"the mask of '0.weight' holds values other than 0 and 1",
        ),
    ):
        with pytest.raises(ValueError, match=msg):
            pp.refined_llc(mlp, loader, components=comp, **kw)
    # 0/1 float masks are the bool masks they hold
    ones = torch.zeros(6, 4)
    ones[:2] = 1.0
    a = pp.refined_llc(mlp, loader, components={"c": {"0.weight": ones}}, **kw)
    b = pp.refined_llc(mlp, loader, components={"c": {"0.weight": ones.bool()}}, **kw)
    np.testing.assert_array_equal(a.llc_mean, b.llc_mean)


def test_stationarity_is_not_claimed_when_r_hat_cannot_be_computed():
    from pypattern.sampling.diagnostics import NonStationaryWarning, check_stationarity

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_stationarity(np.array([[0.0, 10, 20], [100, 200, 300]])) is False  # 3 draws: no R-hat
    with pytest.warns(NonStationaryWarning, match="non-finite values"):
        assert check_stationarity(np.array([[0.0, np.nan, 1, 2, 1, 3], [1, 2, 1, 2, 1.0, 2]])) is False
    assert check_stationarity(np.random.default_rng(0).normal(size=(4, 200))) is True
