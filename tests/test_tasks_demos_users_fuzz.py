"""The synthetic tasks against independent re-implementations of their documented definitions (labels, scored
positions, templates), their seeds and argument checks, training stopped by a real signal and resumed bit for bit,
and the built-in commands' warnings and output folders."""

import itertools
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

import pypattern as pp
from pypattern import cli
from pypattern.tasks import IGNORE, algorithmic
from pypattern.tasks.parens import BOS, CLOSE, FALSE, OPEN, PROBE_CELLS, QUERY, TRUE

pytestmark = pytest.mark.usefixtures("one_thread")

SEEDS = (0, 1, 7, 12345, 2**40 + 3)


# ---------------------------------------------------------------------------------------------------------------
# induction
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "d_vocab,seq_len,repeat_len", [(3, 5, None), (16, 13, None), (64, 33, 5), (10, 9, 4)]
)
def test_induction_copies_flags_and_targets_follow_the_definition(d_vocab, seq_len, repeat_len):
    task = pp.InductionTask(d_vocab=d_vocab, seq_len=seq_len, repeat_len=repeat_len)
    k, T = task.repeat_len, seq_len
    assert k == (repeat_len if repeat_len is not None else max(2, (seq_len - 1) // 3))
    distances, starts = set(), set()
    for seed in SEEDS:
        b = task.sample(50, seed=seed)
        assert b.tokens.shape == b.targets.shape == (50, T)
        for row in range(50):
            tok = b.tokens[row].tolist()
            s, d = int(b.extra["source_start"][row]), int(b.extra["dest_start"][row])
            assert tok[0] == d_vocab - 1 and all(0 <= t < d_vocab - 1 for t in tok[1:])  # BOS only first
            assert 1 <= s and s + k <= d and d + k <= T  # two whole copies after BOS, not overlapping
            assert tok[s : s + k] == tok[d : d + k]
            distances.add(d - s)
            starts.add(s)
            want_flag = [d <= p <= d + k - 2 for p in range(T)]  # the copy's tokens but its last
            assert b.extra["induction_flag"][row].tolist() == want_flag
            assert b.targets[row].tolist() == tok[1:] + [IGNORE]  # next token everywhere, none after the last
    # the distance takes every value that fits (no fixed-offset shortcut), the source every start
    assert distances == set(range(k, T - k))
    assert starts <= set(range(1, T - 2 * k + 1))
    big = task.sample(
        4000, seed=0
    ).extra  # the largest start needs the shortest distance: rare, so many draws
    assert set((big["dest_start"] - big["source_start"]).tolist()) == set(range(k, T - k))
    assert set(big["source_start"].tolist()) == set(range(1, T - 2 * k + 1))


def test_induction_probe_places_both_copies_and_points_at_the_documented_positions():
    for d_vocab, n_ctx, half in ((64, 33, 8), (12, 13, 8), (16, 13, 8), (7, 40, 3), (4, 5, 2), (64, 17, 8)):
        tokens, dest, src, prev = pp.tasks.induction_probe(d_vocab, n_ctx, half, num_samples=40, seed=3)
        assert tokens.shape[1] <= n_ctx and (tokens[:, 0] == d_vocab - 1).all()
        # the distance between the copies varies (no fixed-distance head scores) and the source is never the
        # destination itself
        assert len(set((dest - src)[:, 0].tolist())) >= 2 and (src < dest).all()
        for row in range(40):
            tok = tokens[row].tolist()
            assert (
                len(set(tok[1:])) == len(tok) - 1 - dest.shape[1]
            )  # distinct apart from the repeated segment
            for dp, sp, pp_ in zip(dest[row].tolist(), src[row].tolist(), prev[row].tolist()):
                earlier = tok.index(tok[dp])  # the first occurrence of the destination's token
                assert earlier < dp and sp == earlier + 1 and pp_ == dp - 1


def test_a_fixed_distance_head_is_no_prefix_matching_head_on_a_short_context():
    """On the README's induction model (d_vocab 16, 13 positions) the default probe (half_len 8) still varies the
    distance between the copies: a head attending a fixed number of positions back scores well below 1, while a
    head attending to the token after the earlier occurrence scores 1."""
    task = pp.InductionTask(d_vocab=16, seq_len=13)
    model = pp.Transformer(task.model_config(d_model=16, n_heads=2, seed=0))
    tokens, dest, src, _ = pp.tasks.induction_probe(16, 13, 8, 32, seed=0)

    def attend(key_of):  # head 1 of layer 1 attends from every query to key_of(query) only
        def fn(pattern, hook):
            new = pattern.clone()
            new[:, 1] = 0
            q = torch.arange(pattern.shape[-1])
            new[:, 1, q, key_of(q)] = 1.0
            return new

        return fn

    for back in range(1, 8):
        with model.hooks([("blocks.1.attn.hook_pattern", attend(lambda q, b=back: (q - b).clamp_min(0)))]):
            score = float(pp.prefix_matching_score(model)[1, 1])
        share = float(((dest - src) == back).float().mean())  # the probes whose distance is this one
        assert score == pytest.approx(share, abs=1e-6) and score < 0.5
    key = torch.arange(13)
    key[dest[0]] = src[0]  # the first prompt's sources, for a check of the other pole
    with model.hooks([("blocks.1.attn.hook_pattern", attend(lambda q: key[q]))]):
        score = float(pp.prefix_matching_score(model, num_samples=1)[1, 1])
    assert score == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------------------------
# IOI-like
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_names,n_fillers", [(2, 1), (3, 2), (8, 8)])
def test_ioi_template_answer_and_wrong_tokens(n_names, n_fillers):
    task = pp.IOITask(n_names=n_names, n_fillers=n_fillers)
    bos = n_names + n_fillers
    assert task.d_vocab == bos + 1 and task.n_ctx == 7
    for seed in SEEDS:
        b = task.sample(40, seed=seed)
        for row in range(40):
            bos_, a, f1, bb, f2, f3, s = b.tokens[row].tolist()
            assert bos_ == bos and a != bb and 0 <= a < n_names and 0 <= bb < n_names
            assert all(n_names <= f < bos for f in (f1, f2, f3)) and s in (a, bb)
            io = bb if s == a else a  # the name not repeated
            assert int(b.extra["answer"][row]) == io and int(b.extra["wrong"][row]) == s
            assert int(b.extra["subject_pos"][row]) == (1 if s == a else 3)
            assert b.tokens[row, int(b.extra["name_pos"][row])] == io
            assert b.targets[row].tolist() == [IGNORE] * 6 + [io]
        clean, corr, ans, wrong = task.patching_pairs(40, seed=seed, corruption="subject")
        assert torch.equal(clean, b.tokens)
        assert torch.equal(corr[:, :6], clean[:, :6]) and torch.equal(corr[:, 6], ans)  # the answer flips
        if n_names >= 3:
            clean, corr, ans, wrong = task.patching_pairs(40, seed=seed, corruption="abc")
            for row in range(40):
                diff = (clean[row] != corr[row]).nonzero().flatten().tolist()
                sp = int(b.extra["subject_pos"][row])
                assert diff == [sp]  # only the earlier mention of the subject
                c = int(corr[row, sp])
                assert 0 <= c < n_names and c not in (int(ans[row]), int(wrong[row]))


def test_ioi_abc_needs_three_names_and_large_seeds_stay_valid():
    with pytest.raises(ValueError, match="n_names >= 3"):
        pp.IOITask(n_names=2).patching_pairs(4, seed=0, corruption="abc")
    with pytest.raises(ValueError, match="corruption="):
        pp.IOITask().patching_pairs(4, seed=0, corruption="ab")
    task = pp.IOITask()
    # the largest valid seed: its third names come from seed + 7919 modulo 2**64, the generator's own key
    top = task.patching_pairs(6, seed=2**64 - 1, corruption="abc")
    same = task.patching_pairs(6, seed=-1, corruption="abc")
    assert all(torch.equal(x, y) for x, y in zip(top, same))


# ---------------------------------------------------------------------------------------------------------------
# parentheses
# ---------------------------------------------------------------------------------------------------------------
def _balanced(s) -> bool:
    depth = 0
    for t in s:
        depth += 1 if t == OPEN else -1
        if depth < 0:
            return False
    return depth == 0


@pytest.mark.parametrize("length", [4, 6, 10])
def test_parentheses_labels_training_distribution_and_probe_cells(length):
    task = pp.ParenthesesTask(length=length, p_balanced=0.5)
    for seed in SEEDS:
        b = task.sample(200, seed=seed)
        assert (b.tokens[:, 0] == BOS).all() and (b.tokens[:, -1] == QUERY).all()
        for row in range(200):
            s = b.tokens[row, 1:-1].tolist()
            opens = s.count(OPEN)
            label = _balanced(s)
            assert bool(b.extra["label"][row]) == label
            assert label or opens != length - opens  # the training set: balanced, or unequal counts
            assert b.targets[row].tolist() == [IGNORE] * (length + 1) + [TRUE if label else FALSE]
    # probes: every string with equal counts and a negative prefix depth, each once, in its cell
    every = [s for s in itertools.product([OPEN, CLOSE], repeat=length) if s.count(OPEN) * 2 == length]
    want = sorted(s for s in every if not _balanced(s))
    p = task.probes("all")
    got = [tuple(r) for r in p.tokens[:, 1:-1].tolist()]
    assert sorted(got) == want and not p.extra["label"].any()
    for s, cell in zip(got, p.extra["cell"].tolist()):
        name = f"{'open' if s[0] == OPEN else 'close'}_first_{'close' if s[-1] == CLOSE else 'open'}_last"
        assert PROBE_CELLS[cell] == name
    # the documented answers of the five algorithms on the four cells, each rule written out here
    rules = {
        "equal_counts": lambda s: True,
        "equal_counts_first_open": lambda s: s[0] == OPEN,
        "equal_counts_last_close": lambda s: s[-1] == CLOSE,
        "equal_counts_first_open_last_close": lambda s: s[0] == OPEN and s[-1] == CLOSE,
        "balanced": _balanced,
    }
    table = {
        "equal_counts": "TTTT",
        "equal_counts_first_open": "TTFF",
        "equal_counts_last_close": "TFTF",
        "equal_counts_first_open_last_close": "TFFF",
        "balanced": "FFFF",
    }
    for name, alg in pp.tasks.ALGORITHMS.items():
        answers = alg(p.tokens[:, 1:-1]).tolist()
        assert answers == [rules[name](s) for s in got]
        for c, letter in zip(range(4), table[name]):
            in_cell = [a for a, cell in zip(answers, p.extra["cell"].tolist()) if cell == c]
            assert all(a == (letter == "T") for a in in_cell)


def test_parentheses_p_balanced_extremes():
    assert pp.ParenthesesTask(length=6, p_balanced=0.0).sample(50, seed=1).extra["label"].sum() == 0
    assert pp.ParenthesesTask(length=6, p_balanced=1.0).sample(50, seed=1).extra["label"].all()


# ---------------------------------------------------------------------------------------------------------------
# topics
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw",
    [
        dict(num_topics=2, tokens_per_topic=6, num_shared=2, seq_len=12, shared_prob=0.3, switch_prob=0.5),
        dict(num_topics=3, tokens_per_topic=1, num_shared=0, seq_len=5, shared_prob=0.0, switch_prob=1.0),
        dict(num_topics=4, tokens_per_topic=3, num_shared=1, seq_len=9, shared_prob=0.5, min_prefix=1),
        dict(
            num_topics=2,
            tokens_per_topic=2,
            num_shared=1,
            seq_len=4,
            shared_prob=0.2,
            switch_prob=1.0,
            min_prefix=1,
        ),
    ],
)
def test_topic_tokens_and_concepts_follow_the_definition(kw):
    task = pp.TopicTask(**kw)
    C, K, S, T = kw["num_topics"], kw["tokens_per_topic"], kw["num_shared"], kw["seq_len"]
    mp = kw.get("min_prefix", 2)
    assert task.d_vocab == C * K + S + 1

    def topic_of(t):
        return t // K if t < C * K else -1

    for seed in SEEDS:
        b = task.sample(60, seed=seed)
        for row in range(60):
            tok = b.tokens[row].tolist()
            c0, c1 = int(b.extra["concept"][row]), int(b.extra["next_concept"][row])
            sw = int(b.extra["switch_pos"][row])
            assert tok[0] == task.d_vocab - 1
            assert sw == T and c1 == c0 or mp + 1 <= sw <= T - 2 and c1 != c0
            gen = [c0 if p < sw else c1 for p in range(T)]  # the topic generating each position
            for p in range(1, T):
                assert topic_of(tok[p]) in (gen[p], -1)
                assert C * K <= tok[p] < C * K + S or topic_of(tok[p]) == gen[p]
            readable, last = [], -1
            for p in range(T):
                last = topic_of(tok[p]) if p and topic_of(tok[p]) >= 0 else last
                readable.append(last)
            assert b.extra["concept_pos"][row].tolist() == readable
            assert b.extra["target_concept"][row].tolist() == gen[1:] + gen[-1:]
            assert b.targets[row].tolist() == tok[1:] + [IGNORE]
            assert task.concept_of(b.tokens[row]).tolist() == [
                topic_of(t) if i else -1 for i, t in enumerate(tok)
            ]


# ---------------------------------------------------------------------------------------------------------------
# algorithmic routines as a task
# ---------------------------------------------------------------------------------------------------------------
def _routine(name, x):
    n = len(x)
    if name == "sort":
        return sorted(x)
    if name == "diff_next":
        return [(x[(i + 1) % n] - x[i]) % 11 for i in range(n)]
    if name == "sum_next":
        return [(x[i] + x[(i + 1) % n]) % 11 for i in range(n)]
    if name == "add_index":
        return [(x[i] + i) % 11 for i in range(n)]
    if name == "count_smaller":
        return [sum(v < x[i] for v in x) for i in range(n)]
    if name == "interleave_reverse":
        return [x[i // 2] if i % 2 == 0 else x[n - 1 - i // 2] for i in range(n)]
    return [x[i] if i % 2 == 0 else (11 - x[i]) % 11 for i in range(n)]


@pytest.mark.parametrize("routine", sorted(algorithmic.ROUTINES))
def test_routine_task_targets_are_the_routine_at_the_query_positions(routine):
    task = algorithmic.RoutineTask(routine)
    b = task.sample(30, seed=4)
    assert b.tokens.shape == (30, 20) and (b.tokens[:, 10:] == algorithmic.QUERY).all()
    for row in range(30):
        x = b.tokens[row, :10].tolist()
        assert b.targets[row].tolist() == [IGNORE] * 10 + _routine(routine, x)


# ---------------------------------------------------------------------------------------------------------------
# seeds, sizes and argument checks of every task
# ---------------------------------------------------------------------------------------------------------------
def _tasks():
    return {
        "induction": pp.InductionTask(d_vocab=8, seq_len=5),
        "ioi": pp.IOITask(n_names=2, n_fillers=1),
        "parentheses": pp.ParenthesesTask(length=4),
        "topics": pp.TopicTask(seq_len=5),
        "routine": algorithmic.RoutineTask("sort"),
    }


@pytest.mark.parametrize("name", ["induction", "ioi", "parentheses", "topics", "routine"])
def test_seeds_reproduce_differ_and_sizes_at_the_edges(name):
    task = _tasks()[name]
    a, b = task.sample(64, seed=11), task.sample(64, seed=11)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.targets, b.targets)
    assert all(torch.equal(a.extra[k], b.extra[k]) for k in a.extra)
    assert torch.equal(task.sample(64, seed=np.int64(11)).tokens, a.tokens)  # numpy's ints are the same seed
    assert not torch.equal(task.sample(64, seed=12).tokens, a.tokens)
    one = task.sample(1, seed=11)  # one example at the minimum length
    assert one.tokens.shape == (1, task.n_ctx) == one.targets.shape
    assert (one.targets != IGNORE).any()
    empty = task.sample(0, seed=0)
    assert empty.tokens.shape == (0, task.n_ctx) and all(v.shape[0] == 0 for v in empty.extra.values())
    for bad in (-1, 2.0, True, "3"):
        with pytest.raises(ValueError, match="num_samples="):
            task.sample(bad, seed=0)
    for bad in (1.5, "0", 2**64, -(2**63) - 1):
        with pytest.raises(ValueError, match="seed="):
            task.sample(2, seed=bad)


@pytest.mark.parametrize(
    "make,name",
    [
        (lambda: pp.InductionTask(d_vocab=2), "d_vocab"),
        (lambda: pp.InductionTask(seq_len=4), "seq_len"),
        (lambda: pp.InductionTask(seq_len=9, repeat_len=5), "repeat_len"),
        (lambda: pp.InductionTask(repeat_len=2.0), "repeat_len"),
        (lambda: pp.IOITask(n_names=1), "n_names"),
        (lambda: pp.IOITask(n_fillers=0), "n_fillers"),
        (lambda: pp.ParenthesesTask(length=5), "length"),
        (lambda: pp.ParenthesesTask(length=2), "length"),
        (lambda: pp.ParenthesesTask(p_balanced=-0.1), "p_balanced"),
        (lambda: pp.TopicTask(num_topics=1), "num_topics"),
        (lambda: pp.TopicTask(seq_len=4), "min_prefix"),
        (lambda: pp.TopicTask(shared_prob=1.0), "shared_prob"),
        (lambda: pp.TopicTask(num_shared=0, shared_prob=0.2), "shared_prob"),
        (lambda: algorithmic.RoutineTask("reverse"), "routine"),
        (lambda: algorithmic.RoutineTask("sort", pipeline_fraction=1.5), "pipeline_fraction"),
    ],
)
def test_task_arguments_are_refused_naming_them(make, name):
    with pytest.raises(ValueError, match=f"{name}="):
        make()


# ---------------------------------------------------------------------------------------------------------------
# training: argument checks, derived seeds, a real signal and the resume
# ---------------------------------------------------------------------------------------------------------------
TASK = pp.ParenthesesTask(length=6)


def _model(seed=1):
    return pp.Transformer(TASK.model_config(d_model=16, n_heads=2, d_mlp=32, seed=seed))


def _same(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(
    "kw,name",
    [
        (dict(lr="0.1"), "lr="),
        (dict(lr=-1e-3), "lr="),
        (dict(lr=float("nan")), "lr="),
        (dict(weight_decay=-0.5), "weight_decay="),
        (dict(weight_decay=float("inf")), "weight_decay="),
        (dict(data=TASK.sample(0, seed=0)), "data holds no samples"),
        (dict(data=TASK.sample(4, seed=0).tokens), "data is a Tensor"),
        (dict(task="parentheses"), "task is a str"),
        (dict(callback=5), "callback="),
    ],
)
def test_train_refuses_bad_arguments_naming_them(kw, name):
    kw = {"task": TASK, **kw}
    model = _model()
    with pytest.raises((ValueError, TypeError), match=name):
        pp.tasks.train(model, steps=2, quiet=True, **kw)
    assert _same(model, _model())  # refused before any step


def test_train_with_the_largest_seed_draws_its_set_from_the_wrapped_seed():
    # seeds equal modulo 2**64 key the same generator: the largest valid seed is -1's run, its set drawn with 0
    a, b = _model(), _model()
    ra = pp.tasks.train(a, TASK, steps=3, num_samples=12, seed=2**64 - 1, log_every=1, quiet=True)
    rb = pp.tasks.train(b, TASK, steps=3, num_samples=12, seed=-1, log_every=1, quiet=True)
    assert ra.losses == rb.losses and _same(a, b)


_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if started with it ignored
    import torch
    torch.set_num_threads(1)
    import pypattern as pp
    path, sig, k = sys.argv[1], getattr(signal, sys.argv[2]), int(sys.argv[3])
    task = pp.ParenthesesTask(length=6)
    model = pp.Transformer(task.model_config(d_model=16, n_heads=2, d_mlp=32, seed=1))
    def stop(step, m):
        if step == k:
            os.kill(os.getpid(), sig)
    try:
        pp.tasks.train(model, task, steps=20, seed=5, log_every=3, batch_size=16, checkpoint=path,
                       callback=stop, quiet=True)
    except KeyboardInterrupt as e:
        print(type(e).__name__)
        sys.exit(3)
    print("finished")
    """
)


def test_train_stopped_by_sigterm_then_sigint_resumes_bit_for_bit(tmp_path):
    path = str(tmp_path / "train.npz")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for sig, k, name in (("SIGTERM", 4, "Terminated"), ("SIGINT", 11, "KeyboardInterrupt")):
        p = subprocess.run(
            [sys.executable, "-c", _CHILD, path, sig, str(k)],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert p.returncode == 3 and p.stdout.split() == [name], p.stderr[-2000:]
        _, meta = pp.io.load(path, kind=pp._train_checkpoint.KIND)
        assert k + 1 <= meta["checkpoint"]["next_step"] < 20  # the step under way finished and was written
    straight = _model()
    kw = dict(steps=20, seed=5, log_every=3, batch_size=16, quiet=True)
    ref = pp.tasks.train(straight, TASK, **kw)
    resumed = _model()
    res = pp.tasks.train(resumed, TASK, checkpoint=path, **kw)
    assert res.steps == ref.steps and res.losses == ref.losses and _same(resumed, straight)


# ---------------------------------------------------------------------------------------------------------------
# the command line: warnings of the built-in demos, output folders, a second run
# ---------------------------------------------------------------------------------------------------------------
MODEL_FLAGS = (
    "--step-size",
    "--num-burnin-steps",
    "--num-draws",
    "--num-chains",
    "--localization",
    "--nbeta",
)


def test_built_in_llc_demo_warnings_name_no_flag_the_demo_refuses(tmp_path, monkeypatch, capsys):
    """A sampler warning of the built-in demo names the library's settings, not the options that the demo refuses
    (they apply with --model only); with --model the same words are the options."""

    def fake_demo(out, quick, quiet=False, seed=0):
        warnings.warn(
            "step_size=0.0001 is too small: use more burn-in steps (num_burnin_steps) or draws (num_draws), a "
            "larger step_size, or step_size='auto'",
            UserWarning,
            stacklevel=2,
        )

    def show(message, category, filename, lineno, file=None, line=None):
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    monkeypatch.setattr(cli, "_llc_demo", fake_demo)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show  # as outside pytest: printed with the command's format
        assert cli.main(["llc", "--quick", "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert "warning: step_size=0.0001 is too small" in err and "num_burnin_steps" in err
    assert not [f for f in MODEL_FLAGS if f in err], err
    for flag in MODEL_FLAGS:  # indeed refused by the demo
        with pytest.raises(SystemExit):
            cli.main(["llc", "--out", str(tmp_path / "o"), flag, "1"])
        assert "only with --model" in capsys.readouterr().err
    # the user run's warnings keep naming the options (they apply there)
    opts = cli._options_that_apply(cli._parser().commands["llc"], type("A", (), {"model": "m"})())
    assert set(MODEL_FLAGS) <= opts and "--quick" not in opts
    assert "--step-size 0.0001" in cli._warning_as_flags("step_size=0.0001 is too small", opts)


def test_llc_and_patch_quick_write_under_out_and_a_second_run_rewrites_the_same_files(tmp_path, capsys):
    for cmd, names in (
        ("llc", {"llc_loss_trace.png", "llc_result.npz", "llc_summary.json"}),
        ("patch", {"patching_heatmap.png", "patching_table.csv", "patching_summary.json"}),
    ):
        out = tmp_path / cmd / "nested"
        argv = [cmd, "--quick", "--out", str(out)] + (["--quiet"] if cmd == "llc" else [])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert cli.main(argv) == 0
            first = capsys.readouterr().out
            assert set(os.listdir(out)) == names  # nothing else, nowhere else
            assert all(str(out / n) in first for n in names if not n.endswith(".png") or cmd == "llc")
            summary = (out / sorted(n for n in names if n.endswith("summary.json"))[0]).read_text()
            assert cli.main(argv) == 0  # the same run again: the same files, the same numbers
        again = (out / sorted(n for n in names if n.endswith("summary.json"))[0]).read_text()
        assert set(os.listdir(out)) == names
        strip = [line for line in summary.splitlines() if "seconds" not in line]
        assert strip == [line for line in again.splitlines() if "seconds" not in line]
    capsys.readouterr()


@pytest.mark.parametrize("what,sub", [("main", "llc"), ("main", "patch"), ("cka", "cka"), ("flags", "flags"),
                                      ("equivalence", "equivalence"), ("interpretive", "equivalence")])  # fmt: skip
def test_a_file_where_a_demo_writes_its_folder_is_refused_before_any_work(
    what, sub, tmp_path, monkeypatch, capsys
):
    import pypattern.experiments.equivalence_demo as equivalence_demo
    import pypattern.experiments.flags_demo as flags_demo
    import pypattern.experiments.interpretive as interpretive

    def no_work(*a, **k):
        pytest.fail("the demo started its work")

    for mod, name in ((cli, "_demo_sgld"), (equivalence_demo, "run_equivalence_demo"),
                      (flags_demo, "run_flags_demo"), (interpretive, "run_interpretive_demo")):  # fmt: skip
        monkeypatch.setattr(mod, name, no_work)
    out = tmp_path / "o"
    out.mkdir()
    (out / sub).write_text("not a folder")
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", what, "--quick", "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        err
        == f"pypattern demo: error: --out {str(out / sub)!r} is an existing file; give a folder (new or existing)"
    )


def test_repeated_tokens_repeat_distinct_tokens_after_a_bos_outside_them():
    for d_vocab, half, bos in ((20, 8, None), (5, 4, None), (10, 3, 9), (10, 3, 50256)):
        tok = pp.tasks.repeated_tokens(d_vocab, half, 6, seed=2, bos=bos)
        assert tok.shape == (6, 2 * half + 1) and (tok[:, 0] == (d_vocab - 1 if bos is None else bos)).all()
        for row in tok.tolist():
            x = row[1 : 1 + half]
            assert row[1 + half :] == x and len(set(x)) == half and all(0 <= t <= d_vocab - 2 for t in x)
            assert row[0] not in x  # no accidental repeat of the first token
    for bos in (0, 8, -1, 9.0):
        with pytest.raises(ValueError, match="bos="):
            pp.tasks.repeated_tokens(10, 9, 2, bos=bos)


def test_symmetric_pairs_swaps_both_ways_and_refuses_ambiguous_pairs_and_positions():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 6, (20, 5), generator=g)
    pairs = [(0, 3), (torch.tensor(1), np.int64(4))]
    swap = {0: 3, 3: 0, 1: 4, 4: 1}
    for positions in (None, 2, [0, -1], torch.tensor([1, 3]), np.array([4])):
        out = pp.tasks.symmetric_pairs(tokens, pairs, positions)
        cols = range(5) if positions is None else [positions] if isinstance(positions, int) else positions
        cols = {int(c) % 5 for c in cols}
        want = [[swap.get(t, t) if c in cols else t for c, t in enumerate(row)] for row in tokens.tolist()]
        assert out.tolist() == want
    for bad, name in (
        (dict(pairs=[(1, 2), (2, 3)]), "pairs"),  # 2 in two pairs: not a symmetric swap
        (dict(pairs=[(1, 1)]), "pairs"),
        (dict(pairs=[(1, 2.0)]), "pairs"),
        (dict(pairs=[1, 2]), "pairs"),
        (dict(pairs=[(1, 2)], positions=5), "positions"),
        (dict(pairs=[(1, 2)], positions=[-6]), "positions"),
        (dict(pairs=[(1, 2)], positions=1.0), "positions"),
    ):
        with pytest.raises(ValueError, match=name):
            pp.tasks.symmetric_pairs(tokens, **bad)
    with pytest.raises(ValueError, match="tokens"):
        pp.tasks.symmetric_pairs(tokens[0], [(1, 2)])


@pytest.mark.parametrize(
    "field,value",
    [("measures", ("ridge", "cca")), ("algorithms", ("sort_diff", "nope")), ("algorithms", ("sort_diff",)),
     ("budgets", (0, -1)), ("num_repeats", 0), ("members", (("L9", 0),)), ("pipeline_seeds", ()),
     ("lr", 0.0), ("train_fraction", 1.0), ("num_workers", 0)],
)  # fmt: skip
def test_equivalence_settings_are_checked_before_the_pool_is_trained(field, value, tmp_path, monkeypatch):
    from pypattern.experiments import interpretive

    monkeypatch.setattr(interpretive, "train_pools", lambda *a, **k: pytest.fail("the pool was trained"))
    s = interpretive.quick_interpretive_settings()
    setattr(s, field, value)
    with pytest.raises(ValueError, match=f"{field}="):
        interpretive.run_interpretive(tmp_path, s, log=None)
    for settings in (interpretive.InterpretiveSettings(), interpretive.reduced_interpretive_settings()):
        assert interpretive.check_settings(settings) is settings  # the shipped settings pass


@pytest.mark.parametrize(
    "argv,flag",
    [(["--measures", "foo"], "--measures"), (["--budgets", "1,x"], "--budgets"), (["--seeds", "a"], "--seeds"),
     (["--workers", "0"], "--workers"), (["--members", "L9:0"], "--members")],
)  # fmt: skip
def test_equivalence_script_options_end_in_one_line_naming_the_option(
    argv, flag, tmp_path, monkeypatch, capsys
):
    from pypattern.experiments import interpretive

    monkeypatch.setattr(interpretive, "train_pools", lambda *a, **k: pytest.fail("the pool was trained"))
    with pytest.raises(SystemExit) as e:
        interpretive.main([str(tmp_path / "o"), *argv])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].split("error: ")[1].startswith(f"{flag}: ")


def test_algorithms_chain_the_routines_and_unknown_names_are_refused_by_name():
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, 11, (8, 10), generator=g)
    for name, routines in algorithmic.ALGORITHMS.items():
        stages = algorithmic.run_algorithm(name, x)
        want = [x.tolist()]
        for r in routines:
            want.append([_routine(r, row) for row in want[-1]])
        assert [t.tolist() for t in stages] == want
    with pytest.raises(ValueError, match="algorithm='nope'"):
        algorithmic.run_algorithm("nope", x)
    with pytest.raises(ValueError, match="routine='nope'"):
        algorithmic.stage_inputs("nope", x)
    with pytest.raises(ValueError, match="x must"):
        algorithmic.run_algorithm("sort_diff", x.float())
    with pytest.raises(ValueError, match="logits must"):
        algorithmic.decode(torch.zeros(2, 20))
    # decode reads the argmax over the routine's 11 tokens at positions 10..19 (the query token left out)
    y = torch.randint(0, 11, (8, 10), generator=g)
    logits = torch.zeros(8, 20, 12)
    logits[:, :10, 3] = 9.0  # the input positions are not read
    logits[:, 10:, algorithmic.QUERY] = 9.0  # nor the query token
    logits[torch.arange(8)[:, None], 10 + torch.arange(10), y] = 1.0
    assert torch.equal(algorithmic.decode(logits), y)
