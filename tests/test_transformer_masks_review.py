"""``Transformer.forward`` with ``attention_mask`` / ``position_ids`` on configurations and inputs beyond the
padding-mask tests: MoE, Gemma 3, qk-norm and scaled-rotary conversions against the Hugging Face forward; native
options (attention-only, no normalization, ALiBi with a post-embedding norm, parallel blocks, tied embeddings with a
padding index, a float32 softmax) against each sequence run alone; edge inputs; hooks under a mask; ``torch.func``
transforms; and the learned-position bound of :func:`pypattern.losses.check_batch`.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from pypattern import from_hf  # noqa: E402
from pypattern import losses as L  # noqa: E402
from pypattern.models.hf import finite_padding  # noqa: E402
from pypattern.models.transformer import Transformer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

V, T = 97, 9
LAYERS = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48
)
HF_CASES = {
    "qwen3-moe": (
        "Qwen3Moe",
        dict(
            LAYERS,
            head_dim=8,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            norm_topk_prob=True,
            experts_implementation="eager",
        ),
    ),
    "mixtral-window": (
        "Mixtral",
        dict(
            LAYERS,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=4,
            experts_implementation="eager",
        ),
    ),
    "gemma3-alternating": (
        "Gemma3Text",
        dict(
            LAYERS,
            head_dim=8,
            sliding_window=3,
            layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=16,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
            rope_local_base_freq=100.0,
        ),
    ),
    "olmo2-qk-norm": ("Olmo2", dict(LAYERS)),
    "llama3-rope-tied": (
        "Llama",
        dict(
            LAYERS,
            tie_word_embeddings=True,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=8,
            ),
        ),
    ),
    "neox-sequential-partial": (
        "GPTNeoX",
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            rotary_pct=0.25,
            use_parallel_residual=False,
        ),
    ),
}


def hf_model(case: str):
    family, kw = HF_CASES[case]
    cfg = getattr(transformers, f"{family}Config")(vocab_size=V, bos_token_id=0, eos_token_id=1, **kw)
    model = getattr(transformers, f"{family.replace('Gemma3Text', 'Gemma3')}ForCausalLM")(cfg)
    gen = torch.Generator().manual_seed(sum(map(ord, case)))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.15 * torch.randn(p.shape, generator=gen))
    return model.double().eval()


def padded_batch():
    """Left padding, right padding, and a row with gaps (0 between 1s)."""
    ids = torch.randint(2, V, (4, T), generator=torch.Generator().manual_seed(3))
    am = torch.ones(4, T, dtype=torch.long)
    am[0, :4] = 0
    am[1, :1] = 0
    am[2, 7:] = 0
    am[3, :2] = 0
    am[3, 5] = 0
    am[3, 8] = 0
    return ids, am


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def cumsum_positions(am):
    return (am.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("case", list(HF_CASES))
def test_converted_families_equal_hf_on_padded_batches(case):
    hf = hf_model(case)
    model = from_hf(hf)
    ids, am = padded_batch()
    real = am.bool()
    for pos in (None, cumsum_positions(am)):
        kw = {} if pos is None else {"position_ids": pos}
        with torch.no_grad(), finite_padding(hf, am):
            ref = hf(input_ids=ids, attention_mask=am, use_cache=False, **kw).logits
            got = model(ids, attention_mask=am, **kw)
        assert torch.isfinite(got).all()
        assert rel(got[real], ref[real]) <= 1e-10, (case, pos is None)
    model(ids, "loss", attention_mask=am).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


NATIVE = {
    "attn-only": dict(d_mlp=0),
    "no-norm": dict(normalization_type=None),
    "alibi-post-embedding-ln": dict(
        positional_embedding_type="alibi", post_embedding_ln=True, attn_scores_soft_cap=3.0
    ),
    "parallel-shared-rotary": dict(
        parallel_attn_mlp=True, parallel_shared_norm=True, positional_embedding_type="rotary", rotary_dim=2
    ),
    "tied-padding-idx": dict(tie_word_embeddings=True, padding_idx=0),
    "gqa-window-qk-norm-f32-softmax": dict(
        positional_embedding_type="rotary",
        n_key_value_heads=2,
        sliding_window=3,
        qk_norm=True,
        normalization_type="RMS",
        attn_softmax_dtype=torch.float32,
    ),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", list(NATIVE))
def test_native_options_padded_rows_equal_each_sequence_alone(case, dtype):
    kw = dict(n_layers=2, d_model=16, n_heads=4, d_mlp=24, d_vocab=V, n_ctx=16, dtype=dtype, seed=1)
    model = Transformer(**{**kw, **NATIVE[case]}).eval()
    ids, am = padded_batch()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    with torch.no_grad():
        padded = model(ids, attention_mask=am, position_ids=cumsum_positions(am))
        # the row with gaps too (its real tokens, counted from 0, are the sequence alone), except under a sliding
        # window, which counts columns (as Hugging Face's does), gaps included
        for row in range(3 if model.cfg.sliding_window else 4):
            keep = am[row].bool()
            alone = model(ids[row, keep][None])[0]
            assert rel(padded[row, keep], alone) <= tol, (case, row)
    model(ids, "loss", attention_mask=am).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None), case


def test_edge_inputs():
    model = Transformer(n_layers=2, d_model=16, n_heads=4, d_mlp=24, d_vocab=V, n_ctx=8, dtype=torch.float64)
    ids, am = torch.randint(0, V, (2, 6)), torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    with torch.no_grad():
        ref = model(ids, attention_mask=am.bool())
        for mask in (am.int(), am.to(torch.uint8), am.half(), am.double()):
            assert torch.equal(model(ids, attention_mask=mask), ref)
        assert torch.equal(model(ids[0], attention_mask=am[0])[0], model(ids[:1], attention_mask=am[:1])[0])
        assert model(ids[:0], attention_mask=am[:0]).shape == (0, 6, V)
        assert model(ids[:0], "per_token_loss", attention_mask=am[:0]).shape == (0, 5)
        one = model(ids[:, :1], attention_mask=torch.tensor([[0], [1]]))
        assert torch.isfinite(one).all()
        torch.testing.assert_close(one[1], model(ids[1:, :1])[0], rtol=1e-13, atol=1e-14)
        # ids at padding are not read, even past n_ctx; at real tokens they are refused
        far = torch.tensor([[99, -3, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]])
        near = torch.tensor([[0, 0, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]])
        assert torch.equal(
            model(ids, attention_mask=am, position_ids=far), model(ids, attention_mask=am, position_ids=near)
        )
        for shared in (torch.arange(6), torch.arange(6)[None]):
            assert torch.equal(model(ids, position_ids=shared), model(ids))
        # an all-ones mask computes what no mask computes
        assert torch.equal(model(ids, attention_mask=torch.ones_like(am)), model(ids))
    with pytest.raises(ValueError, match="position_ids contains 10"):
        model(ids, attention_mask=am, position_ids=near + 5)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(6,\)"):
        model(ids, attention_mask=am[0])
    with pytest.raises(ValueError, match="attention_mask contains nan"):
        model(ids, attention_mask=am * float("nan"))


def test_hooks_under_a_mask():
    """A hook masking a head's every score (a NaN softmax row) under a padding mask: the head writes nothing, as when
    its ``z`` is zeroed; gradients stay finite; identity hooks change nothing."""
    model = from_hf(hf_model("olmo2-qk-norm"))
    ids, am = padded_batch()
    real = am.bool()

    def kill(t, hook):
        t[:, 0] = float("-inf")
        return t

    def zero_z(t, hook):
        t[:, :, 0] = 0
        return t

    with torch.no_grad():
        killed = model.run_with_hooks(
            ids, attention_mask=am, fwd_hooks=[("blocks.0.attn.hook_attn_scores", kill)]
        )
        zeroed = model.run_with_hooks(ids, attention_mask=am, fwd_hooks=[("blocks.0.attn.hook_z", zero_z)])
        plain = model(ids, attention_mask=am)
        same = model.run_with_hooks(
            ids, attention_mask=am, fwd_hooks=[("blocks.1.attn.hook_pattern", lambda t, hook: t * 1.0)]
        )
    assert torch.isfinite(killed).all()
    assert torch.equal(killed[real], zeroed[real])
    assert torch.equal(same, plain)
    loss = model.run_with_hooks(
        ids, "loss", attention_mask=am, fwd_hooks=[("blocks.0.attn.hook_attn_scores", kill)]
    )
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_func_grad_and_vmap_with_masks():
    from torch.func import functional_call, grad, vmap

    model = from_hf(hf_model("neox-sequential-partial"))
    ids, am = padded_batch()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, i, m):
        return functional_call(model, p, (i,), {"return_type": "loss", "attention_mask": m})

    g = grad(loss)(params, ids, am)
    model(ids, "loss", attention_mask=am).backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(g[k], p.grad, rtol=1e-12, atol=1e-15)
    stacked = {k: torch.stack([v, 1.01 * v]) for k, v in params.items()}
    gv = vmap(grad(loss), in_dims=(0, None, None))(stacked, ids, am)
    for k in g:
        torch.testing.assert_close(gv[k][0], g[k], rtol=1e-12, atol=1e-15)


def test_vmapped_loss_refuses_a_sample_with_nothing_counted():
    """Unbatched, a mask leaving no counted term refuses the mean loss; under vmap over masks, so does one sample's
    (its mean would be 0 / 0 = NaN), at one or two levels of vmap, while masks that all count give each one's loss."""
    from torch.func import vmap

    model = Transformer(n_layers=1, d_model=16, n_heads=2, d_vocab=V, n_ctx=T, dtype=torch.float64)
    ids, am = padded_batch()

    def loss(m):
        return model(ids, "loss", attention_mask=m)

    with torch.no_grad():
        both = vmap(loss)(torch.stack([am, am.flip(-1)]))
        assert torch.allclose(both, torch.stack([loss(am), loss(am.flip(-1))]), rtol=1e-13, atol=0)
        none = torch.zeros_like(am)
        with pytest.raises(ValueError, match="attention_mask leaves no real token"):
            loss(none)
        with pytest.raises(ValueError, match="attention_mask leaves no real token"):
            vmap(loss)(torch.stack([am, none]))
        with pytest.raises(ValueError, match="attention_mask leaves no real token"):
            vmap(vmap(loss), in_dims=1)(torch.stack([torch.stack([am, am]), torch.stack([am, none])], 1))


