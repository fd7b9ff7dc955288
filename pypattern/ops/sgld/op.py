"""The public SGLD op: argument validation, then the backend chosen by :mod:`pypattern._backends`.

The update and the noise stream are specified in :mod:`pypattern.ops.sgld` and :mod:`.reference`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from ... import _backends
from .reference import sgld_chains_step_reference_, sgld_step_reference_


def check_scalar(name: str, value, *, positive: bool = False) -> float:
    if isinstance(value, str | bytes):  # float("0.1") would parse: a string here is a mistake
        raise TypeError(f"{name} must be a real number, got the string {value!r}")
    if isinstance(value, bool) or type(value).__name__ == "bool_":  # True is 1.0 to float(): a mistake here
        raise TypeError(f"{name} must be a real number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if positive and v <= 0:
        raise ValueError(f"{name} must be > 0, got {v}")
    if not positive and v < 0:
        raise ValueError(f"{name} must be >= 0, got {v}")
    return v


def check_key(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import numpy as np

            if isinstance(value, np.integer):
                value = int(value)
        except ImportError:  # pragma: no cover
            pass
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= value < 2**64:
        raise ValueError(f"{name} must be in [0, 2**64), got {value}")
    return value


def as_list(name: str, x) -> list:
    if isinstance(x, torch.Tensor):
        return [x]
    if not isinstance(x, Sequence):
        raise TypeError(f"{name} must be a tensor or a list of tensors, got {type(x).__name__}")
    return list(x)


def validate_inputs(params, grads, anchors, masks):
    params, grads, anchors = (
        as_list("params", params),
        as_list("grads", grads),
        as_list("anchors", anchors),
    )
    if not (len(params) == len(grads) == len(anchors)):
        raise ValueError(
            f"params, grads and anchors must have the same length, got {len(params)}, {len(grads)}, {len(anchors)}"
        )
    if masks is not None:
        masks = as_list("masks", masks)
        if len(masks) != len(params):
            raise ValueError(f"masks must have one entry (or None) per tensor: {len(masks)} != {len(params)}")
    device = params[0].device if params else torch.device("cpu")
    if device.type == "meta":
        raise ValueError(
            "params are on the meta device: a step reads and writes their values (and checks the anchors for "
            "NaN); give tensors with data"
        )
    tensor, floats = torch.Tensor, (torch.float32, torch.float64)
    grad_mode = torch.is_grad_enabled()
    inference = torch.is_inference_mode_enabled()
    for i, (w, g, a) in enumerate(zip(params, grads, anchors)):
        # One cheap test per tensor; the detailed diagnosis runs only when it fails.
        if not (type(w) is tensor or isinstance(w, tensor)) or not (
            isinstance(g, tensor) and isinstance(a, tensor)
        ):
            for name, x in (("params", w), ("grads", g), ("anchors", a)):
                if not isinstance(x, tensor):
                    raise TypeError(f"{name}[{i}] must be a tensor, got {type(x).__name__}")
        dt, shape = w.dtype, w.shape
        if not (
            dt in floats
            and g.dtype == dt
            and a.dtype == dt
            and g.shape == shape
            and a.shape == shape
            and w.device == device
            and g.device == device
            and a.device == device
            and w.layout == g.layout == a.layout == torch.strided
        ):
            _diagnose(i, w, g, a, device)
        if masks is not None and masks[i] is not None:
            m = masks[i]
            if not isinstance(m, tensor):
                raise TypeError(f"masks[{i}] must be a tensor or None, got {type(m).__name__}")
            _backends.refuse_non_strided("", f"masks[{i}]", m)
            if m.shape != shape:
                raise ValueError(f"masks[{i}] has shape {tuple(m.shape)} but params[{i}] has {tuple(shape)}")
            if m.device != device:
                raise ValueError(f"masks[{i}] is on {m.device} but params are on {device}")
            if not (m.dtype == torch.bool or m.is_floating_point()):
                raise TypeError(f"masks[{i}] must be bool or floating point, got {m.dtype}")
            refuse_nonfinite_mask(i, m)
        refuse_nonfinite_anchor(i, a)
        _check_updatable(f"params[{i}]", w, grad_mode, inference)
        status = _internal_overlap(w)
        if status:
            raise ValueError(
                f"params[{i}] {shares(status, elements=True)} (an expanded, zero-stride or overlapping view of "
                f"shape {tuple(w.shape)}, strides {w.stride()}): each would be stepped several times; give a tensor "
                "of its own (e.g. .clone())"
            )
    _refuse_reads_of_params(params, {"anchors": anchors, "grads": grads, "masks": masks or []})
    _check_distinct(params)
    # a negative view (``z.conj().imag``) holds its values negated in memory, which the kernels read as they are
    # (torch's own fallback does not reach the masks' optional list, nor the Triton kernels): the tensors the
    # step only reads are taken as their values (a copy only for such a view)
    if any(g.is_neg() or a.is_neg() for g, a in zip(grads, anchors)):
        grads = [g.resolve_neg() for g in grads]
        anchors = [a.resolve_neg() for a in anchors]
    if masks is not None and any(m is not None and m.is_neg() for m in masks):
        masks = [None if m is None else m.resolve_neg() for m in masks]
    return params, grads, anchors, masks, device


def refuse_nonfinite_mask(i: int, m: torch.Tensor) -> None:
    """``ValueError`` when the floating mask ``masks[i]`` holds a NaN or Inf, counting them."""
    if m.is_floating_point() and not bool(torch.isfinite(m).all()):
        raise ValueError(
            f"masks[{i}] holds {int((~torch.isfinite(m)).sum())} NaN or Inf entries; give finite values "
            "(0 freezes an entry, other values scale its update)"
        )


def refuse_nonfinite_anchor(i: int, a: torch.Tensor) -> None:
    """``ValueError`` when ``anchors[i]`` holds a NaN or Inf, counting them."""
    if not bool(torch.isfinite(a).all()):
        raise ValueError(
            f"anchors[{i}] holds {int((~torch.isfinite(a)).sum())} NaN or Inf entries; give the finite "
            "trained weights w*"
        )


def _storage_key(t: torch.Tensor) -> tuple:
    try:
        return t.device, t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without a storage (e.g. some subclasses)
        return t.device, t.data_ptr()


def _refuse_reads_of_params(params, read: dict) -> None:
    """No tensor the step reads (``read``: ``{"anchors": [...], "grads": [...], "masks": [...]}``) shares memory
    with any of the params it writes, of its own index or another: the step would read values it is overwriting,
    or values that depend on the order in which the tensors are updated. Only tensors in one storage are
    compared."""
    by_storage: dict = {}
    for j, w in enumerate(params):
        if w.numel():
            by_storage.setdefault(_storage_key(w), []).append(j)
    if not by_storage:
        return
    for name, tensors in read.items():
        for i, t in enumerate(tensors):
            if t is None or t.numel() == 0:
                continue
            for j in by_storage.get(_storage_key(t), ()):
                status = _overlap(params[j], t)
                if not status:
                    continue
                what = f"{name}[{i}] {shares(status)} with params[{j}]"
                if name == "anchors" and i == j:
                    raise ValueError(
                        f"{what}: the anchors must be a copy of the trained weights (e.g. [p.detach().clone() for "
                        "p in params]), else the pull towards them is always 0"
                    )
                if name == "anchors":
                    raise ValueError(
                        f"{what}: the step writes params[{j}] while it reads anchors[{i}], which would then depend on "
                        "the order the tensors are updated in; the anchors must be a copy of the trained weights "
                        "(e.g. [p.detach().clone() for p in params])"
                    )
                kind = "gradient" if name == "grads" else "mask"
                raise ValueError(
                    f"{what}: the step would read a {kind} it is overwriting; give the {kind} in its own tensor"
                )


#: Answers of the memory-overlap tests (:func:`_overlap`, :func:`_internal_overlap`): true values refuse.
DISJOINT, OVERLAP, UNDECIDED = 0, 1, 2
#: Nodes of the exact search (:func:`_solvable`) before it gives up, and the most elements listed one by one then
_SEARCH_BUDGET = 20000
_ENUMERATE_LIMIT = 1 << 24


def shares(status: int, *, plural: bool = False, elements: bool = False) -> str:
    """The words of an overlap answer for an error message: ``"shares memory"`` (``"share memory"``, or ``"has
    elements that share memory"``), or, when the test could not decide, that they may (could not rule it out)."""
    if elements:
        if status == UNDECIDED:
            return "may have elements that share memory (could not rule it out)"
        return "has elements that share memory"
    if status == UNDECIDED:
        return "may share memory (could not rule it out)"
    return "share memory" if plural else "shares memory"


def _internal_overlap(t: torch.Tensor) -> int:
    """Whether two elements of ``t`` are one memory location (an expanded view): :data:`DISJOINT`,
    :data:`OVERLAP`, or :data:`UNDECIDED` when neither the exact search nor a listing of the elements could tell."""
    if t.numel() <= 1:
        return DISJOINT
    if any(st == 0 and n > 1 for n, st in zip(t.shape, t.stride())):
        return OVERLAP
    try:
        status = torch._debug_has_internal_overlap(t)  # 0: none, 1: overlap, 2: too hard to tell
    except (AttributeError, RuntimeError):  # pragma: no cover - private helper missing
        status = 2
    if status != 2:
        return OVERLAP if status == 1 else DISJOINT
    # a strided view torch cannot judge: two index vectors i != j with sum_k (i_k - j_k) stride_k == 0?
    dims = sorted((st, n) for n, st in zip(t.shape, t.stride()) if n > 1)
    if any(a[0] == b[0] for a, b in zip(dims, dims[1:])):
        return OVERLAP  # two dimensions of one stride: (1, 0) and (0, 1) are one element
    extent = 0  # each stride past the extent of the smaller ones (a transpose or a slice of a dense tensor)
    for st, n in dims:
        if st <= extent:
            break
        extent += (n - 1) * st
    else:
        return DISJOINT
    found = _solvable(
        [st for st, _ in dims], [1 - n for _, n in dims], [n - 1 for _, n in dims], 0, nonzero=True
    )
    if found is not None:
        return OVERLAP if found else DISJOINT
    if t.numel() > _ENUMERATE_LIMIT:
        return UNDECIDED
    return OVERLAP if torch.unique(_offsets(t, 0)).numel() != t.numel() else DISJOINT


def _solvable(coeffs, lows, highs, target: int, *, nonzero: bool = False) -> bool | None:
    """Whether integers ``x_k`` in ``[lows[k], highs[k]]`` with ``sum_k coeffs[k] x_k == target`` exist (with some
    ``x_k != 0`` when ``nonzero``, for ranges symmetric about 0); ``coeffs`` > 0. None when the search ran past
    :data:`_SEARCH_BUDGET` nodes.

    A depth-first search over the coefficients, largest first, that keeps only the values of ``x_k`` from which
    the remaining terms can still reach the target (their range, and their gcd as a congruence): exact, and a few
    nodes per dimension for the strides of views of one tensor, which nest."""
    order = sorted(range(len(coeffs)), key=lambda k: -coeffs[k])
    c = [int(coeffs[k]) for k in order]
    lo = [int(lows[k]) for k in order]
    hi = [int(highs[k]) for k in order]
    n = len(c)
    rest_lo, rest_hi, rest_g = [0] * (n + 1), [0] * (n + 1), [0] * (n + 1)
    for k in range(n - 1, -1, -1):
        rest_lo[k] = rest_lo[k + 1] + lo[k] * c[k]
        rest_hi[k] = rest_hi[k + 1] + hi[k] * c[k]
        rest_g[k] = math.gcd(rest_g[k + 1], c[k])
    nodes = 0

    def search(k: int, r: int, all_zero: bool) -> bool:
        nonlocal nodes
        nodes += 1
        if nodes > _SEARCH_BUDGET:
            raise _SearchTooLong
        if k == n:
            return r == 0 and not (nonzero and all_zero)
        if not rest_lo[k] <= r <= rest_hi[k] or r % rest_g[k]:
            return False
        ck, g = c[k], rest_g[k + 1]
        first = max(lo[k], -((rest_hi[k + 1] - r) // ck))  # ceil((r - rest_hi) / ck)
        last = min(hi[k], (r - rest_lo[k + 1]) // ck)
        if nonzero and all_zero:  # x and -x are both solutions: the first nonzero entry is positive
            first = max(first, 0)
        step = 1
        if g:  # r - x ck must be a multiple of g: x = x0 (mod g / gcd(ck, g))
            g2 = math.gcd(ck, g)
            if r % g2:
                return False
            step = g // g2
            if step > 1:
                x0 = (r // g2) * pow(ck // g2, -1, step) % step
                first += (x0 - first) % step
        return any(search(k + 1, r - x * ck, all_zero and x == 0) for x in range(first, last + 1, step))

    try:
        return search(0, int(target), True)
    except _SearchTooLong:
        return None


class _SearchTooLong(Exception):
    pass


def _inference_message(what: str) -> str:
    return (
        f"{what} is an inference tensor (made under torch.inference_mode()) and the step updates it in place "
        "outside inference mode, which torch forbids; step inside torch.inference_mode(), or give a normal tensor "
        "(.clone() it outside inference mode)"
    )


def _check_updatable(what: str, t: torch.Tensor, grad_mode: bool, inference: bool) -> None:
    """``t`` may be updated in place by a step: it takes no gradient in grad mode, and it is not an inference
    tensor outside inference mode (the C++ kernels write through raw pointers, past torch's own checks)."""
    if grad_mode and t.requires_grad:
        raise RuntimeError(
            f"{what} requires grad and grad mode is on: an in-place step on it would corrupt autograd; step under "
            "torch.no_grad() (as torch's optimizers do)"
        )
    if not inference and t.is_inference():
        raise RuntimeError(_inference_message(what))
    if t.is_neg():
        raise ValueError(negative_view_message(what, "the step"))


def negative_view_message(what: str, writer: str) -> str:
    """Why a negative view (``is_neg()``) cannot be written in place by the kernels."""
    return (
        f"{what} is a negative view (torch applies its negation lazily, is_neg() is True: the imaginary part of a "
        f"conjugated complex tensor); {writer} writes its memory directly (the C++ and Triton kernels would store "
        "the values with their signs flipped); give a tensor without it (.resolve_neg() makes one)"
    )


def check_states(name: str, states, others: dict) -> None:
    """State tensors updated in place beside the params (SGNHT's momenta, RMSprop's running means): none shares
    memory with another state or with any tensor of ``others`` (``{"params": [...], "grads": [...], "masks":
    [...], ...}``; None entries, as in ``masks``, are skipped), none takes gradients in grad mode, and none is an
    inference tensor outside inference mode (the in-place update would corrupt autograd, or torch forbids it). A
    mask that is another tensor's state would be read after that state was overwritten, depending on the order
    the tensors are updated in."""
    grad_mode, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    # only tensors in one storage can share memory: each state is compared with those alone (linear in the
    # number of tensors, not quadratic)
    by_storage: dict = {}
    for other, ts in others.items():
        for j, t in enumerate(ts):
            if t is not None and t.numel():
                by_storage.setdefault(_storage_key(t), []).append((other, j, t))
    for i, s in enumerate(states):
        _check_updatable(f"{name}[{i}]", s, grad_mode, inference)
        status = _internal_overlap(s)
        if status:
            raise ValueError(
                f"{name}[{i}] {shares(status, elements=True)} (an expanded or overlapping view); give its own tensor"
            )
        if s.numel():
            for other, j, t in by_storage.get(_storage_key(s), ()):
                status = _overlap(s, t)
                if status:
                    raise ValueError(
                        f"{name}[{i}] {shares(status)} with {other}[{j}]: the step would overwrite one with the "
                        f"other; give each {name} entry its own tensor"
                    )
    _check_distinct(states, name)


def _check_distinct(params, name: str = "params") -> None:
    """No two params share memory: each would be stepped once per appearance (tied weights are one tensor, listed
    once)."""
    for j, i, status in overlapping_pairs(params):
        raise ValueError(
            f"{name}[{j}] and {name}[{i}] {shares(status, plural=True)}: each would be stepped once per appearance; "
            "list every tensor once (tied weights as one tensor)"
        )


def overlapping_pairs(tensors) -> Iterator[tuple[int, int, int]]:
    """The index pairs ``(j, i)``, ``j < i``, of ``tensors`` whose memory overlaps or may overlap, with
    :func:`_overlap`'s answer (``(j, i, status)``), in order; only tensors in one storage are compared."""
    by_storage: dict = {}
    for i, t in enumerate(tensors):
        if t.numel() == 0:
            continue
        key = _storage_key(t)
        for j in by_storage.get(key, ()):
            status = _overlap(tensors[j], t)
            if status:
                yield j, i, status
        by_storage.setdefault(key, []).append(i)


def _overlap(x: torch.Tensor, y: torch.Tensor) -> int:
    """Whether two tensors share a memory location: :data:`DISJOINT`, :data:`OVERLAP`, or :data:`UNDECIDED` when
    neither the exact search over their strides nor a listing of their elements could tell (true values refuse)."""
    if x.numel() == 0 or y.numel() == 0 or x.device != y.device:
        return DISJOINT
    try:
        if x.untyped_storage().data_ptr() != y.untyped_storage().data_ptr():
            return DISJOINT
    except (RuntimeError, NotImplementedError):  # tensors without a storage (e.g. some subclasses)
        return OVERLAP if x.data_ptr() == y.data_ptr() else DISJOINT

    def span(t: torch.Tensor) -> tuple[int, int]:
        extent = sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) + 1
        return t.data_ptr(), t.data_ptr() + extent * t.element_size()

    (a0, a1), (b0, b1) = span(x), span(y)
    if not (a0 < b1 and b0 < a1):
        return DISJOINT
    if x.is_contiguous() and y.is_contiguous():
        return OVERLAP
    # strided views (the interleaved halves W[:, ::2] and W[:, 1::2], column blocks, ...): is there an element of
    # x and one of y at one address? With i, j their index vectors: sum_k i_k sx_k - sum_k j_k sy_k == y0 - x0,
    # one integer variable per distinct stride (i_k - j_k when both have it), in elements when both tensors have
    # one element size and their offsets differ by whole elements, else in bytes with a variable for the bytes
    # within an element
    ex, ey = x.element_size(), y.element_size()
    target = y.data_ptr() - x.data_ptr()
    unit = ex if ex == ey and target % ex == 0 else 1
    ranges: dict[int, list[int]] = {}
    for t, sign, size in ((x, 1, ex), (y, -1, ey)):
        for n, st in zip(t.shape, t.stride()):
            if n > 1 and st != 0:
                r = ranges.setdefault(st * size // unit, [0, 0])  # torch strides are >= 0
                r[0 if sign < 0 else 1] += sign * (n - 1)
    if unit == 1:  # x's element covers bytes [X, X + ex), y's [Y, Y + ey)
        r = ranges.setdefault(1, [0, 0])
        r[0], r[1] = r[0] - (ey - 1), r[1] + (ex - 1)
    coeffs = list(ranges)
    found = _solvable(coeffs, [ranges[c][0] for c in coeffs], [ranges[c][1] for c in coeffs], target // unit)
    if found is not None:
        return OVERLAP if found else DISJOINT
    if x.numel() + y.numel() > _ENUMERATE_LIMIT or unit == 1:
        return UNDECIDED
    hit = torch.isin(_offsets(x, x.data_ptr() // unit), _offsets(y, y.data_ptr() // unit)).any()
    return OVERLAP if bool(hit) else DISJOINT


def _offsets(t: torch.Tensor, base: int) -> torch.Tensor:
    """The memory offsets (in elements, from ``base``) of every element of ``t``, as a flat int64 CPU tensor."""
    off = torch.zeros((), dtype=torch.int64)
    for n, st in zip(t.shape, t.stride()):
        off = off.unsqueeze(-1) + torch.arange(n, dtype=torch.int64) * st
    return off.reshape(-1) + base


_SPARSE_HINT = (
    "; a sparse gradient comes from nn.Embedding(sparse=True) or nn.EmbeddingBag(sparse=True): build the module "
    "with sparse=False"
)


def _diagnose(i, w, g, a, device):
    for name, x in (("params", w), ("grads", g), ("anchors", a)):
        _backends.refuse_non_strided("", f"{name}[{i}]", x, _SPARSE_HINT if name == "grads" else "")
    if w.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"params[{i}] has dtype {w.dtype}; supported are torch.float32 and torch.float64")
    for name, x in (("grads", g), ("anchors", a)):
        if x.shape != w.shape:
            raise ValueError(f"{name}[{i}] has shape {tuple(x.shape)} but params[{i}] has {tuple(w.shape)}")
        if x.dtype != w.dtype:
            raise TypeError(f"{name}[{i}] has dtype {x.dtype} but params[{i}] has {w.dtype}")
    for name, x in (("params", w), ("grads", g), ("anchors", a)):
        if x.device != device:
            raise ValueError(f"{name}[{i}] is on {x.device} but params[0] is on {device}")
    raise AssertionError("unreachable")  # pragma: no cover


def check_hyperparameters(
    step_size, nbeta, localization, weight_decay, noise_scale, bounding_box, seed, step
):
    """The hyperparameters every fused step takes, checked and converted: ``step_size`` > 0; ``nbeta``,
    ``localization``, ``weight_decay`` and ``noise_scale`` >= 0; ``bounding_box`` None or > 0 (all finite reals);
    ``seed`` and ``step`` ints in [0, 2**64). Returns them in that order."""
    step_size = check_scalar("step_size", step_size, positive=True)
    nbeta = check_scalar("nbeta", nbeta)
    localization = check_scalar("localization", localization)
    weight_decay = check_scalar("weight_decay", weight_decay)
    noise_scale = check_scalar("noise_scale", noise_scale)
    if bounding_box is not None:
        bounding_box = check_scalar("bounding_box", bounding_box, positive=True)
    seed, step = check_key("seed", seed), check_key("step", step)
    return step_size, nbeta, localization, weight_decay, noise_scale, bounding_box, seed, step


#: Bits of the per-tensor flags every fused step returns (each OR-ed over the tensor's entries). An entry that
#: sets either is not written: its parameter and its state (momentum, ``V``) keep their old values.
FLAG_GRAD_NONFINITE = 1  # its gradient held a NaN or Inf
FLAG_UPDATE_NONFINITE = 2  # its gradient was finite but its new value (or new state) would be NaN or Inf


def raise_on_flags(
    op: str,
    flags: torch.Tensor,
    params,
    *,
    step: int,
    step_size: float,
    nbeta: float,
    state: str | None = None,
    states=None,
    nonnegative: bool = False,
) -> None:
    """Raise ``FloatingPointError`` naming every tensor the step's ``flags`` mark (call it when ``flags.any()``).

    ``state`` names the op's per-tensor state (``"momenta"``, ``"square_avgs"``) for the message; ``states``, those
    tensors (a flagged entry keeps its value, so a state that held inf/NaN, or a negative value where
    ``nonnegative``, before the step is named as such, not blamed on the step size).
    """
    values = flags.cpu().tolist()
    grads = [i for i, f in enumerate(values) if f & FLAG_GRAD_NONFINITE]
    over = [i for i, f in enumerate(values) if f & FLAG_UPDATE_NONFINITE]
    parts = []
    if grads:
        parts.append(
            "non-finite gradient in "
            + ", ".join(f"grads[{i}] (shape {tuple(params[i].shape)})" for i in grads)
        )
    # a parameter that already held inf/NaN (the step leaves it as it was) is not an overflow of the update
    held = [i for i in over if not bool(torch.isfinite(params[i]).all())]
    over = [i for i in over if i not in held]
    if held:
        parts.append(
            "the parameters already held inf/NaN before the step in "
            + ", ".join(f"params[{i}] (shape {tuple(params[i].shape)})" for i in held)
            + " (check the model's weights at w*)"
        )
    bad_state = []
    if states is not None:
        for i in over:
            t = states[i]
            if not bool(torch.isfinite(t).all()) or (nonnegative and bool((t < 0).any())):
                bad_state.append(i)
        over = [i for i in over if i not in bad_state]
    if bad_state:
        held = held + bad_state
        parts.append(
            f"the sampler state already held {'negative or ' if nonnegative else ''}inf/NaN values before the step "
            f"in " + ", ".join(f"{state}[{i}] (shape {tuple(states[i].shape)})" for i in bad_state)
        )
    if over:
        names = ", ".join(
            f"params[{i}]{'' if state is None else f'/{state}[{i}]'} (shape {tuple(params[i].shape)})"
            for i in over
        )
        parts.append(
            f"the update overflowed to inf/NaN in {names} (finite gradients too large for step_size={step_size}, "
            f"nbeta={nbeta})"
        )
    if not parts:
        return
    advice = (
        "Use a smaller step_size (or a smaller nbeta)."
        if over
        else (
            "Give finite weights."
            if not bad_state
            else f"Give valid {state} (finite{', >= 0' if nonnegative else ''})."
        )
        if held and not grads
        else "A diverging chain usually needs a smaller step_size or a larger localization."
    )
    kept = "" if not over or state is None else f" (params and {state} keep their values)"
    raise FloatingPointError(
        f"{op}: {'; '.join(parts)} at step {step}; those entries were not updated{kept}. {advice}"
    )


def signed64(x: int) -> int:
    return x - 2**64 if x >= 2**63 else x


def _sgld_step_c(
    params,
    grads,
    anchors,
    *,
    step_size,
    nbeta,
    localization,
    weight_decay,
    noise_scale,
    bounding_box,
    masks,
    seed,
    step,
) -> torch.Tensor:
    """The registered ``torch.ops.pypattern.sgld_step_`` (csrc/sgld/): the dispatcher runs the C++ kernel on CPU
    tensors and the CUDA kernel on CUDA tensors."""
    return torch.ops.pypattern.sgld_step_(
        params if isinstance(params, list) else list(params),
        grads if isinstance(grads, list) else list(grads),
        anchors if isinstance(anchors, list) else list(anchors),
        [] if masks is None else list(masks),
        float(step_size),
        float(nbeta),
        float(localization),
        float(weight_decay),
        float(noise_scale),
        None if bounding_box is None else float(bounding_box),
        signed64(seed),
        signed64(step),
    )


_backends.register("sgld_step_", "reference", sgld_step_reference_)
_backends.register("sgld_step_", "triton", "pypattern.ops.sgld.triton:sgld_step_triton_")
_backends.register("sgld_step_", ("cpp", "cuda"), _sgld_step_c)


def sgld_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    anchors: Sequence[torch.Tensor],
    *,
    step_size: float,
    nbeta: float,
    localization: float,
    weight_decay: float = 0.0,
    noise_scale: float = 1.0,
    bounding_box: float | None = None,
    masks: Sequence[torch.Tensor | None] | None = None,
    seed: int,
    step: int,
    backend: str | None = None,
    validate: bool = True,
    check_finite: bool = True,
) -> torch.Tensor:
    """One SGLD step over lists of tensors, in place (see :mod:`pypattern.ops.sgld` for the update and the noise).

    Parameters
    ----------
    params, grads, anchors : list of Tensor
        Same length; tensor ``i`` of each has the same shape, dtype (float32 or float64) and device. ``params``
        are updated in place (any strides); ``anchors`` are the trained weights ``w*``.
    step_size : float
        ``eps`` > 0.
    nbeta : float
        Inverse temperature times the number of samples, ``n * beta`` >= 0.
    localization : float
        ``gamma`` >= 0, strength of the pull towards the anchors.
    weight_decay, noise_scale : float
        >= 0. ``noise_scale = 0`` gives a deterministic step.
    bounding_box : float or None
        Half-width > 0 of the box around the anchors that the result is clamped to.
    masks : list of (Tensor or None), optional
        Bool or float, same shape as the params; 0 freezes an entry (no drift, noise or clamp), other values
        scale its update.
    seed, step : int
        In [0, 2**64). With the tensor index and element index they key the noise.
    backend : {"cuda", "triton", "cpp", "reference"}, optional
        Force a backend (else ``PYPATTERN_BACKEND``, else the fastest available: see :func:`pypattern.backends`).
    validate : bool
        Check every argument as described above, including that masks and anchors are finite and that no anchor,
        gradient or mask shares memory with any parameter (tens of microseconds of Python per call, more with more
        tensors). ``False`` is the fast path for callers that validated the same tensors and numbers once (the
        SGLD optimizer and the chain runner do so on their first step): ``params``, ``grads`` and ``anchors``
        must then be lists, the numbers already in range, and a wrong argument may fail inside a kernel with a
        less helpful message.
    check_finite : bool
        Raise ``FloatingPointError`` naming the tensors, the step and what to change when the returned flags are
        not all 0 (with ``validate`` True or False alike). Whatever its value, no entry is ever written with a
        non-finite value: an entry whose gradient held NaN or Inf, or whose *finite* gradient is so large that
        its update overflows, keeps its old value (the others are updated).

    Returns
    -------
    Tensor, shape ``(len(params),)``, int32
        Per tensor, its flags OR-ed over its entries: bit ``1`` (``FLAG_GRAD_NONFINITE``) where a gradient held
        NaN or Inf, bit ``2`` (``FLAG_UPDATE_NONFINITE``) where a finite gradient gave a non-finite new value
        (tested before the ``bounding_box`` clamp, which would hide an inf), so 0, 1, 2 or 3; the entries flagged
        were left unchanged. On the CPU, or on the params' GPU for the ``cuda`` backend. Looking at it
        (``bool(flags.any())``) waits for the step to finish; with ``check_finite`` the op does so itself.
    """
    if validate:
        params, grads, anchors, masks, _ = validate_inputs(params, grads, anchors, masks)
        step_size, nbeta, localization, weight_decay, noise_scale, bounding_box, seed, step = (
            check_hyperparameters(
                step_size, nbeta, localization, weight_decay, noise_scale, bounding_box, seed, step
            )
        )
    if not params:
        return torch.zeros(0, dtype=torch.int32)
    flags = _backends.dispatch("sgld_step_", params[0].device, backend)(
        params,
        grads,
        anchors,
        step_size=step_size,
        nbeta=nbeta,
        localization=localization,
        weight_decay=weight_decay,
        noise_scale=noise_scale,
        bounding_box=bounding_box,
        masks=masks,
        seed=seed,
        step=step,
    )
    # every backend writes through the tensors' memory: autograd learns of it, as of any in-place op
    torch.autograd.graph.increment_version(params)
    if check_finite and bool(flags.any()):
        raise_on_flags("sgld_step_", flags, params, step=step, step_size=step_size, nbeta=nbeta)
    return flags


# ------------------------------------------------------------------------------------------ many chains at once


def _sgld_chains_step_c(
    params,
    grads,
    anchors,
    *,
    step_size,
    nbeta,
    localization,
    weight_decay,
    noise_scale,
    bounding_box,
    masks,
    seeds,
    step,
) -> torch.Tensor:
    """The registered ``torch.ops.pypattern.sgld_chains_step_`` (csrc/sgld/): C++ on CPU tensors, CUDA on CUDA
    tensors."""
    return torch.ops.pypattern.sgld_chains_step_(
        params if isinstance(params, list) else list(params),
        grads if isinstance(grads, list) else list(grads),
        anchors if isinstance(anchors, list) else list(anchors),
        [] if masks is None else list(masks),
        float(step_size),
        float(nbeta),
        float(localization),
        float(weight_decay),
        float(noise_scale),
        None if bounding_box is None else float(bounding_box),
        [signed64(s) for s in seeds],
        signed64(step),
    )


_backends.register("sgld_chains_step_", "reference", sgld_chains_step_reference_)
_backends.register("sgld_chains_step_", "triton", "pypattern.ops.sgld.triton:sgld_chains_step_triton_")
_backends.register("sgld_chains_step_", ("cpp", "cuda"), _sgld_chains_step_c)


def _validate_chains(params, grads, anchors, masks, seeds):
    """:func:`sgld_chains_step_`'s arguments checked (as :func:`validate_inputs` checks one chain's, on the
    stacked tensors with the anchors and masks broadcast over the chains); returns them as lists."""
    if isinstance(seeds, torch.Tensor):
        if seeds.dim() != 1 or seeds.is_floating_point() or seeds.is_complex() or seeds.dtype == torch.bool:
            raise TypeError(
                f"seeds must be a sequence of ints (or a 1-d integer tensor), got a {seeds.dtype} "
                f"tensor of shape {tuple(seeds.shape)}"
            )
        seeds = seeds.tolist()
    if isinstance(seeds, str | bytes) or not isinstance(seeds, Sequence):
        raise TypeError(f"seeds must be a sequence of ints, one per chain, got {type(seeds).__name__}")
    seeds = [check_key(f"seeds[{c}]", s) for c, s in enumerate(seeds)]
    params, grads, anchors = as_list("params", params), as_list("grads", grads), as_list("anchors", anchors)
    if not (len(params) == len(grads) == len(anchors)):
        raise ValueError(
            f"params, grads and anchors must have the same length, got {len(params)}, {len(grads)}, {len(anchors)}"
        )
    if masks is not None:
        masks = as_list("masks", masks)
        if len(masks) != len(params):
            raise ValueError(f"masks must have one entry (or None) per tensor: {len(masks)} != {len(params)}")
    C = len(seeds)
    for t, (p, g, a) in enumerate(zip(params, grads, anchors)):
        for name, x in (("params", p), ("grads", g), ("anchors", a)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name}[{t}] must be a tensor, got {type(x).__name__}")
        if p.dim() < 1 or p.shape[0] != C:
            raise ValueError(
                f"params[{t}] has shape {tuple(p.shape)}; its first dimension must be the chain axis, of length "
                f"len(seeds) = {C}"
            )
        if g.shape != p.shape:
            raise ValueError(f"grads[{t}] has shape {tuple(g.shape)} but params[{t}] has {tuple(p.shape)}")
        if a.shape != p.shape[1:]:
            raise ValueError(
                f"anchors[{t}] has shape {tuple(a.shape)}; it must be one chain's row of params[{t}], "
                f"shape {tuple(p.shape[1:])} (the anchors are shared by the chains)"
            )
        m = None if masks is None else masks[t]
        if isinstance(m, torch.Tensor) and m.shape != p.shape[1:]:
            raise ValueError(
                f"masks[{t}] has shape {tuple(m.shape)}; it must be one chain's row of params[{t}], "
                f"shape {tuple(p.shape[1:])} (the masks are shared by the chains)"
            )
        # counted here, on the shared tensors: seen through the chain axis below, each entry would count C times
        if isinstance(m, torch.Tensor):
            refuse_nonfinite_mask(t, m)
        refuse_nonfinite_anchor(t, a)
    # the whole check of one step on the stacked tensors, the shared ones seen through the chain axis
    validate_inputs(
        params,
        grads,
        [a.expand(p.shape) for a, p in zip(anchors, params)],
        None
        if masks is None
        else [m.expand(p.shape) if isinstance(m, torch.Tensor) else m for m, p in zip(masks, params)],
    )
    anchors = [a.resolve_neg() if a.is_neg() else a for a in anchors]
    grads = [g.resolve_neg() if g.is_neg() else g for g in grads]
    if masks is not None:
        masks = [m.resolve_neg() if m is not None and m.is_neg() else m for m in masks]
    return params, grads, anchors, masks, seeds


def sgld_chains_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    anchors: Sequence[torch.Tensor],
    *,
    step_size: float,
    nbeta: float,
    localization: float,
    weight_decay: float = 0.0,
    noise_scale: float = 1.0,
    bounding_box: float | None = None,
    masks: Sequence[torch.Tensor | None] | None = None,
    seeds: Sequence[int],
    step: int,
    backend: str | None = None,
    validate: bool = True,
    check_finite: bool = True,
) -> torch.Tensor:
    """One SGLD step of ``C = len(seeds)`` chains at once, in place: one call where :func:`sgld_step_` takes one
    per chain.

    ``params[t]`` and ``grads[t]`` have shape ``(C, *shape_t)``: row ``c`` is chain ``c``'s tensor ``t``.
    ``anchors[t]`` and ``masks[t]`` have shape ``shape_t`` and are shared by every chain. Row ``c`` gets exactly
    the update, noise included, that ``sgld_step_([p[c] for p in params], [g[c] for g in grads], anchors,
    masks=masks, seed=seeds[c], ...)`` gives (the same Philox key and counters), so chains stepped together are
    the chains stepped one at a time. Same backends, update and flags as :func:`sgld_step_`; the other arguments
    are its arguments.

    Returns
    -------
    Tensor, shape ``(C, len(params))``, int32
        Chain ``c``'s flags for tensor ``t`` (see :func:`sgld_step_`). With ``check_finite``, a non-zero flag
        raises ``FloatingPointError`` naming the first such chain and its tensors.
    """
    if validate:
        params, grads, anchors, masks, seeds = _validate_chains(params, grads, anchors, masks, seeds)
        step_size, nbeta, localization, weight_decay, noise_scale, bounding_box, _, step = (
            check_hyperparameters(
                step_size, nbeta, localization, weight_decay, noise_scale, bounding_box, 0, step
            )
        )
    if not params:
        return torch.zeros((len(seeds), 0), dtype=torch.int32)
    flags = _backends.dispatch("sgld_chains_step_", params[0].device, backend)(
        params,
        grads,
        anchors,
        step_size=step_size,
        nbeta=nbeta,
        localization=localization,
        weight_decay=weight_decay,
        noise_scale=noise_scale,
        bounding_box=bounding_box,
        masks=masks,
        seeds=seeds,
        step=step,
    )
    torch.autograd.graph.increment_version(params)
    if check_finite and bool(flags.any()):
        c = int(torch.nonzero(flags.cpu().amax(dim=1))[0])
        try:
            raise_on_flags(
                "sgld_chains_step_",
                flags[c],
                [p[c] for p in params],
                step=step,
                step_size=step_size,
                nbeta=nbeta,
            )
        except FloatingPointError as e:
            raise FloatingPointError(f"chain {c} (seeds[{c}] = {seeds[c]}): {e}") from None
    return flags
