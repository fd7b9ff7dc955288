"""Many calls in one process, one after another, on the same model object, leave it and the process as they were.

A user's own model (a Hugging Face GPT-2 with tied embeddings in float32, a Llama with grouped-query attention in
float64, pypattern's ``Transformer`` in float32 and float64; two of them in an unusual state: training mode with
one attention module in eval mode, a frozen parameter, a ``.grad`` already set, gradient checkpointing on,
``use_cache=False``, ``output_hidden_states=True``) goes through the estimators (LLC, susceptibilities, BIF,
per-sample gradient Gram), inversion and re-weighting, activation and attribution patching, shortlist-and-confirm,
the circuits (edges, EAP, EAP-IG, exact edge attribution, edge patching, faithfulness, pruning, ACDC), similarity
on cached activations, the cache's analysis methods, a ``hooked_hf`` wrapper and flag training on a converted copy.
After each call:

* the model is as before: every parameter and buffer bit for bit (the same ``Parameter`` objects, so an optimizer
  and tied weights still hold them), ``requires_grad``, ``.grad`` (``None`` stays ``None``, a set one keeps its
  values), dtype and device, the train/eval mode of every sub-module, no torch hook added or removed, hook points'
  functions and context, gradient checkpointing, the configuration (``use_cache``, ``output_hidden_states``, the
  attention implementation) and every plain attribute of every module;
* the process is as before: default dtype and device, grad and inference mode, threads, torch's, NumPy's and
  Python's global generators, torch's flags (deterministic algorithms, anomaly detection, oneDNN, cuDNN, TF32,
  matmul precision, scaled-dot-product kernels), torch's global module hooks, warnings filters, logging levels,
  print options, NumPy's error handling, matplotlib's backend and rcParams, pyplot's figures, the environment;
* its numbers are those it gives in a new process that runs the calls in the opposite order.

Torch's first optimizer imports ``torch._dynamo`` (which sets ``TORCHINDUCTOR_CACHE_DIR`` and adds a warnings
filter) and a Hugging Face model's first forward with ``output_hidden_states`` installs its output-capturing hooks:
both happen before the first snapshot, as they would in any program that trains or runs the model.
"""

from __future__ import annotations

import copy
import gc
import logging
import os
import random
import subprocess
import sys
import warnings
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pypattern as pp
from pypattern.circuits import acdc, edge_attribution, edges, faithfulness, patch_edges, pruning_curve
from pypattern.gram import per_sample_grad_gram_reference
from pypattern.models.hf import HAS_TRANSFORMERS
from pypattern.models.hooks import HookPoint
from pypattern.patching import LogitDiff

matplotlib = pytest.importorskip("matplotlib")

pytestmark = [
    pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed"),
    pytest.mark.filterwarnings("ignore"),
]

V = 13  # the vocabulary of TopicTask(num_topics=2, tokens_per_topic=4), for the flags
RUN = dict(
    num_chains=1, num_draws=3, step_size=1e-3, nbeta=10.0, quiet=True, seed=0, warn_nonstationary=False
)
MODELS = ["gpt2-float32-unusual", "llama-float64", "ours-float32", "ours-float64-unusual"]


# ----------------------------------------------------------------------------------------------- the models


def _gpt2(dtype):
    import transformers as tr

    cfg = tr.GPT2Config(vocab_size=V, n_positions=16, n_embd=16, n_layer=2, n_head=2, tie_word_embeddings=True,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        return tr.GPT2LMHeadModel(cfg).to(dtype).eval()


def _llama(dtype):
    import transformers as tr

    cfg = tr.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                         bos_token_id=0, eos_token_id=0)  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        m = tr.LlamaForCausalLM(cfg).to(dtype).eval()
        with torch.no_grad():  # norms start at one: make them matter
            for p in m.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return m


def _ours(dtype):
    cfg = pp.TransformerConfig(n_layers=2, d_model=16, n_heads=2, d_vocab=V, n_ctx=8, dtype=dtype, seed=0)
    return pp.Transformer(cfg)


