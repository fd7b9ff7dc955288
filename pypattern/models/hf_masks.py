"""Component masks over a Hugging Face causal LM's own parameters (per head, per MLP, embeddings).

A component mask selects the entries of the model's parameters that belong to one component, so that a sampler
can move only that component (susceptibilities, LLC of a head). Each supported family stores attention weights
in its own layout; the masks follow the installed ``transformers`` modelling code:

* **GPT-2** (``Conv1D``, ``y = x @ W + b``): ``attn.c_attn.weight`` ``(d_model, 3 d_model)`` holds the columns
  ``[q | k | v]``, each split by head (``q`` of head ``h`` = columns ``h*d_head : (h+1)*d_head``, ``k`` the same
  plus ``d_model``, ``v`` plus ``2 d_model``), ``c_attn.bias`` likewise; ``attn.c_proj.weight`` ``(d_model,
  d_model)``: the rows ``h*d_head : (h+1)*d_head`` read head ``h``'s output.
* **GPT-NeoX / Pythia** (``nn.Linear``, ``y = x @ W.T + b``): ``attention.query_key_value.weight``
  ``(3 d_model, d_model)`` is reshaped to ``(n_heads, 3 d_head)`` per position, so head ``h`` owns the rows
  ``3 h d_head : 3 (h+1) d_head`` (its ``q``, ``k``, ``v`` one after the other), bias likewise;
  ``attention.dense.weight`` ``(d_model, d_model)``: the columns ``h*d_head : (h+1)*d_head``.
* **Llama, Mistral, Qwen2, Qwen3, Gemma, OLMo, StableLM, Phi, GPT-J, Cohere** (split ``nn.Linear``; Phi's output
  projection is ``dense``, GPT-J's ``out_proj``): ``q_proj`` rows ``h*d_head : (h+1)*d_head`` (bias too, where present), ``o_proj`` columns ``h*d_head : (h+1)*d_head``; ``k_proj`` /
  ``v_proj`` rows ``g*d_head : (g+1)*d_head`` of the key/value head ``g = h // (n_heads // n_kv_heads)``.
  StableLM's per-head norms (``qk_layernorm``: ``q_layernorm.norms.{h}``, ``k_layernorm.norms.{g}``) belong to
  their head and key/value head. Qwen3's and Gemma 3's ``q_norm`` / ``k_norm`` weights, and Phi's
  ``q_layernorm`` / ``k_layernorm`` (``qk_layernorm``: one LayerNorm over ``d_head``), are shared by every head
  and belong to no head; OLMo 2
  and 3 normalise the projections across all heads, and have no per-head components. Cohere's ``q_norm`` /
  ``k_norm`` (``use_qk_norm``: a LayerNorm per head over ``d_head``, weights ``(n_heads, d_head)`` and
  ``(n_kv_heads, d_head)``) give head ``h`` its row ``h`` and key/value head ``g`` its row ``g``.
* **GPT-Neo**: Llama's split projections under ``attn.attention``, ``out_proj`` for ``o_proj`` (no q/k/v biases).
* **Phi-3** (fused ``qkv_proj``, rows: all query heads, then all key heads, then all value heads): the query rows
  ``h*d_head : (h+1)*d_head``, the key and value rows of its key/value head ``g`` at ``n_heads*d_head +
  g*d_head`` and ``(n_heads + n_kv_heads)*d_head + g*d_head``, ``o_proj`` columns as Llama's.
* **GPT-BigCode** (``nn.Linear`` ``attn.c_attn``): multi-query, the rows ``[every query head | the key head | the
  value head]`` (head ``h``: rows ``h*d_head : (h+1)*d_head``; the key and value rows are the one key/value head);
  otherwise GPT-NeoX's per-head blocks ``3 h d_head : 3 (h+1) d_head``; ``attn.c_proj`` columns
  ``h*d_head : (h+1)*d_head``.

* **OPT** (split ``nn.Linear`` with biases under ``model.decoder.layers``): Llama's layout, ``out_proj`` for
  ``o_proj``; ``blocks.{l}.mlp`` is the layer's ``fc1`` and ``fc2``, ``ln1`` / ``ln2`` its ``self_attn_layer_norm``
  / ``final_layer_norm``.
* **BLOOM** (``self_attention.query_key_value`` ``(3 d_model, d_model)``, its rows ``(n_heads, 3, d_head)``): GPT-NeoX's
  per-head blocks, head ``h`` the rows ``3 h d_head : 3 (h+1) d_head``; ``self_attention.dense`` columns
  ``h*d_head : (h+1)*d_head``. ``embed`` is the word embeddings with the LayerNorm on them
  (``word_embeddings_layernorm``), as on the converted model.
* **Falcon** (``self_attention.query_key_value``, ``self_attention.dense``), three layouts of the fused rows: with
  ``new_decoder_architecture`` grouped, ``(n_kv_heads, n_heads // n_kv_heads + 2, d_head)`` (each key/value group's
  query heads, then its key, then its value: head ``h`` of group ``g = h // group`` the rows
  ``(g (group + 2) + h % group) d_head`` on, the key/value head ``g`` the ``2 d_head`` rows from
  ``(g (group + 2) + group) d_head``); otherwise with ``multi_query`` GPT-BigCode's multi-query rows ``[every query
  head | the key head | the value head]``; otherwise GPT-NeoX's per-head blocks. ``ln1`` / ``ln2`` are ``ln_attn`` /
  ``ln_mlp`` where the layer has them, else ``input_layernorm`` / ``post_attention_layernorm`` (a parallel block
  with one norm has ``ln1`` only).

* **Mixtures of experts** (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE): the attention as Llama's (OLMoE normalises
  queries and keys across all heads, as OLMo 2, and has no per-head components); ``blocks.{l}.mlp`` is the whole
  sparse block (router, experts, any shared expert) and ``blocks.{l}.mlp.expert.{e}`` entry ``e`` of the first axis
  of the stacked expert weights (``mlp.experts.gate_up_proj``, ``mlp.experts.down_proj``).

What a head owns under grouped-query attention
----------------------------------------------
With ``n_kv_heads == n_heads`` (GPT-2, GPT-NeoX, multi-head Llama) a head owns its query, key and value slices and
its slice of the output projection, as in TransformerLens and pypattern's ``Transformer``. With
``n_kv_heads < n_heads`` a key/value head is shared by ``n_heads // n_kv_heads`` query heads, so moving it moves
all of them: by default ``blocks.{l}.attn.head.{h}`` is then the query slice and the output-projection slice of
head ``h`` only (moving it moves exactly head ``h``'s output), and the shared key/value slices are the separate
component ``blocks.{l}.attn.kv_head.{g}``. ``include_shared_kv=True`` adds the group's key/value slices to the
head (moving it then moves every head of the group). The heads, the key/value heads and the output bias (shared
by all heads, in no head) partition the attention's parameters. pypattern's ``Transformer`` (and so every
converted model) follows the same rule (:func:`pypattern.models.component_masks`).

Tied embeddings (GPT-2, Qwen2/Llama with ``tie_word_embeddings``): ``embed`` and ``unembed`` are one parameter,
and each selects all of it; :func:`hf_components` lists ``embed`` only, as pypattern's ``list_components`` does.
Any other tied parameter (one tensor held by two modules, a projection shared between layers, say) is named once,
by its first name in ``named_parameters()``, and belongs whole to every module holding it (``blocks.{l}.attn``,
``blocks.{l}.mlp``, a parameter-name prefix): moving it moves them all. A head or key/value head whose projection
is tied is refused, naming the tie, since no mask then moves that head alone.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch
from torch import nn

from .hf import HF_ARCHS, HFArch, HookedHF, hf_arch, unwrap_hf
from .transformer import check_index_spelling, norm_refusal

__all__ = ["hf_component_masks", "hf_components", "hf_attention_shape", "is_hf_model"]


# families whose parameters are masked here although the native adapter (HookedHF) does not run them
_MASK_ARCHS: dict[str, HFArch] = {
    "opt": HFArch(
        "opt",
        "model.decoder",
        "embed_tokens",
        "embed_positions",
        "layers",
        "self_attn",
        "fc1",  # with fc2: the MLP is two modules of the layer (_MORE_MODULES)
        "self_attn_layer_norm",
        "final_layer_norm",
        "final_layer_norm",
        "split",
        "",
        "out_proj",
    ),
    "bloom": HFArch(
        "bloom",
        "transformer",
        "word_embeddings",
        None,
        "h",
        "self_attention",
        "mlp",
        "input_layernorm",
        "post_attention_layernorm",
        "ln_f",
        "bloom",
        "",
        "dense",
    ),
    "falcon": HFArch(
        "falcon",
        "transformer",
        "word_embeddings",
        None,
        "h",
        "self_attention",
        "mlp",
        "input_layernorm",
        "post_attention_layernorm",
        "ln_f",
        "falcon",
        "",
        "dense",
        parallel_residual="parallel_attn",
    ),
}  # fmt: skip
# a component held as several sibling modules: OPT's MLP (the layer's fc1 and fc2), BLOOM's embedding (the word
# embeddings and the LayerNorm on them, as the converted model's ``embed``)
_MORE_MODULES = {
    ("opt", "mlp"): ("fc1", "fc2"),
    ("bloom", "embed"): ("word_embeddings", "word_embeddings_layernorm"),
}


def _arch(hf: nn.Module) -> HFArch:
    """The layout of ``hf``: :func:`~pypattern.models.hf.hf_arch`, or one of the families masked here only."""
    mt = getattr(getattr(hf, "config", None), "model_type", None)
    arch = _MASK_ARCHS.get(mt) if mt not in HF_ARCHS else None
    if arch is None:
        # masks need the layout inside the layers: a family known by its residual stream alone is refused
        return hf_arch(hf, generic=False)
    if not hasattr(hf, arch.base.split(".")[0]) or hf.get_output_embeddings() is None:
        raise ValueError(
            f"{type(hf).__name__} has no sub-module {arch.base!r} or no language-model head: give the causal LM "
            "with its output head (e.g. AutoModelForCausalLM), not the base model"
        )
    if mt == "falcon":  # the parallel block of the new architecture: one norm per branch (ln_attn, ln_mlp)
        layer0 = hf.get_submodule(f"{arch.base}.{arch.layers}")[0]
        if isinstance(getattr(layer0, "ln_attn", None), nn.Module):
            arch = dataclasses.replace(arch, ln1="ln_attn", ln2="ln_mlp")
    return arch


def is_hf_model(model: nn.Module) -> bool:
    """True for a :class:`~pypattern.models.hf.HookedHF` or a model whose ``config.model_type`` is supported (also
    inside a wrapper :func:`~pypattern.models.hf.unwrap_hf` follows: ``nn.DataParallel``, a PEFT-style wrapper),
    by the native adapter or by the masks here (OPT, BLOOM, Falcon)."""
    if isinstance(model, HookedHF):
        return True
    model, _ = unwrap_hf(model, check=False)
    mt = getattr(getattr(model, "config", None), "model_type", None)
    return mt in HF_ARCHS or mt in _MASK_ARCHS


def _unwrap(model: nn.Module) -> tuple[nn.Module, str]:
    """The Hugging Face model and the prefix of its parameter names inside ``model`` (a :class:`HookedHF`, a
    ``torch.compile`` wrapper, whose parameters are named ``_orig_mod.*``, ``nn.DataParallel`` (``module.*``), a
    PEFT-style wrapper (``base_model.*``): see :func:`~pypattern.models.hf.unwrap_hf`)."""
    inner = getattr(model, "_orig_mod", None)
    if isinstance(inner, nn.Module) and type(model).__name__ == "OptimizedModule":
        hf, prefix = _unwrap(inner)
        return hf, "_orig_mod." + prefix
    if isinstance(model, HookedHF):
        return model.hf_model, "module.model."
    inner, prefix = unwrap_hf(model)
    if isinstance(inner, HookedHF):  # a wrapper of the adapter (nn.DataParallel(hooked_hf(model)))
        hf, more = _unwrap(inner)
        return hf, prefix + more
    return inner, prefix


def _attn_path(arch, layer: int) -> str:
    """Path (in the Hugging Face model) of the module holding layer ``layer``'s attention projections."""
    a = f"{arch.base}.{arch.layers}.{layer}.{arch.attn}"
    return f"{a}.{arch.proj}" if arch.proj else a


