"""Checkpoints as users meet them: file names of any valid length, with spaces and non-ASCII letters; a folder that
takes no file; truncated, bit-flipped, other-version and other-model checkpoints; several writers and a writer
killed mid-write; resumed progress bars; and two gloo ranks given one checkpoint in other words (accepted), or
models that differ in architecture, BatchNorm mode or hooks (refused, naming what differs)."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from io import StringIO

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import pypattern as pp
from pypattern import _train_checkpoint, distributed, io

pytestmark = pytest.mark.usefixtures("one_thread")

TASK = pp.InductionTask(d_vocab=16, seq_len=13)
TRAIN = dict(steps=6, seed=3, log_every=2, quiet=True)


def _model(seed=0):
    return pp.Transformer(TASK.model_config(d_model=16, n_heads=2, seed=seed))


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class _Stop(Exception):
    pass


def _stop_training_at(k):
    def callback(step, model):
        if step == k:
            raise _Stop

    return callback


# ------------------------------------------------------------------------------------------- file names and folders


@pytest.mark.parametrize(
    "name",
    ["a" * 240 + ".npz", "運行" * 40 + ".npz", "with space ü é.npz"],
    ids=["244-byte name", "244-byte non-ASCII name", "spaces and accents"],
)
def test_any_valid_file_name_is_written_and_read(tmp_path, name):
    """A name up to the file system's 255 bytes is a valid checkpoint: its temporary (named after it, with a
    process id and a random tail) must fit too, and a killed writer's temporaries are still found and removed."""
    folder = tmp_path / "a folder ü"
    folder.mkdir()
    path = folder / name
    assert len(name.encode()) <= 255
    io.save(path, {"x": np.arange(5.0)}, {"note": name}, kind="k")
    arrays, meta = io.load(path, kind="k")
    np.testing.assert_array_equal(arrays["x"], np.arange(5.0))
    assert meta["note"] == name
    # a temporary left by a writer that no longer runs, an hour old: removed by the next write of the file
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = folder / f".tmp-{io._temporary_stem(name)}-{int(done.stdout)}-xyz.npz"
    stale.write_bytes(b"partial")
    os.utime(stale, (time.time() - 3600,) * 2)
    io.save(path, {"x": np.arange(3.0)}, {}, kind="k")
    assert sorted(os.listdir(folder)) == [name]


def test_training_resumes_under_a_path_with_spaces_and_non_ascii_letters(tmp_path):
    path = tmp_path / "runs ü" / "entraînement 1.npz"
    straight = _model()
    ref = pp.tasks.train(straight, TASK, **TRAIN)
    with pytest.raises(_Stop):
        pp.tasks.train(_model(), TASK, checkpoint=path, callback=_stop_training_at(3), **TRAIN)
    model = _model()
    res = pp.tasks.train(model, TASK, checkpoint=path, **TRAIN)
    assert res.losses == ref.losses and _same_weights(model, straight)


def test_a_folder_that_takes_no_file_is_named_not_the_temporary(tmp_path, monkeypatch):
    """The error names the file asked for and its folder, keeps its type (a PermissionError is one), and leaves
    nothing behind."""
    import tempfile as tempfile_module

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", os.path.join(kwargs["dir"], ".tmp-x"))

    monkeypatch.setattr(tempfile_module, "mkstemp", refuse)
    path = tmp_path / "ro" / "run.npz"
    with pytest.raises(
        PermissionError, match=r"cannot write '.*ro/run\.npz': its folder '.*ro' does not take"
    ):
        io.save(path, {"x": np.zeros(2)}, {}, kind="k")
    monkeypatch.undo()
    assert os.listdir(tmp_path / "ro") == []
    # a folder the system refuses files in, whoever asks (sysfs refuses root too)
    if sys.platform.startswith("linux") and os.path.isdir("/sys/kernel"):
        with pytest.raises(OSError, match=r"cannot write '/sys/kernel/run\.npz': its folder '/sys/kernel'"):
            io.save("/sys/kernel/run.npz", {"x": np.zeros(2)}, {}, kind="k")


