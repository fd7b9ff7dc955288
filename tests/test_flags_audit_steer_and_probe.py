"""Concept flags where a forward never reaches the flag hook point, and the linear probe without a penalty.

Steering and ablation refuse (``RuntimeError`` naming the hook point) a forward of the model that ends without
reaching it (``stop_at_layer`` before it, a hook point the forward does not run), warn for one that starts after it
(``start_at_layer``), and refuse unknown hook names before any forward; the probe with ``ridge=0`` is the
minimum-norm least-squares probe (checked against numpy's ``lstsq``), also with fewer fit positions than features.
Steering at one position against every position and against no position, checked against a hand-written hook."""

import warnings

import numpy as np
import pytest
import torch

import pypattern as pp
from pypattern.models import Transformer
from pypattern.models.hooks import HookPoint
from pypattern.tasks.topics import TopicTask

pytestmark = pytest.mark.usefixtures("one_thread")

TASK = TopicTask(num_topics=3, tokens_per_topic=6, num_shared=4, seq_len=12)


def _model(seed=0, dtype=torch.float32):
    return Transformer(TASK.model_config(seed=seed)).to(dtype).eval()


def _spec(hook, dims=(4, 0, 7, 2, 9), on=2.0, off=-0.5):
    return pp.FlagSpec(hook, dims=dims, num_concepts=3, on_value=on, off_value=off)


def _code(spec):
    """Concept c's contiguous, nearly equal group of the flags at on_value, the others at off_value (float64)."""
    n, c = len(spec.dims), spec.num_concepts
    code = torch.full((c, n), spec.off_value, dtype=torch.float64)
    start = 0
    for i in range(c):
        size = n // c + (1 if i < n % c else 0)
        code[i, start : start + size] = spec.on_value
        start += size
    return code


def _by_hand(model, spec, tokens, values, where, **kw):
    """The model's output with the flags overwritten by a hand-written hook: ``values`` (batch, num_flags) where
    ``where`` (batch, pos) is True."""

    def fn(x, hook):
        x = x.clone()
        for i in range(x.shape[0]):
            for j in range(x.shape[1]):
                if bool(where[i, j]):
                    for k, d in enumerate(spec.dims):
                        x[i, j, d] = values[i, k].to(x.dtype)
        return x

    with model.hooks([(spec.hook, fn)]):
        return model(tokens, **kw)


# ----- a hook point the forward does not reach --------------------------------------------------------------
@pytest.mark.parametrize("kind", ["steer", "ablate"])
def test_a_forward_stopping_before_the_flag_hook_raises_naming_it(kind):
    model = _model()
    tokens = TASK.sample(3, seed=1).tokens
    spec = _spec("blocks.1.hook_resid_post")

    def ctx():
        return pp.steer(model, spec, 2) if kind == "steer" else pp.ablate_flags(model, spec, 0.25)

    who = "steer" if kind == "steer" else "ablate_flags"
    message = rf"{who}: the model's forward did not reach hook='blocks\.1\.hook_resid_post'.*stop_at_layer=1"
    with torch.no_grad():
        with pytest.raises(RuntimeError, match=message):
            with ctx():
                model(tokens, stop_at_layer=1)
        with pytest.raises(RuntimeError, match=message):
            with ctx():
                model.run_with_cache(tokens, stop_at_layer=1)
        # a forward that stops after the hook point is steered, as a hand-written overwrite of the same values
        values = _code(spec)[[2, 2, 2]] if kind == "steer" else torch.full((3, len(spec.dims)), 0.25)
        with ctx():
            got = model(tokens, stop_at_layer=2)
        want = _by_hand(
            model, spec, tokens, values, torch.ones(tokens.shape, dtype=torch.bool), stop_at_layer=2
        )
        assert torch.equal(got, want)
        assert not torch.equal(got, model(tokens, stop_at_layer=2))
    # the hooks are gone after the error: the model runs, and stops early, as before
    assert not model.blocks[1].hook_resid_post._fns
    model(tokens, stop_at_layer=1)


