"""One file format for every result and checkpoint, and one run fingerprint.

Format
------
A file is an uncompressed ``.npz`` (a zip of ``.npy`` arrays) with one extra member, ``__meta_json__``: a UTF-8
JSON header ``{"format": "pypattern", "version": 1 or 2, "kind": <what the file holds>, ...}``. Arrays hold the
numbers; the header holds everything else (settings, names, scalars). Files are written atomically (a temporary
file in the same folder, fsync, rename), so a killed writer leaves the previous file or the new one, never half of
one, and of two processes writing one file the last to rename wins, whole (a reader sees one writer's file). Files are read with ``numpy.load(..., allow_pickle=False)``: loading never executes code, and a pickle, a
truncated or corrupt file, or a file holding another kind of result is refused with :class:`FormatError` naming
the file and what was expected.

Results (dataclasses) go through :func:`save_result` / :func:`load_result`: arrays and tensors become members of
the archive, every other field a JSON value (tuples, dicts with non-string keys, NumPy scalars and nested result
dataclasses are tagged so they come back as they were). Loading reads the header first and then only the members
it references; a member it does not reference, a reference to a member the file lacks, a member that would expand
to far more than its stored size, a header nested more than ``MAX_DEPTH`` deep, and fields that do not hold what
the class declares (a number, a string, an array of numbers, a tensor of the dtype the header gives, a result of
the declared class) are refused with :class:`FormatError` naming the file. Whether the arrays of one result agree
in shape is the class's own check (a ``_check_loaded`` method, run after loading).

Fingerprint
-----------
A checkpoint stores a fingerprint of the call that wrote it: an ordered dict of JSON values built by
:func:`fingerprint` (containers canonicalised, so a tuple and a list of the same values match; tensors and
arrays by a hash of their bytes, dtype and shape). :func:`check_fingerprint` compares a stored one with the
current call's and raises :class:`FingerprintMismatch` naming the first item that differs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import dis
import errno
import hashlib
import json
import math
import os
import re
import sysconfig
import tempfile
import time
import types
import typing
import zipfile
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

__all__ = [
    "FingerprintMismatch",
    "FormatError",
    "Saveable",
    "callable_id",
    "callable_name",
    "check_fingerprint",
    "fingerprint",
    "hash_batch",
    "hash_tensor",
    "json_text",
    "load",
    "load_result",
    "register",
    "save",
    "save_result",
    "strict_json",
]

FORMAT = "pypattern"
#: the newest format version written; a file is written as the oldest version that holds it (version 2 added NumPy
#: scalars kept with their dtype), so older readers still read every file that does not need a newer one
VERSION = 2
#: the format versions this reader reads
READ_VERSIONS = (1, 2)
_META = "__meta_json__"
_ZIP_MAGIC = b"PK\x03\x04"


class FormatError(ValueError):
    """A file is not a pypattern file of the kind expected (a pickle, truncated, corrupt or another result)."""


class FingerprintMismatch(ValueError):
    """A checkpoint was written by a different run (other data, weights, settings, ...). Attributes: ``path``,
    ``item`` (the first differing item), ``stored`` and ``current`` (its two values)."""

    def __init__(self, msg: str, *, path: str, item: str, stored: Any, current: Any):
        super().__init__(msg)
        self.path, self.item, self.stored, self.current = path, item, stored, current


# ------------------------------------------------------------------------------------------------ JSON reports


def _path(path: Any) -> str:
    """``path`` as a str (:func:`os.fspath`, bytes decoded as :func:`os.fsdecode` does); anything but a str, bytes
    or ``os.PathLike``, and an empty path, are refused naming it."""
    if not isinstance(path, str | bytes | os.PathLike):
        raise TypeError(
            f"path={path!r} is not valid; give a file path (a str or an os.PathLike such as pathlib.Path)"
        )
    out = os.fsdecode(os.fspath(path))
    if not out:
        raise ValueError(f"path={path!r} is not valid: it is empty; give a file path (such as 'result.npz')")
    return out


def _json_key(k: Any) -> str:
    """A mapping key as ``json.dumps`` writes it (``True`` as "true", ``None`` as "null", numbers by ``str``)."""
    if isinstance(k, str):
        return k
    return json.dumps(k) if isinstance(k, (bool, type(None))) else str(k)


def strict_json(obj: Any, default: Callable[[Any], Any] | None = None) -> Any:
    """``obj`` as plain JSON values, with ``None`` (JSON ``null``) for every non-finite number (NaN, +-inf), which
    JSON has no literal for: dicts (keys as strings), lists and tuples, NumPy arrays and scalars, 0-d tensors and
    Python numbers. Other objects go through ``default`` (when given) and are converted in turn, or stay as they
    are."""
    if isinstance(obj, Mapping):
        return {_json_key(k): strict_json(v, default) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v, default) for v in obj]
    if isinstance(obj, np.ndarray):
        return strict_json(obj.tolist(), default)
    if isinstance(obj, torch.Tensor) and obj.ndim == 0:
        return strict_json(obj.item(), default)
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    if obj is None or isinstance(obj, str) or default is None:
        return obj
    return strict_json(default(obj))


def json_text(obj: Any, indent: int | None = 2, default: Callable[[Any], Any] | None = None) -> str:
    """Standard JSON (RFC 8259) text of ``obj``: non-finite numbers written as ``null`` (:func:`strict_json`), so
    that strict parsers read the file; what cannot be written raises ``ValueError`` or ``TypeError``."""
    return json.dumps(strict_json(obj, default), indent=indent, allow_nan=False)


# ------------------------------------------------------------------------------------------------ raw files


def _new_file_mode(path: str) -> int | None:
    """The mode ``open(path, "w")`` would leave ``path`` with: an existing file's own, else ``0o666`` less the
    process's umask as it is now (read from ``/proc/self/status``, without setting it); None where neither can be
    read (the file then keeps the temporary's 0600)."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        pass
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def save(
    path: str | os.PathLike, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any], *, kind: str
) -> None:
    """Write ``arrays`` and the JSON-serialisable ``meta`` to ``path`` atomically, as a file of ``kind``.

    Parameters
    ----------
    path : path
        The file (``.npz``); its folder is created if needed. A symbolic link is written through, as
        ``numpy.savez`` does: the file it points to is replaced (atomically) and the link stays.
    arrays : mapping of str to ndarray
        Numeric arrays (no object arrays: they would need pickle).
    meta : mapping
        JSON values (str keys), nested at most ``MAX_DEPTH`` deep; stored in the header next to ``format``,
        ``version`` and ``kind`` (items of ``meta`` with these names, as :func:`load` returns them, are replaced
        by the file's own).
    kind : str
        What the file holds (e.g. ``"LLCResult"``, ``"sample-checkpoint"``); :func:`load` checks it.
    """
    path = _path(path)
    if os.path.islink(path):  # replace the file the link points to, not the link
        path = os.path.realpath(path)
    if os.path.isdir(path):  # (the rename would fail naming the temporary file)
        raise IsADirectoryError(
            errno.EISDIR, f"path={path!r} is a folder; give the path of a file in it (such as 'result.npz')"
        )
    if os.path.exists(path) and not os.access(path, os.W_OK):  # (the rename would replace it regardless)
        raise PermissionError(
            errno.EACCES,
            f"cannot write {path!r}: the file there is read-only; make it writable or give another path",
        )
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    payload = {}
    for k, v in arrays.items():
        # asarray keeps a 0-d array 0-d (ascontiguousarray would make it 1-d); savez writes any strides
        a = np.asarray(v)
        if a.dtype.hasobject:
            raise TypeError(f"array {k!r} has dtype object, which cannot be saved without pickle")
        payload[k] = a
    # the header's own items win over meta's (a header as load returns it can be saved again)
    header = {**meta, "format": FORMAT, "version": 1, "kind": kind}
    text = json.dumps(header)
    if '"__scalar__"' in text:  # a NumPy scalar kept with its dtype (or a string that spells one: harmless)
        header["version"] = 2
        text = json.dumps(header)
    if _json_depth(text) > MAX_DEPTH:
        raise ValueError(
            f"meta: the header of {path!r} would nest {_json_depth(text)} containers deep; files hold at most "
            f"{MAX_DEPTH} (flatten the nested values)"
        )
    payload[_META] = np.frombuffer(text.encode(), dtype=np.uint8)
    prefix = f".tmp-{_temporary_stem(os.path.basename(path))}-{os.getpid()}-"
    try:
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".npz", dir=folder)
    except OSError as e:  # name the file asked for, not the temporary beside it
        raise type(e)(
            e.errno,
            f"cannot write {path!r}: its folder {folder!r} does not take a new file ({e.strerror}); files are "
            "written to a temporary file in the same folder and renamed, so the folder must be writable",
        ) from None
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **payload)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp's 0600 made the mode a plain open() would give, as the outputs written beside it have
        mode = _new_file_mode(path)
        if mode is not None:
            with contextlib.suppress(OSError):  # a file system without modes keeps its own
                os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _remove_stale_temporaries(folder, os.path.basename(path))


