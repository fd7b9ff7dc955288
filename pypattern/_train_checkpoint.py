"""Checkpoints of the training loops (:func:`pypattern.tasks.train`, :func:`pypattern.train_flags`): the state a
run stopped after a step resumes from, bit for bit, in one :mod:`pypattern.io` file (no pickle, written
atomically), tied to the run that wrote it by a fingerprint (:func:`pypattern.io.fingerprint`)."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn

from . import io
from ._progress import Terminated, progress_bar
from .sampling.checkpoint import check_dtypes, version_message

__all__ = ["KIND", "TrainingSteps", "check_checkpoint_arg", "model_items", "task_items"]

KIND = "TrainCheckpoint"
VERSION = 1
#: seconds between two timed writes of a training checkpoint (it is also written at the end and when a run stops)
EVERY_S = 30.0
#: torch's default dtype when none is set (a run under another records it in its fingerprint)
_DEFAULT_DTYPE = torch.float32
#: the optimizer state AdamW keeps per parameter
_ADAMW_KEYS = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def check_checkpoint_arg(checkpoint, quiet) -> None:
    """Refuse, before any work of a long call (training, a pruning curve, ACDC), a ``quiet`` that is not a bool, a
    ``checkpoint`` that cannot be a file, and a new ``checkpoint`` in a folder that takes no file (the call would
    do its work and then fail to write it; an existing file is read first, and a finished run's is not written)."""
    if not isinstance(quiet, bool):
        raise TypeError(f"quiet={quiet!r} is not valid; give True or False")
    if checkpoint is not None:
        from .sampling.plan import check_checkpoint_file

        if not isinstance(checkpoint, str | os.PathLike):
            raise TypeError(f"checkpoint={checkpoint!r} is not valid; give a file path such as 'run.npz'")
        check_checkpoint_file(checkpoint)
        _check_new_file_can_be_written(os.fspath(checkpoint))


def _check_new_file_can_be_written(path: str) -> None:
    """For a ``path`` with no file yet: a file can be made in its folder (or, for a folder still to be made, in its
    nearest existing ancestor), tried by making and removing one; an ``OSError`` of the same type naming
    ``checkpoint`` and the folder otherwise."""
    import tempfile

    if os.path.lexists(path):
        return
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):  # check_checkpoint_file made sure the nearest one is a folder
        folder = os.path.dirname(folder)
    try:
        fd, probe = tempfile.mkstemp(prefix=".tmp-write-check-", dir=folder)
    except OSError as e:
        raise type(e)(
            e.errno,
            f"checkpoint={path!r} cannot be written: the folder {folder!r} does not take a new file "
            f"({e.strerror}); give a checkpoint in a folder this process can write to",
        ) from None
    os.close(fd)
    os.unlink(probe)


def model_items(model: nn.Module) -> dict:
    """The fingerprint items of the model a training run starts from: its module tree and configuration
    (:func:`~pypattern.sampling.checkpoint.model_architecture`), the hooks on its modules (none adds no item), and a
    hash of each parameter and buffer."""
    from .sampling.checkpoint import DTYPE_ITEM, model_architecture, model_dtypes, model_hooks

    hooks = model_hooks(model)
    return {
        "architecture": model_architecture(model),
        **({} if hooks is None else {"hooks": hooks}),
        **{f"weights[{n}]": p for n, p in model.named_parameters()},
        **{f"buffers[{n}]": b for n, b in model.named_buffers()},
        # the dtype of each floating weight and buffer: not compared, but named when a weight differs by its dtype
        # (check_dtypes; a file written without the item resumes as before)
        DTYPE_ITEM: model_dtypes([*model.named_parameters(), *model.named_buffers()]),
    }


def task_items(task) -> dict:
    """A task for a fingerprint: its class, its attributes (tensors by a hash of their values) and, for a class of
    the user's, its methods' code."""
    cls = type(task)
    return {"class": f"{cls.__module__}.{cls.__qualname__}", **io._object_canon(task, 0)}


