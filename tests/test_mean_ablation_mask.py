"""Mean ablation over right-padded prompts with an attention mask: the per-position mean over real tokens only.

``MeanAblation(attention_mask=...)`` (or a tokenizer's output as ``reference_tokens``) in patching and
``mean_mask=...`` with ``ablation="mean"`` in circuits. Checked against independent computations: the masked mean
taken by hand from cached activations (a loop over positions and the prompts real there), the patched forward done
by hand with hooks; results that do not depend on the pad id; an all-ones mask giving exactly the unmasked results;
circuits' edge patching against the per-edge hooked reference of ``tests/_circuits_reference.py``.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T
from _circuits_reference import _node_outputs, at_pos, naive_run, tiny

from pypattern import from_hf
from pypattern.circuits import acdc, edge_attribution, edges, faithfulness, patch_edges, pruning_curve
from pypattern.io import FingerprintMismatch
from pypattern.patching import LogitDiff, MeanAblation, activation_patching, attribution_patching

pytestmark = pytest.mark.usefixtures("one_thread")

V = 40
LENGTHS = torch.tensor([4, 6, 3])  # right padding to 6 tokens
MASK = torch.arange(6)[None] < LENGTHS[:, None]
ANSWER, WRONG = torch.tensor([5, 6, 7]), torch.tensor([8, 9, 10])

_MODEL: list = []


def llama() -> torch.nn.Module:
    """A tiny random float64 Llama (grouped-query attention, rotary positions)."""
    if not _MODEL:
        torch.manual_seed(0)
        cfg = T.LlamaConfig(
            vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=48, max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=None,
            initializer_range=0.25,
        )  # fmt: skip
        _MODEL.append(T.LlamaForCausalLM(cfg).double().eval())
    return _MODEL[0]


def padded(pad_id: int, lengths=LENGTHS, T_: int = 6, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, V, (len(lengths), T_), generator=g)
    tokens[~(torch.arange(T_)[None] < lengths[:, None])] = pad_id
    return tokens


def metric(lengths=LENGTHS) -> LogitDiff:
    return LogitDiff(ANSWER, WRONG, position=lengths - 1)


def hand_metric(logits: torch.Tensor, lengths=LENGTHS) -> torch.Tensor:
    rows = logits[torch.arange(len(lengths)), lengths - 1]
    return rows[torch.arange(len(lengths)), ANSWER] - rows[torch.arange(len(lengths)), WRONG]


def hand_mean(x: torch.Tensor, mask: torch.Tensor, pos_dim: int) -> torch.Tensor:
    """Per position, the mean over the prompts the mask says are real there (0 where none is): a loop."""
    out = torch.zeros_like(x[:1])
    for t in range(mask.shape[1]):
        rows = mask[:, t].nonzero().flatten()
        if len(rows):
            sl = [slice(None)] * x.dim()
            sl[pos_dim] = t
            out[tuple(sl)] = x[rows][tuple(sl)].mean(0)
    return out


# ---------------------------------------------------------------------------------------------- patching


def test_grid_entries_equal_the_masked_mean_patched_by_hand():
    """resid_pre (naive on the Hugging Face model, and the exact engine), z and pattern (the query position):
    each grid entry equals the converted model's clean run with that activation replaced by hand, at that cell, by
    its mean over the prompts real at the position, taken from the cache with a loop."""
    m = llama()
    conv = from_hf(m)
    clean = padded(0)
    names = {
        "resid_pre": "blocks.{}.hook_resid_pre",
        "z": "blocks.{}.attn.hook_z",
        "pattern": "blocks.{}.attn.hook_pattern",
    }
    _, cache = conv.run_with_cache(clean)
    for site, method in (("resid_pre", "naive"), ("resid_pre", "exact"), ("z", "auto"), ("pattern", "auto")):
        res = activation_patching(
            m, site, clean, corruption=MeanAblation(attention_mask=MASK), direction="noising", metric=metric(),
            method=method, quiet=True,
        )  # fmt: skip
        pos_dim = 2 if site == "pattern" else 1
        for layer in range(2):
            name = names[site].format(layer)
            mean = hand_mean(cache[name], MASK, pos_dim)
            # the mask matters: the plain mean differs at position 3 (row 2 is padding there)
            assert not torch.allclose(
                mean.select(pos_dim, 3), cache[name].mean(0, keepdim=True).select(pos_dim, 3)
            )
            for pos in range(6):
                for head in range(4) if site != "resid_pre" else [None]:

                    def put(x, hook, pos=pos, head=head, mean=mean, site=site):
                        x = x.clone()
                        if site == "resid_pre":
                            x[:, pos] = mean[:, pos]
                        elif site == "z":
                            x[:, pos, head] = mean[:, pos, head]
                        else:
                            x[:, head, pos] = mean[:, head, pos]
                        return x

                    with torch.no_grad():
                        want = hand_metric(conv.run_with_hooks(clean, fwd_hooks=[(name, put)]))
                    got = res.values[:, layer, pos] if head is None else res.values[:, layer, head, pos]
                    torch.testing.assert_close(
                        got, want, rtol=0, atol=1e-10, msg=f"{site} {method} {layer} {head} {pos}"
                    )


def test_masked_mean_ablation_does_not_depend_on_the_pad_id():
    """With the mask (given as attention_mask, or a tokenizer's output as reference_tokens) the grid is the same
    whatever token fills the padding; without it it is not (the padding enters the real positions' means)."""
    m = llama()
    out = {}
    for pad in (0, 11):
        clean = padded(pad)
        kw = dict(direction="noising", metric=metric(), quiet=True)
        enc = T.BatchEncoding({"input_ids": clean, "attention_mask": MASK.long()})
        out[pad] = [
            activation_patching(m, "resid_pre", clean, corruption=MeanAblation(), **kw).values,
            activation_patching(
                m, "resid_pre", clean, corruption=MeanAblation(attention_mask=MASK), **kw
            ).values,
            activation_patching(
                m,
                "resid_pre",
                clean,
                corruption=MeanAblation(attention_mask=MASK.double()),
                method="exact",
                **kw,
            ).values,
            activation_patching(
                m, "resid_pre", clean, corruption=MeanAblation(reference_tokens=enc), **kw
            ).values,
            activation_patching(
                m, "z", clean, corruption=MeanAblation(attention_mask=MASK.int()), **kw
            ).values,
        ]
    assert not torch.allclose(out[0][0], out[11][0])
    for a, b in zip(out[0][1:], out[11][1:]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    torch.testing.assert_close(out[0][3], out[0][1], rtol=0, atol=1e-12)  # the dict's mask is the mean's


def test_an_all_ones_mask_gives_the_unmasked_results_and_an_all_padding_position_changes_nothing():
    """An all-ones mask is no mask (bit for bit). A position no prompt is real at (lengths 4, 5, 3 at 6 positions:
    position 5) gets 0, and patching it leaves the metric read at each row's last real token unchanged."""
    m = llama()
    unpadded = padded(0, lengths=torch.tensor([6, 6, 6]))
    kw = dict(direction="noising", metric=metric(), quiet=True)
    for site in ("resid_pre", "z"):
        a = activation_patching(m, site, unpadded, corruption=MeanAblation(), **kw).values
        b = activation_patching(
            m, site, unpadded, corruption=MeanAblation(attention_mask=torch.ones(3, 6)), **kw
        )
        assert torch.equal(a, b.values)
    lengths = torch.tensor([4, 5, 3])
    mask = torch.arange(6)[None] < lengths[:, None]
    kw["metric"] = metric(lengths)
    for method in ("naive", "exact"):
        res = activation_patching(
            m,
            "resid_pre",
            padded(0, lengths),
            corruption=MeanAblation(attention_mask=mask),
            method=method,
            **kw,
        )
        assert bool((res.values[..., 5] == res.clean[:, None]).all())
        assert bool((res.values[..., :5] != res.clean[:, None, None]).any())


def test_masked_reference_prompts_of_their_own():
    """reference_tokens with their own mask: the mean over the reference prompts real at each position, by hand."""
    m = llama()
    conv = from_hf(m)
    clean = padded(0)
    ref_lengths = torch.tensor([6, 2, 5, 6])
    reference = padded(13, ref_lengths, seed=5)
    ref_mask = torch.arange(6)[None] < ref_lengths[:, None]
    res = activation_patching(
        m, "resid_pre", clean, corruption=MeanAblation(reference, attention_mask=ref_mask), direction="noising",
        metric=metric(), quiet=True,
    )  # fmt: skip
    _, cache = conv.run_with_cache(reference)
    for layer in range(2):
        name = f"blocks.{layer}.hook_resid_pre"
        mean = hand_mean(cache[name], ref_mask, 1)
        for pos in range(6):

            def put(x, hook, pos=pos, mean=mean):
                x = x.clone()
                x[:, pos] = mean[:, pos]
                return x

            with torch.no_grad():
                want = hand_metric(conv.run_with_hooks(clean, fwd_hooks=[(name, put)]))
            torch.testing.assert_close(res.values[:, layer, pos], want, rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------------- circuits


def _masked_sources(model, tokens, mask):
    return {k: hand_mean(v, mask, 1).expand_as(v) for k, v in _node_outputs(model, tokens).items()}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_patch_edges_with_a_masked_mean_equals_the_hooked_reference(arch):
    """Every single edge and a few sets, noising (the mean over the corrupted prompts, or the clean ones without
    corrupted) and denoising (over the clean ones): patch_edges equals the model's own forward with each patched
    destination input rewired by hooks to read the masked mean, taken by hand."""
    from _circuits_reference import ARCHS

    model = tiny(**ARCHS[arch])
    lengths = torch.tensor([4, 6, 3, 5])
    mask = torch.arange(6)[None] < lengths[:, None]
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, 12, (4, 6), generator=g)
    corr = torch.randint(0, 12, (4, 6), generator=g)
    clean[~mask], corr[~mask] = 7, 2
    ans, wrong = torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6, 7, 8])
    met = LogitDiff(ans, wrong, position=lengths - 1)
    ge = edges(model)
    gen = torch.Generator().manual_seed(2)
    sets = torch.cat([torch.eye(len(ge), dtype=torch.bool), torch.rand(4, len(ge), generator=gen) < 0.3])
    for mode, corrupted, base, source in (
        ("noise", corr, clean, corr),
        ("noise", None, clean, clean),
        ("denoise", corr, corr, clean),
    ):
        got = patch_edges(
            model, sets, clean, corrupted, metric=met, mode=mode, ablation="mean", mean_mask=mask
        )
        src = _masked_sources(model, source, mask)
        with torch.no_grad():
            want = torch.stack(
                [
                    met(
                        at_pos(
                            naive_run(model, [ge[i] for i in s.nonzero().flatten()], base, src), met.position
                        )
                    )
                    for s in sets
                ]
            )
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10, msg=f"{arch} {mode} {corrupted is None}")


