"""Per-head masks over unconverted OPT, BLOOM and Falcon models, checked against the attention itself.

As for the other families: a head's output ``z`` (the input of the attention's output projection, head after head,
read with a forward pre-hook) is computed by the model's own forward in float64, and for every layout and head

* the entries of the attention's input-side parameters that ``z_h`` depends on (the non-zero entries of the autograd
  gradient of a random projection of ``z_h``) are exactly the head's mask with ``include_shared_kv=True`` (a key
  bias may be silent: a softmax does not see a constant added to a row);
* perturbing exactly the masked entries changes ``z_h`` and leaves every other head's ``z`` bit for bit (a shared
  key/value head: exactly its group's heads), and the output projection's slice acts on ``z_h`` only;
* the heads' and key/value heads' masks cover each entry of the attention's parameters at most once, and the
  entries in none are the output bias.

Also the whole-module components (the attention, the MLP, the norms partition a layer) and the dispatch of
``component_masks`` to these masks.
"""

import warnings

import pytest
import torch
from _hf_mask_checks import changed_heads, check_head_moves_alone, perturbed, run_at_out_proj

from pypattern.models import component_masks
from pypattern.models.hf import HAS_TRANSFORMERS
from pypattern.models.hf_masks import hf_attention_shape, hf_component_masks, hf_components

pytestmark = [
    pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed"),
    pytest.mark.usefixtures("one_thread"),
]

V, T = 31, 6

# per layout: (attention path of layer 1, output projection, the layer's MLP modules, the layer's norms)
_LAYOUT = {
    "opt": ("model.decoder.layers.1.self_attn", "out_proj", ("fc1", "fc2"),
            ("self_attn_layer_norm", "final_layer_norm")),
    "bloom": ("transformer.h.1.self_attention", "dense", ("mlp",), ("input_layernorm", "post_attention_layernorm")),
    "falcon": ("transformer.h.1.self_attention", "dense", ("mlp",), None),
}  # fmt: skip


def _config(arch):
    import transformers as tr

    fal = dict(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, bias=True)
    return {
        "opt": lambda: tr.OPTConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2, ffn_dim=20,
                                    num_attention_heads=4, word_embed_proj_dim=16, max_position_embeddings=16),
        "bloom": lambda: tr.BloomConfig(vocab_size=V, hidden_size=16, n_layer=2, n_head=4),
        # grouped (n_kv_heads < n_heads, two norms), grouped with one head per group, grouped multi-query
        "falcon_gqa": lambda: tr.FalconConfig(**fal, new_decoder_architecture=True, num_kv_heads=2),
        "falcon_group1": lambda: tr.FalconConfig(**fal, new_decoder_architecture=True, num_kv_heads=4),
        "falcon_new_mqa": lambda: tr.FalconConfig(**fal, new_decoder_architecture=True, num_kv_heads=1),
        # the old architecture: multi-query in a parallel block, and per-head blocks in a sequential one with ALiBi
        "falcon_mqa": lambda: tr.FalconConfig(**fal, multi_query=True, parallel_attn=True),
        "falcon_mha": lambda: tr.FalconConfig(**fal, multi_query=False, parallel_attn=False, alibi=True),
    }[arch]()  # fmt: skip


ARCHS = ["opt", "bloom", "falcon_gqa", "falcon_group1", "falcon_new_mqa", "falcon_mqa", "falcon_mha"]
_CACHE: dict = {}


def _model(arch):
    import transformers as tr

    if arch not in _CACHE:
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = tr.AutoModelForCausalLM.from_config(_config(arch), attn_implementation="eager")
        m = m.double().eval()
        with torch.no_grad():  # biases and norms start at zero / one: make every parameter matter
            for p in m.parameters():
                p.add_(0.05 * torch.randn_like(p))
        _CACHE[arch] = m
    return _CACHE[arch]


