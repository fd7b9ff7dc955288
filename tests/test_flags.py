import copy

import pytest
import torch

from pypattern.flags import (
    FlagSpec,
    ablate_flags,
    flag_loss,
    flag_report,
    generate,
    overwrite_flags,
    read_flags,
    steer,
    train_flags,
)
from pypattern.models import Transformer
from pypattern.tasks import train
from pypattern.tasks.topics import TopicTask

pytestmark = pytest.mark.usefixtures("one_thread")


TASK = TopicTask(num_topics=2, tokens_per_topic=8, num_shared=4, seq_len=16)
SPEC = FlagSpec("blocks.1.hook_resid_pre", dims=(0, 1, 2, 3), num_concepts=2)


def _model(seed=0):
    return Transformer(TASK.model_config(seed=seed))


# ----- task ground truth ------------------------------------------------------------------------------------
def test_topic_task_ground_truth():
    b = TASK.sample(300, seed=0)
    tc = TASK.concept_of(b.tokens)
    assert torch.all(b.tokens[:, 0] == TASK.bos)
    # every topic token belongs to the sequence's concept; readable concept matches the last topic token
    c = b.extra["concept"]
    assert torch.all((tc[:, 1:] == -1) | (tc[:, 1:] == c[:, None]))
    assert torch.all((b.extra["concept_pos"] == -1) | (b.extra["concept_pos"] == c[:, None]))
    assert torch.all(b.extra["concept_pos"][:, 0] == -1)
    assert torch.equal(b.targets[:, :-1], b.tokens[:, 1:])
    shared = (tc[:, 1:] == -1).float().mean()
    assert 0.18 < shared < 0.32  # shared_prob = 0.25


def test_topic_task_switch():
    b = TASK.sample(300, seed=1, switch_prob=1.0)
    sp, c, nc = b.extra["switch_pos"], b.extra["concept"], b.extra["next_concept"]
    assert torch.all(nc != c) and torch.all(sp >= 3) and torch.all(sp <= 14)
    tc = TASK.concept_of(b.tokens)
    pos = torch.arange(16)[None]
    want = torch.where(pos >= sp[:, None], nc[:, None], c[:, None])
    assert torch.all((tc == -1) | (tc == want))
    # target_concept at position t is the topic of token t + 1
    assert torch.equal(b.extra["target_concept"][:, :-1], want[:, 1:])
    with pytest.raises(ValueError, match="switch_prob"):
        TASK.sample(2, seed=0, switch_prob=1.5)
    with pytest.raises(ValueError, match="num_topics"):
        TopicTask(num_topics=1)


# ----- spec validation --------------------------------------------------------------------------------------
def test_spec_errors():
    with pytest.raises(ValueError, match="repeats"):
        FlagSpec(dims=(0, 1, 1, 2))
    with pytest.raises(ValueError, match="negative"):
        FlagSpec(dims=(-1, 1))
    with pytest.raises(ValueError, match="num_concepts"):
        FlagSpec(dims=(0, 1), num_concepts=3)
    with pytest.raises(ValueError, match="num_concepts"):
        FlagSpec(dims=(0, 1), num_concepts=1)
    with pytest.raises(ValueError, match="on_value"):
        FlagSpec(on_value=1.0, off_value=1.0)
    model = _model()
    with pytest.raises(ValueError, match=r"dims=.*d_model=32"):
        FlagSpec(dims=(0, 32)).check(model)
    with pytest.raises(ValueError, match="hook='blocks.9.hook_resid_pre'"):
        FlagSpec(hook="blocks.9.hook_resid_pre").check(model)
    with pytest.raises(ValueError, match="hook="):
        with steer(model, FlagSpec(hook="nope"), 0):
            pass
    with pytest.raises(ValueError, match="concept"):
        with steer(model, SPEC, 2):
            pass
    with pytest.raises(ValueError, match="hook='blocks.5.hook_resid_post'"):
        train_flags(model, TASK, FlagSpec(hook="blocks.5.hook_resid_post"), 1, 1)
    with pytest.raises(ValueError, match="stage1_steps=-1"):
        train_flags(model, TASK, SPEC, -1, 1)
    with pytest.raises(ValueError, match="aux_weight"):
        train_flags(model, TASK, SPEC, 1, 1, aux_weight=-1.0)


def test_spec_groups_and_code():
    s = FlagSpec(dims=tuple(range(16)), num_concepts=5)
    assert [len(g) for g in s.groups] == [4, 3, 3, 3, 3]
    code = s.code()
    assert code.shape == (5, 16) and torch.all(code.sum(1) == torch.tensor([4.0, 3, 3, 3, 3]))
    assert torch.all(code.sum(0) == 1)


