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
--seed N (an integer >= 0; default 0) sets the seed of `demo`, `demo flags` and the built-in `llc` and `patch`
(as --seed of python -m pypattern.experiments.llc_demo and patching_demo does); with --model, that of the sampler
(llc, chi) or of the Gaussian noise of the corrupted run (patch).
--threads N sets torch's thread count for any command that computes; with --model, --device DEV (cpu, cuda or
cuda:<index>) is where the model runs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import sys
import time

from ._progress import Terminated, sigterm_as_interrupt


def _demo_sgld(steps: int = 200, seed: int = 0) -> dict:
    """Fused SGLD steps on a small MLP: which backend ran, and its time per step next to the reference's.
    ``seed``: of the MLP, its data and the SGLD noise."""
    import torch

    from ._backends import choose
    from .ops.sgld import sgld_step_

    torch.manual_seed(seed)
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
                    seed=seed,
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


def _llc_demo(out: str, quick: bool, quiet: bool = False, seed: int = 0) -> None:
    # run_llc_demo prints its own summary; only where the full result went is added
    kw = importlib.import_module("pypattern.experiments.llc_demo").QUICK if quick else {}
    res = _call("pypattern.experiments.llc_demo", "run_llc_demo", out, quiet=quiet, seed=seed, **kw)
    print(f"  full result (LLCResult.load): {res['result']}; loss-trace plot: {res['plot']}")


def _patch_demo(title: str, out: str, quick: bool, seed: int = 0) -> None:
    kw = importlib.import_module("pypattern.experiments.patching_demo").QUICK if quick else {}
    _print(title, _call("pypattern.experiments.patching_demo", "run_patch_demo", out, seed=seed, **kw))


# ----------------------------------------------------------------------------------------------------------------
# argument types: every count, rate and list is checked when it is parsed, so errors name the flag
# ----------------------------------------------------------------------------------------------------------------
def _int_at_least(lo: int):
    """An argparse type: an ``int >= lo``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < lo:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {text!r}")
        return value

    parse.__name__ = "positive_int" if lo == 1 else "nonnegative_int"
    return parse


positive_int = _int_at_least(1)  # every count flag
nonnegative_int = _int_at_least(0)


def seed_int(text: str) -> int:
    """An argparse type: a seed, an ``int`` in ``[0, 2**63)``."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**63), got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number ``> 0``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A number in ``(0, 1]``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}")
    return value


def _step_size(text: str) -> float | str:
    """``--step-size``: a number > 0 or ``auto``."""
    if text == "auto":
        return text
    try:
        return positive_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be a number > 0 or 'auto', got {text!r}") from None


def device_type(text: str):
    """``--device``: ``cpu``, ``cuda`` or ``cuda:<index>`` that exists here (a ``torch.device``)."""
    from .circuits.cli import check_device

    try:
        return check_device(text, "--device")
    except ValueError as e:
        message, name = str(e), f"--device {text!r}"
        raise argparse.ArgumentTypeError(
            repr(text) + message[len(name) :] if message.startswith(name) else message
        ) from None


#: the default of --threads, by the runs a command makes (a local model; the built-in demo)
_THREADS_DEFAULT = {
    "model": "torch's own count, which follows OMP_NUM_THREADS",
    "both": "with --model torch's own count, which follows OMP_NUM_THREADS; the built-in demo's own: 1",
    "demo": "each demo's own: 1 while it trains and samples",
}


def _compute_args(p: argparse.ArgumentParser, runs: str) -> None:
    """``--threads`` (every command that computes) and, where a command runs a local model, ``--device`` (where
    the model runs). ``runs``: a key of :data:`_THREADS_DEFAULT`."""
    _flag(
        p,
        "--threads",
        type=positive_int,
        metavar="N",
        help=f"torch's thread count while the command runs (default: {_THREADS_DEFAULT[runs]})",
    )
    device = runs != "demo"
    if device:
        _flag(
            p,
            "--device",
            type=device_type,
            metavar="DEV",
            applies=MODEL_ONLY,
            help="with --model: where the model runs: cpu (the default), cuda or cuda:<index>",
        )


