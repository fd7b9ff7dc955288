"""All-pairs linear CKA: pypattern's ``cka_matrix`` against the peer pytorch-cka on the same work, in the same run.

Run in the bench venv that has the peer (created by ``bash bench/envs/cka.sh``)::

    .bench-venvs/cka/bin/python -m pytest -q bench/bench_equivalence.py -s --benchmark-columns=min,median,rounds

Without pytorch-cka (e.g. in .venv) the peer case skips and the rest still runs.

Work
----
Two "models" x 6 layers, each layer a float32 representation of the same n = 2048 inputs with d = 256 features
(model A: a ReLU chain of random mixes; model B: layer l is a random rotation of A's layer l plus noise and a bit of
A's layer l - 1), so one 6 x 6 CKA matrix. Cases, each at 1 and at 2 torch threads:

(a) ours ``cka_matrix(method="gram")``, (b) ``method="features"`` (and with ``dtype=torch.float32`` products),
(c) ``method="auto"`` (it picks "features" at this shape),
(d) a textbook reference written in this file: ``K = X X^T``, an explicit centring matrix ``H`` and
``tr(K H L H) / (n - 1)^2`` (biased), in float32, ``K H`` formed once per representation, (e) the peer's
``cka.cka_from_features`` (pre-extracted features). The peer computes the *debiased* CKA (the unbiased HSIC of
Song et al. 2012, in the inputs' dtype, float32 in this benchmark, from uncentred Grams, then clamps CKA to [0, 1]), so (a)-(c)
run with ``debiased=True`` to compare like with like. Checked: given float64 inputs the peer agrees with ours to
1e-10 (the same estimator); on the float32 inputs it agrees to 5e-4 (measured about 1.5e-4: float32 rounding of
uncentred Grams of non-negative features); the reference agrees with ours biased to 1e-4; ours gram and features
agree to 1e-9.

Bound
-----
The multiply-adds that must be done (n = 2048, d = 256, A = B = 6):

* Gram form: 12 Grams of ``n^2 d`` (12.9 G; 6.4 G if only the symmetric half were formed) plus the 36 pair
  products, ``36 n^2`` (0.15 G).
* Feature form: ``36 n d^2`` cross terms (4.8 G) plus ``12 n d^2`` self terms (1.6 G): 6.4 G.
* The textbook reference: 12 Grams of ``n^2 d`` and 12 products ``K H`` of ``n^3`` (116 G), plus 48 traces of
  ``n^2``.

The machine's matrix-multiply rate is measured in this run, per thread count, by timing ``torch.mm`` of the two
shapes that occur ((2048 x 256)(256 x 2048) and (256 x 2048)(2048 x 256)) in float64 (ours computes in float64)
and in float32 (the peer's and the reference's dtype). Each case's bound is its own multiply-adds at the rate of its
own dtype and shape; the work's bound is the cheapest form (6.4 G) at the float32 rate. Both are printed, with the
case's time as a percentage of them. Two "bound" benchmarks (the 48 feature-form products alone, float64 and
float32) also feed the bound table that bench/conftest.py prints at the end of the run. The 2-thread figures are only
worth reading on an otherwise idle CPU: with another busy process on a 2-core CPU they swing by several times
between rounds.
"""

from __future__ import annotations

import math
import os
import time

import pytest
import torch

from pypattern.equivalence import cka_matrix

try:
    from importlib.metadata import version as _version

    import cka as peer

    PEER = f"pytorch-cka {_version('pytorch-cka')}"
except ImportError:  # pragma: no cover - the main venv has no pytorch-cka
    peer = None
    PEER = None

needs_peer = pytest.mark.skipif(
    peer is None, reason="pytorch-cka (import cka) is not importable in this environment"
)

N, D, LAYERS = 2048, 256, 6
THREADS = sorted({1, min(2, os.cpu_count() or 1)})
RESULTS: dict[str, dict] = {}
# (threads, dtype, shape) -> multiply-adds per second, the best seen this run
BEST_RATES: dict[tuple, float] = {}

