"""Hugging Face configuration options the other converter tests leave out, per family: every rotary scaling type
transformers implements (linear, dynamic, YaRN, Llama 3, LongRoPE) on inputs longer than the original context,
rotary fractions, head sizes other than ``hidden_size / heads``, biases, tied and untied embeddings, activations,
parallel and sequential blocks, windows, Falcon's and BLOOM's layouts, the mixtures of experts' routing options; in
float64 and float32 against the model's own forward. Options the converters do not reproduce are refused naming
the option, also from a directory written by ``save_pretrained`` (sharded safetensors included).

Every model is a tiny random configuration (two layers, widths 48-64, 61 tokens); nothing is downloaded.
"""

import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from pypattern import from_hf, from_pretrained  # noqa: E402
from pypattern.models.convert import UnsupportedModelError  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # a Qwen2-MoE shared expert of width 0: torch's initialisation of its empty weights
    pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning"),
]

V = 61
_CLASS = {
    "GPT2": "GPT2LMHeadModel",
    "GPTNeoX": "GPTNeoXForCausalLM",
    "Gemma3Text": "Gemma3ForCausalLM",
    "GPTJ": "GPTJForCausalLM",
}
_LEARNED_POSITIONS = ("GPT2", "GPTJ", "GPTBigCode", "Bloom")

LL = dict(
    hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=40
)
NEOX = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40)
FALCON = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4)
MOE = dict(LL, experts_implementation="eager")  # the grouped-matmul experts have no float64 kernel
QWEN2_MOE = dict(
    MOE, moe_intermediate_size=20, shared_expert_intermediate_size=24, num_experts=4, num_experts_per_tok=2
)
QWEN3_MOE = dict(MOE, head_dim=12, moe_intermediate_size=20, num_experts=4, num_experts_per_tok=2)
OPT = dict(
    hidden_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    ffn_dim=40,
    word_embed_proj_dim=48,
    pad_token_id=1,
)
# GPT-2's, GPT-J's and GPTBigCode's shared config names
GPT2_SHAPE = dict(n_embd=48, n_layer=2, n_head=4, n_positions=64)
GPTJ = dict(GPT2_SHAPE, resid_pdrop=0.0, embd_pdrop=0.0)


