"""pypattern.distributed over two gloo ranks on configurations other checks leave out (three chains on two ranks
with observables, coupled noise, cores and runs; one chain over two ranks with runs; a fingerprint that fails on
one rank only), and the synthetic tasks' generators and ``tasks.train`` checked against independent computations."""

import datetime
import itertools
import json
import os
import tempfile
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import pypattern as pp
from pypattern import distributed, io
from pypattern.tasks import algorithmic
from pypattern.tasks.parens import BOS, CLOSE, FALSE, OPEN, PROBE_CELLS, QUERY, TRUE

pytestmark = pytest.mark.usefixtures("one_thread")

KW = dict(
    num_draws=4,
    step_size=1e-3,
    localization=10.0,
    nbeta=20.0,
    seed=4,
    quiet=True,
    warn_nonstationary=False,
)


def _norm(model, batch):
    return torch.stack([p.detach().pow(2).sum() for p in model.parameters()]).sum()


def _margin(model, batch):
    return model(batch[0])[:, 1] - model(batch[0])[:, 0]


#: sampler settings whose two-rank result must be the single-process one
CONFIGS = {
    "three_chains_observables": dict(num_chains=3, observables={"norm": _norm, "margin": _margin}),
    "three_chains_coupled_noise": dict(num_chains=3, noise_coupling=2),
    "three_chains_cores": dict(num_chains=3, cores=2, batched=False),
    "one_chain_runs": dict(num_chains=1, runs=[("0.weight", None), (None, None)]),
}


