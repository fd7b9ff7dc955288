"""README claims that ``tests/test_readme.py`` does not run: the TransformerLens example (a ```py block, run where
TransformerLens 2.x / 3.x is installed) and what the "Your own model" prose says of ``fold_ln`` and of wrapped
Hugging Face models; and every name and path that the README and the docs name exists."""

import importlib
import pathlib
import re

import pytest
import torch
from torch import nn

import pypattern as pp

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README] + sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "benchmarks.md")


def _hooked_transformer():
    tl = pytest.importorskip("transformer_lens")
    try:
        return tl.HookedTransformer, tl.HookedTransformerConfig
    except (AttributeError, ImportError):
        pytest.skip("this TransformerLens has no HookedTransformer")


def _llama_prompts():
    """The ``tokens`` and ``corrupted`` of the README's Llama example, which the TransformerLens example reuses."""
    tokens = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    corrupted = tokens.clone()
    corrupted[:, 3] = (corrupted[:, 3] + 1) % 64
    return tokens, corrupted


def test_transformer_lens_example_runs_and_patches_as_transformer_lens_hooks_do(one_thread):
    """The ```py block runs as written; the converted model has TransformerLens' logits and hook names, and the
    head grid equals a loop of TransformerLens' own hooked forwards (denoising: the corrupted run with one head's
    clean ``z`` at one position, read as ``-KL(P_clean || P)`` at the last position)."""
    HookedTransformer, _ = _hooked_transformer()
    blocks = re.findall(r"```py\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) == 1
    tokens, corrupted = _llama_prompts()
    ns = {"pp": pp, "torch": torch, "tokens": tokens, "corrupted": corrupted}
    exec(compile(blocks[0], "README.md py block", "exec"), ns)
    tl_model, converted, grid = ns["tl_model"], ns["converted"], ns["grid"]
    assert isinstance(tl_model, HookedTransformer)
    torch.testing.assert_close(converted(tokens), tl_model(tokens), rtol=0, atol=1e-4)
    _, theirs = tl_model.run_with_cache(tokens)
    _, ours = converted.run_with_cache(tokens)
    assert set(theirs) == set(ours)

    n_layers, n_heads, pos = tl_model.cfg.n_layers, tl_model.cfg.n_heads, tokens.shape[1]
    assert grid.values.shape == (tokens.shape[0], n_layers, n_heads, pos)
    clean_lp = torch.log_softmax(tl_model(tokens)[:, -1].double(), -1)
    want = torch.empty(tokens.shape[0], n_layers, n_heads, pos, dtype=torch.float64)
    for layer in range(n_layers):
        clean_z = theirs[f"blocks.{layer}.attn.hook_z"]
        for head in range(n_heads):
            for p in range(pos):

                def patch(z, hook, head=head, p=p, clean_z=clean_z):
                    z = z.clone()
                    z[:, p, head] = clean_z[:, p, head]
                    return z

                logits = tl_model.run_with_hooks(
                    corrupted, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", patch)]
                )
                lp = torch.log_softmax(logits[:, -1].double(), -1)
                want[:, layer, head, p] = -(clean_lp.exp() * (clean_lp - lp)).sum(-1)
    torch.testing.assert_close(grid.values.double(), want, rtol=0, atol=1e-5)


def test_fold_ln_norms_convert_as_pre_norms_except_under_an_embedding_layer_norm(one_thread):
    """After ``fold_ln`` the converted norms are LNPre / RMSPre; with a LayerNorm on the embedding (BLOOM as
    TransformerLens loads it), which ``fold_ln`` keeps, every norm converts as a LayerNorm, the folded ones with
    weight 1 and bias 0. Logits equal the folded model's own, and the unfolded model's."""
    HookedTransformer, HookedTransformerConfig = _hooked_transformer()
    tokens, _ = _llama_prompts()
    cases = (
        (dict(), "LNPre", "LNPre"),
        (dict(normalization_type="RMS"), "RMSPre", "RMSPre"),
        (dict(post_embedding_ln=True, positional_embedding_type="alibi"), "LNPre", "LN"),
    )
    for extra, tl_norm, our_norm in cases:
        cfg = HookedTransformerConfig(
            n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=64, n_ctx=16, act_fn="gelu",
            seed=0, **extra,
        )  # fmt: skip
        model = HookedTransformer(cfg)
        with torch.no_grad():  # norms that are not the identity, so that folding them changes the weights
            g = torch.Generator().manual_seed(1)
            for name, p in model.named_parameters():
                if name.endswith((".w", ".b")):
                    p.add_(0.3 * torch.randn(p.shape, generator=g))
        embed_ln = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("embed.ln.")}
        before = model(tokens)
        model.process_weights_(fold_ln=True, center_writing_weights=False, center_unembed=False)
        assert model.cfg.normalization_type == tl_norm
        ours = pp.from_hf(model)
        assert ours.cfg.normalization_type == our_norm
        torch.testing.assert_close(ours(tokens), model(tokens), rtol=0, atol=1e-5)
        torch.testing.assert_close(ours(tokens), before, rtol=0, atol=1e-5)
        params = dict(ours.named_parameters())
        if our_norm == "LN":
            assert ours.cfg.post_embedding_ln
            for name, value in embed_ln.items():  # kept as TransformerLens keeps it
                torch.testing.assert_close(params[name], value, rtol=0, atol=0)
            folded = [n for n in params if re.fullmatch(r"(blocks\.\d+\.ln[12]|ln_final)\.[wb]", n)]
            assert len(folded) == 2 * (2 * cfg.n_layers + 1)
            for n in folded:
                assert torch.equal(
                    params[n], torch.ones_like(params[n]) if n.endswith(".w") else torch.zeros_like(params[n])
                ), n
        else:
            assert not any(re.search(r"(^|\.)ln(1|2|_final)\.", n) for n in params)


