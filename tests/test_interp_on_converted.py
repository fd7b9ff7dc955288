"""Representation similarity, interpretive equivalence and concept flags on Hugging Face models converted with
from_hf (GPT-2, GPT-NeoX, Llama with grouped-query attention), checked against the same computations on
activations captured with forward hooks on the unconverted Hugging Face model: the residual stream entering a
decoder layer (a forward pre-hook), leaving it (a forward hook), and the per-head attention output ``z`` (the
input of the output projection, head ``h`` = columns ``h * d_head .. (h + 1) * d_head``)."""

import copy

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import pypattern as pp  # noqa: E402
from pypattern.equivalence import (  # noqa: E402
    interpretive_equivalence,
    representations,
    resample_implementations,
)
from pypattern.flags import FlagSpec, read_flags, steer, train_flags  # noqa: E402
from pypattern.interpretive import accumulated_residual, similarity  # noqa: E402
from pypattern.tasks.topics import TopicTask  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TASK = TopicTask(num_topics=2, tokens_per_topic=8, num_shared=4, seq_len=12)
V, T = TASK.d_vocab, 12
ARCHS = ["gpt2", "neox", "llama"]


def _hf(arch: str, seed: int = 0, width: int = 16):
    torch.manual_seed(seed)
    if arch == "gpt2":
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
        m = transformers.GPT2LMHeadModel(cfg)
    elif arch == "neox":
        cfg = transformers.GPTNeoXConfig(
            vocab_size=V,
            hidden_size=width,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=24,
            rotary_pct=0.5,
            max_position_embeddings=T,
            hidden_dropout=0.0,
            attention_dropout=0.0,
        )
        m = transformers.GPTNeoXForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(
            vocab_size=V,
            hidden_size=width,
            intermediate_size=24,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=T,
        )
        m = transformers.LlamaForCausalLM(cfg)
    return m.eval()


def _layers(hf):
    if hasattr(hf, "transformer"):
        return list(hf.transformer.h)
    if hasattr(hf, "gpt_neox"):
        return list(hf.gpt_neox.layers)
    return list(hf.model.layers)


def _out_proj(layer):
    for path in ("attn.c_proj", "attention.dense", "self_attn.o_proj"):
        mod = layer
        try:
            for p in path.split("."):
                mod = getattr(mod, p)
        except AttributeError:
            continue
        return mod
    raise AssertionError(f"no attention output projection in {type(layer).__name__}")


def _first(x):
    return x[0] if isinstance(x, tuple | list) else x


def hf_residuals(hf, tokens, pre_hooks=()):
    """``[resid_pre of layer 0, resid_post of layer 0, ..., resid_post of the last layer]`` ``(batch, pos,
    d_model)``, read with forward (pre-)hooks on the unconverted model's decoder layers; ``pre_hooks`` are
    extra ``(module, fn)`` forward pre-hooks active during the run."""
    layers = _layers(hf)
    got = {}

    def pre(module, args, kwargs):
        got["pre"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    handles = [layers[0].register_forward_pre_hook(pre, with_kwargs=True)]
    for i, layer in enumerate(layers):
        handles.append(
            layer.register_forward_hook(lambda m, a, out, i=i: got.__setitem__(i, _first(out).detach()))
        )
    handles += [mod.register_forward_pre_hook(fn) for mod, fn in pre_hooks]
    try:
        with torch.no_grad():
            hf(tokens)
    finally:
        for h in handles:
            h.remove()
    return [got["pre"]] + [got[i] for i in range(len(layers))]


def _tokens(n, seed):
    return torch.randint(0, V, (n, T), generator=torch.Generator().manual_seed(seed))


# ----- CKA -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pair", [("gpt2", "neox"), ("neox", "llama"), ("llama", "gpt2")])
def test_cka_matrix_of_converted_models_equals_hf_hooks(pair):
    a, b = (_hf(arch, seed=i).double() for i, arch in enumerate(pair))
    ta, tb = pp.from_hf(a), pp.from_hf(b)
    tokens = _tokens(24, seed=1)
    names = ["blocks.0.hook_resid_pre"] + [f"blocks.{layer}.hook_resid_post" for layer in range(2)]
    _, ca = ta.run_with_cache(tokens, names_filter=names)
    _, cb = tb.run_with_cache(tokens, names_filter=names)
    for debiased in (True, False):
        ours = pp.cka_matrix(
            [ca[n].flatten(0, 1) for n in names], [cb[n].flatten(0, 1) for n in names], debiased=debiased
        )
        ha, hb = hf_residuals(a, tokens), hf_residuals(b, tokens)
        theirs = pp.cka_matrix(
            [x.flatten(0, 1) for x in ha], [x.flatten(0, 1) for x in hb], debiased=debiased
        )
        ours, theirs = np.asarray(ours), np.asarray(theirs)
        assert ours.shape == (3, 3)
        np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-12)
    # a wrong layer would show: the matrix is not constant
    assert np.ptp(ours) > 1e-3


