"""Cells whose patch changes no example's metric are not computed: the naive loop skips each such cell, the exact
engine each block whose every cell is one. Every value stays what computing them gives, bit for bit (checked
against the same grid computed whole), checkpoints written with or without the skip resume to the same values,
the progress bar counts the skipped cells as done, and ``info["inert_skipped"]`` counts them."""

import contextlib

import numpy as np
import pytest
import torch

from pypattern.models import Transformer, TransformerConfig
from pypattern.patching import LogitDiff, activation_patching
from pypattern.patching import api as patching_api
from pypattern.patching.engine import ExactEngine

pytestmark = pytest.mark.usefixtures("one_thread")

HOOK = {"resid_pre": "blocks.{}.hook_resid_pre", "z": "blocks.{}.attn.hook_z", "k": "blocks.{}.attn.hook_k"}


def _setup(start=7, dtype=torch.float32, B=16, T=12):
    model = Transformer(
        TransformerConfig(
            n_layers=3, d_model=16, n_heads=2, d_mlp=32, d_vocab=20, n_ctx=T, dtype=dtype, seed=3
        )
    )
    g = torch.Generator().manual_seed(2)
    clean = torch.randint(0, 20, (B, T), generator=g)
    corr = clean.clone()
    corr[:, start:] = (clean[:, start:] + 1 + torch.randint(0, 18, (B, T - start), generator=g)) % 20
    met = LogitDiff(torch.randint(0, 20, (B,), generator=g), torch.randint(0, 20, (B,), generator=g))
    return model, clean, corr, met


def _no_skip(monkeypatch):
    """Grids computed whole (every block run, the inert entries then set), as without the skip."""
    monkeypatch.setattr(patching_api._Grid, "skip_inert", lambda self, blocks, inert, tgt: [])


def _count_cells(monkeypatch, cls, name, per_call=lambda a: len(a[1])):
    """Record the cells each call of ``cls.name`` computes."""
    orig = getattr(cls, name)
    seen = []

    def wrapped(*a, **kw):
        seen.append(per_call(a))
        return orig(*a, **kw)

    monkeypatch.setattr(cls, name, wrapped)
    return seen


def _same_everywhere(model, site, clean, corr) -> torch.Tensor:
    """``(n_layers, pos[, heads])`` bool: where the clean and the corrupted runs' activations at ``site`` agree
    exactly in every prompt (a patch there writes the target's own activation; in a causal model nothing else
    changes)."""
    _, a = model.run_with_cache(clean)
    _, b = model.run_with_cache(corr)
    out = []
    for layer in range(model.cfg.n_layers):
        x, y = a[HOOK[site].format(layer)], b[HOOK[site].format(layer)]
        out.append((x == y).all(-1).all(0))  # (pos,) or (pos, heads)
    return torch.stack(out)


@pytest.mark.parametrize("small", [False, True])
@pytest.mark.parametrize("site", ["resid_pre", "z", "k"])
def test_skipped_blocks_leave_every_value_bit_for_bit(monkeypatch, site, small):
    """A float32 grid (where the cells sharing an engine call change the rounding) with and without the skip:
    identical values; the cells skipped hold the corrupted run's metric exactly, are cells whose patch writes the
    corrupted run's own activation in every prompt, and are not given to the engine."""
    if small:  # a block per position
        monkeypatch.setattr(ExactEngine, "UNEMBED_ROWS", 1)
    model, clean, corr, met = _setup()
    with monkeypatch.context() as m:
        _no_skip(m)
        ran_whole = _count_cells(m, ExactEngine, "run")
        whole = activation_patching(model, site, clean, corr, metric=met, quiet=True)
    with monkeypatch.context() as m:
        ran = _count_cells(m, ExactEngine, "run")
        got = activation_patching(model, site, clean, corr, metric=met, quiet=True)
    assert torch.equal(got.values, whole.values)
    skipped = got.info["inert_skipped"]
    assert whole.info["inert_skipped"] == 0 and skipped > 0
    assert sum(ran) == sum(ran_whole) - skipped and len(ran) < len(ran_whole)
    # the skipped cells are among those that write the target's own activation (the whole grid, then the blocks)
    same = _same_everywhere(model, site, clean, corr)  # (layer, pos[, head])
    if site != "resid_pre":
        same = same.transpose(1, 2)  # (layer, head, pos), as the grid
    at_target = (got.values == got.corrupted.view(-1, *[1] * (got.values.dim() - 1))).all(0)
    assert int(same.sum()) >= skipped
    assert bool(at_target[same].all())  # every such cell, skipped or computed, holds the target's metric
    if small:  # one block per position: every position before the corruption is skipped whole
        assert skipped == int(same.all(0).all(0).sum() if site != "resid_pre" else same.all(0).sum()) * (
            got.values[0].numel() // clean.shape[1]
        )


