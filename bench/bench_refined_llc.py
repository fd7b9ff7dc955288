"""Refined LLCs of every head of a 2-layer, 8-head attention-only transformer: pypattern batched (all 16
restricted runs in one ``sample(runs=)`` call, one ``vmap``-ed forward and backward per step) against the same
runs one after another, against the forward + backward floor of all restricted runs (``vmap(grad)`` over the
stacked chains of every run, no sampler), and against devinterp 2.0.1 run head by head with the same settings.

Run (one thread)::

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_refined_llc.py                          # pypattern only
    OMP_NUM_THREADS=1 .bench-venvs/devinterp20/bin/python bench/bench_refined_llc.py --devinterp --rounds 3 --chains 4
    OMP_NUM_THREADS=1 .bench-venvs/devinterp20/bin/python bench/bench_refined_llc.py --devinterp --rounds 2 \
        --chains 4 --train-steps 150 --step 1e-3

(the bench venv: ``PYPATTERN_LINK=1 bash bench/envs/devinterp.sh 20``). With ``--devinterp`` each round runs
ours batched, devinterp head by head, the floor and the moving floor one after another (interleaved, so that a
change in load hits all of them), and the per-head estimates of each round are compared (the last round's per
head). The moving floor stacks only the tensors the restricted runs move (the attention weights) and gives each
chain its own batch, as the batched sampler does; the floor stacks every parameter (``vmap(grad)``), so it also
pays the weight gradients of the embedding and unembedding, which no restricted run needs.

Each of the three is timed in CPU time of the process (``time.process_time``) and in wall time; the ratios are
taken from CPU time, on one thread (``torch.set_num_threads(1)``; set ``OMP_NUM_THREADS=1`` too), which other
processes on the same cores do not inflate as they do wall time.

Work: d_model 64, 8 heads of 8, d_vocab 32, n_ctx 16, 64 token sequences in batches of 16; per head
``--chains`` chains (default 2) x 50 draws, no burn-in, step ``--step`` (default 1e-4), localization 100,
nbeta 10, at random weights or (``--train-steps``) after Adam steps on the data, where the heads' LLCs are
clearly above zero; ``L_n(w*)`` over the 4 batches (all the data) on both sides. devinterp restricts a head with its own
``create_param_masks(model, "l{layer}h{head}")`` (the model has TransformerLens names and a ``cfg``, so devinterp
reads it as a HookedTransformer): boolean masks selecting the head's slices of W_Q, W_K, W_V, W_O, b_Q, b_K, b_V,
the same entries as pypattern's ``component_masks(model, "blocks.{layer}.attn.head.{head}")`` (checked before
the run). devinterp's LLC averages the loss of every step, as pypattern's does here (no burn-in): both record
the loss at a step before its update.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import subprocess
import time
import warnings

import numpy as np
import torch

from pypattern.models.transformer import Transformer, TransformerConfig, component_masks
from pypattern.sampling import estimate_llc, refined_llc


class Timer:
    """CPU time of the process (``time.process_time``) and wall time of a ``with`` block, in seconds."""

    def __enter__(self):
        self._cpu, self._wall = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.cpu = time.process_time() - self._cpu
        self.wall = time.perf_counter() - self._wall
        return False


# the timing work, matched to devinterp's runs head by head: 50 draws, no burn-in. At these settings the chains have
# not relaxed (the library says so when asked), so the estimates are compared only between runs of the same
# settings (batched against one head at a time, ours against devinterp), never against a true LLC.
KW = dict(
    num_chains=2,
    num_draws=50,
    step_size=1e-4,
    localization=100.0,
    nbeta=10.0,
    seed=0,
    warn_nonstationary=False,
)
BATCH = 16


def lm_loss(m, batch):
    return m(batch, return_type="loss")


class TLNamed(Transformer):
    """pypattern's Transformer as devinterp 2.0.1 handles a TransformerLens model: it calls
    ``model.to(device, print_details=False)`` and ``model(input_ids, return_type="logits")``."""

    def to(self, *args, print_details: bool | None = None, **kwargs):
        return super().to(*args, **kwargs)


def setup(train_steps: int = 0):
    """The model (random weights, or trained ``train_steps`` Adam steps on the bench's 64 sequences, which it
    then partly memorises), the data in 4 batches, and the 16 head names."""
    cfg = TransformerConfig(
        n_layers=2, d_model=64, n_heads=8, d_head=8, d_mlp=None, d_vocab=32, n_ctx=16, seed=0
    )
    model = TLNamed(cfg)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 32, (64, 16), generator=g)
    loader = [data[i : i + BATCH] for i in range(0, 64, BATCH)]
    if train_steps:
        torch.manual_seed(0)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for i in range(train_steps):
            loss = lm_loss(model, loader[i % len(loader)])
            opt.zero_grad()
            loss.backward()
            opt.step()
    heads = [f"blocks.{layer}.attn.head.{h}" for layer in range(2) for h in range(8)]
    return model.eval(), loader, heads


def floor_seconds(model, loader, heads, steps: int) -> Timer:
    """vmap(grad) of the loss over R x C stacked copies of the weights: one forward + backward per step."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    n = len(heads) * KW["num_chains"]
    stacked = {k: v.unsqueeze(0).expand(n, *v.shape).clone() for k, v in params.items()}
    batch = loader[0]

    def loss(p):
        return lm_loss(
            lambda b, return_type: functional_call(model, p, (b,), {"return_type": return_type}), batch
        )

    g = vmap(grad(loss))
    g(stacked)
    with Timer() as t:
        for _ in range(steps):
            g(stacked)
    return t