def _sites(text: str) -> tuple[str, ...]:
    """``--sites``: a non-empty comma-separated list of patching sites."""
    from .patching import SITES

    sites = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    if not sites:
        raise argparse.ArgumentTypeError(
            f"give one or more of {', '.join(SITES)} (comma-separated), got {text!r}"
        )
    bad = [s for s in sites if s not in SITES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown site(s) {', '.join(bad)}; choose from {', '.join(SITES)}")
    return sites


# ----------------------------------------------------------------------------------------------------------------
# flags that apply with --model/--data only (or without them only): their defaults are filled in after parsing,
# so that a flag given where it does not apply is refused instead of ignored
# ----------------------------------------------------------------------------------------------------------------
MODEL_ONLY, DEMO_ONLY = "model", "demo"


def _flag(p: argparse.ArgumentParser, *names: str, default=None, applies: str | None = None, **kw):
    """``p.add_argument`` with the default filled in after parsing (see :func:`_resolve`); ``applies``: "model"
    (with --model/--data only) or "demo" (the built-in demo or task only)."""
    action = p.add_argument(*names, default=None, **kw)
    if not hasattr(p, "deferred"):
        p.deferred = {}
    p.deferred[action.dest] = (names[0], default, applies)
    return action


def _apply(flags: list) -> str:
    return "applies" if len(flags) == 1 else "apply"


#: the options that take a path: option, the ``args`` attributes it sets, and what the path names
PATH_OPTIONS = (
    ("--model", ("model", "model_dir"), "directory"),
    ("--data", ("data", "tokens"), "file"),
    ("--corrupted", ("corrupted",), "file"),
    ("--out", ("out",), "folder"),
    ("--checkpoint", ("checkpoint",), "folder"),
)


def refuse_empty_paths(p: argparse.ArgumentParser, args) -> None:
    """Refuse (through ``p.error``) a path option given as an empty string, naming the option: an empty path is
    no folder or file (joined to a file name it would name one in the filesystem root)."""
    for flag, dests, what in PATH_OPTIONS:
        if any(getattr(args, d, None) == "" for d in dests):
            p.error(f"{flag} is empty: give a {what} path")


def _resolve(p: argparse.ArgumentParser, args) -> None:
    """Refuse empty paths and flags given where they do not apply, then fill in the defaults of the flags not
    given."""
    refuse_empty_paths(p, args)
    deferred = getattr(p, "deferred", {})
    model = getattr(args, "model", None) or getattr(args, "model_dir", None)
    data = getattr(args, "data", None) or getattr(args, "tokens", None)
    if "model" in vars(args) or "model_dir" in vars(args):
        if model and not data:
            p.error("--model needs --data FILE (the token or prompt file to run the model on)")
        if data and not model:
            p.error("--data needs --model DIR (the model to run on it)")
    given = {dest for dest in deferred if getattr(args, dest) is not None}
    args.given = given
    if not model:
        wrong = [deferred[d][0] for d in deferred if d in given and deferred[d][2] == MODEL_ONLY]
        if wrong:
            p.error(
                f"{', '.join(wrong)} {_apply(wrong)} only with --model DIR --data FILE (not to the built-in demo)"
            )
    else:
        wrong = [deferred[d][0] for d in deferred if d in given and deferred[d][2] == DEMO_ONLY]
        if wrong:
            p.error(
                f"{', '.join(wrong)} {_apply(wrong)} only to the built-in demo, not with --model DIR --data FILE"
            )
    for dest, (_, default, _) in deferred.items():
        if dest not in given:
            setattr(args, dest, default)
    chains, draws = getattr(args, "num_chains", None), getattr(args, "num_draws", None)
    if getattr(args, "cmd", None) == "chi" and chains is not None and draws is not None and draws < 2:
        # the covariance is taken over each chain's own draws: more chains do not make up for it
        total = chains * draws
        p.error(
            f"--num-draws {draws} is too few: chi is a covariance over each chain's draws and needs at least 2 "
            f"draws per chain (--num-chains {chains} x --num-draws {draws} gives {total} draw"
            f"{'' if total == 1 else 's'}, {draws} per chain); give --num-draws 2 or more"
        )


def _user_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument(
        "--model",
        required=required,
        metavar="DIR",
        help="a local Hugging Face save_pretrained directory of a class in pypattern.models.convert.SUPPORTED_CLASSES "
        "(GPT-2, GPT-Neo, GPT-NeoX, GPT-J, Llama, Mistral, Mixtral, Phi, Qwen, Gemma, OLMo, OPT, StableLM, "
        "StarCoder2, GPT-BigCode, Granite, BLOOM and more; safetensors; "
        "nothing is downloaded), converted exactly into pypattern's Transformer; a bfloat16 or float16 checkpoint "
        "runs as its exact float32 copy (with a warning); or a folder of a pypattern Transformer (config.json "
        "with TransformerConfig's fields, and weights.npz or model.safetensors)",
    )
    p.add_argument(
        "--data",
        required=required,
        metavar="FILE",
        help="token ids (num_sequences, seq_len): .npy, .npz (its array 'tokens', or its only array; 2-D, a flat 1-D "
        "array is refused) or a UTF-8 text file (.txt, .csv, .tsv) with one sequence of whitespace- or "
        "comma-separated ids per line (no empty cells); other suffixes, a file without a suffix and a binary file "
        "named as text are refused",
    )
    _flag(
        p, "--float64", action="store_true", applies=MODEL_ONLY, help="with --model: run the model in float64"
    )


def _sampler_args(
    p: argparse.ArgumentParser, draws: int, quiet_help: str, demo_seed: str | None = None
) -> None:
    """The sampler's options, each applying with --model only; ``demo_seed``: what --seed seeds in the built-in
    demo, which takes it too (None: --seed applies with --model only, as the other options)."""
    m = MODEL_ONLY
    _flag(
        p,
        "--batch-size",
        type=positive_int,
        default=8,
        applies=m,
        help="with --model: sequences per SGLD batch (default: 8)",
    )
    _flag(
        p,
        "--num-chains",
        type=positive_int,
        default=4,
        applies=m,
        help="with --model: SGLD chains (default: 4)",
    )
    _flag(
        p,
        "--num-draws",
        type=positive_int,
        default=draws,
        applies=m,
        help=f"with --model: draws per chain (default: {draws})",
    )
    _flag(
        p,
        "--num-burnin-steps",
        type=nonnegative_int,
        default=draws,
        applies=m,
        help=f"with --model: SGLD steps per chain before the first draw, not recorded (default: {draws}, and with "
        "the auto step as many as that step needs for the chains to relax from w* when more)",
    )
    _flag(
        p,
        "--step-size",
        type=_step_size,
        default="auto",
        applies=m,
        help="with --model: SGLD step size, or 'auto' (the default): chosen by a short calibration, printed",
    )
    _flag(
        p,
        "--localization",
        type=positive_float,
        default=100.0,
        applies=m,
        help="with --model: pull towards w* (default: 100)",
    )
    _flag(
        p,
        "--nbeta",
        type=positive_float,
        applies=m,
        help="with --model: inverse temperature (default: m / ln m)",
    )
    _flag(
        p,
        "--seed",
        type=seed_int,
        default=0,
        metavar="N",
        applies=None if demo_seed else m,
        help=(f"the built-in demo's seed ({demo_seed}) or, with --model, " if demo_seed else "with --model: ")
        + "seed of noise and data order, an integer in [0, 2**63) (default: 0)",
    )
    _flag(
        p,
        "--checkpoint",
        metavar="DIR",
        applies=m,
        help="with --model: a folder keeping the sampler's state as the run goes; the same command with the same "
        "folder resumes a killed run, and a run with other settings, model or data is refused",
    )
    p.add_argument("--quiet", action="store_true", help=quiet_help)


def _warn_larger(flag: str, value: int, n: int, what: str) -> None:
    import warnings

    warnings.warn(
        f"{flag} {value} is more than the {n} sequences in --data: {what} all {n}", UserWarning, stacklevel=2
    )


def _user_run(args) -> int:
    """``llc``, ``patch`` or ``chi`` on a user's model directory and token file."""
    import torch

    mod = importlib.import_module("pypattern.experiments.user_model")
    # the file is checked before the model is converted, and read once; an .npz's attention_mask with it
    tokens, mask = mod.load_tokens(args.data, with_mask=True)
    n = len(tokens)
    if "batch_size" in args.given and args.batch_size > n:
        _warn_larger("--batch-size", args.batch_size, n, "one batch of")
    dtype = torch.float64 if args.float64 else None
    if args.cmd == "patch":
        if args.corrupted is not None:  # as --data: checked before the model is converted (after its name)
            from .circuits.cli import _check_model_folder

            _check_model_folder(args.model, "--model")
            _, corr_mask = mod.load_tokens(args.corrupted, argument="corrupted", with_mask=True)
            mod.check_same_mask(args.corrupted, corr_mask, args.data, mask)
        if "max_prompts" in args.given and args.max_prompts > n:
            _warn_larger("--max-prompts", args.max_prompts, n, "patching")
        res = mod.run_user_patch(
            args.model,
            args.data,
            args.out,
            corrupted=args.corrupted,
            sites=args.sites if "sites" in args.given else None,  # the default: those the model has
            max_prompts=args.max_prompts,
            dtype=dtype,
            seed=args.seed,
            tokens=tokens,
            checkpoint=args.checkpoint,
            quiet=args.quiet,
            device=args.device,
            attention_mask=mask,
        )
        where = "the last position" if mask is None else "each prompt's last real token"
        print(f"exact patching of {args.model} on {res['prompts']} prompts (metric: KL at {where}):")
        for site, r in res["sites"].items():
            kind = "normalised: 1 = clean run restored" if r["normalized"] else "raw change in KL"
            print(
                f"  {site}: largest effects ({kind}, as in the table) {[[c, round(v, 6)] for c, v in r['top']]}; "
                f"table {r['table']}"
            )
        print(f"  summary: {res['summary']}")
        return 0
    kw = dict(
        num_chains=args.num_chains,
        num_draws=args.num_draws,
        # none given with the auto step: the estimator's rule (at least the draws' steps)
        num_burnin_steps=None
        if "num_burnin_steps" not in args.given and args.step_size == "auto"
        else args.num_burnin_steps,
        step_size=args.step_size,
        localization=args.localization,
        nbeta=args.nbeta,
        seed=args.seed,
        dtype=dtype,
        batch_size=args.batch_size,
        checkpoint=args.checkpoint,
        quiet=args.quiet,
        tokens=tokens,
        device=args.device,  # --device: where the model loaded from --model runs
        attention_mask=mask,
    )
    if args.cmd == "llc":
        res = mod.run_user_llc(args.model, args.data, args.out, **kw)
        print(f"LLC of {args.model} on {res['sequences']} sequences of {res['seq_len']} tokens:")
        print(f"  llc: {res['llc_text']}")
        print(
            f"  step_size: {res['step_size']:.3g}"
            + (f" (auto: {res['auto_step']})" if res["auto_step"] else "")
            + f"; burn-in {res['num_burnin_steps']} steps"
        )
        print(f"  result: {res['result']}; plot: {res['plot']}; summary: {res['summary']}")
        return 0
    if "num_probe" in args.given and args.num_probe > n:
        _warn_larger("--num-probe", args.num_probe, n, "probing")
    res = mod.run_user_chi(args.model, args.data, args.out, num_probe=args.num_probe, **kw)
    print(
        f"susceptibilities of {args.model}: chi {res['chi_shape'][0]} components x {res['chi_shape'][1]} tokens"
    )
    print(
        f"  step_size: {res['step_size']:.3g}"
        + (f" (auto: {res['auto_step']})" if res["auto_step"] else "")
        + f"; burn-in {res['num_burnin_steps']} steps"
    )
    print(
        f"  explained variance ratio of the first directions: {[round(v, 3) for v in res['explained_variance_ratio']]}"
    )
    print(f"  result: {res['result']}; table: {res['table']}; summary: {res['summary']}")
    return 0


class _Parser(argparse.ArgumentParser):
    """An argument parser that reads every negative number as a value, not as an option: argparse itself (before
    Python 3.13) takes only ``-3`` and ``-.5`` for numbers, so ``--step-size -1e-4`` or ``--nbeta -inf`` would end
    in "expected one argument" instead of the option's own check saying what it expects. No option of the command
    starts with a digit, ``.``, ``inf`` or ``nan``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\.?\d|inf(inity)?$|nan$)", re.IGNORECASE)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
    _flag(
        d,
        "--seed",
        type=seed_int,
        default=0,
        metavar="N",
        help="main and flags only: the demo's seed, an integer in [0, 2**63) (default: 0). main: the fused step's "
        "MLP, data and noise, the LLC part's task, training and chains, and the patching part's model, training "
        "and prompts (as python -m pypattern.experiments.llc_demo and patching_demo with --seed N); flags: the "
        "model, training and steering samples (FlagsDemoSettings.seed). patterning, equivalence and cka run "
        "several seeds of their own and take no --seed",
    )
    _compute_args(d, "demo")
    llc = sub.add_parser(
        "llc",
        help="estimate the LLC of a small MLP trained on a teacher task, or of your model (--model, --data)",
        description="Train a small MLP on a random teacher's labels, estimate its LLC with SGLD, and save the "
        "result (npz) and a loss-trace plot; with --model DIR --data FILE: the LLC of your own model on your "
        "token file (the flags marked 'with --model' apply only then), with a summary (llc_summary.json: llc_mean, "
        "llc_std and llc_se over chains, llc_per_chain; a value that is undefined, such as llc_std and llc_se of "
        "one chain, is null).",
    )
    llc.add_argument("--out", default="out/llc", help="folder for the result and the plot (default: out/llc)")
    _flag(llc, "--quick", action="store_true", applies=DEMO_ONLY, help=f"built-in demo only: {quick_help}")
    _user_args(llc)
    _sampler_args(
        llc,
        draws=100,
        quiet_help="no progress bars",
        demo_seed="its task, training and chains, as --seed of python -m pypattern.experiments.llc_demo",
    )
    _compute_args(llc, "both")
    patch = sub.add_parser(
        "patch",
        help="activation and attribution patching on the built-in model and task, or on your model",
        description="Train the built-in transformer on an IOI-like task, patch resid_pre and every head "
        "exactly and with attribution patching (AtP), and write a heatmap (PNG) and a table (CSV); with --model DIR "
        "--data FILE: exact "
        "patching grids of your own model (the flags marked 'with --model' apply only then).",
    )
    patch.add_argument(
        "--out", default="out/patch", help="folder for the heatmap and table (default: out/patch)"
    )
    _flag(patch, "--quick", action="store_true", applies=DEMO_ONLY, help=f"built-in demo only: {quick_help}")
    _user_args(patch)
    _flag(
        patch,
        "--corrupted",
        metavar="FILE",
        applies=MODEL_ONLY,
        help="with --model: a token file of the same shape as --data holding the corrupted prompts (symmetric "
        "token replacement, recommended); without it the corrupted run adds Gaussian noise to the embeddings",
    )
    _flag(
        patch,
        "--sites",
        type=_sites,
        default=("resid_pre", "attn_out", "mlp_out", "z"),
        applies=MODEL_ONLY,
        help="with --model: comma-separated sites to patch (default: resid_pre,attn_out,mlp_out,z)",
    )
    _flag(
        patch,
        "--max-prompts",
        type=positive_int,
        default=8,
        applies=MODEL_ONLY,
        help="with --model: patch the first N prompts (default: 8; more than --data holds: all, with a warning)",
    )
    _flag(
        patch,
        "--checkpoint",
        metavar="DIR",
        applies=MODEL_ONLY,
        help="with --model: a folder keeping each site's finished cells as the grid goes (patch_<site>.npz); the "
        "same command with the same folder resumes a stopped run (Ctrl-C or SIGTERM), and a run with other "
        "settings, model or data is refused",
    )
    _flag(
        patch,
        "--seed",
        type=seed_int,
        default=0,
        metavar="N",
        help="the built-in demo's seed (its model, training and prompts, as --seed of python -m "
        "pypattern.experiments.patching_demo) or, with --model and no --corrupted, the seed of the Gaussian noise "
        "of the corrupted run; an integer in [0, 2**63) (default: 0)",
    )
    _flag(
        patch,
        "--quiet",
        action="store_true",
        default=False,
        applies=MODEL_ONLY,
        help="with --model: no progress bars",
    )
    _compute_args(patch, "both")
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
        "result (npz), a table (CSV, one row per component) and a summary (JSON; a value that is undefined is "
        "null).",
    )
    chi.add_argument("--out", default="out/chi", help="folder for the result and table (default: out/chi)")
    _user_args(chi, required=True)
    _flag(
        chi,
        "--num-probe",
        type=positive_int,
        default=8,
        help="probe on the first N sequences of --data (default: 8; more than --data holds: all, with a warning)",
    )
    _sampler_args(chi, draws=50, quiet_help="no progress bars")
    _compute_args(chi, "model")
    be = sub.add_parser(
        "backends",
        help="list the kernel backends and why any is unavailable",
        description="Print, as JSON, each kernel backend (cuda, triton, cpp, reference) of an op: available or "
        "why not.",
    )
    be.add_argument(
        "--op",
        default="sgld_step_",
        help="the operator (default: sgld_step_); 'all' for every pypattern operator, keyed by name",
    )
    parser.commands = sub.choices
    return parser


#: errors that end a command with one line (``pypattern <command>: error: <message>``, exit status 2) instead of a
#: traceback; PYPATTERN_DEBUG=1 shows the traceback. The library's own errors derive from these (UnsupportedModelError,
#: io.FormatError and io.FingerprintMismatch from ValueError, SamplingDivergedError from FloatingPointError).
#: the options behind a checkpoint's fingerprint items whose names are the library's (a refused resume names them)
_CHECKPOINT_FLAGS = {
    "n": "--num-probe or --data: another number of probe tokens",
    "probe": "--num-probe or --data: other probe sequences",
    "sampling_batch": "--batch-size or --data: another sampling batch",
    "weights": "--model or --float64: other weights or another dtype",
    "buffers": "--model or --float64: other buffers or another dtype",
    "architecture": "--model or --float64: another model or dtype",
    "dtype": "--float64: another dtype",
    "moving": "--model or --float64: another model (other parameters sampled) or dtype",
    "data": "--data or --batch-size: other data or batches",
    "num_chains": "--num-chains: another number of chains",
    "chains": "--num-chains: another number of chains",
    "num_draws": "--num-draws: another number of draws per chain",
    "num_burnin_steps": "--num-burnin-steps: another number of burn-in steps",
    "seed": "--seed: another seed",
    "step_size": "--step-size: another step size, or with 'auto' another step chosen on other data or model",
    "localization": "--localization: another localization",
    "nbeta": "--nbeta: another inverse temperature",
}

#: the same for ``patch`` and ``circuit``, whose checkpoints fingerprint the prompts, the metric and (circuit) the
#: edge graph and the scores; they take no --float64 (circuit) and no sampler options
_COMMAND_CHECKPOINT_FLAGS = {
    "patch": {
        "clean": "--data or --max-prompts: other prompts",
        "corrupted": "--corrupted: other corrupted prompts, or Gaussian noise (no --corrupted) against a file",
        "corruption": "--seed: the Gaussian noise of the corrupted run drawn with another seed",
        "metric": "--model or --float64: other weights or another dtype (the clean run's logits differ)",
        "attention_mask": "--data: another attention_mask array (other padding)",
    },
    "circuit": {
        "clean": "--data: other prompts",
        "corrupted": "--corrupted or --data: other corrupted prompts",
        "metric": "--model or --data: another model (other top predictions) or other answers",
        "ablation": "--corrupted or --data: corrupted prompts (resample ablation) against none (mean ablation)",
        "edges": "--per-position or --model: another edge graph",
        "scores": "--methods or --ig-steps: other methods' scores (or another --model, --data or --corrupted)",
        "weights": "--model: other weights",
        "buffers": "--model: other buffers",
        "architecture": "--model: another model",
        "moving": "--model: another model",
        "attention_mask": "--data or --corrupted: another attention_mask array (other padding)",
    },
}

USER_ERRORS = (ValueError, TypeError, OSError, RuntimeError, FloatingPointError, MemoryError)

#: the library functions' names of the values the command line takes as options
_OPTION_OF = {
    "data": "--data",
    "tokens": "--data",  # the circuit command's prompt file
    "corrupted": "--corrupted",
    "model_dir": "--model",
    "out": "--out",
    "op": "--op",
}
_NAMED_VALUE = re.compile(r"(?<![\w.-])(" + "|".join(_OPTION_OF) + r")=(?=['\"])")


def _as_flags(message: str) -> str:
    """A library error as the command line's user reads it: a file named ``data='t.npy'`` (the function's
    argument) is named ``--data 't.npy'`` (the option it came from)."""
    return _NAMED_VALUE.sub(lambda m: _OPTION_OF[m.group(1)] + " ", message)


#: the sampler's settings that the sampling commands take as options (warnings name the settings)
_SAMPLER_OPTION_OF = {
    "num_burnin_steps": "--num-burnin-steps",
    "num_draws": "--num-draws",
    "num_chains": "--num-chains",
    "step_size": "--step-size",
    "localization": "--localization",
    "nbeta": "--nbeta",
}
_SETTING = re.compile(r"(?<![\w.-])(" + "|".join(_SAMPLER_OPTION_OF) + r")(=('?)([^\s,;)']+)\3)?(?![\w(])")
#: settings the library has and the command line does not
_LIBRARY_ONLY = re.compile(
    r"(?<![\w.-])(num_steps_bw_draws|warn_nonstationary=False|calibrate_step_size)(?![\w=])"
)


def _warning_as_flags(message: str, options) -> str:
    """A library warning as the command line's user reads it: a setting the command takes as an option is named by
    it (``num_burnin_steps`` as ``--num-burnin-steps``, ``step_size=1e-06`` as ``--step-size 1e-06``,
    ``step_size='auto'`` as ``--step-size auto``), one it does not take is marked as the library's."""

    def flag(m: re.Match) -> str:
        opt = _SAMPLER_OPTION_OF[m.group(1)]
        if opt not in options:
            return m.group(0)
        return opt if m.group(2) is None else f"{opt} {m.group(4)}"

    message = _SETTING.sub(flag, message)
    return _LIBRARY_ONLY.sub(
        lambda m: (
            f"{m.group(1)} [a library {'function' if m.group(1).startswith('calibrate') else 'setting'}, no "
            "option]"
        ),
        message,
    )