def hf_attention_shape(model: nn.Module, layer: int = 0) -> tuple[int, int, int]:
    """``(n_heads, n_kv_heads, d_head)`` of layer ``layer``'s attention, read from its modules."""
    hf, _ = _unwrap(model)
    arch = _arch(hf)
    cfg = hf.config
    attn = hf.get_submodule(_attn_path(arch, layer))
    # head counts from the projections' shapes (a config edited after the model was built does not change them)
    if arch.qkv == "gpt2":  # Conv1D c_attn (d_model, 3 n_heads d_head)
        dh = int(attn.head_dim)
        n = _heads(attn.c_attn.weight.shape[1], 3 * dh, cfg)
        return n, n, dh
    if arch.qkv == "neox":  # query_key_value (3 n_heads d_head, d_model)
        dh = int(attn.head_size)
        n = _heads(attn.query_key_value.weight.shape[0], 3 * dh, cfg)
        return n, n, dh
    if arch.qkv == "bloom":  # query_key_value (n_heads * 3 * d_head, d_model)
        dh = int(attn.head_dim)
        n = _heads(attn.query_key_value.weight.shape[0], 3 * dh, cfg)
        return n, n, dh
    if arch.qkv == "falcon":
        dh, rows = int(attn.head_dim), attn.query_key_value.weight.shape[0]
        if attn.new_decoder_architecture:  # (n_heads + 2 n_kv) d_head rows, grouped
            n_kv = int(attn.num_kv_heads)
            return _heads(rows - 2 * n_kv * dh, dh, cfg), n_kv, dh
        if attn.multi_query:  # [every query head | key | value]
            return _heads(rows - 2 * dh, dh, cfg), 1, dh
        n = _heads(rows, 3 * dh, cfg)
        return n, n, dh
    if arch.qkv == "bigcode":  # c_attn rows: (n_heads + 2 n_kv) d_head
        dh, n_kv = int(attn.head_dim), int(attn.kv_heads)
        rows = attn.c_attn.weight.shape[0]
        n = _heads(rows, 3 * dh, cfg) if not attn.multi_query else _heads(rows - 2 * dh, dh, cfg)
        return n, (n if not attn.multi_query else n_kv), dh
    d_head = int(attn.head_dim)
    if arch.qkv == "phi3":  # qkv_proj rows: (n_heads + 2 n_kv) d_head
        n_kv = int(attn.num_key_value_heads)
        return _heads(attn.qkv_proj.weight.shape[0] - 2 * n_kv * d_head, d_head, cfg), n_kv, d_head
    n_kv = int(attn.k_proj.out_features) // d_head
    return _heads(attn.q_proj.out_features, d_head, cfg), n_kv, d_head


