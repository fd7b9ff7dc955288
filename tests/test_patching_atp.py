import json

import pytest
import torch
from scipy.stats import spearmanr

from pypattern.models import Transformer, TransformerConfig
from pypattern.patching import LogitDiff, ZeroAblation, activation_patching
from pypattern.patching.attribution import attribution_patching, shortlist_and_confirm
from pypattern.tasks import IOITask, train

pytestmark = pytest.mark.usefixtures("one_thread")


def linear_last_layer_model():
    """Attention-only, no LayerNorm: everything after the last layer's attention pattern is linear."""
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
    corr[:, 4] = (clean[:, 4] + 5) % 12
    return model, clean, corr, LogitDiff(torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6, 7, 8]))


@pytest.mark.parametrize("per_position", [True, False])
def test_atp_is_exact_where_the_model_is_linear(per_position):
    model, clean, corr, met = linear_last_layer_model()
    sites = ["z", "v", "attn_out", "pattern", "resid_post"]
    atp = attribution_patching(model, clean, corr, metric=met, sites=sites, per_position=per_position)
    for site in sites:
        exact = activation_patching(model, site, clean, corr, metric=met, per_position=per_position)
        torch.testing.assert_close(atp[site].values[:, 1], exact.values[:, 1], rtol=0, atol=1e-9)
        assert exact.effect[:, 1].abs().max() > 1e-3
    # q and k are not linear (softmax), but with the QK fix the last layer is exact again
    star = attribution_patching(
        model, clean, corr, metric=met, sites=["q", "k"], per_position=per_position, qk_fix=True
    )
    plain = attribution_patching(model, clean, corr, metric=met, sites=["q", "k"], per_position=per_position)
    for site in ["q", "k"]:
        exact = activation_patching(model, site, clean, corr, metric=met, per_position=per_position)
        torch.testing.assert_close(star[site].values[:, 1], exact.values[:, 1], rtol=0, atol=1e-9)
        assert (
            plain[site].values[:, 1] - exact.values[:, 1]
        ).abs().max() > 1e-6  # plain AtP is only first order


def test_atp_noising_with_ablation_and_two_forwards():
    model, clean, corr, met = linear_last_layer_model()
    calls = []
    model.hook_embed.add_hook(lambda x, hook: calls.append(1))
    try:
        atp = attribution_patching(model, clean, corr, metric=met, sites=["z", "resid_pre", "k"])
    finally:
        model.hook_embed.remove_hooks()
    assert len(calls) == 2  # two forwards (source and target), one backward
    assert set(atp) == {"z", "resid_pre", "k"} and atp["z"].values.shape == (4, 2, 2, 6)
    za = attribution_patching(
        model, clean, None, metric=met, sites=["z"], corruption=ZeroAblation(), direction="noising"
    )
    ex = activation_patching(
        model, "z", clean, None, metric=met, corruption=ZeroAblation(), direction="noising"
    )
    torch.testing.assert_close(za["z"].values[:, 1], ex.values[:, 1], rtol=0, atol=1e-9)


def test_graddrop_scores():
    model, clean, corr, met = linear_last_layer_model()
    r = attribution_patching(
        model, clean, corr, metric=met, sites=["attn_out", "z"], grad_drop=True, qk_fix=True
    )
    for site in ["attn_out", "z"]:
        gd = r[site].info["graddrop"]
        assert gd.shape == r[site].values.shape and torch.all(gd >= 0)
        # the last layer's outputs reach the metric only through their own residual contribution: dropping an
        # earlier layer leaves their gradient unchanged, dropping their own layer zeroes it
        torch.testing.assert_close(gd[:, 1], r[site].effect[:, 1].abs(), rtol=0, atol=1e-9)
    assert r["z"].method == "atp*"


@pytest.fixture(scope="module")
def trained_ioi():
    task = IOITask()
    torch.manual_seed(0)
    model = Transformer(task.model_config())
    train(model, task, steps=300, seed=0)
    clean, corr, ans, wrong = task.patching_pairs(48, seed=1, corruption="abc")
    return model, clean, corr, LogitDiff(ans, wrong)


def test_atp_agrees_with_exact_on_trained_model(trained_ioi):
    model, clean, corr, met = trained_ioi
    sites = ["resid_pre", "attn_out", "z", "k"]
    atp = attribution_patching(model, clean, corr, metric=met, sites=sites, qk_fix=True)
    rho = {}
    for site in sites:
        exact = activation_patching(model, site, clean, corr, metric=met)
        assert exact.clean.mean() > exact.corrupted.mean() + 1.0  # the corruption matters
        rho[site] = spearmanr(exact.effect.mean(0).flatten(), atp[site].effect.mean(0).flatten())[0]
    assert min(rho.values()) > 0.5, rho


