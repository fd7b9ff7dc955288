"""Checkpoints across the estimators: a resume with the model in another dtype is refused naming the dtype (for
the samplers and the training loops; a checkpoint written without the item resumes as before); a checkpoint of a
newer format version says to upgrade pypattern; the circuit and patching checkpoints, stopped at several points,
resume bit for bit, refuse a run that differs in any of the settings they document, and refuse (or resume exactly
from) a file with any one byte flipped; the exact-scores checkpoint's header is checked like the others'."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import pypattern as pp
from pypattern import _train_checkpoint, io
from pypattern.circuits import acdc, edge_attribution
from pypattern.circuits.engine import EdgeEngine
from pypattern.models import Transformer, TransformerConfig
from pypattern.patching import LogitDiff

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::pypattern.sampling.NonStationaryWarning"),
]


class _Stop(Exception):
    """Stands for a killed process: raised from a callback or an engine call, it propagates out of the call."""


# ------------------------------------------------------------------------------------------------- samplers
def _mlp(dtype=torch.float32) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(dtype)


def _batches(dtype=torch.float32) -> list:
    g = torch.Generator().manual_seed(100)
    x = torch.randn(24, 3, generator=g).to(dtype)
    y = (x[:, 0] > 0).long()
    return [(x[i : i + 8], y[i : i + 8]) for i in range(0, 24, 8)]


def _ce(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


SAMPLE = dict(num_chains=2, num_draws=4, num_burnin_steps=1, step_size=1e-3, nbeta=5.0, loss_fn=_ce, seed=3)


def _stop_sampler_at(at):
    def callback(chain, draw):
        if (chain, draw) == at:
            raise _Stop

    return callback


def _stopped_sample(path, dtype=torch.float32) -> None:
    with pytest.raises(_Stop):
        pp.sample(_mlp(dtype), _batches(dtype), checkpoint=path, callbacks=[_stop_sampler_at((1, 1))], quiet=True,
                  **SAMPLE)  # fmt: skip


def test_a_sampler_resume_with_the_model_in_another_dtype_is_refused_naming_the_dtype(tmp_path):
    path = tmp_path / "run.npz"
    _stopped_sample(path)
    with pytest.raises(io.FingerprintMismatch) as e:
        pp.sample(_mlp(torch.float64), _batches(), checkpoint=path, quiet=True, **SAMPLE)
    assert e.value.item == "dtype", str(e.value)
    assert "0.weight in float32" in str(e.value) and "float64" in str(e.value) and str(path) in str(e.value)
    # data in float64 too: their hash, named first, says that their dtype may differ
    with pytest.raises(io.FingerprintMismatch, match="dtype") as e:
        pp.sample(_mlp(torch.float64), _batches(torch.float64), checkpoint=path, quiet=True, **SAMPLE)
    assert e.value.item == "data"
    # another weight in the same dtype is named as before
    other = _mlp()
    with torch.no_grad():
        other[2].bias.neg_()
    with pytest.raises(io.FingerprintMismatch) as e:
        pp.sample(other, _batches(), checkpoint=path, quiet=True, **SAMPLE)
    assert e.value.item == "weights[2.bias]"
    # the same run in float64 resumes to the uninterrupted float64 run, bit for bit
    path64 = tmp_path / "run64.npz"
    _stopped_sample(path64, torch.float64)
    resumed = pp.sample(_mlp(torch.float64), _batches(torch.float64), checkpoint=path64, quiet=True, **SAMPLE)
    full = pp.sample(_mlp(torch.float64), _batches(torch.float64), quiet=True, **SAMPLE)
    np.testing.assert_array_equal(resumed.loss_trace, full.loss_trace)


def test_a_sampler_checkpoint_written_without_the_dtype_item_resumes_exactly(tmp_path):
    path = tmp_path / "run.npz"
    _stopped_sample(path)
    arrays, meta = io.load(path, kind="sample-checkpoint")
    del meta["checkpoint"]["fingerprint"]["dtype"]
    io.save(path, arrays, meta, kind="sample-checkpoint")
    resumed = pp.sample(_mlp(), _batches(), checkpoint=path, quiet=True, **SAMPLE)
    full = pp.sample(_mlp(), _batches(), quiet=True, **SAMPLE)
    np.testing.assert_array_equal(resumed.loss_trace, full.loss_trace)
    # the other dtype is still refused, by the weights it changes
    _stopped_sample(tmp_path / "again.npz")
    arrays, meta = io.load(tmp_path / "again.npz", kind="sample-checkpoint")
    del meta["checkpoint"]["fingerprint"]["dtype"]
    io.save(tmp_path / "again.npz", arrays, meta, kind="sample-checkpoint")
    with pytest.raises(io.FingerprintMismatch, match=r"weights\[0\.weight\]"):
        pp.sample(_mlp(torch.float64), _batches(), checkpoint=tmp_path / "again.npz", quiet=True, **SAMPLE)


def test_a_sampler_checkpoint_of_a_newer_version_says_to_upgrade(tmp_path):
    path = tmp_path / "run.npz"
    _stopped_sample(path)
    arrays, meta = io.load(path, kind="sample-checkpoint")
    meta["checkpoint"]["version"] = 3
    io.save(path, arrays, meta, kind="sample-checkpoint")
    with pytest.raises(
        io.FormatError, match="has version 3, this pypattern writes version 2: .*newer.*upgrade"
    ):
        pp.sample(_mlp(), _batches(), checkpoint=path, quiet=True, **SAMPLE)
    meta["checkpoint"]["version"] = 1  # an older one: started afresh, no upgrade helps
    io.save(path, arrays, meta, kind="sample-checkpoint")
    with pytest.raises(io.FormatError, match="version 1, this pypattern writes version 2: delete it") as e:
        pp.sample(_mlp(), _batches(), checkpoint=path, quiet=True, **SAMPLE)
    assert "upgrade" not in str(e.value)


# ------------------------------------------------------------------------------------------------- training
TASK = pp.InductionTask(d_vocab=16, seq_len=13)
TRAIN = dict(steps=6, seed=3, log_every=2, quiet=True)


def _lm(dtype=torch.float32) -> nn.Module:
    """A model whose configuration does not hold its dtype (pypattern's Transformer's does: its architecture item
    names a changed dtype)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 16)).to(dtype)


