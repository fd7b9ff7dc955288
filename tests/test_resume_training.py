"""The training loops (``tasks.train``, ``train_flags``) and ``circuits.pruning_curve`` write a checkpoint and
resume from it: a run stopped and resumed ends with the weights, losses and curves of an uninterrupted run, bit for
bit; a file of another run is refused naming what differs."""

import os
import signal

import numpy as np
import pytest
import torch
from _circuits_reference import prompts, tiny
from torch import nn

import pypattern as pp
from pypattern import _train_checkpoint, io
from pypattern.circuits import api as circuits_api
from pypattern.circuits import edge_attribution, pruning_curve
from pypattern.circuits.engine import EdgeEngine
from pypattern.patching import LogitDiff

pytestmark = pytest.mark.usefixtures("one_thread")

TASK = pp.InductionTask(d_vocab=16, seq_len=13)


def _model(d_model=16, seed=0):
    return pp.Transformer(TASK.model_config(d_model=d_model, n_heads=2, seed=seed))


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class _Stop(Exception):
    pass


def _stop_at(k):
    def callback(step, model):
        if step == k:
            raise _Stop

    return callback


# a fixed training set with per-sample weights (the sampled indices), and online batches (the batch seeds)
FIXED = dict(num_samples=40, sample_weights=torch.linspace(0.5, 2.0, 40, dtype=torch.float64))


@pytest.mark.parametrize("kw", [{}, FIXED], ids=["online", "fixed-weighted"])
def test_train_stopped_and_resumed_equals_an_uninterrupted_run(tmp_path, kw):
    kw = dict(steps=24, seed=3, log_every=5, quiet=True, **kw)
    straight = _model()
    ref = pp.tasks.train(straight, TASK, **kw)
    assert ref.steps == [0, 5, 10, 15, 20, 23]
    path = tmp_path / "train.npz"
    for k in (6, 15):  # stopped twice: each resume goes on from the last finished step
        model = _model()
        with pytest.raises(_Stop):
            pp.tasks.train(model, TASK, checkpoint=path, callback=_stop_at(k), **kw)
        # the stop restores the weights the call started from, so that the same call resumes
        assert _same_weights(model, _model())
        _, meta = io.load(path, kind=_train_checkpoint.KIND)
        assert meta["checkpoint"]["next_step"] == k + 1
    seen = []
    model = _model()
    res = pp.tasks.train(model, TASK, checkpoint=path, callback=lambda s, m: seen.append(s), **kw)
    assert seen == list(range(16, 24))  # only the steps not done before
    assert res.steps == ref.steps and res.losses == ref.losses
    assert _same_weights(model, straight) and not model.training
    # a finished run's file: its result and final weights, without a step
    again = _model()
    res = pp.tasks.train(again, TASK, checkpoint=path, callback=lambda s, m: pytest.fail("a step ran"), **kw)
    assert res.losses == ref.losses and _same_weights(again, straight)


def test_train_refuses_a_checkpoint_of_another_run_naming_what_differs(tmp_path):
    kw = dict(steps=6, seed=3, log_every=2, quiet=True, **FIXED)
    path = tmp_path / "train.npz"
    pp.tasks.train(_model(), TASK, checkpoint=path, **kw)
    other = {
        "lr": dict(kw, lr=1e-3),
        "steps": dict(kw, steps=7),
        "seed": dict(kw, seed=4),
        "log_every": dict(kw, log_every=3),
        "data": dict(kw, num_samples=41, sample_weights=torch.ones(41)),
        "sample_weights": dict(kw, sample_weights=torch.linspace(0.5, 2.1, 40)),
    }
    for item, args in other.items():
        with pytest.raises(io.FingerprintMismatch, match=item) as e:
            pp.tasks.train(_model(), TASK, checkpoint=path, **args)
        assert e.value.item == item
    with pytest.raises(io.FingerprintMismatch) as e:  # another model shape
        pp.tasks.train(_model(d_model=24), TASK, checkpoint=path, **kw)
    assert e.value.item == "architecture" and "module tree" in str(e.value)
    trained = _model()  # the same model, trained since (or initialised otherwise)
    with torch.no_grad():
        next(trained.parameters()).add_(1e-3)
    with pytest.raises(io.FingerprintMismatch, match=r"weights\[.*differ from those"):
        pp.tasks.train(trained, TASK, checkpoint=path, **kw)
    with pytest.raises(io.FingerprintMismatch, match=r"task.attrs.n_ctx = 13 there, 12 now"):
        pp.tasks.train(_model(), pp.InductionTask(d_vocab=16, seq_len=12), checkpoint=path, **kw)
    with pytest.raises(io.FingerprintMismatch, match="kind = 'train' there, 'train_flags' now"):
        topics = pp.TopicTask(num_topics=2, tokens_per_topic=8, seq_len=16)
        lm = pp.Transformer(topics.model_config(n_layers=2, d_model=16, n_heads=2, seed=0))
        spec = pp.FlagSpec("blocks.1.hook_resid_pre", dims=(0, 1), num_concepts=2)
        pp.train_flags(lm, topics, spec, stage1_steps=1, stage2_steps=1, checkpoint=path, quiet=True)
    with pytest.raises(TypeError, match="checkpoint="):
        pp.tasks.train(_model(), TASK, steps=1, checkpoint=3)
    with pytest.raises(TypeError, match="quiet="):
        pp.tasks.train(_model(), TASK, steps=1, quiet="no")
    with pytest.raises(ValueError, match="is a folder"):
        pp.tasks.train(_model(), TASK, steps=1, checkpoint=str(tmp_path))


