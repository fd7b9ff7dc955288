"""TransformerLens' analysis methods of ActivationCache (decompose_resid, accumulated_resid, stack_head_results,
get_full_resid_decomposition, apply_ln_to_stack, logit_attrs, ...), checked against the cached activations, naive
per-head / per-neuron loops and the model's own logits, on random models with LayerNorm, RMSNorm and no norm, and
on converted Hugging Face models."""

import pytest
import torch

from pypattern.models.hooks import ActivationCache
from pypattern.models.transformer import Transformer, TransformerConfig

V = 23
TOL = dict(rtol=1e-10, atol=1e-10)


def make(norm="LN", **kw):
    cfg = dict(n_layers=2, d_model=16, n_heads=4, d_mlp=24, d_vocab=V, n_ctx=8, seed=0, dtype=torch.float64)
    cfg.update(kw)
    m = Transformer(TransformerConfig(normalization_type=norm, **cfg))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # norm weights, norm biases and every bias away from their initial 1 / 0
        for p in m.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return m


def toks(batch=3, pos=6, seed=2):
    return torch.randint(0, V, (batch, pos), generator=torch.Generator().manual_seed(seed))


def resid_in(cache, model, layer, mlp_input=False):
    n = model.cfg.n_layers
    if layer == n:
        return cache[f"blocks.{n - 1}.hook_resid_post"]
    if mlp_input:
        return cache[f"blocks.{layer}.hook_resid_mid"]
    return cache[f"blocks.{layer}.hook_resid_pre"]


def naive_norm(norm_type, x, w=None, b=None, eps=1e-5):
    if norm_type in ("LN", "LNPre"):
        x = x - x.mean(-1, keepdim=True)
    y = x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    if w is not None:
        y = y * w
    return y if b is None else y + b


NORMS = ["LN", "RMS", None]


@pytest.mark.parametrize("norm", NORMS)
def test_decompose_resid_sums_to_cached_stream(norm):
    m = make(norm)
    _, c = m.run_with_cache(toks())
    for layer in range(m.cfg.n_layers + 1):
        for mlp_input in [False, True] if layer < m.cfg.n_layers else [False]:
            st, labels = c.decompose_resid(layer, mlp_input=mlp_input, return_labels=True)
            assert st.shape[0] == len(labels) and labels[:2] == ["embed", "pos_embed"]
            torch.testing.assert_close(st.sum(0), resid_in(c, m, layer, mlp_input), **TOL)
    st, labels = c.decompose_resid(mode="mlp", incl_embeds=False, return_labels=True)
    assert labels == ["0_mlp_out", "1_mlp_out"]
    torch.testing.assert_close(st, torch.stack([c["mlp_out", 0], c["mlp_out", 1]]))
    assert c.decompose_resid(mode="attn", return_labels=True)[1] == [
        "embed",
        "pos_embed",
        "0_attn_out",
        "1_attn_out",
    ]
    assert c.decompose_resid(-1).shape == c.decompose_resid(None).shape == (6, 3, 6, 16)


@pytest.mark.parametrize("norm", NORMS)
def test_accumulated_resid_entries_and_logit_lens(norm):
    m = make(norm)
    x = toks()
    logits, c = m.run_with_cache(x)
    st, labels = c.accumulated_resid(incl_mid=True, return_labels=True)
    assert labels == ["0_pre", "0_mid", "1_pre", "1_mid", "final_post"]
    want = [c["resid_pre", 0], c["resid_mid", 0], c["resid_pre", 1], c["resid_mid", 1], c["resid_post", 1]]
    torch.testing.assert_close(st, torch.stack(want), rtol=0, atol=0)
    st1, labels1 = c.accumulated_resid(layer=1, mlp_input=True, return_labels=True)
    assert labels1 == ["0_pre", "1_pre", "1_mid"]
    # logit lens: each stream through ln_final with its own statistics, then the unembedding
    lens = c.accumulated_resid(apply_ln=True)
    ln = m.ln_final
    for i, s in enumerate([c["resid_pre", 0], c["resid_pre", 1], c["resid_post", 1]]):
        ref = s if norm is None else naive_norm(norm, s, ln.w, getattr(ln, "b", None))
        torch.testing.assert_close(lens[i], ref, **TOL)
    torch.testing.assert_close(lens[-1] @ m.W_U + m.b_U, logits, **TOL)
    # below n_layers: the cached scale of that layer's ln1 (ln2 with mlp_input), with its weight
    st = c.accumulated_resid(layer=1, mlp_input=True, apply_ln=True)
    raw = c.accumulated_resid(layer=1, mlp_input=True)
    if norm is not None:
        blk = m.blocks[1].ln2
        cen = raw - raw.mean(-1, keepdim=True) if norm == "LN" else raw
        torch.testing.assert_close(st, cen / c["blocks.1.ln2.hook_scale"] * blk.w, **TOL)
        torch.testing.assert_close(st[-1] + getattr(blk, "b", 0), c["blocks.1.ln2.hook_normalized"], **TOL)
    else:
        torch.testing.assert_close(st, raw)