#: how deep a header's JSON may nest containers (lists and objects); pypattern's own headers nest a few levels
MAX_DEPTH = 100

#: a member may declare at most this many bytes per compressed byte (plus ``_EXPANSION_SLACK``); pypattern
#: writes members uncompressed (as many bytes as the file holds)
_MAX_EXPANSION = 100
_EXPANSION_SLACK = 1 << 20

_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)


def _json_depth(text: str) -> int:
    """How deep JSON ``text`` nests lists and objects (brackets inside strings aside), without parsing it."""
    b = np.frombuffer(_JSON_STRING.sub('""', text).encode(), dtype=np.uint8)
    step = np.isin(b, (ord("["), ord("{"))).astype(np.int64) - np.isin(b, (ord("]"), ord("}")))
    return int(np.cumsum(step).max(initial=0))


_STALE_AFTER_S = 600.0

#: the longest file name (in UTF-8 bytes) a temporary's name holds whole: longer ones by a hash, so that the
#: temporary's name (the file's, its process id and a random tail) stays within the file systems' 255 bytes
_STEM_MAX_BYTES = 120


def _temporary_stem(name: str) -> str:
    """What the temporaries of file ``name`` are named after: ``name`` itself, or, for a name longer than
    ``_STEM_MAX_BYTES`` bytes, a hash of it (a name of up to 255 bytes is a valid file, its temporary too)."""
    if len(name.encode("utf-8", "surrogateescape")) <= _STEM_MAX_BYTES:
        return name
    return "~" + hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:24]


def _remove_stale_temporaries(folder: str, name: str) -> None:
    """Delete the temporary files that writes of ``name`` left in ``folder`` when their process was killed before
    it could remove them (``.tmp-<stem>-<pid>-*.npz``, the stem by :func:`_temporary_stem`): those of a process
    that no longer runs here, untouched for ten minutes (a write in progress, or one from another host sharing the
    folder, is left alone)."""
    start = f".tmp-{_temporary_stem(name)}-"
    try:
        entries = [e for e in os.scandir(folder) if e.name.startswith(start) and e.name.endswith(".npz")]
    except OSError:
        return
    now = time.time()
    for e in entries:
        pid = e.name[len(start) :].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _process_alive(int(pid)):
            continue
        try:
            if now - e.stat().st_mtime >= _STALE_AFTER_S:
                os.unlink(e.path)
        except OSError:
            pass  # gone already, or not ours to delete


def _process_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill would end the process there: treat every pid as running
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's), or cannot be told: keep its files
    return True


#: what reading a damaged archive, header or member can raise besides FormatError (zlib.error: a damaged deflated
#: member; NotImplementedError: a compression method zipfile lacks; RuntimeError: an encrypted member)
_CORRUPT = (
    zipfile.BadZipFile,
    EOFError,
    OSError,
    ValueError,
    KeyError,
    UnicodeDecodeError,
    zlib.error,
    NotImplementedError,
    RuntimeError,
)


