"""Checks shared by the tests of per-head masks over unconverted Hugging Face models: a forward read at an
attention's output projection, weights perturbed at a mask's entries, and which heads' outputs changed."""

from __future__ import annotations

import torch
from torch.func import functional_call


def run_at_out_proj(m, params, oname, x):
    """(z, output) of the output projection ``oname`` in a forward of ``m`` with ``params``."""
    got = {}
    mod = m.get_submodule(oname)
    h1 = mod.register_forward_pre_hook(lambda _m, a: got.__setitem__("z", a[0]))
    h2 = mod.register_forward_hook(lambda _m, a, o: got.__setitem__("o", o))
    try:
        functional_call(m, params, (x,))
    finally:
        h1.remove()
        h2.remove()
    return got["z"], got["o"]


def perturbed(params, masks, seed, scale=0.3):
    """``params`` with Gaussian noise (drawn in float64, then cast) added at each mask's entries."""
    gen = torch.Generator().manual_seed(seed)
    out = dict(params)
    for n, sel in masks.items():
        noise = (scale * torch.randn(params[n].shape, generator=gen, dtype=torch.float64)).to(params[n].dtype)
        out[n] = params[n] + noise * sel
    return out


def changed_heads(z0, z1, n, dh):
    """The heads (of ``n``, ``dh`` features each) whose part of ``z`` differs between ``z0`` and ``z1``."""
    a, b = z0.reshape(*z0.shape[:-1], n, dh), z1.reshape(*z1.shape[:-1], n, dh)
    return [j for j in range(n) if not torch.equal(a[..., j, :], b[..., j, :])]


def check_head_moves_alone(m, params, own, full, h, shape, oname, onames, x, z0, o0):
    """Head ``h``'s mask ``own`` (and ``full``, with its shared key/value head) moves exactly its own output (the
    whole group's for ``full`` under grouped keys and values), and its slice of the output projection ``oname``
    (parameters ``onames``) changes the output as ``z_h`` alone does. ``shape``: ``(n, n_kv, dh)``; ``z0``, ``o0``:
    the unperturbed run's."""
    n, n_kv, dh = shape
    group = n // n_kv
    for incl, mk in ((False, own), (True, full)):
        with torch.no_grad():
            z1, _ = run_at_out_proj(m, perturbed(params, mk, seed=10 + h), oname, x)
        g0 = h // group
        want = list(range(g0 * group, (g0 + 1) * group)) if incl and n_kv < n else [h]
        assert changed_heads(z0, z1, n, dh) == want, (h, incl)
    # the output projection's slice: its change of the output is that of z_h alone
    sub = {k[len(oname) + 1 :]: v for k, v in params.items() if k in onames}
    moved = {k[len(oname) + 1 :]: v for k, v in perturbed(params, own, 20 + h).items() if k in onames}
    keep = torch.zeros(n, 1, dtype=z0.dtype)
    keep[h] = 1
    zh = (z0.reshape(*z0.shape[:-1], n, dh) * keep).reshape(z0.shape)
    proj = m.get_submodule(oname)
    with torch.no_grad():
        d_all = functional_call(proj, moved, (z0,)) - o0
        d_h = functional_call(proj, moved, (zh,)) - functional_call(proj, sub, (zh,))
    assert d_all.abs().max() > 0
    torch.testing.assert_close(d_all, d_h, rtol=0, atol=1e-13)
