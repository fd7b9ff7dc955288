"""OnlineLLC's schedule, checkpoint folder and model across a run, and steering under generation that runs each prompt
several times (beam search, ``num_return_sequences``), with cached and uncached sampling and nested blocks.

The references are independent runs: a curve estimated without a change of working directory, each prompt generated
alone, Hugging Face's generate without its key-value cache, and one forward over the whole sequence under masks that
select the same positions.
"""

import copy
import os
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import pypattern as pp
from pypattern import io
from pypattern.sampling import OnlineLLC, OnlineLLCResult

pytestmark = pytest.mark.usefixtures("one_thread")


# ----- OnlineLLC ----------------------------------------------------------------------------------------------


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, generator=g)
    return x, torch.sin(x.sum(1, keepdim=True))


def _loader():
    x, y = _data()
    return [(x[i : i + 16], y[i : i + 16]) for i in range(0, 32, 16)]


def _loss(model, batch):
    return nn.functional.mse_loss(model(batch[0]), batch[1])


KW = dict(loss_fn=_loss, num_chains=2, num_draws=8, localization=10.0, seed=0, step_size=1e-3)


def _arch(hidden: int = 6):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, 1))


def _train(model, steps, cb):
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in steps:
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        cb(model, step, loss=loss)


def _same_curve(a, b):
    for k in ("step", "llc_mean", "llc_std", "llc_se", "r_hat", "init_loss", "train_loss"):
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k), err_msg=k)
    assert a.refined.keys() == b.refined.keys()
    for k in a.refined:
        np.testing.assert_array_equal(a.refined[k], b.refined[k], err_msg=k)


def test_steps_given_as_integer_tensors_and_arrays_are_the_schedule():
    for steps in (torch.tensor([0, 3]), np.array([0, 3]), [torch.tensor(0), np.int32(3)]):
        cb = OnlineLLC(_loader(), steps=steps, **KW)
        assert cb.steps == {0, 3} and all(type(s) is int for s in cb.steps)
        assert [s for s in range(5) if cb.due(s)] == [0, 3]
    for steps in (torch.tensor(3), np.array(3), np.zeros((2, 2), dtype=int)):
        with pytest.raises(ValueError, match="steps has shape"):
            OnlineLLC(_loader(), steps=steps, **KW)
    for steps in (torch.tensor([0.0, 2.0]), torch.tensor([True]), [-1]):
        with pytest.raises(ValueError, match="steps contains"):
            OnlineLLC(_loader(), steps=steps, **KW)


def test_a_relative_checkpoint_stays_in_the_folder_named_when_built(tmp_path, monkeypatch):
    """A training loop that changes its working directory after the callback is built: the state file and every
    step's sampler checkpoint stay in the first folder, and a restart there continues the whole curve, equal to a
    run without the change."""
    (tmp_path / "run").mkdir()
    (tmp_path / "elsewhere").mkdir()
    straight = OnlineLLC(_loader(), every=2, checkpoint=tmp_path / "straight.npz", **KW)
    _train(_arch(), range(5), straight)

    monkeypatch.chdir(tmp_path / "run")
    cb = OnlineLLC(_loader(), every=2, checkpoint="llc.npz", **KW)
    model = _arch()
    _train(model, range(2), cb)
    monkeypatch.chdir(tmp_path / "elsewhere")
    _train(model, range(2, 5), cb)
    assert not os.listdir(tmp_path / "elsewhere")
    assert sorted(os.listdir(tmp_path / "run")) == [
        f"llc.{t}.npz" for t in ("online", "step0", "step2", "step4")
    ]
    monkeypatch.chdir(tmp_path / "run")
    again = OnlineLLC(_loader(), every=2, checkpoint="llc.npz", **KW)
    _same_curve(again.result, straight.result)


def test_a_second_model_of_another_architecture_is_refused_at_its_estimate():
    cb = OnlineLLC(_loader(), every=2, **KW)
    _train(_arch(), range(3), cb)
    before = copy.deepcopy(cb.state_dict())
    other = _arch(hidden=7)
    assert cb(other, 3) is None  # not on the schedule: nothing estimated, nothing refused
    with pytest.raises(io.FingerprintMismatch, match="at step 4 the model has another architecture") as e:
        cb(other, 4)
    assert e.value.item == "architecture"
    assert cb.state_dict() == before  # the curve is left as it was
    # a model of the same architecture (the same run's, restored from its checkpoint) is estimated
    model = _arch()
    assert cb(model, 4)["step"] == 4


