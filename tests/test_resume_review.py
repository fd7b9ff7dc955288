"""Resume and devinterp-surface cases: explicit defaults in a susceptibility folder, devinterp 1.x keyword
hyperparameters, BatchNorm buffers left as the caller had them, the 1.x LLCEstimator resumed from a checkpoint,
a non-callable criterion."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import pypattern as pp


class _Stop(Exception):
    pass


def _data(n=40):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, generator=g)
    return x, (x[:, 0] > 0).long()


def _mlp(batchnorm=False):
    torch.manual_seed(0)
    mid = [nn.BatchNorm1d(4)] if batchnorm else []
    return nn.Sequential(nn.Linear(3, 4), *mid, nn.Tanh(), nn.Linear(4, 2))


def test_susceptibility_folder_takes_defaults_given_explicitly(tmp_path):
    model = _mlp()
    x, y = _data(32)
    loader = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 32, 8)]
    probe = (x[:5], y[:5])
    comps = {"first": ["0.weight", "0.bias"], "second": ["2.weight"]}
    kw = dict(num_chains=2, num_draws=10, step_size=1e-3, nbeta=10.0, quiet=True)
    done = pp.susceptibilities(model, loader, probe, comps, checkpoint=str(tmp_path), **kw)
    for extra in (dict(seed=0), dict(num_burnin_steps=0), dict(localization=0.0), dict(num_steps_bw_draws=1)):
        again = pp.susceptibilities(model, loader, probe, comps, checkpoint=str(tmp_path), **kw, **extra)
        np.testing.assert_array_equal(np.asarray(again.chi), np.asarray(done.chi))
    with pytest.raises(pp.io.FingerprintMismatch, match="seed"):
        pp.susceptibilities(model, loader, probe, comps, checkpoint=str(tmp_path), seed=1, **kw)
    # no burn-in (the resolved default at a given step) is left out of the fingerprint, as files written when 0
    # was sample's default left it out; a burn-in is held
    import json

    from pypattern.susceptibility import _is_sample_default, _sample_defaults

    row = np.load(tmp_path / "component.first.npz")
    meta = json.loads(bytes(row["__meta_json__"]).decode())
    assert _is_sample_default("num_burnin_steps", 0) and not _is_sample_default("num_burnin_steps", 5)
    assert _sample_defaults()["num_burnin_steps"] == 0
    assert "fingerprint" in meta and "num_burnin_steps" not in json.dumps(meta["fingerprint"])
    with pytest.raises(pp.io.FingerprintMismatch, match=r"num_burnin_steps = 0 \(the default\) there, 5 now"):
        pp.susceptibilities(model, loader, probe, comps, checkpoint=str(tmp_path), num_burnin_steps=5, **kw)


def test_devinterp_v1_keyword_hyperparameters_are_used():
    model = _mlp()
    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    ce = nn.functional.cross_entropy
    kw = dict(criterion=ce, num_chains=2, num_draws=20, verbose=False)
    for key, value in (("lr", 1e-3), ("nbeta", 50.0), ("localization", 5.0)):
        top = pp.estimate_learning_coeff(model, loader, **kw, **{key: value})
        inside = pp.estimate_learning_coeff(model, loader, **kw, optimizer_kwargs={key: value})
        assert top == inside, key
    assert pp.estimate_learning_coeff(model, loader, **kw, lr=1e-3) != pp.estimate_learning_coeff(
        model, loader, **kw
    )
    with pytest.raises(ValueError, match="given twice"):
        pp.estimate_learning_coeff(model, loader, **kw, lr=1e-3, optimizer_kwargs={"lr": 1e-2})
    with pytest.raises(TypeError, match="criterion='cross_entropy' is not callable"):
        pp.estimate_learning_coeff(model, loader, criterion="cross_entropy", num_chains=2, num_draws=5)


def test_batchnorm_buffers_are_kept_and_an_interrupted_run_resumes_in_process(tmp_path):
    model = _mlp(batchnorm=True).train()
    x, y = _data()
    loader = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 40, 8)]
    kw = dict(num_chains=2, num_draws=8, step_size=1e-3, nbeta=10.0, localization=10.0, quiet=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = pp.estimate_llc(model, loader, **kw)
    for k, v in model.state_dict().items():
        assert torch.equal(before[k], v), k

    def stop(draw):
        if draw == 3:
            raise _Stop

    path = str(tmp_path / "run.npz")
    with pytest.raises(_Stop):
        pp.estimate_llc(model, loader, checkpoint=path, callbacks=[stop], **kw)
    for k, v in model.state_dict().items():
        assert torch.equal(before[k], v), k
    resumed = pp.estimate_llc(model, loader, checkpoint=path, **kw)
    np.testing.assert_array_equal(resumed.loss_trace, ref.loss_trace)


def test_devinterp_v1_llc_estimator_resumes_from_a_checkpoint(tmp_path):
    from pypattern.devinterp.slt.llc import LLCEstimator
    from pypattern.devinterp.slt.sampler import sample

    model = _mlp()
    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    kw = dict(
        evaluate=lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]),
        optimizer_kwargs=dict(lr=1e-3, nbeta=10.0, localization=10.0),
        num_chains=2,
        num_draws=10,
        verbose=False,
        init_loss=0.5,
    )

    def killer(chain, draw):
        if draw == 5:
            raise _Stop

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = sample(model, loader, callbacks=[LLCEstimator(2, 10, init_loss=0.5, nbeta=10.0)], **kw)
        path = str(tmp_path / "run.npz")
        with pytest.raises(_Stop):
            sample(
                model,
                loader,
                callbacks=[LLCEstimator(2, 10, init_loss=0.5, nbeta=10.0), killer],
                checkpoint=path,
                **kw,
            )
        res = sample(
            model, loader, callbacks=[LLCEstimator(2, 10, init_loss=0.5, nbeta=10.0)], checkpoint=path, **kw
        )
    assert res["llc/mean"] == ref["llc/mean"]
    np.testing.assert_array_equal(res["loss/trace"], ref["loss/trace"])


_KW = dict(
    num_chains=2, num_draws=10, num_burnin_steps=3, num_steps_bw_draws=2, step_size=1e-3, nbeta=10.0, seed=1
)


def _regression(n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return x, torch.randn(n, 1, generator=g)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def _stop_after(k):
    seen = []

    def cb(chain, draw):
        seen.append(draw)
        if len(seen) == k:
            raise _Stop

    return cb


def _interrupted(model, loader, path, batched=False, **kw):
    with pytest.raises(_Stop):
        pp.sample(
            model, loader, checkpoint=path, callbacks=[_stop_after(7)], batched=batched, quiet=True, **kw
        )


def _user_module(name: str, source: str):
    """A module of the user's (not library code) made from ``source``."""
    import types

    mod = types.ModuleType(name)
    exec(source, mod.__dict__)
    return mod


