"""Known circuits recovered: induction (previous-token head -> induction head key composition) and the IOI-like task.

Induction prompts: ``[BOS, x_1 .. x_n, x_1 .. x_k]`` with distinct random tokens; at the last position the model
should predict ``x_{k+1}`` by induction. The corrupted prompt replaces the first copy by other distinct tokens
``y_1 .. y_n`` (same length and template, the second half unchanged), so nothing can be copied; the metric is
``logit(x_{k+1}) - logit(y_{k+1})``. Every prompt has the same layout, so per-position edges line up across the
batch: the key composition appears as ``L0Hp -> L1Hi.k`` at position ``k + 1`` (the token after the first
occurrence of the current token).
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch

from .api import edge_attribution, pruning_curve
from .results import PruningCurve

__all__ = [
    "induction_circuit_prompts",
    "train_induction_model",
    "head_roles",
    "run_induction_circuit",
    "TRAIN_MIN_DISTANCE",
    "train_ioi_model",
    "run_ioi_circuits",
]

METHODS = ("eap", "eap-ig", "exact")

#: the least previous-token score (mean attention to the position before, over positions ``2 .. n``) of a
#: previous-token head; attention spread evenly over the positions gives about 0.17 there
PREVIOUS_TOKEN_THRESHOLD = 0.4
#: the least induction score (attention from the last position to position ``k + 1``) of an induction head; even
#: attention gives ``1 / (1 + n + k)``, 0.06 on the default prompts
INDUCTION_THRESHOLD = 0.2


def _check_methods(methods) -> tuple[str, ...]:
    """``methods`` as a tuple of distinct scoring methods (``eap``, ``eap-ig``, ``exact``), else a ValueError naming
    the argument."""
    ms = (methods,) if isinstance(methods, str) else tuple(methods)
    if not ms or any(m not in METHODS for m in ms):
        raise ValueError(f"methods={methods!r} is not valid; give one or more of {list(METHODS)}")
    return tuple(dict.fromkeys(ms))


def _check_fractions(fractions, allow_empty: bool) -> tuple[float, ...]:
    """``fractions`` as a tuple of fractions of the edges (numbers in [0, 1]), else a ValueError naming the
    argument (and the value); a repeated fraction is kept once."""
    from .results import _check_fraction

    try:
        fs = tuple(fractions)
    except TypeError:
        raise ValueError(
            f"fractions={fractions!r} is not valid; give a sequence of numbers in [0, 1]"
        ) from None
    if not fs and not allow_empty:
        raise ValueError("fractions=() is empty; give one or more numbers in [0, 1] (fractions of the edges)")
    # each fraction once (a repeated one would repeat its rows)
    return tuple(dict.fromkeys(_check_fraction(f"fractions[{i}]", f) for i, f in enumerate(fs)))


def induction_circuit_prompts(d_vocab: int, num_prompts: int = 64, n: int = 10, k: int = 6, seed: int = 0):
    """Clean and corrupted induction prompts (see the module docstring).

    Returns
    -------
    clean, corrupted : LongTensor ``(num_prompts, 1 + n + k)``
    answer, wrong : LongTensor ``(num_prompts,)``: ``x_{k+1}`` and ``y_{k+1}``.
    """
    for name, v in (("num_prompts", num_prompts), ("n", n), ("k", k), ("d_vocab", d_vocab)):
        if not isinstance(v, int | np.integer) or isinstance(v, bool) or (name == "num_prompts" and v < 1):
            raise ValueError(f"{name}={v!r} is not valid; give a positive int")
    if not 1 <= k < n or 2 * n > d_vocab - 1:
        raise ValueError(f"need 1 <= k < n and 2n <= d_vocab - 1; got n={n}, k={k}, d_vocab={d_vocab}")
    g = torch.Generator().manual_seed(seed)
    xs = torch.stack([torch.randperm(d_vocab - 1, generator=g)[: 2 * n] for _ in range(num_prompts)])
    x, y = xs[:, :n], xs[:, n:]
    bos = torch.full((num_prompts, 1), d_vocab - 1)
    clean = torch.cat([bos, x, x[:, :k]], 1)
    corrupted = torch.cat([bos, y, x[:, :k]], 1)
    return clean, corrupted, x[:, k], y[:, k]


#: the least distance between the two copies of the training task's repeated segment (``InductionTask``'s
#: ``min_distance``): with copies at least ``repeat_len`` (10) apart, some seeds solve the task without a
#: previous-token head (layer-0 heads store the pair (token, next token) several positions later, and layer 1
#: matches there); copies as close as 2 positions leave the previous-token head as the way to solve it
TRAIN_MIN_DISTANCE = 2


def train_induction_model(seed: int = 0, steps: int = 800, task=None):
    """The 2-layer attention-only model of :class:`~pypattern.tasks.InductionTask` trained with the library's
    :func:`~pypattern.tasks.train` (online data, AdamW 3e-3, batch 64).

    The default task is ``InductionTask(min_distance=TRAIN_MIN_DISTANCE)``: the two copies of the repeated segment
    are 2 .. 22 positions apart (and overlap below 10), so that the model forms the previous-token head -> induction
    head mechanism (see :data:`TRAIN_MIN_DISTANCE`)."""
    from ..models.transformer import Transformer
    from ..tasks import InductionTask, train

    task = InductionTask(min_distance=TRAIN_MIN_DISTANCE) if task is None else task
    model = Transformer(task.model_config(seed=seed))
    train(model, task, steps=steps, seed=seed, log_every=0, quiet=True)
    return model, task


@torch.no_grad()
def head_roles(model, clean: torch.Tensor, n: int, k: int) -> dict:
    """Attention-based roles on the induction prompts.

    ``previous_token (n_layers, n_heads)``: mean attention from each position of the first copy (``2 .. n``) to
    the position before it; ``induction (n_layers, n_heads)``: attention from the last position to position
    ``k + 1`` (the token after the first occurrence of the current token).
    """
    clean = clean.to(model.embed.W_E.device)  # the model's device (no copy when the prompts are there)
    _, cache = model.run_with_cache(clean, names_filter=lambda s: s.endswith("hook_pattern"))
    L, H = model.cfg.n_layers, model.cfg.n_heads
    prev, ind = torch.zeros(L, H), torch.zeros(L, H)
    q = torch.arange(2, n + 1)
    for layer in range(L):
        p = cache[f"blocks.{layer}.attn.hook_pattern"].float().cpu()  # (B, H, q, k), read on the CPU
        prev[layer] = p[:, :, q, q - 1].mean((0, 2))
        ind[layer] = p[:, :, -1, k + 1].mean(0)
    return {"previous_token": prev, "induction": ind}


def run_induction_circuit(
    seed: int = 0,
    steps: int = 800,
    num_prompts: int = 64,
    n: int = 10,
    k: int = 6,
    per_position: bool = True,
    methods=METHODS,
    ig_steps: int = 5,
    fractions=(0.0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.5, 1.0),
    model=None,
    quiet: bool = False,
) -> dict:
    """Train (or take) an induction model, score its edges, and check the recovered circuit (``quiet=False``:
    with the progress bars of exact scoring).

    Returns a dict with the model's head roles, the prefix-matching score of the task, the scores and the
    :class:`PruningCurve` of each method, the previous-token head ``prev_head`` (the layer-0 head with the largest
    previous-token score when that reaches :data:`PREVIOUS_TOKEN_THRESHOLD`, else None) and the induction heads
    ``induction_heads`` (the layer-1 heads whose induction score reaches :data:`INDUCTION_THRESHOLD`, possibly
    none), ``roles_found`` (both found), the key-composition edges ``L0H{prev} -> L1H{ind}.k`` (``L1KV{g}.k``, the
    key input of the induction head's key/value head, under grouped-query attention; at position ``k + 1`` on a
    per-position graph) among the top 5% of edges of each method (none without the roles), the
    faithfulness at 5% of the edges, and ``circuit_recovered``: per method, whether both hold (a key-composition
    edge among the top 5% and faithfulness >= 0.9 there).

    ``steps`` (training steps) applies to the model trained here only: with ``model=...`` a value other than the
    default is refused (ValueError). ``seed`` also keys the prompts, so it applies either way.
    """
    from ..patching import LogitDiff
    from ..tasks.induction import prefix_matching_score

    methods = _check_methods(methods)
    fractions = _check_fractions(fractions, allow_empty=True)  # the 5% point is always evaluated
    if model is not None and steps != 800:
        raise ValueError(
            f"steps={steps!r} is the training steps of the induction model trained when no model is given; with "
            "model=... nothing is trained: leave steps out"
        )
    t0 = time.perf_counter()
    task = None
    if model is None:
        model, task = train_induction_model(seed, steps)
    t_train = time.perf_counter() - t0
    clean, corr, ans, wrong = induction_circuit_prompts(
        model.cfg.d_vocab, num_prompts, n, k, seed=seed + 1000
    )
    metric = LogitDiff(ans, wrong)
    roles = head_roles(model, clean, n, k)
    # the roles are read from the attention patterns, never assumed: a layer-0 head is the previous-token head
    # when its score reaches PREVIOUS_TOKEN_THRESHOLD, layer-1 heads are induction heads when theirs reach
    # INDUCTION_THRESHOLD; a model without them (the heads' attention near uniform) has none
    best = int(roles["previous_token"][0].argmax())
    prev_head = best if float(roles["previous_token"][0, best]) >= PREVIOUS_TOKEN_THRESHOLD else None
    ind_heads = (roles["induction"][1] >= INDUCTION_THRESHOLD).nonzero().flatten().tolist()
    scores, times = {}, {}
    for m in methods:
        t1 = time.perf_counter()
        scores[m] = edge_attribution(
            model,
            clean,
            corr,
            metric=metric,
            method=m,
            **({"steps": ig_steps} if m == "eap-ig" else {}),
            per_position=per_position,
            quiet=quiet,
        )
        times[m] = time.perf_counter() - t1
    E = len(next(iter(scores.values())).graph)
    budget = int(0.05 * E)  # the largest circuit within 5% of the edges
    counts = sorted({round(f * E) for f in fractions} | {budget})
    curve = pruning_curve(model, scores, clean, corr, metric=metric, counts=counts, quiet=quiet)
    graph = next(iter(scores.values())).graph
    # per position, the key composition is read at position k + 1 (the token after the first occurrence); under
    # grouped-query attention an induction head reads the key input of its key/value head, L1KV{h // group}
    at = f"@{k + 1}" if graph.per_position else ""
    group = graph.n_heads // graph.n_kv_heads
    key_input = (lambda h: f"L1H{h}") if group == 1 else (lambda h: f"L1KV{h // group}")
    key_names = set() if prev_head is None else {f"L0H{prev_head}->{key_input(h)}.k{at}" for h in ind_heads}
    found = {}
    for m, sc in scores.items():
        top = [graph[i] for i in sc.ranking()[:budget].tolist()]
        hits = sorted({e.name for e in top} & key_names)
        found[m] = hits
    i5 = int((curve.counts == budget).nonzero()[0])
    at5 = {m: float(curve.faithfulness[m][i5]) for m in scores}
    return {
        "seed": seed,
        "seconds_train": t_train,
        "prefix_matching_score": prefix_matching_score(model).tolist() if task is not None else None,
        "previous_token_score": roles["previous_token"].tolist(),
        "induction_score": roles["induction"].tolist(),
        "prev_head": prev_head,
        "induction_heads": ind_heads,
        "num_edges": E,
        "edges_at_5pct": budget,
        "roles_found": prev_head is not None and bool(ind_heads),
        "key_composition_in_top_5pct": found,
        "faithfulness_at_5pct": at5,
        # the known circuit recovered: the key composition among the top 5% and faithfulness >= 0.9 there
        "circuit_recovered": {m: bool(found[m]) and at5[m] >= 0.9 for m in scores},
        "m_clean": float(scores[methods[0]].m_clean.mean()),
        "m_corrupted": curve.m_empty,
        "seconds_scores": times,
        "scores": scores,
        "curve": curve,
        "model": model,
        "prompts": (clean, corr, metric),
    }


def train_ioi_model(seed: int = 0, steps: int = 300):
    """The built-in model of :class:`~pypattern.tasks.IOITask` (2 layers, 4 heads, MLPs) trained as in
    ``pypattern patch``."""
    from ..models.transformer import Transformer
    from ..tasks import IOITask, train

    task = IOITask()
    with torch.random.fork_rng(devices=[]):  # the caller's generator is left as it was
        torch.manual_seed(seed)
        model = Transformer(task.model_config(seed=seed))
        train(model, task, steps=steps, seed=seed, log_every=0, quiet=True)
    return model, task


def run_ioi_circuits(
    seeds=(0, 1, 2),
    steps: int = 300,
    num_prompts: int = 64,
    corruption: str = "abc",
    ig_steps: int = 5,
    fractions=(0.01, 0.05, 0.1),
    per_position: bool = False,
) -> dict:
    """Faithfulness of the top-scored circuits on the IOI-like task for EAP, EAP-IG and exact scores.

    Returns ``{"rows": [...], "curves": {seed: PruningCurve}, "top_edges": {seed: {method: [...]}}}``; each row
    holds seed, method, fraction, edges kept and faithfulness (noising, resample ablation, logit difference).
    """
    from ..patching import LogitDiff

    fractions = _check_fractions(fractions, allow_empty=False)
    rows, curves, tops, info = [], {}, {}, {}
    for seed in seeds:
        t0 = time.perf_counter()
        model, task = train_ioi_model(seed, steps)
        acc = task.accuracy(model, task.sample(1000, seed=seed + 99))
        clean, corr, ans, wrong = task.patching_pairs(num_prompts, seed=seed + 1, corruption=corruption)
        metric = LogitDiff(ans, wrong)
        scores = {
            m: edge_attribution(
                model,
                clean,
                corr,
                metric=metric,
                method=m,
                **({"steps": ig_steps} if m == "eap-ig" else {}),
                per_position=per_position,
            )
            for m in METHODS
        }
        E = len(next(iter(scores.values())).graph)
        counts = sorted({max(1, round(f * E)) for f in fractions})
        curve: PruningCurve = pruning_curve(model, scores, clean, corr, metric=metric, counts=[0, *counts, E])
        curves[seed] = curve
        tops[seed] = {m: [(str(e), round(s, 4)) for e, s in sc.top(5)] for m, sc in scores.items()}
        info[seed] = {
            "accuracy": acc,
            "m_clean": curve.m_full,
            "m_corrupted": curve.m_empty,
            "seconds": time.perf_counter() - t0,
        }
        for f in fractions:
            c = max(1, round(f * E))
            i = int((curve.counts == c).nonzero()[0])
            for m in METHODS:
                rows.append(
                    {
                        "seed": seed,
                        "method": m,
                        "fraction": f,
                        "edges": c,
                        "faithfulness": float(curve.faithfulness[m][i]),
                    }
                )
    return {"rows": rows, "curves": curves, "top_edges": tops, "info": info}


def _fmt(x: float) -> str:
    return f"{x:.3f}"


def _seeds(text: str) -> tuple[int, ...]:
    """``--seeds``: comma-separated non-negative ints, each kept once."""
    import argparse

    parts = [t.strip() for t in text.split(",")]
    if not all(t.isdigit() for t in parts):
        raise argparse.ArgumentTypeError(
            f"give comma-separated non-negative ints such as 0,1,2; got {text!r}"
        )
    return tuple(dict.fromkeys(int(t) for t in parts))


def main(argv: list[str] | None = None) -> int:
    """``python -m pypattern.circuits.experiments [--seeds 0,1,2]``: the induction and IOI results as markdown."""
    import argparse
    import platform

    p = argparse.ArgumentParser(prog="python -m pypattern.circuits.experiments")
    p.add_argument("--seeds", type=_seeds, default=(0, 1, 2), help="comma-separated ints (default: 0,1,2)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ioi-per-position", action="store_true", help="only the IOI tables, per-position edges")
    p.add_argument("--induction-only", action="store_true", help="only the induction table")
    args = p.parse_args(argv)
    seeds = args.seeds
    torch.set_num_threads(args.threads)
    print(
        f"threads: {torch.get_num_threads()}, torch {torch.__version__}, {platform.processor() or platform.machine()}"
    )
    if args.ioi_per_position:
        for corruption in ("abc", "subject"):
            res = run_ioi_circuits(seeds=seeds, corruption=corruption, per_position=True)
            print(f"\n## IOI-like task ({corruption} corruption), per-position edges\n")
            for m in METHODS:
                cells = []
                for f in (0.01, 0.05, 0.1):
                    v = [r["faithfulness"] for r in res["rows"] if r["method"] == m and r["fraction"] == f]
                    cells.append(" / ".join(_fmt(x) for x in v) + f" ({_fmt(sum(v) / len(v))})")
                print(f"| {corruption} | {m} | " + " | ".join(cells) + " |", flush=True)
        return 0
    print("\n## Induction (per-position edges)\n")
    print(
        "| seed | prev-token head (score) | induction heads (score) | edges | key composition in top 5% "
        "(eap / eap-ig / exact) | faithfulness at 5%: eap | eap-ig | exact | at 2%: exact | s exact |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for seed in seeds:
        r = run_induction_circuit(seed=seed)
        best = max(range(len(r["previous_token_score"][0])), key=lambda h: r["previous_token_score"][0][h])
        prev_score = r["previous_token_score"][0][best]
        # a head below the threshold is shown with its score and "none": the role was not found
        prev = (
            f"L0H{r['prev_head']} ({prev_score:.2f})"
            if r["prev_head"] is not None
            else f"none (best L0H{best} {prev_score:.2f})"
        )
        ind = ", ".join(f"L1H{h} ({r['induction_score'][1][h]:.2f})" for h in r["induction_heads"]) or (
            f"none (best {max(r['induction_score'][1]):.2f})"
        )
        kc = " / ".join(",".join(r["key_composition_in_top_5pct"][m]) or "-" for m in METHODS)
        f5 = r["faithfulness_at_5pct"]
        at2 = r["curve"].at(0.02)["exact"]  # nearest point: round(0.02 * E) edges
        print(
            f"| {seed} | {prev} | {ind} | {r['num_edges']} | {kc} | "
            f"{_fmt(f5['eap'])} | {_fmt(f5['eap-ig'])} | {_fmt(f5['exact'])} | {_fmt(at2)} | "
            f"{r['seconds_scores']['exact']:.1f} |",
            flush=True,
        )
        flat = run_induction_circuit(seed=seed, per_position=False, model=r["model"])
        fl = flat["curve"]
        print(
            f"|   | (position-free graph, {flat['num_edges']} edges) | | | "
            + " / ".join(",".join(flat["key_composition_in_top_5pct"][m]) or "-" for m in METHODS)
            + " | "
            + " | ".join(_fmt(fl.at(0.05)[m]) for m in METHODS)
            + f" | {_fmt(fl.at(0.02)['exact'])} | |",
            flush=True,
        )
    for corruption in () if args.induction_only else ("abc", "subject"):
        res = run_ioi_circuits(seeds=seeds, corruption=corruption)
        print(f"\n## IOI-like task ({corruption} corruption), faithfulness of the top edges\n")
        print("| seed | accuracy | LD clean | LD corrupted | method | 1% | 5% | 10% |")
        print("|---|---|---|---|---|---|---|---|")
        for seed in seeds:
            inf = res["info"][seed]
            for m in METHODS:
                vals = [r["faithfulness"] for r in res["rows"] if r["seed"] == seed and r["method"] == m]
                print(
                    f"| {seed} | {inf['accuracy']:.3f} | {inf['m_clean']:.2f} | {inf['m_corrupted']:.2f} | {m} | "
                    + " | ".join(_fmt(v) for v in vals)
                    + " |",
                    flush=True,
                )
        for m in METHODS:
            for f in (0.01, 0.05, 0.1):
                v = torch.tensor(
                    [r["faithfulness"] for r in res["rows"] if r["method"] == m and r["fraction"] == f]
                )
                print(
                    f"mean over seeds {m} at {f:.0%}: {v.mean():.3f} (min {v.min():.3f}, max {v.max():.3f})"
                )
        print("top edges:", json.dumps(res["top_edges"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
