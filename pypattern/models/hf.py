"""Hugging Face causal LMs used natively (no conversion), seen through TransformerLens hook names.

:func:`hooked_hf` wraps a causal LM of a family in :data:`HF_ARCHS` (chosen by ``config.model_type``: GPT-2, GPT-Neo,
GPT-NeoX/Pythia, GPT-J, Llama, Mistral, Phi, Phi-3, Qwen2, Qwen3, Gemma 1-3 (text), VaultGemma, OLMo 1-3, EXAONE 4,
StableLM, StarCoder2, SmolLM3, Seed-OSS, Helium, ERNIE 4.5, Ministral, Arcee, GLM, GLM-4, Cohere 1-2, Nemotron,
GPT-BigCode, and the mixtures of experts Mixtral, OLMoE, Qwen2-MoE and Qwen3-MoE) so that ``forward`` returns logits and
the residual-stream hook points of TransformerLens exist; :func:`~pypattern.models.hf_masks.hf_component_masks` gives
per-head, per-MLP and embedding parameter masks over the model's own parameter names. :func:`gpt2_from_config` builds a
random GPT-2 for tests and demos.

``transformers`` is optional: :func:`gpt2_from_config` raises ``ImportError`` (with the reason) when it is not
installed; the adapters need only a model object.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import warnings
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._checks import is_count
from .hooks import HookedModule, HookPoint
from .packed import functorch_wrapped

__all__ = [
    "HAS_TRANSFORMERS",
    "HF_ARCHS",
    "HFArch",
    "HookedHF",
    "gpt2_from_config",
    "gpt2_hook_points",
    "hf_arch",
    "hf_hook_points",
    "hooked_gpt2",
    "hooked_hf",
    "unwrap_hf",
]

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def gpt2_from_config(
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    d_vocab: int = 64,
    n_ctx: int = 32,
    d_mlp: int | None = None,
    act_fn: str = "gelu_new",
    seed: int = 0,
) -> nn.Module:
    """A randomly initialised ``transformers.GPT2LMHeadModel`` (built from a config: nothing is downloaded), its
    weights drawn from ``seed`` (the caller's global generator is left as it was).

    Raises
    ------
    ImportError
        When ``transformers`` is not installed (it is not a dependency of pypattern).
    """
    if not HAS_TRANSFORMERS:
        raise ImportError(
            "gpt2_from_config needs the optional package `transformers` (pip install transformers)"
        )
    import torch
    import transformers
    from transformers.activations import ACT2FN

    sizes = dict(n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_vocab=d_vocab, n_ctx=n_ctx)
    for k, v in sizes.items():
        if not is_count(v) or v < 1:
            raise ValueError(f"{k}={v!r} is not valid; give a positive int")
    if d_mlp is not None and (not is_count(d_mlp) or d_mlp < 1):
        raise ValueError(f"d_mlp={d_mlp!r} is not valid; give a positive int, or None (4 * d_model)")
    if d_model % n_heads:
        raise ValueError(f"d_model={d_model} is not a multiple of n_heads={n_heads}")
    if not isinstance(act_fn, str) or act_fn not in ACT2FN:
        raise ValueError(
            f"act_fn={act_fn!r} is not valid; give a Hugging Face activation name such as 'gelu_new'"
        )
    if not is_count(seed):
        raise ValueError(f"seed={seed!r} is not valid; give an int")
    n_layers, d_model, n_heads, d_vocab, n_ctx, seed = (
        int(v) for v in (n_layers, d_model, n_heads, d_vocab, n_ctx, seed)
    )
    d_mlp = None if d_mlp is None else int(d_mlp)
    cfg = transformers.GPT2Config(
        vocab_size=d_vocab,
        n_positions=n_ctx,
        n_embd=d_model,
        n_layer=n_layers,
        n_head=n_heads,
        n_inner=d_mlp,
        activation_function=act_fn,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    # transformers initialises from the global generator: seeded inside a fork, the caller's state is kept
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.GPT2LMHeadModel(cfg)
    model.eval()
    return model


def gpt2_hook_points(n_layers: int, prefix: str = "transformer") -> dict[str, str]:
    """TransformerLens hook names -> module paths of a Hugging Face GPT-2 (``GPT2LMHeadModel``).

    ``blocks.{l}.hook_resid_pre`` is the input of ``h.{l}``, ``hook_resid_post`` its output,
    ``hook_attn_out`` the output of ``h.{l}.attn`` and ``hook_mlp_out`` the output of ``h.{l}.mlp``.
    """

    if not is_count(n_layers) or n_layers < 0:
        raise ValueError(f"n_layers={n_layers!r} is not valid; give an int >= 0")
    if not isinstance(prefix, str):
        raise TypeError(
            f"prefix={prefix!r} is not valid; give the module path of the GPT2Model, e.g. 'transformer'"
        )
    pts: dict[str, str] = {"hook_embed": f"{prefix}.wte", "hook_pos_embed": f"{prefix}.wpe"}
    for layer in range(n_layers):
        h = f"{prefix}.h.{layer}"
        pts[f"blocks.{layer}.hook_resid_pre"] = f"{h}:input"
        pts[f"blocks.{layer}.hook_attn_out"] = f"{h}.attn"
        pts[f"blocks.{layer}.hook_mlp_out"] = f"{h}.mlp"
        pts[f"blocks.{layer}.hook_resid_post"] = h
    return pts


# ------------------------------------------------------------------------------------------ native adapters


@dataclass(frozen=True)
class HFArch:
    """Where one Hugging Face causal-LM family keeps its modules (paths relative to the ``*ForCausalLM`` model).

    Attributes
    ----------
    model_type : str
        ``config.model_type``.
    base : str
        Attribute of the causal LM holding the decoder (``transformer``, ``gpt_neox``, ``model``).
    embed, pos_embed : str
        Token and (GPT-2 only) learned positional embedding modules, relative to ``base``.
    layers : str
        The list of decoder layers, relative to ``base``.
    attn, mlp : str
        Attention and MLP modules, relative to a layer.
    ln1, ln2 : str or None
        The norms before attention and before the MLP, relative to a layer (components ``blocks.{l}.ln1`` /
        ``ln2``, as the converted model names them). None: the layer has no such norm (Phi-1/2 and GPT-J: one norm,
        ``ln1``, read by both; OLMo 2 / 3: no norm in front of either), and the name is refused.
    ln_final : str
        The final norm, relative to ``base``.
    qkv : {"gpt2", "neox", "split", "phi3", "bigcode"}
        Layout of the attention weights (see :func:`hf_component_masks`).
    proj : str
        The module holding the attention's projections, relative to ``attn`` (``""``: ``attn`` itself; GPT-Neo's
        ``attention``).
    out_proj : str
        The output projection of a ``"split"`` or ``"phi3"`` layout (``o_proj``; GPT-Neo's ``out_proj``).
    attn_write, mlp_write : str or None
        The module whose output is the attention's / MLP's write to the residual stream, relative to a layer
        (Gemma 2 and 3: their post-norms); None: ``attn`` / ``mlp`` themselves.
    heads_coupled : bool
        The query and key projections are normalised across all heads at once (OLMo 2 and 3): no head's
        parameters act on that head alone, and per-head components are refused.
    parallel_residual : bool or str
        Attention and MLP both read the layer input: always (True), never (False), or as the config attribute of
        that name says (``"use_parallel_residual"``).
    experts : str or None
        A mixture of experts' stacked experts module, relative to ``mlp`` (``"experts"``); its parameters' first
        axis indexes the experts (``blocks.{l}.mlp.expert.{e}`` components). None: dense MLPs.
    ln1_post, ln2_post : str or None
        The norms after the attention and after the MLP (Gemma 2 / 3's sandwich norms, OLMo 2 / 3's only norms),
        relative to a layer (components ``blocks.{l}.ln1_post`` / ``ln2_post``, as the converted model names them);
        None: the layer has none.
    generic : bool
        Read off the model by :func:`generic_hf_arch` for a family not in :data:`HF_ARCHS`: only the residual
        stream between layers is known (``attn``, ``mlp`` and the norms inside a layer are empty), so the adapter
        has residual-stream hook points only (``hook_embed``, ``hook_resid_pre``, ``hook_resid_post``, and
        ``ln_final.hook_normalized`` when the final norm was found).
    """

    model_type: str
    base: str
    embed: str
    pos_embed: str | None
    layers: str
    attn: str
    mlp: str
    ln1: str | None
    ln2: str | None
    ln_final: str
    qkv: str
    proj: str = ""
    out_proj: str = "o_proj"
    attn_write: str | None = None
    mlp_write: str | None = None
    heads_coupled: bool = False
    parallel_residual: bool | str = False
    experts: str | None = None
    ln1_post: str | None = None
    ln2_post: str | None = None
    generic: bool = False

    def parallel(self, config: Any) -> bool:
        """True when attention and MLP both read the layer input (:attr:`parallel_residual`)."""
        if self.generic:
            return True  # nothing is known of the layer's inside: no hook_resid_mid
        if isinstance(self.parallel_residual, str):
            return bool(getattr(config, self.parallel_residual, False))
        return self.parallel_residual


_LLAMA_LIKE = dict(
    base="model",
    embed="embed_tokens",
    pos_embed=None,
    layers="layers",
    attn="self_attn",
    mlp="mlp",
    ln1="input_layernorm",
    ln2="post_attention_layernorm",
    ln_final="norm",
    qkv="split",
)

# the layers of OLMo 2 / 3 and EXAONE 4: a norm after the attention and one after the MLP, none in front of them
_POST_NORMS_ONLY = dict(
    _LLAMA_LIKE,
    ln1=None,
    ln2=None,
    ln1_post="post_attention_layernorm",
    ln2_post="post_feedforward_layernorm",
    attn_write="post_attention_layernorm",
    mlp_write="post_feedforward_layernorm",
)

HF_ARCHS: dict[str, HFArch] = {
    "gpt2": HFArch("gpt2", "transformer", "wte", "wpe", "h", "attn", "mlp", "ln_1", "ln_2", "ln_f", "gpt2"),
    # GPT-BigCode (SantaCoder, StarCoder 1): GPT-2's module names, nn.Linear c_attn (multi-query or per-head blocks)
    "gpt_bigcode": HFArch(
        "gpt_bigcode", "transformer", "wte", "wpe", "h", "attn", "mlp", "ln_1", "ln_2", "ln_f", "bigcode"
    ),
    "gpt_neox": HFArch(
        "gpt_neox",
        "gpt_neox",
        "embed_in",
        None,
        "layers",
        "attention",
        "mlp",
        "input_layernorm",
        "post_attention_layernorm",
        "final_layer_norm",
        "neox",
        parallel_residual="use_parallel_residual",
    ),
    "llama": HFArch("llama", **_LLAMA_LIKE),
    "mistral": HFArch("mistral", **_LLAMA_LIKE),
    "qwen2": HFArch("qwen2", **_LLAMA_LIKE),
    "qwen3": HFArch("qwen3", **_LLAMA_LIKE),  # per-head query/key norms: shared weights, part of no head
    "gemma": HFArch("gemma", **_LLAMA_LIKE),  # scaled embeddings (hook_embed sees them), 1 + w norms
    # Gemma 2 / 3: sandwich norms; the writes to the residual stream are the post-norms' outputs
    **{
        mt: HFArch(
            mt,
            **{
                **_LLAMA_LIKE,
                "ln2": "pre_feedforward_layernorm",
                "ln1_post": "post_attention_layernorm",
                "ln2_post": "post_feedforward_layernorm",
                "attn_write": "post_attention_layernorm",
                "mlp_write": "post_feedforward_layernorm",
            },
        )
        for mt in ("gemma2", "gemma3_text")
    },
    # VaultGemma: Gemma 2 without the norms after the attention and the MLP
    "vaultgemma": HFArch("vaultgemma", **{**_LLAMA_LIKE, "ln2": "pre_feedforward_layernorm"}),
    # StableLM: LayerNorms; with use_parallel_residual one norm for both
    "stablelm": HFArch("stablelm", **_LLAMA_LIKE, parallel_residual="use_parallel_residual"),
    "olmo": HFArch("olmo", **_LLAMA_LIKE),  # LayerNorms without parameters, clamped q/k/v projections
    "starcoder2": HFArch("starcoder2", **_LLAMA_LIKE),  # LayerNorms, a plain MLP (c_fc, c_proj)
    "smollm3": HFArch("smollm3", **_LLAMA_LIKE),  # layers without rotary positions (NoPE)
    "seed_oss": HFArch("seed_oss", **_LLAMA_LIKE),
    "helium": HFArch("helium", **_LLAMA_LIKE),
    "ernie4_5": HFArch("ernie4_5", **_LLAMA_LIKE),
    "ministral": HFArch("ministral", **_LLAMA_LIKE),  # sliding windows on the layers layer_types names
    "arcee": HFArch("arcee", **_LLAMA_LIKE),  # a plain MLP (up_proj, down_proj)
    "glm": HFArch("glm", **_LLAMA_LIKE),  # a fused gate_up_proj, adjacent rotary pairs on part of each head
    # GLM-4: norms after the attention and after the MLP; the writes to the residual stream are their outputs
    "glm4": HFArch(
        "glm4",
        **{
            **_LLAMA_LIKE,
            "ln1_post": "post_self_attn_layernorm",
            "ln2_post": "post_mlp_layernorm",
            "attn_write": "post_self_attn_layernorm",
            "mlp_write": "post_mlp_layernorm",
        },
    ),
    # OLMo 2 / 3: no norms in front of the attention and the MLP (no ln1 / ln2; ln1_post / ln2_post are the norms
    # after them, the only ones a layer has, as the converted model names them), the writes are those norms'
    # outputs, one query/key norm across all heads
    **{mt: HFArch(mt, **_POST_NORMS_ONLY, heads_coupled=True) for mt in ("olmo2", "olmo3")},
    # Nemotron (Nemotron-4, Minitron): LayerNorms multiplying by 1 + w (LayerNorm1P), a plain squared-ReLU MLP
    "nemotron": HFArch("nemotron", **_LLAMA_LIKE),
    # Cohere / Cohere 2 (Command R, Aya): attention and MLP in parallel reading one LayerNorm (ln1; no ln2); with
    # use_qk_norm, per-head query/key LayerNorms whose weights hold one row per head (part of that head)
    **{
        mt: HFArch(mt, **{**_LLAMA_LIKE, "ln2": None}, parallel_residual=True) for mt in ("cohere", "cohere2")
    },
    # EXAONE 4: OLMo 2's norms, but each head's query and key normalised on its own (per-head components apply)
    "exaone4": HFArch("exaone4", **_POST_NORMS_ONLY),
    # mixtures of experts: Llama's attention, the MLP a sparse block of experts ("mlp.experts", whose stacked
    # gate_up_proj / down_proj hold one expert per entry of their first axis; "blocks.{l}.mlp.expert.{e}" masks one)
    "mixtral": HFArch("mixtral", **_LLAMA_LIKE, experts="experts"),
    "qwen2_moe": HFArch("qwen2_moe", **_LLAMA_LIKE, experts="experts"),  # plus a gated shared expert
    "qwen3_moe": HFArch("qwen3_moe", **_LLAMA_LIKE, experts="experts"),  # per-head query/key norms
    # OLMoE: one query/key norm across all heads (no per-head components), clamped q/k/v projections
    "olmoe": HFArch("olmoe", **_LLAMA_LIKE, experts="experts", heads_coupled=True),
    # GPT-J: attention and MLP in parallel reading one LayerNorm (ln_1), split projections, "out_proj"
    "gptj": HFArch(
        "gptj",
        "transformer",
        "wte",
        None,
        "h",
        "attn",
        "mlp",
        "ln_1",
        None,  # the one norm is ln1: no ln2
        "ln_f",
        "split",
        "",
        "out_proj",
        parallel_residual=True,
    ),
    # Phi-1/1.5/2: attention and MLP in parallel reading one LayerNorm (ln1; no ln2), output "dense"
    "phi": HFArch(
        "phi",
        **{**_LLAMA_LIKE, "ln2": None, "ln_final": "final_layernorm", "out_proj": "dense"},
        parallel_residual=True,
    ),
    # Phi-3: a fused qkv_proj, its rows every query head, then every key head, then every value head
    "phi3": HFArch("phi3", **{**_LLAMA_LIKE, "qkv": "phi3"}),
    "gpt_neo": HFArch(
        "gpt_neo",
        "transformer",
        "wte",
        "wpe",
        "h",
        "attn",
        "mlp",
        "ln_1",
        "ln_2",
        "ln_f",
        "split",
        "attention",
        "out_proj",
    ),  # fmt: skip
}


def hf_arch(model: nn.Module, generic: bool = True) -> HFArch:
    """The :class:`HFArch` of a Hugging Face causal LM, chosen by ``model.config.model_type``; for a family not in
    :data:`HF_ARCHS` that :func:`~pypattern.from_hf` does not convert either, the residual-stream layout
    :func:`generic_hf_arch` reads off the model (``generic=False``: refused instead).

    Raises
    ------
    TypeError
        When ``model`` has no ``config.model_type`` (not a Hugging Face model).
    ValueError
        For an unsupported ``model_type`` (named, with the supported ones), or a base model without its LM head.
    """
    model, _ = unwrap_hf(model, check=False)
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt is not None and hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is None:
        raise ValueError(
            f"{type(model).__name__} has no language-model head (a base model, or one with another head): give the "
            "causal LM (e.g. AutoModelForCausalLM), whose forward returns next-token logits"
        )
    if mt is None:
        raise TypeError(
            f"model={type(model).__name__} has no config.model_type: give a Hugging Face causal LM "
            f"({', '.join(sorted(HF_ARCHS))})"
        )
    if mt not in HF_ARCHS:
        from .convert import SUPPORTED_CLASSES, UnsupportedModelError

        if type(model).__name__ in SUPPORTED_CLASSES:
            raise UnsupportedModelError(
                f"model_type={mt!r} ({type(model).__name__}) is not supported by the native adapter; supported: "
                f"{', '.join(sorted(HF_ARCHS))}; {type(model).__name__} converts exactly: use "
                "pypattern.from_hf(model), which every estimator takes"
            )
        if not generic:
            raise UnsupportedModelError(
                f"{_no_layout(model)} (supported: {', '.join(sorted(HF_ARCHS))}): nothing that needs the modules "
                "inside its layers (per-head or per-MLP components, attn_out, mlp_out) is available; give components "
                "as parameter-name prefixes, and patch its residual stream through pypattern.hooked_hf(model)"
            )
        return generic_hf_arch(model)
    arch = HF_ARCHS[mt]
    if not hasattr(model, arch.base):
        raise ValueError(
            f"{type(model).__name__} has no sub-module {arch.base!r}: give the causal LM with its output head "
            f"(e.g. {'GPT2LMHeadModel' if mt == 'gpt2' else 'AutoModelForCausalLM'}), not the base model"
        )
    if mt == "gpt2" and getattr(model.config, "add_cross_attention", False):
        raise ValueError(
            "GPT-2 with add_cross_attention=True is not supported (a decoder-only model is needed)"
        )
    return arch


# the attribute names Hugging Face decoders give the norm after their last layer
_FINAL_NORM_NAMES = (
    "norm",
    "norm_f",
    "ln_f",
    "final_layernorm",
    "final_layer_norm",
    "final_norm",
    "ln_final",
    "layer_norm",
    "norm_out",
    "ln_out",
)


def _no_layout(model: nn.Module) -> str:
    """The start of an error about a family :data:`HF_ARCHS` has no layout for."""
    mt = model.config.model_type
    return f"model_type={mt!r} ({type(model).__name__}) has no layout of its own in the native adapter"


def _config_layers(config: Any) -> int | None:
    """The number of decoder layers a Hugging Face config states (its text config's, for a multimodal one)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("num_hidden_layers", "n_layer", "n_layers", "num_layers"):
        n = getattr(text, key, None)
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return n
    return None


def generic_hf_arch(model: nn.Module) -> HFArch:
    """The residual-stream layout of a Hugging Face causal LM of a family not in :data:`HF_ARCHS` (Mamba,
    CodeGen, Persimmon, MPT, ...), read off the model: the decoder (``model.base_model_prefix``), its one
    ``nn.ModuleList`` of ``config.num_hidden_layers`` layers, the input embedding module
    (``get_input_embeddings()``) and, when the decoder has one under a usual name (``norm``, ``norm_f``, ``ln_f``,
    ``final_layernorm``, ...), the final norm. Nothing inside a layer is read: the adapter built on it has
    ``hook_embed``, ``blocks.{l}.hook_resid_pre`` / ``hook_resid_post`` and ``ln_final.hook_normalized``. The
    reading is checked on a forward of two tokens (:func:`_check_generic_residual`) before it is returned: the
    layers run one after another on the residual stream (each layer's input the previous one's output), and the
    final norm is the module of a usual name that reads the last layer's output.

    Raises
    ------
    UnsupportedModelError
        When the layout cannot be read: no decoder under ``base_model_prefix``, no single list of the stated
        number of layers in it, the input embedding outside it, or a check on the forward that fails.
    """
    from .convert import UnsupportedModelError

    mt = model.config.model_type
    what = f"{_no_layout(model)} and"
    prefix = getattr(model, "base_model_prefix", "") or ""
    base = getattr(model, prefix, None) if prefix else None
    if not isinstance(base, nn.Module) or base is model:
        raise UnsupportedModelError(
            f"{what} holds no decoder under its base_model_prefix ({prefix!r}): its residual stream cannot be read; "
            f"give a model of a supported family ({', '.join(sorted(HF_ARCHS))})"
        )
    n = _config_layers(model.config)
    lists = [k for k, m in base.named_children() if isinstance(m, nn.ModuleList) and len(m) == n]
    if n is None or len(lists) != 1:
        raise UnsupportedModelError(
            f"{what} its decoder ({prefix!r}) holds {len(lists)} lists of the {n} layers its config states "
            "(one is needed): its residual stream cannot be read"
        )
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    embed = next((k for k, m in base.named_modules() if m is emb and k), None)
    if embed is None:
        raise UnsupportedModelError(f"{what} its input embedding is not a module of its decoder ({prefix!r})")
    arch = HFArch(mt, prefix, embed, None, lists[0], "", "", None, None, "", "", generic=True)
    return _check_generic_residual(model, arch, n)


def _check_generic_residual(model: nn.Module, arch: HFArch, n_layers: int) -> HFArch:
    """Run ``model`` on two tokens and check that its layers form a residual stream as :func:`generic_hf_arch`
    read it: layer ``l + 1``'s input is layer ``l``'s output (element 0 of a tuple), the hidden states have
    one width, and the final norm (when found) reads the last layer's output; a final norm that does not is left
    out (``ln_final`` empty). Raises :class:`~pypattern.models.convert.UnsupportedModelError` otherwise."""
    from .convert import UnsupportedModelError

    layers = _get(model, f"{arch.base}.{arch.layers}")
    ins: list[Any] = [None] * n_layers
    outs: list[Any] = [None] * n_layers

    def first(x: Any) -> Any:
        return x[0] if isinstance(x, tuple | list) and x else x

    def pre(i: int):
        def fn(mod, args, kwargs):
            ins[i] = first(args) if args else kwargs.get("hidden_states")

        return fn

    def post(i: int):
        def fn(mod, args, out):
            outs[i] = first(out)

        return fn

    children = dict(_get(model, arch.base).named_children())
    # the inputs of every call of each child of a usual final-norm name
    norm_ins: dict[str, list] = {k: [] for k in _FINAL_NORM_NAMES if isinstance(children.get(k), nn.Module)}

    def norm_in(name: str):
        def fn(mod, args, kwargs):
            norm_ins[name].append(first(args) if args else next(iter(kwargs.values()), None))

        return fn

    handles = []
    try:
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(pre(i), with_kwargs=True))
            handles.append(layer.register_forward_hook(post(i)))
        for k in norm_ins:
            handles.append(children[k].register_forward_pre_hook(norm_in(k), with_kwargs=True))
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device), use_cache=False)
        except Exception as e:  # noqa: BLE001 - the model's own failure, said to come from the check
            raise UnsupportedModelError(
                f"{_no_layout(model)}, whose residual stream is checked on a forward of two tokens, and that "
                f"forward failed ({type(e).__name__}: {e})"
            ) from e
        finally:
            model.train(was)
    finally:
        for h in handles:
            h.remove()
    why = None
    if any(not isinstance(t, torch.Tensor) for t in ins + outs):
        why = "a layer was not run, or its hidden states are not a tensor (its first input and output)"
    elif len({tuple(t.shape) for t in ins + outs}) != 1:
        why = "its layers' inputs and outputs differ in shape"
    elif ins[0].dim() != 3 or tuple(ins[0].shape[:2]) != (1, 2):
        why = (
            f"its hidden states have shape {tuple(ins[0].shape)} for one prompt of two tokens, not (batch, pos, "
            "d_model)"
        )
    else:
        bad = [i for i in range(n_layers - 1) if not torch.equal(outs[i], ins[i + 1])]
        if bad:
            why = f"layer {bad[0] + 1}'s input is not layer {bad[0]}'s output"
    if why is not None:
        raise UnsupportedModelError(
            f"{_no_layout(model)}, and its layers ({arch.base}.{arch.layers}) do not carry one residual stream: "
            f"{why}; give a model of a supported family ({', '.join(sorted(HF_ARCHS))})"
        )
    # the final norm: the first module of a usual name that runs once, on the last layer's output
    last = outs[-1]
    final = next(
        (
            k
            for k, xs in norm_ins.items()
            if len(xs) == 1 and isinstance(xs[0], torch.Tensor) and xs[0].shape == last.shape
            and torch.equal(xs[0], last)
        ),
        "",
    )  # fmt: skip
    return dataclasses.replace(arch, ln_final=final)


