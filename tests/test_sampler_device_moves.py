"""A sampler optimizer whose model moved to another device after its first step checks its tensors again (its
anchors and masks stayed where they were): a clear error naming them, not a kernel reading another device's
memory. The fast path is taken again once the tensors are checked on the device they are on."""

import pytest
import torch

import pypattern.ops.sgld.op as sgld_op
from pypattern.sampling.optim import SGLD
from pypattern.sampling.samplers import SGNHT

MAKERS = {
    "sgld": lambda ps: SGLD(ps, step_size=1e-3, nbeta=1.0, localization=1.0),
    "sgnht": lambda ps: SGNHT(ps, step_size=1e-3, nbeta=1.0, localization=1.0),
}


def _stepped(name):
    m = torch.nn.Linear(3, 2)
    opt = MAKERS[name](m.parameters())
    m(torch.randn(4, 3)).sum().backward()
    opt.step()
    return m, opt


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_a_step_after_the_tensors_were_checked_elsewhere_checks_them_again(name, monkeypatch):
    m, opt = _stepped(name)
    seen = []
    real = sgld_op.validate_inputs

    def spy(*args, **kwargs):
        seen.append(True)
        return real(*args, **kwargs)

    monkeypatch.setattr(sgld_op, "validate_inputs", spy)
    opt.step()
    assert not seen  # checked once already, on this device: the fast path
    opt._step_device = torch.device("meta")  # as if the parameters had been checked on another device
    opt.step()
    assert seen  # checked again
    seen.clear()
    opt.step()
    assert not seen  # and the fast path after that


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", sorted(MAKERS))
def test_a_model_moved_to_the_gpu_after_a_step_is_refused_by_name(name):
    m, opt = _stepped(name)
    m.cuda()
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises((ValueError, RuntimeError), match="anchors|device"):
        opt.step()
