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


@pytest.mark.parametrize("positions", [[6], [-7], [0, 9]])
def test_positions_past_the_prompt_are_refused(positions):
    model, clean, corr, m = small()
    with pytest.raises(ValueError, match=r"positions contains .*6 positions"):
        activation_patching(model, "resid_pre", clean, corr, metric=m, positions=positions)


def test_negative_positions_in_range_still_count_from_the_end():
    model, clean, corr, m = small()
    a = activation_patching(model, "resid_pre", clean, corr, metric=m, positions=[-1, 2])
    b = activation_patching(model, "resid_pre", clean, corr, metric=m, positions=[5, 2])
    assert a.coords["pos"] == [5, 2]
    torch.testing.assert_close(a.values, b.values)


@pytest.mark.parametrize("bad", [-1, 12])
@pytest.mark.parametrize("argument", ["clean_tokens", "corrupted_tokens"])
@pytest.mark.parametrize("which", ["exact", "atp"])
def test_out_of_vocabulary_token_ids_are_refused(bad, argument, which):
    model, clean, corr, m = small()
    toks = {"clean_tokens": clean.clone(), "corrupted_tokens": corr.clone()}
    toks[argument][1, 3] = bad
    with pytest.raises(ValueError, match=rf"{argument} contains token id {bad}; valid ids are 0 .. 11"):
        if which == "atp":
            attribution_patching(model, toks["clean_tokens"], toks["corrupted_tokens"], metric=m, sites=["z"])
        else:
            activation_patching(model, "z", toks["clean_tokens"], toks["corrupted_tokens"], metric=m)


def test_float_and_1d_tokens_are_refused():
    model, clean, corr, m = small()
    with pytest.raises(TypeError, match="clean_tokens has dtype torch.float"):
        activation_patching(model, "resid_pre", clean.double(), corr, metric=m)
    with pytest.raises(ValueError, match=r"clean_tokens has shape \(6,\)"):
        activation_patching(model, "resid_pre", clean[0], corr[0], metric=m)


def test_window_longer_than_the_model_is_refused():
    model, clean, corr, m = small()
    with pytest.raises(ValueError, match="window=3 is longer than the model's 2 layers"):
        activation_patching(model, "resid_pre", clean, corr, metric=m, window=3)
    r = activation_patching(model, "resid_pre", clean, corr, metric=m, window=2)
    assert r.values.shape == (4, 1, 6)


@pytest.mark.parametrize("which", ["exact", "atp"])
def test_corruption_with_corrupted_tokens_is_ambiguous(which):
    from pypattern.patching import GaussianNoise

    model, clean, corr, m = small()
    with pytest.raises(ValueError, match="corrupted_tokens and corruption=GaussianNoise.*ambiguous"):
        if which == "atp":
            attribution_patching(model, clean, corr, metric=m, corruption=GaussianNoise(), sites=["z"])
        else:
            activation_patching(model, "z", clean, corr, metric=m, corruption=GaussianNoise())


def test_normalising_with_identical_runs_warns_and_gives_nan():
    model, clean, corr, m = small()
    r = activation_patching(model, "resid_pre", clean, clean.clone(), metric=m)
    torch.testing.assert_close(r.clean, r.corrupted)
    with pytest.warns(RuntimeWarning, match=r"m_clean == m_corrupted: \[0, 1, 2, 3\]"):
        n = r.normalized
    assert n.shape == r.values.shape and torch.isnan(n).all()
    with pytest.warns(RuntimeWarning, match="resamples"):
        lo, hi = r.ci(num_resamples=20)
    assert torch.isnan(lo).all() and torch.isnan(hi).all()
    # a defined gap gives finite values, with no warning
    r2 = activation_patching(model, "resid_pre", clean, corr, metric=m)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        n2 = r2.normalized
    expected = (r2.values - r2.corrupted[:, None, None]) / (r2.clean - r2.corrupted).mean()
    torch.testing.assert_close(n2, expected)


