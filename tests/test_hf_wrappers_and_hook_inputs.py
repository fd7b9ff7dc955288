"""Hugging Face models used as they are, checked against plain forward hooks on their own modules:

* a head's mask moves that head's output (the output projection's input) and no other head's, in every layout
  (GPT-2's fused Conv1D, GPT-NeoX's per-head fused rows, GPT-BigCode's multi-query rows, Phi-3's fused grouped rows,
  Llama's split grouped projections with biases, Gemma's multi-query); a shared key/value head moves exactly the
  heads of its group;
* the hook points see what forward hooks on the model's modules see with left padding, position ids, a key/value
  cache, under ``no_grad`` and ``inference_mode``, in float32, float16 and bfloat16;
* wrappers holding the model unchanged (``nn.DataParallel``, a PEFT-style ``.base_model``) hook, mask and sample as
  the model inside; a wrapper with parameters of its own is refused by name;
* a hook point on a module whose input or output is not a tensor is refused by name.
"""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import pypattern as pp
from pypattern.models.hf import HAS_TRANSFORMERS, hooked_hf
from pypattern.models.hf_masks import hf_attention_shape, hf_component_masks, is_hf_model
from pypattern.models.hooks import HookedModule

pytestmark = [
    pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed"),
    pytest.mark.usefixtures("one_thread"),
]

V, T = 31, 7


def _config(arch):
    import transformers as tr

    common = dict(vocab_size=V, max_position_embeddings=16, num_hidden_layers=2, intermediate_size=20)
    gpt = dict(vocab_size=V, n_positions=16, n_embd=24, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
               attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)  # fmt: skip
    return {
        "gpt2": lambda: tr.GPT2Config(**gpt),
        "bigcode": lambda: tr.GPTBigCodeConfig(**gpt, multi_query=True),
        "neox": lambda: tr.GPTNeoXConfig(**common, hidden_size=24, num_attention_heads=4, rotary_pct=0.5,
                                         use_parallel_residual=True, bos_token_id=0, eos_token_id=0),
        "neox_seq": lambda: tr.GPTNeoXConfig(**common, hidden_size=24, num_attention_heads=4, rotary_pct=0.5,
                                             use_parallel_residual=False, bos_token_id=0, eos_token_id=0),
        "llama": lambda: tr.LlamaConfig(**common, hidden_size=24, num_attention_heads=6, num_key_value_heads=2,
                                        attention_bias=True, tie_word_embeddings=False),
        "qwen2": lambda: tr.Qwen2Config(**common, hidden_size=24, num_attention_heads=4, num_key_value_heads=2),
        "phi3": lambda: tr.Phi3Config(**common, hidden_size=24, num_attention_heads=4, num_key_value_heads=2,
                                      pad_token_id=0, bos_token_id=0, eos_token_id=0),
        "gemma": lambda: tr.GemmaConfig(**common, hidden_size=20, num_attention_heads=3, num_key_value_heads=1,
                                        head_dim=6),
        "gpt_neo": lambda: tr.GPTNeoConfig(vocab_size=V, hidden_size=24, num_layers=2, num_heads=4,
                                           intermediate_size=20, attention_types=[[["global", "local"], 1]],
                                           window_size=3, max_position_embeddings=16, bos_token_id=0,
                                           eos_token_id=0),
        "phi": lambda: tr.PhiConfig(**common, hidden_size=32, num_attention_heads=4, resid_pdrop=0.0,
                                    embd_pdrop=0.0),
    }[arch]()  # fmt: skip


# the module whose input is the heads' outputs, head after head
_OUT = {
    "gpt2": "transformer.h.{l}.attn.c_proj",
    "gpt_bigcode": "transformer.h.{l}.attn.c_proj",
    "gpt_neo": "transformer.h.{l}.attn.attention.out_proj",
    "gpt_neox": "gpt_neox.layers.{l}.attention.dense",
    "phi": "model.layers.{l}.self_attn.dense",
}


