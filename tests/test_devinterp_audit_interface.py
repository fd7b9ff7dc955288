"""pypattern.devinterp against devinterp 1.3.2 and 2.0.1: the callables the other parity tables leave out
(the callback protocol's methods, 1.3.2's ``SGMCMC`` factories, the optimizers' ``step``), and the
post-processing (``compute_llc``, ``compute_susceptibilities``, ``compute_bif``, the 1.x estimators,
``create_param_masks``) against naive loops written from devinterp's documented formulas.

The tables are facts read from devinterp's sources: parameter names, kinds (``p`` positional or keyword, ``k``
keyword-only, ``*`` / ``**`` variadic) and defaults.
"""

from __future__ import annotations

import importlib
import inspect

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

R = "<required>"

# devinterp 1.3.2 (callbacks and 1.3.2's SGMCMC factories) and both releases' optimizer steps
V13_EXTRA = {
    "slt.callback:SamplerCallback": [("device", "p", "'cpu'")],
    "slt.callback:SamplerCallback.share_memory_": [],
    "slt.callback:SamplerCallback.__call__": [("args", "*", R), ("kwargs", "**", R)],
    "slt.callback:SamplerCallback.finalize": [("args", "*", R), ("kwargs", "**", R)],
    "slt.callback:SamplerCallback.get_results": [("args", "*", R), ("kwargs", "**", R)],
    "slt.llc:LLCEstimator.update": [("chain", "p", R), ("draw", "p", R), ("loss", "p", R)],
    "slt.llc:LLCEstimator.finalize": [],
    "slt.llc:LLCEstimator.get_results": [],
    "slt.llc:LLCEstimator.__call__": [("chain", "p", R), ("draw", "p", R), ("kwargs", "**", R)],
    "slt.llc:OnlineLLCEstimator.update": [("chain", "p", R), ("draw", "p", R), ("loss", "p", R)],
    "slt.llc:OnlineLLCEstimator.finalize": [],
    "slt.llc:OnlineLLCEstimator.get_results": [],
    "slt.llc:OnlineLLCEstimator.__call__": [("chain", "p", R), ("draw", "p", R), ("kwargs", "**", R)],
    "optim:SGMCMC.sgld": [
        ("params", "p", R),
        ("lr", "p", "0.01"),
        ("noise_level", "p", "1.0"),
        ("weight_decay", "p", "0.0"),
        ("localization", "p", "0.0"),
        ("nbeta", "p", "1.0"),
        ("bounding_box_size", "p", "None"),
        ("optimize_over", "p", "None"),
        ("metrics", "p", "None"),
    ],
    "optim:SGMCMC.sgnht": [
        ("params", "p", R),
        ("lr", "p", "0.01"),
        ("diffusion_factor", "p", "0.01"),
        ("nbeta", "p", "1.0"),
        ("bounding_box_size", "p", "None"),
        ("metrics", "p", "None"),
    ],
    "optim:SGMCMC.rmsprop_sgld": [
        ("params", "p", R),
        ("lr", "p", "0.01"),
        ("noise_level", "p", "1.0"),
        ("weight_decay", "p", "0.0"),
        ("localization", "p", "0.0"),
        ("nbeta", "p", "1.0"),
        ("alpha", "p", "0.99"),
        ("eps", "p", "0.1"),
        ("add_grad_correction", "p", "False"),
        ("bounding_box_size", "p", "None"),
        ("optimize_over", "p", "None"),
        ("metrics", "p", "None"),
    ],
    "optim.sgld:SGLD.step": [("noise_generator", "p", "None")],  # 2.0.1's too (with -> None)
    "optim.sgnht:SGNHT.step": [("closure", "p", "None")],
}

# pypattern's deliberate differences: (path, name) -> why
POSITION_DIFFERS = {
    # torch.optim.Optimizer.step(closure) comes first; a torch.Generator given there is read as noise_generator
    # (checked by behaviour in test_step_takes_a_generator_by_position)
    ("optim.sgld:SGLD.step", "noise_generator"): "closure first",
}


def _ours(path: str):
    mod, name = path.split(":")
    obj = importlib.import_module(f"pypattern.devinterp.{mod}")
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


