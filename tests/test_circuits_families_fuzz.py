"""The circuits module on tiny models converted from Hugging Face across architecture families, against a naive
computation with a hooked forward per edge set on the plain converted model (the sets side by side in the rows of
one batch).

Families: GPT-NeoX (parallel, partial rotary), Llama (grouped-query), Mistral (a sliding window shorter than the
prompt), Qwen2 (query/key/value biases, one key/value head), Gemma (scaled embeddings, ``1 + w`` norms, multi-query,
tied), Phi (parallel reading one LayerNorm, partial rotary), Phi-3 (fused query/key/value), Falcon (multi-query
parallel, and the new decoder architecture: two LayerNorms, grouped), BLOOM (ALiBi, embedding LayerNorm), OPT,
GPT-J (adjacent rotary pairs, one LayerNorm), Mixtral and Qwen2-MoE (mixtures of experts), StarCoder2 (a window),
Granite (its multipliers, with a unit residual multiplier), StableLM (partial rotary, biases; sequential and
parallel), GPT-Neo (a local layer), GPT-BigCode (multi-query), SmolLM3 (layers without rotary positions).
Families whose heads' writes are not separable (sandwich norms: Gemma 2, Gemma 3, OLMo 2), whose projections are
clamped (OLMo ``clip_qkv``) or whose writes are scaled (Granite's ``residual_multiplier``) are refused by name.

The reference never goes through :class:`pypattern.circuits.ModelView`. It runs the converted model's own forward
with hooks: node outputs are the embedding entering block 0, each head's ``z_h @ W_O[h]`` and each MLP's output;
each head's query (each key/value head's key and value) is recomputed, in its slot of ``hook_q`` / ``hook_k`` /
``hook_v``, from that input's own corrected residual through ``ln1`` and the attention's projection; an MLP's input
is replaced by a pre-hook on ``ln2`` (on the MLP itself when attention and MLP share one norm), the logits' input by
a pre-hook on the final norm. Patching edge ``u -> v`` subtracts ``out_u - A_u`` from ``v``'s input (at one
position for a per-position edge). EAP is autograd of the metric through per-edge coefficients ``c_e`` rewiring
``v``'s input to ``in_v - c_e (out_u(base) - A_u)``, at ``c = 0``.

Float64 models are compared with their float32 internals (Llama-family norms, GPT-Neo's scores, BLOOM's softmax,
the routers) computed in float64, to 1e-9; the Hugging Face models given as they are, and float32 ones, to their
float32 rounding.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from pypattern.circuits import acdc, edge_attribution, edges, faithfulness, patch_edges, pruning_curve
from pypattern.models import Transformer
from pypattern.models.convert import UnsupportedModelError, from_hf
from pypattern.patching import LogitDiff

tf = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

V, D, L, INNER = 50, 32, 2, 48


def _llama_like(config, model, **kw):
    base = dict(
        vocab_size=V,
        hidden_size=D,
        num_hidden_layers=L,
        intermediate_size=INNER,
        max_position_embeddings=32,
        initializer_range=0.3,
        tie_word_embeddings=False,
        num_attention_heads=4,
    )
    return lambda: getattr(tf, model)(getattr(tf, config)(**{**base, **kw}))


def _plain(config, model, **kw):
    return lambda: getattr(tf, model)(getattr(tf, config)(vocab_size=V, initializer_range=0.3, **kw))


_NO_DROP = dict(hidden_dropout=0.0, attention_dropout=0.0)
_GPT_NO_DROP = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
_FALCON = dict(hidden_size=D, num_hidden_layers=L, num_attention_heads=4, bias=False, alibi=False, **_NO_DROP)
_NEO = dict(
    hidden_size=D,
    num_layers=L,
    num_heads=4,
    attention_types=[[["global", "local"], 1]],
    window_size=3,
    max_position_embeddings=32,
    intermediate_size=INNER,
    embed_dropout=0.0,
    attention_dropout=0.0,
    resid_dropout=0.0,
)

FAMILIES = {
    "neox": _llama_like(
        "GPTNeoXConfig", "GPTNeoXForCausalLM", rotary_pct=0.25, use_parallel_residual=True, **_NO_DROP
    ),
    "llama": _llama_like("LlamaConfig", "LlamaForCausalLM", num_key_value_heads=2),
    "mistral": _llama_like("MistralConfig", "MistralForCausalLM", num_key_value_heads=2, sliding_window=3),
    "qwen2": _llama_like("Qwen2Config", "Qwen2ForCausalLM", num_key_value_heads=1),
    "gemma": _llama_like(
        "GemmaConfig", "GemmaForCausalLM", num_key_value_heads=1, head_dim=8, tie_word_embeddings=True
    ),
    "phi": _llama_like(
        "PhiConfig",
        "PhiForCausalLM",
        partial_rotary_factor=0.5,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attention_dropout=0.0,
    ),
    "phi3": _llama_like("Phi3Config", "Phi3ForCausalLM", num_key_value_heads=2, pad_token_id=0),
    "falcon_mqa": _plain(
        "FalconConfig",
        "FalconForCausalLM",
        multi_query=True,
        parallel_attn=True,
        new_decoder_architecture=False,
        **_FALCON,
    ),
    "falcon_new": _plain(
        "FalconConfig", "FalconForCausalLM", num_kv_heads=2, new_decoder_architecture=True, **_FALCON
    ),
    "bloom": _plain("BloomConfig", "BloomForCausalLM", hidden_size=D, n_layer=L, n_head=4, **_NO_DROP),
    "opt": _plain(
        "OPTConfig",
        "OPTForCausalLM",
        hidden_size=D,
        num_hidden_layers=L,
        ffn_dim=INNER,
        num_attention_heads=4,
        word_embed_proj_dim=D,
        max_position_embeddings=32,
        dropout=0.0,
        attention_dropout=0.0,
        pad_token_id=1,
    ),
    "gptj": _plain(
        "GPTJConfig",
        "GPTJForCausalLM",
        n_embd=D,
        n_layer=L,
        n_head=4,
        rotary_dim=4,
        n_positions=32,
        n_inner=INNER,
        tie_word_embeddings=False,
        **_GPT_NO_DROP,
    ),
    "mixtral": _llama_like(
        "MixtralConfig",
        "MixtralForCausalLM",
        num_key_value_heads=2,
        num_local_experts=3,
        num_experts_per_tok=2,
    ),
    "qwen2_moe": _llama_like(
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        num_key_value_heads=2,
        num_experts=3,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
    ),
    "starcoder2": _llama_like(
        "Starcoder2Config",
        "Starcoder2ForCausalLM",
        num_key_value_heads=2,
        residual_dropout=0.0,
        embedding_dropout=0.0,
        sliding_window=4,
    ),
    "granite_unit": _llama_like(
        "GraniteConfig",
        "GraniteForCausalLM",
        num_key_value_heads=2,
        residual_multiplier=1.0,
        embedding_multiplier=2.0,
        attention_multiplier=0.3,
        logits_scaling=2.0,
    ),
    "stablelm": _llama_like(
        "StableLmConfig",
        "StableLmForCausalLM",
        num_key_value_heads=2,
        partial_rotary_factor=0.25,
        use_qkv_bias=True,
        use_parallel_residual=False,
        **_NO_DROP,
    ),
    "stablelm_parallel": _llama_like(
        "StableLmConfig",
        "StableLmForCausalLM",
        num_key_value_heads=4,
        partial_rotary_factor=0.5,
        use_parallel_residual=True,
        **_NO_DROP,
    ),
    "gpt_neo": _plain("GPTNeoConfig", "GPTNeoForCausalLM", **_NEO),
    "bigcode": _plain(
        "GPTBigCodeConfig",
        "GPTBigCodeForCausalLM",
        n_embd=D,
        n_layer=L,
        n_head=4,
        multi_query=True,
        n_positions=32,
        n_inner=INNER,
        **_GPT_NO_DROP,
    ),
    "smollm3": _llama_like(
        "SmolLM3Config", "SmolLM3ForCausalLM", num_key_value_heads=2, no_rope_layers=[0, 1], pad_token_id=0
    ),
}

REFUSED = {  # family -> (model, the option the refusal names)
    "gemma2": (
        _llama_like(
            "Gemma2Config",
            "Gemma2ForCausalLM",
            num_key_value_heads=2,
            head_dim=8,
            sliding_window=3,
            tie_word_embeddings=True,
        ),
        "use_normalization_before_and_after",
    ),
    "gemma3": (
        _llama_like(
            "Gemma3TextConfig", "Gemma3ForCausalLM", num_key_value_heads=2, head_dim=8, sliding_window=3
        ),
        "use_normalization_before_and_after",
    ),
    "olmo2": (_llama_like("Olmo2Config", "Olmo2ForCausalLM"), "use_normalization_before_and_after"),
    "olmo_clip": (_llama_like("OlmoConfig", "OlmoForCausalLM", clip_qkv=0.5), "clip_qkv"),
    "granite": (
        _llama_like(
            "GraniteConfig",
            "GraniteForCausalLM",
            num_key_value_heads=2,
            residual_multiplier=0.5,
            embedding_multiplier=2.0,
            attention_multiplier=0.3,
            logits_scaling=2.0,
        ),
        "residual_multiplier",
    ),
}


def _hf(family: str, dtype=torch.float64):
    """The tiny Hugging Face model (nothing downloaded) with non-trivial norm weights and biases."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        builder = FAMILIES[family] if family in FAMILIES else REFUSED[family][0]
        hf = builder().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return hf.to(dtype)


