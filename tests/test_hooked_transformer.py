"""TransformerLens 2.x / 3.x ``HookedTransformer`` models converted with ``pypattern.from_hf``: logits and hooks
equal TransformerLens' own forward on random configurations of every option the converter maps, refusals by name
for the rest, and the patching and circuit estimators taking a ``HookedTransformer`` directly, against naive loops
written with TransformerLens' own hooks.

Runs where TransformerLens with ``HookedTransformer`` is installed (the bench venv of ``bench/envs/autocircuit.sh``,
TransformerLens 2.16.1): ``OMP_NUM_THREADS=1 PYTHONPATH=. .bench-venvs/autocircuit/bin/python -m pytest -q
tests/test_hooked_transformer.py -p no:cacheprovider``; skipped elsewhere (TransformerLens 4.x has no
``HookedTransformer``)."""

import pytest
import torch

import pypattern
from pypattern.models import Transformer, UnsupportedModelError

tl = pytest.importorskip("transformer_lens")
try:  # TransformerLens 4.x raises ImportError (not AttributeError) for the removed class
    HookedTransformer, HookedTransformerConfig = tl.HookedTransformer, tl.HookedTransformerConfig
except (AttributeError, ImportError):
    pytest.skip("this TransformerLens has no HookedTransformer", allow_module_level=True)

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = dict(n_layers=2, d_model=24, n_ctx=16, d_head=6, n_heads=4, d_vocab=37, act_fn="gelu", seed=0)
ROPE = dict(positional_embedding_type="rotary", rotary_dim=4)
CONFIGS = {
    "ln": {},
    "ln_pre": dict(normalization_type="LNPre", act_fn="gelu_new"),
    "rms": dict(normalization_type="RMS", **ROPE),
    "rms_pre": dict(normalization_type="RMSPre", **ROPE),
    "no_norm": dict(normalization_type=None, act_fn="relu"),
    "rotary_adjacent": dict(positional_embedding_type="rotary", rotary_dim=6, rotary_adjacent_pairs=True),
    "llama": dict(
        gated_mlp=True, act_fn="silu", n_key_value_heads=2, normalization_type="RMS", rotary_base=500, **ROPE
    ),
    "mqa": dict(n_key_value_heads=1, d_head=8, n_heads=3, **ROPE),
    "attn_only": dict(attn_only=True),
    "parallel": dict(parallel_attn_mlp=True, act_fn="gelu_fast", **ROPE),
    "local": dict(use_local_attn=True, window_size=3, attn_types=["local", "global"]),
    "alibi": dict(positional_embedding_type="alibi"),
    "inverse_layer": dict(scale_attn_by_inverse_layer_idx=True, act_fn="relu"),
    "unscaled": dict(use_attn_scale=False, act_fn="gelu_pytorch_tanh"),
    "custom_scale": dict(attn_scale=2.5),
    "gemma2": dict(
        attn_scores_soft_cap=5.0,
        output_logits_soft_cap=3.0,
        use_normalization_before_and_after=True,
        normalization_type="RMS",
        act_fn="gelu_pytorch_tanh",
        gated_mlp=True,
        **ROPE,
    ),
    "qk_norm": dict(use_qk_norm=True, normalization_type="RMS", **ROPE),
    "post_embedding_ln": dict(post_embedding_ln=True),
    "odd_sizes": dict(d_model=30, d_head=7, n_heads=5, d_mlp=41, d_vocab=53, eps=1e-3),
    # every Llama-family TransformerLens config sets final_rms (its final norm is an RMSNorm anyway)
    "llama_final_rms": dict(
        gated_mlp=True, act_fn="silu", n_key_value_heads=2, normalization_type="RMS", final_rms=True, **ROPE
    ),
}
# hooks whose meaning differs from TransformerLens' (README, "hook meaning"): RMSNorm's hook_normalized is taken
# after the weight, hook_q / hook_k after the query/key norm
DIFFERENT_HOOKS = ("hook_normalized", "attn.hook_q", "attn.hook_k")


