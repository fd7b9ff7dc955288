"""Weights changed inside a ``fixed_weights`` block, in every way a user changes them, are never read from a stale
packed copy or layout: each forward inside the block equals a fresh model's forward on the new weights (and the
same model's forward after the block), for a block holding unbounded packs and for the default (no packs)."""

import copy

import pytest
import torch
import torch.nn.utils.parametrize as parametrize

import pypattern.models.packed as pk
from pypattern.models import Transformer, TransformerConfig
from pypattern.models import transformer as tr

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True, params=[True, False], ids=["onednn", "blas"])
def path(request, monkeypatch):
    """The oneDNN path chosen (every product of any size taken through it, every weight packed from its first
    use) or not."""
    if request.param and not pk._ops_present():
        pytest.skip("this torch has no oneDNN linear ops")
    monkeypatch.setattr(pk, "_CHOICE", request.param)
    monkeypatch.setattr(pk.PackedWeights, "PACK_AFTER_ROWS", 0)
    monkeypatch.setattr(pk.PackedWeights, "MIN_MACS", 0)
    return request.param


TOKENS = torch.randint(0, 50, (3, 10), generator=torch.Generator().manual_seed(0))


def _model(seed: int = 0, **kw) -> Transformer:
    cfg = dict(
        n_layers=2, d_model=32, n_heads=4, d_mlp=64, d_vocab=50, n_ctx=16, seed=seed, dtype=torch.float32
    )
    cfg.update(kw)
    return Transformer(TransformerConfig(**cfg))


def _fresh(model: Transformer) -> torch.Tensor:
    """The logits of a new model given ``model``'s weights, outside any block."""
    fresh = Transformer(model.cfg)
    fresh.load_state_dict(model.state_dict())
    fresh.to(next(model.parameters()).dtype)
    with torch.no_grad():
        return fresh(TOKENS)


def _step(opt_cls, **kw):
    def change(m):
        opt = opt_cls(m.parameters(), lr=0.1, **kw)
        m(TOKENS, return_type="loss").backward()
        opt.step()

    return change


def _set_data(m):
    w = m.blocks[0].mlp.W_in
    w.data = torch.randn(w.shape, generator=torch.Generator().manual_seed(1))


def _new_parameter(m):
    attn = m.blocks[1].attn
    attn.W_O = torch.nn.Parameter(torch.randn(attn.W_O.shape, generator=torch.Generator().manual_seed(2)))


def _in_place(m):
    with torch.no_grad():
        m.blocks[0].attn.W_Q.mul_(-2.0)
        m.blocks[1].mlp.W_out.mul_(3.0)


def _requires_grad_flip(m):
    for p in m.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        m.blocks[0].mlp.W_in.add_(0.5)
    m(TOKENS)
    for p in m.parameters():
        p.requires_grad_(True)
    with torch.no_grad():
        m.blocks[0].mlp.W_in.mul_(-1.0)


def _scaled(m):
    class Scale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.s = torch.nn.Parameter(torch.tensor(2.0))

        def forward(self, X):
            return X * self.s

    parametrize.register_parametrization(m.blocks[0].mlp, "W_in", Scale())
    with torch.no_grad():
        m(TOKENS)
        m.blocks[0].mlp.parametrizations.W_in[0].s.mul_(-3.0)


CHANGES = {
    "adam": _step(torch.optim.Adam),
    "adamw foreach": _step(torch.optim.AdamW, foreach=True),
    "adamw fused": _step(torch.optim.AdamW, fused=True),
    "adam fused": _step(torch.optim.Adam, fused=True),
    "sgd fused": _step(torch.optim.SGD, fused=True),
    "adagrad fused": _step(torch.optim.Adagrad, fused=True),
    "in place under no_grad": _in_place,
    "load_state_dict": lambda m: m.load_state_dict(_model(seed=7).state_dict()),
    "load_state_dict assign": lambda m: m.load_state_dict(_model(seed=8).state_dict(), assign=True),
    "p.data = t": _set_data,
    "new parameter": _new_parameter,
    "half then float": lambda m: m.half().float(),
    "float64": lambda m: m.to(torch.float64),
    "requires_grad flips": _requires_grad_flip,
    "parametrization": _scaled,
}


