"""pypattern's Transformer as the model converted Hugging Face models become: gradients of the loss with respect to
every parameter equal the Hugging Face model's (so one optimiser step trains both alike), the per-token loss
against a hand cross-entropy, token inputs at the edges (int32, one sequence, one position, exactly ``n_ctx``
and one more, no sequence), every hook point against a manual forward of a LayerNorm/GELU model (called once
each, edits including the norms' scales, gradients through the edits), the fixed-weights block with an
optimiser step inside it, copies, state dicts, casts and ``torch.compile``."""

from __future__ import annotations

import copy
import math
import zlib

import pytest
import torch
import torch.nn.functional as F

from pypattern.models import Transformer, TransformerConfig
from pypattern.models import packed as pk
from pypattern.models.transformer import _active_packs

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

V = 20  # vocabulary of the small Hugging Face models


def _hf(family: str):
    """A small float64 Hugging Face causal LM of ``family`` with every weight moved off its initial value."""
    tr = transformers
    torch.manual_seed(0)
    if family == "gpt2":
        cfg = tr.GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=8, vocab_size=V)
        model = tr.GPT2LMHeadModel(cfg)
    elif family == "llama_gqa":
        cfg = tr.LlamaConfig(
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=V,
            max_position_embeddings=16,
        )
        model = tr.LlamaForCausalLM(cfg)
    elif family == "neox":
        cfg = tr.GPTNeoXConfig(
            hidden_size=16,
            num_attention_heads=2,
            intermediate_size=32,
            num_hidden_layers=2,
            rotary_pct=0.5,
            vocab_size=V,
            max_position_embeddings=16,
        )
        model = tr.GPTNeoXForCausalLM(cfg)
    elif family == "gemma2":  # both soft caps active, a window shorter than the sequence on its local layer
        cfg = tr.Gemma2Config(
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            sliding_window=3,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0,
            vocab_size=V,
            max_position_embeddings=16,
            attn_implementation="eager",
        )
        model = tr.Gemma2ForCausalLM(cfg)
    else:
        cfg = tr.PhiConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            partial_rotary_factor=0.5,
            vocab_size=V,
            max_position_embeddings=16,
        )
        model = tr.PhiForCausalLM(cfg)
    model = model.double().eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _hf_loss(hf, tokens):
    """Mean next-token cross-entropy of the Hugging Face model, taken here in float64 (its own ``labels=`` loss
    casts the logits to float32)."""
    logits = hf(tokens).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), tokens[:, 1:].reshape(-1))


def _heads(w: torch.Tensor, heads: int) -> torch.Tensor:
    """An ``nn.Linear`` weight ``(heads * d_head, d_model)`` as TransformerLens' ``(heads, d_model, d_head)``."""
    return w.T.reshape(w.shape[1], heads, -1).permute(1, 0, 2)


def _tokens(batch=3, pos=7, seed=5, vocab=V):
    return torch.randint(0, vocab, (batch, pos), generator=torch.Generator().manual_seed(seed))


