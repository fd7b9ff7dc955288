"""Options of the susceptibility, BIF and patterning estimators against their definitions, computed independently.

The draws a run takes are observed through a callback of the sampler that evaluates, at each draw, the probe's
per-token losses and the observable with code written here (not the library's losses); ``chi``, its per-chain
rows, its jackknife standard error and the BIF are then computed from those values by a two-pass float64
covariance. Principal directions are checked against numpy's SVD, inversions against least-squares and
constrained solvers written here (with scipy), and online patterning against the exact response of a linear
regression to re-weighted data.
"""

import json
import zipfile
from io import BytesIO

import numpy as np
import pytest
import torch
from torch import nn

import pypattern as pp
import pypattern.susceptibility as sus
from pypattern import io
from pypattern.ops.covariance import CrossCovariance
from pypattern.patterning import OnlinePatterner, direction_target, invert
from pypattern.susceptibility import SusceptibilityResult

NBETA = 20.0
C = 3  # chains


# ------------------------------------------------------------------------------------------------ shared functions


def _token_losses(model, tokens):
    """Next-token cross-entropy per position, (batch, pos - 1), in float64: written here, not the library's."""
    logits = model(tokens).double()
    logp = torch.log_softmax(logits[:, :-1], -1)
    return -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)


def _recording(monkeypatch, fn):
    """Every sampler call inside susceptibilities/bif also calls ``fn`` at each draw."""
    real = sus.sample
    monkeypatch.setattr(sus, "sample", lambda *a, **k: real(*a, **{**k, "callbacks": [*k["callbacks"], fn]}))


def _cov(a, b):
    """Two-pass float64 covariance of columns, ddof 1: a (D,), b (D, n) -> (n,)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return ((a - a.mean())[:, None] * (b - b.mean(0))).sum(0) / (len(a) - 1)


def _physics_chi(ph, losses, counted=None):
    """-nβ Cov(phi, l_z - Lbar) with Lbar the mean over the counted entries."""
    lbar = losses.mean(1) if counted is None else losses[:, counted].mean(1)
    return -NBETA * _cov(ph, losses - lbar[:, None])


def _jackknife(per_chain_values):
    """The jackknife standard error over chains of an estimate pooled over chains (per_chain: list of (ph, L))."""
    loo = []
    for c in range(len(per_chain_values)):
        rest = [v for i, v in enumerate(per_chain_values) if i != c]
        loo.append(_physics_chi(np.concatenate([r[0] for r in rest]), np.concatenate([r[1] for r in rest])))
    loo = np.array(loo)
    return np.sqrt((len(loo) - 1) / len(loo) * ((loo - loo.mean(0)) ** 2).sum(0))


@pytest.fixture(scope="module")
def lm():
    """A two-layer transformer with MLPs, trained briefly on induction; training batches and a separate probe."""
    torch.manual_seed(0)
    task = pp.InductionTask(d_vocab=8, seq_len=7)
    model = pp.Transformer(task.model_config(d_model=8, n_heads=2, d_mlp=16, seed=0))
    pp.tasks.train(model, task, steps=20, seed=0, log_every=0)
    train = [task.sample(8, seed=s).tokens for s in range(2)]
    probe = task.sample(3, seed=9).tokens  # not in the training data
    return model, train, probe


SAMPLER = dict(
    num_chains=C, num_draws=10, num_burnin_steps=4, step_size=1e-3, localization=100.0, nbeta=NBETA, seed=1,
    quiet=True, batched=False, warn_nonstationary=False,
)  # fmt: skip


def _component_masks(model, spec):
    """{param: bool mask} a component spec covers, computed from the model's parameters."""
    params = dict(model.named_parameters())
    if isinstance(spec, str):
        return {k: v.bool() for k, v in model.component_masks(spec).items()}
    if isinstance(spec, dict):
        return {k: torch.as_tensor(v).bool() for k, v in spec.items()}
    return {k: torch.ones_like(params[k], dtype=torch.bool) for k in spec}


