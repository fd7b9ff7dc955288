"""pypattern.devinterp against devinterp's public interface, without devinterp installed.

The tables below are facts read from devinterp 2.0.1 and 1.3.2 (``inspect.signature`` of their public callables;
the dimensions, shapes and dtypes of their results on a small run): parameter names, kinds (``p`` positional or
keyword, ``k`` keyword-only, ``**`` variadic keywords) and defaults. Each is checked against pypattern.devinterp's
callable of the same import path: every devinterp parameter exists with the same default, devinterp's positional
parameters sit at the same positions, and pypattern requires no argument devinterp does not. Where pypattern
differs on purpose the difference is listed here (``DEFAULT_RESOLVED``, ``POSITION_DIFFERS``), and the test fails
on any other. Numbers are checked against independent computations (losses by hand, the LLC from recorded draws).
"""

from __future__ import annotations

import importlib
import inspect
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

R = "<required>"

# devinterp 2.0.1: module path (under devinterp.) : callable -> [(name, kind, default repr)]
V20 = {
    "slt.llc:llc": [
        ("model", "p", R),
        ("dataset", "p", R),
        ("observables", "p", R),
        ("lr", "k", R),
        ("n_beta", "k", R),
        ("param_masks", "k", "None"),
        ("loss_fn", "k", "None"),
        ("kwargs", "**", R),
    ],
    "slt.llc:compute_llc": [("samples", "p", R)],
    "slt.sampling:sample": [
        ("model", "p", R),
        ("dataset", "p", R),
        ("observables", "p", R),
        ("lr", "k", R),
        ("n_beta", "k", R),
        ("param_masks", "k", "None"),
        ("num_chains", "k", "4"),
        ("num_draws", "k", "200"),
        ("batch_size", "k", "32"),
        ("num_burnin_steps", "k", "0"),
        ("num_steps_bw_draws", "k", "1"),
        ("num_init_loss_batches", "k", "32"),
        ("init_seed", "k", "100"),
        ("batches_per_draw", "k", "3"),
        ("obs_seed", "k", "1337"),
        ("gradient_accumulation_steps", "k", "1"),
        ("localization", "k", "0.0"),
        ("noise_level", "k", "1.0"),
        ("llc_weight_decay", "k", "0.0"),
        ("bounding_box_size", "k", "None"),
        ("sampling_method", "k", "'sgmcmc_sgld'"),
        ("sampling_method_kwargs", "k", "None"),
        ("rmsprop_eps", "k", "None"),
        ("rmsprop_alpha", "k", "None"),
        ("shuffle", "k", "True"),
        ("match_sampling_input_ids_across_chains", "k", "True"),
        ("init_noise", "k", "None"),
        ("device", "k", "None"),
        ("save_metrics", "k", "False"),
        ("output_path", "k", "None"),
        ("loss_fn", "k", "None"),
    ],
    "slt.susceptibilities:susceptibilities": [
        ("model", "p", R),
        ("dataset", "p", R),
        ("observables", "p", R),
        ("weight_restrictions", "p", R),
        ("sampling_task", "k", R),
        ("lr", "k", R),
        ("n_beta", "k", R),
        ("loss_fn", "k", "None"),
        ("include_sampling_task", "k", "False"),
        ("kwargs", "**", R),
    ],
    "slt.susceptibilities:compute_susceptibilities": [
        ("wr_map", "p", R),
        ("sampling_task", "p", R),
        ("observable_names", "p", "None"),
        ("include_sampling_task", "p", "False"),
    ],
    "slt.bif:bif": [
        ("model", "p", R),
        ("dataset", "p", R),
        ("observables", "p", R),
        ("lr", "k", R),
        ("n_beta", "k", R),
        ("param_masks", "k", "None"),
        ("correlation_method", "k", "'token'"),
        ("reduce_chain_dimension_method", "k", "'stack'"),
        ("average_tokenwise_bif", "k", "False"),
        ("compute_covariance", "k", "False"),
        ("bif_batch_size", "k", "32"),
        ("bif_device", "k", "None"),
        ("loss_fn", "k", "None"),
        ("kwargs", "**", R),
    ],
    "slt.bif:compute_bif": [
        ("samples", "p", R),
        ("correlation_method", "k", "'token'"),
        ("reduce_chain_dimension_method", "k", "'stack'"),
        ("loss_keys", "k", "'all'"),
        ("batch_index_range_1", "k", "'all'"),
        ("batch_index_range_2", "k", "'all'"),
        ("average_tokenwise_bif", "k", "False"),
        ("compute_covariance", "k", "False"),
        ("batch_size", "k", "32"),
        ("device", "k", "None"),
    ],
    "slt.weight_restrictions:create_param_masks": [("model", "p", R), ("restriction", "p", R)],
    "utils:default_nbeta": [("dataloader", "p", R), ("gradient_accumulation_steps", "p", "1")],
    "optim:SGLD": [
        ("params", "p", R),
        ("lr", "k", "0.01"),
        ("noise_level", "k", "1.0"),
        ("weight_decay", "k", "0.0"),
        ("localization", "k", "0.0"),
        ("nbeta", "k", "1.0"),
        ("bounding_box_size", "k", "None"),
        ("save_metrics", "k", "False"),
        ("sketch_dim", "k", "None"),
        ("sketch_seed", "k", "0"),
    ],
    "optim:SGNHT": [
        ("params", "p", R),
        ("lr", "p", "0.01"),
        ("diffusion_factor", "p", "0.01"),
        ("bounding_box_size", "p", "None"),
        ("save_noise", "p", "False"),
        ("save_mala_vars", "p", "False"),
        ("nbeta", "p", "1.0"),
        ("metrics", "p", "None"),
    ],
    "optim:SGMCMC": [
        ("params", "p", R),
        ("lr", "k", "0.01"),
        ("noise_level", "k", "1.0"),
        ("nbeta", "k", "1.0"),
        ("prior", "k", "None"),
        ("preconditioner", "k", "'identity'"),
        ("preconditioner_kwargs", "k", "None"),
        ("bounding_box_size", "k", "None"),
        ("mask", "k", "None"),
        ("save_metrics", "k", "False"),
        ("sketch_dim", "k", "None"),
        ("sketch_seed", "k", "0"),
    ],
    "optim:SGMCMC.sgld": [
        ("params", "p", R),
        ("lr", "p", "0.01"),
        ("noise_level", "p", "1.0"),
        ("weight_decay", "p", "0.0"),
        ("localization", "p", "0.0"),
        ("nbeta", "p", "1.0"),
        ("bounding_box_size", "p", "None"),
        ("mask", "p", "None"),
        ("save_metrics", "p", "False"),
        ("sketch_dim", "p", "None"),
        ("sketch_seed", "p", "0"),
    ],
    "optim:SGMCMC.sgnht": [
        ("params", "p", R),
        ("lr", "p", "0.01"),
        ("diffusion_factor", "p", "0.01"),
        ("nbeta", "p", "1.0"),
        ("bounding_box_size", "p", "None"),
        ("save_metrics", "p", "False"),
        ("sketch_dim", "p", "None"),
        ("sketch_seed", "p", "0"),
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
        ("mask", "p", "None"),
        ("save_metrics", "p", "False"),
        ("sketch_dim", "p", "None"),
        ("sketch_seed", "p", "0"),
    ],
    "optim:SGMCMC.get_method": [("method", "p", R)],
}

