"""The exact patching engine under an attention mask with padding before real tokens (left padding).

Ground truth: the naive loop, one forward per cell of the model given the mask and ``position_ids =
real_token_positions(mask)`` (itself checked against each prompt alone in tests/test_patching_attention_mask.py).
``method="exact"`` must equal it to 1e-9 in float64 on tiny Hugging Face models converted with ``pypattern.from_hf``:
GPT-2 (learned positions), Llama with grouped-query attention (rotary), GPT-NeoX (partial rotary, parallel
attention and MLP), BLOOM (ALiBi), Gemma 2 (a sliding window of 3 over 6 positions, soft-capped scores) and OPT.
The prompts are left-padded to different lengths, one row unpadded; the padding rows before a row's first real
token attend to no key (a pattern of zeros: a NaN there would reach the real rows through the values product).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import pypattern as pp  # noqa: E402
from pypattern.models.transformer import real_token_positions  # noqa: E402
from pypattern.patching import (  # noqa: E402
    GaussianNoise,
    LogitDiff,
    ZeroAblation,
    activation_patching,
)
from pypattern.patching.engine import ExactEngine  # noqa: E402
from pypattern.patching.sites import Cell  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

V = 40
TOL = 1e-9
LENGTHS = [6, 3, 4]  # real tokens per prompt, left-padded to 6 (row 0 unpadded)
ANSWER, WRONG = torch.tensor([5, 6, 7]), torch.tensor([8, 9, 10])
LLAMA = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=40,
    max_position_embeddings=32,
)  # fmt: skip

FAMILIES = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_layer=2, n_head=4, n_positions=32)),
    "llama-gqa": ("LlamaConfig", "LlamaForCausalLM", LLAMA),
    "neox-parallel-rot0.5": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, rotary_pct=0.5
        ),
    ),
    "bloom-alibi": ("BloomConfig", "BloomForCausalLM", dict(hidden_size=32, n_layer=2, n_head=4)),
    "gemma2-window-cap": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(
            LLAMA,
            head_dim=8,
            sliding_window=3,
            query_pre_attn_scalar=20,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
        ),
    ),  # fmt: skip
    "opt": (
        "OPTConfig",
        "OPTForCausalLM",
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=48,
            word_embed_proj_dim=32,
            dropout=0.0,
            max_position_embeddings=32,
        ),
    ),  # fmt: skip
}
_MODELS: dict = {}


def model(name: str):
    if name not in _MODELS:
        cfg_cls, model_cls, kw = FAMILIES[name]
        torch.manual_seed(0)
        cfg = getattr(transformers, cfg_cls)(
            vocab_size=V, bos_token_id=0, eos_token_id=1, pad_token_id=None, initializer_range=0.3,
            attn_implementation="eager", **kw,
        )  # fmt: skip
        hf = getattr(transformers, model_cls)(cfg).double().eval()
        _MODELS[name] = pp.from_hf(hf)
    return _MODELS[name]


def prompts():
    """``(clean, corrupted, mask)``: prompts of LENGTHS left-padded to 6 (pad id 0 in the clean prompts, 1 in the
    corrupted ones); the corrupted prompts differ from their second real token on."""
    g = torch.Generator().manual_seed(5)
    Tn = max(LENGTHS)
    clean = torch.zeros(3, Tn, dtype=torch.long)
    corrupted = torch.ones(3, Tn, dtype=torch.long)
    mask = torch.zeros(3, Tn, dtype=torch.long)
    for b, n in enumerate(LENGTHS):
        s = torch.randint(2, V, (n,), generator=g)
        c = torch.cat([s[:1], torch.randint(2, V, (n - 1,), generator=g)])
        clean[b, Tn - n :], corrupted[b, Tn - n :], mask[b, Tn - n :] = s, c, 1
    return clean, corrupted, mask


def sites_of(m) -> list[str]:
    out = ["resid_pre", "attn_out", "mlp_out", "z", "q", "k", "v", "pattern"]
    return [s for s in out if not (s == "resid_mid" and m.cfg.parallel_attn_mlp)]


def both(m, site, clean, corrupted=None, **kw):
    """``(exact, naive)`` results of one grid, checked to agree to TOL and to be finite."""
    exact = activation_patching(m, site, clean, corrupted, method="exact", quiet=True, **kw)
    naive = activation_patching(m, site, clean, corrupted, method="naive", quiet=True, **kw)
    assert exact.method == "exact" and exact.info["method"] == "exact" and naive.method == "naive"
    assert bool(torch.isfinite(exact.values).all())
    torch.testing.assert_close(exact.values, naive.values, atol=TOL, rtol=0)
    return exact, naive


@pytest.mark.parametrize("name", list(FAMILIES))
def test_left_padded_exact_equals_masked_naive_every_site(name):
    m = model(name)
    clean, corrupted, mask = prompts()
    met = LogitDiff(ANSWER, WRONG, position=-1)
    for i, site in enumerate(sites_of(m)):
        direction = ("denoising", "noising")[i % 2]
        both(m, site, clean, corrupted, metric=met, attention_mask=mask, direction=direction)
        # the other direction on the sites the attention reads per position
        if site in ("resid_pre", "k", "v", "q"):
            other = "noising" if direction == "denoising" else "denoising"
            both(m, site, clean, corrupted, metric=met, attention_mask=mask, direction=other)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_left_padded_exact_equals_masked_naive_noise_and_zero_ablation(name):
    m = model(name)
    clean, _, mask = prompts()
    met = LogitDiff(ANSWER, WRONG, position=-1)
    noise = GaussianNoise(std=0.5, seed=1)
    for site, direction in (("resid_pre", "denoising"), ("k", "noising"), ("pattern", "denoising")):
        both(m, site, clean, corruption=noise, metric=met, attention_mask=mask, direction=direction)
    for site in ("z", "v", "mlp_out"):
        both(m, site, clean, corruption=ZeroAblation(), metric=met, attention_mask=mask, direction="noising")


@pytest.mark.parametrize("name", ["llama-gqa", "bloom-alibi", "gemma2-window-cap"])
def test_left_padded_all_positions_restricted_grids_and_earlier_metric_positions(name):
    m = model(name)
    clean, corrupted, mask = prompts()
    met = LogitDiff(ANSWER, WRONG, position=-1)
    for site in ("resid_pre", "k", "z"):
        ex, _ = both(m, site, clean, corrupted, metric=met, attention_mask=mask, per_position=False)
        assert ex.values.shape[-1] != clean.shape[1]  # no position axis
    ex, _ = both(
        m, "q", clean, corrupted, metric=met, attention_mask=mask, positions=slice(-3, None), layers=[1]
    )
    assert ex.values.shape == (3, 1, 4, 3)
    # small engine batches: cells of several positions run together layer by layer, in chunks
    both(m, "k", clean, corrupted, metric=met, attention_mask=mask, direction="noising", max_batch=2)
    # metric positions per example, each a real token before the last column (rows cut after the largest)
    at = LogitDiff(ANSWER, WRONG, position=torch.tensor([3, 4, 5]))
    for site, direction in (("resid_pre", "noising"), ("v", "denoising"), ("attn_out", "denoising")):
        both(m, site, clean, corrupted, metric=at, attention_mask=mask, direction=direction)


def test_auto_runs_the_exact_engine_under_left_padding():
    m = model("llama-gqa")
    clean, corrupted, mask = prompts()
    met = LogitDiff(ANSWER, WRONG, position=-1)
    auto = activation_patching(m, "z", clean, corrupted, metric=met, attention_mask=mask, quiet=True)
    naive = activation_patching(
        m, "z", clean, corrupted, metric=met, attention_mask=mask, method="naive", quiet=True
    )
    assert auto.method == "exact" and auto.info["method"] == "exact" and "max_batch" in auto.info
    torch.testing.assert_close(auto.values, naive.values, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "bloom-alibi", "gemma2-window-cap"])
def test_without_a_mask_exact_equals_naive_and_a_mask_of_ones_changes_no_bit(name):
    m = model(name)
    clean, corrupted, _ = prompts()
    met = LogitDiff(ANSWER, WRONG, position=-1)
    for site in ("resid_pre", "k", "pattern"):
        both(m, site, clean, corrupted, metric=met)
        ones = torch.ones_like(clean)
        a = activation_patching(m, site, clean, corrupted, metric=met, method="exact", quiet=True)
        b = activation_patching(
            m, site, clean, corrupted, metric=met, method="exact", quiet=True, attention_mask=ones
        )
        assert torch.equal(a.values, b.values)
    # the engine given a mask of ones and positions 0 .. T-1 computes every cell as without them, bit for bit
    names = lambda n: not n.endswith("hook_scale")  # noqa: E731
    _, cache = m.run_with_cache(corrupted, names_filter=names)
    _, src = m.run_with_cache(clean, names_filter=names)
    met.bind(m(clean)[:, -1])
    cells = [Cell(layer, h, p) for layer in range(2) for h in range(2) for p in range(6)]
    plain = ExactEngine(m, cache, src, "k", met, 5).run(cells)
    ones = torch.ones(3, 6, dtype=torch.bool)
    pos = real_token_positions(ones)
    given = ExactEngine(m, cache, src, "k", met, 5, attention_mask=ones, position_ids=pos).run(cells)
    assert torch.equal(plain, given)


def test_engine_refuses_a_mask_of_another_shape_by_name():
    m = model("gpt2")
    clean, _, mask = prompts()
    _, cache = m.run_with_cache(clean)
    met = LogitDiff(ANSWER, WRONG, position=-1)
    with pytest.raises(ValueError, match=r"attention_mask is \(2, 6\); give a \(batch, pos\) tensor"):
        ExactEngine(m, cache, cache, "z", met, 5, attention_mask=mask[:2].bool())
    with pytest.raises(ValueError, match=r"position_ids is \(3, 4\)"):
        ExactEngine(m, cache, cache, "z", met, 5, position_ids=mask[:, :4])
