import pytest
import torch
from torch import nn

from pypattern.models import Transformer
from pypattern.tasks import (
    ALGORITHMS,
    IGNORE,
    InductionTask,
    IOITask,
    ParenthesesTask,
    TopicTask,
    algorithm_scores,
    induction_probe,
    per_sample_loss,
    prefix_matching_score,
    previous_token_score,
    repeated_tokens,
    symmetric_pairs,
    train,
)
from pypattern.tasks.parens import FALSE, TRUE

pytestmark = pytest.mark.usefixtures("one_thread")


# ----- data ground truth -------------------------------------------------------------------------------------
def test_induction_data_and_flags():
    task = InductionTask(d_vocab=20, seq_len=25, repeat_len=6)
    b = task.sample(200, seed=0)
    assert b.tokens.shape == (200, 25) and torch.all(b.tokens[:, 0] == task.bos)
    assert torch.all(b.tokens[:, 1:] < task.bos)
    for i in range(200):
        s, d = b.extra["source_start"][i].item(), b.extra["dest_start"][i].item()
        assert d >= s + 6 and d + 6 <= 25
        assert torch.equal(b.tokens[i, s : s + 6], b.tokens[i, d : d + 6])
        flagged = b.extra["induction_flag"][i].nonzero().flatten()
        assert flagged.tolist() == list(range(d, d + 5))
        # a flagged position's target is the token after the earlier occurrence of the same context
        for t in flagged.tolist():
            assert b.targets[i, t] == b.tokens[i, s + (t - d) + 1]
    assert torch.all(b.targets[:, :-1] == b.tokens[:, 1:]) and torch.all(b.targets[:, -1] == IGNORE)


def test_prefix_matching_and_previous_token_scores_on_forced_patterns():
    model = Transformer(InductionTask().model_config(d_model=16, n_heads=2))
    tokens, dest, src, prev = induction_probe(model.cfg.d_vocab, model.cfg.n_ctx, 8, 32, seed=0)
    # the probe: distinct tokens, two copies at a random distance, src = after the earlier occurrence
    b = torch.arange(32)[:, None]
    assert torch.equal(tokens[b, dest], tokens[b, src - 1])
    assert len(set((dest - src).flatten().tolist())) > 3

    def force(layer_src):
        def fn(pattern, hook):
            new = pattern.clone()
            new[:, 1] = 0
            new[b, 1, dest, layer_src] = 1.0
            return new

        return fn

    with model.hooks([("blocks.1.attn.hook_pattern", force(src))]):
        pm = prefix_matching_score(model)
    assert pm.shape == (2, 2) and pm[1, 1] == pytest.approx(1.0) and pm[0].max() < 0.5
    with model.hooks([("blocks.0.attn.hook_pattern", force(prev))]):
        assert previous_token_score(model)[0, 1] == pytest.approx(1.0)
    tok = repeated_tokens(20, 8, 3)
    assert torch.equal(tok[:, 1:9], tok[:, 9:]) and all(len(set(r[1:9].tolist())) == 8 for r in tok)


def test_parentheses_sets_and_algorithms():
    task = ParenthesesTask(length=8)
    assert len(task._sets["balanced"]) == 14  # Catalan(4)
    b = task.sample(500, seed=0)
    s = b.tokens[:, 1:-1]
    labels = b.extra["label"]
    for name, alg in ALGORITHMS.items():  # every algorithm is perfect on the training distribution
        assert torch.equal(alg(s), labels), name
    probes = task.probes("all")
    ps = probes.tokens[:, 1:-1]
    assert len(probes) == 70 - 14  # C(8,4) strings with equal counts, minus the balanced ones
    assert torch.all(ALGORITHMS["equal_counts"](ps)) and not torch.any(ALGORITHMS["balanced"](ps))
    open_first = probes.extra["kind"] == 2
    assert torch.equal(ALGORITHMS["equal_counts_first_open"](ps), open_first)
    with pytest.raises(ValueError, match="length"):
        ParenthesesTask(length=7)