def _unusual(m):
    """Training mode with the first attention module in eval mode, the last parameter frozen, the second with a
    ``.grad``; on a Hugging Face model also gradient checkpointing, ``use_cache=False`` and
    ``output_hidden_states=True``. Dropout modules stay in eval mode (their draws are the model's own)."""
    m.train()
    next(mod for name, mod in m.named_modules() if name.endswith(("0.attn", "0.self_attn"))).eval()
    for mod in m.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.eval()
    params = list(m.parameters())
    params[-1].requires_grad_(False)
    params[1].grad = torch.full_like(params[1], 0.5)
    if not isinstance(m, pp.Transformer):
        m.config.use_cache = False
        m.config.output_hidden_states = True
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return m


def _build(name):
    family, dtype, *unusual = name.split("-")
    m = {"gpt2": _gpt2, "llama": _llama, "ours": _ours}[family](getattr(torch, dtype))
    if family == "llama":
        m.config._attn_implementation = "eager"
    return _unusual(m) if unusual else m


# -------------------------------------------------------------------------------------------------- the calls


def _tokens():
    g = torch.Generator().manual_seed(1)
    return tuple(torch.randint(0, V, (n, 6), generator=g) for n in (4, 4, 3))


CLEAN, CORR, PROBE = _tokens()


def _metric():
    return LogitDiff(torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6, 7, 8]))


#: one ``KL`` object a run passes to several calls, on clean and corrupted runs in both roles, as a user reuses a
#: metric: each call binds it to its own clean run (a binding left over from another call would change the numbers)
SHARED = {}


def _is_hf(m):
    return not isinstance(m, pp.Transformer)


def _per_sample(m, x):
    out = m(x)
    logits = (out.logits if hasattr(out, "logits") else out)[:, :-1]
    return (
        F.cross_entropy(logits.reshape(-1, V), x[:, 1:].reshape(-1), reduction="none")
        .view(len(x), -1)
        .mean(1)
    )


def _arr(x):
    return (
        x.detach().double().cpu().numpy() if torch.is_tensor(x) else np.asarray(x, dtype=np.float64)
    ).ravel()


def _cat(*xs):
    return np.concatenate([_arr(x) for x in xs])


def _converted(m):
    return pp.from_hf(m) if _is_hf(m) else m


def _llc(m):
    return _arr(pp.estimate_llc(m, [CLEAN, CORR], **RUN).loss_trace)


def _susceptibilities(m):
    comps = ["blocks.1.attn.head.1", "blocks.0.mlp"]
    if _is_hf(m):
        comps = {c: pp.component_masks(m, c) for c in comps}
    return _arr(pp.susceptibilities(m, [CLEAN, CORR], PROBE, comps, **RUN).chi)


def _bif(m):
    return _arr(pp.bif(m, [CLEAN, CORR], PROBE, **RUN).bif)


def _gram(m):
    if not _is_hf(m):
        return _arr(pp.per_sample_grad_gram(m, _per_sample, CLEAN))
    linear = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear) and n != "lm_head"]
    parts = [pp.per_sample_grad_gram(pp.from_hf(m), _per_sample, CLEAN)]
    if linear:
        parts.append(pp.per_sample_grad_gram(m, _per_sample, CLEAN, modules=linear))
    if (
        not m.is_gradient_checkpointing
    ):  # vmap cannot run the hook Hugging Face's checkpointing puts on the inputs
        parts.append(per_sample_grad_gram_reference(m, _per_sample, CLEAN))
    return _cat(*parts)


def _invert_reweight(m):
    chi = np.random.default_rng(0).normal(size=(2, 6))
    plan = pp.invert(chi, target=np.array([0.1, -0.05]), method="constrained", min_weight=0.1)
    weights = torch.rand(8, generator=torch.Generator().manual_seed(0)) + 0.5
    drawn = list(
        pp.reweight(list(range(8)), weights, batch_size=4, generator=torch.Generator().manual_seed(0))
    )
    return _cat(plan.weights, *drawn)


