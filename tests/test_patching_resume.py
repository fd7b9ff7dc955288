"""Patching grids go block by block with a progress bar; with a checkpoint they write the cells done so far and
a call of the same run computes only the rest (another run is refused)."""

import numpy as np
import pytest
import torch

from pypattern.io import FingerprintMismatch, FormatError
from pypattern.models import HookedModule, Transformer, TransformerConfig
from pypattern.patching import GaussianNoise, LogitDiff, MeanAblation, TokenReplacement, activation_patching
from pypattern.patching import api as patching_api
from pypattern.patching.engine import ExactEngine

pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(seed=5):
    cfg = dict(
        n_layers=2, d_model=16, n_heads=2, d_mlp=32, d_vocab=12, n_ctx=8, dtype=torch.float64, seed=seed
    )
    model = Transformer(TransformerConfig(**cfg))
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, 12, (3, 6), generator=g)
    corr = clean.clone()
    corr[:, 1] = (clean[:, 1] + 3) % 12
    corr[:, 4] = (clean[:, 4] + 5) % 12
    return model, clean, corr, LogitDiff(torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]))


class _Stop(Exception):
    pass


def _first_corrupted(clean, corr) -> int:
    """The first position where a corrupted prompt differs from its clean one."""
    return int((clean != corr).any(0).nonzero().min())