def test_a_hook_point_the_forward_does_not_run_raises_under_steer_ablate_and_generate():
    model = _model()
    model.blocks[1].hook_resid_pre = HookPoint()  # listed by hook_dict, no longer called by the forward
    spec = _spec("blocks.1.hook_resid_pre")
    tokens = TASK.sample(2, seed=3).tokens
    message = r"the model's forward did not reach hook='blocks\.1\.hook_resid_pre'"
    with pytest.raises(RuntimeError, match="steer: " + message):
        with pp.steer(model, spec, torch.tensor([0, 1])):
            model(tokens)
    with pytest.raises(RuntimeError, match="ablate_flags: " + message):
        with pp.ablate_flags(model, spec):
            model(tokens)
    with pytest.raises(RuntimeError, match=message):
        pp.generate(model, tokens[:, :3], 2, spec, 1)


def test_a_forward_starting_after_the_flag_hook_warns_naming_it():
    model = _model()
    tokens = TASK.sample(2, seed=4).tokens
    spec = _spec("blocks.0.hook_resid_post")
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter="blocks.1.hook_resid_pre")
        resid = cache["blocks.1.hook_resid_pre"]
        with pytest.warns(
            RuntimeWarning, match=r"steer: a forward with start_at_layer=1 did not reach hook='blocks"
        ):
            with pp.steer(model, spec, 1):
                got = model(resid, start_at_layer=1)
    assert torch.equal(got, model(resid, start_at_layer=1))  # not steered: the warning says so


@pytest.mark.parametrize("how", ["native", "hooked_gpt2", "hooked_llama"])
def test_unknown_hook_names_are_refused_before_any_forward(how):
    transformers = pytest.importorskip("transformers") if how != "native" else None
    if how == "native":
        model = _model()
    elif how == "hooked_gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=30, n_positions=16)
        model = pp.hooked_hf(transformers.GPT2LMHeadModel(cfg).eval())
    else:
        cfg = transformers.LlamaConfig(
            num_hidden_layers=2,
            hidden_size=16,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=32,
            vocab_size=30,
            max_position_embeddings=16,
        )
        model = pp.hooked_hf(transformers.LlamaForCausalLM(cfg).eval())
    tokens = torch.randint(0, 18, (2, 5), generator=torch.Generator().manual_seed(0))
    for hook in (
        "blocks.2.hook_resid_pre",
        "blocks.9.hook_resid_post",
        "blocks.1.hook_resid_pr",
        "blocks.1.resid",
    ):
        with pytest.raises(ValueError, match=rf"hook='{hook}' is not a hook point of the model"):
            with pp.steer(model, _spec(hook), 0):
                model(tokens)
    # the valid hook steers without a complaint
    spec = _spec("blocks.1.hook_resid_post")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with torch.no_grad(), pp.steer(model, spec, 1):
            _, cache = model.run_with_cache(tokens, names_filter=spec.hook)
    assert torch.equal(cache[spec.hook][..., list(spec.dims)], _code(spec)[1].float().expand(2, 5, -1))


# ----- steering at some positions ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_steering_one_position_every_position_and_none_equals_a_hand_written_overwrite(dtype):
    model = _model(seed=2, dtype=dtype)
    spec = _spec("blocks.1.hook_resid_pre")
    tokens = TASK.sample(3, seed=5).tokens
    b, t = tokens.shape
    concept = torch.tensor([2, 0, 1])
    values = _code(spec)[concept]
    with torch.no_grad():
        clean = model(tokens)
        for p in (0, 5, t - 1):
            one = torch.zeros(t, dtype=torch.bool)
            one[p] = True
            with pp.steer(model, spec, concept, positions=one):
                got = model(tokens)
            assert torch.equal(got, _by_hand(model, spec, tokens, values, one[None].expand(b, t)))
            # causal: the positions before p see no change, p itself does
            assert torch.equal(got[:, :p], clean[:, :p])
            assert not torch.equal(got[:, p], clean[:, p])
            # an int start position: p and every later one
            with pp.steer(model, spec, concept, positions=p):
                got = model(tokens)
            later = (torch.arange(t) >= p)[None].expand(b, t)
            assert torch.equal(got, _by_hand(model, spec, tokens, values, later))
        with pp.steer(model, spec, concept):
            every = model(tokens)
        assert torch.equal(every, _by_hand(model, spec, tokens, values, torch.ones(b, t, dtype=torch.bool)))
        # no position (an all-False mask, or a start beyond the sequence) is the identity, exactly
        for none in (torch.zeros(t, dtype=torch.bool), t, t + 3):
            with pp.steer(model, spec, concept, positions=none):
                assert torch.equal(model(tokens), clean)
        # a per-sample mask: each row steered only where its own row of the mask says
        mask = torch.zeros(b, t + 2, dtype=torch.bool)
        mask[0, 3], mask[2, 0], mask[2, t - 1] = True, True, True
        with pp.steer(model, spec, concept, positions=mask):
            got = model(tokens)
        assert torch.equal(got, _by_hand(model, spec, tokens, values, mask[:, :t]))
        assert torch.equal(got[1], clean[1])


