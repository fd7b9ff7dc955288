"""The circuit functions under an attention mask on configurations ``tests/test_circuits_attention_mask.py`` does not
name: rows of 6, 3 and 1 real tokens (one row a single token), left and right padding and rows padded on different
sides, more families (Mixtral's sparse block as the MLP node, Falcon's multi-query attention with a parallel block,
Mistral with a sliding window of two that bites, GPT-NeoX's partial rotary parallel block, Phi's shared norm),
per-position ACDC, and padding that takes the prompts past a model's learned positions.

Tiny random float64 Hugging Face models converted with ``pypattern.from_hf`` (eager attention). The ground truth is
each prompt alone, unpadded: every row's values equal its prompt's run by itself, to 1e-9.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T

import pypattern as pp
from pypattern.circuits import acdc, edge_attribution, edges, patch_edges
from pypattern.patching import LogitDiff

pytestmark = pytest.mark.usefixtures("one_thread")

V = 40
LENGTHS = [6, 3, 1]
PAD = 1
ANSWER, WRONG = torch.tensor([3, 4, 5]), torch.tensor([6, 7, 8])
TOL = 1e-9


def _hf(name: str):
    small = dict(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=None,
        initializer_range=0.25,
    )
    if name == "mixtral":
        return T.MixtralForCausalLM(
            T.MixtralConfig(**small, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
        )
    if name == "falcon":
        cfg = T.FalconConfig(
            vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, multi_query=True,
            new_decoder_architecture=False, parallel_attn=True, alibi=False, bias=True, bos_token_id=0,
            eos_token_id=1, initializer_range=0.25, hidden_dropout=0.0, attention_dropout=0.0,
        )  # fmt: skip
        return T.FalconForCausalLM(cfg)
    if name == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(**small, num_key_value_heads=2))
    if name == "mistral":
        return T.MistralForCausalLM(T.MistralConfig(**small, num_key_value_heads=2, sliding_window=2))
    if name == "neox":
        cfg = T.GPTNeoXConfig(
            **small, rotary_pct=0.5, use_parallel_residual=True, hidden_dropout=0.0, attention_dropout=0.0
        )
        return T.GPTNeoXForCausalLM(cfg)
    if name == "phi":
        cfg = T.PhiConfig(
            **small, partial_rotary_factor=0.5, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0
        )
        return T.PhiForCausalLM(cfg)
    if name == "gpt2-short":  # 8 learned positions
        cfg = T.GPT2Config(
            vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=8, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, bos_token_id=0, eos_token_id=1, initializer_range=0.25,
        )  # fmt: skip
        return T.GPT2LMHeadModel(cfg)
    raise KeyError(name)


_MODELS: dict = {}


def model(name: str):
    if name not in _MODELS:
        torch.manual_seed(0)
        m = _hf(name).double().eval()
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "norm" in n or "ln" in n or n.endswith("bias"):
                    p.add_(0.1 * torch.randn_like(p))
        m.config._attn_implementation = "eager"
        _MODELS[name] = pp.from_hf(m)
    return _MODELS[name]


def seqs(lengths=LENGTHS):
    """Clean prompts and corrupted ones (their first and second-to-last tokens replaced; a one-token prompt's
    token)."""
    g = torch.Generator().manual_seed(1)
    clean = [torch.randint(2, V, (n,), generator=g) for n in lengths]
    corrupted = [s.clone() for s in clean]
    for s in corrupted:
        s[0] = (s[0] + 3) % (V - 2) + 2
        j = max(len(s) - 2, 0)
        s[j] = (s[j] + 5) % (V - 2) + 2
    return clean, corrupted


def pad(rows, sides: str, width: int = 6):
    """Rows padded to ``width`` columns, row ``i`` on side ``sides[i]`` (``l``: left, ``r``: right, ``m``: one
    padding column first, the rest after); the ids, the mask and each row's last real column."""
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    last = []
    for i, (s, side) in enumerate(zip(rows, sides, strict=True)):
        start = {"l": width - len(s), "r": 0, "m": 1}[side]
        ids[i, start : start + len(s)], mask[i, start : start + len(s)] = s, 1
        last.append(start + len(s) - 1)
    return ids, mask, torch.tensor(last)


def alone_metric(b: int):
    return LogitDiff(ANSWER[b : b + 1], WRONG[b : b + 1])


def close(a, b, msg=""):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    torch.testing.assert_close(a, b, rtol=0, atol=TOL, msg=msg)


