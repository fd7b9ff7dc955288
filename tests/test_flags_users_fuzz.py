"""Concept flags as a user trains them on the model families they bring: pypattern's own Transformer and GPT-2,
Llama and GPT-NeoX models built from small configurations and converted with ``pypattern.from_hf``, with flag
dimensions that are neither contiguous nor sorted. After ``train_flags`` the flags read out the concept, setting
them to another concept moves the next-token prediction to that concept's tokens (read from the logits, not
through ``flag_report``), and they are inert otherwise: writing the code the model writes itself leaves the
predictions unchanged, and steering leaves every non-flag dimension alone. A run stopped by a signal resumes to
the uninterrupted run bit for bit; bad inputs are refused naming the argument."""

import os
import signal

import numpy as np
import pytest
import torch

import pypattern as pp
from pypattern import flags
from pypattern._progress import Terminated

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

TASK = pp.TopicTask(num_topics=2, tokens_per_topic=6, num_shared=4, seq_len=12)
V = TASK.d_vocab + 3  # a converted checkpoint's vocabulary may be larger than the task's
SPEC = pp.FlagSpec("blocks.1.hook_resid_pre", dims=(7, 2, 19, 11), num_concepts=2)


def _model(arch: str, seed: int = 0):
    T = transformers
    torch.manual_seed(seed)
    small = dict(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=32,
    )
    if arch == "native":
        return pp.Transformer(TASK.model_config(d_model=32, n_heads=4, d_mlp=48, seed=seed))
    if arch in ("gpt2", "hooked_gpt2"):
        drop = 0.1 if arch == "hooked_gpt2" else 0.0  # GPT-2's own dropout: a random forward in training
        cfg = T.GPT2Config(
            vocab_size=V,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=32,
            resid_pdrop=drop,
            embd_pdrop=drop,
            attn_pdrop=drop,
        )
        cfg.bos_token_id = cfg.eos_token_id = 0
        hf = T.GPT2LMHeadModel(cfg)
        if arch == "hooked_gpt2":  # unconverted, through the adapter's hook points
            return pp.hooked_hf(hf.eval())
    elif arch == "llama":
        hf = T.LlamaForCausalLM(T.LlamaConfig(**small, num_key_value_heads=2))
    else:
        hf = T.GPTNeoXForCausalLM(
            T.GPTNeoXConfig(**small, rotary_pct=0.5, hidden_dropout=0.0, attention_dropout=0.0)
        )
    return pp.from_hf(hf.eval())


def _concept_mass(model, tokens, concept=None, positions=None) -> torch.Tensor:
    """(batch, pos, num_concepts): next-token probability of each concept's tokens, optionally steered."""
    tc = torch.as_tensor(TASK.token_concepts)
    with torch.no_grad():
        if concept is None:
            p = torch.softmax(model(tokens)[..., : len(tc)].double(), -1)
        else:
            with pp.steer(model, SPEC, concept, positions=positions):
                p = torch.softmax(model(tokens)[..., : len(tc)].double(), -1)
    return torch.stack([p[..., tc == c].sum(-1) for c in range(SPEC.num_concepts)], -1)


def _of(mass: torch.Tensor, concept: torch.Tensor) -> torch.Tensor:
    """(batch, pos): each sequence's mass on its own entry of ``concept`` (batch,)."""
    return mass.gather(-1, concept[:, None, None].expand(-1, mass.shape[1], 1)).squeeze(-1)