_SGLD13 = "<class 'devinterp.optim.sgld.SGLD'>"
# devinterp 1.3.2
V13 = {
    "slt.sampler:estimate_learning_coeff_with_summary": [
        ("model", "p", R),
        ("loader", "p", R),
        ("callbacks", "p", "[]"),
        ("evaluate", "p", "None"),
        ("sampling_method", "p", _SGLD13),
        ("optimizer_kwargs", "p", "None"),
        ("num_draws", "p", "100"),
        ("num_chains", "p", "10"),
        ("num_burnin_steps", "p", "0"),
        ("num_steps_bw_draws", "p", "1"),
        ("init_loss", "p", "None"),
        ("grad_accum_steps", "p", "1"),
        ("cores", "p", "1"),
        ("seed", "p", "None"),
        ("device", "p", "device(type='cpu')"),
        ("gpu_idxs", "p", "None"),
        ("verbose", "p", "True"),
        ("optimize_over_per_model_param", "p", "None"),
        ("online", "p", "False"),
        ("use_amp", "p", "False"),
    ],
    "slt.sampler:estimate_learning_coeff": [
        ("model", "p", R),
        ("loader", "p", R),
        ("callbacks", "p", "[]"),
        ("evaluate", "p", "None"),
        ("sampling_method", "p", _SGLD13),
        ("optimizer_kwargs", "p", "None"),
        ("num_draws", "p", "100"),
        ("num_chains", "p", "10"),
        ("num_burnin_steps", "p", "0"),
        ("num_steps_bw_draws", "p", "1"),
        ("init_loss", "p", "None"),
        ("grad_accum_steps", "p", "1"),
        ("cores", "p", "1"),
        ("seed", "p", "None"),
        ("device", "p", "device(type='cpu')"),
        ("verbose", "p", "True"),
        ("optimize_over_per_model_param", "p", "None"),
    ],
    "slt.sampler:sample": [
        ("model", "p", R),
        ("loader", "p", R),
        ("callbacks", "p", R),
        ("evaluate", "p", "None"),
        ("sampling_method", "p", _SGLD13),
        ("optimizer_kwargs", "p", "None"),
        ("num_draws", "p", "100"),
        ("num_chains", "p", "10"),
        ("num_burnin_steps", "p", "0"),
        ("num_steps_bw_draws", "p", "1"),
        ("init_loss", "p", "None"),
        ("grad_accum_steps", "p", "1"),
        ("cores", "p", "1"),
        ("seed", "p", "None"),
        ("device", "p", "device(type='cpu')"),
        ("verbose", "p", "True"),
        ("optimize_over_per_model_param", "p", "None"),
        ("gpu_idxs", "p", "None"),
        ("batch_size", "p", "1"),
        ("use_amp", "p", "False"),
        ("kwargs", "**", R),
    ],
    "utils:default_nbeta": [("dataloader", "p", R), ("grad_accum_steps", "p", "1")],
    "utils:get_init_loss_one_batch": [
        ("dataloader", "p", R),
        ("model", "p", R),
        ("evaluate", "p", R),
        ("device", "p", R),
        ("seed", "p", "None"),
    ],
    "utils:get_init_loss_multi_batch": [
        ("dataloader", "p", R),
        ("n_batches", "p", R),
        ("model", "p", R),
        ("evaluate", "p", R),
        ("device", "p", R),
        ("seed", "p", "None"),
    ],
    "utils:get_init_loss_full_batch": [
        ("dataloader", "p", R),
        ("model", "p", R),
        ("evaluate", "p", R),
        ("device", "p", R),
        ("seed", "p", "None"),
    ],
    "utils:make_evaluate": [("criterion", "p", R)],
    "utils:evaluate": [("criterion", "p", R), ("model", "p", R), ("data", "p", R)],
    "slt.llc:LLCEstimator": [
        ("num_chains", "p", R),
        ("num_draws", "p", R),
        ("init_loss", "p", R),
        ("device", "p", "'cpu'"),
        ("eval_field", "p", "'loss'"),
        ("nbeta", "p", "None"),
        ("temperature", "p", "None"),
    ],
    "slt.llc:OnlineLLCEstimator": [
        ("num_chains", "p", R),
        ("num_draws", "p", R),
        ("init_loss", "p", R),
        ("device", "p", "'cpu'"),
        ("eval_field", "p", "'loss'"),
        ("nbeta", "p", "None"),
        ("temperature", "p", "None"),
    ],
    "optim:SGLD": [
        ("params", "p", R),
        ("lr", "p", "0.01"),
        ("noise_level", "p", "1.0"),
        ("weight_decay", "p", "0.0"),
        ("localization", "p", "0.0"),
        ("nbeta", "p", "1.0"),
        ("bounding_box_size", "p", "None"),
        ("save_noise", "p", "False"),
        ("save_mala_vars", "p", "False"),
        ("optimize_over", "p", "None"),
        ("noise_norm", "p", "False"),
        ("grad_norm", "p", "False"),
        ("weight_norm", "p", "False"),
        ("distance", "p", "False"),
        ("temperature", "p", "None"),
        ("metrics", "p", "None"),
    ],
    "optim:SGNHT": [
        ("params", "p", R),
        ("lr", "p", "0.01"),
        ("diffusion_factor", "p", "0.01"),
        ("bounding_box_size", "p", "None"),
        ("save_noise", "p", "False"),
        ("save_mala_vars", "p", "False"),
        ("nbeta", "p", "1.0"),
        ("metrics", "p", "None"),
    ],
}