def test_train_timed_writes_and_an_error_inside_a_step(tmp_path, monkeypatch):
    """With a write after every step, an error inside step k (the state then is in mid-step) leaves the file
    written after step k - 1, from which the run resumes to the uninterrupted result (as after a kill)."""
    kw = dict(steps=12, seed=1, log_every=1, quiet=True)
    straight = _model()
    ref = pp.tasks.train(straight, TASK, **kw)
    monkeypatch.setattr(_train_checkpoint, "EVERY_S", 0.0)

    class Failing(pp.InductionTask):
        calls = 0

        def per_sample_loss(self, logits, batch):
            Failing.calls += 1
            if Failing.calls == 8:  # step 7, after its batch was drawn and before its update
                raise _Stop
            return super().per_sample_loss(logits, batch)

    failing = Failing(d_vocab=16, seq_len=13)
    path = tmp_path / "t.npz"
    with pytest.raises(_Stop):
        pp.tasks.train(_model(), failing, checkpoint=path, **kw)
    arrays, meta = io.load(path, kind=_train_checkpoint.KIND)
    assert meta["checkpoint"]["next_step"] == 7 and arrays["log/steps"].tolist() == list(range(7))
    assert arrays["log/losses"].tolist() == ref.losses[:7]
    model = _model()
    res = pp.tasks.train(model, failing, checkpoint=path, **kw)
    assert res.losses == ref.losses and _same_weights(model, straight)


