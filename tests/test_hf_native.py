"""Hugging Face causal LMs used natively: residual hook points (against HF's own hidden states and independent
forward hooks), patching through them (against hand-written HF hooks), and per-head / MLP parameter masks (a
head's mask moves exactly that head's output)."""

import pytest
import torch

from pypattern.models.hf import HAS_TRANSFORMERS, gpt2_hook_points, hooked_gpt2, hooked_hf
from pypattern.models.hf_masks import hf_attention_shape, hf_component_masks, hf_components, is_hf_model

pytestmark = [
    pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed"),
    pytest.mark.usefixtures("one_thread"),
]

V, T = 37, 7


def _config(arch: str):
    import transformers as tr

    common = dict(vocab_size=V, max_position_embeddings=16)
    if arch == "gpt2":
        return tr.GPT2Config(
            vocab_size=V, n_positions=16, n_embd=24, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
    if arch in ("neox", "neox_seq"):
        return tr.GPTNeoXConfig(
            hidden_size=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
            use_parallel_residual=arch == "neox", rotary_pct=0.5, bos_token_id=0, eos_token_id=0, **common,
        )  # fmt: skip
    if arch == "llama":  # grouped-query attention (2 query heads per key/value head) with biases
        return tr.LlamaConfig(
            hidden_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=40, attention_bias=True, mlp_bias=True, tie_word_embeddings=False, **common,
        )  # fmt: skip
    if arch == "llama_mha":
        return tr.LlamaConfig(
            hidden_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            intermediate_size=40, tie_word_embeddings=True, **common,
        )  # fmt: skip
    if arch == "mistral":  # 6 query heads over 2 key/value heads, head_dim 4
        return tr.MistralConfig(
            hidden_size=24, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, head_dim=4,
            intermediate_size=40, **common,
        )  # fmt: skip
    if arch == "qwen2":  # q/k/v biases, GQA
        return tr.Qwen2Config(
            hidden_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=40, **common,
        )  # fmt: skip
    if arch == "qwen3":  # per-head query/key norms, GQA, q/k/v/o biases
        return tr.Qwen3Config(
            hidden_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            intermediate_size=40, attention_bias=True, **common,
        )  # fmt: skip
    if arch == "phi3":  # fused qkv_proj and gate_up_proj, GQA, partial rotary
        return tr.Phi3Config(
            hidden_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=40, partial_rotary_factor=0.5, pad_token_id=0, **common,
        )  # fmt: skip
    if arch == "gpt_neo":  # a global and a local layer, split projections under attn.attention
        return tr.GPTNeoConfig(
            hidden_size=24, num_layers=2, num_heads=4, intermediate_size=40, attention_types=[[["global", "local"], 1]],
            window_size=3, max_position_embeddings=16, vocab_size=V, bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
    if arch == "gemma":  # multi-query attention, scaled embeddings, 1 + w norms
        return tr.GemmaConfig(
            hidden_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=8,
            intermediate_size=40, **common,
        )  # fmt: skip
    if arch == "gemma2":  # sandwich norms, soft caps, a local and a global layer
        return tr.Gemma2Config(
            hidden_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            intermediate_size=40, sliding_window=3, query_pre_attn_scalar=10, attn_logit_softcapping=3.0,
            final_logit_softcapping=5.0, **common,
        )  # fmt: skip
    if arch == "gemma3":  # sandwich norms, per-head query/key norms, per-layer rotary bases
        return tr.Gemma3TextConfig(
            hidden_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            intermediate_size=40, sliding_window=3, sliding_window_pattern=2, query_pre_attn_scalar=8, **common,
        )  # fmt: skip
    if arch == "stablelm":  # LayerNorms with biases, partial rotary, gated MLP, q/k/v biases
        return tr.StableLmConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=40,
            use_qkv_bias=True, **common,
        )  # fmt: skip
    if arch == "stablelm_qkln":  # and per-head query / key LayerNorms (one module per head)
        return tr.StableLmConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=40,
            use_qkv_bias=True, qk_layernorm=True, **common,
        )  # fmt: skip
    if arch == "gptj":  # attention and MLP in parallel reading one LayerNorm, adjacent rotary pairs
        return tr.GPTJConfig(
            vocab_size=V, n_embd=24, n_layer=2, n_head=4, rotary_dim=4, n_positions=16, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
    if arch == "phi":  # parallel attention and MLP on one LayerNorm, partial rotary, biases everywhere
        return tr.PhiConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40, resid_pdrop=0.0,
            embd_pdrop=0.0, **common,
        )  # fmt: skip
    if arch == "olmo":  # LayerNorms without parameters, clamped q/k/v projections
        return tr.OlmoConfig(
            hidden_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=40,
            clip_qkv=0.5, pad_token_id=0, bos_token_id=None, eos_token_id=None, **common,
        )  # fmt: skip
    if arch == "olmo2":  # norms after the sublayers only, query/key norms across all heads
        return tr.Olmo2Config(
            hidden_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=40,
            **common,
        )  # fmt: skip
    if arch == "starcoder2":  # LayerNorms with biases, a plain MLP (c_fc, c_proj), GQA, a sliding window
        return tr.Starcoder2Config(
            hidden_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=40,
            sliding_window=4, bos_token_id=0, eos_token_id=0, **common,
        )  # fmt: skip
    if arch in ("bigcode", "bigcode_mha"):  # GPT-BigCode: multi-query or per-head [q, k, v] blocks in c_attn
        return tr.GPTBigCodeConfig(
            vocab_size=V, n_embd=24, n_layer=2, n_head=4, n_inner=40, n_positions=16, multi_query=arch == "bigcode",
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
    if arch == "smollm3":  # a layer without rotary positions (NoPE)
        return tr.SmolLM3Config(
            hidden_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=40,
            no_rope_layers=[1, 0], pad_token_id=None, **common,
        )  # fmt: skip
    if arch == "helium":  # rotary pairs (2i, 2i + 1)
        return tr.HeliumConfig(
            hidden_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=6,
            intermediate_size=40, pad_token_id=None, **common,
        )  # fmt: skip
    if arch == "ernie4_5":  # rotary pairs (2i, 2i + 1) turned in float32
        return tr.Ernie4_5Config(
            hidden_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=6,
            intermediate_size=40, use_bias=True, **common,
        )  # fmt: skip
    if arch == "seed_oss":  # q/k/v and output biases
        return tr.SeedOssConfig(
            hidden_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=40,
            attention_bias=True, attention_out_bias=True, **common,
        )  # fmt: skip
    if arch == "mixtral":  # a sparse block of 4 experts, 2 per token, GQA
        return tr.MixtralConfig(
            hidden_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=20,
            num_local_experts=4, num_experts_per_tok=2, **common,
        )  # fmt: skip
    if (
        arch == "olmoe"
    ):  # one query/key norm across all heads, clamped projections, experts without renormalising
        return tr.OlmoeConfig(
            hidden_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, intermediate_size=20,
            num_experts=4, num_experts_per_tok=2, clip_qkv=2.0, pad_token_id=0, bos_token_id=None,
            eos_token_id=None, **common,
        )  # fmt: skip
    if arch == "qwen2_moe":  # q/k/v biases, a gated shared expert; layer 0 dense (mlp_only_layers)
        return tr.Qwen2MoeConfig(
            hidden_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=28,
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=20, shared_expert_intermediate_size=16,
            mlp_only_layers=[0], **common,
        )  # fmt: skip
    if arch == "qwen3_moe":  # per-head query/key norms, experts renormalised over the chosen ones
        return tr.Qwen3MoeConfig(
            hidden_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            intermediate_size=28, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=20,
            norm_topk_prob=True, **common,
        )  # fmt: skip
    if arch == "vaultgemma":  # Gemma 2 without the norms after the attention and the MLP
        return tr.VaultGemmaConfig(
            hidden_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=6,
            intermediate_size=40, sliding_window=3, query_pre_attn_scalar=8, attn_logit_softcapping=3.0,
            final_logit_softcapping=5.0, pad_token_id=0, bos_token_id=0, eos_token_id=0, **common,
        )  # fmt: skip
    if arch == "nemotron":  # LayerNorms multiplying by 1 + w, a plain squared-ReLU MLP, partial rotary
        return tr.NemotronConfig(
            hidden_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=40,
            partial_rotary_factor=0.5, pad_token_id=0, bos_token_id=0, eos_token_id=0, **common,
        )  # fmt: skip
    if arch == "cohere":  # parallel attention and MLP on one LayerNorm, per-head query/key LayerNorms
        return tr.CohereConfig(
            hidden_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=40,
            use_qk_norm=True, pad_token_id=0, bos_token_id=0, eos_token_id=0, **common,
        )  # fmt: skip
    if arch == "exaone4":  # norms after the sublayers only, per-head q/k norms, no positions on global layers
        return tr.Exaone4Config(
            hidden_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=6,
            intermediate_size=40, sliding_window=3, layer_types=["sliding_attention", "full_attention"],
            pad_token_id=0, bos_token_id=0, eos_token_id=0, **common,
        )  # fmt: skip
    if arch == "ministral":  # sliding windows on the layers layer_types names
        return tr.MinistralConfig(
            hidden_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=6,
            intermediate_size=40, sliding_window=3, layer_types=["sliding_attention", "full_attention"],
            pad_token_id=None, bos_token_id=0, eos_token_id=0, **common,
        )  # fmt: skip
    if arch == "arcee":  # a plain squared-ReLU MLP, biases
        return tr.ArceeConfig(
            hidden_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=6,
            intermediate_size=40, attention_bias=True, mlp_bias=True, pad_token_id=None, bos_token_id=0,
            eos_token_id=0, **common,
        )  # fmt: skip
    if arch in ("glm", "glm4"):  # adjacent rotary pairs on half of each head, a fused gate_up_proj
        cls = tr.GlmConfig if arch == "glm" else tr.Glm4Config  # GLM-4: norms after the attention and the MLP
        return cls(
            hidden_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            intermediate_size=40, pad_token_id=None, bos_token_id=0, eos_token_id=0, **common,
        )  # fmt: skip
    raise ValueError(arch)


ARCHS = [
    "gpt2", "neox", "neox_seq", "llama", "llama_mha", "mistral", "qwen2", "qwen3", "phi3", "gpt_neo", "gemma",
    "gemma2", "gemma3", "olmo", "olmo2", "phi", "gptj", "stablelm", "stablelm_qkln", "starcoder2",
    "bigcode", "bigcode_mha", "mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "smollm3", "seed_oss",
    "helium", "ernie4_5", "ministral", "arcee", "glm", "glm4", "vaultgemma", "exaone4", "cohere", "nemotron",
]  # fmt: skip
MOE = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")
_CACHE: dict = {}


def _model(arch: str):
    if arch not in _CACHE:
        import transformers as tr

        torch.manual_seed(ARCHS.index(arch))
        # the experts of a mixture run one matmul per expert ("eager"): the grouped matmul has no float64 kernel
        kw = dict(experts_implementation="eager") if arch in MOE else {}
        m = (
            tr.AutoModelForCausalLM.from_config(_config(arch), attn_implementation="eager", **kw)
            .double()
            .eval()
        )
        with torch.no_grad():  # biases and norms are zero / one at init: make every parameter matter
            for p in m.parameters():
                p.add_(0.05 * torch.randn_like(p))
        _CACHE[arch] = m
    return _CACHE[arch]


def _tokens(seed: int = 0, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, V, (batch, T), generator=torch.Generator().manual_seed(seed))


def _parts(m, writes: bool = False):
    """(layers, attention module name, mlp module name, final norm) of the HF model, written out per family; with
    ``writes``, the modules whose outputs are added to the residual stream (Gemma 2 / 3: the sandwich norms after
    the attention and the MLP)."""
    mt = m.config.model_type
    if mt in ("gpt2", "gpt_neo", "gptj", "gpt_bigcode"):
        return m.transformer.h, "attn", "mlp", m.transformer.ln_f
    if mt == "gpt_neox":
        return m.gpt_neox.layers, "attention", "mlp", m.gpt_neox.final_layer_norm
    if mt == "phi":
        return m.model.layers, "self_attn", "mlp", m.model.final_layernorm
    if writes and mt in ("gemma2", "gemma3_text", "olmo2", "exaone4"):
        return m.model.layers, "post_attention_layernorm", "post_feedforward_layernorm", m.model.norm
    if writes and mt == "glm4":
        return m.model.layers, "post_self_attn_layernorm", "post_mlp_layernorm", m.model.norm
    return m.model.layers, "self_attn", "mlp", m.model.norm


def _first(x):
    return x[0] if isinstance(x, tuple) else x


# ------------------------------------------------------------------------------------------------ hook points


@pytest.mark.parametrize("arch", ARCHS)
def test_residual_hooks_equal_hf_hidden_states_and_module_outputs(arch):
    m = _model(arch)
    hm = hooked_hf(m)
    toks = _tokens()
    layers, attn_name, mlp_name, ln_f = _parts(m, writes=True)
    L = len(layers)
    seen: dict = {}
    handles = []
    for i, layer in enumerate(layers):
        for name in ("attn", "mlp"):
            mod = getattr(layer, attn_name if name == "attn" else mlp_name)
            handles.append(
                mod.register_forward_hook(
                    lambda mod, a, o, k=(i, name): seen.__setitem__(k, _first(o).detach())
                )
            )
    with torch.no_grad():
        out = m(toks, output_hidden_states=True)
    for h in handles:
        h.remove()
    hs = out.hidden_states
    assert len(hs) == L + 1
    logits, cache = hm.run_with_cache(toks)
    torch.testing.assert_close(logits, out.logits, rtol=0, atol=0)
    emb = (m.transformer.wte if arch == "gpt2" else m.get_input_embeddings())(toks)
    torch.testing.assert_close(cache["hook_embed"], emb, rtol=0, atol=0)
    for layer in range(L):
        pre, post = cache[f"blocks.{layer}.hook_resid_pre"], cache[f"blocks.{layer}.hook_resid_post"]
        torch.testing.assert_close(pre, hs[layer], rtol=0, atol=0)
        a, f = cache[f"blocks.{layer}.hook_attn_out"], cache[f"blocks.{layer}.hook_mlp_out"]
        torch.testing.assert_close(a, seen[(layer, "attn")], rtol=0, atol=0)
        torch.testing.assert_close(f, seen[(layer, "mlp")], rtol=0, atol=0)
        if layer < L - 1:
            torch.testing.assert_close(post, hs[layer + 1], rtol=0, atol=0)
        else:  # HF's last hidden state is after the final norm; resid_post of the last layer is before it
            torch.testing.assert_close(ln_f(post), hs[-1], rtol=0, atol=0)
        if arch in ("neox", "phi", "gptj", "cohere"):  # parallel attention and MLP: no resid_mid
            assert f"blocks.{layer}.hook_resid_mid" not in cache
            torch.testing.assert_close(post, pre + a + f, rtol=1e-12, atol=1e-12)
        else:
            mid = cache[f"blocks.{layer}.hook_resid_mid"]
            torch.testing.assert_close(mid, pre + a, rtol=0, atol=0)
            torch.testing.assert_close(post, mid + f, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cache["ln_final.hook_normalized"], hs[-1], rtol=0, atol=0)


def _hand_patch(m, site: str, layer: int, delta: torch.Tensor):
    """The same additive patch written with plain HF forward hooks on the model's own modules."""
    layers, attn_name, mlp_name, _ = _parts(m, writes=True)
    block = layers[layer]

    def add_out(mod, args, out):
        if isinstance(out, tuple):
            return (out[0] + delta, *out[1:])
        return out + delta

    def add_in(mod, args, kwargs):
        if args:
            return (args[0] + delta, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + delta}

    if site == "resid_pre":
        return block.register_forward_pre_hook(add_in, with_kwargs=True)
    if site in ("attn_out", "resid_mid"):  # resid_mid = resid_pre + attn_out feeds the rest of the layer
        return getattr(block, attn_name).register_forward_hook(add_out)
    if site == "mlp_out":
        return getattr(block, mlp_name).register_forward_hook(add_out)
    if site == "resid_post":
        return block.register_forward_hook(add_out)
    raise ValueError(site)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("site", ["resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"])
def test_patching_a_residual_site_equals_a_hand_written_hf_hook(arch, site):
    if arch in ("neox", "phi", "gptj", "cohere") and site == "resid_mid":
        pytest.skip("parallel attention has no resid_mid")
    m = _model(arch)
    hm = hooked_hf(m)
    toks = _tokens(1)
    layer, pos = 0, 3
    d = m.config.hidden_size
    delta = torch.zeros(1, T, d, dtype=torch.float64)
    delta[0, pos] = torch.randn(d, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def patch(x, hook):
        return x + delta

    with torch.no_grad():
        base = hm(toks)
        ours = hm.run_with_hooks(toks, fwd_hooks=[(f"blocks.{layer}.hook_{site}", patch)])
        h = _hand_patch(m, site, layer, delta)
        try:
            want = m(toks).logits
        finally:
            h.remove()
    torch.testing.assert_close(ours, want, rtol=1e-10, atol=1e-10)
    assert (ours - base)[:, pos:].abs().max() > 1e-3  # the patch moves the output at and after pos
    torch.testing.assert_close(ours[:, :pos], base[:, :pos], rtol=1e-12, atol=1e-12)  # causal: not before pos


def test_forward_accepts_dict_batches_and_keywords():
    m = _model("llama")
    hm = hooked_hf(m)
    toks = _tokens(2)
    am = torch.ones_like(toks)
    am[1, -2:] = 0
    with torch.no_grad():
        want = m(input_ids=toks, attention_mask=am).logits
        torch.testing.assert_close(hm({"input_ids": toks, "attention_mask": am, "labels": toks}), want)
        torch.testing.assert_close(hm(input_ids=toks, attention_mask=am), want)
        torch.testing.assert_close(hm(toks[0]), m(toks[:1]).logits)
    with pytest.raises(TypeError, match="input_ids"):
        hm({"tokens": toks})


def test_unsupported_and_non_hf_models_are_refused_by_name():
    import transformers as tr

    opt = tr.OPTForCausalLM(
        tr.OPTConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                     word_embed_proj_dim=16, max_position_embeddings=16)
    )  # fmt: skip
    from pypattern.models.convert import UnsupportedModelError

    # the conversion's error type (a ValueError), so that one except clause catches both
    with pytest.raises(
        UnsupportedModelError, match=r"model_type='opt'.*gpt2.*gpt_neox.*llama.*mistral.*qwen2"
    ):
        hooked_hf(opt)
    with pytest.raises(TypeError, match="config.model_type"):
        hooked_hf(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="base model"):
        hooked_hf(_model("gpt2").transformer)
    with pytest.raises(ValueError, match="GPT-2"):
        hooked_gpt2(_model("llama"))


def test_gpt2_names_kept():
    m = _model("gpt2")
    pts = gpt2_hook_points(2)
    assert pts["blocks.1.hook_resid_pre"] == "transformer.h.1:input"
    hm = hooked_gpt2(m)
    _, cache = hm.run_with_cache(_tokens(), names_filter=list(pts))
    assert set(cache) == set(pts)


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neo"])
def test_pos_embed_hook_is_batch_shaped_and_patchable_like_the_converted_models(arch):
    """hook_pos_embed has TransformerLens' shape (batch, pos, d) on the adapter as on the converted model (the
    position embedding module sees one row of positions), and a function attached there acts on every prompt."""
    import pypattern as pp

    m = _model(arch)
    conv = pp.from_hf(m)
    toks = _tokens()
    hm = hooked_hf(m)
    _, ch = hm.run_with_cache(toks, names_filter="hook_pos_embed")
    _, cc = conv.run_with_cache(toks, names_filter="hook_pos_embed")
    assert ch["hook_pos_embed"].shape == (toks.shape[0], toks.shape[1], m.config.hidden_size)
    assert ch["hook_pos_embed"].shape == cc["hook_pos_embed"].shape
    torch.testing.assert_close(ch["hook_pos_embed"], cc["hook_pos_embed"].to(ch["hook_pos_embed"].dtype))

    def scale_first(x, hook):  # a different change per prompt: needs the batch axis
        x = x.clone()
        x[0] = 3 * x[0]
        return x

    got = hm.run_with_hooks(toks, fwd_hooks=[("hook_pos_embed", scale_first)])
    ref = conv.run_with_hooks(toks, fwd_hooks=[("hook_pos_embed", scale_first)])
    torch.testing.assert_close(got, ref.to(got.dtype), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got[0], hm(toks)[0])
    torch.testing.assert_close(got[1:], hm(toks)[1:])


# ------------------------------------------------------------------------------------------------- masks


def _out_proj(m, layer):
    layers, attn_name, _, _ = _parts(m)
    attn = getattr(layers[layer], attn_name)
    names = {
        "gpt2": "c_proj",
        "gpt_bigcode": "c_proj",
        "gpt_neox": "dense",
        "gpt_neo": "attention.out_proj",
        "phi": "dense",
        "gptj": "out_proj",
    }
    return attn, names.get(m.config.model_type, "o_proj")


def _capture_attn_input(m, layer, toks):
    attn, _ = _out_proj(m, layer)
    store = {}

    def grab(mod, args, kwargs):
        store["args"], store["kwargs"] = args, dict(kwargs)

    h = attn.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        m(toks, use_cache=False)
    h.remove()
    return store["args"], store["kwargs"]


def _head_results(m, layer, args, kwargs) -> torch.Tensor:
    """Each head's contribution to the attention output, ``(n_heads, batch, pos, d_model)``: the attention module
    run on a fixed input, its per-head output ``z`` read at the output projection's input (independent hook), times
    that head's slice of the output projection (bias excluded: it belongs to no head)."""
    attn, proj_name = _out_proj(m, layer)
    proj = attn.get_submodule(proj_name)
    z = {}
    h = proj.register_forward_pre_hook(lambda mod, a: z.__setitem__("z", a[0]))
    with torch.no_grad():
        attn(*args, **kwargs)
    h.remove()
    n_heads, _, dh = hf_attention_shape(m, layer)
    zz = z["z"].reshape(*z["z"].shape[:-1], n_heads, dh)
    W = proj.weight  # Conv1D (GPT-2): (in, out); nn.Linear: (out, in)
    if m.config.model_type == "gpt2":
        Wh = W.reshape(n_heads, dh, -1)
    else:
        Wh = W.T.reshape(n_heads, dh, -1)
    return torch.einsum("bthe,hed->hbtd", zz, Wh)


def _perturb(m, masks: dict, complement: bool = False, seed: int = 0, keep: tuple = ()):
    """Add noise to the selected entries (or to every entry outside them, except in the parameters outside the
    masks whose name contains one of ``keep``); returns the saved parameters."""
    g = torch.Generator().manual_seed(seed)
    saved = {n: p.detach().clone() for n, p in m.named_parameters()}
    with torch.no_grad():
        for n, p in m.named_parameters():
            sel = masks.get(n, torch.zeros_like(p, dtype=torch.bool))
            if complement:
                sel = sel if n not in masks and any(k in n for k in keep) else ~sel
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype) * sel)
    return saved


