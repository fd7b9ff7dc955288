"""The command line on a user's own model and data: ``pypattern llc|patch|chi --model DIR --data FILE``.

``DIR`` is a local Hugging Face ``save_pretrained`` directory (safetensors; nothing is downloaded) of an architecture
in :data:`pypattern.models.convert.SUPPORTED_CLASSES`, converted exactly into pypattern's
:class:`~pypattern.models.Transformer` with :func:`pypattern.from_pretrained`, or the folder of a pypattern
``Transformer`` (:func:`pypattern.circuits.cli.load_model_dir`). ``FILE`` holds token ids
``(num_sequences, seq_len)``: ``.npy``, ``.npz`` (the array ``tokens`` or ``input_ids``, or its only array, with
an optional ``attention_mask`` of the same shape, 1 at real tokens and 0 at padding on either side; no other array;
never unpickled), or a
text file (``.txt``, ``.csv``, ``.tsv``; UTF-8) with one sequence of whitespace- or comma-separated ids per line (all
of one length); other suffixes, a file without a suffix and a binary file named as text are refused, with a hint at
the format the file holds.
"""

from __future__ import annotations

import os
import re
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..io import np_load

__all__ = [
    "MaskedTokens",
    "llc_error_text",
    "load_tokens",
    "out_folder",
    "run_user_chi",
    "run_user_llc",
    "run_user_patch",
]


#: suffixes read as text (one sequence of whitespace- or comma-separated ids per line)
TEXT_SUFFIXES = (".txt", ".csv", ".tsv")
_FORMATS = "give .npy, .npz or a text file (.txt, .csv, .tsv: one sequence of integer ids per line)"


#: the hints for what torch.save writes: a zip archive whose pickle is ``<archive>/data.pkl``, or (its legacy
#: format) a plain pickle
_TORCH_SAVE = (
    "it is a torch.save file, a pickle that pypattern never loads (unpickling can run code): save the ids with "
    "numpy.save (.npy) instead"
)
_PICKLE = (
    "it is a pickle (as pickle.dump and torch.save's legacy format write), which pypattern never loads "
    "(unpickling can run code): save the ids with numpy.save (.npy) instead"
)


def _binary_format(path: str | os.PathLike, head: bytes) -> str | None:
    """The binary format of the file ``path``, which starts with ``head``, as a hint for a file named otherwise:
    NumPy's ``.npy``, torch.save's zip archive (members ``*/data.pkl``) or a pickle (never loaded, whatever the
    name), or another zip archive (``.npz``); None for anything else."""
    if head.startswith(b"\x93NUMPY"):
        return "it starts as a NumPy .npy file: name it with the suffix .npy"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (OSError, zipfile.BadZipFile, ValueError):
            names = []
        if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return _TORCH_SAVE
        return "it is a zip archive, as numpy.savez writes: name it with the suffix .npz"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):  # PROTO opcode
        return _PICKLE
    return None


#: the names an ``.npz`` token array is read under: ``tokens``, or ``input_ids`` (a tokenizer's output saved with
#: ``np.savez(path, **enc)``)
TOKEN_ARRAYS = ("tokens", "input_ids")


def _npz_array(z, with_mask: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """The token array of an ``.npz`` read by :func:`pypattern.io.np_load` (which refuses a zip archive whose
    members are not NumPy arrays): ``tokens``, else ``input_ids``, else its only array; and, with ``with_mask``,
    its ``attention_mask`` array beside them (None without one). Any other array is refused, and an
    ``attention_mask`` without ``with_mask`` (the reader would score its padding as text)."""
    keys = list(z.files)
    key = next((k for k in TOKEN_ARRAYS if k in keys), keys[0] if len(keys) == 1 else None)
    if key is None:
        raise ValueError(f"it holds {keys}: name the token array 'tokens' (or 'input_ids') or keep only one")
    mask_key = (
        "attention_mask" if with_mask and key != "attention_mask" and "attention_mask" in keys else None
    )
    others = [k for k in keys if k not in (key, mask_key)]
    if others:
        if "attention_mask" in others:
            raise ValueError(
                f"it holds {others} besides {key!r}, which this reader does not read: padding would be scored as "
                "text; keep only the token array (unpadded sequences of one length), or give the file to llc, chi "
                "or patch, which read an 'attention_mask' beside the tokens and leave padding out"
            )
        why = ": padding would be scored as text" if "labels" in others else ""
        raise ValueError(
            f"it holds {others} besides {key!r}, which the command line does not read{why}; keep only the token "
            + (
                "array and, for padded sequences, an 'attention_mask' (1 at real tokens, 0 at padding)"
                if with_mask
                else "array (unpadded sequences of one length)"
            )
            + ", or use the Python API, whose estimators read {'input_ids', 'attention_mask', 'labels'} batches "
            "and leave padding out"
        )
    return z[key], (None if mask_key is None else z[mask_key])


def _checked_mask(mask: np.ndarray, shape: tuple, p: Path, argument: str, key: str) -> torch.Tensor:
    """The ``attention_mask`` array of the token file ``p`` (named as ``argument``) as a LongTensor of 0s and 1s,
    checked as the library checks a mask: the tokens' shape, 1 (a real token) or 0 (padding) only, at least one
    real token in every row."""
    where = f"{argument}={str(p)!r}: its array 'attention_mask'"
    if mask.shape != shape:
        raise ValueError(
            f"{where} has shape {mask.shape}; it must equal the shape of its token array {key!r}, {shape}"
        )
    if not (
        mask.dtype == np.bool_
        or np.issubdtype(mask.dtype, np.integer)
        or np.issubdtype(mask.dtype, np.floating)
    ):
        raise ValueError(
            f"{where} is of {mask.dtype}; give 1 (a real token) and 0 (padding) as integers or bools"
        )
    bad = (mask != 0) & (mask != 1)
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{where} must hold 1 (a real token) or 0 (padding); found {mask[row, col].item()!r} at row {row}, "
            f"column {col}"
        )
    empty = np.flatnonzero(~(mask == 1).any(axis=1))
    if empty.size:
        raise ValueError(
            f"{where} row {int(empty[0])} is all 0 (padding only); every sequence needs at least one real token"
        )
    return torch.from_numpy((mask == 1).astype(np.int64))


