"""Products against fixed weights through oneDNN's packed matmul (pypattern.models.packed): equal to torch.mm on
every input the model's affine maps meet, gradients into the input included, and the patching grids built on
them equal to their naive loops with the packed path forced on and off."""

import pytest
import torch

import pypattern.models.packed as pk
from pypattern.models import Transformer, TransformerConfig
from pypattern.patching import LogitDiff, activation_patching
from pypattern.patching.attribution import attribution_patching

pytestmark = pytest.mark.usefixtures("one_thread")

needs_ops = pytest.mark.skipif(not pk._ops_present(), reason="this torch has no oneDNN linear ops")


@pytest.fixture(autouse=True)
def any_size(monkeypatch):
    """The tests' products are small: the oneDNN path is taken for products of any size."""
    monkeypatch.setattr(pk.PackedWeights, "MIN_MACS", 0)


@pytest.fixture
def packed_on(monkeypatch):
    """The packed path chosen for this process, and every weight packed from its first use."""
    monkeypatch.setattr(pk, "_CHOICE", True)
    monkeypatch.setattr(pk.PackedWeights, "PACK_AFTER_ROWS", 0)


@pytest.fixture
def products(monkeypatch) -> list:
    """One entry per product taken through oneDNN (``PackedWeights.product``) while the test runs."""
    seen: list = []
    real = pk.PackedWeights.product
    monkeypatch.setattr(pk.PackedWeights, "product", staticmethod(lambda *a: seen.append(1) or real(*a)))
    return seen


@pytest.fixture
def blocks_made(monkeypatch) -> list:
    """Every ``PackedWeights`` made while the test runs: one per outermost ``fixed_weights`` block."""
    made: list = []
    init = pk.PackedWeights.__init__
    monkeypatch.setattr(pk.PackedWeights, "__init__", lambda self, *a: made.append(self) or init(self, *a))
    return made


def _inputs(shape, n, m, gen):
    return (
        torch.randn(*shape, n, generator=gen),
        torch.randn(n, m, generator=gen),
        torch.randn(m, generator=gen),
    )


@needs_ops
@pytest.mark.parametrize(
    "shape,n,m",
    [((5,), 7, 3), ((2, 9), 16, 33), ((1,), 1, 1), ((3, 4, 2), 24, 5), ((257,), 64, 96), ((1, 1), 13, 2)],
)
@pytest.mark.parametrize("bias", [True, False])
def test_packed_affine_equals_mm(packed_on, shape, n, m, bias):
    gen = torch.Generator().manual_seed(0)
    x, W, b = _inputs(shape, n, m, gen)
    b = b if bias else None
    ref = (x.double() @ W.double() + (0 if b is None else b.double())).float()
    packs = pk.PackedWeights()
    assert packs.applies(x, W, b)
    got = packs.affine(x, W, b)
    assert got is not None and got.shape == ref.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # the weight is packed once and reused
    assert len(packs._packs) == 1
    torch.testing.assert_close(packs.affine(x, W, b), ref, rtol=1e-5, atol=1e-5)
    assert len(packs._packs) == 1


@needs_ops
def test_packed_affine_on_strided_views(packed_on):
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(11, 6, 20, generator=gen)
    x = base.transpose(0, 1)[:, ::2]  # (6, 6, 20), neither contiguous nor dense
    x_expand = torch.randn(1, 20, generator=gen).expand(7, 20)  # stride 0 over the rows
    Wbase = torch.randn(30, 20, generator=gen)
    W = Wbase.t()[:, ::3]  # (20, 10), a strided view of another tensor
    b = torch.randn(40, generator=gen)[::4]  # (10,), strided
    packs = pk.PackedWeights()
    for xx in (x, x_expand):
        ref = xx.double() @ W.double() + b.double()
        torch.testing.assert_close(packs.affine(xx, W, b).double(), ref, rtol=1e-5, atol=1e-5)