def _float64_inside(model: Transformer) -> Transformer:
    """``model`` with its float32 internals (norms, scores, softmax, rotary, routing weights) in float64."""
    cfg = dataclasses.replace(
        model.cfg,
        norm_dtype=None,
        attn_softmax_dtype=None,
        attn_scores_dtype=None,
        rotary_dtype=None,
        rotary_freq_dtype=None,
        rotary_input_dtype=None,
        moe_float32_weights=False,
    )
    out = Transformer(cfg)
    out.load_state_dict(model.state_dict())
    return out.eval()


# ----------------------------------------------------------------------------------------------- reference


class _Naive:
    """Edges rewired by hooks on the plain converted model (see the module docstring)."""

    def __init__(self, model: Transformer):
        self.m = model
        self.H = model.cfg.n_heads
        self.Hk = model.cfg.n_key_value_heads or self.H

    def _input_name(self, layer: int, h: int, which: str) -> str:
        if which == "q" or self.Hk == self.H:
            return f"L{layer}H{h}.{which}"
        return f"L{layer}KV{h}.{which}"

    def run(self, tokens, read):
        """Logits where each destination input ``v`` reads ``read(v, x, cur)`` instead of its residual ``x``."""
        m = self.m
        cur, pre, fwd, handles = {}, {}, [], []

        def resid_pre(x, hook, layer):
            if layer == 0:
                cur["embed"] = x
            pre[layer] = x
            return x

        def proj(x, hook, layer, which):
            blk = m.blocks[layer]
            compute = getattr(blk.attn, f"compute_{which}")
            cols = []
            for h in range(x.shape[2]):
                xin = read(self._input_name(layer, h, which), pre[layer], cur)
                cols.append(x[:, :, h] if xin is pre[layer] else compute(blk.ln1(xin))[:, :, h])
            return torch.stack(cols, 2)

        def z_hook(z, hook, layer):
            for h in range(self.H):
                cur[f"L{layer}H{h}"] = z[:, :, h] @ m.blocks[layer].attn.W_O[h]
            return z

        def mlp_out(x, hook, layer):
            cur[f"MLP{layer}"] = x
            return x

        for layer, blk in enumerate(m.blocks):
            fwd.append((f"blocks.{layer}.hook_resid_pre", lambda x, hook, i=layer: resid_pre(x, hook, i)))
            for w in "qkv":
                fwd.append(
                    (f"blocks.{layer}.attn.hook_{w}", lambda x, hook, i=layer, w=w: proj(x, hook, i, w))
                )
            fwd.append((f"blocks.{layer}.attn.hook_z", lambda x, hook, i=layer: z_hook(x, hook, i)))
            fwd.append((f"blocks.{layer}.hook_mlp_out", lambda x, hook, i=layer: mlp_out(x, hook, i)))
            if m.cfg.parallel_shared_norm:  # one norm read by both: the MLP's own input normalised again
                handles.append(
                    blk.mlp.register_forward_pre_hook(
                        lambda mod, args, i=layer, b=blk: (b.ln1(read(f"MLP{i}", pre[i], cur)),)
                    )
                )
            else:
                handles.append(
                    blk.ln2.register_forward_pre_hook(
                        lambda mod, args, i=layer: (read(f"MLP{i}", args[0], cur),)
                    )
                )
        handles.append(
            m.ln_final.register_forward_pre_hook(lambda mod, args: (read("logits", args[0], cur),))
        )
        try:
            return m.run_with_hooks(tokens, fwd_hooks=fwd), cur
        finally:
            for h in handles:
                h.remove()

    def outputs(self, tokens) -> dict:
        with torch.no_grad():
            return {k: v.detach() for k, v in self.run(tokens, lambda d, x, cur: x)[1].items()}

    def setting(self, clean, corr, mode, ablation):
        """The base prompts and the values ``A_u`` a patched edge carries."""
        base = clean if mode == "noise" else corr
        A = self.outputs(corr if mode == "noise" else clean)
        if ablation == "mean":
            A = {k: v.mean(0, keepdim=True).expand_as(v) for k, v in A.items()}
        elif ablation == "zero":
            A = {k: torch.zeros_like(v) for k, v in A.items()}
        return base, A

    def patched(self, patched_edges, base, A, metric_fn) -> torch.Tensor:
        """The metric with ``patched_edges`` (Edge) reading ``A_src``: one hooked forward."""
        return self.patched_sets([patched_edges], base, A, metric_fn)[0]

    def patched_sets(self, edge_sets, base, A, metric_fn) -> torch.Tensor:
        """:meth:`patched` of each edge set, ``(len(edge_sets), batch)``, in one hooked forward of the base prompts
        repeated once per set: the rows of set ``j`` (``j * batch`` onwards) are patched by that set's edges only,
        and every row of the model's forward is computed on its own."""
        B = base.shape[0]
        by: dict = {}
        for j, patched_edges in enumerate(edge_sets):
            for e in patched_edges:
                by.setdefault(e.dst_input, []).append((slice(j * B, (j + 1) * B), e))
        A = {k: v.repeat(len(edge_sets), *[1] * (v.dim() - 1)) for k, v in A.items()}

        def read(dst, x, cur):
            if dst not in by:
                return x
            x = x.clone()
            for rows, e in by[dst]:
                at = slice(None) if e.pos is None else slice(e.pos, e.pos + 1)
                x[rows, at] = x[rows, at] - (cur[e.src] - A[e.src])[rows, at]
            return x

        with torch.no_grad():
            logits = self.run(base.repeat(len(edge_sets), 1), read)[0]
        return torch.stack([metric_fn(part) for part in logits.split(B)])

    def first_order(self, graph, base, A, metric_fn) -> torch.Tensor:
        """``d metric / d c_e`` at ``c = 0`` for every edge, ``(batch, E)``."""
        out = self.outputs(base)
        coef = torch.zeros(base.shape[0], len(graph), dtype=out["embed"].dtype, requires_grad=True)
        by: dict = {}
        for i, e in enumerate(graph):
            by.setdefault(e.dst_input, []).append((i, e))

        def read(dst, x, cur):
            if dst not in by:
                return x
            x = x.clone()
            for i, e in by[dst]:
                delta = coef[:, i].view(-1, 1, 1) * (out[e.src] - A[e.src])
                if e.pos is None:
                    x = x - delta
                else:
                    x[:, e.pos] = x[:, e.pos] - delta[:, e.pos]
            return x

        (grad,) = torch.autograd.grad(metric_fn(self.run(base, read)[0]).sum(), coef)
        return grad


