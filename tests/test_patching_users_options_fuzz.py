"""Activation and attribution patching under the options a user combines, each against an independent computation
written here: a naive loop (one forward per cell, the cell's activation replaced by a plain hook, the metric
written out from the logits), and autograd for the first-order terms (AtP, the QK fix from recomputed patterns,
GradDrop from backward passes with a layer's outputs detached).

Options: every metric class and a plain callable, per-example metric positions, every corruption, both
directions, ``per_position``, grid subsets given as lists, ranges, negative positions, tensors and numpy integers,
``method``, ``max_batch`` / ``max_memory``, float32 and float64, prompts of one token, one prompt, right padding,
and models of several architectures (grouped-query attention, rotary, parallel attention and MLP, attention
only, gated MLP) and converted Hugging Face models. Also the result object (ranking, tables, save and load, the
heatmap) and a grid resumed under other batch settings (only the cells left computed, each counted once)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from pypattern.models import Transformer, TransformerConfig
from pypattern.patching import (
    KL,
    GaussianNoise,
    LogitDiff,
    LogProb,
    MeanAblation,
    PatchResult,
    Prob,
    TokenReplacement,
    ZeroAblation,
    activation_patching,
    attribution_patching,
    shortlist_and_confirm,
)
from pypattern.patching import api as patching_api
from pypattern.patching.engine import ExactEngine

pytestmark = pytest.mark.usefixtures("one_thread")

V = 13
HEADS = ("z", "q", "k", "v", "pattern")
RESID = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")

ARCHS = {
    "base": dict(),
    "gqa_rotary_rms": dict(
        n_heads=4, n_key_value_heads=2, positional_embedding_type="rotary", normalization_type="RMS"
    ),
    "parallel_rotary": dict(parallel_attn_mlp=True, positional_embedding_type="rotary"),
    "attn_only": dict(d_mlp=None),
    "gated_no_bias": dict(gated_mlp=True, act_fn="silu", attn_bias=False, mlp_bias=False, unembed_bias=False),
}


def make_model(arch: str, dtype=torch.float64, n_layers: int = 2, seed: int = 3) -> Transformer:
    kw = dict(n_layers=n_layers, d_model=16, n_heads=2, d_mlp=24, d_vocab=V, n_ctx=8, dtype=dtype, seed=seed)
    kw.update(ARCHS[arch])
    return Transformer(TransformerConfig(**kw))


def sites_of(model) -> list[str]:
    cfg = model.cfg
    out = ["resid_pre", "resid_post", "attn_out", *HEADS]
    if not cfg.attn_only:
        out.append("mlp_out")
        if not cfg.parallel_attn_mlp:
            out.append("resid_mid")
    return out


def hook(site: str, layer: int) -> str:
    if site in HEADS:
        return f"blocks.{layer}.attn.hook_{site}"
    return f"blocks.{layer}.hook_{site}"


# ----------------------------------------------------------------------------------------------- the reference


def at(logits: torch.Tensor, pos) -> torch.Tensor:
    """Logits ``(B, T, V)`` at the metric position(s): ``(B, V)``."""
    B = logits.shape[0]
    if isinstance(pos, int):
        return logits[:, pos]
    return logits[torch.arange(B), pos]


def metric_fn(kind: str, answer, wrong, clean_at):
    """The metric written out from logits ``(B, V)`` at its position."""
    rows = torch.arange(answer.shape[0])
    if kind == "logit_diff":
        return lambda lg: lg[rows, answer] - lg[rows, wrong]
    if kind == "logprob":
        return lambda lg: torch.log_softmax(lg, -1)[rows, answer]
    if kind == "prob":
        return lambda lg: torch.softmax(lg, -1)[rows, answer]
    if kind == "kl":
        lp_cl = torch.log_softmax(clean_at, -1)
        return lambda lg: -(lp_cl.exp() * (lp_cl - torch.log_softmax(lg, -1))).sum(-1)
    if kind == "callable":
        return lambda lg: custom(lg)
    raise AssertionError(kind)


def custom(logits: torch.Tensor) -> torch.Tensor:
    """A user's metric: logits ``(..., batch, vocab)`` -> ``(..., batch)``."""
    return logits[..., 2] - 0.5 * torch.logsumexp(logits, -1)


def library_metric(kind: str, answer, wrong, position):
    if kind == "logit_diff":
        return LogitDiff(answer, wrong, position=position)
    if kind == "logprob":
        return LogProb(answer, position=position)
    if kind == "prob":
        return Prob(answer, position=position)
    if kind == "kl":
        return KL(position=position)
    assert kind == "callable" and position == -1
    return custom


def noise_of(model, B: int, T: int, seed: int, positions=None, mult: float = 3.0) -> torch.Tensor:
    """Gaussian noise as documented: 3 x std of W_E, drawn in float64 from ``seed`` with shape (B, T, d_model)."""
    std = mult * float(model.embed.W_E.detach().double().std())
    g = torch.Generator().manual_seed(seed)
    n = torch.randn(B, T, model.cfg.d_model, generator=g, dtype=torch.float64) * std
    if positions is not None:
        keep = torch.zeros(B, T, dtype=torch.float64)
        keep[:, positions] = 1.0
        n = n * keep[:, :, None]
    return n.to(model.cfg.dtype)


def noise_hooks(noise):
    return [] if noise is None else [("hook_embed", lambda x, hook: x + noise.to(x.dtype))]


def run(model, tokens, noise=None, hooks=()):
    return model.run_with_hooks(tokens, fwd_hooks=noise_hooks(noise) + list(hooks))


def cache(model, tokens, noise=None) -> dict:
    out = {}

    def keep(x, hook):
        out[hook.name] = x.detach().clone()
        return x

    run(model, tokens, noise, [(n, keep) for n in model.hook_dict if n.startswith("blocks.")])
    return out


def index(site: str, head: int, pos: int):
    p = slice(None) if pos < 0 else pos
    h = slice(None) if head < 0 else head
    if site == "pattern":
        return (slice(None), h, p)
    if site in HEADS:
        return (slice(None), p, h)
    return (slice(None), p)


def replace(site, head, pos, src):
    def fn(x, hook):
        x = x.clone()
        ix = index(site, head, pos)
        x[ix] = src[ix].to(x.dtype)
        return x

    return fn