def has_padding(mask: torch.Tensor | None) -> bool:
    """Whether the ``attention_mask`` ``mask`` (None: no mask) marks any padding."""
    return mask is not None and not bool(mask.bool().all())


def left_padded(mask: torch.Tensor | None) -> bool:
    """Whether ``mask`` has padding before a real token in some row (left padding, or a gap)."""
    from ..patching.api import padding_before_real

    return mask is not None and padding_before_real(mask.bool()) is not None


_DECIMAL = re.compile(r"-?[0-9]+")


def _text_ids(p: Path) -> np.ndarray:
    """The ids of a text token file; a binary file (NumPy's or a zip archive, NUL bytes, not UTF-8) is refused
    saying so, an empty cell between commas naming its line."""
    raw = p.read_bytes()
    hint = _binary_format(p, raw[:8])
    if hint is not None:
        raise ValueError(f"{hint}, not text")
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise ValueError(f"it holds NUL bytes (the first at byte {nul}): a binary file, not text; {_FORMATS}")
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark is no token
    except UnicodeDecodeError as e:
        raise ValueError(
            f"it is not UTF-8 text (byte {raw[e.start]:#04x} at {e.start}): a binary file or another encoding; "
            "give UTF-8 text, or .npy or .npz"
        ) from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        cells = line.split(",")
        if len(cells) > 1 and not all(c.strip() for c in cells):
            raise ValueError(
                f"line {n} has an empty cell (nothing between two commas, or a comma at either end); give one "
                "id per cell"
            )
        row = []
        for t in line.replace(",", " ").split():
            # decimal ASCII digits only (int() would also read "1_0", "+1" and other scripts' digits)
            if not _DECIMAL.fullmatch(t):
                raise ValueError(f"line {n}: {t[:20]!r} is not an integer token id (decimal digits 0-9)")
            row.append(int(t))
        if row:
            rows.append(row)
    if not rows:
        raise ValueError("it holds no token id (an empty file, or blank lines only)")
    if len({len(r) for r in rows}) > 1:
        raise ValueError("its lines have different numbers of tokens; give sequences of one length")
    big = max(max(r) for r in rows)
    if big >= 2**63:
        raise ValueError(f"it holds the id {big}; token ids must lie below 2**63 (int64)")
    return np.asarray(rows, dtype=np.int64)


def length_check_error(path, argument: str, seq_len: int, n_ctx: int | None, rotary_limit: int | None):
    """The ``ValueError`` for sequences of ``seq_len`` tokens in the file ``path`` (named as ``argument``) that the
    model cannot read: longer than its ``n_ctx`` learned positions, or than ``rotary_limit``
    (:attr:`~pypattern.models.TransformerConfig.rotary_position_limit`); None when they fit."""
    if n_ctx is not None and seq_len > n_ctx:
        return ValueError(
            f"{argument}={str(path)!r}: sequences have {seq_len} tokens; the model's n_ctx is {n_ctx}"
        )
    if rotary_limit is not None and seq_len > rotary_limit:
        return ValueError(
            f"{argument}={str(path)!r}: sequences have {seq_len} tokens; the model's rotary scaling (LongRoPE's "
            f"short factors or dynamic NTK's unscaled frequencies) holds for {rotary_limit} positions "
            f"(original_max_position_embeddings) and longer sequences are not supported: give sequences of at most "
            f"{rotary_limit} tokens"
        )
    return None