def _stop_training_at(k):
    def callback(step, model):
        if step == k:
            raise _Stop

    return callback


def test_a_training_resume_with_the_model_in_another_dtype_is_refused_naming_the_dtype(tmp_path):
    path = tmp_path / "train.npz"
    with pytest.raises(_Stop):
        pp.tasks.train(_lm(), TASK, checkpoint=path, callback=_stop_training_at(2), **TRAIN)
    with pytest.raises(io.FingerprintMismatch) as e:
        pp.tasks.train(_lm(torch.float64), TASK, checkpoint=path, **TRAIN)
    assert e.value.item == "dtype" and "in float32" in str(e.value) and "float64" in str(e.value), str(
        e.value
    )
    # pypattern's Transformer names its dtype in its architecture item
    lm = pp.Transformer(TASK.model_config(d_model=16, n_heads=2, seed=0))
    pp.tasks.train(lm, TASK, checkpoint=tmp_path / "lm.npz", **TRAIN)
    with pytest.raises(io.FingerprintMismatch, match="dtype") as e:
        lm = pp.Transformer(TASK.model_config(d_model=16, n_heads=2, seed=0)).to(torch.float64)
        pp.tasks.train(lm, TASK, checkpoint=tmp_path / "lm.npz", **TRAIN)
    assert e.value.item == "architecture"
    # the float32 model resumes to the uninterrupted run
    model, straight = _lm(), _lm()
    res = pp.tasks.train(model, TASK, checkpoint=path, **TRAIN)
    ref = pp.tasks.train(straight, TASK, **TRAIN)
    assert res.losses == ref.losses
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), straight.state_dict().values()))


