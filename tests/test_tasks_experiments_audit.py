"""The synthetic tasks against their definitions checked token by token, their seeds (same samples in another
process, global generators untouched), the patching pairs, a resumed training run, and the demos' arguments."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from pypattern.experiments import llc_demo, patching_demo
from pypattern.tasks import (
    IGNORE,
    InductionTask,
    IOITask,
    ParenthesesTask,
    TopicTask,
    induction_probe,
    repeated_tokens,
    train,
)

OPEN, CLOSE, BOS_P, QUERY_P, FALSE_P, TRUE_P = range(6)


# ------------------------------------------------------------------------------------------ definitions, by loops


@pytest.mark.parametrize(
    "kw",
    [
        dict(d_vocab=3, seq_len=5),
        dict(d_vocab=4, seq_len=7, repeat_len=3),
        dict(d_vocab=5, seq_len=9, repeat_len=4, min_distance=2),
        dict(d_vocab=64, seq_len=33),
    ],
)
def test_induction_samples_repeat_a_segment_and_flag_its_predictable_tokens(kw):
    task = InductionTask(**kw)
    T, k, bos = task.n_ctx, task.repeat_len, kw["d_vocab"] - 1
    least = k if task.min_distance is None else task.min_distance
    for seed in range(12):
        for n in (1, 5):
            b = task.sample(n, seed=seed)
            assert b.tokens.shape == (n, T)
            for r in range(n):
                tok = b.tokens[r].tolist()
                src, dst = int(b.extra["source_start"][r]), int(b.extra["dest_start"][r])
                assert tok[0] == bos and bos not in tok[1:]
                assert all(0 <= t < bos for t in tok[1:])
                assert least <= dst - src <= T - 1 - k and src >= 1 and dst + k - 1 <= T - 1
                for t in range(k):
                    assert tok[dst + t] == tok[src + t]
                want_flag = [dst <= p <= dst + k - 2 for p in range(T)]
                assert b.extra["induction_flag"][r].tolist() == want_flag
                tgt = b.targets[r].tolist()
                assert tgt[-1] == IGNORE and all(tgt[p] == tok[p + 1] for p in range(T - 1))
                for p in range(T):  # a flagged position's next token follows its earlier occurrence
                    if want_flag[p]:
                        assert tok[p - (dst - src)] == tok[p] and tok[p + 1 - (dst - src)] == tok[p + 1]


def test_repeated_tokens_and_probe_prompts_by_loops():
    for seed in range(8):
        x = repeated_tokens(6, 5, 3, seed=seed)
        for row in x.tolist():
            assert row[0] == 5 and row[1:6] == row[6:] and len(set(row[1:6])) == 5 and 5 not in row[1:]
        tokens, dest, src, prev = induction_probe(4, 5, half_len=8, num_samples=3, seed=seed)
        for r in range(3):
            tok = tokens[r].tolist()
            assert tok[0] == 3
            for d, s, p in zip(dest[r].tolist(), src[r].tolist(), prev[r].tolist()):
                earlier = [q for q in range(1, d) if tok[q] == tok[d]]
                assert earlier == [s - 1] and p == d - 1


@pytest.mark.parametrize("n_names,n_fillers", [(2, 1), (3, 2), (8, 8)])
def test_ioi_samples_name_the_indirect_object_and_the_subject(n_names, n_fillers):
    task = IOITask(n_names, n_fillers)
    for seed in range(10):
        b = task.sample(6, seed=seed)
        for r in range(6):
            tok = b.tokens[r].tolist()
            a, f0, bb, f1, f2, s = tok[1:]
            assert tok[0] == n_names + n_fillers and a != bb and a < n_names and bb < n_names
            assert all(n_names <= f < n_names + n_fillers for f in (f0, f1, f2))
            assert s in (a, bb)
            io = bb if s == a else a
            assert int(b.extra["answer"][r]) == io == b.targets[r, -1] and int(b.extra["wrong"][r]) == s
            assert tok[int(b.extra["subject_pos"][r])] == s and tok[int(b.extra["name_pos"][r])] == io
            assert b.targets[r, :-1].tolist() == [IGNORE] * 6


def test_parentheses_labels_by_a_counter_and_probe_cells():
    for length in (4, 6, 10):
        task = ParenthesesTask(length)
        for seed in range(4):
            b = task.sample(40, seed=seed)
            for r in range(40):
                tok = b.tokens[r].tolist()
                assert tok[0] == BOS_P and tok[-1] == QUERY_P and len(tok) == length + 2
                depth, lowest = 0, 0
                for t in tok[1:-1]:
                    depth += 1 if t == OPEN else -1
                    lowest = min(lowest, depth)
                balanced = depth == 0 and lowest >= 0
                assert bool(b.extra["label"][r]) == balanced
                assert depth != 0 or balanced  # training shows balanced or unequal counts only
                assert int(b.targets[r, -1]) == (TRUE_P if balanced else FALSE_P)
        p = task.probes()
        for r in range(len(p)):
            s = p.tokens[r, 1:-1].tolist()
            prefix = np.cumsum([1 if t == OPEN else -1 for t in s])
            assert prefix[-1] == 0 and prefix.min() < 0 and int(p.targets[r, -1]) == FALSE_P
            assert int(p.extra["cell"][r]) == 2 * (s[0] == CLOSE) + (s[-1] == OPEN)


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(num_topics=3, tokens_per_topic=1, num_shared=0, shared_prob=0.0, seq_len=4, min_prefix=1),
        dict(num_topics=2, tokens_per_topic=3, num_shared=2, seq_len=9, switch_prob=1.0, min_prefix=3),
    ],
)
def test_topic_tokens_and_concepts_by_loops(kw):
    task = TopicTask(**kw)
    K, T = task.tokens_per_topic, task.n_ctx
    for seed in range(6):
        b = task.sample(5, seed=seed)
        for r in range(5):
            tok = b.tokens[r].tolist()
            c0, c1 = int(b.extra["concept"][r]), int(b.extra["next_concept"][r])
            sp = int(b.extra["switch_pos"][r])
            assert tok[0] == task.d_vocab - 1
            if sp < T:
                assert task.min_prefix + 1 <= sp <= T - 2 and c1 != c0
            else:
                assert c1 == c0
            last = -1
            for p in range(T):
                t = tok[p]
                topic = c1 if p >= sp else c0
                if p > 0:
                    assert (
                        t // K == topic
                        if t < task.shared_start
                        else task.shared_start <= t < task.d_vocab - 1
                    )
                    if t < task.shared_start:
                        last = t // K
                assert int(b.extra["concept_pos"][r, p]) == last
                nxt = c1 if min(p + 1, T - 1) >= sp else c0
                assert int(b.extra["target_concept"][r, p]) == nxt


# ------------------------------------------------------------------------------------------ seeds

_DRAW = """
import hashlib, json, torch
from pypattern.tasks import InductionTask, IOITask, ParenthesesTask, TopicTask, induction_probe, repeated_tokens
from pypattern.tasks.algorithmic import RoutineTask
def h(*ts):
    m = hashlib.sha256()
    for t in ts:
        m.update(t.contiguous().numpy().tobytes())
    return m.hexdigest()