class Setup:
    """The clean, target and source runs of one experiment, computed here."""

    def __init__(
        self, model, clean, corrupt, noise, ablation, reference, direction, kind, answer, wrong, pos
    ):
        self.model, self.pos, self.direction = model, pos, direction
        with torch.no_grad():
            cl_logits = run(model, clean)
            self.clean_cache = cache(model, clean)
            corr_tokens = clean if corrupt is None else corrupt
            has_corr = ablation is None
            self.metric = metric_fn(kind, answer, wrong, at(cl_logits, pos))
            self.m_clean = self.metric(at(cl_logits, pos))
            self.m_corr = None
            if has_corr:
                self.m_corr = self.metric(at(run(model, corr_tokens, noise), pos))
                corr_cache = cache(model, corr_tokens, noise)
        if direction == "denoising":
            self.tokens, self.noise, self.source = corr_tokens, noise, self.clean_cache
        else:
            self.tokens, self.noise = clean, None
            if ablation == "zero":
                self.source = {n: torch.zeros_like(x) for n, x in self.clean_cache.items()}
            elif ablation == "mean":
                ref = self.clean_cache if reference is None else cache(model, reference)
                self.source = {
                    n: x.mean(0, keepdim=True).expand_as(self.clean_cache[n]) for n, x in ref.items()
                }
            else:
                self.source = corr_cache
        self.target = self.m_corr if direction == "denoising" else self.m_clean

    def grid(self, site, layers, heads, positions, window=1) -> torch.Tensor:
        """One forward per cell: ``(B, layers[, heads][, positions])``."""
        hs = heads if heads is not None else [-1]
        ps = positions if positions is not None else [-1]
        out = []
        with torch.no_grad():
            for layer in layers:
                for h in hs:
                    for p in ps:
                        hooks = [
                            (hook(site, lw), replace(site, h, p, self.source[hook(site, lw)]))
                            for lw in range(layer, layer + window)
                        ]
                        out.append(self.metric(at(run(self.model, self.tokens, self.noise, hooks), self.pos)))
        shape = (
            [len(layers)]
            + ([len(hs)] if heads is not None else [])
            + ([len(ps)] if positions is not None else [])
        )
        return torch.stack(out, 1).reshape(-1, *shape)


def close(got: torch.Tensor, want: torch.Tensor, dtype, what: str) -> None:
    assert got.shape == want.shape, (what, got.shape, want.shape)
    got, want = got.double().cpu(), want.double().cpu()
    scale = 1.0 + float(want.abs().max())
    tol = 1e-10 if dtype == torch.float64 else 3e-4
    err = float((got - want).abs().max())
    assert err <= tol * scale, f"{what}: largest difference {err:.3g} (scale {scale:.3g})"


# ---------------------------------------------------------------------------------- exact patching vs the loop


def grid_arg(rng, name: str, values: list[int], n: int, allow_negative: bool):
    """A random subset of ``values`` (``n`` = the axis' size) in one of the forms a user gives, with the list it
    means; or None for all."""
    form = rng.choice(["none", "list", "range", "tensor", "numpy", "numpy_ints", "int", "negative"])
    if form == "none":
        return None, list(values)
    if form == "range":
        a = rng.randrange(n)
        b = rng.randint(a + 1, n)
        return range(a, b), list(range(a, b))
    pick = rng.sample(values, rng.randint(1, len(values)))
    if form == "int":
        return pick[0], [pick[0]]
    if form == "negative" and allow_negative:
        neg = [p - n if rng.random() < 0.6 else p for p in pick]
        return neg, pick
    if form == "tensor":
        return torch.tensor(pick), pick
    if form == "numpy":
        return np.array(pick, dtype=np.int32), pick
    if form == "numpy_ints":
        return [np.int64(p) for p in pick], pick
    return pick, pick


@pytest.mark.parametrize("seed", range(22))
def test_random_options_equal_the_naive_loop(seed, monkeypatch):
    rng = random.Random(seed)
    arch = rng.choice(sorted(ARCHS))
    dtype = torch.float64 if rng.random() < 0.75 else torch.float32
    L = rng.choice([1, 2, 3])
    model = make_model(arch, dtype, n_layers=L, seed=seed)
    B, T = rng.choice([1, 2, 3]), rng.choice([1, 2, 4, 6])
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, V, (B, T), generator=g)
    kind = rng.choice(["logit_diff", "logprob", "prob", "kl", "callable"])
    answer, wrong = torch.randint(0, V, (B,), generator=g), torch.randint(0, V, (B,), generator=g)
    wrong = torch.where(wrong == answer, (answer + 1) % V, wrong)
    if kind == "callable" or rng.random() < 0.5:
        position, pos = -1, T - 1
    elif rng.random() < 0.5:
        pos = rng.randrange(T)
        position = pos - T if rng.random() < 0.5 else pos
    else:
        pos = torch.randint(0, T, (B,), generator=g)
        position = pos if rng.random() < 0.5 else pos - T  # negative per-example positions too
    corruption_kind = rng.choice(["tokens", "noise", "zero", "mean", "mean_reference"])
    corrupt, noise, ablation, reference, corruption = None, None, None, None, None
    if corruption_kind == "tokens":
        corrupt = clean.clone()
        corrupt[:, rng.randrange(T)] = torch.randint(0, V, (B,), generator=g)
        corrupt[:, 0] = (clean[:, 0] + 1) % V
        if rng.random() < 0.4:  # the same run as corrupted_tokens=...
            corruption = TokenReplacement(corrupt.int() if rng.random() < 0.5 else corrupt)
    elif corruption_kind == "noise":
        npos = rng.choice([None, [0], [T - 1]])
        nseed = rng.randrange(10**6)
        corruption = GaussianNoise(positions=npos, seed=nseed)
        noise = noise_of(model, B, T, nseed, npos)
    elif corruption_kind == "zero":
        ablation, corruption = "zero", ZeroAblation()
    else:
        ablation = "mean"
        if corruption_kind == "mean_reference":
            reference = torch.randint(0, V, (4, T), generator=g)
        corruption = MeanAblation(reference_tokens=reference)
    direction = "noising" if ablation else rng.choice(["denoising", "noising"])
    if kind == "kl" and direction == "noising" and ablation is None and rng.random() < 0.5:
        direction = "denoising"
    setup = Setup(model, clean, corrupt, noise, ablation, reference, direction, kind, answer, wrong, pos)
    metric = library_metric(kind, answer, wrong, position)
    max_batch = rng.choice([None, 1, 2, 5])
    max_memory = rng.choice([2**30, None, 30_000])
    if rng.random() < 0.3:
        monkeypatch.setattr(ExactEngine, "CHUNK_ROWS", rng.choice([1, 7]))
    window = rng.choice([1, 2]) if L >= 2 and rng.random() < 0.3 else 1
    sites = rng.sample(sites_of(model), 3)
    for site in sites:
        per_position = rng.random() < 0.6
        layers_arg, layers = grid_arg(rng, "layers", list(range(L - window + 1)), L - window + 1, False)
        n_heads = (
            (model.cfg.n_key_value_heads or model.cfg.n_heads) if site in ("k", "v") else model.cfg.n_heads
        )
        heads_arg, heads = grid_arg(rng, "heads", list(range(n_heads)), n_heads, False)
        pos_arg, positions = grid_arg(rng, "positions", list(range(T)), T, True)
        if site not in HEADS:
            heads_arg, heads = None, None
        if not per_position:
            pos_arg, positions = None, None
        want = setup.grid(site, layers, heads, positions, window)
        what = (
            f"seed={seed} {arch} {dtype} L={L} B={B} T={T} {kind} position={position} {corruption_kind} "
            f"{direction} {site} per_position={per_position} layers={layers_arg!r} heads={heads_arg!r} "
            f"positions={pos_arg!r} window={window} max_batch={max_batch} max_memory={max_memory}"
        )
        for method in ("exact", "naive"):
            res = activation_patching(
                model,
                site,
                clean,
                None if corruption is not None else corrupt,
                metric=metric,
                corruption=corruption,
                direction=direction,
                per_position=per_position,
                layers=layers_arg,
                heads=heads_arg,
                positions=pos_arg,
                window=window,
                method=method,
                max_batch=max_batch,
                max_memory=max_memory,
                quiet=True,
            )
            close(res.values, want, dtype, f"{what} method={method}")
            close(res.clean, setup.m_clean, dtype, f"{what} clean metric")
            if setup.m_corr is None:
                assert res.corrupted is None
            else:
                close(res.corrupted, setup.m_corr, dtype, f"{what} corrupted metric")
            assert res.coords["layer"] == layers
            if heads is not None:
                assert res.coords["head"] == heads
            if positions is not None:
                assert res.coords["pos"] == positions
            assert res.method == method and res.site == site and res.direction == direction


