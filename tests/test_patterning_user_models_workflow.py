"""Patterning end to end on models users bring (a raw Hugging Face Llama, a GPT-2 converted with ``from_hf``) and
their batch forms: ``reweight`` of a ``TaskBatch`` and of a tokenizer's dict of tensors, ``train``'s
``sample_weights`` against a hand-written weighted AdamW loop, the chi -> invert -> save/load -> train chain, and
the refusals that name what to do instead."""

import warnings

import numpy as np
import pytest
import torch

import pypattern as pp
from pypattern.patterning import Intervention
from pypattern.tasks.base import generator

tr = pytest.importorskip("transformers")

V = 12
TASK = pp.InductionTask(d_vocab=V, seq_len=13)


def _llama():
    torch.manual_seed(0)
    cfg = tr.LlamaConfig(
        vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=16,
    )  # fmt: skip
    return tr.LlamaForCausalLM(cfg)


def _gpt2_converted():
    torch.manual_seed(1)
    cfg = tr.GPT2Config(
        vocab_size=V, n_embd=16, n_layer=1, n_head=2, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return pp.from_hf(tr.GPT2LMHeadModel(cfg).eval())


def _draw_counts(loader, data_rows, key):
    """How often each row of ``data_rows`` was drawn, matching each drawn row to its index."""
    index = {tuple(r.tolist()): i for i, r in enumerate(data_rows)}
    counts = np.zeros(len(data_rows), dtype=np.int64)
    for batch in loader:
        for r in key(batch):
            counts[index[tuple(r.tolist())]] += 1
    return counts


def _check_frequencies(counts, w):
    p = np.asarray(w, dtype=np.float64) / np.sum(w)
    assert (counts[p == 0] == 0).all()
    freq = counts / counts.sum()
    assert np.abs(freq - p).max() < 5 * np.sqrt(p * (1 - p) / counts.sum()).max()


def test_reweight_draws_rows_of_a_task_batch_and_of_a_tokenizer_dict():
    data = TASK.sample(24, seed=3)
    assert len({tuple(r.tolist()) for r in data.tokens}) == 24  # rows identify themselves
    w = np.linspace(0.0, 2.0, 24)
    # a TaskBatch: each batch is the TaskBatch of the rows drawn (tokens, targets and extras of the same rows)
    loader = pp.reweight(data, w, batch_size=16, num_samples=4000, generator=torch.Generator().manual_seed(0))
    first = next(iter(loader))
    assert isinstance(first, pp.tasks.base.TaskBatch) and first.tokens.shape == (16, data.tokens.shape[1])
    index = {tuple(r.tolist()): i for i, r in enumerate(data.tokens)}
    rows = torch.tensor([index[tuple(r.tolist())] for r in first.tokens])
    torch.testing.assert_close(first.targets, data.targets[rows], rtol=0, atol=0)
    for k, v in data.extra.items():
        torch.testing.assert_close(first.extra[k], v[rows], rtol=0, atol=0)
    _check_frequencies(_draw_counts(loader, data.tokens, lambda b: b.tokens), w)
    # a tokenizer's output: a dict (and a BatchEncoding) of input_ids, attention_mask and labels
    enc = {
        "input_ids": data.tokens,
        "attention_mask": torch.ones_like(data.tokens),
        "labels": data.tokens.clone(),
    }
    enc["attention_mask"][0, 10:] = 0
    enc["labels"][0, 10:] = -100
    for given in (enc, tr.BatchEncoding(enc)):
        loader = pp.reweight(
            given, w, batch_size=8, num_samples=4000, generator=torch.Generator().manual_seed(1)
        )
        batch = next(iter(loader))
        assert set(batch.keys()) == set(enc) and type(batch) is type(given)
        rows = torch.tensor([index[tuple(r.tolist())] for r in batch["input_ids"]])
        for k in enc:
            torch.testing.assert_close(batch[k], enc[k][rows], rtol=0, atol=0)
        _check_frequencies(_draw_counts(loader, data.tokens, lambda b: b["input_ids"]), w)
        # mode="loss": one weight per row (not per key), mean 1
        lw = pp.reweight(given, w, mode="loss")
        torch.testing.assert_close(lw.double(), torch.as_tensor(w / w.mean()), rtol=1e-6, atol=1e-7)
    # a dict whose values are no rows is refused by name
    with pytest.raises(TypeError, match=r"data\['input_ids'\].*return_tensors"):
        pp.reweight({"input_ids": data.tokens.tolist()}, w)
    with pytest.raises(ValueError, match="different numbers of rows"):
        pp.reweight({"input_ids": data.tokens, "labels": data.tokens[:5]}, w)
    with pytest.raises(ValueError, match="24 entries but the data has 5"):
        pp.reweight({"input_ids": data.tokens[:5]}, w)


def test_train_refuses_weights_that_are_no_weights_and_names_the_loop_for_hf_batches():
    model = _llama()
    data = TASK.sample(16, seed=2)
    w = torch.rand(16, generator=torch.Generator().manual_seed(0)) + 0.5
    with pytest.raises(TypeError, match="bools"):
        pp.tasks.train(model, TASK, steps=1, data=data, sample_weights=w > 0.8, quiet=True)
    with pytest.raises(TypeError, match="complex"):
        pp.tasks.train(model, TASK, steps=1, data=data, sample_weights=w.to(torch.complex64), quiet=True)
    with pytest.raises(ValueError, match=r"sample_weights has shape \(0,\); give 16 finite"):
        pp.tasks.train(model, TASK, steps=1, data=data, sample_weights=torch.ones(0), quiet=True)
    enc = {"input_ids": data.tokens, "attention_mask": torch.ones_like(data.tokens), "labels": data.tokens}
    with pytest.raises(TypeError, match=r"own loop.*reweight\(data, weights, mode='loss'\)"):
        pp.tasks.train(model, TASK, steps=1, data=enc, quiet=True)
    plan = pp.invert(np.array([[1.0, -1.0, 0.5, 0.3, 0.2]]), np.array([0.01]), method="constrained")
    with pytest.raises(ValueError, match=r"num_data=16"):
        pp.tasks.train(model, TASK, steps=1, data=data, sample_weights=plan, quiet=True)


def _hand_loop(model, data, w, steps, batch_size, lr, seed):
    """AdamW on ``mean(w_i loss_i)`` over minibatches drawn as ``train`` documents (the seed keys the rows)."""
    g = generator(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    w = torch.as_tensor(w, dtype=torch.float64)
    w = w / w.mean()
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(data), (batch_size,), generator=g)
        tokens, targets = data.tokens[idx], data.targets[idx]
        out = model(tokens)
        logits = out.logits if hasattr(out, "logits") else out
        keep = targets != -100
        ce = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), targets.clamp(min=0), reduction="none"
        )  # (batch, pos)
        per = (ce * keep).sum(1) / keep.sum(1).clamp(min=1)
        loss = (per * w[idx].to(per)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("make", [_llama, _gpt2_converted], ids=["hf-llama", "from_hf-gpt2"])
def test_chi_invert_save_train_chain_on_user_models(make, tmp_path):
    model = make()
    pp.tasks.train(model, TASK, steps=40, seed=0, log_every=0, quiet=True)  # briefly trained on the task
    data = TASK.sample(24, seed=7)
    probe_rows = np.array([0, 3, 5, 8, 11, 14, 17, 20])
    probe = {
        "input_ids": data.tokens[probe_rows],
        "attention_mask": torch.ones_like(data.tokens[probe_rows]),
        "labels": data.tokens[probe_rows].clone(),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (a few draws: not stationary)
        res = pp.susceptibilities(
            model, [data.tokens], probe, ["blocks.0.attn.head.0", "blocks.0.mlp"], per_token=False,
            num_chains=2, num_draws=6, num_burnin_steps=2, step_size=1e-5, localization=1e3, nbeta=10.0, seed=1,
            quiet=True,
        )  # fmt: skip
    assert res.chi.shape == (2, probe_rows.size) and np.isfinite(res.chi).all()
    target = -res.chi @ np.linspace(-1.0, 1.0, probe_rows.size) / 24  # lower both, reachable
    plan = pp.invert(res.chi, target, method="constrained", num_data=24)
    # non-negative, mean 1 over the probe columns, h = (w - 1) / M, the prediction chi @ h
    assert plan.weights.min() >= 0
    np.testing.assert_allclose(plan.weights.mean(), 1.0, rtol=1e-12)
    np.testing.assert_allclose(plan.h, (plan.weights - 1) / 24, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(plan.predicted, res.chi @ plan.h, rtol=1e-12, atol=1e-18)
    plan.save(tmp_path / "plan.npz")
    back = Intervention.load(tmp_path / "plan.npz")
    np.testing.assert_array_equal(back.weights, plan.weights)
    w = np.ones(24)
    w[probe_rows] = back.weights
    # train with the weights: the same parameters as the hand-written weighted loop from the same start
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    pp.tasks.train(
        model, TASK, steps=5, batch_size=16, lr=1e-2, data=data, sample_weights=w, seed=3, quiet=True
    )
    trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(start)
    _hand_loop(model, data, w, steps=5, batch_size=16, lr=1e-2, seed=3)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(trained[k], v, rtol=1e-4, atol=1e-5, msg=k)

    # the weighted objective falls further under the weighted run than under the unweighted control (same seed)
    def weighted_loss(m, w):
        with torch.no_grad():
            out = m(data.tokens)
            per = TASK.per_sample_loss(out.logits if hasattr(out, "logits") else out, data).double()
        return float((per * torch.as_tensor(w / w.mean())).mean())

    spread = np.ones(24)
    spread[:12] = 3.0  # a weighting far from uniform, so the two objectives differ clearly
    after = {}
    for name, sw in (("weighted", spread), ("control", None)):
        model.load_state_dict(start)
        pp.tasks.train(model, TASK, steps=30, lr=1e-2, data=data, sample_weights=sw, seed=4, quiet=True)
        after[name] = weighted_loss(model, spread)
    assert after["weighted"] < after["control"]
