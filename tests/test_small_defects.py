"""Inputs users hold that gave wrong numbers silently or failed: bool weights, an ablation that reads no corrupted
prompts, right-padded batches pooled at positions counted from the end, a compiled model's component names, float64
on a device without it, and an error rebuilt from another error's fields rather than its text."""

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import pypattern as pp
from pypattern.interpretive import accumulated_residual
from pypattern.models import Transformer, TransformerConfig
from pypattern.patterning import invert, reweight

sys.path.insert(0, str(Path(__file__).parent))
from _circuits_reference import prompts, tiny  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------- bool weights


@pytest.mark.parametrize("kind", ["numpy", "torch", "list"])
def test_reweight_refuses_bool_weights_by_name(kind):
    mask = [True, False, True, True]
    w = {"numpy": np.array(mask), "torch": torch.tensor(mask), "list": mask}[kind]
    data = TensorDataset(torch.arange(4.0))
    for mode in ("loss", "sampler"):
        with pytest.raises(TypeError, match=r"weights holds bools.*\.float\(\)"):
            reweight(data, w, mode=mode)
    # the same values as numbers are weights: the mask's rows, normalised to mean 1
    got = reweight(data, np.array(mask, dtype=float), mode="loss")
    torch.testing.assert_close(got, torch.tensor([4 / 3, 0.0, 4 / 3, 4 / 3]))


def test_invert_refuses_bool_chi_and_target():
    with pytest.raises(TypeError, match="chi holds bools"):
        invert(np.ones((1, 4), dtype=bool), [0.1])
    with pytest.raises(TypeError, match="target holds bools"):
        invert(np.ones((1, 4)), np.array([True]))


# ------------------------------------------------------------------ corrupted prompts no ablation reads


def test_zero_noising_warns_that_corrupted_is_not_read_and_it_changes_nothing():
    model = tiny()
    clean, corr, ans, wrong = prompts(model)
    metric = pp.patching.LogitDiff(ans, wrong)
    names = [str(e) for e in pp.circuits.edges(model)][:4]
    kw = dict(metric=metric, mode="noise", ablation="zero")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none without corrupted prompts
        without = pp.circuits.patch_edges(model, names, clean, None, **kw)
        f_without = pp.circuits.faithfulness(model, names, clean, None, **kw)
    with pytest.warns(UserWarning, match="patch_edges: corrupted is given but not read"):
        given = pp.circuits.patch_edges(model, names, clean, corr, **kw)
    torch.testing.assert_close(given, without, rtol=0, atol=0)  # what the warning says: they change nothing
    with pytest.warns(UserWarning, match="faithfulness: corrupted is given but not read"):
        assert pp.circuits.faithfulness(model, names, clean, corr, **kw) == f_without
    with pytest.warns(UserWarning, match="edge_attribution: corrupted is given but not read"):
        pp.circuits.edge_attribution(model, clean, corr, **kw)
    with warnings.catch_warnings():  # ablations that read the corrupted prompts: no warning
        warnings.simplefilter("error")
        for mode, ablation in (("noise", "mean"), ("noise", "resample"), ("denoise", "zero")):
            pp.circuits.patch_edges(model, names, clean, corr, metric=metric, mode=mode, ablation=ablation)


# ------------------------------------------------------------- accumulated_residual on right-padded batches


def _padded(lengths, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(1, 11, (n,), generator=g) for n in lengths]
    tokens = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)], mask[i, : len(r)] = r, 1
    return rows, tokens, mask


@pytest.fixture(scope="module")
def small_model():
    cfg = TransformerConfig(
        n_layers=2, d_model=16, n_heads=2, d_vocab=11, n_ctx=10, d_mlp=32, seed=0, dtype=torch.float64
    )
    return Transformer(cfg)