# import paths of the two releases that pypattern.devinterp mirrors (module under devinterp. -> names)
IMPORT_PATHS = {
    "optim": ["SGLD", "SGMCMC", "SGNHT"],
    "optim.sgld": ["SGLD"],
    "optim.sgnht": ["SGNHT"],
    "optim.sgmcmc": ["SGMCMC"],
    "slt": ["SGLD"],  # 1.3.2's slt package
    "slt.llc": ["llc", "compute_llc", "LLCEstimator", "OnlineLLCEstimator", "SamplerCallback"],
    "slt.sampling": ["sample"],
    "slt.sampler": [
        "sample", "estimate_learning_coeff", "estimate_learning_coeff_with_summary", "SGLD", "LLCEstimator",
        "OnlineLLCEstimator", "default_nbeta", "get_init_loss_multi_batch",
    ],
    "slt.susceptibilities": ["susceptibilities", "compute_susceptibilities"],
    "slt.bif": ["bif", "compute_bif"],
    "slt.callback": ["SamplerCallback"],
    "slt.weight_restrictions": ["create_param_masks"],
    "utils": [
        "default_nbeta", "make_evaluate", "evaluate", "evaluate_ce", "evaluate_mse", "get_init_loss_one_batch",
        "get_init_loss_multi_batch", "get_init_loss_full_batch",
    ],
}  # fmt: skip

