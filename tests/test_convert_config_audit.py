"""Configuration options of every converted family against the Hugging Face model's own forward, with and without
an attention mask.

Each case is a tiny random float64 model (two layers, width 32, 64 tokens of vocabulary) with one or more options
set away from their defaults. The converted model (converted without ``from_hf``'s own check, so that the converter
alone is tested) must give the logits of the Hugging Face forward run without a mask, with an all-ones mask and with
a right-padded mask (on the unpadded positions), on inputs longer than any sliding window. Options the converted
model cannot compute are refused naming the Hugging Face option, never converted approximately.
"""

import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from pypattern import from_hf  # noqa: E402
from pypattern.models.convert import UnsupportedModelError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

V = 64
_CLASS = {"GPT2": "GPT2LMHeadModel", "GPTNeoX": "GPTNeoXForCausalLM", "Gemma3Text": "Gemma3ForCausalLM"}
_EAGER_ONLY = ("Gemma2", "Bloom", "GPTNeo")  # transformers builds them with eager attention only

LL = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=40
)
GEMMA = dict(LL, head_dim=8)
NEOX = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40)
FALCON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
GPT2_SHAPE = dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)
MOE = dict(LL, experts_implementation="eager")  # the grouped-matmul experts have no float64 kernel
_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 1e4}


