"""Patterning as a user runs it end to end: susceptibilities of a model of one's own, their inversion into data
weights toward a target change, training on the re-weighted data and the change it makes.

Two models: pypattern's transformer trained briefly on the built-in two-topic task, and a tiny random-weight
Hugging Face Llama trained a few steps on the same token data and converted with ``pp.from_hf``. The observable of
every component is the loss on held-out sequences of topic 0, so its susceptibility to a training sequence of
topic 0 is negative (up-weighting it lowers that loss) and to one of topic 1 positive. The inversions are checked
against independent least-squares solutions of the same problems (numpy, and scipy's SLSQP for the bounded one),
and training on the weights against training on uniform weights from the same checkpoint and seeds.
"""

import copy
import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

import pypattern as pp
from pypattern.tasks import TopicTask

pytestmark = pytest.mark.usefixtures("one_thread")

N = 256  # training sequences (the probe: one column of chi per sequence)
SAMPLER = dict(
    num_chains=2,
    num_draws=20,
    num_burnin_steps=20,
    step_size=1e-3,
    localization=100.0,
    seed=0,
    quiet=True,
    warn_nonstationary=False,
)


#: the re-weighted and uniform trainings' shared settings (same seed and batches)
TRAIN = dict(steps=20, batch_size=32, lr=1e-3, seed=1, log_every=0, quiet=True)


def _task():
    task = TopicTask(num_topics=2, tokens_per_topic=6, num_shared=2, seq_len=12)
    data = task.sample(N, seed=3)
    held = task.sample(256, seed=99)
    by_topic = [held.tokens[held.extra["concept"] == c] for c in range(2)]
    return task, data, by_topic


def _loss(model, tokens) -> float:
    with torch.no_grad():
        return float(pp.losses.batch_loss(model, tokens))


def _group_chi(chi: np.ndarray, groups: np.ndarray, num_groups: int) -> np.ndarray:
    """The invert() docstring's group column: ``(G / N) sum_{z in g} chi_z``."""
    return np.stack([chi[:, groups == g].sum(1) for g in range(num_groups)], 1) * num_groups / chi.shape[1]


def _chi(model, data, held0, components):
    return pp.susceptibilities(
        model,
        torch.utils.data.DataLoader(data.tokens, batch_size=64),
        data.tokens,
        components,
        observable=lambda m: pp.losses.batch_loss(m, held0),
        per_token=False,
        **SAMPLER,
    )


@pytest.fixture(scope="module")
def own_model():
    task, data, held = _task()
    cfg = task.model_config(d_model=16, n_heads=2, d_mlp=32, seed=0)
    model = pp.Transformer(cfg)
    pp.tasks.train(model, task, steps=40, data=data, batch_size=32, lr=1e-3, seed=0, log_every=0, quiet=True)
    res = _chi(model, data, held[0], ["embed", "blocks.0.attn", "blocks.1.mlp"])
    return dict(task=task, data=data, held=held, cfg=cfg, model=model, res=res)


