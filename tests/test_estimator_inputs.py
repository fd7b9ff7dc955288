"""Inputs as users hold them, across the estimators: narrow integer token types, a given ``sampling_batch``,
devinterp's entry points on padded data and with their default loss, components over frozen parameters, and
component names given as ``restrict_to``. Each either gives the numbers of the plain form or a clear error."""

import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import pypattern as pp

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

V = 48
KW = dict(
    num_chains=2,
    num_draws=4,
    step_size=1e-3,
    localization=100.0,
    nbeta=10.0,
    quiet=True,
    seed=0,
    warn_nonstationary=False,
)


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=16, n_layer=2, n_head=2, n_positions=32)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).double().eval()


def _tokens(n=16, t=8, seed=1):
    return torch.randint(0, V, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "dtype", [torch.uint8, torch.int16, torch.int8] + ([torch.uint16] if hasattr(torch, "uint16") else [])
)
def test_narrow_integer_tokens_read_as_int64(dtype):
    model, toks = _gpt2(), _tokens()
    want = pp.estimate_llc(model, [toks[:8], toks[8:]], **KW)
    got = pp.estimate_llc(model, [toks[:8].to(dtype), toks[8:].to(dtype)], **KW)
    assert got.llc_mean == want.llc_mean and got.init_loss == want.init_loss
    hf = {"input_ids": toks[:4].to(dtype), "labels": toks[:4].to(dtype)}
    torch.testing.assert_close(pp.losses.batch_loss(model, hf), pp.losses.batch_loss(model, toks[:4]))


def test_sampling_batch_is_checked_as_probe_is():
    model, toks = _gpt2(), _tokens()
    args = (model, [toks[:8], toks[8:]], toks[:2], ["blocks.0.mlp"])
    bad = toks[:4].clone()
    bad[1, 3] = V + 5
    with pytest.raises(ValueError, match="sampling_batch contains token id"):
        pp.susceptibilities(*args, sampling_batch=bad, **KW)
    with pytest.raises(TypeError, match="sampling_batch"):
        pp.susceptibilities(*args, sampling_batch=toks[:4].double(), **KW)
    # a custom loss reads its own batches: no check
    own = pp.susceptibilities(
        *args, sampling_batch=("anything",), loss_fn=lambda m, b: pp.losses.batch_loss(m, toks[:4]), **KW
    )
    assert np.isfinite(np.asarray(own.chi)).all()


def _devinterp_kw():
    return dict(num_chains=1, num_draws=3, batch_size=4, num_init_loss_batches=2, batches_per_draw=1)


def test_devinterp_entry_points_refuse_padding_they_would_score():
    from pypattern.devinterp import llc

    model, toks = _gpt2(), _tokens()
    am = torch.ones_like(toks)
    am[:, 6:] = 0
    padded = toks * am
    for ds, what in (
        ({"input_ids": padded, "attention_mask": am}, "attention_mask marks padding"),
        ({"input_ids": padded, "labels": padded.masked_fill(am == 0, -100)}, "labels differ from input_ids"),
        (
            [{"input_ids": padded[i], "attention_mask": am[i]} for i in range(len(toks))],
            "attention_mask marks",
        ),
    ):
        with pytest.raises(ValueError, match=what):
            llc(model, ds, {}, lr=1e-4, n_beta=10.0, **_devinterp_kw())
    with pytest.raises(ValueError, match=r"observables\['probe'\].*attention_mask marks padding"):
        llc(
            model,
            toks,
            {"probe": {"input_ids": padded, "attention_mask": am}},
            lr=1e-4,
            n_beta=10.0,
            **_devinterp_kw(),
        )
    # no padding: an all-ones mask and labels equal to the ids give the plain tensor's result
    plain = llc(model, toks, {}, lr=1e-4, n_beta=10.0, **_devinterp_kw())
    full = {"input_ids": toks, "attention_mask": torch.ones_like(toks), "labels": toks.clone()}
    same = llc(model, full, {}, lr=1e-4, n_beta=10.0, **_devinterp_kw())
    np.testing.assert_array_equal(np.asarray(same["llc_per_chain"]), np.asarray(plain["llc_per_chain"]))