def _heads(width: int, per_head: int, cfg) -> int:
    """The number of heads whose projections fill ``width`` rows or columns of ``per_head`` each."""
    if per_head <= 0 or width % per_head:
        raise ValueError(
            f"the attention's projections ({width} wide) do not split into heads of {per_head} "
            f"(config num_attention_heads={getattr(cfg, 'num_attention_heads', None)})"
        )
    return int(width) // per_head


def hf_components(model: nn.Module, heads: bool = True) -> list[str]:
    """Component names of a supported Hugging Face causal LM (see :func:`hf_component_masks`)."""
    hf, _ = _unwrap(model)
    arch = _arch(hf)
    out = ["embed"] + (["pos_embed"] if arch.pos_embed else [])
    heads = heads and not arch.heads_coupled  # heads coupled by one query/key norm: no per-head components
    n_layers = len(hf.get_submodule(f"{arch.base}.{arch.layers}"))
    for layer in range(n_layers):
        if heads:
            n_heads, n_kv, _ = hf_attention_shape(hf, layer)
            out += [f"blocks.{layer}.attn.head.{h}" for h in range(n_heads)]
            if n_kv < n_heads:
                out += [f"blocks.{layer}.attn.kv_head.{g}" for g in range(n_kv)]
        else:
            out.append(f"blocks.{layer}.attn")
        out.append(f"blocks.{layer}.mlp")
    # as pypattern's list_components: "unembed" only when the output head has a weight of its own (tied
    # embeddings: "embed" is both)
    head = hf.get_output_embeddings()
    tied = head is not None and getattr(head, "weight", None) is hf.get_input_embeddings().weight
    return out + ([] if tied else ["unembed"])


