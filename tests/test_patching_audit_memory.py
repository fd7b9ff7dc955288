"""The memory settings of exact and attribution patching: a budget below one unit of work (one cell of the exact
engine, one prompt of AtP) is told in a RuntimeWarning naming ``max_memory``, the bytes the unit needs and the
budget; the results carry the estimate and the batch it chose; and the estimates bound the memory the calls take.

Memory is measured op by op, not by the process's resident set (which other allocations and the process's
one-off work move): a ``TorchDispatchMode`` adds the bytes of every storage an operation makes (one not among its
inputs' storages, so views and in-place results are not counted) and subtracts them when the storage is freed,
keeping the peak of the live sum. One test checks the same bound on the resident set's peak (``VmHWM``) in a
fresh process, where glibc returns freed blocks at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import pypattern as pp
from pypattern.patching import engine as E
from pypattern.patching.attribution import atp_prompt_bytes, shortlist_and_confirm

V = 500


class LiveBytes(TorchDispatchMode):
    """The live and peak bytes of the tensors made under it."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict = {}
        self.cur = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for k in [k for k, (ref, _) in self.live.items() if ref() is None]:
            self.cur -= self.live.pop(k)[1]
        ins = {
            a.untyped_storage().data_ptr()
            for a in tree_leaves((args, kwargs))
            if isinstance(a, torch.Tensor) and a.layout == torch.strided
        }
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            if t.layout != torch.strided:
                key, ref, n = ("opaque", id(t)), weakref.ref(t), t.numel() * t.element_size()
            else:
                st = t.untyped_storage()
                key, ref, n = st.data_ptr(), weakref.ref(st), st.nbytes()
                if key == 0 or key in ins:
                    continue
            if key not in self.live:
                self.live[key] = (ref, n)
                self.cur += n
        self.peak = max(self.peak, self.cur)
        return out


def _model(**kw):
    cfg = dict(n_layers=3, d_model=64, n_heads=4, d_mlp=256, d_vocab=V, n_ctx=32, seed=0)
    return pp.Transformer(pp.TransformerConfig(**{**cfg, **kw}))


def _prompts(B: int, T: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    clean, corr = torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)
    ld = pp.LogitDiff(torch.randint(0, V, (B,), generator=g), torch.randint(0, V, (B,), generator=g))
    return clean, corr, ld


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _budget_warnings(rec) -> list:
    return [w for w in rec if issubclass(w.category, RuntimeWarning) and "max_memory=" in str(w.message)]


def test_exact_patching_warns_when_one_cell_does_not_fit_and_names_the_bytes():
    m = _model()
    clean, corr, ld = _prompts(4, 8)
    kw = dict(metric=ld, per_position=True, quiet=True)
    ref = pp.activation_patching(m, "z", clean, corr, max_memory=None, max_batch=1, **kw)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        got = pp.activation_patching(m, "z", clean, corr, max_memory=1000, **kw)
    told = _budget_warnings(rec)
    assert len(told) == 1, [str(w.message) for w in rec]
    msg = str(told[0].message)
    need = E.engine_bytes(m.cfg, 4, 8, 1, "z")
    assert "max_memory=1000 bytes" in msg and "one cell" in msg
    got_need = int(msg.split("an estimated ")[1].split(" bytes")[0])
    assert need <= got_need < need + 2 * 2**20  # the cell's working memory and its logits rows
    assert told[0].filename == __file__  # points at the caller
    assert got.info["max_batch"] == 1
    torch.testing.assert_close(got.values, ref.values, rtol=1e-5, atol=1e-6)
    # a budget that holds a cell is not warned about, and the batch chosen fits it
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        ok = pp.activation_patching(m, "z", clean, corr, max_memory=got_need * 4, **kw)
    assert not _budget_warnings(rec)
    assert ok.info["max_batch"] > 1
    assert ok.info["memory_estimate"] <= got_need * 4