def test_minibatch_cka_refuses_a_batch_whose_width_changed():
    from pypattern.equivalence import MinibatchCKA

    g = torch.Generator().manual_seed(0)
    acc = MinibatchCKA(num_x=2, num_y=1)
    acc.update(
        [torch.randn(8, 5, generator=g), torch.randn(8, 3, generator=g)], [torch.randn(8, 4, generator=g)]
    )
    with pytest.raises(ValueError, match=r"batch 1: xs\[1\] has 6 features, but batch 0 had 3"):
        acc.update(
            [torch.randn(8, 5, generator=g), torch.randn(8, 6, generator=g)], [torch.randn(8, 4, generator=g)]
        )
    with pytest.raises(ValueError, match=r"batch 1: ys\[0\] has 2 features, but batch 0 had 4"):
        acc.update(
            [torch.randn(8, 5, generator=g), torch.randn(8, 3, generator=g)], [torch.randn(8, 2, generator=g)]
        )
    assert acc.num_batches == 1


def test_metric_positions_per_example_out_of_range_are_refused():
    """A per-example metric position past the prompt is an error (it used to wrap around to another position);
    circuits read positions through the same check."""
    from pypattern.circuits.engine import metric_positions as circuit_positions
    from pypattern.patching.metrics import metric_positions

    metric = LogitDiff(torch.tensor([1, 2]), torch.tensor([3, 4]), position=torch.tensor([2, 9]))
    for fn in (metric_positions, circuit_positions):
        with pytest.raises(ValueError, match="metric.position"):
            fn(metric, 2, 6)
    ok = LogitDiff(torch.tensor([1, 2]), torch.tensor([3, 4]), position=torch.tensor([-1, 2]))
    assert metric_positions(ok, 2, 6).tolist() == [5, 2]
    same = LogitDiff(torch.tensor([1, 2]), torch.tensor([3, 4]), position=torch.tensor([4, -2]))
    assert circuit_positions(same, 2, 6) == 4


_WRONG_METRICS = {
    "B-1": (lambda m: lambda logits: m(logits).unsqueeze(-1), ValueError, r"metric returned shape \(4, 1\)"),
    "scalar": (lambda m: lambda logits: m(logits).mean(-1), ValueError, r"metric returned shape \(\)"),
    "B-3": (lambda m: lambda logits: logits[..., :3], ValueError, r"metric returned shape \(4, 3\)"),
    "float": (lambda m: lambda logits: 1.0, TypeError, "metric returned float"),
}


@pytest.mark.parametrize("shape", list(_WRONG_METRICS))
@pytest.mark.parametrize(
    "which", ["exact", "naive", "atp", "patch_edges", "edge_attribution", "faithfulness"]
)
def test_metric_of_the_wrong_shape_is_refused_everywhere(shape, which):
    """The metric contract (logits (..., batch, vocab) -> per-example values (..., batch)) is enforced by exact
    and attribution patching and by circuits alike; the error names the metric, the shape and what is expected.
    Plain callables are accepted (nothing to bind), so the check is what the user meets."""
    from pypattern import circuits

    model, clean, corr, m = small()
    make, exc, match = _WRONG_METRICS[shape]
    metric = make(m)
    with pytest.raises(exc, match=match + r".*\(4,\)"):
        if which == "atp":
            attribution_patching(model, clean, corr, metric=metric, sites=["resid_pre"])
        elif which in ("exact", "naive"):
            activation_patching(model, "resid_pre", clean, corr, metric=metric, method=which)
        elif which == "patch_edges":
            circuits.patch_edges(model, [], clean, corr, metric=metric)
        elif which == "edge_attribution":
            circuits.edge_attribution(model, clean, corr, metric=metric)
        else:
            circuits.faithfulness(model, [], clean, corr, metric=metric)


def test_plain_callable_metric_equals_the_metric_object():
    """A plain callable (no .bind, no .position: read at the last position) gives exactly the values of the
    Metric it wraps, in exact and attribution patching and in circuits; a non-callable metric is a TypeError."""
    from pypattern import circuits

    model, clean, corr, m = small()
    fn = lambda logits: m(logits)
    a = activation_patching(model, "resid_pre", clean, corr, metric=m)
    b = activation_patching(model, "resid_pre", clean, corr, metric=fn)
    # LogitDiff itself reads only its two columns of the unembedding (another order of the same sums)
    torch.testing.assert_close(a.values, b.values, rtol=0, atol=1e-12)
    a = attribution_patching(model, clean, corr, metric=m, sites=["z"])["z"]
    b = attribution_patching(model, clean, corr, metric=fn, sites=["z"])["z"]
    torch.testing.assert_close(a.values, b.values, rtol=0, atol=1e-12)
    a = circuits.edge_attribution(model, clean, corr, metric=m)
    b = circuits.edge_attribution(model, clean, corr, metric=fn)
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=0)
    with pytest.raises(TypeError, match="metric must be a Metric .* or a callable .*got str"):
        activation_patching(model, "resid_pre", clean, corr, metric="logit_diff")
    with pytest.raises(TypeError, match="metric must be a Metric .* or a callable .*got NoneType"):
        attribution_patching(model, clean, corr, metric=None, sites=["z"])


