"""Pieces every family converter shares: refusing what is not converted exactly, weight layout helpers, checks."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn

from ..._training import random_in_training
from ..hooks import changes_output
from ..transformer import _ACT_FNS, Transformer, TransformerConfig

# Hugging Face activation names that are the same function under another name
_ACT_ALIASES = {
    "swish": "silu",
    "gelu_python": "gelu",
    "gelu_accurate": "gelu_new",
    "gelu_python_tanh": "gelu_pytorch_tanh",
}


class UnsupportedModelError(ValueError):
    """A model or configuration option the converter cannot map exactly into pypattern's ``Transformer``."""


def refuse(option: str, value: Any, why: str) -> None:
    """Raise :class:`UnsupportedModelError` naming ``option`` and ``value``."""
    raise UnsupportedModelError(f"{option}={value!r} is not supported: {why}")


def attn_softmax_dtype(model: nn.Module, eager_upcasts: bool) -> torch.dtype | None:
    """``TransformerConfig.attn_softmax_dtype`` that reproduces the model's attention implementation
    (``config._attn_implementation``): float32 for ``eager`` (and None, which Hugging Face dispatches to eager)
    when the family's eager attention takes its softmax in float32 (``eager_upcasts``), and for ``paged|eager``,
    which always does; None (the model's dtype) for ``sdpa`` and the rest, which take it in the model's dtype. A
    model unwrapped from a TransformerLens bridge carries the dtype the bridge's own attention takes it in."""
    if hasattr(model, "bridge_attn_softmax_dtype"):
        return model.bridge_attn_softmax_dtype
    impl = getattr(model.config, "_attn_implementation", None)
    if isinstance(impl, str) and impl.startswith("paged"):
        # outside a paged cache its forward is not the causal model (a later token moves earlier logits)
        refuse(
            "attn_implementation",
            impl,
            "the paged attention implementations compute a causal model only inside their paged cache; load "
            "the model with attn_implementation='eager' or 'sdpa'",
        )
    if impl in (None, "eager") and eager_upcasts:
        return torch.float32
    return None


# where the classes of a convertible model's modules come from: a module of another library (a LoRA layer, a
# quantized linear) computes something other than the weights the converters read
_MODULE_SOURCES = ("torch.nn.", "transformers.")


def check_plain_modules(model: nn.Module) -> None:
    """Refuse a model whose forward is not the function of the parameters the converters read: a module of
    a class from outside ``torch.nn`` and ``transformers`` (a LoRA adapter layer that adds its own low-rank
    update, a quantized linear layer), or a forward hook or pre-hook on any module."""
    from torch.nn.modules import module as _module

    glob = [k for k in ("_global_forward_hooks", "_global_forward_pre_hooks") if getattr(_module, k, None)]
    if glob:
        refuse(
            "global module hooks",
            glob,
            "torch.nn.modules.module.register_module_forward_hook / _pre_hook change every module's output; "
            "remove them before converting",
        )
    for name, m in model.named_modules():
        where = name or "(the model)"
        src = type(m).__module__ + "."
        if not src.startswith(_MODULE_SOURCES):
            refuse(
                f"module {where}",
                type(m).__module__ + "." + type(m).__qualname__,
                "its class is not torch.nn's or transformers' (an adapter such as LoRA, or a quantized layer, "
                "computes more than the weights pypattern reads); merge adapters into the weights first "
                "(peft: merge_and_unload()) and convert an unquantized model",
            )
        # accelerate's device hooks (device_map=...) wrap a module's forward on the object and keep the class's
        # as _old_forward: they move tensors between devices only
        if "forward" in vars(m) and not (hasattr(m, "_hf_hook") and hasattr(m, "_old_forward")):
            refuse(
                f"module {where}",
                "a forward of its own (set on the module object, not its class)",
                "a forward replaced on a module (as some adapters patch a layer in place) may compute more than "
                "the weights pypattern reads; restore the class's forward or merge the change into the weights "
                "first",
            )
        # pypattern's own adapters (hooked_hf) leave identity hooks while their hook points are empty
        hooks = [
            k
            for k in ("_forward_hooks", "_forward_pre_hooks")
            if any(changes_output(fn) for fn in (getattr(m, k, None) or {}).values())
        ]
        if hooks:
            refuse(
                f"module {where}",
                f"{len(getattr(m, hooks[0]))} {hooks[0][1:-1].replace('_', ' ')}(s)",
                "a forward hook changes what the module computes, and the conversion reads only its weights; "
                "remove the hooks (handle.remove()) before converting",
            )