class _Archive:
    """An open pypattern file: its header (``meta``, checked: format, version, ``kind``, nesting depth) read at
    once, its members (``names``) each read on request by :meth:`array`, so that a member nothing asks for is
    never decompressed."""

    def __init__(self, path: str, kind: str | tuple[str, ...] | None):
        self.path = path
        self.what = (
            "a pypattern file"
            if kind is None
            else f"a pypattern {kind if isinstance(kind, str) else kind} file"
        )
        with open(path, "rb") as f:
            head = f.read(4)
        if head != _ZIP_MAGIC:
            hint = " (it looks like a pickle, which pypattern never loads)" if head[:1] == b"\x80" else ""
            raise FormatError(f"{path!r} is not {self.what} (.npz with a JSON header){hint}")
        try:
            self.zip = zipfile.ZipFile(path)
        except _CORRUPT as e:
            raise self.corrupt(e) from None
        try:
            self._read_header(kind)
        except BaseException:
            self.zip.close()
            raise

    def _read_header(self, kind) -> None:
        path, what = self.path, self.what
        # np.savez names a member "<key>.npy"; a member without the suffix is keyed by its whole name (as np.load)
        self.infos = {i.filename.removesuffix(".npy"): i for i in self.zip.infolist()}
        if _META not in self.infos:
            raise FormatError(f"{path!r} is an .npz without pypattern's header, not {what}")
        self.names = [k for k in self.infos if k != _META]
        try:
            header = self.array(_META)
            if header.dtype != np.uint8 or header.ndim != 1:
                raise FormatError(f"{path!r} is corrupt: its header member is not text (bytes), not {what}")
            text = header.tobytes().decode()
            depth = _json_depth(text)
            if depth > MAX_DEPTH:
                raise FormatError(
                    f"{path!r} is corrupt: its header nests {depth} containers deep, at most {MAX_DEPTH} are read"
                )
            meta = json.loads(text)
        except FormatError:
            raise
        except (*_CORRUPT, RecursionError) as e:
            raise self.corrupt(e) from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise FormatError(f"{path!r} has no pypattern header, not {what}")
        version = meta.get("version")
        if type(version) is int and version > max(READ_VERSIONS):
            raise FormatError(
                f"{path!r} has format version {version}; this pypattern reads versions "
                f"{', '.join(map(str, READ_VERSIONS))}: the file was written by a newer pypattern, upgrade pypattern "
                "to read it"
            )
        if type(version) is not int or version not in READ_VERSIONS:
            raise FormatError(
                f"{path!r} has format version {version!r}; this pypattern reads versions "
                f"{', '.join(map(str, READ_VERSIONS))}"
            )
        if kind is not None:
            kinds = (kind,) if isinstance(kind, str) else tuple(kind)
            if meta.get("kind") not in kinds:
                raise FormatError(f"{path!r} holds a {meta.get('kind')!r}, expected {what}")
        self.meta = meta

    def corrupt(self, e: BaseException) -> FormatError:
        return FormatError(f"{self.path!r} is truncated or corrupt, not {self.what}: {type(e).__name__}: {e}")

    def array(self, name: str) -> np.ndarray:
        """Member ``name`` (KeyError when there is none): a FormatError naming the file and the member when it
        is not a NumPy array of plain values, or its sizes do not add up (a member that would expand to more
        than ``_MAX_EXPANSION`` times its compressed size is refused before anything is decompressed)."""
        info = self.infos[name]
        where = f"{self.path!r} is corrupt: its member {name!r}"
        stored = info.compress_type == zipfile.ZIP_STORED
        if (stored and info.file_size != info.compress_size) or (
            info.file_size > _MAX_EXPANSION * info.compress_size + _EXPANSION_SLACK
        ):
            raise FormatError(
                f"{where} declares {info.file_size} bytes from {info.compress_size} stored; pypattern reads "
                f"members of at most {_MAX_EXPANSION} times their stored size (it writes them uncompressed)"
            )
        fmt = np.lib.format
        try:
            with self.zip.open(info) as f:
                version = fmt.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = fmt.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, fortran, dtype = fmt.read_array_header_2_0(f)
                else:
                    raise FormatError(f"{where} is a .npy of version {version}, pypattern reads 1.0 and 2.0")
                header_size = f.tell()
            if dtype.hasobject:
                raise FormatError(
                    f"{where} is not an array of numbers: numpy reads it as pickled (object) data, which pypattern "
                    "never loads"
                )
            size = header_size + dtype.itemsize * math.prod(shape)
            if size != info.file_size:
                raise FormatError(
                    f"{where} declares shape {shape} of {dtype} ({size} bytes with its header) in "
                    f"{info.file_size} bytes"
                )
            with self.zip.open(info) as f:
                return fmt.read_array(f, allow_pickle=False)
        except FormatError:
            raise
        except _CORRUPT as e:
            raise FormatError(f"{where} is not a NumPy array: {type(e).__name__}: {e}") from None

    def close(self) -> None:
        self.zip.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load(
    path: str | os.PathLike, *, kind: str | tuple[str, ...] | None = None
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a file written by :func:`save`: ``(arrays, meta)``. The header is checked (format, version, ``kind``)
    before any array is read.

    Raises
    ------
    FormatError
        The file is not a pypattern ``.npz`` (a pickle, a truncated or corrupt file, a header nested more than
        ``MAX_DEPTH`` deep, a member that is not a NumPy array of plain values or would expand to more than
        ``_MAX_EXPANSION`` times its stored size), or holds another ``kind``.
    FileNotFoundError
        There is no file at ``path``.
    """
    path = _path(path)
    with _Archive(path, kind) as a:
        return {k: a.array(k) for k in a.names}, a.meta


# ------------------------------------------------------------------------------------------------ results

_RESULTS: dict[str, type] = {}


class _Arrays(dict):
    """The members of an ``.npz`` file read by :func:`np_load`: a dict with ``files`` and ``with`` as numpy's
    archive has."""

    @property
    def files(self) -> list[str]:
        return list(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


def np_load(path):
    """``np.load(path, allow_pickle=False)``, an ``.npz`` archive's members read at once (a dict with ``files``);
    a file or member numpy would have to unpickle (object arrays, or bytes it cannot read as an array) is a
    ValueError that says so (naming the member), without numpy's advice to load it unsafely."""

    def refused(e: ValueError, member: str | None) -> ValueError:
        if "allow_pickle" not in str(e):
            return e
        where = "" if member is None else f"its member {member!r} is "
        return ValueError(
            f"{where}not an array of numbers: numpy reads it as pickled (object) data, which pypattern never loads"
        )

    try:
        z = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise refused(e, None) from None
    if isinstance(z, np.ndarray):
        return z
    with z:
        # np.load opens any zip archive as an .npz: one whose members are not NumPy arrays (torch.save writes
        # such files) is refused, and nothing in it is read
        members = z.zip.namelist()
        if not members:
            raise ValueError(
                "it is an empty zip archive (numpy.savez with no arrays writes one): it holds no array"
            )
        if not all(m.endswith(".npy") for m in members):
            more = " ..." if len(members) > 3 else ""
            raise ValueError(
                f"it is a zip archive but not NumPy's .npy or .npz (members {members[:3]}{more}; torch.save writes "
                "such files): save arrays with numpy.save or numpy.savez"
            )
        out = _Arrays()
        for k in z.files:
            try:
                out[k] = z[k]
            except ValueError as e:
                raise refused(e, k) from None
    return out


def register(cls: type) -> type:
    """Class decorator: ``cls`` (a dataclass) can be saved with :func:`save_result` and nested in other results."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"register needs a dataclass, got {cls!r}")
    _RESULTS[cls.__name__] = cls
    return cls


class _Encoder:
    """Values to JSON, with arrays and tensors set aside as archive members named by their path."""

    def __init__(self):
        self.arrays: dict[str, np.ndarray] = {}

    def array(self, key: str, a: np.ndarray) -> str:
        # names are paths ("info/blocks/0"); a mapping key holding "/" can spell another value's path: the
        # member gets a name of its own (the JSON records whichever name it got)
        name, i = key, 1
        while name in self.arrays:
            name, i = f"{key}#{i}", i + 1
        self.arrays[name] = a
        return name

    def __call__(self, v, key: str):
        if v is None or isinstance(v, bool | str):
            return v
        if isinstance(v, np.generic):  # before float: np.float64 is one
            if v.dtype.kind in "fc" and v.dtype.itemsize > (8 if v.dtype.kind == "f" else 16):
                raise TypeError(
                    f"{key}: a NumPy {v.dtype.name} cannot be saved (a JSON number holds a float64); convert it "
                    "with float(), or keep it in an array"
                )
            if v.dtype.kind in _SCALAR_KINDS:  # comes back a NumPy scalar of its dtype
                return {"__scalar__": v.item(), "dtype": v.dtype.name}
            # a NumPy str as a str; a complex, bytes or date one refused as its Python value is, naming the field
            return self(v.item(), key)
        if isinstance(v, int | float):
            return v
        if isinstance(v, np.ndarray):
            return {"__array__": self.array(key, v)}
        if isinstance(v, torch.Tensor):
            dtype = str(v.dtype).removeprefix("torch.")
            if v.layout != torch.strided or v.is_meta:
                what = "a meta tensor (it holds no values)" if v.is_meta else f"a tensor of layout {v.layout}"
                raise TypeError(f"{key}: {what} cannot be saved; save a strided tensor (e.g. t.to_dense())")
            t = v.detach().cpu().resolve_conj().resolve_neg()  # (numpy refuses a tensor with either bit set)
            if t.dtype in _WIDENED:
                t = t.float()
            try:
                a = t.numpy()
            except (TypeError, RuntimeError) as e:  # a dtype numpy lacks (complex32, quantized)
                raise TypeError(
                    f"{key}: a tensor of dtype {dtype} cannot be saved ({e}); convert it to a dtype NumPy holds "
                    "(e.g. complex64, float32)"
                ) from None
            return {"__tensor__": self.array(key, a), "dtype": dtype}
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            name = type(v).__name__
            if _RESULTS.get(name) is not type(v):
                raise TypeError(f"{key}: {name} is not a registered result class")
            return {
                "__result__": name,
                "fields": {
                    f.name: self(getattr(v, f.name), f"{key}.{f.name}") for f in dataclasses.fields(v)
                },
            }
        if isinstance(v, tuple):
            return {"__tuple__": [self(x, f"{key}/{i}") for i, x in enumerate(v)]}
        if isinstance(v, list):
            return [self(x, f"{key}/{i}") for i, x in enumerate(v)]
        if isinstance(v, Mapping):
            if all(isinstance(k, str) and not k.startswith("__") for k in v):
                return {k: self(x, f"{key}/{k}") for k, x in v.items()}
            return {
                "__items__": [
                    [self(k, f"{key}/k{i}"), self(x, f"{key}/{i}")] for i, (k, x) in enumerate(v.items())
                ]
            }
        raise TypeError(f"{key}: a {type(v).__name__} cannot be saved (arrays, tensors and JSON values can)")


def _decode(v, arrays: Callable[[str], np.ndarray], path: str, depth: int = 0):
    """A header value as it was saved: members read by ``arrays(name)``; a damaged value raises what it raises
    (:func:`load_result` makes that a FormatError naming the file)."""
    if depth > MAX_DEPTH:  # headers are checked before parsing: this is a guard, not a limit one meets
        raise FormatError(f"{path!r} is corrupt: its header nests more than {MAX_DEPTH} values deep")
    d = depth + 1
    if isinstance(v, list):
        return [_decode(x, arrays, path, d) for x in v]
    if not isinstance(v, dict):
        return v
    if "__array__" in v:
        return arrays(v["__array__"])
    if "__tensor__" in v:
        return _tensor(arrays(v["__tensor__"]), v.get("dtype"), v["__tensor__"], path)
    if "__scalar__" in v:
        return _scalar(v["__scalar__"], v.get("dtype"), path)
    if "__tuple__" in v:
        return tuple(_decode(x, arrays, path, d) for x in _list(v["__tuple__"]))
    if "__items__" in v:
        return {
            _hashable(_decode(k, arrays, path, d)): _decode(x, arrays, path, d)
            for k, x in _list(v["__items__"])
        }
    if "__result__" in v:
        cls = _RESULTS.get(v["__result__"])
        if cls is None:
            raise FormatError(f"{path!r} holds an unknown result class {v['__result__']!r}")
        fields = v.get("fields")
        if not isinstance(fields, dict):
            raise FormatError(f"{path!r} is corrupt: its nested {cls.__name__} has no fields")
        return _construct(cls, {k: _decode(x, arrays, path, d) for k, x in fields.items()}, path)
    return {k: _decode(x, arrays, path, d) for k, x in v.items()}


def _list(v) -> list:
    if not isinstance(v, list):
        raise TypeError(f"a tagged value holds {type(v).__name__} {_short(v, 40)}, expected a list")
    return v


def _members(v, out: set[str]) -> set[str]:
    """The names of the members the header value ``v`` references (what :func:`_decode` reads)."""
    stack = [v]
    while stack:
        v = stack.pop()
        if isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, dict):
            for tag in ("__array__", "__tensor__"):
                if tag in v:
                    if not isinstance(v[tag], str):
                        raise TypeError(f"a member reference {tag} holds {_short(v[tag], 40)}, not a name")
                    out.add(v[tag])
                    break
            else:
                stack.extend(v.values())
    return out


#: the tensor dtypes numpy lacks whose values float32 holds exactly: saved as float32, read back in their own dtype
_WIDENED = frozenset(
    dt
    for dt in (
        torch.bfloat16,
        *(
            getattr(torch, n, None)
            for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
        ),
    )
    if isinstance(dt, torch.dtype)
)


def _tensor(a: np.ndarray, dtype, name: str, path: str) -> torch.Tensor:
    """Member ``a`` as the tensor of ``dtype`` (the name the header gives) it was saved from: the member must hold
    that dtype's values (float32 for bfloat16 and the float8 dtypes, which are saved widened)."""
    dt = getattr(torch, str(dtype), None)
    if not isinstance(dt, torch.dtype):
        raise FormatError(f"{path!r} is corrupt: a tensor's dtype {dtype!r} is not a torch dtype")
    try:
        want = np.dtype(np.float32) if dt in _WIDENED else torch.empty(0, dtype=dt).numpy().dtype
    except (TypeError, RuntimeError):
        raise FormatError(
            f"{path!r} is corrupt: a tensor's dtype {dtype!r} is not one pypattern saves"
        ) from None
    if a.dtype.kind != want.kind or a.dtype.itemsize != want.itemsize:
        raise FormatError(
            f"{path!r} is corrupt: its member {name!r} holds {a.dtype} values, its header declares a {dtype} tensor"
        )
    if a.dtype != want or not a.flags.writeable:  # (a member read from a file is a fresh writable array)
        a = np.array(a, dtype=want)
    return torch.from_numpy(a).to(dt)


#: the kinds of NumPy scalar saved with their dtype (bool, signed and unsigned integers, floats)
_SCALAR_KINDS = "biuf"


#: the JSON values a NumPy scalar of each kind is saved as
_SCALAR_VALUES = {"b": (bool,), "i": (int,), "u": (int,), "f": (int, float)}


def _scalar(value, dtype, path: str) -> np.generic:
    """The NumPy scalar of ``dtype`` (its name) that ``value`` (its JSON value) was saved from."""
    try:
        dt = np.dtype(str(dtype))
        ok = dt.kind in _SCALAR_KINDS and isinstance(value, _SCALAR_VALUES[dt.kind])
        ok = ok and (dt.kind == "b" or not isinstance(value, bool))
        if ok:
            return dt.type(value)
    except (TypeError, ValueError, OverflowError):
        pass
    raise FormatError(f"{path!r} is corrupt: a NumPy scalar {_short(value, 40)} of dtype {dtype!r}")


def _hashable(k):
    return tuple(_hashable(x) for x in k) if isinstance(k, list) else k


def save_result(obj, path: str | os.PathLike) -> None:
    """Write a registered result dataclass to ``path`` (atomic; arrays and tensors as members, the rest JSON).

    A result that :func:`load_result` would refuse (a field that does not hold what the class declares, or the
    class's own ``_check_loaded`` failing, e.g. integer metric values or NaN where finite numbers are kept) is
    refused with a ValueError naming the class, the field and the file, and nothing is written."""
    _write_result(obj, path, check=True)


def _write_result(obj, path: str | os.PathLike, *, check: bool = False) -> None:
    """Write ``obj`` as :func:`save_result` does; ``check=False`` writes it unchecked (how a test builds a file
    that :func:`load_result` must refuse)."""
    enc = _Encoder()
    fields = {f.name: enc(getattr(obj, f.name), f.name) for f in dataclasses.fields(obj)}
    if check:
        cls, p = type(obj), _path(path)

        def build(header: dict) -> None:
            _construct(
                cls, {k: _decode(v, lambda k: np.asarray(enc.arrays[k]), p) for k, v in header.items()}, p
            )

        _check_readable(cls.__name__, p, fields, build)
    save(path, enc.arrays, {"fields": fields}, kind=type(obj).__name__)


def _check_readable(kind: str, path: str, header: Any, build: Callable[[Any], Any]) -> None:
    """Read a result of ``kind`` about to be written to ``path`` back as its ``load`` would, before anything is
    written: ``build`` gets the ``header`` through JSON (as the file is written and read) and decodes and builds
    the result from it. What would make ``load`` refuse the file is a ValueError (not a
    :class:`FormatError`: nothing was read) ``"cannot save this <kind> to <path>: <what>; <kind>.load would refuse
    the file"``, ``<what>`` naming the field: a FormatError's own words (without its leading path), or, for
    another error (the result's own check failing, a value that does not decode), its type and words."""
    try:
        build(json.loads(json.dumps(header)))
    except FormatError as e:
        msg = str(e)
        for prefix in (f"{path!r} is corrupt: ", f"{path!r} "):
            if msg.startswith(prefix):
                msg = msg[len(prefix) :]
                break
        raise ValueError(
            f"cannot save this {kind} to {path!r}: {msg}; {kind}.load would refuse the file"
        ) from None
    except _DAMAGED as e:
        raise ValueError(
            f"cannot save this {kind} to {path!r}: its fields would not read back ({type(e).__name__}: {e}); "
            f"{kind}.load would refuse the file"
        ) from None


#: what a damaged header raises in :func:`_decode` and :func:`_members`, made a FormatError by :func:`load_result`
_DAMAGED = (TypeError, AttributeError, ValueError, KeyError, IndexError, OverflowError, RecursionError)


def load_result(cls: type, path: str | os.PathLike):
    """Read a ``cls`` written by :func:`save_result`; :class:`FormatError` naming the file for any other file: a
    damaged header (values that do not decode, fields of the wrong type or class, a member reference to a member
    the file lacks), a member the header does not reference (none is read), or a member that does not hold what
    its field declares. Only the members the header references are read."""
    path = _path(path)
    with _Archive(path, cls.__name__) as a:
        fields = a.meta.get("fields")
        if not isinstance(fields, dict):
            raise FormatError(f"{path!r} has no fields in its header, not a {cls.__name__} file")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(fields) - names
        if unknown:
            raise FormatError(f"{path!r} has fields {sorted(unknown)} that a {cls.__name__} does not have")

        def member(name) -> np.ndarray:
            if not isinstance(name, str) or name == _META or name not in a.infos:
                raise FormatError(
                    f"{path!r} is corrupt: its header names array {name!r} that the file does not hold"
                )
            return a.array(name)

        try:
            used = _members(fields, set())
            extra = sorted(set(a.names) - used)
            if extra:
                _check_required(cls, fields, path)  # the members of a field taken out: name the field
                more = " ..." if len(extra) > 5 else ""
                raise FormatError(
                    f"{path!r} is corrupt: it holds members {extra[:5]}{more} that its header does not reference"
                )
            return _construct(cls, {k: _decode(v, member, path) for k, v in fields.items()}, path)
        except FormatError:
            raise
        except _DAMAGED as e:
            raise FormatError(
                f"{path!r} is corrupt: its header does not describe a {cls.__name__} ({type(e).__name__}: {e})"
            ) from None


def _check_required(cls: type, fields: Mapping, path: str) -> None:
    """A FormatError naming the fields without a default (those every file of ``cls`` holds) that ``fields``
    lacks; nothing when it has them all (a field with a default may be absent: a file of an older version)."""
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.init
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
        and f.name not in fields
    ]
    if missing:
        raise FormatError(
            f"{path!r} is corrupt: its fields do not make a {cls.__name__}: it lacks the fields {missing} that a "
            f"{cls.__name__} needs"
        )


