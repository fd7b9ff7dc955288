"""Hugging Face (and TransformerLens) language models converted exactly into pypattern's :class:`Transformer`.

:func:`from_hf` maps a model in memory, :func:`from_pretrained` a local ``save_pretrained`` directory (safetensors
only; nothing is downloaded and nothing is unpickled). One module per family holds the weight layout:

- :mod:`.gpt2`: ``GPT2LMHeadModel``
- :mod:`.falcon`: ``FalconForCausalLM`` (rotary Falcon models: Falcon-7B/40B/180B layouts)
- :mod:`.gemma`: ``GemmaForCausalLM``, ``Gemma2ForCausalLM``, ``Gemma3ForCausalLM``, ``Gemma3ForConditionalGeneration``
  (its language model), ``VaultGemmaForCausalLM``
- :mod:`.gpt_bigcode`: ``GPTBigCodeForCausalLM`` (SantaCoder, StarCoder 1)
- :mod:`.gpt_neo`: ``GPTNeoForCausalLM`` (GPT-Neo, the TinyStories models)
- :mod:`.gpt_neox`: ``GPTNeoXForCausalLM`` (GPT-NeoX, Pythia)
- :mod:`.gptj`: ``GPTJForCausalLM``
- :mod:`.granite`: ``GraniteForCausalLM``
- :mod:`.llama`: ``LlamaForCausalLM``
- :mod:`.llama_family`: ``SmolLM3ForCausalLM``, ``SeedOssForCausalLM``, ``HeliumForCausalLM``,
  ``Ernie4_5ForCausalLM``, ``MinistralForCausalLM``, ``ArceeForCausalLM``, ``GlmForCausalLM``, ``Glm4ForCausalLM``
- :mod:`.mistral`: ``MistralForCausalLM``
- :mod:`.nemotron`: ``NemotronForCausalLM``
- :mod:`.moe`: ``MixtralForCausalLM``, ``OlmoeForCausalLM``, ``Qwen2MoeForCausalLM``, ``Qwen3MoeForCausalLM`` (mixtures of
  experts)
- :mod:`.olmo`: ``OlmoForCausalLM``
- :mod:`.olmo2`: ``Olmo2ForCausalLM``, ``Olmo3ForCausalLM``, ``Exaone4ForCausalLM``
- :mod:`.opt`: ``OPTForCausalLM``
- :mod:`.phi`: ``PhiForCausalLM`` (Phi-1, Phi-1.5, Phi-2)
- :mod:`.phi3`: ``Phi3ForCausalLM``
- :mod:`.qwen2`: ``Qwen2ForCausalLM``
- :mod:`.qwen3`: ``Qwen3ForCausalLM``
- :mod:`.stablelm`: ``StableLmForCausalLM``
- :mod:`.starcoder2`: ``Starcoder2ForCausalLM``
- :mod:`.hooked_transformer`: TransformerLens' ``HookedTransformer`` (TransformerLens 2.x and 3.x)
- :mod:`.transformer_lens`: TransformerLens 4.x's ``TransformerBridge`` (around a class above, or its ``NativeModel``)

The converted model computes the same function: its logits equal the Hugging Face forward to float rounding
(tested: relative error <= 1e-10 in float64, <= 1e-4 in float32, with ``sdpa`` and with ``eager`` attention: the
eager attention of GPT-NeoX and the Llama family takes its softmax in float32 for every model dtype, and the
converted model does the same, ``TransformerConfig.attn_softmax_dtype``). A model
cast with ``.to(torch.bfloat16)`` or ``.half()`` holds rounded rotary frequencies, and the converted model rounds
them the same way (``TransformerConfig.rotary_freq_dtype``). Every option a converter does not reproduce exactly
(rotary embeddings scaled other than linearly or as Llama 3's, per-layer attention scales, cross-attention, an
unknown model class, ...) raises :class:`UnsupportedModelError` naming the option and its value: no approximate
model is ever returned.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import threading
from typing import Any

import torch
from torch import nn

from ..._checks import compiled_inner, nonfinite_names, refuse_meta_model
from ..._training import eval_mode
from ..transformer import Transformer
from . import hooked_transformer
from ._common import UnsupportedModelError, build, check_plain_modules, model_dtype, refuse, warn_if_training
from .hooked_transformer import is_hooked_transformer
from .transformer_lens import (
    bridge_positions_from_mask,
    convert_native,
    is_native_bridge,
    is_transformer_lens,
    unwrap_bridge,
)

__all__ = [
    "from_hf",
    "from_pretrained",
    "UnsupportedModelError",
    "SUPPORTED_CLASSES",
    "converted_if_convertible",
]

# one module per family, each with CLASSES (the Hugging Face classes it converts) and convert(model)
_FAMILY_MODULES = (
    "gpt2",
    "bloom",
    "falcon",
    "gemma",
    "gpt_bigcode",
    "gpt_neo",
    "gpt_neox",
    "gptj",
    "granite",
    "llama",
    "llama_family",
    "mistral",
    "moe",
    "nemotron",
    "olmo",
    "olmo2",
    "opt",
    "phi",
    "phi3",
    "qwen2",
    "qwen3",
    "stablelm",
    "starcoder2",
)
_FAMILIES = tuple(importlib.import_module(f".{n}", __name__) for n in _FAMILY_MODULES)
_CONVERTERS = {name: fam.convert for fam in _FAMILIES for name in fam.CLASSES}
SUPPORTED_CLASSES: tuple[str, ...] = tuple(_CONVERTERS)


def from_hf(model: nn.Module, *, dtype: torch.dtype | None = None, verify: bool = True) -> Transformer:
    """Convert a Hugging Face causal LM (or a TransformerLens model) exactly.

    Parameters
    ----------
    model : transformers.PreTrainedModel or a TransformerLens model
        A class in :data:`SUPPORTED_CLASSES` (the module's list above), a TransformerLens 4.x
        ``TransformerBridge`` around one or around TransformerLens' own ``NativeModel``
        (``TransformerBridge.boot_native``), or a TransformerLens 2.x / 3.x ``HookedTransformer`` (converted as it
        is, processed weights and all; see :mod:`.hooked_transformer` for what is refused). A bridge whose weights
        ``enable_compatibility_mode()`` / ``process_weights()`` processed (``fold_ln``, ``center_writing_weights``,
        ``center_unembed``, ``fold_value_biases``) converts to its processed forward; ``fold_ln`` on GPT-J, GPT-Neo
        and Falcon (LayerNorm biases folded into projections those classes build without biases) is refused,
        naming ``fold_ln=False``. A TransformerLens model with hooks attached is refused, naming them (the converted
        model would not run them).
    dtype : torch.dtype, optional
        Dtype of the converted weights; default: the model's own.
    verify : bool
        Run both models on a few tokens and refuse the conversion when their logits differ by more than rounding
        (default; a float64 model whose own forward refuses float64, as Hugging Face's mixture-of-experts layers
        do, is checked against a float32 copy of it, to float32's rounding; a model or conversion in 16 bits whose
        logits are farther from the model's than 16-bit rounding usually is, as a deep model's can be, is checked
        against the model's forward with eager attention, then with float32 copies of both models on the same
        weights, to float32's rounding); a ``TransformerBridge`` is checked against its own forward, and one that
        computes another function than the Hugging Face model it wraps is refused. The converters read the
        configuration and the modules the way the Hugging Face classes build them; a model changed after it was
        built (a module swapped, a module's attribute or ``model.config`` edited) can differ from what they read,
        and the check catches that. ``False`` skips the one forward of each model.

    Returns
    -------
    Transformer
        A new model (the weights are copied) with TransformerLens names and hooks; tied embeddings stay one
        parameter. Every parameter of the new model requires a gradient: the source's ``requires_grad`` flags are
        not carried over (freeze the converted model's parameters again where a sampler should leave them fixed).
        ``model.cfg.extra["converted_from"]`` records the source class and ``model_type``. A model in ``train()``
        mode with dropout is converted as its ``eval()`` forward (the converted model has no dropout), with a
        warning.

    Raises
    ------
    UnsupportedModelError
        For an unknown class or a configuration option the conversion would not reproduce exactly, a module
        that is not the one the class builds, or (``verify``) logits that differ from the model's own.
    """
    if not isinstance(verify, bool):
        raise TypeError(f"verify={verify!r} is not valid; give True or False")
    if type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = model._orig_mod  # torch.compile's wrapper: convert the model it compiles
    if isinstance(model, nn.Module):
        # a Hugging Face model inside a wrapper that holds it unchanged (nn.DataParallel, a PEFT-style
        # .base_model; one with parameters of its own is refused), or pypattern's adapter of one: the model inside
        from ..hf import HookedHF, unwrap_hf

        inner, prefix = unwrap_hf(model)
        if prefix or isinstance(inner, HookedHF):
            model = inner.hf_model if isinstance(inner, HookedHF) else inner
    if is_hooked_transformer(model):
        return _from_hooked_transformer(model, dtype, verify)
    if is_transformer_lens(model) and is_native_bridge(model):
        return _from_native_bridge(model, dtype, verify)
    bridge = None
    if is_transformer_lens(model):
        # the function to reproduce is the bridge's forward, which computes the attention itself
        bridge = model
        model = unwrap_bridge(model, SUPPORTED_CLASSES)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model={type(model).__name__} is not a torch module; give a Hugging Face causal LM")
    refuse_meta_model(model, needs="the conversion copies their values")
    name = type(model).__name__
    if name not in _CONVERTERS:
        raise UnsupportedModelError(
            f"model class {name!r} is not supported; pypattern converts {SUPPORTED_CLASSES} "
            "(base models without their language-model head are not converted: load the *ForCausalLM / "
            "*LMHeadModel class)"
        )
    _refuse_no_layers(model)
    check_plain_modules(model)
    _refuse_nonfinite(model)
    src_dtype = model_dtype(model)
    warn_if_training(model)
    out_dtype = src_dtype if dtype is None else dtype
    if not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
        raise ValueError(f"dtype={dtype!r} is not valid; give a floating torch.dtype such as torch.float32")
    with torch.no_grad():
        try:
            cfg, weights = _CONVERTERS[name](model)
        except AttributeError as e:  # a module replaced by one without the attributes the layout reads
            raise UnsupportedModelError(
                f"model class {name!r}: a module lacks what this class's layout reads ({e}); a module replaced "
                "after the model was built is not converted"
            ) from None
        # nn.Embedding's padding_idx: no gradient into that row from the lookup (the forward is unchanged)
        pad = getattr(model.get_input_embeddings(), "padding_idx", None)
        cfg["padding_idx"] = None if pad is None else int(pad)
        if bridge is not None and bridge_positions_from_mask(bridge):
            # the bridge's forward given an attention_mask hands the wrapped model positions counted from the mask
            # (each row's real tokens from 0), where the Hugging Face forward alone reads the columns
            cfg["positions_from_mask"] = True
        source = {"class": name, "model_type": getattr(model.config, "model_type", None)}
        out = build(cfg, weights, out_dtype, source)
    dev = next(model.parameters()).device
    out = out.to(dev)
    if verify:
        _verify(model, out, name, src_dtype, bridge=bridge)
    return out


def _refuse_no_layers(model: nn.Module) -> None:
    """Refuse a model configured with no layers (``num_hidden_layers``, or the name the config's class gives it,
    such as GPT-2's ``n_layer``; a multimodal model's ``text_config``'s), naming that key: Hugging Face builds it
    as embedding, final norm and unembedding, and pypattern's ``Transformer`` holds at least one layer."""
    config = getattr(model, "config", None)
    get_text = getattr(config, "get_text_config", None)
    text = get_text() if callable(get_text) else config
    n = getattr(text, "num_hidden_layers", None)
    if isinstance(n, bool) or not isinstance(n, int) or n >= 1:
        return
    key = (getattr(text, "attribute_map", None) or {}).get("num_hidden_layers", "num_hidden_layers")
    if text is not config:
        sub = next((k for k in getattr(config, "sub_configs", {}) if getattr(config, k, None) is text), None)
        key = f"{sub or 'text_config'}.{key}"
    refuse(
        key,
        n,
        "pypattern's Transformer has at least one layer (a model of none is its embedding and unembedding "
        "alone); give a model of one layer or more",
    )


def _refuse_nonfinite(model: nn.Module) -> None:
    """Refuse a model with a parameter that holds NaN or infinite values, naming it (its logits would be NaN, and
    the check against its own forward would read that as another architecture)."""
    bad = nonfinite_names(model.named_parameters())
    if bad:
        raise ValueError(
            f"model's parameter {bad[0]!r} holds values that are not finite (NaN or infinite): every computation "
            "on the model would be NaN; load finite weights"
        )


# relative logits differences beyond rounding, by the coarser of the two models' dtypes (the conversion is tested
# to 1e-10 in float64 and 1e-4 in float32; a misread option moves the logits by 1e-3 to 1)
_VERIFY_TOL = {torch.float64: 1e-8, torch.float32: 1e-3}
_VERIFY_TOL_16BIT = 5e-2
# the most tokens the check runs to exceed a local-attention window (a longer window is left to what the converter
# reads; TransformerLens' mask buffers are compared with the configuration)
_VERIFY_WINDOW_TOKENS = 512


def _verify(
    hf: nn.Module,
    out: Transformer,
    name: str,
    src_dtype: torch.dtype,
    n_tokens: int = 8,
    bridge: nn.Module | None = None,
    hooked: bool = False,
    source: nn.Module | None = None,
) -> None:
    """Refuse ``out`` when its logits on a few tokens (with local attention, one more than the largest window, up to
    :data:`_VERIFY_WINDOW_TOKENS` and ``n_ctx``; never more than the rotary scaling's ``rotary_position_limit``)
    differ from the model's own forward by more than rounding (:data:`_VERIFY_TOL`, by the coarser of
    ``src_dtype``, the model's, and ``out``'s): the Hugging Face model's
    forward (``hooked``: a TransformerLens ``HookedTransformer``'s), or for a TransformerLens ``bridge`` the
    bridge's forward (its attention components compute the
    attention themselves, with the softmax in their own dtype, which the converted model reproduces; the rebuilt
    Hugging Face model ``hf`` takes its eager softmax in float32 for some families, a float64 bridge in float64).
    Past 16-bit rounding's tolerance a 16-bit check goes on in :func:`_verify_16bit`.
    The model runs in ``eval()`` mode (its modes are put back) without gradients; a model whose own forward fails
    here (an attention implementation this device cannot run) is not checked, with a warning."""
    import warnings

    vocab = out.cfg.d_vocab
    T = max(1, min(n_tokens, out.cfg.n_ctx))
    windows = [w for w in (out.cfg.window(i) for i in range(out.cfg.n_layers)) if w is not None]
    if windows:  # a window the check's tokens do not exceed masks nothing: past the largest one, to a bound
        T = max(T, min(max(windows) + 1, out.cfg.n_ctx, _VERIFY_WINDOW_TOKENS))
    # LongRoPE's short factors and dynamic NTK's unscaled frequencies hold up to a length: a longer check would
    # have the converted model refuse the sequence and the Hugging Face model switch its rotary frequencies
    limit = out.cfg.rotary_position_limit
    if limit is not None:
        T = max(1, min(T, limit))
    dev = next(out.parameters()).device
    gen = torch.Generator().manual_seed(0)  # a CPU generator: the tokens are drawn on the CPU, then moved
    tokens = torch.randint(0, vocab, (1, T), generator=gen, device="cpu").to(dev)
    runner = source if source is not None else hf  # hooked: the module whose forward takes return_type
    source = runner if bridge is None else bridge
    with eval_mode(source), torch.no_grad():
        try:
            if hooked:
                ref = runner(tokens, return_type="logits")
            elif bridge is None:
                ref = hf(input_ids=tokens, use_cache=False).logits
            else:
                ref = bridge(tokens, return_type="logits")
        except Exception as e:  # the model's own forward, not the conversion
            ref = None if bridge is not None or hooked else _float32_forward(hf, tokens)
            if ref is None:
                warnings.warn(
                    f"from_hf could not run the {name} model's own forward to check the conversion "
                    f"({type(e).__name__}: {e}); the converted model was not checked against it",
                    UserWarning,
                    stacklevel=3,
                )
                return
            src_dtype = torch.float32  # checked against a float32 copy: to float32's rounding
        mine = out(tokens)
    ref, mine = ref.detach().to(torch.float64), mine.detach().to(torch.float64)
    if ref.shape != mine.shape:
        raise UnsupportedModelError(
            f"model class {name!r}: the converted model's logits have shape {tuple(mine.shape)}, the model's own "
            f"{tuple(ref.shape)}"
        )
    dts = (src_dtype, next(out.parameters()).dtype)
    tol = max(_VERIFY_TOL.get(d, _VERIFY_TOL_16BIT) for d in dts)
    tf32 = dev.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    if tf32:
        tol = max(tol, 1e-2)  # TF32 products round to 10 bits
    err = _relative_error(mine, ref)
    if not err <= tol and bridge is None and not hooked and any(d not in _VERIFY_TOL for d in dts):
        _verify_16bit(
            hf, out, name, tokens, mine, err, tol, max(_VERIFY_TOL[torch.float32], 1e-2 if tf32 else 0)
        )
        return
    if not err <= tol and bridge is not None:  # NaN included
        with eval_mode(hf), torch.no_grad():
            try:
                hf_err = _relative_error(mine, hf(input_ids=tokens, use_cache=False).logits.to(torch.float64))
            except Exception:  # the rebuilt Hugging Face model's forward: no diagnosis
                hf_err = float("nan")
        if hf_err <= tol:
            raise UnsupportedModelError(
                f"the TransformerBridge around {name!r} computes another function than the Hugging Face model it "
                f"wraps: the converted model's logits differ from the bridge's by {err:.3g} (relative to their "
                f"largest; rounding would be below {tol:g}) and from the Hugging Face model's by {hf_err:.3g}. "
                "TransformerLens' components do not compute this configuration the way Hugging Face "
                "does; pass verify=False to convert the Hugging Face model's function"
            )
    if not err <= tol and hooked and name == "NativeModel":  # NaN included
        raise UnsupportedModelError(
            f"TransformerBridge around NativeModel: the converted model's logits differ from the bridge's by "
            f"{err:.3g} (relative to their largest; rounding would be below {tol:g}): the native model computes "
            "what its configuration does not say (cfg edited after it was built, a module swapped), or combines "
            "options the converter reads otherwise. Pass verify=False to convert it as its modules describe it"
        )
    if not err <= tol and hooked:  # NaN included
        raise UnsupportedModelError(
            f"HookedTransformer: the converted model's logits differ from the model's own by {err:.3g} (relative "
            f"to their largest; rounding would be below {tol:g}): the model computes what its configuration does "
            "not say (cfg edited after the model was built, a module swapped) or combines options the converter "
            "reads otherwise. Pass verify=False to convert it as its configuration describes it"
        )
    if not err <= tol:  # NaN included
        raise UnsupportedModelError(
            f"model class {name!r}: the converted model's logits differ from the model's own by {err:.3g} (relative "
            f"to their largest; rounding would be below {tol:g}): the model differs from what its configuration "
            "builds (a module swapped, a module's attribute or model.config edited after it was built?), which the "
            "converter cannot see. Build the model from its configuration, or pass verify=False to convert it as "
            "the configuration describes it"
        )


def _verify_16bit(
    hf: nn.Module,
    out: Transformer,
    name: str,
    tokens: torch.Tensor,
    mine: torch.Tensor,
    err: float,
    tol: float,
    tol32: float,
) -> None:
    """The check of :func:`_verify` for a model or a conversion in 16 bits whose logits differ from the model's
    own by more than ``tol``, which a deep model's rounding can reach (Hugging Face's ``sdpa`` attention rounds
    otherwise than the converted model): pass when they are within ``tol`` of the model's forward with ``eager``
    attention (which the converted model's arithmetic follows for most families), or within ``tol32`` (float32
    rounding) when float32 copies of both models run on the same weights; refuse otherwise."""
    eager = _eager_logits(hf, tokens)
    if eager is not None and _relative_error(mine, eager.detach().to(torch.float64)) <= tol:
        return
    err32, why = _float32_copies_error(hf, out, tokens)
    if err32 is not None and err32 <= tol32:  # NaN excluded
        return
    dtype = str(next(out.parameters()).dtype).removeprefix("torch.")
    edited = (
        "the model differs from what its configuration builds (a module swapped, a module's attribute or "
        "model.config edited after it was built?), which the converter cannot see"
    )
    if err32 is not None:
        raise UnsupportedModelError(
            f"model class {name!r}: the converted model's logits differ from the model's own by {err:.3g} in 16 "
            f"bits (relative to their largest), and by {err32:.3g} when float32 copies of both run on the same "
            f"weights (rounding would be below {tol32:g}): {edited}. Build the model from its configuration, or "
            "pass verify=False to convert it as the configuration describes it"
        )
    raise UnsupportedModelError(
        f"model class {name!r}: the converted model's ({dtype}) logits differ from the model's own by {err:.3g} "
        f"(relative to their largest; 16-bit rounding is usually below {tol:g} but grows with depth, and float32 "
        f"copies of the two models, which would tell rounding from a change, could not be run: {why}). Either "
        f"this is rounding or {edited}. Pass verify=False to convert a model built from its configuration and "
        "left unchanged"
    )


_UNSET = object()


def _eager_logits(hf: nn.Module, tokens: torch.Tensor) -> torch.Tensor | None:
    """The logits of ``hf`` run with ``eager`` attention, its attention implementation put back after (on its
    config, the configs nested in it and its submodels'); None when it runs eager attention already, cannot
    switch, or the forward fails."""
    impl = getattr(getattr(hf, "config", None), "_attn_implementation", None)
    can_set = getattr(hf, "_can_set_attn_implementation", None)
    if impl in (None, "eager") or not callable(can_set) or not can_set():
        return None
    configs = {}
    pending = [hf.config] + [getattr(m, "config", None) for m in hf.modules()]
    while pending:
        c = pending.pop()
        if c is None or id(c) in configs:
            continue
        configs[id(c)] = (c, getattr(c, "_attn_implementation_internal", _UNSET))
        pending += [getattr(c, k, None) for k in getattr(c, "sub_configs", None) or {}]
    try:
        hf.set_attn_implementation("eager")
        with eval_mode(hf), torch.no_grad():
            return hf(input_ids=tokens, use_cache=False).logits
    except Exception:  # an implementation transformers would not switch: the float32 check decides
        return None
    finally:
        for c, value in configs.values():
            if value is not _UNSET:
                c._attn_implementation_internal = value


def _float32_copies_error(
    hf: nn.Module, out: Transformer, tokens: torch.Tensor
) -> tuple[float | None, str | None]:
    """``(error, None)``: the relative difference of the logits of float32 copies of the Hugging Face model (its
    parameters rounded to the converted model's dtype first, as the converted model holds them) and of the
    converted model; ``(None, reason)`` when a copy could not be made or run (out of memory, say)."""
    import copy
    import dataclasses

    out_dtype = next(out.parameters()).dtype
    try:
        twin = copy.deepcopy(hf)
        with torch.no_grad():
            for p in twin.parameters():
                p.data = p.data.to(out_dtype).to(torch.float32)
        twin.float()  # the floating buffers (rotary frequencies as the model holds them, rounded or not)
        with eval_mode(twin), torch.no_grad():
            ref = twin(input_ids=tokens, use_cache=False).logits.to(torch.float64)
        del twin
        with torch.device("meta"):
            mine32 = Transformer(dataclasses.replace(out.cfg, dtype=torch.float32))
        state = {n: p.detach().to(torch.float32) for n, p in out.named_parameters()}
        mine32.load_state_dict(state, strict=True, assign=True)
        with torch.no_grad():
            mine = mine32(tokens).to(torch.float64)
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"
    return _relative_error(mine, ref), None


def _float32_forward(hf: nn.Module, tokens: torch.Tensor) -> torch.Tensor | None:
    """The logits of a float32 copy of a float64 model whose own forward refused float64 (some Hugging Face mixture
    of experts layers run only in 32 or 16 bits), or None (another dtype, or the copy failed too)."""
    import copy

    if not any(p.dtype == torch.float64 for p in hf.parameters()):
        return None
    try:
        twin = copy.deepcopy(hf).float()
        with eval_mode(twin), torch.no_grad():
            return twin(input_ids=tokens, use_cache=False).logits
    except Exception:
        return None


def _relative_error(mine: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference relative to ``ref``'s largest magnitude (absolute where ``ref`` is zero)."""
    scale = float(ref.abs().max())
    diff = float((mine - ref).abs().max())
    return diff / scale if scale > 0 else diff


def converted_if_convertible(model: Any) -> Any:
    """For the estimators that need pypattern's model (per-head patching, AtP, circuits): a TransformerLens
    ``HookedTransformer`` or bridge, or a Hugging Face causal LM of a class in :data:`SUPPORTED_CLASSES`, converted
    with :func:`from_hf` (the same function); any other model unchanged (the estimator then says what it needs)."""
    if is_hooked_transformer(model) or is_transformer_lens(model):
        return from_hf(model)  # (which refuses weights on the meta device)
    inner = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    if isinstance(inner, nn.Module) and not isinstance(compiled_inner(model), Transformer):
        from ..hf import HookedHF, unwrap_hf

        # nn.DataParallel, a PEFT-style .base_model (one with parameters of its own is refused), the adapter
        unwrapped, prefix = unwrap_hf(inner)
        if prefix or isinstance(unwrapped, HookedHF):
            inner = unwrapped.hf_model if isinstance(unwrapped, HookedHF) else unwrapped
    if isinstance(compiled_inner(model), Transformer):  # pypattern's own model, compiled: the model it wraps
        model = compiled_inner(model)
    if (
        not isinstance(model, Transformer)
        and type(inner).__name__ in _CONVERTERS
        and isinstance(inner, nn.Module)
    ):
        return from_hf(inner)
    refuse_meta_model(model, needs="the estimator runs it")
    return model


def _from_hooked_transformer(model: nn.Module, dtype: torch.dtype | None, verify: bool = True) -> Transformer:
    """A TransformerLens ``HookedTransformer`` converted as it is (see :mod:`.hooked_transformer`); with
    ``verify``, checked against the model's own forward as :func:`from_hf` checks a Hugging Face model."""
    out_dtype = model.cfg.dtype if dtype is None else dtype
    if not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
        raise ValueError(f"dtype={dtype!r} is not valid; give a floating torch.dtype such as torch.float32")
    refuse_meta_model(model, needs="the conversion copies their values")
    _refuse_nonfinite(model)
    warn_if_training(model)
    with torch.no_grad():
        cfg, weights = hooked_transformer.convert(model)
        source = {
            "class": "HookedTransformer",
            "model_type": getattr(model.cfg, "original_architecture", None),
        }
        out = build(cfg, weights, out_dtype, source)
    dev = next(model.parameters()).device
    out = out.to(dev)
    if verify:
        _verify(model, out, "HookedTransformer", model.cfg.dtype, hooked=True)
    return out


def _from_native_bridge(bridge: nn.Module, dtype: torch.dtype | None, verify: bool = True) -> Transformer:
    """A TransformerLens 4.x ``TransformerBridge`` around its ``NativeModel`` (``TransformerBridge.boot_native``),
    converted from the native model's layout (:func:`.transformer_lens.convert_native`); with ``verify``, checked
    against the bridge's forward as :func:`from_hf` checks a Hugging Face model."""
    inner = bridge.original_model
    refuse_meta_model(inner, needs="the conversion copies their values")
    _refuse_nonfinite(inner)
    warn_if_training(bridge)
    src_dtype = model_dtype(inner)
    out_dtype = src_dtype if dtype is None else dtype
    if not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
        raise ValueError(f"dtype={dtype!r} is not valid; give a floating torch.dtype such as torch.float32")
    with torch.no_grad():
        cfg, weights = convert_native(bridge)
        out = build(
            cfg, weights, out_dtype, {"class": "NativeModel", "model_type": "transformer_lens_native"}
        )
    out = out.to(next(inner.parameters()).device)
    if verify:
        _verify(inner, out, "NativeModel", src_dtype, hooked=True, source=bridge)
    return out


def _weight_files(path: str) -> list[str]:
    """The model's safetensors files (a PEFT adapter's ``adapter_model.safetensors`` is not the model)."""
    return sorted(
        f for f in os.listdir(path) if f.endswith(".safetensors") and not f.startswith("adapter_model")
    )


def read_config(path: str, argument: str) -> dict:
    """``path/config.json`` as a dict; a file that is not a JSON object is a ``ValueError`` naming it and the
    argument that gave ``path`` (``--model '/dir'`` for a command-line flag, else ``path='/dir'``)."""
    cfg_path = os.path.join(path, "config.json")
    name = f"{argument} {path!r}" if argument.startswith("--") else f"{argument}={path!r}"
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{name}: {cfg_path} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{name}: {cfg_path} holds a {type(cfg).__name__}, not a JSON object")
    return cfg


def _check_architecture(path: str, name: str, cls: type, model_type: Any, transformers) -> None:
    """Refuse a config.json whose ``architectures`` names a class (``name``, ``cls``) built from a config of
    another ``model_type`` than the one config.json names: transformers would read the config as the class's own,
    with its default sizes where the fields differ (a default Llama has billions of parameters), and the weights
    would not fit it."""
    want = getattr(getattr(cls, "config_class", None), "model_type", None)
    if not isinstance(model_type, str) or not want or model_type == want:
        return
    auto = getattr(transformers.models.auto.modeling_auto, "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", {})
    fits = auto.get(model_type)
    raise ValueError(
        f"path={path!r}: config.json's architectures names {name}, whose config has model_type {want!r}, but its "
        f"model_type is {model_type!r}; the two do not describe one model: correct architectures"
        + (f" (model_type {model_type!r} is {fits})" if isinstance(fits, str) else "")
        + " or model_type"
    )


def _architectures(path: str, config: dict) -> list[str]:
    """config.json's ``architectures`` as a list of class names: a lone name (a string, which transformers reads
    too) is a list of one; anything else but a list of strings is a ``ValueError``."""
    archs = config.get("architectures") or []
    if isinstance(archs, str):
        return [archs]
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ValueError(
            f"path={path!r}: config.json's architectures={archs!r} is not valid; a list of class names such as "
            "['LlamaForCausalLM'] was expected"
        )
    return archs


_SAFE_INDEX = "model.safetensors.index.json"


def _check_index(path: str) -> None:
    """Refuse a ``model.safetensors.index.json`` whose ``weight_map`` sends a tensor to a file that is not a
    ``.safetensors`` file of the directory: transformers loads each file the index names by its extension, and
    would unpickle a ``.bin`` one."""
    index = os.path.join(path, _SAFE_INDEX)
    if not os.path.isfile(index):
        return
    try:
        with open(index) as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"path={path!r}: {_SAFE_INDEX} is not valid JSON ({e})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise UnsupportedModelError(
            f"path={path!r}: {_SAFE_INDEX} has no weight_map object (tensor name -> file); give a complete "
            "save_pretrained directory"
        )
    for key, target in weight_map.items():
        if not isinstance(target, str) or not target.endswith(".safetensors"):
            raise UnsupportedModelError(
                f"path={path!r}: {_SAFE_INDEX} maps weight_map[{key!r}] to {target!r}, not a .safetensors file; "
                "pypattern reads only safetensors weights (loading another file would unpickle it): "
                + _RESAVE
            )
        if not os.path.isfile(os.path.join(path, target)):
            raise UnsupportedModelError(
                f"path={path!r}: {_SAFE_INDEX} maps weight_map[{key!r}] to {target!r}, which is not a file in the "
                "directory; give a complete save_pretrained directory"
            )


# torch.load replaced, while from_pretrained has transformers load a checkpoint, by a function that refuses in the
# loading threads (other threads reach the function it replaced); one replacement for all concurrent loads
_loading = threading.local()
_patch_lock = threading.Lock()
_patch_state: dict[str, Any] = {"users": 0, "load": None, "serialization_load": None}


#: how to turn a checkpoint of pickle-based weights into one pypattern reads (safetensors is what transformers'
#: save_pretrained writes)
_RESAVE = (
    "re-save it as safetensors with transformers, model = AutoModelForCausalLM.from_pretrained(dir) then "
    "model.save_pretrained(new_dir), and give new_dir"
)


def _unpickling_refused(path: str, file: Any) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"path={path!r}: loading the checkpoint would unpickle {file!r} (torch.load); pypattern reads only "
        "safetensors weights: " + _RESAVE
    )


def _guarded_torch_load(f: Any, *args: Any, **kwargs: Any) -> Any:
    """``torch.load`` while :func:`_no_unpickling` holds: a refusal in a loading thread, the replaced function in
    any other."""
    blocked = getattr(_loading, "blocked", None)
    if blocked is not None:
        blocked.append(os.fspath(f) if isinstance(f, str | os.PathLike) else f)
        raise _unpickling_refused(_loading.path, blocked[-1])
    return _patch_state["load"](f, *args, **kwargs)


@contextlib.contextmanager
def _no_unpickling(path: str, blocked: list):
    """Within the block, ``torch.load`` (and ``torch.serialization.load``) raise :class:`UnsupportedModelError`
    naming ``path`` in this thread instead of unpickling, and append the file they were given to ``blocked``."""
    with _patch_lock:
        if _patch_state["users"] == 0:
            _patch_state["load"] = torch.load
            _patch_state["serialization_load"] = torch.serialization.load
            torch.load = torch.serialization.load = _guarded_torch_load
        _patch_state["users"] += 1
    outer = getattr(_loading, "blocked", None), getattr(_loading, "path", None)
    _loading.blocked, _loading.path = blocked, path
    try:
        yield
    finally:
        _loading.blocked, _loading.path = outer
        with _patch_lock:
            _patch_state["users"] -= 1
            if _patch_state["users"] == 0:
                torch.load = _patch_state["load"]
                torch.serialization.load = _patch_state["serialization_load"]


class _HeldLoadReport(logging.Filter):
    """A filter keeping transformers' LOAD REPORT records (its table of missing, unexpected and mismatched tensors,
    logged while a checkpoint loads) that this thread logs in ``held`` instead of letting them through (another
    thread's load logs its own)."""

    def __init__(self, held: list) -> None:
        super().__init__()
        self.held = held
        self.thread = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.thread == self.thread and "LOAD REPORT" in str(record.msg):
            self.held.append(record)
            return False
        return True


#: the logger transformers' from_pretrained logs its LOAD REPORT to
_LOAD_REPORT_LOGGER = "transformers.modeling_utils"


@contextlib.contextmanager
def _holding_load_report(held: list):
    """Within the block, transformers' LOAD REPORT is appended to ``held``, not logged: :func:`from_pretrained`
    refuses a checkpoint with missing, unexpected or mismatched tensors with one error naming them, and logs the
    report (:func:`_log_held`) only where its own error does not."""
    logger = logging.getLogger(_LOAD_REPORT_LOGGER)
    f = _HeldLoadReport(held)
    logger.addFilter(f)
    try:
        yield
    finally:
        logger.removeFilter(f)


def _log_held(held: list) -> None:
    """Log the records :func:`_holding_load_report` held, as transformers would have."""
    for record in held:
        logging.getLogger(record.name).handle(record)
    held.clear()


def _directory_arg(path) -> str:
    """``path`` (``from_pretrained``'s argument) as a str; anything but a str or an ``os.PathLike`` of one (None, a
    number, bytes) is a TypeError naming ``path`` and what was given."""
    if isinstance(path, str | os.PathLike):
        text = os.fspath(path)
        if isinstance(text, str):
            return text
    raise TypeError(
        f"path={path!r} ({type(path).__name__}) is not valid; give the directory as a str or an os.PathLike such "
        "as pathlib.Path"
    )


def _shape_mismatch_error(path: str, cls: type, transformers) -> UnsupportedModelError:
    """The error for a checkpoint whose tensors have other shapes than the model ``config.json`` describes:
    naming the first such tensor (in the model's order) with both shapes, read from the safetensors headers and a
    model built from the config on the meta device (no memory for weights); without them when these cannot be
    read."""
    what = "its tensors have other shapes than the model config.json describes"
    fix = "give the config.json saved with these weights (a size in it, e.g. the width, differs)"
    try:
        import safetensors

        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        with torch.device("meta"):
            model = cls.from_config(config) if hasattr(cls, "from_config") else cls._from_config(config)
        stored: dict[str, tuple[int, ...]] = {}
        for name in _weight_files(path):
            with safetensors.safe_open(os.path.join(path, name), "pt") as f:
                for k in f.keys():
                    stored[k] = tuple(f.get_slice(k).get_shape())
        prefix = f"{getattr(model, 'base_model_prefix', '')}."
        bad = []
        for k, t in model.state_dict().items():
            # a checkpoint of the base model names its tensors without the prefix
            for key in (k, k.removeprefix(prefix)):
                if key in stored:
                    if stored[key] != tuple(t.shape):
                        bad.append((key, stored[key], tuple(t.shape)))
                    break
    except Exception:  # the details are a courtesy: the refusal stands without them
        bad = []
    if not bad:
        return UnsupportedModelError(f"path={path!r}: {what}; {fix}")
    key, have, want = bad[0]
    more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
    return UnsupportedModelError(
        f"path={path!r}: {what}: tensor {key!r} has shape {list(have)} in the checkpoint, {list(want)} in the "
        f"model config.json describes{more}; {fix}"
    )


def from_pretrained(
    path: str | os.PathLike, *, dtype: torch.dtype | None = None, attn_implementation: str | None = None
) -> Transformer:
    """Load a local ``save_pretrained`` directory and convert it with :func:`from_hf`.

    Nothing is downloaded (``local_files_only=True``) and only safetensors weights are read: a directory with
    pickle-based weights only (``pytorch_model.bin``), or whose ``model.safetensors.index.json`` maps a tensor to
    a file other than a ``.safetensors`` file of the directory, is refused, since loading those would unpickle;
    while transformers loads the checkpoint, ``torch.load`` refuses in the loading thread.

    Parameters
    ----------
    path : str or os.PathLike
        Directory with ``config.json`` and ``*.safetensors`` weights (as ``save_pretrained`` writes them).
    dtype : torch.dtype, optional
        Dtype of the converted weights; default: the dtype ``config.json`` names (``dtype`` or ``torch_dtype``,
        which ``save_pretrained`` writes as the dtype the model was saved in; transformers' ``dtype="auto"``).
    attn_implementation : str, optional
        The Hugging Face attention implementation whose arithmetic the converted model reproduces (``"eager"``,
        ``"sdpa"``; default: what ``transformers`` picks on loading, usually ``"sdpa"``). The Llama family's and
        GPT-NeoX's eager attention takes its softmax in float32 even in float64, sdpa in the model's dtype.
    """
    path = _directory_arg(path)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype={dtype!r} is not valid; give a floating torch.dtype such as torch.float32")
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"path={path!r} is not a directory; give a local directory written by save_pretrained "
            "(nothing is downloaded)"
        )
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"path={path!r} has no config.json; give a directory written by save_pretrained"
        )
    if not _weight_files(path):
        pickled = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl")))
        raise UnsupportedModelError(
            f"path={path!r} has no .safetensors weights"
            + (
                f" (only pickle-based files {pickled}, which pypattern never loads because that would unpickle)"
                if pickled
                else ""
            )
            + "; "
            + _RESAVE
        )
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - transformers is a test dependency
        raise ImportError("from_pretrained needs the transformers package (pip install transformers)") from e
    config = read_config(path, "path")
    archs = _architectures(path, config)
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise UnsupportedModelError(
            f"path={path!r} holds a PEFT adapter (adapter_config.json): its weights would be left out (or, with peft "
            "installed, wrapped around the model's layers); merge it first (model.merge_and_unload()) and "
            "save_pretrained the merged model"
        )
    known = [a for a in archs if a in _CONVERTERS]
    if archs and not known:
        raise UnsupportedModelError(
            f"config.json architectures={archs} is not supported; pypattern converts {SUPPORTED_CLASSES}"
        )
    cls = getattr(transformers, known[0]) if known else transformers.AutoModelForCausalLM
    if known:
        _check_architecture(path, known[0], cls, config.get("model_type"), transformers)
    kwargs: dict[str, Any] = {"local_files_only": True, "use_safetensors": True, "trust_remote_code": False}
    kwargs["dtype"] = dtype if dtype is not None else "auto"
    if attn_implementation is not None:
        if not isinstance(attn_implementation, str):
            raise TypeError(
                f"attn_implementation={attn_implementation!r} is not valid; give a string such as 'eager' or 'sdpa'"
            )
        kwargs["attn_implementation"] = attn_implementation
    _check_index(path)
    blocked: list = []  # the files transformers asked torch.load for
    report: list = []  # transformers' LOAD REPORT, logged only where the errors below do not name its tensors
    try:
        with _no_unpickling(path, blocked), _holding_load_report(report):
            hf, info = cls.from_pretrained(path, output_loading_info=True, **kwargs)
    except Exception as e:  # a damaged or truncated weights file: transformers' or safetensors' own error
        if blocked:  # the refusal, possibly wrapped in transformers' own error
            raise _unpickling_refused(path, blocked[0]) from None
        if "ignore_mismatched_sizes" in str(e) and not isinstance(e, UnsupportedModelError | ImportError):
            # transformers' refusal of weights of other shapes, which the error names
            raise _shape_mismatch_error(path, cls, transformers) from None
        _log_held(report)
        if isinstance(e, UnsupportedModelError | ImportError):
            raise
        if attn_implementation is not None and "attn_implementation" in str(e):
            raise ValueError(
                f"attn_implementation={attn_implementation!r} is not valid here ({type(e).__name__}: {e}); give "
                "'eager' or 'sdpa' (or leave it to transformers' choice)"
            ) from e
        raise ValueError(
            f"path={path!r}: its checkpoint could not be loaded ({type(e).__name__}: {e}); give a complete, "
            "undamaged save_pretrained directory"
        ) from e
    if blocked:  # refused, and transformers went on without that file
        raise _unpickling_refused(path, blocked[0])
    missing = sorted(info.get("missing_keys") or [])
    # tensors the config has no place for (a config of fewer layers than the weights): dropped silently otherwise;
    # legacy buffers (GPT-2's attention masks, rotary frequencies) are not weights
    legacy = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")
    unexpected = sorted(k for k in info.get("unexpected_keys") or [] if not k.endswith(legacy))
    if unexpected:
        raise UnsupportedModelError(
            f"path={path!r}: the checkpoint has {len(unexpected)} tensors its config.json has no place for "
            f"({unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}); config.json does not describe these "
            "weights"
        )
    if missing:  # transformers initialises them at random and only logs it
        raise UnsupportedModelError(
            f"path={path!r}: the checkpoint lacks {len(missing)} of the model's tensors ({missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}); transformers would fill them with random values. Give a "
            "complete save_pretrained directory"
        )
    _log_held(report)
    hf.eval()
    return from_hf(hf, dtype=dtype)