def hooked(name, dtype=torch.float64, scale=0.3, **kw):
    cfg = HookedTransformerConfig(**{**BASE, **CONFIGS.get(name, {}), **kw, "dtype": dtype})
    model = HookedTransformer(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():  # every weight random, norms and biases too
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
        if cfg.gated_mlp:
            for blk in model.blocks:
                blk.mlp.b_in.zero_()
    return model.eval()


def tokens(model, batch=3, seq=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.d_vocab, (batch, seq), generator=g)


def rel(a, b):
    """Largest difference relative to the largest magnitude, over the finite entries (masked scores are -inf in
    both)."""
    finite = torch.isfinite(b)
    assert torch.equal(finite, torch.isfinite(a)) and torch.equal(a[~finite], b[~finite])
    a, b = a[finite], b[finite]
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_logits_and_hooks_equal_transformer_lens(name, dtype):
    model = hooked(name, dtype)
    ours = pypattern.from_hf(model)
    assert isinstance(ours, Transformer) and ours.cfg.dtype == dtype
    assert ours.cfg.extra["converted_from"]["class"] == "HookedTransformer"
    x = tokens(model)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert rel(ours(x), model(x)) <= tol
    _, want = model.run_with_cache(x)
    _, got = ours.run_with_cache(x)
    compared = 0
    for k, v in want.items():
        if k not in got or got[k].shape != v.shape or k.endswith(DIFFERENT_HOOKS) or "_norm." in k:
            continue
        if name == "alibi" and k.endswith("hook_attn_scores"):
            # TransformerLens adds slope * (key - query) position, pypattern slope * key position: each query's
            # scores differ by one constant, and the pattern is the same
            d = (got[k] - v).masked_fill(torch.isinf(v), 0.0)
            torch.testing.assert_close(d, d[..., :1].expand_as(d).tril(), rtol=0, atol=tol * 10)
            continue
        assert rel(got[k], v) <= tol, k
        compared += 1
    for k in ("hook_embed", "blocks.1.hook_resid_pre", "blocks.0.attn.hook_z", "blocks.1.attn.hook_pattern"):
        assert k in got and k in want and got[k].shape == want[k].shape, k
    assert compared >= 12
    # the converted model's parameters are the HookedTransformer's (plus zero gate biases of a gated MLP)
    theirs = {n.replace("._W_", ".W_").replace("._b_", ".b_") for n, _ in model.named_parameters()}
    if model.cfg.positional_embedding_type != "standard":
        theirs.discard("pos_embed.W_pos")  # TransformerLens keeps an unused table with ALiBi
    mine = {n for n, _ in ours.named_parameters()}
    assert theirs <= mine and all(".b_gate" in n for n in mine - theirs)


def test_processed_weights_convert_as_they_are():
    """``fold_ln`` / centring / folded value biases: the converted model is the processed HookedTransformer, whose
    norms are then LNPre (RMSPre for an RMS model)."""
    for name, norm in (("ln", "LNPre"), ("rms", "RMSPre")):
        model = hooked(name)
        x = tokens(model)
        before = model(x)
        model.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
        assert model.cfg.normalization_type == norm
        ours = pypattern.from_hf(model)
        assert ours.cfg.normalization_type == norm
        assert rel(ours(x), model(x)) <= 1e-10
        # centring the unembedding shifts each position's logits by a constant: log-probabilities are unchanged
        torch.testing.assert_close(ours(x).log_softmax(-1), before.log_softmax(-1), rtol=1e-9, atol=1e-9)


def test_folded_sandwich_norms_alibi_slopes_and_moved_rotary_tables():
    """Gemma 2-style sandwich norms after fold_ln (pre-norms RMSPre, post-norms with weights) convert exactly;
    ALiBi with 16 heads (TransformerLens' slopes one float32 ulp from BLOOM's) converts in float32 and is refused in
    float64; a float32 rotary model moved to float64 keeps float32 tables and is refused by name."""
    model = hooked("gemma2")
    x = tokens(model)
    model.process_weights_(fold_ln=True)
    assert model.cfg.normalization_type == "RMSPre"
    assert rel(pypattern.from_hf(model)(x), model(x)) <= 1e-10
    wide = dict(positional_embedding_type="alibi", n_heads=16, d_head=3, d_model=48)
    m32 = hooked("ln", torch.float32, **wide)
    assert rel(pypattern.from_hf(m32)(x), m32(x)) <= 1e-4
    with pytest.raises(UnsupportedModelError, match="ALiBi slopes with n_heads=16"):
        pypattern.from_hf(hooked("ln", **wide))
    moved = hooked("rms", torch.float32).to(torch.float64)
    assert moved.cfg.dtype == torch.float64
    with pytest.raises(UnsupportedModelError, match="rotary tables"):
        pypattern.from_hf(moved)


def test_patching_runs_through_transformer_lens_hooks_when_a_model_does_not_convert():
    """A HookedTransformer refused by the converter (an output vocabulary of its own) is patched through its own
    hook points: residual sites equal a naive loop of TransformerLens' hooked forwards."""
    from pypattern.patching import LogitDiff, activation_patching

    model = hooked("ln", d_vocab_out=30)
    clean, corr = tokens(model, seq=6, seed=0), tokens(model, seq=6, seed=1)
    ans, wrong = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    grid = activation_patching(
        model, "resid_pre", clean, corr, metric=LogitDiff(ans, wrong), positions=[2, 5]
    )
    _, cache = model.run_with_cache(clean)
    name = "blocks.1.hook_resid_pre"

    def put(t, hook):
        t = t.clone()
        t[:, 5] = cache[name][:, 5]
        return t

    want = _ld(model.run_with_hooks(corr, fwd_hooks=[(name, put)]), ans, wrong)
    torch.testing.assert_close(grid.values[:, 1, 1], want, rtol=1e-9, atol=1e-9)


def test_llama3_frequencies_in_float32():
    model = hooked(
        "llama",
        torch.float32,
        use_NTK_by_parts_rope=True,
        NTK_by_parts_factor=8.0,
        NTK_by_parts_low_freq_factor=1.0,
        NTK_by_parts_high_freq_factor=4.0,
        NTK_original_ctx_len=8,
    )
    ours = pypattern.from_hf(model)
    assert ours.cfg.rotary_scaling["rope_type"] == "llama3"
    x = tokens(model, seq=16)
    assert rel(ours(x), model(x)) <= 1e-4


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(d_vocab_out=30), "d_vocab_out=30"),
        (dict(act_fn="solu_ln", d_mlp=16), "act_fn='solu_ln'"),
        (dict(positional_embedding_type="shortformer"), "positional_embedding_type='shortformer'"),
        (dict(final_rms=True), "final_rms=True"),
        (dict(dtype=torch.bfloat16), "dtype=torch.bfloat16"),
        (dict(positional_embedding_type="alibi", n_heads=3, d_head=8), "ALiBi slopes with n_heads=3"),
        (
            dict(
                use_NTK_by_parts_rope=True,
                NTK_by_parts_factor=8.0,
                NTK_by_parts_low_freq_factor=1.0,
                NTK_by_parts_high_freq_factor=4.0,
                NTK_original_ctx_len=8,
                **ROPE,
            ),
            "use_NTK_by_parts_rope=True",
        ),
    ],
)
def test_unsupported_options_are_refused_by_name(kw, match):
    model = hooked("ln", **kw)
    with pytest.raises(UnsupportedModelError, match=match.replace("(", r"\(").replace(".", r"\.")):
        pypattern.from_hf(model)