# ----- loss and read-out ------------------------------------------------------------------------------------
def test_flag_loss_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(3, 5, 8, generator=g)
    spec = FlagSpec(dims=(6, 1, 3), num_concepts=2, on_value=2.0, off_value=-1.0)
    labels = torch.tensor([[0, 1, -1, 1, 0], [1, 1, 1, -1, -1], [-1, 0, 0, 0, 0]])
    total, count = 0.0, 0
    for b in range(3):
        for t in range(5):
            c = int(labels[b, t])
            if c < 0:
                continue
            # concept 0 owns dims[0:2] = (6, 1), concept 1 owns dims[2:3] = (3,)
            target = {0: [2.0, 2.0, -1.0], 1: [-1.0, -1.0, 2.0]}[c]
            for k, d in enumerate((6, 1, 3)):
                total += (float(acts[b, t, d]) - target[k]) ** 2
                count += 1
    assert float(flag_loss(acts, labels, spec)) == pytest.approx(total / count, rel=1e-5)
    # per-sample labels broadcast over positions
    lab1 = torch.tensor([0, 1, 1])
    assert float(flag_loss(acts, lab1, spec)) == pytest.approx(
        float(flag_loss(acts, lab1[:, None].expand(3, 5), spec)), rel=1e-6
    )
    # read-out picks the nearest code
    ow = overwrite_flags(acts, spec, spec.code()[labels.clamp_min(0)])
    assert torch.equal(read_flags(ow, spec), labels.clamp_min(0))


def test_flag_loss_errors():
    acts = torch.zeros(2, 4, 8)
    with pytest.raises(ValueError, match="concept_labels has shape"):
        flag_loss(acts, torch.zeros(3, dtype=torch.long), SPEC)
    with pytest.raises(ValueError, match="concept_labels has shape"):
        flag_loss(acts, torch.zeros(2, 5, dtype=torch.long), SPEC)
    with pytest.raises(ValueError, match="dtype"):
        flag_loss(acts, torch.zeros(2), SPEC)
    with pytest.raises(ValueError, match="values in"):
        flag_loss(acts, torch.tensor([0, 2]), SPEC)
    with pytest.raises(ValueError, match=r"acts has shape"):
        flag_loss(torch.zeros(2, 8), torch.tensor([0, 1]), SPEC)
    with pytest.raises(ValueError, match=r"d_model=8"):
        flag_loss(acts, torch.tensor([0, 1]), FlagSpec(dims=(0, 9)))


# ----- the hook ---------------------------------------------------------------------------------------------
def test_steer_overwrites_only_flag_dims():
    model = _model().eval()
    tokens = TASK.sample(4, seed=3).tokens
    _, clean = model.run_with_cache(tokens, names_filter=SPEC.hook)
    concept = torch.tensor([1, 0, 1, 1])
    with steer(model, SPEC, concept):
        _, cache = model.run_with_cache(tokens, names_filter=SPEC.hook)
    a, a0 = cache[SPEC.hook], clean[SPEC.hook]
    want = SPEC.code()[concept][:, None].expand(4, 16, 4)
    assert torch.equal(a[..., list(SPEC.dims)], want)
    assert torch.equal(a[..., 4:], a0[..., 4:])
    # the overwrite propagates downstream: logits change
    clean_logits = model(tokens)
    with steer(model, SPEC, 1):
        assert not torch.allclose(model(tokens), clean_logits, atol=1e-4)
    # positions: an int start position leaves earlier ones untouched
    with steer(model, SPEC, 1, positions=5):
        _, cache = model.run_with_cache(tokens, names_filter=SPEC.hook)
    a = cache[SPEC.hook]
    assert torch.equal(a[:, :5], a0[:, :5])
    assert torch.all(a[:, 5:, list(SPEC.dims)] == SPEC.code()[1])
    with ablate_flags(model, SPEC, 0.0):
        _, cache = model.run_with_cache(tokens, names_filter=SPEC.hook)
    assert torch.all(cache[SPEC.hook][..., :4] == 0) and torch.equal(cache[SPEC.hook][..., 4:], a0[..., 4:])
    # hooks are removed afterwards
    assert all(not hp._fns for hp in model.hook_dict.values())


