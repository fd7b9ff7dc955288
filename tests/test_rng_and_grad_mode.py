"""Calls that leave the caller's global generator and grad mode as they were: conversion from Hugging Face models
draws no random numbers, the GPT-2 builder seeds a fork of the generator, and the per-sample gradient Gram
enables gradients itself."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import pypattern as pp
from pypattern.gram import per_sample_grad_gram
from pypattern.models import Transformer, TransformerConfig

transformers = pytest.importorskip("transformers")


def _tiny_gpt2():
    cfg = transformers.GPT2Config(vocab_size=31, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        return transformers.GPT2LMHeadModel(cfg).eval()


def _tiny_llama():
    cfg = transformers.LlamaConfig(
        vocab_size=29,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("build", [_tiny_gpt2, _tiny_llama])
def test_from_hf_leaves_the_global_generator_alone(build):
    hf = build()
    torch.manual_seed(0)
    expected = torch.rand(5)
    torch.manual_seed(0)
    model = pp.from_hf(hf)
    after = torch.rand(5)
    assert torch.equal(after, expected)
    # the conversion is still exact: its logits are the HF model's own
    tokens = torch.randint(0, hf.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, rtol=1e-5, atol=1e-5)


def test_a_model_built_on_meta_draws_nothing():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    cfg = TransformerConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_vocab=11, n_ctx=8, seed=None)
    with torch.device("meta"):
        m = Transformer(cfg)
    assert all(p.device.type == "meta" for p in m.parameters())
    assert torch.equal(torch.rand(3), expected)
    # an unseeded model on the CPU still draws its weights from the global generator (not all zeros)
    m2 = Transformer(cfg)
    assert float(m2.blocks[0].attn.W_Q.detach().abs().sum()) > 0


def test_gpt2_from_config_keeps_the_callers_generator_and_is_seeded():
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    a = pp.models.gpt2_from_config(n_layers=1, d_model=16, n_heads=2, d_vocab=17, n_ctx=8, seed=5)
    assert torch.equal(torch.rand(4), expected)
    b = pp.models.gpt2_from_config(n_layers=1, d_model=16, n_heads=2, d_vocab=17, n_ctx=8, seed=5)
    c = pp.models.gpt2_from_config(n_layers=1, d_model=16, n_heads=2, d_vocab=17, n_ctx=8, seed=6)
    wa, wb, wc = (m.transformer.h[0].attn.c_attn.weight for m in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)


def _gram_case():
    model = Transformer(
        TransformerConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, d_vocab=13, n_ctx=8, seed=0)
    )
    tokens = torch.randint(0, 13, (4, 6), generator=torch.Generator().manual_seed(0))

    def loss_fn(m, x):
        logits = m(x)
        return (
            torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, 13), x[:, 1:].reshape(-1), reduction="none"
            )
            .view(x.shape[0], -1)
            .mean(1)
        )

    return model, loss_fn, tokens


def test_grad_gram_under_no_grad_equals_the_plain_call():
    model, loss_fn, tokens = _gram_case()
    G = per_sample_grad_gram(model, loss_fn, tokens)
    with torch.no_grad():
        G_ng = per_sample_grad_gram(model, loss_fn, tokens)
        assert not torch.is_grad_enabled()  # put back afterwards
    assert G.shape == (4, 4)
    torch.testing.assert_close(G_ng, G, rtol=0, atol=0)
    assert float(G.diagonal().min()) > 0


def test_grad_gram_under_inference_mode_is_refused_by_name():
    model, loss_fn, tokens = _gram_case()
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        per_sample_grad_gram(model, loss_fn, tokens)


def test_train_flags_interrupted_puts_back_the_callers_gradients():
    topics = pp.TopicTask(num_topics=2, tokens_per_topic=8, seq_len=16)
    lm = pp.Transformer(topics.model_config(n_layers=2, d_model=32, n_heads=2, d_mlp=64, seed=0))
    spec = pp.FlagSpec("blocks.1.hook_resid_pre", dims=(0, 1, 2, 3), num_concepts=2)
    params = list(lm.parameters())
    for i, p in enumerate(params):
        p.grad = None if i == 0 else torch.full_like(p, 3.0)
    before = [p.detach().clone() for p in params]

    class Interrupting(pp.TopicTask):
        calls = 0

        def sample(self, num_samples, seed=None, switch_prob=None):
            self.calls += 1
            if self.calls == 4:
                raise KeyboardInterrupt("stopped during training")
            return super().sample(num_samples, seed=seed, switch_prob=switch_prob)

    task = Interrupting(num_topics=2, tokens_per_topic=8, seq_len=16)
    with pytest.raises(KeyboardInterrupt):
        pp.train_flags(lm, task, spec, stage1_steps=5, stage2_steps=5, log_every=0)
    assert task.calls == 4  # stopped after some steps had run
    assert all(torch.equal(a, p) for a, p in zip(before, params))
    assert params[0].grad is None
    assert all(p.grad is not None and bool((p.grad == 3.0).all()) for p in params[1:])


def test_reweight_with_a_generator_leaves_the_global_generator_alone():
    data = torch.utils.data.TensorDataset(torch.arange(40.0).view(20, 2), torch.arange(20))
    w = torch.rand(20, generator=torch.Generator().manual_seed(0)) + 0.5

    def batches(seed):
        loader = pp.reweight(data, w, batch_size=8, generator=torch.Generator().manual_seed(seed))
        torch.manual_seed(0)
        expected = torch.rand(2)
        torch.manual_seed(0)
        out = [b[1].tolist() for b in loader]
        assert torch.equal(torch.rand(2), expected)  # iterating drew nothing from the global generator
        return out

    a, b = batches(1), batches(1)
    assert a == b  # the draws follow the given generator
    assert sum(len(x) for x in a) == 20
    assert batches(2) != a


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_nonfinite_names_exact_also_when_a_sum_overflows(dtype):
    from pypattern._checks import nonfinite_names

    big = torch.full((10,), torch.finfo(dtype).max, dtype=dtype)  # finite, but its sum overflows
    nan, inf = big.clone(), big.clone()
    nan[3], inf[0] = float("nan"), float("inf")
    both = torch.tensor([float("inf"), -float("inf")], dtype=dtype)  # a sum of NaN
    strided = torch.randn(3, 4).to(dtype).t()
    named = [("big", big), ("nan", nan), ("inf", inf), ("both", both), ("strided", strided)]
    named += [("empty", torch.empty(0, dtype=dtype)), ("ints", torch.arange(3))]
    assert nonfinite_names(named) == ["nan", "inf", "both"]


def _compiled_case():
    model = Transformer(
        TransformerConfig(n_layers=2, d_model=16, n_heads=2, d_head=8, d_vocab=13, n_ctx=8, seed=1)
    )
    model.eval()
    g = torch.Generator().manual_seed(2)
    clean = torch.randint(0, 13, (3, 6), generator=g)
    corr = torch.randint(0, 13, (3, 6), generator=g)
    return model, torch.compile(model, backend="eager"), clean, corr


def test_a_compiled_pypattern_transformer_is_patched_as_the_model_it_wraps():
    from pypattern import circuits

    model, compiled, clean, corr = _compiled_case()
    metric = pp.LogProb(clean[:, -1])
    for site in ("z", "resid_pre"):
        a = pp.activation_patching(compiled, site, clean, corr, metric=metric, quiet=True).values
        b = pp.activation_patching(model, site, clean, corr, metric=metric, quiet=True).values
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    a = pp.attribution_patching(compiled, clean, corr, metric=metric, sites=["z"])["z"].values
    b = pp.attribution_patching(model, clean, corr, metric=metric, sites=["z"])["z"].values
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    a = circuits.edge_attribution(compiled, clean, corr, metric=metric).scores
    b = circuits.edge_attribution(model, clean, corr, metric=metric).scores
    torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), rtol=0, atol=0)


def test_a_compiled_pypattern_transformer_gets_its_default_gram_sites():
    model, compiled, clean, _ = _compiled_case()

    def per_seq(m, x):
        return m(x, return_type="per_token_loss").sum(-1)

    G = per_sample_grad_gram(compiled, per_seq, clean)
    torch.testing.assert_close(G, per_sample_grad_gram(model, per_seq, clean), rtol=0, atol=0)
    assert G.shape == (3, 3)


def test_susceptibilities_batched_on_a_converted_model_with_padded_batches():
    hf = _tiny_llama()
    conv = pp.from_hf(hf)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, hf.config.vocab_size, (8, 10), generator=g)
    mask = torch.ones(8, 10, dtype=torch.long)
    mask[2, 7:] = 0
    mask[5, 8:] = 0
    batches = [
        {"input_ids": ids[:4], "attention_mask": mask[:4]},
        {"input_ids": ids[4:], "attention_mask": mask[4:]},
    ]
    probe = {"input_ids": ids[:3], "attention_mask": mask[:3]}
    kw = dict(num_chains=2, num_draws=6, step_size=1e-3, localization=100.0, quiet=True, seed=0)
    comps = ["blocks.0.attn", "embed"]
    with warnings.catch_warnings():  # short chains: the diagnostics say so
        warnings.simplefilter("ignore")
        batched = pp.susceptibilities(conv, batches, probe, comps, batched=True, **kw).chi
        one_by_one = pp.susceptibilities(conv, batches, probe, comps, batched=False, **kw).chi
    assert float(abs(torch.as_tensor(one_by_one)).max()) > 0
    torch.testing.assert_close(torch.as_tensor(batched), torch.as_tensor(one_by_one), rtol=1e-6, atol=1e-9)


def test_shortlist_with_grad_drop_ranks_by_the_graddrop_score():
    import numpy as np

    model = Transformer(
        TransformerConfig(
            n_layers=3, d_model=24, n_heads=4, d_head=6, d_vocab=17, n_ctx=8, seed=3, dtype=torch.float64
        )
    )
    V = model.cfg.d_vocab
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, V, (4, 6), generator=g)
    corr = clean.clone()
    corr[:, 1] = (corr[:, 1] + 5) % V
    ans = torch.randint(0, V, (4,), generator=g)
    metric = pp.LogitDiff(ans, (ans + 1) % V)
    rows = pp.shortlist_and_confirm(model, "z", clean, corr, metric=metric, k=8, grad_drop=True)
    at = pp.attribution_patching(model, clean, corr, metric=metric, sites=["z"], qk_fix=True, grad_drop=True)[
        "z"
    ]
    gd = at.info["graddrop"].mean(0)
    order = torch.argsort(gd.flatten(), descending=True, stable=True)[:8]
    expected = [tuple(int(i) for i in np.unravel_index(int(o), tuple(gd.shape))) for o in order]
    assert [(r["layer"], r["head"], r["pos"]) for r in rows] == expected
    assert [r["graddrop"] for r in rows] == pytest.approx([float(gd.flatten()[o]) for o in order], rel=1e-12)
    assert all(r["graddrop"] >= rows[i + 1]["graddrop"] for i, r in enumerate(rows[:-1]))
    # without GradDrop: ranked by |mean AtP|, and no graddrop entry
    plain = pp.shortlist_and_confirm(model, "z", clean, corr, metric=metric, k=8, grad_drop=False)
    assert "graddrop" not in plain[0]
    assert all(abs(r["atp"]) >= abs(plain[i + 1]["atp"]) for i, r in enumerate(plain[:-1]))


def test_devinterp_default_evaluate_decides_afresh_for_each_call():
    """Whether model(batch) returns the loss is not carried from one model of a class to another."""

    class LM(torch.nn.Module):
        def __init__(self, hf, return_loss):
            super().__init__()
            self.lm, self.return_loss = hf, return_loss

        def forward(self, x):
            logits = self.lm(input_ids=x).logits
            if self.return_loss:  # a loss of its own: the last position's prediction only
                return torch.nn.functional.cross_entropy(logits[:, -2], x[:, -1]), logits
            return logits

    hf = _tiny_llama()
    t = torch.randint(0, hf.config.vocab_size, (8, 10), generator=torch.Generator().manual_seed(0))
    loader = [t[:4], t[4:]]
    kw = dict(
        num_chains=2,
        num_draws=5,
        optimizer_kwargs=dict(lr=1e-4, localization=100.0, nbeta=10.0),
        verbose=False,
        seed=0,
    )

    def est(m):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pp.estimate_learning_coeff_with_summary(m, loader, **kw)["llc/mean"]

    a_alone, b_alone = est(LM(hf, True)), est(LM(hf, False))
    assert a_alone != b_alone  # the two losses differ
    assert est(LM(hf, True)) == a_alone  # after a model of the class that returns logits
    assert est(LM(hf, False)) == b_alone  # and the other way round


def test_conversion_refuses_a_module_whose_forward_was_replaced_on_the_object():
    hf = _tiny_llama()
    lin = hf.model.layers[0].mlp.down_proj
    extra = torch.nn.Parameter(torch.zeros(lin.out_features, 2))
    down = torch.nn.Parameter(torch.zeros(2, lin.in_features))
    plain = lin.forward

    def forward(x):  # a low-rank update patched onto the layer, zero at the start as LoRA's is
        return plain(x) + x @ down.t() @ extra.t()

    lin.forward = forward
    with pytest.raises(pp.models.convert.UnsupportedModelError, match="forward of its own"):
        pp.from_hf(hf)
    del lin.forward  # the class's forward again: converts
    pp.from_hf(hf)


def test_graddrop_of_a_residual_site_is_the_mean_over_its_passes():
    model = Transformer(
        TransformerConfig(
            n_layers=3, d_model=16, n_heads=2, d_head=8, d_vocab=13, n_ctx=8, seed=5, dtype=torch.float64
        )
    )
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, 13, (3, 6), generator=g)
    corr = torch.randint(0, 13, (3, 6), generator=g)
    metric = pp.LogProb(clean[:, -1])
    r = pp.attribution_patching(
        model, clean, corr, metric=metric, sites=["resid_post", "attn_out"], grad_drop=True, qk_fix=True
    )
    # the last layer's resid_post reads the metric's gradient unchanged in every pass: the mean of |AtP| over the
    # L passes is |AtP| (a component at the last layer: its own pass is zero, the mean over the other L - 1 too)
    for site in ("resid_post", "attn_out"):
        gd = r[site].info["graddrop"][:, -1]
        torch.testing.assert_close(gd, r[site].effect[:, -1].abs(), rtol=1e-10, atol=1e-12)
        assert float(gd.abs().max()) > 0


def test_train_takes_an_intervention_and_names_bad_sample_weights():
    from pypattern.patterning import Intervention

    task = pp.tasks.InductionTask(d_vocab=16, seq_len=12)
    data = task.sample(8, seed=0)
    w = np.linspace(0.5, 1.5, 8)
    iv = Intervention(
        h=(w - 1) / 8, weights=w, predicted=np.zeros(2), target=np.zeros(2), residual=0.0, method="pinv"
    )

    def trained(sw):
        model = Transformer(task.model_config(n_layers=1, d_model=16, n_heads=2, seed=0))
        res = pp.tasks.train(model, task, steps=3, data=data, sample_weights=sw, seed=0, log_every=1)
        return res, [p.detach().clone() for p in model.parameters()]

    (_, a), (_, b) = trained(iv), trained(torch.tensor(w))
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # the Intervention's weights, exactly
    with pytest.raises(TypeError, match="sample_weights is a str"):
        trained("uniform")


def test_reweight_names_empty_weights():
    data = torch.utils.data.TensorDataset(torch.arange(10.0))
    for mode in ("sampler", "loss"):
        with pytest.raises(ValueError, match="weights is empty"):
            pp.reweight(data, torch.ones(0), mode=mode)