def _storage(t: torch.Tensor) -> np.ndarray:
    """``t`` as the array written: its own dtype, or the integers of its bits for a dtype numpy lacks (bfloat16)."""
    t = t.detach().to("cpu")
    try:
        return t.numpy()
    except TypeError:
        return t.view(
            {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
        ).numpy()


def _stored_dtype(dtype: torch.dtype) -> np.dtype:
    return _storage(torch.zeros((), dtype=dtype)).dtype


class TrainingSteps:
    """The steps of a training loop, with a progress bar and, with a ``path``, a checkpoint.

    The loop calls :meth:`begin` before a step's work and :meth:`end` after it (the update made, its losses
    logged): between the two the model, optimizer and generators are in mid-step; after :meth:`end` they hold the
    state after the step, which the checkpoint records: every ``EVERY_S`` seconds, at the end of the loop, and
    when the loop stops after a finished step (an exception raised after :meth:`end`, e.g. by a callback). A
    Ctrl-C or SIGTERM that arrives during a step (in the main thread, with Python's own handlers) is held until the
    step ends, which is written, and then raised (:class:`KeyboardInterrupt`, or
    :class:`~pypattern._progress.Terminated`); a second one during the step raises at once. An error inside a step
    leaves the checkpoint as last written.

    Parameters
    ----------
    path : path or None
    fingerprint : mapping
        The run's (:func:`pypattern.io.fingerprint`).
    model, optimizer, generator
        The state a resumed run continues from: every parameter and buffer of ``model``, the optimizer's state
        (AdamW's per-parameter moments and step counts), the ``generator``'s state; with ``random_forward`` (a
        forward that draws from torch's global generator, dropout) also the global generator's (and, for a model
        on a CUDA device, that device's).
    logs : mapping of str to (list, numpy dtype)
        The lists the loop logs into, one entry per logged step; ``logs["steps"]`` holds the logged steps.
    logged : callable ``step -> bool``
        Whether a step is logged (checked against a file's ``steps``).
    total : int
        The number of steps of the run.
    """

    def __init__(
        self,
        path,
        fingerprint: Mapping,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        generator: torch.Generator,
        logs: Mapping[str, tuple[list, type]],
        logged: Callable[[int], bool],
        total: int,
        device: torch.device,
        random_forward: bool,
    ):
        self.path = None if path is None else os.fspath(path)
        if fingerprint is not None and torch.get_default_dtype() != _DEFAULT_DTYPE:
            # the default dtype is the dtype of what the loop makes without one (AdamW's step counts among them):
            # a run resumed under another computes other numbers (an item only when it is not float32, so files
            # of float32 runs match as they did)
            fingerprint = {**fingerprint, "default_dtype": str(torch.get_default_dtype())}
        self.fp, self.model, self.opt, self.g = fingerprint, model, optimizer, generator
        self.logs, self.logged, self.total = logs, logged, total
        self.device, self.random_forward = device, random_forward
        self.next = 0  # the first step not done
        self.seconds = 0.0  # the training time of the steps done before this call
        self.in_step = False
        self.pending: BaseException | None = None
        self.unsaved = False
        self.bar = None
        self._t0 = self._saved_at = time.perf_counter()

    # ------------------------------------------------------------------------------------------- the file
    def _arrays(self) -> dict[str, np.ndarray]:
        arrays = {f"params/{n}": _storage(p) for n, p in self.model.named_parameters()}
        arrays.update({f"buffers/{n}": _storage(b) for n, b in self.model.named_buffers()})
        for i, st in self.opt.state_dict()["state"].items():
            for k, v in st.items():
                arrays[f"optimizer/{i}/{k}"] = _storage(torch.as_tensor(v))
        arrays["rng/generator"] = self.g.get_state().numpy()
        if self.random_forward:
            arrays["rng/torch"] = torch.get_rng_state().numpy()
            if self.device.type == "cuda":
                arrays["rng/cuda"] = torch.cuda.get_rng_state(self.device).numpy()
        for name, (values, dtype) in self.logs.items():
            arrays[f"log/{name}"] = np.asarray(values, dtype=dtype).reshape(len(values))
        return arrays

    def save(self, seconds: float) -> None:
        arrays = self._arrays()
        io.save(
            self.path,
            arrays,
            {
                "checkpoint": {
                    "version": VERSION,
                    "fingerprint": dict(self.fp),
                    "next_step": self.next,
                    "seconds": seconds,
                    # the members written: a file that lost one (a parameter's optimizer state, whose absence
                    # would otherwise read as a parameter not yet updated) is refused, not resumed from
                    "arrays": sorted(arrays),
                }
            },
            kind=KIND,
        )
        self.unsaved = False

    def resume(self) -> int:
        """With a file at ``path``: check that this run wrote it and put its state into the model, the optimizer,
        the generators and the logs; a file of another run is refused (:class:`pypattern.io.FingerprintMismatch`
        naming the first differing item), a damaged one too (:class:`pypattern.io.FormatError`). Returns the first
        step to run (``total`` for a finished run)."""
        if self.path is None or not os.path.exists(self.path):
            return 0
        path = self.path
        arrays, meta = io.load(path, kind=KIND)
        meta = meta.get("checkpoint")

        def bad(what: str) -> io.FormatError:
            return io.FormatError(f"checkpoint {path!r} is damaged: {what}; delete it to start afresh")

        if not isinstance(meta, Mapping):
            raise bad("its header holds no training state")
        if type(meta.get("version")) is not int or meta["version"] != VERSION:  # (True == 1 in Python)
            raise io.FormatError(version_message(path, meta.get("version"), VERSION))
        stored = meta.get("fingerprint")
        try:
            io.check_fingerprint(
                _without_dtypes(stored),
                _without_dtypes(self.fp),
                path,
                defaults={"default_dtype": str(_DEFAULT_DTYPE)},
            )
        except io.FingerprintMismatch as e:
            if e.item.startswith(("weights[", "buffers[")):  # named by its dtype when that is what changed
                check_dtypes(stored, self.fp, path)
            raise _with_weights_hint(e) from None
        nxt, seconds = meta.get("next_step"), meta.get("seconds")
        if isinstance(nxt, bool) or not isinstance(nxt, int) or not 0 <= nxt <= self.total:
            raise bad(f"its next step {nxt!r} is not in 0 .. {self.total}")
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, int | float)
            or not 0 <= seconds < float("inf")
        ):
            raise bad(f"its 'seconds' {seconds!r} is not a time in seconds")

        def get(key: str, like: torch.Tensor | None, shape=None, dtype=None) -> np.ndarray:
            if key not in arrays:
                raise bad(f"it lacks the array {key!r}")
            a = arrays[key]
            shape = tuple(like.shape) if like is not None else shape
            dtype = _stored_dtype(like.dtype) if like is not None else dtype
            if (shape is not None and a.shape != shape) or (dtype is not None and a.dtype != dtype):
                raise bad(
                    f"{key!r} has shape {a.shape} and dtype {a.dtype}, expected {shape} {np.dtype(dtype)}"
                )
            return a

        def tensor(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(a.copy()).view(like.dtype).to(like.device)

        # everything read and checked before anything is written into the model
        params = [(p, get(f"params/{n}", p)) for n, p in self.model.named_parameters()]
        buffers = [(b, get(f"buffers/{n}", b)) for n, b in self.model.named_buffers()]
        known = {f"params/{n}" for n, _ in self.model.named_parameters()}
        known |= {f"buffers/{n}" for n, _ in self.model.named_buffers()}
        extra = [k for k in arrays if k.startswith(("params/", "buffers/")) and k not in known]
        if extra:
            raise bad(f"it holds {extra[0]!r}, which is not a parameter or buffer of this model")
        group_params = [p for group in self.opt.param_groups for p in group["params"]]
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, a in arrays.items():
            if not key.startswith("optimizer/"):
                continue
            _, i, k = (key.split("/", 2) + ["", ""])[:3]
            if not i.isdigit() or int(i) >= len(group_params) or k not in _ADAMW_KEYS:
                raise bad(f"{key!r} is not the optimizer state of a parameter of this model")
            p = group_params[int(i)]
            if k == "step":  # a count, kept as a float tensor
                if a.shape != () or a.dtype.kind != "f":
                    raise bad(f"{key!r} has shape {a.shape} and dtype {a.dtype}, expected one float")
                t = torch.from_numpy(a.copy())
            else:  # a moment of the parameter: its shape and dtype
                t = tensor(get(key, p), p)
            state.setdefault(int(i), {})[k] = t
        for i, st in state.items():  # a parameter's state is whole: AdamW reads every item of it
            group = next(g for g in self.opt.param_groups if any(p is group_params[i] for p in g["params"]))
            want = {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if group.get("amsgrad") else set())
            if set(st) != want:
                raise bad(f"the optimizer state of parameter {i} holds {sorted(st)}, expected {sorted(want)}")
        g_state = get("rng/generator", None, tuple(self.g.get_state().shape), np.uint8)
        rng = {}
        if self.random_forward:
            rng["torch"] = get("rng/torch", None, tuple(torch.get_rng_state().shape), np.uint8)
            if self.device.type == "cuda":
                rng["cuda"] = get(
                    "rng/cuda", None, tuple(torch.cuda.get_rng_state(self.device).shape), np.uint8
                )
        logs = {}
        for name, (_, dtype) in self.logs.items():
            a = get(f"log/{name}", None, None, np.dtype(dtype))
            if a.ndim != 1:
                raise bad(f"'log/{name}' has shape {a.shape}, expected one entry per logged step")
            logs[name] = a.tolist()
        want_steps = [s for s in range(nxt) if self.logged(s)]
        if logs.get("steps") != want_steps or any(len(v) != len(want_steps) for v in logs.values()):
            raise bad(f"its logged steps are not the {len(want_steps)} steps this run logs before step {nxt}")
        listed = meta.get("arrays")
        if listed is not None:  # (a header without the list: the file is checked by its parts alone)
            if not isinstance(listed, list) or not all(isinstance(k, str) for k in listed):
                raise bad("its header's list of arrays is not a list of names")
            missing = sorted(set(listed) - set(arrays))
            if missing:
                raise bad(f"it lacks the array {missing[0]!r} that its header lists")
            unlisted = sorted(set(arrays) - set(listed))
            if unlisted:
                raise bad(f"it holds the array {unlisted[0]!r} that its header does not list")
        # the state, into the model, optimizer and generators
        with torch.no_grad():
            for t, a in (*params, *buffers):
                t.copy_(tensor(a, t))
        self.opt.load_state_dict({"state": state, "param_groups": self.opt.state_dict()["param_groups"]})
        self.g.set_state(torch.from_numpy(g_state.copy()))
        if "torch" in rng:
            torch.set_rng_state(torch.from_numpy(rng["torch"].copy()))
        if "cuda" in rng:
            torch.cuda.set_rng_state(torch.from_numpy(rng["cuda"].copy()), self.device)
        for name, (values, _) in self.logs.items():
            values[:] = logs[name]
        self.next, self.seconds = nxt, float(seconds)
        return nxt

    # ------------------------------------------------------------------------------------------- the loop
    @contextlib.contextmanager
    def running(self, quiet: bool, desc: str):
        """The block runs the steps from :attr:`next` on: the progress bar, the held signals, the timed writes, and
        the write when the block ends (at the end of the run, or stopped after a finished step)."""
        self._t0 = self._saved_at = time.perf_counter()
        with (
            self._held_signals() if self.path is not None else contextlib.nullcontext(),
            progress_bar(
                quiet or self.next >= self.total, total=self.total, initial=self.next, desc=desc, unit="step"
            ) as bar,
        ):
            self.bar = bar
            try:
                yield self
            except BaseException:
                if self.path is not None and not self.in_step and self.unsaved:
                    self.save(self.elapsed())
                raise
        if self.path is not None and (self.unsaved or not os.path.exists(self.path)):
            self.save(self.elapsed())

    def elapsed(self) -> float:
        """Training time in seconds, the steps of earlier calls included."""
        return self.seconds + time.perf_counter() - self._t0

    def begin(self) -> None:
        self.in_step = True

    def end(self, step: int, loss: float | None = None) -> None:
        """Step ``step`` is done: the state is the one after it (written when due); a signal held during the step
        is raised."""
        self.in_step = False
        self.next, self.unsaved = step + 1, self.path is not None
        if self.bar is not None:
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
            self.bar.update(1)
        if self.path is not None and time.perf_counter() - self._saved_at >= EVERY_S:
            self.save(self.elapsed())
            self._saved_at = time.perf_counter()
        if self.pending is not None:
            pending, self.pending = self.pending, None
            raise pending

    @contextlib.contextmanager
    def _held_signals(self):
        """Ctrl-C (SIGINT) and SIGTERM held during a step (see the class); only in the main thread, and only for a
        signal whose handler is Python's own (a handler the program installed is left alone)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        ours = {}
        for sig, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
            try:
                if signal.getsignal(sig) is default:
                    ours[sig] = default
            except (ValueError, OSError, AttributeError):  # pragma: no cover - a platform without the signal
                pass

        def handler(signum, frame):
            if signum == signal.SIGTERM:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process
                exc: BaseException = Terminated("terminated (SIGTERM)")
            else:
                exc = KeyboardInterrupt()
            if self.in_step and self.pending is None:
                self.pending = exc  # raised when the step ends
                return
            raise exc

        for sig in ours:
            signal.signal(sig, handler)
        try:
            yield
        finally:
            for sig, default in ours.items():
                signal.signal(sig, default)


def _without_dtypes(fingerprint):
    """``fingerprint`` without its ``dtype`` item (compared by :func:`~pypattern.sampling.checkpoint.check_dtypes`
    alone, so that a file written without it resumes)."""
    from .sampling.checkpoint import DTYPE_ITEM

    if not isinstance(fingerprint, Mapping):
        return fingerprint
    return {k: v for k, v in fingerprint.items() if k != DTYPE_ITEM}


def _with_weights_hint(e: io.FingerprintMismatch) -> io.FingerprintMismatch:
    """``e`` with what a differing weight or buffer means for a training run: it starts from other weights."""
    if not e.item.startswith(("weights[", "buffers[")):
        return e
    hint = (
        " (the model's weights at the start of the call differ from those the run that wrote the checkpoint started "
        "from: a run resumes from a model made as it was, e.g. with the same seed, not from one trained since)"
    )
    message = str(e)
    cut = message.find(". Use another checkpoint path")
    message = message + hint if cut < 0 else message[:cut] + hint + message[cut:]
    return io.FingerprintMismatch(message, path=e.path, item=e.item, stored=e.stored, current=e.current)
