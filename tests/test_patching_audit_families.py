"""Exact patching and attribution patching (AtP) on small random GPT-2, GPT-NeoX (parallel attention, partial
rotary) and Llama/Qwen2 (grouped-query attention) models converted with ``from_hf``, in float64, against naive
references written here with the converted model's own hook points:

- exact: for each cell a forward of the target prompts with a hook writing the source run's activation into the
  cell, the logit difference read at each example's metric position;
- AtP: the target run with every site's activation made a leaf that keeps its gradient, one backward of the summed
  metric, and ``(source - target) . gradient`` summed over the cell.

Every site, denoising and noising; one prompt, one position, odd batch shapes, prompts given as a strided
(non-contiguous) view, and right-padded prompts of several lengths read at each one's last real position, whose
values must equal those of each prompt patched alone, unpadded."""

from __future__ import annotations

import warnings

import pytest
import torch
from _hook_names import HEADS, HOOKS

transformers = pytest.importorskip("transformers")

from pypattern import from_hf  # noqa: E402
from pypattern.patching import LogitDiff, activation_patching, attribution_patching  # noqa: E402

V = 40
COMMON = dict(vocab_size=V, bos_token_id=0, eos_token_id=1, pad_token_id=None)
LLAMA = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=40
)
FAMILIES = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_layer=2, n_head=4, n_positions=16)),
    "neox": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            rotary_pct=0.5,
            use_parallel_residual=True,
        ),
    ),  # fmt: skip
    "llama-gqa": ("LlamaConfig", "LlamaForCausalLM", LLAMA),
    "qwen2-gqa": ("Qwen2Config", "Qwen2ForCausalLM", dict(LLAMA, num_key_value_heads=1)),
}
SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z", "q", "k", "v", "pattern")

_MODELS: dict = {}


def _model(family: str):
    if family not in _MODELS:
        cfg_name, cls_name, kw = FAMILIES[family]
        torch.manual_seed(0)
        cfg = getattr(transformers, cfg_name)(**COMMON, **kw)
        hf = getattr(transformers, cls_name)(cfg).eval().double()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _MODELS[family] = from_hf(hf)
    return _MODELS[family]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _sites(model):
    cfg = model.cfg
    out = [s for s in SITES if not (s == "resid_mid" and cfg.parallel_attn_mlp)]
    return out


def _cells(model, site, T, per_position):
    cfg = model.cfg
    heads = (cfg.n_key_value_heads if site in ("k", "v") else cfg.n_heads) if site in HEADS else None
    poss = range(T) if per_position else [None]
    return [
        (layer, h, p)
        for layer in range(cfg.n_layers)
        for h in (range(heads) if heads else [None])
        for p in poss
    ]


def _write(x, src, site, head, pos):
    """``x`` with the cell (head, pos) of ``site`` from ``src`` (pattern: the query position)."""
    x = x.clone()
    if site == "pattern":
        idx = (slice(None), head, slice(None) if pos is None else pos)
    elif head is not None:
        idx = (slice(None), slice(None) if pos is None else pos, head)
    else:
        idx = (slice(None), slice(None) if pos is None else pos)
    x[idx] = src[idx]
    return x


def _metric_at(logits, pos, ans, wrong):
    rows = logits[torch.arange(logits.shape[0]), pos]
    return rows.gather(1, ans[:, None])[:, 0] - rows.gather(1, wrong[:, None])[:, 0]


def _naive_exact(model, site, clean, corr, pos, ans, wrong, direction, per_position):
    src_tokens, tgt_tokens = (clean, corr) if direction == "denoising" else (corr, clean)
    T = clean.shape[1]
    _, cache = model.run_with_cache(src_tokens)
    out = []
    with torch.no_grad():
        for layer, h, p in _cells(model, site, T, per_position):
            name = HOOKS[site].format(layer)
            src = cache[name]
            hook = (name, lambda x, hook, s=src, h=h, p=p: _write(x, s, site, h, p))
            out.append(_metric_at(model.run_with_hooks(tgt_tokens, fwd_hooks=[hook]), pos, ans, wrong))
    return torch.stack(out, 1)  # (B, cells)


def _naive_atp(model, site, clean, corr, pos, ans, wrong, direction, per_position):
    src_tokens, tgt_tokens = (clean, corr) if direction == "denoising" else (corr, clean)
    T, L = clean.shape[1], model.cfg.n_layers
    _, src_cache = model.run_with_cache(src_tokens)
    acts = {}

    def keep(x, hook):  # a zero leaf added: its gradient is the activation's
        delta = torch.zeros_like(x, requires_grad=True)
        acts[hook.name] = (x.detach(), delta)
        return x + delta

    names = [HOOKS[site].format(layer) for layer in range(L)]
    with torch.enable_grad():
        logits = model.run_with_hooks(tgt_tokens, fwd_hooks=[(n, keep) for n in names])
        m = _metric_at(logits, pos, ans, wrong)
        m.sum().backward()
    out = []
    for layer, h, p in _cells(model, site, T, per_position):
        n = names[layer]
        tgt, delta = acts[n]
        prod = (src_cache[n] - tgt) * delta.grad  # (B, ...)
        sel = _write(torch.zeros_like(prod), prod, site, h, p)
        out.append(m.detach() + sel.flatten(1).sum(1))
    return torch.stack(out, 1)