FAMILIES = ["gpt2", "llama_gqa", "neox", "gemma2", "phi"]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_parameters_gradient_equals_the_hugging_face_models(family):
    from pypattern import from_hf

    hf = _hf(family)
    model = from_hf(hf)
    tokens = _tokens()
    hf_loss, loss = _hf_loss(hf, tokens), model(tokens, return_type="loss")
    torch.testing.assert_close(loss, hf_loss, rtol=0, atol=1e-13)
    hf_loss.backward()
    loss.backward()
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}

    # a hand map for the projections whose layouts differ most
    if family == "gpt2":
        got = model.blocks[0].attn.W_Q.grad
        want = _heads(hf_grads["transformer.h.0.attn.c_attn.weight"][:, :16].T, 2)  # Conv1D: (in, out)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-13)
        torch.testing.assert_close(
            model.embed.W_E.grad, hf_grads["transformer.wte.weight"], rtol=0, atol=1e-13
        )  # tied: embedding and unembedding gradients added up in one parameter
    if family == "llama_gqa":
        attn = model.blocks[1].attn
        pre = "model.layers.1.self_attn."
        torch.testing.assert_close(
            attn.W_Q.grad, _heads(hf_grads[pre + "q_proj.weight"], 4), rtol=0, atol=1e-13
        )
        torch.testing.assert_close(
            attn.W_K.grad, _heads(hf_grads[pre + "k_proj.weight"], 2), rtol=0, atol=1e-13
        )
        torch.testing.assert_close(
            attn.W_V.grad, _heads(hf_grads[pre + "v_proj.weight"], 2), rtol=0, atol=1e-13
        )
        w_o = hf_grads[pre + "o_proj.weight"].T.reshape(4, -1, 16)
        torch.testing.assert_close(attn.W_O.grad, w_o, rtol=0, atol=1e-13)
        mlp = model.blocks[1].mlp
        torch.testing.assert_close(mlp.W_gate.grad, hf_grads["model.layers.1.mlp.gate_proj.weight"].T)
        torch.testing.assert_close(mlp.W_in.grad, hf_grads["model.layers.1.mlp.up_proj.weight"].T)
        torch.testing.assert_close(mlp.W_out.grad, hf_grads["model.layers.1.mlp.down_proj.weight"].T)
        torch.testing.assert_close(model.unembed.W_U.grad, hf_grads["lm_head.weight"].T, rtol=0, atol=1e-13)

    # every parameter: the conversion moves entries without scaling them, so a plain gradient step on the Hugging
    # Face model, converted again, is the converted model stepped by its own gradients
    lr = 1e-3
    with torch.no_grad():
        for p in hf.parameters():
            p -= lr * p.grad
    stepped = dict(from_hf(hf).named_parameters())
    names = [n for n, _ in model.named_parameters()]
    assert set(names) == set(stepped)
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        implied = (p.detach() - stepped[name].detach()) / lr
        scale = max(float(p.grad.abs().max()), 1e-3)
        assert float((implied - p.grad).abs().max()) / scale < 1e-9, name


@pytest.mark.parametrize("family", ["llama_gqa", "gemma2"])
def test_one_adamw_step_trains_the_converted_model_as_the_hugging_face_one(family):
    from pypattern import from_hf

    hf = _hf(family)
    model = from_hf(hf)
    tokens, probe = _tokens(), _tokens(seed=6)
    for m, loss_fn in (
        (hf, lambda: _hf_loss(hf, tokens)),
        (model, lambda: model(tokens, return_type="loss")),
    ):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
        loss_fn().backward()
        opt.step()
    after = model(probe, return_type="loss")
    torch.testing.assert_close(after, _hf_loss(hf, probe), rtol=0, atol=1e-12)
    before = from_hf(_hf(family))(probe, return_type="loss")
    assert abs(float(after.detach() - before.detach())) > 1e-4  # the step moved the loss


# ----- the forward's inputs and return types ----------------------------------------------------------------------


def _small(dtype=torch.float64, **kw) -> Transformer:
    cfg = dict(n_layers=2, d_model=16, n_heads=2, d_mlp=24, d_vocab=11, n_ctx=6, seed=0, dtype=dtype)
    model = Transformer(TransformerConfig(**{**cfg, **kw}))
    with torch.no_grad():  # biases and norm weights away from zeros and ones
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if not name.rsplit(".", 1)[-1].startswith("W_"):
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return model