@needs_ops
@pytest.mark.parametrize(
    "pack_after", [0, 10**9]
)  # through the packed weights, and read in place before a pack
def test_packed_affine_gradient_into_the_input(monkeypatch, pack_after):
    monkeypatch.setattr(pk, "_CHOICE", True)
    monkeypatch.setattr(pk.PackedWeights, "PACK_AFTER_ROWS", pack_after)
    gen = torch.Generator().manual_seed(2)
    x, W, b = _inputs((4, 5), 12, 7, gen)
    up = torch.randn(4, 5, 7, generator=gen)
    xr = x.clone().requires_grad_(True)
    ((xr @ W + b) * up).sum().backward()
    packs = pk.PackedWeights()
    xg = x.clone().requires_grad_(True)
    out = packs.affine(xg, W, b)
    assert out is not None and out.requires_grad
    (out * up).sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-5, atol=1e-5)
    assert len(packs._packs) == (2 if pack_after == 0 else 0)  # W for the product, W^T for the gradient


@needs_ops
def test_unpacked_weights_read_in_place_or_left_to_mm(monkeypatch):
    monkeypatch.setattr(pk, "_CHOICE", True)
    monkeypatch.setattr(pk.PackedWeights, "PACK_AFTER_ROWS", 10**9)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(9, 20, generator=gen)
    b = torch.randn(10, generator=gen)
    packs = pk.PackedWeights()
    # (in, out) dense, and the transpose of an (out, in) dense tensor: read in place
    for W in (torch.randn(20, 10, generator=gen), torch.randn(10, 20, generator=gen).t()):
        got = packs.affine(x, W, b)
        torch.testing.assert_close(got, x @ W + b, rtol=1e-5, atol=1e-5)
        xg = x.clone().requires_grad_(True)
        packs.affine(xg, W, None).sum().backward()
        torch.testing.assert_close(xg.grad, W.sum(1).expand(9, 20), rtol=1e-5, atol=1e-5)
    # neither axis dense: left to mm (affine() then multiplies itself), never read wrongly
    W = torch.randn(40, 30, generator=gen)[::2, ::3]
    assert packs.affine(x, W, b) is None
    assert not packs._packs
    packs_mm = pk.PackedWeights()
    monkeypatch.setattr(pk.PackedWeights, "PACK_AFTER_ROWS", 0)
    torch.testing.assert_close(packs_mm.affine(x, W, b), x @ W + b, rtol=1e-5, atol=1e-5)  # packed: a copy


@needs_ops
def test_packed_affine_repacks_a_weight_changed_in_place(packed_on):
    gen = torch.Generator().manual_seed(3)
    x, W, b = _inputs((6,), 8, 5, gen)
    packs = pk.PackedWeights()
    packs.affine(x, W, b)
    W.mul_(-2.0)
    torch.testing.assert_close(packs.affine(x, W, b), x @ W + b, rtol=1e-5, atol=1e-5)


@needs_ops
def test_packed_path_is_not_taken_where_it_does_not_apply(packed_on):
    gen = torch.Generator().manual_seed(4)
    x, W, b = _inputs((3,), 4, 2, gen)
    packs = pk.PackedWeights()
    assert not packs.applies(x.double(), W.double(), b.double())  # float64
    assert not packs.applies(x.bfloat16(), W.bfloat16(), None)
    assert not packs.applies(x, W.clone().requires_grad_(True), b)  # a gradient into the weight
    assert not packs.applies(x, W, b.clone().requires_grad_(True))
    with torch.no_grad():  # no gradient flows: a weight that requires grad may be packed
        assert packs.applies(x, W.clone().requires_grad_(True), b)
    assert not packs.applies(x[:0], W, b)  # no rows
    assert not packs.applies(x, torch.randn(4, 0), None)
    assert not packs.applies(x, torch.randn(2, 4, 2), None)  # a stack of weights
    assert not packs.applies(x, W, b[None])  # a bias that is not a vector
    seen = []
    torch.func.vmap(lambda xx: seen.append(packs.applies(xx, W, b)) or xx)(x[None].expand(2, 3, 4))
    assert seen == [False]


@needs_ops
def test_weights_are_packed_after_enough_rows(monkeypatch):
    monkeypatch.setattr(pk, "_CHOICE", True)
    monkeypatch.setattr(pk.PackedWeights, "PACK_AFTER_ROWS", 100)
    gen = torch.Generator().manual_seed(5)
    x, W, b = _inputs((60,), 8, 4, gen)
    packs = pk.PackedWeights()
    torch.testing.assert_close(packs.affine(x, W, b), x @ W + b, rtol=1e-5, atol=1e-5)
    assert not packs._packs  # 60 rows so far: read in place
    out = packs.affine(x, W, b)  # 120: packed from here on
    assert len(packs._packs) == 1
    torch.testing.assert_close(out, x @ W + b, rtol=1e-5, atol=1e-5)


