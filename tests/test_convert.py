"""Hugging Face models converted into pypattern's Transformer compute the same function as the Hugging Face forward.

Every case is a small random configuration (odd widths, 5 or 7 heads, grouped-query ratios 1/2/4 and multi-query,
rotary fractions 0.25/0.5/1, tied and untied embeddings, with and without biases, parallel and sequential
GPT-NeoX blocks) built from a ``transformers.<Family>Config`` with random weights; nothing is downloaded.
"""

import copy
import json
import os
import re
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from pypattern import from_hf, from_pretrained  # noqa: E402
from pypattern.models.convert import SUPPORTED_CLASSES, UnsupportedModelError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

V, CTX, T = 37, 16, 12
COMMON = dict(vocab_size=V, bos_token_id=0, eos_token_id=1, pad_token_id=None)

CASES = {
    "gpt2-tied": ("GPT2", dict(n_embd=40, n_layer=2, n_head=5, n_inner=56, n_positions=CTX)),
    "gpt2-inverse-layer-scaled": (  # the Stanford CRFM models' per-layer score scale d_head ** -0.5 / (layer + 1)
        "GPT2",
        dict(n_embd=40, n_layer=3, n_head=5, n_positions=CTX, scale_attn_by_inverse_layer_idx=True),
    ),
    "gpt2-untied-relu-unscaled": (
        "GPT2",
        dict(
            n_embd=42,
            n_layer=3,
            n_head=7,
            n_positions=CTX,
            tie_word_embeddings=False,
            activation_function="relu",
            scale_attn_weights=False,
        ),
    ),
    "neox-parallel-rot0.25": (
        "GPTNeoX",
        dict(
            hidden_size=40, num_hidden_layers=2, num_attention_heads=5, intermediate_size=56, rotary_pct=0.25
        ),
    ),
    "neox-sequential-rot0.5-tied-nobias": (
        "GPTNeoX",
        dict(
            hidden_size=56,
            num_hidden_layers=2,
            num_attention_heads=7,
            intermediate_size=60,
            rotary_pct=0.5,
            use_parallel_residual=False,
            tie_word_embeddings=True,
            attention_bias=False,
        ),
    ),
    "neox-rot1.0-gelu_new": (
        "GPTNeoX",
        dict(
            hidden_size=40,
            num_hidden_layers=2,
            num_attention_heads=5,
            intermediate_size=44,
            rotary_pct=1.0,
            rotary_emb_base=500,
            hidden_act="gelu_new",
        ),
    ),
    "llama-mha-untied": (
        "Llama",
        dict(
            hidden_size=56,
            num_hidden_layers=2,
            num_attention_heads=7,
            num_key_value_heads=7,
            intermediate_size=60,
        ),
    ),
    "llama-gqa2-biases-tied-headdim": (
        "Llama",
        dict(
            hidden_size=40,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=6,
            intermediate_size=52,
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=True,
            rope_theta=1234.0,
        ),
    ),
    "llama-mqa": (
        "Llama",
        dict(
            hidden_size=40,
            num_hidden_layers=2,
            num_attention_heads=5,
            num_key_value_heads=1,
            intermediate_size=44,
        ),
    ),
    "llama-yarn-mscale": (  # YaRN with mscale / mscale_all_dim; the 12-token inputs pass its original 8 positions
        "Llama",
        dict(
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=44,
            rope_scaling={
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 8,
                "mscale": 0.707,
                "mscale_all_dim": 1.0,
            },
        ),
    ),
    "qwen2-yarn-attention-factor-untruncated": (
        "Qwen2",
        dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            intermediate_size=40,
            rope_scaling={
                "rope_type": "yarn",
                "factor": 3.0,
                "original_max_position_embeddings": 4096,
                "attention_factor": 1.3,
                "beta_fast": 16.0,
                "beta_slow": 2.0,
                "truncate": False,
            },
        ),
    ),
    "llama-partial-factor-in-config": (  # Llama's rotary ignores partial_rotary_factor: the whole head turns
        "Llama",
        dict(
            hidden_size=40,
            num_hidden_layers=2,
            num_attention_heads=5,
            num_key_value_heads=5,
            intermediate_size=44,
            rope_parameters={"rope_type": "default", "rope_theta": 321.0, "partial_rotary_factor": 0.5},
        ),
    ),
    "mistral-gqa4-window": (
        "Mistral",
        dict(
            hidden_size=56,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=10,
            intermediate_size=60,
            sliding_window=4,
        ),
    ),
    "mistral-nowindow-tied": (
        "Mistral",
        dict(
            hidden_size=40,
            num_hidden_layers=2,
            num_attention_heads=5,
            num_key_value_heads=5,
            intermediate_size=48,
            sliding_window=None,
            tie_word_embeddings=True,
        ),
    ),
    "qwen2-gqa4-tied": (
        "Qwen2",
        dict(
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=2,
            intermediate_size=60,
            tie_word_embeddings=True,
        ),
    ),
    "gptneo-global-local-tied": (
        "GPTNeo",
        dict(
            hidden_size=40,
            num_layers=2,
            num_heads=5,
            intermediate_size=52,
            attention_types=[[["global", "local"], 1]],
            window_size=3,
        ),
    ),
    "gptneo-local-untied-relu": (
        "GPTNeo",
        dict(
            hidden_size=24,
            num_layers=3,
            num_heads=3,
            intermediate_size=None,
            attention_types=[[["local"], 3]],
            window_size=4,
            activation_function="relu",
            tie_word_embeddings=False,
        ),
    ),
    "phi3-gqa2-partial0.5": (
        "Phi3",
        dict(
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=2,
            intermediate_size=52,
            partial_rotary_factor=0.5,
        ),
    ),
    "phi3-longrope-partial0.75": (  # Phi-3.5 / Phi-4-mini: LongRoPE's short factors, a scaled cosine and sine
        "Phi3",
        dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=40,
            partial_rotary_factor=0.75,
            max_position_embeddings=128,
            original_max_position_embeddings=32,
            rope_scaling={
                "rope_type": "longrope",
                "short_factor": [1.0, 1.05, 1.1, 1.3, 1.6, 2.0],
                "long_factor": [2.0, 2.5, 3.0, 4.0, 5.0, 6.0],
                "original_max_position_embeddings": 32,
            },
        ),
    ),
    "phi3-mqa-window-tied": (
        "Phi3",
        dict(
            hidden_size=40,
            num_hidden_layers=2,
            num_attention_heads=5,
            num_key_value_heads=1,
            intermediate_size=44,
            sliding_window=4,
            tie_word_embeddings=True,
        ),
    ),
    "bigcode-mqa-tied": ("GPTBigCode", dict(n_embd=40, n_layer=2, n_head=5, n_inner=44, n_positions=CTX)),
    "bigcode-mha-untied-unscaled-gelu": (
        "GPTBigCode",
        dict(
            n_embd=42,
            n_layer=2,
            n_head=7,
            n_positions=CTX,
            multi_query=False,
            tie_word_embeddings=False,
            scale_attn_weights=False,
            activation_function="gelu",
        ),
    ),
    # mixtures of experts (their experts run one matmul each, "eager": the grouped matmul has no float64 kernel)
    "mixtral-gqa2-window": (
        "Mixtral",
        dict(
            hidden_size=40,
            num_hidden_layers=2,
            num_attention_heads=5,
            num_key_value_heads=1,
            intermediate_size=28,
            num_local_experts=5,
            num_experts_per_tok=2,
            sliding_window=6,
            experts_implementation="eager",
        ),
    ),
    "olmoe-coupled-heads-tied": (
        "Olmoe",
        dict(
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            intermediate_size=20,
            num_experts=6,
            num_experts_per_tok=3,
            tie_word_embeddings=True,
            pad_token_id=None,
            experts_implementation="eager",
        ),
    ),
    "qwen2moe-shared-expert": (  # a gated shared expert beside 4 routed ones
        "Qwen2Moe",
        dict(
            hidden_size=40,
            num_hidden_layers=2,
            num_attention_heads=5,
            num_key_value_heads=1,
            intermediate_size=28,
            moe_intermediate_size=20,
            shared_expert_intermediate_size=24,
            num_experts=4,
            num_experts_per_tok=2,
            experts_implementation="eager",
        ),
    ),
    "qwen3moe-gqa2-renormalised": (
        "Qwen3Moe",
        dict(
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=12,
            intermediate_size=40,
            moe_intermediate_size=20,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            experts_implementation="eager",
        ),
    ),
    "smollm3-nope-layers": (  # NoPE layers (no_rope_layers: every fourth by default; here layers 1 and 2)
        "SmolLM3",
        dict(
            hidden_size=40,
            num_hidden_layers=4,
            num_attention_heads=5,
            num_key_value_heads=1,
            intermediate_size=36,
            no_rope_layers=[1, 0, 0, 1],
            pad_token_id=None,
        ),
    ),
    "smollm3-window-tied": (
        "SmolLM3",
        dict(
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=40,
            use_sliding_window=True,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"] * 2,
            tie_word_embeddings=True,
            pad_token_id=None,
        ),
    ),
    "helium-adjacent-pairs": (  # rotary pairs (2i, 2i + 1), RMSNorm weights multiplied before the cast
        "Helium",
        dict(
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=12,
            intermediate_size=40,
            pad_token_id=None,
        ),
    ),
    "ernie45-float32-rotation": (  # rotary pairs (2i, 2i + 1) turned in float32, biases
        "Ernie4_5",
        dict(
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=12,
            intermediate_size=40,
            use_bias=True,
        ),
    ),
    "vaultgemma-window-capped-logits": (  # Gemma 2 without the norms after the attention and the MLP
        "VaultGemma",
        dict(
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            intermediate_size=40,
            sliding_window=3,
            query_pre_attn_scalar=10,
            attn_logit_softcapping=3.0,
            final_logit_softcapping=5.0,
        ),
    ),
    "exaone4-nope-global-layers": (  # norms after the sublayers, per-head q/k norms, rotary on sliding layers only
        "Exaone4",
        dict(
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            intermediate_size=40,
            sliding_window=3,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        ),
    ),
    "exaone4-no-window-tied": (
        "Exaone4",
        dict(
            hidden_size=24,
            num_hidden_layers=2,
            num_attention_heads=3,
            num_key_value_heads=1,
            head_dim=8,
            intermediate_size=40,
            sliding_window=None,
            layer_types=["full_attention"] * 2,
            tie_word_embeddings=True,
        ),
    ),
    "nemotron-layernorm1p-rot0.5": (  # LayerNorms multiplying by 1 + w, a plain squared-ReLU MLP, partial rotary
        "Nemotron",
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=40,
        ),
    ),
    "nemotron-biases-tied-full-rotary": (
        "Nemotron",
        dict(
            hidden_size=36,
            num_hidden_layers=2,
            num_attention_heads=3,
            num_key_value_heads=3,
            intermediate_size=40,
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=True,
            partial_rotary_factor=1.0,
        ),
    ),
    "ministral-windows-gqa2": (  # a sliding window on the layers layer_types names
        "Ministral",
        dict(
            hidden_size=48,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=12,
            intermediate_size=40,
            sliding_window=3,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            pad_token_id=None,
        ),
    ),
    "arcee-relu2-biases": (  # a plain squared-ReLU MLP (up_proj, down_proj)
        "Arcee",
        dict(
            hidden_size=40,
            num_hidden_layers=2,
            num_attention_heads=5,
            num_key_value_heads=1,
            head_dim=8,
            intermediate_size=36,
            attention_bias=True,
            mlp_bias=True,
            pad_token_id=None,
        ),
    ),
    "arcee-tied": (
        "Arcee",
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            head_dim=8,
            intermediate_size=40,
            tie_word_embeddings=True,
            pad_token_id=None,
        ),
    ),
    "glm-partial-adjacent": (  # adjacent rotary pairs on half of each head, q/k/v biases, fused gate_up_proj
        "Glm",
        dict(
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=12,
            intermediate_size=40,
            pad_token_id=None,
        ),
    ),
    "glm4-sandwich-rot0.25": (  # norms after the attention and the MLP; a quarter of each head turns
        "Glm4",
        dict(
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=3,
            num_key_value_heads=1,
            head_dim=16,
            intermediate_size=40,
            partial_rotary_factor=0.25,
            attention_bias=False,
            tie_word_embeddings=True,
            pad_token_id=None,
        ),
    ),
    "seedoss-biases": (
        "SeedOss",
        dict(
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=40,
            attention_bias=True,
            attention_out_bias=True,
        ),
    ),
    "granite-gqa2-multipliers": (  # Granite's embedding, attention, residual and logits multipliers
        "Granite",
        dict(
            hidden_size=40,
            num_hidden_layers=2,
            num_attention_heads=5,
            num_key_value_heads=1,
            intermediate_size=36,
            embedding_multiplier=12.0,
            attention_multiplier=0.0078125,
            residual_multiplier=0.22,
            logits_scaling=8.0,
        ),
    ),
    "granite-biases-tied": (
        "Granite",
        dict(
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=40,
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=True,
            embedding_multiplier=2.5,
            attention_multiplier=0.3,
            residual_multiplier=0.5,
            logits_scaling=3.0,
        ),
    ),
    "starcoder2-gqa2-window-biases": (
        "Starcoder2",
        dict(
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=44,
            sliding_window=5,
        ),
    ),
    # Falcon-7B's layout: multi-query, attention and MLP in parallel on one LayerNorm, no biases
    "falcon-mqa-parallel-tied": (
        "Falcon",
        dict(
            hidden_size=40, num_hidden_layers=2, num_attention_heads=5, multi_query=True, parallel_attn=True
        ),
    ),
    # Falcon-40B/180B's: grouped query/key/value rows per key/value head, two LayerNorms, biases
    "falcon-new-gqa-two-norms-bias": (
        "Falcon",
        dict(
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_kv_heads=2,
            new_decoder_architecture=True,
            bias=True,
            tie_word_embeddings=False,
            rope_theta=500.0,
        ),
    ),
    # per-head q/k/v rows, sequential blocks, biases
    "falcon-sequential-per-head-bias": (
        "Falcon",
        dict(
            hidden_size=40,
            num_hidden_layers=3,
            num_attention_heads=5,
            multi_query=False,
            parallel_attn=False,
            bias=True,
        ),
    ),
    "bloom-alibi-6heads-tied": ("Bloom", dict(hidden_size=48, n_layer=2, n_head=6)),  # 6: two slope series
    "bloom-alibi-5heads-untied": (
        "Bloom",
        dict(hidden_size=40, n_layer=3, n_head=5, tie_word_embeddings=False),
    ),
    "starcoder2-mqa-untied-nobias-gelu": (
        "Starcoder2",
        dict(
            hidden_size=40,
            num_hidden_layers=2,
            num_attention_heads=5,
            num_key_value_heads=1,
            intermediate_size=36,
            use_bias=False,
            tie_word_embeddings=False,
            hidden_act="gelu",
        ),
    ),
    "qwen3-gqa2-tied": (
        "Qwen3",
        dict(
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=2,
            intermediate_size=60,
            tie_word_embeddings=True,
        ),
    ),
    "qwen3-mqa-bias-headdim": (
        "Qwen3",
        dict(
            hidden_size=40,
            num_hidden_layers=2,
            num_attention_heads=5,
            num_key_value_heads=1,
            head_dim=6,
            intermediate_size=48,
            attention_bias=True,
            tie_word_embeddings=False,
        ),
    ),
    "qwen2-mqa-window-untied": (
        "Qwen2",
        dict(
            hidden_size=40,
            num_hidden_layers=2,
            num_attention_heads=5,
            num_key_value_heads=1,
            intermediate_size=48,
            tie_word_embeddings=False,
            use_sliding_window=True,
            sliding_window=3,
            max_window_layers=0,
        ),
    ),
    "gemma-mqa-tied": (
        "Gemma",
        dict(
            hidden_size=40,
            num_hidden_layers=2,
            num_attention_heads=5,
            num_key_value_heads=1,
            head_dim=8,
            intermediate_size=44,
        ),
    ),
    "gemma-gqa2-headdim-untied-bias": (
        "Gemma",
        dict(
            hidden_size=36,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=10,
            intermediate_size=40,
            tie_word_embeddings=False,
            attention_bias=True,
        ),
    ),
    "gemma2-gqa2-capped-window": (
        "Gemma2",
        dict(
            hidden_size=40,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=12,
            intermediate_size=44,
            sliding_window=4,
            query_pre_attn_scalar=20,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
        ),
    ),
    "gemma3-local-global-rope": (
        "Gemma3Text",
        dict(
            hidden_size=40,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=12,
            intermediate_size=44,
            sliding_window=3,
            sliding_window_pattern=2,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=1.0,  # configured, but Gemma 3's attention does not apply it
            final_logit_softcapping=9.0,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
        ),
    ),
    "gptj-rot4": (
        "GPTJ",
        dict(n_embd=40, n_layer=2, n_head=5, rotary_dim=4, n_positions=CTX, resid_pdrop=0.0, embd_pdrop=0.0),
    ),
    "gptj-rot2-tied-relu": (
        "GPTJ",
        dict(
            n_embd=36,
            n_layer=3,
            n_head=3,
            rotary_dim=2,
            n_inner=20,
            n_positions=CTX,
            activation_function="relu",
            tie_word_embeddings=True,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
        ),
    ),
    "opt-relu": (
        "OPT",
        dict(
            hidden_size=40,
            num_hidden_layers=2,
            num_attention_heads=5,
            ffn_dim=52,
            word_embed_proj_dim=40,
            dropout=0.0,
            pad_token_id=1,
        ),
    ),
    "opt-lnpre-nobias-gelu": (
        "OPT",
        dict(
            hidden_size=36,
            num_hidden_layers=3,
            num_attention_heads=3,
            ffn_dim=40,
            word_embed_proj_dim=36,
            layer_norm_elementwise_affine=False,
            enable_bias=False,
            activation_function="gelu",
            dropout=0.0,
            pad_token_id=1,
        ),
    ),
    "stablelm-partial0.25": (
        "StableLm",
        dict(
            hidden_size=40,
            num_hidden_layers=2,
            num_attention_heads=5,
            num_key_value_heads=5,
            intermediate_size=44,
            partial_rotary_factor=0.25,
        ),
    ),
    "stablelm-parallel-gqa2-qkvbias-tied": (
        "StableLm",
        dict(
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=40,
            use_parallel_residual=True,
            use_qkv_bias=True,
            tie_word_embeddings=True,
            partial_rotary_factor=0.5,
        ),
    ),
    "phi-partial0.5": (
        "Phi",
        dict(
            hidden_size=40,
            num_hidden_layers=2,
            num_attention_heads=5,
            intermediate_size=44,
            partial_rotary_factor=0.5,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
        ),
    ),
    "phi-gqa2-tied-rot1": (
        "Phi",
        dict(
            hidden_size=48,
            num_hidden_layers=3,
            num_attention_heads=6,
            num_key_value_heads=2,
            intermediate_size=40,
            partial_rotary_factor=1.0,
            tie_word_embeddings=True,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
        ),
    ),
    "olmo-clip-gqa2": (
        "Olmo",
        dict(
            hidden_size=40,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=44,
            clip_qkv=0.4,
        ),
    ),
    "olmo-tied-bias": (
        "Olmo",
        dict(
            hidden_size=36,
            num_hidden_layers=2,
            num_attention_heads=3,
            intermediate_size=40,
            attention_bias=True,
            tie_word_embeddings=True,
        ),
    ),
    "olmo2-gqa2": (
        "Olmo2",
        dict(
            hidden_size=40,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=44,
        ),
    ),
    "olmo3-window-headdim-tied": (
        "Olmo3",
        dict(
            hidden_size=36,
            num_hidden_layers=3,
            num_attention_heads=3,
            num_key_value_heads=1,
            head_dim=10,
            intermediate_size=40,
            sliding_window=3,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            tie_word_embeddings=True,
        ),
    ),
}