_KIND = {
    inspect.Parameter.POSITIONAL_OR_KEYWORD: "p",
    inspect.Parameter.POSITIONAL_ONLY: "p",
    inspect.Parameter.KEYWORD_ONLY: "k",
    inspect.Parameter.VAR_POSITIONAL: "*",
    inspect.Parameter.VAR_KEYWORD: "**",
}


def _params(obj) -> list[tuple[str, str, str]]:
    sig = inspect.signature(obj)
    return [
        (p.name, _KIND[p.kind], R if p.default is inspect.Parameter.empty else repr(p.default))
        for p in sig.parameters.values()
        if p.name not in ("self", "cls")
    ]


@pytest.mark.parametrize("path", sorted(V13_EXTRA))
def test_signature_matches_devinterp(path):
    theirs, ours = V13_EXTRA[path], _params(_ours(path))
    by_name = {n: (i, k, d) for i, (n, k, d) in enumerate(ours)}
    has_var_kw = any(k == "**" for _, k, _ in ours)
    for i, (name, kind, default) in enumerate(theirs):
        if kind in ("*", "**"):
            assert any(k == kind for _, k, _ in ours), f"{path}: no {kind}{name}"
            continue
        assert name in by_name or has_var_kw, f"{path}: no parameter {name}"
        if name not in by_name:
            continue
        j, k, d = by_name[name]
        if kind == "p" and (path, name) not in POSITION_DIFFERS:
            assert (j, k) == (i, "p"), f"{path}: {name} at position {j} ({k}), devinterp {i}"
        assert d == default, f"{path}: {name} defaults to {d}, devinterp {default}"
    # no argument devinterp leaves optional is required here
    their_names = {n for n, _, _ in theirs}
    for name, _, d in ours:
        if name not in their_names:
            assert d != R or name in ("args", "kwargs"), (
                f"{path}: {name} is required, devinterp has no such argument"
            )


@pytest.mark.parametrize("make", ["SGLD", "SGMCMC.sgld", "SGMCMC.rmsprop_sgld", "SGNHT"])
def test_step_takes_a_generator_by_position(make):
    """devinterp's ``optimizer.step(generator)``: the noise comes from that generator, as by keyword."""
    from pypattern.devinterp import optim

    factory = {
        "SGLD": lambda p: optim.SGLD(p, lr=0.01, nbeta=1.0),
        "SGMCMC.sgld": lambda p: optim.SGMCMC.sgld(p, lr=0.01),
        "SGMCMC.rmsprop_sgld": lambda p: optim.SGMCMC.rmsprop_sgld(p, lr=0.01),
        "SGNHT": lambda p: optim.SGNHT(p, lr=0.01),
    }[make]

    def after(how: str, seed: int = 5) -> torch.Tensor:
        torch.manual_seed(0)
        m = nn.Linear(3, 2)
        opt = factory(m.parameters())
        m(torch.ones(4, 3)).pow(2).mean().backward()
        g = torch.Generator().manual_seed(seed)
        if how == "position":
            opt.step(g)
        else:
            opt.step(noise_generator=g)
        return m.weight.detach().clone()

    assert torch.equal(after("position"), after("keyword"))
    assert not torch.equal(after("keyword", 5), after("keyword", 6))


# ------------------------------------------------------------------ post-processing against naive loops


def _samples(
    rng, chains=3, draws=7, steps=9, n_micro=4, T=5, n_beta=12.5, probes=(("zeta", 6), ("alpha", 4))
):
    """A sample() result in devinterp 2.0.1's layout, filled with random losses."""
    s = {
        "sampling_loss_micro": rng.gamma(2.0, 1.0, (chains, steps, n_micro, T)).astype(np.float32),
        "init_loss": rng.gamma(2.0, 1.0, (chains, T)).astype(np.float32),
        "metadata": {"config": {"sampler": {"n_beta": n_beta}}},
    }
    for name, b in probes:
        s[f"loss_{name}"] = rng.gamma(2.0, 1.0, (chains, draws, b, T)).astype(np.float32)
        s[f"input_ids_{name}"] = rng.integers(0, 50, (b, T + 1))
    return s