def test_the_choice_follows_pypattern_gemm(monkeypatch):
    for value, want in (("blas", False), ("BLAS ", False), ("onednn", pk._ops_present())):
        monkeypatch.setattr(pk, "_CHOICE", None)
        monkeypatch.setenv("PYPATTERN_GEMM", value)
        assert pk.packed_gemm_enabled() is want
    monkeypatch.setattr(pk, "_CHOICE", None)
    monkeypatch.setenv("PYPATTERN_GEMM", "mkl")
    with pytest.raises(ValueError, match="PYPATTERN_GEMM='mkl'"):
        pk.packed_gemm_enabled()
    monkeypatch.setattr(pk, "_CHOICE", None)
    monkeypatch.setenv("PYPATTERN_GEMM", "auto")
    assert isinstance(pk.packed_gemm_enabled(), bool)
    assert pk._CHOICE is pk.packed_gemm_enabled()  # timed once, then kept


def _model(**kw):
    cfg = dict(n_layers=2, d_model=16, n_heads=2, d_mlp=32, d_vocab=12, n_ctx=8, dtype=torch.float32, seed=5)
    cfg.update(kw)
    model = Transformer(TransformerConfig(**cfg))
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, 12, (3, 6), generator=g)
    corr = (clean + 1 + torch.randint(0, 10, clean.shape, generator=g)) % 12
    return model, clean, corr, LogitDiff(torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]))


@pytest.mark.parametrize("choice", [True, False])
@pytest.mark.parametrize(
    "kw", [{}, dict(n_key_value_heads=1, positional_embedding_type="rotary", gated_mlp=True)]
)
def test_grids_equal_naive_loop_with_the_packed_path_on_and_off(monkeypatch, choice, kw):
    if choice and not pk._ops_present():
        pytest.skip("this torch has no oneDNN linear ops")
    monkeypatch.setattr(pk, "_CHOICE", choice)
    monkeypatch.setattr(pk.PackedWeights, "PACK_AFTER_ROWS", 0)
    model, clean, corr, metric = _model(**kw)
    calls = []
    product = pk.PackedWeights.product
    monkeypatch.setattr(pk.PackedWeights, "product", staticmethod(lambda *a: calls.append(1) or product(*a)))
    for site in ("resid_pre", "z", "mlp_out"):
        a = activation_patching(model, site, clean, corr, metric=metric, method="exact")
        assert bool(calls) == choice  # the packed path is taken exactly when chosen
        b = activation_patching(model, site, clean, corr, metric=metric, method="naive")
        torch.testing.assert_close(a.values, b.values, rtol=1e-4, atol=1e-4)
        assert a.effect.abs().max() > 1e-3


@needs_ops
def test_attribution_patching_equal_with_the_packed_path_on_and_off(monkeypatch):
    model, clean, corr, metric = _model()
    for p in model.parameters():
        p.requires_grad_(True)
    out = {}
    for choice in (False, True):
        monkeypatch.setattr(pk, "_CHOICE", choice)
        monkeypatch.setattr(pk.PackedWeights, "PACK_AFTER_ROWS", 0)
        out[choice] = attribution_patching(
            model, clean, corr, metric=metric, sites=["z", "q"], qk_fix=True, grad_drop=True
        )
    for site in ("z", "q"):
        torch.testing.assert_close(out[True][site].values, out[False][site].values, rtol=1e-4, atol=1e-5)
        assert out[True][site].values.abs().max() > 1e-3
    assert all(p.requires_grad for p in model.parameters())  # attribution patching restores them


