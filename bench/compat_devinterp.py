"""One script, two libraries: devinterp 2.0.1's ``llc`` / ``susceptibilities`` / ``bif`` (and ``sample``,
``compute_susceptibilities``, ``compute_bif``) and pypattern's (:mod:`pypattern.devinterp`) on the same model,
data and settings; only the import differs, and so does nothing else: results are read with the same code
(``r["llc_per_chain"].values``, ``s["susceptibilities"]["sus"].values``, ``samples.dataset[name].values``).

Run in the bench venv that has devinterp 2.0.1 (``PYPATTERN_LINK=1 bash bench/envs/devinterp.sh 20``)::

    OMP_NUM_THREADS=1 .bench-venvs/devinterp20/bin/python bench/compat_devinterp.py

It prints each library's LLC with its standard error over chains, ``z = |difference| / sqrt(se_a^2 + se_b^2)``
(the two agree within their standard errors when ``z`` is below about 2); for susceptibilities each probe
token's value with a standard error from the spread of per-chain estimates (the same formula on each chain of
the restricted run) and the per-entry ``z``; for the BIF the mean off-diagonal sequence correlation with its
standard error over chains. ``--impl pypattern`` or ``--impl devinterp`` runs one library only.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
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


def _se(x: np.ndarray, axis: int = 0) -> np.ndarray:
    """Standard error over chains (axis ``axis``)."""
    return x.std(axis=axis, ddof=1) / math.sqrt(x.shape[axis])


def _var(samples, name: str) -> np.ndarray:
    # the same read on both libraries: a DataTree's (or pypattern's result's) dataset variable
    return np.asarray(samples.dataset[name].values, dtype=np.float64)


def chi_per_chain(full, wr, sampling: str, probe: str) -> np.ndarray:
    """devinterp's susceptibility formula evaluated on each chain of the restricted run alone (the full run's
    terms pooled): ``(chain, batch * token_pos)``, whose mean over chains estimates chi and whose spread gives its
    standard error."""
    init = _var(full, "init_loss").mean()
    delta = _var(full, f"loss_{sampling}").mean() - _var(full, f"loss_{probe}").mean(axis=(0, 1))
    lbar = _var(wr, f"loss_{sampling}").mean(axis=(2, 3))  # (chain, draw)
    phi = lbar - init
    p = _var(wr, f"loss_{probe}")
    chi = (
        (phi * lbar).mean(1)[:, None, None]
        - (phi[:, :, None, None] * p).mean(1)
        - phi.mean(1)[:, None, None] * delta
    )
    return chi.reshape(len(chi), -1)


def bif_per_chain(samples, probe: str) -> np.ndarray:
    """Sequence correlations over draws within each chain: ``(chain, pairs)`` (off-diagonal pairs)."""
    x = _var(samples, f"loss_{probe}").mean(axis=3)  # (chain, draw, batch)
    out = []
    for c in range(x.shape[0]):
        m = np.corrcoef(x[c].T)
        out.append(m[~np.eye(len(m), dtype=bool)])
    return np.asarray(out)


def run(impl, model, settings, what):
    # the same import paths, under "devinterp." or "pypattern.devinterp."
    prefix = {"pypattern": "pypattern.devinterp", "devinterp": "devinterp"}[impl]
    mod = [f"{prefix}.slt.{m}" for m in ("llc", "susceptibilities", "bif", "sampling")]
    llc = importlib.import_module(mod[0]).llc
    susceptibilities = importlib.import_module(mod[1]).susceptibilities
    compute_susceptibilities = importlib.import_module(mod[1]).compute_susceptibilities
    bif = importlib.import_module(mod[2]).bif
    compute_bif = importlib.import_module(mod[2]).compute_bif
    sample = importlib.import_module(mod[3]).sample
    train = as_dataset(make_data(1024, seed=1))
    probe = as_dataset(make_data(64, seed=2))
    out = {}
    warnings.simplefilter("ignore")
    if "llc" in what:
        t = time.perf_counter()
        r = llc(model, train, {}, device="cpu", **settings["llc"])
        out["llc_seconds"] = time.perf_counter() - t
        out["llc_keys"] = sorted(str(k) for k in r.keys() if not str(k).startswith("_"))
        out["llc_types"] = {k: type(r[k]).__name__ for k in out["llc_keys"]}
        out["llc_per_chain"] = r["llc_per_chain"].values.astype(np.float64).tolist()
        out["llc_mean"] = float(r["llc_mean"])
        out["init_loss"] = float(r["init_loss"])
        print(f"  {impl} llc: {out['llc_seconds']:.1f} s", flush=True)
    if "sus" in what:
        wr = {"full": None, "attn": {n: None for n, _ in model.named_parameters() if ".attn." in n}}
        obs = {"train": train, "probe": probe}
        t = time.perf_counter()
        s = susceptibilities(model, train, obs, wr, sampling_task="train", device="cpu", **settings["sus"])
        out["sus_seconds"] = time.perf_counter() - t
        out["sus"] = s["susceptibilities"]["sus"].values[:, 0].astype(np.float64).tolist()
        out["sus_dims"] = list(s["susceptibilities"]["sus"].dims)
        out["sus_coords"] = sorted(
            k for k in ("dataset_id", "batch", "target_position", "wr") if k in s["susceptibilities"]
        )
        # the same runs through sample + compute_susceptibilities (what susceptibilities does), for the
        # per-chain spread that gives each entry's standard error
        runs = {
            w: sample(model, train, obs, param_masks=m, device="cpu", **settings["sus"])
            for w, m in wr.items()
        }
        again = compute_susceptibilities(runs, "train")["susceptibilities"]["sus"].values[:, 0]
        pc = chi_per_chain(runs["full"], runs["attn"], "train", "probe")
        out["sus_again"] = np.asarray(again, dtype=np.float64).tolist()
        out["sus_se"] = _se(pc).tolist()
        out["sus_formula_max_diff"] = float(np.abs(pc.mean(0) - np.asarray(again)).max())
        print(f"  {impl} susceptibilities: {out['sus_seconds']:.1f} s", flush=True)
    if "bif" in what:
        t = time.perf_counter()
        b = bif(
            model, train, {"probe": probe}, device="cpu", correlation_method="sequence", **settings["bif"]
        )
        out["bif_seconds"] = time.perf_counter() - t
        out["bif"] = b["influences"].values.astype(np.float64).tolist()
        out["bif_dims"] = list(b["influences"].dims)
        samples = sample(model, train, {"probe": probe}, device="cpu", **settings["bif"])
        pc = bif_per_chain(samples, "probe")
        out["bif_offdiag_per_chain"] = pc.mean(1).tolist()
        sub = compute_bif(
            samples, correlation_method="sequence", batch_index_range_1=[0, 1], batch_index_range_2=[2]
        )
        out["bif_range_shape"] = list(np.shape(sub["influences"].values))
        print(f"  {impl} bif: {out['bif_seconds']:.1f} s", flush=True)
    return out


def _importable(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--impl", choices=["both", "pypattern", "devinterp"], default="both")
    ap.add_argument("--chains", type=int, default=8)
    ap.add_argument("--draws", type=int, default=200)
    ap.add_argument("--what", default="llc,sus,bif", help="comma-separated subset of llc, sus, bif")
    ap.add_argument("--seed", type=int, default=3, help="init_seed of every run (the model is the same)")
    args = ap.parse_args()
    impls = ["pypattern", "devinterp"] if args.impl == "both" else [args.impl]
    missing = [
        m for m in ["datasets"] + (["devinterp"] if "devinterp" in impls else []) if not _importable(m)
    ]
    if missing:
        raise SystemExit(
            f"not importable here: {', '.join(missing)}. This script runs in the bench venv with devinterp 2.0.1 and "
            "datasets: `PYPATTERN_LINK=1 bash bench/envs/devinterp.sh 20`, then `.bench-venvs/devinterp20/bin/python "
            "bench/compat_devinterp.py` (`--impl pypattern` still needs datasets)"
        )
    model, train_loss = trained_model()
    # every chain reads its own shuffle on both sides (pypattern always does): with devinterp's default the chains
    # share one data order, and the spread over chains would leave out the data-order noise
    common = dict(
        lr=1e-3,
        n_beta=10.0,
        localization=100.0,
        batch_size=32,
        init_seed=args.seed,
        match_sampling_input_ids_across_chains=False,
    )
    settings = {
        "llc": dict(
            common, num_chains=args.chains, num_draws=args.draws, num_burnin_steps=50, num_init_loss_batches=8
        ),
        "sus": dict(common, num_chains=8, num_draws=100, num_burnin_steps=50, batches_per_draw=1),
        "bif": dict(common, num_chains=8, num_draws=100, num_burnin_steps=50, batches_per_draw=2),
    }
    what = set(args.what.split(","))
    if not what <= {"llc", "sus", "bif"}:
        raise SystemExit(f"--what {args.what!r}: expected a comma-separated subset of llc, sus, bif")
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
    print("settings:", json.dumps(settings), flush=True)
    res = {impl: run(impl, model, settings, what) for impl in impls}
    for impl, r in res.items():
        if "llc" not in what:
            break
        pc = np.asarray(r["llc_per_chain"])
        r["llc"], r["llc_se"] = float(pc.mean()), float(_se(pc))
        print(
            f"{impl:9s} LLC {pc.mean():.3f} +- {r['llc_se']:.3f} (se over {len(pc)} chains); init loss "
            f"{r['init_loss']:.4f}; {r['llc_seconds']:.1f} s; keys {r['llc_keys']}"
        )
    if len(res) == 2 and "llc" in what:
        a, b = res["pypattern"], res["devinterp"]
        z = abs(a["llc"] - b["llc"]) / math.sqrt(a["llc_se"] ** 2 + b["llc_se"] ** 2)
        print(f"LLC difference {a['llc'] - b['llc']:+.3f}, z = {z:.2f} ({'agree' if z < 2 else 'DISAGREE'})")
        print(f"same llc keys: {a['llc_keys'] == b['llc_keys']}")
    if "sus" in what:
        for impl, r in res.items():
            sa, se = np.asarray(r["sus"]), np.asarray(r["sus_se"])
            print(
                f"{impl:9s} susceptibilities (attn, {len(sa)} probe tokens): mean {sa.mean():+.4g} +- "
                f"{np.sqrt(np.sum(se**2)) / len(se):.2g}, dims {r['sus_dims']}, coords {r['sus_coords']}; "
                f"{r['sus_seconds']:.1f} s; sample + compute_susceptibilities equal: "
                f"{np.allclose(r['sus'], r['sus_again'])}; per-chain formula vs library max |diff| "
                f"{r['sus_formula_max_diff']:.1e}"
            )
    if len(res) == 2 and "sus" in what:
        a, b = res["pypattern"], res["devinterp"]
        sa, sb = np.asarray(a["sus"]), np.asarray(b["sus"])
        z = np.abs(sa - sb) / np.sqrt(np.asarray(a["sus_se"]) ** 2 + np.asarray(b["sus_se"]) ** 2)
        print(
            f"susceptibilities per entry: |z| < 2 for {int((z < 2).sum())}/{len(z)} entries (median z "
            f"{np.median(z):.2f}); correlation of the entries {np.corrcoef(sa, sb)[0, 1]:.3f}; std {sa.std():.4g} "
            f"vs {sb.std():.4g}"
        )
    if "bif" in what:
        for impl, r in res.items():
            m = np.asarray(r["bif"])
            off = ~np.eye(len(m), dtype=bool)
            pc = np.asarray(r["bif_offdiag_per_chain"])
            r["bif_off"], r["bif_off_se"] = float(pc.mean()), float(_se(pc))
            print(
                f"{impl:9s} BIF (sequence correlations, {len(m)} probe sequences): mean off-diagonal "
                f"{m[off].mean():.3f} (chains pooled); per chain {pc.mean():.3f} +- {r['bif_off_se']:.3f}; dims "
                f"{r['bif_dims']}; index-range shape {r['bif_range_shape']}; {r['bif_seconds']:.1f} s"
            )
    if len(res) == 2 and "bif" in what:
        a, b = res["pypattern"], res["devinterp"]
        ba, bb = np.asarray(a["bif"]), np.asarray(b["bif"])
        off = ~np.eye(len(ba), dtype=bool)
        z = abs(a["bif_off"] - b["bif_off"]) / math.sqrt(a["bif_off_se"] ** 2 + b["bif_off_se"] ** 2)
        print(
            f"BIF: mean off-diagonal (per chain) z = {z:.2f}; correlation of the matrices "
            f"{np.corrcoef(ba[off], bb[off])[0, 1]:.3f}"
        )
    out = os.environ.get("COMPAT_DEVINTERP_JSON")
    if out:
        with open(out, "w") as f:
            json.dump(res, f)


if __name__ == "__main__":
    main()
