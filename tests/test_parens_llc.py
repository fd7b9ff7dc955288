"""Tests of pypattern.experiments.parens_llc (patterning with each solution's own LLC)."""

import numpy as np
import torch

from pypattern.experiments.parens import NUM_GROUPS, GroupWeightedParentheses
from pypattern.experiments.parens_llc import (
    LLCSettings,
    SolutionParentheses,
    group_llc_chi,
    llc_susceptibility,
    select_llc_weights,
    split_probes,
    train_solution,
)
from pypattern.models.transformer import Transformer
from pypattern.tasks.parens import ALGORITHMS, ParenthesesTask


def test_split_probes_disjoint_and_per_cell():
    task = ParenthesesTask(8)
    fit, check = split_probes(task, seed=3)
    allp = task.probes("all")
    assert len(fit) + len(check) == len(allp)
    fs = {tuple(x.tolist()) for x in fit.tokens}
    cs = {tuple(x.tolist()) for x in check.tokens}
    assert not fs & cs
    for c in range(4):
        n = int((allp.extra["cell"] == c).sum())
        assert int((fit.extra["cell"] == c).sum()) == n // 2
        assert int((check.extra["cell"] == c).sum()) == n - n // 2


def test_solution_task_labels_fit_probes_by_algorithm():
    task = ParenthesesTask(8)
    fit, _ = split_probes(task)
    st = SolutionParentheses(8, "equal_counts", fit, probe_fraction=0.5)
    b = st.sample(400, seed=1)
    s = b.tokens[:, 1:-1]
    probe_like = b.extra["kind"] == 2
    assert 100 < int(probe_like.sum()) < 300
    fit_set = {tuple(x.tolist()) for x in fit.tokens[:, 1:-1]}
    assert all(tuple(x.tolist()) in fit_set for x in s[probe_like])
    # equal_counts says True on every probe; the rest is the normal training distribution (balanced = True)
    assert bool(b.extra["label"][probe_like].all())
    assert torch.equal(b.extra["label"][~probe_like], ALGORITHMS["balanced"](s[~probe_like]))


def test_solution_model_implements_its_algorithm():
    s = LLCSettings(solution_steps=700)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, chk = train_solution("equal_counts_first_open", s, seed=0)
    finally:
        torch.set_num_threads(old)
    assert chk["ok"], chk
    assert chk["train_acc"] >= 0.98 and min(chk["check_cells"]) >= 0.9


def test_llc_susceptibility_shapes_and_uniform_perturbation_is_null():
    s = LLCSettings(
        llc_num_chains=2, llc_num_draws=20, llc_num_burnin_steps=5, llc_probe_size=64, llc_num_batches=2
    )
    task = GroupWeightedParentheses(8)
    cfg = task.model_config(n_layers=1, d_model=16, n_heads=2, d_mlp=32, seed=0)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        est = llc_susceptibility(Transformer(cfg), s, seed=0)
    finally:
        torch.set_num_threads(old)
    assert est["chi_cov_chains"].shape == (2, 64) and est["chi_direct"].shape == (64,)
    assert np.isfinite(est["llc"]) and est["loss_trace"].shape == (2, 20)
    # re-weighting every sample equally changes nothing: the columns sum to zero (l_z - L sums to zero)
    for key in ("chi_cov", "chi_direct"):
        assert abs(est[key].sum()) < 1e-6 * max(1.0, np.abs(est[key]).sum())
    full, se = group_llc_chi(est, "full", se=True)
    assert full.shape == (NUM_GROUPS,) and se.shape == (NUM_GROUPS,)
    np.testing.assert_allclose(full, group_llc_chi(est, "cov") + group_llc_chi(est, "direct"), atol=1e-9)
    # group convention (parens.group_chi): chi_G[g] = G * sum_{z in g} chi_z / N, so the groups sum to zero too
    assert abs(float(full.sum())) < 1e-6 * max(1.0, float(np.abs(full).sum()))


def test_select_llc_weights_keeps_class_balance_and_lowers_target():
    s = LLCSettings(targets=("a", "b", "c"))
    fr = GroupWeightedParentheses(8).group_fractions.numpy()
    # lambda_a falls most when group 1 is up-weighted, lambda_b / lambda_c when group 3 / 4 is
    chi_g = np.array([[-5.0, -2.0, 0.0, 0.0, 0.0], [-5.0, 0.0, 0.0, -2.0, 0.0], [-5.0, 0.0, 0.0, 0.0, -2.0]])
    w, iv = select_llc_weights(chi_g, ["a", "b", "c"], "a", s, fr)
    assert w[0] == 1.0
    np.testing.assert_allclose(w[1:] @ fr[1:], fr[1:].sum(), rtol=1e-9)  # unequal-count share unchanged
    assert int(np.argmax(w[1:])) == 0 and w[1] > 1
    assert (w[1:] >= s.min_weight * 0.5).all()
    assert (iv.predicted < 0).all()  # lambda_a - lambda_b and lambda_a - lambda_c both predicted to fall