def _module_prefix(hf: nn.Module, arch: HFArch, component: str) -> str | None:
    """Parameter-name prefix (in ``hf``) of a whole-module component, or None when the name is not one."""
    b = arch.base
    fixed = {"embed": f"{b}.{arch.embed}", "ln_final": f"{b}.{arch.ln_final}"}
    if arch.pos_embed:
        fixed["pos_embed"] = f"{b}.{arch.pos_embed}"
    if component in fixed:
        return fixed[component]
    m = re.fullmatch(r"blocks\.(\d+)(?:\.(attn|mlp|ln1|ln2|ln1_post|ln2_post))?", component)
    if m:
        part = m.group(2)
        sub = (
            None
            if part is None
            else {"attn": arch.attn, "mlp": arch.mlp}.get(part, getattr(arch, part, None))
        )
        path = f"{b}.{arch.layers}.{m.group(1)}"
        # a layer out of range is said so by the caller
        layer_there = _has_module(hf, f"{b}.{arch.layers}", m.group(1))
        if part is not None and part.startswith("ln") and layer_there and not _has_module(hf, path, sub):
            # as the converted model: ln2 of a block with one norm (Phi-1/2, GPT-J, StableLM with a parallel
            # residual), ln1 / ln2 of OLMo 2's, which has norms only after the attention and the MLP (ln1_post /
            # ln2_post), are refused, naming the block's norms
            has = [
                n for n in ("ln1", "ln2", "ln1_post", "ln2_post") if _has_module(hf, path, getattr(arch, n))
            ]
            raise ValueError(norm_refusal(component, f"blocks.{m.group(1)}", has))
        return path if sub is None else f"{path}.{sub}"
    return None