def test_training_into_a_folder_that_takes_no_file_is_refused_before_any_step(tmp_path, monkeypatch):
    """Not after the steps (a failed write of the finished run restores the starting weights: the work is lost)."""
    import tempfile as tempfile_module

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", kwargs["dir"])

    ran = []
    model = _model()
    with monkeypatch.context() as m:
        m.setattr(tempfile_module, "mkstemp", refuse)
        with pytest.raises(
            PermissionError, match=r"checkpoint='.*/new/t\.npz' cannot be written: the folder"
        ):
            pp.tasks.train(
                model,
                TASK,
                checkpoint=tmp_path / "new" / "t.npz",
                callback=lambda s, m: ran.append(s),
                **TRAIN,
            )
    assert ran == [] and os.listdir(tmp_path) == []
    if sys.platform.startswith("linux") and os.path.isdir("/sys/kernel"):  # refuses files to root too
        with pytest.raises(OSError, match=r"checkpoint='/sys/kernel/t\.npz' cannot be written"):
            pp.tasks.train(
                model, TASK, checkpoint="/sys/kernel/t.npz", callback=lambda s, m: ran.append(s), **TRAIN
            )
        assert ran == []
    # a finished run's file in a folder that takes no new file is read, not written
    path = tmp_path / "done.npz"
    ref = pp.tasks.train(_model(), TASK, checkpoint=path, **TRAIN)
    with monkeypatch.context() as m:
        m.setattr(tempfile_module, "mkstemp", refuse)
        again = pp.tasks.train(_model(), TASK, checkpoint=path, **TRAIN)
    assert again.losses == ref.losses


# ------------------------------------------------------------------------------------------- damaged checkpoints


