"""Cells whose patch cannot change the metric come out exactly at the target run's metric (effect exactly 0).

By construction a cell changes nothing where the patch writes what the target run holds (positions before the
first corrupted token, tokens that agree), after the metric's position in a causal model, or where what it
changes cannot reach the metric's row (a row-local patch in the last block at another row, keys beyond a sliding
window). Each case is checked against a float64 loop of hooked forwards written here (one forward per cell and
example set) and a reachability worked out here from the model's mask: exact zeros where they must be, agreement
within 1e-9 elsewhere; in the same cells AtP and AtP* give exactly 0, and shortlist_and_confirm confirms 0.
"""

import warnings

import pytest
import torch

from pypattern.models import Transformer, TransformerConfig
from pypattern.patching import (
    LogitDiff,
    MeanAblation,
    activation_patching,
    attribution_patching,
    shortlist_and_confirm,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SITES = ["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z", "q", "k", "v", "pattern"]
HEADS = ("z", "q", "k", "v", "pattern")
HOOK = {
    "resid_pre": "blocks.{}.hook_resid_pre",
    "resid_mid": "blocks.{}.hook_resid_mid",
    "resid_post": "blocks.{}.hook_resid_post",
    "attn_out": "blocks.{}.hook_attn_out",
    "mlp_out": "blocks.{}.hook_mlp_out",
    "z": "blocks.{}.attn.hook_z",
    "q": "blocks.{}.attn.hook_q",
    "k": "blocks.{}.attn.hook_k",
    "v": "blocks.{}.attn.hook_v",
    "pattern": "blocks.{}.attn.hook_pattern",
}

CONFIGS = {
    "plain": {},
    "window_rotary_gqa": dict(
        sliding_window=2, positional_embedding_type="rotary", n_heads=4, n_key_value_heads=2
    ),
    "parallel": dict(parallel_attn_mlp=True),
}


def make(dtype=torch.float64, **kw):
    cfg = dict(n_layers=3, d_model=16, n_heads=2, d_mlp=32, d_vocab=12, n_ctx=10, dtype=dtype, seed=5)
    cfg.update(kw)
    model = Transformer(TransformerConfig(**cfg))
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, 12, (3, 7), generator=g)
    corr = clean.clone()
    corr[:, 3] = (clean[:, 3] + 1) % 12  # positions 0..2 agree in every prompt
    corr[1, 5] = (clean[1, 5] + 2) % 12
    corr[2] = clean[2]  # the third prompt is not corrupted at all
    corr[2, 6] = (clean[2, 6] + 3) % 12  # ... but after its metric position
    metric = LogitDiff(torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]), position=torch.tensor([5, 6, 4]))
    return model, clean, corr, metric


def run_cache(model, tokens, names):
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    return logits, cache


def patch(x, src, site, head, pos):
    x = x.clone()
    p = slice(None) if pos < 0 else pos
    if site == "pattern":
        x[:, head, p] = src[:, head, p]
    elif site in HEADS:
        x[:, p, head] = src[:, p, head]
    else:
        x[:, p] = src[:, p]
    return x


def patcher(src, site, head, pos):
    return lambda x, hook: patch(x, src, site, head, pos)


def keeper(got):
    def keep(x, hook):
        got["final"] = x
        return x

    return keep


def reference(model, site, target_tokens, source, cells, metric, window=1):
    """The metric of each cell's patched run, ``(n_cells, batch)``, and the final residual rows at the metric
    positions ``(n_cells, batch, d_model)``, one hooked forward per cell."""
    L = model.cfg.n_layers
    m = metric.position
    vals, rows = [], []
    for layer, head, pos in cells:
        hooks = [
            (HOOK[site].format(lw), patcher(source[HOOK[site].format(lw)], site, head, pos))
            for lw in range(layer, layer + window)
        ]
        got = {}
        keep = keeper(got)

        with torch.no_grad():
            logits = model.run_with_hooks(
                target_tokens, fwd_hooks=hooks + [(f"blocks.{L - 1}.hook_resid_post", keep)]
            )
        b = torch.arange(len(m))
        vals.append(metric(logits[b, m]))
        rows.append(got["final"][b, m])
    return torch.stack(vals), torch.stack(rows)


