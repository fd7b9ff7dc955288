"""Estimators on Hugging Face models used as they are, with batches as users hold them, checked independently:

* SGLD under a head's mask (GPT-2's fused Conv1D, GPT-NeoX's per-head fused rows, Llama's grouped-query split
  projections, Phi-3's fused grouped rows, query heads and shared key/value heads) moves exactly the entries a
  layout written out here by hand assigns to that head: read from the parameters that moved during sampling;
* the unconverted model and its ``from_hf`` conversion in float64 give the same loss traces, per-head
  susceptibilities and BIFs on right-padded dict batches with prompt tokens labelled -100 (the noise off: SGLD is
  then an elementwise drift, which a conversion's reordering of weight entries does not change; with the noise on,
  the noise of an entry is keyed by its parameter's index and the entry's offset, which a conversion reorders);
* the token ids at padding positions, left padded or on both sides, change no estimate;
* the per-sample gradient Gram of a model with a scaled word embedding (Gemma's, whose forward returns ``W[ids] *
  embed_scale``) equals the Gram of per-sample autograd gradients.
"""

import warnings

import numpy as np
import pytest
import torch

import pypattern as pp
from pypattern.gram import gram_parameters
from pypattern.losses import counted_entries, sample_losses
from pypattern.models.hf import HAS_TRANSFORMERS

pytestmark = [
    pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed"),
    pytest.mark.usefixtures("one_thread"),
]

V = 31
D, H, KV, DH = 24, 4, 2, 6  # width, query heads, key/value heads, head width


def _config(arch):
    import transformers as tr

    common = dict(vocab_size=V, max_position_embeddings=16, num_hidden_layers=2, intermediate_size=20)
    return {
        "gpt2": lambda: tr.GPT2Config(vocab_size=V, n_positions=16, n_embd=D, n_layer=2, n_head=H, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0),
        "neox": lambda: tr.GPTNeoXConfig(**common, hidden_size=D, num_attention_heads=H, rotary_pct=1 / 3,
                                         bos_token_id=0, eos_token_id=0),
        "llama": lambda: tr.LlamaConfig(**common, hidden_size=D, num_attention_heads=H, num_key_value_heads=KV,
                                        attention_bias=True, tie_word_embeddings=False),
        "qwen2": lambda: tr.Qwen2Config(**common, hidden_size=D, num_attention_heads=H, num_key_value_heads=KV),
        "phi3": lambda: tr.Phi3Config(**common, hidden_size=D, num_attention_heads=H, num_key_value_heads=KV,
                                      pad_token_id=0, bos_token_id=0, eos_token_id=0),
        "gemma": lambda: tr.GemmaConfig(**common, hidden_size=20, num_attention_heads=3, num_key_value_heads=1,
                                        head_dim=6),
    }[arch]()  # fmt: skip


def _build(arch, attn="sdpa"):
    import transformers as tr

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = tr.AutoModelForCausalLM.from_config(_config(arch), attn_implementation=attn).double().eval()
    with torch.no_grad():  # biases and norms start at zero / one: make every parameter matter
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def _padded(t, mode, k=2, pad=3, prompt=0):
    """Rows of ``t`` with ``k`` padding columns (token ``pad``) on the right, the left, or ``i % (k + 1)`` on the
    left of row ``i`` and the rest on the right; labels -100 at the padding and at each row's first ``prompt``
    real tokens."""
    rows, masks, labels = [], [], []
    n = t.shape[1]
    for i in range(t.shape[0]):
        left = {"right": 0, "left": k, "both": i % (k + 1)}[mode]
        ids = torch.cat([torch.full((left,), pad), t[i], torch.full((k - left,), pad)])
        am = torch.cat([torch.zeros(left), torch.ones(n), torch.zeros(k - left)]).long()
        lab = torch.where(am.bool(), ids, -100)
        lab[left : left + prompt] = -100
        rows.append(ids)
        masks.append(am)
        labels.append(lab)
    return {
        "input_ids": torch.stack(rows),
        "attention_mask": torch.stack(masks),
        "labels": torch.stack(labels),
    }


