"""The unconverted Hugging Face adapter (``pp.hooked_hf``) and its component masks (``pp.component_masks`` on the
Hugging Face model), family by family, in float64, against computations written here with plain torch forward
hooks on the model's own modules and ``torch.func.functional_call``:

* the residual hook points equal ``output_hidden_states`` and the attention / MLP modules' outputs, with and
  without a left-padded attention mask; a replacement of ``resid_pre`` at one position changes the logits exactly
  as the same replacement made by a forward pre-hook on the layer;
* zeroing the entries of a head's mask equals zeroing that head's slice of the output projection's input (every
  head, grouped-query and fused layouts); scaling a component's entries by 1 is the model bit for bit, and the
  gradient of the logits with respect to that scale equals central finite differences;
* a function that edits ``resid_mid`` in place is applied, as on every other hook point;
* the hooks are gone after a context whose hook function raises, the model's own outputs are unchanged, and a
  forward with functions attached after ``remove_hooks()`` is refused rather than run without them;
* the families the adapter does not cover (OPT, BLOOM, Falcon) are refused by name.
"""

import warnings

import pytest
import torch
from torch.func import functional_call

import pypattern as pp
from pypattern.models.hf import HAS_TRANSFORMERS, hooked_hf
from pypattern.models.hf_masks import hf_attention_shape

pytestmark = [
    pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed"),
    pytest.mark.usefixtures("one_thread"),
]

V, T = 31, 7
MOE = ("mixtral", "qwen2_moe")


def _config(arch):
    import transformers as tr

    c = dict(vocab_size=V, max_position_embeddings=16, num_hidden_layers=2, intermediate_size=20)
    gpt = dict(vocab_size=V, n_positions=16, n_embd=24, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
               attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)  # fmt: skip
    return {
        "gpt2": lambda: tr.GPT2Config(**gpt),
        "gpt_neo": lambda: tr.GPTNeoConfig(
            vocab_size=V, hidden_size=24, num_layers=2, num_heads=4, intermediate_size=20, window_size=3,
            attention_types=[[["global", "local"], 1]], max_position_embeddings=16, bos_token_id=0, eos_token_id=0,
        ),  # fmt: skip
        "gptj": lambda: tr.GPTJConfig(**gpt, rotary_dim=4),
        "neox": lambda: tr.GPTNeoXConfig(**c, hidden_size=24, num_attention_heads=4, rotary_pct=0.5,
                                         use_parallel_residual=True, bos_token_id=0, eos_token_id=0),
        "llama": lambda: tr.LlamaConfig(**c, hidden_size=24, num_attention_heads=6, num_key_value_heads=2,
                                        attention_bias=True, tie_word_embeddings=False),
        "mistral": lambda: tr.MistralConfig(**c, hidden_size=24, num_attention_heads=4, num_key_value_heads=2,
                                            head_dim=8, sliding_window=4),
        "qwen2": lambda: tr.Qwen2Config(**c, hidden_size=24, num_attention_heads=4, num_key_value_heads=2),
        "qwen3": lambda: tr.Qwen3Config(**c, hidden_size=24, num_attention_heads=4, num_key_value_heads=2,
                                        head_dim=8),
        "gemma": lambda: tr.GemmaConfig(**c, hidden_size=20, num_attention_heads=3, num_key_value_heads=1,
                                        head_dim=6),
        "gemma2": lambda: tr.Gemma2Config(**c, hidden_size=24, num_attention_heads=4, num_key_value_heads=2,
                                          head_dim=8, sliding_window=3, query_pre_attn_scalar=10,
                                          attn_logit_softcapping=3.0, final_logit_softcapping=5.0),
        "phi": lambda: tr.PhiConfig(**c, hidden_size=32, num_attention_heads=4, resid_pdrop=0.0, embd_pdrop=0.0),
        "phi3": lambda: tr.Phi3Config(**c, hidden_size=24, num_attention_heads=4, num_key_value_heads=2,
                                      pad_token_id=0, bos_token_id=0, eos_token_id=0),
        "stablelm": lambda: tr.StableLmConfig(**c, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                              use_qkv_bias=True, qk_layernorm=True),
        "starcoder2": lambda: tr.Starcoder2Config(**c, hidden_size=24, num_attention_heads=4, num_key_value_heads=2,
                                                  sliding_window=4, bos_token_id=0, eos_token_id=0),
        "olmo": lambda: tr.OlmoConfig(**c, hidden_size=24, num_attention_heads=4, num_key_value_heads=2,
                                      clip_qkv=0.5, pad_token_id=0, bos_token_id=None, eos_token_id=None),
        "bigcode": lambda: tr.GPTBigCodeConfig(**gpt, multi_query=True),
        "mixtral": lambda: tr.MixtralConfig(**{**c, "intermediate_size": 16}, hidden_size=24, num_attention_heads=4,
                                            num_key_value_heads=2, num_local_experts=3, num_experts_per_tok=2),
        "qwen2_moe": lambda: tr.Qwen2MoeConfig(**c, hidden_size=24, num_attention_heads=4, num_key_value_heads=2,
                                               num_experts=3, num_experts_per_tok=2, moe_intermediate_size=12,
                                               shared_expert_intermediate_size=8),
        "opt": lambda: tr.OPTConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                    num_attention_heads=2, word_embed_proj_dim=16, max_position_embeddings=16),
        "bloom": lambda: tr.BloomConfig(vocab_size=V, hidden_size=16, n_layer=1, n_head=2),
        "falcon": lambda: tr.FalconConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                          new_decoder_architecture=True, num_kv_heads=2),
    }[arch]()  # fmt: skip


