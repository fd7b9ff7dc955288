"""TransformerLens 4.x ``TransformerBridge`` -> the Hugging Face model it wraps, in its own module layout.

A bridge wraps the Hugging Face model in place: each sub-module is replaced by a bridge component that keeps the
original as ``_original_component`` (and some components hold split copies of fused weights, which their forward
reads). This module rebuilds a plain Hugging Face model of the same class whose parameters and buffers are the
original modules' tensors (shared, not copied; a fused projection whose split copies changed after the bridge was
built is rebuilt from them), which the family converters then read. TransformerLens itself is never imported.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ._common import UnsupportedModelError

# Marks a bridge attention component that runs the Hugging Face attention module itself (TransformerLens'
# ``AttentionBridge`` only wraps it in hooks): the softmax is taken as that module's attention implementation takes it
HF_ATTENTION = "the Hugging Face attention module's"

# A TransformerBridge's attention components compute the attention themselves (their forward does not run the
# Hugging Face attention code), except AttentionBridge: the dtype each TransformerLens 4.x component takes its softmax
# in (None: the model's dtype; HF_ATTENTION: the Hugging Face module runs)
_BRIDGE_SOFTMAX_DTYPE: dict[str, torch.dtype | str | None] = {
    "PositionEmbeddingsAttentionBridge": torch.float32,  # Llama, Mistral, Qwen2: softmax(..., dtype=float32)
    "_SmolLM3AttentionBridge": torch.float32,  # SmolLM3: the Llama component, no rotary on NoPE layers
    "JointQKVPositionEmbeddingsAttentionBridge": None,  # GPT-NeoX, Phi-3, Falcon
    "JointQKVAttentionBridge": None,  # GPT-2
    "BloomAttentionBridge": torch.float32,  # BLOOM: softmax(..., dtype=float32), cast back to the model's dtype
    "AttentionBridge": HF_ATTENTION,  # GPT-J, GPT-Neo, OPT: hooks around the Hugging Face module's forward
}


def _bridge_softmax_dtype(bridge: nn.Module) -> torch.dtype | str | None:
    """The dtype the bridge's attention components take their softmax in (:data:`HF_ATTENTION` when they run the
    Hugging Face attention modules), or refuse for an unknown component or components that differ."""
    kinds = {
        type(m).__name__
        for m in bridge.modules()
        if any(c.__name__ == "AttentionBridge" for c in type(m).__mro__)
    }
    unknown = sorted(kinds - set(_BRIDGE_SOFTMAX_DTYPE))
    if unknown or not kinds:
        raise UnsupportedModelError(
            f"TransformerBridge attention components {unknown or 'none found'} are not supported: the bridge computes "
            f"the attention itself, and pypattern knows the softmax dtype of {sorted(_BRIDGE_SOFTMAX_DTYPE)} only"
        )
    dts = {_BRIDGE_SOFTMAX_DTYPE[k] for k in kinds}
    if len(dts) > 1:
        raise UnsupportedModelError(
            f"TransformerBridge attention components {sorted(kinds)} take their softmax in different dtypes"
        )
    return dts.pop()


def is_transformer_lens(model: Any) -> bool:
    """True for objects defined by the ``transformer_lens`` package."""
    return (type(model).__module__ or "").startswith("transformer_lens")


def _resolve(root: nn.Module, path: str) -> torch.Tensor:
    """The tensor at ``path`` (Hugging Face names) in a bridged module tree, stepping through every wrapper."""
    obj: Any = root
    for part in path.split("."):
        while "_original_component" in getattr(obj, "_modules", {}):
            obj = obj._modules["_original_component"]
        obj = getattr(obj, part)
    return obj


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _users_hook(fn) -> bool:
    """Whether a function on a hook point was attached by the user. ``HookPoint.add_hook`` wraps each function in a
    closure; one whose wrapped functions all come from TransformerLens itself (its adapters wire some hook points of
    the wrapped model to the bridge's aliases of them, e.g. OPT's ``fc1.hook_in`` to ``mlp.in.hook_in``) is not the
    user's. A function of any other form counts as the user's."""
    inner = []
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            c = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if callable(c) and not isinstance(c, nn.Module):
            inner.append(c)
    if not inner:
        return True
    return any(not (getattr(c, "__module__", None) or "").startswith("transformer_lens.") for c in inner)


def _check_bridge_hooks(bridge: nn.Module) -> None:
    """Refuse a bridge with functions attached (``bridge.add_hook`` / ``add_perma_hook``, ``run_with_hooks(...,
    reset_hooks_end=False)``, a torch hook registered on one of its modules): they change its forward, and the
    converted model would not run them. TransformerLens' own bookkeeping hooks (its modules' functions that record
    outputs for the cache, the wiring of its adapters' hook points to their aliases: :func:`_users_hook`) and
    transformers' own are not the user's and pass."""
    aliases: dict[int, list[str]] = {}
    hook_dict = getattr(bridge, "hook_dict", None)
    if isinstance(hook_dict, dict):
        for key, hp in hook_dict.items():
            aliases.setdefault(id(hp), []).append(key)
    found: list[str] = []
    for name, m in bridge.named_modules():
        fns = [fn for d in _HOOK_DICTS for fn in (getattr(m, d, None) or {}).values()]
        if not fns:
            continue
        if type(m).__name__ == "HookPoint":
            if any(_users_hook(fn) for fn in fns):
                found.append(" / ".join(sorted(aliases.get(id(m), [name]), key=len)[:2]))
            continue
        theirs = [
            fn
            for fn in fns
            if not (getattr(fn, "__module__", None) or "").startswith(("transformer_lens.", "transformers."))
        ]
        if theirs:
            found.append(f"{name or '(the bridge)'} (torch hook)")
    if found:
        raise UnsupportedModelError(
            f"the TransformerBridge has hooks attached at {found}: they change its forward, and the converted model "
            "would not run them; remove them first (bridge.reset_hooks(including_permanent=True), or the handles "
            "of torch hooks) and attach the same functions to the converted model's hook points"
        )


def _unwrapped(obj: Any) -> Any:
    """The module a bridge component wraps (itself for anything else)."""
    while "_original_component" in getattr(obj, "_modules", {}):
        obj = obj._modules["_original_component"]
    return obj


# Bridge components that split a fused Hugging Face projection into separate linear layers when the bridge is
# built (TransformerLens' JointQKVAttentionBridge and its subclasses, JointGateUpMLPBridge): the attribute holding
# the splitting function, and the submodules holding the split layers, in the order the function returns them
_SPLIT_COMPONENTS = (("split_qkv_matrix", ("q", "k", "v")), ("split_gate_up_matrix", ("gate", "in")))


def _pieces_differ(split_out: Any, pieces: list) -> bool:
    """Whether the layers a splitting function returns differ from the bridge's split layers (or do not match)."""
    if not isinstance(split_out, (tuple, list)) or len(split_out) != len(pieces):
        return True
    for new, cur in zip(split_out, pieces):
        for attr in ("weight", "bias"):
            a, b = getattr(new, attr, None), getattr(cur, attr, None)
            if (a is None) != (b is None):
                return True
            if a is not None and (a.shape != b.shape or not torch.equal(a.detach().to(b.dtype), b.detach())):
                return True
    return False