def test_shortlist_and_confirm(trained_ioi):
    model, clean, corr, met = trained_ioi
    rows = shortlist_and_confirm(model, "z", clean, corr, metric=met, k=4)
    assert len(rows) == 4 and abs(rows[0]["atp"]) >= abs(rows[-1]["atp"])
    exact = activation_patching(model, "z", clean, corr, metric=met)
    for r in rows:
        e = exact.effect.mean(0)[r["layer"], r["head"], r["pos"]].item()
        assert abs(e - r["exact"]) < 1e-4


@pytest.mark.parametrize(
    "kw",
    [
        dict(corruption=ZeroAblation(), direction="noising", per_position=False),
        dict(direction="noising", grad_drop=True, max_batch=1, max_memory=None),
        dict(max_batch=2, max_memory=10**6),
    ],
)
def test_shortlist_and_confirm_takes_activation_patchings_settings(kw):
    """A corruption instead of corrupted prompts, whole-sequence cells and the memory bounds reach both stages:
    each confirmed cell equals activation_patching's value of it with the same settings, and the shortlist is
    attribution_patching's ranking with them."""
    model, clean, corr, met = linear_last_layer_model()
    ablate = "corruption" in kw
    toks = () if ablate else (corr,)
    rows = shortlist_and_confirm(model, "z", clean, *toks, metric=met, k=3, **kw)
    common = {a: kw[a] for a in ("corruption", "direction", "per_position") if a in kw}
    exact = activation_patching(model, "z", clean, *toks, metric=met, **common).effect.mean(0)
    res = attribution_patching(
        model,
        clean,
        *toks,
        metric=met,
        sites=["z"],
        qk_fix=True,
        grad_drop=kw.get("grad_drop", False),
        **common,
    )["z"]
    atp = res.effect.mean(0)
    assert len(rows) == 3 and ("pos" in rows[0]) == kw.get("per_position", True)
    for r in rows:
        at = (r["layer"], r["head"]) + ((r["pos"],) if "pos" in r else ())
        assert r["exact"] == pytest.approx(exact[at].item(), abs=1e-12)
        assert r["atp"] == pytest.approx(atp[at].item(), abs=1e-12)
    # the ranking: the same values to rounding (the shortlist's batches may differ from this call's by an ulp);
    # with GradDrop by the mean GradDrop score (AtP*'s ranking), else by |mean AtP|
    if kw.get("grad_drop"):
        top = sorted(res.info["graddrop"].mean(0).flatten().tolist(), reverse=True)[:3]
        assert [r["graddrop"] for r in rows] == pytest.approx(top, rel=1e-12, abs=1e-15)
    else:
        top = sorted(atp.abs().flatten().tolist(), reverse=True)[:3]
        assert [abs(r["atp"]) for r in rows] == pytest.approx(top, rel=1e-12, abs=1e-15)


def test_patch_demo_writes_heatmap_and_table(tmp_path):
    from pypattern.experiments.patching_demo import run_patch_demo

    s = run_patch_demo(str(tmp_path), steps=40, num_prompts=12)
    assert (tmp_path / "patching_heatmap.png").stat().st_size > 10_000
    rows = (tmp_path / "patching_table.csv").read_text().strip().splitlines()
    assert rows[0] == "method,site,layer,head,pos,mean,se,ci_low,ci_high"
    assert len(rows) == 1 + 2 * (2 * 7 + 2 * 4)  # exact and AtP: resid_pre (2 x 7) and heads (2 x 4)
    assert {"accuracy", "spearman_atp_exact_resid_pre", "top_heads", "heatmap"} <= set(s)
    assert json.loads((tmp_path / "patching_summary.json").read_text()) == json.loads(json.dumps(s))


def test_atp_leaves_the_parameters_requires_grad_as_it_found_them():
    """AtP differentiates with respect to activations only; parameters the caller froze stay frozen (and the
    others trainable), also after an error inside the call."""
    model, clean, corr, met = linear_last_layer_model()
    frozen = {n for i, (n, _) in enumerate(model.named_parameters()) if i % 2 == 0}
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    attribution_patching(model, clean, corr, metric=met, sites=["z"], qk_fix=True, grad_drop=True)
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == frozen

    def bad(logits):
        raise RuntimeError("metric failed")

    with pytest.raises(RuntimeError, match="metric failed"):
        attribution_patching(model, clean, corr, metric=bad, sites=["z"])
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == frozen


