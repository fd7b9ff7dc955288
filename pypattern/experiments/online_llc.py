"""The LLC during training on the induction task: :class:`pypattern.sampling.OnlineLLC` beside the
prefix-matching score of the last layer's heads and the loss on induction-predictable tokens.

The model, task and optimiser are the induction experiment's baseline (:class:`InductionSettings`: 2 layers,
d_model 32, 2 heads, d_vocab 64, sequences of 33 tokens, AdamW 3e-3, batch 32, online batches). Every
``every`` steps the callback estimates the LLC on a fixed set of task samples (a loader of ``(tokens, targets)``
batches, next-token cross-entropy on the scored positions), without changing the training run.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from ..models.transformer import Transformer
from ..sampling.online import OnlineLLC
from ..tasks.base import IGNORE
from ..tasks.induction import prefix_matching_score
from ..tasks.training import train
from .induction import InductionSettings, induction_curve_point

__all__ = ["run_online_llc_induction"]


def _task_loss(m, batch) -> torch.Tensor:
    tokens, targets = batch
    logits = m(tokens)
    return F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE)


def run_online_llc_induction(
    seed: int = 0,
    steps: int = 1500,
    every: int = 100,
    s: InductionSettings | None = None,
    *,
    num_chains: int = 4,
    num_draws: int = 100,
    num_burnin_steps: int = 100,
    step_size: float = 1e-4,
    localization: float = 100.0,
    nbeta: float | None = None,
    num_batches: int = 4,
    batch_size: int = 64,
) -> dict:
    """Train the induction baseline for ``steps`` steps with an :class:`OnlineLLC` every ``every`` steps.

    Returns
    -------
    dict
        ``llc`` (an :class:`OnlineLLCResult`), ``curve`` ``(num_estimates, 4)``: step, loss on induction tokens,
        on the other tokens, maximum prefix-matching score of the last layer's heads; ``seconds`` (training and
        LLC separately) and the settings.
    """
    s = s or InductionSettings()
    task = s.task()
    data = task.sample(num_batches * batch_size, seed=4242)
    loader = [
        (data.tokens[i : i + batch_size], data.targets[i : i + batch_size])
        for i in range(0, len(data.tokens), batch_size)
    ]
    ev = task.sample(s.num_eval, seed=777)
    model = Transformer(task.model_config(d_model=s.d_model, n_heads=s.n_heads, seed=seed))
    cb = OnlineLLC(
        loader,
        every=every,
        loss_fn=_task_loss,
        num_chains=num_chains,
        num_draws=num_draws,
        num_burnin_steps=num_burnin_steps,
        step_size=step_size,
        localization=localization,
        nbeta=nbeta,
        seed=seed,
    )
    curve = []

    def callback(step, m):
        t = step + 1
        if t % every:
            return
        was = m.training
        m.eval()
        with torch.no_grad():
            li, lo = induction_curve_point(m, ev)
            pm = float(prefix_matching_score(m, half_len=task.repeat_len, num_samples=32, seed=0)[-1].max())
            train_loss = float(_task_loss(m, loader[0]))
        m.train(was)
        curve.append((t, li, lo, pm))
        cb(m, t, loss=train_loss)

    t0 = time.perf_counter()
    train(
        model,
        task,
        steps=steps,
        batch_size=s.batch_size,
        lr=s.lr,
        seed=seed,
        log_every=0,
        callback=callback,
        quiet=True,
    )
    total = time.perf_counter() - t0
    return {
        "llc": cb.result,
        "curve": np.asarray(curve),
        "seconds": {"total": total, "llc": cb.seconds, "training": total - cb.seconds},
        "settings": dict(
            seed=seed,
            steps=steps,
            every=every,
            num_chains=num_chains,
            num_draws=num_draws,
            num_burnin_steps=num_burnin_steps,
            step_size=step_size,
            localization=localization,
            nbeta=nbeta,
            llc_data=f"{num_batches} x {batch_size} task samples (seed 4242)",
        ),
    }


def plot_online_llc(out: dict, path=None):
    """The LLC curve with the training loss, the induction-token loss and the prefix-matching score."""
    from .._plotting import new_figure

    fig = new_figure(path, (8, 4.5))
    ax = fig.add_subplot()
    c = out["curve"]
    out["llc"].plot(ax, extra={"induction-token loss": c[:, 1], "prefix-matching score": c[:, 3]})
    ax.set_title("LLC during training (induction task)")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