@pytest.fixture(scope="module")
def lm_runs(lm):
    """Runs on the transformer with every form of component, the draws recorded independently."""
    model, train, probe = lm
    g = torch.Generator().manual_seed(3)
    u_mask = torch.rand(model.unembed.W_U.shape, generator=g) < 0.3
    head_masks = {k: v.clone() for k, v in model.component_masks("blocks.0.attn.head.1").items()}
    comps = {
        "head": "blocks.0.attn.head.1",
        "head_as_masks": head_masks,
        "mlp": "blocks.1.mlp",
        "mlp_as_masks": {k: torch.ones_like(v, dtype=torch.bool) for k, v in model.component_masks("blocks.1.mlp").items()},
        "embed": "embed",
        "params": ["blocks.1.attn.W_Q", "ln_final.w"],
        "mask": {"unembed.W_U": u_mask},
    }  # fmt: skip
    masks = [_component_masks(model, spec) for spec in comps.values()]
    w_star = {k: v.detach().clone() for k, v in model.named_parameters()}

    def run(**kwargs):
        rec, moved = {}, {}

        def recorder(chain, model):
            run = chain // C
            with torch.no_grad():
                lz = _token_losses(model, probe)
                ph = _token_losses(model, train[0]).mean().item()
                # only the component's weights move
                for name, p in model.named_parameters():
                    m = masks[run].get(name, torch.zeros_like(p, dtype=torch.bool))
                    assert torch.equal(p[~m], w_star[name][~m]), (run, name)
                    moved[run] = moved.get(run, False) or not torch.equal(p[m], w_star[name][m])
            rec.setdefault(chain, []).append((ph, lz.numpy()))

        with pytest.MonkeyPatch.context() as mp:
            _recording(mp, recorder)
            res = pp.susceptibilities(
                model, train, probe, comps, sampling_batch=train[0], **SAMPLER, **kwargs
            )
        return res, rec, moved

    out = {"comps": comps, "tokens": run(), "samples": run(per_token=False)}
    return out


# ------------------------------------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize(
    "payload",
    [b"\xff\xfe\x00not utf-8", b'{"num_draws": 6, ', b"[1, 2, 3]"],
    ids=["not-utf8", "truncated-json", "not-a-mapping"],
)
def test_a_damaged_group_fingerprint_is_a_format_error_naming_the_file(tmp_path, monkeypatch, payload):
    """A killed group's sampler checkpoint whose ``state/fingerprint`` member was damaged (bytes rewritten inside
    the zip) is refused as a FormatError naming the file and saying to delete it, not a decoding error."""
    x = torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = x.sum(1, keepdim=True)
    model = nn.Linear(3, 1, bias=False).double()
    kw = dict(num_chains=2, num_draws=6, step_size=1e-3, nbeta=10.0, localization=20.0, seed=3, quiet=True,
              warn_nonstationary=False)  # fmt: skip
    real = sus.sample

    def killer(chain, draw):
        if draw == 3:
            raise KeyboardInterrupt

    ck = tmp_path / "ck"
    monkeypatch.setattr(
        sus, "sample", lambda *a, **k: real(*a, **{**k, "callbacks": [*k["callbacks"], killer]})
    )
    with pytest.raises(KeyboardInterrupt):
        pp.susceptibilities(model, [(x, y)], (x[:5], y[:5]), {"b": ["weight"]}, checkpoint=ck, **kw)
    monkeypatch.setattr(sus, "sample", real)
    (path,) = ck.iterdir()
    # the member as stored: a uint8 .npy array of JSON text; rewritten inside the zip with other bytes
    with zipfile.ZipFile(path) as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    (member,) = [k for k in members if k.startswith("state/fingerprint")]
    json.loads(bytes(np.load(BytesIO(members[member]))).decode())  # it was JSON text
    buf = BytesIO()
    np.lib.format.write_array(buf, np.frombuffer(payload, dtype=np.uint8))
    members[member] = buf.getvalue()
    with zipfile.ZipFile(path, "w") as z:
        for k, v in members.items():
            z.writestr(k, v)
    with pytest.raises(io.FormatError, match=rf"{path}.* is damaged: .*state/fingerprint.*delete"):
        pp.susceptibilities(model, [(x, y)], (x[:5], y[:5]), {"b": ["weight"]}, checkpoint=ck, **kw)


# ------------------------------------------------------------------------------------------------ susceptibilities


def test_every_form_of_component_gives_the_covariance_of_its_own_draws(lm_runs):
    """Heads, MLPs, the embedding, parameter lists and masks, a probe that is not training data: each row of chi,
    its per-chain rows, its jackknife standard error and the means are those of the draws, recomputed here; only
    the component's weights move."""
    res, rec, moved = lm_runs["tokens"]
    names = list(lm_runs["comps"])
    assert res.components == names and res.chi.shape == (len(names), 3 * 6) and res.nbeta == NBETA
    assert all(moved[k] for k in range(len(names)))
    assert sorted(rec) == list(range(len(names) * C)) and all(len(v) == 10 for v in rec.values())
    for k in range(len(names)):
        chains = [
            (np.array([d[0] for d in rec[k * C + c]]), np.stack([d[1].reshape(-1) for d in rec[k * C + c]]))
            for c in range(C)
        ]
        ph = np.concatenate([c[0] for c in chains])
        losses = np.concatenate([c[1] for c in chains])
        scale = np.abs(res.chi[k]).max()
        assert scale > 0
        np.testing.assert_allclose(res.chi[k], _physics_chi(ph, losses), rtol=0, atol=1e-4 * scale)
        for c in range(C):
            np.testing.assert_allclose(
                res.chi_chains[k, c], _physics_chi(*chains[c]), rtol=0, atol=1e-4 * scale
            )
        np.testing.assert_allclose(res.chi_se[k], _jackknife(chains), rtol=0, atol=1e-4 * scale)
        np.testing.assert_allclose(res.loss_mean[k], losses.mean(0), rtol=1e-5)
        np.testing.assert_allclose(res.phi_mean[k], ph.mean(), rtol=1e-5)


