"""devinterp's public calls on pypattern: change only the import.

==================================================== =========================================================
devinterp                                            pypattern
==================================================== =========================================================
``from devinterp.slt.llc import llc``                ``from pypattern.devinterp.slt.llc import llc``
``from devinterp.slt.sampling import sample``        ``from pypattern.devinterp.slt.sampling import sample``
``from devinterp.slt.susceptibilities import ...``   ``from pypattern.devinterp.slt.susceptibilities import ...``
``from devinterp.slt.bif import bif``                ``from pypattern.devinterp.slt.bif import bif``
``from devinterp.slt.weight_restrictions import *``  ``from pypattern.devinterp.slt.weight_restrictions import *``
``from devinterp.slt.sampler import estimate_...``   ``from pypattern.devinterp.slt.sampler import estimate_...``
``from devinterp.slt.sampler import sample`` (1.x)   ``from pypattern.devinterp.slt.sampler import sample``
``from devinterp.slt.llc import LLCEstimator``       ``from pypattern.devinterp.slt.llc import LLCEstimator``
``from devinterp.slt.callback import ...``           ``from pypattern.devinterp.slt.callback import ...``
``from devinterp.optim.sgld import SGLD``            ``from pypattern.devinterp.optim.sgld import SGLD``
``from devinterp.optim.sgnht import SGNHT``          ``from pypattern.devinterp.optim.sgnht import SGNHT``
``from devinterp.optim import SGMCMC``               ``from pypattern.devinterp.optim import SGMCMC``
``from devinterp.utils import default_nbeta``        ``from pypattern.devinterp.utils import default_nbeta``
==================================================== =========================================================

and all of them from ``pypattern.devinterp`` itself. devinterp 2.0.1's calls (:func:`sample`, :func:`llc`,
:func:`susceptibilities`, :func:`bif` and their ``compute_*`` halves) take its arguments (``lr``, ``n_beta``,
``param_masks``, ``batch_size``, ``init_seed``, ``llc_weight_decay``, ``noise_level``, ``bounding_box_size``, ...)
and return its result names and shapes, as numpy arrays in a :class:`DevinterpResult` (a dict whose keys also
read as attributes: ``res.llc_mean``, ``res["loss_trace"]``) instead of xarray / Zarr objects. devinterp 1.x's
``estimate_learning_coeff(_with_summary)`` are :mod:`pypattern.sampling.llc`'s, its callback interface
(``sample(model, loader, callbacks)``, ``LLCEstimator``, ``OnlineLLCEstimator``) :mod:`pypattern.devinterp.v1`'s. The chains are pypattern's
(:func:`pypattern.sample`, the fused SGLD step): noise and data order are keyed by ``init_seed`` (1.x: ``seed``)
and the chain, so the numbers equal pypattern's native calls with the same settings, and agree with devinterp's
within their standard errors (not draw for draw) for a model without dropout (see below).

Data: ``dataset`` is anything with an ``"input_ids"`` column of equal-length token sequences (a Hugging Face
``Dataset``, a dict of lists or tensors), or a token tensor ``(num_sequences, seq_len)``. Losses are per token:
``loss_fn(model, input_ids) -> (batch, seq_len - 1)``; the default is next-token cross-entropy on the model's
logits (``model(input_ids)``, its ``.logits``, or the first element of a tuple).

What differs from devinterp 2.0.1, by design: with ``shuffle=True`` each chain reads its own keyed order of the
sampling data (``match_sampling_input_ids_across_chains`` only chooses, as in devinterp, whether every chain's
``L_n(w*)`` reads the batches of ``init_seed`` or of ``init_seed + chain``; ``shuffle=False`` gives every chain
the dataset order); observables are evaluated at a draw's weights before its step; ``output_path``,
``save_metrics=True``, ``init_noise`` and RMSprop-SGLD's ``add_grad_correction=True`` raise
``NotImplementedError`` naming the argument; devinterp calls ``model.train()`` for ``L_n(w*)``, the chains and
the observables (a model with dropout is sampled with its dropout on, whatever mode it was given in), where
pypattern samples such a model in ``eval()`` mode (deterministic draws, exact resume), with a warning in either
mode: the LLC and susceptibilities of a model with dropout differ from devinterp's (set its dropout
probabilities to 0 to compare the two); a chain
whose loss or weights stop being finite raises :class:`pypattern.sampling.SamplingDivergedError` naming the chain
and step (devinterp warns, keeps the NaN steps and leaves them out of ``compute_llc``: catch the error in a sweep
over ``lr`` and ``n_beta``); 16-bit models (bfloat16, float16) are refused by name, as by :func:`pypattern.sample`
(sample a float32 copy); results hold float32 arrays where devinterp's are float32 (the LLC's arrays, the loss and
observable traces, the susceptibilities, the BIF's influences; the sums behind them are taken in float64, where
devinterp's are float32, so the two agree to float32 rounding on the same draws), and the ``wr`` names as Python
strings (devinterp: a numpy string array).
``sampling_method`` takes devinterp 2.x's ``"sgmcmc_sgld"`` and
``"rmsprop_sgld"`` (with ``sampling_method_kwargs`` ``alpha`` / ``eps``, or ``rmsprop_alpha`` / ``rmsprop_eps``),
and ``"sgnht"`` too (``sampling_method_kwargs={"diffusion_factor": ...}``): the fused samplers of
:func:`pypattern.sample`'s ``sampler``.

Burn-in: devinterp's calls always sample at a given step (``lr``; devinterp 1.x's ``optimizer_kwargs`` default
``lr=0.01``), so they keep devinterp's ``num_burnin_steps=0`` default, as :func:`pypattern.estimate_llc` does at a
given step; the rule of ``num_burnin_steps="auto"`` (:func:`pypattern.sampling.auto.burnin_for_run`) is for a
step that :func:`pypattern.estimate_llc` calibrates (``step_size="auto"``), which devinterp's calls do not take.
"""

from __future__ import annotations

import math
import numbers
import random
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import nn

from .._checks import device_arg, is_count, is_real
from ..losses import check_vocab_ids
from ..sampling.llc import (
    default_nbeta,
    estimate_learning_coeff,
    estimate_learning_coeff_with_summary,
    on_device,
    resolve_device,
)
from ..sampling.optim import SGLD
from ..sampling.runner import _eval_mode_for_dropout
from ..sampling.runner import sample as _native_sample
from ..sampling.samplers import (
    SAMPLER_HYPERPARAMETERS,
    SGNHT,
    RMSpropSGLD,
    sampler_hyperparameters,
    sampler_name,
)
from ..sampling.vocabulary import DEVINTERP_NAMES, HYPERPARAMETERS
from .optim.sgmcmc import SGMCMC

__all__ = [
    "SGLD",
    "SGMCMC",
    "SGNHT",
    "RMSpropSGLD",
    "DevinterpResult",
    "Variable",
    "bif",
    "compute_bif",
    "compute_llc",
    "compute_susceptibilities",
    "create_param_masks",
    "default_nbeta",
    "estimate_learning_coeff",
    "estimate_learning_coeff_with_summary",
    "llc",
    "per_token_loss",
    "sample",
    "susceptibilities",
]

ParamMasks = Mapping[str, "torch.Tensor | None"]


_XARRAY_ONLY = frozenset(
    {
        "assign",
        "assign_attrs",
        "assign_coords",
        "bfill",
        "broadcast_like",
        "chunk",
        "coarsen",
        "combine_first",
        "compute",
        "count",
        "cumulative",
        "diff",
        "differentiate",
        "drop_sel",
        "drop_vars",
        "dropna",
        "expand_dims",
        "ffill",
        "fillna",
        "groupby",
        "groupby_bins",
        "head",
        "idxmax",
        "idxmin",
        "integrate",
        "interp",
        "interp_like",
        "isnull",
        "load",
        "map",
        "notnull",
        "pipe",
        "plot",
        "polyfit",
        "quantile",
        "reduce",
        "reindex",
        "reindex_like",
        "rename",
        "resample",
        "rolling",
        "rolling_exp",
        "set_index",
        "shift",
        "sortby",
        "stack",
        "swap_dims",
        "tail",
        "thin",
        "to_dataset",
        "to_netcdf",
        "to_series",
        "to_zarr",
        "unstack",
        "weighted",
        "where",
    }
)


class _XarrayOnly(NotImplementedError, AttributeError):
    """An xarray method a result does not provide (an ``AttributeError`` too, so ``hasattr`` answers False)."""


def _refuse_xarray(owner: str, name: str):
    return _XarrayOnly(
        f"{owner}.{name} is an xarray method that pypattern's devinterp results do not provide; they answer "
        "sizes, dims, coords, isel, sel, mean, std, var, sum, prod, min, max, median, to_dataframe and to_pandas "
        f"(data_vars, attrs on a result): read the numpy array with .values for anything else"
    )


def _indexers(method: str, indexers, kw: dict, options: dict | None = None) -> dict:
    """The ``{dim: indexer}`` of an ``isel`` / ``sel`` call, given as a mapping or as keywords."""
    for k, v in (options or {}).items():
        if v not in (None, False, "raise"):
            raise NotImplementedError(
                f"{method}({k}={v!r}) is not supported: give exact positions or labels, or index .values"
            )
    if indexers is not None and not isinstance(indexers, Mapping):
        raise TypeError(f"{method}: indexers must be a mapping {{dim: index}}, got {type(indexers).__name__}")
    if indexers is not None and kw:
        raise ValueError(f"{method}: give indexers as a mapping or as keywords, not both")
    return dict(indexers if indexers is not None else kw)


def _take(method: str, values: np.ndarray, axis: int, k, dim: str) -> np.ndarray:
    """``values`` indexed along ``axis`` by an int (the axis is dropped), a slice or a 1-D list of ints or
    booleans, as xarray's ``isel`` does for each dimension."""
    if isinstance(k, slice):
        return values[(slice(None),) * axis + (k,)]
    if isinstance(k, numbers.Integral) and not isinstance(k, bool):
        out = np.take(values, _in_range(int(k), values.shape[axis], axis), axis=axis)
        return out if isinstance(out, np.ndarray) else np.array(out, dtype=values.dtype)  # an object element
    idx = np.asarray(k)
    if idx.ndim == 1 and (idx.dtype.kind in "iub" or idx.size == 0):
        if idx.dtype.kind == "b":
            if idx.size != values.shape[axis]:
                raise IndexError(
                    f"{method}({dim}=...): boolean index of length {idx.size} for dimension {dim!r} of length "
                    f"{values.shape[axis]}"
                )
            idx = np.flatnonzero(idx)
        for i in idx:
            _in_range(int(i), values.shape[axis], axis)
        return np.take(values, idx.astype(np.intp), axis=axis)
    raise TypeError(
        f"{method}({dim}=...) takes an int, a slice or a 1-D list of ints or booleans, got "
        f"{type(k).__name__}; index .values for other selections"
    )


def _in_range(i: int, n: int, axis: int) -> int:
    if not -n <= i < n:
        raise IndexError(f"index {i} is out of bounds for axis {axis} with size {n}")
    return i


def _isel_array(method: str, values, dims: tuple[str, ...], idx: Mapping[str, Any]):
    """``(values, dims)`` of an array with axes ``dims`` after the positional indexers ``idx`` (the dimensions
    it does not have are left alone)."""
    values = np.asarray(values)
    for axis in reversed(
        range(len(dims))
    ):  # from the last axis: dropping one leaves the earlier ones in place
        if dims[axis] in idx:
            values = _take(method, values, axis, idx[dims[axis]], dims[axis])
    kept = tuple(d for d in dims if not (d in idx and isinstance(idx[d], numbers.Integral)))
    return values, kept


