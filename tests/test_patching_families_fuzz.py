"""Exact activation patching on Hugging Face models of every family converted with from_hf, in float64, against an
independent computation written here: for each cell, a forward of the converted model with a hook writing the
source run's activation into that cell (cells batched as copies of the prompts), and the logit difference read
from its logits.

Every site (resid_pre, resid_mid where it exists, resid_post, attn_out, mlp_out, z, q, k, v, pattern), per
position and over all positions, denoising and noising. The families cover the engine's attention paths:
prefix_attention's C++ kernel (plain attention, sliding windows through its mask, grouped and multi-query heads,
score multipliers) and the torch fallback (ALiBi, soft-capped scores, a float32 softmax in a float64 model,
float32 query-key products). The kernel's use is checked where the attention is plain."""

import pytest
import torch
from _hook_names import HEADS, HOOKS

transformers = pytest.importorskip("transformers")

import pypattern.patching.engine as engine  # noqa: E402
from pypattern import _backends, from_hf  # noqa: E402
from pypattern.patching import LogitDiff, activation_patching  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

V, CTX = 50, 16
COMMON = dict(vocab_size=V, bos_token_id=0, eos_token_id=1, pad_token_id=None)
LLAMA = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=40
)

# name -> (config prefix, model class, config, attention implementation (None: the default), kernel in float64)
FAMILIES = {
    "gpt2": ("GPT2", "GPT2LMHeadModel", dict(n_embd=32, n_layer=2, n_head=4, n_positions=CTX), None, True),
    "gpt2-inverse-layer-scale": (
        "GPT2",
        "GPT2LMHeadModel",
        dict(n_embd=30, n_layer=2, n_head=6, n_positions=CTX, scale_attn_by_inverse_layer_idx=True),
        None,
        True,
    ),
    "neox-parallel-rot0.5": (
        "GPTNeoX",
        "GPTNeoXForCausalLM",
        dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, rotary_pct=0.5
        ),
        None,
        True,
    ),
    # eager attention: the softmax in float32 in a float64 model (the torch fallback)
    "neox-eager-rot0.25": (
        "GPTNeoX",
        "GPTNeoXForCausalLM",
        dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, rotary_pct=0.25
        ),
        "eager",
        False,
    ),
    "llama-gqa2": ("Llama", "LlamaForCausalLM", LLAMA, None, True),
    "llama-gqa2-eager": ("Llama", "LlamaForCausalLM", LLAMA, "eager", False),
    "mistral-window3": ("Mistral", "MistralForCausalLM", dict(LLAMA, sliding_window=3), None, True),
    "qwen2-qkv-bias-layer-windows": (
        "Qwen2",
        "Qwen2ForCausalLM",
        dict(LLAMA, num_key_value_heads=1, use_sliding_window=True, sliding_window=3, max_window_layers=1),
        None,
        True,
    ),
    "qwen3-qk-norm": ("Qwen3", "Qwen3ForCausalLM", LLAMA, None, True),
    "gemma-mqa": ("Gemma", "GemmaForCausalLM", dict(LLAMA, num_key_value_heads=1, head_dim=8), None, True),
    "gemma2-capped-window": (
        "Gemma2",
        "Gemma2ForCausalLM",
        dict(
            LLAMA,
            head_dim=8,
            sliding_window=4,
            query_pre_attn_scalar=20,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
        ),
        None,
        False,
    ),
    "gemma3-local-global": (
        "Gemma3Text",
        "Gemma3ForCausalLM",
        dict(
            LLAMA,
            num_key_value_heads=1,
            head_dim=8,
            sliding_window=3,
            sliding_window_pattern=2,
            query_pre_attn_scalar=24,
        ),
        None,
        True,
    ),
    "phi-parallel-rot0.5": (
        "Phi",
        "PhiForCausalLM",
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            partial_rotary_factor=0.5,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
        ),
        None,
        True,
    ),
    "phi3-mqa-window": (
        "Phi3",
        "Phi3ForCausalLM",
        dict(LLAMA, num_key_value_heads=1, sliding_window=4),
        None,
        True,
    ),
    "falcon-mqa-parallel": (
        "Falcon",
        "FalconForCausalLM",
        dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, multi_query=True, parallel_attn=True
        ),
        None,
        True,
    ),
    "falcon-new-architecture-gqa": (
        "Falcon",
        "FalconForCausalLM",
        dict(
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_kv_heads=2,
            new_decoder_architecture=True,
            bias=True,
            tie_word_embeddings=False,
        ),
        None,
        True,
    ),
    "bloom-alibi": ("Bloom", "BloomForCausalLM", dict(hidden_size=32, n_layer=2, n_head=4), None, False),
    "opt": (
        "OPT",
        "OPTForCausalLM",
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=48,
            word_embed_proj_dim=32,
            dropout=0.0,
            pad_token_id=1,
        ),
        None,
        True,
    ),
    "gptj-rot4": (
        "GPTJ",
        "GPTJForCausalLM",
        dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=CTX, resid_pdrop=0.0, embd_pdrop=0.0),
        None,
        True,
    ),
    "olmo-clip": ("Olmo", "OlmoForCausalLM", dict(LLAMA, clip_qkv=0.4), None, True),
    "olmo2-qk-norm": ("Olmo2", "Olmo2ForCausalLM", LLAMA, None, True),
    "mixtral-moe-window": (
        "Mixtral",
        "MixtralForCausalLM",
        dict(
            LLAMA,
            num_key_value_heads=1,
            intermediate_size=24,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=5,
            experts_implementation="eager",
        ),
        None,
        True,
    ),
    "starcoder2-window": ("Starcoder2", "Starcoder2ForCausalLM", dict(LLAMA, sliding_window=4), None, True),
    "granite-multipliers": (
        "Granite",
        "GraniteForCausalLM",
        dict(
            LLAMA,
            embedding_multiplier=3.0,
            attention_multiplier=0.3,
            residual_multiplier=0.5,
            logits_scaling=3.0,
        ),
        None,
        True,
    ),
    "stablelm-parallel": (
        "StableLm",
        "StableLmForCausalLM",
        dict(LLAMA, use_parallel_residual=True, use_qkv_bias=True, partial_rotary_factor=0.5),
        None,
        True,
    ),
    "arcee-relu2-biases": (
        "Arcee",
        "ArceeForCausalLM",
        dict(LLAMA, attention_bias=True, mlp_bias=True),
        None,
        True,
    ),
    "glm4-sandwich-adjacent-rot0.5": (
        "Glm4",
        "Glm4ForCausalLM",
        dict(LLAMA, head_dim=8),
        None,
        True,
    ),
    "exaone4-post-norms-nope": (
        "Exaone4",
        "Exaone4ForCausalLM",
        dict(LLAMA, head_dim=8, sliding_window=3, layer_types=["sliding_attention", "full_attention"]),
        None,
        True,
    ),
    "nemotron-layernorm1p-rot0.5": (
        "Nemotron",
        "NemotronForCausalLM",
        dict(LLAMA, attention_bias=True, mlp_bias=True),
        None,
        True,
    ),
    "ministral-layer-windows": (
        "Ministral",
        "MinistralForCausalLM",
        dict(LLAMA, head_dim=8, sliding_window=3, layer_types=["sliding_attention", "full_attention"]),
        None,
        True,
    ),
    "bigcode-mqa": (
        "GPTBigCode",
        "GPTBigCodeForCausalLM",
        dict(n_embd=32, n_layer=2, n_head=4, n_positions=CTX),
        None,
        True,
    ),
    # float32 query-key products in a float64 model (the torch fallback)
    "gptneo-global-local": (
        "GPTNeo",
        "GPTNeoForCausalLM",
        dict(
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            intermediate_size=48,
            attention_types=[[["global", "local"], 1]],
            window_size=3,
        ),
        None,
        False,
    ),
}