def load_tokens(
    path: str | os.PathLike,
    *,
    vocab_size: int | None = None,
    n_ctx: int | None = None,
    rotary_limit: int | None = None,
    argument: str = "data",
    with_mask: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
    """Token ids ``(num_sequences, seq_len)`` as a LongTensor from ``.npy``, ``.npz`` or a UTF-8 text file
    (``.txt``, ``.csv``, ``.tsv``). Nothing is unpickled.

    An ``.npz`` holds its ids as ``tokens``, as ``input_ids`` (a tokenizer's ``return_tensors="np"`` output saved
    with ``np.savez(path, **enc)``) or as its only array. ``with_mask=True`` returns ``(tokens, attention_mask)``:
    the ``.npz``'s ``attention_mask`` array beside the ids (1 at real tokens, 0 at padding, on either side) as a
    LongTensor of the tokens' shape, or None when the file has none (``.npy`` and text files have none). Without
    ``with_mask`` an ``attention_mask`` array is refused (its padding would be read as text).

    Raises
    ------
    ValueError
        Naming the file when its suffix is not one of these (or it has none; a file in NumPy's formats is told
        the suffix to give it), when a text file is binary (NumPy's formats, NUL bytes, not UTF-8) or has an
        empty cell between commas, when it cannot be read as such an array, when it is
        not 2-D ``(num_sequences, seq_len)`` (a flat 1-D stream of ids is refused: split it into sequences), when
        ids are not integers, negative or not below ``vocab_size``, or when sequences are longer than ``n_ctx``
        (learned positions; under an ``attention_mask`` with padding, each row's real tokens, naming the first row
        of more: the runs read them at positions ``0 .. n-1``, whatever the padded width) or ``rotary_limit`` (the
        positions a LongRoPE or dynamic NTK scaling holds for:
        :attr:`~pypattern.models.TransformerConfig.rotary_position_limit`), or when an ``attention_mask`` is not of
        the tokens' shape, holds values other than 0 and 1 or has a row of padding only; the message names the
        file as ``argument`` (the command-line option it came from).
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{argument}={str(p)!r} is not a file; {_FORMATS}")
    suffix = p.suffix.lower()
    if suffix not in (".npy", ".npz", *TEXT_SUFFIXES):
        what = (
            f"unsupported token file format {p.suffix!r}"
            if suffix
            else "a file without a suffix (its format is not known)"
        )
        try:
            with open(p, "rb") as f:
                hint = _binary_format(p, f.read(8))
        except OSError:
            hint = None
        raise ValueError(
            f"{argument}={str(p)!r}: {what}: {_FORMATS}" + (f" ({hint})" if hint is not None else "")
        )
    mask, key = None, "tokens"
    try:
        if suffix in (".npy", ".npz"):
            loaded = np_load(p)
            if isinstance(loaded, np.ndarray):
                arr = loaded
            else:  # np.load opens any zip archive as an NpzFile, whatever the suffix
                with loaded as z:
                    arr, mask = _npz_array(z, with_mask)
                    key = "input_ids" if "tokens" not in z.files and "input_ids" in z.files else key
        else:
            arr = _text_ids(p)
    except (ValueError, OverflowError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{argument}={str(p)!r}: cannot read token ids ({e})") from None
    if arr.ndim == 1:
        raise ValueError(
            f"{argument}={str(p)!r} holds a 1-D array of {arr.shape[0]} ids; expected (num_sequences, seq_len): "
            "split a flat stream of ids into sequences of one length (e.g. ids[: n * L].reshape(n, L)), or save one "
            "sequence as an array of shape (1, seq_len)"
        )
    if arr.ndim != 2 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"{argument}={str(p)!r}: expected a non-empty integer array (num_sequences, seq_len), got shape "
            f"{arr.shape} of {arr.dtype}"
        )
    _check_range(int(arr.min()), int(arr.max()), p, argument, vocab_size)
    tokens = torch.from_numpy(arr.astype(np.int64))
    # the mask first: under it the learned positions bound each row's real tokens, not the columns
    mask = None if mask is None else _checked_mask(mask, arr.shape, p, argument, key)
    check_token_limits(
        tokens, p, n_ctx=n_ctx, rotary_limit=rotary_limit, argument=argument, attention_mask=mask
    )
    return (tokens, mask) if with_mask else tokens


def _check_range(lo: int, hi: int, path, argument: str, vocab_size: int | None) -> None:
    """Refuse ids from ``lo`` to ``hi`` outside ``[0, vocab_size)`` (without ``vocab_size``: negative, or past
    int64)."""
    if vocab_size is not None and (lo < 0 or hi >= vocab_size):
        want = f"lie in [0, {vocab_size}) for this model"
    elif lo < 0:
        want = "be >= 0"
    elif hi > np.iinfo(np.int64).max:
        want = "lie below 2**63 (int64)"
    else:
        return
    raise ValueError(f"{argument}={str(path)!r}: token ids must {want}; found {lo}..{hi}")


def check_token_limits(
    tokens: torch.Tensor,
    path,
    *,
    vocab_size: int | None = None,
    n_ctx: int | None = None,
    rotary_limit: int | None = None,
    argument: str = "data",
    attention_mask: torch.Tensor | None = None,
) -> None:
    """Refuse the ids ``tokens`` read by :func:`load_tokens` from ``path`` (named as ``argument``) where the model
    cannot read them: ids not below ``vocab_size``, sequences longer than ``n_ctx`` or ``rotary_limit`` (the
    messages of :func:`load_tokens`). Under an ``attention_mask`` (of the tokens' shape) with padding, ``n_ctx``
    bounds each row's real tokens (the library's rule: every forward reads them at positions ``0 .. n-1``), so a
    file padded past the learned positions is read when its rows fit."""
    _check_range(int(tokens.min()), int(tokens.max()), path, argument, vocab_size)
    T = tokens.shape[1]
    if n_ctx is not None and T > n_ctx and has_padding(attention_mask):
        real = attention_mask.bool().sum(1)
        over = (real > n_ctx).nonzero()
        if over.numel():
            row = int(over[0, 0])
            raise ValueError(
                f"{argument}={str(path)!r}: row {row} has {int(real[row])} real tokens under its 'attention_mask'; "
                f"the model's n_ctx is {n_ctx}"
            )
        n_ctx = None  # every row's real tokens fit: the padded width is not read as positions
    err = length_check_error(path, argument, T, n_ctx, rotary_limit)
    if err is not None:
        raise err


def check_same_mask(corrupted, corr_mask: torch.Tensor | None, data, mask: torch.Tensor | None) -> None:
    """Refuse the ``attention_mask`` ``corr_mask`` of the corrupted token file ``corrupted`` unless it is the mask of
    the clean prompts of ``data`` (``mask``; all 1s when None): the corrupted prompts share the clean ones' mask. A
    corrupted file without a mask takes the data's."""
    if corr_mask is None:
        return
    ref = torch.ones_like(corr_mask) if mask is None else mask
    if tuple(ref.shape) == tuple(corr_mask.shape) and torch.equal(corr_mask.bool(), ref.bool()):
        return
    differ = (corr_mask.bool() != ref.bool()).any(-1).nonzero()
    row = int(differ[0, 0]) if differ.numel() else 0
    what = f"the mask of data={str(data)!r}" + ("" if mask is not None else " (it has none: all 1s)")
    raise ValueError(
        f"corrupted={str(corrupted)!r}: its array 'attention_mask' differs from {what} (first at row {row}): the "
        "corrupted prompts share the clean prompts' mask; give the same 'attention_mask', or none"
    )


#: why a half-precision checkpoint is run as its float32 copy, by command
_UPCAST_REASON = {
    "sampling": "the samplers move float32 and float64 parameters only: sampling its float32 copy",
    "patching": "patching effects computed in half precision are mostly rounding noise: patching its float32 copy",
}


def token_limits(model) -> dict:
    """What ``model`` reads, as :func:`load_tokens`'s keywords: ``vocab_size``, ``n_ctx`` (learned positions) and
    ``rotary_limit`` (the positions its rotary scaling holds for)."""
    return {
        "vocab_size": model.cfg.d_vocab,
        "n_ctx": model.cfg.max_positions,
        "rotary_limit": model.cfg.rotary_position_limit,
    }


def _model_and_tokens(
    model_dir,
    data,
    dtype,
    upcast: str | None = None,
    tokens: torch.Tensor | None = None,
    device: str | torch.device | None = None,
    attention_mask: torch.Tensor | None = None,
):
    """The converted model (on ``device``: see :func:`~pypattern.circuits.cli.load_model_dir`), the tokens
    (``tokens``: the ids :func:`load_tokens` has read from ``data``, checked against the model here; else ``data``
    is read) and their ``attention_mask`` (the one given with ``tokens``, or the file's; None without one).
    ``upcast`` (``"sampling"`` or ``"patching"``): a half-precision checkpoint (most are saved in bfloat16) is
    loaded in float32, with a warning saying why. For sampling, whose loss is the next-token loss, sequences of one
    token (of one real token each, under a mask) are refused."""
    from ..circuits.cli import load_model_dir

    model = load_model_dir(model_dir, dtype=dtype, argument="--model", device=device)
    if upcast is not None and model.cfg.dtype not in (torch.float32, torch.float64):
        warnings.warn(
            f"--model {str(model_dir)!r} holds {model.cfg.dtype} weights and {_UPCAST_REASON[upcast]} (the weights "
            "upcast exactly; --float64 for float64)",
            UserWarning,
            stacklevel=3,
        )
        model = load_model_dir(model_dir, dtype=torch.float32, argument="--model", device=device)
    model.eval()
    if tokens is None:
        tokens, attention_mask = load_tokens(data, **token_limits(model), with_mask=True)
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(tokens.shape):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}; it must equal the shape of the tokens of "
            f"data={str(data)!r}, {tuple(tokens.shape)}"
        )
    check_token_limits(tokens, data, **token_limits(model), attention_mask=attention_mask)
    if upcast == "sampling" and tokens.shape[1] < 2:
        raise ValueError(
            f"data={str(data)!r}: its sequences have {tokens.shape[1]} token; the next-token loss that llc and chi "
            "sample needs sequences of at least 2 tokens"
        )
    if upcast == "sampling" and attention_mask is not None and int(attention_mask.sum(-1).max()) < 2:
        raise ValueError(
            f"data={str(data)!r}: its 'attention_mask' leaves every sequence 1 real token; the next-token loss "
            "that llc and chi sample needs sequences of at least 2 real tokens"
        )
    return model, tokens, attention_mask


