"""Per-sample loss-gradient Gram matrices without per-sample gradients.

For a batch of ``B`` samples with per-sample losses ``l_i`` and the parameters ``theta`` of some layers,
``G_ij = <grad l_i, grad l_j>`` (shape ``(B, B)``); the centred form ``Gc = H G H`` with ``H = I - 11^T / B`` is
the Gram of the centred gradients ``g_i - mean_j g_j`` (``Gc / (B - 1)`` is their covariance across samples).

Layer by layer, with ``a_it`` the input and ``d_it`` the gradient of ``sum_j l_j`` with respect to the output of
the layer at position ``t`` of sample ``i`` (``T`` positions: 1 for a plain ``(B, d)`` input):

* ``nn.Linear`` (``y = x W^T + b``): ``grad_W l_i = sum_t d_it a_it^T`` and ``grad_b l_i = sum_t d_it``, so::

      G_ij = sum_{s,t} (a_is . a_jt) (d_is . d_jt)  +  (sum_s d_is) . (sum_t d_jt)      [second term: bias]

  For ``T = 1`` this is ``(A A^T + 1) * (D D^T)`` elementwise (with the bias): two ``(B, B)`` matrix products
  instead of ``B`` copies of the ``(d_out, d_in)`` weight gradient.
* ``nn.Embedding`` (ids ``k_it``): ``grad_E l_i`` has row ``v`` equal to ``sum_{t: k_it = v} d_it``, so
  ``G_ij = sum_{s,t} [k_is == k_jt] (d_is . d_jt)``; positions holding ``padding_idx`` do not count. Evaluated
  pairwise (``B^2 T^2 dim``) or by scattering the per-sample gradients of the ``V`` ids present (``B^2 V dim``).
* positional embeddings (``y[:, t] = W[t]``): the per-sample gradient is ``d_i`` itself (``T dim`` numbers).
* LayerNorm (``y = xhat * w + b``): per-sample gradients ``sum_t d_it * xhat_it`` and ``sum_t d_it`` (``2 d``
  numbers), taken directly.

Two ways to evaluate the Linear term, chosen by ``method="auto"`` from the multiply-add count:

* ``"pairwise"`` (the kernels): ``B^2 T^2 (d_in + d_out)`` multiply-adds, memory ``O(B^2)`` plus one block of
  row-pair products. Best when ``T`` is small against the layer width.
* ``"outer"``: form ``W_i = A_i^T D_i`` for slices of the input features (``B T d_in d_out``) and take their
  Gram (``B^2 d_in d_out``); memory capped by ``max_bytes``. Best for long sequences through narrow layers.

Backends of the pairwise contraction :func:`grad_gram_pairwise` (``"outer"`` is BLAS through torch everywhere):

* ``reference``: the two ``(BT, BT)`` kernel matrices in torch, multiplied and summed by blocks (the spec).
* ``cpp``: blocks of about 512 rows: two GEMMs (``at::mm``, MKL) per block pair ``I <= J``, then one fused
  OpenMP pass multiplies them and sums ``T x T`` sub-blocks in float64; the upper triangle is mirrored.
* ``triton``: one program per ``(BLOCK, BLOCK)`` tile of row pairs; both dot products by ``tl.dot`` over feature
  slices, the product reduced into ``G`` by atomic adds (one per tile when ``T`` is a multiple of ``BLOCK``).
* ``cuda``: the same tiling with shared-memory dot products and atomic adds (compiled, not run here).

The model-level helper :func:`per_sample_grad_gram` (forward hooks, one backward pass) and its specification
:func:`per_sample_grad_gram_reference` (``torch.func.vmap(grad)``) sum the Grams of a model's *sites*
(:class:`GramSite`): by default every ``nn.Linear``, ``nn.Embedding`` and affine ``nn.LayerNorm``;
:func:`transformer_lens_sites` covers every parameter of a TransformerLens-layout transformer.

Cost: the Gram of per-sample gradients needs ``B^2 P`` multiply-adds for ``P`` parameters unless a layer has few
positions (``T^2 (d_in + d_out) < d_in d_out``): one-position layers gain hugely (``B^2 (d_in + d_out)``), long
sequences through narrow layers do not, and then the gain over ``vmap(grad)`` is memory (no ``B x P`` array).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import _backends

# ------------------------------------------------------------------------------------------------ references


def grad_gram_linear_reference(a: torch.Tensor, d: torch.Tensor, *, bias: bool = True) -> torch.Tensor:
    """Specification: materialise every per-sample gradient of a Linear layer and take their Gram.

    ``a`` ``(B, T, d_in)``, ``d`` ``(B, T, d_out)`` -> ``(B, B)`` in float64. Memory ``B * d_in * d_out``.
    """
    a64, d64 = a.to(torch.float64), d.to(torch.float64)
    g_w = torch.einsum("bto,bti->boi", d64, a64).reshape(a.shape[0], -1)
    g = g_w @ g_w.T
    if bias:
        g_b = d64.sum(1)
        g = g + g_b @ g_b.T
    return g


def grad_gram_embedding_reference(
    ids: torch.Tensor, d: torch.Tensor, *, num_embeddings: int, padding_idx: int | None = None
) -> torch.Tensor:
    """Specification: per-sample embedding gradients ``(B, num_embeddings, dim)`` and their Gram, float64."""
    b, t, dim = d.shape
    d64 = d.to(torch.float64)
    if padding_idx is not None:
        d64 = d64 * (ids != padding_idx).unsqueeze(-1)
    g = torch.zeros(b, num_embeddings, dim, dtype=torch.float64, device=d.device)
    g.scatter_add_(1, ids.long().unsqueeze(-1).expand(b, t, dim), d64)
    g = g.reshape(b, -1)
    return g @ g.T


def grad_gram_pairwise_reference(
    x: torch.Tensor | None, y: torch.Tensor, ids: torch.Tensor | None, batch: int
) -> torch.Tensor:
    """``G_ij = sum_{s,t} K[is, jt] (y_is . y_jt)`` with ``K = x x^T``, or ``[ids equal and >= 0]``; float64.

    ``x`` ``(B*T, p)`` (unused when ``ids`` is given), ``y`` ``(B*T, q)``, ``ids`` ``(B*T,)`` int64 or None.
    """
    r = y.shape[0]
    t = r // batch if batch else 0
    y64 = y.to(torch.float64)
    x64 = x.to(torch.float64) if ids is None else None
    g = torch.zeros(batch, batch, dtype=torch.float64, device=y.device)
    if t == 0:
        return g
    step = max(1, 4096 // max(t, 1))  # samples per block: the row-pair products take O(step * T * B * T)
    for i0 in range(0, batch, step):
        rows = slice(i0 * t, min(batch, i0 + step) * t)
        kd = y64[rows] @ y64.T
        if ids is None:
            ka = x64[rows] @ x64.T
        else:
            ka = ((ids[rows, None] == ids[None, :]) & (ids[rows, None] >= 0)).to(torch.float64)
        g[i0 : i0 + step] = (ka * kd).reshape(-1, t, batch, t).sum((1, 3))
    return g


# ------------------------------------------------------------------------------------------------ dispatch


def _check_pairwise(x, y, ids, batch):
    if not isinstance(y, torch.Tensor) or y.dim() != 2:
        raise ValueError(f"y must be a 2-D tensor (B*T, q), got {getattr(y, 'shape', y)}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
        raise ValueError(f"batch must be an int >= 0, got {batch!r}")
    if (batch == 0 and y.shape[0] != 0) or (batch > 0 and y.shape[0] % batch != 0):
        raise ValueError(f"y has {y.shape[0]} rows, not a multiple of batch={batch}")
    if y.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"y has dtype {y.dtype}; supported are torch.float32 and torch.float64")
    if ids is None:
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] != y.shape[0]:
            raise ValueError(f"x must be a 2-D tensor with {y.shape[0]} rows, got {getattr(x, 'shape', x)}")
        if x.dtype != y.dtype:
            raise TypeError(f"x has dtype {x.dtype} but y has {y.dtype}")
        if x.device != y.device:
            raise ValueError(f"x is on {x.device} but y is on {y.device}")
    else:
        if not isinstance(ids, torch.Tensor) or ids.shape != (y.shape[0],) or ids.dtype != torch.int64:
            raise ValueError(
                f"ids must be an int64 tensor of shape ({y.shape[0]},), got "
                f"{getattr(ids, 'dtype', None)} {tuple(getattr(ids, 'shape', ()))}"
            )
        if ids.device != y.device:
            raise ValueError(f"ids is on {ids.device} but y is on {y.device}")


def grad_gram_pairwise(
    x: torch.Tensor | None,
    y: torch.Tensor,
    ids: torch.Tensor | None = None,
    *,
    batch: int,
    backend: str | None = None,
) -> torch.Tensor:
    """The pairwise contraction ``G_ij = sum_{s,t} K[is, jt] (y_is . y_jt)``, shape ``(batch, batch)``, float64.

    Parameters
    ----------
    x : Tensor, shape ``(B*T, p)``, or None
        Rows grouped by sample (rows ``i*T .. i*T+T-1`` belong to sample ``i``); ``K = x x^T``. Ignored when
        ``ids`` is given.
    y : Tensor, shape ``(B*T, q)``
        float32 or float64, same dtype as ``x``.
    ids : Tensor, shape ``(B*T,)``, int64, optional
        Then ``K[r, c] = 1`` where ``ids[r] == ids[c] >= 0`` (negative ids never match: padding).
    batch : int
        ``B``.
    backend : {"cuda", "triton", "cpp", "reference"}, optional
        Force a backend (else ``PYPATTERN_BACKEND``, else the fastest available).
    """
    _check_pairwise(x, y, ids, batch)
    if batch == 0:
        return torch.zeros(0, 0, dtype=torch.float64, device=y.device)
    name = _backends.choose("grad_gram_pairwise", y.device, backend)
    if name == "reference":
        return grad_gram_pairwise_reference(x, y, ids, batch)
    if name == "triton":
        from pypattern.kernels.grad_gram import grad_gram_pairwise_triton

        return grad_gram_pairwise_triton(x, y, ids, batch)
    _backends._load_c()
    xx = x.contiguous() if ids is None else y.new_zeros(0, 0)
    return torch.ops.pypattern.grad_gram_pairwise(xx, y.contiguous(), ids, batch)


def _as_btd(name: str, t: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() == 2:
        return t.unsqueeze(1)
    if t.dim() < 2:
        raise ValueError(f"{name} must have shape (B, d) or (B, ..., d), got {tuple(t.shape)}")
    return t.reshape(t.shape[0], math.prod(t.shape[1:-1]), t.shape[-1])


def choose_method(batch: int, positions: int, d_in: int, d_out: int) -> str:
    """``"pairwise"`` or ``"outer"``, whichever needs fewer multiply-adds (see the module docstring)."""
    pairwise = batch * batch * positions * positions * (d_in + d_out)
    outer = batch * positions * d_in * d_out + batch * batch * d_in * d_out
    return "pairwise" if pairwise <= outer else "outer"


def _sym_gram_add_(g: torch.Tensor, w: torch.Tensor, block: int = 128) -> None:
    """``g += w w^T`` (float64 ``g``), computing only the blocks on and above the diagonal (about 60% of the
    multiply-adds of one GEMM at B = 512)."""
    b = w.shape[0]
    for i0 in range(0, b, block):
        wi = w[i0 : i0 + block]
        for j0 in range(i0, b, block):
            blk = (wi @ w[j0 : j0 + block].T).to(torch.float64)
            g[i0 : i0 + block, j0 : j0 + block] += blk
            if j0 != i0:
                g[j0 : j0 + block, i0 : i0 + block] += blk.T


def _outer_gram(a: torch.Tensor, d: torch.Tensor, max_bytes: int) -> torch.Tensor:
    b, _, d_in = a.shape
    d_out = d.shape[2]
    per_feature = max(1, b * d_out * a.element_size())
    step = max(1, min(d_in, max_bytes // per_feature))
    g = torch.zeros(b, b, dtype=torch.float64, device=a.device)
    for p0 in range(0, d_in, step):
        w = torch.bmm(a[:, :, p0 : p0 + step].transpose(1, 2), d).reshape(b, -1)
        _sym_gram_add_(g, w)
    return g


def grad_gram_linear(
    a: torch.Tensor,
    d: torch.Tensor,
    *,
    bias: bool = True,
    weight: bool = True,
    method: str = "auto",
    max_bytes: int = 32 * 2**20,
    backend: str | None = None,
) -> torch.Tensor:
    """Gram of the per-sample gradients of one ``nn.Linear`` from its inputs and output gradients.

    Parameters
    ----------
    a : Tensor, shape ``(B, d_in)`` or ``(B, ..., d_in)``
        Layer inputs (middle dimensions are positions ``T``).
    d : Tensor, shape ``(B, d_out)`` or ``(B, ..., d_out)``
        Gradients of ``sum_i l_i`` with respect to the layer outputs, same middle dimensions as ``a``.
    bias, weight : bool
        Include the bias / weight gradient.
    method : {"auto", "pairwise", "outer"}
        See the module docstring; ``"auto"`` picks the one with fewer multiply-adds.
    max_bytes : int
        Workspace cap of ``"outer"`` (it processes slices of the input features).
    backend : str, optional
        Backend of the pairwise contraction.

    Returns
    -------
    Tensor, shape ``(B, B)``, float64 (products in the input dtype, sums in float64).
    """
    a3, d3 = _as_btd("a", a), _as_btd("d", d)
    if a3.shape[:2] != d3.shape[:2]:
        raise ValueError(
            f"a and d must agree in batch and positions, got {tuple(a.shape)} and {tuple(d.shape)}"
        )
    if method not in ("auto", "pairwise", "outer"):
        raise ValueError(f"method must be 'auto', 'pairwise' or 'outer', got {method!r}")
    if a3.dtype != d3.dtype:
        d3 = d3.to(a3.dtype)
    b, t, d_in = a3.shape
    g = torch.zeros(b, b, dtype=torch.float64, device=a3.device)
    if weight:
        if method == "auto":
            method = choose_method(b, t, d_in, d3.shape[2])
        if method == "pairwise":
            x = a3.reshape(b * t, d_in)
            if bias:  # fold the bias in: (x . x' + 1)(y . y') summed over positions is exactly its Gram term
                x = torch.cat([x, x.new_ones(b * t, 1)], 1)
            return g + grad_gram_pairwise(x, d3.reshape(b * t, d3.shape[2]), batch=b, backend=backend)
        g += _outer_gram(a3, d3, max_bytes)
    if bias:
        s = d3.sum(1, dtype=torch.float64)
        g += s @ s.T
    return g


def grad_gram_embedding(
    ids: torch.Tensor,
    d: torch.Tensor,
    *,
    padding_idx: int | None = None,
    method: str = "auto",
    max_bytes: int = 32 * 2**20,
    backend: str | None = None,
) -> torch.Tensor:
    """Gram of the per-sample gradients of one ``nn.Embedding`` from its token ids and output gradients.

    Parameters
    ----------
    ids : Tensor, shape ``(B,)`` or ``(B, ...)``, integer
    d : Tensor, shape ``(B, ..., dim)``
        Gradients of ``sum_i l_i`` with respect to the embedding outputs.
    padding_idx : int, optional
        Positions holding this id carry no gradient (as in ``nn.Embedding``).
    method : {"auto", "pairwise", "outer"}
        ``"pairwise"``: ``B^2 T^2 dim`` multiply-adds (the kernels). ``"outer"``: scatter the per-sample gradients
        of the ``V`` distinct ids of the batch, ``(B, V, dim)`` in slices of at most ``max_bytes``, and take their
        Gram (``B^2 V dim``). ``"auto"`` takes the one with fewer multiply-adds (``V`` against ``T^2``).

    Returns
    -------
    Tensor, shape ``(B, B)``, float64.
    """
    if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dim() < 1:
        raise TypeError(f"ids must be an integer tensor of shape (B, ...), got {getattr(ids, 'dtype', ids)}")
    if method not in ("auto", "pairwise", "outer"):
        raise ValueError(f"method must be 'auto', 'pairwise' or 'outer', got {method!r}")
    b = ids.shape[0]
    t = math.prod(ids.shape[1:])
    flat = ids.reshape(b, t)
    if d.dim() < 2 or d.shape[:-1] != ids.shape:
        raise ValueError(
            f"d must have shape ids.shape + (dim,) = {tuple(ids.shape)} + (dim,), got {tuple(d.shape)}"
        )
    dim = d.shape[-1]
    d3 = d.reshape(b, t, dim)
    r = flat.reshape(-1).to(torch.int64)
    if padding_idx is not None:
        r = torch.where(r == padding_idx, torch.full_like(r, -1), r)
    if method == "auto" or method == "outer":
        uniq, inv = torch.unique(r, return_inverse=True)
        n_valid = int((uniq >= 0).sum())
        if method == "auto":
            method = "outer" if n_valid <= 2 * t * t else "pairwise"
    if method == "pairwise":
        return grad_gram_pairwise(None, d3.reshape(b * t, dim), r, batch=b, backend=backend)
    # outer: column v of the compressed vocabulary; padding (-1) sorts first in uniq
    offset = uniq.numel() - n_valid
    col = (inv - offset).reshape(b, t)  # -1 for padding
    g = torch.zeros(b, b, dtype=torch.float64, device=d.device)
    step = max(1, max_bytes // max(1, b * dim * d.element_size()))
    for v0 in range(0, n_valid, step):
        v1 = min(n_valid, v0 + step)
        inside = (col >= v0) & (col < v1)
        idx = torch.where(inside, col - v0, torch.full_like(col, v1 - v0))  # outside -> a dump row
        w = torch.zeros(b, v1 - v0 + 1, dim, dtype=d.dtype, device=d.device)
        w.scatter_add_(1, idx.unsqueeze(-1).expand(b, t, dim), d3)
        _sym_gram_add_(g, w[:, : v1 - v0].reshape(b, -1))
    return g


def center_gram(g: torch.Tensor) -> torch.Tensor:
    """``H G H`` with ``H = I - 11^T / B``: the Gram of the centred per-sample gradients, ``(B, B)``."""
    return g - g.mean(0, keepdim=True) - g.mean(1, keepdim=True) + g.mean()


# ------------------------------------------------------------------------------------------------ model level


@dataclass(frozen=True)
class GramSite:
    """One place where parameters act linearly, for :func:`per_sample_grad_gram`.

    A capture ``(module name, "input" | "output")`` names a tensor seen by a forward hook on that submodule
    (its first positional input, or its output); the first dimension of every captured tensor is the batch.

    Kinds:

    * ``"linear"``: ``y = x W + b`` per position. ``x`` from ``inp`` with its last ``in_dims`` dimensions as
      features, ``y`` from ``out`` (the output the weight's gradient flows through, *including* the bias) with its
      last ``out_dims`` dimensions as features. ``params = (weight name, bias name or None)``.
    * ``"embedding"``: ``y = W[ids]``: ids from ``inp``, ``y`` from ``out``; ``params = (weight name,)``.
    * ``"positional"``: ``y[:, t] = W[t]`` for every sample (ids are the positions); ``params = (weight name,)``.
    * ``"layernorm"``: ``y = xhat * w + b`` with ``xhat = layer_norm(x, eps)`` over the last dimension; ``x`` from
      ``inp``, ``params = (w name, b name or None)``.

    The weight may have any layout that is a reshape or permutation of the ``(d_in, d_out)`` map (e.g.
    ``W_Q (n_heads, d_model, d_head)``): Gram matrices do not depend on the order of the parameter entries.
    """

    name: str
    kind: str
    params: tuple[str | None, ...]
    out: tuple[str, str]
    inp: tuple[str, str] | None = None
    in_dims: int = 1
    out_dims: int = 1
    padding_idx: int | None = None
    eps: float = 1e-5


def _named_site_modules(model: nn.Module, modules) -> list[tuple[str, nn.Module]]:
    named = dict(model.named_modules())
    supported = (nn.Linear, nn.Embedding, nn.LayerNorm)
    if modules is None:
        return [(n, m) for n, m in named.items() if isinstance(m, supported)]
    out = []
    for m in modules:
        if isinstance(m, str):
            if m not in named:
                raise ValueError(f"modules: {m!r} is not a submodule name of the model")
            out.append((m, named[m]))
        else:
            name = next((n for n, x in named.items() if x is m), None)
            if name is None:
                raise ValueError(f"modules: {type(m).__name__} instance is not part of the model")
            out.append((name, m))
    for n, m in out:
        if not isinstance(m, supported):
            raise TypeError(
                f"modules: {n!r} is a {type(m).__name__}; supported are nn.Linear, nn.Embedding and nn.LayerNorm"
            )
    return out


def _pname(mod_name: str, attr: str) -> str:
    return f"{mod_name}.{attr}" if mod_name else attr


def default_sites(model: nn.Module, modules=None) -> list[GramSite]:
    """Sites of every ``nn.Linear``, ``nn.Embedding`` and affine ``nn.LayerNorm`` (over the last dimension)."""
    sites = []
    for n, m in _named_site_modules(model, modules):
        if isinstance(m, nn.Linear):
            bias = _pname(n, "bias") if m.bias is not None else None
            sites.append(GramSite(n, "linear", (_pname(n, "weight"), bias), (n, "output"), (n, "input")))
        elif isinstance(m, nn.Embedding):
            if m.scale_grad_by_freq or m.max_norm is not None:
                raise NotImplementedError(
                    f"{n}: nn.Embedding with scale_grad_by_freq or max_norm is not supported"
                )
            sites.append(
                GramSite(
                    n,
                    "embedding",
                    (_pname(n, "weight"),),
                    (n, "output"),
                    (n, "input"),
                    padding_idx=m.padding_idx,
                )
            )
        elif isinstance(m, nn.LayerNorm) and m.weight is not None:
            if len(m.normalized_shape) != 1:
                raise NotImplementedError(
                    f"{n}: nn.LayerNorm over more than the last dimension is not supported"
                )
            bias = _pname(n, "bias") if m.bias is not None else None
            sites.append(
                GramSite(n, "layernorm", (_pname(n, "weight"), bias), (n, "output"), (n, "input"), eps=m.eps)
            )
    return sites


def transformer_lens_sites(model: nn.Module) -> list[GramSite]:
    """Every parameter of a TransformerLens-layout model (``pypattern.models.Transformer``) as sites.

    Uses the TransformerLens names (``embed.W_E``, ``blocks.{l}.attn.W_Q``/``hook_q``, ``hook_z``,
    ``hook_attn_out``, ``mlp.hook_pre``/``hook_post``, ``hook_mlp_out``, ``ln1``/``ln2``/``ln_final`` with ``w``,
    ``b``, ``eps``, ``unembed.W_U``/``b_U``); parts the model lacks (positional embedding, MLPs, LayerNorms) are
    skipped.
    """
    mods = dict(model.named_modules())
    params = dict(model.named_parameters())
    sites: list[GramSite] = []

    def has(*names):
        return all(n in params for n in names)

    def add_ln(ln):
        m = mods.get(ln)
        if m is not None and has(f"{ln}.w"):
            b = f"{ln}.b" if has(f"{ln}.b") else None
            sites.append(GramSite(ln, "layernorm", (f"{ln}.w", b), (ln, "output"), (ln, "input"), eps=m.eps))

    if has("embed.W_E"):
        sites.append(
            GramSite("embed", "embedding", ("embed.W_E",), ("hook_embed", "output"), ("embed", "input"))
        )
    if has("pos_embed.W_pos"):
        sites.append(GramSite("pos_embed", "positional", ("pos_embed.W_pos",), ("hook_pos_embed", "output")))
    n_layers = len(getattr(model, "blocks", []))
    for layer in range(n_layers):
        p = f"blocks.{layer}"
        add_ln(f"{p}.ln1")
        for x in "QKV":
            sites.append(
                GramSite(
                    f"{p}.attn.W_{x}",
                    "linear",
                    (f"{p}.attn.W_{x}", f"{p}.attn.b_{x}"),
                    (f"{p}.attn.hook_{x.lower()}", "output"),
                    (f"{p}.ln1", "output"),
                    out_dims=2,
                )
            )
        sites.append(
            GramSite(
                f"{p}.attn.W_O",
                "linear",
                (f"{p}.attn.W_O", f"{p}.attn.b_O"),
                (f"{p}.hook_attn_out", "output"),
                (f"{p}.attn.hook_z", "output"),
                in_dims=2,
            )
        )
        if has(f"{p}.mlp.W_in"):
            add_ln(f"{p}.ln2")
            sites.append(
                GramSite(
                    f"{p}.mlp.W_in",
                    "linear",
                    (f"{p}.mlp.W_in", f"{p}.mlp.b_in"),
                    (f"{p}.mlp.hook_pre", "output"),
                    (f"{p}.ln2", "output"),
                )
            )
            sites.append(
                GramSite(
                    f"{p}.mlp.W_out",
                    "linear",
                    (f"{p}.mlp.W_out", f"{p}.mlp.b_out"),
                    (f"{p}.hook_mlp_out", "output"),
                    (f"{p}.mlp.hook_post", "output"),
                )
            )
    add_ln("ln_final")
    if has("unembed.W_U"):
        b = "unembed.b_U" if has("unembed.b_U") else None
        sites.append(
            GramSite("unembed", "linear", ("unembed.W_U", b), ("unembed", "output"), ("ln_final", "output"))
        )
    return sites


def _check_sites(model: nn.Module, sites: Sequence[GramSite]) -> dict[str, torch.nn.Parameter]:
    """The trainable parameters the sites cover (by name); raises on unknown names or shared parameters."""
    params = dict(model.named_parameters(remove_duplicate=False))
    mods = dict(model.named_modules())
    seen: dict[int, str] = {}
    out = {}
    for st in sites:
        if st.kind not in ("linear", "embedding", "positional", "layernorm"):
            raise ValueError(
                f"site {st.name!r}: kind {st.kind!r} is not one of linear, embedding, positional, layernorm"
            )
        for cap in (st.out, st.inp):
            if cap is not None and (cap[0] not in mods or cap[1] not in ("input", "output")):
                raise ValueError(
                    f"site {st.name!r}: capture {cap!r} needs a submodule name and 'input' or 'output'"
                )
        for pn in st.params:
            if pn is None:
                continue
            if pn not in params:
                raise ValueError(f"site {st.name!r}: {pn!r} is not a parameter name of the model")
            p = params[pn]
            if not p.requires_grad:
                continue
            if id(p) in seen and seen[id(p)] != pn:
                raise NotImplementedError(
                    f"{pn} is the same tensor as {seen[id(p)]} (tied weights): their cross terms are not supported"
                )
            if id(p) in seen:
                raise ValueError(f"parameter {pn} appears in two sites")
            seen[id(p)] = pn
            out[pn] = p
    return out


def gram_parameters(model: nn.Module, modules=None, sites: Sequence[GramSite] | None = None):
    """The parameters (by full name) whose gradients :func:`per_sample_grad_gram` covers."""
    return _check_sites(model, default_sites(model, modules) if sites is None else sites)


def _site_gram(st, params, cap, batch, method, backend):
    """Gram of one site from the captured tensors (lists over calls), or None when nothing flowed."""
    outs = cap[st.out]
    grads = [g for _, g in outs]
    if not grads or all(g is None for g in grads):
        return None
    live = [k for k, g in enumerate(grads) if g is not None]
    w_name, b_name = st.params[0], (st.params[1] if len(st.params) > 1 else None)
    w_on = params.get(w_name) is not None
    b_on = b_name is not None and params.get(b_name) is not None
    if st.kind == "positional":  # the per-sample gradient of W[:T] is the output gradient itself
        d = sum(_as_btd("grad", grads[k]) for k in live)
        g = torch.zeros(batch, batch, dtype=torch.float64, device=d.device)
        _sym_gram_add_(g, d.reshape(batch, -1))
        return g
    ins = cap[st.inp]
    if len(ins) != len(outs):
        raise ValueError(f"site {st.name!r}: {len(ins)} calls of {st.inp[0]} but {len(outs)} of {st.out[0]}")
    if st.kind == "embedding":
        ids = torch.cat([ins[k][0].reshape(batch, -1) for k in live], 1)
        d = torch.cat([_as_btd("grad", grads[k]) for k in live], 1)
        return grad_gram_embedding(ids, d, padding_idx=st.padding_idx, method=method, backend=backend)
    if st.kind == "layernorm":
        parts = []
        xs = [ins[k][0] for k in live]
        ds = [grads[k] for k in live]
        if w_on:
            parts.append(
                sum(
                    (F.layer_norm(x, x.shape[-1:], eps=st.eps) * d)
                    .reshape(batch, -1, d.shape[-1])
                    .sum(1, dtype=torch.float64)
                    for x, d in zip(xs, ds)
                )
            )
        if b_on:
            parts.append(sum(d.reshape(batch, -1, d.shape[-1]).sum(1, dtype=torch.float64) for d in ds))
        if not parts:
            return None
        g = torch.cat(parts, 1)
        return g @ g.T
    a = torch.cat(
        [_as_btd("input", ins[k][0].flatten(-st.in_dims) if st.in_dims > 1 else ins[k][0]) for k in live], 1
    )
    d = torch.cat(
        [_as_btd("grad", grads[k].flatten(-st.out_dims) if st.out_dims > 1 else grads[k]) for k in live], 1
    )
    if not (w_on or b_on):
        return None
    return grad_gram_linear(a, d, bias=b_on, weight=w_on, method=method, backend=backend)


def per_sample_grad_gram(
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    *inputs,
    modules: Sequence[str | nn.Module] | None = None,
    sites: Sequence[GramSite] | None = None,
    centered: bool = False,
    per_module: bool = False,
    method: str = "auto",
    backend: str | None = None,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """``G_ij = <grad l_i, grad l_j>`` over the parameters of every site, from one forward and one backward pass.

    Default sites: every ``nn.Linear``, ``nn.Embedding`` and affine ``nn.LayerNorm`` (see :func:`default_sites`);
    :func:`transformer_lens_sites` covers a TransformerLens-layout model whole. Forward hooks record each site's
    input and output; one ``torch.autograd.grad`` of ``sum_i l_i`` gives the output gradients; the Gram of each
    site comes from :func:`grad_gram_linear` / :func:`grad_gram_embedding` (LayerNorm: its ``2 d`` per-sample
    gradients directly) and they are summed. A module called several times in one forward counts all its calls
    (concatenated as extra positions, which is exact). Frozen parameters are left out. Parameters' ``.grad`` are
    not touched.

    Parameters
    ----------
    model : nn.Module
        Must treat samples independently (no batch norm in training mode).
    loss_fn : callable
        ``loss_fn(model, *inputs)`` returns the per-sample losses, shape ``(B,)`` or ``(B, ...)`` (then summed
        over the trailing dimensions, e.g. per-token losses): ``reduction="none"``, never the batch mean
        (a mean would put a factor ``1/B`` in every gradient).
    *inputs
        Passed to ``loss_fn``; their first dimension is the batch.
    modules : list of names or modules, optional
        Restrict the default sites to these modules.
    sites : list of GramSite, optional
        Use these sites instead of the default ones.
    centered : bool
        Return ``H G H`` (see :func:`center_gram`).
    per_module : bool
        Return ``{site name: (B, B)}`` instead of the sum.
    method, backend : str
        Passed to :func:`grad_gram_linear` / :func:`grad_gram_pairwise`.

    Returns
    -------
    Tensor ``(B, B)`` float64, or a dict of them.
    """
    if sites is None:
        sites = default_sites(model, modules)
    params = _check_sites(model, sites)
    sites = [st for st in sites if any(pn in params for pn in st.params if pn is not None)]
    caps = {c for st in sites for c in (st.out, st.inp) if c is not None}
    records: dict[tuple[str, str], list] = {c: [] for c in caps}
    need = {}
    for mod_name, what in caps:
        need.setdefault(mod_name, set()).add(what)
    mods = dict(model.named_modules())
    handles = []

    def make_hook(mod_name, whats):
        def hook(mod, args, out):
            if "input" in whats:
                records[(mod_name, "input")].append(
                    [args[0].detach() if torch.is_tensor(args[0]) else args[0], None]
                )
            if "output" in whats:
                records[(mod_name, "output")].append([out, None])

        return hook

    try:
        for mod_name, whats in need.items():
            handles.append(mods[mod_name].register_forward_hook(make_hook(mod_name, whats)))
        losses = loss_fn(model, *inputs)
    finally:
        for h in handles:
            h.remove()
    if not isinstance(losses, torch.Tensor) or losses.dim() == 0:
        raise ValueError(
            "loss_fn must return per-sample losses of shape (B,) or (B, ...) (reduction='none'), got a "
            f"{'scalar' if isinstance(losses, torch.Tensor) else type(losses).__name__}; a batch-mean loss would "
            "scale every per-sample gradient by 1/B"
        )
    batch = losses.shape[0]
    out_caps = {st.out for st in sites}
    targets = []
    for c, recs in records.items():
        for rec in recs:
            t = rec[0]
            if torch.is_tensor(t) and t.dim() > 0 and t.shape[0] != batch:
                raise ValueError(
                    f"{c[0]}: its {c[1]} has leading size {t.shape[0]} but the losses have batch {batch}; "
                    "the first dimension of every captured tensor must be the batch"
                )
            if c in out_caps and t.requires_grad:
                targets.append(rec)
    grads = torch.autograd.grad(losses.sum(), [r[0] for r in targets], allow_unused=True) if targets else []
    for rec, g in zip(targets, grads):
        rec[1] = g
    cap = {
        c: [(r[0].detach() if torch.is_tensor(r[0]) else r[0], r[1]) for r in recs]
        for c, recs in records.items()
    }
    result: dict[str, torch.Tensor] = {}
    for st in sites:
        g = _site_gram(st, params, cap, batch, method, backend)
        if g is not None:
            result[st.name] = g
    if centered:
        result = {k: center_gram(v) for k, v in result.items()}
    if per_module:
        return result
    total = torch.zeros(batch, batch, dtype=torch.float64, device=losses.device)
    for v in result.values():
        total += v.to(total.device)
    return total


def per_sample_grad_gram_reference(
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    *inputs,
    modules: Sequence[str | nn.Module] | None = None,
    sites: Sequence[GramSite] | None = None,
    centered: bool = False,
    chunk_size: int | None = None,
    gram_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Specification of :func:`per_sample_grad_gram`: ``torch.func.vmap(grad)`` per-sample gradients, flattened.

    Each sample ``i`` runs alone as a batch of one (``loss_fn(model, *[x[i:i+1] for x in inputs]).sum()``).
    Memory ``B x (number of covered parameters)``, twice (the gradients and their flattened copy). The Gram is
    taken in ``gram_dtype`` (float64 for tests; float32 is the plain, faster baseline). Returns ``(B, B)``.
    """
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in gram_parameters(model, modules, sites).items()}

    class _Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *xs):
            return loss_fn(self.model, *xs)

    wrap = _Wrap()

    def single(p, *xs):
        out = functional_call(
            wrap, {f"model.{k}": v for k, v in p.items()}, tuple(x.unsqueeze(0) for x in xs)
        )
        return out.sum()

    grads = vmap(grad(single), in_dims=(None,) + (0,) * len(inputs), chunk_size=chunk_size)(params, *inputs)
    flat = torch.cat([g.detach().reshape(g.shape[0], -1).to(gram_dtype) for g in grads.values()], 1)
    g = flat @ flat.T
    return center_gram(g) if centered else g