def _data(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, V, (4, 6), generator=g) for _ in range(2)], torch.randint(
        4, V, (3, 5), generator=g
    )


# ------------------------------------------------------------------------ head masks: the entries that moved


def _rows(n, spans):
    m = torch.zeros(n, dtype=torch.bool)
    for a, b in spans:
        m[a:b] = True
    return m


def _by_hand(arch, comp, h):
    """The entries of ``comp`` ("head" or "kv_head") ``h`` of layer 1, from each family's layout as its forward
    reads it."""
    q = (h * DH, (h + 1) * DH)
    if arch == "gpt2":  # Conv1D (d_in, d_out): columns q | k | v, each head after head; c_proj rows
        cols = _rows(3 * D, [q, (D + q[0], D + q[1]), (2 * D + q[0], 2 * D + q[1])])
        return {
            "transformer.h.1.attn.c_attn.weight": cols.expand(D, -1),
            "transformer.h.1.attn.c_attn.bias": cols,
            "transformer.h.1.attn.c_proj.weight": _rows(D, [q])[:, None].expand(-1, D),
        }
    if arch == "neox":  # rows viewed as (heads, 3 * d_head): head h's q, k, v together
        rows = _rows(3 * D, [(3 * DH * h, 3 * DH * (h + 1))])
        return {
            "gpt_neox.layers.1.attention.query_key_value.weight": rows[:, None].expand(-1, D),
            "gpt_neox.layers.1.attention.query_key_value.bias": rows,
            "gpt_neox.layers.1.attention.dense.weight": _rows(D, [q])[None, :].expand(D, -1),
        }
    if arch == "llama":
        if comp == "head":
            r = _rows(D, [q])
            return {
                "model.layers.1.self_attn.q_proj.weight": r[:, None].expand(-1, D),
                "model.layers.1.self_attn.q_proj.bias": r,
                "model.layers.1.self_attn.o_proj.weight": r[None, :].expand(D, -1),
            }
        r = _rows(KV * DH, [q])
        return {
            f"model.layers.1.self_attn.{p}_proj.{w}": (r[:, None].expand(-1, D) if w == "weight" else r)
            for p in "kv"
            for w in ("weight", "bias")
        }
    # phi3: qkv_proj rows q heads | k heads | v heads
    if comp == "head":
        return {
            "model.layers.1.self_attn.qkv_proj.weight": _rows(D + 2 * KV * DH, [q])[:, None].expand(-1, D),
            "model.layers.1.self_attn.o_proj.weight": _rows(D, [q])[None, :].expand(D, -1),
        }
    k0, v0 = D + h * DH, D + KV * DH + h * DH
    rows = _rows(D + 2 * KV * DH, [(k0, k0 + DH), (v0, v0 + DH)])
    return {"model.layers.1.self_attn.qkv_proj.weight": rows[:, None].expand(-1, D)}


@pytest.mark.parametrize(
    "arch, comp",
    [("gpt2", "head"), ("neox", "head"), ("llama", "head"), ("llama", "kv_head"), ("phi3", "head"),
     ("phi3", "kv_head")],
)  # fmt: skip
def test_sampling_under_a_heads_mask_moves_exactly_the_entries_of_that_head(arch, comp):
    m = _build(arch)
    data, _ = _data()
    loader = [_padded(t, "right", prompt=1) for t in data]
    w0 = {n: p.detach().clone() for n, p in m.named_parameters()}
    moved = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in w0.items()}

    def record(model, batch):
        for n, p in model.named_parameters():
            moved[n] |= p.detach() != w0[n]
        return torch.zeros(())

    masks = pp.component_masks(m, f"blocks.1.attn.{comp}.1")
    pp.sample(m, loader, masks=masks, observables={"moved": record}, num_chains=1, num_draws=3, step_size=1e-3,
              localization=10.0, seed=2, quiet=True, warn_nonstationary=False)  # fmt: skip
    want = _by_hand(arch, comp, 1)
    for n in moved:
        expected = want.get(n, torch.zeros_like(moved[n]))
        assert torch.equal(moved[n], expected), n
    assert all(bool(v.any()) for v in want.values())
    for n, p in m.named_parameters():  # w* restored
        assert torch.equal(p.detach(), w0[n])