def _check_default_nbeta(data, tokens: torch.Tensor, batch_size: int, nbeta) -> None:
    """The default nbeta, batch / log(batch), needs batches of at least 2 sequences: refused naming the options."""
    n = tokens.shape[0]
    if nbeta is None and min(batch_size, n) < 2:
        what = f"data={str(data)!r} holds 1 sequence" if n < 2 else "--batch-size is 1"
        fix = "give at least 2 sequences" if n < 2 else "give a --batch-size of at least 2"
        raise ValueError(
            f"{what}: the default --nbeta (batch / log(batch)) needs batches of at least 2 sequences; {fix}, or "
            "give --nbeta"
        )


def _count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} is not valid; give an int >= 1")
    return value


class MaskedTokens(torch.utils.data.Dataset):
    """Padded token sequences as Hugging Face style samples ``{"input_ids", "attention_mask"}``, which a
    ``DataLoader``'s default collate stacks into batches of both, each row's ids and mask together. With padding
    before a real token (left padding) each sample also holds ``position_ids``, its real tokens counted from 0
    (:func:`pypattern.models.transformer.real_token_positions`), so each sequence is computed as it would be alone
    (a model reading learned absolute positions would otherwise read its real tokens at shifted positions); so do
    the samples of sequences padded past ``n_ctx`` columns (the model's learned positions), whose padding columns
    the model could not read as positions."""

    def __init__(self, tokens: torch.Tensor, attention_mask: torch.Tensor, n_ctx: int | None = None) -> None:
        self.tokens, self.attention_mask = tokens, attention_mask
        self.position_ids = None
        past = n_ctx is not None and tokens.shape[1] > n_ctx and has_padding(attention_mask)
        if left_padded(attention_mask) or past:
            from ..models.transformer import real_token_positions

            self.position_ids = real_token_positions(attention_mask.bool())

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def __getitem__(self, i) -> dict:
        item = {"input_ids": self.tokens[i], "attention_mask": self.attention_mask[i]}
        if self.position_ids is not None:
            item["position_ids"] = self.position_ids[i]
        return item

    def batch(self, rows=slice(None)) -> dict:
        """The batch of the sequences ``rows`` (all by default), as the loader's collate gives it."""
        return self[rows]