@pytest.mark.parametrize(
    "make",
    [
        lambda n: torch.utils.data.SubsetRandomSampler(list(range(0, n // 2))),
        lambda n: torch.utils.data.WeightedRandomSampler(torch.linspace(1, 2, n), n),
        lambda n: torch.utils.data.RandomSampler(range(n), replacement=True),
        lambda n: torch.utils.data.RandomSampler(range(n), num_samples=n // 2),
    ],
)
def test_resume_takes_the_same_sampler_only(tmp_path, make):
    """A DataLoader over a TensorDataset with a sampler other than in order or one shuffle resumes with that
    sampler bit for bit, and refuses another of the same class (other indices, weights, replacement, number of
    samples): the data's fingerprint held only the sampler's class name, and a resume read a mix of two data
    streams."""
    x, y = _regression()
    model = _net()

    def loader(sampler):
        return torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(x, y), batch_size=16, sampler=sampler
        )

    path = str(tmp_path / "c.npz")
    _interrupted(model, loader(make(len(x))), path, **_KW)
    resumed = pp.sample(model, loader(make(len(x))), checkpoint=path, batched=False, quiet=True, **_KW)
    whole = pp.sample(model, loader(make(len(x))), batched=False, quiet=True, **_KW)
    np.testing.assert_array_equal(resumed.loss_trace, whole.loss_trace)

    other = {
        torch.utils.data.SubsetRandomSampler: lambda s: torch.utils.data.SubsetRandomSampler(
            list(range(len(x) // 2, len(x)))
        ),
        torch.utils.data.WeightedRandomSampler: lambda s: torch.utils.data.WeightedRandomSampler(
            torch.linspace(2, 1, len(x)), len(x)
        ),
        torch.utils.data.RandomSampler: lambda s: torch.utils.data.RandomSampler(
            range(len(x)), replacement=not s.replacement, num_samples=s.num_samples
        ),
    }
    first = make(len(x))
    path2 = str(tmp_path / "d.npz")
    _interrupted(model, loader(first), path2, **_KW)
    with pytest.raises(pp.io.FingerprintMismatch, match="data"):
        pp.sample(
            model, loader(other[type(first)](first)), checkpoint=path2, batched=False, quiet=True, **_KW
        )


def _rewrite(path, change):
    arrays, meta = pp.io.load(path)
    change(arrays, meta)
    pp.io.save(
        path,
        arrays,
        {k: v for k, v in meta.items() if k not in ("format", "version", "kind")},
        kind=meta["kind"],
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a, m: a["loss_trace"].__setitem__((0, 0), np.nan), "losses .* not all finite"),
        (lambda a, m: a.__setitem__("loss_trace", a["loss_trace"].astype(np.float16)), "dtype float16"),
        (
            lambda a, m: a.update(
                {k.replace("params/0/", "params/1/"): v for k, v in a.items() if "params/0/" in k}
            ),
            "chain 1, which has 0 of 10",
        ),
        (
            lambda a, m: a.update({k: v.astype(np.float16) for k, v in a.items() if k.startswith("params/")}),
            "dtype float16",
        ),
        (lambda a, m: m["checkpoint"].__setitem__("seconds", "abc"), "'seconds'"),
        (lambda a, m: m["checkpoint"].__setitem__("seconds", -5.0), "'seconds'"),
    ],
)
def test_checkpoint_values_are_checked_on_resume(tmp_path, change, message):
    """A checkpoint whose recorded losses are not finite, whose arrays are of another dtype than the run writes,
    which holds weights of a chain that has no draw, or whose time is not a time, is refused as damaged (they
    resumed: a NaN LLC, a chain started from other weights, losses rounded to float16)."""
    x, y = _regression()
    model = _net()
    path = str(tmp_path / "c.npz")
    # one chain at a time: chain 0 stops between draws (its weights saved), chain 1 has none
    _interrupted(model, [(x, y)], path, **_KW)
    _rewrite(path, change)
    with pytest.raises(pp.io.FormatError, match=message):
        pp.sample(model, [(x, y)], checkpoint=path, batched=False, quiet=True, **_KW)


def test_loss_reading_a_changed_global_is_another_run(tmp_path):
    """A loss function that reads a module global computes another loss when the global changes: its
    fingerprint holds the values (and functions) it reads, so a resume with the global changed is refused."""
    mod = _user_module(
        "user_losses",
        "import torch\nSCALE = 1.0\ndef loss(model, batch):\n    x, y = batch\n"
        "    return SCALE * torch.nn.functional.mse_loss(model(x), y)\n",
    )
    x, y = _regression()
    model = _net()
    path = str(tmp_path / "c.npz")
    _interrupted(model, [(x, y)], path, batched=None, loss_fn=mod.loss, **_KW)
    mod.SCALE = 3.0
    with pytest.raises(pp.io.FingerprintMismatch, match="SCALE"):
        pp.sample(model, [(x, y)], loss_fn=mod.loss, checkpoint=path, quiet=True, **_KW)
    mod.SCALE = 1.0
    resumed = pp.sample(model, [(x, y)], loss_fn=mod.loss, checkpoint=path, quiet=True, **_KW)
    whole = pp.sample(model, [(x, y)], loss_fn=mod.loss, quiet=True, **_KW)
    np.testing.assert_array_equal(resumed.loss_trace, whole.loss_trace)


def test_susceptibility_row_with_non_finite_values_is_refused(tmp_path):
    model = _mlp()
    x, y = _data(32)
    loader = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 32, 8)]
    probe = (x[:5], y[:5])
    comps = {"first": ["0.weight", "0.bias"]}
    kw = dict(num_chains=2, num_draws=10, step_size=1e-3, nbeta=10.0, quiet=True)
    pp.susceptibilities(model, loader, probe, comps, checkpoint=str(tmp_path), **kw)
    rows = [p for p in tmp_path.iterdir() if "first" in p.name]
    assert len(rows) == 1
    _rewrite(str(rows[0]), lambda a, m: a["chi"].__setitem__(0, np.nan))
    with pytest.raises(pp.io.FormatError, match="'chi' holds values that are not finite"):
        pp.susceptibilities(model, loader, probe, comps, checkpoint=str(tmp_path), **kw)


def test_result_files_with_ill_typed_fields_are_refused_at_load(tmp_path):
    """A result file whose header holds a string or a list where the result has a number, or whose traces do not
    have the shapes of one another, is refused by load naming the field (it loaded, and failed later in printing
    or indexing with an unrelated message)."""
    x, y = _regression()
    r = pp.estimate_llc(_net(), [(x, y)], quiet=True, **_KW)
    path = str(tmp_path / "llc.npz")
    for change, message in (
        (lambda a, m: m["fields"].__setitem__("llc_mean", "abc"), "'llc_mean' holds str"),
        (lambda a, m: m["fields"].__setitem__("nbeta", [1, 2]), "'nbeta' holds list"),
        (lambda a, m: a.__setitem__("loss_trace", np.zeros(3)), "loss_trace \\(3,\\)"),
    ):
        r.save(path)
        _rewrite(path, change)
        with pytest.raises(pp.io.FormatError, match=message):
            pp.LLCResult.load(path)
    r.save(path)
    back = pp.LLCResult.load(path)
    assert back.llc_mean == r.llc_mean and np.array_equal(back.loss_trace, r.loss_trace)


def test_loss_keeping_state_in_globals_resumes_in_the_same_process(tmp_path):
    """Globals a loss assigns (a call counter) or that are lists and dicts (a history it appends to) are state, not
    settings: re-running an interrupted call in the same process (a notebook cell) resumes it."""
    mod = _user_module(
        "user_losses_state",
        "import torch\nhistory = []\nstats = {}\nn_calls = 0\n"
        "def loss(model, batch):\n    global n_calls\n    n_calls += 1\n    x, y = batch\n"
        "    out = torch.nn.functional.mse_loss(model(x), y)\n    history.append(float(out))\n"
        "    stats['last'] = float(out)\n    return out\n",
    )
    x, y = _regression()
    model = _net()
    path = str(tmp_path / "c.npz")
    _interrupted(model, [(x, y)], path, batched=None, loss_fn=mod.loss, **_KW)
    assert mod.history and mod.n_calls
    resumed = pp.sample(model, [(x, y)], loss_fn=mod.loss, checkpoint=path, quiet=True, **_KW)
    whole = pp.sample(model, [(x, y)], loss_fn=mod.loss, quiet=True, **_KW)
    np.testing.assert_array_equal(resumed.loss_trace, whole.loss_trace)


def test_sampler_without_a_length_is_fingerprinted_by_its_first_batch(tmp_path):
    """A DataLoader over a TensorDataset whose sampler never ends: the checkpointed run starts (its fingerprint
    reads the first batch's indices, as for other loaders without a length) instead of reading the sampler
    forever."""
    x, y = _regression()

    class Endless(torch.utils.data.Sampler):
        def __iter__(self):
            i = 0
            while True:
                yield i % len(x)
                i += 1

    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=16, sampler=Endless()
    )
    model = _net()
    path = str(tmp_path / "c.npz")
    done = pp.sample(model, loader, checkpoint=path, quiet=True, **_KW)
    again = pp.sample(model, loader, checkpoint=path, quiet=True, **_KW)  # every chain finished: read back
    np.testing.assert_array_equal(done.loss_trace, again.loss_trace)


