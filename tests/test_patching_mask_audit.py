"""Attention masks in activation and attribution patching, on configurations the other mask tests leave out.

Ground truth: each prompt alone, unpadded (patched without a mask, compared at its real columns), in float64 to
1e-9 (GPT-J and GPT-Neo take their query-key products in float32: 1e-6). Tiny Hugging Face models built from
configs (eager attention) converted with ``pypattern.from_hf``: Qwen3 (query/key norms), Phi (partial rotary, one
norm for attention and MLP), Phi-3, Mistral with a sliding window of 2 that cuts the 6-token prompts, GPT-J,
GPT-Neo (a local layer of window 2), StableLM, Gemma (embedding scale), OLMo 2, Mixtral (a mixture of experts),
Falcon (multi-query, parallel attention and MLP), GPT-BigCode (multi-query) and Gemma 3 (a sliding layer and a
full one); Qwen2 and GPT-NeoX given directly (``hooked_hf``: residual sites). Rows of 6, 3 and 1 real tokens
left-padded to 6 (one row unpadded, one of a single token); padding between real tokens (gaps); grid options;
a checkpoint interrupted and resumed under a mask; and the no-op warning, which compares real tokens only.
"""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import pypattern as pp  # noqa: E402
import pypattern.patching.api as patching_api  # noqa: E402
from pypattern.io import FingerprintMismatch  # noqa: E402
from pypattern.patching import (  # noqa: E402
    GaussianNoise,
    LogitDiff,
    MeanAblation,
    activation_patching,
    attribution_patching,
)
from pypattern.patching.engine import ExactEngine  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

V = 40
TOL = 1e-9
LENGTHS = [6, 3, 1]  # real tokens per prompt, left-padded to 6: one row unpadded, one of a single token
ANSWER, WRONG = torch.tensor([5, 6, 7]), torch.tensor([8, 9, 10])
LLAMA = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=40,
    max_position_embeddings=32,
)  # fmt: skip
NO_DROP = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)

FAMILIES = {
    "qwen3-qk-norm": ("Qwen3Config", "Qwen3ForCausalLM", dict(LLAMA, head_dim=8)),
    "phi-partial-rotary": (
        "PhiConfig",
        "PhiForCausalLM",
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=40,
            partial_rotary_factor=0.5,
            max_position_embeddings=32,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
        ),
    ),  # fmt: skip
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(LLAMA, original_max_position_embeddings=32)),
    "mistral-window2": ("MistralConfig", "MistralForCausalLM", dict(LLAMA, sliding_window=2)),
    "gptj": (
        "GPTJConfig",
        "GPTJForCausalLM",
        dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=32, **NO_DROP),
    ),
    "gptneo-local2": (
        "GPTNeoConfig",
        "GPTNeoForCausalLM",
        dict(
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            attention_types=[[["global", "local"], 1]],
            window_size=2,
            max_position_embeddings=32,
            resid_dropout=0.0,
            embed_dropout=0.0,
            attention_dropout=0.0,
        ),
    ),  # fmt: skip
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", dict(LLAMA, partial_rotary_factor=0.5)),
    "gemma-embed-scale": ("GemmaConfig", "GemmaForCausalLM", dict(LLAMA, head_dim=8)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", LLAMA),
    "mixtral-moe": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(LLAMA, num_local_experts=3, num_experts_per_tok=2),
    ),
    "falcon-mqa-parallel": (
        "FalconConfig",
        "FalconForCausalLM",
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            new_decoder_architecture=False,
            multi_query=True,
            parallel_attn=True,
            bias=False,
            alibi=False,
            max_position_embeddings=32,
        ),
    ),  # fmt: skip
    "bigcode-mqa": (
        "GPTBigCodeConfig",
        "GPTBigCodeForCausalLM",
        dict(n_embd=32, n_layer=2, n_head=4, n_positions=32, multi_query=True, **NO_DROP),
    ),
    "gemma3-sliding-full": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(
            LLAMA,
            head_dim=8,
            sliding_window=2,
            query_pre_attn_scalar=20,
            layer_types=["sliding_attention", "full_attention"],
        ),
    ),  # fmt: skip
    # given directly below (hooked_hf), and the references of the gaps
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", LLAMA),
    "neox": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, rotary_pct=0.5
        ),
    ),
    "llama": ("LlamaConfig", "LlamaForCausalLM", LLAMA),
}
#: families whose converted model takes the query-key products in float32 (README: GPT-Neo, GPT-J)
FLOAT32_SCORES = {"gptj": 1e-6, "gptneo-local2": 1e-6}
_MODELS: dict = {}


