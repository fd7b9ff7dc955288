"""The synthetic tasks' samples against plain-loop definitions, seeds, edge sizes and the caller's generators."""

import dataclasses
import math

import pytest
import torch

from pypattern.experiments.induction import GroupWeightedInduction, run_induction_seed, token_groups
from pypattern.experiments.parens import GroupWeightedParentheses
from pypattern.experiments.patterning_demo import quick_settings
from pypattern.tasks import IGNORE, InductionTask, IOITask, ParenthesesTask, TopicTask
from pypattern.tasks.algorithmic import ROUTINES, RoutineTask


def _tasks():
    out = {
        "induction": InductionTask(),
        "induction_small": InductionTask(d_vocab=3, seq_len=5),
        "induction_close": InductionTask(d_vocab=8, seq_len=13, repeat_len=5, min_distance=2),
        "ioi": IOITask(),
        "ioi_min": IOITask(n_names=2, n_fillers=1),
        "parens": ParenthesesTask(),
        "parens_4": ParenthesesTask(length=4),
        "topics": TopicTask(switch_prob=0.5),
        "induction_grouped": GroupWeightedInduction(16, 13),
        "parens_grouped": GroupWeightedParentheses(6),
    }
    out.update({f"routine_{r}": RoutineTask(r) for r in ROUTINES})
    return out


TASKS = _tasks()


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_is_keyed_by_its_seed_sized_and_leaves_the_global_generator(name):
    task = TASKS[name]
    state = torch.get_rng_state()
    a, b, c = task.sample(32, seed=5), task.sample(32, seed=5), task.sample(32, seed=6)
    assert torch.equal(torch.get_rng_state(), state)  # a seeded draw leaves the caller's generator alone
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.targets, b.targets)
    assert all(torch.equal(a.extra[k], b.extra[k]) for k in a.extra)
    assert not torch.equal(a.tokens, c.tokens)
    for n in (0, 1, 3):
        batch = task.sample(n, seed=1)
        assert batch.tokens.shape == batch.targets.shape == (n, task.n_ctx)
        assert batch.tokens.dtype == batch.targets.dtype == torch.long
        assert all(v.shape[0] == n for v in batch.extra.values())
        if n:
            assert 0 <= int(batch.tokens.min()) and int(batch.tokens.max()) < task.d_vocab
            scored = batch.targets[batch.targets != IGNORE]
            assert scored.numel() and 0 <= int(scored.min()) and int(scored.max()) < task.d_vocab


@pytest.mark.parametrize("name", ["induction", "induction_small", "induction_close", "induction_grouped"])
def test_induction_copies_flags_and_groups_by_loops(name):
    task = TASKS[name]
    batch = task.sample(64, seed=3)
    k = task.repeat_len
    groups = token_groups(batch)
    for row in range(len(batch)):
        tok = batch.tokens[row].tolist()
        src, dst = int(batch.extra["source_start"][row]), int(batch.extra["dest_start"][row])
        assert tok[0] == task.d_vocab - 1 and task.d_vocab - 1 not in tok[1:]
        assert dst - src >= (task.min_distance or k) and dst + k <= task.n_ctx
        for t in range(k):  # the second copy repeats the first, token by token
            assert tok[dst + t] == tok[src + t]
        for p in range(task.n_ctx):
            want_target = tok[p + 1] if p + 1 < task.n_ctx else IGNORE
            assert int(batch.targets[row, p]) == want_target
            flagged = dst <= p <= dst + k - 2  # in the second copy, with its next token in it too
            assert bool(batch.extra["induction_flag"][row, p]) == flagged
            in_first = src <= p and p + 1 <= src + k - 1
            assert int(groups[row, p]) == (0 if flagged else 1 if in_first else 2)


def test_token_groups_of_no_samples_and_a_grouped_task_drawing_none():
    empty = InductionTask().sample(0, seed=0)
    assert token_groups(empty).shape == (0, 33)
    batch = GroupWeightedInduction(16, 13, group_weights=[2.0, 1.0, 1.0]).sample(0, seed=0)
    assert batch.extra["token_group"].shape == (0, 13)


@pytest.mark.parametrize("name", ["ioi", "ioi_min"])
def test_ioi_answer_is_the_name_that_is_not_the_final_subject(name):
    task = TASKS[name]
    batch = task.sample(200, seed=2)
    for i, row in enumerate(batch.tokens.tolist()):
        a, b, s = row[1], row[3], row[6]
        assert a != b and a < task.n_names and b < task.n_names and s in (a, b)
        assert all(task.n_names <= row[p] < task.n_names + task.n_fillers for p in (2, 4, 5))
        answer = b if s == a else a
        assert int(batch.targets[i, 6]) == answer == int(batch.extra["answer"][i])
        assert int(batch.extra["wrong"][i]) == s
        assert row[int(batch.extra["name_pos"][i])] == answer and row[int(batch.extra["subject_pos"][i])] == s
        assert (batch.targets[i, :6] == IGNORE).all()


@pytest.mark.parametrize("length", [4, 6, 12])
def test_parentheses_labels_by_a_depth_counter(length):
    task = ParenthesesTask(length=length)
    for batch, balanced_kind in ((task.sample(300, seed=4), None), (task.probes(), False)):
        for i, row in enumerate(batch.tokens.tolist()):
            depth, lowest = 0, 0
            for t in row[1:-1]:
                depth += 1 if t == 0 else -1
                lowest = min(lowest, depth)
            balanced = depth == 0 and lowest >= 0
            assert bool(batch.extra["label"][i]) == balanced
            assert int(batch.targets[i, -1]) == (5 if balanced else 4)  # TRUE / FALSE
            if balanced_kind is False:  # probes: equal counts, a negative prefix
                assert depth == 0 and lowest < 0


def test_patterned_runs_follow_a_baseline_whose_onset_came_before_the_checkpoint():
    # an onset threshold every evaluation meets: the baseline's onset is the first evaluation, before the checkpoint
    _, ind, _, _ = quick_settings()
    s = dataclasses.replace(ind, threshold=100.0, checkpoint_step=60, max_steps=80, stop_after_onset=0)
    res = run_induction_seed(0, s)
    first_eval = s.eval_every
    for name in ("baseline", "accelerate", "delay"):
        run = res["runs"][name]
        assert run["onset"] == first_eval and math.isfinite(run["onset"])
        assert run["curve"][:, 0].max() >= s.checkpoint_step  # trained from the checkpoint on, not refused