def _batches(
    tokens: torch.Tensor,
    batch_size: int,
    attention_mask: torch.Tensor | None = None,
    n_ctx: int | None = None,
) -> torch.utils.data.DataLoader:
    """The sequences in shuffled batches of ``batch_size``: each chain reads them in an order keyed by the seed
    and its index, a short last batch is not read by the chains and L_n(w*) weights every sequence equally (the
    sampler's rules for a ``DataLoader``), and a checkpoint's fingerprint holds every sequence. With an
    ``attention_mask`` the batches are ``{"input_ids", "attention_mask"}`` dicts (:class:`MaskedTokens`): the
    default losses leave padding out (a batch's loss is the mean over its counted next-token terms), the shuffle
    keeps each row's ids and mask together, and a checkpoint's fingerprint (every batch of the first epoch) holds
    the mask too. ``n_ctx``: the model's learned positions (:class:`MaskedTokens`)."""
    _count("batch_size", batch_size)
    if attention_mask is not None:
        return torch.utils.data.DataLoader(
            MaskedTokens(tokens, attention_mask, n_ctx), batch_size=batch_size, shuffle=True
        )
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(tokens), batch_size=batch_size, shuffle=True
    )


def _sampled(run, model, stacked_chains: int):
    """``run(batched)``, the sampling call, with the chains batched (``batched=True``: one ``vmap``-ed forward and
    backward per step for every chain, the calibration's trials included) when ``stacked_chains`` copies of the
    model's parameters fit :data:`~pypattern.sampling.runner.BATCHED_MAX_STACKED`, else by the sampler's default
    rule (``batched=None``). The draws are the same either way up to float rounding; batched chains of the
    converted transformers take less CPU time per chain-step (measured on one thread, 4 chains: 1.1 vs 2.1-2.5 ms
    for a 25k-parameter Llama, 4.9 vs 6.7-7.0 ms at 90k, 19-20 vs 22-23 ms at 673k, equal at 3.2M), where the
    default rule batches chains on a CPU only up to 2^17 parameters. A model that does not run under ``vmap`` is refused
    by ``batched=True`` at its first step (before any draw): it is then run by the default rule."""
    from ..sampling.runner import fits_batched

    valid = isinstance(stacked_chains, int) and not isinstance(stacked_chains, bool) and stacked_chains > 0
    if not valid or not fits_batched(model, stacked_chains):  # an invalid count: the sampler's own error
        return run(None)
    try:
        return run(True)
    except RuntimeError as e:
        if "does not run under vmap" not in str(e):
            raise
    return run(None)


def out_folder(path: str | os.PathLike, argument: str = "out") -> str:
    """Create the folder ``path`` (and its parents) and check that a file can be written in it, before any work.

    Raises
    ------
    ValueError
        Naming ``path`` as ``argument`` (``--out '/dir'`` for a command-line flag, else ``out='/dir'``) when the
        folder cannot be created (an existing file, a path below a file, a read-only or virtual file system) or
        written in.
    """
    import tempfile

    path = os.fspath(path)
    name = f"{argument} {path!r}" if argument.startswith("--") else f"{argument}={path!r}"
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{name} is an existing file; give a folder (new or existing)")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ValueError(
            f"{name} cannot be used as a folder to write into ({e.strerror or e}); give a writable folder"
        ) from None
    return path


def _write(out: str, name: str, obj: dict) -> str:
    Path(out).mkdir(parents=True, exist_ok=True)
    path = os.path.join(out, name)
    from ..io import json_text

    with open(path, "w") as f:
        f.write(json_text(obj))
    return path


def _step_summary(config: dict) -> dict:
    """The step used and, when ``step_size="auto"`` chose it, the calibration's reason (for the summary)."""
    rep = config.get("auto_step")
    return {"step_size": float(config["step_size"]), "auto_step": rep["reason"] if rep else None}