@pytest.mark.parametrize("batched", [False, True])
def test_batch_sampler_shuffles_are_keyed_and_resume_bit_for_bit(tmp_path, batched):
    """DataLoader(batch_sampler=BatchSampler(RandomSampler(...))): its shuffles are keyed per chain and epoch like
    shuffle=True's (the loader's own sampler attribute is then an unused SequentialSampler, and the stream drew
    from whatever torch's RNG held), so two runs agree and a resume is bit-identical."""
    x, y = _regression()

    def loader():
        bs = torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(range(len(x))), 16, drop_last=False)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_sampler=bs)

    model = _net()
    path = str(tmp_path / "c.npz")
    with pytest.raises(_Stop):
        pp.sample(
            model, loader(), checkpoint=path, callbacks=[_stop_after(7)], batched=batched, quiet=True, **_KW
        )
    torch.manual_seed(123)  # the global RNG's state does not enter the stream
    resumed = pp.sample(model, loader(), checkpoint=path, batched=batched, quiet=True, **_KW)
    whole = pp.sample(model, loader(), batched=batched, quiet=True, **_KW)
    np.testing.assert_array_equal(resumed.loss_trace, whole.loss_trace)


@pytest.mark.parametrize("batched", [False, True])
def test_unbatched_loader_with_its_own_generator_is_keyed(tmp_path, batched):
    """DataLoader(batch_size=None) over ready-made batches whose sampler shuffles with its own generator: the
    generator is keyed per chain and epoch (it was left as it was, so the stream depended on its state, and a
    resume was not bit-identical)."""
    x, y = _regression()
    batches = list(zip(x.split(16), y.split(16)))

    def loader(seed):
        g = torch.Generator().manual_seed(seed)
        sampler = torch.utils.data.RandomSampler(batches, generator=g)
        return torch.utils.data.DataLoader(batches, batch_size=None, sampler=sampler)

    model = _net()
    path = str(tmp_path / "c.npz")
    with pytest.raises(_Stop):
        pp.sample(
            model, loader(1), checkpoint=path, callbacks=[_stop_after(7)], batched=batched, quiet=True, **_KW
        )
    resumed = pp.sample(model, loader(2), checkpoint=path, batched=batched, quiet=True, **_KW)
    whole = pp.sample(model, loader(3), batched=batched, quiet=True, **_KW)
    np.testing.assert_array_equal(resumed.loss_trace, whole.loss_trace)
    assert not np.array_equal(whole.loss_trace[0], whole.loss_trace[1])  # each chain its own order