@pytest.mark.parametrize("positions", [-1, slice(-3, None), [0, -1], [-2], slice(1, -1), slice(1, None)])
def test_accumulated_residual_right_padded_equals_each_input_unpadded(small_model, positions):
    rows, tokens, mask = _padded([10, 7, 4, 3], 10)
    got = accumulated_residual(small_model, tokens, attention_mask=mask, positions=positions)[0]
    want = torch.cat([accumulated_residual(small_model, r[None], positions=positions)[0] for r in rows])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_accumulated_residual_per_input_positions(small_model):
    rows, tokens, mask = _padded([10, 7, 4], 10, seed=1)
    last = mask.sum(1, keepdim=True) - 1  # each input's last real token
    rep = accumulated_residual
    got = rep(small_model, tokens, attention_mask=mask, positions=last)[0]
    torch.testing.assert_close(
        got, rep(small_model, tokens, attention_mask=mask, positions=-1)[0], rtol=0, atol=0
    )
    # independently: each input's residual stream at its own positions, read from the model's cache
    per = torch.tensor([[0, 2], [1, -1], [3, -2]])
    got = rep(small_model, tokens, attention_mask=mask, positions=per)[0]
    _, cache = small_model.run_with_cache(tokens)
    names = ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.hook_resid_post" for i in range(2)]
    for i, n in enumerate(mask.sum(1).tolist()):
        at = [p % n for p in per[i].tolist()]
        want = torch.cat([cache[h][i, at].mean(0) for h in names])
        torch.testing.assert_close(got[i], want, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"per-input positions are \(num_inputs, k\) = \(3, k >= 1\)"):
        rep(small_model, tokens, positions=torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(TypeError, match="must hold integer positions"):
        rep(small_model, tokens, positions=torch.zeros(3, 1))
    with pytest.raises(ValueError, match="input 2 has no real token"):
        rep(small_model, tokens, attention_mask=mask, positions=torch.tensor([[0], [0], [5]]))


# ------------------------------------------------------------------------------- a compiled Transformer


def test_susceptibilities_of_a_compiled_transformer_equal_the_uncompiled(small_model):
    toks = torch.randint(0, 11, (16, 6), generator=torch.Generator().manual_seed(0))
    loader = DataLoader(toks, batch_size=8)
    kw = dict(
        num_chains=2, num_draws=4, step_size=1e-3, nbeta=5.0, quiet=True, seed=1, warn_nonstationary=False
    )
    comps = ["blocks.0.attn.head.1", "blocks.1.mlp"]
    ref = pp.susceptibilities(small_model, loader, toks[:3], comps, **kw)
    got = pp.susceptibilities(torch.compile(small_model), loader, toks[:3], comps, **kw)
    assert np.abs(ref.chi).max() > 0
    np.testing.assert_array_equal(got.chi, ref.chi)
    np.testing.assert_array_equal(got.chi_se, ref.chi_se)


# ------------------------------------------------------------------------------- float64 where there is none


def test_float64_device_and_cast():
    from pypattern.ridge import as_float64, float64_device

    for given, home in (
        ("mps", "cpu"),
        ("mps:0", "cpu"),
        ("cpu", "cpu"),
        ("cuda:1", "cuda:1"),
        ("cuda", "cuda"),
    ):
        assert float64_device(given) == torch.device(home)
        assert float64_device(torch.device(given)) == torch.device(home)
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)[:, ::2]  # a float32 view, not contiguous
    y = as_float64(x)
    assert y.dtype == torch.float64 and y.device == x.device
    torch.testing.assert_close(y, x.double(), rtol=0, atol=0)
    z = torch.ones(3, dtype=torch.float64)
    assert as_float64(z) is z  # float64 where float64 is: no copy


# ------------------------------------------------------------------- an error rebuilt from its fields


@pytest.mark.parametrize("chain", [2, -1])
def test_nonfinite_loss_error_is_named_from_its_fields_not_its_text(chain):
    from pypattern.sampling import NonFiniteLossError
    from pypattern.susceptibility import _naming_rows_without_counted

    ids = torch.randint(0, 5, (3, 4), generator=torch.Generator().manual_seed(0))
    am = torch.ones(3, 4, dtype=torch.long)
    am[2] = 0
    batch = {"input_ids": ids, "attention_mask": am, "labels": ids.masked_fill(am == 0, -100)}

    def losses_at(b):
        return torch.tensor([1.0, 2.0, float("nan")])

    with pytest.raises(NonFiniteLossError) as e:
        with _naming_rows_without_counted([batch], losses_at):
            raise NonFiniteLossError(
                "text of another wording",
                chain=chain,
                draw=0,
                step=7,
                step_size=0.1,
                suggested_step_size=None,
            )
    msg = str(e.value)
    head = (
        "chain 2's loss is not finite at step 7, nor at the initial weights w* on the same batch"
        if chain >= 0
        else "loader: the loss at the initial weights w* is not finite"
    )
    assert msg.startswith(head + ": the loader's batch 0"), msg
    assert "rows [2] with no counted token" in msg and "text of another wording" not in msg, msg
    assert (e.value.chain, e.value.step, e.value.step_size) == (chain, 7, 0.1)


def test_accumulated_residual_refuses_ids_outside_the_vocabulary(small_model):
    # a negative id would read the embedding's last rows: -1 the same as id 10 (d_vocab 11)
    with pytest.raises(ValueError, match="tokens contains token id -1; valid ids are 0 .. 10"):
        accumulated_residual(small_model, torch.tensor([[1, 2, -1]]))
    with pytest.raises(ValueError, match="tokens contains token id 11"):
        accumulated_residual(small_model, torch.tensor([[1, 2, 11]]))
    with pytest.raises(TypeError, match="tokens has dtype torch.float32"):
        accumulated_residual(small_model, torch.tensor([[1.0, 2.0]]))
    # ids of another integer dtype are ids (a uint8 tensor is not read as a mask); one prompt may be 1-D
    ids = torch.tensor([[1, 2, 3]])
    want = accumulated_residual(small_model, ids)[0]
    torch.testing.assert_close(
        accumulated_residual(small_model, ids.to(torch.uint8))[0], want, rtol=0, atol=0
    )
    torch.testing.assert_close(accumulated_residual(small_model, ids[0])[0], want, rtol=0, atol=0)


def test_flag_values_are_made_in_float32_on_a_device_without_float64():
    """Flag codes and overwrite values are made in float64 before they are cast to the activations' dtype, except
    on Apple's MPS (no float64), where they are made in float32; the ridge probe's float64 solve runs on the CPU
    there. Steering with the float32 codes writes the same values as with float64 ones on a float32 model."""
    import pypattern.flags as flags

    assert flags._wide(torch.device("mps")) is torch.float32
    assert flags._wide("cpu") is torch.float64 and flags._wide(torch.device("cuda", 0)) is torch.float64
    spec = flags.FlagSpec(hook="blocks.0.hook_resid_pre", dims=(0, 1, 2, 3), num_concepts=2)
    wide = flags._concept_values(torch.tensor([0, 1]), spec, 2)
    assert wide.dtype == torch.float64
    narrow = spec.code(flags._wide(torch.device("mps")))[torch.tensor([0, 1])]
    assert torch.equal(narrow, wide.float())