@pytest.mark.parametrize("arch", ["native", "gpt2", "llama", "neox"])
def test_trained_flags_steer_the_prediction_and_are_inert_otherwise(arch):
    model = _model(arch)
    pp.tasks.train(model, TASK, steps=150, seed=0, log_every=0, quiet=True)
    res = pp.train_flags(
        model,
        TASK,
        SPEC,
        stage1_steps=100,
        stage2_steps=150,
        batch_size=32,
        lr=3e-3,
        quiet=True,
        log_every=10,
    )
    assert res.stages[0] == 1 and res.stages[-1] == 2
    assert res.flag_losses[-1] < 0.05 * res.flag_losses[0]
    batch = TASK.sample(64, seed=11, switch_prob=0.0)
    known = batch.extra["concept_pos"] >= 0
    own = batch.extra["concept"]

    # the flags read out the concept, at the chosen dimensions (measured 1.0 on every family; each flag within
    # 0.16-0.35 of its code)
    _, cache = model.run_with_cache(batch.tokens, names_filter=SPEC.hook)
    acts = cache[SPEC.hook]
    read = pp.read_flags(acts, SPEC)
    assert float((read[known] == batch.extra["concept_pos"][known]).double().mean()) > 0.95
    code = SPEC.code(acts.dtype)
    assert (
        float((acts[..., list(SPEC.dims)][known] - code[own[:, None].expand_as(read)[known]]).abs().max())
        < 0.5
    )

    # setting the flags to the other concept moves the prediction to its tokens (measured: mass 0.70-0.75 of
    # the 0.75 a topic's tokens can get, against 0.003-0.009 for the prompt's concept)
    clean = _concept_mass(model, batch.tokens)
    other = 1 - own
    steered = _concept_mass(model, batch.tokens, other)
    to_other = _of(steered, other)[known]
    to_own = _of(steered, own)[known]
    assert float(_of(clean, other)[known].mean()) < 0.1
    assert float(to_other.mean()) > 0.5 and float(to_own.mean()) < 0.1

    # inert otherwise: writing the code of the concept the model writes itself changes nothing measurable (KL
    # measured 1e-6 to 3e-5 nats), and steering leaves the non-flag dimensions exactly as they were
    with torch.no_grad():
        lp = torch.log_softmax(model(batch.tokens).double(), -1)
        with pp.steer(model, SPEC, own, positions=known):
            lp_own = torch.log_softmax(model(batch.tokens).double(), -1)
    kl = (lp.exp() * (lp - lp_own)).sum(-1)[known]
    assert float(kl.mean()) < 1e-3
    with pp.steer(model, SPEC, other):
        _, cache = model.run_with_cache(batch.tokens, names_filter=SPEC.hook)
    rest = [d for d in range(acts.shape[-1]) if d not in SPEC.dims]
    assert torch.equal(cache[SPEC.hook][..., rest], acts[..., rest])
    torch.testing.assert_close(
        cache[SPEC.hook][..., list(SPEC.dims)], code[other][:, None].expand(-1, acts.shape[1], -1)
    )

    # the LM itself keeps its quality (measured 0.07 nats above the optimum)
    with torch.no_grad():
        assert float(model(batch.tokens, return_type="loss")) < TASK.optimal_loss() + 0.15


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(
    "arch, sig, stop_at",
    [
        ("gpt2", signal.SIGTERM, 3),
        ("neox", signal.SIGINT, 5),
        ("llama", signal.SIGINT, 6),
        ("hooked_gpt2", signal.SIGINT, 4),
    ],
)
def test_train_flags_on_a_converted_model_stopped_by_a_signal_resumes_to_the_uninterrupted_run(
    tmp_path, monkeypatch, arch, sig, stop_at
):
    """The signal arrives during a step of stage 1, at the last step of stage 1, or in stage 2; the step
    finishes, the file holds it, and the resumed run ends with the uninterrupted run's weights, losses and
    stages, bit for bit. An unconverted GPT-2 with dropout (a random forward) resumes its dropout draws too."""
    kw = dict(stage1_steps=6, stage2_steps=4, batch_size=8, log_every=1, seed=4, quiet=True)
    straight = _model(arch)  # every model built anew from the same seed (and global random state after it)
    ref = pp.train_flags(straight, TASK, SPEC, **kw)
    real, calls = flags._lm_loss, []

    def interrupted(logits, targets):
        calls.append(1)
        if len(calls) == stop_at:
            os.kill(os.getpid(), sig)
        return real(logits, targets)

    monkeypatch.setattr(flags, "_lm_loss", interrupted)
    path = tmp_path / "flags.npz"
    lm = _model(arch)
    with pytest.raises(KeyboardInterrupt if sig == signal.SIGINT else Terminated):
        pp.train_flags(lm, TASK, SPEC, checkpoint=path, **kw)
    assert len(calls) == stop_at and _same_weights(lm, _model(arch))
    monkeypatch.setattr(flags, "_lm_loss", real)
    torch.manual_seed(1234)  # another global random state: the file holds the one to resume from
    res = pp.train_flags(lm, TASK, SPEC, checkpoint=path, **kw)
    assert (res.steps, res.stages, res.lm_losses, res.flag_losses) == (
        ref.steps,
        ref.stages,
        ref.lm_losses,
        ref.flag_losses,
    )
    assert _same_weights(lm, straight) and not lm.training


