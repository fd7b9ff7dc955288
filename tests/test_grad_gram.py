"""Per-sample gradient Gram: every backend (on its device's tensors, see tests/_backend_cases.py) and method
against materialised per-sample gradients, and the model-level hook helper against torch.func vmap(grad)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from _backend_cases import backend_devices, to
from _triton_aot import assert_compiles_for_gpus
from torch import nn

import pypattern
from pypattern.gram import (
    default_sites,
    gram_parameters,
    per_sample_grad_gram,
    per_sample_grad_gram_reference,
    transformer_lens_sites,
)
from pypattern.ops.grad_gram import (
    center_gram,
    choose_method,
    grad_gram_dense,
    grad_gram_embedding,
    grad_gram_embedding_reference,
    grad_gram_linear,
    grad_gram_linear_reference,
    grad_gram_pairwise,
)

BACKENDS = backend_devices("grad_gram_pairwise")
TOL = {torch.float32: 2e-6, torch.float64: 1e-13}


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.cpu(), y.cpu()
    return float((x - y).abs().max() / y.abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(7, 1, 20, 9), (5, 3, 17, 33), (3, 32, 6, 5), (4, 0, 5, 3)])
def test_linear_pairwise_vs_materialised(backend, device, dtype, shape):
    b, t, d_in, d_out = shape
    a = torch.randn(b, t, d_in, dtype=dtype)
    d = torch.randn(b, t, d_out, dtype=dtype)
    for bias in (True, False):
        ref = grad_gram_linear_reference(a, d, bias=bias)
        got = grad_gram_linear(*to(device, a, d), bias=bias, method="pairwise", backend=backend)
        assert got.dtype == torch.float64 and got.shape == (b, b) and got.device.type == device
        if t == 0:
            assert (got == 0).all()
        else:
            assert _rel(got, ref) < TOL[dtype]
            torch.testing.assert_close(got, got.T, rtol=TOL[dtype], atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dense_gram_equals_matmul(dtype):
    w = torch.randn(300, 7, dtype=dtype)  # more rows than one block of 128: off-diagonal blocks are mirrored
    got = grad_gram_dense(w)
    assert got.dtype == torch.float64 and got.shape == (300, 300)
    assert _rel(got, w.double() @ w.double().T) < TOL[dtype]
    with pytest.raises(ValueError, match="g must be a 2-D tensor"):
        grad_gram_dense(torch.randn(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_outer_and_auto(dtype):
    a = torch.randn(6, 9, 12, dtype=dtype)
    d = torch.randn(6, 9, 4, dtype=dtype)
    ref = grad_gram_linear_reference(a, d)
    # a tiny workspace forces several slices of the input features
    assert _rel(grad_gram_linear(a, d, method="outer", max_bytes=200), ref) < TOL[dtype]
    assert _rel(grad_gram_linear(a, d), ref) < TOL[dtype]
    # (B, d) inputs are one position
    a2, d2 = torch.randn(8, 5, dtype=dtype), torch.randn(8, 3, dtype=dtype)
    assert _rel(grad_gram_linear(a2, d2), grad_gram_linear_reference(a2[:, None], d2[:, None])) < TOL[dtype]


def test_method_choice_by_flops():
    assert choose_method(512, 1, 1024, 1024) == "pairwise"
    assert choose_method(8, 512, 16, 16) == "outer"  # long sequences through a narrow layer


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", ["pairwise", "auto"])
def test_embedding_vs_materialised(backend, device, dtype, method):
    ids = torch.randint(0, 7, (5, 6))
    ids[0, :3] = 0  # padding positions
    ids[1] = ids[2]  # repeated tokens across samples
    d = torch.randn(5, 6, 8, dtype=dtype)
    for pad in (None, 0):
        ref = grad_gram_embedding_reference(ids, d, num_embeddings=7, padding_idx=pad)
        got = grad_gram_embedding(*to(device, ids, d), padding_idx=pad, method=method, backend=backend)
        assert _rel(got, ref) < TOL[dtype]


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_pairwise_whole_tile_path(backend, device):
    # T a multiple of the Triton/CUDA tile: each tile lies in one sample pair
    x, y = torch.randn(3 * 64, 5), torch.randn(3 * 64, 4)
    ref = grad_gram_linear_reference(x.reshape(3, 64, 5), y.reshape(3, 64, 4), bias=False)
    assert _rel(grad_gram_pairwise(*to(device, x, y), batch=3, backend=backend), ref) < 2e-6


class _SeqNet(nn.Module):
    """Embedding -> Linear -> LayerNorm -> a Linear used twice (shared) -> unembedding, per-token outputs."""

    def __init__(self, vocab=11, d=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.l1 = nn.Linear(d, 2 * d)
        self.ln = nn.LayerNorm(2 * d)
        self.l2 = nn.Linear(2 * d, 2 * d, bias=False)
        self.out = nn.Linear(2 * d, vocab)

    def forward(self, ids):
        h = torch.tanh(self.l1(self.emb(ids)))
        h = self.ln(h)
        h = h + self.l2(h)
        return self.out(self.l2(torch.relu(h)))


def _seq_loss(model, ids, targets):
    logits = model(ids)
    return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, T) per token


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_model_sequences_and_embeddings_vs_vmap(backend, device):
    torch.manual_seed(1)
    net = _SeqNet().double().to(device)
    ids, targets = to(device, torch.randint(0, 11, (6, 5)), torch.randint(0, 11, (6, 5)))
    ref = per_sample_grad_gram_reference(net, _seq_loss, ids, targets)
    got = per_sample_grad_gram(net, _seq_loss, ids, targets, backend=backend)
    assert _rel(got, ref) < 1e-12
    cref = per_sample_grad_gram_reference(net, _seq_loss, ids, targets, centered=True)
    assert (
        _rel(per_sample_grad_gram(net, _seq_loss, ids, targets, centered=True, backend=backend), cref) < 1e-11
    )
    # parameters' .grad untouched
    assert all(p.grad is None for p in net.parameters())


class _TiedNet(nn.Module):
    """An embedding whose weight the unembedding reuses (with or without a bias of its own), a padding row."""

    def __init__(self, bias: bool, padding_idx):
        super().__init__()
        self.unembed = nn.Linear(6, 11, bias=bias)  # registered first: the tie is found in either order
        self.embed = nn.Embedding(11, 6, padding_idx=padding_idx)
        self.mix = nn.Linear(6, 6)
        self.ln = nn.LayerNorm(6)
        self.unembed.weight = self.embed.weight

    def forward(self, ids):
        return self.unembed(self.ln(torch.tanh(self.mix(self.embed(ids)))))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("padding_idx", [None, 2])
def test_an_unembedding_tied_to_the_embedding_vs_per_sample_autograd(bias, padding_idx):
    """The tied weight's per-sample gradient is the sum of its two uses' (cross terms included): the Gram equals
    the per-sample autograd loop's, on float64 and float32, centred too; the bias stays a site of its own."""
    torch.manual_seed(3)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        net = _TiedNet(bias, padding_idx).to(dtype)
        ids, targets = torch.randint(0, 11, (6, 5)), torch.randint(0, 11, (6, 5))
        ids[0, 1] = 2
        ref = per_sample_grad_gram_reference(net, _seq_loss, ids, targets)
        got = per_sample_grad_gram(net, _seq_loss, ids, targets)
        assert _rel(got, ref) < tol, dtype
        cref = per_sample_grad_gram_reference(net, _seq_loss, ids, targets, centered=True)
        assert _rel(per_sample_grad_gram(net, _seq_loss, ids, targets, centered=True), cref) < 10 * tol
    names = {pn for st in default_sites(net) for pn in st.params if pn is not None}
    assert "unembed.weight" not in names and ("unembed.bias" in names) == bias
    assert [st.tied for st in default_sites(net) if st.name == "embed"] == [
        (("unembed", "output"), ("unembed", "input"))
    ]


