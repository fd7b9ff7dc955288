"""The public API as a user meets it: names that messages and docs tell the user to call exist where they say;
numpy integers are read as the ints they are; wrong arguments are refused naming the argument; documented
parameters match the signatures."""

import ast
import dataclasses
import importlib
import inspect
import pathlib
import re
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

import pypattern as pp
from pypattern import truth
from pypattern.devinterp.v1 import LLCEstimator
from pypattern.gram import per_sample_grad_gram_reference

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = pathlib.Path(pp.__file__).parent


def _resolves(path: str) -> bool:
    """``path`` (``pypattern.a.b``) is an importable module or an attribute of one."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for p in parts[i:]:
            if not hasattr(obj, p):
                return False
            obj = getattr(obj, p)
        return True
    return False


_DOTTED = re.compile(r"(?<![\w.])pypattern(?:\.[A-Za-z_]\w*)+")


def test_every_pypattern_path_in_messages_and_docs_resolves():
    """Every ``pypattern.x.y`` written in the package's strings (messages, docstrings) and the README exists."""
    texts = []
    for f in sorted(ROOT.rglob("*.py")):
        if "kernels" in f.parts:
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                texts.append((f"{f.relative_to(ROOT.parent)}:{node.lineno}", node.value))
    readme = ROOT.parent / "README.md"
    if readme.exists():
        texts.append(("README.md", readme.read_text()))
    bad = sorted({(where, m.group(0).rstrip(".")) for where, t in texts for m in _DOTTED.finditer(t)})
    bad = [(w, p) for w, p in bad if not _resolves(p)]
    assert not bad, bad


def _suggested(msg: str) -> list[str]:
    return [m for m in re.findall(r"\buse ((?:pypattern\.)?[A-Za-z_][\w.]*)", msg) if "_" in m or "." in m]


def test_gram_errors_name_the_reference_where_it_is_importable():
    """The Gram's refusals point to the reference by a path that imports (it is not at the top level)."""

    class Scaled(nn.Module):  # a trainable parameter no default site covers
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2).double()
            self.gain = nn.Parameter(torch.ones(2, dtype=torch.float64))

        def forward(self, x):
            return self.lin(x) * self.gain

    model = Scaled()
    x = torch.randn(5, 3, dtype=torch.float64)
    loss = lambda m, xb: (m(xb) ** 2).sum(-1)  # noqa: E731
    with pytest.raises(ValueError) as err:
        pp.per_sample_grad_gram(model, loss, x)
    names = _suggested(str(err.value))
    assert names and all(n.startswith("pypattern.") and _resolves(n) for n in names), names
    # and the name it gives computes what it promises: the Gram over every parameter
    g = per_sample_grad_gram_reference(model, loss, x)
    grads = []
    for i in range(5):
        gi = torch.autograd.grad(loss(model, x[i : i + 1]).sum(), list(model.parameters()))
        grads.append(torch.cat([t.reshape(-1) for t in gi]))
    flat = torch.stack(grads)
    torch.testing.assert_close(g, flat @ flat.T)


# ---------------------------------------------------------------------------------------------- TransformerConfig
SMALL = dict(n_layers=1, d_model=8, n_heads=2, d_vocab=5, n_ctx=4, d_mlp=8)


def test_config_reads_numpy_scalars_as_python_numbers():
    numpy_kw = {k: np.int64(v) for k, v in SMALL.items()}
    numpy_kw.update(seed=np.int32(3), ln_eps=np.float32(1e-5), padding_idx=np.int64(0))
    plain_kw = {**SMALL, "seed": 3, "ln_eps": float(np.float32(1e-5)), "padding_idx": 0}
    a, b = pp.Transformer(**numpy_kw), pp.Transformer(**plain_kw)
    assert a.cfg == b.cfg
    for f in dataclasses.fields(a.cfg):
        v = getattr(a.cfg, f.name)
        assert not isinstance(v, np.generic), (f.name, type(v))
    for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(ta, tb)


@pytest.mark.parametrize(
    "field, value",
    [
        ("d_model", None),
        ("n_heads", 0),
        ("n_heads", "2"),
        ("d_mlp", -3),
        ("d_mlp", 2.5),
        ("ln_eps", -1.0),
        ("ln_eps", "1e-5"),
        ("seed", "0"),
        ("seed", 1.5),
        ("init_range", -0.1),
        ("attn_scale", "8"),
        ("attn_scores_multiplier", float("inf")),
    ],
)
def test_config_refuses_bad_values_by_name(field, value):
    with pytest.raises(ValueError, match=rf"^{field}="):
        pp.TransformerConfig(**{**SMALL, field: value})