ARCHS = [
    "gpt2", "gpt_neo", "gptj", "neox", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi", "phi3",
    "stablelm", "starcoder2", "olmo", "bigcode", "mixtral", "qwen2_moe",
]  # fmt: skip

# written out here for each family: (decoder layers, the modules whose outputs are the attention's and the MLP's
# writes to the residual stream, the attention's output projection: its input is the heads' outputs, head after
# head), relative to the layers
_PARTS = {
    "gpt2": ("transformer.h", "attn", "mlp", "attn.c_proj"),
    "bigcode": ("transformer.h", "attn", "mlp", "attn.c_proj"),
    "gpt_neo": ("transformer.h", "attn", "mlp", "attn.attention.out_proj"),
    "gptj": ("transformer.h", "attn", "mlp", "attn.out_proj"),
    "neox": ("gpt_neox.layers", "attention", "mlp", "attention.dense"),
    "phi": ("model.layers", "self_attn", "mlp", "self_attn.dense"),
    "gemma2": ("model.layers", "post_attention_layernorm", "post_feedforward_layernorm", "self_attn.o_proj"),
}
_PARALLEL = ("gptj", "neox", "phi")  # attention and MLP read the layer's input: no resid_mid
_CACHE: dict = {}


def _parts(arch):
    return _PARTS.get(arch, ("model.layers", "self_attn", "mlp", "self_attn.o_proj"))


def _model(arch):
    if arch not in _CACHE:
        import transformers as tr

        # the experts of a mixture run one matmul per expert ("eager"): the grouped matmul has no float64 kernel
        kw = dict(experts_implementation="eager") if arch in MOE else {}
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = tr.AutoModelForCausalLM.from_config(_config(arch), attn_implementation="eager", **kw)
        m = m.double().eval()
        with torch.no_grad():  # biases and norms start at zero / one: make every parameter matter
            for p in m.parameters():
                p.add_(0.05 * torch.randn_like(p))
        _CACHE[arch] = m
    return _CACHE[arch]


def _tokens(seed=1):
    return torch.randint(1, V, (2, T), generator=torch.Generator().manual_seed(seed))