def test_batch_settings_agree_to_rounding():
    """max_batch and max_memory change which cells share a forward, never the values beyond rounding."""
    model = make_model("gqa_rotary_rms", n_layers=3)
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, V, (3, 6), generator=g)
    corrupt = clean.clone()
    corrupt[:, 2] = (clean[:, 2] + 4) % V
    metric = LogitDiff(torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]))
    for site in ("resid_pre", "z", "k", "pattern"):
        base = activation_patching(model, site, clean, corrupt, metric=metric, max_memory=None, quiet=True)
        for max_batch, max_memory in ((1, 2**30), (4, None), (None, 20_000), (3, 50_000)):
            res = activation_patching(
                model,
                site,
                clean,
                corrupt,
                metric=metric,
                max_batch=max_batch,
                max_memory=max_memory,
                quiet=True,
            )
            assert res.info["max_batch"] <= (max_batch or 10**9)
            close(
                res.values,
                base.values,
                torch.float64,
                f"{site} max_batch={max_batch} max_memory={max_memory}",
            )


@pytest.mark.parametrize("argument", ["layers", "heads", "positions"])
@pytest.mark.parametrize(
    "empty", [[], (), range(0), torch.tensor([], dtype=torch.long), np.array([], dtype=int)]
)
def test_an_empty_selection_is_refused_by_name(argument, empty):
    model = make_model("base")
    clean = torch.randint(0, V, (2, 4))
    with pytest.raises(ValueError, match=f"{argument} is empty"):
        activation_patching(
            model, "z", clean, (clean + 1) % V, metric=LogitDiff(1, 2), quiet=True, **{argument: empty}
        )


def test_right_padded_prompts_read_at_their_last_real_token_equal_each_prompt_alone():
    """Right padding with per-example metric positions (the README's recipe): every cell before an example's last
    real token has the effect it has on the unpadded prompt alone."""
    model = make_model("gqa_rotary_rms")
    lengths = [3, 5]
    g = torch.Generator().manual_seed(4)
    clean = torch.randint(0, V, (2, 5), generator=g)
    corrupt = clean.clone()
    corrupt[:, 1] = (clean[:, 1] + 5) % V
    clean[0, 3:] = 0  # padding
    corrupt[0, 3:] = 0
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    answer, wrong = torch.tensor([3, 4]), torch.tensor([7, 8])
    for site in ("resid_pre", "z", "k"):
        res = activation_patching(
            model, site, clean, corrupt, metric=LogitDiff(answer, wrong, position=mask.sum(1) - 1), quiet=True
        )
        for b, n in enumerate(lengths):
            alone = activation_patching(
                model,
                site,
                clean[b : b + 1, :n],
                corrupt[b : b + 1, :n],
                metric=LogitDiff(answer[b : b + 1], wrong[b : b + 1]),
                quiet=True,
            )
            close(res.values[b, ..., :n], alone.values[0], torch.float64, f"{site} example {b}")


# ----------------------------------------------------------------------------------- attribution vs autograd


def grads(setup: Setup, names: list[str], drop: int | None = None) -> tuple[dict, dict]:
    """The target run's activations at ``names`` and the gradient of the summed metric at them; with ``drop`` a
    layer whose attention and MLP outputs pass no gradient (GradDrop's pass)."""
    model = setup.model
    acts = {}

    def cap(
        x, hook
    ):  # the activation itself (the graph through it kept), a leaf where nothing upstream varies
        if not x.requires_grad:
            x = x.detach().requires_grad_(True)
        acts[hook.name] = x
        return x

    hooks = [(n, cap) for n in names]
    if drop is not None:
        hooks += [
            (n, lambda x, hook: x.detach())
            for n in (f"blocks.{drop}.hook_attn_out", f"blocks.{drop}.hook_mlp_out")
            if n in model.hook_dict
        ]
    with torch.enable_grad():
        m = setup.metric(at(run(model, setup.tokens, setup.noise, hooks), setup.pos)).sum()
        gs = torch.autograd.grad(m, [acts[n] for n in names], allow_unused=True)
    return (
        {n: x.detach() for n, x in acts.items()},
        {n: torch.zeros_like(acts[n]) if gr is None else gr for n, gr in zip(names, gs)},
    )