def _sampling_task():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 4, generator=g)
    y = (x[:, 0] > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    return model, loader


SAMPLE = dict(
    num_chains=2,
    num_draws=4,
    num_burnin_steps=1,
    step_size=1e-3,
    localization=10.0,
    nbeta=20.0,
    seed=1,
    warn_nonstationary=False,
    quiet=True,
)


def _stop_sampling(chain, draw):
    if chain == 1 and draw == 2:
        raise _Stop


def _damaged_copies(good: bytes, seed: int, flips: int):
    """The file cut at a spread of lengths, and with one bit flipped at random places."""
    for n in np.linspace(0, len(good) - 1, 12).astype(int):
        yield f"cut at {n}", good[:n]
    rng = np.random.default_rng(seed)
    for pos in rng.choice(len(good), flips, replace=False):
        b = bytearray(good)
        b[pos] ^= 1 << int(rng.integers(8))
        yield f"bit flipped at {pos}", bytes(b)


def test_damaged_sampler_checkpoints_are_refused_or_resume_exactly(tmp_path):
    """Every cut or flipped copy of a stopped run's file is a FormatError naming the file, or (a flip in a byte
    nothing reads: a time stamp) resumes to the uninterrupted result: never another error, never other numbers."""
    model, loader = _sampling_task()
    ref = pp.sample(model, loader, **SAMPLE)
    path = tmp_path / "s.npz"
    with pytest.raises(_Stop):
        pp.sample(model, loader, checkpoint=path, callbacks=[_stop_sampling], **SAMPLE)
    good = path.read_bytes()
    refused = 0
    for what, data in _damaged_copies(good, 0, 40):
        path.write_bytes(data)
        try:
            res = pp.sample(model, loader, checkpoint=path, **SAMPLE)
        except io.FormatError as e:
            assert str(path) in str(e), what
            refused += 1
            continue
        np.testing.assert_array_equal(res.loss_trace, ref.loss_trace, err_msg=what)
    assert refused >= 40


def test_damaged_training_checkpoints_are_refused_or_resume_exactly(tmp_path):
    straight = _model()
    ref = pp.tasks.train(straight, TASK, **TRAIN)
    path = tmp_path / "t.npz"
    with pytest.raises(_Stop):
        pp.tasks.train(_model(), TASK, checkpoint=path, callback=_stop_training_at(3), **TRAIN)
    good = path.read_bytes()
    refused = 0
    for what, data in _damaged_copies(good, 1, 25):
        path.write_bytes(data)
        model = _model()
        try:
            res = pp.tasks.train(model, TASK, checkpoint=path, **TRAIN)
        except io.FormatError as e:
            assert str(path) in str(e), what
            assert _same_weights(model, _model()), what  # nothing was read into the model
            refused += 1
            continue
        assert res.losses == ref.losses and _same_weights(model, straight), what
    assert refused >= 25


@pytest.mark.parametrize("version", [0, 2, True, "1", None])
def test_a_training_checkpoint_of_another_version_is_refused_naming_it(tmp_path, version):
    path = tmp_path / "t.npz"
    pp.tasks.train(_model(), TASK, checkpoint=path, **TRAIN)
    arrays, meta = io.load(path, kind=_train_checkpoint.KIND)
    meta["checkpoint"]["version"] = version
    io.save(path, arrays, meta, kind=_train_checkpoint.KIND)
    with pytest.raises(io.FormatError, match=f"has version {version!r}, this pypattern writes version 1"):
        pp.tasks.train(_model(), TASK, checkpoint=path, **TRAIN)


def test_a_sampler_checkpoint_of_another_version_is_refused_naming_it(tmp_path):
    model, loader = _sampling_task()
    path = tmp_path / "s.npz"
    pp.sample(model, loader, checkpoint=path, **SAMPLE)
    arrays, meta = io.load(path, kind="sample-checkpoint")
    for version in (1, 3):
        meta["checkpoint"]["version"] = version
        io.save(path, arrays, meta, kind="sample-checkpoint")
        with pytest.raises(io.FormatError, match=f"has version {version}, this pypattern writes version 2"):
            pp.sample(model, loader, checkpoint=path, **SAMPLE)


def test_a_checkpoint_of_another_model_of_the_same_shapes_is_refused_naming_the_weight(tmp_path):
    model, loader = _sampling_task()
    path = tmp_path / "s.npz"
    pp.sample(model, loader, checkpoint=path, **SAMPLE)
    other = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))  # same shapes, other draw of weights
    with pytest.raises(io.FingerprintMismatch, match=r"weights\[0\.weight\]"):
        pp.sample(other, loader, checkpoint=path, **SAMPLE)
    path = tmp_path / "t.npz"
    pp.tasks.train(_model(), TASK, checkpoint=path, **TRAIN)
    nudged = _model()  # the same configuration, one weight moved by one float32 spacing
    with torch.no_grad():
        nudged.embed.W_E[0, 0] = torch.nextafter(nudged.embed.W_E[0, 0], torch.tensor(1.0))
    with pytest.raises(io.FingerprintMismatch, match=r"weights\[embed\.W_E\].*differ from those the run"):
        pp.tasks.train(nudged, TASK, checkpoint=path, **TRAIN)


# ------------------------------------------------------------------------------------------- writers


_WRITER = """
import sys
import numpy as np
from pypattern import io
path, wid, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(n):
    io.save(path, {"x": np.full(200_000, wid * 1000 + i, dtype=np.float64)}, {"w": wid, "i": i}, kind="k")
"""


def _complete(path):
    """The file holds one writer's whole write (every value the one its header says)."""
    arrays, meta = io.load(path, kind="k")
    assert np.all(arrays["x"] == meta["w"] * 1000 + meta["i"])
    return meta["w"], meta["i"]


def test_two_writers_and_a_reader_see_only_whole_files_and_the_last_rename_wins(tmp_path):
    path = tmp_path / "shared ck.npz"
    io.save(path, {"x": np.full(200_000, 0.0)}, {"w": 0, "i": 0}, kind="k")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    writers = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(w), "25"], env=env) for w in (1, 2)
    ]
    seen = set()
    while any(p.poll() is None for p in writers):
        seen.add(_complete(path)[0])
    assert [p.wait() for p in writers] == [0, 0]
    last = _complete(path)
    assert last[1] == 24 and seen <= {0, 1, 2}  # the last file renamed into place: some writer's last write
    assert sorted(os.listdir(tmp_path)) == ["shared ck.npz"]