# Defaults pypattern writes as None and resolves to devinterp's value (checked by behaviour below):
# the optimizers' step size, noise level and nbeta; the 1.x entry points' sampling_method (SGLD) and device
# (None: the model's own device, where devinterp's default CPU moves a GPU model) and callbacks ([] / ()).
DEFAULT_RESOLVED = {
    ("optim:SGLD", "lr"), ("optim:SGLD", "noise_level"), ("optim:SGLD", "nbeta"),
    ("optim:SGNHT", "lr"), ("optim:SGNHT", "nbeta"),
    ("slt.sampler:estimate_learning_coeff_with_summary", "sampling_method"),
    ("slt.sampler:estimate_learning_coeff_with_summary", "device"),
    ("slt.sampler:estimate_learning_coeff_with_summary", "callbacks"),
    ("slt.sampler:estimate_learning_coeff", "sampling_method"),
    ("slt.sampler:estimate_learning_coeff", "device"),
    ("slt.sampler:estimate_learning_coeff", "callbacks"),
    ("slt.sampler:sample", "sampling_method"), ("slt.sampler:sample", "device"),
    ("utils:default_nbeta", "gradient_accumulation_steps"),  # 2.0.1's name, keyword-only: 1.x's grad_accum_steps=1 holds position 1
}  # fmt: skip

# pypattern's name for devinterp's at the same position (the same argument under the name of the other release
# or of pypattern's own vocabulary)
SAME_ARGUMENT = {
    "step_size": "lr",
    "bounding_box": "bounding_box_size",
    "grad_accum_steps": "gradient_accumulation_steps",
    "optimize_over": "mask",
}

# devinterp's positional parameters that pypattern takes by keyword only or at another position: given by position
# they raise TypeError (or, for SGMCMC's factories past `mask`, bind 1.3's `metrics` where 2.0.1 has
# `save_metrics`); (release, callable) -> parameter names
POSITION_DIFFERS = {
    ("2.0.1", "optim:SGNHT"): {"save_noise", "save_mala_vars", "nbeta", "metrics"},
    ("2.0.1", "optim:SGMCMC.sgld"): {"save_metrics", "sketch_dim", "sketch_seed"},
    ("2.0.1", "optim:SGMCMC.sgnht"): {"save_metrics", "sketch_dim", "sketch_seed"},
    ("2.0.1", "optim:SGMCMC.rmsprop_sgld"): {"save_metrics", "sketch_dim", "sketch_seed"},
    ("1.3.2", "optim:SGNHT"): {"save_noise", "save_mala_vars", "nbeta", "metrics"},
    ("1.3.2", "optim:SGLD"): {
        "save_noise", "save_mala_vars", "optimize_over", "noise_norm", "grad_norm", "weight_norm", "distance",
        "temperature", "metrics",
    },
}  # fmt: skip

