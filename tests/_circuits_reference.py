"""Independent reference for the circuits tests: tiny float64 models and edge patching written with per-edge forward
hooks on the plain model (TransformerLens-style split query/key/value inputs rebuilt inside the hooks).

The reference never goes through :class:`pypattern.circuits.ModelView`: it runs the model's own forward and only
replaces, at hook points, the inputs an edge changes. Each head's query (``attn.hook_q``, before rotation) is rebuilt
from that head's own corrected residual through the model's ``ln1`` and ``compute_q``; each key/value head's keys and
values (``hook_k``/``hook_v``, one slot per key/value head under grouped-query attention) from that key/value head's
own corrected residual; the model then rotates, masks and mixes as usual. The MLP's input is replaced by a forward
pre-hook on ``ln2`` (the block's ``resid_mid``, or ``resid_pre`` in a parallel block, corrected), the logits' input
at the last ``hook_resid_post``.
"""

from __future__ import annotations

import torch

from pypattern.models import Transformer, TransformerConfig

# option sets of the architectures the circuits module must cover (tiny sizes come from `tiny`)
ARCHS = {
    "gpt2": {},
    "neox": dict(  # parallel attention + MLP, partial rotary (GPT-NeoX pairing)
        parallel_attn_mlp=True, positional_embedding_type="rotary", rotary_dim=2, act_fn="gelu_new"
    ),
    "llama": dict(  # RMSNorm, rotary, gated MLP, grouped-query attention, no biases
        normalization_type="RMS",
        positional_embedding_type="rotary",
        gated_mlp=True,
        n_key_value_heads=2,
        attn_bias=False,
        attn_out_bias=False,
        mlp_bias=False,
        unembed_bias=False,
        act_fn="silu",
    ),
    "rmspre": dict(  # a TransformerLens Llama after fold_ln: RMSNorms without weights
        normalization_type="RMSPre", positional_embedding_type="rotary", gated_mlp=True, act_fn="silu"
    ),
    "qwen2": dict(  # as Llama, with q/k/v biases only
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_base=1000.0,
        gated_mlp=True,
        n_key_value_heads=2,
        attn_bias=True,
        attn_out_bias=False,
        mlp_bias=False,
        unembed_bias=False,
        act_fn="silu",
    ),
    "qwen3": dict(  # as Llama, with an RMSNorm over each head's query and key before rotation
        normalization_type="RMS",
        positional_embedding_type="rotary",
        gated_mlp=True,
        n_key_value_heads=2,
        qk_norm=True,
        attn_bias=False,
        attn_out_bias=False,
        mlp_bias=False,
        unembed_bias=False,
        act_fn="silu",
    ),
    "qk_norm_ln": dict(qk_norm=True),  # per-head query/key norms behind LayerNorm, learned positions, biases
    # GPT-Neo: a global and a local layer (per-layer windows), unscaled scores, no query/key/value biases
    "neo": dict(sliding_window=(None, 3), attn_scale=1.0, attn_bias=False, act_fn="gelu_new"),
    "mqa": dict(  # one key/value head, sliding window, a custom attention scale
        normalization_type="RMS",
        positional_embedding_type="rotary",
        n_key_value_heads=1,
        sliding_window=3,
        attn_scale=1.5,
        gated_mlp=True,
        act_fn="silu",
    ),
    "gemma": dict(  # Gemma: scaled embeddings, 1 + w norms, tanh-GELU gate, MQA; soft caps as Gemma 2's
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_base=(50.0, 1e4),
        gated_mlp=True,
        act_fn="gelu_pytorch_tanh",
        n_key_value_heads=1,
        embed_scale=4.0,
        norm_weight_offset=1.0,
        attn_scores_soft_cap=1.5,
        output_logits_soft_cap=3.0,
        tie_word_embeddings=True,
        attn_bias=False,
        attn_out_bias=False,
        mlp_bias=False,
        unembed_bias=False,
    ),
    "phi": dict(  # parallel attention + MLP reading one LayerNorm (Phi-2), partial rotary
        parallel_attn_mlp=True,
        parallel_shared_norm=True,
        positional_embedding_type="rotary",
        rotary_dim=2,
        act_fn="gelu_new",
    ),
    "gptj": dict(  # GPT-J: one LayerNorm for attention and MLP, float32 scores multiplied by the scale
        parallel_attn_mlp=True,
        parallel_shared_norm=True,
        positional_embedding_type="rotary",
        rotary_dim=2,
        rotary_adjacent_pairs=True,
        attn_bias=False,
        attn_out_bias=False,
        attn_scores_dtype=torch.float32,
        attn_scores_multiplier=0.3,
        attn_softmax_dtype=torch.float64,
    ),
    "nope": dict(  # SmolLM3: a layer without rotary positions (NoPE), then a rotating one
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_layers=(False, True),
        gated_mlp=True,
        act_fn="silu",
    ),
    "moe": dict(  # a mixture of experts (OLMoE / Qwen3-MoE routing): 3 gated experts, 2 per token
        normalization_type="RMS",
        positional_embedding_type="rotary",
        gated_mlp=True,
        act_fn="silu",
        mlp_bias=False,
        n_experts=3,
        experts_per_token=2,
    ),
    # GPT-2 with scale_attn_by_inverse_layer_idx (a score multiplier per layer) and YaRN rotary embeddings
    "inverse_layer_yarn": dict(
        attn_scores_multiplier=(0.6, 0.3),
        positional_embedding_type="rotary",
        rotary_base=100.0,
        rotary_scaling={
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 64,
            "beta_fast": 8.0,
            "beta_slow": 1.0,
            "attention_factor": 1.2,
        },
    ),
    # BLOOM: ALiBi score biases, a LayerNorm on the embedding, BLOOM's GELU, float32 softmax
    "bloom": dict(
        positional_embedding_type="alibi",
        post_embedding_ln=True,
        act_fn="bloom_gelu",
        attn_softmax_dtype=torch.float32,
    ),
    # ALiBi with grouped-query attention and RMSNorm (no such family, every grouped ALiBi path)
    "alibi_gqa": dict(
        normalization_type="RMS",
        positional_embedding_type="alibi",
        n_key_value_heads=2,
        gated_mlp=True,
        act_fn="silu",
    ),
    "tied": dict(  # tied embeddings, GPT-J rotary pairing (partial), parallel block, no positions learned
        tie_word_embeddings=True,
        positional_embedding_type="rotary",
        rotary_dim=2,
        rotary_adjacent_pairs=True,
        parallel_attn_mlp=True,
        unembed_bias=False,
    ),
}


