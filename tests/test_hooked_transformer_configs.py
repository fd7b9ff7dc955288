"""TransformerLens 2.x / 3.x ``HookedTransformer`` configurations and processed weights beyond those of
``test_hooked_transformer.py``: ``fold_ln`` with a LayerNorm on the embedding (BLOOM as ``from_pretrained`` loads
it), weights processed every way ``process_weights_`` offers, option combinations, and patching on models the
conversion refuses (TransformerLens' own hooks) and at the ``pattern`` site, each against TransformerLens' own
forward or a naive loop of its hooked forwards.

Runs where TransformerLens with ``HookedTransformer`` is installed (TransformerLens 2.16.1, as in
``bench/envs/autocircuit.sh``): ``OMP_NUM_THREADS=1 PYTHONPATH=. <venv>/bin/python -m pytest -q
tests/test_hooked_transformer_configs.py -p no:cacheprovider``; skipped elsewhere (TransformerLens 4.x has no
``HookedTransformer``)."""

import warnings

import pytest
import torch

import pypattern
from pypattern.models import UnsupportedModelError

tl = pytest.importorskip("transformer_lens")
try:  # TransformerLens 4.x raises ImportError (not AttributeError) for the removed class
    HookedTransformer, HookedTransformerConfig = tl.HookedTransformer, tl.HookedTransformerConfig