@pytest.mark.parametrize(
    "option, lacks",
    [
        ("use_attn_result", ["blocks.0.attn.hook_result"]),
        ("use_split_qkv_input", ["blocks.0.hook_q_input", "blocks.0.hook_k_input", "blocks.0.hook_v_input"]),
        ("use_attn_in", ["blocks.0.hook_attn_in"]),
        ("use_hook_mlp_in", ["blocks.0.hook_mlp_in"]),
        ("use_hook_tokens", ["hook_tokens"]),
    ],
)
def test_options_adding_hook_points_convert_with_a_warning_naming_them(option, lacks):
    """An option that adds hook points pypattern's model does not have converts (same logits) with a warning that
    names the option and the hook points; those are in TransformerLens' cache and not in the converted model's."""
    model = hooked("ln", **{option: True})
    with pytest.warns(UserWarning, match=f"{option}=True") as caught:
        ours = pypattern.from_hf(model)
    message = " ".join(str(w.message) for w in caught)
    x = tokens(model)
    assert rel(ours(x), model(x)) <= 1e-10
    _, want = model.run_with_cache(x)
    _, got = ours.run_with_cache(x)
    for hook in lacks:
        assert hook in want and hook not in got
        assert hook.replace("blocks.0.", "blocks.N.") in message
    per_head = option in ("use_split_qkv_input", "use_attn_in")
    assert (
        want["blocks.0.ln1.hook_normalized"].shape != got["blocks.0.ln1.hook_normalized"].shape
    ) == per_head
    assert ("ln1.hook_normalized" in message) == per_head