# ----- the probe ------------------------------------------------------------------------------------------
def _probe_by_hand(model, spec, which, num_samples, seed, ridge):
    """The held-out (accuracy, R^2) of a one-vs-rest least-squares probe with a bias on the fit sample's
    standardised features, solved with numpy (``lstsq``: the minimum-norm solution for ``ridge=0``; the ridge
    normal equations with the bias unpenalised otherwise)."""
    d = model.cfg.d_model
    cols = {"flag": list(spec.dims), "all": list(range(d))}.get(which)
    if cols is None:
        cols = [i for i in range(d) if i not in spec.dims]
    splits = []
    for s in (seed, seed + 1):
        batch = TASK.sample(num_samples, seed=s, switch_prob=0.0)
        _, cache = model.run_with_cache(batch.tokens, names_filter=spec.hook)
        lab = batch.extra["concept_pos"]
        keep = lab >= 0
        splits.append((cache[spec.hook][keep][:, cols].double().numpy(), lab[keep].numpy()))
    (xf, yf), (xe, ye) = splits
    mu, sd = xf.mean(0), np.maximum(xf.std(0, ddof=1), 1e-8)
    add1 = lambda x: np.concatenate([(x - mu) / sd, np.ones((len(x), 1))], 1)  # noqa: E731
    af, ae = add1(xf), add1(xe)
    onehot_f, onehot_e = np.eye(spec.num_concepts)[yf], np.eye(spec.num_concepts)[ye]
    if ridge == 0:
        w = np.linalg.lstsq(af, onehot_f, rcond=None)[0]
    else:
        pen = ridge * np.eye(af.shape[1])
        pen[-1, -1] = 0.0
        w = np.linalg.solve(af.T @ af + pen, af.T @ onehot_f)
    pred = ae @ w
    acc = float((pred.argmax(1) == ye).mean())
    r2 = 1 - ((pred - onehot_e) ** 2).sum() / ((onehot_e - onehot_e.mean(0)) ** 2).sum()
    return acc, float(r2), len(xf), len(cols) + 1


@pytest.mark.parametrize(("which", "num_samples"), [("all", 2), ("non_flag", 2), ("all", 6), ("flag", 4)])
def test_the_probe_without_a_penalty_is_the_minimum_norm_least_squares_probe(which, num_samples):
    model = _model(seed=1, dtype=torch.float64)
    spec = _spec("blocks.1.hook_resid_pre")
    acc, r2 = pp.probe_accuracy(model, TASK, spec, which=which, num_samples=num_samples, seed=3, ridge=0)
    want_acc, want_r2, n_fit, n_features = _probe_by_hand(model, spec, which, num_samples, 3, 0)
    # two sequences: fewer fit positions than features, and the normal equations are singular
    assert (n_fit < n_features) == (num_samples == 2)
    assert acc == want_acc
    assert r2 == pytest.approx(want_r2, rel=1e-7, abs=1e-9)
    # and the limit of the ridge probe as the penalty goes to 0
    acc_small, r2_small = pp.probe_accuracy(
        model, TASK, spec, which=which, num_samples=num_samples, seed=3, ridge=1e-7
    )
    assert r2_small == pytest.approx(want_r2, rel=1e-4, abs=1e-5)
    # a penalised probe matches its normal equations solved by hand
    acc_r, r2_r = pp.probe_accuracy(
        model, TASK, spec, which=which, num_samples=num_samples, seed=3, ridge=0.3
    )
    want_acc_r, want_r2_r, _, _ = _probe_by_hand(model, spec, which, num_samples, 3, 0.3)
    assert acc_r == want_acc_r
    assert r2_r == pytest.approx(want_r2_r, rel=1e-9, abs=1e-12)


