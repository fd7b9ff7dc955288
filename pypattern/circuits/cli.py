"""``pypattern circuit``: circuit discovery on the built-in induction task, or on a local model and prompt file.

Writes into ``out_dir``: ``edge_scores.csv`` (every edge, every method), ``circuit.csv`` (the edges of the chosen
circuit), ``pruning_curve.png``, ``pruning_curve.csv`` and ``circuit.png`` (graph drawing with edge scores).

A local model directory holds ``config.json`` (the fields of :class:`~pypattern.models.TransformerConfig`,
``dtype`` as a string such as ``"float32"``) and ``weights.npz`` (or ``model.safetensors``) with the model's
``state_dict`` names, or is a Hugging Face ``save_pretrained`` directory. The prompts are either an ``.npz`` with
``clean`` and ``corrupted`` ``(batch, pos)`` token ids and ``answer`` ``(batch,)`` (optionally ``wrong``
``(batch,)``: the metric is then the logit difference, else the answer's log-probability), read at the last
position; or a plain token file (``.npy``, ``.npz`` with one array or ``tokens``, or text: one sequence of ids per
line, as ``pypattern patch --data`` reads), with an optional ``--corrupted`` token file of the same shape. With a
plain token file the metric is the log-probability of the model's own top prediction on each clean prompt at its
last position, and an edge carries the corrupted prompts' value (resample ablation) or, without them, the mean over
the prompts (mean ablation).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

__all__ = ["run_circuit_demo", "load_model_dir", "load_prompts", "user_prompts", "main"]


def load_model_dir(path: str):
    """A :class:`~pypattern.models.Transformer` from ``path/config.json`` and ``path/weights.npz`` (or
    ``path/model.safetensors``), or a Hugging Face ``save_pretrained`` directory (its ``config.json`` names a
    ``model_type``), converted with :func:`pypattern.from_pretrained`. Nothing is unpickled."""
    from ..models.transformer import Transformer, TransformerConfig

    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(
            f"model_dir={path!r} has no config.json (fields of TransformerConfig, or a Hugging Face config)"
        )
    with open(cfg_path) as f:
        cfg = json.load(f)
    if "model_type" in cfg:
        from ..models.convert import from_pretrained

        model = from_pretrained(path)
        model.eval()
        return model
    if isinstance(cfg.get("dtype"), str):
        cfg["dtype"] = getattr(torch, cfg["dtype"].replace("torch.", ""))
    model = Transformer(TransformerConfig(**cfg))
    npz, st = os.path.join(path, "weights.npz"), os.path.join(path, "model.safetensors")
    if os.path.exists(npz):
        with np.load(npz, allow_pickle=False) as z:
            state = {k: torch.from_numpy(z[k]) for k in z.files}
    elif os.path.exists(st):
        from safetensors.torch import load_file

        state = load_file(st)
    else:
        raise FileNotFoundError(f"model_dir={path!r} has neither weights.npz nor model.safetensors")
    model.load_state_dict(state)
    model.eval()
    return model


def load_prompts(path: str):
    """``(clean, corrupted, metric)`` from a prompt file (see the module docstring)."""
    from ..patching import LogitDiff, LogProb

    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in ("clean", "corrupted", "answer") if k not in z.files]
        if missing:
            raise ValueError(
                f"tokens={path!r} lacks {missing}; it needs clean, corrupted, answer (and wrong)"
            )
        clean = torch.from_numpy(z["clean"]).long()
        corr = torch.from_numpy(z["corrupted"]).long()
        ans = torch.from_numpy(z["answer"]).long()
        wrong = torch.from_numpy(z["wrong"]).long() if "wrong" in z.files else None
    metric = LogitDiff(ans, wrong) if wrong is not None else LogProb(ans)
    return clean, corr, metric


def user_prompts(model, tokens: str, corrupted: str | None = None):
    """``(clean, corrupted, metric, ablation)`` for ``model`` from a prompt file (see the module docstring): an
    ``.npz`` with ``clean``, ``corrupted`` and ``answer`` as :func:`load_prompts` reads, or a plain token file with
    an optional corrupted token file."""
    from ..experiments.user_model import load_tokens
    from ..patching import LogProb

    if tokens.lower().endswith(".npz"):
        with np.load(tokens, allow_pickle=False) as z:
            full = "clean" in z.files
        if full:
            if corrupted is not None:
                raise ValueError(
                    f"tokens={tokens!r} holds its own corrupted prompts; corrupted={corrupted!r} is not read with it"
                )
            clean, corr, metric = load_prompts(tokens)
            return clean, corr, metric, "resample"
    n_ctx = model.cfg.max_positions
    clean = load_tokens(tokens, vocab_size=model.cfg.d_vocab, n_ctx=n_ctx)
    corr = None
    if corrupted is not None:
        corr = load_tokens(corrupted, vocab_size=model.cfg.d_vocab, n_ctx=n_ctx)
        if corr.shape != clean.shape:
            raise ValueError(
                f"corrupted={corrupted!r} has shape {tuple(corr.shape)}; it must match tokens' {tuple(clean.shape)}"
            )
    with torch.no_grad():
        answer = model(clean)[:, -1].argmax(-1)
    return clean, corr, LogProb(answer), ("resample" if corr is not None else "mean")


def run_circuit_demo(
    out_dir: str = "out/circuit",
    model_dir: str | None = None,
    tokens: str | None = None,
    corrupted: str | None = None,
    methods=("eap", "eap-ig", "exact"),
    fraction: float = 0.05,
    per_position: bool | None = None,
    ig_steps: int = 5,
    seed: int = 0,
    steps: int = 800,
    threads: int | None = 1,
) -> dict:
    """Score every edge, draw the pruning curves and the circuit of the top ``fraction`` of edges.

    With neither ``model_dir`` nor ``tokens``: a 2-layer attention-only model trained on the built-in induction
    task (per-position edges; see :func:`~pypattern.circuits.experiments.run_induction_circuit`). The circuit
    drawn is the top ``fraction`` by the last method in ``methods``.

    Returns
    -------
    dict
        Faithfulness of each method at ``fraction``, the circuit's top edges, timings and the written paths.
    """
    from .._threads import pinned_threads
    from .api import edge_attribution, faithfulness, pruning_curve
    from .experiments import run_induction_circuit

    if (model_dir is None) != (tokens is None):
        raise ValueError("give both model_dir=... and tokens=..., or neither (the built-in induction task)")
    if corrupted is not None and tokens is None:
        raise ValueError("corrupted=... needs model_dir=... and tokens=...")
    os.makedirs(out_dir, exist_ok=True)
    with pinned_threads(threads):
        t0 = time.perf_counter()
        extra = {}
        if model_dir is None:
            pp = True if per_position is None else per_position
            res = run_induction_circuit(
                seed=seed, steps=steps, per_position=pp, methods=methods, ig_steps=ig_steps
            )
            model, (clean, corr, metric) = res["model"], res["prompts"]
            scores, curve = res["scores"], res["curve"]
            extra = {
                "task": "induction (built-in)",
                "previous_token_head": f"L0H{res['prev_head']}",
                "induction_heads": [f"L1H{h}" for h in res["induction_heads"]],
                "prefix_matching_score_layer1": [round(x, 3) for x in res["prefix_matching_score"][1]],
                "previous_token_score_layer0": [round(x, 3) for x in res["previous_token_score"][0]],
                "key_composition_in_top_5pct": res["key_composition_in_top_5pct"],
            }
        else:
            model = load_model_dir(model_dir)
            clean, corr, metric, ablation = user_prompts(model, tokens, corrupted)
            pp = False if per_position is None else per_position
            scores = {
                m: edge_attribution(
                    model,
                    clean,
                    corr,
                    metric=metric,
                    method=m,
                    steps=ig_steps,
                    per_position=pp,
                    ablation=ablation,
                )
                for m in methods
            }
            curve = pruning_curve(model, scores, clean, corr, metric=metric, ablation=ablation)
            extra = {"task": f"{model_dir} on {tokens}", "ablation": ablation}
        chosen = methods[-1]
        circuit = scores[chosen].circuit(fraction=fraction)
        circuit.faithfulness = faithfulness(
            model, circuit.mask, clean, corr, metric=metric, ablation=extra.get("ablation", "resample")
        )
        seconds = time.perf_counter() - t0
    paths = {
        "edge_scores": os.path.join(out_dir, "edge_scores.csv"),
        "circuit_table": os.path.join(out_dir, "circuit.csv"),
        "pruning_curve": os.path.join(out_dir, "pruning_curve.png"),
        "pruning_table": os.path.join(out_dir, "pruning_curve.csv"),
        "circuit_drawing": os.path.join(out_dir, "circuit.png"),
    }
    import pandas as pd

    pd.concat([sc.to_pandas() for sc in scores.values()]).to_csv(paths["edge_scores"], index=False)
    circuit.to_pandas().to_csv(paths["circuit_table"], index=False)
    curve.to_pandas().to_csv(paths["pruning_table"], index=False)
    curve.plot(path=paths["pruning_curve"])
    circuit.draw(path=paths["circuit_drawing"])
    return {
        **extra,
        "num_edges": len(circuit.graph),
        "per_position": circuit.graph.per_position,
        "circuit_method": chosen,
        "circuit_edges": len(circuit),
        "circuit_faithfulness": circuit.faithfulness,
        "faithfulness_at_fraction": curve.at(fraction),
        "top_edges": [str(r) for r in circuit.to_pandas()["name"][:8]],
        "seconds": round(seconds, 2),
        **paths,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pypattern circuit", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    res = run_from_args(args)
    print(json.dumps(res, indent=2, default=str))
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``pypattern circuit`` (for the main command line's sub-parser)."""
    p.add_argument("--out", default="out/circuit", help="folder for the tables and plots")
    p.add_argument(
        "--model-dir",
        "--model",
        dest="model_dir",
        default=None,
        help="a Hugging Face save_pretrained directory (converted exactly), or config.json + weights.npz of a "
        "pypattern Transformer; default: the built-in induction task",
    )
    p.add_argument(
        "--tokens",
        "--data",
        dest="tokens",
        default=None,
        help=".npz with clean, corrupted, answer[, wrong]; or a token file (.npy, .npz, text) of clean prompts",
    )
    p.add_argument(
        "--corrupted",
        default=None,
        help="with a token file: corrupted prompts of the same shape (default: mean ablation over the prompts)",
    )
    p.add_argument("--methods", default="eap,eap-ig,exact", help="comma-separated: eap, eap-ig, exact")
    p.add_argument("--fraction", type=float, default=0.05, help="fraction of edges in the drawn circuit")
    p.add_argument("--ig-steps", type=int, default=5, help="interpolation steps of EAP-IG (default: 5)")
    p.add_argument(
        "--per-position",
        choices=["auto", "yes", "no"],
        default="auto",
        help="one edge per position (yes), one per node pair (no), or the task's choice (auto)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the built-in model's training (default: 0)")
    p.add_argument("--steps", type=int, default=800, help="training steps of the built-in model")


def run_from_args(args) -> dict:
    pp = {"auto": None, "yes": True, "no": False}[args.per_position]
    return run_circuit_demo(
        args.out,
        model_dir=args.model_dir,
        tokens=args.tokens,
        corrupted=args.corrupted,
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        fraction=args.fraction,
        per_position=pp,
        ig_steps=args.ig_steps,
        seed=args.seed,
        steps=args.steps,
    )


if __name__ == "__main__":
    raise SystemExit(main())
