"""Activation patching on Hugging Face GPT-2 and Llama models built from configs (no download), through the native
adapters' hook points."""

import pytest
import torch

from pypattern.models.hf import HAS_TRANSFORMERS, gpt2_from_config, hooked_gpt2, hooked_hf
from pypattern.patching import LogitDiff, activation_patching

pytestmark = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed")


@pytest.fixture(scope="module")
def gpt2_and_prompts():
    torch.manual_seed(0)
    gpt2 = gpt2_from_config(n_layers=2, d_model=32, n_heads=4, d_vocab=40, n_ctx=8).eval()
    hm = hooked_gpt2(gpt2)
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, 40, (4, 8), generator=g)
    corr = clean.clone()
    corr[:, 2] = (clean[:, 2] + 7) % 40  # one replaced token per prompt
    ans, wrong = torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6, 7, 8])
    return gpt2, hm, clean, corr, LogitDiff(ans, wrong)


def _manual_resid_pre_patch(gpt2, clean, corr, layer, pos, metric):
    """One denoising patch by hand: clean input of block `layer` at `pos` into the corrupted run."""
    block = gpt2.transformer.h[layer]
    store = {}

    def grab(mod, args, kwargs):
        store["x"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    h = block.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        gpt2(clean)
    h.remove()

    def put(mod, args, kwargs):
        x = (args[0] if args else kwargs["hidden_states"]).clone()
        x[:, pos] = store["x"][:, pos]
        if args:
            return (x, *args[1:]), kwargs
        kwargs["hidden_states"] = x
        return args, kwargs

    h = block.register_forward_pre_hook(put, with_kwargs=True)
    with torch.no_grad():
        logits = gpt2(corr).logits
    h.remove()
    return metric(logits[:, -1])  # the metric reads the last position


def test_resid_pre_grid_equals_manual_hooks(gpt2_and_prompts):
    gpt2, hm, clean, corr, metric = gpt2_and_prompts
    res = activation_patching(hm, "resid_pre", clean, corr, metric=metric)
    assert res.method == "naive"
    vals = res.values  # (batch, layer, pos): per-example metric values
    assert vals.shape == (4, 2, 8)
    for layer in range(2):
        for pos in (1, 2, 5):
            want = _manual_resid_pre_patch(gpt2, clean, corr, layer, pos, metric)
            torch.testing.assert_close(vals[:, layer, pos].double(), want.double(), rtol=1e-5, atol=1e-5)
    # a position where clean and corrupted prompts agree, patched at layer 0, changes nothing; the replaced
    # token's position does
    corrupted = metric(gpt2(corr).logits[:, -1]).detach()
    torch.testing.assert_close(vals[:, 0, 1], corrupted, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(vals[:, 0, 2], corrupted, atol=1e-3)


def _llama():
    import transformers

    torch.manual_seed(3)
    cfg = transformers.LlamaConfig(
        vocab_size=40, hidden_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=32, max_position_embeddings=16,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).double().eval()


def _manual_resid_mid_patch(model, clean, corr, layer, pos, metric):
    """Denoising patch of resid_mid by hand: the clean run's ``resid_pre + attn_out`` at ``pos`` put into the
    corrupted run by rewriting the attention output as ``clean_mid - corrupted_resid_pre`` there."""
    block = model.model.layers[layer]
    store = {}

    def grab_pre(mod, args, kwargs):
        store["pre"] = args[0] if args else kwargs["hidden_states"]

    def grab_attn(mod, args, out):
        store["mid"] = (store["pre"] + out[0]).detach().clone()

    hs = [
        block.register_forward_pre_hook(grab_pre, with_kwargs=True),
        block.self_attn.register_forward_hook(grab_attn),
    ]
    with torch.no_grad():
        model(clean)
    for h in hs:
        h.remove()
    clean_mid = store.pop("mid")

    def put(mod, args, out):
        a = out[0].clone()
        a[:, pos] = clean_mid[:, pos] - store["pre"][:, pos]
        return (a, *out[1:])

    hs = [
        block.register_forward_pre_hook(grab_pre, with_kwargs=True),
        block.self_attn.register_forward_hook(put),
    ]
    with torch.no_grad():
        logits = model(corr).logits
    for h in hs:
        h.remove()
    return metric(logits[:, -1])


def test_resid_mid_grid_on_a_native_llama_equals_manual_hooks():
    llama = _llama()
    hm = hooked_hf(llama)
    g = torch.Generator().manual_seed(2)
    clean = torch.randint(0, 40, (3, 6), generator=g)
    corr = clean.clone()
    corr[:, 1] = (clean[:, 1] + 11) % 40
    metric = LogitDiff(torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]))
    res = activation_patching(hm, "resid_mid", clean, corr, metric=metric)
    assert res.values.shape == (3, 2, 6)
    for layer in range(2):
        for pos in (1, 4):
            want = _manual_resid_mid_patch(llama, clean, corr, layer, pos, metric)
            torch.testing.assert_close(res.values[:, layer, pos], want, rtol=1e-9, atol=1e-9)
    # the replaced token's position, patched at layer 0, moves the metric away from the corrupted run's
    corrupted = metric(llama(corr).logits[:, -1]).detach()
    assert not torch.allclose(res.values[:, 0, 1], corrupted, atol=1e-4)