def _options_that_apply(p: argparse.ArgumentParser, args) -> set[str]:
    """The options of ``p`` the run takes: without --model those marked 'with --model' are left out (the built-in
    demo refuses them), with --model those of the built-in demo only; warnings name only these."""
    model = getattr(args, "model", None) or getattr(args, "model_dir", None)
    refused = DEMO_ONLY if model else MODEL_ONLY
    options = set(p._option_string_actions)
    for dest, (_, _, applies) in getattr(p, "deferred", {}).items():
        if applies == refused:
            action = next(a for a in p._actions if a.dest == dest)
            options.difference_update(action.option_strings)
    return options


def _check_paths(p: argparse.ArgumentParser, args) -> None:
    """The output folders (--out, --checkpoint) are created before any work, and refused (through ``p.error``)
    when they cannot be: an existing file, a path below a file, a folder that cannot be written in."""
    from .experiments.user_model import out_folder

    paths = [("--out", getattr(args, "out", None)), ("--checkpoint", getattr(args, "checkpoint", None))]
    paths += [("--out", folder) for folder in _demo_folders(args)]  # a demo's own folders below --out
    for flag, path in paths:
        if path is not None:
            try:
                out_folder(path, flag)
            except ValueError as e:
                p.error(str(e))
    _refuse_inputs_among_outputs(p, args)


