"""pypattern's Transformer against a naive float64 forward written head by head from its weights (logits, every hook
value, hook edits), and the fixed-weights block (oneDNN products) against plain runs: shapes, strided inputs,
gradients, nested blocks, weights given new data inside a block, copies made inside a block."""

from __future__ import annotations

import copy
import math
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pypattern.models import Transformer, TransformerConfig
from pypattern.models import packed as pk
from pypattern.models.transformer import alibi_slopes

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def packed_on(monkeypatch):
    """The packed path chosen for this process, every weight packed from its first use."""
    monkeypatch.setattr(pk, "_CHOICE", True)
    monkeypatch.setattr(pk.PackedWeights, "PACK_AFTER_ROWS", 0)


# ----- the naive forward --------------------------------------------------------------------------------------


def _norm(x, mod, kind, eps):
    if kind is None:
        return x, None
    if kind in ("LN", "LNPre"):
        c = x - x.mean(-1, keepdim=True)
        s = (c.pow(2).mean(-1, keepdim=True) + eps).sqrt()
        y = c / s
    else:
        s = (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
        y = x / s
    if kind == "LN":
        y = y * mod.w.detach().double() + mod.b.detach().double()
    if kind == "RMS":
        y = y * mod.w.detach().double()
    return y, s


def _act(x, name):
    if name == "gelu":
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    if name == "silu":
        return x / (1 + torch.exp(-x))
    if name == "gelu_new":
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    raise NotImplementedError(name)


def _rotate(x, cfg, layer):
    """Each rotated pair of every head turned by its angle, one pair at a time."""
    r, base = cfg.rotary_dim, cfg.rope_base(layer)
    pos = torch.arange(x.shape[1], dtype=torch.float64)
    out = x.clone()
    for i in range(r // 2):
        theta = pos / base ** (2 * i / r)
        a, b = (2 * i, 2 * i + 1) if cfg.rotary_adjacent_pairs else (i, i + r // 2)
        c, s = theta.cos()[None, :, None], theta.sin()[None, :, None]
        out[..., a] = x[..., a] * c - x[..., b] * s
        out[..., b] = x[..., b] * c + x[..., a] * s
    return out


def naive(model, tokens, edits=None):
    """Logits and every hook value of ``model`` on ``tokens`` in float64, head by head and query by query; ``edits``
    maps hook names to functions applied to the value there (a hook that replaces it)."""
    cfg, D = model.cfg, (lambda t: t.detach().double())
    seen, edits = {}, edits or {}

    def hp(name, v):
        v = edits[name](v) if name in edits else v
        seen[name] = v
        return v

    B, T = tokens.shape
    kind = cfg.normalization_type
    H, G = cfg.n_heads, cfg.n_heads // cfg.n_key_value_heads
    x = hp("hook_embed", D(model.embed.W_E)[tokens])
    if cfg.positional_embedding_type == "standard":
        x = x + hp("hook_pos_embed", D(model.pos_embed.W_pos)[:T][None].expand(B, T, -1))
    for layer, blk in enumerate(model.blocks):
        at, p = blk.attn, f"blocks.{layer}."
        x = hp(p + "hook_resid_pre", x)
        h1, s1 = _norm(x, blk.ln1, kind, cfg.ln_eps)
        if kind:
            hp(p + "ln1.hook_scale", s1)
            h1 = hp(p + "ln1.hook_normalized", h1)

        def bias(b, h):
            return 0 if b is None else D(b[h])

        q = torch.stack([h1 @ D(at.W_Q[h]) + bias(at.b_Q, h) for h in range(H)], 2)
        k = torch.stack([h1 @ D(at.W_K[h]) + bias(at.b_K, h) for h in range(cfg.n_key_value_heads)], 2)
        v = torch.stack([h1 @ D(at.W_V[h]) + bias(at.b_V, h) for h in range(cfg.n_key_value_heads)], 2)
        q, k, v = hp(p + "attn.hook_q", q), hp(p + "attn.hook_k", k), hp(p + "attn.hook_v", v)
        if cfg.rotates(layer):
            q = hp(p + "attn.hook_rot_q", _rotate(q, cfg, layer))
            k = hp(p + "attn.hook_rot_k", _rotate(k, cfg, layer))
        scores = torch.full((B, H, T, T), float("-inf"), dtype=torch.float64)
        window = cfg.window(layer)
        for h in range(H):
            for i in range(T):
                for j in range(i + 1):
                    if window is not None and i - j >= window:
                        continue
                    s = (q[:, i, h] * k[:, j, h // G]).sum(-1) / cfg.attn_scale
                    if cfg.positional_embedding_type == "alibi":
                        s = s + float(alibi_slopes(H)[h]) * j
                    if cfg.attn_scores_soft_cap:
                        s = cfg.attn_scores_soft_cap * torch.tanh(s / cfg.attn_scores_soft_cap)
                    scores[:, h, i, j] = s
        scores = hp(p + "attn.hook_attn_scores", scores)
        pattern = hp(p + "attn.hook_pattern", torch.nan_to_num(torch.softmax(scores, -1), nan=0.0))
        z = hp(p + "attn.hook_z", torch.stack([pattern[:, h] @ v[:, :, h // G] for h in range(H)], 2))
        attn_out = sum(z[:, :, h] @ D(at.W_O[h]) for h in range(H))
        attn_out = hp(p + "hook_attn_out", attn_out + (0 if at.b_O is None else D(at.b_O)))
        if cfg.attn_only:
            x = hp(p + "hook_resid_post", x + attn_out)
            continue
        mlp = blk.mlp

        def lin(h, W, b):
            return h @ D(W) + (0 if b is None else D(b))

        def mlp_write(inp, p=p, mlp=mlp, blk=blk):
            h2, s2 = _norm(inp, blk.ln2, kind, cfg.ln_eps)
            if kind:
                hp(p + "ln2.hook_scale", s2)
                h2 = hp(p + "ln2.hook_normalized", h2)
            if cfg.gated_mlp:
                pre = hp(p + "mlp.hook_pre", lin(h2, mlp.W_gate, mlp.b_gate))
                post = _act(pre, cfg.act_fn) * hp(p + "mlp.hook_pre_linear", lin(h2, mlp.W_in, mlp.b_in))
            else:
                post = _act(hp(p + "mlp.hook_pre", lin(h2, mlp.W_in, mlp.b_in)), cfg.act_fn)
            post = hp(p + "mlp.hook_post", post)
            return hp(p + "hook_mlp_out", lin(post, mlp.W_out, mlp.b_out))

        if cfg.parallel_attn_mlp:
            x = x + (attn_out + mlp_write(x))
        else:
            x = hp(p + "hook_resid_mid", x + attn_out)
            x = x + mlp_write(x)
        x = hp(p + "hook_resid_post", x)
    hf, sf = _norm(x, model.ln_final, kind, cfg.ln_eps)
    if kind:
        hp("ln_final.hook_scale", sf)
        hf = hp("ln_final.hook_normalized", hf)
    logits = hf @ D(model.unembed.W_U)
    return (logits if model.unembed.b_U is None else logits + D(model.unembed.b_U)), seen


ARCHS = {
    "gpt2": {},
    "llama_gqa": dict(
        normalization_type="RMS",
        positional_embedding_type="rotary",
        n_key_value_heads=2,
        gated_mlp=True,
        act_fn="silu",
        attn_bias=False,
        mlp_bias=False,
        unembed_bias=False,
    ),
    "neox_partial_parallel": dict(
        normalization_type="LNPre", positional_embedding_type="rotary", rotary_dim=6, parallel_attn_mlp=True
    ),
    "gptj_pairs_mqa_tied": dict(
        normalization_type="RMSPre",
        positional_embedding_type="rotary",
        rotary_dim=4,
        rotary_adjacent_pairs=True,
        n_key_value_heads=1,
        tie_word_embeddings=True,
        act_fn="gelu_new",
    ),
    "alibi_window_cap_no_norm": dict(
        normalization_type=None,
        positional_embedding_type="alibi",
        n_heads=6,
        d_head=8,
        sliding_window=3,
        attn_scores_soft_cap=2.0,
    ),
    "attn_only_per_layer_window_base": dict(
        normalization_type="RMS",
        positional_embedding_type="rotary",
        sliding_window=(2, None),
        rotary_base=(100.0, 10000.0),
        d_mlp=None,
    ),
}


def _model(arch: str, seed: int = 0, dtype=torch.float64) -> Transformer:
    kw = dict(n_layers=2, d_model=24, n_heads=4, d_mlp=40, d_vocab=30, n_ctx=12, seed=seed, dtype=dtype)
    model = Transformer(TransformerConfig(**{**kw, **ARCHS[arch]}))
    with torch.no_grad():  # biases and norm weights away from their initial zeros and ones
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if not name.rsplit(".", 1)[-1].startswith("W_"):
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


@pytest.mark.parametrize("arch", list(ARCHS))
def test_logits_and_every_hook_value_equal_the_naive_float64_forward(arch):
    model = _model(arch)
    tokens = torch.randint(0, 30, (3, 9), generator=torch.Generator().manual_seed(1))
    logits, cache = model.run_with_cache(tokens)
    ref, seen = naive(model, tokens)
    torch.testing.assert_close(logits, ref, rtol=0, atol=1e-10)
    assert set(seen) == set(cache.keys()), set(seen) ^ set(cache.keys())
    for name, want in seen.items():
        got = cache[name]
        assert got.shape == want.shape, name
        # masked scores are -inf, exactly where the naive forward leaves them
        assert torch.equal(torch.isfinite(got), torch.isfinite(want)), name
        torch.testing.assert_close(got[torch.isfinite(want)], want[torch.isfinite(want)], rtol=0, atol=1e-10)
    if ARCHS[arch].get("parallel_attn_mlp"):
        assert not any("hook_resid_mid" in n for n in cache.keys())


@pytest.mark.parametrize("arch", ["gpt2", "llama_gqa", "neox_partial_parallel", "alibi_window_cap_no_norm"])
def test_every_hook_edit_propagates_as_in_the_naive_forward(arch):
    model = _model(arch, seed=2)
    tokens = torch.randint(0, 30, (2, 7), generator=torch.Generator().manual_seed(3))
    _, cache = model.run_with_cache(tokens)
    for name in cache.keys():
        if name.endswith("hook_scale"):  # read only by the naive forward
            continue
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        delta = 0.3 * torch.randn(cache[name].shape, generator=g, dtype=torch.float64)
        if name.endswith(("hook_pattern", "hook_attn_scores")):
            delta = delta.tril()  # masked entries stay masked
        ref, _ = naive(model, tokens, {name: lambda t, d=delta: t + d})
        for in_place in (False, True):

            def hook(t, hook, d=delta, in_place=in_place):
                return t.add_(d) if in_place else t + d

            with torch.no_grad():  # in-place edits of activations computed from parameters
                out = model.run_with_hooks(tokens, fwd_hooks=[(name, hook)])
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-10, msg=f"{name} in_place={in_place}")


def test_in_place_edit_of_hook_pos_embed_leaves_w_pos_and_cached_values_alone():
    model = Transformer(TransformerConfig(n_layers=1, d_model=16, n_heads=2, d_vocab=10, n_ctx=8, seed=0))
    w_pos = model.pos_embed.W_pos.detach().clone()
    tokens = torch.randint(0, 10, (1, 5), generator=torch.Generator().manual_seed(0))
    clean = model(tokens).detach()
    with torch.no_grad():
        edited = model.run_with_hooks(tokens, fwd_hooks=[("hook_pos_embed", lambda t, hook: t.mul_(0))])
    assert torch.equal(model.pos_embed.W_pos, w_pos)  # the parameter is not written through the hook
    no_pos = model.unembed(model.ln_final(model.blocks[0](model.embed(tokens))))
    torch.testing.assert_close(edited, no_pos)
    torch.testing.assert_close(model(tokens), clean, rtol=0, atol=0)
    # a batch of several rows: the edit of one row reaches that row only (the expanded view would refuse it)
    tokens2 = tokens.repeat(3, 1)

    def zero_row(t, hook):
        t[1] = 0

    with torch.no_grad():
        out = model.run_with_hooks(tokens2, fwd_hooks=[("hook_pos_embed", zero_row)])
    torch.testing.assert_close(out[0], clean[0])
    torch.testing.assert_close(out[1], no_pos[0])
    # the cached positions are the values at the run, not a view of W_pos
    _, cache = model.run_with_cache(tokens2)
    before = cache["hook_pos_embed"].clone()
    with torch.no_grad():
        model.pos_embed.W_pos.add_(1.0)
    assert torch.equal(cache["hook_pos_embed"], before)


def test_names_filter_forms_select_the_same_hook_points():
    model = _model("llama_gqa")
    tokens = torch.randint(0, 30, (2, 5), generator=torch.Generator().manual_seed(0))
    _, one = model.run_with_cache(tokens, names_filter="blocks.1.attn.hook_z")
    _, listed = model.run_with_cache(tokens, names_filter=["blocks.1.attn.hook_z", "hook_embed"])
    _, by_fn = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("attn.hook_z"))
    assert list(one.keys()) == ["blocks.1.attn.hook_z"]
    assert set(listed.keys()) == {"blocks.1.attn.hook_z", "hook_embed"}
    assert set(by_fn.keys()) == {"blocks.0.attn.hook_z", "blocks.1.attn.hook_z"}
    assert torch.equal(one["blocks.1.attn.hook_z"], by_fn["blocks.1.attn.hook_z"])
    with pytest.raises(KeyError, match="hook_zz"):
        model.run_with_cache(tokens, names_filter=["blocks.1.attn.hook_zz"])


# ----- the fixed-weights block ----------------------------------------------------------------------------------


def _big(seed: int = 0, **kw) -> Transformer:
    cfg = dict(n_layers=2, d_model=128, n_heads=4, d_mlp=512, d_vocab=100, n_ctx=64, seed=seed)
    return Transformer(TransformerConfig(**{**cfg, **kw}))


def _strided(t, hook):
    big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    big[..., ::2] = t
    return big[..., ::2]


def _column_major(t, hook):
    return t.transpose(0, 1).contiguous().transpose(0, 1)


@pytest.mark.parametrize("shape", [(0, 5), (1, 1), (1, 64), (3, 17), (8, 64)])
def test_fixed_weights_outputs_equal_plain_ones_for_shapes_and_strided_inputs(packed_on, shape):
    model = _big(
        gated_mlp=True, normalization_type="RMS", positional_embedding_type="rotary", n_key_value_heads=2
    )
    tokens = torch.randint(0, 100, shape, generator=torch.Generator().manual_seed(0))
    for hooks in ([], [("blocks.0.mlp.hook_post", _strided), ("blocks.1.attn.hook_z", _column_major)]):
        with torch.no_grad():
            ref = model.run_with_hooks(tokens, fwd_hooks=hooks)
            for bound in (0, None):
                with model.fixed_weights(max_pack_bytes=bound):
                    outs = [model.run_with_hooks(tokens, fwd_hooks=hooks) for _ in range(2)]
                for out in outs:
                    assert out.shape == ref.shape
                    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("frozen", [True, False])
def test_fixed_weights_gradients_into_inputs_and_weights_equal_plain_ones(packed_on, frozen):
    model = _big(seed=1, positional_embedding_type="rotary", n_key_value_heads=2, gated_mlp=True)
    tokens = torch.randint(0, 100, (4, 64), generator=torch.Generator().manual_seed(1))

    def run(block: bool, nested: bool):
        m = copy.deepcopy(model)
        for p in m.parameters():
            p.requires_grad_(not frozen)
        leaf = {}

        def take(x, hook):
            leaf["x"] = x.detach().requires_grad_(True)
            return leaf["x"]

        def loss():
            return m.run_with_hooks(tokens, return_type="loss", fwd_hooks=[("blocks.0.hook_resid_pre", take)])

        if block:
            with m.fixed_weights(max_pack_bytes=None):
                loss()
                if nested:
                    with m.fixed_weights(max_pack_bytes=0):
                        value = loss()
                else:
                    value = loss()
                value.backward()
        else:
            value = loss()
            value.backward()
        grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
        return value.detach(), leaf["x"].grad, grads

    ref_loss, ref_gx, ref_gw = run(False, False)
    assert len(ref_gw) == (0 if frozen else len(list(model.parameters())) - 1)  # W_E: cut off by the hook
    for nested in (False, True):
        value, gx, gw = run(True, nested)
        torch.testing.assert_close(value, ref_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gx, ref_gx, rtol=1e-4, atol=1e-7)
        assert gw.keys() == ref_gw.keys()
        for n in gw:
            torch.testing.assert_close(gw[n], ref_gw[n], rtol=1e-4, atol=1e-7, msg=n)


def test_weights_given_new_data_by_a_cast_inside_the_block_are_not_read_stale(packed_on):
    # ``.half()`` / ``.float()`` / ``.double()`` keep each parameter (and its version counter) and give it new data
    model = _big(seed=2)
    for p in model.parameters():
        p.requires_grad_(False)
    tokens = torch.randint(0, 100, (8, 64), generator=torch.Generator().manual_seed(2))
    with model.fixed_weights(max_pack_bytes=None):
        model(tokens)
        model.half()
        model.float()  # the weights rounded to 16 bits: other values
        torch.testing.assert_close(model(tokens), copy.deepcopy(model)(tokens), rtol=1e-5, atol=1e-5)
        model.double()  # float64 products inside the block
        out64 = model(tokens)
        assert out64.dtype == torch.float64
        torch.testing.assert_close(out64, naive(model, tokens)[0], rtol=0, atol=1e-10)
        model.float()
        q = model.blocks[0].attn.W_Q
        q.data = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)) * 0.1
        torch.testing.assert_close(model(tokens), copy.deepcopy(model)(tokens), rtol=1e-5, atol=1e-5)


def test_a_pack_is_not_served_for_other_data_at_the_packed_address(packed_on):
    g = torch.Generator().manual_seed(0)
    W = nn.Parameter(torch.randn(256, 256, generator=g), requires_grad=False)
    x = torch.randn(512, 256, generator=g)
    packs = pk.PackedWeights(None)
    with torch.no_grad():
        packs.affine(x, W, None)  # packed
        assert len(packs._packs) == 1
        other = W.detach()  # the packed address, with W's version counter
        W.data = torch.zeros(256, 256)  # W gets new data (its version counter kept)
        other.data.copy_(torch.randn(256, 256, generator=g))  # other values at the packed address
        out = packs.affine(x, other, None)
    torch.testing.assert_close(out, x @ other, rtol=1e-5, atol=1e-4)
    assert packs._bytes == sum(e[3] for e in packs._packs.values())


def test_a_copy_made_inside_the_block_is_a_model_outside_any_block(packed_on):
    model = _big(seed=3, n_layers=1)
    tokens = torch.randint(0, 100, (4, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), model.fixed_weights(max_pack_bytes=None):
        model(tokens)
        twin = copy.deepcopy(model)
    assert all("_layouts" not in blk.attn.__dict__ for blk in twin.blocks)
    with torch.no_grad():
        twin.blocks[0].attn.W_Q.mul_(2.0)
        fresh = Transformer(twin.cfg)
        fresh.load_state_dict(twin.state_dict())
        torch.testing.assert_close(twin(tokens), fresh(tokens), rtol=0, atol=0)


def test_state_dict_into_a_fresh_model_and_casts_round_trip():
    model = _model("llama_gqa", dtype=torch.float32)
    tokens = torch.randint(0, 30, (2, 9), generator=torch.Generator().manual_seed(4))
    fresh = Transformer(TransformerConfig(**{**model.cfg.to_dict(), "seed": 123}))
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(tokens), model(tokens), rtol=0, atol=0)
    ref, _ = naive(model, tokens)
    twin = copy.deepcopy(model).double()
    assert twin.cfg.dtype == torch.float64 and model.cfg.dtype == torch.float32
    torch.testing.assert_close(twin(tokens), ref, rtol=0, atol=1e-10)
    twin.float()
    torch.testing.assert_close(twin(tokens), model(tokens), rtol=0, atol=0)
    for dt, tol in ((torch.float16, 5e-3), (torch.bfloat16, 4e-2)):
        low = copy.deepcopy(model).to(dt)
        assert low.cfg.dtype == dt and low(tokens).dtype == dt
        err = (low(tokens).double() - ref).abs().max() / ref.abs().max()
        assert err < tol, (dt, float(err))


def test_the_naive_activations_equal_torchs():
    x = torch.linspace(-4, 4, 101, dtype=torch.float64)
    torch.testing.assert_close(_act(x, "gelu"), F.gelu(x))
    torch.testing.assert_close(_act(x, "silu"), F.silu(x))


def test_vmapped_and_functional_weights_inside_the_block_equal_per_copy_runs():
    model = Transformer(TransformerConfig(n_layers=1, d_model=32, n_heads=4, d_mlp=64, d_vocab=20, n_ctx=8))
    params = {k: v.detach() for k, v in model.named_parameters()}
    stacked = {k: torch.stack([v, 1.1 * v]) for k, v in params.items()}
    tokens = torch.randint(0, 20, (2, 8), generator=torch.Generator().manual_seed(5))

    def loss(p):
        return torch.func.functional_call(model, p, (tokens,), {"return_type": "loss"})

    ref = torch.stack([loss({k: v[i] for k, v in stacked.items()}) for i in range(2)])
    with torch.no_grad(), model.fixed_weights():
        torch.testing.assert_close(torch.func.vmap(loss)(stacked), ref, rtol=1e-6, atol=1e-6)
        per_copy = torch.stack([loss({k: v[i] for k, v in stacked.items()}) for i in range(2)])
        torch.testing.assert_close(per_copy, ref, rtol=0, atol=0)