def hf(name: str) -> torch.nn.Module:
    if name not in _MODELS:
        cfg_cls, model_cls, kw = FAMILIES[name]
        torch.manual_seed(0)
        cfg = getattr(transformers, cfg_cls)(
            vocab_size=V, bos_token_id=0, eos_token_id=1, pad_token_id=None, initializer_range=0.3,
            attn_implementation="eager", **kw,
        )  # fmt: skip
        _MODELS[name] = getattr(transformers, model_cls)(cfg).double().eval()
    return _MODELS[name]


def converted(name: str):
    key = name + "/pp"
    if key not in _MODELS:
        _MODELS[key] = pp.from_hf(hf(name))
    return _MODELS[key]


def prompts(lengths=LENGTHS, side: str = "left"):
    """``(clean, corrupted, mask, seqs)``: prompts of ``lengths`` padded to the longest on ``side`` (pad id 0 in the
    clean prompts, 1 in the corrupted ones); the corrupted prompts differ from their second real token on (a
    prompt of one token: that token)."""
    g = torch.Generator().manual_seed(5)
    Tn, B = max(lengths), len(lengths)
    clean = torch.zeros(B, Tn, dtype=torch.long)
    corrupted = torch.ones(B, Tn, dtype=torch.long)
    mask = torch.zeros(B, Tn, dtype=torch.long)
    seqs = []
    for b, n in enumerate(lengths):
        s = torch.randint(2, V, (n,), generator=g)
        c = torch.cat([s[:1], torch.randint(2, V, (n - 1,), generator=g)]) if n > 1 else (s + 1) % V
        cols = slice(Tn - n, Tn) if side == "left" else slice(0, n)
        clean[b, cols], corrupted[b, cols], mask[b, cols] = s, c, 1
        seqs.append((s, c))
    return clean, corrupted, mask, seqs


def metric():
    return LogitDiff(ANSWER, WRONG, position=-1)


def alone_metric(b: int):
    return LogitDiff(ANSWER[b : b + 1], WRONG[b : b + 1])


def close(got, want, tol=TOL):
    assert bool(torch.isfinite(got).all())
    torch.testing.assert_close(got, want, atol=tol, rtol=0)


@pytest.mark.parametrize("name", [n for n in FAMILIES if n not in ("qwen2", "neox", "llama")])
def test_left_padded_rows_equal_each_prompt_alone_exact_and_atp_star(name):
    m = converted(name)
    tol = FLOAT32_SCORES.get(name, TOL)
    clean, corrupted, mask, seqs = prompts()
    Tn = clean.shape[1]
    grids = {}
    for i, site in enumerate(("resid_pre", "k", "z", "mlp_out")):
        direction = ("denoising", "noising")[i % 2]
        got = activation_patching(
            m, site, clean, corrupted, metric=metric(), attention_mask=mask, direction=direction, quiet=True
        )
        assert got.method == "exact"
        grids[site] = (got, direction)
    sites = ["z", "q", "k", "v", "pattern", "resid_pre", "attn_out", "mlp_out"]
    atp = attribution_patching(
        m, clean, corrupted, metric=metric(), attention_mask=mask, sites=sites, qk_fix=True, grad_drop=True
    )
    # in parts of one prompt each: the same estimates
    parts = attribution_patching(
        m, clean, corrupted, metric=metric(), attention_mask=mask, sites=sites, qk_fix=True, grad_drop=True,
        max_batch=1,
    )  # fmt: skip
    for site in sites:
        close(parts[site].values, atp[site].values, tol)
        close(parts[site].info["graddrop"], atp[site].info["graddrop"], tol)
    for b, n in enumerate(LENGTHS):
        s, c = seqs[b]
        for site, (got, direction) in grids.items():
            ref = activation_patching(
                m, site, s[None], c[None], metric=alone_metric(b), direction=direction, method="naive", quiet=True
            )  # fmt: skip
            close(got.values[b][..., Tn - n :], ref.values[0], tol)
            assert bool((got.effect[b][..., : Tn - n] == 0).all())  # padding columns: no effect
        ref = attribution_patching(
            m, s[None], c[None], metric=alone_metric(b), sites=sites, qk_fix=True, grad_drop=True
        )
        for site in sites:
            close(atp[site].values[b][..., Tn - n :], ref[site].values[0], tol)
            close(atp[site].info["graddrop"][b][..., Tn - n :], ref[site].info["graddrop"][0], tol)
            assert bool((atp[site].effect[b][..., : Tn - n] == 0).all())