def test_a_component_by_name_is_its_masks_and_per_sample_chi_is_the_mean_over_tokens(lm, lm_runs):
    """A name samples exactly as the masks it stands for; with per_token=False (no padding: every sample has as
    many tokens) chi of a sample is the mean of its tokens' chi, by linearity of the covariance."""
    model, _, probe = lm
    res, _, _ = lm_runs["tokens"]
    per_sample, rec, _ = lm_runs["samples"]
    names = list(lm_runs["comps"])
    i = names.index
    np.testing.assert_allclose(res.chi[i("head")], res.chi[i("head_as_masks")], rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(res.chi[i("mlp")], res.chi[i("mlp_as_masks")], rtol=1e-6, atol=1e-12)
    np.testing.assert_array_equal(res.probe_sample, np.repeat(np.arange(3), 6))
    np.testing.assert_array_equal(res.probe_position, np.tile(np.arange(1, 7), 3))
    np.testing.assert_array_equal(res.probe_token, probe[:, 1:].reshape(-1).numpy())
    assert per_sample.chi.shape == (len(names), 3)
    np.testing.assert_array_equal(per_sample.probe_sample, np.arange(3))
    scale = np.abs(per_sample.chi).max()
    np.testing.assert_allclose(
        per_sample.chi, res.chi.reshape(len(names), 3, 6).mean(2), rtol=0, atol=1e-4 * scale
    )
    # and directly from its own draws: per-sample losses are the means of the token losses
    for k in range(len(names)):
        ph = np.array([d[0] for c in range(C) for d in rec[k * C + c]])
        losses = np.stack([d[1].mean(1) for c in range(C) for d in rec[k * C + c]])
        np.testing.assert_allclose(per_sample.chi[k], _physics_chi(ph, losses), rtol=0, atol=1e-4 * scale)


def test_custom_observable_and_per_sample_losses_on_a_probe_outside_the_training_data(monkeypatch):
    """An observable of one's own (a float, or a tensor) and per-sample losses of one's own, on an MLP: chi is
    -nβ Cov(phi, l_z - Lbar) of the draws, with phi and the losses recomputed here."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, generator=g, dtype=torch.float64)
    y = torch.randn(32, 2, generator=g, dtype=torch.float64)
    held = torch.randn(4, 3, generator=g, dtype=torch.float64)
    probe = (
        torch.randn(5, 3, generator=g, dtype=torch.float64),
        torch.randn(5, 2, generator=g, dtype=torch.float64),
    )
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()

    def psl(m, batch):  # absolute error summed over outputs: not the library's default
        return (m(batch[0]) - batch[1]).abs().sum(1)

    def check(obs):
        rec = {}

        def recorder(chain, model):
            with torch.no_grad():
                rec.setdefault(chain, []).append((float(obs(model)), psl(model, probe).numpy()))

        with monkeypatch.context() as mp:
            _recording(mp, recorder)
            res = pp.susceptibilities(
                model, [(x[:16], y[:16]), (x[16:], y[16:])], probe, {"first": ["0.weight", "0.bias"], "second": "2"},
                observable=obs, per_sample_loss_fn=psl, **{**SAMPLER, "localization": 50.0},
            )  # fmt: skip
        for k in range(2):
            ph = np.array([d[0] for c in range(C) for d in rec[k * C + c]])
            losses = np.stack([d[1] for c in range(C) for d in rec[k * C + c]])
            scale = np.abs(res.chi[k]).max()
            assert scale > 0
            np.testing.assert_allclose(res.chi[k], _physics_chi(ph, losses), rtol=0, atol=1e-9 * scale)
            np.testing.assert_allclose(res.phi_mean[k], ph.mean(), rtol=1e-12)

    check(lambda m: float(m(held)[:, 0].sum()))  # a float
    check(lambda m: (m(held) ** 2).mean())  # a tensor


def test_the_probe_as_the_only_training_batch_reads_the_samplers_own_forward(lm, monkeypatch):
    """Full-batch SGLD on the probe (one forward per step: phi and the probe losses from the sampler's own
    forward) gives chi of the draws recomputed here: phi the mean token loss on the probe."""
    model, _, probe = lm
    rec = {}

    def recorder(chain, model):
        with torch.no_grad():
            lz = _token_losses(model, probe)
        rec.setdefault(chain, []).append((lz.mean().item(), lz.reshape(-1).numpy()))

    _recording(monkeypatch, recorder)
    res = pp.susceptibilities(model, [probe], probe, ["blocks.1.attn.head.0", "blocks.0.mlp"], **SAMPLER)
    for k in range(2):
        ph = np.array([d[0] for c in range(C) for d in rec[k * C + c]])
        losses = np.stack([d[1] for c in range(C) for d in rec[k * C + c]])
        scale = np.abs(res.chi[k]).max()
        np.testing.assert_allclose(res.chi[k], _physics_chi(ph, losses), rtol=0, atol=1e-4 * scale)


@pytest.mark.parametrize("per_token", [True, False])
def test_bif_is_minus_the_covariance_of_the_probe_losses_over_the_draws(lm, monkeypatch, per_token):
    model, train, probe = lm
    rec = []

    def recorder(model):
        with torch.no_grad():
            lz = _token_losses(model, probe)
        rec.append((lz if per_token else lz.mean(1)).reshape(-1).numpy())

    _recording(monkeypatch, recorder)
    res = pp.bif(model, train, probe, per_token=per_token, **SAMPLER)
    losses = np.stack(rec)
    assert losses.shape == (C * 10, 18 if per_token else 3) and res.bif.shape == (losses.shape[1],) * 2
    cov = np.cov(losses.T, ddof=1)
    scale = np.abs(cov).max()
    np.testing.assert_allclose(res.bif, -cov, rtol=0, atol=1e-4 * scale)
    np.testing.assert_allclose(res.corr, np.corrcoef(losses.T), rtol=0, atol=1e-3)
    np.testing.assert_allclose(res.loss_mean, losses.mean(0), rtol=1e-5)
    assert (np.diag(res.bif) <= 0).all()  # minus a variance


def test_streaming_covariance_matches_a_two_pass_float64_covariance():
    """Draws one at a time, per-chain accumulators merged, values with a large common offset (losses near a
    large value that fluctuate little): the streamed covariance is the two-pass one of the same draws."""
    rng = np.random.default_rng(0)
    a = 1e4 + 1e-3 * rng.normal(size=(300, 1))
    b = 50.0 + 1e-2 * (rng.normal(size=(300, 4)) + 0.7 * (a - 1e4) / 1e-3)
    chains = [CrossCovariance(1, 4, track_auto="var") for _ in range(3)]
    for i in range(300):
        chains[i % 3].update(torch.from_numpy(a[i : i + 1]), torch.from_numpy(b[i : i + 1]))
    pooled = CrossCovariance(1, 4, track_auto="var")
    for c in chains:
        pooled.merge(c)
    two_pass = _cov(a[:, 0], b)
    np.testing.assert_allclose(pooled.cov(ddof=1)[0].numpy(), two_pass, rtol=1e-9)
    np.testing.assert_allclose(pooled.mean_b.numpy(), b.mean(0), rtol=1e-14)
    corr = two_pass / a[:, 0].std(ddof=1) / b.std(0, ddof=1)
    np.testing.assert_allclose(pooled.corr()[0].numpy(), corr, rtol=1e-9)


@pytest.mark.parametrize("per_token", [True, False])
def test_a_probe_with_ignored_labels_leaves_them_out_of_lbar_and_gives_them_no_chi(
    lm, monkeypatch, per_token
):
    """A dict probe whose labels are -100 at some positions: those entries get chi 0 and stay out of Lbar (per
    token), and a sample's loss is the mean over its counted tokens (per sample), from the draws recomputed here."""
    model, train, tokens = lm
    labels = tokens.clone()
    labels[0, 4:] = -100
    labels[2, 2:4] = -100
    probe = {"input_ids": tokens, "labels": labels}
    ok = labels[:, 1:] != -100

    def own_losses(m):
        logp = torch.log_softmax(m(tokens).double()[:, :-1], -1)
        lz = -logp.gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1)
        return torch.where(ok, lz, 0.0)

    def phi(m):  # the observable: the mean token loss of a training batch
        return _token_losses(m, train[1]).mean()

    rec = {}

    def recorder(chain, model):
        with torch.no_grad():
            rec.setdefault(chain, []).append((phi(model).item(), own_losses(model).numpy()))

    _recording(monkeypatch, recorder)
    res = pp.susceptibilities(
        model, train, probe, ["blocks.0.mlp"], observable=phi, per_token=per_token, **SAMPLER
    )
    ph = np.array([d[0] for c in range(C) for d in rec[c]])
    losses = np.stack([d[1] for c in range(C) for d in rec[c]])
    okn = ok.numpy()
    if per_token:
        np.testing.assert_array_equal(res.probe_counted, okn.reshape(-1))
        np.testing.assert_array_equal(res.probe_token, np.where(okn, tokens[:, 1:].numpy(), -1).reshape(-1))
        want = _physics_chi(ph, losses.reshape(len(ph), -1), counted=okn.reshape(-1))
        want[~okn.reshape(-1)] = 0.0
    else:
        assert res.probe_counted is None
        want = _physics_chi(ph, losses.sum(2) / okn.sum(1))
    scale = np.abs(want).max()
    assert scale > 0
    np.testing.assert_allclose(res.chi[0], want, rtol=0, atol=1e-4 * scale)
    if per_token:
        assert (res.chi[0][~okn.reshape(-1)] == 0).all()


