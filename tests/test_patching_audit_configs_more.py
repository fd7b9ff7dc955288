"""Exact patching grids and AtP / AtP* on configurations and options combined, in float64, each against an
independent computation written here:

- exact grids: for each cell, one forward of the target prompts with a hook writing the source run's activation into
  the cell (every layer of a window), the metric read at each example's own position;
- AtP: ``(a_source - a_target) . dM/da`` by autograd through hooked forwards; GradDrop: the same with layer l's
  ``attn_out`` and ``mlp_out`` detached in the forward (no gradient through them), ``sum_l |AtP_l| / (L - 1)``
  (``/ L`` for a residual-stream node); the QK fix: the model's own attention pattern with the query or key cell
  patched (a hooked forward), minus the target pattern, dotted with the metric's gradient at the pattern.

Configurations: partial rotary fractions with grouped-query and multi-query attention (key/value head cells),
parallel attention and MLP, RMSNorm, attention-only, one layer, prompts as long as ``n_ctx``, prompts of one token;
options: positions as a list, negative ints or a slice, per-example metric positions, windows, ``max_batch=1``, a
tiny ``max_memory``, every corruption and metric (and a plain function)."""

import warnings

import pytest
import torch

from pypattern.models import Transformer, TransformerConfig
from pypattern.patching import (
    HEAD_SITES,
    KL,
    SITES,
    GaussianNoise,
    LogitDiff,
    LogProb,
    MeanAblation,
    Prob,
    ZeroAblation,
    activation_patching,
    attribution_patching,
)

pytestmark = pytest.mark.usefixtures("one_thread")

V = 11
LLAMA = dict(
    normalization_type="RMS",
    positional_embedding_type="rotary",
    gated_mlp=True,
    act_fn="silu",
    attn_bias=False,
    attn_out_bias=False,
    mlp_bias=False,
    unembed_bias=False,
)
ARCHS = {
    # Llama with grouped-query attention and a quarter of each head rotated (rotary_dim 2 of d_head 8)
    "llama_gqa_partial_rotary": {**LLAMA, "n_key_value_heads": 2, "rotary_dim": 2},
    # Qwen2: query/key/value biases, grouped-query attention, half the head rotated
    "qwen2_bias_partial_rotary": {**LLAMA, "n_key_value_heads": 2, "attn_bias": True, "rotary_dim": 4},
    # GPT-NeoX: attention and MLP in parallel, partial rotary
    "neox_parallel": dict(parallel_attn_mlp=True, positional_embedding_type="rotary", rotary_dim=2),
    # RMSNorm with learned positions and an ungated MLP
    "rms_learned": dict(normalization_type="RMS"),
    # attention-only with one key/value head (multi-query) and partial rotary
    "attn_only_mqa_rotary": {
        **LLAMA,
        "gated_mlp": False,
        "d_mlp": None,
        "n_key_value_heads": 1,
        "rotary_dim": 2,
    },
    "attn_only": dict(d_mlp=None),
}
RESID = ("resid_pre", "resid_mid", "resid_post")


def make_model(arch: str, n_layers: int, n_ctx: int, seed: int = 0) -> Transformer:
    opts = ARCHS[arch]
    kw = dict(n_layers=n_layers, d_model=16, n_heads=4, d_head=8, d_vocab=V, n_ctx=n_ctx, dtype=torch.float64)
    if "d_mlp" not in opts:
        kw["d_mlp"] = 20
    model = Transformer(TransformerConfig(**kw, seed=seed, **opts))
    with torch.no_grad():  # biases and norm weights away from their zero / one initialisation
        g = torch.Generator().manual_seed(seed + 100)
        for name, prm in model.named_parameters():
            if not name.rsplit(".", 1)[-1].startswith("W_"):
                prm.add_(0.3 * torch.randn(prm.shape, generator=g, dtype=prm.dtype))
    return model


def sites_of(model) -> list[str]:
    cfg = model.cfg
    out = list(SITES)
    if cfg.attn_only:
        out.remove("mlp_out")
    if cfg.attn_only or cfg.parallel_attn_mlp:
        out.remove("resid_mid")
    return out