def test_model_mlp_float32_per_module_and_frozen():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(10, 32), nn.GELU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    net[2].bias.requires_grad_(False)
    net[0].weight.requires_grad_(False)
    x, y = torch.randn(9, 10), torch.randint(0, 3, (9,))

    def loss(m, x, y):
        return F.cross_entropy(m(x), y, reduction="none")

    ref = per_sample_grad_gram_reference(net, loss, x, y)
    parts = per_sample_grad_gram(net, loss, x, y, per_module=True)
    assert set(parts) == {"0", "2", "4"}
    total = sum(parts.values())
    assert _rel(total, ref) < 1e-5
    # restricting the modules restricts the parameters
    only = per_sample_grad_gram(net, loss, x, y, modules=["4"])
    assert _rel(only, per_sample_grad_gram_reference(net, loss, x, y, modules=["4"])) < 1e-5
    # the centred Gram is the Gram of centred gradients
    torch.testing.assert_close(
        center_gram(total).sum(0), torch.zeros(9, dtype=torch.float64), atol=1e-9, rtol=0
    )


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("d_mlp", [32, None])
def test_whole_transformer_lens_model_vs_vmap(backend, device, d_mlp):
    # every parameter of a TransformerLens-layout transformer: embeddings, LayerNorms, Q/K/V/O, MLP, unembedding
    from pypattern.models import Transformer, TransformerConfig

    cfg = TransformerConfig(
        n_layers=2,
        d_model=16,
        n_heads=2,
        d_head=8,
        d_mlp=d_mlp,
        d_vocab=10,
        n_ctx=6,
        dtype=torch.float64,
        seed=0,
    )
    model = Transformer(cfg).to(device)
    tokens = torch.randint(0, 10, (5, 6), device=device)
    sites = transformer_lens_sites(model)
    assert set(gram_parameters(model, sites=sites)) == {n for n, _ in model.named_parameters()}

    def loss(m, t):
        return m(t, return_type="per_token_loss")

    ref = per_sample_grad_gram_reference(model, loss, tokens, sites=sites)
    # "pairwise" runs every linear and embedding site through the backend; "auto" and "outer" use BLAS forms
    for method in ("pairwise", "auto", "outer"):
        got = per_sample_grad_gram(model, loss, tokens, sites=sites, method=method, backend=backend)
        assert got.device.type == device and _rel(got, ref) < 1e-12, method


def test_mean_loss_is_rejected_and_errors_name_things():
    net = nn.Linear(4, 2)
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="per-sample losses"):
        per_sample_grad_gram(net, lambda m, x: m(x).pow(2).mean(), x)
    with pytest.raises(ValueError, match="not a submodule"):
        per_sample_grad_gram(net, lambda m, x: m(x).sum(1), x, modules=["nope"])
    with pytest.raises(ValueError, match="batch"):
        flat = nn.Sequential(nn.Flatten(0, 1), nn.Linear(4, 2))
        per_sample_grad_gram(flat, lambda m, x: m(x).sum(1)[:3], torch.randn(3, 2, 4))
    with pytest.raises(NotImplementedError, match="tied"):  # two linear maps sharing a weight
        a, b = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
        b.weight = a.weight
        per_sample_grad_gram(nn.ModuleList([a, b]), lambda m, x: m[1](m[0](x)).sum(1), torch.randn(2, 4))
    with pytest.raises(NotImplementedError, match="tied to more than one linear map"):
        emb, l1, l2 = nn.Embedding(5, 4), nn.Linear(4, 5, bias=False), nn.Linear(4, 5, bias=False)
        l1.weight = l2.weight = emb.weight
        per_sample_grad_gram(
            nn.ModuleList([emb, l1, l2]),
            lambda m, i: (m[1](m[0](i)) + m[2](m[0](i))).sum((1, 2)),
            torch.tensor([[1]]),
        )
    with pytest.raises(ValueError, match="a and d must agree"):
        grad_gram_linear(torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="method"):
        grad_gram_linear(torch.randn(3, 4), torch.randn(3, 4), method="fast")


def test_model_level_names_moved_out_of_the_ops_layer():
    """The model-walking helpers live in pypattern.gram; the old ops paths still resolve them, with a warning."""
    import pypattern.gram
    import pypattern.ops
    import pypattern.ops.grad_gram

    for mod in (pypattern.ops, pypattern.ops.grad_gram):
        with pytest.warns(DeprecationWarning, match="moved to pypattern.gram.per_sample_grad_gram"):
            assert mod.per_sample_grad_gram is pypattern.gram.per_sample_grad_gram
        with pytest.raises(AttributeError, match="no attribute 'nope'"):
            mod.nope  # noqa: B018
    assert pypattern.per_sample_grad_gram is pypattern.gram.per_sample_grad_gram
    assert pypattern.GramSite is pypattern.gram.GramSite and pypattern.center_gram is center_gram


def _imports(path, package: str):
    """Absolute names of the modules (or module attributes) that a source file imports."""
    import ast

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = node.module if not node.level else ".".join(parts[: len(parts) - node.level + 1])
            if node.level and node.module:
                base = f"{base}.{node.module}"
            yield from (f"{base}.{a.name}" for a in node.names)


def test_ops_layer_imports_nothing_above_it():
    """An op imports torch, triton, its own folder, the other ops and pypattern._backends; never an estimator or
    model code (the moved-name shim resolves pypattern.gram by name, on access, not by an import statement)."""
    import pathlib

    root = pathlib.Path(pypattern.__file__).parent
    files = sorted((root / "ops").rglob("*.py"))
    assert len(files) >= 13
    for f in files:
        package = ".".join(("pypattern",) + f.relative_to(root).parts[:-1])
        for name in _imports(f, package):
            if name.startswith("pypattern"):
                assert name.startswith(("pypattern.ops.", "pypattern._backends")), f"{f} imports {name}"


_AOT = """
import sys
sys.path.insert(0, TESTS_DIR)
import torch
from _triton_binder import compile_recorded, recording
import pypattern.ops.grad_gram.triton as gt

# the wrapper's own launches, specialised as Triton's GPU launcher would (an int equal to 1 becomes a constexpr,
# ints divisible by 16 are marked): rows, features, T and B of 1, 2 and multiples of 16; with x and with ids
for dtype in (torch.float32, torch.float64):
    for rows, batch, p, q, use_ids in ((1, 1, 1, 1, False), (4, 2, 2, 3, False), (64, 2, 16, 32, True),
                                       (2, 2, 1, 2, True)):
        x = torch.randn(rows, p, dtype=dtype)
        y = torch.randn(rows, q, dtype=dtype)
        ids = torch.arange(rows) % 3 if use_ids else None
        with recording(gt, "_pairwise_kernel") as rec:
            gt.grad_gram_pairwise_triton(None if use_ids else x, y, ids, batch)
        compile_recorded(rec, archs=(80, 90) if (rows, dtype) == (4, torch.float32) else (80,))
print("ok")
""".replace("TESTS_DIR", repr(os.path.dirname(os.path.abspath(__file__))))