def _fused_from_split_layers(bridge: nn.Module) -> dict[int, torch.Tensor]:
    """The fused projections a bridge's forward computes, rebuilt from its split layers, by ``id`` of the fused
    Hugging Face tensor.

    A bridge that splits a fused projection (GPT-NeoX's and Falcon's ``query_key_value``, BLOOM's, Phi-3's
    ``qkv_proj`` / ``gate_up_proj``, ...) copies the slices into separate layers when it is built, and its forward
    reads those copies: the fused Hugging Face tensor is not updated when they change (an optimizer step on the
    bridge's parameters, ``bridge.load_state_dict``, whose state dict omits the fused tensor). Where a split layer
    differs from the split of the current fused tensor, the fused tensor is rebuilt from the split layers: the
    splitting function is run on fused tensors holding each element's index, which says where each element of the
    split layers comes from. Raises ``UnsupportedModelError`` when the split is not such a selection of elements."""
    out: dict[int, torch.Tensor] = {}
    for comp_name, m in bridge.named_modules():
        for fn_name, piece_names in _SPLIT_COMPONENTS:
            split = vars(m).get(fn_name)
            orig = m._modules.get("_original_component")
            if not callable(split) or orig is None or not all(n in m._modules for n in piece_names):
                continue
            pieces = [_unwrapped(m._modules[n]) for n in piece_names]
            fused_storages = {p.untyped_storage().data_ptr() for p in orig.parameters()}
            split_tensors = [
                t for c in pieces for t in (getattr(c, "weight", None), getattr(c, "bias", None))
            ]
            if all(t is None or t.untyped_storage().data_ptr() in fused_storages for t in split_tensors):
                continue  # views of the fused tensors (GPT-2's, Phi-3's splits): they are the fused values
            cuda = sorted({p.device.index or 0 for p in orig.parameters() if p.device.type == "cuda"})
            # the splitting functions build nn.Linear layers, whose initialisation draws from torch's random
            # streams: the user's streams are left as they were
            with torch.no_grad(), torch.random.fork_rng(devices=cuda):
                try:
                    current = split(orig)
                except Exception:  # noqa: BLE001 - TransformerLens' own code: the fused tensors stay as they are
                    continue  # (the conversion check against the bridge's forward decides)
                if not _pieces_differ(current, pieces):
                    continue
                params = [p for p in orig.parameters() if p.is_floating_point()]
                saved = [p.data for p in params]
                offset = 0
                try:  # each element of the fused tensors holds its (1-based) index; float64 holds them exactly
                    for p in params:
                        p.data = torch.arange(
                            offset + 1, offset + 1 + p.numel(), dtype=torch.float64, device=p.device
                        ).view(p.shape)
                        offset += p.numel()
                    probed = split(orig)
                except Exception:  # noqa: BLE001 - a split that cannot run on the indices: refused below
                    probed = None
                finally:
                    for p, d in zip(params, saved):
                        p.data = d
                ends = torch.tensor([0] + [p.numel() for p in params]).cumsum(0)
                rebuilt: dict[int, torch.Tensor] = {}
                ok = isinstance(probed, (tuple, list)) and len(probed) == len(pieces)
                for new, cur in zip(probed if ok else (), pieces):
                    for attr in ("weight", "bias"):
                        code, value = getattr(new, attr, None), getattr(cur, attr, None)
                        if code is None and value is None:
                            continue
                        if code is None or value is None or code.shape != value.shape:
                            ok = False
                            break
                        code = code.detach().reshape(-1).cpu()
                        if not bool(((code == code.round()) & (code >= 1) & (code <= offset)).all()):
                            ok = False  # the split computes with the elements, not only selects them
                            break
                        idx = code.long() - 1
                        which = torch.bucketize(idx, ends[1:], right=True)
                        value = value.detach().reshape(-1)
                        for j in which.unique().tolist():
                            sel = which == j
                            if j not in rebuilt:
                                rebuilt[j] = saved[j].detach().clone()
                            flat = rebuilt[j].view(-1)
                            flat[(idx[sel] - ends[j]).to(flat.device)] = value[sel.to(value.device)].to(
                                flat.dtype
                            )
                if not ok:
                    raise UnsupportedModelError(
                        f"the TransformerBridge's split layers {list(piece_names)} of {comp_name!r}, which its "
                        "forward reads, differ from the fused Hugging Face projection they were split from (changed "
                        "after the bridge was built: an optimizer step, load_state_dict), and their split does not "
                        "select elements of it, so the fused projection cannot be rebuilt from them"
                    )
                out.update({id(params[j]): t for j, t in rebuilt.items()})
    return out