def at(logits: torch.Tensor, pos) -> torch.Tensor:
    """``logits (B, T, V)`` at the metric position(s) ``(B, V)``."""
    if isinstance(pos, int):
        return logits[:, pos]
    return logits[torch.arange(logits.shape[0]), pos]


def write(x, src, site, head, pos):
    """``x`` with the cell (``head``; ``pos`` None: every position) taken from ``src``."""
    x = x.clone()
    p = slice(None) if pos is None else pos
    if site == "pattern":
        x[:, head, p] = src[:, head, p]
    elif site in HEAD_SITES:
        x[:, p, head] = src[:, p, head]
    else:
        x[:, p] = src[:, p]
    return x


class Runs:
    """The target and source runs of an experiment, computed here with hooks on the model's forward."""

    def __init__(self, model, clean, corrupt, corruption, direction, make_metric, position):
        self.model, self.position, self.make_metric = model, position, make_metric
        B, T = clean.shape
        names = sorted(n for n in model.hook_dict if ".hook_" in n or n.startswith("hook_"))
        self.noise = None
        if isinstance(corruption, GaussianNoise):  # the noise the library draws (its seed), added here
            self.noise = corruption.noise(model, B, T, model.cfg.d_model, torch.float64)
        with torch.no_grad():
            clean_logits, self.clean_cache = model.run_with_cache(clean, names_filter=names)
            corr_tokens = corrupt if corrupt is not None else (clean if self.noise is not None else None)
            if corr_tokens is not None:
                with model.hooks(self.embed_hooks(self.noise)):
                    _, self.corr_cache = model.run_with_cache(corr_tokens, names_filter=names)
        self.clean_logits = at(clean_logits, position)
        if direction == "denoising":
            self.tokens, self.tnoise, self.target, self.source = (
                corr_tokens,
                self.noise,
                self.corr_cache,
                self.clean_cache,
            )
        else:
            self.tokens, self.tnoise, self.target = clean, None, self.clean_cache
            if isinstance(corruption, ZeroAblation):
                self.source = {n: torch.zeros_like(v) for n, v in self.clean_cache.items()}
            elif isinstance(corruption, MeanAblation):
                self.source = {n: v.mean(0, keepdim=True).expand_as(v) for n, v in self.clean_cache.items()}
            else:
                self.source = self.corr_cache

    @staticmethod
    def embed_hooks(noise):
        return [] if noise is None else [("hook_embed", lambda x, hook: x + noise)]

    def metric(self):
        """A fresh metric, bound to the clean run where it binds."""
        m = self.make_metric()
        if hasattr(m, "bind"):
            m.bind(self.clean_logits)
        return m

    def forward(self, hooks, grad: bool = False):
        with torch.enable_grad() if grad else torch.no_grad():
            logits = self.model.run_with_hooks(self.tokens, fwd_hooks=self.embed_hooks(self.tnoise) + hooks)
        return at(logits, self.position)


def naive_grid(runs: Runs, site, layers, heads, positions, window):
    """``(B, layer[, head][, pos])`` by one hooked forward per cell; ``positions`` None: one cell over all."""
    metric = runs.metric()
    rows = []
    for layer in layers:
        per_head = []
        for h in heads if heads is not None else [None]:
            per_pos = []
            for p in positions if positions is not None else [None]:
                hooks = []
                for ll in range(layer, layer + window):
                    name = SITES[site].format(l=ll)
                    hooks.append(
                        (name, lambda x, hook, s=runs.source[name], h=h, p=p: write(x, s, site, h, p))
                    )
                per_pos.append(metric(runs.forward(hooks)))
            per_head.append(torch.stack(per_pos, -1) if positions is not None else per_pos[0])
        rows.append(torch.stack(per_head, 1) if heads is not None else per_head[0])
    return torch.stack(rows, 1)