def _has_module(hf: nn.Module, path: str, sub: str | None) -> bool:
    """Whether the layer at ``path`` has the module ``sub`` (None: the family has no such module)."""
    if sub is None:
        return False
    try:
        return isinstance(hf.get_submodule(f"{path}.{sub}"), nn.Module)
    except AttributeError:  # an absent module (StableLM's post_attention_layernorm under a parallel residual)
        return False


def _head_slices(
    hf: nn.Module, arch: HFArch, layer: int, head: int, kind: str, include_shared_kv: bool
) -> dict[str, tuple[int, slice]]:
    """Parameter name (in ``hf``) -> (axis, index range) of one head (``kind="head"``) or kv head (``"kv"``)."""
    n_heads, n_kv, dh = hf_attention_shape(hf, layer)
    a, o = _attn_path(arch, layer), arch.out_proj
    limit = n_heads if kind == "head" else n_kv
    if not 0 <= head < limit:
        what = "heads" if kind == "head" else "key/value heads"
        raise ValueError(
            f"component=blocks.{layer}.attn.{'head' if kind == 'head' else 'kv_head'}.{head}: out of range; "
            f"layer {layer} has {limit} {what}"
        )
    if kind == "kv" and n_kv == n_heads:
        raise ValueError(
            f"component=blocks.{layer}.attn.kv_head.{head}: the model has no shared key/value heads "
            f"(n_kv_heads == n_heads == {n_heads}); a head's keys and values belong to blocks.{layer}.attn.head.{head}"
        )
    own = slice(head * dh, (head + 1) * dh)
    out: dict[str, tuple[int, Any]] = {}
    if arch.qkv == "gpt2":
        d = n_heads * dh
        cols = torch.cat([torch.arange(own.start, own.stop) + i * d for i in range(3)])
        out[f"{a}.c_attn.weight"] = (1, cols)
        out[f"{a}.c_attn.bias"] = (0, cols)
        out[f"{a}.c_proj.weight"] = (0, own)
    elif arch.qkv in ("neox", "bloom") or (
        arch.qkv == "falcon" and not _falcon_fused_kv(hf.get_submodule(a))
    ):  # rows (n_heads, 3, d_head): head h's [q_h, k_h, v_h], head after head
        rows = slice(3 * head * dh, 3 * (head + 1) * dh)
        out[f"{a}.query_key_value.weight"] = (0, rows)
        out[f"{a}.query_key_value.bias"] = (0, rows)
        out[f"{a}.dense.weight"] = (1, own)
    elif arch.qkv == "falcon":
        group = n_heads // n_kv
        kv = head // group if kind == "head" else head
        if hf.get_submodule(a).new_decoder_architecture:  # rows (n_kv, group + 2, d_head)
            q0, k0 = (kv * (group + 2) + head % group) * dh, (kv * (group + 2) + group) * dh
        else:  # multi-query: rows [every query head | the key head | the value head]
            q0, k0 = head * dh, n_heads * dh
        parts = [torch.arange(q0, q0 + dh)] if kind == "head" else []
        if kind == "kv" or n_kv == n_heads or include_shared_kv:
            parts += [torch.arange(k0, k0 + 2 * dh)]
        out[f"{a}.query_key_value.weight"] = (0, torch.cat(parts))
        out[f"{a}.query_key_value.bias"] = (0, torch.cat(parts))
        if kind == "head":
            out[f"{a}.dense.weight"] = (1, own)
    elif arch.qkv == "bigcode" and n_kv == n_heads:  # c_attn rows: head h's [q_h, k_h, v_h], head after head
        rows = slice(3 * head * dh, 3 * (head + 1) * dh)
        out[f"{a}.c_attn.weight"] = (0, rows)
        out[f"{a}.c_attn.bias"] = (0, rows)
        out[f"{a}.c_proj.weight"] = (1, own)
    elif arch.qkv == "bigcode":  # multi-query: c_attn rows [every query head, the key head, the value head]
        parts = [torch.arange(own.start, own.stop)] if kind == "head" else []
        if kind == "kv" or include_shared_kv:
            k0 = n_heads * dh
            parts += [torch.arange(k0, k0 + 2 * dh)]
        out[f"{a}.c_attn.weight"] = (0, torch.cat(parts))
        out[f"{a}.c_attn.bias"] = (0, torch.cat(parts))
        if kind == "head":
            out[f"{a}.c_proj.weight"] = (1, own)
    elif arch.qkv == "phi3":  # qkv_proj rows: every query head, then every key head, then every value head
        group = n_heads // n_kv
        kv = head // group if kind == "head" else head
        parts = [torch.arange(own.start, own.stop)] if kind == "head" else []
        if kind == "kv" or n_kv == n_heads or include_shared_kv:
            k0 = n_heads * dh + kv * dh
            parts += [torch.arange(k0, k0 + dh), torch.arange(k0 + n_kv * dh, k0 + n_kv * dh + dh)]
        out[f"{a}.qkv_proj.weight"] = (0, torch.cat(parts))
        out[f"{a}.qkv_proj.bias"] = (0, torch.cat(parts))
        if kind == "head":
            out[f"{a}.{o}.weight"] = (1, own)
    else:
        group = n_heads // n_kv
        if kind == "head":
            out[f"{a}.q_proj.weight"] = (0, own)
            out[f"{a}.q_proj.bias"] = (0, own)
            out[f"{a}.{o}.weight"] = (1, own)
            kv = head // group
        else:
            kv = head
        if kind == "head":  # StableLM's per-head query norms (qk_layernorm): head h's own LayerNorm
            for p in ("weight", "bias"):
                out[f"{a}.q_layernorm.norms.{head}.{p}"] = (0, None)
        # Cohere's query/key norms (use_qk_norm) hold one weight row per head, which belongs to that head
        # (Qwen3's, one row shared by every head, belong to none)
        attn = hf.get_submodule(a)
        per_head = {w: getattr(getattr(attn, f"{w}_norm", None), "weight", None) for w in ("q", "k")}
        per_head = {w: t for w, t in per_head.items() if isinstance(t, torch.Tensor) and t.dim() == 2}
        if kind == "head" and "q" in per_head:
            out[f"{a}.q_norm.weight"] = (0, slice(head, head + 1))
        if kind == "kv" or n_kv == n_heads or include_shared_kv:
            kv_rows = slice(kv * dh, (kv + 1) * dh)
            for p in ("k_proj", "v_proj"):
                out[f"{a}.{p}.weight"] = (0, kv_rows)
                out[f"{a}.{p}.bias"] = (0, kv_rows)
            for p in ("weight", "bias"):  # and the key/value head's own key norm
                out[f"{a}.k_layernorm.norms.{kv}.{p}"] = (0, None)
            if "k" in per_head:
                out[f"{a}.k_norm.weight"] = (0, slice(kv, kv + 1))
    return out


