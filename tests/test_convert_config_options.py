"""Conversions the check against the model's own forward cannot see, and random configurations.

``from_hf`` checks a conversion on a few tokens, with local attention past the largest window up to 512 tokens: a
window wider than that is converted from what the converter reads alone, so these models are compared here on
inputs past their window. Random configurations (odd widths, grouped-query ratios, head sizes other than
``hidden_size / heads``, rotary fractions and scalings, norm epsilons, activations, tied and untied embeddings)
are compared with the model's own forward in float64 and float32. A sharded checkpoint without its index is
refused naming the directory.
"""

import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

from pypattern import from_hf, from_pretrained  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

V = 37


def _build(family: str, kw: dict, dtype: torch.dtype, impl: str | None, seed: int = 0):
    """A random ``family`` model (weights perturbed so that biases and norm weights are not trivial)."""
    kw = {"vocab_size": V, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": None, **kw}
    config_name = {"Gemma3": "Gemma3TextConfig"}.get(family, f"{family}Config")
    class_name = {"GPT2": "GPT2LMHeadModel", "GPTNeoX": "GPTNeoXForCausalLM"}.get(
        family, f"{family}ForCausalLM"
    )
    cfg = getattr(transformers, config_name)(**kw)
    if impl is not None:
        cfg._attn_implementation = impl
    torch.manual_seed(seed)
    model = getattr(transformers, class_name)(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.15 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.to(dtype).eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _tokens(t: int, n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (n, t), generator=torch.Generator().manual_seed(seed))


# windows of 520 tokens (past the 512 tokens the conversion's check runs), on 530 tokens
_W = 520
_SMALL = dict(
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    intermediate_size=12,
    max_position_embeddings=1024,
)
WIDE_WINDOWS = {
    "mistral": ("Mistral", dict(_SMALL, sliding_window=_W), "sdpa", [_W, _W]),
    "qwen2-max-window-layers": (
        "Qwen2",
        dict(_SMALL, use_sliding_window=True, sliding_window=_W, max_window_layers=1),
        "eager",
        [None, _W],
    ),
    "starcoder2": ("Starcoder2", dict(_SMALL, sliding_window=_W), "sdpa", [_W, _W]),
    "gemma3-local-global": (
        "Gemma3",
        dict(_SMALL, head_dim=8, sliding_window=_W, layer_types=["sliding_attention", "full_attention"]),
        "sdpa",
        [_W, None],
    ),
    "gpt-neo-local-global": (
        "GPTNeo",
        dict(
            hidden_size=16,
            num_layers=2,
            num_heads=2,
            attention_types=[[["local", "global"], 1]],
            window_size=_W,
            max_position_embeddings=1024,
        ),
        "eager",
        [_W, None],
    ),
}


@pytest.mark.parametrize("case", list(WIDE_WINDOWS))
def test_windows_wider_than_the_checks_tokens_convert_exactly(case):
    """A window the check's tokens do not exceed is read from the configuration alone: the converted model holds
    it on the layers that have it, and its logits equal the model's on inputs past it (a layer converted without
    its window would see every earlier key)."""
    family, kw, impl, windows = WIDE_WINDOWS[case]
    hf = _build(family, kw, torch.float64, impl)
    model = from_hf(hf)
    assert [model.cfg.window(i) for i in range(model.cfg.n_layers)] == windows
    x = _tokens(_W + 10, n=1)
    with torch.no_grad():
        want = hf(x).logits
        err = _rel(model(x), want)
    assert err <= 1e-10, f"relative logit error {err:.3g}"
    # the window bites: the last positions see fewer keys than the full prefix
    with torch.no_grad():
        unwindowed = hf(x[:, -(_W - 5) :]).logits[:, -1]
    assert _rel(unwindowed, want[:, -1]) > 1e-6


def _random_config(family: str, seed: int) -> tuple[dict, str]:
    """A random configuration of ``family`` (and an attention implementation) that Hugging Face builds and runs."""
    r = random.Random(seed)
    heads = r.choice([2, 3, 4, 6])
    kv = r.choice([h for h in (1, 2, 3) if heads % h == 0])
    impl = r.choice(["eager", "sdpa"])
    if family == "GPT2":
        n_head, dh = r.choice([3, 5]), r.choice([6, 7])
        return dict(
            n_embd=n_head * dh,
            n_layer=r.choice([1, 2]),
            n_head=n_head,
            n_positions=48,
            n_inner=r.choice([None, 19]),
            activation_function=r.choice(["gelu_new", "gelu", "quick_gelu"]),
            layer_norm_epsilon=r.choice([1e-5, 0.1]),
            scale_attn_by_inverse_layer_idx=r.random() < 0.5,
            tie_word_embeddings=r.random() < 0.5,
        ), impl
    if family == "GPTNeoX":
        return dict(
            hidden_size=heads * 8,
            num_hidden_layers=2,
            num_attention_heads=heads,
            intermediate_size=r.choice([17, 29]),
            max_position_embeddings=48,
            use_parallel_residual=r.random() < 0.5,
            layer_norm_eps=r.choice([1e-5, 0.1]),
            hidden_act=r.choice(["gelu", "gelu_fast"]),
            tie_word_embeddings=r.random() < 0.5,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": r.choice([100.0, 10000.0]),
                "partial_rotary_factor": r.choice([0.25, 0.5]),
            },
        ), impl
    kw = dict(
        hidden_size=heads * r.choice([5, 7]),
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=r.choice([6, 10]),
        intermediate_size=r.choice([17, 33]),
        max_position_embeddings=48,
        rms_norm_eps=r.choice([1e-6, 0.05]),
        hidden_act=r.choice(["silu", "gelu", "relu"]),
        tie_word_embeddings=r.random() < 0.5,
    )
    rope = r.choice(["linear", "yarn", "llama3", "default"])
    params = {"rope_type": rope, "rope_theta": r.choice([100.0, 10000.0])}
    if rope == "linear":
        params["factor"] = 2.5
    if rope == "yarn":
        params.update(factor=4.0, original_max_position_embeddings=12, beta_fast=16.0, truncate=False)
    if rope == "llama3":
        params.update(
            factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=12
        )
    kw["rope_parameters"] = params
    if family == "Llama":
        kw.update(attention_bias=r.random() < 0.5, mlp_bias=r.random() < 0.5)
    if family == "Mistral":
        kw["sliding_window"] = r.choice([3, 7])
    if family == "Qwen2":
        kw.update(use_sliding_window=True, sliding_window=r.choice([3, 7]), max_window_layers=1)
    return kw, impl


RANDOM = [(f, s) for f in ("Llama", "Mistral", "Qwen2", "GPT2", "GPTNeoX") for s in range(2)]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)], ids=["f64", "f32"])
@pytest.mark.parametrize("family,seed", RANDOM, ids=[f"{f}-{s}" for f, s in RANDOM])
def test_random_configurations_convert_exactly(family, seed, dtype, tol):
    kw, impl = _random_config(family, seed)
    hf = _build(family, kw, dtype, impl, seed)
    model = from_hf(hf)
    x = _tokens(40, seed=seed)
    with torch.no_grad():
        err = _rel(model(x), hf(x).logits)
    assert err <= tol, f"{family} {kw}: relative logit error {err:.3g}"