def build(family: str, kw: dict, seed: int = 0):
    """A random float64 ``family`` model of config ``kw`` (weights perturbed so biases and norm weights matter)."""
    kw = {"vocab_size": V, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": None, **kw}
    if family not in ("GPT2", "GPTJ", "GPTBigCode", "Bloom"):
        kw.setdefault("max_position_embeddings", 64)
    cfg = getattr(transformers, f"{family}Config")(**kw)
    cfg._attn_implementation = "eager" if family in _EAGER_ONLY else "sdpa"
    model = getattr(transformers, _CLASS.get(family, f"{family}ForCausalLM"))(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.15 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.to(torch.float64).eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# (family, config, tokens): tokens past every window and past the scaled rotary embeddings' original length
EXACT = {
    "llama-yarn-mscale": (
        "Llama",
        dict(LL, rope_parameters={**_YARN, "mscale": 2.0, "mscale_all_dim": 1.0}),
        40,
    ),
    "qwen3-yarn-attention-factor-betas": (
        "Qwen3",
        dict(GEMMA, rope_parameters={**_YARN, "attention_factor": 0.7, "beta_fast": 8, "beta_slow": 2}),
        40,
    ),
    "olmo2-longrope-attention-factor": (
        "Olmo2",
        dict(
            LL,
            rope_parameters={
                "rope_type": "longrope",
                "short_factor": [1.0, 1.1, 1.2, 1.3],
                "long_factor": [2.0] * 4,
                "original_max_position_embeddings": 32,
                "rope_theta": 1e4,
                "attention_factor": 1.3,
            },
        ),
        30,
    ),
    "mistral-window1": ("Mistral", dict(LL, sliding_window=1), 12),
    "qwen2-explicit-layer-types": (
        "Qwen2",
        dict(
            LL, use_sliding_window=True, sliding_window=5, layer_types=["full_attention", "sliding_attention"]
        ),
        20,
    ),
    "qwen2moe-layer-types-unnormalised-noqkvbias": (
        "Qwen2Moe",
        dict(
            MOE,
            moe_intermediate_size=20,
            shared_expert_intermediate_size=24,
            num_experts=4,
            num_experts_per_tok=2,
            qkv_bias=False,
            use_sliding_window=True,
            sliding_window=5,
            layer_types=["sliding_attention", "full_attention"],
        ),
        20,
    ),
    "mixtral-window-jitter-at-eval": (
        "Mixtral",
        dict(MOE, num_local_experts=4, num_experts_per_tok=2, sliding_window=5, router_jitter_noise=0.1),
        20,
    ),
    "gemma-exact-gelu-bias-untied": (
        "Gemma",
        dict(GEMMA, hidden_activation="gelu", attention_bias=True, tie_word_embeddings=False),
        24,
    ),
    "gemma2-scalar5-caps-alternating-window": (
        "Gemma2",
        dict(
            GEMMA,
            query_pre_attn_scalar=5,
            attn_logit_softcapping=3.0,
            final_logit_softcapping=4.0,
            sliding_window=6,
            layer_types=["full_attention", "sliding_attention"],
        ),
        20,
    ),
    "gemma3-attention-cap-unused-local-rope": (
        "Gemma3Text",
        dict(
            GEMMA,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
            sliding_window=6,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            },
        ),
        20,
    ),
    "smollm3-nope-interval2": ("SmolLM3", dict(LL, no_rope_layer_interval=2), 24),
    "seedoss-out-bias-dropouts-at-eval": (
        "SeedOss",
        dict(GEMMA, attention_out_bias=True, residual_dropout=0.2, attention_dropout=0.3),
        24,
    ),
    "starcoder2-window1-dropouts-at-eval": (
        "Starcoder2",
        dict(LL, sliding_window=1, residual_dropout=0.2, embedding_dropout=0.1),
        12,
    ),
    "granite-int-multipliers-relu2": (
        "Granite",
        dict(
            LL,
            residual_multiplier=2,
            embedding_multiplier=3,
            attention_multiplier=1,
            logits_scaling=4,
            hidden_act="relu2",
        ),
        24,
    ),
    "phi3-partial-longrope-window": (
        "Phi3",
        dict(
            LL,
            partial_rotary_factor=0.5,
            sliding_window=5,
            original_max_position_embeddings=32,
            rope_parameters={
                "rope_type": "longrope",
                "short_factor": [1.0, 1.1],
                "long_factor": [2.0, 2.0],
                "rope_theta": 1e4,
                "partial_rotary_factor": 0.5,
            },
        ),
        30,
    ),
    "neox-yarn-partial-sequential": (
        "GPTNeoX",
        dict(
            NEOX,
            use_parallel_residual=False,
            rope_parameters={**_YARN, "partial_rotary_factor": 0.5},
        ),
        40,
    ),
    "falcon-mqa-sequential-bias": ("Falcon", dict(FALCON, parallel_attn=False, bias=True), 24),
    "falcon-one-norm-parallel-old-architecture": ("Falcon", dict(FALCON, num_ln_in_parallel_attn=1), 24),
    "falcon-sequential-ignores-norm-count": (
        "Falcon",
        dict(FALCON, parallel_attn=False, num_ln_in_parallel_attn=2),
        24,
    ),
    "bloom-slow-but-exact-tp2": (
        "Bloom",
        dict(hidden_size=32, n_layer=2, n_head=4, pretraining_tp=2, slow_but_exact=True),
        24,
    ),
    "opt-no-affine-no-bias": (
        "OPT",
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=40,
            word_embed_proj_dim=32,
            layer_norm_elementwise_affine=False,
            enable_bias=False,
        ),
        24,
    ),
    "gptneo-local-window1": (
        "GPTNeo",
        dict(
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            attention_types=[[["local", "global"], 1]],
            window_size=1,
        ),
        12,
    ),
    "gptj-whole-head-relu": ("GPTJ", dict(GPT2_SHAPE, rotary_dim=8, activation_function="relu"), 24),
    "bigcode-mha-unscaled": ("GPTBigCode", dict(GPT2_SHAPE, multi_query=False, scale_attn_weights=False), 24),
}


@pytest.mark.parametrize("case", list(EXACT))
def test_options_convert_exactly_with_and_without_an_attention_mask(case):
    family, kw, t = EXACT[case]
    hf = build(family, kw)
    model = from_hf(hf, verify=False)
    x = torch.randint(0, V, (2, t), generator=torch.Generator().manual_seed(1))
    pad = 3
    mask = torch.ones_like(x)
    mask[1, t - pad :] = 0  # the second sequence right-padded
    with torch.no_grad():
        mine = model(x)
        no_mask = hf(x).logits
        ones = hf(x, attention_mask=torch.ones_like(x)).logits
        padded = hf(x, attention_mask=mask).logits
    assert rel(mine, no_mask) <= 1e-10
    assert rel(mine, ones) <= 1e-10
    assert rel(mine[0], padded[0]) <= 1e-10
    assert rel(mine[1, : t - pad], padded[1, : t - pad]) <= 1e-10


