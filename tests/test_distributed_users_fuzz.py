"""pypattern.distributed as a user runs it on token models: two gloo ranks on the CPU estimate the LLC of
pypattern's own transformer and of a Hugging Face GPT-NeoX converted with ``pp.from_hf``, and every rank gets the
single-process result of the same call (chain ``g`` runs on rank ``g % 2``); a run stopped on one rank resumes from
the per-rank checkpoint files to the uninterrupted result; ranks given different settings, weights or data are
refused on every rank, naming what differs."""

import json
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pypattern as pp
from pypattern import distributed
from pypattern.tasks import TopicTask

pytestmark = pytest.mark.usefixtures("one_thread")

KW = dict(
    num_chains=3,
    num_draws=8,
    num_burnin_steps=4,
    step_size=1e-3,
    localization=100.0,
    nbeta=20.0,
    seed=5,
    quiet=True,
    warn_nonstationary=False,
)
RUNS = [(None, None), ("blocks.0.attn", None)]
COMPONENTS = ["blocks.0.attn.head.1", "blocks.1.mlp"]


def _models_and_data():
    transformers = pytest.importorskip("transformers")
    task = TopicTask(num_topics=2, tokens_per_topic=6, num_shared=2, seq_len=12)
    tokens = task.sample(64, seed=3).tokens
    own = pp.Transformer(task.model_config(d_model=16, n_heads=2, d_mlp=32, seed=0))
    pp.tasks.train(own, task, steps=10, batch_size=16, seed=0, log_every=0, quiet=True)
    torch.manual_seed(0)
    hf = transformers.GPTNeoXForCausalLM(
        transformers.GPTNeoXConfig(
            vocab_size=task.d_vocab,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=32,
            rotary_pct=0.5,
        )
    ).eval()
    converted = pp.from_hf(hf)
    return {"own": own, "converted": converted}, tokens


def _loader(tokens):
    return torch.utils.data.DataLoader(tokens, batch_size=16, shuffle=True)


class _Stop(Exception):
    pass


def _stop_at(chain, draw):
    """A callback that stops the run at chain 1's draw 5 (chain 1 runs on rank 1)."""
    if chain == 1 and draw == 5:
        raise _Stop("stopped")


def _worker(rank: int, world: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=world)
    out = {}
    try:
        models = torch.load(os.path.join(folder, "models.pt"), weights_only=False)
        tokens = torch.load(os.path.join(folder, "tokens.pt"))
        loader = _loader(tokens)
        for name, model in models.items():
            res = distributed.estimate_llc(model, loader, **KW)
            out[name] = {"trace": res.loss_trace.tolist(), "llc": res.llc_mean, "se": res.llc_se}
        per_run = distributed.estimate_llc(models["converted"], loader, runs=RUNS, **KW)
        out["runs"] = [r.llc_mean for r in per_run]
        one = distributed.estimate_llc(models["own"], loader, **{**KW, "num_chains": 1})
        out["one_chain"] = one.loss_trace.tolist()
        sus = distributed.susceptibilities(models["converted"], loader, tokens[:4], COMPONENTS, **KW)
        out["chi"] = sus.chi.tolist()

        # a run stopped on rank 1 resumes from each rank's file to the uninterrupted result
        ck = os.path.join(folder, "llc.npz")
        try:
            distributed.estimate_llc(models["converted"], loader, checkpoint=ck, callbacks=[_stop_at], **KW)
        except Exception as e:  # noqa: BLE001 - recorded for the test
            out["stopped"] = f"{type(e).__name__}: {e}"
        dist.barrier()
        out["files"] = sorted(f for f in os.listdir(folder) if f.startswith("llc"))
        resumed = distributed.estimate_llc(models["converted"], loader, checkpoint=ck, **KW)
        out["resumed"] = resumed.loss_trace.tolist()

        # ranks that disagree: every rank raises, naming what differs
        mismatches = {
            "num_chains": lambda: distributed.estimate_llc(
                models["own"], loader, **{**KW, "num_chains": 3 + rank}
            ),
            "model": lambda: distributed.estimate_llc(models["own" if rank else "converted"], loader, **KW),
            "data": lambda: distributed.estimate_llc(
                models["own"], _loader(tokens.flip(0) if rank else tokens), **KW
            ),
            "checkpoint": lambda: distributed.estimate_llc(
                models["own"], loader, checkpoint=os.path.join(folder, "c.npz") if rank == 0 else None, **KW
            ),
            "nbeta": lambda: distributed.estimate_llc(
                models["own"], loader, **{**KW, "nbeta": None if rank else 20.0}
            ),
        }
        for key, call in mismatches.items():
            try:
                call()
                out[f"mismatch_{key}"] = "no error"
            except Exception as e:  # noqa: BLE001 - recorded for the test
                out[f"mismatch_{key}"] = f"{type(e).__name__}: {e}"
    finally:
        dist.destroy_process_group()
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    os._exit(0)  # gloo's teardown at exit aborts now and then; the results are written


def test_two_ranks_give_the_single_process_llc_of_token_models():
    models, tokens = _models_and_data()
    loader = _loader(tokens)
    single = {name: pp.estimate_llc(m, loader, **KW) for name, m in models.items()}
    per_run = pp.estimate_llc(models["converted"], loader, runs=RUNS, **KW)
    one = pp.estimate_llc(models["own"], loader, **{**KW, "num_chains": 1})
    sus = pp.susceptibilities(models["converted"], loader, tokens[:4], COMPONENTS, **KW)
    assert sus.chi.shape == (2, 4 * 11) and np.abs(sus.chi).max() > 0
    with tempfile.TemporaryDirectory() as folder:
        torch.save(models, os.path.join(folder, "models.pt"))
        torch.save(tokens, os.path.join(folder, "tokens.pt"))
        mp.spawn(_worker, args=(2, folder), nprocs=2, join=True)
        outs = [json.load(open(os.path.join(folder, f"rank{r}.json"))) for r in range(2)]
    for o in outs:
        for name, res in single.items():
            np.testing.assert_array_equal(o[name]["trace"], res.loss_trace)
            assert o[name]["llc"] == res.llc_mean and o[name]["se"] == res.llc_se
        assert o["runs"] == [r.llc_mean for r in per_run]
        np.testing.assert_array_equal(o["one_chain"], one.loss_trace)
        np.testing.assert_allclose(o["chi"], sus.chi, rtol=1e-6, atol=1e-9 * np.abs(sus.chi).max())
        # each rank wrote its own file, and the resumed run is the uninterrupted one
        assert o["files"] == ["llc.rank0of2.npz", "llc.rank1of2.npz"]
        np.testing.assert_array_equal(o["resumed"], single["converted"].loss_trace)
        assert "different values of 'num_chains'" in o["mismatch_num_chains"]
        # another architecture on rank 1 (the own model has learned positions, the converted one rotary)
        assert "different values of 'architecture': architecture.cfg." in o["mismatch_model"]
        assert "different values of 'data'" in o["mismatch_data"]
        assert "different values of 'nbeta'" in o["mismatch_nbeta"]
        assert "different values of 'checkpoint'" in o["mismatch_checkpoint"]
        assert "None (the default) on rank(s) [1]" in o["mismatch_checkpoint"]
    assert outs[1]["stopped"] == "_Stop: stopped"
    assert outs[0]["stopped"].startswith("RuntimeError: rank 1 failed")
