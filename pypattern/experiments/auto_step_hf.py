"""``step_size="auto"`` against a fixed README-like step on small Hugging Face models, end to end.

For each family (GPT-2, GPT-NeoX, Llama) a model is built from a small config with random weights
(``transformers``), trained with AdamW on a fixed set of induction-task sequences
(:class:`pypattern.tasks.InductionTask`) so that ``w*`` sits near a minimum, and its LLC estimated on the same
sequences (next-token loss, :func:`pypattern.losses.batch_loss`) twice:

* **fixed**: ``step_size=1e-4``, ``localization=100``, the default ``nbeta`` (``m / ln m``), as in the README;
* **auto**: the same call without a step (the default ``step_size="auto"``), repeated with ``seeds``.

Each row reports the estimate, its standard error (``LLCResult.llc_se``: the spread over chains and the error of
``L_n(w*)``, which is read over the whole epoch by default), the split R-hat of the
loss trace, whether the chains are stationary (R-hat < 1.1), the step used and the seconds (calibration
included). The repeated auto runs agree when every pair differs by at most two combined standard errors.

Run: ``OMP_NUM_THREADS=1 python -m pypattern.experiments.auto_step_hf`` (``--help`` for the sizes).
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..io import json_text

__all__ = ["HFAutoSettings", "build_model", "compare", "main", "measure_family"]

FAMILIES = ("gpt2", "neox", "llama")


@dataclass
class HFAutoSettings:
    """Sizes of the comparison (the defaults are those of docs/llc_results.md)."""

    d_model: int = 16
    n_layers: int = 2
    n_heads: int = 4
    d_vocab: int = 24
    seq_len: int = 9
    num_sequences: int = 64
    train_steps: int = 300
    train_lr: float = 3e-3
    batch_size: int = 8
    num_chains: int = 4
    num_draws: int = 200
    num_burnin_steps: int = 100
    fixed_step_size: float = 1e-4
    localization: float = 100.0
    seeds: tuple[int, ...] = (0, 1, 2)


def build_model(family: str, s: HFAutoSettings, seed: int = 0) -> torch.nn.Module:
    """A ``transformers`` causal LM of ``family`` (``"gpt2"``, ``"neox"``, ``"llama"``) from a small config with
    random weights (dropout off), in eval mode."""
    import transformers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build_model(transformers, family, s)


def _build_model(transformers, family: str, s: HFAutoSettings) -> torch.nn.Module:
    if family == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=s.d_vocab,
            n_positions=s.seq_len,
            n_embd=s.d_model,
            n_layer=s.n_layers,
            n_head=s.n_heads,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        model = transformers.GPT2LMHeadModel(cfg)
    elif family == "neox":
        cfg = transformers.GPTNeoXConfig(
            vocab_size=s.d_vocab,
            hidden_size=s.d_model,
            num_hidden_layers=s.n_layers,
            num_attention_heads=s.n_heads,
            intermediate_size=2 * s.d_model,
            rotary_pct=0.5,
            max_position_embeddings=s.seq_len,
            hidden_dropout=0.0,
            attention_dropout=0.0,
        )
        model = transformers.GPTNeoXForCausalLM(cfg)
    elif family == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=s.d_vocab,
            hidden_size=s.d_model,
            intermediate_size=2 * s.d_model,
            num_hidden_layers=s.n_layers,
            num_attention_heads=s.n_heads,
            num_key_value_heads=max(1, s.n_heads // 2),
            max_position_embeddings=s.seq_len,
        )
        model = transformers.LlamaForCausalLM(cfg)
    else:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return model.eval()


def _data(s: HFAutoSettings) -> torch.Tensor:
    from ..tasks.induction import InductionTask

    return InductionTask(d_vocab=s.d_vocab, seq_len=s.seq_len).sample(s.num_sequences, seed=0).tokens


def _train(model: torch.nn.Module, tokens: torch.Tensor, s: HFAutoSettings) -> list[float]:
    from ..losses import batch_loss

    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=s.train_lr)
    losses = []
    model.train()
    for _ in range(s.train_steps):
        idx = torch.randint(0, tokens.shape[0], (s.batch_size,), generator=g)
        loss = batch_loss(model, tokens[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def _row(res, seconds: float, kind: str, seed: int) -> dict:
    cfg = res.sample.config
    per_chain = np.asarray(res.llc_per_chain, dtype=np.float64).ravel()
    rep = cfg.get("auto_step")
    return {
        "kind": kind,
        "seed": int(seed),
        "step_size": float(cfg["step_size"]),
        "nbeta": float(res.nbeta),
        "llc": float(res.llc_mean),
        "se": float(res.llc_se),  # over chains, with the error of L_n(w*) (zero: the whole epoch is read)
        "se_chains": float(per_chain.std(ddof=1) / math.sqrt(len(per_chain))),
        "r_hat": float(res.r_hat),
        "stationary": bool(res.r_hat < 1.1),
        "seconds": float(seconds),
        "calibration_seconds": float(rep["seconds"]) if rep else 0.0,
        "trials": len(rep["trials"]) if rep else 0,
        "bias": rep.get("bias") if rep else None,
    }


def measure_family(family: str, s: HFAutoSettings | None = None, *, fixed: bool = True) -> dict:
    """Train one model of ``family`` and estimate its LLC with the fixed step (when ``fixed``) and with
    ``"auto"`` for every seed of ``s.seeds``. Returns the rows and the model's size and training losses."""
    from ..losses import batch_loss
    from ..sampling import estimate_llc

    s = s or HFAutoSettings()
    tokens = _data(s)
    model = build_model(family, s)
    t0 = time.perf_counter()
    losses = _train(model, tokens, s)
    train_s = time.perf_counter() - t0
    loader = torch.utils.data.DataLoader(tokens, batch_size=s.batch_size, shuffle=True)
    common = dict(
        loss_fn=batch_loss,
        num_chains=s.num_chains,
        num_draws=s.num_draws,
        num_burnin_steps=s.num_burnin_steps,
        localization=s.localization,
        quiet=True,
        warn_nonstationary=False,
    )
    rows = []
    if fixed:
        t = time.perf_counter()
        res = estimate_llc(model, loader, step_size=s.fixed_step_size, seed=s.seeds[0], **common)
        rows.append(_row(res, time.perf_counter() - t, "fixed", s.seeds[0]))
        print(family, rows[-1], flush=True)
    for seed in s.seeds:
        t = time.perf_counter()
        res = estimate_llc(model, loader, seed=seed, **common)  # no step: the default "auto"
        rows.append(_row(res, time.perf_counter() - t, "auto", seed))
        print(family, rows[-1], flush=True)
    return {
        "family": family,
        "num_params": sum(p.numel() for p in model.parameters()),
        "train_loss_first_last": [losses[0], float(np.mean(losses[-20:]))],
        "train_seconds": train_s,
        "rows": rows,
        "auto_agree": compare([r for r in rows if r["kind"] == "auto"]),
    }