_KIND = {
    inspect.Parameter.POSITIONAL_OR_KEYWORD: "p",
    inspect.Parameter.KEYWORD_ONLY: "k",
    inspect.Parameter.VAR_KEYWORD: "**",
    inspect.Parameter.VAR_POSITIONAL: "*",
    inspect.Parameter.POSITIONAL_ONLY: "po",
}


def _ours(path: str):
    mod, name = path.split(":")
    obj = importlib.import_module(f"pypattern.devinterp.{mod}")
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _differences(release: str, table: dict) -> list[str]:
    out = []
    for path, theirs in table.items():
        sig = inspect.signature(_ours(path))
        ours = [
            (p.name, _KIND[p.kind], R if p.default is inspect.Parameter.empty else repr(p.default))
            for p in sig.parameters.values()
        ]
        by_name = {n: (i, k, d) for i, (n, k, d) in enumerate(ours)}
        their_names = {n for n, _, _ in theirs}
        for i, (name, kind, default) in enumerate(theirs):
            if kind == "**":
                if not any(k == "**" for _, k, _ in ours):
                    out.append(f"{release} {path}: no **kwargs")
                continue
            if name not in by_name:
                out.append(f"{release} {path}: no parameter {name}")
                continue
            j, k, d = by_name[name]
            if default != R and d != default and (path, name) not in DEFAULT_RESOLVED:
                out.append(f"{release} {path}: {name} default {d} (devinterp {default})")
            if kind == "p" and name not in POSITION_DIFFERS.get((release, path), ()):
                at = ours[i] if i < len(ours) else None
                if (
                    at is None
                    or at[1] != "p"
                    or SAME_ARGUMENT.get(at[0], at[0]) != SAME_ARGUMENT.get(name, name)
                ):
                    out.append(f"{release} {path}: position {i} is {at and at[0]} (devinterp {name})")
        for n, k, d in ours:
            if d == R and k in ("p", "k") and n not in their_names:
                out.append(f"{release} {path}: requires {n}, which devinterp does not have")
    return out


def test_signatures_match_devinterp_2_0_1():
    assert _differences("2.0.1", V20) == []


def test_signatures_match_devinterp_1_3_2():
    assert _differences("1.3.2", V13) == []


def test_position_differences_are_real():
    """Each listed positional difference is one (the list does not hide a parameter that lines up)."""
    for (release, path), names in POSITION_DIFFERS.items():
        theirs = (V20 if release == "2.0.1" else V13)[path]
        ours = list(inspect.signature(_ours(path)).parameters.values())
        for name in names:
            i = [n for n, _, _ in theirs].index(name)
            at = ours[i] if i < len(ours) else None
            assert at is None or at.kind != inspect.Parameter.POSITIONAL_OR_KEYWORD or at.name != name, (
                path,
                name,
            )


@pytest.mark.parametrize("module", sorted(IMPORT_PATHS))
def test_import_paths(module):
    mod = importlib.import_module(f"pypattern.devinterp.{module}")
    missing = [n for n in IMPORT_PATHS[module] if not hasattr(mod, n)]
    assert missing == []


def test_resolved_optimizer_defaults_are_devinterps():
    from pypattern.devinterp.optim import SGLD, SGMCMC, SGNHT

    p = [nn.Parameter(torch.zeros(3))]
    for opt in (SGLD(p), SGNHT(p), SGMCMC.sgld(p), SGMCMC.sgnht(p), SGMCMC(p)):
        g = opt.param_groups[0]
        assert (g["lr"], g["nbeta"], g["noise_scale"], g["localization"], g["weight_decay"]) == (
            0.01,
            1.0,
            1.0,
            0.0,
            0.0,
        )
    # by position, as devinterp's SGNHT(params, lr, diffusion_factor, bounding_box_size)
    g = SGNHT(p, 0.003, 0.02, 5.0).param_groups[0]
    assert (g["lr"], g["diffusion_factor"], g["bounding_box"]) == (0.003, 0.02, 5.0)


