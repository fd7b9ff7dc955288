import importlib.util

import pytest
import torch

from pypattern.models import HookedModule, Transformer, TransformerConfig
from pypattern.patching import (
    KL,
    GaussianNoise,
    LogitDiff,
    LogProb,
    MeanAblation,
    Prob,
    ZeroAblation,
    activation_patching,
)
from pypattern.tasks import symmetric_pairs

ALL_SITES = ["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z", "q", "k", "v", "pattern"]


pytestmark = pytest.mark.usefixtures("one_thread")


def model_and_prompts(dtype=torch.float64, n_layers=2, **kw):
    cfg = dict(n_layers=n_layers, d_model=16, n_heads=2, d_mlp=32, d_vocab=12, n_ctx=8, dtype=dtype, seed=5)
    cfg.update(kw)
    model = Transformer(TransformerConfig(**cfg))
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, 12, (3, 6), generator=g)
    corr = symmetric_pairs(clean, [(clean[0, 1].item(), (clean[0, 1].item() + 1) % 12)], positions=[1, 4])
    corr[:, 4] = (clean[:, 4] + 5) % 12  # make sure two positions differ in every prompt
    ans, wrong = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    return model, clean, corr, ans, wrong


def check_equal(model, clean, corr, site, tol, **kw):
    a = activation_patching(model, site, clean, corr, method="exact", **kw)
    b = activation_patching(model, site, clean, corr, method="naive", **kw)
    assert a.values.shape == b.values.shape
    err = (a.values - b.values).abs().max().item()
    assert err <= tol, f"{site} {kw}: exact and naive differ by {err}"
    return a


@pytest.mark.parametrize("site", ALL_SITES)
@pytest.mark.parametrize("per_position", [True, False])
def test_exact_equals_naive_float64(site, per_position):
    model, clean, corr, ans, wrong = model_and_prompts()
    res = check_equal(model, clean, corr, site, 1e-9, metric=LogitDiff(ans, wrong), per_position=per_position)
    # the patch really changed something: some cell moved the metric away from the corrupted run
    assert res.effect.abs().max() > 1e-3


@pytest.mark.parametrize("site", ["resid_pre", "attn_out", "z", "k", "pattern", "mlp_out"])
def test_exact_equals_naive_float32(site):
    model, clean, corr, ans, wrong = model_and_prompts(torch.float32)
    check_equal(model, clean, corr, site, 1e-4, metric=LogitDiff(ans, wrong))


@pytest.mark.parametrize("site", ["resid_pre", "resid_mid", "z", "q", "v", "pattern"])
def test_exact_equals_naive_windows_and_noising(site):
    model, clean, corr, ans, wrong = model_and_prompts(n_layers=3)
    check_equal(model, clean, corr, site, 1e-9, metric=KL(), window=2)
    check_equal(model, clean, corr, site, 1e-9, metric=LogProb(ans), direction="noising", layers=[1, 2])


@pytest.mark.parametrize("site", ["resid_pre", "k", "q", "z"])
def test_exact_equals_naive_attention_only_no_layernorm(site):
    model, clean, corr, ans, wrong = model_and_prompts(d_mlp=None, normalization_type=None, act_fn="relu")
    check_equal(model, clean, corr, site, 1e-9, metric=Prob(ans), per_position=True)
    check_equal(model, clean, corr, site, 1e-9, metric=Prob(ans), per_position=False)


def test_metric_at_other_positions_and_per_example_positions():
    model, clean, corr, ans, wrong = model_and_prompts()
    for site in ["resid_pre", "z", "k"]:
        r = check_equal(model, clean, corr, site, 1e-9, metric=LogitDiff(ans, wrong, position=3))
        # positions after the metric position cannot matter
        torch.testing.assert_close(
            r.values[..., 4:], r.corrupted.view(-1, *[1] * (r.values.dim() - 1)).expand_as(r.values[..., 4:])
        )
        check_equal(
            model, clean, corr, site, 1e-9, metric=LogitDiff(ans, wrong, position=torch.tensor([5, 2, 4]))
        )


@pytest.mark.parametrize("site", ["resid_pre", "z"])
def test_corruptions_gaussian_noise_and_ablations(site):
    model, clean, corr, ans, wrong = model_and_prompts()
    gn = GaussianNoise(positions=[1, 2], seed=3)
    a = check_equal(model, clean, None, site, 1e-9, metric=LogitDiff(ans, wrong), corruption=gn)
    assert a.effect.abs().max() > 1e-3
    for abl in [ZeroAblation(), MeanAblation()]:
        r = check_equal(
            model, clean, None, site, 1e-9, metric=LogitDiff(ans, wrong), corruption=abl, direction="noising"
        )
        assert r.corrupted is None and r.effect.abs().max() > 1e-3
        with pytest.raises(ValueError, match="needs a corrupted run"):
            _ = r.normalized