@pytest.mark.parametrize("field", ["attn_bias", "tie_word_embeddings", "gated_mlp", "positional_embedding"])
def test_config_switches_are_true_or_false(field):
    """A switch written as a string (a hand-edited config.json's "false") is refused, not read as true."""
    with pytest.raises(ValueError, match=rf"^{field}='false' is not valid; give True or False"):
        pp.TransformerConfig(**{**SMALL, field: "false"})
    cfg = pp.TransformerConfig(**{**SMALL, "attn_bias": np.bool_(False)})
    assert cfg.attn_bias is False and not any("b_Q" in n for n, _ in pp.Transformer(cfg).named_parameters())


def test_transformer_refuses_keywords_beside_a_whole_config_and_other_cfg_types():
    cfg = pp.TransformerConfig(**SMALL)
    with pytest.raises(TypeError, match="n_layers"):
        pp.Transformer(cfg, n_layers=3)
    with pytest.raises(TypeError, match="cfg is a str"):
        pp.Transformer("gpt2")
    # the dict form merges keywords, as documented
    assert pp.Transformer({**SMALL, "n_layers": 2}, n_layers=1).cfg == cfg


# ------------------------------------------------------------------------------------------------ Gram arguments
def _lin_case():
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(hidden=nn.Linear(3, 4), act=nn.Tanh(), out=nn.Linear(4, 2))).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    return model, (lambda m, xb: (m(xb) ** 2).sum(-1)), x


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(model=None), "model is a NoneType"),
        (dict(loss_fn="mse"), "loss_fn is a str, not callable"),
        (dict(centered="yes"), "centered="),
        (dict(per_module=1), "per_module="),
        (dict(check=0), "check="),
        (dict(modules=3), "modules=3"),
        (dict(modules=[0]), "modules contains 0"),
        (dict(sites="0"), "sites contains '0'"),
        (dict(sites=5), "sites=5"),
    ],
)
def test_gram_refuses_wrong_arguments_by_name(kw, match):
    model, loss, x = _lin_case()
    args = dict(model=model, loss_fn=loss)
    args.update({k: v for k, v in kw.items() if k in args})
    rest = {k: v for k, v in kw.items() if k not in args}
    with pytest.raises((TypeError, ValueError), match=match):
        pp.per_sample_grad_gram(args["model"], args["loss_fn"], x, **rest)
    if "model" in kw:
        with pytest.raises(TypeError, match="model is a NoneType"):
            pp.transformer_lens_sites(None)


def test_gram_reads_one_module_name_as_a_list_of_it():
    model, loss, x = _lin_case()
    one = pp.per_sample_grad_gram(model, loss, x, modules="out")
    # independent: the exact Gram of the per-sample gradients of module "out"'s parameters
    ps = list(model.out.parameters())
    flat = torch.stack(
        [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss(model, x[i : i + 1]).sum(), ps)])
            for i in range(6)
        ]
    )
    torch.testing.assert_close(one, flat @ flat.T)


# --------------------------------------------------------------------------------------- models, losses, ops, truth
def test_model_arguments_that_are_not_models_are_named():
    toks = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(TypeError, match="model is a NoneType"):
        pp.component_masks(None, "blocks.0.attn")
    for fn in (pp.losses.batch_loss, pp.losses.sample_losses, pp.losses.token_losses):
        with pytest.raises(TypeError, match="model is a list, not callable"):
            fn([], toks)


def test_cross_covariance_reads_numpy_counts_and_names_a_bad_device():
    rng = np.random.default_rng(0)
    a, b = torch.from_numpy(rng.normal(size=(50, 3))), torch.from_numpy(rng.normal(size=(50, 2)))
    acc = pp.CrossCovariance(np.int64(3), np.int32(2), buffer_draws=np.int64(8)).update(a, b)
    assert type(acc.k) is int and type(acc.buffer_draws) is int
    want = torch.from_numpy(np.cov(a.numpy().T, b.numpy().T)[:3, 3:])
    torch.testing.assert_close(acc.cov(), want)
    with pytest.raises(ValueError, match="device=-3"):
        pp.CrossCovariance(3, 2, device=-3)