@pytest.mark.parametrize("name", ["qwen2", "neox"])
def test_hugging_face_model_given_directly_left_padded_equals_each_prompt_alone(name):
    h = hf(name)
    clean, corrupted, mask, seqs = prompts()
    Tn = clean.shape[1]
    for site, direction in (("resid_pre", "denoising"), ("attn_out", "noising"), ("mlp_out", "denoising")):
        got = activation_patching(
            h, site, clean, corrupted, metric=metric(), attention_mask=mask, direction=direction, quiet=True
        )
        assert got.method == "naive" and got.info["attention_mask"] is True
        for b, n in enumerate(LENGTHS):
            s, c = seqs[b]
            ref = activation_patching(
                h, site, s[None], c[None], metric=alone_metric(b), direction=direction, quiet=True
            )
            close(got.values[b][..., Tn - n :], ref.values[0])


def gapped():
    """Prompts of 6 columns with padding between real tokens (rows 1 and 2), row 0 unpadded."""
    clean, corrupted, mask, _ = prompts([6, 6, 6])
    mask[1] = torch.tensor([1, 0, 1, 1, 0, 1])
    mask[2] = torch.tensor([0, 1, 0, 1, 0, 1])
    clean[mask == 0], corrupted[mask == 0] = 0, 1
    return clean, corrupted, mask


def test_gaps_without_a_window_equal_the_prompt_with_its_padding_removed():
    """Positions count real tokens: a gapped row of a model without a sliding window is its prompt alone (the gap
    taken out), exactly and to first order (AtP* on every site)."""
    m = converted("llama")
    clean, corrupted, mask = gapped()
    sites = ["z", "q", "k", "v", "pattern", "resid_pre"]
    atp = attribution_patching(
        m, clean, corrupted, metric=metric(), attention_mask=mask, sites=sites, qk_fix=True, grad_drop=True
    )
    exact = {
        s: activation_patching(m, s, clean, corrupted, metric=metric(), attention_mask=mask, quiet=True)
        for s in ("resid_pre", "k", "pattern")
    }
    for b in (1, 2):
        real = mask[b].bool()
        c, k = clean[b][real][None], corrupted[b][real][None]
        ref = attribution_patching(m, c, k, metric=alone_metric(b), sites=sites, qk_fix=True, grad_drop=True)
        for s in sites:
            close(atp[s].values[b][..., real], ref[s].values[0])
            close(atp[s].info["graddrop"][b][..., real], ref[s].info["graddrop"][0])
        for s, got in exact.items():
            want = activation_patching(m, s, c, k, metric=alone_metric(b), method="naive", quiet=True)
            close(got.values[b][..., real], want.values[0])