def _construct(cls: type, fields: dict, path: str):
    """``cls(**fields)``; a header whose fields do not build one (missing or ill-typed: a field annotated as a
    number, a string, a flag, an array, a tensor or a result class holding something else, an array of strings
    or records where numbers are declared; a class's own ``_check_loaded`` failing, e.g. arrays of inconsistent
    shapes) is a :class:`FormatError`."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # annotations that do not resolve here: no type check
        hints = {}
    for name, value in fields.items():
        if name in hints and not _fits(value, hints[name]):
            raise FormatError(
                f"{path!r} is corrupt: its field {name!r} holds {_type_text(value)} {_value_text(value)}, where "
                f"{cls.__name__} declares {_hint_text(hints[name])}"
            )
    _check_required(cls, fields, path)
    try:
        obj = cls(**fields)
        check = getattr(obj, "_check_loaded", None)
        if check is not None:
            check()
        return obj
    except FormatError:
        raise
    except _DAMAGED as e:
        raise FormatError(f"{path!r} is corrupt: its fields do not make a {cls.__name__} ({e})") from None


#: the annotations :func:`_fits` checks, and what each admits
_SIMPLE = {
    float: (int, float, np.integer, np.floating),
    int: (int, np.integer),
    bool: (bool, np.bool_),
    str: (str,),
    np.ndarray: (np.ndarray,),
    torch.Tensor: (torch.Tensor,),
}

#: the array dtype kinds a field annotated as an array admits: bool, integers, floats and complex numbers (not
#: strings, bytes, records, dates or objects)
_NUMERIC_KINDS = "biufc"


def _type_text(value) -> str:
    if isinstance(value, np.ndarray | torch.Tensor):
        return f"{type(value).__name__} of {value.dtype}"
    return type(value).__name__


def _value_text(value) -> str:
    if isinstance(value, np.ndarray | torch.Tensor):
        return f"of shape {tuple(value.shape)}"
    return _short(value, 40)


def _hint_text(hint) -> str:
    if hint is np.ndarray:
        return "an ndarray of numbers"
    return str(getattr(hint, "__name__", hint))


def _checked(hint) -> bool:
    """Whether :func:`_fits` checks values annotated ``hint`` (else it admits anything)."""
    return (
        hint in _SIMPLE or hint is type(None) or (isinstance(hint, type) and dataclasses.is_dataclass(hint))
    )


def _fits(value, hint) -> bool:
    """Whether ``value`` can be a field annotated ``hint``: checked for numbers, flags, strings, arrays (of
    numbers or flags), tensors and result dataclasses (of that class), and unions of them with None; any other
    annotation admits anything."""
    if hint in _SIMPLE:
        ok = _SIMPLE[hint]
        if not isinstance(value, ok) or (hint is not bool and isinstance(value, bool | np.bool_)):
            return False
        return hint is not np.ndarray or value.dtype.kind in _NUMERIC_KINDS
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return isinstance(value, hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        members = typing.get_args(hint)
        if value is None:
            return type(None) in members
        if all(_checked(m) for m in members):
            return any(_fits(value, m) for m in members if m is not type(None))
    return True


# ------------------------------------------------------------------------------------------------ fingerprint


def hash_tensor(t: torch.Tensor | np.ndarray) -> str:
    """A hash of a tensor's exact values: sha256 of its dtype, shape and bytes (first 16 hex digits). A tensor
    with a conjugate or negative bit is hashed by its values, a sparse one by its dense values, one of a dtype
    numpy lacks (float8, complex32) by its dtype's name and its bits."""
    if isinstance(t, torch.Tensor):
        t = t.detach()
        if t.layout != torch.strided:
            t = t.to_dense()
        t = t.resolve_conj().resolve_neg()
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        t = t.cpu().contiguous()
        try:
            a = t.numpy()
        except TypeError:  # a dtype numpy has no counterpart of
            bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
            h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(bits).numpy().tobytes())
            return h.hexdigest()[:16]
    else:
        a = np.asarray(t)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()[:16]


