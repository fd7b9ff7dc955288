"""The command line on a user's own model and data: ``pypattern llc|patch|chi --model DIR --data FILE``.

``DIR`` is a local Hugging Face ``save_pretrained`` directory (safetensors; nothing is downloaded) of an architecture
in :data:`pypattern.models.convert.SUPPORTED_CLASSES`; it is converted exactly into pypattern's
:class:`~pypattern.models.Transformer` with :func:`pypattern.from_pretrained`. ``FILE`` holds token ids
``(num_sequences, seq_len)``: ``.npy``, ``.npz`` (the array ``tokens``, or its only array; never unpickled), or a
text file with one sequence of whitespace- or comma-separated ids per line (all of one length).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch

__all__ = ["load_tokens", "run_user_chi", "run_user_llc", "run_user_patch"]


def load_tokens(
    path: str | os.PathLike, *, vocab_size: int | None = None, n_ctx: int | None = None
) -> torch.Tensor:
    """Token ids ``(num_sequences, seq_len)`` as a LongTensor from ``.npy``, ``.npz`` or a text file.

    Raises
    ------
    ValueError
        Naming the file when it cannot be read as such an array, when ids are negative or not below
        ``vocab_size``, or when sequences are longer than ``n_ctx``.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"data={str(p)!r} is not a file; give a .npy, .npz or text file of token ids")
    suffix = p.suffix.lower()
    try:
        if suffix == ".npy":
            arr = np.load(p, allow_pickle=False)
        elif suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                keys = list(z.keys())
                key = "tokens" if "tokens" in keys else (keys[0] if len(keys) == 1 else None)
                if key is None:
                    raise ValueError(f"it holds {keys}: name the array 'tokens' or keep only one")
                arr = z[key]
        else:
            rows = [
                [int(t) for t in line.replace(",", " ").split()]
                for line in p.read_text().splitlines()
                if line.strip()
            ]
            if len({len(r) for r in rows}) > 1:
                raise ValueError("its lines have different numbers of tokens; give sequences of one length")
            arr = np.asarray(rows, dtype=np.int64)
    except ValueError as e:
        raise ValueError(f"data={str(p)!r}: cannot read token ids ({e})") from None
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"data={str(p)!r}: expected a non-empty integer array (num_sequences, seq_len), got shape "
            f"{arr.shape} of {arr.dtype}"
        )
    if arr.min() < 0 or (vocab_size is not None and arr.max() >= vocab_size):
        raise ValueError(
            f"data={str(p)!r}: token ids must lie in [0, {vocab_size}) for this model; found "
            f"{int(arr.min())}..{int(arr.max())}"
        )
    if n_ctx is not None and arr.shape[1] > n_ctx:
        raise ValueError(
            f"data={str(p)!r}: sequences have {arr.shape[1]} tokens; the model's n_ctx is {n_ctx}"
        )
    return torch.from_numpy(arr.astype(np.int64))


def _model_and_tokens(model_dir, data, dtype, sampling: bool = False):
    """The converted model and the tokens; ``sampling``: a half-precision checkpoint (most are saved in bfloat16)
    is loaded in float32, since the samplers move float32 and float64 parameters only (with a warning)."""
    from ..models.convert import from_pretrained

    model = from_pretrained(model_dir, dtype=dtype)
    if sampling and model.cfg.dtype not in (torch.float32, torch.float64):
        warnings.warn(
            f"model={str(model_dir)!r} holds {model.cfg.dtype} weights and the samplers move float32 and float64 "
            "parameters only: sampling its float32 copy (the weights upcast exactly; --float64 for float64)",
            UserWarning,
            stacklevel=3,
        )
        model = from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    tokens = load_tokens(data, vocab_size=model.cfg.d_vocab, n_ctx=model.cfg.max_positions)
    return model, tokens


