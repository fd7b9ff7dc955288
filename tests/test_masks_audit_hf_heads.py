"""Per-head masks over unconverted Hugging Face models, checked layout by layout against the attention itself.

A head's output ``z`` (the input of the attention's output projection, head after head, read with a forward pre-hook)
is computed by the model's own forward in float64. For every family and head:

* the entries of the attention's input-side parameters that ``z_h`` depends on (the non-zero entries of the
  autograd gradient of a random projection of ``z_h``) are exactly the head's mask with ``include_shared_kv=True``,
  apart from parameters every head depends on, which belong to no head (Qwen3's / Gemma 3's ``q_norm``, Phi's
  ``q_layernorm``), and key biases, whose gradient may vanish (a softmax does not see a constant added to a row);
* perturbing exactly the masked entries changes ``z_h`` and leaves every other head's ``z`` bit for bit (a shared
  key/value head: exactly its group's heads), and the output projection's slice acts on ``z_h`` only;
* the heads' masks and the key/value heads' masks cover each entry of the attention's parameters at most once, and
  the entries in none are the output bias and the parameters shared by every head.

Also: half-precision models, non-contiguous weights, weights tied between layers, unsupported families.
"""

import warnings

import pytest
import torch
from _hf_mask_checks import changed_heads, check_head_moves_alone, perturbed, run_at_out_proj

from pypattern.models.hf import HAS_TRANSFORMERS, hf_arch
from pypattern.models.hf_masks import hf_attention_shape, hf_component_masks

pytestmark = [
    pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed"),
    pytest.mark.usefixtures("one_thread"),
]

V, T = 31, 6


def _config(arch):
    import transformers as tr

    c = dict(vocab_size=V, max_position_embeddings=16, num_hidden_layers=2, intermediate_size=20)
    gpt = dict(vocab_size=V, n_positions=16, n_embd=24, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
               attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)  # fmt: skip
    gqa = dict(hidden_size=24, num_attention_heads=4, num_key_value_heads=2)
    return {
        "gpt2": lambda: tr.GPT2Config(**gpt),
        "bigcode_mqa": lambda: tr.GPTBigCodeConfig(**gpt, multi_query=True),
        "bigcode_mha": lambda: tr.GPTBigCodeConfig(**gpt, multi_query=False),
        "gpt_neo": lambda: tr.GPTNeoConfig(
            vocab_size=V, hidden_size=24, num_layers=2, num_heads=4, intermediate_size=20, window_size=3,
            attention_types=[[["global", "local"], 1]], max_position_embeddings=16, bos_token_id=0, eos_token_id=0,
        ),  # fmt: skip
        "gptj": lambda: tr.GPTJConfig(**gpt, rotary_dim=4),
        "neox": lambda: tr.GPTNeoXConfig(**c, hidden_size=24, num_attention_heads=4, rotary_pct=0.5,
                                         bos_token_id=0, eos_token_id=0),  # fmt: skip
        "llama": lambda: tr.LlamaConfig(**c, hidden_size=24, num_attention_heads=6, num_key_value_heads=2,
                                        attention_bias=True),  # fmt: skip
        "mistral_mqa": lambda: tr.MistralConfig(**c, hidden_size=24, num_attention_heads=4, num_key_value_heads=1,
                                                head_dim=8),  # fmt: skip
        "qwen3": lambda: tr.Qwen3Config(**c, **gqa, head_dim=8),
        "gemma3_text": lambda: tr.Gemma3TextConfig(**c, **gqa, head_dim=8, sliding_window=3),
        "phi": lambda: tr.PhiConfig(**c, hidden_size=32, num_attention_heads=4, qk_layernorm=True),
        "phi3": lambda: tr.Phi3Config(**c, **gqa, pad_token_id=0, bos_token_id=0, eos_token_id=0),
        "phi3_mha": lambda: tr.Phi3Config(**c, hidden_size=24, num_attention_heads=4, num_key_value_heads=4,
                                          pad_token_id=0, bos_token_id=0, eos_token_id=0),  # fmt: skip
        "stablelm": lambda: tr.StableLmConfig(**c, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                              use_qkv_bias=True, qk_layernorm=True),  # fmt: skip
        "starcoder2": lambda: tr.Starcoder2Config(**c, **gqa, sliding_window=4, bos_token_id=0, eos_token_id=0),
        "opt": lambda: tr.OPTConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                    num_attention_heads=2, word_embed_proj_dim=16, max_position_embeddings=16),
        "bloom": lambda: tr.BloomConfig(vocab_size=V, hidden_size=16, n_layer=1, n_head=2),
        "falcon": lambda: tr.FalconConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                          new_decoder_architecture=True, num_kv_heads=2),
    }[arch]()  # fmt: skip


