"""Semantics of the hook API against TransformerLens' own HookPoint / HookedRootModule on the same small module.

Each test records what a small hooked module does (order of calls, gradients, what is left attached) and checks
it against TransformerLens' semantics, written out in the test; when ``transformer_lens`` is importable, the same
test runs on TransformerLens' classes too, which checks that the written-out semantics are TransformerLens' own.
"""

import pytest
import torch
from torch import nn

from pypattern.models.hooks import HookedRootModule as PPRoot
from pypattern.models.hooks import HookPoint as PPHookPoint
from pypattern.models.transformer import Transformer, TransformerConfig


def _tl_classes():
    tl = pytest.importorskip("transformer_lens")
    from transformer_lens.hook_points import HookPoint

    return HookPoint, tl.HookedRootModule


def _pp_classes():
    return PPHookPoint, PPRoot


def impls(*, bug: str | None = None):
    """The implementations to run a test on; ``bug`` marks pypattern's as a known difference (strict xfail)."""
    marks = [pytest.mark.xfail(strict=True, reason=bug)] if bug else []
    return pytest.mark.parametrize(
        "classes",
        [
            pytest.param(_pp_classes, id="pypattern", marks=marks),
            pytest.param(_tl_classes, id="transformer_lens"),
        ],
    )


def build(classes):
    """``lin -> hook_a -> tanh -> hook_b -> (.)**2 summed``: a scalar loss with two hook points."""
    hook_point, root = classes()

    class Small(root):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.hook_a = hook_point()
            self.hook_b = hook_point()
            self.setup()

        def forward(self, x):
            h = self.hook_a(self.lin(x))
            return (self.hook_b(torch.tanh(h)) ** 2).sum()

    torch.manual_seed(0)
    return Small()


X = torch.randn(2, 3, generator=torch.Generator().manual_seed(1))


def plain_grads(m):
    """The loss, d loss / d hook_a's activation and d loss / d lin.bias, by autograd without hooks."""
    h = m.lin(X)
    loss = (torch.tanh(h) ** 2).sum()
    g_h, g_b = torch.autograd.grad(loss, [h, m.lin.bias])
    return loss.detach(), g_h, g_b


def recorder(log, key, scale=None):
    def fn(t, hook):
        log.append((key, t.detach().clone()))
        return None if scale is None else t * scale

    return fn


# --------------------------------------------------------------------------------------------- forward hooks


@impls()
def test_forward_hooks_run_in_order_prepend_first_and_see_the_replacements(classes):
    m = build(classes)
    log = []
    m.hook_a.add_hook(recorder(log, "first"))
    m.hook_a.add_hook(lambda a, hook: a * 2)
    m.hook_a.add_hook(recorder(log, "after_replace"))
    m.hook_a.add_hook(recorder(log, "prepended"), prepend=True)
    m.hook_a.add_hook(lambda a, hook: None)  # None: the activation is unchanged
    out = m(X)
    h = m.lin(X).detach()
    assert [k for k, _ in log] == ["prepended", "first", "after_replace"]
    assert torch.equal(log[0][1], h) and torch.equal(log[1][1], h)
    assert torch.equal(log[2][1], h * 2)
    assert torch.allclose(out, (torch.tanh(h * 2) ** 2).sum())


# -------------------------------------------------------------------------------------------- backward hooks


@impls()
def test_a_backward_hook_gets_the_gradient_and_its_return_replaces_it(classes):
    m = build(classes)
    _, g_h, g_b = plain_grads(m)
    log = []
    m.hook_a.add_hook(recorder(log, "g", scale=3.0), dir="bwd")
    m(X).backward()
    assert len(log) == 1 and torch.allclose(log[0][1], g_h)
    assert torch.allclose(m.lin.bias.grad, 3 * g_b)  # the replaced gradient flowed upstream
    m.zero_grad()
    m.reset_hooks()
    log.clear()
    m.hook_a.add_hook(recorder(log, "g"), dir="bwd")  # None: the gradient is unchanged
    m(X).backward()
    assert torch.allclose(m.lin.bias.grad, g_b) and torch.allclose(log[0][1], g_h)