def test_hashed_fingerprint_items_say_what_they_cover(tmp_path):
    """A resume refused on the model's architecture hash says what the hash covers, also when the difference is a
    configuration field other than a size; an item one fingerprint lacks gets no such explanation."""
    from pypattern.io import FingerprintMismatch, check_fingerprint

    with pytest.raises(
        FingerprintMismatch, match=r"architecture = 'a' there, 'b' now \(a hash of the model's"
    ):
        check_fingerprint({"architecture": "a"}, {"architecture": "b"}, tmp_path / "c.npz")
    with pytest.raises(FingerprintMismatch, match=r"data = 'a' there, 'b' now \(a hash of the data"):
        check_fingerprint({"data": "a"}, {"data": "b"}, tmp_path / "c.npz")
    with pytest.raises(FingerprintMismatch) as e:
        check_fingerprint({}, {"architecture": "b"}, tmp_path / "c.npz")
    assert "a hash of" not in str(e.value)


def test_resume_refuses_a_model_whose_hooks_changed(tmp_path):
    """A forward hook changes what the model computes without touching its weights, repr or buffers: resuming
    after one was added (or removed, or replaced by another) is refused, naming the hooks; the same hook
    registered again, whatever it has recorded since, resumes."""
    x, y = _regression()
    model = _net()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    kw = dict(num_chains=2, num_draws=12, step_size=1e-3, nbeta=20.0, localization=5.0, seed=1)
    path = str(tmp_path / "run.npz")
    seen = []
    one_by_one = dict(batched=False)  # as _interrupted runs the chains

    def record(mod, inp, out):  # a hook that keeps what it saw (its closure changes with every forward)
        seen.append(out.detach())

    whole = None
    h = model[0].register_forward_hook(record)
    try:
        # uninterrupted, with a checkpoint of its own (a run without one may differ in the last bit)
        whole = pp.sample(
            model, loader, checkpoint=str(tmp_path / "whole.npz"), quiet=True, **one_by_one, **kw
        )
        _interrupted(model, loader, path, **kw)
    finally:
        h.remove()
    with pytest.raises(pp.io.FingerprintMismatch, match="hooks"):  # the hook is gone
        pp.sample(model, loader, checkpoint=path, quiet=True, **kw)
    h = model[0].register_forward_hook(lambda mod, inp, out: 3 * out)
    try:
        with pytest.raises(pp.io.FingerprintMismatch, match="hooks"):  # another hook in its place
            pp.sample(model, loader, checkpoint=path, quiet=True, **kw)
    finally:
        h.remove()
    h = model[0].register_forward_hook(record)
    try:
        resumed = pp.sample(model, loader, checkpoint=path, quiet=True, **one_by_one, **kw)
    finally:
        h.remove()
    np.testing.assert_array_equal(resumed.loss_trace, whole.loss_trace)
