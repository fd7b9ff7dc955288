"""attribution_patching(max_batch=...): prompts in parts of at most max_batch per forward and backward, with the
same result as one pass over all of them."""

import pytest
import torch

from pypattern.models import Transformer, TransformerConfig
from pypattern.patching import (
    KL,
    GaussianNoise,
    LogitDiff,
    LogProb,
    MeanAblation,
    Metric,
    ZeroAblation,
)
from pypattern.patching.attribution import attribution_patching

pytestmark = pytest.mark.usefixtures("one_thread")

V, B, T = 23, 7, 6


def _model(**kw):
    cfg = dict(
        n_layers=2, d_model=24, n_heads=4, d_mlp=32, d_vocab=V, n_ctx=8, seed=3, dtype=torch.float64, **kw
    )
    return Transformer(TransformerConfig(**cfg)).eval()


def _data():
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, V, (B, T), generator=g)
    corr = clean.clone()
    corr[:, 2] = (clean[:, 2] + 5) % V
    ans, wrong = torch.randint(0, V, (B,), generator=g), torch.randint(0, V, (B,), generator=g)
    return clean, corr, ans, wrong


def _equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for site in a:
        x, y = a[site], b[site]
        assert x.values.shape == y.values.shape and x.axes == y.axes
        torch.testing.assert_close(x.values, y.values, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x.clean, y.clean, rtol=1e-12, atol=1e-12)
        if y.corrupted is None:
            assert x.corrupted is None
        else:
            torch.testing.assert_close(x.corrupted, y.corrupted, rtol=1e-12, atol=1e-12)
        if "graddrop" in y.info:
            torch.testing.assert_close(x.info["graddrop"], y.info["graddrop"], rtol=1e-12, atol=1e-12)


def _batches_seen(model):
    """Record the batch size of every forward of ``model`` (through hook_embed)."""
    seen = []
    model.hook_embed.add_hook(lambda x, hook: seen.append(x.shape[0]))
    return seen


@pytest.mark.parametrize("arch", [{}, dict(positional_embedding_type="rotary", n_key_value_heads=2)])
@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_parts_equal_one_pass_atp_star(arch, direction):
    model = _model(**arch)
    clean, corr, ans, wrong = _data()
    pos = torch.tensor([5, 4, 5, 3, 5, 2, 5])  # per-example metric positions are split with the prompts
    kw = dict(
        metric=LogitDiff(ans, wrong, position=pos),
        sites=["resid_pre", "z", "q", "k", "v", "pattern", "mlp_out"],
        qk_fix=True,
        grad_drop=True,
        direction=direction,
    )
    whole = attribution_patching(model, clean, corr, **kw)
    seen = _batches_seen(model)
    parts = attribution_patching(model, clean, corr, max_batch=3, **kw)
    model.reset_hooks()
    _equal(parts, whole)
    assert seen and max(seen) <= 3 and sum(seen) % B == 0


@pytest.mark.parametrize(
    "corruption,direction",
    [
        (GaussianNoise(positions=[1, 2], seed=4), "denoising"),
        (ZeroAblation(), "noising"),
        (MeanAblation(), "noising"),  # the mean over all the clean prompts, not over each part
        (
            MeanAblation(
                reference_tokens=torch.randint(0, V, (5, T), generator=torch.Generator().manual_seed(9))
            ),
            "noising",
        ),
    ],
)
def test_parts_equal_one_pass_for_each_corruption(corruption, direction):
    model = _model()
    clean, _, ans, _ = _data()
    # with GradDrop the target run also holds the residual stream, which ablations must not read as sources
    kw = dict(
        metric=LogProb(ans),
        sites=["resid_pre", "z"],
        corruption=corruption,
        direction=direction,
        grad_drop=True,
    )
    whole = attribution_patching(model, clean, **kw)
    parts = attribution_patching(model, clean, max_batch=2, **kw)
    _equal(parts, whole)


def test_kl_metric_binds_each_part_to_its_own_clean_run():
    model = _model()
    clean, corr, _, _ = _data()
    whole = attribution_patching(model, clean, corr, metric=KL(), sites=["attn_out"], per_position=False)
    parts = attribution_patching(
        model, clean, corr, metric=KL(), sites=["attn_out"], per_position=False, max_batch=4
    )
    _equal(parts, whole)


def test_bad_max_batch_and_plain_callable_metric_are_refused():
    model = _model()
    clean, corr, ans, wrong = _data()
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_batch"):
            attribution_patching(model, clean, corr, metric=LogitDiff(ans, wrong), max_batch=bad)
    fn = lambda logits: logits[..., 0] - logits[..., 1]  # noqa: E731
    with pytest.raises(ValueError, match="max_batch needs a Metric"):
        attribution_patching(model, clean, corr, metric=fn, sites=["z"], max_batch=2)
    # a plain callable works in one pass, and max_batch >= the prompts is one pass
    one = attribution_patching(model, clean, corr, metric=fn, sites=["z"], max_batch=B)
    _equal(one, attribution_patching(model, clean, corr, metric=fn, sites=["z"]))


def test_a_metric_with_an_undeclared_per_example_tensor_is_refused():
    class Target(Metric):
        def __init__(self, target):
            super().__init__()
            self.target = target

        def __call__(self, logits):
            return logits.gather(-1, self.target.expand(*logits.shape[:-2], -1).unsqueeze(-1)).squeeze(-1)

    model = _model()
    clean, corr, ans, _ = _data()
    with pytest.raises(ValueError, match=r"metric.target has 7 entries.*per_example"):
        attribution_patching(model, clean, corr, metric=Target(ans), sites=["z"], max_batch=3)

    class Declared(Target):
        per_example = ("target",)

    whole = attribution_patching(model, clean, corr, metric=Declared(ans), sites=["z"])
    _equal(attribution_patching(model, clean, corr, metric=Declared(ans), sites=["z"], max_batch=3), whole)
