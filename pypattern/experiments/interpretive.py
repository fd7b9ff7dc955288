"""Interpretive equivalence on trained models: the toy case study of Sun & Toneva with pypattern's transformers.

1. A pool of small transformers per routine of :mod:`pypattern.tasks.algorithmic` (several seeds and
   architectures), trained in parallel worker processes and cached on disk (``.npz`` weights + ``.json``
   config/metrics, keyed by routine, architecture, seed and the training settings), so a rerun does not retrain.
2. Implementations of each algorithm: chains of one pool member per routine (every combination), on shared
   random inputs; representations by :func:`~pypattern.interpretive.accumulated_residual`, stages concatenated.
3. The distinguishability grid over the algorithms (win-counting test with the one-sided criterion and repeats)
   and the intervention-selectivity curve against the patching budget, for ridge similarity, CKA and Procrustes,
   over several seeds of the pipeline (inputs, draws, splits).

``run_interpretive(out_dir, settings)`` writes ``interpretive.json``, ``interpretive_grid.png`` and
``interpretive_selectivity.png``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..interpretive import MEASURES, accumulated_residual, distinguishability_grid, selectivity_curves
from ..io import json_text
from ..models.transformer import Transformer, TransformerConfig
from ..ridge import _fit_size
from ..tasks.algorithmic import (
    ALGORITHMS,
    SEQ_LEN,
    VOCAB,
    RoutineTask,
    decode,
    encode,
    run_algorithm,
    run_routine,
)
from ..tasks.training import train

__all__ = [
    "ARCHS",
    "InterpretiveSettings",
    "reduced_interpretive_settings",
    "quick_interpretive_settings",
    "pool_members",
    "train_pool",
    "train_pools",
    "load_member",
    "StageCache",
    "ChainImplementations",
    "head_importance",
    "run_pipeline_seed",
    "run_interpretive",
    "merge_reports",
    "run_interpretive_demo",
]

ARCHS = {
    "L2d32h4": dict(n_layers=2, d_model=32, n_heads=4, d_mlp=128),
    "L1d48h4": dict(n_layers=1, d_model=48, n_heads=4, d_mlp=192),
    "L3d32h2": dict(n_layers=3, d_model=32, n_heads=2, d_mlp=128),
}
"""Architectures of the pool (name -> :class:`~pypattern.models.TransformerConfig` fields)."""


@dataclasses.dataclass
class InterpretiveSettings:
    """Settings of :func:`run_interpretive` (defaults: the full run).

    ``members``: the pool of every routine, as ``(architecture, seed)``; ``algorithms``: keys of
    :data:`~pypattern.tasks.algorithmic.ALGORITHMS`; ``pipeline_seeds``: seeds of the whole pipeline (inputs,
    implementation draws, splits, counterfactuals and, with ``independent_pools``, the pool itself: pipeline seed
    ``p`` trains its own members, ``(architecture, seed + 1000 p)``; see :func:`pool_members`).
    """

    algorithms: tuple[str, ...] = tuple(ALGORITHMS)
    members: tuple[tuple[str, int], ...] = (("L2d32h4", 0), ("L2d32h4", 1), ("L1d48h4", 2), ("L3d32h2", 3))
    steps: int = 1000
    batch_size: int = 128
    lr: float = 3e-3
    num_workers: int = 2
    num_inputs: int = 1000
    num_trials: int = 20
    num_repeats: int = 5
    selectivity_trials: int = 10
    budgets: tuple[int, ...] = (0, 1, 2, 4, 8)
    measures: tuple[str, ...] = MEASURES
    pipeline_seeds: tuple[int, ...] = (0, 1, 2)
    independent_pools: bool = True
    train_fraction: float = 0.9
    alphas: tuple[float, ...] = (0.1, 1.0, 10.0)
    z: float = 1.96
    num_threads: int = 1


def check_settings(s: InterpretiveSettings) -> InterpretiveSettings:
    """Refuse, naming the field, settings the run would fail on only after training its pool: unknown algorithms,
    architectures or measures, counts below 1, negative budgets or pipeline seeds, a learning rate or fractions out
    of range."""
    from .._checks import is_count, is_real

    if not isinstance(s, InterpretiveSettings):
        raise TypeError(f"settings are a {type(s).__name__}; give an InterpretiveSettings")

    def names(field: str, valid, least: int) -> None:
        value = getattr(s, field)
        if isinstance(value, str) or len(value := tuple(value)) < least or any(v not in valid for v in value):
            raise ValueError(
                f"{field}={getattr(s, field)!r} is not valid; give at least {least} of {sorted(valid)}"
            )

    names("algorithms", ALGORITHMS, 2)
    names("measures", MEASURES, 1)
    members = tuple(s.members)
    if not members or any(
        not isinstance(m, tuple | list) or len(m) != 2 or m[0] not in ARCHS or not is_count(m[1])
        for m in members
    ):
        raise ValueError(
            f"members={s.members!r} is not valid; give (architecture, seed) pairs with the architecture one of "
            f"{sorted(ARCHS)} and an int seed"
        )
    for field in ("steps", "batch_size", "num_workers", "num_inputs", "num_trials", "num_repeats",
                  "selectivity_trials", "num_threads"):  # fmt: skip
        value = getattr(s, field)
        if not is_count(value) or value < 1:
            raise ValueError(f"{field}={value!r} is not valid; give an int >= 1")
    # pipeline seeds key the grid's and the selectivity's draws, which take seeds >= 0 only
    for field in ("budgets", "pipeline_seeds"):
        value = getattr(s, field)
        if (
            isinstance(value, str)
            or not (value := tuple(value))
            or not all(is_count(v) and v >= 0 for v in value)
        ):
            raise ValueError(f"{field}={getattr(s, field)!r} is not valid; give one or more ints >= 0")
    for field, value in (("lr", s.lr), ("z", s.z), *(("alphas", a) for a in s.alphas)):
        if not is_real(value) or not 0 < value < float("inf"):
            raise ValueError(f"{field}={getattr(s, field)!r} is not valid; give finite numbers > 0")
    if not s.alphas:
        raise ValueError("alphas=() is not valid; give finite numbers > 0")
    if not is_real(s.train_fraction) or not 0 < s.train_fraction < 1:
        raise ValueError(f"train_fraction={s.train_fraction!r} is not valid; give a number in (0, 1)")
    # the grid's diagonal draws three distinct implementations of one algorithm: len(members) ** stages of them
    few = [a for a in s.algorithms if len(members) ** len(ALGORITHMS[a]) < 3]
    if few:
        raise ValueError(
            f"members={s.members!r} is not valid; algorithm {few[0]!r} has {len(ALGORITHMS[few[0]])} stages, so "
            f"{len(members)} member(s) per routine give it {len(members) ** len(ALGORITHMS[few[0]])} "
            "implementation(s), and the same-algorithm control draws 3 distinct ones: give at least 2 members"
        )
    # a budget patches that many heads of a chain: at most the heads of the chain with fewest (each routine's
    # member of fewest heads), else the run would stop partway at ChainImplementations.patched's refusal
    fewest = min(ARCHS[m[0]]["n_layers"] * ARCHS[m[0]]["n_heads"] for m in members)
    for a in s.algorithms:
        heads = len(ALGORITHMS[a]) * fewest
        if max(s.budgets) > heads:
            raise ValueError(
                f"budgets={tuple(s.budgets)!r} is not valid: algorithm {a!r} ({len(ALGORITHMS[a])} routines) may "
                f"be drawn as a chain of {heads} heads with these members; give budgets <= {heads}"
            )
    # every similarity is computed on a split of the inputs: the ridge split needs 5 inputs (3 to fit, 2 held
    # out), CKA at least 4 in the fraction it is computed on
    least = 5
    fit = _fit_size(s.num_inputs, s.train_fraction) if s.num_inputs >= least else 0
    if s.num_inputs < least or ("cka" in s.measures and fit < 4):
        raise ValueError(
            f"num_inputs={s.num_inputs!r} is not valid with train_fraction={s.train_fraction!r} and "
            f"measures={s.measures!r}: the similarities are computed on a split of the inputs, which needs at "
            f"least {least} inputs{' and 4 in the fitted fraction for cka' if 'cka' in s.measures else ''}; give "
            "more inputs"
        )
    return s


def reduced_interpretive_settings() -> InterpretiveSettings:
    """The demo's settings (``pypattern demo equivalence``; within 5 minutes on 2 cores with the pool not cached
    yet): 2 pool members per routine trained for 600 steps, the first 5 algorithms (4 to 8 implementations each),
    600 inputs, 2 repeats of 20 trials, budgets 0, 2 and 8 with 3 selectivity trials, one pipeline seed."""
    return InterpretiveSettings(
        algorithms=tuple(ALGORITHMS)[:5],
        members=(("L2d32h4", 0), ("L1d48h4", 1)),
        steps=600,
        num_inputs=600,
        num_repeats=2,
        selectivity_trials=3,
        budgets=(0, 2, 8),
        pipeline_seeds=(0,),
    )


def quick_interpretive_settings() -> InterpretiveSettings:
    """Tiny sizes (``--quick``: 2 one-layer members per routine trained for 40 steps, 3 algorithms, 120 inputs):
    checks that the demo runs, in seconds; the figures mean nothing."""
    return InterpretiveSettings(
        algorithms=("sort_diff", "sort_sum", "index_count"),
        members=(("L1d48h4", 0), ("L1d48h4", 1)),
        steps=40,
        num_workers=1,
        num_inputs=120,
        num_trials=6,
        num_repeats=1,
        selectivity_trials=2,
        budgets=(0, 1),
        pipeline_seeds=(0,),
    )


# ------------------------------------------------------------------------------------------------ the pool


def _member_key(routine: str, arch: str, seed: int, s: InterpretiveSettings) -> str:
    h = hashlib.sha256(
        json.dumps([ARCHS[arch], s.steps, s.batch_size, s.lr, "v1"], sort_keys=True).encode()
    ).hexdigest()[:10]
    return f"{routine}__{arch}__seed{seed}__{h}"


def _train_member(job: tuple) -> dict:
    """Worker: train one pool member and write ``<key>.npz`` / ``<key>.json``; returns its metrics."""
    routine, arch, seed, steps, batch_size, lr, path, threads = job
    torch.set_num_threads(threads)
    c0, t0 = time.process_time(), time.perf_counter()
    task = RoutineTask(routine)
    cfg = task.model_config(**ARCHS[arch], seed=seed)
    model = Transformer(cfg)
    train(model, task, steps=steps, batch_size=batch_size, lr=lr, seed=seed, log_every=0, quiet=True)
    model.eval()
    test = task.sample(2000, seed=10_000 + seed)
    meta = {
        "routine": routine,
        "arch": arch,
        "seed": seed,
        "config": cfg.to_dict(),
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "token_accuracy": task.accuracy(model, test),
        "sequence_accuracy": task.sequence_accuracy(model, test),
        "cpu_seconds": time.process_time() - c0,
        "seconds": time.perf_counter() - t0,
    }
    np.savez(path + ".npz", **{k: v.detach().cpu().numpy() for k, v in model.state_dict().items()})
    Path(path + ".json").write_text(json_text(meta, indent=1))
    return meta


def load_member(path: str | Path) -> tuple[Transformer, dict]:
    """A cached pool member: ``<path>.npz`` (weights, loaded without unpickling) and ``<path>.json``."""
    import zipfile

    from ..io import np_load

    path = str(path)
    try:
        meta = json.loads(Path(path + ".json").read_text())
        cfg = dict(meta["config"])
        cfg["dtype"] = getattr(torch, cfg["dtype"])
        model = Transformer(TransformerConfig(**cfg))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(
            f"the cached pool member {path + '.json'!r} cannot be read ({type(e).__name__}: {e}); delete it (and "
            "its .npz) to train the member again"
        ) from None
    try:
        z = np_load(path + ".npz")
        if isinstance(z, np.ndarray):
            raise ValueError("it holds one array, not the model's named weights")
        with z:
            model.load_state_dict({k: torch.from_numpy(z[k]) for k in z.files})
    except (ValueError, KeyError, RuntimeError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(
            f"the cached pool member {path + '.npz'!r} cannot be read ({type(e).__name__}: {e}); delete it (and "
            "its .json) to train the member again"
        ) from None
    model.eval()
    return model, meta


def pool_members(s: InterpretiveSettings, pipeline_seed: int) -> tuple[tuple[str, int], ...]:
    """The pool members of a pipeline seed: ``s.members``, their seeds shifted by ``1000 * pipeline_seed`` when
    ``s.independent_pools`` (pipeline seed 0 is ``s.members`` itself)."""
    if not s.independent_pools:
        return tuple(s.members)
    return tuple((arch, seed + 1000 * pipeline_seed) for arch, seed in s.members)


def train_pool(
    s: InterpretiveSettings,
    cache_dir: str | Path,
    log=print,
    members: tuple[tuple[str, int], ...] | None = None,
    min_sequence_accuracy: float = 0.9,
) -> tuple[dict, dict]:
    """Every routine's pool (``members``, default ``s.members``), trained where not cached (``s.num_workers``
    processes, ``s.num_threads`` threads each). Returns ``({routine: [model per member]}, info)`` with per-member
    metrics and the wall and CPU time of the training done now.

    A member whose held-out sequence accuracy is below ``min_sequence_accuracy`` has not learnt its routine: an
    implementation that chains it computes another algorithm. Such members (trained now or cached) are named in a
    ``UserWarning`` and listed in ``info["failed_members"]``; they stay in the pool (dropping or retraining them
    would change the protocol), so results that use them should be read with that in mind."""
    members = tuple(s.members if members is None else members)
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    routines = sorted({r for a in s.algorithms for r in ALGORITHMS[a]})
    jobs, paths = [], {}
    for r in routines:
        for arch, seed in members:
            p = str(cache / _member_key(r, arch, seed, s))
            paths[(r, arch, seed)] = p
            if not (Path(p + ".npz").exists() and Path(p + ".json").exists()):
                jobs.append((r, arch, seed, s.steps, s.batch_size, s.lr, p, s.num_threads))
    t0 = time.perf_counter()
    trained = []
    if jobs:
        log(f"training {len(jobs)} pool members ({len(paths) - len(jobs)} cached) on {s.num_workers} workers")
        if s.num_workers > 1:
            import multiprocessing as mp

            with ProcessPoolExecutor(s.num_workers, mp_context=mp.get_context("spawn")) as ex:
                for meta in ex.map(_train_member, jobs):
                    trained.append(meta)
                    log(f"  {meta['routine']:<20} {meta['arch']} seed {meta['seed']}: seq acc "
                        f"{meta['sequence_accuracy']:.3f} ({meta['cpu_seconds']:.0f} s CPU)")  # fmt: skip
        else:
            for job in jobs:
                trained.append(_train_member(job))
    wall = time.perf_counter() - t0
    pool, metas = {}, {}
    for r in routines:
        pool[r] = []
        for arch, seed in members:
            m, meta = load_member(paths[(r, arch, seed)])
            pool[r].append(m)
            metas[f"{r}/{arch}/seed{seed}"] = {
                k: meta[k] for k in ("token_accuracy", "sequence_accuracy", "cpu_seconds", "seconds")
            }
    failed = {
        k: m["sequence_accuracy"] for k, m in metas.items() if m["sequence_accuracy"] < min_sequence_accuracy
    }
    if failed:
        warnings.warn(
            f"{len(failed)} pool member(s) did not learn their routine (held-out sequence accuracy below "
            f"min_sequence_accuracy={min_sequence_accuracy}): "
            + ", ".join(f"{k} {v:.3f}" for k, v in sorted(failed.items())),
            stacklevel=2,
        )
    info = {
        "members": metas,
        "failed_members": failed,
        "trained_now": len(trained),
        "cached": len(paths) - len(jobs),
        "train_wall_seconds": wall,
        "train_cpu_seconds": sum(m["cpu_seconds"] for m in trained),
    }
    return pool, info


def train_pools(s: InterpretiveSettings, cache_dir: str | Path, log=print) -> tuple[dict, dict]:
    """The pools of every pipeline seed (:func:`pool_members`), trained together where not cached. Returns
    ``({pipeline seed: {routine: [model per member]}}, info)``."""
    per_seed = {ps: pool_members(s, ps) for ps in s.pipeline_seeds}
    union = tuple(dict.fromkeys(m for ms in per_seed.values() for m in ms))
    pool, info = train_pool(s, cache_dir, log=log, members=union)
    index = {m: j for j, m in enumerate(union)}
    pools = {
        ps: {r: [models[index[m]] for m in ms] for r, models in pool.items()} for ps, ms in per_seed.items()
    }
    return pools, info


# ------------------------------------------------------------------------------------------------ implementations


def head_importance(model: Transformer, x: torch.Tensor, y: torch.Tensor, perm: torch.Tensor) -> np.ndarray:
    """``(n_layers, n_heads)``: the drop in token accuracy on ``x -> y`` when one head's output (``hook_z``, all
    positions) is replaced by its value on the inputs ``x[perm]``."""
    tokens = encode(x)
    cfg = model.cfg
    hooks = [f"blocks.{layer}.attn.hook_z" for layer in range(cfg.n_layers)]
    with torch.no_grad():
        base = float((decode(model(tokens)) == y).float().mean())
        _, cf = model.run_with_cache(encode(x[perm]), names_filter=hooks)
    out = np.zeros((cfg.n_layers, cfg.n_heads))
    for layer in range(cfg.n_layers):
        for h in range(cfg.n_heads):
            fn = _patch_fn(cf[hooks[layer]], [h])
            with torch.no_grad(), model.hooks([(hooks[layer], fn)]):
                out[layer, h] = base - float((decode(model(tokens)) == y).float().mean())
    return out


def _patch_fn(src: torch.Tensor, heads: list[int]):
    def fn(z, hook):
        z = z.clone()
        z[:, :, heads] = src[:, :, heads]
        return z

    return fn


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.contiguous().numpy().tobytes()).hexdigest()


class StageCache:
    """Stage results shared by the :class:`ChainImplementations` of one set of inputs, keyed by what determines
    them: the routine, the pool member, and the *content* of the stage's clean and counterfactual inputs. Chains
    whose earlier stages give identical outputs (the routines most members compute exactly) share every later
    stage's forward passes and head importances; the values are those of the computation itself, not
    approximations."""

    def __init__(self) -> None:
        self.stages: dict[tuple, tuple[torch.Tensor, torch.Tensor, dict]] = {}
        self.importance: dict[tuple, np.ndarray] = {}
        self.forwards = {"stages": 0, "importance": 0, "patched": 0}
        """Forward passes run, by purpose (clean and counterfactual stage runs, head importance, patched
        chains)."""


class ChainImplementations:
    """Every implementation of one algorithm: the chains of one pool member per routine, on inputs ``x``.

    ``impl[i]`` is the ``(n, features)`` float64 representation of chain ``i`` (members in row-major order over the
    stages): each stage's :func:`~pypattern.interpretive.accumulated_residual`, concatenated. Stage outputs are the
    argmax (over the 11 tokens) at positions 10..19 and feed the next stage. Stage results are cached by
    member and input content (``cache``, a :class:`StageCache`, may be shared by the algorithms on the same
    inputs), so chains and algorithms that feed a member the same inputs run it once. ``patched(i, k)``: the same
    chain with its ``k`` most important heads (by :func:`head_importance` on each stage's clean input, over all
    stages) patched with their values on the counterfactual inputs ``x_cf`` run through the same chain.
    """

    def __init__(
        self, routines, pool: dict, x: torch.Tensor, x_cf: torch.Tensor, cache: StageCache | None = None
    ) -> None:
        self.routines = list(routines)
        self.models = [pool[r] for r in self.routines]
        self.sizes = [len(m) for m in self.models]
        self.x, self.x_cf = x, x_cf
        self.cache = cache if cache is not None else StageCache()
        self._prefix: dict[tuple, tuple[torch.Tensor, torch.Tensor, dict]] = {}
        self._importance: dict[tuple, np.ndarray] = {}

    def __len__(self) -> int:
        return math.prod(self.sizes)

    def members(self, i: int) -> tuple[int, ...]:
        if not 0 <= i < len(self):
            raise IndexError(f"implementation {i} out of range (there are {len(self)})")
        return tuple(int(v) for v in np.unravel_index(i, self.sizes))

    def _stage(self, key: tuple) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(representation, output, hook_z cache on the counterfactual stream) of the chain prefix ``key``."""
        if key in self._prefix:
            return self._prefix[key]
        s = len(key) - 1
        if s == 0:
            inp, inp_cf = self.x, self.x_cf
        else:
            prev = self._stage(key[:-1])
            inp, inp_cf = prev[1], prev[2]["out"]
        ckey = (self.routines[s], id(self.models[s][key[-1]]), _digest(inp), _digest(inp_cf))
        val = self.cache.stages.get(ckey)
        if val is None:
            model = self.models[s][key[-1]]
            rep, logits = accumulated_residual(model, encode(inp))
            hooks = [f"blocks.{layer}.attn.hook_z" for layer in range(model.cfg.n_layers)]
            with torch.no_grad():
                logits_cf, cf = model.run_with_cache(encode(inp_cf), names_filter=hooks)
            cfd = dict(cf)
            cfd["out"] = decode(logits_cf)
            cfd["in"] = inp
            val = (rep, decode(logits), cfd)
            self.cache.stages[ckey] = val
            self.cache.forwards["stages"] += 2
        self._prefix[key] = val
        return val

    def __getitem__(self, i: int) -> torch.Tensor:
        key = self.members(i)  # stages are cached; the concatenation is not (it is cheap, and memory is not)
        return torch.cat([self._stage(key[: s + 1])[0] for s in range(len(key))], 1).double()

    def ranked_heads(self, i: int) -> list[tuple[int, int, int]]:
        """``(stage, layer, head)`` of chain ``i``, most important first (ties broken by position)."""
        key = self.members(i)
        scored = []
        for s, m in enumerate(key):
            # a stage's input depends on every member before it: importances are the chain prefix's own
            if key[: s + 1] not in self._importance:
                inp = self._stage(key[: s + 1])[2]["in"]
                model = self.models[s][m]
                ikey = (self.routines[s], id(model), _digest(inp))
                if ikey not in self.cache.importance:
                    perm = torch.randperm(inp.shape[0], generator=torch.Generator().manual_seed(17))
                    self.cache.importance[ikey] = head_importance(
                        model, inp, run_routine(self.routines[s], inp), perm
                    )
                    self.cache.forwards["importance"] += 2 + model.cfg.n_layers * model.cfg.n_heads
                self._importance[key[: s + 1]] = self.cache.importance[ikey]
            imp = self._importance[key[: s + 1]]
            scored += [(-imp[la, h], s, la, h) for la in range(imp.shape[0]) for h in range(imp.shape[1])]
        return [(s, la, h) for _, s, la, h in sorted(scored)]

    def patched(self, i: int, k: int) -> torch.Tensor:
        """Representation of chain ``i`` with its ``k`` most important heads patched (``k = 0``: ``self[i]``; a ``k``
        above the chain's number of heads is refused).
        A stage without patched heads whose input equals the clean chain's is the clean chain's stage."""
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 0:
            raise ValueError(f"k={k!r} is not valid; give the number of heads to patch, an int >= 0")
        if k == 0:
            return self[i]
        key = self.members(i)
        ranked = self.ranked_heads(i)
        if k > len(
            ranked
        ):  # every head is patched from len(ranked) on: larger budgets would repeat that point
            raise ValueError(
                f"k={k} is more heads than chain {i} has ({len(ranked)}); give a budget k <= {len(ranked)}"
            )
        heads = ranked[:k]
        inp, reps = self.x, []
        for s, m in enumerate(key):
            model = self.models[s][m]
            clean = self._stage(key[: s + 1])
            cf = clean[2]
            fwd = []
            for layer in range(model.cfg.n_layers):
                hs = [h for (ss, la, h) in heads if ss == s and la == layer]
                if hs:
                    name = f"blocks.{layer}.attn.hook_z"
                    fwd.append((name, _patch_fn(cf[name], hs)))
            if not fwd and torch.equal(inp, clean[2]["in"]):  # nothing patched upstream reached this stage
                rep, out = clean[0], clean[1]
            else:
                rep, logits = accumulated_residual(model, encode(inp), fwd_hooks=fwd)
                out = decode(logits)
                self.cache.forwards["patched"] += 1
            reps.append(rep.double())
            inp = out
        return torch.cat(reps, 1)