_PAUSED_WRITER = """
import os, sys, time
import numpy as np
from pypattern import io

path, where = sys.argv[1], sys.argv[2]


def pause(*args, **kwargs):
    print("paused", flush=True)
    time.sleep(60)


if where == "in the data":  # the temporary holds the archive's first bytes only
    def savez(f, **arrays):
        f.write(b"PK\\x03\\x04" + bytes(1000))
        f.flush()
        pause()

    np.savez = savez
else:  # the temporary is whole, not yet synced nor renamed
    os.fsync = pause
io.save(path, {"x": np.full(200_000, 7.0)}, {"w": 7, "i": 0}, kind="k")
"""


@pytest.mark.parametrize("where", ["in the data", "before the rename"])
def test_a_writer_killed_mid_write_leaves_the_previous_whole_file(tmp_path, where):
    """SIGKILL while the writer is held inside a write: the file is the previous whole one, the next write
    replaces it, and the killed writer's temporary is all that is left of it."""
    path = tmp_path / "ck.npz"
    io.save(path, {"x": np.full(10, -1000.0)}, {"w": -1, "i": 0}, kind="k")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(
        [sys.executable, "-c", _PAUSED_WRITER, str(path), where], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert p.stdout.readline() == "paused\n"
    finally:
        p.send_signal(signal.SIGKILL)
        p.stdout.close()
        p.wait()
    assert _complete(path) == (-1, 0)
    (left,) = [n for n in os.listdir(tmp_path) if n != "ck.npz"]
    assert left.startswith(f".tmp-ck.npz-{p.pid}-")
    io.save(path, {"x": np.full(10, 5.0)}, {"w": 0, "i": 5}, kind="k")
    assert _complete(path) == (0, 5)


# ------------------------------------------------------------------------------------------- progress bars


class _Bars:
    """tqdm bars made by the library, with what each counted: ``(initial, final n, total, updates)``."""

    def __init__(self, monkeypatch):
        import tqdm
        import tqdm.auto

        self.made = []
        made = self.made

        class Recording(tqdm.tqdm):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **{**kwargs, "disable": False, "file": StringIO()})
                self.updates = 0
                made.append(self)

            def update(self, n=1):
                self.updates += n
                return super().update(n)

        monkeypatch.setattr(tqdm.auto, "tqdm", Recording)

    def counts(self):
        out = [(b.initial, b.n, b.total, b.updates) for b in self.made]
        self.made.clear()
        return out


def test_a_resumed_training_bar_counts_the_remaining_steps_from_where_the_run_stopped(tmp_path, monkeypatch):
    bars = _Bars(monkeypatch)
    kw = {**TRAIN, "quiet": False}
    path = tmp_path / "t.npz"
    with pytest.raises(_Stop):
        pp.tasks.train(_model(), TASK, checkpoint=path, callback=_stop_training_at(3), **kw)
    assert bars.counts() == [(0, 4, 6, 4)]  # steps 0 .. 3 done
    pp.tasks.train(_model(), TASK, checkpoint=path, **kw)
    assert bars.counts() == [(4, 6, 6, 2)]  # from 4 of 6: the two steps left, as the run does them
    pp.tasks.train(_model(), TASK, checkpoint=path, **kw)
    assert bars.counts() == []  # a finished run: no bar


def test_a_resumed_sampler_bar_counts_the_steps_left(tmp_path, monkeypatch):
    """The sampler's bar counts the steps its chains have left: a resumed run's, the steps after the stop."""
    model, loader = _sampling_task()
    bars = _Bars(monkeypatch)
    kw = {**SAMPLE, "quiet": False}
    steps = SAMPLE["num_chains"] * (SAMPLE["num_burnin_steps"] + SAMPLE["num_draws"])
    path = tmp_path / "s.npz"
    with pytest.raises(_Stop):
        pp.sample(model, loader, checkpoint=path, callbacks=[_stop_sampling], **kw)
    (stopped,) = bars.counts()
    done_steps = int(io.load(path, kind="sample-checkpoint")[0]["next_step"].sum())
    assert stopped[2] == steps and stopped[1] >= done_steps
    pp.sample(model, loader, checkpoint=path, **kw)
    assert bars.counts() == [(0, steps - done_steps, steps - done_steps, steps - done_steps)]


