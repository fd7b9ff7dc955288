"""SGLD and the LLC on models and batches as users hold them, against hand-written computations.

Hugging Face causal LMs used directly (GPT-2 with its tied head, Llama with grouped-query attention, GPT-NeoX,
Qwen2, OPT), pypattern's hooked ``Transformer``, and batches as ``DataLoader`` s yield them: dicts with padding and
-100 labels, ``TensorDataset`` token tensors, ``(x, y)`` pairs. Each run's loss trace is compared with a plain SGLD
loop written here: ``w <- w - eps/2 (nbeta grad L_batch(w) + gamma (w - w*)) + sqrt(eps) xi``, on the same batches in
loader order, with the loss computed as the documentation of :mod:`pypattern.losses` states (shifted labels, the
mean over the counted tokens). The noise ``xi`` is the documented keyed Philox stream
(:func:`pypattern.ops.sgld.reference.philox_normals` at chain ``c``'s key, tensor index = position among the
sampled tensors, op step = chain step); drift, loss, batch order and the choice of sampled tensors are computed
independently here.
"""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, TensorDataset

from pypattern.models.transformer import Transformer, TransformerConfig
from pypattern.ops.sgld.reference import philox_normals
from pypattern.sampling.diagnostics import NonFiniteLossError
from pypattern.sampling.llc import estimate_llc
from pypattern.sampling.optim import chain_seed, group_seed

tf = pytest.importorskip("transformers")

V = 40
EPS, NBETA, GAMMA, SEED = 1e-3, 5.0, 60.0, 11


# ----------------------------------------------------------------------------------------------------------------
# models and batches
# ----------------------------------------------------------------------------------------------------------------
def hf_model(family: str, **extra) -> nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=V, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "gpt2":
        cfg = tf.GPT2Config(n_positions=16, n_embd=16, n_layer=1, n_head=2, **common, **extra)
        return tf.GPT2LMHeadModel(cfg)
    if family == "llama":
        cfg = tf.LlamaConfig(
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=16,
            **common,
            **extra,
        )
        return tf.LlamaForCausalLM(cfg)
    if family == "neox":
        cfg = tf.GPTNeoXConfig(
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            **common,
            **extra,
        )
        return tf.GPTNeoXForCausalLM(cfg)
    if family == "qwen2":
        cfg = tf.Qwen2Config(
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=16,
            **common,
            **extra,
        )
        return tf.Qwen2ForCausalLM(cfg)
    if family == "opt":
        cfg = tf.OPTConfig(
            hidden_size=16,
            ffn_dim=24,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            word_embed_proj_dim=16,
            **common,
            **extra,
        )
        return tf.OPTForCausalLM(cfg)
    raise AssertionError(family)


def hooked(tie: bool = False, dtype=torch.float32) -> Transformer:
    cfg = TransformerConfig(
        n_layers=1,
        d_model=8,
        n_heads=2,
        d_head=4,
        d_vocab=V,
        n_ctx=8,
        d_mlp=16,
        act_fn="gelu",
        seed=0,
        tie_word_embeddings=tie,
        dtype=dtype,
    )
    return Transformer(cfg)