_CLASS = {
    "GPT2": "GPT2LMHeadModel",
    "GPTNeoX": "GPTNeoXForCausalLM",
    "Gemma3Text": "Gemma3ForCausalLM",
    "GPTJ": "GPTJForCausalLM",
}


def hf_model(case: str, dtype=torch.float64, **overrides):
    """A random Hugging Face model of ``case`` (weights perturbed so biases and norm weights are not trivial)."""
    family, kw = CASES[case]
    kw = {**COMMON, **kw, **overrides}
    if family not in ("GPT2", "GPTJ", "GPTBigCode"):
        kw.setdefault("max_position_embeddings", CTX)
    cfg = getattr(transformers, f"{family}Config")(**kw)
    cls = getattr(transformers, _CLASS.get(family, f"{family}ForCausalLM"))
    gen = torch.Generator().manual_seed(sum(map(ord, case)))
    model = cls(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.15 * torch.randn(p.shape, generator=gen))
    return model.to(dtype).eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def tokens(n=3, t=T):
    return torch.randint(0, V, (n, t), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_residual_stream_equal_hf(case, dtype, tol):
    hf = hf_model(case, dtype)
    model = from_hf(hf)
    assert next(model.parameters()).dtype == dtype
    # the same parameter count (tied embeddings are one parameter in both; OPT's position table has two offset
    # rows that no unpadded sequence reads, which the converted W_pos leaves out)
    extra = 2 * model.cfg.d_model if CASES[case][0] == "OPT" else 0
    assert sum(p.numel() for p in model.parameters()) + extra == sum(p.numel() for p in hf.parameters())
    x = tokens()
    with torch.no_grad():
        out = hf(x, output_hidden_states=True)
        logits = model(x)
        _, cache = model.run_with_cache(x)
    assert rel(logits, out.logits) <= tol
    L = model.cfg.n_layers
    assert len(out.hidden_states) == L + 1
    for layer in range(L):  # Hugging Face's hidden_states[l] is the input of block l
        assert rel(cache[f"blocks.{layer}.hook_resid_pre"], out.hidden_states[layer]) <= tol
    assert rel(cache["ln_final.hook_normalized"], out.hidden_states[L]) <= tol  # the last one is normalised
    assert rel(cache["blocks.0.hook_resid_post"], out.hidden_states[1]) <= tol


@pytest.mark.parametrize(
    "case", ["neox-parallel-rot0.25", "llama-gqa2-biases-tied-headdim", "mistral-gqa4-window"]
)
def test_rotary_models_read_past_max_position_embeddings(case):
    """Hugging Face's rotary models compute every position, past ``max_position_embeddings`` too; the converted
    model does the same (and an exact patching grid runs there). GPT-2's learned positions end at ``n_positions``:
    a longer input is refused by name."""
    hf = hf_model(case)
    model = from_hf(hf)
    assert model.cfg.max_positions is None
    x = tokens(2, CTX + 5)
    with torch.no_grad():
        assert rel(model(x), hf(x).logits) <= 1e-10
    from pypattern import activation_patching
    from pypattern.patching import LogitDiff

    corr = x.clone()
    corr[:, 1] = (corr[:, 1] + 1) % V
    metric = LogitDiff(x[:, -1], (x[:, -1] + 1) % V)
    kw = dict(metric=metric, layers=[0, 1], positions=[1, CTX + 2])
    exact = activation_patching(model, "resid_pre", x, corr, method="exact", **kw).values
    naive = activation_patching(model, "resid_pre", x, corr, method="naive", **kw).values
    assert torch.allclose(exact, naive, atol=1e-10, rtol=0) and exact[:, :, 0].abs().max() > 1e-3
    gpt2 = from_hf(hf_model("gpt2-tied"))
    assert gpt2.cfg.max_positions == CTX
    with pytest.raises(ValueError, match="n_ctx"):
        gpt2(tokens(1, CTX + 1))


def test_family_options_land_in_the_config():
    neox = from_hf(hf_model("neox-parallel-rot0.25")).cfg
    assert neox.parallel_attn_mlp and neox.rotary_dim == 2 and neox.d_head == 8 and neox.attn_bias
    assert not from_hf(hf_model("neox-sequential-rot0.5-tied-nobias")).cfg.parallel_attn_mlp
    llama = from_hf(hf_model("llama-gqa2-biases-tied-headdim")).cfg
    assert (llama.n_heads, llama.n_key_value_heads, llama.d_head, llama.rotary_dim) == (4, 2, 6, 6)
    assert (
        llama.tie_word_embeddings and llama.mlp_bias and llama.attn_out_bias and llama.rotary_base == 1234.0
    )
    assert llama.normalization_type == "RMS" and llama.gated_mlp and llama.act_fn == "silu"
    qwen = from_hf(hf_model("qwen2-mqa-window-untied")).cfg
    assert qwen.attn_bias and not qwen.attn_out_bias and not qwen.mlp_bias and qwen.sliding_window == 3
    assert from_hf(hf_model("mistral-gqa4-window")).cfg.sliding_window == 4
    gpt2 = from_hf(hf_model("gpt2-untied-relu-unscaled")).cfg
    assert gpt2.attn_scale == 1.0 and not gpt2.tie_word_embeddings and gpt2.act_fn == "relu"
    assert from_hf(hf_model("gpt2-tied")).cfg.extra["converted_from"]["class"] == "GPT2LMHeadModel"


def test_eager_attention_float32_and_dtype_argument():
    hf = hf_model("llama-mqa", torch.float32, attn_implementation="eager")
    assert hf.config._attn_implementation == "eager"
    x = tokens()
    with torch.no_grad():
        ref = hf(x).logits
        assert rel(from_hf(hf)(x), ref) <= 1e-4
        m64 = from_hf(hf, dtype=torch.float64)
        assert next(m64.parameters()).dtype == torch.float64
        assert rel(m64(x), ref) <= 1e-4
    with pytest.raises(ValueError, match="dtype"):
        from_hf(hf, dtype=torch.int64)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("case", list(CASES))
def test_attention_implementations_equal_hf_in_float64(case, impl):
    """Eager attention of GPT-NeoX and the Llama family takes its softmax in float32 for a float64 model (GPT-2's
    in the model's dtype); sdpa in the model's dtype. GPT-Neo (eager only) multiplies queries and keys in float32
    and adds its float64 causal mask, which takes the softmax back to float64. The converted model does the same,
    to 1e-10."""
    family = CASES[case][0]
    if (
        family in ("GPTNeo", "Gemma2", "VaultGemma", "Bloom") and impl != "eager"
    ):  # soft-capped scores (Gemma 2, VaultGemma): eager only
        with pytest.raises(ValueError, match="does not support"):
            hf_model(case, attn_implementation=impl)
        return
    hf = hf_model(case, attn_implementation=impl)
    assert hf.config._attn_implementation == impl
    model = from_hf(hf)
    upcasts = family == "Bloom" or (impl == "eager" and family not in ("GPT2", "GPTNeo", "GPTJ"))
    f32_scores = family == "GPTNeo" or (family == "GPTJ" and impl == "eager")
    want = torch.float64 if f32_scores else (torch.float32 if upcasts else None)
    assert model.cfg.attn_softmax_dtype == want
    assert model.cfg.attn_scores_dtype == (torch.float32 if f32_scores else None)
    x = tokens()
    with torch.no_grad():
        assert rel(model(x), hf(x).logits) <= 1e-10


def test_eager_softmax_dtype_saved_and_loaded_with_the_config(tmp_path):
    """The converted model's config (JSON, dtypes by name) and safetensors weights load back as the same model."""
    from safetensors.torch import save_file

    from pypattern.circuits.cli import load_model_dir

    hf = hf_model("mistral-gqa4-window", attn_implementation="eager")
    model = from_hf(hf)
    d = model.cfg.to_dict()
    assert d["attn_softmax_dtype"] == "float32"
    (tmp_path / "config.json").write_text(json.dumps(d))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    loaded = load_model_dir(str(tmp_path))
    assert loaded.cfg.attn_softmax_dtype == torch.float32 and loaded.cfg == model.cfg
    x = tokens()
    with torch.no_grad():
        assert rel(loaded(x), hf(x).logits) <= 1e-10


@pytest.mark.parametrize(
    "case",
    [
        "gpt2-tied",
        "neox-parallel-rot0.25",
        "llama-gqa2-biases-tied-headdim",
        "qwen2-gqa4-tied",
        "qwen3-gqa2-tied",
        "gemma2-gqa2-capped-window",
        "gemma3-local-global-rope",
        "olmo3-window-headdim-tied",
        "phi-partial0.5",
        "gptj-rot4",
        "opt-relu",
    ],
)
def test_round_trip_through_save_pretrained(case, tmp_path):
    hf = hf_model(case)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    assert not any(f.endswith(".bin") for f in os.listdir(tmp_path))
    x = tokens()
    with torch.no_grad():
        direct = from_hf(hf)(x)
        loaded = from_pretrained(tmp_path)
        assert next(loaded.parameters()).dtype == torch.float64
        if CASES[case][0].startswith("Gemma"):
            # Gemma's embedding scale is a buffer that is not saved: the model built in float32 and cast holds
            # sqrt(d) rounded to float32, the one loaded in float64 computes it anew; compare with that model
            reloaded = getattr(transformers, type(hf).__name__).from_pretrained(tmp_path, dtype=torch.float64)
            direct = reloaded.eval()(x).logits
            assert rel(loaded(x), direct) <= 1e-10
        else:
            assert rel(loaded(x), direct) <= 1e-12
        f32 = from_pretrained(tmp_path, dtype=torch.float32)
        assert next(f32.parameters()).dtype == torch.float32 and rel(f32(x), direct) <= 1e-4


def test_pickle_only_directory_is_refused(tmp_path):
    hf = hf_model("gpt2-tied")
    hf.config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"never read")  # would be a pickle: must not be opened
    with pytest.raises(UnsupportedModelError, match="pytorch_model.bin"):
        from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(tmp_path / "..")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        from_pretrained(tmp_path / "missing")


