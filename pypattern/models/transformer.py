"""A causal transformer with TransformerLens' weight layout, parameter names and hook names.

The defaults make the small GPT-2-style model pypattern trains itself (LayerNorm, learned absolute positions,
GELU MLP, every bias, a separate unembedding). Options reach the architectures of real language models: RMSNorm,
rotary position embeddings (partial, GPT-NeoX or GPT-J pairing, per-layer bases), grouped-query attention, gated
MLPs, attention and MLP in parallel, per-family biases, tied embeddings, sliding-window attention, query/key norms
and Gemma's scaled embeddings, offset norm weights, sandwich norms and soft-capping, so that Hugging Face models
of those families convert into it exactly (:mod:`pypattern.models.convert`).

Weights (TransformerLens layout; parameters an option turns off do not exist):

- ``embed.W_E (d_vocab, d_model)``; ``pos_embed.W_pos (n_ctx, d_model)`` (``positional_embedding_type="standard"``)
- ``blocks.{l}.attn.W_Q (n_heads, d_model, d_head)``, ``W_K``/``W_V (n_key_value_heads, d_model, d_head)``,
  ``W_O (n_heads, d_head, d_model)``; ``b_Q (n_heads, d_head)``, ``b_K``/``b_V (n_key_value_heads, d_head)``
  (``attn_bias``); ``b_O (d_model,)`` (``attn_out_bias``)
- ``blocks.{l}.mlp.W_in (d_model, d_mlp)``, ``W_gate (d_model, d_mlp)`` (``gated_mlp``), ``W_out (d_mlp,
  d_model)``; ``b_in``, ``b_gate``, ``b_out`` (``mlp_bias``)
- ``blocks.{l}.ln1/ln2.w`` and, for LayerNorm, ``.b``; ``ln_final.w/b``; with sandwich norms
  (``use_normalization_before_and_after``) also ``blocks.{l}.ln1_post/ln2_post.w`` (``.b``)
- ``unembed.W_U (d_model, d_vocab)``, or with ``tie_word_embeddings`` no parameter of its own: the unembedding
  is ``embed.W_E`` transposed (one parameter; ``model.unembed.W_U`` is then that transposed view);
  ``unembed.b_U (d_vocab,)`` (``unembed_bias``)

Hook points (TransformerLens names):

- ``hook_embed``, ``hook_pos_embed`` (standard positions only)
- ``blocks.{l}.hook_resid_pre``; ``blocks.{l}.ln1.hook_scale/hook_normalized`` (``hook_normalized`` is the norm's
  output, after its weight and bias, for LayerNorm and RMSNorm alike)
- ``blocks.{l}.attn.hook_q (batch, pos, n_heads, d_head)``, ``hook_k``/``hook_v (batch, pos, n_key_value_heads,
  d_head)`` (before rotation); with rotary positions ``hook_rot_q``/``hook_rot_k`` (same shapes, after rotation)
- ``blocks.{l}.attn.hook_attn_scores``/``hook_pattern (batch, n_heads, query_pos, key_pos)`` (scores after the
  mask), ``blocks.{l}.attn.hook_z (batch, pos, n_heads, d_head)``, ``blocks.{l}.hook_attn_out``
- ``blocks.{l}.hook_resid_mid`` (sequential blocks only: with ``parallel_attn_mlp`` attention and MLP both read
  ``hook_resid_pre`` and there is no mid-point)
- ``blocks.{l}.ln2.hook_scale/hook_normalized``, ``blocks.{l}.mlp.hook_pre`` (input of the activation; for a
  gated MLP the gate, ``x @ W_gate``), ``mlp.hook_pre_linear`` (gated MLPs: ``x @ W_in``), ``mlp.hook_post``
  (``act(pre)``, times ``pre_linear`` when gated), ``blocks.{l}.hook_mlp_out``, ``blocks.{l}.hook_resid_post``
- ``ln_final.hook_scale/hook_normalized``

The forward takes a Hugging Face style ``attention_mask`` (padding keys masked out of every query's attention:
``hook_attn_scores`` ``-inf`` and ``hook_pattern`` 0 there; queries left with no key attend to nothing) and
``position_ids`` (learned, rotary and ALiBi positions per sequence), so left-padded batches compute what the Hugging
Face model computes at their real tokens (:meth:`Transformer.forward`).

Attention-only models (``d_mlp`` None or 0) have no ``ln2``, ``mlp``, ``hook_resid_mid`` or ``hook_mlp_out``; models
without normalization (``normalization_type=None``) have no ln hooks.

The arithmetic is split into methods other code reuses (the patching engine recomputes parts of a block from
cached activations): :meth:`Attention.compute_q`/:meth:`~Attention.compute_k`/:meth:`~Attention.compute_v`,
:meth:`Attention.rotate`, :meth:`Attention.attn_mask`, :meth:`Attention.scores`, :meth:`Attention.mix`,
:meth:`Attention.output`, :meth:`MLP.hidden`/:meth:`MLP.output`, :meth:`TransformerBlock.attn_block`/
:meth:`~TransformerBlock.mlp_block`/:meth:`~TransformerBlock.combine`. None of them branches on tensor values or
writes into parameters, so the model runs under ``torch.func.functional_call`` and ``torch.func.vmap``.
"""

from __future__ import annotations

import contextlib
import math
import re
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._checks import is_count, is_real
from ..ops.activations import SQRT_2_OVER_PI, gelu_tanh_unchecked
from .hooks import HookedRootModule, HookPoint
from .packed import PackedWeights, functorch_wrapped

__all__ = [
    "TransformerConfig",
    "Transformer",
    "component_masks",
    "list_components",
    "gelu_new",
    "apply_act",
    "LayerNorm",
    "LayerNormPre",
    "RMSNormPre",
    "RMSNorm",
]

