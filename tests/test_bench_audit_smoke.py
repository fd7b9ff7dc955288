"""The benchmark scripts of bench/ run their smallest case here, untimed: each checks that the forms it times agree
before timing them, prints the CPU model and thread count, and computes the bound of its work from the right
count. The multiply-adds are checked against torch's own count of the products a plain form performs
(``torch.utils.flop_counter``, two flops per multiply-add) or a naive loop; bytes against the tensors' sizes.
Nothing here asserts a speed."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def _load(name: str):
    """A bench file imported as a module of its own (bench files import each other by name)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"_bench_audit_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _madds(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops() // 2


def _run_main(mod, monkeypatch, argv):
    """``mod.main()`` with ``argv``, the rounds replaced by a recorder: (forms, macs, bytes, GEMM rate) of each
    call."""
    calls = []

    def record(forms, rounds, macs, nbytes, gemm_rate, *args, **kwargs):
        calls.append((forms, macs, nbytes, gemm_rate))

    monkeypatch.setattr(sys, "argv", ["bench.py", *argv])
    monkeypatch.setattr(mod, "interleaved", record)
    mod.main()
    return calls


# ----- bench/_rounds.py ----------------------------------------------------------------------------------------
def test_rounds_print_the_machine_and_ranges_over_interleaved_rounds(capsys):
    rounds = _load("_rounds")
    order = []
    forms = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    rounds.interleaved(forms, 3, macs=1e6, nbytes=1e6, gemm_rate=lambda: 1e9, copy_rate=lambda: 1e9)
    out = capsys.readouterr().out
    assert order == ["a", "b"] + ["a", "b", "b", "a", "a", "b"]  # a warm-up call each, then flipping order
    assert f"CPU {rounds.cpu_model()}, {torch.get_num_threads()} torch thread(s)" in out
    with open("/proc/cpuinfo") as f:
        names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
    assert rounds.cpu_model() == (names[0] if names else "unknown")
    assert out.count("round ") == 3 and "a: " in out and "x (" in out
    # the bound of a round is the larger of the multiply-adds at the GEMM rate and the bytes at the copy rate
    assert "bound 1.0 ms" in out


@pytest.mark.parametrize("err", [2e-4, float("nan")])
def test_rounds_stop_on_a_disagreeing_form(err):
    rounds = _load("_rounds")
    rounds.check_agree("form", 1e-6, 1e-4)
    with pytest.raises(SystemExit, match="form disagrees with the reference"):
        rounds.check_agree("form", err, 1e-4)


def test_summary_header_names_the_cpu():
    conftest = _load("conftest")
    assert conftest.cpu_model() in conftest.pytest_report_header(None)


# ----- interleaved kernel benches ------------------------------------------------------------------------------
def test_row_dots_counts_its_multiply_adds_and_bytes(monkeypatch, capsys):
    mod = _load("bench_row_dots")
    ((forms, macs, nbytes, gemm_rate),) = _run_main(mod, monkeypatch, ["--layers", "2"])
    # the GEMM rate of the bound is the faster of torch's matmul and oneDNN's, as the other kernel benches'
    assert gemm_rate.__name__ == "_cpu_gemm_rate" and gemm_rate.__module__ == "bench_patching"
    out = capsys.readouterr().out
    assert out.count("against float64") == len(forms) == 4
    assert _madds(forms["bmm per input kind"]) == macs
    B, T, d, H = 8, 32, 768, 12
    n = [1, 1 + (H + 1)]  # sources upstream of layers 0 and 1
    assert nbytes == 4 * B * T * d * (sum(n) + 2 * 3 * H)


def test_prefix_attention_counts_the_causal_pairs(monkeypatch, capsys):
    ((forms, macs, nbytes, _),) = _run_main(
        _load("bench_prefix_attention"), monkeypatch, ["--layers", "1", "--cells", "2"]
    )
    assert capsys.readouterr().out.count("against float64") == 3
    B, T, H, dh, C = 8, 32, 12, 64, 2
    pairs = sum(1 for p in range(T) for i in range(p, T) for j in range(T) if j <= i)
    assert macs == C * B * H * 2 * dh * pairs
    # the torch form scores every key of each cell (masked ones too): the causal count is that less the masked
    masked = sum(1 for p in range(T) for i in range(p, T) for j in range(T) if j > i)
    assert _madds(forms["torch (head-major bmm)"]) == macs + C * B * H * 2 * dh * masked
    own = sum(C * B * (T - p) * H * dh for p in range(T))  # queries, own keys, own values, output
    assert nbytes == 4 * (4 * own + sum(2 * B * p * H * dh for p in range(T)))