def test_devinterp_1x_default_evaluate_reads_the_librarys_batches():
    model, toks = _gpt2(), _tokens()
    kw = dict(
        num_chains=2, num_draws=4, optimizer_kwargs=dict(lr=1e-4, nbeta=10.0, localization=100.0), seed=0
    )
    kw["verbose"] = False
    own = pp.estimate_learning_coeff_with_summary(
        model, [toks[:8], toks[8:]], evaluate=lambda m, b: pp.losses.batch_loss(m, b), **kw
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for loader in (
            DataLoader(TensorDataset(toks), batch_size=8),
            [toks[:8], toks[8:]],
            [{"input_ids": toks[:8]}, {"input_ids": toks[8:]}],
        ):
            got = pp.estimate_learning_coeff_with_summary(model, loader, **kw)
            assert got["llc/mean"] == pytest.approx(own["llc/mean"], rel=1e-12, abs=1e-12)


def test_components_over_frozen_parameters_are_refused_by_name():
    model, toks = _gpt2(), _tokens()
    loader = [toks[:8], toks[8:]]
    model.transformer.h[0].attn.c_proj.weight.requires_grad_(False)
    with pytest.raises(
        ValueError, match=r"component 'blocks.0.attn.head.1' covers parameters that are frozen"
    ):
        pp.susceptibilities(model, loader, toks[:2], ["blocks.0.attn.head.1"], **KW)
    with pytest.raises(ValueError, match=r"transformer.h.0.attn.c_proj.weight.*frozen, requires_grad=False"):
        pp.estimate_llc(model, loader, masks=pp.component_masks(model, "blocks.0.attn.head.1"), **KW)
    with pytest.raises(ValueError, match="frozen, requires_grad=False"):
        pp.estimate_llc(model, loader, restrict_to=r"transformer\.h\.0\.attn\.c_proj\.weight", **KW)
    # a component clear of the frozen weight still runs
    assert np.isfinite(
        np.asarray(pp.susceptibilities(model, loader, toks[:2], ["blocks.1.mlp"], **KW).chi)
    ).all()


def test_restrict_to_a_component_name_points_to_component_masks():
    model, toks = _gpt2(), _tokens()
    with pytest.raises(ValueError, match=r"masks=pypattern.component_masks\(model, 'blocks.0.attn.head.1'\)"):
        pp.estimate_llc(model, [toks[:8], toks[8:]], restrict_to="blocks.0.attn.head.1", **KW)
    with pytest.raises(ValueError, match="matches no parameter; names are"):
        pp.estimate_llc(model, [toks[:8], toks[8:]], restrict_to="no_such_weight", **KW)


def test_the_losses_of_a_converted_model_on_padded_batches_are_the_hugging_face_models():
    """The converted model's forward takes the mask and position ids: left and right padding (with and without
    position ids) give the Hugging Face model's losses."""
    model, toks = _gpt2(), _tokens(4, 8)
    conv = pp.from_hf(model)
    am = torch.ones_like(toks)
    am[1, :3] = 0
    left = {"input_ids": toks * am, "attention_mask": am}
    for fn in (pp.losses.batch_loss, lambda m, b: pp.losses.token_losses(m, b, fill=0.0)[0]):
        torch.testing.assert_close(fn(conv, left), fn(model, left))
        with_pos = {**left, "position_ids": (am.cumsum(1) - 1).clamp(min=0)}
        torch.testing.assert_close(fn(conv, with_pos), fn(model, with_pos))
    right = {"input_ids": toks * am.flip(1), "attention_mask": am.flip(1)}
    torch.testing.assert_close(pp.losses.batch_loss(conv, right), pp.losses.batch_loss(model, right))