@pytest.mark.parametrize("norm", ["LN", "RMS"])
def test_stack_head_results_against_naive_heads_and_attn_out(norm):
    m = make(norm)
    _, c = m.run_with_cache(toks())
    st, labels = c.stack_head_results(return_labels=True)
    H = m.cfg.n_heads
    assert labels == [f"L{ell}H{h}" for ell in range(2) for h in range(H)] and st.shape == (2 * H, 3, 6, 16)
    for ell in range(2):
        z, W_O = c["z", ell], m.blocks[ell].attn.W_O
        for h in range(H):
            torch.testing.assert_close(st[ell * H + h], z[:, :, h, :] @ W_O[h], **TOL)
        torch.testing.assert_close(
            st[ell * H : (ell + 1) * H].sum(0) + m.blocks[ell].attn.b_O, c["attn_out", ell], **TOL
        )
        assert c[f"blocks.{ell}.attn.hook_result"].shape == (3, 6, H, 16)
    st, labels = c.stack_head_results(layer=1, incl_remainder=True, return_labels=True)
    assert labels[-1] == "remainder" and len(labels) == H + 1
    torch.testing.assert_close(st.sum(0), c["resid_pre", 1], **TOL)
    empty = c.stack_head_results(layer=0, pos_slice=-1)
    assert empty.shape == (0, 3, 16)
    ln = c.stack_head_results(apply_ln=True)
    torch.testing.assert_close(ln, c.apply_ln_to_stack(c.stack_head_results()), rtol=0, atol=0)


@pytest.mark.parametrize("norm", ["LN", "RMS"])
def test_full_resid_decomposition_sums_and_neurons(norm):
    m = make(norm)
    _, c = m.run_with_cache(toks())
    n, H, d_mlp = 2, m.cfg.n_heads, m.cfg.d_mlp
    for layer in range(n + 1):
        for mlp_input in [False, True] if layer < n else [False]:
            for expand in (True, False):
                st, labels = c.get_full_resid_decomposition(
                    layer, mlp_input=mlp_input, expand_neurons=expand, return_labels=True
                )
                assert st.shape[0] == len(labels) and labels[-3:] == ["embed", "pos_embed", "bias"]
                torch.testing.assert_close(st.sum(0), resid_in(c, m, layer, mlp_input), **TOL)
    st, labels = c.get_full_resid_decomposition(return_labels=True)
    assert len(labels) == n * H + n * d_mlp + 3 and labels[n * H] == "L0N0"
    # neuron results: hook_post times rows of W_out (naive loop over a few neurons)
    for ell in range(n):
        for k in (0, 7, d_mlp - 1):
            want = c["post", ell][..., k, None] * m.blocks[ell].mlp.W_out[k]
            torch.testing.assert_close(st[n * H + ell * d_mlp + k], want, **TOL)
    nr = c.get_neuron_results(1)
    torch.testing.assert_close(nr.sum(-2) + m.blocks[1].mlp.b_out, c["mlp_out", 1], **TOL)
    torch.testing.assert_close(c.get_neuron_results(1, neuron_slice=3), nr[..., 3:4, :], rtol=0, atol=0)
    ln = c.get_full_resid_decomposition(layer=1, mlp_input=True, apply_ln=True)
    torch.testing.assert_close(
        ln.sum(0) + getattr(m.blocks[1].ln2, "b", 0),
        c["blocks.1.ln2.hook_normalized"],
        **TOL,
    )