def reduce(site: str, x: torch.Tensor, per_position: bool) -> torch.Tensor:
    """Elementwise products -> cells ``(B, [heads,] [pos])``."""
    if site == "pattern":
        r = x.sum(-1)  # (B, H, Tq)
    elif site in HEADS:
        r = x.sum(-1).transpose(1, 2)  # (B, H, T)
    else:
        r = x.sum(-1)  # (B, T)
    return r if per_position else r.sum(-1)


def pattern_moves(setup: Setup, site: str, layer: int, per_position: bool) -> dict:
    """For the QK fix: the change of layer ``layer``'s pattern when one cell of ``q``/``k`` is patched, recomputed
    by a forward; ``{(head, pos): delta pattern (B, H, T, T)}``."""
    model, T = setup.model, setup.tokens.shape[1]
    H = (model.cfg.n_key_value_heads or model.cfg.n_heads) if site == "k" else model.cfg.n_heads
    src = setup.source[hook(site, layer)]
    base = {}

    def grab(x, hook):
        base["p"] = x.detach()
        return x

    pn = hook("pattern", layer)
    with torch.no_grad():
        run(model, setup.tokens, setup.noise, [(pn, grab)])
        p0 = base["p"]
        out = {}
        for h in range(H):
            for p in range(T) if per_position else [-1]:
                run(
                    model,
                    setup.tokens,
                    setup.noise,
                    [(hook(site, layer), replace(site, h, p, src)), (pn, grab)],
                )
                out[(h, p)] = base["p"] - p0
    return out


def atp_reference(setup: Setup, site: str, per_position: bool, qk_fix: bool, grad_drop: bool):
    """``(estimates (B, L, ...), graddrop scores or None)`` from autograd and recomputed patterns."""
    model = setup.model
    L, T = model.cfg.n_layers, setup.tokens.shape[1]
    fix = qk_fix and site in ("q", "k")
    names = [hook("pattern" if fix else site, layer) for layer in range(L)]
    passes = [None] + (list(range(L)) if grad_drop else [])
    per_pass = []
    moves = {layer: pattern_moves(setup, site, layer, per_position) for layer in range(L)} if fix else None
    for drop in passes:
        acts, gr = grads(setup, names, drop)
        layers = []
        for layer in range(L):
            n = names[layer]
            if not fix:
                layers.append(reduce(site, (setup.source[n] - acts[n]) * gr[n], per_position))
                continue
            mv = moves[layer]
            H = max(h for h, _ in mv) + 1
            est = torch.stack(
                [
                    torch.stack(
                        [
                            (mv[(h, p)] * gr[n]).flatten(1).sum(1)
                            for p in (range(T) if per_position else [-1])
                        ],
                        -1,
                    )
                    for h in range(H)
                ],
                1,
            )  # (B, H, T or 1)
            layers.append(est if per_position else est[..., 0])
        per_pass.append(torch.stack(layers, 1))
    gd = None
    if grad_drop:
        k = L if site in ("resid_pre", "resid_mid", "resid_post") else max(L - 1, 1)
        gd = torch.stack([p.abs() for p in per_pass[1:]]).sum(0) / k
    return per_pass[0], gd


ATP_CASES = [
    ("base", "tokens", "denoising", "logit_diff"),
    ("gqa_rotary_rms", "tokens", "noising", "logprob"),
    ("parallel_rotary", "noise", "denoising", "kl"),
    ("attn_only", "mean", "noising", "prob"),
    ("gated_no_bias", "zero", "noising", "logit_diff"),
    ("gqa_rotary_rms", "noise", "noising", "callable"),
]


@pytest.mark.parametrize("arch, corruption_kind, direction, kind", ATP_CASES)
def test_attribution_patching_equals_autograd_on_every_site(arch, corruption_kind, direction, kind):
    model = make_model(arch, n_layers=3 if arch == "base" else 2, seed=7)
    B, T = 2, 4
    g = torch.Generator().manual_seed(11)
    clean = torch.randint(0, V, (B, T), generator=g)
    answer, wrong = torch.tensor([1, 2]), torch.tensor([3, 4])
    corrupt, noise, ablation, corruption = None, None, None, None
    if corruption_kind == "tokens":
        corrupt = clean.clone()
        corrupt[:, 1] = (clean[:, 1] + 3) % V
    elif corruption_kind == "noise":
        corruption, noise = GaussianNoise(seed=5, std_multiplier=1.0), noise_of(model, B, T, 5, mult=1.0)
    elif corruption_kind == "zero":
        ablation, corruption = "zero", ZeroAblation()
    else:
        ablation, corruption = "mean", MeanAblation()
    setup = Setup(model, clean, corrupt, noise, ablation, None, direction, kind, answer, wrong, T - 1)
    metric = library_metric(kind, answer, wrong, -1)
    sites = sites_of(model)
    for per_position in (True, False):
        for qk_fix, grad_drop in ((False, False), (True, False), (True, True), (False, True)):
            out = attribution_patching(
                model,
                clean,
                corrupt,
                metric=metric,
                sites=sites,
                corruption=corruption,
                direction=direction,
                per_position=per_position,
                qk_fix=qk_fix,
                grad_drop=grad_drop,
            )
            for site in sites:
                what = f"{arch} {corruption_kind} {direction} {kind} {site} pp={per_position} qk={qk_fix} gd={grad_drop}"
                est, gd = atp_reference(setup, site, per_position, qk_fix, grad_drop)
                res = out[site]
                close(res.effect, est, torch.float64, what)
                close(res.clean, setup.m_clean, torch.float64, what + " clean")
                if grad_drop:
                    close(res.info["graddrop"], gd, torch.float64, what + " graddrop")
                else:
                    assert "graddrop" not in res.info


def test_attribution_in_parts_equals_one_pass_and_autograd():
    """max_batch and max_memory split the prompts; the estimates stay autograd's (mean ablation over all)."""
    model = make_model("gqa_rotary_rms", seed=2)
    B, T = 5, 4
    g = torch.Generator().manual_seed(3)
    clean = torch.randint(0, V, (B, T), generator=g)
    answer, wrong = torch.randint(0, V, (B,), generator=g), torch.randint(0, V, (B,), generator=g)
    pos = torch.tensor([3, 1, 2, 3, 0])
    for corruption, ablation, noise in (
        (MeanAblation(), "mean", None),
        (GaussianNoise(seed=9), None, noise_of(model, B, T, 9)),
    ):
        direction = "noising" if ablation else "denoising"
        setup = Setup(model, clean, None, noise, ablation, None, direction, "logit_diff", answer, wrong, pos)
        for kw in (dict(max_batch=2), dict(max_memory=1), dict(max_batch=1, max_memory=10**9)):
            out = attribution_patching(
                model,
                clean,
                metric=LogitDiff(answer, wrong, position=pos),
                sites=["z", "k", "resid_mid"],
                corruption=corruption,
                direction=direction,
                qk_fix=True,
                **kw,
            )
            for site in ("z", "k", "resid_mid"):
                est, _ = atp_reference(setup, site, True, True, False)
                close(out[site].effect, est, torch.float64, f"{type(corruption).__name__} {kw} {site}")