def test_gaussian_noise_scale_positions_and_seed():
    model, clean, *_ = model_and_prompts()
    gn = GaussianNoise(positions=[2], seed=7)
    n1 = gn.noise(model, 200, 6, 16, torch.float64)
    n2 = GaussianNoise(positions=[2], seed=7).noise(model, 200, 6, 16, torch.float64)
    torch.testing.assert_close(n1, n2)
    assert torch.all(n1[:, [0, 1, 3, 4, 5]] == 0)
    expected = 3.0 * model.embed.W_E.std().item()
    assert abs(n1[:, 2].std().item() / expected - 1) < 0.05


def test_full_restoration_ground_truth():
    """Patching every position of resid_pre at layer 0 restores the clean run exactly (and noising reaches the
    corrupted run); patches before the first corrupted position do nothing."""
    model, clean, corr, ans, wrong = model_and_prompts()
    met = LogitDiff(ans, wrong)
    den = activation_patching(model, "resid_pre", clean, corr, metric=met, per_position=False)
    torch.testing.assert_close(den.values[:, 0], den.clean, rtol=0, atol=1e-10)
    torch.testing.assert_close(den.normalized.mean(0)[0], torch.tensor(1.0, dtype=torch.float64))
    noi = activation_patching(
        model, "resid_pre", clean, corr, metric=met, per_position=False, direction="noising"
    )
    torch.testing.assert_close(noi.values[:, 0], noi.corrupted, rtol=0, atol=1e-10)
    # resid_post of the last layer at the metric position carries everything
    last = activation_patching(model, "resid_post", clean, corr, metric=met, layers=[1], positions=[5])
    torch.testing.assert_close(last.values[:, 0, 0], last.clean, rtol=0, atol=1e-10)
    # position 0 is identical in clean and corrupted prompts: patching it does nothing
    per = activation_patching(model, "resid_pre", clean, corr, metric=met)
    torch.testing.assert_close(per.values[:, :, 0], per.corrupted[:, None].expand(-1, 2), rtol=0, atol=1e-10)


def test_result_save_load_and_csv(tmp_path):
    model, clean, corr, ans, wrong = model_and_prompts()
    r = activation_patching(model, "resid_pre", clean, corr, metric=LogitDiff(ans, wrong))
    r.save(tmp_path / "r.pt")
    r2 = type(r).load(tmp_path / "r.pt")
    torch.testing.assert_close(r2.values, r.values)
    assert r2.axes == r.axes and r2.coords == r.coords and r2.site == "resid_pre"
    r.to_csv(tmp_path / "r.csv")
    lines = (tmp_path / "r.csv").read_text().strip().splitlines()
    assert lines[0] == "layer,pos,mean,se,ci_low,ci_high" and len(lines) == 1 + 2 * 6


def test_result_statistics():
    model, clean, corr, ans, wrong = model_and_prompts()
    r = activation_patching(model, "z", clean, corr, metric=LogitDiff(ans, wrong))
    assert r.axes == ("layer", "head", "pos") and r.values.shape == (3, 2, 2, 6)
    gap = (r.clean - r.corrupted).mean()
    torch.testing.assert_close(r.mean(), (r.values.mean(0) - r.corrupted.mean()) / gap)
    torch.testing.assert_close(r.se(normalized=False), r.values.std(0) / 3**0.5)
    lo, hi = r.ci(num_resamples=300)
    m = r.mean()
    assert torch.all(lo <= m + 1e-12) and torch.all(hi >= m - 1e-12)
    recs = r.to_records()
    assert len(recs) == 24 and set(recs[0]) == {"layer", "head", "pos", "mean", "se", "ci_low", "ci_high"}
    top = r.top(3)
    assert len(top) == 3 and abs(top[0][1]) >= abs(top[-1][1])
    if importlib.util.find_spec("pandas") is None:
        with pytest.raises(ImportError, match="pandas"):
            r.to_pandas()
    else:
        assert len(r.to_pandas()) == 24


