"""Per-sample gradient Gram: our hook helper against torch.func vmap(grad) at batch 512 on nn.Linear(1024, 1024).

Target: >= 100x faster and >= 50x less peak memory than vmap(grad) + flatten + matmul (its Gram in float32,
the fastest form of the baseline). Work of our contraction (one position, bias folded in): B^2 (d_in + 1 + d_out)
multiply-adds; its bound is two plain float32 GEMMs ``A A^T`` and ``D D^T`` of the same shapes, measured in the same
run. The hook helper's own floor is one forward + backward of the batch loss (also measured). Peak memory: the rise
of the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) over the resident set before the
call; printed with ``-s`` and stored in ``extra_info``. Threads: bench/conftest.py (default 1).
"""

from __future__ import annotations

import ctypes
import re

import pytest
import torch
from torch import nn

from pypattern.gram import per_sample_grad_gram, per_sample_grad_gram_reference
from pypattern.ops.grad_gram import grad_gram_linear

BATCH, D_IN, D_OUT = 512, 1024, 1024
MADDS = BATCH * BATCH * (D_IN + 1 + D_OUT)


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+)", f.read()).group(1))


def peak_mib(fn) -> tuple[float, object]:
    """Peak rise of the resident set (MiB) while ``fn`` runs, and its result.

    Freed heap memory is first returned to the system (glibc ``malloc_trim``), so that what ``fn`` allocates shows
    in the resident set instead of reusing pages the process already holds.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:  # pragma: no cover - not Linux/glibc
        return float("nan"), fn()
    base = _status_kib("VmRSS")
    out = fn()
    return (_status_kib("VmHWM") - base) / 1024, out


def _mse(m, x, y):
    return ((m(x) - y) ** 2).sum(-1)  # per-sample losses, shape (B,)


def _problem():
    torch.manual_seed(0)
    return nn.Linear(D_IN, D_OUT), torch.randn(BATCH, D_IN), torch.randn(BATCH, D_OUT)


def _info(benchmark, role, label, **kw):
    benchmark.group = "grad_gram: Linear(1024,1024), batch 512"
    benchmark.extra_info.update(role=role, label=label, threads=torch.get_num_threads(), **kw)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_hooks(benchmark, backend):
    lin, x, y = _problem()
    _info(benchmark, "ours", f"hooks + pairwise ({backend})")
    out = benchmark(per_sample_grad_gram, lin, _mse, x, y, backend=backend)
    want = per_sample_grad_gram(
        lin, _mse, x[:64], y[:64], backend="reference"
    )  # both backends, the same Gram
    assert float((out[:64, :64].double() - want.double()).abs().max() / want.double().abs().max()) < 1e-5


def test_forward_backward_floor(benchmark):
    lin, x, y = _problem()
    _info(benchmark, "bound", "forward+backward")
    benchmark(lambda: torch.autograd.grad(_mse(lin, x, y).sum(), lin.weight))


def test_vmap_grad(benchmark):
    """The baseline (one round: it takes seconds and GiBs); peak memory of both measured here."""
    lin, x, y = _problem()
    per_sample_grad_gram(lin, _mse, x, y)  # warm-up: one-time library loads are not the method's memory
    ours_mib, ours = peak_mib(lambda: per_sample_grad_gram(lin, _mse, x, y))
    ref_mib, ref = peak_mib(lambda: per_sample_grad_gram_reference(lin, _mse, x, y, gram_dtype=torch.float32))
    err = float((ours - ref.double()).abs().max() / ref.double().abs().max())
    _info(
        benchmark,
        "reference",
        "vmap(grad)",
        peak_mib=ref_mib,
        ours_peak_mib=ours_mib,
        memory_ratio=ref_mib / max(ours_mib, 1e-3),
        max_rel_diff=err,
    )
    benchmark.pedantic(
        per_sample_grad_gram_reference,
        args=(lin, _mse, x, y),
        kwargs={"gram_dtype": torch.float32},
        rounds=1,
        iterations=1,
    )
    print(
        f"\npeak memory: vmap(grad) {ref_mib:.0f} MiB, ours {ours_mib:.1f} MiB -> "
        f"{ref_mib / max(ours_mib, 1e-3):.0f}x less (max rel diff {err:.1e})"
    )
    assert err < 1e-4


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_core(benchmark, backend):
    torch.manual_seed(0)
    a, d = torch.randn(BATCH, D_IN), torch.randn(BATCH, D_OUT)
    benchmark.group = "grad_gram core: (A A^T + 1) * (D D^T), 512 x 1024"
    role = "ours" if backend == "cpp" else "reference"
    benchmark.extra_info.update(
        role=role, label=f"grad_gram_linear ({backend})", madds=MADDS, threads=torch.get_num_threads()
    )
    out = benchmark(grad_gram_linear, a, d, backend=backend)
    a64, d64 = a.double(), d.double()
    want = (a64 @ a64.T + 1) * (d64 @ d64.T)
    assert float((out.double() - want).abs().max() / want.abs().max()) < 1e-5


def test_core_gemm_bound(benchmark):
    torch.manual_seed(0)
    a, d = torch.randn(BATCH, D_IN), torch.randn(BATCH, D_OUT)
    benchmark.group = "grad_gram core: (A A^T + 1) * (D D^T), 512 x 1024"
    benchmark.extra_info.update(role="bound", label="two sgemm", madds=MADDS, threads=torch.get_num_threads())
    benchmark(lambda: (torch.mm(a, a.t()), torch.mm(d, d.t())))


# ----------------------------------------------------------------------------------------------- whole transformer
def _transformer():
    from pypattern.gram import transformer_lens_sites
    from pypattern.models import Transformer, TransformerConfig

    cfg = TransformerConfig(
        n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=256, d_vocab=64, n_ctx=8, seed=0
    )
    model = Transformer(cfg)
    tokens = torch.randint(0, 64, (BATCH, 8), generator=torch.Generator().manual_seed(0))
    return model, tokens, transformer_lens_sites(model)


def _per_token(m, t):
    return m(t, return_type="per_token_loss")


TGROUP = "grad_gram: whole 2-layer transformer (d_model 64, 8 tokens, 109k params), batch 512"


def test_transformer_hooks(benchmark):
    model, tokens, sites = _transformer()
    benchmark.group = TGROUP
    benchmark.extra_info.update(role="ours", label="hooks, all sites", threads=torch.get_num_threads())
    benchmark.pedantic(
        per_sample_grad_gram,
        args=(model, _per_token, tokens),
        kwargs={"sites": sites},
        rounds=3,
        iterations=1,
    )


def test_transformer_vmap_grad(benchmark):
    model, tokens, sites = _transformer()
    per_sample_grad_gram(model, _per_token, tokens, sites=sites)  # warm-up
    ours_mib, ours = peak_mib(lambda: per_sample_grad_gram(model, _per_token, tokens, sites=sites))
    ref_mib, ref = peak_mib(
        lambda: per_sample_grad_gram_reference(
            model, _per_token, tokens, sites=sites, gram_dtype=torch.float32
        )
    )
    err = float((ours - ref.double()).abs().max() / ref.double().abs().max())
    benchmark.group = TGROUP
    benchmark.extra_info.update(
        role="reference",
        label="vmap(grad)",
        peak_mib=ref_mib,
        ours_peak_mib=ours_mib,
        memory_ratio=ref_mib / max(ours_mib, 1e-3),
        max_rel_diff=err,
        threads=torch.get_num_threads(),
    )
    benchmark.pedantic(
        per_sample_grad_gram_reference,
        args=(model, _per_token, tokens),
        kwargs={"sites": sites, "gram_dtype": torch.float32},
        rounds=1,
        iterations=1,
    )
    print(
        f"\ntransformer peak memory: vmap(grad) {ref_mib:.0f} MiB, ours {ours_mib:.1f} MiB -> "
        f"{ref_mib / max(ours_mib, 1e-3):.1f}x less (max rel diff {err:.1e})"
    )
    assert err < 1e-4