def test_bad_flag_inputs_are_refused_naming_the_argument():
    model = _model("native")
    tokens = TASK.sample(3, seed=0).tokens
    acts = torch.randn(3, 5, 32)
    run = dict(stage1_steps=1, stage2_steps=0, quiet=True)
    # dimensions beyond the hook's width, repeated, negative or not integers
    wide = pp.FlagSpec("blocks.1.hook_resid_pre", dims=(7, 2, 19, 32), num_concepts=2)
    with pytest.raises(ValueError, match=r"dims=\(7, 2, 19, 32\) has entries >= d_model=32.*0\.\.31"):
        pp.train_flags(model, TASK, wide, **run)
    with pytest.raises(ValueError, match=r"dims=.*>= d_model=32"):
        with pp.steer(model, wide, 0):
            pass
    with pytest.raises(ValueError, match=r"dims=.*>= d_model=32 of acts"):
        flags.flag_loss(acts, torch.zeros(3, dtype=torch.long), wide)
    with pytest.raises(ValueError, match=r"dims=\(7, 2, 7, 11\) repeats \[7\]; give distinct"):
        pp.FlagSpec(dims=(7, 2, 7, 11))
    with pytest.raises(ValueError, match=r"dims=.*negative"):
        pp.FlagSpec(dims=(7, -2, 19, 11))
    with pytest.raises(ValueError, match=r"dims=.*give a sequence of ints"):
        pp.FlagSpec(dims=(7, 2.5, 19, 11))
    with pytest.raises(TypeError, match=r"dims=.*no order"):
        pp.FlagSpec(dims={7, 2, 19, 11})
    # the unconverted adapter has no config to read the width from: the activation's width is checked
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=V,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=24,
            max_position_embeddings=32,
        )
    ).eval()
    far = pp.FlagSpec("blocks.1.hook_resid_pre", dims=(0, 1, 2, 16), num_concepts=2)
    with pytest.raises(ValueError, match=r"dims=\(0, 1, 2, 16\) has entries >= d_model=16"):
        with pp.steer(pp.hooked_hf(hf), far, 0):
            pp.hooked_hf(hf)(tokens)
    # concept labels of the wrong shape, dtype or range
    spec = pp.FlagSpec("blocks.1.hook_resid_pre", dims=(7, 2, 19, 11), num_concepts=2)
    for labels, message in (
        (torch.zeros(4, dtype=torch.long), r"concept_labels has shape \(4,\); give \(3,\) or \(3, 5\)"),
        (torch.zeros(3, 6, dtype=torch.long), r"concept_labels has shape \(3, 6\)"),
        (torch.zeros(3, 5, 1, dtype=torch.long), r"concept_labels has shape \(3, 5, 1\)"),
        (torch.tensor(1), r"concept_labels has shape \(\)"),
        (torch.zeros(3), r"concept_labels has dtype torch.float32; give integer"),
        (np.zeros(3), r"concept_labels has dtype torch.float64; give integer"),
        (torch.zeros(3, dtype=torch.bool), r"concept_labels has dtype torch.bool"),
        (torch.zeros(3, dtype=torch.complex64), r"concept_labels has dtype torch.complex64; give integer"),
        (torch.full((3,), 2), r"concept_labels has values in \[2, 2\]; give 0\.\.1"),
        (torch.full((3,), -2), r"concept_labels has values in \[-2, -2\]"),
    ):
        with pytest.raises(ValueError, match=message):
            flags.flag_loss(acts, labels, spec)
    with pytest.raises(TypeError, match=r"concept_labels is a str"):
        flags.flag_loss(acts, "01", spec)
    # steering concepts of the wrong shape or range
    for concept, message in (
        (torch.tensor([0, 1, 0, 1]), r"concept has shape \(4,\); give an int or a tensor of shape \(3,\)"),
        (torch.tensor([[0], [1], [0]]), r"concept has shape \(3, 1\)"),
        (2, r"concept=2 is out of range; give 0\.\.1"),
        (1.0, r"concept=1.0 is not valid"),
    ):
        with pytest.raises(ValueError, match=message):
            with pp.steer(model, spec, concept):
                model(tokens)


def test_a_hook_point_the_forward_never_reaches_is_an_error_not_untrained_flags():
    """A model that lists the hook point but whose forward runs another module there (a hook point replaced after
    the model was built): training and the report refuse it naming the hook, instead of an index error or a
    report on nothing."""
    from pypattern.models.hooks import HookPoint

    model = _model("native")
    model.blocks[1].hook_resid_pre = HookPoint()  # the listed one is no longer called
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        RuntimeError, match=r"train_flags: the model's forward did not reach hook='blocks.1.hook_resid_pre'"
    ):
        pp.train_flags(model, TASK, SPEC, stage1_steps=2, stage2_steps=0, batch_size=4, quiet=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(RuntimeError, match=r"flag_report: the model's forward did not reach hook="):
        pp.flag_report(model, TASK, SPEC, num_samples=8, gen_steps=2)