def compare(rows: list[dict], z: float = 2.0) -> dict:
    """Whether repeated estimates agree: the largest pairwise difference in units of the combined standard
    error, and whether it is at most ``z``."""
    worst = 0.0
    for a, b in itertools.combinations(rows, 2):
        worst = max(worst, abs(a["llc"] - b["llc"]) / math.hypot(a["se"], b["se"]))
    return {"max_z": worst, "agree": bool(worst <= z)}


def table(results: list[dict]) -> str:
    """The markdown table of docs/llc_results.md."""
    lines = [
        "| model | params | run | seed | step | LLC | SE | R-hat | stationary | s (calibration) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for row in r["rows"]:
            lines.append(
                f"| {r['family']} | {r['num_params']} | {row['kind']} | {row['seed']} | {row['step_size']:.3g} | "
                f"{row['llc']:.3g} | {row['se']:.2g} | {row['r_hat']:.3f} | {'yes' if row['stationary'] else 'no'} | "
                f"{row['seconds']:.0f} ({row['calibration_seconds']:.0f}) |"
            )
    return "\n".join(lines)


def _count(low: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {v}")
        return v

    return parse


def _seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    return seeds


def _families(text: str) -> list[str]:
    fams = [f.strip() for f in text.split(",")]
    bad = [f for f in fams if f not in FAMILIES]
    if bad or not fams:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {FAMILIES}, got {text!r}")
    return fams


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--families", type=_families, default=",".join(FAMILIES), help=f"comma-separated subset of {FAMILIES}"
    )
    p.add_argument("--train-steps", type=_count(0), default=HFAutoSettings.train_steps)
    p.add_argument("--num-draws", type=_count(1), default=HFAutoSettings.num_draws)
    p.add_argument("--d-model", type=_count(1), default=HFAutoSettings.d_model)
    p.add_argument("--seeds", type=_seeds, default="0,1,2", help="comma-separated integers")
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    if a.d_model % HFAutoSettings.n_heads:
        p.error(
            f"argument --d-model: must be a multiple of n_heads={HFAutoSettings.n_heads}, got {a.d_model}"
        )
    s = HFAutoSettings(
        train_steps=a.train_steps,
        num_draws=a.num_draws,
        d_model=a.d_model,
        seeds=a.seeds,
    )
    out = []
    for fam in a.families:
        r = measure_family(fam, s)
        r["settings"] = asdict(s)
        out.append(r)
        print(json_text(r, indent=None), flush=True)
        if a.json:
            with open(a.json, "w") as f:
                f.write(json_text(out, indent=1))
    print(table(out))
    return out


if __name__ == "__main__":
    main()