@pytest.mark.parametrize("argument", ["clean", "corrupted"])
@pytest.mark.parametrize("which", ["atp", "patch_edges", "edge_attribution"])
def test_1d_tokens_are_refused_naming_the_argument(argument, which):
    """1-D prompts (one sequence without its batch axis) are refused naming the argument, as in exact patching
    (tests above): patching names them clean_tokens/corrupted_tokens, circuits clean/corrupted."""
    from pypattern import circuits

    model, clean, corr, m = small()
    toks = {"clean": clean, "corrupted": corr}
    toks[argument] = toks[argument][0]
    name = argument + ("_tokens" if which == "atp" else "")
    with pytest.raises(ValueError, match=rf"{name} has shape \(6,\); give \(batch, pos\)"):
        if which == "atp":
            attribution_patching(model, toks["clean"], toks["corrupted"], metric=m, sites=["z"])
        elif which == "patch_edges":
            circuits.patch_edges(model, [], toks["clean"], toks["corrupted"], metric=m)
        else:
            circuits.edge_attribution(model, toks["clean"], toks["corrupted"], metric=m)


def test_grid_selections_that_would_be_ignored_are_refused():
    """positions= without per_position, heads= on a site without heads, non-integer selections: errors naming the
    argument, where they were ignored or truncated."""
    model, clean, corr, m = small()
    with pytest.raises(ValueError, match=r"positions=\[1\] is given with per_position=False"):
        activation_patching(model, "resid_pre", clean, corr, metric=m, positions=[1], per_position=False)
    with pytest.raises(ValueError, match=r"heads=\[1\] is given, but site 'resid_pre' has no heads"):
        activation_patching(model, "resid_pre", clean, corr, metric=m, heads=[1])
    with pytest.raises(TypeError, match=r"positions contains 1.5"):
        activation_patching(model, "resid_pre", clean, corr, metric=m, positions=[1.5])
    with pytest.raises(TypeError, match=r"layers must hold integers"):
        activation_patching(model, "resid_pre", clean, corr, metric=m, layers=torch.tensor([0.0]))
    with pytest.raises(TypeError, match=r"metric.position must be an int or integer positions"):
        activation_patching(
            model,
            "resid_pre",
            clean,
            corr,
            metric=LogitDiff(m.answer, m.wrong, position=torch.tensor([1.7] * 4)),
        )
    # an int, a tensor or numpy array of ints select as a list does
    import numpy as np

    want = activation_patching(model, "z", clean, corr, metric=m, layers=[1], heads=[0], positions=[2]).values
    for sel in (
        dict(layers=1, heads=0, positions=2),
        dict(layers=torch.tensor([1]), heads=np.array([0]), positions=[np.int64(2)]),
    ):
        got = activation_patching(model, "z", clean, corr, metric=m, **sel).values
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("which", ["exact", "atp"])
def test_metric_answers_are_checked_by_name(which):
    model, clean, corr, m = small()

    def call(metric):
        if which == "atp":
            return attribution_patching(model, clean, corr, metric=metric, sites=["z"])["z"].values
        return activation_patching(model, "z", clean, corr, metric=metric).values

    with pytest.raises(ValueError, match=r"answer has shape \(3,\); give one token id per example \(4,\)"):
        call(LogitDiff(m.answer[:3], m.wrong[:3]))
    with pytest.raises(ValueError, match=r"wrong contains the token id 12; the logits have 12 entries"):
        call(LogitDiff(m.answer, torch.tensor([5, 6, 7, 12])))
    with pytest.raises(ValueError, match=r"answer contains the token id -1"):
        call(LogitDiff(torch.tensor([1, 2, 3, -1]), m.wrong))
    with pytest.raises(TypeError, match=r"answer must hold integer token ids"):
        call(LogitDiff(m.answer.double(), m.wrong))
    # one id for every example: the same as repeating it
    torch.testing.assert_close(
        call(LogitDiff(3, 5)), call(LogitDiff(torch.full((4,), 3), torch.full((4,), 5)))
    )