def test_generate_checks_and_determinism():
    model = _model().eval()
    prompt = TASK.sample(3, seed=0).tokens[:, :4]
    a = generate(model, prompt, 6, seed=5)
    assert a.shape == (3, 10) and torch.equal(a[:, :4], prompt)
    assert torch.equal(a, generate(model, prompt, 6, seed=5))
    with pytest.raises(ValueError, match="n_ctx=16"):
        generate(model, prompt, 13)
    with pytest.raises(ValueError, match="both spec and concept"):
        generate(model, prompt, 2, spec=SPEC)


# ----- end to end -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(1)
    base = _model(seed=0)
    train(base, TASK, steps=200, seed=0, log_every=0)
    flagged = copy.deepcopy(base)
    res = train_flags(flagged, TASK, SPEC, stage1_steps=200, stage2_steps=200, aux_weight=1.0, seed=1)
    control = copy.deepcopy(base)  # same fine-tuning budget, no flag loss and no stage 2
    train_flags(control, TASK, SPEC, stage1_steps=400, stage2_steps=0, aux_weight=0.0, seed=1)
    kw = dict(num_samples=256, seed=0)
    return (
        res,
        flag_report(flagged, TASK, SPEC, reference_model=base, **kw),
        flag_report(control, TASK, SPEC, **kw),
    )


def test_flags_are_learned_and_steer(trained):
    res, rep, ctl = trained
    assert res.stages[0] == 1 and res.stages[-1] == 2
    assert res.flag_losses[-1] < 0.05 < res.flag_losses[0]
    # measured (seeds 0/1): flag accuracy 1.0, steering 0.76 vs 0.01 unsteered, reliance 0.66 nats
    assert rep.flag_accuracy > 0.95
    assert rep.steer_success > 0.5
    assert rep.steer_baseline < 0.1
    assert rep.steer_prompt_concept < 0.15
    assert rep.reliance > 0.25
    assert rep.loss_clean < TASK.optimal_loss() + 0.15
    assert set(rep.reference) == {
        "probe_non_flag",
        "probe_non_flag_r2",
        "probe_non_flag_shared",
        "probe_non_flag_shared_r2",
        "probe_flag",
    }


def test_control_is_not_steerable(trained):
    _, rep, ctl = trained
    # measured: control steering 0.006 (its own baseline 0.006), reliance 0.007 nats
    assert ctl.steer_success < 0.1
    assert rep.steer_success > ctl.steer_success + 0.4
    assert ctl.reliance < 0.1 < rep.reliance
    assert ctl.flag_accuracy < 0.9


def test_flags_demo_runs_small(tmp_path):
    """`pypattern demo flags` end to end, at test size: it writes its report and the flags beat the control."""
    import json

    from pypattern.experiments.flags_demo import FlagsDemoSettings, run_flags_demo

    out = run_flags_demo(tmp_path, FlagsDemoSettings.quick())  # what `pypattern demo flags --quick` runs
    rep = json.loads((tmp_path / "flags_report.json").read_text())
    assert rep["flags"]["steer_success"] > rep["control"]["steer_success"] + 0.3
    assert rep["flags"]["reliance"] > rep["control"]["reliance"]
    assert out["report"].endswith("flags_report.json")


def test_train_flags_stops_on_a_non_finite_loss():
    model = _model(seed=0)
    with torch.no_grad():
        model.embed.W_E[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="step 0"):
        train_flags(model, TASK, SPEC, stage1_steps=2, stage2_steps=0, log_every=0)


