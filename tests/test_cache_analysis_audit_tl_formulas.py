"""The activation cache's TransformerLens surface against TransformerLens' formulas: ``run_with_cache(pos_slice=...)``
on every hook point (the per-head q_norm / k_norm hooks too), integer scalars as ``pos_slice`` (numpy integers, 0-d
tensors), TransformerLens 4.x's ``project_output_onto`` and ``mlp_input`` of the neuron stacks, its token
broadcasting in ``logit_attrs``, the final norm of ``accumulated_resid(apply_ln=True)`` equal to the model's own,
and (where TransformerLens 4.x is installed) each analysis method equal to TransformerLens' on the same weights."""

import warnings

import numpy as np
import pytest
import torch

from pypattern.models.transformer import Transformer, TransformerConfig

pytestmark = pytest.mark.usefixtures("one_thread")

V = 21
TOL = dict(rtol=1e-10, atol=1e-10)
QUERY_AXIS = ("hook_pattern", "hook_attn_scores")


def make(dtype=torch.float64, **kw):
    cfg = dict(n_layers=2, d_model=16, n_heads=4, d_mlp=20, d_vocab=V, n_ctx=10, seed=0, dtype=dtype)
    cfg.update(kw)
    m = Transformer(TransformerConfig(**cfg))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # norm weights and biases away from 1 / 0
        for p in m.parameters():
            if p.dim() == 1:
                p.add_((0.3 * torch.randn(p.shape, generator=gen, dtype=torch.float64)).to(p.dtype))
    return m


def toks(batch=3, pos=6, seed=2):
    return torch.randint(0, V, (batch, pos), generator=torch.Generator().manual_seed(seed))


CONFIGS = {
    "ln": dict(),
    "rms_rotary_gqa_gated": dict(
        normalization_type="RMS",
        positional_embedding_type="rotary",
        n_key_value_heads=2,
        gated_mlp=True,
        attn_bias=False,
        mlp_bias=False,
    ),
    "no_norm": dict(normalization_type=None),
    "parallel": dict(parallel_attn_mlp=True),
    "parallel_shared_norm": dict(parallel_attn_mlp=True, parallel_shared_norm=True),
    "scaled_rms": dict(
        normalization_type="RMS", embed_scale=2.0, residual_multiplier=0.5, norm_weight_offset=1.0
    ),
}


def _query_or_position(name, t, idx):
    """``t`` (batched) at the positions ``idx``: the query axis of patterns and scores, else axis 1."""
    return t[:, :, idx] if name.endswith(QUERY_AXIS) else t[:, idx]


@pytest.mark.parametrize("pos_slice,idx", [([-1], [-1]), ((1, 4), slice(1, 4)), (2, [2]), ([0, 3], [0, 3])])
def test_run_with_cache_pos_slice_takes_positions_of_every_hook_point(pos_slice, idx):
    """The per-head norms' hooks (``attn.q_norm.hook_scale`` (batch, pos, heads, 1), ``hook_normalized``) have their
    positions on axis 1 as every other activation but patterns and scores; they were sliced on the heads axis."""
    m = make(normalization_type="RMS", positional_embedding_type="rotary", qk_norm=True, n_key_value_heads=2)
    x = toks()
    _, full = m.run_with_cache(x)
    assert any(".q_norm." in k for k in full) and any(".k_norm." in k for k in full)
    _, cut = m.run_with_cache(x, pos_slice=pos_slice)
    assert set(cut) == set(full)
    for k, v in full.items():
        assert torch.equal(cut[k], _query_or_position(k, v, idx)), k
    _, one = m.run_with_cache(x[:1], pos_slice=pos_slice, remove_batch_dim=True)
    _, ref = m.run_with_cache(x[:1])
    for k, v in ref.items():
        assert torch.equal(one[k], _query_or_position(k, v, idx)[0]), k


