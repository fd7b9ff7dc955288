"""``Transformer.forward(tokens, attention_mask=..., position_ids=...)`` against the Hugging Face forward.

Small random Hugging Face models of several families (learned, rotary, partial rotary, ALiBi positions; grouped-query
attention; sliding windows shorter than the sequence) are converted with :func:`pypattern.from_hf` and run on
left-padded, right-padded and mixed batches, with the family's default positions and with explicit ``position_ids``:
the real tokens' logits equal the Hugging Face model's in float64. Padding queries (which see no key) stay finite,
and so do the gradients of losses that leave them out. The hook points show the mask, the default loss rule of
:mod:`pypattern.losses` accepts left padding for the converted model and gives the Hugging Face model's per-token
losses, and bad masks and positions are refused by name.
"""

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from pypattern import from_hf  # noqa: E402
from pypattern import losses as L  # noqa: E402
from pypattern.models.hf import finite_padding  # noqa: E402
from pypattern.models.transformer import Transformer, TransformerConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

V, T = 97, 10
COMMON = dict(vocab_size=V, bos_token_id=0, eos_token_id=1, pad_token_id=None)

CASES = {
    "gpt2": ("GPT2", dict(n_layer=2, n_embd=32, n_head=4, n_positions=64)),
    "neox-partial-rotary": (
        "GPTNeoX",
        dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, rotary_pct=0.5
        ),
    ),
    "llama-gqa": (
        "Llama",
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=48,
        ),
    ),
    "mistral-window": (
        "Mistral",
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=48,
            sliding_window=4,
        ),
    ),
    "opt": (
        "OPT",
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=48,
            word_embed_proj_dim=32,
            max_position_embeddings=64,
        ),
    ),
    "bloom": ("Bloom", dict(hidden_size=32, n_layer=2, n_head=4)),
    "gptj": ("GPTJ", dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64)),
    "gpt-neo-local": (
        "GPTNeo",
        dict(
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            attention_types=[[["global", "local"], 1]],
            window_size=3,
            max_position_embeddings=64,
        ),
    ),
    "phi": (
        "Phi",
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            partial_rotary_factor=0.5,
        ),
    ),
    "bigcode-mqa": ("GPTBigCode", dict(n_embd=32, n_layer=2, n_head=4, n_inner=40, n_positions=64)),
    "falcon-mqa-parallel": (
        "Falcon",
        dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, multi_query=True, parallel_attn=True
        ),
    ),
    "starcoder2-window": (
        "Starcoder2",
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=40,
            sliding_window=3,
        ),
    ),
    "gemma2-capped-window": (
        "Gemma2",
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            intermediate_size=40,
            sliding_window=4,
            query_pre_attn_scalar=16,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
        ),
    ),
}


_CLASS = {"GPT2": "GPT2LMHeadModel"}


def hf_model(case: str, **overrides):
    family, kw = CASES[case]
    kw = {**COMMON, **kw, **overrides}
    cfg = getattr(transformers, f"{family}Config")(**kw)
    model = getattr(transformers, _CLASS.get(family, f"{family}ForCausalLM"))(cfg)
    gen = torch.Generator().manual_seed(sum(map(ord, case)))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.15 * torch.randn(p.shape, generator=gen))
    return model.double().eval()


def batch(kind: str):
    """Token ids and an attention mask (batch 3, pos T) of one padding layout."""
    ids = torch.randint(2, V, (3, T), generator=torch.Generator().manual_seed(3))
    am = torch.ones(3, T, dtype=torch.long)
    if kind == "left":
        am[0, :4] = 0
        am[1, :1] = 0
    elif kind == "right":
        am[0, 6:] = 0
        am[2, 9:] = 0
    else:  # both sides, and a row without padding
        am[0, :2] = 0
        am[0, 8:] = 0
        am[1, :5] = 0
    return ids, am


