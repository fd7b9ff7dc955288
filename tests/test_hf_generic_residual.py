"""hooked_hf on Hugging Face causal LMs of families with no layout of their own in the adapter and no converter
(Mamba, CodeGen, Persimmon, MPT): the residual stream read off the model (generic_hf_arch), checked against the
model's own output_hidden_states, and residual-site patching against a naive loop of forward hooks written here."""

import pytest
import torch

from pypattern import activation_patching, hooked_hf
from pypattern.models.hf import HAS_TRANSFORMERS, generic_hf_arch, hf_arch
from pypattern.patching.metrics import LogitDiff

pytestmark = [
    pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed"),
    pytest.mark.usefixtures("one_thread"),
]

V = 41


def _model(kind: str):
    import transformers as tr

    torch.manual_seed(3)
    cfg = {
        "mamba": lambda: tr.MambaConfig(
            vocab_size=V, hidden_size=16, num_hidden_layers=3, state_size=4, expand=2
        ),
        "codegen": lambda: tr.CodeGenConfig(
            vocab_size=V, n_embd=24, n_layer=3, n_head=3, n_positions=32, rotary_dim=4
        ),
        "persimmon": lambda: tr.PersimmonConfig(
            vocab_size=V,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=40,
            max_position_embeddings=32,
            qk_layernorm=True,
        ),  # fmt: skip
        "mpt": lambda: tr.MptConfig(vocab_size=V, d_model=24, n_layers=3, n_heads=4, max_seq_len=32),
        # GPT-1: post-norm layers that return a list, no final norm
        "openai-gpt": lambda: tr.OpenAIGPTConfig(
            vocab_size=V, n_embd=24, n_layer=3, n_head=3, n_positions=32
        ),
        # XLNet: hidden states (pos, batch, d_model)
        "xlnet": lambda: tr.XLNetConfig(vocab_size=V, d_model=24, n_layer=3, n_head=3, d_inner=40),
    }[kind]()
    return tr.AutoModelForCausalLM.from_config(cfg).double().eval()


KINDS = ["mamba", "codegen", "persimmon", "mpt", "openai-gpt"]
BASE = {"mamba": ("backbone", "layers", "norm_f"), "codegen": ("transformer", "h", "ln_f"),
        "persimmon": ("model", "layers", "final_layernorm"), "mpt": ("transformer", "blocks", "norm_f"),
        "openai-gpt": ("transformer", "h", "")}  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
def test_hook_points_are_the_models_own_hidden_states(kind):
    model = _model(kind)
    arch = hf_arch(model)
    assert arch.generic and (arch.base, arch.layers, arch.ln_final) == BASE[kind]
    assert generic_hf_arch(model) == arch
    hm = hooked_hf(model)
    L = 3
    want = {"hook_embed"} | ({"ln_final.hook_normalized"} if BASE[kind][2] else set())
    want |= {f"blocks.{i}.hook_{s}" for i in range(L) for s in ("resid_pre", "resid_post")}
    assert set(hm.hook_dict) == want and hm.generic
    x = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(0))
    logits, cache = hm.run_with_cache(x)
    with torch.no_grad():
        out = model(input_ids=x, output_hidden_states=True, use_cache=False)
    hs = out.hidden_states
    assert len(hs) == L + 1
    torch.testing.assert_close(logits, out.logits, rtol=0, atol=0)
    # Hugging Face's hidden states: each layer's input and the final norm's output (GPT-1, which has none: the last
    # layer's output); Mamba's: each layer's output
    point = "resid_post" if kind == "mamba" else "resid_pre"
    for i in range(L):
        torch.testing.assert_close(cache[f"blocks.{i}.hook_{point}"], hs[i], rtol=0, atol=0)
    if not BASE[kind][2]:
        torch.testing.assert_close(cache[f"blocks.{L - 1}.hook_resid_post"], hs[-1], rtol=0, atol=0)
        return
    for i in range(L - 1):
        torch.testing.assert_close(
            cache[f"blocks.{i}.hook_resid_post"], cache[f"blocks.{i + 1}.hook_resid_pre"]
        )
    torch.testing.assert_close(cache["ln_final.hook_normalized"], hs[-1], rtol=0, atol=0)
    torch.testing.assert_close(cache["hook_embed"], model.get_input_embeddings()(x), rtol=0, atol=0)