def _left_padded():
    am = torch.ones(2, T, dtype=torch.long)
    am[0, :2] = 0
    return am


def _right_padded():
    am = torch.ones(2, T, dtype=torch.long)
    am[0, -2:] = 0
    return am


def _first(o):
    return o[0] if isinstance(o, tuple) else o


def _same(a, b):
    """Equal bit for bit, NaN equal to NaN (a left-padded query row with every key masked is NaN in some
    families' own forward)."""
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _run_pre_hooked(arch, m, layer, fn, x, mask):
    """The model's logits with ``fn`` replacing the layer's input hidden states (a plain forward pre-hook)."""

    def hook(mod, args, kwargs):
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}

    h = m.get_submodule(f"{_parts(arch)[0]}.{layer}").register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            return m(x, attention_mask=mask).logits
    finally:
        h.remove()


@pytest.mark.parametrize("arch", ARCHS)
def test_hook_points_equal_plain_hooks_and_a_resid_pre_patch_equals_a_plain_pre_hook(arch):
    m = _model(arch)
    hm = hooked_hf(m)
    x = _tokens()
    layers_path, attn_w, mlp_w, _ = _parts(arch)
    layers = m.get_submodule(layers_path)
    for mask in (None, _left_padded()):
        seen, handles = {}, []
        for i, blk in enumerate(layers):
            for site, mod in (("attn_out", attn_w), ("mlp_out", mlp_w)):
                handles.append(
                    blk.get_submodule(mod).register_forward_hook(
                        lambda mod, a, o, k=f"blocks.{i}.hook_{site}", seen=seen: seen.__setitem__(
                            k, _first(o).clone()
                        )
                    )
                )
            handles.append(
                blk.register_forward_hook(
                    lambda mod, a, o, k=f"blocks.{i}.hook_resid_post", seen=seen: seen.__setitem__(
                        k, _first(o).clone()
                    )
                )
            )
        try:
            with torch.no_grad():
                out = m(x, attention_mask=mask, output_hidden_states=True)
        finally:
            for h in handles:
                h.remove()
        with torch.no_grad():
            logits, cache = hm.run_with_cache(x, attention_mask=mask)
        assert _same(logits, out.logits)
        hs = out.hidden_states
        for layer in range(len(layers)):
            assert _same(cache[f"blocks.{layer}.hook_resid_pre"], hs[layer]), layer
            for site in ("attn_out", "mlp_out", "resid_post"):
                name = f"blocks.{layer}.hook_{site}"
                assert _same(cache[name], seen[name]), name
            if layer + 1 < len(layers):
                assert _same(cache[f"blocks.{layer}.hook_resid_post"], hs[layer + 1])
            assert (f"blocks.{layer}.hook_resid_mid" in cache) == (arch not in _PARALLEL)
        assert _same(cache["ln_final.hook_normalized"], hs[-1])

        # replace resid_pre of layer 1 at position 4, through the hook point and by a plain pre-hook
        new = torch.randn(
            2, m.config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(2)
        )

        def put(h, new=new):
            h = h.clone()
            h[:, 4] = new
            return h

        with torch.no_grad():
            got = hm.run_with_hooks(
                x, attention_mask=mask, fwd_hooks=[("blocks.1.hook_resid_pre", lambda a, hook: put(a))]
            )
        want = _run_pre_hooked(arch, m, 1, put, x, mask)
        assert _same(got, want)
        rows = slice(None) if mask is None else 1  # the unpadded row
        assert not torch.equal(got[rows, 4:], out.logits[rows, 4:])
        assert torch.equal(got[rows, :4], out.logits[rows, :4])  # causal: not before the position
    hm.remove_hooks()