class _PeftStyle(nn.Module):
    """A PEFT-style wrapper: the model as ``.base_model``, nothing of its own."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.base_model = model

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)


class _PromptEncoder(_PeftStyle):
    """A wrapper with a parameter of its own, which its forward would use around the model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.prompt = nn.Parameter(torch.zeros(3, 32))


def test_wrapped_hugging_face_models_are_looked_through_by_the_adapter_and_the_masks(one_thread):
    """``nn.DataParallel`` (``.module``), a PEFT-style ``.base_model`` and ``torch.compile``'s wrapper: the adapter's
    logits and cache equal those of the unwrapped model's adapter, and the per-head masks are the unwrapped
    model's under the wrapper's parameter names; a wrapper with a parameter of its own is refused, naming it."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    hf = transformers.LlamaForCausalLM(cfg).eval()
    tokens, _ = _llama_prompts()
    want_logits, want_cache = pp.hooked_hf(hf).run_with_cache(tokens)
    want_mask = pp.component_masks(hf, "blocks.0.attn.head.1")
    # the head's q_proj rows and o_proj columns (d_head 8), sliced independently
    assert want_mask["model.layers.0.self_attn.q_proj.weight"][8:16].all()
    assert int(want_mask["model.layers.0.self_attn.q_proj.weight"].sum()) == 8 * 32
    for prefix, wrapped in (
        ("module.", nn.DataParallel(hf)),
        ("base_model.", _PeftStyle(hf)),
        ("_orig_mod.", torch.compile(hf)),
    ):
        logits, cache = pp.hooked_hf(wrapped).run_with_cache(tokens)
        torch.testing.assert_close(logits, want_logits, rtol=0, atol=0)
        assert set(cache) == set(want_cache)
        for name in want_cache:
            torch.testing.assert_close(cache[name], want_cache[name], rtol=0, atol=0)
        mask = pp.component_masks(wrapped, "blocks.0.attn.head.1")
        assert set(mask) == {prefix + n for n in want_mask}
        assert set(mask) <= {n for n, _ in wrapped.named_parameters()}
        for name, m in want_mask.items():
            assert torch.equal(mask[prefix + name], m), name
    for refuse in (pp.hooked_hf, lambda m: pp.component_masks(m, "blocks.0.attn.head.1")):
        with pytest.raises(ValueError, match="parameters outside it \\(prompt\\)"):
            refuse(_PromptEncoder(hf))


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_every_name_and_path_the_readme_and_docs_give_exists():
    """Every ``pp.X`` / ``pypattern.x.y`` in the README and the docs resolves to a module or attribute, and every
    repository path they quote exists."""
    missing, count = [], 0
    for doc in DOCS:
        text = doc.read_text()
        for m in re.finditer(r"\b(?:pp|pypattern)((?:\.[A-Za-z_]\w*)+)", text):
            count += 1
            if not _resolves("pypattern" + m.group(1)):
                missing.append((doc.name, m.group(0)))
        for m in re.finditer(r"`((?:pypattern|tests|bench|csrc|docs|kernels|\.ci)/[\w./-]+)`", text):
            count += 1
            if not (ROOT / m.group(1)).exists():
                missing.append((doc.name, m.group(1)))
    # private helpers the docs point to by name (`_group_chi`; not `_W_K`, a TransformerLens parameter) exist
    code = "\n".join(f.read_text() for d in ("pypattern", "tests", "bench") for f in (ROOT / d).rglob("*.py"))
    for doc in DOCS:
        for name in set(re.findall(r"`(_[a-z][a-z0-9_]*)`", doc.read_text())):
            count += 1
            if not re.search(rf"^\s*(?:def|class) {name}\b|^{name} = ", code, re.M):
                missing.append((doc.name, name))
    assert count > 100
    assert not missing, missing


def _devinterp_has(path: str) -> bool:
    """Whether ``pypattern.devinterp.<path>`` is a module or an attribute of one."""
    full = f"pypattern.devinterp.{path}"
    try:
        importlib.import_module(full)
        return True
    except ImportError:
        pass
    mod, _, attr = full.rpartition(".")
    try:
        return hasattr(importlib.import_module(mod), attr)
    except ImportError:
        return False


def test_devinterp_paths_the_readme_lists_as_missing_are_missing_and_sgmcmc_builds_the_fused_samplers():
    """The README's list of devinterp paths that pypattern does not provide holds only absent ones, and
    ``devinterp.optim.SGMCMC``'s factories, which it says are provided, build pypattern's fused samplers."""
    from pypattern.devinterp.optim import SGMCMC
    from pypattern.sampling import SGLD, SGNHT, RMSpropSGLD

    text = " ".join(README.read_text().split())
    listed = text.split("Not provided under devinterp's paths:", 1)[1].split("(devinterp's own callbacks", 1)[
        0
    ]
    paths = [p.removeprefix("devinterp.") for p in re.findall(r"`([\w.]+)`", listed)]
    assert len(paths) >= 10 and "optim.SGMCMC" not in paths
    assert [p for p in paths if _devinterp_has(p)] == []
    w = nn.Parameter(torch.ones(3))
    for factory, cls in (("sgld", SGLD), ("sgnht", SGNHT), ("rmsprop_sgld", RMSpropSGLD)):
        assert type(getattr(SGMCMC, factory)([w], lr=1e-3, nbeta=10.0)) is cls
        assert type(SGMCMC.get_method(factory)([w], lr=1e-3, nbeta=10.0)) is cls
