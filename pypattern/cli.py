"""The pypattern command.

  pypattern demo              the main job on built-in defaults: which kernel backend runs and the fused SGLD
                              step's speed, a small model's LLC (loss-trace PNG), an activation-patching grid
                              (heatmap PNG + CSV)
  pypattern demo patterning   the patterning experiments (induction onset, parentheses algorithm selection)
  pypattern demo flags        concept flags: train them into a small transformer, steer with them, against a control
  pypattern demo equivalence  layer-by-layer similarity of induction models with and without an induction head
  pypattern llc               train a small model on a teacher task and estimate its LLC
  pypattern patch             exact and attribution patching on the built-in model and task (heatmap + table)
  pypattern backends          which kernel backends are available, and why not

Every run ends with a short summary; full results go to files under --out, whose paths are printed.
--quick runs any demo at tiny sizes (seconds to a minute): a check that it runs, not a measurement.
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
    """A title and one ``key: value`` line per entry (floats rounded)."""
    print(title)
    for k, v in res.items():
        if isinstance(v, float):
            v = round(v, 5)
        print(f"  {k}: {v}")


def _llc_demo(out: str, quick: bool) -> None:
    # run_llc_demo prints its own summary; only where the full result went is added
    kw = importlib.import_module("pypattern.experiments.llc_demo").QUICK if quick else {}
    res = _call("pypattern.experiments.llc_demo", "run_llc_demo", out, **kw)
    print(f"  full result (LLCResult.load): {res['result']}; loss-trace plot: {res['plot']}")


def _patch_demo(title: str, out: str, quick: bool) -> None:
    kw = importlib.import_module("pypattern.experiments.patching_demo").QUICK if quick else {}
    _print(title, _call("pypattern.experiments.patching_demo", "run_patch_demo", out, **kw))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pypattern", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    quick_help = "tiny sizes: checks that the demo runs in seconds to a minute; its figures mean nothing"
    d = sub.add_parser(
        "demo",
        help="run a demo on built-in defaults (main, patterning, flags or equivalence)",
        description="Run a demo on built-in defaults and print a short summary; full results go to --out.",
    )
    d.add_argument(
        "what",
        nargs="?",
        default="main",
        choices=["main", "patterning", "flags", "equivalence"],
        help="which demo: main (backends, SGLD step speed, LLC, patching; the default), patterning "
        "(induction onset and parentheses algorithm selection; minutes), flags (concept flags against a "
        "control), equivalence (CKA between induction models)",
    )
    d.add_argument(
        "--out", default="out/demo", help="folder for plots, tables and reports (default: out/demo)"
    )
    size = d.add_mutually_exclusive_group()
    size.add_argument(
        "--full",
        action="store_true",
        help="patterning only: full sizes (more seeds and draws) instead of reduced",
    )
    size.add_argument("--quick", action="store_true", help=quick_help)
    llc = sub.add_parser(
        "llc",
        help="estimate the LLC of a small MLP trained on a teacher task",
        description="Train a small MLP on a random teacher's labels, estimate its LLC with SGLD, and save the "
        "result (npz) and a loss-trace plot.",
    )
    llc.add_argument("--out", default="out/llc", help="folder for the result and the plot (default: out/llc)")
    llc.add_argument("--quick", action="store_true", help=quick_help)
    patch = sub.add_parser(
        "patch",
        help="activation and attribution patching on the built-in model and task",
        description="Train the built-in transformer on an IOI-like task, patch resid_pre and every head "
        "exactly and with AtP*, and write a heatmap (PNG) and a table (CSV).",
    )
    patch.add_argument(
        "--out", default="out/patch", help="folder for the heatmap and table (default: out/patch)"
    )
    patch.add_argument("--quick", action="store_true", help=quick_help)
    sub.add_parser(
        "backends",
        help="list the kernel backends and why any is unavailable",
        description="Print, as JSON, each kernel backend (cuda, triton, cpp, reference): available or why not.",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    if args.cmd == "backends":
        from . import backends

        print(json.dumps(backends(), indent=2))
        return 0
    if args.cmd == "llc":
        print("LLC of a small MLP trained on a teacher task:")
        _llc_demo(args.out, args.quick)
        return 0
    if args.cmd == "patch":
        _patch_demo("activation patching on the built-in model and task:", args.out, args.quick)
        return 0
    if args.full and args.what != "patterning":
        raise SystemExit(f"pypattern demo {args.what}: --full applies to 'patterning' only")
    if args.what == "equivalence":
        mod = importlib.import_module("pypattern.experiments.equivalence_demo")
        s = mod.EquivalenceDemoSettings.quick() if args.quick else None
        _print(
            "representation similarity of induction models (debiased CKA on induction-predictable tokens):",
            mod.run_equivalence_demo(f"{args.out}/equivalence", s),
        )
        return 0
    if args.what == "flags":
        mod = importlib.import_module("pypattern.experiments.flags_demo")
        s = mod.FlagsDemoSettings.quick() if args.quick else None
        _print(
            "concept flags (a transformer on TopicTask; flags vs a control with the same training steps):",
            mod.run_flags_demo(f"{args.out}/flags", s),
        )
        return 0
    if args.what == "patterning":
        mod = importlib.import_module("pypattern.experiments.patterning_demo")
        res = mod.run_patterning_demo(args.out, full=args.full, quick=args.quick)
        _print("patterning experiments:", mod.headline(res))
        return 0
    from . import backends

    print("kernel backends available:", {k: v["available"] for k, v in backends().items()})
    steps = 20 if args.quick else 200
    _print(f"1. fused SGLD step on a 64-256-10 MLP (batch 256, {steps} steps):", _demo_sgld(steps))
    print("2. LLC of a small MLP trained on a teacher task:")
    _llc_demo(f"{args.out}/llc", args.quick)
    _patch_demo("3. activation patching on the built-in model and task:", f"{args.out}/patch", args.quick)
    print(f"plots and tables are in {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