def reachable(cfg, site, layer, pos, m):
    """Whether a patch of ``site`` at (layer, pos) can reach the final residual at ``m``: backwards from ``m``
    through each block's keys (later keys masked, and keys ``sliding_window`` or more back)."""
    L, w = cfg.n_layers, cfg.sliding_window
    S = {m}  # rows of the residual after block l that reach the metric
    for lay in reversed(range(L)):
        keys = {k for q in S for k in range(q + 1) if w is None or q - k < w}
        if lay == layer:
            if site in ("k", "v"):
                return pos in keys
            if site == "resid_pre":
                return pos in S | keys
            return pos in S
        S = S | keys
    raise AssertionError


def must_be_zero(model, site, cells, target, source, m, window=1):
    """``(n_cells, batch)`` bool: the cells whose patch writes the target's own activation at every position it
    can reach the metric from, or reaches nothing."""
    out = torch.zeros(len(cells), len(m), dtype=torch.bool)
    for i, (layer, head, pos) in enumerate(cells):
        for b in range(len(m)):
            same = True
            for lw in range(layer, layer + window):
                name = HOOK[site].format(lw)
                s, t = source[name][b], target[name][b]
                T = t.shape[1] if site == "pattern" else t.shape[0]
                for p in range(T) if pos < 0 else [pos]:
                    if not reachable(model.cfg, site, lw, p, int(m[b])):
                        continue
                    if site == "pattern":
                        a, c = s[head, p], t[head, p]
                    elif site in HEADS:
                        a, c = s[p, head], t[p, head]
                    else:
                        a, c = s[p], t[p]
                    same = same and torch.equal(a, c)
            out[i, b] = same
    return out


def grid_cells(res):
    heads = res.coords.get("head", [-1])
    pos = res.coords.get("pos", [-1])
    return [(layer, h, p) for layer in res.coords["layer"] for h in heads for p in pos]


def check(res, ref_vals, zero, target):
    """``res`` (a PatchResult) equals the target exactly where ``zero``, the reference within 1e-9 elsewhere."""
    vals = res.values.reshape(res.values.shape[0], -1).T  # (n_cells, batch)
    t = target.expand_as(vals)
    assert bool(zero.any()) and bool((~zero).any())
    bad = (vals != t) & zero
    assert not bool(bad.any()), (
        f"{res.site}: {int(bad.sum())} cells should be exactly the target, off by "
        + str((vals - t)[bad].abs().max().item())
    )
    err = (vals - ref_vals).abs().max().item()
    assert err <= 1e-9, f"{res.site}: differs from the hooked loop by {err}"


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("method", ["exact", "naive"])
def test_inert_cells_exact_per_position(config, method):
    model, clean, corr, metric = make(**CONFIGS[config])
    names = {HOOK[s].format(layer) for s in SITES for layer in range(3)}
    _, ccache = run_cache(model, clean, names)
    _, kcache = run_cache(model, corr, names)
    for site in SITES:
        if site == "resid_mid" and config == "parallel":
            continue
        res = activation_patching(model, site, clean, corr, metric=metric, method=method, quiet=True)
        cells = grid_cells(res)
        zero = must_be_zero(model, site, cells, kcache, ccache, metric.position)
        ref_vals, ref_rows = reference(model, site, corr, ccache, cells, metric)
        # the reference's own final rows do not move where the construction says nothing can
        _, base_rows = reference(model, site, corr, kcache, cells[:1], metric)
        assert torch.equal(ref_rows[zero], base_rows[0].expand_as(ref_rows)[zero])
        check(res, ref_vals, zero, res.corrupted)


