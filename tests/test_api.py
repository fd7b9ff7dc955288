"""The top-level API: every exported name resolves, the groups of ``__all__`` stay sorted, old names still work."""

import ast
import inspect
import types

import pypattern


def _groups() -> list[list[str]]:
    """The lists assigned (``__all__ = [...]``) and appended (``__all__ += [...]``) in pypattern/__init__.py."""
    tree = ast.parse(inspect.getsource(pypattern))
    groups = []
    for node in tree.body:
        target = getattr(node, "target", None) or (node.targets[0] if isinstance(node, ast.Assign) else None)
        if isinstance(target, ast.Name) and target.id == "__all__":
            groups.append([ast.literal_eval(e) for e in node.value.elts])
    return groups


def test_every_name_in_all_resolves():
    for name in pypattern.__all__:
        assert getattr(pypattern, name, None) is not None, name


def test_all_is_the_concatenation_of_sorted_groups():
    groups = _groups()
    assert len(groups) >= 8
    assert [n for g in groups for n in g] == pypattern.__all__
    for g in groups:
        assert g == sorted(g), g
    assert len(set(pypattern.__all__)) == len(pypattern.__all__)


def test_submodules_listed_are_modules_and_no_bare_train():
    assert "train" not in pypattern.__all__
    assert callable(pypattern.tasks.train)
    for name in ("equivalence", "flags", "models", "ops", "patching", "sampling", "tasks", "truth"):
        assert isinstance(getattr(pypattern, name), types.ModuleType)


def test_names_users_call_still_work():
    for name in (
        "estimate_llc",
        "estimate_learning_coeff",
        "estimate_learning_coeff_with_summary",
        "susceptibilities",
        "bif",
        "invert",
        "reweight",
        "activation_patching",
        "attribution_patching",
        "cka_matrix",
        "linear_cka",
        "procrustes",
        "sample",
        "SGLD",
        "sgld_step_",
        "Transformer",
        "per_sample_grad_gram",
        "transformer_lens_sites",
        "GramSite",
        "center_gram",
    ):
        assert name in pypattern.__all__ and callable(getattr(pypattern, name)), name
