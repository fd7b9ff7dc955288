"""Independent reference for the circuits tests: tiny float64 models and edge patching written with per-edge forward
hooks on the plain model (TransformerLens-style split query/key/value inputs rebuilt inside the hooks)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pypattern.models import Transformer, TransformerConfig


def tiny(attn_only=False, layers=2, heads=4, seed=0, norm="LN", d_vocab=12, n_ctx=6, act="gelu"):
    cfg = TransformerConfig(
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
    model = Transformer(cfg)
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


def _ln(x, mod, eps):
    if not hasattr(mod, "w"):
        return x
    return F.layer_norm(x, x.shape[-1:], mod.w, mod.b, eps)


def _node_outputs(model, tokens):
    """Every node's output in a plain run, read off the model's own hook points: ``{name: (B, T, d)}``."""
    _, cache = model.run_with_cache(tokens)
    out = {"embed": cache["hook_embed"] + cache["hook_pos_embed"]}
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
    ``fixed_delta[src]`` instead of ``cur_src - src_value``. Query/key/value inputs of each head are rebuilt from
    their own inputs and replace ``hook_q``/``hook_k``/``hook_v``; MLP inputs replace ``ln2.hook_normalized``; the
    logits' input replaces the last ``hook_resid_post``.
    """
    cfg = model.cfg
    eps = cfg.ln_eps
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

    def embed_hook(x, hook):
        if embed_override is not None:
            return embed_override - model.pos_embed(base_tokens)
        return x

    def pos_hook(x, hook):
        cur["embed"] = cur["tok"] + x
        return x

    def tok_hook(x, hook):
        cur["tok"] = x
        return x

    hooks += [("hook_embed", embed_hook), ("hook_embed", tok_hook), ("hook_pos_embed", pos_hook)]
    for layer, blk in enumerate(model.blocks):
        a = blk.attn

        def resid_pre(x, hook, layer=layer):
            cur[f"pre{layer}"] = x
            return x

        def qkv_hook(x, hook, layer=layer, which=None, a=a, blk=blk):
            W, b = {"q": (a.W_Q, a.b_Q), "k": (a.W_K, a.b_K), "v": (a.W_V, a.b_V)}[which]
            out = []
            for h in range(cfg.n_heads):
                inp = corrected(cur[f"pre{layer}"], f"L{layer}H{h}.{which}")
                out.append(_ln(inp, blk.ln1, eps) @ W[h] + b[h])
            return torch.stack(out, 2)

        def z_hook(z, hook, layer=layer, a=a):
            for h in range(cfg.n_heads):
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

            def ln2(x, hook, layer=layer, blk=blk):
                return _ln(corrected(cur[f"mid{layer}"], f"MLP{layer}"), blk.ln2, eps)

            def mlp_out(x, hook, layer=layer):
                cur[f"MLP{layer}"] = x
                return x

            hooks += [
                (f"blocks.{layer}.hook_resid_mid", mid),
                (f"blocks.{layer}.hook_mlp_out", mlp_out),
            ]
            if hasattr(blk.ln2, "hook_normalized"):
                hooks.append((f"blocks.{layer}.ln2.hook_normalized", ln2))
            else:  # no norm: rebuild the MLP's pre-activation from its own input
                hooks.append(
                    (
                        f"blocks.{layer}.mlp.hook_pre",
                        lambda x, hook, layer=layer, blk=blk: (
                            corrected(cur[f"mid{layer}"], f"MLP{layer}") @ blk.mlp.W_in + blk.mlp.b_in
                        ),
                    )
                )

        if (
            layer == cfg.n_layers - 1
        ):  # only the unembedding reads the last residual: rebuild the logits' input
            hooks.append((f"blocks.{layer}.hook_resid_post", lambda x, hook: corrected(x, "logits")))
    return model.run_with_hooks(base_tokens, fwd_hooks=hooks)


def at_pos(logits, pos):
    if isinstance(pos, int):
        return logits[:, pos]
    return logits[torch.arange(logits.shape[0]), pos]


def naive_patch(model, patched, clean, corrupted, metric, mode, ablation):
    base_tokens, src = _sources(model, clean, corrupted, mode, ablation)
    with torch.no_grad():
        logits = naive_run(model, patched, base_tokens, src)
    return metric(at_pos(logits, metric.position))
