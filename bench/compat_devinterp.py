"""One script, two libraries: devinterp 2.0.1's ``llc`` / ``susceptibilities`` / ``bif`` and pypattern's
(:mod:`pypattern.devinterp`) on the same model, data and settings; only the import differs.

Run in the bench venv that has devinterp 2.0.1 (``bash bench/envs/devinterp.sh 20``)::

    OMP_NUM_THREADS=2 .bench-venvs/devinterp20/bin/python bench/compat_devinterp.py

It prints each library's LLC with its standard error over chains, ``z = |difference| / sqrt(se_a^2 + se_b^2)``
(the two agree within their standard errors when ``z`` is below about 2), and, for susceptibilities and the BIF,
each library's values and how closely they agree (correlation over entries, and the difference against each
entry's spread over chains). ``--impl pypattern`` or ``--impl devinterp`` runs one library only (no devinterp
needed for the first).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import subprocess
import time
import warnings

import numpy as np
import torch
from torch import nn

from pypattern.models.transformer import Transformer, TransformerConfig

V, T = 16, 12  # vocabulary, sequence length


class LM(nn.Module):
    """pypattern's Transformer behind a plain forward (tokens -> logits), so both libraries treat it alike."""

    def __init__(self, seed=0):
        super().__init__()
        cfg = TransformerConfig(
            n_layers=1, d_model=24, n_heads=2, d_head=12, d_mlp=48, d_vocab=V, n_ctx=T, seed=seed
        )
        self.net = Transformer(cfg)

    def forward(self, input_ids):
        return self.net(input_ids)


