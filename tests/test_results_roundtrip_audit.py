"""Result files and plots at their edges: a file of a newer format, a field taken out of a file, values JSON cannot
hold, complex tensors with a conjugate bit, edited patching results, patching grids of no examples, no cells, no
axes or more than three axes, and axes given where a plot takes a path."""

import csv
import io as bytes_io
import json
import zipfile

import numpy as np
import pytest
import torch

from pypattern import io
from pypattern.patching.results import PatchResult
from pypattern.sampling.results import LLCResult

matplotlib = pytest.importorskip("matplotlib")
from matplotlib.figure import Figure  # noqa: E402


def _patch(batch=3, grid=(4,), axes=("pos",), **kw) -> PatchResult:
    g = torch.Generator().manual_seed(0)
    coords = {a: list(range(n)) for a, n in zip(axes, grid)}
    return PatchResult(
        values=torch.randn(batch, *grid, generator=g),
        clean=torch.randn(batch, generator=g) + 3.0,
        corrupted=torch.randn(batch, generator=g),
        axes=tuple(axes),
        coords=coords,
        **kw,
    )


def _edit_header(src, dst, edit):
    """``src`` with its JSON header replaced by ``edit(header)``, written to ``dst``."""
    with zipfile.ZipFile(src) as z:
        members = {n: z.read(n) for n in z.namelist()}
    header = json.loads(np.load(bytes_io.BytesIO(members["__meta_json__.npy"])).tobytes())
    b = bytes_io.BytesIO()
    np.save(b, np.frombuffer(json.dumps(edit(header)).encode(), dtype=np.uint8))
    members["__meta_json__.npy"] = b.getvalue()
    with zipfile.ZipFile(dst, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return dst


def _fields(edit):
    def f(header):
        edit(header["fields"])
        return header

    return f


# ------------------------------------------------------------------------------------------------ io


def test_a_file_of_a_newer_format_version_says_to_upgrade(tmp_path):
    _patch().save(tmp_path / "r.npz")
    newer = _edit_header(
        tmp_path / "r.npz", tmp_path / "newer.npz", lambda h: {**h, "version": io.VERSION + 1}
    )
    with pytest.raises(
        io.FormatError,
        match=r"newer\.npz' has format version 3; this pypattern reads versions 1, 2: .*newer pypattern, upgrade",
    ):
        PatchResult.load(newer)
    odd = _edit_header(tmp_path / "r.npz", tmp_path / "odd.npz", lambda h: {**h, "version": "2"})
    with pytest.raises(io.FormatError, match=r"odd\.npz' has format version '2'; this pypattern reads"):
        PatchResult.load(odd)


@pytest.mark.parametrize(
    ("make", "field"),
    [(_patch, "clean"), (_patch, "axes")],
    ids=["a-tensor-field", "a-json-field"],
)
def test_a_file_lacking_a_required_field_is_refused_naming_it(make, field, tmp_path):
    make().save(tmp_path / "r.npz")
    bad = _edit_header(tmp_path / "r.npz", tmp_path / "bad.npz", _fields(lambda f: f.pop(field)))
    with pytest.raises(
        io.FormatError, match=rf"bad\.npz.*lacks the fields \['{field}'\] that a PatchResult needs"
    ):
        PatchResult.load(bad)


def test_a_nested_result_lacking_a_required_field_is_refused(tmp_path):
    s = _sample_llc()
    s.save(tmp_path / "r.npz")
    bad = _edit_header(tmp_path / "r.npz", tmp_path / "bad.npz", _fields(lambda f: f.pop("nbeta")))
    with pytest.raises(
        io.FormatError, match=r"bad\.npz.*lacks the fields \['nbeta'\] that a LLCResult needs"
    ):
        LLCResult.load(bad)
    # a field with a default may be absent (files of older versions): it takes its default
    _patch(site="z").save(tmp_path / "p.npz")
    old = _edit_header(tmp_path / "p.npz", tmp_path / "old.npz", _fields(lambda f: f.pop("site")))
    assert PatchResult.load(old).site == ""


def _sample_llc() -> LLCResult:
    rng = np.random.default_rng(0)
    trace = rng.normal(size=(2, 5))
    return LLCResult(
        llc_mean=1.0,
        llc_std=0.1,
        llc_per_chain=np.array([0.9, 1.1]),
        llc_trace=10.0 * (trace - 0.5),
        loss_trace=trace,
        init_loss=0.5,
        nbeta=10.0,
    )


@pytest.mark.parametrize(
    ("value", "kind"),
    [(np.complex128(1 + 2j), "complex"), (np.bytes_(b"ab"), "bytes"), (np.datetime64("2020-01-01"), "date")],
)
def test_numpy_scalars_json_cannot_hold_are_refused_naming_the_field(value, kind, tmp_path):
    res = _patch(info={"inner": {"v": value}})
    with pytest.raises(TypeError, match=rf"info/inner/v: a {kind}\w* cannot be saved"):
        res.save(tmp_path / "r.npz")
    assert not (tmp_path / "r.npz").exists()
    # a NumPy string is saved as its text
    _patch(info={"s": np.str_("text")}).save(tmp_path / "s.npz")
    assert PatchResult.load(tmp_path / "s.npz").info == {"s": "text"}


def test_complex_tensors_with_a_conjugate_or_negative_bit_round_trip(tmp_path):
    z = torch.randn(3, dtype=torch.complex64, generator=torch.Generator().manual_seed(1))
    conj, neg = z.conj(), z.conj().imag  # a view with the conjugate bit, and one with the negative bit
    assert conj.is_conj() and neg.is_neg()
    _patch(info={"conj": conj, "neg": neg}).save(tmp_path / "r.npz")
    back = PatchResult.load(tmp_path / "r.npz").info
    want_conj = torch.complex(z.real, -z.imag)  # the conjugate written out by hand
    assert back["conj"].dtype == torch.complex64 and not back["conj"].is_conj()
    assert torch.equal(back["conj"], want_conj)
    assert torch.equal(back["neg"], -z.imag)


# ------------------------------------------------------------------------------------------------ PatchResult


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("info", "x", r"info must be a dict, got str"),
        ("info", [1, 2], r"info must be a dict, got list"),
        ("direction", "sideways", r"direction must be 'denoising' or 'noising', got 'sideways'"),
    ],
)
def test_an_edited_patch_result_of_the_wrong_setting_is_refused(field, value, match, tmp_path):
    _patch().save(tmp_path / "r.npz")
    bad = _edit_header(
        tmp_path / "r.npz", tmp_path / "bad.npz", _fields(lambda f: f.__setitem__(field, value))
    )
    with pytest.raises(io.FormatError, match=rf"bad\.npz.*{match}"):
        PatchResult.load(bad)
    for direction in ("denoising", "noising"):  # both directions load
        _patch(direction=direction).save(tmp_path / "ok.npz")
        assert PatchResult.load(tmp_path / "ok.npz").direction == direction