# ----- interpretive equivalence ---------------------------------------------------------------------------------
def hf_resampler(hf, tokens, layer, head, d_head, hooks_at=(1, 2)):
    """The unconverted model's counterpart of :func:`resample_implementations` with the site ``("blocks.{layer}.
    attn.hook_z", head)``: input ``i`` gets the head's attention output ``z`` of input ``idx[i]`` (``idx`` drawn
    from ``seed`` as pypattern draws it), written into the input of the output projection; the representation is
    the hooked residual streams ``hooks_at`` (indices into :func:`hf_residuals`), flattened."""
    proj = _out_proj(_layers(hf)[layer])
    cols = slice(head * d_head, (head + 1) * d_head)
    store = {}

    def save(module, args):
        store["z"] = args[0].detach().clone()

    h = proj.register_forward_pre_hook(save)
    try:
        with torch.no_grad():
            hf(tokens)
    finally:
        h.remove()
    cf = store["z"]

    def rep(pre_hooks=()):
        res = hf_residuals(hf, tokens, pre_hooks)
        return torch.cat([res[i].reshape(len(tokens), -1) for i in hooks_at], 1)

    def sample(seed):
        n = len(tokens)  # each input draws one of the others
        j = torch.randint(0, n - 1, (n,), generator=torch.Generator().manual_seed(seed))
        idx = torch.where(j >= torch.arange(n), j + 1, j)

        def patch(module, args):
            x = args[0].clone()
            x[..., cols] = cf[idx][..., cols]
            return (x, *args[1:])

        return rep([(proj, patch)])

    return rep(), sample


