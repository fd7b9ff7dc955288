"""Batches and components the estimators cannot use are refused with errors that name the argument and say what
arrived and what was expected."""

import pytest
import torch

import pypattern as pp

pytestmark = pytest.mark.usefixtures("one_thread")

KW = dict(num_chains=1, num_draws=2, step_size=1e-4, localization=10.0, quiet=True)


def _model(**kw):
    return pp.Transformer(n_layers=2, d_model=16, n_heads=4, d_mlp=24, d_vocab=11, n_ctx=8, seed=0, **kw)


def _tokens():
    return torch.randint(0, 11, (4, 8), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "batch",
    [
        {"input_ids": _tokens(), "attention_mask": torch.zeros(4, 8, dtype=torch.long)},
        {"input_ids": _tokens(), "labels": torch.full((4, 8), -100)},
        _tokens()[:, :1],  # one token per sequence: no next-token target
    ],
    ids=["all-padding", "all-ignored", "one-token"],
)
def test_a_batch_without_counted_tokens_is_refused_by_name(batch):
    with pytest.raises(ValueError, match="loader: the batch .* has no counted token"):
        pp.estimate_llc(_model(), [batch], nbeta=2.0, **KW)


def test_a_pair_with_a_target_per_sample_missing_is_refused():
    net = torch.nn.Linear(3, 2)
    x, y = torch.randn(6, 3), torch.randint(0, 2, (5,))
    with pytest.raises(ValueError, match=r"loader: the pair \(x, y\) has 6 rows in x \(6, 3\) but 5 in y"):
        pp.estimate_llc(net, [(x, y)], **KW)


def test_default_nbeta_says_why_a_batch_counts_one_sample():
    with pytest.raises(
        ValueError, match=r"got 1 \(the first batch: .*\(1, 4, 8\); a tensor batch must have shape"
    ):
        pp.estimate_llc(_model(), [_tokens()[None]], **KW)


def test_components_given_as_one_string_are_refused():
    model, t = _model(), _tokens()
    with pytest.raises(TypeError, match=r"components='blocks.0.mlp' is one string.*\['blocks.0.mlp'\]"):
        pp.susceptibilities(model, [t], t[:2], "blocks.0.mlp", **KW)


def test_component_of_a_layer_out_of_range_and_valid_names_listed():
    with pytest.raises(ValueError, match="layer 5 is out of range; the model has 2 layers"):
        pp.component_masks(_model(), "blocks.5.attn.head.0")
    attn_only = pp.Transformer(n_layers=2, d_model=16, n_heads=4, d_mlp=None, d_vocab=11, n_ctx=8, seed=0)
    with pytest.raises(ValueError, match="matches no parameter; valid components: 'embed'") as e:
        pp.component_masks(attn_only, "blocks.1.mlp")
    assert "mlp" not in str(e.value).split("valid components:")[1]


def test_left_padding_without_positions_on_learned_positions_warns():
    """GPT-2 reads positions 0, 1, ... from the first column: left padding without position_ids shifts the real
    tokens' positions (their losses change). A warning says so and how to give the positions; with them, or with
    right padding, none."""
    import warnings

    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=11, n_embd=8, n_layer=1, n_head=2, n_positions=16)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    t = _tokens()
    am = torch.ones(4, 8, dtype=torch.long)
    am[1, :3] = 0
    left = {"input_ids": t, "attention_mask": am}
    with pytest.warns(
        UserWarning, match=r"loader: left padding without position_ids: GPT2LMHeadModel \(gpt2\)"
    ):
        pp.estimate_llc(model, [left], **KW)
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    right = {"input_ids": t, "attention_mask": am.flip(-1)}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        for b in ({**left, "position_ids": pos}, right):
            pp.estimate_llc(model, [b], **KW, warn_nonstationary=False)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_metric_token_ids_of_any_integer_dtype_are_ids(dtype):
    """Answer ids of a small integer dtype are read as ids: a uint8 tensor used as an index is a boolean mask (with
    a batch as large as the vocabulary and every id nonzero it read the logits of tokens 0 .. V - 1), and torch's
    gather refuses the other types."""
    V = 20
    m = pp.Transformer(
        pp.TransformerConfig(
            n_layers=2, d_model=16, n_heads=2, d_mlp=32, d_vocab=V, n_ctx=8, seed=0, dtype=torch.float64
        )
    )
    m.unembed.b_U = None  # LogitDiff reads the answer columns of W_U alone
    g = torch.Generator().manual_seed(0)
    clean, corr = torch.randint(0, V, (V, 5), generator=g), torch.randint(0, V, (V, 5), generator=g)
    ans, wrong = torch.randint(1, V, (V,), generator=g), torch.randint(1, V, (V,), generator=g)
    ref = pp.attribution_patching(m, clean, corr, metric=pp.LogitDiff(ans, wrong), sites=["resid_pre"])[
        "resid_pre"
    ]
    got = pp.attribution_patching(
        m, clean, corr, metric=pp.LogitDiff(ans.to(dtype), wrong.to(dtype)), sites=["resid_pre"]
    )["resid_pre"]
    logits = m(clean)[:, -1]
    rows = torch.arange(V)
    assert torch.allclose(got.clean, logits[rows, ans] - logits[rows, wrong], rtol=0, atol=1e-12)
    assert torch.equal(got.values, ref.values)
    for metric in (
        pp.LogitDiff(ans.to(dtype), wrong.to(dtype)),
        pp.LogProb(ans.to(dtype)),
        pp.Prob(ans.to(dtype)),
    ):
        kind = type(metric)(*(t.long() for t in (ans, wrong)[: len(metric.per_example)]))
        a = pp.activation_patching(m, "resid_pre", clean[:3], corr[:3], metric=metric.select(slice(0, 3)))
        b = pp.activation_patching(m, "resid_pre", clean[:3], corr[:3], metric=kind.select(slice(0, 3)))
        # the same ids (the metric's temporaries, and so the engine's batches, may differ by a few bytes)
        torch.testing.assert_close(a.values, b.values, rtol=0, atol=1e-12)


