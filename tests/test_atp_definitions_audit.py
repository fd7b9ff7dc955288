"""AtP and AtP* (Kramár et al. 2024) against their definitions, computed naively here on models converted from
Hugging Face (GPT-2; Llama with grouped-query attention and rotary positions; GPT-NeoX with parallel attention and
MLP), in float64, with the metric read at a different position in each example.

- AtP of a cell: ``(a_source - a_target) . dM/da`` at the target run (denoising: clean source, corrupted target;
  noising: the reverse, or an ablation's values as the source), one autograd pass through hooked forwards;
- GradDrop: for each layer l, the same with the gradient through layer l's contribution to the residual stream
  (``attn_out``, ``mlp_out``) zeroed by a tensor hook in the backward; the score is the sum over l of ``|AtP_l|``
  divided by ``L - 1`` (``L`` for a residual-stream node, which every pass reaches);
- QK fix: for each query or key cell, the model's own attention pattern with that cell patched (a hooked forward),
  minus the target pattern, dotted with the metric's gradient at the target pattern (of the full pass or of a
  GradDrop pass), summed over every head (so the heads a key/value head's patch moves are found, not assumed);
- shortlist_and_confirm's exact stage is activation_patching's value of each shortlisted cell."""

import warnings

import pytest
import torch

pytest.importorskip("transformers")

from _hook_names import HEADS, HOOKS  # noqa: E402
from test_patching_families_fuzz import converted, hf_model, prompts  # noqa: E402

from pypattern.patching import (  # noqa: E402
    LogitDiff,
    MeanAblation,
    ZeroAblation,
    activation_patching,
    attribution_patching,
)
from pypattern.patching.attribution import shortlist_and_confirm  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ["gpt2", "llama-gqa2", "neox-parallel-rot0.5"]
B, T = 3, 6
POS = torch.tensor([5, 2, 4])  # the metric's position in each example


def _data():
    clean, corr, ans, wrong = prompts(B=B, T=T)
    return clean, corr, ans, wrong, LogitDiff(ans, wrong, position=POS)


def _logit_diff(logits, ans, wrong):
    rows = logits[torch.arange(logits.shape[0]), POS]
    return rows.gather(-1, ans[:, None])[:, 0] - rows.gather(-1, wrong[:, None])[:, 0]


def _reduce(site, x, per_position):
    """Per-element products -> cells ``(B, [head,] [pos])``: a pattern's query rows, a head site's heads."""
    if site == "pattern":
        r = x.sum(-1)
    elif site in HEADS:
        r = x.sum(-1).transpose(1, 2)
    else:
        r = x.sum(-1)
    return r if per_position else r.sum(-1)


def _cache(model, tokens, names):
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=names)
    return cache


def _zero_grad(x, hook):
    """The value unchanged, the gradient through it zeroed."""
    y = x.view_as(x)
    y.register_hook(torch.zeros_like)
    return y


def _grads(model, tokens, names, ans, wrong, drop=None):
    """The metric's gradient at each hook of ``names`` on the run of ``tokens``; ``drop``: with the gradient
    through layer ``drop``'s attention and MLP outputs zeroed."""
    held = {}

    def grab(x, hook):
        held[hook.name] = x
        return x

    hooks = [("hook_embed", lambda x, hook: x.detach().requires_grad_(True))] + [(n, grab) for n in names]
    if drop is not None:
        hooks += [(HOOKS["attn_out"].format(drop), _zero_grad), (HOOKS["mlp_out"].format(drop), _zero_grad)]
    m = _logit_diff(model.run_with_hooks(tokens, fwd_hooks=hooks), ans, wrong)
    gs = torch.autograd.grad(m.sum(), [held[n] for n in names], allow_unused=True)
    return {n: torch.zeros_like(held[n]) if g is None else g for n, g in zip(names, gs)}


def _all_passes(model, tokens, names, ans, wrong):
    """The full pass's gradients, then one GradDrop pass per layer."""
    L = model.cfg.n_layers
    return [_grads(model, tokens, names, ans, wrong, drop) for drop in [None, *range(L)]]


def _graddrop(ests, site, L):
    return sum(e.abs() for e in ests[1:]) / (L if site.startswith("resid") else L - 1)


