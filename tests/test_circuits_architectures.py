"""The circuits module on Hugging Face models given to the public functions as they are: GPT-2, GPT-NeoX (parallel
attention + MLP, partial rotary), Llama (grouped-query attention), Mistral (a sliding window), Qwen2 (query/key/value
biases) and Qwen3, OLMo and StarCoder2 (Llama's module layout), against a reference that runs the Hugging Face
model itself.

The reference never converts the model: it runs the Hugging Face forward and rewires it with hooks. Node outputs
are read where the model computes them (the embedding entering layer 0, each head's slice of the attention output
projection's input times its slice of the weight, each MLP's output); a destination input is replaced where the
model reads it: each query head's (or key/value head's) columns of the query/key/value projection are recomputed
from that input's own corrected residual through the model's own norm and projection; an MLP's input by a
pre-hook on the norm in front of it, the logits' input by a pre-hook on the final norm. One patched forward per
edge set; edge attribution from autograd through per-destination zero offsets added to those inputs.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from pypattern.circuits import edge_attribution, edges, faithfulness, patch_edges, pruning_curve
from pypattern.patching import LogitDiff

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

V = 13  # vocabulary


# ----------------------------------------------------------------------------------------------- models


def _hf(kind: str, **kw):
    """A tiny float64 Hugging Face causal LM from a config (nothing downloaded), with non-trivial 1-d parameters
    (norm weights and biases)."""
    torch.manual_seed(0)
    x = kw.get("x", {})
    if kind == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=V, n_embd=kw.get("d", 12), n_layer=2, n_head=kw.get("H", 3), n_positions=8, n_inner=20,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.3,
            tie_word_embeddings=kw.get("tie", True), **x,
        )  # fmt: skip
        hf = transformers.GPT2LMHeadModel(cfg)
    elif kind == "neox":
        cfg = transformers.GPTNeoXConfig(
            vocab_size=V, hidden_size=12, num_hidden_layers=2, num_attention_heads=3, intermediate_size=20,
            rotary_pct=0.5, max_position_embeddings=8, use_parallel_residual=kw.get("parallel", True),
            tie_word_embeddings=False, initializer_range=0.3, hidden_dropout=0.0, attention_dropout=0.0,
        )  # fmt: skip
        hf = transformers.GPTNeoXForCausalLM(cfg)
    else:
        conf, cls = {
            "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
            "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
            "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
            "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
            "olmo": (transformers.OlmoConfig, transformers.OlmoForCausalLM),
            "starcoder2": (transformers.Starcoder2Config, transformers.Starcoder2ForCausalLM),
            "arcee": (transformers.ArceeConfig, transformers.ArceeForCausalLM),
            "glm": (transformers.GlmConfig, transformers.GlmForCausalLM),
            "nemotron": (transformers.NemotronConfig, transformers.NemotronForCausalLM),
        }[kind]
        cfg = conf(
            vocab_size=V, hidden_size=12, num_hidden_layers=2, num_attention_heads=kw.get("H", 6),
            num_key_value_heads=kw.get("Hk", 2), intermediate_size=20, max_position_embeddings=8,
            initializer_range=0.3, tie_word_embeddings=False, **x,
        )  # fmt: skip
        hf = cls(cfg)
    hf = hf.to(torch.float64).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return hf


# ----------------------------------------------------------------------------------------------- reference


class _Hooked:
    """Where the Hugging Face model computes each node and reads each destination input."""

    def __init__(self, hf):
        cfg = hf.config
        self.hf, self.kind, self.layers = hf, cfg.model_type, []
        if self.kind == "gpt2":
            tr = hf.transformer
            self.embed, self.final, self.H, self.Hk, self.parallel = (
                tr.drop,
                tr.ln_f,
                cfg.n_head,
                cfg.n_head,
                False,
            )
            self.d = cfg.n_embd
            for b in tr.h:
                self.layers.append((b.ln_1, b.ln_2, {"qkv": b.attn.c_attn}, b.attn.c_proj, b.mlp))
        elif self.kind == "gpt_neox":
            tr = hf.gpt_neox
            self.embed, self.final = tr.emb_dropout, tr.final_layer_norm
            self.H = self.Hk = cfg.num_attention_heads
            self.d, self.parallel = cfg.hidden_size, cfg.use_parallel_residual
            for b in tr.layers:
                a = b.attention
                self.layers.append((b.input_layernorm, b.post_attention_layernorm, {"qkv": a.query_key_value},
                                    a.dense, b.mlp))  # fmt: skip
        else:
            tr = hf.model
            self.embed, self.final, self.parallel = tr.embed_tokens, tr.norm, False
            self.H, self.Hk, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size
            for b in tr.layers:
                a = b.self_attn
                projs = {"q": a.q_proj, "k": a.k_proj, "v": a.v_proj}
                self.layers.append((b.input_layernorm, b.post_attention_layernorm, projs, a.o_proj, b.mlp))
        self.dh = getattr(cfg, "head_dim", None) or self.d // self.H

    def kv(self, layer: int, g: int) -> str:
        """The documented name of a key/value input's node: the key/value head under grouped-query attention."""
        return f"L{layer}KV{g}" if self.Hk < self.H else f"L{layer}H{g}"

    def destinations(self) -> list[tuple[str, list[str]]]:
        """Every destination input with the sources written before it reads (the definition of the graph)."""
        out, before = [], ["embed"]
        for layer in range(len(self.layers)):
            heads = [f"L{layer}H{h}" for h in range(self.H)]
            out += [(f"{n}.q", list(before)) for n in heads]
            out += [(f"{self.kv(layer, g)}.{w}", list(before)) for w in "kv" for g in range(self.Hk)]
            out.append((f"MLP{layer}", before + ([] if self.parallel else heads)))
            before = before + heads + [f"MLP{layer}"]
        return out + [("logits", before)]

    def columns(self, key: str) -> list[tuple[str, int, slice]]:
        """(which, head, columns) of each head's query, key or value in the projection ``key``'s output."""
        H, dh, d = self.H, self.dh, self.d
        if key != "qkv":
            return [(key, h, slice(h * dh, (h + 1) * dh)) for h in range(H if key == "q" else self.Hk)]
        if self.kind == "gpt2":  # [q of every head | k | v]
            return [
                (w, h, slice(i * d + h * dh, i * d + (h + 1) * dh))
                for i, w in enumerate("qkv")
                for h in range(H)
            ]
        # GPT-NeoX: per head [q k v]
        return [
            (w, h, slice((3 * h + i) * dh, (3 * h + i + 1) * dh))
            for h in range(H)
            for i, w in enumerate("qkv")
        ]

    def run(self, tokens, read, embed=None):
        """Logits of ``tokens`` where every destination input ``v`` reads ``read(v, x, cur)`` instead of the
        residual ``x`` (``cur``: the node outputs of this run so far); ``embed`` replaces the embedding."""
        cur, pre, handles = {}, {}, []

        def on_embed(mod, args, out):
            cur["embed"] = out if embed is None else embed
            return cur["embed"]

        handles.append(self.embed.register_forward_hook(on_embed))
        for layer, (ln1, ln2, projs, o, mlp) in enumerate(self.layers):
            handles.append(
                ln1.register_forward_pre_hook(lambda m, a, layer=layer: pre.__setitem__(layer, a[0]))
            )
            for key, proj in projs.items():

                def on_proj(mod, args, out, layer=layer, key=key, ln1=ln1):
                    out = out.clone()
                    for w, h, cols in self.columns(key):
                        name = f"L{layer}H{h}" if w == "q" else self.kv(layer, h)
                        x = read(f"{name}.{w}", pre[layer], cur)
                        if x is not pre[layer]:
                            out[..., cols] = mod.forward(ln1.forward(x))[..., cols]
                    return out

                handles.append(proj.register_forward_hook(on_proj))

            def on_z(mod, args, layer=layer):
                W = mod.weight  # Conv1D (in, out) for GPT-2, Linear (out, in) otherwise
                for h in range(self.H):
                    c = slice(h * self.dh, (h + 1) * self.dh)
                    cur[f"L{layer}H{h}"] = args[0][..., c] @ (W[c] if self.kind == "gpt2" else W[:, c].T)

            handles.append(o.register_forward_pre_hook(on_z))
            handles.append(
                ln2.register_forward_pre_hook(lambda m, a, layer=layer: (read(f"MLP{layer}", a[0], cur),))
            )
            handles.append(
                mlp.register_forward_hook(lambda m, a, out, layer=layer: cur.__setitem__(f"MLP{layer}", out))
            )
        handles.append(self.final.register_forward_pre_hook(lambda m, a: (read("logits", a[0], cur),)))
        try:
            return self.hf(tokens).logits, cur
        finally:
            for h in handles:
                h.remove()

    def outputs(self, tokens) -> dict:
        with torch.no_grad():
            return {k: v.detach() for k, v in self.run(tokens, lambda v, x, cur: x)[1].items()}


