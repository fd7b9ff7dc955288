"""Statements of the README checked against the code: the defaults it states equal the signatures' defaults, the
commands, make targets and documents it names exist, and the behaviours it describes for mean ablation with a
mask, zero ablation, ``invert(counted=)`` and the cache's analysis methods hold against computations by hand."""

import inspect
import math
import pathlib
import re

import numpy as np
import pytest
import torch

import pypattern as pp
from pypattern import circuits

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _default(fn, name):
    return inspect.signature(fn).parameters[name].default


def test_stated_defaults_equal_the_signatures():
    from pypattern.sampling import RMSpropSGLD

    # "max_memory (bytes per engine batch, default 1 GiB)", "max_batch (cells per batch)"
    assert _default(pp.activation_patching, "max_memory") == 2**30
    assert _default(pp.activation_patching, "max_batch") is None
    # attribution_patching: one pass over all prompts unless bounded
    assert _default(pp.attribution_patching, "max_batch") is None
    assert _default(pp.attribution_patching, "max_memory") is None
    assert _default(pp.shortlist_and_confirm, "max_memory") == 2**30
    # "memory_budget=1e9" for every circuits entry point the README lists
    for name in ("patch_edges", "edge_attribution", "faithfulness", "pruning_curve", "acdc"):
        assert _default(getattr(circuits, name), "memory_budget") == 1e9, name
    # invert: "pinv" is the default, "ridge" and "constrained" the others
    assert _default(pp.invert, "method") == "pinv"
    # sampling: step_size None (automatic), burn-in None, localization 0
    assert _default(pp.sample, "step_size") is None
    assert _default(pp.sample, "num_burnin_steps") is None
    assert _default(pp.sample, "localization") == 0.0
    # RMSprop-SGLD: "the default eps=0.1" (and devinterp's alpha 0.99)
    assert _default(RMSpropSGLD, "eps") == 0.1
    assert _default(RMSpropSGLD, "alpha") == 0.99
    # similarity, corruptions, conversions, Gram
    assert _default(pp.linear_cka, "debiased") is True
    assert _default(pp.GaussianNoise, "positions") is None
    assert _default(pp.GaussianNoise, "std_multiplier") == 3.0
    assert _default(pp.interpretive_equivalence, "compare") != "implementations"
    assert _default(pp.from_hf, "verify") is True
    assert _default(pp.per_sample_grad_gram, "check") not in (True, False)  # the first call only