def test_triton_kernel_compiles_for_gpus():
    """The interpreter accepts more than the GPU compiler: compile the wrapper's launches to sm_80/sm_90 cubin,
    specialised as Triton's GPU launcher would (no GPU needed; a separate process, since the interpreter patches
    triton.language)."""
    assert_compiles_for_gpus(_AOT)


@pytest.mark.parametrize(
    "option",
    [
        dict(n_experts=2, experts_per_token=1, gated_mlp=True, act_fn="silu", mlp_bias=False),
    ],
)
def test_transformer_lens_sites_refuse_parts_they_do_not_cover(option):
    """Mixtures of experts (whose expert weights no hook sees apart) are refused by name, by the sites and by the
    Gram's default (never a Gram over the wrong tensors); the vmap reference covers such a model whole."""
    from pypattern.models import Transformer, TransformerConfig

    model = Transformer(
        TransformerConfig(n_layers=1, d_model=8, n_heads=2, d_mlp=16, d_vocab=11, n_ctx=6, **option)
    )
    with pytest.raises(NotImplementedError, match=next(iter(option))):
        transformer_lens_sites(model)
    t = torch.randint(0, 11, (3, 6), generator=torch.Generator().manual_seed(0))

    def lf(m, x):
        return m(x, return_type="per_token_loss").sum(-1)

    with pytest.raises(NotImplementedError, match=next(iter(option))):
        per_sample_grad_gram(model, lf, t)
    model = model.double()  # the reference covers the whole model there
    assert _rel(per_sample_grad_gram_reference(model, lf, t), _naive_gram(model, lf, t)) < 1e-12


_NATIVE_ARCHS = {
    # Llama-like: RMSNorm (computed in float32), gated MLP, grouped-query attention, rotary, no biases, tied
    "rms_gated_gqa_tied": dict(
        normalization_type="RMS",
        gated_mlp=True,
        act_fn="silu",
        n_key_value_heads=1,
        positional_embedding_type="rotary",
        attn_bias=False,
        attn_out_bias=False,
        mlp_bias=False,
        unembed_bias=False,
        tie_word_embeddings=True,
        norm_dtype=torch.float32,
    ),
    # a tied unembedding with its own bias, a padding row the lookup gives no gradient, Gemma's weight offset
    "tied_bias_padding_offset": dict(
        normalization_type="RMS",
        norm_weight_offset=1.0,
        tie_word_embeddings=True,
        unembed_bias=True,
        padding_idx=3,
    ),
    # Nemotron's LayerNorm1P: LayerNorms multiplying by 1 + w
    "offset_layernorm": dict(normalization_type="LN", norm_weight_offset=1.0),
    # GPT-J / Phi: one norm read by parallel attention and MLP
    "parallel_shared_norm": dict(parallel_attn_mlp=True, parallel_shared_norm=True),
    # GPT-NeoX: parallel attention and MLP, each with its own norm
    "parallel_two_norms": dict(parallel_attn_mlp=True),
    # norms without weights; attention only
    "lnpre_attn_only": dict(normalization_type="LNPre", d_mlp=None),
    # Qwen3: per-head query/key norms; OLMo 2: all-head query/key norms, norms after the sublayers only
    "qk_norm_per_head": dict(normalization_type="RMS", qk_norm=True, n_key_value_heads=1),
    "qk_norm_all_post_norms": dict(
        normalization_type="RMS", qk_norm="all", pre_norms=False, use_normalization_before_and_after=True
    ),
    # Gemma 3: sandwich norms, a scaled tied embedding; Granite: residual multipliers; BLOOM: an embedding norm
    "sandwich_scaled_tied": dict(
        normalization_type="RMS",
        norm_weight_offset=1.0,
        use_normalization_before_and_after=True,
        embed_scale=3.5,
        tie_word_embeddings=True,
    ),
    "residual_multiplier": dict(residual_multiplier=0.6, embed_scale=2.0),
    "embedding_layernorm_tied": dict(post_embedding_ln=True, tie_word_embeddings=True, padding_idx=3),
    # Gemma 2: capped logits of a tied unembedding; Granite: scaled logits, with and without a cap
    "capped_tied": dict(output_logits_soft_cap=2.0, tie_word_embeddings=True),
    "scaled_capped": dict(output_logits_soft_cap=1.5, logits_scaling=3.0, unembed_bias=True),
    "scaled_tied": dict(logits_scaling=0.5, tie_word_embeddings=True),
    # OLMo: clamped query, key and value projections (here with query/key norms too)
    "clipped": dict(clip_qkv=0.2),
    "clipped_qk_norm": dict(clip_qkv=0.2, qk_norm=True, normalization_type="RMS"),
}


@pytest.mark.parametrize(
    "arch, workspace",
    [(a, None) for a in sorted(_NATIVE_ARCHS)]
    + [(a, 1) for a in sorted(_NATIVE_ARCHS) if _NATIVE_ARCHS[a].get("tie_word_embeddings")],
)
def test_gram_of_every_architecture_covers_the_whole_model(arch, workspace, monkeypatch):
    """The Gram's default on pypattern's Transformer covers every trainable parameter (tied weights once, their
    two uses' cross terms included, also one sample at a time) and equals one backward per sample and the vmap
    reference, in float64."""
    import pypattern.gram as gram_mod
    from pypattern.models import Transformer, TransformerConfig

    if workspace is not None:  # the tied weights' cross terms one sample at a time
        monkeypatch.setattr(gram_mod, "TIED_WORKSPACE_BYTES", workspace)

    opts = dict(_NATIVE_ARCHS[arch])
    d_mlp = opts.pop("d_mlp", 20)
    model = Transformer(
        TransformerConfig(
            n_layers=2, d_model=12, n_heads=3, d_head=4, d_mlp=d_mlp, d_vocab=13, n_ctx=8, seed=1, **opts
        )
    ).double()
    with torch.no_grad():  # weights away from their initial values (norm gains of 1, zero biases)
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    tokens = torch.randint(0, 13, (5, 7), generator=torch.Generator().manual_seed(0))
    tokens[1, 2] = tokens[3, 0] = 3  # the padding id where there is one

    def lf(m, t):
        return m(t, return_type="per_token_loss").sum(-1)

    assert set(gram_parameters(model)) == {n for n, _ in model.named_parameters()}
    if model.cfg.clip_qkv is not None:  # the clamp holds some entries and passes others
        _, cache = model.run_with_cache(tokens)
        v = cache["blocks.0.attn.hook_v"].abs()
        assert bool((v == model.cfg.clip_qkv).any()) and bool((v < model.cfg.clip_qkv).any())
    naive = _naive_gram(model, lf, tokens)
    got = per_sample_grad_gram(model, lf, tokens)
    assert _rel(got, naive) < 1e-12
    assert _rel(per_sample_grad_gram_reference(model, lf, tokens), naive) < 1e-12
    parts = per_sample_grad_gram(model, lf, tokens, per_module=True)
    assert _rel(sum(parts.values()), naive) < 1e-12
    if (
        model.cfg.tie_word_embeddings
    ):  # the cross terms are there: the embedding alone is not the sum of its uses
        assert "unembed.W_U" not in dict(model.named_parameters())
        assert _rel(parts["embed"], naive) > 1e-6


