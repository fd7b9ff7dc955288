"""TransformerLens 4.x bridges (run in the bench venv of bench/envs/tl.sh; skipped where TransformerLens 4.x is not
installed): a bridge with a hook attached is refused naming the hook point, and TransformerLens' random-weight
``NativeModel`` (``TransformerBridge.boot_native``) converts to the bridge's forward."""

import warnings

import pytest
import torch

import pypattern
from pypattern.models import UnsupportedModelError

pytestmark = pytest.mark.usefixtures("one_thread")
bridge_mod = pytest.importorskip("transformer_lens.model_bridge")


def native(dtype, **kw):
    pytest.importorskip("transformer_lens.model_bridge.sources.native")
    from transformer_lens.config import TransformerBridgeConfig

    cfg = TransformerBridgeConfig(
        n_layers=2, d_model=24, n_ctx=20, d_head=6, n_heads=4, d_vocab=37, seed=0, **kw
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        br = bridge_mod.TransformerBridge.boot_native(cfg, dtype=dtype).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in br.original_model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.3)
    return br


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize(
    "kw",
    [
        dict(act_fn="gelu"),
        dict(
            normalization_type="RMS",
            positional_embedding_type="rotary",
            rotary_dim=4,
            gated_mlp=True,
            act_fn="silu",
            n_key_value_heads=2,
            final_rms=True,
        ),
        dict(attn_only=True, attn_scores_soft_cap=5.0, output_logits_soft_cap=3.0, attn_scale=2.5),
    ],
)
def test_native_bridge_converts(kw, dtype, tol):
    br = native(dtype, **kw)
    ours = pypattern.from_hf(br)
    x = torch.randint(0, 37, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(x), br(x)
    assert float((a - b).abs().max() / b.abs().max()) <= tol


def test_native_bridge_options_not_reproduced_are_refused():
    with pytest.raises(UnsupportedModelError, match="act_fn='solu'"):
        pypattern.from_hf(native(torch.float32, act_fn="solu"))
    with pytest.raises(UnsupportedModelError, match="normalization_type='RMSPre'.*float32 bridge"):
        pypattern.from_hf(native(torch.float64, normalization_type="RMSPre"))


def test_a_bridge_with_a_hook_attached_is_refused_naming_it():
    br = native(torch.float64)
    br.add_hook("blocks.0.attn.hook_z", lambda z, hook: z * 0)
    with pytest.raises(UnsupportedModelError, match=r"hooks attached at \['blocks.0.attn.hook_z"):
        pypattern.from_hf(br)
    br.reset_hooks()
    pypattern.from_hf(br)


def test_an_opt_bridge_converts_and_a_users_hook_on_it_is_still_refused(tmp_path):
    """TransformerLens' OPT adapter wires the wrapped model's hook points (``fc1.hook_in``, ``fc2.hook_out``) to the
    bridge's aliases of them with functions of its own: those are not the user's, and the bridge converts (it was
    refused as having hooks attached); a function the user attaches to one of those hook points is still refused."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    import test_convert as tc

    hf = tc.hf_model("opt-relu", torch.float64)
    hf.config.architectures = [type(hf).__name__]
    bridge = bridge_mod.TransformerBridge.boot_transformers(
        "opt-relu", hf_model=hf, dtype=torch.float64, device="cpu", tokenizer=tc._local_tokenizer(tmp_path)
    )
    ours = pypattern.from_hf(bridge)
    tokens = torch.randint(0, ours.cfg.d_vocab, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, rtol=1e-10, atol=1e-10)
    bridge.add_hook("blocks.0.mlp.in.hook_in", lambda x, hook: x * 0)
    with pytest.raises(UnsupportedModelError, match=r"hooks attached at \[.*blocks\.0\.mlp\.in\.hook_in"):
        pypattern.from_hf(bridge)