def test_refined_rows_and_the_result_file_after_a_restart(tmp_path):
    """Components' refined LLCs are continued across a restart from the state file, and the result of the
    continued curve saves and loads as it is; it equals the curve of the run without the restart."""
    kw = dict(KW, components={"first": ["0.weight", "0.bias"], "last": ["2.weight"]})
    straight = OnlineLLC(_loader(), every=2, **kw)
    _train(_arch(), range(5), straight)
    assert set(straight.result.refined) == {"first", "last"}

    model = _arch()
    first = OnlineLLC(_loader(), every=2, checkpoint=tmp_path / "c.pt", **kw)  # any suffix: the files are npz
    _train(model, range(3), first)
    saved = copy.deepcopy(model.state_dict())
    del first
    model = _arch()
    model.load_state_dict(saved)
    cb = OnlineLLC(_loader(), every=2, checkpoint=tmp_path / "c.pt", **kw)
    assert list(cb.result.step) == [0, 2]
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(3, 5):  # the same updates as the straight run's (plain SGD: no optimizer state)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        cb(model, step, loss=loss)
    _same_curve(cb.result, straight.result)
    cb.result.save(tmp_path / "result.npz")
    _same_curve(OnlineLLCResult.load(tmp_path / "result.npz"), straight.result)


# ----- steering under Hugging Face generate -----------------------------------------------------------------------

transformers = pytest.importorskip("transformers")

V = 40
PROMPT = torch.tensor([[5, 9, 17, 3], [11, 2, 30, 8]])
P = PROMPT.shape[1]
STEPS = 4
SPEC = pp.FlagSpec(
    "blocks.1.hook_resid_pre", dims=tuple(range(12)), num_concepts=2, on_value=6.0, off_value=-6.0
)


@pytest.fixture(scope="module")
def gpt2():
    T = transformers
    torch.manual_seed(0)
    cfg = T.GPT2Config(
        vocab_size=V,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=32,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=None,
    )
    hf = T.GPT2LMHeadModel(cfg)
    for c in (hf.config, hf.generation_config):
        c.bos_token_id = c.eos_token_id = None
        c.pad_token_id = 0
    hf = hf.double().eval()
    return hf, pp.hooked_hf(hf)


def _generate(hf, prompt, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hf.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=STEPS,
            min_new_tokens=STEPS,
            **kw,
        )


@pytest.mark.parametrize("how", [dict(num_beams=3), dict(num_return_sequences=2, do_sample=True)])
def test_per_prompt_steering_when_generate_runs_each_prompt_several_times(gpt2, how):
    hf, model = gpt2
    k = how.get("num_beams", how.get("num_return_sequences"))
    concept = torch.tensor([1, 0])
    mask = torch.zeros(2, P + STEPS, dtype=torch.bool)
    mask[0, 1:] = True
    mask[1, P:] = True
    for name, args in (("concept", (concept, None)), ("positions", (1, mask))):
        with pytest.raises(ValueError, match=rf"{name}\.repeat_interleave\({k}, dim=0\)"):
            with pp.steer(model, SPEC, args[0], positions=args[1]):
                _generate(hf, PROMPT, **how)
    # expanded so, each prompt is steered as when generated alone
    torch.manual_seed(1)
    with pp.steer(model, SPEC, concept.repeat_interleave(k), positions=mask.repeat_interleave(k, 0)):
        both = _generate(hf, PROMPT, **how)
    if "num_beams" in how:  # deterministic: compared with each prompt alone
        for i in range(2):
            with pp.steer(model, SPEC, int(concept[i]), positions=mask[i]):
                alone = _generate(hf, PROMPT[i : i + 1], **how)
            assert torch.equal(both[i : i + 1], alone)


def test_sampling_and_nested_blocks_under_the_cache_equal_the_uncached_run(gpt2):
    hf, model = gpt2
    concept = torch.tensor([1, 0])
    for positions in (2, torch.arange(P + STEPS) >= P + 1):
        runs = []
        for use_cache in (True, False):
            torch.manual_seed(7)
            with pp.steer(model, SPEC, concept, positions=positions):
                runs.append(_generate(hf, PROMPT, do_sample=True, use_cache=use_cache))
        assert torch.equal(*runs)
    # nested blocks: the inner one overwrites the outer one where both select; equal to one forward under disjoint
    # masks, cached or not
    with pp.steer(model, SPEC, 1, positions=1), pp.steer(model, SPEC, 0, positions=P + 1):
        cached = _generate(hf, PROMPT, do_sample=False, use_cache=True)
        plain = _generate(hf, PROMPT, do_sample=False, use_cache=False)
        nested = model(cached)
    assert torch.equal(cached, plain)
    cols = torch.arange(cached.shape[1])
    with pp.steer(model, SPEC, 1, positions=(cols >= 1) & (cols < P + 1)):
        with pp.steer(model, SPEC, 0, positions=cols >= P + 1):
            disjoint = model(cached)
    torch.testing.assert_close(nested, disjoint, rtol=0, atol=0)
    assert torch.equal(disjoint[:, P - 1 : -1].argmax(-1), cached[:, P:])