def positive_option(option: str, value: Any, field: str) -> float:
    """``value`` (config field ``option``) as a float when it is a finite positive number, which pypattern's
    ``TransformerConfig.{field}`` takes; refuse it naming ``option`` otherwise."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    ok = (
        not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value > 0
    )
    if not ok:
        refuse(
            option,
            value,
            f"it becomes TransformerConfig.{field}, which takes a finite positive number (a zero or negative "
            "value is not converted)",
        )
    return float(value)


def act_fn(name: Any, option: str) -> str:
    """The pypattern name of the Hugging Face activation ``name`` (config field ``option``), or refuse."""
    if not isinstance(name, str):
        refuse(option, name, f"give one of {_ACT_FNS}")
    act = _ACT_ALIASES.get(name, name)
    if act not in _ACT_FNS:
        refuse(option, name, f"the activations converted exactly are {_ACT_FNS + tuple(_ACT_ALIASES)}")
    return act


def rope(
    config: Any, rotary_module: nn.Module, head_dim: int, layer_type: str | None = None
) -> tuple[float, int, torch.dtype | None, dict | None]:
    """``(rotary_base, rotary_dim, rotary_freq_dtype, rotary_scaling)`` of a model's RoPE, checked against its
    ``inv_freq`` buffer.

    Hugging Face computes the frequencies in float32 and reads the buffer in float32; a model cast with
    ``.to(torch.bfloat16)`` or ``.half()`` holds them rounded to that dtype (and keeps them rounded when cast back),
    which ``rotary_freq_dtype`` reproduces (None when they are not rounded). Converts the ``"default"``,
    ``"linear"``, ``"llama3"``, ``"yarn"``, ``"longrope"`` and ``"dynamic"`` rope types (YaRN's and
    LongRoPE's cosines and sines multiplied by the embedding's ``attention_scaling``; LongRoPE with its short
    factors and dynamic NTK with its unscaled frequencies, on sequences up to their original length;
    ``rotary_scaling`` is None for the default); refuses any ``attention_scaling`` other than 1 elsewhere. With ``layer_type`` (Gemma 3: one rotary embedding per kind of layer),
    the parameters ``rope_parameters[layer_type]`` and the buffer ``{layer_type}_inv_freq``.
    """
    from ..transformer import _ROTARY_SCALING_KEYS, _check_rotary_scaling, rotary_inv_freq

    params = getattr(config, "rope_parameters", None) or {}
    if layer_type is not None:
        params = params.get(layer_type) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type != "default" and rope_type not in _ROTARY_SCALING_KEYS:
        refuse(
            "rope_parameters['rope_type']",
            rope_type,
            f"the rotary embeddings converted exactly are {('default',) + tuple(_ROTARY_SCALING_KEYS)}",
        )
    scaling = None
    prefix = "" if layer_type is None else f"{layer_type}_"
    att = getattr(rotary_module, f"{prefix}attention_scaling", 1.0)
    if rope_type == "yarn":
        params = _yarn_params(config, params, att)
    if rope_type == "longrope":
        params = {**params, "attention_factor": _number(att)}
    if rope_type == "dynamic":  # Hugging Face scales past the config's max_position_embeddings
        n_orig = getattr(config, "max_position_embeddings", None)
        if isinstance(n_orig, bool) or not isinstance(n_orig, int) or n_orig < 1:
            refuse("max_position_embeddings", n_orig, "dynamic NTK scaling needs a positive int")
        params = {**params, "original_max_position_embeddings": n_orig}
    if rope_type != "default":
        missing = [k for k in _ROTARY_SCALING_KEYS[rope_type] if k not in params]
        if missing:
            refuse("rope_parameters", params, f"rope_type {rope_type!r} needs {missing}")
        scaling = {"rope_type": rope_type, **{k: params[k] for k in _ROTARY_SCALING_KEYS[rope_type]}}
        if rope_type == "yarn":
            scaling["truncate"] = params["truncate"]
        if rope_type == "longrope":
            if "short_factor" not in params:
                refuse("rope_parameters", params, "rope_type 'longrope' needs ['short_factor']")
            scaling["short_factor"] = params["short_factor"]
    if att != 1.0 and rope_type not in ("yarn", "longrope"):
        refuse(
            "attention_scaling of the rotary embedding",
            att,
            f"only 1.0 is converted for rope_type {rope_type!r}",
        )
    if "rope_theta" not in params:
        refuse("rope_parameters", params, "it has no 'rope_theta'")
    base = float(params["rope_theta"])
    buf = getattr(rotary_module, f"{prefix}inv_freq").detach().cpu()
    inv_freq = buf.float()
    rotary_dim = 2 * inv_freq.numel()
    if rotary_dim > head_dim:
        refuse("rotary dimensions", rotary_dim, f"more than the head dimension {head_dim}")
    try:
        if scaling is not None:
            _check_rotary_scaling(scaling, "rotary")
        mine = rotary_inv_freq(base, rotary_dim, scaling, torch.float32)
    except (ValueError, TypeError, KeyError) as e:
        refuse("rope_parameters", params, f"its values are not converted ({e})")
    # frequencies rounded by a cast of the model (.to(torch.bfloat16), .half(), possibly cast back since)
    candidates = [buf.dtype] if buf.dtype not in (torch.float32, torch.float64) else [None]
    candidates += [d for d in (None, torch.bfloat16, torch.float16) if d not in candidates]
    freq_dtype = next(
        (d for d in candidates if torch.equal(mine if d is None else mine.to(d).float(), inv_freq)), False
    )
    pf = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    if freq_dtype is False and pf is not None and int(head_dim * pf) % 2:
        refuse(
            "partial_rotary_factor",
            pf,
            f"it rotates int(head_dim * partial_rotary_factor) = int({head_dim} * {pf}) = {int(head_dim * pf)} "
            "dimensions, an odd number (the Hugging Face model then turns one more dimension than that, at "
            "frequencies of the odd count); give a factor that makes the count even",
        )
    if freq_dtype is False and rope_type == "longrope" and "long_factor" in params:
        long = rotary_inv_freq(
            base, rotary_dim, {**scaling, "short_factor": params["long_factor"]}, torch.float32
        )
        if torch.equal(long, inv_freq):
            refuse(
                "rotary inv_freq",
                "(LongRoPE long factors)",
                "the model's rotary embedding holds its long factors: Hugging Face switches to them once it has "
                "read a sequence past original_max_position_embeddings, and only the short ones are converted; "
                "run the model on a short sequence (it switches back) before converting",
            )
    if freq_dtype is False and rope_type == "dynamic":
        refuse(
            "rotary inv_freq",
            "(dynamic NTK frequencies)",
            "the model's rotary embedding holds frequencies scaled for a sequence past max_position_embeddings "
            f"({params['original_max_position_embeddings']}): Hugging Face recomputes them from the longest "
            "sequence it has read, and only the unscaled ones are converted; run the model on a short sequence "
            "(it switches back) before converting",
        )
    if freq_dtype is False:
        what = (
            "a default rotary embedding's"
            if scaling is None
            else f"a {rope_type!r}-scaled rotary embedding's"
        )
        refuse(
            "rotary inv_freq",
            "(buffer)",
            f"the model's frequencies are not 1 / {base} ** (2 i / {rotary_dim}) as {what} "
            "(in float32, or rounded to bfloat16 or float16)",
        )
    return base, rotary_dim, freq_dtype, scaling


def check_rotary_ndims(config: Any, ndims: int, rotary_dim: int, head_dim: int) -> None:
    """Refuse, naming ``partial_rotary_factor``, an attention that rotates ``ndims`` dimensions of each head when its
    rotary embedding holds ``rotary_dim / 2`` frequencies (``int(head_dim * partial_rotary_factor)`` odd: the
    embedding rounds the count up to an even one, the attention does not)."""
    if ndims == rotary_dim:
        return
    params = getattr(config, "rope_parameters", None) or {}
    pf = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    refuse(
        "partial_rotary_factor",
        pf,
        f"the attention rotates int(head_dim * partial_rotary_factor) = {ndims} dimensions of each head "
        f"(head_dim={head_dim}) while its rotary embedding holds {rotary_dim // 2} frequencies ({rotary_dim} "
        "dimensions); give a factor that makes the count even",
    )


def _yarn_params(config: Any, params: dict, attention_scaling: Any) -> dict:
    """YaRN's parameters as Hugging Face's rotary embedding reads them: ``factor`` (default
    ``max_position_embeddings / original_max_position_embeddings``), ``beta_fast`` / ``beta_slow`` (defaults 32 and
    1), ``truncate`` (read from the top level of ``rope_parameters``, default True) and the cosines' and sines'
    factor the embedding computed (``attention_scaling``, from ``mscale`` / ``mscale_all_dim`` or given)."""
    out = dict(params)
    n = params.get("original_max_position_embeddings")
    if params.get("factor") is None and n:
        out["factor"] = config.max_position_embeddings / n
    out["beta_fast"] = params.get("beta_fast") or 32
    out["beta_slow"] = params.get("beta_slow") or 1
    top = getattr(config, "rope_parameters", None) or {}
    out["truncate"] = top.get("truncate", True)
    out["attention_factor"] = _number(attention_scaling)
    return out


def _number(attention_scaling: Any) -> float:
    """The rotary embedding's ``attention_scaling`` as a float (refused when it is not a number)."""
    if isinstance(attention_scaling, torch.Tensor) and attention_scaling.numel() == 1:
        attention_scaling = attention_scaling.item()
    if isinstance(attention_scaling, bool) or not isinstance(attention_scaling, (int, float)):
        refuse("attention_scaling of the rotary embedding", attention_scaling, "a number is converted")
    return float(attention_scaling)