def _module_paths(n_layers: int = 2) -> dict[str, str]:
    """Hook name -> module path of the residual stream and attention output of pypattern's Transformer."""
    pts = {}
    for layer in range(n_layers):
        pts[f"blocks.{layer}.hook_resid_pre"] = f"blocks.{layer}:input"
        pts[f"blocks.{layer}.hook_resid_post"] = f"blocks.{layer}"
        pts[f"blocks.{layer}.hook_attn_out"] = f"blocks.{layer}.attn"
    return pts


def test_generic_module_paths_match_exact():
    model, clean, corr, ans, wrong = model_and_prompts()
    pts = _module_paths()
    with pytest.raises(ValueError, match="n_layers"):
        activation_patching(HookedModule(model, pts), "resid_pre", clean, corr, metric=LogitDiff(ans, wrong))
    hm = HookedModule(model, pts, n_layers=2)
    for site in ["resid_pre", "resid_post", "attn_out"]:
        a = activation_patching(hm, site, clean, corr, metric=LogitDiff(ans, wrong))
        b = activation_patching(model, site, clean, corr, metric=LogitDiff(ans, wrong))
        assert a.method == "naive" and b.method == "exact"
        torch.testing.assert_close(a.values, b.values, rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="needs pypattern's Transformer"):
        activation_patching(hm, "z", clean, corr, metric=LogitDiff(ans, wrong))