except (AttributeError, ImportError):
    pytest.skip("this TransformerLens has no HookedTransformer", allow_module_level=True)

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = dict(n_layers=2, d_model=24, n_ctx=16, d_head=6, n_heads=4, d_vocab=37, act_fn="gelu", seed=0)
ROPE = dict(positional_embedding_type="rotary", rotary_dim=4)
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def hooked(dtype=torch.float64, **kw):
    """A HookedTransformer with every weight random (norm weights and biases too; a gated MLP's b_in zero)."""
    cfg = HookedTransformerConfig(**{**BASE, **kw, "dtype": dtype})
    model = HookedTransformer(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_((torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3).to(p.dtype))
        if cfg.gated_mlp and not cfg.attn_only:
            for blk in model.blocks:
                blk.mlp.b_in.zero_()
    return model.eval()


def tokens(batch=3, seq=13, seed=0):
    return torch.randint(0, BASE["d_vocab"], (batch, seq), generator=torch.Generator().manual_seed(seed))


def rel(a, b):
    """Largest difference relative to the largest magnitude, over the finite entries (both -inf elsewhere)."""
    a, b = a.double(), b.double()
    finite = torch.isfinite(b)
    assert torch.equal(finite, torch.isfinite(a))
    a, b = a[finite], b[finite]
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def convert(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # options adding hook points warn; the values are compared below
        return pypattern.from_hf(model)


def assert_same_as_transformer_lens(model, ours, tol, skip=()):
    """Logits equal and, at every hook name both caches hold with the same meaning and shape, the activations;
    returns how many hook names were compared."""
    x = tokens()
    with torch.no_grad():
        assert rel(ours(x), model(x)) <= tol
    _, want = model.run_with_cache(x)
    _, got = ours.run_with_cache(x)
    compared = 0
    for k, v in want.items():
        if k not in got or any(s in k for s in skip):
            continue
        assert got[k].shape == v.shape, k
        assert rel(got[k], v) <= tol, k
        compared += 1
    return compared


@pytest.mark.parametrize(
    "dtype, kw",
    [
        (torch.float64, dict(positional_embedding_type="alibi")),
        # BLOOM's 16 heads: TransformerLens' ALiBi slopes within one float32 ulp of BLOOM's, a float32 model
        (torch.float32, dict(positional_embedding_type="alibi", n_heads=16, d_head=3, d_model=48)),
        (torch.float64, dict(attn_only=True)),
    ],
    ids=["alibi-float64", "bloom-heads-float32", "attn-only"],
)
def test_folded_layer_norms_with_a_layer_norm_on_the_embedding_convert(dtype, kw):
    """fold_ln folds the blocks' and the final LayerNorms (LNPre) and leaves the embedding's (BLOOM as
    HookedTransformer.from_pretrained loads it): converted exactly, its norms all LayerNorms with the folded ones
    of weight 1 and bias 0; the log-probabilities are those of the model before processing."""
    model = hooked(dtype, post_embedding_ln=True, **kw)
    x = tokens()
    with torch.no_grad():
        before = model(x).log_softmax(-1)
    model.process_weights_()  # fold_ln, centred writing weights and unembedding, folded value biases
    assert model.cfg.normalization_type == "LNPre" and hasattr(model.embed, "ln")
    ours = convert(model)
    assert ours.cfg.post_embedding_ln and ours.cfg.normalization_type == "LN"
    params = dict(ours.named_parameters())
    torch.testing.assert_close(params["embed.ln.w"], model.embed.ln.w, rtol=0, atol=0)
    for name in ("blocks.1.ln1", "ln_final") + (() if ours.cfg.d_mlp is None else ("blocks.0.ln2",)):
        assert bool((params[f"{name}.w"] == 1).all()) and bool((params[f"{name}.b"] == 0).all()), name
    # ALiBi: TransformerLens adds slope * (key - query position) to the scores, pypattern slope * key position
    # (the same pattern), so the scores are left out
    compared = assert_same_as_transformer_lens(model, ours, TOL[dtype], skip=("hook_attn_scores",))
    assert compared >= 15
    with torch.no_grad():
        after = ours(x).log_softmax(-1)
    torch.testing.assert_close(
        after.double(), before.double(), rtol=0, atol=1e-9 if dtype == torch.float64 else 1e-4
    )


@pytest.mark.parametrize("norm", ["RMS", "RMSPre", None])
def test_a_layer_norm_on_the_embedding_under_other_norms_is_refused_by_name(norm):
    """TransformerLens' embedding norm is a LayerNorm whatever normalization_type says; pypattern's model has one
    norm type, and RMS blocks do not compute as LayerNorms of any weight."""
    model = hooked(post_embedding_ln=True, normalization_type=norm)
    with pytest.raises(UnsupportedModelError, match=f"post_embedding_ln=True.*normalization_type={norm!r}"):
        pypattern.from_hf(model)


def _fold(**kw):
    return lambda m: m.process_weights_(**kw)


# configurations and processed weights the other TransformerLens tests leave out; "post" runs on the built model
CASES = {
    "fold-only": (dict(), _fold(fold_ln=True, center_writing_weights=False, center_unembed=False)),
    "fold-refactor": (dict(), _fold(refactor_factored_attn_matrices=True)),
    "fold-parallel": (dict(parallel_attn_mlp=True, act_fn="gelu_new"), _fold()),
    "fold-gqa": (dict(n_key_value_heads=2), _fold()),
    "fold-attn-only": (dict(attn_only=True), _fold()),
    "fold-rms-final-rms": (dict(normalization_type="RMS", final_rms=True, **ROPE), _fold()),
    "fold-qk-norm": (dict(use_qk_norm=True, normalization_type="RMS", **ROPE), _fold()),
    "set-use-attn-result": (dict(), lambda m: m.set_use_attn_result(True)),
    "gated-parallel": (dict(gated_mlp=True, parallel_attn_mlp=True, act_fn="silu"), None),
    "gqa-all-heads": (dict(n_key_value_heads=4, **ROPE), None),
    "adjacent-partial-rotary": (dict(rotary_adjacent_pairs=True, **ROPE), None),
    "rotary-float-base": (dict(positional_embedding_type="rotary", rotary_base=1234.5), None),
    "inverse-layer-unscaled": (dict(scale_attn_by_inverse_layer_idx=True, use_attn_scale=False), None),
    "soft-cap-local": (
        dict(attn_scores_soft_cap=2.0, use_local_attn=True, window_size=3, attn_types=["local", "global"]),
        None,
    ),
    "final-rms-rms-pre": (dict(normalization_type="RMSPre", final_rms=True), None),
    "attn-only-solu": (dict(attn_only=True, act_fn="solu_ln"), None),  # no MLP: the activation is unused
}
# hooks whose meaning differs (README, "hook meaning"): RMSNorm's hook_normalized is taken after the weight, hook_q
# / hook_k after the query/key norm, whose hooks TransformerLens flattens
DIFFERENT = {
    "fold-qk-norm": ("attn.hook_q", "attn.hook_k", "_norm."),
}


@pytest.mark.parametrize("name", list(CASES))
def test_processed_weights_and_option_combinations_equal_transformer_lens(name):
    kw, post = CASES[name]
    model = hooked(**kw)
    if post is not None:
        post(model)
        model.eval()
    ours = convert(model)
    assert (
        assert_same_as_transformer_lens(model, ours, TOL[torch.float64], skip=DIFFERENT.get(name, ())) >= 12
    )


def _ld(logits, answer, wrong):
    last = logits[:, -1]
    return last.gather(-1, answer[:, None])[:, 0] - last.gather(-1, wrong[:, None])[:, 0]


@pytest.mark.parametrize(
    "kw", [dict(positional_embedding_type="shortformer"), dict(act_fn="solu_ln", d_mlp=16)]
)
def test_patching_a_model_the_conversion_refuses_equals_transformer_lens_hooks(kw):
    """A HookedTransformer refused by the converter is patched through its own hook points: attn_out / mlp_out,
    denoising and noising, per position and whole sequence, equal a naive loop of TransformerLens' hooked
    forwards."""
    model = hooked(**kw)
    with pytest.raises(UnsupportedModelError):
        pypattern.from_hf(model)
    clean, corr = tokens(seq=5, seed=0), tokens(seq=5, seed=1)
    answer, wrong = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    _, clean_cache = model.run_with_cache(clean)
    _, corr_cache = model.run_with_cache(corr)
    for site in ("attn_out", "mlp_out"):
        for direction, source, base in (("denoising", clean_cache, corr), ("noising", corr_cache, clean)):
            for per_position in (True, False):
                got = pypattern.activation_patching(
                    model,
                    site,
                    clean,
                    corr,
                    metric=pypattern.LogitDiff(answer, wrong),
                    direction=direction,
                    per_position=per_position,
                    quiet=True,
                ).values
                for layer in range(2):
                    hook = f"blocks.{layer}.hook_{site}"
                    for pos in range(5) if per_position else [slice(None)]:

                        def put(t, hook, pos=pos, name=hook, source=source):
                            t = t.clone()
                            t[:, pos] = source[name][:, pos]
                            return t

                        want = _ld(model.run_with_hooks(base, fwd_hooks=[(hook, put)]), answer, wrong)
                        cell = got[:, layer, pos] if per_position else got[:, layer]
                        torch.testing.assert_close(cell, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    "kw",
    [
        dict(positional_embedding_type="alibi"),
        dict(use_local_attn=True, window_size=3, attn_types=["local", "global"], attn_scores_soft_cap=2.0),
    ],
    ids=["alibi", "local-soft-cap"],
)
def test_pattern_patching_of_chosen_heads_and_positions_equals_transformer_lens_hooks(kw):
    """The pattern site on a HookedTransformer (converted on the way in), heads and positions chosen: each cell
    equals TransformerLens' corrupted forward with that head's clean pattern row at that query position."""
    model = hooked(**kw)
    clean, corr = tokens(seq=6, seed=0), tokens(seq=6, seed=1)
    answer, wrong = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    heads, positions = [1, 3], [2, 5]
    got = pypattern.activation_patching(
        model,
        "pattern",
        clean,
        corr,
        metric=pypattern.LogitDiff(answer, wrong),
        heads=heads,
        positions=positions,
        quiet=True,
    ).values
    assert got.shape == (3, 2, len(heads), len(positions))
    _, cache = model.run_with_cache(clean)
    for layer in range(2):
        hook = f"blocks.{layer}.attn.hook_pattern"
        for i, head in enumerate(heads):
            for j, pos in enumerate(positions):

                def put(t, hook, head=head, pos=pos, name=hook):
                    t = t.clone()
                    t[:, head, pos] = cache[name][:, head, pos]
                    return t

                want = _ld(model.run_with_hooks(corr, fwd_hooks=[(hook, put)]), answer, wrong)
                torch.testing.assert_close(got[:, layer, i, j], want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", ["backward", "backward_pre"])
def test_a_gradient_hook_attached_to_the_model_is_refused_naming_it(kind):
    """A torch backward hook on one of the model's modules changes the gradients attribution patching reads; the
    converted model would not run it, so the conversion refuses naming the module. Removed, the model converts."""
    model = hooked()
    module = model.blocks[0].hook_resid_mid

    def attach():  # halves the gradient flowing back through blocks.0.hook_resid_mid
        if kind == "backward":
            return module.register_full_backward_hook(lambda mod, grad_in, grad_out: (grad_in[0] * 0.5,))
        return module.register_full_backward_pre_hook(lambda mod, grad_out: (grad_out[0] * 0.5,))

    x = tokens(seq=5)

    def grad_w_q():
        model.zero_grad()
        model(x).sum().backward()
        return model.blocks[0].attn.W_Q.grad.clone()

    plain = grad_w_q()
    handle = attach()
    torch.testing.assert_close(grad_w_q(), 0.5 * plain, rtol=1e-12, atol=0)  # the hook acts
    with pytest.raises(UnsupportedModelError, match="hooks attached at 'blocks.0.hook_resid_mid'"):
        pypattern.from_hf(model)
    handle.remove()
    assert rel(convert(model)(x), model(x)) <= TOL[torch.float64]


@pytest.mark.parametrize(
    "edit, match",
    [
        (dict(n_ctx=32), r"pos_embed\.W_pos has shape \(16, 24\), where the cfg gives \(32, 24\)"),
        (dict(d_mlp=50), r"blocks\.0\.mlp\.W_in has shape \(24, 96\), where the cfg gives \(24, 50\)"),
        (dict(normalization_type="LNPre"), r"it has parameters \['blocks\.0\.ln1\.b'"),
    ],
)
def test_a_cfg_edited_after_the_model_was_built_is_refused_naming_the_parameter(edit, match):
    """The HookedTransformer's modules keep the configuration they were built with: a cfg edited after (a longer
    n_ctx, another d_mlp, a norm type its modules do not have) is refused naming the first parameter that differs
    and its shapes, as a mismatch of the model with its cfg."""
    model = hooked()
    want = tuple(model.pos_embed.W_pos.shape)
    assert want == (BASE["n_ctx"], BASE["d_model"])
    for k, v in edit.items():
        setattr(model.cfg, k, v)
    with pytest.raises(UnsupportedModelError, match="parameters do not match its cfg: " + match):
        pypattern.from_hf(model)


@pytest.mark.parametrize(
    "kw, process",
    [
        (dict(post_embedding_ln=True, positional_embedding_type="alibi"), True),
        (dict(use_qk_norm=True, normalization_type="RMS", parallel_attn_mlp=True, **ROPE), False),
    ],
    ids=["folded-bloom", "qk-norm-parallel"],
)
def test_attribution_patching_equals_gradients_through_transformer_lens_hooks(kw, process):
    """AtP on a HookedTransformer (converted on the way in) against its definition computed with TransformerLens'
    own hooks and autograd: (clean - corrupted activation) . d metric / d activation on the corrupted run, summed
    over the activation's last dimension, per layer, position (and head)."""
    model = hooked(**kw)
    if process:
        model.process_weights_()
    clean, corr = tokens(seq=6, seed=0), tokens(seq=6, seed=1)
    answer, wrong = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    hooks = {
        "resid_pre": "hook_resid_pre",
        "attn_out": "hook_attn_out",
        "mlp_out": "hook_mlp_out",
        "z": "attn.hook_z",
    }
    got = pypattern.attribution_patching(
        model, clean, corr, metric=pypattern.LogitDiff(answer, wrong), sites=list(hooks)
    )
    _, clean_cache = model.run_with_cache(clean)
    acts = {}

    def keep(t, hook):
        t.retain_grad()
        acts[hook.name] = t
        return t

    names = [f"blocks.{layer}.{h}" for layer in range(2) for h in hooks.values()]
    with torch.enable_grad():
        target = _ld(model.run_with_hooks(corr, fwd_hooks=[(n, keep) for n in names]), answer, wrong)
        target.sum().backward()
    target = target.detach()
    for site, hook in hooks.items():
        for layer in range(2):
            name = f"blocks.{layer}.{hook}"
            want = ((clean_cache[name] - acts[name].detach()) * acts[name].grad).sum(
                -1
            )  # (batch, pos[, head])
            if site == "z":
                want = want.transpose(1, 2) + target[:, None, None]  # (batch, head, pos)
            else:
                want = want + target[:, None]
            torch.testing.assert_close(got[site].values[:, layer], want, rtol=0, atol=1e-11, msg=name)