def _restore(m, saved):
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.copy_(saved[n])


def _group(m, h):
    n_heads, n_kv, _ = hf_attention_shape(m)
    return h // (n_heads // n_kv)


@pytest.mark.parametrize("arch", ARCHS)
def test_head_mask_moves_exactly_that_head(arch):
    """Invariant: head h's output (its per-head attention output times its slice of the output projection) as a
    function of the attention module's input. Moving the entries of h's mask changes h's output and leaves every
    other head's output unchanged; moving every *other* parameter of the model leaves h's output unchanged (on the
    same attention input: parameters of earlier layers would only change that input). Under grouped-query
    attention "every other" excludes the key/value head h reads, which it shares with its group (see
    test_shared_kv_heads_under_grouped_query_attention)."""
    m = _model(arch)
    layer = 1
    if arch in (
        "olmo2",
        "olmoe",
    ):  # one query/key norm across the heads: no head's parameters act on it alone
        with pytest.raises(ValueError, match="across all heads"):
            hf_component_masks(m, f"blocks.{layer}.attn.head.0")
        assert f"blocks.{layer}.attn.head.0" not in hf_components(
            m
        ) and f"blocks.{layer}.attn" in hf_components(m)
        return
    n_heads, n_kv, _ = hf_attention_shape(m, layer)
    args, kwargs = _capture_attn_input(m, layer, _tokens(3))
    base = _head_results(m, layer, args, kwargs)
    for h in (0, n_heads - 1):
        masks = hf_component_masks(m, f"blocks.{layer}.attn.head.{h}")
        saved = _perturb(m, masks)
        try:
            moved = _head_results(m, layer, args, kwargs)
        finally:
            _restore(m, saved)
        diff = (moved - base).abs().flatten(1).amax(1)
        assert diff[h] > 1e-3
        others = [g for g in range(n_heads) if g != h]
        assert diff[others].max() < 1e-12, (arch, h, diff)
        # under grouped-query attention the head's keys and values are shared with its group: they are outside
        # the head's default mask but still feed it, so the complement is taken of the mask with them
        whole = hf_component_masks(m, f"blocks.{layer}.attn.head.{h}", include_shared_kv=True)
        if n_kv == n_heads:
            assert set(whole) == set(masks) and all(torch.equal(whole[n], masks[n]) for n in masks)
        else:  # more entries (in more parameters, or, with a fused q/k/v projection, more rows of the same one)
            assert set(whole) >= set(masks) and all(bool((whole[n] >= masks[n]).all()) for n in masks)
            assert sum(int(t.sum()) for t in whole.values()) > sum(int(t.sum()) for t in masks.values())
        # Qwen3's per-head query and key norms have one weight shared by every head: part of no head's component,
        # they feed every head, so they stay out of the complement too (Cohere's hold a row per head, each part of
        # its head: the other heads' rows are in the complement)
        saved = _perturb(m, whole, complement=True, seed=1, keep=(".q_norm.", ".k_norm."))
        try:
            rest = _head_results(m, layer, args, kwargs)
        finally:
            _restore(m, saved)
        assert (rest[h] - base[h]).abs().max() < 1e-12
        assert (rest - base).abs().max() > 1e-3  # the complement did move something


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "phi3", "stablelm_qkln"])
def test_shared_kv_heads_under_grouped_query_attention(arch):
    m = _model(arch)
    layer = 0
    n_heads, n_kv, _ = hf_attention_shape(m, layer)
    assert n_kv < n_heads
    args, kwargs = _capture_attn_input(m, layer, _tokens(4))
    base = _head_results(m, layer, args, kwargs)
    for g in range(n_kv):
        group = [h for h in range(n_heads) if _group(m, h) == g]
        for masks in (
            hf_component_masks(m, f"blocks.{layer}.attn.kv_head.{g}"),
            hf_component_masks(m, f"blocks.{layer}.attn.head.{group[-1]}", include_shared_kv=True),
        ):
            saved = _perturb(m, masks)
            try:
                diff = (_head_results(m, layer, args, kwargs) - base).abs().flatten(1).amax(1)
            finally:
                _restore(m, saved)
            assert (diff[group] > 1e-4).all()
            outside = [h for h in range(n_heads) if h not in group]
            assert diff[outside].max() < 1e-12
    # heads, kv heads and the rest (the output bias, Qwen3's shared query/key norms) partition the attention's
    # parameters
    attn = hf_component_masks(m, f"blocks.{layer}.attn")
    total = {n: torch.zeros_like(v, dtype=torch.int64) for n, v in attn.items()}
    for c in hf_components(m):
        if c.startswith(f"blocks.{layer}.attn."):
            for n, v in hf_component_masks(m, c).items():
                total[n] += v
    for n, v in total.items():
        assert v.max() <= 1, n  # no entry in two components
        if not n.endswith(("o_proj.bias", "q_norm.weight", "k_norm.weight")):  # shared: part of no head
            assert bool((v == 1).all()), n  # every entry in one
    with pytest.raises(ValueError, match="kv_head"):
        hf_component_masks(_model("llama_mha"), "blocks.0.attn.kv_head.0")