def _naive(model, layer_mod, clean, corrupted, metric, pre: bool):
    """Denoising by hand: the corrupted prompts run with one position of the layer's input (``pre``) or output
    replaced by the clean run's; metric per example, grid ``(layers, positions)``."""
    layers = list(layer_mod)
    B, T = clean.shape
    saved = {}

    def grab(i):
        def fn(mod, args, kwargs, out=None):
            h = (
                (args[0] if args else kwargs["hidden_states"])
                if pre
                else (out[0] if isinstance(out, tuple | list) else out)
            )
            saved[i] = h.detach().clone()

        return fn

    hs = [
        (lay.register_forward_pre_hook(grab(i), with_kwargs=True) if pre else lay.register_forward_hook(grab(i), with_kwargs=True))
        for i, lay in enumerate(layers)
    ]  # fmt: skip
    with torch.no_grad():
        model(input_ids=clean, use_cache=False)
    for h in hs:
        h.remove()
    vals = torch.empty(B, len(layers), T, dtype=torch.float64)
    for i, lay in enumerate(layers):
        for p in range(T):

            def patch_pre(mod, args, kwargs, i=i, p=p):
                x = args[0].clone()
                x[:, p] = saved[i][:, p]
                return (x, *args[1:]), kwargs

            def patch_post(mod, args, kwargs, out, i=i, p=p):
                a = (out[0] if isinstance(out, tuple | list) else out).clone()
                a[:, p] = saved[i][:, p]
                if isinstance(out, list):  # GPT-1's layers return a list
                    return [a, *out[1:]]
                return (a, *out[1:]) if isinstance(out, tuple) else a

            h = (
                lay.register_forward_pre_hook(patch_pre, with_kwargs=True)
                if pre
                else lay.register_forward_hook(patch_post, with_kwargs=True)
            )
            with torch.no_grad():
                vals[:, i, p] = metric(model(input_ids=corrupted, use_cache=False).logits[:, -1])
            h.remove()
    return vals


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("site", ["resid_pre", "resid_post"])
def test_residual_patching_equals_a_naive_loop_of_forward_hooks(kind, site):
    model = _model(kind)
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, V, (3, 6), generator=g)
    corrupted = torch.randint(0, V, (3, 6), generator=g)
    metric = LogitDiff(torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]))
    r = activation_patching(model, site, clean, corrupted, metric=metric, quiet=True)
    base, layers, _ = BASE[kind]
    want = _naive(
        model, model.get_submodule(f"{base}.{layers}"), clean, corrupted, metric, site == "resid_pre"
    )
    assert tuple(r.values.shape) == (3, 3, 6)
    torch.testing.assert_close(r.values.double(), want, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(want[:, 0, 0], want[:, 0, 1])  # the patches differ: the loop measured something


@pytest.mark.parametrize("site", ["attn_out", "mlp_out", "z", "resid_mid"])
def test_sites_inside_a_layer_are_refused_naming_the_residual_sites(site):
    model = _model("persimmon")
    x = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(2))
    metric = LogitDiff(torch.tensor([1, 2]), torch.tensor([3, 4]))
    with pytest.raises(
        ValueError, match=r"model_type='persimmon' has no layout of its own .*sites resid_post, resid_pre"
    ):
        activation_patching(model, site, x, x.flip(0), metric=metric, quiet=True)


def test_hidden_states_laid_out_position_first_are_refused():
    """XLNet's layers carry ``(pos, batch, d_model)``: a patch at a position would index the batch; refused."""
    from pypattern.models.convert import UnsupportedModelError

    with pytest.raises(
        UnsupportedModelError, match=r"hidden states have shape \(2, 1, 24\) .*not \(batch, pos"
    ):
        hooked_hf(_model("xlnet"))


def test_layers_that_do_not_carry_one_residual_stream_are_refused():
    """A model whose layer 1 reads something other than layer 0's output (here a hook of the user's doubling it)
    has no residual stream the adapter could read: refused, naming the layer, never an approximate adapter."""
    from pypattern.models.convert import UnsupportedModelError

    model = _model("mamba")
    h = model.backbone.layers[1].register_forward_pre_hook(lambda mod, args: (2 * args[0], *args[1:]))
    try:
        with pytest.raises(
            UnsupportedModelError, match=r"do not carry one residual stream: layer 1's input is not layer 0's"
        ):
            hooked_hf(model)
    finally:
        h.remove()
    assert hooked_hf(model).generic  # as it is, the model is adapted