def _prompts(B, T, seed):
    """Prompts and a logit difference read at a position per example."""
    g = torch.Generator().manual_seed(seed)
    clean, corr = torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)
    ans = torch.randint(0, V, (B,), generator=g)
    wrong = (ans + 1 + torch.randint(0, V - 1, (B,), generator=g)) % V
    pos = torch.randint(0, T, (B,), generator=g)
    pos[0] = T - 1
    rows = torch.arange(B)

    def metric_fn(logits):
        at = logits[rows, pos]
        return at[rows, ans] - at[rows, wrong]

    return clean, corr, LogitDiff(ans, wrong, position=pos), metric_fn


def _rel(a, b) -> float:
    return float((a - b).abs().max()) / max(1.0, float(b.abs().max()))


def _check(model, ref_model, tol, seed, n_exact=None):
    """Every check of the circuits functions against the naive reference; returns the largest error of each."""
    ref = _Naive(ref_model)
    g = edges(model)
    E = len(g)
    gen = torch.Generator().manual_seed(seed)
    clean, corr, metric, fn = _prompts(3, 8, seed)
    err = {}
    masks = torch.rand(3, E, generator=gen) < 0.35
    for mode in ("noise", "denoise"):
        for ablation in ("resample", "mean", "zero"):
            base, A = ref.setting(clean, corr, mode, ablation)
            other = (
                None if (mode, ablation) == ("noise", "zero") else corr
            )  # zeros: no corrupted prompts read
            ours = patch_edges(model, masks, clean, other, metric=metric, mode=mode, ablation=ablation)
            naive = ref.patched_sets([[g[i] for i in m.nonzero().flatten()] for m in masks], base, A, fn)
            assert float((naive - naive[0]).abs().max()) > 1e-3  # the sets move the metric differently
            err[f"patch_edges {mode} {ablation}"] = _rel(ours, naive)
    for mode, ablation in (("noise", "resample"), ("denoise", "mean")):
        base, A = ref.setting(clean, corr, mode, ablation)
        m0 = ref.patched([], base, A, fn)
        sc = edge_attribution(
            model, clean, corr, metric=metric, method="exact", mode=mode, ablation=ablation, quiet=True
        )
        idx = list(range(E)) if n_exact is None else torch.randperm(E, generator=gen)[:n_exact].tolist()
        naive = (ref.patched_sets([[g[i]] for i in idx], base, A, fn) - m0).T
        err[f"exact {mode} {ablation}"] = _rel(sc.values[:, idx], naive)
        sc = edge_attribution(model, clean, corr, metric=metric, method="eap", mode=mode, ablation=ablation)
        err[f"eap {mode} {ablation}"] = _rel(sc.values, ref.first_order(g, base, A, fn))
    # faithfulness and one pruning-curve point: the top third of the EAP scores kept
    sc = edge_attribution(model, clean, corr, metric=metric, method="eap")
    order = torch.argsort(-sc.scores.abs(), stable=True).tolist()
    k = E // 3
    for mode in ("noise", "denoise"):
        base, A = ref.setting(clean, corr, mode, "resample")

        def m_kept(n, base=base, A=A, mode=mode):  # noising patches the complement, denoising the circuit
            patched = order[n:] if mode == "noise" else order[:n]
            return ref.patched([g[i] for i in patched], base, A, fn).mean()

        full, empty = m_kept(E), m_kept(0)
        want = float((m_kept(k) - empty) / (full - empty))
        got = faithfulness(model, [g[i] for i in order[:k]], clean, corr, metric=metric, mode=mode)
        err[f"faithfulness {mode}"] = abs(got - want) / max(1.0, abs(want))
        if mode == "noise":
            curve = pruning_curve(model, sc, clean, corr, metric=metric, counts=[k], quiet=True)
            err["pruning_curve"] = abs(float(curve.faithfulness["eap"][0]) - want) / max(1.0, abs(want))
            assert curve.m_full == pytest.approx(float(full), rel=tol, abs=tol)
            assert curve.m_empty == pytest.approx(float(empty), rel=tol, abs=tol)
    # per-position edges on a short prompt
    c2, r2, met2, fn2 = _prompts(2, 3, seed + 1)
    gp = edges(model, per_position=True, seq_len=3)
    assert len(gp) == 3 * E
    base, A = ref.setting(c2, r2, "noise", "resample")
    sc = edge_attribution(model, c2, r2, metric=met2, method="eap", per_position=True)
    err["eap per position"] = _rel(sc.values, ref.first_order(gp, base, A, fn2))
    masks = torch.rand(3, len(gp), generator=gen) < 0.3
    ours = patch_edges(model, masks, c2, r2, metric=met2, graph=gp)
    naive = ref.patched_sets([[gp[i] for i in m.nonzero().flatten()] for m in masks], base, A, fn2)
    err["patch_edges per position"] = _rel(ours, naive)
    sc = edge_attribution(model, c2, r2, metric=met2, method="exact", per_position=True, quiet=True)
    idx = torch.randperm(len(gp), generator=gen)[:20].tolist()
    m0 = ref.patched([], base, A, fn2)
    naive = (ref.patched_sets([[gp[i]] for i in idx], base, A, fn2) - m0).T
    err["exact per position"] = _rel(sc.values[:, idx], naive)
    return err