def test_sampling_defaults_sgld_nbeta_and_burnin():
    """'sampler= ... "sgld" (the default)', 'nbeta defaults to m / ln m', 'default nbeta 15.4 at batch 64',
    '0 [burn-in] with a given step'."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    x = torch.randn(128, 3)
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
    loader = torch.utils.data.DataLoader(data, batch_size=64)
    s = pp.sample(
        mlp,
        loader,
        loss_fn=lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]),
        num_chains=1,
        num_draws=2,
        step_size=1e-4,
        localization=1.0,
        quiet=True,
        warn_nonstationary=False,
    )
    assert s.config["sampler"] == "sgld"
    assert s.config["nbeta"] == pytest.approx(64 / math.log(64))
    assert round(s.config["nbeta"], 1) == 15.4
    assert s.config["num_burnin_steps"] == 0


def test_cli_commands_and_options_the_readme_names_exist():
    from pypattern.cli import _parser

    parser = _parser()
    sub = next(a for a in parser._actions if a.dest == "cmd").choices
    for cmd in ("demo", "llc", "patch", "chi", "circuit", "backends"):
        assert cmd in sub, cmd
        assert f"`pypattern {cmd}" in README.read_text(), cmd
    opts = {c: {o for a in p._actions for o in a.option_strings} for c, p in sub.items()}
    for cmd in ("demo", "llc", "patch", "circuit"):  # "take --quick"
        assert "--quick" in opts[cmd], cmd
    assert "--full" in opts["demo"]
    demos = next(a for a in sub["demo"]._actions if a.dest not in ("help", "out", "full", "quick")).choices
    assert {"patterning", "flags", "equivalence", "interpretive", "cka"} <= set(demos)
    for cmd in ("llc", "patch", "chi", "circuit"):
        assert {"--model", "--data", "--checkpoint", "--out"} <= opts[cmd], cmd
    for cmd in ("patch", "circuit"):
        assert "--corrupted" in opts[cmd]
    for cmd in ("llc", "chi", "patch"):
        assert "--quiet" in opts[cmd]
    assert "--op" in opts["backends"]

    # "--num-burnin-steps (default: the default number of draws, 100 for llc and 50 for chi)"
    from pypattern.cli import _resolve

    for cmd, draws in (("llc", 100), ("chi", 50)):
        args = sub[cmd].parse_args(["--model", "m", "--data", "d.npy"])
        _resolve(sub[cmd], args)
        assert (args.num_draws, args.num_burnin_steps) == (draws, draws), cmd


def test_make_targets_documents_and_paths_the_readme_names_exist():
    text = README.read_text()
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][\w-]*):", makefile, re.M))
    named = set(re.findall(r"`make ([a-z][\w-]*)", text))
    assert {
        "demo",
        "test",
        "setup",
        "build",
        "lint",
        "bench",
        "bench-peers",
        "test-peers",
        "check-cuda",
        "clean",
    } <= named
    assert named <= targets, named - targets
    assert "TEST_WORKERS" in makefile
    for link in re.findall(r"\]\((docs/[^)]+)\)", text):
        assert (ROOT / link).is_file(), link
    assert (ROOT / ".ci" / "check_cuda.sh").is_file()


def _ioi():
    task = pp.IOITask()
    net = pp.Transformer(task.model_config(seed=0, dtype=torch.float64))
    clean, _, answer, wrong = task.patching_pairs(6, seed=1, corruption="abc")
    mask = torch.ones_like(clean)
    mask[:3, -2:] = 0  # three prompts right-padded by two positions
    metric = pp.LogitDiff(answer, wrong, position=mask.sum(1) - 1)
    return net, clean, mask, metric, answer, wrong


def _masked_mean(act, mask):
    m = mask.to(act.dtype)[..., None]
    return (act * m).sum(0) / m.sum(0).clamp_min(1)  # (pos, d)


def _metric_by_hand(net, tokens, answer, wrong, last, hooks=()):
    logits = net.run_with_hooks(tokens, fwd_hooks=list(hooks))
    rows = torch.arange(tokens.shape[0])
    return logits[rows, last, answer] - logits[rows, last, wrong]


def test_mean_ablation_mask_in_exact_and_attribution_patching_against_hooks_and_autograd():
    """'MeanAblation(attention_mask=mask)': each position averages the prompts real there only;
    activation_patching and attribution_patching both read it, and neither depends on the pad token."""
    net, clean, mask, metric, answer, wrong = _ioi()
    last = mask.sum(1) - 1
    name = "blocks.1.hook_resid_pre"
    _, cache = net.run_with_cache(clean, names_filter=[name])
    mean = _masked_mean(cache[name], mask)
    abl = pp.MeanAblation(attention_mask=mask)

    exact = pp.activation_patching(
        net, "resid_pre", clean, corruption=abl, direction="noising", metric=metric, quiet=True
    )
    t = 2

    def patch(act, hook):
        act = act.clone()
        act[:, t] = mean[t]
        return act

    by_hand = _metric_by_hand(net, clean, answer, wrong, last, [(name, patch)])
    assert torch.allclose(exact.mean(normalized=False)[1, t], by_hand.mean(), atol=1e-9)

    # AtP: (mean - clean activation) . d metric / d activation, per example, summed over d_model
    atp = pp.attribution_patching(
        net, clean, corruption=abl, direction="noising", metric=metric, sites=["resid_pre"]
    )
    keep = {}

    def grab(act, hook):
        act.requires_grad_(True)
        keep["a"] = act
        return act

    m = _metric_by_hand(net, clean, answer, wrong, last, [(name, grab)])
    (g,) = torch.autograd.grad(m.sum(), keep["a"])
    est = ((mean[None] - keep["a"].detach()) * g).sum(-1)  # (batch, pos)
    assert torch.allclose(atp["resid_pre"].effect[:, 1], est, atol=1e-9)

    # the pad token does not matter at the real positions
    other = clean.clone()
    other[:3, -2:] = (other[:3, -2:] + 5) % net.cfg.d_vocab
    exact2 = pp.activation_patching(
        net, "resid_pre", other, corruption=abl, direction="noising", metric=metric, quiet=True
    )
    atp2 = pp.attribution_patching(
        net, other, corruption=abl, direction="noising", metric=metric, sites=["resid_pre"]
    )
    assert torch.allclose(exact.effect[..., :-2], exact2.effect[..., :-2], atol=1e-9)
    assert torch.allclose(atp["resid_pre"].effect[..., :-2], atp2["resid_pre"].effect[..., :-2], atol=1e-9)


def test_mean_ablation_refusals_the_readme_describes():
    net, clean, mask, metric, *_ = _ioi()
    with pytest.raises(ValueError, match="noising"):
        pp.activation_patching(
            net, "resid_pre", clean, corruption=pp.MeanAblation(), metric=metric, quiet=True
        )
    with pytest.raises(ValueError, match="mean_mask"):
        circuits.edge_attribution(net, clean, clean.flip(0), metric=metric, mean_mask=mask)


def test_zero_ablation_normalised_reads_raise_and_unnormalised_mean_is_the_patched_metric():
    net, clean, mask, metric, answer, wrong = _ioi()
    res = pp.activation_patching(
        net, "resid_pre", clean, corruption=pp.ZeroAblation(), direction="noising", metric=metric, quiet=True
    )
    for read in (res.mean, res.se, res.ci):
        with pytest.raises(ValueError, match="normalized"):
            read()
    t = 1

    def zero(act, hook):
        act = act.clone()
        act[:, t] = 0
        return act

    by_hand = _metric_by_hand(net, clean, answer, wrong, mask.sum(1) - 1, [("blocks.0.hook_resid_pre", zero)])
    assert torch.allclose(res.mean(normalized=False)[0, t], by_hand.mean(), atol=1e-9)
    clean_metric = _metric_by_hand(net, clean, answer, wrong, mask.sum(1) - 1)
    assert torch.allclose(res.effect[:, 0, t], by_hand - clean_metric, atol=1e-9)  # patched minus clean


def test_invert_counted_columns_keep_weight_one_and_the_rest_solve_the_counted_system():
    """'pass counted=result.probe_counted so that only the counted tokens carry the re-weighting (the others get
    weight 1)'."""
    rng = np.random.default_rng(0)
    chi = rng.normal(size=(2, 6))
    counted = np.array([True, False, True, True, False, True])
    chi[:, ~counted] = 0.0  # padding columns of a per-token chi are zero
    target = np.array([0.05, -0.02])
    plan = pp.invert(chi, target, counted=counted)
    assert np.array_equal(plan.weights[~counted], np.ones(2))
    w = plan.weights[counted]
    assert w.mean() == pytest.approx(1.0)
    h = (w - 1) / counted.sum()  # the perturbation of the counted points
    assert chi[:, counted] @ h == pytest.approx(target)
    # minimum norm among sum-zero solutions ("pinv", the default), by hand
    c = chi[:, counted]
    p = np.eye(c.shape[1]) - 1.0 / c.shape[1]
    assert h == pytest.approx(np.linalg.pinv(c @ p) @ target)
    assert pp.SusceptibilityResult.__dataclass_fields__.get("probe_counted") or hasattr(
        pp.SusceptibilityResult, "probe_counted"
    )