def test_truth_formulas_read_numpy_ints_and_name_their_arguments():
    assert truth.rrr_learning_coefficient(np.int64(5), np.int64(3), np.int64(5), np.int64(1)) == (
        truth.rrr_learning_coefficient(5, 3, 5, 1)
    )
    assert truth.dln_learning_coefficient(np.array([5, 3, 5])) == truth.dln_learning_coefficient((5, 3, 5))
    # reduced-rank regression at rank 0, H small: H (M + N) / 2 minus the overlap (Aoyagi-Watanabe) = 6.5 at (5, 3, 5)
    assert truth.dln_learning_coefficient(np.array([5, 3, 5])) == 6.5
    assert truth.regular_learning_coefficient(np.int64(7)) == 3.5
    assert truth.normal_crossing_learning_coefficient(np.array([1, 2])) == 0.25
    assert truth.DeepLinearNetwork(np.array([2, 3, 2])).widths == (2, 3, 2)
    with pytest.raises(ValueError, match="input_dim"):
        truth.rrr_learning_coefficient("5", 3, 5)
    with pytest.raises(ValueError, match="widths must be a sequence of ints, got 4"):
        truth.DeepLinearNetwork(4)
    with pytest.raises(ValueError, match="sizes"):
        truth.make_teacher_task(sizes=5)
    with pytest.raises(ValueError, match="teacher_sizes"):
        truth.make_teacher_task(sizes=(4, 8, 3), teacher_sizes=(5, 8, 3))
    student, data = truth.make_teacher_task(sizes=(4, 8, 3), n=np.int64(10), seed=np.int64(1))
    student2, data2 = truth.make_teacher_task(sizes=(4, 8, 3), n=10, seed=1)
    assert torch.equal(data.tensors[0], data2.tensors[0]) and torch.equal(data.tensors[1], data2.tensors[1])


def test_devinterp_callbacks_and_temperature_are_checked():
    model = pp.Transformer(**SMALL).double()
    toks = torch.randint(0, 5, (4, 4), generator=torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match="callbacks=3"):
        pp.estimate_learning_coeff(
            model, [toks], callbacks=3, num_chains=1, num_draws=1, verbose=False,
            optimizer_kwargs=dict(lr=1e-4, nbeta=10.0, localization=100.0),
        )  # fmt: skip
    with pytest.raises(ValueError, match="nbeta=1.0 and temperature=2.0"):
        LLCEstimator(2, 2, 0.0, "cpu", nbeta=1.0, temperature=2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert LLCEstimator(2, 2, 0.0, "cpu", temperature=2.0).nbeta == 2.0


# -------------------------------------------------------------------------------------------- docstrings vs signatures
def _documented(doc: str) -> set[str] | None:
    lines = inspect.cleandoc(doc).splitlines()
    for i, ln in enumerate(lines[:-1]):
        if ln.strip() == "Parameters" and set(lines[i + 1].strip()) == {"-"}:
            names = set()
            for j in range(i + 2, len(lines)):
                ln2 = lines[j]
                if j + 1 < len(lines) and ln2.strip() and set(lines[j + 1].strip()) == {"-"}:
                    break
                if ln2.strip() and not ln2.startswith(" "):
                    names |= {n.strip().lstrip("*") for n in ln2.split(" : ")[0].split(",")}
            return names
    return None


OWN_MODULES = [
    "pypattern.gram",
    "pypattern.truth",
    "pypattern.losses",
    "pypattern.io",
    "pypattern.models",
    "pypattern.models.transformer",
    "pypattern.models.convert",
    "pypattern.models.hf",
    "pypattern.devinterp",
    "pypattern.devinterp.v1",
    "pypattern.ops",
    "pypattern.ops.grad_gram",
]


# where the objects are defined (the modules above also re-export others' names)
OWN_PACKAGES = tuple(
    f"pypattern.{p}" for p in ("gram", "truth", "losses", "io", "models", "devinterp", "ops")
)


def test_numpydoc_parameters_match_signatures():
    """Where a public function or class documents its parameters, it documents each one and no other."""
    bad = []
    for modname in OWN_MODULES:
        mod = importlib.import_module(modname)
        for name in getattr(mod, "__all__", [n for n in dir(mod) if not n.startswith("_")]):
            obj = getattr(mod, name, None)
            if not (inspect.isfunction(obj) or inspect.isclass(obj)) or not obj.__module__.startswith(
                OWN_PACKAGES
            ):
                continue
            targets = [obj] + ([v for k, v in vars(obj).items() if inspect.isfunction(v) and not k.startswith("_")]
                               if inspect.isclass(obj) else [])  # fmt: skip
            for t in targets:
                names = _documented(t.__doc__ or "")
                if names is None:
                    continue
                try:
                    sig = inspect.signature(t)
                except (TypeError, ValueError):
                    continue
                params = [p for p in sig.parameters.values() if p.name not in ("self", "cls")]
                given = {p.name for p in params if p.kind is not p.VAR_KEYWORD}
                missing = {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)} - names
                extra = set() if any(p.kind is p.VAR_KEYWORD for p in params) else names - given
                if missing or extra:
                    bad.append((t.__qualname__, sorted(missing), sorted(extra)))
    assert not bad, bad


# ------------------------------------------------------------------------------------------- devinterp's entry points
DV = dict(lr=1e-4, n_beta=10.0, num_chains=1, num_draws=2, batch_size=2, quiet=True, localization=100.0)