def moving_floor_seconds(model, loader, heads, steps: int) -> Timer:
    """The floor with only the tensors the restricted runs move stacked (the attention weights; the rest shared)
    and every chain on its own batch, as the batched sampler runs: a ``vmap``-ed forward and one
    ``autograd.grad`` of the summed losses per step."""
    from torch.func import functional_call, vmap

    moving = sorted({n for h in heads for n in component_masks(model, h)})
    params = {k: v.detach() for k, v in model.named_parameters()}
    frozen = {k: v for k, v in params.items() if k not in moving}
    n = len(heads) * KW["num_chains"]
    stacked = {k: params[k].unsqueeze(0).expand(n, *params[k].shape).clone() for k in moving}
    batches = [torch.stack([loader[(i + t) % len(loader)] for i in range(n)]) for t in range(len(loader))]

    def loss(p, b):
        return functional_call(model, {**p, **frozen}, (b,), {"return_type": "loss"})

    vloss = vmap(loss)

    def step(t):
        leaves = {k: v.requires_grad_(True) for k, v in stacked.items()}
        torch.autograd.grad(vloss(leaves, batches[t % len(batches)]).sum(), list(leaves.values()))

    step(0)
    with Timer() as t:
        for i in range(steps):
            step(i)
    return t


def ours_batched(model, loader, heads):
    with Timer() as t:
        res = refined_llc(
            model,
            loader,
            components=heads,
            include_full=False,
            loss_fn=lm_loss,
            batched=True,
            quiet=True,
            **KW,
        )
    return t, np.asarray(res.llc_per_chain)


def ours_one_by_one(model, loader, heads):
    per_chain = []
    with Timer() as t:
        for h in heads:
            m = component_masks(model, h)
            r = estimate_llc(model, loader, loss_fn=lm_loss, restrict_to=list(m), masks=m, quiet=True, **KW)
            per_chain.append(r.llc_per_chain)
    return t, np.asarray(per_chain)


def devinterp_masks(model, head: str):
    from devinterp.slt.weight_restrictions import create_param_masks

    layer, h = int(head.split(".")[1]), int(head.split(".")[-1])
    return create_param_masks(model, f"l{layer}h{h}")


def check_masks(model, heads) -> None:
    """devinterp's head masks select exactly the entries of pypattern's."""
    for head in heads:
        theirs = {k: v for k, v in devinterp_masks(model, head).items()}
        ours = component_masks(model, head)
        assert set(theirs) == set(ours), (head, sorted(theirs), sorted(ours))
        for k, v in ours.items():
            assert torch.equal(theirs[k].bool(), v.bool()), (head, k)


