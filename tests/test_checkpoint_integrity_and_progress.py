"""Training checkpoints that lost an array or were written under another default dtype are refused, never resumed
into other numbers; progress bars written to a log add a line every ``LOG_INTERVAL_S`` seconds, not ten a second;
a folder given as a file and a model on the meta device are refused with advice that works."""

import dataclasses
import time

import numpy as np
import pytest
import torch
from torch import nn

import pypattern as pp
from pypattern import _progress, _train_checkpoint, io
from pypattern._checks import refuse_meta_model

pytestmark = pytest.mark.usefixtures("one_thread")

TASK = pp.InductionTask(d_vocab=16, seq_len=13)
KW = dict(steps=8, seed=1, log_every=1, quiet=True)


def _model():
    return pp.Transformer(TASK.model_config(d_model=16, n_heads=2, seed=0)).float()


class _Stop(Exception):
    pass


def _stop_at_4(step, model):
    if step == 4:
        raise _Stop


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def _stopped_run(path):
    with pytest.raises(_Stop):
        pp.tasks.train(_model(), TASK, checkpoint=path, callback=_stop_at_4, **KW)


def _rewrite(path, drop=(), header=None):
    """The file at ``path`` written again without the arrays whose names start with one of ``drop``, with its
    training header changed by ``header``."""
    arrays, meta = io.load(path, kind=_train_checkpoint.KIND)
    arrays = {k: v for k, v in arrays.items() if not k.startswith(tuple(drop))}
    if header is not None:
        header(meta["checkpoint"])
    io.save(path, arrays, meta, kind=_train_checkpoint.KIND)


def test_a_checkpoint_without_a_parameters_optimizer_state_is_refused(tmp_path):
    # the intact file resumes to the uninterrupted run (the reference the damaged one would silently miss)
    straight = _model()
    ref = pp.tasks.train(straight, TASK, **KW)
    path = tmp_path / "run.npz"
    _stopped_run(path)
    intact = _model()
    assert pp.tasks.train(intact, TASK, checkpoint=path, **KW).losses == ref.losses
    assert _same_weights(intact, straight)
    path.unlink()
    # the file lost every array of one parameter's AdamW state: it read as a parameter never updated
    _stopped_run(path)
    _rewrite(path, drop=["optimizer/0/"])
    model = _model()
    with pytest.raises(
        io.FormatError, match=r"damaged: it lacks the array 'optimizer/0/.*' that its header lists"
    ):
        pp.tasks.train(model, TASK, checkpoint=path, **KW)
    assert _same_weights(model, _model())  # nothing trained


def test_a_checkpoint_with_part_of_a_parameters_optimizer_state_is_refused(tmp_path):
    # a file whose header does not list its arrays: a parameter's state must still be whole
    path = tmp_path / "run.npz"
    _stopped_run(path)
    _rewrite(path, drop=["optimizer/2/step"], header=lambda h: h.pop("arrays", None))
    with pytest.raises(
        io.FormatError, match=r"optimizer state of parameter 2 holds \['exp_avg', 'exp_avg_sq'\]"
    ):
        pp.tasks.train(_model(), TASK, checkpoint=path, **KW)
    # an array the header does not list
    path.unlink()
    _stopped_run(path)
    arrays, meta = io.load(path, kind=_train_checkpoint.KIND)
    arrays["log/extra"] = np.zeros(3)
    io.save(path, arrays, meta, kind=_train_checkpoint.KIND)
    with pytest.raises(io.FormatError, match="'log/extra' that its header does not list"):
        pp.tasks.train(_model(), TASK, checkpoint=path, **KW)


def test_a_run_resumed_under_another_default_dtype_is_refused(tmp_path):
    path = tmp_path / "run.npz"
    _stopped_run(path)  # under float32, the default
    was = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with pytest.raises(
            io.FingerprintMismatch,
            match=r"default_dtype = 'torch.float32' \(the default\) there, 'torch.float64' now",
        ):
            pp.tasks.train(_model(), TASK, checkpoint=path, **KW)
        # a run under float64 throughout resumes to its own uninterrupted result
        straight = _model()
        ref = pp.tasks.train(straight, TASK, **KW)
        other = tmp_path / "run64.npz"
        _stopped_run(other)
        resumed = _model()
        assert pp.tasks.train(resumed, TASK, checkpoint=other, **KW).losses == ref.losses
        assert _same_weights(resumed, straight)
    finally:
        torch.set_default_dtype(was)
    # and back under float32, the float64 run's file is refused in turn
    with pytest.raises(io.FingerprintMismatch, match="default_dtype"):
        pp.tasks.train(_model(), TASK, checkpoint=other, **KW)