def test_the_final_norm_is_the_one_that_reads_the_last_layers_output():
    """``ln_final.hook_normalized`` sits on the first module of a usual norm name that runs once on the last
    layer's output, and is left out when none does."""
    import torch.nn as nn

    model = _model("codegen")
    model.transformer.norm = nn.LayerNorm(24).double()  # found first by name, but never run
    hm = hooked_hf(model)
    assert hm.arch.ln_final == "ln_f" and "ln_final.hook_normalized" in hm.hook_dict
    x = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(4))
    _, cache = hm.run_with_cache(x)
    with torch.no_grad():
        hs = model(input_ids=x, output_hidden_states=True, use_cache=False).hidden_states
    torch.testing.assert_close(cache["ln_final.hook_normalized"], hs[-1], rtol=0, atol=0)
    model = _model("codegen")
    model.transformer.ln_f = nn.Sequential(nn.Linear(24, 24).double(), nn.LayerNorm(24).double())
    model.transformer.ln_f[1].register_forward_pre_hook(lambda mod, args: None)
    hm = hooked_hf(
        model
    )  # ln_f now reads the last layer's output through a Linear first: still the module run
    assert hm.arch.ln_final == "ln_f"
    model.transformer.norm_f = model.transformer.ln_f[
        1
    ]  # the inner norm, also by a usual name: runs on another input
    del model.transformer.ln_f
    model.transformer.ln_f = nn.Sequential(nn.Linear(24, 24).double(), model.transformer.norm_f)
    hm = hooked_hf(model)
    assert hm.arch.ln_final == "ln_f"  # norm_f runs on the Linear's output: not the final norm
    assert set(hm.hook_dict) >= {"ln_final.hook_normalized", "blocks.2.hook_resid_post"}
    model = _model(
        "codegen"
    )  # ln_f reads the last layer's output shifted (a hook of the user's): no final norm
    model.transformer.ln_f.register_forward_pre_hook(lambda mod, args: (args[0] + 1,))
    hm = hooked_hf(model)
    assert hm.arch.ln_final == "" and "ln_final.hook_normalized" not in hm.hook_dict
    assert "blocks.2.hook_resid_post" in hm.hook_dict


def _first_order_by_hand(model, layer_mod, src, tgt, metric, pre: bool):
    """AtP computed independently: the layers' inputs (``pre``) or outputs on the source run, and the metric's
    gradient at them on the target run by autograd through forward hooks; ``(B, layers, pos)``."""
    layers = list(layer_mod)
    acts = {}

    def keep(i, grad: bool):
        def fn(mod, args, kwargs, out=None):
            h = (
                (args[0] if args else kwargs["hidden_states"])
                if pre
                else (out[0] if isinstance(out, tuple | list) else out)
            )
            if grad:
                h.retain_grad()
            acts[i] = h

        return fn

    def run(tokens, grad):
        hs = [
            (lay.register_forward_pre_hook(keep(i, grad), with_kwargs=True) if pre else lay.register_forward_hook(keep(i, grad), with_kwargs=True))
            for i, lay in enumerate(layers)
        ]  # fmt: skip
        try:
            with torch.enable_grad():
                emb = model.get_input_embeddings()(tokens).detach().requires_grad_(True)
                m = metric(model(inputs_embeds=emb, use_cache=False).logits[:, -1])
        finally:
            for h in hs:
                h.remove()
        return m, dict(acts)

    _, a_src = run(src, False)
    m, a_tgt = run(tgt, True)
    m.sum().backward()
    return torch.stack(
        [((a_src[i].detach() - a_tgt[i].detach()) * a_tgt[i].grad).sum(-1) for i in range(len(layers))], 1
    )


@pytest.mark.parametrize("kind", ["mamba", "persimmon", "openai-gpt"])
@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_attribution_patching_at_residual_sites_equals_autograd_through_forward_hooks(kind, direction):
    from pypattern import attribution_patching

    model = _model(kind)
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(5)
    clean = torch.randint(0, V, (3, 6), generator=g)
    corrupted = torch.randint(0, V, (3, 6), generator=g)
    metric = LogitDiff(torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]))
    out = attribution_patching(
        model, clean, corrupted, metric=metric, sites=["resid_pre", "resid_post"], direction=direction
    )
    base, layers, _ = BASE[kind]
    mod = model.get_submodule(f"{base}.{layers}")
    src, tgt = (clean, corrupted) if direction == "denoising" else (corrupted, clean)
    with torch.no_grad():
        m_tgt = metric(model(input_ids=tgt, use_cache=False).logits[:, -1])
        m_clean = metric(model(input_ids=clean, use_cache=False).logits[:, -1])
    for site in ("resid_pre", "resid_post"):
        r = out[site]
        assert r.method == "atp" and r.axes == ("layer", "pos") and tuple(r.values.shape) == (3, 3, 6)
        want = _first_order_by_hand(model, mod, src, tgt, metric, site == "resid_pre")
        torch.testing.assert_close(r.values - m_tgt[:, None, None], want, rtol=1e-9, atol=1e-12)
        assert float(want.abs().max()) > 1e-3  # the estimates are not all zero
        torch.testing.assert_close(r.clean, m_clean, rtol=1e-12, atol=1e-12)
    assert all(not p.requires_grad for p in model.parameters())  # left as the caller had them
    one = attribution_patching(
        model, clean, corrupted, metric=metric, sites="resid_pre", per_position=False, direction=direction
    )["resid_pre"]
    assert one.axes == ("layer",) and tuple(one.values.shape) == (3, 3)
    # a whole layer's estimate is the sum of its positions'
    torch.testing.assert_close(
        one.values - m_tgt[:, None],
        (out["resid_pre"].values - m_tgt[:, None, None]).sum(-1),
        rtol=1e-9,
        atol=1e-12,
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sites": "attn_out"}, r"no hook point 'blocks.0.hook_attn_out' \(model_type='mamba' has no layout"),
        ({"sites": "z"}, r"no hook point 'blocks.0.attn.hook_z'"),
        ({"qk_fix": True}, r"qk_fix=True needs pypattern's Transformer"),
        ({"grad_drop": True}, r"grad_drop=True needs pypattern's Transformer"),
        (
            {"attention_mask": torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])},
            r"attention_mask: .* without a mask",
        ),
        ({"max_memory": 2**20}, r"max_memory=1048576: .* has no estimate of its memory; bound .* max_batch"),
        ({"max_batch": 0}, r"max_batch"),
    ],
)
def test_attribution_patching_on_a_generic_model_refuses_what_it_cannot_do(kwargs, message):
    from pypattern import attribution_patching

    model = _model("mamba")
    x = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(6))
    metric = LogitDiff(torch.tensor([1, 2]), torch.tensor([3, 4]))
    kw = {"sites": "resid_pre", **kwargs}
    with pytest.raises(ValueError, match=message):
        attribution_patching(model, x, x.flip(0), metric=metric, **kw)