def test_per_token_loss_equals_a_hand_cross_entropy():
    model = _small()
    tokens = _tokens(3, 6, vocab=11)
    logits = model(tokens)
    want = torch.empty(3, 5, dtype=torch.float64)
    for b in range(3):
        for i in range(5):
            row = logits[b, i].detach()
            want[b, i] = math.log(sum(math.exp(float(v)) for v in row)) - float(row[tokens[b, i + 1]])
    per_tok = model(tokens, return_type="per_token_loss")
    torch.testing.assert_close(per_tok, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(model(tokens, return_type="loss"), want.mean(), rtol=0, atol=1e-12)
    both = model(tokens, return_type="both")
    torch.testing.assert_close(both[0], logits, rtol=0, atol=0)
    torch.testing.assert_close(both[1], want.mean(), rtol=0, atol=1e-12)
    assert model(tokens, return_type=None) is None


def test_token_inputs_at_the_edges():
    model = _small()
    tokens = _tokens(2, 6, vocab=11)
    logits = model(tokens)
    assert torch.equal(model(tokens.to(torch.int32)), logits)
    # one sequence, read as a batch of one (a product over fewer rows may round otherwise)
    torch.testing.assert_close(model(tokens[1]), logits[1:], rtol=0, atol=1e-13)
    one = model(tokens[1].to(torch.int32), return_type="per_token_loss")
    assert torch.equal(one, model(tokens[1:], return_type="per_token_loss"))
    # causal: a prefix gives the prefix's logits, down to one position
    for n in (1, 3):
        torch.testing.assert_close(model(tokens[:, :n]), logits[:, :n], rtol=0, atol=1e-13)
    assert model(tokens[:, :1], return_type="per_token_loss").shape == (2, 0)
    with pytest.raises(ValueError, match="next token"):
        model(tokens[:, :1], return_type="loss")
    # exactly n_ctx positions reads every learned position; one more is refused naming n_ctx
    assert model(tokens).shape == (2, 6, 11)
    with pytest.raises(ValueError, match="n_ctx"):
        model(torch.zeros(2, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="n_ctx"):
        model(torch.zeros(7, dtype=torch.long))
    # no sequence: empty logits and per-token losses, a mean loss refused
    assert model(tokens[:0]).shape == (0, 6, 11)
    assert model(tokens[:0], return_type="per_token_loss").shape == (0, 5)
    with pytest.raises(ValueError, match="next token"):
        model(tokens[:0], return_type="both")


# ----- hook points against a manual forward --------------------------------------------------------------------


def _manual(model: Transformer, tokens: torch.Tensor, edits: dict, seen: dict) -> torch.Tensor:
    """The forward of a LayerNorm/GELU model with learned positions, written from its weights: ``edits[name]``
    applied where the hook point ``name`` sits, each activation recorded in ``seen``."""

    def at(name, t):
        t = edits[name](t) if name in edits else t
        seen[name] = t
        return t

    def ln(x, pre, w, b):
        c = x - x.mean(-1, keepdim=True)
        scale = at(pre + "hook_scale", (c.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt())
        return at(pre + "hook_normalized", c / scale * w + b)

    T = tokens.shape[1]
    x = at("hook_embed", model.embed.W_E[tokens]) + at(
        "hook_pos_embed", model.pos_embed.W_pos[:T].expand(tokens.shape[0], T, -1)
    )
    causal = torch.ones(T, T, dtype=torch.bool).triu(1)
    for layer, blk in enumerate(model.blocks):
        a, p = blk.attn, f"blocks.{layer}."
        x = at(p + "hook_resid_pre", x)
        h = ln(x, p + "ln1.", blk.ln1.w, blk.ln1.b)
        q = at(p + "attn.hook_q", torch.einsum("bpd,hde->bphe", h, a.W_Q) + a.b_Q)
        k = at(p + "attn.hook_k", torch.einsum("bpd,hde->bphe", h, a.W_K) + a.b_K)
        v = at(p + "attn.hook_v", torch.einsum("bpd,hde->bphe", h, a.W_V) + a.b_V)
        s = torch.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(q.shape[-1])
        s = at(p + "attn.hook_attn_scores", s.masked_fill(causal, float("-inf")))
        pat = at(p + "attn.hook_pattern", torch.softmax(s, -1))
        z = at(p + "attn.hook_z", torch.einsum("bhqk,bkhe->bqhe", pat, v))
        x = at(
            p + "hook_resid_mid", x + at(p + "hook_attn_out", torch.einsum("bqhe,hed->bqd", z, a.W_O) + a.b_O)
        )
        h = ln(x, p + "ln2.", blk.ln2.w, blk.ln2.b)
        pre = at(p + "mlp.hook_pre", h @ blk.mlp.W_in + blk.mlp.b_in)
        post = at(p + "mlp.hook_post", 0.5 * pre * (1 + torch.erf(pre / math.sqrt(2))))
        x = at(p + "hook_resid_post", x + at(p + "hook_mlp_out", post @ blk.mlp.W_out + blk.mlp.b_out))
    x = ln(x, "ln_final.", model.ln_final.w, model.ln_final.b)
    return x @ model.unembed.W_U + model.unembed.b_U


def test_every_hook_point_is_called_once_with_the_manual_forwards_value():
    model = _small()
    tokens = _tokens(2, 5, vocab=11)
    calls: dict[str, list] = {}

    def record(t, hook):
        calls.setdefault(hook.name, []).append(t.detach().clone())

    out = model.run_with_hooks(tokens, fwd_hooks=[(lambda name: True, record)])
    seen: dict = {}
    ref = _manual(model, tokens, {}, seen)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    assert set(calls) == set(seen) == set(model.hook_names()), set(calls) ^ set(seen)
    for name, got in calls.items():
        assert len(got) == 1, name
        want = seen[name].detach()
        assert got[0].shape == want.shape, name
        assert torch.equal(torch.isfinite(got[0]), torch.isfinite(want)), name
        ok = torch.isfinite(want)
        torch.testing.assert_close(got[0][ok], want[ok], rtol=0, atol=1e-12, msg=name)


def test_an_edit_at_every_hook_point_equals_the_manual_forwards_with_its_gradients():
    """Under autograd (hook edits as attribution patching makes them), the norms' scales included."""
    model = _small()
    tokens = _tokens(2, 5, vocab=11)
    for name in model.hook_names():
        seen: dict = {}
        _manual(model, tokens, {}, seen)
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        if name.endswith("hook_scale"):  # a positive change of the scale
            factor = 1.0 + 0.5 * torch.rand(seen[name].shape, generator=g, dtype=torch.float64)
            edit = lambda t, f=factor: t * f  # noqa: E731
        else:
            delta = 0.3 * torch.randn(seen[name].shape, generator=g, dtype=torch.float64)
            if name.endswith(("hook_pattern", "hook_attn_scores")):
                delta = delta.tril()  # masked entries stay masked
            edit = lambda t, d=delta: t + d  # noqa: E731
        ref = _manual(model, tokens, {name: edit}, {})
        want = torch.autograd.grad(ref.square().sum(), list(model.parameters()), allow_unused=True)
        out = model.run_with_hooks(tokens, fwd_hooks=[(name, lambda t, hook, e=edit: e(t))])
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-11, msg=name)
        got = torch.autograd.grad(out.square().sum(), list(model.parameters()), allow_unused=True)
        for (pname, _), a, b in zip(model.named_parameters(), got, want):
            if b is None:
                assert a is None or not a.any(), (name, pname)
            else:
                torch.testing.assert_close(a, b, rtol=0, atol=1e-9, msg=f"{name}: {pname}")


@pytest.mark.parametrize(
    "kw",
    [
        {},
        dict(
            normalization_type="RMS", positional_embedding_type="rotary", n_key_value_heads=1, gated_mlp=True
        ),
    ],
    ids=["gpt2_like", "llama_like"],
)
def test_in_place_edits_under_autograd_equal_out_of_place_ones(kw):
    """TransformerLens' hooks edit activations in place (``pattern[:, h] = 0``); under autograd such an edit gives
    the output and gradients of the same edit made out of place, at every hook point whose value no operation
    keeps for its backward (the pattern included: the softmax keeps its own output, never the hooks' tensor)."""
    model = _small(**kw)
    tokens = _tokens(2, 5, vocab=11)
    params = list(model.parameters())
    for name in model.hook_names():
        if name.endswith("hook_scale"):  # the square root keeps its output for its backward
            continue
        runs = []
        for in_place in (False, True):

            def edit(t, hook, in_place=in_place):
                if in_place:
                    t[:, 1:] *= 0.5
                    return None
                return torch.cat([t[:, :1], t[:, 1:] * 0.5], dim=1)

            out = model.run_with_hooks(tokens, fwd_hooks=[(name, edit)])
            grads = torch.autograd.grad(out.square().sum(), params, allow_unused=True)
            runs.append((out, grads))
        (a, ga), (b, gb) = runs
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12, msg=name)
        for x, y in zip(ga, gb):
            assert (x is None) == (y is None), name
            if x is not None:
                torch.testing.assert_close(y, x, rtol=0, atol=1e-10, msg=name)


# ----- fixed weights, copies, state dicts, casts, compile -------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {},
        dict(
            normalization_type="RMS",
            positional_embedding_type="rotary",
            n_key_value_heads=1,
            gated_mlp=True,
            act_fn="silu",
            tie_word_embeddings=True,
            qk_norm=True,
            attn_bias=False,
        ),
    ],
    ids=["gpt2_like", "llama_like"],
)
@pytest.mark.parametrize("packed", [False, True], ids=["mm", "onednn_packed"])
def test_fixed_weights_block_equals_plain_runs_and_sees_an_optimiser_step(kw, packed, monkeypatch):
    if packed:  # every product of the block through oneDNN, every weight packed from its first use
        if not pk._ops_present():
            pytest.skip("oneDNN's matmul ops are not built into this torch")
        monkeypatch.setattr(pk, "_CHOICE", True)
        monkeypatch.setattr(pk.PackedWeights, "PACK_AFTER_ROWS", 0)
        monkeypatch.setattr(pk.PackedWeights, "MIN_MACS", 0)
    model = _small(torch.float32, d_model=32, n_heads=4, d_mlp=48, n_ctx=16, **kw)
    tokens = _tokens(4, 16, vocab=11)
    twin = copy.deepcopy(model)
    plain = model(tokens)
    close = dict(rtol=1e-5, atol=1e-5) if packed else dict(rtol=0, atol=0)  # oneDNN rounds otherwise
    with model.fixed_weights(max_pack_bytes=None) as same:
        assert same is model
        assert torch.equal(model(tokens), plain)
        with torch.no_grad():
            torch.testing.assert_close(model(tokens), plain, **close)  # the layouts are made here and reused
            torch.testing.assert_close(model(tokens), plain, **close)
        assert bool(_active_packs()._packs) == packed  # the packed copies were made and read
        for m in (model, twin):  # the same step inside the block and outside any block
            opt = torch.optim.AdamW(m.parameters(), lr=0.05)
            m(tokens, return_type="loss").backward()
            opt.step()
        with torch.no_grad():
            inside = model(tokens)
    with torch.no_grad():
        outside = twin(tokens)
        assert torch.equal(model(tokens), outside)
    torch.testing.assert_close(inside, outside, **close)
    assert (inside - plain).abs().max() > 1e-3