def hash_batch(batch) -> str:
    """A hash of a batch (tensors, arrays, numbers and strings in tuples, lists and dicts)."""
    h = hashlib.sha256()

    def walk(x):
        if isinstance(x, torch.Tensor | np.ndarray):
            h.update(hash_tensor(x).encode())
        elif isinstance(x, Mapping):
            h.update(b"{")
            for k in sorted(x, key=str):
                h.update(repr(k).encode())
                walk(x[k])
            h.update(b"}")
        elif isinstance(x, tuple | list):
            h.update(b"[")
            for y in x:
                walk(y)
            h.update(b"]")
        else:
            h.update(f"{type(x).__name__}:{x!r}".encode())

    walk(batch)
    return h.hexdigest()[:16]


def callable_id(fn: Callable | None) -> str | None:
    """A callable's identity: ``module.qualname`` (of its class for callable objects), with what makes two
    callables of one name compute different things: a ``functools.partial``'s arguments, a function's code,
    constants, defaults and closure values and the module globals it reads (values and functions), a callable
    object's attributes (a module's also its parameters and buffers). Values are canonicalised as in :func:`fingerprint` (tensors hashed; other objects by ``repr``)."""
    return None if fn is None else json.dumps(_callable_canon(fn, 0), sort_keys=True)


