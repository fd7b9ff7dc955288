"""Hugging Face models used as they are, as users build them: every family the native per-head masks cover with odd
sizes (head widths that are not hidden_size / n_heads, 1, 2 or 3 query heads per key/value head, biases on and
off, tied and untied embeddings, float32 and float64), checked against computations written here with plain
forward hooks on the model's own modules:

* a head's mask moves that head only: with the head's slice of the output projection's input zeroed (a hook of
  our own), moving its masked entries leaves the logits unchanged, and without the hook they move; the heads, the
  key/value heads and what belongs to no head partition the attention's parameters;
* residual-site patching on the raw model equals a loop of one hooked forward per cell;
* LLC, susceptibilities and BIF on dict batches padded on the left, on the right or both give the unpadded values;
* batches the defaults cannot read, half-precision models, dropout in train() mode and gradient checkpointing.
"""

import warnings

import numpy as np
import pytest
import torch

import pypattern as pp
from pypattern.models.hf import HAS_TRANSFORMERS
from pypattern.models.hf_masks import hf_attention_shape, hf_component_masks, hf_components

pytestmark = [
    pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed"),
    pytest.mark.usefixtures("one_thread"),
]

V = 29
MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
# (n_heads, n_kv_heads, d_head, hidden_size, biases, tied embeddings, dtype): the families take turns
VARIANTS = [
    (6, 3, 4, 22, True, False, torch.float64),
    (5, 1, 6, 26, False, True, torch.float32),
    (3, 3, 2, 10, True, True, torch.float64),
    (6, 2, 4, 20, False, False, torch.float32),
]


