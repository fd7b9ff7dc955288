"""Configuration options against the Hugging Face model's own forward, beyond the other converter tests: keys a
config carries that its model class never reads (``layer_types`` / ``sliding_window`` on OLMo 2 and Qwen3-MoE's
undeclared ``layer_types``), odd rotary counts named by ``partial_rotary_factor``, checkpoints saved in float16 and
bfloat16 and loaded in float64, and combinations of options on inputs longer than ``max_position_embeddings``.

Every model is a tiny random configuration (two layers, width 48); nothing is downloaded.
"""

import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from pypattern import from_hf, from_pretrained  # noqa: E402
from pypattern.models.convert import UnsupportedModelError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

V = 53
LL = dict(
    hidden_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=40,
    max_position_embeddings=32,
)
QWEN3_MOE = dict(
    LL, moe_intermediate_size=12, num_experts=3, num_experts_per_tok=2, experts_implementation="eager"
)
_CLASS = {"GPT2": "GPT2LMHeadModel", "GPTNeoX": "GPTNeoXForCausalLM", "Gemma3Text": "Gemma3ForCausalLM"}


def build(family: str, kw: dict, dtype=torch.float64, impl: str = "sdpa", seed: int = 0):
    """A random ``family`` model of config ``kw`` (weights perturbed so biases and norm weights matter)."""
    kw = {"vocab_size": V, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": None, **kw}
    cfg = getattr(transformers, f"{family}Config")(**kw)
    cfg._attn_implementation = "eager" if family == "Gemma2" else impl
    torch.manual_seed(seed)
    model = getattr(transformers, _CLASS.get(family, f"{family}ForCausalLM"))(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.15 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.to(dtype).eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def tokens(t: int, n: int = 2) -> torch.Tensor:
    return torch.randint(0, V, (n, t), generator=torch.Generator().manual_seed(t))


# keys the model class does not read: the model attends to every earlier token, and so must the converted one
UNREAD = {
    "olmo2-layer-types-and-window": (
        "Olmo2",
        dict(LL, sliding_window=3, layer_types=["sliding_attention", "full_attention"]),
        [None, None],
    ),
    "qwen3moe-undeclared-layer-types": (
        "Qwen3Moe",
        dict(
            QWEN3_MOE,
            use_sliding_window=True,
            sliding_window=3,
            layer_types=["full_attention", "sliding_attention"],
        ),
        [3, 3],  # every layer reads config.sliding_window
    ),
}


@pytest.mark.parametrize("case", list(UNREAD))
def test_config_keys_the_model_class_does_not_read_are_left_out(case):
    family, kw, windows = UNREAD[case]
    hf = build(family, kw)
    model = from_hf(hf)
    assert [model.cfg.window(i) for i in range(2)] == windows
    x = tokens(20)
    with torch.no_grad():
        assert rel(model(x), hf(x).logits) <= 1e-10


def test_olmo3_still_reads_its_layer_types():
    hf = build("Olmo3", dict(LL, sliding_window=3, layer_types=["sliding_attention", "full_attention"]))
    model = from_hf(hf)
    assert [model.cfg.window(i) for i in range(2)] == [3, None]
    x = tokens(20)
    with torch.no_grad():
        assert rel(model(x), hf(x).logits) <= 1e-10


@pytest.mark.parametrize(
    "family,kw",
    [
        # head_dim 4 * 0.25 = 1 rotated dimension; the rotary embedding holds one frequency (2 dimensions)
        ("StableLm", dict(LL, hidden_size=16, partial_rotary_factor=0.25)),
        ("Phi", dict(LL, hidden_size=16, num_key_value_heads=4, partial_rotary_factor=0.25)),
    ],
    ids=["stablelm", "phi"],
)
def test_odd_rotary_count_is_refused_naming_partial_rotary_factor(family, kw):
    with pytest.raises(UnsupportedModelError, match=r"^partial_rotary_factor=0\.25 is not supported"):
        from_hf(build(family, kw))


_16BIT = {
    "llama-yarn": (
        "Llama",
        dict(
            LL,
            rope_parameters={
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 16,
                "rope_theta": 1e4,
            },
        ),
    ),
    "llama-llama3-biases": (
        "Llama",
        dict(
            LL,
            attention_bias=True,
            mlp_bias=True,
            rope_parameters={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
                "rope_theta": 5e5,
            },
        ),
    ),
    "gemma2-caps-scalar": (
        "Gemma2",
        dict(LL, head_dim=12, sliding_window=4, query_pre_attn_scalar=17, final_logit_softcapping=3.0),
    ),
    "granite-multipliers": (
        "Granite",
        dict(
            LL,
            attention_multiplier=0.3,
            embedding_multiplier=3.0,
            logits_scaling=2.0,
            residual_multiplier=0.5,
        ),
    ),
    "neox-partial": (
        "GPTNeoX",
        dict(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40, rotary_pct=0.25
        ),
    ),
    "gpt2-inverse-layer": (
        "GPT2",
        dict(n_embd=48, n_layer=2, n_head=4, n_positions=32, scale_attn_by_inverse_layer_idx=True),
    ),
}


@pytest.mark.parametrize("saved", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("case", list(_16BIT))
def test_checkpoint_saved_in_16_bits_loads_exactly_in_float64(case, saved, tmp_path):
    """The 16-bit weights read in float64 give the logits of the Hugging Face model loaded from the same directory in
    float64 (its rotary frequencies are recomputed in float32 on loading, as the converted model's are)."""
    family, kw = _16BIT[case]
    impl = "eager" if family == "Gemma2" else "sdpa"
    build(family, kw, torch.float32, impl).to(saved).save_pretrained(tmp_path)
    model = from_pretrained(tmp_path, dtype=torch.float64, attn_implementation=impl)
    cls = getattr(transformers, _CLASS.get(family, f"{family}ForCausalLM"))
    ref = cls.from_pretrained(tmp_path, dtype=torch.float64, attn_implementation=impl).eval()
    x = tokens(24)
    with torch.no_grad():
        assert rel(model(x), ref(x).logits) <= 1e-10
    native = from_pretrained(tmp_path, attn_implementation=impl)
    assert next(native.parameters()).dtype == saved


# several options at once, on inputs past max_position_embeddings=32 (rotary models read them)
COMBOS = {
    "llama-gqa-headdim-yarn-mscale-untied-gelu": (
        "Llama",
        dict(
            LL,
            num_key_value_heads=1,
            head_dim=10,
            hidden_act="gelu_pytorch_tanh",
            rms_norm_eps=0.3,
            tie_word_embeddings=False,
            attention_bias=True,
            attention_dropout=0.3,
            pad_token_id=2,
            rope_parameters={
                "rope_type": "yarn",
                "factor": 2.0,
                "original_max_position_embeddings": 16,
                "rope_theta": 100.0,
                "beta_fast": 8.0,
                "beta_slow": 2.0,
                "mscale": 1.5,
                "mscale_all_dim": 0.7,
            },
        ),
    ),
    "qwen3-window-layer-types-linear-headdim": (
        "Qwen3",
        dict(
            LL,
            head_dim=12,
            use_sliding_window=True,
            sliding_window=5,
            layer_types=["sliding_attention", "full_attention"],
            hidden_act="relu",
            rope_parameters={"rope_type": "linear", "factor": 3.5, "rope_theta": 500.0},
        ),
    ),
    "gemma3-caps-scalar-local-global": (
        "Gemma3Text",
        dict(
            LL,
            head_dim=12,
            sliding_window=5,
            layer_types=["sliding_attention", "full_attention"],
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
            query_pre_attn_scalar=7,
            hidden_activation="gelu",
        ),
    ),
    "granite-headdim-llama3-biases": (
        "Granite",
        dict(
            LL,
            head_dim=10,
            attention_bias=True,
            mlp_bias=True,
            attention_multiplier=7.0,
            embedding_multiplier=0.3,
            logits_scaling=2.0,
            residual_multiplier=0.3,
            rope_parameters={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 2.0,
                "original_max_position_embeddings": 16,
                "rope_theta": 5e5,
            },
        ),
    ),
    "neox-sequential-nobias-yarn-partial": (
        "GPTNeoX",
        dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=30,
            max_position_embeddings=32,
            use_parallel_residual=False,
            attention_bias=False,
            layer_norm_eps=0.2,
            hidden_act="gelu_new",
            rope_parameters={
                "rope_type": "yarn",
                "factor": 2.0,
                "original_max_position_embeddings": 16,
                "rope_theta": 100.0,
                "partial_rotary_factor": 0.25,
            },
        ),
    ),
}


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)], ids=["f64", "f32"])
@pytest.mark.parametrize("case", list(COMBOS))
def test_combined_options_convert_exactly_past_max_position_embeddings(case, dtype, tol):
    family, kw = COMBOS[case]
    hf = build(family, kw, dtype)
    model = from_hf(hf)
    x = tokens(45)
    with torch.no_grad():
        err = rel(model(x), hf(x).logits)
    assert err <= tol, f"relative logit error {err:.3g}"