def _label_positions(dim: str, labels: np.ndarray, key):
    """xarray's ``sel`` on an index coordinate: the positions of ``key`` (a label, a list of labels, or a slice
    of labels, both ends included)."""

    def loc(label):
        hits = np.flatnonzero(labels == label)
        if hits.size == 1:
            return int(hits[0])
        if hits.size == 0:
            raise KeyError(f"{label!r} is not a label of coordinate {dim!r}; labels are {labels.tolist()}")
        raise NotImplementedError(f"sel({dim}={label!r}): the label occurs {hits.size} times; index .values")

    if isinstance(key, slice):
        start = 0 if key.start is None else loc(key.start)
        stop = len(labels) if key.stop is None else loc(key.stop) + 1
        return slice(start, stop, key.step)
    if isinstance(key, list | tuple | np.ndarray):
        return [loc(v) for v in key]
    return loc(key)


def _reduce_dims(method: str, dims: tuple[str, ...], dim, axis) -> tuple[str, ...]:
    """The dimensions a reduction ``method(dim=, axis=)`` runs over (``dim=None`` and ``axis=None``: all)."""
    if dim is not None and axis is not None:
        raise ValueError(f"{method}: give dim or axis, not both")
    if isinstance(dim, numbers.Integral) and not isinstance(dim, bool):  # numpy's positional axis
        dim, axis = None, dim
    if axis is not None:
        axes = [axis] if isinstance(axis, numbers.Integral) else list(axis)
        try:
            return tuple(dims[a] for a in axes)
        except IndexError:
            raise ValueError(f"{method}: axis={axis!r} out of range for dimensions {dims}") from None
    if dim is None or dim is Ellipsis:
        return dims
    names = [dim] if isinstance(dim, str) else list(dim)
    for d in names:
        if d not in dims:
            raise ValueError(f"{method}: {d!r} not found in array dimensions {dims}")
    return tuple(names)


_REDUCTIONS = {
    # name: (numpy function, nan-skipping numpy function)
    "mean": (np.mean, np.nanmean),
    "std": (np.std, np.nanstd),
    "var": (np.var, np.nanvar),
    "sum": (np.sum, np.nansum),
    "prod": (np.prod, np.nanprod),
    "min": (np.min, np.nanmin),
    "max": (np.max, np.nanmax),
    "median": (np.median, np.nanmedian),
}


def _reduce_array(method: str, values, dims, over, skipna=None, ddof=0, dtype=None):
    values = np.asarray(values)
    plain, nan = _REDUCTIONS[method]
    skip = values.dtype.kind in "fc" if skipna is None else bool(skipna)
    fn = nan if skip else plain
    kw = {}
    if method in ("std", "var"):
        kw["ddof"] = ddof
    if dtype is not None:
        kw["dtype"] = dtype
    axes = tuple(dims.index(d) for d in over)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN slice gives NaN, as in xarray
        out = fn(values, axis=axes, **kw) if axes else values
    return np.asarray(out), tuple(d for d in dims if d not in over)


def _pandas_index(dim: str, n: int, coords: Mapping[str, tuple]):
    import pandas as pd

    c = coords.get(dim)
    if c is not None and c[0] == (dim,):
        return pd.Index(np.asarray(c[1]), name=dim)
    return pd.RangeIndex(n, name=dim)


def _dataframe(dims, shape, columns: list[tuple[str, tuple, np.ndarray]], coords):
    """A DataFrame indexed by every combination of ``dims`` (a MultiIndex for more than one), with each column
    ``(name, its dims, values)`` broadcast over them, as xarray's ``to_dataframe``."""
    import pandas as pd

    levels = [_pandas_index(d, n, coords) for d, n in zip(dims, shape, strict=True)]
    index = levels[0] if len(levels) == 1 else pd.MultiIndex.from_product(levels, names=list(dims))
    data = {}
    for name, cdims, v in columns:
        v = np.asarray(v)
        order = [cdims.index(d) for d in dims if d in cdims]
        v = np.transpose(v, order)
        expand = tuple(slice(None) if d in cdims else None for d in dims)
        data[name] = np.broadcast_to(v[expand], tuple(shape)).reshape(-1)
    return pd.DataFrame(data, index=index)


