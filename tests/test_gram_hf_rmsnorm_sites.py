"""The per-sample gradient Gram on raw (unconverted) Hugging Face Llama-family models: the default sites cover the
RMSNorm weights (Llama's ``w * x_hat`` and Gemma's ``x_hat * (1 + w)``, both normalising in float32 also inside a
float64 model, Gemma's weight gradient taken in float32 as its backward does), and the Gram equals a loop of one
``autograd.grad`` per sample over every parameter, with padding and ``-100`` labels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pypattern.gram import default_sites, gram_parameters, per_sample_grad_gram

transformers = pytest.importorskip("transformers")

V = 29
SMALL = dict(
    vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16
)


def _model(arch: str, dtype=torch.float64) -> nn.Module:
    T = transformers
    torch.manual_seed(0)
    if arch == "llama_gqa":
        m = T.LlamaForCausalLM(T.LlamaConfig(**SMALL, intermediate_size=24, num_key_value_heads=2))
    elif arch == "qwen2_bias_tied":
        m = T.Qwen2ForCausalLM(
            T.Qwen2Config(**SMALL, intermediate_size=24, num_key_value_heads=1, tie_word_embeddings=True)
        )
    elif arch == "gemma":
        m = T.GemmaForCausalLM(
            T.GemmaConfig(**SMALL, intermediate_size=24, num_key_value_heads=1, head_dim=4)
        )
    elif arch == "mistral":
        m = T.MistralForCausalLM(T.MistralConfig(**SMALL, intermediate_size=24, num_key_value_heads=2))
    elif arch == "qwen3_qk_norm":
        m = T.Qwen3ForCausalLM(
            T.Qwen3Config(**SMALL, intermediate_size=24, num_key_value_heads=2, head_dim=4)
        )
    else:
        raise ValueError(arch)
    m = m.eval().to(dtype)
    with torch.no_grad():  # norm weights away from their initial ones and 0
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(0.3 * torch.randn_like(p))
    return m


def _batch(b: int = 4, t: int = 6) -> dict:
    """Right padding in rows 0 and 1 (labels -100 there), a -100 label inside row 2."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (b, t), generator=g)
    am = torch.ones(b, t, dtype=torch.long)
    am[0, t - 2 :] = 0
    if b > 1:
        am[1, t - 1 :] = 0
    labels = ids.clone()
    labels[am == 0] = -100
    if b > 2:
        labels[2, 2] = -100
    return {"input_ids": ids, "attention_mask": am, "labels": labels}


def _losses(model, batch):
    """Per-sample summed next-token cross-entropy (float64), -100 labels ignored: computed here."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    nll = F.cross_entropy(
        logits.flatten(0, 1).double(), batch["labels"][:, 1:].flatten(), reduction="none", ignore_index=-100
    )
    return nll.view(len(logits), -1).sum(1)


def _naive(model, batch):
    """Each sample alone (a batch of one), one autograd.grad over every trainable parameter, their Gram."""
    ps = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(len(batch["input_ids"])):
        gs = torch.autograd.grad(_losses(model, {k: v[i : i + 1] for k, v in batch.items()}).sum(), ps)
        rows.append(torch.cat([g.reshape(-1) for g in gs]).double())
    r = torch.stack(rows)
    return r @ r.T


def _rel(a, b):
    return float((a - b).norm() / b.norm())


ARCHS = ["llama_gqa", "qwen2_bias_tied", "gemma", "mistral", "qwen3_qk_norm"]


@pytest.mark.parametrize("arch", ARCHS)
def test_default_gram_of_a_raw_llama_family_model_equals_per_sample_autograd_in_float64(arch):
    model = _model(arch)
    batch = _batch()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(gram_parameters(model)) == trainable  # the norms' weights included
    norms = [st for st in default_sites(model) if st.kind == "rmsnorm"]
    assert norms and all(st.compute_dtype == torch.float32 for st in norms)
    assert all(st.weight_in_compute_dtype == (arch == "gemma") for st in norms)
    assert _rel(per_sample_grad_gram(model, _losses, batch), _naive(model, batch)) < 1e-10


@pytest.mark.parametrize("arch", ["llama_gqa", "gemma"])
def test_default_gram_of_a_raw_llama_family_model_equals_per_sample_autograd_in_float32(arch):
    model = _model(arch, torch.float32)
    batch = _batch()
    assert set(gram_parameters(model)) == {n for n, _ in model.named_parameters()}
    assert _rel(per_sample_grad_gram(model, _losses, batch), _naive(model, batch)) < 1e-4


def test_norm_sites_alone_frozen_rest_batch_of_one_and_per_module():
    """Only the norms trainable: the Gram is theirs alone (per module, summing to the whole); a batch of one; the
    norms frozen: the rest, equal to autograd over it."""
    model = _model("gemma")
    batch = _batch()
    for n, p in model.named_parameters():
        p.requires_grad_("norm" in n)
    per = per_sample_grad_gram(model, _losses, batch, per_module=True)
    assert set(per) == {n for n, m in model.named_modules() if type(m).__name__ == "GemmaRMSNorm"}
    naive = _naive(model, batch)
    assert _rel(sum(per.values()), naive) < 1e-10
    one = {k: v[:1] for k, v in batch.items()}
    assert _rel(per_sample_grad_gram(model, _losses, one), _naive(model, one)) < 1e-10
    for n, p in model.named_parameters():
        p.requires_grad_("norm" not in n)
    assert _rel(per_sample_grad_gram(model, _losses, batch), _naive(model, batch)) < 1e-10


class _T5StyleNorm(nn.Module):
    """An RMS norm taking its mean square in float32 but normalising the input in its own dtype (T5's order): no
    form the default sites know in a float64 model."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.variance_epsilon = 1e-6

    def forward(self, x):
        var = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.variance_epsilon))