def test_olmo3_layer_types_of_another_length_are_refused_by_name():
    hf = build("Olmo3", dict(LL, sliding_window=3, layer_types=["sliding_attention", "full_attention"]))
    hf.config.layer_types = ["sliding_attention"] * 3
    with pytest.raises(UnsupportedModelError, match=re.escape("layer_types=") + ".*expected one per layer"):
        from_hf(hf, verify=False)


_GPT2_SHAPE = dict(n_embd=48, n_layer=2, n_head=4, n_positions=64)
WIDENED = {
    "gptj": ("GPTJ", dict(_GPT2_SHAPE, rotary_dim=6)),
    "gptneo-local-global": (
        "GPTNeo",
        dict(
            hidden_size=48,
            num_layers=2,
            num_heads=4,
            attention_types=[[["local", "global"], 1]],
            window_size=3,
            max_position_embeddings=64,
        ),
    ),
    "gpt2": ("GPT2", _GPT2_SHAPE),
    "llama": ("Llama", LL),
    "neox": (
        "GPTNeoX",
        dict(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40, rotary_pct=0.5
        ),
    ),
}


@pytest.mark.parametrize("case", list(WIDENED))
def test_float32_model_converted_to_float64_computes_the_model_cast_to_float64(case):
    """``from_hf(model, dtype=torch.float64)`` of a float32 model with eager attention gives the logits of the model
    cast with ``.double()`` (GPT-J and GPT-Neo multiply queries and keys in float32 and add their mask in the model's
    dtype: a float64 model takes its softmax in float64)."""
    import copy

    family, kw = WIDENED[case]
    hf = build(family, kw, torch.float32, "eager")
    model = from_hf(hf, dtype=torch.float64)
    ref = copy.deepcopy(hf).double()
    x = tokens(20)
    with torch.no_grad():
        assert rel(model(x), ref(x).logits) <= 1e-10