@needs_ops
def test_packs_stay_within_their_byte_bound(monkeypatch):
    monkeypatch.setattr(pk, "_CHOICE", True)
    monkeypatch.setattr(pk.PackedWeights, "PACK_AFTER_ROWS", 0)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(5, 16, generator=gen)
    Ws = [
        torch.randn(16, 16, generator=gen) for _ in range(3)
    ]  # 1 KiB each, charged padded to 64 x 64: 16 KiB
    packs = pk.PackedWeights(max_bytes=2 * 16384)
    for W in Ws:
        torch.testing.assert_close(packs.affine(x, W, None), x @ W, rtol=1e-5, atol=1e-5)
    assert len(packs._packs) == 2 and packs._bytes == 2 * 16384  # the third is read in place
    Ws[0].add_(1.0)  # repacked in place of its old copy: still within the bound
    torch.testing.assert_close(packs.affine(x, Ws[0], None), x @ Ws[0], rtol=1e-5, atol=1e-5)
    assert packs._bytes == 2 * 16384


def test_fixed_weights_checks_its_pack_bound_and_packs_nothing_by_default(monkeypatch):
    monkeypatch.setattr(pk, "_CHOICE", pk._ops_present())
    monkeypatch.setattr(pk.PackedWeights, "PACK_AFTER_ROWS", 0)
    model, clean, _, _ = _model()
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="max_pack_bytes"):
            with model.fixed_weights(max_pack_bytes=bad):
                pass
    from pypattern.models import transformer as tr

    with torch.no_grad(), model.fixed_weights():
        model(clean)
        assert tr._active_packs() is not None and not tr._active_packs()._packs
        with model.fixed_weights(max_pack_bytes=None):  # nested: the outer block's packs and bound
            assert tr._active_packs().max_bytes == 0
    assert tr._active_packs() is None
    if pk._ops_present():
        with torch.no_grad(), model.fixed_weights(max_pack_bytes=None):
            model(clean)
            assert tr._active_packs()._packs


def test_pack_budget(monkeypatch):
    model, *_ = _model()
    w = pk.block_weight_bytes(model)
    blocks = [p for b in model.blocks for p in b.parameters() if p.dim() >= 2]
    assert w == 4 * sum(p.numel() for p in blocks) > 0
    monkeypatch.setattr(pk, "_CHOICE", True)
    assert pk.pack_budget(model, None) is None
    assert pk.pack_budget(model, 2 * w) == w
    assert pk.pack_budget(model, 2 * w - 1) == 0  # more than half of the budget: none
    monkeypatch.setattr(pk, "_CHOICE", False)
    assert pk.pack_budget(model, 10 * w) == 0
    monkeypatch.setattr(pk, "_CHOICE", True)
    model64, *_ = _model(dtype=torch.float64)
    assert pk.block_weight_bytes(model64) == 0 and pk.pack_budget(model64, 10**12) == 0


@needs_ops
@pytest.mark.parametrize("room", [3, 1])  # max_memory in units of the block weights' bytes
def test_exact_patching_packs_within_max_memory(monkeypatch, blocks_made, room):
    from pypattern.patching import api as papi

    monkeypatch.setattr(pk, "_CHOICE", True)
    monkeypatch.setattr(pk.PackedWeights, "PACK_AFTER_ROWS", 0)
    model, clean, corr, metric = _model()
    w = pk.block_weight_bytes(model)
    made, batches = blocks_made, []
    engine_batch = papi.engine_batch
    monkeypatch.setattr(
        papi, "engine_batch", lambda *a: batches.append(a[-1]) or engine_batch(*a)
    )  # the memory each call is given: the arguments' check, then the engine's batch
    got = activation_patching(model, "resid_pre", clean, corr, metric=metric, max_memory=room * w)
    ref = activation_patching(model, "resid_pre", clean, corr, metric=metric, method="naive")
    torch.testing.assert_close(got.values, ref.values, rtol=1e-4, atol=1e-4)
    assert len(made) == 1  # one block for the recorded runs and the engine: layouts and packs made once
    packs = made[0]
    if room == 3:  # the weights fit in half: packed, and the engine's batch gets the rest
        assert packs.max_bytes == w and 0 < packs._bytes <= w
        assert batches == [3 * w, 2 * w]
    else:
        assert packs.max_bytes == 0 and not packs._packs
        assert batches == [w, w]