def llc_error_text(mean: float, se: float, std: float, num_chains: int) -> str:
    """``LLC = mean +- standard error`` as the command prints it and titles its plot; with one chain (no standard
    error) the estimate alone."""
    if num_chains < 2:
        return f"{mean:.4g} (1 chain: no standard error; run 2 or more chains for one)"
    if not np.isfinite(se):
        return f"{mean:.4g} (standard error over {num_chains} chains undefined: {se})"
    return f"{mean:.4g} +- {se:.2g} (standard error over {num_chains} chains; std over chains {std:.2g})"


def run_user_llc(
    model_dir: str,
    data: str,
    out: str,
    *,
    batch_size: int = 8,
    num_chains: int = 4,
    num_draws: int = 100,
    num_burnin_steps: int | None = None,
    step_size: float | str = "auto",
    localization: float = 100.0,
    nbeta: float | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    checkpoint: str | os.PathLike | None = None,
    quiet: bool = True,
    tokens: torch.Tensor | None = None,
    device: str | torch.device | None = None,
    attention_mask: torch.Tensor | None = None,
) -> dict:
    """Estimate the LLC of the model in ``model_dir`` on the token sequences in ``data`` (next-token loss).

    Writes ``llc.npz`` (:class:`~pypattern.LLCResult`), ``llc_trace.png`` and ``llc_summary.json`` into ``out`` and
    returns the summary. The summary file is standard JSON: a value that is undefined (``llc_std`` and ``llc_se`` of
    one chain) or not finite is ``null`` there (NaN in the returned dict). ``checkpoint``: a folder; the sampler's
    checkpoint ``llc_checkpoint.npz`` there is written as the run goes and resumed from by the same run (a run with
    other settings, model or data is refused). ``quiet=False`` shows the sampler's progress bars. ``tokens``: the
    ids :func:`load_tokens` has read from ``data`` (the file is then not read again). ``device``: where the model
    is sampled (``"cpu"``, ``"cuda"``, ``"cuda:<index>"``; None: the CPU). The chains run batched where their
    stacked parameters fit (:func:`_sampled`): the same draws, up to float rounding, in less time.
    ``attention_mask``: the mask :func:`load_tokens` has read with ``tokens`` (``with_mask=True``; read from
    ``data`` when ``tokens`` is None): the batches are then ``{"input_ids", "attention_mask"}`` dicts whose padding
    the loss leaves out (:func:`_batches`).
    """
    from ..losses import batch_loss
    from ..sampling import estimate_llc

    out_folder(out)
    if checkpoint is not None:
        out_folder(checkpoint, "checkpoint")
    model, tokens, mask = _model_and_tokens(
        model_dir, data, dtype, upcast="sampling", tokens=tokens, device=device, attention_mask=attention_mask
    )
    _check_default_nbeta(data, tokens, batch_size, nbeta)
    ck = None if checkpoint is None else os.path.join(checkpoint, "llc_checkpoint.npz")
    if ck is not None and os.path.isdir(ck):
        raise ValueError(
            f"checkpoint={str(checkpoint)!r} holds a folder {ck!r} where the checkpoint file goes; give another "
            "checkpoint folder (on the command line: --checkpoint DIR), or move that folder away"
        )
    loader = _batches(tokens, batch_size, mask, model.cfg.max_positions)
    res = _sampled(
        lambda batched: estimate_llc(
            model,
            loader,
            loss_fn=batch_loss,
            num_chains=num_chains,
            num_draws=num_draws,
            num_burnin_steps=num_burnin_steps,
            step_size=step_size,
            localization=localization,
            nbeta=nbeta,
            seed=seed,
            checkpoint=ck,
            quiet=quiet,
            batched=batched,
        ),
        model,
        num_chains,
    )
    res.save(os.path.join(out, "llc.npz"))
    n_chains = len(np.asarray(res.llc_per_chain).ravel())
    text = llc_error_text(float(res.llc_mean), float(res.llc_se), float(res.llc_std), n_chains)
    plot = None
    try:
        from . import _figures as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        res.plot(ax, title=f"LLC = {text}")
        fig.tight_layout()
        plot = os.path.join(out, "llc_trace.png")
        fig.savefig(plot, dpi=100)
    except ImportError:  # pragma: no cover - matplotlib is optional
        pass
    summary = {
        "model": str(model_dir),
        "data": str(data),
        "sequences": int(tokens.shape[0]),
        "seq_len": int(tokens.shape[1]),
        **({} if mask is None else {"real_tokens": int(mask.sum())}),
        "llc_mean": float(res.llc_mean),
        "llc_std": float(res.llc_std),
        "llc_se": float(res.llc_se),
        "llc_per_chain": [float(v) for v in np.asarray(res.llc_per_chain).ravel()],
        "llc_text": text,
        "num_burnin_steps": int(res.sample.config["num_burnin_steps"]),
        **_step_summary(res.sample.config),
        "checkpoint": ck,
        "result": os.path.join(out, "llc.npz"),
        "plot": plot,
    }
    summary["summary"] = _write(out, "llc_summary.json", summary)
    return summary


#: the sites ``patch`` runs by default
DEFAULT_SITES = ("resid_pre", "attn_out", "mlp_out", "z")


