"""Refined LLCs and OnlineLLC on the models users bring: Hugging Face GPT-2, GPT-NeoX (parallel attention, partial
rotary) and Llama (grouped-query attention), briefly trained, unconverted (raw and ``hooked_hf``) and converted by
``from_hf``.

* Both forms list the same components, and each unconverted component's mask moves exactly the converted
  component's weights (a head: its query rows and output columns; a shared key/value head: ``kv_head``).
* Per-component LLCs: the raw model and ``hooked_hf`` agree bit for bit; the converted model agrees exactly (to
  float32 rounding) where the moving parameters have the same layout (the embeddings, GPT-2's MLP), else within
  standard errors (the noise is keyed by position in the moving tensors, which differ).
* Data-refined rows on Hugging Face dict batches (``attention_mask``, ``labels`` with -100) start from Hugging
  Face's own loss and equal ``estimate_llc`` on that data.
* OnlineLLC in a user's own training loop, with its checkpoint files and saved result; one-shot iterables.
* Tied and frozen weights; ``chains=`` that leaves a row without a chain is refused.
* Truth: a model of independent quadratic parts has per-part LLC sum_i nbeta c_i / (2 a_i (1 - eps a_i / 4)),
  a_i = nbeta c_i + localization (finite nbeta and SGLD's step; d / 2 in the limit), on two data sets.
"""

import os
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import pypattern as pp
from pypattern.sampling.online import OnlineLLC, OnlineLLCResult

transformers = pytest.importorskip("transformers")

V = 16


def _tokens(n, seed, length=10):
    g = torch.Generator().manual_seed(seed)
    period = torch.randint(0, V, (n, 3), generator=g)
    return period.repeat(1, (length + 2) // 3)[:, :length].contiguous()


def _hf(kind, tie=False):
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=V, n_embd=16, n_layer=2, n_head=2, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0,
        )  # fmt: skip
        m = transformers.GPT2LMHeadModel(cfg)
    elif kind == "neox":
        cfg = transformers.GPTNeoXConfig(
            vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            rotary_pct=0.5, use_parallel_residual=True, max_position_embeddings=16, hidden_dropout=0.0,
            attention_dropout=0.0, tie_word_embeddings=tie,
        )  # fmt: skip
        m = transformers.GPTNeoXForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(
            vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=16, tie_word_embeddings=tie,
        )  # fmt: skip
        m = transformers.LlamaForCausalLM(cfg)
    return m.eval()


def _train(m, steps=30):
    data = _tokens(64, 0)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for s in range(steps):
        b = data[(s * 8) % 64 : (s * 8) % 64 + 8]
        loss = m(input_ids=b, labels=b).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m


@pytest.fixture(scope="module")
def trained():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = {}
        for kind in ("gpt2", "neox", "llama"):
            m = _train(_hf(kind))
            out[kind] = (m, pp.from_hf(m))
    return out


KW = dict(
    num_chains=3,
    num_draws=12,
    num_burnin_steps=10,
    step_size=1e-3,
    localization=100.0,
    nbeta=20.0,
    seed=3,
    quiet=True,
    warn_nonstationary=False,
)
DATA = [_tokens(8, 100 + i) for i in range(2)]