# --------------------------------------------------- unconverted and converted models on padded dict batches


KW = dict(num_chains=2, num_draws=3, num_burnin_steps=1, step_size=1e-3, localization=10.0, seed=4, quiet=True,
          warn_nonstationary=False, noise_scale=0.0)  # fmt: skip


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama", "qwen2", "phi3", "gemma"])
def test_unconverted_and_converted_models_agree_on_padded_batches_with_prompt_labels(arch):
    hf = _build(arch)
    tf = pp.from_hf(hf)
    data, probe = _data()
    loader = [_padded(t, "right", prompt=2) for t in data]
    p = _padded(probe, "right", prompt=1)
    a = pp.estimate_llc(hf, loader, **KW).loss_trace
    b = pp.estimate_llc(tf, loader, **KW).loss_trace
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)
    comps = ["blocks.1.attn.head.1", "blocks.0.mlp", "embed"]
    if arch in ("llama", "qwen2", "phi3", "gemma"):
        comps.append("blocks.1.attn.kv_head.0")
    ours = pp.susceptibilities(hf, loader, p, {c: pp.component_masks(hf, c) for c in comps}, **KW).chi
    theirs = pp.susceptibilities(tf, loader, p, comps, **KW).chi
    np.testing.assert_allclose(ours, theirs, rtol=1e-8, atol=1e-11 * np.abs(theirs).max())
    counted = counted_entries(p).reshape(-1).numpy()
    assert (np.abs(ours).max(axis=0) > 0)[counted].all() and (ours[:, ~counted] == 0).all()
    ba, bb = pp.bif(hf, loader, p, **KW).bif, pp.bif(tf, loader, p, **KW).bif
    np.testing.assert_allclose(ba, bb, rtol=1e-8, atol=1e-11 * np.abs(bb).max())


@pytest.mark.parametrize("arch, mode", [("gpt2", "both"), ("phi3", "left"), ("gemma", "both")])
def test_the_token_ids_at_padding_change_no_estimate(arch, mode):
    m = _build(arch)
    data, probe = _data()
    out = []
    for pad in (3, 17):
        loader = [_padded(t, mode, pad=pad) for t in data]
        p = _padded(probe, mode, pad=pad)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # GPT-2: left padding without position ids, named elsewhere
            out.append(
                (
                    pp.estimate_llc(m, loader, **{**KW, "noise_scale": 1.0}).loss_trace,
                    pp.susceptibilities(
                        m, loader, p, ["blocks.0.attn.head.1"], **{**KW, "noise_scale": 1.0}
                    ).chi,
                    pp.bif(m, loader, p, **{**KW, "noise_scale": 1.0}).bif,
                )
            )
    for x, y in zip(*out, strict=True):
        np.testing.assert_array_equal(x, y)
        assert np.abs(x).max() > 0


# ------------------------------------------------------------------------------- per-sample gradient Gram


