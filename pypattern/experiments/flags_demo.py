"""``pypattern demo flags``: train concept flags into a small transformer, steer with them, and compare with a
control that had the same training budget without flags (settings and measured figures: docs/flags_results.md).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path

from .._threads import pinned_threads
from ..flags import FlagSpec, flag_report, train_flags
from ..io import json_text
from ..models.transformer import Transformer
from ..tasks.topics import TopicTask
from ..tasks.training import train
from ._outputs import check_outputs

__all__ = ["FlagsDemoSettings", "check_settings", "run_flags_demo"]


@dataclasses.dataclass
class FlagsDemoSettings:
    """Defaults: the run of docs/flags_results.md (5 topics, 3 layers, d_model 64, 16 flag dimensions)."""

    num_topics: int = 5
    tokens_per_topic: int = 6
    num_shared: int = 4
    seq_len: int = 24
    n_layers: int = 3
    d_model: int = 64
    n_heads: int = 4
    d_mlp: int = 128
    hook: str = "blocks.2.hook_resid_pre"
    num_flag_dims: int = 16
    pretrain_steps: int = 400
    stage1_steps: int = 400
    stage2_steps: int = 400
    aux_weight: float = 1.0
    num_samples: int = 512
    seed: int = 0
    num_threads: int | None = 1

    @classmethod
    def quick(cls) -> FlagsDemoSettings:
        """Tiny sizes (2 topics, 2 layers, 100 steps per stage): checks that the demo runs; figures mean nothing."""
        return cls(
            num_topics=2, tokens_per_topic=8, seq_len=16, n_layers=2, d_model=32, n_heads=2, d_mlp=64,
            hook="blocks.1.hook_resid_pre", num_flag_dims=4, pretrain_steps=100, stage1_steps=100,
            stage2_steps=100, num_samples=128,
        )  # fmt: skip


def check_settings(s: FlagsDemoSettings) -> FlagsDemoSettings:
    """Refuse, naming the field, settings the demo would fail on only after training: sizes and ``num_flag_dims``
    below 1, step counts below 0, ``num_samples`` below 2 (the report's statistics), an ``aux_weight`` that is not a
    finite number >= 0, a ``seed`` that is not an int >= 0, a thread count that is not None or an int >= 1. (The
    task's sizes are checked by :class:`~pypattern.tasks.topics.TopicTask`, and ``hook`` and the flag dimensions
    against the model, before any training.)"""
    from .._checks import is_count, is_real

    if not isinstance(s, FlagsDemoSettings):
        raise TypeError(f"settings are a {type(s).__name__}; give a FlagsDemoSettings")
    least = {"n_layers": 1, "d_model": 1, "n_heads": 1, "d_mlp": 1, "num_flag_dims": 1, "num_samples": 2}
    least |= {"pretrain_steps": 0, "stage1_steps": 0, "stage2_steps": 0, "seed": 0}
    for field, low in least.items():
        value = getattr(s, field)
        if not is_count(value) or value < low:
            raise ValueError(f"{field}={value!r} is not valid; give an int >= {low}")
    if not is_real(s.aux_weight) or not 0 <= s.aux_weight < float("inf"):
        raise ValueError(f"aux_weight={s.aux_weight!r} is not valid; give a finite number >= 0")
    if s.num_threads is not None and (not is_count(s.num_threads) or s.num_threads < 1):
        raise ValueError(f"num_threads={s.num_threads!r} is not valid; give None or an int >= 1")
    return s


def run_flags_demo(out_dir: str | Path = "out/demo/flags", s: FlagsDemoSettings | None = None) -> dict:
    """Pre-train on :class:`TopicTask`, then fine-tune two copies for the same number of steps: with the flag
    loss and both stages, and plainly (the control). Writes ``flags_report.json`` and returns the headline
    numbers. Settings are checked (:func:`check_settings`) before any model is trained."""
    s = check_settings(s or FlagsDemoSettings())
    out = Path(out_dir)
    check_outputs(out, ("flags_report.json",))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    task = TopicTask(
        num_topics=s.num_topics,
        tokens_per_topic=s.tokens_per_topic,
        num_shared=s.num_shared,
        seq_len=s.seq_len,
    )
    spec = FlagSpec(s.hook, dims=tuple(range(s.num_flag_dims)), num_concepts=s.num_topics)
    with pinned_threads(s.num_threads or None):
        base = Transformer(
            task.model_config(
                n_layers=s.n_layers, d_model=s.d_model, n_heads=s.n_heads, d_mlp=s.d_mlp, seed=s.seed
            )
        )
        spec.check(base)  # the hook and the flag dimensions, before any training
        train(base, task, steps=s.pretrain_steps, seed=s.seed, log_every=0, quiet=True)
        flagged, control = copy.deepcopy(base), copy.deepcopy(base)
        train_flags(
            flagged,
            task,
            spec,
            stage1_steps=s.stage1_steps,
            stage2_steps=s.stage2_steps,
            aux_weight=s.aux_weight,
            seed=s.seed + 1,
            log_every=0,
            quiet=True,
        )
        train_flags(
            control,
            task,
            spec,
            stage1_steps=s.stage1_steps + s.stage2_steps,
            stage2_steps=0,
            aux_weight=0.0,
            seed=s.seed + 1,
            log_every=0,
            quiet=True,
        )
        kw = dict(num_samples=s.num_samples, seed=s.seed)
        rep = flag_report(flagged, task, spec, reference_model=base, **kw)
        ctl = flag_report(control, task, spec, **kw)
    result = {
        "settings": dataclasses.asdict(s),
        "flags": dataclasses.asdict(rep),
        "control": dataclasses.asdict(ctl),
        "seconds": time.perf_counter() - t0,
    }
    (out / "flags_report.json").write_text(json_text(result, default=float))
    return {
        "steering toward a concept against the prompt (flags / control / unsteered)": (
            f"{rep.steer_success:.3f} / {ctl.steer_success:.3f} / {rep.steer_baseline:.3f}"
        ),
        "flag read-out accuracy (flags / control)": f"{rep.flag_accuracy:.3f} / {ctl.flag_accuracy:.3f}",
        "reliance: loss increase with the flags ablated, nats (flags / control)": (
            f"{rep.reliance:.3f} / {ctl.reliance:.3f}"
        ),
        "clean loss (flags / control)": f"{rep.loss_clean:.3f} / {ctl.loss_clean:.3f}",
        "probe for the concept on the non-flag dims, R^2 (before / after)": (
            f"{rep.reference.get('probe_non_flag_r2', float('nan')):.4f} / {rep.probe_non_flag_r2:.4f}"
        ),
        "seconds": round(result["seconds"], 1),
        "report": str(out / "flags_report.json"),
    }
