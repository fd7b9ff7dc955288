"""Padding is masked out of every estimator's defaults: susceptibilities' sampling loss and observable, its mean
probe loss and its padded columns, and the per-sample losses of ``per_token=False`` (susceptibilities and BIF).
The same sequences with and without extra padding give the same estimates (same seed, float64)."""

import numpy as np
import pytest
import torch

import pypattern as pp

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

V = 40
KW = dict(
    num_chains=2,
    num_draws=6,
    step_size=1e-3,
    localization=100.0,
    quiet=True,
    seed=0,
    warn_nonstationary=False,
)
COMPS = ["blocks.0.attn.head.1", "blocks.1.mlp"]


def _model():
    cfg = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=16,
        intermediate_size=20,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).double().eval()


def _padded(tokens: torch.Tensor, lengths, extra: int) -> dict:
    """Right-padded HF batch: row i keeps its first lengths[i] tokens, then ``extra`` more padding columns."""
    B, T = tokens.shape
    am = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()
    am = torch.cat([am, torch.zeros(B, extra, dtype=torch.long)], 1)
    ids = torch.cat([tokens, torch.zeros(B, extra, dtype=torch.long)], 1) * am
    return {"input_ids": ids, "attention_mask": am, "labels": torch.where(am.bool(), ids, -100)}


def _counted(batch: dict) -> np.ndarray:
    am = batch["attention_mask"].bool()
    return (am[:, 1:] & am[:, :-1]).reshape(-1).numpy()


def _loader(extra: int):
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(2):
        t = torch.randint(0, V, (4, 9), generator=gen)
        out.append(_padded(t, [9, 6, 9, 4], extra))
    return out


def _probe(extra: int) -> dict:
    t = torch.randint(0, V, (3, 8), generator=torch.Generator().manual_seed(2))
    return _padded(t, [8, 5, 3], extra)


def test_susceptibilities_ignore_padding_in_the_loader():
    """The sampling loss and the default observable are means over counted tokens: extra padding columns in the
    data change neither."""
    model = _model()
    probe = _probe(0)
    a = pp.susceptibilities(model, _loader(0), probe, COMPS, **KW)
    b = pp.susceptibilities(model, _loader(7), probe, COMPS, **KW)
    np.testing.assert_allclose(b.phi_mean, a.phi_mean, rtol=1e-10)
    np.testing.assert_allclose(b.chi, a.chi, rtol=1e-6, atol=1e-12 * np.abs(a.chi).max())
    assert np.abs(a.chi).max() > 0


def test_susceptibilities_padded_probe_columns_are_zero_and_the_rest_unchanged():
    model = _model()
    loader = _loader(0)
    p0, p1 = _probe(0), _probe(5)
    a = pp.susceptibilities(model, loader, p0, COMPS, **KW)
    b = pp.susceptibilities(model, loader, p1, COMPS, **KW)
    k0, k1 = _counted(p0), _counted(p1)
    np.testing.assert_allclose(b.chi[:, k1], a.chi[:, k0], rtol=1e-6, atol=1e-12 * np.abs(a.chi).max())
    assert (a.chi[:, ~k0] == 0).all() and (b.chi[:, ~k1] == 0).all()
    assert (b.chi_chains[:, :, ~k1] == 0).all()
    assert np.abs(a.chi[:, k0]).min() > 0


@pytest.mark.parametrize("estimator", ["susceptibilities", "bif"])
def test_per_sample_losses_average_counted_tokens_only(estimator):
    """``per_token=False``: each probe sample's loss is its mean over counted tokens (what
    :func:`pypattern.losses.sample_losses` returns), however much padding the probe carries."""
    model = _model()
    loader = _loader(0)
    p0, p1 = _probe(0), _probe(6)
    if estimator == "bif":
        a = pp.bif(model, loader, p0, per_token=False, **KW).bif
        b = pp.bif(model, loader, p1, per_token=False, **KW).bif
    else:
        a = pp.susceptibilities(model, loader, p0, COMPS, per_token=False, **KW).chi
        b = pp.susceptibilities(model, loader, p1, COMPS, per_token=False, **KW).chi
    assert a.shape[-1] == 3
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-12 * np.abs(a).max())
    # independently: the observable of each sample at w* is sample_losses' value
    from pypattern.losses import sample_losses
    from pypattern.susceptibility import _ProbeEntries, per_sample_losses

    entries = _ProbeEntries(model, p1, per_sample_losses, per_token=False)
    with torch.no_grad():
        got = entries.reduce(per_sample_losses(model, p1))
        want = sample_losses(model, p0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_probe_sample_without_counted_tokens_is_refused_per_sample():
    model = _model()
    probe = _probe(0)
    probe["attention_mask"][1, 1:] = 0  # one token: no next-token target
    probe["labels"] = torch.where(probe["attention_mask"].bool(), probe["input_ids"], -100)
    with pytest.raises(ValueError, match=r"probe samples \[1\] have no counted token"):
        pp.bif(model, _loader(0), probe, per_token=False, **KW)


@pytest.mark.parametrize("labels", [True, False], ids=["labels", "mask-only"])
def test_uncounted_probe_columns_have_no_token_and_stay_out_of_the_pca(labels):
    """Columns that do not count (padding marked by the attention mask alone, or -100 labels) report token -1 in
    both estimators and are named by ``probe_counted``; the PCA leaves them out (NaN scores there), so extra
    padding changes none of it."""
    model = _model()
    loader = _loader(0)
    p0, p1 = _probe(0), _probe(5)
    if not labels:
        p0, p1 = ({k: v for k, v in p.items() if k != "labels"} for p in (p0, p1))
    a = pp.susceptibilities(model, loader, p0, COMPS, **KW)
    b = pp.susceptibilities(model, loader, p1, COMPS, **KW)
    k0, k1 = _counted(p0), _counted(p1)
    assert (b.probe_counted == k1).all() and (a.probe_counted == k0).all()
    assert (b.probe_token[~k1] == -1).all() and (b.probe_token[k1] >= 0).all()
    np.testing.assert_array_equal(b.probe_token[k1], a.probe_token[k0])
    pa, pb = a.pca(), b.pca()
    np.testing.assert_allclose(pb.explained_variance, pa.explained_variance, rtol=1e-5)
    np.testing.assert_allclose(
        pb.scores[k1], pa.scores[k0], rtol=1e-4, atol=1e-9 * np.abs(pa.scores[k0]).max()
    )
    assert np.isnan(pb.scores[~k1]).all() and np.isfinite(pb.scores[k1]).all()
    bif = pp.bif(model, loader, p1, **KW)
    assert (bif.probe_token[~k1] == -1).all()
    np.testing.assert_array_equal(bif.probe_token, b.probe_token)
    np.testing.assert_array_equal(bif.probe_counted, k1)
    assert (bif.bif[~k1] == 0).all() and (bif.bif[:, ~k1] == 0).all()