def _config(arch, n_heads, n_kv, d_head, hidden, bias, tied):
    import transformers as tr

    full = n_heads * d_head
    common = dict(vocab_size=V, max_position_embeddings=24, tie_word_embeddings=tied)
    dense = dict(num_hidden_layers=2, num_attention_heads=n_heads, intermediate_size=22, **common)
    gqa = dict(dense, num_key_value_heads=n_kv)
    odd = dict(gqa, hidden_size=hidden, head_dim=d_head)  # q_proj wider or narrower than hidden_size
    wide = dict(gqa, hidden_size=full)
    gpt = dict(vocab_size=V, n_positions=24, n_embd=full, n_layer=2, n_head=n_heads, n_inner=22,
               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
               tie_word_embeddings=tied)  # fmt: skip
    none = dict(pad_token_id=None, bos_token_id=None, eos_token_id=None)
    moe = dict(num_experts=3, num_experts_per_tok=2)
    make = {
        "gpt2": lambda: tr.GPT2Config(**gpt),
        "bigcode": lambda: tr.GPTBigCodeConfig(**gpt, multi_query=True),
        "bigcode_mha": lambda: tr.GPTBigCodeConfig(**gpt, multi_query=False),
        "gptj": lambda: tr.GPTJConfig(**{k: v for k, v in gpt.items() if k != "n_inner"}, rotary_dim=2),
        "neox": lambda: tr.GPTNeoXConfig(**dense, hidden_size=full, rotary_pct=0.5, attention_bias=bias,
                                         use_parallel_residual=True, bos_token_id=0, eos_token_id=0),
        "neox_seq": lambda: tr.GPTNeoXConfig(**dense, hidden_size=full, rotary_pct=0.5, attention_bias=bias,
                                             use_parallel_residual=False, bos_token_id=0, eos_token_id=0),
        "gpt_neo": lambda: tr.GPTNeoConfig(
            vocab_size=V, hidden_size=full, num_layers=2, num_heads=n_heads, intermediate_size=22, window_size=3,
            attention_types=[[["local", "global"], 1]], max_position_embeddings=24, resid_dropout=0.0,
            embed_dropout=0.0, attention_dropout=0.0, bos_token_id=0, eos_token_id=0, tie_word_embeddings=tied,
        ),
        "phi": lambda: tr.PhiConfig(**wide, partial_rotary_factor=0.5 if d_head % 4 == 0 else 1.0,
                                    resid_pdrop=0.0, embd_pdrop=0.0, qk_layernorm=True),
        "phi3": lambda: tr.Phi3Config(**wide, partial_rotary_factor=0.5, pad_token_id=0, bos_token_id=0,
                                      eos_token_id=0),
        "llama": lambda: tr.LlamaConfig(**wide, attention_bias=bias, mlp_bias=bias),
        "mistral": lambda: tr.MistralConfig(**odd, sliding_window=5),
        "qwen2": lambda: tr.Qwen2Config(**wide),
        "qwen3": lambda: tr.Qwen3Config(**odd, attention_bias=bias),
        "seed_oss": lambda: tr.SeedOssConfig(**odd, attention_bias=bias, attention_out_bias=bias),
        "helium": lambda: tr.HeliumConfig(**wide, head_dim=d_head, attention_bias=bias, pad_token_id=None),
        "ernie4_5": lambda: tr.Ernie4_5Config(**odd, use_bias=bias),
        "smollm3": lambda: tr.SmolLM3Config(**wide, no_rope_layers=[1, 0], attention_bias=bias, **none),
        "olmo": lambda: tr.OlmoConfig(**wide, clip_qkv=0.7, attention_bias=bias, **none),
        "starcoder2": lambda: tr.Starcoder2Config(**wide, sliding_window=4, use_bias=bias, residual_dropout=0.0,
                                                  embedding_dropout=0.0, bos_token_id=0, eos_token_id=0),
        "gemma": lambda: tr.GemmaConfig(**odd, attention_bias=bias),
        "gemma2": lambda: tr.Gemma2Config(**wide, head_dim=d_head, sliding_window=3, query_pre_attn_scalar=10,
                                          attn_logit_softcapping=3.0, final_logit_softcapping=5.0,
                                          attention_bias=bias),
        "gemma3": lambda: tr.Gemma3TextConfig(**wide, head_dim=d_head, sliding_window=3, sliding_window_pattern=2,
                                              query_pre_attn_scalar=8, attention_bias=bias),
        "stablelm": lambda: tr.StableLmConfig(**wide, use_qkv_bias=bias),
        "stablelm_qkln": lambda: tr.StableLmConfig(**wide, use_qkv_bias=bias, qk_layernorm=True),
        "mixtral": lambda: tr.MixtralConfig(**odd, num_local_experts=3, num_experts_per_tok=2),
        "qwen2_moe": lambda: tr.Qwen2MoeConfig(**wide, **moe, moe_intermediate_size=10,
                                               shared_expert_intermediate_size=8, mlp_only_layers=[0]),
        "qwen3_moe": lambda: tr.Qwen3MoeConfig(**odd, **moe, moe_intermediate_size=10, norm_topk_prob=True,
                                               attention_bias=bias),
        "olmo2": lambda: tr.Olmo2Config(**wide, attention_bias=bias, **none),
        "olmoe": lambda: tr.OlmoeConfig(**{**wide, "num_key_value_heads": n_heads}, **moe, clip_qkv=2.0, **none),
        "nemotron": lambda: tr.NemotronConfig(**wide, partial_rotary_factor=0.5 if d_head % 4 == 0 else 1.0,
                                              attention_bias=bias, mlp_bias=bias, **none),
        "cohere": lambda: tr.CohereConfig(**wide, use_qk_norm=True, **none),
        "cohere2": lambda: tr.Cohere2Config(**wide, sliding_window=3, layer_types=["sliding_attention",
                                            "full_attention"], **none),
        "exaone4": lambda: tr.Exaone4Config(**odd, sliding_window=3,
                                            layer_types=["sliding_attention", "full_attention"], **none),
        "ministral": lambda: tr.MinistralConfig(**odd, sliding_window=3,
                                                layer_types=["sliding_attention", "full_attention"], **none),
        "arcee": lambda: tr.ArceeConfig(**wide, head_dim=d_head, attention_bias=bias, mlp_bias=bias, **none),
        "glm": lambda: tr.GlmConfig(**odd, partial_rotary_factor=0.5 if d_head % 4 == 0 else 1.0,
                                    attention_bias=bias, **none),
        "glm4": lambda: tr.Glm4Config(**odd, partial_rotary_factor=0.5 if d_head % 4 == 0 else 1.0,
                                      attention_bias=bias, **none),
    }  # fmt: skip
    return make[arch]()