def test_metrics_that_do_not_map_runs_to_runs_are_refused_by_the_exact_engine():
    """The exact engine calls the metric on stacks of runs (cells, batch, vocab): a metric that indexes the
    batch axis as the first axis, or couples the runs, is refused with the reason instead of failing inside."""
    model, clean, corr, _ = small()
    ans = torch.tensor([1, 2, 3, 4])
    first_axis = lambda lg: lg[torch.arange(4), ans]  # noqa: E731 - (batch, vocab) only
    coupled = lambda lg: lg[..., 1] - lg[..., 1].mean()  # noqa: E731 - a mean over every run
    with pytest.raises(ValueError, match=r"metric fails on a stack of runs \(3, 4, vocab\)"):
        activation_patching(model, "z", clean, corr, metric=first_axis)
    with pytest.raises(ValueError, match=r"couples the runs"):
        activation_patching(model, "z", clean, corr, metric=coupled)
    ok = lambda lg: lg[..., 1] - lg[..., 1].mean(-1, keepdim=True)  # noqa: E731 - within a run: allowed
    activation_patching(model, "z", clean, corr, metric=ok)


@pytest.mark.parametrize(
    "opts", [{}, dict(unembed_bias=True, logits_scaling=2.5, output_logits_soft_cap=4.0)]
)
def test_logit_difference_from_its_columns_equals_the_full_logits(opts):
    """The exact engine computes a LogitDiff from the answer and wrong columns of the unembedding only (with its
    bias, logits scaling and soft cap per logit): equal to the metric of the full logits."""
    from pypattern.patching.engine import metric_of_rows, unembed_rows

    cfg = TransformerConfig(
        n_layers=1,
        d_model=16,
        n_heads=2,
        d_mlp=None,
        d_vocab=40,
        n_ctx=6,
        dtype=torch.float64,
        seed=3,
        **opts,
    )
    model = Transformer(cfg)
    if opts:
        with torch.no_grad():
            model.unembed.b_U.normal_()
    x = torch.randn(3, 4, 16, dtype=torch.float64)
    for m in (
        LogitDiff(torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6, 7, 8])),
        LogitDiff(torch.tensor([[1, 9], [2, 3], [3, 3], [0, 39]]), 7),
    ):
        got = metric_of_rows(model, x, m)
        want = m(unembed_rows(model, x))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        assert got.shape == (3, 4)