@pytest.mark.parametrize("grad_drop", [False, True])
def test_shortlist_and_confirm_ranks_by_atp_and_confirms_exactly(grad_drop):
    model = make_model("parallel_rotary", n_layers=3, seed=1)
    g = torch.Generator().manual_seed(2)
    clean = torch.randint(0, V, (3, 5), generator=g)
    corrupt = clean.clone()
    corrupt[:, 2] = (clean[:, 2] + 6) % V
    answer, wrong = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    setup = Setup(model, clean, corrupt, None, None, None, "denoising", "logit_diff", answer, wrong, 4)
    for site, per_position in (("z", True), ("k", False), ("mlp_out", True)):
        rows = shortlist_and_confirm(
            model,
            site,
            clean,
            corrupt,
            metric=LogitDiff(answer, wrong),
            k=4,
            per_position=per_position,
            qk_fix=True,
            grad_drop=grad_drop,
            max_batch=2,
        )
        est, gd = atp_reference(setup, site, per_position, True, grad_drop)
        atp_mean = est.mean(0)
        score = gd.mean(0) if grad_drop else atp_mean.abs()
        order = torch.argsort(score.flatten(), descending=True, stable=True)[:4].tolist()
        L = model.cfg.n_layers
        heads = list(range(model.cfg.n_key_value_heads or model.cfg.n_heads)) if site in HEADS else None
        positions = list(range(5)) if per_position else None
        grid = setup.grid(site, list(range(L)), heads, positions)
        exact = (grid - setup.target.view(-1, *[1] * (grid.dim() - 1))).mean(0)
        assert len(rows) == 4
        for row, i in zip(rows, order):
            ix = np.unravel_index(i, tuple(score.shape))
            want = {"layer": int(ix[0])}
            if heads is not None:
                want["head"] = int(ix[1])
            if per_position:
                want["pos"] = int(ix[-1])
            assert {a: row[a] for a in want} == want, (site, row, want)
            assert abs(row["atp"] - float(atp_mean[ix])) <= 1e-10 * (1 + float(atp_mean.abs().max()))
            assert abs(row["exact"] - float(exact[ix])) <= 1e-10 * (1 + float(exact.abs().max()))
            if grad_drop:
                assert abs(row["graddrop"] - float(score[ix])) <= 1e-10 * (1 + float(score.max()))


# ------------------------------------------------------------------------------------- Hugging Face models


def tiny_hf(family: str):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if family == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=V, n_positions=8)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=V,
            max_position_embeddings=8,
        )
        model = transformers.LlamaForCausalLM(cfg)
    return model.double().eval()


def hf_layers(model):
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hugging_face_models_equal_the_naive_loop(family):
    """resid_pre against forward pre-hooks on the Hugging Face layers themselves; head sites (converted) against
    the converted model's hook points; both directions."""
    import pypattern as pp

    hf = tiny_hf(family)
    B, T, L = 2, 4, 2
    g = torch.Generator().manual_seed(6)
    clean = torch.randint(0, V, (B, T), generator=g)
    corrupt = clean.clone()
    corrupt[:, 1] = (clean[:, 1] + 2) % V
    answer, wrong = torch.tensor([1, 2]), torch.tensor([3, 4])
    rows = torch.arange(B)

    def ld(tokens, hooks=()):
        hs = [hf_layers(hf)[layer].register_forward_pre_hook(fn, with_kwargs=True) for layer, fn in hooks]
        try:
            with torch.no_grad():
                lg = hf(tokens).logits[:, -1]
        finally:
            for h in hs:
                h.remove()
        return lg[rows, answer] - lg[rows, wrong]

    def patcher(src, p):
        def fn(module, args, kwargs):
            if args:
                x = args[0].clone()
                x[:, p] = src[:, p]
                return (x, *args[1:]), kwargs
            x = kwargs["hidden_states"].clone()
            x[:, p] = src[:, p]
            return args, {**kwargs, "hidden_states": x}

        return fn

    with torch.no_grad():
        hidden = {
            "clean": hf(clean, output_hidden_states=True).hidden_states,
            "corrupt": hf(corrupt, output_hidden_states=True).hidden_states,
        }
    for direction in ("denoising", "noising"):
        tgt, src = (corrupt, "clean") if direction == "denoising" else (clean, "corrupt")
        want = torch.stack(
            [
                torch.stack([ld(tgt, [(layer, patcher(hidden[src][layer], p))]) for p in range(T)], -1)
                for layer in range(L)
            ],
            1,
        )
        res = activation_patching(
            hf, "resid_pre", clean, corrupt, metric=LogitDiff(answer, wrong), direction=direction, quiet=True
        )
        close(res.values, want, torch.float64, f"{family} resid_pre {direction}")
    converted = pp.from_hf(hf)
    for site in ("z", "k", "pattern"):
        setup = Setup(
            converted, clean, corrupt, None, None, None, "denoising", "logit_diff", answer, wrong, T - 1
        )
        n_heads = (
            (converted.cfg.n_key_value_heads or converted.cfg.n_heads)
            if site == "k"
            else converted.cfg.n_heads
        )
        want = setup.grid(site, list(range(L)), list(range(n_heads)), list(range(T)))
        res = activation_patching(hf, site, clean, corrupt, metric=LogitDiff(answer, wrong), quiet=True)
        close(res.values, want, torch.float64, f"{family} {site}")
        atp = attribution_patching(
            hf, clean, corrupt, metric=LogitDiff(answer, wrong), sites=[site], qk_fix=True
        )
        est, _ = atp_reference(setup, site, True, True, False)
        close(atp[site].effect, est, torch.float64, f"{family} {site} AtP")


# --------------------------------------------------------------------------------------------- the result