@pytest.mark.parametrize("scalar", [np.int64(-2), np.int32(1), torch.tensor(3), np.array(0)])
def test_integer_scalars_index_like_an_int(scalar):
    """TransformerLens' ``Slice`` takes numpy integers and 0-d integer tensors as ints (an argmax, an index read
    from an array); they were refused."""
    m = make()
    x = toks()
    _, c = m.run_with_cache(x)
    i = int(scalar)
    assert torch.equal(c.decompose_resid(pos_slice=scalar), c.decompose_resid()[:, :, i])
    assert torch.equal(
        c.accumulated_resid(pos_slice=scalar, apply_ln=True), c.accumulated_resid(pos_slice=i, apply_ln=True)
    )
    st = c.decompose_resid(pos_slice=i)
    assert torch.equal(c.logit_attrs(st, 4, pos_slice=scalar), c.logit_attrs(st, 4, pos_slice=i))
    _, cut = m.run_with_cache(x, pos_slice=scalar)  # as an int in run_with_cache: keeps the position axis
    assert torch.equal(cut["blocks.1.hook_resid_post"], c["blocks.1.hook_resid_post"][:, [i]])
    assert torch.equal(cut["blocks.0.attn.hook_z"], c["blocks.0.attn.hook_z"][:, [i]])
    for bad in (torch.tensor(1.0), torch.tensor(True), np.float64(1.0)):
        with pytest.raises(ValueError, match="pos_slice"):
            c.decompose_resid(pos_slice=bad)


def _stream(m, c, layer, mlp_input):
    n = m.cfg.n_layers
    if layer == n:
        return c[f"blocks.{n - 1}.hook_resid_post"]
    if mlp_input and not m.cfg.parallel_attn_mlp:
        return c[f"blocks.{layer}.hook_resid_mid"]
    return c[f"blocks.{layer}.hook_resid_pre"]


def _norm_out_minus_bias(m, layer, mlp_input, x):
    """What the norm read at the input of ``layer`` makes of ``x``, less its bias (the module's own forward)."""
    norm = (
        m.ln_final if layer == m.cfg.n_layers else (m.blocks[layer].ln2 if mlp_input else m.blocks[layer].ln1)
    )
    if isinstance(norm, torch.nn.Identity):
        return x
    b = getattr(norm, "b", None)
    return norm(x) - (0 if b is None else b)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_stack_neuron_results_mlp_input_and_project_output_onto(name):
    """TransformerLens 4.x's ``mlp_input`` (remainder up to the MLP's input, ``ln2``'s scale) and
    ``project_output_onto`` (each component's projection, after the norm) on ``stack_neuron_results``,
    ``get_neuron_results`` and ``get_full_resid_decomposition``: against the unprojected stacks times the
    projection, the cached streams and the model's own norms."""
    m = make(**CONFIGS[name])
    _, c = m.run_with_cache(toks())
    n = m.cfg.n_layers
    gen = torch.Generator().manual_seed(5)
    P = torch.randn(16, 3, generator=gen, dtype=torch.float64)
    v = torch.randn(16, generator=gen, dtype=torch.float64)
    for layer in range(n + 1):
        for mi in (False, True) if layer < n else (False,):
            st = c.stack_neuron_results(layer, mlp_input=mi, incl_remainder=True)
            torch.testing.assert_close(st.sum(0), _stream(m, c, layer, mi), **TOL)
            st = c.stack_neuron_results(layer, mlp_input=mi, incl_remainder=True, apply_ln=True)
            torch.testing.assert_close(
                st.sum(0), _norm_out_minus_bias(m, layer, mi, _stream(m, c, layer, mi)), **TOL
            )
            for ln in (False, True):
                for ps in (None, -1, [0, 4]):
                    kw = dict(mlp_input=mi, apply_ln=ln, pos_slice=ps)
                    ref = c.stack_neuron_results(layer, incl_remainder=True, **kw)
                    got = c.stack_neuron_results(layer, incl_remainder=True, project_output_onto=P, **kw)
                    torch.testing.assert_close(got, ref @ P, **TOL)
                    ref = c.stack_neuron_results(layer, neuron_slice=[1, 7], **kw)
                    got = c.stack_neuron_results(layer, neuron_slice=[1, 7], project_output_onto=v, **kw)
                    torch.testing.assert_close(got, ref @ v, **TOL)
                    for en in (True, False):
                        ref = c.get_full_resid_decomposition(layer, expand_neurons=en, **kw)
                        got = c.get_full_resid_decomposition(
                            layer, expand_neurons=en, project_output_onto=P, **kw
                        )
                        torch.testing.assert_close(got, ref @ P, **TOL)
        if layer < n:
            ref = c.get_neuron_results(layer, pos_slice=-1)
            torch.testing.assert_close(
                c.get_neuron_results(layer, pos_slice=-1, project_output_onto=v), ref @ v
            )
    with pytest.raises(ValueError, match="project_output_onto has shape"):
        c.stack_neuron_results(n, project_output_onto=torch.randn(15))
    with pytest.raises(TypeError, match="project_output_onto is a list"):
        c.get_full_resid_decomposition(project_output_onto=[1.0] * 16)
    with pytest.raises(ValueError, match="mlp_input=True"):
        c.stack_neuron_results(n, mlp_input=True)