def _task(meta: bool = False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 6, generator=g)
    y = (x[:, :3].sum(1) > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
    if meta:  # weights without data: they cannot be read (or hashed)
        model = model.to("meta")
    data = torch.utils.data.TensorDataset(x, y)
    return model, torch.utils.data.DataLoader(data, batch_size=16, shuffle=False)


def _summary(res) -> list:
    return [
        {"trace": r.loss_trace.tolist(), "obs": {k: v.tolist() for k, v in sorted(r.observables.items())}}
        for r in (res if isinstance(res, list) else [res])
    ]


def _worker(rank: int, world: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{folder}/init",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=30),
    )
    out = {}
    for name, config in CONFIGS.items():
        model, loader = _task()
        out[name] = _summary(distributed.sample(model, loader, **KW, **config))
    # rank 1's model has weights that cannot be read: its fingerprint fails there only; rank 0 must not wait in
    # the comparison's collectives for a rank that has left the call
    model, loader = _task(meta=rank == 1)
    start = time.monotonic()
    try:
        distributed.estimate_llc(model, loader, num_chains=3, **KW)
        out["unreadable_weights"] = ["ok", time.monotonic() - start]
    except Exception as e:  # noqa: BLE001 - recorded for the test
        out["unreadable_weights"] = [f"{type(e).__name__}: {e}", time.monotonic() - start]
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    flag = os.path.join(folder, "rank0.json")
    deadline = time.monotonic() + 10.0
    while rank == 1 and not os.path.exists(flag) and time.monotonic() < deadline:
        time.sleep(0.05)  # rank 1 stays until rank 0 has its outcome (or a hang is evident)
    os._exit(0)  # gloo's teardown at exit aborts now and then; the results are written


def test_two_ranks_equal_one_process_and_a_failure_on_one_rank_stops_both():
    single = {}
    for name, config in CONFIGS.items():
        model, loader = _task()
        single[name] = _summary(pp.sample(model, loader, **KW, **config))
    single = json.loads(json.dumps(single))
    with tempfile.TemporaryDirectory() as folder:
        ctx = mp.spawn(_worker, args=(2, folder), nprocs=2, join=False)
        deadline = time.monotonic() + 120.0
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail("the two ranks did not finish in time")
        outs = [json.load(open(os.path.join(folder, f"rank{r}.json"))) for r in range(2)]
    for name in CONFIGS:
        for o in outs:  # bit for bit: each chain's rows come from the one rank that ran it
            assert o[name] == single[name], name
    # the observables were recorded on every chain (not zero-filled for the chains of the other rank)
    obs = np.array(single["three_chains_observables"][0]["obs"]["norm"])
    assert obs.shape == (3, 4) and (obs > 0).all()
    assert len(single["one_chain_runs"]) == 2
    message, seconds = outs[1]["unreadable_weights"]
    assert message.startswith("NotImplementedError") and "meta" in message
    message, seconds = outs[0]["unreadable_weights"]
    assert message == "RuntimeError: rank 1 failed (see its error); this rank stops too"
    assert seconds < 5.0  # raised at once, not when rank 1 left or the group's timeout ran out


# ------------------------------------------------------------------------------------------------ the tasks


def _depths(bits):
    depth, least = 0, 0
    for c in bits:
        depth += 1 if c == OPEN else -1
        least = min(least, depth)
    return depth, least


@pytest.mark.parametrize(
    "kw",
    [
        dict(d_vocab=3, seq_len=5),
        dict(d_vocab=5, seq_len=9, repeat_len=4, min_distance=2),  # overlapping copies
        dict(d_vocab=9, seq_len=20, repeat_len=3, min_distance=5),
    ],
)
def test_induction_samples_copy_a_segment_and_flag_its_predictable_tokens(kw):
    task = pp.InductionTask(**kw)
    batch = task.sample(200, seed=1)
    assert torch.equal(batch.tokens, task.sample(200, seed=1).tokens)
    assert not torch.equal(batch.tokens, task.sample(200, seed=2).tokens)
    T, k = task.n_ctx, task.repeat_len
    least = k if task.min_distance is None else task.min_distance
    distances = set()
    for s in range(len(batch)):
        tok = batch.tokens[s].tolist()
        src, dst = int(batch.extra["source_start"][s]), int(batch.extra["dest_start"][s])
        assert tok[0] == task.bos and task.bos not in tok[1:] and len(tok) == T
        distances.add(dst - src)
        assert dst + k - 1 <= T - 1
        assert all(
            tok[dst + q] == tok[src + q] for q in range(k)
        )  # token by token (periodic when overlapping)
        flag = [dst <= p <= dst + k - 2 for p in range(T)]
        assert batch.extra["induction_flag"][s].tolist() == flag
        assert batch.targets[s].tolist() == tok[1:] + [pp.tasks.IGNORE]
    assert distances == set(range(least, T - k))  # every distance that fits, and no other


def test_induction_and_task_edge_values_are_refused_by_name():
    for call, name in [
        (lambda: pp.InductionTask(d_vocab=2), "d_vocab=2"),
        (lambda: pp.InductionTask(seq_len=4), "seq_len=4"),
        (lambda: pp.InductionTask(seq_len=9, repeat_len=5), "repeat_len=5"),
        (lambda: pp.InductionTask(seq_len=9, repeat_len=3, min_distance=6), "min_distance=6"),
        (lambda: pp.ParenthesesTask(length=5), "length=5"),
        (lambda: pp.ParenthesesTask(p_balanced=float("nan")), "p_balanced=nan"),
        (lambda: pp.IOITask(n_names=1), "n_names=1"),
        (lambda: pp.TopicTask(seq_len=4), "seq_len=4"),
        (lambda: pp.InductionTask().sample(3, seed=1.5), "seed=1.5"),
    ]:
        with pytest.raises(ValueError, match=name.replace("[", r"\[")):
            call()


def test_parentheses_labels_and_probe_cells_by_counting_depths():
    task = pp.ParenthesesTask(length=6, p_balanced=0.3)
    batch = task.sample(300, seed=2)
    for s in range(len(batch)):
        tok = batch.tokens[s].tolist()
        assert tok[0] == BOS and tok[-1] == QUERY
        depth, least = _depths(tok[1:-1])
        balanced = depth == 0 and least >= 0
        assert balanced or depth != 0  # training never shows equal counts with a negative prefix
        assert bool(batch.extra["label"][s]) == balanced
        assert batch.targets[s, -1] == (TRUE if balanced else FALSE)
    probes = task.probes()
    expected = [
        b for b in itertools.product([OPEN, CLOSE], repeat=6) if _depths(b)[0] == 0 and _depths(b)[1] < 0
    ]
    assert sorted(map(tuple, probes.tokens[:, 1:-1].tolist())) == sorted(expected)
    for s in range(len(probes)):
        bits = probes.tokens[s, 1:-1].tolist()
        cell = ("open_first" if bits[0] == OPEN else "close_first") + (
            "_close_last" if bits[-1] == CLOSE else "_open_last"
        )
        assert PROBE_CELLS[int(probes.extra["cell"][s])] == cell


def test_ioi_answers_and_abc_corruption_by_reading_the_prompts():
    task = pp.IOITask(n_names=4, n_fillers=3)
    batch = task.sample(200, seed=3)
    for s in range(len(batch)):
        tok = batch.tokens[s].tolist()
        a, b, subject = tok[1], tok[3], tok[6]
        assert a != b and subject in (a, b)
        answer = b if subject == a else a
        assert int(batch.extra["answer"][s]) == answer and batch.targets[s, -1] == answer
        assert tok[int(batch.extra["subject_pos"][s])] == subject
        assert tok[int(batch.extra["name_pos"][s])] == answer
    clean, corrupted, answer, wrong = task.patching_pairs(200, seed=5, corruption="abc")
    for s in range(len(clean)):
        c, r = clean[s].tolist(), corrupted[s].tolist()
        first = 1 if c[1] == int(wrong[s]) else 3
        assert [p for p in range(7) if c[p] != r[p]] == [first]
        assert r[first] not in (c[1], c[3]) and 0 <= r[first] < task.n_names


def test_topics_concepts_by_walking_each_sequence():
    task = pp.TopicTask(
        num_topics=3, tokens_per_topic=4, num_shared=2, seq_len=10, shared_prob=0.3, switch_prob=0.5
    )
    batch = task.sample(200, seed=4)
    for s in range(len(batch)):
        tok = batch.tokens[s].tolist()
        switch = int(batch.extra["switch_pos"][s])
        first, after = int(batch.extra["concept"][s]), int(batch.extra["next_concept"][s])
        assert (switch == 10 and first == after) or (first != after and 3 <= switch <= 8)
        topic = [first if p < switch else after for p in range(10)]
        last, readable = -1, []
        for p, x in enumerate(tok):
            if p and x < 12:
                assert x // 4 == topic[p]
            last = x // 4 if x < 12 else last
            readable.append(last)
        assert batch.extra["concept_pos"][s].tolist() == readable
        assert batch.extra["target_concept"][s].tolist() == topic[1:] + topic[-1:]


def _naive_routine(name, v):
    n = len(v)
    return {
        "sort": lambda: sorted(v),
        "diff_next": lambda: [(v[(i + 1) % n] - v[i]) % 11 for i in range(n)],
        "sum_next": lambda: [(v[(i + 1) % n] + v[i]) % 11 for i in range(n)],
        "add_index": lambda: [(v[i] + i) % 11 for i in range(n)],
        "count_smaller": lambda: [sum(w < v[i] for w in v) for i in range(n)],
        "interleave_reverse": lambda: [v[j] for p in zip(range(5), range(9, 4, -1)) for j in p],
        "negate_odd": lambda: [v[i] if i % 2 == 0 else (11 - v[i]) % 11 for i in range(n)],
    }[name]()


@pytest.mark.parametrize("routine", sorted(algorithmic.ROUTINES))
def test_routine_task_targets_by_naive_loops(routine):
    batch = algorithmic.RoutineTask(routine).sample(40, seed=1)
    for s in range(len(batch)):
        x = batch.extra["x"][s].tolist()
        y = _naive_routine(routine, x)
        assert batch.extra["y"][s].tolist() == y
        assert batch.tokens[s].tolist() == x + [algorithmic.QUERY] * 10
        assert batch.targets[s].tolist() == [pp.tasks.IGNORE] * 10 + y


# ------------------------------------------------------------------------------------------------ training

TASK = pp.InductionTask(d_vocab=12, seq_len=13)


def _model():
    return pp.Transformer(TASK.model_config(d_model=16, n_heads=2, seed=0))


def test_train_refuses_num_samples_that_disagree_with_the_data_given():
    data = TASK.sample(20, seed=7)
    with pytest.raises(ValueError, match="num_samples=30 is not valid with data of 20 samples"):
        pp.tasks.train(_model(), TASK, steps=2, data=data, num_samples=30, quiet=True)
    # the data's own length is the same call as data alone
    a, b = _model(), _model()
    ra = pp.tasks.train(a, TASK, steps=3, data=data, num_samples=20, log_every=1, quiet=True)
    rb = pp.tasks.train(b, TASK, steps=3, data=data, log_every=1, quiet=True)
    assert ra.losses == rb.losses
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def _weights_at(step):
    return torch.linspace(0.5, 2.0 + 0.01 * step, 30)


class _Stop(Exception):
    pass


def _stop_at(k):
    def callback(step, model):
        if step == k:
            raise _Stop

    return callback


def test_train_resumes_online_reweighting_with_weight_decay_exactly(tmp_path):
    kw = dict(
        steps=10,
        seed=2,
        log_every=3,
        quiet=True,
        num_samples=30,
        sample_weights=_weights_at,
        weight_decay=0.01,
    )
    straight = _model()
    ref = pp.tasks.train(straight, TASK, **kw)
    path = tmp_path / "run.npz"
    with pytest.raises(_Stop):
        pp.tasks.train(_model(), TASK, checkpoint=path, callback=_stop_at(4), **kw)
    model = _model()
    res = pp.tasks.train(model, TASK, checkpoint=path, **kw)
    assert res.steps == [0, 3, 6, 9] and res.losses == ref.losses
    assert all(torch.equal(x, y) for x, y in zip(model.state_dict().values(), straight.state_dict().values()))
    with pytest.raises(io.FingerprintMismatch) as e:
        pp.tasks.train(_model(), TASK, checkpoint=path, **{**kw, "weight_decay": 0.02})
    assert e.value.item == "weight_decay"

    def other_weights(step):
        return torch.linspace(0.5, 2.0 + 0.02 * step, 30)

    with pytest.raises(io.FingerprintMismatch) as e:
        pp.tasks.train(_model(), TASK, checkpoint=path, **{**kw, "sample_weights": other_weights})
    assert e.value.item == "sample_weights"


def test_train_loss_decreases_on_parentheses():
    task = pp.ParenthesesTask(length=6)
    model = pp.Transformer(task.model_config(d_model=16, n_heads=2, d_mlp=32, seed=0))
    res = pp.tasks.train(model, task, steps=60, batch_size=32, log_every=1, quiet=True)
    assert np.mean(res.losses[-5:]) < 0.6 * np.mean(res.losses[:5])
    assert task.accuracy(model, task.sample(200, seed=9)) > 0.8
