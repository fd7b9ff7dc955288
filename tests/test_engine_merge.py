"""The exact engine's batches of several positions run together (norms, projections, output projection and MLP over
the rows of all of them; attention per batch), its cells entering at a position finished together, its chunks of
balanced sizes and its head-major attention, each against the naive loop (one hooked forward per cell)."""

import functools

import pytest
import torch

from pypattern.models import Transformer, TransformerConfig
from pypattern.patching import ExactEngine, LogitDiff, activation_patching

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = dict(
    n_layers=3, d_model=16, n_heads=4, d_head=4, d_mlp=24, d_vocab=12, n_ctx=8, dtype=torch.float64, seed=3
)
GQA_ROTARY = dict(
    normalization_type="RMS",
    positional_embedding_type="rotary",
    gated_mlp=True,
    act_fn="silu",
    n_key_value_heads=2,
)
ARCHS = {
    "gpt2": dict(act_fn="gelu_new"),
    "gqa_rotary": GQA_ROTARY,
    "parallel": dict(parallel_attn_mlp=True, positional_embedding_type="rotary", rotary_dim=2),
    "alibi_gqa": {**GQA_ROTARY, "positional_embedding_type": "alibi"},
    "attn_only": dict(d_mlp=None, normalization_type=None, act_fn="relu"),
}
SITES = ["resid_pre", "attn_out", "z", "q", "k", "v", "pattern", "mlp_out", "resid_post"]


def _setup(arch: str):
    model = Transformer(TransformerConfig(**{**BASE, **ARCHS[arch]}))
    g = torch.Generator().manual_seed(2)
    clean = torch.randint(0, 12, (2, 7), generator=g)
    corr = clean.clone()
    corr[:, 1] = (clean[:, 1] + 3) % 12
    corr[:, 4] = (clean[:, 4] + 5) % 12
    return model, clean, corr, LogitDiff(torch.tensor([1, 2]), torch.tensor([4, 5]))


@pytest.fixture
def merged_calls(monkeypatch):
    """Records how many parts each call of the engine's merged block (``_block_many``) takes."""
    calls = []
    orig = ExactEngine._block_many

    def wrapped(self, layer, parts):
        calls.append(len(parts))
        return orig(self, layer, parts)

    monkeypatch.setattr(ExactEngine, "_block_many", wrapped)
    return calls


@functools.cache
def _naive(arch, site, metric_position=None, per_position=True, positions=None):
    """The naive loop's values (one hooked forward per cell) on ``_setup(arch)`` (a model of its own), with the
    metric at ``metric_position`` (a tuple, one position per example; None: the last). The loop reads neither
    the exact engine's batch, memory bound nor chunking, so each setting of those compares with one computation."""
    model, clean, corr, metric = _setup(arch)
    if metric_position is not None:
        metric = LogitDiff(metric.answer, metric.wrong, position=torch.tensor(metric_position))
    kw = dict(per_position=per_position) if positions is None else dict(positions=list(positions))
    return activation_patching(
        model, site, clean, corr, metric=metric, method="naive", quiet=True, **kw
    ).values


def _exact_and_naive(arch, site, metric_position=None, per_position=True, positions=None, **limits):
    """The exact engine's values on ``_setup(arch)`` under ``limits`` (max_batch, max_memory), and the naive
    loop's (:func:`_naive`)."""
    model, clean, corr, metric = _setup(arch)
    if metric_position is not None:
        metric = LogitDiff(metric.answer, metric.wrong, position=torch.tensor(metric_position))
    kw = dict(per_position=per_position) if positions is None else dict(positions=list(positions))
    a = activation_patching(
        model, site, clean, corr, metric=metric, method="exact", quiet=True, **kw, **limits
    )
    return a.values, _naive(arch, site, metric_position, per_position, positions)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("max_batch", [2, None])
def test_batches_of_several_positions_run_together_equal_the_naive_loop(arch, max_batch, merged_calls):
    sites = SITES if arch == "gpt2" else ["resid_pre", "attn_out", "z", "k", "pattern"]
    for site in sites:
        ex, nv = _exact_and_naive(arch, site, max_batch=max_batch)
        err = (ex - nv).abs().max().item()
        assert err <= 1e-9, f"{arch} {site} max_batch={max_batch}: exact and naive differ by {err}"
    # batches of other positions shared one block call: parts of more than one batch met in a chunk
    assert max(merged_calls) > 1


@pytest.mark.parametrize("chunk_rows", [1, 9, 40])
def test_small_chunks_and_per_example_metric_positions(chunk_rows, monkeypatch, merged_calls):
    """Chunks of one cell (``CHUNK_ROWS`` below a cell's rows), of a few cells, and parts of several batches per
    chunk; metric positions per example (every position is computed)."""
    monkeypatch.setattr(ExactEngine, "CHUNK_ROWS", chunk_rows)
    for site in ["resid_pre", "attn_out", "z", "k", "pattern"]:
        for kw in (dict(max_batch=3), dict(per_position=False, max_batch=2), dict(positions=(0, 2, 5))):
            ex, nv = _exact_and_naive("gqa_rotary", site, metric_position=(6, 3), **kw)
            err = (ex - nv).abs().max().item()
            assert err <= 1e-9, f"{site} {kw} CHUNK_ROWS={chunk_rows}: exact and naive differ by {err}"
    if chunk_rows > 1:
        assert max(merged_calls) > 1


def test_batches_under_a_memory_bound_equal_the_naive_loop():
    """``max_memory`` lowers the batch (and so the rows the batches run together in); the values stay the naive
    loop's."""
    for site in ["resid_pre", "attn_out"]:
        ex, nv = _exact_and_naive("gpt2", site, max_memory=40_000)
        assert (ex - nv).abs().max().item() <= 1e-9


@pytest.mark.parametrize("n_cells, rows", [(1, 1), (13, 32), (42, 32), (12, 1), (5, 200), (7, 3)])
def test_chunks_are_balanced_and_cover_the_cells(n_cells, rows):
    eng = ExactEngine.__new__(ExactEngine)  # _chunks reads B and CHUNK_ROWS only
    eng.B = 8
    got = eng._chunks(n_cells, rows)
    assert got[0][0] == 0 and got[-1][1] == n_cells
    assert all(a[1] == b[0] for a, b in zip(got, got[1:]))
    sizes = [e - s for s, e in got]
    per_chunk = max(1, ExactEngine.CHUNK_ROWS // (8 * rows))
    assert max(sizes) <= per_chunk and max(sizes) - min(sizes) <= 1
    assert len(got) == -(-n_cells // per_chunk)  # as few chunks as the row limit allows