@pytest.mark.parametrize("arg", ["on_value", "off_value"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_flagspec_refuses_non_finite_values(arg, bad):
    with pytest.raises(ValueError, match=f"{arg}={bad!r} is not valid; give a finite number"):
        FlagSpec(**{arg: bad})


def test_training_and_report_settings_are_checked():
    """A NaN flag weight, a task without concepts or with another number of them, a bool position and prompt
    lengths outside the sequence are refused by name, before any training or report."""
    from pypattern.tasks import InductionTask

    model = _model()
    with pytest.raises(ValueError, match="aux_weight=nan is not valid"):
        train_flags(model, TASK, SPEC, stage1_steps=1, stage2_steps=0, aux_weight=float("nan"))
    three = FlagSpec("blocks.1.hook_resid_pre", dims=(0, 1, 2, 3, 4, 5), num_concepts=3)
    with pytest.raises(ValueError, match="spec.num_concepts=3 but the task has 2 concepts"):
        train_flags(model, TASK, three, stage1_steps=1, stage2_steps=0)
    with pytest.raises(ValueError, match="task InductionTask has no concepts to flag"):
        train_flags(model, InductionTask(), SPEC, stage1_steps=1, stage2_steps=0)
    x = TASK.sample(2, seed=0).tokens
    with pytest.raises(ValueError, match="positions=True is not valid"):
        with steer(model, SPEC, 1, positions=True):
            model(x)
    for bad, match in (
        (1, "prompt_len=1 is not valid"),
        (0, "prompt_len=0 is not valid"),
        (20, "longer than"),
    ):
        with pytest.raises(ValueError, match=match):
            flag_report(model, TASK, SPEC, prompt_len=bad)


def test_concepts_positions_and_counts_are_checked():
    """A bool concept (a mask in disguise), negative start positions and non-int or non-positive counts are
    refused by name; a numpy integer position works as an int; the flags functions are importable from the
    package."""
    import numpy as np

    import pypattern as pp

    assert pp.ablate_flags is ablate_flags and pp.read_flags is read_flags
    model = _model().eval()
    x = TASK.sample(2, seed=0).tokens
    for bad in (True, torch.tensor([True, False]), 0.5):
        with pytest.raises(ValueError, match="concept=.* is not valid"):
            with steer(model, SPEC, bad):
                model(x)
    with pytest.raises(ValueError, match="positions=-3 is not valid"):
        with steer(model, SPEC, 1, positions=-3):
            model(x)
    with steer(model, SPEC, 1, positions=np.int64(3)):
        _, a = model.run_with_cache(x, names_filter=SPEC.hook)
    with steer(model, SPEC, 1, positions=3):
        _, b = model.run_with_cache(x, names_filter=SPEC.hook)
    assert torch.equal(a[SPEC.hook], b[SPEC.hook])
    for steps in (True, 2.5, -1):
        with pytest.raises(ValueError, match="steps=.* is not valid"):
            generate(model, x[:, :4], steps)
    for kw, match in (
        (dict(num_samples=0), "num_samples=0 is not valid"),
        (dict(gen_steps=0), "gen_steps=0 is not valid"),
    ):
        with pytest.raises(ValueError, match=match):
            flag_report(model, TASK, SPEC, **kw)
    for kw, match in ((dict(stage1_steps=True), "stage1_steps=True"), (dict(log_every=-1), "log_every=-1")):
        with pytest.raises(ValueError, match=match):
            train_flags(model, TASK, SPEC, **{"stage1_steps": 1, "stage2_steps": 0, **kw})


def test_flag_spec_takes_numpy_scalars():
    import numpy as np

    a = FlagSpec(
        "blocks.1.hook_resid_pre", dims=np.arange(6), num_concepts=np.int64(3), on_value=np.float32(2.0)
    )
    b = FlagSpec("blocks.1.hook_resid_pre", dims=(0, 1, 2, 3, 4, 5), num_concepts=3, on_value=2.0)
    assert a == b and type(a.num_concepts) is int and type(a.on_value) is float
    with pytest.raises(ValueError, match="num_concepts"):
        FlagSpec("blocks.1.hook_resid_pre", dims=(0, 1, 2), num_concepts=np.float64(2.5))
    with pytest.raises(ValueError, match="on_value"):
        FlagSpec("blocks.1.hook_resid_pre", dims=(0, 1, 2), num_concepts=2, on_value=np.float32("nan"))


def test_flag_inputs_checked_and_probe_without_shared_tokens():
    """A mask must be (batch, pos) bool (a (batch,) mask is refused, not broadcast over positions); a non-finite
    ablation value is refused; the shared-token probe of a task without shared tokens is NaN (nothing to probe)."""
    from pypattern.flags import probe_accuracy

    acts = torch.zeros(5, 5, 32)
    with pytest.raises(ValueError, match=r"mask has shape \(5,\).*\(batch, pos\) = \(5, 5\)"):
        overwrite_flags(acts, SPEC, torch.ones(4), mask=torch.tensor([1, 0, 0, 0, 0]).bool())
    with pytest.raises(ValueError, match="give a bool tensor"):
        overwrite_flags(acts, SPEC, torch.ones(4), mask=torch.ones(5, 5))
    m = torch.zeros(5, 5, dtype=torch.bool)
    m[0, 1] = True
    out = overwrite_flags(acts, SPEC, torch.ones(4), mask=m)
    assert float(out[..., :4].sum()) == 4.0 and bool(out[0, 1, :4].eq(1).all())
    model = _model(seed=3)
    for bad in (float("nan"), float("inf"), torch.tensor([0.0, 1.0, float("nan"), 0.0])):
        with pytest.raises(ValueError, match="value must be finite"):
            with ablate_flags(model, SPEC, bad):
                pass
    task = TopicTask(num_topics=2, tokens_per_topic=8, num_shared=0, shared_prob=0.0, seq_len=16)
    lm = Transformer(task.model_config(seed=4))
    acc, r2 = probe_accuracy(lm, task, SPEC, num_samples=16, only_shared_tokens=True)
    assert acc != acc and r2 != r2  # NaN: nothing to probe
    acc, _ = probe_accuracy(lm, task, SPEC, num_samples=16)
    assert 0.0 <= acc <= 1.0


def test_learning_rate_is_checked_by_name():
    """A negative or non-finite lr is refused naming lr (not torch's "Invalid learning rate")."""
    model = _model()
    for lr in (-1, float("nan"), "fast"):
        with pytest.raises(ValueError, match=rf"lr={lr!r} is not valid; give a finite number >= 0"):
            train_flags(model, TASK, SPEC, 1, 1, lr=lr)


def test_steer_and_ablate_check_spec_and_concept_by_name():
    """A concept that is not an int or integer tensor, and a spec that is not a FlagSpec (a hook name), are refused
    by name (a ValueError or TypeError of pypattern's, not an error from inside torch.as_tensor or an
    AttributeError)."""
    model = _model().eval()
    x = TASK.sample(2, seed=0).tokens
    for bad in ("a", None, [[0, 1]]):
        with pytest.raises(ValueError, match=r"concept.* is not valid|concept has shape \(1, 2\)"):
            with steer(model, SPEC, bad):
                model(x)
    with pytest.raises(TypeError, match="spec is a str .*give a FlagSpec"):
        with steer(model, "blocks.1.hook_resid_pre", 0):
            model(x)
    with pytest.raises(TypeError, match="spec is a str .*give a FlagSpec"):
        with ablate_flags(model, "blocks.1.hook_resid_pre"):
            model(x)
    with pytest.raises(TypeError, match="spec is a str"):
        read_flags(torch.zeros(2, 3, 32), "blocks.1.hook_resid_pre")
    # a list of concepts, one per sample, steers as the tensor does
    with steer(model, SPEC, [0, 1]):
        a = model(x)
    with steer(model, SPEC, torch.tensor([0, 1])):
        b = model(x)
    torch.testing.assert_close(a, b)


def test_generate_checks_prompt_temperature_and_seed_by_name():
    """A prompt that is not an integer tensor of ids in the vocabulary (a negative id included: it is not read from
    the end of the embedding), a temperature that is not a finite number and a seed that is not an int are refused
    by name."""
    model = _model()
    tok = TASK.sample(3, seed=0).tokens[:, :4]
    with pytest.raises(TypeError, match="prompt has dtype torch.float32; give integer token ids"):
        generate(model, tok.float(), 2)
    with pytest.raises(TypeError, match="prompt is a list; give a LongTensor"):
        generate(model, tok.tolist(), 2)
    with pytest.raises(ValueError, match="prompt contains token id -1; valid ids are 0 .. 20"):
        generate(model, tok.clamp(max=-1), 2)
    with pytest.raises(ValueError, match="prompt contains token id 21; valid ids are 0 .. 20"):
        generate(model, torch.full_like(tok, 21), 2)
    for t in (float("nan"), float("inf"), "a", True):
        with pytest.raises(ValueError, match=r"temperature=.* is not valid; give a finite number > 0"):
            generate(model, tok, 2, temperature=t)
    with pytest.raises(TypeError, match="seed='a' is not valid; give an int"):
        generate(model, tok, 2, seed="a")
    with pytest.raises(TypeError, match="spec is a str"):
        generate(model, tok, 2, spec="blocks.1.hook_resid_pre", concept=0)
    out = generate(model, tok[0], 2, seed=1)
    assert out.shape == (1, 6) and torch.equal(out[0, :4], tok[0])


def test_probe_accuracy_and_train_flags_check_ridge_samples_and_seed_by_name():
    """A ridge that is negative (a penalty that subtracts: a probe fit to a wrong objective) or not a finite number,
    a num_samples that is not an int >= 1 (0 would give (nan, nan)) and a seed that is not an int (refused before
    torch's manual_seed) are refused by name."""
    from pypattern.flags import probe_accuracy

    model = _model()
    for ridge in (-1.0, float("nan"), float("inf"), "a"):
        with pytest.raises(ValueError, match=r"ridge=.* is not valid; give a finite number >= 0"):
            probe_accuracy(model, TASK, SPEC, num_samples=8, ridge=ridge)
    for n in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match=r"num_samples=.* is not valid; give an int >= 1"):
            probe_accuracy(model, TASK, SPEC, num_samples=n)
    with pytest.raises(TypeError, match="seed=None is not valid; give an int"):
        probe_accuracy(model, TASK, SPEC, num_samples=8, seed=None)
    with pytest.raises(TypeError, match="spec is a str"):
        probe_accuracy(model, TASK, "blocks.1.hook_resid_pre", num_samples=8)
    acc, r2 = probe_accuracy(model, TASK, SPEC, num_samples=8, ridge=0.5)
    assert 0.0 <= acc <= 1.0 and r2 <= 1.0
    with pytest.raises(TypeError, match="seed='a' is not valid; give an int"):
        train_flags(model, TASK, SPEC, stage1_steps=1, stage2_steps=0, batch_size=2, seed="a")
    with pytest.raises(TypeError, match="spec is a str"):
        train_flags(model, TASK, "blocks.1.hook_resid_pre", stage1_steps=1, stage2_steps=0, batch_size=2)
    with pytest.raises(TypeError, match="seed=1.5 is not valid"):
        flag_report(model, TASK, SPEC, num_samples=4, seed=1.5)


def test_flag_report_restores_the_models_modes():
    model, ref = _model(seed=0), _model(seed=1)
    model.train()
    ref.eval()
    model.blocks[0].eval()  # mixed modes: each module's is restored
    rep = flag_report(model, TASK, SPEC, num_samples=8, gen_steps=1, reference_model=ref, seed=0)
    assert model.training and not ref.training and not model.blocks[0].training and model.blocks[1].training
    model.blocks[0].train()
    assert rep.reference is not None
    # and the numbers are those of eval mode: the same as for the model already in eval mode
    again = flag_report(model.eval(), TASK, SPEC, num_samples=8, gen_steps=1, reference_model=ref, seed=0)
    assert again.flag_accuracy == rep.flag_accuracy and again.loss_clean == rep.loss_clean
    # a failing measurement restores them too
    model.train()
    with pytest.raises(ValueError, match="prompt_len"):
        flag_report(model, TASK, SPEC, num_samples=8, prompt_len=99)
    assert model.training


def test_flag_arguments_refused_by_name_and_generate_restores_module_modes():
    """values of the wrong batch or 0-d, a seed torch cannot take, positions without steering, a bool or string
    ablation value, integer activations and a generation longer than the context are refused naming the
    argument; numpy ints are taken as step counts; generate leaves each module in the mode it found it in."""
    import numpy as np

    model = _model(seed=0)
    acts = torch.randn(3, 12, model.cfg.d_model)
    with pytest.raises(ValueError, match=r"values has shape \(2, 4\)"):
        overwrite_flags(acts, SPEC, torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"values has shape \(\)"):
        overwrite_flags(acts, SPEC, torch.tensor(1.0))
    prompt = TASK.sample(2, seed=0).tokens[:, :4]
    with pytest.raises(ValueError, match=r"seed=\d+ is not valid"):
        generate(model, prompt, 2, seed=2**70)
    with pytest.raises(ValueError, match="positions applies to steering"):
        generate(model, prompt, 2, positions=1)
    for bad in (True, "a"):
        with pytest.raises(TypeError, match="value=.* is not valid"):
            with ablate_flags(model, SPEC, bad):
                pass
    with pytest.raises(TypeError, match="acts has dtype torch.int64"):
        flag_loss(
            torch.zeros(2, 3, model.cfg.d_model, dtype=torch.long), torch.zeros(2, dtype=torch.long), SPEC
        )
    with pytest.raises(ValueError, match="prompt_len=8 \\+ gen_steps=9 exceeds the model's n_ctx=16"):
        flag_report(model, TASK, SPEC, num_samples=4, prompt_len=8, gen_steps=9)
    res = train_flags(model, TASK, SPEC, np.int64(1), np.int64(0), batch_size=np.int64(4), log_every=1)
    assert res.steps == [0]
    model.train()
    model.blocks[0].eval()
    generate(model, prompt, 1, seed=0)
    assert model.training and not model.blocks[0].training and model.blocks[1].training


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_steer_ablate_and_training_write_the_values_in_the_models_dtype(dtype):
    """Codes and ablation values are written exactly as overwrite_flags writes them, in the activations' dtype: a
    float64 model gets float64 values, not float32-rounded ones, from steer, ablate_flags and train_flags' second
    stage."""
    spec = FlagSpec(
        "blocks.1.hook_resid_pre", dims=(0, 1, 2, 3), num_concepts=2, on_value=0.1, off_value=-0.3
    )
    model = _model().to(dtype)
    tok = TASK.sample(2, seed=3).tokens
    zeros = torch.zeros(1, 1, model.cfg.d_model, dtype=dtype)
    with steer(model, spec, concept=1):
        _, cache = model.run_with_cache(tok, names_filter=spec.hook)
    want = overwrite_flags(zeros, spec, spec.code(torch.float64)[1])[0, 0, :4]
    assert torch.equal(cache[spec.hook][0, 0, :4], want)
    assert want.tolist() == torch.tensor([-0.3, -0.3, 0.1, 0.1], dtype=dtype).tolist()
    v = torch.tensor([0.1, 0.2, 0.3, 0.7], dtype=torch.float64)
    with ablate_flags(model, spec, v):
        _, cache = model.run_with_cache(tok, names_filter=spec.hook)
    assert torch.equal(cache[spec.hook][0, 0, :4], v.to(dtype))
    # the second stage's overwritten flags are the code in the model's dtype
    seen = []
    hook = (spec.hook, lambda x, hook: seen.append(x.detach()[..., list(spec.dims)].clone()))
    orig = model.hooks

    def hooks(fwd, **kw):  # record the flags after train_flags' own hook wrote them
        return orig([*fwd, hook], **kw)

    model.hooks = hooks
    train_flags(model, TASK, spec, stage1_steps=0, stage2_steps=1, batch_size=4, switch_prob=1.0, seed=0)
    written = seen[0].reshape(-1, 4)
    values = set(written.flatten().tolist())
    assert {float(torch.tensor(0.1, dtype=dtype)), float(torch.tensor(-0.3, dtype=dtype))} <= values


def test_ablate_flags_refuses_complex_and_bool_values_by_name():
    model = _model()
    for bad in (torch.tensor([1j, 1, 1, 1]), [1j, 1.0, 1.0, 1.0], torch.ones(4, dtype=torch.bool)):
        with pytest.raises(TypeError, match="value has dtype torch.(complex|bool)"):
            with ablate_flags(model, SPEC, value=bad):
                pass
    with pytest.raises(TypeError, match=r"value=2j is not valid"):
        with ablate_flags(model, SPEC, value=2j):
            pass


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_train_flags_refuses_16_bit_models_by_dtype(dtype):
    model = _model().to(dtype)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError, match=f"model has parameters of dtype {dtype}: .*model.float"):
        train_flags(model, TASK, SPEC, stage1_steps=1, stage2_steps=0, batch_size=4, log_every=0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_an_aborted_train_flags_restores_the_models_parameters_and_modes():
    """A non-finite loss at a later step, or an exception raised inside the training (here by a hook at the
    third forward), leaves every parameter and buffer as before the call and every module in its mode."""
    model = _model()
    model.train()
    model.blocks[0].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    orig = model.hooks

    def failing(fwd, **kw):
        def fn(x, hook):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("stop")
            return None

        return orig([*fwd, ("blocks.0.hook_resid_post", fn)], **kw)

    model.hooks = failing
    with pytest.raises(RuntimeError, match="stop"):
        train_flags(model, TASK, SPEC, stage1_steps=5, stage2_steps=0, batch_size=4, log_every=0)
    assert len(calls) == 3  # two optimiser steps were taken, then undone
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.training and not model.blocks[0].training and model.blocks[1].training
    del model.hooks
    # a loss that turns NaN at step 2 (after two updates)
    step = []

    def nan_at_2(fwd, **kw):
        def fn(x, hook):
            step.append(1)
            return x * float("nan") if len(step) == 3 else None

        return orig([*fwd, ("blocks.0.hook_resid_post", fn)], **kw)

    model.hooks = nan_at_2
    with pytest.raises(FloatingPointError, match="at step 2 .*restored to its state before the call"):
        train_flags(model, TASK, SPEC, stage1_steps=5, stage2_steps=0, batch_size=4, log_every=0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.training and not model.blocks[0].training
    del model.hooks
    train_flags(model, TASK, SPEC, stage1_steps=1, stage2_steps=0, batch_size=4, log_every=0)
    assert not any(m.training for m in model.modules())  # a completed training leaves it in eval mode


def test_train_flags_takes_numpy_scalars_for_every_number_and_refuses_bools():
    import numpy as np

    kws = dict(stage1_steps=1, stage2_steps=1, batch_size=4, log_every=1, seed=0)
    want = train_flags(
        _model(), TASK, SPEC, **kws, lr=1e-3, aux_weight=0.5, switch_prob=0.5, weight_decay=0.01
    )
    got = train_flags(
        _model(),
        TASK,
        SPEC,
        stage1_steps=np.int64(1),
        stage2_steps=np.int32(1),
        batch_size=np.int64(4),
        log_every=np.int64(1),
        seed=np.int64(0),
        lr=np.float64(1e-3),
        aux_weight=np.float32(0.5),
        switch_prob=np.float32(0.5),
        weight_decay=np.float64(0.01),
    )
    assert got.lm_losses == want.lm_losses and got.flag_losses == want.flag_losses and got.steps == [0, 1]
    for name in (
        "stage1_steps",
        "log_every",
        "aux_weight",
        "switch_prob",
        "lr",
        "weight_decay",
        "batch_size",
    ):
        for bad in (True, np.bool_(False)):
            with pytest.raises(ValueError, match=f"{name}={bad!r} is not valid"):
                train_flags(_model(), TASK, SPEC, **{**kws, name: bad})
    with pytest.raises(ValueError, match=r"seed=\d+ is not valid; give an int in \[-2\*\*63, 2\*\*64\)"):
        train_flags(_model(), TASK, SPEC, **{**kws, "seed": 2**70})


def test_steer_reports_the_given_shape_of_a_short_mask():
    model = _model()
    x = TASK.sample(4, seed=0).tokens
    with pytest.raises(
        ValueError, match=r"positions has shape \(5,\); give a bool mask \(pos,\) or \(4, pos\) "
    ):
        with steer(model, SPEC, 1, positions=torch.ones(5, dtype=torch.bool)):
            model(x)
    with pytest.raises(ValueError, match=r"positions has shape \(3, 16\)"):
        with steer(model, SPEC, 1, positions=torch.ones(3, 16, dtype=torch.bool)):
            model(x)


def test_flag_spec_refuses_unordered_dims_and_names_non_residual_hooks():
    with pytest.raises(TypeError, match="dims=.* is a set, which has no order"):
        FlagSpec(dims={0, 1, 2, 3})
    with pytest.raises(TypeError, match="is a frozenset"):
        FlagSpec(dims=frozenset({0, 1}))
    model = _model()
    d_model, d_mlp = model.cfg.d_model, model.cfg.d_mlp
    wide = tuple(range(d_model, d_model + 4))
    with pytest.raises(
        ValueError, match=f"the width of hook='blocks.1.mlp.hook_post' .*d_mlp={d_mlp}, not a resid"
    ):
        FlagSpec("blocks.1.mlp.hook_post", dims=tuple(range(d_mlp, d_mlp + 2))).check(model)
    FlagSpec("blocks.1.mlp.hook_post", dims=wide).check(model)  # within d_mlp: an MLP hook of that width
    with pytest.raises(ValueError, match=f"entries >= d_model={d_model}, the width of the residual stream"):
        FlagSpec("blocks.1.hook_resid_pre", dims=wide).check(model)
    for hook in ("blocks.1.attn.hook_z", "blocks.0.ln1.hook_scale"):
        with pytest.raises(ValueError, match=f"hook='{hook}' is not a residual-stream hook point"):
            with steer(model, FlagSpec(hook), 1):
                pass
    # rotary and gated-MLP hooks: per-head rotated queries are refused, the gate's input has the MLP's width
    from pypattern.models import Transformer, TransformerConfig

    rot = Transformer(
        TransformerConfig(
            n_layers=1, d_model=16, n_heads=2, d_mlp=32, d_vocab=12, n_ctx=8, positional_embedding_type="rotary",
            gated_mlp=True, act_fn="silu", normalization_type="RMS",
        )
    )  # fmt: skip
    for hook in ("blocks.0.attn.hook_rot_q", "blocks.0.attn.hook_rot_k"):
        if hook in rot.hook_dict:
            with pytest.raises(ValueError, match="is not a residual-stream hook point"):
                FlagSpec(hook, dims=(0, 1, 2, 3)).check(rot)
    assert "blocks.0.attn.hook_rot_q" in rot.hook_dict
    FlagSpec("blocks.0.mlp.hook_pre_linear", dims=(20, 21, 22, 23)).check(rot)


def test_generate_and_probe_flags_refuse_non_bools():
    from pypattern.flags import probe_accuracy

    model = _model()
    x = TASK.sample(2, seed=0).tokens[:, :4]
    with pytest.raises(TypeError, match="greedy='no' is not valid; give True or False"):
        generate(model, x, 1, greedy="no")
    with pytest.raises(TypeError, match="only_shared_tokens=None is not valid; give True or False"):
        probe_accuracy(model, TASK, SPEC, num_samples=4, only_shared_tokens=None)