def experiment(arch, L, T, n_ctx, corruption_kind, metric_kind, position_kind, direction, seed=0):
    model = make_model(arch, L, n_ctx, seed)
    B = 3
    g = torch.Generator().manual_seed(seed + 1)
    clean = torch.randint(0, V, (B, T), generator=g)
    corrupt = None
    corruption = None
    if corruption_kind == "tokens":
        corrupt = (clean + torch.randint(1, V, (B, T), generator=g)) % V
    elif corruption_kind == "noise":
        corruption = GaussianNoise(seed=seed + 7, positions=[0])
    elif corruption_kind == "zero":
        corruption, direction = ZeroAblation(), "noising"
    else:
        corruption, direction = MeanAblation(), "noising"
    position = -1 % T if position_kind == "last" else torch.tensor([T - 1, 0, T // 2])
    answer = torch.tensor([1, 2, 3])
    wrong = torch.tensor([4, 5, 6])
    makers = {
        "logit_diff": lambda: LogitDiff(answer, wrong, position=position),
        "prob": lambda: Prob(answer, position=position),
        "logprob": lambda: LogProb(answer, position=position),
        "kl": lambda: KL(position=position),
    }
    if metric_kind == "function":  # a plain function reads the last position
        position = T - 1

        def fn(logits):
            return logits[..., 2] - logits.logsumexp(-1)

        make = lambda: fn  # noqa: E731
    else:
        make = makers[metric_kind]
    runs = Runs(model, clean, corrupt, corruption, direction, make, position)
    return model, clean, corrupt, corruption, direction, make, runs


# arch, layers, prompt length, n_ctx, corruption, metric, metric position, direction, grid options
CASES = [
    ("llama_gqa_partial_rotary", 2, 5, 5, "tokens", "logit_diff", "each", "denoising", {}),
    ("llama_gqa_partial_rotary", 3, 4, 9, "noise", "kl", "last", "denoising", dict(window=2, max_batch=1)),
    ("qwen2_bias_partial_rotary", 2, 5, 5, "tokens", "prob", "each", "noising", dict(max_memory=64)),
    ("qwen2_bias_partial_rotary", 1, 4, 6, "mean", "logprob", "each", "noising", dict(positions=[-1, 0])),
    ("neox_parallel", 2, 5, 5, "tokens", "function", "last", "denoising", dict(positions=slice(1, None))),
    ("neox_parallel", 3, 3, 3, "zero", "logit_diff", "each", "noising", dict(per_position=False, window=3)),
    ("rms_learned", 2, 5, 5, "tokens", "kl", "each", "denoising", dict(max_batch=1, max_memory=1)),
    ("rms_learned", 1, 1, 1, "tokens", "logit_diff", "last", "noising", {}),
    ("attn_only_mqa_rotary", 1, 5, 5, "tokens", "logprob", "each", "denoising", dict(positions=[3, 1])),
    ("attn_only_mqa_rotary", 2, 1, 4, "noise", "prob", "last", "noising", dict(max_batch=1)),
    ("attn_only", 2, 5, 5, "tokens", "logit_diff", "each", "noising", dict(window=2, per_position=False)),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-L{c[1]}-T{c[2]}-{c[4]}-{c[5]}" for c in CASES])
def test_every_site_equals_one_hooked_forward_per_cell(case):
    arch, L, T, n_ctx, ck, mk, pk, direction, opts = case
    model, clean, corrupt, corruption, direction, make, runs = experiment(
        arch, L, T, n_ctx, ck, mk, pk, direction
    )
    opts = dict(opts)
    window = opts.get("window", 1)
    per_position = opts.get("per_position", True)
    chosen = opts.get("positions")
    if chosen is None:
        positions = list(range(T)) if per_position else None
    elif isinstance(chosen, slice):
        positions = list(range(T))[chosen]
    else:
        positions = [p % T for p in chosen]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a tiny max_memory warns that one cell does not fit
        for site in sites_of(model):
            res = activation_patching(
                model, site, clean, corrupt, metric=make(), corruption=corruption, direction=direction,
                quiet=True, **opts,
            )  # fmt: skip
            assert res.method == "exact"
            heads = res.coords.get("head")
            if site in ("k", "v"):  # key/value heads under grouped-query attention
                assert heads == list(range(model.cfg.n_key_value_heads or model.cfg.n_heads))
            want = naive_grid(runs, site, range(L - window + 1), heads, positions, window)
            assert res.values.shape == want.shape, site
            torch.testing.assert_close(res.values, want, rtol=0, atol=1e-9, msg=f"{case} {site}")
            if per_position:
                assert res.coords["pos"] == positions
            # the unpatched runs: the clean metric, and the corrupted one where there is a corrupted run
            m = runs.metric()
            with torch.no_grad():
                clean_m = m(at(model(clean), runs.position))
            torch.testing.assert_close(res.clean, clean_m, rtol=0, atol=1e-9)


def test_slices_select_layers_heads_and_positions():
    """``layers``, ``heads`` and ``positions`` given as slices select as ``list(range(n))[slice]`` (layers among the
    valid first layers of a window), and equal the grid selected by the same lists and the hooked forwards."""
    model, clean, corrupt, _, _, make, runs = experiment(
        "llama_gqa_partial_rotary", 3, 5, 5, "tokens", "logit_diff", "each", "denoising"
    )
    res = activation_patching(
        model, "k", clean, corrupt, metric=make(), quiet=True,
        layers=slice(1, None), heads=slice(-1, None), positions=slice(None, None, 2), window=2,
    )  # fmt: skip
    assert res.coords == {"layer": [1], "head": [1], "pos": [0, 2, 4]}
    listed = activation_patching(
        model,
        "k",
        clean,
        corrupt,
        metric=make(),
        quiet=True,
        layers=[1],
        heads=[1],
        positions=[0, 2, 4],
        window=2,
    )
    torch.testing.assert_close(res.values, listed.values, rtol=0, atol=1e-12)
    want = naive_grid(runs, "k", [1], [1], [0, 2, 4], 2)
    torch.testing.assert_close(res.values, want, rtol=0, atol=1e-9)
    last3 = activation_patching(
        model, "resid_pre", clean, corrupt, metric=make(), quiet=True, positions=slice(-3, None)
    )
    assert last3.coords["pos"] == [2, 3, 4]
    # a slice that selects nothing, and one with a step of 0, are refused by name
    with pytest.raises(ValueError, match="positions is empty"):
        activation_patching(
            model, "resid_pre", clean, corrupt, metric=make(), quiet=True, positions=slice(5, None)
        )
    with pytest.raises(ValueError, match="heads=slice"):
        activation_patching(model, "z", clean, corrupt, metric=make(), quiet=True, heads=slice(None, None, 0))
    with pytest.raises(TypeError, match="layers=slice"):
        activation_patching(model, "z", clean, corrupt, metric=make(), quiet=True, layers=slice(0.5, None))


# ------------------------------------------------------------------------------------------------- AtP and AtP*


def reduce(site, x, per_position):
    if site == "pattern":  # (B, H, Tq, Tk): cells are (head, query position)
        r = x.sum(-1)
    elif site in HEAD_SITES:  # (B, T, H, d_head)
        r = x.sum(-1).transpose(1, 2)
    else:
        r = x.sum(-1)
    return r if per_position else r.sum(-1)


def gradients(runs: Runs, names, drop):
    """The metric's gradient (summed over examples) at ``names`` on the target run; ``drop``: the layer whose
    ``attn_out`` and ``mlp_out`` pass no gradient (GradDrop), or None."""
    metric, caps, hooks = runs.metric(), {}, []
    for n in names:
        hooks.append((n, lambda x, hook, n=n: caps.__setitem__(n, x) or x))
    if drop is not None:
        for s in ("attn_out", "mlp_out"):
            n = SITES[s].format(l=drop)
            if n in runs.model.hook_dict:
                hooks.append((n, lambda x, hook: x.detach()))
    value = metric(runs.forward(hooks, grad=True)).sum()
    gs = torch.autograd.grad(value, [caps[n] for n in names], allow_unused=True)
    return {n: torch.zeros_like(caps[n]) if g is None else g for n, g in zip(names, gs)}


def pattern_moves(runs: Runs, site, layer, T, per_position):
    """``{(head, pos): new pattern - target pattern}`` of layer ``layer`` with the query or key cell patched."""
    name, pat = SITES[site].format(l=layer), SITES["pattern"].format(l=layer)
    out = {}
    for h in range(runs.target[name].shape[2]):
        for p in range(T) if per_position else [None]:
            got = {}
            hooks = [
                (name, lambda x, hook, h=h, p=p: write(x, runs.source[name], site, h, p)),
                (pat, lambda x, hook, got=got: got.__setitem__("p", x) or x),
            ]
            runs.forward(hooks)
            out[(h, p)] = got["p"] - runs.target[pat]
    return out


def atp_reference(runs: Runs, site, L, T, per_position, qk_fix, grad_drop):
    fix = qk_fix and site in ("q", "k")
    names = [SITES["pattern" if fix else site].format(l=layer) for layer in range(L)]
    moves = {layer: pattern_moves(runs, site, layer, T, per_position) for layer in range(L)} if fix else None
    per_pass = []
    for drop in [None] + (list(range(L)) if grad_drop else []):
        gr = gradients(runs, names, drop)
        layers = []
        for layer, n in enumerate(names):
            if not fix:
                layers.append(reduce(site, (runs.source[n] - runs.target[n]) * gr[n], per_position))
                continue
            mv = moves[layer]
            H = max(h for h, _ in mv) + 1
            est = torch.stack(
                [
                    torch.stack(
                        [
                            (mv[(h, p)] * gr[n]).flatten(1).sum(1)
                            for p in (range(T) if per_position else [None])
                        ],
                        -1,
                    )
                    for h in range(H)
                ],
                1,
            )
            layers.append(est if per_position else est[..., 0])
        per_pass.append(torch.stack(layers, 1))
    gd = None
    if grad_drop:
        k = L if site in RESID else L - 1
        gd = torch.stack([p.abs() for p in per_pass[1:]]).sum(0) / k
    return per_pass[0], gd


ATP_CASES = [
    ("llama_gqa_partial_rotary", 2, 5, "tokens", "logit_diff", "each", "denoising", True, True, {}),
    ("qwen2_bias_partial_rotary", 3, 4, "noise", "kl", "last", "denoising", False, True, dict(max_batch=1)),
    ("neox_parallel", 2, 5, "tokens", "logprob", "each", "noising", True, True, dict(max_memory=1)),
    ("attn_only_mqa_rotary", 2, 5, "mean", "prob", "each", "noising", True, False, {}),
    ("attn_only_mqa_rotary", 1, 1, "tokens", "logit_diff", "last", "denoising", True, False, {}),
    ("rms_learned", 2, 5, "zero", "logit_diff", "each", "noising", False, True, {}),
]


@pytest.mark.parametrize("case", ATP_CASES, ids=[f"{c[0]}-L{c[1]}-T{c[2]}-{c[3]}-{c[4]}" for c in ATP_CASES])
def test_atp_qk_fix_and_graddrop_equal_autograd_and_patched_patterns(case):
    arch, L, T, ck, mk, pk, direction, per_position, grad_drop, split = case
    model, clean, corrupt, corruption, direction, make, runs = experiment(
        arch, L, T, T, ck, mk, pk, direction
    )
    sites = sites_of(model)
    for qk_fix in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out = attribution_patching(
                model, clean, corrupt, metric=make(), sites=sites, corruption=corruption, direction=direction,
                per_position=per_position, qk_fix=qk_fix, grad_drop=grad_drop, **split,
            )  # fmt: skip
        for site in sites:
            est, gd = atp_reference(runs, site, L, T, per_position, qk_fix, grad_drop)
            what = f"{case} {site} qk_fix={qk_fix}"
            torch.testing.assert_close(out[site].effect, est, rtol=0, atol=1e-9, msg=what)
            if grad_drop:
                torch.testing.assert_close(out[site].info["graddrop"], gd, rtol=0, atol=1e-9, msg=what)