@pytest.mark.parametrize("norm", ["LN", "RMS", None])
def test_apply_ln_to_stack_reproduces_the_norms(norm):
    m = make(norm)
    _, c = m.run_with_cache(toks())
    b = getattr(m.ln_final, "b", None)
    final = c["resid_post", -1][None]
    out = c.apply_ln_to_stack(final)[0]
    torch.testing.assert_close(out + (0 if b is None else b), m.ln_final(c["resid_post", -1]), **TOL)
    if norm is not None:
        torch.testing.assert_close(out + (0 if b is None else b), c["ln_final.hook_normalized"], **TOL)
        # linear in the components: the decomposition's normalised parts sum to the normalised stream
        torch.testing.assert_close(c.decompose_resid(apply_ln=True).sum(0), out, **TOL)
        blk = m.blocks[1].ln1
        got = c.apply_ln_to_stack(c["resid_pre", 1][None], layer=1)[0] + getattr(blk, "b", 0)
        torch.testing.assert_close(got, c["blocks.1.ln1.hook_normalized"], **TOL)
    # batch_slice and pos_slice select the matching rows of the cached scale
    sub = c.apply_ln_to_stack(final[:, :, 2:5], batch_slice=1, pos_slice=(2, 5))  # the stack too
    torch.testing.assert_close(sub, out[None, 1, 2:5], **TOL)


@pytest.mark.parametrize("norm", ["LN", "RMS"])
def test_logit_attrs_of_final_stream_is_the_logit_difference(norm):
    m = make(norm)
    x = toks()
    logits, c = m.run_with_cache(x)
    tok, bad = x[:, -1], (x[:, -1] + 5) % V
    r = torch.arange(3)
    diff = logits[r, -1, tok] - logits[r, -1, bad]
    # TransformerLens' folded unembedding bias: b_U + ln_final.b @ W_U
    b_fold = m.b_U + (m.ln_final.b @ m.W_U if norm == "LN" else 0)
    want = diff - (b_fold[tok] - b_fold[bad])
    stack = c.decompose_resid(pos_slice=-1)
    attrs = c.logit_attrs(stack, tok, incorrect_tokens=bad, pos_slice=-1)
    assert attrs.shape == (stack.shape[0], 3)
    torch.testing.assert_close(attrs.sum(0), want, **TOL)
    whole = c.logit_attrs(c.accumulated_resid(pos_slice=-1)[-1:], tok, incorrect_tokens=bad, pos_slice=-1)
    torch.testing.assert_close(whole[0], want, **TOL)
    # per-position ids over the full stack; a single int id
    full = c.logit_attrs(c.decompose_resid(), x)
    lnorm = c.apply_ln_to_stack(c.decompose_resid())
    torch.testing.assert_close(full, (lnorm * m.W_U[:, x].permute(1, 2, 0)).sum(-1), **TOL)
    one = c.logit_attrs(stack, 4, pos_slice=-1)
    torch.testing.assert_close(one, c.apply_ln_to_stack(stack, pos_slice=-1) @ m.W_U[:, 4], **TOL)
    # head attributions with the heads' own stack
    heads = c.stack_head_results(pos_slice=-1)
    ha = c.logit_attrs(heads, tok, incorrect_tokens=bad, pos_slice=-1)
    torch.testing.assert_close(
        ha, (c.apply_ln_to_stack(heads, pos_slice=-1) * (m.W_U[:, tok] - m.W_U[:, bad]).T).sum(-1)
    )