def test_unknown_architecture_in_directory_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"})
    )
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UnsupportedModelError, match="BertForMaskedLM"):
        from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "case,overrides,option",
    [
        ("gpt2-tied", dict(add_cross_attention=True), "add_cross_attention"),
        ("llama-mqa", dict(rope_scaling={"rope_type": "proportional", "factor": 2.0}), "rope_type"),
        ("qwen2moe-shared-expert", dict(mlp_only_layers=[0]), "a dense MLP among sparse ones"),
        ("llama-mqa", dict(hidden_act="laplace"), "hidden_act"),
    ],
)
def test_unsupported_options_are_refused_by_name(case, overrides, option):
    hf = hf_model(case, **overrides)
    with pytest.raises(UnsupportedModelError, match=option):
        from_hf(hf)


_NEW_ACTS = [
    "gelu_10", "relu2", "relu6", "leaky_relu", "tanh", "sigmoid", "mish", "hardswish", "linear", "gelu_accurate",
    "gelu_python_tanh",
]  # fmt: skip


@pytest.mark.parametrize("act", _NEW_ACTS)
@pytest.mark.parametrize("case,option", [("gpt2-tied", "activation_function"), ("llama-mqa", "hidden_act")])
def test_every_parameter_free_activation_converts_exactly(case, option, act):
    """GPT-2 (plain MLP) and Llama (gated MLP) with each of Hugging Face's parameter-free activations beyond the
    GELU / ReLU / SiLU family: the converted model's logits equal the model's own in float64."""
    hf = hf_model(case, **{option: act})
    model = from_hf(hf)
    x = tokens()
    with torch.no_grad():
        assert rel(model(x), hf(x).logits) <= 1e-10


@pytest.mark.parametrize("act", _NEW_ACTS)
def test_activation_values_and_derivatives_equal_hugging_face(act):
    """Each activation and its derivative (what gradients, AtP and the samplers read) against Hugging Face's
    ``ACT2FN`` on random inputs and at its kinks and clip points, in float64."""
    from pypattern.models.convert._common import act_fn
    from pypattern.models.transformer import apply_act

    ours = act_fn(act, "act")
    x = torch.cat(
        [torch.randn(200, dtype=torch.float64) * 6, torch.tensor([-10.5, -3.0, 0.0, 3.0, 6.0, 10.5])]
    )
    x = x.double().requires_grad_(True)
    xh = x.detach().clone().requires_grad_(True)
    y, yh = apply_act(x, ours), transformers.activations.ACT2FN[act](xh)
    torch.testing.assert_close(y, yh, rtol=1e-12, atol=1e-13)
    (g,) = torch.autograd.grad(y.sum(), x)
    (gh,) = torch.autograd.grad(yh.sum(), xh)
    torch.testing.assert_close(g, gh, rtol=1e-12, atol=1e-13)


_LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize(
    "scaling", [{"rope_type": "linear", "factor": 2.5}, _LLAMA3], ids=["linear", "llama3"]
)
@pytest.mark.parametrize(
    "case", ["llama-mqa", "neox-parallel-rot0.25", "qwen2-gqa4-tied", "mistral-gqa4-window"]
)
def test_scaled_rotary_embeddings_convert_exactly(case, scaling, dtype, tol):
    """Linear and Llama 3 rotary scaling (Llama 3.1 / 3.2 checkpoints use the latter): fixed frequencies, the
    converted model computes them itself (``TransformerConfig.rotary_scaling``) and its logits equal HF's, also
    past the configured context. Llama 3's frequencies of the Llama case fall in all three of its bands (kept,
    interpolated, divided by the factor)."""
    from pypattern.models.transformer import rotary_inv_freq

    hf = hf_model(case, dtype, rope_scaling=dict(scaling), max_position_embeddings=128)
    model = from_hf(hf)
    assert model.cfg.rotary_scaling == scaling
    inv = rotary_inv_freq(10000.0, model.cfg.rotary_dim, None, torch.float32)
    got = rotary_inv_freq(10000.0, model.cfg.rotary_dim, model.cfg.rotary_scaling, torch.float32)
    if scaling["rope_type"] == "llama3" and case == "llama-mqa":
        ratio = inv / got
        assert (ratio == 1).any() and (ratio == 8).any() and ((ratio > 1) & (ratio < 8)).any()
    x = tokens(t=T + 5)
    with torch.no_grad():
        assert rel(model(x), hf(x).logits) <= tol
    again = type(model.cfg)(**model.cfg.to_dict())  # the scaling survives a round trip of the config
    assert again.rotary_scaling == scaling


