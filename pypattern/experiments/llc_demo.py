"""``run_llc_demo``: train a small MLP on a teacher task, estimate its LLC, print a summary, save a loss-trace plot.

Run as ``python -m pypattern.experiments.llc_demo [out_dir]`` (the ``pypattern llc`` command and ``make demo``
call it).
"""

from __future__ import annotations

import os
import time

import torch

from .. import truth
from .._checks import is_count
from .._threads import pinned_threads
from ..sampling.llc import estimate_llc
from ._outputs import check_outputs
from .user_model import _write

__all__ = ["QUICK", "run_llc_demo"]

#: Tiny sizes for ``pypattern llc --quick``: checks that the demo runs; figures mean nothing.
QUICK = dict(sizes=(8, 32, 4), n=512, train_steps=150, num_draws=40, num_burnin_steps=40, batch_size=64)


def run_llc_demo(
    out_dir: str | os.PathLike = "out/llc",
    *,
    sizes=(32, 128, 128, 10),
    n: int = 4096,
    train_steps: int = 600,
    num_chains: int = 4,
    num_draws: int = 200,
    num_burnin_steps: int = 300,
    step_size: float = 1e-4,
    localization: float = 100.0,
    batch_size: int = 256,
    seed: int = 0,
    quiet: bool = False,
    num_threads: int | None = 1,
) -> dict:
    """Train, estimate the LLC, print a summary and write ``llc_loss_trace.png``, ``llc_result.npz`` and
    ``llc_summary.json`` (the returned dict).

    The model is an MLP ``sizes`` (default 22,026 parameters) trained with Adam on labels from a random teacher
    MLP (:func:`pypattern.truth.make_teacher_task`); the LLC uses SGLD with ``step_size``, ``localization`` and
    devinterp's default ``nbeta = batch_size / ln(batch_size)``. About 5 s on one core. ``num_threads`` sets
    torch's thread count for the duration (small models run fastest, and steadiest on shared machines, on one
    thread; ``None`` leaves it alone).

    Returns
    -------
    dict
        ``llc_mean``, ``llc_std``, ``llc_se``, ``llc_per_chain``, ``init_loss``, ``train_loss``, ``train_accuracy``, ``r_hat``,
        ``ess``, ``num_params``, ``seconds_train``, ``seconds_sampling``, ``plot``, ``result`` and ``summary``
        (paths).

    Raises
    ------
    ValueError
        ``seed`` not an int in ``[0, 2**63)`` or ``train_steps`` negative, naming it, before any work (the other
        settings are checked by the functions they go to, naming them).
    """
    # checked before any work, naming the demo's own arguments (the chains take seeds in [0, 2**63) only)
    if not is_count(seed) or not 0 <= seed < 2**63:
        raise ValueError(f"seed={seed!r} is not valid; give an int in [0, 2**63)")
    if not is_count(train_steps) or train_steps < 0:
        raise ValueError(f"train_steps={train_steps!r} is not valid; give an int >= 0")
    check_outputs(out_dir, ("llc_loss_trace.png", "llc_result.npz", "llc_summary.json"))
    with pinned_threads(num_threads):
        os.makedirs(out_dir, exist_ok=True)
        t0 = time.perf_counter()
        model, ds = truth.make_teacher_task(sizes, n, seed=seed)
        losses = truth.train(model, ds, steps=train_steps, batch_size=batch_size, lr=3e-3, seed=seed)
        with torch.no_grad():
            x, y = ds.tensors
            acc = float((model(x).argmax(-1) == y).float().mean())
        t1 = time.perf_counter()
        g = torch.Generator().manual_seed(seed)
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, generator=g)
        res = estimate_llc(
            model,
            loader,
            num_chains=num_chains,
            num_draws=num_draws,
            num_burnin_steps=num_burnin_steps,
            step_size=step_size,
            localization=localization,
            seed=seed,
            quiet=quiet,
        )
        t2 = time.perf_counter()
        from . import _figures as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        res.plot(ax)
        fig.tight_layout()
        plot_path = os.path.join(out_dir, "llc_loss_trace.png")
        fig.savefig(plot_path, dpi=100)
        plt.close(fig)
        result_path = os.path.join(out_dir, "llc_result.npz")
        res.save(result_path)
        num_params = sum(p.numel() for p in model.parameters())
        summary = dict(
            llc_mean=res.llc_mean,
            llc_std=res.llc_std,
            llc_se=res.llc_se,
            llc_per_chain=res.llc_per_chain.tolist(),
            init_loss=res.init_loss,
            train_loss=losses[-1],
            train_accuracy=acc,
            r_hat=res.r_hat,
            ess=res.ess,
            num_params=num_params,
            seconds_train=t1 - t0,
            seconds_sampling=t2 - t1,
            plot=plot_path,
            result=result_path,
            settings=dict(
                sizes=list(sizes),
                n=n,
                train_steps=train_steps,
                num_chains=num_chains,
                num_draws=num_draws,
                num_burnin_steps=num_burnin_steps,
                step_size=step_size,
                localization=localization,
                nbeta=res.nbeta,
                batch_size=batch_size,
                seed=seed,
            ),
        )
        summary["summary"] = os.path.join(out_dir, "llc_summary.json")
        _write(out_dir, "llc_summary.json", summary)
        print(
            f"MLP {'-'.join(map(str, sizes))} ({num_params:,} parameters) trained {train_steps} steps on a teacher task: "
            f"loss {losses[-1]:.4f}, accuracy {acc:.3f} ({t1 - t0:.1f} s)\n"
            f"LLC = {res.llc_mean:.2f} +- {res.llc_se:.2f} (standard error; std over chains {res.llc_std:.2f}) "
            f"over {num_chains} chains x {num_draws} draws "
            f"after {num_burnin_steps} burn-in steps (step_size {step_size:g}, localization {localization:g}, nbeta {res.nbeta:.1f}; "
            f"per chain {', '.join(f'{v:.2f}' for v in res.llc_per_chain)})\n"
            f"L_n(w*) = {res.init_loss:.4f}; loss-trace R-hat {res.r_hat:.3f}, ESS {res.ess:.0f}; "
            f"sampling {t2 - t1:.1f} s ({'batched' if res.sample.batched else 'sequential'} chains)\n"
            f"wrote {plot_path}, {result_path} and {summary['summary']}"
        )
        return summary


def main(argv=None) -> dict:
    """``python -m pypattern.experiments.llc_demo [out_dir] [--quick] [--seed N]``."""
    import argparse

    from ..cli import seed_int

    ap = argparse.ArgumentParser(
        prog="python -m pypattern.experiments.llc_demo", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("out_dir", nargs="?", default="out/llc", help="folder for the plot, result and summary")
    ap.add_argument(
        "--quick", action="store_true", help="tiny sizes: checks the demo runs; figures mean nothing"
    )
    ap.add_argument(
        "--seed",
        type=seed_int,
        default=0,
        help="seed of the task, the training and the chains (0 .. 2**63 - 1)",
    )
    a = ap.parse_args(argv)
    return run_llc_demo(a.out_dir, seed=a.seed, **(QUICK if a.quick else {}))


if __name__ == "__main__":  # pragma: no cover
    main()