def _activation_patching(m):
    kw = dict(metric=_metric(), quiet=True)
    return _cat(
        pp.activation_patching(m, "resid_pre", CLEAN, CORR, **kw).values,
        pp.activation_patching(m, "z", CLEAN, CORR, **kw).values,
        pp.activation_patching(m, "z", CORR, CLEAN, metric=SHARED["kl"], quiet=True).values,
    )


def _attribution_patching(m):
    r = pp.attribution_patching(m, CLEAN, CORR, metric=_metric())
    kl = pp.attribution_patching(m, CLEAN, CORR, metric=SHARED["kl"], sites=("z",))["z"].values
    return _cat(*(r[k].values for k in sorted(r)), kl)


def _shortlist_and_confirm(m):
    rows = pp.shortlist_and_confirm(m, "resid_pre", CLEAN, CORR, metric=_metric(), k=3)
    return np.array(
        [
            float(v)
            for row in rows
            for _, v in sorted(row.items())
            if isinstance(v, int | float) and v is not True
        ]
    )


def _edges(m):
    return np.array([str(e) for e in edges(m).edges])


def _edge_attribution(method):
    def call(m):
        kw = dict(steps=2) if method == "eap-ig" else {}
        return _cat(
            edge_attribution(m, CLEAN, CORR, metric=_metric(), method=method, quiet=True, **kw).values,
            edge_attribution(m, CORR, CLEAN, metric=SHARED["kl"], method=method, quiet=True, **kw).values,
        )

    return call


def _patch_edges_and_faithfulness(m):
    some = edges(m).edges[:3]
    return _cat(
        patch_edges(m, some, CLEAN, CORR, metric=_metric()),
        faithfulness(m, some, CLEAN, CORR, metric=_metric()),
    )


def _pruning_curve(m):
    scores = edge_attribution(m, CLEAN, CORR, metric=_metric(), method="eap", quiet=True)
    r = pruning_curve(m, scores, CLEAN, CORR, metric=_metric(), fractions=(0.0, 0.5, 1.0), quiet=True)
    return _cat(r.counts, *(v for _, v in sorted(r.faithfulness.items())))


def _acdc(m):
    kept = acdc(m, CLEAN, CORR, metric=_metric(), threshold=1e-3, quiet=True).edges
    return np.array([str(len(kept))] + [str(e) for e in kept])


def _similarity(m):
    names = [f"blocks.{layer}.hook_resid_post" for layer in range(2)]
    _, cache = _converted(m).run_with_cache(CLEAN, names_filter=names)
    a, b = (cache[n].flatten(0, 1) for n in names)
    mb = pp.MinibatchCKA(1, 1)
    mb.update([a], [b])
    return _cat(
        pp.linear_cka(a, b),
        pp.procrustes(a, b),
        pp.permutation_test(a, b, "procrustes", num_permutations=5).p_value,
        pp.cka_matrix([a, b], [a, b]),
        mb.compute(),
    )


def _cache_analysis(m):
    logits, cache = _converted(m).run_with_cache(CLEAN)
    heads = cache.stack_head_results(layer=-1, pos_slice=-1)
    return _cat(
        logits,
        heads,
        cache.logit_attrs(heads, logits[:, -1].argmax(-1), pos_slice=-1),
        cache.accumulated_resid(apply_ln=True, pos_slice=-1),
        cache.decompose_resid(pos_slice=-1),
    )


def _hooked(m):
    if not _is_hf(m):
        logits, cache = m.run_with_cache(CLEAN, names_filter=lambda n: "resid" in n)
        return _cat(logits, *(cache[k] for k in sorted(cache)))
    hm = pp.hooked_hf(m)
    logits, cache = hm.run_with_cache(CLEAN, names_filter=lambda n: "resid" in n)
    hm.remove_hooks()
    return _cat(logits, *(cache[k] for k in sorted(cache)))


def _flags(m):
    copy_ = pp.from_hf(m) if _is_hf(m) else copy.deepcopy(m)
    task = pp.TopicTask(num_topics=2, tokens_per_topic=4, seq_len=8)
    spec = pp.FlagSpec("blocks.1.hook_resid_pre", dims=(0, 1), num_concepts=2)
    pp.train_flags(copy_, task, spec, stage1_steps=2, stage2_steps=2, batch_size=8, log_every=0, quiet=True)
    return _cat(*copy_.parameters())