def test_a_patch_result_of_no_examples_tabulates_nan(tmp_path):
    res = _patch(batch=0, grid=(2, 3), axes=("layer", "pos"))
    with pytest.warns(RuntimeWarning):  # the mean gap of no examples is undefined
        rows = res.to_records()
    assert [(r["layer"], r["pos"]) for r in rows] == [(a, b) for a in range(2) for b in range(3)]
    assert all(np.isnan(r[k]) for r in rows for k in ("mean", "se", "ci_low", "ci_high"))
    assert torch.isnan(res.se(False)).all() and res.se(False).shape == (2, 3)
    lo, hi = res.ci(normalized=False)
    assert lo.shape == hi.shape == (2, 3) and torch.isnan(lo).all() and torch.isnan(hi).all()
    with pytest.warns(RuntimeWarning):
        res.to_csv(tmp_path / "t.csv")
    with open(tmp_path / "t.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 6 and all(r["mean"] == "nan" for r in table)
    res.save(tmp_path / "r.npz")
    back = PatchResult.load(tmp_path / "r.npz")
    assert back.values.shape == (0, 2, 3) and back.clean.shape == (0,)


def test_a_patch_result_of_no_cells_writes_a_table_of_its_header(tmp_path):
    res = _patch(grid=(0,), axes=("pos",))
    assert res.to_records() == []
    lo, hi = res.ci()
    assert lo.shape == hi.shape == (0,)
    res.to_csv(tmp_path / "t.csv")
    assert (tmp_path / "t.csv").read_text().strip() == "pos,mean,se,ci_low,ci_high"


def test_a_patch_result_of_no_grid_axes_plots_its_one_cell():
    res = _patch(grid=(), axes=())
    ax = res.plot(ax=Figure().add_subplot(), normalized=False)
    shown = ax.images[0].get_array()
    want = (res.values - res.corrupted).mean()  # the mean effect, by hand
    assert shown.shape == (1, 1) and np.isclose(shown[0, 0], float(want))


def test_a_patch_grid_of_four_axes_labels_every_row():
    res = _patch(batch=2, grid=(2, 3, 2, 4), axes=("layer", "head", "q", "pos"))
    ax = res.plot(ax=Figure().add_subplot(), normalized=False)
    shown = np.asarray(ax.images[0].get_array())
    eff = (res.values - res.corrupted[:, None, None, None, None]).mean(0)
    rows = [(a, b, c) for a in range(2) for b in range(3) for c in range(2)]
    assert shown.shape == (12, 4)
    for i, (a, b, c) in enumerate(rows):
        np.testing.assert_allclose(shown[i], eff[a, b, c].double().numpy(), rtol=1e-6)
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == [f"layer={a} head={b} q={c}" for a, b, c in rows]
    assert ax.get_ylabel() == "layer, head, q" and ax.get_xlabel() == "pos"
    # the usual (layer, head, pos) grid keeps its L{layer}H{head} rows
    res3 = _patch(batch=2, grid=(2, 2, 3), axes=("layer", "head", "pos"))
    ax3 = res3.plot(ax=Figure().add_subplot())
    assert [t.get_text() for t in ax3.get_yticklabels()] == ["L0H0", "L0H1", "L1H0", "L1H1"]


def test_axes_given_where_a_plot_takes_a_path_are_refused_naming_them(tmp_path):
    ax = Figure().add_subplot()
    with pytest.raises(TypeError, match=r"path=<Axes.*is matplotlib axes, not a file; give the axes as ax="):
        _patch().plot(ax)
    with pytest.raises(TypeError, match=r"ax='p.png' is not valid; give matplotlib axes"):
        _patch().plot(ax="p.png")
    assert not list(tmp_path.iterdir())
    assert _patch().plot(ax=ax) is ax  # given by name, they are drawn on
    before = dict(matplotlib.rcParams)
    _patch(batch=2).plot(path=tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0
    assert {k: str(v) for k, v in matplotlib.rcParams.items()} == {k: str(v) for k, v in before.items()}
