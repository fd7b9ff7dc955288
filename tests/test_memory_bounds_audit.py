"""The memory settings bound the tensor memory a call allocates, measured op by op rather than by peak RSS: a
``TorchDispatchMode`` adds the bytes of every storage an operation makes (one not among its inputs' storages, so
views and in-place results are not counted; oneDNN's opaque packed weights by their size) and subtracts them when
the storage is freed (a weak reference to it), keeping the peak of the live sum. The budgets are a few MB on a
small model with a vocabulary of 2,000: the batched part of each call stays within its budget, the values do not
change with it (to float32 rounding), and the batch reported fits the documented estimate."""

from __future__ import annotations

import warnings
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import pypattern as pp
from pypattern import circuits as C
from pypattern.patching.attribution import atp_prompt_bytes
from pypattern.patching.engine import ExactEngine, bytes_per_cell, engine_bytes

V, B, T = 2000, 16, 12
MB = 2**20


class LiveBytes(TorchDispatchMode):
    """The live and peak bytes of the tensors made under it (see the module's docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict = {}
        self.cur = 0
        self.peak = 0

    def sweep(self) -> None:
        for k in [k for k, (ref, _) in self.live.items() if ref() is None]:
            self.cur -= self.live.pop(k)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.sweep()
        ins = {
            a.untyped_storage().data_ptr()
            for a in tree_leaves((args, kwargs))
            if isinstance(a, torch.Tensor) and a.layout == torch.strided
        }
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            if t.layout != torch.strided:  # oneDNN's packed weights: no storage to read
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


class Section:
    """The peak of what ``cls.method`` allocates beyond what is live when it is entered, over its calls under a
    :class:`LiveBytes` (the batched part of a call: the recorded runs before it come on top)."""

    def __init__(self, monkeypatch, cls, method: str) -> None:
        self.mode: LiveBytes | None = None
        self.extra = 0
        orig = getattr(cls, method)

        def wrapped(obj, *a, **k):
            mode = self.mode
            if mode is None:
                return orig(obj, *a, **k)
            mode.sweep()
            start, before = mode.cur, mode.peak
            mode.peak = start
            try:
                return orig(obj, *a, **k)
            finally:
                self.extra = max(self.extra, mode.peak - start)
                mode.peak = max(mode.peak, before)

        monkeypatch.setattr(cls, method, wrapped)

    def measure(self, fn):
        self.extra = 0
        with LiveBytes() as self.mode:
            out = fn()
        self.mode = None
        return out


@pytest.fixture(scope="module")
def setup():
    warnings.simplefilter("ignore")
    m = pp.Transformer(
        pp.TransformerConfig(n_layers=2, d_model=64, n_heads=4, d_vocab=V, n_ctx=16, d_mlp=256, seed=0)
    )
    g = torch.Generator().manual_seed(1)
    clean, corr = torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)
    ld = pp.LogitDiff(torch.randint(0, V, (B,), generator=g), torch.randint(0, V, (B,), generator=g))
    # the process's one-off work (oneDNN's calibration, the first packs) outside the measured calls
    pp.attribution_patching(m, clean[:2], corr[:2], metric=ld.select(slice(0, 2)), sites=["z"])
    pp.activation_patching(m, "z", clean[:2], corr[:2], metric=pp.KL(), per_position=False, quiet=True)
    return m, clean, corr, {"KL": pp.KL(), "LogitDiff": ld}


def test_the_counter_reads_known_allocations_and_frees():
    x = torch.randn(1000, 1000)  # 4 MB made before: not counted, nor are views of it

    def body():
        a = x * 2  # 4 MB
        b = a[:10]  # a view: nothing new
        del a  # a lives on in b
        c = torch.exp(b)  # 40 KB
        del b  # a freed
        d, e = x + 1, x.t() + 2  # 8 MB live with c
        return (d.sum() + e.sum() + c.sum()).item()

    with LiveBytes() as mode:
        body()
    assert 8_040_000 <= mode.peak <= 8_040_000 + 64  # the sums: a few 0-d results


@pytest.mark.parametrize("metric", ["LogitDiff", "KL"])
def test_activation_patching_max_memory_bounds_the_engine_batches(setup, monkeypatch, metric):
    m, clean, corr, metrics = setup
    met = metrics[metric]
    section = Section(monkeypatch, ExactEngine, "run")
    kw = dict(metric=met, per_position=True, quiet=True)
    ref = pp.activation_patching(m, "z", clean, corr, max_batch=1, **kw).values
    batches = []
    for budget in (4 * MB, 16 * MB):
        res = section.measure(
            lambda b=budget: pp.activation_patching(m, "z", clean, corr, max_memory=b, **kw)
        )
        batches.append(res.info["max_batch"])
        # the reported batch is the estimate's: no more cells than fit (packed weights aside)
        assert res.info["max_batch"] >= 1
        assert engine_bytes(m.cfg, B, T, res.info["max_batch"], "z") <= budget
        assert section.extra <= budget, (budget, section.extra)
        torch.testing.assert_close(res.values, ref, rtol=1e-5, atol=1e-6)
    assert batches[0] < batches[1]  # a larger budget runs larger batches
    # a budget below one cell runs one cell per batch, as documented, and says so
    res = section.measure(lambda: pp.activation_patching(m, "z", clean, corr, max_memory=1024, **kw))
    assert res.info["max_batch"] == 1
    one_cell = section.extra
    torch.testing.assert_close(res.values, ref, rtol=1e-5, atol=1e-6)
    assert one_cell <= bytes_per_cell(m.cfg, B, T)  # the estimate of one cell bounds its batch


@pytest.mark.parametrize("metric", ["LogitDiff", "KL"])
@pytest.mark.parametrize("atp_star", [False, True])
def test_attribution_patching_max_memory_bounds_each_call(setup, metric, atp_star):
    m, clean, corr, metrics = setup
    met = metrics[metric]
    kw = dict(metric=met, sites=["z", "resid_pre"], qk_fix=atp_star, grad_drop=atp_star)
    per = atp_prompt_bytes(m, T, met, atp_star)
    with LiveBytes() as whole:
        ref = pp.attribution_patching(m, clean, corr, **kw)
    for budget in (per, 4 * per):
        with LiveBytes() as mode:
            got = pp.attribution_patching(m, clean, corr, max_memory=budget, **kw)
        # the parts' activations, logits and gradients within the budget (the joined results are a few KB)
        assert mode.peak <= budget, (budget, mode.peak)
        assert mode.peak < whole.peak
        for site in ref:
            torch.testing.assert_close(got[site].values, ref[site].values, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("per_position", [False, True])
def test_circuits_memory_budget_bounds_the_batched_patched_runs(setup, monkeypatch, per_position):
    from pypattern.circuits.engine import EdgeEngine

    m, clean, corr, metrics = setup
    graph = C.edges(m, per_position=True, seq_len=T) if per_position else C.edges(m)
    masks = torch.rand(24, len(graph), generator=torch.Generator().manual_seed(2)) < 0.5
    section = Section(monkeypatch, EdgeEngine, "run")
    chunks = []
    orig_chunk = EdgeEngine.chunk_size
    monkeypatch.setattr(EdgeEngine, "chunk_size", lambda self: chunks.append(orig_chunk(self)) or chunks[-1])
    kw = dict(metric=metrics["KL"], graph=graph)
    ref = C.patch_edges(m, masks, clean, corr, max_batch=1, **kw)
    for budget in (16 * MB, 32 * MB):
        chunks.clear()
        got = section.measure(lambda b=budget: C.patch_edges(m, masks, clean, corr, memory_budget=b, **kw))
        assert 1 < chunks[-1] < len(masks)
        assert section.extra <= budget, (budget, section.extra)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_eap_ig_memory_budget_bounds_its_passes(setup):
    m, clean, corr, metrics = setup
    kw = dict(metric=metrics["KL"], method="eap-ig", steps=8)
    with LiveBytes() as fixed:  # one interpolated run per pass: the recorded runs and one pass
        one = C.edge_attribution(m, clean, corr, max_batch=1, **kw)
    budget = 16 * MB
    with LiveBytes() as mode:
        got = C.edge_attribution(m, clean, corr, memory_budget=budget, **kw)
    assert 1 < got.info["passes"] < 8
    assert mode.peak <= fixed.peak + budget, (fixed.peak, mode.peak)
    torch.testing.assert_close(got.values, one.values, rtol=1e-4, atol=1e-6)


def _cell(row: dict) -> tuple:
    return row["layer"], row["head"], row["pos"]


def test_shortlist_and_confirm_max_memory_bounds_both_stages(setup, monkeypatch):
    from pypattern.patching import shortlist_and_confirm

    m, clean, corr, metrics = setup
    section = Section(monkeypatch, ExactEngine, "run")
    kw = dict(metric=metrics["KL"], per_position=True, k=40)
    ref = shortlist_and_confirm(m, "z", clean, corr, max_batch=1, **kw)
    budget = 4 * MB
    with LiveBytes() as mode:
        section.mode = mode
        rows = shortlist_and_confirm(m, "z", clean, corr, max_memory=budget, **kw)
        section.mode = None
    assert section.extra <= budget, section.extra  # the exact stage's batches
    # the AtP stage split into parts within the same budget; the exact stage's recorded runs (about 3.6 MB here)
    # come on top of its batches
    assert atp_prompt_bytes(m, T, metrics["KL"]) < budget < B * atp_prompt_bytes(m, T, metrics["KL"])
    assert mode.peak <= 2 * budget, mode.peak
    # the same cells confirmed (the order by |atp| may swap near-ties), with the same exact effects
    got, want = sorted(rows, key=_cell), sorted(ref, key=_cell)
    assert [_cell(r) for r in got] == [_cell(r) for r in want]
    torch.testing.assert_close(
        torch.tensor([r["exact"] for r in got]),
        torch.tensor([r["exact"] for r in want]),
        rtol=1e-5,
        atol=1e-6,
    )