def test_copies_state_dicts_and_casts_equal_fresh_models():
    kw = dict(
        normalization_type="RMS", positional_embedding_type="rotary", n_key_value_heads=1, gated_mlp=True
    )
    for opts in ({}, kw):
        model = _small(torch.float32, **opts)
        tokens = _tokens(2, 6, vocab=11)
        logits = model(tokens)
        clone = copy.deepcopy(model)
        assert torch.equal(clone(tokens), logits)
        assert clone.embed.W_E.data_ptr() != model.embed.W_E.data_ptr()
        fresh = Transformer(TransformerConfig(**{**model.cfg.to_dict(), "seed": 7}))
        fresh.load_state_dict(model.state_dict())
        assert torch.equal(fresh(tokens), logits)
        for dtype in (torch.float64, torch.bfloat16, torch.float16):
            cast = copy.deepcopy(model).to(dtype)
            assert cast.cfg.dtype == dtype and model.cfg.dtype == torch.float32
            made = Transformer(TransformerConfig(**{**model.cfg.to_dict(), "dtype": dtype}))
            made.load_state_dict({k: v.to(dtype) for k, v in model.state_dict().items()})
            out = cast(tokens)
            assert out.dtype == dtype
            assert torch.equal(out, made(tokens)), dtype
            back = Transformer(model.cfg)  # float32, loaded with the cast weights
            back.load_state_dict({k: v.to(torch.float32) for k, v in cast.state_dict().items()})
            assert torch.equal(cast.to(torch.float32)(tokens), back(tokens)), dtype