def unwrap_bridge(bridge: Any, supported: tuple[str, ...]) -> nn.Module:
    """The Hugging Face model inside a TransformerLens 4.x ``TransformerBridge``, rebuilt in its own layout.

    Processed weights (``enable_compatibility_mode()`` / ``process_weights()``: ``fold_ln``,
    ``center_writing_weights``, ``center_unembed``, ``fold_value_biases``) are the bridged model's own tensors,
    changed in place, and are read as they are, with the output head's folded bias (:func:`_processed_extras`): the
    result computes the bridge's processed forward.

    Parameters
    ----------
    bridge : transformer_lens.model_bridge.TransformerBridge
    supported : tuple of str
        Hugging Face class names that can be converted.

    Raises
    ------
    UnsupportedModelError
        When ``bridge`` is no ``TransformerBridge`` around a supported class, or its weights were processed
        (``enable_compatibility_mode`` / ``process_weights``) with ``fold_ln`` into projections the Hugging Face
        class builds without biases (GPT-J, GPT-Neo, Falcon; naming ``fold_ln=False``), or its attention components are not known (the bridge computes the attention itself,
        and the converted model takes the softmax in the dtype the bridge does: ``bridge_attn_softmax_dtype``), or
        functions are attached to its hook points or modules (naming them: the converted model would not run them),
        or split layers changed after the bridge was built cannot be mapped back to their fused projection
        (:func:`_fused_from_split_layers`, which rebuilds the fused projections the bridge's forward computes).
    """
    name = type(bridge).__name__
    try:
        inner = bridge.original_model
    except AttributeError:
        inner = None
    if not isinstance(inner, nn.Module):
        raise UnsupportedModelError(
            f"model={name} (from {type(bridge).__module__}) is not supported: pypattern converts TransformerLens "
            f"4.x TransformerBridge models that wrap a local Hugging Face model of {supported}, and "
            "TransformerLens 2.x / 3.x HookedTransformer models"
        )
    _check_bridge_hooks(bridge)
    cls_name = type(inner).__name__
    if cls_name not in supported:
        raise UnsupportedModelError(
            f"the TransformerBridge wraps {cls_name!r}, which is not supported; pypattern converts {supported}"
        )
    processed = bool(getattr(bridge, "_weights_processed", False))
    with torch.device("meta"):
        clean = type(inner)(copy.deepcopy(inner.config))
    clean.eval()
    # the fused projections as the bridge's forward computes them (from its split layers)
    try:
        fused = _fused_from_split_layers(bridge)
    except UnsupportedModelError as e:
        if not processed:
            raise
        raise UnsupportedModelError(
            f"{e}. The bridge's weights were processed (enable_compatibility_mode / process_weights): fold_ln folds "
            f"each norm's bias into the projections after it, which {cls_name} builds without biases, so the "
            "processed projections have no place in the Hugging Face model; convert a bridge processed with "
            "enable_compatibility_mode(fold_ln=False) (centring and folded value biases convert), or one without "
            "weight processing (no_processing=True)"
        ) from None
    tensors = {}
    for pname, _ in clean.named_parameters(remove_duplicate=False):
        t = _resolve(inner, pname)
        tensors[pname] = fused.get(id(t), t)
    for bname, _ in clean.named_buffers(remove_duplicate=False):
        tensors[bname] = _resolve(inner, bname)
    for full, t in tensors.items():
        mod_path, _, leaf = full.rpartition(".")
        mod = clean.get_submodule(mod_path) if mod_path else clean
        if leaf in mod._parameters:
            mod._parameters[leaf] = t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)
        else:
            mod._buffers[leaf] = t
    if processed:
        _processed_extras(inner, clean, {id(t) for t in tensors.values()})
    # tied embeddings stay tied: both names resolve to the bridged model's one tensor (processing unties them: the
    # centred unembedding is a tensor of its own, which the converters then read as an untied head)
    clean.config._attn_implementation = getattr(inner.config, "_attn_implementation", None)
    # the converted model computes what the bridge's forward computes (read by _common.attn_softmax_dtype); where
    # the bridge runs the Hugging Face attention modules, their attention implementation decides, as for the model
    softmax_dtype = _bridge_softmax_dtype(bridge)
    if softmax_dtype != HF_ATTENTION:
        clean.bridge_attn_softmax_dtype = softmax_dtype
    return clean