def padded_rows(n: int = 8, T: int = 7, seed: int = 1) -> list[dict]:
    """Right-padded sequences (pad id 0, attention_mask 0) whose labels are -100 at the padding and at the
    first two (prompt) positions, as a collator masking the prompt gives them."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        L = int(torch.randint(4, T + 1, (1,), generator=g))
        ids = torch.zeros(T, dtype=torch.long)
        ids[:L] = torch.randint(3, V, (L,), generator=g)
        am = (torch.arange(T) < L).long()
        labels = ids.clone()
        labels[L:] = -100
        labels[:2] = -100
        rows.append({"input_ids": ids, "attention_mask": am, "labels": labels})
    return rows


def tokens(n: int = 8, T: int = 6, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, V, (n, T), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------------
# the losses as documented, and SGLD by hand
# ----------------------------------------------------------------------------------------------------------------
def logits_of(model, ids, mask=None):
    if isinstance(model, tf.PreTrainedModel):
        return model(input_ids=ids, attention_mask=mask).logits
    return model(ids)


def dict_loss(model, b):
    """Mean next-token cross-entropy over the targets t+1 with labels != -100 and attention_mask 1 at t and t+1."""
    ids, am, labels = b["input_ids"], b.get("attention_mask"), b.get("labels", b["input_ids"])
    logits = logits_of(model, ids, am)[:, :-1].double()
    target = labels[:, 1:]
    counted = target != -100
    if am is not None:
        counted = counted & (am[:, 1:] == 1) & (am[:, :-1] == 1)
    ce = F.cross_entropy(logits.reshape(-1, V), target.clamp(min=0).reshape(-1), reduction="none")
    ce = ce.reshape(target.shape)
    return (ce * counted).sum() / counted.sum()


def token_loss(model, b):
    x = b[0] if isinstance(b, tuple | list) else b
    logits = logits_of(model, x)[:, :-1].double()
    return F.cross_entropy(logits.reshape(-1, V), x[:, 1:].reshape(-1))


def pair_loss(model, b):
    x, y = b
    return F.cross_entropy(model(x).double(), y)


def hand_sgld(model, batches, steps, loss, chain, accum=1, eps=EPS, nbeta=NBETA, gamma=GAMMA, seed=SEED):
    """The loss at each of ``steps`` steps of a plain SGLD loop over the parameters that require grad (each
    tensor once), reading ``batches`` in order and cycling, ``accum`` batches per step."""
    m = copy.deepcopy(model).eval()
    moving = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    w_star = {n: p.detach().clone() for n, p in moving}
    key = group_seed(chain_seed(seed, chain), 0)
    out, k = [], 0
    for t in range(steps):
        for p in m.parameters():
            p.grad = None
        vals = []
        for _ in range(accum):
            value = loss(m, batches[k % len(batches)])
            k += 1
            (value / accum).backward()
            vals.append(float(value.detach()))
        out.append(float(np.mean(vals)))
        with torch.no_grad():
            for i, (n, p) in enumerate(moving):
                xi = philox_normals(p.numel(), seed=key, tensor_index=i, step=t).reshape(p.shape).to(p.dtype)
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                p.add_(-eps / 2 * (nbeta * grad + gamma * (p - w_star[n])) + math.sqrt(eps) * xi)
    return np.array(out)


RUN = dict(
    step_size=EPS,
    nbeta=NBETA,
    localization=GAMMA,
    seed=SEED,
    quiet=True,
    warn_nonstationary=False,
)


def snapshot(model):
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        [m.training for m in model.modules()],
        {n: p.dtype for n, p in model.named_parameters()},
    )


def assert_unchanged(model, snap):
    state, flags, modes, dtypes = snap
    now = model.state_dict()
    assert all(torch.equal(v, now[k]) for k, v in state.items())
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert modes == [m.training for m in model.modules()]
    assert dtypes == {n: p.dtype for n, p in model.named_parameters()}


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face models, padded dict batches with -100 labels
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama", "neox", "qwen2", "opt"])
def test_hf_padded_dict_batches_follow_a_hand_written_sgld_loop(family):
    model = hf_model(family).eval()
    loader = DataLoader(padded_rows(), batch_size=2, shuffle=False)
    batches = list(loader)
    snap = snapshot(model)
    # burn-in 1, a draw every 2 steps: draws at steps 1, 3, 5
    res = estimate_llc(
        model, loader, num_chains=2, num_draws=3, num_burnin_steps=1, num_steps_bw_draws=2, **RUN
    )
    assert_unchanged(model, snap)
    with torch.no_grad():
        init = float(np.mean([float(dict_loss(model, b)) for b in batches]))  # the whole epoch: 4 batches
    assert res.init_loss == pytest.approx(init, abs=1e-6)
    for c in range(2):
        hand = hand_sgld(model, batches, 6, dict_loss, c)[[1, 3, 5]]
        np.testing.assert_allclose(res.loss_trace[c], hand, atol=2e-6, rtol=0)
    per_chain = NBETA * (res.loss_trace.mean(axis=1) - init)
    np.testing.assert_allclose(res.llc_per_chain, per_chain, atol=1e-5)
    assert res.llc_mean == pytest.approx(per_chain.mean(), abs=1e-5)
    assert res.llc_std == pytest.approx(per_chain.std(ddof=1), abs=1e-5)
    assert not np.array_equal(res.loss_trace[0], res.loss_trace[1])  # two chains, two noise streams


def test_hf_model_in_training_mode_with_dropout_runs_deterministic_and_keeps_its_mode():
    model = hf_model("gpt2", resid_pdrop=0.2, attn_pdrop=0.2, embd_pdrop=0.2)
    assert model.training  # a model built from a config is in training mode
    loader = DataLoader(padded_rows(), batch_size=2)
    snap = snapshot(model)
    with pytest.warns(UserWarning, match="dropout"):
        res = estimate_llc(model, loader, num_chains=1, num_draws=3, num_burnin_steps=0, **RUN)
    assert_unchanged(model, snap)
    hand = hand_sgld(model, list(loader), 3, dict_loss, 0)  # in eval mode
    np.testing.assert_allclose(res.loss_trace[0], hand, atol=2e-6, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_frozen_embeddings_stay_and_a_tied_head_is_sampled_once(family):
    """GPT-2's head is its token embedding (one tensor): frozen with it. Llama's head is its own tensor and moves.
    The hand loop samples each tensor that requires grad once; a tied tensor stepped twice, or a frozen one
    moved, would leave it."""
    model = hf_model(family).eval()
    emb = model.get_input_embeddings().weight
    emb.requires_grad_(False)
    head = model.get_output_embeddings().weight
    assert (head is emb) == (family == "gpt2")
    loader = DataLoader(padded_rows(), batch_size=2)
    seen = {}

    def cb(chain, draw, model):
        seen[(chain, draw)] = (
            model.get_input_embeddings().weight.detach().clone(),
            model.get_output_embeddings().weight.detach().clone(),
        )

    snap = snapshot(model)
    res = estimate_llc(model, loader, num_chains=2, num_draws=3, num_burnin_steps=0, callbacks=[cb], **RUN)
    assert_unchanged(model, snap)
    w_emb = snap[0][[k for k in snap[0] if k.endswith("embed_tokens.weight") or k.endswith("wte.weight")][0]]
    for c in range(2):
        np.testing.assert_allclose(
            res.loss_trace[c], hand_sgld(model, list(loader), 3, dict_loss, c), atol=2e-6
        )
        e, h = seen[(c, 2)]
        assert torch.equal(e, w_emb)  # the frozen embedding never moved
        assert torch.equal(h, w_emb) == (family == "gpt2")  # the untied head moved


# ----------------------------------------------------------------------------------------------------------------
# the hooked Transformer: token tensors, dicts, pairs; sequential and batched (vmap) chains
# ----------------------------------------------------------------------------------------------------------------
class LastPosition(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)[:, -1]


def _forms():
    toks = tokens()
    y = torch.randint(0, V, (8,), generator=torch.Generator().manual_seed(3))
    return {
        "tensordataset": (
            lambda: hooked(tie=True),
            DataLoader(TensorDataset(toks), batch_size=2),
            token_loss,
        ),
        "token_list": (lambda: hooked(), [toks[i : i + 2] for i in range(0, 8, 2)], token_loss),
        "padded_dicts": (lambda: hooked(tie=True), DataLoader(padded_rows(), batch_size=2), dict_loss),
        "pairs": (
            lambda: LastPosition(hooked()),
            DataLoader(TensorDataset(toks, y), batch_size=2),
            pair_loss,
        ),
    }


@pytest.mark.parametrize("form", ["tensordataset", "token_list", "padded_dicts", "pairs"])
@pytest.mark.parametrize("batched", [False, True])
def test_hooked_transformer_batch_forms_follow_a_hand_written_sgld_loop(form, batched):
    make, loader, loss = _forms()[form]
    model = make()
    snap = snapshot(model)
    res = estimate_llc(model, loader, num_chains=2, num_draws=4, num_burnin_steps=0, batched=batched, **RUN)
    assert res.sample.batched is batched
    assert_unchanged(model, snap)
    batches = list(loader)
    with torch.no_grad():
        init = float(np.mean([float(loss(model, b)) for b in batches]))
    assert res.init_loss == pytest.approx(init, abs=1e-6)
    for c in range(2):
        np.testing.assert_allclose(
            res.loss_trace[c], hand_sgld(model, batches, 4, loss, c), atol=2e-6, rtol=0
        )
    np.testing.assert_allclose(res.llc_per_chain, NBETA * (res.loss_trace.mean(axis=1) - init), atol=1e-5)


@pytest.mark.parametrize("batched", [False, True])
def test_gradient_accumulation_means_the_micro_batches_and_sets_the_default_nbeta(batched):
    model = hooked()
    toks = tokens(n=12)
    loader = [toks[i : i + 3] for i in range(0, 12, 3)]  # batch size 3
    res = estimate_llc(
        model,
        loader,
        num_chains=2,
        num_draws=3,
        num_burnin_steps=0,
        grad_accum_steps=2,
        batched=batched,
        **{**RUN, "nbeta": None},
    )
    m = 3 * 2
    nbeta = m / math.log(m)
    assert res.nbeta == pytest.approx(nbeta)
    for c in range(2):
        hand = hand_sgld(model, loader, 3, token_loss, c, accum=2, nbeta=nbeta)
        np.testing.assert_allclose(res.loss_trace[c], hand, atol=2e-6, rtol=0)


def test_many_batched_chains_equal_sequential_chains_and_are_reproducible_by_seed():
    model = hooked(tie=True)
    model.embed.W_E.requires_grad_(False)  # frozen (and tied): the vmap path must leave it too
    loader = DataLoader(TensorDataset(tokens()), batch_size=2, shuffle=True)
    kw = dict(num_chains=8, num_draws=3, num_burnin_steps=1, **RUN)
    seq = estimate_llc(model, loader, batched=False, **kw)
    bat = estimate_llc(model, loader, batched=True, **kw)
    assert bat.sample.batched and not seq.sample.batched
    np.testing.assert_allclose(bat.loss_trace, seq.loss_trace, atol=1e-6, rtol=0)
    assert bat.init_loss == seq.init_loss
    again = estimate_llc(model, loader, batched=True, **kw)
    np.testing.assert_array_equal(again.loss_trace, bat.loss_trace)
    assert len({tuple(np.round(r, 12)) for r in seq.loss_trace}) == 8  # every chain its own noise and batches
    other = estimate_llc(model, loader, batched=True, **{**kw, "seed": SEED + 1})
    assert np.abs(other.loss_trace - bat.loss_trace).max() > 1e-4
    # a chain run alone is the same chain
    alone = estimate_llc(model, loader, batched=False, chains=[5], **kw)
    np.testing.assert_array_equal(alone.loss_trace[5], seq.loss_trace[5])


# ----------------------------------------------------------------------------------------------------------------
# dtypes, devices, buffers
# ----------------------------------------------------------------------------------------------------------------
def test_float64_models_sample_in_float64():
    model = hooked(dtype=torch.float64)
    loader = DataLoader(padded_rows(), batch_size=2)
    snap = snapshot(model)
    res = estimate_llc(model, loader, num_chains=2, num_draws=3, num_burnin_steps=0, batched=False, **RUN)
    assert_unchanged(model, snap)
    for c in range(2):
        # float32 Philox noise cast to float64 on both sides: agreement to that noise's rounding times sqrt(eps)
        hand = hand_sgld(model, list(loader), 3, dict_loss, c)
        np.testing.assert_allclose(res.loss_trace[c], hand, atol=1e-7, rtol=0)
    hf = hf_model("llama").double().eval()
    res = estimate_llc(hf, loader, num_chains=1, num_draws=3, num_burnin_steps=0, **RUN)
    np.testing.assert_allclose(res.loss_trace[0], hand_sgld(hf, list(loader), 3, dict_loss, 0), atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_are_refused_naming_the_parameter(dtype):
    model = hf_model("qwen2").to(dtype).eval()
    loader = DataLoader(padded_rows(), batch_size=2)
    with pytest.raises(TypeError, match=r"model parameter 'model\.embed_tokens\.weight' has dtype .*float32"):
        estimate_llc(model, loader, num_chains=1, num_draws=2, **RUN)


def test_meta_parameters_and_meta_buffers_are_refused():
    loader = DataLoader(padded_rows(), batch_size=2)
    with torch.device("meta"):
        meta = tf.LlamaForCausalLM(hf_model("llama").config)
    with pytest.raises(ValueError, match="meta device"):
        estimate_llc(meta, loader, num_chains=1, num_draws=2, **RUN)
    model = hf_model("llama").eval()
    rot = model.model.rotary_emb
    rot.inv_freq = torch.empty_like(rot.inv_freq, device="meta")
    with pytest.raises(ValueError, match="buffers on the meta device.*inv_freq"):
        estimate_llc(model, loader, num_chains=1, num_draws=2, **RUN)


def test_buffers_a_forward_updates_are_restored_for_every_chain():
    class Normed(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = hooked()
            self.bn = nn.BatchNorm1d(V)

        def forward(self, x):
            return self.bn(self.inner(x).transpose(1, 2)).transpose(1, 2)

    model = Normed().train()  # running statistics updated by every forward
    loader = [t for t in tokens().split(2)]
    snap = snapshot(model)
    kw = dict(num_chains=3, num_draws=2, num_burnin_steps=1, **RUN)
    res = estimate_llc(model, loader, **kw)
    assert_unchanged(model, snap)
    alone = estimate_llc(model, loader, chains=[2], **kw)  # chain 2 does not see chains 0 and 1's statistics
    np.testing.assert_array_equal(alone.loss_trace[2], res.loss_trace[2])


# ----------------------------------------------------------------------------------------------------------------
# a batch the chains read later that has no counted target
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make,batched",
    [(lambda: hf_model("llama").eval(), False), (hooked, False), (hooked, True)],
    ids=["hf-llama", "hooked-sequential", "hooked-batched"],
)
def test_a_later_batch_without_counted_targets_is_named_as_such(make, batched):
    """L_n(w*) reads the first batch only; the chains' fourth batch labels every target -100. Its loss is 0/0:
    the error says the batch has no counted token (not "look for NaN or Inf in the tensors")."""
    batches = list(DataLoader(padded_rows(), batch_size=2))
    batches[3] = {**batches[3], "labels": torch.full_like(batches[3]["labels"], -100)}
    model = make()
    with pytest.raises(NonFiniteLossError, match="no counted token"):
        estimate_llc(
            model,
            batches,
            num_chains=2,
            num_draws=5,
            num_burnin_steps=0,
            num_init_loss_batches=1,
            batched=batched,
            **RUN,
        )


def test_hf_left_padding_without_position_ids_is_flagged_for_learned_positions():
    """GPT-2 reads learned absolute positions from the first column: a left-padded batch without
    ``position_ids`` shifts every real token's position, and the run warns."""
    rows = padded_rows()
    left = []
    for r in rows:
        shift = int((r["attention_mask"] == 0).sum())
        left.append({k: torch.roll(v, shift) for k, v in r.items()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        right = estimate_llc(
            hf_model("llama").eval(), DataLoader(rows, batch_size=2), num_chains=1, num_draws=2, **RUN
        )
        lft = estimate_llc(
            hf_model("llama").eval(), DataLoader(left, batch_size=2), num_chains=1, num_draws=2, **RUN
        )
    # rotary positions are relative: the same numbers either way
    np.testing.assert_allclose(lft.loss_trace, right.loss_trace, atol=1e-6)
    with pytest.warns(UserWarning, match="left padding without position_ids"):
        estimate_llc(
            hf_model("gpt2").eval(), DataLoader(left, batch_size=2), num_chains=1, num_draws=2, **RUN
        )


# ----------------------------------------------------------------------------------------------------------------
# moving parameters that get no gradient
# ----------------------------------------------------------------------------------------------------------------
class CheckpointedBlock(nn.Module):
    """Frozen embeddings, then a block under a reentrant checkpoint (whose input then does not require grad: the
    block's weights get no gradient although the loss depends on them), and a parameter the forward never uses."""

    def __init__(self, reentrant: bool):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(V, 8)
        self.emb.weight.requires_grad_(False)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
        self.unused = nn.Linear(8, 8)
        self.out = nn.Linear(8, V)
        self.reentrant = reentrant

    def forward(self, x):
        h = checkpoint(self.block, self.emb(x), use_reentrant=self.reentrant)
        return self.out(h)


def test_moving_parameters_whose_gradient_the_forward_cuts_are_flagged():
    loader = [t for t in tokens().split(2)]
    model = CheckpointedBlock(reentrant=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = estimate_llc(model, loader, num_chains=2, num_draws=3, num_burnin_steps=0, batched=False, **RUN)
    ours = [str(w.message) for w in caught if "got no gradient" in str(w.message)]
    assert len(ours) == 1  # once per call
    assert "'block.0.weight'" in ours[0] and "use_reentrant=False" in ours[0]
    assert "unused" not in ours[0]  # a parameter the loss does not use is not the problem
    # the check's probe forward leaves the chains as they were: the loop with the same (cut) gradients
    for c in range(2):
        np.testing.assert_allclose(res.loss_trace[c], hand_sgld(model, loader, 3, token_loss, c), atol=2e-6)


def test_parameters_the_loss_does_not_use_are_not_flagged():
    model = CheckpointedBlock(reentrant=False)  # gradients reach the block; 'unused' gets none
    loader = [t for t in tokens().split(2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = estimate_llc(model, loader, num_chains=2, num_draws=3, num_burnin_steps=0, batched=False, **RUN)
    assert not [w for w in caught if "got no gradient" in str(w.message)]
    for c in range(2):
        np.testing.assert_allclose(res.loss_trace[c], hand_sgld(model, loader, 3, token_loss, c), atol=2e-6)


# ----------------------------------------------------------------------------------------------------------------
# weights tied in memory but not as one Parameter
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batched", [False, None])
def test_two_parameters_sharing_memory_are_refused_not_untied(batched):
    """``lm_head.weight = nn.Parameter(wte.weight)`` ties the memory with two Parameters. The chains' copies of
    the model gave each its own memory: the run sampled an untied model (the head and the embedding apart, each
    with its part of the gradient), and its numbers were neither the tied model's nor the hand loop's."""
    model = hf_model("gpt2").eval()
    model.lm_head.weight = nn.Parameter(model.transformer.wte.weight)
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    loader = DataLoader(padded_rows(), batch_size=2)
    with pytest.raises(
        ValueError, match=r"'transformer\.wte\.weight' and 'lm_head\.weight' .* sharing memory"
    ):
        estimate_llc(model, loader, num_chains=1, num_draws=2, batched=batched, **RUN)
    # tied as one Parameter, as the message says: sampled once, as the hand loop does
    model.lm_head.weight = model.transformer.wte.weight
    res = estimate_llc(model, loader, num_chains=1, num_draws=3, num_burnin_steps=0, batched=batched, **RUN)
    np.testing.assert_allclose(res.loss_trace[0], hand_sgld(model, list(loader), 3, dict_loss, 0), atol=2e-6)


def test_disjoint_views_of_one_storage_are_sampled():
    """Parameters that are disjoint slices of one flat storage (a packed model) share a storage, not memory."""

    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            flat = torch.randn(8 * V + V)
            self.w = nn.Parameter(flat[: 8 * V].view(V, 8))
            self.b = nn.Parameter(flat[8 * V :])
            self.emb = nn.Embedding(V, 8)

        def forward(self, x):
            return self.emb(x) @ self.w.T + self.b

    model = Packed()
    assert model.w.untyped_storage().data_ptr() == model.b.untyped_storage().data_ptr()
    loader = [t for t in tokens().split(2)]
    res = estimate_llc(model, loader, num_chains=1, num_draws=3, num_burnin_steps=0, batched=False, **RUN)
    np.testing.assert_allclose(res.loss_trace[0], hand_sgld(model, loader, 3, token_loss, 0), atol=2e-6)
