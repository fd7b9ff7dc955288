"""``step_size="auto"`` on a regular linear regression whose directions are all flat against the localization
(docs/llc_results.md, "Relaxation of the trials"): ``torch.nn.Linear(5, 3)`` at the least-squares minimum of
1,000 points, ``nbeta=0.5``, ``localization=1``; the exact LLC is ``1/2 sum nbeta h / (nbeta h + gamma)`` over the
Hessian's eigenvalues ``h``. Prints it, the estimate with its standard error, the chosen step and the calibration's
reason.

Usage: ``OMP_NUM_THREADS=1 python bench/auto_step_relaxation.py [BATCH_SIZE] [SEED]`` (default 100 and 0; 1000 is
the full batch)."""

import sys

import torch

import pypattern as pp


def main(batch_size: int = 100, seed: int = 0) -> None:
    torch.manual_seed(0)
    din, dout, n, nbeta, loc = 5, 3, 1000, 0.5, 1.0
    x = torch.randn(n, din, dtype=torch.float64) * torch.linspace(0.5, 2, din, dtype=torch.float64)
    y = (
        x @ torch.randn(dout, din, dtype=torch.float64).T
        + 0.5 * torch.randn(n, dout, dtype=torch.float64)
        + 1.0
    )
    xa = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(xa, y).solution
    model = torch.nn.Linear(din, dout)
    with torch.no_grad():
        model.weight.copy_(sol[:din].T)
        model.bias.copy_(sol[din])
    data = torch.utils.data.TensorDataset(x.float(), y.float())
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True)
    h = torch.linalg.eigvalsh(2 * xa.T @ xa / (n * dout)).repeat(dout)
    target = float((nbeta * h / (nbeta * h + loc)).sum() / 2)
    res = pp.estimate_llc(model, loader, nbeta=nbeta, localization=loc, quiet=True, seed=seed)
    step = res.sample.config["step_size"]
    print(f"exact {target:.3f}  estimate {res.llc_mean:.4f} +- {res.llc_se:.4f}  step {step:.3g}")
    print("calibration reason:", res.sample.config["auto_step"]["reason"])


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