def layer_ropes(config: Any, rotary_module: nn.Module, head_dim: int, types: list[str]) -> dict:
    """:func:`rotary_fields` of a model whose rotary embedding may hold one set of frequencies per kind of layer
    (``{layer_type}_inv_freq`` buffers: Gemma 3, OLMo 3): ``rotary_base`` and ``rotary_scaling`` one value, or one
    per layer when the layers differ."""
    if all(hasattr(rotary_module, f"{t}_inv_freq") for t in types):
        per_type = {t: rope(config, rotary_module, head_dim, layer_type=t) for t in sorted(set(types))}
        ropes = [per_type[t] for t in types]
    else:
        ropes = [rope(config, rotary_module, head_dim)] * len(types)
    dims, freq_dtypes = {r[1] for r in ropes}, {r[2] for r in ropes}
    if len(dims) != 1:
        refuse("rotary dimensions", sorted(dims), "they differ between layers")
    if len(freq_dtypes) != 1:
        refuse("rotary inv_freq", "(buffers)", "the layers' frequencies are rounded to different dtypes")
    bases, scalings = [r[0] for r in ropes], [r[3] for r in ropes]
    return rotary_fields(
        bases[0] if len(set(bases)) == 1 else tuple(bases),
        dims.pop(),
        freq_dtypes.pop(),
        scalings[0] if len({repr(x) for x in scalings}) == 1 else tuple(scalings),
    )