def test_shards_without_their_index_are_refused_naming_the_directory(tmp_path):
    """Sharded safetensors without ``model.safetensors.index.json``: transformers finds no weights to load; the
    error names the directory (and nothing is unpickled)."""
    hf = _build("Llama", dict(_SMALL, max_position_embeddings=32), torch.float32, None)
    hf.save_pretrained(tmp_path, max_shard_size="10KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    (tmp_path / "model.safetensors.index.json").unlink()
    with pytest.raises(ValueError, match=f"path={str(tmp_path)!r}.*could not be loaded"):
        from_pretrained(tmp_path)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-2), (torch.bfloat16, 5e-2)], ids=["f16", "bf16"])
@pytest.mark.parametrize("inverse", [False, True], ids=["scaled", "inverse-layer"])
def test_gpt2_reorder_and_upcast_attn_converts_in_16_bits(dtype, tol, inverse):
    """GPT-2's eager attention with ``reorder_and_upcast_attn`` multiplies queries and keys in float32 and takes
    the softmax in float32 for a 16-bit model: the converted model does the same (its logits agree with the
    model's to 16-bit rounding, as a float32 copy of the model agrees with itself)."""
    kw = dict(
        n_embd=48, n_layer=2, n_head=4, n_positions=64, reorder_and_upcast_attn=True,
        scale_attn_by_inverse_layer_idx=inverse,
    )  # fmt: skip
    hf = _build("GPT2", kw, dtype, "eager")
    model = from_hf(hf)
    assert model.cfg.attn_scores_dtype == torch.float32
    assert model.cfg.attn_softmax_dtype == torch.float32
    x = _tokens(40)
    with torch.no_grad():
        want = hf(x).logits
        err = _rel(model(x), want)
        # the float32 computation of the same rounded weights, for scale: the conversion is as close as 16 bits allow
        err32 = _rel(hf.float()(x).logits, want)
    assert err <= tol, f"relative logit error {err:.3g} (a float32 copy of the model: {err32:.3g})"
    assert err <= 2 * err32 + 1e-3