ARCHS = [
    "gpt2", "bigcode", "bigcode_mha", "gptj", "neox", "neox_seq", "gpt_neo", "phi", "phi3", "llama", "mistral",
    "qwen2", "qwen3", "seed_oss", "helium", "ernie4_5", "smollm3", "olmo", "starcoder2", "gemma", "gemma2",
    "gemma3", "stablelm", "stablelm_qkln", "mixtral", "qwen2_moe", "qwen3_moe", "olmo2", "olmoe", "ministral",
    "arcee", "glm", "glm4", "exaone4", "cohere", "cohere2", "nemotron",
]  # fmt: skip
COUPLED = ("olmo2", "olmoe")  # one query/key norm across all heads: no per-head components


def _build(arch, variant=0, attn="eager", seed=0):
    import transformers as tr

    n_heads, n_kv, d_head, hidden, bias, tied, dtype = VARIANTS[variant]
    cfg = _config(arch, n_heads, n_kv, d_head, hidden, bias, tied)
    kw = dict(experts_implementation="eager") if arch in MOE else {}
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = tr.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, **kw).to(dtype).eval()
    with torch.no_grad():  # biases and norms start at zero / one: make every parameter matter
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


# the output projection of each family, written out here (its input is the heads' outputs, head after head)
_OUT_PROJ = {
    "gpt2": "transformer.h.{l}.attn.c_proj",
    "gpt_bigcode": "transformer.h.{l}.attn.c_proj",
    "gptj": "transformer.h.{l}.attn.out_proj",
    "gpt_neo": "transformer.h.{l}.attn.attention.out_proj",
    "gpt_neox": "gpt_neox.layers.{l}.attention.dense",
    "phi": "model.layers.{l}.self_attn.dense",
}


def _logits(m, x, layer=None, heads=(), d_head=0):
    """The model's logits; with ``heads``, those heads' slices of the output projection's input zeroed."""
    handle = None
    if heads:
        path = _OUT_PROJ.get(m.config.model_type, "model.layers.{l}.self_attn.o_proj").format(l=layer)

        def zero(mod, args):
            z = args[0].clone()
            for h in heads:
                z[..., h * d_head : (h + 1) * d_head] = 0
            return (z, *args[1:])

        handle = m.get_submodule(path).register_forward_pre_hook(zero)
    try:
        with torch.no_grad():
            return m(x).logits
    finally:
        if handle is not None:
            handle.remove()


def _moved(m, masks, seed=3):
    """Add noise to the masked entries; returns the saved parameters."""
    g = torch.Generator().manual_seed(seed)
    saved = {n: p.detach().clone() for n, p in m.named_parameters()}
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n in masks:
                p.add_(0.5 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * masks[n])
    return saved


def _restore(m, saved):
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.copy_(saved[n])