def bridge_positions_from_mask(bridge: Any) -> bool | None:
    """True where a ``TransformerBridge``'s forward, given an ``attention_mask`` and no ``position_ids``, hands the
    Hugging Face model it wraps positions counted from the mask: each row's real tokens from 0 where a masked token
    precedes a real one (TransformerLens 4.x's ``get_offset_position_ids``, the positions of a
    ``HookedTransformer``), for a wrapped model whose forward takes ``position_ids`` and leaves their derivation to
    the caller (the bridge's ``_accepts_derived_position_ids``). None otherwise (the wrapped model's forward decides
    its positions, as the Hugging Face class does: OPT's learned positions read the mask themselves; a bridge
    without that gate)."""
    accepts = getattr(bridge, "_accepts_derived_position_ids", None)
    if not callable(accepts):
        return None
    try:
        return True if bool(accepts()) else None
    except Exception:  # noqa: BLE001 - TransformerLens' own code: the Hugging Face class's convention stays
        return None


def _hf_name(name: str) -> str:
    """A tensor's name in a bridged module tree without the bridge components' ``_original_component`` steps."""
    return ".".join(p for p in name.split(".") if p != "_original_component")


def _processed_extras(inner: nn.Module, clean: nn.Module, placed: set[int]) -> None:
    """Put on ``clean`` the tensors weight processing added to the bridged model (``enable_compatibility_mode`` /
    ``process_weights``). ``fold_ln`` folds the final norm's bias into the unembedding, which TransformerLens stores
    as a ``bias`` of the output head, a module the Hugging Face class may build without one: it goes into the head's
    empty ``bias`` slot, where the family converters read it (``unembed.b_U``). Every other processed value lives in
    the Hugging Face model's own tensors (folded norm weights, centred writing weights, folded value biases, the
    centred and so untied unembedding), already in ``placed`` (by ``id``); the bridge's own modules, such as split
    projections, are read through the fused ones as without processing. Any other added tensor (``fold_ln`` folding
    a LayerNorm's bias into projections built without biases: GPT-J's, GPT-Neo's) is refused, naming it and
    ``fold_ln=False``: the converted model would leave it out."""
    head = clean.get_output_embeddings()
    head_path = next((n for n, m in clean.named_modules() if m is head), None)
    for n, t in (
        *inner.named_parameters(remove_duplicate=False),
        *inner.named_buffers(remove_duplicate=False),
    ):
        if id(t) in placed:
            continue
        name = _hf_name(n)
        mod_path, _, leaf = name.rpartition(".")
        try:
            mod = clean.get_submodule(mod_path) if mod_path else clean
        except (
            AttributeError
        ):  # a module of the bridge's own (split projections): read through the fused ones
            continue
        if leaf in mod._parameters and mod._parameters[leaf] is not None or leaf in mod._buffers:
            continue  # the class has the tensor: its value was placed by name (an alias of a placed one)
        out_proj = isinstance(mod, nn.Linear) and mod_path.endswith("self_attn.o_proj")
        if leaf == "bias" and leaf in mod._parameters and (mod_path == head_path or out_proj):
            # the head's: a bias of zeros (RMSNorm has none to fold) changes nothing and is left out; an output
            # projection's (fold_value_biases moves the value biases there) is kept in every layer, zeros too, as
            # the converters read these biases all or none
            if out_proj or bool(t.detach().any()):
                mod._parameters[leaf] = (
                    t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)
                )
            continue
        if leaf == "bias" and mod_path.rpartition(".")[2] in ("out_proj", "dense", "o_proj", "c_proj"):
            why = (
                "fold_value_biases moves the value projections' biases into the attention's output projection, "
                "or fold_ln folds a LayerNorm's bias into it"
            )
            fix = "enable_compatibility_mode(fold_value_biases=False, fold_ln=False)"
        else:
            why = "fold_ln folds each LayerNorm's bias into the projections after it"
            fix = "enable_compatibility_mode(fold_ln=False)"
        raise UnsupportedModelError(
            f"the TransformerBridge's weight processing added {name!r}, which {type(clean).__name__} builds "
            f"without ({why}), so the converted model would leave it out; convert a bridge processed with {fix} "
            "(centring converts), or one without weight processing (no_processing=True)"
        )