@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_attribution_patching_through_module_paths_equals_the_transformers_own(direction):
    """AtP through a HookedModule's hook points (the path of models that are not pypattern's Transformer) equals
    AtP on the Transformer itself, an independent implementation, at every residual site the wrapper hooks."""
    from pypattern import attribution_patching

    model, clean, corr, ans, wrong = model_and_prompts()
    hm = HookedModule(model, _module_paths(), n_layers=2)
    sites = ["resid_pre", "resid_post", "attn_out"]
    for per_position in (True, False):
        kw = dict(metric=LogitDiff(ans, wrong), sites=sites, direction=direction, per_position=per_position)
        a, b = attribution_patching(hm, clean, corr, **kw), attribution_patching(model, clean, corr, **kw)
        for site in sites:
            assert a[site].axes == b[site].axes and a[site].method == b[site].method == "atp"
            torch.testing.assert_close(a[site].values, b[site].values, rtol=1e-9, atol=1e-10)
            torch.testing.assert_close(a[site].clean, b[site].clean, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(a[site].corrupted, b[site].corrupted, rtol=1e-12, atol=1e-12)
    assert float((a["resid_pre"].values - a["resid_pre"].corrupted[:, None]).abs().max()) > 1e-3
    with pytest.raises(ValueError, match=r"sites entry 'z': .* no hook point 'blocks.0.attn.hook_z'"):
        attribution_patching(hm, clean, corr, metric=LogitDiff(ans, wrong), sites="z")
    # the defaults: those of attribution_patching's default sites the wrapper has hook points for
    assert set(attribution_patching(hm, clean, corr, metric=LogitDiff(ans, wrong))) == {
        "resid_pre",
        "attn_out",
    }


def test_errors_name_the_argument():
    model, clean, corr, ans, wrong = model_and_prompts()
    met = LogitDiff(ans, wrong)
    with pytest.raises(ValueError, match="site="):
        activation_patching(model, "resid", clean, corr, metric=met)
    with pytest.raises(ValueError, match="direction='noising'"):
        activation_patching(model, "z", clean, metric=met, corruption=ZeroAblation())
    with pytest.raises(ValueError, match="corrupted_tokens has shape"):
        activation_patching(model, "z", clean, corr[:, :4], metric=met)
    with pytest.raises(ValueError, match="direction="):
        activation_patching(model, "z", clean, corr, metric=met, direction="sideways")
    with pytest.raises(ValueError, match="attention-only"):
        activation_patching(model_and_prompts(d_mlp=None)[0], "mlp_out", clean, corr, metric=met)
    with pytest.raises(ValueError, match="layers contains"):
        activation_patching(model, "z", clean, corr, metric=met, layers=[5])
    # an axis naming a value twice (after negative positions count from the end) would repeat rows
    T = clean.shape[1]
    with pytest.raises(ValueError, match="layers names 1 more than once"):
        activation_patching(model, "z", clean, corr, metric=met, layers=[1, 0, 1])
    with pytest.raises(ValueError, match="heads names 0 more than once"):
        activation_patching(model, "z", clean, corr, metric=met, heads=[0, 0])
    with pytest.raises(ValueError, match=f"positions names {T - 1} more than once"):
        activation_patching(model, "resid_pre", clean, corr, metric=met, positions=[-1, T - 1])


@pytest.mark.parametrize("kind", ["embed_scale", "embed_ln"])
def test_gaussian_noise_is_three_times_the_embedding_the_model_reads(kind):
    """With an embedding scale (Gemma) or an embedding LayerNorm (BLOOM), hook_embed is not W_E's rows: the noise
    is 3x the standard deviation of what hook_embed reads (it was 3x W_E's: 3/sqrt(d) of it, or 0.06x)."""
    from pypattern.models import Transformer, TransformerConfig

    extra = dict(embed_scale=8.0) if kind == "embed_scale" else dict(post_embedding_ln=True)
    cfg = TransformerConfig(
        n_layers=1,
        d_model=64,
        n_heads=2,
        d_mlp=None,
        d_vocab=50,
        n_ctx=6,
        dtype=torch.float64,
        seed=0,
        **extra,
    )
    model = Transformer(cfg)
    with torch.no_grad():
        read = model.embed(torch.arange(50))
    n = GaussianNoise(seed=1).noise(model, 400, 6, 64, torch.float64)
    assert abs(n.std().item() / (3.0 * read.std().item()) - 1) < 0.02
    assert abs(read.std().item() / model.embed.W_E.std().item() - 1) > 0.5  # the two really differ here
    with pytest.raises(
        ValueError, match=r"GaussianNoise.positions contains \[7\]: out of range for prompts of 6"
    ):
        GaussianNoise(positions=[7]).noise(model, 2, 6, 64, torch.float64)
    with pytest.raises(TypeError, match=r"GaussianNoise.positions contains 1.5"):
        GaussianNoise(positions=[1.5]).noise(model, 2, 6, 64, torch.float64)


def test_one_example_has_no_standard_error_and_a_string_corruption_is_refused():
    """With one example the standard error and the bootstrap interval are undefined (NaN), not a false zero; a
    corruption given by name is refused naming the classes to use."""
    model, clean, corr, ans, wrong = model_and_prompts()
    r = activation_patching(model, "resid_pre", clean[:1], corr[:1], metric=LogitDiff(ans[:1], wrong[:1]))
    assert torch.isnan(r.se()).all() and torch.isnan(r.se(normalized=False)).all()
    lo, hi = r.ci()
    assert torch.isnan(lo).all() and torch.isnan(hi).all()
    with pytest.raises(TypeError, match="corruption='zero' is not a corruption"):
        activation_patching(
            model, "z", clean, metric=LogitDiff(ans, wrong), corruption="zero", direction="noising"
        )


def test_kl_near_the_clean_run_has_no_float32_cancellation():
    """-KL of logits a rounding away from the clean ones: of the order of that rounding squared (the textbook sum
    cancels two terms of the logits' size and gave -1e-7 either side of 0 in float32), never above 0, equal to the
    float64 value, with float64's gradient; far from the clean run the usual value and gradient."""
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(6, 500, generator=g) * 3
    near = clean + 1e-6 * torch.randn(6, 500, generator=g)
    far = clean + torch.randn(6, 500, generator=g)
    mixed = torch.where(torch.arange(6)[:, None] % 2 == 0, near, far)
    m32, m64 = KL(), KL()
    m32.bind(clean)
    m64.bind(clean.double())

    def textbook(x):  # float64, the plain sum
        cl = torch.log_softmax(clean.double(), -1)
        return -(cl.exp() * (cl - torch.log_softmax(x, -1))).sum(-1)

    assert torch.equal(m32(clean), torch.zeros(6))
    v = m32(near)
    assert float(v.max()) <= 0 and float(v.abs().max()) < 1e-11  # before: |v| up to ~2e-7
    torch.testing.assert_close(v.double(), m64(near.double()), rtol=0, atol=1e-11)
    torch.testing.assert_close(m32(mixed).double(), textbook(mixed.double()), rtol=0, atol=1e-5)
    torch.testing.assert_close(
        m32(torch.stack([near, far]))[1].double(), textbook(far.double()), rtol=1e-5, atol=0
    )
    for x in (near, mixed):
        x = x.double().requires_grad_(True)
        (ga,) = torch.autograd.grad(m64(x).sum(), x)
        (gb,) = torch.autograd.grad(textbook(x).sum(), x)
        torch.testing.assert_close(ga, gb, rtol=0, atol=1e-14)
    # split with the prompts like the clean log-probabilities
    part = m32.select(torch.tensor([1, 4]))
    torch.testing.assert_close(part(mixed[[1, 4]]), m32(mixed)[[1, 4]], rtol=0, atol=0)