def test_a_training_checkpoint_of_a_newer_version_says_to_upgrade(tmp_path):
    path = tmp_path / "train.npz"
    pp.tasks.train(_lm(), TASK, checkpoint=path, **TRAIN)
    arrays, meta = io.load(path, kind=_train_checkpoint.KIND)
    meta["checkpoint"]["version"] = 2
    io.save(path, arrays, meta, kind=_train_checkpoint.KIND)
    with pytest.raises(
        io.FormatError, match="has version 2, this pypattern writes version 1: .*newer.*upgrade"
    ):
        pp.tasks.train(_lm(), TASK, checkpoint=path, **TRAIN)


# ------------------------------------------------------------------------------------- circuits and patching
def _circuit_setup(dtype=torch.float64):
    model = Transformer(
        TransformerConfig(
            n_layers=2, d_model=8, n_heads=2, d_mlp=16, d_vocab=12, n_ctx=8, dtype=dtype, seed=0
        )
    )
    g = torch.Generator().manual_seed(0)
    clean, corr = torch.randint(0, 12, (3, 5), generator=g), torch.randint(0, 12, (3, 5), generator=g)
    return model, clean, corr, LogitDiff([1, 2, 3], [3, 4, 5])


EXACT = dict(method="exact", quiet=True, max_batch=3)


def _stop_engine_after(monkeypatch, k: int) -> None:
    run, calls = EdgeEngine.run, [0]

    def stopping(self, masks):
        calls[0] += 1
        if calls[0] > k:
            raise _Stop
        return run(self, masks)

    monkeypatch.setattr(EdgeEngine, "run", stopping)


def test_exact_scores_stopped_at_several_points_resume_bit_for_bit_and_refuse_each_documented_change(
    tmp_path, monkeypatch
):
    model, clean, corr, metric = _circuit_setup()
    ref = edge_attribution(model, clean, corr, metric=metric, **EXACT).values
    path = tmp_path / "exact.npz"
    for k in (1, 3, 6):  # stopped three times: each resume goes on from the blocks written
        with monkeypatch.context() as m:
            _stop_engine_after(m, k)
            with pytest.raises(_Stop):
                edge_attribution(model, clean, corr, metric=metric, checkpoint=path, **EXACT)
    _, meta = io.load(path, kind="ExactEdgeScoresCheckpoint")
    assert 0 < meta["done"] < ref.shape[1]
    # quiet and max_batch do not enter the fingerprint (documented: the weights, prompts, metric, graph, mode
    # and ablation do)
    resumed = edge_attribution(
        model, clean, corr, metric=metric, checkpoint=path, **{**EXACT, "quiet": False}
    )
    assert torch.equal(resumed.values, ref)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.blocks[1].attn.W_O.neg_()
    changes = {
        "mode": dict(mode="denoise"),
        "ablation": dict(ablation="mean"),
        "metric": dict(metric=LogitDiff([1, 2, 3], [3, 4, 6])),
        "clean": dict(clean=clean.flip(0)),
        "corrupted": dict(corr=corr.flip(0)),
        "edges": dict(per_position=True),
        "weights[blocks.1.attn.W_O]": dict(model=other),
        "architecture": dict(model=_circuit_setup(torch.float32)[0]),  # the dtype is in the configuration
    }
    for item, change in changes.items():
        args = dict(model=model, clean=clean, corr=corr, metric=metric, **EXACT)
        args.update(change)
        with pytest.raises(io.FingerprintMismatch) as e:
            edge_attribution(args.pop("model"), args.pop("clean"), args.pop("corr"), checkpoint=path, **args)
        assert e.value.item == item, (item, str(e.value))


def _flip_each(path, step: int):
    """The file ``path`` with one bit of every ``step``-th byte flipped, one at a time (the file restored after)."""
    data = path.read_bytes()
    try:
        for i in range(0, len(data), step):
            b = bytearray(data)
            b[i] ^= 0x10
            path.write_bytes(bytes(b))
            yield i
    finally:
        path.write_bytes(data)