GELU_FAST_C = 0.7978845608  # Hugging Face's gelu_fast constant (sqrt(2 / pi) rounded)
BLOOM_GELU_C = 0.79788456  # BLOOM's tanh-GELU constant (sqrt(2 / pi) rounded to 8 digits)
_ACT_FNS = (
    "gelu",
    "relu",
    "gelu_new",
    "silu",
    "gelu_fast",
    "gelu_pytorch_tanh",
    "quick_gelu",
    "bloom_gelu",
    "gelu_10",
    "relu2",
    "relu6",
    "leaky_relu",
    "tanh",
    "sigmoid",
    "mish",
    "hardswish",
    "linear",
)
_NORMS = ("LN", "LNPre", "RMS", "RMSPre", None)
_POS_TYPES = ("standard", "rotary", "alibi", "none")


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh approximation of GELU (Hugging Face's ``gelu_new``),
    ``0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))``, in one pass over ``x``: on CPU tensors of float32 or
    float64 pypattern's C++ kernel (:func:`pypattern.ops.activations.gelu_tanh`; torch's own CPU kernel is several
    times slower, more so the larger the inputs), elsewhere torch's fused kernel. Equal to the written-out formula within
    float rounding (5e-7 absolute in float32, 1e-15 in float64)."""
    return gelu_tanh_unchecked(x, SQRT_2_OVER_PI)


def apply_act(x: torch.Tensor, act_fn: str) -> torch.Tensor:
    """The activation ``act_fn`` (Hugging Face's ``ACT2FN`` formula of the same name) applied to ``x``.

    ``"gelu"`` is the exact (erf) GELU, ``"gelu_new"`` GPT-2's tanh form, ``"gelu_fast"`` the other tanh form,
    ``"gelu_pytorch_tanh"`` torch's tanh GELU, ``"quick_gelu"`` ``x * sigmoid(1.702 x)``, ``"silu"`` ``x * sigmoid(x)``,
    ``"bloom_gelu"`` BLOOM's tanh form (its constant ``0.79788456`` for ``sqrt(2 / pi)``), ``"gelu_10"`` the exact GELU
    clipped to ``[-10, 10]``, ``"relu2"`` ``relu(x)^2``, ``"relu6"`` ``min(max(x, 0), 6)``, ``"leaky_relu"`` slope 0.01
    below 0, ``"tanh"``, ``"sigmoid"``, ``"mish"`` ``x tanh(softplus(x))``, ``"hardswish"``, ``"linear"`` the identity.
    """
    if act_fn == "gelu":
        return F.gelu(x)
    if act_fn == "relu":
        return F.relu(x)
    if act_fn == "silu":
        return F.silu(x)
    if act_fn == "gelu_fast":
        return gelu_tanh_unchecked(x, GELU_FAST_C)
    if act_fn == "gelu_pytorch_tanh":
        return gelu_tanh_unchecked(x, SQRT_2_OVER_PI)
    if act_fn == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    if act_fn == "bloom_gelu":
        return gelu_tanh_unchecked(x, BLOOM_GELU_C)
    if act_fn in _OTHER_ACTS:
        return _OTHER_ACTS[act_fn](x)
    return gelu_new(x)


_OTHER_ACTS = {
    "gelu_10": lambda x: torch.clip(F.gelu(x), -10.0, 10.0),
    "relu2": lambda x: torch.square(F.relu(x)),
    "relu6": F.relu6,
    "leaky_relu": F.leaky_relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "mish": F.mish,
    "hardswish": F.hardswish,
    "linear": lambda x: x,
}


# TransformerConfig's integer and real fields (each one value, or one per layer): numpy scalars given for them
# (a grid built with numpy) are stored as Python's int and float, as the checks and the saved JSON expect
_INT_FIELDS = (
    "n_layers",
    "d_model",
    "n_heads",
    "d_head",
    "d_mlp",
    "d_vocab",
    "n_ctx",
    "seed",
    "rotary_dim",
    "n_key_value_heads",
    "n_experts",
    "experts_per_token",
    "moe_shared_d_mlp",
    "sliding_window",
    "padding_idx",
)
_REAL_FIELDS = (
    "init_range",
    "ln_eps",
    "rotary_base",
    "attn_scale",
    "attn_scores_multiplier",
    "clip_qkv",
    "embed_scale",
    "residual_multiplier",
    "logits_scaling",
    "norm_weight_offset",
    "attn_scores_soft_cap",
    "output_logits_soft_cap",
)


_BOOL_FIELDS = (
    "rotary_adjacent_pairs",
    "gated_mlp",
    "moe_renormalize",
    "moe_float32_weights",
    "parallel_attn_mlp",
    "parallel_shared_norm",
    "attn_bias",
    "attn_out_bias",
    "mlp_bias",
    "unembed_bias",
    "tie_word_embeddings",
    "pre_norms",
    "use_normalization_before_and_after",
)


def _plain_number(v, integer: bool):
    """``v`` as Python's int (``integer``) or float when it is a numpy integer or real scalar; else ``v``."""
    if isinstance(v, bool) or type(v) in (int, float) or not is_real(v):
        return v
    if integer:
        return int(v) if is_count(v) else v
    return float(v)


def _as_dtype(v, name: str) -> torch.dtype | None:
    if v is None or isinstance(v, torch.dtype):
        return v
    if isinstance(v, str) and isinstance(getattr(torch, v.replace("torch.", ""), None), torch.dtype):
        return getattr(torch, v.replace("torch.", ""))
    raise ValueError(f"{name}={v!r} is not valid; give a torch.dtype such as torch.float32 (or its name)")


_DTYPE_FIELDS = (
    "dtype",
    "rotary_dtype",
    "rotary_freq_dtype",
    "rotary_input_dtype",
    "norm_dtype",
    "attn_softmax_dtype",
    "attn_scores_dtype",
)


def attn_softmax(
    scores: torch.Tensor, dtype: torch.dtype | None = None, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Attention pattern from masked scores: softmax over the last axis, taken in ``dtype`` (None: the scores'
    dtype) and cast to ``out_dtype`` (None: back to the scores' dtype; Hugging Face's ``softmax(scores, dim=-1,
    dtype=dtype).to(...)``)."""
    out_dtype = out_dtype or scores.dtype
    if (dtype is None or dtype == scores.dtype) and out_dtype == scores.dtype:
        return torch.softmax(scores, dim=-1)
    return torch.softmax(scores, dim=-1, dtype=dtype or scores.dtype).to(out_dtype)


@dataclass
class TransformerConfig:
    """Shape and options of :class:`Transformer` (TransformerLens' option names where it has them).

    Parameters
    ----------
    n_layers, d_model, n_heads, d_head, d_vocab, n_ctx : int
        Sizes; ``d_head`` defaults to ``d_model // n_heads`` when ``n_heads`` divides ``d_model`` (otherwise it
        must be given; it may differ: ``n_heads * d_head != d_model`` is allowed, as in some Llama-family
        models). ``n_ctx`` bounds the sequence length only with learned positions (:attr:`max_positions`: a
        longer sequence raises ValueError naming ``n_ctx``); rotary models read longer sequences, as Hugging
        Face's do.
    d_mlp : int or None
        Hidden width of the MLP; ``None`` or 0 makes an attention-only model.
    act_fn : {"gelu", "relu", "gelu_new", "silu", "gelu_fast", "gelu_pytorch_tanh", "quick_gelu", "bloom_gelu", \
            "gelu_10", "relu2", "relu6", "leaky_relu", "tanh", "sigmoid", "mish", "hardswish", "linear"}
        See :func:`apply_act`.
    normalization_type : {"LN", "LNPre", "RMS", "RMSPre", None}
        LayerNorm (weight ``w`` and bias ``b``), LayerNorm without weight or bias (``"LNPre"``, TransformerLens'
        name; OLMo's norms), RMSNorm (weight ``w`` only), RMSNorm without weight (``"RMSPre"``, TransformerLens'
        name: an RMS model whose norm weights were folded into the next layer), or none.
    positional_embedding : bool or None
        Older spelling of ``positional_embedding_type``: True means ``"standard"``, False ``"none"``. When
        ``positional_embedding_type`` is given it decides (False with ``"standard"``, or True with another type,
        is refused); after construction this field is True exactly when the type is ``"standard"``.
    dtype : torch.dtype
        Of the weights (a floating dtype, or its name). ``model.to(dtype)``, ``.half()``, ``.double()`` ... set it to
        the weights' new dtype (in a config of the model's own).
    seed : int or None
        Seed of the weight initialisation (normal, std ``init_range``; biases 0; norm weights 1).
    init_range : float or None
        Standard deviation of the initial weights; default ``0.8 / sqrt(d_model)``.
    ln_eps : float
        Epsilon of every LayerNorm / RMSNorm.
    extra : dict
        Free-form metadata (for example where a converted model came from).
    positional_embedding_type : {"standard", "rotary", "alibi", "none"} or None
        Learned absolute positions (``pos_embed.W_pos``), rotary embeddings on queries and keys, ALiBi (BLOOM's
        linear biases: head ``h`` adds ``slope_h * key_position`` to its scaled scores, before the mask; see
        :meth:`Attention.position_bias`), or none. Without rotary positions the rotary options are refused, as
        they would be ignored: ``rotary_dim``, ``rotary_adjacent_pairs=True``, ``rotary_input_dtype``,
        ``rotary_scaling``, ``rotary_layers``, and with learned or ALiBi positions also a ``rotary_base`` other
        than 10000, ``rotary_dtype`` and ``rotary_freq_dtype`` (a model converted without rotation, type
        ``"none"``, keeps its base and dtypes).
    rotary_dim : int or None
        Rotary models: how many leading dimensions of each head rotate (even, <= ``d_head``; default ``d_head``).
        The rest pass through unchanged (GPT-NeoX's partial rotary).
    rotary_base : float or a sequence of floats (one per layer)
        Rotary base ``theta``: dimension pair ``i`` turns by ``position / rotary_base ** (2 i / rotary_dim)``. A
        sequence gives each layer its own (Gemma 3's local and global layers); :meth:`rope_base` reads a layer's.
    rotary_adjacent_pairs : bool
        False (default): GPT-NeoX / Llama pairing, dimension ``i`` with ``i + rotary_dim / 2`` (``rotate_half``).
        True: GPT-J pairing, dimension ``2 i`` with ``2 i + 1``.
    rotary_dtype : torch.dtype or None
        Dtype in which the rotation angles and their cosines and sines are computed before they are cast to the
        activations' dtype; None: the activations' dtype, but float32 for 16-bit activations (in 16 bits an angle
        of a few hundred radians is rounded by whole radians). Hugging Face (and TransformerLens) compute them in
        float32 for every model dtype, and converted models set float32 to be exact.
    rotary_freq_dtype : torch.dtype or None
        Dtype the rotary frequencies ``1 / rotary_base ** (2 i / rotary_dim)`` are rounded to before the angles are
        computed (in ``rotary_dtype``); None: no rounding. A Hugging Face model cast with ``.to(torch.bfloat16)``
        or ``.half()`` holds its frequencies in that dtype, and its converted model sets it to be exact.
    rotary_input_dtype : torch.dtype or None
        Queries and keys turn in this dtype, with cosines and sines in it (ERNIE 4.5 rotates ``q.float()`` by float32
        cosines), and the result is cast back to the model's dtype; None: the model's dtype.
    rotary_scaling : dict or None
        Scaled rotary frequencies, in Hugging Face's ``rope_parameters`` terms: ``{"rope_type": "linear",
        "factor": f}`` divides every frequency by ``f``; ``{"rope_type": "llama3", "factor": f, "low_freq_factor":
        lo, "high_freq_factor": hi, "original_max_position_embeddings": n}`` is Llama 3's (frequencies whose
        wavelength exceeds ``n / lo`` divided by ``f``, those under ``n / hi`` kept, the ones between
        interpolated); ``{"rope_type": "yarn", "factor": f, "original_max_position_embeddings": n, "beta_fast": bf,
        "beta_slow": bs, "attention_factor": a}`` (optional ``"truncate"``, default True) is YaRN's: frequencies
        blended between ``1 / (f base^(2i/d))`` and the unscaled ones by a linear ramp over the dimensions whose
        number of turns in ``n`` positions lies between ``bs`` and ``bf``, and cosines and sines multiplied by
        ``a``; ``{"rope_type": "longrope", "short_factor": [...], "original_max_position_embeddings": n,
        "attention_factor": a}`` is Phi-3's LongRoPE on sequences of at most ``n`` positions (frequencies divided
        by the short factors, cosines and sines multiplied by ``a``); a position at or past ``n``, where the
        Hugging Face model switches to its long factors, raises ``ValueError``; ``{"rope_type": "dynamic",
        "factor": f, "original_max_position_embeddings": n}`` is dynamic NTK scaling on sequences of at most ``n``
        positions, where its frequencies are the unscaled ones (a position at or past ``n``, where the Hugging Face
        model recomputes them from the sequence length, raises ``ValueError``). None: unscaled. All fix the
        frequencies once. A sequence (one dict or None per layer) scales each layer's own;
        :meth:`rope_scaling` reads a layer's.
    rotary_layers : sequence of bool or None
        With rotary positions: which layers rotate their queries and keys (one flag per layer; a layer without
        rotation sees no position at all, SmolLM3's NoPE layers); :meth:`rotates` reads a layer's. None: every
        layer.
    n_key_value_heads : int or None
        Number of key/value heads (grouped-query attention; 1 is multi-query attention); default ``n_heads``.
        Query head ``h`` reads key/value head ``h // (n_heads // n_key_value_heads)``.
    gated_mlp : bool
        MLP ``(act(x W_gate + b_gate) * (x W_in + b_in)) W_out + b_out`` (Llama's gate / up / down projections).
    n_experts : int or None
        A sparse mixture of ``n_experts`` gated MLPs in every layer (Mixtral, OLMoE, Qwen3-MoE; needs
        ``gated_mlp`` and no MLP biases): the router's logits ``x W_router`` (``(d_model, n_experts)``), their
        softmax in float32, its ``experts_per_token`` largest entries as the routing weights (divided by their sum
        with ``moe_renormalize``; cast to the model's dtype unless ``moe_float32_weights``, Mixtral's, which keeps
        them in float32 for the product), and the output ``sum_e w_e (act(x W_gate[e]) * (x W_in[e])) W_out[e]``
        over the chosen experts (``W_gate``, ``W_in`` ``(n_experts, d_model, d_mlp)``, ``W_out`` ``(n_experts,
        d_mlp, d_model)``). Hooks ``mlp.hook_router_logits``, ``mlp.hook_expert_weights`` (``(..., n_experts)``,
        zero for experts not chosen) and ``mlp.hook_expert_indices`` (``(..., experts_per_token)``). None: a
        dense MLP.
    experts_per_token : int or None
        Experts chosen per token (``n_experts``' top-k).
    moe_renormalize : bool
        The chosen experts' weights are divided by their sum (Mixtral, Qwen3-MoE's ``norm_topk_prob``). True
        needs ``n_experts``.
    moe_float32_weights : bool
        The routing weights stay float32 in the product with the experts' outputs (Mixtral); False: cast to the
        model's dtype first (OLMoE, Qwen3-MoE). True needs ``n_experts``.
    moe_shared_d_mlp : int or None
        A shared expert beside the routed ones (Qwen2-MoE): a gated MLP of this width (``W_shared_gate``,
        ``W_shared_in``, ``W_shared_out``) on every token, its output times ``sigmoid(x W_shared_router)``
        (``(d_model, 1)``) added to the routed experts' sum. None: none.
    parallel_attn_mlp : bool
        Attention and MLP both read the block's input through their own norms (``ln1``, ``ln2``) and both outputs
        are added to it (GPT-NeoX's ``use_parallel_residual``); there is no ``hook_resid_mid``.
    parallel_shared_norm : bool
        With ``parallel_attn_mlp``: attention and MLP read one norm's output (``ln1``; the block has no ``ln2`` of
        its own and ``blocks.{l}.ln2`` is ``ln1``), as in Phi-1/1.5/2 and GPT-J; False: each its own (GPT-NeoX).
    attn_bias : bool
        Biases ``b_Q``, ``b_K``, ``b_V``.
    clip_qkv : float or None
        Queries, keys and values are clamped to ``[-clip_qkv, clip_qkv]`` right after their projection (and bias),
        before any query/key norm and rotation (OLMo's ``clip_qkv``); ``hook_q`` / ``hook_k`` / ``hook_v`` see the
        clamped values. None: no clamp.
    qk_norm : bool or "all"
        Queries and keys pass, per head, through an RMSNorm over ``d_head`` (weights ``attn.q_norm.w``,
        ``attn.k_norm.w``, shared by the heads; computed in ``norm_dtype``) after their projection and bias and
        before rotation (Qwen3, Gemma 3). ``"all"``: one RMSNorm over every head's projection at once (weights of
        ``n_heads * d_head`` and ``n_key_value_heads * d_head``; OLMo 2), which couples the heads' queries (and
        keys) through the norm's statistic. ``hook_q`` / ``hook_k`` see the normalised values.
    attn_out_bias : bool
        Bias ``b_O``.
    mlp_bias : bool
        Biases ``b_in``, ``b_out`` (and ``b_gate`` when gated).
    unembed_bias : bool
        Bias ``b_U``.
    tie_word_embeddings : bool
        The unembedding is ``embed.W_E`` transposed: one parameter, no ``unembed.W_U``.
    attn_scale : float or None
        Attention scores are ``q . k / attn_scale``; default ``sqrt(d_head)``.
    attn_scores_multiplier : float, None, or a sequence of floats (one per layer)
        When set, the scores are ``q . k * attn_scores_multiplier`` (a multiplication in the scores' dtype) in place of
        the division by ``attn_scale``, which is then ``1 / attn_scores_multiplier`` (of layer 0 for a sequence):
        GPT-J's eager attention multiplies float32 scores by ``d_head ** -0.5``, and a division rounds them
        differently. A sequence gives each layer its own (GPT-2's ``scale_attn_by_inverse_layer_idx``:
        ``d_head ** -0.5 / (layer + 1)``); :meth:`scores_multiplier` reads a layer's. An ``attn_scale`` given
        with it must be ``1 / attn_scores_multiplier`` (of layer 0).
    sliding_window : int, None, or a sequence of them (one per layer)
        Query at position ``i`` attends to keys ``j`` with ``i - sliding_window < j <= i`` (Mistral's window);
        None: every earlier key. A sequence gives each layer its own (GPT-Neo's local and global layers); it is
        kept as a tuple. :meth:`window` reads a layer's.
    norm_dtype : torch.dtype or None
        Dtype in which norms compute their statistics and normalise (the result is cast back before the weight);
        None: the input's dtype. Hugging Face's Llama-family RMSNorm computes in float32, and converters set it.
    attn_softmax_dtype : torch.dtype or None
        Dtype in which the attention softmax is taken: the scores are cast to it, normalised, and the pattern is
        cast back to the scores' dtype (:func:`attn_softmax`); None: the scores' dtype. Hugging Face's ``eager``
        attention of GPT-NeoX and the Llama family takes it in float32 for every model dtype, and converters set
        float32 for such a model.
    attn_scores_dtype : torch.dtype or None
        Dtype in which queries and keys are multiplied (both cast to it first; the pattern is cast to the values'
        dtype before it mixes them); None: the model's. GPT-Neo computes its scores in float32 for every model
        dtype, and its converter sets float32. The exact patching engine and AtP* take these products over other
        row subsets than the forward does, so in a float64 model with float32 scores they agree with one forward per
        cell to the float32 rounding of the scores (about 1e-7 relative), not to float64 rounding.
    embed_scale : float or None
        The token embedding is multiplied by this number (cast to the weights' dtype) before it enters the residual
        stream and ``hook_embed`` (Gemma's ``sqrt(d_model)``, Granite's ``embedding_multiplier``); the unembedding,
        tied or not, is not scaled.
    residual_multiplier : float or None
        The attention's and the MLP's writes are multiplied by this number before they are added to the residual
        stream (Granite's ``residual_multiplier``); ``hook_attn_out`` / ``hook_mlp_out`` see the scaled writes.
        None: unscaled.
    logits_scaling : float or None
        The logits are divided by this number (Granite's ``logits_scaling``; before ``output_logits_soft_cap``).
        None: not divided.
    norm_weight_offset : float
        RMSNorm models: every RMSNorm (``qk_norm``'s too) multiplies by ``norm_weight_offset + w`` in its compute
        dtype and casts the product back (Gemma's ``x * (1 + w)``, with 1.0); 0 (default): ``w`` times the
        normalised input after the cast (Llama's order). LayerNorm models: every LayerNorm multiplies by
        ``norm_weight_offset + w`` (Nemotron's ``LayerNorm1P``, with 1.0). Fresh weights start at ``1 -
        norm_weight_offset``. Not with ``"LNPre"`` / ``"RMSPre"``, whose norms have no weight.
    norm_weight_before_cast : bool
        RMSNorm models only: every RMSNorm multiplies by ``w`` in its compute dtype before casting back, as Helium's
        does (and as a non-zero ``norm_weight_offset`` implies); False: Llama's order (cast, then ``w``).
    pre_norms : bool
        The norms in front of the attention and the MLP (``ln1``, ``ln2``); False: none, the sublayers read the
        residual stream itself (OLMo 2 normalises only their outputs: give ``use_normalization_before_and_after``
        with it). ``normalization_type`` still sets the other norms.
    use_normalization_before_and_after : bool
        Sandwich norms (Gemma 2 and 3): the attention's and the MLP's outputs each pass through a norm of their own
        (``ln1_post``, ``ln2_post``) before they are added to the residual stream; ``hook_attn_out`` and
        ``hook_mlp_out`` see the normalised writes. TransformerLens' name. Needs a ``normalization_type``.
    attn_scores_soft_cap : float or None
        Attention scores are capped as ``cap * tanh(scores / cap)`` after the scale and before the mask (Gemma
        2); ``hook_attn_scores`` sees the capped scores. None: uncapped.
    output_logits_soft_cap : float or None
        Logits are capped as ``cap * tanh(logits / cap)`` (Gemma 2's final soft-capping), by the unembedding
        module. None: uncapped.
    post_embedding_ln : bool
        A LayerNorm (``embed.ln``, TransformerLens' name) on the token embedding, inside ``embed``: ``hook_embed``
        sees its output (BLOOM's ``word_embeddings_layernorm``).
    padding_idx : int or None
        A token whose embedding row receives no gradient from the lookup (``torch.nn.Embedding``'s
        ``padding_idx``; a tied unembedding still trains it). The forward is unchanged. Converted models take it
        from the Hugging Face embedding, so that gradients (and every sampler's trajectory) equal the original's.
    positions_from_mask : bool or None
        The positions the forward reads when it is given an ``attention_mask`` and no ``position_ids``
        (:meth:`Transformer.forward`). True: each row's real tokens count from 0, ``(attention_mask.cumsum(-1) -
        1).clamp(min=0)``, as OPT's learned positions, BLOOM's ALiBi biases and TransformerLens' HookedTransformer
        (learned and rotary positions) derive them from the mask. False: the columns ``0 .. pos - 1`` whatever the
        mask, as the Hugging Face forward of GPT-2, GPT-Neo, GPT-J, GPT-NeoX, the Llama family, Mistral, Phi,
        Falcon, StarCoder2, GPT-BigCode and most others does (a TransformerLens 4.x ``TransformerBridge`` around one
        counts them from the mask in its forward: its conversion records True). None (default): True for ALiBi
        models and for models converted from OPT or from a HookedTransformer (``extra["converted_from"]``), else False;
        :attr:`mask_positions` reads the result.
    """

    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    d_head: int | None = None
    d_mlp: int | None = 256
    d_vocab: int = 64
    n_ctx: int = 32
    act_fn: str = "gelu"
    normalization_type: str | None = "LN"
    positional_embedding: bool | None = None
    dtype: torch.dtype = torch.float32
    seed: int | None = 0
    init_range: float | None = None
    ln_eps: float = 1e-5
    extra: dict = field(default_factory=dict)
    positional_embedding_type: str | None = None
    rotary_dim: int | None = None
    rotary_base: float = 10000.0
    rotary_adjacent_pairs: bool = False
    rotary_dtype: torch.dtype | None = None
    rotary_freq_dtype: torch.dtype | None = None
    rotary_input_dtype: torch.dtype | None = None
    rotary_scaling: dict | None = None
    rotary_layers: tuple | None = None
    n_key_value_heads: int | None = None
    gated_mlp: bool = False
    n_experts: int | None = None
    experts_per_token: int | None = None
    moe_renormalize: bool = False
    moe_float32_weights: bool = False
    moe_shared_d_mlp: int | None = None
    parallel_attn_mlp: bool = False
    parallel_shared_norm: bool = False
    attn_bias: bool = True
    attn_out_bias: bool = True
    mlp_bias: bool = True
    unembed_bias: bool = True
    tie_word_embeddings: bool = False
    attn_scale: float | None = None
    attn_scores_multiplier: float | None = None
    sliding_window: int | None = None
    qk_norm: bool = False
    clip_qkv: float | None = None
    norm_dtype: torch.dtype | None = None
    attn_softmax_dtype: torch.dtype | None = None
    attn_scores_dtype: torch.dtype | None = None
    embed_scale: float | None = None
    residual_multiplier: float | None = None
    logits_scaling: float | None = None
    norm_weight_offset: float = 0.0
    norm_weight_before_cast: bool = False
    pre_norms: bool = True
    use_normalization_before_and_after: bool = False
    attn_scores_soft_cap: float | None = None
    output_logits_soft_cap: float | None = None
    padding_idx: int | None = None
    post_embedding_ln: bool = False
    positions_from_mask: bool | None = None

    def __post_init__(self) -> None:
        for names, integer in ((_INT_FIELDS, True), (_REAL_FIELDS, False)):
            for k in names:
                v = getattr(self, k)
                if isinstance(v, (list, tuple)):
                    setattr(self, k, type(v)(_plain_number(x, integer) for x in v))
                else:
                    setattr(self, k, _plain_number(v, integer))
        # switches are True or False (numpy's too): a string such as "false" from a hand-written config would read
        # as true
        for k in _BOOL_FIELDS + ("positional_embedding",):
            v = getattr(self, k)
            if v is None and k == "positional_embedding":
                continue
            if not isinstance(v, bool | np.bool_):
                raise ValueError(f"{k}={v!r} is not valid; give True or False")
            setattr(self, k, bool(v))
        self.dtype = _as_dtype(self.dtype, "dtype")
        if self.dtype is None or not self.dtype.is_floating_point:
            raise ValueError(
                f"dtype={self.dtype} is not valid; give a floating torch.dtype such as torch.float32"
            )
        self.rotary_dtype = _as_dtype(self.rotary_dtype, "rotary_dtype")
        self.rotary_freq_dtype = _as_dtype(self.rotary_freq_dtype, "rotary_freq_dtype")
        self.rotary_input_dtype = _as_dtype(self.rotary_input_dtype, "rotary_input_dtype")
        self.norm_dtype = _as_dtype(self.norm_dtype, "norm_dtype")
        self.attn_softmax_dtype = _as_dtype(self.attn_softmax_dtype, "attn_softmax_dtype")
        self.attn_scores_dtype = _as_dtype(self.attn_scores_dtype, "attn_scores_dtype")
        for k in _DTYPE_FIELDS:  # the dtypes something is computed in: floating ones only
            v = getattr(self, k)
            if k != "dtype" and v is not None and not v.is_floating_point:
                raise ValueError(
                    f"{k}={v} is not valid; give a floating torch.dtype such as torch.float32, or None"
                )
        for k in ("n_layers", "d_model", "n_heads", "d_vocab", "n_ctx"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{k}={v!r} is not valid; give a positive int")
        if self.d_head is None:
            if self.d_model < self.n_heads:
                raise ValueError(
                    f"d_model={self.d_model} over n_heads={self.n_heads} leaves no width per head; give "
                    "d_model >= n_heads, or d_head"
                )
            if self.d_model % self.n_heads:
                raise ValueError(
                    f"d_model={self.d_model} is not a multiple of n_heads={self.n_heads}, so d_head (default "
                    "d_model // n_heads) would drop part of the width; give d_head explicitly, or a d_model that "
                    "n_heads divides"
                )
            self.d_head = self.d_model // self.n_heads
        dm = self.d_mlp
        if dm is not None and (not isinstance(dm, int) or isinstance(dm, bool) or dm < 0):
            raise ValueError(f"d_mlp={dm!r} is not valid; give a positive int, or None (or 0) for no MLP")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(
                f"seed={self.seed!r} is not valid; give an int, or None for torch's global generator"
            )
        eps = self.ln_eps
        if (
            isinstance(eps, bool)
            or not isinstance(eps, (int, float))
            or not (math.isfinite(eps) and eps >= 0)
        ):
            raise ValueError(f"ln_eps={eps!r} is not valid; give a finite number >= 0")
        r = self.init_range
        if r is not None and (
            isinstance(r, bool) or not isinstance(r, (int, float)) or not (math.isfinite(r) and r >= 0)
        ):
            raise ValueError(
                f"init_range={r!r} is not valid; give a finite number >= 0, or None (0.8 / sqrt(d_model))"
            )
        if self.act_fn not in _ACT_FNS:
            raise ValueError(f"act_fn={self.act_fn!r} is not valid; choose one of {_ACT_FNS}")
        if self.normalization_type not in _NORMS:
            raise ValueError(
                f"normalization_type={self.normalization_type!r} is not valid; choose 'LN', 'LNPre', 'RMS', 'RMSPre' or None"
            )
        for k in ("n_layers", "d_model", "n_heads", "d_head", "d_vocab", "n_ctx"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{k}={v!r} is not valid; give a positive int")
        # positions: positional_embedding_type decides; the bool positional_embedding is its older spelling
        pe_type = self.positional_embedding_type
        if pe_type is None:
            pe_type = "none" if self.positional_embedding is False else "standard"
        elif pe_type not in _POS_TYPES:
            raise ValueError(
                f"positional_embedding_type={pe_type!r} is not valid; choose one of {_POS_TYPES}"
            )
        elif pe_type == "standard" and self.positional_embedding is False:
            raise ValueError(
                "positional_embedding=False contradicts positional_embedding_type='standard'; give one of them"
            )
        elif pe_type != "standard" and self.positional_embedding is True:
            raise ValueError(
                f"positional_embedding=True (learned positions) contradicts positional_embedding_type={pe_type!r}; "
                "give one of them"
            )
        self.positional_embedding_type = pe_type
        self.positional_embedding = pe_type == "standard"
        if pe_type == "rotary":
            defaulted = self.rotary_dim is None
            if defaulted:
                self.rotary_dim = self.d_head
            r = self.rotary_dim
            if not isinstance(r, int) or isinstance(r, bool) or r < 2 or r % 2 or r > self.d_head:
                raise ValueError(
                    f"rotary_dim={r!r}{' (its default, d_head)' if defaulted else ''} is not valid; give an even "
                    f"int between 2 and d_head={self.d_head}"
                )
        elif self.rotary_dim is not None:
            raise ValueError(
                f"rotary_dim={self.rotary_dim!r} is given but positional_embedding_type={pe_type!r} has no rotary "
                "positions; give positional_embedding_type='rotary' or leave rotary_dim at None"
            )
        else:
            # rotary options on a model without rotation would be ignored: refused. A model converted without
            # rotation (positional_embedding_type "none" from a rotary_dim of 0) keeps its base and dtypes.
            unused = [("rotary_adjacent_pairs", self.rotary_adjacent_pairs, False)]
            unused.append(("rotary_input_dtype", self.rotary_input_dtype, None))
            if pe_type != "none":
                unused += [
                    ("rotary_base", self.rotary_base, 10000.0),
                    ("rotary_dtype", self.rotary_dtype, None),
                    ("rotary_freq_dtype", self.rotary_freq_dtype, None),
                ]
            for k, v, default in unused:
                if v != default:
                    raise ValueError(
                        f"{k}={v!r} is given but positional_embedding_type={pe_type!r} has no rotary positions, "
                        f"so it would be ignored; give positional_embedding_type='rotary' or leave {k} at "
                        f"{default!r}"
                    )
        if isinstance(self.rotary_base, (list, tuple)):
            self.rotary_base = tuple(self.rotary_base)
            if len(self.rotary_base) != self.n_layers:
                raise ValueError(
                    f"rotary_base={self.rotary_base!r} is not valid; give one number, or one per layer "
                    f"({self.n_layers} layers)"
                )
        for b in self.rotary_base if isinstance(self.rotary_base, tuple) else (self.rotary_base,):
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b < math.inf:
                raise ValueError(
                    f"rotary_base={self.rotary_base!r} is not valid; give a finite positive number (or one per "
                    "layer)"
                )
        if isinstance(self.rotary_scaling, (list, tuple)):
            if len(self.rotary_scaling) != self.n_layers:
                raise ValueError(
                    f"rotary_scaling={self.rotary_scaling!r} is not valid; give one dict or None, or one per layer "
                    f"({self.n_layers} layers)"
                )
            self.rotary_scaling = tuple(
                None if sc is None else _check_rotary_scaling(sc, pe_type) for sc in self.rotary_scaling
            )
        elif self.rotary_scaling is not None:
            self.rotary_scaling = _check_rotary_scaling(self.rotary_scaling, pe_type)
        if self.n_key_value_heads is None:
            self.n_key_value_heads = self.n_heads
        kv = self.n_key_value_heads
        if not isinstance(kv, int) or isinstance(kv, bool) or kv < 1 or self.n_heads % kv:
            raise ValueError(
                f"n_key_value_heads={kv!r} is not valid; give a positive divisor of n_heads={self.n_heads}"
            )
        if self.parallel_shared_norm and (not self.parallel_attn_mlp or self.attn_only):
            raise ValueError("parallel_shared_norm=True needs parallel_attn_mlp=True and an MLP")
        if self.gated_mlp and self.attn_only:
            raise ValueError(f"gated_mlp=True needs an MLP; d_mlp={self.d_mlp!r}")
        if self.n_experts is not None:
            E, k = self.n_experts, self.experts_per_token
            if isinstance(E, bool) or not isinstance(E, int) or E < 1:
                raise ValueError(f"n_experts={E!r} is not valid; give a positive int or None")
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= E:
                raise ValueError(
                    f"experts_per_token={k!r} is not valid; give an int between 1 and n_experts={E}"
                )
            if not self.gated_mlp or self.mlp_bias or self.attn_only:
                raise ValueError(
                    "n_experts needs gated_mlp=True, mlp_bias=False and an MLP (the experts are gated MLPs "
                    f"without biases); got gated_mlp={self.gated_mlp}, mlp_bias={self.mlp_bias}, d_mlp={self.d_mlp}"
                )
        elif self.experts_per_token is not None:
            raise ValueError(f"experts_per_token={self.experts_per_token!r} needs n_experts")
        else:
            for k in ("moe_renormalize", "moe_float32_weights"):
                if getattr(self, k):
                    raise ValueError(
                        f"{k}=True needs a mixture of experts (n_experts); without one it would be ignored"
                    )
        sm = self.moe_shared_d_mlp
        if sm is not None and (
            self.n_experts is None or isinstance(sm, bool) or not isinstance(sm, int) or sm < 1
        ):
            raise ValueError(
                f"moe_shared_d_mlp={sm!r} is not valid; give a positive int with n_experts, or None"
            )

        def bad_window(w) -> bool:
            return w is not None and (not isinstance(w, int) or isinstance(w, bool) or w < 1)

        if isinstance(self.sliding_window, (list, tuple)):
            self.sliding_window = tuple(self.sliding_window)
            if len(self.sliding_window) != self.n_layers or any(map(bad_window, self.sliding_window)):
                raise ValueError(
                    f"sliding_window={self.sliding_window!r} is not valid; give a positive int or None per layer "
                    f"({self.n_layers} layers)"
                )
        elif bad_window(self.sliding_window):
            raise ValueError(
                f"sliding_window={self.sliding_window!r} is not valid; give a positive int or None (or one per layer)"
            )
        rl = self.rotary_layers
        if rl is not None:
            if (
                self.positional_embedding_type != "rotary"
                or not isinstance(rl, (list, tuple))
                or len(rl) != self.n_layers
                or any(not isinstance(v, bool) for v in rl)
            ):
                raise ValueError(
                    f"rotary_layers={rl!r} is not valid; give one bool per layer ({self.n_layers} layers) with "
                    f"positional_embedding_type='rotary' (got {self.positional_embedding_type!r}), or None"
                )
            self.rotary_layers = tuple(rl)
        m = self.attn_scores_multiplier
        if m is not None:
            bad = lambda v: isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf
            if isinstance(m, (list, tuple)):
                if len(m) != self.n_layers or any(bad(v) for v in m):
                    raise ValueError(
                        f"attn_scores_multiplier={m!r} is not valid; give a positive number, None, or one positive "
                        f"number per layer ({self.n_layers} layers)"
                    )
                m = self.attn_scores_multiplier = tuple(float(v) for v in m)
            elif bad(m):
                raise ValueError(
                    f"attn_scores_multiplier={m!r} is not valid; give a finite positive number or None"
                )
            m0 = m[0] if isinstance(m, tuple) else m
            if self.attn_scale is None:
                self.attn_scale = 1.0 / m0
            elif (
                isinstance(self.attn_scale, bool)
                or not isinstance(self.attn_scale, (int, float))
                or not math.isclose(self.attn_scale * m0, 1.0, rel_tol=1e-9)
            ):
                raise ValueError(
                    f"attn_scale={self.attn_scale!r} contradicts attn_scores_multiplier={m!r}: the multiplier "
                    f"replaces the division by attn_scale, which is then 1 / {m0!r}; give one of them"
                )
        if self.attn_scale is None:
            self.attn_scale = math.sqrt(self.d_head)
        elif (
            isinstance(self.attn_scale, bool)
            or not isinstance(self.attn_scale, (int, float))
            or not 0 < self.attn_scale < math.inf
        ):
            raise ValueError(
                f"attn_scale={self.attn_scale!r} is not valid; give a finite positive number or None"
            )
        if self.init_range is None:
            self.init_range = 0.8 / math.sqrt(self.d_model)
        for name in (
            "embed_scale",
            "attn_scores_soft_cap",
            "output_logits_soft_cap",
            "clip_qkv",
            "residual_multiplier",
            "logits_scaling",
        ):
            v = getattr(self, name)
            if v is not None and (
                isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf
            ):
                raise ValueError(f"{name}={v!r} is not valid; give a finite positive number or None")
        if isinstance(self.qk_norm, np.bool_):
            self.qk_norm = bool(self.qk_norm)
        if not (isinstance(self.qk_norm, bool) or self.qk_norm == "all"):
            raise ValueError(f"qk_norm={self.qk_norm!r} is not valid; give False, True (per head) or 'all'")
        if self.use_normalization_before_and_after and self.normalization_type is None:
            raise ValueError(
                "use_normalization_before_and_after=True needs norms; with normalization_type=None the norms "
                "after the attention and the MLP would be the identity. Give a normalization_type, or False"
            )
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise ValueError(
                f"seed={self.seed!r} is not valid; give an int in [-2**63, 2**64) (torch.Generator's seeds), or None"
            )
        if not isinstance(self.extra, dict):
            raise ValueError(f"extra={self.extra!r} is not valid; give a dict (free-form metadata)")
        pm = self.positions_from_mask
        if pm is not None and not isinstance(pm, bool | np.bool_):
            raise ValueError(f"positions_from_mask={pm!r} is not valid; give True, False or None")
        self.positions_from_mask = None if pm is None else bool(pm)
        if not isinstance(self.post_embedding_ln, bool):
            raise ValueError(f"post_embedding_ln={self.post_embedding_ln!r} is not valid; give a bool")
        pi = self.padding_idx
        if pi is not None and (isinstance(pi, bool) or not isinstance(pi, int) or not 0 <= pi < self.d_vocab):
            raise ValueError(
                f"padding_idx={pi!r} is not valid; give a token id in [0, d_vocab={self.d_vocab}) or None"
            )
        off = self.norm_weight_offset
        if isinstance(off, bool) or not isinstance(off, (int, float)) or not math.isfinite(off):
            raise ValueError(f"norm_weight_offset={off!r} is not valid; give a finite number (0 for none)")
        if off != 0 and self.normalization_type not in ("RMS", "LN"):
            raise ValueError(
                f"norm_weight_offset={off!r} applies to norms with a weight (RMSNorm, LayerNorm); "
                f"normalization_type is {self.normalization_type!r}"
            )
        wb = self.norm_weight_before_cast
        if not isinstance(wb, bool) or (wb and self.normalization_type != "RMS"):
            raise ValueError(
                f"norm_weight_before_cast={wb!r} is not valid; give a bool (True applies to RMSNorm only; "
                f"normalization_type is {self.normalization_type!r})"
            )

    @property
    def attn_only(self) -> bool:
        return not self.d_mlp

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the model reads: ``n_ctx`` with learned positions (``W_pos`` has ``n_ctx`` rows);
        None (no limit) with rotary or no positional embeddings, which compute every position (as Hugging Face's
        rotary models do past ``max_position_embeddings``)."""
        return self.n_ctx if self.positional_embedding_type == "standard" else None

    @property
    def mask_positions(self) -> bool:
        """Whether positions default to ``(attention_mask.cumsum(-1) - 1).clamp(min=0)`` when the forward is given an
        ``attention_mask`` and no ``position_ids`` (``positions_from_mask``, its None resolved: ALiBi models and
        models converted from OPT or a HookedTransformer), rather than to the columns ``0 .. pos - 1``."""
        if self.positions_from_mask is not None:
            return self.positions_from_mask
        if self.positional_embedding_type == "alibi":
            return True
        src = self.extra.get("converted_from") if isinstance(self.extra, dict) else None
        if isinstance(src, dict):
            return src.get("model_type") == "opt" or src.get("class") in (
                "OPTForCausalLM",
                "HookedTransformer",
            )
        return False

    @property
    def rotary(self) -> bool:
        """True when queries and keys are rotated (``positional_embedding_type == "rotary"``)."""
        return self.positional_embedding_type == "rotary"

    @property
    def n_groups(self) -> int:
        """Query heads per key/value head: ``n_heads // n_key_value_heads``."""
        return self.n_heads // self.n_key_value_heads

    def window(self, layer: int) -> int | None:
        """Layer ``layer``'s sliding window (None: every earlier key)."""
        w = self.sliding_window
        return w[layer] if isinstance(w, tuple) else w

    def rotates(self, layer: int) -> bool:
        """Whether layer ``layer`` rotates its queries and keys (rotary positions, and ``rotary_layers`` says so)."""
        return self.rotary and (self.rotary_layers is None or self.rotary_layers[layer])

    def scores_multiplier(self, layer: int) -> float | None:
        """Layer ``layer``'s ``attn_scores_multiplier`` (None: scores divided by ``attn_scale``)."""
        m = self.attn_scores_multiplier
        return m[layer] if isinstance(m, tuple) else m

    def rope_base(self, layer: int) -> float:
        """Layer ``layer``'s rotary base."""
        b = self.rotary_base
        return b[layer] if isinstance(b, tuple) else b

    def rope_scaling(self, layer: int) -> dict | None:
        """Layer ``layer``'s rotary scaling (None: unscaled)."""
        sc = self.rotary_scaling
        return sc[layer] if isinstance(sc, tuple) else sc

    @property
    def rotary_position_limit(self) -> int | None:
        """The longest sequence the rotary scaling reads: LongRoPE's short factors and dynamic NTK scaling's unscaled
        frequencies hold for ``original_max_position_embeddings`` positions, and the forward raises ``ValueError``
        for a position past them (the smallest over the rotating layers); None for other scalings and models."""
        limits = [
            int(sc["original_max_position_embeddings"])
            for layer in range(self.n_layers)
            if self.rotates(layer)
            and (sc := self.rope_scaling(layer)) is not None
            and sc["rope_type"] in ("longrope", "dynamic")
        ]
        return min(limits) if limits else None

    def to_dict(self) -> dict:
        """The fields as plain Python values (dtypes as names); ``TransformerConfig(**d)`` rebuilds it."""
        d = asdict(self)
        for k in _DTYPE_FIELDS:
            if d[k] is not None:
                d[k] = str(d[k]).replace("torch.", "")
        return d


_ROTARY_SCALING_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor"),
    "longrope": ("original_max_position_embeddings", "attention_factor"),
    "dynamic": ("factor", "original_max_position_embeddings"),
}


def _check_rotary_scaling(scaling, pe_type: str) -> dict:
    """``TransformerConfig.rotary_scaling`` checked: the keys its ``rope_type`` reads, as numbers."""
    if pe_type != "rotary":
        raise ValueError(
            f"rotary_scaling={scaling!r} needs positional_embedding_type='rotary' (got {pe_type!r})"
        )
    if not isinstance(scaling, dict) or scaling.get("rope_type") not in _ROTARY_SCALING_KEYS:
        raise ValueError(
            f"rotary_scaling={scaling!r} is not valid; give a dict with rope_type one of "
            f"{tuple(_ROTARY_SCALING_KEYS)} (or None)"
        )
    kind = scaling["rope_type"]
    out = {"rope_type": kind}
    for k in _ROTARY_SCALING_KEYS[kind]:
        v = scaling.get(k)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
            raise ValueError(
                f"rotary_scaling[{k!r}]={v!r} is not valid for rope_type {kind!r}; give a finite positive number"
            )
        out[k] = v
    if kind == "longrope":
        f = scaling.get("short_factor")
        if (
            not isinstance(f, (list, tuple))
            or not f
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf for v in f)
        ):
            raise ValueError(
                f"rotary_scaling['short_factor']={f!r} is not valid for rope_type 'longrope'; give a list of "
                "positive numbers, one per rotary frequency"
            )
        out["short_factor"] = [float(v) for v in f]
    if kind == "yarn":
        t = scaling.get("truncate", True)
        if not isinstance(t, bool):
            raise ValueError(
                f"rotary_scaling['truncate']={t!r} is not valid for rope_type 'yarn'; give a bool"
            )
        out["truncate"] = t
    if kind == "llama3" and not out["high_freq_factor"] > out["low_freq_factor"]:
        raise ValueError(
            f"rotary_scaling: high_freq_factor={out['high_freq_factor']!r} must exceed "
            f"low_freq_factor={out['low_freq_factor']!r}"
        )
    return out


def rotary_inv_freq(
    base: float, dim: int, scaling: dict | None, dtype: torch.dtype, device: torch.device | None = None
) -> torch.Tensor:
    """The ``dim / 2`` rotary frequencies ``1 / base ** (2 i / dim)``, scaled per ``scaling`` (see
    :class:`TransformerConfig`), computed in ``dtype`` in Hugging Face's order of operations."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=dtype, device=device) / dim))
    if scaling is None or scaling["rope_type"] == "dynamic":  # dynamic NTK: unscaled up to its length
        return inv_freq
    if scaling["rope_type"] == "longrope":
        short = torch.tensor(scaling["short_factor"], dtype=dtype, device=device)
        if short.numel() != dim // 2:
            raise ValueError(
                f"rotary_scaling['short_factor'] has {short.numel()} entries; the rotary embedding has {dim // 2} "
                f"frequencies (rotary_dim {dim})"
            )
        shape = torch.arange(0, dim, 2, dtype=torch.int64, device=device).to(dtype) / dim
        return 1.0 / (short * base**shape)
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    if scaling["rope_type"] == "yarn":
        return _yarn_inv_freq(base, dim, scaling, dtype, device)
    lo, hi = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / lo, old / hi
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn_inv_freq(base: float, dim: int, scaling: dict, dtype: torch.dtype, device) -> torch.Tensor:
    """YaRN's frequencies (Peng et al. 2023), in Hugging Face's order of operations."""
    factor, n = scaling["factor"], scaling["original_max_position_embeddings"]

    def turns_dim(
        turns: float,
    ) -> float:  # the dimension whose frequency makes ``turns`` turns in n positions
        return (dim * math.log(n / (turns * 2 * math.pi))) / (2 * math.log(base))

    low, high = turns_dim(scaling["beta_fast"]), turns_dim(scaling["beta_slow"])
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    pos_freqs = base ** (torch.arange(0, dim, 2, device=device).to(dtype) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=dtype, device=device) - low) / (high - low), 0, 1)
    keep = 1 - ramp
    return interpolation * (1 - keep) + extrapolation * keep


def rotary_attention_factor(scaling: dict | None) -> float:
    """The factor the cosines and sines of a rotary embedding scaled per ``scaling`` are multiplied by (YaRN's
    ``attention_factor``; 1 otherwise)."""
    return 1.0 if scaling is None else float(scaling.get("attention_factor", 1.0))


class LayerNorm(nn.Module):
    """LayerNorm with TransformerLens' names (``w``, ``b``, ``hook_scale``, ``hook_normalized``).

    Input and output ``(..., d)``; ``hook_scale (..., 1)`` is ``sqrt(var + eps)``; ``hook_normalized`` is the
    output (after ``w`` and ``b``). It runs torch's fused ``layer_norm`` (about 25% faster fwd+bwd of the whole model
    under ``vmap``; with ``w`` and ``b`` in the same pass unless ``compute_dtype`` differs from the input's); a hook
    on ``hook_scale`` sees the scale computed explicitly, and only a hook that replaces it or edits it in place (or a
    backward hook on it, whose gradient needs it) switches the output to the explicit form ``(x - mean) / scale`` (to
    float rounding the same): a hook that only reads it leaves the output bit-identical. With ``compute_dtype`` the
    statistics and the normalisation run in that dtype and the result is cast back to the input's dtype before
    ``w`` and ``b``. With a non-zero ``offset`` the normalised input is multiplied by ``offset + w`` (Nemotron's
    ``LayerNorm1P``: the fused kernel given ``w + 1``)."""

    def __init__(
        self,
        d: int,
        eps: float,
        dtype: torch.dtype,
        compute_dtype: torch.dtype | None = None,
        offset: float = 0.0,
    ) -> None:
        super().__init__()
        self.eps = eps
        self.compute_dtype = compute_dtype
        self.offset = offset
        self.w = nn.Parameter(torch.full((d,), 1.0 - offset, dtype=dtype))
        self.b = nn.Parameter(torch.zeros(d, dtype=dtype))
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    @property
    def gain(self) -> torch.Tensor:
        """The factor the normalised input is multiplied by: ``offset + w`` (``w`` itself without an offset)."""
        return self.w + self.offset if self.offset else self.w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gain = self.gain
        edited = _edited_layer_normalize(self, x)
        if edited is not None:  # a hook replaced the scale or edited it in place
            return self.hook_normalized(torch.addcmul(self.b, edited, gain))
        # one fused pass with w and b, also when a hook only read the scale (a cached run is bit-identical)
        if self.compute_dtype in (None, x.dtype):
            return self.hook_normalized(F.layer_norm(x, x.shape[-1:], gain, self.b, self.eps))
        h = F.layer_norm(x.to(self.compute_dtype), x.shape[-1:], eps=self.eps).to(x.dtype)
        return self.hook_normalized(torch.addcmul(self.b, h, gain))


def _edited_layer_normalize(norm: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``(x - mean) / scale`` of a :class:`LayerNorm` / :class:`LayerNormPre` ``norm`` (in its ``compute_dtype``,
    cast back to ``x``'s) when a function on its ``hook_scale`` replaced the scale or edited it in place; None when
    ``hook_scale`` has no function or its functions only read the scale (the norm then keeps its fused form, so a
    cached run is bit-identical to a plain one)."""
    if not norm.hook_scale._fns:
        return None
    h = x if norm.compute_dtype is None else x.to(norm.compute_dtype)
    c = h - h.mean(-1, keepdim=True)
    scale = (c.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()
    seen = _hooked_scale(norm.hook_scale, scale)
    return None if seen is None else (c / seen).to(x.dtype)


def _layer_normalize(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` of a :class:`LayerNorm` / :class:`LayerNormPre` ``norm`` (in its
    ``compute_dtype``, cast back to ``x``'s), through its ``hook_scale``: torch's fused kernel, also when a hook only
    reads the scale (a cached run is bit-identical to a plain one); the explicit ``(x - mean) / scale`` when a hook
    replaces it."""
    edited = _edited_layer_normalize(norm, x)
    if edited is not None:
        return edited
    h = x if norm.compute_dtype is None else x.to(norm.compute_dtype)
    return F.layer_norm(h, h.shape[-1:], eps=norm.eps).to(x.dtype)


def _version(t: torch.Tensor) -> int | None:
    """``t``'s version counter (bumped by every in-place operation), None where a transform hides it."""
    try:
        return t._version
    except (RuntimeError, AttributeError):
        return None


def _hooked_scale(hook, scale: torch.Tensor) -> torch.Tensor | None:
    """``scale`` through the norm's ``hook_scale``: None when the hooks only read it (the same tensor back,
    unchanged: the norm keeps its fused or ``rsqrt`` form, so a cached run is bit-identical to a plain one), else
    the scale to divide by (a tensor a hook returned, or ``scale`` edited in place, TransformerLens' usual style;
    also when a backward function is attached, whose gradient needs the output to be computed from the scale)."""
    before = _version(scale)
    seen = hook(scale)
    if any(getattr(f, "_pp_dir", "fwd") == "bwd" for f in hook._fns):
        return seen  # a backward function: the output must depend on the scale for its gradient to reach it
    if seen is scale and before is not None and _version(scale) == before:
        return None
    return seen


class LayerNormPre(nn.Module):
    """LayerNorm without weight or bias (TransformerLens' ``LNPre``; OLMo's norms): ``(x - mean) / sqrt(var +
    eps)``, in ``compute_dtype`` when set and cast back. ``hook_scale (..., 1)`` is ``sqrt(var + eps)``,
    ``hook_normalized`` the output."""

    def __init__(
        self, d: int, eps: float, dtype: torch.dtype, compute_dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.eps = eps
        self.compute_dtype = compute_dtype
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hook_normalized(_layer_normalize(self, x))


class RMSNorm(nn.Module):
    """RMSNorm ``w * x / sqrt(mean(x^2) + eps)`` with TransformerLens' names (``w``, ``hook_scale``,
    ``hook_normalized``).

    Input and output ``(..., d)``; ``hook_scale (..., 1)`` is ``sqrt(mean(x^2) + eps)``; ``hook_normalized`` is the
    output (after ``w``; TransformerLens places it before ``w``). Without a hook on ``hook_scale`` it computes as
    Hugging Face's Llama-family RMSNorm does (``x * rsqrt(mean(x^2) + eps)`` in ``compute_dtype``, cast back,
    times ``w``); a hook that replaces the scale (or edits it in place) makes it ``x / scale``. With a non-zero ``offset`` (or
    ``weight_before_cast``, Helium's order) it computes as Gemma's: ``x_hat * (offset + w)`` in ``compute_dtype``,
    then cast back."""

    def __init__(
        self,
        d: int,
        eps: float,
        dtype: torch.dtype,
        compute_dtype: torch.dtype | None = None,
        offset: float = 0.0,
        weight_before_cast: bool = False,
    ) -> None:
        super().__init__()
        self.eps = eps
        self.compute_dtype = compute_dtype
        self.offset = offset
        self.weight_before_cast = weight_before_cast
        self.w = nn.Parameter(torch.full((d,), 1.0 - offset, dtype=dtype))
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    @property
    def gain(self) -> torch.Tensor:
        """The factor the normalised input is multiplied by: ``offset + w`` (``w`` itself without an offset)."""
        return self.offset + self.w if self.offset else self.w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.compute_dtype is None else x.to(self.compute_dtype)
        ms = h.pow(2).mean(-1, keepdim=True) + self.eps
        if not self.hook_scale._fns:
            h = h * torch.rsqrt(ms)
        else:
            seen = _hooked_scale(self.hook_scale, ms.sqrt())
            # a hook that only reads: the rsqrt form, so a cached run is bit-identical
            h = h * torch.rsqrt(ms) if seen is None else h / seen
        if self.offset or self.weight_before_cast:  # Gemma's order: (x_hat * (offset + w)), then the cast
            return self.hook_normalized((h * (self.offset + self.w.to(h.dtype))).to(x.dtype))
        return self.hook_normalized(self.w * h.to(x.dtype))


class RMSNormPre(LayerNormPre):
    """RMSNorm without weight (TransformerLens' ``RMSPre``): ``x / sqrt(mean(x^2) + eps)``, in ``compute_dtype``
    when set and cast back. ``hook_scale (..., 1)`` is ``sqrt(mean(x^2) + eps)``, ``hook_normalized`` the
    output (:class:`LayerNormPre`'s attributes, without the centring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.compute_dtype is None else x.to(self.compute_dtype)
        scale = self.hook_scale((h.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        return self.hook_normalized((h / scale).to(x.dtype))


def rms_compute_dtype(norm_dtype: torch.dtype | None, dtype: torch.dtype) -> torch.dtype | None:
    """The dtype an RMS norm of weights in ``dtype`` computes in: ``norm_dtype`` when set, else float32 for 16-bit
    weights (``x^2`` overflows float16 from ``|x| = 256``; Hugging Face's and TransformerLens' RMS norms upcast
    too), else the input's own (None)."""
    if norm_dtype is not None:
        return norm_dtype
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else None


def _make_norm(cfg: TransformerConfig) -> nn.Module:
    if cfg.normalization_type == "LN":
        return LayerNorm(cfg.d_model, cfg.ln_eps, cfg.dtype, cfg.norm_dtype, cfg.norm_weight_offset)
    if cfg.normalization_type == "RMS":
        return RMSNorm(
            cfg.d_model,
            cfg.ln_eps,
            cfg.dtype,
            rms_compute_dtype(cfg.norm_dtype, cfg.dtype),
            cfg.norm_weight_offset,
            cfg.norm_weight_before_cast,
        )
    if cfg.normalization_type == "LNPre":
        return LayerNormPre(cfg.d_model, cfg.ln_eps, cfg.dtype, cfg.norm_dtype)
    if cfg.normalization_type == "RMSPre":
        return RMSNormPre(cfg.d_model, cfg.ln_eps, cfg.dtype, rms_compute_dtype(cfg.norm_dtype, cfg.dtype))
    return nn.Identity()


def check_token_ids(tokens: torch.Tensor, d_vocab: int) -> None:
    """Refuse token ids outside ``[0, d_vocab)``, naming the id and the range, and ``tokens`` of a dtype other than
    int64 or int32: the lookup ``W_E[tokens]`` would read a negative id from the end of the vocabulary (silently),
    fail on a large one with a bare ``IndexError`` and read uint8 or bool ids as a mask.

    CPU ids are checked on the host (one ``aminmax`` over the ids, under ``torch.func`` transforms over the
    unwrapped ids). CUDA ids are checked without a host-device synchronisation: ``torch._assert_async`` stops the
    program with a device-side assertion when an id is out of range. Ids elsewhere (meta tensors) and ids traced by
    ``torch.compile`` are not checked."""
    if tokens.dtype not in (torch.int64, torch.int32):  # uint8 and bool would index as a mask
        raise TypeError(
            f"tokens has dtype {tokens.dtype}; give token ids in [0, d_vocab={d_vocab}) as torch.int64 (or int32)"
        )
    if not tokens.numel() or torch.compiler.is_compiling():
        return
    while torch._C._functorch.is_functorch_wrapped_tensor(tokens):  # vmap / grad: check the ids themselves
        tokens = torch._C._functorch.get_unwrapped(tokens)
    if tokens.device.type == "cpu":
        lo, hi = torch.aminmax(tokens)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= d_vocab:
            raise ValueError(
                f"tokens contains token id {lo if lo < 0 else hi}; valid ids are 0 .. {d_vocab - 1} (the model's "
                f"vocabulary has {d_vocab} tokens)"
            )
    elif tokens.is_cuda:
        lo, hi = torch.aminmax(tokens)
        torch._assert_async((lo >= 0) & (hi < d_vocab), f"tokens contains ids outside 0 .. {d_vocab - 1}")


class Embed(nn.Module):
    """``tokens -> W_E[tokens]`` (times ``cfg.embed_scale`` in the weights' dtype, when set; no gradient into the
    ``cfg.padding_idx`` row from the lookup; then through the LayerNorm ``ln`` with ``cfg.post_embedding_ln``)."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model, dtype=cfg.dtype))
        self.scale = cfg.embed_scale
        self.padding_idx = cfg.padding_idx
        if cfg.post_embedding_ln:
            self.ln = LayerNorm(cfg.d_model, cfg.ln_eps, cfg.dtype, cfg.norm_dtype, cfg.norm_weight_offset)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        check_token_ids(tokens, self.W_E.shape[0])
        if self.padding_idx is None:
            x = self.W_E[tokens]
        else:  # the padding row gets no gradient from the lookup (torch.nn.Embedding's padding_idx)
            x = F.embedding(tokens, self.W_E, padding_idx=self.padding_idx)
        if self.scale is not None:
            x = x * torch.tensor(self.scale, dtype=x.dtype, device=x.device)
        return self.ln(x) if hasattr(self, "ln") else x


class PosEmbed(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.W_pos = nn.Parameter(torch.empty(cfg.n_ctx, cfg.d_model, dtype=cfg.dtype))

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``(batch, pos, d_model)``: rows ``0 .. pos - 1`` of ``W_pos`` for every sequence (a view, expanded over the
        batch), or with ``position_ids (batch, pos)`` row ``position_ids[b, t]`` at ``[b, t]`` (a gather)."""
        if position_ids is not None:
            return self.W_pos[position_ids]
        return self.W_pos[: tokens.shape[-1]].unsqueeze(0).expand(tokens.shape[0], -1, -1)


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi's head slopes (float32, ``(n_heads,)``): ``2 ** (-8 i / n)`` for the ``n`` = largest power of two
    <= ``n_heads`` (``i = 1 .. n``), then the odd powers of the ``2 n`` sequence for the remaining heads (Press et
    al.'s rule; BLOOM's float32 arithmetic)."""
    n = 2 ** math.floor(math.log2(n_heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(n) - 3))), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + n, dtype=torch.int32))
    if n != n_heads:
        extra = torch.tensor(2 ** (-(2 ** -(math.log2(2 * n) - 3))), dtype=torch.float32)
        rest = min(n, n_heads - n)
        slopes = torch.cat([slopes, torch.pow(extra, torch.arange(1, 1 + 2 * rest, 2, dtype=torch.int32))])
    return slopes


#: the packed weights of the innermost :meth:`Transformer.fixed_weights` block, or None outside one
#: (per thread: a block in one thread does not reach products computed in another)
_PACKS_LOCAL = threading.local()
_LAYOUTS_LOCK = threading.Lock()  # the attention layouts' count of open blocks (Transformer.fixed_weights)


def _active_packs() -> PackedWeights | None:
    return getattr(_PACKS_LOCAL, "packs", None)


def affine(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``x (..., n) @ W (n, m) (+ b (m,))``: with a bias, the product over the rows of ``x`` and the bias added in
    place (one ``mm`` and one pass over its output; ``addmm`` with a vector bias first writes the bias into a
    fresh output, and on CPU its large outputs were measured to fault their pages in anew on every call); under a
    ``torch.func`` transform, ``addmm``. Inside :meth:`Transformer.fixed_weights`, float32 CPU products go through
    oneDNN's matmul (the weight packed once when it is used for many rows) where that was measured faster
    (:mod:`pypattern.models.packed`)."""
    packs = _active_packs()
    if packs is not None and packs.applies(x, W, b):
        out = packs.affine(x, W, b)
        if out is not None:
            return out
    if b is None:
        return x @ W
    if x.dim() < 2 or b.dim() != 1 or W.dim() != 2:
        return x @ W + b
    x2 = x.reshape(-1, x.shape[-1])
    if functorch_wrapped(x2, W, b):  # an in-place add on a vmapped product may be refused
        out = torch.addmm(b, x2, W)
    else:
        out = torch.mm(x2, W).add_(b)
    return out.view(*x.shape[:-1], W.shape[-1])


def soft_cap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``cap * tanh(x / cap)`` (Gemma 2's soft-capping, in its order of operations); ``x`` itself when ``cap`` is
    None."""
    if cap is None:
        return x
    return torch.tanh(x / cap) * cap


class _Unembedding(nn.Module):
    """What both unembeddings share: the bias ``b_U`` (``cfg.unembed_bias``, else None), the division by
    ``logits_scaling`` and the final soft cap."""

    def _add_bias_and_cap(self, cfg: TransformerConfig) -> None:
        if cfg.unembed_bias:
            self.b_U = nn.Parameter(torch.zeros(cfg.d_vocab, dtype=cfg.dtype))
        else:
            self.b_U = None
        self.logit_cap = cfg.output_logits_soft_cap
        self.logits_scaling = cfg.logits_scaling

    def cap(self, logits: torch.Tensor) -> torch.Tensor:
        """The last steps on ``x @ W_U + b_U``: the division by ``logits_scaling`` and the soft cap
        ``output_logits_soft_cap`` (identity without either)."""
        if self.logits_scaling is not None:
            logits = logits / self.logits_scaling
        return soft_cap(logits, self.logit_cap)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x @ self.W_U
        return self.cap(out if self.b_U is None else out + self.b_U)


class Unembed(_Unembedding):
    """``x (..., d_model) -> logits (..., d_vocab)``: ``x @ W_U (+ b_U)`` (soft-capped per
    ``cfg.output_logits_soft_cap``: :meth:`cap`)."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.W_U = nn.Parameter(torch.empty(cfg.d_model, cfg.d_vocab, dtype=cfg.dtype))
        self._add_bias_and_cap(cfg)


class TiedUnembed(_Unembedding):
    """Unembedding tied to the token embedding: ``x @ embed.W_E.T (+ b_U)``, no weight of its own.

    The embedding module is held outside the module tree, so ``named_parameters`` lists the weight once (as
    ``embed.W_E``) and ``torch.func.functional_call`` with a replacement for ``embed.W_E`` changes both uses.
    ``W_U`` is the transposed view ``(d_model, d_vocab)``."""

    def __init__(self, cfg: TransformerConfig, embed: Embed) -> None:
        super().__init__()
        object.__setattr__(self, "_embed", embed)  # not a submodule: the parameter stays listed once
        self._add_bias_and_cap(cfg)

    @property
    def W_U(self) -> torch.Tensor:
        return self._embed.W_E.T


def _maybe_bias(cond: bool, *shape: int, dtype: torch.dtype) -> nn.Parameter | None:
    return nn.Parameter(torch.zeros(*shape, dtype=dtype)) if cond else None


class Attention(nn.Module):
    """Causal multi-head attention (grouped-query when ``n_key_value_heads < n_heads``), optional rotary positions.

    Shapes: queries ``(batch, pos, n_heads, d_head)``, keys and values ``(batch, pos, n_key_value_heads, d_head)``,
    scores and pattern ``(batch, n_heads, query_pos, key_pos)``, ``z (batch, pos, n_heads, d_head)``, output
    ``(batch, pos, d_model)``. Missing biases (``attn_bias``/``attn_out_bias`` False) are None attributes.
    """

    def __init__(self, cfg: TransformerConfig, layer: int = 0) -> None:
        super().__init__()
        H, Hkv, d, dh, dt = cfg.n_heads, cfg.n_key_value_heads, cfg.d_model, cfg.d_head, cfg.dtype
        self.cfg = cfg
        self.layer = layer
        self.W_Q = nn.Parameter(torch.empty(H, d, dh, dtype=dt))
        self.W_K = nn.Parameter(torch.empty(Hkv, d, dh, dtype=dt))
        self.W_V = nn.Parameter(torch.empty(Hkv, d, dh, dtype=dt))
        self.W_O = nn.Parameter(torch.empty(H, dh, d, dtype=dt))
        self.b_Q = _maybe_bias(cfg.attn_bias, H, dh, dtype=dt)
        self.b_K = _maybe_bias(cfg.attn_bias, Hkv, dh, dtype=dt)
        self.b_V = _maybe_bias(cfg.attn_bias, Hkv, dh, dtype=dt)
        self.b_O = _maybe_bias(cfg.attn_out_bias, d, dtype=dt)
        if cfg.qk_norm:
            wide = cfg.qk_norm == "all"  # one norm over every head's projection (OLMo 2)
            self.q_norm = RMSNorm(
                H * dh if wide else dh,
                cfg.ln_eps,
                dt,
                rms_compute_dtype(cfg.norm_dtype, dt),
                cfg.norm_weight_offset,
                cfg.norm_weight_before_cast,
            )
            self.k_norm = RMSNorm(
                Hkv * dh if wide else dh,
                cfg.ln_eps,
                dt,
                rms_compute_dtype(cfg.norm_dtype, dt),
                cfg.norm_weight_offset,
                cfg.norm_weight_before_cast,
            )
        self.hook_q = HookPoint()
        self.hook_k = HookPoint()
        self.hook_v = HookPoint()
        if cfg.rotary:
            self.hook_rot_q = HookPoint()
            self.hook_rot_k = HookPoint()
        self.hook_attn_scores = HookPoint()
        self.hook_pattern = HookPoint()
        self.hook_z = HookPoint()

    # ----- pieces -----------------------------------------------------------------------------------------
    # the (d_model, heads * d_head) layouts of W_Q / W_K / W_V while the model's weights are held fixed
    # (Transformer.fixed_weights), each as (weight, its version, address and dtype when laid out, layout, the
    # weight's storage); None otherwise
    _layouts: dict[str, tuple] | None = None

    def __getstate__(self) -> dict:
        """The module's state without the layouts of a :meth:`Transformer.fixed_weights` block: a copy (or a
        pickle) made inside the block is a model outside any block."""
        state = dict(self.__dict__)
        state.pop("_layouts", None)
        state.pop("_layout_blocks", None)
        return state

    def proj(self, x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """``x (..., d_model)``, ``W (heads, d_model, d_head)``, ``b (heads, d_head)`` or None ->
        ``(..., heads, d_head)`` with one matmul over the weight laid out as ``(d_model, heads * d_head)`` (a copy
        of the weight, made on every call; inside :meth:`Transformer.fixed_weights` once per weight, for this
        module's own ``W_Q``/``W_K``/``W_V`` when no gradient flows into them)."""
        H, d, dh = W.shape
        flat = None
        if (
            self._layouts is not None
            and not (W.requires_grad and torch.is_grad_enabled())
            and not functorch_wrapped(W)  # a transform's weight (vmapped): no storage, laid out per call
        ):
            name = "Q" if W is self.W_Q else "K" if W is self.W_K else "V" if W is self.W_V else None
            if name is not None:
                # a layout serves the weight it was made from, at the version, storage and dtype it was made
                # at: a weight replaced, changed in place inside the block (an optimiser's step) or given new
                # data by ``.to(dtype)`` / ``.half()`` (which keep the parameter and its version) is laid out anew
                # (the entry holds the weight's storage, so that no other storage takes its address meanwhile)
                version = (None if W.is_inference() else W._version, W.data_ptr(), W.dtype, W.device)
                made = self._layouts.get(name)
                if made is not None and made[0] is W and made[1] == version:
                    flat = made[2]
                else:
                    flat = W.detach().permute(1, 0, 2).reshape(d, H * dh)
                    self._layouts[name] = (W, version, flat, W.untyped_storage())
                    packs = _active_packs()
                    if made is not None and packs is not None:  # the stale layout's packed copy goes with it
                        packs.forget([made[2]])
        if flat is None:
            flat = W.permute(1, 0, 2).reshape(d, H * dh)
        out = affine(x, flat, None if b is None else b.reshape(H * dh))
        return out.view(*x.shape[:-1], H, dh)

    def compute_q(self, x: torch.Tensor) -> torch.Tensor:
        """Queries before rotation: ``x (..., d_model) -> (..., n_heads, d_head)`` (normalised per head with
        ``qk_norm``)."""
        return self.qk_normed("q", self.clip(self.proj(x, self.W_Q, self.b_Q)))

    def compute_k(self, x: torch.Tensor) -> torch.Tensor:
        """Keys before rotation: ``x (..., d_model) -> (..., n_key_value_heads, d_head)`` (normalised per head
        with ``qk_norm``)."""
        return self.qk_normed("k", self.clip(self.proj(x, self.W_K, self.b_K)))

    def qk_normed(self, which: str, x: torch.Tensor) -> torch.Tensor:
        """``x (..., heads, d_head)``, projected queries (``which="q"``) or keys (``"k"``), through their norm when
        the model has ``qk_norm`` (else ``x`` itself): per head, or with ``qk_norm="all"`` over every head's
        projection at once (``x`` then holds all the heads on its second-to-last axis)."""
        if not self.cfg.qk_norm:
            return x
        norm = self.q_norm if which == "q" else self.k_norm
        if self.cfg.qk_norm == "all":
            return norm(x.flatten(-2)).view(x.shape)
        return norm(x)

    def compute_v(self, x: torch.Tensor) -> torch.Tensor:
        """Values: ``x (..., d_model) -> (..., n_key_value_heads, d_head)``."""
        return self.clip(self.proj(x, self.W_V, self.b_V))

    def clip(self, x: torch.Tensor) -> torch.Tensor:
        """A projection clamped to ``[-clip_qkv, clip_qkv]`` (``x`` itself without ``clip_qkv``)."""
        c = self.cfg.clip_qkv
        return x if c is None else x.clamp(-c, c)

    @staticmethod
    def positions(n: int, device: torch.device | None = None) -> torch.Tensor:
        """``arange(n)``: the positions of a sequence of ``n`` tokens."""
        return torch.arange(n, device=device)

    def rotary_cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype, largest: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cosines and sines of the rotation angles at ``positions (pos,)`` (or ``(batch, pos)``, one row of positions
        per sequence): two ``(*positions.shape, rotary_dim)`` tensors of ``dtype`` (computed in
        ``cfg.rotary_dtype`` when set, else in ``dtype`` but at least float32, in Hugging
        Face's order of operations). ``largest``: the largest of ``positions`` when the caller knows it (``arange``),
        so that the range check of LongRoPE and dynamic NTK scaling reads no device value."""
        cfg = self.cfg
        cd = cfg.rotary_dtype or (dtype if dtype in (torch.float32, torch.float64) else torch.float32)
        r = cfg.rotary_dim
        scaling = cfg.rope_scaling(self.layer)
        if scaling is not None and scaling["rope_type"] in ("longrope", "dynamic") and positions.numel():
            n = scaling["original_max_position_embeddings"]
            top = int(positions.max()) if largest is None else int(largest)
            if top >= n:
                what, there = (
                    ("LongRoPE short factors", "switches to its long factors")
                    if scaling["rope_type"] == "longrope"
                    else (
                        "dynamic NTK scaling's unscaled frequencies",
                        "recomputes them from the sequence length",
                    )
                )
                raise ValueError(
                    f"position {top} is past the {n} positions of this model's {what} "
                    f"(rotary_scaling original_max_position_embeddings={n}); longer sequences, where the "
                    f"Hugging Face model {there}, are not supported"
                )
        inv_freq = rotary_inv_freq(cfg.rope_base(self.layer), r, scaling, cd, positions.device)
        if cfg.rotary_freq_dtype is not None:
            inv_freq = inv_freq.to(cfg.rotary_freq_dtype).to(cd)
        freqs = positions[..., None].to(cd) * inv_freq
        if cfg.rotary_adjacent_pairs:
            emb = freqs.repeat_interleave(2, dim=-1)
        else:
            emb = torch.cat((freqs, freqs), dim=-1)
        att = rotary_attention_factor(cfg.rope_scaling(self.layer))
        if att != 1.0:
            return (emb.cos() * att).to(dtype), (emb.sin() * att).to(dtype)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Rotary position embedding of queries or keys ``x (batch, pos, heads, d_head)`` at ``positions (pos,)``
        (default ``arange(pos)``), or ``(batch, pos)`` (each sequence at its own positions); identity unless
        ``positional_embedding_type == "rotary"`` (and, with
        ``rotary_layers``, the layer rotates). Only the first
        ``rotary_dim`` dimensions of each head turn."""
        if not self.cfg.rotates(self.layer):
            return x
        largest = None
        if positions is None:  # arange: its largest known without reading the device
            positions, largest = self.positions(x.shape[-3], x.device), x.shape[-3] - 1
        rd = self.cfg.rotary_input_dtype
        cos, sin = self.rotary_cos_sin(positions, x.dtype if rd is None else rd, largest)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # over the heads
        r = self.cfg.rotary_dim
        x_rot = x[..., :r]
        if rd is not None:  # turned in rd (the cosines and sines too), cast back below
            x_rot = x_rot.to(rd)
        if self.cfg.rotary_adjacent_pairs:
            x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
            turned = torch.stack((-x2, x1), dim=-1).flatten(-2)
        else:
            x1, x2 = x_rot[..., : r // 2], x_rot[..., r // 2 :]
            turned = torch.cat((-x2, x1), dim=-1)
        out = ((x_rot * cos) + (turned * sin)).to(x.dtype)
        if r == x.shape[-1]:
            return out
        return torch.cat((out, x[..., r:]), dim=-1)

    def attn_mask(self, q_positions: torch.Tensor, k_positions: torch.Tensor) -> torch.Tensor:
        """Boolean ``(query_pos, key_pos)``, True where a query may NOT attend: later keys, and keys at least
        ``sliding_window`` positions back."""
        later = k_positions[None, :] > q_positions[:, None]
        window = self.cfg.window(self.layer)
        if window is None:
            return later
        return later | (q_positions[:, None] - k_positions[None, :] >= window)

    def qk_cast(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys in the dtype their product is taken in (``cfg.attn_scores_dtype``; unchanged when
        None)."""
        dt = self.cfg.attn_scores_dtype
        return (q, k) if dt is None else (q.to(dt), k.to(dt))

    def expand_kv(self, t: torch.Tensor) -> torch.Tensor:
        """Key/value heads repeated for their query heads: ``(..., n_key_value_heads, d_head) -> (..., n_heads,
        d_head)`` (key/value head ``g`` serves query heads ``g * n_groups ... (g + 1) * n_groups - 1``)."""
        g = self.cfg.n_groups
        if g == 1:
            return t
        return (
            t.unsqueeze(-2)
            .expand(*t.shape[:-1], g, t.shape[-1])
            .reshape(*t.shape[:-2], t.shape[-2] * g, t.shape[-1])
        )

    def scores(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        q_positions: torch.Tensor | None = None,
        k_positions: torch.Tensor | None = None,
        *,
        key_mask: torch.Tensor | None = None,
        bias_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Masked attention scores ``q . k / attn_scale``: ``q (batch, q_pos, n_heads, d_head)``, ``k (batch, k_pos,
        n_key_value_heads, d_head)`` (both already rotated) -> ``(batch, n_heads, q_pos, k_pos)`` with ``-inf``
        where :meth:`attn_mask` is True, and at every key where ``key_mask (batch, k_pos)`` (bool, True: a real
        token) is False. Positions (of the causal and sliding-window masks, and of ALiBi's biases) default to
        ``arange``; ``bias_positions (batch, k_pos)`` gives each sequence's keys their own ALiBi positions."""
        q, k = self.qk_cast(q, self.expand_kv(k))
        scaled = self.scale_scores(torch.einsum("bqhe,bkhe->bhqk", q, k))
        kb = bias_positions if bias_positions is not None else k_positions
        bias = self.position_bias(k.shape[1] if kb is None else kb, scaled.dtype, q.device)
        scores = self.cap(scaled if bias is None else scaled + bias.unsqueeze(-2))
        if q_positions is None and k_positions is None and self.cfg.window(self.layer) is None:
            T, S = q.shape[1], k.shape[1]
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).triu(1)
        else:
            qp = self.positions(q.shape[1], q.device) if q_positions is None else q_positions
            kp = self.positions(k.shape[1], q.device) if k_positions is None else k_positions
            mask = self.attn_mask(qp, kp)
        if key_mask is not None:
            mask = mask | ~key_mask[:, None, None, :]
        return scores.masked_fill(mask, float("-inf"))

    def dead_queries(self, key_mask: torch.Tensor) -> torch.Tensor:
        """``(batch, 1, pos, 1)`` bool: True at the queries that may attend to no key, every key the causal and
        sliding-window masks leave them being masked by ``key_mask (batch, pos)`` (False: padding), e.g. the
        padding positions of a left-padded batch."""
        cols = self.positions(key_mask.shape[-1], key_mask.device)
        allowed = ~self.attn_mask(cols, cols)  # (q, k)
        return ~(allowed & key_mask[:, None, :]).any(-1)[:, None, :, None]

    def position_bias(
        self, k_positions: torch.Tensor | int, dtype: torch.dtype, device: torch.device | None = None
    ) -> torch.Tensor | None:
        """ALiBi's additive score bias ``(n_heads, len(k_positions))``: ``slope_h * key_position`` (an int
        ``k_positions`` means ``arange`` of it; ``k_positions (batch, k_pos)`` gives ``(batch, n_heads, k_pos)``),
        added to the scaled scores before the cap and the mask; None
        unless ``positional_embedding_type == "alibi"``. Slopes and products are taken in float32 and cast to
        ``dtype``, as BLOOM takes them (the bias of a key depends on its position only: softmax removes the
        query's own offset)."""
        if self.cfg.positional_embedding_type != "alibi":
            return None
        if isinstance(k_positions, int):
            k_positions = torch.arange(k_positions, device=device)
        slopes = alibi_slopes(self.cfg.n_heads).to(k_positions.device)
        return (slopes[:, None] * k_positions[..., None, :].to(torch.float32)).to(dtype)

    def scale_scores(self, qk: torch.Tensor) -> torch.Tensor:
        """``q . k`` products scaled: ``qk * attn_scores_multiplier`` when set, else ``qk / attn_scale``."""
        m = self.cfg.scores_multiplier(self.layer)
        return qk / self.cfg.attn_scale if m is None else qk * m

    def cap(self, scores: torch.Tensor) -> torch.Tensor:
        """Scaled scores soft-capped per ``cfg.attn_scores_soft_cap`` (identity when None), before the mask."""
        return soft_cap(scores, self.cfg.attn_scores_soft_cap)

    def softmax(self, scores: torch.Tensor) -> torch.Tensor:
        """The pattern from masked scores ``(..., k_pos)``: :func:`attn_softmax` in ``cfg.attn_softmax_dtype``, in
        the values' dtype (the scores' unless ``cfg.attn_scores_dtype`` differs from the model's)."""
        out = None if self.cfg.attn_scores_dtype is None else self.W_V.dtype
        return attn_softmax(scores, self.cfg.attn_softmax_dtype, out)

    def dead_softmax(self, scores: torch.Tensor, dead: torch.Tensor | None) -> torch.Tensor:
        """:meth:`softmax` of masked scores where ``dead`` (broadcast over the keys; None: no query) marks the
        queries whose every key is masked (:meth:`dead_queries`): their pattern is 0, taken as a softmax over zeros
        set to 0, so that no ``-inf`` row reaches the softmax and neither the pattern nor a gradient through it is
        NaN. The one rule of the forward, the exact patching engine, attribution patching's QK fix and the
        circuits' model view."""
        if dead is None:
            return self.softmax(scores)
        return self.softmax(scores.masked_fill(dead, 0.0)).masked_fill(dead, 0.0)

    def mix(self, pattern: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``z``: ``pattern (batch, n_heads, q_pos, k_pos)``, ``v (batch, k_pos, n_key_value_heads, d_head)`` ->
        ``(batch, q_pos, n_heads, d_head)``."""
        return torch.einsum("bhqk,bkhe->bqhe", pattern, self.expand_kv(v))

    def output(self, z: torch.Tensor) -> torch.Tensor:
        """Output projection: ``z (..., n_heads, d_head) -> (..., d_model)`` (plus ``b_O`` when present)."""
        H, dh, d = self.W_O.shape
        return affine(z.reshape(*z.shape[:-2], H * dh), self.W_O.reshape(H * dh, d), self.b_O)

    def forward(
        self,
        q_in: torch.Tensor,
        kv_in: torch.Tensor | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``q_in (batch, pos, d_model)`` (and ``kv_in``, default ``q_in``) -> attention output ``(batch, pos,
        d_model)``, through the hook points. ``attention_mask (batch, pos)`` (bool, True: a real token) masks the
        other keys out of every query's attention; a query left with no key (a padding position of a left-padded
        batch) gets a pattern of zeros (its ``hook_attn_scores`` row is ``-inf`` throughout), so ``z`` is 0 there and
        the output ``b_O``. ``position_ids (batch, pos)`` are the positions rotary angles and ALiBi biases read
        (default ``0 .. pos - 1``); the causal and sliding-window masks read the columns. :meth:`Transformer.forward`
        checks both."""
        kv_in = q_in if kv_in is None else kv_in
        q = self.hook_q(self.compute_q(q_in))
        k = self.hook_k(self.compute_k(kv_in))
        v = self.hook_v(self.compute_v(kv_in))
        if self.cfg.rotary:
            q = self.hook_rot_q(self.rotate(q, position_ids))
            k = self.hook_rot_k(self.rotate(k, position_ids))
        scores = self.scores(q, k, key_mask=attention_mask, bias_positions=position_ids)
        scores = self.hook_attn_scores(scores)
        # a query whose every key is masked: a pattern of zeros (dead_softmax)
        pattern = self.dead_softmax(
            scores, None if attention_mask is None else self.dead_queries(attention_mask)
        )
        if self._scores_hooked():
            # a hook may have masked a query's every key (-inf: a NaN row) or made a score NaN: TransformerLens
            # reads nothing there (its NaN pattern entries are 0), and so does this model
            pattern = torch.where(torch.isnan(pattern), torch.zeros_like(pattern), pattern)
        elif self.hook_pattern._fns and torch.is_grad_enabled() and pattern.requires_grad:
            # the softmax keeps its output for its backward: a hook editing the pattern in place (TransformerLens'
            # ``pattern[:, h] = 0``, whose pattern is always a tensor of its own) edits a copy
            pattern = pattern.clone()
        pattern = self.hook_pattern(pattern)
        z = self.hook_z(self.mix(pattern, v))
        return self.output(z)

    def _scores_hooked(self) -> bool:
        """Whether a function is attached to a hook point the scores are computed from (``hook_q``, ``hook_k``,
        their rotated forms, ``hook_attn_scores``); without one no score row is all ``-inf`` (the key at the
        query's own position is never masked), and the pattern is not scanned for NaN."""
        return bool(
            self.hook_attn_scores._fns
            or self.hook_q._fns
            or self.hook_k._fns
            or (self.cfg.rotary and (self.hook_rot_q._fns or self.hook_rot_k._fns))
        )


class MLP(nn.Module):
    """``x (..., d_model) -> (..., d_model)``: ``act(x W_in + b_in) W_out + b_out``, or gated
    ``(act(x W_gate + b_gate) * (x W_in + b_in)) W_out + b_out``. Missing biases are None attributes."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dt = cfg.dtype
        if cfg.n_experts is not None:  # a sparse mixture of gated experts (see TransformerConfig.n_experts)
            E, d, m = cfg.n_experts, cfg.d_model, cfg.d_mlp
            self.W_router = nn.Parameter(torch.empty(d, E, dtype=dt))
            self.W_gate = nn.Parameter(torch.empty(E, d, m, dtype=dt))
            self.W_in = nn.Parameter(torch.empty(E, d, m, dtype=dt))
            self.W_out = nn.Parameter(torch.empty(E, m, d, dtype=dt))
            self.b_in = self.b_out = self.b_gate = None
            if cfg.moe_shared_d_mlp is not None:
                ms = cfg.moe_shared_d_mlp
                self.W_shared_gate = nn.Parameter(torch.empty(d, ms, dtype=dt))
                self.W_shared_in = nn.Parameter(torch.empty(d, ms, dtype=dt))
                self.W_shared_out = nn.Parameter(torch.empty(ms, d, dtype=dt))
                self.W_shared_router = nn.Parameter(torch.empty(d, 1, dtype=dt))
            self.hook_router_logits = HookPoint()
            self.hook_expert_weights = HookPoint()
            self.hook_expert_indices = HookPoint()
            return
        self.W_in = nn.Parameter(torch.empty(cfg.d_model, cfg.d_mlp, dtype=dt))
        self.b_in = _maybe_bias(cfg.mlp_bias, cfg.d_mlp, dtype=dt)
        self.W_out = nn.Parameter(torch.empty(cfg.d_mlp, cfg.d_model, dtype=dt))
        self.b_out = _maybe_bias(cfg.mlp_bias, cfg.d_model, dtype=dt)
        if cfg.gated_mlp:
            self.W_gate = nn.Parameter(torch.empty(cfg.d_model, cfg.d_mlp, dtype=dt))
            self.b_gate = _maybe_bias(cfg.mlp_bias, cfg.d_mlp, dtype=dt)
            self.hook_pre_linear = HookPoint()
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()

    @staticmethod
    def _lin(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return affine(x, W, b)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The activation ``post (..., d_mlp)`` of ``x (..., d_model)``, through ``hook_pre`` (and
        ``hook_pre_linear``) and ``hook_post``."""
        if self.cfg.gated_mlp:
            pre = self.hook_pre(self._lin(x, self.W_gate, self.b_gate))
            pre_linear = self.hook_pre_linear(self._lin(x, self.W_in, self.b_in))
            return self.hook_post(apply_act(pre, self.cfg.act_fn) * pre_linear)
        pre = self.hook_pre(self._lin(x, self.W_in, self.b_in))
        return self.hook_post(apply_act(pre, self.cfg.act_fn))

    def output(self, post: torch.Tensor) -> torch.Tensor:
        """``post (..., d_mlp) -> (..., d_model)``: ``post W_out (+ b_out)``."""
        return self._lin(post, self.W_out, self.b_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.n_experts is not None:
            return self.experts(x)
        return self.output(self.hidden(x))

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """Routing weights ``(..., n_experts)`` of a mixture of experts for ``x (..., d_model)`` (zero for the experts
        not chosen), through the router hooks (Hugging Face's order: softmax in float32, top-k, renormalised)."""
        cfg = self.cfg
        logits = self.hook_router_logits(x @ self.W_router)
        probs = torch.softmax(logits.float(), dim=-1)
        w, idx = torch.topk(probs, cfg.experts_per_token, dim=-1)
        idx = self.hook_expert_indices(idx)
        if cfg.moe_renormalize:
            w = w / w.sum(dim=-1, keepdim=True)
        if not cfg.moe_float32_weights:
            w = w.to(logits.dtype)
        return self.hook_expert_weights(torch.zeros_like(probs, dtype=w.dtype).scatter(-1, idx, w))

    def expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Expert ``e``'s gated MLP on rows ``x (..., d_model)``."""
        h = apply_act(x @ self.W_gate[e], self.cfg.act_fn) * (x @ self.W_in[e])
        return h @ self.W_out[e]

    def experts(self, x: torch.Tensor) -> torch.Tensor:
        """The mixture's output for ``x (..., d_model)``: each chosen expert on its tokens only, weighted and added
        up in expert order (under ``torch.func`` transforms, which cannot index by data, every expert on every token
        with the weight zero where it is not chosen: the same sums)."""
        shape = x.shape
        weights = self.route(x).reshape(-1, self.cfg.n_experts)  # (N, E)
        flat = x.reshape(-1, shape[-1])
        out = torch.zeros_like(flat)
        if functorch_wrapped(flat, self.W_in):
            for e in range(self.cfg.n_experts):
                out = out + (self.expert(flat, e) * weights[:, e : e + 1]).to(out.dtype)
        else:
            chosen = weights != 0
            for e in chosen.any(0).nonzero().flatten().tolist():
                rows = chosen[:, e].nonzero().flatten()
                y = self.expert(flat[rows], e) * weights[rows, e, None]
                out = out.index_add(0, rows, y.to(out.dtype))
        if self.cfg.moe_shared_d_mlp is not None:  # the shared expert, gated per token
            h = apply_act(flat @ self.W_shared_gate, self.cfg.act_fn) * (flat @ self.W_shared_in)
            out = out + torch.sigmoid(flat @ self.W_shared_router) * (h @ self.W_shared_out)
        return out.view(shape)


class TransformerBlock(nn.Module):
    """One block. Sequential: ``mid = pre + attn(ln1(pre))``, ``post = mid + mlp(ln2(mid))``. Parallel
    (``parallel_attn_mlp``): ``post = pre + (attn(ln1(pre)) + mlp(ln2(pre)))``. Attention-only: ``post = pre +
    attn(ln1(pre))``. ``ln1``/``ln2`` are ``nn.Identity`` without normalization. With
    ``use_normalization_before_and_after`` the attention's and the MLP's outputs pass through ``ln1_post`` /
    ``ln2_post`` before they are added."""

    def __init__(self, cfg: TransformerConfig, layer: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.ln1 = _make_norm(cfg) if cfg.pre_norms else nn.Identity()
        self.attn = Attention(cfg, layer)
        post = cfg.use_normalization_before_and_after
        if post:
            self.ln1_post = _make_norm(cfg)
        self.hook_resid_pre = HookPoint()
        self.hook_attn_out = HookPoint()
        self.hook_resid_post = HookPoint()
        if not cfg.attn_only:
            if cfg.parallel_shared_norm:  # the MLP reads ln1's output: one module, listed (and hooked) once
                object.__setattr__(self, "ln2", self.ln1)
            else:
                self.ln2 = _make_norm(cfg) if cfg.pre_norms else nn.Identity()
            self.mlp = MLP(cfg)
            if post:
                self.ln2_post = _make_norm(cfg)
            if not cfg.parallel_attn_mlp:
                self.hook_resid_mid = HookPoint()
            self.hook_mlp_out = HookPoint()

    def attn_post(self, out: torch.Tensor) -> torch.Tensor:
        """The attention's write to the residual stream from its output projection ``out`` (``ln1_post(out)`` with
        ``use_normalization_before_and_after``, else ``out`` itself; times ``residual_multiplier`` when set)."""
        out = self.ln1_post(out) if self.cfg.use_normalization_before_and_after else out
        m = self.cfg.residual_multiplier
        return out if m is None else out * m

    def mlp_post(self, out: torch.Tensor) -> torch.Tensor:
        """The MLP's write to the residual stream from its output ``out`` (``ln2_post(out)`` with
        ``use_normalization_before_and_after``, else ``out`` itself; times ``residual_multiplier`` when set)."""
        out = self.ln2_post(out) if self.cfg.use_normalization_before_and_after else out
        m = self.cfg.residual_multiplier
        return out if m is None else out * m

    def mlp_write(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP's write to the residual stream from its (un-normalised) input ``x``: ``mlp_post(mlp(ln2(x)))``
        (no hook)."""
        return self.mlp_post(self.mlp(self.ln2(x)))

    def attn_block(self, x: torch.Tensor, **masking) -> torch.Tensor:
        """``attn(ln1(x))`` (through ``ln1_post`` with sandwich norms) through ``hook_attn_out``: ``(batch, pos,
        d_model)``. ``masking``: the attention's ``attention_mask`` / ``position_ids`` (:meth:`Attention.forward`)."""
        return self.hook_attn_out(self.attn_post(self.attn(self.ln1(x), **masking)))

    def mlp_block(self, x: torch.Tensor) -> torch.Tensor:
        """``mlp(ln2(x))`` (through ``ln2_post`` with sandwich norms) through ``hook_mlp_out``: ``(batch, pos,
        d_model)``; ``x`` is ``resid_mid`` in a sequential block and ``resid_pre`` in a parallel one."""
        return self.hook_mlp_out(self.mlp_write(x))

    @staticmethod
    def combine(resid_pre: torch.Tensor, attn_out: torch.Tensor, mlp_out: torch.Tensor) -> torch.Tensor:
        """Residual of a parallel block: ``resid_pre + (attn_out + mlp_out)``."""
        return resid_pre + (attn_out + mlp_out)

    def forward(
        self,
        resid: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The block on ``resid (batch, pos, d_model)``; ``attention_mask`` / ``position_ids`` (checked, ``(batch,
        pos)``) go to the attention (:meth:`Attention.forward`)."""
        masking = {}
        if attention_mask is not None:
            masking["attention_mask"] = attention_mask
        if position_ids is not None:
            masking["position_ids"] = position_ids
        resid = self.hook_resid_pre(resid)
        if self.cfg.attn_only:
            return self.hook_resid_post(resid + self.attn_block(resid, **masking))
        if self.cfg.parallel_shared_norm:  # one norm, computed (and hooked) once, read by both
            h = self.ln1(resid)
            attn_out = self.hook_attn_out(self.attn_post(self.attn(h, **masking)))
            mlp_out = self.hook_mlp_out(self.mlp_post(self.mlp(h)))
            return self.hook_resid_post(self.combine(resid, attn_out, mlp_out))
        if self.cfg.parallel_attn_mlp:
            return self.hook_resid_post(
                self.combine(resid, self.attn_block(resid, **masking), self.mlp_block(resid))
            )
        resid = self.hook_resid_mid(resid + self.attn_block(resid, **masking))
        return self.hook_resid_post(resid + self.mlp_block(resid))


class Transformer(HookedRootModule):
    """Causal decoder-only transformer with TransformerLens names (see the module docstring).

    Parameters
    ----------
    cfg : TransformerConfig or dict
        Its fields may also be given as keyword arguments.

    Examples
    --------
    >>> model = Transformer(TransformerConfig(n_layers=2, d_model=32, n_heads=4, d_mlp=None, d_vocab=10, n_ctx=8))
    >>> logits, cache = model.run_with_cache(torch.zeros(1, 8, dtype=torch.long))
    >>> cache["blocks.1.attn.hook_pattern"].shape
    torch.Size([1, 4, 8, 8])
    """

    def __init__(self, cfg: TransformerConfig | dict | None = None, **kwargs) -> None:
        super().__init__()
        if cfg is None:
            cfg = TransformerConfig(**kwargs)
        elif isinstance(cfg, dict):
            cfg = TransformerConfig(**{**cfg, **kwargs})
        elif not isinstance(cfg, TransformerConfig):
            raise TypeError(
                f"cfg is a {type(cfg).__name__}; give a TransformerConfig, a dict of its fields, or None (then the "
                "fields as keywords)"
            )
        elif kwargs:
            raise TypeError(
                f"Transformer(cfg, {', '.join(f'{k}=...' for k in kwargs)}): a TransformerConfig is given whole; give "
                "its fields in it, or cfg as a dict (or None) with the fields as keywords"
            )
        self.cfg = cfg
        self.embed = Embed(cfg)
        self.hook_embed = HookPoint()
        if cfg.positional_embedding:
            self.pos_embed = PosEmbed(cfg)
            self.hook_pos_embed = HookPoint()
        self.blocks = nn.ModuleList([TransformerBlock(cfg, i) for i in range(cfg.n_layers)])
        self.ln_final = _make_norm(cfg)
        self.unembed = TiedUnembed(cfg, self.embed) if cfg.tie_word_embeddings else Unembed(cfg)
        self.init_weights(cfg.seed)
        self.setup_hooks()

    def __getattr__(self, name: str):
        """``nn.Module.__getattr__`` (parameters, buffers, submodules). A weight accessor (``W_pos``, ``b_V``,
        ``W_in``, ...) of a model without that weight raises AttributeError naming why, and Python then looks the
        name up here, where ``nn.Module`` would replace that message by a bare "has no attribute": the accessor's
        own error is raised instead (``hasattr`` still gives False)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            accessor = getattr(type(self), name, None)
            if isinstance(accessor, property) and accessor.fget is not None:
                return accessor.fget(self)  # raises the accessor's own AttributeError
            raise

    def _apply(self, fn, *args, **kwargs):
        """``nn.Module._apply`` (behind ``.to``, ``.half()``, ``.double()``, ...), then ``cfg.dtype`` set to the
        weights' new dtype, as TransformerLens' ``to`` does: code reading ``cfg.dtype`` (memory estimates, the
        checks of half-precision weights) sees the weights the model holds. The model gets a config of its own
        (the one it was built with may be shared by other models, whose weights were not cast)."""
        out = super()._apply(fn, *args, **kwargs)
        self._sync_dtype()
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``; with ``assign=True`` the model takes the given tensors themselves, in their
        dtype, and ``cfg.dtype`` (and what the norms compute in) follows them as after ``.to(dtype)``: weights of
        another dtype assigned to a model built in float32 compute as a model built in their dtype."""
        out = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._sync_dtype()
        return out

    def _sync_dtype(self) -> None:
        """``cfg.dtype`` (in a config of the model's own) and the RMS norms' compute dtype set from the weights'."""
        dt = self.embed.W_E.dtype
        if dt != self.cfg.dtype and dt.is_floating_point:
            old, new = self.cfg, replace(self.cfg, dtype=dt)
            for m in self.modules():
                if m.__dict__.get("cfg") is old:
                    m.cfg = new
                if isinstance(m, RMSNorm | RMSNormPre):  # 16-bit weights: the norms compute in float32
                    m.compute_dtype = rms_compute_dtype(new.norm_dtype, dt)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Normal(0, ``cfg.init_range``) for every weight matrix, zeros for biases, ones for norm weights (``1 -
        norm_weight_offset`` for RMSNorm's): a trained model gets the weights of a fresh one built with ``seed``."""
        # drawn on the CPU (its generator; the same weights on every device, also when the model is built under a
        # default device such as ``with torch.device("cuda")``, where a CPU generator would be refused) and copied
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            # a parameter on the meta device holds no values (a model built to have its weights assigned, as the
            # converters do): nothing is drawn, and the caller's generator is left as it was
            if p.device.type == "meta":
                continue
            if leaf.startswith("W_"):
                w = torch.randn(p.shape, generator=gen, dtype=torch.float64, device="cpu")
                p.copy_(w.to(p.dtype) * self.cfg.init_range)
            elif leaf == "w":  # a norm's weight: its initial value (1 - norm_weight_offset for RMSNorm)
                owner = self.get_submodule(name.rsplit(".", 1)[0])
                p.fill_(1.0 - getattr(owner, "offset", 0.0))
            else:  # biases (the norms' too)
                p.zero_()

    @contextlib.contextmanager
    def fixed_weights(self, max_pack_bytes: int | None = 0) -> Iterator[Transformer]:
        """A block in which the model's weights are meant to stay fixed: each attention lays out its query, key
        and value weights for the projection's matmul once (a copy of the weight per call otherwise) and reuses
        them while no gradient flows into the weights. The layouts are dropped when the block ends. A weight
        replaced, changed in place by torch operations (an optimiser's step) or given new data (``p.data = t``, and
        the casts ``.to(dtype)``, ``.half()``, ``.double()``) inside the block is laid out and packed anew; values
        changed in place through ``.data`` (``p.data.mul_(2)``) are not seen.

        On a CPU, float32 products go through oneDNN's matmul where that was timed faster than ``mm``
        (:mod:`pypattern.models.packed`), and weights used for many rows are packed for it, holding at most
        ``max_pack_bytes`` bytes of packed copies (None: no bound; 0, the default: none, weights read in place). A
        nested block shares the outer block's packs and bound."""
        if max_pack_bytes is not None and (
            isinstance(max_pack_bytes, bool) or not isinstance(max_pack_bytes, int) or max_pack_bytes < 0
        ):
            raise ValueError(f"max_pack_bytes={max_pack_bytes!r} is not valid; give an int >= 0 or None")
        attns = [blk.attn for blk in self.blocks if getattr(blk, "attn", None) is not None]
        # the layouts live while any block on the model is open, in this thread or another (a count of the open
        # blocks, not the dict seen at entry: a block that outlives one opened before it in another thread must
        # not put back layouts whose block has ended); a nested block shares them
        with _LAYOUTS_LOCK:
            for a in attns:
                n = a.__dict__.get("_layout_blocks", 0)
                if n == 0 or "_layouts" not in a.__dict__:
                    a._layouts = {}
                a._layout_blocks = n + 1
        outer_packs = _active_packs()
        if outer_packs is None:
            _PACKS_LOCAL.packs = PackedWeights(max_pack_bytes)
        try:
            yield self
        finally:
            _PACKS_LOCAL.packs = outer_packs
            with _LAYOUTS_LOCK:
                for a in attns:
                    n = a.__dict__.get("_layout_blocks", 1) - 1
                    a._layout_blocks = n
                    if n <= 0:
                        a.__dict__.pop("_layout_blocks", None)
                        dropped = a.__dict__.pop("_layouts", None)
                        if outer_packs is not None and dropped:  # the outer block's packs must not keep them
                            outer_packs.forget(made[2] for made in dropped.values())

    def embed_tokens(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Token plus positional embedding (through ``hook_embed``/``hook_pos_embed``): ``(batch, pos, d_model)``.
        Prompts longer than the learned positions (:attr:`TransformerConfig.max_positions`) raise ValueError.
        ``position_ids (batch, pos)`` (checked by :meth:`forward`): the learned position rows each token reads
        (default ``0 .. pos - 1``)."""
        limit = self.cfg.max_positions
        if limit is not None and position_ids is None and tokens.shape[-1] > limit:
            raise ValueError(
                f"tokens has {tokens.shape[-1]} positions; the model's n_ctx (learned positions) is {limit}"
            )
        x = self.hook_embed(self.embed(tokens))
        if self.cfg.positional_embedding:
            pos = self.pos_embed(tokens, position_ids)  # a view of W_pos expanded over the batch, or a gather
            if self.hook_pos_embed._fns:
                # hooks see a tensor of its own: an in-place edit must not write into W_pos (nor fail on the
                # batch axis, whose rows share memory), and a cached copy must not change with W_pos
                pos = pos.clone(memory_format=torch.contiguous_format)
            x = x + self.hook_pos_embed(pos)
        return x

    def forward(
        self,
        tokens: torch.Tensor,
        return_type: str | None = "logits",
        *,
        loss_per_token: bool = False,
        start_at_layer: int | None = None,
        stop_at_layer: int | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
        """Run the model on ``tokens (batch, pos)``.

        Parameters
        ----------
        tokens : Tensor ``(batch, pos)`` (or ``(pos,)``, read as one sequence), int64 or int32
            Token ids in ``[0, d_vocab)``: another id raises ValueError naming it (on a CUDA device, a device-side
            assertion, checked without synchronising: :func:`check_token_ids`), another dtype TypeError, another
            shape ValueError. With learned positions at most ``n_ctx`` positions.
        return_type : {"logits", "loss", "per_token_loss", "both", None}
            ``"logits"``: ``(batch, pos, d_vocab)``; ``"loss"``: mean next-token cross-entropy (scalar);
            ``"per_token_loss"``: ``(batch, pos - 1)``; ``"both"``: ``(logits, loss)``; None: nothing. The mean
            loss (``"loss"``, ``"both"``) of tokens without a next token (one position, or no sequence) is
            undefined and raises ValueError.
        loss_per_token : bool
            With ``return_type="loss"`` / ``"both"``: the per-token losses ``(batch, pos - 1)`` in place of their
            mean (TransformerLens' argument).
        start_at_layer : int, optional
            ``tokens`` is then not token ids but the residual stream entering block ``start_at_layer`` (``(batch,
            pos, d_model)``, or ``(pos, d_model)``, in the weights' dtype, e.g. a cached ``blocks.{l}.hook_resid_pre``): the
            embedding and the blocks before it do not run (nor their hooks). A negative layer counts from the last;
            ``return_type`` must then be ``"logits"`` or None (there are no token ids to score).
        stop_at_layer : int, optional
            Run the blocks before ``stop_at_layer`` only and return the residual stream they leave, ``(batch, pos,
            d_model)``, whatever ``return_type`` says: ``0`` gives the embedding, ``l`` the input of block ``l``
            (``blocks.{l}.hook_resid_pre``), ``n_layers`` the output of the last block before ``ln_final``
            (HookedTransformer's "last residual stream computed"); a negative layer counts from the last. Hooks of
            the blocks not run do not fire.
        attention_mask : Tensor ``(batch, pos)``, optional
            1 at real tokens, 0 at padding (bool, an integer or a floating dtype holding only 0 and 1; ``(pos,)``
            with one sequence), as a Hugging Face tokenizer returns it: keys at 0 are masked out of every query's
            attention, besides the causal and sliding-window masks (``hook_attn_scores`` is ``-inf`` there and
            ``hook_pattern`` 0). The real tokens' logits equal the Hugging Face model's forward given the same mask
            (and ``position_ids``). A query whose every key is masked (the padding positions of a left-padded batch)
            attends to nothing: its pattern row is 0, so its attention output is ``b_O`` (0 without one); its logits
            are finite but mean nothing. With ``return_type`` ``"loss"`` / ``"per_token_loss"`` / ``"both"`` only
            next-token terms whose token and target are both real count (TransformerLens' rule): the others are 0 in
            the per-token losses and the mean is over the counted ones. Other values, shapes or dtypes raise
            ValueError / TypeError naming ``attention_mask``.
        position_ids : Tensor ``(batch, pos)``, optional
            Integer position of each token (``(pos,)`` or ``(1, pos)`` is shared by every sequence): the row of
            ``W_pos`` it reads (learned positions; ids ``< n_ctx``), its rotary angles and its ALiBi bias. The causal
            and sliding-window masks read the columns, as Hugging Face's do. Ids at padding positions
            (``attention_mask`` 0) are not read (taken as 0); elsewhere they must be ``>= 0``. Default: the columns
            ``0 .. pos - 1``, or with an ``attention_mask`` and ``cfg.mask_positions`` (OPT, BLOOM,
            HookedTransformer conversions: :attr:`TransformerConfig.positions_from_mask`) each row's real tokens
            counted from 0, ``(attention_mask.cumsum(-1) - 1).clamp(min=0)``, as the Hugging Face forward of that
            family derives them.
        """
        if return_type not in _RETURN_TYPES:  # before the forward: its hooks would run for nothing
            raise ValueError(
                f"return_type={return_type!r} is not valid; choose 'logits', 'loss', 'per_token_loss', 'both' or None"
            )
        if not isinstance(loss_per_token, bool):
            raise TypeError(f"loss_per_token={loss_per_token!r} is not valid; give True or False")
        n = self.cfg.n_layers
        start = _layer_bound("start_at_layer", start_at_layer, n, n - 1)
        stop = _layer_bound("stop_at_layer", stop_at_layer, n, n)
        if start is not None and stop is not None and stop < start:
            raise ValueError(
                f"stop_at_layer={stop_at_layer!r} is before start_at_layer={start_at_layer!r}: no block would run"
            )
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(
                f"tokens is a {type(tokens).__name__}; give a tensor of token ids (batch, pos) or (pos,) (the model "
                "has no tokenizer: encode text first)"
            )
        if start is not None:
            x = self._residual_input(tokens, start_at_layer, return_type, stop is not None)
            attention_mask, position_ids = self._masking_inputs(
                attention_mask, position_ids, x.shape[:2], x.device
            )
        else:
            if tokens.dim() == 1:
                tokens = tokens.unsqueeze(0)
            if tokens.dim() != 2:
                raise ValueError(
                    f"tokens has shape {tuple(tokens.shape)}; give token ids of shape (batch, pos), or (pos,) for "
                    "one sequence"
                )
            if (
                return_type in ("loss", "both")
                and not loss_per_token
                and stop is None
                and (tokens.shape[0] == 0 or tokens.shape[1] < 2)
            ):
                raise ValueError(
                    f"tokens has shape {tuple(tokens.shape)}: no position has a next token, and the mean next-token "
                    f"loss (return_type={return_type!r}) over none is undefined; give at least one sequence of 2 "
                    "or more tokens (return_type='per_token_loss' gives the empty per-token losses)"
                )
            attention_mask, position_ids = self._masking_inputs(
                attention_mask, position_ids, tokens.shape, tokens.device
            )
            x = self.embed_tokens(tokens, position_ids)
        masking = {}
        if attention_mask is not None:
            masking["attention_mask"] = attention_mask
        if position_ids is not None:
            masking["position_ids"] = position_ids
        for block in self.blocks[start or 0 : n if stop is None else stop]:
            x = block(x, **masking)
        if stop is not None:
            return x
        x = self.ln_final(x)
        if return_type is None:  # the unembedding has no hook point: nothing observable is skipped
            return None
        logits = self.unembed(x)
        if return_type == "logits":
            return logits
        per_tok = lm_cross_entropy(logits, tokens)
        counted = None
        if attention_mask is not None:  # a term counts when its token and its target are real
            counted = attention_mask[:, :-1] & attention_mask[:, 1:]
            per_tok = per_tok.masked_fill(~counted, 0.0)
        if return_type == "per_token_loss":
            return per_tok
        if loss_per_token:
            loss = per_tok
        elif counted is None:
            loss = per_tok.mean()
        else:
            _refuse_nothing_counted(counted, return_type)
            loss = per_tok.sum() / counted.sum()
        if return_type == "loss":
            return loss
        return logits, loss

    def _masking_inputs(
        self, attention_mask, position_ids, shape: tuple[int, int], device: torch.device
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The forward's ``attention_mask`` and ``position_ids`` checked against the input's ``(batch, pos)``
        ``shape``: the mask as bool ``(batch, pos)`` (True: a real token), the positions as int64 ``(batch, pos)``
        (0 at padding; the default positions of :meth:`forward` when None and the model derives them from the
        mask), each None when not given."""
        B, T = int(shape[0]), int(shape[1])
        keep = None
        if attention_mask is not None:
            keep = _checked_attention_mask(attention_mask, B, T).to(device)
        if position_ids is None:
            if keep is None or not self.cfg.mask_positions:
                return keep, None
            pos = real_token_positions(keep)
            given = False
        else:
            pos = _shaped_position_ids(position_ids, B, T).to(device)
            if keep is not None:  # ids at padding are not read
                pos = torch.where(keep, pos, torch.zeros_like(pos))
            given = True
        limit = self.cfg.max_positions
        values = _host_values(pos)
        if values is not None and values.numel():
            lo, hi = (int(v) for v in torch.aminmax(values))
            if lo < 0:
                raise ValueError(
                    f"position_ids contains {lo} at a real token; positions are integers >= 0 (ids at padding, "
                    "attention_mask 0, are not read)"
                )
            if limit is not None and hi >= limit:
                what = "position_ids contains" if given else "attention_mask gives a row of"
                n = hi if given else hi + 1
                raise ValueError(
                    f"{what} {n}{'' if given else ' real tokens'}; the model's n_ctx (learned positions) is {limit}: "
                    f"give positions 0 .. {limit - 1}"
                )
        return keep, pos

    def _residual_input(
        self, resid: torch.Tensor, start_at_layer: int, return_type: str | None, stops: bool
    ) -> torch.Tensor:
        """``resid`` given with ``start_at_layer``, checked and as ``(batch, pos, d_model)``."""
        if return_type not in ("logits", None) and not stops:
            raise ValueError(
                f"return_type={return_type!r} with start_at_layer={start_at_layer!r}: the input is a residual stream, "
                "not token ids, so there is no next token to score; give return_type='logits' (or None) and compute "
                "the loss from the logits"
            )
        d = self.cfg.d_model
        if not resid.is_floating_point() or resid.dim() not in (2, 3) or resid.shape[-1] != d:
            raise ValueError(
                f"with start_at_layer={start_at_layer!r} the input is the residual stream entering that block: a "
                f"floating tensor (batch, pos, {d}) or (pos, {d}); got a {resid.dtype} tensor of shape "
                f"{tuple(resid.shape)}"
            )
        dtype = self.embed.W_E.dtype
        if resid.dtype != dtype:
            # the blocks would mix it with weights of another dtype: torch's mixed-dtype error, or (a LayerNorm of
            # 16-bit weights on a float32 input) activations promoted to another dtype than the model computes in
            raise ValueError(
                f"with start_at_layer={start_at_layer!r} the residual stream is {resid.dtype} but the model's weights "
                f"are {dtype}; give resid.to({dtype}) (what the model's own blocks would pass on)"
            )
        limit = self.cfg.max_positions
        if limit is not None and resid.shape[-2] > limit:
            raise ValueError(
                f"the residual stream has {resid.shape[-2]} positions; the model's n_ctx (learned positions) is {limit}"
            )
        return resid.unsqueeze(0) if resid.dim() == 2 else resid

    # ----- TransformerLens' weight accessors ------------------------------------------------------------------
    @property
    def W_E(self) -> torch.Tensor:
        """The token embedding ``embed.W_E (d_vocab, d_model)``."""
        return self.embed.W_E

    @property
    def W_pos(self) -> torch.Tensor:
        """The learned positions ``pos_embed.W_pos (n_ctx, d_model)`` (``positional_embedding_type="standard"``)."""
        if not self.cfg.positional_embedding:
            raise AttributeError(
                f"W_pos: the model has no learned positions (positional_embedding_type="
                f"{self.cfg.positional_embedding_type!r})"
            )
        return self.pos_embed.W_pos

    @property
    def W_U(self) -> torch.Tensor:
        """The unembedding ``(d_model, d_vocab)`` (``embed.W_E`` transposed with tied embeddings)."""
        return self.unembed.W_U

    @property
    def b_U(self) -> torch.Tensor:
        """The unembedding bias ``(d_vocab,)``; zeros when the model has none (``unembed_bias=False``), as
        TransformerLens' ``b_U``."""
        b = self.unembed.b_U
        return b if b is not None else self.W_U.new_zeros(self.cfg.d_vocab)

    def _stacked(self, where: str, name: str, kv: bool = False) -> torch.Tensor:
        """``blocks.{l}.{where}.{name}`` of every layer stacked on a new leading axis (TransformerLens' ``model.W_Q``
        and friends); ``kv``: key/value heads repeated for their query heads, ``(n_layers, n_heads, ...)``, as
        TransformerLens' grouped-query attention gives ``W_K`` / ``W_V`` / ``b_K`` / ``b_V``."""
        parts = []
        for layer, blk in enumerate(self.blocks):
            t = getattr(getattr(blk, where, None), name, None)
            if t is None:
                option = _ACCESSOR_OPTIONS.get(name)
                if where == "mlp" and self.cfg.attn_only:
                    why = f"the model is attention-only: d_mlp={self.cfg.d_mlp!r}"
                elif option is not None:
                    why = f"{option}={getattr(self.cfg, option)!r}"
                else:
                    why = "the option that adds it is off"
                raise AttributeError(f"{name}: layer {layer} has no {where}.{name} ({why})")
            parts.append(t.repeat_interleave(self.cfg.n_groups, dim=0) if kv else t)
        return torch.stack(parts)

    @property
    def W_Q(self) -> torch.Tensor:
        """``(n_layers, n_heads, d_model, d_head)``."""
        return self._stacked("attn", "W_Q")

    @property
    def W_K(self) -> torch.Tensor:
        """``(n_layers, n_heads, d_model, d_head)`` (key/value heads repeated for their query heads)."""
        return self._stacked("attn", "W_K", kv=True)

    @property
    def W_V(self) -> torch.Tensor:
        """``(n_layers, n_heads, d_model, d_head)`` (key/value heads repeated for their query heads)."""
        return self._stacked("attn", "W_V", kv=True)

    @property
    def W_O(self) -> torch.Tensor:
        """``(n_layers, n_heads, d_head, d_model)``."""
        return self._stacked("attn", "W_O")

    @property
    def b_Q(self) -> torch.Tensor:
        """``(n_layers, n_heads, d_head)`` (``attn_bias``)."""
        return self._stacked("attn", "b_Q")

    @property
    def b_K(self) -> torch.Tensor:
        """``(n_layers, n_heads, d_head)`` (``attn_bias``; key/value heads repeated for their query heads)."""
        return self._stacked("attn", "b_K", kv=True)

    @property
    def b_V(self) -> torch.Tensor:
        """``(n_layers, n_heads, d_head)`` (``attn_bias``; key/value heads repeated for their query heads)."""
        return self._stacked("attn", "b_V", kv=True)

    @property
    def b_O(self) -> torch.Tensor:
        """``(n_layers, d_model)`` (``attn_out_bias``)."""
        return self._stacked("attn", "b_O")

    @property
    def W_in(self) -> torch.Tensor:
        """``(n_layers, d_model, d_mlp)`` (``(n_layers, n_experts, d_model, d_mlp)`` with experts)."""
        return self._stacked("mlp", "W_in")

    @property
    def W_gate(self) -> torch.Tensor:
        """``(n_layers, d_model, d_mlp)`` (``gated_mlp``)."""
        return self._stacked("mlp", "W_gate")

    @property
    def W_out(self) -> torch.Tensor:
        """``(n_layers, d_mlp, d_model)``."""
        return self._stacked("mlp", "W_out")

    @property
    def b_in(self) -> torch.Tensor:
        """``(n_layers, d_mlp)`` (``mlp_bias``)."""
        return self._stacked("mlp", "b_in")

    @property
    def b_out(self) -> torch.Tensor:
        """``(n_layers, d_model)`` (``mlp_bias``)."""
        return self._stacked("mlp", "b_out")

    # ----- components -------------------------------------------------------------------------------------
    def components(self, heads: bool = True) -> list[str]:
        """Names accepted by :func:`component_masks` (see there)."""
        return list_components(self, heads=heads)

    def component_masks(self, component: str, all_params: bool = False) -> dict[str, torch.Tensor]:
        """See :func:`component_masks`."""
        return component_masks(self, component, all_params=all_params)


_RETURN_TYPES = ("logits", "loss", "per_token_loss", "both", None)
# the option whose False leaves out the weight a stacked accessor reads
_ACCESSOR_OPTIONS = {
    "b_Q": "attn_bias",
    "b_K": "attn_bias",
    "b_V": "attn_bias",
    "b_O": "attn_out_bias",
    "b_in": "mlp_bias",
    "b_out": "mlp_bias",
    "W_gate": "gated_mlp",
}


def _layer_bound(name: str, value, n_layers: int, top: int) -> int | None:
    """``value`` of the forward's ``start_at_layer`` / ``stop_at_layer`` (``name``) as a layer in ``[0, top]`` (a
    negative one counts from ``n_layers``); None stays None; anything else raises naming ``name``."""
    if value is None:
        return None
    if not is_count(value):
        raise TypeError(f"{name}={value!r} is not valid; give a layer index (an int) or None")
    v = int(value) + n_layers if value < 0 else int(value)
    if not 0 <= v <= top:
        raise ValueError(
            f"{name}={value!r} is out of range for a model of {n_layers} layers; give an int in "
            f"[{-n_layers}, {top}] (negative counts from the last layer)"
        )
    return v


def _host_values(t: torch.Tensor) -> torch.Tensor | None:
    """``t``'s values where they can be read without a host-device synchronisation or a transform's refusal: a CPU
    tensor (under ``torch.func`` transforms the unwrapped one); None on other devices and under ``torch.compile``."""
    if torch.compiler.is_compiling():
        return None
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t if t.device.type == "cpu" else None


def _host_values_per_sample(t: torch.Tensor) -> tuple[torch.Tensor | None, int]:
    """:func:`_host_values` with the ``torch.func.vmap`` batch dimensions of ``t`` first: ``(values, n)``, where the
    first ``n`` dimensions of ``values`` index the vmapped samples (0 outside ``vmap``), so that a check can be made
    sample by sample as an unbatched call makes it; ``(None, 0)`` where the values cannot be read."""
    if torch.compiler.is_compiling():
        return None, 0
    n = 0
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        if torch._C._functorch.is_batchedtensor(t):
            bdim = torch._C._functorch.maybe_get_bdim(t)
            t = torch._C._functorch.get_unwrapped(t).movedim(bdim, 0)  # this level's samples first
            n += 1
        else:
            t = torch._C._functorch.get_unwrapped(t)
    return (t, n) if t.device.type == "cpu" else (None, 0)


def real_token_positions(keep: torch.Tensor) -> torch.Tensor:
    """The positions of a padded batch's tokens counted from each row's first real token, as Hugging Face's
    ``generate`` (and OPT, BLOOM, TransformerLens) derive them from the mask ``keep (batch, pos)`` (True or 1: a real
    token): ``attention_mask.cumsum(-1) - 1``, int64, 0 at the padding before the first real token."""
    return (keep.long().cumsum(-1) - 1).clamp(min=0)


def _checked_attention_mask(mask, batch: int, pos: int) -> torch.Tensor:
    """The forward's ``attention_mask`` as bool ``(batch, pos)`` (True: a real token), refused unless it is a tensor
    of that shape (``(pos,)`` for one sequence) of bool, integer or floating dtype holding only 0 and 1."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"attention_mask is a {type(mask).__name__}; give a tensor (batch, pos) of 1 at real tokens and 0 at "
            "padding"
        )
    if mask.dtype.is_complex:
        raise TypeError(f"attention_mask has dtype {mask.dtype}; give bool, integer or floating 0s and 1s")
    if mask.dim() == 1 and batch == 1:
        mask = mask.unsqueeze(0)
    if tuple(mask.shape) != (batch, pos):
        want = f"({pos},) or (1, {pos})" if batch == 1 else f"({batch}, {pos})"
        raise ValueError(
            f"attention_mask has shape {tuple(mask.shape)}; give {want}, one entry per token of the input's (batch, "
            "pos)"
        )
    if mask.dtype == torch.bool:
        return mask
    values = _host_values(mask)
    if values is not None and values.numel():
        bad = (values != 0) & (values != 1)
        if bool(bad.any()):
            v = values[bad][0].item()
            raise ValueError(
                f"attention_mask contains {v!r}; give 1 at real tokens and 0 at padding (bool, integer or floating "
                "0s and 1s)"
            )
    return mask != 0


def _shaped_position_ids(position_ids, batch: int, pos: int) -> torch.Tensor:
    """The forward's ``position_ids`` as int64 ``(batch, pos)`` (a ``(pos,)`` or ``(1, pos)`` one expanded over the
    batch), refused unless an integer tensor of such a shape."""
    if not isinstance(position_ids, torch.Tensor):
        raise TypeError(
            f"position_ids is a {type(position_ids).__name__}; give an integer tensor (batch, pos) of positions"
        )
    if position_ids.dtype == torch.bool or position_ids.is_floating_point() or position_ids.is_complex():
        raise TypeError(f"position_ids has dtype {position_ids.dtype}; give integer positions (torch.int64)")
    p = position_ids
    if p.dim() == 1:
        p = p.unsqueeze(0)
    if p.dim() != 2 or p.shape[1] != pos or p.shape[0] not in (1, batch):
        raise ValueError(
            f"position_ids has shape {tuple(position_ids.shape)}; give shape ({batch}, {pos}) as the input's (batch, "
            f"pos), or ({pos},) / (1, {pos}) for positions every sequence shares"
        )
    return p.long().expand(batch, pos)


def _refuse_nothing_counted(counted: torch.Tensor, return_type: str) -> None:
    """The mean loss over no counted term (``attention_mask`` leaves no real token followed by a real one) is
    undefined: refused when the mask's values can be read."""
    values, samples = _host_values_per_sample(counted)
    if values is not None and not bool(values.reshape(*values.shape[:samples], -1).any(-1).all()):
        raise ValueError(
            f"attention_mask leaves no real token followed by a real token, so the mean next-token loss "
            f"(return_type={return_type!r}) over none is undefined; give loss_per_token=True or "
            "return_type='per_token_loss' for the per-token losses (0 where not counted)"
        )


def lm_cross_entropy(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy per position: ``(batch, pos - 1)``."""
    lp = torch.log_softmax(
        logits[:, :-1].float() if logits.dtype in (torch.float16, torch.bfloat16) else logits[:, :-1], dim=-1
    )
    return -lp.gather(-1, tokens[:, 1:, None]).squeeze(-1)


_Q_PARAMS = ("W_Q", "W_O", "b_Q")
_KV_PARAMS = ("W_K", "W_V", "b_K", "b_V")


def list_components(model: Transformer, heads: bool = True) -> list[str]:
    """Component names of ``model``: ``embed``, ``pos_embed`` (learned positions only), ``blocks.{l}.attn`` (or
    ``blocks.{l}.attn.head.{h}`` for every head when ``heads``, and ``blocks.{l}.attn.kv_head.{g}`` for shared
    key/value heads under grouped-query attention), ``blocks.{l}.mlp``, ``unembed`` (only when the
    unembedding has a weight of its own: with tied embeddings ``embed`` is both, and a bias of the unembedding's
    own is ``unembed.b_U``). With ``qk_norm="all"`` the heads
    share one query/key norm and are listed as ``blocks.{l}.attn`` only."""
    if not hasattr(model, "cfg"):
        raise TypeError(
            f"model is a {type(model).__name__} without a cfg; give pypattern's Transformer (for an unconverted "
            "Hugging Face model: pypattern.models.hf_components)"
        )
    cfg = model.cfg
    out = ["embed"] + (["pos_embed"] if cfg.positional_embedding else [])
    heads = heads and getattr(cfg, "qk_norm", False) != "all"  # heads coupled by one norm: no per-head parts
    for layer in range(cfg.n_layers):
        if heads:
            out += [f"blocks.{layer}.attn.head.{h}" for h in range(cfg.n_heads)]
            n_kv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
            if n_kv != cfg.n_heads:
                out += [f"blocks.{layer}.attn.kv_head.{g}" for g in range(n_kv)]
        else:
            out.append(f"blocks.{layer}.attn")
        if not cfg.attn_only:
            out.append(f"blocks.{layer}.mlp")
    if not getattr(cfg, "tie_word_embeddings", False):
        return out + ["unembed"]
    # tied: embed holds the weight; a bias of the unembedding's own is a component of its own (else no run samples it)
    if any(n == "unembed.b_U" for n, _ in model.named_parameters()):
        out.append("unembed.b_U")
    return out


def check_index_spelling(component: str, names) -> None:
    """Refuse a component name with an index spelled otherwise than as the model's own names spell it (a leading
    zero, ``blocks.00`` or ``head.001``, or digits of another script), naming the canonical spelling: read as an
    integer on one form of a model and as a missing parameter on another, it means nothing reliably. A name that is
    the prefix of one of ``names`` (a parameter ``blocks.00...`` of a model's own) is left alone."""
    parts = component.split(".")
    odd = [p for p in parts if re.fullmatch(r"\d+", p) and p != str(int(p))]
    if not odd or any(n == component or n.startswith(component + ".") for n in names):
        return
    canonical = ".".join(str(int(p)) if p in odd else p for p in parts)
    raise ValueError(
        f"component={component!r}: the index {'es' if len(odd) > 1 else ''}{', '.join(repr(p) for p in odd)} "
        f"{'are' if len(odd) > 1 else 'is'} not written as an integer without leading zeros, as component names "
        f"and parameter names write layer, head and expert indices; write {canonical!r}"
    )


def _norm_refusal(component: str, names) -> str | None:
    """Why ``blocks.{l}.ln1`` / ``ln2`` / ``ln1_post`` / ``ln2_post`` selects nothing, from the norms the block has
    (``names``: the model's parameter names), or None when ``component`` is no such name."""
    m = re.fullmatch(r"(blocks\.\d+)\.(ln1|ln2|ln1_post|ln2_post)", component)
    if not m:
        return None
    block = m.group(1)
    has = [
        n for n in ("ln1", "ln2", "ln1_post", "ln2_post") if any(x.startswith(f"{block}.{n}.") for x in names)
    ]
    return norm_refusal(component, block, has)


def norm_refusal(component: str, block: str, has: list[str]) -> str:
    """The message refusing the norm ``component`` of ``block`` whose norms are ``has`` (of ``ln1``, ``ln2``,
    ``ln1_post``, ``ln2_post``): the same on a converted model and on its Hugging Face original."""
    which = component.rsplit(".", 1)[1]
    named = ", ".join(f"'{block}.{n}'" for n in has)
    if which == "ln2" and has == ["ln1"]:
        why = (
            "the block has one norm, ln1, which the attention and the MLP both read (parallel attention and MLP); "
            f"'{block}.ln1' selects it"
        )
    elif which in ("ln1", "ln2") and not {"ln1", "ln2"} & set(has) and has:
        why = (
            "the block has no norm in front of the attention or the MLP; its norms are the ones after them, "
            f"{named} (ln1_post after the attention, ln2_post after the MLP)"
        )
    elif has:
        what = {"ln1": "in front of the attention", "ln2": "in front of the MLP"}.get(which)
        what = what or ("after the attention" if which == "ln1_post" else "after the MLP")
        why = f"the block has no norm {what}; its norms are {named}"
    else:
        why = "the block's norms have no parameters (or it has no norms): nothing to sample"
    return f"component={component!r} matches no parameter: {why}"


def component_masks(
    model: nn.Module, component: str, all_params: bool = False, include_shared_kv: bool = False
) -> dict[str, torch.Tensor]:
    """Boolean masks selecting one component's weights, for samplers that move only that component.

    Parameters
    ----------
    model : Transformer, any module with TransformerLens parameter names, or an unconverted Hugging Face model
        (a ``model_type`` in :data:`~pypattern.models.hf.HF_ARCHS`; then
        :func:`~pypattern.models.hf_masks.hf_component_masks`)
    component : str
        ``"blocks.{l}.attn.head.{h}"``: that head's slices of ``W_Q``, ``W_O``, ``b_Q``, and of ``W_K``, ``W_V``,
        ``b_K``, ``b_V`` when the head has a key/value head of its own. With grouped-query attention a key/value
        head ``g`` is shared by query heads ``g * n_groups .. (g + 1) * n_groups - 1``: it is then the separate
        component ``"blocks.{l}.attn.kv_head.{g}"``, so that moving a head's mask moves exactly that head's output
        and the heads, key/value heads and ``b_O`` (shared by all heads, in no head) partition the attention's
        parameters (the same rule as :func:`pypattern.models.hf_masks.hf_component_masks` on unconverted models).
        ``include_shared_kv=True`` adds the group's key/value slices to a head. ``"blocks.{l}.attn"``, ``"blocks.{l}.mlp"`` (with ``W_gate``/``b_gate``
        when gated; a mixture of experts' router and every expert), ``"blocks.{l}.mlp.expert.{e}"`` (expert ``e``'s
        slices of ``W_gate``, ``W_in``, ``W_out``), ``"blocks.{l}"``, ``"blocks.{l}.ln1"``/``"ln2"`` (the norms in
        front of the attention and the MLP; a block with one norm for both has ``ln1`` only), ``"ln1_post"``/
        ``"ln2_post"`` (sandwich norms after them), ``"embed"``, ``"pos_embed"``, ``"unembed"``
        (with tied embeddings: ``embed.W_E``, the one parameter both use, and ``unembed.b_U`` if present),
        ``"ln_final"``, or any parameter-name prefix. Indices are written as integers without leading zeros
        (``blocks.00`` is refused, naming ``blocks.0``).
    all_params : bool
        If True, the dict has every parameter (all-False masks for those outside the component); otherwise only
        parameters with at least one selected entry.
    include_shared_kv : bool
        With grouped-query attention, a head's masks also select its group's shared key/value slices (see
        ``component`` above); without grouping a head has its own and this changes nothing.

    Returns
    -------
    dict[str, torch.Tensor]
        ``{param_name: bool tensor of the parameter's shape}``.
    """
    from .hf_masks import hf_component_masks, is_hf_model

    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model is a {type(model).__name__}; give the torch.nn.Module whose parameters to mask"
        )
    if not isinstance(component, str):
        raise TypeError(
            f"component={component!r} is not valid; give a component name such as 'blocks.0.attn.head.1'"
        )

    if is_hf_model(model):  # an unconverted Hugging Face model: masks over its own (fused or split) layout
        return hf_component_masks(
            model, component, all_params=all_params, include_shared_kv=include_shared_kv
        )
    params = dict(model.named_parameters())
    check_index_spelling(component, params)
    masks: dict[str, torch.Tensor] = {}
    layer = re.match(r"blocks\.(\d+)(\.|$)", component)
    n_layers = len(getattr(model, "blocks", ()))
    if layer and n_layers and int(layer.group(1)) >= n_layers:
        raise ValueError(
            f"component={component!r}: layer {layer.group(1)} is out of range; the model has {n_layers} layers"
        )
    ex = re.fullmatch(r"(blocks\.\d+\.mlp)\.expert\.(\d+)", component)
    if ex:
        prefix, e = ex.group(1), int(ex.group(2))
        if f"{prefix}.W_router" not in params:
            raise ValueError(
                f"component={component!r}: {prefix} is not a mixture of experts (no {prefix}.W_router)"
            )
        n_exp = params[f"{prefix}.W_router"].shape[-1]
        if not 0 <= e < n_exp:
            raise ValueError(f"component={component!r}: expert {e} is out of range; the layer has {n_exp}")
        for pn in ("W_gate", "W_in", "W_out"):
            mask = torch.zeros_like(params[f"{prefix}.{pn}"], dtype=torch.bool)
            mask[e] = True
            masks[f"{prefix}.{pn}"] = mask
        if all_params:
            return {n: masks.get(n, torch.zeros_like(p, dtype=torch.bool)) for n, p in params.items()}
        return masks
    m = re.fullmatch(r"(blocks\.\d+\.attn)\.(head|kv_head)\.(\d+)", component)
    if m:
        prefix, kind, h = m.group(1), m.group(2), int(m.group(3))
        if getattr(getattr(model, "cfg", None), "qk_norm", False) == "all":
            raise ValueError(
                f"component={component!r}: qk_norm='all' normalises the query and key projections across all "
                "heads, so a head's parameters move the other heads' queries and keys too and no per-head "
                f"component exists; use '{prefix}'"
            )
        n_heads = params[f"{prefix}.W_Q"].shape[0] if f"{prefix}.W_Q" in params else None
        if n_heads is None:
            mt = getattr(getattr(model, "config", None), "model_type", None)
            hint = (
                f" ({type(model).__name__}, model_type={mt!r}: per-head masks over an unconverted Hugging Face "
                "model need its layout, known for the native adapter's families; convert the model with "
                "pypattern.from_hf and use the converted model's components)"
                if mt is not None
                else ""
            )
            raise ValueError(f"component={component!r}: the model has no parameter {prefix}.W_Q{hint}")
        n_kv = params[f"{prefix}.W_K"].shape[0] if f"{prefix}.W_K" in params else n_heads
        if kind == "kv_head" and n_kv == n_heads:
            raise ValueError(
                f"component={component!r}: the layer has no shared key/value heads (n_key_value_heads equals "
                f"n_heads = {n_heads}); each head's keys and values are part of 'blocks.{{l}}.attn.head.{{h}}'"
            )
        count = n_heads if kind == "head" else n_kv
        if not 0 <= h < count:
            raise ValueError(
                f"component={component!r}: {kind.replace('_', ' ')} {h} is out of range; the layer has {count}"
            )
        if kind == "kv_head":
            parts = ((_KV_PARAMS, h),)
        elif n_kv == n_heads or include_shared_kv:
            parts = ((_Q_PARAMS, h), (_KV_PARAMS, h // (n_heads // n_kv)))
        else:
            parts = ((_Q_PARAMS, h),)
        for names, idx in parts:
            for pn in names:
                name = f"{prefix}.{pn}"
                if name in params:
                    mask = torch.zeros_like(params[name], dtype=torch.bool)
                    mask[idx] = True
                    masks[name] = mask
    else:
        sel = [n for n in params if n == component or n.startswith(component + ".")]
        tied = isinstance(getattr(model, "unembed", None), TiedUnembed)
        if component == "unembed" and tied:
            sel = ["embed.W_E"] + sel
        if not sel and hasattr(model, "blocks") and (why := _norm_refusal(component, params)) is not None:
            raise ValueError(why)
        if not sel:
            try:
                valid = list_components(model)
            except Exception:  # a model without pypattern's layout: its parameter names
                valid = list(params)
            shown = ", ".join(repr(v) for v in valid[:8]) + (", ..." if len(valid) > 8 else "")
            mt = getattr(getattr(model, "config", None), "model_type", None)
            hf = (
                f"; {type(model).__name__} (model_type={mt!r}) is an unconverted Hugging Face model whose layout "
                "pypattern does not know: convert it with pypattern.from_hf and use the converted model's components"
                if mt is not None and not hasattr(model, "cfg")
                else ""
            )
            raise ValueError(
                f"component={component!r} matches no parameter; valid components: {shown} (or any dotted "
                f"parameter-name prefix){hf}"
            )
        masks = {n: torch.ones_like(params[n], dtype=torch.bool) for n in sel}
    if all_params:
        return {n: masks.get(n, torch.zeros_like(p, dtype=torch.bool)) for n, p in params.items()}
    return masks