def test_circuits_with_a_mean_mask_do_not_depend_on_the_pad_id_and_an_all_ones_mask_is_no_mask():
    """edge_attribution (EAP, EAP-IG, exact), patch_edges, faithfulness, pruning_curve and acdc with ablation="mean"
    and mean_mask: the same numbers whatever token fills the padding (EAP's scores differ without the mask); an
    all-ones mask gives the unmasked numbers exactly."""
    m = llama()
    res = {}
    for pad in (0, 11):
        clean = padded(pad)
        kw = dict(metric=metric(), ablation="mean", mean_mask=MASK)
        eap = edge_attribution(m, clean, **kw)
        res[pad] = [
            edge_attribution(m, clean, metric=metric(), ablation="mean").values,
            eap.values,
            edge_attribution(m, clean, method="eap-ig", steps=2, **kw).values,
            edge_attribution(m, clean, method="exact", quiet=True, **kw).values,
            edge_attribution(m, clean, clean, mode="denoise", **kw).values,
            patch_edges(m, [["L0H1->logits"], ["embed->MLP1", "MLP0->logits"]], clean, **kw),
            faithfulness(m, [["L0H1->logits", "L1H0->logits"]], clean, **kw),
            next(
                iter(
                    pruning_curve(
                        m, eap, clean, fractions=[0.1, 0.5], quiet=True, **kw
                    ).metric_values.values()
                )
            ),
            acdc(m, clean, threshold=0.05, quiet=True, **kw).mask.double(),
        ]
    assert not torch.allclose(res[0][0], res[11][0])
    for a, b in zip(res[0][1:], res[11][1:]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    unpadded = padded(0, lengths=torch.tensor([6, 6, 6]))
    for kw in (dict(), dict(method="exact", quiet=True)):
        a = edge_attribution(m, unpadded, metric=metric(), ablation="mean", **kw).values
        b = edge_attribution(
            m, unpadded, metric=metric(), ablation="mean", mean_mask=torch.ones(3, 6), **kw
        ).values
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------- attribution patching


@pytest.mark.parametrize("max_batch", [None, 1])
def test_attribution_patching_with_a_masked_mean_is_exact_where_the_model_is_linear(max_batch):
    """An attention-only model without norms is linear after its last layer's pattern: there AtP's estimate of a
    masked mean ablation equals the exact patch of the same masked mean (the exact grid checked above against hand
    means); and the estimate does not depend on the pad id. ``max_batch=1``: the means are summed over parts."""
    from pypattern.models import Transformer, TransformerConfig

    cfg = TransformerConfig(
        n_layers=2, d_model=16, n_heads=2, d_mlp=None, d_vocab=V, n_ctx=8, normalization_type=None,
        dtype=torch.float64, seed=2,
    )  # fmt: skip
    model = Transformer(cfg)
    kw = dict(direction="noising", metric=metric(), sites=["z", "resid_post"], max_batch=max_batch)
    got = {}
    for pad in (0, 11):
        clean = padded(pad)
        atp = attribution_patching(model, clean, corruption=MeanAblation(attention_mask=MASK), **kw)
        got[pad] = atp
        for site in ("z", "resid_post"):
            ex = activation_patching(
                model, site, clean, corruption=MeanAblation(attention_mask=MASK), direction="noising",
                metric=metric(), quiet=True,
            )  # fmt: skip
            torch.testing.assert_close(atp[site].values[:, 1], ex.values[:, 1], rtol=0, atol=1e-9)
    for site in ("z", "resid_post"):
        torch.testing.assert_close(got[0][site].values, got[11][site].values, rtol=0, atol=1e-12)
    unmasked = attribution_patching(model, padded(0), corruption=MeanAblation(), **kw)
    assert not torch.allclose(unmasked["z"].values, got[0]["z"].values)  # the padding moved the unmasked mean


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_masks_are_refused_naming_the_argument(tmp_path):
    m = llama()
    clean = padded(0)
    kw = dict(direction="noising", metric=metric(), quiet=True)
    left = torch.tensor([[0, 1, 1, 1, 1, 1]] * 3)
    for bad, err, msg in (
        (torch.ones(3, 5), ValueError, r"MeanAblation.attention_mask has shape \(3, 5\)"),
        (MASK * 2, ValueError, r"MeanAblation.attention_mask must hold 1 .* or 0 .*value 2"),
        (MASK * 0.5, ValueError, r"MeanAblation.attention_mask must hold .*0.5"),
        (left, ValueError, r"MeanAblation.attention_mask is left-padded \(row 0"),
        (MASK.tolist(), TypeError, r"MeanAblation.attention_mask is a list"),
    ):
        with pytest.raises(err, match=msg):
            activation_patching(m, "resid_pre", clean, corruption=MeanAblation(attention_mask=bad), **kw)
    with pytest.raises(ValueError, match=r"MeanAblation.attention_mask has shape \(3, 6\); give \(4, 6\)"):
        MeanAblation(padded(0, torch.tensor([6, 6, 6, 6])), attention_mask=MASK)
    enc = {"input_ids": clean, "attention_mask": left}
    with pytest.raises(ValueError, match=r"left-padded"):
        MeanAblation(reference_tokens=enc)
    with pytest.raises(ValueError, match=r"attention_mask .* give one of them"):
        MeanAblation(reference_tokens={"input_ids": clean, "attention_mask": MASK}, attention_mask=MASK)
    # circuits: the mask of ablation="mean" only, of the prompts' shape, 0/1, right-padded
    with pytest.raises(ValueError, match=r"mean_mask is given with ablation='resample'"):
        patch_edges(m, ["L0H1->logits"], clean, clean, metric=metric(), mean_mask=MASK)
    with pytest.raises(ValueError, match=r"mean_mask is given with ablation='zero'"):
        edge_attribution(m, clean, metric=metric(), ablation="zero", mean_mask=MASK)
    for bad, msg in (
        (MASK[:, :5], r"mean_mask has shape \(3, 5\)"),
        (MASK * 3, r"mean_mask must hold"),
        (left, r"mean_mask is left-padded"),
    ):
        with pytest.raises(ValueError, match=msg):
            faithfulness(m, ["L0H1->logits"], clean, metric=metric(), ablation="mean", mean_mask=bad)
    # a checkpoint of a run with one mask is not read back by a run with another
    path = tmp_path / "grid.npz"
    activation_patching(
        m, "resid_pre", clean, corruption=MeanAblation(attention_mask=MASK), checkpoint=path, **kw
    )
    other = MASK.clone()
    other[1, 5] = False
    with pytest.raises(FingerprintMismatch):
        activation_patching(
            m, "resid_pre", clean, corruption=MeanAblation(attention_mask=other), checkpoint=path, **kw
        )
    path = tmp_path / "scores.npz"
    kw = dict(metric=metric(), ablation="mean", method="exact", quiet=True)
    edge_attribution(m, clean, mean_mask=MASK, checkpoint=str(path), **kw)
    with pytest.raises(FingerprintMismatch):
        edge_attribution(m, clean, mean_mask=other, checkpoint=str(path), **kw)