def hf_component_masks(
    model: nn.Module, component: str, all_params: bool = False, include_shared_kv: bool = False
) -> dict[str, torch.Tensor]:
    """Boolean masks selecting one component's entries of a Hugging Face causal LM's parameters.

    Parameters
    ----------
    model : nn.Module
        A Hugging Face causal LM of a ``model_type`` in :data:`~pypattern.models.hf.HF_ARCHS`, or the
        :class:`~pypattern.models.hf.HookedHF` wrapping one (names then start with ``module.model.``); or an OPT,
        BLOOM or Falcon causal LM, whose masks are given here although the native adapter does not run them.
    component : str
        ``"blocks.{l}.attn.head.{h}"`` (one head's slices, see the module docstring for each layout and for
        grouped-query attention), ``"blocks.{l}.attn.kv_head.{g}"`` (a shared key/value head),
        ``"blocks.{l}.attn"``, ``"blocks.{l}.mlp"``, ``"blocks.{l}"``, ``"blocks.{l}.ln1"`` / ``"ln2"`` (the norms
        in front of the attention and the MLP: a layer with one norm for both, Phi-1/2's and GPT-J's, has ``ln1``
        only), ``"blocks.{l}.ln1_post"`` / ``"ln2_post"`` (the norms after them: Gemma 2 / 3, and OLMo 2 / 3,
        whose layers have only these), as the converted model names them, ``"embed"``, ``"pos_embed"`` (GPT-2),
        ``"unembed"``, ``"ln_final"``, ``"blocks.{l}.mlp.expert.{e}"`` (one expert of a mixture of experts: its
        slices of the stacked expert weights; the router and any shared expert belong to ``"blocks.{l}.mlp"``
        only), or any prefix of the model's own parameter names (e.g.
        ``"transformer.h.0.attn.c_attn"``). Indices are written as integers without leading zeros (``blocks.00``
        is refused, naming ``blocks.0``), as on the converted model.
    all_params : bool
        If True, every parameter is in the dict (all-False masks outside the component); otherwise only those
        with a selected entry.
    include_shared_kv : bool
        Under grouped-query attention, add the head's shared key/value slices to ``attn.head.{h}``.

    Returns
    -------
    dict[str, torch.Tensor]
        ``{parameter name: bool tensor of the parameter's shape}``, names as in ``model.named_parameters()``.

    Raises
    ------
    ValueError
        For an unknown component, a head out of range or an unsupported ``model_type``.
    """
    hf, prefix = _unwrap(model)
    arch = _arch(hf)
    params = dict(hf.named_parameters())
    # every name of every parameter: a parameter tied to another module's (shared between layers, say) is listed by
    # named_parameters() under its first name only; the masks name it so, and a head refuses a tied projection
    every = dict(hf.named_parameters(remove_duplicate=False))
    names: dict[int, list[str]] = {}  # id(parameter) -> its names, the one named_parameters() gives first
    for n, p in every.items():
        names.setdefault(id(p), []).append(n)
    check_index_spelling(component, params)  # blocks.00 is no more layer 0 here than on the converted model
    masks: dict[str, torch.Tensor] = {}
    m = re.fullmatch(r"blocks\.(\d+)\.attn\.(head|kv_head)\.(\d+)", component)
    n_layers = len(hf.get_submodule(f"{arch.base}.{arch.layers}"))
    e = re.fullmatch(r"blocks\.(\d+)\.mlp\.expert\.(\d+)", component)
    if e:
        return _finish(
            _expert_masks(hf, arch, int(e.group(1)), int(e.group(2)), n_layers, params),
            params,
            all_params,
            prefix,
        )
    if m:
        layer = int(m.group(1))
        if layer >= n_layers:
            raise ValueError(
                f"component={component!r}: layer {layer} is out of range; the model has {n_layers} layers"
            )
        if arch.heads_coupled:
            raise ValueError(
                f"component={component!r}: {arch.model_type} normalises the query and key projections across all "
                "heads (one norm over every head's projection), so a head's parameters move the other heads' "
                f"queries and keys too and no per-head component exists; use 'blocks.{layer}.attn'"
            )
        kind = "head" if m.group(2) == "head" else "kv"
        for name, (axis, idx) in _head_slices(
            hf, arch, layer, int(m.group(3)), kind, include_shared_kv
        ).items():
            tied = names[id(every[name])] if name in every else []
            if len(tied) > 1:
                raise ValueError(
                    f"component={component!r}: the parameter {name!r} is tied to (is the same tensor as) "
                    f"{', '.join(repr(t) for t in tied if t != name)}: moving the head's slice of it would move "
                    "those modules' heads too, so no mask moves this head alone; untie the weights (clone them), "
                    f"or use the whole module ('blocks.{layer}.attn', which then moves every module sharing it)"
                )
            if name not in params:
                # a bias the configuration leaves out, or a per-head norm the model does not have; a projection's
                # weight must be there: a wrapper that renames it (parametrize, LoRA's base_layer) would otherwise
                # leave it out of the mask without a word
                if name.endswith(".weight") and ".norms." not in name:
                    raise ValueError(
                        f"component={component!r}: the model has no parameter {name!r} (the head's slice of it "
                        "would be left out of the mask): a wrapper that renames the projection's weight "
                        "(torch.nn.utils.parametrize, weight norm, a LoRA layer's base_layer) is not read; give "
                        "the masks of the unwrapped model, or masks of your own"
                    )
                continue
            mask = torch.zeros_like(params[name], dtype=torch.bool)
            if idx is None:  # the whole parameter belongs to the head (a per-head norm)
                mask.fill_(True)
            else:
                mask.index_fill_(axis, _as_index(idx, mask.device), True)
            masks[name] = mask
        if not masks:  # never a silent empty mask (a sampler would then move nothing)
            raise ValueError(
                f"component={component!r}: none of its parameters is in the model (its parameters start "
                f"{list(params)[:2]})"
            )
    else:
        if component == "unembed":
            return _finish(_unembed_masks(hf, params), params, all_params, prefix)
        pre = _module_prefix(hf, arch, component)
        if pre is not None and pre.startswith(f"{arch.base}.{arch.layers}."):
            layer = int(pre.split(".")[len(arch.base.split(".")) + 1])
            if layer >= n_layers:
                raise ValueError(
                    f"component={component!r}: layer {layer} is out of range; the model has {n_layers} layers"
                )
        pre = component if pre is None else pre
        # a component held as several sibling modules (OPT's fc1 and fc2): each one's parameters
        pres = [pre]
        kind = "mlp" if re.fullmatch(r"blocks\.\d+\.mlp", component) else component
        if (arch.model_type, kind) in _MORE_MODULES:
            pres = [pre.rsplit(".", 1)[0] + "." + sub for sub in _MORE_MODULES[arch.model_type, kind]]

        def under(n: str) -> bool:
            return any(n == q or n.startswith(q + ".") for q in pres)

        # the module's parameters by identity: a tied one (shared with another module) is named once, by its first
        # name, which need not start with the prefix
        sel = list(dict.fromkeys(names[id(p)][0] for n, p in every.items() if under(n)))
        if not sel:
            if pre != component and any(under(n) for n, _ in hf.named_modules()):
                raise ValueError(  # the module is there: a norm without weights (OLMo's), say
                    f"component={component!r} ({pre}) has no parameters in this model: nothing to sample"
                )
            raise ValueError(
                f"component={component!r} matches no parameter; valid: 'blocks.0.attn.head.0', 'blocks.0.attn', "
                f"'blocks.0.mlp', 'embed', 'unembed', 'ln_final' or a parameter-name prefix such as "
                f"{list(params)[:2]}"
            )
        masks = {n: torch.ones_like(params[n], dtype=torch.bool) for n in sel}
    return _finish(masks, params, all_params, prefix)