@impls()
def test_a_backward_hook_sees_the_gradient_of_the_activation_a_forward_hook_returned(classes):
    m = build(classes)
    log = []
    m.hook_a.add_hook(recorder(log, "g"), dir="bwd")  # attached before the forward hook that patches
    m.hook_a.add_hook(lambda a, hook: a * 0 + 1.0)
    m(X).backward()
    want = 2 * torch.tanh(torch.ones(2, 3)) * (1 - torch.tanh(torch.ones(2, 3)) ** 2)
    assert torch.allclose(log[0][1], want)


@impls()
def test_backward_hooks_run_in_the_order_attached_prepend_first(classes):
    m = build(classes)
    log = []
    m.hook_a.add_hook(recorder(log, "b1"), dir="bwd")
    m.hook_a.add_hook(recorder(log, "b2"), dir="bwd")
    m.hook_a.add_hook(recorder(log, "b0"), dir="bwd", prepend=True)
    m(X).backward()
    assert [k for k, _ in log] == ["b0", "b1", "b2"]


@impls()
def test_backward_hooks_each_see_the_incoming_gradient_and_the_last_replacement_wins(classes):
    m = build(classes)
    _, g_h, g_b = plain_grads(m)
    log = []
    m.hook_a.add_hook(recorder(log, "b1", scale=2.0), dir="bwd")
    m.hook_a.add_hook(recorder(log, "b2", scale=3.0), dir="bwd")
    m(X).backward()
    assert all(torch.allclose(g, g_h) for _, g in log)
    assert torch.allclose(m.lin.bias.grad, 3 * g_b)


@impls()
def test_a_backward_hook_may_return_a_one_element_tuple(classes):
    m = build(classes)
    _, _, g_b = plain_grads(m)
    m.hook_a.add_hook(lambda g, hook: (g * 5,), dir="bwd")
    m(X).backward()
    assert torch.allclose(m.lin.bias.grad, 5 * g_b)


@impls()
def test_a_backward_hook_removed_after_the_forward_still_runs_in_its_backward(classes):
    m = build(classes)
    _, g_h, _ = plain_grads(m)
    log = []
    out = m.run_with_hooks(X, bwd_hooks=[("hook_a", recorder(log, "g"))])
    assert not any(_attached(hp) for hp in m.hook_dict.values())
    out.backward()
    assert len(log) == 1 and torch.allclose(log[0][1], g_h)


# ------------------------------------------------------------------------------- permanence, levels, removal


def _attached(hp):
    """How many functions are attached to ``hp`` (TransformerLens keeps handles, pypattern the functions)."""
    if hasattr(hp, "fwd_hooks"):
        return len(hp.fwd_hooks) + len(hp.bwd_hooks)
    return len(hp._fns)


def _fired(m):
    """Keys the forward hooks recorded in one forward of ``m`` (each hook appends its key to ``m.log``)."""
    m.log.clear()
    m(X)
    return list(m.log)


def tagger(m, key):
    def fn(a, hook):
        m.log.append(key)

    return fn


@impls()
def test_permanent_hooks_survive_reset_and_context_exit_until_including_permanent(classes):
    m = build(classes)
    m.log = []
    m.add_perma_hook("hook_a", tagger(m, "perma"))
    m.add_hook("hook_a", tagger(m, "temp"))
    with m.hooks(fwd_hooks=[("hook_a", tagger(m, "ctx"))]):
        assert _fired(m) == ["perma", "temp", "ctx"]
    assert _fired(m) == ["perma", "temp"]
    m.reset_hooks()
    assert _fired(m) == ["perma"]
    m.reset_hooks(including_permanent=True)
    assert _fired(m) == []