@pytest.mark.parametrize("arch", ARCHS)
def test_zeroing_a_heads_masked_entries_equals_zeroing_its_slice_of_the_output_projection_input(arch):
    m = _model(arch)
    layer, x, mask = 1, _tokens(3), _left_padded()
    n_heads, _, d_head = hf_attention_shape(m, layer)
    params = dict(m.named_parameters())
    proj = m.get_submodule(f"{_parts(arch)[0]}.{layer}.{_parts(arch)[3]}")
    for h in range(n_heads):
        masks = pp.component_masks(m, f"blocks.{layer}.attn.head.{h}")
        assert masks
        zeroed = {n: p * (~masks[n]).to(p.dtype) if n in masks else p for n, p in params.items()}
        with torch.no_grad():
            got = functional_call(m, zeroed, (x,), {"attention_mask": mask}).logits

        def zero(mod, args, h=h):
            z = args[0].clone()
            z[..., h * d_head : (h + 1) * d_head] = 0
            return (z, *args[1:])

        handle = proj.register_forward_pre_hook(zero)
        try:
            with torch.no_grad():
                want = m(x, attention_mask=mask).logits
        finally:
            handle.remove()
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12, equal_nan=True, msg=f"head {h}")
        with torch.no_grad():
            assert not torch.allclose(want[1], m(x, attention_mask=mask).logits[1])  # the head mattered


# (step, relative tolerance) of the finite differences. Most families compute part of a float64 forward in float32
# (the Llama family's RMSNorms, eager attention softmaxes, GPT-Neo's and GPT-J's query-key products): a difference
# quotient sees that rounding, about 1e-7 of the logits over the step. GPT-2 stays in float64.
_FD = {"gpt2": (1e-6, 1e-6)}
_FD_FLOAT32_PARTS = (1e-3, 5e-3)


@pytest.mark.parametrize("arch", ARCHS)
def test_masks_scaled_by_one_are_the_model_and_their_gradients_equal_finite_differences(arch):
    m = _model(arch)
    x, mask = _tokens(4), _right_padded()  # every query row has a key to read: no NaN rows
    n_heads, n_kv, _ = hf_attention_shape(m, 1)
    comps = ["blocks.1.attn.head.0", f"blocks.0.attn.head.{n_heads - 1}", "blocks.0.mlp", "embed"]
    if n_kv < n_heads:
        comps.append("blocks.1.attn.kv_head.0")
    if arch in MOE:
        comps.append("blocks.1.mlp.expert.1")
    masks = [pp.component_masks(m, c) for c in comps]
    params = dict(m.named_parameters())
    one = torch.ones((), dtype=torch.float64)

    def logits(scale):
        p = dict(params)
        for i, mk in enumerate(masks):
            for n, sel in mk.items():
                p[n] = p[n] * torch.where(sel, scale[i], one)
        return functional_call(m, p, (x,), {"attention_mask": mask}).logits

    with torch.no_grad():
        ref = m(x, attention_mask=mask).logits
    s = torch.ones(len(comps), dtype=torch.float64, requires_grad=True)
    out = logits(s)
    assert _same(out, ref)
    w = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    (out * w).sum().backward()
    eps, tol = _FD.get(arch, _FD_FLOAT32_PARTS)
    for i, c in enumerate(comps):
        e = torch.zeros(len(comps), dtype=torch.float64)
        e[i] = eps
        with torch.no_grad():
            fd = ((logits(1 + e) - logits(1 - e)) * w).sum() / (2 * eps)
        assert abs(float(fd) - float(s.grad[i])) <= tol * max(1.0, abs(float(fd))), (
            c,
            float(fd),
            float(s.grad[i]),
        )
        assert abs(float(fd)) > 1e-6, c  # the component matters
    with torch.no_grad():
        assert _same(m(x, attention_mask=mask).logits, ref)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "mixtral"])