def _is_hf_lm(module: nn.Module) -> bool:
    """A Hugging Face model itself (its ``config`` an attribute of its own), not a wrapper forwarding to one."""
    return "config" in vars(module) and bool(getattr(module.config, "model_type", None))


def unwrap_hf(model: nn.Module, check: bool = True) -> tuple[nn.Module, str]:
    """The Hugging Face model inside wrappers that hold it unchanged, and the prefix of its parameter names in
    ``model`` (``""`` when ``model`` is no such wrapper).

    Followed: ``torch.compile``'s wrapper (``_orig_mod``), ``nn.DataParallel`` / ``DistributedDataParallel`` and any
    module holding the model as ``.module``, and a PEFT-style wrapper holding it as ``.base_model`` (or as
    ``.base_model.model``). Hooks are placed on the inner model's modules and the adapter runs the inner model
    (equal to the wrapper's forward on one device, and for adapters living inside the model's modules, as LoRA's).
    A :class:`HookedHF` inside a wrapper is returned as it is (its own parameter names follow the prefix).

    Raises
    ------
    ValueError
        With ``check``, when the wrapper has parameters outside the inner model (a prompt encoder, say): its own
        forward uses them around the model, which running the inner model would leave out.
    """
    cur, prefix, after_base = model, "", False
    for _ in range(8):
        if _is_hf_lm(cur) or isinstance(cur, HookedHF):
            break
        children = cur._modules
        if type(cur).__name__ == "OptimizedModule" and isinstance(children.get("_orig_mod"), nn.Module):
            attr = "_orig_mod"
        elif isinstance(children.get("module"), nn.Module):
            attr = "module"
        elif isinstance(children.get("base_model"), nn.Module):
            attr = "base_model"
        elif after_base and isinstance(children.get("model"), nn.Module):
            attr = "model"  # PEFT: PeftModel.base_model (the tuner) .model (the causal LM)
        else:
            break
        after_base = attr == "base_model"
        cur, prefix = children[attr], f"{prefix}{attr}."
    if not prefix or not (_is_hf_lm(cur) or isinstance(cur, HookedHF)):
        return model, ""
    if check:
        inner = {id(p) for p in cur.parameters()}
        outside = [n for n, p in model.named_parameters() if id(p) not in inner]
        if outside:
            raise ValueError(
                f"model={type(model).__name__} wraps {type(cur).__name__} (at {prefix[:-1]!r}) but has parameters "
                f"outside it ({', '.join(outside[:3])}{', ...' if len(outside) > 3 else ''}): its forward uses them "
                "around the causal LM (a prompt encoder, say), which the adapter would leave out; merge them into the "
                "model, or give the causal LM itself"
            )
    return cur, prefix