def hf_model(name: str, dtype=torch.float64, n_layers: int | None = None):
    """A random Hugging Face model of family ``name`` (weights moved off their initialisation, so that biases and
    norm weights are not trivial and attention is not uniform)."""
    prefix, cls, kw, impl, _ = FAMILIES[name]
    kw = {**COMMON, **kw}
    if n_layers is not None:
        for key in ("n_layer", "num_hidden_layers", "num_layers"):
            if key in kw:
                kw[key] = n_layers
        if "attention_types" in kw:
            kw["attention_types"] = [[["global", "local", "global"][:n_layers], 1]]
    if prefix not in ("GPT2", "GPTJ", "GPTBigCode"):
        kw.setdefault("max_position_embeddings", CTX)
    torch.manual_seed(0)
    model = getattr(transformers, cls)(getattr(transformers, f"{prefix}Config")(**kw))
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    if impl is not None:
        model.set_attn_implementation(impl)
    return model.to(dtype).eval()


def converted(name: str, dtype=torch.float64, n_layers: int | None = None):
    return from_hf(hf_model(name, dtype, n_layers))


def prompts(B: int = 3, T: int = 9, seed: int = 1):
    """Clean prompts ``(B, T)``, corrupted ones differing at 3 positions per prompt (position 0 in the first),
    answer and wrong tokens."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(2, V, (B, T), generator=g)
    corr = clean.clone()
    for b in range(B):
        ps = torch.randperm(T, generator=g)[:3]
        if b == 0:
            ps[0] = 0
        corr[b, ps] = (clean[b, ps] + 1 + torch.randint(0, V - 3, (len(ps),), generator=g)) % (V - 2) + 2
    ans = torch.randint(2, V, (B,), generator=g)
    return clean, corr, ans, (ans + 7) % (V - 2) + 2


def sites_of(model) -> list[str]:
    out = list(HOOKS)
    if model.cfg.parallel_attn_mlp:
        out.remove("resid_mid")
    return out


def replace(x, src, site, head, pos):
    """Write the cell (``head``, ``pos``; None: every position) of ``src`` into ``x`` (one run's activation)."""
    p = slice(None) if pos is None else pos
    if site == "pattern":
        x[:, head, p] = src[:, head, p]
    elif site in HEADS:
        x[:, p, head] = src[:, p, head]
    else:
        x[:, p] = src[:, p]


def logit_diff(logits, ans, wrong, pos):
    """``logits (B, T, V)`` -> ``(B,)``, read at the per-example positions ``pos (B,)``."""
    rows = logits[torch.arange(logits.shape[0]), pos]
    return rows.gather(-1, ans[:, None])[:, 0] - rows.gather(-1, wrong[:, None])[:, 0]


def cells_of(site: str, n_heads: int | None, T: int, per_position: bool):
    positions = list(range(T)) if per_position else [None]
    heads = list(range(n_heads)) if site in HEADS else [None]
    return [(h, p) for h in heads for p in positions], positions


def source_cells(model, site, clean, corr, per_position, direction):
    """``(target prompts, the site's hook name per layer, the source run's activations there, heads (None for a
    site without them), cells, positions)`` of a grid in ``direction``."""
    src_tok, tgt_tok = (clean, corr) if direction == "denoising" else (corr, clean)
    names = [HOOKS[site].format(layer) for layer in range(model.cfg.n_layers)]
    with torch.no_grad():
        _, cache = model.run_with_cache(src_tok, names_filter=names)
    n_heads = cache[names[0]].shape[1 if site == "pattern" else 2] if site in HEADS else None
    cells, positions = cells_of(site, n_heads, clean.shape[1], per_position)
    return tgt_tok, names, cache, n_heads, cells, positions


def reference_grid(
    model, site, clean, corr, ans, wrong, per_position, pos=None, direction="denoising", window=1
):
    """``(batch, layer[, head][, pos])``: for each cell, the target prompts' forward with the source run's
    activation written into the cell at layers ``layer .. layer + window - 1``, and the logit difference at
    ``pos (B,)`` (default: the last position). The cells of a layer run as copies of the prompts in one batch."""
    B, T = clean.shape
    pos = torch.full((B,), T - 1) if pos is None else pos
    L = model.cfg.n_layers
    tgt_tok, names, cache, n_heads, cells, positions = source_cells(
        model, site, clean, corr, per_position, direction
    )
    C = len(cells)
    out = torch.empty(B, L - window + 1, *([n_heads] if n_heads else []), len(positions), dtype=torch.float64)
    for layer in range(L - window + 1):

        def write(x, hook):
            x = x.clone().view(C, B, *x.shape[1:])
            for c, (h, p) in enumerate(cells):
                replace(x[c], cache[hook.name], site, h, p)
            return x.view(C * B, *x.shape[2:])

        hooks = [(names[j], write) for j in range(layer, layer + window)]
        with torch.no_grad():
            logits = model.run_with_hooks(tgt_tok.repeat(C, 1), fwd_hooks=hooks)
        ld = logit_diff(logits, ans.repeat(C), wrong.repeat(C), pos.repeat(C)).view(C, B)
        for c, (h, p) in enumerate(cells):
            out[(slice(None), layer) + ((h,) if h is not None else ()) + (positions.index(p),)] = ld[
                c
            ].double()
    return out if per_position else out[..., 0]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest difference relative to the largest value (or to 1 where the values are smaller)."""
    return (got.double() - want).abs().max().item() / max(1.0, want.abs().max().item())


def tolerance(model) -> float:
    """Float rounding of the model's function: 1e-9 in float64, 1e-4 in float32; 1e-5 where a float64 model takes
    its query-key products in float32 (GPT-Neo: its own forward then moves by ~1e-7 with the batch's shape)."""
    if next(model.parameters()).dtype == torch.float32:
        return 1e-4
    return 1e-5 if model.cfg.attn_scores_dtype == torch.float32 else 1e-9


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the engine's calls of prefix_attention; None where its C++ kernel is not the CPU's choice."""
    calls = [0]
    real = engine.prefix_attention

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "prefix_attention", counted)
    return calls if _backends.choose("prefix_attention", torch.device("cpu"), None) == "cpp" else None


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_site_equals_hooked_forwards(name, kernel_calls):
    model = converted(name)
    clean, corr, ans, wrong = prompts()
    tol = tolerance(model)
    for i, site in enumerate(sites_of(model)):
        for per_position in (True, False):
            # noising for every other site (and all positions), denoising for the rest
            direction = "noising" if (i + per_position) % 2 else "denoising"
            res = activation_patching(
                model,
                site,
                clean,
                corr,
                metric=LogitDiff(ans, wrong),
                per_position=per_position,
                direction=direction,
                method="exact",
                quiet=True,
            )
            ref = reference_grid(model, site, clean, corr, ans, wrong, per_position, direction=direction)
            assert res.values.shape == ref.shape, (site, res.values.shape, ref.shape)
            err = rel_err(res.values, ref)
            assert err <= tol, (
                f"{name} {site} per_position={per_position} {direction}: relative error {err:.3g}"
            )
            base = (res.corrupted if direction == "denoising" else res.clean).double()
            moved = (ref - base.view(-1, *[1] * (ref.dim() - 1))).abs().max().item()
            assert moved > 1e-3, f"{name} {site}: no cell moved the metric"
    if kernel_calls is not None:
        expected = FAMILIES[name][4]
        assert (kernel_calls[0] > 0) == expected, (
            f"{name}: prefix_attention called {kernel_calls[0]} times; expected {'some' if expected else 'none'}"
        )
