"""The pypattern command.

  pypattern demo              the main job on built-in defaults: which kernel backend runs and the fused SGLD
                              step's speed, a small model's LLC (loss-trace PNG), an activation-patching grid
                              (heatmap PNG + CSV)
  pypattern demo patterning   the patterning experiments (induction onset, parentheses algorithm selection)
  pypattern demo flags        concept flags: train them into a small transformer, steer with them, against a control
  pypattern demo equivalence  interpretive equivalence of algorithmic pipelines: a cached pool of small models,
                              the distinguishability grid (ridge, CKA, Procrustes) and the selectivity curve
                              (grid PNG); `demo interpretive` is the same demo
  pypattern demo cka          layer-by-layer similarity of induction models with and without an induction head
  pypattern llc               train a small model on a teacher task and estimate its LLC;
                              with --model DIR --data FILE: the LLC of your own model on your token file
  pypattern patch             exact and attribution patching on the built-in model and task (heatmap + table);
                              with --model DIR --data FILE: exact patching grids of your own model
  pypattern circuit           edge-level circuit discovery (EAP, EAP-IG, exact scores), pruning curves, drawing
  pypattern chi               per-token susceptibilities of every head, MLP and the embedding of your model
                              (--model DIR --data FILE)
  pypattern backends          which kernel backends are available, and why not

Every run ends with a short summary; full results go to files under --out, whose paths are printed.
--quick runs any demo at tiny sizes (seconds to a minute): a check that it runs, not a measurement.
"""

from __future__ import annotations

import argparse
import contextlib
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


def _user_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument(
        "--model",
        required=required,
        help="a local Hugging Face save_pretrained directory of a class in pypattern.models.convert.SUPPORTED_CLASSES "
        "(GPT-2, GPT-Neo, GPT-NeoX, GPT-J, Llama, Mistral, Phi, Qwen, Gemma, OLMo, OPT, StableLM; safetensors; "
        "nothing is downloaded), converted exactly into pypattern's Transformer",
    )
    p.add_argument(
        "--data",
        required=required,
        help="token ids (num_sequences, seq_len): .npy, .npz (array 'tokens') or a text file with one sequence "
        "of whitespace- or comma-separated ids per line",
    )
    p.add_argument("--float64", action="store_true", help="with --model: run the model in float64")