@pytest.mark.parametrize("per_position", [True, False])
def test_inert_cells_window_and_all_positions(per_position):
    model, clean, corr, metric = make(**CONFIGS["window_rotary_gqa"])
    names = {HOOK[s].format(layer) for s in SITES for layer in range(3)}
    _, ccache = run_cache(model, clean, names)
    _, kcache = run_cache(model, corr, names)
    for site in ("resid_pre", "attn_out", "z", "k"):
        res = activation_patching(
            model, site, clean, corr, metric=metric, window=2, per_position=per_position, quiet=True
        )
        cells = grid_cells(res)
        zero = must_be_zero(model, site, cells, kcache, ccache, metric.position, window=2)
        ref_vals, _ = reference(model, site, corr, ccache, cells, metric, window=2)
        if not per_position:  # only the uncorrupted prompt is inert over all positions
            assert bool(zero[:, 2].all()) and not bool(zero[:, :2].any())
        check(res, ref_vals, zero, res.corrupted)


def test_inert_cells_noising_mean_ablation():
    """Noising with a mean over the prompts: where every prompt holds the same activation (the positions before
    the first differing token in a batch whose prompts agree there) the mean is that activation."""
    model, clean, _, metric = make()
    clean = clean.clone()
    clean[:, :2] = clean[0, :2]  # every prompt starts with the same two tokens
    names = {HOOK[s].format(layer) for s in SITES for layer in range(3)}
    _, ccache = run_cache(model, clean, names)
    for site in ("resid_pre", "mlp_out", "v"):
        res = activation_patching(
            model, site, clean, metric=metric, corruption=MeanAblation(), direction="noising", quiet=True
        )
        # the ablation's source as the library's contract says: the mean over the prompts at each position
        source = {n: ccache[n].mean(0, keepdim=True).expand_as(ccache[n]) for n in ccache}
        cells = grid_cells(res)
        zero = must_be_zero(model, site, cells, ccache, source, metric.position)
        ref_vals, _ = reference(model, site, clean, source, cells, metric)
        check(res, ref_vals, zero, res.clean)


def test_metric_relating_examples_only_inert_for_all():
    """A metric centred over the batch relates the examples: a cell inert for one example but not another moves
    both values, and is computed; a cell inert for every example stays exactly 0."""
    model, clean, corr, _ = make()
    pos = 5

    def centred(logits):
        d = logits[..., 1] - logits[..., 4]
        return d - d.mean(-1, keepdim=True)

    centred.position = pos
    names = {HOOK["resid_pre"].format(layer) for layer in range(3)}
    _, ccache = run_cache(model, clean, names)
    _, kcache = run_cache(model, corr, names)
    res = activation_patching(model, "resid_pre", clean, corr, metric=centred, quiet=True)
    cells = grid_cells(res)
    vals = res.values.reshape(3, -1).T
    m = torch.tensor([pos] * 3)
    zero = must_be_zero(model, "resid_pre", cells, kcache, ccache, m)
    both = zero.all(1)
    some = zero.any(1) & ~both
    assert bool(both.any()) and bool(some.any())
    ref_vals = []
    for layer, _, p in cells:
        name = HOOK["resid_pre"].format(layer)
        with torch.no_grad():
            logits = model.run_with_hooks(
                corr, fwd_hooks=[(name, lambda x, hook, s=ccache[name], p=p: patch(x, s, "resid_pre", -1, p))]
            )
        ref_vals.append(centred(logits[:, pos]))
    ref_vals = torch.stack(ref_vals)
    assert torch.equal(vals[both], res.corrupted.expand_as(vals)[both])
    assert (vals - ref_vals).abs().max().item() <= 1e-9
    # the examples inert on their own still move with the others
    assert (vals[some] - res.corrupted).abs().max().item() > 1e-6