def make_data(n, seed):
    """Sequences with structure to learn: next token = previous + step (mod V), step per sequence in {1, 2, 3},
    with 10% random tokens."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, V, (n, 1), generator=g)
    step = torch.randint(1, 4, (n, 1), generator=g)
    seq = (start + step * torch.arange(T)) % V
    noise = torch.rand(n, T, generator=g) < 0.1
    return torch.where(noise, torch.randint(0, V, (n, T), generator=g), seq)


def trained_model():
    torch.manual_seed(0)
    model = LM()
    x = make_data(2048, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        b = x[torch.randint(0, len(x), (64,))]
        loss = nn.functional.cross_entropy(model(b)[:, :-1].reshape(-1, V), b[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, float(loss.detach())


def as_dataset(ids):
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": ids.tolist()}).with_format("torch")


def run(impl, model, settings, what):
    # the same import paths, under "devinterp." or "pypattern.devinterp."
    prefix = {"pypattern": "pypattern.devinterp", "devinterp": "devinterp"}[impl]
    mod = [f"{prefix}.slt.{m}" for m in ("llc", "susceptibilities", "bif")]
    llc = importlib.import_module(mod[0]).llc
    susceptibilities = importlib.import_module(mod[1]).susceptibilities
    bif = importlib.import_module(mod[2]).bif
    train = as_dataset(make_data(1024, seed=1))
    probe = as_dataset(make_data(64, seed=2))
    out = {}
    warnings.simplefilter("ignore")
    t = time.perf_counter()
    r = llc(model, train, {}, device="cpu", **settings["llc"])
    out["llc_seconds"] = time.perf_counter() - t
    out["llc_per_chain"] = np.asarray(r["llc_per_chain"], dtype=np.float64).tolist()
    out["init_loss"] = float(np.asarray(r["init_loss"]))
    t = time.perf_counter()
    wr = {"full": None, "attn": {n: None for n, _ in model.named_parameters() if ".attn." in n}}
    s = susceptibilities(
        model,
        train,
        {"train": train, "probe": probe},
        wr,
        sampling_task="train",
        device="cpu",
        **settings["sus"],
    )
    out["sus_seconds"] = time.perf_counter() - t
    sus = s["susceptibilities"]["sus"].values if impl == "devinterp" else s["sus"]
    out["sus"] = np.asarray(sus, dtype=np.float64)[:, 0].tolist()
    t = time.perf_counter()
    b = bif(model, train, {"probe": probe}, device="cpu", correlation_method="sequence", **settings["bif"])
    out["bif_seconds"] = time.perf_counter() - t
    out["bif"] = np.asarray(b["influences"], dtype=np.float64).tolist()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--impl", choices=["both", "pypattern", "devinterp"], default="both")
    ap.add_argument("--chains", type=int, default=8)
    ap.add_argument("--draws", type=int, default=200)
    ap.add_argument("--what", default="llc,sus,bif", help="comma-separated subset of llc, sus, bif")
    args = ap.parse_args()
    model, train_loss = trained_model()
    common = dict(lr=1e-3, n_beta=10.0, localization=100.0, batch_size=32, init_seed=3)
    settings = {
        "llc": dict(
            common, num_chains=args.chains, num_draws=args.draws, num_burnin_steps=50, num_init_loss_batches=8
        ),
        "sus": dict(common, num_chains=4, num_draws=100, num_burnin_steps=50, batches_per_draw=1),
        "bif": dict(common, num_chains=4, num_draws=100, num_burnin_steps=50, batches_per_draw=2),
    }
    impls = ["pypattern", "devinterp"] if args.impl == "both" else [args.impl]
    what = set(args.what.split(","))
    res = {impl: run(impl, model, settings, what) for impl in impls}
    try:
        cpu = next(
            ln.split(":", 1)[1].strip()
            for ln in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
            if ln.startswith("Model name")
        )
    except Exception:  # noqa: BLE001 - lscpu missing: report the platform string
        cpu = platform.processor()
    print(f"date {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; CPU {cpu}; torch threads {torch.get_num_threads()}")
    try:
        from importlib.metadata import version

        print(f"devinterp {version('devinterp')}; torch {torch.__version__}")
    except Exception:  # noqa: BLE001 - devinterp not installed
        print(f"torch {torch.__version__}")
    print(
        f"model: 1-layer transformer, {sum(p.numel() for p in model.parameters())} parameters, train loss {train_loss:.3f}"
    )
    print("settings:", json.dumps(settings))
    for impl, r in res.items():
        if "llc" not in what:
            break
        pc = np.asarray(r["llc_per_chain"])
        se = pc.std(ddof=1) / math.sqrt(len(pc))
        r["llc"], r["llc_se"] = float(pc.mean()), float(se)
        print(
            f"{impl:9s} LLC {pc.mean():.3f} +- {se:.3f} (se over {len(pc)} chains); init loss {r['init_loss']:.4f}; "
            f"{r['llc_seconds']:.1f} s"
        )
    if len(res) == 2 and "llc" in what:
        a, b = res["pypattern"], res["devinterp"]
        z = abs(a["llc"] - b["llc"]) / math.sqrt(a["llc_se"] ** 2 + b["llc_se"] ** 2)
        print(f"LLC difference {a['llc'] - b['llc']:+.3f}, z = {z:.2f} ({'agree' if z < 2 else 'DISAGREE'})")
    if len(res) == 2 and "sus" in what:
        a, b = res["pypattern"], res["devinterp"]
        sa, sb = np.asarray(a["sus"]), np.asarray(b["sus"])
        print(
            f"susceptibilities (attn, {len(sa)} probe tokens): mean {sa.mean():+.4g} vs {sb.mean():+.4g}, "
            f"std {sa.std():.4g} vs {sb.std():.4g}, correlation {np.corrcoef(sa, sb)[0, 1]:.3f}"
        )
    if len(res) == 2 and "bif" in what:
        a, b = res["pypattern"], res["devinterp"]
        ba, bb = np.asarray(a["bif"]), np.asarray(b["bif"])
        off = ~np.eye(len(ba), dtype=bool)
        print(
            f"BIF (sequence correlations, {len(ba)} probe sequences): mean off-diagonal {ba[off].mean():.3f} vs "
            f"{bb[off].mean():.3f}, correlation of the matrices {np.corrcoef(ba[off], bb[off])[0, 1]:.3f}"
        )
    out = os.environ.get("COMPAT_DEVINTERP_JSON")
    if out:
        with open(out, "w") as f:
            json.dump(res, f)


if __name__ == "__main__":
    main()