@pytest.mark.parametrize("arch", ARCHS)
def test_a_heads_mask_moves_that_heads_output_and_nothing_else(arch):
    variant = ARCHS.index(arch) % len(VARIANTS)
    m = _build(arch, variant)
    n_heads, n_kv, d_head, hidden, *_ = VARIANTS[variant]
    layer = 1
    attn = hf_component_masks(m, f"blocks.{layer}.attn")
    comps = [c for c in hf_components(m) if c.startswith(f"blocks.{layer}.attn.")]
    if arch in COUPLED:
        assert comps == []
        with pytest.raises(ValueError, match="across all heads"):
            hf_component_masks(m, f"blocks.{layer}.attn.head.0")
        return
    # head counts as the modules are built (MHA families ignore n_kv; GPT-BigCode multi-query has one kv head)
    got_heads, got_kv, got_dh = hf_attention_shape(m, layer)
    want_kv = {"bigcode": 1}.get(
        arch, n_heads if arch in ("gpt2", "bigcode_mha", "gptj", "gpt_neo") else n_kv
    )
    if arch in ("neox", "neox_seq"):
        want_kv = n_heads
    assert (got_heads, got_kv, got_dh) == (n_heads, want_kv, d_head)
    group = n_heads // want_kv
    x = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(1))
    tol = 1e-12 if VARIANTS[variant][-1] == torch.float64 else 1e-5
    cases = [(f"blocks.{layer}.attn.head.{h}", [h]) for h in (0, n_heads - 1)]
    if want_kv < n_heads:  # a shared key/value head feeds the query heads of its group
        cases += [
            (f"blocks.{layer}.attn.kv_head.{g}", list(range(g * group, (g + 1) * group)))
            for g in (0, want_kv - 1)
        ]
    for comp, heads in cases:
        masks = hf_component_masks(m, comp)
        base, base_zeroed = _logits(m, x), _logits(m, x, layer, heads, d_head)
        saved = _moved(m, masks)
        try:
            moved, moved_zeroed = _logits(m, x), _logits(m, x, layer, heads, d_head)
        finally:
            _restore(m, saved)
        assert (moved - base).abs().max() > 1e-3, comp
        assert (moved_zeroed - base_zeroed).abs().max() <= tol, comp
    if want_kv < n_heads:  # with its shared key/value head: the head's mask and that of its group's kv head
        for h in range(n_heads):
            whole = hf_component_masks(m, f"blocks.{layer}.attn.head.{h}", include_shared_kv=True)
            own = hf_component_masks(m, f"blocks.{layer}.attn.head.{h}")
            kv = hf_component_masks(m, f"blocks.{layer}.attn.kv_head.{h // group}")
            assert set(whole) == set(own) | set(kv)
            for n, t in whole.items():
                assert torch.equal(t, own.get(n, torch.zeros_like(t)) | kv.get(n, torch.zeros_like(t))), (
                    h,
                    n,
                )
    # the heads and key/value heads cover the attention's parameters once, leaving what belongs to no head: the
    # output bias and a query/key norm shared by every head (Qwen3's, Gemma 3's, Phi's qk_layernorm)
    cover = {n: torch.zeros(t.shape, dtype=torch.int64) for n, t in attn.items()}
    for c in comps:
        for n, t in hf_component_masks(m, c).items():
            cover[n] += t.long()
    assert max(int(c.max()) for c in cover.values()) == 1
    left = sorted(
        n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n, c in cover.items() if (c == 0).any()
    )
    assert all(bool((cover[n] == 0).all()) for n in cover if (cover[n] == 0).any())  # whole parameters only
    shared = {"q_norm.weight", "k_norm.weight"} | {
        f"{q}_layernorm.{w}" for q in "qk" for w in ("weight", "bias")
    }
    out_bias = {"c_proj.bias", "dense.bias", "out_proj.bias", "o_proj.bias"}
    assert set(left) <= shared | out_bias, left


# ------------------------------------------------------------------------------------------- residual patching


def _blocks(m):
    """(layers, attention write, MLP write) module names of the families patched below."""
    mt = m.config.model_type
    if mt in ("gpt2", "gpt_bigcode"):
        return m.transformer.h, "attn", "mlp"
    if mt == "gemma2":  # sandwich norms: what is added to the residual stream is the post-norms' output
        return m.model.layers, "post_attention_layernorm", "post_feedforward_layernorm"
    return m.model.layers, "self_attn", "mlp"


def _first(o):
    return o[0] if isinstance(o, tuple) else o