def rotary_fields(base, rotary_dim: int, freq_dtype: torch.dtype | None, scaling) -> dict:
    """The :class:`TransformerConfig` fields of a rotary embedding read by :func:`rope` (angles and their cosines
    in float32, as Hugging Face computes them); no rotary positions when ``rotary_dim`` is 0."""
    return dict(
        positional_embedding_type="rotary" if rotary_dim else "none",
        rotary_dim=rotary_dim or None,
        rotary_base=base,
        rotary_dtype=torch.float32,
        rotary_freq_dtype=freq_dtype,
        rotary_scaling=scaling,
    )


def window_setting(windows: list) -> int | tuple | None:
    """``TransformerConfig.sliding_window`` from one window (or None) per layer: the window itself when every layer
    has the same, else the tuple."""
    return windows[0] if len(set(windows)) == 1 else tuple(windows)


def layer_norm(w: dict, dst: str, mod: nn.Module, eps: float, option: str) -> None:
    """Put a LayerNorm's weight and bias (zeros when it has none) into ``w`` as ``{dst}.w`` / ``{dst}.b``; refuse an
    epsilon other than the model's ``eps`` (config field ``option``)."""
    if mod.eps != eps:
        refuse(option, mod.eps, f"differs between norms ({eps} elsewhere)")
    w[f"{dst}.w"] = mod.weight
    w[f"{dst}.b"] = mod.bias if mod.bias is not None else torch.zeros_like(mod.weight)