def hf_logits(hf, ids, am, pos=None):
    kw = {} if pos is None else {"position_ids": pos}
    with torch.no_grad(), finite_padding(hf, am):
        return hf(input_ids=ids, attention_mask=am, use_cache=False, **kw).logits


def rel_at(a, b, am):
    real = am.bool()
    return ((a[real] - b[real]).abs().max() / b[real].abs().max()).item()


def cumsum_positions(am):
    return (am.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("case", list(CASES))
def test_real_tokens_equal_hf_with_padding(case):
    hf = hf_model(case)
    model = from_hf(hf)
    for kind in ("left", "right", "both"):
        ids, am = batch(kind)
        with torch.no_grad():
            out = model(ids, attention_mask=am)
        assert torch.isfinite(out).all(), (case, kind)  # padding queries too
        assert rel_at(out, hf_logits(hf, ids, am), am) <= 1e-10, (case, kind)
        pos = cumsum_positions(am)
        with torch.no_grad():
            out = model(ids, attention_mask=am, position_ids=pos)
        assert torch.isfinite(out).all(), (case, kind)
        if case != "bloom":  # BLOOM's forward takes no position_ids: its ALiBi reads these from the mask
            ref = hf_logits(hf, ids, am, pos)
        else:
            ref = hf_logits(hf, ids, am)
        assert rel_at(out, ref, am) <= 1e-10, (case, kind, "position_ids")


@pytest.mark.parametrize("case", ["gpt2", "llama-gqa", "mistral-window"])
def test_left_padded_row_equals_the_unpadded_sequence(case):
    """With positions counted from each row's first real token, a left-padded row's real tokens compute what the
    sequence alone computes (an independent check of the mask, without the Hugging Face model)."""
    model = from_hf(hf_model(case))
    ids, am = batch("left")
    with torch.no_grad():
        padded = model(ids, attention_mask=am, position_ids=cumsum_positions(am))
        for row in range(3):
            n = int(am[row].sum())
            alone = model(ids[row, T - n :][None])[0]
            a, b = padded[row, T - n :], alone
            assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-10, (case, row)


def test_eager_attention_equal_hf():
    for case in ("llama-gqa", "gpt2"):
        hf = hf_model(case, attn_implementation="eager")
        model = from_hf(hf)
        ids, am = batch("left")
        with torch.no_grad():
            out = model(ids, attention_mask=am)
        assert rel_at(out, hf_logits(hf, ids, am), am) <= 1e-10, case


def test_default_positions_follow_the_family():
    """OPT and BLOOM derive positions from the mask (the converted models do, via ``cfg.mask_positions``); GPT-2 and
    Llama read the columns (GPT-2's left-padded real tokens then differ from the ones with cumsum positions)."""
    assert from_hf(hf_model("opt")).cfg.mask_positions
    assert from_hf(hf_model("bloom")).cfg.mask_positions
    for case in ("gpt2", "llama-gqa"):
        model = from_hf(hf_model(case))
        assert not model.cfg.mask_positions
        ids, am = batch("left")
        with torch.no_grad():
            cols = model(ids, attention_mask=am)
            shifted = model(ids, attention_mask=am, position_ids=cumsum_positions(am))
            plain = model(ids, attention_mask=am, position_ids=torch.arange(T))
        assert torch.equal(cols[am.bool()], plain[am.bool()])
        if case == "gpt2":  # learned positions: shifted rows read other rows of W_pos (rotary: only rounding)
            assert rel_at(cols, shifted, am) > 1e-3
    cfg = from_hf(hf_model("gpt2")).cfg
    assert TransformerConfig(**{**cfg.to_dict(), "positions_from_mask": True}).mask_positions
    with pytest.raises(ValueError, match="positions_from_mask"):
        TransformerConfig(positions_from_mask="yes")


def test_padding_queries_finite_and_gradients_finite():
    model = from_hf(hf_model("llama-gqa"))
    ids, am = batch("left")
    logits = model(ids, attention_mask=am)
    keep = am.bool()
    loss = logits[keep].logsumexp(-1).sum()  # reads the real tokens only
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # the padding tokens' own outputs: finite, and their attention writes only b_O (here none): z is 0
    _, cache = model.run_with_cache(ids, attention_mask=am)
    z = cache["blocks.0.attn.hook_z"]
    assert torch.equal(z[0, :4], torch.zeros_like(z[0, :4]))  # row 0 has 4 padding positions first


def test_hook_points_show_the_mask():
    model = from_hf(hf_model("mistral-window"))
    ids, am = batch("both")
    _, cache = model.run_with_cache(ids, attention_mask=am)
    for layer in range(2):
        scores = cache[f"blocks.{layer}.attn.hook_attn_scores"]
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
        q = torch.arange(T)[:, None]
        k = torch.arange(T)[None, :]
        allowed = (k <= q) & (q - k < 4)  # causal, window 4
        allowed = allowed[None] & am.bool()[:, None, :]  # (batch, q, k)
        allowed = allowed[:, None].expand_as(scores)
        assert torch.isneginf(scores[~allowed]).all()
        assert torch.isfinite(scores[allowed]).all()
        assert (pattern[~allowed] == 0).all()
        live = allowed.any(-1)  # queries with a key: rows sum to 1; queries without: 0
        sums = pattern.sum(-1)
        assert torch.allclose(sums[live], torch.ones_like(sums[live]))
        assert (sums[~live] == 0).all()


def test_run_with_hooks_and_layers_take_the_mask():
    model = from_hf(hf_model("neox-partial-rotary"))
    ids, am = batch("left")
    pos = cumsum_positions(am)
    with torch.no_grad():
        full = model(ids, attention_mask=am, position_ids=pos)
        seen = {}
        hooked = model.run_with_hooks(
            ids,
            attention_mask=am,
            position_ids=pos,
            fwd_hooks=[("blocks.1.attn.hook_pattern", lambda t, hook: seen.setdefault("p", t.clone()))],
        )
        assert torch.equal(hooked, full)
        assert (seen["p"][0, :, 5, :4] == 0).all()
        mid = model(ids, attention_mask=am, position_ids=pos, stop_at_layer=1)
        out = model(mid, attention_mask=am, position_ids=pos, start_at_layer=1)
    assert torch.equal(out, full)


def test_forward_loss_counts_real_pairs_only():
    model = from_hf(hf_model("gpt2"))
    ids, am = batch("left")
    pos = cumsum_positions(am)
    with torch.no_grad():
        logits = model(ids, attention_mask=am, position_ids=pos)
        per = model(ids, "per_token_loss", attention_mask=am, position_ids=pos)
        mean = model(ids, "loss", attention_mask=am, position_ids=pos)
    counted = am.bool()[:, :-1] & am.bool()[:, 1:]
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    expected = torch.where(counted, -lp, torch.zeros_like(lp))
    assert torch.allclose(per, expected, rtol=0, atol=1e-12)
    assert torch.allclose(mean, expected.sum() / counted.sum(), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="attention_mask leaves no real token"):
        model(ids[:, :2], "loss", attention_mask=torch.tensor([[1, 0]] * 3))


def test_default_loss_on_left_padding_equals_hf():
    """``pypattern.losses``' default per-token losses of a left-padded dict batch: the converted model is no longer
    refused and gives the Hugging Face model's losses (GPT-2 with position_ids; OPT and Llama with their default
    positions, which need none)."""
    for case, with_pos in (("gpt2", True), ("opt", False), ("llama-gqa", False), ("bloom", False)):
        hf = hf_model(case)
        model = from_hf(hf)
        ids, am = batch("left")
        b = {"input_ids": ids, "attention_mask": am}
        if with_pos:
            b["position_ids"] = cumsum_positions(am)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no warning: positions given, or derived by the family itself
            L.check_batch(model, b, "batch")
            ours, mask = L.token_losses(model, b)
        theirs, hf_mask = L.token_losses(hf, b)
        assert torch.equal(mask, am.bool()[:, :-1] & am.bool()[:, 1:]) and torch.equal(mask, hf_mask)
        ok = mask
        assert torch.isfinite(ours[ok]).all()
        assert ((ours[ok] - theirs[ok]).abs().max() / theirs[ok].abs().max()).item() <= 1e-10, case


def test_left_padding_without_positions_warns_for_learned_columns():
    model = from_hf(hf_model("gpt2"))
    ids, am = batch("left")
    with pytest.warns(UserWarning, match="left padding without position_ids"):
        L.check_batch(model, {"input_ids": ids, "attention_mask": am}, "batch")
    mine = Transformer(n_layers=1, d_model=16, n_heads=2, d_vocab=V, n_ctx=T)  # learned positions, columns
    with pytest.warns(UserWarning, match="Transformer .*learned"):
        L.check_batch(mine, {"input_ids": ids, "attention_mask": am}, "batch")


def test_bad_masks_and_positions_refused():
    model = from_hf(hf_model("gpt2"))
    ids, am = batch("left")
    with pytest.raises(ValueError, match=r"attention_mask has shape \(3, 9\)"):
        model(ids, attention_mask=am[:, 1:])
    with pytest.raises(ValueError, match="attention_mask contains 2"):
        model(ids, attention_mask=am * 2)
    with pytest.raises(ValueError, match="attention_mask contains 0.5"):
        model(ids, attention_mask=am * 0.5)
    with pytest.raises(TypeError, match="attention_mask is a list"):
        model(ids, attention_mask=am.tolist())
    with pytest.raises(TypeError, match="position_ids has dtype torch.float32"):
        model(ids, position_ids=torch.zeros(3, T))
    with pytest.raises(ValueError, match=r"position_ids has shape \(2, 10\)"):
        model(ids, position_ids=torch.zeros(2, T, dtype=torch.long))
    with pytest.raises(ValueError, match="position_ids contains -1"):
        model(ids, position_ids=torch.arange(T) - 1)
    with pytest.raises(ValueError, match="position_ids contains 64"):
        model(ids, position_ids=torch.arange(T) + 55)
    # ids at padding are not read: OPT-style -1 there is accepted, and float and bool masks equal int ones
    pos = am.cumsum(-1) * am - 1
    with torch.no_grad():
        a = model(ids, attention_mask=am, position_ids=pos)
        b = model(ids, attention_mask=am.bool(), position_ids=pos.clamp(min=0))
        c = model(ids, attention_mask=am.double(), position_ids=pos.clamp(min=0))
    assert torch.equal(a, b) and torch.equal(b, c)


def test_under_vmap_over_parameters_and_masks():
    """Many parameter sets at once (batched chains), each with its own left-padded batch: equal to one call each."""
    from torch.func import functional_call, vmap

    model = from_hf(hf_model("opt"))  # positions derived from the mask inside the vmapped forward
    params = {k: v.detach() for k, v in model.named_parameters()}
    stacked = {k: torch.stack([v, v * 1.01, v * 0.99]) for k, v in params.items()}
    ids, am = batch("left")
    ids3, am3 = torch.stack([ids, ids.roll(1, 0), ids]), torch.stack([am, am.roll(1, 0), am.flip(-1)])

    def run(p, i, m):
        return functional_call(model, p, (i,), {"attention_mask": m})

    with torch.no_grad():
        got = vmap(run)(stacked, ids3, am3)
        for c in range(3):
            one = run({k: v[c] for k, v in stacked.items()}, ids3[c], am3[c])
            real = am3[c].bool()
            torch.testing.assert_close(got[c][real], one[real], rtol=1e-12, atol=1e-12)