def test_gated_mlp_with_a_bias_after_the_product_and_attached_hooks_are_refused():
    model = hooked("llama")
    with torch.no_grad():
        model.blocks[1].mlp.b_in.add_(0.1)
    with pytest.raises(UnsupportedModelError, match=r"blocks\.1\.mlp\.b_in"):
        pypattern.from_hf(model)
    model = hooked("ln")
    model.add_perma_hook("blocks.0.hook_resid_mid", lambda t, hook: t * 2)
    with pytest.raises(UnsupportedModelError, match="hooks attached at 'blocks.0.hook_resid_mid'"):
        pypattern.from_hf(model)


def _ld(logits, ans, wrong):
    last = logits[:, -1]
    return last.gather(-1, ans[:, None])[:, 0] - last.gather(-1, wrong[:, None])[:, 0]


@pytest.mark.parametrize("name", ["ln", "llama", "parallel"])
def test_patching_takes_a_hooked_transformer(name):
    """``activation_patching`` and ``attribution_patching`` on a HookedTransformer: resid_pre and per-head z equal a
    naive loop of TransformerLens' own hooked forwards (denoising: the corrupted run with one clean activation)."""
    from pypattern.patching import LogitDiff, activation_patching, attribution_patching

    model = hooked(name)
    clean, corr = tokens(model, seq=6, seed=0), tokens(model, seq=6, seed=1)
    ans, wrong = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    metric = LogitDiff(ans, wrong)
    _, cache = model.run_with_cache(clean)
    grids = {
        s: activation_patching(model, s, clean, corr, metric=metric, per_position=True)
        for s in ("resid_pre", "z")
    }
    for layer in range(2):
        for pos in (0, 3, 5):
            name_r = f"blocks.{layer}.hook_resid_pre"

            def put(t, hook, pos=pos, name_r=name_r):
                t = t.clone()
                t[:, pos] = cache[name_r][:, pos]
                return t

            want = _ld(model.run_with_hooks(corr, fwd_hooks=[(name_r, put)]), ans, wrong)
            torch.testing.assert_close(grids["resid_pre"].values[:, layer, pos], want, rtol=1e-9, atol=1e-9)
            for head in (0, 3):
                name_z = f"blocks.{layer}.attn.hook_z"

                def put_z(t, hook, pos=pos, head=head, name_z=name_z):
                    t = t.clone()
                    t[:, pos, head] = cache[name_z][:, pos, head]
                    return t

                want = _ld(model.run_with_hooks(corr, fwd_hooks=[(name_z, put_z)]), ans, wrong)
                got = grids["z"].values[:, layer, head, pos]
                torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    atp = attribution_patching(model, clean, corr, metric=metric, sites=["z"])
    ref = attribution_patching(pypattern.from_hf(model), clean, corr, metric=metric, sites=["z"])
    torch.testing.assert_close(atp["z"].values, ref["z"].values, rtol=0, atol=0)