# ----------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("family", list(FAMILIES))
def test_float64_family_matches_naive_edge_hooks(family):
    model = _float64_inside(from_hf(_hf(family)))
    err = _check(model, model, 1e-9, seed=0)
    assert max(err.values()) <= 1e-9, {k: v for k, v in err.items() if v > 1e-9}


@pytest.mark.parametrize("family", ["llama", "gpt_neo", "mixtral", "bloom", "gptj"])
def test_hugging_face_model_given_as_it_is(family):
    """The Hugging Face model itself given to the circuits functions (converted inside, float32 internals and all)
    against the reference on its conversion: float32 rounding inside the norms, scores or softmax."""
    hf = _hf(family)
    err = _check(hf, from_hf(hf), 1e-5, seed=1, n_exact=15)
    assert max(err.values()) <= 1e-5, {k: v for k, v in err.items() if v > 1e-5}


@pytest.mark.parametrize("family", ["falcon_new", "phi", "opt", "qwen2", "stablelm"])
def test_float32_family_matches_naive_edge_hooks(family):
    hf = _hf(family, torch.float32)
    err = _check(hf, from_hf(hf), 1e-4, seed=2, n_exact=15)
    assert max(err.values()) <= 1e-4, {k: v for k, v in err.items() if v > 1e-4}