#: the files each command writes: into --out, and into --checkpoint (names as regular expressions; {site}: any
#: patching site)
_WRITTEN = {
    "llc": {"--out": r"llc\.npz|llc_trace\.png|llc_summary\.json", "--checkpoint": r"llc_checkpoint\.npz"},
    "chi": {
        "--out": r"chi\.npz|chi\.csv|chi_summary\.json",
        "--checkpoint": r"(component\..+|sampling\..+|step_size_calibration)\.npz",
    },
    "patch": {
        "--out": r"patch_{site}\.csv|patch_summary\.json",
        "--checkpoint": r"patch_{site}\.npz",
    },
    "circuit": {
        "--out": r"edge_scores\.csv|circuit\.csv|circuit\.png|pruning_curve\.(png|csv)|circuit_summary\.json",
        "--checkpoint": r"exact_edge_scores\.npz|pruning_curve\.npz",
    },
}


def _refuse_inputs_among_outputs(p: argparse.ArgumentParser, args) -> None:
    """Refuse (through ``p.error``) a token or prompt file that the command would overwrite with one of its
    results or checkpoints (``chi --data out/chi.csv --out out``): the run would destroy its own input."""
    written = _WRITTEN.get(getattr(args, "cmd", None))
    if not written:
        return
    from .patching import SITES

    site = "(" + "|".join(map(re.escape, SITES)) + ")"
    inputs = [("--data", getattr(args, "data", None) or getattr(args, "tokens", None))]
    inputs.append(("--corrupted", getattr(args, "corrupted", None)))
    for flag, path in inputs:
        if not path or not os.path.isfile(path):
            continue
        folder, name = os.path.split(os.path.abspath(path))
        for option, pattern in written.items():
            target = getattr(args, option[2:], None)
            if target is None or not os.path.isdir(target):
                continue
            if not re.fullmatch(pattern.replace("{site}", site), name):
                continue
            if os.path.samefile(folder, target):
                p.error(
                    f"{flag} {path!r} is a file that {args.cmd} writes into {option} {target!r} (as {name}): the run "
                    f"would overwrite it; give another {option} folder, or move the file"
                )