def _expert_masks(hf: nn.Module, arch: HFArch, layer: int, expert: int, n_layers: int, params: dict) -> dict:
    """Expert ``expert`` of layer ``layer``'s sparse MLP block: entry ``expert`` of the first axis of every
    parameter of its stacked experts module (``gate_up_proj``, ``down_proj``)."""
    comp = f"blocks.{layer}.mlp.expert.{expert}"
    if arch.experts is None:
        raise ValueError(f"component={comp!r}: {arch.model_type} has no mixture of experts")
    if layer >= n_layers:
        raise ValueError(
            f"component={comp!r}: layer {layer} is out of range; the model has {n_layers} layers"
        )
    path = f"{arch.base}.{arch.layers}.{layer}.{arch.mlp}.{arch.experts}"
    try:
        mod = hf.get_submodule(path)
    except AttributeError:  # a dense layer of a model that mixes dense and sparse ones
        raise ValueError(f"component={comp!r}: layer {layer}'s MLP is dense (it has no experts)") from None
    # named as named_parameters() names them (a tied expert weight by its first name)
    first = {id(p): n for n, p in params.items()}
    own = [(first[id(p)], p) for p in mod.parameters() if p.dim() >= 2]
    n_exp = own[0][1].shape[0] if own else 0
    if not 0 <= expert < n_exp:
        raise ValueError(f"component={comp!r}: out of range; layer {layer} has {n_exp} experts")
    masks = {}
    for name, p in own:
        mask = torch.zeros_like(p, dtype=torch.bool)
        mask[expert] = True
        masks[name] = mask
    return masks


