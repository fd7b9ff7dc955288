"""Every sampling estimator on Hugging Face models converted with from_hf, checked against the same estimator on
the unconverted model. With the noise off, SGLD is a deterministic drift whose update is elementwise, and a
conversion only reorders, splits or transposes weight entries: so the converted and the unconverted model follow
the same trajectory, chains differing only through their keyed data order. Loss traces, LLCs, per-head
susceptibilities (masks built independently on each side: pypattern's layout vs the Hugging Face fused/split one)
and BIFs must therefore agree to float rounding; a wrongly mapped weight or mask would not."""

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import pypattern as pp  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

V, T = 19, 8


def _hf(arch: str):
    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=V,
            n_positions=16,
            n_embd=12,
            n_layer=2,
            n_head=3,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        m = transformers.GPT2LMHeadModel(cfg)
    elif arch == "neox":
        cfg = transformers.GPTNeoXConfig(
            vocab_size=V,
            hidden_size=12,
            num_hidden_layers=2,
            num_attention_heads=3,
            intermediate_size=20,
            rotary_pct=0.5,
            max_position_embeddings=16,
            hidden_dropout=0.0,
            attention_dropout=0.0,
        )
        m = transformers.GPTNeoXForCausalLM(cfg)
    elif arch == "qwen3":  # per-head query and key norms
        cfg = transformers.Qwen3Config(
            vocab_size=V,
            hidden_size=16,
            intermediate_size=20,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=6,
            max_position_embeddings=16,
        )
        m = transformers.Qwen3ForCausalLM(cfg)
        with torch.no_grad():  # norm weights start at one: make the query/key norms' weights matter
            for layer in m.model.layers:
                layer.self_attn.q_norm.weight.add_(0.3 * torch.randn(6))
                layer.self_attn.k_norm.weight.add_(0.3 * torch.randn(6))
    elif arch == "gpt_neo":  # a global and a local layer, float32 query-key products
        cfg = transformers.GPTNeoConfig(
            vocab_size=V,
            hidden_size=12,
            num_layers=2,
            num_heads=3,
            intermediate_size=20,
            attention_types=[[["global", "local"], 1]],
            window_size=3,
            max_position_embeddings=16,
            embed_dropout=0.0,
            attention_dropout=0.0,
            resid_dropout=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
        m = transformers.GPTNeoForCausalLM(cfg)
    elif arch == "phi3":  # fused qkv_proj / gate_up_proj, partial rotary
        cfg = transformers.Phi3Config(
            vocab_size=V,
            hidden_size=16,
            intermediate_size=20,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            partial_rotary_factor=0.5,
            max_position_embeddings=16,
            pad_token_id=0,
        )
        m = transformers.Phi3ForCausalLM(cfg)
    elif arch in ("gemma2", "gemma3"):  # sandwich norms, 1 + w norms, scaled embeddings (Gemma 3: q/k norms)
        kw = dict(
            vocab_size=V,
            hidden_size=16,
            intermediate_size=20,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=6,
            max_position_embeddings=16,
            sliding_window=3,
        )
        if arch == "gemma2":
            m = transformers.Gemma2ForCausalLM(
                transformers.Gemma2Config(**kw, attn_logit_softcapping=4.0, final_logit_softcapping=6.0)
            )
        else:
            m = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**kw, sliding_window_pattern=2))
        with torch.no_grad():  # norm weights start at zero (1 + w): make them matter
            for n, p in m.named_parameters():
                if "norm" in n:
                    p.add_(0.3 * torch.randn(p.shape))
            # the padding row (pad_token_id 0) starts at zero, where the first norm's slope is 1 / sqrt(eps)
            m.model.embed_tokens.weight[0].normal_(0.0, 0.02)
    elif arch == "olmo":  # LayerNorms without parameters, clamped projections
        cfg = transformers.OlmoConfig(
            vocab_size=V,
            hidden_size=16,
            intermediate_size=20,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=16,
            clip_qkv=0.5,
            pad_token_id=0,
            bos_token_id=None,
            eos_token_id=None,
        )
        m = transformers.OlmoForCausalLM(cfg)
    elif (
        arch == "stablelm"
    ):  # LayerNorms, partial rotary, gated MLP, attention and MLP in parallel on one norm
        cfg = transformers.StableLmConfig(
            vocab_size=V,
            hidden_size=16,
            intermediate_size=20,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=16,
            use_parallel_residual=True,
        )
        m = transformers.StableLmForCausalLM(cfg)
    elif arch == "smollm3":  # NoPE layers
        cfg = transformers.SmolLM3Config(
            vocab_size=V,
            hidden_size=16,
            intermediate_size=20,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=16,
            no_rope_layers=[0, 1],
            pad_token_id=None,
        )
        m = transformers.SmolLM3ForCausalLM(cfg)
    elif arch == "granite":  # embedding, attention, residual and logits multipliers
        cfg = transformers.GraniteConfig(
            vocab_size=V,
            hidden_size=16,
            intermediate_size=20,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=16,
            embedding_multiplier=3.0,
            attention_multiplier=0.2,
            residual_multiplier=0.4,
            logits_scaling=2.0,
        )
        m = transformers.GraniteForCausalLM(cfg)
    elif arch == "mixtral":  # a mixture of 4 experts, 2 per token (one matmul per expert: float64 runs)
        cfg = transformers.MixtralConfig(
            vocab_size=V,
            hidden_size=16,
            intermediate_size=12,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=16,
            num_local_experts=4,
            num_experts_per_tok=2,
            experts_implementation="eager",
        )
        m = transformers.MixtralForCausalLM(cfg)
    elif arch == "qwen2_moe":  # routed experts and a gated shared expert
        cfg = transformers.Qwen2MoeConfig(
            vocab_size=V,
            hidden_size=16,
            intermediate_size=20,
            moe_intermediate_size=12,
            shared_expert_intermediate_size=10,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=16,
            num_experts=4,
            num_experts_per_tok=2,
            experts_implementation="eager",
        )
        m = transformers.Qwen2MoeForCausalLM(cfg)
    elif arch == "bigcode":  # GPT-BigCode: multi-query attention in a fused c_attn, learned positions
        cfg = transformers.GPTBigCodeConfig(
            vocab_size=V,
            n_embd=16,
            n_inner=20,
            n_layer=2,
            n_head=4,
            n_positions=16,
            multi_query=True,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
        m = transformers.GPTBigCodeForCausalLM(cfg)
    elif (
        arch == "falcon"
    ):  # Falcon-40B's layout: grouped query/key/value rows, two LayerNorms, parallel block
        cfg = transformers.FalconConfig(
            vocab_size=V,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_kv_heads=2,
            new_decoder_architecture=True,
            bias=True,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=0,
        )
        m = transformers.FalconForCausalLM(cfg)
    elif arch == "bloom":  # ALiBi, a LayerNorm on the embedding, fused per-head query/key/value
        cfg = transformers.BloomConfig(vocab_size=V, hidden_size=16, n_layer=2, n_head=4)
        m = transformers.BloomForCausalLM(cfg)
    elif arch == "starcoder2":  # LayerNorms, a plain MLP with biases, GQA, a sliding window
        cfg = transformers.Starcoder2Config(
            vocab_size=V,
            hidden_size=16,
            intermediate_size=20,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=16,
            sliding_window=5,
            bos_token_id=0,
            eos_token_id=0,
        )
        m = transformers.Starcoder2ForCausalLM(cfg)
    elif arch == "opt":  # learned positions with an offset, ReLU, every bias
        cfg = transformers.OPTConfig(
            vocab_size=V,
            hidden_size=12,
            ffn_dim=20,
            num_hidden_layers=2,
            num_attention_heads=3,
            max_position_embeddings=16,
            word_embed_proj_dim=12,
            dropout=0.0,
            pad_token_id=1,
        )
        m = transformers.OPTForCausalLM(cfg)
    elif arch == "gptj":  # one LayerNorm for attention and MLP, float32 scores (eager)
        cfg = transformers.GPTJConfig(
            vocab_size=V,
            n_embd=12,
            n_layer=2,
            n_head=3,
            rotary_dim=2,
            n_positions=16,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
        m = transformers.GPTJForCausalLM(cfg)
    elif arch == "phi":  # attention and MLP in parallel reading one LayerNorm
        cfg = transformers.PhiConfig(
            vocab_size=V,
            hidden_size=16,
            intermediate_size=20,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=16,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
        )
        m = transformers.PhiForCausalLM(cfg)
    elif arch == "olmo2":  # norms after the sublayers only, query/key norms across all heads
        cfg = transformers.Olmo2Config(
            vocab_size=V,
            hidden_size=16,
            intermediate_size=20,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=16,
        )
        m = transformers.Olmo2ForCausalLM(cfg)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "norm" in n:
                    p.add_(0.3 * torch.randn(p.shape))
    else:
        cfg = transformers.LlamaConfig(
            vocab_size=V,
            hidden_size=16,
            intermediate_size=20,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=16,
        )
        m = transformers.LlamaForCausalLM(cfg)
    return m.double().eval()


def _loader():
    """A shuffled loader: each chain reads its own keyed order, so the chains differ with the noise off."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, V, (12, T), generator=g)
    return torch.utils.data.DataLoader(tokens, batch_size=4, shuffle=True)


KW = dict(
    num_chains=3, num_draws=6, num_burnin_steps=2, step_size=1e-3, localization=10.0, noise_scale=0.0, seed=4
)


@pytest.mark.parametrize(
    "arch",
    [
        "gpt2",
        "neox",
        "llama",
        "qwen3",
        "gemma2",
        "olmo",
        "olmo2",
        "phi",
        "gptj",
        "opt",
        "stablelm",
        "starcoder2",
        "bigcode",
        "mixtral",
        "granite",
        "smollm3",
        "qwen2_moe",
        "bloom",
        "falcon",
    ],
)
def test_llc_and_bif_on_converted_equal_unconverted(arch):
    hf = _hf(arch)
    tf = pp.from_hf(hf)
    loader = _loader()
    a = pp.estimate_llc(tf, loader, **KW)
    b = pp.estimate_llc(hf, loader, **KW)
    np.testing.assert_allclose(a.loss_trace, b.loss_trace, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(a.llc_per_chain, b.llc_per_chain, rtol=1e-7, atol=1e-9)
    assert np.ptp(a.loss_trace[:, -1]) > 0  # the chains moved, and differently
    probe = loader.dataset[:2]
    ba = pp.bif(tf, loader, probe, **KW)
    bb = pp.bif(hf, loader, probe, **KW)
    np.testing.assert_allclose(ba.bif, bb.bif, rtol=1e-6, atol=1e-14)
    assert np.abs(ba.bif).max() > 0


@pytest.mark.parametrize(
    "arch",
    [
        "gpt2",
        "neox",
        "llama",
        "qwen3",
        "phi3",
        "gpt_neo",
        "gemma2",
        "gemma3",
        "olmo",
        "olmo2",
        "phi",
        "gptj",
        "starcoder2",
        "bigcode",
        "mixtral",
    ],  # fmt: skip
)
def test_per_head_susceptibilities_on_converted_equal_unconverted(arch):
    hf = _hf(arch)
    tf = pp.from_hf(hf)
    loader = _loader()
    # OLMo 2's heads share one query/key norm: its attention is one component
    comps = ["blocks.1.attn" if arch == "olmo2" else "blocks.1.attn.head.1", "blocks.0.mlp", "embed"]
    if arch in ("llama", "qwen3", "phi3", "gemma2", "gemma3", "olmo", "mixtral"):
        comps.append("blocks.1.attn.kv_head.1")
    if arch == "mixtral":  # one expert of the mixture, on both layouts
        comps.append("blocks.1.mlp.expert.2")
    probe = loader.dataset[4:6]
    ours = pp.susceptibilities(tf, loader, probe, comps, **KW)
    native = {c: pp.component_masks(hf, c) for c in comps}  # masks over HF's own layout
    theirs = pp.susceptibilities(hf, loader, probe, native, **KW)
    np.testing.assert_allclose(ours.chi, theirs.chi, rtol=1e-6, atol=1e-12)
    assert (np.abs(ours.chi).max(axis=1) > 0).all()  # every component's chains moved


@pytest.mark.parametrize("arch", ["neox", "llama"])
def test_steering_a_converted_model_equals_overwriting_the_hf_residual(arch):
    """Concept flags on a converted model: steering writes the flag dimensions of the residual stream at the
    spec's hook; the same overwrite done with a forward pre-hook on the unconverted HF layer gives the same
    logits (float64)."""
    hf = _hf(arch)
    tf = pp.from_hf(hf)
    spec = pp.FlagSpec("blocks.1.hook_resid_pre", dims=(0, 3, 5), num_concepts=2)
    tokens = torch.randint(0, V, (3, T), generator=torch.Generator().manual_seed(5))
    with pp.steer(tf, spec, concept=1):
        ours = tf(tokens)
    code = spec.code()[1].to(torch.float64)
    layers = hf.gpt_neox.layers if arch == "neox" else hf.model.layers

    def pre(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        x = x.clone()
        x[..., list(spec.dims)] = code
        if args:
            return (x, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": x}

    h = layers[1].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            theirs = hf(tokens).logits
    finally:
        h.remove()
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(ours, tf(tokens))  # steering acted


def test_cka_of_converted_models_equals_cka_of_hf_hidden_states():
    """Representation similarity on converted models reads the same residual stream as Hugging Face's
    hidden_states: CKA computed from the converted models' caches equals CKA from the HF outputs."""
    a, b = _hf("llama"), _hf("gpt2")
    ta, tb = pp.from_hf(a), pp.from_hf(b)
    tokens = torch.randint(0, V, (16, T), generator=torch.Generator().manual_seed(6))
    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(2)]
    _, ca = ta.run_with_cache(tokens, names_filter=names)
    _, cb = tb.run_with_cache(tokens, names_filter=names)
    ours = pp.cka_matrix([ca[n].flatten(0, 1) for n in names], [cb[n].flatten(0, 1) for n in names])
    with torch.no_grad():
        ha = a(tokens, output_hidden_states=True).hidden_states
        hb = b(tokens, output_hidden_states=True).hidden_states
    theirs = pp.cka_matrix([ha[i].flatten(0, 1) for i in range(2)], [hb[i].flatten(0, 1) for i in range(2)])
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-9, atol=1e-12)