def test_compute_llc_against_loops():
    from pypattern.devinterp.slt.llc import compute_llc

    s = _samples(np.random.default_rng(0))
    micro = s["sampling_loss_micro"].astype(np.float64)
    C, S, B, T = micro.shape
    init = sum(float(x) for x in s["init_loss"].ravel()) / s["init_loss"].size
    trace = np.zeros((C, S))
    for c in range(C):
        for t in range(S):
            trace[c, t] = sum(micro[c, t, b, k] for b in range(B) for k in range(T)) / (B * T)
    per_chain = [12.5 * (sum(trace[c]) / S - init) for c in range(C)]
    mean = sum(per_chain) / C
    std = (sum((x - mean) ** 2 for x in per_chain) / C) ** 0.5  # xarray's std: ddof 0
    res = compute_llc(s)
    np.testing.assert_allclose(res["llc_per_chain"], per_chain, rtol=1e-5)
    np.testing.assert_allclose(res["loss_trace"], trace, rtol=1e-5)
    np.testing.assert_allclose(float(res["llc_mean"]), mean, rtol=1e-5)
    np.testing.assert_allclose(float(res["llc_std"]), std, rtol=1e-4)
    np.testing.assert_allclose(float(res["llc_scalar"]), 12.5 * (micro.mean() - init), rtol=1e-6)
    np.testing.assert_allclose(float(res["init_loss"]), init, rtol=1e-6)
    assert res["llc_per_chain"].dtype == np.float32 and res["loss_trace"].dtype == np.float32


def test_compute_susceptibilities_against_loops():
    from pypattern.devinterp.slt.susceptibilities import compute_susceptibilities

    rng = np.random.default_rng(1)
    probes = (("train", 3), ("zeta", 4), ("alpha", 2))
    wr_map = {w: _samples(rng, probes=probes) for w in ("full", "head", "mlp")}
    res = compute_susceptibilities(wr_map, "train")
    names = ["alpha", "zeta"]  # devinterp orders the probes by name
    assert list(res["susceptibilities"].attrs["dataset_id_to_name"]) == names
    full = wr_map["full"]
    init = float(np.mean(full["init_loss"], dtype=np.float64))
    full_train = float(np.mean(full["loss_train"], dtype=np.float64))
    sus = np.asarray(res["susceptibilities"]["sus"])
    assert sus.dtype == np.float32  # devinterp stores float32
    assert list(np.asarray(res["susceptibilities"]["wr"])) == ["head", "mlp"]
    row = 0
    ds_id = np.asarray(res["susceptibilities"]["dataset_id"])
    batch = np.asarray(res["susceptibilities"]["batch"])
    pos = np.asarray(res["susceptibilities"]["target_position"])
    for i, name in enumerate(names):
        probe_full = full[f"loss_{name}"].astype(np.float64)
        C, D, B, T = probe_full.shape
        for b in range(B):
            for t in range(T):
                delta = full_train - probe_full[:, :, b, t].mean()
                for j, w in enumerate(["head", "mlp"]):
                    run = wr_map[w]
                    phi = np.zeros((C, D))
                    lbar = np.zeros((C, D))
                    for c in range(C):
                        for d in range(D):
                            lbar[c, d] = run["loss_train"][c, d].astype(np.float64).mean()
                            phi[c, d] = lbar[c, d] - init
                    probe = run[f"loss_{name}"].astype(np.float64)[:, :, b, t]
                    chi = (phi * lbar).mean() - (phi * probe).mean() - phi.mean() * delta
                    np.testing.assert_allclose(sus[row, j], chi, rtol=1e-4, atol=1e-6)
                assert (ds_id[row], batch[row], pos[row]) == (i, b, t + 1)
                row += 1
    assert row == sus.shape[0]
    ctx = np.asarray(res["context"]["input_ids"])
    np.testing.assert_array_equal(ctx, np.concatenate([full[f"input_ids_{n}"].ravel() for n in names]))


def _pearson(x, y, covariance):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    c = ((x - x.mean()) * (y - y.mean())).sum() / (len(x) - 1)
    return c if covariance else c / (x.std(ddof=1) * y.std(ddof=1))


