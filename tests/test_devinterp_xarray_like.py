"""xarray's Dataset / DataArray reads on pypattern's devinterp 2.x results, checked against numpy (no xarray)."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
import torch

from pypattern import devinterp as di
from pypattern.devinterp import DevinterpResult, Variable
from pypattern.models.transformer import Transformer, TransformerConfig


def _llc_like():
    rng = np.random.default_rng(0)
    trace = rng.normal(size=(3, 7)).astype(np.float32)
    trace[1, 2] = np.nan
    ids = rng.integers(0, 9, size=(4, 5))
    return DevinterpResult(
        llc_mean=np.float32(2.0),
        loss_trace=trace,
        input_ids=ids,
        init_loss=0.25,
        metadata={"config": {"n_beta": 5.0}},
        _dims={"loss_trace": ("chain", "step"), "input_ids": ("batch", "position")},
        _attrs={"note": 1},
    )


def _sus_like():
    rng = np.random.default_rng(1)
    return DevinterpResult(
        sus=rng.normal(size=(6, 2)),
        _coords={"wr": np.array(["attn", "mlp"], dtype=object), "dataset_id": np.repeat([0, 1], 3)},
        _dims={"sus": ("sus_flat", "wr"), "wr": ("wr",), "dataset_id": ("sus_flat",)},
        _attrs={"dataset_id_to_name": ["a", "b"]},
    )


def test_dataset_sizes_dims_data_vars_coords_attrs():
    r, s = _llc_like(), _sus_like()
    want = {"chain": 3, "step": 7, "batch": 4, "position": 5}
    assert dict(r.sizes) == dict(r.dims) == want
    assert list(r.data_vars) == [
        "llc_mean",
        "loss_trace",
        "input_ids",
        "init_loss",
    ]  # metadata is not a variable
    assert dict(r.coords) == {} and r.attrs == {"note": 1}
    assert dict(s.sizes) == {"sus_flat": 6, "wr": 2} and list(s.data_vars) == ["sus"]
    assert list(s.coords) == ["wr", "dataset_id"] and s.coords["dataset_id"].dims == ("sus_flat",)
    assert list(s) == ["sus"]  # coordinates are not entries
    np.testing.assert_array_equal(s["dataset_id"].values, np.repeat([0, 1], 3))
    with pytest.raises(TypeError):
        r.sizes["chain"] = 2  # read-only, as xarray's Frozen mapping


def test_variable_sizes_name_coords_and_numpy_reads():
    r, s = _llc_like(), _sus_like()
    lt = r["loss_trace"]
    assert isinstance(lt, Variable) and lt.name == "loss_trace" and dict(lt.sizes) == {"chain": 3, "step": 7}
    assert lt.shape == (3, 7) and lt.ndim == 2 and type(lt.values) is np.ndarray
    assert (
        type(lt.to_numpy()) is np.ndarray
        and type(lt * 2) is np.ndarray
        and type(lt + np.ones(7)) is np.ndarray
    )
    assert float(r["llc_mean"]) == r.llc_mean.item() == 2.0 and r["init_loss"].dims == ()
    assert sorted(s["sus"].coords) == ["dataset_id", "wr"] and r["input_ids"].coords == {}


@pytest.mark.parametrize("method", ["mean", "std", "var", "sum", "prod", "min", "max", "median"])
def test_variable_reductions_skip_nan_as_xarray(method):
    r = _llc_like()
    lt, a = r["loss_trace"], r["loss_trace"].values
    nan_fn = getattr(np, "nan" + method)
    for dim, axis in [("step", 1), ("chain", 0), (["chain", "step"], (0, 1)), (None, None)]:
        out = getattr(lt, method)(dim)
        want = nan_fn(a, axis=axis)
        np.testing.assert_allclose(out.values, want, rtol=1e-6)
        kept = (
            ()
            if dim is None
            else tuple(d for d in lt.dims if d not in ([dim] if isinstance(dim, str) else dim))
        )
        assert out.dims == kept and out.name == "loss_trace" and out.values.dtype == np.asarray(want).dtype
    plain = getattr(lt, method)("step", skipna=False).values
    np.testing.assert_array_equal(np.isnan(plain), [False, True, False])
    ids = r["input_ids"]  # integers: no NaN skipping, mean and std as floats
    np.testing.assert_allclose(getattr(ids, method)("batch").values, getattr(np, method)(ids.values, axis=0))


def test_std_ddof_axis_and_numpy_calls():
    lt = _llc_like()["loss_trace"].isel(chain=[0, 2])
    a = lt.values
    np.testing.assert_allclose(lt.std("chain").values, a.std(0))  # ddof=0, as xarray
    np.testing.assert_allclose(lt.std("chain", ddof=1).values, a.std(0, ddof=1))
    assert lt.mean(axis=1).dims == ("chain",)
    assert float(np.mean(lt)) == pytest.approx(float(a.mean())) and float(np.std(lt)) == pytest.approx(
        float(a.std())
    )
    assert float(np.sum(lt)) == pytest.approx(float(a.sum())) and float(np.average(lt)) == pytest.approx(
        a.mean()
    )
    with pytest.raises(ValueError, match="mean: 'foo' not found"):
        lt.mean("foo")


def test_variable_isel_and_sel():
    r, s = _llc_like(), _sus_like()
    lt, a = r["loss_trace"], r["loss_trace"].values
    out = lt.isel(chain=[2, 0], step=slice(1, None, 2))
    np.testing.assert_array_equal(out.values, a[[2, 0]][:, 1::2])
    assert out.dims == ("chain", "step")
    assert lt.isel(chain=-1).dims == ("step",) and lt.isel({"step": 3}).dims == ("chain",)
    np.testing.assert_array_equal(lt.isel(step=[True, False] * 3 + [True]).values, a[:, ::2])
    # a dimension without a coordinate: sel reads positions
    np.testing.assert_array_equal(lt.sel(chain=1).values, a[1])
    np.testing.assert_array_equal(lt.sel(chain=slice(0, 2)).values, a[:2])
    # an index coordinate: labels, slices include both ends; the others follow their dimension
    sus = s["sus"]
    np.testing.assert_array_equal(sus.sel(wr="mlp").values, sus.values[:, 1])
    assert sus.sel(wr="mlp").dims == ("sus_flat",) and sus.sel(wr="mlp").coords["wr"].item() == "mlp"
    np.testing.assert_array_equal(sus.sel(wr=["mlp", "attn"]).values, sus.values[:, ::-1])
    np.testing.assert_array_equal(sus.sel(wr=slice("attn", "mlp")).values, sus.values)
    np.testing.assert_array_equal(sus.isel(sus_flat=[4, 1]).coords["dataset_id"].values, [1, 0])
    with pytest.raises(ValueError, match="isel: dimensions"):
        lt.isel(foo=0)
    with pytest.raises(IndexError):
        lt.isel(chain=3)
    with pytest.raises(KeyError, match="'zz' is not a label of coordinate 'wr'"):
        sus.sel(wr="zz")
    with pytest.raises(NotImplementedError, match="sel\\(method='nearest'\\)"):
        lt.sel(chain=1, method="nearest")
    with pytest.raises(NotImplementedError, match="dataset_id"):
        sus.sel(dataset_id=0)
    with pytest.raises(TypeError, match="isel\\(chain=...\\)"):
        lt.isel(chain=np.zeros((2, 2), dtype=int))


def test_positional_indexing_transpose_and_pickle_keep_the_names():
    lt = _llc_like()["loss_trace"]
    a = lt.values
    assert lt[0].dims == ("step",) and lt[:, 1:3].dims == ("chain", "step") and lt[1, 2].dims == ()
    np.testing.assert_array_equal(lt[:, 1:3].values, a[:, 1:3])
    assert type(lt[[0, 1]]) is np.ndarray and type(lt[..., 0]) is np.ndarray  # other keys: numpy's result
    assert lt.T.dims == ("step", "chain") and lt.transpose("step", "chain").dims == ("step", "chain")
    assert np.transpose(lt).dims == ("step", "chain") and np.moveaxis(lt, 0, 1).dims == ("step", "chain")
    np.testing.assert_array_equal(lt.T.values, a.T)
    back = pickle.loads(pickle.dumps(lt))
    assert back.dims == lt.dims and back.name == "loss_trace"
    flat = lt.reshape(-1)  # numpy reshaped it: no names, numpy's reductions
    assert flat.dims is None and np.isnan(flat.sum()) and not np.isnan(lt.sum())  # NaN not skipped
    with pytest.raises(TypeError, match="sel: this array has no dimension names"):
        flat.sel(chain=0)


def test_dataset_isel_sel_and_reductions():
    r, s = _llc_like(), _sus_like()
    a = r["loss_trace"].values
    one = r.isel(chain=1)
    assert type(one) is DevinterpResult and one.attrs == r.attrs and one["metadata"] == r["metadata"]
    np.testing.assert_array_equal(one["loss_trace"].values, a[1])
    assert one["loss_trace"].dims == ("step",) and one["input_ids"].dims == ("batch", "position")
    np.testing.assert_array_equal(r.sel(chain=[0, 2])["loss_trace"].values, a[[0, 2]])
    m = r.mean("step")
    np.testing.assert_allclose(m["loss_trace"].values, np.nanmean(a, 1))
    assert m["input_ids"].dims == ("batch", "position")  # variables without the dimension are kept
    np.testing.assert_array_equal(m["input_ids"].values, r["input_ids"].values)
    full = r.mean()
    assert dict(full.sizes) == {} and full["input_ids"].values == pytest.approx(r["input_ids"].values.mean())
    np.testing.assert_allclose(r.std("chain")["loss_trace"].values, np.nanstd(a, 0))
    assert r.sum(["chain", "step"])["loss_trace"].item() == pytest.approx(float(np.nansum(a)))
    picked = s.sel(wr="mlp")
    np.testing.assert_array_equal(picked["sus"].values, s["sus"].values[:, 1])
    assert picked.coords["wr"].dims == () and picked.coords["dataset_id"].dims == ("sus_flat",)
    reduced = s.mean("sus_flat")
    assert list(reduced.coords) == ["wr"] and reduced["sus"].dims == ("wr",)  # dataset_id went with sus_flat
    with pytest.raises(ValueError, match=r"mean: dimension\(s\) \['foo'\]"):
        r.mean("foo")
    with pytest.raises(ValueError, match="isel: dimensions"):
        r.isel(foo=0)
    back = pickle.loads(pickle.dumps(picked))
    assert dict(back.coords["wr"].sizes) == {} and list(back) == ["sus"]


def test_to_dataframe_and_to_pandas():
    r, s = _llc_like(), _sus_like()
    lt = r["loss_trace"]
    df = lt.to_dataframe()
    assert list(df.columns) == ["loss_trace"] and df.index.names == ["chain", "step"]
    assert list(df.index[:2]) == [(0, 0), (0, 1)] and len(df) == 21
    np.testing.assert_array_equal(df["loss_trace"].to_numpy(), lt.values.reshape(-1))
    assert list(lt.to_dataframe(name="x").columns) == ["x"]
    ser = lt.isel(chain=0).to_pandas()
    assert isinstance(ser, pd.Series) and ser.index.name == "step" and ser.name == "loss_trace"
    frame = lt.to_pandas()
    assert frame.index.name == "chain" and frame.columns.name == "step" and frame.shape == (3, 7)
    assert np.asarray(r["llc_mean"].to_pandas()) == 2.0
    # the whole result: every combination of all dimensions, each variable repeated along those it lacks
    small = r[["loss_trace", "llc_mean"]]
    assert list(small) == ["loss_trace", "llc_mean"]
    df = small.to_dataframe()
    assert df.index.names == ["chain", "step"] and list(df.columns) == ["loss_trace", "llc_mean"]
    assert (df["llc_mean"] == 2.0).all()
    d2 = r.isel(step=[0, 1], position=0).to_dataframe()
    assert d2.index.names == ["chain", "step", "batch"] and len(d2) == 3 * 2 * 4
    np.testing.assert_array_equal(
        d2["input_ids"].to_numpy(), np.broadcast_to(r["input_ids"].values[:, 0], (3, 2, 4)).reshape(-1)
    )
    # an index coordinate labels its level; the other coordinates are columns
    sd = s["sus"].to_dataframe()
    assert list(sd.columns) == ["dataset_id", "sus"] and list(sd.index[:2]) == [(0, "attn"), (0, "mlp")]
    assert list(s.to_dataframe().columns) == ["sus", "dataset_id"]
    assert list(s["sus"].to_pandas().columns) == ["attn", "mlp"]
    with pytest.raises(ValueError, match="scalar"):
        r["llc_mean"].to_dataframe()
    with pytest.raises(ValueError, match="2 or fewer"):
        Variable(np.zeros((2, 2, 2)), ("a", "b", "c")).to_pandas()
    with pytest.raises(ValueError, match="no name"):
        Variable(np.zeros(2), ("a",)).to_dataframe()


def test_other_xarray_methods_are_refused_naming_them():
    r, lt = _llc_like(), _llc_like()["loss_trace"]
    for obj, owner in [(r, "DevinterpResult"), (lt, "Variable")]:
        with pytest.raises(NotImplementedError, match=f"{owner}.groupby .*\\.values"):
            obj.groupby("chain")
        assert not hasattr(obj, "rolling")
    with pytest.raises(NotImplementedError, match="out=, keepdims"):
        lt.mean("step", keepdims=True)


def test_real_results_answer_the_reads():
    """On pypattern's own llc, susceptibilities and bif results: the shapes and values the reads give."""
    torch.manual_seed(0)
    cfg = TransformerConfig(d_vocab=16, d_model=16, n_layers=1, n_heads=2, d_head=8, d_mlp=32, n_ctx=8)
    model = Transformer(cfg)
    ids = torch.randint(0, 16, (48, 8), generator=torch.Generator().manual_seed(1))
    kw = dict(lr=1e-3, n_beta=5.0, num_chains=2, num_draws=3, num_burnin_steps=1, batch_size=8, init_seed=7)
    r = di.llc(model, ids, num_init_loss_batches=2, **kw)
    assert dict(r.sizes) == {"chain": 2, "step": 4}
    np.testing.assert_allclose(r["loss_trace"].mean("step").values, r["loss_trace"].values.mean(1), rtol=1e-6)
    assert r.to_dataframe().shape == (8, 6)
    s = di.sample(model, ids, {"probe": ids[:16]}, batches_per_draw=1, num_init_loss_batches=2, **kw)
    assert s.dataset.sizes["draw"] == 3 and "metadata" not in s.data_vars
    lp = s.isel(chain=0)["loss_probe"].mean(["batch_probe", "token_pos"])
    np.testing.assert_allclose(lp.values, s["loss_probe"].values[0].mean((1, 2)), rtol=1e-6)
    wr = {"full": None, "attn": {"blocks.0.attn.W_Q": None}, "mlp": {"blocks.0.mlp.W_in": None}}
    res = di.susceptibilities(
        model,
        ids,
        {"train": ids[:16], "probe": ids[16:32]},
        wr,
        sampling_task="train",
        batches_per_draw=1,
        num_init_loss_batches=2,
        **kw,
    )
    tree = res["susceptibilities"]
    assert list(tree.data_vars) == ["sus"] and list(tree.coords) == [
        "wr",
        "dataset_id",
        "batch",
        "target_position",
    ]
    np.testing.assert_array_equal(tree["sus"].sel(wr="mlp").values, tree["sus"].values[:, 1])
    assert res["wr"].dims == ("wr",) and list(res.wr.values) == ["attn", "mlp"]
    df = tree["sus"].to_dataframe()
    assert df.index.names == ["sus_flat", "wr"] and list(df.columns) == [
        "dataset_id",
        "batch",
        "target_position",
        "sus",
    ]
    with pytest.raises(NotImplementedError, match="res\\['susceptibilities'\\].mean"):
        res.mean()
    b = di.compute_bif(s, correlation_method="token", batch_index_range_1=[3, 1], batch_index_range_2=[0, 2])
    assert list(b.coords) == ["batch_1", "batch_2", "target_position", "target_position_T"]
    np.testing.assert_array_equal(b["influences"].sel(batch_1=1).values, b["influences"].values[1])
    np.testing.assert_array_equal(b.coords["target_position"].values, np.arange(1, 8))
