"""Attribution patching on converted Hugging Face models of several families, against autograd through hooked
forwards of the converted model: AtP's estimate of a cell is the derivative of the logit difference when the
cell's activation moves from the target run's towards the source run's (``x + t (source - x)`` at ``t = 0``, one
``t`` per cell and example); AtP*'s QK fix for ``q`` and ``k`` is the model's own pattern with the cell patched
(a hooked forward) minus the target pattern, dotted with the metric's gradient at the target pattern."""

import pytest
import torch

pytest.importorskip("transformers")

from test_patching_families_fuzz import (  # noqa: E402
    HOOKS,
    converted,
    logit_diff,
    prompts,
    rel_err,
    replace,
    sites_of,
    source_cells,
    tolerance,
)

from pypattern.patching import LogitDiff, attribution_patching  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ATP_FAMILIES = [
    "gpt2",
    "neox-parallel-rot0.5",
    "llama-gqa2-eager",
    "mistral-window3",
    "gemma2-capped-window",
    "gemma3-local-global",
    "falcon-mqa-parallel",
    "bloom-alibi",
    "olmo2-qk-norm",
    "mixtral-moe-window",
    "granite-multipliers",
]


def _write_cells(x, src, site, cells, B):
    """``x`` (copies of the prompts, ``(C * B, ...)``) with copy ``c`` holding cell ``c`` of ``src``."""
    out = x.clone().view(len(cells), B, *x.shape[1:])
    for c, (h, p) in enumerate(cells):
        replace(out[c], src, site, h, p)
    return out.view_as(x)


def _grid(values, cells, positions, layer, out):
    for c, (h, p) in enumerate(cells):
        out[(slice(None), layer) + ((h,) if h is not None else ()) + (positions.index(p),)] = values[
            c
        ].double()


def first_order_grid(model, site, clean, corr, ans, wrong, per_position, direction):
    """``(batch, layer[, head][, pos])``: d/dt at 0 of the logit difference at the last position, the cell's
    activation moved to ``x + t (source - x)``."""
    B, T = clean.shape
    L = model.cfg.n_layers
    tgt_tok, names, cache, n_heads, cells, positions = source_cells(
        model, site, clean, corr, per_position, direction
    )
    C = len(cells)
    out = torch.empty(B, L, *([n_heads] if n_heads else []), len(positions), dtype=torch.float64)
    for layer, name in enumerate(names):
        t = torch.zeros(C * B, dtype=next(model.parameters()).dtype, requires_grad=True)

        def move(x, hook, t=t):
            delta = _write_cells(x.detach(), cache[hook.name], site, cells, B) - x.detach()
            return x + t.view(-1, *[1] * (x.dim() - 1)) * delta

        logits = model.run_with_hooks(tgt_tok.repeat(C, 1), fwd_hooks=[(name, move)])
        ld = logit_diff(logits, ans.repeat(C), wrong.repeat(C), torch.full((C * B,), T - 1))
        (g,) = torch.autograd.grad(ld.sum(), t)
        _grid(g.view(C, B), cells, positions, layer, out)
    return out if per_position else out[..., 0]


def qk_fix_grid(model, site, clean, corr, ans, wrong, per_position, direction):
    """``(batch, layer, head[, pos])``: sum over the pattern of (the pattern with the ``q``/``k`` cell patched -
    the target pattern) times the metric's gradient at the target pattern (a ``k`` cell: over the query heads of its
    group)."""
    B, T = clean.shape
    L = model.cfg.n_layers
    tgt_tok, names, cache, n_heads, cells, positions = source_cells(
        model, site, clean, corr, per_position, direction
    )
    G = model.cfg.n_heads // n_heads
    C = len(cells)
    out = torch.empty(B, L, n_heads, len(positions), dtype=torch.float64)
    for layer, name in enumerate(names):
        pattern = HOOKS["pattern"].format(layer)
        held = {}

        def grab(x, hook, held=held):
            held["target"] = x.detach().requires_grad_(True)
            return held["target"]

        logits = model.run_with_hooks(tgt_tok, fwd_hooks=[(pattern, grab)])
        ld = logit_diff(logits, ans, wrong, torch.full((B,), T - 1))
        (g,) = torch.autograd.grad(ld.sum(), held["target"])

        def keep(x, hook, held=held):
            held["patched"] = x.detach()

        with torch.no_grad():
            hooks = [
                (name, lambda x, hook: _write_cells(x, cache[hook.name], site, cells, B)),
                (pattern, keep),
            ]
            model.run_with_hooks(tgt_tok.repeat(C, 1), fwd_hooks=hooks)
        moved = held["patched"].view(C, *g.shape) - held["target"].detach()
        est = (moved * g).sum((-1, -2)).view(C, B, n_heads, G).sum(-1)  # query head h * G + i reads kv head h
        # the cell's own head only (the other heads' patterns are unchanged: their terms are 0)
        vals = torch.stack([est[c, :, h] for c, (h, _) in enumerate(cells)])
        _grid(vals, cells, positions, layer, out)
    return out if per_position else out[..., 0]


@pytest.mark.parametrize("name", ATP_FAMILIES)
def test_atp_equals_autograd_through_hooks(name):
    model = converted(name)
    clean, corr, ans, wrong = prompts()
    sites = sites_of(model)
    for per_position, direction in ((True, "denoising"), (False, "noising")):
        atp = attribution_patching(
            model, clean, corr, metric=LogitDiff(ans, wrong), sites=sites, per_position=per_position,
            direction=direction,
        )  # fmt: skip
        for site in sites:
            want = first_order_grid(model, site, clean, corr, ans, wrong, per_position, direction)
            err = rel_err(atp[site].effect, want)
            assert err <= tolerance(model), (
                f"{name} {site} per_position={per_position}: relative error {err:.3g}"
            )
            assert want.abs().max() > 1e-3, f"{name} {site}: every derivative vanishes"


@pytest.mark.parametrize("name", ATP_FAMILIES)
def test_qk_fix_equals_patched_patterns(name):
    model = converted(name)
    clean, corr, ans, wrong = prompts()
    # a softmax in float32 in a float64 model rounds the hooked patterns; the closed form of a per-position key
    # cell is taken from the scores
    rounded = model.cfg.attn_softmax_dtype == torch.float32
    for per_position, direction in ((True, "denoising"), (False, "noising")):
        atp = attribution_patching(
            model, clean, corr, metric=LogitDiff(ans, wrong), sites=["q", "k"], per_position=per_position,
            direction=direction, qk_fix=True,
        )  # fmt: skip
        for site in ("q", "k"):
            want = qk_fix_grid(model, site, clean, corr, ans, wrong, per_position, direction)
            tol = 2e-6 if rounded and site == "k" and per_position else 1e-9
            err = rel_err(atp[site].effect, want)
            assert err <= tol, f"{name} {site} per_position={per_position}: relative error {err:.3g}"