def test_a_site_an_unconverted_model_has_no_hook_for_is_refused_by_name():
    """GPT-NeoX (attention and MLP in parallel) has no resid_mid: the unconverted model's patching says so, as the
    converted model's does."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPTNeoXConfig(
        vocab_size=61,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=24,
        max_position_embeddings=16,
        rotary_pct=0.5,
    )
    hf = transformers.GPTNeoXForCausalLM(cfg).eval()
    clean = torch.randint(0, 61, (2, 5))
    corr = torch.randint(0, 61, (2, 5))
    metric = LogitDiff(torch.tensor([1, 2]), torch.tensor([3, 4]))
    with pytest.raises(
        ValueError, match="site='resid_mid' does not exist in this model.*blocks.0.hook_resid_mid"
    ):
        activation_patching(hf, "resid_mid", clean, corr, metric=metric)
    grid = activation_patching(hf, "resid_post", clean, corr, metric=metric)
    assert grid.values.shape[:2] == (2, 2)


def test_corruption_metric_and_size_settings_are_checked():
    """Empty reference prompts, non-finite or negative noise scales, a bool metric position, non-bool
    per_position, unusable memory limits, empty site lists and empty batches are refused by name."""
    from pypattern.patching import GaussianNoise, LogProb, MeanAblation

    model, clean, corr, metric = small()
    with pytest.raises(ValueError, match="MeanAblation.reference_tokens"):
        MeanAblation(torch.zeros(0, 6, dtype=torch.long))
    for kw in (dict(std=float("nan")), dict(std=-1.0), dict(std_multiplier=float("inf"))):
        with pytest.raises(ValueError, match="GaussianNoise"):
            GaussianNoise(**kw)
    with pytest.raises(ValueError, match="position=True is not valid"):
        LogProb(torch.tensor([1, 2, 3, 4]), position=True)
    with pytest.raises(TypeError, match="per_position='no'"):
        activation_patching(model, "resid_pre", clean, corr, metric=metric, per_position="no")
    with pytest.raises(TypeError, match="per_position='no'"):
        attribution_patching(model, clean, corr, metric=metric, per_position="no")
    for mm in (True, float("inf"), "1GB"):
        with pytest.raises(ValueError, match="max_memory=.* is not valid"):
            activation_patching(model, "resid_pre", clean, corr, metric=metric, max_memory=mm)
    with pytest.raises(ValueError, match="sites is empty"):
        attribution_patching(model, clean, corr, metric=metric, sites=[])
    with pytest.raises(ValueError, match="clean_tokens has shape"):
        activation_patching(model, "resid_pre", clean[:0], corr[:0], metric=metric)


def test_mean_ablation_reference_with_per_example_positions_and_shortlist_on_hf_models():
    """AtP of a mean ablation over other reference prompts with per-example metric positions runs (it crashed)
    and equals the same AtP in parts of two prompts (a path that worked); a Hugging
    Face model in train() mode is patched with its eval() forward (warned, deterministic); shortlist_and_confirm
    takes a Hugging Face model."""
    transformers = pytest.importorskip("transformers")
    from pypattern.patching import LogProb, MeanAblation
    from pypattern.patching.attribution import shortlist_and_confirm

    model, clean, corr, _ = small()
    ref = torch.randint(0, 12, (3, 6), generator=torch.Generator().manual_seed(5))
    m = LogProb(torch.tensor([1, 2, 3, 4]), position=torch.tensor([1, 5, 2, 4]))
    kw = dict(metric=m, corruption=MeanAblation(ref), direction="noising", sites=["z", "resid_pre"])
    atp = attribution_patching(model, clean, **kw)
    parts = attribution_patching(model, clean, max_batch=2, **kw)
    for site in atp:
        torch.testing.assert_close(atp[site].values, parts[site].values, rtol=1e-9, atol=1e-9)
    hf = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=12, n_positions=8, n_embd=16, n_layer=2, n_head=2)
    )
    assert hf.training
    x, y = clean[:2], corr[:2]
    metric = LogitDiff(torch.tensor([1, 2]), torch.tensor([3, 4]))
    with pytest.warns(UserWarning, match="training mode and has dropout"):
        a = activation_patching(hf, "resid_pre", x, y, metric=metric)
    with pytest.warns(UserWarning, match="training mode and has dropout"):
        b = activation_patching(hf, "resid_pre", x, y, metric=metric)
    torch.testing.assert_close(a.values, b.values, rtol=0, atol=0)
    assert hf.training  # its mode is put back
    rows = shortlist_and_confirm(hf.eval(), "z", x, y, metric=metric, k=3)
    assert len(rows) == 3 and all("exact" in r for r in rows)
    with pytest.raises(ValueError, match="k=-1 is not valid"):
        shortlist_and_confirm(hf, "z", x, y, metric=metric, k=-1)


@pytest.mark.parametrize("site", ["resid_pre", "z", "attn_out"])
def test_metrics_of_another_dtype_are_cast_and_undifferentiable_ones_refused_by_atp(site):
    """A float32 metric on a float64 model, or a bool accuracy, gives the exact grid (equal to the naive loop's,
    in the metric's dtype); attribution patching refuses a metric without a gradient, naming it."""
    model, clean, corr, m = small()
    want = activation_patching(model, site, clean, corr, metric=m).values
    f32 = activation_patching(model, site, clean, corr, metric=lambda x: m(x).float()).values
    torch.testing.assert_close(f32.double(), want, rtol=1e-5, atol=1e-5)
    won = activation_patching(model, site, clean, corr, metric=lambda x: m(x) > 0)
    naive = activation_patching(model, site, clean, corr, metric=lambda x: m(x) > 0, method="naive")
    torch.testing.assert_close(won.values, naive.values.to(won.values.dtype), rtol=0, atol=0)
    with pytest.raises(ValueError, match="metric returned values without a gradient"):
        attribution_patching(model, clean, corr, metric=lambda x: m(x) > 0, sites=[site])


def test_token_dtypes_and_flags_are_checked_naming_the_argument():
    model, clean, corr, m = small()
    torch.testing.assert_close(
        activation_patching(model, "resid_pre", clean.int(), corr.int(), metric=m).values,
        activation_patching(model, "resid_pre", clean, corr, metric=m).values,
    )
    # ids of any integer dtype are ids (uint8 ones are not read as a mask)
    torch.testing.assert_close(
        activation_patching(model, "resid_pre", clean.to(torch.uint8), corr, metric=m).values,
        activation_patching(model, "resid_pre", clean, corr, metric=m).values,
    )
    with pytest.raises(TypeError, match="clean_tokens has dtype torch.float32"):
        activation_patching(model, "resid_pre", clean.float(), corr, metric=m)
    with pytest.raises(TypeError, match="clean_tokens has dtype torch.bool"):
        attribution_patching(model, clean.bool(), corr, metric=m, sites=["z"])
    with pytest.raises(TypeError, match=r"site=\['z'\] is not valid"):
        activation_patching(model, ["z"], clean, corr, metric=m)
    for bad in (None, [["z"]], [1]):
        with pytest.raises(TypeError, match="sites=.* is not valid"):
            attribution_patching(model, clean, corr, metric=m, sites=bad)
    for flag in ("qk_fix", "grad_drop"):
        with pytest.raises(TypeError, match=f"{flag}='no' is not valid; give True or False"):
            attribution_patching(model, clean, corr, metric=m, sites=["z"], **{flag: "no"})


def test_one_metric_position_as_a_numpy_or_0d_tensor_integer():
    import numpy as np

    model, clean, corr, m = small()
    want = activation_patching(
        model, "resid_pre", clean, corr, metric=LogitDiff(m.answer, m.wrong, position=3)
    )
    for pos in (np.int64(3), torch.tensor(3)):
        got = activation_patching(
            model, "resid_pre", clean, corr, metric=LogitDiff(m.answer, m.wrong, position=pos)
        )
        torch.testing.assert_close(got.values, want.values, rtol=0, atol=0)


def test_metric_coupling_the_examples_is_refused_everywhere():
    """A metric that subtracts the batch mean computes no example from its own logits: the gradient methods (AtP,
    EAP), which differentiate the sum over examples, refuse it (EAP returned zero scores); exact patching reads
    whole runs and keeps it, equal to the naive loop."""
    from pypattern.circuits import edge_attribution, patch_edges

    model, clean, corr, m = small()

    def centred(x):
        v = m(x)
        return v - v.mean(-1, keepdim=True)

    with pytest.raises(ValueError, match="couples the examples"):
        attribution_patching(model, clean, corr, metric=centred, sites=["z"])
    for mode in ("noise", "denoise"):
        with pytest.raises(ValueError, match="couples the examples"):
            edge_attribution(model, clean, corr, metric=centred, method="eap", mode=mode)
    exact = activation_patching(model, "resid_pre", clean, corr, metric=centred)
    naive = activation_patching(model, "resid_pre", clean, corr, metric=centred, method="naive")
    torch.testing.assert_close(exact.values, naive.values)
    patch_edges(model, [], clean, corr, metric=centred)


def test_the_gemm_choice_is_timed_in_float32_whatever_the_default_dtype(monkeypatch):
    import pypattern.models.packed as pk

    if not pk._ops_present():
        pytest.skip("this torch has no oneDNN linear ops")
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert isinstance(pk._calibrate(), bool)  # the timing's tensors are float32 (oneDNN refuses float64)
    finally:
        torch.set_default_dtype(old)


def test_prompts_longer_than_the_learned_positions_are_refused_by_argument():
    transformers = pytest.importorskip("transformers")
    import pypattern as pp

    cfg = transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=16)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    clean = torch.randint(0, 40, (2, 20))
    corr = torch.randint(0, 40, (2, 20))
    metric = pp.LogitDiff(torch.tensor([1, 2]), torch.tensor([3, 4]))
    for model in (hf, pp.from_hf(hf)):  # the Hugging Face model is wrapped (residual sites), or converted
        with pytest.raises(
            ValueError, match="clean_tokens has 20 positions; the model has 16 learned positions"
        ):
            pp.activation_patching(model, "resid_pre", clean, corr, metric=metric)
    with pytest.raises(ValueError, match="clean_tokens has 20 positions; the model has 16 learned positions"):
        pp.attribution_patching(pp.from_hf(hf), clean, corr, metric=metric, sites=["z"])