def test_cache_analysis_methods_sum_to_the_stream_and_the_logits():
    cfg = pp.TransformerConfig(
        n_layers=2, d_model=16, n_heads=4, d_mlp=24, d_vocab=23, n_ctx=8, seed=0, dtype=torch.float64
    )
    m = pp.Transformer(cfg)
    tokens = torch.randint(0, 23, (3, 8), generator=torch.Generator().manual_seed(0))
    logits, cache = m.run_with_cache(tokens)
    top = logits[:, -1].argmax(-1)
    parts = cache.decompose_resid(pos_slice=-1)
    final = cache["blocks.1.hook_resid_post"][:, -1]
    assert torch.allclose(parts.sum(0), final, atol=1e-12)
    assert torch.allclose(cache.get_full_resid_decomposition(pos_slice=-1).sum(0), final, atol=1e-12)
    # logit_attrs of the whole stream: the logit less b_U and ln_final's bias times W_U
    dla = cache.logit_attrs(parts, top, pos_slice=-1).sum(0)
    rows = torch.arange(3)
    want = logits[rows, -1, top] - m.b_U[top] - (m.ln_final.b @ m.W_U)[top]
    assert torch.allclose(dla, want, atol=1e-10)
    # logit lens: the last stream, normalised with its own statistics, times W_U plus b_U is the logits
    lens = cache.accumulated_resid(apply_ln=True, pos_slice=-1) @ m.W_U
    assert lens.shape == (cfg.n_layers + 1, 3, cfg.d_vocab)
    assert torch.allclose(lens[-1] + m.b_U, logits[:, -1], atol=1e-10)
    # per-head writes from the cached hook_z and W_O
    heads = cache.stack_head_results(layer=-1)
    z = cache["blocks.0.attn.hook_z"]
    assert torch.allclose(heads[:4], torch.einsum("bphd,hdm->hbpm", z, m.W_O[0]), atol=1e-12)
    cache.model = None
    with pytest.raises(ValueError, match="model"):
        cache.decompose_resid()