class Variable(np.ndarray):
    """A numpy array that also answers the xarray ``DataArray`` calls devinterp users make on a result variable:
    ``.values`` and ``.to_numpy()`` (the plain array), ``.dims`` (the axis names), ``.sizes``, ``.name``,
    ``.coords`` (the result's coordinates along its dimensions), ``.isel`` / ``.sel`` (an int, a slice or a list
    per dimension; ``sel`` reads labels of an index coordinate, positions where the dimension has none), the
    reductions ``mean``, ``std`` (``ddof=0``), ``var``, ``sum``, ``prod``, ``min``, ``max`` and ``median`` over
    ``dim`` (skipping NaN in float arrays, as xarray), ``.to_dataframe(name=)`` and ``.to_pandas()``, besides
    ``float()``, ``.item()`` and numpy arithmetic (whose results are plain numpy arrays). Other xarray methods
    raise ``NotImplementedError``."""

    dims: tuple[str, ...]

    def __new__(cls, data, dims: Sequence[str] = (), name=None, coords=None) -> Variable:
        obj = np.asarray(data).view(cls)
        obj.dims = tuple(dims)
        if len(obj.dims) != obj.ndim:
            raise ValueError(f"dims {obj.dims} name {len(obj.dims)} axes of an array of shape {obj.shape}")
        obj.name = name
        obj._coords = dict(coords or {})  # name -> (dims, values)
        return obj

    def __array_finalize__(self, obj) -> None:
        same = getattr(obj, "shape", None) == self.shape
        # an array numpy reshaped or indexed has no dimension names (None): it answers numpy's calls only
        self.dims = getattr(obj, "dims", ()) if same else (() if self.ndim == 0 else None)
        self.name = getattr(obj, "name", None) if same else None
        self._coords = getattr(obj, "_coords", {}) if same else {}

    def __getitem__(self, key):
        """Positional indexing: ints and slices (one per leading axis) index as ``isel`` does, keeping the
        dimension names; any other key gives numpy's result as a plain array."""
        keys = key if isinstance(key, tuple) else (key,)
        basic = all(
            isinstance(k, slice) or (isinstance(k, numbers.Integral) and not isinstance(k, bool))
            for k in keys
        )
        if self.dims is None or not basic or len(keys) > self.ndim:
            return self.view(np.ndarray)[key]
        return self.isel(dict(zip(self.dims, keys, strict=False)))

    def __reduce__(self):
        return (_rebuild_variable, (self.values, self.dims, self.name, self._coords))

    def transpose(self, *dims, **kwargs):
        """xarray's ``transpose``: the axes in the order of ``dims`` (names or numpy's axis numbers; none:
        reversed), the names following them."""
        if len(dims) == 1 and (dims[0] is None or isinstance(dims[0], tuple | list)):
            dims = () if dims[0] is None else tuple(dims[0])
        if self.dims is None or kwargs:
            return self.view(np.ndarray).transpose(*dims, **kwargs)
        if not dims:
            order = list(reversed(range(self.ndim)))
        elif all(isinstance(d, str) for d in dims):
            if sorted(dims) != sorted(self.dims):
                raise ValueError(f"transpose: {dims} must be a permutation of the dimensions {self.dims}")
            order = [self.dims.index(d) for d in dims]
        else:
            order = [int(a) % max(self.ndim, 1) for a in dims]
        return self._with(self.values.transpose(order), tuple(self.dims[i] for i in order))

    @property
    def T(self):
        return self.transpose()

    def swapaxes(self, axis1, axis2):
        order = list(range(self.ndim))
        order[axis1], order[axis2] = order[axis2], order[axis1]
        return self.transpose(*order)

    def _named(self, method: str) -> None:
        if self.dims is None:
            raise TypeError(
                f"{method}: this array has no dimension names (numpy reshaped or indexed it); index the "
                "variable with isel/sel, or use .values"
            )

    def __array_wrap__(self, arr, context=None, return_scalar=False):
        arr = np.asarray(arr)
        return arr[()] if return_scalar else arr

    def __getattr__(self, name: str):
        if name in _XARRAY_ONLY:
            raise _refuse_xarray("Variable", name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def values(self) -> np.ndarray:
        return self.view(np.ndarray)

    def to_numpy(self) -> np.ndarray:
        return self.view(np.ndarray)

    @property
    def sizes(self) -> Mapping[str, int]:
        self._named("sizes")
        return MappingProxyType(dict(zip(self.dims, self.shape, strict=True)))

    @property
    def attrs(self) -> dict:
        return {}

    @property
    def coords(self) -> Mapping[str, Variable]:
        return MappingProxyType({k: Variable(v, d, name=k) for k, (d, v) in self._coords.items()})

    def _with(self, values, dims, idx=None, over=()) -> Variable:
        coords = {}
        for k, (d, v) in self._coords.items():
            if any(x in over for x in d):
                continue  # a reduction drops the coordinates along the dimensions it reduces
            if idx:
                v, d = _isel_array("isel", v, d, idx)
            coords[k] = (d, v)
        return Variable(values, dims, name=self.name, coords=coords)

    def isel(self, indexers=None, drop=False, missing_dims="raise", **indexers_kwargs) -> Variable:
        """xarray's ``isel``: positions per dimension (an int drops the dimension; a slice or a 1-D list of
        ints or booleans keeps it), applied to each dimension independently."""
        self._named("isel")
        idx = _indexers("isel", indexers, indexers_kwargs, {"drop": drop, "missing_dims": missing_dims})
        bad = set(idx) - set(self.dims)
        if bad:
            raise ValueError(f"isel: dimensions {bad} do not exist; expected one or more of {self.dims}")
        values, dims = _isel_array("isel", self.values, self.dims, idx)
        return self._with(values, dims, idx)

    def sel(self, indexers=None, method=None, tolerance=None, drop=False, **indexers_kwargs) -> Variable:
        """xarray's ``sel``: labels of the dimension's index coordinate (a label, a list, or a slice including
        both ends), or positions where the dimension has no coordinate (as xarray does)."""
        self._named("sel")
        opts = {"method": method, "tolerance": tolerance, "drop": drop}
        idx = _indexers("sel", indexers, indexers_kwargs, opts)
        return self.isel(_positions("sel", idx, self.dims, self._coords))

    def _reduce(self, method, dim, axis, skipna, ddof=0, dtype=None, out=None, keepdims=False, **kw):
        if self.dims is None:  # numpy's reduction, on an array without dimension names
            if skipna:
                raise TypeError(f"{method}(skipna=True): this array has no dimension names; use .values")
            args = {
                "axis": axis if dim is None else dim,
                "dtype": dtype,
                "out": out,
                "keepdims": keepdims,
                **kw,
            }
            if method in ("std", "var"):
                args["ddof"] = ddof
            if method == "median":
                return np.median(self.values, **{k: v for k, v in args.items() if k not in ("dtype",)})
            return getattr(self.values, method)(**{k: v for k, v in args.items() if v is not None})
        if kw:
            raise TypeError(f"{method}() got unexpected arguments {sorted(kw)}")
        if out is not None or keepdims:
            raise NotImplementedError(f"{method}(out=, keepdims=True) is not supported; reduce .values")
        over = _reduce_dims(method, self.dims, dim, axis)
        values, dims = _reduce_array(method, self.values, self.dims, over, skipna, ddof, dtype)
        return self._with(values, dims, over=over)

    def mean(self, dim=None, *, axis=None, skipna=None, keep_attrs=None, **kw) -> Variable:
        """xarray's ``mean`` over ``dim`` (a name or a list; None: all), skipping NaN in float arrays."""
        return self._reduce("mean", dim, axis, skipna, **kw)

    def std(self, dim=None, *, axis=None, skipna=None, ddof=0, keep_attrs=None, **kw) -> Variable:
        """xarray's ``std`` over ``dim`` (``ddof=0`` by default), skipping NaN in float arrays."""
        return self._reduce("std", dim, axis, skipna, ddof=ddof, **kw)

    def var(self, dim=None, *, axis=None, skipna=None, ddof=0, keep_attrs=None, **kw) -> Variable:
        """xarray's ``var`` over ``dim`` (``ddof=0`` by default), skipping NaN in float arrays."""
        return self._reduce("var", dim, axis, skipna, ddof=ddof, **kw)

    def sum(self, dim=None, *, axis=None, skipna=None, keep_attrs=None, **kw) -> Variable:
        """xarray's ``sum`` over ``dim``, skipping NaN in float arrays (an all-NaN sum is 0)."""
        return self._reduce("sum", dim, axis, skipna, **kw)

    def prod(self, dim=None, *, axis=None, skipna=None, keep_attrs=None, **kw) -> Variable:
        return self._reduce("prod", dim, axis, skipna, **kw)

    def min(self, dim=None, *, axis=None, skipna=None, keep_attrs=None, **kw) -> Variable:
        return self._reduce("min", dim, axis, skipna, **kw)

    def max(self, dim=None, *, axis=None, skipna=None, keep_attrs=None, **kw) -> Variable:
        return self._reduce("max", dim, axis, skipna, **kw)

    def median(self, dim=None, *, axis=None, skipna=None, keep_attrs=None, **kw) -> Variable:
        return self._reduce("median", dim, axis, skipna, **kw)

    def to_pandas(self):
        """xarray's ``to_pandas``: the array for 0 dimensions, a ``Series`` indexed by the dimension for 1, a
        ``DataFrame`` (rows: first dimension, columns: second) for 2."""
        import pandas as pd

        self._named("to_pandas")
        if self.ndim == 0:
            return self.values
        idx = [_pandas_index(d, n, self._coords) for d, n in zip(self.dims, self.shape, strict=True)]
        if self.ndim == 1:
            return pd.Series(self.values, index=idx[0], name=self.name)
        if self.ndim == 2:
            return pd.DataFrame(self.values, index=idx[0], columns=idx[1])
        raise ValueError(
            f"to_pandas: cannot convert an array with {self.ndim} dimensions into a pandas object (2 or fewer); "
            "use to_dataframe()"
        )

    def to_dataframe(self, name=None, dim_order=None):
        """xarray's ``to_dataframe``: one row per combination of the dimensions (a ``MultiIndex`` for more than
        one, labelled by index coordinates or positions), the other coordinates and the values (column ``name``,
        by default the variable's name) as columns."""
        self._named("to_dataframe")
        if dim_order is not None:
            raise NotImplementedError("to_dataframe(dim_order=...) is not supported; use .isel/.values")
        name = self.name if name is None else name
        if name is None:
            raise ValueError("to_dataframe: the variable has no name; give name=")
        if self.ndim == 0:
            raise ValueError("to_dataframe: cannot convert a scalar to a DataFrame")
        cols = [(k, d, v) for k, (d, v) in self._coords.items() if d != (k,) and not d]
        cols += [(k, d, v) for k, (d, v) in self._coords.items() if d != (k,) and d]
        cols.append((name, self.dims, self.values))
        return _dataframe(self.dims, self.shape, cols, self._coords)


def _rebuild_variable(values, dims, name, coords) -> Variable:
    obj = np.asarray(values).view(Variable)
    obj.dims, obj.name, obj._coords = dims, name, dict(coords)
    return obj


def _positions(method: str, idx: Mapping[str, Any], dims, coords: Mapping[str, tuple]) -> dict:
    """``sel``'s labels as ``isel`` positions: through the dimension's index coordinate, or as positions where
    the dimension has none."""
    out = {}
    for d, key in idx.items():
        if d not in dims:
            if d in coords:
                raise NotImplementedError(
                    f"{method}({d}=...): {d!r} is a coordinate along {coords[d][0]}, not a dimension; select "
                    f"with a boolean mask of .values"
                )
            raise KeyError(f"{method}: {d!r} is not a dimension; dimensions are {tuple(dims)}")
        c = coords.get(d)
        out[d] = _label_positions(d, np.asarray(c[1]), key) if c is not None and c[0] == (d,) else key
    return out


class DevinterpResult(dict):
    """devinterp 2.x's result variables as numpy arrays: a dict whose keys read as attributes too
    (``res.llc_mean`` is ``res["llc_mean"]``). A variable read from it is a :class:`Variable` (a numpy array
    with xarray's ``DataArray`` reads), so ``float(res["llc_mean"])``, ``res["llc_per_chain"].values`` and
    ``res.init_loss.item()`` read as they do on devinterp's xarray results. As an xarray ``Dataset``, a result
    has ``sizes`` and ``dims`` (dimension name -> length), ``data_vars`` and ``coords`` (name -> variable),
    ``attrs`` (devinterp's attributes), ``isel`` / ``sel``, the reductions ``mean``, ``std`` (``ddof=0``),
    ``var``, ``sum``, ``prod``, ``min``, ``max`` and ``median`` over ``dim``, and ``to_dataframe()``; other
    xarray methods raise ``NotImplementedError``. ``dataset`` is the result itself (devinterp's
    ``DataTree.dataset``). A tree (the susceptibilities) holds its children as entries, read by name or by path
    (``res["/susceptibilities/sus"]``). ``_dims`` (variable -> dimension names), ``_attrs`` and ``_coords``
    (coordinate -> values, its dimensions in ``_dims``) given to the constructor are kept, not as entries."""

    def __init__(self, *args, _dims=None, _attrs=None, _aliases=None, _coords=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._dims_ = dict(_dims or {})
        self._attrs_ = dict(_attrs or {})
        self._aliases_ = dict(_aliases or {})  # hidden names: key -> path of an entry of a child
        self._coords_ = dict(_coords or {})  # coordinate name -> values; not entries

    def __setitem__(self, key, value):
        if key == "_dims":
            self._dims_ = dict(value)
        elif key == "_attrs":
            self._attrs_ = dict(value)
        else:
            super().__setitem__(key, value)

    def _lookup(self, key):
        if isinstance(key, str) and key.startswith("/"):
            node = self
            for part in [p for p in key.split("/") if p]:
                node = node[part]
            return node, None
        if dict.__contains__(self, key):
            v = super().__getitem__(key)
            return v, self.__dict__.get("_dims_", {}).get(key, ())
        coords = self.__dict__.get("_coords_", {})
        if isinstance(key, str) and key in coords:
            return coords[key], self._dims_.get(key, ())
        alias = self.__dict__.get("_aliases_", {}).get(key)
        if alias is not None:  # "/child/name", or "/child#attr" for an attribute of a child
            path, _, attr = alias.partition("#")
            return (self[path].attrs[attr] if attr else self[path]), None
        raise KeyError(key)

    def __getitem__(self, key):
        if isinstance(key, list):  # xarray's ds[["a", "b"]]: a result of those variables
            self._flat("indexing by a list of names")
            missing = [k for k in key if k not in self._variables()]
            if missing:
                raise KeyError(f"no variables {missing}; variables are {list(self._variables())}")
            variables = {k: self._variables()[k] for k in key}
            dims = tuple(d for k in key for d in variables[k][0])
            sub = DevinterpResult(
                {k: v for k, (_, v) in variables.items()},
                _dims={k: d for k, (d, _) in {**variables, **self._coords_along(dims)}.items()},
                _attrs=self._attrs_,
                _coords={k: v for k, (_, v) in self._coords_along(dims).items()},
            )
            return sub
        v, dims = self._lookup(key)
        if isinstance(v, Variable):
            return v
        if _is_array(v) and dims is not None:
            return Variable(v, dims, name=key, coords=self._coords_along(dims))
        return v

    def __contains__(self, key):
        try:
            self._lookup(key)
        except (KeyError, TypeError):
            return False
        return True

    def get(self, key, default=None):
        return self[key] if key in self else default

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        if name in _XARRAY_ONLY and name not in self:
            raise _refuse_xarray("DevinterpResult", name)
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"no result {name!r}; results are {sorted(self)}") from None

    def __reduce__(self):
        return (
            _rebuild_result,
            (dict(dict.items(self)), self._dims_, self._attrs_, self._aliases_, self._coords_),
        )

    # ---------------------------------------------------------------------------------------- xarray's Dataset

    def _coords_along(self, dims) -> dict[str, tuple]:
        """The coordinates (name -> (dims, values)) whose dimensions are among ``dims``."""
        out = {}
        for k, v in self._coords_.items():
            d = tuple(self._dims_.get(k, ()))
            if all(x in dims for x in d):
                out[k] = (d, np.asarray(v))
        return out

    def _variables(self) -> dict[str, tuple[tuple[str, ...], Any]]:
        """The data variables: name -> (dims, values), the array entries (not children, not metadata)."""
        return {k: (tuple(self._dims_.get(k, ())), v) for k, v in dict.items(self) if _is_array(v)}

    def _all_dims(self) -> dict[str, int]:
        sizes: dict[str, int] = {}
        items = list(self._variables().values())
        items += [(tuple(self._dims_.get(k, ())), v) for k, v in self._coords_.items()]
        for dims, v in items:
            for d, n in zip(dims, np.shape(v), strict=True):
                sizes.setdefault(d, n)
        return sizes

    @property
    def sizes(self) -> Mapping[str, int]:
        """xarray's ``Dataset.sizes``: each dimension's length."""
        return MappingProxyType(self._all_dims())

    @property
    def dims(self) -> Mapping[str, int]:
        """xarray's ``Dataset.dims``: each dimension's length (a variable's own names: ``res[name].dims``)."""
        return MappingProxyType(self._all_dims())

    @property
    def data_vars(self) -> Mapping[str, Variable]:
        return MappingProxyType({k: self[k] for k in self._variables()})

    @property
    def coords(self) -> Mapping[str, Variable]:
        return MappingProxyType({k: self[k] for k in self._coords_})

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self._attrs_)

    @property
    def dataset(self) -> DevinterpResult:
        return self

    def to_dataset(self) -> DevinterpResult:
        """devinterp's ``DataTree.to_dataset()``: the result itself."""
        return self

    def _flat(self, method: str) -> None:
        children = [k for k, v in dict.items(self) if isinstance(v, DevinterpResult)]
        if children:
            raise NotImplementedError(
                f"{method} on a result with children {children}: call it on a child, e.g. "
                f"res[{children[0]!r}].{method}(...)"
            )

    def _rebuilt(self, variables: dict, coords: dict) -> DevinterpResult:
        """A result of the same kind: ``variables`` and ``coords`` (name -> (dims, values)) in place of these,
        the other entries (metadata) and attrs kept."""
        entries = {
            k: variables[k][1] if k in variables else v
            for k, v in dict.items(self)
            if k in variables or not _is_array(v)
        }
        dims = {k: d for k, (d, _) in {**variables, **coords}.items()}
        return DevinterpResult(
            entries,
            _dims=dims,
            _attrs=self._attrs_,
            _aliases=self._aliases_,
            _coords={k: v for k, (_, v) in coords.items()},
        )

    def isel(self, indexers=None, drop=False, missing_dims="raise", **indexers_kwargs) -> DevinterpResult:
        """xarray's ``Dataset.isel``: positions per dimension, applied to every variable and coordinate along it
        (an int drops the dimension; a slice or a 1-D list of ints or booleans keeps it)."""
        self._flat("isel")
        idx = _indexers("isel", indexers, indexers_kwargs, {"drop": drop, "missing_dims": missing_dims})
        sizes = self._all_dims()
        bad = set(idx) - set(sizes)
        if bad:
            raise ValueError(f"isel: dimensions {bad} do not exist; expected one or more of {tuple(sizes)}")
        variables = {}
        for k, (d, v) in self._variables().items():
            v2, d2 = _isel_array("isel", v, d, idx)
            variables[k] = (d2, v2 if np.ndim(v) else v)
        coords = {}
        for k, (d, v) in self._coords_along(tuple(sizes)).items():
            v2, d2 = _isel_array("isel", v, d, idx)
            coords[k] = (d2, v2)
        return self._rebuilt(variables, coords)

    def sel(
        self, indexers=None, method=None, tolerance=None, drop=False, **indexers_kwargs
    ) -> DevinterpResult:
        """xarray's ``Dataset.sel``: labels of a dimension's index coordinate (a label, a list, or a slice
        including both ends), or positions where the dimension has no coordinate (as xarray does)."""
        self._flat("sel")
        opts = {"method": method, "tolerance": tolerance, "drop": drop}
        idx = _indexers("sel", indexers, indexers_kwargs, opts)
        sizes = self._all_dims()
        return self.isel(_positions("sel", idx, tuple(sizes), self._coords_along(tuple(sizes))))

    def _reduce(self, method, dim, skipna, ddof=0, **kw) -> DevinterpResult:
        self._flat(method)
        if kw:
            raise TypeError(f"{method}() got unexpected arguments {sorted(kw)}")
        sizes = self._all_dims()
        names = (
            tuple(sizes)
            if dim is None or dim is Ellipsis
            else ((dim,) if isinstance(dim, str) else tuple(dim))
        )
        bad = [d for d in names if d not in sizes]
        if bad:
            raise ValueError(
                f"{method}: dimension(s) {bad} do not exist; expected one or more of {tuple(sizes)}"
            )
        variables = {}
        for k, (d, v) in self._variables().items():
            if method in ("mean", "std", "var", "median") and np.asarray(v).dtype.kind not in "biufc":
                continue  # as xarray: non-numeric variables are dropped from these reductions
            over = tuple(x for x in names if x in d)
            if over or dim is None:
                variables[k] = _reduce_array(method, v, d, over, skipna, ddof)[::-1]
            else:
                variables[k] = (d, v)
        coords = {k: c for k, c in self._coords_along(tuple(sizes)).items() if not set(c[0]) & set(names)}
        return self._rebuilt(variables, coords)

    def mean(self, dim=None, *, skipna=None, keep_attrs=None, **kw) -> DevinterpResult:
        """xarray's ``Dataset.mean`` over ``dim`` (a name or a list; None: all), skipping NaN in float arrays;
        variables without those dimensions are kept as they are."""
        return self._reduce("mean", dim, skipna, **kw)

    def std(self, dim=None, *, skipna=None, ddof=0, keep_attrs=None, **kw) -> DevinterpResult:
        """xarray's ``Dataset.std`` over ``dim`` (``ddof=0`` by default)."""
        return self._reduce("std", dim, skipna, ddof=ddof, **kw)

    def var(self, dim=None, *, skipna=None, ddof=0, keep_attrs=None, **kw) -> DevinterpResult:
        return self._reduce("var", dim, skipna, ddof=ddof, **kw)

    def sum(self, dim=None, *, skipna=None, keep_attrs=None, **kw) -> DevinterpResult:
        """xarray's ``Dataset.sum`` over ``dim``, skipping NaN in float arrays."""
        return self._reduce("sum", dim, skipna, **kw)

    def prod(self, dim=None, *, skipna=None, keep_attrs=None, **kw) -> DevinterpResult:
        return self._reduce("prod", dim, skipna, **kw)

    def min(self, dim=None, *, skipna=None, keep_attrs=None, **kw) -> DevinterpResult:
        return self._reduce("min", dim, skipna, **kw)

    def max(self, dim=None, *, skipna=None, keep_attrs=None, **kw) -> DevinterpResult:
        return self._reduce("max", dim, skipna, **kw)

    def median(self, dim=None, *, skipna=None, keep_attrs=None, **kw) -> DevinterpResult:
        return self._reduce("median", dim, skipna, **kw)

    def to_dataframe(self, dim_order=None):
        """xarray's ``Dataset.to_dataframe``: one row per combination of all the dimensions (a ``MultiIndex`` for
        more than one, labelled by index coordinates or positions), each variable and non-index coordinate a
        column, repeated along the dimensions it does not have."""
        self._flat("to_dataframe")
        if dim_order is not None:
            raise NotImplementedError("to_dataframe(dim_order=...) is not supported; use .isel/.values")
        sizes = self._all_dims()
        if not sizes:
            raise ValueError("to_dataframe: no valid index for a 0-dimensional result")
        coords = self._coords_along(tuple(sizes))
        cols = [(k, d, v) for k, (d, v) in self._variables().items()]
        cols += [(k, d, v) for k, (d, v) in coords.items() if d != (k,)]
        return _dataframe(tuple(sizes), tuple(sizes.values()), cols, coords)