def _build(arch, dtype=torch.float64, seed=0):
    import transformers as tr

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = tr.AutoModelForCausalLM.from_config(_config(arch), attn_implementation="eager").to(dtype).eval()
    with torch.no_grad():  # biases and norms start at zero / one: make every parameter matter
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def _tokens(seed=0, batch=2):
    return torch.randint(1, V, (batch, T), generator=torch.Generator().manual_seed(seed))


def _heads_in(m, x, layer):
    """The output projection's input of ``layer`` ``(batch, pos, n_heads, d_head)``, read by a forward pre-hook."""
    n, _, dh = hf_attention_shape(m, layer)
    seen = {}
    path = _OUT.get(m.config.model_type, "model.layers.{l}.self_attn.o_proj").format(l=layer)
    h = m.get_submodule(path).register_forward_pre_hook(lambda mod, a: seen.__setitem__("z", a[0].detach()))
    try:
        with torch.no_grad():
            m(x)
    finally:
        h.remove()
    return seen["z"].reshape(*seen["z"].shape[:-1], n, dh)


def _moved_heads(m, masks, x, layer, seed=3):
    """How much each head's output moves when the masked entries get noise ``(n_heads,)``."""
    before = _heads_in(m, x, layer)
    g = torch.Generator().manual_seed(seed)
    saved = {n: p.detach().clone() for n, p in m.named_parameters()}
    try:
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n in masks:
                    p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype) * masks[n])
        after = _heads_in(m, x, layer)
    finally:
        with torch.no_grad():
            for n, p in m.named_parameters():
                p.copy_(saved[n])
    return (after - before).abs().amax(dim=(0, 1, 3))