def _site_hooks(m, site, layer, edit):
    """Forward hooks on the model's own modules applying ``edit`` to ``site`` of ``layer``; returns handles."""
    layers, a, f = _blocks(m)
    blk = layers[layer]
    if site == "resid_pre":

        def pre(mod, args, kw):
            if args:
                return (edit(args[0]), *args[1:]), kw
            return args, {**kw, "hidden_states": edit(kw["hidden_states"])}

        return [blk.register_forward_pre_hook(pre, with_kwargs=True)]
    if site == "resid_mid":  # resid_pre + attention write, fed on as the attention write
        store = {}

        def grab(mod, args, kw):
            store["pre"] = args[0] if args else kw["hidden_states"]

        def mid(mod, args, o):
            new = edit(store["pre"] + _first(o)) - store["pre"]
            return (new, *o[1:]) if isinstance(o, tuple) else new

        return [
            blk.register_forward_pre_hook(grab, with_kwargs=True),
            getattr(blk, a).register_forward_hook(mid),
        ]
    mod = {"attn_out": getattr(blk, a), "mlp_out": getattr(blk, f), "resid_post": blk}[site]

    def post(mod, args, o):
        return (edit(_first(o)), *o[1:]) if isinstance(o, tuple) else edit(o)

    return [mod.register_forward_hook(post)]


def _run(m, x, site=None, layer=0, edit=None):
    handles = _site_hooks(m, site, layer, edit) if site else []
    try:
        with torch.no_grad():
            return m(x).logits
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("arch", ["gpt2", "bigcode", "phi", "gemma2", "qwen2_moe"])
def test_residual_patching_of_a_raw_model_equals_one_hooked_forward_per_cell(arch):
    from pypattern.patching import LogitDiff, activation_patching

    m = _build(arch, 1)  # float32, 5 heads of 6 over one key/value head, tied embeddings
    B, T = 2, 5
    clean = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(2))
    corr = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(3))
    answer, wrong = clean[:, -1], (clean[:, -1] + 1) % V
    sites = ["resid_pre", "attn_out", "mlp_out", "resid_post"] + ([] if arch == "phi" else ["resid_mid"])
    for i, site in enumerate(sites):
        direction = ("denoising", "noising")[i % 2]
        got = activation_patching(
            m, site, clean, corr, metric=LogitDiff(answer, wrong), direction=direction, quiet=True
        ).values
        source, target = (clean, corr) if direction == "denoising" else (corr, clean)
        want = torch.zeros(B, 2, T)
        for layer in range(2):
            seen = {}
            _run(m, source, site, layer, lambda v, seen=seen: seen.setdefault("v", v.clone()))
            for p in range(T):

                def put(v, p=p, seen=seen):
                    v = v.clone()
                    v[:, p] = seen["v"][:, p]
                    return v

                last = _run(m, target, site, layer, put)[:, -1]
                want[:, layer, p] = (last.gather(1, answer[:, None]) - last.gather(1, wrong[:, None]))[:, 0]
        torch.testing.assert_close(torch.as_tensor(got, dtype=torch.float32), want, rtol=0, atol=1e-6)
        assert want.abs().max() > 1e-2


# ------------------------------------------------------------------------------------------ estimators, padding

KW = dict(
    num_chains=2,
    num_draws=5,
    step_size=1e-3,
    localization=100.0,
    quiet=True,
    seed=0,
    warn_nonstationary=False,
)


def _padded(t, mode, k=3):
    """A Hugging Face batch of the rows of ``t`` with ``k`` padding columns: on the left, on the right, or
    ``i % (k + 1)`` on the left of row ``i`` and the rest on the right; position ids count the real tokens from 0
    (a padding position's id is not read)."""
    rows, masks, pos = [], [], []
    n = t.shape[1]
    for i in range(t.shape[0]):
        left = {"right": 0, "left": k, "both": i % (k + 1)}[mode]
        rows.append(torch.cat([torch.full((left,), 5), t[i], torch.full((k - left,), 5)]))
        masks.append(torch.cat([torch.zeros(left), torch.ones(n), torch.zeros(k - left)]).long())
        pos.append(torch.cat([torch.full((left,), 7), torch.arange(n), torch.full((k - left,), 1)]).long())
    ids, am = torch.stack(rows), torch.stack(masks)
    return {
        "input_ids": ids,
        "attention_mask": am,
        "labels": torch.where(am.bool(), ids, -100),
        "position_ids": torch.stack(pos),
    }