def test_an_in_place_op_after_a_module_does_not_change_its_gradient():
    """``ReLU(inplace=True)`` overwrites the first Linear's output after the hook recorded it: the Gram is still
    the per-sample gradient Gram (equal to the reference and to the out-of-place model's)."""
    from pypattern.gram import per_sample_grad_gram, per_sample_grad_gram_reference

    torch.manual_seed(0)
    grams = []
    for inplace in (False, True):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(5, 7), nn.ReLU(inplace=inplace), nn.Linear(7, 3)).double()
        x = torch.randn(6, 5, dtype=torch.float64)
        y = torch.randint(0, 3, (6,))

        def loss(m, x, y):
            return nn.functional.cross_entropy(m(x), y, reduction="none")

        g = per_sample_grad_gram(net, loss, x, y)
        torch.testing.assert_close(g, per_sample_grad_gram_reference(net, loss, x, y), rtol=1e-10, atol=1e-12)
        grams.append(g)
    torch.testing.assert_close(grams[1], grams[0], rtol=1e-12, atol=1e-14)


def test_no_site_over_a_trainable_parameter_is_refused():
    from pypattern.gram import per_sample_grad_gram

    net = nn.Sequential(nn.Linear(3, 2)).double()
    for p in net.parameters():
        p.requires_grad_(False)
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="no site covers a parameter that requires grad"):
        per_sample_grad_gram(net, lambda m, x: m(x).sum(1), x)


def test_gram_without_sites_on_pypattern_transformer_covers_it_whole():
    """No sites and no modules on pypattern's Transformer: both the Gram and its reference cover every parameter
    (the TransformerLens-layout sites), where nn.Linear-based default sites would cover none."""
    m = pypattern.Transformer(
        n_layers=1, d_model=8, n_heads=2, d_mlp=8, d_vocab=7, n_ctx=5, dtype=torch.float64
    )
    t = torch.randint(0, 7, (3, 5), generator=torch.Generator().manual_seed(0))

    def lf(mod, x):
        return mod(x, return_type="per_token_loss").mean(1)

    naive = _naive_gram(m, lf, t)
    assert _rel(per_sample_grad_gram_reference(m, lf, t), naive) < 1e-12
    assert _rel(per_sample_grad_gram(m, lf, t), naive) < 1e-12


def test_gram_inputs_negative_ids_and_half_precision_refused_by_name():
    from pypattern.ops.grad_gram import grad_gram_embedding, grad_gram_linear

    with pytest.raises(ValueError, match="ids must be token ids >= 0, got -1"):
        grad_gram_embedding(torch.tensor([[-1, 2]]), torch.ones(1, 2, 3))
    a, d = torch.randn(4, 3, dtype=torch.float16), torch.randn(4, 2, dtype=torch.float16)
    for method in ("auto", "outer", "pairwise"):
        with pytest.raises(TypeError, match="a has dtype torch.float16"):
            grad_gram_linear(a, d, method=method)
    with pytest.raises(TypeError, match="d has dtype torch.bfloat16"):
        grad_gram_embedding(torch.tensor([[1, 2]]), torch.ones(1, 2, 3, dtype=torch.bfloat16))
    from pypattern.gram import per_sample_grad_gram

    model = torch.nn.Sequential(torch.nn.Linear(3, 2)).to(torch.bfloat16)
    with pytest.raises(TypeError, match="parameter '0.weight' has dtype torch.bfloat16"):
        per_sample_grad_gram(
            model, lambda m, x: m(x).float().sum(-1), torch.randn(4, 3, dtype=torch.bfloat16)
        )


def test_linear_gram_pairs_positions_and_dtypes_as_given():
    from pypattern.ops.grad_gram import grad_gram_embedding, grad_gram_linear

    a, d = torch.randn(4, 2, 3, 5), torch.randn(4, 3, 2, 6)  # 6 positions each, in other layouts
    with pytest.raises(ValueError, match="must agree in batch and positions"):
        grad_gram_linear(a, d)
    with pytest.raises(TypeError, match="a has dtype torch.float32 but d has torch.float64"):
        grad_gram_linear(torch.randn(4, 3), torch.randn(4, 2, dtype=torch.float64))
    for bad in (2.5, True, -1, 10**30):
        with pytest.raises(ValueError, match="padding_idx=.* is not valid"):
            grad_gram_embedding(torch.tensor([[1, 2]]), torch.ones(1, 2, 3), padding_idx=bad)


def test_float32_products_that_overflow_are_an_error_not_nan():
    from pypattern.ops import grad_gram_pairwise

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 3, generator=g) * 1e20, torch.randn(6, 3, generator=g)
    want = grad_gram_pairwise(x.double(), y.double(), batch=2, backend="reference")
    assert torch.isfinite(want).all()
    with pytest.raises(FloatingPointError, match="products overflow"):
        grad_gram_pairwise(x, y, batch=2, backend="cpp")


def test_dense_gram_overflow_is_an_error_as_in_the_other_kernels():
    """grad_gram_dense of finite float32 / float16 rows whose products overflow their dtype raises as
    grad_gram_linear does for the same products, instead of returning inf; float64 and products that fit are
    unchanged, and a row that already holds inf is not blamed on the products."""
    from pypattern.ops import grad_gram_dense

    g = torch.full((2, 3), 1e20)
    assert torch.isfinite(grad_gram_dense(g.double())).all()
    with pytest.raises(FloatingPointError, match=r"grad_gram_dense: the torch.float32 products overflow"):
        grad_gram_dense(g)
    with pytest.raises(FloatingPointError, match=r"grad_gram_linear: the torch.float32 products overflow"):
        grad_gram_linear(g, torch.ones(2, 1), bias=False, method="outer")
    with pytest.raises(FloatingPointError, match=r"grad_gram_dense: the torch.float16 products overflow"):
        grad_gram_dense(torch.full((2, 3), 300.0, dtype=torch.float16))
    small = torch.randn(3, 5)
    torch.testing.assert_close(
        grad_gram_dense(small), small.double() @ small.double().T, rtol=1e-6, atol=1e-6
    )
    assert torch.isinf(grad_gram_dense(torch.tensor([[float("inf"), 1.0]]))).all()


def _naive_gram(model, loss_fn, x):
    """Per-sample gradients over every trainable parameter, one backward per sample, and their Gram."""
    ps = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        gs = torch.autograd.grad(loss_fn(model, x[i : i + 1]).sum(), ps, allow_unused=True)
        rows.append(
            torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(gs, ps)])
        )
    r = torch.stack(rows).double()
    return r @ r.T