def test_meta_token_tensors_are_refused_by_name():
    m = _model()
    toks = _tokens()
    meta = toks.to("meta")
    metric = pp.LogitDiff(
        torch.zeros(toks.shape[0], dtype=torch.long), torch.ones(toks.shape[0], dtype=torch.long)
    )
    for call, name in (
        (lambda: pp.activation_patching(m, "resid_pre", meta, toks, metric=metric), "clean_tokens"),
        (lambda: pp.attribution_patching(m, toks, meta, metric=metric), "corrupted_tokens"),
        (lambda: pp.circuits.edge_attribution(m, meta, toks, metric=metric), "clean"),
        (
            lambda: pp.estimate_llc(
                m, [meta], num_chains=1, num_draws=2, step_size=1e-5, localization=100.0, quiet=True
            ),
            "data",
        ),
    ):
        with pytest.raises(ValueError, match=f"{name}.*meta tensor"):
            call()


def test_argument_sweep_refusals():
    """Values that held no meaning were accepted (silently wrong) or failed deep inside torch: each is now refused
    naming its argument."""
    import numpy as np

    from pypattern.patching.corruptions import GaussianNoise

    m = _model(dtype=torch.float32)
    toks = _tokens()
    metric = pp.LogitDiff(torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long))
    # a finite std whose noise overflows the model's dtype: the corrupted run would be NaN
    with pytest.raises(
        ValueError, match="GaussianNoise: a standard deviation of 1e\\+300 gives noise that is not"
    ):
        pp.activation_patching(m, "resid_pre", toks, metric=metric, corruption=GaussianNoise(std=1e300))
    # numpy seeds are seeds; a negative one or a float is refused by name
    a = pp.activation_patching(
        m, "resid_pre", toks, metric=metric, corruption=GaussianNoise(seed=np.int64(3))
    )
    b = pp.activation_patching(m, "resid_pre", toks, metric=metric, corruption=GaussianNoise(seed=3))
    assert torch.equal(a.values, b.values)
    for seed in (-1, 1.5, "1"):
        with pytest.raises((TypeError, ValueError), match="GaussianNoise.seed"):
            GaussianNoise(seed=seed)
    # metric ids that are no ids
    for bad in (None, "x", torch.zeros(4, dtype=torch.long, device="meta")):
        with pytest.raises((TypeError, ValueError), match="answer"):
            pp.LogitDiff(bad, torch.ones(4, dtype=torch.long))
        with pytest.raises((TypeError, ValueError), match="answer"):
            pp.LogProb(bad)
    # invert and reweight: complex, meta and non-numeric inputs
    chi = np.array([[1.0, -0.5, 0.2], [0.3, 0.8, -0.4]])
    with pytest.raises(TypeError, match="chi is complex"):
        pp.invert(chi + 1j, np.array([0.1, -0.05]))
    with pytest.raises(ValueError, match="chi is a meta tensor"):
        pp.invert(torch.empty(2, 3, device="meta"), np.zeros(2))
    with pytest.raises(TypeError, match="target must be an array of real numbers"):
        pp.invert(chi, np.array(["a", "b"]))
    data = torch.arange(10.0)
    with pytest.raises(TypeError, match="weights is complex"):
        pp.reweight(data, torch.rand(10).to(torch.cfloat) + 5j, mode="loss")
    with pytest.raises(ValueError, match="batch_size, generator apply to mode='sampler' only"):
        pp.reweight(data, torch.ones(10), mode="loss", batch_size=4, generator=torch.Generator())
    with pytest.raises(TypeError, match="generator='x' is not valid"):
        pp.reweight(data, torch.ones(10), batch_size=4, generator="x")
    # center_gram: a numpy array or integer Gram
    with pytest.raises(TypeError, match="g must be a torch.Tensor"):
        pp.center_gram(np.eye(3))
    with pytest.raises(TypeError, match="g has dtype torch.int64"):
        pp.center_gram(torch.eye(3, dtype=torch.long))