@pytest.mark.parametrize("arch", ["gpt2", "neox", "neox_seq", "llama_mha"])
def test_head_masks_partition_multihead_attention(arch):
    m = _model(arch)
    n_heads, _, _ = hf_attention_shape(m)
    attn = hf_component_masks(m, "blocks.0.attn")
    total = {n: torch.zeros_like(v, dtype=torch.int64) for n, v in attn.items()}
    for h in range(n_heads):
        for n, v in hf_component_masks(m, f"blocks.0.attn.head.{h}").items():
            total[n] += v
    for n, v in total.items():
        assert v.max() <= 1, n
        if "weight" in n or "query_key_value" in n or "c_attn" in n:
            assert bool((v == 1).all()), n
        else:  # the output projection's bias is shared by the heads
            assert int(v.sum()) == 0, n


@pytest.mark.parametrize("arch", ARCHS)
def test_mlp_mask_moves_only_that_mlp(arch):
    m = _model(arch)
    hm = hooked_hf(m)
    toks = _tokens(6)
    layer = 0
    masks = hf_component_masks(m, f"blocks.{layer}.mlp")
    assert masks and all(".mlp." in n for n in masks)
    names = [f"blocks.{layer}.hook_{s}" for s in ("resid_pre", "attn_out", "mlp_out")]
    with torch.no_grad():
        _, base = hm.run_with_cache(toks, names_filter=names)
    saved = _perturb(m, masks)
    try:
        with torch.no_grad():
            _, moved = hm.run_with_cache(toks, names_filter=names)
    finally:
        _restore(m, saved)
    torch.testing.assert_close(moved[names[0]], base[names[0]], rtol=0, atol=0)
    torch.testing.assert_close(moved[names[1]], base[names[1]], rtol=0, atol=0)
    assert (moved[names[2]] - base[names[2]]).abs().max() > 1e-3
    # every other parameter moved: the MLP on the same input gives the same output
    layers, _, mlp_name, _ = _parts(m)
    mlp = getattr(layers[layer], mlp_name)
    x = torch.randn(
        2, T, m.config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        want = mlp(x)
    saved = _perturb(m, masks, complement=True)
    try:
        with torch.no_grad():
            torch.testing.assert_close(mlp(x), want, rtol=0, atol=0)
    finally:
        _restore(m, saved)


def test_embeddings_tied_and_untied_and_names_through_the_adapter():
    gpt2 = _model("gpt2")  # tied
    assert (
        set(hf_component_masks(gpt2, "embed"))
        == set(hf_component_masks(gpt2, "unembed"))
        == {"transformer.wte.weight"}
    )
    assert set(hf_component_masks(gpt2, "pos_embed")) == {"transformer.wpe.weight"}
    assert set(hf_component_masks(gpt2, "ln_final")) == {"transformer.ln_f.weight", "transformer.ln_f.bias"}
    assert set(hf_component_masks(gpt2, "blocks.1.ln2")) == {
        "transformer.h.1.ln_2.weight",
        "transformer.h.1.ln_2.bias",
    }
    block = hf_component_masks(gpt2, "blocks.1")
    assert set(block) == {n for n, _ in gpt2.named_parameters() if n.startswith("transformer.h.1.")}
    raw = hf_component_masks(gpt2, "transformer.h.0.attn.c_attn")  # a parameter-name prefix
    assert set(raw) == {"transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias"}
    neox = _model("neox")
    assert set(hf_component_masks(neox, "blocks.0.ln1")) == {
        "gpt_neox.layers.0.input_layernorm.weight",
        "gpt_neox.layers.0.input_layernorm.bias",
    }
    head = "lm_head" if hasattr(neox, "lm_head") else "embed_out"  # renamed in transformers 5
    assert set(hf_component_masks(neox, "unembed")) == {f"{head}.weight"}
    llama = _model("llama")  # untied
    assert set(hf_component_masks(llama, "embed")) == {"model.embed_tokens.weight"}
    assert set(hf_component_masks(llama, "unembed")) == {"lm_head.weight"}
    tied = _model("llama_mha")
    assert set(hf_component_masks(tied, "unembed")) == {"model.embed_tokens.weight"}
    hm = hooked_hf(llama)
    assert is_hf_model(hm) and is_hf_model(llama) and not is_hf_model(torch.nn.Linear(1, 1))
    masks = hf_component_masks(hm, "blocks.1.attn.head.2", all_params=True)
    params = dict(hm.named_parameters())
    assert set(masks) == set(params)
    assert all(masks[n].shape == params[n].shape for n in masks)
    assert int(masks["module.model.model.layers.1.self_attn.q_proj.weight"].sum()) == 6 * 24
    with pytest.raises(ValueError, match="out of range"):
        hf_component_masks(llama, "blocks.1.attn.head.4")
    with pytest.raises(ValueError, match="out of range"):
        hf_component_masks(llama, "blocks.2.mlp")
    with pytest.raises(ValueError, match="matches no parameter"):
        hf_component_masks(llama, "blocks.0.attention")


class OptimizedModule(torch.nn.Module):
    """The layout of torch.compile's wrapper (the model under ``_orig_mod``; ``len()`` raises, as dynamo's does),
    without importing dynamo (which costs seconds)."""

    def __init__(self, mod):
        super().__init__()
        self._orig_mod = mod

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._orig_mod, name)

    def forward(self, *a, **k):
        return self._orig_mod(*a, **k)

    def __len__(self):
        raise TypeError(f"{type(self._orig_mod).__name__} does not support len()")


