"""Mixtures of experts (``MixtralForCausalLM``, ``OlmoeForCausalLM``, ``Qwen2MoeForCausalLM``,
``Qwen3MoeForCausalLM``) -> pypattern ``Transformer`` with ``TransformerConfig.n_experts``.

Llama's attention and norms (see :mod:`.llama`; Qwen3-MoE with Qwen3's per-head query/key norms and, with
``use_sliding_window``, one window in every layer, Qwen2-MoE with Qwen2's q/k/v biases and per-layer windows and a
gated shared expert (``moe_shared_d_mlp``; none when its width is 0), OLMoE with one
query/key norm across all heads, ``qk_norm="all"``; its ``clip_qkv``, applied after the
norms, is refused) and, in every layer,
a sparse block: the router ``mlp.gate.weight`` ``(n_experts, d_model)`` becomes ``mlp.W_router`` (transposed), the
experts' stacked ``gate_up_proj`` ``(n_experts, 2 d_mlp, d_model)`` (gate rows first) and ``down_proj``
``(n_experts, d_model, d_mlp)`` become ``W_gate``, ``W_in`` and ``W_out``. The routing follows each family's
router: softmax of the logits in float32, top ``num_experts_per_tok``, renormalised (Mixtral always; OLMoE and
Qwen3-MoE per ``norm_topk_prob``), the weights kept in float32 for the product (Mixtral) or cast to the model's
dtype. Layers that are dense in a model mixing dense and sparse MLPs (``mlp_only_layers``,
``decoder_sparse_step``) are refused by name.
"""

from __future__ import annotations

from torch import nn

from ._common import put_qk_norms, refuse
from .llama import llama_like
from .qwen2 import layer_windows

CLASSES = ("MixtralForCausalLM", "OlmoeForCausalLM", "Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM")


def _experts(m: nn.Module) -> tuple:
    """:func:`~._common.split_gated_mlp`'s tuple for a sparse block: ``(W_gate, W_up, W_down)`` stacked over the
    experts (``(n_experts, out, in)``), no biases."""
    ex = getattr(m, "experts", None)
    gu, down = getattr(ex, "gate_up_proj", None), getattr(ex, "down_proj", None)
    if not isinstance(gu, nn.Parameter) or not isinstance(down, nn.Parameter) or gu.dim() != 3:
        refuse(
            "mlp",
            type(m).__name__,
            "a sparse block with stacked experts (experts.gate_up_proj, experts.down_proj)",
        )
    if getattr(ex, "has_bias", False) or getattr(ex, "gate_up_proj_bias", None) is not None:
        refuse("experts' biases", True, "experts without biases are converted")
    d_mlp = gu.shape[1] // 2
    return gu[:, :d_mlp], gu[:, d_mlp:], down, None, None, None


