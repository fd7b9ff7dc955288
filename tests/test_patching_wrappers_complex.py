"""Patching on Hugging Face models inside wrappers that hold them unchanged (``nn.DataParallel``, a PEFT-style
``.base_model``), against the unwrapped model's grid; metrics returning complex values refused by name."""

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from pypattern import from_hf  # noqa: E402
from pypattern.models import hooked_hf  # noqa: E402
from pypattern.patching import LogitDiff, activation_patching, attribution_patching  # noqa: E402


def _gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=23, n_positions=16)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).double().eval()


class _Peft(nn.Module):
    """Holds the causal LM as ``base_model.model`` and forwards to it, as ``peft.PeftModel`` does."""

    def __init__(self, lm):
        super().__init__()
        self.base_model = nn.Module()
        self.base_model.model = lm

    def forward(self, *a, **k):
        return self.base_model.model(*a, **k)


def _runs():
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, 23, (3, 6), generator=g)
    corr = clean.clone()
    corr[:, 2] = (corr[:, 2] + 5) % 23
    return clean, corr, LogitDiff(torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]))


@pytest.mark.parametrize("wrap", ["dataparallel", "peft", "dataparallel_adapter"])
def test_a_wrapped_model_patches_as_the_model_inside(wrap):
    m = _gpt2()
    clean, corr, metric = _runs()
    want = activation_patching(hooked_hf(m), "resid_pre", clean, corr, metric=metric)
    w = {"dataparallel": lambda: nn.DataParallel(m), "peft": lambda: _Peft(m)}.get(
        wrap, lambda: nn.DataParallel(hooked_hf(m))
    )()
    got = activation_patching(w, "resid_pre", clean, corr, metric=metric)
    torch.testing.assert_close(got.values, want.values, rtol=0, atol=1e-12)
    torch.testing.assert_close(got.clean, want.clean, rtol=0, atol=1e-12)


def test_a_wrapper_with_parameters_of_its_own_is_refused():
    m = _gpt2()
    w = _Peft(m)
    w.prompt = nn.Parameter(torch.zeros(3, 16, dtype=torch.float64))
    clean, corr, metric = _runs()
    with pytest.raises(ValueError, match="parameters outside"):
        activation_patching(w, "resid_pre", clean, corr, metric=metric)


def test_a_metric_of_complex_values_is_refused_by_name():
    m = _gpt2()
    clean, corr, _ = _runs()

    def metric(lg):
        return lg[..., 0] + 1j * lg[..., 1]

    for call in (
        lambda: activation_patching(hooked_hf(m), "resid_pre", clean, corr, metric=metric),
        lambda: attribution_patching(from_hf(m), clean, corr, metric=metric, sites=["resid_pre"]),
    ):
        with pytest.raises(ValueError, match="complex"):
            call()


def _llama():
    cfg = transformers.LlamaConfig(
        vocab_size=23, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(2)
    return transformers.LlamaForCausalLM(cfg).double().eval()


@pytest.mark.parametrize("wrap", ["dataparallel", "peft", "adapter"])
def test_wrapped_models_convert_as_the_model_inside_for_head_sites_atp_and_circuits(wrap):
    from pypattern import circuits

    m = _llama()
    w = {"dataparallel": nn.DataParallel, "peft": _Peft, "adapter": hooked_hf}[wrap](m)
    clean, corr, metric = _runs()
    ref = from_hf(m)
    for p1, p2 in zip(from_hf(w).parameters(), ref.parameters(), strict=True):
        assert torch.equal(p1, p2)
    got = activation_patching(w, "z", clean, corr, metric=metric)
    want = activation_patching(m, "z", clean, corr, metric=metric)
    torch.testing.assert_close(got.values, want.values, rtol=0, atol=1e-12)
    got = attribution_patching(w, clean, corr, metric=metric, sites=["z"])
    want = attribution_patching(ref, clean, corr, metric=metric, sites=["z"])
    torch.testing.assert_close(got["z"].values, want["z"].values, rtol=0, atol=1e-12)
    got = circuits.edge_attribution(w, clean, corr, metric=metric, method="eap")
    want = circuits.edge_attribution(ref, clean, corr, metric=metric, method="eap")
    torch.testing.assert_close(got.scores, want.scores, rtol=0, atol=1e-12)