# ------------------------------------------------------------------------------------------- two ranks

DKW = dict(
    num_chains=3,
    num_draws=5,
    num_burnin_steps=1,
    step_size=1e-3,
    localization=10.0,
    nbeta=20.0,
    seed=2,
    quiet=True,
    warn_nonstationary=False,
)


def _ranks_task(activation=nn.Tanh, width=5):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 4, generator=g)
    y = (x[:, :2].sum(1) > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, width), activation(), nn.Linear(width, 2))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True)
    return model, loader, (x[:3], y[:3])


def _LM_CONFIG(seed):
    return TASK.model_config(d_model=8, n_heads=2, d_mlp=16, n_layers=1, seed=seed)


def _lm_loader():
    return torch.utils.data.DataLoader(TASK.sample(32, seed=0).tokens, batch_size=16)


def _stop_on_rank1(chain, draw):
    if chain == 1 and draw == 2:  # chain 1 runs on rank 1
        raise _Stop("stopped")


def _double(module, args, output):
    return 2 * output


def _error(call) -> str:
    try:
        call()
    except Exception as e:  # noqa: BLE001 - recorded for the test
        return f"{type(e).__name__}: {e}"
    return "no error"


def _worker(rank: int, world: int, folder: str) -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=world)
    out = {}
    try:
        os.chdir(folder)
        model, loader, probe = _ranks_task()
        # one checkpoint in other words: relative on rank 0; on rank 1 absolute, a Path, through a linked folder
        ck = "ck/run.npz" if rank == 0 else pathlib.Path(folder, "link", "run.npz")
        out["stopped"] = _error(
            lambda: distributed.sample(model, loader, checkpoint=ck, callbacks=[_stop_on_rank1], **DKW)
        )
        dist.barrier()
        out["files"] = sorted(os.listdir(os.path.join(folder, "ck")))
        again = (
            os.path.join(".", "ck", "..", "ck", "run.npz")
            if rank == 0
            else os.path.join(folder, "ck/run.npz")
        )
        out["resumed"] = distributed.sample(model, loader, checkpoint=again, **DKW).loss_trace.tolist()
        # files of a run over four ranks: this run over two starts afresh, and says so
        if rank == 0:
            os.makedirs("four")
            io.save("four/run.rank0of4.npz", {}, {}, kind="sample-checkpoint")
        dist.barrier()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fresh = distributed.sample(model, loader, checkpoint="four/run.npz", **DKW)
        out["fresh"] = fresh.loss_trace.tolist()
        out["world_warnings"] = [str(w.message) for w in caught if "rank(s) exist" in str(w.message)]
        # a susceptibility folder with and without its trailing separator
        sus_ck = "sus" if rank == 0 else os.path.join(folder, "sus") + os.sep
        out["chi"] = distributed.susceptibilities(
            model, loader, probe, ["0.weight"], checkpoint=sus_ck, **DKW
        ).chi.tolist()
        # two places: refused, naming where each rank's path resolves
        out["two_folders"] = _error(
            lambda: distributed.sample(model, loader, checkpoint=f"{'ab'[rank]}/run.npz", **DKW)
        )
        # models that differ: another activation (same weights), another width, BatchNorm in train() on one rank
        # only, a hook on one rank only
        relu, _, _ = _ranks_task(nn.ReLU)
        wide, _, _ = _ranks_task(width=6)
        out["activation"] = _error(lambda: distributed.estimate_llc(relu if rank else model, loader, **DKW))
        out["width"] = _error(lambda: distributed.estimate_llc(wide if rank else model, loader, **DKW))
        out["sus_activation"] = _error(
            lambda: distributed.susceptibilities(relu if rank else model, loader, probe, ["0.weight"], **DKW)
        )
        torch.manual_seed(0)
        bn = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 2))
        bn.train(rank == 1)
        out["batchnorm"] = _error(lambda: distributed.estimate_llc(bn, loader, **DKW))
        # a Transformer made with each rank's own seed and given the same weights: the same model
        lm = pp.Transformer(_LM_CONFIG(seed=rank))
        lm.load_state_dict(pp.Transformer(_LM_CONFIG(seed=0)).state_dict())
        out["lm"] = distributed.sample(lm, _lm_loader(), **DKW).loss_trace.tolist()
        handle = model[1].register_forward_hook(_double) if rank == 1 else None
        out["hook"] = _error(lambda: distributed.estimate_llc(model, loader, **DKW))
        if handle is not None:
            handle.remove()
    finally:
        dist.destroy_process_group()
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    os._exit(0)  # gloo's teardown at exit aborts now and then; the results are written


