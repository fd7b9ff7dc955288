"""pypattern.distributed on two gloo ranks: numbers compared by value (``nbeta=20`` and ``20.0`` are one call),
data sets of other sizes whose first batches agree refused on every rank, a rank without chains in a
susceptibility call; pypattern.truth: Aoyagi's formula written independently over larger and deeper networks, and
inputs whose order or type would give a wrong number refused."""

import datetime
import itertools
import json
import math
import os
import random
import tempfile
import time
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import pypattern
from pypattern import distributed, truth

KW = dict(
    num_chains=3,
    num_draws=6,
    step_size=1e-3,
    localization=10.0,
    nbeta=20.0,
    seed=4,
    quiet=True,
    warn_nonstationary=False,
)


def _task(n: int = 96):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 6, generator=g)
    y = (x[:, :3].sum(1) > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
    data = torch.utils.data.TensorDataset(x[:n], y[:n])
    return model, torch.utils.data.DataLoader(data, batch_size=16, shuffle=False), (x[:5], y[:5])


def _outcome(call):
    try:
        return ["ok", call()]
    except Exception as e:  # noqa: BLE001 - recorded for the test
        return ["error", f"{type(e).__name__}: {e}"]


def _worker(rank: int, world: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{folder}/init",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=30),
    )
    model, loader, probe = _task()
    out = {
        # one number written as an int on one rank and a float on the other
        "nbeta": _outcome(
            lambda: distributed.estimate_llc(model, loader, **{**KW, "nbeta": 20 if rank else 20.0}).llc_mean
        ),
        # a default (weight_decay=0.0) given as the int 0 on one rank only
        "default_as_int": _outcome(
            lambda: (
                distributed.estimate_llc(
                    model, loader, **({**KW, "weight_decay": 0} if rank else KW)
                ).llc_mean
            )
        ),
    }
    # rank 1's data set is longer: the unshuffled loaders' first batches agree, their epochs do not
    longer_model, longer_loader, _ = _task(96 if rank else 80)
    out["uneven_data"] = _outcome(
        lambda: distributed.estimate_llc(longer_model, longer_loader, **KW).llc_mean
    )
    # ragged: 81 samples against 80 have the same 5 full batches of 16
    ragged_model, ragged_loader, _ = _task(81 if rank else 80)
    out["uneven_samples"] = _outcome(
        lambda: distributed.estimate_llc(ragged_model, ragged_loader, **KW).llc_mean
    )
    # one chain over two ranks: rank 1 holds no accumulator with draws, and still returns chi
    out["sus_one_chain"] = _outcome(
        lambda: distributed.susceptibilities(
            model, loader, probe, ["0.weight", "2.weight"], **{**KW, "num_chains": 1}
        ).chi.tolist()
    )
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    os._exit(0)  # gloo's teardown at exit aborts now and then; the results are written


def _spawn(folder: str, seconds: float = 120.0) -> None:
    ctx = mp.spawn(_worker, args=(2, folder), nprocs=2, join=False)
    deadline = time.monotonic() + seconds
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two ranks did not finish in time")


def test_two_ranks_compare_numbers_by_value_and_refuse_data_of_other_sizes():
    model, loader, probe = _task()
    single = pypattern.estimate_llc(model, loader, **KW).llc_mean
    sus = pypattern.susceptibilities(
        model, loader, probe, ["0.weight", "2.weight"], **{**KW, "num_chains": 1}
    )
    assert np.abs(sus.chi).max() > 0
    with tempfile.TemporaryDirectory() as folder:
        _spawn(folder)
        outs = [json.load(open(os.path.join(folder, f"rank{r}.json"))) for r in range(2)]
    for o in outs:
        assert o["nbeta"] == ["ok", single]
        assert o["default_as_int"] == ["ok", single]
        status, message = o["uneven_data"]
        assert status == "error" and "different values of 'data'" in message
        assert "batches_per_epoch = 5 on rank 0, 6 on rank 1" in message
        status, message = o["uneven_samples"]
        assert status == "error" and "data.samples = 80 on rank 0, 81 on rank 1" in message
        assert o["sus_one_chain"][0] == "ok"
        np.testing.assert_allclose(o["sus_one_chain"][1], sus.chi, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# truth
# ----------------------------------------------------------------------------------------------------------------
def _aoyagi_own(widths, r):
    """Aoyagi (2024), Theorem 1, written from its statement: grow the set of the smallest M_i one index at a time
    and stop at the first that satisfies the three conditions."""
    M = sorted(h - r for h in widths)
    for size in range(2, len(M) + 1):
        ell = size - 1
        inside, outside = M[:size], M[size:]
        total = sum(inside)
        ok = total >= ell * inside[-1]
        if outside:
            ok = ok and inside[-1] < outside[0] and total < ell * outside[0]
        if not ok:
            continue
        a = total - (math.ceil(Fraction(total, ell)) - 1) * ell
        cross = (total * total - sum(m * m for m in inside)) // 2  # sum over pairs i < j
        lam = (
            Fraction(r * (widths[0] + widths[-1]) - r * r, 2)
            + Fraction(a * (ell - a), 4 * ell)
            - Fraction(ell * (ell - 1), 4) * Fraction(total, ell) ** 2
            + Fraction(cross, 2)
        )
        return lam, a * (ell - a) + 1
    raise AssertionError((widths, r))


def test_dln_matches_the_theorem_on_larger_and_deeper_networks():
    rng = random.Random(0)
    cases = [(tuple(rng.randint(1, 12) for _ in range(rng.randint(2, 8))), None) for _ in range(400)]
    cases += [((h,) * L, None) for h in (1, 2, 7) for L in (2, 3, 6)]  # equal widths
    cases += [
        ((9, 1, 1, 9), None),
        ((1, 9, 9, 1), None),
        ((12, 1, 12), None),
    ]  # width one inside or at the ends
    n = 0
    for widths, _ in cases:
        for r in sorted({0, min(widths), rng.randint(0, min(widths))}):  # rank 0, full rank, one between
            lam, m = _aoyagi_own(widths, r)
            assert truth.dln_learning_coefficient(widths, r, multiplicity=True) == (float(lam), m), (
                widths,
                r,
            )
            # the transposed network has the same coefficient
            assert truth.dln_learning_coefficient(widths[::-1], r) == float(lam)
            d = sum(a * b for a, b in zip(widths[:-1], widths[1:]))
            assert r * (widths[0] + widths[-1] - r) / 2 <= float(lam) <= d / 2
            n += 1
    assert n > 900
    # the check values of the statement, rank 0
    for widths, lam in (((5, 3, 5), 6.5), ((5, 4, 5), 8.0), ((4, 3, 8), 6.0)):
        assert truth.dln_learning_coefficient(widths) == lam == float(_aoyagi_own(widths, 0)[0])
    # a rank-r teacher through a hidden width r: the product's rank is fixed, lambda = r (H0 + HL - r) / 2 plus the
    # coefficient of the rank-0 remainder, which has a zero width (regular in what is left)
    for H0, HL in itertools.product(range(1, 6), repeat=2):
        r = min(H0, HL)
        assert truth.dln_learning_coefficient((H0, r, HL), r) == r * (H0 + HL - r) / 2


def test_regular_and_one_matrix_gaussian_posterior_expectation():
    # a regular model's lambda is the tempered expectation of n K under exp(-n K) for quadratic K, exactly:
    # E[n w^T A w] = d / 2 for p(w) ~ exp(-n w^T A w) (each of the d Gaussian directions contributes 1/2)
    g = torch.Generator().manual_seed(1)
    for d in (1, 3, 6):
        B = torch.randn(d, d, generator=g, dtype=torch.float64)
        A = B @ B.T + d * torch.eye(d, dtype=torch.float64)
        n = 50.0
        cov = torch.linalg.inv(2 * n * A)
        w = torch.distributions.MultivariateNormal(torch.zeros(d, dtype=torch.float64), cov).sample(
            (200_000,)
        )
        mc = (n * torch.einsum("si,ij,sj->s", w, A, w)).mean().item()
        assert mc == pytest.approx(truth.regular_learning_coefficient(d), rel=0.01)
        assert truth.dln_learning_coefficient((d, 1), 0) == truth.regular_learning_coefficient(d)


def test_truth_refuses_unordered_widths_and_integer_weights():
    # a set would reorder and merge the widths: {5, 3, 5} is (3, 5), lambda 7.5 instead of 6.5
    for bad in (set([5, 3, 5]), {5: 0, 3: 0, 4: 0}, frozenset({2, 3})):
        with pytest.raises(ValueError, match="widths must be an ordered sequence"):
            truth.dln_learning_coefficient(bad)
        with pytest.raises(ValueError, match="widths must be an ordered sequence"):
            truth.DeepLinearNetwork(bad)
    with pytest.raises(ValueError, match="powers must be an ordered sequence"):
        truth.normal_crossing_learning_coefficient({1, 2})
    assert truth.dln_learning_coefficient(np.array([5, 3, 5])) == 6.5  # arrays and lists still read
    for make in (
        lambda dt: truth.DeepLinearNetwork((3, 2), dtype=dt),
        lambda dt: truth.NormalCrossing([1, 2], dtype=dt),
    ):
        for dt in (torch.int64, torch.bool, "float32"):
            with pytest.raises(ValueError, match="dtype must be a floating-point"):
                make(dt)
        assert (
            make(torch.float64).state_dict()[next(iter(make(torch.float64).state_dict()))].dtype
            == torch.float64
        )