# ------------------------------------------------------------------------------------------------ principal directions


def _result(chi, counted=None):
    k, n = chi.shape
    return SusceptibilityResult(
        chi=chi, chi_se=np.zeros_like(chi), chi_chains=chi[:, None], components=[f"c{i}" for i in range(k)],
        probe_sample=np.arange(n), probe_position=-np.ones(n, np.int64), probe_token=-np.ones(n, np.int64),
        phi_mean=np.zeros(k), loss_mean=np.zeros((k, n)), convention="physics", nbeta=1.0, num_chains=1,
        num_draws=2, settings={}, probe_counted=counted,
    )  # fmt: skip


@pytest.mark.parametrize("seed", range(6))
def test_principal_directions_are_numpys_svd_of_the_centred_chi(seed):
    rng = np.random.default_rng(seed)
    k, n = int(rng.integers(2, 6)), int(rng.integers(3, 10))
    rank = int(rng.integers(1, min(k, n) + 1))
    chi = rng.normal(size=(k, rank)) @ rng.normal(size=(rank, n)) * rng.uniform(0.1, 10, size=(k, 1))
    counted = None
    if seed % 2:
        counted = np.ones(n, bool)
        counted[rng.choice(n, size=1)] = False
    res = _result(chi, counted)
    x = chi.T if counted is None else chi.T[counted]
    most = min(x.shape)
    for whiten in (False, True):
        p = res.pca(whiten=whiten)
        xc = x - x.mean(0)
        scale = xc.std(0, ddof=1) if whiten else np.ones(k)
        scale = np.where(scale > 0, scale, 1.0)
        xs = xc / scale
        _, s, vt = np.linalg.svd(xs, full_matrices=False)
        assert p.directions.shape == (most, k) and p.scores.shape == (n, most)
        np.testing.assert_allclose(p.scale, scale, rtol=1e-12)
        np.testing.assert_allclose(p.mean, x.mean(0), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(
            p.explained_variance, s**2 / (x.shape[0] - 1), rtol=1e-10, atol=1e-12 * s[0] ** 2
        )
        np.testing.assert_allclose(p.explained_variance_ratio, s**2 / (s**2).sum(), atol=1e-12)
        np.testing.assert_allclose(p.directions @ p.directions.T, np.eye(most), atol=1e-10)
        # the directions with non-zero variance are numpy's up to sign; the sign: largest loading positive
        big = s > 1e-8 * s[0]
        for j in np.flatnonzero(big):
            assert abs(abs(p.directions[j] @ vt[j]) - 1) < 1e-8
            top = np.argmax(np.abs(p.directions[j]))
            assert p.directions[j, top] > 0
        # scores: the centred (scaled) points projected on the directions; NaN rows where a point does not count
        rows = slice(None) if counted is None else counted
        np.testing.assert_allclose(p.scores[rows], xs @ p.directions.T, atol=1e-10 * np.abs(xs).max())
        np.testing.assert_allclose(p.scores[rows] @ p.directions, xs, atol=1e-10 * np.abs(xs).max())
        if counted is not None:
            assert np.isnan(p.scores[~counted]).all()
        q = res.pca(1, whiten=whiten)
        np.testing.assert_allclose(q.directions, p.directions[:1], atol=1e-12)
    with pytest.raises(
        ValueError, match=rf"n_components={most + 1} is more than the {most} principal directions"
    ):
        res.pca(most + 1)
    assert res.pca(most).directions.shape == (most, k)  # beyond the rank, up to the SVD's size: allowed


def test_pca_settings_are_checked_by_name():
    res = _result(np.random.default_rng(0).normal(size=(2, 5)))
    with pytest.raises(ValueError, match="n_components=3 is more than the 2 principal directions"):
        res.pca(3)
    with pytest.raises(TypeError, match="whiten='yes' is not valid"):
        res.pca(whiten="yes")
    with pytest.raises(ValueError, match="n_components=0"):
        res.pca(0)


# ------------------------------------------------------------------------------------------------ inversion


def _sum_zero_basis(n):
    """An orthonormal basis (n, n - 1) of the perturbations that sum to 0 (mean-1 re-weightings)."""
    q, _ = np.linalg.qr(np.eye(n)[:, 1:] - 1.0 / n)
    return q


@pytest.mark.parametrize("seed", range(8))
def test_unconstrained_inversions_are_least_squares_over_reweightings(seed):
    """pinv: the minimum-norm sum-zero h of least |chi h - target|; ridge: the sum-zero h minimising
    |chi h - target|^2 + alpha |h|^2; both solved here on an orthonormal basis of sum-zero vectors. Rank-deficient
    chi and unreachable targets included (the residual is then the least-squares one)."""
    rng = np.random.default_rng(seed)
    k, n = int(rng.integers(1, 6)), int(rng.integers(2, 12))
    rank = int(rng.integers(1, min(k, n) + 1))
    chi = rng.normal(size=(k, rank)) @ rng.normal(size=(rank, n)) * 10.0 ** rng.uniform(-3, 3)
    target = rng.normal(size=k) * np.abs(chi).max() * 0.05
    q = _sum_zero_basis(n)
    a = chi @ q
    iv = invert(chi, target)
    h = q @ np.linalg.lstsq(a, target, rcond=None)[0]
    np.testing.assert_allclose(iv.h, h, rtol=0, atol=1e-10 * np.abs(h).max())
    assert abs(iv.h.sum()) <= 1e-12 * np.abs(iv.h).max() * n
    np.testing.assert_allclose(iv.weights, 1 + n * iv.h, rtol=0, atol=1e-15 * n)
    np.testing.assert_allclose(iv.predicted, chi @ iv.h, rtol=1e-12, atol=1e-14 * np.abs(target).max())
    resid = np.linalg.norm(chi @ h - target) / np.linalg.norm(target)
    assert abs(iv.residual - resid) < 1e-9
    if rank == k and n > k:  # every target reachable: reached
        assert iv.residual < 1e-9
    alpha = 10.0 ** rng.uniform(-2, 1) * np.abs(chi).max() ** 2
    ridge = invert(chi, target, method="ridge", alpha=alpha)
    hr = q @ np.linalg.solve(a.T @ a + alpha * np.eye(n - 1), a.T @ target)
    np.testing.assert_allclose(ridge.h, hr, rtol=0, atol=1e-10 * np.abs(hr).max())
    assert np.linalg.norm(ridge.h) <= np.linalg.norm(iv.h) * (1 + 1e-9)  # shrunk


@pytest.mark.parametrize("seed", range(10))
def test_constrained_inversion_is_the_optimum_of_its_problem(seed):
    """Weights within [min_weight, max_weight], total sum f_j w_j = sum f_j, minimising
    |chi (w - 1) / N - target|^2 + alpha |w - 1|^2 / N: checked against scipy's SLSQP on the same problem (the
    weights when alpha > 0 makes the optimum unique, the objective when alpha = 0), with targets often out of
    reach (best effort: the nearest response the constraints allow)."""
    optimize = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(100 + seed)
    k, n = int(rng.integers(1, 5)), int(rng.integers(2, 12))
    chi = rng.normal(size=(k, n)) * 10.0 ** rng.uniform(-2, 2)
    target = rng.normal(size=k) * np.abs(chi).max() * rng.choice([0.01, 0.3, 3.0])
    alpha = 0.0 if seed % 3 == 0 else 10.0 ** rng.uniform(-3, 0) * np.abs(chi).max() ** 2 / n
    lo = float(rng.choice([0.0, 0.4]))
    hi = [None, 1.7, 4.0][seed % 3]
    fractions = rng.uniform(0.5, 2.0, size=n) if seed % 2 else None
    iv = invert(
        chi, target, method="constrained", alpha=alpha, min_weight=lo, max_weight=hi, fractions=fractions
    )
    w = iv.weights
    c = np.ones(n) if fractions is None else fractions * n / fractions.sum()
    assert abs(c @ w - c.sum()) <= 1e-12 * n
    assert w.min() >= lo - 1e-12 and (hi is None or w.max() <= hi + 1e-12)
    np.testing.assert_allclose(iv.h, (w - 1) / n, rtol=0, atol=1e-15)
    np.testing.assert_allclose(iv.predicted, chi @ iv.h, rtol=1e-12, atol=1e-15 * np.abs(chi).max())
    s = np.abs(chi).max() ** 2

    def objective(v):
        r = chi @ (v - 1) / n - target
        return (r @ r + alpha * (v - 1) @ (v - 1) / n) / s

    def gradient(v):
        return (2 * chi.T @ (chi @ (v - 1) / n - target) / n + 2 * alpha * (v - 1) / n) / s

    best = optimize.minimize(
        objective, np.ones(n), jac=gradient, method="SLSQP", bounds=[(lo, hi)] * n,
        constraints=[{"type": "eq", "fun": lambda v: c @ v - c.sum(), "jac": lambda v: c}],
        options={"ftol": 1e-16, "maxiter": 2000},
    )  # fmt: skip
    assert objective(w) <= best.fun * (1 + 1e-7) + 1e-18
    if alpha > 0:
        np.testing.assert_allclose(w, best.x, rtol=0, atol=1e-5)
    reached = np.linalg.norm(iv.predicted - target) / np.linalg.norm(target)
    assert abs(iv.residual - reached) < 1e-12


def test_an_unreachable_target_is_best_effort_and_says_so_in_the_residual():
    """chi whose response is one direction: a target across it is reached only in its projection (pinv), and a
    target beyond what non-negative weights allow stops at the bound (constrained), both with residual > 0."""
    chi = np.outer([1.0, 2.0], [1.0, -1.0, 0.5, 0.0])  # rank 1: responses along (1, 2) only
    target = np.array([2.0, -1.0])  # orthogonal to (1, 2): nothing of it is reachable
    iv = invert(chi, target)
    assert iv.residual == pytest.approx(1.0, abs=1e-12) and np.abs(iv.h).max() < 1e-12
    along = np.array([1.0, 2.0]) * 10.0  # reachable by h, but not with weights >= 0 (|h| needs weights < 0)
    c = invert(chi, along, method="constrained")
    assert c.weights.min() >= 0 and 0 < c.residual < 1
    # the best non-negative weights: all the weight on the column of largest response (chi's column 0)
    np.testing.assert_allclose(c.weights, [4.0, 0.0, 0.0, 0.0], atol=1e-9)
    assert np.linalg.norm(c.predicted - along) < np.linalg.norm(along)


# ------------------------------------------------------------------------------------------------ online patterning


@pytest.mark.parametrize("delta", [0.04, -0.04])
def test_online_patterning_moves_the_targeted_observable_as_predicted(delta):
    """A linear regression trained to its optimum; the observable is its first weight. chi estimated by
    susceptibilities at the current weights is the exact linear response of the optimum to re-weighting (a
    Gaussian posterior: -nβ Cov(phi, l_z - L) = -(nβ H + γ)^-1 nβ grad(l_z - L), close to the trained optimum's
    own response -H^-1 grad l_z); training on the weights OnlinePatterner returns moves the observable by the
    target, in sign and roughly in size."""
    n, d, nbeta, gamma = 24, 3, 24.0, 1.0
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w_true = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    y = (x @ w_true + 0.5 * torch.randn(n, generator=g, dtype=torch.float64))[:, None]
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x, y).solution.T)

    def phi(m):
        return m.weight[0, 0]

    estimated = []

    def estimate_chi(step):
        estimated.append(step)
        res = pp.susceptibilities(
            model, [(x, y)], (x, y), ["weight"], observable=phi, num_chains=4, num_draws=300,
            num_burnin_steps=50, step_size=2e-3, nbeta=nbeta, localization=gamma, seed=step, quiet=True,
            warn_nonstationary=False,
        )  # fmt: skip
        return res.chi

    xs, ys, w0 = x.numpy(), y.numpy()[:, 0], model.weight.detach().numpy()[0].copy()
    hess = 2 * xs.T @ xs / n
    grads = 2 * (xs @ w0 - ys)[:, None] * xs  # grad l_z at the optimum (their mean is 0)
    exact = -np.linalg.solve(nbeta * hess + gamma * np.eye(d), nbeta * grads.T)[0]  # d mu / d h_z
    patterner = OnlinePatterner(estimate_chi, np.array([delta]), every=50)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    start = phi(model).item()
    for step in range(100):
        weights = torch.as_tensor(patterner.weights_for(step))
        loss = (weights * (model(x)[:, 0] - y[:, 0]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    moved = phi(model).item() - start
    assert estimated == [0, 50] and [s for s, _ in patterner.history] == [0, 50]
    first = patterner.history[0][1]
    assert (
        first.method == "constrained" and first.weights.min() >= 0 and abs(first.weights.mean() - 1) < 1e-12
    )
    np.testing.assert_allclose(first.predicted, [delta], rtol=1e-9)
    # the estimated chi predicts what the exact response gives for these weights
    assert np.sign(exact @ first.h) == np.sign(delta)
    assert 0.6 < (exact @ first.h) / delta < 1.6
    # and training on the weights moves the observable by about the target
    assert np.sign(moved) == np.sign(delta) and 0.5 < moved / delta < 1.6, (moved, exact @ first.h)


# ------------------------------------------------------------------------------------------------ bad inputs

CHI = np.array([[1.0, -0.5, 0.2, 0.0], [0.3, 0.8, -0.4, 0.1]])


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: invert(CHI, [0.1, 0.1], method="constrained", max_weight=0.5), ValueError, "max_weight=0.5"),
        (lambda: invert(CHI, [0.1, 0.1], method="constrained", min_weight=1.5), ValueError, "min_weight=1.5"),
        (lambda: direction_target([1.0, 2.0], True), TypeError, "amount=True is not valid"),
        (lambda: direction_target([1.0, 2.0], "2"), TypeError, "amount='2' is not valid"),
        (lambda: direction_target([1.0, 2.0], None), TypeError, "amount=None is not valid"),
        (lambda: direction_target([1.0, 2.0], np.ones(2)), TypeError, "amount=array"),
        (lambda: OnlinePatterner(lambda s: CHI, [0.1, 0.1], invert_kwargs=[("method", "pinv")]), TypeError,
         "invert_kwargs must be a dict"),
        (lambda: OnlinePatterner(lambda s: CHI, [0.1, 0.1], invert_kwargs={"methd": "pinv"}), TypeError,
         r"invert_kwargs has keys \['methd'\]"),
        (lambda: OnlinePatterner(lambda s: CHI, [0.1, 0.1], measure=lambda s: [0.0, 0.0]), ValueError,
         "measure is read only by a callable target"),
        (lambda: OnlinePatterner(lambda s: None, [0.1, 0.1]).weights_for(0), TypeError,
         r"estimate_chi\(0\) returned a chi that is not valid"),
        (lambda: OnlinePatterner(lambda s: CHI, lambda s, mu: [0.1]).weights_for(3), ValueError,
         r"target must have one entry per observable \(2\).*at step 3; target\(step=3"),
        (lambda: OnlinePatterner(lambda s: CHI, [0.1, 0.1, 0.1]).weights_for(0), ValueError,
         "target must have one entry per observable"),
    ],
)  # fmt: skip
def test_bad_patterning_inputs_are_refused_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_direction_target_reads_numbers_of_every_kind():
    want = direction_target([3.0, 4.0], 5.0)
    np.testing.assert_allclose(want, [3.0, 4.0])
    for amount in (5, np.float32(5.0), np.array(5.0), torch.tensor(5.0)):
        np.testing.assert_allclose(direction_target([3.0, 4.0], amount), want, rtol=1e-7)