def test_a_batch_of_the_wrong_width_is_said_to_come_from_its_argument():
    """x of another width than the model reads: torch's shape error said to come from the loader's or the probe's
    batch, described (it named no argument)."""
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, generator=g), torch.randn(32, 1, generator=g)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    good = DataLoader(TensorDataset(x, y), batch_size=16)
    bad = DataLoader(TensorDataset(torch.randn(32, 5, generator=g), y), batch_size=16)
    kw = dict(num_chains=1, num_draws=2, step_size=1e-3, nbeta=30.0, quiet=True)
    for call, argument in (
        (lambda: pp.estimate_llc(model, bad, **kw), "loader"),
        (lambda: pp.bif(model, good, (torch.randn(4, 5, generator=g), y[:4]), **kw), "probe"),
    ):
        with pytest.raises(
            RuntimeError,
            match=rf"^{argument}: the loss failed on its batch .*\((16|4), 5\).*cannot be multiplied",
        ):
            call()


def test_the_sampling_batch_of_the_wrong_width_is_named_and_a_loss_functions_own_error_passes_unchanged():
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, generator=g), torch.randn(32, 1, generator=g)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    good = DataLoader(TensorDataset(x, y), batch_size=16)
    kw = dict(num_chains=1, num_draws=2, step_size=1e-3, nbeta=30.0, quiet=True)
    bad = (torch.randn(16, 5, generator=g), y[:16])
    with pytest.raises(RuntimeError, match=r"^sampling_batch: the loss failed on its batch .*\(16, 5\)"):
        pp.susceptibilities(model, good, (x[:4], y[:4]), ["2"], sampling_batch=bad, **kw)

    def loss_fn(m, batch):  # a user's loss with an error of its own: not about the batch's shapes
        raise RuntimeError("call set_temperature() first")

    with pytest.raises(RuntimeError, match=r"^call set_temperature\(\) first$"):
        pp.estimate_llc(model, good, loss_fn=loss_fn, **kw)


@pytest.mark.parametrize("batched", [None, True, False])
def test_a_left_padded_batch_read_by_a_users_loss_calling_the_default_one_is_refused(batched):
    """A loss function of the user's that calls batch_loss (not the library's loss itself): under vmap its mask
    checks run (nobody checked the stacked batches for it), so the chains run one by one and refuse the batch, or
    batched=True says vmap cannot run it."""
    from pypattern.losses import batch_loss
    from pypattern.sampling import sample

    task = pp.InductionTask(d_vocab=8, seq_len=9)

    class NoMask(torch.nn.Module):  # a user's model whose forward reads no attention mask
        def __init__(self):
            super().__init__()
            self.inner = pp.Transformer(task.model_config(d_model=8, n_heads=2, seed=0, dtype=torch.float64))

        def forward(self, tokens):
            return self.inner(tokens)

    model = NoMask()
    ids = task.sample(16, seed=1).tokens
    am = torch.ones_like(ids)
    batches = [
        {"input_ids": ids[i : i + 4], "attention_mask": am[i : i + 4].clone()} for i in range(0, 16, 4)
    ]
    for b in batches[1:]:
        b["attention_mask"][0, :2] = 0
    kw = dict(num_chains=2, num_draws=20, step_size=1e-4, localization=100.0, nbeta=10.0, seed=1, quiet=True)
    words = "does not run under vmap" if batched else "left padding"
    with pytest.raises((ValueError, RuntimeError), match=words):
        sample(
            model,
            batches,
            loss_fn=lambda m, b: batch_loss(m, b),
            batched=batched,
            num_init_loss_batches=1,
            **kw,
        )


def test_a_number_given_as_a_keyword_and_in_optimizer_kwargs_must_have_one_value():
    """Two names of one hyperparameter that disagree are an error, also across the keywords and optimizer_kwargs
    (optimizer_kwargs won silently); equal values, or a keyword left at its default, are taken."""
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, generator=g)
    loader = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=16)
    model = nn.Linear(3, 1)
    kw = dict(num_chains=1, num_draws=2, quiet=True, nbeta=20.0, localization=100.0)
    for extra, words in (
        (
            dict(step_size=1e-3, optimizer_kwargs={"lr": 2e-3}),
            r"step_size=0\.001 and optimizer_kwargs\['lr'\]",
        ),
        (dict(step_size=1e-3, optimizer_kwargs={"localization": 50.0}), "both set localization"),
        (
            dict(step_size=1e-3, optimizer_kwargs={"temperature": 5.0}),
            r"optimizer_kwargs\['temperature'\]=5\.0",
        ),
    ):
        with pytest.raises(ValueError, match=words):
            pp.sample(model, loader, **kw, **extra)
    same = pp.sample(
        model, loader, **kw, step_size=1e-3, optimizer_kwargs={"lr": 1e-3, "localization": 100.0}
    )
    assert same.config["step_size"] == 1e-3
    kw.pop("localization")  # at its default (0): optimizer_kwargs sets it
    moved = pp.sample(model, loader, **kw, step_size=1e-3, optimizer_kwargs={"localization": 50.0})
    assert moved.config["localization"] == 50.0
