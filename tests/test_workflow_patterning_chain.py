"""Chaining the estimators: susceptibilities -> principal directions -> data weights -> re-weighted training."""

import numpy as np
import torch

import pypattern as pp
from pypattern.patterning import Intervention, direction_target
from pypattern.susceptibility import PCAResult, SusceptibilityResult


def test_probe_from_training_data_weights_reach_the_target_inside_the_data(tmp_path):
    task = pp.InductionTask(d_vocab=12, seq_len=9)
    model = pp.Transformer(task.model_config(d_model=16, n_heads=2, seed=0))
    data = task.sample(64, seed=1)
    pp.tasks.train(model, task, steps=20, data=data, seed=0, log_every=0, quiet=True)
    rows = np.arange(0, 64, 8)
    loader = torch.utils.data.DataLoader(data.tokens, batch_size=32, shuffle=True)
    comps = ["blocks.0.attn.head.0", "blocks.0.attn.head.1", "blocks.1.attn.head.0"]
    chi = pp.susceptibilities(
        model,
        loader,
        data.tokens[rows],
        comps,
        per_token=False,
        num_chains=2,
        num_draws=6,
        num_burnin_steps=4,
        step_size=1e-4,
        localization=100.0,
        quiet=True,
    )
    assert chi.chi.shape == (3, len(rows)) and chi.components == comps
    chi.save(tmp_path / "chi.npz")
    pca = SusceptibilityResult.load(tmp_path / "chi.npz").pca()
    pca.save(tmp_path / "pca.npz")
    d = PCAResult.load(tmp_path / "pca.npz").directions[0]
    target = direction_target(torch.as_tensor(d), 1e-3) * np.abs(chi.chi).mean() / np.abs(chi.chi).max()
    plan = pp.invert(torch.as_tensor(chi.chi), target, method="pinv", num_data=64)
    plan.save(tmp_path / "plan.npz")
    plan = Intervention.load(tmp_path / "plan.npz")
    w = np.ones(64)
    w[rows] = plan.weights
    # independent: re-weighting rows of M points moves mu by chi (w - 1) / M
    np.testing.assert_allclose(chi.chi @ ((w[rows] - 1.0) / 64), plan.predicted, rtol=1e-10, atol=1e-15)
    if plan.residual < 1e-8:
        np.testing.assert_allclose(plan.predicted, target, rtol=1e-6, atol=1e-12)
    loader_w = pp.reweight(data.tokens, np.clip(w, 0, None), batch_size=16)
    assert len(next(iter(loader_w))[0]) == 16
    before = [p.detach().clone() for p in model.parameters()]
    pp.tasks.train(
        model, task, steps=2, data=data, sample_weights=np.clip(w, 0, None), seed=1, log_every=0, quiet=True
    )
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