def _is_array(v) -> bool:
    return isinstance(v, np.ndarray | float | int | np.number) and not isinstance(v, bool)


def _rebuild_result(items, dims, attrs, aliases, coords=None) -> DevinterpResult:
    return DevinterpResult(items, _dims=dims, _attrs=attrs, _aliases=aliases, _coords=coords)


# ------------------------------------------------------------------------------------------------ data and losses


def _item_column(dataset, key: str = "input_ids"):
    """The ``key`` entries (``input_ids`` by default) of a sized dataset whose items are mappings holding them (a
    torch ``Dataset`` or a list of ``{"input_ids": ...}``), as devinterp reads them; None for anything else."""
    try:
        n = len(dataset)
        first = dataset[0] if n else None
    except (TypeError, KeyError, IndexError, AttributeError):
        return None
    if not isinstance(first, Mapping) or key not in first:
        return None
    return [dataset[i][key] for i in range(n)]


def _input_ids(dataset, what: str = "dataset") -> torch.Tensor:
    """The token tensor ``(num_sequences, seq_len)`` of a dataset with an ``"input_ids"`` column, or whose items
    hold ``"input_ids"``."""
    if isinstance(dataset, torch.Tensor):
        ids = dataset
    else:
        try:
            col = dataset["input_ids"]
        except (
            KeyError,
            TypeError,
            IndexError,
            ValueError,
        ):  # datasets >= 5: a missing column is a ValueError
            col = _item_column(dataset)
        if col is None:
            raise TypeError(
                f"{what} must have an 'input_ids' column (a Hugging Face Dataset or a dict), items holding "
                f"'input_ids' (a torch Dataset or a list of dicts) or be a token tensor (num_sequences, seq_len); "
                f"got {type(dataset).__name__}"
            )
        if isinstance(col, torch.Tensor):
            ids = col
        else:
            try:
                ids = torch.as_tensor(np.asarray([np.asarray(r) for r in col]))
            except ValueError:
                raise ValueError(f"{what}['input_ids'] must hold sequences of one length") from None
    if ids.dim() != 2 or ids.is_floating_point():
        raise ValueError(
            f"{what}: input_ids must be integer tokens (num_sequences, seq_len), got {tuple(ids.shape)} "
            f"{ids.dtype}"
        )
    if ids.shape[1] < 2:
        raise ValueError(f"{what}: sequences must have length >= 2 for next-token loss (got {ids.shape[1]})")
    if not isinstance(dataset, torch.Tensor):
        _refuse_padding(dataset, ids, what)
    return ids.long()


def _column(dataset, key: str):
    """Column ``key`` of a dataset as a tensor (a column, or the items' entries), or None where it has none. A
    dataset that lists its columns (a Hugging Face ``Dataset``'s ``column_names``) is asked for ``key`` only when it
    lists it: a missing column is a ``KeyError`` in ``datasets`` < 5 and a ``ValueError`` from 5 on."""
    names = getattr(dataset, "column_names", None)
    if isinstance(names, Sequence) and not isinstance(names, str):
        if key not in names:
            return None
    try:
        col = dataset[key]
    except (KeyError, TypeError, IndexError, ValueError):
        col = _item_column(dataset, key)
    if col is None or isinstance(col, str):
        return None
    try:
        return (
            col
            if isinstance(col, torch.Tensor)
            else torch.as_tensor(np.asarray([np.asarray(r) for r in col]))
        )
    except (ValueError, TypeError):
        return None


def _refuse_padding(dataset, ids: torch.Tensor, what: str) -> None:
    """devinterp 2.x scores the next-token loss of every token of ``input_ids``: a dataset whose
    ``attention_mask`` marks padding, or whose ``labels`` differ from ``input_ids`` (``-100`` on padding), would
    have tokens scored that its owner left out. Refused, naming the estimators that read those columns."""
    mask = _column(dataset, "attention_mask")
    if mask is not None and tuple(mask.shape) == tuple(ids.shape) and bool((mask == 0).any()):
        row = int((mask == 0).any(-1).nonzero()[0, 0])
        raise ValueError(
            f"{what}: attention_mask marks padding (row {row} has zeros), but devinterp's sample, llc, "
            "susceptibilities and bif score the next-token loss of every token of input_ids, padding included; "
            "give sequences without padding (packed to one length), or use pypattern.estimate_llc, "
            "pypattern.susceptibilities or pypattern.bif, which leave padding and labels of -100 out"
        )
    labels = _column(dataset, "labels")
    if labels is not None and not (
        tuple(labels.shape) == tuple(ids.shape) and torch.equal(labels.long(), ids.long())
    ):
        raise ValueError(
            f"{what}: labels differ from input_ids (e.g. -100 on padding), but devinterp's sample, llc, "
            "susceptibilities and bif score the next-token loss of input_ids and read no labels; drop the labels "
            "column, or use pypattern.estimate_llc, pypattern.susceptibilities or pypattern.bif, which score labels"
        )


def per_token_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """devinterp 2.x's default loss: next-token cross-entropy ``(batch, seq_len - 1)`` on the model's logits
    (``model(input_ids)``, its ``.logits``, or the first element of a tuple)."""
    if not callable(model):
        raise TypeError(
            f"model is a {type(model).__name__}, not callable; give the model (a torch.nn.Module)"
        )
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids is a {type(input_ids).__name__}; give a token tensor (batch, seq_len)")
    out = model(input_ids)
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, tuple | list):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 3 or out.shape[:2] != input_ids.shape:
        raise TypeError(
            f"the default loss needs logits (batch, seq_len, vocab) = {tuple(input_ids.shape)} + (vocab,) from "
            f"model(input_ids); got {getattr(out, 'shape', type(out).__name__)}: pass loss_fn(model, input_ids)"
        )
    logp = torch.log_softmax(out[:, :-1].float(), dim=-1)
    return -logp.gather(-1, input_ids[:, 1:, None])[..., 0]