@pytest.mark.parametrize("name", ["mistral-window2", "gptneo-local2"])
def test_gaps_under_a_sliding_window_are_the_masked_forward_exact_equals_naive(name):
    """A sliding window counts columns (as Hugging Face's masked forward does): a gapped row is its masked forward,
    which the exact engine, the naive loop and the Hugging Face model given directly agree on."""
    m, h = converted(name), hf(name)
    tol = FLOAT32_SCORES.get(name, TOL)
    clean, corrupted, mask = gapped()
    kw = dict(metric=metric(), attention_mask=mask, quiet=True)
    for site in ("resid_pre", "k", "q", "z", "pattern"):
        ex = activation_patching(m, site, clean, corrupted, method="exact", **kw)
        nv = activation_patching(m, site, clean, corrupted, method="naive", **kw)
        close(ex.values, nv.values, tol)
    direct = activation_patching(h, "resid_pre", clean, corrupted, **kw)
    conv = activation_patching(m, "resid_pre", clean, corrupted, **kw)
    close(direct.values, conv.values, tol)
    # the window reads the columns: row 1 (real columns 0, 2, 3, 5) is not its prompt alone
    real = mask[1].bool()
    alone = activation_patching(
        m, "resid_pre", clean[1][real][None], corrupted[1][real][None], metric=alone_metric(1), quiet=True
    )
    assert (conv.values[1][..., real] - alone.values[0]).abs().max() > 1e-3


def test_left_padded_grid_options_equal_each_prompt_alone():
    """``per_position=False``, ``window=2``, restricted heads and positions, a small ``max_memory`` and
    ``max_batch=1`` on a model with query/key norms and grouped-query attention."""
    m = converted("qwen3-qk-norm")
    clean, corrupted, mask, seqs = prompts()
    Tn = clean.shape[1]
    options = [
        ("resid_pre", dict(per_position=False), "noising"),
        ("k", dict(per_position=False), "denoising"),
        ("z", dict(window=2), "noising"),
        ("v", dict(heads=[1], max_batch=1), "denoising"),
        ("resid_pre", dict(max_memory=150_000), "denoising"),  # two cells per engine batch
    ]
    for site, kw, direction in options:
        got = activation_patching(
            m, site, clean, corrupted, metric=metric(), attention_mask=mask, direction=direction, quiet=True, **kw
        )  # fmt: skip
        assert got.method == "exact"
        if "max_memory" in kw:
            assert got.info["max_batch"] in (1, 2)  # fewer cells than the grid per engine batch
        grid = {k: v for k, v in kw.items() if k in ("per_position", "window", "heads")}
        for b, n in enumerate(LENGTHS):
            s, c = seqs[b]
            ref = activation_patching(
                m, site, s[None], c[None], metric=alone_metric(b), direction=direction, method="naive", quiet=True,
                **grid,
            )  # fmt: skip
            cols = (...,) if kw.get("per_position") is False else (..., slice(Tn - n, None))
            close(got.values[b][cols], ref.values[0])
    # Gaussian noise: each row's draw is keyed by its own row index (a row alone would draw row 0's), so the
    # reference is the masked naive loop
    noise = GaussianNoise(std=0.5, seed=2)
    for site, direction in (("resid_pre", "denoising"), ("k", "noising")):
        kw = dict(corruption=noise, metric=metric(), attention_mask=mask, direction=direction, quiet=True)
        ex = activation_patching(m, site, clean, method="exact", **kw)
        nv = activation_patching(m, site, clean, method="naive", **kw)
        close(ex.values, nv.values)


def test_interrupted_left_padded_grid_resumes_to_the_uninterrupted_values(tmp_path, monkeypatch):
    m = converted("gemma-embed-scale")
    clean, corrupted, mask, _ = prompts()
    monkeypatch.setattr(ExactEngine, "UNEMBED_ROWS", 1)  # small blocks, each saved
    monkeypatch.setattr(patching_api._Grid, "EVERY_S", 0.0)
    path = tmp_path / "grid.npz"
    kw = dict(metric=metric(), attention_mask=mask, quiet=True, direction="noising")
    whole = activation_patching(m, "k", clean, corrupted, **kw)

    class Stop(Exception):
        pass

    run = ExactEngine.run
    calls = []

    def stopping(self, cells):
        calls.append(len(cells))
        if len(calls) > 2:
            raise Stop
        return run(self, cells)

    with monkeypatch.context() as mp:
        mp.setattr(ExactEngine, "run", stopping)
        with pytest.raises(Stop):
            activation_patching(m, "k", clean, corrupted, checkpoint=path, **kw)
    resumed = activation_patching(m, "k", clean, corrupted, checkpoint=path, **kw)
    close(resumed.values, whole.values)
    # a mask with one token less in row 0 is another run
    other = mask.clone()
    other[0, 0] = 0
    with pytest.raises(FingerprintMismatch, match="attention_mask"):
        activation_patching(m, "k", clean, corrupted, checkpoint=path, **{**kw, "attention_mask": other})