def run_user_patch(
    model_dir: str,
    data: str,
    out: str,
    *,
    corrupted: str | None = None,
    sites: tuple[str, ...] | None = None,
    max_prompts: int = 8,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    tokens: torch.Tensor | None = None,
    checkpoint: str | None = None,
    quiet: bool = False,
    device: str | torch.device | None = None,
    attention_mask: torch.Tensor | None = None,
) -> dict:
    """Exact activation patching of the model in ``model_dir`` at each site over layers x positions (heads x
    positions for ``z``), denoising, with the metric KL(P_clean || P_run) at the last position.

    ``sites``: default :data:`DEFAULT_SITES` less those the model does not have (``mlp_out`` of an
    attention-only model); sites given that the model does not have are refused. ``corrupted`` is a token file of
    the same shape (symmetric token replacement, recommended); without it the
    corrupted run adds Gaussian noise (3x the embeddings' std) to every token embedding. A half-precision
    checkpoint is patched as its float32 copy (with a warning). Writes one CSV per site (normalised means: 1 =
    the clean run restored, 0 = no change from the corrupted run) and ``patch_summary.json`` into ``out``; the
    summary's ``top`` are the largest normalised effects, as in the CSV. ``tokens``: the ids :func:`load_tokens`
    has read from ``data`` (the file is then not read again). ``checkpoint``: a folder holding one checkpoint
    file per site (``patch_<site>.npz``, :func:`~pypattern.patching.activation_patching`'s ``checkpoint``): a
    stopped run resumes from it. ``quiet``: no progress bars. ``device``: where the model runs (``"cpu"``,
    ``"cuda"``, ``"cuda:<index>"``; None: the CPU).

    ``attention_mask``: the mask :func:`load_tokens` has read with ``tokens`` (read from ``data`` when ``tokens``
    is None; padding on either side): it is passed to :func:`~pypattern.patching.activation_patching`, which runs
    each prompt as it would be alone, and the metric reads each prompt's last real token (the last column of
    left-padded prompts; per prompt, ``position=``, for right-padded ones). A ``corrupted`` file's own
    ``attention_mask``, if it has one, must equal the data's (the corrupted prompts share the clean ones' mask);
    Gaussian noise is added to every real token's embedding (:class:`~pypattern.patching.GaussianNoise` under a
    mask). A file padded past the model's learned positions is read when each row's real tokens fit them.
    """
    from ..patching import KL, GaussianNoise, activation_patching
    from ..patching.api import last_real_positions

    _count("max_prompts", max_prompts)
    if sites is not None and not sites:
        raise ValueError("sites is empty: give at least one site")
    out_folder(out)
    model, clean, mask = _model_and_tokens(
        model_dir, data, dtype, upcast="patching", tokens=tokens, device=device, attention_mask=attention_mask
    )
    if sites is None:
        sites = tuple(s for s in DEFAULT_SITES if not (model.cfg.attn_only and s == "mlp_out"))
    corr = None
    if corrupted is not None:
        # its lengths checked under the data's mask, which it shares (a file without a mask takes the data's)
        limits = token_limits(model)
        corr, corr_mask = load_tokens(
            corrupted, **{**limits, "n_ctx": None}, argument="corrupted", with_mask=True
        )
        if corr.shape != clean.shape:
            raise ValueError(
                f"corrupted={corrupted!r} has shape {tuple(corr.shape)}; it must match data's {tuple(clean.shape)}"
            )
        check_same_mask(corrupted, corr_mask, data, mask)
        check_token_limits(corr, corrupted, **limits, argument="corrupted", attention_mask=mask)
        corr = corr[:max_prompts]
    clean = clean[:max_prompts]
    if mask is not None:
        mask = mask[:max_prompts]
    real = None if mask is None else mask.bool()
    if corr is not None and (
        torch.equal(corr, clean) if real is None else torch.equal(corr[real], clean[real])
    ):
        raise ValueError(
            f"corrupted={corrupted!r} equals data on the {clean.shape[0]} prompts patched: the corrupted run is the "
            "clean run, so there is no effect to patch back; give corrupted prompts that differ from the clean "
            "ones (e.g. a few tokens replaced)"
        )
    for site in sites:
        if (model.cfg.parallel_attn_mlp and site == "resid_mid") or (
            model.cfg.attn_only and site in ("resid_mid", "mlp_out")
        ):
            why = (
                "attention and MLP run in parallel"
                if site == "resid_mid" and model.cfg.parallel_attn_mlp
                else ("the model has no MLPs")
            )
            raise ValueError(f"sites: {site!r} does not exist in this model ({why}); leave it out")
    corruption = None if corr is not None else GaussianNoise(seed=seed)
    # the metric reads each prompt's last real token: the last column unless a row is right-padded
    position = -1
    if mask is not None:
        last = last_real_positions(mask)
        if bool((last != clean.shape[1] - 1).any()):
            position = last
    summary = {
        "model": str(model_dir),
        "data": str(data),
        "prompts": int(clean.shape[0]),
        # what the corrupted run is: the given token file, or Gaussian noise on the embeddings
        "corruption": (
            {"corrupted": str(corrupted)}
            if corruption is None
            else {"gaussian_noise": {"std_multiplier": corruption.std_multiplier, "seed": int(seed)}}
        ),
        "sites": {},
    }
    if mask is not None:
        summary["attention_mask"] = True
        summary["metric_position"] = (
            "the last column (each prompt's last real token)"
            if isinstance(position, int)
            else [int(v) for v in position]
        )
    for site in sites:
        ckpt = None if checkpoint is None else os.path.join(checkpoint, f"patch_{site}.npz")
        masking = {} if mask is None else {"attention_mask": mask}
        res = activation_patching(
            model, site, clean, corr, metric=KL(position), corruption=corruption, checkpoint=ckpt, quiet=quiet,
            **masking,
        )  # fmt: skip
        path = os.path.join(out, f"patch_{site}.csv")
        # normalised (1 = clean run restored) where the corrupted run moved the metric; else the raw change
        gap = None if res.corrupted is None else (res.clean - res.corrupted).mean()
        normalized = gap is not None and bool(torch.isfinite(gap)) and float(gap) != 0.0
        res.to_csv(path, normalized=normalized)
        top = res.top(3, normalized=normalized)
        summary["sites"][site] = {
            "table": path,
            "top": [[c, float(v)] for c, v in top],
            "normalized": normalized,
        }
    summary["summary"] = _write(out, "patch_summary.json", summary)
    return summary


