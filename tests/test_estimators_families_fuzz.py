"""The sampling estimators on Hugging Face families other than GPT-2, each native and converted with from_hf,
fed batches as users hold them: right-padded dicts with input_ids / attention_mask / labels (and a
transformers.BatchEncoding), shifted (x, y) pairs from a TensorDataset, plain token tensors.

With the noise off SGLD is a deterministic, elementwise drift, so the native and the converted model follow the
same trajectory: loss traces, BIFs and per-head / MLP / embedding susceptibilities agree to float rounding. The
same sequences with more padding columns (another pad id) give the same numbers, the loss at w* equals an
independent float64 next-token loss over the real tokens, and shifted pairs equal the token tensors they came
from. One LLC with noise, at the README's settings, agrees between the two forms within its standard error."""

import math

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import pypattern as pp  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

V = 32
ARCHS = ["neox", "llama", "qwen2", "gemma2", "phi", "falcon", "mixtral", "opt", "glm4", "arcee", "nemotron"]
NATIVE_MASKS = {
    "neox",
    "llama",
    "qwen2",
    "gemma2",
    "phi",
    "mixtral",
    "falcon",
    "opt",
    "glm4",
    "arcee",
    "nemotron",
}  # masks of unconverted models
KW = dict(
    num_chains=2,
    num_draws=4,
    num_burnin_steps=2,
    step_size=1e-3,
    localization=10.0,
    noise_scale=0.0,
    seed=3,
    quiet=True,
    warn_nonstationary=False,
)


def _hf(arch: str, dtype=torch.float64):
    T = transformers
    torch.manual_seed(0)
    small = dict(
        vocab_size=V,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=24,
        max_position_embeddings=32,
    )
    if arch == "neox":
        m = T.GPTNeoXForCausalLM(
            T.GPTNeoXConfig(**small, rotary_pct=0.5, hidden_dropout=0.0, attention_dropout=0.0)
        )
    elif arch == "llama":  # grouped-query attention, 2 query heads per key/value head
        m = T.LlamaForCausalLM(T.LlamaConfig(**small, num_key_value_heads=2))
    elif arch == "qwen2":  # q/k/v biases, GQA
        m = T.Qwen2ForCausalLM(T.Qwen2Config(**small, num_key_value_heads=2))
    elif arch == "gemma2":  # sandwich norms, soft caps, a sliding-window layer, tied embedding
        cfg = T.Gemma2Config(
            **small,
            num_key_value_heads=2,
            head_dim=4,
            sliding_window=4,
            attn_logit_softcapping=4.0,
            final_logit_softcapping=6.0,
        )
        m = T.Gemma2ForCausalLM(cfg)
        with torch.no_grad():  # norm weights start at zero (1 + w): make them matter
            for n, p in m.named_parameters():
                if "norm" in n:
                    p.add_(0.3 * torch.randn(p.shape))
            m.model.embed_tokens.weight[0].normal_(0.0, 0.02)  # the padding row starts at zero
    elif arch == "phi":  # parallel attention and MLP on one LayerNorm, partial rotary
        cfg = T.PhiConfig(
            **small, partial_rotary_factor=0.5, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0
        )
        m = T.PhiForCausalLM(cfg)
    elif arch == "falcon":  # Falcon-7B's layout: multi-query attention, parallel block, one LayerNorm
        cfg = T.FalconConfig(
            vocab_size=V,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=4,
            multi_query=True,
            new_decoder_architecture=False,
            parallel_attn=True,
            alibi=False,
            bias=False,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            max_position_embeddings=32,
            bos_token_id=0,
            eos_token_id=0,
        )
        m = T.FalconForCausalLM(cfg)
    elif arch == "mixtral":  # 4 experts, 2 per token; eager experts run in float64 (grouped_mm does not)
        cfg = T.MixtralConfig(
            **small,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            experts_implementation="eager" if dtype == torch.float64 else None,
        )
        m = T.MixtralForCausalLM(cfg)
    elif arch == "glm4":  # norms after the attention and the MLP, adjacent rotary pairs on half of each head
        cfg = T.Glm4Config(**small, num_key_value_heads=2, head_dim=4, pad_token_id=None)
        m = T.Glm4ForCausalLM(cfg)
        with torch.no_grad():  # norm weights start at one and q/k/v biases at zero: make them matter
            for n, p in m.named_parameters():
                if "norm" in n or "bias" in n:
                    p.add_(0.3 * torch.randn(p.shape))
    elif arch == "nemotron":  # LayerNorms multiplying by 1 + w, partial rotary, a plain squared-ReLU MLP
        cfg = T.NemotronConfig(
            **small, num_key_value_heads=2, pad_token_id=None, bos_token_id=0, eos_token_id=0
        )
        m = T.NemotronForCausalLM(cfg)
        with torch.no_grad():  # the norms' weights start at zero (1 + w) and their biases at zero
            for n, p in m.named_parameters():
                if "norm" in n:
                    p.add_(0.3 * torch.randn(p.shape))
    elif arch == "arcee":  # a plain squared-ReLU MLP, biases
        cfg = T.ArceeConfig(
            **small, num_key_value_heads=2, attention_bias=True, mlp_bias=True, pad_token_id=None, bos_token_id=0,
            eos_token_id=0,
        )  # fmt: skip
        m = T.ArceeForCausalLM(cfg)
    else:  # OPT: learned positions with an offset, a padding_idx row, no MLP module
        cfg = T.OPTConfig(
            vocab_size=V,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=24,
            word_embed_proj_dim=16,
            max_position_embeddings=32,
            dropout=0.0,
            attention_dropout=0.0,
            pad_token_id=1,
            bos_token_id=2,
            eos_token_id=2,
        )
        m = T.OPTForCausalLM(cfg)
    return m.to(dtype).eval()