def build(family: str, kw: dict, dtype=torch.float64, impl: str | None = None, seed: int = 0):
    """A random ``family`` model of config ``kw`` (weights perturbed so biases and norm weights are not trivial)."""
    kw = {"vocab_size": V, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": None, **kw}
    if family not in _LEARNED_POSITIONS:
        kw.setdefault("max_position_embeddings", 64)
    cfg = getattr(transformers, f"{family}Config")(**kw)
    if impl is not None:
        cfg._attn_implementation = impl
    model = getattr(transformers, _CLASS.get(family, f"{family}ForCausalLM"))(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.15 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.to(dtype).eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def tokens(t: int, n: int = 2) -> torch.Tensor:
    return torch.randint(0, V, (n, t), generator=torch.Generator().manual_seed(1))


_LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
# scaled rotary embeddings past their original 16 positions (dynamic NTK: up to max_position_embeddings=32, where
# its frequencies are still the unscaled ones)
_ROPES = {
    "linear": ({"rope_type": "linear", "factor": 2.5}, 40),
    "dynamic": ({"rope_type": "dynamic", "factor": 2.0}, 32),
    "yarn": (_YARN, 40),
    "yarn-factor-only": ({"rope_type": "yarn", "factor": 4.0}, 40),
    "llama3": (_LLAMA3, 40),
}
_ROPE_FAMILIES = {
    "Llama": LL,
    "Mistral": LL,
    "Qwen2": LL,
    "Qwen3": dict(LL, head_dim=12),
    "Granite": LL,
    "Olmo": LL,
    "Olmo2": LL,
    "Starcoder2": LL,
    "Gemma": dict(LL, head_dim=12),
    "Gemma2": dict(LL, head_dim=12),
    "Phi": dict(LL, partial_rotary_factor=0.5),
    "StableLm": dict(LL, partial_rotary_factor=0.5),
    "GPTNeoX": dict(NEOX, rotary_pct=0.5),
    "Falcon": FALCON,
    "Helium": dict(LL, head_dim=12),
    "SmolLM3": dict(LL, no_rope_layers=[1, 1]),
    "SeedOss": dict(LL, head_dim=12),
    "Ernie4_5": dict(LL, head_dim=12),
    "Mixtral": dict(MOE, num_local_experts=4, num_experts_per_tok=2),
}
ROPE_CASES = {
    f"{fam}-{kind}": (fam, {**kw, "rope_scaling": dict(rope), "max_position_embeddings": 32}, t)
    for fam, kw in _ROPE_FAMILIES.items()
    for kind, (rope, t) in _ROPES.items()
    if not (fam == "Mixtral" and kind.startswith(("yarn", "dynamic")))  # Mixtral's config cannot build these
}


def _longrope(n: int, original: int = 32) -> dict:
    return {
        "rope_type": "longrope",
        "short_factor": [1.0 + 0.1 * i for i in range(n)],
        "long_factor": [2.0 + 0.2 * i for i in range(n)],
        "original_max_position_embeddings": original,
    }


# LongRoPE (the short factors: inputs up to original_max_position_embeddings=32); with a window the check's tokens
# stay within those positions too (Mistral's default window 4096 and a 40-token Phi-3 window exceed 32)
for _fam, _kw, _n in [
    ("Llama", LL, 6),
    ("GPTNeoX", dict(NEOX, rotary_pct=0.5), 4),
    ("Mistral", LL, 6),
    ("Gemma2", dict(LL, head_dim=12), 6),
    ("Phi", dict(LL, partial_rotary_factor=0.5), 3),
]:
    ROPE_CASES[f"{_fam}-longrope"] = (_fam, {**_kw, "rope_scaling": _longrope(_n)}, 32)
ROPE_CASES["Phi3-longrope-window40"] = (
    "Phi3",
    dict(LL, sliding_window=40, max_position_embeddings=128, original_max_position_embeddings=32)
    | {"rope_scaling": {k: v for k, v in _longrope(6).items() if k != "original_max_position_embeddings"}},
    32,
)

# options per family (T=40 tokens, past every window)
OPTION_CASES = {
    # GPT-2
    "gpt2-inverse-layer-unscaled": (
        "GPT2",
        dict(
            GPT2_SHAPE,
            scale_attn_by_inverse_layer_idx=True,
            scale_attn_weights=False,
        ),
    ),
    "gpt2-reorder-upcast-inverse": (
        "GPT2",
        dict(
            GPT2_SHAPE,
            reorder_and_upcast_attn=True,
            scale_attn_by_inverse_layer_idx=True,
        ),
    ),
    "gpt2-untied-ninner-eps": (
        "GPT2",
        dict(
            GPT2_SHAPE,
            tie_word_embeddings=False,
            n_inner=24,
            layer_norm_epsilon=1e-3,
        ),
    ),
    "gpt2-gelu_pytorch_tanh": (
        "GPT2",
        dict(GPT2_SHAPE, activation_function="gelu_pytorch_tanh"),
    ),
    # GPT-NeoX
    "neox-sequential-rot0.25-tied": (
        "GPTNeoX",
        dict(NEOX, rotary_pct=0.25, use_parallel_residual=False, tie_word_embeddings=True),
    ),
    "neox-partial-factor-in-rope-parameters": (
        "GPTNeoX",
        dict(
            NEOX, rope_parameters={"rope_type": "default", "rope_theta": 100.0, "partial_rotary_factor": 0.5}
        ),
    ),
    "neox-nobias-gelu_fast": ("GPTNeoX", dict(NEOX, attention_bias=False, hidden_act="gelu_fast")),
    # Llama family
    "llama-headdim20-biases-tied": (
        "Llama",
        dict(LL, head_dim=20, attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    ),
    "llama-pretraining-tp2-gelu": ("Llama", dict(LL, pretraining_tp=2, hidden_act="gelu", rms_norm_eps=1e-2)),
    "mistral-window5-headdim16": ("Mistral", dict(LL, sliding_window=5, head_dim=16)),
    "qwen2-window-notused": ("Qwen2", dict(LL, use_sliding_window=False, sliding_window=5)),
    "qwen2-yarn-window-layer1": (
        "Qwen2",
        dict(
            LL,
            rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
            use_sliding_window=True,
            sliding_window=6,
            max_window_layers=1,
        ),
    ),
    "qwen3-window-headdim32": (
        "Qwen3",
        dict(LL, head_dim=32, use_sliding_window=True, sliding_window=5, max_window_layers=0),
    ),
    "granite-headdim20-multipliers": (
        "Granite",
        dict(
            LL,
            head_dim=20,
            embedding_multiplier=3.0,
            attention_multiplier=0.2,
            residual_multiplier=0.4,
            logits_scaling=2.0,
        ),
    ),
    "olmo-clip-bias": ("Olmo", dict(LL, clip_qkv=0.2, attention_bias=True)),
    "olmo2-bias-tied": ("Olmo2", dict(LL, attention_bias=True, tie_word_embeddings=True)),
    "olmo3-mixed-yarn": (
        "Olmo3",
        dict(
            LL,
            sliding_window=5,
            layer_types=["sliding_attention", "full_attention"],
            rope_scaling=dict(_YARN),
        ),
    ),
    "smollm3-window-nope-llama3": (
        "SmolLM3",
        dict(
            LL,
            use_sliding_window=True,
            sliding_window=5,
            layer_types=["sliding_attention", "full_attention"],
            no_rope_layers=[1, 0],
            rope_scaling=dict(_LLAMA3),
        ),
    ),
    "helium-biases": ("Helium", dict(LL, head_dim=12, attention_bias=True, mlp_bias=True)),
    "ernie-bias-tied": ("Ernie4_5", dict(LL, head_dim=12, use_bias=True, tie_word_embeddings=True)),
    "seedoss-in-biases-only": (
        "SeedOss",
        dict(LL, head_dim=12, attention_bias=True, attention_out_bias=False, mlp_bias=True),
    ),
    "starcoder2-window-nobias-eps": (
        "Starcoder2",
        dict(LL, sliding_window=5, use_bias=False, norm_epsilon=1e-3),
    ),
    "phi3-window-partial": ("Phi3", dict(LL, sliding_window=5, partial_rotary_factor=0.5)),
    "phi3-su-legacy-name": (
        "Phi3",
        dict(
            LL,
            rope_scaling={"type": "su", "short_factor": [1.0] * 6, "long_factor": [2.0] * 6},
            original_max_position_embeddings=48,
            max_position_embeddings=128,
        ),
    ),
    # Phi / StableLM
    "phi-partial0.4-untied-gelu": (
        "Phi",
        dict(
            LL, num_key_value_heads=4, partial_rotary_factor=0.4, tie_word_embeddings=False, hidden_act="gelu"
        ),
    ),
    "stablelm-partial0.25-qkvbias-parallel": (
        "StableLm",
        dict(LL, hidden_size=64, partial_rotary_factor=0.25, use_qkv_bias=True, use_parallel_residual=True),
    ),
    # Gemma
    "gemma2-caps-scalar17": (
        "Gemma2",
        dict(
            LL, head_dim=12, attn_logit_softcapping=5.0, final_logit_softcapping=7.0, query_pre_attn_scalar=17
        ),
    ),
    "gemma2-no-caps-all-sliding": (
        "Gemma2",
        dict(
            LL,
            head_dim=12,
            attn_logit_softcapping=None,
            final_logit_softcapping=None,
            sliding_window=3,
            layer_types=["sliding_attention"] * 2,
        ),
    ),
    "gemma3-legacy-rope-fields": (  # rope_scaling with rope_theta / rope_local_base_freq, as Gemma 3 checkpoints
        "Gemma3Text",
        dict(
            LL,
            head_dim=12,
            sliding_window=4,
            rope_scaling={"rope_type": "linear", "factor": 8.0},
            rope_theta=1e6,
            rope_local_base_freq=1e4,
        ),
    ),
    "gemma3-local-and-global-yarn": (
        "Gemma3Text",
        dict(
            LL,
            head_dim=12,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={
                "full_attention": {**_YARN, "rope_theta": 1e6},
                "sliding_attention": {**_YARN, "rope_theta": 1e4},
            },
        ),
    ),
    # Falcon
    "falcon-mqa-sequential": ("Falcon", dict(FALCON, multi_query=True, parallel_attn=False)),
    "falcon-mha-parallel-untied": (
        "Falcon",
        dict(FALCON, multi_query=False, parallel_attn=True, tie_word_embeddings=False),
    ),
    "falcon-new-one-norm": (
        "Falcon",
        dict(FALCON, new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=1),
    ),
    "falcon-new-kv1-ffn-relu": (
        "Falcon",
        dict(FALCON, new_decoder_architecture=True, num_kv_heads=1, ffn_hidden_size=40, activation="relu"),
    ),
    "falcon-theta-linear": (
        "Falcon",
        dict(FALCON, rope_theta=77.0, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    ),
    # BLOOM, OPT, GPT-J, GPT-Neo, GPT-BigCode
    "bloom-7heads-untied-eps": (
        "Bloom",
        dict(hidden_size=42, n_layer=2, n_head=7, tie_word_embeddings=False, layer_norm_epsilon=1e-3),
    ),
    "bloom-pretraining-tp2": ("Bloom", dict(hidden_size=48, n_layer=2, n_head=4, pretraining_tp=2)),
    "opt-untied-gelu-nobias": (
        "OPT",
        dict(OPT, tie_word_embeddings=False, activation_function="gelu", enable_bias=False),
    ),
    "gptj-rot6-gelu": ("GPTJ", dict(GPTJ, rotary_dim=6, activation_function="gelu")),
    "gptj-whole-head-tied": ("GPTJ", dict(GPTJ, rotary_dim=12, tie_word_embeddings=True)),
    "gptneo-local-global-window5": (
        "GPTNeo",
        dict(
            hidden_size=48,
            num_layers=2,
            num_heads=4,
            attention_types=[[["local", "global"], 1]],
            window_size=5,
        ),
    ),
    "bigcode-mha-fp32-softmax": (
        "GPTBigCode",
        dict(
            GPT2_SHAPE,
            multi_query=False,
            attention_softmax_in_fp32=True,
            scale_attention_softmax_in_fp32=True,
        ),
    ),
    "bigcode-mqa-no-upcast-untied": (
        "GPTBigCode",
        dict(
            GPT2_SHAPE,
            attention_softmax_in_fp32=False,
            tie_word_embeddings=False,
        ),
    ),
    # mixtures of experts
    "mixtral-top1-window-headdim": (
        "Mixtral",
        dict(MOE, num_local_experts=4, num_experts_per_tok=1, sliding_window=5, head_dim=16),
    ),
    "qwen2moe-normalised-window": (
        "Qwen2Moe",
        dict(QWEN2_MOE, norm_topk_prob=True, use_sliding_window=True, sliding_window=5, max_window_layers=0),
    ),
    "qwen2moe-zero-width-shared-expert": ("Qwen2Moe", dict(QWEN2_MOE, shared_expert_intermediate_size=0)),
    "qwen3moe-window": ("Qwen3Moe", dict(QWEN3_MOE, use_sliding_window=True, sliding_window=5)),
    "qwen3moe-unnormalised-bias": ("Qwen3Moe", dict(QWEN3_MOE, norm_topk_prob=False, attention_bias=True)),
    "olmoe-normalised-bias": (
        "Olmoe",
        dict(
            MOE,
            num_experts=4,
            num_experts_per_tok=2,
            intermediate_size=20,
            norm_topk_prob=True,
            attention_bias=True,
        ),
    ),
}
_EAGER_ONLY = ("Gemma2", "Bloom", "GPTNeo")  # transformers builds them with eager attention only


def _check_exact(family: str, kw: dict, t: int, dtype: torch.dtype, tol: float, impl: str | None = None):
    impl = "eager" if family in _EAGER_ONLY else impl
    hf = build(family, kw, dtype, impl)
    model = from_hf(
        hf
    )  # the conversion (and its check against the model) comes first: a long input would move
    x = tokens(t)  # LongRoPE's and dynamic NTK's frequencies of the Hugging Face model
    with torch.no_grad():
        err = rel(model(x), hf(x).logits)
    assert err <= tol, f"relative logit error {err:.3g} > {tol:g}"
    return hf, model


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)], ids=["f64", "f32"])
@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_scaled_rotary_embeddings_of_every_family_convert_exactly(case, dtype, tol):
    family, kw, t = ROPE_CASES[case]
    _check_exact(family, kw, t, dtype, tol)


@pytest.mark.parametrize("dtype,tol,impl", [(torch.float64, 1e-10, "sdpa"), (torch.float32, 1e-4, "eager")])
@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_family_options_convert_exactly(case, dtype, tol, impl):
    family, kw = OPTION_CASES[case]
    _check_exact(family, kw, 40, dtype, tol, impl)


def test_qwen3_moe_window_applies_to_every_layer():
    """Qwen3-MoE's config has no layer_types: with use_sliding_window every layer reads sliding_window (its
    max_window_layers is unused), and the converted model has that window in each layer; without, none."""
    model = from_hf(
        build("Qwen3Moe", dict(QWEN3_MOE, use_sliding_window=True, sliding_window=5, max_window_layers=1))
    )
    assert [model.cfg.window(i) for i in range(2)] == [5, 5]
    model = from_hf(build("Qwen3Moe", dict(QWEN3_MOE, use_sliding_window=False, sliding_window=5)))
    assert [model.cfg.window(i) for i in range(2)] == [None, None]


def test_qwen2_moe_zero_width_shared_expert_is_left_out():
    """A shared expert of width 0 adds sigmoid(gate) * 0: the converted model has no shared expert, and its logits
    equal the model's (checked in test_family_options_convert_exactly)."""
    model = from_hf(build("Qwen2Moe", dict(QWEN2_MOE, shared_expert_intermediate_size=0)))
    assert model.cfg.moe_shared_d_mlp is None
    assert not [n for n, _ in model.named_parameters() if "shared" in n]


def test_the_check_stays_within_longrope_short_factors_and_leaves_the_model_alone():
    """A window longer than LongRoPE's original length: the conversion's check runs at most that many tokens (the
    converted model refuses longer ones, and the Hugging Face model would switch to its long factors), and the
    Hugging Face model's frequencies are left as they were."""
    family, kw, _ = ROPE_CASES["Phi3-longrope-window40"]
    hf = build(family, kw)
    before = hf.model.rotary_emb.inv_freq.clone()
    model = from_hf(hf)
    assert model.cfg.rotary_position_limit == 32 and model.cfg.sliding_window == 40
    assert torch.equal(hf.model.rotary_emb.inv_freq, before)
    with torch.no_grad(), pytest.raises(ValueError, match="position 32 is past the 32 positions"):
        model(tokens(33, 1))


_REFUSED = {
    "opt-projected-embedding": ("OPT", dict(OPT, word_embed_proj_dim=32), "word_embed_proj_dim=32"),
    "opt-post-layernorm": ("OPT", dict(OPT, do_layer_norm_before=False), "do_layer_norm_before=False"),
    "opt-no-final-layernorm": ("OPT", dict(OPT, _remove_final_layer_norm=True), "final_layer_norm"),
    "falcon-alibi": ("Falcon", dict(FALCON, alibi=True), "alibi=True"),
    "falcon-new-sequential": (
        "Falcon",
        dict(FALCON, new_decoder_architecture=True, num_kv_heads=2, parallel_attn=False),
        "parallel_attn=False",
    ),
    "bloom-residual-post-layernorm": (
        "Bloom",
        dict(hidden_size=48, n_layer=2, n_head=4, apply_residual_connection_post_layernorm=True),
        "apply_residual_connection_post_layernorm=True",
    ),
    "phi-qk-layernorm": ("Phi", dict(LL, num_key_value_heads=4, qk_layernorm=True), "qk_layernorm=True"),
    "stablelm-qk-layernorm": ("StableLm", dict(LL, hidden_size=64, qk_layernorm=True), "qk_layernorm=True"),
    "stablelm-odd-rotary-count": (
        "StableLm",
        dict(LL, partial_rotary_factor=0.25),
        "partial_rotary_factor=0.25",
    ),
    "neox-odd-rotary-count": ("GPTNeoX", dict(NEOX, hidden_size=48, rotary_pct=0.25), "rotary_pct=0.25"),
    "olmoe-clip-after-norms": (
        "Olmoe",
        dict(MOE, num_experts=4, num_experts_per_tok=2, intermediate_size=20, clip_qkv=0.3),
        "clip_qkv=0.3",
    ),
    "qwen3moe-dense-layers": (
        "Qwen3Moe",
        dict(QWEN3_MOE, decoder_sparse_step=2),
        "layers[0].mlp='Qwen3MoeMLP'",
    ),
    "gpt2-reorder-upcast-float64-eager": (
        "GPT2",
        dict(GPT2_SHAPE, reorder_and_upcast_attn=True),
        "reorder_and_upcast_attn=True",
    ),
    "falcon-sqrtsoftplus": ("Falcon", dict(FALCON, activation="sqrtsoftplus"), "activation='sqrtsoftplus'"),
    "gemma-laplace": ("Gemma", dict(LL, head_dim=12, hidden_act="laplace"), "hidden_act='laplace'"),
}


@pytest.mark.parametrize("case", list(_REFUSED))
def test_unconverted_options_are_refused_by_name(case):
    family, kw, option = _REFUSED[case]
    impl = "eager" if "eager" in case else None
    with pytest.raises(UnsupportedModelError, match=f"{re.escape(option)}.*is not supported"):
        from_hf(build(family, kw, impl=impl))


@pytest.mark.parametrize(
    "family,kw",
    [
        ("Llama", dict(LL, rope_scaling=dict(_LLAMA3), tie_word_embeddings=True)),
        ("Gemma2", dict(LL, head_dim=12, sliding_window=4, final_logit_softcapping=3.0)),
        ("Qwen3Moe", dict(QWEN3_MOE, use_sliding_window=True, sliding_window=5)),
        ("Falcon", dict(FALCON, new_decoder_architecture=True, num_kv_heads=2, bias=True)),
    ],
    ids=["llama3-tied", "gemma2-capped-window", "qwen3moe-window", "falcon-new"],
)
def test_sharded_directory_loads_exactly(family, kw, tmp_path):
    """A float32 checkpoint saved in several safetensors shards loads in its own dtype (to float32 rounding) and in
    float64 (exactly the float32 weights, against the model run in float64 on them)."""
    hf = build(family, kw, torch.float32, "eager")
    hf.save_pretrained(tmp_path, max_shard_size="10KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    x = tokens(24)
    f32 = from_pretrained(tmp_path, attn_implementation="eager")
    assert next(f32.parameters()).dtype == torch.float32
    with torch.no_grad():
        assert rel(f32(x), hf(x).logits) <= 1e-4
        f64 = from_pretrained(tmp_path, dtype=torch.float64, attn_implementation="eager")
        experts = {"experts_implementation": "eager"} if "experts_implementation" in kw else {}
        ref = getattr(transformers, type(hf).__name__).from_pretrained(
            tmp_path, dtype=torch.float64, attn_implementation="eager", **experts
        )
        assert rel(f64(x), ref.eval()(x).logits) <= 1e-10


@pytest.mark.parametrize(
    "case", ["opt-projected-embedding", "falcon-alibi", "phi-qk-layernorm", "bloom-residual-post-layernorm"]
)
def test_directory_with_an_unconverted_option_is_refused_by_name(case, tmp_path):
    family, kw, option = _REFUSED[case]
    build(family, kw, torch.float32).save_pretrained(tmp_path, max_shard_size="10KB")
    with pytest.raises(UnsupportedModelError, match=f"{re.escape(option)}.*is not supported"):
        from_pretrained(tmp_path)