def _output_files(args) -> dict[str, tuple] | None:
    """The files in --out named as the command's results (:data:`_WRITTEN`), each with a signature that a rewrite
    changes (inode, size, modification and change times); None for a command or run that writes no such files
    (the demos, ``llc`` and ``patch`` without --model)."""
    written = _WRITTEN.get(getattr(args, "cmd", None))
    out = getattr(args, "out", None)
    if not written or out is None or (args.cmd != "circuit" and not getattr(args, "model", None)):
        return None
    from .patching import SITES

    pattern = re.compile(written["--out"].replace("{site}", "(" + "|".join(map(re.escape, SITES)) + ")"))
    files = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir(out):
            if pattern.fullmatch(entry.name):
                with contextlib.suppress(OSError):
                    st = entry.stat()
                    if entry.is_file():
                        files[entry.name] = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return files


def _earlier_outputs(args, before: dict[str, tuple] | None) -> tuple[list[str], list[str]]:
    """``(earlier, written)``: the command's result files in --out left as they were before the run (an earlier
    run's), and those the run wrote (new or rewritten)."""
    if before is None:
        return [], []
    now = _output_files(args) or {}
    earlier = sorted(name for name, sig in now.items() if before.get(name) == sig)
    return earlier, sorted(name for name in now if name not in earlier)