def _checked_loss(loss_fn: Callable, model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    v = loss_fn(model, ids)
    want = (ids.shape[0], ids.shape[1] - 1)
    if not isinstance(v, torch.Tensor) or tuple(v.shape) != want:
        raise ValueError(
            f"loss_fn must return the per-token loss of shape {want} (batch, seq_len - 1), got "
            f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}"
        )
    return v


def _obs_id(task_name: str) -> str:
    """devinterp's identifier for an observable name (non-alphanumerics to ``_``, no leading digit)."""
    out = "".join(c if c.isalnum() or c == "_" else "_" for c in task_name)
    if out and out[0].isdigit():
        out = "_" + out
    return out or "_"


def _observable_ids(dataset, n_samples: int, seed: int, what: str) -> torch.Tensor:
    """An observable's fixed sequences: ``n_samples`` of them, a seeded sample without replacement (devinterp's
    ``random.Random(seed).sample``)."""
    ids = _input_ids(dataset, what)
    if len(ids) < n_samples:
        raise ValueError(
            f"{what} has {len(ids)} sequences but batch_size * batches_per_draw = {n_samples} are needed"
        )
    idx = random.Random(seed).sample(range(len(ids)), n_samples)
    return ids[torch.as_tensor(idx)]


def _runs_spec(model: nn.Module, param_masks: ParamMasks | None):
    """``(restrict_to, masks)`` for :func:`pypattern.sample` from devinterp's ``param_masks``."""
    if param_masks is None:
        return None, None
    if not isinstance(param_masks, Mapping):
        raise TypeError(
            f"param_masks is a {type(param_masks).__name__}; give a dict parameter name -> mask or None (e.g. "
            "create_param_masks(model, 'l0h1')), or None to move every parameter"
        )
    params = dict(model.named_parameters())
    bad = [n for n in param_masks if n not in params]
    if bad:
        raise ValueError(
            f"param_masks names {bad}, which are not parameters of the model; names are {list(params)}"
        )
    if not param_masks:
        raise ValueError(
            "param_masks is empty: give at least one parameter (None moves every parameter; "
            "create_param_masks(model, 'unembed') of a model whose unembedding is tied to its embedding selects "
            "nothing, as in devinterp: 'embed' selects the tied weight)"
        )
    if not any(params[n].requires_grad for n in param_masks):
        raise ValueError(
            f"param_masks names only frozen parameters ({list(param_masks)} have requires_grad=False): sampling "
            "moves only parameters that require grad; unfreeze them with requires_grad_(True) or name others"
        )
    restrict = [re.escape(n) for n in param_masks]
    masks = {n: torch.as_tensor(m).to(params[n].device) for n, m in param_masks.items() if m is not None}
    return restrict, masks or None


_UNSUPPORTED = {
    "init_noise": (None, "noise added to the weights before sampling"),
    "save_metrics": (False, "per-step optimizer metrics"),
    "output_path": (None, "Zarr output: results are returned in memory (save them with numpy)"),
}


# ------------------------------------------------------------------------------------------------ restrictions


def _n_heads(model: nn.Module) -> tuple[int, int, int]:
    """``(n_layers, n_heads, n_kv_heads)`` of a pypattern Transformer or a Hugging Face model."""
    cfg = getattr(model, "cfg", None)
    if cfg is not None and hasattr(cfg, "n_heads"):
        return cfg.n_layers, cfg.n_heads, getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "num_attention_heads"):
        raise ValueError(
            f"create_param_masks needs a pypattern Transformer (converted or native) or a Hugging Face causal LM; "
            f"got {type(model).__name__}"
        )
    return (
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        getattr(cfg, "num_key_value_heads", None) or (cfg.num_attention_heads),
    )


