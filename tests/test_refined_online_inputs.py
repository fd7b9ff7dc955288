"""refined_llc and OnlineLLC against independent runs: the data rows with a given ``init_loss`` equal the
estimator on that data; per-head components of a converted grouped-query Llama are the head's own slices and
their rows equal estimate_llc with those masks; OnlineLLC with components equals refined_llc at the same weights;
a checkpoint file is reused only at the same weights; bad arguments are refused by name."""

import os
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from pypattern.sampling import estimate_llc, refined_llc
from pypattern.sampling.online import OnlineLLC


def mse(m, b):
    return ((m(b[0]) - b[1]) ** 2).mean()


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))


def _data(seed, n=32):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 3, generator=g), torch.randn(n, 1, generator=g)
    return [(x[i : i + 8], y[i : i + 8]) for i in range(0, n, 8)]


KW = dict(
    num_chains=2,
    num_draws=8,
    step_size=1e-3,
    localization=10.0,
    seed=0,
    loss_fn=mse,
    quiet=True,
    warn_nonstationary=False,
)
COMPS = {"first": ["0.weight", "0.bias"], "second": ["2.weight"]}


def test_data_rows_with_a_given_init_loss_equal_the_estimator_on_that_data():
    model, train, other = _net(), _data(1), _data(2, 16)
    init = estimate_llc(model, train, **KW).init_loss
    res = refined_llc(model, train, components=COMPS, data=other, init_loss=init, **KW)
    on_other = estimate_llc(model, other, **KW)
    assert res.init_loss[3] == pytest.approx(on_other.init_loss, rel=1e-12)
    np.testing.assert_allclose(res.llc_per_chain[3], on_other.llc_per_chain, rtol=1e-10)
    # the training rows keep the given L_n(w*)
    assert res.init_loss[0] == pytest.approx(init, rel=1e-12)


def test_grouped_query_heads_are_their_own_slices_and_equal_masked_estimate_llc():
    transformers = pytest.importorskip("transformers")
    import pypattern
    from pypattern.models.transformer import component_masks, list_components

    cfg = transformers.LlamaConfig(
        vocab_size=13,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = pypattern.from_hf(transformers.LlamaForCausalLM(cfg).eval())
    comps = list_components(m)
    assert [c for c in comps if "kv_head" in c] == ["blocks.0.attn.kv_head.0", "blocks.0.attn.kv_head.1"]
    head = component_masks(m, "blocks.0.attn.head.2")
    assert sorted(head) == ["blocks.0.attn.W_O", "blocks.0.attn.W_Q"]  # no shared key/value slice
    for k, mk in head.items():
        assert mk[2].all() and not mk[[0, 1, 3]].any(), k
    kv = component_masks(m, "blocks.0.attn.kv_head.1")
    assert sorted(kv) == ["blocks.0.attn.W_K", "blocks.0.attn.W_V"]
    for k, mk in kv.items():
        assert mk[1].all() and not mk[0].any(), k
    # the attention weights are covered once by the heads and key/value heads
    params = dict(m.named_parameters())
    cover = {k: torch.zeros_like(v, dtype=torch.int64) for k, v in params.items() if ".attn.W_" in k}
    for c in comps:
        for k, mk in component_masks(m, c).items():
            if k in cover:
                cover[k] += mk.long()
    assert all(bool((v == 1).all()) for v in cover.values())
    x = torch.randint(0, 13, (2, 8), generator=torch.Generator().manual_seed(0))
    kw = dict(KW, loss_fn=lambda mm, b: mm(b, return_type="loss"), step_size=1e-4, localization=100.0)
    kw.update(nbeta=10.0, num_draws=5)
    names = ["blocks.0.attn.head.2", "blocks.0.attn.kv_head.1"]
    res = refined_llc(m, [x], components=names, batched=False, include_full=False, **kw)
    for i, c in enumerate(names):
        mk = component_masks(m, c)
        alone = estimate_llc(m, [x], restrict_to=list(mk), masks=mk, batched=False, **kw)
        np.testing.assert_array_equal(res.llc_per_chain[i], alone.llc_per_chain)
        assert res.num_params[i] == sum(int(v.sum()) for v in mk.values())


def test_online_components_equal_refined_llc_and_checkpoints_need_the_same_weights(tmp_path):
    model, train = _net(), _data(1)
    cb = OnlineLLC(train, steps=[3], components=COMPS, **KW)
    row = cb(model, 3)
    off = refined_llc(model, train, components=COMPS, **KW)
    assert row["llc_mean"] == off.llc_mean[0]
    assert row["refined"] == {"first": off.llc_mean[1], "second": off.llc_mean[2]}
    ck = str(tmp_path / "c.pt")
    first = OnlineLLC(train, steps=[0], checkpoint=ck, **KW)(model, 0)
    assert sorted(os.listdir(tmp_path)) == [
        "c.online.pt",
        "c.step0.pt",
    ]  # the curve's state and the estimate's
    again = OnlineLLC(train, steps=[0], checkpoint=ck, **KW)(model, 0)  # a resumed loop: same numbers
    assert again["llc_mean"] == first["llc_mean"]
    with torch.no_grad():
        model[0].weight.mul_(3.0)
    with pytest.raises(Exception, match="different run"):
        OnlineLLC(train, steps=[0], checkpoint=ck, **KW)(model, 0)


def test_bad_arguments_are_refused_by_name():
    model, train = _net(), _data(1, 16)
    with pytest.raises(TypeError, match="include_full"):
        refined_llc(model, train, components=COMPS, include_full="no", **KW)
    with pytest.raises(ValueError, match="data_loss_fn"):
        refined_llc(model, train, components=COMPS, data_loss_fn=mse, **KW)
    with pytest.raises(TypeError, match="data_loss_fn=3"):
        refined_llc(model, train, components=COMPS, data=train, data_loss_fn=3, **KW)
    with pytest.raises(ValueError, match="components='head'"):
        OnlineLLC(train, every=1, components="head", **KW)
    with pytest.raises(TypeError, match="components=5"):
        OnlineLLC(train, every=1, components=5, **KW)
    with pytest.raises(TypeError, match="loss must be a number"):
        OnlineLLC(train, steps=[0], **KW)(model, 0, loss="abc")
    row = OnlineLLC(train, steps=[0], **KW)(model, 0, loss=torch.tensor(1.5))
    assert row["train_loss"] == 1.5