@impls()
def test_remove_hooks_by_level_and_direction(classes):
    m = build(classes)
    m.log = []
    hp = m.hook_a
    hp.add_hook(tagger(m, "L1"), level=1)
    hp.add_hook(tagger(m, "L2"), level=2)
    hp.add_hook(tagger(m, "P1"), level=1, is_permanent=True)
    hp.add_hook(tagger(m, "none"))
    bwd = []
    hp.add_hook(lambda g, hook: bwd.append(1), dir="bwd", level=1)
    hp.remove_hooks(level=1)  # dir="fwd" by default: the backward function stays
    assert _fired(m) == ["L2", "P1", "none"]
    m(X).backward()
    assert bwd == [1]
    hp.remove_hooks("bwd", level=1)
    m(X).backward()
    assert bwd == [1]
    m.reset_hooks(direction="fwd")
    assert _fired(m) == ["P1"]


@impls()
def test_remove_hooks_including_permanent_keeps_the_other_levels(classes):
    m = build(classes)
    m.log = []
    hp = m.hook_a
    hp.add_hook(tagger(m, "P1"), level=1, is_permanent=True)
    hp.add_hook(tagger(m, "P2"), level=2, is_permanent=True)
    hp.add_hook(tagger(m, "none"))
    hp.remove_hooks(including_permanent=True, level=1)
    assert _fired(m) == ["P2", "none"]  # only the level-1 one went (permanent or not)
    m.reset_hooks(including_permanent=True)
    hp.add_hook(tagger(m, "P1"), level=1, is_permanent=True)
    hp.add_hook(tagger(m, "T2"), level=2)
    m.remove_all_hook_fns(including_permanent=True, level=2)
    assert _fired(m) == ["P1"]


# ---------------------------------------------------------------------------------------- contexts, failures


@impls()
def test_nested_contexts_remove_only_their_own_hooks(classes):
    m = build(classes)
    m.log = []
    with m.hooks(fwd_hooks=[("hook_a", tagger(m, "outer"))]):
        with m.hooks(fwd_hooks=[(lambda n: n.endswith("_b"), tagger(m, "inner"))]):
            assert _fired(m) == ["outer", "inner"]
        assert _fired(m) == ["outer"]
        m.add_hook("hook_b", tagger(m, "added_inside"))
    assert _fired(m) == ["added_inside"]  # a hook added by add_hook is not the context's


@impls()
def test_a_context_removes_its_own_registration_of_a_function_attached_twice(classes):
    m = build(classes)
    m.log = []
    f, g = tagger(m, "f"), tagger(m, "g")
    m.add_hook("hook_a", f)
    m.add_hook("hook_a", g)
    with m.hooks(fwd_hooks=[("hook_a", f)]):
        assert _fired(m) == ["f", "g", "f"]
    assert _fired(m) == ["f", "g"]


@impls()
def test_a_context_does_not_remove_a_function_attached_again_after_a_reset(classes):
    m = build(classes)
    m.log = []
    f = tagger(m, "f")
    with m.hooks(fwd_hooks=[("hook_a", f)]):
        m.reset_hooks()
        m.add_hook("hook_a", f)
    assert _fired(m) == ["f"]