def test_logit_attrs_broadcasts_tokens_as_transformer_lens():
    """TransformerLens 4.x on a (batch, pos) stack: (batch,) tokens are one id per example at every position,
    (pos,) and (1, pos) one id per position; each equal to the same ids spelled out as (batch, pos)."""
    m = make()
    x = toks(batch=3, pos=5)
    _, c = m.run_with_cache(x)
    st = c.decompose_resid()
    ex, pos = x[:, 0], x[0, :]
    full = c.logit_attrs(st, x)
    assert full.shape == (st.shape[0], 3, 5)
    torch.testing.assert_close(c.logit_attrs(st, ex), c.logit_attrs(st, ex[:, None].expand(3, 5)), **TOL)
    torch.testing.assert_close(c.logit_attrs(st, pos), c.logit_attrs(st, pos.expand(3, 5)), **TOL)
    torch.testing.assert_close(c.logit_attrs(st, pos[None]), c.logit_attrs(st, pos.expand(3, 5)), **TOL)
    bad = x[:, 1]
    torch.testing.assert_close(
        c.logit_attrs(st, ex, incorrect_tokens=bad),
        c.logit_attrs(st, ex[:, None].expand(3, 5), incorrect_tokens=bad[:, None].expand(3, 5)),
        **TOL,
    )
    # batch = pos: (batch,) is per example, as TransformerLens decides
    _, sq = m.run_with_cache(toks(batch=4, pos=4))
    s4 = sq.decompose_resid()
    ids = torch.tensor([1, 2, 3, 4])
    torch.testing.assert_close(sq.logit_attrs(s4, ids), sq.logit_attrs(s4, ids[:, None].expand(4, 4)), **TOL)
    with pytest.raises(ValueError, match="tokens has shape"):
        c.logit_attrs(st, x[:2, 0])
    with pytest.raises(ValueError, match="tokens has shape"):
        c.logit_attrs(st, x[:2])