def devinterp_head_by_head(model, loader, heads):
    from datasets import Dataset
    from devinterp.slt.llc import llc

    ids = torch.cat(loader)
    ds = Dataset.from_dict({"input_ids": ids.tolist()}).with_format("torch")
    per_chain = []
    with warnings.catch_warnings(), Timer() as t:
        warnings.simplefilter("ignore")
        for head in heads:
            r = llc(
                model,
                ds,
                {},
                lr=KW["step_size"],
                n_beta=KW["nbeta"],
                localization=KW["localization"],
                param_masks=devinterp_masks(model, head),
                num_chains=KW["num_chains"],
                num_draws=KW["num_draws"],
                num_burnin_steps=0,
                batch_size=BATCH,
                num_init_loss_batches=len(loader),
                init_seed=KW["seed"],
                device="cpu",
            )
            per_chain.append(np.asarray(r["llc_per_chain"], dtype=np.float64))
    return t, np.asarray(per_chain)


def run(train_steps: int = 0) -> dict:
    torch.set_num_threads(1)
    model, loader, heads = setup(train_steps)
    t_batched, res = ours_batched(model, loader, heads)
    t_alone, alone = ours_one_by_one(model, loader, heads)
    t_floor = floor_seconds(model, loader, heads, KW["num_draws"])
    return dict(
        batched=t_batched,
        one_by_one=t_alone,
        floor=t_floor,
        max_abs_diff=float(np.max(np.abs(res.mean(1) - alone.mean(1)))),
        llc_range=(float(res.mean(1).min()), float(res.mean(1).max())),
    )


def test_refined_llc_bench_runs():
    """The batched and one-by-one estimates agree (same seeds)."""
    out = run()
    assert out["max_abs_diff"] < 1e-3 * max(1.0, abs(out["llc_range"][1]))


def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor()


def _se(per_chain: np.ndarray) -> np.ndarray:
    return per_chain.std(axis=-1, ddof=1) / math.sqrt(per_chain.shape[-1])