def test_engine_used_directly_warns_and_flags_the_budget():
    from pypattern.patching.api import engine_on_runs, prepare_runs

    m = _model()
    clean, corr, ld = _prompts(3, 6)
    runs = prepare_runs(m, ["blocks.0.attn.hook_z"], clean, corr, ld, None, "denoising", True)
    with pytest.warns(RuntimeWarning, match=r"max_memory=10 bytes .* one cell of the exact engine"):
        eng = engine_on_runs(m, runs, "z", ld, None, max_memory=10)
    assert eng.budget_too_small and eng.max_batch == 1
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        eng = engine_on_runs(m, runs, "z", ld, None, max_memory=2**30)
    assert not _budget_warnings(rec) and not eng.budget_too_small


def test_shortlist_and_confirm_warns_for_its_exact_stage():
    m = _model()
    clean, corr, ld = _prompts(3, 6)
    with pytest.warns(RuntimeWarning, match=r"max_memory=2000 bytes .* one cell of the exact engine"):
        shortlist_and_confirm(m, "z", clean, corr, metric=ld, k=3, max_memory=2000)


@pytest.mark.parametrize("atp_star", [False, True])
def test_attribution_patching_warns_when_one_prompt_does_not_fit(atp_star):
    m = _model()
    clean, corr, ld = _prompts(4, 8)
    kw = dict(metric=ld, sites=["z", "resid_pre"], qk_fix=atp_star, grad_drop=atp_star)
    ref = pp.attribution_patching(m, clean, corr, **kw)
    per = atp_prompt_bytes(m, 8, ld, atp_star, ["z", "resid_pre"], atp_star)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        got = pp.attribution_patching(m, clean, corr, max_memory=per // 2, **kw)
    told = _budget_warnings(rec)
    assert len(told) == 1, [str(w.message) for w in rec]
    assert f"max_memory={per // 2} bytes" in str(told[0].message)
    assert f"an estimated {per} bytes" in str(told[0].message)
    assert "one prompt of attribution patching" in str(told[0].message)
    assert told[0].filename == __file__
    for site in ref:
        assert got[site].info["max_batch"] == 1
        assert got[site].info["memory_estimate"] == per
        torch.testing.assert_close(got[site].values, ref[site].values, rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        two = pp.attribution_patching(m, clean, corr, max_memory=2 * per, **kw)
    assert not _budget_warnings(rec)
    assert two["z"].info["max_batch"] == 2 and two["z"].info["memory_estimate"] == 2 * per


def test_results_carry_the_estimate_and_keep_it_through_save_and_load(tmp_path):
    m = _model()
    clean, corr, ld = _prompts(4, 8)
    res = pp.activation_patching(m, "resid_pre", clean, corr, metric=ld, quiet=True, max_batch=3)
    assert res.info["max_batch"] == 3
    assert res.info["memory_estimate"] >= E.engine_bytes(m.cfg, 4, 8, 3, "resid_pre")
    atp = pp.attribution_patching(m, clean, corr, metric=ld, sites=["z"])["z"]
    assert atp.info["max_batch"] == 4  # one part: every prompt
    assert atp.info["memory_estimate"] == 4 * atp_prompt_bytes(m, 8, ld, False, ["z"], False)
    for r in (res, atp):
        r.save(tmp_path / "r.npz")
        back = type(r).load(tmp_path / "r.npz")
        assert back.info["memory_estimate"] == r.info["memory_estimate"]


def _exact_peak(m, site, B, T, max_batch, per_position):
    """The peak of the tensors the engine makes over a grid's calls (after a first call, which makes the
    process's one-off layouts), and the grid's reported estimate."""
    clean, corr, ld = _prompts(B, T)
    kw = dict(metric=ld, per_position=per_position, quiet=True, max_memory=None, max_batch=max_batch)
    pp.activation_patching(m, site, clean, corr, **kw)
    peak, run = [0], E.ExactEngine.run

    def counted(self, cells):
        with LiveBytes() as mode:
            out = run(self, cells)
        peak[0] = max(peak[0], mode.peak)
        return out

    E.ExactEngine.run = counted
    try:
        res = pp.activation_patching(m, site, clean, corr, **kw)
    finally:
        E.ExactEngine.run = run
    return peak[0], res.info["memory_estimate"]


@pytest.mark.parametrize(
    "site, B, T, max_batch, per_position",
    [("z", 16, 32, 1, True), ("z", 16, 32, 4, False), ("resid_pre", 8, 24, 8, True), ("k", 4, 40, 2, False)],
)
def test_exact_estimate_bounds_the_measured_peak_closely(site, B, T, max_batch, per_position):
    peak, est = _exact_peak(_model(n_ctx=T), site, B, T, max_batch, per_position)
    assert peak <= est <= 2.0 * peak, (peak, est)


def test_exact_estimate_bounds_a_grouped_query_rotary_gated_model():
    m = _model(
        n_layers=2, n_key_value_heads=2, d_mlp=96, gated_mlp=True, normalization_type="RMS",
        positional_embedding_type="rotary", n_ctx=24,
    )  # fmt: skip
    peak, est = _exact_peak(m, "k", 8, 24, 3, False)
    assert peak <= est <= 2.0 * peak, (peak, est)


@pytest.mark.parametrize("atp_star", [False, True])
def test_atp_estimate_per_prompt_bounds_the_measured_increase(atp_star):
    m = _model(n_ctx=16)
    clean, corr, ld = _prompts(8, 16)
    sites = ["resid_pre", "attn_out", "mlp_out", "z", "k", "pattern"]
    kw = dict(metric=ld, sites=sites, qk_fix=atp_star, grad_drop=atp_star)
    pp.attribution_patching(m, clean, corr, max_batch=4, **kw)
    peaks = {}
    for b in (1, 4):
        with LiveBytes() as mode:
            pp.attribution_patching(m, clean, corr, max_batch=b, **kw)
        peaks[b] = mode.peak
    per = atp_prompt_bytes(m, 16, ld, atp_star, sites, atp_star)
    increase = (peaks[4] - peaks[1]) / 3  # what one more prompt per part adds
    assert increase <= per <= 2.0 * increase, (increase, per)
    assert peaks[4] <= 4 * per  # the whole call within the estimate of its parts


_RSS_SCRIPT = r"""
import json, sys, warnings
warnings.simplefilter("ignore")
import torch
torch.set_num_threads(1)
import pypattern as pp
from pypattern.patching import engine as E

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

m = pp.Transformer(pp.TransformerConfig(n_layers=3, d_model=64, n_heads=4, d_mlp=256, d_vocab=500, n_ctx=32, seed=0))
g = torch.Generator().manual_seed(1)
B, T = 16, 32
clean, corr = torch.randint(0, 500, (B, T), generator=g), torch.randint(0, 500, (B, T), generator=g)
ld = pp.LogitDiff(torch.randint(0, 500, (B,), generator=g), torch.randint(0, 500, (B,), generator=g))
kw = dict(metric=ld, per_position=True, quiet=True, max_memory=None, max_batch=int(sys.argv[1]))
pp.activation_patching(m, "z", clean, corr, **kw)  # the process's one-off work
state, run = {"peak": 0}, E.ExactEngine.run
def measured(self, cells):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status("VmRSS")
    out = run(self, cells)
    state["peak"] = max(state["peak"], status("VmHWM") - base)
    return out
E.ExactEngine.run = measured
res = pp.activation_patching(m, "z", clean, corr, **kw)
print(json.dumps({"peak": state["peak"], "estimate": res.info["memory_estimate"]}))
"""


@pytest.mark.skipif(
    not (os.path.exists("/proc/self/clear_refs") and sys.platform.startswith("linux")),
    reason="needs Linux's /proc/self/clear_refs",
)
def test_exact_estimate_bounds_the_resident_set_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("/proc/self/clear_refs is not writable here")
    # glibc gives freed blocks back at once: the resident set follows the live memory
    env = dict(
        os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536"
    )
    for batch in (1, 8):
        out = subprocess.run(
            [sys.executable, "-c", _RSS_SCRIPT, str(batch)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        got = json.loads(out.stdout.strip().splitlines()[-1])
        assert 0 < got["peak"] <= got["estimate"], got
