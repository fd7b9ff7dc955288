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