NORMS = [
    dict(normalization_type="LN"),
    dict(normalization_type="LNPre"),
    dict(normalization_type="RMS"),
    dict(normalization_type="RMSPre"),
    dict(normalization_type="RMS", norm_weight_offset=1.0),
    dict(normalization_type="LN", norm_weight_offset=1.0),
    dict(normalization_type="LN", norm_dtype=torch.float32),
    dict(normalization_type="RMS", norm_dtype=torch.float32),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("norm", NORMS, ids=lambda d: "-".join(str(v) for v in d.values()))
def test_accumulated_resid_apply_ln_is_the_models_own_final_norm(norm, dtype):
    """The logit lens' streams through ``ln_final`` (``apply_ln=True`` at the unembedding) equal the model's own
    ``ln_final`` of each stream exactly: its arithmetic (torch's fused layer_norm with the weight and bias, Hugging
    Face's ``rsqrt`` form, the compute dtype, the weight before or after the cast) rather than a formula equal to
    float rounding (which differed by 2e-7 in float32 and one bfloat16 step)."""
    m = make(dtype=dtype, **norm)
    _, c = m.run_with_cache(toks())
    with torch.no_grad():
        got = c.accumulated_resid(apply_ln=True, incl_mid=True)
        names = ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid", "blocks.1.hook_resid_pre"]
        names += ["blocks.1.hook_resid_mid", "blocks.1.hook_resid_post"]
        ref = torch.stack([m.ln_final(c[k]) for k in names])
    assert torch.equal(got, ref)
    if dtype == torch.float64:  # the last stream through the unembedding is the model's logits
        with torch.no_grad():
            logits = m(toks())
            lens = c.accumulated_resid(apply_ln=True)[-1] @ m.W_U + m.b_U
        torch.testing.assert_close(lens, logits, **TOL)


# ----------------------------------------------------------------------------------------- against TransformerLens


def _bridge(**kw):
    bridge_mod = pytest.importorskip("transformer_lens.model_bridge")
    pytest.importorskip("transformer_lens.model_bridge.sources.native")
    from transformer_lens.config import TransformerBridgeConfig

    cfg = TransformerBridgeConfig(
        n_layers=2, d_model=24, n_ctx=20, d_head=6, n_heads=4, d_vocab=37, seed=0, **kw
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        br = bridge_mod.TransformerBridge.boot_native(cfg, dtype=torch.float64).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in br.original_model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
    return br


TL_CONFIGS = {
    "ln": dict(act_fn="gelu"),
    "rms_rotary_gqa": dict(
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=4,
        gated_mlp=True,
        act_fn="silu",
        n_key_value_heads=2,
        final_rms=True,
    ),
    "attn_only": dict(attn_only=True),
}


@pytest.mark.parametrize("name", list(TL_CONFIGS))
def test_analysis_methods_equal_transformer_lens_on_the_same_weights(name):
    """Each analysis method on the converted model equals TransformerLens 4.3's on the bridge it came from, with
    the arguments TransformerLens users pass (layer=-1, incl_mid, mlp_input, pos_slice as int / tuple / list,
    return_labels, neuron_slice, project_output_onto, token broadcasting); values and labels."""
    import pypattern

    kw = TL_CONFIGS[name]
    br = _bridge(**kw)
    ours = pypattern.from_hf(br)
    attn_only = bool(kw.get("attn_only"))
    x = torch.randint(0, 37, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, ct = br.run_with_cache(x)
        _, co = ours.run_with_cache(x)

    def same(a, b, tol=1e-9):
        if isinstance(a, tuple):
            assert list(a[1]) == list(b[1])
            a, b = a[0], b[0]
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, rtol=tol, atol=tol)

    mid = not attn_only
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(24, generator=gen, dtype=torch.float64)
    P = torch.randn(24, 2, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        for a in (
            dict(return_labels=True),
            dict(layer=-1, incl_mid=mid, return_labels=True),
            dict(layer=1, mlp_input=mid, return_labels=True),
            dict(
                apply_ln=True, pos_slice=-1, return_labels=True
            ),  # ln_final with its weight: as TransformerLens
        ):
            same(ct.accumulated_resid(**a), co.accumulated_resid(**a))
        for a in (
            dict(return_labels=True),
            dict(layer=1, mlp_input=mid, return_labels=True),
            dict(mode="attn", pos_slice=[0, 2], return_labels=True),
            dict(layer=0, incl_embeds=True, pos_slice=(1, 5)),
        ):
            same(ct.decompose_resid(**a), co.decompose_resid(**a))
        for a in (dict(return_labels=True, incl_remainder=True), dict(layer=1, pos_slice=(1, 4))):
            same(ct.stack_head_results(**a), co.stack_head_results(**a))
        if not attn_only:
            for a in (
                dict(layer=2, return_labels=True, incl_remainder=True),
                dict(layer=1, neuron_slice=3, pos_slice=-1, return_labels=True),
                dict(layer=1, mlp_input=True, incl_remainder=True),
                dict(layer=-1, project_output_onto=v, return_labels=True),
                dict(layer=2, project_output_onto=P, neuron_slice=(2, 9), incl_remainder=True),
            ):
                same(ct.stack_neuron_results(**a), co.stack_neuron_results(**a))
            same(ct.get_neuron_results(1, pos_slice=[1, 2]), co.get_neuron_results(1, pos_slice=[1, 2]))
        for a in (
            dict(return_labels=True),
            dict(layer=1, mlp_input=mid, return_labels=True),
            dict(expand_neurons=False, pos_slice=-1, return_labels=True),
            dict(project_output_onto=P, return_labels=True),
        ):
            same(ct.get_full_resid_decomposition(**a), co.get_full_resid_decomposition(**a))
        same(ct.stack_activation("pattern"), co.stack_activation("pattern"))
        same(ct.stack_activation("resid_pre", layer=1), co.stack_activation("resid_pre", layer=1))
        if kw.get("normalization_type") == "RMS":
            # TransformerLens divides by the cached scale and leaves the weight to fold_ln; pypattern applies it.
            # For RMSNorm (no centring) ours on a stack equals TransformerLens' on the stack times the weight. The
            # norms compute in float32 (as Hugging Face's): the cached scales agree to float32 rounding.
            st = co.decompose_resid()
            w = ours.ln_final.w
            for tk in (x[:, 0], x[0], x[:1], x):
                same(ct.logit_attrs(st * w, tk), co.logit_attrs(st, tk), tol=1e-6)
            w2 = ours.blocks[1].ln2.w
            same(
                ct.apply_ln_to_stack(st * w2, 1, mlp_input=True), co.apply_ln_to_stack(st, 1, True), tol=1e-6
            )
