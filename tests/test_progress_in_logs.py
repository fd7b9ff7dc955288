"""Progress bars of sampling written to a log (stderr not a terminal): a line at the start and then at most one per
``LOG_INTERVAL_S``, not two a second."""

import time

import torch
from torch import nn

import pypattern as pp
from pypattern import _progress


def test_a_sampling_run_written_to_a_log_writes_few_progress_lines(capsys):
    torch.manual_seed(0)
    x = torch.randn(64, 3)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]])
    model = nn.Linear(3, 1)

    def slow_loss(m, batch):
        time.sleep(0.004)  # about 2.5 s for the run: five refreshes at tqdm's 0.5 s
        return nn.functional.mse_loss(m(batch[0]), batch[1])

    pp.sample(
        model, [(x, y)], loss_fn=slow_loss, num_chains=1, num_draws=150, num_burnin_steps=0,
        num_steps_bw_draws=4, step_size=1e-4, nbeta=10.0, localization=10.0, quiet=False,
    )  # fmt: skip
    err = capsys.readouterr().err
    assert _progress.LOG_INTERVAL_S >= 30
    assert 1 <= err.count("\r") <= 3, err.count("\r")