def _x():
    return torch.randint(1, V, (2, T), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", ARCHS)
def test_each_heads_mask_is_exactly_what_its_output_depends_on_and_the_masks_partition_the_attention(arch):
    m, x, layer = _model(arch), _x(), 1
    n, n_kv, dh = hf_attention_shape(m, layer)
    want_kv = {"falcon_gqa": 2, "falcon_new_mqa": 1, "falcon_mqa": 1}.get(arch, 4)
    assert (n, n_kv, dh) == (4, want_kv, 4)
    group = n // n_kv
    attn, out_proj, _, _ = _LAYOUT[arch.split("_")[0]]
    oname = f"{attn}.{out_proj}"
    params = {k: v.detach() for k, v in m.named_parameters()}
    anames = [k for k in params if k.startswith(attn + ".")]
    onames = [k for k in anames if k.startswith(oname + ".")]
    inames = [k for k in anames if k not in onames]
    assert onames and inames and any(k.endswith("bias") for k in inames)

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

    with torch.no_grad():
        z0, o0 = run_at_out_proj(m, params, oname, x)
    count = {k: torch.zeros(params[k].shape, dtype=torch.int64) for k in anames}
    for h in range(n):
        own = hf_component_masks(m, f"blocks.{layer}.attn.head.{h}")
        full = hf_component_masks(m, f"blocks.{layer}.attn.head.{h}", include_shared_kv=True)
        assert set(own) <= set(anames) and set(full) <= set(anames)
        for k in inames:
            sel = full.get(k, torch.zeros_like(count[k], dtype=torch.bool))
            assert not bool((support[h][k] & ~sel).any()), (h, k)  # nothing moves z_h outside its mask
            silent = sel & ~support[h][k]
            if silent.any():  # a key bias: softmax(q.(k + b)) does not depend on b; nothing else
                assert "bias" in k, (h, k, silent.nonzero())
            assert int(sel.sum()) == 0 or bool(support[h][k].any()), (h, k)
        for k, sel in own.items():
            count[k] += sel.long()
        check_head_moves_alone(m, params, own, full, h, (n, n_kv, dh), oname, onames, x, z0, o0)
    kv_names = [f"blocks.{layer}.attn.kv_head.{g}" for g in range(n_kv)] if n_kv < n else []
    assert [c for c in hf_components(m) if c.startswith(f"blocks.{layer}.attn.kv_head.")] == kv_names
    for g, c in enumerate(kv_names):
        mk = hf_component_masks(m, c)
        for k, sel in mk.items():
            count[k] += sel.long()
        with torch.no_grad():
            z1, _ = run_at_out_proj(m, perturbed(params, mk, seed=50 + g), oname, x)
        assert changed_heads(z0, z1, n, dh) == list(range(g * group, (g + 1) * group)), g
    if n_kv == n:
        with pytest.raises(ValueError, match="no shared key/value heads"):
            hf_component_masks(m, f"blocks.{layer}.attn.kv_head.0")
    whole = hf_component_masks(m, f"blocks.{layer}.attn")
    assert set(whole) == set(anames)
    for k in anames:
        assert int(count[k].max()) <= 1, k  # no entry in two masks
        assert bool(whole[k].all()), k
        # in no mask: the output bias only
        assert bool((count[k] == 1).all()) or (k in onames and k.endswith("bias")), k


@pytest.mark.parametrize("arch", ARCHS)
def test_the_attention_the_mlp_and_the_norms_partition_a_layer(arch):
    m = _model(arch)
    family = arch.split("_")[0]
    attn, _, mlp, norms = _LAYOUT[family]
    layer = attn.rsplit(".", 1)[0]
    if norms is None:  # Falcon: the norms the layer was built with
        mods = dict(m.get_submodule(layer).named_children())
        norms = (
            ("ln_attn", "ln_mlp")
            if "ln_attn" in mods
            else ("input_layernorm",)
            + (("post_attention_layernorm",) if "post_attention_layernorm" in mods else ())
        )
    assert norms == {
        "falcon_mqa": ("input_layernorm",),
        "falcon_mha": ("input_layernorm", "post_attention_layernorm"),
    }.get(arch, norms)
    params = dict(m.named_parameters())
    in_layer = {k for k in params if k.startswith(layer + ".")}
    by_module = {
        "attn": {k for k in in_layer if k.startswith(attn + ".")},
        "mlp": {k for k in in_layer if any(k.startswith(f"{layer}.{s}.") for s in mlp)},
    }
    for i, nm in enumerate(norms):
        by_module[f"ln{i + 1}"] = {k for k in in_layer if k.startswith(f"{layer}.{nm}.")}
    assert set().union(*by_module.values()) == in_layer
    assert sum(len(v) for v in by_module.values()) == len(in_layer)  # no parameter in two modules
    for part, want in by_module.items():
        masks = hf_component_masks(m, f"blocks.1.{part}")
        assert set(masks) == want and all(bool(v.all()) for v in masks.values()), part
    whole = hf_component_masks(m, "blocks.1")
    assert set(whole) == in_layer
    if len(norms) == 1:
        with pytest.raises(ValueError, match="blocks.1.ln2"):
            hf_component_masks(m, "blocks.1.ln2")
    with pytest.raises(ValueError, match="out of range"):
        hf_component_masks(m, "blocks.1.attn.head.4")
    with pytest.raises(ValueError, match="out of range"):
        hf_component_masks(m, "blocks.2.mlp")


@pytest.mark.parametrize("arch", ["opt", "bloom", "falcon_gqa"])
def test_component_masks_gives_these_masks_for_the_unconverted_model(arch):
    m = _model(arch)
    for c in hf_components(m):
        got, want = component_masks(m, c), hf_component_masks(m, c)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), c
    heads = [c for c in hf_components(m) if ".attn.head." in c]
    assert len(heads) == 2 * 4


def _loss_grads(model, x):
    model.zero_grad()
    out = model(x)
    logits = out.logits if hasattr(out, "logits") else out
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)
    )
    nll.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return grads


# Falcon's old ALiBi layout is not converted (its scaled ALiBi bias); the others are, by code of their own
@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "falcon_mha"])
def test_each_components_masked_gradient_is_the_converted_models(arch):
    """The converter rearranges the parameters (splits the fused rows, transposes) without changing them, so the
    squared norm of the loss gradient over a component's entries is the same on the unconverted model (these
    masks) and on the converted one (its own component masks), component by component."""
    from pypattern import from_hf
    from pypattern.models import list_components

    hf, x = _model(arch), _x()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tf = from_hf(hf).double()
    comps = hf_components(hf)
    assert comps == list_components(tf)
    comps += ["blocks.0.ln1", "blocks.1.attn", "ln_final"] + ([] if "unembed" in comps else ["unembed"])
    gh, gt = _loss_grads(hf, x), _loss_grads(tf, x)
    for c in comps:
        a = sum(float((gh[n] * mk).pow(2).sum()) for n, mk in hf_component_masks(hf, c).items())
        b = sum(float((gt[n] * mk).pow(2).sum()) for n, mk in component_masks(tf, c).items())
        assert b > 0 and a == pytest.approx(b, rel=1e-10), c