def test_default_nbeta_by_hand():
    from pypattern.devinterp.utils import default_nbeta

    loader = DataLoader(TensorDataset(torch.zeros(10, 1)), batch_size=8)
    assert default_nbeta(loader) == pytest.approx(8 / math.log(8))
    assert default_nbeta(32, 4) == pytest.approx(128 / math.log(128))
    assert default_nbeta(32, gradient_accumulation_steps=4) == pytest.approx(128 / math.log(128))


# ------------------------------------------------------------------------------------------ initial losses


def _regression(n=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.1 * torch.randn(n, 1, generator=g)
    torch.manual_seed(seed)
    return x, y, nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))


def _mse(model, data):
    x, y = data
    out = model(x)
    return nn.functional.mse_loss(out, y), {"output": out}


def test_get_init_loss_by_hand():
    from pypattern.devinterp.utils import (
        get_init_loss_full_batch,
        get_init_loss_multi_batch,
        get_init_loss_one_batch,
    )

    x, y, model = _regression()
    with torch.no_grad():
        batch_means = [float(((model(x[i : i + 32]) - y[i : i + 32]) ** 2).mean()) for i in range(0, 100, 32)]
    # seeded: the data set read in order; a mean of batch means (the short last batch of 4 weighs as the others)
    shuffled = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    assert get_init_loss_one_batch(shuffled, model, _mse, "cpu", seed=3) == pytest.approx(
        batch_means[0], rel=1e-6
    )
    assert get_init_loss_multi_batch(shuffled, 2, model, _mse, "cpu", seed=3) == pytest.approx(
        np.mean(batch_means[:2]), rel=1e-6
    )
    assert get_init_loss_multi_batch(shuffled, 50, model, _mse, "cpu", seed=3) == pytest.approx(
        np.mean(batch_means), rel=1e-6
    )
    assert get_init_loss_full_batch(shuffled, model, _mse, "cpu", seed=3) == pytest.approx(
        np.mean(batch_means), rel=1e-6
    )
    # unseeded: the loader's own batches; the loss may be a bare tensor, a dict's "loss" or a tuple's first
    plain = DataLoader(TensorDataset(x, y), batch_size=32)
    assert get_init_loss_one_batch(
        plain, model, lambda m, d: _mse(m, d)[0], torch.device("cpu")
    ) == pytest.approx(batch_means[0], rel=1e-6)
    assert get_init_loss_full_batch(
        plain, model, lambda m, d: {"loss": _mse(m, d)[0]}, "cpu"
    ) == pytest.approx(np.mean(batch_means), rel=1e-6)


def test_get_init_loss_leaves_the_model_alone():
    """Dropout in train() mode is scored in eval() mode, with a warning; modes and BatchNorm statistics stay."""
    from pypattern.devinterp.utils import get_init_loss_full_batch

    x, y, _ = _regression()
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 1))
    model.train()
    stats = model[1].running_mean.clone()
    loader = DataLoader(TensorDataset(x, y), batch_size=50)
    with pytest.warns(UserWarning, match="dropout"):
        got = get_init_loss_full_batch(loader, model, _mse, "cpu")
    assert model.training and model[2].training
    assert torch.equal(model[1].running_mean, stats)
    model.eval()
    with torch.no_grad():
        want = np.mean([float(((model(x[i : i + 50]) - y[i : i + 50]) ** 2).mean()) for i in (0, 50)])
    assert got == pytest.approx(want, rel=1e-6)


def test_get_init_loss_bad_input():
    from pypattern.devinterp.utils import get_init_loss_multi_batch, get_init_loss_one_batch

    x, y, model = _regression()
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    with pytest.raises(ValueError, match="n_batches"):
        get_init_loss_multi_batch(loader, 0, model, _mse, "cpu")
    with pytest.raises(TypeError, match="evaluate"):
        get_init_loss_one_batch(loader, model, None, "cpu")
    with pytest.raises(TypeError, match="seed"):
        get_init_loss_one_batch([(x, y)], model, _mse, "cpu", seed=1)
    with pytest.raises(ValueError, match="no batch"):
        get_init_loss_one_batch([], model, _mse, "cpu")