def _step_size(text: str) -> float | str:
    """``--step-size``: a number > 0 or ``auto``."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number > 0 or 'auto', got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0 or 'auto', got {text!r}")
    return value


def _sampler_args(p: argparse.ArgumentParser, draws: int) -> None:
    p.add_argument(
        "--batch-size", type=int, default=8, help="with --model: sequences per SGLD batch (default: 8)"
    )
    p.add_argument("--num-chains", type=int, default=4, help="with --model: SGLD chains (default: 4)")
    p.add_argument(
        "--num-draws", type=int, default=draws, help=f"with --model: draws per chain (default: {draws})"
    )
    p.add_argument(
        "--step-size",
        type=_step_size,
        default="auto",
        help="with --model: SGLD step size, or 'auto' (the default): chosen by a short calibration, printed",
    )
    p.add_argument(
        "--localization", type=float, default=100.0, help="with --model: pull towards w* (default: 100)"
    )
    p.add_argument(
        "--nbeta", type=float, default=None, help="with --model: inverse temperature (default: m / ln m)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="with --model: seed of noise and data order (default: 0)"
    )


def _user_run(args) -> int:
    """``llc``, ``patch`` or ``chi`` on a user's model directory and token file."""
    import torch

    if not (args.model and args.data):
        raise SystemExit(f"pypattern {args.cmd}: give both --model DIR and --data FILE")
    mod = importlib.import_module("pypattern.experiments.user_model")
    dtype = torch.float64 if args.float64 else None
    if args.cmd == "patch":
        res = mod.run_user_patch(
            args.model,
            args.data,
            args.out,
            corrupted=args.corrupted,
            sites=tuple(s.strip() for s in args.sites.split(",") if s.strip()),
            max_prompts=args.max_prompts,
            dtype=dtype,
        )
        print(
            f"exact patching of {args.model} on {res['prompts']} prompts (metric: KL at the last position):"
        )
        for site, r in res["sites"].items():
            print(f"  {site}: largest effects {[[c, round(v, 6)] for c, v in r['top']]}; table {r['table']}")
        print(f"  summary: {res['summary']}")
        return 0
    kw = dict(
        num_chains=args.num_chains,
        num_draws=args.num_draws,
        step_size=args.step_size,
        localization=args.localization,
        nbeta=args.nbeta,
        seed=args.seed,
        dtype=dtype,
        batch_size=args.batch_size,
    )
    if args.cmd == "llc":
        res = mod.run_user_llc(args.model, args.data, args.out, **kw)
        print(f"LLC of {args.model} on {res['sequences']} sequences of {res['seq_len']} tokens:")
        print(
            f"  llc: {res['llc_mean']:.4g} +- {res['llc_se']:.2g} (standard error; {len(res['llc_per_chain'])} "
            f"chains, std over chains {res['llc_std']:.2g})"
        )
        print(
            f"  step_size: {res['step_size']:.3g}"
            + (f" (auto: {res['auto_step']})" if res["auto_step"] else "")
        )
        print(f"  result: {res['result']}; plot: {res['plot']}; summary: {res['summary']}")
        return 0
    res = mod.run_user_chi(args.model, args.data, args.out, num_probe=args.num_probe, **kw)
    print(
        f"susceptibilities of {args.model}: chi {res['chi_shape'][0]} components x {res['chi_shape'][1]} tokens"
    )
    print(
        f"  step_size: {res['step_size']:.3g}" + (f" (auto: {res['auto_step']})" if res["auto_step"] else "")
    )
    print(
        f"  explained variance ratio of the first directions: {[round(v, 3) for v in res['explained_variance_ratio']]}"
    )
    print(f"  result: {res['result']}; table: {res['table']}; summary: {res['summary']}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pypattern", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    quick_help = "tiny sizes: checks that the demo runs in seconds to a minute; its figures mean nothing"
    d = sub.add_parser(
        "demo",
        help="run a demo on built-in defaults (main, patterning, flags, equivalence or cka)",
        description="Run a demo on built-in defaults and print a short summary; full results go to --out.",
    )
    d.add_argument(
        "what",
        nargs="?",
        default="main",
        choices=["main", "patterning", "flags", "equivalence", "interpretive", "cka"],
        help="which demo: main (backends, SGLD step speed, LLC, patching; the default), patterning "
        "(induction onset and parentheses algorithm selection; minutes), flags (concept flags against a "
        "control), equivalence (interpretive equivalence of algorithmic pipelines: a pool of small models, the "
        "win-counting grid and the selectivity curve; minutes; 'interpretive' is the same demo), cka (CKA "
        "between induction models with and without an induction head)",
    )
    d.add_argument(
        "--out", default="out/demo", help="folder for plots, tables and reports (default: out/demo)"
    )
    size = d.add_mutually_exclusive_group()
    size.add_argument(
        "--full",
        action="store_true",
        help="patterning and equivalence only: full sizes (more seeds and draws) instead of reduced",
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
    _user_args(llc)
    _sampler_args(llc, draws=100)
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
    _user_args(patch)
    patch.add_argument(
        "--corrupted",
        help="with --model: a token file of the same shape as --data holding the corrupted prompts (symmetric "
        "token replacement, recommended); without it the corrupted run adds Gaussian noise to the embeddings",
    )
    patch.add_argument(
        "--sites",
        default="resid_pre,attn_out,mlp_out,z",
        help="with --model: comma-separated sites to patch (default: resid_pre,attn_out,mlp_out,z)",
    )
    patch.add_argument(
        "--max-prompts", type=int, default=8, help="with --model: patch the first N prompts (default: 8)"
    )
    circ = sub.add_parser(
        "circuit",
        help="edge-level circuit discovery (EAP, EAP-IG, exact), pruning curves, circuit drawing",
        description="Score every edge of a model (built-in induction task by default, or a local model), "
        "draw pruning curves and the circuit, and write tables and plots.",
    )
    importlib.import_module("pypattern.circuits.cli").add_arguments(circ)
    chi = sub.add_parser(
        "chi",
        help="per-token susceptibilities of your own model's components (--model DIR --data FILE)",
        description="Susceptibilities (components x probe tokens) of every head, MLP and the embedding of a "
        "local Hugging Face model, sampled on the token file and probed on its first sequences; writes the "
        "result (npz), a table (CSV) and a summary (JSON).",
    )
    chi.add_argument("--out", default="out/chi", help="folder for the result and table (default: out/chi)")
    _user_args(chi, required=True)
    chi.add_argument(
        "--num-probe", type=int, default=8, help="probe on the first N sequences of --data (default: 8)"
    )
    _sampler_args(chi, draws=50)
    sub.add_parser(
        "backends",
        help="list the kernel backends and why any is unavailable",
        description="Print, as JSON, each kernel backend (cuda, triton, cpp, reference): available or why not.",
    )
    return parser


@contextlib.contextmanager
def _model_errors(cmd: str):
    """A model the command does not cover (an architecture not converted, or a method that does not apply to it)
    ends the command with its one-line reason instead of a traceback."""
    from .models.convert import UnsupportedModelError

    try:
        yield
    except (UnsupportedModelError, NotImplementedError) as e:
        raise SystemExit(f"pypattern {cmd}: {e}") from None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    if args.cmd == "backends":
        from . import backends

        print(json.dumps(backends(), indent=2))
        return 0
    if args.cmd == "circuit":
        with _model_errors(args.cmd):
            _print("circuit discovery:", _call("pypattern.circuits.cli", "run_from_args", args))
        return 0
    if args.cmd == "chi" or (args.cmd in ("llc", "patch") and (args.model or args.data)):
        with _model_errors(args.cmd):
            return _user_run(args)
    if args.cmd == "llc":
        print("LLC of a small MLP trained on a teacher task:")
        _llc_demo(args.out, args.quick)
        return 0
    if args.cmd == "patch":
        _patch_demo("activation patching on the built-in model and task:", args.out, args.quick)
        return 0
    if args.full and args.what not in ("patterning", "equivalence", "interpretive"):
        raise SystemExit(f"pypattern demo {args.what}: --full applies to 'patterning' and 'equivalence' only")
    if args.what in ("equivalence", "interpretive"):
        _print(
            "interpretive equivalence of algorithmic pipelines (the win-counting grid and selectivity):",
            _call(
                "pypattern.experiments.interpretive",
                "run_interpretive_demo",
                f"{args.out}/equivalence",
                full=args.full,
                quick=args.quick,
            ),
        )
        return 0
    if args.what == "cka":
        mod = importlib.import_module("pypattern.experiments.equivalence_demo")
        s = mod.EquivalenceDemoSettings.quick() if args.quick else None
        _print(
            "representation similarity of induction models (debiased CKA on induction-predictable tokens):",
            mod.run_equivalence_demo(f"{args.out}/cka", s),
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
