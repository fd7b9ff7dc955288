"""reweight keeps the rows a DataLoader's sampler reads (or refuses the sampler by name); the devinterp 2.0.1
shim's compute_bif reads one loss key given as a str and refuses negative batch indices, and its
create_param_masks warns when 'unembed' leaves out a weight tied to the embedding; the devinterp convention's
chi is the documented formula of phi - phi(w*); the tasks' length checks name seq_len."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    RandomSampler,
    Sampler,
    SequentialSampler,
    SubsetRandomSampler,
    TensorDataset,
    WeightedRandomSampler,
)

import pypattern as pp
from pypattern import devinterp as di
from pypattern.models.transformer import Transformer, TransformerConfig
from pypattern.patterning import reweight
from pypattern.tasks.induction import InductionTask
from pypattern.tasks.topics import TopicTask

pytestmark = pytest.mark.usefixtures("one_thread")


def _rows_dataset(n=10):
    return TensorDataset(torch.arange(n).float()[:, None])


def _rows_read(loader) -> list[int]:
    return [int(x) for b in loader for x in b[0][:, 0]]


# ------------------------------------------------------------------------------------------------ reweight


def test_reweight_draws_only_among_the_rows_a_subset_random_sampler_reads():
    ds = _rows_dataset()
    train = DataLoader(ds, batch_size=5, sampler=SubsetRandomSampler(range(5)))
    out = reweight(train, torch.ones(10), generator=torch.Generator().manual_seed(0))
    assert len(out.sampler) == 5  # an epoch as long as the split's
    many = reweight(train, torch.ones(10), num_samples=2000, generator=torch.Generator().manual_seed(0))
    assert set(_rows_read(many)) == {0, 1, 2, 3, 4}
    # the weights are per data set row: only the split's rows with positive weight are drawn
    w = torch.zeros(10)
    w[3], w[4], w[7] = 1.0, 3.0, 100.0
    drawn = np.array(
        _rows_read(reweight(train, w, num_samples=4000, generator=torch.Generator().manual_seed(1)))
    )
    assert set(drawn.tolist()) == {3, 4}
    assert abs((drawn == 4).mean() - 0.75) < 0.03


def test_reweight_counts_a_row_a_subset_sampler_lists_twice_twice():
    loader = DataLoader(_rows_dataset(), batch_size=4, sampler=SubsetRandomSampler([1, 1, 2]))
    drawn = np.array(
        _rows_read(
            reweight(loader, np.ones(10), num_samples=6000, generator=torch.Generator().manual_seed(0))
        )
    )
    assert set(drawn.tolist()) == {1, 2}
    assert abs((drawn == 1).mean() - 2 / 3) < 0.03
    assert len(reweight(loader, np.ones(10)).sampler) == 3


def test_reweight_of_a_sequential_sampler_over_part_of_the_data_draws_that_part():
    loader = DataLoader(_rows_dataset(), batch_size=2, sampler=SequentialSampler(range(4)))
    assert _rows_read(loader) == [0, 1, 2, 3]
    out = reweight(loader, np.ones(10), num_samples=1000, generator=torch.Generator().manual_seed(0))
    assert set(_rows_read(out)) == {0, 1, 2, 3}


@pytest.mark.parametrize("shuffle", [False, True])
def test_reweight_of_a_loader_over_every_row_draws_every_row(shuffle):
    loader = DataLoader(_rows_dataset(), batch_size=5, shuffle=shuffle)
    out = reweight(loader, np.ones(10), num_samples=2000, generator=torch.Generator().manual_seed(0))
    assert set(_rows_read(out)) == set(range(10))
    assert len(reweight(loader, np.ones(10)).sampler) == 10
    # a subset sampler listing every row once is the whole data set
    every = DataLoader(
        _rows_dataset(), batch_size=5, sampler=SubsetRandomSampler([3, 1, 2, 0, 4, 5, 6, 7, 8, 9])
    )
    assert len(reweight(every, np.ones(10)).sampler) == 10


def test_reweight_refuses_zero_weights_on_the_rows_the_sampler_reads():
    train = DataLoader(_rows_dataset(), batch_size=5, sampler=SubsetRandomSampler(range(5)))
    w = torch.zeros(10)
    w[5:] = 1.0
    with pytest.raises(
        ValueError, match=r"all zero on the 5 rows data's sampler reads \(SubsetRandomSampler\)"
    ):
        reweight(train, w)


def test_reweight_says_weights_are_per_data_set_row_when_given_one_per_split_row():
    train = DataLoader(_rows_dataset(), batch_size=5, sampler=SubsetRandomSampler(range(5)))
    with pytest.raises(
        ValueError, match=r"weights has 5 entries but the data has 10 samples .*data\.dataset"
    ):
        reweight(train, torch.ones(5))


def test_reweight_refuses_subset_indices_outside_the_data_set():
    loader = DataLoader(_rows_dataset(), batch_size=5, sampler=SubsetRandomSampler([0, 12]))
    with pytest.raises(ValueError, match=r"SubsetRandomSampler reads rows \[12\], outside 0\.\.9"):
        reweight(loader, torch.ones(10))


class _EvenRows(Sampler):
    def __iter__(self):
        return iter(range(0, 10, 2))

    def __len__(self):
        return 5


@pytest.mark.parametrize(
    "loader_kw, name",
    [
        (dict(sampler=WeightedRandomSampler(torch.ones(10), 10)), "WeightedRandomSampler"),
        (dict(sampler=RandomSampler(range(10), replacement=True)), "RandomSampler"),
        (dict(sampler=RandomSampler(range(10), num_samples=3)), "RandomSampler"),
        (dict(sampler=_EvenRows()), "_EvenRows"),
        (dict(batch_sampler=BatchSampler(SubsetRandomSampler(range(5)), 2, False)), "BatchSampler"),
    ],
)
def test_reweight_refuses_a_sampler_it_cannot_keep_by_name(loader_kw, name):
    loader = DataLoader(_rows_dataset(), **({"batch_size": 2} if "sampler" in loader_kw else {}), **loader_kw)
    with pytest.raises(ValueError, match=rf"data is a DataLoader .*{name}.*data=loader\.dataset"):
        reweight(loader, torch.ones(10))
    # the loss weights are per data set row whatever the sampler
    torch.testing.assert_close(reweight(loader, torch.ones(10), mode="loss"), torch.ones(10))


# ------------------------------------------------------------------------------------------------ devinterp shim


def _bif_samples():
    """A devinterp 2.x sample result with two observables: 'probe' (3 sequences) and 'zz' (2)."""
    g = np.random.default_rng(0)
    return {
        "loss_probe": g.normal(size=(2, 6, 3, 4)).astype(np.float32),
        "input_ids_probe": g.integers(0, 9, size=(3, 5)),
        "loss_zz": g.normal(size=(2, 6, 2, 4)).astype(np.float32),
        "input_ids_zz": g.integers(0, 9, size=(2, 5)),
    }


def test_compute_bif_reads_one_loss_key_given_as_a_str():
    s = _bif_samples()
    one = di.compute_bif(s, loss_keys="probe")
    listed = di.compute_bif(s, loss_keys=["probe"])
    assert one["influences"].shape == (3, 3, 4, 4)
    np.testing.assert_array_equal(one["influences"], listed["influences"])
    np.testing.assert_array_equal(one["input_ids"], s["input_ids_probe"])
    assert di.compute_bif(s, loss_keys="zz")["influences"].shape == (2, 2, 4, 4)
    with pytest.raises(KeyError, match=r"\['nope'\] not found"):
        di.compute_bif(s, loss_keys="nope")
    with pytest.raises(ValueError, match="loss_keys is empty"):
        di.compute_bif(s, loss_keys=[])


@pytest.mark.parametrize("which", ["batch_index_range_1", "batch_index_range_2"])
def test_compute_bif_refuses_negative_batch_indices(which):
    s = _bif_samples()
    with pytest.raises(
        ValueError, match=rf"{which}=\[-1, 0\] must hold sequence indices in 0\.\.4 \(no negative"
    ):
        di.compute_bif(s, **{which: [-1, 0]})
    b = di.compute_bif(s, **{which: [4, 0]})
    np.testing.assert_array_equal(
        np.asarray(b.coords["batch_1" if which.endswith("1") else "batch_2"]), [4, 0]
    )


def _tied_transformer(tied=True):
    cfg = TransformerConfig(
        n_layers=1,
        d_model=16,
        n_heads=2,
        d_head=8,
        d_mlp=32,
        d_vocab=11,
        n_ctx=8,
        seed=0,
        tie_word_embeddings=tied,
    )
    return Transformer(cfg)


def _masks_and_warnings(model, restriction):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        masks = di.create_param_masks(model, restriction)
    return masks, [str(w.message) for w in rec if "create_param_masks" in str(w.message)]


def test_create_param_masks_warns_when_unembed_leaves_out_a_tied_weight():
    transformers = pytest.importorskip("transformers")
    cfg = dict(vocab_size=11, n_positions=8, n_embd=16, n_layer=1, n_head=2)
    tied = transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg))
    masks, msgs = _masks_and_warnings(tied, "unembed")
    assert masks == {}  # as devinterp: the tied weight is listed under the embedding's name only
    assert len(msgs) == 1
    assert "'unembed'" in msgs[0] and "tied to the embedding" in msgs[0]
    assert "['transformer.wte.weight']" in msgs[0] and "selects nothing" in msgs[0] and "'embed'" in msgs[0]
    # with the embedding in the list the tied weight is selected: nothing to warn about
    masks, msgs = _masks_and_warnings(tied, ["embed", "unembed"])
    assert masks == {"transformer.wte.weight": None} and msgs == []
    untied = transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg, tie_word_embeddings=False))
    masks, msgs = _masks_and_warnings(untied, "unembed")
    assert masks == {"lm_head.weight": None} and msgs == []


def test_create_param_masks_warns_for_a_tied_native_transformer_and_names_what_unembed_selects():
    masks, msgs = _masks_and_warnings(_tied_transformer(), ["unembed", "l0h1"])
    assert "unembed.b_U" in masks and "embed.W_E" not in masks
    assert len(msgs) == 1 and "['embed.W_E']" in msgs[0] and "selects ['unembed.b_U'] only" in msgs[0]
    masks, msgs = _masks_and_warnings(_tied_transformer(tied=False), "unembed")
    assert set(masks) == {"unembed.W_U", "unembed.b_U"} and msgs == []


def test_llc_refusing_empty_param_masks_points_at_a_tied_unembedding():
    ids = torch.randint(0, 11, (8, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"param_masks is empty.*'unembed'.*tied to its embedding.*'embed'"):
        di.llc(
            _tied_transformer(),
            ids,
            param_masks={},
            lr=1e-4,
            n_beta=10.0,
            num_chains=1,
            num_draws=2,
            batch_size=4,
        )


# ------------------------------------------------------------------------------------------------ susceptibilities


@pytest.mark.filterwarnings("ignore::pypattern.sampling.NonStationaryWarning")  # short chains
def test_devinterp_convention_chi_is_the_documented_formula_of_phi_minus_its_value_at_w_star():
    torch.manual_seed(0)
    n, din = 64, 3
    x = torch.randn(n, din)
    y = (x @ torch.randn(din, 1) > 0).long().squeeze(1)
    model = torch.nn.Sequential(torch.nn.Linear(din, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    probe, sb = (x[:5], y[:5]), (x[10:42], y[10:42])
    kw = dict(
        num_chains=2,
        num_draws=12,
        num_burnin_steps=3,
        step_size=1e-3,
        localization=10.0,
        quiet=True,
        nbeta=20.0,
    )
    kw["seed"] = 1
    chi = pp.susceptibilities(
        model, loader, probe, {"a": ["0.weight"]}, convention="devinterp", sampling_batch=sb, **kw
    )

    def ce(m, b):
        return torch.nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")

    def lf(m, b):
        return torch.nn.functional.cross_entropy(m(b[0]), b[1])

    full = pp.sample(model, loader, observables={"lz": lambda m, b: ce(m, probe)}, **kw)
    r = pp.sample(
        model,
        loader,
        restrict_to=[r"0\.weight"],
        observables={"phi": lambda m, b: lf(m, sb), "lz": lambda m, b: ce(m, probe)},
        **kw,
    )
    lzf = np.asarray(full.observables["lz"], np.float64).reshape(-1, 5)
    phi = np.asarray(r.observables["phi"], np.float64).reshape(-1)
    lzr = np.asarray(r.observables["lz"], np.float64).reshape(-1, 5)
    with torch.no_grad():
        phi0 = float(lf(model, sb))

    def formula(p):
        lbar = lzr.mean(1)
        return (p * lbar).mean() - (p[:, None] * lzr).mean(0) - p.mean() * (lzf.mean(1).mean() - lzf.mean(0))

    np.testing.assert_allclose(chi.chi[0], formula(phi - phi0), rtol=1e-4, atol=1e-9)
    # the shift is not free in this convention: phi itself gives another chi, by the documented term
    shift = phi0 * ((lzr.mean(1)[:, None] - lzr).mean(0) - (lzf.mean(1)[:, None] - lzf).mean(0))
    np.testing.assert_allclose(formula(phi) - shift, formula(phi - phi0), rtol=1e-9, atol=1e-12)
    assert np.abs(shift).max() > 10 * np.abs(chi.chi[0] - formula(phi - phi0)).max()


def test_susceptibility_docstrings_say_what_each_convention_does_with_phi_at_w_star():
    import pypattern.susceptibility as sus

    assert "changes no susceptibility" not in sus.__doc__
    assert "phi' = phi - phi(w*)" in sus.__doc__
    doc = " ".join(pp.susceptibilities.__doc__.split())
    assert "changes no susceptibility" not in doc
    assert (
        'with ``convention="devinterp"`` the returned ``chi`` is the formula of the module docstring applied to ``phi - phi(w*)``'
        in doc
    )


# ------------------------------------------------------------------------------------------------ tasks


@pytest.mark.parametrize("seq_len", [5, 6, 7])
def test_induction_task_default_repeat_len_works_for_every_seq_len_that_admits_one(seq_len):
    task = InductionTask(d_vocab=8, seq_len=seq_len)
    assert task.repeat_len == 2
    b = task.sample(64, seed=0)
    assert b.tokens.shape == (64, seq_len)
    k = task.repeat_len
    for row, i, j in zip(b.tokens, b.extra["source_start"], b.extra["dest_start"], strict=True):
        assert j - i >= k and j + k <= seq_len
        assert torch.equal(row[i : i + k], row[j : j + k])
    assert int(b.extra["induction_flag"].sum(1).min()) == k - 1
    assert InductionTask(seq_len=33).repeat_len == 10  # the default of longer sequences is unchanged


def test_induction_task_errors_name_seq_len():
    with pytest.raises(ValueError, match=r"seq_len=4 is too short.*seq_len >= 5"):
        InductionTask(seq_len=4)
    with pytest.raises(ValueError, match=r"repeat_len=3 is not valid for seq_len=6; give 2\.\.2"):
        InductionTask(seq_len=6, repeat_len=3)


def test_topic_task_errors_name_the_seq_len_the_default_min_prefix_needs():
    with pytest.raises(ValueError, match=r"seq_len=3 is not valid; give an int >= 4"):
        TopicTask(seq_len=3)
    with pytest.raises(
        ValueError, match=r"min_prefix=2 is too large for seq_len=4; give at most 1, or seq_len >= 5"
    ):
        TopicTask(seq_len=4)
    b = TopicTask(seq_len=4, min_prefix=1).sample(8, seed=0, switch_prob=1.0)
    assert b.tokens.shape == (8, 4)
