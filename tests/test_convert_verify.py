"""from_hf checks the converted model against the Hugging Face model's own forward: a model changed after it was
built (a module swapped, a module's attribute or model.config edited) is refused instead of converted as its
configuration describes it."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from pypattern import from_hf, from_pretrained  # noqa: E402
from pypattern.models.convert import UnsupportedModelError  # noqa: E402


def _gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=61, n_positions=16)
    return transformers.GPT2LMHeadModel(cfg).double().eval()


def _neox():
    cfg = transformers.GPTNeoXConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=48, vocab_size=61
    )
    return transformers.GPTNeoXForCausalLM(cfg).double().eval()


def _llama():
    cfg = transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=48, vocab_size=61
    )
    return transformers.LlamaForCausalLM(cfg).double().eval()


def _edit_gpt2_scaling(m):
    for b in m.transformer.h:
        b.attn.scaling = 0.1


def _edit_neox_layer_scaling(m):
    m.gpt_neox.layers[1].attention.scaling = 0.1


def _edit_llama_act(m):
    for layer in m.model.layers:
        layer.mlp.act_fn = torch.nn.GELU()


def _edit_neox_config(m):
    m.config.use_parallel_residual = not m.config.use_parallel_residual


@pytest.mark.parametrize(
    "make, edit",
    [
        (_gpt2, _edit_gpt2_scaling),
        (_neox, _edit_neox_layer_scaling),
        (_llama, _edit_llama_act),
        (_neox, _edit_neox_config),
    ],
    ids=["gpt2-attn-scaling", "neox-one-layer-scaling", "llama-activation-swapped", "neox-config-edited"],
)
def test_a_model_changed_after_it_was_built_is_refused(make, edit):
    torch.manual_seed(0)
    model = make()
    x = torch.randint(0, 61, (2, 9))
    assert (from_hf(model)(x) - model(x).logits).abs().max() < 1e-10  # as built: converted exactly
    edit(model)
    with pytest.raises(UnsupportedModelError, match="differ from the model's own"):
        from_hf(model)
    # verify=False converts it as its configuration describes it (the old behaviour, on request)
    assert from_hf(model, verify=False).cfg.n_layers == 2


def test_the_check_leaves_the_models_modes_and_a_replaced_norm_gets_a_clear_error():
    model = _gpt2().train()
    with pytest.warns(UserWarning, match="train\\(\\) mode"):
        from_hf(model)
    assert all(m.training for m in model.modules())  # its modes are put back
    llama = _llama()
    llama.model.norm = torch.nn.LayerNorm(32).double()
    with pytest.raises(UnsupportedModelError, match="a module lacks what this class's layout reads"):
        from_hf(llama)
    with pytest.raises(TypeError, match="verify="):
        from_hf(_gpt2(), verify="yes")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_check_passes_conversions_in_other_dtypes(dtype):
    model = _llama().to(dtype)
    out = from_hf(model)
    assert next(out.parameters()).dtype == dtype
    assert next(from_hf(model, dtype=torch.float64).parameters()).dtype == torch.float64


def test_from_pretrained_names_a_bad_attention_implementation(tmp_path):
    _llama().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="attn_implementation='flash' is not valid"):
        from_pretrained(tmp_path, attn_implementation="flash")


def test_settings_read_from_the_modules_not_a_config_edited_afterwards():
    """A config edited after the model was built does not change what its modules compute: GPT-Neo's local window
    (its mask, built from window_size), BLOOM's and GPT-BigCode's head layout (n_head, multi_query). The converted
    model computes what the modules do (also past the few tokens from_hf's check runs)."""
    T = transformers
    torch.manual_seed(0)
    t = torch.randint(0, 64, (2, 40))
    neo = T.GPTNeoConfig(
        vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["local", "global"], 1]],
        window_size=12, max_position_embeddings=64,
    )  # fmt: skip
    cases = [
        (T.GPTNeoForCausalLM(neo), dict(window_size=9)),
        (
            T.BloomForCausalLM(T.BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4)),
            dict(n_head=2),
        ),
    ]
    for edit in (dict(multi_query=False), dict(n_head=2)):
        cfg = T.GPTBigCodeConfig(
            vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, multi_query=True
        )
        cases.append((T.GPTBigCodeForCausalLM(cfg), edit))
    for hf, edit in cases:
        hf = hf.double().eval()
        with torch.no_grad():
            for p in hf.parameters():
                p.add_(0.1 * torch.randn_like(p))
        for k, v in edit.items():
            setattr(hf.config, k, v)
        model = from_hf(hf)
        with torch.no_grad():
            want = hf(t).logits
        assert ((model(t) - want).abs().max() / want.abs().max()) <= 1e-10, (type(hf).__name__, edit)


def test_gptj_built_under_a_float64_default_dtype_converts_exactly():
    """GPT-J's rotary table holds float64 angles when the model was built with float64 as torch's default dtype
    (Hugging Face divides in the default dtype); the converted model computes its angles in the table's precision.
    A table in neither precision is refused."""
    T = transformers
    torch.manual_seed(0)
    before = torch.get_default_dtype()
    t = torch.randint(0, 64, (2, 64))
    for default in (torch.float64, torch.float32):
        torch.set_default_dtype(default)
        try:
            cfg = T.GPTJConfig(vocab_size=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=8, n_positions=64)
            hf = T.GPTJForCausalLM(cfg).eval()
        finally:
            torch.set_default_dtype(before)
        hf = hf.double()
        with torch.no_grad():
            for p in hf.parameters():
                p.add_(0.1 * torch.randn_like(p))
        model = from_hf(hf)
        assert model.cfg.rotary_dtype == default
        with torch.no_grad():
            want = hf(t).logits
        assert ((model(t) - want).abs().max() / want.abs().max()) <= 1e-10
    with torch.no_grad():
        hf.transformer.rotary_emb.embed_positions.mul_(1.001)
    with pytest.raises(UnsupportedModelError, match="rotary table"):
        from_hf(hf)


def _mixtral():
    cfg = transformers.MixtralConfig(
        vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32,
    )  # fmt: skip
    return transformers.MixtralForCausalLM(cfg).double().eval()


def test_a_float64_model_whose_own_forward_refuses_float64_is_checked_in_float32():
    """Hugging Face's mixture-of-experts layers refuse float64 inputs: the conversion of a float64 Mixtral is
    checked against a float32 copy's forward (it went unchecked, with a warning), so a model changed after it was
    built is still refused, and an unchanged one converts without a warning; its logits equal the float64 model's
    routing and experts computed in float32 to float32's rounding."""
    import warnings

    m = _mixtral()
    x = torch.randint(0, 61, (1, 8), generator=torch.Generator().manual_seed(1))
    with pytest.raises(RuntimeError):  # the premise: the model's own forward refuses float64
        m(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        conv = from_hf(m)
    assert conv.cfg.dtype == torch.float64
    ref = m.float()(x).logits.double()
    m.double()
    assert (conv(x) - ref).abs().max() <= 1e-4 * ref.abs().max()
    for layer in m.model.layers:  # a change the converter cannot see: the experts' activation swapped
        layer.mlp.experts.act_fn = torch.nn.GELU()
    with pytest.raises(UnsupportedModelError, match="differ from the model's own"):
        from_hf(m)