def test_result_ranking_tables_and_save_load_round_trip(tmp_path):
    pd = pytest.importorskip("pandas")
    model = make_model("base")
    g = torch.Generator().manual_seed(8)
    clean = torch.randint(0, V, (4, 4), generator=g)
    corrupt = clean.clone()
    corrupt[:, 1] = (clean[:, 1] + 5) % V
    answer, wrong = torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6, 7, 8])
    res = activation_patching(
        model, "z", clean, corrupt, metric=LogitDiff(answer, wrong), positions=[-1, 1], quiet=True
    )
    effect = (res.values - res.corrupted.view(-1, 1, 1, 1)).mean(0)
    order = torch.argsort(effect.abs().flatten(), descending=True, stable=True)[:5].tolist()
    top = res.top(5)
    for (coords, value), i in zip(top, order):
        ix = np.unravel_index(i, tuple(effect.shape))
        assert coords == {
            "layer": res.coords["layer"][ix[0]],
            "head": res.coords["head"][ix[1]],
            "pos": res.coords["pos"][ix[2]],
        }
        assert abs(value - float(effect[ix])) <= 1e-12
    gap = (res.clean - res.corrupted).mean()
    norm = (res.values - res.corrupted.view(-1, 1, 1, 1)) / gap
    table = res.to_pandas()
    assert list(table.columns) == ["layer", "head", "pos", "mean", "se", "ci_low", "ci_high"]
    assert len(table) == effect.numel()
    np.testing.assert_allclose(
        table["mean"].to_numpy(), norm.mean(0).flatten().numpy(), rtol=1e-12, atol=1e-12
    )
    assert sorted(set(table["pos"])) == [1, 3]
    raw = res.to_pandas(normalized=False)
    np.testing.assert_allclose(raw["mean"].to_numpy(), res.values.mean(0).flatten().numpy(), rtol=1e-12)
    np.testing.assert_allclose(raw["se"].to_numpy(), (res.values.std(0) / 2.0).flatten().numpy(), rtol=1e-10)
    assert bool(
        (table["ci_low"] <= table["mean"] + 1e-12).all() and (table["mean"] <= table["ci_high"] + 1e-12).all()
    )
    path = tmp_path / "grid.npz"
    res.save(path)
    back = PatchResult.load(path)
    assert torch.equal(back.values, res.values) and torch.equal(back.clean, res.clean)
    assert torch.equal(back.corrupted, res.corrupted)
    assert back.axes == res.axes and back.coords == res.coords and back.info == res.info
    assert (back.site, back.direction, back.metric, back.method) == (
        res.site,
        res.direction,
        res.metric,
        res.method,
    )
    pd.testing.assert_frame_equal(back.to_pandas(), table)
    res.to_csv(tmp_path / "grid.csv")
    csv = pd.read_csv(tmp_path / "grid.csv")
    np.testing.assert_allclose(csv["mean"].to_numpy(), table["mean"].to_numpy(), rtol=1e-12)
    # an ablation (no corrupted run) saves and loads with its None
    abl = activation_patching(
        model,
        "resid_pre",
        clean,
        metric=LogitDiff(answer, wrong),
        corruption=ZeroAblation(),
        direction="noising",
        quiet=True,
    )
    abl.save(tmp_path / "abl.npz")
    back = PatchResult.load(tmp_path / "abl.npz")
    assert back.corrupted is None and torch.equal(back.values, abl.values)


# ------------------------------------------------------------------------------- the progress of a resumed grid


def test_a_grid_resumed_under_other_blocks_computes_and_counts_each_cell_once(tmp_path, monkeypatch):
    """A run stopped with one cell per block and resumed with the default blocks (which hold cells already done):
    only the cells left are computed, the bar ends at the number of cells, and the values are those of an
    uninterrupted run (to rounding: the cells are batched otherwise)."""
    import tqdm.auto

    ends = []

    class Bar(tqdm.auto.tqdm):
        def close(self):
            if not self.disable and self.total is not None and (self.n, self.total) not in ends[-1:]:
                ends.append((self.n, self.total))
            super().close()

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    monkeypatch.setattr(patching_api._Grid, "EVERY_S", 0.0)
    model = make_model("base")
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, V, (3, 6), generator=g)
    corrupt = clean.clone()
    corrupt[:, 1] = (clean[:, 1] + 3) % V
    metric = LogitDiff(torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]))
    whole = activation_patching(model, "resid_pre", clean, corrupt, metric=metric, quiet=True)
    path = tmp_path / "grid.npz"
    orig = ExactEngine.run
    calls = []

    def stop_after_three(self, cells):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(len(cells))
        return orig(self, cells)

    with monkeypatch.context() as m:
        m.setattr(ExactEngine, "UNEMBED_ROWS", 1)  # one cell per block with max_batch=1
        m.setattr(ExactEngine, "run", stop_after_three)
        with pytest.raises(KeyboardInterrupt):
            activation_patching(
                model, "resid_pre", clean, corrupt, metric=metric, max_batch=1, checkpoint=path
            )
    # the cells whose clean and corrupted resid_pre are equal in every prompt cannot change the metric: with one
    # cell per block they are skipped (written as the target's metric) rather than computed
    _, c_cache = model.run_with_cache(clean)
    _, k_cache = model.run_with_cache(corrupt)
    skipped = sum(
        int(
            torch.equal(
                c_cache[f"blocks.{lay}.hook_resid_pre"][:, p], k_cache[f"blocks.{lay}.hook_resid_pre"][:, p]
            )
        )
        for lay in range(model.cfg.n_layers)
        for p in range(clean.shape[1])
    )
    assert skipped > 0
    assert calls == [1, 1, 1] and int(np.load(path)["done"].sum()) == 3 + skipped
    assert ends == [(3 + skipped, 12)]
    computed = []

    def count(self, cells):
        computed.extend(cells)
        return orig(self, cells)

    with monkeypatch.context() as m:
        m.setattr(ExactEngine, "run", count)
        resumed = activation_patching(model, "resid_pre", clean, corrupt, metric=metric, checkpoint=path)
    assert ends[-1] == (12, 12), ends  # not 15 of 12: the 3 cells the file gave are counted once
    left = 12 - 3 - skipped
    assert len(computed) == left and len(set(computed)) == left  # only the rest is computed, each cell once
    close(resumed.values, whole.values, torch.float64, "resumed")


def test_top_takes_a_numpy_count_as_shortlist_and_confirm_does():
    model = make_model("base")
    clean = torch.randint(0, V, (2, 3))
    res = activation_patching(model, "resid_pre", clean, (clean + 1) % V, metric=LogitDiff(1, 2), quiet=True)
    assert res.top(np.int64(2)) == res.top(2)
    assert len(res.top(np.int32(100))) == 6
    with pytest.raises(ValueError, match="k="):
        res.top(np.int64(-1))