def test_an_in_place_edit_of_resid_mid_is_applied(arch):
    """``x[:, p] = v`` in a hook function (returning ``x`` or nothing: TransformerLens' patching idiom) sets the
    residual after the attention at ``p`` to ``v``, as a plain hook on the attention's write does, with gradients
    on and under ``inference_mode``."""
    m = _model(arch)
    hm = hooked_hf(m)
    x, pos = _tokens(6), 3
    layers_path, attn_w, _, _ = _parts(arch)
    block = m.get_submodule(f"{layers_path}.0")
    v = torch.randn(2, m.config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    store = {}
    h1 = block.register_forward_pre_hook(
        lambda mod, a, k: store.__setitem__("pre", a[0] if a else k["hidden_states"]), with_kwargs=True
    )

    def write(mod, args, out):
        a = _first(out).clone()
        a[:, pos] = v - store["pre"][:, pos]
        return (a, *out[1:]) if isinstance(out, tuple) else a

    h2 = block.get_submodule(attn_w).register_forward_hook(write)
    try:
        with torch.no_grad():
            want = m(x).logits
    finally:
        h1.remove()
        h2.remove()

    def edit_and_return(r, hook):
        r[:, pos] = v
        return r

    def edit_only(r, hook):
        r[:, pos] = v

    for fn in (edit_and_return, edit_only):
        got = hm.run_with_hooks(x, fwd_hooks=[("blocks.0.hook_resid_mid", fn)])
        torch.testing.assert_close(got.detach(), want, rtol=1e-12, atol=1e-12)
        with torch.inference_mode():
            got = hm.run_with_hooks(x, fwd_hooks=[("blocks.0.hook_resid_mid", fn)])
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # a function that only reads leaves the model's output bit for bit
    with torch.no_grad():
        base = m(x).logits
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            got = hm.run_with_hooks(x, fwd_hooks=[("blocks.0.hook_resid_mid", lambda r, hook: None)])
        assert torch.equal(got, base)
    hm.remove_hooks()


def _torch_hooks(m):
    return sum(len(mod._forward_hooks) + len(mod._forward_pre_hooks) for mod in m.modules())


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma2", "neox"])
def test_hooks_go_after_a_raising_context_and_the_model_is_left_as_it_was(arch):
    import transformers as tr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = tr.AutoModelForCausalLM.from_config(_config(arch), attn_implementation="eager").double().eval()
    x = _tokens(8)
    with torch.no_grad():
        ref = m(x).logits
    assert _torch_hooks(m) == 0
    hm = hooked_hf(m)

    class Boom(Exception):
        pass

    def boom(a, hook):
        raise Boom

    for name in hm.hook_names():
        with pytest.raises(Boom):
            hm.run_with_hooks(x, fwd_hooks=[(name, boom)])
        with pytest.raises(Boom), hm.hooks(fwd_hooks=[(lambda n: True, lambda a, hook: None), (name, boom)]):
            hm(x)
        with pytest.raises(Boom), hm.hooks(fwd_hooks=[(name, boom)]):
            hm.run_with_cache(x)
        assert not [n for n, hp in hm.hook_dict.items() if hp._fns], name
    # with gradient checkpointing on (train mode), a forward with functions inside the layers runs without it, and
    # the layers' flags are put back after it, also when it raises
    m.train()

    def flags():
        return {
            n: mod.gradient_checkpointing
            for n, mod in m.named_modules()
            if hasattr(mod, "gradient_checkpointing")
        }

    during = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecated name, and the adapter's warning about checkpointing
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        before = flags()
        with pytest.raises(Boom):
            hm.run_with_hooks(
                x,
                fwd_hooks=[
                    ("blocks.0.hook_resid_pre", lambda a, hook: during.update(flags())),
                    ("blocks.1.hook_attn_out", boom),
                ],
            )
        after = flags()
        m.gradient_checkpointing_disable()
    assert any(before.values()) and not any(during.values())
    assert after == before
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(x).logits, ref)
        assert torch.equal(hm(x), ref)
    n_before = _torch_hooks(m)
    hm.remove_hooks()
    assert _torch_hooks(m) < n_before
    with torch.no_grad():
        assert torch.equal(m(x).logits, ref)