def linear_heads(weight: torch.Tensor, n: int, d_head: int) -> torch.Tensor:
    """``nn.Linear`` weight ``(n * d_head, d_model)`` -> TransformerLens ``(n, d_model, d_head)``."""
    return weight.reshape(n, d_head, weight.shape[-1]).permute(0, 2, 1)


def linear_out_heads(weight: torch.Tensor, n: int, d_head: int) -> torch.Tensor:
    """``nn.Linear`` output weight ``(d_model, n * d_head)`` -> TransformerLens ``W_O (n, d_head, d_model)``."""
    return weight.T.reshape(n, d_head, weight.shape[0])


def bias_heads(bias: torch.Tensor | None, n: int, d_head: int) -> torch.Tensor | None:
    return None if bias is None else bias.reshape(n, d_head)


def split_qkv(a: nn.Module) -> tuple:
    """``(W_q, W_k, W_v, b_q, b_k, b_v)`` of an attention with separate ``q_proj``/``k_proj``/``v_proj``
    (``nn.Linear`` weights ``(out, in)``)."""
    return (a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.q_proj.bias, a.k_proj.bias, a.v_proj.bias)


def split_gated_mlp(m: nn.Module) -> tuple:
    """``(W_gate, W_up, W_down, b_gate, b_up, b_down)`` of a gated MLP with ``gate_proj``/``up_proj``/``down_proj``."""
    return (
        m.gate_proj.weight,
        m.up_proj.weight,
        m.down_proj.weight,
        m.gate_proj.bias,
        m.up_proj.bias,
        m.down_proj.bias,
    )


def split_fused_gate_up(m: nn.Module) -> tuple:
    """:func:`split_gated_mlp`'s tuple of an MLP with one ``gate_up_proj`` (its rows the gate's, then the up
    projection's; Phi-3, GLM) and ``down_proj``."""
    W, b = m.gate_up_proj.weight, m.gate_up_proj.bias
    n = W.shape[0] // 2
    gate_b, up_b = (None, None) if b is None else (b[:n], b[n:])
    return W[:n], W[n:], m.down_proj.weight, gate_b, up_b, m.down_proj.bias


def head_shape(model: nn.Module, qkv=split_qkv) -> tuple[nn.Module, int, int, int]:
    """``(layer 0's attention, d_head, n_heads, n_kv_heads)`` of a ``model.model.layers[i].self_attn`` decoder,
    after checking the number of layers against the config; ``qkv`` reads an attention's projections."""
    layers = model.model.layers
    if len(layers) != model.config.num_hidden_layers:
        refuse("num_hidden_layers", model.config.num_hidden_layers, f"the model holds {len(layers)} layers")
    a0 = layers[0].self_attn
    dh = a0.head_dim
    Wq, Wk = qkv(a0)[:2]
    return a0, dh, Wq.shape[0] // dh, Wk.shape[0] // dh