def test_default_sites_that_leave_out_trainable_weights_are_refused_and_converted_models_are_covered():
    """A model may hold weights the default sites do not know (a convolution): the Gram over them is refused naming
    those parameters, not computed over the rest. A raw GPT-2 is covered (its Conv1D projections, its positions
    looked up once for the batch), equal to one backward per sample. A raw Llama's RMSNorm weights are covered (float32
    normalisation inside the float64 model), the Gram equal to one backward per sample; with the norms frozen, the
    rest. A converted GPT-NeoX (no unembedding bias, untied) is covered whole by transformer_lens_sites, equal to
    one backward per sample."""
    transformers = pytest.importorskip("transformers")
    from pypattern.gram import transformer_lens_sites

    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(vocab_size=30, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    ).double()  # fmt: skip
    x = torch.randint(0, 30, (3, 5), generator=torch.Generator().manual_seed(0))

    def hf_loss(model, t):
        logits = model(t).logits[:, :-1]
        return (
            F.cross_entropy(logits.flatten(0, 1), t[:, 1:].flatten(), reduction="none")
            .view(len(t), -1)
            .sum(1)
        )

    assert "model.layers.0.input_layernorm.weight" in gram_parameters(llama)
    assert _rel(per_sample_grad_gram(llama, hf_loss, x), _naive_gram(llama, hf_loss, x)) < 1e-12
    gpt2 = (
        transformers.GPT2LMHeadModel(
            transformers.GPT2Config(vocab_size=30, n_embd=16, n_layer=1, n_head=2, n_positions=16)
        )
        .eval()
        .double()
    )
    conv = nn.Sequential(nn.Conv1d(2, 3, 1), nn.Flatten(), nn.Linear(3 * 4, 1)).double()
    with pytest.raises(
        ValueError, match=r"leave out 2 trainable parameters \(\['0.weight', '0.bias'\]; e.g. a convolution"
    ):
        per_sample_grad_gram(conv, lambda m, z: m(z).squeeze(-1), torch.randn(3, 2, 4, dtype=torch.float64))
    # its Conv1D projections are linear sites, its learned positions (looked up once for the whole batch) a
    # positional site read where they are added to each sample's token embeddings
    torch.testing.assert_close(
        per_sample_grad_gram(gpt2, hf_loss, x, check=True),
        _naive_gram(gpt2, hf_loss, x),
        rtol=1e-10,
        atol=1e-12,
    )
    blocks = ["transformer.h.0.attn.c_attn.weight", "transformer.h.0.mlp.c_proj.bias"]
    assert all(n in gram_parameters(gpt2, modules=["transformer.h"]) for n in blocks)
    frozen = {n: p.requires_grad_(n.startswith("transformer.h.")) for n, p in gpt2.named_parameters()}
    assert sum(p.requires_grad for p in frozen.values()) == 12  # the layer's Conv1D weights, biases and norms
    torch.testing.assert_close(
        per_sample_grad_gram(gpt2, hf_loss, x, modules=["transformer.h"]),
        _naive_gram(gpt2, hf_loss, x),
        rtol=1e-10,
        atol=1e-12,
    )
    for p in llama.parameters():
        p.requires_grad_(isinstance(p, nn.Parameter) and p.dim() == 2)  # the norms frozen: covered as asked
    torch.testing.assert_close(per_sample_grad_gram(llama, hf_loss, x), _naive_gram(llama, hf_loss, x))
    torch.manual_seed(0)
    neox = transformers.GPTNeoXForCausalLM(
        transformers.GPTNeoXConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=32, max_position_embeddings=16, rotary_pct=0.5)
    ).eval()  # fmt: skip
    model = pypattern.from_hf(neox).double()
    assert model.cfg.unembed_bias is False

    def lf(m, t):
        return m(t, return_type="per_token_loss").sum(-1)

    g = per_sample_grad_gram(model, lf, x, sites=transformer_lens_sites(model))
    torch.testing.assert_close(g, _naive_gram(model, lf, x), rtol=1e-12, atol=1e-12)


def test_gram_ops_and_accumulator_state_refuse_what_they_cannot_hold():
    from pypattern.ops.covariance import CrossCovariance
    from pypattern.ops.grad_gram import center_gram, grad_gram_dense, grad_gram_embedding

    with pytest.raises(TypeError, match="floating-point"):
        grad_gram_dense(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="square"):
        center_gram(torch.ones(3, 4))
    with pytest.raises(TypeError, match="ids must be an integer tensor"):
        grad_gram_embedding(torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 3, 4))
    acc = CrossCovariance(2, 3)
    acc.update(torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64))
    state = acc.state_dict()
    before = acc.cov().clone()
    with pytest.raises(ValueError, match="count"):
        acc.load_state_dict({**state, "count": -5})
    torch.testing.assert_close(acc.cov(), before)
    with pytest.raises(ValueError, match="op='covariance' is not an operator of pypattern"):
        pypattern.backends("covariance")


def _hf_model(arch: str):
    transformers = pytest.importorskip("transformers")
    T = transformers
    small = dict(
        vocab_size=29, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16
    )
    if arch == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=29, n_embd=16, n_layer=2, n_head=4, n_positions=16))
    if arch == "llama_tied":
        return T.LlamaForCausalLM(
            T.LlamaConfig(**small, intermediate_size=24, num_key_value_heads=2, tie_word_embeddings=True)
        )
    if arch == "qwen2_tied":
        return T.Qwen2ForCausalLM(
            T.Qwen2Config(**small, intermediate_size=24, num_key_value_heads=1, tie_word_embeddings=True)
        )
    if arch == "mistral":
        return T.MistralForCausalLM(T.MistralConfig(**small, intermediate_size=24, num_key_value_heads=2))
    if arch == "qwen3":
        return T.Qwen3ForCausalLM(
            T.Qwen3Config(**small, intermediate_size=24, num_key_value_heads=2, head_dim=4)
        )
    if arch == "olmo2":
        return T.Olmo2ForCausalLM(T.Olmo2Config(**small, intermediate_size=24, num_key_value_heads=2))
    if arch == "bloom":
        return T.BloomForCausalLM(T.BloomConfig(vocab_size=29, hidden_size=16, n_layer=2, n_head=4))
    if arch == "gemma":
        return T.GemmaForCausalLM(
            T.GemmaConfig(**small, intermediate_size=24, num_key_value_heads=1, head_dim=4)
        )
    if arch == "olmo":
        return T.OlmoForCausalLM(
            T.OlmoConfig(**small, intermediate_size=24, num_key_value_heads=2, clip_qkv=0.2)
        )
    if arch == "gemma2":
        return T.Gemma2ForCausalLM(
            T.Gemma2Config(
                **small, intermediate_size=24, num_key_value_heads=1, head_dim=4, final_logit_softcapping=3.0
            )
        )
    if arch == "gemma3":
        return T.Gemma3ForCausalLM(
            T.Gemma3TextConfig(
                **small, intermediate_size=24, num_key_value_heads=1, head_dim=4, sliding_window=4
            )
        )
    if arch == "granite":
        return T.GraniteForCausalLM(
            T.GraniteConfig(**small, intermediate_size=24, num_key_value_heads=2, embedding_multiplier=3.0,
                            residual_multiplier=0.5, attention_multiplier=0.3, logits_scaling=2.5)
        )  # fmt: skip
    raise ValueError(arch)


@pytest.mark.parametrize(
    "arch",
    [
        "gpt2",
        "llama_tied",
        "qwen2_tied",
        "mistral",
        "qwen3",
        "olmo2",
        "bloom",
        "gemma",
        "gemma2",
        "gemma3",
        "granite",
        "olmo",
    ],
)
def test_gram_on_converted_hugging_face_models_without_sites(arch):
    """Converted GPT-2 (tied), Llama and Qwen2 (tied, grouped-query, biases on q/k/v for Qwen2), Mistral, Qwen3
    (per-head query/key norms), OLMo 2 (all-head query/key norms, norms after the sublayers), BLOOM (an embedding
    LayerNorm), Gemma, Gemma 2 and Gemma 3 (scaled tied embeddings, weight offsets, sandwich norms, Gemma 2's capped
    logits) and Granite (multipliers, scaled logits): the default Gram covers every parameter and equals one backward per sample (float64; the Llama
    family's norms normalise in float32 as the Hugging Face models do, and Gemma's also apply their weight there:
    the sites take those weight gradients in float32 as the norms' backward does)."""
    torch.manual_seed(0)
    model = pypattern.from_hf(_hf_model(arch).eval()).double()
    x = torch.randint(0, 29, (4, 6), generator=torch.Generator().manual_seed(1))

    def lf(m, t):
        return m(t, return_type="per_token_loss").sum(-1)

    assert set(gram_parameters(model)) == {n for n, _ in model.named_parameters()}
    assert _rel(per_sample_grad_gram(model, lf, x), _naive_gram(model, lf, x)) < 1e-12