@pytest.mark.parametrize("config", ["plain", "window_rotary_gqa"])
@pytest.mark.parametrize("qk_fix,grad_drop", [(False, False), (True, False), (True, True)])
def test_atp_zero_in_inert_cells(config, qk_fix, grad_drop):
    model, clean, corr, metric = make(torch.float32, **CONFIGS[config])
    sites = ["resid_pre", "attn_out", "z", "q", "k", "v", "pattern"]
    atp = attribution_patching(
        model, clean, corr, metric=metric, sites=sites, qk_fix=qk_fix, grad_drop=grad_drop, max_memory=None
    )
    names = {HOOK[s].format(layer) for s in sites for layer in range(3)}
    _, ccache = run_cache(model, clean, names)
    _, kcache = run_cache(model, corr, names)
    for site in sites:
        res = atp[site]
        cells = grid_cells(res)
        zero = must_be_zero(model, site, cells, kcache, ccache, metric.position)
        eff = res.effect.reshape(3, -1).T
        assert bool(zero.any())
        assert not bool((eff[zero] != 0).any()), f"{site}: AtP {eff[zero].abs().max().item()} at inert cells"
        if grad_drop:
            gd = res.info["graddrop"].reshape(3, -1).T
            assert not bool((gd[zero] != 0).any()), f"{site}: GradDrop nonzero at inert cells"


def test_shortlist_and_confirm_inert_cells_exact_zero():
    """Every cell of the grid confirmed: the inert ones (for every example) at exactly 0, the others the float64
    loop's mean effect."""
    model, clean, corr, metric = make()
    names = {HOOK["k"].format(layer) for layer in range(3)}
    _, ccache = run_cache(model, clean, names)
    _, kcache = run_cache(model, corr, names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = shortlist_and_confirm(model, "k", clean, corr, metric=metric, k=3 * 2 * 7)
    cells = [(c["layer"], c["head"], c["pos"]) for c in out]
    zero = must_be_zero(model, "k", cells, kcache, ccache, metric.position)
    ref_vals, _ = reference(model, "k", corr, ccache, cells, metric)
    with torch.no_grad():
        logits = model(corr)
    target = metric(logits[torch.arange(3), metric.position])
    for c, z, r in zip(out, zero, ref_vals):
        if bool(z.all()):
            assert c["exact"] == 0.0
            assert c["atp"] == 0.0
        else:
            assert abs(c["exact"] - float((r - target).mean())) <= 1e-9


def test_model_with_attached_hooks_keeps_only_the_identity_rule():
    """A function attached to the model may mix positions (here: each row reads the next one), so the naive loop it
    gets judges a cell inert only where the source equals the target at every example: a patch after the metric's
    position is computed (and moves the metric through the attached function), an identical one is exact."""
    model, clean, corr, _ = make()
    metric = LogitDiff(torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]), position=torch.tensor([2, 2, 2]))
    model.add_hook("blocks.1.hook_resid_pre", lambda x, hook: x + 0.5 * torch.roll(x, -1, 1))
    names = {HOOK["resid_pre"].format(layer) for layer in range(3)}
    _, ccache = run_cache(model, clean, names)
    _, kcache = run_cache(model, corr, names)
    with pytest.warns(UserWarning, match="hooks attached"):
        res = activation_patching(model, "resid_pre", clean, corr, metric=metric, quiet=True)
    assert res.method == "naive"
    cells = grid_cells(res)
    ref_vals, _ = reference(model, "resid_pre", corr, ccache, cells, metric)
    same = torch.tensor(
        [torch.equal(ccache[HOOK["resid_pre"].format(lay)][:, p], kcache[HOOK["resid_pre"].format(lay)][:, p])
         for lay, _, p in cells]
    )  # fmt: skip
    zero = same[:, None].expand(-1, 3)
    check(res, ref_vals, zero, res.corrupted)
    after = torch.tensor([p > 2 for _, _, p in cells])
    vals = res.values.reshape(3, -1).T
    assert (vals[after] - res.corrupted).abs().max().item() > 1e-3  # reached through the attached function