ARCHS = [
    "gpt2", "bigcode_mqa", "bigcode_mha", "gpt_neo", "gptj", "neox", "llama", "mistral_mqa", "qwen3",
    "gemma3_text", "phi", "phi3", "phi3_mha", "stablelm", "starcoder2",
]  # fmt: skip
_CACHE: dict = {}


def _build(arch):
    import transformers as tr

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = tr.AutoModelForCausalLM.from_config(_config(arch), attn_implementation="eager")
    m = m.double().eval()
    with torch.no_grad():  # biases and norms start at zero / one: make every parameter matter
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def _model(arch):
    if arch not in _CACHE:
        _CACHE[arch] = _build(arch)
    return _CACHE[arch]


def _x():
    return torch.randint(1, V, (2, T), generator=torch.Generator().manual_seed(1))


def _out_proj_name(m, layer):
    """The attention's output projection, written out here per layout."""
    arch = hf_arch(m)
    a = f"{arch.base}.{arch.layers}.{layer}.{arch.attn}" + (f".{arch.proj}" if arch.proj else "")
    return a + {"gpt2": ".c_proj", "bigcode": ".c_proj", "neox": ".dense"}.get(arch.qkv, f".{arch.out_proj}")


@pytest.mark.parametrize("arch", ARCHS)
def test_each_heads_mask_is_exactly_what_its_output_depends_on_and_the_masks_partition_the_attention(arch):
    m, x, layer = _model(arch), _x(), 1
    n, n_kv, dh = hf_attention_shape(m, layer)
    group = n // n_kv
    arch_ = hf_arch(m)
    params = {k: v.detach() for k, v in m.named_parameters()}
    oname = _out_proj_name(m, layer)
    attn_pre = f"{arch_.base}.{arch_.layers}.{layer}.{arch_.attn}."
    anames = [k for k in params if k.startswith(attn_pre)]
    onames = [k for k in anames if k.startswith(oname + ".")]
    inames = [k for k in anames if k not in onames]
    assert onames and inames

    # the support of each head's z over the input-side parameters, by autograd
    leaves = {k: params[k].clone().requires_grad_(True) for k in inames}
    z, _ = run_at_out_proj(m, {**params, **leaves}, oname, x)
    assert z.shape[-1] == n * dh
    zb = z.reshape(*z.shape[:-1], n, dh)
    r = torch.randn(zb.shape, dtype=zb.dtype, generator=torch.Generator().manual_seed(2))
    support = []
    for h in range(n):
        g = torch.autograd.grad(
            (zb[..., h, :] * r[..., h, :]).sum(), list(leaves.values()), retain_graph=True
        )
        support.append({k: gk != 0 for k, gk in zip(leaves, g)})
    every_head = {k: torch.stack([s[k] for s in support]).all(0) for k in inames}

    with torch.no_grad():
        z0, o0 = run_at_out_proj(m, params, oname, x)
    count = {k: torch.zeros(params[k].shape, dtype=torch.int64) for k in anames}
    for h in range(n):
        own = hf_component_masks(m, f"blocks.{layer}.attn.head.{h}")
        full = hf_component_masks(m, f"blocks.{layer}.attn.head.{h}", include_shared_kv=True)
        assert set(own) <= set(anames) and set(full) <= set(anames)
        for k in inames:
            sel = full.get(k, torch.zeros_like(count[k], dtype=torch.bool))
            outside = support[h][k] & ~sel
            # moved by the head but outside its mask: only parameters every head reads (in no head's mask)
            assert bool(every_head[k][outside].all()), (h, k)
            silent = sel & ~support[h][k]
            if silent.any():  # a key bias: softmax(q.(k + b)) does not depend on b; nothing else
                assert arch in ("gpt2", "bigcode_mha", "stablelm") and "bias" in k, (h, k, silent.nonzero())
        for k, sel in own.items():
            count[k] += sel.long()
        check_head_moves_alone(m, params, own, full, h, (n, n_kv, dh), oname, onames, x, z0, o0)
    for g in range(n_kv if n_kv < n else 0):
        mk = hf_component_masks(m, f"blocks.{layer}.attn.kv_head.{g}")
        for k, sel in mk.items():
            count[k] += sel.long()
        with torch.no_grad():
            z1, _ = run_at_out_proj(m, perturbed(params, mk, seed=50 + g), oname, x)
        assert changed_heads(z0, z1, n, dh) == list(range(g * group, (g + 1) * group)), g
    whole = hf_component_masks(m, f"blocks.{layer}.attn")
    for k in anames:
        assert int(count[k].max()) <= 1, k  # no entry in two masks
        assert bool(whole[k].all()), k
        none = count[k] == 0
        if none.any():  # in no mask: the output bias, and parameters every head reads
            assert (k in onames and k.endswith("bias")) or (
                k in inames and bool(every_head[k][none].all())
            ), k


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("arch", ["gpt2", "neox", "phi3", "llama"])
def test_half_precision_models_get_the_same_masks_and_a_head_moves_alone(arch, dtype):
    ref = _model(arch)
    m = _build(arch).to(dtype)
    x, layer = _x(), 1
    n, _, dh = hf_attention_shape(m, layer)
    params = {k: v.detach() for k, v in m.named_parameters()}
    oname = _out_proj_name(m, layer)
    with torch.no_grad():
        z0, _ = run_at_out_proj(m, params, oname, x)
    for h in range(n):
        mk = hf_component_masks(m, f"blocks.{layer}.attn.head.{h}")
        want = hf_component_masks(ref, f"blocks.{layer}.attn.head.{h}")
        assert mk.keys() == want.keys() and all(torch.equal(mk[k], want[k]) for k in want)
        with torch.no_grad():
            z1, _ = run_at_out_proj(m, perturbed(params, mk, seed=h), oname, x)
        assert changed_heads(z0, z1, n, dh) == [h]


