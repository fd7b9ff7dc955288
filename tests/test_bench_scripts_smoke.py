"""The benchmark scripts in bench/: the commands docs/benchmarks.md quotes exist with their flags and environment
variables, the summary table labels its ratios correctly, and scripts whose peer is not installed, or that are
called wrongly, stop with a message saying what is missing instead of a traceback. Nothing here times anything."""

from __future__ import annotations

import importlib.util
import re
import runpy
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def _load(name: str):
    """A bench file imported as a module of its own name prefixed (bench files import each other by name)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _installed(*names: str) -> bool:
    return all(importlib.util.find_spec(n) is not None for n in names)


def _exit_message(fn) -> str:
    with pytest.raises(SystemExit) as e:
        fn()
    return str(e.value.code)


# ----- the commands of docs/benchmarks.md --------------------------------------------------------------------
def _doc_commands() -> list[tuple[str, list[str], str]]:
    """(script, words after it, the whole command) for every ``bench/<name>.py`` in a code span or block."""
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    spans = re.findall(r"```(.*?)```", text, re.S)
    spans += re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    out = []
    for sp in spans:
        sp = " ".join(sp.replace("\\\n", " ").split())
        for m in re.finditer(r"bench/(\w+)\.py((?:\s+(?!bench/)\S+)*)", sp):
            out.append((m.group(1), m.group(2).split(), sp))
    return out


def test_docs_commands_name_existing_scripts_flags_and_tests():
    cmds = _doc_commands()
    assert len({c[0] for c in cmds}) >= 20, "the docs' commands were not found"
    stale = []
    for name, words, cmd in cmds:
        path = BENCH / f"{name}.py"
        if not path.exists():
            stale.append(f"no file bench/{name}.py: {cmd}")
            continue
        src = path.read_text()
        if "pytest" in cmd:  # flags after the file are pytest's; -k must select a test of the file
            for k in re.findall(r"-k\s+([\w*]+)", cmd):
                if not re.search(rf"def test_\w*{re.escape(k)}", src):
                    stale.append(f"-k {k} selects no test of bench/{name}.py: {cmd}")
            continue
        for w in words:
            if w.startswith("--") and f'"{w.split("=")[0]}"' not in src:
                stale.append(f"bench/{name}.py takes no {w}: {cmd}")
    assert not stale, "\n".join(stale)


def test_docs_environment_variables_are_read_by_the_benches():
    text = (ROOT / "docs" / "benchmarks.md").read_text() + (ROOT / "Makefile").read_text()
    sources = "".join(p.read_text() for p in BENCH.glob("*.py"))
    names = set(re.findall(r"PYPATTERN_BENCH_\w+", text))
    assert {"PYPATTERN_BENCH_THREADS", "PYPATTERN_BENCH_SCALE"} <= names
    assert not sorted(n for n in names if n not in sources)


def test_makefile_bench_targets_name_existing_files():
    mk = (ROOT / "Makefile").read_text()
    targets = re.findall(r"^bench(?:-peers)?:.*?(?=^\S|\Z)", mk, re.S | re.M)
    assert len(targets) == 2
    files = set(re.findall(r"bench/[\w/]+\.(?:py|sh)", "".join(targets)))
    assert files and all((ROOT / f).exists() for f in files), files


# ----- the summary table of bench/conftest.py ----------------------------------------------------------------
def _row(name, t, group, **info):
    return SimpleNamespace(name=name, group=group, stats=SimpleNamespace(min=t), extra_info=info)


def _summary(rows) -> list[str]:
    n = torch.get_num_threads()
    try:
        conftest = _load("conftest")  # pins torch's threads on import
    finally:
        torch.set_num_threads(n)
    lines: list[str] = []
    tr = SimpleNamespace(section=lambda s: lines.append(s), write_line=lambda s: lines.append(s))
    config = SimpleNamespace(_benchmarksession=SimpleNamespace(benchmarks=rows))
    conftest.pytest_terminal_summary(tr, 0, config)
    return lines


def test_summary_sets_a_batched_case_against_its_units_of_bound_and_peer():
    g = "point"
    lines = _summary(
        [
            _row("one", 0.010, g, role="ours"),
            _row("ten", 0.080, g, role="ours", bound_units=10),
            _row("bound", 0.008, g, role="bound", label="plain forward"),
            _row("peer", 0.050, g, role="peer", label="peer"),
        ]
    )
    one = next(ln for ln in lines if ln.strip().startswith("one "))
    ten = next(ln for ln in lines if ln.strip().startswith("ten "))
    # one point: 8 / 10 ms of bound, peer 50 / 10 ms; ten points: 10 x 8 / 80 ms and 10 x 50 / 80 ms
    assert "80.0% of bound (plain forward)" in one and "5.00x vs peer" in one
    assert "100.0% of bound (plain forward x 10)" in ten and "6.25x vs peer x 10" in ten


def test_summary_sets_ours_against_bounds_of_its_own_dtype_only():
    g = "cka"
    lines = _summary(
        [
            _row("ours32", 0.010, g, role="ours", dtype="f32"),
            _row("ours64", 0.020, g, role="ours", dtype="f64"),
            _row("ours", 0.030, g, role="ours"),
            _row("b32", 0.005, g, role="bound", dtype="f32", label="b32"),
            _row("b64", 0.015, g, role="bound", dtype="f64", label="b64"),
        ]
    )
    line = {ln.split()[0]: ln for ln in lines if ln.startswith("  ")}
    assert "50.0% of bound (b32)" in line["ours32"] and "b64" not in line["ours32"]
    assert "75.0% of bound (b64)" in line["ours64"] and "b32" not in line["ours64"]
    assert "16.7% of bound (b32)" in line["ours"] and "50.0% of bound (b64)" in line["ours"]


# ----- labels of the benchmarks ------------------------------------------------------------------------------
class _FakeBenchmark:
    def __init__(self):
        self.group, self.extra_info, self.calls = None, {}, 0

    def __call__(self, fn, *args):
        self.calls += 1
        return fn(*args)


def test_activation_benchmarks_say_role_group_and_bytes():
    act = _load("bench_activations")
    x, gr = act._inputs((4, 8), 5.0)
    names = act.test_gelu.pytestmark[0].args[1]
    seen = {}
    for name in names:
        b = _FakeBenchmark()
        try:
            act.test_gelu(b, (x, gr), name)
        except pytest.skip.Exception:
            assert name.startswith("HF") and not _installed("transformers")
            continue
        assert b.calls == 1
        kind = "fwd" if "fwd" in name else "bwd"
        assert kind in b.group and str(x.numel()) in b.group
        assert b.extra_info["bytes"] == (8 if kind == "fwd" else 12) * x.numel()
        seen[(kind, b.extra_info["role"])] = name
    for kind in ("fwd", "bwd"):  # each direction has ours, torch's kernel and the copy bound
        assert {(kind, r) for r in ("ours", "reference", "bound")} <= set(seen)


# ----- peers not installed, wrong calls ----------------------------------------------------------------------
@pytest.mark.skipif(_installed("auto_circuit", "transformer_lens"), reason="auto-circuit is installed here")
def test_autocircuit_comparison_without_the_peer_says_how_to_get_it():
    msg = _exit_message(_load("compat_autocircuit_gqa").main)
    assert "auto-circuit" in msg and "bench/envs/autocircuit.sh" in msg


@pytest.mark.skipif(_installed("devinterp", "datasets"), reason="devinterp and datasets are installed here")
def test_devinterp_comparison_without_the_peer_says_how_to_get_it(monkeypatch):
    mod = _load("compat_devinterp")
    monkeypatch.setattr(sys, "argv", ["compat_devinterp.py"])
    msg = _exit_message(mod.main)
    assert "not importable here" in msg and "bench/envs/devinterp.sh" in msg


@pytest.mark.skipif(_installed("devinterp", "datasets"), reason="devinterp and datasets are installed here")
def test_refined_llc_devinterp_mode_without_the_peer_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bench_refined_llc.py", "--devinterp"])
    msg = _exit_message(lambda: runpy.run_path(str(BENCH / "bench_refined_llc.py"), run_name="__main__"))
    assert "--devinterp" in msg and "bench/envs/devinterp.sh" in msg


@pytest.mark.parametrize("argv", [[], ["0"], ["two"], ["1", "2"]])
def test_atp_memory_without_a_valid_max_batch_prints_its_usage(monkeypatch, argv):
    mod = _load("atp_memory")
    monkeypatch.setattr(sys, "argv", ["atp_memory.py", *argv])
    assert "MAX_BATCH" in _exit_message(mod.main)


@pytest.mark.parametrize(
    "script,argv,words",
    [
        ("bench_circuits", [], ["--table", "--overhead", "--gpt2"]),
        ("bench_circuits", ["--table", "--shape", "gpt3"], ["--shape", "gpt3"]),
        ("bench_circuits", ["--tabel"], ["--tabel"]),
        ("ab_circuits", ["--trees", ".", "--pieces", "eap,points"], ["--pieces", "points"]),
        ("ab_patching", [".", "--grids", "resid_pre,z"], ["--grids", "'z'"]),
        ("ab_patching", ["/nonexistent-tree"], ["pypattern/ package"]),
        ("ab_chain_runner", ["--trees", "/nonexistent-tree"], ["--trees", "pypattern/ package"]),
        ("ab_chain_runner", ["--workloads", "auto,fast"], ["--workloads", "'fast'"]),
        ("ab_chain_runner", ["--rounds", "0"], ["--rounds"]),
        ("bench_batched_chains", ["--models", "mlp22k,gpt2"], ["--models", "'gpt2'"]),
        ("bench_batched_chains", ["--chains", "4,1"], ["--chains"]),
        ("bench_batched_chains", ["--steps", "10"], ["--steps"]),
    ],
)
def test_scripts_refuse_unknown_options_by_name(monkeypatch, capsys, script, argv, words):
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])
    n = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit) as e:
            runpy.run_path(str(BENCH / f"{script}.py"), run_name="__main__")
    finally:
        torch.set_num_threads(n)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err


def test_patching_scale_bench_refuses_an_unknown_grid_before_building_models(monkeypatch):
    bp = _load("bench_patching")
    monkeypatch.setenv("PYPATTERN_BENCH_GRIDS", "resid_pre,z")
    monkeypatch.setattr(
        bp, "_scale_models", lambda: pytest.fail("built the models before checking the grids")
    )
    with pytest.raises(pytest.UsageError, match=r"PYPATTERN_BENCH_GRIDS='resid_pre,z': unknown \['z'\]"):
        bp.test_scale_gpt2_small_cpu_time(None)