def _assert_close(got, want, what):
    err = (got - want).abs().max().item()
    assert err <= 1e-10 * max(1.0, want.abs().max().item()), f"{what}: max error {err:.3g}"


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("direction,per_position", [("denoising", True), ("noising", False)])
def test_atp_and_graddrop_equal_naive_backward_passes(name, direction, per_position):
    model = converted(name, n_layers=3)
    L = model.cfg.n_layers
    clean, corr, ans, wrong, met = _data()
    sites = ["resid_pre", "attn_out", "mlp_out", "z", "v", "pattern", "resid_post"]
    if not model.cfg.parallel_attn_mlp:
        sites.append("resid_mid")
    out = attribution_patching(
        model, clean, corr, metric=met, sites=sites, direction=direction, per_position=per_position,
        grad_drop=True,
    )  # fmt: skip
    src, tgt = (clean, corr) if direction == "denoising" else (corr, clean)
    names = [HOOKS[s].format(layer) for s in sites for layer in range(L)]
    sc, tc = _cache(model, src, names), _cache(model, tgt, names)
    passes = _all_passes(model, tgt, names, ans, wrong)
    for site in sites:
        hooks = [HOOKS[site].format(layer) for layer in range(L)]
        ests = [
            torch.stack([_reduce(site, (sc[n] - tc[n]) * g[n], per_position) for n in hooks], 1)
            for g in passes
        ]
        _assert_close(out[site].effect, ests[0], f"{name} {site} AtP")
        gd = _graddrop(ests, site, L)
        _assert_close(out[site].info["graddrop"], gd, f"{name} {site} GradDrop")
        # the passes differ from the full one: the scores are not plain |AtP|
        assert (gd - ests[0].abs()).abs().max() > 1e-3, f"{name} {site}: no pass changed a gradient"