out = {
    "induction": h(InductionTask(min_distance=2).sample(7, seed=11).tokens),
    "ioi": h(*IOITask().patching_pairs(7, seed=11, corruption="abc")),
    "parens": h(ParenthesesTask(8).sample(7, seed=11).tokens),
    "topics": h(TopicTask(switch_prob=0.5).sample(7, seed=11).tokens),
    "routine": h(RoutineTask("sort").sample(7, seed=11).tokens),
    "repeated": h(repeated_tokens(16, 5, 7, seed=11)),
    "probe": h(*induction_probe(16, 20, 4, 7, seed=11)),
}
print(json.dumps(out))
"""


def test_samplers_draw_the_same_samples_in_another_process_and_leave_global_generators_alone():
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    py, npy, th = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone()
    ns: dict = {}
    exec(_DRAW.replace("print(json.dumps(out))", ""), ns)
    here = ns["out"]
    # the same call twice gives the same samples
    exec(_DRAW.replace("print(json.dumps(out))", ""), ns)
    assert ns["out"] == here
    assert random.getstate() == py and np.array_equal(np.random.get_state()[1], npy)
    assert torch.equal(torch.get_rng_state(), th)
    r = subprocess.run([sys.executable, "-c", _DRAW], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == here
    # a different seed draws different samples
    other = hashlib.sha256(
        InductionTask(min_distance=2).sample(7, seed=12).tokens.numpy().tobytes()
    ).hexdigest()
    assert other != here["induction"]


def test_patching_pairs_differ_exactly_where_documented():
    task = IOITask(n_names=3, n_fillers=2)
    for seed in range(6):
        clean, corr, ans, wrong = task.patching_pairs(20, seed=seed, corruption="subject")
        diff = (clean != corr).nonzero().tolist()
        assert diff == [[r, 6] for r in range(20)]
        assert torch.equal(corr[:, -1], ans) and torch.equal(clean[:, -1], wrong)
        clean, corr, ans, wrong = task.patching_pairs(20, seed=seed, corruption="abc")
        for r in range(20):
            c, k = clean[r].tolist(), corr[r].tolist()
            first = c.index(int(wrong[r]))  # the earlier mention of the subject
            assert first in (1, 3)
            assert [p for p in range(7) if c[p] != k[p]] == [first]
            assert k[first] not in (int(ans[r]), int(wrong[r])) and 0 <= k[first] < 3
            assert len(set(k[1:4:2])) == 2 and k[6] == int(wrong[r])


# ------------------------------------------------------------------------------------------ training


def test_train_refuses_a_seed_of_none_naming_it_and_leaves_the_global_generator():
    from pypattern.models.transformer import Transformer

    task = ParenthesesTask(4)
    model = Transformer(task.model_config(d_model=8, n_heads=2, d_mlp=8, seed=0))
    torch.manual_seed(3)
    state = torch.get_rng_state().clone()
    with pytest.raises(ValueError, match="seed=None"):
        train(model, task, steps=1, seed=None, quiet=True)
    assert torch.equal(torch.get_rng_state(), state)


def test_train_resumed_from_a_checkpoint_ends_with_the_uninterrupted_weights(tmp_path):
    from pypattern.models.transformer import Transformer

    task = IOITask(n_names=4, n_fillers=2)

    def model():
        return Transformer(task.model_config(d_model=16, n_heads=2, d_mlp=16, seed=1))

    kw = dict(steps=6, batch_size=4, num_samples=16, sample_weights=torch.arange(1.0, 17.0), log_every=1)
    ref = model()
    res_ref = train(ref, task, quiet=True, **kw)

    class Stop(Exception):
        pass

    def stop(step, m):
        if step == 2:
            raise Stop

    ck = tmp_path / "run.npz"
    with pytest.raises(Stop):
        train(model(), task, checkpoint=ck, callback=stop, quiet=True, **kw)
    resumed = model()
    res = train(resumed, task, checkpoint=ck, quiet=True, **kw)
    for (name, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert res.losses == res_ref.losses and res.steps == res_ref.steps == list(range(6))


# ------------------------------------------------------------------------------------------ demos


@pytest.mark.parametrize(
    "run,kw,name",
    [
        (patching_demo.run_patch_demo, dict(seed=2**64 - 1), "seed=18446744073709551615"),
        (patching_demo.run_patch_demo, dict(seed=-1), "seed=-1"),
        (patching_demo.run_patch_demo, dict(num_prompts=0), "num_prompts=0"),
        (llc_demo.run_llc_demo, dict(seed=-1), "seed=-1"),
        (llc_demo.run_llc_demo, dict(train_steps=-1), "train_steps=-1"),
    ],
)
def test_demo_arguments_are_refused_naming_them_before_any_work(run, kw, name, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=name):
        run(out, **kw)
    assert not out.exists()


@pytest.mark.parametrize("module", [llc_demo, patching_demo])
def test_demo_scripts_refuse_a_seed_outside_the_commands_range_as_a_usage_error(module, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        module.main([str(tmp_path / "out"), "--quick", "--seed", "-1"])
    assert e.value.code == 2 and "--seed" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_llc_demo_leaves_numpy_and_python_generators_alone(tmp_path):
    random.seed(9)
    np.random.seed(9)
    py, npy = random.getstate(), np.random.get_state()[1].copy()
    s = llc_demo.run_llc_demo(tmp_path, seed=1, quiet=True, **dict(llc_demo.QUICK, num_chains=2))
    assert random.getstate() == py and np.array_equal(np.random.get_state()[1], npy)
    for key in ("plot", "result", "summary"):
        assert (tmp_path / s[key].rsplit("/", 1)[-1]).is_file()


_TINY_CHI = dict(chi_num_draws=4, chi_num_burnin_steps=2)


@pytest.mark.parametrize(
    "kw,name",
    [
        (dict(eval_every=0), "eval_every=0"),
        (dict(checkpoint_step=10, max_steps=5), "max_steps=5"),
        (dict(stop_after_onset=-1), "stop_after_onset=-1"),
    ],
)
def test_induction_experiment_settings_are_refused_naming_them_before_training(kw, name, monkeypatch):
    from pypattern.experiments import induction

    monkeypatch.setattr(induction, "train", lambda *a, **k: pytest.fail("trained before refusing"))
    s = induction.InductionSettings(
        **dict(dict(checkpoint_step=2, max_steps=6, num_eval=8, probe_size=2, seq_len=9, d_vocab=8), **kw),
        **_TINY_CHI,
    )
    with pytest.raises(ValueError, match=f"InductionSettings.{name}"):
        induction.run_induction_seed(0, s)


@pytest.mark.parametrize(
    "kw,name",
    [
        (dict(checkpoint_step=10, steps=5), "steps=5"),
        (dict(targets=("balanced", "nope")), "targets="),
        (dict(checkpoint_step=-1), "checkpoint_step=-1"),
    ],
)
def test_parens_experiment_settings_are_refused_naming_them_before_training(kw, name, monkeypatch):
    from pypattern.experiments import parens

    monkeypatch.setattr(parens, "train", lambda *a, **k: pytest.fail("trained before refusing"))
    s = parens.ParensSettings(**dict(dict(checkpoint_step=2, steps=4, probe_train_size=8), **kw), **_TINY_CHI)
    with pytest.raises(ValueError, match=f"ParensSettings.{name}"):
        parens.run_parens_seed(0, s)