_YARN = {
    "rope_type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 8,
    "beta_fast": 32,
    "beta_slow": 1,
    "attention_factor": 1.1386,
}


@pytest.mark.parametrize("case", ["llama-yarn-mscale", "qwen2-yarn-attention-factor-untruncated"])
def test_yarn_frequencies_and_attention_factor(case):
    """YaRN: the converted config holds the factor of the cosines and sines the HF rotary embedding computed
    (from mscale / mscale_all_dim, or given) and frequencies equal to the HF buffer, some of them blended (neither
    the unscaled frequency nor the one divided by the factor)."""
    from pypattern.models.transformer import rotary_inv_freq

    hf = hf_model(case)
    model = from_hf(hf)
    sc = model.cfg.rotary_scaling
    assert sc["rope_type"] == "yarn" and sc["attention_factor"] == pytest.approx(
        hf.model.rotary_emb.attention_scaling
    )
    assert sc["attention_factor"] != 1.0
    mine = rotary_inv_freq(model.cfg.rotary_base, model.cfg.rotary_dim, sc, torch.float32)
    assert torch.equal(mine, hf.model.rotary_emb.inv_freq.float())
    plain = rotary_inv_freq(model.cfg.rotary_base, model.cfg.rotary_dim, None, torch.float32)
    ratio = plain / mine
    assert ((ratio - 1).abs() > 1e-3).any() and ((ratio - sc["factor"]).abs() > 1e-3).any()
    again = type(model.cfg)(**model.cfg.to_dict())
    assert again.rotary_scaling == sc