def standard_scaling(a0: nn.Module, dh: int, rel_tol: float = 0.0) -> None:
    """Refuse an attention whose scores' multiplier ``a0.scaling`` is not ``head_dim ** -0.5`` (within ``rel_tol``
    relative): pypattern's default ``q . k / sqrt(d_head)``."""
    if a0.scaling != dh**-0.5 and not math.isclose(a0.scaling, dh**-0.5, rel_tol=rel_tol):
        refuse("attention scaling", a0.scaling, f"expected head_dim ** -0.5 = {dh**-0.5}")


def put_qk_norms(model: nn.Module, cfg: dict, w: dict, per_head: bool) -> None:
    """Query/key RMSNorms of ``model.model.layers[i].self_attn`` (``q_norm``, ``k_norm``) into ``w``: one weight of
    ``d_head`` shared by the heads (``per_head``: Qwen3, Qwen3-MoE; ``qk_norm=True``) or one over every head's
    projection (OLMoE: ``qk_norm="all"``), each with the model's ``ln_eps``."""
    eps, dh, H, Hkv = cfg["ln_eps"], cfg["d_head"], cfg["n_heads"], cfg["n_key_value_heads"]
    for i, layer in enumerate(model.model.layers):
        a = layer.self_attn
        for which, n in (("q", H), ("k", Hkv)):
            norm = getattr(a, f"{which}_norm", None)
            size = dh if per_head else n * dh
            if norm is None or tuple(norm.weight.shape) != (size,):
                refuse(
                    f"layers[{i}].self_attn.{which}_norm",
                    None if norm is None else tuple(norm.weight.shape),
                    f"expected an RMSNorm over head_dim={dh}"
                    if per_head
                    else f"expected an RMSNorm over {size} features",
                )
            if norm.variance_epsilon != eps:
                refuse("rms_norm_eps", norm.variance_epsilon, f"differs between norms ({eps} elsewhere)")
            w[f"blocks.{i}.attn.{which}_norm.w"] = norm.weight
    cfg["qk_norm"] = True if per_head else "all"


def put_attention(w: dict, p: str, qkv: tuple, W_o: torch.Tensor, b_o, H: int, Hkv: int, dh: int) -> None:
    """Layer ``p``'s attention weights in TransformerLens layout from split projections ``qkv`` (:func:`split_qkv`'s
    tuple) and the output projection's ``nn.Linear`` weight and bias."""
    Wq, Wk, Wv, bq, bk, bv = qkv
    if W_o.shape[-1] != H * dh:
        # a model whose output projection does not read the heads' concatenation (Helium's o_proj is built
        # hidden_size -> hidden_size whatever head_dim says): Hugging Face's own forward fails on it
        refuse(
            "head_dim",
            dh,
            f"the attention's output projection reads {W_o.shape[-1]} features, not num_attention_heads * head_dim "
            f"= {H} * {dh} = {H * dh}",
        )
    w[f"{p}.attn.W_Q"] = linear_heads(Wq, H, dh)
    w[f"{p}.attn.W_K"] = linear_heads(Wk, Hkv, dh)
    w[f"{p}.attn.W_V"] = linear_heads(Wv, Hkv, dh)
    w[f"{p}.attn.b_Q"] = bias_heads(bq, H, dh)
    w[f"{p}.attn.b_K"] = bias_heads(bk, Hkv, dh)
    w[f"{p}.attn.b_V"] = bias_heads(bv, Hkv, dh)
    w[f"{p}.attn.W_O"] = linear_out_heads(W_o, H, dh)
    w[f"{p}.attn.b_O"] = b_o