def _plots(m, tmp):
    llc = pp.estimate_llc(m, [CLEAN, CORR], **RUN)
    llc.plot(path=Path(tmp) / "llc.png")
    return _arr(llc.loss_trace)


CALLS = {
    "estimate_llc": _llc,
    "susceptibilities": _susceptibilities,
    "bif": _bif,
    "per_sample_grad_gram": _gram,
    "invert_reweight": _invert_reweight,
    "activation_patching": _activation_patching,
    "attribution_patching": _attribution_patching,
    "shortlist_and_confirm": _shortlist_and_confirm,
    "edges": _edges,
    "eap": _edge_attribution("eap"),
    "eap-ig": _edge_attribution("eap-ig"),
    "exact": _edge_attribution("exact"),
    "patch_edges_faithfulness": _patch_edges_and_faithfulness,
    "pruning_curve": _pruning_curve,
    "acdc": _acdc,
    "similarity": _similarity,
    "cache_analysis": _cache_analysis,
    "hooked_hf": _hooked,
    "train_flags_on_a_copy": _flags,
}


def _run(name, order, tmp):
    """Build model ``name``, warm it up, then run the calls in ``order``: ``{call: (result or error, model
    differences, process differences)}``."""
    m = _build(name)
    torch.optim.SGD([torch.zeros(1, requires_grad=True)])  # torch's first optimizer imports torch._dynamo
    with torch.no_grad():
        m(CLEAN)  # Hugging Face's first forward installs its output-capturing hooks
    out = {}
    SHARED["kl"] = pp.KL()
    model, process = _model_state(m), _process_state()
    for call in order:
        try:
            result = _plots(m, tmp) if call == "plots" else CALLS[call](m)
        except Exception as e:  # noqa: BLE001 - reported by the test of that call
            result = f"{type(e).__name__}: {e}"
        model_now, process_now = _model_state(m), _process_state()
        out[call] = (result, _differences(model, model_now), _differences(process, process_now))
        model, process = model_now, process_now
    return out


def _order(name):
    return list(CALLS) + (["plots"] if name == "ours-float32" else [])


# ------------------------------------------------------------------------------------------------- the states


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")  # fmt: skip
_PLAIN = (bool, int, float, str, type(None), torch.dtype, torch.device)


def _model_state(m):
    s = {}
    for name, p in m.named_parameters(remove_duplicate=False):
        g = p.grad
        s[f"param {name}"] = (id(p), p.data_ptr(), p.dtype, p.device, p.requires_grad, p.detach().clone())
        s[f"grad {name}"] = None if g is None else (id(g), g.data_ptr(), g.clone())
    for name, b in m.named_buffers(remove_duplicate=False):
        s[f"buffer {name}"] = (b.dtype, b.device, b.clone())
    for name, mod in m.named_modules(remove_duplicate=False):
        s[f"training {name}"] = mod.training
        s[f"hooks {name}"] = tuple((k, tuple(getattr(mod, k, {}))) for k in _HOOK_DICTS)
        managed = {"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", *_HOOK_DICTS}
        attrs = {k: v for k, v in vars(mod).items() if k not in managed}
        s[f"attributes {name}"] = sorted(attrs)
        for k, v in attrs.items():
            if isinstance(v, _PLAIN):
                s[f"attribute {name}.{k}"] = v
            elif torch.is_tensor(v):
                s[f"attribute {name}.{k}"] = v.detach().clone()
        if isinstance(mod, HookPoint):
            s[f"hook point {name}"] = (tuple(mod._fns), repr(mod.ctx))
    cfg = getattr(m, "config", None)
    if cfg is not None:
        d = cfg.to_dict()
        for k in (
            "_attn_implementation",
            "use_cache",
            "output_hidden_states",
            "output_attentions",
            "return_dict",
        ):
            d[k] = getattr(cfg, k, None)
        s["config"] = repr(sorted(d.items()))
        s["generation config"] = repr(getattr(m, "generation_config", None))
        s["gradient checkpointing"] = getattr(m, "is_gradient_checkpointing", None)
    else:
        s["config"] = repr(m.cfg)
    return s