@pytest.mark.parametrize(
    "pos_slice, index",
    [(-1, -1), (2, 2), ((1, 4), slice(1, 4)), (slice(0, 6, 2), slice(0, 6, 2)), ([0, 3], [0, 3])],
)
def test_pos_slice_forms_match_indexing(pos_slice, index):
    m = make("LN")
    _, c = m.run_with_cache(toks())
    for fn in (c.decompose_resid, c.accumulated_resid, c.get_full_resid_decomposition, c.stack_head_results):
        full, part = fn(apply_ln=True), fn(apply_ln=True, pos_slice=pos_slice)
        torch.testing.assert_close(part, full[:, :, index], **TOL)
    t = torch.tensor([0, 3])
    torch.testing.assert_close(c.decompose_resid(pos_slice=t), c.decompose_resid()[:, :, [0, 3]])


def test_cache_without_batch_dim_and_stack_activation():
    m = make("LN")
    x = toks(1)
    _, c = m.run_with_cache(x)
    _, c1 = m.run_with_cache(x, remove_batch_dim=True)
    torch.testing.assert_close(c1.decompose_resid(apply_ln=True), c.decompose_resid(apply_ln=True)[:, 0])
    torch.testing.assert_close(
        c1.stack_head_results(apply_ln=True), c.stack_head_results(apply_ln=True)[:, 0]
    )
    la1 = c1.logit_attrs(c1.decompose_resid(pos_slice=-1), 3, pos_slice=-1, has_batch_dim=False)
    la = c.logit_attrs(c.decompose_resid(pos_slice=-1), 3, pos_slice=-1)
    torch.testing.assert_close(la1, la[:, 0])
    st = c.stack_activation("pattern")
    torch.testing.assert_close(st, torch.stack([c["pattern", 0], c["pattern", 1]]), rtol=0, atol=0)
    assert c.stack_activation("resid_pre", layer=1).shape == (1, 1, 6, 16)
    assert c.stack_activation("scale", 2, "ln1").shape == (2, 1, 6, 1)


def test_attention_only_parallel_and_residual_multiplier_models():
    x = toks()
    for kw in (
        dict(d_mlp=None),
        dict(parallel_attn_mlp=True),
        dict(residual_multiplier=0.7, embed_scale=2.0),
    ):
        m = make("RMS", **kw)
        _, c = m.run_with_cache(x)
        n = m.cfg.n_layers
        for layer in range(n + 1):
            torch.testing.assert_close(c.decompose_resid(layer).sum(0), resid_in(c, m, layer), **TOL)
            torch.testing.assert_close(
                c.get_full_resid_decomposition(layer).sum(0), resid_in(c, m, layer), **TOL
            )
        if not m.cfg.attn_only:
            # the MLP's input: resid_mid (sequential), resid_pre (parallel: no attn_out of the layer itself)
            want = c["resid_pre", 1] if m.cfg.parallel_attn_mlp else c["resid_mid", 1]
            torch.testing.assert_close(c.decompose_resid(1, mlp_input=True).sum(0), want, **TOL)
            torch.testing.assert_close(c.get_full_resid_decomposition(1, mlp_input=True).sum(0), want, **TOL)
        heads = c.stack_head_results()
        H = m.cfg.n_heads
        mult = m.cfg.residual_multiplier or 1.0
        for ell in range(n):
            torch.testing.assert_close(
                heads[ell * H : (ell + 1) * H].sum(0) + mult * m.blocks[ell].attn.b_O,
                c["attn_out", ell],
                **TOL,
            )