def put_gated_mlp(w: dict, p: str, mlp: tuple) -> None:
    """Layer ``p``'s gated MLP from :func:`split_gated_mlp`'s tuple (gate -> ``W_gate``, up -> ``W_in``, down ->
    ``W_out``; ``nn.Linear`` layouts ``(out, in)``, or stacked ``(experts, out, in)`` for a mixture of experts); a
    tuple without a gate (``None`` for it and its bias) is a plain MLP's, which gets ``W_in`` and ``W_out`` only."""
    Wg, Wu, Wd, bg, bu, bd = mlp
    if Wg is not None:
        w[f"{p}.mlp.W_gate"], w[f"{p}.mlp.b_gate"] = Wg.transpose(-2, -1), bg
    w[f"{p}.mlp.W_in"], w[f"{p}.mlp.b_in"] = Wu.transpose(-2, -1), bu
    w[f"{p}.mlp.W_out"], w[f"{p}.mlp.b_out"] = Wd.transpose(-2, -1), bd


def put_per_head_qkv(w: dict, p: str, qkv: nn.Module, out: nn.Module, H: int, dh: int) -> None:
    """Layer ``p``'s attention from one ``nn.Linear`` ``qkv`` whose output is laid out per head, ``[h0: q k v, h1:
    q k v, ...]`` (GPT-NeoX's and BLOOM's ``query_key_value``), and the output projection ``out``."""
    d = qkv.weight.shape[-1]
    W = qkv.weight.reshape(H, 3, dh, d)  # per head: q, k, v rows
    b = None if qkv.bias is None else qkv.bias.reshape(H, 3, dh)
    for j, x in enumerate("QKV"):
        w[f"{p}.attn.W_{x}"] = W[:, j].transpose(1, 2)
        w[f"{p}.attn.b_{x}"] = None if b is None else b[:, j]
    w[f"{p}.attn.W_O"] = out.weight.T.reshape(H, dh, out.weight.shape[0])
    w[f"{p}.attn.b_O"] = out.bias


def put_mlp(w: dict, p: str, fc_in: nn.Module, fc_out: nn.Module) -> None:
    """Layer ``p``'s plain MLP from its two ``nn.Linear`` layers (``(out, in)`` weights, biases or None)."""
    w[f"{p}.mlp.W_in"], w[f"{p}.mlp.b_in"] = fc_in.weight.T, fc_in.bias
    w[f"{p}.mlp.W_out"], w[f"{p}.mlp.b_out"] = fc_out.weight.T, fc_out.bias