def test_gram_of_a_scaled_word_embedding_equals_per_sample_autograd():
    m = _build("gemma")
    assert type(m.model.embed_tokens).forward is not torch.nn.Embedding.forward  # W[ids] * embed_scale
    data, _ = _data()
    x = _padded(data[0], "both")
    modules = [
        "model.embed_tokens",
        "lm_head",
        "model.layers.0.mlp",
    ]  # the unembedding is tied to the embedding
    params = dict(m.named_parameters())
    names = list(gram_parameters(m, modules))
    assert "model.embed_tokens.weight" in names
    rows = []
    for i in range(x["input_ids"].shape[0]):
        li = sample_losses(m, {k: v[i : i + 1] for k, v in x.items()}).sum()
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(li, [params[n] for n in names])]))
    r = torch.stack(rows)
    want = r @ r.T
    for check in (False, True):
        got = pp.per_sample_grad_gram(m, sample_losses, x, modules=modules, check=check)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_a_probe_the_models_own_logits_make_nan_is_named_with_where_to_look():
    """A model whose own logits are NaN on the probe (a probe token's embedding row is NaN): the error names the
    default loss, not a per_sample_loss_fn that was not given, and says to look at the model's own logits."""
    m = _build("llama", attn="eager")
    data, probe = _data()
    p = _padded(probe, "left")
    with torch.no_grad():
        m.get_input_embeddings().weight[int(p["input_ids"][0, -1])] = float("nan")
        assert torch.isnan(m(input_ids=p["input_ids"], attention_mask=p["attention_mask"]).logits).any()
    for run in (
        lambda: pp.susceptibilities(m, data, p, ["blocks.0.mlp"], **KW),
        lambda: pp.bif(m, data, p, **KW),
    ):
        with pytest.raises(
            ValueError, match=r"probe: the default probe loss .*its own logits are finite"
        ) as e:
            run()
        assert "per_sample_loss_fn" not in str(e.value)


def test_batched_chains_of_a_gradient_checkpointed_model_name_the_checkpointing():
    """batched=True on a model with gradient checkpointing on (which vmap does not run) names the checkpointing
    and how to turn it off; batched left at its default runs the chains one after another, giving the draws of
    the model without checkpointing."""
    base = _build("gpt2", attn="eager")
    data, _ = _data()
    want = pp.estimate_llc(base, data, **{**KW, "noise_scale": 1.0}).llc_per_chain
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers renames the method
        base.gradient_checkpointing_enable()
    with pytest.raises(RuntimeError, match=r"gradient checkpointing on.*gradient_checkpointing_disable\(\)"):
        pp.estimate_llc(base, data, **KW, batched=True)
    got = pp.estimate_llc(base, data, **{**KW, "noise_scale": 1.0}).llc_per_chain
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_gram_of_a_model_in_training_mode_with_dropout_reads_its_eval_forward():
    """A model left in train() mode with dropout: the Gram is that of the eval() forward (the same on every call,
    as the estimators read it), with a warning, and the model's mode is left as it was."""
    import transformers as tr

    torch.manual_seed(0)
    cfg = tr.GPTNeoXConfig(vocab_size=V, max_position_embeddings=16, num_hidden_layers=2, intermediate_size=20,
                           hidden_size=D, num_attention_heads=H, rotary_pct=1 / 3, hidden_dropout=0.3,
                           attention_dropout=0.3)  # fmt: skip
    m = tr.GPTNeoXForCausalLM(cfg).double()
    x = _data()[0][0]  # the reference's vmap runs no attention mask of a Hugging Face model
    want = pp.per_sample_grad_gram(m.eval(), sample_losses, x)
    m.train()
    for gram in (pp.per_sample_grad_gram, __import__("pypattern.gram").gram.per_sample_grad_gram_reference):
        with pytest.warns(UserWarning, match="training mode and has dropout") as w:
            got = gram(m, sample_losses, x)
        assert w[0].filename == __file__
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        assert m.training and m.gpt_neox.layers[0].post_attention_dropout.training


class _ScaledEmbedding(torch.nn.Embedding):
    """BART's form of a scaled word embedding: ``embed_scale`` a plain number."""

    def __init__(self, n, d, embed_scale):
        super().__init__(n, d)
        self.embed_scale = embed_scale

    def forward(self, ids):
        return super().forward(ids) * self.embed_scale


class _TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = _ScaledEmbedding(V, 8, 2.5)
        self.head = torch.nn.Linear(8, V)

    def forward(self, ids):
        return self.head(torch.tanh(self.embed(ids)))


def test_gram_of_an_embedding_scaled_by_a_number_equals_per_sample_autograd():
    torch.manual_seed(0)
    m = _TinyLM().double()
    x = _data()[0][0]
    want = pp.gram.per_sample_grad_gram_reference(m, sample_losses, x)
    torch.testing.assert_close(
        pp.per_sample_grad_gram(m, sample_losses, x, check=False), want, rtol=1e-10, atol=1e-12
    )