def test_corruption_at_the_first_position_skips_nothing(monkeypatch):
    model, clean, corr, met = _setup(start=0)
    ran = _count_cells(monkeypatch, ExactEngine, "run")
    got = activation_patching(model, "resid_pre", clean, corr, metric=met, quiet=True)
    assert got.info["inert_skipped"] == 0
    assert sum(ran) == got.info["num_cells"]


def test_naive_loop_runs_only_cells_not_inert_everywhere(monkeypatch):
    """One forward per cell: the cells that write the corrupted run's own activation in every prompt are not run,
    and the grid is bit for bit the one computed whole (also on a model with functions attached, judged by the
    identity rule alone)."""
    model, clean, corr, met = _setup(B=3)
    same = int(_same_everywhere(model, "resid_pre", clean, corr).sum())
    assert same > 0
    kw = dict(metric=met, method="naive", quiet=True)
    with monkeypatch.context() as m:
        _no_skip(m)
        whole = activation_patching(model, "resid_pre", clean, corr, **kw)
    with monkeypatch.context() as m:
        ran = _count_cells(m, patching_api, "_naive", per_call=lambda a: len(a[2]))
        got = activation_patching(model, "resid_pre", clean, corr, **kw)
    assert torch.equal(got.values, whole.values)
    assert got.info["inert_skipped"] == same
    assert sum(ran) == got.info["num_cells"] - same


@pytest.mark.parametrize("first_rule", ["whole", "skip"])
@pytest.mark.parametrize("method", ["exact", "naive"])
def test_checkpoints_resume_across_the_rules(tmp_path, monkeypatch, method, first_rule):
    """A grid stopped with a checkpoint under one rule (computed whole, or with the skip) resumes under the other
    to the uninterrupted values, bit for bit, computing only the cells neither the file nor the skip gives."""
    monkeypatch.setattr(ExactEngine, "UNEMBED_ROWS", 1)  # a block per position
    monkeypatch.setattr(patching_api._Grid, "EVERY_S", 0.0)
    model, clean, corr, met = _setup(B=3)
    kw = dict(metric=met, method=method, quiet=True)
    whole = activation_patching(model, "resid_pre", clean, corr, **kw)
    path = tmp_path / "grid.npz"
    cls, name, count = (
        (ExactEngine, "run", lambda a: len(a[1]))
        if method == "exact"
        else (patching_api, "_naive", lambda a: 1)
    )

    class Stop(Exception):
        pass

    with monkeypatch.context() as m:
        if first_rule == "whole":
            _no_skip(m)
        orig = getattr(cls, name)
        calls = []

        def stop_after_two(*a, **k):
            if len(calls) >= 2:
                raise Stop
            calls.append(1)
            return orig(*a, **k)

        m.setattr(cls, name, stop_after_two)
        with pytest.raises(Stop):
            activation_patching(model, "resid_pre", clean, corr, checkpoint=path, **kw)
    done = np.load(path)["done"]
    with monkeypatch.context() as m:
        if first_rule == "skip":
            _no_skip(m)
        ran = _count_cells(m, cls, name, per_call=count)
        resumed = activation_patching(model, "resid_pre", clean, corr, checkpoint=path, **kw)
    assert torch.equal(resumed.values, whole.values)
    left = int((~torch.from_numpy(done)).sum())
    if first_rule == "skip":  # the file held the skipped cells; the rest computed whole
        assert sum(ran) == left
    else:  # the cells left but those skipped
        assert sum(ran) == left - resumed.info["inert_skipped"] and resumed.info["inert_skipped"] > 0