def _patched_pattern_moves(model, tokens, site, layer, cells, src):
    """``(cells, B, heads, Tq, Tk)``: the pattern of ``layer`` with each ``(head, pos)`` cell (pos None: every
    position) of ``site`` (``q``/``k``) written from ``src``, minus the target pattern; cells batched as copies."""
    C, pat = len(cells), HOOKS["pattern"].format(layer)
    held = {}

    def patch(x, hook):
        x = x.clone().view(C, B, *x.shape[1:])
        for c, (h, p) in enumerate(cells):
            at = slice(None) if p is None else p
            x[c, :, at, h] = src[:, at, h]
        return x.view(C * B, *x.shape[2:])

    def keep(x, hook):
        held["p"] = x.detach()

    with torch.no_grad():
        model.run_with_hooks(tokens.repeat(C, 1), fwd_hooks=[(HOOKS[site].format(layer), patch), (pat, keep)])
    target = _cache(model, tokens, [pat])[pat]
    return held["p"].view(C, *target.shape) - target


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("per_position", [True, False])
def test_qk_fix_with_graddrop_equals_patched_patterns(name, per_position):
    model = converted(name, n_layers=3)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    clean, corr, ans, wrong, met = _data()
    out = attribution_patching(
        model,
        clean,
        corr,
        metric=met,
        sites=["q", "k"],
        qk_fix=True,
        grad_drop=True,
        per_position=per_position,
    )
    pats = [HOOKS["pattern"].format(layer) for layer in range(L)]
    passes = _all_passes(model, corr, pats, ans, wrong)
    positions = list(range(T)) if per_position else [None]
    for site in ("q", "k"):
        hooks = [HOOKS[site].format(layer) for layer in range(L)]
        sc = _cache(model, clean, hooks)
        n_heads = sc[hooks[0]].shape[2]  # key/value heads for k
        cells = [(h, p) for h in range(n_heads) for p in positions]
        ests = [torch.zeros(B, L, n_heads, len(positions), dtype=torch.float64) for _ in passes]
        for layer in range(L):
            moved = _patched_pattern_moves(model, corr, site, layer, cells, sc[hooks[layer]])
            for c, (h, p) in enumerate(cells):
                # the heads whose pattern the cell moves: its own query head, or every query head of a key/value
                # head's group (query head i reads key/value head i // (n_heads / n_key_value_heads))
                heads = set(torch.nonzero(moved[c].abs().amax((0, 2, 3)) > 1e-12).flatten().tolist())
                assert heads <= {i for i in range(H) if i * n_heads // H == h}
                for k, g in enumerate(passes):  # every head's terms summed
                    ests[k][:, layer, h, positions.index(p)] = (moved[c] * g[pats[layer]]).sum((1, 2, 3))
        ests = [e if per_position else e[..., 0] for e in ests]
        _assert_close(out[site].effect, ests[0], f"{name} {site} QK fix")
        _assert_close(out[site].info["graddrop"], _graddrop(ests, site, L), f"{name} {site} QK fix GradDrop")
        assert ests[0].abs().max() > 1e-2


def _masked_mean(x, mask):
    """The mean over the prompts real at each position (``mask (B, T)``), as every prompt's activation."""
    w = mask.to(x.dtype).view(B, T, *[1] * (x.dim() - 2))
    return ((x * w).sum(0, keepdim=True) / w.sum(0, keepdim=True).clamp(min=1)).expand_as(x)


@pytest.mark.parametrize("kind", ["zero", "mean", "mean-masked"])
def test_ablation_sources_equal_naive(kind):
    """Noising with zero and mean ablation: the source of every site (with the QK fix, of queries and keys as the
    scores read them, after rotary positions) is the ablated activation."""
    model = converted("llama-gqa2", n_layers=2)
    L = model.cfg.n_layers
    clean, _, ans, wrong, met = _data()
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3:] = False
    corruption = {
        "zero": ZeroAblation(),
        "mean": MeanAblation(),
        "mean-masked": MeanAblation(attention_mask=mask),
    }[kind]
    mask = mask if kind == "mean-masked" else torch.ones(B, T, dtype=torch.bool)

    def source(x):
        return torch.zeros_like(x) if kind == "zero" else _masked_mean(x, mask)

    sites = ["q", "k", "z", "resid_pre"]
    out = attribution_patching(
        model, clean, metric=met, sites=sites, corruption=corruption, direction="noising", qk_fix=True
    )
    pats = [HOOKS["pattern"].format(layer) for layer in range(L)]
    for site in sites:
        hooks = [HOOKS[site].format(layer) for layer in range(L)]
        tc = _cache(model, clean, hooks)
        if site in ("q", "k"):
            g = _grads(model, clean, pats, ans, wrong)
            n_heads = tc[hooks[0]].shape[2]
            cells = [(h, p) for h in range(n_heads) for p in range(T)]
            want = torch.zeros(B, L, n_heads, T, dtype=torch.float64)
            for layer in range(L):
                moved = _patched_pattern_moves(model, clean, site, layer, cells, source(tc[hooks[layer]]))
                for c, (h, p) in enumerate(cells):
                    want[:, layer, h, p] = (moved[c] * g[pats[layer]]).sum((1, 2, 3))
        else:
            g = _grads(model, clean, hooks, ans, wrong)
            want = torch.stack([_reduce(site, (source(tc[n]) - tc[n]) * g[n], True) for n in hooks], 1)
        _assert_close(out[site].effect, want, f"{kind} {site}")
        assert want.abs().max() > 1e-2


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(direction="noising", grad_drop=True),
        dict(per_position=False),
        dict(corruption=MeanAblation(), direction="noising"),
    ],
)
def test_shortlist_exact_stage_equals_activation_patching(kw):
    model = converted("llama-gqa2", n_layers=2)
    clean, corr, _, _, met = _data()
    toks = () if "corruption" in kw else (corr,)
    common = {a: kw[a] for a in ("corruption", "direction", "per_position") if a in kw}
    for site in ("k", "pattern"):
        rows = shortlist_and_confirm(model, site, clean, *toks, metric=met, k=6, **kw)
        exact = activation_patching(model, site, clean, *toks, metric=met, **common).effect.mean(0)
        assert len(rows) == min(6, exact.numel())
        for r in rows:
            at = tuple(r[a] for a in ("layer", "head", "pos") if a in r)
            assert r["exact"] == pytest.approx(exact[at].item(), abs=1e-12)


def test_shortlist_exact_stage_with_hooks_attached_and_a_hugging_face_model():
    """The exact stage's per-cell forwards (hooks attached to the model) and a Hugging Face model given as it is
    (converted by both stages) agree with activation_patching too."""
    clean, corr, _, _, met = _data()
    model = converted("llama-gqa2", n_layers=2)
    want = activation_patching(model, "v", clean, corr, metric=met).effect.mean(0)
    rows = shortlist_and_confirm(hf_model("llama-gqa2", n_layers=2), "v", clean, corr, metric=met, k=5)
    for r in rows:
        assert r["exact"] == pytest.approx(want[r["layer"], r["head"], r["pos"]].item(), abs=1e-12)
    model.blocks[0].hook_resid_mid.add_hook(lambda x, hook: 0.5 * x)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows = shortlist_and_confirm(model, "v", clean, corr, metric=met, k=5)
            hooked = activation_patching(model, "v", clean, corr, metric=met).effect.mean(0)
    finally:
        model.reset_hooks()
    assert (hooked - want).abs().max() > 1e-3  # the hook changes the values
    for r in rows:
        assert r["exact"] == pytest.approx(hooked[r["layer"], r["head"], r["pos"]].item(), abs=1e-12)