@pytest.mark.parametrize("pair", [("gpt2", "llama"), ("neox", "gpt2")])
@pytest.mark.parametrize("measure", ["cka", "ridge"])
def test_interpretive_equivalence_on_converted_models_equals_hf_hooks(pair, measure):
    a, b = (_hf(arch, seed=i).double() for i, arch in enumerate(pair))
    ta, tb = pp.from_hf(a), pp.from_hf(b)
    tokens = _tokens(20, seed=2)
    sites_a, sites_b = [("blocks.0.attn.hook_z", 1)], [("blocks.1.attn.hook_z", 3)]
    rep_a, rep_b = representations(ta, tokens), representations(tb, tokens)
    ours = interpretive_equivalence(
        rep_a,
        rep_b,
        resample_implementations(ta, tokens, sites_a),
        resample_implementations(tb, tokens, sites_b),
        num_trials=3,
        similarity=measure,
        seed=5,
    )
    ha, sample_ha = hf_resampler(a, tokens, 0, 1, ta.cfg.d_head)
    hb, sample_hb = hf_resampler(b, tokens, 1, 3, tb.cfg.d_head)
    torch.testing.assert_close(rep_a, ha, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(rep_b, hb, rtol=1e-10, atol=1e-10)
    theirs = interpretive_equivalence(ha, hb, sample_ha, sample_hb, num_trials=3, similarity=measure, seed=5)
    np.testing.assert_allclose(ours.own, theirs.own, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(ours.other, theirs.other, rtol=1e-8, atol=1e-10)
    assert ours.wins == theirs.wins
    np.testing.assert_equal(ours.score, theirs.score)  # NaN for both when every comparison tied
    # the resampling acted: an implementation differs from its model
    assert not torch.allclose(resample_implementations(ta, tokens, sites_a)(0), rep_a)


def _pooled_residuals_match_hf_hooks(model, hf, tokens):
    """accumulated_residual of ``model`` (``hf`` itself, or its conversion) against the pooled residual streams
    read with forward hooks on ``hf``, and its logits against ``hf``'s; returns (ours, theirs)."""
    ours, logits = accumulated_residual(model, tokens)
    theirs = torch.cat([x.mean(1) for x in hf_residuals(hf, tokens)], 1)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        torch.testing.assert_close(logits, hf(tokens).logits, rtol=1e-10, atol=1e-10)
    return ours, theirs


@pytest.mark.parametrize("arch", ARCHS)
def test_accumulated_residual_and_similarity_on_converted_equal_hf_hooks(arch):
    """pypattern.interpretive's representation (embedding + every resid_post, mean over positions) of a
    converted model equals the pooled hooked HF residual streams; so do its similarities."""
    hf = _hf(arch).double()
    tf = pp.from_hf(hf)
    tokens = _tokens(30, seed=3)
    ours, theirs = _pooled_residuals_match_hf_hooks(tf, hf, tokens)
    other = torch.cat([x.mean(1) for x in hf_residuals(_hf(arch, seed=7).double(), tokens)], 1)
    for measure in ("cka", "ridge", "procrustes"):
        np.testing.assert_allclose(
            similarity(measure, ours, [other], seed=1),
            similarity(measure, theirs, [other], seed=1),
            rtol=1e-8,
        )


@pytest.mark.parametrize("arch", ARCHS)
def test_accumulated_residual_of_the_unconverted_model_reads_its_hook_points(arch):
    """An unconverted Hugging Face model is read through pypattern.hooked_hf's residual hook points: the pooled
    hooked HF residual streams and the model's own logits; with right padding, the converted model's result."""
    hf = _hf(arch).double()
    tokens = _tokens(12, seed=4)
    ours, _ = _pooled_residuals_match_hf_hooks(hf, hf, tokens)
    mask = torch.ones_like(tokens)
    mask[0, 7:] = 0
    mask[3, 2:] = 0
    for positions in (None, -1, slice(1, 5)):
        a, _ = accumulated_residual(hf, tokens, attention_mask=mask, positions=positions)
        b, _ = accumulated_residual(pp.from_hf(hf), tokens, attention_mask=mask, positions=positions)
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)

    def zero_head(z, hook):  # a patch at a hook point the adapter does not have: run on the converted model
        z[:, :, 1] = 0
        return z

    patch = [("blocks.0.attn.hook_z", zero_head)]
    a, _ = accumulated_residual(hf, tokens, fwd_hooks=patch)
    b, _ = accumulated_residual(pp.from_hf(hf), tokens, fwd_hooks=patch)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(a, ours)


@pytest.mark.parametrize("arch", ARCHS)
def test_representations_and_implementations_of_the_unconverted_model_equal_the_converted_ones(arch):
    """representations and resample_implementations read an unconverted Hugging Face model through
    pypattern.hooked_hf's hook points: the converted model's values, the resampled head outputs included."""
    hf = _hf(arch).double()
    tf = pp.from_hf(hf)
    tokens = _tokens(10, seed=5)
    torch.testing.assert_close(
        representations(hf, tokens), representations(tf, tokens), rtol=1e-10, atol=1e-10
    )
    names = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_post"]
    torch.testing.assert_close(
        representations(hf, tokens, names), representations(tf, tokens, names), rtol=1e-10, atol=1e-10
    )
    sites = [("blocks.0.hook_attn_out", None)]
    for seed in (0, 3):
        torch.testing.assert_close(
            resample_implementations(hf, tokens, sites)(seed),
            resample_implementations(tf, tokens, sites)(seed),
            rtol=1e-10,
            atol=1e-10,
        )
    assert not torch.allclose(resample_implementations(hf, tokens, sites)(0), representations(hf, tokens))


def test_accumulated_residual_refuses_a_model_without_residual_hook_points():
    mlp = torch.nn.Sequential(torch.nn.Embedding(V, 8), torch.nn.Linear(8, V))
    with pytest.raises(
        TypeError, match=r"model is a Sequential; accumulated_residual reads .*pypattern.from_hf"
    ):
        accumulated_residual(mlp, _tokens(2, seed=0))
    hooked = pp.models.HookedModule(mlp, {"blocks.0.hook_resid_pre": "0"}, n_layers=1)
    with pytest.raises(ValueError, match=r"has no hook point 'blocks\.0\.hook_resid_post'"):
        accumulated_residual(hooked, _tokens(2, seed=0))


# ----- concept flags --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_flags_train_and_steer_on_converted_models(arch):
    """train_flags fine-tunes a converted model as it does a native one: the flag loss falls, and the flags the
    model writes come to read out the concept; steer then writes exactly the flag dimensions (the rest of the
    residual stream is untouched at that hook) and moves the logits."""
    tf = pp.from_hf(_hf(arch))
    before = copy.deepcopy(tf)
    spec = FlagSpec("blocks.1.hook_resid_pre", dims=(0, 1, 2, 3), num_concepts=2)
    res = train_flags(
        tf, TASK, spec, stage1_steps=60, stage2_steps=20, batch_size=32, lr=1e-2, seed=0, log_every=5
    )
    assert res.stages[0] == 1 and res.stages[-1] == 2
    assert res.flag_losses[-1] < 0.25 * res.flag_losses[0]
    assert any(
        not torch.equal(p, q) for p, q in zip(tf.parameters(), before.parameters(), strict=True)
    )  # the converted model's own weights were trained
    batch = TASK.sample(64, seed=11)
    _, cache = tf.run_with_cache(batch.tokens, names_filter=spec.hook)
    flags = read_flags(cache[spec.hook], spec)  # (batch, pos) concept read from the flag dimensions
    known = batch.extra["concept_pos"] >= 0
    acc = float((flags[known] == batch.extra["concept_pos"][known]).float().mean())
    assert acc > 0.9
    # steering, as on the native model: flag dims = the code, the other dims as without steering
    tokens = batch.tokens[:4]
    concept = torch.tensor([1, 0, 1, 1])
    _, clean = tf.run_with_cache(tokens, names_filter=spec.hook)
    with steer(tf, spec, concept):
        _, cache = tf.run_with_cache(tokens, names_filter=spec.hook)
        steered = tf(tokens)
    a, a0 = cache[spec.hook], clean[spec.hook]
    torch.testing.assert_close(a[..., list(spec.dims)], spec.code()[concept][:, None].expand(4, T, 4))
    torch.testing.assert_close(a[..., 4:], a0[..., 4:], rtol=0, atol=0)
    assert not torch.allclose(steered, tf(tokens), atol=1e-4)
    assert all(not hp._fns for hp in tf.hook_dict.values())
