"""copy.deepcopy of a hooked_hf / HookedModule wrapper gives a wrapper whose hook points fire on the copy's
forward (with the functions attached to the original carried over), and the original's fire only on its own; a
copy of the wrapped Hugging Face model alone runs without the wrapper's hook points."""

import copy

import pytest
import torch

import pypattern as pp
from pypattern.models.hooks import HookedModule, attached_hooks

transformers = pytest.importorskip("transformers")


def _gpt2():
    cfg = transformers.GPT2Config(
        n_layer=2,
        n_embd=20,
        n_head=5,
        vocab_size=40,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _counter(calls, key):
    def fn(x, hook):
        calls[key] = calls.get(key, 0) + 1

    return fn


NAMES = ["blocks.1.hook_resid_pre", "blocks.0.hook_resid_mid", "blocks.0.hook_attn_out", "hook_pos_embed"]


@pytest.mark.parametrize("name", NAMES)
def test_a_copied_wrapper_fires_its_own_hook_points(name):
    h = pp.hooked_hf(_gpt2())
    c = copy.deepcopy(h)
    x = torch.randint(0, 40, (2, 6))
    assert c.hf_model is not h.hf_model
    assert torch.equal(c(x), h(x))
    calls = {}
    with c.hooks([(name, _counter(calls, "copy"))]), h.hooks([(name, _counter(calls, "orig"))]):
        c(x)
        assert calls == {"copy": 1}
        h(x)
        assert calls == {"copy": 1, "orig": 1}
    # an edit on the copy's hook point changes the copy's logits only, as on the original
    zero = lambda a, hook: torch.zeros_like(a)  # noqa: E731
    with c.hooks([(name, zero)]):
        edited = c(x)
    with h.hooks([(name, zero)]):
        assert torch.equal(h(x), edited)
    assert torch.equal(h(x), c(x))
    assert not attached_hooks(c.hf_model) and not attached_hooks(h.hf_model)


def test_functions_attached_before_the_copy_come_with_it():
    h = pp.hooked_hf(_gpt2())
    calls = {}
    h.hook_dict["blocks.0.hook_resid_post"].add_hook(_counter(calls, "fn"), is_permanent=True)
    c = copy.deepcopy(h)
    x = torch.randint(0, 40, (1, 4))
    c(x)
    assert calls == {"fn": 1}
    c.reset_hooks(including_permanent=True)
    c(x)
    h(x)
    assert calls == {"fn": 2}  # the original keeps its function


def test_a_copy_of_the_wrapped_model_alone_runs_as_the_model():
    hf = _gpt2()
    x = torch.randint(0, 40, (2, 5))
    plain = hf(x).logits
    h = pp.hooked_hf(hf)
    calls = {}
    twin = copy.deepcopy(hf)
    with h.hooks(
        [
            ("blocks.0.hook_resid_mid", _counter(calls, "orig")),
            ("blocks.1.hook_mlp_out", _counter(calls, "o2")),
        ]
    ):
        out = twin(x).logits
    assert calls == {}  # the original wrapper's hook points do not fire on the copy
    assert torch.equal(out, plain)


def test_a_generic_wrapper_copy():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    hm = HookedModule(net, {"hook_mid": "1", "hook_in": "2:input"}, n_layers=1)
    c = copy.deepcopy(hm)
    assert c.n_layers == 1 and c.module is not hm.module
    x = torch.randn(5, 3)
    calls = {}
    double = lambda a, hook: 2 * a  # noqa: E731
    with c.hooks([("hook_mid", double), ("hook_in", _counter(calls, "copy"))]):
        got = c(x)
        assert torch.equal(hm(x), net(x))
    assert calls == {"copy": 1}
    assert torch.allclose(got, c.module[2](2 * c.module[1](c.module[0](x))))
    # the original still fires its own
    with hm.hooks([("hook_mid", double)]):
        assert torch.equal(hm(x), got)