def test_attribution_patching_on_a_generic_model_refuses_ablations():
    from pypattern import attribution_patching
    from pypattern.patching.corruptions import ZeroAblation

    model = _model("persimmon")
    x = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(7))
    metric = LogitDiff(torch.tensor([1, 2]), torch.tensor([3, 4]))
    with pytest.raises(ValueError, match=r"corruption=ZeroAblation: .* from corrupted prompts only"):
        attribution_patching(
            model, x, metric=metric, sites="resid_pre", corruption=ZeroAblation(), direction="noising"
        )


def test_component_masks_need_the_layers_inside_and_are_refused():
    """Masks over heads or MLPs need the modules inside a layer, which the residual-stream layout does not know:
    refused by name (never a mask over the whole layer); parameter-name prefixes still select parameters."""
    from pypattern import susceptibilities
    from pypattern.models import hf_component_masks, hf_components
    from pypattern.models.convert import UnsupportedModelError
    from pypattern.models.hf import hf_hook_points

    model = _model("mamba")
    for call in (lambda: hf_component_masks(model, ["blocks.0.attn.head.0"]), lambda: hf_components(model)):
        with pytest.raises(UnsupportedModelError, match=r"model_type='mamba' .*parameter-name prefixes"):
            call()
    pts = hf_hook_points(model)
    assert {k: "model." + v for k, v in pts.items()} == hooked_hf(model)._hook_paths
    x = torch.randint(0, V, (4, 6), generator=torch.Generator().manual_seed(8))
    r = susceptibilities(
        model, [x], x[:2], ["backbone.layers.0", "backbone.layers.2"], num_chains=2, num_draws=4, step_size=1e-7,
        seed=0, quiet=True,
    )  # fmt: skip
    assert torch.isfinite(torch.as_tensor(r.chi)).all()


@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_attribution_patching_in_parts_of_max_batch_prompts_equals_one_pass(direction):
    from pypattern import attribution_patching

    model = _model("persimmon")
    g = torch.Generator().manual_seed(9)
    clean = torch.randint(0, V, (5, 6), generator=g)
    corrupted = torch.randint(0, V, (5, 6), generator=g)
    metric = LogitDiff(
        torch.tensor([1, 2, 3, 4, 5]), torch.tensor([6, 7, 8, 9, 10]), position=torch.tensor([5, 4, 5, 3, 5])
    )
    kw = dict(metric=metric, sites=["resid_pre", "resid_post"], direction=direction)
    one = attribution_patching(model, clean, corrupted, **kw)
    for mb in (1, 2, 5):
        parts = attribution_patching(model, clean, corrupted, max_batch=mb, **kw)
        for site in ("resid_pre", "resid_post"):
            a, b = parts[site], one[site]
            assert a.info["max_batch"] == mb and a.axes == b.axes
            torch.testing.assert_close(a.values, b.values, rtol=1e-9, atol=1e-10)
            torch.testing.assert_close(a.clean, b.clean, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(a.corrupted, b.corrupted, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"max_batch needs a Metric"):
        attribution_patching(
            model, clean, corrupted, metric=lambda lg: lg[:, 1] - lg[:, 2], sites="resid_pre", max_batch=2
        )