def is_native_bridge(bridge: Any) -> bool:
    """True for a TransformerLens 4.x bridge around its own ``NativeModel`` (``TransformerBridge.boot_native``)."""
    inner = getattr(bridge, "_modules", {}).get("original_model", None)
    if inner is None:
        try:
            inner = bridge.original_model
        except AttributeError:
            return False
    return type(inner).__name__ == "NativeModel" and is_transformer_lens(inner)


_NATIVE_ACTS = {
    "gelu": "gelu",
    "gelu_new": "gelu_pytorch_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}
_NATIVE_NORMS = {"LN": "LN", "LNPRE": "LNPre", "RMS": "RMS", "RMSPRE": "RMSPre", None: None}


def convert_native(bridge: Any) -> tuple[dict, dict]:
    """``(config kwargs, weights by pypattern name)`` of a TransformerLens 4.x ``TransformerBridge`` around its
    ``NativeModel`` (``TransformerBridge.boot_native``: split ``q`` / ``k`` / ``v`` / ``o`` linear layers, the
    norms of its config, a bias-free head). Its options that pypattern's model does not reproduce (SoLU, scaled
    rotary tables, non-causal attention, a final RMSNorm under LayerNorm blocks, an output vocabulary other than the
    input one) are refused by name; the logits are checked against the bridge's forward by :func:`from_hf`."""
    import math

    from ._common import refuse

    _check_bridge_hooks(bridge)
    # processed weights (enable_compatibility_mode / process_weights) are read as they are: folded and centred in
    # the native modules' own tensors, the final norm's folded bias a bias of the head (read below)
    nat = bridge.original_model
    c = nat.cfg
    if getattr(c, "attention_dir", "causal") != "causal":
        refuse("attention_dir", c.attention_dir, "only causal attention is converted")
    norm_key = None if c.normalization_type is None else str(c.normalization_type).upper()
    if norm_key not in _NATIVE_NORMS:
        refuse("normalization_type", c.normalization_type, f"the norms converted are {list(_NATIVE_NORMS)}")
    norm = _NATIVE_NORMS[norm_key]
    if getattr(c, "final_rms", False) and norm not in ("RMS", "RMSPre"):
        refuse("final_rms", True, f"a final RMSNorm under {norm} blocks is not converted")
    if norm in ("LNPre", "RMSPre") and nat.tok_embed.weight.dtype != torch.float32:
        refuse(
            "normalization_type",
            c.normalization_type,
            f"in a {str(nat.tok_embed.weight.dtype).removeprefix('torch.')} NativeModel: its parameter-free norms "
            "compute in float32 in another order of operations than pypattern's, which the converted model "
            "reproduces to float32 rounding only; convert a float32 bridge (boot_native(cfg, dtype=torch.float32))",
        )
    attn_only = bool(getattr(c, "attn_only", False))
    gated = bool(getattr(c, "gated_mlp", False)) and not attn_only
    act = (c.act_fn or ("silu" if gated else "gelu")).lower()
    if not attn_only and act not in _NATIVE_ACTS:
        refuse("act_fn", c.act_fn, f"the activations converted are {sorted(_NATIVE_ACTS)}")
    pos = (getattr(c, "positional_embedding_type", None) or "standard").lower()
    if pos not in ("standard", "rotary"):
        refuse("positional_embedding_type", pos, "the positions converted are 'standard' and 'rotary'")
    d_vocab_out = getattr(c, "d_vocab_out", -1)
    if d_vocab_out not in (None, -1, c.d_vocab):
        refuse(
            "d_vocab_out", d_vocab_out, f"pypattern's model unembeds into its input vocabulary ({c.d_vocab})"
        )
    attn0 = _unwrapped(_resolve(nat, "layers.0.attn"))
    scale = float(attn0.scale)  # NativeAttention's: attn_scale when positive and used, else sqrt(d_head)
    if not (math.isfinite(scale) and scale > 0):
        refuse("attn_scale", c.attn_scale, "give a positive attention scale")
    n_kv = c.n_key_value_heads or c.n_heads
    out: dict = dict(
        n_layers=c.n_layers,
        d_model=c.d_model,
        n_heads=c.n_heads,
        d_head=c.d_head,
        d_mlp=None if attn_only else int(c.d_mlp),
        d_vocab=c.d_vocab,
        n_ctx=c.n_ctx,
        act_fn="gelu" if attn_only else _NATIVE_ACTS[act],
        normalization_type=norm,
        # NativeModel's RMS norms and parameter-free norms compute in float32, its LayerNorm is torch's
        norm_dtype=None if norm in ("LN", None) else torch.float32,
        positional_embedding_type=pos,
        ln_eps=float(c.eps),
        n_key_value_heads=None if n_kv == c.n_heads else n_kv,
        gated_mlp=gated,
        attn_bias=True,
        attn_out_bias=True,
        mlp_bias=not gated,
        unembed_bias=False,
        tie_word_embeddings=False,
        attn_scale=scale,
        # the bridge's forward given an attention_mask hands NativeModel positions counted from the mask (each
        # row's real tokens from 0, where a masked token precedes a real one: TransformerLens'
        # get_offset_position_ids), which NativeModel reads for its learned and rotary positions
        positions_from_mask=True,
    )
    cap = float(getattr(c, "attn_scores_soft_cap", -1.0) or -1.0)
    if cap > 0:
        out["attn_scores_soft_cap"] = cap
    cap = float(getattr(c, "output_logits_soft_cap", -1.0) or -1.0)
    if cap > 0:
        out["output_logits_soft_cap"] = cap
    if pos == "rotary":
        rot = _unwrapped(_resolve(nat, "rotary"))
        if float(rot.position_scale) != 1.0 or float(rot.effective_base) != float(c.rotary_base):
            refuse("rope_scaling", getattr(c, "rope_scaling", None), "scaled rotary tables are not converted")
        rs = getattr(c, "rope_scaling", None)
        if isinstance(rs, dict) and str(rs.get("rope_type") or rs.get("type") or "default") not in (
            "",
            "default",
        ):
            refuse("rope_scaling", rs, "scaled rotary tables are not converted")
        out["rotary_dim"] = int(rot.rotary_dim)
        out["rotary_base"] = float(c.rotary_base)
        out["rotary_adjacent_pairs"] = True  # NativeRotary turns adjacent pairs
        out["rotary_dtype"] = torch.float32  # its tables are computed in float32, cast to the queries' dtype
    H, dh, d, G = c.n_heads, c.d_head, c.d_model, n_kv

    def get(path: str) -> Any:  # through the bridge components wrapped around the native modules
        return _unwrapped(_resolve(nat, path))

    w: dict[str, torch.Tensor | None] = {"embed.W_E": get("tok_embed.weight")}
    if pos == "standard":
        w["pos_embed.W_pos"] = get("pos.weight")

    def norm_weights(prefix: str, path: str) -> None:
        if norm in ("LN", "RMS"):
            w[f"{prefix}.w"] = get(f"{path}.weight")
        if norm == "LN":
            w[f"{prefix}.b"] = get(f"{path}.bias")

    for i in range(c.n_layers):
        p, q = f"blocks.{i}.", f"layers.{i}."
        a = get(q + "attn")
        if type(a).__name__ != "NativeAttention":
            raise UnsupportedModelError(f"layer {i}'s attention is a {type(a).__name__}, not NativeAttention")
        for name, lin, heads in (("Q", "q", H), ("K", "k", G), ("V", "v", G)):
            w[p + f"attn.W_{name}"] = get(f"{q}attn.{lin}.weight").view(heads, dh, d).transpose(1, 2)
            w[p + f"attn.b_{name}"] = get(f"{q}attn.{lin}.bias").view(heads, dh)
        w[p + "attn.W_O"] = get(q + "attn.o.weight").T.reshape(H, dh, d)
        w[p + "attn.b_O"] = get(q + "attn.o.bias")
        norm_weights(p + "ln1", q + "ln1")
        if not attn_only:
            norm_weights(p + "ln2", q + "ln2")
            if gated:
                w[p + "mlp.W_gate"] = get(q + "mlp.gate.weight").T
                w[p + "mlp.W_in"] = get(q + "mlp.in.weight").T
                w[p + "mlp.W_out"] = get(q + "mlp.out.weight").T
            else:
                if getattr(get(q + "mlp"), "ln", None) is not None:
                    refuse("act_fn", "solu_ln", "SoLU's MLP LayerNorm is not converted")
                w[p + "mlp.W_in"], w[p + "mlp.b_in"] = (
                    get(q + "mlp.fc_in.weight").T,
                    get(q + "mlp.fc_in.bias"),
                )
                w[p + "mlp.W_out"], w[p + "mlp.b_out"] = (
                    get(q + "mlp.fc_out.weight").T,
                    get(q + "mlp.fc_out.bias"),
                )
    norm_weights("ln_final", "ln_out")
    w["unembed.W_U"] = get("head.weight").T
    # weight processing (fold_ln) folds the final norm's bias into the head, as a bias of its own (NativeModel's
    # head holds a bias buffer of zeros otherwise: left out, as the unprocessed conversion leaves it)
    head_b = getattr(get("head"), "bias", None)
    if (
        getattr(bridge, "_weights_processed", False)
        and isinstance(head_b, torch.Tensor)
        and bool(head_b.any())
    ):
        out["unembed_bias"] = True
        w["unembed.b_U"] = head_b
    return out, w