def split_biases(layers, out: str = "o_proj", mlp: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")):
    """``(attn_bias, attn_out_bias, mlp_bias)`` flags of decoder layers with separate q/k/v projections, the
    output projection ``out`` and the MLP projections ``mlp`` (each all present or all absent, else refused)."""
    attn = all_or_none([b for m in layers for b in split_qkv(m.self_attn)[3:]], "q/k/v projection biases")
    attn_out = all_or_none([getattr(m.self_attn, out).bias for m in layers], f"{out} biases")
    mlp_b = all_or_none([getattr(m.mlp, x).bias for m in layers for x in mlp], "MLP biases")
    return attn, attn_out, mlp_b


def sizes(c: Any, n_layers: int, H: int, Hkv: int, dh: int, d_mlp: int, emb: torch.Tensor) -> dict:
    """The size fields of a :class:`TransformerConfig` from a Hugging Face config ``c`` and the model's shapes."""
    return dict(
        n_layers=n_layers,
        d_model=c.hidden_size,
        n_heads=H,
        d_head=dh,
        n_key_value_heads=Hkv,
        d_mlp=d_mlp,
        d_vocab=emb.shape[0],
        n_ctx=c.max_position_embeddings,
    )


def unembedding(model: nn.Module) -> tuple[torch.Tensor, nn.Module, bool, torch.Tensor | None]:
    """``(embedding weight, output head, tied, head bias)`` of a causal LM."""
    emb = model.get_input_embeddings().weight
    lm = model.get_output_embeddings()
    return emb, lm, same_parameter(lm.weight, emb), getattr(lm, "bias", None)


def put_unembedding(w: dict, lm: nn.Module, tied: bool, lm_b: torch.Tensor | None) -> None:
    """``unembed.W_U`` (untied models only) and ``unembed.b_U``."""
    if not tied:
        w["unembed.W_U"] = lm.weight.T
    w["unembed.b_U"] = lm_b


def same_parameter(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when ``a`` and ``b`` are one tensor (tied weights)."""
    return a is b or (
        a.shape == b.shape
        and a.data_ptr() == b.data_ptr()
        and a.stride() == b.stride()
        and a.device == b.device
    )


def all_or_none(biases: list[torch.Tensor | None], option: str) -> bool:
    """True if every bias exists, False if none does; refuse a mixture (one flag in the converted model)."""
    present = {b is not None for b in biases}
    if len(present) > 1:
        refuse(option, "mixed", "some of these projections have a bias and others do not")
    return present == {True}


def warn_if_training(model: nn.Module) -> None:
    """Warn when a module of ``model`` is in ``train()`` mode with active dropout: the model's own forward is then
    random, and the converted model (which has no dropout) computes its ``eval()`` forward."""
    active = random_in_training(model)
    if active:
        warnings.warn(
            f"the model is in train() mode with dropout ({', '.join(active[:3])}"
            f"{', ...' if len(active) > 3 else ''}): the converted model has no dropout and equals the model's "
            "eval() forward; call model.eval() before converting to compare them",
            UserWarning,
            stacklevel=3,
        )


def model_dtype(model: nn.Module) -> torch.dtype:
    dts = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dts) != 1:
        refuse(
            "parameter dtypes", sorted(str(d) for d in dts), "give a model whose parameters share one dtype"
        )
    return dts.pop()


#: ``attn_softmax_dtype`` of an eager attention that multiplies queries and keys in float32 and adds its mask in the
#: model's dtype (GPT-J, GPT-Neo): the softmax runs in float32 or the model's dtype, whichever is wider. :func:`build`
#: resolves it with the converted model's dtype (a float32 model converted to float64 computes what the model
#: cast with ``.double()`` does)
SOFTMAX_FLOAT32_OR_WIDER = "float32 or the model's dtype, whichever is wider"


def build(
    cfg_kwargs: dict, weights: dict[str, torch.Tensor | None], dtype: torch.dtype, source: dict
) -> Transformer:
    """A :class:`Transformer` of ``cfg_kwargs`` (plus ``dtype``) with exactly ``weights`` loaded.

    ``weights`` maps every parameter name of the new model to its tensor (None entries are skipped and must not
    be parameters); a missing or surplus name is an error in the converter, reported as such."""
    if cfg_kwargs.get("attn_softmax_dtype") == SOFTMAX_FLOAT32_OR_WIDER:
        cfg_kwargs = {**cfg_kwargs, "attn_softmax_dtype": torch.promote_types(torch.float32, dtype)}
    cfg = TransformerConfig(**cfg_kwargs, dtype=dtype, seed=None, extra={"converted_from": source})
    with torch.device("meta"):
        model = Transformer(cfg)
    weights = {k: v for k, v in weights.items() if v is not None}
    names = {n for n, _ in model.named_parameters()}
    if set(weights) != names:
        raise RuntimeError(
            f"converter for {source.get('class')}: weights for {sorted(set(weights) - names)} have no parameter; "
            f"parameters {sorted(names - set(weights))} got no weight"
        )
    W_U = weights.get("unembed.W_U")
    if W_U is not None and W_U.shape[-1] != cfg.d_vocab:
        raise UnsupportedModelError(
            f"model class {source.get('class')!r}: its output head scores {W_U.shape[-1]} tokens but its input "
            f"embedding holds {cfg.d_vocab}; pypattern's model has one vocabulary for both (a head or an "
            "embedding resized or replaced on its own is not converted: resize both, e.g. with "
            "resize_token_embeddings)"
        )
    state = {}
    for n, p in model.named_parameters():
        w = weights[n].detach()
        if tuple(w.shape) != tuple(p.shape):
            raise RuntimeError(
                f"converter for {source.get('class')}: {n} has shape {tuple(w.shape)}, expected {tuple(p.shape)}"
            )
        state[n] = w.to(dtype=dtype).contiguous().clone()
    model.load_state_dict(state, strict=True, assign=True)
    return model