def _padded(tokens: torch.Tensor, lengths, extra: int, pad: int) -> dict:
    """Right-padded batch: row i keeps its first lengths[i] tokens, then padding (id ``pad``) to the end and
    ``extra`` more columns; labels -100 at the padding, as a collator writes them."""
    B, L = tokens.shape
    am = (torch.arange(L + extra)[None] < torch.tensor(lengths)[:, None]).long()
    ids = torch.cat([tokens, torch.full((B, extra), pad)], 1)
    ids = torch.where(am.bool(), ids, pad)
    return {"input_ids": ids, "attention_mask": am, "labels": torch.where(am.bool(), ids, -100)}


def _tokens(n: int, seed: int, length: int = 9) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, V, (4, length), generator=g) for _ in range(n)]


def _loader(extra: int, pad: int):
    return [_padded(t, [9, 6, 9, 4], extra, pad) for t in _tokens(2, seed=1)]


def _probe(extra: int, pad: int):
    return _padded(_tokens(1, seed=2, length=8)[0][:3], [8, 5, 3], extra, pad)


def _components(arch: str) -> list[str]:
    comps = ["blocks.1.attn.head.1", "blocks.0.mlp", "embed"]
    if arch in ("llama", "qwen2", "gemma2", "mixtral", "glm4", "arcee", "nemotron"):
        comps.append("blocks.1.attn.kv_head.1")
    if arch == "falcon":  # multi-query: one key/value head shared by all four
        comps.append("blocks.1.attn.kv_head.0")
    if arch == "mixtral":
        comps.append("blocks.1.mlp.expert.2")
    return comps