@pytest.mark.parametrize("norm", ["LN", "RMS"])
def test_gram_with_hook_functions_editing_the_sites_activations(norm):
    """Hook functions that scale, zero or replace activations at the sites' own hook points (in place or by a
    returned tensor) change what the model computes next: the Gram is still the per-sample gradient Gram of the
    hooked model, equal to one backward per sample; a function replacing a norm's scale is refused by name."""
    model = pypattern.Transformer(
        n_layers=2, d_model=12, n_heads=3, d_head=4, d_mlp=20, d_vocab=13, n_ctx=8, normalization_type=norm,
        gated_mlp=norm == "RMS", act_fn="silu" if norm == "RMS" else "gelu", dtype=torch.float64, seed=2,
    )  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))

    def zero_head_1(x, hook):
        x[:, :, 1] = 0.0  # in place

    hooks = [
        ("blocks.0.attn.hook_q", zero_head_1),
        ("blocks.1.hook_attn_out", lambda x, hook: 0.5 * x),
        ("blocks.0.mlp.hook_pre", lambda x, hook: x.mul_(0.7)),
        ("hook_embed", lambda x, hook: 2.0 * x),
        ("blocks.1.ln2.hook_normalized", lambda x, hook: x.mul_(1.5)),
        ("ln_final.hook_normalized", lambda x, hook: x - 0.1),
        ("blocks.0.attn.hook_v", lambda x, hook: x.flip(1)),
        ("blocks.0.hook_attn_out", lambda x, hook: x.mul_(0.8)),
        ("blocks.1.hook_mlp_out", lambda x, hook: x.mul_(1.3)),
    ]

    def lf(m, t):
        with m.hooks(hooks):
            return m(t, return_type="per_token_loss").sum(-1)

    tokens = torch.randint(0, 13, (4, 6), generator=torch.Generator().manual_seed(0))
    naive = _naive_gram(model, lf, tokens)
    assert _rel(per_sample_grad_gram(model, lf, tokens), naive) < 1e-12
    assert _rel(per_sample_grad_gram_reference(model, lf, tokens), naive) < 1e-12

    def scaled(m, t):
        with m.hooks([("blocks.0.ln1.hook_scale", lambda x, hook: 2.0 * x)]):
            return m(t, return_type="per_token_loss").sum(-1)

    with pytest.raises(NotImplementedError, match=r"blocks\.0\.ln1\.hook_scale"):
        per_sample_grad_gram(model, scaled, tokens)

    def reads(m, t):  # a function that only reads the scale changes nothing
        with m.hooks([("blocks.0.ln1.hook_scale", lambda x, hook: None)]):
            return m(t, return_type="per_token_loss").sum(-1)

    assert _rel(per_sample_grad_gram(model, reads, tokens), _naive_gram(model, reads, tokens)) < 1e-12


def test_gram_errors_on_pypattern_transformer_describe_its_default():
    """Every parameter frozen, or a trainable module added to the model: the errors name the default that applies
    to pypattern's Transformer (transformer_lens_sites) and what to do."""
    model = pypattern.Transformer(
        n_layers=1, d_model=8, n_heads=2, d_mlp=8, d_vocab=7, n_ctx=5, dtype=torch.float64
    )
    t = torch.randint(0, 7, (3, 5), generator=torch.Generator().manual_seed(0))

    def lf(m, x):
        return m(x, return_type="per_token_loss").sum(-1)

    model.probe = nn.Linear(8, 2).double()
    with pytest.raises(
        ValueError, match=r"transformer_lens_sites.*leave out 2 trainable parameters.*probe\.weight"
    ):
        per_sample_grad_gram(model, lf, t)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match=r"no site covers.*transformer_lens_sites.*unfreeze"):
        per_sample_grad_gram(model, lf, t)


@pytest.mark.parametrize("tied", [False, True])
def test_gram_of_losses_that_call_the_model_in_several_ways(tied):
    """One loss calling the model twice at different lengths (learned positions: each call's gradient at its own
    positions), a forward with return_type=None (the final norm runs, the unembedding does not), and a tied model
    whose lookup gets no gradient (its output detached by a hook: the unembedding's use of the weight alone): each
    equal to one backward per sample."""
    model = pypattern.Transformer(
        n_layers=2, d_model=8, n_heads=2, d_mlp=10, d_vocab=11, n_ctx=8, tie_word_embeddings=tied,
        dtype=torch.float64, seed=3,
    )  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    toks = torch.randint(0, 11, (3, 6), generator=torch.Generator().manual_seed(0))
    probe = torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def lengths(m, t):
        return m(t, return_type="per_token_loss").sum(-1) + m(t[:, :3]).logsumexp(-1).sum(-1)

    def probe_and_logits(m, t):
        store = {}
        with m.hooks([("blocks.1.hook_resid_mid", lambda x, hook: store.__setitem__("r", x))]):
            m(t, return_type=None)
        return m(t, return_type="per_token_loss").sum(-1) + ((store["r"] @ probe) ** 2).sum(-1)

    def detached_lookup(m, t):
        with m.hooks([("hook_embed", lambda x, hook: x.detach())]):
            return m(t, return_type="per_token_loss").sum(-1)

    for lf in (lengths, probe_and_logits, detached_lookup):
        assert _rel(per_sample_grad_gram(model, lf, toks), _naive_gram(model, lf, toks)) < 1e-12, lf.__name__


class _Reuse(nn.Module):
    """An MLP whose middle layer ``b`` is used in one of several ways, and an embedding reused as the unembedding."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.a, self.b, self.o = nn.Linear(3, 5), nn.Linear(5, 5), nn.Linear(5, 1)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.mode == "forward":  # bypasses the module's hooks
            h = self.b.forward(h)
        elif self.mode == "F.linear":
            h = F.linear(h, self.b.weight, self.b.bias)
        elif self.mode == "matmul":  # the module's call plus a second, functional use of its weight
            h = self.b(h) + h @ self.b.weight.T
        else:
            h = self.b(h)
        return self.o(torch.tanh(h)).squeeze(-1)


@pytest.mark.parametrize("mode", ["forward", "F.linear", "matmul", "penalty"])
def test_gram_refuses_parameter_uses_its_hooks_do_not_see(mode):
    """Every gradient path of a covered parameter outside its site's hooked calls is refused by name (the sum over
    samples of the captured per-sample gradients would miss it): a module called as m.forward(x), its weight
    used through F.linear or a matmul, a penalty on the parameters inside loss_fn. check=False skips the check
    (and returns the Gram of the captured paths only)."""
    torch.manual_seed(0)
    m = _Reuse("plain" if mode == "penalty" else mode).double()
    x = torch.randn(6, 3, dtype=torch.float64)

    def loss(model, x):
        out = model(x) ** 2
        return out + 1e-2 * (model.b.weight**2).sum() if mode == "penalty" else out

    match = r"(?s)sites / modules: .*site 'b' \(parameters \['b.weight', 'b.bias'\]\): sum over samples.*Likely causes"
    if mode in ("forward", "F.linear"):  # b's hooks never ran
        match = r"site 'b' .*its output capture \('b', 'output'\) recorded no call"
    with pytest.raises(ValueError, match=match):
        per_sample_grad_gram(m, loss, x)
    with pytest.raises(ValueError, match=r"site 'b'"):
        per_sample_grad_gram(m, loss, x, per_module=True, centered=True)
    unchecked = per_sample_grad_gram(m, loss, x, check=False)
    assert _rel(unchecked, per_sample_grad_gram_reference(m, loss, x)) > 1e-3
    # the same model with its sites seen whole is exact
    m.mode = "plain"
    ok = per_sample_grad_gram(m, lambda model, x: model(x) ** 2, x)
    assert _rel(ok, per_sample_grad_gram_reference(m, lambda model, x: model(x) ** 2, x)) < 1e-12


def test_gram_refuses_weights_tied_to_a_module_that_is_not_a_site():
    """An embedding reused as the unembedding (x @ wte.weight.T), and a Hugging Face GPT-2 whose lm_head is tied
    to transformer.wte with modules=['transformer.wte']: refused, naming the parameter's other name."""

    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.mlp = nn.Embedding(10, 6), nn.Linear(6, 6)

        def forward(self, ids):
            return torch.tanh(self.mlp(self.wte(ids))) @ self.wte.weight.T

    def lm_loss(model, ids):
        logits = model(ids)
        logits = getattr(logits, "logits", logits)[:, :-1]
        return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(
            len(ids), -1
        )

    torch.manual_seed(0)
    ids = torch.randint(0, 10, (4, 5))
    with pytest.raises(ValueError, match=r"site 'wte' \(parameters \['wte.weight'\]\): sum over samples"):
        per_sample_grad_gram(TinyLM().double(), lm_loss, ids)
    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=23, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    ).double().eval()  # fmt: skip
    tok = torch.randint(0, 10, (4, 6))
    # the embedding named alone: the Gram of its parameter, whose gradient holds both uses (the tied lm_head's too)
    g = per_sample_grad_gram(gpt2, lm_loss, tok, modules=["transformer.wte"])
    assert _rel(g, per_sample_grad_gram_reference(gpt2, lm_loss, tok, modules=["transformer.wte"])) < 1e-10
    # a module no tied weight reaches past its site is exact
    g = per_sample_grad_gram(gpt2, lm_loss, tok, modules=["transformer.h.0.ln_1"])
    assert (
        _rel(g, per_sample_grad_gram_reference(gpt2, lm_loss, tok, modules=["transformer.h.0.ln_1"])) < 1e-12
    )