def test_plot_draws_the_mean_of_each_grid_shape(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = make_model("gqa_rotary_rms")
    g = torch.Generator().manual_seed(2)
    clean = torch.randint(0, V, (3, 4), generator=g)
    corrupt = clean.clone()
    corrupt[:, 1] = (clean[:, 1] + 2) % V
    metric = LogitDiff(torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]))
    for site, kw in (
        ("resid_pre", {}),
        ("z", {}),
        ("k", dict(per_position=False)),
        ("attn_out", dict(per_position=False)),
    ):
        res = activation_patching(model, site, clean, corrupt, metric=metric, quiet=True, **kw)
        gap = (res.clean - res.corrupted).mean()
        want = ((res.values - res.corrupted.view(-1, *[1] * (res.values.dim() - 1))) / gap).mean(0)
        want = (
            want.reshape(-1, want.shape[-1])
            if want.dim() == 3
            else (want[:, None] if want.dim() == 1 else want)
        )
        ax = res.plot()
        shown = np.asarray(ax.images[0].get_array())
        np.testing.assert_allclose(shown, want.numpy(), rtol=1e-12, atol=1e-12)
        assert len(ax.get_yticklabels()) == want.shape[0]
        if site == "z":
            assert ax.get_yticklabels()[1].get_text() == "L0H1"
        plt.close(ax.figure)
    # an ablation (no corrupted run): the mean effect; a path writes the figure
    abl = activation_patching(
        model, "mlp_out", clean, metric=metric, corruption=ZeroAblation(), direction="noising", quiet=True
    )
    fig, ax = plt.subplots()
    assert abl.plot(ax=ax) is ax
    np.testing.assert_allclose(
        np.asarray(ax.images[0].get_array()),
        (abl.values - abl.clean.view(-1, 1, 1)).mean(0).numpy(),
        rtol=1e-12,
    )
    plt.close(fig)
    abl.plot(path=tmp_path / "abl.png")
    assert (tmp_path / "abl.png").stat().st_size > 0
    with pytest.raises(ValueError, match="corrupted run"):
        abl.plot(normalized=True)


def random_experiment(rng, seed: int, dtype, archs=None, allow_callable: bool = True):
    """A random model, prompts, metric and corruption: ``(model, clean, corrupt, metric, corruption, setup, what)``."""
    arch = rng.choice(sorted(archs or ARCHS))
    L = rng.choice([2, 3])
    model = make_model(arch, dtype, n_layers=L, seed=seed)
    B, T = rng.choice([1, 2, 4]), rng.choice([1, 3, 5])
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, V, (B, T), generator=g)
    kinds = ["logit_diff", "logprob", "prob", "kl"] + (["callable"] if allow_callable else [])
    kind = rng.choice(kinds)
    answer, wrong = torch.randint(0, V, (B,), generator=g), torch.randint(0, V, (B,), generator=g)
    wrong = torch.where(wrong == answer, (answer + 1) % V, wrong)
    if kind == "callable" or rng.random() < 0.4:
        position, pos = -1, T - 1
    else:
        pos = torch.randint(0, T, (B,), generator=g)
        position = pos
    corruption_kind = rng.choice(["tokens", "noise", "noise_rows", "zero", "mean"])
    corrupt, noise, ablation, corruption = None, None, None, None
    if corruption_kind == "tokens":
        corrupt = (clean + torch.randint(1, V, (B, T), generator=g)) % V
    elif corruption_kind == "noise":
        nseed = rng.randrange(2**40)
        corruption, noise = GaussianNoise(seed=nseed, std=0.7), None
        n = torch.randn(
            B, T, model.cfg.d_model, generator=torch.Generator().manual_seed(nseed), dtype=torch.float64
        )
        noise = (n * 0.7).to(dtype)
    elif corruption_kind == "noise_rows":  # one sequence of noised positions per example
        rows = [sorted(rng.sample(range(T), rng.randint(1, T))) for _ in range(B)]
        nseed = rng.randrange(1000)
        corruption = GaussianNoise(positions=rows, seed=nseed)
        std = 3.0 * float(model.embed.W_E.detach().double().std())
        n = torch.randn(
            B, T, model.cfg.d_model, generator=torch.Generator().manual_seed(nseed), dtype=torch.float64
        )
        keep = torch.zeros(B, T, 1, dtype=torch.float64)
        for b, r in enumerate(rows):
            keep[b, r] = 1.0
        noise = (n * std * keep).to(dtype)
    elif corruption_kind == "zero":
        ablation, corruption = "zero", ZeroAblation()
    else:
        reference = torch.randint(0, V, (3, T), generator=g) if rng.random() < 0.5 else None
        ablation, corruption = "mean", MeanAblation(reference_tokens=reference)
    direction = "noising" if ablation else rng.choice(["denoising", "noising"])
    if kind == "kl" and direction == "noising":
        kind = "logprob"  # KL's gradient is 0 at the clean run (warned); exact patching covers it
    ref = corruption.reference_tokens if isinstance(corruption, MeanAblation) else None
    setup = Setup(model, clean, corrupt, noise, ablation, ref, direction, kind, answer, wrong, pos)
    metric = library_metric(kind, answer, wrong, position)
    what = f"seed={seed} {arch} {dtype} L={L} B={B} T={T} {kind} position={position} {corruption_kind} {direction}"
    return model, clean, corrupt, metric, corruption, direction, setup, what


@pytest.mark.parametrize("seed", range(24))
def test_random_attribution_options_equal_autograd(seed):
    rng = random.Random(1000 + seed)
    dtype = torch.float64 if rng.random() < 0.75 else torch.float32
    model, clean, corrupt, metric, corruption, direction, setup, what = random_experiment(rng, seed, dtype)
    sites = rng.sample(sites_of(model), 4)
    per_position, qk_fix, grad_drop = rng.random() < 0.6, rng.random() < 0.5, rng.random() < 0.5
    split = {}
    if (
        metric is not custom and rng.random() < 0.5
    ):  # a Metric's prompts may be split (a plain callable's not)
        split = rng.choice([dict(max_batch=1), dict(max_batch=3), dict(max_memory=1)])
    out = attribution_patching(
        model,
        clean,
        corrupt,
        metric=metric,
        sites=sites,
        corruption=corruption,
        direction=direction,
        per_position=per_position,
        qk_fix=qk_fix,
        grad_drop=grad_drop,
        **split,
    )
    for site in sites:
        est, gd = atp_reference(setup, site, per_position, qk_fix, grad_drop)
        w = f"{what} {site} per_position={per_position} qk_fix={qk_fix} grad_drop={grad_drop} {split}"
        close(out[site].effect, est, dtype, w)
        close(out[site].clean, setup.m_clean, dtype, w + " clean")
        if setup.m_corr is not None:
            close(out[site].corrupted, setup.m_corr, dtype, w + " corrupted")
        if grad_drop:
            close(out[site].info["graddrop"], gd, dtype, w + " graddrop")