REFUSED = {
    # Hugging Face's forward fails on these: a converted model would compute a function no Hugging Face model does
    "falcon-three-norms-new-architecture": (
        "Falcon",
        dict(FALCON, new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=3),
        "num_ln_in_parallel_attn=3",
    ),
    "falcon-two-norms-old-architecture": (
        "Falcon",
        dict(FALCON, num_ln_in_parallel_attn=2),
        "num_ln_in_parallel_attn=2",
    ),
    "helium-head-dim-past-output-projection": ("Helium", dict(LL, head_dim=12), "head_dim=12"),
    # values pypattern's Transformer does not take, named by the Hugging Face option
    "granite-zero-embedding-multiplier": (
        "Granite",
        dict(LL, embedding_multiplier=0.0),
        "embedding_multiplier=0.0",
    ),
    "granite-negative-attention-multiplier": (
        "Granite",
        dict(LL, attention_multiplier=-0.3),
        "attention_multiplier=-0.3",
    ),
    "granite-zero-residual-multiplier": (
        "Granite",
        dict(LL, residual_multiplier=0.0),
        "residual_multiplier=0.0",
    ),
    "granite-negative-logits-scaling": ("Granite", dict(LL, logits_scaling=-2.0), "logits_scaling=-2.0"),
    "gemma2-zero-final-cap": (
        "Gemma2",
        dict(GEMMA, final_logit_softcapping=0.0),
        "final_logit_softcapping=0.0",
    ),
    "gemma2-negative-attention-cap": (
        "Gemma2",
        dict(GEMMA, attn_logit_softcapping=-3.0),
        "attn_logit_softcapping=-3.0",
    ),
    "gemma3-negative-final-cap": (
        "Gemma3Text",
        dict(GEMMA, final_logit_softcapping=-2.0, sliding_window=4),
        "final_logit_softcapping=-2.0",
    ),
    "olmo-zero-clip": ("Olmo", dict(LL, clip_qkv=0.0), "clip_qkv=0.0"),
    # refused already; kept with the cases above so that every refusal of the audit is checked
    "falcon-old-architecture-grouped-keys": (
        "Falcon",
        dict(FALCON, multi_query=False, num_kv_heads=2),
        "num_kv_heads=2",
    ),
    "gptj-rotary-wider-than-head": ("GPTJ", dict(GPT2_SHAPE, rotary_dim=12), "rotary_dim=12"),
    "phi-odd-rotary-count": (
        "Phi",
        dict(LL, num_key_value_heads=4, partial_rotary_factor=0.375),
        "partial_rotary_factor=0.375",
    ),
    "phi3-odd-rotary-count": ("Phi3", dict(LL, partial_rotary_factor=0.375), "partial_rotary_factor=0.375"),
    "qwen2moe-dense-layer": (
        "Qwen2Moe",
        dict(
            MOE,
            moe_intermediate_size=20,
            shared_expert_intermediate_size=24,
            num_experts=4,
            num_experts_per_tok=2,
            mlp_only_layers=[0],
        ),
        "layers[0].mlp='Qwen2MoeMLP'",
    ),
    "gemma2-bidirectional": (
        "Gemma2",
        dict(GEMMA, use_bidirectional_attention=True),
        "use_bidirectional_attention",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unconverted_option_values_are_refused_by_their_hugging_face_name(case):
    family, kw, option = REFUSED[case]
    hf = build(family, kw)
    with pytest.raises(UnsupportedModelError, match=f"^{re.escape(option)}.*is not supported"):
        from_hf(hf)