def test_two_ranks_take_one_checkpoint_in_other_words_and_name_model_differences():
    model, loader, probe = _ranks_task()
    single = pp.sample(model, loader, **DKW)
    sus = pp.susceptibilities(model, loader, probe, ["0.weight"], **DKW)
    lm = pp.sample(pp.Transformer(_LM_CONFIG(seed=0)), _lm_loader(), **DKW)
    relu, _, _ = _ranks_task(nn.ReLU)
    # another activation keeps every weight's name, shape and value: only the architecture tells them apart
    assert _same_weights(relu, model)
    assert not np.array_equal(pp.sample(relu, loader, **DKW).loss_trace, single.loss_trace)
    with tempfile.TemporaryDirectory() as folder:
        os.makedirs(os.path.join(folder, "ck"))
        os.symlink(os.path.join(folder, "ck"), os.path.join(folder, "link"))
        mp.spawn(_worker, args=(2, folder), nprocs=2, join=True)
        outs = [json.load(open(os.path.join(folder, f"rank{r}.json"))) for r in range(2)]
        real = os.path.realpath(folder)
    assert outs[1]["stopped"] == "_Stop: stopped"
    assert outs[1]["world_warnings"] == []  # rank 0 says it, once
    assert outs[0]["world_warnings"] == [
        "checkpoint='four/run.npz': files of a run over 4 rank(s) exist ('four/run.rank0of4.npz', ...), none of one "
        "over 2: each number of ranks has its own files, so this run starts afresh; launch 4 rank(s) to resume "
        "that run"
    ]
    assert outs[0]["stopped"].startswith("RuntimeError: rank 1 failed")
    for o in outs:
        # each rank's file beside the one name, and the resumed run equals the single-process one bit for bit
        assert o["files"] == ["run.rank0of2.npz", "run.rank1of2.npz"]
        np.testing.assert_array_equal(o["resumed"], single.loss_trace)
        np.testing.assert_allclose(o["chi"], sus.chi, rtol=1e-9, atol=1e-12)
        np.testing.assert_array_equal(o["fresh"], single.loss_trace)
        np.testing.assert_array_equal(o["lm"], lm.loss_trace)
        assert "different values of 'checkpoint'" in o["two_folders"]
        assert f"'{real}/a/run.npz' on rank(s) [0], '{real}/b/run.npz' on rank(s) [1]" in o["two_folders"]
        for key in ("activation", "sus_activation"):
            assert "different values of 'architecture'" in o[key], o[key]
            assert "architecture.modules.1 = 'Tanh()' on rank 0, 'ReLU()' on rank 1" in o[key]
        assert "different values of 'architecture'" in o["width"]
        assert "out_features=5" in o["width"] and "out_features=6" in o["width"]
        assert "different values of 'training': [] on rank(s) [0], ['1'] on rank(s) [1]" in o["batchnorm"]
        assert (
            "different values of 'hooks': hooks.1 (forward_hooks) = (none) on rank 0, "
            "['test_io_resume_users_fuzz._double:" in o["hook"]
        )