@pytest.mark.parametrize("method", ["token", "sequence"])
@pytest.mark.parametrize("reduce", ["stack", "mean"])
@pytest.mark.parametrize("covariance", [False, True])
def test_compute_bif_against_loops(method, reduce, covariance):
    from pypattern.devinterp.slt.bif import compute_bif

    s = _samples(np.random.default_rng(2), chains=2, draws=9, T=3, probes=(("zeta", 3), ("alpha", 2)))
    res = compute_bif(
        s, correlation_method=method, reduce_chain_dimension_method=reduce, compute_covariance=covariance
    )
    loss = np.concatenate([s["loss_alpha"], s["loss_zeta"]], axis=2).astype(np.float64)  # probes by name
    if method == "sequence":
        loss = loss.mean(axis=3, keepdims=True)
    if reduce == "mean":
        series = loss.mean(axis=0)  # (draw, batch, token)
    else:
        series = loss.reshape(-1, *loss.shape[2:])  # (chain * draw, batch, token)
    _, B, T = series.shape
    inf = np.asarray(res["influences"])
    for i in range(B):
        for j in range(B):
            for t in range(T):
                for u in range(T):
                    want = _pearson(series[:, i, t], series[:, j, u], covariance)
                    got = inf[i, j, t, u] if method == "token" else inf[i, j]
                    if method == "token" and not covariance and i == j and t == u:
                        want = 1.0
                    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-5)
    np.testing.assert_array_equal(
        np.asarray(res["input_ids"]), np.concatenate([s["input_ids_alpha"], s["input_ids_zeta"]])
    )


def test_v1_estimators_against_loops():
    """devinterp 1.3.2's formulas: LLCEstimator ``nbeta * (mean loss - init_loss)`` per chain, std with ddof 1;
    OnlineLLCEstimator ``nbeta * (loss - init_loss)`` per draw, means and stds (ddof 1) over chains."""
    from pypattern.devinterp.slt.llc import LLCEstimator, OnlineLLCEstimator

    rng = np.random.default_rng(3)
    C, D, nbeta, init = 3, 6, 7.5, 0.4
    losses = rng.gamma(2.0, 0.5, (C, D)).astype(np.float32)
    est, online = LLCEstimator(C, D, init_loss=init, nbeta=nbeta), OnlineLLCEstimator(C, D, init, nbeta=nbeta)
    for c in range(C):
        for d in range(D):
            est(chain=c, draw=d, loss=torch.tensor(losses[c, d]))
            online(c, d, loss=torch.tensor(losses[c, d]))
    est.finalize()
    online.finalize()
    per_chain = [nbeta * (sum(float(x) for x in losses[c]) / D - init) for c in range(C)]
    mean = sum(per_chain) / C
    r = est.get_results()
    assert sorted(r) == sorted(["llc/mean", "llc/std", "loss/trace"] + [f"llc-chain/{c}" for c in range(C)])
    np.testing.assert_allclose([r[f"llc-chain/{c}"] for c in range(C)], per_chain, rtol=1e-5)
    np.testing.assert_allclose(r["llc/mean"], mean, rtol=1e-5)
    np.testing.assert_allclose(r["llc/std"], np.std(per_chain, ddof=1), rtol=1e-4)
    np.testing.assert_array_equal(r["loss/trace"], losses)
    o = online.get_results()
    assert sorted(o) == ["init_loss", "llc/means", "llc/stds", "llc/trace", "loss/trace"]
    trace = nbeta * (losses.astype(np.float64) - init)
    np.testing.assert_allclose(o["llc/trace"], trace, rtol=1e-5)
    np.testing.assert_allclose(o["llc/means"], trace.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(o["llc/stds"], trace.std(axis=0, ddof=1), rtol=1e-4)


# devinterp 1.3.2's sample_single_chain hands its callbacks its locals (``callback(**locals())``); read from its source
V13_CALLBACK_KEYWORDS = {
    "callback", "callbacks", "chain", "cumulative_loss", "data", "device", "draw", "evaluate", "grad_accum_steps",
    "i", "kwargs", "loader", "loss", "model", "num_burnin_steps", "num_draws", "num_steps", "num_steps_bw_draws",
    "optimize_over_per_model_param", "optimizer", "optimizer_kwargs", "optimizer_metrics", "pbar", "ref_model",
    "results", "sampling_method", "seed", "use_amp", "verbose",
}  # fmt: skip


class _Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, **kw):
        self.calls.append((kw["chain"], kw["draw"], kw["i"], sorted(kw)))