def _process_state():
    mod = torch.nn.modules.module
    pyplot = sys.modules.get("matplotlib.pyplot")
    return {
        "default dtype": torch.get_default_dtype(),
        "default device": str(torch.get_default_device()),
        "grad enabled": torch.is_grad_enabled(),
        "inference mode": torch.is_inference_mode_enabled(),
        "autocast": (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")),
        "threads": (torch.get_num_threads(), torch.get_num_interop_threads()),
        "torch generator": torch.get_rng_state(),
        "numpy generator": repr(np.random.get_state()),
        "python generator": random.getstate(),
        "deterministic": (
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
        ),  # fmt: skip
        "anomaly": (torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled()),
        "backends": (
            torch.backends.mkldnn.enabled,
            torch.backends.cudnn.enabled,
            torch.backends.cudnn.benchmark,
            torch.backends.cudnn.deterministic,
            torch.backends.cudnn.allow_tf32,
            torch.backends.cuda.matmul.allow_tf32,
            torch.get_float32_matmul_precision(),
            torch.backends.cuda.flash_sdp_enabled(),
            torch.backends.cuda.math_sdp_enabled(),
            torch.backends.cuda.mem_efficient_sdp_enabled(),
            torch.backends.opt_einsum.enabled,
        ),  # fmt: skip
        "global module hooks": tuple(
            len(getattr(mod, k))
            for k in dir(mod)
            if k.startswith("_global_") and k.endswith("hooks") and isinstance(getattr(mod, k), dict)
        ),
        "torch function modes": torch._C._len_torch_function_stack(),
        "warnings filters": repr(warnings.filters),
        "logging levels": {  # loggers set to a level (a module imported later adds its own, unset)
            n: lg.level
            for n, lg in [*logging.root.manager.loggerDict.items(), ("root", logging.root)]
            if isinstance(lg, logging.Logger) and lg.level != logging.NOTSET
        },
        "torch print options": repr(vars(torch._tensor_str.PRINT_OPTS)),
        "numpy print options": repr(np.get_printoptions()),
        "numpy errors": repr(np.geterr()),
        "matplotlib": (
            matplotlib.get_backend(),
            repr(sorted((k, repr(v)) for k, v in matplotlib.rcParams.items())),
        ),
        "pyplot figures": pyplot.get_fignums() if pyplot is not None else [],
        "environment": dict(os.environ),
        "working directory": os.getcwd(),
        "recursion limit": sys.getrecursionlimit(),
        "the calls' token tensors": (CLEAN.clone(), CORR.clone(), PROBE.clone()),
    }


def _same(a, b):
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _differences(before, after):
    keys = list(before) + [k for k in after if k not in before]
    diffs = []
    for k in keys:
        if k not in before or k not in after:
            diffs.append(f"{k}: {'added' if k not in before else 'gone'}")
        elif not _same(before[k], after[k]):
            x, y = before[k], after[k]
            if isinstance(x, dict) and isinstance(y, dict):
                changed = {n: (x.get(n), y.get(n)) for n in set(x) | set(y) if x.get(n) != y.get(n)}
                diffs.append(f"{k}: {changed}")
            else:
                diffs.append(f"{k}: {str(x)[:150]} -> {str(y)[:150]}")
    return diffs


# ------------------------------------------------------------------------------------------------- the runs


@pytest.fixture(scope="module")
def runs(one_thread, tmp_path_factory):
    """Every model's calls in order here, and in the opposite order in a new process."""
    tmp = tmp_path_factory.mktemp("workflow")
    forward = {name: _run(name, _order(name), tmp) for name in MODELS}
    code = (
        "import sys, torch; torch.set_num_threads(1); sys.path.insert(0, sys.argv[1]); "
        "import test_workflow_state_audit as t; t._reversed_runs(sys.argv[2])"
    )
    out = tmp / "reversed.npz"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(out) as f:
        backward = {k: f[k] for k in f.files}
    return forward, backward


def _reversed_runs(path):
    import tempfile

    results = {}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in MODELS:
            for call, (result, _, _) in _run(name, _order(name)[::-1], tmp).items():
                if not isinstance(result, str):
                    results[f"{name}/{call}"] = result
    np.savez(path, **results)


CASES = [(name, call) for name in MODELS for call in _order(name)]
IDS = [f"{name}-{call}" for name, call in CASES]


def _result(runs, name, call):
    result, model, process = runs[0][name][call]
    assert not isinstance(result, str), f"{call} on {name} failed: {result}"
    return result, model, process


@pytest.mark.parametrize("name, call", CASES, ids=IDS)
def test_a_call_leaves_the_model_as_it_was(runs, name, call):
    _, model, _ = _result(runs, name, call)
    assert not model, f"{call} changed {name}: {model[:8]}"


@pytest.mark.parametrize("name, call", CASES, ids=IDS)
def test_a_call_leaves_the_process_state_as_it_was(runs, name, call):
    _, _, process = _result(runs, name, call)
    assert not process, f"{call} on {name} changed the process state: {process[:8]}"


@pytest.mark.parametrize("name, call", CASES, ids=IDS)
def test_a_calls_numbers_do_not_depend_on_the_calls_before_it(runs, name, call):
    result, _, _ = _result(runs, name, call)
    other = runs[1].get(f"{name}/{call}")
    assert other is not None, (
        f"{call} on {name} failed in the process that ran the calls in the opposite order"
    )
    assert result.dtype == other.dtype and result.shape == other.shape
    if result.dtype.kind == "f":
        np.testing.assert_array_equal(result, other)  # bit for bit (NaNs in the same places)
        assert np.isfinite(result).any()
    else:
        assert result.tolist() == other.tolist()


def test_the_sequence_reads_the_model_it_was_given(runs):
    """The checks are not vacuous: every call ran and returned numbers, and a change to the model is seen."""
    for name in MODELS:
        for call in _order(name):
            result, _, _ = _result(runs, name, call)
            assert result.size > 0, (name, call)
    m = _build("gpt2-float32-unusual")
    before = _model_state(m)
    handle = m.transformer.h[0].register_forward_hook(lambda *a: None)
    m.transformer.h[1].mlp.train(False)
    with torch.no_grad():
        m.lm_head.weight[0, 0] += 1  # tied: the embedding's row too
    diffs = _differences(before, _model_state(m))
    handle.remove()
    assert any(d.startswith("hooks transformer.h.0:") for d in diffs)
    assert any(d.startswith("training transformer.h.1.mlp:") for d in diffs)
    assert any(d.startswith("param transformer.wte.weight:") for d in diffs)
    assert any(d.startswith("param lm_head.weight:") for d in diffs)


# --------------------------------------------------------------------------------------- hooked_hf wrappers


def test_a_hooked_hf_wrapper_after_remove_hooks_leaves_the_model_as_it_was():
    m = _build("llama-float64")
    with torch.no_grad():
        m(CLEAN)
    before = _model_state(m)
    hm = pp.hooked_hf(m)
    assert _differences(
        before, _model_state(m)
    )  # the wrapper's hooks sit on the model's modules, as documented
    _, cache = hm.run_with_cache(CLEAN)
    hm.remove_hooks()
    assert not _differences(before, _model_state(m))
    # the cache read the model's own residual stream: resid_pre of layer 1 is Hugging Face's hidden_states[1]
    with torch.no_grad():
        want = m(CLEAN, output_hidden_states=True).hidden_states[1]
    assert torch.equal(cache["blocks.1.hook_resid_pre"], want)


def test_a_dropped_hooked_hf_wrapper_leaves_no_hooks_on_the_model():
    m = _build("gpt2-float32")
    before = _model_state(m)
    for _ in range(3):
        hm = pp.hooked_hf(m)
        hm.run_with_cache(CLEAN)
    alive = weakref.ref(hm)
    del hm
    gc.collect()
    assert alive() is None, "the dropped wrapper is still alive"
    assert not _differences(before, _model_state(m))