class RuleModel(nn.Module):
    """A 'model' that implements one algorithm exactly (answers at the last position)."""

    def __init__(self, alg):
        super().__init__()
        self.alg = alg

    def forward(self, tokens):
        out = torch.zeros(*tokens.shape, 6)
        ans = self.alg(tokens[:, 1:-1])
        out[:, -1, TRUE] = ans.float()
        out[:, -1, FALSE] = (~ans).float()
        return out


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_algorithm_scores_identify_a_known_rule(name):
    task = ParenthesesTask(length=10)
    s = algorithm_scores(RuleModel(ALGORITHMS[name]), task, num_train=300)
    assert s["best"] == name and s[f"probe/{name}"] == 1.0
    assert all(s[f"train/{a}"] == 1.0 for a in ALGORITHMS)
    assert all(s[f"probe/{a}"] < 1.0 for a in ALGORITHMS if a != name)


def test_ioi_pairs_and_symmetric_replacement():
    task = IOITask()
    clean, corr, ans, wrong = task.patching_pairs(100, seed=0)
    assert torch.all(clean[:, -1] == wrong) and torch.all(corr[:, -1] == ans)
    assert torch.all((clean != corr).sum(1) == 1)
    a, b = clean[:, 1], clean[:, 3]
    assert torch.all(a != b) and torch.all((clean[:, -1] == a) | (clean[:, -1] == b))
    c2, x2, ans2, wrong2 = task.patching_pairs(100, seed=0, corruption="abc")
    assert torch.equal(c2, clean) and torch.all((c2 != x2).sum(1) == 1)
    changed = (c2 != x2).int().argmax(1)
    assert torch.all((changed == 1) | (changed == 3))
    newname = x2[torch.arange(100), changed]
    assert torch.all((newname != ans2) & (newname != wrong2) & (newname < task.n_names))
    t = torch.tensor([[1, 2, 3, 1], [2, 2, 5, 1]])
    torch.testing.assert_close(symmetric_pairs(t, [(1, 2)]), torch.tensor([[2, 1, 3, 2], [1, 1, 5, 2]]))
    torch.testing.assert_close(
        symmetric_pairs(t, [(1, 2)], positions=[0]), torch.tensor([[2, 2, 3, 1], [1, 2, 5, 1]])
    )


def test_per_sample_loss_matches_cross_entropy():
    logits = torch.randn(3, 4, 5)
    targets = torch.tensor([[1, IGNORE, 2, IGNORE], [IGNORE] * 3 + [4], [0, 1, 2, 3]])
    out = per_sample_loss(logits, targets)
    for i in range(3):
        m = targets[i] != IGNORE
        ref = torch.nn.functional.cross_entropy(logits[i][m], targets[i][m])
        torch.testing.assert_close(out[i], ref)


# ----- training in seconds -----------------------------------------------------------------------------------
def test_ioi_trains_to_full_accuracy():
    task = IOITask()
    torch.manual_seed(0)
    model = Transformer(task.model_config())
    train(model, task, steps=250, seed=0)
    assert task.accuracy(model, task.sample(1000, seed=5)) > 0.98


def test_parentheses_trains_to_full_training_accuracy_and_probes_separate():
    task = ParenthesesTask()
    torch.manual_seed(0)
    model = Transformer(task.model_config(seed=0))
    train(model, task, steps=250, seed=0)
    assert task.accuracy(model, task.sample(2000, seed=3)) > 0.99
    s = algorithm_scores(model, task)
    assert min(s[f"train/{a}"] for a in ALGORITHMS) > 0.99  # all algorithms fit the training data ...
    probe = [s[f"probe/{a}"] for a in ALGORITHMS]
    assert max(probe) - min(probe) > 0.5  # ... and the probes tell them apart


def test_induction_trains_and_forms_a_prefix_matching_head():
    task = InductionTask()  # 64 tokens, 33 positions, a segment of 10 repeated at a random distance
    torch.manual_seed(0)
    model = Transformer(task.model_config())
    before = task.induction_accuracy(model, task.sample(500, seed=9))
    pm_before = prefix_matching_score(model).max().item()
    train(model, task, steps=800, seed=0)
    after = task.induction_accuracy(model, task.sample(500, seed=9))
    pm_after = prefix_matching_score(model).max().item()
    assert before < 0.1 and after > 0.85
    # on random-gap probes (no fixed-distance shortcut) some head attends to the token after the earlier
    # occurrence of the current token
    assert pm_before < 0.15 and pm_after > 0.4


