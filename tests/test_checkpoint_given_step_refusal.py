"""A checkpoint of a run sampled at a given step, resumed by a call that would calibrate its step: refused from the
checkpoint's header before the calibration runs (its tens of thousands of chain-steps would end in the same
refusal), naming the file, the stored step and the fix; a checkpoint of a calibrated run still resumes."""

import pytest
import torch
from _calls import count_calls
from torch import nn

import pypattern as pp
import pypattern.sampling.runner as runner
from pypattern import io

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]


def _setup():
    torch.manual_seed(0)
    w = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
    model = nn.Linear(3, 1, bias=False, dtype=torch.float64)
    with torch.no_grad():  # at the minimum of its loss, where the LLC is defined
        model.weight.copy_(w)
    x = torch.randn(64, 3, dtype=torch.float64)
    y = x @ w.T + 0.1 * torch.randn(64, 1, dtype=torch.float64)
    return model, [(x, y)]


KW = dict(num_chains=2, num_draws=4, num_burnin_steps=2, nbeta=10.0, localization=100.0, seed=1, quiet=True)


def test_auto_step_on_a_given_step_checkpoint_is_refused_before_calibrating(tmp_path, monkeypatch):
    model, data = _setup()
    path = tmp_path / "run.npz"
    ref = pp.estimate_llc(model, data, step_size=1e-3, checkpoint=str(path), **KW)
    assert path.exists() and torch.isfinite(torch.as_tensor(ref.llc_mean))
    calls = count_calls(monkeypatch, runner, "calibrate_or_resume")
    for step in ("auto", None):
        with pytest.raises(
            io.FingerprintMismatch, match=r"given step, step_size=0\.001.*resume with step_size=0\.001"
        ):
            pp.estimate_llc(model, data, step_size=step, checkpoint=str(path), **KW)
    assert calls == []  # refused before any calibration
    # the same run at its given step resumes: the stored draws, the same estimate
    again = pp.estimate_llc(model, data, step_size=1e-3, checkpoint=str(path), **KW)
    assert again.llc_mean == ref.llc_mean


def test_a_calibrated_checkpoint_resumes_with_its_calibration(tmp_path):
    model, data = _setup()
    path = tmp_path / "auto.npz"
    opts = {"calibration_steps": 60}
    with pytest.warns(UserWarning):  # a run this short may warn of its step or burn-in
        first = pp.estimate_llc(
            model, data, step_size="auto", auto_step_options=opts, checkpoint=str(path), **KW
        )
    with pytest.warns(UserWarning):
        again = pp.estimate_llc(
            model, data, step_size="auto", auto_step_options=opts, checkpoint=str(path), **KW
        )
    assert again.llc_mean == first.llc_mean