def _run_v1_sample(callback, burn, every, draws=4, chains=2):
    from pypattern.devinterp.slt.sampler import sample
    from pypattern.devinterp.utils import evaluate_mse

    torch.manual_seed(0)
    x = torch.randn(64, 3)
    loader = DataLoader(TensorDataset(x, x @ torch.randn(3, 1)), batch_size=16)
    return sample(
        nn.Linear(3, 1), loader, [callback], evaluate=evaluate_mse, num_chains=chains, num_draws=draws,
        num_burnin_steps=burn, num_steps_bw_draws=every, optimizer_kwargs=dict(lr=1e-4, nbeta=4.0),
        seed=1, verbose=False, warn_nonstationary=False,
    )  # fmt: skip


def test_callback_protocol_keywords():
    from pypattern.devinterp.slt.callback import SamplerCallback

    class Recorder(SamplerCallback):
        def __init__(self):
            super().__init__()
            self.calls = []

        __call__ = _Recorder.__call__

        def get_results(self):
            return {"n_calls": len(self.calls)}

    rec = Recorder()
    out = _run_v1_sample(rec, burn=2, every=1)
    assert out == {"n_calls": 2 * 4}
    assert V13_CALLBACK_KEYWORDS <= set(rec.calls[0][3])
    assert sorted(call[:2] for call in rec.calls) == [(c, d) for c in range(2) for d in range(4)]


@pytest.mark.parametrize(
    "burn, every",
    [
        (2, 1),
        (3, 2),
        (0, 3),
    ],
)
def test_v1_draw_schedule(burn, every):
    """devinterp 1.3.2's sample_single_chain draws at step i when i >= burn-in and (i + 1 - burn-in) % every == 0,
    draw = (i - burn-in) // every: the last draw at the chain's last step."""
    rec = _Recorder()
    _run_v1_sample(rec, burn=burn, every=every)
    want = [(c, d, burn + (d + 1) * every - 1) for c in range(2) for d in range(4)]
    assert sorted(call[:3] for call in rec.calls) == want


def test_create_param_masks_heads_from_layout():
    """A GPT-2 head and a Llama GQA group, the masked rows / columns written from the models' weight layouts."""
    transformers = pytest.importorskip("transformers")
    from pypattern.devinterp.slt.weight_restrictions import create_param_masks

    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=2, n_head=4, n_embd=16, vocab_size=32, n_positions=8)
    )
    m = create_param_masks(gpt2, "l0h1")
    cols = torch.zeros(48, dtype=torch.bool)
    for part in range(3):  # c_attn is Conv1D (in, 3 * d): q | k | v, head 1 = features 4..7 of each
        cols[part * 16 + 4 : part * 16 + 8] = True
    assert set(m) == {f"transformer.h.0.attn.{n}" for n in ("c_attn.weight", "c_attn.bias", "c_proj.weight")}
    assert torch.equal(m["transformer.h.0.attn.c_attn.weight"].bool(), cols.expand(16, 48))
    assert torch.equal(m["transformer.h.0.attn.c_attn.bias"].bool(), cols)
    rows = torch.zeros(16, 16, dtype=torch.bool)
    rows[4:8] = True  # c_proj is Conv1D (d, d): the head's input features are rows
    assert torch.equal(m["transformer.h.0.attn.c_proj.weight"].bool(), rows)

    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, hidden_size=16,
            intermediate_size=24, vocab_size=32,
        )
    )  # fmt: skip
    g = create_param_masks(
        llama, "l0g1"
    )  # group 1: query heads 2 and 3 sharing key/value head 1 (head_dim 4)
    a = "model.layers.0.self_attn."
    q = torch.zeros(16, 16, dtype=torch.bool)
    q[8:16] = True
    kv = torch.zeros(8, 16, dtype=torch.bool)
    kv[4:8] = True
    o = torch.zeros(16, 16, dtype=torch.bool)
    o[:, 8:16] = True
    assert set(g) == {a + n for n in ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")}
    assert torch.equal(g[a + "q_proj.weight"].bool(), q)
    assert torch.equal(g[a + "k_proj.weight"].bool(), kv)
    assert torch.equal(g[a + "v_proj.weight"].bool(), kv)
    assert torch.equal(g[a + "o_proj.weight"].bool(), o)
