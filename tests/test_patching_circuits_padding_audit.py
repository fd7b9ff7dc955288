"""Patching and circuits on Hugging Face models as users hold their prompts: padded batches.

Tiny random float64 models of five families (GPT-2; Llama with grouped-query attention and rotary positions;
GPT-NeoX with parallel attention and MLP and partial rotary; Qwen2 with query/key/value biases; Gemma with one
key/value head) are passed to the public calls directly. Every check is against an independent computation on the
Hugging Face model itself, with torch hooks on its modules:

- activation patching: a patched forward done by hand (a module's output replaced at one position by the clean
  run's) equals each grid entry, on right-padded prompts read at each row's last real token;
- EAP: ``(A_u - out_u) . dM/d(input of v)`` from autograd, each head's query/key/value input a separate leaf;
- exact edge patching of one edge: the clean run with ``v``'s input shifted by ``u_corrupted - u_clean``;
- AtP on padded rows: the positions after a row's metric position get exactly zero;
- the token id sitting in the padding changes nothing (but a per-position mean over the batch, which mixes
  padding into the real positions' means);
- left padding: what the Hugging Face forward does with it (with and without ``position_ids``), and that every
  public call reads a tokenizer's output as its ids and mask; clean and corrupted of other lengths are refused.
"""

from __future__ import annotations

import re

import pytest
import torch
import transformers as T

from pypattern.circuits import edge_attribution, faithfulness, patch_edges
from pypattern.patching import (
    LogitDiff,
    MeanAblation,
    activation_patching,
    attribution_patching,
)

pytestmark = pytest.mark.usefixtures("one_thread")

V = 40
LENGTHS = torch.tensor([4, 6, 3])  # right padding to 6 tokens
ANSWER, WRONG = torch.tensor([5, 6, 7]), torch.tensor([8, 9, 10])
FAMILIES = ["gpt2", "llama", "neox", "qwen2", "gemma"]


def make(name: str) -> torch.nn.Module:
    """A tiny random float64 model of the family, its norm weights and biases moved off their initial values."""
    torch.manual_seed(0)
    small = dict(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=None,
        initializer_range=0.25,  # effects well above rounding
    )
    if name == "gpt2":
        cfg = T.GPT2Config(
            vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, bos_token_id=0, eos_token_id=1, initializer_range=0.25,
        )  # fmt: skip
        m = T.GPT2LMHeadModel(cfg)
    elif name == "llama":
        m = T.LlamaForCausalLM(T.LlamaConfig(**small, num_key_value_heads=2))
    elif name == "neox":
        m = T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**small, rotary_pct=0.5, use_parallel_residual=True))
    elif name == "qwen2":
        m = T.Qwen2ForCausalLM(T.Qwen2Config(**small, num_key_value_heads=2))
    else:
        m = T.GemmaForCausalLM(T.GemmaConfig(**small, num_key_value_heads=1, head_dim=8))
    m = m.double().eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n or "ln" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return m


_MODELS: dict = {}


def model(name: str) -> torch.nn.Module:
    if name not in _MODELS:
        _MODELS[name] = make(name)
    return _MODELS[name]