def test_evaluate_is_devinterps():
    from pypattern.devinterp.utils import evaluate

    x, y, model = _regression()
    loss, out = evaluate(nn.functional.mse_loss, model, (x, y))
    with torch.no_grad():
        want = float(((model(x) - y) ** 2).mean())
    assert float(loss.detach()) == pytest.approx(want, rel=1e-6)


# --------------------------------------------------------------------------------------------- 1.x results


def test_estimate_with_summary_keys_and_llc_from_its_trace():
    """devinterp 1.3.2's keys (llc/mean, llc/std, llc-chain/i, loss/trace (chains, draws)); each chain's LLC is
    nbeta (mean loss of its draws - init_loss), llc/std their std over chains (ddof=1, torch's)."""
    from pypattern.devinterp.slt import SGLD, estimate_learning_coeff_with_summary
    from pypattern.devinterp.utils import default_nbeta, get_init_loss_multi_batch

    x, y, model = _regression(256)
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    nbeta = default_nbeta(loader)
    init = get_init_loss_multi_batch(loader, 4, model, _mse, "cpu", seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = estimate_learning_coeff_with_summary(
            model, loader, evaluate=_mse, sampling_method=SGLD, optimizer_kwargs=dict(lr=1e-4, nbeta=nbeta, localization=100.0),
            num_chains=4, num_draws=30, init_loss=init, seed=1, device="cpu", verbose=False,
        )  # fmt: skip
    assert set(r) == {"llc/mean", "llc/std", "loss/trace", *(f"llc-chain/{i}" for i in range(4))}
    trace = np.asarray(r["loss/trace"], dtype=np.float64)
    assert trace.shape == (4, 30)
    per_chain = nbeta * (trace.mean(1) - init)
    got = np.array([r[f"llc-chain/{i}"] for i in range(4)])
    np.testing.assert_allclose(got, per_chain, rtol=1e-4, atol=1e-5)
    assert r["llc/mean"] == pytest.approx(per_chain.mean(), rel=1e-4, abs=1e-5)
    assert r["llc/std"] == pytest.approx(per_chain.std(ddof=1), rel=1e-3, abs=1e-5)


# --------------------------------------------------------------------------------------------- 2.x results

V, T = 8, 6

# dims, shape and dtype of each result variable of devinterp 2.0.1 on the run below (2 chains, 4 draws, batch 8,
# 16 probe sequences of 6 tokens)
RESULTS = {
    "llc": {"init_loss": ((), (), "float64"), "llc_mean": ((), (), "float32"), "llc_per_chain": (("chain",), (2,), "float32"), "llc_scalar": ((), (), "float64"), "llc_std": ((), (), "float32"), "loss_trace": (("chain", "step"), (2, 4), "float32")},
    "sample": {"init_loss": (("chain", "token_pos"), (2, 5), "float32"), "input_ids_probe": (("batch_probe", "token"), (16, 6), "int64"), "loss_probe": (("chain", "draw", "batch_probe", "token_pos"), (2, 4, 16, 5), "float32"), "sampling_input_ids_micro": (("chain", "step", "batch_sampling", "token"), (2, 4, 8, 6), "int64"), "sampling_loss": (("chain", "draw", "batch", "token_pos"), (2, 4, 8, 5), "float32"), "sampling_loss_micro": (("chain", "step", "batch_sampling", "token_pos"), (2, 4, 8, 5), "float32")},
    "bif_token": {"influences": (("batch_1", "batch_2", "target_position", "target_position_T"), (16, 16, 5, 5), "float32"), "input_ids": (("batch", "position"), (16, 6), "int64")},
    "bif_sequence": {"influences": (("batch_1", "batch_2"), (16, 16), "float32"), "input_ids": (("batch", "position"), (16, 6), "int64")},
}  # fmt: skip
SAMPLE_ATTRS = {"completed", "metadata"}
SUS = {"sus": (("sus_flat", "wr"), (80, 2), "float32")}
SUS_COORDS = {"batch", "dataset_id", "target_position", "wr"}
CONTEXT = {"input_ids": (("ctx_flat",), (96,), "int64")}
CONTEXT_COORDS = {"batch", "dataset_id", "position"}


class _LM(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.attn, self.mlp, self.out = (
            nn.Embedding(V, 16),
            nn.Linear(16, 16),
            nn.Linear(16, 16),
            nn.Linear(16, V),
        )

    def forward(self, x):
        h = self.emb(x)
        h = h + torch.tanh(self.attn(h)).cumsum(1) / torch.arange(1, x.shape[1] + 1)[:, None]
        return self.out(h + torch.relu(self.mlp(h)))


def _describe(res) -> dict:
    out = {}
    for k in res.data_vars:
        v = res[k]
        out[k] = (tuple(v.dims), tuple(np.shape(v.values)), str(np.asarray(v.values).dtype))
    return out


@pytest.fixture(scope="module")
def lm_runs():
    from pypattern.devinterp.slt.bif import bif
    from pypattern.devinterp.slt.llc import compute_llc, llc
    from pypattern.devinterp.slt.sampling import sample
    from pypattern.devinterp.slt.susceptibilities import susceptibilities

    ids = torch.randint(0, V, (64, T), generator=torch.Generator().manual_seed(1))
    train, probe = {"input_ids": ids[:48]}, {"input_ids": ids[48:]}
    model = _LM()
    kw = dict(
        lr=1e-3,
        n_beta=5.0,
        num_chains=2,
        num_draws=4,
        batch_size=8,
        num_init_loss_batches=2,
        batches_per_draw=2,
        device="cpu",
    )
    wr = {"full": None, "emb": {"emb.weight": None}, "out": {"out.weight": None, "out.bias": None}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        samples = sample(model, train, {"probe": probe}, **kw)
        return {
            "llc": llc(model, train, {}, **kw),
            "sample": samples,
            "compute_llc": compute_llc(samples),
            "sus": susceptibilities(
                model, train, {"train": train, "probe": probe}, wr, sampling_task="train", **kw
            ),
            "bif_token": bif(model, train, {"probe": probe}, correlation_method="token", **kw),
            "bif_sequence": bif(model, train, {"probe": probe}, correlation_method="sequence", **kw),
        }


@pytest.mark.parametrize("what", sorted(RESULTS))
def test_result_variables(lm_runs, what):
    assert _describe(lm_runs[what]) == RESULTS[what]


def test_sample_attrs(lm_runs):
    s = lm_runs["sample"]
    assert set(s.dataset.attrs) == SAMPLE_ATTRS and s.dataset.attrs["completed"] == 1
    assert s.dataset.attrs["metadata"]["config"]["sampler"]["n_beta"] == 5.0


def test_susceptibility_tree(lm_runs):
    s = lm_runs["sus"]
    assert _describe(s["susceptibilities"]) == SUS and set(s["susceptibilities"].coords) == SUS_COORDS
    assert _describe(s["context"]) == CONTEXT and set(s["context"].coords) == CONTEXT_COORDS
    assert list(s["susceptibilities"].coords["wr"].values) == ["emb", "out"]


def test_compute_llc_from_recorded_draws(lm_runs):
    """n_beta (mean of every recorded step's loss, burn-in included - mean init loss), per chain, by hand."""
    s, r = lm_runs["sample"], lm_runs["compute_llc"]
    micro = np.asarray(s["sampling_loss_micro"].values, dtype=np.float64)
    init = float(np.asarray(s["init_loss"].values, dtype=np.float64).mean())
    per_chain = 5.0 * (micro.reshape(2, -1).mean(1) - init)
    np.testing.assert_allclose(r["llc_per_chain"].values, per_chain, rtol=1e-5, atol=1e-6)
    assert float(r["llc_mean"]) == pytest.approx(per_chain.mean(), rel=1e-5, abs=1e-6)
    assert float(r["llc_std"]) == pytest.approx(per_chain.std(), rel=1e-4, abs=1e-6)  # ddof=0, xarray's
    assert float(r["llc_scalar"]) == pytest.approx(5.0 * (micro.mean() - init), rel=1e-6, abs=1e-6)
    np.testing.assert_allclose(r["loss_trace"].values, micro.mean(axis=(2, 3)), rtol=1e-6)