def _whole(masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
    return {n: None if bool(m.all()) else m for n, m in masks.items()}


def create_param_masks(model: nn.Module, restriction: str | Sequence[str]) -> dict[str, torch.Tensor | None]:
    """devinterp 2.0.1's ``create_param_masks``: the ``param_masks`` of a weight restriction, on a pypattern
    Transformer (native or converted with :func:`pypattern.from_hf`) or an unconverted Hugging Face model of a
    family :func:`pypattern.component_masks` supports.

    Parameters
    ----------
    model : nn.Module
        pypattern's Transformer (native or converted) or an unconverted Hugging Face model of a supported family.
    restriction : str or list of str
        ``"full"`` (every parameter, no masks); ``"l{L}h{H}"`` (head ``H`` of layer ``L``: its slices of the
        query, key, value and output weights and the query/key/value biases; under grouped-query attention the
        key/value slices are those of its group's shared key/value head, as in devinterp); ``"l{L}g{G}"`` (the
        query heads of key/value group ``G`` with their shared key/value head); ``"l{L} attn"``, ``"l{L} mlp"``,
        ``"l{L}"`` (every parameter of the layer); ``"embed"``; ``"unembed"`` (without the weight when the
        unembedding is tied to the embedding, as in devinterp: nothing, ``{}``, for a tied GPT-2, with a warning;
        ``"embed"`` selects the tied weight); a parameter name; or a list of these (their union; ``"full"`` cannot
        be combined).

    Returns
    -------
    dict name -> bool mask of the parameter's shape, or None (the whole parameter)
        Heads and groups give masks; other restrictions None for every parameter they select whole.

    Warns
    -----
    UserWarning
        When ``"unembed"`` leaves out an unembedding weight tied to the embedding (and no other restriction in
        the list selects it): the warning names the tied weight and says what does select it (``"embed"``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model is a {type(model).__name__}; give the torch.nn.Module whose parameters to restrict"
        )
    tied: dict[str, list[str]] = {}
    masks = _param_masks(model, restriction, tied)
    left_out = [n for n in tied.get("tied", []) if n not in masks]
    if left_out:
        own = tied["unembed"]
        warnings.warn(
            f"create_param_masks: restriction 'unembed' leaves out the unembedding weight, which is tied to the "
            f"embedding: {left_out} is listed by model.named_parameters() under the embedding's name only, so "
            "devinterp's lookup does not find it and 'unembed' selects "
            + (f"{own} only" if own else "nothing ({}, which llc, sample and susceptibilities refuse)")
            + f"; 'embed' (or the name {left_out[0]!r}) selects the tied weight, which moves the embedding too",
            UserWarning,
            stacklevel=2,
        )
    return masks


def _param_masks(
    model: nn.Module, restriction: str | Sequence[str], tied: dict[str, list[str]]
) -> dict[str, torch.Tensor | None]:
    """:func:`create_param_masks`; when ``"unembed"`` leaves out unembedding weights tied to the embedding,
    ``tied["tied"]`` is set to their names and ``tied["unembed"]`` to what it selects."""
    if isinstance(restriction, list | tuple):
        if "full" in restriction:
            raise ValueError("create_param_masks: 'full' cannot be combined with other restrictions")
        if not restriction:
            raise ValueError("create_param_masks: the list of restrictions is empty")
        merged: dict[str, torch.Tensor | None] = {}
        for r in restriction:
            for n, m in _param_masks(model, r, tied).items():
                if n in merged and (merged[n] is None or m is None):
                    merged[n] = None
                else:
                    merged[n] = m if n not in merged else merged[n] | m
        return merged
    if not isinstance(restriction, str):
        raise TypeError(f"restriction must be a str or a list of str, got {type(restriction).__name__}")
    from ..models.transformer import component_masks

    params = dict(model.named_parameters())
    r = restriction.strip()
    if r == "full":
        return {n: None for n in params}
    low = r.lower()
    if low == "embed":
        return _whole(component_masks(model, low))
    if low == "unembed":
        # devinterp selects the unembedding among model.named_parameters(), which lists a weight tied to the
        # embedding under the embedding's name only: a tied unembedding selects nothing
        embed = component_masks(model, "embed")
        unembed = _whole(component_masks(model, low))
        own = {n: m for n, m in unembed.items() if n not in embed}
        if len(own) < len(unembed):
            tied.update(tied=[n for n in unembed if n in embed], unembed=list(own))
        return own
    m = re.fullmatch(r"l(\d+)\s*([hg])(\d+)", low)
    layers, n_heads, n_kv = _n_heads(model)
    if m:
        layer, kind, i = int(m[1]), m[2], int(m[3])
        if layer >= layers:
            raise ValueError(
                f"restriction {r!r}: layer {layer} is out of range (the model has {layers} layers)"
            )
        count = n_heads if kind == "h" else n_kv
        if i >= count:
            what = "heads" if kind == "h" else "key/value heads (groups)"
            raise ValueError(f"restriction {r!r}: {i} is out of range (the model has {count} {what})")
        heads = [i] if kind == "h" else list(range(i * (n_heads // n_kv), (i + 1) * (n_heads // n_kv)))
        out: dict[str, torch.Tensor] = {}
        for h in heads:
            for n, mk in component_masks(
                model, f"blocks.{layer}.attn.head.{h}", include_shared_kv=True
            ).items():
                out[n] = out[n] | mk if n in out else mk
        return dict(out)
    m = re.fullmatch(r"l(\d+)(?:\s+(attn|mlp))?", low)
    if m:
        layer = int(m[1])
        if layer >= layers:
            raise ValueError(
                f"restriction {r!r}: layer {layer} is out of range (the model has {layers} layers)"
            )
        return _whole(component_masks(model, f"blocks.{layer}" + (f".{m[2]}" if m[2] else "")))
    if r in params:
        return {r: None}
    raise ValueError(
        f"unknown restriction {r!r}; valid: 'full', 'l0', 'l0h1', 'l0g0', 'l0 attn', 'l0 mlp', 'embed', 'unembed', "
        "a parameter name, or a list of these"
    )


# ------------------------------------------------------------------------------------------------ sample


def _sampling_method(
    sampling_method, sampling_method_kwargs, rmsprop_eps, rmsprop_alpha
) -> tuple[str, dict[str, float]]:
    """pypattern's sampler and its own hyperparameters from devinterp 2.x's ``sampling_method``,
    ``sampling_method_kwargs`` and the ``rmsprop_eps`` / ``rmsprop_alpha`` shorthands (devinterp's rules: the
    shorthands only with ``"rmsprop_sgld"``, and not also in ``sampling_method_kwargs``)."""
    sampler = sampler_name(sampling_method=sampling_method)
    if sampling_method_kwargs is not None and not isinstance(sampling_method_kwargs, Mapping):
        raise TypeError(
            f"sampling_method_kwargs={sampling_method_kwargs!r} is not valid; give a dict of the sampler's own "
            "settings, or None"
        )
    kw = dict(sampling_method_kwargs or {})
    for name, value in (("eps", rmsprop_eps), ("alpha", rmsprop_alpha)):
        if value is None:
            continue
        if sampler != "rmsprop_sgld":
            raise ValueError(
                f"rmsprop_{name} can only be set when sampling_method='rmsprop_sgld', got "
                f"sampling_method={sampling_method!r}"
            )
        if name in kw:
            raise ValueError(
                f"rmsprop_{name} is set both as a top-level argument and in sampling_method_kwargs[{name!r}]; "
                "give one"
            )
        kw[name] = value
    if kw.pop("add_grad_correction", False):
        raise NotImplementedError(
            "sampling_method_kwargs add_grad_correction=True is not supported: RMSprop-SGLD leaves out the term "
            "in the derivative of its preconditioner (devinterp's default, add_grad_correction=False)"
        )
    shared = sorted(set(kw) & {*HYPERPARAMETERS, *DEVINTERP_NAMES, "n_beta", "llc_weight_decay"})
    if shared:
        raise ValueError(
            f"sampling_method_kwargs has {shared}: give these as keyword arguments of sample (lr, n_beta, "
            "localization, noise_level, llc_weight_decay, bounding_box_size)"
        )
    out = sampler_hyperparameters(sampler, kw, where="sampling_method_kwargs")  # another sampler's: refused
    own = SAMPLER_HYPERPARAMETERS[sampler]
    unknown = sorted(set(kw) - set(own))
    if unknown:
        raise ValueError(
            f"sampling_method_kwargs has unknown keys {unknown} for sampling_method={sampling_method!r}; known are "
            f"{sorted(own) + ['add_grad_correction'] if sampler == 'rmsprop_sgld' else sorted(own)}"
        )
    return sampler, out


def _warn_dropout_differs(model: nn.Module) -> None:
    """Warn when ``model`` has dropout (or another part that makes its ``train()`` forward random), whatever mode it
    is in: devinterp 2.0.1 calls ``model.train()`` for ``L_n(w*)``, the chains and the observables, so its
    estimates read the random forward, where these calls read the ``eval()`` forward. The LLC and the
    susceptibilities of such a model differ between the two libraries; with every dropout probability 0 they
    read the same loss."""
    from .._training import modes_kept, random_in_training
    from ..sampling.diagnostics import user_stacklevel

    if not isinstance(model, nn.Module):
        return
    with modes_kept(model):
        model.train()
        random = random_in_training(model)
    if random:
        warnings.warn(
            f"the model has dropout ({', '.join(random[:3])}{', ...' if len(random) > 3 else ''}): devinterp calls "
            "model.train() for L_n(w*), the chains and the observables, so its estimates read the random forward, "
            "where pypattern reads the eval() forward; the LLC and susceptibilities of this model will differ from "
            "devinterp's (set the dropout probabilities to 0 to compare the two libraries)",
            UserWarning,
            stacklevel=user_stacklevel(),
        )


def sample(
    model: nn.Module,
    dataset,
    observables: Mapping[str, Any],
    *,
    lr: float,
    n_beta: float,
    param_masks: ParamMasks | None = None,
    num_chains: int = 4,
    num_draws: int = 200,
    batch_size: int = 32,
    num_burnin_steps: int = 0,
    num_steps_bw_draws: int = 1,
    num_init_loss_batches: int = 32,
    init_seed: int = 100,
    batches_per_draw: int = 3,
    obs_seed: int = 1337,
    gradient_accumulation_steps: int = 1,
    localization: float = 0.0,
    noise_level: float = 1.0,
    llc_weight_decay: float = 0.0,
    bounding_box_size: float | None = None,
    sampling_method: str = "sgmcmc_sgld",
    sampling_method_kwargs: Mapping[str, Any] | None = None,
    rmsprop_eps: float | None = None,
    rmsprop_alpha: float | None = None,
    shuffle: bool = True,
    match_sampling_input_ids_across_chains: bool = True,
    init_noise: float | None = None,
    device: str | torch.device | None = None,
    save_metrics: bool = False,
    output_path=None,
    loss_fn: Callable | None = None,
    quiet: bool = True,
    batched: bool | None = None,
) -> DevinterpResult:
    """devinterp 2.0.1's ``sample``: SGLD (or RMSprop-SGLD, SGNHT) chains on a token dataset, with per-token
    losses of the observables.

    Parameters
    ----------
    model : nn.Module
        At ``w*``; not modified (a copy is moved to ``device`` when it is elsewhere).
    dataset
        Sampling data: an ``"input_ids"`` column or a token tensor ``(num_sequences, seq_len)``.
    observables : dict name -> dataset or (dataset, batches_per_draw)
        Probe sets: ``batch_size * batches_per_draw`` sequences of each, chosen once with ``obs_seed``; their
        per-token losses are recorded at every draw.
    batches_per_draw : int
        Batches of ``batch_size`` sequences per observable whose entry gives no count of its own (default 3).
    obs_seed : int
        Seed of the choice of each observable's sequences.
    lr, n_beta, localization, noise_level, llc_weight_decay, bounding_box_size
        Step size, ``n * beta``, and the rest of devinterp's SGLD settings.
    sampling_method : {"sgmcmc_sgld", "rmsprop_sgld", "sgnht"}
        The sampler (:func:`pypattern.sample`'s ``sampler``); devinterp 2.x offers the first two.
    sampling_method_kwargs : dict, optional
        The sampler's own settings: RMSprop-SGLD's ``alpha`` (0.99) and ``eps`` (0.1), SGNHT's
        ``diffusion_factor`` (0.01); ``add_grad_correction=False`` is accepted (True raises).
    rmsprop_eps, rmsprop_alpha : float, optional
        devinterp's shorthands for ``sampling_method_kwargs={"eps": ..., "alpha": ...}`` (with
        ``sampling_method="rmsprop_sgld"`` only).
    param_masks : dict name -> mask or None, optional
        Only these parameters move (a mask restricts within one); None moves every parameter.
    num_chains, num_draws, num_burnin_steps, num_steps_bw_draws, gradient_accumulation_steps, batch_size : int
        devinterp's chain layout: ``num_draws * num_steps_bw_draws + num_burnin_steps`` steps per chain, each on
        ``gradient_accumulation_steps`` batches of ``batch_size`` sequences (drop_last), one forward and backward
        each (the memory of one batch).
    num_init_loss_batches, init_seed
        ``L_n(w*)`` per token over ``num_init_loss_batches * gradient_accumulation_steps`` batches of a
        ``init_seed``-seeded order; ``init_seed`` also keys the chains' noise and data.
    shuffle, match_sampling_input_ids_across_chains : bool
        Each chain reads its own keyed order of the sampling data (``shuffle=False``: the dataset order);
        ``match_sampling_input_ids_across_chains`` chooses whether every chain's ``L_n(w*)`` reads the batches of
        ``init_seed`` (True) or of ``init_seed + chain`` (see the module docstring).
    init_noise, save_metrics, output_path
        devinterp's options with no counterpart here: their defaults (None, False, None; ``init_noise=0`` too)
        are accepted, any other value raises ``NotImplementedError`` naming it.
    device : str or torch.device, optional
        Where to sample; default the model's device. A CUDA device where torch sees none is a RuntimeError.
    loss_fn : callable(model, input_ids) -> (batch, seq_len - 1), optional
        Per-token loss; default :func:`per_token_loss`.
    quiet, batched
        pypattern's progress bar and chain batching (see :func:`pypattern.sample`).

    Returns
    -------
    DevinterpResult
        ``init_loss`` (chain, token_pos); ``sampling_loss`` (chain, draw, batch, token_pos);
        ``sampling_loss_micro`` (chain, step, batch_sampling, token_pos) at every step including burn-in;
        ``sampling_input_ids_micro`` (chain, step, batch_sampling, token); ``loss_<obs_id>`` (chain, draw,
        batch_<obs_id>, token_pos) and ``input_ids_<obs_id>`` (batch_<obs_id>, token) per observable;
        ``metadata`` ({"config": {"sampler": {...}, "observables": [...], ...}}, devinterp's keys; also
        ``attrs["metadata"]``, where devinterp keeps it); ``attrs["completed"]`` is 1, as devinterp marks a
        finished run.
    """
    given = dict(init_noise=init_noise, save_metrics=save_metrics, output_path=output_path)
    for name, (default, what) in _UNSUPPORTED.items():
        if given[name] not in (default, 0) or (name == "save_metrics" and given[name]):
            raise NotImplementedError(
                f"{name}={given[name]!r} is not supported ({what}); leave it at {default!r}"
            )
    sampler, own = _sampling_method(sampling_method, sampling_method_kwargs, rmsprop_eps, rmsprop_alpha)
    counts = (
        ("num_chains", num_chains, 1),
        ("num_draws", num_draws, 1),
        ("batch_size", batch_size, 1),
        ("num_burnin_steps", num_burnin_steps, 0),
        ("num_steps_bw_draws", num_steps_bw_draws, 1),
        ("num_init_loss_batches", num_init_loss_batches, 1),
        ("gradient_accumulation_steps", gradient_accumulation_steps, 1),
        ("batches_per_draw", batches_per_draw, 1),
    )
    for name, v, lo in counts:
        if not is_count(v) or v < lo:  # Python's or numpy's ints
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    (
        num_chains,
        num_draws,
        batch_size,
        num_burnin_steps,
        num_steps_bw_draws,
        num_init_loss_batches,
        gradient_accumulation_steps,
        batches_per_draw,
    ) = (int(v) for _, v, _ in counts)
    if not is_count(init_seed) or not 0 <= init_seed < 2**63:
        raise ValueError(
            f"init_seed must be an int in [0, 2**63), got {init_seed!r}"
        )  # devinterp's validation refuses a non-int too
    if not is_count(obs_seed):
        raise ValueError(f"obs_seed must be an int, got {obs_seed!r}")
    init_seed, obs_seed = int(init_seed), int(obs_seed)
    for name, v in (("lr", lr), ("n_beta", n_beta)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    lr, n_beta = float(lr), float(n_beta)
    for name, v in (
        ("localization", localization),
        ("noise_level", noise_level),
        ("llc_weight_decay", llc_weight_decay),
    ):
        if not is_real(v) or not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    b = bounding_box_size
    if b is not None and (not is_real(b) or not (math.isfinite(b) and b > 0)):
        raise ValueError(f"bounding_box_size must be a finite number > 0, or None, got {b!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model is a {type(model).__name__}; give the torch.nn.Module to sample")
    if not isinstance(observables, Mapping):
        raise TypeError(
            f"observables is a {type(observables).__name__}; give a dict name -> dataset (or (dataset, "
            "batches_per_draw)), {} for none"
        )
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(
            f"loss_fn is a {type(loss_fn).__name__}, not callable; give loss_fn(model, input_ids) -> per-token "
            "losses (batch, seq_len - 1), or None"
        )
    dev = resolve_device(device, model)
    model = on_device(model, dev)
    loss_fn = loss_fn or per_token_loss
    ids = _input_ids(dataset)
    check_vocab_ids(model, ids, "dataset")
    T = ids.shape[1] - 1
    big = batch_size * gradient_accumulation_steps  # one step's sequences: accumulation is a mean over them
    if len(ids) < big:
        raise ValueError(
            f"dataset has {len(ids)} sequences, fewer than batch_size * gradient_accumulation_steps = {big}"
        )
    obs: dict[str, torch.Tensor] = {}
    for name, spec in observables.items():
        ds, bpd = spec if isinstance(spec, tuple) else (spec, batches_per_draw)
        obs[_obs_id(name)] = _observable_ids(ds, batch_size * bpd, obs_seed, f"observables[{name!r}]").to(dev)
        check_vocab_ids(model, obs[_obs_id(name)], f"observables[{name!r}]")
        if obs[_obs_id(name)].shape[1] != T + 1:
            raise ValueError(
                f"observables[{name!r}] has sequences of length {obs[_obs_id(name)].shape[1]}, not {T + 1}"
            )

    _warn_dropout_differs(model)
    # a model in train() mode with dropout: L_n(w*) and the chains both read its eval() forward (warned)
    with _eval_mode_for_dropout(model):
        # L_n(w*) per token and chain: the first batches of devinterp's init-loss loader, a DataLoader over the dataset
        # with a generator seeded by init_seed (init_seed + chain when match_sampling_input_ids_across_chains is
        # False). Its iterator draws a base seed from the generator before the shuffle's permutation, so the order is
        # read from such a loader, not from randperm of a fresh generator.
        nb = len(ids) // batch_size
        k = num_init_loss_batches * gradient_accumulation_steps
        seeds = [
            int(init_seed) + (0 if match_sampling_input_ids_across_chains else c) for c in range(num_chains)
        ]
        init_of: dict[int, np.ndarray] = {}
        for sd in dict.fromkeys(seeds):
            loader = torch.utils.data.DataLoader(
                torch.arange(len(ids)),
                batch_size=batch_size,
                shuffle=shuffle,
                generator=torch.Generator().manual_seed(sd),
                drop_last=True,
            )
            order = torch.cat(list(loader))
            with torch.no_grad():
                per_tok = [
                    _checked_loss(
                        loss_fn, model, ids[order[(i % nb) * batch_size : (i % nb + 1) * batch_size]].to(dev)
                    )
                    .double()
                    .mean(0)
                    for i in range(k)
                ]
            init_of[sd] = torch.stack(per_tok).mean(0).cpu().numpy()  # (token_pos,)
        init_chain_tok = np.stack([init_of[sd] for sd in seeds])  # (chain, token_pos)
        init_tok = init_chain_tok.mean(0)

        total = num_draws * num_steps_bw_draws + num_burnin_steps
        # batches of batch_size, gradient_accumulation_steps of them per step (one forward and backward each, so
        # memory is that of one batch); without shuffling, devinterp's order: consecutive batches, cycled
        if shuffle:
            loader = torch.utils.data.DataLoader(
                torch.utils.data.TensorDataset(ids), batch_size=batch_size, shuffle=True, drop_last=True
            )
        else:
            loader = [(ids[i * batch_size : (i + 1) * batch_size],) for i in range(nb)]
        micro = np.full((num_chains, total, big, T), np.nan, dtype=np.float32)
        micro_ids = np.zeros((num_chains, total, big, T + 1), dtype=np.int64)
        obs_loss = {
            o: np.full((num_chains, num_draws, len(v), T), np.nan, dtype=np.float32) for o, v in obs.items()
        }

        def lf(m, batch):
            v = _checked_loss(loss_fn, m, batch[0])
            return v.float().mean(), v, batch[0]

        def cb(chain, step, model, outputs):
            micro[chain, step] = outputs[0].detach().float().cpu().numpy()
            micro_ids[chain, step] = outputs[1].cpu().numpy()
            d, r = divmod(step - num_burnin_steps, num_steps_bw_draws)
            if d >= 0 and r == 0:
                with torch.no_grad():
                    for o, v in obs.items():
                        obs_loss[o][chain, d] = (
                            _checked_loss(loss_fn, model, v).detach().float().cpu().numpy()
                        )

        restrict, masks = _runs_spec(model, param_masks)
        _native_sample(
            model,
            loader,
            loss_fn=lf,
            num_chains=num_chains,
            num_draws=total,  # every step is recorded: devinterp's LLC averages all of them
            step_size=lr,
            nbeta=n_beta,
            localization=localization,
            weight_decay=llc_weight_decay,
            noise_scale=noise_level,
            bounding_box=bounding_box_size,
            restrict_to=restrict,
            masks=masks,
            seed=int(init_seed),
            init_loss=float(init_tok.mean()),
            grad_accum_steps=gradient_accumulation_steps,
            callbacks=[cb],
            quiet=quiet,
            batched=batched,
            warn_nonstationary=False,
            sampler=sampler,
            optimizer_kwargs=own,
        )
    draw_steps = num_burnin_steps + num_steps_bw_draws * np.arange(num_draws)
    config = dict(
        lr=float(lr),
        n_beta=float(n_beta),
        batch_size=batch_size,
        num_chains=num_chains,
        num_draws=num_draws,
        num_burnin_steps=num_burnin_steps,
        num_steps_bw_draws=num_steps_bw_draws,
        gradient_accumulation_steps=gradient_accumulation_steps,
        num_init_loss_batches=num_init_loss_batches,
        init_seed=init_seed,
        localization=float(localization),
        noise_level=float(noise_level),
        llc_weight_decay=float(llc_weight_decay),
        bounding_box_size=bounding_box_size,
        sampling_method=sampling_method,
        sampling_method_kwargs=dict(own),
        shuffle=shuffle,
        match_sampling_input_ids_across_chains=match_sampling_input_ids_across_chains,
        # devinterp's other sampler settings, with the values used here: no initial noise, no optimizer metrics,
        # the data cycled past its end, a constant step, the chains of one process
        init_noise=None,
        save_metrics=False,
        epoch_mode="cycle",
        scheduler_type="constant",
        scheduler_kwargs=None,
        cores=1,
        online=False,
    )
    metadata = {
        "config": {
            "sampler": config,
            "observables": [
                {
                    "type": "ObserveDifferentDataset",
                    "obs_id": o,
                    "batches_per_draw": len(v) // batch_size,
                }
                for o, v in obs.items()
            ],
            "chain_buffer_size": min(50, num_draws),
            "shared_observable_dims": ["token", "token_pos"],
            "tokenizer_context_length": T + 1,
        }
    }
    out = DevinterpResult(
        init_loss=init_chain_tok.astype(np.float32),
        # each draw's loss: the element-wise mean over the step's gradient-accumulation micro-batches
        sampling_loss=micro[:, draw_steps]
        .reshape(num_chains, num_draws, gradient_accumulation_steps, batch_size, T)
        .mean(2),
        sampling_loss_micro=micro,
        sampling_input_ids_micro=micro_ids,
        metadata=metadata,
        # devinterp's attributes: the configuration, and the flag its writer sets once every draw is stored
        _attrs={"metadata": metadata, "completed": 1},
    )
    dims = {
        "init_loss": ("chain", "token_pos"),
        "sampling_loss": ("chain", "draw", "batch", "token_pos"),
        "sampling_loss_micro": ("chain", "step", "batch_sampling", "token_pos"),
        "sampling_input_ids_micro": ("chain", "step", "batch_sampling", "token"),
    }
    for o in obs:
        out[f"loss_{o}"] = obs_loss[o]
        out[f"input_ids_{o}"] = obs[o].cpu().numpy()
        dims[f"loss_{o}"] = ("chain", "draw", f"batch_{o}", "token_pos")
        dims[f"input_ids_{o}"] = (f"batch_{o}", "token")
    out._dims_ = dims
    return out


# ------------------------------------------------------------------------------------------------ llc


def compute_llc(samples: Mapping[str, Any]) -> DevinterpResult:
    """devinterp 2.x's ``compute_llc`` on a :func:`sample` result: ``n_beta * (mean loss - mean init_loss)``
    per chain, the loss averaged over every step (burn-in included), every sequence and token.

    Returns
    -------
    DevinterpResult
        ``llc_mean``, ``llc_std`` (over chains, ddof=0 as xarray's ``std``), ``llc_per_chain`` (chain,),
        ``llc_scalar``, ``loss_trace`` (chain, step), ``init_loss`` (float).
    """
    n_beta = float(samples["metadata"]["config"]["sampler"]["n_beta"])
    micro = np.asarray(samples["sampling_loss_micro"], dtype=np.float64)
    init = float(np.mean(samples["init_loss"]))
    trace = micro.mean(axis=(2, 3))
    per_chain = n_beta * (trace.mean(axis=1) - init)
    # float32 as devinterp's (its means over float32 losses); llc_scalar and init_loss are Python floats there
    return DevinterpResult(
        llc_mean=np.float32(per_chain.mean()),
        llc_std=np.float32(per_chain.std()),
        llc_per_chain=per_chain.astype(np.float32),
        llc_scalar=n_beta * (float(micro.mean()) - init),
        loss_trace=trace.astype(np.float32),
        init_loss=init,
        _dims={"llc_per_chain": ("chain",), "loss_trace": ("chain", "step")},
    )


def llc(
    model: nn.Module,
    dataset,
    observables: Mapping[str, Any] | None = None,
    *,
    lr: float,
    n_beta: float,
    param_masks: ParamMasks | None = None,
    loss_fn: Callable | None = None,
    **kwargs,
) -> DevinterpResult:
    """devinterp 2.0.1's ``llc``: :func:`sample`, then :func:`compute_llc`. ``observables`` may be ``{}``;
    ``**kwargs`` go to :func:`sample` (``num_chains``, ``num_draws``, ``batch_size``, ``localization``, ...)."""
    samples = sample(
        model,
        dataset,
        observables or {},
        lr=lr,
        n_beta=n_beta,
        param_masks=param_masks,
        loss_fn=loss_fn,
        **kwargs,
    )
    return compute_llc(samples)


# ------------------------------------------------------------------------------------------------ susceptibilities


def susceptibilities(
    model: nn.Module,
    dataset,
    observables: Mapping[str, Any],
    weight_restrictions: Mapping[str, ParamMasks | None],
    *,
    sampling_task: str,
    lr: float,
    n_beta: float,
    loss_fn: Callable | None = None,
    include_sampling_task: bool = False,
    **kwargs,
) -> DevinterpResult:
    """devinterp 2.0.1's ``susceptibilities``: one :func:`sample` per weight restriction ("full" = None is
    required), then per restriction ``wr`` and observable token ``t``::

        phi = mean sampling-task loss at the draw - mean init_loss
        chi_t = E_wr[phi * Lbar] - E_wr[phi * l_t] - E_wr[phi] * (E_full[Lbar] - E_full[l_t])

    with ``Lbar`` the per-draw mean loss of the ``sampling_task`` observable and expectations over chains and
    draws.

    Returns
    -------
    DevinterpResult
        devinterp's tree: ``susceptibilities`` (``sus`` (sus_flat, wr) with coordinates ``dataset_id``,
        ``batch``, ``target_position`` (sus_flat,) and ``wr``, the restriction names, "full" excluded; its
        ``attrs["dataset_id_to_name"]`` the observable ids, sorted) and ``context`` (``input_ids`` (ctx_flat,)
        with ``dataset_id``, ``batch``, ``position``), read by name or path (``r["/susceptibilities/sus"]``);
        ``samples`` (each restriction's :func:`sample` result). The flat names ``sus``, ``wr``, ``dataset_id``,
        ``batch``, ``target_position``, ``input_ids``, ``ctx_dataset_id``, ``ctx_batch``, ``position`` and
        ``dataset_id_to_name`` read through to the children (they are not keys).
    """
    if "full" not in weight_restrictions:
        raise ValueError("weight_restrictions must include a 'full' key (use None for the full model)")
    if sampling_task not in observables:
        raise ValueError(f"sampling_task {sampling_task!r} is not in observables {list(observables)}")
    if not any(include_sampling_task or n != sampling_task for n in observables):
        raise ValueError(
            f"no probe observable besides sampling_task={sampling_task!r}: add one or pass include_sampling_task=True"
        )
    runs = {
        wr: sample(
            model, dataset, observables, lr=lr, n_beta=n_beta, param_masks=m, loss_fn=loss_fn, **kwargs
        )
        for wr, m in weight_restrictions.items()
    }
    out = compute_susceptibilities(runs, sampling_task, include_sampling_task=include_sampling_task)
    out["samples"] = runs
    return out


def compute_susceptibilities(
    wr_map: Mapping[str, Mapping[str, Any]],
    sampling_task: str,
    observable_names: Sequence[str] | None = None,
    include_sampling_task: bool = False,
) -> DevinterpResult:
    """devinterp 2.x's ``compute_susceptibilities`` on :func:`sample` results, one per weight restriction
    (``"full"`` required); see :func:`susceptibilities` for the formula and the result."""
    if "full" not in wr_map:
        raise ValueError("wr_map must include a 'full' key (the unrestricted run)")
    full = wr_map["full"]
    sid = _obs_id(sampling_task)
    all_ids = sorted(k[len("loss_") :] for k in full if k.startswith("loss_"))
    if sid not in all_ids:
        raise ValueError(f"sampling_task {sampling_task!r} is not an observable of the runs ({all_ids})")
    if observable_names is None:
        obs_ids = [o for o in all_ids if include_sampling_task or o != sid]
    else:
        obs_ids = sorted(_obs_id(n) for n in observable_names)
    if not obs_ids:
        raise ValueError(
            f"no probe observable besides sampling_task={sampling_task!r}: add one or pass include_sampling_task=True"
        )
    init_mean = float(np.mean(full["init_loss"]))
    full_lbar = float(np.asarray(full[f"loss_{sid}"], dtype=np.float64).mean())
    wrs = [w for w in wr_map if w != "full"]
    cols, coords = [], {"dataset_id": [], "batch": [], "target_position": []}
    for i, o in enumerate(obs_ids):
        delta = full_lbar - np.asarray(full[f"loss_{o}"], dtype=np.float64).mean(axis=(0, 1))  # (batch, T)
        per_wr = []
        for w in wrs:
            lbar = np.asarray(wr_map[w][f"loss_{sid}"], dtype=np.float64).mean(axis=(2, 3))  # (chain, draw)
            phi = lbar - init_mean
            probe = np.asarray(wr_map[w][f"loss_{o}"], dtype=np.float64)
            chi = (phi * lbar).mean() - (phi[:, :, None, None] * probe).mean(axis=(0, 1)) - phi.mean() * delta
            per_wr.append(chi.reshape(-1))
        cols.append(np.stack(per_wr, axis=-1) if per_wr else np.zeros((delta.size, 0)))
        b, t = delta.shape
        coords["dataset_id"].append(np.full(b * t, i))
        coords["batch"].append(np.repeat(np.arange(b), t))
        coords["target_position"].append(np.tile(np.arange(1, t + 1), b))
    ctx = {"input_ids": [], "ctx_dataset_id": [], "ctx_batch": [], "position": []}
    for i, o in enumerate(obs_ids):
        ids = np.asarray(full[f"input_ids_{o}"])
        ctx["input_ids"].append(ids.reshape(-1))
        ctx["ctx_dataset_id"].append(np.full(ids.size, i))
        ctx["ctx_batch"].append(np.repeat(np.arange(ids.shape[0]), ids.shape[1]))
        ctx["position"].append(np.tile(np.arange(ids.shape[1]), ids.shape[0]))
    sus = np.concatenate(cols, axis=0)
    coords = {k: np.concatenate(v) for k, v in coords.items()}
    ctx = {k: np.concatenate(v) for k, v in ctx.items()}
    # devinterp's DataTree: /susceptibilities (sus and its coordinates) and /context (the probe tokens)
    tree_sus = DevinterpResult(
        sus=sus.astype(np.float32),  # computed in float64, stored in float32 as devinterp's (float32 losses)
        _coords={"wr": np.asarray(wrs, dtype=object), **coords},
        _dims={"sus": ("sus_flat", "wr"), "wr": ("wr",), **{k: ("sus_flat",) for k in coords}},
        _attrs={"dataset_id_to_name": list(obs_ids)},
    )
    tree_ctx = DevinterpResult(
        input_ids=ctx["input_ids"],
        _coords={"dataset_id": ctx["ctx_dataset_id"], "batch": ctx["ctx_batch"], "position": ctx["position"]},
        _dims={k: ("ctx_flat",) for k in ("input_ids", "dataset_id", "batch", "position")},
        _attrs={"dataset_id_to_name": list(obs_ids)},
    )
    # devinterp's DataTree: the children 'susceptibilities' and 'context'; the flat names read through to them
    aliases = {k: f"/susceptibilities/{k}" for k in ("sus", "wr", *coords)}
    aliases.update(
        input_ids="/context/input_ids",
        ctx_dataset_id="/context/dataset_id",
        ctx_batch="/context/batch",
        position="/context/position",
    )
    aliases["dataset_id_to_name"] = "/susceptibilities#dataset_id_to_name"
    return DevinterpResult(susceptibilities=tree_sus, context=tree_ctx, _aliases=aliases)


# ------------------------------------------------------------------------------------------------ bif


def _check_block_options(batch_name: str, batch_size, device_name: str, device) -> None:
    """devinterp's block size and device of the BIF computation: pypattern computes the matrix in one block on the
    CPU, so neither changes the result, but values devinterp could not run with are refused by name."""
    if not is_count(batch_size) or batch_size < 1:
        raise ValueError(f"{batch_name} must be an int >= 1, got {batch_size!r}")
    if device is None:
        return
    dev = device_arg(device, device_name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"{device_name}={device!r}: torch reports no usable CUDA device (torch.cuda.is_available() is False); "
            "pass 'cpu' or None"
        )
    if dev.type == "meta":
        raise ValueError(f"{device_name}={device!r}: the meta device holds no values; pass 'cpu' or None")


def compute_bif(
    samples: Mapping[str, Any],
    *,
    correlation_method: str = "token",
    reduce_chain_dimension_method: str = "stack",
    loss_keys: str | Sequence[str] = "all",
    batch_index_range_1: str | Sequence[int] = "all",
    batch_index_range_2: str | Sequence[int] = "all",
    average_tokenwise_bif: bool = False,
    compute_covariance: bool = False,
    batch_size: int = 32,
    device: str | torch.device | None = None,
) -> DevinterpResult:
    """devinterp 2.x's ``compute_bif`` on a :func:`sample` result: the correlation (or covariance, ddof=1) of
    the observables' losses over draws, between sequences (``"sequence"``: token-mean losses) or token pairs
    (``"token"``: ``influences[i, j, s, t]`` between token ``s`` of sequence ``i`` and token ``t`` of sequence
    ``j``). ``"stack"`` pools chains and draws; ``"mean"`` averages over chains first.

    ``loss_keys``: ``"all"`` (every observable), one observable's id, or a list of ids.
    ``batch_index_range_1`` / ``batch_index_range_2`` (``"all"`` or indices ``0 .. batch - 1`` into the
    concatenated sequences, as devinterp's labels: no negative ones) keep those rows / columns of the influence
    matrix. ``batch_size`` and ``device`` only block devinterp's computation and do not change the result (the
    matrix is computed on the CPU); a ``batch_size`` below 1 or a device torch cannot use is refused by name.

    Returns
    -------
    DevinterpResult
        ``influences`` (batch_1, batch_2[, target_position, target_position_T]) and ``input_ids`` (batch,
        position), sequences of the observables concatenated in sorted order of their ids (``loss_keys="all"``)
        or in the order of ``loss_keys``.
    """
    _check_block_options("batch_size", batch_size, "device", device)
    if correlation_method not in ("token", "sequence"):
        raise ValueError(f"correlation_method must be 'token' or 'sequence', got {correlation_method!r}")
    if reduce_chain_dimension_method not in ("stack", "mean"):
        raise ValueError(
            f"reduce_chain_dimension_method must be 'stack' or 'mean', got {reduce_chain_dimension_method!r}"
        )
    all_ids = sorted(k[len("loss_") :] for k in samples if k.startswith("loss_"))
    if isinstance(loss_keys, str):  # one key ("all": every observable)
        keys = all_ids if loss_keys == "all" else [loss_keys]
    else:
        keys = list(loss_keys)
        if not keys:
            raise ValueError(f"loss_keys is empty: give 'all', one key or a list of keys from {all_ids}")
    missing = [k for k in keys if k not in all_ids]
    if missing:
        raise KeyError(f"loss key(s) {missing} not found; available: {all_ids}")
    losses = np.concatenate([np.asarray(samples[f"loss_{k}"], dtype=np.float64) for k in keys], axis=2)
    ids = np.concatenate([np.asarray(samples[f"input_ids_{k}"]) for k in keys], axis=0)
    if correlation_method == "sequence":
        losses = losses.mean(axis=3)
    if reduce_chain_dimension_method == "stack":
        x = losses.reshape(-1, *losses.shape[2:])  # (chain*draw, batch[, T])
    else:
        x = losses.mean(axis=0)
    x = x.reshape(x.shape[0], -1)  # (draws, batch[*T])
    xc = x - x.mean(0)
    cov = xc.T @ xc / max(x.shape[0] - 1, 1)
    if compute_covariance:
        m = cov
    else:
        sd = np.sqrt(np.diag(cov))
        with np.errstate(invalid="ignore", divide="ignore"):
            m = cov / np.outer(sd, sd)
    b = losses.shape[2]
    if correlation_method == "token":
        t = losses.shape[3]
        m = m.reshape(b, t, b, t).transpose(
            0, 2, 1, 3
        )  # (batch_1, batch_2, target_position, target_position_T)
        if average_tokenwise_bif:
            m = m.mean(axis=(2, 3))
    sel = []
    for name, r in (
        ("batch_index_range_1", batch_index_range_1),
        ("batch_index_range_2", batch_index_range_2),
    ):
        if isinstance(r, str):
            if r != "all":
                raise ValueError(f"{name} must be 'all' or a sequence of sequence indices, got {r!r}")
            sel.append(np.arange(b))
            continue
        idx = np.asarray(list(r))
        # devinterp selects these as labels of the batch coordinate (0 .. b-1): a negative one is not among them
        if idx.ndim != 1 or (idx.size and (idx.dtype.kind not in "iu" or idx.min() < 0 or idx.max() >= b)):
            raise ValueError(f"{name}={r!r} must hold sequence indices in 0..{b - 1} (no negative ones)")
        sel.append(idx.astype(np.int64))
    m = m[sel[0]][:, sel[1]]
    dims = ("batch_1", "batch_2") + (("target_position", "target_position_T") if m.ndim == 4 else ())
    coords = {"batch_1": sel[0], "batch_2": sel[1]}
    if m.ndim == 4:
        coords.update(
            target_position=np.arange(1, m.shape[2] + 1), target_position_T=np.arange(1, m.shape[3] + 1)
        )
    return DevinterpResult(
        influences=m.astype(np.float32),
        input_ids=ids,
        _dims={"influences": dims, "input_ids": ("batch", "position"), **{k: (k,) for k in coords}},
        _coords=coords,
    )


def bif(
    model: nn.Module,
    dataset,
    observables: Mapping[str, Any],
    *,
    lr: float,
    n_beta: float,
    param_masks: ParamMasks | None = None,
    correlation_method: str = "token",
    reduce_chain_dimension_method: str = "stack",
    average_tokenwise_bif: bool = False,
    compute_covariance: bool = False,
    bif_batch_size: int = 32,
    bif_device: str | torch.device | None = None,
    loss_fn: Callable | None = None,
    **kwargs,
) -> DevinterpResult:
    """devinterp 2.0.1's ``bif``: :func:`sample`, then :func:`compute_bif` (``bif_batch_size`` and
    ``bif_device`` only block devinterp's computation and do not change the result; values devinterp could not
    run with are refused by name before sampling)."""
    _check_block_options("bif_batch_size", bif_batch_size, "bif_device", bif_device)
    samples = sample(
        model, dataset, observables, lr=lr, n_beta=n_beta, param_masks=param_masks, loss_fn=loss_fn, **kwargs
    )
    return compute_bif(
        samples,
        correlation_method=correlation_method,
        reduce_chain_dimension_method=reduce_chain_dimension_method,
        average_tokenwise_bif=average_tokenwise_bif,
        compute_covariance=compute_covariance,
    )