@pytest.mark.parametrize("family", list(REFUSED))
def test_families_without_separable_edges_are_refused_by_name(family):
    hf = _hf(family)
    option = REFUSED[family][1]
    clean, corr, metric, _ = _prompts(2, 5, seed=3)
    calls = {
        "patch_edges": lambda: patch_edges(hf, ["embed->logits"], clean, corr, metric=metric),
        "edge_attribution eap": lambda: edge_attribution(hf, clean, corr, metric=metric),
        "edge_attribution exact": lambda: edge_attribution(hf, clean, corr, metric=metric, method="exact"),
        "faithfulness": lambda: faithfulness(hf, ["embed->logits"], clean, corr, metric=metric),
        "acdc": lambda: acdc(hf, clean, corr, metric=metric, threshold=0.1, quiet=True),
    }
    for call in calls.values():
        with pytest.raises(NotImplementedError, match=option):
            call()


def test_unconvertible_options_are_refused_by_name():
    clean, corr, metric, _ = _prompts(2, 5, seed=4)
    torch.manual_seed(0)
    stablelm = tf.StableLmForCausalLM(
        tf.StableLmConfig(
            vocab_size=V,
            hidden_size=D,
            num_hidden_layers=L,
            intermediate_size=INNER,
            num_attention_heads=4,
            qk_layernorm=True,
        )
    )
    with pytest.raises(UnsupportedModelError, match="qk_layernorm"):
        patch_edges(stablelm, ["embed->logits"], clean, corr, metric=metric)
    falcon = tf.FalconForCausalLM(
        tf.FalconConfig(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=4, alibi=True)
    )
    with pytest.raises(UnsupportedModelError, match="alibi"):
        edge_attribution(falcon, clean, corr, metric=metric)
