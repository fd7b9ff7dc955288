"""Patching sites (which activation is replaced) and grids of cells (where)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._checks import is_count

__all__ = [
    "SITES",
    "HEAD_SITES",
    "KV_SITES",
    "RESID_SITES",
    "Cell",
    "hook_name",
    "site_heads",
    "check_site",
    "apply_patch",
    "make_cells",
]

#: site -> hook name template (TransformerLens names)
SITES = {
    "resid_pre": "blocks.{l}.hook_resid_pre",
    "resid_mid": "blocks.{l}.hook_resid_mid",
    "resid_post": "blocks.{l}.hook_resid_post",
    "attn_out": "blocks.{l}.hook_attn_out",
    "mlp_out": "blocks.{l}.hook_mlp_out",
    "z": "blocks.{l}.attn.hook_z",
    "q": "blocks.{l}.attn.hook_q",
    "k": "blocks.{l}.attn.hook_k",
    "v": "blocks.{l}.attn.hook_v",
    "pattern": "blocks.{l}.attn.hook_pattern",
}
HEAD_SITES = ("z", "q", "k", "v", "pattern")
#: head sites whose heads are key/value heads (``n_key_value_heads`` of them under grouped-query attention)
KV_SITES = ("k", "v")
RESID_SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")


def hook_name(site: str, layer: int) -> str:
    if site not in SITES:
        raise ValueError(f"site={site!r} is not valid; choose one of {list(SITES)}")
    return SITES[site].format(l=layer)


def site_heads(cfg, site: str) -> int:
    """Number of heads of a head site: ``n_key_value_heads`` for ``k``/``v`` (grouped-query attention patches
    key/value heads, as TransformerLens does: one ``k`` cell changes every query head of its group), ``n_heads``
    for ``q``/``z``/``pattern``; 0 for residual sites."""
    if site in KV_SITES:
        return getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
    return cfg.n_heads if site in HEAD_SITES else 0


def check_site(cfg, site: str, argument: str = "site") -> None:
    """Raise a ValueError when ``site`` does not exist in a model of config ``cfg``: ``resid_mid``/``mlp_out``
    in an attention-only model, ``resid_mid`` with parallel attention and MLP."""
    if not isinstance(site, str):
        raise TypeError(f"{argument}={site!r} is not valid; give one site name, one of {list(SITES)}")
    if site not in SITES:
        raise ValueError(f"{argument}={site!r} is not valid; choose one of {list(SITES)}")
    if cfg is None:
        return
    if getattr(cfg, "attn_only", False) and site in ("resid_mid", "mlp_out"):
        raise ValueError(f"{argument}={site!r} does not exist in an attention-only model (d_mlp={cfg.d_mlp})")
    if getattr(cfg, "parallel_attn_mlp", False) and site == "resid_mid":
        raise ValueError(
            f"{argument}='resid_mid' does not exist with parallel_attn_mlp=True (attention and MLP both read "
            "resid_pre, there is no hook_resid_mid); patch resid_pre, attn_out, mlp_out or resid_post"
        )


@dataclass(frozen=True)
class Cell:
    """One patch: ``site`` at layers ``layer .. layer + window - 1``, head ``head`` (-1: not a head site; for
    ``k``/``v`` a key/value head) and position ``pos`` (-1: all positions; for ``pattern``, the query position)."""

    layer: int
    head: int
    pos: int
    window: int = 1

    @property
    def layers(self) -> range:
        return range(self.layer, self.layer + self.window)


def apply_patch(x: torch.Tensor, src: torch.Tensor, site: str, head: int, pos: int) -> torch.Tensor:
    """Return ``x`` with the cell's part replaced by ``src`` (same shape as ``x``).

    Shapes: residual sites ``(batch, pos, d_model)``; ``z/q`` ``(batch, pos, n_heads, d_head)``; ``k/v``
    ``(batch, pos, n_key_value_heads, d_head)`` (``head`` is then a key/value head); ``pattern`` ``(batch,
    n_heads, query_pos, key_pos)``.
    """
    x = x.clone()
    src = src.to(x.dtype)
    p = slice(None) if pos < 0 else pos
    if site == "pattern":
        x[:, head, p] = src[:, head, p]
    elif site in HEAD_SITES:
        x[:, p, head] = src[:, p, head]
    else:
        x[:, p] = src[:, p]
    return x


def _ints(v, name: str) -> list[int]:
    """``v`` (an int, or a sequence / 1-D tensor / 1-D array of ints) as a list of Python ints; anything else is
    named (a tensor or array of more than one dimension too: it is not flattened)."""
    if getattr(v, "ndim", 0) > 1 and hasattr(v, "shape"):
        raise ValueError(
            f"{name} has shape {tuple(v.shape)}; give an int or a 1-D sequence of ints, shared by every example "
            "(one row per example is not supported here)"
        )
    if isinstance(v, torch.Tensor):
        if v.is_floating_point() or v.is_complex() or v.dtype == torch.bool:
            raise TypeError(f"{name} must hold integers, got a {v.dtype} tensor")
        v = v.reshape(-1).tolist()
    elif hasattr(v, "dtype") and hasattr(v, "tolist"):  # numpy
        if v.dtype.kind not in "iu":
            raise TypeError(f"{name} must hold integers, got an array of dtype {v.dtype}")
        v = v.reshape(-1).tolist()
    elif isinstance(v, int) and not isinstance(v, bool):
        v = [v]
    try:
        out = list(v)
    except TypeError:
        raise TypeError(f"{name}={v!r} is not valid; give an int or a sequence of ints") from None
    for x in out:
        if isinstance(x, bool) or not isinstance(x, int):
            if isinstance(x, torch.Tensor):
                if x.dim() == 0 and not (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
                    continue
            elif (
                getattr(getattr(x, "dtype", None), "kind", None) in ("i", "u") and getattr(x, "ndim", 1) == 0
            ):
                continue  # a numpy integer
            raise TypeError(f"{name} contains {x!r}; give ints")
    if not out:
        raise ValueError(f"{name} is empty: it would select nothing; give at least one, or None for all")
    return [int(x) for x in out]


def _sliced(v, n: int, name: str, what: str):
    """``v`` as given, or a ``slice`` applied to ``0 .. n - 1`` (``what`` names that range in an error): the
    selection ``list(range(n))[v]``, as a list of ints (negative bounds count from the end)."""
    if not isinstance(v, slice):
        return v
    try:
        return list(range(n))[v]
    except (TypeError, ValueError) as e:  # bounds that are not ints; a step of 0
        raise type(e)(f"{name}={v!r} is not valid ({e}); give a slice of ints over {what}") from None


def _once(values: list[int], name: str, note: str = "") -> None:
    """Refuse a grid axis that names a value twice (its rows would repeat, and a ranking list each twice)."""
    seen = set()
    for v in values:
        if v in seen:
            raise ValueError(f"{name} names {v} more than once{note}; give each at most once")
        seen.add(v)


def make_cells(
    site: str,
    n_layers: int,
    n_heads: int,
    seq_len: int,
    per_position: bool,
    layers=None,
    heads=None,
    positions=None,
    window: int = 1,
) -> tuple[list[Cell], tuple, dict, tuple]:
    """The grid of cells: returns ``(cells, axes, coords, shape)``; cells are in row-major grid order.

    ``layers``, ``heads`` and ``positions`` (None: all) are ints, sequences of ints, or slices (of the first layers
    ``0 .. n_layers - window``, of the heads, of the positions ``0 .. seq_len - 1``).

    ``n_heads`` is the number of heads of the site (:func:`site_heads`: key/value heads for ``k``/``v``)."""
    if not is_count(window) or window < 1:
        raise ValueError(f"window={window!r} is not valid; give an int >= 1")
    window = int(window)
    if window > n_layers:
        raise ValueError(f"window={window} is longer than the model's {n_layers} layers; give 1..{n_layers}")
    # a slice selects from the valid first layers 0 .. n_layers - window
    layers = _sliced(layers, n_layers - window + 1, "layers", f"the first layers 0..{n_layers - window}")
    layers = list(range(n_layers - window + 1)) if layers is None else _ints(layers, "layers")
    for layer in layers:
        if not 0 <= layer <= n_layers - window:
            raise ValueError(f"layers contains {layer}; valid are 0..{n_layers - window} (window={window})")
    _once(layers, "layers")
    axes, coords = ["layer"], {"layer": layers}
    is_head = site in HEAD_SITES
    if heads is not None and not is_head:
        raise ValueError(
            f"heads={heads!r} is given, but site {site!r} has no heads; heads= selects cells of the per-head sites "
            f"{sorted(HEAD_SITES)}"
        )
    if positions is not None and not per_position:
        raise ValueError(
            f"positions={positions!r} is given with per_position=False, which patches every position at once; "
            "give per_position=True to patch the chosen positions one at a time, or leave positions at None"
        )
    if is_head:
        heads = _sliced(heads, n_heads, "heads", f"the heads 0..{n_heads - 1}")
        heads = list(range(n_heads)) if heads is None else _ints(heads, "heads")
        if any(not 0 <= h < n_heads for h in heads):
            kind = "key/value heads" if site in KV_SITES else "heads"
            raise ValueError(f"heads={heads} is not valid; site {site!r} has {kind} 0..{n_heads - 1}")
        _once(heads, "heads")
        axes.append("head")
        coords["head"] = heads
    if per_position:
        positions = _sliced(positions, seq_len, "positions", f"the positions 0..{seq_len - 1}")
        if positions is not None:
            positions = _ints(positions, "positions")
            bad = [p for p in positions if not -seq_len <= p < seq_len]
            if bad:
                raise ValueError(
                    f"positions contains {bad}: out of range for prompts of {seq_len} positions; "
                    f"valid are {-seq_len}..{seq_len - 1}"
                )
        positions = list(range(seq_len)) if positions is None else [p % seq_len for p in positions]
        _once(
            positions, "positions", f" (prompts of {seq_len} positions; a negative one counts from the end)"
        )
        axes.append("pos")
        coords["pos"] = positions
    hs = coords.get("head", [-1])
    ps = coords.get("pos", [-1])
    cells = [Cell(layer, h, p, window) for layer in layers for h in hs for p in ps]
    shape = tuple(len(coords[a]) for a in axes)
    return cells, tuple(axes), coords, shape