# ------------------------------------------------------------------------------------------------ the run


def _chain_accuracy(impl: ChainImplementations, algorithm: str) -> float:
    """Fraction of inputs on which chain 0 (first member of every routine) gives the algorithm's output."""
    key = impl.members(0)
    out = impl._stage(key)[1]
    return float((out == run_algorithm(algorithm, impl.x)[-1]).all(-1).float().mean())


def run_pipeline_seed(pool: dict, s: InterpretiveSettings, seed: int, log=print) -> dict:
    """One seed of the pipeline on its pool: inputs, counterfactual inputs, implementation draws and splits come
    from ``seed``. Returns the grid and the selectivity curve of every measure, with CPU and wall seconds."""
    t0, c0 = time.perf_counter(), time.process_time()
    g = torch.Generator().manual_seed(1000 + seed)
    x = torch.randint(0, VOCAB, (s.num_inputs, SEQ_LEN), generator=g)
    x_cf = torch.randint(0, VOCAB, (s.num_inputs, SEQ_LEN), generator=g)
    cache = StageCache()
    impls = {a: ChainImplementations(ALGORITHMS[a], pool, x, x_cf, cache) for a in s.algorithms}
    rec = {
        "pipeline_seed": seed,
        "pool_members": [list(m) for m in pool_members(s, seed)],
        "chain0_sequence_accuracy": {a: _chain_accuracy(impls[a], a) for a in s.algorithms},
        "grid": {},
        "selectivity": {},
        "seconds_per_measure": {},
        "cpu_seconds_per_measure": {},
    }
    kw = {"train_fraction": s.train_fraction, "alphas": s.alphas}
    names = s.algorithms
    for measure in s.measures:
        tm, cm = time.perf_counter(), time.process_time()
        grid = distinguishability_grid(
            impls, measure=measure, num_trials=s.num_trials, num_repeats=s.num_repeats, z=s.z, seed=seed, **kw
        )
        tests = [[grid.tests[(a, b)] for b in names] for a in names]
        rec["grid"][measure] = {
            "fraction_positive": grid.fraction.tolist(),
            "win_rate": grid.win_rate.tolist(),
            "p": [[t.p.tolist() for t in row] for row in tests],
            "positive": [[t.positive.tolist() for t in row] for row in tests],
            "mean_own": [[float(t.own.mean()) for t in row] for row in tests],
            "mean_other": [[float(t.other.mean()) for t in row] for row in tests],
        }
        rec["seconds_per_measure"][measure] = time.perf_counter() - tm
        rec["cpu_seconds_per_measure"][measure] = time.process_time() - cm
        log(
            f"pipeline seed {seed}, {measure}: diagonal {np.diag(grid.fraction).mean():.2f}, off-diagonal "
            f"{grid.off_diagonal().mean():.2f} ({time.process_time() - cm:.0f} s CPU)"
        )
    tm, cm = time.perf_counter(), time.process_time()
    sel: dict = {m: {} for m in s.measures}
    num: dict = {m: {} for m in s.measures}
    for ai, a in enumerate(names):
        others = [impls[b] for b in names if b != a]
        res = selectivity_curves(
            impls[a], impls[a].patched, others, s.budgets, measures=s.measures,
            num_trials=s.selectivity_trials, seed=seed * 7919 + ai, **kw,
        )  # fmt: skip
        for m in s.measures:
            sel[m][a] = {str(k): res[m].win_rate[k] for k in s.budgets}
            num[m][a] = {str(k): [res[m].num_wins[k], res[m].num_comparisons[k]] for k in s.budgets}
    rec["selectivity"] = sel
    rec["selectivity_counts"] = num
    rec["selectivity_seconds"] = time.perf_counter() - tm
    rec["selectivity_cpu_seconds"] = time.process_time() - cm
    log(
        f"pipeline seed {seed}, selectivity: "
        + "; ".join(
            f"{m} "
            + ", ".join(f"k={k}: {np.mean([sel[m][a][str(k)] for a in names]):.2f}" for k in s.budgets)
            for m in s.measures
        )
        + f" ({rec['selectivity_cpu_seconds']:.0f} s CPU)"
    )
    rec["forwards"] = dict(cache.forwards)
    log(f"pipeline seed {seed}: forward passes {rec['forwards']}")
    rec["seconds"] = time.perf_counter() - t0
    rec["cpu_seconds"] = time.process_time() - c0
    return rec


