"""The circuit and patching checkpoints (exact edge scores, pruning curves, ACDC, activation patching grids) carry
a format version of their own kind in their header: a file a call wrote resumes to the uninterrupted call's
values; a file of another version is refused naming the file and both versions (a newer one says to upgrade
pypattern); a file without a version is read as version 1 and resumes. Saving a result that load would refuse is
refused by one rule for the circuits results and the registered results."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch

from pypattern import io
from pypattern.circuits import acdc, edge_attribution, pruning_curve
from pypattern.circuits import api as circuits_api
from pypattern.circuits.engine import EdgeEngine
from pypattern.models import Transformer, TransformerConfig
from pypattern.patching import LogitDiff, activation_patching
from pypattern.patching import api as patching_api
from pypattern.patching.engine import ExactEngine

pytestmark = pytest.mark.usefixtures("one_thread")

KEY = "checkpoint_version"


class _Stop(Exception):
    """Stands for a killed process: raised from an engine call, it propagates out of the call."""


def _setup():
    model = Transformer(
        TransformerConfig(
            n_layers=2, d_model=8, n_heads=2, d_mlp=16, d_vocab=12, n_ctx=8, dtype=torch.float64, seed=0
        )
    )
    g = torch.Generator().manual_seed(0)
    clean, corr = torch.randint(0, 12, (3, 5), generator=g), torch.randint(0, 12, (3, 5), generator=g)
    return model, clean, corr, LogitDiff([1, 2, 3], [3, 4, 5])


def _stopping(mp: pytest.MonkeyPatch, cls, k: int) -> None:
    """``cls.run`` raises :class:`_Stop` on its (k+1)-th call."""
    run, calls = cls.run, [0]

    def stopping(self, *a, **kw):
        calls[0] += 1
        if calls[0] > k:
            raise _Stop
        return run(self, *a, **kw)

    mp.setattr(cls, "run", stopping)


class _Kind:
    """One checkpoint kind: ``call(path)`` runs the computation with a checkpoint at ``path``; ``values(result)``
    the numbers compared; ``ref`` those of the call without a checkpoint; ``stop`` how many engine calls run
    before the stopped call is stopped."""

    def __init__(self, kind, version, call, values, ref, engine, stop):
        self.kind, self.version, self.call, self.values, self.ref = kind, version, call, values, ref
        self.engine, self.stop = engine, stop


def _kinds() -> dict[str, _Kind]:
    model, clean, corr, met = _setup()
    exact = dict(metric=met, method="exact", quiet=True, max_batch=3)
    scores = edge_attribution(model, clean, corr, metric=met, method="eap")
    curve = dict(metric=met, counts=list(range(0, len(scores.graph) + 1, 8)), max_batch=3, quiet=True)
    search = dict(metric=met, threshold=0.05, quiet=True, max_batch=3)
    return {
        "exact edge scores": _Kind(
            "ExactEdgeScoresCheckpoint",
            circuits_api._EXACT_SCORES_VERSION,
            lambda p: edge_attribution(model, clean, corr, checkpoint=p, **exact),
            lambda r: r.values,
            edge_attribution(model, clean, corr, **exact).values,
            EdgeEngine,
            3,
        ),
        "pruning curve": _Kind(
            "PruningCurveCheckpoint",
            circuits_api._CURVE_VERSION,
            lambda p: pruning_curve(model, scores, clean, corr, checkpoint=p, **curve),
            lambda r: r.metric_values,
            None,  # set below: the metric values of the call without a checkpoint
            EdgeEngine,
            2,
        ),
        "acdc": _Kind(
            "ACDCCheckpoint",
            circuits_api._ACDC_VERSION,
            lambda p: acdc(model, clean, corr, checkpoint=p, **search),
            lambda r: torch.cat([r.mask.double(), r.scores]),
            None,
            EdgeEngine,
            12,
        ),
        "activation patching": _Kind(
            "ActivationPatchingCheckpoint",
            patching_api._Grid.VERSION,
            lambda p: activation_patching(
                model, "resid_pre", clean, corr, metric=met, checkpoint=p, quiet=True
            ),
            lambda r: r.values,
            activation_patching(model, "resid_pre", clean, corr, metric=met, quiet=True).values,
            ExactEngine,
            2,
        ),
    }


def _same(a, b) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-12)
    else:
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """Each kind, with the file its call wrote when stopped partway (saved after every block)."""
    folder = tmp_path_factory.mktemp("stopped")
    kinds = _kinds()
    model, clean, corr, met = _setup()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(circuits_api, "_CHECKPOINT_EVERY_S", 0.0)
        mp.setattr(ExactEngine, "UNEMBED_ROWS", 1)  # one position per block
        mp.setattr(patching_api._Grid, "EVERY_S", 0.0)
        # the curve and ACDC without a checkpoint: the references
        kinds["pruning curve"].ref = kinds["pruning curve"].values(kinds["pruning curve"].call(None))
        kinds["acdc"].ref = kinds["acdc"].values(kinds["acdc"].call(None))
        files = {}
        for name, k in kinds.items():
            path = folder / f"{name.replace(' ', '_')}.npz"
            with pytest.MonkeyPatch.context() as stop:
                _stopping(stop, k.engine, k.stop)
                with pytest.raises(_Stop):
                    k.call(path)
            assert path.exists(), name
            files[name] = path
    return kinds, files


NAMES = ["exact edge scores", "pruning curve", "acdc", "activation patching"]


def _copy(stopped, name, tmp_path):
    kinds, files = stopped
    path = tmp_path / files[name].name
    shutil.copyfile(files[name], path)
    return kinds[name], path


def _rewrite(path, kind: str, edit) -> None:
    arrays, meta = io.load(path, kind=kind)
    edit(meta)
    io.save(path, dict(arrays), meta, kind=kind)


@pytest.mark.parametrize("name", NAMES)
def test_a_stopped_call_writes_its_kinds_version_and_resumes_to_the_uninterrupted_values(
    stopped, name, tmp_path
):
    k, path = _copy(stopped, name, tmp_path)
    arrays, meta = io.load(path, kind=k.kind)
    assert meta[KEY] == k.version == 1
    _same(k.values(k.call(path)), k.ref)
    # the finished file keeps its version and gives the same values again
    assert io.load(path, kind=k.kind)[1][KEY] == 1
    _same(k.values(k.call(path)), k.ref)


@pytest.mark.parametrize("name", NAMES)
def test_a_file_without_a_version_is_read_as_version_1_and_resumes(stopped, name, tmp_path):
    k, path = _copy(stopped, name, tmp_path)
    _rewrite(path, k.kind, lambda meta: meta.pop(KEY))
    assert KEY not in io.load(path, kind=k.kind)[1]
    _same(k.values(k.call(path)), k.ref)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "version, says",
    [
        (2, r"has version 2, this pypattern writes version 1: it was written by a newer pypattern; upgrade"),
        (0, r"has version 0, this pypattern writes version 1: delete it to start afresh"),
        (True, r"has version True, this pypattern writes version 1: delete it"),
        ("1", r"has version '1', this pypattern writes version 1: delete it"),
    ],
)
def test_a_file_of_another_version_is_refused_naming_the_file_and_both_versions(
    stopped, name, tmp_path, version, says
):
    k, path = _copy(stopped, name, tmp_path)
    _rewrite(path, k.kind, lambda meta: meta.__setitem__(KEY, version))
    before = path.read_bytes()
    with pytest.raises(io.FormatError, match=says) as e:
        k.call(path)
    assert str(path) in str(e.value)
    assert path.read_bytes() == before  # the file is left as it was


# ------------------------------------------------------------------------- save's check that a file reads back
def test_circuits_results_and_registered_results_refuse_a_save_by_one_rule(tmp_path):
    """What ``load`` would refuse is refused by ``save`` before anything is written, for the circuits results
    and for registered results alike: ``cannot save this <class> to <path>: <what, naming the field>; <class>.load
    would refuse the file``."""
    model, clean, corr, met = _setup()
    scores = edge_attribution(model, clean, corr, metric=met, method="eap")
    grid = activation_patching(model, "resid_pre", clean, corr, metric=met, quiet=True)
    cases = [
        (dataclasses.replace(scores, method=3), "EdgeScores", ["method is int 3"]),
        (
            dataclasses.replace(scores, values=np.full((3, 2), "a")),
            "EdgeScores",
            ["values", "not an array of numbers"],
        ),
        (dataclasses.replace(scores.circuit(n=4), method=7), "Circuit", ["method is int 7"]),
        (dataclasses.replace(grid, values=grid.values.long()), "PatchResult", ["values", "int64"]),
    ]
    for k, (bad, cls, says) in enumerate(cases):
        path = tmp_path / f"bad{k}.npz"
        with pytest.raises(ValueError) as e:
            bad.save(path)
        msg = str(e.value)
        assert not isinstance(e.value, io.FormatError)
        assert msg.startswith(f"cannot save this {cls} to {str(path)!r}: "), msg
        assert msg.endswith(f"; {cls}.load would refuse the file"), msg
        assert all(s in msg for s in says), msg
        assert not path.exists()
    # the same results unchanged are saved and read back
    scores.save(tmp_path / "ok.npz")
    assert torch.equal(type(scores).load(tmp_path / "ok.npz").values, scores.values)
