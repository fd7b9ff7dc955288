"""CrossCovariance.all_reduce across torch.distributed ranks (gloo, two local processes)."""

import os
import tempfile

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pypattern.ops.covariance import CrossCovariance


def _data():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 3, generator=g, dtype=torch.float64) + 5.0
    b = torch.randn(300, 4, generator=g, dtype=torch.float64) + 0.5 * a[:, :1]
    return a, b


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        a, b = _data()
        acc = CrossCovariance(3, 4, track_auto="var")
        # uneven shares: rank r takes every world-th chunk of 37 draws
        for i in range(rank * 37, 300, world * 37):
            acc.update(a[i : i + 37], b[i : i + 37])
        acc.all_reduce()
        np.save(os.path.join(out_dir, f"cov{rank}.npy"), acc.cov().numpy())
        np.save(os.path.join(out_dir, f"corr{rank}.npy"), acc.corr().numpy())
    finally:
        dist.destroy_process_group()
    # written: leave without gloo's teardown at interpreter exit, which aborts the process now and then
    os._exit(0)


def test_all_reduce_equals_single_pass():
    a, b = _data()
    want = np.cov(np.concatenate([a.numpy(), b.numpy()], 1), rowvar=False)[:3, 3:]
    with tempfile.TemporaryDirectory() as d:
        init = os.path.join(d, "init")
        mp.spawn(_worker, args=(2, init, d), nprocs=2, join=True)
        for r in range(2):
            np.testing.assert_allclose(np.load(os.path.join(d, f"cov{r}.npy")), want, rtol=1e-12, atol=1e-14)
        np.testing.assert_array_equal(
            np.load(os.path.join(d, "corr0.npy")), np.load(os.path.join(d, "corr1.npy"))
        )