def test_an_observable_that_returns_no_number_is_named():
    x = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    model = nn.Linear(3, 1).double()
    kw = dict(num_chains=1, num_draws=2, step_size=1e-3, nbeta=5.0, localization=10.0, quiet=True)

    def returning(value):
        return lambda m: value

    for value, shown in ((None, "NoneType None"), ("phi", "str 'phi'"), (torch.tensor(1.0 + 2.0j), "Tensor")):
        with pytest.raises(TypeError, match=f"observable returned {shown}.*one real number"):
            pp.susceptibilities(
                model, [(x, x[:, :1])], (x[:3], x[:3, :1]), ["weight"], observable=returning(value), **kw
            )
    # numbers of every kind are read
    for value in (1.5, np.float64(1.5), np.array(1.5), 2):
        pp.susceptibilities(
            model, [(x, x[:, :1])], (x[:3], x[:3, :1]), ["weight"], observable=returning(value), **kw
        )


def test_an_observable_that_returns_a_weight_itself_is_read_as_its_value(recwarn):
    """phi = one weight of the model (a view of a parameter that requires grad): read as a value, without torch's
    warning about converting a tensor that requires grad, and the same chi as a copy of it gives."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 3, generator=g, dtype=torch.float64)
    y = x.sum(1, keepdim=True)
    model = nn.Linear(3, 1, bias=False).double()
    kw = dict(num_chains=2, num_draws=20, step_size=2e-3, nbeta=24.0, localization=1.0, quiet=True,
              warn_nonstationary=False)  # fmt: skip
    view = pp.susceptibilities(model, [(x, y)], (x, y), ["weight"], observable=lambda m: m.weight[0, 0], **kw)
    assert not [w for w in recwarn if "requires_grad" in str(w.message)]
    copy = pp.susceptibilities(
        model, [(x, y)], (x, y), ["weight"], observable=lambda m: m.weight[0, 0].detach().clone(), **kw
    )
    np.testing.assert_array_equal(view.chi, copy.chi)
    np.testing.assert_array_equal(view.phi_mean, copy.phi_mean)