def test_check_batch_bounds_only_the_positions_a_transformer_reads():
    """``check_batch``'s learned-position bound for pypattern's ``Transformer``: ids at padding are not read, and a
    model counting positions from the mask reads its longest row of real tokens, not the padded length; the
    estimators' default losses then equal the forward's."""
    model = Transformer(n_layers=1, d_model=16, n_heads=2, d_vocab=V, n_ctx=8, dtype=torch.float64)
    ids, am = torch.randint(2, V, (2, 6)), torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    pos = torch.tensor([[99, 99, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]])
    batch = {"input_ids": ids, "attention_mask": am, "position_ids": pos}
    L.check_batch(model, batch, "batch")
    ours, counted = L.token_losses(model, batch)
    with torch.no_grad():
        direct = model(ids, "per_token_loss", attention_mask=am, position_ids=pos)
    assert torch.allclose(ours[counted], direct[counted], rtol=1e-13, atol=0)
    with pytest.raises(ValueError, match="position_ids reach 11"):
        L.check_batch(model, {**batch, "position_ids": pos + 5}, "batch")
    from_mask = Transformer(
        n_layers=1, d_model=16, n_heads=2, d_vocab=V, n_ctx=8, dtype=torch.float64, positions_from_mask=True
    )
    ids = torch.randint(2, V, (2, 10))
    am = torch.tensor([[0] * 4 + [1] * 6, [0] * 2 + [1] * 8])
    L.check_batch(from_mask, {"input_ids": ids, "attention_mask": am}, "batch")
    with pytest.raises(ValueError, match="sequences of length 9"):
        L.check_batch(
            from_mask,
            {"input_ids": ids, "attention_mask": torch.ones_like(am).index_fill(1, torch.tensor([0]), 0)},
            "batch",
        )
