"""The induction task's least distance between copies, and the induction circuit of the models trained on it."""

import pytest
import torch

from pypattern.circuits import experiments
from pypattern.tasks import InductionTask


def test_default_least_distance_is_the_repeat_len_and_draws_as_before():
    task = InductionTask()
    assert task.min_distance is None and task.repeat_len == 10
    a = task.sample(256, seed=3)
    b = InductionTask(min_distance=10).sample(256, seed=3)
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.extra["induction_flag"], b.extra["induction_flag"])
    d = a.extra["dest_start"] - a.extra["source_start"]
    assert int(d.min()) >= 10  # the copies never overlap


@pytest.mark.parametrize("seq_len, repeat_len, min_distance", [(33, None, 2), (13, 4, 3), (9, 3, 2)])
def test_close_copies_repeat_the_stretch_with_period_the_distance(seq_len, repeat_len, min_distance):
    task = InductionTask(d_vocab=16, seq_len=seq_len, repeat_len=repeat_len, min_distance=min_distance)
    k, T = task.repeat_len, seq_len
    b = task.sample(3000, seed=1)
    assert b.tokens.shape == (3000, T)
    seen = set()
    for row, i, j, flag, tgt in zip(
        b.tokens,
        b.extra["source_start"],
        b.extra["dest_start"],
        b.extra["induction_flag"],
        b.targets,
        strict=True,
    ):
        i, j = int(i), int(j)
        d = j - i
        seen.add(d)
        assert min_distance <= d <= T - 1 - k and j + k <= T and i >= 1
        assert int(row[0]) == task.bos and bool((row[1:] != task.bos).all())
        for p in range(j, j + k):  # every token of the second copy equals the one d positions before it
            assert int(row[p]) == int(row[p - d])
        assert flag.nonzero().flatten().tolist() == list(range(j, j + k - 1))
        for p in range(j, j + k - 1):  # a flagged position's target is the token after its earlier occurrence
            assert int(tgt[p]) == int(row[p - d + 1])
    assert seen == set(range(min_distance, T - k))  # every distance that fits is drawn


@pytest.mark.parametrize("bad", [1, 0, 23, 2.0, True, "2"])
def test_least_distance_out_of_range_is_refused_naming_it(bad):
    with pytest.raises(ValueError, match=r"min_distance=.* is not valid .*give None or an int in 2\.\.22"):
        InductionTask(min_distance=bad)


def _role_scores_by_loop(model, clean, n, k):
    """Previous-token score of each layer-0 head and induction score of each layer-1 head, one entry at a time."""
    _, cache = model.run_with_cache(clean, names_filter=lambda s: s.endswith("hook_pattern"))
    p0, p1 = cache["blocks.0.attn.hook_pattern"], cache["blocks.1.attn.hook_pattern"]
    B, H, T = clean.shape[0], model.cfg.n_heads, clean.shape[1]
    prev = [
        sum(float(p0[b, h, q, q - 1]) for b in range(B) for q in range(2, n + 1)) / (B * (n - 1))
        for h in range(H)
    ]
    ind = [sum(float(p1[b, h, T - 1, k + 1]) for b in range(B)) / B for h in range(H)]
    return prev, ind


@pytest.mark.parametrize("seed", [0, 3, 4])
def test_the_trained_model_has_the_previous_token_to_induction_head_circuit(seed):
    """Trained on the circuit experiment's task (copies at any distance from ``TRAIN_MIN_DISTANCE`` on), the
    models of seeds 0, 3 and 4 each form a previous-token head and an induction head, and the exact scores recover
    the key-composition circuit (within the top 5% of edges, faithfulness >= 0.9). Seeds 3 and 4 are those whose
    models trained on ``InductionTask()``'s copies at least 10 positions apart form neither role."""
    n, k = 10, 6
    r = experiments.run_induction_circuit(
        seed=seed, num_prompts=16, n=n, k=k, methods=("exact",), fractions=(0.0, 1.0), quiet=True
    )
    prev, ind = _role_scores_by_loop(r["model"], r["prompts"][0], n, k)
    assert max(prev) >= experiments.PREVIOUS_TOKEN_THRESHOLD
    assert max(ind) >= experiments.INDUCTION_THRESHOLD
    assert r["prev_head"] == max(range(len(prev)), key=prev.__getitem__)
    assert r["induction_heads"] == [h for h, s in enumerate(ind) if s >= experiments.INDUCTION_THRESHOLD]
    assert r["roles_found"] is True
    assert r["key_composition_in_top_5pct"]["exact"]
    assert r["faithfulness_at_5pct"]["exact"] >= 0.9
    assert r["circuit_recovered"] == {"exact": True}