@pytest.mark.parametrize("arch", ["gpt2", "bigcode", "neox", "llama", "phi3", "gemma", "gpt_neo", "phi"])
def test_a_heads_mask_moves_that_heads_output_and_no_other(arch):
    m = _build(arch)
    x = _tokens(1)
    layer = 1
    n, n_kv, _ = hf_attention_shape(m, layer)
    for h in range(n):
        moved = _moved_heads(m, hf_component_masks(m, f"blocks.{layer}.attn.head.{h}"), x, layer)
        assert moved[h] > 1e-4, (h, moved)
        assert torch.all(moved[torch.arange(n) != h] == 0), (h, moved)
    group = n // n_kv
    for g in range(n_kv if n_kv < n else 0):  # a shared key/value head moves the heads of its group only
        moved = _moved_heads(m, hf_component_masks(m, f"blocks.{layer}.attn.kv_head.{g}"), x, layer)
        own = (torch.arange(n) // group) == g
        assert torch.all(moved[own] > 1e-4) and torch.all(moved[~own] == 0), (g, moved)
    # nothing of layer 1's head reaches layer 0
    moved0 = _moved_heads(m, hf_component_masks(m, f"blocks.{layer}.attn.head.0"), x, 0)
    assert torch.all(moved0 == 0)


def _seen_by_forward_hooks(m, x, **kw):
    """Residual-stream values read by forward hooks on the model's own modules, and the logits."""
    mt = m.config.model_type
    if mt in ("gpt2", "gpt_bigcode"):
        layers, a, f = m.transformer.h, "attn", "mlp"
    elif mt == "gpt_neox":
        layers, a, f = m.gpt_neox.layers, "attention", "mlp"
    else:
        layers, a, f = m.model.layers, "self_attn", "mlp"
    seen, handles = {}, []

    def first(o):
        return (o[0] if isinstance(o, tuple) else o).detach().clone()

    for i, blk in enumerate(layers):
        handles += [
            blk.register_forward_pre_hook(
                lambda mod, args, kwargs, i=i: seen.__setitem__(
                    f"blocks.{i}.hook_resid_pre", first(args[0] if args else kwargs["hidden_states"])
                ),
                with_kwargs=True,
            ),
            blk.register_forward_hook(
                lambda mod, args, o, i=i: seen.__setitem__(f"blocks.{i}.hook_resid_post", first(o))
            ),
            getattr(blk, a).register_forward_hook(
                lambda mod, args, o, i=i: seen.__setitem__(f"blocks.{i}.hook_attn_out", first(o))
            ),
            getattr(blk, f).register_forward_hook(
                lambda mod, args, o, i=i: seen.__setitem__(f"blocks.{i}.hook_mlp_out", first(o))
            ),
        ]
    try:
        out = m(x, **kw)
    finally:
        for h in handles:
            h.remove()
    return out, seen


@pytest.mark.parametrize("arch", ["gpt2", "neox", "neox_seq", "llama", "bigcode"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_hook_points_see_what_forward_hooks_see_with_padding_positions_and_a_cache(arch, dtype):
    m = _build(arch, dtype)
    hm = hooked_hf(m)
    x = _tokens(2, 3)
    mask = torch.ones_like(x)
    mask[0, :3] = 0  # left padding
    mask[1, :1] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cases = [
        (torch.no_grad, dict(attention_mask=mask)),
        (torch.inference_mode, dict(attention_mask=mask, position_ids=pos)),
        (torch.no_grad, {}),
    ]
    for ctx, kw in cases:
        with ctx():
            want, seen = _seen_by_forward_hooks(m, x, use_cache=False, **kw)
            got, cache = hm.run_with_cache(x, **kw)
        assert torch.equal(got, want.logits), kw
        assert len(seen) == 8
        for name, v in seen.items():
            assert torch.equal(cache[name], v), (kw, name)
        if "attention_mask" in kw:  # the padding matters: the padded rows' logits differ from the unpadded
            assert not torch.equal(got[0, 3:], hm(x)[0, 3:])
    # a key/value cache filled by the model: the hooked forward of the rest equals the model's, and the whole
    with torch.no_grad():
        full = m(x, attention_mask=mask).logits
        past = m(x[:, :4], attention_mask=mask[:, :4], use_cache=True).cache
        rest, cache = hm.run_with_cache(x[:, 4:], attention_mask=mask, cache=past, use_cache=True)
    tol = 0 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(rest, full[:, 4:], rtol=tol, atol=tol if tol else 1e-5)
    assert cache["blocks.1.hook_resid_post"].shape[:2] == (3, 3)


class _DataParallelLike(nn.Module):
    """A wrapper holding the model as ``.module`` (``nn.DataParallel`` / ``DistributedDataParallel``'s spelling)."""

    def __init__(self, lm):
        super().__init__()
        self.module = lm

    def forward(self, *a, **k):
        return self.module(*a, **k)


class _PeftLike(nn.Module):
    """A PEFT-style wrapper: ``.base_model`` (a tuner) holding the causal LM as ``.model``, and attribute reads
    forwarded to it, as ``peft.PeftModel`` does (so ``wrapper.config`` is the model's)."""

    def __init__(self, lm, own_parameter=False):
        super().__init__()
        self.base_model = nn.Module()
        self.base_model.model = lm
        if own_parameter:  # a prompt encoder, say
            self.prompt = nn.Parameter(torch.zeros(3, dtype=torch.float64))

    def forward(self, *a, **k):
        return self.base_model.model(*a, **k)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["base_model"].model, name)


@pytest.mark.parametrize(
    "wrap, prefix",
    [
        (nn.DataParallel, "module."),
        (_DataParallelLike, "module."),
        (_PeftLike, "base_model.model."),
    ],
    ids=["DataParallel", "module", "peft"],
)
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_wrapped_model_hooks_masks_and_samples_as_the_model_inside(arch, wrap, prefix):
    m = _build(arch)
    w = wrap(m)
    x = _tokens(3)
    assert is_hf_model(w)
    got, cache = hooked_hf(w).run_with_cache(x)
    with torch.no_grad():
        want, seen = _seen_by_forward_hooks(m, x)
    assert torch.equal(got, want.logits)
    for name, v in seen.items():
        assert torch.equal(cache[name], v), name
    # a patch through the wrapper's hook points equals one written with a forward hook on the model's layer
    delta = torch.randn(m.config.hidden_size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    patched = hooked_hf(w).run_with_hooks(
        x, fwd_hooks=[("blocks.1.hook_resid_pre", lambda a, hook: a + delta)]
    )
    layers = m.transformer.h if arch == "gpt2" else m.model.layers
    h = layers[1].register_forward_pre_hook(lambda mod, args: (args[0] + delta, *args[1:]))
    try:
        with torch.no_grad():
            torch.testing.assert_close(patched, m(x).logits, rtol=0, atol=0)
    finally:
        h.remove()
    # masks named as the wrapper's parameters, selecting the entries the model's own masks select
    names = dict(w.named_parameters())
    for comp in ("blocks.1.attn.head.2", "blocks.0.mlp", "embed"):
        inner, outer = hf_component_masks(m, comp), hf_component_masks(w, comp)
        assert set(outer) == {prefix + n for n in inner} and set(outer) <= set(names), comp
        assert all(torch.equal(outer[prefix + n], t) for n, t in inner.items()), comp
        via = pp.component_masks(w, comp)
        assert set(via) == set(outer) and all(torch.equal(via[n], t) for n, t in outer.items()), comp
    # the estimators on the wrapper: the same chains as on the model (the same parameters, in the same order)
    data = [_tokens(4, 4), _tokens(5, 4)]
    kw = dict(num_chains=1, num_draws=2, num_burnin_steps=1, step_size=1e-3, localization=10.0, seed=4)
    comps = ["blocks.1.attn.head.2", "blocks.0.mlp"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = pp.susceptibilities(m, data, x, comps, **kw).chi
        res = pp.susceptibilities(w, data, x, comps, **kw).chi
    assert np.abs(ref).max() > 0
    np.testing.assert_allclose(res, ref, rtol=1e-12, atol=0)


def test_a_wrapper_with_parameters_of_its_own_is_refused_by_name():
    m = _build("llama")
    w = _PeftLike(m, own_parameter=True)
    for f in (hooked_hf, lambda w: hf_component_masks(w, "blocks.0.attn.head.1")):
        with pytest.raises(
            ValueError, match=r"_PeftLike wraps LlamaForCausalLM .*parameters outside it \(prompt\)"
        ):
            f(w)


def test_a_hook_point_on_a_module_without_a_tensor_is_refused_by_name():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return {"hidden": self.lin(x)}

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block, self.out = Block(), nn.Linear(4, 3)

        def forward(self, x):
            return self.out(self.block(x)["hidden"])

    net = Net()
    hm = HookedModule(net, {"blocks.0.hook_resid_post": "block", "hook_out_in": "out:input"}, n_layers=1)
    x = torch.randn(2, 4)
    with pytest.raises(
        TypeError, match=r"hook point 'blocks.0.hook_resid_post': the module's output is a dict"
    ):
        hm.run_with_cache(x)
    # the hook point on the tensor sees it, and a replacement there reaches the output
    out, cache = hm.run_with_cache(x, names_filter="hook_out_in")
    torch.testing.assert_close(cache["hook_out_in"], net.block.lin(x))
    zero = hm.run_with_hooks(x, fwd_hooks=[("hook_out_in", lambda a, hook: torch.zeros_like(a))])
    torch.testing.assert_close(zero, net.out.bias.expand(2, 3).detach())
    assert torch.equal(hm(x), net(x))  # nothing attached: the module as it is
    with pytest.raises(TypeError, match=r"hook_points\['h'\]=3 is not valid"):
        HookedModule(net, {"h": 3})


def test_masks_of_a_wrapped_adapter_are_named_as_the_wrappers_parameters():
    m = _build("llama")
    w = nn.DataParallel(hooked_hf(m))
    names = dict(w.named_parameters())
    assert is_hf_model(w)
    for comp in ("blocks.1.attn.head.2", "blocks.1.attn.kv_head.0", "blocks.0.mlp"):
        inner, outer = hf_component_masks(m, comp), hf_component_masks(w, comp)
        assert set(outer) == {"module.module.model." + n for n in inner} and set(outer) <= set(names), comp
        assert all(torch.equal(outer["module.module.model." + n], t) for n, t in inner.items()), comp