def test_a_forward_with_functions_attached_after_remove_hooks_is_refused():
    """After ``remove_hooks()`` the hook points no longer fire: a cache would come back empty and a patch would not
    be applied, without a word. Such a forward raises; one without functions still runs the model."""
    m = _model("llama")
    hm = hooked_hf(m)
    x = _tokens(9)
    with torch.no_grad():
        ref = m(x).logits
    hm.remove_hooks()
    with torch.no_grad():
        assert torch.equal(hm(x), ref)
        with pytest.raises(RuntimeError, match=r"blocks\.0\.hook_resid_pre.*remove_hooks\(\)"):
            hm.run_with_hooks(x, fwd_hooks=[("blocks.0.hook_resid_pre", lambda a, hook: a * 0)])
        with pytest.raises(RuntimeError, match="remove_hooks"):
            hm.run_with_cache(x)
        assert not [n for n, hp in hm.hook_dict.items() if hp._fns]  # the context took them off again
    # a copy of the wrapper is a wrapper of its own, with its hooks on
    import copy

    copied = copy.deepcopy(hm)
    _, cache = copied.run_with_cache(x, names_filter="blocks.1.hook_resid_pre")
    assert list(cache) == ["blocks.1.hook_resid_pre"]


@pytest.mark.parametrize("arch", ["opt", "bloom", "falcon"])
def test_families_the_adapter_does_not_cover_are_refused_by_name(arch):
    from pypattern.models.convert import UnsupportedModelError

    m = _model(arch)
    mt = m.config.model_type
    with pytest.raises(UnsupportedModelError, match=rf"model_type='{mt}'.*pypattern\.from_hf"):
        hooked_hf(m)
    # their component masks are known without the adapter (tests/test_masks_audit_more_families_*.py)
    assert pp.component_masks(m, "blocks.0.mlp")


def test_a_wrapped_model_pickles_as_before_and_the_wrapper_is_refused_by_name():
    """``torch.save(model)`` (or a spawned process) pickles the Hugging Face model with the adapter's torch hooks
    on it: the loaded model computes what the model computes and carries no hook that changes its output; the
    wrapper itself, whose hook points would not fire in a pickled copy, is refused naming what to do instead."""
    import io

    import transformers as tr

    from pypattern.models.hooks import attached_hooks

    # a model of its own: transformers' output_hidden_states=True leaves a hook of its own (not picklable) behind
    m = tr.GPT2LMHeadModel(_config("gpt2")).double().eval()
    hm = hooked_hf(m)
    x = _tokens(10)
    with torch.no_grad():
        ref = m(x).logits
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, ref)
        # the original's functions do not fire from the loaded copy, nor does the copy count as hooked
        calls = []
        out = hm.run_with_hooks(x, fwd_hooks=[("blocks.0.hook_resid_pre", lambda a, hook: calls.append(1))])
        assert calls == [1] and torch.equal(out, ref)
        with hm.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda a, hook: calls.append(2))]):
            assert torch.equal(loaded(x).logits, ref)
            assert calls == [1]
            assert attached_hooks(loaded) == []
    with pytest.raises(TypeError, match=r"HookedHF is not pickled.*wrap it again"):
        torch.save(hm, io.BytesIO())
    hm.remove_hooks()


def test_the_adapter_returns_logits_whatever_return_dict_says():
    """``hooked_hf(model)(x, return_dict=False)``: the adapter's forward returns the logits either way (it read
    ``.logits`` of a tuple before), equal to the model's own."""
    import transformers

    import pypattern as pp

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=23, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    x = torch.randint(0, 23, (2, 5))
    hm = pp.hooked_hf(hf)
    with torch.no_grad():
        want = hf(x).logits
        for kw in ({}, {"return_dict": False}, {"return_dict": True}):
            torch.testing.assert_close(hm(x, **kw), want, rtol=0, atol=0)