def _setting(ref: _Hooked, clean, corrupted, mode: str, ablation: str):
    """The base prompts and the values ``A_u`` a patched edge carries."""
    base = clean if mode == "noise" else corrupted
    A = ref.outputs(corrupted if mode == "noise" else clean)
    if ablation == "mean":
        A = {k: v.mean(0, keepdim=True).expand_as(v) for k, v in A.items()}
    elif ablation == "zero":
        A = {k: torch.zeros_like(v) for k, v in A.items()}
    return base, A


def _at(logits, pos):
    return logits[:, pos] if isinstance(pos, int) else logits[torch.arange(len(pos)), pos]


def _naive_patch(ref: _Hooked, patched, base, A, metric_fn, pos) -> torch.Tensor:
    """The metric with the edges ``patched`` (``(src, dst_input, pos or None)``) reading ``A_src`` at their
    destination only: one hooked forward."""
    by_dst: dict = {}
    for s, d, p in patched:
        by_dst.setdefault(d, []).append((s, p))

    def read(dst, x, cur):
        if dst not in by_dst:
            return x
        x = x.clone()
        for s, p in by_dst[dst]:
            at = slice(None) if p is None else slice(p, p + 1)
            x[:, at] = x[:, at] - (cur[s] - A[s])[:, at]
        return x

    with torch.no_grad():
        return metric_fn(_at(ref.run(base, read)[0], pos))