def test_a_feature_constant_over_the_fit_sample_gets_no_weight_in_float64():
    from pypattern.flags import _ridge_probe

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=g, dtype=torch.float64)
    xe = torch.randn(30, 5, generator=g, dtype=torch.float64)
    y, ye = (x[:, 0] > 0).long(), (xe[:, 0] > 0).long()
    # 0.1 forty times: its float64 mean is not 0.1, and the clamped scale would turn the rounding into a feature
    x2 = torch.cat([x, torch.full((40, 1), 0.1, dtype=torch.float64)], 1)
    xe2 = torch.cat([xe, torch.full((30, 1), 0.3, dtype=torch.float64)], 1)
    for ridge in (0.0, 1e-2):
        assert _ridge_probe(x2, y, xe2, ye, 2, ridge) == pytest.approx(
            _ridge_probe(x, y, xe, ye, 2, ridge), rel=1e-12
        )


def test_flag_loss_of_several_concepts_equals_a_loop_and_its_gradient_autograd_of_the_loop():
    spec = _spec("blocks.1.hook_resid_pre", dims=(6, 1, 3, 11, 8, 0, 13), on=1.5, off=-2.0)
    g = torch.Generator().manual_seed(7)
    acts = torch.randn(3, 4, 16, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[0, 1, 2, -1], [-1, -1, 2, 2], [1, 0, -1, 1]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [0, 1, 1, 1]])
    code = _code(spec)
    terms = [
        (acts[i, j, d] - code[labels[i, j], k]) ** 2
        for i in range(3)
        for j in range(4)
        if labels[i, j] >= 0 and mask[i, j]
        for k, d in enumerate(spec.dims)
    ]
    want = torch.stack(terms).sum() / len(terms)
    got = pp.flag_loss(acts, labels, spec, attention_mask=mask)
    assert got.dtype == torch.float64
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-14)
    (g_got,) = torch.autograd.grad(got, acts)
    (g_want,) = torch.autograd.grad(want, acts)
    assert torch.allclose(g_got, g_want, rtol=1e-13, atol=1e-15)
    # each concept's code written into the flags reads back as that concept, and has loss 0
    written = torch.zeros(1, 3, 16, dtype=torch.float64)
    written[0][:, list(spec.dims)] = code
    assert torch.equal(pp.read_flags(written, spec), torch.tensor([[0, 1, 2]]))
    assert float(pp.flag_loss(written, torch.tensor([[0, 1, 2]]), spec)) == 0.0


def test_probes_refuse_flag_dims_beyond_a_wrapped_models_width_by_name():
    """A wrapped Hugging Face model's config does not give the hook's width to the spec's check: the probes refuse
    the dimensions beyond the activation they read (an index error for the flag probe, the others silently
    dropped the missing dimension before)."""
    transformers = pytest.importorskip("transformers")
    task = TopicTask(num_topics=2, tokens_per_topic=6, num_shared=4, seq_len=12)
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=len(task.token_concepts), n_positions=16
    )
    model = pp.hooked_hf(transformers.GPT2LMHeadModel(cfg).eval())
    wide = pp.FlagSpec("blocks.1.hook_resid_pre", dims=(0, 1, 2, 20), num_concepts=2)
    for which in ("flag", "non_flag", "all"):
        with pytest.raises(ValueError, match=r"probe_accuracy: spec\.dims=\(0, 1, 2, 20\) has entries >= 16"):
            pp.probe_accuracy(model, task, wide, which=which, num_samples=4)
    every = pp.FlagSpec("blocks.1.hook_resid_pre", dims=tuple(range(16)), num_concepts=2)
    with pytest.raises(ValueError, match=r"flag_report: spec\.dims=.* covers all 16 dimensions"):
        pp.flag_report(model, task, every, num_samples=4, gen_steps=1)