def callable_name(fn: Callable | None) -> str | None:
    """A callable's name only: ``module.qualname`` (of its class for callable objects; with the wrapped function
    for ``functools.partial``), the same in every process that defines it (unlike :func:`callable_id`, which also
    holds what the callable captured)."""
    if fn is None:
        return None
    inner = getattr(fn, "func", None)
    if inner is not None and hasattr(fn, "args"):
        return f"partial({callable_name(inner)})"
    target = fn if hasattr(fn, "__qualname__") else type(fn)
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', type(fn).__name__)}"


def _callable_canon(fn, depth: int):
    inner = getattr(fn, "func", None)  # functools.partial
    if inner is not None and hasattr(fn, "args"):
        return {
            "partial": _callable_canon(inner, depth + 1),
            "args": _canon(fn.args, depth + 1),
            "keywords": _canon(getattr(fn, "keywords", None) or {}, depth + 1),
        }
    name = callable_name(fn)
    if depth > 3:
        return name
    bound = getattr(fn, "__self__", None)
    code = getattr(getattr(fn, "__func__", fn), "__code__", None)
    if code is not None:  # a Python function (or a method of an object, whose attributes count too)
        f = getattr(fn, "__func__", fn)
        closure = [c.cell_contents for c in (f.__closure__ or ()) if _has_contents(c)]
        out = {
            "name": name,
            "code": _code_hash(code),
            "defaults": _canon(f.__defaults__ or (), depth + 1),
            "kwdefaults": _canon(f.__kwdefaults__ or {}, depth + 1),
            "closure": _canon(closure, depth + 1),
        }
        read = _globals_read(f)
        if read:
            out["globals"] = _canon(read, depth + 1)
        if bound is not None and not isinstance(bound, type | types.ModuleType):
            out["self"] = _object_canon(bound, depth + 1)
        return out
    if not hasattr(fn, "__qualname__"):  # a callable object (an nn.Module loss, a class with __call__)
        return {"name": name, "state": _object_canon(fn, depth + 1)}
    return name  # a builtin