@pytest.mark.parametrize("kind", ["exact", "acdc", "patch"])
def test_circuit_and_patching_checkpoints_with_a_flipped_byte_are_refused_or_resume_exactly(
    tmp_path, monkeypatch, kind
):
    model, clean, corr, metric = _circuit_setup()

    def call(path):
        if kind == "exact":
            return edge_attribution(model, clean, corr, metric=metric, checkpoint=path, **EXACT).values
        if kind == "acdc":
            c = acdc(
                model, clean, corr, metric=metric, threshold=0.05, quiet=True, max_batch=3, checkpoint=path
            )
            return torch.cat([c.mask.double(), c.scores.double(), torch.tensor([c.faithfulness])])
        return pp.activation_patching(
            model, "resid_pre", clean, corr, metric=metric, quiet=True, checkpoint=path
        ).values

    ref = call(tmp_path / "whole.npz")  # an uninterrupted call with a checkpoint
    path = tmp_path / "part.npz"
    if kind == "patch":  # a finished grid's file
        call(path)
    else:  # a call stopped part-way
        with monkeypatch.context() as m:
            _stop_engine_after(m, 4 if kind == "exact" else 12)
            with pytest.raises(_Stop):
                call(path)
    assert torch.equal(call(tmp_path / "whole.npz"), ref)
    refused = resumed = 0
    for i in _flip_each(path, 11):
        try:
            got = call(path)
        except (io.FormatError, io.FingerprintMismatch):
            refused += 1
            continue
        assert got.shape == ref.shape and torch.equal(got, ref), (
            f"byte {i} flipped: other values, not refused"
        )
        resumed += 1
    assert refused > resumed > 0


def _exact_file_with(tmp_path, edit):
    model, clean, corr, metric = _circuit_setup()
    path = tmp_path / "exact.npz"
    edge_attribution(model, clean, corr, metric=metric, checkpoint=path, **EXACT)
    arrays, meta = io.load(path, kind="ExactEdgeScoresCheckpoint")
    edit(arrays, meta)
    io.save(path, arrays, meta, kind="ExactEdgeScoresCheckpoint")
    return lambda: edge_attribution(model, clean, corr, metric=metric, checkpoint=path, **EXACT)


def test_an_exact_scores_checkpoint_whose_count_is_not_a_number_is_refused_naming_the_file(tmp_path):
    call = _exact_file_with(tmp_path, lambda arrays, meta: meta.update(done="x"))
    with pytest.raises(io.FormatError, match="exact.npz"):
        call()


@pytest.mark.parametrize("dtype", [np.float16, np.int64])
def test_an_exact_scores_checkpoint_with_values_of_another_dtype_is_refused(tmp_path, dtype):
    call = _exact_file_with(
        tmp_path, lambda arrays, meta: arrays.update(values=arrays["values"].astype(dtype))
    )
    with pytest.raises(io.FormatError, match="exact.npz"):
        call()


def test_an_acdc_checkpoint_whose_next_input_is_a_bool_is_refused(tmp_path, monkeypatch):
    """A stopped ACDC run's state names the next destination input by an int; ``True`` (an int to isinstance) is
    an edited file, refused naming it, not read as input 1."""
    model, clean, corr, metric = _circuit_setup()
    path = tmp_path / "acdc.npz"

    def call():
        return acdc(
            model, clean, corr, metric=metric, threshold=0.05, quiet=True, max_batch=3, checkpoint=path
        )

    with monkeypatch.context() as m:
        _stop_engine_after(m, 12)
        with pytest.raises(_Stop):
            call()
    arrays, meta = io.load(path, kind="ACDCCheckpoint")
    assert isinstance(meta["next"], int) and meta["next"] >= 1
    meta["next"] = True
    io.save(path, arrays, meta, kind="ACDCCheckpoint")
    with pytest.raises(io.FormatError, match="acdc.npz"):
        call()