@pytest.mark.parametrize("bound", [None, 0], ids=["packed", "default"])
@pytest.mark.parametrize("change", list(CHANGES))
def test_weights_changed_inside_a_block_are_never_read_stale(change, bound):
    model = _model()
    with model.fixed_weights(max_pack_bytes=bound):
        with torch.no_grad():
            before = model(TOKENS)
            model(TOKENS)  # every weight laid out, and packed on the oneDNN path
        CHANGES[change](model)
        with torch.no_grad():
            inside = model(TOKENS)
            with model.fixed_weights(max_pack_bytes=bound):  # a nested block shares the outer one's copies
                nested = model(TOKENS)
    with torch.no_grad():
        after = model(TOKENS)
    if change == "parametrization":  # no state_dict of the plain model: the same weights, no block
        want = after
        plain = copy.deepcopy(model)
        parametrize.remove_parametrizations(plain.blocks[0].mlp, "W_in")
        with torch.no_grad():
            torch.testing.assert_close(plain(TOKENS), want, rtol=0, atol=0)
    else:
        want = _fresh(model)
        torch.testing.assert_close(after, want, rtol=0, atol=0)
    # the change moved the logits (rounding to 16 bits by about 1e-3; a cast to float64 by rounding only)
    moved = {"half then float": 1e-4, "float64": 0.0}.get(change, 1e-2)
    assert (want.double() - before.double()).abs().max() > moved
    tol = 1e-10 if want.dtype == torch.float64 else 1e-5
    torch.testing.assert_close(inside, want, rtol=tol, atol=tol)
    torch.testing.assert_close(nested, want, rtol=tol, atol=tol)


def test_a_fused_step_advances_the_parameters_version():
    """Fused optimiser kernels write the parameters without advancing their version counters; inside a block the
    step advances them, as the foreach and per-tensor steps do (so a graph saved before the step refuses its
    backward, by autograd's in-place error, instead of using the old weights)."""
    model = _model()
    with model.fixed_weights():
        opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
        w = model.blocks[0].mlp.W_in
        before = w._version
        model(TOKENS, return_type="loss").backward()
        opt.step()
        assert w._version > before
        loss = model(TOKENS, return_type="loss")
        opt.step()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


@pytest.mark.parametrize("bound", [None, 0], ids=["packed", "default"])
def test_weight_gradients_inside_a_block_equal_plain_ones(bound):
    model = _model(seed=3)
    plain = copy.deepcopy(model)
    plain(TOKENS, return_type="loss").backward()
    with model.fixed_weights(max_pack_bytes=bound):
        with torch.no_grad():
            model(TOKENS)
            model(TOKENS)  # packed before the weights take gradients
        model(TOKENS, return_type="loss").backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_an_error_inside_a_block_releases_its_packs_and_layouts():
    model = _model()
    with pytest.raises(KeyError):
        with model.fixed_weights(max_pack_bytes=None):
            with torch.no_grad():
                model(TOKENS)
            with model.fixed_weights():
                raise KeyError("inner")
    assert tr._active_packs() is None
    assert all("_layouts" not in blk.attn.__dict__ for blk in model.blocks)
    with torch.no_grad():
        model.blocks[0].attn.W_Q.data.mul_(2.0)  # outside any block, even ``.data`` edits are seen
        torch.testing.assert_close(model(TOKENS), _fresh(model), rtol=0, atol=0)


def test_tied_embeddings_changed_inside_a_block():
    model = _model(tie_word_embeddings=True)
    with model.fixed_weights(max_pack_bytes=None), torch.no_grad():
        model(TOKENS)
        model.embed.W_E.mul_(-2.0)
        inside = model(TOKENS)
    torch.testing.assert_close(inside, _fresh(model), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_models_inside_a_block_equal_plain_runs(dtype):
    model = _model(dtype=dtype)
    with torch.no_grad():
        want = model(TOKENS)
        with model.fixed_weights(max_pack_bytes=None):
            got = model(TOKENS)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_meta_models_run_inside_a_block():
    model = _model().to("meta")
    with model.fixed_weights(max_pack_bytes=None), torch.no_grad():
        out = model(TOKENS.to("meta"))
    assert out.device.type == "meta" and out.shape == (3, 10, 50)
