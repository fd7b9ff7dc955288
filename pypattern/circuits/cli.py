"""``pypattern circuit``: circuit discovery on the built-in induction task, or on a local model and prompt file.

Writes into ``out_dir``: ``edge_scores.csv`` (every edge, every method), ``circuit.csv`` (the edges of the chosen
circuit), ``pruning_curve.png``, ``pruning_curve.csv``, ``circuit.png`` (graph drawing with edge scores) and
``circuit_summary.json`` (what the command prints).

A local model directory holds ``config.json`` (the fields of :class:`~pypattern.models.TransformerConfig`, ``dtype``
as a string such as ``"float32"``) and ``weights.npz`` (or ``model.safetensors``) with the model's ``state_dict``
names, or is a Hugging Face ``save_pretrained`` directory. The prompts are either an ``.npz`` with ``clean`` and
``corrupted`` ``(batch, pos)`` token ids and ``answer`` ``(batch,)`` (optionally ``wrong`` ``(batch,)``: the metric
is then the logit difference, else the answer's log-probability), read at the last position (no other arrays;
corrupted equal to clean, or wrong equal to answer on a prompt, is refused: the scores, or that prompt's metric,
would be 0 whatever the model computes); or a plain token file (``.npy``, ``.npz`` with one array or ``tokens``, or
text: ``.txt``, ``.csv``, ``.tsv``, one sequence of ids per line, as ``pypattern patch --data`` reads), with an
optional ``--corrupted`` token file of the same shape. With a plain token file the metric is the log-probability of
the model's own top prediction on each clean prompt at its last position, and an edge carries the corrupted prompts'
value (resample ablation) or, without them, the mean over the prompts (mean ablation).

Padded prompts: an ``.npz`` token file may hold an ``attention_mask`` array beside its ``tokens`` (or ``input_ids``),
1 at a real token and 0 at padding, on either side (as :func:`~pypattern.experiments.user_model.load_tokens` reads
it with ``with_mask=True``), and a prompt file an ``attention_mask`` of ``clean``'s shape shared by ``clean`` and
``corrupted``. Every circuit function then runs under it (``attention_mask=``: each row's real tokens at positions
``0 .. n-1``), and the metric reads each prompt's last real token: the last column when every row's last column is
real (left padding), else a per-prompt ``position=`` (right padding). A corrupted token file's mask must equal the
data's (one without a mask takes the data's). The mean ablation (no corrupted file) needs right padding: a
left-padded file without ``--corrupted`` is refused. The summary records ``attention_mask: true`` and the metric's
``metric_position``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import zipfile

import numpy as np
import torch

from .._checks import nonfinite_names
from ..io import np_load

__all__ = ["run_circuit_demo", "load_model_dir", "load_prompts", "user_prompts", "main"]


def _named(argument: str, value: str) -> str:
    """How a message names a value: ``--model '/dir'`` for a command-line flag, ``model_dir='/dir'`` otherwise."""
    return f"{argument} {value!r}" if argument.startswith("--") else f"{argument}={value!r}"


def check_device(device, argument: str = "device") -> torch.device:
    """``device`` as a ``torch.device`` that exists here: ``cpu``, or ``cuda``/``cuda:<index>`` where torch sees
    that CUDA device. Raises ValueError naming ``argument`` (the command line passes ``"--device"``) and what would
    be valid: a value torch cannot read as a device, another device type, CUDA where torch reports none, an index
    past the visible devices."""
    name = _named(argument, str(device)) if isinstance(device, str) else f"{argument}={device!r}"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{name} is not a device; give cpu, cuda or cuda:<index>") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ValueError(f"{name}: the {dev.type} device is not supported; give cpu, cuda or cuda:<index>")
    if not torch.cuda.is_available():
        raise ValueError(
            f"{name}: torch reports no usable CUDA device here (torch.cuda.is_available() is False); give cpu"
        )
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise ValueError(
            f"{name}: only {count} CUDA device{'' if count == 1 else 's'} visible; give cuda:0 .. cuda:{count - 1}"
        )
    return dev


def load_model_dir(
    path: str,
    dtype: torch.dtype | None = None,
    *,
    argument: str = "model_dir",
    device: str | torch.device | None = None,
):
    """A :class:`~pypattern.models.Transformer` from ``path/config.json`` and ``path/weights.npz`` (or
    ``path/model.safetensors``), or a Hugging Face ``save_pretrained`` directory (its ``config.json`` names a
    ``model_type``), converted with :func:`pypattern.from_pretrained`. Nothing is unpickled. ``dtype``: load in
    that dtype instead of the saved one. ``device``: move the model there (checked by :func:`check_device`);
    None: where it loads (the CPU).

    Raises
    ------
    FileNotFoundError
        When ``path`` is not a directory, or lacks ``config.json`` or the weights.
    ValueError
        For a pypattern folder whose ``config.json`` is not a :class:`~pypattern.models.TransformerConfig` (unknown
        fields, invalid values), whose weights file cannot be read, or whose weights do not match the config
        (missing or unknown tensors, other shapes). Messages name ``path`` as ``argument`` (the command line
        passes ``"--model"``) and the file.
    """
    from ..models.transformer import Transformer, TransformerConfig

    name = _named(argument, path)
    cfg_path = _check_model_folder(path, argument)
    from ..models.convert import read_config

    cfg = read_config(path, argument)
    if "model_type" in cfg:
        from ..models.convert import from_pretrained

        try:
            model = from_pretrained(path, dtype=dtype)
        except (ValueError, OSError) as e:
            if argument == "path":
                raise
            # from_pretrained names the folder as path='...': name it as the caller's argument instead
            msg = str(e).replace(f"path={path!r}", name)
            raise (FileNotFoundError if isinstance(e, FileNotFoundError) else ValueError)(
                msg if name in msg else f"{name}: {msg}"
            ) from e
        model.eval()
        return _moved(model, device)
    import dataclasses

    known = {f.name for f in dataclasses.fields(TransformerConfig)}
    unknown = sorted(k for k in cfg if k not in known)
    if unknown:
        raise ValueError(
            f"{name}: {cfg_path} has fields TransformerConfig does not know: {unknown} (a Hugging Face config names "
            "its model_type); give the fields of pypattern.models.TransformerConfig"
        )
    if dtype is not None:
        cfg["dtype"] = dtype
    try:
        config = TransformerConfig(**cfg)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{name}: {cfg_path} is not a valid TransformerConfig ({e})") from None
    npz, st = os.path.join(path, "weights.npz"), os.path.join(path, "model.safetensors")
    if os.path.exists(npz):
        weights = npz
        try:
            z = np_load(npz)
            if isinstance(z, np.ndarray):
                raise ValueError("it holds one array, not the state_dict's named arrays")
            with z:
                state = {k: torch.from_numpy(z[k]) for k in z.files}
        except Exception as e:  # a damaged, truncated or pickled file: numpy's or zipfile's own error
            raise ValueError(
                f"{name}: {npz} cannot be read ({type(e).__name__}: {e}); give the model's state_dict saved with "
                "numpy.savez (numeric arrays, nothing pickled)"
            ) from None
    elif os.path.exists(st):
        weights = st
        from safetensors.torch import load_file

        try:
            state = load_file(st)
        except Exception as e:  # a damaged or truncated file: safetensors' own error
            raise ValueError(
                f"{name}: {st} cannot be read ({type(e).__name__}: {e}); give the model's state_dict saved with "
                "safetensors.torch.save_file"
            ) from None
    else:
        raise FileNotFoundError(f"{name} has neither weights.npz nor model.safetensors")
    model = Transformer(config)
    want = model.state_dict()
    missing = [k for k in want if k not in state]
    extra = [k for k in state if k not in want]
    shapes = [
        f"{k} {tuple(state[k].shape)} (the config's {tuple(want[k].shape)})"
        for k in want
        if k in state and tuple(state[k].shape) != tuple(want[k].shape)
    ]
    for what, keys in (
        ("lacks", missing),
        ("holds tensors the config has no place for:", extra),
        ("holds", shapes),
    ):
        if keys:
            more = f" ... ({len(keys)} in all)" if len(keys) > 5 else ""
            raise ValueError(
                f"{name}: {weights} {what} {', '.join(keys[:5])}{more}; the weights do not match {cfg_path}"
            )
    bad = [k for k in want if not (state[k].is_floating_point() or state[k].dtype == want[k].dtype)]
    if bad:
        raise ValueError(
            f"{name}: {weights} holds {state[bad[0]].dtype} values in {bad[0]}; the weights must be floating point"
        )
    nonfinite = nonfinite_names((k, state[k]) for k in want)
    if nonfinite:
        raise ValueError(
            f"{name}: {weights} holds values that are not finite (NaN or infinite) in {nonfinite[0]}"
            + (f" and {len(nonfinite) - 1} other tensors" if len(nonfinite) > 1 else "")
            + "; every computation on the model would be NaN"
        )
    model.load_state_dict(state)
    model.eval()
    return _moved(model, device)


def _check_model_folder(path: str, argument: str) -> str:
    """``path/config.json``; FileNotFoundError naming ``path`` as ``argument`` when ``path`` is no directory or
    holds no config.json (checks that read no file, made before anything else)."""
    name = _named(argument, path)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"{name}: the model directory "
            + ("is a file, not a directory" if os.path.exists(path) else "does not exist")
            + "; give a directory with config.json and the weights (a save_pretrained directory, or pypattern's own)"
        )
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(
            f"{name} has no config.json (fields of TransformerConfig, or a Hugging Face config)"
        )
    return cfg_path


def _moved(model, device):
    """``model`` on ``device`` (checked by :func:`check_device`; None: where it is)."""
    return model if device is None else model.to(check_device(device))


def _ids(z, key: str, path: str, ndim: int) -> torch.Tensor:
    """The integer array ``key`` of an opened prompt file as a LongTensor (never truncated from floats)."""
    arr = z[key]
    if arr.ndim != ndim or arr.size == 0:
        want = "(batch, pos)" if ndim == 2 else "(batch,)"
        raise ValueError(f"tokens={path!r}: {key!r} must be a non-empty {want} array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"tokens={path!r}: {key!r} holds {arr.dtype} values; token ids must be an integer array (ids are not "
            "rounded or truncated)"
        )
    return torch.from_numpy(arr.astype(np.int64))


#: the arrays of a prompt file
_PROMPT_ARRAYS = ("clean", "corrupted", "answer", "wrong")


def load_prompts(
    path: str,
    *,
    vocab_size: int | None = None,
    n_ctx: int | None = None,
    rotary_limit: int | None = None,
    with_mask: bool = False,
):
    """``(clean, corrupted, metric)`` from a prompt file (see the module docstring).

    ``with_mask=True`` returns ``(clean, corrupted, metric, attention_mask)`` and reads an optional
    ``attention_mask`` array (1 at a real token, 0 at padding, on either side; clean's shape), shared by the clean
    and corrupted prompts (None when the file has none): the metric then reads each prompt's last real token (the
    last column unless a row is right-padded: per-prompt positions), and corrupted prompts equal to the clean ones
    on every real token are refused. Without ``with_mask`` an ``attention_mask`` array is refused (its padding
    would be read as text).

    Raises
    ------
    ValueError
        Naming the file and the array when an array is missing, not an integer array, of the wrong shape (clean
        and corrupted ``(batch, pos)`` of one shape, answer and wrong ``(batch,)``), when ids are negative or not
        below ``vocab_size``, or when prompts are longer than ``n_ctx`` (learned positions) or ``rotary_limit``
        (the positions the model's LongRoPE or dynamic NTK scaling holds for); when the file holds arrays other
        than these four; and when the scores would be 0 whatever the model computes: corrupted equal to clean
        (every edge carries its clean value), or wrong equal to answer on a prompt (its logit difference is 0).
    """
    from ..patching import LogitDiff, LogProb

    try:
        z = np_load(path)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"tokens={path!r}: cannot read the prompt file ({e})") from None
    if isinstance(z, np.ndarray):
        raise ValueError(
            f"tokens={path!r} holds one array; a prompt file is an .npz with clean, corrupted, answer"
        )
    with z:
        missing = [k for k in ("clean", "corrupted", "answer") if k not in z.files]
        if missing:
            raise ValueError(
                f"tokens={path!r} lacks {missing}; it needs clean, corrupted, answer (and wrong)"
            )
        known = (*_PROMPT_ARRAYS, "attention_mask") if with_mask else _PROMPT_ARRAYS
        extra = [k for k in z.files if k not in known]
        if extra:
            raise ValueError(
                f"tokens={path!r} holds {extra} besides {[k for k in known if k in z.files]}, which "
                "circuit does not read; keep only clean, corrupted, answer (and wrong"
                + (", attention_mask)" if with_mask else ")")
                + (
                    " (load_prompts(..., with_mask=True) reads an attention_mask)"
                    if "attention_mask" in extra
                    else ""
                )
            )
        try:
            clean = _ids(z, "clean", path, 2)
            corr = _ids(z, "corrupted", path, 2)
            ans = _ids(z, "answer", path, 1)
            wrong = _ids(z, "wrong", path, 1) if "wrong" in z.files else None
            raw_mask = z["attention_mask"] if "attention_mask" in z.files else None
        except ValueError as e:
            if str(e).startswith("tokens="):
                raise
            raise ValueError(f"tokens={path!r}: cannot read the prompt file ({e})") from None
    if corr.shape != clean.shape:
        raise ValueError(
            f"tokens={path!r}: corrupted has shape {tuple(corr.shape)}; it must match clean's {tuple(clean.shape)}"
        )
    for key, t in (("answer", ans), ("wrong", wrong)):
        if t is not None and t.shape != (clean.shape[0],):
            raise ValueError(
                f"tokens={path!r}: {key} has shape {tuple(t.shape)}; it needs one id per prompt ({clean.shape[0]},)"
            )
    for key, t in (("clean", clean), ("corrupted", corr), ("answer", ans), ("wrong", wrong)):
        if t is None:
            continue
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or (vocab_size is not None and hi >= vocab_size):
            raise ValueError(
                f"tokens={path!r}: {key} ids must lie in [0, {vocab_size if vocab_size is not None else 'vocab'}) "
                f"for this model; found {lo}..{hi}"
            )
    mask = None
    if raw_mask is not None:
        from pathlib import Path

        from ..experiments.user_model import _checked_mask

        mask = _checked_mask(raw_mask, tuple(clean.shape), Path(path), "tokens", "clean")
    real = None if mask is None else mask.bool()
    if torch.equal(corr, clean) if real is None else torch.equal(corr[real], clean[real]):
        raise ValueError(
            f"tokens={path!r}: corrupted equals clean"
            + ("" if real is None else " on every real token (attention_mask 1)")
            + ": every edge would carry its clean value, so every score is 0; give corrupted prompts that differ "
            "from the clean ones"
        )
    if wrong is not None:
        same = torch.nonzero(wrong == ans).ravel().tolist()
        if same:
            which = (
                "every prompt"
                if len(same) == len(ans)
                else f"{len(same)} of {len(ans)} prompts (the first: {same[0]})"
            )
            raise ValueError(
                f"tokens={path!r}: wrong equals answer on {which}: the logit difference there is 0 whatever the "
                "model computes; give a wrong id other than the answer on every prompt, or leave wrong out (the "
                "metric is then the answer's log-probability)"
            )
    if n_ctx is not None and clean.shape[1] > n_ctx:
        from ..experiments.user_model import check_token_limits, has_padding

        if not has_padding(mask):
            raise ValueError(
                f"tokens={path!r}: prompts have {clean.shape[1]} tokens; the model's n_ctx is {n_ctx}"
            )
        # under a mask with padding the learned positions bound each row's real tokens (read at 0 .. n-1)
        check_token_limits(clean, path, n_ctx=n_ctx, argument="tokens", attention_mask=mask)
    if rotary_limit is not None and clean.shape[1] > rotary_limit:
        from ..experiments.user_model import length_check_error

        raise length_check_error(path, "tokens", clean.shape[1], None, rotary_limit)
    position = metric_position(mask)
    metric = LogitDiff(ans, wrong, position) if wrong is not None else LogProb(ans, position)
    return (clean, corr, metric, mask) if with_mask else (clean, corr, metric)


def metric_position(mask: torch.Tensor | None) -> int | torch.Tensor:
    """Where a metric reads each prompt under the ``attention_mask`` ``mask``: its last real token. ``-1`` (the
    last column) without a mask or when every row's last column is real (no padding, or left padding); else the
    per-prompt columns of the last real tokens, a LongTensor ``(batch,)`` (right padding)."""
    if mask is None:
        return -1
    from ..patching.api import last_real_positions

    last = last_real_positions(mask)
    return -1 if bool((last == mask.shape[1] - 1).all()) else last


def _position_text(position) -> str | list[int]:
    """A metric position as the summary records it."""
    if isinstance(position, int):
        return "the last column (each prompt's last real token)"
    return [int(v) for v in position]


def user_prompts(model, tokens: str, corrupted: str | None = None, *, with_mask: bool = False):
    """``(clean, corrupted, metric, ablation)`` for ``model`` from a prompt file (see the module docstring): an
    ``.npz`` with ``clean``, ``corrupted`` and ``answer`` as :func:`load_prompts` reads, or a plain token file with
    an optional corrupted token file. ``model=None``: each token file checked alone, without a model (format,
    dtype, shape, ids >= 0, a left-padded mask without a corrupted file), before one is loaded (a prompt file is checked once the model
    is); returns None.

    ``with_mask=True`` returns ``(clean, corrupted, metric, ablation, attention_mask)`` and reads the files'
    ``attention_mask`` arrays (:func:`~pypattern.experiments.user_model.load_tokens` with ``with_mask=True``, or a
    prompt file's, :func:`load_prompts`); None when the data has none. A corrupted token file's mask must equal the
    data's (:func:`~pypattern.experiments.user_model.check_same_mask`; one without a mask takes the data's). The
    metric reads each prompt's last real token (:func:`metric_position`); the model's own top prediction there is
    computed under the mask (each row's real tokens at positions ``0 .. n-1``). Without a corrupted file, a
    left-padded mask is refused: the mean ablation averages each column over the prompts, and the columns of
    left-padded prompts hold tokens at other positions of their prompts. Without ``with_mask`` a file holding an
    ``attention_mask`` is refused (its padding would be read as text)."""
    from ..experiments.user_model import (
        check_same_mask,
        check_token_limits,
        left_padded,
        load_tokens,
        token_limits,
    )
    from ..patching import LogProb

    limits = {} if model is None else token_limits(model)
    if tokens.lower().endswith(".npz"):
        full = False  # a file that cannot be read as prompts: load_tokens says why
        with contextlib.suppress(ValueError, OSError, EOFError, zipfile.BadZipFile):
            z = np_load(tokens)
            if not isinstance(z, np.ndarray):
                with z:
                    full = "clean" in z.files
        if full:
            if model is None:
                return None
            if corrupted is not None:
                raise ValueError(
                    f"corrupted={corrupted!r} is not read with tokens={tokens!r}, a prompt file holding its own "
                    "corrupted prompts; give one or the other (a plain token file of clean prompts reads a "
                    "corrupted file)"
                )
            if not with_mask:
                return (*load_prompts(tokens, **limits), "resample")
            clean, corr, metric, mask = load_prompts(tokens, **limits, with_mask=True)
            return clean, corr, metric, "resample", mask
    if with_mask:
        clean, mask = load_tokens(tokens, **limits, with_mask=True)
    else:
        clean, mask = load_tokens(tokens, **limits), None
    corr = None
    if corrupted is not None:
        if with_mask:
            # its lengths checked under the data's mask, which it shares (a file without a mask takes the data's)
            corr, corr_mask = load_tokens(
                corrupted, **{**limits, "n_ctx": None}, argument="corrupted", with_mask=True
            )
            if model is not None and corr.shape == clean.shape:
                check_token_limits(corr, corrupted, **limits, argument="corrupted", attention_mask=mask)
        else:
            corr, corr_mask = load_tokens(corrupted, **limits, argument="corrupted"), None
    elif left_padded(mask):
        row = int((mask.bool()[:, 1:] & ~mask.bool()[:, :-1]).any(-1).nonzero()[0, 0])
        raise ValueError(
            f"tokens={tokens!r} is left-padded (its attention_mask has padding before a real token in row {row}): "
            "without a corrupted file an edge carries its mean over the prompts at each column, and the columns of "
            "left-padded prompts hold tokens at other positions of their prompts; give corrupted prompts of the "
            "same mask (--corrupted FILE) or pad the prompts on the right"
        )
    if model is None:
        return None
    real = None if mask is None else mask.bool()
    if corr is not None:
        if corr.shape != clean.shape:
            raise ValueError(
                f"corrupted={corrupted!r} has shape {tuple(corr.shape)}; it must match that of the clean prompts, "
                f"tokens={tokens!r}: {tuple(clean.shape)}"
            )
        try:
            check_same_mask(corrupted, corr_mask, tokens, mask)
        except ValueError as e:  # the data named as this function's argument, tokens=
            raise ValueError(str(e).replace(f"data={str(tokens)!r}", f"tokens={str(tokens)!r}")) from None
        if torch.equal(corr, clean) if real is None else torch.equal(corr[real], clean[real]):
            raise ValueError(
                f"corrupted={corrupted!r} equals the token file tokens={tokens!r}"
                + ("" if real is None else " on every real token (attention_mask 1)")
                + ": every edge would carry its clean value, so every score is 0; give corrupted prompts that "
                "differ from the clean ones"
            )
    elif _same_prompts(clean, real):
        what = "one prompt" if clean.shape[0] == 1 else f"{clean.shape[0]} prompts, all the same"
        raise ValueError(
            f"tokens={tokens!r} holds {what}"
            + ("" if real is None else " on their real tokens (attention_mask 1)")
            + ": without a corrupted file an edge carries its mean over the prompts, which is then each prompt's "
            "own value, so every score is 0; give at least two different prompts or a corrupted file (--corrupted)"
        )
    from .._checks import model_device

    position = metric_position(mask)
    dev = model_device(model, clean.device)
    from ..patching.api import masking_kwargs

    # each row's real tokens at positions 0 .. n-1, as the circuit functions run them
    masking = masking_kwargs(model, None if mask is None else mask.bool(), dev)
    with torch.no_grad():  # run where the model is; the answers kept on the CPU, as a prompt file's are
        logits = model(clean.to(dev), **masking)
        rows = torch.arange(clean.shape[0], device=logits.device)
        at = logits[:, -1] if isinstance(position, int) else logits[rows, position.to(logits.device)]
        answer = at.argmax(-1).cpu()
    ablation = "resample" if corr is not None else "mean"
    metric = LogProb(answer, position)
    return (clean, corr, metric, ablation, mask) if with_mask else (clean, corr, metric, ablation)


def _same_prompts(clean: torch.Tensor, real: torch.Tensor | None) -> bool:
    """Whether the prompts ``clean`` are all the same where they are real (``real``: the mask as bools; None: every
    token): at each column, every prompt real there holds the same id (right-padded prompts that are prefixes of
    one another run alike at each real token)."""
    if real is None:
        return bool((clean == clean[:1]).all())
    for col in range(clean.shape[1]):
        ids = clean[real[:, col], col]
        if ids.numel() and not bool((ids == ids[0]).all()):
            return False
    return True


def _upcast(model_dir: str, model, argument: str = "model_dir", device=None):
    """A half-precision model (most checkpoints are saved in bfloat16) as its exact float32 copy (on ``device``),
    with a warning: edge scores and patched metrics computed in half precision are mostly rounding noise."""
    if model.cfg.dtype in (torch.float32, torch.float64):
        return model
    import warnings

    warnings.warn(
        f"{_named(argument, model_dir)} holds {model.cfg.dtype} weights and edge scores computed in half precision are "
        "mostly rounding noise: scoring its float32 copy (the weights upcast exactly)",
        UserWarning,
        stacklevel=3,
    )
    return load_model_dir(model_dir, dtype=torch.float32, argument=argument, device=device)


def run_circuit_demo(
    out_dir: str = "out/circuit",
    model_dir: str | None = None,
    tokens: str | None = None,
    corrupted: str | None = None,
    methods=("eap", "eap-ig", "exact"),
    fraction: float = 0.05,
    per_position: bool | None = None,
    ig_steps: int = 5,
    seed: int = 0,
    steps: int = 800,
    threads: int | None = 1,
    quiet: bool = True,
    model_argument: str = "model_dir",
    checkpoint: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
) -> dict:
    """Score every edge, draw the pruning curves and the circuit of the top ``fraction`` of edges.

    With neither ``model_dir`` nor ``tokens``: a 2-layer attention-only model trained on the built-in induction
    task (per-position edges; see :func:`~pypattern.circuits.experiments.run_induction_circuit`). The circuit
    drawn is the top ``fraction`` by the last method in ``methods`` (``fraction`` times the number of edges,
    rounded; a fraction that rounds to no edge takes the top edge, with a warning); ``methods`` are method names, or
    one string of them comma-separated as ``--methods`` takes them. A half-precision model is scored as its float32
    copy (with a warning). ``quiet=False`` reports each stage (training, each method's scores, the pruning curve)
    on stderr as it finishes. ``model_argument``: how errors name ``model_dir`` (the command line: ``"--model"``).
    ``checkpoint``: with ``model_dir``, a folder keeping the long stages' work as it is done: the exact method's
    scores (``exact_edge_scores.npz``, see :func:`~pypattern.circuits.edge_attribution`) and the pruning curve's
    circuits (``pruning_curve.npz``, see :func:`~pypattern.circuits.pruning_curve`); a stop by Ctrl-C or SIGTERM
    writes them too. The same call with the same folder resumes, computing only the rest (a finished stage is read
    back); a call with another model, prompts or settings is refused
    (:class:`pypattern.io.FingerprintMismatch` naming what differs). ``quiet`` also hides the progress bars of the
    exact scores, the pruning curve and (a Hugging Face folder) transformers' loading of the weights. ``threads``:
    torch's thread count while the command runs (None: torch's setting as it is). ``ig_steps``: an int >= 1.
    ``device``: with ``model_dir``, the device the model is scored on (``cpu``, ``cuda``, ``cuda:<index>``; None:
    the CPU); the built-in task trains and scores on the CPU.

    Returns
    -------
    dict
        Faithfulness of each method at ``fraction``, the circuit's top edges, timings and the written paths.
    """
    from .._threads import pinned_threads
    from .api import _METHODS, edge_attribution, faithfulness, pruning_curve
    from .experiments import run_induction_circuit

    if (model_dir is None) != (tokens is None):
        raise ValueError("give both model_dir=... and tokens=..., or neither (the built-in induction task)")
    if corrupted is not None and tokens is None:
        raise ValueError("corrupted=... needs model_dir=... and tokens=...")
    # a string is read as the command line's --methods: comma-separated names (one name alone is one method)
    methods = tuple(m.strip() for m in methods.split(",")) if isinstance(methods, str) else tuple(methods)
    methods = tuple(dict.fromkeys(methods))  # each method once
    bad = [m for m in methods if m not in _METHODS]
    if not methods or bad:
        raise ValueError(f"methods={list(methods)!r} is not valid; choose one or more of {list(_METHODS)}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction!r} is not valid; give a number in (0, 1]")
    if model_dir is not None:  # the built-in task's training settings: nothing to train
        given = [f"{k}={v!r}" for k, v, d in (("seed", seed, 0), ("steps", steps, 800)) if v != d]
        if given:
            raise ValueError(
                f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to the built-in task's training "
                "only; with model_dir=... leave them out"
            )
    from .._checks import is_count

    if not is_count(ig_steps) or ig_steps < 1:
        raise ValueError(
            f"ig_steps={ig_steps!r} is not valid; give the interpolation steps of eap-ig as an int >= 1"
        )
    if threads is not None and (not is_count(threads) or threads < 1):
        raise ValueError(
            f"threads={threads!r} is not valid; give the number of threads as an int >= 1, or None (torch's "
            "setting)"
        )
    if ig_steps != 5 and "eap-ig" not in methods:
        raise ValueError(
            f"ig_steps={ig_steps!r} is the interpolation steps of eap-ig, which methods={list(methods)!r} does not "
            "hold; leave it out or add 'eap-ig'"
        )
    if device is not None:
        device_name = "--device" if model_argument.startswith("--") else "device"
        if model_dir is None:
            raise ValueError(
                f"{_named(device_name, str(device))} applies with model_dir=... and tokens=... only; the built-in "
                "task trains and scores on the CPU"
            )
        device = check_device(device, device_name)
    from ..experiments.user_model import out_folder

    out_folder(out_dir, "out_dir")
    if checkpoint is not None:
        if model_dir is None:
            raise ValueError("checkpoint=... applies with model_dir=... and tokens=... only")
        out_folder(checkpoint, "checkpoint")
    t_last = [time.perf_counter()]

    def say(msg: str) -> None:
        if not quiet:
            now = time.perf_counter()
            print(f"circuit: {msg} ({now - t_last[0]:.1f} s)", file=sys.stderr, flush=True)
            t_last[0] = now

    with pinned_threads(threads):
        t0 = time.perf_counter()
        extra = {}
        masking = {}  # the runs' attention mask (a token file's, with model_dir)
        if model_dir is None:
            pp = True if per_position is None else per_position
            if not quiet:
                print(
                    f"circuit: training the built-in induction model ({steps} steps) and scoring its edges with "
                    f"{', '.join(methods)} ...",
                    file=sys.stderr,
                    flush=True,
                )
            res = run_induction_circuit(
                seed=seed, steps=steps, per_position=pp, methods=methods, ig_steps=ig_steps, quiet=quiet
            )
            say("trained, edges scored and pruning curve done")
            model, (clean, corr, metric) = res["model"], res["prompts"]
            scores, curve = res["scores"], res["curve"]
            extra = {
                "task": "induction (built-in)",
                # None / []: no head's attention reaches the role's threshold (see run_induction_circuit)
                "previous_token_head": None if res["prev_head"] is None else f"L0H{res['prev_head']}",
                "induction_heads": [f"L1H{h}" for h in res["induction_heads"]],
                "roles_found": res["roles_found"],
                "prefix_matching_score_layer1": [round(x, 3) for x in res["prefix_matching_score"][1]],
                "previous_token_score_layer0": [round(x, 3) for x in res["previous_token_score"][0]],
                "key_composition_in_top_5pct": res["key_composition_in_top_5pct"],
            }
        else:
            from ..cli import _quiet_transformers

            # the model folder's name, then the prompt files, checked before the model is loaded
            _check_model_folder(model_dir, model_argument)
            user_prompts(None, tokens, corrupted, with_mask=True)
            # transformers' bar of loading the weights quiet too; the model (and an upcast copy) on the device
            with _quiet_transformers(quiet):
                model = _upcast(
                    model_dir,
                    load_model_dir(model_dir, argument=model_argument, device=device),
                    model_argument,
                    device,
                )
            clean, corr, metric, ablation, mask = user_prompts(model, tokens, corrupted, with_mask=True)
            # the runs under the files' attention mask (none: as without one)
            masking = {} if mask is None else {"attention_mask": mask}
            say(f"loaded {model_dir} and {clean.shape[0]} prompts of {clean.shape[1]} tokens")
            pp = False if per_position is None else per_position
            scores = {}
            for m in methods:
                scores[m] = edge_attribution(
                    model,
                    clean,
                    corr,
                    metric=metric,
                    method=m,
                    **({"steps": ig_steps} if m == "eap-ig" else {}),
                    per_position=pp,
                    ablation=ablation,
                    quiet=quiet,
                    **masking,
                    **(
                        {"checkpoint": os.path.join(checkpoint, "exact_edge_scores.npz")}
                        if m == "exact" and checkpoint is not None
                        else {}
                    ),
                )
                say(f"{m}: scored {len(scores[m].graph)} edges")
            curve = pruning_curve(
                model,
                scores,
                clean,
                corr,
                metric=metric,
                ablation=ablation,
                quiet=quiet,
                checkpoint=None if checkpoint is None else os.path.join(checkpoint, "pruning_curve.npz"),
                **masking,
            )
            say("pruning curve done")
            extra = {"task": f"{model_dir} on {tokens}", "ablation": ablation}
            if mask is not None:
                extra["attention_mask"] = True
                extra["metric_position"] = _position_text(metric.position)
        chosen = methods[-1]
        # the top fraction of the edges, rounded; at least the top edge (a circuit of no edge is no circuit)
        num_edges = len(scores[chosen].graph)
        size = int(round(fraction * num_edges))
        if size == 0:
            import warnings

            given = _named("--fraction" if model_argument.startswith("--") else "fraction", fraction)
            warnings.warn(
                f"{given} of the {num_edges} edges rounds to no edge: the circuit holds the top edge",
                UserWarning,
                stacklevel=2,
            )
            size = 1
        circuit = scores[chosen].circuit(n=size)
        ablation_used = extra.get("ablation", "resample")
        circuit.faithfulness = faithfulness(
            model, circuit.mask, clean, corr, metric=metric, ablation=ablation_used, **masking
        )
        # each method's circuit of the same fraction (the pruning grid need not hold it)
        at_fraction = {
            m: circuit.faithfulness
            if m == chosen
            else faithfulness(
                model,
                scores[m].circuit(n=size).mask,
                clean,
                corr,
                metric=metric,
                ablation=ablation_used,
                **masking,
            )
            for m in methods
        }
        seconds = time.perf_counter() - t0
    paths = {
        "edge_scores": os.path.join(out_dir, "edge_scores.csv"),
        "circuit_table": os.path.join(out_dir, "circuit.csv"),
        "pruning_curve": os.path.join(out_dir, "pruning_curve.png"),
        "pruning_table": os.path.join(out_dir, "pruning_curve.csv"),
        "circuit_drawing": os.path.join(out_dir, "circuit.png"),
        "summary": os.path.join(out_dir, "circuit_summary.json"),
    }
    import pandas as pd

    pd.concat([sc.to_pandas() for sc in scores.values()]).to_csv(paths["edge_scores"], index=False)
    circuit.to_pandas().to_csv(paths["circuit_table"], index=False)
    curve.to_pandas().to_csv(paths["pruning_table"], index=False)
    curve.plot(path=paths["pruning_curve"])
    circuit.draw(path=paths["circuit_drawing"])
    result = {
        **extra,
        "num_edges": len(circuit.graph),
        "per_position": circuit.graph.per_position,
        "circuit_method": chosen,
        "circuit_edges": len(circuit),
        "circuit_faithfulness": circuit.faithfulness,
        "faithfulness_at_fraction": {m: float(v) for m, v in at_fraction.items()},
        "top_edges": [str(r) for r in circuit.to_pandas()["name"][:8]],
        "seconds": round(seconds, 2),
        **paths,
    }
    from ..io import json_text

    with open(paths["summary"], "w") as f:  # what the command prints, in standard JSON
        f.write(json_text(result, default=str) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    """``pypattern circuit`` on ``argv`` for a caller in Python: the result printed as JSON; an error met while
    running raises (``python -m pypattern.circuits.cli``, a program, runs as ``pypattern circuit`` does: such an
    error ends in one line and exit status 2, Ctrl-C and SIGTERM write the checkpoint first)."""
    p = argparse.ArgumentParser(prog="pypattern circuit", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    check_args(p, args)
    res = run_from_args(args)
    from ..io import json_text

    print(json_text(res, default=str))
    return 0


def _methods(text: str) -> tuple[str, ...]:
    """``--methods``: a non-empty comma-separated list of eap, eap-ig, exact."""
    from .api import _METHODS

    methods = tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    bad = [m for m in methods if m not in _METHODS]
    if not methods or bad:
        raise argparse.ArgumentTypeError(
            f"give one or more of {', '.join(_METHODS)} (comma-separated), got {text!r}"
        )
    return methods


#: flags that apply to the built-in task only (seed, steps) and with --model only (corrupted): name -> default
_BUILTIN_ONLY = {"seed": ("--seed", 0), "steps": ("--steps", 800)}
_MODEL_ONLY = {
    "corrupted": ("--corrupted", None),
    "checkpoint": ("--checkpoint", None),
    "device": ("--device", None),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``pypattern circuit`` (for the main command line's sub-parser)."""
    from ..cli import device_type, fraction, positive_int, seed_int

    p.add_argument(
        "--out", default="out/circuit", help="folder for the tables and plots (default: out/circuit)"
    )
    p.add_argument(
        "--model-dir",
        "--model",
        dest="model_dir",
        default=None,
        metavar="DIR",
        help="a Hugging Face save_pretrained directory (converted exactly; a bfloat16 or float16 checkpoint is "
        "scored as its exact float32 copy, with a warning), or config.json + weights.npz of a pypattern "
        "Transformer; needs --data; default: the built-in induction task",
    )
    p.add_argument(
        "--tokens",
        "--data",
        dest="tokens",
        default=None,
        metavar="FILE",
        help="with --model: .npz with integer arrays clean, corrupted, answer[, wrong, attention_mask] (no other; "
        "corrupted equal to clean, or wrong equal to answer, is refused); or a token file (.npy, .npz, text: .txt, "
        ".csv, .tsv) of clean prompts; an .npz's attention_mask (padding on either side) is passed to every circuit "
        "function and the metric reads each prompt's last real token",
    )
    p.add_argument(
        "--corrupted",
        default=None,
        metavar="FILE",
        help="with --model and a token file: corrupted prompts of the same shape and attention_mask (default: "
        "mean ablation over the prompts, which left-padded prompts cannot take)",
    )
    p.add_argument(
        "--methods",
        type=_methods,
        default=("eap", "eap-ig", "exact"),
        help="comma-separated: eap, eap-ig, exact (default: all three; the circuit drawn is the last one's)",
    )
    p.add_argument(
        "--fraction",
        type=fraction,
        default=0.05,
        help="fraction of edges in the drawn circuit, in (0, 1] (default: 0.05); one that rounds to no edge "
        "takes the top edge, with a warning",
    )
    p.add_argument(
        "--ig-steps",
        type=positive_int,
        default=None,
        help="interpolation steps of EAP-IG, with eap-ig among --methods (default: 5)",
    )
    p.add_argument(
        "--per-position",
        choices=["auto", "yes", "no"],
        default="auto",
        help="one edge per position (yes), one per node pair (no), or the task's choice (auto: yes on the "
        "built-in task, no with --model)",
    )
    p.add_argument(
        "--seed",
        type=seed_int,
        default=None,
        help="built-in task only: seed of the model's training (default: 0)",
    )
    p.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="built-in task only: training steps of the model (default: 800)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"built-in task only: a model trained for {QUICK_STEPS} steps (a check that it runs in seconds; its "
        "circuit means little)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        metavar="N",
        help="torch's thread count while the command runs (default: torch's own count, which follows "
        "OMP_NUM_THREADS, with --model; 1 on the built-in task)",
    )
    p.add_argument(
        "--device",
        type=device_type,
        default=None,
        metavar="DEV",
        help="with --model: where the model is scored: cpu (the default), cuda or cuda:<index>",
    )
    p.add_argument(
        "--checkpoint",
        metavar="DIR",
        default=None,
        help="with --model: a folder keeping the long stages' work as it is done, the exact scores "
        "(exact_edge_scores.npz, with exact among --methods) and the pruning curve (pruning_curve.npz); the same "
        "command with the same folder resumes a stopped run (Ctrl-C or SIGTERM), skipping the work done, and a run "
        "with other settings, model or prompts is refused",
    )


#: training steps of the built-in task's model with --quick
QUICK_STEPS = 60


def check_args(p: argparse.ArgumentParser, args) -> None:
    """Refuse empty paths and flags given where they do not apply (through ``p.error``), then fill in their
    defaults."""
    from ..cli import refuse_empty_paths

    refuse_empty_paths(p, args)
    if args.model_dir and not args.tokens:
        p.error("--model needs --data FILE (a prompt .npz or a token file)")
    if args.tokens and not args.model_dir:
        p.error("--data needs --model DIR (the model to score on it)")
    table, where = (
        (_BUILTIN_ONLY, "only to the built-in task, not with --model")
        if args.model_dir
        else (
            _MODEL_ONLY,
            "only with --model DIR --data FILE",
        )
    )
    wrong = [flag for dest, (flag, _) in table.items() if getattr(args, dest) is not None]
    if args.model_dir and getattr(args, "quick", False):
        wrong.append("--quick")
    if getattr(args, "quick", False) and args.steps is not None:
        p.error("--quick sets the training steps; give --quick or --steps, not both")
    if wrong:
        p.error(f"{', '.join(wrong)} {'applies' if len(wrong) == 1 else 'apply'} {where}")
    for dest, (_, default) in _BUILTIN_ONLY.items():
        if getattr(args, dest) is None:
            setattr(args, dest, default)
    if getattr(args, "quick", False):
        args.steps = QUICK_STEPS
    if getattr(args, "ig_steps", None) is not None and "eap-ig" not in args.methods:
        p.error(f"--ig-steps applies only with eap-ig among --methods (given: {','.join(args.methods)})")


def run_from_args(args) -> dict:
    pp = {"auto": None, "yes": True, "no": False}[args.per_position]
    return run_circuit_demo(
        args.out,
        model_dir=args.model_dir,
        tokens=args.tokens,
        corrupted=args.corrupted,
        methods=args.methods,
        fraction=args.fraction,
        per_position=pp,
        ig_steps=5 if args.ig_steps is None else args.ig_steps,
        seed=0 if args.seed is None else args.seed,
        steps=800 if args.steps is None else args.steps,
        quiet=getattr(args, "quiet", False),
        model_argument="--model",
        checkpoint=getattr(args, "checkpoint", None),
        # --threads; else torch's own count on a model of the user's, one thread on the built-in task's small model
        threads=getattr(args, "threads", None) or (None if args.model_dir else 1),
        device=getattr(args, "device", None),
    )


if __name__ == "__main__":
    from ..cli import _main

    raise SystemExit(_main(["circuit", *sys.argv[1:]], program=True))