@pytest.mark.parametrize("B, T", [(1, 1), (1, 4), (3, 1)])
def test_one_prompt_and_one_token(B, T):
    """A batch of one and prompts of one token, every site, exact and naive, and AtP*."""
    model = make_model("gqa_rotary_rms", n_layers=2)
    g = torch.Generator().manual_seed(B * 10 + T)
    clean = torch.randint(0, V, (B, T), generator=g)
    corrupt = (clean + 3) % V
    answer, wrong = torch.arange(B) + 1, torch.arange(B) + 5
    setup = Setup(model, clean, corrupt, None, None, None, "denoising", "logit_diff", answer, wrong, T - 1)
    for site in sites_of(model):
        for per_position in (True, False):
            n_heads = model.cfg.n_key_value_heads if site in ("k", "v") else model.cfg.n_heads
            heads = list(range(n_heads)) if site in HEADS else None
            want = setup.grid(site, [0, 1], heads, list(range(T)) if per_position else None)
            for method in ("exact", "naive"):
                res = activation_patching(
                    model, site, clean, corrupt, metric=LogitDiff(answer, wrong), per_position=per_position,
                    method=method, quiet=True,
                )  # fmt: skip
                close(res.values, want, torch.float64, f"B={B} T={T} {site} {per_position} {method}")
            atp = attribution_patching(
                model, clean, corrupt, metric=LogitDiff(answer, wrong), sites=[site], per_position=per_position,
                qk_fix=True, grad_drop=True,
            )[site]  # fmt: skip
            est, gd = atp_reference(setup, site, per_position, True, True)
            close(atp.effect, est, torch.float64, f"AtP B={B} T={T} {site} {per_position}")
            close(atp.info["graddrop"], gd, torch.float64, f"GradDrop B={B} T={T} {site} {per_position}")


@pytest.mark.parametrize("seed", range(8))
def test_random_shortlist_and_confirm_equals_autograd_and_the_loop(seed):
    rng = random.Random(2000 + seed)
    model, clean, corrupt, metric, corruption, direction, setup, what = random_experiment(
        rng, seed, torch.float64, allow_callable=False
    )
    site = rng.choice(sites_of(model))
    per_position, qk_fix, grad_drop = rng.random() < 0.6, rng.random() < 0.5, rng.random() < 0.5
    k = rng.choice([1, 3, 50])
    bounds = rng.choice([{}, dict(max_batch=1), dict(max_memory=1), dict(max_memory=None)])
    rows = shortlist_and_confirm(
        model,
        site,
        clean,
        corrupt,
        metric=metric,
        k=k,
        corruption=corruption,
        direction=direction,
        per_position=per_position,
        qk_fix=qk_fix,
        grad_drop=grad_drop,
        **bounds,
    )
    est, gd = atp_reference(setup, site, per_position, qk_fix, grad_drop)
    atp_mean = est.mean(0)
    score = gd.mean(0) if grad_drop else atp_mean.abs()
    order = torch.argsort(score.flatten(), descending=True, stable=True)[:k].tolist()
    L, T = model.cfg.n_layers, clean.shape[1]
    heads = None
    if site in HEADS:
        heads = list(
            range(
                (model.cfg.n_key_value_heads or model.cfg.n_heads)
                if site in ("k", "v")
                else model.cfg.n_heads
            )
        )
    grid = setup.grid(site, list(range(L)), heads, list(range(T)) if per_position else None)
    exact = (grid - setup.target.view(-1, *[1] * (grid.dim() - 1))).mean(0)
    w = f"{what} {site} per_position={per_position} qk_fix={qk_fix} grad_drop={grad_drop} k={k} {bounds}"
    assert len(rows) == min(k, score.numel()), w
    for row, i in zip(rows, order):
        ix = np.unravel_index(i, tuple(score.shape))
        # ties (a cell of score 0, say) may come in either order only when their scores are equal
        got = (
            row["layer"],
            *([row["head"]] if heads is not None else []),
            *([row["pos"]] if per_position else []),
        )
        assert abs(float(score[got]) - float(score[ix])) <= 1e-10 * (1 + float(score.abs().max())), (
            w,
            row,
            ix,
        )
        assert abs(row["atp"] - float(atp_mean[got])) <= 1e-10 * (1 + float(atp_mean.abs().max())), (w, row)
        assert abs(row["exact"] - float(exact[got])) <= 1e-10 * (1 + float(exact.abs().max())), (w, row)


def test_a_result_names_a_plain_function_metric_by_its_name():
    model = make_model("base")
    clean = torch.randint(0, V, (2, 3))
    res = activation_patching(model, "resid_pre", clean, (clean + 1) % V, metric=custom, quiet=True)
    assert res.metric == "custom"
    atp = attribution_patching(model, clean, (clean + 1) % V, metric=custom, sites=["z"])
    assert atp["z"].metric == "custom"
    assert activation_patching(model, "z", clean, (clean + 1) % V, metric=KL(), quiet=True).metric == "neg_kl"


@pytest.mark.parametrize("noise", [GaussianNoise(std=0.0), GaussianNoise(std_multiplier=0.0)])
def test_gaussian_noise_of_no_spread_is_named_as_a_no_op(noise):
    model = make_model("base")
    clean = torch.randint(0, V, (2, 3))
    with pytest.warns(RuntimeWarning, match="GaussianNoise has standard deviation 0"):
        res = activation_patching(
            model, "resid_pre", clean, metric=LogitDiff(1, 2), corruption=noise, quiet=True
        )
    assert torch.equal(res.clean, res.corrupted)  # the corrupted run is the clean one: nothing to measure
    with pytest.warns(RuntimeWarning, match="GaussianNoise has standard deviation 0"):
        attribution_patching(model, clean, metric=LogitDiff(1, 2), corruption=noise, sites=["z"])