@pytest.mark.parametrize("arch", ["neox", "llama"])
def test_converted_hugging_face_model(arch):
    transformers = pytest.importorskip("transformers")
    import pypattern as pp

    torch.manual_seed(0)
    if arch == "neox":
        cfg = transformers.GPTNeoXConfig(
            vocab_size=V,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=24,
            rotary_pct=0.5,
            max_position_embeddings=8,
            hidden_dropout=0.0,
            attention_dropout=0.0,
        )
        hf = transformers.GPTNeoXForCausalLM(cfg).eval()
    else:
        cfg = transformers.LlamaConfig(
            vocab_size=V,
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=8,
        )
        hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    m = pp.from_hf(hf)
    x = toks()
    logits, c = m.run_with_cache(x)
    with torch.no_grad():
        torch.testing.assert_close(logits, hf(x).logits, rtol=1e-4, atol=1e-4)
    n = m.cfg.n_layers
    for layer in range(n + 1):
        torch.testing.assert_close(
            c.get_full_resid_decomposition(layer).sum(0), resid_in(c, m, layer), rtol=1e-4, atol=1e-5
        )
    tok, bad = x[:, -1], (x[:, -1] + 1) % V
    b = getattr(m.ln_final, "b", None)
    b_fold = m.b_U + (0 if b is None else b @ m.W_U)
    r = torch.arange(3)
    want = logits[r, -1, tok] - logits[r, -1, bad] - (b_fold[tok] - b_fold[bad])
    for stack in (c.decompose_resid(pos_slice=-1), c.get_full_resid_decomposition(pos_slice=-1)):
        attrs = c.logit_attrs(stack, tok, incorrect_tokens=bad, pos_slice=-1)
        torch.testing.assert_close(attrs.sum(0), want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ bad input


def test_errors_name_the_argument():
    m = make("LN")
    x = toks()
    _, c = m.run_with_cache(x)
    stack = c.decompose_resid(pos_slice=-1)
    with pytest.raises(ValueError, match="layer=5"):
        c.decompose_resid(5)
    with pytest.raises(ValueError, match="layer=-2"):
        c.accumulated_resid(-2)
    with pytest.raises(ValueError, match="layer=3"):
        c.apply_ln_to_stack(stack, layer=3, pos_slice=-1)
    with pytest.raises(ValueError, match="residual_stack has shape"):
        c.apply_ln_to_stack(stack[..., :5], pos_slice=-1)
    with pytest.raises(ValueError, match="residual_stack has batch/position dims"):
        c.apply_ln_to_stack(stack)  # stack taken at one position, scale over all
    with pytest.raises(ValueError, match="tokens has shape"):
        c.logit_attrs(stack, x[:2, -1], pos_slice=-1)
    with pytest.raises(ValueError, match="incorrect_tokens"):
        c.logit_attrs(stack, x[:, -1], incorrect_tokens=x[:2, -1], pos_slice=-1)
    with pytest.raises(ValueError, match="tokens holds ids outside"):
        c.logit_attrs(stack, V, pos_slice=-1)
    with pytest.raises(TypeError, match="tokenizer"):
        c.logit_attrs(stack, " road", pos_slice=-1)
    with pytest.raises(ValueError, match="mode='both'"):
        c.decompose_resid(mode="both")
    with pytest.raises(ValueError, match="mlp_input=True with layer=2"):
        c.decompose_resid(2, mlp_input=True)
    with pytest.raises(ValueError, match="pos_slice="):
        c.decompose_resid(pos_slice=1.5)
    with pytest.raises(ValueError, match="layer=0 stacks no layer"):
        c.stack_activation("z", layer=0)
    # a cache without its model, and one without the scale apply_ln needs
    bare = ActivationCache(dict(c))
    with pytest.raises(ValueError, match="cache.model is None"):
        bare.decompose_resid()
    _, part = m.run_with_cache(x, names_filter=lambda n: "hook_scale" not in n)
    part.decompose_resid()  # fine without the norm scales
    with pytest.raises(KeyError, match="ln_final.hook_scale"):
        part.decompose_resid(apply_ln=True)
    _, noz = m.run_with_cache(x, names_filter=lambda n: not n.endswith("hook_z"))
    with pytest.raises(KeyError, match="hook_z"):
        noz.stack_head_results()
    with pytest.raises(ValueError, match="incl_mid"):
        make("LN", parallel_attn_mlp=True).run_with_cache(x)[1].accumulated_resid(incl_mid=True)
    sandwich = make("RMS", use_normalization_before_and_after=True).run_with_cache(x)[1]
    with pytest.raises(ValueError, match="use_normalization_before_and_after"):
        sandwich.stack_head_results()
    torch.testing.assert_close(sandwich.decompose_resid().sum(0), sandwich["resid_post", 1], **TOL)


def test_run_with_cache_sets_model_only_on_cache_objects():
    m = make("LN")
    _, c = m.run_with_cache(toks())
    assert c.model is m
    _, plain = m.run_with_cache(toks(), return_cache_object=False)
    assert type(plain) is dict
    assert ActivationCache().model is None