def _counted(b):
    am = b["attention_mask"].bool()
    return (am[:, 1:] & am[:, :-1]).reshape(-1).numpy()


# GPT-2: learned positions (read from position_ids); Llama and Phi-3 (rotary, grouped-query) under sdpa: in float64
# their eager attention takes the softmax in float32, where a padded query's row of float64-minimum scores becomes
# -inf throughout and NaN (the Hugging Face model's own logits), see test_nan_logits_of_the_model_are_named
@pytest.mark.parametrize("arch, attn", [("gpt2", "eager"), ("llama", "sdpa"), ("phi3", "sdpa")])
def test_estimators_on_padded_dict_batches_equal_the_unpadded_ones(arch, attn):
    m = _build(arch, 3, attn=attn).double()
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(0, V, (4, 6), generator=g) for _ in range(2)]
    probe = torch.randint(0, V, (3, 5), generator=g)
    comps = ["blocks.0.attn.head.1", "blocks.1.mlp"]
    llc = pp.estimate_llc(m, data, **KW).llc_per_chain
    chi = pp.susceptibilities(m, data, probe, comps, **KW).chi
    bif = pp.bif(m, data, probe, **KW).bif
    assert np.abs(chi).max() > 0 and np.abs(bif).max() > 0
    for mode in ("left", "right", "both"):
        pdata, pprobe = [_padded(t, mode) for t in data], _padded(probe, mode)
        c = _counted(pprobe)
        np.testing.assert_allclose(pp.estimate_llc(m, pdata, **KW).llc_per_chain, llc, rtol=1e-9)
        got = pp.susceptibilities(m, pdata, pprobe, comps, **KW).chi
        np.testing.assert_allclose(got[:, c], chi, rtol=1e-8, atol=1e-10 * np.abs(chi).max())
        assert (got[:, ~c] == 0).all()
        got = pp.bif(m, pdata, pprobe, **KW).bif
        np.testing.assert_allclose(got[np.ix_(c, c)], bif, rtol=1e-8, atol=1e-10 * np.abs(bif).max())


def test_nan_logits_of_the_model_are_named():
    """A model whose own logits are NaN on a batch (here a token's embedding row is NaN): the estimators say where
    to look rather than sample NaN."""
    m = _build("llama", 3, attn="eager").double()
    b = _padded(torch.randint(0, V, (4, 6), generator=torch.Generator().manual_seed(1)), "left")
    with torch.no_grad():
        m.get_input_embeddings().weight[int(b["input_ids"][0, -1])] = float("nan")
        assert torch.isnan(m(**{k: v for k, v in b.items() if k != "labels"}).logits).any()
    with pytest.raises(ValueError, match="not finite.*own logits"):
        pp.estimate_llc(m, [b], **KW)


def test_a_left_padded_float64_batch_of_a_model_whose_own_logits_are_nan_there_is_estimated():
    """A float64 Llama with eager attention gives NaN logits on a left-padded batch itself (its softmax runs in
    float32, where a fully padded row is -inf throughout); the estimators keep the padded rows finite and give the
    estimate of the prompts (finite, and the same as the hooked adapter's)."""
    m = _build("llama", 3, attn="eager").double()
    b = _padded(torch.randint(0, V, (4, 6), generator=torch.Generator().manual_seed(1)), "left")
    with torch.no_grad():
        assert torch.isnan(m(**{k: v for k, v in b.items() if k != "labels"}).logits).any()
    raw = pp.estimate_llc(m, [b], **KW)
    assert np.isfinite(raw.llc_mean)
    hooked = pp.estimate_llc(pp.hooked_hf(m), [b], **KW)
    assert raw.llc_mean == pytest.approx(hooked.llc_mean, rel=1e-9)