def test_torch_compiled_model_masks_and_conversion():
    """``torch.compile`` wraps the model (parameters named ``_orig_mod.*``): masks follow those names (they were
    silently empty), and from_hf converts the compiled model (it was refused as class 'OptimizedModule')."""
    from pypattern import from_hf

    m = _model("llama")
    compiled = OptimizedModule(m)
    names = {n for n, _ in compiled.named_parameters()}
    for comp in ("blocks.1.attn.head.3", "blocks.0.attn.kv_head.1", "blocks.1.mlp", "unembed"):
        got = hf_component_masks(compiled, comp)
        want = hf_component_masks(m, comp)
        assert got and set(got) <= names
        assert {k.removeprefix("_orig_mod."): v for k, v in got.items()}.keys() == want.keys()
        assert all(torch.equal(got["_orig_mod." + k], v) for k, v in want.items())
    x = _tokens()
    with torch.no_grad():
        assert torch.equal(from_hf(compiled)(x), from_hf(m)(x))


@pytest.mark.parametrize("arch", MOE)
def test_expert_mask_moves_only_that_expert(arch):
    """An expert's mask selects its slice of the stacked expert weights and nothing else (not the router, nor a
    shared expert). The router does not read the experts' weights, so moving the masked entries changes the sparse
    block's output at exactly the tokens whose top-k experts include that expert."""
    m = _model(arch)
    layer = 1
    block = m.model.layers[layer].mlp
    masks = hf_component_masks(m, f"blocks.{layer}.mlp.expert.2")
    prefix = f"model.layers.{layer}.mlp.experts."
    assert masks and all(n.startswith(prefix) for n in masks)
    for mk in masks.values():
        assert mk[2].all() and int(mk.sum()) == mk[2].numel()
    x = torch.randn(1, 9, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        router = block.gate(x.reshape(-1, 24))
        if isinstance(router, tuple):  # (logits, routing weights, chosen experts)
            chosen = router[2]
        else:  # logits: the top-k of their softmax
            chosen = router.topk(m.config.num_experts_per_tok, dim=-1).indices
        uses = (chosen == 2).any(-1)
        before = block(x).reshape(-1, 24)
        saved = _perturb(m, masks, seed=3)
        after = block(x).reshape(-1, 24)
        for n, p in m.named_parameters():
            p.copy_(saved[n])
    moved = (after - before).abs().amax(-1) > 1e-12
    assert uses.any() and (~uses).any()
    assert torch.equal(moved, uses)
    with pytest.raises(ValueError, match="out of range; layer 1 has 4 experts"):
        hf_component_masks(m, f"blocks.{layer}.mlp.expert.4")
    with pytest.raises(ValueError, match="has no mixture of experts"):
        hf_component_masks(_model("llama"), "blocks.0.mlp.expert.0")
    if arch == "qwen2_moe":  # layer 0 is dense (mlp_only_layers)
        with pytest.raises(ValueError, match="is dense"):
            hf_component_masks(m, "blocks.0.mlp.expert.0")


@pytest.mark.parametrize("arch", ["gpt2", "llama", "mixtral", "bigcode"])
def test_activation_patching_wraps_a_raw_hf_model(arch):
    """A Hugging Face model given to activation_patching as it is runs through hooked_hf: the same grid as the
    wrapped model's (residual sites); head sites, the exact engine and AtP convert it first (the same grids as the
    converted model's)."""
    from pypattern.patching import LogitDiff, activation_patching, attribution_patching

    m = _model(arch)
    clean, corr = _tokens(2), _tokens(2).roll(1, dims=1)
    metric = LogitDiff(clean[:, -1], (clean[:, -1] + 1) % V)
    kw = dict(metric=metric, layers=[0, 1], positions=[2, T - 1])
    raw = activation_patching(m, "resid_pre", clean, corr, **kw).values
    wrapped = activation_patching(hooked_hf(m), "resid_pre", clean, corr, **kw).values
    torch.testing.assert_close(raw, wrapped, rtol=0, atol=0)
    assert raw.abs().max() > 0
    # head sites, the exact engine and AtP need pypattern's model: the raw model is converted on the way in
    from pypattern import from_hf

    conv = from_hf(m)
    z = activation_patching(m, "z", clean, corr, **kw).values
    torch.testing.assert_close(z, activation_patching(conv, "z", clean, corr, **kw).values, rtol=0, atol=0)
    exact = activation_patching(m, "resid_pre", clean, corr, method="exact", **kw).values
    torch.testing.assert_close(exact, raw, rtol=1e-9, atol=1e-9)
    atp = attribution_patching(m, clean, corr, metric=metric)
    ref = attribution_patching(conv, clean, corr, metric=metric)
    torch.testing.assert_close(atp["z"].values, ref["z"].values, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_llc_and_expert_susceptibilities_on_an_unconverted_mixture_of_experts(arch):
    """The estimators on a mixture of experts as it is: LLC chains move, and susceptibilities take one expert as a
    component (finite, nonzero, and not the whole sparse block's)."""
    import numpy as np

    import pypattern as pp

    m = _model(arch)
    toks = torch.randint(0, V, (12, T), generator=torch.Generator().manual_seed(2))
    loader = torch.utils.data.DataLoader(toks, batch_size=4, shuffle=False)
    kw = dict(num_chains=2, num_draws=4, num_burnin_steps=1, step_size=1e-3, localization=10.0, seed=4)
    r = pp.estimate_llc(m, loader, **kw)
    assert np.isfinite(r.llc_per_chain).all() and np.ptp(r.loss_trace) > 0
    expert = "blocks.1.mlp.expert.1"
    res = pp.susceptibilities(m, loader, toks[:3], components=[expert, "blocks.1.mlp"], **kw)
    chi = np.asarray(res.chi)
    assert chi.shape[0] == 2 and np.isfinite(chi).all() and np.abs(chi[0]).max() > 0
    assert not np.allclose(chi[0], chi[1])


def test_the_adapter_unwraps_compiled_models_leaves_no_hooks_and_refuses_what_it_would_misread():
    """hooked_hf takes torch.compile's wrapper (the layout stood in without dynamo); activation_patching takes its
    temporary hooks off the user's model (they piled up, one set per call); GPT-2's token_type_ids (embedded by
    the token embedding, so hook_embed would see them) and a model without its LM head are refused; an estimator
    whose model has a __len__ that raises (as torch.compile's wrapper does) still samples."""
    import numpy as np

    import pypattern as pp
    from pypattern.patching import LogitDiff, activation_patching

    m = _model("llama")
    x = _tokens()
    torch.testing.assert_close(hooked_hf(OptimizedModule(m))(x), hooked_hf(m)(x), rtol=0, atol=0)
    before = sum(len(mod._forward_hooks) + len(mod._forward_pre_hooks) for mod in m.modules())
    metric = LogitDiff(x[:, -1], (x[:, -1] + 1) % V)
    for _ in range(2):
        activation_patching(m, "resid_pre", x, x.roll(1, dims=1), metric=metric)
    assert sum(len(mod._forward_hooks) + len(mod._forward_pre_hooks) for mod in m.modules()) == before
    gpt2 = _model("gpt2")
    with pytest.raises(ValueError, match="token_type_ids"):
        hooked_hf(gpt2)({"input_ids": x, "token_type_ids": torch.zeros_like(x)})
    import transformers as tr

    head = tr.LlamaForSequenceClassification(m.config)
    with pytest.raises(ValueError, match="has no language-model head"):
        hooked_hf(head)
    loader = [x]
    kw = dict(num_chains=1, num_draws=2, step_size=1e-4, localization=10.0, seed=0, quiet=True)
    chi = pp.susceptibilities(OptimizedModule(m), loader, x, ["blocks.0.attn.head.0"], **kw).chi
    assert np.isfinite(chi).all()


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma"])
def test_default_gaussian_noise_on_a_raw_hf_model_equals_the_converted_models(arch):
    """GaussianNoise() takes its default std from the embeddings as hook_embed sees them: on a raw Hugging Face
    model from its input embedding module (Gemma's scaled by sqrt(d_model)), the same as on the converted model."""
    from pypattern import from_hf
    from pypattern.patching import GaussianNoise, LogitDiff, activation_patching

    m = _model(arch)
    clean = _tokens(3)
    metric = LogitDiff(clean[:, -1], (clean[:, -1] + 1) % V)
    kw = dict(metric=metric, corruption=GaussianNoise(), layers=[0, 1], positions=[1, T - 1])
    raw = activation_patching(m, "resid_pre", clean, **kw).values
    conv = activation_patching(from_hf(m), "resid_pre", clean, **kw).values
    torch.testing.assert_close(raw, conv, rtol=1e-9, atol=1e-9)
    assert raw.abs().max() > 0


def test_head_masks_refuse_a_renamed_projection_weight_and_read_head_counts_from_the_modules():
    """A wrapper that renames a projection's weight (torch's parametrize, as LoRA's base_layer does) would leave
    the head's slice of it out of the mask: refused, naming the parameter. A config whose head count was edited after
    the model was built does not change the masks: they follow the modules (the forward does too). A component that
    is not a string is named."""
    import torch.nn.utils.parametrize as P
    import transformers as tr

    from pypattern.models import component_masks

    m = tr.LlamaForCausalLM(
        tr.LlamaConfig(
            vocab_size=41, hidden_size=24, num_hidden_layers=1, num_attention_heads=6, num_key_value_heads=3,
            intermediate_size=30,
        )
    )  # fmt: skip

    class Same(torch.nn.Module):
        def forward(self, w):
            return w

    P.register_parametrization(m.model.layers[0].self_attn.q_proj, "weight", Same())
    with pytest.raises(ValueError, match="q_proj.weight"):
        component_masks(m, "blocks.0.attn.head.1")
    for edit in (2, 8):
        g = tr.GPT2LMHeadModel(tr.GPT2Config(vocab_size=41, n_embd=24, n_layer=1, n_head=4))
        want = component_masks(g, "blocks.0.attn.head.1")
        g.config.num_attention_heads = edit
        got = component_masks(g, "blocks.0.attn.head.1")
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
        cols = got["transformer.h.0.attn.c_attn.weight"].nonzero()[:, 1].unique().tolist()
        assert cols == [*range(6, 12), *range(30, 36), *range(54, 60)]  # head 1's q, k, v columns
    lm = tr.LlamaForCausalLM(
        tr.LlamaConfig(
            vocab_size=41, hidden_size=24, num_hidden_layers=1, num_attention_heads=6, num_key_value_heads=3,
            intermediate_size=30,
        )
    )  # fmt: skip
    want = component_masks(lm, "blocks.0.attn.head.5")
    lm.config.num_attention_heads = 3
    got = component_masks(lm, "blocks.0.attn.head.5")
    assert all(torch.equal(want[k], got[k]) for k in want)
    for bad in (3, None):
        with pytest.raises(TypeError, match="component="):
            component_masks(lm, bad)


def test_a_norm_without_parameters_is_named_as_such():
    """OLMo's LayerNorms have no weights: their components are said to have no parameters (the generic message
    listed the refused name among the valid ones)."""
    import transformers as tr

    from pypattern.models import component_masks

    m = tr.OlmoForCausalLM(
        tr.OlmoConfig(
            vocab_size=41, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20
        )
    )
    for c in ("ln_final", "blocks.0.ln1"):
        with pytest.raises(ValueError, match="has no parameters in this model"):
            component_masks(m, c)
    with pytest.raises(ValueError, match="matches no parameter"):
        component_masks(m, "nonsense")


# ------------------------------------------------------------------------- a family with a layout, not converted


@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_cohere_attribution_at_attention_and_mlp_outputs_equals_autograd_through_forward_hooks(direction):
    """Cohere runs through the adapter only (from_hf does not convert it): AtP at ``attn_out`` and ``mlp_out``
    goes through its hook points, and equals the first-order term taken by hand with forward hooks on the model's
    own attention and MLP modules (a zero leaf added to each of the target run's outputs, its gradient by
    autograd)."""
    from pypattern import attribution_patching
    from pypattern.patching import LogitDiff

    m = _model("cohere")
    clean, corrupted = _tokens(4, batch=3), _tokens(5, batch=3)
    metric = LogitDiff(torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]))
    out = attribution_patching(
        m, clean, corrupted, metric=metric, sites=["attn_out", "mlp_out"], direction=direction
    )
    src, tgt = (clean, corrupted) if direction == "denoising" else (corrupted, clean)
    layers = m.model.layers

    def run(tokens, leaves: bool):
        acts, handles = {}, []
        for i, layer in enumerate(layers):
            for name in ("self_attn", "mlp"):

                def hook(mod, args, o, key=(name, i)):
                    t = o[0] if isinstance(o, tuple) else o
                    acts[key] = t.detach()
                    if not leaves:
                        return None
                    # a zero leaf added on: its gradient is the output's, through every later module
                    acts[key, "leaf"] = zero = torch.zeros_like(t, requires_grad=True)
                    return (t + zero, *o[1:]) if isinstance(o, tuple) else t + zero

                handles.append(getattr(layer, name).register_forward_hook(hook))
        try:
            return metric(m(tokens).logits[:, -1]), acts
        finally:
            for h in handles:
                h.remove()

    with torch.enable_grad():
        _, a_src = run(src, False)
        value, a_tgt = run(tgt, True)
        value.sum().backward()
    for site, name in (("attn_out", "self_attn"), ("mlp_out", "mlp")):
        want = torch.stack(
            [
                ((a_src[name, i] - a_tgt[name, i]) * a_tgt[(name, i), "leaf"].grad).sum(-1)
                for i in range(len(layers))
            ],
            1,
        )
        got = out[site].values - value.detach()[:, None, None]
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        assert float(want.abs().max()) > 1e-4
    with pytest.raises(
        ValueError, match=r"site='z' needs .*from_hf does not convert CohereForCausalLM.*attn_out"
    ):
        from pypattern import activation_patching

        activation_patching(m, "z", clean, corrupted, metric=metric, quiet=True)