def _n_layers(model: nn.Module, arch: HFArch) -> int:
    return len(_get(model, f"{arch.base}.{arch.layers}"))


def _get(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def hf_hook_points(model: nn.Module, arch: HFArch | None = None) -> dict[str, str]:
    """TransformerLens hook names -> module paths (relative to ``model``) of a supported Hugging Face causal LM
    (``arch``: its layout, by default :func:`hf_arch`'s; a generic layout has the residual stream's points only).

    ``hook_embed`` (and ``hook_pos_embed`` for GPT-2) are the embedding modules' outputs;
    ``blocks.{l}.hook_resid_pre`` is the input of layer ``l``, ``hook_resid_post`` its output,
    ``hook_attn_out`` / ``hook_mlp_out`` the outputs of its attention / MLP module (before they are added to the
    residual stream; with Gemma 2 and 3 and OLMo 2 and 3 the outputs of the norms after them, which are what is
    added), ``ln_final.hook_normalized`` the output of the final norm. ``hook_resid_mid`` is not a
    module's input or output; :func:`hooked_hf` adds it (see there).
    """
    model, prefix = unwrap_hf(model)
    arch = hf_arch(model) if arch is None else arch
    b = f"{prefix}{arch.base}"
    pts = {"hook_embed": f"{b}.{arch.embed}"}
    if arch.pos_embed:
        pts["hook_pos_embed"] = f"{b}.{arch.pos_embed}"
    for layer in range(_n_layers(model, arch)):
        h = f"{b}.{arch.layers}.{layer}"
        pts[f"blocks.{layer}.hook_resid_pre"] = f"{h}:input"
        if not arch.generic:
            pts[f"blocks.{layer}.hook_attn_out"] = f"{h}.{arch.attn_write or arch.attn}"
            pts[f"blocks.{layer}.hook_mlp_out"] = f"{h}.{arch.mlp_write or arch.mlp}"
        pts[f"blocks.{layer}.hook_resid_post"] = h
    if arch.ln_final:
        pts["ln_final.hook_normalized"] = f"{b}.{arch.ln_final}"
    return pts


class _HFLogits(nn.Module):
    """``forward`` taking tokens, a batch mapping or ``input_ids=...`` and returning the logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def shares_token_type_embedding(self) -> bool:
        """GPT-2, GPT-Neo, GPT-J and GPT-BigCode embed ``token_type_ids`` with their token embedding module."""
        return getattr(self.model.config, "model_type", None) in ("gpt2", "gpt_neo", "gptj", "gpt_bigcode")

    def forward(
        self,
        input_ids: torch.Tensor | Mapping | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if isinstance(input_ids, Mapping):
            batch = input_ids
            if "input_ids" not in batch:
                raise TypeError(
                    f"a mapping batch needs 'input_ids'; got keys {list(batch)} (labels are read by the losses, "
                    "not by the model)"
                )
            input_ids = batch["input_ids"]
            if attention_mask is None:
                attention_mask = batch.get("attention_mask")
            for k in ("position_ids", "token_type_ids"):
                if batch.get(k) is not None:
                    kwargs.setdefault(k, batch[k])
        if kwargs.get("token_type_ids") is not None and self.shares_token_type_embedding:  # noqa: SIM102
            raise ValueError(
                f"token_type_ids: {type(self.model).__name__} embeds them with its token embedding, so hook_embed "
                "would see them too (and a patch there would rewrite them); drop them from the batch"
            )
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(
                f"input_ids={type(input_ids).__name__}: give token ids (batch, pos), or a mapping with 'input_ids'"
            )
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
            if attention_mask is not None and attention_mask.dim() == 1:
                attention_mask = attention_mask.unsqueeze(0)
        kwargs.setdefault("use_cache", False)
        kwargs.pop("labels", None)
        # the logits are returned whatever the caller asked of the model's output
        kwargs["return_dict"] = True
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return out.logits


class HookedHF(HookedModule):
    """A Hugging Face causal LM of a family in :data:`HF_ARCHS` with TransformerLens hook names.

    Built by :func:`hooked_hf`. ``forward(tokens)``, ``forward(batch_mapping)`` and
    ``forward(input_ids=..., attention_mask=...)`` return logits ``(batch, pos, d_vocab)``. The wrapped model is
    ``hf_model``; its parameters appear here under ``module.model.``.

    ``blocks.{l}.hook_resid_mid`` (not on GPT-NeoX with parallel attention, where it does not exist) sits on the
    attention module's output: it sees ``resid_pre + attn_out`` and a replacement ``r`` (returned, or written into
    the activation in place, as in ``x[:, p] = ...``) is handed on as the attention output ``r - resid_pre``, so the
    layer's residual after attention is ``r`` (up to one rounding).
    """

    def __init__(self, model: nn.Module) -> None:
        # torch.compile's wrapper, nn.DataParallel, a PEFT-style wrapper: hook and run the model inside
        model, _ = unwrap_hf(model)
        arch = hf_arch(model)
        n_layers = _n_layers(model, arch)
        pts = {k: "model." + v for k, v in hf_hook_points(model, arch).items()}
        pos = pts.pop("hook_pos_embed", None)
        super().__init__(_HFLogits(model), pts, n_layers=n_layers)
        self.arch = arch
        self.config = model.config
        if not arch.generic:  # the generic layout does not know the attention modules
            self._padding_kept_finite(model, n_layers)
        if pos is not None:
            self._add_pos_embed(model)
        self.has_resid_mid = not arch.parallel(model.config)
        if self.has_resid_mid:
            for layer in range(n_layers):
                self._add_resid_mid(model, layer)
        self._checkpointing_warned = False
        self._hooks_outside_checkpointing(model)

    def _wrapped_copy(self, module: nn.Module) -> HookedHF:
        return HookedHF(module.model)

    @property
    def generic(self) -> bool:
        """Whether the model's family has no layout of its own here (:func:`generic_hf_arch`): residual-stream
        hook points only."""
        return self.arch.generic

    @property
    def hf_model(self) -> nn.Module:
        """The wrapped Hugging Face model."""
        return self.module.model

    def forward(
        self,
        input_ids: torch.Tensor | Mapping | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Logits ``(batch, pos, d_vocab)`` of token ids ``(batch, pos)`` (or ``(pos,)``), of a batch mapping with
        ``input_ids`` (``attention_mask``, ``position_ids`` and ``token_type_ids`` are used, ``labels`` ignored),
        or of ``input_ids=..., attention_mask=...``; other keywords go to the Hugging Face model."""
        self._check_hooks_on()
        return self.module(input_ids, attention_mask=attention_mask, **kwargs)

    def _hooks_outside_checkpointing(self, model: nn.Module) -> None:
        """Gradient checkpointing runs a layer's forward again in the backward pass, with the hook functions attached
        then: functions removed before ``backward()`` (``run_with_hooks``, ``hooks()``) would be missing from the
        recomputation, whose saved activations (and backward hooks) would be those of another forward. While a hook
        point inside the layers has functions attached (and gradients are recorded), the decoder's forward runs
        with checkpointing off, and the model's setting is put back after it (also when it raises)."""
        base = _get(model, self.arch.base)
        inner = [hp for name, hp in self.hook_dict.items() if name.startswith("blocks.")]
        switched: list[list[nn.Module]] = []
        # the model's hooks must not keep the wrapper alive (it removes them when it is collected)
        me = weakref.ref(self)

        def pre(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            off: list[nn.Module] = []
            switched.append(off)
            if torch.is_grad_enabled() and any(hp._fns for hp in inner):
                for m in base.modules():
                    flag = getattr(m, "gradient_checkpointing", None)
                    if isinstance(flag, bool) and flag and m.training:
                        m.gradient_checkpointing = False
                        off.append(m)
                wrapper = me()
                if off and wrapper is not None and not wrapper._checkpointing_warned:
                    wrapper._checkpointing_warned = True
                    warnings.warn(
                        f"{type(model).__name__} has gradient checkpointing on: forwards with hook functions "
                        "attached inside its layers run without it (its recomputation in the backward pass would "
                        "miss functions removed before backward() and give the gradients of another forward), "
                        "so they keep their activations",
                        UserWarning,
                        stacklevel=2,
                    )

        def post(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            for m in switched.pop() if switched else ():
                m.gradient_checkpointing = True

        pre.changes_output = post.changes_output = False  # read by attached_hooks: they compute nothing
        self._register(base, pre, pre=True, with_kwargs=True)
        self._register(base, post, with_kwargs=True, always_call=True)

    def _padding_kept_finite(self, model: nn.Module, n_layers: int) -> None:
        """Keep the NaN of fully masked attention rows out of the model's residual stream
        (:func:`_finite_padding_hooks`)."""
        _finite_padding_hooks(model, self.arch, n_layers, self._register)

    def _add_pos_embed(self, model: nn.Module) -> None:
        """``hook_pos_embed`` on the position embedding's output, broadcast to the batch ``(batch, pos, d)`` as in
        TransformerLens (the module sees one row of positions when the model makes them itself)."""
        arch = self.arch
        base = _get(model, arch.base)
        wpe = base.get_submodule(arch.pos_embed)
        name = "hook_pos_embed"
        hp = HookPoint()
        hp.name = name
        self.hook_dict[name] = hp
        self._points[name] = hp
        store: dict[str, int] = {}

        def grab(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            if hp._fns:
                x = args[0] if args and args[0] is not None else kwargs.get("input_ids")
                if x is None:
                    x = kwargs.get("inputs_embeds")
                store["batch"] = int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() >= 2 else 1

        def post(mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            if not hp._fns:
                return None
            b = store.pop("batch", 1)
            if out.dim() == 3 and out.shape[0] == 1 and b > 1:
                out = out.expand(b, -1, -1).contiguous()
            return hp(out)

        grab.hook_point = post.hook_point = hp  # the identity while hp has no function attached
        self._register(base, grab, pre=True, with_kwargs=True)
        self._register(wpe, post)

    def _add_resid_mid(self, model: nn.Module, layer: int) -> None:
        arch = self.arch
        block = _get(model, f"{arch.base}.{arch.layers}.{layer}")
        attn = block.get_submodule(arch.attn_write or arch.attn)
        name = f"blocks.{layer}.hook_resid_mid"
        hp = HookPoint()
        hp.name = name
        self.hook_dict[name] = hp
        self._points[name.replace(".", "__")] = hp
        store: dict[str, torch.Tensor] = {}

        def grab(mod: nn.Module, args: tuple, kwargs: dict) -> None:  # runs after the resid_pre hook point
            if hp._fns:
                store["pre"] = args[0] if args else kwargs["hidden_states"]

        def mid(mod: nn.Module, args: tuple, out: Any) -> Any:
            if not hp._fns:
                return None
            pre = store.pop("pre")
            a = out[0] if isinstance(out, tuple) else out
            r = pre + a
            version = _version(r)
            new = hp(r)
            # a function that only read r changes nothing; one that edited r in place (``x[:, p] = ...``, with or
            # without ``return x``) or returned a replacement hands it on as the attention's output
            if new is r and (r._version == version if version is not None else _same(r, pre + a)):
                return None
            a = new - pre
            return (a, *out[1:]) if isinstance(out, tuple) else a

        grab.hook_point = mid.hook_point = hp  # the identity while hp has no function attached
        self._register(block, grab, pre=True, with_kwargs=True)
        self._register(attn, mid)


def _version(t: torch.Tensor) -> int | None:
    """``t``'s version counter (it counts in-place edits), None for a tensor made under ``torch.inference_mode``,
    which keeps none."""
    try:
        return t._version
    except RuntimeError:
        return None


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` hold the same values (NaN equal to NaN)."""
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def _padding_mask(am: torch.Tensor) -> bool:
    """Whether a 2-d ``attention_mask`` marks padding with 0 and real tokens with 1: integer or boolean, or floating
    with only 0s and 1s (Hugging Face reads a 2-d mask so; not read under vmap)."""
    if not am.is_floating_point() or functorch_wrapped(am):
        return True
    return bool(((am == 0) | (am == 1)).all())


def _finite_padding_hooks(model: nn.Module, arch: HFArch, n_layers: int, register: Any) -> None:
    """Keep the NaN of fully masked attention rows out of the model's residual stream.

    A query at a padding position (``attention_mask`` 0: left padding, or right padding under a mask that
    hides the padding from itself) attends to no key. Hugging Face's eager attention then adds the dtype's
    minimum to every score; families that take the softmax in float32 (Llama and its kin) turn float64's minimum
    into ``-inf`` there, and ``softmax`` of a row of ``-inf`` is NaN. That NaN sits at the padding position of
    the attention's output, so in the residual stream, and in the next layer the real tokens' attention reads
    it as a value with weight 0: ``0 * NaN`` is NaN, and every logit of the prompt is NaN. Here the attention's
    output is cleaned before anything reads it (its hook points included): NaN at a position the 2-d
    ``attention_mask`` (of any dtype, holding 0s and 1s) marks as padding becomes 0 (the output of attending to
    nothing). Positions of real tokens are never touched, nor is anything when there is no NaN at padding.

    The backward pass would still carry the NaN (the softmax's gradient multiplies by its NaN output), so the
    NaN is not made in the first place either: a float64 additive mask whose row hides every key from a query
    has that row set to float32's minimum, which the float32 softmax keeps finite (every score of the row is
    lost in the sum, so the row attends uniformly, as it does in float32). No real token attends to a padding
    key whichever the row, and masks of other dtypes are left as they are.

    Under ``torch.vmap`` (batched chains) nothing is read from the values: the replacements are made wherever
    they apply, which changes nothing where nothing is NaN or hidden.

    ``register(module, fn, pre=..., **kwargs)`` registers each hook (the adapter's, or one whose handles are
    removed after a forward: :func:`finite_padding`)."""
    base = _get(model, arch.base)
    store: list[torch.Tensor | None] = []

    def pre(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        am = kwargs.get("attention_mask")
        pad = None
        if isinstance(am, torch.Tensor) and am.dim() == 2 and _padding_mask(am):
            pad = am == 0
            if not functorch_wrapped(pad) and not bool(pad.any()):
                pad = None
        store.append(pad)

    def post(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        if store:
            store.pop()

    def clean(mod: nn.Module, args: tuple, out: Any) -> Any:
        pad = store[-1] if store else None
        if pad is None:
            return None
        a = out[0] if isinstance(out, tuple) else out
        if not isinstance(a, torch.Tensor) or a.dim() != 3 or tuple(a.shape[:2]) != tuple(pad.shape):
            return None
        bad = a.isnan() & pad.to(a.device)[..., None]
        if not functorch_wrapped(bad) and not bool(bad.any()):
            return None
        a = torch.where(bad, torch.zeros_like(a), a)
        return (a, *out[1:]) if isinstance(out, tuple) else a

    low = torch.finfo(torch.float32).min

    def finite_rows(mod: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        m = kwargs.get("attention_mask")
        if not store or store[-1] is None or not isinstance(m, torch.Tensor) or m.dtype != torch.float64:
            return None
        hidden = (m <= low).all(-1, keepdim=True)  # query rows that see no key
        if not functorch_wrapped(hidden) and not bool(hidden.any()):
            return None
        return args, {**kwargs, "attention_mask": torch.where(hidden, torch.full_like(m, low), m)}

    # bookkeeping for attached_hooks: real tokens' values are not changed
    pre.changes_output = post.changes_output = clean.changes_output = finite_rows.changes_output = False
    register(base, pre, pre=True, with_kwargs=True)
    register(base, post, with_kwargs=True, always_call=True)
    for layer in range(n_layers):
        attn = _get(model, f"{arch.base}.{arch.layers}.{layer}.{arch.attn}")
        # before the hook points on the attention's output (hook_attn_out, hook_resid_mid) see it
        register(attn, clean, prepend=True)
        register(attn, finite_rows, pre=True, with_kwargs=True, prepend=True)


def _float64(model: nn.Module) -> bool:
    """Whether ``model`` computes in float64, read from its input embedding's weight (else any parameter)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    w = getattr(emb, "weight", None)
    if isinstance(w, torch.Tensor):
        return w.dtype == torch.float64
    return any(p.dtype == torch.float64 for p in model.parameters())


@contextlib.contextmanager
def finite_padding(model: nn.Module, attention_mask: torch.Tensor | None) -> Iterator[None]:
    """In the block, a forward of ``model`` (a Hugging Face causal LM of a family in :data:`HF_ARCHS`, or OPT,
    BLOOM or Falcon, itself or inside a wrapper :func:`unwrap_hf` follows; not the adapter, which has them
    already) with ``attention_mask`` runs with
    :func:`_finite_padding_hooks`, removed afterwards: a float64 model's query at a left-padding position attends
    to no key, and Hugging Face's eager attention (a softmax in float32, or two float64 minima summed to ``-inf``)
    makes NaN there that reaches every real token's logits and every gradient (so does a right-padding position
    whose sliding window, Mistral's, holds padding only). Nothing is registered for other dtypes, without a mask,
    or for a mask without padding (read from its values, unless under vmap)."""
    handles: list[Any] = []
    if isinstance(attention_mask, torch.Tensor):
        model, _ = unwrap_hf(model, check=False)  # nn.DataParallel, a PEFT-style wrapper: the model inside
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if (
        isinstance(attention_mask, torch.Tensor)
        and attention_mask.dim() == 2
        and _padding_mask(attention_mask)
        and _is_hf_lm(model)
        and _float64(model)
        and (functorch_wrapped(attention_mask) or bool((attention_mask == 0).any()))
    ):
        from .hf_masks import _MASK_ARCHS

        arch = HF_ARCHS.get(mt) or _MASK_ARCHS.get(mt)

        def register(module: nn.Module, fn: Any, *, pre: bool = False, **kwargs: Any) -> None:
            add = module.register_forward_pre_hook if pre else module.register_forward_hook
            handles.append(add(fn, **kwargs))

        try:
            if arch is not None:
                _finite_padding_hooks(model, arch, _n_layers(model, arch), register)
        except (AttributeError, ValueError):  # a layout the adapter does not read: the model as it is
            for h in handles:
                h.remove()
            handles = []
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def is_hf_causal_lm(model: Any) -> bool:
    """True for an object that looks like a Hugging Face model (a ``config.model_type`` and input embeddings),
    whether or not :data:`HF_ARCHS` adapts its family."""
    return bool(getattr(getattr(model, "config", None), "model_type", None)) and hasattr(
        model, "get_input_embeddings"
    )


def hooked_hf(model: nn.Module) -> HookedHF:
    """Wrap a Hugging Face causal LM so that TransformerLens hook names and pypattern's patching work on it.

    The architecture is picked from ``model.config.model_type``: ``gpt2``, ``gpt_neo``, ``gpt_neox`` (Pythia), ``gptj``,
    ``llama``, ``mistral``, ``phi``, ``phi3``, ``qwen2``, ``qwen3``, ``gemma``, ``gemma2``, ``gemma3_text``,
    ``vaultgemma``, ``olmo``, ``olmo2``, ``olmo3``, ``exaone4``, ``stablelm``, ``starcoder2``, ``smollm3``,
    ``seed_oss``, ``helium``, ``ernie4_5``, ``ministral``, ``arcee``, ``glm``, ``glm4``, ``cohere``, ``cohere2``,
    ``nemotron``, ``gpt_bigcode`` and the mixtures of experts ``mixtral``, ``olmoe``, ``qwen2_moe``, ``qwen3_moe``
    (``hook_mlp_out`` is the sparse block's output). A causal LM of another family that
    :func:`~pypattern.from_hf` does not convert either (Mamba, CodeGen, Persimmon, MPT, ...) gets the residual stream
    alone (:func:`generic_hf_arch`): ``hook_embed``, ``blocks.{l}.hook_resid_pre`` / ``hook_resid_post`` and, when
    its final norm is found, ``ln_final.hook_normalized``, once a forward of two tokens has shown that its layers
    run one after another on one residual stream (else it is refused). Nothing is
    converted or copied: hooks sit on the model's own modules. A wrapper holding the model unchanged is looked
    through (:func:`unwrap_hf`: ``torch.compile``, ``nn.DataParallel``, a PEFT-style ``.base_model``): the hooks sit
    on the model inside and the adapter runs it; a wrapper with parameters of its own is refused.

    Hook names: ``hook_embed`` (``hook_pos_embed`` on GPT-2), ``blocks.{l}.hook_resid_pre``,
    ``blocks.{l}.hook_attn_out``, ``blocks.{l}.hook_resid_mid`` (not with parallel attention),
    ``blocks.{l}.hook_mlp_out``, ``blocks.{l}.hook_resid_post`` and ``ln_final.hook_normalized``. Hugging Face's
    ``output_hidden_states`` are ``hidden_states[l] = resid_pre`` of layer ``l`` and ``hidden_states[-1] =``
    ``ln_final.hook_normalized`` (the last layer's ``resid_post`` is before the final norm).

    With gradient checkpointing on (in ``train()`` mode), a forward with functions attached to hook points inside
    the layers (``blocks.*``) runs without checkpointing, once warned: the recomputation in the backward pass would
    miss functions removed before ``backward()`` and give the gradients of another forward.

    Raises
    ------
    ValueError
        For an unsupported ``model_type``, naming it and the supported ones; for a wrapper with parameters outside
        the model it wraps.

    Examples
    --------
    >>> hm = hooked_hf(AutoModelForCausalLM.from_pretrained(path))  # doctest: +SKIP
    >>> logits, cache = hm.run_with_cache(tokens, names_filter=lambda n: "resid" in n)  # doctest: +SKIP
    """
    return HookedHF(model)


def hooked_gpt2(model: nn.Module) -> HookedHF:
    """Wrap a ``GPT2LMHeadModel`` so that ``forward(tokens)`` returns logits and TL hook names work
    (:func:`hooked_hf` for GPT-2)."""
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt != "gpt2":
        raise ValueError(
            f"hooked_gpt2 needs a GPT-2 model, got model_type={mt!r}; use hooked_hf for other models"
        )
    return HookedHF(model)
