"""Known learning coefficients, and small models whose learning coefficient is known.

Users calibrate their sampler hyperparameters here: a model with a known answer, estimated with the same
hyperparameters as the real model, shows how far the estimator is from the truth.

Formulas
--------
* Regular model with ``d`` parameters: ``lambda = d / 2``.
* Normal crossing ``K(w) = prod_i w_i^(2 k_i)``: ``lambda = min_i 1 / (2 k_i)``; its multiplicity is the number
  of ``i`` attaining the minimum.
* Deep linear networks (and reduced-rank regression, the case of two weight matrices): Aoyagi's closed form
  (M. Aoyagi, "Consideration on the learning efficiency of multiple-layered neural networks with linear units",
  Neural Networks 2024), see :func:`dln_learning_coefficient`.

Models
------
:class:`NormalCrossing`, :class:`DeepLinearNetwork` and :func:`make_regression_data` build models whose empirical
loss equals the population loss ``K(w)`` exactly (orthonormal design, noise-free targets), so the estimator's
target is the tempered posterior of ``K`` itself, with no finite-sample fluctuation.
:func:`make_teacher_task` builds the MLP teacher-student classification task used by the demo and the benchmark.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence, Set
from fractions import Fraction

import torch
from torch import nn

from ._checks import is_count, is_real

__all__ = [
    "DeepLinearNetwork",
    "NormalCrossing",
    "dln_learning_coefficient",
    "localized_normal_crossing_expectation",
    "make_normal_crossing_data",
    "make_regression_data",
    "make_teacher_task",
    "normal_crossing_learning_coefficient",
    "regular_learning_coefficient",
    "rrr_learning_coefficient",
    "train",
]


# ----------------------------------------------------------------------------------------------------------------
# Formulas
# ----------------------------------------------------------------------------------------------------------------
def regular_learning_coefficient(num_params: int) -> float:
    """``d / 2`` for a regular (identifiable, non-degenerate Fisher information) model with ``d`` parameters."""
    if not is_count(num_params) or num_params < 0:
        raise ValueError(f"num_params must be an int >= 0, got {num_params!r}")
    return int(num_params) / 2


def normal_crossing_learning_coefficient(powers: Sequence[int], *, multiplicity: bool = False):
    """Learning coefficient of ``K(w) = prod_i w_i^(2 k_i)`` at ``w = 0``: ``min_i 1 / (2 k_i)``.

    Parameters
    ----------
    powers : sequence of int
        The exponents ``k_i >= 1``, one per parameter, e.g. ``[1, 2]`` (-> 0.25).
    multiplicity : bool
        Also return the multiplicity: the number of ``i`` with ``k_i = max_j k_j``.

    Returns
    -------
    float, or (float, int) when ``multiplicity``.
    """
    powers = _int_list(powers, "powers")
    if not powers or any(k < 1 for k in powers):
        raise ValueError(f"powers must be a non-empty sequence of ints >= 1, got {powers!r}")
    lam = 1.0 / (2 * max(powers))
    return (lam, powers.count(max(powers))) if multiplicity else lam


def _float_dtype(dtype, what: str) -> None:
    """Raise naming ``dtype`` unless it is a floating-point ``torch.dtype`` (``what``'s weights are trained)."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype for {what}'s weights, got {dtype!r}")


def _int_list(values, name: str) -> list[int]:
    """``values`` as a list of Python ints (numpy integers accepted); raises naming ``name`` otherwise. A set or
    a mapping is refused: its order is not the caller's (``{5, 3, 5}`` would be the widths ``(3, 5)``)."""
    if isinstance(values, Set | Mapping):
        raise ValueError(
            f"{name} must be an ordered sequence of ints (a list or tuple), got a {type(values).__name__}: {values!r}"
        )
    try:
        out = list(values)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of ints, got {values!r}") from None
    if any(not is_count(v) for v in out):
        raise ValueError(f"{name} must be a sequence of ints, got {out!r}")
    return [int(v) for v in out]


def _aoyagi(widths: Sequence[int], rank: int, what: str = "widths") -> tuple[Fraction, int]:
    H = _int_list(widths, what)
    if len(H) < 2:
        raise ValueError(f"{what} must list at least input and output sizes, got {H!r}")
    if any(h < 1 for h in H):
        raise ValueError(f"{what} must be ints >= 1, got {H!r}")
    if not is_count(rank) or not 0 <= rank <= min(H):
        raise ValueError(f"rank must be an int in [0, min({what})] = [0, {min(H)}], got {rank!r}")
    r = int(rank)
    M = sorted(h - r for h in H)
    L = len(H) - 1  # number of weight matrices
    base = Fraction(-r * r + r * (H[0] + H[-1]), 2)
    for ell in range(1, L + 1):
        S, rest = M[: ell + 1], M[ell + 1 :]
        s = sum(S)
        if rest and not max(S) < min(rest):
            continue
        if s < ell * max(S):
            continue
        if rest and not s < ell * min(rest):
            continue
        a = s - (math.ceil(Fraction(s, ell)) - 1) * ell
        pairs = sum(S[i] * S[j] for i in range(len(S)) for j in range(i + 1, len(S)))
        lam = (
            base
            + Fraction(a * (ell - a), 4 * ell)
            - Fraction(ell * (ell - 1), 4) * Fraction(s, ell) ** 2
            + Fraction(pairs, 2)
        )
        return lam, a * (ell - a) + 1
    raise AssertionError(
        f"no index set satisfies Aoyagi's conditions for widths {H}, rank {r}"
    )  # pragma: no cover


def dln_learning_coefficient(widths: Sequence[int], rank: int = 0, *, multiplicity: bool = False):
    """Aoyagi's learning coefficient of a deep linear network ``W_L ... W_1`` at a teacher of rank ``rank``.

    With ``H_0`` the input size, ``H_1 .. H_{L-1}`` the hidden sizes, ``H_L`` the output size and
    ``M_i = H_i - r``: take ``S`` the ``l + 1`` smallest ``M_i`` (``l >= 1`` the first that works) such that
    ``max_S M < min_{not S} M``, ``sum_S M >= l * max_S M`` and ``sum_S M < l * min_{not S} M``; with
    ``a = sum_S M - (ceil(sum_S M / l) - 1) * l``::

        lambda = (-r^2 + r (H_0 + H_L)) / 2 + a (l - a) / (4 l) - l (l - 1) / 4 * (sum_S M / l)^2
                 + 1/2 * sum_{i<j in S} M_i M_j

    and the multiplicity is ``a (l - a) + 1``. Two matrices (``widths = (input, hidden, output)``) are
    reduced-rank regression.

    Parameters
    ----------
    widths : sequence of int
        ``(H_0, H_1, ..., H_L)``, length ``L + 1 >= 2``.
    rank : int
        Rank ``r`` of the teacher's product matrix, ``0 <= r <= min(widths)``.
    multiplicity : bool
        Also return the multiplicity ``m``.

    Returns
    -------
    float, or (float, int) when ``multiplicity``.

    Examples
    --------
    >>> dln_learning_coefficient((5, 3, 5))
    6.5
    """
    lam, m = _aoyagi(widths, rank)
    return (float(lam), m) if multiplicity else float(lam)


def rrr_learning_coefficient(input_dim: int, hidden_dim: int, output_dim: int, rank: int = 0) -> float:
    """Reduced-rank regression ``y = B A x`` (``A``: hidden x input, ``B``: output x hidden) at a rank-``rank``
    teacher, by Aoyagi and Watanabe's (2005) case formula (an independent check of :func:`dln_learning_coefficient`).
    """
    for name, value in (("input_dim", input_dim), ("hidden_dim", hidden_dim), ("output_dim", output_dim)):
        if not is_count(value) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    # validates rank
    _aoyagi((input_dim, hidden_dim, output_dim), rank, "(input_dim, hidden_dim, output_dim)")
    M, H, N, r = int(input_dim), int(hidden_dim), int(output_dim), int(rank)
    if N + r <= M + H and M + r <= N + H and H + r <= M + N:
        num = 2 * (H + r) * (M + N) - (M - N) ** 2 - (H + r) ** 2
        if (M + H + N + r) % 2 == 1:
            num += 1
        return num / 8
    if M + H < N + r:
        return (H * M - H * r + N * r) / 2
    if N + H < M + r:
        return (H * N - H * r + M * r) / 2
    return (M * N) / 2  # M + N < H + r


def localized_normal_crossing_expectation(
    powers: Sequence[int], nbeta: float, localization: float, *, grid: int = 3001, width: float = 8.0
) -> float:
    """``E[nbeta * K(w)]`` under ``p(w) ~ exp(-nbeta K(w) - localization/2 |w|^2)``, ``K = prod w_i^(2 k_i)``,
    for two parameters, by quadrature on a grid of ``grid^2`` points over ``|w_i| <= width / sqrt(localization)``.

    This is the exact value the LLC estimator targets at these hyperparameters (its bias to the learning
    coefficient comes from the finite ``nbeta``, not from the sampler). float64, about 0.2 s.

    Parameters
    ----------
    powers : sequence of two ints
        ``(k_1, k_2)``, each ``>= 1``.
    nbeta, localization : float
        Finite and ``> 0``.
    grid : int
        Points per axis, ``>= 101`` (relative error about ``1e-3`` at 101, ``3e-5`` at 601 for ``nbeta <= 1e4``).
    width : float
        Half-width of the box in units of ``1 / sqrt(localization)``, finite and ``>= 4``.
    """
    k = _int_list(powers, "powers")
    if len(k) != 2 or any(p < 1 for p in k):
        raise ValueError(f"powers must be two ints >= 1 for the quadrature, got {k!r}")
    for name, value in (("nbeta", nbeta), ("localization", localization)):
        if not is_real(value) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if not is_count(grid) or grid < 101:
        raise ValueError(f"grid must be an int >= 101, got {grid!r}")
    if not is_real(width) or not math.isfinite(width) or width < 4:
        raise ValueError(
            f"width must be a finite number >= 4 (in units of 1 / sqrt(localization)), got {width!r}"
        )
    nbeta, localization, grid, width = float(nbeta), float(localization), int(grid), float(width)
    half = width / math.sqrt(localization)
    # symmetric in each coordinate: integrate over the positive quadrant on a grid refined near 0
    u = torch.linspace(0, 1, grid, dtype=torch.float64) ** 3 * half
    du = torch.gradient(u)[0]
    w1, w2 = torch.meshgrid(u, u, indexing="ij")
    K = w1 ** (2 * k[0]) * w2 ** (2 * k[1])
    logp = -nbeta * K - 0.5 * localization * (w1**2 + w2**2)
    wt = torch.exp(logp - logp.max()) * du[:, None] * du[None, :]
    return float((wt * nbeta * K).sum() / wt.sum())


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------
class NormalCrossing(nn.Module):
    """``f(x) = (prod_i w_i^k_i) * x`` with ``w`` of shape ``(len(powers),)``, initialised at the singularity 0.

    With MSE on :func:`make_normal_crossing_data` the loss is exactly ``K(w) = prod w_i^(2 k_i)``.
    """

    def __init__(self, powers: Sequence[int], *, dtype: torch.dtype = torch.float32):
        super().__init__()
        normal_crossing_learning_coefficient(powers)  # validates
        _float_dtype(dtype, "NormalCrossing")
        powers = _int_list(powers, "powers")
        self.weight = nn.Parameter(torch.zeros(len(powers), dtype=dtype))
        self.register_buffer("powers", torch.tensor(list(powers), dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(batch, 1)`` -> ``(batch, 1)``."""
        return torch.prod(self.weight**self.powers) * x


def make_normal_crossing_data(n: int = 2, *, dtype: torch.dtype = torch.float32):
    """A dataset with ``mean(x^2) = 1`` and ``y = 0`` exactly: ``x = +-1``. Shapes ``(n, 1)``, ``n`` even."""
    if not is_count(n) or n < 2 or n % 2:
        raise ValueError(f"n must be an even int >= 2, got {n!r}")
    n = int(n)
    x = torch.ones(n, 1, dtype=dtype)
    x[1::2] = -1
    return torch.utils.data.TensorDataset(x, torch.zeros(n, 1, dtype=dtype))


class DeepLinearNetwork(nn.Module):
    """``x -> W_L ... W_1 x`` with widths ``(H_0, ..., H_L)``, no biases. Parameters ``layers.{i}.weight``."""

    def __init__(self, widths: Sequence[int], *, dtype: torch.dtype = torch.float32):
        super().__init__()
        _aoyagi(widths, 0)  # validates
        _float_dtype(dtype, "DeepLinearNetwork")
        self.widths = tuple(_int_list(widths, "widths"))
        self.layers = nn.ModuleList(
            nn.Linear(a, b, bias=False, dtype=dtype) for a, b in zip(self.widths[:-1], self.widths[1:])
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(batch, H_0)`` -> ``(batch, H_L)``."""
        for layer in self.layers:
            x = layer(x)
        return x

    def product(self) -> torch.Tensor:
        """The end-to-end matrix, shape ``(H_L, H_0)``."""
        out = self.layers[0].weight
        for layer in self.layers[1:]:
            out = layer.weight @ out
        return out

    @torch.no_grad()
    def set_teacher(self, rank: int, *, seed: int = 0, scale: float = 1.0) -> DeepLinearNetwork:
        """Set the weights to a factorisation of a random rank-``rank`` product (a true parameter).

        ``seed`` (int) draws the Gaussian factors; ``scale`` (finite, nonzero) multiplies the first and the last
        factor, so the product has rank ``rank`` (with probability one) and scales as ``scale^2``."""
        _aoyagi(self.widths, rank)
        if not is_count(seed):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if not is_real(scale) or not math.isfinite(scale) or scale == 0:
            raise ValueError(
                f"scale must be a finite nonzero number (the product has rank `rank`), got {scale!r}"
            )
        rank, seed, scale = int(rank), int(seed), float(scale)
        g = torch.Generator().manual_seed(seed)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            out_f, in_f = layer.weight.shape
            w = torch.zeros(out_f, in_f, dtype=layer.weight.dtype)
            if rank and i == 0:
                w[:rank, :] = torch.randn(rank, in_f, generator=g, dtype=w.dtype) * scale
            elif rank and i == last:
                w[:, :rank] = torch.randn(out_f, rank, generator=g, dtype=w.dtype) * scale
            elif rank:
                w[:rank, :rank] = torch.eye(rank, dtype=w.dtype)
            if rank and last == 0:
                w = (
                    torch.randn(out_f, rank, generator=g, dtype=w.dtype)
                    @ torch.randn(rank, in_f, generator=g, dtype=w.dtype)
                    * (scale * scale)
                )
            layer.weight.copy_(w)
        return self


def make_regression_data(
    model: nn.Module, in_features: int, n: int | None = None, *, dtype: torch.dtype = torch.float32
):
    """Noise-free data ``y = model(x)`` on an orthonormal design, so that for a linear student the MSE loss (mean
    over batch and output) is ``|W - W_teacher|_F^2 / out_features``. Shapes ``x (n, in)``, ``y (n, out)``.

    The rows of ``x`` are ``+-sqrt(in_features) e_i``, so ``X^T X / n = I`` (exactly when ``in_features`` is a perfect
    square, else up to the rounding of ``sqrt(in_features)``, one unit in the last place). ``in_features`` is an
    int ``>= 1``, ``n`` a positive multiple of it (default ``2 * in_features``)."""
    if not is_count(in_features) or in_features < 1:
        raise ValueError(f"in_features must be an int >= 1, got {in_features!r}")
    in_features = int(in_features)
    n = 2 * in_features if n is None else n
    if not is_count(n) or n < 1 or n % in_features:
        raise ValueError(f"n must be a positive multiple of in_features={in_features}, got {n!r}")
    n = int(n)
    eye = torch.eye(in_features, dtype=dtype)
    reps = n // in_features
    x = torch.cat([eye if i % 2 == 0 else -eye for i in range(reps)]) * math.sqrt(in_features)
    with torch.no_grad():
        try:
            y = model(x).detach()
        except RuntimeError as e:
            raise ValueError(
                f"model does not accept inputs of in_features={in_features} (shape {tuple(x.shape)}): {e}"
            ) from None
    return torch.utils.data.TensorDataset(x, y)


class _MLP(nn.Sequential):
    def __init__(self, sizes: Sequence[int], dtype=torch.float32):
        mods: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            mods.append(nn.Linear(a, b, dtype=dtype))
            if i < len(sizes) - 2:
                mods.append(nn.ReLU())
        super().__init__(*mods)


def make_teacher_task(
    sizes: Sequence[int] = (128, 256, 256, 10), n: int = 4096, *, seed: int = 0, teacher_sizes=None
) -> tuple[nn.Module, torch.utils.data.TensorDataset]:
    """A classification task labelled by a random teacher MLP, and an untrained student MLP.

    Parameters
    ----------
    sizes : sequence of int
        Student layer sizes ``(input, hidden..., classes)``; the default has 101,386 parameters.
    n : int
        Number of samples. Inputs ``x ~ N(0, I)``, shape ``(n, sizes[0])``; labels ``argmax teacher(x)``, ``(n,)``.
    seed : int
        Seeds the teacher's and the student's initial weights and the inputs.
    teacher_sizes : sequence of int, optional
        Teacher sizes (default ``(sizes[0], 64, sizes[-1])``).

    Returns
    -------
    (student, dataset)
    """
    sizes = _int_list(sizes, "sizes")
    if len(sizes) < 2 or min(sizes) < 1:
        raise ValueError(f"sizes must list at least the input and class sizes, ints >= 1, got {sizes!r}")
    if teacher_sizes is not None:
        teacher_sizes = _int_list(teacher_sizes, "teacher_sizes")
        ends = (teacher_sizes[0], teacher_sizes[-1]) if teacher_sizes else None
        if len(teacher_sizes) < 2 or min(teacher_sizes) < 1 or ends != (sizes[0], sizes[-1]):
            raise ValueError(
                f"teacher_sizes must be ints >= 1 from sizes[0]={sizes[0]} to sizes[-1]={sizes[-1]}, got "
                f"{teacher_sizes!r}"
            )
    if not is_count(n) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if not is_count(seed):
        raise ValueError(f"seed must be an int, got {seed!r}")
    n, seed = int(n), int(seed)
    g = torch.Generator().manual_seed(seed)
    teacher_sizes = tuple(teacher_sizes or (sizes[0], 64, sizes[-1]))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        teacher = _MLP(teacher_sizes)
        student = _MLP(sizes)
    x = torch.randn(n, sizes[0], generator=g)
    with torch.no_grad():
        y = teacher(x).argmax(-1)
    return student, torch.utils.data.TensorDataset(x, y)


def train(
    model: nn.Module,
    dataset,
    *,
    steps: int = 500,
    batch_size: int = 256,
    lr: float = 1e-3,
    loss_fn=None,
    seed: int = 0,
) -> list[float]:
    """Train with Adam for ``steps`` minibatch steps; returns the loss per step. Default loss: cross-entropy for
    integer targets, MSE otherwise."""
    for name, value, low in (("steps", steps, 0), ("batch_size", batch_size, 1)):
        if not is_count(value) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if not is_real(lr) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if not is_count(seed):
        raise ValueError(f"seed must be an int, got {seed!r}")
    steps, batch_size, seed = int(steps), int(batch_size), int(seed)
    g = torch.Generator().manual_seed(seed)
    tensors = dataset.tensors if isinstance(dataset, torch.utils.data.TensorDataset) else None
    if tensors is None:
        raise TypeError(f"dataset must be a TensorDataset, got {type(dataset).__name__}")
    n = len(tensors[0])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    perm, pos = torch.randperm(n, generator=g), 0
    for _ in range(steps):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=g), 0
        idx = perm[pos : pos + batch_size]
        pos += batch_size
        x, y = tensors[0][idx], tensors[1][idx]
        out = model(x)
        if loss_fn is not None:
            loss = loss_fn(out, y)
        elif y.dtype in (torch.int64, torch.int32):
            loss = nn.functional.cross_entropy(out, y)
        else:
            loss = nn.functional.mse_loss(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