# multiply-adds of each form (see the module docstring)
GRAM_MADDS = 2 * LAYERS * N * N * D + LAYERS * LAYERS * N * N
GRAM_SYM_MADDS = LAYERS * N * N * D + LAYERS * LAYERS * N * N
FEAT_MADDS = LAYERS * LAYERS * N * D * D + 2 * LAYERS * N * D * D
REF_MADDS = 2 * LAYERS * (N * N * D + N**3) + (LAYERS * LAYERS + 2 * LAYERS) * N * N


# ---------------------------------------------------------------------------------------------------------------
# the work
# ---------------------------------------------------------------------------------------------------------------
def make_reps(seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    a, b = [], []
    h = torch.randn(N, D, generator=g)
    prev = h
    for _ in range(LAYERS):
        w = torch.randn(D, D, generator=g) / math.sqrt(D)
        h = torch.relu(h @ w + 0.3 * torch.randn(N, D, generator=g))
        q, _ = torch.linalg.qr(torch.randn(D, D, generator=g))
        a.append(h.contiguous())
        b.append((0.8 * h @ q + 0.3 * prev + 0.5 * torch.randn(N, D, generator=g)).contiguous())
        prev = h
    return a, b


@pytest.fixture(scope="module")
def reps():
    return make_reps()


@pytest.fixture(scope="module")
def truth(reps):
    """Ours in float64, both estimators, both forms: what every case is checked against."""
    a, b = reps
    out = {}
    for deb in (True, False):
        g = cka_matrix(a, b, debiased=deb, method="gram")
        f = cka_matrix(a, b, debiased=deb, method="features")
        assert torch.allclose(g, f, atol=1e-9, rtol=0), (deb, (g - f).abs().max())
        out[deb] = f
    RESULTS["data"] = dict(
        cka_debiased_diag=[round(float(v), 4) for v in out[True].diagonal()],
        cka_biased_diag=[round(float(v), 4) for v in out[False].diagonal()],
    )
    return out


def _rate(dt: torch.dtype, shape: str, reps: int = 7) -> float:
    """Multiply-adds per second of one ``torch.mm`` of the given shape at the current thread count (best of reps)."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, D, generator=g).to(dt), torch.randn(N, D, generator=g).to(dt)
    fn, madds = ((lambda: x @ y.T), N * N * D) if shape == "gram" else ((lambda: x.T @ y), N * D * D)
    fn()
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return madds / best


@pytest.fixture(scope="module")
def rates():
    """Matrix-multiply rate per thread count, dtype and shape, measured now; each case measures again just before
    it runs and keeps the better figure (other processes share these cores)."""
    out = BEST_RATES
    before = torch.get_num_threads()
    for t in THREADS:
        torch.set_num_threads(t)
        for dt in (torch.float64, torch.float32):
            for shape in ("gram", "features"):
                out[t, dt, shape] = _rate(dt, shape)
    torch.set_num_threads(before)
    yield out
    RESULTS["matmul rate GMAC/s (best seen)"] = {
        f"{t}thr {str(dt)[6:]} {s}": v / 1e9 for (t, dt, s), v in sorted(out.items(), key=str)
    }


# ---------------------------------------------------------------------------------------------------------------
# the cases
# ---------------------------------------------------------------------------------------------------------------
def reference_cka(xs, ys) -> torch.Tensor:
    """Biased linear CKA the textbook way (Kornblith et al. 2019, eq. 3): ``K = X X^T``, an explicit centring matrix
    ``H = I - 11^T / n``, ``HSIC = tr(K H L H) / (n - 1)^2``. ``K H`` is one dense ``n^3`` product per
    representation, kept for all its pairs; each HSIC is then ``sum((K H) * (L H)^T)``. (Forming ``K H`` and
    ``L H`` again for every pair, 96 ``n^3`` products, would take about 40 s a round at this shape on a 2-core Xeon.)"""
    n = xs[0].shape[0]
    h = torch.eye(n, dtype=xs[0].dtype) - torch.full((n, n), 1.0 / n, dtype=xs[0].dtype)
    kh = [(x @ x.T) @ h for x in xs]
    lh = [(y @ y.T) @ h for y in ys]

    def hsic(a, b):
        return (a * b.T).sum() / (n - 1) ** 2

    sx = [hsic(k, k) for k in kh]
    sy = [hsic(m, m) for m in lh]
    return torch.stack(
        [
            torch.stack([hsic(k, m) / (sx[i] * sy[j]).sqrt() for j, m in enumerate(lh)])
            for i, k in enumerate(kh)
        ]
    )


def _peer(xs, ys) -> torch.Tensor:
    return peer.cka_from_features(xs, ys)


def _feature_bound(xs, ys) -> torch.Tensor:
    """Nothing but the feature form's 48 products X^T Y (no centring, no norms): the floor of the cheapest form."""
    acc = xs[0].new_zeros(())
    for x in xs:
        for y in ys:
            acc += (x.T @ y).square().sum()
    for z in list(xs) + list(ys):
        acc += (z.T @ z).square().sum()
    return acc


CASES = {
    # name: (fn, role, dtype, madds, rate shape, rounds)
    "ours gram": (
        lambda a, b: cka_matrix(a, b, debiased=True, method="gram"),
        "ours",
        "f64",
        GRAM_MADDS,
        "gram",
        3,
    ),
    "ours features": (
        lambda a, b: cka_matrix(a, b, debiased=True, method="features"),
        "ours",
        "f64",
        FEAT_MADDS,
        "features",
        5,
    ),
    "ours auto": (
        lambda a, b: cka_matrix(a, b, debiased=True, method="auto"),
        "ours",
        "f64",
        FEAT_MADDS,
        "features",
        5,
    ),
    "ours features f32": (
        lambda a, b: cka_matrix(a, b, debiased=True, method="features", dtype=torch.float32),
        "ours",
        "f32",
        FEAT_MADDS,
        "features",
        5,
    ),
    "reference textbook (biased, f32)": (reference_cka, "reference", "f32", REF_MADDS, "gram", 1),
    "peer cka_from_features": (_peer, "peer", "f32", GRAM_MADDS, "gram", 5),
    "bound f64 (48 X^T Y only)": (_feature_bound, "bound", "f64", FEAT_MADDS, "features", 5),
    "bound f32 (48 X^T Y only)": (_feature_bound, "bound", "f32", FEAT_MADDS, "features", 5),
}


def _check(case, role, dt, out, a, b, fn, truth) -> dict:
    """Each case against ours in float64 (before any figure is kept): its largest differences, by name."""
    row: dict = {}
    if role == "reference":
        err = float((out.double() - truth[False]).abs().max())
        row["max_abs_diff_vs_ours_biased"] = err
        assert err < 1e-4, (case, row)
    elif role == "peer":
        # same estimator: in float64 the peer matches ours to rounding; in float32, from uncentred Grams of these
        # non-negative (post-ReLU) features, it is off by about 1.5e-4 (1.5e-6 if the inputs are centred first)
        err = float((out.double() - truth[True]).abs().max())
        err64 = float((fn([x.double() for x in a], [y.double() for y in b]) - truth[True]).abs().max())
        row.update(max_abs_diff_vs_ours_debiased=err, max_abs_diff_float64_inputs=err64)
        assert err64 < 1e-10 and err < 5e-4, (case, row)
    elif role == "ours":
        err = float((out - truth[True]).abs().max())
        row["max_abs_diff_vs_ours_features"] = err
        assert out.dtype == torch.float64 and err < (1e-9 if dt == "f64" else 1e-4), (case, row)
    return row


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=needs_peer) if c.startswith("peer") else c for c in CASES]
)
def test_cka_6x6(benchmark, reps, truth, rates, case, threads):
    fn, role, dt, madds, shape, rounds = CASES[case]
    a, b = reps
    if case.startswith("bound f64"):
        a, b = [x.double() for x in a], [y.double() for y in b]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch_dt = torch.float64 if dt == "f64" else torch.float32
    try:
        for key in ((threads, torch_dt, shape), (threads, torch.float32, "features")):
            rates[key] = max(rates[key], _rate(key[1], key[2]))
        benchmark.group = f"cka 6x6, n={N}, d={D}, {threads} thread(s)"
        out = benchmark.pedantic(lambda: fn(a, b), rounds=rounds, iterations=1, warmup_rounds=int(rounds > 1))
    finally:
        torch.set_num_threads(before)
    diffs = _check(case, role, dt, out, a, b, fn, truth)
    if benchmark.stats is None:  # --benchmark-disable: one untimed call, checked above
        return
    t = benchmark.stats.stats.min
    own = madds / rates[threads, torch_dt, shape]
    work = FEAT_MADDS / rates[threads, torch.float32, "features"]
    row = dict(
        _bound=(threads, torch_dt, shape, madds),
        threads=threads,
        ms=t * 1e3,
        median_ms=benchmark.stats.stats.median * 1e3,
        gmadds=madds / 1e9,
        own_bound_ms=own * 1e3,
        pct_of_own_bound=100 * own / t,
        pct_of_work_bound_f32=100 * work / t,
    )
    row.update(diffs)
    RESULTS[f"{case}, {threads} thr"] = row
    benchmark.extra_info.update(
        role=role, madds=madds, label=case, dtype=dt, **{k: v for k, v in row.items() if k[0] != "_"}
    )