def edge_sets(graph) -> torch.Tensor:
    """Every edge into the queries, keys, values, MLPs and logits (each kind alone) and a random set."""
    names = [graph.dst_names[int(d)] for d in graph.dst_idx]
    kinds = [[n.endswith(f".{x}") for n in names] for x in "qkv"]
    kinds += [[n.startswith("MLP") for n in names], [n == "logits" for n in names]]
    sets = [torch.tensor(k) for k in kinds]
    sets.append(torch.rand(len(graph), generator=torch.Generator().manual_seed(0)) < 0.3)
    return torch.stack(sets)


# ----------------------------------------------------------------------- more families, a one-token row


@pytest.mark.parametrize("name", ["mixtral", "falcon", "mistral", "neox", "phi"])
def test_rows_of_six_three_and_one_tokens_equal_each_prompt_alone(name):
    """Left padding (patched edge sets, EAP, exact scores) and right padding with the metric at each row's last
    real token (EAP-IG), rows of 6, 3 and 1 real tokens."""
    m = model(name)
    clean, corrupted = seqs()
    graph = edges(m)
    sets = edge_sets(graph)
    ci, mask, _ = pad(clean, "lll")
    ki, _, _ = pad(corrupted, "lll")
    got = patch_edges(m, sets, ci, ki, metric=LogitDiff(ANSWER, WRONG), attention_mask=mask, graph=graph)
    scores = {
        method: edge_attribution(
            m, ci, ki, metric=LogitDiff(ANSWER, WRONG), method=method, attention_mask=mask, quiet=True
        )
        for method in ("eap", "exact")
    }
    ri, rmask, last = pad(clean, "rrr")
    rk, _, _ = pad(corrupted, "rrr")
    ig = edge_attribution(
        m, ri, rk, metric=LogitDiff(ANSWER, WRONG, position=last), method="eap-ig", steps=3, attention_mask=rmask,
        quiet=True,
    )  # fmt: skip
    assert float(scores["exact"].values.abs().max()) > 0.1
    for b in range(len(LENGTHS)):
        one = (clean[b][None], corrupted[b][None])
        close(got[:, b], patch_edges(m, sets, *one, metric=alone_metric(b), graph=graph)[:, 0], f"{name} {b}")
        for method, s in scores.items():
            want = edge_attribution(m, *one, metric=alone_metric(b), method=method, quiet=True)
            close(s.values[b], want.values[0], f"{name} {method} row {b}")
        want = edge_attribution(m, *one, metric=alone_metric(b), method="eap-ig", steps=3, quiet=True)
        close(ig.values[b], want.values[0], f"{name} eap-ig row {b}")


def test_rows_padded_on_different_sides_equal_each_prompt_alone():
    """A batch whose rows are padded on the left, on the right and on both sides, the metric at each row's last
    real token: each row is its prompt alone, in denoising too."""
    m = model("mistral")
    clean, corrupted = seqs([3, 2, 1])
    ci, mask, last = pad(clean, "lrm")
    ki, _, _ = pad(corrupted, "lrm")
    metric = LogitDiff(ANSWER, WRONG, position=last)
    for mode in ("noise", "denoise"):
        got = edge_attribution(
            m, ci, ki, metric=metric, method="exact", mode=mode, attention_mask=mask, quiet=True
        )
        for b in range(3):
            want = edge_attribution(
                m, clean[b][None], corrupted[b][None], metric=alone_metric(b), method="exact", mode=mode,
                quiet=True,
            )  # fmt: skip
            close(got.values[b], want.values[0], f"{mode} row {b}")


def test_per_position_acdc_on_a_left_padded_prompt_is_the_prompt_alone_shifted():
    """ACDC on a per-position graph of one prompt padded on the left: the circuit found is the prompt alone's,
    each edge at its column minus the padding before it; no edge at a padding column is kept."""
    m = model("neox")
    clean, corrupted = seqs()
    b, n = 1, LENGTHS[1]
    off = 6 - n
    ids, mask, _ = pad([clean[b]], "l")
    kids, _, _ = pad([corrupted[b]], "l")
    kw = dict(metric=alone_metric(b), threshold=0.02, per_position=True, quiet=True)
    got = acdc(m, ids, kids, attention_mask=mask, **kw)
    want = acdc(m, clean[b][None], corrupted[b][None], **kw)
    at = {(e.src, e.dst, e.qkv, e.pos): i for i, e in enumerate(want.graph.edges)}
    shifted = torch.zeros(len(want.graph), dtype=torch.bool)
    for i, e in enumerate(got.graph.edges):
        if got.mask[i]:
            assert e.pos >= off, f"edge {e} at a padding column kept"
            shifted[at[(e.src, e.dst, e.qkv, e.pos - off)]] = True
    assert 0 < int(want.mask.sum()) < len(want.graph)
    assert torch.equal(shifted, want.mask)
    close(got.faithfulness, want.faithfulness)


# ----------------------------------------------------------------------- padding past the learned positions