def test_gram_of_a_site_never_called_is_zero_and_listed():
    """A site whose module the forward never calls (its parameters get no gradient) has a zero Gram, listed in
    per_module, not left out; its total is the reference's."""
    torch.manual_seed(0)
    m = _Reuse("plain").double()
    m.unused = nn.Linear(5, 5).double()
    x = torch.randn(6, 3, dtype=torch.float64)

    def loss(model, x):
        return model(x) ** 2

    parts = per_sample_grad_gram(m, loss, x, per_module=True)
    assert set(parts) == {"a", "b", "o", "unused"}
    assert torch.equal(parts["unused"], torch.zeros(6, 6, dtype=torch.float64))
    assert _rel(sum(parts.values()), per_sample_grad_gram_reference(m, loss, x)) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gram_check_accepts_per_sample_gradients_that_cancel(dtype):
    """Per-sample gradients that cancel over the batch (l_2 = -l_1 on the same input: the total gradient is 0 up
    to rounding) or within each sample (a key bias ahead of a softmax) are no reason to refuse."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2)).to(dtype)
    x = torch.randn(3, 4, dtype=dtype).repeat(2, 1)
    sign = torch.tensor([1.0, 1, 1, -1, -1, -1], dtype=dtype)

    def loss(model, x, sign):
        return (model(x) ** 2).sum(-1) * sign

    g = per_sample_grad_gram(net, loss, x, sign)
    assert _rel(g, per_sample_grad_gram_reference(net, loss, x, sign)) < (
        1e-5 if dtype == torch.float32 else 1e-12
    )
    model = pypattern.Transformer(
        pypattern.TransformerConfig(n_layers=1, d_model=8, n_heads=2, d_mlp=16, d_vocab=11, n_ctx=6)
    ).to(dtype)
    tok = torch.randint(0, 11, (5, 6))
    sites = [st for st in transformer_lens_sites(model) if st.name == "blocks.0.attn.W_K"]
    sites = [type(st)(**{**st.__dict__, "params": (None, st.params[1])}) for st in sites]  # the bias alone

    def tl_loss(m, t):
        return m(t, return_type="per_token_loss").sum(-1)

    g = per_sample_grad_gram(model, tl_loss, tok, sites=sites)
    assert float(g.abs().max()) < 1e-6 * (1 if dtype == torch.float32 else 1e-8)


def test_gram_refuses_a_batch_independent_capture_whose_leading_size_is_the_batch():
    """A Linear over a (T, 1) positional grid broadcast over the batch: its captures' first dimension is T, not
    the batch. Refused by its leading size when T != B, and by the single-sample comparison when T == B (the sum
    over samples is right, the rows are not samples)."""

    class M(nn.Module):
        def __init__(self, T):
            super().__init__()
            self.register_buffer("grid", torch.linspace(-1, 1, T, dtype=torch.float64)[:, None])
            self.pos, self.inp, self.out = nn.Linear(1, 4), nn.Linear(3, 4), nn.Linear(4, 1)

        def forward(self, x):  # x (B, T, 3)
            return self.out(torch.tanh(self.inp(x) + self.pos(self.grid))).squeeze(-1).sum(1)

    def loss(model, x):
        return model(x) ** 2

    torch.manual_seed(0)
    with pytest.raises(
        ValueError, match=r"pos: its (input|output) has leading size 5 but the losses have batch 4"
    ):
        per_sample_grad_gram(M(5).double(), loss, torch.randn(4, 5, 3, dtype=torch.float64))
    m, x = M(5).double(), torch.randn(5, 5, 3, dtype=torch.float64)
    with pytest.raises(
        ValueError, match=r"site 'pos' \(parameters \['pos.weight', 'pos.bias'\]\): sample \d+: G"
    ):
        per_sample_grad_gram(m, loss, x)
    assert (
        _rel(per_sample_grad_gram(m, loss, x, check=False), per_sample_grad_gram_reference(m, loss, x)) > 1e-2
    )
    # the other sites are right: the Gram over them is accepted
    g = per_sample_grad_gram(m, loss, x, modules=["inp", "out"])
    assert _rel(g, per_sample_grad_gram_reference(m, loss, x, modules=["inp", "out"])) < 1e-12


def test_gram_check_once_verifies_the_first_call_of_each_kind(monkeypatch):
    """check="once" (the default) verifies the first call for a model with the same sites, loss function, input
    shapes and training mode, and not a repeat; another batch shape or check=True verifies again; a call that
    fails its check is refused every time (nothing is remembered)."""
    import pypattern.gram as gram

    calls = []
    real = gram._check_capture
    monkeypatch.setattr(gram, "_check_capture", lambda *a: (calls.append(1), real(*a))[1])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))

    def loss_fn(m, x):
        return m(x).squeeze(-1) ** 2

    x = torch.randn(5, 3)
    a = pypattern.per_sample_grad_gram(model, loss_fn, x)
    b = pypattern.per_sample_grad_gram(model, loss_fn, x + 1)
    assert len(calls) == 1
    pypattern.per_sample_grad_gram(model, loss_fn, torch.randn(6, 3))
    assert len(calls) == 2
    pypattern.per_sample_grad_gram(model, loss_fn, x, check=True)
    assert len(calls) == 3
    pypattern.per_sample_grad_gram(model, loss_fn, x, check=False)
    assert len(calls) == 3
    torch.testing.assert_close(a, pypattern.per_sample_grad_gram(model, loss_fn, x, check=False))
    assert not torch.equal(a, b)
    with pytest.raises(ValueError, match="check='yes' is not valid"):
        pypattern.per_sample_grad_gram(model, loss_fn, x, check="yes")

    def penalised(m, x):  # a use of the parameters the hooks do not see
        return m(x).squeeze(-1) ** 2 + m[0].weight.pow(2).sum()

    for _ in range(2):
        with pytest.raises(ValueError, match="sites"):
            pypattern.per_sample_grad_gram(model, penalised, x)


@pytest.mark.parametrize("backend, device", [c for c in BACKENDS if c[0] == "cpp"])
@pytest.mark.parametrize("shape", [(7, 13, 5, 4), (50, 13, 6, 3), (9, 1, 4, 4)])
def test_cpp_gram_is_exactly_symmetric(backend, device, shape):
    """The C++ kernel computes the blocks on and above the diagonal and mirrors them (inside diagonal blocks too):
    ``G == G.T`` exactly, one block (7 samples of 13 rows), several (50 x 13 rows: blocks of 39 samples) and one
    position (its own path), with features and with ids."""
    b, t, p, q = shape
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(b * t, p, generator=gen) * 100, torch.randn(b * t, q, generator=gen) * 100
    ids = torch.randint(-1, 5, (b * t,), generator=gen)
    for g in (
        grad_gram_pairwise(*to(device, x, y), batch=b, backend=backend),
        grad_gram_pairwise(None, *to(device, y, ids), batch=b, backend=backend),
    ):
        assert torch.equal(g, g.T)
    ref = grad_gram_linear_reference(x.reshape(b, t, p), y.reshape(b, t, q), bias=False)
    assert _rel(grad_gram_pairwise(x, y, batch=b, backend=backend), ref) < 2e-6


def test_pairwise_gram_on_meta_tensors():
    """Meta tensors give the Gram's shape and dtype (no overflow check without values), through the public op and
    the C++ op's fake implementation."""
    x, y = torch.empty(12, 5, device="meta"), torch.empty(12, 4, device="meta")
    g = grad_gram_pairwise(x, y, batch=3, backend="reference")
    assert g.device.type == "meta" and g.shape == (3, 3) and g.dtype == torch.float64
    if pypattern.backends("grad_gram_pairwise")["cpp"]["available"]:
        g = torch.ops.pypattern.grad_gram_pairwise(x, y, None, 3)
        assert g.device.type == "meta" and g.shape == (3, 3) and g.dtype == torch.float64