_T = torch.randint(0, V, (4, 6), generator=torch.Generator().manual_seed(0))
_BAD = {
    "no input_ids": ({"tokens": _T}, r"needs a tensor 'input_ids', got a dict with keys \{'tokens'"),
    "ids as a list": ({"input_ids": _T.tolist()}, r"needs a tensor 'input_ids', got a dict with keys \{'input_ids': list"),
    "float ids": ({"input_ids": _T.float()}, r"must hold integer token ids, got .*torch.float32"),
    "mask shape": (
        {"input_ids": _T, "attention_mask": torch.ones(4, 4, dtype=torch.long)},
        r"'attention_mask'\] must have the shape of input_ids \(4, 6\), got .*\(4, 4\)",
    ),
    "mask values": (
        {"input_ids": _T, "attention_mask": 2 * torch.ones_like(_T)},
        r"must hold 1 \(a real token\) or 0 \(padding\), got the value 2",
    ),
    "float labels": ({"input_ids": _T, "labels": _T.float()}, r"'labels'\] must hold integer token ids .*float32"),
    "labels shape": (
        {"input_ids": _T, "labels": _T[:, :3]},
        r"'labels'\] must have the shape of input_ids \(4, 6\), got .*\(4, 3\)",
    ),
    "position ids list": (
        {"input_ids": _T, "position_ids": [0, 1]},
        r"'position_ids'\] must be a tensor, got .*'position_ids': list",
    ),
    "text": ("some text", r"cannot read a str; expected a token tensor"),
    "numpy": (_T.numpy(), r"cannot read a ndarray; expected a token tensor"),
    "triple": ((_T, _T, _T), r"would ignore the other elements of a tuple of 3"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(_BAD))
def test_a_batch_the_defaults_cannot_read_is_named_with_what_was_expected(case):
    batch, expected = _BAD[case]
    m = _build("llama", 3)
    small = dict(num_chains=1, num_draws=2, step_size=1e-4, localization=10.0, quiet=True)
    for probe_of in (pp.susceptibilities, pp.bif):
        args = (["blocks.0.mlp"],) if probe_of is pp.susceptibilities else ()
        with pytest.raises((TypeError, ValueError), match=expected) as e:
            probe_of(m, [_T], batch, *args, **small)
        assert str(e.value).startswith("probe")
    with pytest.raises((TypeError, ValueError), match=expected) as e:  # a loader's batch: named the same
        pp.estimate_llc(m, [batch], **small)
    assert str(e.value).startswith("loader")


# ------------------------------------------------------------------------------------------------ user settings


def _gpt2_with_dropout():
    import transformers as tr

    torch.manual_seed(0)
    cfg = tr.GPT2Config(
        vocab_size=V, n_positions=24, n_embd=20, n_layer=2, n_head=5, bos_token_id=0, eos_token_id=0
    )
    return tr.GPT2LMHeadModel(cfg).double().eval()  # dropout 0.1 in train() mode


def test_dropout_in_train_mode_and_gradient_checkpointing_sample_as_the_eval_model():
    import copy

    base = _gpt2_with_dropout()
    t = torch.randint(0, V, (4, 6), generator=torch.Generator().manual_seed(1))
    data = [t, t.roll(1, 0)]
    want = pp.estimate_llc(base, data, **KW).llc_per_chain
    want_chi = pp.susceptibilities(base, data, t[:2], ["blocks.0.attn.head.1"], **KW).chi
    for checkpointing in (False, True):
        m = copy.deepcopy(base)
        if checkpointing:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # transformers renames the method
                m.gradient_checkpointing_enable()
        m.train()
        with pytest.warns(UserWarning, match="has dropout"):
            got = pp.estimate_llc(m, data, **KW).llc_per_chain
        with pytest.warns(UserWarning, match="has dropout"):
            chi = pp.susceptibilities(m, data, t[:2], ["blocks.0.attn.head.1"], **KW).chi
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(chi, want_chi)
        assert m.training  # left as it was


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("site", ["attn_out", "mlp_out", "resid_mid", "resid_pre"])
def test_hook_functions_inside_checkpointed_layers_give_the_gradients_of_the_hooked_forward(site, reentrant):
    """With gradient checkpointing a layer's forward runs again in the backward pass; hook functions attached
    inside the layer for one forward (run_with_hooks) are gone by then, so the recomputation saw another forward
    and the gradients were those of neither. Checked against the same edit written as a plain forward hook on a
    copy without checkpointing, and a backward hook at the site against the gradient of that activation."""
    import copy

    ref = _gpt2_with_dropout()
    for mod in ref.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    m = copy.deepcopy(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers renames the method
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    m.train()
    ref.train()
    hm = pp.hooked_hf(m)
    t = torch.randint(0, V, (3, 6), generator=torch.Generator().manual_seed(1))
    delta = torch.randn(3, 6, 20, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    seen = {}

    def edit(x, hook):
        return x * 1.5 + delta

    def grad_at_site(g, hook):
        seen["grad"] = g.clone()

    for _ in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = hm.run_with_hooks(
                t,
                fwd_hooks=[(f"blocks.0.hook_{site}", edit)],
                bwd_hooks=[(f"blocks.0.hook_{site}", grad_at_site)],
            )
            (out**2).sum().backward()
        said = [w for w in caught if "gradient checkpointing on" in str(w.message)]
        assert len(said) == (0 if _ else 1)  # said once per wrapper
    got = {n: p.grad.clone() / 2 for n, p in m.named_parameters()}
    assert not pp.models.hooks.attached_hooks(
        m
    )  # the adapter's own hooks compute nothing while nothing is attached

    captured = {}

    def hand(v):
        v = v * 1.5 + delta
        v.register_hook(lambda g: captured.__setitem__("grad", g.clone()))
        return v

    handles = _site_hooks(ref, site, 0, hand)
    try:
        want_out = ref(t).logits
    finally:
        for h in handles:
            h.remove()
    (want_out**2).sum().backward()
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    for n, p in ref.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-10, atol=1e-12, msg=n)
    torch.testing.assert_close(seen["grad"], captured["grad"], rtol=1e-10, atol=1e-12)
    assert m.transformer.h[0].gradient_checkpointing  # the model's setting is left as it was


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_hook_and_patch_and_are_refused_by_the_samplers_by_name(dtype):
    from pypattern.patching import LogitDiff, activation_patching

    m = _build("llama", 3).to(dtype)
    t = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(0))
    logits, cache = pp.hooked_hf(m).run_with_cache(t)
    with torch.no_grad():
        torch.testing.assert_close(logits, m(t).logits, rtol=0, atol=0)
    assert cache["blocks.0.hook_resid_mid"].dtype == dtype
    metric = LogitDiff(t[:, -1], (t[:, -1] + 1) % V)
    with pytest.warns(UserWarning, match="half precision"):
        r = activation_patching(m, "resid_pre", t, t.roll(1, 1), metric=metric, quiet=True)
    assert np.isfinite(np.asarray(r.values, dtype=float)).all()
    small = dict(num_chains=1, num_draws=2, step_size=1e-4, localization=10.0, quiet=True)
    for run in (
        lambda: pp.estimate_llc(m, [t], **small),
        lambda: pp.susceptibilities(m, [t], t, ["blocks.0.attn.head.1"], **small),
        lambda: pp.bif(m, [t], t, **small),
    ):
        with pytest.raises(TypeError, match=rf"'model.embed_tokens.weight' has dtype {dtype}.*float32 copy"):
            run()