def test_parameters_requires_grad_grad_and_values_are_left_as_they_were():
    model = converted("neox-parallel-rot0.5", n_layers=2)
    clean, corr, _, _, met = _data()
    params = list(model.named_parameters())
    for i, (_, p) in enumerate(params):
        p.requires_grad_(i % 3 != 0)
        p.grad = torch.full_like(p, float(i)) if i % 2 == 0 else None
    before = {
        n: (p.requires_grad, None if p.grad is None else p.grad.clone(), p.detach().clone())
        for n, p in params
    }
    kw = dict(metric=met, qk_fix=True, grad_drop=True)
    attribution_patching(model, clean, corr, sites=["q", "k", "z", "resid_pre"], **kw)
    with torch.no_grad():
        attribution_patching(model, clean, corr, sites=["z"], max_batch=2, **kw)
    shortlist_and_confirm(model, "k", clean, corr, k=3, **kw)
    for n, p in params:
        requires_grad, grad, value = before[n]
        assert p.requires_grad == requires_grad, n
        assert (p.grad is None) == (grad is None), n
        assert grad is None or torch.equal(p.grad, grad), n
        assert torch.equal(p.detach(), value), n


def test_parts_of_max_batch_equal_one_pass_with_masked_mean_ablation_and_qk_fix():
    model = converted("llama-gqa2", n_layers=3)
    clean, _, _, _, met = _data()
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 3:] = 0
    kw = dict(
        metric=met, sites=["q", "k", "v", "pattern", "resid_mid"], corruption=MeanAblation(attention_mask=mask),
        direction="noising", qk_fix=True, grad_drop=True,
    )  # fmt: skip
    whole = attribution_patching(model, clean, **kw)
    parts = attribution_patching(model, clean, max_batch=2, **kw)
    for site, r in whole.items():
        torch.testing.assert_close(parts[site].values, r.values, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(parts[site].info["graddrop"], r.info["graddrop"], rtol=1e-12, atol=1e-12)


def _project_out(x, hook):
    """Remove the residual stream's component along a fixed direction (its Jacobian is not the identity)."""
    d = torch.nn.functional.normalize(torch.linspace(-1.0, 1.0, x.shape[-1], dtype=x.dtype), dim=0)
    return x - (x @ d)[..., None] * d


def _halve_gradient(grad, hook):
    return 0.5 * grad


@pytest.mark.parametrize(
    "point,fn,dir",
    [
        ("hook_resid_mid", _project_out, "fwd"),
        ("hook_resid_post", _project_out, "fwd"),
        ("hook_resid_mid", _halve_gradient, "bwd"),
    ],
)
def test_graddrop_with_a_function_attached_to_the_residual_stream(point, fn, dir):
    """GradDrop's passes of the model as its hooks make it: a function attached to the residual stream inside a
    layer is on the path that layer's pass keeps."""
    model = converted("gpt2", n_layers=3)
    L = model.cfg.n_layers
    clean, corr, ans, wrong, met = _data()
    sites = ["resid_pre", "resid_mid", "z", "mlp_out", "pattern"]
    model.blocks[1].get_submodule(point).add_hook(fn, dir=dir)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = attribution_patching(
                model, clean, corr, metric=met, sites=["k", *sites], qk_fix=True, grad_drop=True
            )
        names = [HOOKS[s].format(layer) for s in sites for layer in range(L)]
        sc, tc = _cache(model, clean, names), _cache(model, corr, names)
        passes = _all_passes(model, corr, names, ans, wrong)
    finally:
        model.reset_hooks(including_permanent=True)
    for site in sites:
        hooks = [HOOKS[site].format(layer) for layer in range(L)]
        ests = [torch.stack([_reduce(site, (sc[n] - tc[n]) * g[n], True) for n in hooks], 1) for g in passes]
        _assert_close(out[site].effect, ests[0], f"{point} {site} AtP")
        _assert_close(out[site].info["graddrop"], _graddrop(ests, site, L), f"{point} {site} GradDrop")