@pytest.mark.parametrize("method", ["eap", "exact"])
def test_circuits_equal_with_the_packed_path_on_and_off_and_keep_requires_grad(monkeypatch, method):
    from pypattern.circuits import edge_attribution, edges, patch_edges

    model, clean, corr, metric = _model()
    model.blocks[1].mlp.W_in.requires_grad_(False)  # a mix: each parameter's flag comes back as it was
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    graph = edges(model)
    out = {}
    for choice in (False, True) if pk._ops_present() else (False,):
        monkeypatch.setattr(pk, "_CHOICE", choice)
        monkeypatch.setattr(pk.PackedWeights, "PACK_AFTER_ROWS", 0)
        sc = edge_attribution(model, clean, corr, metric=metric, method=method)
        pe = patch_edges(model, graph.edges[:7], clean, corr, metric=metric)
        out[choice] = (sc.scores, pe)
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    if len(out) == 2:
        torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out[True][1], out[False][1], rtol=1e-4, atol=1e-5)
    assert out[False][0].abs().max() > 1e-4


def test_small_products_stay_with_mm_and_are_not_timed(monkeypatch):
    monkeypatch.setattr(pk.PackedWeights, "MIN_MACS", 1 << 24)
    monkeypatch.setattr(pk, "_CHOICE", None)
    monkeypatch.delenv("PYPATTERN_GEMM", raising=False)
    x, W = torch.randn(64, 64), torch.randn(64, 64)
    packs = pk.PackedWeights()
    assert not packs.applies(x, W, None)
    assert pk._CHOICE is None  # no timing for a product that would not use it
    big = torch.randn(4096, 64)  # 4096 x 64 x 64 = 2^24 multiply-adds
    assert packs.applies(big, W, None) is pk.packed_gemm_enabled()


def _block_model(**kw):
    cfg = dict(n_layers=1, d_model=16, n_heads=2, d_mlp=32, d_vocab=10, n_ctx=8, dtype=torch.float32, seed=3)
    cfg.update(kw)
    m = Transformer(TransformerConfig(**cfg))
    m.requires_grad_(False)
    return m


@needs_ops
@pytest.mark.parametrize("pack_after", [0, 1024])
def test_inference_mode_reads_weights_in_place(packed_on, monkeypatch, pack_after):
    monkeypatch.setattr(pk.PackedWeights, "PACK_AFTER_ROWS", pack_after)
    model, clean, corr, metric = _model()
    with torch.no_grad():
        ref = model(clean)
    with torch.inference_mode(), model.fixed_weights(max_pack_bytes=None):
        got = model(clean)  # the attention layouts made here are inference tensors: no version counter
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    with torch.inference_mode():
        a = activation_patching(model, "resid_pre", clean, corr, metric=metric)
    b = activation_patching(model, "resid_pre", clean, corr, metric=metric, method="naive")
    torch.testing.assert_close(a.values, b.values, rtol=1e-4, atol=1e-4)


@needs_ops
@pytest.mark.parametrize("pack_after", [0, 10**9])
def test_in_place_hook_edits_with_a_gradient_into_the_input(monkeypatch, pack_after):
    monkeypatch.setattr(pk.PackedWeights, "PACK_AFTER_ROWS", pack_after)
    m = _block_model()
    tok = torch.randint(0, 10, (2, 5), generator=torch.Generator().manual_seed(0))

    def zero_first(mod, inp, out):
        out[..., 0] = 0.0

    grads = {}
    for choice in (False, True):
        monkeypatch.setattr(pk, "_CHOICE", choice)
        emb = m.embed_tokens(tok).detach().requires_grad_(True)
        h = m.blocks[0].mlp.hook_pre.register_forward_hook(zero_first)
        try:
            with m.fixed_weights():
                (grads[choice],) = torch.autograd.grad(m.blocks[0](emb).pow(2).sum(), emb)
        finally:
            h.remove()
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-4, atol=1e-5)


@needs_ops
@pytest.mark.parametrize("pack_after", [0, 10**9])
def test_second_derivatives_through_the_path(monkeypatch, pack_after):
    monkeypatch.setattr(pk.PackedWeights, "PACK_AFTER_ROWS", pack_after)
    m = _block_model()
    gen = torch.Generator().manual_seed(1)
    x0, v = torch.randn(2, 5, 16, generator=gen), torch.randn(2, 5, 16, generator=gen)
    hvps = {}
    for choice in (False, True):
        monkeypatch.setattr(pk, "_CHOICE", choice)
        x = x0.clone().requires_grad_(True)
        with m.fixed_weights():
            (g,) = torch.autograd.grad(m.blocks[0](x).pow(2).sum(), x, create_graph=True)
            (hvps[choice],) = torch.autograd.grad((g * v).sum(), x)
    assert hvps[False].abs().max() > 1e-3
    torch.testing.assert_close(hvps[True], hvps[False], rtol=1e-4, atol=1e-4)