def compare(rounds: int, train_steps: int = 0) -> None:
    torch.set_num_threads(1)
    model, loader, heads = setup(train_steps)
    check_masks(model, heads)
    with torch.no_grad():
        loss = float(np.mean([float(lm_loss(model, b)) for b in loader]))
    print(
        f"model: {'trained ' + str(train_steps) + ' steps' if train_steps else 'random weights'}, loss {loss:.3f}"
    )
    print(
        f"date {time.strftime('%Y-%m-%d %H:%M %Z')}; CPU {_cpu()}; torch threads {torch.get_num_threads()}; "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
    )
    import importlib.metadata

    import pypattern

    print(f"pypattern from {pypattern.__file__}; devinterp {importlib.metadata.version('devinterp')}")
    print(
        f"16 heads x {KW['num_chains']} chains x {KW['num_draws']} steps, batch {BATCH}, step {KW['step_size']}, "
        f"localization {KW['localization']}, nbeta {KW['nbeta']}"
    )
    names = ("ours", "devinterp", "floor", "moving floor")
    cpu = {k: [] for k in names}
    wall = {k: [] for k in names}
    for r in range(rounds):
        t_ours, ours = ours_batched(model, loader, heads)
        t_di, di = devinterp_head_by_head(model, loader, heads)
        t_floor = floor_seconds(model, loader, heads, KW["num_draws"])
        t_mfloor = moving_floor_seconds(model, loader, heads, KW["num_draws"])
        for k, t in zip(names, (t_ours, t_di, t_floor, t_mfloor)):
            cpu[k].append(t.cpu)
            wall[k].append(t.wall)
        a, b = ours.mean(1), di.mean(1)
        z = np.abs(a - b) / np.sqrt(_se(ours) ** 2 + _se(di) ** 2)
        print(
            f"round {r + 1}: CPU s: ours batched {t_ours.cpu:.2f}, devinterp head by head {t_di.cpu:.2f}, "
            f"floor {t_floor.cpu:.2f}; devinterp / ours {t_di.cpu / t_ours.cpu:.2f}x, ours / floor "
            f"{t_ours.cpu / t_floor.cpu:.2f}; moving floor {t_mfloor.cpu:.2f} (ours / it "
            f"{t_ours.cpu / t_mfloor.cpu:.2f}); |z| < 2 for {int((z < 2).sum())}/16 heads | wall s: ours "
            f"{t_ours.wall:.2f}, devinterp {t_di.wall:.2f}, floor {t_floor.wall:.2f} "
            f"({t_di.wall / t_ours.wall:.2f}x, {t_ours.wall / t_floor.wall:.2f}), moving floor {t_mfloor.wall:.2f}",
            flush=True,
        )
    a, b = ours.mean(1), di.mean(1)
    sa, sb = _se(ours), _se(di)
    z = np.abs(a - b) / np.sqrt(sa**2 + sb**2)
    print("last round:")
    print("head                   ours LLC (se)        devinterp LLC (se)   z")
    for i, h in enumerate(heads):
        print(f"{h:22s} {a[i]:8.3f} ({sa[i]:.3f})   {b[i]:8.3f} ({sb[i]:.3f})   {z[i]:.2f}")
    print(
        f"mean over heads: ours {a.mean():.3f}, devinterp {b.mean():.3f}; |z| < 2 for {int((z < 2).sum())}/16 heads; "
        f"mean difference {np.mean(a - b):+.3f} +- {np.sqrt(np.sum(sa**2 + sb**2)) / 16:.3f} (se)"
    )
    for label, t in (("CPU", cpu), ("wall", wall)):
        ratio = np.array(t["devinterp"]) / np.array(t["ours"])
        over = np.array(t["ours"]) / np.array(t["floor"])
        mover = np.array(t["ours"]) / np.array(t["moving floor"])
        print(
            f"{label} time, ranges over {rounds} rounds: ours {min(t['ours']):.2f}-{max(t['ours']):.2f} s, "
            f"devinterp {min(t['devinterp']):.2f}-{max(t['devinterp']):.2f} s, floor {min(t['floor']):.2f}-"
            f"{max(t['floor']):.2f} s; devinterp / ours {ratio.min():.2f}-{ratio.max():.2f}x; ours / floor "
            f"{over.min():.2f}-{over.max():.2f}; moving floor {min(t['moving floor']):.2f}-"
            f"{max(t['moving floor']):.2f} s, ours / it {mover.min():.2f}-{mover.max():.2f}"
        )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devinterp", action="store_true", help="compare with devinterp 2.0.1 head by head")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of --devinterp (without it: one run)")
    ap.add_argument("--chains", type=int, default=KW["num_chains"])
    ap.add_argument("--step", type=float, default=KW["step_size"])
    ap.add_argument("--train-steps", type=int, default=0, help="Adam steps on the data before sampling")
    args = ap.parse_args()
    KW["num_chains"], KW["step_size"] = args.chains, args.step
    if args.devinterp:
        import importlib.util

        missing = [m for m in ("devinterp", "datasets") if importlib.util.find_spec(m) is None]
        if missing:
            raise SystemExit(
                f"--devinterp: not importable here: {', '.join(missing)}; run in the devinterp 2.0.1 bench venv "
                "(`PYPATTERN_LINK=1 bash bench/envs/devinterp.sh 20`, then `.bench-venvs/devinterp20/bin/python "
                "bench/bench_refined_llc.py --devinterp`)"
            )
        compare(args.rounds, args.train_steps)
    else:
        out = run(args.train_steps)
        tb, to, tf = out["batched"], out["one_by_one"], out["floor"]
        print(
            f"model: {'trained ' + str(args.train_steps) + ' steps' if args.train_steps else 'random weights'}; "
            f"16 heads x {KW['num_chains']} chains x {KW['num_draws']} steps, 1 thread, CPU s (wall s): batched "
            f"{tb.cpu:.2f} ({tb.wall:.2f}), one by one {to.cpu:.2f} ({to.wall:.2f}; {to.cpu / tb.cpu:.2f}x), "
            f"vmap(grad) floor {tf.cpu:.2f} ({tf.wall:.2f}; batched / floor {tb.cpu / tf.cpu:.2f}); max |diff| "
            f"{out['max_abs_diff']:.2e}, LLC range {out['llc_range']}"
        )
