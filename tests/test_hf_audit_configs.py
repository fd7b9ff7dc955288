"""from_hf on configurations the other conversion tests leave out: odd head counts, grouped-query ratios 1 to 8,
rotary scalings (linear, llama3, yarn, longrope, dynamic), partial rotary fractions, tied and untied embeddings,
biases on and off, unusual norm epsilons, GPT-NeoX without its parallel residual, 16-bit weights. Each converts to
the Hugging Face model's own forward, or is refused naming its option."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import pypattern  # noqa: E402
from pypattern.models.convert import UnsupportedModelError  # noqa: E402

V = 48
LLAMA = dict(hidden_size=48, intermediate_size=40, num_hidden_layers=2, max_position_embeddings=32)
NEOX = dict(hidden_size=48, intermediate_size=40, num_hidden_layers=2, max_position_embeddings=32)


def _rope(**kw):
    return {"rope_parameters": {"rope_theta": 10000.0, **kw}}


CASES = {
    "llama-3heads": ("Llama", dict(LLAMA, num_attention_heads=3, num_key_value_heads=3)),
    "llama-5heads-d40": ("Llama", dict(LLAMA, hidden_size=40, num_attention_heads=5, num_key_value_heads=5)),
    "llama-gqa1": ("Llama", dict(LLAMA, num_attention_heads=8, num_key_value_heads=8)),
    "llama-gqa2": ("Llama", dict(LLAMA, num_attention_heads=8, num_key_value_heads=4)),
    "llama-gqa4-biases": (
        "Llama",
        dict(LLAMA, num_attention_heads=8, num_key_value_heads=2, attention_bias=True, mlp_bias=True),
    ),
    "llama-gqa8-tied-eps": (
        "Llama",
        dict(
            LLAMA, num_attention_heads=8, num_key_value_heads=1, tie_word_embeddings=True, rms_norm_eps=1e-2
        ),
    ),
    "llama-rope-linear": (
        "Llama",
        dict(LLAMA, num_attention_heads=4, **_rope(rope_type="linear", factor=2.0)),
    ),
    "llama-rope-llama3": (
        "Llama",
        dict(
            LLAMA,
            num_attention_heads=4,
            **_rope(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=8,
            ),
        ),
    ),
    "llama-rope-yarn": (
        "Llama",
        dict(
            LLAMA,
            num_attention_heads=4,
            **_rope(rope_type="yarn", factor=4.0, original_max_position_embeddings=8),
        ),
    ),
    "qwen2-gqa3-untied-eps": (
        "Qwen2",
        dict(
            LLAMA, num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=False, rms_norm_eps=1e-3
        ),
    ),
    "qwen2-tied-rope-linear": (
        "Qwen2",
        dict(
            LLAMA,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            **_rope(rope_type="linear", factor=3.0),
        ),
    ),
    "neox-sequential-tied": (
        "GPTNeoX",
        dict(
            NEOX, num_attention_heads=4, use_parallel_residual=False, rotary_pct=1.0, tie_word_embeddings=True
        ),
    ),
    "neox-sequential-nobias-rot0.5-eps": (
        "GPTNeoX",
        dict(
            NEOX,
            num_attention_heads=4,
            use_parallel_residual=False,
            attention_bias=False,
            rotary_pct=0.5,
            layer_norm_eps=1e-3,
        ),
    ),
    "neox-3heads-parallel": ("GPTNeoX", dict(NEOX, num_attention_heads=3, rotary_pct=0.5)),
    "phi-partial0.4": (
        "Phi",
        dict(NEOX, hidden_size=80, num_attention_heads=4, partial_rotary_factor=0.4, layer_norm_eps=1e-3),
    ),
    "stablelm-partial-qkvbias": (
        "StableLm",
        dict(
            NEOX, num_attention_heads=4, num_key_value_heads=2, partial_rotary_factor=0.5, use_qkv_bias=True
        ),
    ),
    "gpt2-3heads-untied-eps": (
        "GPT2",
        dict(
            n_embd=48, n_layer=2, n_head=3, n_positions=32, tie_word_embeddings=False, layer_norm_epsilon=1e-3
        ),
    ),
}


def _model(case: str, dtype: torch.dtype) -> torch.nn.Module:
    family, kw = CASES[case]
    cfg = getattr(transformers, f"{family}Config")(vocab_size=V, bos_token_id=0, eos_token_id=0, **kw)
    cls = getattr(transformers, "GPT2LMHeadModel" if family == "GPT2" else f"{family}ForCausalLM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = cls(cfg)
    g = torch.Generator().manual_seed(sum(map(ord, case)))
    with torch.no_grad():
        for p in m.parameters():  # biases and norm weights away from their initial 0 / 1
            p.add_(0.15 * torch.randn(p.shape, generator=g))
    return m.to(dtype).eval()


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("case", sorted(CASES))
def test_converts_to_the_models_own_forward(case, dtype, tol):
    m = _model(case, dtype)
    ours = pypattern.from_hf(m, verify=False)
    x = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(1))  # past yarn's / llama3's 8
    with torch.no_grad():
        assert _rel(ours(x), m(input_ids=x).logits) <= tol
    tied = m.get_output_embeddings().weight is m.get_input_embeddings().weight
    assert ours.cfg.tie_word_embeddings == tied


@pytest.mark.parametrize("case", ["llama-gqa4-biases", "neox-sequential-tied", "gpt2-3heads-untied-eps"])
def test_float16_weights_convert_in_float16(case):
    """16-bit weights: the converted model holds the same float16 values and computes the model's function to
    16-bit rounding (both against the float64 forward of the same weights)."""
    m16 = _model(case, torch.float16)
    ours = pypattern.from_hf(m16)
    assert next(ours.parameters()).dtype == torch.float16
    m64 = _model(case, torch.float16).double()  # the float16 values, computed in float64
    x = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        exact = m64(input_ids=x).logits
        assert _rel(m16(input_ids=x).logits, exact) <= 2e-2  # what 16-bit rounding costs the model itself
        assert _rel(ours(x), exact) <= 2e-2
        assert _rel(pypattern.from_hf(m16, dtype=torch.float64)(x), exact) <= 1e-10


def test_options_not_reproduced_are_refused_by_name():
    bad = _model("phi-partial0.4", torch.float64)
    bad.config.partial_rotary_factor = 0.3  # int(20 * 0.3) = 6: even, converts
    pypattern.from_hf(bad)
    cfg = dict(CASES["neox-sequential-tied"][1], rotary_pct=0.25, hidden_size=36, num_attention_heads=3)
    odd = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(vocab_size=V, **cfg)).double().eval()
    with pytest.raises(UnsupportedModelError, match="rotary_pct=0.25"):  # 12 * 0.25 = 3 rotated dims
        pypattern.from_hf(odd)
    dyn = dict(LLAMA, num_attention_heads=4, **_rope(rope_type="dynamic", factor=2.0))
    dm = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=V, **dyn)).double().eval()
    ours = pypattern.from_hf(dm)
    x = torch.randint(0, V, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert _rel(ours(x[:, :32]), dm(input_ids=x[:, :32]).logits) <= 1e-10
    with pytest.raises(ValueError, match="dynamic NTK"):  # past max_position_embeddings the tables change
        ours(x)