def test_a_progress_bar_written_to_a_log_adds_a_line_at_most_every_interval(capsys):
    # stderr captured: a file, not a terminal; 2.6 s of updates (the bar shows after 2 s)
    start = time.perf_counter()
    with _progress.progress_bar(False, total=10**6, desc="steps") as bar:
        while time.perf_counter() - start < 2.6:
            time.sleep(0.01)
            bar.update(1)
    err = capsys.readouterr().err
    lines = [s for s in err.replace("\r", "\n").split("\n") if "steps" in s]
    # a first line once due (after 2 s), then one every LOG_INTERVAL_S seconds (and the bar's clearing at close)
    allowed = int((time.perf_counter() - start) // _progress.LOG_INTERVAL_S) + 1
    assert 1 <= len(lines) <= allowed, err[:500]
    assert "steps:" in lines[0]
    with _progress.progress_bar(True, total=3) as bar:
        assert bar is None


def test_bar_settings_keep_a_terminals_and_a_notebooks_refresh(monkeypatch):
    from tqdm.auto import tqdm

    class Terminal:
        def isatty(self):
            return True

        def write(self, s):
            pass

        def flush(self):
            pass

    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    on_terminal = _progress.bar_settings(tqdm, file=Terminal(), desc="x")
    assert "mininterval" not in on_terminal and on_terminal["delay"] == 2.0 and on_terminal["leave"] is False
    notebook = type("tqdm_notebook", (), {"__module__": "tqdm.notebook"})
    assert "mininterval" not in _progress.bar_settings(notebook)
    in_log = _progress.bar_settings(tqdm, mininterval=0.5)
    assert in_log["mininterval"] == _progress.LOG_INTERVAL_S <= in_log["maxinterval"]
    monkeypatch.setenv("TQDM_MININTERVAL", "5")  # tqdm's own setting is left to tqdm
    assert "mininterval" not in _progress.bar_settings(tqdm)


def test_the_meta_device_refusal_says_to_recompute_non_persistent_buffers():
    class Rotary(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, 4, 2) / 4), persistent=False)

    with torch.device("meta"):
        model = Rotary()
    with pytest.raises(ValueError, match="on the meta device") as e:
        refuse_meta_model(model)
    msg = str(e.value)
    assert "from_pretrained" in msg and "non-persistent" in msg and "inv_freq" in msg
    # what the message says: to_empty + load_state_dict leaves the non-persistent buffer unset
    real = Rotary()
    model.to_empty(device="cpu")
    model.load_state_dict(real.state_dict())
    assert "inv_freq" not in real.state_dict()
    assert torch.equal(model.proj.weight, real.proj.weight)


def test_saving_to_a_folder_names_the_path(tmp_path):
    folder = tmp_path / "out.npz"
    folder.mkdir()
    with pytest.raises(IsADirectoryError, match=r"path=.*out\.npz' is a folder; give the path of a file"):
        io.save(folder, {"a": np.zeros(2)}, {}, kind="k")
    assert list(folder.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["out.npz"]
    # a file with spaces and non-ASCII characters, given as a str or a Path, reads back
    path = tmp_path / "a b ü 日本.npz"
    io.save(str(path), {"a": np.arange(3.0)}, {"x": 1}, kind="k")
    arrays, meta = io.load(path, kind="k")
    assert np.array_equal(arrays["a"], np.arange(3.0)) and meta["x"] == 1


def test_hash_tensor_reads_conjugate_sparse_and_float8_tensors():
    import hashlib

    z = torch.complex(torch.tensor([1.0, -2.0]), torch.tensor([0.5, 3.0]))
    assert io.hash_tensor(z.conj()) == io.hash_tensor(z.conj().resolve_conj())
    assert io.hash_tensor(z.conj()) != io.hash_tensor(z)
    dense = torch.tensor([[0.0, 2.0], [3.0, 0.0]])
    assert io.hash_tensor(dense.to_sparse()) == io.hash_tensor(dense)
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        t = torch.tensor([0.5, -1.0, 2.0]).to(dtype)
        want = hashlib.sha256(f"{dtype}{(3,)}".encode())
        want.update(t.view(torch.uint8).numpy().tobytes())
        assert io.hash_tensor(t) == want.hexdigest()[:16]
        assert io.hash_tensor(t) != io.hash_tensor(torch.tensor([0.5, -1.0, 4.0]).to(dtype))
    # same bits, other dtypes: other hashes
    bits = torch.tensor([1, 2, 3], dtype=torch.uint8)
    assert io.hash_tensor(bits.view(torch.float8_e4m3fn)) != io.hash_tensor(bits.view(torch.float8_e5m2))
    assert io.hash_tensor(bits.view(torch.float8_e4m3fn)) != io.hash_tensor(bits)


class _WithFloat8Scale(nn.Module):
    """A transformer with a float8 buffer (a quantisation scale) it reads in its forward."""

    def __init__(self):
        super().__init__()
        self.inner = _model()
        self.register_buffer("scale", torch.tensor([1.0, 0.5]).to(torch.float8_e4m3fn))

    def forward(self, tokens):
        return self.inner(tokens) * self.scale.float().sum()


def test_a_model_with_a_float8_buffer_trains_stops_and_resumes(tmp_path):
    straight = _WithFloat8Scale()
    ref = pp.tasks.train(straight, TASK, **KW)
    path = tmp_path / "run.npz"
    with pytest.raises(_Stop):
        pp.tasks.train(_WithFloat8Scale(), TASK, checkpoint=path, callback=_stop_at_4, **KW)
    resumed = _WithFloat8Scale()
    assert pp.tasks.train(resumed, TASK, checkpoint=path, **KW).losses == ref.losses
    assert _same_weights(resumed, straight)
    other = _WithFloat8Scale()
    other.scale = torch.tensor([1.0, 0.25]).to(torch.float8_e4m3fn)
    with pytest.raises(io.FingerprintMismatch, match=r"buffers\[scale\]"):
        pp.tasks.train(other, TASK, checkpoint=path, **KW)


@io.register
@dataclasses.dataclass
class _Scales(io.Saveable):
    scale: torch.Tensor
    note: str = ""


def test_results_keep_float8_tensors(tmp_path):
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        t = torch.tensor(
            [[0.5, -1.0, 2.0], [448.0 if dtype == torch.float8_e4m3fn else 57344.0, 0.0, -0.125]]
        ).to(dtype)
        path = tmp_path / f"{dtype}.npz"
        _Scales(t, "q").save(path)
        back = _Scales.load(path)
        assert back.scale.dtype == dtype and back.note == "q"
        assert torch.equal(back.scale.view(torch.uint8), t.view(torch.uint8))  # bit for bit