def _batches(tokens: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is not valid; give an int >= 1")
    return [tokens[i : i + batch_size] for i in range(0, len(tokens), batch_size)]


def _write(out: str, name: str, obj: dict) -> str:
    Path(out).mkdir(parents=True, exist_ok=True)
    path = os.path.join(out, name)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
    return path


def _step_summary(config: dict) -> dict:
    """The step used and, when ``step_size="auto"`` chose it, the calibration's reason (for the summary)."""
    rep = config.get("auto_step")
    return {"step_size": float(config["step_size"]), "auto_step": rep["reason"] if rep else None}


def run_user_llc(
    model_dir: str,
    data: str,
    out: str,
    *,
    batch_size: int = 8,
    num_chains: int = 4,
    num_draws: int = 100,
    num_burnin_steps: int = 0,
    step_size: float | str = "auto",
    localization: float = 100.0,
    nbeta: float | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> dict:
    """Estimate the LLC of the model in ``model_dir`` on the token sequences in ``data`` (next-token loss).

    Writes ``llc.npz`` (:class:`~pypattern.LLCResult`), ``llc_trace.png`` and ``llc_summary.json`` into ``out``
    and returns the summary.
    """
    from ..losses import batch_loss
    from ..sampling import estimate_llc

    model, tokens = _model_and_tokens(model_dir, data, dtype, sampling=True)
    res = estimate_llc(
        model,
        _batches(tokens, batch_size),
        loss_fn=batch_loss,
        num_chains=num_chains,
        num_draws=num_draws,
        num_burnin_steps=num_burnin_steps,
        step_size=step_size,
        localization=localization,
        nbeta=nbeta,
        seed=seed,
        quiet=True,
    )
    Path(out).mkdir(parents=True, exist_ok=True)
    res.save(os.path.join(out, "llc.npz"))
    plot = None
    try:
        import matplotlib

        matplotlib.use("Agg")
        fig = res.plot()
        fig = getattr(fig, "figure", fig)
        plot = os.path.join(out, "llc_trace.png")
        fig.savefig(plot, dpi=100)
    except ImportError:  # pragma: no cover - matplotlib is optional
        pass
    summary = {
        "model": str(model_dir),
        "data": str(data),
        "sequences": int(tokens.shape[0]),
        "seq_len": int(tokens.shape[1]),
        "llc_mean": float(res.llc_mean),
        "llc_std": float(res.llc_std),
        "llc_se": float(res.llc_se),
        "llc_per_chain": [float(v) for v in np.asarray(res.llc_per_chain).ravel()],
        **_step_summary(res.sample.config),
        "result": os.path.join(out, "llc.npz"),
        "plot": plot,
    }
    summary["summary"] = _write(out, "llc_summary.json", summary)
    return summary


def run_user_patch(
    model_dir: str,
    data: str,
    out: str,
    *,
    corrupted: str | None = None,
    sites: tuple[str, ...] = ("resid_pre", "attn_out", "mlp_out", "z"),
    max_prompts: int = 8,
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> dict:
    """Exact activation patching of the model in ``model_dir`` at each site over layers x positions (heads x
    positions for ``z``), denoising, with the metric KL(P_clean || P_run) at the last position.

    ``corrupted`` is a token file of the same shape (symmetric token replacement, recommended); without it the
    corrupted run adds Gaussian noise (3x the embeddings' std) to every token embedding. Writes one CSV per site
    and ``patch_summary.json`` into ``out``.
    """
    from ..patching import KL, GaussianNoise, activation_patching

    model, clean = _model_and_tokens(model_dir, data, dtype)
    clean = clean[:max_prompts]
    corr = None
    if corrupted is not None:
        corr = load_tokens(corrupted, vocab_size=model.cfg.d_vocab, n_ctx=model.cfg.max_positions)[
            :max_prompts
        ]
        if corr.shape != clean.shape:
            raise ValueError(
                f"corrupted={corrupted!r} has shape {tuple(corr.shape)}; it must match data's {tuple(clean.shape)}"
            )
    corruption = None if corr is not None else GaussianNoise(seed=seed)
    summary = {"model": str(model_dir), "data": str(data), "prompts": int(clean.shape[0]), "sites": {}}
    Path(out).mkdir(parents=True, exist_ok=True)
    for site in sites:
        if model.cfg.parallel_attn_mlp and site == "resid_mid":
            continue
        if model.cfg.attn_only and site in ("resid_mid", "mlp_out"):
            continue
        res = activation_patching(model, site, clean, corr, metric=KL(), corruption=corruption)
        path = os.path.join(out, f"patch_{site}.csv")
        res.to_csv(path)
        top = res.top(3)
        summary["sites"][site] = {"table": path, "top": [[c, float(v)] for c, v in top]}
    summary["summary"] = _write(out, "patch_summary.json", summary)
    return summary


def run_user_chi(
    model_dir: str,
    data: str,
    out: str,
    *,
    batch_size: int = 8,
    num_probe: int = 8,
    num_chains: int = 4,
    num_draws: int = 50,
    step_size: float | str = "auto",
    localization: float = 100.0,
    nbeta: float | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> dict:
    """Per-token susceptibilities of every head, MLP and the embedding of the model in ``model_dir``, probed on
    the first ``num_probe`` sequences of ``data`` and sampled on all of them. Writes ``chi.npz``
    (:class:`~pypattern.SusceptibilityResult`), ``chi.csv`` and ``chi_summary.json`` into ``out``."""
    from ..susceptibility import susceptibilities

    model, tokens = _model_and_tokens(model_dir, data, dtype, sampling=True)
    components = [c for c in model.components() if c != "unembed"]
    res = susceptibilities(
        model,
        _batches(tokens, batch_size),
        tokens[:num_probe],
        components,
        num_chains=num_chains,
        num_draws=num_draws,
        step_size=step_size,
        localization=localization,
        nbeta=nbeta,
        seed=seed,
        quiet=True,
    )
    Path(out).mkdir(parents=True, exist_ok=True)
    res.save(os.path.join(out, "chi.npz"))
    chi = np.asarray(res.chi)
    np.savetxt(
        os.path.join(out, "chi.csv"), chi, delimiter=",", header=",".join(map(str, range(chi.shape[1])))
    )
    pca = res.pca(n_components=min(3, *chi.shape))
    summary = {
        "model": str(model_dir),
        "data": str(data),
        "components": list(res.components),
        "chi_shape": list(chi.shape),
        "explained_variance_ratio": [float(v) for v in np.asarray(pca.explained_variance_ratio).ravel()],
        **_step_summary(res.settings),
        "result": os.path.join(out, "chi.npz"),
        "table": os.path.join(out, "chi.csv"),
    }
    summary["summary"] = _write(out, "chi_summary.json", summary)
    return summary
