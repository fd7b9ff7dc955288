"""RMS norms of a 16-bit Transformer compute in float32 (x^2 overflows float16 from |x| = 256), as Hugging Face's
and TransformerLens' do: whether the model is built in 16 bits or cast to them; an explicit norm_dtype is kept."""

import pytest
import torch

from pypattern.models import Transformer, TransformerConfig

BASE = dict(n_layers=1, d_model=16, n_heads=2, d_mlp=32, d_vocab=20, n_ctx=8, seed=0)
BIG = [
    ("hook_embed", lambda x, hook: x * 30000)
]  # a residual stream far past float16's square root of its max


@pytest.mark.parametrize("norm", ["RMS", "RMSPre"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("how", ["built", "cast"])
def test_16_bit_rms_norms_follow_the_float64_model(norm, dtype, how):
    cfg = TransformerConfig(**BASE, normalization_type=norm, qk_norm=True)
    ref_model = Transformer(cfg).double()
    tokens = torch.randint(0, 20, (2, 6), generator=torch.Generator().manual_seed(0))
    ref = ref_model.run_with_hooks(tokens, fwd_hooks=BIG)
    if how == "built":
        model = Transformer(TransformerConfig(**BASE, normalization_type=norm, qk_norm=True, dtype=dtype))
    else:
        model = Transformer(cfg).to(dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in ref_model.state_dict().items()})
    norms = [m for m in model.modules() if type(m).__name__ in ("RMSNorm", "RMSNormPre")]
    assert norms and all(m.compute_dtype == torch.float32 for m in norms)
    out = model.run_with_hooks(tokens, fwd_hooks=BIG).double()
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    # back to float32: the norms compute in the input's dtype again
    model.float()
    assert all(m.compute_dtype is None for m in norms)


def test_an_explicit_norm_dtype_is_kept():
    cfg = TransformerConfig(**BASE, normalization_type="RMS", norm_dtype=torch.float64, dtype=torch.float16)
    model = Transformer(cfg)
    assert model.blocks[0].ln1.compute_dtype == torch.float64
    model.float()
    assert model.blocks[0].ln1.compute_dtype == torch.float64
