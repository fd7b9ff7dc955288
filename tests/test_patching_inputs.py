"""Bad inputs to activation and attribution patching raise errors naming the argument (no silent reinterpretation)."""

import pytest
import torch

from pypattern.models import Transformer, TransformerConfig
from pypattern.patching import LogitDiff, activation_patching
from pypattern.patching.attribution import attribution_patching

pytestmark = pytest.mark.usefixtures("one_thread")


def small():
    cfg = TransformerConfig(
        n_layers=2,
        d_model=16,
        n_heads=2,
        d_mlp=None,
        d_vocab=12,
        n_ctx=8,
        normalization_type=None,
        dtype=torch.float64,
        seed=2,
    )
    model = Transformer(cfg)
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 12, (4, 6), generator=g)
    corr = clean.clone()
    corr[:, 2] = (clean[:, 2] + 3) % 12
    return model, clean, corr, LogitDiff(torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6, 7, 8]))


class BatchMean(LogitDiff):
    def __call__(self, logits):
        return super().__call__(logits).mean(-1)


@pytest.mark.parametrize("which", ["exact", "naive", "atp"])
def test_batch_mean_metric_is_refused_everywhere(which):
    model, clean, corr, m = small()
    metric = BatchMean(m.answer, m.wrong)
    with pytest.raises(ValueError, match=r"metric returned shape \(\).*expected.*\(4,\)"):
        if which == "atp":
            attribution_patching(model, clean, corr, metric=metric, sites=["resid_pre"])
        else:
            activation_patching(model, "resid_pre", clean, corr, metric=metric, method=which)