def _dv_case():
    model = pp.Transformer(**SMALL).double()
    return model, torch.randint(0, 5, (8, 4), generator=torch.Generator().manual_seed(0))


def test_devinterp_sample_reads_numpy_counts_as_ints():
    from pypattern import devinterp

    model, ids = _dv_case()
    counts = dict(num_chains=2, num_draws=3, batch_size=2, num_steps_bw_draws=1, init_seed=5)
    plain = devinterp.sample(model, ids, {}, **{**DV, **counts})
    numpy = devinterp.sample(model, ids, {}, **{**DV, **{k: np.int64(v) for k, v in counts.items()}})
    assert plain["sampling_loss"].shape == numpy["sampling_loss"].shape == (2, 3, 2, 3)
    np.testing.assert_array_equal(np.asarray(plain["sampling_loss"]), np.asarray(numpy["sampling_loss"]))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(observables=None), "observables is a NoneType"),
        (dict(param_masks=3), "param_masks is a int"),
        (dict(localization=None), "localization must be"),
        (dict(llc_weight_decay=-1.0), "llc_weight_decay must be"),
        (dict(bounding_box_size=float("inf")), "bounding_box_size must be"),
        (dict(sampling_method_kwargs="eps=0.1"), "sampling_method_kwargs="),
        (dict(loss_fn="ce"), "loss_fn is a str"),
        (dict(init_seed=-1), "init_seed must be"),
        (dict(obs_seed="a"), "obs_seed must be"),
        (dict(model=None), "model is a NoneType"),
    ],
)
def test_devinterp_sample_refuses_wrong_arguments_by_their_devinterp_names(kw, match):
    from pypattern import devinterp

    model, ids = _dv_case()
    args = dict(model=model, dataset=ids, observables={})
    for k in list(kw):
        if k in args:
            args[k] = kw.pop(k)
    with pytest.raises((TypeError, ValueError), match=match):
        devinterp.sample(args["model"], args["dataset"], args["observables"], **{**DV, **kw})


def test_devinterp_helpers_and_hooked_module_name_their_arguments():
    from pypattern import devinterp
    from pypattern.models import HookedModule, gpt2_hook_points

    with pytest.raises(TypeError, match="model is a NoneType"):
        devinterp.create_param_masks(None, "l0h1")
    with pytest.raises(TypeError, match="input_ids is a list"):
        devinterp.per_token_loss(pp.Transformer(**SMALL), [[1, 2]])
    with pytest.raises(TypeError, match="hook_points is a list"):
        HookedModule(nn.Linear(2, 2), [("hook_out", "")])
    with pytest.raises(ValueError, match="n_layers='2'"):
        HookedModule(nn.Linear(2, 2), {"hook_out": ""}, n_layers="2")
    assert HookedModule(nn.Linear(2, 2), {"hook_out": ""}, n_layers=np.int64(2)).n_layers == 2
    assert gpt2_hook_points(np.int64(2)) == gpt2_hook_points(2)
    with pytest.raises(TypeError, match="model is a NoneType without a cfg"):
        pp.models.list_components(None)


def test_gpt2_from_config_names_its_arguments_and_reads_numpy_ints():
    pytest.importorskip("transformers")
    from pypattern.models import gpt2_from_config

    kw = dict(n_layers=1, d_model=8, n_heads=2, d_vocab=5, n_ctx=4)
    a = gpt2_from_config(**{k: np.int64(v) for k, v in kw.items()}, seed=np.int64(1))
    b = gpt2_from_config(**kw, seed=1)
    for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(ta, tb)
    for bad, match in (
        (dict(d_vocab=0), "d_vocab=0"),
        (dict(n_heads=3), "n_heads=3"),
        (dict(act_fn="gleu"), "act_fn"),
    ):
        with pytest.raises(ValueError, match=match):
            gpt2_from_config(**{**kw, **bad})


def test_result_save_and_load_name_a_path_that_is_not_one(tmp_path):
    r = pp.LLCResult(
        llc_mean=1.0,
        llc_std=0.1,
        llc_per_chain=np.ones(2),
        llc_trace=np.ones((2, 3)),
        loss_trace=np.ones((2, 3)),
        init_loss=0.5,
        nbeta=2.0,
    )
    for bad in (None, 3):
        with pytest.raises(TypeError, match=rf"path={bad!r} is not valid"):
            r.save(bad)
        with pytest.raises(TypeError, match=rf"path={bad!r} is not valid"):
            pp.LLCResult.load(bad)
    r.save(tmp_path / "r")  # a pathlib.Path, as before
    assert pp.LLCResult.load(tmp_path / "r").llc_mean == 1.0