def _quiet(f, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return f(*a, **k)


@pytest.mark.parametrize("kind", ["gpt2", "neox", "llama"])
def test_both_forms_list_the_same_components_over_the_same_weights(trained, kind):
    from pypattern.models.hf_masks import hf_component_masks, hf_components
    from pypattern.models.transformer import component_masks, list_components

    hf, conv = trained[kind]
    for heads in (True, False):
        assert hf_components(hf, heads=heads) == list_components(conv, heads=heads)
    names = hf_components(hf)
    if kind == "llama":  # 4 query heads over 2 shared key/value heads per layer
        assert [c for c in names if c.startswith("blocks.1.attn")] == [
            *[f"blocks.1.attn.head.{h}" for h in range(4)],
            "blocks.1.attn.kv_head.0",
            "blocks.1.attn.kv_head.1",
        ]
        q = component_masks(conv, "blocks.0.attn.head.2")
        assert sorted(q) == ["blocks.0.attn.W_O", "blocks.0.attn.W_Q"]  # no key/value slice: kv_head has it
        assert sorted(hf_component_masks(hf, "blocks.0.attn.head.2")) == [
            "model.layers.0.self_attn.o_proj.weight",
            "model.layers.0.self_attn.q_proj.weight",
        ]
    assert ("unembed" in names) == (kind != "gpt2")  # GPT-2 ties its output head to the embedding
    base = {k: v.clone() for k, v in conv.state_dict().items()}
    saved = {k: p.detach().clone() for k, p in hf.named_parameters()}
    # an unconverted component's weights, moved, move exactly the converted component's weights
    for name in [c for c in names if ".attn." in c or c == "blocks.0.mlp"]:
        hm = hf_component_masks(hf, name)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for k, p in hf.named_parameters():
                if k in hm:
                    p.add_(hm[k].to(p.dtype) * (0.3 + 0.1 * torch.randn(p.shape, generator=g)))
        moved = _quiet(pp.from_hf, hf, verify=False)
        cm = component_masks(conv, name)
        for k, p in moved.named_parameters():
            changed = p.detach() != base[k]
            assert torch.equal(changed, cm.get(k, torch.zeros_like(changed))), (name, k)
        with torch.no_grad():
            for k, p in hf.named_parameters():
                p.copy_(saved[k])


@pytest.mark.parametrize("kind", ["gpt2", "neox", "llama"])
def test_unconverted_rows_equal_converted_rows(trained, kind):
    hf, conv = trained[kind]
    comps = {
        "gpt2": ["embed", "pos_embed", "blocks.0.mlp", "blocks.1.attn.head.0"],
        "neox": ["embed", "blocks.0.attn.head.1", "blocks.1.mlp", "unembed"],
        "llama": ["embed", "blocks.0.attn.head.3", "blocks.1.attn.kv_head.0", "blocks.0.mlp"],
    }[kind]
    raw = _quiet(pp.refined_llc, hf, DATA, components=comps, **KW)
    hooked = _quiet(pp.refined_llc, pp.hooked_hf(hf), DATA, components=comps, **KW)
    converted = _quiet(pp.refined_llc, conv, DATA, components=comps, **KW)
    assert raw.component == converted.component == ["full", *comps]
    np.testing.assert_array_equal(raw.num_params, converted.num_params)
    # the adapter runs the same model on the same parameters: the same numbers
    np.testing.assert_array_equal(hooked.llc_per_chain, raw.llc_per_chain)
    np.testing.assert_allclose(converted.init_loss, raw.init_loss, rtol=1e-6)
    # the same layout of the moving tensors (GPT-2's Conv1D MLP weights are W_in / W_out as they are): same noise
    same_layout = {"embed", "pos_embed"} | ({"blocks.0.mlp"} if kind == "gpt2" else set())
    for i, c in enumerate(raw.component):
        if c in same_layout:
            np.testing.assert_allclose(converted.llc_per_chain[i], raw.llc_per_chain[i], rtol=1e-4, atol=1e-5)
        else:  # other noise, the same distribution
            se = np.hypot(raw.llc_se[i], converted.llc_se[i])
            assert abs(raw.llc_mean[i] - converted.llc_mean[i]) < 4.5 * se + 0.05, (c, raw.llc_mean[i])


def test_data_refined_rows_on_hugging_face_dict_batches(trained):
    hf, conv = trained["llama"]

    def padded(seed, lengths):
        ids = _tokens(len(lengths), seed)
        mask = (torch.arange(ids.shape[1]) < torch.tensor(lengths)[:, None]).long()
        ids = ids.masked_fill(mask == 0, 0)
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    other = [padded(200, [10, 7, 5, 10]), padded(201, [4, 10, 9, 6])]
    comps = ["embed", "blocks.0.attn.head.1"]
    res = _quiet(pp.refined_llc, hf, DATA, components=comps, data=other, **KW)
    assert res.data == ["train"] * 3 + ["data"] * 3
    with torch.no_grad():
        want = np.mean([float(hf(**b).loss) for b in other])  # Hugging Face's own loss, batch by batch
    np.testing.assert_allclose(res.init_loss[3:], want, rtol=1e-6)
    from pypattern.models.hf_masks import hf_component_masks

    for i, c in enumerate(res.component[3:], start=3):
        mk = None if c == "full" else hf_component_masks(hf, c)
        alone = _quiet(
            pp.estimate_llc, hf, other, restrict_to=None if mk is None else list(mk), masks=mk, **KW
        )
        np.testing.assert_allclose(res.llc_per_chain[i], alone.llc_per_chain, rtol=1e-5, atol=1e-6, err_msg=c)
    on_conv = _quiet(pp.refined_llc, conv, DATA, components=["embed"], data=other, **KW)
    np.testing.assert_allclose(on_conv.init_loss[2:], want, rtol=1e-6)
    np.testing.assert_allclose(on_conv.llc_per_chain[3], res.llc_per_chain[4], rtol=1e-4, atol=1e-5)


def test_online_llc_in_a_users_training_loop_on_a_hugging_face_model(tmp_path):
    kw = dict(KW, num_draws=5, num_burnin_steps=3, num_chains=2)
    kw.pop("quiet")
    kw.pop("warn_nonstationary")

    def run(cb):
        m = _hf("llama")
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        data, snaps = _tokens(32, 0), {}
        for step in range(4):
            b = data[step * 8 : (step + 1) * 8]
            loss = m(input_ids=b, labels=b).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            if cb is not None:
                if cb.due(step):
                    snaps[step] = {k: v.clone() for k, v in m.state_dict().items()}
                _quiet(cb, m, step, loss=loss)
        return m, snaps

    ck = str(tmp_path / "ck.pt")
    plain, _ = run(None)
    cb = OnlineLLC(DATA, every=2, components="heads", checkpoint=ck, **kw)
    tracked, snaps = run(cb)
    for (k, a), b in zip(plain.state_dict().items(), tracked.state_dict().values(), strict=True):
        assert torch.equal(a, b), k  # the training run is untouched
    res = cb.result
    assert list(res.step) == [0, 2] and sorted(os.listdir(tmp_path)) == [
        "ck.online.pt",
        "ck.step0.pt",
        "ck.step2.pt",
    ]
    for i, step in enumerate(res.step):
        m = _hf("llama")
        m.load_state_dict(snaps[int(step)])
        off = _quiet(pp.refined_llc, m, DATA, components="heads", **kw)
        assert off.llc_mean[0] == res.llc_mean[i]
        assert {c: off.llc(c) for c in off.component[1:]} == {k: v[i] for k, v in res.refined.items()}
        # a resumed loop repeating the step reads its checkpoint file: the same row
        again = _quiet(
            OnlineLLC(DATA, steps=[int(step)], components="heads", checkpoint=ck, **kw), m, int(step)
        )
        assert again["llc_mean"] == res.llc_mean[i]
    res.save(tmp_path / "curve.npz")
    back = OnlineLLCResult.load(tmp_path / "curve.npz")
    np.testing.assert_array_equal(back.llc_mean, res.llc_mean)
    assert back.refined.keys() == res.refined.keys()


def _mlp_and_data():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 3, generator=g), torch.randn(16, 1, generator=g)
    return net, [(x[:8], y[:8]), (x[8:], y[8:])]


