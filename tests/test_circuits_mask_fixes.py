"""The circuit functions under an attention mask: what their results record, a mean ablation's reference prompts
given as a tokenizer's output, ACDC's denoising warning on padded per-position graphs, and Qwen3's float32
query/key norms in a float64 model.

Tiny random float64 Hugging Face models converted with ``pypattern.from_hf`` (eager attention). The ground truth
is each prompt alone, unpadded, or a computation by hand (the mean of the reference prompts' final residual stream
over their real tokens, through the final norm and the unembedding).
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import transformers as T

import pypattern as pp
from pypattern.circuits import (
    Circuit,
    EdgeScores,
    PruningCurve,
    acdc,
    edge_attribution,
    edges,
    patch_edges,
    pruning_curve,
)
from pypattern.circuits.model_view import ModelView
from pypattern.models.transformer import RMSNorm
from pypattern.patching import LogitDiff

pytestmark = pytest.mark.usefixtures("one_thread")

V = 40
LENGTHS = [6, 4, 5]
TMAX = 6
PAD = 1
ANSWER, WRONG = torch.tensor([3, 4, 5]), torch.tensor([6, 7, 8])


def _make(kind: str, dtype=torch.float64):
    torch.manual_seed(0)
    small = dict(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=None,
        initializer_range=0.25,
    )  # fmt: skip
    if kind == "llama":
        hf = T.LlamaForCausalLM(T.LlamaConfig(**small))
    else:  # Qwen3: an RMSNorm over each head's query and key (in float32, as the model's other norms)
        hf = T.Qwen3ForCausalLM(T.Qwen3Config(**small, head_dim=8))
    hf = hf.to(dtype).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    hf.config._attn_implementation = "eager"
    return pp.from_hf(hf)


_MODELS: dict = {}


def model(kind: str, dtype=torch.float64):
    if (kind, dtype) not in _MODELS:
        _MODELS[kind, dtype] = _make(kind, dtype)
    return _MODELS[kind, dtype]


def seqs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
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


def alone_metric(b: int):
    return LogitDiff(ANSWER[b : b + 1], WRONG[b : b + 1])


# ----------------------------------------------------------------------- info["attention_mask"], saved


def test_results_record_whether_a_mask_was_given_and_keep_it_when_saved(tmp_path):
    m = model("llama")
    clean, corrupted = seqs()
    (ci, mask), (ki, _) = pad(clean), pad(corrupted)
    metric = LogitDiff(ANSWER, WRONG)
    s = edge_attribution(m, ci, ki, metric=metric, attention_mask=mask, quiet=True)
    enc = edge_attribution(m, {"input_ids": ci, "attention_mask": mask}, ki, metric=metric, quiet=True)
    ones = edge_attribution(m, ci, ki, metric=metric, attention_mask=torch.ones_like(mask), quiet=True)
    bare = edge_attribution(m, ci, ki, metric=metric, quiet=True)
    # as pypattern.patching records it: whether a mask was given (one without padding too)
    assert (s.info["attention_mask"], enc.info["attention_mask"]) == (True, True)
    assert (ones.info["attention_mask"], bare.info["attention_mask"]) == (True, False)
    ap = pp.patching.attribution_patching(m, ci, ki, metric=metric, sites=["resid_pre"], attention_mask=mask)
    assert ap["resid_pre"].info["attention_mask"] is s.info["attention_mask"]

    curve = pruning_curve(m, s, ci, ki, metric=metric, counts=[0, 5], attention_mask=mask, quiet=True)
    curve0 = pruning_curve(m, bare, ci, ki, metric=metric, counts=[0, 5], quiet=True)
    assert (curve.info["attention_mask"], curve0.info["attention_mask"]) == (True, False)
    b = 1
    ids, one_mask = pad([clean[b]])
    kids, _ = pad([corrupted[b]])
    circ = acdc(m, ids, kids, metric=alone_metric(b), threshold=0.5, attention_mask=one_mask, quiet=True)
    circ0 = acdc(m, clean[b][None], corrupted[b][None], metric=alone_metric(b), threshold=0.5, quiet=True)
    assert (circ.info["attention_mask"], circ0.info["attention_mask"]) == (True, False)

    for obj, cls in ((s, EdgeScores), (bare, EdgeScores), (curve, PruningCurve), (circ, Circuit)):
        path = tmp_path / f"{cls.__name__}_{obj.info['attention_mask']}.npz"
        obj.save(path)
        back = cls.load(path)
        assert back.info["attention_mask"] is obj.info["attention_mask"]


# ----------------------------------------------------------------------- mean over reference prompts' real tokens


def _naive_mean_logit_diff(m, refs, clean_pos):
    """Every edge into the logits patched with its source's per-position mean over ``refs`` (unpadded prompts
    of different lengths): the logits read the mean of the prompts' final residual stream over those real at
    each position, through the final norm and the unembedding."""
    L = m.cfg.n_layers
    with torch.no_grad():
        resid = [m(r[None], stop_at_layer=L)[0] for r in refs]  # (len, d) each, every prompt alone
        out = []
        for b, p in enumerate(clean_pos.tolist()):
            mean = torch.stack([x[p] for x in resid if x.shape[0] > p]).mean(0)
            logits = m.unembed(m.ln_final(mean[None, None]))[0, 0]
            out.append(logits[ANSWER[b]] - logits[WRONG[b]])
    return torch.stack(out)


def test_mean_reference_prompts_given_as_a_tokenizer_output_average_their_real_tokens():
    m = model("llama")
    graph = edges(m)
    into_logits = torch.tensor([graph.dst_names[int(d)] == "logits" for d in graph.dst_idx])
    refs, _ = seqs(seed=7)
    ref_ids, ref_mask = pad(refs, "right")
    enc = T.BatchEncoding({"input_ids": ref_ids, "attention_mask": ref_mask})
    # clean prompts unpadded, then right-padded under their own mask, read at positions 3, 4 and 5: the means there
    # are over 3, 2 and 1 reference prompts
    g = torch.Generator().manual_seed(3)
    full = torch.randint(2, V, (3, TMAX), generator=g)
    pos = torch.tensor([3, 4, 5])
    metric = LogitDiff(ANSWER, WRONG, position=pos)
    want = _naive_mean_logit_diff(m, refs, pos)
    got = patch_edges(m, into_logits, full, enc, metric=metric, ablation="mean", graph=graph)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    lists = {"input_ids": ref_ids.tolist(), "attention_mask": ref_mask.tolist()}  # return_tensors=None
    assert torch.equal(patch_edges(m, into_logits, full, lists, metric=metric, ablation="mean"), got)
    cmask = torch.ones(3, TMAX, dtype=torch.long)
    cmask[0, 4:] = 0  # row 0 read at 3: right padding after it
    cl = full.clone()
    cl[0, 4:] = PAD
    got_masked = patch_edges(
        m, into_logits, {"input_ids": cl, "attention_mask": cmask}, enc, metric=metric, ablation="mean"
    )
    torch.testing.assert_close(got_masked, want, rtol=0, atol=1e-10)
    # the mean without the mask takes the padding's outputs too: other numbers
    plain = patch_edges(m, into_logits, full, ref_ids, metric=metric, ablation="mean")
    assert float((plain - want).abs().max()) > 1e-3
    # every circuit function reads it as mean_mask
    a = edge_attribution(m, full, enc, metric=metric, ablation="mean", quiet=True)
    b = edge_attribution(m, full, ref_ids, metric=metric, ablation="mean", mean_mask=ref_mask, quiet=True)
    assert torch.equal(a.values, b.values)


def test_mean_reference_prompts_left_padded_or_masked_twice_are_refused():
    m = model("llama")
    refs, _ = seqs(seed=7)
    ids, mask = pad(refs, "left")
    g = torch.Generator().manual_seed(3)
    full = torch.randint(2, V, (3, TMAX), generator=g)
    metric = LogitDiff(ANSWER, WRONG)
    enc = {"input_ids": ids, "attention_mask": mask}
    with pytest.raises(ValueError, match=r"corrupted\['attention_mask'\] is left-padded \(row 1 has padding"):
        patch_edges(m, ["embed->logits"], full, enc, metric=metric, ablation="mean")
    rids, rmask = pad(refs, "right")
    with pytest.raises(ValueError, match=r"corrupted holds an attention_mask .* and mean_mask is given too"):
        edge_attribution(
            m, full, {"input_ids": rids, "attention_mask": rmask}, metric=metric, ablation="mean",
            mean_mask=rmask,
        )  # fmt: skip


# ----------------------------------------------------------------------- ACDC's denoising warning


def _denoise_warning(*args, **kw) -> tuple[int, int]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        acdc(*args, mode="denoise", per_position=True, quiet=True, **kw)
    (msg,) = [str(w.message) for w in caught if "acdc(mode='denoise')" in str(w.message)]
    zeros, tested = re.search(r"(\d+) of the (\d+) edges tested", msg).groups()
    return int(zeros), int(tested)


@pytest.mark.parametrize("side,threshold", [("left", 0.05), ("right", 0.0)])
def test_acdc_denoising_warning_counts_the_edges_at_real_tokens(side, threshold):
    """Two prompts of 4 tokens padded to 6: the warning's counts are those of the unpadded prompts (the edges at
    the padding columns, tested or not, are not counted)."""
    m = model("llama")
    g = torch.Generator().manual_seed(5)
    clean = torch.randint(2, V, (2, 4), generator=g)
    corrupted = clean.clone()
    corrupted[:, 1] = (corrupted[:, 1] + 3) % (V - 2) + 2
    answer, wrong = ANSWER[:2], WRONG[:2]
    want = _denoise_warning(m, clean, corrupted, metric=LogitDiff(answer, wrong), threshold=threshold)
    ci, ki = torch.full((2, TMAX), PAD), torch.full((2, TMAX), PAD)
    mask = torch.zeros(2, TMAX, dtype=torch.long)
    cols = slice(TMAX - 4, TMAX) if side == "left" else slice(0, 4)
    ci[:, cols], ki[:, cols], mask[:, cols] = clean, corrupted, 1
    metric = LogitDiff(answer, wrong, **({} if side == "left" else dict(position=torch.tensor([3, 3]))))
    got = _denoise_warning(m, ci, ki, metric=metric, threshold=threshold, attention_mask=mask)
    assert got == want


# ----------------------------------------------------------------------- Qwen3's float32 query/key norms


def test_float64_qwen3_eap_under_a_mask_equals_each_prompt_alone():
    m = model("qwen3")
    assert m.cfg.qk_norm is True and m.blocks[0].attn.q_norm.compute_dtype == torch.float32
    clean, corrupted = seqs()
    (ci, mask), (ki, _) = pad(clean), pad(corrupted)
    for method, kw in (("eap", {}), ("eap-ig", dict(steps=2))):
        got = edge_attribution(
            m, ci, ki, metric=LogitDiff(ANSWER, WRONG), method=method, attention_mask=mask, quiet=True, **kw
        )
        assert float(got.values.abs().max()) > 0.1
        for b in range(len(LENGTHS)):
            alone = edge_attribution(
                m, clean[b][None], corrupted[b][None], metric=alone_metric(b), method=method, quiet=True, **kw
            )
            torch.testing.assert_close(got.values[b], alone.values[0], rtol=0, atol=1e-10)


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_qk_norm_closed_form_vjp_is_autograd_of_the_float64_norm(offset):
    torch.manual_seed(2)
    norm = RMSNorm(8, 1e-6, torch.float64, compute_dtype=torch.float32, offset=offset)
    with torch.no_grad():
        norm.w.add_(0.3 * torch.randn(8, dtype=torch.float64))
    x, g = torch.randn(3, 2, 5, 8, dtype=torch.float64), torch.randn(3, 2, 5, 8, dtype=torch.float64)
    assert ModelView._wide_qk_norm_vjp(norm, g)
    wide = RMSNorm(8, 1e-6, torch.float64, offset=offset)  # the same norm computed in float64
    wide.load_state_dict(norm.state_dict())
    xr = x.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(wide(xr), xr, g)
    torch.testing.assert_close(ModelView._rms_vjp(norm, x, g), want, rtol=1e-12, atol=1e-13)


def test_float32_qwen3_eap_keeps_autograd_through_the_norms(monkeypatch):
    """A float32 model's norms compute in its own dtype: its scores are those of autograd through them, bit for
    bit."""
    m = model("qwen3", torch.float32)
    clean, corrupted = seqs()
    (ci, mask), (ki, _) = pad(clean), pad(corrupted)
    call = lambda: (
        edge_attribution(  # noqa: E731
            m, ci, ki, metric=LogitDiff(ANSWER, WRONG), attention_mask=mask, quiet=True
        ).values
    )
    got = call()
    monkeypatch.setattr(ModelView, "_wide_qk_norm_vjp", staticmethod(lambda norm, g: False))
    assert torch.equal(got, call())
