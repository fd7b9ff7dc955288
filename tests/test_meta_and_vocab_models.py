"""Models the estimators cannot run are refused by name before any computation: weights on the meta device
(shapes without values) given to the converter, patching, attribution patching and circuits; a Hugging Face model
whose output head scores another vocabulary than its embedding holds, given to the converter."""

import pytest
import torch

import pypattern as pp
from pypattern.circuits import edge_attribution
from pypattern.models.convert import UnsupportedModelError

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")


def _hf(kind: str):
    if kind == "gpt2":
        return transformers.GPT2LMHeadModel(
            transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=16)
        ).eval()
    return transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            tie_word_embeddings=False,
        )
    ).eval()  # fmt: skip


def _prompts():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 100, (2, 5), generator=g), torch.randint(0, 100, (2, 5), generator=g)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_a_model_on_the_meta_device_is_refused_by_name(kind):
    with torch.device("meta"):
        hf = _hf(kind)
    clean, corr = _prompts()
    metric = pp.KL()
    calls = {
        "from_hf": lambda: pp.from_hf(hf),
        "activation_patching": lambda: pp.activation_patching(
            hf, "resid_pre", clean, corr, metric=metric, quiet=True
        ),
        "attribution_patching": lambda: pp.attribution_patching(hf, clean, corr, metric=metric),
        "edge_attribution": lambda: edge_attribution(hf, clean, corr, metric=metric),
    }
    for call in calls.values():
        with pytest.raises(ValueError, match=r"model has parameters on the meta device .*e\.g\. '"):
            call()
    # pypattern's own model on the meta device too
    with torch.device("meta"):
        own = pp.Transformer(n_layers=1, d_model=16, n_heads=2, d_mlp=16, d_vocab=100, n_ctx=8, seed=0)
    for call in (
        lambda: pp.activation_patching(own, "z", clean, corr, metric=metric, quiet=True),
        lambda: pp.attribution_patching(own, clean, corr, metric=metric),
        lambda: edge_attribution(own, clean, corr, metric=metric),
    ):
        with pytest.raises(ValueError, match="meta device"):
            call()


def test_an_output_head_of_another_vocabulary_is_refused_by_name():
    hf = _hf("llama")
    hf.lm_head = torch.nn.Linear(32, 128, bias=False)
    with pytest.raises(
        UnsupportedModelError, match="output head scores 128 tokens but its input embedding holds 100"
    ):
        pp.from_hf(hf)


def _offloaded(model):
    """accelerate's offloading as its hooks do it: every weight on the meta device between forwards, loaded onto
    the CPU (the execution device) for each module's forward, and a ``_hf_hook`` on each module."""
    import functools

    for m in model.modules():
        own = {n: p.detach().clone() for n, p in m.named_parameters(recurse=False)}
        if not own:
            continue
        for n in own:
            setattr(m, n, torch.nn.Parameter(torch.empty_like(own[n], device="meta"), requires_grad=False))
        m._hf_hook = object()
        fwd = m.forward

        @functools.wraps(fwd)
        def forward(*a, _m=m, _own=own, _fwd=fwd, **k):
            a = tuple(x.to("cpu") if isinstance(x, torch.Tensor) else x for x in a)
            for n, w in _own.items():
                setattr(_m, n, torch.nn.Parameter(w, requires_grad=False))
            try:
                return _fwd(*a, **k)
            finally:
                for n, w in _own.items():
                    setattr(
                        _m, n, torch.nn.Parameter(torch.empty_like(w, device="meta"), requires_grad=False)
                    )

        m.forward = forward
    return model


def test_an_offloaded_model_runs_the_default_loss_and_patching_as_the_model_itself():
    """Weights offloaded (on the meta device between forwards, accelerate's hooks loading them): the default loss
    and residual patching read the batch where the forward runs and equal the plain model's."""
    torch.manual_seed(0)
    plain = _hf("gpt2")
    clean, corr = _prompts()
    metric = pp.LogitDiff(torch.tensor([1, 2]), torch.tensor([3, 4]))
    want_loss = pp.losses.batch_loss(plain, clean)
    want = pp.activation_patching(plain, "resid_pre", clean, corr, metric=metric, quiet=True)
    import copy

    off = _offloaded(copy.deepcopy(plain))
    assert next(off.parameters()).device.type == "meta"
    torch.testing.assert_close(pp.losses.batch_loss(off, clean), want_loss, rtol=0, atol=0)
    got = pp.activation_patching(off, "resid_pre", clean, corr, metric=metric, quiet=True)
    torch.testing.assert_close(got.values, want.values, rtol=1e-6, atol=1e-6)