def _warn_earlier_outputs(args, before: dict[str, tuple] | None) -> None:
    """After a finished run: warn of result files in --out that an earlier run wrote and this one did not (the
    tables of sites a ``patch`` run left out, a plot not drawn), which would otherwise pass for this run's."""
    import warnings

    earlier, _ = _earlier_outputs(args, before)
    if earlier:
        warnings.warn(
            f"--out {args.out!r} also holds {', '.join(earlier)} from an earlier run, which this run did not write "
            "(they are not its results; its summary lists those it wrote); remove them, or give a new --out folder",
            UserWarning,
            stacklevel=2,
        )


def _note_earlier_outputs(args, before: dict[str, tuple] | None) -> None:
    """After a run that stopped (an error, Ctrl-C): say so where --out now mixes the files the run wrote before it
    stopped with an earlier run's, which do not belong together."""
    earlier, written = _earlier_outputs(args, before)
    if earlier and written:
        print(
            f"pypattern {args.cmd}: note: --out {args.out!r} now holds {', '.join(written)} of this stopped run "
            f"beside {', '.join(earlier)} of an earlier run: they do not belong together",
            file=sys.stderr,
        )


#: the folder below --out that each demo writes into (the main demo: its LLC and patching parts; patterning: --out)
_DEMO_FOLDERS = {
    "main": ("llc", "patch"),
    "equivalence": ("equivalence",),
    "interpretive": ("equivalence",),
    "cka": ("cka",),
    "flags": ("flags",),
    "patterning": (),
}