def test_graddrop_on_a_one_layer_model_is_refused():
    from pypattern.models import Transformer, TransformerConfig

    model = Transformer(TransformerConfig(n_layers=1, d_model=8, n_heads=2, d_vocab=10, n_ctx=5, seed=0))
    clean = torch.randint(0, 10, (2, 5))
    met = LogitDiff(torch.tensor([1, 2]), torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="grad_drop=True needs a model of at least 2 layers"):
        attribution_patching(model, clean, clean.flip(1), metric=met, sites=["z"], grad_drop=True)
    attribution_patching(model, clean, clean.flip(1), metric=met, sites=["z"], qk_fix=True)


def test_gradient_methods_refuse_inference_mode_by_name_and_run_under_no_grad():
    import pypattern as pp
    from pypattern.circuits import edge_attribution

    m = pp.Transformer(
        n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=16, d_vocab=11, n_ctx=6, dtype=torch.float64
    )
    g = torch.Generator().manual_seed(0)
    clean, corr = torch.randint(0, 11, (2, 6), generator=g), torch.randint(0, 11, (2, 6), generator=g)
    metric = pp.LogitDiff(torch.tensor([1, 2]), torch.tensor([3, 4]))
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="inference_mode"):
            pp.attribution_patching(m, clean, corr, metric=metric)
        for method in ("eap", "eap-ig"):
            with pytest.raises(RuntimeError, match="inference_mode"):
                edge_attribution(m, clean, corr, metric=metric, method=method)
    with torch.no_grad():
        got = pp.attribution_patching(m, clean, corr, metric=metric)["z"].values
        eap = edge_attribution(m, clean, corr, metric=metric, method="eap").values
    torch.testing.assert_close(got, pp.attribution_patching(m, clean, corr, metric=metric)["z"].values)
    torch.testing.assert_close(eap, edge_attribution(m, clean, corr, metric=metric, method="eap").values)


def test_atp_warns_when_the_metric_has_no_gradient_at_the_base_run():
    """KL from the clean run, noising: its gradient at the clean run is 0, so every AtP estimate is 0 while the
    corrupted run is far from the clean one; AtP warns that its estimates say nothing (and is silent for
    LogitDiff, and for KL when denoising)."""
    import warnings

    from pypattern.patching import KL

    model = Transformer(
        TransformerConfig(
            n_layers=2, d_model=16, n_heads=2, d_mlp=32, d_vocab=20, n_ctx=8, seed=0, dtype=torch.float64
        )
    )
    g = torch.Generator().manual_seed(0)
    clean, corr = torch.randint(0, 20, (3, 6), generator=g), torch.randint(0, 20, (3, 6), generator=g)
    for max_batch in (None, 2):
        with pytest.warns(RuntimeWarning, match="gradient 0 at the clean run"):
            out = attribution_patching(
                model,
                clean,
                corr,
                metric=KL(),
                sites=["z", "resid_pre"],
                direction="noising",
                max_batch=max_batch,
            )
        assert float(out["z"].effect.abs().max()) < 1e-12
        with pytest.warns(RuntimeWarning, match="gradient 0"):
            shortlist_and_confirm(model, "z", clean, corr, metric=KL(), k=2, direction="noising")
    # without a corrupted run (zero ablation) too; and in float32 with a change far below 1
    with pytest.warns(RuntimeWarning, match="gradient 0"):
        attribution_patching(
            model, clean, metric=KL(), corruption=ZeroAblation(), sites=["z"], direction="noising"
        )

    class Tiny(LogitDiff):  # a metric whose gradient is 0 at the clean run, and small values
        def __call__(self, logits):
            d = super().__call__(logits) - self.ref
            return 1e-6 * d * d

        def of_rows(self, model, x):
            return None

    small = model.to(torch.float32)
    ans, wrong = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    met = Tiny(ans, wrong)
    met.ref = LogitDiff(ans, wrong)(small(clean)[:, -1]).detach()
    with pytest.warns(RuntimeWarning, match="every estimate is at rounding level"):
        attribution_patching(small, clean, corr, metric=met, sites=["z", "resid_pre"], direction="noising")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        attribution_patching(model, clean, corr, metric=KL(), sites=["z"], direction="denoising")
        ans, wrong = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
        attribution_patching(
            model, clean, corr, metric=LogitDiff(ans, wrong), sites=["z"], direction="noising"
        )