def _finish(masks: dict, params: dict, all_params: bool, prefix: str) -> dict[str, torch.Tensor]:
    if all_params:
        masks = {n: masks.get(n, torch.zeros_like(p, dtype=torch.bool)) for n, p in params.items()}
    return {prefix + n: v for n, v in masks.items()}


def _unembed_masks(hf: nn.Module, params: dict) -> dict[str, torch.Tensor]:
    """The output head's parameters, found by identity (``lm_head`` or GPT-NeoX's head, whatever its name in the
    installed ``transformers``): with tied embeddings its weight is the embedding's, named once."""
    head = hf.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(hf).__name__} has no output embeddings (get_output_embeddings() is None)")
    own = {id(p) for p in head.parameters()}
    return {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items() if id(p) in own}


def _falcon_fused_kv(attn: nn.Module) -> bool:
    """Whether a Falcon attention's fused rows hold key/value heads apart from the query heads (the new decoder
    architecture's groups, or multi-query); otherwise they are laid out per head, ``(n_heads, 3, d_head)``."""
    return bool(attn.new_decoder_architecture or attn.multi_query)


def _as_index(idx: Any, device: torch.device) -> torch.Tensor:
    if isinstance(idx, slice):
        return torch.arange(idx.start, idx.stop, device=device)
    return idx.to(device)
