"""TransformerLens 4.x bridges whose weights enable_compatibility_mode() processed (fold_ln, centring, folded value
biases) convert to the bridge's own processed forward; fold_ln into projections the Hugging Face class builds
without biases (GPT-J) is refused naming fold_ln=False (skipped where TransformerLens 4.x is not installed)."""

import sys
import warnings
from pathlib import Path

import pytest
import torch

import pypattern
from pypattern.models import UnsupportedModelError

pytestmark = pytest.mark.usefixtures("one_thread")
bridge_mod = pytest.importorskip("transformer_lens.model_bridge")

sys.path.insert(0, str(Path(__file__).parent))
import test_convert as tc  # noqa: E402


def _bridge(case, dtype, tmp_path, **options):
    hf = tc.hf_model(case, dtype)
    hf.config.architectures = [type(hf).__name__]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        br = bridge_mod.TransformerBridge.boot_transformers(
            case, hf_model=hf, dtype=dtype, device="cpu", tokenizer=tc._local_tokenizer(tmp_path)
        )
        br.enable_compatibility_mode(disable_warnings=True, **options)
    return br


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize(
    "case,options",
    [
        (
            "gpt2-tied",
            {},
        ),  # LayerNorm: every option folds or centres something; the tied head is centred apart
        ("llama-gqa2-biases-tied-headdim", {}),  # RMSNorm, q/k/v biases
        ("neox-parallel-rot0.25", {}),  # split copies of a fused projection, rebuilt from them
        ("gpt2-tied", {"fold_ln": False}),
        ("gpt2-tied", {"center_writing_weights": False, "center_unembed": False}),
        ("gpt2-tied", {"fold_value_biases": False}),
    ],
)
def test_processed_bridge_converts_to_its_processed_forward(case, options, dtype, tol, tmp_path):
    br = _bridge(case, dtype, tmp_path, **options)
    ours = pypattern.from_hf(br)  # with from_hf's own check against the bridge's forward
    x = tc.tokens()
    with torch.no_grad():
        got, want = ours(x), br(x)
    assert tc.rel(got, want) <= tol
    head = br.original_model.get_output_embeddings()
    if options.get("fold_ln", True) and case.startswith("gpt2"):
        # the final LayerNorm's bias, folded into the head as a bias of its own, is the converted b_U
        assert ours.cfg.unembed_bias
        torch.testing.assert_close(ours.unembed.b_U.detach(), head.bias.detach().to(dtype))
    if options.get("center_unembed", True):  # the centred head: each logit row sums to 0 over the vocabulary
        W_U = ours.unembed.W_U.detach().double()
        assert float(W_U.mean(-1).abs().max()) <= 1e-6 * float(W_U.abs().max())


def test_fold_ln_into_bias_free_projections_is_refused_naming_the_option(tmp_path):
    br = _bridge("gptj-rot4", torch.float64, tmp_path)
    with pytest.raises(UnsupportedModelError, match=r"k_proj\.bias.*fold_ln=False"):
        pypattern.from_hf(br)
    br = _bridge("gptj-rot4", torch.float64, tmp_path, fold_ln=False)
    x = tc.tokens()
    with torch.no_grad():
        assert tc.rel(pypattern.from_hf(br)(x), br(x)) <= 1e-10


@pytest.mark.parametrize(
    "kw", [dict(act_fn="gelu"), dict(normalization_type="RMS", gated_mlp=True, act_fn="silu")]
)
def test_processed_native_bridge_converts(kw):
    pytest.importorskip("transformer_lens.model_bridge.sources.native")
    from test_convert_tl_review import native

    br = native(torch.float64, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        br.enable_compatibility_mode(disable_warnings=True)
    x = torch.randint(0, 37, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert tc.rel(pypattern.from_hf(br)(x), br(x)) <= 1e-10
