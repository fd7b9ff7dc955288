"""Steering and flag ablation at chosen positions under a key-value cache.

A forward of a Hugging Face model with a cache (``generate(use_cache=True)``, or a forward given the cache) sees only
the new tokens, so the first position of the hooked activation is the absolute position ``past_length``.
``positions`` of :func:`pypattern.steer` / :func:`pypattern.ablate_flags` are absolute positions (column indices of
the padded batch): a cached generation must give the tokens and logits of an uncached one (Hugging Face's
``generate(use_cache=False)``, pypattern's own :func:`pypattern.flags.generate`) and of one forward over the whole
generated sequence under the steering (the independent reference: the model is causal, so each step's last logits
are those of the full sequence at that position). A forward whose cache cannot be seen refuses positions.
"""

import warnings

import pytest
import torch

import pypattern as pp
from pypattern import flags
from pypattern.models.hf import gpt2_hook_points
from pypattern.models.hooks import HookedModule

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

V = 40  # vocabulary
STEPS = 5  # generated tokens


def _hf(arch: str) -> torch.nn.Module:
    T = transformers
    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = T.GPT2Config(
            vocab_size=V,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=32,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            bos_token_id=None,
            eos_token_id=None,
        )
        cfg.attn_pdrop = 0.0
        model = T.GPT2LMHeadModel(cfg)
    else:
        cfg = T.LlamaConfig(
            vocab_size=V,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=48,
            max_position_embeddings=32,
        )
        model = T.LlamaForCausalLM(cfg)
    model.config.bos_token_id = model.config.eos_token_id = None
    model.config.pad_token_id = 0
    model.generation_config.bos_token_id = model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.double().eval()


# strong flags on many dimensions: steering changes the generated tokens
SPEC = pp.FlagSpec(
    "blocks.1.hook_resid_pre", dims=tuple(range(12)), num_concepts=2, on_value=6.0, off_value=-6.0
)
PROMPT = torch.tensor([[5, 9, 17, 3], [11, 2, 30, 8]])
P = PROMPT.shape[1]


def _mask() -> torch.Tensor:
    """Absolute positions 1, P (the first generated token's input) and P + 2, in a mask longer than the sequence."""
    m = torch.zeros(P + STEPS + 3, dtype=torch.bool)
    m[[1, P, P + 2]] = True
    return m


POSITIONS = {"int_in_prompt": 2, "int_after_prompt": P + 1, "mask": _mask(), "none": None}