def test_non_contiguous_weights_get_the_masks_of_their_contiguous_copy():
    ref, m = _model("llama"), _build("llama")
    attn = m.model.layers[1].self_attn
    for name in ("q_proj", "k_proj", "o_proj"):
        lin = getattr(attn, name)
        lin.weight = torch.nn.Parameter(lin.weight.detach().t().contiguous().t())
        assert not lin.weight.is_contiguous()
    for c in ("blocks.1.attn.head.4", "blocks.1.attn.kv_head.1"):
        for incl in (False, True):
            got = hf_component_masks(m, c, include_shared_kv=incl)
            want = hf_component_masks(ref, c, include_shared_kv=incl)
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def _tied_llama():
    m = _build("llama")
    first, second = m.model.layers[0], m.model.layers[1]
    second.self_attn.q_proj.weight = first.self_attn.q_proj.weight
    second.self_attn.v_proj.bias = first.self_attn.v_proj.bias
    second.mlp.down_proj.weight = first.mlp.down_proj.weight
    return m


@pytest.mark.parametrize(
    "component",
    ["blocks.1.attn.head.0", "blocks.0.attn.head.3", "blocks.1.attn.kv_head.1", "blocks.0.attn.kv_head.0"],
)
def test_a_head_whose_projection_is_tied_to_another_layers_is_refused_naming_the_tie(component):
    m = _tied_llama()
    with pytest.raises(ValueError, match=r"tied to .*model\.layers\.[01]\.self_attn\.[qv]_proj"):
        hf_component_masks(m, component)


@pytest.mark.parametrize("component", ["blocks.1.attn", "blocks.1.mlp", "blocks.1"])
def test_a_modules_mask_moves_every_parameter_it_holds_tied_ones_included(component):
    m = _tied_llama()
    sub = m.get_submodule(
        {"blocks.1.attn": "model.layers.1.self_attn", "blocks.1.mlp": "model.layers.1.mlp"}.get(
            component, "model.layers.1"
        )
    )
    masks = hf_component_masks(m, component)
    params = dict(m.named_parameters())
    moved = perturbed(params, masks, seed=3)
    by_id = {id(p): n for n, p in params.items()}
    for p in sub.parameters():  # every tensor the module holds, tied or not, is moved in full
        n = by_id[id(p)]
        assert n in masks and bool(masks[n].all()), n
        assert bool((moved[n] != p).all()), n
    # and nothing the module does not hold
    held = {id(p) for p in sub.parameters()}
    assert all(id(params[n]) in held for n in masks)