def run_interpretive(
    out_dir: str | Path = "out/interpretive",
    s: InterpretiveSettings | None = None,
    *,
    cache_dir: str | Path | None = None,
    name: str = "interpretive",
    log=print,
) -> dict:
    """Train (or load) the pool, then the grid and the selectivity curve for every measure and pipeline seed.
    Writes ``<name>.json`` and the plots (``<name>_grid.png``, ``<name>_selectivity.png``) into ``out_dir``;
    returns the report dict."""
    s = check_settings(s or InterpretiveSettings())  # before the pool is trained
    log = log or (lambda *a: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    pools, pool_info = train_pools(s, cache_dir or out / "pool", log=log)
    old = torch.get_num_threads()
    torch.set_num_threads(s.num_threads)
    try:
        per_seed = [run_pipeline_seed(pools[ps], s, ps, log=log) for ps in s.pipeline_seeds]
    finally:
        torch.set_num_threads(old)
    report = {
        "settings": dataclasses.asdict(s),
        "algorithms": {a: list(ALGORITHMS[a]) for a in s.algorithms},
        "archs": ARCHS,
        "pool": pool_info,
        "per_seed": per_seed,
        "summary": _summary(per_seed, s.algorithms, s.measures, s.budgets),
        "seconds": time.perf_counter() - t_start,
    }
    report["plots"] = _plot(report, out, name)
    (out / f"{name}.json").write_text(json_text(report, indent=1))
    return report


_PER_MEASURE = ("grid", "selectivity", "selectivity_counts", "seconds_per_measure", "cpu_seconds_per_measure")


def merge_reports(paths: list[str | Path], out_dir: str | Path, name: str = "interpretive") -> dict:
    """Combine reports of the same settings run for different pipeline seeds or measures (e.g. in parallel
    processes) into one report with its summary and plots. Reports whose settings differ in anything but the
    pipeline seeds, the measures and the processes and threads used are refused, naming the report and the fields:
    their grids and curves are not of one experiment."""
    reps = [json.loads(Path(p).read_text()) for p in paths]
    if not reps:
        raise ValueError("paths is empty: give the reports to merge")
    own = (
        "pipeline_seeds",
        "measures",
        "num_workers",
        "num_threads",
    )  # free to differ (the last two: speed only)
    ref = {k: v for k, v in reps[0]["settings"].items() if k not in own}
    for p, rep in zip(paths[1:], reps[1:]):
        st = {k: v for k, v in rep["settings"].items() if k not in own}
        diff = sorted(k for k in set(ref) | set(st) if ref.get(k) != st.get(k))
        if diff:
            raise ValueError(
                f"the report {str(p)!r} has other settings than {str(paths[0])!r} ("
                + ", ".join(f"{k}: {st.get(k)!r} vs {ref.get(k)!r}" for k in diff)
                + "); merge only reports of the same settings (they may differ in pipeline_seeds and measures)"
            )
    base = dict(reps[0])
    by_seed: dict[int, dict] = {}
    for rep in reps:  # reports may split the seeds, the measures, or both
        for r in rep["per_seed"]:
            cur = by_seed.setdefault(r["pipeline_seed"], {**r, **{k: {} for k in _PER_MEASURE if k in r}})
            for k in _PER_MEASURE:
                if k in r:
                    cur.setdefault(k, {}).update(r[k])
    base["per_seed"] = [by_seed[k] for k in sorted(by_seed)]
    st = base["settings"]
    st["pipeline_seeds"] = sorted(by_seed)
    st["measures"] = [m for m in MEASURES if all(m in r["grid"] for r in base["per_seed"])]
    base["summary"] = _summary(base["per_seed"], st["algorithms"], st["measures"], st["budgets"])
    base["seconds_per_report"] = [rep["seconds"] for rep in reps]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base["plots"] = _plot(base, out, name)
    (out / f"{name}.json").write_text(json_text(base, indent=1))
    return base


def _summary(per_seed: list, algorithms, measures, budgets) -> dict:
    out = {}
    k = len(algorithms)
    off = ~np.eye(k, dtype=bool)
    for m in measures:
        # (seeds, k, k); a report read back holds null where a value was not finite
        g = np.array([r["grid"][m]["fraction_positive"] for r in per_seed], dtype=float)
        sel = {
            str(b): float(
                np.mean(
                    np.array(
                        [r["selectivity"][m][a][str(b)] for r in per_seed for a in algorithms], dtype=float
                    )
                )
            )
            for b in budgets
        }
        out[m] = {
            "diagonal_mean": float(g[:, ~off].mean()),
            "diagonal_max": float(g[:, ~off].max()),
            "off_diagonal_mean": float(g[:, off].mean()),
            "off_diagonal_min": float(g[:, off].min()),
            "selectivity": sel,
        }
    return out


def _plot(report: dict, out: Path, name: str) -> list[str]:
    from . import _figures as plt

    s = report["settings"]
    names = s["algorithms"]
    measures = s["measures"]
    per = report["per_seed"]
    fig, axes = plt.subplots(1, len(measures), figsize=(6.0 * len(measures), 4.6), squeeze=False)
    fig.subplots_adjust(wspace=0.75)
    for ax, m in zip(axes[0], measures):
        g = np.mean(np.array([r["grid"][m]["fraction_positive"] for r in per], dtype=float), 0)
        im = ax.imshow(g, vmin=0, vmax=1, cmap="viridis")
        for i, j in itertools.product(range(len(names)), repeat=2):
            ax.text(
                j,
                i,
                f"{g[i, j]:.2f}",
                ha="center",
                va="center",
                color="w" if g[i, j] < 0.6 else "k",
                fontsize=7,
            )
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=6)
        ax.set_yticks(range(len(names)), names, fontsize=6)
        ax.set_title(
            f"{m}: fraction of repeats distinguishable\n(row A, column B; mean of {len(per)} seed(s))",
            fontsize=8,
        )
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.7)
    p1 = out / f"{name}_grid.png"
    fig.savefig(p1, dpi=110, bbox_inches="tight")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for m in measures:
        sel = report["summary"][m]["selectivity"]
        ks = [int(k) for k in sel]
        ax.plot(ks, [sel[str(k)] for k in ks], marker="o", label=m)
    ax.axhline(0.5, color="gray", ls=":", lw=1)
    ax.set_xlabel("patching budget k (heads)")
    ax.set_ylabel("win rate: s(a -> b) > s(patched a -> b)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    p2 = out / f"{name}_selectivity.png"
    fig.savefig(p2, dpi=110)
    plt.close(fig)
    return [str(p1), str(p2)]


def run_interpretive_demo(
    out_dir: str | Path = "out/demo/equivalence",
    full: bool = False,
    quick: bool = False,
    log=print,
    threads: int | None = None,
) -> dict:
    """``pypattern demo equivalence``: the reduced run (:func:`reduced_interpretive_settings`; the full run with
    ``full=True``, tiny sizes with ``quick=True``), pool cached in ``out_dir/pool``. Returns the headline numbers;
    writes ``interpretive.json``, ``interpretive_grid.png`` and ``interpretive_selectivity.png``. ``threads``:
    torch's thread count in every process, each worker training the pool and the main process (the settings'
    ``num_threads``; None: the settings' own, 1). It changes the speed, not the cached pool's key."""
    from .._checks import is_count

    if full and quick:
        raise ValueError("full and quick exclude each other")
    if threads is not None and (not is_count(threads) or threads < 1):
        raise ValueError(
            f"threads={threads!r} is not valid; give the number of threads as an int >= 1, or None"
        )
    s = (
        InterpretiveSettings()
        if full
        else quick_interpretive_settings()
        if quick
        else reduced_interpretive_settings()
    )
    if threads is not None:
        s = dataclasses.replace(s, num_threads=int(threads))
    c0 = time.process_time()
    rep = run_interpretive(out_dir, s, log=log)
    out = {}
    for m, v in rep["summary"].items():
        out[f"{m}: same-algorithm pairs distinguishable (fraction of repeats, mean)"] = round(
            v["diagonal_mean"], 2
        )
        out[f"{m}: different-algorithm pairs distinguishable (mean / min)"] = (
            f"{v['off_diagonal_mean']:.2f} / {v['off_diagonal_min']:.2f}"
        )
        out[f"{m}: selectivity win rate by budget k"] = {k: round(w, 2) for k, w in v["selectivity"].items()}
    out["pool"] = (
        f"{rep['pool']['trained_now']} trained now ({rep['pool']['train_cpu_seconds']:.0f} s CPU), "
        + (f"{rep['pool']['cached']} cached")
    )
    out["seconds"] = round(rep["seconds"], 1)
    out["cpu_seconds_main_process"] = round(time.process_time() - c0, 1)
    out["report"] = str(Path(out_dir) / "interpretive.json")
    out["plots"] = rep["plots"]
    return out


def main(argv=None) -> int:
    """``python -m pypattern.experiments.interpretive [out_dir] [--full] [--cache DIR] [--seeds 0,1,2]
    [--name NAME] [--pool-only] [--merge A.json B.json ...]``."""
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", nargs="?", default="out/interpretive")
    ap.add_argument("--full", action="store_true", help="the full run instead of the reduced demo")
    ap.add_argument("--cache", default=None, help="pool cache directory (default OUT_DIR/pool)")
    ap.add_argument("--seeds", default=None, help="pipeline seeds, comma-separated (default: the settings')")
    ap.add_argument("--budgets", default=None, help="patching budgets k, comma-separated")
    ap.add_argument("--repeats", type=int, default=None, help="repeats of the win test per ordered pair")
    ap.add_argument(
        "--selectivity-trials", type=int, default=None, help="trials per other algorithm and budget"
    )
    ap.add_argument("--trials", type=int, default=None, help="trials per repeat of the win test")
    ap.add_argument(
        "--shared-pool", action="store_true", help="every pipeline seed uses the same pool (seed 0's)"
    )
    ap.add_argument(
        "--members",
        default=None,
        help="pool members of every routine as ARCH:SEED, comma-separated (default: the settings'), e.g. "
        "L2d32h4:0,L2d32h4:1,L1d48h4:2",
    )
    ap.add_argument("--measures", default=None, help="comma-separated subset of ridge,cka,procrustes")
    ap.add_argument("--name", default="interpretive", help="report and plot file stem")
    ap.add_argument("--workers", type=int, default=None, help="processes training the pool (default 2)")
    ap.add_argument("--pool-only", action="store_true", help="train (or load) the pool and stop")
    ap.add_argument("--merge", nargs="+", default=None, help="merge these reports (one per seed) and stop")
    a = ap.parse_args(argv)
    if a.merge:
        rep = merge_reports(a.merge, a.out_dir, a.name)
        print(json.dumps({"summary": rep["summary"], "plots": rep["plots"]}, indent=1))
        return 0
    try:
        s = _settings_from_args(a)
    except ValueError as e:
        ap.error(str(e))
    if a.pool_only:
        _, info = train_pools(s, a.cache or Path(a.out_dir) / "pool", log=lambda *m: print(*m, flush=True))
        print(json.dumps({k: v for k, v in info.items() if k != "members"}, indent=1))
        return 0
    rep = run_interpretive(a.out_dir, s, cache_dir=a.cache, name=a.name, log=lambda *m: print(*m, flush=True))
    pool = {k: v for k, v in rep["pool"].items() if k != "members"}
    print(
        json.dumps(
            {"summary": rep["summary"], "pool": pool, "seconds": rep["seconds"], "plots": rep["plots"]},
            indent=1,
        )
    )
    return 0


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{flag}: give comma-separated integers, got {text!r}") from None


def _settings_from_args(a) -> InterpretiveSettings:
    """The settings :func:`main`'s arguments ask for, checked (:func:`check_settings`) before any work; a
    ``ValueError`` names the option or the field."""
    s = InterpretiveSettings() if a.full else reduced_interpretive_settings()
    if a.workers is not None:
        s.num_workers = a.workers
    if a.budgets is not None:
        s.budgets = _ints(a.budgets, "--budgets")
    if a.repeats is not None:
        s.num_repeats = a.repeats
    if a.members is not None:
        members = [m.split(":") for m in a.members.split(",")]
        bad = [m for m in members if len(m) != 2 or m[0] not in ARCHS or not m[1].lstrip("-").isdigit()]
        if bad:
            raise ValueError(
                f"--members: each entry is ARCH:SEED with ARCH in {sorted(ARCHS)}, got {a.members!r}"
            )
        s.members = tuple((arch, int(seed)) for arch, seed in members)
    if a.trials is not None:
        s.num_trials = a.trials
    if a.shared_pool:
        s.independent_pools = False
    if a.selectivity_trials is not None:
        s.selectivity_trials = a.selectivity_trials
    if a.measures is not None:
        s.measures = tuple(a.measures.split(","))
    if a.seeds is not None:
        s.pipeline_seeds = _ints(a.seeds, "--seeds")
    try:
        return check_settings(s)
    except ValueError as e:
        field = str(e).split("=", 1)[0]
        flag = _FLAG_OF.get(field)
        raise ValueError(f"{flag}: {e}" if flag else str(e)) from None


#: the options of :func:`main` that set a field of the settings
_FLAG_OF = {
    "num_workers": "--workers",
    "budgets": "--budgets",
    "num_repeats": "--repeats",
    "num_trials": "--trials",
    "selectivity_trials": "--selectivity-trials",
    "measures": "--measures",
    "pipeline_seeds": "--seeds",
    "members": "--members",
}


if __name__ == "__main__":
    raise SystemExit(main())