def run_user_chi(
    model_dir: str,
    data: str,
    out: str,
    *,
    batch_size: int = 8,
    num_probe: int = 8,
    num_chains: int = 4,
    num_draws: int = 50,
    num_burnin_steps: int | None = None,
    step_size: float | str = "auto",
    localization: float = 100.0,
    nbeta: float | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    checkpoint: str | os.PathLike | None = None,
    quiet: bool = True,
    tokens: torch.Tensor | None = None,
    device: str | torch.device | None = None,
    attention_mask: torch.Tensor | None = None,
) -> dict:
    """Per-token susceptibilities of every head, MLP and the embedding of the model in ``model_dir``, probed on
    the first ``num_probe`` sequences of ``data`` and sampled on all of them. Writes ``chi.npz``
    (:class:`~pypattern.SusceptibilityResult`), ``chi.csv`` (one row per component, named in the first column;
    one column per probe token, ``s<sequence>p<position>``) and ``chi_summary.json`` into ``out``.
    ``checkpoint``: a folder where finished components and the running one are kept, and from which the same run
    resumes (a run with other settings, model or data is refused). ``quiet=False`` shows progress bars.
    ``tokens``: the ids :func:`load_tokens` has read from ``data`` (the file is then not read again). ``device``:
    where the model is sampled (``"cpu"``, ``"cuda"``, ``"cuda:<index>"``; None: the CPU). The chains run batched
    where their stacked parameters fit (:func:`_sampled`): the same draws, up to float rounding, in less time.
    ``attention_mask``: the mask :func:`load_tokens` has read with ``tokens`` (read from ``data`` when ``tokens``
    is None): the sampling batches and the probe are ``{"input_ids", "attention_mask"}`` dicts (:func:`_batches`);
    the probe's padding tokens are not counted (their columns hold 0, as
    :attr:`~pypattern.SusceptibilityResult.probe_counted` says)."""
    from ..susceptibility import susceptibilities

    _count("num_probe", num_probe)
    out_folder(out)
    if checkpoint is not None:
        out_folder(checkpoint, "checkpoint")
    model, tokens, mask = _model_and_tokens(
        model_dir, data, dtype, upcast="sampling", tokens=tokens, device=device, attention_mask=attention_mask
    )
    _check_default_nbeta(data, tokens, batch_size, nbeta)
    components = [c for c in model.components() if c != "unembed"]
    loader = _batches(tokens, batch_size, mask, model.cfg.max_positions)
    probe = tokens[:num_probe] if mask is None else loader.dataset.batch(slice(0, num_probe))
    # every component's chains sample together (one group): stacked, they are chains x components copies
    res = _sampled(
        lambda batched: susceptibilities(
            model,
            loader,
            probe,
            components,
            num_chains=num_chains,
            num_draws=num_draws,
            num_burnin_steps=num_burnin_steps,
            step_size=step_size,
            localization=localization,
            nbeta=nbeta,
            seed=seed,
            checkpoint=checkpoint,
            quiet=quiet,
            batched=batched,
        ),
        model,
        num_chains * len(components),
    )
    res.save(os.path.join(out, "chi.npz"))
    chi = np.asarray(res.chi)
    columns = [f"s{int(i)}p{int(j)}" for i, j in zip(res.probe_sample, res.probe_position)]
    import csv

    with open(os.path.join(out, "chi.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["component", *columns])
        for name, row in zip(res.components, chi):
            w.writerow([name, *(repr(float(v)) for v in row)])
    counted = chi.shape[1] if res.probe_counted is None else int(np.asarray(res.probe_counted).sum())
    pca = res.pca(n_components=min(3, chi.shape[0], counted))
    summary = {
        "model": str(model_dir),
        "data": str(data),
        "components": list(res.components),
        "chi_shape": list(chi.shape),
        "num_burnin_steps": int(res.settings["num_burnin_steps"]),
        "explained_variance_ratio": [float(v) for v in np.asarray(pca.explained_variance_ratio).ravel()],
        **_step_summary(res.settings),
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "result": os.path.join(out, "chi.npz"),
        "table": os.path.join(out, "chi.csv"),
    }
    summary["summary"] = _write(out, "chi_summary.json", summary)
    return summary