def _next_token_loss64(hf, batches) -> float:
    """Independent L_n(w*): each row run alone, cut to its real tokens (no padding, no mask), float64
    log-softmax of the native logits, the mean over the targets whose label is not -100 (every batch here counts
    alike, so this is also the mean of the batches' means)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            for ids, am, labels in zip(b["input_ids"], b["attention_mask"], b["labels"], strict=True):
                n = int(am.sum())
                lp = torch.log_softmax(hf(ids[None, :n]).logits[0, :-1].double(), -1)
                tgt = labels[1:n]
                nll = -lp.gather(-1, tgt.clamp(min=0)[:, None])[:, 0]
                total += float(nll[tgt != -100].sum())
                count += int((tgt != -100).sum())
    return total / count


@pytest.mark.parametrize("arch", ARCHS)
def test_padded_dict_batches_native_and_converted_agree(arch):
    hf = _hf(arch)
    tf = pp.from_hf(hf)
    comps = _components(arch)
    plain, more = (_loader(0, 0), _probe(0, 0)), (_loader(3, 7), _probe(2, 7))
    # HF's own float64 Gemma 2 gives NaN logits (at the real tokens too) once a row's padding outruns the
    # sliding window (float32 does not); the converted model takes no mask and has no such case
    native_inputs = [] if arch == "gemma2" else [plain, more]

    ref = pp.estimate_llc(tf, plain[0], **KW)
    assert ref.init_loss == pytest.approx(_next_token_loss64(hf, plain[0]), rel=1e-12)
    ref_bif = pp.bif(tf, plain[0], plain[1], **KW).bif
    ref_chi = pp.susceptibilities(tf, plain[0], plain[1], comps, **KW).chi
    assert np.ptp(ref.loss_trace) > 0 and np.abs(ref_bif).max() > 0  # the chains moved
    assert (np.abs(ref_chi).max(axis=1) > 0).all()  # every component's chains moved

    runs = [(tf, more)] + [(hf, inputs) for inputs in native_inputs]
    for model, (loader, probe) in runs:
        llc = pp.estimate_llc(model, loader, **KW)
        np.testing.assert_allclose(llc.loss_trace, ref.loss_trace, rtol=1e-11, atol=0)
        bif = _unpadded_columns(pp.bif(model, loader, probe, **KW).bif, probe, axes=2)
        np.testing.assert_allclose(bif, ref_bif, rtol=1e-7, atol=1e-15)
        if model is hf and arch not in NATIVE_MASKS:
            with pytest.raises(ValueError, match="from_hf"):  # per-head masks need the adapter's layout
                pp.component_masks(hf, comps[0])
            continue
        if model is hf:  # names on the native model, and the masks a user builds from them
            masks = {c: pp.component_masks(hf, c) for c in comps}
            chi_masks = pp.susceptibilities(hf, loader, probe, masks, **KW).chi
            np.testing.assert_allclose(_unpadded_columns(chi_masks, probe), ref_chi, rtol=1e-7, atol=1e-15)
        chi = pp.susceptibilities(model, loader, probe, comps, **KW).chi
        np.testing.assert_allclose(_unpadded_columns(chi, probe), ref_chi, rtol=1e-7, atol=1e-15)


def _unpadded_columns(values: np.ndarray, probe: dict, axes: int = 1, width: int = 7) -> np.ndarray:
    """The per-token columns of the unpadded probe (3 sequences x ``width`` targets) out of a padded probe's
    (3 x its width), on the last ``axes`` axes; the dropped columns are padding and must be exactly zero."""
    am = probe["attention_mask"].bool()
    w = am.shape[1] - 1
    assert not (am[:, 1:] & am[:, :-1])[:, width:].any()
    lead = values.shape[: values.ndim - axes]
    v = values.reshape(*lead, *(3, w) * axes)
    keep = (slice(None),) * len(lead) + (slice(None), slice(0, width)) * axes
    out = v[keep]
    assert np.abs(v).sum() == pytest.approx(np.abs(out).sum(), rel=1e-12)  # padded columns hold zeros
    return out.reshape(*lead, *(3 * width,) * axes)


@pytest.mark.parametrize("arch", ["llama", "falcon", "mixtral", "opt"])
def test_pairs_batch_encodings_and_prompt_labels(arch):
    """Shifted (x, y) pairs (from a TensorDataset, or a list of tuples) are the token tensors they were cut
    from; a BatchEncoding is its dict; labels -100 on a prompt leave the prompt out, on both forms. The
    unshifted (input_ids, labels) pair is refused by name."""
    hf = _hf(arch)
    tf = pp.from_hf(hf)
    toks = _tokens(3, seed=4)
    ds = torch.utils.data.TensorDataset(torch.cat(toks)[:, :-1], torch.cat(toks)[:, 1:])
    pairs_dl = torch.utils.data.DataLoader(ds, batch_size=4)
    ref = pp.estimate_llc(tf, toks, **KW).loss_trace
    for model in (tf, hf):
        for loader in (pairs_dl, [(t[:, :-1], t[:, 1:]) for t in toks]):
            np.testing.assert_allclose(
                pp.estimate_llc(model, loader, **KW).loss_trace, ref, rtol=1e-12, atol=0
            )
        with pytest.raises(ValueError, match="TensorDataset"):
            pp.estimate_llc(model, [(t, t.clone()) for t in toks], **KW)

    batches = []
    for t in toks:
        b = _padded(t, [9, 6, 9, 9], 0, pad=1)
        b["labels"][:, :3] = -100  # a prompt of three tokens is not scored
        batches.append(b)
    want = _next_token_loss64(hf, batches)
    traces = []
    for model in (tf, hf):
        for loader in (batches, [transformers.BatchEncoding(b) for b in batches]):
            res = pp.estimate_llc(model, loader, **KW)
            assert res.init_loss == pytest.approx(want, rel=1e-12)
            traces.append(res.loss_trace)
    for tr in traces[1:]:
        np.testing.assert_allclose(tr, traces[0], rtol=1e-12, atol=0)


def test_readme_llc_native_and_converted_agree_within_standard_error():
    """The README's estimate_llc call (noise on, float32) on native OPT (whose query/key/value are three
    modules, the converted model's three other tensors: the noise lands differently) and on its conversion:
    two estimates of one number."""
    hf = _hf("opt", torch.float32)
    tf = pp.from_hf(hf)
    torch.manual_seed(0)
    data = [torch.randint(0, V, (4, 12)) for _ in range(8)]
    kw = dict(
        num_chains=4,
        num_draws=25,
        num_steps_bw_draws=5,
        num_burnin_steps=300,
        step_size=3e-4,
        localization=100.0,
        quiet=True,
    )
    a = pp.estimate_llc(tf, data, loss_fn=pp.losses.batch_loss, **kw)
    b = pp.estimate_llc(hf, data, **kw)
    assert a.init_loss == pytest.approx(b.init_loss, rel=1e-6)
    assert a.llc_mean > 0 and b.llc_mean > 0
    assert abs(a.llc_mean - b.llc_mean) < 4 * math.hypot(a.llc_se, b.llc_se)