def _prompts(B, T, seed, strided=False):
    g = torch.Generator().manual_seed(seed)
    if strided:  # a view with a stride of 2 along the positions: not contiguous
        big = torch.randint(2, V, (B, 2 * T), generator=g)
        clean, corr = big[:, ::2], big.flip(0)[:, 1::2]
        assert not clean.is_contiguous()
    else:
        clean, corr = torch.randint(2, V, (B, T), generator=g), torch.randint(2, V, (B, T), generator=g)
    ans, wrong = torch.randint(0, V, (B,), generator=g), torch.randint(0, V, (B,), generator=g)
    return clean, corr, ans, wrong


# (batch, positions, strided prompts, directions)
SHAPES = {
    "one-prompt": (1, 4, False, ("denoising",)),
    "one-position": (3, 1, False, ("noising",)),
    "odd-strided": (3, 5, True, ("denoising", "noising")),
}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_exact_and_atp_match_hook_loops_on_every_site(family, shape):
    model = _model(family)
    B, T, strided, directions = SHAPES[shape]
    clean, corr, ans, wrong = _prompts(B, T, seed=len(family) + B, strided=strided)
    pos = torch.full((B,), T - 1)
    metric = LogitDiff(ans, wrong)
    for direction in directions:
        atp = attribution_patching(
            model, clean, corr, metric=metric, sites=_sites(model), direction=direction, per_position=True
        )
        for i, site in enumerate(_sites(model)):
            per_position = site != "pattern" or i % 2 == 0
            got = activation_patching(
                model, site, clean, corr, metric=metric, direction=direction, per_position=per_position,
                quiet=True,
            )  # fmt: skip
            want = _naive_exact(model, site, clean, corr, pos, ans, wrong, direction, per_position)
            torch.testing.assert_close(
                got.values.reshape(B, -1), want, rtol=1e-9, atol=1e-9, msg=f"{site} {direction}"
            )
            want_atp = _naive_atp(model, site, clean, corr, pos, ans, wrong, direction, True)
            torch.testing.assert_close(
                atp[site].values.reshape(B, -1), want_atp, rtol=1e-9, atol=1e-9, msg=f"atp {site} {direction}"
            )


@pytest.mark.parametrize("family", ["neox", "llama-gqa"])
def test_right_padded_prompts_read_at_their_last_token_equal_each_prompt_alone(family):
    model = _model(family)
    lengths = [5, 3, 4]
    T = max(lengths)
    clean, corr, ans, wrong = _prompts(len(lengths), T, seed=7)
    for b, n in enumerate(lengths):  # right padding with a token the prompts do not use
        clean[b, n:], corr[b, n:] = 1, 1
    pos = torch.tensor(lengths) - 1
    metric = LogitDiff(ans, wrong, position=pos)
    for site in ("resid_pre", "k", "pattern"):
        got = activation_patching(model, site, clean, corr, metric=metric, quiet=True)
        atp = attribution_patching(model, clean, corr, metric=metric, sites=[site])[site]
        want = _naive_exact(model, site, clean, corr, pos, ans, wrong, "denoising", True)
        torch.testing.assert_close(got.values.reshape(len(lengths), -1), want, rtol=1e-9, atol=1e-9)
        for b, n in enumerate(lengths):
            one = LogitDiff(ans[b : b + 1], wrong[b : b + 1])
            alone = activation_patching(model, site, clean[b : b + 1, :n], corr[b : b + 1, :n], metric=one,
                                        quiet=True)  # fmt: skip
            alone_atp = attribution_patching(model, clean[b : b + 1, :n], corr[b : b + 1, :n], metric=one,
                                             sites=[site])[site]  # fmt: skip
            # the grid's positions up to the prompt's length; patches in its padding change nothing
            ax = got.axes.index("pos")
            mine = got.values[b].narrow(ax, 0, n)
            torch.testing.assert_close(mine, alone.values[0], rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(
                atp.values[b].narrow(ax, 0, n), alone_atp.values[0], rtol=1e-9, atol=1e-9
            )
            pad = got.values[b].narrow(ax, n, T - n)
            torch.testing.assert_close(pad, got.corrupted[b].expand_as(pad), rtol=0, atol=0)