@pytest.fixture(scope="module")
def converted():
    transformers = pytest.importorskip("transformers")
    task, data, held = _task()
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=task.d_vocab,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=32,
            tie_word_embeddings=False,
        )
    )
    opt = torch.optim.AdamW(hf.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    hf.train()
    for _ in range(30):
        rows = torch.randint(0, N, (32,), generator=g)
        loss = hf(input_ids=data.tokens[rows], labels=data.tokens[rows]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    hf.eval()
    model = pp.from_hf(hf)
    with torch.no_grad():  # the converted model computes the Hugging Face model's loss
        ref = float(hf(input_ids=held[0], labels=held[0]).loss)
    assert abs(_loss(model, held[0]) - ref) < 1e-5
    res = _chi(model, data, held[0], ["blocks.0.attn", "blocks.1.mlp", "blocks.1.attn.head.1"])
    return dict(task=task, data=data, held=held, model=model, res=res)


def _check_chi_signs(res, topic):
    """The loss on held-out topic-0 sequences responds negatively to up-weighting a topic-0 training sequence."""
    chi = res.chi
    assert chi.shape == (3, N) and np.isfinite(chi).all()
    np.testing.assert_array_equal(res.probe_sample, np.arange(N))
    assert (chi[:, topic == 0].mean(1) < 0).all() and (chi[:, topic == 1].mean(1) > 0).all()


def _group_inversion(chi, topic):
    """Two groups (the topics) of unequal size: weights by invert(constrained, fractions), checked against the
    one-parameter least-squares solution computed here."""
    f = np.array([(topic == g).mean() for g in range(2)])
    chi_g = _group_chi(chi, topic, 2)
    target = -0.5 * np.abs(chi_g).max() * np.ones(3)  # every component's topic-0 loss down
    iv = pp.invert(chi_g, target, method="constrained", fractions=f)
    w = iv.weights
    # documented constraints: non-negative, data-weighted mean 1; predicted = chi_g @ h, weights = 1 + G h
    assert (w >= 0).all() and abs(f @ w - 1) < 1e-12
    np.testing.assert_allclose(w, 1 + 2 * iv.h, rtol=0, atol=1e-15)
    np.testing.assert_allclose(iv.predicted, chi_g @ iv.h, rtol=1e-12, atol=0)
    # independently: w - 1 = s v with f @ v = 0, s by least squares on the one free direction, clipped to w >= 0
    v = np.array([f[1], -f[0]])
    a = chi_g @ v / 2
    s = float(a @ target / (a @ a))
    s = min(max(s, -1 / f[1]), 1 / f[0])  # w_0 = 1 + s f_1 >= 0, w_1 = 1 - s f_0 >= 0
    np.testing.assert_allclose(w, 1 + s * v, rtol=0, atol=1e-9)
    res = np.linalg.norm(chi_g @ (s * v) / 2 - target) / np.linalg.norm(target)
    assert abs(iv.residual - res) < 1e-9
    assert w[0] > 1 > w[1]  # up-weights the topic whose held-out loss is to fall
    # the group weights on every sequence: mean 1 over the data, and the same predicted response per sequence
    per_sample = iv.per_sample(topic)
    assert abs(per_sample.mean() - 1) < 1e-12
    np.testing.assert_allclose(chi @ (per_sample - 1) / N, iv.predicted, rtol=1e-10, atol=0)
    return iv, per_sample


def test_own_model_loop_moves_the_targeted_loss(own_model):
    data, (held0, held1) = own_model["data"], own_model["held"]
    topic = data.extra["concept"].numpy()
    _check_chi_signs(own_model["res"], topic)
    iv, per_sample = _group_inversion(own_model["res"].chi, topic)
    assert (iv.predicted < 0).all()
    # train from the checkpoint on uniform and on the patterned weights, same seed and batches
    state = copy.deepcopy(own_model["model"].state_dict())
    out = {}
    for name, weights in (("uniform", None), ("patterned", torch.as_tensor(per_sample))):
        m = pp.Transformer(own_model["cfg"])
        m.load_state_dict(state)
        pp.tasks.train(m, own_model["task"], data=data, sample_weights=weights, **TRAIN)
        out[name] = (_loss(m, held0), _loss(m, held1))
    # the targeted loss falls relative to uniform training (measured ~0.07 nats); the other topic's rises
    assert out["patterned"][0] < out["uniform"][0] - 0.02
    assert out["patterned"][1] > out["uniform"][1] + 0.02
    # the group Intervention is not one weight per training sequence: refused, naming the argument
    m = pp.Transformer(own_model["cfg"])
    with pytest.raises(ValueError, match=rf"sample_weights has shape \(2,\).*give {N} finite non-negative"):
        pp.tasks.train(m, own_model["task"], steps=1, data=data, sample_weights=iv, log_every=0, quiet=True)
    with pytest.raises(ValueError, match=rf"weights has 2 entries but the data has {N} samples"):
        pp.reweight(data.tokens, iv)


def test_converted_llama_loop_with_reweighted_sampler(converted):
    data, (held0, held1) = converted["data"], converted["held"]
    topic = data.extra["concept"].numpy()
    _check_chi_signs(converted["res"], topic)
    _, per_sample = _group_inversion(converted["res"].chi, topic)
    state = copy.deepcopy(converted["model"].state_dict())
    out = {}
    for name, weights in (("uniform", np.ones(N)), ("patterned", per_sample)):
        loader = pp.reweight(data.tokens, weights, batch_size=32, generator=torch.Generator().manual_seed(1))
        m = copy.deepcopy(converted["model"])
        m.load_state_dict(state)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        drawn = []
        for _, (batch,) in zip(range(20), loader):
            drawn.append(batch)
            loss = pp.losses.batch_loss(m, batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
        rows = torch.cat(drawn)
        # the sampler draws topic 0 at the weights' share (uniform: about half)
        share = float(
            (torch.as_tensor(data.extra["concept"])[_rows_of(data.tokens, rows)] == 0).float().mean()
        )
        expect = float((weights * (topic == 0)).sum() / weights.sum())
        assert abs(share - expect) < 0.06, (name, share, expect)
        out[name] = (_loss(m, held0), _loss(m, held1))
    assert out["patterned"][0] < out["uniform"][0] - 0.02
    assert out["patterned"][1] > out["uniform"][1] + 0.02


def _rows_of(tokens: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """The row of ``tokens`` each row of ``batch`` is (rows of the task's data are distinct here)."""
    eq = (batch[:, None, :] == tokens[None, :, :]).all(-1)
    assert bool((eq.sum(1) >= 1).all())
    return eq.float().argmax(1)


def test_inversions_match_independent_least_squares(own_model):
    chi = own_model["res"].chi
    k, n = chi.shape
    chi_c = chi - chi.mean(1, keepdims=True)
    rng = np.random.default_rng(0)
    small = rng.normal(size=k) * 1e-3 * np.abs(chi).max()  # reachable within non-negative weights
    # pinv: the minimum-norm sum-zero perturbation, numpy's lstsq on the centred chi
    ref = np.linalg.lstsq(chi_c, small, rcond=None)[0]
    iv = pp.invert(chi, small)
    np.testing.assert_allclose(iv.h, ref, rtol=0, atol=1e-9 * np.abs(ref).max())
    np.testing.assert_allclose(iv.predicted, small, rtol=1e-8, atol=0)
    assert iv.residual < 1e-8 and abs(iv.weights.mean() - 1) < 1e-12
    # ridge: chi_c^T (chi_c chi_c^T + alpha I)^-1 t in closed form
    alpha = 0.3 * float(np.linalg.svd(chi_c, compute_uv=False)[-1]) ** 2
    ref = chi_c.T @ np.linalg.solve(chi_c @ chi_c.T + alpha * np.eye(k), small)
    ridge = pp.invert(chi, small, method="ridge", alpha=alpha)
    np.testing.assert_allclose(ridge.h, ref, rtol=0, atol=1e-9 * np.abs(ref).max())
    np.testing.assert_allclose(ridge.predicted, chi @ ridge.h, rtol=1e-12)
    assert 0 < ridge.residual < 1
    # constrained, bounds not binding: the pinv weights
    con = pp.invert(chi, small, method="constrained")
    np.testing.assert_allclose(con.weights, iv.weights, rtol=0, atol=1e-9)
    # constrained, bounds binding (a target far beyond reach): scipy's SLSQP on the documented objective
    far = -5.0 * np.abs(chi).max() * np.ones(k) / np.sqrt(k)
    pen = 1e-2
    bounded = pp.invert(chi, far, method="constrained", alpha=pen, min_weight=0.25, max_weight=2.0)
    w = bounded.weights
    assert w.min() >= 0.25 - 1e-12 and w.max() <= 2.0 + 1e-12 and abs(w.sum() - n) < 1e-9

    def objective(x):
        r = chi @ (x - 1) / n - far
        return float(r @ r + pen * (x - 1) @ (x - 1) / n), 2 * chi.T @ r / n + 2 * pen * (x - 1) / n

    got = minimize(
        objective,
        np.ones(n),
        jac=True,
        method="SLSQP",
        bounds=[(0.25, 2.0)] * n,
        constraints=[{"type": "eq", "fun": lambda x: x.sum() - n, "jac": lambda x: np.ones(n)}],
        options={"maxiter": 500, "ftol": 1e-15},
    )
    assert objective(w)[0] <= got.fun * (1 + 1e-9)
    np.testing.assert_allclose(w, got.x, rtol=0, atol=1e-4)
    np.testing.assert_allclose(bounded.predicted, chi @ (w - 1) / n, rtol=1e-10)
    assert 0 < bounded.residual < 1 and bounded.predicted @ far > 0
    # the weights as per-sample loss weights: mean 1, proportional to the intervention's
    lw = pp.reweight(own_model["data"].tokens, bounded, mode="loss")
    np.testing.assert_allclose(lw.numpy(), w / w.mean(), rtol=1e-6)
    # a principal direction as the target: the predicted response points along it
    d = own_model["res"].pca().directions[0]
    t = pp.patterning.direction_target(d, 1e-3 * np.abs(chi).max())
    along = pp.invert(chi, t, method="constrained")
    assert along.predicted @ d > 0 and abs(np.linalg.norm(t) - 1e-3 * np.abs(chi).max()) < 1e-15


def test_bad_inputs_are_refused_naming_the_argument(own_model):
    chi = own_model["res"].chi
    k, n = chi.shape
    t = np.full(k, -1e-4)
    tokens = own_model["data"].tokens
    cases = [
        (
            lambda: pp.invert(chi[None], t),
            ValueError,
            r"chi must be \(num_observables, num_data\), got shape",
        ),
        (lambda: pp.invert(chi, np.array([np.nan, 0, 0])), ValueError, "target holds NaN or Inf"),
        (
            lambda: pp.invert(chi, np.ones(k + 1)),
            ValueError,
            rf"target must have one entry per observable \({k}\)",
        ),
        (
            lambda: pp.invert(chi, np.ones(n)),
            ValueError,
            rf"target must have one entry per observable \({k}\)",
        ),
        (lambda: pp.invert(np.where(chi > 0, np.nan, chi), t), ValueError, "chi holds NaN or Inf"),
        (lambda: pp.invert(chi > 0, t), TypeError, "chi holds bools"),
        (
            lambda: pp.invert(chi, t, method="lsq"),
            ValueError,
            "method must be 'pinv', 'ridge' or 'constrained'",
        ),
        (lambda: pp.invert(chi, t, method="ridge"), ValueError, "method='ridge' needs alpha > 0"),
        (
            lambda: pp.invert(chi, t, method="constrained", fractions=np.ones(3)),
            ValueError,
            f"fractions must be {n} finite positive numbers",
        ),
        (
            lambda: pp.invert(chi, t, method="constrained", max_weight=0.5),
            ValueError,
            "must contain the uniform weight 1",
        ),
        (lambda: pp.invert(chi, t, min_weight=0.0), ValueError, "min_weight/max_weight bound the weights"),
        (
            lambda: pp.reweight(tokens, np.ones(n - 1)),
            ValueError,
            f"weights has {n - 1} entries but the data has {n}",
        ),
        (
            lambda: pp.reweight(tokens, pp.invert(chi, 1e3 * t)),
            ValueError,
            "weights must be finite and non-negative",
        ),
        (lambda: pp.reweight(tokens, np.zeros(n)), ValueError, "weights are all zero"),
        (
            lambda: pp.reweight(tokens, np.ones((n, 1))),
            ValueError,
            r"weights must be 1-D, got shape \(256, 1\)",
        ),
        (lambda: pp.invert(chi, t).per_sample([0, n]), ValueError, f"groups must index the {n} weights"),
    ]
    for call, kind, message in cases:
        with pytest.raises(kind, match=message):
            call()
    # all-zero chi: nothing can move, said so; the weights stay uniform and the residual is 1
    for method, kw in (("pinv", {}), ("ridge", {"alpha": 1.0}), ("constrained", {})):
        with pytest.warns(UserWarning, match="chi is the same for every data point"):
            iv = pp.invert(np.zeros((k, n)), t, method=method, **kw)
        np.testing.assert_array_equal(iv.weights, np.ones(n))
        assert iv.residual == 1.0
    # a target of zero is no change (uniform weights), without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        iv = pp.invert(chi, np.zeros(k), method="constrained")
    np.testing.assert_array_equal(iv.weights, np.ones(n))


def test_online_patterner_in_training(own_model):
    """OnlinePatterner re-estimating chi (from the model being trained) every 10 steps, its weights handed to
    pp.tasks.train as a callable: re-inverted at steps 0 and 10, valid weights, the targeted loss down."""
    data, (held0, _) = own_model["data"], own_model["held"]
    topic = data.extra["concept"].numpy()
    f = np.array([(topic == g).mean() for g in range(2)])
    trained = {}
    for name in ("uniform", "online"):
        m = pp.Transformer(own_model["cfg"])
        m.load_state_dict(own_model["model"].state_dict())
        trained[name] = m
    m = trained["online"]
    estimated = []

    def estimate(step):
        estimated.append(step)
        res = pp.susceptibilities(
            m,
            torch.utils.data.DataLoader(data.tokens, batch_size=64),
            data.tokens,
            ["embed"],
            observable=lambda model: pp.losses.batch_loss(model, held0),
            per_token=False,
            **{**SAMPLER, "num_draws": 10},
        )
        return _group_chi(res.chi, topic, 2)

    patterner = pp.patterning.OnlinePatterner(
        estimate, lambda step, mu: np.array([-5e-3]), every=10, invert_kwargs={"fractions": f}
    )
    for name, weights in (("uniform", None), ("online", lambda step: patterner.weights_for(step)[topic])):
        pp.tasks.train(trained[name], own_model["task"], data=data, sample_weights=weights, **TRAIN)
    assert estimated == [0, 10] and [s for s, _ in patterner.history] == [0, 10]
    for _, iv in patterner.history:
        assert iv.method == "constrained" and (iv.weights >= 0).all() and abs(f @ iv.weights - 1) < 1e-12
        assert iv.weights[0] > 1 > iv.weights[1] and iv.predicted[0] < 0
    assert _loss(m, held0) < _loss(trained["uniform"], held0) - 0.02