def prompts(pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean and corrupted prompts (one token replaced at position 1), right-padded with ``pad_id``."""
    g = torch.Generator().manual_seed(3)
    clean = torch.randint(2, V, (3, 6), generator=g)
    corrupted = clean.clone()
    corrupted[:, 1] = (clean[:, 1] + 7) % (V - 2) + 2
    corrupted[1, 4] = (clean[1, 4] + 3) % (V - 2) + 2  # the long row differs at a second position
    for b, n in enumerate(LENGTHS):
        clean[b, n:] = pad_id
        corrupted[b, n:] = pad_id
    return clean, corrupted


def metric() -> LogitDiff:
    return LogitDiff(ANSWER, WRONG, position=LENGTHS - 1)


def hand_metric(logits: torch.Tensor) -> torch.Tensor:
    rows = logits[torch.arange(3), LENGTHS - 1]
    return rows[torch.arange(3), ANSWER] - rows[torch.arange(3), WRONG]


# ------------------------------------------------------------------------- the families' modules, by hand


def layers(m):
    return {"gpt2": lambda: m.transformer.h, "gpt_neox": lambda: m.gpt_neox.layers}.get(
        m.config.model_type, lambda: m.model.layers
    )()


def final_norm(m):
    t = m.config.model_type
    return (
        m.transformer.ln_f
        if t == "gpt2"
        else m.gpt_neox.final_layer_norm
        if t == "gpt_neox"
        else m.model.norm
    )


def attn(layer):
    return getattr(layer, "attn", None) or getattr(layer, "attention", None) or layer.self_attn


def attn_norm(layer):
    return getattr(layer, "ln_1", None) or layer.input_layernorm


def mlp_norm(layer):
    return getattr(layer, "ln_2", None) or layer.post_attention_layernorm


def out_proj(layer):
    a = attn(layer)
    return getattr(a, "c_proj", None) or getattr(a, "dense", None) or a.o_proj


def dims(m) -> tuple[int, int, int]:
    """Heads, key/value heads, head size."""
    c = m.config
    H = c.num_attention_heads
    Hk = getattr(c, "num_key_value_heads", None) or H
    dh = getattr(c, "head_dim", None) or c.hidden_size // H
    return H, Hk, dh


def head_write(m, layer, z: torch.Tensor, h: int) -> torch.Tensor:
    """Head ``h``'s write to the residual stream from the output projection's input ``z (..., H * dh)`` (no
    bias: the output bias belongs to no head)."""
    _, _, dh = dims(m)
    w = out_proj(layer).weight
    zs = z[..., h * dh : (h + 1) * dh]
    if m.config.model_type == "gpt2":  # Conv1D: (in, out)
        return zs @ w[h * dh : (h + 1) * dh]
    return zs @ w[:, h * dh : (h + 1) * dh].T


def projection_columns(m, layer, which: str, g: int) -> tuple[torch.nn.Module, slice]:
    """The module computing head ``g``'s ``which`` (q, k, v) from the attention norm's output, and its columns."""
    H, Hk, dh = dims(m)
    t = m.config.model_type
    a = attn(layer)
    if t == "gpt2":  # [q | k | v]
        off = "qkv".index(which) * H * dh
        return a.c_attn, slice(off + g * dh, off + (g + 1) * dh)
    if t == "gpt_neox":  # per head [q, k, v]
        off = g * 3 * dh + "qkv".index(which) * dh
        return a.query_key_value, slice(off, off + dh)
    return getattr(a, f"{which}_proj"), slice(g * dh, (g + 1) * dh)


def _first(out, new):
    return (new, *out[1:]) if isinstance(out, tuple) else new


def _hidden(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args, kwargs, x):
    if args:
        return (x, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": x}


def record(m, tokens: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Logits and every site by hand: ``resid_pre{l}`` (a layer's input), ``attn_out{l}``, ``mlp_out{l}``,
    ``z{l}`` (the output projection's input)."""
    cache, handles = {}, []
    for i, layer in enumerate(layers(m)):

        def pre(mod, args, kwargs, i=i):
            cache[f"resid_pre{i}"] = _hidden(args, kwargs).detach().clone()

        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(attn(layer).register_forward_hook(lambda mod, a, o, i=i: cache.__setitem__(
            f"attn_out{i}", (o[0] if isinstance(o, tuple) else o).detach().clone())))  # fmt: skip
        handles.append(layer.mlp.register_forward_hook(lambda mod, a, o, i=i: cache.__setitem__(
            f"mlp_out{i}", o.detach().clone())))  # fmt: skip
        handles.append(out_proj(layer).register_forward_pre_hook(lambda mod, a, i=i: cache.__setitem__(
            f"z{i}", a[0].detach().clone())))  # fmt: skip
    try:
        with torch.no_grad():
            logits = m(tokens).logits
    finally:
        for h in handles:
            h.remove()
    return logits, cache


def patched_by_hand(m, tokens, site: str, lay: int, pos: int, head: int | None, source: dict) -> torch.Tensor:
    """The metric of ``tokens``' run with ``site`` of layer ``lay`` (head ``head``) at ``pos`` replaced by
    ``source``'s (every row)."""
    layer = layers(m)[lay]
    src = source[f"{site}{lay}"]
    _, _, dh = dims(m)

    def put(x):
        x = x.clone()
        cols = slice(None) if head is None else slice(head * dh, (head + 1) * dh)
        x[:, pos, cols] = src[:, pos, cols]
        return x

    if site == "resid_pre":
        h = layer.register_forward_pre_hook(
            lambda mod, a, k: _with_hidden(a, k, put(_hidden(a, k))), with_kwargs=True
        )
    elif site == "z":
        h = out_proj(layer).register_forward_pre_hook(lambda mod, a: (put(a[0]), *a[1:]))
    else:
        mod = attn(layer) if site == "attn_out" else layer.mlp
        h = mod.register_forward_hook(lambda mod, a, o: _first(o, put(o[0] if isinstance(o, tuple) else o)))
    try:
        with torch.no_grad():
            return hand_metric(m(tokens).logits)
    finally:
        h.remove()


# --------------------------------------------------------------------------------- activation patching


@pytest.mark.parametrize(
    "name, direction", [(n, "denoising") for n in FAMILIES] + [("gpt2", "noising"), ("qwen2", "noising")]
)
def test_grid_entries_equal_a_patched_forward_done_by_hand_on_right_padded_prompts(name, direction):
    """Every cell of resid_pre (through the Hugging Face adapter, and through the exact engine), attn_out, mlp_out
    and z equals the Hugging Face model's own forward with that activation replaced by hand, per row, each row
    read at its last real token."""
    m = model(name)
    clean, corrupted = prompts()
    target, source = (corrupted, clean) if direction == "denoising" else (clean, corrupted)
    _, source_cache = record(m, source)
    base, _ = record(m, target)
    H, _, _ = dims(m)
    runs = [
        ("resid_pre", "naive"),
        ("resid_pre", "exact"),
        ("attn_out", "auto"),
        ("mlp_out", "auto"),
        ("z", "auto"),
    ]
    for site, method in runs:
        res = activation_patching(
            m, site, clean, corrupted, metric=metric(), method=method, direction=direction, quiet=True
        )
        target_metric = res.corrupted if direction == "denoising" else res.clean
        torch.testing.assert_close(target_metric, hand_metric(base), rtol=0, atol=1e-10)
        for lay in range(2):
            for pos in range(6):
                for head in range(H) if site == "z" else [None]:
                    want = patched_by_hand(m, target, site, lay, pos, head, source_cache)
                    got = res.values[:, lay, head, pos] if head is not None else res.values[:, lay, pos]
                    torch.testing.assert_close(
                        got, want, rtol=0, atol=1e-10, msg=f"{name} {site} {lay} {head} {pos}"
                    )
        # a patch after a row's last real token changes nothing there
        late = res.values[0, ..., 4:] if site != "z" else res.values[0, :, :, 4:]
        assert bool((late == target_metric[0]).all()), (name, site)


# ---------------------------------------------------------------------------- circuits: sources and leaves


def sources(m, tokens) -> dict:
    """Every source node's output by hand: ``embed`` (the first layer's input), ``L{l}H{h}``, ``MLP{l}``."""
    _, cache = record(m, tokens)
    H, _, _ = dims(m)
    out = {"embed": cache["resid_pre0"]}
    for lay, layer in enumerate(layers(m)):
        for h in range(H):
            out[f"L{lay}H{h}"] = head_write(m, layer, cache[f"z{lay}"], h).detach()
        out[f"MLP{lay}"] = cache[f"mlp_out{lay}"]
    return out


def run_with_inputs(m, tokens, shift: dict, leaves: bool, embed: torch.Tensor | None = None):
    """The run of ``tokens`` where each destination input (``L{l}H{g}.q``, ``L{l}KV{g}.k``, ``MLP{l}``,
    ``logits``) reads the residual stream plus ``shift[dst]`` (default 0), each through a copy of its own; with
    ``leaves`` the gradient of the summed metric at every destination input is returned. ``embed``: the first
    layer's input in place of the embedding."""
    H, Hk, _ = dims(m)
    made, handles = {}, []
    if embed is not None:
        handles.append(
            layers(m)[0].register_forward_pre_hook(
                lambda mod, a, k: _with_hidden(a, k, embed), with_kwargs=True
            )
        )

    def own(name, x):
        # a zero leaf added to this input alone: its gradient is the input's, and the stream upstream still
        # carries the gradient of every other path
        zero = torch.zeros_like(x, requires_grad=leaves)
        made[name] = zero
        return x + shift.get(name, 0) + zero

    def kv_name(lay, which, g):
        return f"L{lay}H{g}.{which}" if which == "q" or Hk == H else f"L{lay}KV{g}.{which}"

    for lay, layer in enumerate(layers(m)):
        norm, resid = attn_norm(layer), {}
        handles.append(norm.register_forward_pre_hook(lambda mod, a, r=resid: r.__setitem__("x", a[0])))
        for which, n in (("q", H), ("k", Hk), ("v", Hk)):
            for g in range(n):
                proj, cols = projection_columns(m, layer, which, g)

                def fwd(mod, a, o, lay=lay, which=which, g=g, cols=cols, norm=norm, resid=resid):
                    x = own(kv_name(lay, which, g), resid["x"])
                    o = o.clone()
                    o[..., cols] = mod.forward(norm.forward(x))[..., cols]
                    return o

                handles.append(proj.register_forward_hook(fwd))
        handles.append(
            mlp_norm(layer).register_forward_pre_hook(lambda mod, a, lay=lay: (own(f"MLP{lay}", a[0]),))
        )
    handles.append(final_norm(m).register_forward_pre_hook(lambda mod, a: (own("logits", a[0]),)))
    try:
        with torch.enable_grad():
            value = hand_metric(m(tokens).logits)
            if not leaves:
                return value.detach(), None
            grads = torch.autograd.grad(value.sum(), list(made.values()))
    finally:
        for h in handles:
            h.remove()
    return value.detach(), dict(zip(made, grads))


@pytest.mark.parametrize("name", FAMILIES)
def test_eap_equals_activation_difference_dot_autograd_gradient_on_padded_prompts(name):
    """EAP's per-example score of every edge equals ``(u_corrupted - u_clean) . dM/d(input of v)`` with each
    destination input (every head's query, key and value input, each MLP's, the logits') a separate autograd
    leaf of the Hugging Face model's clean run, on right-padded prompts."""
    m = model(name)
    clean, corrupted = prompts()
    res = edge_attribution(m, clean, corrupted, metric=metric(), method="eap")
    src_clean, src_corr = sources(m, clean), sources(m, corrupted)
    m_clean, grads = run_with_inputs(m, clean, {}, leaves=True)
    torch.testing.assert_close(res.m_clean, m_clean, rtol=0, atol=1e-10)
    g = res.graph
    want = torch.stack(
        [
            ((src_corr[g.src_names[s]] - src_clean[g.src_names[s]]) * grads[g.dst_names[d]]).sum((1, 2))
            for s, d in zip(g.src_idx.tolist(), g.dst_idx.tolist())
        ],
        1,
    )
    scale = float(want.abs().max())
    assert scale > 1e-2  # the scores say something
    if name in ("gpt2", "neox"):  # LayerNorms in float64: the same numbers to rounding
        torch.testing.assert_close(res.values, want, rtol=1e-9, atol=1e-12 * scale)
    else:  # Hugging Face's RMSNorm computes in float32 in a float64 model (so does the converted model's, whose
        # closed-form VJP rounds otherwise than autograd through the casts): float32 rounding of the gradient
        torch.testing.assert_close(res.values, want, rtol=0, atol=1e-6 * scale)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_denoising_eap_and_eap_ig_equal_autograd_on_padded_prompts(name):
    """Denoising EAP: ``(u_clean - u_corrupted) . dM/d(input of v)`` at the corrupted run. EAP-IG (noising, 3
    steps): ``(u_corrupted - u_clean) . mean_j dM/d(input of v)`` over the runs whose embedding is
    ``e_corr + (j / 3) (e_clean - e_corr)``, ``j = 1, 2, 3``. Per-position EAP: each position's term alone."""
    m = model(name)
    clean, corrupted = prompts()
    src_clean, src_corr = sources(m, clean), sources(m, corrupted)
    # float64 LayerNorms (GPT-2); float32 RMSNorms (Llama): float32 rounding relative to the largest score
    tol = dict(rtol=1e-9, atol=1e-12) if name == "gpt2" else dict(rtol=0, atol=4e-6)

    def scores(graph, diff, grads, per_position=False):
        cols = []
        for i, (s, d) in enumerate(zip(graph.src_idx.tolist(), graph.dst_idx.tolist())):
            t = diff[graph.src_names[s]] * grads[graph.dst_names[d]]
            cols.append(t[:, graph.pos_idx[i]].sum(-1) if per_position else t.sum((1, 2)))
        return torch.stack(cols, 1)

    _, g_corr = run_with_inputs(m, corrupted, {}, leaves=True)
    back = {u: src_clean[u] - src_corr[u] for u in src_clean}
    res = edge_attribution(m, clean, corrupted, metric=metric(), mode="denoise")
    torch.testing.assert_close(res.values, scores(res.graph, back, g_corr), **tol)

    grads = [
        run_with_inputs(
            m,
            clean,
            {},
            leaves=True,
            embed=src_corr["embed"] + j / 3 * (src_clean["embed"] - src_corr["embed"]),
        )[1]
        for j in (1, 2, 3)
    ]
    mean_grad = {k: sum(g[k] for g in grads) / 3 for k in grads[0]}
    fwd = {u: src_corr[u] - src_clean[u] for u in src_clean}
    res = edge_attribution(m, clean, corrupted, metric=metric(), method="eap-ig", steps=3)
    want = scores(res.graph, fwd, mean_grad)
    assert want.abs().max() > 1e-2
    torch.testing.assert_close(res.values, want, **tol)

    _, g_clean = run_with_inputs(m, clean, {}, leaves=True)
    res = edge_attribution(m, clean, corrupted, metric=metric(), per_position=True)
    want = scores(res.graph, fwd, g_clean, per_position=True)
    torch.testing.assert_close(res.values, want, **tol)
    # the positions after a row's last real token score exactly zero
    for b, n in enumerate(LENGTHS.tolist()):
        assert bool((res.values[b, res.graph.pos_idx >= n] == 0).all())


@pytest.mark.parametrize("name", FAMILIES)
def test_one_patched_edge_equals_the_clean_run_with_its_destination_input_shifted_by_hand(name):
    """patch_edges of one edge ``u -> v`` (resample) equals the Hugging Face model's clean run in which ``v``'s
    input alone reads ``u_corrupted - u_clean`` more (noising), and its corrupted run in which it reads ``u_clean -
    u_corrupted`` more (denoising), for edges into a query, a key, a value, an MLP and the logits; and the effects
    are not nothing."""
    m = model(name)
    clean, corrupted = prompts()
    H, Hk, _ = dims(m)
    kv = "KV" if Hk != H else "H"
    cases = [
        ("L0H0", "L1H2.q"),
        ("embed", f"L0{kv}0.k"),
        ("L0H1", f"L1{kv}0.k"),
        ("L0H3", f"L1{kv}{Hk - 1}.v"),
        ("embed", "MLP0"),
        ("L0H0", "MLP1"),
        ("MLP0", "logits"),
        ("L1H2", "logits"),
    ]
    src = {"clean": sources(m, clean), "corrupted": sources(m, corrupted)}
    sets = [[f"{u}->{v}"] for u, v in cases]
    for mode, base, source in (("noise", "clean", "corrupted"), ("denoise", "corrupted", "clean")):
        tokens = clean if base == "clean" else corrupted
        m_base, _ = run_with_inputs(m, tokens, {}, leaves=False)
        got = patch_edges(m, sets, clean, corrupted, metric=metric(), mode=mode)
        moved = 0
        for (u, v), row in zip(cases, got):
            want, _ = run_with_inputs(m, tokens, {v: src[source][u] - src[base][u]}, leaves=False)
            moved += bool((want - m_base).abs().max() > 1e-3)
            torch.testing.assert_close(row, want, rtol=0, atol=1e-10, msg=f"{name} {mode} {u}->{v}")
        # in a parallel block an MLP reads the block's input, so in GPT-NeoX MLP0 differs only at the corrupted
        # positions, which the metric does not read: MLP0 -> logits changes nothing there
        assert moved >= len(cases) - 1, mode


# ----------------------------------------------------------------------------------- AtP and padding ids


def test_atp_gives_zero_after_each_rows_last_real_token_and_ignores_the_pad_id():
    """AtP (and AtP* with the QK fix and GradDrop) on right-padded prompts: every cell after a row's metric position
    estimates no change (exactly); and the estimates do not depend on the token id in the padding."""
    m = model("llama")
    out = {}
    for pad in (0, 13):
        clean, corrupted = prompts(pad)
        out[pad] = attribution_patching(
            m, clean, corrupted, metric=metric(), sites=["resid_pre", "attn_out", "z"]
        )
        star = attribution_patching(
            m, clean, corrupted, metric=metric(), sites=["k", "v"], qk_fix=True, grad_drop=True
        )
        out[pad].update({f"{k} AtP*": v for k, v in star.items()})
    for site, res in out[0].items():
        for b, n in enumerate(LENGTHS.tolist()):
            late = res.values[b, ..., n:]
            assert bool((late == res.corrupted[b]).all()), (site, b)
            assert bool((res.values[b, ..., :n] != res.corrupted[b]).any()), (site, b)
        torch.testing.assert_close(out[13][site].values, res.values, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["gpt2", "neox"])
def test_results_do_not_depend_on_the_pad_id(name):
    """Exact patching, EAP (per position too), exact edge patching and faithfulness on right-padded prompts give
    the same numbers whatever token id fills the padding."""
    m = model(name)
    res = {}
    for pad in (0, 13):
        clean, corrupted = prompts(pad)
        res[pad] = [
            activation_patching(m, "z", clean, corrupted, metric=metric(), quiet=True).values,
            activation_patching(m, "resid_pre", clean, corrupted, metric=metric(), quiet=True).values,
            edge_attribution(m, clean, corrupted, metric=metric()).values,
            edge_attribution(m, clean, corrupted, metric=metric(), per_position=True).values,
            patch_edges(
                m, [["L0H1->logits"], ["embed->MLP1", "MLP0->logits"]], clean, corrupted, metric=metric()
            ),
            faithfulness(m, [["L0H1->logits", "L1H0->logits"]], clean, corrupted, metric=metric()),
        ]
    for a, b in zip(res[0], res[13]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_a_mean_over_right_padded_prompts_mixes_the_padding_into_the_real_positions():
    """A per-position mean over a right-padded batch (``MeanAblation()``, circuits' ``ablation="mean"``) averages
    the padding of the shorter prompts into the longer prompts' real positions: the pad id changes a real
    position's value, as the docstrings now say. The remedy they name (reference prompts real at every position:
    ``MeanAblation(reference_tokens=...)``, or such prompts as ``corrupted``) does not depend on the pad id."""
    m = model("llama")
    g = torch.Generator().manual_seed(9)
    reference = torch.randint(2, V, (3, 6), generator=g)
    out = {}
    for pad in (0, 13):
        clean, _ = prompts(pad)
        kw = dict(direction="noising", metric=metric(), quiet=True)
        out[pad] = [
            activation_patching(m, "resid_pre", clean, corruption=MeanAblation(), **kw).values,
            edge_attribution(m, clean, metric=metric(), ablation="mean").values,
            activation_patching(m, "resid_pre", clean, corruption=MeanAblation(reference_tokens=reference), **kw)
            .values,
            edge_attribution(m, clean, reference, metric=metric(), ablation="mean").values,
        ]  # fmt: skip
    # row 0 is real at position 3, where row 2 is padding
    assert not torch.allclose(out[0][0][0, :, 3], out[13][0][0, :, 3])
    assert not torch.allclose(out[0][1][0], out[13][1][0])
    for a, b in zip(out[0][2:], out[13][2:]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert "padding" in MeanAblation.__doc__ and "reference_tokens" in MeanAblation.__doc__
    assert "padding" in patch_edges.__doc__.split("graph :")[0].split("ablation :")[1]


# ------------------------------------------------------------------------------------------- left padding


@pytest.mark.parametrize("name", FAMILIES)
def test_the_hf_forward_counts_positions_from_the_first_pad_without_position_ids(name):
    """What a Hugging Face forward does with left padding and no ``position_ids``: positions ``0 .. pos-1`` from
    the first (padding) token, the padding masked out. With rotary positions (relative) the real tokens' logits are
    the unpadded prompt's up to rounding; with GPT-2's learned positions they are not. With ``position_ids`` counted
    from the first real token they are the unpadded prompt's for every family. pypattern reads no mask, so it
    cannot reproduce either and refuses the tokenizer's output (next test)."""
    m = model(name)
    ids = torch.tensor([[3, 17, 22, 9, 30]])
    padded = torch.cat([torch.full((1, 3), 2), ids], 1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        alone = m(ids).logits
        no_pos = m(padded, attention_mask=mask).logits[:, 3:]
        counted = m(padded, attention_mask=mask, position_ids=torch.arange(8)[None]).logits[:, 3:]
        from_real = m(padded, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[
            :, 3:
        ]
    torch.testing.assert_close(no_pos, counted, rtol=0, atol=1e-12)
    torch.testing.assert_close(from_real, alone, rtol=0, atol=1e-12)
    gap = (no_pos - alone).abs().max()
    assert gap > 1e-3 if name == "gpt2" else gap < 1e-6


@pytest.mark.parametrize("form", ["tensors", "tensors with position_ids", "lists", "numpy"])
def test_left_padded_batch_encoding_read_by_patching_and_by_circuits(form):
    """A tokenizer's left-padded output (``return_tensors="pt"``, with ``position_ids`` counted from the first
    real token or not, ``"np"``, or plain lists) is read by the patching and the circuit calls as its ids and mask
    (the same values as the tensors with ``attention_mask=``; as corrupted prompts beside unmasked clean ones it is
    refused: one mask serves both)."""
    m = model("qwen2")
    clean, corrupted = prompts()
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6, [0, 0, 0, 1, 1, 1]])
    enc = {"input_ids": clean, "attention_mask": mask}
    if form == "tensors with position_ids":
        enc["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    elif form == "lists":
        enc = {k: v.tolist() for k, v in enc.items()}
    elif form == "numpy":
        enc = {k: v.numpy() for k, v in enc.items()}
    enc = T.BatchEncoding(enc)
    met = LogitDiff(ANSWER, WRONG)
    patching = {
        "activation_patching": lambda c, k, **kw: (
            activation_patching(m, "resid_pre", c, k, metric=met, quiet=True, **kw).values
        ),
        "activation_patching z": lambda c, k, **kw: (
            activation_patching(m, "z", c, k, metric=met, quiet=True, **kw).values
        ),
        "attribution_patching": lambda c, k, **kw: (
            attribution_patching(m, c, k, metric=met, **kw)["z"].values
        ),
    }
    for label, call in patching.items():
        torch.testing.assert_close(
            call(enc, corrupted), call(clean, corrupted, attention_mask=mask), rtol=0, atol=0, msg=label
        )
        with pytest.raises(
            ValueError, match=r"corrupted_tokens holds an attention_mask other than the clean"
        ):
            call(clean, enc)
    circuits = {
        "patch_edges": lambda c, k, **kw: patch_edges(m, ["embed->logits"], c, k, metric=met, **kw),
        "edge_attribution": lambda c, k, **kw: edge_attribution(m, c, k, metric=met, **kw).values,
        "faithfulness": lambda c, k, **kw: torch.tensor(faithfulness(m, [], c, k, metric=met, **kw)),
    }
    for label, call in circuits.items():
        torch.testing.assert_close(
            call(enc, corrupted), call(clean, corrupted, attention_mask=mask), rtol=0, atol=0, msg=label
        )
        with pytest.raises(ValueError, match=r"corrupted holds an attention_mask other than the clean"):
            call(clean, enc)


def test_clean_and_corrupted_of_other_lengths_or_batches_are_refused_naming_both_shapes():
    m = model("llama")
    clean, _ = prompts()
    met = metric()
    calls = [
        lambda k: activation_patching(m, "resid_pre", clean, k, metric=met, quiet=True),
        lambda k: activation_patching(m, "z", clean, k, metric=met, quiet=True),
        lambda k: attribution_patching(m, clean, k, metric=met),
        lambda k: patch_edges(m, ["embed->logits"], clean, k, metric=met),
        lambda k: edge_attribution(m, clean, k, metric=met, per_position=True),
    ]
    for call in calls:
        for shape in ((3, 5), (3, 7), (2, 6)):
            k = torch.randint(2, V, shape)
            with pytest.raises(
                ValueError, match=rf"{re.escape(str(shape))}; it must equal the clean shape \(3, 6\)"
            ):
                call(k)