def _same_resid_pre(model, clean, corr) -> torch.Tensor:
    """``(n_layers, pos)`` bool: where the clean and the corrupted runs' ``resid_pre`` agree exactly in every
    prompt (a patch there writes the target's own activation)."""
    _, a = model.run_with_cache(clean)
    _, b = model.run_with_cache(corr)
    n = model.cfg.n_layers
    return torch.stack(
        [
            (a[f"blocks.{i}.hook_resid_pre"] == b[f"blocks.{i}.hook_resid_pre"]).all(-1).all(0)
            for i in range(n)
        ]
    )


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of one position each (the exact engine's unembedding batch at one row) and a save after every
    block."""
    monkeypatch.setattr(ExactEngine, "UNEMBED_ROWS", 1)
    monkeypatch.setattr(patching_api._Grid, "EVERY_S", 0.0)


def _interrupt_after(monkeypatch, cls, name, k):
    """Make ``cls.name`` raise on its (k+1)-th call; returns the list of calls made."""
    orig = getattr(cls, name)
    calls = []

    def wrapped(*a, **kw):
        if len(calls) >= k:
            raise _Stop
        calls.append(1)
        return orig(*a, **kw)

    monkeypatch.setattr(cls, name, wrapped)
    return calls


@pytest.mark.parametrize(
    "site, kw",
    [
        ("resid_pre", {}),
        ("z", {}),
        ("attn_out", dict(direction="noising", corruption=MeanAblation())),
        ("resid_post", dict(corruption=GaussianNoise(seed=3))),
    ],
)
def test_interrupted_grid_resumes_to_the_uninterrupted_values(tmp_path, monkeypatch, small_blocks, site, kw):
    model, clean, corr, met = _setup()
    toks = () if "corruption" in kw else (corr,)
    whole = activation_patching(model, site, clean, *toks, metric=met, quiet=True, **kw)
    path = tmp_path / "grid.npz"
    with monkeypatch.context() as m:
        _interrupt_after(m, ExactEngine, "run", 2)
        with pytest.raises(_Stop):
            activation_patching(model, site, clean, *toks, metric=met, checkpoint=path, quiet=True, **kw)
    stored = np.load(path)
    assert 0 < stored["done"].sum() < stored["done"].size  # two blocks of the grid were written
    with monkeypatch.context() as m:
        calls = _interrupt_after(m, ExactEngine, "run", 10**6)
        resumed = activation_patching(
            model, site, clean, *toks, metric=met, checkpoint=path, quiet=True, **kw
        )
    n_blocks = len({c for c in range(clean.shape[1])})  # one block per position
    # the blocks of the positions before the first corrupted token patch the target's own activations in every
    # example: not computed (their values are the target run's metric); the noise and the mean ablation change
    # every position
    n_inert = _first_corrupted(clean, corr) if not kw else 0
    per_position = whole.values[0].numel() // clean.shape[1]  # cells of one position
    assert whole.info["inert_skipped"] == n_inert * per_position
    assert len(calls) == n_blocks - n_inert - 2  # only the rest was computed, the inert blocks not at all
    torch.testing.assert_close(resumed.values, whole.values, rtol=0, atol=0)
    # a finished run's file gives the result without patching again
    with monkeypatch.context() as m:
        _interrupt_after(m, ExactEngine, "run", 0)
        again = activation_patching(model, site, clean, *toks, metric=met, checkpoint=path, quiet=True, **kw)
    torch.testing.assert_close(again.values, whole.values, rtol=0, atol=0)


def test_naive_grid_resumes(tmp_path, monkeypatch, small_blocks):
    """The one-forward-per-cell loop (a model with its own hook points) checkpoints cell by cell."""
    model, clean, corr, met = _setup()
    hm = HookedModule(model, {f"blocks.{i}.hook_resid_pre": f"blocks.{i}.hook_resid_pre" for i in range(2)})
    whole = activation_patching(model, "resid_pre", clean, corr, metric=met, method="naive", quiet=True)
    path = tmp_path / "naive.npz"
    with monkeypatch.context() as m:
        _interrupt_after(m, patching_api, "_naive", 5)
        with pytest.raises(_Stop):
            activation_patching(model, "resid_pre", clean, corr, metric=met, method="naive", checkpoint=path,
                                quiet=True)  # fmt: skip
    # the five cells computed, and the cells whose patch writes the corrupted run's own activation in every prompt
    # (not run at all: the target run's metric)
    same = int(_same_resid_pre(model, clean, corr).sum())
    assert same > 0 and whole.info["inert_skipped"] == same
    assert int(np.load(path)["done"].sum()) == 5 + same
    with monkeypatch.context() as m:
        calls = _interrupt_after(m, patching_api, "_naive", 10**6)
        resumed = activation_patching(
            model, "resid_pre", clean, corr, metric=met, method="naive", checkpoint=path, quiet=True
        )
    assert len(calls) == whole.values[0].numel() - 5 - same  # only the rest was run
    assert resumed.info["inert_skipped"] == 0  # the checkpoint held them
    torch.testing.assert_close(resumed.values, whole.values, rtol=0, atol=0)
    del hm


def test_another_run_is_refused_and_a_damaged_file_named(tmp_path):
    model, clean, corr, met = _setup()
    path = tmp_path / "grid.npz"
    activation_patching(model, "resid_pre", clean, corr, metric=met, checkpoint=path, quiet=True)
    other_model = _setup(seed=6)[0]
    cases = [
        (dict(model=other_model), "weights"),
        (dict(site="attn_out"), "site"),
        (dict(metric=LogitDiff(torch.tensor([1, 2, 3]), torch.tensor([4, 5, 7]))), "metric"),
        (dict(corrupted_tokens=(corr + 1) % 12), "corrupted"),
        (dict(layers=[1]), "grid"),
        (dict(direction="noising"), "direction"),
        (dict(method="naive"), "method"),
        (
            dict(model=Transformer(TransformerConfig(**{**model.cfg.__dict__, "act_fn": "relu"}))),
            "architecture",
        ),
    ]
    base = dict(model=model, site="resid_pre", clean_tokens=clean, corrupted_tokens=corr, metric=met)
    for change, item in cases:
        with pytest.raises(FingerprintMismatch, match=item):
            activation_patching(**{**base, **change}, checkpoint=path, quiet=True)
    # the batch settings may differ: the same run
    again = activation_patching(**base, max_batch=1, max_memory=None, checkpoint=path, quiet=True)
    torch.testing.assert_close(again.values, activation_patching(**base, quiet=True).values, rtol=0, atol=0)
    # so may the ids' integer type and the form the corrupted prompts are given in
    same = [
        dict(clean_tokens=clean.int(), corrupted_tokens=corr.int()),
        dict(corrupted_tokens=None, corruption=TokenReplacement(corr)),
        dict(corrupted_tokens=None, corruption=TokenReplacement(corr.int())),
    ]
    for change in same:
        again = activation_patching(**{**base, **change}, checkpoint=path, quiet=True)
        torch.testing.assert_close(
            again.values, activation_patching(**base, quiet=True).values, rtol=0, atol=0
        )
    data = dict(np.load(path))
    data["done"] = data["done"].astype(np.int64)
    np.savez(path, **data)
    with pytest.raises(FormatError, match="damaged"):
        activation_patching(**base, checkpoint=path, quiet=True)


def test_checkpoint_and_quiet_arguments_are_checked(tmp_path):
    model, clean, corr, met = _setup()
    with pytest.raises(TypeError, match="checkpoint must be a file path"):
        activation_patching(model, "resid_pre", clean, corr, metric=met, checkpoint=3)
    with pytest.raises(TypeError, match="quiet='no'"):
        activation_patching(model, "resid_pre", clean, corr, metric=met, quiet="no")


def test_a_large_position_group_is_cut_at_the_engines_batches(tmp_path, monkeypatch, small_blocks):
    """Whole-sequence cells (one position group) of a bounded batch go in blocks of whole engine batches, so an
    interrupted grid keeps its finished blocks (it was one block, written only at the end)."""
    model, clean, corr, met = _setup()
    kw = dict(per_position=False, max_batch=1, quiet=True)
    whole = activation_patching(model, "z", clean, corr, metric=met, **kw)
    assert whole.values[0].numel() == 4  # 2 layers x 2 heads
    path = tmp_path / "z.npz"
    with monkeypatch.context() as m:
        _interrupt_after(m, ExactEngine, "run", 3)
        with pytest.raises(_Stop):
            activation_patching(model, "z", clean, corr, metric=met, checkpoint=path, **kw)
    assert int(np.load(path)["done"].sum()) == 3
    with monkeypatch.context() as m:
        calls = _interrupt_after(m, ExactEngine, "run", 10**6)
        resumed = activation_patching(model, "z", clean, corr, metric=met, checkpoint=path, **kw)
    assert len(calls) == 1
    torch.testing.assert_close(resumed.values, whole.values, rtol=0, atol=0)


def _metric_class(threshold: float):
    """A user's metric class whose code holds a constant (the same class name and attributes either way)."""
    ns: dict = {}
    src = (
        "class Acc(LogitDiff):\n"
        "    def __call__(self, logits):\n"
        f"        return (super().__call__(logits) > {threshold!r}).to(logits.dtype)\n"
        "    def of_rows(self, model, x):\n"
        "        return None\n"
    )
    exec(compile(src, "user_metrics.py", "exec"), {"LogitDiff": LogitDiff}, ns)
    return ns["Acc"]


def test_a_metric_class_whose_code_changed_is_another_run(tmp_path):
    """The code of a user's metric class is part of the run (its values on the clean and corrupted runs can stay
    the same while a patched cell's change): a resume with the edited class is refused."""
    model, clean, corr, _ = _setup()
    ans, wrong = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    path = tmp_path / "acc.npz"
    activation_patching(model, "resid_pre", clean, corr, metric=_metric_class(-1e9)(ans, wrong), checkpoint=path,
                        quiet=True)  # fmt: skip
    again = activation_patching(
        model, "resid_pre", clean, corr, metric=_metric_class(-1e9)(ans, wrong), checkpoint=path, quiet=True
    )
    assert bool((again.values == 1).all())
    with pytest.raises(FingerprintMismatch, match="metric"):
        activation_patching(model, "resid_pre", clean, corr, metric=_metric_class(-2e9)(ans, wrong),
                            checkpoint=path, quiet=True)  # fmt: skip


def test_an_edited_checkpoint_is_refused_and_a_path_that_cannot_be_a_file_named_first(tmp_path, monkeypatch):
    model, clean, corr, met = _setup()
    path = tmp_path / "grid.npz"
    activation_patching(model, "resid_pre", clean, corr, metric=met, checkpoint=path, quiet=True)
    for edit in ("value", "flag"):
        data = dict(np.load(path))
        if edit == "value":
            data["values"][0, 0] = np.nan
        else:
            data["done"][0] = False
        np.savez(tmp_path / "edited.npz", **data)
        with pytest.raises(FormatError, match="damaged: its values or done flags are not those written"):
            activation_patching(
                model, "resid_pre", clean, corr, metric=met, checkpoint=tmp_path / "edited.npz", quiet=True
            )
    (tmp_path / "afile").write_text("x")
    with monkeypatch.context() as m:
        _interrupt_after(m, ExactEngine, "run", 0)  # refused before any patched run
        with pytest.raises(ValueError, match="checkpoint=''"):
            activation_patching(model, "resid_pre", clean, corr, metric=met, checkpoint="", quiet=True)
        with pytest.raises(ValueError, match="which is a file, not a folder"):
            activation_patching(
                model,
                "resid_pre",
                clean,
                corr,
                metric=met,
                checkpoint=tmp_path / "afile" / "g.npz",
                quiet=True,
            )


def test_a_grid_stopped_between_saves_keeps_its_finished_blocks(tmp_path, monkeypatch):
    """A grid stopped (Ctrl-C, an error) before its next timed save writes the blocks it finished on the way out,
    and a call of the same run computes only the rest."""
    monkeypatch.setattr(
        ExactEngine, "UNEMBED_ROWS", 1
    )  # a block per position; saves every 30 s as by default
    model, clean, corr, met = _setup()
    whole = activation_patching(model, "resid_pre", clean, corr, metric=met, quiet=True)
    path = tmp_path / "grid.npz"
    with monkeypatch.context() as m:
        _interrupt_after(m, ExactEngine, "run", 3)
        with pytest.raises(_Stop):
            activation_patching(model, "resid_pre", clean, corr, metric=met, checkpoint=path, quiet=True)
    # three positions of two layers computed, and the positions before the first corrupted token (two layers each,
    # not computed: the target's own activations in every prompt)
    assert int(np.load(path)["done"].sum()) == (3 + _first_corrupted(clean, corr)) * 2
    resumed = activation_patching(model, "resid_pre", clean, corr, metric=met, checkpoint=path, quiet=True)
    torch.testing.assert_close(resumed.values, whole.values, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["exact", "naive"])
def test_an_accuracy_metric_is_kept_in_float_and_resumes_from_a_checkpoint(
    tmp_path, monkeypatch, small_blocks, method
):
    """A bool metric (an accuracy) gives float64 values on a float64 model, equal to the same metric computed as
    0.0/1.0; its grid, interrupted, resumes to the uninterrupted values, computing only the rest."""
    model, clean, corr, _ = _setup()
    answer = model(clean)[:, -1].argmax(-1)

    def accuracy(lg):
        return lg.argmax(-1) == answer

    def as_float(lg):
        return (lg.argmax(-1) == answer).double()

    whole = activation_patching(model, "resid_pre", clean, corr, metric=accuracy, method=method, quiet=True)
    ref = activation_patching(model, "resid_pre", clean, corr, metric=as_float, method=method, quiet=True)
    assert whole.values.dtype == whole.clean.dtype == whole.corrupted.dtype == torch.float64
    assert torch.equal(whole.values, ref.values) and torch.equal(whole.clean, ref.clean)
    assert torch.equal(whole.clean, torch.ones(3, dtype=torch.float64))
    assert 0 < int((whole.values == 0).sum()) < whole.values.numel()  # some patches change the accuracy
    torch.testing.assert_close(whole.effect, ref.values - ref.corrupted.view(-1, 1, 1), rtol=0, atol=0)
    torch.testing.assert_close(whole.mean(), ref.mean(), rtol=0, atol=0)
    torch.testing.assert_close(whole.se(), ref.se(), rtol=0, atol=0)
    path = tmp_path / "grid.npz"
    if method == "exact":
        cls, name = ExactEngine, "run"
    else:
        cls, name = patching_api, "_naive"
    with monkeypatch.context() as m:
        _interrupt_after(m, cls, name, 2)
        with pytest.raises(_Stop):
            activation_patching(
                model, "resid_pre", clean, corr, metric=accuracy, method=method, checkpoint=path, quiet=True
            )
    done = int(np.load(path)["done"].sum())
    assert 0 < done < whole.values[0].numel()
    with monkeypatch.context() as m:
        calls = _interrupt_after(m, cls, name, 10**6)
        resumed = activation_patching(
            model, "resid_pre", clean, corr, metric=accuracy, method=method, checkpoint=path, quiet=True
        )
    assert torch.equal(resumed.values, whole.values)
    if method == "naive":  # one call per cell
        assert len(calls) == whole.values[0].numel() - done


def test_an_integer_metric_on_a_float32_model_is_kept_in_float32():
    """As patch_edges keeps it: an integer metric (a rank) in the float dtype of the model's metrics."""
    model, clean, corr, met = _setup()
    model = model.float()
    answer = torch.tensor([1, 2, 3])

    def rank(lg):
        return (lg > lg.gather(-1, answer.view(-1, 1).expand(*lg.shape[:-1], 1))).sum(-1)

    r = activation_patching(model, "attn_out", clean, corr, metric=rank, quiet=True)
    n = activation_patching(model, "attn_out", clean, corr, metric=rank, method="naive", quiet=True)
    assert r.values.dtype == r.clean.dtype == n.values.dtype == torch.float32
    assert torch.equal(r.values, n.values)
    assert torch.equal(r.effect, r.values - r.corrupted.view(-1, 1, 1))
