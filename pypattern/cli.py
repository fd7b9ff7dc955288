"""The ``pypattern`` command.

``pypattern demo``              the main job on built-in defaults: which kernel backend runs here and the fused step's
                                speed, a small model's LLC (loss-trace PNG), and an activation-patching grid (heatmap)
``pypattern demo patterning``   the patterning experiments (induction onset, parentheses algorithm), reduced sizes
``pypattern demo flags``        concept flags: train them into a small transformer, steer with them, against a control
``pypattern demo equivalence``  layer-by-layer similarity of induction models with and without an induction head
``pypattern llc``               train a small model on a built-in task and estimate its LLC
``pypattern patch``             exact and attribution patching on the built-in model and task (heatmap + table)
``pypattern backends``          which kernel backends are available here, and why not
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time


def _demo_sgld(steps: int = 200) -> dict:
    """Fused SGLD steps on a small MLP: which backend ran, and its time per step next to the reference's."""
    import torch

    from ._backends import choose
    from .ops.sgld import sgld_step_

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    x, y = torch.randn(256, 64), torch.randint(0, 10, (256,))
    params = list(model.parameters())
    anchors = [p.detach().clone() for p in params]
    loss_fn = torch.nn.CrossEntropyLoss()
    auto = choose("sgld_step_", torch.device("cpu"), None)
    out = {"backend": auto}
    nbeta = 256 / torch.log(torch.tensor(256.0)).item()
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
                    nbeta=nbeta,
                    localization=100.0,
                    seed=0,
                    step=step,
                    backend=name,
                )
        out[f"ms_per_step[{name}] (forward+backward+step)"] = round(
            (time.perf_counter() - t0) / steps * 1e3, 3
        )
    return out


def _call(module: str, fn: str, *args, **kwargs):
    try:
        mod = importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - only on a partial install
        raise SystemExit(f"pypattern: {module} is not available in this install ({e})") from None
    return getattr(mod, fn)(*args, **kwargs)


def _print(title: str, res: dict) -> None:
    print(title)
    for k, v in res.items():
        if isinstance(v, float):
            v = round(v, 5)
        print(f"  {k}: {v}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pypattern", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="run the main job on built-in defaults")
    d.add_argument("what", nargs="?", default="main", choices=["main", "patterning", "flags", "equivalence"])
    d.add_argument("--out", default="out/demo", help="folder for plots and tables")
    d.add_argument("--full", action="store_true", help="patterning: full sizes instead of the reduced demo")
    llc = sub.add_parser("llc", help="estimate the LLC of a small model trained on a built-in task")
    llc.add_argument("--out", default="out/llc")
    patch = sub.add_parser("patch", help="activation + attribution patching on the built-in model and task")
    patch.add_argument("--out", default="out/patch")
    sub.add_parser("backends", help="list kernel backends")
    args = parser.parse_args(argv)

    if args.cmd == "backends":
        from . import backends

        print(json.dumps(backends(), indent=2))
        return 0
    if args.cmd == "llc":
        _print(
            "LLC of a small MLP trained on a teacher task:",
            _call("pypattern.sampling.demo", "run_llc_demo", args.out),
        )
        return 0
    if args.cmd == "patch":
        _print(
            "activation patching on the built-in model and task:",
            _call("pypattern.patching.cli", "run_patch_demo", args.out),
        )
        return 0
    if args.what == "equivalence":
        _print(
            "representation similarity of induction models (debiased CKA on induction-predictable tokens):",
            _call(
                "pypattern.experiments.equivalence_demo", "run_equivalence_demo", f"{args.out}/equivalence"
            ),
        )
        return 0
    if args.what == "flags":
        _print(
            "concept flags (a 3-layer transformer on TopicTask; flags vs a control with the same training steps):",
            _call("pypattern.experiments.flags_demo", "run_flags_demo", f"{args.out}/flags"),
        )
        return 0
    if args.what == "patterning":
        _print(
            "patterning experiments:",
            _call("pypattern.experiments.cli", "run_patterning_demo", args.out, full=args.full),
        )
        return 0
    from . import backends

    print("kernel backends here:", {k: v["available"] for k, v in backends().items()})
    _print("1. fused SGLD step on a 64-256-10 MLP (batch 256, 200 steps):", _demo_sgld())
    _print(
        "2. LLC of a small MLP trained on a teacher task:",
        _call("pypattern.sampling.demo", "run_llc_demo", f"{args.out}/llc"),
    )
    try:
        importlib.import_module("pypattern.patching.cli")
    except ImportError:
        print("3. activation patching: not in this install")
    else:
        _print(
            "3. activation patching on the built-in model and task:",
            _call("pypattern.patching.cli", "run_patch_demo", f"{args.out}/patch"),
        )
    print(f"plots and tables are in {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