def _demo_folders(args) -> list[str]:
    """The folders below --out that ``pypattern demo <what>`` writes into (none for the other commands)."""
    if getattr(args, "cmd", None) != "demo":
        return []
    return [os.path.join(args.out, sub) for sub in _DEMO_FOLDERS[args.what]]


def _run(args) -> int:
    if args.cmd == "backends":
        from . import backends
        from ._backends import op_names

        if args.op == "all":
            print(json.dumps({op: backends(op) for op in op_names()}, indent=2))
        else:
            print(json.dumps(backends(args.op), indent=2))
        return 0
    if args.cmd == "circuit":
        _print("circuit discovery:", _call("pypattern.circuits.cli", "run_from_args", args))
        return 0
    if args.cmd in ("chi", "llc", "patch") and args.model:
        return _user_run(args)
    if args.cmd == "llc":
        print("LLC of a small MLP trained on a teacher task:")
        _llc_demo(args.out, args.quick, args.quiet, seed=args.seed)
        return 0
    if args.cmd == "patch":
        _patch_demo(
            "activation patching on the built-in model and task:", args.out, args.quick, seed=args.seed
        )
        return 0
    if args.what in ("equivalence", "interpretive"):
        _print(
            "interpretive equivalence of algorithmic pipelines (the win-counting grid and selectivity):",
            _call(
                "pypattern.experiments.interpretive",
                "run_interpretive_demo",
                _demo_folders(args)[0],
                full=args.full,
                quick=args.quick,
                threads=args.threads,  # every worker process training the pool, and this one
            ),
        )
        return 0
    if args.what == "cka":
        mod = importlib.import_module("pypattern.experiments.equivalence_demo")
        s = mod.EquivalenceDemoSettings.quick() if args.quick else None
        _print(
            "representation similarity of induction models (debiased CKA on induction-predictable tokens):",
            mod.run_equivalence_demo(_demo_folders(args)[0], s),
        )
        return 0
    if args.what == "flags":
        mod = importlib.import_module("pypattern.experiments.flags_demo")
        s = mod.FlagsDemoSettings.quick() if args.quick else mod.FlagsDemoSettings()
        s.seed = args.seed
        _print(
            "concept flags (a transformer on TopicTask; flags vs a control with the same training steps):",
            mod.run_flags_demo(_demo_folders(args)[0], s),
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
    _print(f"1. fused SGLD step on a 64-256-10 MLP (batch 256, {steps} steps):", _demo_sgld(steps, args.seed))
    print("2. LLC of a small MLP trained on a teacher task:")
    llc_out, patch_out = _demo_folders(args)
    _llc_demo(llc_out, args.quick, seed=args.seed)
    _patch_demo(
        "3. activation patching on the built-in model and task:", patch_out, args.quick, seed=args.seed
    )
    print(f"plots and tables are in {os.path.join(args.out, '')}")
    return 0


def _stdout_closed() -> int:
    """The reader of stdout went away (``pypattern backends | head -3``): end quietly, as other commands do."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush then has nowhere to fail
    except (OSError, ValueError):
        pass
    return 1


@contextlib.contextmanager
def _quiet_transformers(quiet: bool):
    """With ``--quiet``, transformers' own progress bars (loading a model's weights) off for the command, then as
    they were."""
    tf_logging = None
    if quiet:
        try:
            import transformers.utils.logging as tf_logging
        except ImportError:  # transformers is needed only for a Hugging Face model folder
            tf_logging = None
    was = tf_logging is not None and tf_logging.is_progress_bar_enabled()
    if was:
        tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            tf_logging.enable_progress_bar()


def _hold_sigint(program: bool):
    """Until :func:`_release_sigint`: SIGINT and SIGTERM do nothing (a second Ctrl-C while the first is handled,
    or one as the program exits, would end it with a traceback, or killed by SIGINT, status -2, instead of with
    the command's status). ``program``: the process ends after this (``pypattern`` run as a program): SIGINT and
    SIGTERM are then ignored by the OS too, since the interpreter's shutdown puts the default action (kill) back in
    place of a Python handler while torch and the rest unload (a second or longer), and a signal then would end a
    finished command as killed (status -2 or -15) instead of with its own status. The previous handlers, or None
    outside the main thread."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    held = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            held[sig] = signal.signal(sig, _ignore_signal)
        except (ValueError, OSError):  # pragma: no cover - a platform without it
            pass
    if program:
        # (a signal already pending ran the Python handler above at the last bytecode boundary)
        for sig in held:
            signal.signal(sig, signal.SIG_IGN)
    return held


def _ignore_signal(signum, frame) -> None:
    """A handler that does nothing: a Python-level handler, so that a signal arriving just before it was installed
    (whose Python handler runs at the next bytecode) is dropped too."""


def _release_sigint(held: dict) -> None:
    import signal

    for sig, handler in held.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def main(argv: list[str] | None = None) -> int:
    """The ``pypattern`` command. Errors in the flags end with argparse's usage message; errors met while running
    (a file that cannot be read, a model not covered, a checkpoint of another run, ...) with one line
    ``pypattern <command>: error: <message>`` on stderr; both with exit status 2 (``SystemExit(2)``). Set
    PYPATTERN_DEBUG=1 for the traceback instead."""
    return _main(argv, program=argv is None)


def _main(argv: list[str] | None, program: bool) -> int:
    """:func:`main` on ``argv`` (None: ``sys.argv[1:]``); ``program``: the process ends after it (run as a program,
    as ``pypattern`` or ``python -m pypattern.circuits.cli`` are), so the signal handlers are not put back."""
    import warnings

    from ._threads import command_threads

    parser = _parser()
    args = parser.parse_args(argv)
    sub = parser.commands[args.cmd]
    if args.cmd == "demo" and args.full and args.what not in ("patterning", "equivalence", "interpretive"):
        sub.error(f"--full applies to 'patterning' and 'equivalence' only, not to {args.what!r}")
    if args.cmd == "demo" and args.seed is not None and args.what not in ("main", "flags"):
        sub.error(
            f"--seed applies to 'main' and 'flags' only, not to {args.what!r}, which runs several seeds of its own"
        )
    if args.cmd == "patch" and args.seed is not None and args.model and args.corrupted is not None:
        sub.error(
            "--seed with --model seeds the Gaussian noise of the corrupted run, which --corrupted replaces: give one"
        )
    _resolve(sub, args)
    if args.cmd == "circuit":
        importlib.import_module("pypattern.circuits.cli").check_args(sub, args)
    _check_paths(sub, args)
    before = _output_files(args)  # the result files an earlier run left in --out

    options = _options_that_apply(sub, args)

    def one_line(message, category, filename, lineno, line=None):
        return f"pypattern {args.cmd}: warning: {_warning_as_flags(str(message), options)}\n"

    debug = os.environ.get("PYPATTERN_DEBUG", "") not in ("", "0")
    formatwarning = warnings.formatwarning
    if not debug:
        warnings.formatwarning = one_line
    held = None  # SIGINT's handler before main held it (see _hold_sigint)
    try:
        # SIGTERM, as Ctrl-C: the long loops write their checkpoints and the command ends with its message
        with (
            sigterm_as_interrupt(),
            _quiet_transformers(getattr(args, "quiet", False)),
            command_threads(getattr(args, "threads", None)),  # --threads, over every experiment's own count
        ):
            code = _run(args)
            _warn_earlier_outputs(args, before)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        return _stdout_closed()
    except USER_ERRORS as e:
        if debug:
            raise
        hint = ""
        item = getattr(e, "item", None)
        if item == "nbeta" and getattr(args, "nbeta", None) is None:
            hint = " (the default nbeta is m / ln m of the batch size m: a changed --batch-size changes it)"
        elif isinstance(item, str) and getattr(args, "checkpoint", None):
            key = item.split("[")[0].split(".")[0]
            flags = _COMMAND_CHECKPOINT_FLAGS.get(args.cmd, {}).get(key, _CHECKPOINT_FLAGS.get(key))
            if flags:
                hint = f" (on the command line: {flags})"
        print(f"pypattern {args.cmd}: error: {_as_flags(str(e))}{hint}", file=sys.stderr)
        _note_earlier_outputs(args, before)
        raise SystemExit(2) from None
    except KeyboardInterrupt as e:
        if debug:
            raise
        # a second Ctrl-C (or SIGTERM) while the first is handled ends the command as the first does, not with
        # a traceback and the status of a process killed by SIGINT
        held = _hold_sigint(program=program)
        terminated = isinstance(e, Terminated)
        what = "terminated (SIGTERM)" if terminated else "interrupted"
        if getattr(args, "checkpoint", None):
            print(
                f"pypattern {args.cmd}: {what}; the same command with --checkpoint {args.checkpoint} resumes",
                file=sys.stderr,
            )
        else:
            print(f"pypattern {args.cmd}: {what}", file=sys.stderr)
        _note_earlier_outputs(args, before)
        raise SystemExit(143 if terminated else 130) from None
    finally:
        warnings.formatwarning = formatwarning
        # the program, which ends now: a Ctrl-C or SIGTERM as it exits is not a crash (its work is done)
        if program:
            if held is None:
                _hold_sigint(program=True)
        elif held is not None:  # called in-process: the caller's handlers back
            _release_sigint(held)


if __name__ == "__main__":
    sys.exit(main())
