"""Refined LLCs in one call: the weight-refined LLC of every component and the data-refined LLC.

* **Weight-refined** LLC of a component ``C`` (an attention head, an MLP, the embedding, or any set of weights
  given by masks): the LLC estimate of a sampler that moves only ``C``'s weights (drift and noise masked), the
  others held at ``w*``. For a model whose components are independent regular blocks it is each block's parameter
  count over 2.
* **Data-refined** LLC on another data set ``q'``: the same estimator with the loss (that drives the chains and
  is averaged) taken on ``q'``, at the same ``w*``.

All restricted runs of one data set go through one :func:`pypattern.sample` call (``runs=``): with batched chains
every SGLD step of every run is one ``vmap``-ed forward and backward. Run ``r``'s chain ``c`` has the noise and
data of chain ``c`` of a separate call with that run's masks, so the numbers equal running each component alone
(with batched chains in float32 to a rounding or so: the vmapped products sum in another order; sequential chains
bit for bit).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .._checks import is_count
from .._masks import NONE_MASK, zero_one_mask
from ..io import Saveable, register
from .checkpoint import sub_run_path
from .diagnostics import naming_runs, outer_run_name, user_stacklevel
from .llc import (
    _SAMPLE_ARGUMENTS,
    _warn_above_half_dimension,
    _warn_auto_bias,
    _warn_auto_unrelaxed,
    llc_from_sample,
)
from .plan import chain_indices, check_callables, check_loader, check_model, refuse_unknown_keywords
from .results import check_arrays
from .runner import sample

__all__ = ["RefinedLLCResult", "refined_llc"]

FULL = "full"  # the name of the unrestricted run in the table
_NUM_CHAINS_DEFAULT = inspect.signature(sample).parameters["num_chains"].default


@register
@dataclass(eq=False)
class RefinedLLCResult(Saveable):
    """What :func:`refined_llc` returns: one row per (component, data set).

    Attributes
    ----------
    component, data : list of str, ``(num_rows,)``
        The component's name (``"full"`` for the unrestricted run) and the data set's (``"train"`` or
        ``"data"``).
    num_params : ndarray of int, ``(num_rows,)``
        Weights the run moves.
    llc_mean, llc_std, llc_se, r_hat, ess : ndarray, ``(num_rows,)``
        Estimate, standard deviation over chains (ddof=1), standard error of the estimate (with the error of
        ``L_n(w*)``, see :class:`~pypattern.sampling.results.LLCResult`), split R-hat and ESS of the loss trace.
    llc_per_chain : ndarray, ``(num_rows, num_chains)``
    init_loss : ndarray, ``(num_rows,)``
        ``L_n(w*)`` on the row's data set.
    config : dict
        The sampler's configuration (the training data's runs; ``step_size`` is the one used, chosen when
        ``"auto"``), and ``config["by_data"]``: for each data set (``"train"``, and ``"data"`` when given) the
        ``step_size``, ``nbeta`` and ``num_burnin_steps`` its runs used (each data set's default ``nbeta`` is
        its own batch size's, and ``"auto"`` calibrates for each data set), with ``auto_step`` when calibrated.
    seconds : float
        Wall time of the sampling.
    """

    component: list = field(default_factory=list)
    data: list = field(default_factory=list)
    num_params: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    llc_mean: np.ndarray = field(default_factory=lambda: np.zeros(0))
    llc_std: np.ndarray = field(default_factory=lambda: np.zeros(0))
    r_hat: np.ndarray = field(default_factory=lambda: np.zeros(0))
    ess: np.ndarray = field(default_factory=lambda: np.zeros(0))
    llc_se: np.ndarray = field(default_factory=lambda: np.zeros(0))
    llc_per_chain: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    init_loss: np.ndarray = field(default_factory=lambda: np.zeros(0))
    config: dict = field(default_factory=dict)
    seconds: float = 0.0

    def _check_loaded(self) -> None:
        """The members agree (a file read by :meth:`load`): one entry per row in ``component``, ``data`` (texts)
        and every array (``llc_se`` may be empty: no standard errors), a row of ``llc_per_chain`` per row, numbers
        throughout."""
        keys = ("num_params", "llc_mean", "llc_std", "r_hat", "ess", "init_loss")
        shapes = {**dict.fromkeys(keys, ("rows",)), "llc_per_chain": ("rows", "chains")}
        shapes["llc_se"] = ("rows",) if np.size(self.llc_se) else (0,)
        rows = check_arrays(vars(self), shapes)["rows"]
        for name in ("component", "data"):
            v = getattr(self, name)
            if not isinstance(v, list) or len(v) != rows or not all(isinstance(x, str) for x in v):
                have = f"{len(v)} entries" if isinstance(v, list) else type(v).__name__
                raise ValueError(f"{name} must hold one name (str) per row ({rows}, as llc_mean), got {have}")

    def rows(self) -> list[dict]:
        return [
            {
                "component": self.component[i],
                "data": self.data[i],
                "num_params": int(self.num_params[i]),
                "llc_mean": float(self.llc_mean[i]),
                "llc_std": float(self.llc_std[i]),
                "llc_se": float(self.llc_se[i]) if len(self.llc_se) else float("nan"),
                "r_hat": float(self.r_hat[i]),
                "ess": float(self.ess[i]),
                "init_loss": float(self.init_loss[i]),
            }
            for i in range(len(self.component))
        ]

    def llc(self, component: str, data: str = "train") -> float:
        """The estimate of one row."""
        for i, (c, d) in enumerate(zip(self.component, self.data, strict=True)):
            if c == component and d == data:
                return float(self.llc_mean[i])
        raise KeyError(f"no row for component={component!r}, data={data!r}; components are {self.component}")

    def to_pandas(self):
        """The table: one row per (component, data set)."""
        import pandas as pd

        return pd.DataFrame(self.rows())

    def __str__(self) -> str:
        lines = [f"{'component':<24} {'data':<6} {'params':>7} {'llc':>10} {'std':>9} {'R-hat':>7}"]
        for r in self.rows():
            lines.append(
                f"{r['component']:<24} {r['data']:<6} {r['num_params']:>7d} {r['llc_mean']:>10.4g} "
                f"{r['llc_std']:>9.3g} {r['r_hat']:>7.3f}"
            )
        return "\n".join(lines)

    def plot(self, ax=None):
        """Horizontal bars of each row's LLC with its standard deviation over chains; returns the axes."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(6, 0.3 * len(self.component) + 1.2))
        labels = [c if d == "train" else f"{c} [{d}]" for c, d in zip(self.component, self.data, strict=True)]
        y = np.arange(len(labels))
        colors = ["C0" if d == "train" else "C1" for d in self.data]
        ax.barh(y, self.llc_mean, xerr=self.llc_std, color=colors)
        ax.set_yticks(y, labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("refined LLC")
        return ax


def _bool_mask(name: str, key: str, v) -> torch.Tensor:
    """A component's mask of parameter ``key``: bool, or numbers that are all 0 or 1 (refused otherwise: a weight
    is in the component or not)."""
    t = zero_one_mask(v)
    if t is None:
        raise ValueError(
            f"component {name!r}: the mask of {key!r} "
            + (
                "holds values other than 0 and 1"
                if isinstance(v, torch.Tensor | np.ndarray | list | tuple | int | float)
                else (NONE_MASK if v is None else f"is a {type(v).__name__}, not a mask")
            )
            + "; give a bool mask (or 0/1)"
        )
    return t


def check_components(components) -> None:
    """Refuse, without the model, a ``components`` that is no component list: a text other than ``"heads"`` or
    ``"blocks"``, or a value that is neither a text, a dict nor an iterable of components, or an empty one."""
    if isinstance(components, str):
        if components not in ("heads", "blocks"):
            raise ValueError(
                f"components={components!r}: give 'heads' (every head, MLP and embedding), 'blocks' (attention "
                "layers whole), a list of component names, or a dict of name -> names or masks"
            )
        return
    if not isinstance(components, Mapping) and (
        isinstance(components, bytes | torch.Tensor) or not isinstance(components, Iterable)
    ):
        raise TypeError(
            f"components={components!r} is not valid; give 'heads', 'blocks', a list of component names or "
            "parameter-name prefixes, or a dict of name -> names or masks"
        )
    if isinstance(components, Sized) and len(components) == 0:
        raise ValueError("components is empty: give at least one component")


def _component_runs(model: nn.Module, components) -> tuple[list[str], list[tuple]]:
    """Names and ``(restrict_to, masks)`` pairs of the components."""
    from ..models.transformer import component_masks, list_components

    check_components(components)
    if isinstance(components, str):
        from ..models.hf_masks import hf_components, is_hf_model

        if hasattr(model, "cfg"):
            components = list_components(model, heads=components == "heads")
        elif is_hf_model(model):  # an unconverted Hugging Face model: its own components (hf_component_masks)
            components = hf_components(model, heads=components == "heads")
        else:
            raise ValueError(
                f"components={components!r} needs pypattern's Transformer or a supported Hugging Face causal LM "
                "(pypattern.from_hf converts others); for other models give a list of parameter-name prefixes or "
                "a dict of masks"
            )
        listed = True
    else:
        listed = False
    if not isinstance(components, Mapping) and (
        isinstance(components, bytes | torch.Tensor) or not isinstance(components, Iterable)
    ):
        raise TypeError(
            f"components={components!r} is not valid; give 'heads', 'blocks', a list of component names or "
            "parameter-name prefixes, or a dict of name -> names or masks"
        )
    if isinstance(components, Mapping):
        names, specs = [str(k) for k in components], list(components.values())
    else:
        specs = list(components)
        names = [c if isinstance(c, str) else f"component_{i}" for i, c in enumerate(specs)]
    if not specs:
        raise ValueError("components is empty: give at least one component")
    if len(set(names)) != len(names) or FULL in names:
        raise ValueError(f"components must have distinct names other than {FULL!r}, got {names}")
    runs = []
    params = dict(model.named_parameters())
    # a tied weight's other names (lm_head.weight of a model whose output head is its embedding) name the one
    # parameter they share, as a component name does
    first = {id(p): n for n, p in params.items()}
    alias = {n: first[id(p)] for n, p in model.named_parameters(remove_duplicate=False) if id(p) in first}
    kept_names = []
    for name, spec in zip(names, specs, strict=True):
        if isinstance(spec, str):
            masks = component_masks(model, spec)
        elif isinstance(spec, Mapping | Sequence):
            if len(spec) == 0:
                raise ValueError(
                    f"component {name!r} is empty: give parameter names or masks by parameter name"
                )
            unknown = [k for k in spec if not isinstance(k, str) or k not in alias]
            if unknown:
                raise ValueError(
                    f"component {name!r} names {unknown[0]!r}, not a parameter of the model; names are "
                    f"{sorted(params)[:12]}{' ...' if len(params) > 12 else ''}"
                )
            if isinstance(spec, Mapping):
                masks = {}
                for k, v in spec.items():
                    m, key = _bool_mask(name, k, v), alias[k]
                    if tuple(m.shape) != tuple(params[key].shape):
                        raise ValueError(
                            f"component {name!r}: the mask of {k!r} has shape {tuple(m.shape)}, the parameter "
                            f"{tuple(params[key].shape)}"
                        )
                    # two names of one tied weight: the weights either mask selects
                    masks[key] = m if key not in masks else masks[key] | m.to(masks[key].device)
                if not any(bool(m.any()) for m in masks.values()):
                    raise ValueError(
                        f"component {name!r}: its masks select no weight (all False); give at least one True entry"
                    )
            else:
                masks = {alias[k]: torch.ones_like(params[alias[k]], dtype=torch.bool) for k in spec}
        else:
            raise TypeError(
                f"component {name!r}: expected a name, a list of parameter names or masks, got {spec!r}"
            )
        # frozen parameters (requires_grad=False) do not move, as in estimate_llc: left out of the component
        frozen = sorted(k for k in masks if k in params and not params[k].requires_grad)
        masks = {k: v for k, v in masks.items() if k not in frozen}
        if not masks:
            if listed:  # a component of the model's own list whose weights are all frozen: nothing to sample
                warnings.warn(
                    f"component {name!r} has only frozen parameters ({', '.join(frozen)}): left out",
                    stacklevel=user_stacklevel(),
                )
                continue
            raise ValueError(
                f"component {name!r}: its parameters {frozen} are all frozen (requires_grad=False): nothing moves"
            )
        kept_names.append(name)
        runs.append((list(masks), masks))
    if not runs:
        raise ValueError("every component has only frozen parameters: nothing to sample")
    return kept_names, runs


def _check_chains_cover_runs(sample_kwargs: dict, names: list[str]) -> None:
    """``chains=`` as :func:`pypattern.sample` reads it with ``runs``: global indices ``r * num_chains + c`` over the
    rows' runs (``"full"`` first when included, then the components in order). Kept as a list (both data sets read
    it), and refused, naming it, when a row's run would get no chain: its LLC would have no draw."""
    chains = sample_kwargs.get("chains")
    if chains is None:
        return
    given = sample_kwargs["chains"] = chain_indices(chains)
    num_chains = sample_kwargs.get("num_chains", _NUM_CHAINS_DEFAULT)
    if not is_count(num_chains) or num_chains < 1 or not given:
        return  # refused by sample, naming it (an empty list inside a process group: a rank with no chain)
    c = int(num_chains)
    missing = [n for r, n in enumerate(names) if not any(r * c <= g < (r + 1) * c for g in given)]
    if missing:
        raise ValueError(
            f"chains={given}: no chain of row {missing[0]!r} would run, so it would have no LLC; with refined_llc, "
            f"chains are sample()'s global indices r * num_chains + c (num_chains={c}) over the rows {names} in "
            f"this order: give at least one chain of each row, e.g. chains={[r * c for r in range(len(names))]} "
            "for chain 0 of each, or None for all"
        )


def _run_label(name: str, data: str, outer: str | None = None) -> str:
    """The name a run's diagnostic warnings begin with: the component's (or the unrestricted run's), and the data
    set's when it is not the training data, after ``outer`` (the caller's run, e.g. an :class:`OnlineLLC` step)."""
    who = "the unrestricted run" if name == FULL else f"component {name!r}"
    label = f"refined_llc(), {who}" + ("" if data == "train" else f" on {data}")
    return label if outer is None else f"{outer}, {label}"


def refined_llc(
    model: nn.Module,
    loader: Iterable,
    *,
    components: str | Sequence | Mapping[str, Any] = "heads",
    data: Iterable | None = None,
    loss_fn: Callable | None = None,
    data_loss_fn: Callable | None = None,
    include_full: bool = True,
    **sample_kwargs,
) -> RefinedLLCResult:
    """Weight-refined LLCs of many components, and data-refined LLCs, in one batched call per data set.

    Parameters
    ----------
    model : nn.Module
        At the trained weights ``w*``; not modified.
    loader : iterable of batches
        The training data (rows ``data="train"``).
    components : "heads", "blocks", list or dict
        ``"heads"``: every attention head, MLP, the embeddings and the unembedding of pypattern's Transformer
        (:func:`pypattern.models.list_components`) or of a supported unconverted Hugging Face model
        (:func:`pypattern.models.hf_masks.hf_components`); with tied embeddings there is no separate ``"unembed"``
        component: ``"embed"`` is both; ``"blocks"``: attention layers whole instead of heads; a list
        of component names (``"blocks.0.attn.head.1"``, ``"blocks.1.mlp"``, ``"embed"``, or a parameter-name
        prefix) or a dict of display name -> component name, list of parameter names, or ``{param_name: mask}``.
    data : iterable of batches, optional
        Another data set ``q'``: every row is estimated again with the loss on it (rows ``data="data"``); the
        ``"full"`` row there is the data-refined LLC.
    loss_fn, data_loss_fn : callable(model, batch) -> loss, optional
        Losses on ``loader`` and on ``data`` (default for ``data_loss_fn``: ``loss_fn``); default as
        :func:`pypattern.sample` (next-token cross-entropy for pypattern's Transformer on token batches).
    include_full : bool
        Add the unrestricted run (row ``"full"``).
    **sample_kwargs
        Any keyword of :func:`pypattern.sample` (documented there) except ``runs``, ``restrict_to`` and ``masks``
        (``init_loss`` is ``L_n(w*)`` on ``loader``: the rows of ``data`` use their own, computed on ``data``);
        any other keyword is a ``TypeError`` naming it: ``num_chains``,
        ``num_draws``, ``step_size`` (or ``"auto"``: one calibration for all the runs of a data set), ``nbeta``,
        ``localization``, ``seed``, ``batched``, ... ``chains`` takes :func:`pypattern.sample`'s global indices
        ``r * num_chains + c`` over the rows (``"full"`` first, then the components in order), at least one per
        row (refused otherwise, naming it); a parameter-name list or mask dict may name a tied weight by any of its
        names (``lm_head.weight`` of a tied embedding). With a calibrated step and no ``num_burnin_steps`` the
        runs of each data set burn in as :func:`pypattern.estimate_llc`'s do (``num_burnin_steps="auto"``: as
        long as that data set's chosen step needs for the chains to relax from ``w*``; ``config["by_data"]``
        holds the count, and its ``auto_step["burnin"]`` why).

    Returns
    -------
    RefinedLLCResult
        ``.to_pandas()`` (one row per component and data set), ``.plot()``, ``.llc(component, data)``.
    """
    for bad in ("runs", "restrict_to", "masks"):
        if bad in sample_kwargs:
            raise ValueError(f"{bad} is set by refined_llc from components; pass components instead")
    refuse_unknown_keywords(
        sample_kwargs,
        _SAMPLE_ARGUMENTS - {"runs", "restrict_to", "masks"},
        "refined_llc()",
        "pypattern.sample()'s keywords (documented there) but runs, restrict_to and masks",
    )
    check_model(model)
    if not isinstance(include_full, bool | np.bool_):
        raise TypeError(f"include_full must be True or False, got {include_full!r}")
    if data is not None:  # sampled as a loader: errors would name "loader"
        check_loader(data, "data")
    if data_loss_fn is not None:
        if data is None:
            raise ValueError("data_loss_fn is the loss on data, and data is not given: give data, or drop it")
        if not callable(data_loss_fn):
            raise TypeError(
                f"data_loss_fn={data_loss_fn!r} is not callable; give a function (model, batch) -> loss, or None"
            )
    # before the first data set's runs: the second's loss function too
    callbacks = sample_kwargs.get("callbacks", ())
    if not callable(callbacks) and isinstance(callbacks, Iterable) and not isinstance(callbacks, str | bytes):
        callbacks = sample_kwargs["callbacks"] = list(callbacks)
    check_callables(loss_fn, sample_kwargs.get("observables"), callbacks, sample_kwargs.get("batched"))
    if data is not None and data_loss_fn is not None:
        check_callables(data_loss_fn, None, (), None, "data_loss_fn")
    names, runs = _component_runs(model, components)
    if include_full:
        names, runs = [FULL, *names], [(None, None), *runs]
    _check_chains_cover_runs(sample_kwargs, names)
    moving = {n: p for n, p in model.named_parameters() if p.requires_grad}
    counts = []
    for restrict, masks in runs:
        if restrict is None:
            counts.append(sum(p.numel() for p in moving.values()))
        else:
            counts.append(int(sum(int(masks[k].sum()) for k in restrict)))
    ckpt = sample_kwargs.pop("checkpoint", None)
    if sample_kwargs.get("num_burnin_steps") is None:  # a calibrated step's runs burn in as long as it needs
        sample_kwargs["num_burnin_steps"] = "auto"
    sets = [("train", loader, loss_fn)]
    if data is not None:
        sets.append(("data", data, data_loss_fn or loss_fn))
    out = RefinedLLCResult()
    rows: dict[str, list] = {
        k: [] for k in ("llc_mean", "llc_std", "llc_se", "r_hat", "ess", "per_chain", "init", "n")
    }
    seconds = 0.0
    outer = outer_run_name()
    for label, ld, lf in sets:
        # one checkpoint file per data set (the two runs read other data)
        path = ckpt if label == "train" else sub_run_path(ckpt, label)
        kw = dict(sample_kwargs)
        if label != "train":  # a given init_loss is L_n(w*) on the training data: the other set's is its own
            kw.pop("init_loss", None)
        # the sampler's warnings (stationarity, mixing, step bias, drift) begin with the run they concern
        with naming_runs([_run_label(name, label, outer) for name in names]):
            results = sample(model, ld, loss_fn=lf, runs=runs, checkpoint=path, **kw)
        seconds += float(results[0].seconds)
        if not out.config:
            out.config = dict(results[0].config)
            out.config.pop("restrict_to", None)
            out.config["by_data"] = {}
        used = results[0].config
        out.config["by_data"][label] = {
            k: used[k] for k in ("step_size", "nbeta", "num_burnin_steps", "auto_step") if k in used
        }
        for k, (name, n, res) in enumerate(zip(names, counts, results, strict=True)):
            r = llc_from_sample(res, name if label == "train" else f"{name} [{label}]")
            # estimate_llc's warnings: a calibrated step's bias and short trials (one calibration per data set:
            # once), an unrestricted estimate above d / 2
            _warn_auto_bias(r)
            if k == 0:
                _warn_auto_unrelaxed(
                    r,
                    model,
                    None if name == FULL else {},
                    capped=sample_kwargs.get("warn_nonstationary", True),
                )
            if name == FULL:
                _warn_above_half_dimension(r, model)
            out.component.append(name)
            out.data.append(label)
            rows["n"].append(n)
            rows["llc_mean"].append(r.llc_mean)
            rows["llc_std"].append(r.llc_std)
            rows["llc_se"].append(r.llc_se)
            rows["r_hat"].append(r.r_hat)
            rows["ess"].append(r.ess)
            rows["per_chain"].append(r.llc_per_chain)
            rows["init"].append(r.init_loss)
    out.num_params = np.asarray(rows["n"], dtype=np.int64)
    out.llc_mean = np.asarray(rows["llc_mean"], dtype=np.float64)
    out.llc_std = np.asarray(rows["llc_std"], dtype=np.float64)
    out.llc_se = np.asarray(rows["llc_se"], dtype=np.float64)
    out.r_hat = np.asarray(rows["r_hat"], dtype=np.float64)
    out.ess = np.asarray(rows["ess"], dtype=np.float64)
    out.llc_per_chain = np.stack(rows["per_chain"]).astype(np.float64)
    out.init_loss = np.asarray(rows["init"], dtype=np.float64)
    out.seconds = seconds
    return out