class _DropoutNet(nn.Module):
    """A forward that draws from torch's global generator (dropout) and updates buffers (BatchNorm)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.emb, self.drop = nn.Embedding(16, 24), nn.Dropout(0.3)
        self.bn, self.out = nn.BatchNorm1d(13), nn.Linear(24, 16)

    def forward(self, x):
        return self.out(self.bn(self.drop(self.emb(x))))


def test_train_with_dropout_and_running_statistics_resumes_bit_for_bit(tmp_path):
    kw = dict(steps=16, seed=0, log_every=1, quiet=True)
    straight = _DropoutNet()
    torch.manual_seed(5)
    ref = pp.tasks.train(straight, TASK, **kw)
    path = tmp_path / "d.npz"
    stopped = _DropoutNet()
    torch.manual_seed(5)
    with pytest.raises(_Stop):
        pp.tasks.train(stopped, TASK, checkpoint=path, callback=_stop_at(6), **kw)
    model = _DropoutNet()
    torch.manual_seed(123)  # another global generator state in the resuming process: the file's is restored
    res = pp.tasks.train(model, TASK, checkpoint=path, **kw)
    assert res.losses == ref.losses and _same_weights(model, straight)
    assert torch.equal(model.bn.running_mean, straight.bn.running_mean)


def test_train_checkpoint_damaged_or_not_a_checkpoint_is_refused(tmp_path):
    kw = dict(steps=4, seed=0, log_every=1, quiet=True)
    path = str(tmp_path / "t.npz")
    pp.tasks.train(_model(), TASK, checkpoint=path, **kw)
    arrays, meta = io.load(path, kind=_train_checkpoint.KIND)
    name = next(k for k in arrays if k.startswith("params/"))
    damaged = {
        "lacks": {k: v for k, v in arrays.items() if k != name},
        "shape": {**arrays, name: np.zeros(3, dtype=np.float32)},
        "logged steps": {**arrays, "log/steps": np.array([0, 1, 3, 2])},
        "optimizer state": {**arrays, "optimizer/999/exp_avg": np.zeros(2, dtype=np.float32)},
    }
    for what, a in damaged.items():
        io.save(path, a, meta, kind=_train_checkpoint.KIND)
        with pytest.raises(io.FormatError, match=what):
            pp.tasks.train(_model(), TASK, checkpoint=path, **kw)
    with open(path, "wb") as f:
        f.write(b"\x80\x04K\x01.")  # a pickle
    with pytest.raises(io.FormatError, match="pickle"):
        pp.tasks.train(_model(), TASK, checkpoint=path, **kw)


def _flags_setup():
    topics = pp.TopicTask(num_topics=2, tokens_per_topic=8, seq_len=16)
    lm = pp.Transformer(topics.model_config(n_layers=2, d_model=16, n_heads=2, d_mlp=32, seed=0))
    spec = pp.FlagSpec("blocks.1.hook_resid_pre", dims=(0, 1, 2, 3), num_concepts=2)
    return topics, lm, spec


def test_train_flags_stopped_by_ctrl_c_resumes_to_the_uninterrupted_run(tmp_path, monkeypatch):
    """Ctrl-C during a step lets the step finish; the file then holds it and the run resumes from the next one,
    through stage 2, to the uninterrupted weights, losses and stages."""
    from pypattern import flags

    kw = dict(stage1_steps=6, stage2_steps=6, log_every=1, seed=2, quiet=True)
    topics, straight, spec = _flags_setup()
    ref = pp.train_flags(straight, topics, spec, **kw)
    assert ref.stages == [1] * 6 + [2] * 6
    real, calls = flags._lm_loss, []

    def interrupted(logits, targets):
        calls.append(1)
        if len(calls) == 8:  # step 7 (stage 2), in mid-step
            os.kill(os.getpid(), signal.SIGINT)
        return real(logits, targets)

    monkeypatch.setattr(flags, "_lm_loss", interrupted)
    path = tmp_path / "flags.npz"
    _, lm, _ = _flags_setup()
    with pytest.raises(KeyboardInterrupt):
        pp.train_flags(lm, topics, spec, checkpoint=path, **kw)
    assert len(calls) == 8  # raised once step 7 was done, before step 8
    assert _same_weights(lm, _flags_setup()[1])  # restored to the call's start
    _, meta = io.load(path, kind=_train_checkpoint.KIND)
    assert meta["checkpoint"]["next_step"] == 8
    monkeypatch.setattr(flags, "_lm_loss", real)
    res = pp.train_flags(lm, topics, spec, checkpoint=path, **kw)
    assert (res.steps, res.stages, res.lm_losses, res.flag_losses) == (
        ref.steps,
        ref.stages,
        ref.lm_losses,
        ref.flag_losses,
    )
    assert _same_weights(lm, straight) and res.seconds > 0
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Python's handler is back
    with pytest.raises(io.FingerprintMismatch, match=r"spec.dims\[3\] = 3 there, 5 now"):
        other = pp.FlagSpec("blocks.1.hook_resid_pre", dims=(0, 1, 2, 5), num_concepts=2)
        pp.train_flags(_flags_setup()[1], topics, other, checkpoint=path, **kw)
    for item, value in (("aux_weight", 0.5), ("switch_prob", 0.25), ("stage2_steps", 7), ("seed", 3)):
        with pytest.raises(io.FingerprintMismatch, match=item):
            pp.train_flags(_flags_setup()[1], topics, spec, checkpoint=path, **{**kw, item: value})


# ----------------------------------------------------------------------------------------------- pruning curve


@pytest.fixture(scope="module")
def curve_setup():
    model = tiny(seed=31)
    clean, corr, ans, wrong = prompts(model, B=4, seed=32)
    metric = LogitDiff(ans, wrong)
    eap = edge_attribution(model, clean, corr, metric=metric, method="eap")
    rand = torch.randn(len(eap.graph), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return model, clean, corr, metric, {"eap": eap, "random": rand}


@pytest.mark.parametrize("every", [0.0, 1e9])
def test_pruning_curve_stopped_and_resumed_equals_an_uninterrupted_call(
    tmp_path, monkeypatch, curve_setup, every
):
    model, clean, corr, metric, scores = curve_setup
    kw = dict(metric=metric, counts=list(range(0, len(scores["eap"].graph) + 1, 10)), max_batch=3, quiet=True)
    # the uninterrupted call with a checkpoint (evaluated in blocks of max_batch circuits): what a resumed call gives
    ref = pruning_curve(model, scores, clean, corr, checkpoint=tmp_path / "straight.npz", **kw)
    n_runs = ref.info["num_runs"]
    assert n_runs == 2 * len(ref.counts) + 2
    plain = pruning_curve(
        model, scores, clean, corr, **kw
    )  # all circuits in one engine call: equal to rounding
    for name in scores:
        torch.testing.assert_close(plain.metric_values[name], ref.metric_values[name], rtol=0, atol=1e-12)
    monkeypatch.setattr(circuits_api, "_CHECKPOINT_EVERY_S", every)
    real = EdgeEngine.run
    path = tmp_path / "curve.npz"
    for stop_at in (2, 6):  # the call stopped in its 2nd, then (resumed) its 6th block of 3 circuits
        calls = []

        def stopping(self, masks, calls=calls, stop_at=stop_at):
            calls.append(len(masks))
            if len(calls) == stop_at:
                raise KeyboardInterrupt
            return real(self, masks)

        monkeypatch.setattr(EdgeEngine, "run", stopping)
        with pytest.raises(KeyboardInterrupt):
            pruning_curve(model, scores, clean, corr, checkpoint=path, **kw)
        _, meta = io.load(path, kind="PruningCurveCheckpoint")
        assert meta["done"] == 3 * (stop_at - 1) + (3 if stop_at == 6 else 0)
    evaluated = []

    def counting(self, masks):
        evaluated.append(len(masks))
        return real(self, masks)

    monkeypatch.setattr(EdgeEngine, "run", counting)
    res = pruning_curve(model, scores, clean, corr, checkpoint=path, **kw)
    assert sum(evaluated) == n_runs - 18  # only the circuits not done
    for name in scores:
        assert torch.equal(res.faithfulness[name], ref.faithfulness[name])
        assert torch.equal(res.metric_values[name], ref.metric_values[name])
    assert (res.m_full, res.m_empty) == (ref.m_full, ref.m_empty)
    evaluated.clear()
    again = pruning_curve(model, scores, clean, corr, checkpoint=path, **kw)
    assert not evaluated and torch.equal(again.faithfulness["eap"], ref.faithfulness["eap"])
    monkeypatch.setattr(EdgeEngine, "run", real)
    with pytest.raises(io.FingerprintMismatch, match="counts"):
        pruning_curve(model, scores, clean, corr, checkpoint=path, **{**kw, "counts": [0, 5]})
    with pytest.raises(io.FingerprintMismatch, match="scores.random"):
        pruning_curve(model, {**scores, "random": -scores["random"]}, clean, corr, checkpoint=path, **kw)
    with pytest.raises(io.FingerprintMismatch, match="clean"):
        pruning_curve(model, scores, clean.flip(0), corr, checkpoint=path, **kw)
    with pytest.raises(TypeError, match="checkpoint="):
        pruning_curve(model, scores, clean, corr, checkpoint=3, **kw)
    with pytest.raises(TypeError, match="quiet="):
        pruning_curve(model, scores, clean, corr, **{**kw, "quiet": "no"})


def test_training_asks_for_a_progress_bar_over_the_steps_unless_quiet(tmp_path, monkeypatch):
    """A bar counting the steps (shown after two seconds) unless ``quiet``; a resumed run's starts at its step."""
    import contextlib

    asked = []

    @contextlib.contextmanager
    def recording(quiet, **bar):
        asked.append((quiet, bar["total"], bar["initial"], bar["desc"]))
        yield None

    monkeypatch.setattr(_train_checkpoint, "progress_bar", recording)
    pp.tasks.train(_model(), TASK, steps=5, log_every=0)
    pp.tasks.train(_model(), TASK, steps=5, log_every=0, quiet=True)
    path = tmp_path / "t.npz"
    with pytest.raises(_Stop):
        pp.tasks.train(_model(), TASK, steps=5, log_every=0, checkpoint=path, callback=_stop_at(2))
    pp.tasks.train(_model(), TASK, steps=5, log_every=0, checkpoint=path)
    topics, lm, spec = _flags_setup()
    pp.train_flags(lm, topics, spec, stage1_steps=2, stage2_steps=1, log_every=0)
    assert asked == [
        (False, 5, 0, "train"),
        (True, 5, 0, "train"),
        (False, 5, 0, "train"),
        (False, 5, 3, "train"),
        (False, 3, 0, "train_flags"),
    ]