def _naive_scores(ref: _Hooked, base, A, metric_fn, pos, steps=None, per_position=False) -> dict:
    """EAP (``steps`` None) or EAP-IG scores ``(A_u - out_u) . dM/d(input of v)``, the gradient averaged over runs
    from the embeddings ``e_A + (j / steps) (e_base - e_A)``, ``j = 1 .. steps``: ``{(src, dst, pos): (batch,)}``."""
    out_base = ref.outputs(base)
    alphas = [1.0] if steps is None else [j / steps for j in range(1, steps + 1)]
    grads: dict = {}
    for a in alphas:
        offsets: dict = {}

        def read(dst, x, cur, offsets=offsets):
            offsets.setdefault(dst, torch.zeros_like(x, requires_grad=True))
            return x + offsets[dst]

        emb = (A["embed"] + a * (out_base["embed"] - A["embed"])).clone()
        m = metric_fn(_at(ref.run(base, read, embed=emb)[0], pos)).sum()
        names = list(offsets)
        for n, gr in zip(names, torch.autograd.grad(m, [offsets[n] for n in names], allow_unused=True)):
            if gr is not None:
                grads[n] = grads.get(n, 0) + gr / len(alphas)
    scores = {}
    T = base.shape[1]
    for dst, srcs in ref.destinations():
        for s in srcs:
            prod = ((A[s] - out_base[s]) * grads[dst]).sum(-1) if dst in grads else torch.zeros(base.shape)
            for t in range(T) if per_position else [None]:
                scores[(s, dst, t)] = prod.sum(1) if t is None else prod[:, t]
    return scores


def _key(e):
    return (e.src, e.dst_input, e.pos)


def _prompts(B, T, seed, per_example):
    g = torch.Generator().manual_seed(seed)
    clean, corr = torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)
    ans = torch.randint(0, V, (B,), generator=g)
    wrong = (ans + 1 + torch.randint(0, V - 1, (B,), generator=g)) % V
    pos = T - 1
    if per_example:
        pos = torch.randint(0, T, (B,), generator=g)
        pos[0] = T - 1

    def metric_fn(lg):
        return lg[torch.arange(B), ans] - lg[torch.arange(B), wrong]

    return clean, corr, LogitDiff(ans, wrong, position=pos), metric_fn, pos


def _rel(a, b) -> float:
    return float((a - b).abs().max()) / max(1.0, float(b.abs().max()))


# ----------------------------------------------------------------------------------------------- tests

