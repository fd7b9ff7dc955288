"""TransformerLens parity of the hook API: run_with_cache's keywords, the norms' hook_scale (read, edited,
backward), backward hooks, hook return values, contexts, levels and the root module's helpers."""

import numpy as np
import pytest
import torch

from pypattern.models.hooks import ActivationCache, HookPoint
from pypattern.models.transformer import LayerNorm, Transformer, TransformerConfig

NORMS = ["LN", "LNPre", "RMS", "RMSPre"]


def make(norm="LN", dtype=torch.float32, **kw):
    cfg = dict(n_layers=2, d_model=32, n_heads=4, d_mlp=64, d_vocab=50, n_ctx=16, seed=0)
    cfg.update(kw)
    return Transformer(TransformerConfig(dtype=dtype, normalization_type=norm, **cfg))


def tokens(batch=2, pos=8, seed=1):
    return torch.randint(0, 50, (batch, pos), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- run_with_cache


def test_run_with_cache_remove_batch_dim_keeps_row_zero_and_needs_batch_of_one():
    m = make()
    x = tokens(1)
    _, full = m.run_with_cache(x)
    out, cache = m.run_with_cache(x, remove_batch_dim=True)
    assert torch.equal(out, m(x))
    assert list(cache) == list(full) and cache.has_batch_dim is False
    for name, act in full.items():
        assert torch.equal(cache[name], act[0]), name
    with pytest.raises(ValueError, match="remove_batch_dim"):
        m.run_with_cache(tokens(2), remove_batch_dim=True)
    assert not any(hp.active for hp in m.hook_points())


def test_run_with_cache_names_filter_forms_device_and_plain_dict():
    m = make()
    x = tokens()
    _, full = m.run_with_cache(x)
    fired = []
    m.run_with_hooks(x, fwd_hooks=[(lambda n: True, lambda a, hook: fired.append(hook.name))])
    assert list(full) == fired and set(fired) == set(m.hook_dict)  # the order the forward reached them
    names = ["blocks.1.hook_resid_post", "blocks.0.attn.hook_pattern"]
    for flt, want in [
        ("hook_embed", ["hook_embed"]),
        (names, ["blocks.0.attn.hook_pattern", "blocks.1.hook_resid_post"]),
        (lambda n: n.endswith("hook_z"), ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z"]),
    ]:
        _, c = m.run_with_cache(x, names_filter=flt, device="cpu")
        assert list(c) == want
        assert all(torch.equal(c[n], full[n]) for n in want)
    _, plain = m.run_with_cache(x, names_filter="hook_embed", return_cache_object=False)
    assert type(plain) is dict and torch.equal(plain["hook_embed"], full["hook_embed"])
    assert isinstance(full, ActivationCache)


@pytest.mark.parametrize(
    "pos_slice, index",
    [(-1, [-1]), (2, [2]), ((1, 5), slice(1, 5)), ((0, None, 2), slice(0, None, 2)), ([0, 3, 7], [0, 3, 7])],
)
def test_run_with_cache_pos_slice_on_the_position_axis(pos_slice, index):
    m = make()
    x = tokens()
    _, full = m.run_with_cache(x)
    _, cache = m.run_with_cache(x, pos_slice=pos_slice)
    assert list(cache) == list(full)
    for name, act in full.items():
        # independent indexing: (batch, pos, head, d) for q/k/v/z, (batch, head, query, key) for the pattern
        if name.split(".")[-1] in ("hook_q", "hook_k", "hook_v", "hook_z"):
            want = act[:, index]
        elif name.split(".")[-1] in ("hook_pattern", "hook_attn_scores"):
            want = act[:, :, index]
        else:
            want = act[:, index]
        assert torch.equal(cache[name], want), name


def test_run_with_cache_pos_slice_refuses_bad_values():
    m = make()
    with pytest.raises(ValueError, match="pos_slice"):
        m.run_with_cache(tokens(), pos_slice="last")
    with pytest.raises(ValueError, match="pos_slice"):
        m.run_with_cache(tokens(), pos_slice=[0.5])


def test_run_with_cache_incl_bwd_caches_the_gradients_autograd_gives():
    m = make(dtype=torch.float64)
    x = tokens()
    names = ["blocks.0.hook_resid_mid", "blocks.1.attn.hook_z", "hook_embed"]
    loss, cache = m.run_with_cache(x, names_filter=names, incl_bwd=True, return_type="loss")
    assert set(cache) == set(names) | {n + "_grad" for n in names}
    # independent: the same activations kept in the graph, differentiated by autograd
    loss2, live = m.run_with_cache(x, names_filter=names, detach=False, return_type="loss")
    grads = torch.autograd.grad(loss2, [live[n] for n in names])
    for n, g in zip(names, grads, strict=True):
        torch.testing.assert_close(cache[n + "_grad"], g, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="incl_bwd"):
        m.run_with_cache(x, incl_bwd=True)  # logits are not a scalar
    assert not any(hp.active for hp in m.hook_points())


def test_run_with_cache_reset_hooks_end_false_keeps_filling_and_clear_contexts():
    m = make()
    _, cache = m.run_with_cache(tokens(seed=1), names_filter="hook_embed", reset_hooks_end=False)
    assert m.hook_dict["hook_embed"].active
    x2 = tokens(seed=2)
    m(x2)
    assert torch.equal(cache["hook_embed"], m.W_E[x2])
    m.reset_hooks()
    assert not m.hook_dict["hook_embed"].active
    m.hook_dict["hook_embed"].ctx["k"] = 1
    m.run_with_cache(tokens(), names_filter="hook_embed", clear_contexts=True)
    assert m.hook_dict["hook_embed"].ctx == {}


def test_run_with_cache_unknown_keyword_is_refused_by_name():
    with pytest.raises(TypeError, match="not_a_keyword"):
        make().run_with_cache(tokens(), not_a_keyword=True)


# ------------------------------------------------------------------------------------------------ the norms


def _scale_norms_w3(m):
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith(".w") and ("ln" in n):
                p.mul_(3)
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)).to(p.dtype))
    return m


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cached_forward_is_bit_identical_to_the_plain_one(norm, dtype):
    m = _scale_norms_w3(make(norm, dtype))
    x = tokens()
    plain = m(x)
    cached, cache = m.run_with_cache(x)
    assert "blocks.0.ln1.hook_scale" in cache
    assert torch.equal(plain, cached)
    read = m.run_with_hooks(x, fwd_hooks=[(lambda n: n.endswith("hook_scale"), lambda s, hook: None)])
    assert torch.equal(plain, read)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_layernorm_scale_edit_propagates_as_the_naive_forward(dtype):
    torch.manual_seed(0)
    ln = LayerNorm(16, 1e-5, dtype)
    with torch.no_grad():
        ln.w.copy_(3 * torch.randn(16))
        ln.b.copy_(torch.randn(16))
    x = (4 * torch.randn(3, 5, 16)).to(dtype)

    def halve(s, hook):
        s.mul_(2)  # in place, TransformerLens' usual style

    ln.hook_scale.add_hook(halve)
    got = ln(x)
    c = x - x.mean(-1, keepdim=True)
    scale = (c.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * 2
    assert torch.equal(got, torch.addcmul(ln.b, c / scale, ln.w))
    ln.hook_scale.remove_hooks()
    ln.hook_scale.add_hook(lambda s, hook: 2 * s)  # a returned replacement
    assert torch.equal(ln(x), got)
    ln.hook_scale.remove_hooks()
    assert torch.equal(ln(x), torch.nn.functional.layer_norm(x, (16,), ln.w, ln.b, 1e-5))


@pytest.mark.parametrize("norm", NORMS)
def test_backward_hook_on_hook_scale_receives_its_gradient(norm):
    m = _scale_norms_w3(make(norm, torch.float64))
    x = tokens()
    name = "blocks.1.ln2.hook_scale"
    seen = []
    with m.hooks(bwd_hooks=[(name, lambda g, hook: seen.append(g))]):
        m(x, return_type="loss").backward()
    assert len(seen) == 1
    # independent: the scale replaced by a copy that is a leaf of the graph, differentiated by autograd
    leaf = []

    def as_leaf(s, hook):
        leaf.append(s.detach().clone().requires_grad_())
        return leaf[0]

    loss = m.run_with_hooks(x, return_type="loss", fwd_hooks=[(name, as_leaf)])
    (want,) = torch.autograd.grad(loss, leaf)
    torch.testing.assert_close(seen[0], want, rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------------------------------------- hook points


def test_backward_hook_sees_the_gradient_of_the_replaced_activation():
    m = make(dtype=torch.float64)
    x = tokens()
    name = "blocks.0.hook_resid_mid"
    patch = torch.randn(2, 8, 32, dtype=torch.float64, requires_grad=True)
    loss = m.run_with_hooks(x, return_type="loss", fwd_hooks=[(name, lambda a, hook: patch)])
    (want,) = torch.autograd.grad(loss, patch)
    seen = []
    m.add_hook(name, lambda g, hook: seen.append(g.clone()), dir="bwd")  # before the replacing function
    m.add_hook(name, lambda a, hook: patch)
    try:
        for _ in range(2):
            m(x, return_type="loss").backward()
    finally:
        m.reset_hooks()
    assert len(seen) == 2  # once per backward: nothing stays attached to the patch between forwards
    torch.testing.assert_close(seen[0], want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(seen[1], want, rtol=1e-12, atol=1e-14)
    assert not patch._backward_hooks
    torch.autograd.grad((patch * 2).sum(), patch)  # a later use of the patch does not reach the hook
    assert len(seen) == 2


def test_backward_hook_may_replace_the_gradient():
    m = make(dtype=torch.float64)
    x = tokens()
    m(x, return_type="loss").backward()
    plain = m.W_E.grad.clone()
    m.zero_grad()
    m.run_with_hooks(x, return_type="loss", bwd_hooks=[("hook_embed", lambda g, hook: 2 * g)]).backward()
    torch.testing.assert_close(m.W_E.grad, 2 * plain, rtol=1e-12, atol=1e-14)
    m.zero_grad()
    m.run_with_hooks(x, return_type="loss", bwd_hooks=[("hook_embed", lambda g, hook: None)]).backward()
    torch.testing.assert_close(m.W_E.grad, plain, rtol=0, atol=0)


def test_hook_return_values_are_checked_and_hooks_do_not_leak():
    m = make()
    x = tokens()
    name = "blocks.0.hook_resid_mid"
    with pytest.raises(TypeError, match=name):
        m.run_with_hooks(x, fwd_hooks=[(name, lambda a, hook: 3)])
    with pytest.raises(ValueError, match="shape"):
        m.run_with_hooks(x, fwd_hooks=[(name, lambda a, hook: a[:, -1:])])

    def boom(a, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        m.run_with_hooks(x, fwd_hooks=[(name, boom)])
    assert not any(hp.active for hp in m.hook_points())
    # None leaves the activation, a tensor replaces it; a keyword-only ``hook`` is called by keyword
    doubled = m.run_with_hooks(x, fwd_hooks=[(name, lambda a, *, hook: 2 * a)])
    want = m.run_with_hooks(x, fwd_hooks=[(name, lambda a, hook: a.mul_(2))])
    assert torch.equal(doubled, want) and not torch.equal(doubled, m(x))
    assert torch.equal(m.run_with_hooks(x, fwd_hooks=[(name, lambda a, hook: None)]), m(x))


def test_root_module_helpers_match_transformerlens():
    m = make()
    assert list(m.hook_points()) == list(m.hook_dict.values())
    assert m.mod_dict == {n: mod for n, mod in m.named_modules() if n}
    assert all(isinstance(m.mod_dict[n], HookPoint) and hp.name == n for n, hp in m.hook_dict.items())
    assert m.hook_dict["blocks.1.attn.hook_z"].layer() == 1
    hp = m.hook_dict["hook_embed"]

    def nothing(a, hook):
        return None

    hp.add_hook(nothing, dir="bwd")
    hp.add_hook(nothing)
    hp.remove_hooks()  # TransformerLens' default direction: forward only
    assert [getattr(f, "_pp_dir", "fwd") for f in hp._fns] == ["bwd"]
    m.remove_all_hook_fns()
    assert not hp.active
    m.add_hook("hook_embed", nothing, level=3)
    m.add_hook("hook_embed", nothing)
    m.add_perma_hook("hook_embed", nothing)
    m.reset_hooks(level=3)
    assert len(hp._fns) == 2
    m.reset_hooks()
    assert len(hp._fns) == 1
    m.remove_all_hook_fns(including_permanent=True)
    assert not hp.active
    hp.ctx["seen"] = 1
    m.reset_hooks(clear_contexts=False)
    assert hp.ctx == {"seen": 1}
    m.reset_hooks()
    assert hp.ctx == {}


def test_nested_contexts_remove_only_their_own_hooks():
    m = make()
    x = tokens()
    calls = []

    def rec(tag):
        def fn(a, hook):
            calls.append((tag, hook.name))

        return fn

    m.add_perma_hook("hook_embed", rec("perma"))
    with m.hooks(fwd_hooks=[("hook_embed", rec("outer"))]):
        m.run_with_hooks(x, fwd_hooks=[("hook_embed", rec("inner"))])
        assert [t for t, _ in calls] == ["perma", "outer", "inner"]
        calls.clear()
        m(x)
        assert [t for t, _ in calls] == ["perma", "outer"]
    calls.clear()
    m(x)
    assert [t for t, _ in calls] == ["perma"]
    m.reset_hooks(including_permanent=True)
    assert not any(hp.active for hp in m.hook_dict.values())


def test_get_caching_hooks_and_setup_on_a_custom_root_module():
    from pypattern.models.hooks import HookedRootModule

    class TwoLayer(HookedRootModule):  # TransformerLens' tutorial shape: hook points, then setup()
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 4)
            self.hook_pre = HookPoint()
            self.hook_post = HookPoint()
            self.setup()

        def forward(self, x):
            return self.hook_post(torch.relu(self.hook_pre(self.lin(x)))).sum()

    torch.manual_seed(0)
    m = TwoLayer()
    assert list(m.hook_dict) == ["hook_pre", "hook_post"] and m.hook_dict["hook_pre"].name == "hook_pre"
    x = torch.randn(2, 3)
    cache, fwd, bwd = m.get_caching_hooks(["hook_pre", "hook_post"], incl_bwd=True)
    assert [n for n, _ in fwd] == [n for n, _ in bwd] == ["hook_pre", "hook_post"]
    m.run_with_hooks(x, fwd_hooks=fwd, bwd_hooks=bwd).backward()
    pre = m.lin(x)
    torch.testing.assert_close(cache["hook_pre"], pre.detach())
    torch.testing.assert_close(cache["hook_post"], torch.relu(pre).detach())
    torch.testing.assert_close(cache["hook_post_grad"], torch.ones(2, 4))
    torch.testing.assert_close(cache["hook_pre_grad"], (pre > 0).float())
    order = []
    m.add_hook("hook_pre", lambda a, hook: order.append("a"))
    m.add_hook("hook_pre", lambda a, hook: order.append("b"), prepend=True)
    m(x)
    assert order == ["b", "a"]
    m.reset_hooks()


def test_cache_remove_batch_dim_and_to_as_in_transformerlens():
    m = make()
    x = tokens(1)
    _, full = m.run_with_cache(x)
    _, cache = m.run_with_cache(x)
    assert cache.remove_batch_dim() is cache and cache.has_batch_dim is False
    assert all(torch.equal(cache[n], full[n][0]) for n in full)
    assert cache.remove_batch_dim() is cache and torch.equal(cache["hook_embed"], full["hook_embed"][0])
    assert cache.to("cpu") is cache and cache["z", 0].shape == full["z", 0].shape[1:]
    _, two = m.run_with_cache(tokens(2))
    with pytest.raises(ValueError, match="batch of one"):
        two.remove_batch_dim()


def test_run_with_cache_int_pos_slice_keeps_the_axis_and_a_slice_object_of_an_int_drops_it():
    """As TransformerLens' run_with_cache: ``pos_slice=3`` keeps a position axis of length one (its
    ``Slice.unwrap`` reads an int as ``[int]``); a ``Slice``-like object of mode ``"int"`` selects and drops it."""
    m = make()
    x = tokens()
    _, full = m.run_with_cache(x)
    _, kept = m.run_with_cache(x, pos_slice=3)
    _, kept_np = m.run_with_cache(x, pos_slice=np.int64(3))

    class IntSlice:  # the attributes pypattern reads of a TransformerLens Slice
        slice, mode = 3, "int"

    _, dropped = m.run_with_cache(x, pos_slice=IntSlice())
    for name in ("blocks.0.hook_resid_pre", "blocks.0.attn.hook_v", "blocks.0.attn.hook_pattern"):
        axis = 1 if name.endswith(("hook_v", "hook_resid_pre")) else 2
        want = full[name].narrow(axis, 3, 1)
        assert torch.equal(kept[name], want), name
        assert torch.equal(kept_np[name], want), name
        assert torch.equal(dropped[name], want.squeeze(axis)), name