def convert(model: nn.Module) -> tuple[dict, dict]:
    """``(config kwargs, weights by pypattern name)`` of a Mixtral, OLMoE, Qwen2-MoE or Qwen3-MoE causal LM."""
    c = model.config
    kind = type(model).__name__
    layers = model.model.layers
    for i, layer in enumerate(layers):
        if not hasattr(getattr(layer.mlp, "experts", None), "gate_up_proj"):
            refuse(
                f"layers[{i}].mlp",
                type(layer.mlp).__name__,
                "a dense MLP among sparse ones (mlp_only_layers / decoder_sparse_step) is not converted",
            )
    if kind == "MixtralForCausalLM":
        cfg, w = llama_like(model, sliding_window=getattr(c, "sliding_window", None), mlp=_experts)
        k, renorm, f32 = c.num_experts_per_tok, True, True
    elif kind == "Qwen2MoeForCausalLM":  # Qwen2's attention (q/k/v biases), a gated shared expert
        cfg, w = llama_like(model, sliding_window=layer_windows(model), mlp=_experts)
        k, renorm, f32 = c.num_experts_per_tok, bool(c.norm_topk_prob), False
        _shared_experts(model, cfg, w)
    elif kind == "Qwen3MoeForCausalLM":
        cfg, w = llama_like(model, sliding_window=_qwen3_moe_windows(model), mlp=_experts)
        put_qk_norms(model, cfg, w, per_head=True)
        k, renorm, f32 = c.num_experts_per_tok, bool(c.norm_topk_prob), False
    else:  # OLMoE
        cfg, w = llama_like(model, mlp=_experts)
        put_qk_norms(model, cfg, w, per_head=False)
        if getattr(c, "clip_qkv", None) is not None:
            refuse(
                "clip_qkv",
                c.clip_qkv,
                "OLMoE clamps queries and keys after their norms (pypattern's clip_qkv clamps the projections "
                "before them); the released OLMoE checkpoints set none",
            )
        k, renorm, f32 = c.num_experts_per_tok, bool(c.norm_topk_prob), False
    E = None
    for i, layer in enumerate(layers):
        gate = layer.mlp.gate
        if getattr(gate, "top_k", k) != k:
            refuse(f"layers[{i}].mlp.gate.top_k", gate.top_k, f"the config says num_experts_per_tok={k}")
        if getattr(layer.mlp, "jitter_noise", 0) and model.training:
            refuse("router_jitter_noise", layer.mlp.jitter_noise, "converted in eval() only")
        E = gate.weight.shape[0] if E is None else E
        w[f"blocks.{i}.mlp.W_router"] = gate.weight.T
    cfg.update(n_experts=E, experts_per_token=int(k), moe_renormalize=renorm, moe_float32_weights=f32)
    return cfg, w


def _qwen3_moe_windows(model: nn.Module) -> list:
    """The sliding window of each of a Qwen3-MoE model's layers: its config has no ``layer_types`` (and its
    ``max_window_layers`` is unused), and every layer reads ``config.sliding_window``, which the config sets to None
    unless ``use_sliding_window``; a config class that declares ``layer_types`` is read as Qwen2's (a ``layer_types``
    given to a class that does not declare it is unused by the model)."""
    c = model.config
    # a layer_types its config class does not declare (passed as an extra keyword) is unused by the model
    declared = "layer_types" in (getattr(type(c), "__dataclass_fields__", None) or {})
    if declared and getattr(c, "layer_types", None):
        return layer_windows(model)
    sw = c.sliding_window
    if sw is not None and (not isinstance(sw, int) or isinstance(sw, bool) or sw < 1):
        refuse("sliding_window", sw, "a positive window (with use_sliding_window) or None is converted")
    return [sw] * len(model.model.layers)


def _shared_experts(model: nn.Module, cfg: dict, w: dict) -> None:
    """Qwen2-MoE's shared expert of every layer (``mlp.shared_expert``, a gated MLP without biases) and its
    per-token gate ``sigmoid(mlp.shared_expert_gate(x))``. A shared expert of width 0
    (``shared_expert_intermediate_size=0``) adds zero: the converted model has none."""
    width = None
    shared: dict = {}
    for i, layer in enumerate(model.model.layers):
        sh, gate = getattr(layer.mlp, "shared_expert", None), getattr(layer.mlp, "shared_expert_gate", None)
        if sh is None or gate is None:
            refuse(f"layers[{i}].mlp.shared_expert", None, "Qwen2-MoE's blocks have a gated shared expert")
        if (
            any(getattr(sh, n).bias is not None for n in ("gate_proj", "up_proj", "down_proj"))
            or gate.bias is not None
        ):
            refuse(f"layers[{i}].mlp.shared_expert", "biases", "a shared expert without biases is converted")
        m = sh.up_proj.weight.shape[0]
        if width not in (None, m):
            refuse("shared_expert_intermediate_size", m, f"differs between layers ({width} in layer 0)")
        width = m
        p = f"blocks.{i}.mlp"
        shared[f"{p}.W_shared_gate"] = sh.gate_proj.weight.T
        shared[f"{p}.W_shared_in"] = sh.up_proj.weight.T
        shared[f"{p}.W_shared_out"] = sh.down_proj.weight.T
        shared[f"{p}.W_shared_router"] = gate.weight.T
    if width == 0:  # its down projection reads no dimension: sigmoid(gate) * 0
        cfg["moe_shared_d_mlp"] = None
        return
    w.update(shared)
    cfg["moe_shared_d_mlp"] = width