@impls()
def test_a_raising_hook_propagates_and_leaves_nothing_attached(classes):
    m = build(classes)
    m.log = []
    m.add_perma_hook("hook_b", tagger(m, "perma"))

    def boom(a, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        m.run_with_hooks(X, fwd_hooks=[("hook_a", tagger(m, "t")), ("hook_a", boom)])
    with pytest.raises(RuntimeError, match="boom"):
        m.run_with_hooks(X, bwd_hooks=[("hook_a", boom)]).backward()
    assert _fired(m) == ["perma"]
    with pytest.raises(KeyError):
        with m.hooks(fwd_hooks=[("hook_a", tagger(m, "t")), ("no_such_hook", tagger(m, "t"))]):
            pass
    assert _fired(m) == ["perma"]


@impls()
def test_contexts_are_cleared_only_as_documented(classes):
    m = build(classes)

    def count(a, hook):
        hook.ctx["n"] = hook.ctx.get("n", 0) + 1

    m.run_with_hooks(X, fwd_hooks=[("hook_a", count)])
    m.run_with_hooks(X, fwd_hooks=[("hook_a", count)])
    assert m.hook_a.ctx == {"n": 2}  # kept across runs by default
    m.run_with_hooks(X, fwd_hooks=[("hook_b", count)], clear_contexts=True)
    assert m.hook_a.ctx == {} and m.hook_b.ctx == {}  # every hook point's, when the hooks are removed
    m.hook_a.ctx["k"] = 1
    m.run_with_hooks(X, fwd_hooks=[("hook_b", count)], clear_contexts=True, reset_hooks_end=False)
    assert m.hook_a.ctx == {"k": 1}  # not removed: not cleared
    m.reset_hooks(clear_contexts=False)
    assert m.hook_a.ctx == {"k": 1}
    m.reset_hooks()
    assert m.hook_a.ctx == {} and m.hook_b.ctx == {}


# -------------------------------------------------------------------------------------------- run_with_cache


@impls()
def test_run_with_cache_names_filter_forms_and_gradients_under_grad_names(classes):
    m = build(classes)
    loss, g_h, _ = plain_grads(m)
    h = m.lin(X).detach()
    for flt, want in [
        (None, ["hook_a", "hook_b"]),
        ("hook_b", ["hook_b"]),
        (["hook_b", "hook_a"], ["hook_a", "hook_b"]),
        (lambda n: n.endswith("a"), ["hook_a"]),
    ]:
        out, cache = m.run_with_cache(X, names_filter=flt)
        assert list(cache) == want and torch.allclose(out, loss)
    assert torch.equal(cache["hook_a"], h)
    out, cache = m.run_with_cache(X, incl_bwd=True)
    assert list(cache) == ["hook_a", "hook_b", "hook_b_grad", "hook_a_grad"]  # gradients in backward order
    assert torch.allclose(cache["hook_a_grad"], g_h)
    assert torch.allclose(cache["hook_b_grad"], 2 * torch.tanh(h))
    assert list(m.mod_dict) == ["lin", "hook_a", "hook_b"]
    assert set(m.hook_dict) == {"hook_a", "hook_b"} and m.hook_dict["hook_a"] is m.hook_a


# ----------------------------------------------------------------------------------------- pypattern's model


def test_transformer_backward_hooks_and_contexts_behave_as_on_the_small_module():
    m = Transformer(
        TransformerConfig(n_layers=1, d_model=16, n_heads=2, d_mlp=32, d_vocab=20, n_ctx=8, seed=0)
    )
    toks = torch.randint(0, 20, (1, 5), generator=torch.Generator().manual_seed(2))
    name = "blocks.0.hook_resid_mid"
    kept = {}

    def keep(a, hook):
        kept["a"] = a

    def mark(a, hook):
        hook.ctx["seen"] = True

    out = m.run_with_hooks(toks, return_type="loss", fwd_hooks=[(name, keep)])
    (g_ref,) = torch.autograd.grad(out, kept["a"])
    log = []
    m.add_perma_hook(name, mark)
    loss = m.run_with_hooks(
        toks, return_type="loss", bwd_hooks=[(name, recorder(log, "g", scale=0.0))], clear_contexts=True
    )
    assert m.hook_dict[name].ctx == {}  # cleared with the context's hooks; the permanent one stays
    loss.backward()
    assert torch.allclose(log[0][1], g_ref, atol=1e-6)
    assert torch.count_nonzero(m.embed.W_E.grad) == 0  # the zeroed gradient is all that reaches the embedding
    assert m.hook_dict[name].active
    m.reset_hooks(including_permanent=True)
    assert not any(hp.active for hp in m.hook_points())