def test_weight_accessors_stack_the_layers_parameters():
    model = _small(n_heads=4, n_key_value_heads=2, d_model=16)
    for acc, leaf, where, kv in [
        ("W_Q", "W_Q", "attn", False),
        ("W_K", "W_K", "attn", True),
        ("W_V", "W_V", "attn", True),
        ("W_O", "W_O", "attn", False),
        ("b_Q", "b_Q", "attn", False),
        ("b_K", "b_K", "attn", True),
        ("b_O", "b_O", "attn", False),
        ("W_in", "W_in", "mlp", False),
        ("W_out", "W_out", "mlp", False),
        ("b_in", "b_in", "mlp", False),
        ("b_out", "b_out", "mlp", False),
    ]:
        got = getattr(model, acc)
        for layer, blk in enumerate(model.blocks):
            p = getattr(getattr(blk, where), leaf)
            for h in range(got.shape[1]) if where == "attn" and leaf != "b_O" else [None]:
                want = p if h is None else p[h // 2 if kv else h]
                assert torch.equal(got[layer] if h is None else got[layer, h], want), (acc, layer, h)
    assert model.W_E is model.embed.W_E and model.W_U is model.unembed.W_U and model.b_U is model.unembed.b_U
    tokens = _tokens(1, 4, vocab=11)
    _, cache = model.run_with_cache(tokens)
    q = torch.einsum("bpd,hde->bphe", cache["blocks.1.ln1.hook_normalized"], model.W_Q[1]) + model.b_Q[1]
    torch.testing.assert_close(cache["blocks.1.attn.hook_q"], q, rtol=0, atol=1e-12)


def test_torch_compile_equals_eager():
    model = _small(torch.float32, n_layers=1)
    tokens = _tokens(2, 6, vocab=11)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
    torch.testing.assert_close(compiled(tokens), model(tokens), rtol=1e-6, atol=1e-6)
    loss = compiled(tokens, return_type="loss")
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(tokens, return_type="loss").backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize(
    "kw",
    [
        dict(post_embedding_ln=True),
        dict(
            normalization_type="RMS",
            norm_weight_offset=1.0,
            use_normalization_before_and_after=True,
            qk_norm=True,
            positional_embedding_type="rotary",
            gated_mlp=True,
        ),
    ],
    ids=["layer_norms", "offset_rms_norms"],
)
def test_init_weights_gives_a_trained_model_the_weights_of_a_fresh_one(kw):
    """Every weight matrix redrawn, every bias zero and every norm weight at its initial value, as documented."""
    trained = _small(seed=3, **kw)  # biases and norm weights moved off their initial values
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.1)
    trained.init_weights(5)
    fresh = Transformer(TransformerConfig(**{**trained.cfg.to_dict(), "seed": 5}))
    got, want = trained.state_dict(), fresh.state_dict()
    assert list(got) == list(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_backward_hooks_see_the_manual_forwards_gradients():
    model = _small()
    tokens = _tokens(2, 5, vocab=11)
    seen: dict = {}
    ref = _manual(model, tokens, {}, seen)
    for t in seen.values():
        t.retain_grad()
    ref.square().sum().backward()
    got: dict = {}

    def record(grad, hook):
        got[hook.name] = grad.detach().clone()

    for name in model.hook_names():
        model.add_hook(name, record, dir="bwd")
    try:
        model(tokens).square().sum().backward()
    finally:
        model.reset_hooks()
    assert set(got) == set(seen)
    for name, t in seen.items():
        ok = torch.isfinite(t)  # masked scores: -inf, gradient 0 on both sides
        torch.testing.assert_close(got[name][ok], t.grad[ok], rtol=0, atol=1e-10, msg=name)
