"""Components as users name them on Hugging Face models: the unconverted model lists the components the converted
one does (a tied unembedding is the embedding's component, listed once); component specifications the estimators
cannot use are refused naming the component (or components=), before any sampling."""

import pytest
import torch

import pypattern as pp
from pypattern.models import list_components

transformers = pytest.importorskip("transformers")
from pypattern.models.hf_masks import hf_components  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

S = dict(num_chains=2, num_draws=3, step_size=1e-3, localization=50.0, nbeta=8.0, seed=0, quiet=True)


def _gpt2(tied: bool):
    cfg = transformers.GPT2Config(
        vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=16, tie_word_embeddings=tied
    )
    return transformers.GPT2LMHeadModel(cfg).double().eval()


def _llama(tied: bool):
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=tied,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).double().eval()


@pytest.mark.parametrize("make", [_gpt2, _llama])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("heads", [True, False])
def test_unconverted_and_converted_models_list_the_same_components(make, tied, heads):
    hf = make(tied)
    got = hf_components(hf, heads=heads)
    assert got == list_components(pp.from_hf(hf), heads=heads)
    assert ("unembed" in got) is (not tied)


def test_refined_llc_of_a_tied_model_has_one_row_per_component_on_both_forms():
    torch.manual_seed(0)
    hf = _gpt2(True)
    data = [torch.randint(0, 64, (4, 10))]
    native = pp.refined_llc(hf, data, components="heads", **S)
    converted = pp.refined_llc(pp.from_hf(hf), data, components="heads", **S)
    assert list(native.component) == list(converted.component)


def test_component_specifications_are_refused_naming_the_component():
    hf = _llama(False)
    data = [torch.randint(0, 64, (4, 10), generator=torch.Generator().manual_seed(0))]
    probe = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    W = "model.embed_tokens.weight"
    for call, error, words in (
        (
            lambda: pp.refined_llc(
                hf, data, components={"mine": {W: torch.zeros(64, 32, dtype=torch.bool)}}, **S
            ),
            ValueError,
            "component 'mine': its masks select no weight",
        ),
        (
            lambda: pp.refined_llc(
                hf, data, components={"mine": {W: torch.ones(3, 3, dtype=torch.bool)}}, **S
            ),
            ValueError,
            r"component 'mine': the mask of 'model\.embed_tokens\.weight' has shape \(3, 3\), the parameter \(64, 32\)",
        ),
        (
            lambda: pp.refined_llc(hf, data, components={"mine": {W: "all"}}, **S),
            ValueError,
            "component 'mine': the mask of 'model.embed_tokens.weight' is a str, not a mask",
        ),
        (lambda: pp.susceptibilities(hf, data, probe, None, **S), TypeError, "components=None is not valid"),
        (
            lambda: pp.susceptibilities(hf, data, probe, {"mine": {W: "all"}}, **S),
            ValueError,
            "component mask for 'model.embed_tokens.weight' must be boolean",
        ),
    ):
        with pytest.raises(error, match=words):
            call()