def test_unembed_checks_every_form_and_counts_its_bound(monkeypatch):
    mod = _load("bench_unembed")
    calls = _run_main(mod, monkeypatch, ["--rows", "3,5", "--vocab", "1000", "--d-model", "64"])
    assert [len(c[0]) for c in calls] == [4 if mod._ops_present() else 3] * 2
    for rows, (forms, macs, nbytes, _) in zip((3, 5), calls):
        assert _madds(forms["h @ W_U"]) == macs == rows * 64 * 1000
        assert nbytes == 4 * (64 * 1000 + rows * 64 + rows * 1000)
    wrong = {"h @ W_U": lambda: torch.zeros(3, 1000)}
    monkeypatch.setattr(mod, "unembed_product", lambda h, W: wrong["h @ W_U"]())
    with pytest.raises(SystemExit, match="unembed_product disagrees"):
        _run_main(mod, monkeypatch, ["--rows", "3", "--vocab", "1000", "--d-model", "64"])


def test_signed_sums_forms_agree_bit_for_bit(monkeypatch, capsys):
    mod = _load("bench_signed_sums")
    monkeypatch.setattr(sys, "argv", ["bench_signed_sums.py", "--shape", "bench", "--rounds", "1"])
    mod.main()
    out = capsys.readouterr().out
    assert out.count("bit for bit: True") == 4
    assert "CPU " in out and "torch thread(s)" in out and "x of the bound" in out


# ----- the activation bench ------------------------------------------------------------------------------------
def test_activation_variants_are_checked_against_the_formula():
    act = _load("bench_activations")
    x, gr = act._inputs((3, 50), 5.0)
    v = act.variants(x, gr)
    assert act.check_variants(x, gr, v) < 1e-5
    v["torch bwd"] = lambda: torch.ops.aten.gelu_backward(gr, x, approximate="none")  # another function
    with pytest.raises(AssertionError, match="torch bwd differs"):
        act.check_variants(x, gr, v)


def test_activation_table_names_the_cpu(monkeypatch):
    act = _load("bench_activations")
    monkeypatch.setattr(act, "SIZES", {"small": (1_000_000,)})
    lines = act.table(rounds=1)
    assert lines[0].startswith(f"CPU {act.cpu_model()}")
    assert sum("max abs error" in ln for ln in lines) == len(act.SCALES)


# ----- the bounds of the pytest-benchmark suites ---------------------------------------------------------------
def test_covariance_bound_is_one_gemm_of_the_co_moment():
    cov = _load("bench_covariance")
    at = torch.empty(cov.K, cov.DRAWS, device="meta")
    bc = torch.empty(cov.DRAWS, cov.N, device="meta")
    assert _madds(lambda: torch.mm(at, bc)) == cov.MADDS


def test_grad_gram_bound_is_two_grams_and_the_product():
    gg = _load("bench_grad_gram")
    a = torch.empty(gg.BATCH, gg.D_IN, device="meta")
    d = torch.empty(gg.BATCH, gg.D_OUT, device="meta")
    grams = _madds(lambda: (a @ a.T, d @ d.T))
    assert gg.MADDS == grams + gg.BATCH * gg.BATCH  # the bias column of A: one multiply-add per pair


def test_cka_feature_bound_counts_the_48_products():
    eq = _load("bench_equivalence")
    xs = [torch.empty(eq.N, eq.D, device="meta") for _ in range(eq.LAYERS)]
    ys = [torch.empty(eq.N, eq.D, device="meta") for _ in range(eq.LAYERS)]
    assert _madds(lambda: eq._feature_bound(xs, ys)) == eq.FEAT_MADDS


def test_patching_full_forward_count_matches_the_model():
    bp = _load("bench_patching")
    from pypattern.models import Transformer, TransformerConfig

    c = dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=50)
    model = Transformer(TransformerConfig(**c, n_ctx=16, seed=0))
    T = 7
    done = _madds(lambda: model(torch.randint(0, 50, (1, T))))
    # the model scores every (query, key) pair; the count keeps the causal ones
    masked = c["n_layers"] * 2 * c["n_heads"] * c["d_head"] * (T * T - T * (T + 1) // 2)
    assert bp.macs_full_forward(c, T) == done - masked


# ----- the pytest-benchmark suites, untimed --------------------------------------------------------------------
SUITES = {  # a bench file of pytest-benchmark cases: the cases run here
    "bench_invert": "test_ours and 500 and alpha0",
    "bench_sgld": "same_update or agrees",
    "bench_samplers": "same_update",
    "bench_grad_gram": "core",
}


def test_benchmark_suites_run_untimed():
    """``--benchmark-disable`` runs each case once without timing it: the agreement checks still run and no case
    reads timing statistics that were not taken."""
    select = " or ".join(f"({k})" for k in SUITES.values())
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", "--benchmark-disable",
         "-k", select, *(f"bench/{f}.py" for f in SUITES)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    passed = [ln for ln in r.stdout.splitlines() if ln.startswith("PASSED")]
    assert {f for f in SUITES if any(f"bench/{f}.py::" in ln for ln in passed)} == set(SUITES), r.stdout


def test_llc_bound_counts_a_forward_and_backward_of_the_mlp():
    llc = _load("bench_llc")
    mlp = torch.nn.Sequential(
        torch.nn.Linear(128, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 10),
    )
    x = torch.randn(
        llc.MLP["batch_size"], 128, requires_grad=True
    )  # the input's gradient too: two per weight
    done = _madds(lambda: mlp(x).sum().backward())
    assert llc.MLP_STEP_MADDS == done