def test_sample_weights_reweight_the_data():
    """Zero weight on every False example: the model never sees a False label and answers True on them."""
    task = ParenthesesTask()
    data = task.sample(2000, seed=1)
    w = data.extra["label"].double()
    torch.manual_seed(0)
    model = Transformer(task.model_config(seed=0))
    train(model, task, steps=60, data=data, sample_weights=w, seed=0)
    neg = data[~data.extra["label"]][:300]
    assert task.predict(model, neg).float().mean() > 0.95
    with pytest.raises(ValueError, match="sample_weights"):
        train(model, task, steps=1, data=data, sample_weights=torch.ones(5))
    before = [p.detach().clone() for p in model.parameters()]
    for bad in (float("nan"), float("inf")):  # refused before any step: the weights are left as they are
        wb = w.clone()
        wb[0] = bad
        with pytest.raises(ValueError, match="finite non-negative weights"):
            train(model, task, steps=2, data=data, sample_weights=wb)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="fixed training set"):
        train(model, task, steps=1, sample_weights=torch.ones(5))


def test_sample_weights_equal_subset_gradient():
    """Weights w give the loss mean(w_i l_i) with w normalised to mean 1 over the data."""
    task = IOITask()
    data = task.sample(8, seed=0)
    model = Transformer(task.model_config(d_model=16, d_mlp=32, dtype=torch.float64))
    w = torch.tensor([0, 1, 2, 0, 1, 0, 0, 4.0], dtype=torch.float64)
    res = train(model, task, steps=1, data=data, sample_weights=w, batch_size=8, lr=0.0, seed=0, log_every=1)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 8, (8,), generator=g)
    per = task.per_sample_loss(model(data.tokens[idx]), data[idx])
    expected = (per * (w / w.mean())[idx]).mean()
    assert res.losses[0] == pytest.approx(float(expected.detach()), rel=1e-9)


def test_ioi_extra_positions_point_at_the_names():
    from pypattern.tasks import IOITask

    b = IOITask().sample(64, seed=0)
    rows = torch.arange(64)
    assert torch.equal(
        b.tokens[rows, b.extra["subject_pos"]], b.extra["wrong"]
    )  # the subject's first mention
    assert torch.equal(b.tokens[rows, b.extra["name_pos"]], b.extra["answer"])  # the indirect object
    assert torch.equal(b.tokens[:, -1], b.extra["wrong"])


@pytest.mark.parametrize("seq_len", [5, 6, 7])
def test_induction_task_default_repeat_len_works_for_every_seq_len_that_admits_one(seq_len):
    task = InductionTask(d_vocab=8, seq_len=seq_len)
    assert task.repeat_len == 2
    b = task.sample(64, seed=0)
    assert b.tokens.shape == (64, seq_len)
    k = task.repeat_len
    for row, i, j in zip(b.tokens, b.extra["source_start"], b.extra["dest_start"], strict=True):
        assert j - i >= k and j + k <= seq_len
        assert torch.equal(row[i : i + k], row[j : j + k])
    assert int(b.extra["induction_flag"].sum(1).min()) == k - 1
    assert InductionTask(seq_len=33).repeat_len == 10  # longer sequences: a default of 10


def test_induction_task_errors_name_seq_len():
    with pytest.raises(ValueError, match=r"seq_len=4 is too short.*seq_len >= 5"):
        InductionTask(seq_len=4)
    with pytest.raises(ValueError, match=r"repeat_len=3 is not valid for seq_len=6; give 2\.\.2"):
        InductionTask(seq_len=6, repeat_len=3)


def test_topic_task_errors_name_the_seq_len_the_default_min_prefix_needs():
    with pytest.raises(ValueError, match=r"seq_len=3 is not valid; give an int >= 4"):
        TopicTask(seq_len=3)
    with pytest.raises(
        ValueError, match=r"min_prefix=2 is too large for seq_len=4; give at most 1, or seq_len >= 5"
    ):
        TopicTask(seq_len=4)
    b = TopicTask(seq_len=4, min_prefix=1).sample(8, seed=0, switch_prob=1.0)
    assert b.tokens.shape == (8, 4)