# ---------------------------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield
    if not RESULTS:
        return
    lines = [
        "",
        f"CKA 6x6 benchmark ({PEER or 'peer not installed'}; torch {torch.__version__}; n={N}, d={D})",
        f"  multiply-adds: gram {GRAM_MADDS / 1e9:.2f} G (symmetric half {GRAM_SYM_MADDS / 1e9:.2f} G), "
        f"features {FEAT_MADDS / 1e9:.2f} G, textbook reference {REF_MADDS / 1e9:.0f} G",
    ]
    for k in ("data", "matmul rate GMAC/s (best seen)"):
        if k in RESULTS:
            lines.append(
                f"  {k}: "
                + ", ".join(
                    f"{a}={b:.3g}" if isinstance(b, float) else f"{a}={b}" for a, b in RESULTS[k].items()
                )
            )
    lines.append(
        f"  {'case':<34} {'thr':>3} {'min ms':>10} {'median ms':>10} {'own bound ms':>12} {'% own':>6} {'% work':>7}"
    )
    for k, v in RESULTS.items():
        if "ms" not in v:
            continue
        name = k.rsplit(",", 1)[0]
        # the bounds at the best rates seen in the whole run
        thr, tdt, shape, madds = v["_bound"]
        v["own_bound_ms"] = madds / BEST_RATES[thr, tdt, shape] * 1e3
        v["pct_of_own_bound"] = v["own_bound_ms"] / v["ms"] * 100
        v["pct_of_work_bound_f32"] = FEAT_MADDS / BEST_RATES[thr, torch.float32, "features"] * 1e5 / v["ms"]
        extra = "  ".join(f"{a}={b:.1e}" for a, b in v.items() if a.startswith("max_abs"))
        lines.append(
            f"  {name:<34} {v['threads']:>3} {v['ms']:>10.1f} {v['median_ms']:>10.1f} {v['own_bound_ms']:>12.1f} "
            f"{v['pct_of_own_bound']:>6.1f} {v['pct_of_work_bound_f32']:>7.2f}  {extra}"
        )
    print("\n".join(lines))