def tiny(attn_only=False, layers=2, heads=4, seed=0, norm="LN", d_vocab=12, n_ctx=6, act="gelu", **opts):
    kw = dict(
        n_layers=layers,
        d_model=16,
        n_heads=heads,
        d_mlp=None if attn_only else 32,
        d_vocab=d_vocab,
        n_ctx=n_ctx,
        dtype=torch.float64,
        seed=seed,
        init_range=0.4,
        normalization_type=norm,
        act_fn=act,
    )
    kw.update(opts)
    model = Transformer(TransformerConfig(**kw))
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # non-zero biases and norm weights, so that every term of the arithmetic matters
        for name, p in model.named_parameters():
            if not name.rsplit(".", 1)[-1].startswith("W_"):
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def prompts(model, B=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    V, T = model.cfg.d_vocab, model.cfg.n_ctx
    clean = torch.randint(0, V, (B, T), generator=g)
    corr = clean.clone()
    corr[:, 1] = torch.randint(0, V, (B,), generator=g)
    corr[:, 3] = torch.randint(0, V, (B,), generator=g)
    ans = torch.randint(0, V, (B,), generator=g)
    wrong = (ans + 1 + torch.randint(0, V - 1, (B,), generator=g)) % V
    return clean, corr, ans, wrong


def _node_outputs(model, tokens):
    """Every node's output in a plain run, read off the model's own hook points: ``{name: (B, T, d)}``."""
    _, cache = model.run_with_cache(tokens)
    out = {"embed": cache["blocks.0.hook_resid_pre"]}
    for layer, blk in enumerate(model.blocks):
        z = cache[f"blocks.{layer}.attn.hook_z"]
        for h in range(model.cfg.n_heads):
            out[f"L{layer}H{h}"] = z[:, :, h] @ blk.attn.W_O[h]
        if not model.cfg.attn_only:
            out[f"MLP{layer}"] = cache[f"blocks.{layer}.hook_mlp_out"]
    return out


def _sources(model, clean, corrupted, mode, ablation):
    base_tokens = clean if mode == "noise" else corrupted
    src_tokens = (corrupted if corrupted is not None else clean) if mode == "noise" else clean
    src = _node_outputs(model, src_tokens)
    if ablation == "mean":
        src = {k: v.mean(0, keepdim=True).expand_as(v) for k, v in src.items()}
    elif ablation == "zero":
        src = {k: torch.zeros_like(v) for k, v in src.items()}
    return base_tokens, src


def naive_run(model, patched, base_tokens, src, coef=None, fixed_delta=None, embed_override=None):
    """Logits of ``base_tokens`` with ``patched`` edges (list of Edge) rewired by forward hooks on the plain model.

    A destination input is ``resid - sum_e coef_e (cur_src - src_value)`` over its patched edges (``coef`` 1 unless
    given: a tensor ``(batch, len(patched))`` for gradients); with ``fixed_delta`` the subtracted vectors are
    ``fixed_delta[src]`` instead of ``cur_src - src_value``. ``embed_override`` replaces the embedding (the residual
    entering block 0).
    """
    cfg = model.cfg
    H = cfg.n_heads
    Hk = getattr(cfg, "n_key_value_heads", None) or H
    parallel = bool(getattr(cfg, "parallel_attn_mlp", False))
    kv_name = (lambda lay, g: f"L{lay}H{g}") if Hk == H else (lambda lay, g: f"L{lay}KV{g}")
    cur: dict = {}
    by_dst: dict = {}
    for i, e in enumerate(patched):
        by_dst.setdefault(e.dst_input, []).append((i, e))

    def corrected(x, dst):
        x = x.clone()
        for i, e in by_dst.get(dst, []):
            delta = fixed_delta[e.src] if fixed_delta is not None else cur[e.src] - src[e.src]
            c = 1.0 if coef is None else coef[:, i].view(-1, 1, 1)
            if e.pos is None:
                x = x - c * delta
            else:
                x[:, e.pos] = x[:, e.pos] - (c * delta)[:, e.pos]
        return x

    hooks = []
    for layer, blk in enumerate(model.blocks):
        a = blk.attn

        def resid_pre(x, hook, layer=layer):
            if layer == 0 and embed_override is not None:
                x = embed_override
            if layer == 0:
                cur["embed"] = x
            cur[f"pre{layer}"] = x
            return x

        def qkv_hook(x, hook, layer=layer, which=None, a=a, blk=blk):
            compute = {"q": a.compute_q, "k": a.compute_k, "v": a.compute_v}[which]
            n = H if which == "q" else Hk
            out = []
            for h in range(n):
                name = f"L{layer}H{h}" if which == "q" else kv_name(layer, h)
                inp = corrected(cur[f"pre{layer}"], f"{name}.{which}")
                out.append(compute(blk.ln1(inp))[:, :, h])
            return torch.stack(out, 2)

        def z_hook(z, hook, layer=layer, a=a):
            for h in range(H):
                cur[f"L{layer}H{h}"] = z[:, :, h] @ a.W_O[h]
            return z

        hooks += [(f"blocks.{layer}.hook_resid_pre", resid_pre)]
        for which in "qkv":
            hooks.append(
                (
                    f"blocks.{layer}.attn.hook_{which}",
                    lambda x, hook, f=qkv_hook, w=which: f(x, hook, which=w),
                )
            )
        hooks.append((f"blocks.{layer}.attn.hook_z", z_hook))
        if not cfg.attn_only:

            def mid(x, hook, layer=layer):
                cur[f"mid{layer}"] = x
                return x

            def mlp_out(x, hook, layer=layer):
                cur[f"MLP{layer}"] = x
                return x

            hooks.append((f"blocks.{layer}.hook_mlp_out", mlp_out))
            if not parallel:
                hooks.append((f"blocks.{layer}.hook_resid_mid", mid))

        # only the unembedding reads the last residual: rebuild the logits' input
        if layer == cfg.n_layers - 1:
            hooks.append((f"blocks.{layer}.hook_resid_post", lambda x, hook: corrected(x, "logits")))

    # the MLP's input: a pre-hook on ln2 replaces the residual it reads
    handles = []
    if not cfg.attn_only:
        for layer, blk in enumerate(model.blocks):

            def ln2_pre(mod, args, layer=layer):
                read = cur[f"pre{layer}"] if parallel else cur[f"mid{layer}"]
                return (corrected(read, f"MLP{layer}"),)

            if getattr(cfg, "parallel_shared_norm", False):
                # one norm read by attention and MLP: the MLP's own input, normalised without the norm's hooks
                def mlp_pre(mod, args, layer=layer, blk=blk):
                    return (blk.ln1.forward(corrected(cur[f"pre{layer}"], f"MLP{layer}")),)

                handles.append(blk.mlp.register_forward_pre_hook(mlp_pre))
            else:
                handles.append(blk.ln2.register_forward_pre_hook(ln2_pre))
    try:
        return model.run_with_hooks(base_tokens, fwd_hooks=hooks)
    finally:
        for h in handles:
            h.remove()


def at_pos(logits, pos):
    if isinstance(pos, int):
        return logits[:, pos]
    return logits[torch.arange(logits.shape[0]), pos]


def naive_patch(model, patched, clean, corrupted, metric, mode, ablation):
    base_tokens, src = _sources(model, clean, corrupted, mode, ablation)
    with torch.no_grad():
        logits = naive_run(model, patched, base_tokens, src)
    return metric(at_pos(logits, metric.position))


def naive_first_order(model, graph, clean, corr, metric, mode, ablation, alphas=(1.0,)):
    """Per-example ``d M / d coef_e`` at ``coef = 0`` where every edge ``e = u -> v`` is rewired by a hook to
    ``in_v - coef_e (out_u - A_u)`` with the base run's ``out_u``, averaged over runs whose input embedding is
    ``e_abl + alpha (e_base - e_abl)`` (``alpha = 1``: the base run, i.e. EAP)."""
    base_tokens, src = _sources(model, clean, corr, mode, ablation)
    base_out = _node_outputs(model, base_tokens)
    fixed = {k: (base_out[k] - src[k]).detach() for k in base_out}
    e_base, e_abl = base_out["embed"].detach(), src["embed"].detach()
    all_edges = list(graph)
    total = torch.zeros(clean.shape[0], len(all_edges), dtype=torch.float64)
    for a in alphas:
        coef = torch.zeros(clean.shape[0], len(all_edges), dtype=torch.float64, requires_grad=True)
        logits = naive_run(
            model,
            all_edges,
            base_tokens,
            src,
            coef=coef,
            fixed_delta=fixed,
            embed_override=e_abl + a * (e_base - e_abl),
        )
        m = metric(at_pos(logits, metric.position))
        (g,) = torch.autograd.grad(m.sum(), coef)
        total += g
    return total / len(alphas)
