"""The ``pypattern`` command.

``pypattern demo``   the main job on built-in defaults (grows as the library grows)
``pypattern backends`` which kernel backends are available here, and why not
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def _demo_sgld(steps: int = 200) -> dict:
    """Fused SGLD steps on a small MLP: which backend ran, and its time per step next to the reference's."""
    import torch

    from . import backends
    from ._backends import choose
    from .ops.sgld import sgld_step_

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    x, y = torch.randn(256, 64), torch.randint(0, 10, (256,))
    params = [p for p in model.parameters()]
    anchors = [p.detach().clone() for p in params]
    loss_fn = torch.nn.CrossEntropyLoss()
    auto = choose("sgld_step_", torch.device("cpu"), None)
    out = {"backend": auto, "backends": {k: v["available"] for k, v in backends().items()}}
    init = loss_fn(model(x), y).item()
    for name in dict.fromkeys([auto, "reference"]):
        with torch.no_grad():
            for p, a in zip(params, anchors):
                p.copy_(a)
        t0 = time.perf_counter()
        for step in range(steps):
            model.zero_grad(set_to_none=False)
            loss = loss_fn(model(x), y)
            loss.backward()
            with torch.no_grad():
                sgld_step_(
                    [p.data for p in params],
                    [p.grad for p in params],
                    anchors,
                    step_size=1e-4,
                    nbeta=256 / torch.log(torch.tensor(256.0)).item(),
                    localization=100.0,
                    seed=0,
                    step=step,
                    backend=name,
                )
        dt = (time.perf_counter() - t0) / steps
        out[f"ms_per_step[{name}]"] = round(dt * 1e3, 3)
        out[f"final_loss[{name}]"] = round(loss.item(), 5)
    out["initial_loss"] = round(init, 5)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pypattern", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("demo", help="run the main job on built-in defaults")
    sub.add_parser("backends", help="list kernel backends")
    args = parser.parse_args(argv)
    if args.cmd == "backends":
        from . import backends

        print(json.dumps(backends(), indent=2))
        return 0
    if args.cmd == "demo":
        res = _demo_sgld()
        print("fused SGLD step on a 64-256-10 MLP (batch 256, 200 steps, forward+backward included):")
        for k, v in res.items():
            print(f"  {k}: {v}")
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