def _globals_read(f) -> dict:
    """The values of the module globals a user's function reads (names in its code and nested code) that are
    settings, by name: a loss that reads a global scale computes another thing when the scale changes. Settings
    are numbers, strings, tensors, arrays and tuples of them, and functions (by their own code and globals);
    globals the function assigns (``global n; n += 1``), lists, dicts and other objects are state or too large to
    say, and are left out, as are the globals of library code (installed packages, the standard library,
    pypattern itself), whose functions are known by name."""
    if _library_code(f):
        return {}
    g = getattr(f, "__globals__", None)
    if not isinstance(g, dict):
        return {}
    names: set[str] = set()
    assigned: set[str] = set()
    codes = [f.__code__]
    while codes:
        c = codes.pop()
        names.update(c.co_names)
        assigned.update(
            i.argval for i in dis.get_instructions(c) if i.opname in ("STORE_GLOBAL", "DELETE_GLOBAL")
        )
        codes.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
    plain = (type(None), bool, int, float, complex, str, bytes, np.generic, torch.Tensor, np.ndarray)

    def setting(v, depth: int = 0) -> bool:
        if isinstance(v, plain):
            return True
        return depth < 2 and isinstance(v, tuple | frozenset) and all(setting(x, depth + 1) for x in v)

    return {
        n: (sorted(map(repr, g[n])) if isinstance(g[n], frozenset) else g[n])
        for n in sorted(names - assigned)
        if n in g and (setting(g[n]) or isinstance(g[n], types.FunctionType))
    }


def _library_code(f) -> bool:
    """Whether ``f`` is pypattern's, an installed package's or the standard library's."""
    if (getattr(f, "__module__", None) or "").split(".")[0] == __name__.split(".")[0]:
        return True
    filename = os.path.abspath(getattr(getattr(f, "__code__", None), "co_filename", "") or "")
    return any(root and filename.startswith(root + os.sep) for root in _LIBRARY_ROOTS)


_LIBRARY_ROOTS = tuple(
    {
        os.path.abspath(p)
        for k in ("stdlib", "platstdlib", "purelib", "platlib")
        if (p := sysconfig.get_paths().get(k))
    }
)


def _has_contents(cell) -> bool:
    try:
        _ = cell.cell_contents
    except ValueError:  # an empty cell (a name assigned after the function was made)
        return False
    return True


def _object_canon(obj, depth: int):
    """An object's attributes (a module's: its plain attributes, parameters and buffers), canonicalised."""
    state = {}
    if isinstance(obj, torch.nn.Module):
        state["tensors"] = {n: hash_tensor(t) for n, t in obj.state_dict(keep_vars=True).items()}
        attrs = {k: v for k, v in vars(obj).items() if not k.startswith("_") and k != "training"}
    else:
        attrs = {k: v for k, v in getattr(obj, "__dict__", {}).items() if not k.startswith("__")}
    state["attrs"] = {
        k: _canon(v, depth + 1) if depth < 3 else type(v).__name__ for k, v in sorted(attrs.items())
    }
    code = _methods_code(type(obj))
    if code:  # a user's class: what its methods compute (a library class is known by its name and attributes)
        state["code"] = code
    return state