# Llama, Mistral, Qwen2 and Qwen3 compute their RMSNorms in float32 (and so does the converted model), so a float64
# model agrees with the reference to float32 rounding through the norms; the LayerNorm families to float64 rounding
FAMILIES = {
    "gpt2": ("gpt2", dict(tie=False), 1e-10),  # 3 heads, untied embeddings
    "neox": ("neox", {}, 1e-10),  # parallel attention + MLP, partial rotary, 3 heads
    "neox_sequential": ("neox", dict(parallel=False), 1e-10),
    "llama": ("llama", {}, 1e-5),  # 6 query heads on 2 key/value heads (3 per group)
    "mistral": ("mistral", dict(x=dict(sliding_window=2)), 1e-5),  # a window shorter than the prompts
    "qwen2": ("qwen2", dict(H=3, Hk=1), 1e-5),  # biased q/k/v, one key/value head for 3 query heads
    # an RMSNorm over each head's query and key; 4 heads of width 4 on a residual of width 12
    "qwen3": ("qwen3", dict(H=4, x=dict(head_dim=4)), 1e-5),
    "olmo": ("olmo", dict(H=3, Hk=1), 1e-10),  # LayerNorms without weights, one key/value head
    # LayerNorms and biases on every projection
    "starcoder2": ("starcoder2", dict(H=3, Hk=3, x=dict(residual_dropout=0.0, embedding_dropout=0.0)), 1e-10),
    # a plain squared-ReLU MLP, biases on every projection
    "arcee": ("arcee", dict(H=3, Hk=1, x=dict(attention_bias=True, mlp_bias=True, pad_token_id=None)), 1e-5),
    # adjacent rotary pairs on half of each head, q/k/v biases, a fused gate_up_proj
    "glm": ("glm", dict(H=3, Hk=3, x=dict(head_dim=4, pad_token_id=None)), 1e-5),
    # LayerNorms multiplying by 1 + w (in float64 throughout), partial rotary, biases on every projection
    "nemotron": (
        "nemotron",
        dict(H=3, Hk=1, x=dict(attention_bias=True, mlp_bias=True, pad_token_id=None)),
        1e-10,
    ),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_graph_patching_and_attribution_match_the_hf_model(family):
    kind, kw, tol = FAMILIES[family]
    hf = _hf(kind, **kw)
    ref = _Hooked(hf)
    clean, corr, metric, metric_fn, pos = _prompts(3, 4, seed=3, per_example=family in ("llama", "neox"))
    g = edges(hf)
    # the graph is the definition: every source written before a destination input reads, GQA inputs per group
    assert sorted((e.src, e.dst_input) for e in g) == sorted(
        (s, d) for d, ss in ref.destinations() for s in ss
    )
    modes = {"gpt2": ("denoise", "zero"), "neox": ("noise", "mean"), "mistral": ("denoise", "resample")}
    mode, ablation = modes.get(family, ("noise", "resample"))
    base, A = _setting(ref, clean, corr, mode, ablation)
    # exact patching: each edge alone and random sets, one hooked forward each
    gen = torch.Generator().manual_seed(4)
    masks = torch.cat([torch.eye(len(g), dtype=torch.bool), torch.rand(4, len(g), generator=gen) < 0.4])
    ours = patch_edges(hf, masks, clean, corr, metric=metric, mode=mode, ablation=ablation)
    naive = torch.stack(
        [
            _naive_patch(ref, [_key(g[i]) for i in m.nonzero().flatten()], base, A, metric_fn, pos)
            for m in masks
        ]
    )
    assert _rel(ours, naive) <= tol
    # EAP-IG (two steps: the base run and the midpoint)
    sc = edge_attribution(
        hf, clean, corr, metric=metric, method="eap-ig", steps=2, mode=mode, ablation=ablation
    )
    r = _naive_scores(ref, base, A, metric_fn, pos, steps=2)
    assert _rel(sc.values, torch.stack([r[_key(e)] for e in g], 1)) <= tol


@pytest.mark.parametrize("family", ["neox", "qwen2"])
def test_per_position_edges_match_the_hf_model(family):
    kind, kw, tol = FAMILIES[family]
    hf = _hf(kind, **kw)
    ref = _Hooked(hf)
    clean, corr, metric, metric_fn, pos = _prompts(3, 4, seed=5, per_example=True)
    base, A = _setting(ref, clean, corr, "noise", "resample")
    gp = edges(hf, per_position=True, seq_len=4)
    sc = edge_attribution(hf, clean, corr, metric=metric, method="eap", per_position=True)
    r = _naive_scores(ref, base, A, metric_fn, pos, per_position=True)
    assert _rel(sc.values, torch.stack([r[_key(e)] for e in gp], 1)) <= tol
    masks = torch.rand(3, len(gp), generator=torch.Generator().manual_seed(6)) < 0.3
    ours = patch_edges(hf, masks, clean, corr, metric=metric, graph=gp)
    naive = torch.stack(
        [
            _naive_patch(ref, [_key(gp[i]) for i in m.nonzero().flatten()], base, A, metric_fn, pos)
            for m in masks
        ]
    )
    assert _rel(ours, naive) <= tol


def test_faithfulness_and_pruning_curve_match_the_hf_model():
    hf = _hf("llama")
    ref = _Hooked(hf)
    clean, corr, metric, metric_fn, pos = _prompts(3, 4, seed=7, per_example=False)
    base, A = _setting(ref, clean, corr, "noise", "resample")
    g = edges(hf)
    sc = edge_attribution(hf, clean, corr, metric=metric, method="eap")
    counts = [0, 1, 5, len(g) // 2, len(g)]
    curve = pruning_curve(hf, sc, clean, corr, metric=metric, counts=counts)
    order = torch.argsort(-sc.scores.abs(), stable=True).tolist()

    def m_kept(n):  # noising: every edge outside the circuit of the top n patched
        return _naive_patch(ref, [_key(g[i]) for i in order[n:]], base, A, metric_fn, pos).mean()

    full, empty = m_kept(len(g)), m_kept(0)
    assert curve.m_full == pytest.approx(float(full), rel=1e-5)
    assert curve.m_empty == pytest.approx(float(empty), rel=1e-5)
    for n, f in zip(curve.counts.tolist(), curve.faithfulness["eap"].tolist()):
        assert f == pytest.approx(float((m_kept(n) - empty) / (full - empty)), abs=1e-5)
    f5 = faithfulness(hf, [g[i] for i in order[:5]], clean, corr, metric=metric)
    assert f5 == pytest.approx(float((m_kept(5) - empty) / (full - empty)), abs=1e-5)


@pytest.mark.parametrize("T,B", [(1, 1), (2, 1), (3, 2)])
def test_short_prompts_and_single_examples_match_the_hf_model(T, B):
    hf = _hf("gpt2", H=1, d=6)
    ref = _Hooked(hf)
    clean, corr, metric, metric_fn, pos = _prompts(B, T, seed=8, per_example=B > 1)
    base, A = _setting(ref, clean, corr, "noise", "resample")
    g = edges(hf)
    ours = patch_edges(hf, torch.eye(len(g), dtype=torch.bool), clean, corr, metric=metric)
    naive = torch.stack([_naive_patch(ref, [_key(e)], base, A, metric_fn, pos) for e in g])
    assert _rel(ours, naive) <= 1e-10
    sc = edge_attribution(hf, clean, corr, metric=metric, method="eap")
    r = _naive_scores(ref, base, A, metric_fn, pos)
    assert _rel(sc.values, torch.stack([r[_key(e)] for e in g], 1)) <= 1e-10


def test_grouped_query_rmsnorm_model_is_exact_in_float64(monkeypatch):
    """With the RMSNorms computing in float64 on both sides (the converted model's compute dtype cleared, then the
    Hugging Face norms' forward replaced), a Llama with 3 query heads per key/value head agrees with the
    reference to float64 rounding."""
    from pypattern.models import from_hf

    hf = _hf("llama", H=6, Hk=2)
    model = from_hf(hf)
    for m in model.modules():
        if getattr(m, "compute_dtype", None) is not None:
            m.compute_dtype = None
    for m in hf.modules():
        if type(m).__name__ == "LlamaRMSNorm":

            def rms(x, m=m):
                return m.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + m.variance_epsilon))

            monkeypatch.setattr(m, "forward", rms)
    with torch.no_grad():
        tokens = torch.arange(5)[None] % V
        assert (model(tokens) - hf(tokens).logits).abs().max() <= 1e-12
    ref = _Hooked(hf)
    clean, corr, metric, metric_fn, pos = _prompts(2, 4, seed=9, per_example=True)
    base, A = _setting(ref, clean, corr, "noise", "resample")
    g = edges(model)
    masks = torch.cat(
        [
            torch.eye(len(g), dtype=torch.bool),
            torch.rand(3, len(g), generator=torch.Generator().manual_seed(9)) < 0.4,
        ]
    )
    ours = patch_edges(model, masks, clean, corr, metric=metric)
    naive = torch.stack(
        [
            _naive_patch(ref, [_key(g[i]) for i in m.nonzero().flatten()], base, A, metric_fn, pos)
            for m in masks
        ]
    )
    assert _rel(ours, naive) <= 1e-10
    sc = edge_attribution(model, clean, corr, metric=metric, method="eap-ig", steps=3)
    r = _naive_scores(ref, base, A, metric_fn, pos, steps=3)
    assert _rel(sc.values, torch.stack([r[_key(e)] for e in g], 1)) <= 1e-10


def test_half_precision_hf_models_warn():
    hf = _hf("qwen2", H=3, Hk=1).to(torch.bfloat16)
    clean, corr, metric, _, _ = _prompts(2, 3, seed=10, per_example=False)
    for call in (
        lambda: patch_edges(hf, ["embed->logits"], clean, corr, metric=metric),
        lambda: edge_attribution(hf, clean, corr, metric=metric),
        lambda: faithfulness(hf, ["embed->logits"], clean, corr, metric=metric),
    ):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            call()
        assert any("bfloat16" in str(x.message) and "half precision" in str(x.message) for x in w)