def _hf_generate(hf, prompt, use_cache, attention_mask=None):
    """Greedy tokens ``(batch, P + STEPS)`` and the raw logits of each step ``(batch, STEPS, V)``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = hf.generate(
            prompt,
            attention_mask=torch.ones_like(prompt) if attention_mask is None else attention_mask,
            max_new_tokens=STEPS,
            min_new_tokens=STEPS,
            do_sample=False,
            use_cache=use_cache,
            output_logits=True,
            return_dict_in_generate=True,
        )
    # Hugging Face hands the logits on in float32 (computed in float64 here)
    return out.sequences, torch.stack(out.logits, 1).double()


def _full_forward_logits(model, tokens, positions, attention_mask=None, **kw):
    """The logits that predicted the generated tokens, from one uncached forward of the whole sequence under the
    same steering (``kw``: position ids of a left-padded batch)."""
    with pp.steer(model, SPEC, torch.tensor([1, 0]), positions=positions):
        logits = model(tokens, attention_mask=attention_mask, **kw)
    return logits[:, P - 1 : -1]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("which", list(POSITIONS))
def test_cached_generate_steers_the_absolute_positions(arch, which):
    hf = _hf(arch)
    model = pp.hooked_hf(hf)
    positions = POSITIONS[which]
    concept = torch.tensor([1, 0])
    with pp.steer(model, SPEC, concept, positions=positions):
        cached, cached_logits = _hf_generate(hf, PROMPT, use_cache=True)
        plain, plain_logits = _hf_generate(hf, PROMPT, use_cache=False)
    ours = flags.generate(model, PROMPT, STEPS, SPEC, concept, positions=positions, greedy=True)
    full = _full_forward_logits(model, cached, positions)
    torch.testing.assert_close(cached_logits, full, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(plain_logits, full, rtol=1e-6, atol=1e-6)
    assert torch.equal(cached, plain)
    assert torch.equal(cached, ours)
    # the steering changes the continuation (so the positions it reaches matter)
    free, _ = _hf_generate(hf, PROMPT, use_cache=True)
    assert not torch.equal(cached, free)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_ablation_under_a_cached_generate_matches_the_uncached_one(arch):
    hf = _hf(arch)
    model = pp.hooked_hf(hf)
    with pp.ablate_flags(model, SPEC, 5.0, positions=P + 1):
        cached, cached_logits = _hf_generate(hf, PROMPT, use_cache=True)
        plain, plain_logits = _hf_generate(hf, PROMPT, use_cache=False)
        full = model(cached)[:, P - 1 : -1]
    assert torch.equal(cached, plain)
    torch.testing.assert_close(cached_logits, plain_logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cached_logits, full, rtol=1e-6, atol=1e-6)
    free, _ = _hf_generate(hf, PROMPT, use_cache=True)
    assert not torch.equal(cached, free)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("which", ["int_after_prompt", "mask"])
def test_a_left_padded_batch_is_steered_by_column(arch, which):
    """Positions are column indices of the padded batch, as in an uncached forward over it."""
    hf = _hf(arch)
    model = pp.hooked_hf(hf)
    prompt = PROMPT.clone()
    prompt[0, :2] = 0  # row 0 left-padded by two
    am = torch.ones_like(prompt)
    am[0, :2] = 0
    positions = POSITIONS[which]
    with pp.steer(model, SPEC, torch.tensor([1, 0]), positions=positions):
        cached, cached_logits = _hf_generate(hf, prompt, use_cache=True, attention_mask=am)
        plain, plain_logits = _hf_generate(hf, prompt, use_cache=False, attention_mask=am)
    assert torch.equal(cached, plain)
    torch.testing.assert_close(cached_logits, plain_logits, rtol=1e-6, atol=1e-6)
    full_am = torch.cat([am, torch.ones(2, STEPS, dtype=am.dtype)], 1)
    position_ids = (full_am.cumsum(-1) - 1).clamp(min=0)  # Hugging Face's positions of a left-padded batch
    full = _full_forward_logits(model, cached, positions, full_am, position_ids=position_ids)
    torch.testing.assert_close(cached_logits, full, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("which", ["int_after_prompt", "mask"])
def test_chunked_forwards_of_the_wrapper_with_a_cache(arch, which):
    """Forwards of the wrapper given a cache object, in chunks of 3, 1 and the rest: the logits of one forward."""
    hf = _hf(arch)
    model = pp.hooked_hf(hf)
    tokens = torch.randint(1, V, (2, 9), generator=torch.Generator().manual_seed(3))
    positions = POSITIONS[which]
    concept = torch.tensor([1, 0])
    with pp.steer(model, SPEC, concept, positions=positions):
        whole = model(tokens)
        cache = transformers.DynamicCache(config=hf.config)
        parts = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the cache's argument name differs across versions
            for a, b in ((0, 3), (3, 4), (4, 9)):
                parts.append(model(tokens[:, a:b], past_key_values=cache, use_cache=True))
    torch.testing.assert_close(torch.cat(parts, 1), whole, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(whole, model(tokens), atol=1e-3)


def test_a_mask_shorter_than_the_cached_positions_is_refused():
    hf = _hf("gpt2")
    model = pp.hooked_hf(hf)
    with pp.steer(model, SPEC, 1, positions=torch.ones(P + 1, dtype=torch.bool)):
        with pytest.raises(ValueError, match=r"positions has shape \(5,\).*positions 5\.\.5"):
            _hf_generate(hf, PROMPT, use_cache=True)


def test_a_forward_whose_cache_cannot_be_seen_refuses_positions():
    """A generic wrapper of a Hugging Face model whose inner model generates directly: its forwards do not go
    through the wrapper, whether they use a cache cannot be seen, so positions are refused; every position
    (positions=None) is steered correctly whatever the cache."""
    hf = _hf("gpt2")
    model = HookedModule(hf, gpt2_hook_points(2), n_layers=2)
    with pp.steer(model, SPEC, 1, positions=P + 1):
        with pytest.raises(RuntimeError, match=r"positions=5.*outside a forward.*flags.generate"):
            _hf_generate(hf, PROMPT, use_cache=True)
    with pp.steer(model, SPEC, 1):
        cached, cached_logits = _hf_generate(hf, PROMPT, use_cache=True)
        plain, plain_logits = _hf_generate(hf, PROMPT, use_cache=False)
        full = model(cached).logits[:, P - 1 : -1]
    assert torch.equal(cached, plain)
    torch.testing.assert_close(cached_logits, full, rtol=1e-6, atol=1e-6)


class _Tiny(torch.nn.Module):
    """A model whose forward takes a cache by keyword (TransformerLens' name), as a wrapped one may."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(V, 16).double()
        self.out = torch.nn.Linear(16, V).double()

    def forward(self, ids, past_kv_cache=None):
        return self.out(self.embed(ids))


class _Entry:
    """One layer's entry of TransformerLens' cache: its keys ``(batch, pos, heads, d_head)``."""

    def __init__(self, past: int):
        self.past_keys = torch.zeros(2, past, 2, 8)


class _LensCache:
    def __init__(self, past: int):
        self.entries = [_Entry(past)]


class _Opaque:
    pass


def _steered(model, spec, tokens, positions):
    with pp.steer(model, spec, 1, positions=positions):
        return model(tokens)


def test_a_cache_given_by_keyword_offsets_the_positions_or_is_refused():
    """A forward given a cache whose past length is readable steers absolute positions past..past + t - 1 (checked
    against the same tokens' forward with the mask shifted by hand); one whose past length cannot be read (no
    ``get_seq_length``, no ``entries``) refuses positions, naming them, and accepts positions=None."""
    model = HookedModule(_Tiny(), {"blocks.0.hook_resid_pre": "out:input"})
    spec = pp.FlagSpec("blocks.0.hook_resid_pre", dims=(0, 1, 2, 3), num_concepts=2, on_value=3.0)
    tokens = torch.tensor([[4, 7, 1], [9, 2, 5]])
    mask = torch.tensor([False, True, False, False, True, True, False, True])
    for past in (0, 2, 5):
        with pp.steer(model, spec, 1, positions=mask):
            got = model(tokens, past_kv_cache=_LensCache(past))
        with pp.steer(model, spec, 1, positions=mask[past:]):
            want = model(tokens)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        if past:  # the offset matters: the mask read from position 0 steers other positions
            assert not torch.equal(got, _steered(model, spec, tokens, mask))
        with pp.steer(model, spec, 1, positions=past + 1):
            got = model(tokens, past_kv_cache=_LensCache(past))
        with pp.steer(model, spec, 1, positions=1):
            want = model(tokens)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pp.steer(model, spec, 1, positions=2):
        with pytest.raises(RuntimeError, match=r"positions=2.*past_kv_cache=a _Opaque.*use_cache=False"):
            model(tokens, past_kv_cache=_Opaque())
    with pp.steer(model, spec, 1):
        got = model(tokens, past_kv_cache=_Opaque())
    with pp.steer(model, spec, 1):
        want = model(tokens)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