def test_longrope_short_factors_and_the_long_regime_refused():
    """LongRoPE converts with its short factors and the HF embedding's cosine/sine factor; a sequence reaching the
    original length, where HF switches to the long factors, raises instead of giving other logits."""
    hf = hf_model("phi3-longrope-partial0.75")
    model = from_hf(hf)
    sc = model.cfg.rotary_scaling
    assert sc["rope_type"] == "longrope" and sc["short_factor"] == [1.0, 1.05, 1.1, 1.3, 1.6, 2.0]
    assert (
        sc["attention_factor"] == pytest.approx(hf.model.rotary_emb.attention_scaling)
        and sc["attention_factor"] > 1
    )
    x = torch.randint(0, V, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert rel(model(x), hf(x).logits) <= 1e-10
        with pytest.raises(ValueError, match="position 32 is past the 32 positions of this model's LongRoPE"):
            model(torch.randint(0, V, (1, 33)))
        # the HF model, once it has read a long sequence, holds its long factors: refused with the reason
        hf(torch.randint(0, V, (1, 40)))
        with pytest.raises(UnsupportedModelError, match="holds its long factors.*run the model on a short"):
            from_hf(hf)
        hf(x)  # a short sequence switches it back
        assert rel(from_hf(hf)(x), hf(x).logits) <= 1e-10


@pytest.mark.parametrize("case", ["llama-mqa", "qwen2-gqa4-tied"])
def test_dynamic_ntk_converts_up_to_its_length_and_refuses_longer(case):
    """Dynamic NTK scaling leaves the frequencies unscaled up to max_position_embeddings: the converted model equals
    HF there; a longer sequence (HF recomputes the frequencies from its length) raises; an HF model that has read
    one holds scaled frequencies and is refused with the reason until a short sequence switches it back."""
    hf = hf_model(
        case, torch.float64, rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=24
    )
    model = from_hf(hf)
    sc = model.cfg.rotary_scaling
    assert sc == {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 24}
    x = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert rel(model(x), hf(x).logits) <= 1e-10
        with pytest.raises(
            ValueError, match="position 24 is past the 24 positions of this model's dynamic NTK"
        ):
            model(torch.randint(0, V, (1, 25)))
        long = torch.randint(0, V, (1, 40))
        scaled = hf(long).logits  # HF's frequencies now scaled for 40 positions
        with pytest.raises(UnsupportedModelError, match="scaled for a sequence past max_position_embeddings"):
            from_hf(hf)
        unscaled = model.cfg.__class__(**{**model.cfg.to_dict(), "rotary_scaling": None})
        plain = type(model)(unscaled)
        plain.load_state_dict(model.state_dict())
        assert rel(plain(long), scaled) > 1e-6  # the scaling did change HF's long-sequence logits
        hf(x[:, :12])  # a sequence shorter than max_position_embeddings switches it back
        assert rel(from_hf(hf)(x), hf(x).logits) <= 1e-10


def test_smollm3_nope_layers_turn_no_positions():
    """SmolLM3's layers without rotary positions: the converted model's rotation is the identity there (queries
    equal their rotated selves) and not elsewhere."""
    model = from_hf(hf_model("smollm3-nope-layers"))
    assert model.cfg.rotary_layers == (True, False, False, True)
    _, cache = model.run_with_cache(tokens(2, 9))
    for layer, turns in enumerate(model.cfg.rotary_layers):
        q, rq = cache[f"blocks.{layer}.attn.hook_q"], cache[f"blocks.{layer}.attn.hook_rot_q"]
        assert torch.equal(q, rq) != turns
    assert from_hf(hf_model("smollm3-window-tied")).cfg.rotary_layers == (True, True, True, False)


def test_gpt2_inverse_layer_scaling_is_per_layer():
    hf = hf_model("gpt2-inverse-layer-scaled")
    cfg = from_hf(hf).cfg
    assert cfg.attn_scores_multiplier == tuple(blk.attn.scaling for blk in hf.transformer.h)
    assert [cfg.scores_multiplier(i) for i in range(3)] == pytest.approx(
        [8**-0.5 / (i + 1) for i in range(3)]
    )


def test_rotary_scaling_config_is_checked():
    from pypattern.models import TransformerConfig

    base = dict(n_layers=1, d_model=8, n_heads=2, d_vocab=5, n_ctx=4, positional_embedding_type="rotary")
    with pytest.raises(ValueError, match="rope_type one of"):
        TransformerConfig(**base, rotary_scaling={"rope_type": "ntk", "factor": 2.0})
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        TransformerConfig(**base, rotary_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="beta_fast"):
        TransformerConfig(**base, rotary_scaling={**_YARN, "beta_fast": 0})
    with pytest.raises(ValueError, match="truncate"):
        TransformerConfig(**base, rotary_scaling={**_YARN, "truncate": "yes"})
    with pytest.raises(ValueError, match="one positive number per layer"):
        TransformerConfig(**base, attn_scores_multiplier=(0.5, 0.25))
    with pytest.raises(ValueError, match="rotary_layers"):
        TransformerConfig(**base, rotary_layers=(True, False))
    with pytest.raises(ValueError, match="norm_weight_before_cast=True is not valid"):
        TransformerConfig(**base, norm_weight_before_cast=True)  # LayerNorm
    with pytest.raises(ValueError, match="rotary_layers"):
        TransformerConfig(**{**base, "positional_embedding_type": "standard"}, rotary_layers=(False,))
    with pytest.raises(ValueError, match="low_freq_factor"):
        TransformerConfig(**base, rotary_scaling={**_LLAMA3, "low_freq_factor": None})
    with pytest.raises(ValueError, match="must exceed"):
        TransformerConfig(**base, rotary_scaling={**_LLAMA3, "high_freq_factor": 0.5})
    with pytest.raises(ValueError, match="needs positional_embedding_type='rotary'"):
        TransformerConfig(**{**base, "positional_embedding_type": "standard"}, rotary_scaling=_LLAMA3)


def test_gpt2_reorder_and_upcast_attn():
    """Only GPT-2's eager attention reads reorder_and_upcast_attn (float32 scores): exact in float32, refused for
    other dtypes; sdpa ignores the option."""
    x = tokens()
    hf = hf_model("gpt2-tied", reorder_and_upcast_attn=True)
    with torch.no_grad():
        assert rel(from_hf(hf)(x), hf(x).logits) <= 1e-10
    eager32 = hf_model("gpt2-tied", torch.float32, reorder_and_upcast_attn=True, attn_implementation="eager")
    with torch.no_grad():
        assert rel(from_hf(eager32)(x), eager32(x).logits) <= 1e-4
    eager64 = hf_model("gpt2-tied", reorder_and_upcast_attn=True, attn_implementation="eager")
    with pytest.raises(UnsupportedModelError, match="reorder_and_upcast_attn"):
        from_hf(eager64)


@pytest.mark.parametrize("case", ["llama-gqa2-biases-tied-headdim", "neox-parallel-rot0.25"])
@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_rotary_frequencies_rounded_by_a_cast_convert_exactly(case, half):
    """``.to(torch.bfloat16)`` / ``.half()`` rounds the rotary ``inv_freq`` buffer, and the Hugging Face forward
    turns by the rounded frequencies (cast back or not): the converted model rounds them the same way."""
    x = tokens()
    hf = hf_model(case)
    rotary = hf.gpt_neox.rotary_emb if case.startswith("neox") else hf.model.rotary_emb
    rotary.inv_freq = rotary.inv_freq.to(half)  # what model.to(half) does to the buffer
    with torch.no_grad():
        ref = hf(x).logits
        conv = from_hf(hf)
        assert conv.cfg.rotary_freq_dtype == half
        assert rel(conv(x), ref) <= 1e-10
        # cast back to float64, the buffer keeps the rounded values
        assert rel(from_hf(hf.double())(x), ref) <= 1e-10
    # the whole model in half precision converts (logits equal up to half-precision rounding)
    cast = hf_model(case).to(half)
    with torch.no_grad():
        assert from_hf(cast).cfg.rotary_freq_dtype == half
        assert rel(from_hf(cast)(x), cast(x).logits) <= 5e-2


@pytest.mark.parametrize("pct,pos_type,rotary_dim", [(0.1, "none", None), (0.125, "rotary", 2)])
def test_neox_rotary_pct_of_under_two_dimensions_converts(pct, pos_type, rotary_dim):
    """head_size * rotary_pct = 0 rotates nothing: the model has no positional information, and converts so. = 1:
    the model turns 2 dimensions at frequency 1, which is a 2-dimensional rotary embedding."""
    hf = hf_model("neox-parallel-rot0.25", rotary_pct=pct)  # head_size 8
    assert hf.gpt_neox.layers[0].attention.rotary_ndims == int(8 * pct)
    conv = from_hf(hf)
    assert conv.cfg.positional_embedding_type == pos_type
    assert (conv.cfg.rotary_dim if pos_type == "rotary" else None) == rotary_dim
    x = tokens()
    with torch.no_grad():
        assert rel(conv(x), hf(x).logits) <= 1e-10


def test_neox_odd_rotary_dimensions_are_refused_by_name():
    hf = hf_model("neox-parallel-rot0.25", rotary_pct=0.375)  # 8 * 0.375 = 3 dimensions per head
    with pytest.raises(UnsupportedModelError, match=r"rotary_pct=0.375 .* 3 dimensions, an odd number"):
        from_hf(hf)


@pytest.mark.parametrize("case", ["gpt2-tied", "llama-mqa", "bloom-alibi-6heads-tied"])
def test_model_in_train_mode_with_dropout_warns(case):
    """A model in train() mode with dropout has a random forward; the converted model is its eval() forward
    (BLOOM: its residual dropout is a float passed to ``F.dropout``, no ``nn.Dropout`` module)."""
    names = {"gpt2": ("attn_pdrop", "resid_pdrop", "embd_pdrop"), "bloom": ("hidden_dropout",)}.get(
        case.split("-")[0], ("attention_dropout",)
    )
    hf = hf_model(case, **dict.fromkeys(names, 0.1)).train()
    with pytest.warns(UserWarning, match=r"train\(\) mode with dropout .*eval\(\) forward"):
        conv = from_hf(hf)
    x = tokens()
    with torch.no_grad():
        assert rel(conv(x), hf.eval()(x).logits) <= 1e-10
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from_hf(hf)  # eval() mode: no warning
        from_hf(hf_model(case, **dict.fromkeys(names, 0.0)).train())  # no dropout: no warning


def test_unknown_model_class_is_refused():
    base = transformers.GPT2Model(transformers.GPT2Config(n_embd=40, n_layer=1, n_head=5, **COMMON))
    with pytest.raises(UnsupportedModelError, match="GPT2Model"):
        from_hf(base)
    assert set(SUPPORTED_CLASSES) == {
        "GPT2LMHeadModel",
        "FalconForCausalLM",
        "GPTNeoForCausalLM",
        "GPTNeoXForCausalLM",
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Phi3ForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "GemmaForCausalLM",
        "Gemma2ForCausalLM",
        "Gemma3ForCausalLM",
        "OlmoForCausalLM",
        "Olmo2ForCausalLM",
        "Olmo3ForCausalLM",
        "PhiForCausalLM",
        "GPTJForCausalLM",
        "OPTForCausalLM",
        "Gemma3ForConditionalGeneration",
        "StableLmForCausalLM",
        "Starcoder2ForCausalLM",
        "GPTBigCodeForCausalLM",
        "MixtralForCausalLM",
        "OlmoeForCausalLM",
        "Qwen3MoeForCausalLM",
        "Qwen2MoeForCausalLM",
        "GraniteForCausalLM",
        "SmolLM3ForCausalLM",
        "BloomForCausalLM",
        "SeedOssForCausalLM",
        "HeliumForCausalLM",
        "Ernie4_5ForCausalLM",
        "MinistralForCausalLM",
        "ArceeForCausalLM",
        "GlmForCausalLM",
        "Glm4ForCausalLM",
        "VaultGemmaForCausalLM",
        "Exaone4ForCausalLM",
        "NemotronForCausalLM",
    }


def _expected_shape(name, cfg, b, t):
    H, Hkv, dh, d = cfg.n_heads, cfg.n_key_value_heads, cfg.d_head, cfg.d_model
    leaf = name.rsplit(".", 1)[-1]
    if ".attn.q_norm." in name or ".attn.k_norm." in name:  # query / key norms (qk_norm)
        heads = H if ".q_norm." in name else Hkv
        if cfg.qk_norm == "all":  # one norm over every head's projection
            return (b, t, 1) if leaf == "hook_scale" else (b, t, heads * dh)
        return (b, t, heads, 1) if leaf == "hook_scale" else (b, t, heads, dh)
    if leaf in ("hook_q", "hook_rot_q", "hook_z"):
        return (b, t, H, dh)
    if leaf in ("hook_k", "hook_v", "hook_rot_k"):
        return (b, t, Hkv, dh)
    if leaf in ("hook_attn_scores", "hook_pattern"):
        return (b, H, t, t)
    if leaf in ("hook_pre", "hook_pre_linear", "hook_post"):
        return (b, t, cfg.d_mlp)
    if leaf in ("hook_router_logits", "hook_expert_weights"):
        return (b, t, cfg.n_experts)
    if leaf == "hook_expert_indices":
        return (b, t, cfg.experts_per_token)
    if leaf == "hook_scale":
        return (b, t, 1)
    return (b, t, d)


@pytest.mark.parametrize(
    "case",
    [
        "gpt2-tied",
        "neox-parallel-rot0.25",
        "neox-sequential-rot0.5-tied-nobias",
        "llama-mqa",
        "mistral-gqa4-window",
        "qwen2-gqa4-tied",
        "qwen3-mqa-bias-headdim",
        "gptneo-global-local-tied",
        "phi3-gqa2-partial0.5",
        "gemma-mqa-tied",
        "gemma3-local-global-rope",
        "olmo2-gqa2",
        "phi-gqa2-tied-rot1",
        "olmo-clip-gqa2",
        "gptj-rot2-tied-relu",
        "opt-lnpre-nobias-gelu",
        "stablelm-parallel-gqa2-qkvbias-tied",
        "starcoder2-gqa2-window-biases",
        "bigcode-mqa-tied",
        "mixtral-gqa2-window",
        "olmoe-coupled-heads-tied",
        "qwen2moe-shared-expert",
        "granite-gqa2-multipliers",
        "smollm3-nope-layers",
        "bloom-alibi-6heads-tied",
    ],
)
def test_every_hook_point_has_its_shape(case):
    model = from_hf(hf_model(case))
    cfg = model.cfg
    x = tokens(2, 9)
    logits, cache = model.run_with_cache(x)
    assert set(cache) == set(model.hook_dict)
    for name, act in cache.items():
        assert tuple(act.shape) == _expected_shape(name, cfg, 2, 9), name
    rot = cfg.positional_embedding_type == "rotary"
    learned = cfg.positional_embedding_type == "standard"
    assert ("blocks.0.attn.hook_rot_q" in cache) == rot and ("hook_pos_embed" in cache) == learned
    assert ("embed.ln.hook_normalized" in cache) == cfg.post_embedding_ln
    assert ("blocks.0.hook_resid_mid" in cache) == (not cfg.parallel_attn_mlp)
    moe = cfg.n_experts is not None
    assert ("blocks.0.mlp.hook_pre_linear" in cache) == (cfg.gated_mlp and not moe)
    assert ("blocks.0.mlp.hook_expert_weights" in cache) == moe
    assert ("blocks.0.attn.q_norm.hook_scale" in cache) == bool(cfg.qk_norm)
    assert ("blocks.0.ln1_post.hook_normalized" in cache) == cfg.use_normalization_before_and_after
    torch.testing.assert_close(logits, model(x))


def test_converted_head_mask_moves_only_that_head():
    """NeoX's interleaved fused QKV: the mask of head 2 moves head 2's z and no other head's."""
    model = from_hf(hf_model("neox-sequential-rot0.5-tied-nobias"))
    masks = model.component_masks("blocks.1.attn.head.2")
    x = tokens()
    _, before = model.run_with_cache(x)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in masks:
                p.add_(masks[n] * torch.randn_like(p))
    _, after = model.run_with_cache(x)
    z0, z1 = before["blocks.1.attn.hook_z"], after["blocks.1.attn.hook_z"]
    others = [h for h in range(7) if h != 2]
    torch.testing.assert_close(z0[:, :, others], z1[:, :, others])
    assert not torch.allclose(z0[:, :, 2], z1[:, :, 2])


@pytest.mark.parametrize("case", ["llama-gqa2-biases-tied-headdim", "neox-parallel-rot0.25"])
def test_converted_model_under_functional_call_and_vmap(case):
    """What the sampler does: grads of the loss over a stack of parameter copies equal each copy's grads."""
    model = from_hf(hf_model(case))
    names = [n for n, _ in model.named_parameters()]
    gen = torch.Generator().manual_seed(0)
    stacked = {
        n: torch.stack(
            [p.detach() + 0.01 * k * torch.randn(p.shape, generator=gen, dtype=p.dtype) for k in range(3)]
        )
        for n, p in model.named_parameters()
    }
    x = tokens(2, 10)

    def loss(params):
        return torch.func.functional_call(model, params, (x,), {"return_type": "loss"})

    grads = torch.func.vmap(torch.func.grad(loss))(stacked)
    for k in range(3):
        one = {n: stacked[n][k].clone().requires_grad_(True) for n in names}
        g = torch.autograd.grad(loss(one), [one[n] for n in names])
        for n, gn in zip(names, g):
            torch.testing.assert_close(grads[n][k], gn, rtol=1e-10, atol=1e-12)


def test_hf_model_is_left_unchanged():
    hf = hf_model("llama-mqa")
    before = copy.deepcopy(hf.state_dict())
    model = from_hf(hf)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    after = hf.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def _local_tokenizer(tmp_path):
    """A word-level tokenizer over the test vocabulary, saved and loaded locally (nothing is downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="t0", eos_token="t1", unk_token="t0", pad_token="t1"
    )
    fast.save_pretrained(tmp_path)
    return transformers.AutoTokenizer.from_pretrained(tmp_path, add_bos_token=True, local_files_only=True)


# the dtype a TransformerLens 4.x bridge's own attention takes its softmax in, by family (None: the model's dtype);
# GPT-J, GPT-Neo and OPT bridges run the Hugging Face attention modules (their eager implementation)
_BRIDGE_SOFTMAX = {"GPT2": None, "GPTNeoX": None, "Phi3": None, "Falcon": None, "Bloom": torch.float32}
_BRIDGE_RUNS_HF_ATTENTION = ("GPTJ", "GPTNeo", "OPT")
# processed bridges refused naming fold_ln=False: fold_ln folds each LayerNorm's bias into q/k/v projections the
# Hugging Face class builds without biases
_BRIDGE_FOLD_LN_REFUSED = ("GPTJ", "GPTNeo", "Falcon")


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize(
    "case",
    [
        "gpt2-tied",
        "neox-parallel-rot0.25",
        "llama-gqa2-biases-tied-headdim",
        "qwen2-gqa4-tied",
        "qwen3-gqa2-tied",
        "phi3-gqa2-partial0.5",
        "gemma-mqa-tied",
        "gemma2-gqa2-capped-window",
        "phi-partial0.5",
        "falcon-mqa-parallel-tied",
        "gptj-rot4",
        "gptneo-global-local-tied",
        "bloom-alibi-6heads-tied",
        "opt-relu",
        "smollm3-nope-layers",
    ],
)
def test_transformer_lens_bridge_converts(case, dtype, tol, tmp_path):
    """A TransformerLens 4.x TransformerBridge around a Hugging Face model converts (with from_hf's check, which
    runs the bridge's forward) to the function of the bridge's forward in float64 and float32. The bridge's attention
    components take the softmax in float32 for the Llama family (SmolLM3 too), Gemma, Phi and BLOOM, in the model's dtype for GPT-2,
    GPT-NeoX, Phi-3 and Falcon; GPT-J's, GPT-Neo's and OPT's run the Hugging Face eager attention. Processed weights
    (``enable_compatibility_mode()``: folded norms, centred writing weights and unembedding, folded value biases)
    convert to the bridge's processed forward; where fold_ln folds a LayerNorm's bias into projections the Hugging
    Face class builds without biases (GPT-J, GPT-Neo, Falcon) they are refused naming ``fold_ln=False``, and a bridge
    processed with ``fold_ln=False`` converts to its forward (run in the bench venv of bench/envs/tl.sh; skipped
    where TransformerLens 4.x is not installed)."""
    # TransformerLens 4.x (its bridge); 2.x / 3.x have none
    TransformerBridge = pytest.importorskip("transformer_lens.model_bridge").TransformerBridge

    family = CASES[case][0]
    hf = hf_model(case, dtype)
    hf.config.architectures = [type(hf).__name__]  # what the bridge picks its adapter by
    reference = copy.deepcopy(hf)  # the bridge wraps its model in place and switches it to eager attention
    bridge = TransformerBridge.boot_transformers(
        case, hf_model=hf, dtype=dtype, device="cpu", tokenizer=_local_tokenizer(tmp_path)
    )
    model = from_hf(bridge)
    extra = 2 * model.cfg.d_model if family == "OPT" else 0  # OPT's two offset rows of its position table
    assert sum(p.numel() for p in model.parameters()) + extra == sum(
        p.numel() for p in reference.parameters()
    )
    x = tokens()
    if family in _BRIDGE_RUNS_HF_ATTENTION:
        eager = from_hf(hf_model(case, dtype, attn_implementation="eager"))
        assert model.cfg.attn_softmax_dtype == eager.cfg.attn_softmax_dtype
    else:
        assert model.cfg.attn_softmax_dtype == _BRIDGE_SOFTMAX.get(family, torch.float32)
    with torch.no_grad():
        got = model(x)
        assert rel(got, bridge(x)) <= tol
        # the Hugging Face model before wrapping (sdpa where the family has it: softmax in the model's dtype)
        same_arithmetic = model.cfg.attn_softmax_dtype in (None, dtype) and model.cfg.attn_scores_dtype in (
            None,
            dtype,
        )
        assert rel(got, reference(x).logits) <= (tol if same_arithmetic else max(tol, 1e-6))
    # folds and centres the weights in place
    bridge.enable_compatibility_mode(disable_warnings=True)
    if family in _BRIDGE_FOLD_LN_REFUSED:
        with pytest.raises(UnsupportedModelError, match=r"fold_ln=False"):
            from_hf(bridge)
        hf = hf_model(case, dtype)
        hf.config.architectures = [type(hf).__name__]
        bridge = TransformerBridge.boot_transformers(
            case, hf_model=hf, dtype=dtype, device="cpu", tokenizer=_local_tokenizer(tmp_path)
        )
        bridge.enable_compatibility_mode(disable_warnings=True, fold_ln=False)
    with torch.no_grad():
        assert rel(from_hf(bridge)(x), bridge(x)) <= tol


def test_transformer_lens_bridge_with_value_biases_folded_into_a_bias_free_output_projection_converts(
    tmp_path,
):
    """fold_value_biases moves Qwen2's value biases into a bias of ``o_proj``, which Qwen2 builds without; the
    processed bridge converts to its forward (skipped where TransformerLens 4.x is not installed)."""
    TransformerBridge = pytest.importorskip("transformer_lens.model_bridge").TransformerBridge

    hf = hf_model("qwen2-gqa4-tied")
    hf.config.architectures = [type(hf).__name__]
    bridge = TransformerBridge.boot_transformers(
        "qwen2-gqa4-tied",
        hf_model=hf,
        dtype=torch.float64,
        device="cpu",
        tokenizer=_local_tokenizer(tmp_path),
    )
    bridge.enable_compatibility_mode(disable_warnings=True)
    x = tokens()
    with torch.no_grad():
        assert rel(from_hf(bridge)(x), bridge(x)) <= 1e-10


def test_transformer_lens_bridge_that_differs_from_its_model_is_refused(tmp_path):
    """A bridge whose own forward is another function than the Hugging Face model it wraps (TransformerLens 4.3
    scales GPT-2's attention scores although ``scale_attn_weights=False``) is refused by from_hf's check, which says
    so; ``verify=False`` converts the Hugging Face model's function (skipped where TransformerLens 4.x is not
    installed)."""
    # TransformerLens 4.x (its bridge); 2.x / 3.x have none
    TransformerBridge = pytest.importorskip("transformer_lens.model_bridge").TransformerBridge

    hf = hf_model("gpt2-untied-relu-unscaled")
    hf.config.architectures = [type(hf).__name__]
    reference = copy.deepcopy(hf)
    bridge = TransformerBridge.boot_transformers(
        "gpt2", hf_model=hf, dtype=torch.float64, device="cpu", tokenizer=_local_tokenizer(tmp_path)
    )
    with pytest.raises(UnsupportedModelError, match="another function than the Hugging Face model it wraps"):
        from_hf(bridge)
    x = tokens()
    with torch.no_grad():
        assert rel(from_hf(bridge, verify=False)(x), reference(x).logits) <= 1e-10


def test_per_layer_windows_and_score_dtype_in_the_config():
    """``sliding_window`` per layer (kept as a tuple, read by ``window``) and ``attn_scores_dtype`` survive the
    config's JSON round trip; bad windows are refused by name."""
    from pypattern.models import TransformerConfig

    base = dict(n_layers=2, d_model=8, n_heads=2, d_vocab=5, n_ctx=6)
    cfg = TransformerConfig(**base, sliding_window=[None, 3], attn_scores_dtype="float32")
    assert cfg.sliding_window == (None, 3) and (cfg.window(0), cfg.window(1)) == (None, 3)
    assert cfg.attn_scores_dtype == torch.float32
    again = TransformerConfig(**json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert TransformerConfig(**base, sliding_window=4).window(1) == 4
    for bad in ((3,), (None, 0), (None, 2.5), "3"):
        with pytest.raises(ValueError, match="sliding_window"):
            TransformerConfig(**base, sliding_window=bad)


@pytest.mark.parametrize("case", ["qwen2-gqa4-tied", "qwen3-gqa2-tied"])
def test_mixed_sliding_and_full_layers_convert_exactly(case):
    """Qwen's ``use_sliding_window`` with ``max_window_layers``: full attention below it, a window above (a
    per-layer ``sliding_window``); logits equal HF's past the window in float64 and float32."""
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        hf = hf_model(case, dtype, use_sliding_window=True, sliding_window=3, max_window_layers=1)
        assert list(hf.config.layer_types) == ["full_attention", "sliding_attention"]
        model = from_hf(hf)
        assert model.cfg.sliding_window == (None, 3)
        x = tokens()
        with torch.no_grad():
            assert rel(model(x), hf(x).logits) <= tol
            narrow = from_hf(
                hf_model(case, dtype, use_sliding_window=True, sliding_window=3, max_window_layers=0)
            )
            assert (
                narrow.cfg.sliding_window == 3 and rel(narrow(x), model(x)) > 1e-6
            )  # the full layer mattered


def test_mistral_ignores_layer_types_as_hf_does():
    """Hugging Face's Mistral applies ``sliding_window`` in every layer whatever ``layer_types`` says; the converted
    model is the function the Hugging Face model computes."""
    hf = hf_model("mistral-gqa4-window", layer_types=["sliding_attention", "full_attention"])
    model = from_hf(hf)
    assert model.cfg.sliding_window == hf.config.sliding_window == 4
    x = tokens()
    with torch.no_grad():
        assert rel(model(x), hf(x).logits) <= 1e-10


def test_gemma_options_land_in_the_config_and_hooks_see_the_writes():
    """Gemma's pieces map onto named options: the embedding scale as the model holds it, ``1 + w`` norms, sandwich
    norms whose outputs are what ``hook_attn_out`` / ``hook_mlp_out`` see and what the residual stream adds, soft
    caps, Gemma 3's per-layer rotary bases and scalings and its query/key norms."""
    g1 = from_hf(hf_model("gemma-mqa-tied")).cfg
    assert (
        g1.embed_scale == pytest.approx(40**0.5) and g1.norm_weight_offset == 1.0 and g1.tie_word_embeddings
    )
    assert not g1.use_normalization_before_and_after and g1.attn_scores_soft_cap is None
    assert g1.act_fn == "gelu_pytorch_tanh" and g1.n_key_value_heads == 1
    m2 = from_hf(hf_model("gemma2-gqa2-capped-window"))
    g2 = m2.cfg
    assert g2.use_normalization_before_and_after and (g2.attn_scores_soft_cap, g2.output_logits_soft_cap) == (
        2,
        3,
    )
    assert g2.sliding_window == (4, None, 4) and g2.attn_scale == pytest.approx(20**0.5)
    assert g2.attn_softmax_dtype == torch.float32  # eager: the softmax in float32
    x = tokens()
    with torch.no_grad():
        logits, cache = m2.run_with_cache(x)
    assert logits.abs().max() <= 3.0  # the final cap
    for layer in range(3):
        p = f"blocks.{layer}"
        torch.testing.assert_close(cache[f"{p}.hook_attn_out"], cache[f"{p}.ln1_post.hook_normalized"])
        torch.testing.assert_close(cache[f"{p}.hook_mlp_out"], cache[f"{p}.ln2_post.hook_normalized"])
        torch.testing.assert_close(
            cache[f"{p}.hook_resid_mid"], cache[f"{p}.hook_resid_pre"] + cache[f"{p}.hook_attn_out"]
        )
        scores = cache[f"{p}.attn.hook_attn_scores"]
        assert scores[scores.isfinite()].abs().max() <= 2.0  # capped before the mask
    g3 = from_hf(hf_model("gemma3-local-global-rope")).cfg
    assert g3.qk_norm and g3.rotary_base == (1e4, 1e6, 1e4, 1e6) and g3.sliding_window == (3, None, 3, None)
    assert g3.rope_scaling(1) == {"rope_type": "linear", "factor": 4.0} and g3.rope_scaling(0) is None
    assert g3.attn_scores_soft_cap is None and g3.output_logits_soft_cap == 9.0  # as Hugging Face computes


@pytest.mark.parametrize("case", ["gemma-gqa2-headdim-untied-bias", "gemma2-gqa2-capped-window"])
@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_gemma_in_half_precision_rounds_as_hf(case, half):
    """Gemma's norms multiply by ``1 + w`` in float32 before they cast back and its embedding scale is rounded
    to the weights' dtype: in half precision the converted model rounds the same way."""
    hf = hf_model(case).to(half)
    conv = from_hf(hf)
    x = tokens()
    with torch.no_grad():
        ref = hf(x).logits
        assert conv.cfg.embed_scale == float(torch.tensor(36**0.5 if "headdim" in case else 40**0.5).to(half))
        assert rel(conv(x).float(), ref.float()) <= (2e-2 if half == torch.bfloat16 else 2e-3)


def test_gemma_refuses_bidirectional_attention():
    with pytest.raises(UnsupportedModelError, match="use_bidirectional_attention"):
        from_hf(hf_model("gemma3-local-global-rope", use_bidirectional_attention=True))


@pytest.mark.parametrize("norm", ["RMS", "LN"])
def test_offset_norms_start_as_the_identity_scale(norm):
    """A fresh model with ``norm_weight_offset=1`` starts with zero norm weights: ``x_hat * (1 + 0)`` (RMSNorm,
    Gemma's; LayerNorm, Nemotron's ``LayerNorm1P``). Norms without a weight take no offset."""
    from pypattern.models import Transformer, TransformerConfig

    kw = dict(n_layers=1, d_model=16, n_heads=2, d_vocab=11, normalization_type=norm, seed=0)
    a = Transformer(TransformerConfig(**kw, norm_weight_offset=1.0))
    b = Transformer(TransformerConfig(**kw))
    assert float(a.blocks[0].ln1.w.detach().abs().max()) == 0.0
    x = torch.randint(0, 11, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))
    for weightless in ("LNPre", "RMSPre"):
        with pytest.raises(ValueError, match="norm_weight_offset"):
            TransformerConfig(**{**kw, "normalization_type": weightless}, norm_weight_offset=1.0)


@pytest.mark.parametrize("case", ["llama-mqa", "gemma2-gqa2-capped-window", "qwen2-mqa-window-untied"])
def test_padding_row_gradient_equals_hf(case):
    """Hugging Face embeddings built with ``padding_idx`` (``pad_token_id``: Gemma's 0) pass no gradient into that
    row from the lookup; the converted model records it (``TransformerConfig.padding_idx``), so its gradients,
    and every sampler's trajectory, equal the original's, tied unembedding or not."""
    hf = hf_model(case, pad_token_id=0)
    model = from_hf(hf)
    assert model.cfg.padding_idx == 0
    x = tokens()
    x[:, 2] = 0
    hf_loss = torch.nn.functional.cross_entropy(hf(x).logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    (g_hf,) = torch.autograd.grad(hf_loss, [hf.get_input_embeddings().weight])
    (g_ours,) = torch.autograd.grad(model(x, return_type="loss"), [model.embed.W_E])
    assert rel(g_ours, g_hf) <= 1e-10
    if not model.cfg.tie_word_embeddings:
        assert float(g_ours[0].abs().max()) == 0.0
    assert from_hf(hf_model(case, pad_token_id=None)).cfg.padding_idx is None


def test_olmo2_options_land_in_the_config():
    """OLMo 2: no norms in front of the sublayers, norms after them (what hook_attn_out / hook_mlp_out see), one
    query and one key norm across all heads; OLMo 3 adds local layers with their own rotary frequencies."""
    m = from_hf(hf_model("olmo2-gqa2"))
    cfg = m.cfg
    assert not cfg.pre_norms and cfg.use_normalization_before_and_after and cfg.qk_norm == "all"
    assert tuple(m.blocks[0].attn.q_norm.w.shape) == (4 * 10,) and tuple(m.blocks[0].attn.k_norm.w.shape) == (
        20,
    )
    assert isinstance(m.blocks[0].ln1, torch.nn.Identity) and isinstance(m.blocks[0].ln2, torch.nn.Identity)
    x = tokens()
    with torch.no_grad():
        _, cache = m.run_with_cache(x)
    torch.testing.assert_close(cache["blocks.1.hook_attn_out"], cache["blocks.1.ln1_post.hook_normalized"])
    assert "blocks.0.ln1.hook_normalized" not in cache
    # one norm across the heads: a head's parameters are not a component of their own
    assert "blocks.0.attn.head.0" not in m.components() and "blocks.0.attn" in m.components()
    with pytest.raises(ValueError, match="qk_norm='all'"):
        m.component_masks("blocks.0.attn.head.1")
    o3 = from_hf(hf_model("olmo3-window-headdim-tied")).cfg
    assert o3.sliding_window == (3, None, 3) and o3.tie_word_embeddings


def test_odd_partial_rotary_count_is_refused_by_name():
    """Phi-3 with ``head_dim * partial_rotary_factor`` odd: Hugging Face turns one dimension more than that count,
    at frequencies of the odd count; refused naming the factor rather than approximated."""
    hf = hf_model("phi3-gqa2-partial0.5", hidden_size=36, num_attention_heads=6, num_key_value_heads=2)
    assert hf.model.layers[0].self_attn.head_dim == 6
    with pytest.raises(
        UnsupportedModelError, match="partial_rotary_factor=0.5 .* = 3 dimensions, an odd number"
    ):
        from_hf(hf)


def test_phi_attention_and_mlp_read_one_norm():
    """Phi-1/1.5/2: one LayerNorm per block read by the attention and the MLP (``parallel_shared_norm``): listed
    and hooked once, ``ln2`` is that module, and patching its output moves both sublayers."""
    hf = hf_model("phi-partial0.5")
    m = from_hf(hf)
    cfg = m.cfg
    assert cfg.parallel_attn_mlp and cfg.parallel_shared_norm and cfg.rotary_dim == 4 and cfg.unembed_bias
    names = [n for n, _ in m.named_parameters()]
    assert "blocks.0.ln1.w" in names and not any(".ln2." in n for n in names)
    assert m.blocks[0].ln2 is m.blocks[0].ln1
    x = tokens()
    calls = []
    m.blocks[0].ln1.hook_normalized.add_hook(lambda t, hook: calls.append(1))
    with torch.no_grad():
        m(x)
    m.reset_hooks()
    assert len(calls) == 1  # computed once for both sublayers


def test_olmo_norms_without_parameters_and_clamped_projections():
    """OLMo: LayerNorms with no weight or bias (``normalization_type="LNPre"``, no norm parameters at all) and the
    query, key and value projections clamped (``clip_qkv``): ``hook_q`` / ``hook_v`` never leave the clamp, and
    the clamp does act on this model."""
    m = from_hf(hf_model("olmo-clip-gqa2"))
    assert m.cfg.normalization_type == "LNPre" and m.cfg.clip_qkv == 0.4 and m.cfg.ln_eps == 1e-5
    assert not any("ln" in n for n, _ in m.named_parameters())
    with torch.no_grad():
        _, cache = m.run_with_cache(tokens())
    for name in ("blocks.0.attn.hook_q", "blocks.1.attn.hook_k", "blocks.1.attn.hook_v"):
        assert float(cache[name].abs().max()) <= 0.4
    assert float((cache["blocks.0.attn.hook_q"].abs() == 0.4).float().mean()) > 0.01


def test_gptj_eager_scores_are_multiplied_in_float32():
    """GPT-J's eager attention multiplies float32 query-key products by ``head_dim ** -0.5`` (a division rounds
    them differently): ``attn_scores_multiplier`` reproduces it, to 1e-10 in a float64 model whose head size makes
    the scale inexact; dividing instead would differ by float32 rounding."""
    hf = hf_model("gptj-rot4", attn_implementation="eager")  # head_dim 8: 8 ** -0.5 is not a power of two
    m = from_hf(hf)
    assert m.cfg.attn_scores_multiplier == 8**-0.5 and m.cfg.attn_scores_dtype == torch.float32
    assert m.cfg.parallel_shared_norm and m.cfg.rotary_adjacent_pairs and m.cfg.rotary_dim == 4
    x = tokens()
    with torch.no_grad():
        ref = hf(x).logits
        assert rel(m(x), ref) <= 1e-10
        from pypattern.models import Transformer, TransformerConfig

        d = m.cfg.to_dict()
        d["attn_scores_multiplier"], d["attn_scale"] = None, 8**0.5
        divided = Transformer(TransformerConfig(**d))
        divided.load_state_dict(m.state_dict())
        assert rel(divided(x), ref) > 1e-10
    sdpa = from_hf(hf_model("gptj-rot4", attn_implementation="sdpa"))
    assert sdpa.cfg.attn_scores_multiplier is None and sdpa.cfg.attn_scores_dtype is None


def test_opt_refuses_what_it_does_not_reproduce():
    """OPT-350m's post-LayerNorm blocks and projected embedding are refused by name; the position table's offset
    rows are left out of ``W_pos``."""
    with pytest.raises(UnsupportedModelError, match="do_layer_norm_before"):
        from_hf(hf_model("opt-relu", do_layer_norm_before=False))
    with pytest.raises(UnsupportedModelError, match="word_embed_proj_dim"):
        from_hf(hf_model("opt-relu", word_embed_proj_dim=20))
    hf = hf_model("opt-relu")
    m = from_hf(hf)
    assert torch.equal(m.pos_embed.W_pos, hf.model.decoder.embed_positions.weight[2:])
    assert m.cfg.n_ctx == hf.config.max_position_embeddings and m.cfg.padding_idx == 1


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_multimodal_gemma3_converts_its_language_model(dtype, tol, tmp_path):
    """Gemma 3's larger checkpoints are ``Gemma3ForConditionalGeneration`` (a vision tower beside the language
    model): the converted model is its language model, equal to the multimodal model's forward on tokens, also
    loaded from a saved directory."""
    text = dict(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        sliding_window=4,
        sliding_window_pattern=2,
    )
    vision = dict(
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    cfg = transformers.Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        boi_token_index=290,
        eoi_token_index=291,
        image_token_index=292,
    )
    gen = torch.Generator().manual_seed(5)
    hf = transformers.Gemma3ForConditionalGeneration(cfg)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    hf = hf.to(dtype).eval()
    model = from_hf(hf)
    lm = hf.model.language_model
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in lm.parameters())
    assert model.cfg.qk_norm and model.cfg.sliding_window == (4, None)
    x = torch.randint(0, 280, (2, 9), generator=gen)
    with torch.no_grad():
        assert rel(model(x), hf(input_ids=x).logits) <= tol
    if dtype == torch.float64:  # the reloaded model computes its (unsaved) embedding scale in float64
        hf.save_pretrained(tmp_path, safe_serialization=True)
        reloaded = transformers.Gemma3ForConditionalGeneration.from_pretrained(
            tmp_path, dtype=torch.float64
        ).eval()
        with torch.no_grad():
            assert rel(from_pretrained(tmp_path)(x), reloaded(input_ids=x).logits) <= tol


def test_from_pretrained_takes_the_attention_implementation(tmp_path):
    """A float64 Llama checkpoint loaded with eager attention converts with the float32 softmax of HF's eager
    attention, and matches the eager model to 1e-10 (the sdpa default matches the sdpa model)."""
    hf = hf_model("llama-gqa2-biases-tied-headdim", attn_implementation="eager")
    hf.save_pretrained(tmp_path, safe_serialization=True)
    x = tokens()
    eager = from_pretrained(tmp_path, attn_implementation="eager")
    assert eager.cfg.attn_softmax_dtype == torch.float32
    sdpa = from_pretrained(tmp_path, attn_implementation="sdpa")
    assert sdpa.cfg.attn_softmax_dtype is None
    with torch.no_grad():
        assert rel(eager(x), hf(x).logits) <= 1e-10
    with pytest.raises(TypeError, match="attn_implementation=1 is not valid"):
        from_pretrained(tmp_path, attn_implementation=1)


class _LowRankAdapter(torch.nn.Linear):
    """A linear layer whose forward adds a low-rank update of its own (as a LoRA adapter layer does)."""

    def __init__(self, base: torch.nn.Linear):
        super().__init__(
            base.in_features, base.out_features, bias=base.bias is not None, dtype=base.weight.dtype
        )
        self.load_state_dict(base.state_dict())
        self.a = torch.nn.Parameter(torch.randn(2, base.in_features, dtype=base.weight.dtype))
        self.b = torch.nn.Parameter(torch.randn(base.out_features, 2, dtype=base.weight.dtype))

    def forward(self, x):
        return super().forward(x) + x @ self.a.T @ self.b.T


def test_modules_that_compute_more_than_their_weights_are_refused():
    """An adapter layer (a class from outside torch.nn / transformers) or a forward hook changes what the model
    computes without changing the weights the converter reads: refused by module name, never converted to the
    model without them."""
    hf = hf_model("llama-mqa")
    x = tokens()
    attn = hf.model.layers[0].self_attn
    plain = attn.q_proj
    attn.q_proj = _LowRankAdapter(plain)
    with pytest.raises(
        UnsupportedModelError, match=r"module model\.layers\.0\.self_attn\.q_proj.*_LowRankAdapter"
    ):
        from_hf(hf)
    attn.q_proj = plain
    h = hf.model.layers[1].mlp.register_forward_hook(lambda m, i, o: o + 1)
    with pytest.raises(UnsupportedModelError, match=r"module model\.layers\.1\.mlp.*forward hook"):
        from_hf(hf)
    h.remove()
    h = hf.model.norm.register_forward_pre_hook(lambda m, i: (i[0] * 2,))
    with pytest.raises(UnsupportedModelError, match=r"module model\.norm.*forward pre hook"):
        from_hf(hf)
    h.remove()
    with torch.no_grad():
        assert rel(from_hf(hf)(x), hf(x).logits) <= 1e-10
    # pypattern's own adapter leaves identity hooks on the modules: converted while its hook points are empty
    from pypattern.models.hf import hooked_hf

    hm = hooked_hf(hf)
    with torch.no_grad():
        assert rel(from_hf(hf)(x), hf(x).logits) <= 1e-10
    remove = hm.hook_dict["blocks.1.hook_resid_mid"].add_hook(lambda a, hook: a * 2)
    with pytest.raises(UnsupportedModelError, match=r"forward (pre )?hook"):
        from_hf(hf)
    remove()
    remove = hm.hook_dict["blocks.0.hook_mlp_out"].add_hook(lambda a, hook: a * 2)
    with pytest.raises(UnsupportedModelError, match=r"module model\.layers\.0\.mlp.*forward hook"):
        from_hf(hf)
    remove()
    assert rel(from_hf(hf)(x), hf(x).logits) <= 1e-10


def test_paged_attention_is_refused():
    hf = hf_model("llama-mqa")
    hf.config._attn_implementation = "paged|eager"
    with pytest.raises(UnsupportedModelError, match=r"attn_implementation='paged\|eager'.*paged cache"):
        from_hf(hf)


def test_a_checkpoint_missing_a_tensor_is_refused(tmp_path):
    """transformers fills a tensor the checkpoint lacks with random values and only logs it: refused."""
    from safetensors.torch import load_file, save_file

    hf = hf_model("llama-mqa")
    hf.save_pretrained(tmp_path, safe_serialization=True)
    (f,) = [p for p in tmp_path.iterdir() if p.suffix == ".safetensors"]
    state = load_file(f)
    name = "model.layers.1.mlp.down_proj.weight"
    del state[name]
    save_file(state, f, metadata={"format": "pt"})
    with pytest.raises(
        UnsupportedModelError, match=rf"lacks 1 of the model's tensors \(\['{re.escape(name)}'\]\)"
    ):
        from_pretrained(tmp_path)


@pytest.mark.parametrize("slow_but_exact", [False, True])
def test_bloom_sliced_projections_of_pretraining_tp(slow_but_exact):
    """BLOOM with pretraining_tp > 1 and slow_but_exact sums its output projections over weight slices without
    their biases (Hugging Face's code): converted exactly, with those biases left out (and kept otherwise)."""
    hf = hf_model("bloom-alibi-6heads-tied", pretraining_tp=3, slow_but_exact=slow_but_exact)
    assert float(hf.transformer.h[0].self_attention.dense.bias.abs().max()) > 0
    with torch.no_grad():
        assert rel(from_hf(hf)(tokens()), hf(tokens()).logits) <= 1e-10


def test_llama3_scaling_the_converter_cannot_represent_is_refused_by_the_hf_option():
    hf = hf_model("llama-mqa", rope_scaling={**_LLAMA3, "low_freq_factor": 2.0, "high_freq_factor": 2.0})
    with pytest.raises(UnsupportedModelError, match=r"rope_parameters=.*high_freq_factor=2.0 must exceed"):
        from_hf(hf)


def test_from_pretrained_checks_dtype_first_and_ignores_an_adapter_file(tmp_path):
    """A bad dtype is refused before anything is loaded; a directory whose only safetensors file is a PEFT
    adapter's has no model weights (pickle-only: refused without unpickling)."""
    with pytest.raises(ValueError, match=r"dtype='bfloat16' is not valid"):
        from_pretrained(tmp_path / "anything", dtype="bfloat16")
    hf = hf_model("llama-mqa")
    hf.config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(
        UnsupportedModelError,
        match=r"no \.safetensors weights \(only pickle-based files \['pytorch_model.bin'\]",
    ):
        from_pretrained(tmp_path)


def test_smollm3_no_rope_layers_longer_than_the_model_converts():
    """no_rope_layers is read per layer index: entries past the last layer are unused by Hugging Face."""
    hf = hf_model("smollm3-nope-layers")
    hf.config.no_rope_layers = list(hf.config.no_rope_layers) + [1, 0, 1]
    model = from_hf(hf)
    assert model.cfg.rotary_layers == (True, False, False, True)
    with torch.no_grad():
        assert rel(model(tokens()), hf(tokens()).logits) <= 1e-10
    hf.config.no_rope_layers = [1, 1, 1, 1]  # the modules say otherwise: refused
    with pytest.raises(UnsupportedModelError, match="no_rope_layers"):
        from_hf(hf)


def test_falcon_layouts_patch_exactly_and_alibi_is_refused():
    """Each Falcon query/key/value layout: exact per-head patching equals one forward per cell; the ALiBi
    checkpoints (bias scaled with the scores) are refused by name."""
    from pypattern import activation_patching
    from pypattern.patching import LogitDiff

    x = tokens()
    corr = x.clone()
    corr[:, 3] = (corr[:, 3] + 1) % V
    metric = LogitDiff(x[:, -1], (x[:, -1] + 1) % V)
    for case in (
        "falcon-mqa-parallel-tied",
        "falcon-new-gqa-two-norms-bias",
        "falcon-sequential-per-head-bias",
    ):
        model = from_hf(hf_model(case))
        for site in ("z", "resid_pre"):
            kw = dict(metric=metric, positions=[3, T - 1])
            exact = activation_patching(model, site, x, corr, method="exact", **kw).values
            naive = activation_patching(model, site, x, corr, method="naive", **kw).values
            torch.testing.assert_close(exact, naive, rtol=0, atol=1e-10)
            assert exact.abs().max() > 1e-3
    # activation_patching given the unconverted model converts it (no native adapter covers Falcon)
    hf = hf_model("falcon-mqa-parallel-tied")
    direct = activation_patching(hf, "z", x, corr, metric=metric, positions=[3]).values
    torch.testing.assert_close(
        direct, activation_patching(from_hf(hf), "z", x, corr, metric=metric, positions=[3]).values
    )
    with pytest.raises(UnsupportedModelError, match="alibi=True"):
        from_hf(hf_model("falcon-sequential-per-head-bias", alibi=True))


def test_from_pretrained_refuses_damaged_extra_or_adapter_checkpoints_naming_them(tmp_path):
    """A config.json that is not JSON, a truncated weights file, weights the config has no place for (a config
    of fewer layers) and a merged-in-name-only PEFT adapter are each refused with a ValueError naming the
    directory, never loaded approximately."""
    hf = hf_model("llama-mqa")
    good = tmp_path / "good"
    hf.save_pretrained(good)
    model = from_pretrained(good)
    with torch.no_grad():
        assert rel(model(tokens()), hf(tokens()).logits) <= 1e-4
    bad_json = tmp_path / "json"
    hf.save_pretrained(bad_json)
    (bad_json / "config.json").write_text("{model_type: llama")
    with pytest.raises(ValueError, match=r"path=.*json.*config.json is not valid JSON"):
        from_pretrained(bad_json)
    cut = tmp_path / "cut"
    hf.save_pretrained(cut)
    w = cut / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"path=.*cut.*could not be loaded"):
        from_pretrained(cut)
    fewer = tmp_path / "fewer"
    hf.save_pretrained(fewer)
    cfg = json.loads((fewer / "config.json").read_text())
    cfg["num_hidden_layers"] -= 1
    (fewer / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=r"tensors its config.json has no place for"):
        from_pretrained(fewer)
    adapter = tmp_path / "adapter"
    hf.save_pretrained(adapter)
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(UnsupportedModelError, match=r"PEFT adapter.*merge_and_unload"):
        from_pretrained(adapter)


def test_bfloat16_loss_is_taken_in_float32():
    """return_type='loss' of a bfloat16 model: the log-softmax in float32, as Hugging Face takes it."""
    hf = hf_model("llama-mqa").to(torch.bfloat16)
    model = from_hf(hf)
    x = tokens()
    with torch.no_grad():
        logits = model(x)
        want = torch.nn.functional.cross_entropy(logits[:, :-1].double().flatten(0, 1), x[:, 1:].flatten())
        got = model(x, return_type="loss")
    assert got.dtype == torch.float32
    assert abs(float(got) - float(want)) <= 1e-6 * float(want)


def test_from_pretrained_refuses_architectures_that_do_not_match_model_type(tmp_path, capsys):
    """A config.json whose architectures names a class of another model_type (a GPT-2 folder naming
    LlamaForCausalLM) is refused naming both, before any model is built: transformers would read the GPT-2 config
    as a Llama one, with Llama's default sizes wherever the fields differ (billions of parameters). The sizes
    below are a tiny Llama's too, so that a model built without the check stays small."""
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=16, n_layer=1, n_head=2, n_positions=CTX)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2", safe_serialization=True)
    path = tmp_path / "gpt2" / "config.json"
    config = json.loads(path.read_text())
    config.update(
        architectures=["LlamaForCausalLM"], hidden_size=16, num_hidden_layers=1, num_attention_heads=2
    )
    config.update(num_key_value_heads=2, intermediate_size=24, max_position_embeddings=CTX)
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError) as e:
        from_pretrained(tmp_path / "gpt2")
    assert str(e.value) == (
        f"path={str(tmp_path / 'gpt2')!r}: config.json's architectures names LlamaForCausalLM, whose config has "
        "model_type 'llama', but its model_type is 'gpt2'; the two do not describe one model: correct architectures "
        "(model_type 'gpt2' is GPT2LMHeadModel) or model_type"
    )
    # the command line names the folder as --model, in one line
    import numpy as np

    from pypattern.cli import main

    np.save(tmp_path / "t.npy", np.zeros((2, 4), dtype=np.int64))
    with pytest.raises(SystemExit) as e:
        main(
            [
                "patch",
                "--model",
                str(tmp_path / "gpt2"),
                "--data",
                str(tmp_path / "t.npy"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert (
        f"pypattern patch: error: --model {str(tmp_path / 'gpt2')!r}: config.json's architectures names"
        in err
    )
    # the same folder with its own architectures loads
    config["architectures"] = ["GPT2LMHeadModel"]
    path.write_text(json.dumps(config))
    assert from_pretrained(tmp_path / "gpt2").cfg.d_model == 16