def test_circuits_take_a_hooked_transformer():
    """Edge attribution and edge patching on a HookedTransformer equal those of its converted model, and patching
    every edge from the corrupted run reproduces TransformerLens' corrupted forward."""
    from pypattern import circuits
    from pypattern.patching import LogitDiff

    model = hooked("llama")
    clean, corr = tokens(model, seq=6, seed=0), tokens(model, seq=6, seed=1)
    ans, wrong = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    metric = LogitDiff(ans, wrong)
    graph = circuits.edges(model)
    assert len(graph) == len(circuits.edges(pypattern.from_hf(model)))
    eap = circuits.edge_attribution(model, clean, corr, metric=metric, method="eap")
    ref = circuits.edge_attribution(pypattern.from_hf(model), clean, corr, metric=metric, method="eap")
    torch.testing.assert_close(eap.values, ref.values, rtol=0, atol=0)
    every = torch.ones(len(graph), dtype=torch.bool)
    got = circuits.patch_edges(model, every, clean, corr, metric=metric)
    torch.testing.assert_close(got, _ld(model(corr), ans, wrong), rtol=1e-9, atol=1e-9)
    assert (got - _ld(model(clean), ans, wrong)).abs().max() > 1e-3  # the patch moved the metric


def test_alibi_with_capped_scores_is_refused_by_name():
    """TransformerLens caps the scores before adding the ALiBi bias, pypattern's model after: the combination is
    refused by name, as the converted model's logits would differ from TransformerLens' ones."""
    model = hooked("alibi", attn_scores_soft_cap=3.0)
    with pytest.raises(UnsupportedModelError, match="attn_scores_soft_cap=3.0 is not supported: with ALiBi"):
        pypattern.from_hf(model)


def test_a_model_that_differs_from_its_config_is_refused_unless_verify_is_false():
    """verify (the default) runs the HookedTransformer's own forward against the converted model's, as for a
    Hugging Face model: a cfg edited after the model was built (its modules keep what they were built with) is
    refused; verify=False converts what the config says."""
    model = hooked("ln")
    model.cfg.attn_scale = 2.0 * model.cfg.attn_scale
    with pytest.raises(UnsupportedModelError, match="HookedTransformer: the converted model's logits differ"):
        pypattern.from_hf(model)
    ours = pypattern.from_hf(model, verify=False)
    x = tokens(model)
    assert rel(ours(x), model(x)) > 1e-3


@pytest.mark.parametrize("norm, fold", [("RMSPre", False), ("RMS", True)])
def test_attention_only_models_with_sandwich_norms_convert(norm, fold):
    """An attention-only model with norms before and after its attention (no MLP, so no ln2): converted exactly,
    folded or not, with no weight given to the ln2 it does not have."""
    model = hooked("attn_only", normalization_type=norm, use_normalization_before_and_after=True)
    if fold:
        model.process_weights_(fold_ln=True, center_writing_weights=False, center_unembed=False)
    ours = pypattern.from_hf(model)
    x = tokens(model)
    assert rel(ours(x), model(x)) <= 1e-10


def test_ungrouped_key_value_hooks_convert_with_a_warning():
    """ungroup_grouped_query_attention repeats each key/value head in TransformerLens' hooks; the converted model
    computes the same function with one key/value head per group in its hooks, and says so."""
    model = hooked("llama", ungroup_grouped_query_attention=True)
    with pytest.warns(UserWarning, match="ungroup_grouped_query_attention=True"):
        ours = pypattern.from_hf(model)
    x = tokens(model)
    assert rel(ours(x), model(x)) <= 1e-10
    _, want = model.run_with_cache(x)
    _, got = ours.run_with_cache(x)
    assert want["blocks.0.attn.hook_k"].shape[2] == model.cfg.n_heads
    assert got["blocks.0.attn.hook_k"].shape[2] == model.cfg.n_key_value_heads


def test_weights_that_are_not_finite_or_on_the_meta_device_are_refused_by_name():
    """Refused naming the weight before the check against the model's own forward (whose difference would read
    as a changed configuration)."""
    model = hooked("ln")
    with torch.no_grad():
        model.blocks[0].mlp.W_in[0, 0] = float("nan")
    with pytest.raises(ValueError, match="'blocks.0.mlp.W_in' holds values that are not finite"):
        pypattern.from_hf(model)
    # weights on the meta device (TransformerLens itself cannot be built there: its weights moved there after)
    model = hooked("ln")
    model.blocks[1].mlp.W_out = torch.nn.Parameter(torch.empty_like(model.blocks[1].mlp.W_out, device="meta"))
    with pytest.raises(ValueError, match="model has parameters on the meta device .*'blocks.1.mlp.W_out'"):
        pypattern.from_hf(model)
