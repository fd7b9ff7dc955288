"""The circuit functions on padded prompts under an attention mask (``attention_mask=``, or a tokenizer's output).

Tiny random float64 Hugging Face models converted with ``pypattern.from_hf`` (eager attention): GPT-2 (learned
positions), Llama with grouped-query attention (rotary positions) and BLOOM (ALiBi). The ground truth is each
prompt alone, unpadded: every row of a left-padded batch (rows of different lengths, one unpadded) gives the
values of its prompt run by itself, for ``patch_edges`` (edge sets into the queries, keys and values of heads,
into the MLPs and into the logits), EAP, EAP-IG and exact edge scores; ``faithfulness`` and ``pruning_curve`` give
the per-prompt metrics averaged over the examples as they average them; ``acdc`` on one left-padded prompt finds
the circuit of the prompt alone. A mask without padding changes nothing, bit for bit; a tokenizer's output equals
its tensors with the mask; a mean ablation over right padding takes the mask as its mean mask; bad masks, a metric
reading padding, masks that disagree and a mean over left padding are refused by name.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers as T

import pypattern as pp
from pypattern.circuits import acdc, edge_attribution, edges, faithfulness, patch_edges, pruning_curve
from pypattern.circuits.results import rank_order
from pypattern.patching import LogitDiff

pytestmark = pytest.mark.usefixtures("one_thread")

V = 40
LENGTHS = [6, 4, 5]  # left padding to 6 tokens; row 0 unpadded
TMAX = 6
PAD = 1
ANSWER, WRONG = torch.tensor([3, 4, 5]), torch.tensor([6, 7, 8])
TOL = 1e-9


def _make(name: str):
    torch.manual_seed(0)
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
    if name == "gpt2":
        cfg = T.GPT2Config(
            vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, bos_token_id=0, eos_token_id=1, initializer_range=0.25,
        )  # fmt: skip
        m = T.GPT2LMHeadModel(cfg)
    elif name == "llama":
        m = T.LlamaForCausalLM(T.LlamaConfig(**small, num_key_value_heads=2))
    else:
        cfg = T.BloomConfig(
            vocab_size=V, hidden_size=32, n_layer=2, n_head=4, hidden_dropout=0.0, attention_dropout=0.0,
            bos_token_id=0, eos_token_id=1, initializer_range=0.25,
        )  # fmt: skip
        m = T.BloomForCausalLM(cfg)
    m = m.double().eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n or "ln" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    m.config._attn_implementation = "eager"
    return pp.from_hf(m)


_MODELS: dict = {}


def model(name: str):
    if name not in _MODELS:
        _MODELS[name] = _make(name)
    return _MODELS[name]


def seqs():
    """Clean prompts and corrupted ones (their first and second-to-last tokens replaced)."""
    g = torch.Generator().manual_seed(1)
    clean = [torch.randint(2, V, (n,), generator=g) for n in LENGTHS]
    corrupted = [s.clone() for s in clean]
    for s in corrupted:
        s[0] = (s[0] + 3) % (V - 2) + 2
        s[-2] = (s[-2] + 5) % (V - 2) + 2
    return clean, corrupted


def pad(rows, side: str = "left"):
    ids = torch.full((len(rows), TMAX), PAD)
    mask = torch.zeros(len(rows), TMAX, dtype=torch.long)
    for i, s in enumerate(rows):
        sl = slice(TMAX - len(s), TMAX) if side == "left" else slice(0, len(s))
        ids[i, sl], mask[i, sl] = s, 1
    return ids, mask


def metric(side: str = "left"):
    if side == "left":
        return LogitDiff(ANSWER, WRONG)
    return LogitDiff(ANSWER, WRONG, position=torch.tensor(LENGTHS) - 1)


def alone_metric(b: int):
    return LogitDiff(ANSWER[b : b + 1], WRONG[b : b + 1])


def edge_sets(graph, seed: int = 0) -> torch.Tensor:
    """Sets of edges: every edge into the heads' queries, keys, values, into the MLPs, into the logits (each kind
    alone), half of each kind, and a random set."""
    names = [graph.dst_names[int(d)] for d in graph.dst_idx]
    kinds = [
        [n.endswith(".q") for n in names],
        [n.endswith(".k") for n in names],
        [n.endswith(".v") for n in names],
        [n.startswith("MLP") for n in names],
        [n == "logits" for n in names],
    ]
    sets = [torch.tensor(k) for k in kinds]
    assert all(bool(s.any()) for s in sets)
    sets += [s & (torch.arange(len(graph)) % 2 == 0) for s in sets]
    g = torch.Generator().manual_seed(seed)
    sets.append(torch.rand(len(graph), generator=g) < 0.3)
    return torch.stack(sets)


def close(a, b, msg=""):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    torch.testing.assert_close(a, b, rtol=0, atol=TOL, msg=msg)


FAMILIES = ["gpt2", "llama", "bloom"]


# ----------------------------------------------------------------------- each row equals its prompt alone


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("mode,ablation", [("noise", "resample"), ("denoise", "resample"), ("noise", "zero")])
def test_patch_edges_rows_equal_each_prompt_alone(name, mode, ablation):
    m = model(name)
    clean, corrupted = seqs()
    (ci, mask), (ki, _) = pad(clean), pad(corrupted)
    graph = edges(m)
    sets = edge_sets(graph)
    kw = dict(mode=mode, ablation=ablation, graph=graph)
    k_arg = ki if ablation == "resample" else None
    got = patch_edges(m, sets, ci, k_arg, metric=metric(), attention_mask=mask, **kw)
    for b in range(len(LENGTHS)):
        kb = corrupted[b][None] if ablation == "resample" else None
        want = patch_edges(m, sets, clean[b][None], kb, metric=alone_metric(b), **kw)[:, 0]
        close(got[:, b], want, f"{name} row {b}")
    # the mask matters: the padded rows without it are other numbers
    unmasked = patch_edges(m, sets, ci, k_arg, metric=metric(), **kw)
    assert float((unmasked[:, 1:] - got[:, 1:]).abs().max()) > 1e-3


@pytest.mark.parametrize("name", FAMILIES)
def test_edge_scores_rows_equal_each_prompt_alone(name):
    """EAP, EAP-IG (its interpolated runs and their backwards) and exact scores."""
    m = model(name)
    clean, corrupted = seqs()
    (ci, mask), (ki, _) = pad(clean), pad(corrupted)
    for method in ("eap", "eap-ig", "exact"):
        steps = dict(steps=3) if method == "eap-ig" else {}
        got = edge_attribution(
            m, ci, ki, metric=metric(), method=method, attention_mask=mask, quiet=True, **steps
        )
        assert float(got.values.abs().max()) > 0.1
        for b in range(len(LENGTHS)):
            want = edge_attribution(
                m,
                clean[b][None],
                corrupted[b][None],
                metric=alone_metric(b),
                method=method,
                quiet=True,
                **steps,
            )
            close(got.values[b], want.values[0], f"{name} {method} row {b}")
            close(got.m_clean[b], want.m_clean[0])
            close(got.m_base[b], want.m_base[0])


def test_denoising_scores_and_right_padding_with_per_example_positions():
    """Denoising EAP and exact scores under left padding; right padding with the metric at each row's last real
    token (its padding queries attend real keys) also equals each prompt alone."""
    m = model("llama")
    clean, corrupted = seqs()
    for side in ("left", "right"):
        (ci, mask), (ki, _) = pad(clean, side), pad(corrupted, side)
        for method in ("eap", "exact"):
            got = edge_attribution(
                m, ci, ki, metric=metric(side), method=method, mode="denoise", attention_mask=mask, quiet=True
            )
            for b in range(len(LENGTHS)):
                want = edge_attribution(
                    m, clean[b][None], corrupted[b][None], metric=alone_metric(b), method=method, mode="denoise",
                    quiet=True,
                )  # fmt: skip
                close(got.values[b], want.values[0], f"{side} {method} row {b}")


def test_per_position_scores_are_each_prompt_alone_shifted_and_zero_on_padding():
    """On a per-position graph, row ``b``'s score of an edge at column ``t`` is its prompt's at ``t - offset``
    (the padding before it), and an edge at a padding column scores exactly 0."""
    m = model("llama")
    clean, corrupted = seqs()
    (ci, mask), (ki, _) = pad(clean), pad(corrupted)
    for method in ("eap", "exact"):
        got = edge_attribution(
            m, ci, ki, metric=metric(), method=method, per_position=True, attention_mask=mask, quiet=True
        )
        for b, n in enumerate(LENGTHS):
            off = TMAX - n
            w = edge_attribution(
                m, clean[b][None], corrupted[b][None], metric=alone_metric(b), method=method, per_position=True,
                quiet=True,
            )  # fmt: skip
            alone = {(e.src, e.dst, e.qkv, e.pos): w.values[0, i] for i, e in enumerate(w.graph.edges)}
            at = [
                (i, (e.src, e.dst, e.qkv, e.pos - off)) for i, e in enumerate(got.graph.edges) if e.pos >= off
            ]
            assert len(at) == len(alone)
            close(got.values[b, [i for i, _ in at]], torch.stack([alone[k] for _, k in at]), f"{method} {b}")
            on_pad = [i for i, e in enumerate(got.graph.edges) if e.pos < off]
            assert bool((got.values[b, on_pad] == 0).all())


# ----------------------------------------------------------------------- faithfulness, curves, ACDC


def _per_prompt(m, sets, mode="noise"):
    """The metric of each set patched, each prompt alone: ``(C, batch)``."""
    clean, corrupted = seqs()
    cols = [
        patch_edges(m, sets, clean[b][None], corrupted[b][None], metric=alone_metric(b), mode=mode)[:, 0]
        for b in range(len(LENGTHS))
    ]
    return torch.stack(cols, 1)


@pytest.mark.parametrize("name", ["llama", "bloom"])
def test_faithfulness_and_pruning_curve_average_the_prompts_alone(name):
    m = model(name)
    graph = edges(m)
    E = len(graph)
    clean, corrupted = seqs()
    (ci, mask), (ki, _) = pad(clean), pad(corrupted)
    circuits = edge_sets(graph, seed=3)
    # noising evaluates a circuit on the clean run with every edge outside it ablated
    outside = torch.cat([~circuits, torch.zeros(1, E, dtype=torch.bool), torch.ones(1, E, dtype=torch.bool)])
    means = _per_prompt(m, outside).mean(1)
    full, empty = means[-2], means[-1]
    want = (means[:-2] - empty) / (full - empty)
    got = faithfulness(m, circuits, ci, ki, metric=metric(), graph=graph, attention_mask=mask)
    close(got, want)

    scores = edge_attribution(m, ci, ki, metric=metric(), attention_mask=mask)
    counts = [0, 3, 10, 30, E]
    curve = pruning_curve(m, scores, ci, ki, metric=metric(), counts=counts, attention_mask=mask, quiet=True)
    order = rank_order(scores.scores, "scores", graph)
    rank = torch.empty(E, dtype=torch.long)
    rank[order] = torch.arange(E)
    kept = rank[None, :] < torch.tensor(counts)[:, None]
    means_c = _per_prompt(m, ~kept).mean(1)
    (label,) = curve.metric_values
    close(curve.metric_values[label], means_c)
    close(curve.faithfulness[label], (means_c - empty) / (full - empty))
    close(curve.m_full, full)
    close(curve.m_empty, empty)


def test_acdc_on_one_left_padded_prompt_finds_the_prompt_alone_circuit():
    m = model("llama")
    clean, corrupted = seqs()
    b = 1  # two padding tokens
    ids, mask = pad([clean[b]])
    kids, _ = pad([corrupted[b]])
    got = acdc(m, ids, kids, metric=alone_metric(b), threshold=0.05, attention_mask=mask, quiet=True)
    want = acdc(m, clean[b][None], corrupted[b][None], metric=alone_metric(b), threshold=0.05, quiet=True)
    assert 0 < int(got.mask.sum()) < len(got.graph)
    assert torch.equal(got.mask, want.mask)
    close(got.scores, want.scores)
    close(got.faithfulness, want.faithfulness)


# ----------------------------------------------------------------------- the forms of the mask


def test_a_mask_without_padding_changes_nothing_bit_for_bit():
    m = model("llama")
    clean, corrupted = seqs()
    ci = torch.stack([torch.cat([s, s])[:TMAX] for s in clean])
    ki = torch.stack([torch.cat([s, s])[:TMAX] for s in corrupted])
    ones = torch.ones_like(ci)
    graph = edges(m)
    sets = edge_sets(graph)
    assert torch.equal(
        patch_edges(m, sets, ci, ki, metric=metric(), attention_mask=ones),
        patch_edges(m, sets, ci, ki, metric=metric()),
    )
    for method in ("eap", "eap-ig", "exact"):
        steps = dict(steps=2) if method == "eap-ig" else {}
        a = edge_attribution(
            m, ci, ki, metric=metric(), method=method, attention_mask=ones, quiet=True, **steps
        )
        b = edge_attribution(m, ci, ki, metric=metric(), method=method, quiet=True, **steps)
        assert torch.equal(a.values, b.values), method


def test_a_tokenizer_output_equals_its_tensors_with_the_mask():
    m = model("gpt2")
    clean, corrupted = seqs()
    (ci, mask), (ki, _) = pad(clean), pad(corrupted)
    enc = T.BatchEncoding({"input_ids": ci, "attention_mask": mask})
    enc_k = {"input_ids": ki.tolist(), "attention_mask": mask.tolist()}  # return_tensors=None: lists
    graph = edges(m)
    sets = edge_sets(graph)
    want = patch_edges(m, sets, ci, ki, metric=metric(), attention_mask=mask)
    assert torch.equal(patch_edges(m, sets, enc, enc_k, metric=metric()), want)
    assert torch.equal(patch_edges(m, sets, enc, ki, metric=metric()), want)
    assert torch.equal(patch_edges(m, sets, ci, ki, metric=metric(), attention_mask=mask.bool()), want)
    a = edge_attribution(m, enc, enc_k, metric=metric(), method="eap-ig", steps=2)
    b = edge_attribution(m, ci, ki, metric=metric(), method="eap-ig", steps=2, attention_mask=mask)
    assert torch.equal(a.values, b.values)


def test_mean_ablation_takes_the_mask_over_right_padding_and_refuses_left_padding():
    m = model("llama")
    clean, corrupted = seqs()
    ci, mask = pad(clean, "right")
    graph = edges(m)
    sets = edge_sets(graph)
    kw = dict(metric=metric("right"), ablation="mean", graph=graph)
    got = patch_edges(m, sets, ci, attention_mask=mask, **kw)
    # the mean over the prompts real at each position (right padding: the unmasked runs compute the real tokens
    # as the masked ones do)
    close(got, patch_edges(m, sets, ci, mean_mask=mask, **kw))
    close(got, patch_edges(m, sets, ci, mean_mask=mask, attention_mask=mask, **kw))
    assert float((got - patch_edges(m, sets, ci, **kw)).abs().max()) > 1e-3  # the padding is not in the mean
    # EAP's deferred mean (over the base run recorded by the gradient pass) takes it too
    a = edge_attribution(m, ci, metric=metric("right"), ablation="mean", attention_mask=mask)
    b = edge_attribution(m, ci, metric=metric("right"), ablation="mean", mean_mask=mask)
    close(a.values, b.values)
    # reference prompts of their own (noising with corrupted): run unmasked, under their own mean_mask
    ref, ref_mask = pad(corrupted[1:], "right")
    close(
        patch_edges(m, sets, ci, ref, mean_mask=ref_mask, attention_mask=mask, **kw),
        patch_edges(m, sets, ci, ref, mean_mask=ref_mask, **kw),
    )
    other = mask.clone()
    other[0, -1] = 0
    with pytest.raises(ValueError, match=r"mean_mask differs from attention_mask"):
        patch_edges(m, sets, ci, mean_mask=other, attention_mask=mask, **kw)
    left, lmask = pad(clean)
    with pytest.raises(ValueError, match=r"ablation='mean' with a left-padded attention_mask \(row 1 "):
        edge_attribution(m, left, metric=metric(), ablation="mean", attention_mask=lmask)


def test_bad_masks_and_a_metric_on_padding_are_refused_by_name():
    m = model("gpt2")
    clean, corrupted = seqs()
    (ci, mask), (ki, _) = pad(clean), pad(corrupted)
    call = lambda **kw: patch_edges(m, ["embed->logits"], ci, ki, metric=metric(), **kw)  # noqa: E731
    with pytest.raises(
        ValueError, match=r"attention_mask has shape \(3, 5\); it must equal the clean prompts'"
    ):
        call(attention_mask=mask[:, :5])
    bad = mask.clone()
    bad[0, 0] = 2
    with pytest.raises(
        ValueError, match=r"attention_mask must hold 1 \(a real token\) or 0 \(padding\), got the"
    ):
        call(attention_mask=bad)
    empty = mask.clone()
    empty[2] = 0
    with pytest.raises(ValueError, match=r"attention_mask row 2 is all 0"):
        call(attention_mask=empty)
    with pytest.raises(TypeError, match=r"attention_mask is a str"):
        call(attention_mask="mask")
    # the metric must read real tokens: right padding read at the last position
    rc, rmask = pad(clean, "right")
    rk, _ = pad(corrupted, "right")
    with pytest.raises(
        ValueError, match=r"metric.position reads position 5 of row 1, which attention_mask marks"
    ):
        edge_attribution(m, rc, rk, metric=metric(), attention_mask=rmask)
    with pytest.raises(ValueError, match=r"metric.position reads position 0 of row 1"):
        faithfulness(m, [], ci, ki, metric=LogitDiff(ANSWER, WRONG, position=torch.tensor([0, 0, 0])),
                     attention_mask=mask)  # fmt: skip
    # a dict's mask and another one
    enc = {"input_ids": ci, "attention_mask": mask}
    with pytest.raises(ValueError, match=r"attention_mask is given and clean holds another one"):
        patch_edges(m, ["embed->logits"], enc, ki, metric=metric(), attention_mask=torch.ones_like(mask))
    with pytest.raises(ValueError, match=r"corrupted holds an attention_mask other than the clean prompts'"):
        pruning_curve(m, torch.rand(len(edges(m))), ci, enc, metric=metric(), quiet=True)
    with pytest.raises(TypeError, match=r"clean is a dict without 'input_ids'"):
        acdc(m, {"ids": ci}, ki, metric=metric(), threshold=0.1)


def test_checkpoints_hold_the_mask(tmp_path):
    """An exact scoring's checkpoint made under a padding mask is resumed under the same mask (or its dict) and
    refused under another one, even one that leaves the prompts and the base run's metric as they are (right
    padding counted as real after the metric's position), and without one."""
    from pypattern.io import FingerprintMismatch

    m = model("gpt2")
    clean, corrupted = seqs()
    (ci, mask), (ki, _) = pad(clean, "right"), pad(corrupted, "right")
    path = tmp_path / "scores.ppt"
    kw = dict(metric=metric("right"), method="exact", quiet=True, checkpoint=str(path))
    first = edge_attribution(m, ci, ki, attention_mask=mask, **kw)
    again = edge_attribution(m, {"input_ids": ci, "attention_mask": mask}, ki, **kw)
    assert torch.equal(first.values, again.values)
    other = mask.clone()
    other[1] = 1  # row 1's padding after its metric position counted as real: the same base metric
    with pytest.raises(FingerprintMismatch, match=r"attention_mask"):
        edge_attribution(m, ci, ki, attention_mask=other, **kw)
    with pytest.raises(FingerprintMismatch, match=r"attention_mask"):
        edge_attribution(m, ci, ki, **kw)


def test_corrupted_prompts_that_differ_at_padding_only_are_named_a_no_op():
    """Resampling from prompts equal to the clean ones at every real token changes nothing (the padding's ids reach
    no real token): warned as when the prompts are equal, and every score is 0."""
    m = model("llama")
    clean_rows, _ = seqs()
    clean, mask = pad(clean_rows)
    other = clean.clone()
    other[~mask.bool()] = PAD + 1  # other pad ids, the same real tokens
    assert not torch.equal(clean, other)
    with pytest.warns(RuntimeWarning, match="every edge score is 0|corrupted prompts equal the clean"):
        s = edge_attribution(m, clean, other, metric=metric(), method="exact", attention_mask=mask)
    assert float(s.values.abs().max()) == 0.0
    # real tokens that differ: no such warning
    _, corr_rows = seqs()
    corrupted, _ = pad(corr_rows)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        edge_attribution(m, clean, corrupted, metric=metric(), method="eap", attention_mask=mask)