def test_reference_covers_every_weight_of_a_hugging_face_model_and_errors_point_to_the_conversion():
    """Hugging Face GPT-2 and GPT-Neo are covered whole by the default sites (Conv1D projections, learned positions
    looked up once for the batch, read where each sample's sum is formed): equal to per_sample_grad_gram_reference,
    which covers every trainable weight and equals one backward per sample. A shared lookup added where no site reads
    each sample's sum is refused, saying why and what to do."""
    transformers = pytest.importorskip("transformers")
    from pypattern import losses

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    hf = transformers.GPT2LMHeadModel(cfg).double().eval()
    tokens = torch.randint(0, 32, (4, 6))
    ref = per_sample_grad_gram_reference(hf, losses.sample_losses, tokens)
    torch.testing.assert_close(
        per_sample_grad_gram(hf, losses.sample_losses, tokens), ref, rtol=1e-10, atol=1e-12
    )
    params = [p for p in hf.parameters() if p.requires_grad]
    rows = []
    for i in range(4):
        g = torch.autograd.grad(losses.sample_losses(hf, tokens[i : i + 1]).sum(), params)
        rows.append(torch.cat([x.reshape(-1) for x in g]))
    full = torch.stack(rows)
    torch.testing.assert_close(ref, full @ full.T, rtol=1e-10, atol=1e-12)
    neo = transformers.GPTNeoForCausalLM(
        transformers.GPTNeoConfig(
            vocab_size=32,
            hidden_size=16,
            num_layers=1,
            num_heads=2,
            attention_types=[[["global"], 1]],
            max_position_embeddings=16,
        )
    ).eval()
    torch.testing.assert_close(
        per_sample_grad_gram(neo, losses.sample_losses, tokens),
        per_sample_grad_gram_reference(neo, losses.sample_losses, tokens),
        rtol=1e-4,
        atol=1e-6,
    )
    # a model whose shared position lookup is added where no site reads each sample's sum: the error says why
    neo.transformer.drop = nn.Identity()
    with pytest.raises(
        ValueError, match=r"looked up for positions shared by every sample.*modules=.*pypattern\.from_hf"
    ):
        per_sample_grad_gram(neo, losses.sample_losses, tokens)


def test_reference_names_the_attention_mask_when_vmap_cannot_run_a_hugging_face_forward():
    """Hugging Face's mask code reads values (.item() / data-dependent control flow), so torch.func.vmap cannot
    run a loss that passes an attention_mask to the model: the error names that cause and the conversion."""
    import transformers

    from pypattern.gram import per_sample_grad_gram_reference

    hf = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    ).eval()
    ids = torch.randint(0, 32, (3, 6), generator=torch.Generator().manual_seed(0))

    def loss(model, x, mask):
        logits = model(input_ids=x, attention_mask=mask).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 32), x[:, 1:].reshape(-1))

    try:
        got = per_sample_grad_gram_reference(hf, loss, ids, torch.ones_like(ids))
    except RuntimeError as e:
        assert "attention_mask passed to the model" in str(e) and "from_hf" in str(e)
    else:  # a transformers release whose mask code vmap runs: then the Gram is the per-sample gradients'
        want = _naive_gram(hf, lambda m, x: loss(m, x, torch.ones_like(x)), ids)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "value, error",
    [
        (0, ValueError),
        (-1, ValueError),
        (0.5, ValueError),
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        (True, TypeError),
        ("1e9", TypeError),
        (None, TypeError),
        (torch.tensor(1000), TypeError),
    ],
)
@pytest.mark.parametrize("op", ["grad_gram_linear", "grad_gram_embedding"])
def test_max_bytes_refuses_non_byte_counts(op, value, error):
    """max_bytes is a finite number of bytes >= 1: 0 and negatives, NaN and inf (no bound at all), bools, strings
    and tensors are refused, naming the argument, whatever the method."""
    from pypattern.ops.grad_gram.op import grad_gram_embedding, grad_gram_linear

    a, d = torch.randn(3, 4, 5, dtype=torch.float64), torch.randn(3, 4, 6, dtype=torch.float64)
    ids = torch.randint(0, 9, (3, 4))
    for method in ("outer", "pairwise"):
        with pytest.raises(error, match="max_bytes"):
            if op == "grad_gram_linear":
                grad_gram_linear(a, d, method=method, max_bytes=value, backend="reference")
            else:
                grad_gram_embedding(ids, d, method=method, max_bytes=value, backend="reference")


def test_max_bytes_takes_numpy_scalars_and_floats():
    import numpy as np

    from pypattern.ops.grad_gram.op import grad_gram_embedding, grad_gram_linear

    a, d = torch.randn(3, 4, 5, dtype=torch.float64), torch.randn(3, 4, 6, dtype=torch.float64)
    ids = torch.randint(0, 9, (3, 4))
    ref_lin = grad_gram_linear(a, d, method="outer")
    ref_emb = grad_gram_embedding(ids, d, method="outer")
    for v in (np.int64(200), np.int32(1), np.float64(1e6), 1.0, 2**40, 250.7):
        torch.testing.assert_close(grad_gram_linear(a, d, method="outer", max_bytes=v), ref_lin)
        torch.testing.assert_close(grad_gram_embedding(ids, d, method="outer", max_bytes=v), ref_emb)
