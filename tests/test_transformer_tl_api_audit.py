"""pypattern's ``Transformer`` as a TransformerLens user reaches it: the stacked weight accessors of a model without
the weight raise their own message (not ``nn.Module``'s bare "has no attribute"), a residual stream of another
dtype than the weights given with ``start_at_layer`` is refused by name, ``load_state_dict(assign=True)`` of
weights of another dtype computes as a model of that dtype, the losses against TransformerLens'
``lm_cross_entropy_loss``, and the converted model's weights and sizes against a ``TransformerBridge`` of the same
Hugging Face model (those checks skip where TransformerLens 4.x is not importable)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

from pypattern.models import Transformer, TransformerConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(**kw) -> Transformer:
    base = dict(n_layers=2, d_model=16, n_heads=4, d_mlp=32, d_vocab=11, n_ctx=8, dtype=torch.float64)
    return Transformer(TransformerConfig(**{**base, **kw}))


def _tokens(b=2, t=6, vocab=11, seed=0):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "kw, name, says",
    [
        (dict(attn_bias=False), "b_V", "attn_bias=False"),
        (dict(attn_bias=False), "b_Q", "attn_bias=False"),
        (dict(attn_out_bias=False), "b_O", "attn_out_bias=False"),
        (dict(mlp_bias=False), "b_in", "mlp_bias=False"),
        (dict(mlp_bias=False), "b_out", "mlp_bias=False"),
        (dict(), "W_gate", "gated_mlp=False"),
        (dict(d_mlp=None), "W_in", "attention-only"),
        (dict(d_mlp=None), "W_out", "attention-only"),
        (dict(positional_embedding_type="rotary"), "W_pos", "positional_embedding_type='rotary'"),
        (dict(positional_embedding_type="alibi"), "W_pos", "positional_embedding_type='alibi'"),
    ],
)
def test_an_accessor_of_a_weight_the_model_lacks_raises_its_own_message(kw, name, says):
    model = _model(**kw)
    with pytest.raises(AttributeError, match=f"^{name}: .*{says}"):
        getattr(model, name)
    assert not hasattr(model, name)
    # an attribute that is neither a weight accessor nor a module keeps nn.Module's message
    with pytest.raises(AttributeError, match="has no attribute 'W_nothing'"):
        model.W_nothing  # noqa: B018
    # the accessors of weights the model has still stack them
    assert model.W_Q.shape == (2, 4, 16, 4) and model.embed is model.get_submodule("embed")


@pytest.mark.parametrize("model_dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_a_residual_stream_of_another_dtype_than_the_weights_is_refused_by_name(model_dtype):
    model = _model(dtype=model_dtype)
    x = _tokens()
    resid = model(x, stop_at_layer=1)
    assert resid.dtype == model_dtype
    # the model's own residual stream resumes exactly
    assert torch.equal(model(resid, start_at_layer=1), model(x))
    for other in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        if other == model_dtype:
            continue
        with pytest.raises(ValueError, match=rf"start_at_layer=1 .*{other}.*resid\.to\({model_dtype}\)"):
            model(resid.to(other), start_at_layer=1)


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(normalization_type="RMS", positional_embedding_type="rotary", gated_mlp=True, embed_scale=3.0),
    ],
    ids=["layer_norm", "rms_rotary_gated"],
)
def test_weights_of_another_dtype_assigned_compute_as_a_model_of_that_dtype(kw):
    source = _model(**kw)
    x = _tokens()
    for built, given in ((torch.float32, torch.bfloat16), (torch.bfloat16, torch.float64)):
        state = {k: v.to(given) for k, v in source.state_dict().items()}
        made = _model(**kw, dtype=given, seed=3)
        made.load_state_dict(state)
        assigned = _model(**kw, dtype=built, seed=3)
        assigned.load_state_dict(state, assign=True)
        assert assigned.cfg.dtype == given and assigned.W_E.dtype == given
        assert torch.equal(assigned(x), made(x)), (built, given)
        # a copy (no assign) is cast into the model's own dtype, which stays
        copied = _model(**kw, dtype=built, seed=3)
        copied.load_state_dict(state)
        assert copied.cfg.dtype == built and copied.W_E.dtype == built


def test_losses_equal_transformer_lens_cross_entropy():
    lm = pytest.importorskip("transformer_lens.utilities.lm_utils")
    model = _model(output_logits_soft_cap=5.0, logits_scaling=2.0, tie_word_embeddings=True)
    x = _tokens(3, 7)
    logits = model(x)
    want_per_token = lm.lm_cross_entropy_loss(logits, x, per_token=True)
    assert want_per_token.shape == (3, 6)
    torch.testing.assert_close(model(x, return_type="per_token_loss"), want_per_token, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        model(x, return_type="loss", loss_per_token=True), want_per_token, rtol=0, atol=1e-12
    )
    both_logits, both_loss = model(x, return_type="both")
    assert torch.equal(both_logits, logits)
    want = lm.lm_cross_entropy_loss(logits, x)
    torch.testing.assert_close(model(x, return_type="loss"), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(both_loss, want, rtol=0, atol=1e-12)
    # int32 ids: the same losses
    torch.testing.assert_close(model(x.int(), return_type="loss"), want, rtol=0, atol=1e-12)


def _bridge_pair(case, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("transformer_lens")
    try:
        import transformer_lens.model_bridge as bridge_mod
    except ImportError:
        pytest.skip("TransformerLens without TransformerBridge")
    import pypattern

    sys.path.insert(0, str(Path(__file__).parent))
    import test_convert as tc

    hf = tc.hf_model(case, torch.float64)
    ours = pypattern.from_hf(hf)
    hf.config.architectures = [type(hf).__name__]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        br = bridge_mod.TransformerBridge.boot_transformers(
            case, hf_model=hf, dtype=torch.float64, device="cpu", tokenizer=tc._local_tokenizer(tmp_path)
        )
        br.enable_compatibility_mode(disable_warnings=True, no_processing=True)
    return ours, br.eval()


@pytest.mark.parametrize("case", ["gpt2-tied", "llama-gqa2-biases-tied-headdim"])
def test_stacked_weights_and_sizes_equal_the_bridges(case, tmp_path):
    ours, br = _bridge_pair(case, tmp_path)
    cfg = ours.cfg
    for f in ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab", "normalization_type"):
        assert getattr(cfg, f) == getattr(br.cfg, f), f
    if cfg.n_key_value_heads != cfg.n_heads:
        assert br.cfg.n_key_value_heads == cfg.n_key_value_heads
    names = ["W_E", "W_U", "W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O", "W_in", "W_out"]
    names += ["W_pos", "b_in", "b_out", "b_U"] if case.startswith("gpt2") else ["W_gate"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            mine, theirs = getattr(ours, name), getattr(br, name)
            if name in ("W_K", "W_V", "b_K", "b_V"):
                # HookedTransformer's layout: key/value heads repeated for their query heads (the bridge keeps
                # n_key_value_heads and repeats them in its QK / OV circuits)
                theirs = theirs.repeat_interleave(cfg.n_groups, dim=1)
            assert mine.shape == theirs.shape, name
            torch.testing.assert_close(mine, theirs, rtol=0, atol=0, msg=name)
        # the QK and OV circuits the bridge factors, from the stacked weights
        qk, ov = br.QK, br.OV
    torch.testing.assert_close(ours.W_Q @ ours.W_K.transpose(-2, -1), qk.AB, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.W_V @ ours.W_O, ov.AB, rtol=1e-12, atol=1e-12)