def _methods_code(cls: type) -> dict[str, str]:
    """The code of the functions the user's classes in ``cls``'s MRO define (``Class.method`` -> hash), leaving
    out library code (:func:`_library_code`): an edited ``__call__`` or ``forward`` of a user's metric or loss
    changes it."""
    out = {}
    for c in cls.__mro__:
        for name, f in vars(c).items():
            f = getattr(f, "__func__", f)  # static and class methods
            if isinstance(f, types.FunctionType) and not _library_code(f):
                out[f"{c.__qualname__}.{name}"] = _code_hash(f.__code__)
    return out


def _canon(v, depth: int = 0):
    """A JSON value for ``v``: tuples and lists alike, numbers as Python numbers, tensors and arrays hashed,
    callables as in :func:`callable_id`; anything else by ``repr`` (without a default repr's memory address)."""
    if v is None or isinstance(v, bool | str):
        return v
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else repr(v)
    if isinstance(v, torch.Tensor | np.ndarray):
        return hash_tensor(v)
    if isinstance(v, Mapping):
        return {str(k): _canon(x, depth) for k, x in v.items()}
    if isinstance(v, tuple | list | range):
        return [_canon(x, depth) for x in v]
    if callable(v) and not isinstance(v, type):
        return _callable_canon(v, depth)
    return _ADDRESS.sub(">", repr(v))


#: the " at 0x7f..." of a default repr, which differs between processes
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+>")


def _code_hash(code) -> str:
    """A hash of a code object's byte code and constants (nested code objects by their own hash)."""
    h = hashlib.sha256(code.co_code)
    for c in code.co_consts:
        h.update(_code_hash(c).encode() if isinstance(c, types.CodeType) else repr(c).encode())
    h.update(repr(code.co_names).encode())
    return h.hexdigest()[:16]


def fingerprint(**items) -> dict[str, Any]:
    """The fingerprint of a run: its ``items`` in order, canonicalised (tuples and lists alike; tensors, arrays
    and numbers by value; tensors and arrays as a hash of their bytes; callables by name)."""
    return {k: _canon(v) for k, v in items.items()}


class _NotSet:
    """An item one fingerprint lacks: runs leave items at their defaults out of their fingerprints. Shown as the
    default's value when the run that checks the fingerprint knows it, else as "not set"."""

    _UNKNOWN = object()

    def __init__(self, default: Any = _UNKNOWN):
        self.default = default

    def __repr__(self) -> str:
        if self.default is _NotSet._UNKNOWN:
            return "(not set: the default)"
        return f"{self.default!r} (the default)"


def _short(v, n: int = 120) -> str:
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def _first_difference(where: str, a, b) -> tuple[str, Any, Any]:
    """The path and values of the first place where two canonical values differ (``loss_fn.keywords.alpha``)."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for k in [*b, *(k for k in a if k not in b)]:
            if k not in a or k not in b or a[k] != b[k]:
                if k in a and k in b:
                    return _first_difference(f"{where}.{k}", a[k], b[k])
                return f"{where}.{k}", a.get(k, _NotSet()), b.get(k, _NotSet())
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_difference(f"{where}[{i}]", x, y)
    return where, a, b


def check_fingerprint(
    stored: Mapping[str, Any],
    current: Mapping[str, Any],
    path: str | os.PathLike,
    defaults: Mapping[str, Any] | None = None,
) -> None:
    """Raise :class:`FingerprintMismatch` naming the first item (in the current fingerprint's order, then the
    stored one's) whose values differ; nothing when they are equal. An item one fingerprint lacks (a run leaves
    items at their defaults out) differs from any value the other holds; the message shows it as its value in
    ``defaults`` (the values the run leaves out), else as not set."""
    path = _path(path)
    if not isinstance(stored, Mapping):
        raise FormatError(f"{path!r} has no fingerprint in its header")
    defaults = defaults or {}
    for k in [*current, *(k for k in stored if k not in current)]:
        missing = _NotSet(defaults[k]) if k in defaults else _NotSet()
        a, b = stored.get(k, missing), current.get(k, missing)
        if a != b:
            where, x, y = _first_difference(k, a, b)
            detail = (
                "" if where == k else f" (first difference: {where} = {_short(x)} there, {_short(y)} now)"
            )
            if (
                k in _HASHED_ITEMS
                and where == k
                and not isinstance(a, _NotSet)
                and not isinstance(b, _NotSet)
            ):
                detail = f" ({_HASHED_ITEMS[k]})"
            raise FingerprintMismatch(
                f"checkpoint {path!r} was written by a different run: {k} = {_short(a)} there, {_short(b)} now"
                f"{detail}. "
                "Use another checkpoint path, or delete this one to start afresh.",
                path=path,
                item=k,
                stored=a,
                current=b,
            )


#: what differs when a hashed fingerprint item does (a mismatch shows two hashes)
_HASHED_ITEMS = {
    "architecture": "a hash of the model's module tree and configuration: a size, layer type, activation, dtype or "
    "any other field of its configuration differs",
    "data": "a hash of the data: their values, dtype, order, batching or sampler differ",
}


class Saveable:
    """Mixin for result dataclasses: :meth:`save` and :meth:`load` through :func:`save_result` and
    :func:`load_result` (decorate the class with :func:`register`)."""

    def save(self, path: str | os.PathLike) -> None:
        """Write to ``path``: an ``.npz`` of the arrays with a JSON header for the rest (atomic, no pickle)."""
        save_result(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike):
        """Read a result written by :meth:`save`; a pickle, a truncated file or another kind of result raises
        :class:`FormatError` naming the file. Tensors come back on the CPU, in the dtype they were saved in (move
        them with ``.to(device)``); arrays, NumPy scalars, tuples, dicts and nested results as they were saved."""
        return load_result(cls, path)