def _no_op_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "every effect is 0" in str(w.message)]


def test_corrupted_prompts_that_differ_at_padding_only_are_named_a_no_op():
    """Clean and corrupted prompts equal at every real token (only their pad ids differ) change nothing: every
    effect is 0, and both calls warn as they do for equal prompts."""
    m = converted("llama")
    clean, corrupted, mask, _ = prompts()
    same = clean.clone()
    same[mask == 0] = 1  # another pad id
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        act = activation_patching(
            m, "resid_pre", clean, same, metric=metric(), attention_mask=mask, quiet=True
        )
        atp = attribution_patching(m, clean, same, metric=metric(), attention_mask=mask, sites=["z"])
    said = _no_op_warnings(rec)
    assert len(said) == 2 and "activation_patching" in said[0] and "attribution_patching" in said[1]
    assert "corrupted prompts equal the clean ones" in said[0]
    assert bool((act.effect == 0).all()) and bool((atp["z"].effect == 0).all())
    # prompts that differ at a real token are no no-op
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        activation_patching(
            m, "resid_pre", clean, corrupted, metric=metric(), attention_mask=mask, quiet=True
        )
    assert not _no_op_warnings(rec)


def test_a_mean_ablation_over_copies_of_one_right_padded_prompt_is_named_a_no_op():
    m = converted("llama")
    clean, _, mask, _ = prompts([4, 4, 4], side="right")
    clean[:] = clean[0]
    pad = torch.tensor([[0], [1], [2]])  # a padding column with other ids in each row
    clean, mask = torch.cat([clean, pad], 1), torch.cat([mask, torch.zeros(3, 1, dtype=torch.long)], 1)
    met = LogitDiff(ANSWER, WRONG, position=3)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        got = activation_patching(
            m, "resid_pre", clean, corruption=MeanAblation(), metric=met, attention_mask=mask, direction="noising",
            quiet=True,
        )  # fmt: skip
    said = _no_op_warnings(rec)
    assert len(said) == 1 and "mean ablation averages over 3 copies of one prompt" in said[0]
    assert bool((got.effect == 0).all())


def test_kl_reads_each_rows_position_only_and_equals_each_prompt_alone():
    """``KL`` reads the logits at its position (each row's last real token under right padding), never at padding:
    the exact grid (both directions) and AtP* (denoising: noising from the clean run has gradient 0 there) of each
    row equal its prompt alone, finite."""
    m = converted("gemma-embed-scale")
    clean, corrupted, mask, seqs = prompts(side="right")
    last = mask.sum(1) - 1
    KL = pp.patching.KL
    opts = dict(sites=["k", "z"], qk_fix=True, grad_drop=True)
    atp = attribution_patching(m, clean, corrupted, metric=KL(position=last), attention_mask=mask, **opts)
    for direction in ("denoising", "noising"):
        got = activation_patching(
            m, "k", clean, corrupted, metric=KL(position=last), attention_mask=mask, direction=direction, quiet=True
        )  # fmt: skip
        for b, n in enumerate(LENGTHS):
            s, c = seqs[b]
            ref = activation_patching(m, "k", s[None], c[None], metric=KL(), direction=direction, quiet=True)
            close(got.values[b][..., :n], ref.values[0])
    for b, n in enumerate(LENGTHS):
        s, c = seqs[b]
        ref = attribution_patching(m, s[None], c[None], metric=KL(), **opts)
        for site in ("k", "z"):
            close(atp[site].values[b][..., :n], ref[site].values[0])
            close(atp[site].info["graddrop"][b][..., :n], ref[site].info["graddrop"][0])
    with pytest.raises(ValueError, match="which attention_mask marks as padding"):
        activation_patching(m, "k", clean, corrupted, metric=KL(), attention_mask=mask, quiet=True)