def test_progress_bar_counts_skipped_cells_as_done(monkeypatch):
    bars = []

    class Bar:
        def __init__(self, **kw):
            self.kw, self.n = kw, kw.get("initial", 0)
            bars.append(self)

        def update(self, k):
            self.n += k

    @contextlib.contextmanager
    def fake(quiet, **kw):
        yield Bar(**kw)

    monkeypatch.setattr(patching_api, "progress_bar", fake)
    monkeypatch.setattr(ExactEngine, "UNEMBED_ROWS", 1)
    model, clean, corr, met = _setup()
    for method in ("exact", "naive"):
        got = activation_patching(model, "resid_pre", clean, corr, metric=met, method=method, quiet=False)
        bar = bars[-1]
        assert bar.kw["total"] == got.info["num_cells"]
        assert bar.kw["initial"] == got.info["inert_skipped"] > 0
        assert bar.n == got.info["num_cells"]


@pytest.mark.parametrize("method", ["exact", "naive"])
def test_float64_metric_of_a_float32_model_is_exactly_the_target_at_inert_cells(method):
    """A metric computed in float64 on a float32 model: the inert cells, computed or skipped, hold the corrupted
    run's float64 metric exactly (effect exactly 0, not the metric rounded to float32); the other cells agree with
    the naive loop."""
    model, clean, corr, _ = _setup(start=4, B=3)
    a, w = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])

    def met(lg):
        r = torch.arange(lg.shape[-2])
        return lg[..., r, a].double() * 1.1 - lg[..., r, w].double()

    got = activation_patching(model, "resid_pre", clean, corr, metric=met, method=method, quiet=True)
    ref = activation_patching(model, "resid_pre", clean, corr, metric=met, method="naive", quiet=True)
    assert got.values.dtype == got.corrupted.dtype == torch.float64
    same = _same_everywhere(model, "resid_pre", clean, corr)  # (layer, pos)
    assert bool(same.any())
    eff = got.values - got.corrupted.view(-1, 1, 1)
    assert not bool((eff[:, same] != 0).any()), eff[:, same].abs().max()
    torch.testing.assert_close(got.values, ref.values, rtol=1e-5, atol=1e-5)


def test_inert_cells_read_caches_by_name_only():
    """The activation stores may be any cache with ``in`` and ``[]`` (TransformerLens 3.x's ActivationCache has no
    ``get``): the inert cells found from such stores equal those found from plain dicts."""
    from pypattern.patching.inert import inert_cells
    from pypattern.patching.sites import Cell

    class Store:  # a cache without dict's get/items
        def __init__(self, d):
            self._d = d

        def __contains__(self, k):
            return k in self._d

        def __getitem__(self, k):
            return self._d[k]

    model = Transformer(
        TransformerConfig(n_layers=2, d_model=16, n_heads=2, d_mlp=32, d_vocab=20, n_ctx=8, seed=0)
    )
    tgt_toks = torch.randint(0, 20, (3, 8), generator=torch.Generator().manual_seed(0))
    src_toks = tgt_toks.clone()
    src_toks[:, 5:] = (src_toks[:, 5:] + 1) % 20  # differs from position 5 on
    names = [f"blocks.{i}.hook_resid_pre" for i in range(2)]
    _, tgt = model.run_with_cache(tgt_toks, names_filter=lambda n: n in names)
    _, src = model.run_with_cache(src_toks, names_filter=lambda n: n in names)
    target, source = {n: tgt[n] for n in names}, {n: src[n] for n in names}
    cells = [Cell(layer=layer, head=-1, pos=p) for layer in range(2) for p in range(8)]
    want = inert_cells(model, "resid_pre", cells, target, source, torch.full((3,), 7), True, 3)
    got = inert_cells(model, "resid_pre", cells, Store(target), Store(source), torch.full((3,), 7), True, 3)
    assert torch.equal(got, want) and bool(want.any()) and not bool(want.all())