def _mse(m, b):
    return ((m(b[0]) - b[1]) ** 2).mean()


SMALL = dict(num_chains=2, num_draws=4, step_size=1e-3, localization=10.0, seed=0, loss_fn=_mse, quiet=True)


def test_online_llc_keeps_one_shot_components_callbacks_and_chains_for_every_estimate():
    net, data = _mlp_and_data()
    names = [n for n, _ in net.named_parameters()]
    want = _quiet(pp.refined_llc, net, data, components=["0.weight", "2.weight"], chains=[1, 2, 5], **SMALL)
    seen = []
    cb = OnlineLLC(
        data,
        every=1,
        components=filter(lambda n: n.endswith("weight"), names),
        callbacks=iter([lambda: seen.append(1)]),
        chains=iter([1, 2, 5]),
        **SMALL,
    )
    for step in range(3):
        row = _quiet(cb, net, step)
        assert row["refined"] == {"0.weight": want.llc_mean[1], "2.weight": want.llc_mean[2]}, step
        assert len(seen) == 3 * 4 * (step + 1)  # 3 chains x 4 draws at every estimate


def test_tied_weight_names_and_frozen_slices(trained):
    gpt2, _ = trained["gpt2"]
    kw = dict(KW, num_draws=4, num_chains=2)
    by_name = _quiet(pp.refined_llc, gpt2, DATA, components=["embed"], include_full=False, **kw)
    full_mask = torch.ones(V, 16, dtype=torch.bool)
    for spec in (["lm_head.weight"], {"lm_head.weight": full_mask}):
        # the output head's name of the tied embedding is the embedding
        res = _quiet(pp.refined_llc, gpt2, DATA, components={"u": spec}, include_full=False, **kw)
        assert res.num_params[0] == V * 16
        np.testing.assert_array_equal(res.llc_per_chain, by_name.llc_per_chain)
    # both names of the tied weight in one component: the weights either mask selects
    half = torch.zeros(V, 16, dtype=torch.bool)
    half[:5] = True
    both = {"transformer.wte.weight": half, "lm_head.weight": half.roll(3, 0)}
    res = _quiet(pp.refined_llc, gpt2, DATA, components={"u": both}, include_full=False, **kw)
    assert res.num_params[0] == 8 * 16
    with pytest.raises(ValueError, match="the mask of 'lm_head.weight' has shape"):
        pp.refined_llc(gpt2, DATA, components={"u": {"lm_head.weight": full_mask[1:]}}, **kw)
    # a head whose query projection is frozen: its output columns move, on both forms alike
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = _train(_hf("llama"), 10)
        conv = pp.from_hf(hf)
    for k, p in hf.named_parameters():
        p.requires_grad_("q_proj" not in k)
    for k, p in conv.named_parameters():
        p.requires_grad_("W_Q" not in k)
    comps = ["blocks.0.attn.head.1", "blocks.0.attn"]
    a = _quiet(pp.refined_llc, hf, DATA, components=comps, **kw)
    b = _quiet(pp.refined_llc, conv, DATA, components=comps, **kw)
    total = sum(p.numel() for p in hf.parameters()) - 2 * 16 * 16
    assert (
        list(a.num_params) == list(b.num_params) == [total, 4 * 16, 3 * 16 * 16 // 2 + 16 * 16 - 16 * 16 // 2]
    )
    from pypattern.models.hf_masks import hf_component_masks

    o = {k: v for k, v in hf_component_masks(hf, comps[0]).items() if "o_proj" in k}
    alone = _quiet(pp.estimate_llc, hf, DATA, restrict_to=list(o), masks=o, **kw)
    np.testing.assert_allclose(a.llc_per_chain[1], alone.llc_per_chain, rtol=1e-5, atol=1e-6)


def test_chains_leaving_a_row_without_a_chain_are_refused_by_name():
    net, data = _mlp_and_data()
    comps = ["0.weight", "2.weight"]
    with pytest.raises(ValueError, match=r"chains=\[1\]: no chain of row '0.weight'.*chains=\[0, 2, 4\]"):
        pp.refined_llc(net, data, components=comps, chains=[1], **SMALL)
    every = _quiet(pp.refined_llc, net, data, components=comps, data=data[:1], **SMALL)
    some = _quiet(pp.refined_llc, net, data, components=comps, data=data[:1], chains=iter([1, 2, 5]), **SMALL)
    ran = np.array([[False, True], [True, False], [False, True]] * 2)
    np.testing.assert_array_equal(some.llc_per_chain[ran], every.llc_per_chain[ran])
    assert np.isnan(some.llc_per_chain[~ran]).all()


class _Parts(nn.Module):
    """y = (a . x[:3], B x[3:]): two independent linear parts."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 1, bias=False)
        self.B = nn.Linear(2, 2, bias=False)

    def forward(self, x):
        return torch.cat([self.a(x[:, :3]), self.B(x[:, 3:])], dim=1)


def _half_squared_error(m, b):
    return 0.5 * ((m(b[0]) - b[1]) ** 2).sum(1).mean()


def test_independent_regular_parts_have_their_closed_form_llcs_on_both_data_sets():
    # L(w) - L(w*) = sum_j c_j (w_j - w*_j)^2 / 2 with one curvature c_j per input (x_j = sqrt(n c_j) e_j, a
    # noise-free teacher): SGLD's stationary law is Gaussian, variance 1 / (a (1 - eps a / 4)) with
    # a = nbeta c + localization, so a part's LLC is sum_j nbeta c_j / (2 a_j (1 - eps a_j / 4)) (-> d / 2)
    torch.manual_seed(0)
    model = _Parts().double()

    def data(curv):
        x = torch.diag(torch.sqrt(torch.tensor(curv, dtype=torch.float64) * len(curv)))
        with torch.no_grad():
            return [(x, model(x))]

    c_train, c_data = [1.0, 1.0, 1.0, 4.0, 4.0], [3.0, 3.0, 3.0, 1.5, 1.5]
    nbeta, gamma, eps = 100.0, 1.0, 2e-3
    row0 = torch.zeros(2, 2, dtype=torch.bool)
    row0[0] = True
    comps = {"a": ["a.weight"], "B": ["B.weight"], "B_row0": {"B.weight": row0}}
    res = _quiet(
        pp.refined_llc, model, data(c_train), components=comps, data=data(c_data), loss_fn=_half_squared_error,
        num_chains=16, num_draws=600, num_burnin_steps=100, step_size=eps, nbeta=nbeta, localization=gamma,
        seed=0, quiet=True,
    )  # fmt: skip

    def truth(curv):
        return sum(nbeta * c / (2 * (nbeta * c + gamma) * (1 - eps * (nbeta * c + gamma) / 4)) for c in curv)

    for i, (c, d) in enumerate(zip(res.component, res.data, strict=True)):
        cv = c_train if d == "train" else c_data
        b_coords = [cv[3], cv[4], cv[3], cv[4]]
        curv = {"full": cv[:3] + b_coords, "a": cv[:3], "B": b_coords, "B_row0": cv[3:]}[c]
        assert res.num_params[i] == len(curv)
        assert res.llc_mean[i] == pytest.approx(truth(curv), rel=0.06), (c, d)
    # the step's correction is what the estimate follows: B's is 25% above d / 2 on the training data
    assert res.llc("B") > 1.15 * 2.0