@needs_ops
def test_forward_mode_tangents_and_autocast_keep_mm(packed_on):
    import torch.autograd.forward_ad as fwAD

    from pypattern.models.transformer import affine

    gen = torch.Generator().manual_seed(2)
    x, W, b = _inputs((6,), 8, 5, gen)
    t = torch.randn(6, 8, generator=gen)
    m = _block_model()
    with m.fixed_weights(), fwAD.dual_level():
        y = affine(fwAD.make_dual(x, t), W, b)
        tangent = fwAD.unpack_dual(y).tangent
    torch.testing.assert_close(tangent, t @ W, rtol=1e-5, atol=1e-5)
    with m.fixed_weights(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert affine(x, W, b).dtype == torch.bfloat16  # autocast's cast, as outside the block


@needs_ops
def test_weight_changed_before_the_backward_is_an_error(packed_on):
    from pypattern.models.transformer import affine

    gen = torch.Generator().manual_seed(3)
    x, W, b = _inputs((6,), 8, 5, gen)
    m = _block_model()
    with m.fixed_weights():
        y = affine(x.clone().requires_grad_(True), W, b)
        W.mul_(2.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()


@needs_ops
def test_biases_of_another_width_keep_mm_behaviour(packed_on):
    from pypattern.models.transformer import affine

    gen = torch.Generator().manual_seed(4)
    x, W, _ = _inputs((6,), 8, 5, gen)
    m = _block_model()
    with m.fixed_weights():
        one = torch.randn(1, generator=gen)
        torch.testing.assert_close(affine(x, W, one), x @ W + one, rtol=1e-5, atol=1e-5)  # broadcasts, as mm
        with pytest.raises(RuntimeError, match="must match"):
            affine(x, W, torch.randn(4, generator=gen))


def test_blocks_in_two_threads_keep_their_own_packs(packed_on):
    import threading

    from pypattern.models import transformer as tr

    m = _block_model()
    inside, release, seen = threading.Event(), threading.Event(), []

    def other():
        with m.fixed_weights():
            seen.append(tr._active_packs() is not None)
            inside.set()
            release.wait(10)
        seen.append(tr._active_packs() is None)

    th = threading.Thread(target=other)
    with m.fixed_weights():
        th.start()
        inside.wait(10)
    assert tr._active_packs() is None  # this thread's block ended first; the other thread's is still open
    release.set()
    th.join(10)
    assert seen == [True, True] and tr._active_packs() is None


@needs_ops
def test_nested_blocks_of_another_model_do_not_grow_the_outer_packs(packed_on):
    outer, _, _, _ = _model()
    model, clean, corr, metric = _model(seed=6)
    from pypattern.models import transformer as tr

    with outer.fixed_weights(max_pack_bytes=None):
        sizes = []
        for _ in range(4):
            activation_patching(model, "resid_pre", clean, corr, metric=metric)
            sizes.append((len(tr._active_packs()._packs), tr._active_packs()._bytes))
    assert sizes[1:] == sizes[:-1]  # the inner model's per-call attention layouts are forgotten on exit
    assert sizes[0][0] > 0  # the inner model's own weights are packed in the outer block's cache


def test_narrow_weights_are_charged_at_their_padded_size():
    assert pk._padded_bytes(torch.empty(2048, 3)) == 2048 * 64 * 4
    assert pk._padded_bytes(torch.empty(768, 3072)) == 768 * 3072 * 4
    assert pk._padded_bytes(torch.empty(16, 16)) == 64 * 64 * 4


def test_frozen_fixed_weights_puts_the_flags_back_after_an_error():
    m = _block_model()
    m.requires_grad_(True)
    m.blocks[0].mlp.W_out.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    with pytest.raises(KeyError):
        with pk.frozen_fixed_weights(m):
            assert not any(p.requires_grad for p in m.parameters())
            raise KeyError("boom")
    assert {n: p.requires_grad for n, p in m.named_parameters()} == flags


def test_calibration_times_the_two_products_in_turn():
    """The choice's timing alternates the two products within each round, so a slow moment of the CPU falls on
    both rather than on one of them."""
    calls = []
    best = pk._best_of_interleaved([lambda: calls.append("a"), lambda: calls.append("b")], reps=2, rounds=3)
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 3
    assert len(best) == 2 and all(0 <= t < 1 for t in best)


@pytest.mark.parametrize("choice", [True, False])
@pytest.mark.parametrize("rows", [1, 3, 4, 8, 9, 40])
@pytest.mark.parametrize("tied", [False, True])
def test_unembed_product_equals_the_plain_product(monkeypatch, products, choice, rows, tied):
    """Every form the unembedding's product takes (oneDNN reading W_U in place, h @ W_U, (W_U^T h^T)^T) equals
    h @ W_U, for a weight of its own and for a tied one (the embedding transposed); oneDNN only where chosen."""
    from pypattern.patching.engine import unembed_product

    if choice and not pk._ops_present():
        pytest.skip("this torch has no oneDNN linear ops")
    monkeypatch.setattr(pk, "_CHOICE", choice)
    seen = products
    gen = torch.Generator().manual_seed(rows)
    W = torch.randn(300, 24, generator=gen).t() if tied else torch.randn(24, 300, generator=gen)
    h = torch.randn(rows, 24, generator=gen)
    got = unembed_product(h, W)
    torch.testing.assert_close(got, (h.double() @ W.double()).float(), rtol=1e-5, atol=1e-5)
    assert bool(seen) == (choice and rows >= 4)
    # float64, and a gradient into h: never oneDNN, and the gradient flows
    seen.clear()
    h64 = h.double().requires_grad_(True)
    got64 = unembed_product(h64, W.double())
    torch.testing.assert_close(got64, h64.detach() @ W.double(), rtol=1e-12, atol=1e-12)
    hg = h.clone().requires_grad_(True)
    unembed_product(hg, W).sum().backward()
    torch.testing.assert_close(hg.grad, W.sum(1).expand(rows, -1), rtol=1e-5, atol=1e-5)
    assert not seen


@needs_ops
def test_exact_patching_runs_its_base_runs_through_the_chosen_product(monkeypatch, products):
    """The exact engine's clean and corrupted runs take the same oneDNN products as its patched runs (no gradient
    recorded, the weights held fixed), and the grid is unchanged by it."""
    from pypattern.patching import api

    model, clean, corr, metric = _model()
    monkeypatch.setattr(pk, "_CHOICE", False)
    want = activation_patching(model, "resid_pre", clean, corr, metric=metric, method="naive").values
    monkeypatch.setattr(pk, "_CHOICE", True)
    seen = products
    seen.clear()
    api.prepare_runs(model, ["blocks.0.hook_resid_pre"], clean, corr, metric, None, "denoising", True)
    assert seen
    got = activation_patching(model, "resid_pre", clean, corr, metric=metric).values
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@needs_ops
@pytest.mark.parametrize("defer_base", [False, True])
def test_circuit_runs_take_the_engines_products(monkeypatch, products, defer_base):
    """The circuits engine's recorded runs (clean, corrupted, source) go through the same oneDNN products as its
    patched runs and gradients, and EAP, EAP-IG and an edge patch are unchanged by the path."""
    from pypattern.circuits import edge_attribution, edges, patch_edges
    from pypattern.circuits.engine import prepare_runs

    model, clean, corr, metric = _model()
    graph = edges(model)
    some = graph.edges[::7]
    monkeypatch.setattr(pk, "_CHOICE", False)
    want_eap = edge_attribution(model, clean, corr, metric=metric, method="eap").scores
    want_ig = edge_attribution(model, clean, corr, metric=metric, method="eap-ig", steps=3).scores
    want_patch = patch_edges(model, some, clean, corr, metric=metric)
    monkeypatch.setattr(pk, "_CHOICE", True)
    seen = products
    seen.clear()
    prepare_runs(model, graph, clean, corr, metric, defer_base=defer_base)
    assert seen
    assert all(p.requires_grad for p in model.parameters())  # the freeze is undone
    got_eap = edge_attribution(model, clean, corr, metric=metric, method="eap").scores
    torch.testing.assert_close(got_eap, want_eap, rtol=1e-4, atol=1e-5)
    got_ig = edge_attribution(model, clean, corr, metric=metric, method="eap-ig", steps=3).scores
    torch.testing.assert_close(got_ig, want_ig, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        patch_edges(model, some, clean, corr, metric=metric), want_patch, rtol=1e-4, atol=1e-5
    )


def test_shortlist_and_confirm_makes_its_layouts_once(blocks_made):
    """The confirming stage's recorded runs and engine share one fixed-weights block (one set of attention
    layouts and packs), and its exact effects equal exact patching's."""
    from pypattern.patching.attribution import shortlist_and_confirm

    model, clean, corr, metric = _model()
    made = blocks_made
    rows = shortlist_and_confirm(model, "z", clean, corr, metric=metric, k=3)
    assert len(made) == 2  # attribution patching's block, then the confirming stage's
    grid = activation_patching(model, "z", clean, corr, metric=metric)
    for r in rows:
        want = (grid.values[:, r["layer"], r["head"], r["pos"]] - grid.corrupted).mean()
        assert abs(r["exact"] - float(want)) < 1e-5


@pytest.mark.parametrize("choice", [True, False])
@pytest.mark.parametrize("change", ["optimiser step", "in-place edit", "new parameter"])
def test_weights_changed_inside_a_block_are_laid_out_and_packed_anew(monkeypatch, choice, change):
    """A user's block around many calls that trains between them: the attention's query/key/value layouts and
    the packed copies follow the weights (each forward equals the same model's forward outside any block)."""
    if choice and not pk._ops_present():
        pytest.skip("this torch has no oneDNN linear ops")
    monkeypatch.setattr(pk, "_CHOICE", choice)
    monkeypatch.setattr(pk.PackedWeights, "PACK_AFTER_ROWS", 0)
    model, clean, _, _ = _model(n_key_value_heads=1, positional_embedding_type="rotary")
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    outside = []
    with model.fixed_weights(max_pack_bytes=None):
        for step in range(3):
            with torch.no_grad():
                inside = model(clean)
            with model.fixed_weights(max_pack_bytes=None):  # a call's own (nested) block shares the outer one
                with torch.no_grad():
                    nested = model(clean)
            outside.append((inside, nested))
            attn = model.blocks[step % 2].attn
            if change == "optimiser step":
                opt.zero_grad()
                model(clean, return_type="loss").backward()
                opt.step()
            elif change == "in-place edit":
                with torch.no_grad():
                    attn.W_Q.mul_(-1.5)
                    attn.W_V.add_(0.3)
            else:
                attn.W_K = torch.nn.Parameter(torch.randn_like(attn.W_K))
            with torch.no_grad():
                after = model(clean)
            # the reference: the same weights in a fresh model, no block
            fresh = Transformer(model.cfg)
            fresh.load_state_dict(model.state_dict())
            with torch.no_grad():
                want = fresh(clean)
            torch.testing.assert_close(after, want, rtol=1e-5, atol=1e-5)
            assert (after - inside).abs().max() > 1e-3  # the change moved the logits
    for inside, nested in outside:
        torch.testing.assert_close(nested, inside, rtol=0, atol=0)


@needs_ops
def test_attribution_patching_in_a_users_block_reuses_its_packs(monkeypatch, blocks_made):
    """Many attribution calls in one block held by the caller: one PackedWeights for all of them, the weights
    packed once they have met enough rows, and every call's result equal to a call outside the block."""
    monkeypatch.setattr(pk, "_CHOICE", True)
    monkeypatch.setattr(pk.PackedWeights, "PACK_AFTER_ROWS", 40)  # each weight meets 18 rows per pass here
    model, clean, corr, metric = _model()
    alone = attribution_patching(model, clean, corr, metric=metric, sites=["z", "v"])
    n_alone = len(blocks_made)
    with model.fixed_weights(max_pack_bytes=None):
        packs = blocks_made[-1]
        for _ in range(4):
            got = attribution_patching(model, clean, corr, metric=metric, sites=["z", "v"])
            for site in ("z", "v"):
                torch.testing.assert_close(got[site].values, alone[site].values, rtol=1e-5, atol=1e-6)
        assert len(blocks_made) == n_alone + 1  # the calls' own blocks are nested in the caller's
        assert packs._packs  # weights met over several calls were packed