class _Net(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.block = nn.Sequential(norm, nn.Linear(8, 8))
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.block(torch.tanh(self.inp(x)))))


def _net_losses(model, x, y):
    return F.cross_entropy(model(x), y, reduction="none")


def _net_naive(model, x, y):
    ps = [p for p in model.parameters() if p.requires_grad]
    rows = [
        torch.cat(
            [
                g.reshape(-1)
                for g in torch.autograd.grad(_net_losses(model, x[i : i + 1], y[i : i + 1]).sum(), ps)
            ]
        )
        for i in range(len(x))
    ]
    r = torch.stack(rows)
    return r @ r.T


def test_torch_rms_norm_is_covered_and_an_unknown_norm_form_is_refused_by_name():
    torch.manual_seed(0)
    x = torch.randn(5, 5, dtype=torch.float64) * 2
    y = torch.randint(0, 3, (5,))
    net = _Net(nn.RMSNorm(8, eps=1e-5)).double()
    with torch.no_grad():
        net.block[0].weight.add_(0.3 * torch.randn(8, dtype=torch.float64))
    assert "block.0.weight" in gram_parameters(net)
    assert _rel(per_sample_grad_gram(net, _net_losses, x, y), _net_naive(net, x, y)) < 1e-12
    net = _Net(_T5StyleNorm(8)).double()
    with pytest.raises(ValueError, match=r"leave out 1 trainable parameters \(\['block.0.weight'\]"):
        per_sample_grad_gram(net, _net_losses, x, y)
    with pytest.raises(ValueError, match=r"modules: 'block' .*\['block.0.weight'\]"):
        per_sample_grad_gram(net, _net_losses, x, y, modules=["block"])
    # frozen, the rest is covered
    net.block[0].weight.requires_grad_(False)
    assert _rel(per_sample_grad_gram(net, _net_losses, x, y), _net_naive(net, x, y)) < 1e-12


def test_half_precision_raw_model_is_refused_naming_a_parameter():
    model = _model("llama_gqa", torch.bfloat16)
    with pytest.raises(TypeError, match=r"dtype torch.bfloat16.*\.float\(\)"):
        per_sample_grad_gram(model, _losses, _batch())


def test_tied_cross_terms_of_long_sequences_stay_within_the_workspace(monkeypatch):
    """The cross terms of an embedding tied to the unembedding are sliced by rows too: with long sequences no
    temporary exceeds the workspace (one sample's positions for one row at least), and the Gram is unchanged (a
    raw tied Qwen2 with a workspace of one byte equals per-sample autograd)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import pypattern.gram as gram_mod

    B, T, d, V_ = 3, 64, 4, 11
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V_, (B, T), generator=g)
    dE = torch.randn(B, T, d, generator=g, dtype=torch.float64)
    x = torch.randn(B, T, d, generator=g, dtype=torch.float64)
    dU = torch.randn(B, T, V_, generator=g, dtype=torch.float64)
    st = gram_mod.GramSite(
        "e", "embedding", ("w",), ("e", "output"), ("e", "input"), tied=(("u", "output"), ("u", "input"))
    )
    cap = {("out", ("u", "output")): [(torch.zeros(B, T, V_), dU)], ("in", ("u", "input")): [(x, None)]}

    class Largest(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple | list) else (out,):
                if torch.is_tensor(t) and func is not torch.ops.aten.zeros.default:
                    self.numel = max(self.numel, t.numel())
            return out

    want = gram_mod._tied_terms(st, cap, B, ids, dE, "auto", None)
    # naively: the Gram of the summed per-sample gradients g_E_i + g_U_i less that of the lookup's alone, with
    # g_E_i[v] = sum_{t: ids_it = v} dE_it and g_U_j = dU_j^T x_j
    gE = torch.zeros(B, V_, d, dtype=torch.float64).index_put_(
        (torch.arange(B).repeat_interleave(T), ids.reshape(-1)), dE.reshape(-1, d), accumulate=True
    )
    gU = torch.einsum("bsv,bsd->bvd", dU, x)
    both, lookup = (gE + gU).reshape(B, -1), gE.reshape(B, -1)
    torch.testing.assert_close(want, both @ both.T - lookup @ lookup.T, rtol=1e-12, atol=1e-12)
    monkeypatch.setattr(gram_mod, "TIED_WORKSPACE_BYTES", 2 * 8 * T * 4)  # four rows of one sample
    with Largest() as mode:
        got = gram_mod._tied_terms(st, cap, B, ids, dE, "auto", None)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert mode.numel <= max(4 * T, B * B, B * T * V_)  # the captures' own size, never rows x B x S
    model = _model("qwen2_bias_tied")
    batch = _batch()
    monkeypatch.setattr(gram_mod, "TIED_WORKSPACE_BYTES", 1)
    assert _rel(per_sample_grad_gram(model, _losses, batch), _naive(model, batch)) < 1e-10