def test_padding_past_the_learned_positions_with_prompts_within_them():
    """Prompts of at most 6 tokens padded to 10 columns on a model of 8 learned positions: under the mask each row
    reads positions 0 .. n-1 only (as the model's masked forward, which takes them), so every circuit function runs
    and each row equals its prompt alone; a prompt of more real tokens than the model has positions is refused by
    its length under the mask, and 10 columns without a mask as before."""
    m = model("gpt2-short")
    clean, corrupted = seqs()
    ci, mask, _ = pad(clean, "lll", width=10)
    ki, _, _ = pad(corrupted, "lll", width=10)
    metric = LogitDiff(ANSWER, WRONG)
    graph = edges(m)
    sets = edge_sets(graph)
    got = patch_edges(m, sets, ci, ki, metric=metric, attention_mask=mask, graph=graph)
    eap = edge_attribution(m, ci, ki, metric=metric, attention_mask=mask, quiet=True)
    for b in range(len(LENGTHS)):
        one = (clean[b][None], corrupted[b][None])
        close(got[:, b], patch_edges(m, sets, *one, metric=alone_metric(b), graph=graph)[:, 0], f"row {b}")
        close(
            eap.values[b], edge_attribution(m, *one, metric=alone_metric(b), quiet=True).values[0], f"eap {b}"
        )
    # right padding, the metric at each row's last real token
    ri, rmask, last = pad(clean, "rrr", width=10)
    rk, _, _ = pad(corrupted, "rrr", width=10)
    right = edge_attribution(
        m,
        ri,
        rk,
        metric=LogitDiff(ANSWER, WRONG, position=last),
        method="exact",
        attention_mask=rmask,
        quiet=True,
    )
    for b in range(len(LENGTHS)):
        want = edge_attribution(m, clean[b][None], corrupted[b][None], metric=alone_metric(b), method="exact")
        close(right.values[b], want.values[0], f"right {b}")
    long_mask = mask.clone()
    long_mask[0, 1:] = 1  # 9 real tokens
    with pytest.raises(
        ValueError, match=r"clean's longest prompt has 9 real tokens under attention_mask; the model"
    ):
        patch_edges(m, sets, ci, ki, metric=metric, attention_mask=long_mask, graph=graph)
    with pytest.raises(
        ValueError, match=r"clean has 10 positions; the model's n_ctx \(learned positions\) is 8"
    ):
        patch_edges(m, sets, ci, ki, metric=metric, graph=graph)


# ----------------------------------------------------------------------- edges that reach no real token


def test_edges_into_padding_rows_and_one_key_queries_score_exactly_zero_in_float32():
    """In float32, a patched run computed in other shapes than the base run rounds differently, so the exact scores
    of edges that cannot change a metric must be found, not computed. Under left padding, on a per-position graph,
    an edge into a padding row (no real token reads it) scores exactly 0 with a zero ablation (which changes the
    padding rows' values), as EAP gives it; without positions, an edge into the query of a one-token row (its
    query attends its one real key, weight 1 whatever the query) scores exactly 0 too. The other scores are each
    prompt's alone, to float32 rounding."""
    m = model("llama").float()
    clean, corrupted = seqs()
    ci, mask, _ = pad(clean, "lll")
    ki, _, _ = pad(corrupted, "lll")
    metric = LogitDiff(ANSWER, WRONG)
    for mode, k in (("noise", None), ("denoise", ki)):
        kw = dict(
            metric=metric, ablation="zero", mode=mode, attention_mask=mask, per_position=True, quiet=True
        )
        exact = edge_attribution(m, ci, k, method="exact", **kw)
        eap = edge_attribution(m, ci, k, method="eap", **kw)
        pos = exact.graph.pos_idx
        for b, n in enumerate(LENGTHS):
            on_pad = pos < 6 - n
            assert bool(on_pad.any()) == (n < 6)
            assert bool((eap.values[b, on_pad] == 0).all())
            assert bool((exact.values[b, on_pad] == 0).all()), f"{mode} row {b}: {exact.values[b, on_pad]}"
    graph = edges(m)
    into_q = torch.tensor([graph.dst_names[int(d)].endswith(".q") for d in graph.dst_idx])
    exact = edge_attribution(m, ci, ki, metric=metric, method="exact", attention_mask=mask, quiet=True)
    assert bool((exact.values[2, into_q] == 0).all()), exact.values[2, into_q]  # the one-token row
    assert float(exact.values[:2, into_q].abs().max()) > 1e-3
    for b in range(len(LENGTHS)):
        want = edge_attribution(m, clean[b][None], corrupted[b][None], metric=alone_metric(b), method="exact")
        torch.testing.assert_close(exact.values[b], want.values[0], rtol=0, atol=2e-5)
