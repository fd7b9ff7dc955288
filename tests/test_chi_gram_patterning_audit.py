"""Susceptibilities, the BIF, the per-sample gradient Gram and patterning on unconverted Hugging Face models with
batches as users hold them, against computations written here:

* ``chi`` equals ``-nβ Cov(φ, l_z - L̄)`` and the BIF equals ``-Cov(l_i, l_j)``, both from the same draws with
  next-token losses computed here (OPT with component given by module-name prefixes, Gemma by head and MLP names);
* a model whose forward returns a tuple gives the same chi, BIF and Gram as the same model returning a
  ``ModelOutput``;
* the Gram restricted to one use of an embedding tied to the unembedding (``modules=["model.embed_tokens"]`` or
  ``["lm_head"]``) equals the Gram of per-sample autograd gradients of the tied weight, which has both uses;
* component names that are not in the model are refused by name;
* ``invert(method="pinv")`` is the minimum-norm least-squares solution over sum-zero perturbations.
"""

import warnings

import numpy as np
import pytest
import torch

import pypattern as pp
import pypattern.susceptibility as S
from pypattern.losses import sample_losses

tr = pytest.importorskip("transformers")

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::pypattern.sampling.diagnostics.StepBiasWarning"),
    pytest.mark.filterwarnings("ignore::pypattern.sampling.diagnostics.NonStationaryWarning"),
]

V = 31
RUN = dict(
    num_chains=2, num_draws=5, num_burnin_steps=1, step_size=1e-4, localization=100.0, seed=3, quiet=True
)


def _build(arch):
    common = dict(vocab_size=V, max_position_embeddings=32, num_hidden_layers=2)
    cfg = {
        "opt": lambda: tr.OPTConfig(**common, hidden_size=24, ffn_dim=20, num_attention_heads=4,
                                    word_embed_proj_dim=24, dropout=0.0, pad_token_id=1),
        "gemma": lambda: tr.GemmaConfig(**common, intermediate_size=20, hidden_size=20, num_attention_heads=3,
                                        num_key_value_heads=1, head_dim=6),
        "qwen2": lambda: tr.Qwen2Config(**common, intermediate_size=20, hidden_size=24, num_attention_heads=4,
                                        num_key_value_heads=2, tie_word_embeddings=True),
    }[arch]()  # fmt: skip
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = tr.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").double().eval()
    with torch.no_grad():  # biases and norms start at zero / one: make every parameter matter
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def _padded(seed, b=3, t=6, k=2, pad=1, prompt=1):
    """Right padding of ``k`` tokens, labels -100 at the padding and at each row's first ``prompt`` tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.randint(4, V, (b, t), generator=g), torch.full((b, k), pad)], 1)
    am = torch.cat([torch.ones(b, t), torch.zeros(b, k)], 1).long()
    labels = torch.where(am.bool(), ids, -100)
    labels[:, :prompt] = -100
    return {"input_ids": ids, "attention_mask": am, "labels": labels}


def _my_token_losses(logits, batch):
    """Next-token losses (float64, 0 where not counted) and the counted mask, computed here."""
    lab, am = batch["labels"], batch["attention_mask"].bool()
    counted = (lab[:, 1:] != -100) & am[:, 1:] & am[:, :-1]
    lp = torch.log_softmax(logits[:, :-1].double(), -1)
    nll = -lp.gather(-1, lab[:, 1:].clamp(min=0)[..., None])[..., 0]
    return torch.where(counted, nll, torch.zeros_like(nll)), counted


def _logits(m, b):
    return m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


def _recording(records, extra):
    """The sampler susceptibilities/bif call, also recording ``extra(model)`` at every draw."""
    orig = S.sample

    def wrapped(model, loader, **kw):
        run = {"draws": []}
        records.append(run)
        kw["observables"] = {**dict(kw["observables"]), "_me": lambda m, b: extra(m).reshape(-1)}
        kw["callbacks"] = [
            *kw["callbacks"],
            lambda chain, observables: run["draws"].append(observables["_me"]),
        ]
        return orig(model, loader, **kw)

    return wrapped


@pytest.mark.parametrize("arch", ["opt", "gemma"])
def test_chi_and_bif_of_unconverted_models_equal_the_covariances_of_the_same_draws(monkeypatch, arch):
    m = _build(arch)
    loader = [_padded(s) for s in range(2)]
    probe = _padded(9)
    comps = (
        {"attn": "model.decoder.layers.0.self_attn", "fc1": "model.decoder.layers.1.fc1",
         "pos": "model.decoder.embed_positions"}
        if arch == "opt"
        else {"head": "blocks.0.attn.head.1", "mlp": "blocks.1.mlp", "emb": "embed"}
    )  # fmt: skip

    def mine(mm):  # probe token losses and phi (the sampling batch's mean next-token loss), computed here
        tl, _ = _my_token_losses(_logits(mm, probe), probe)
        sl, sc = _my_token_losses(_logits(mm, loader[0]), loader[0])
        return torch.cat([tl.reshape(-1), (sl.sum() / sc.sum()).reshape(1)])

    records = []
    monkeypatch.setattr(S, "sample", _recording(records, mine))
    res = pp.susceptibilities(
        m, loader, probe, comps, sampling_batch=loader[0], batched=False, group_size=1, **RUN
    )
    with torch.no_grad():
        keep = _my_token_losses(_logits(m, probe), probe)[1].reshape(-1).numpy()
    assert len(records) == len(comps) and np.array_equal(res.probe_counted, keep)
    for i, run in enumerate(records):
        x = torch.stack(run["draws"]).numpy()
        assert x.shape[0] == RUN["num_chains"] * RUN["num_draws"]
        phi, cols = x[:, -1], x[:, :-1]
        lbar = cols[:, keep].mean(1)
        want = np.array(
            [-res.nbeta * np.cov(phi, cols[:, j] - lbar)[0, 1] if keep[j] else 0.0 for j in range(len(keep))]
        )
        assert np.abs(want).max() > 0
        np.testing.assert_allclose(res.chi[i], want, rtol=0, atol=1e-9 * np.abs(want).max())
    records.clear()
    got = pp.bif(m, loader, probe, **RUN).bif
    x = torch.stack(records[0]["draws"]).numpy()[:, :-1]
    want = -np.cov(x.T)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9 * np.abs(want).max())
    assert np.all(got[~keep] == 0) and np.all(got[:, ~keep] == 0)


class _TupleLM(torch.nn.Module):
    """A language model whose forward returns a tuple ``(logits, ...)`` (Hugging Face's ``return_dict=False``)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).to_tuple()


def test_a_model_returning_a_tuple_gives_the_estimates_of_the_model_returning_a_model_output():
    m = _build("qwen2")
    wrapped = _TupleLM(m)
    loader = [_padded(s) for s in range(2)]
    probe = _padded(9)
    assert isinstance(wrapped(probe["input_ids"]), tuple)
    a = pp.susceptibilities(m, loader, probe, ["model.layers.0.mlp"], **RUN).chi
    b = pp.susceptibilities(wrapped, loader, probe, ["inner.model.layers.0.mlp"], **RUN).chi
    assert np.abs(a).max() > 0
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(
        pp.bif(m, loader, probe, **RUN).bif, pp.bif(wrapped, loader, probe, **RUN).bif
    )
    ga = pp.per_sample_grad_gram(m, sample_losses, probe, modules=["model.layers.0.mlp"])
    gb = pp.per_sample_grad_gram(wrapped, sample_losses, probe, modules=["inner.model.layers.0.mlp"])
    torch.testing.assert_close(ga, gb, rtol=0, atol=0)


@pytest.mark.parametrize("arch, mods", [
    ("qwen2", ["model.embed_tokens"]), ("qwen2", ["lm_head"]), ("qwen2", ["lm_head", "model.layers.1.mlp"]),
    ("opt", ["model.decoder.embed_tokens"]), ("gemma", ["lm_head"]),
])  # fmt: skip
@pytest.mark.parametrize("check", [True, False])
def test_gram_over_one_use_of_a_tied_embedding_equals_per_sample_autograd_of_the_tied_weight(
    arch, mods, check
):
    m = _build(arch)
    emb = m.get_input_embeddings()
    assert m.get_output_embeddings().weight is emb.weight  # tied
    b = _padded(5, b=4)
    names = list(pp.gram.gram_parameters(m, modules=mods))
    params = dict(m.named_parameters())
    want_names = [n for n, p in params.items() if p is emb.weight]
    want_names += [n for n in params if any(n.startswith(x + ".") for x in mods) and n not in want_names]
    assert sorted(names) == sorted(want_names)
    nll, counted = _my_token_losses(_logits(m, b), b)
    per = nll.sum(-1) / counted.sum(-1)  # the default per-sample loss: the mean over the counted tokens
    ps = [params[n] for n in names]
    rows = [
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(per[i], ps, retain_graph=True)])
        for i in range(4)
    ]
    grads = torch.stack(rows)
    got = pp.per_sample_grad_gram(m, sample_losses, b, modules=mods, check=check)
    torch.testing.assert_close(got, grads @ grads.T, rtol=1e-10, atol=1e-12)


def test_component_names_not_in_an_unconverted_model_are_refused_by_name():
    m = _build("qwen2")
    loader, probe = [_padded(0)], _padded(1)
    for comp, match in [
        ("model.layers.7.mlp", r"'model.layers.7.mlp' matches no parameter"),
        ("model.layers.0.ml", r"'model.layers.0.ml' matches no parameter"),
        ("blocks.5.mlp", r"layer 5 is out of range; the model has 2 layers"),
    ]:
        with pytest.raises(ValueError, match=match):
            pp.susceptibilities(m, loader, probe, [comp], **RUN)
    for comps in ([], {}):
        with pytest.raises(ValueError, match="components is empty"):
            pp.susceptibilities(m, loader, probe, comps, **RUN)
    with pytest.raises(ValueError, match="list of parameter names is empty"):
        pp.susceptibilities(m, loader, probe, [[]], **RUN)


@pytest.mark.parametrize("k, n", [(3, 8), (6, 4)])
def test_pinv_inversion_is_the_minimum_norm_least_squares_solution_over_sum_zero_perturbations(k, n):
    rng = np.random.default_rng(k * n)
    chi, target = rng.normal(size=(k, n)), rng.normal(size=k)
    iv = pp.invert(chi, target, method="pinv")
    basis = np.linalg.svd(np.eye(n) - 1.0 / n)[0][:, : n - 1]  # an orthonormal basis of sum-zero vectors
    z = np.linalg.lstsq(chi @ basis, target, rcond=None)[0]
    h = basis @ z
    np.testing.assert_allclose(iv.h, h, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(iv.weights, 1 + n * h, rtol=1e-9)
    np.testing.assert_allclose(iv.predicted, chi @ h, rtol=1e-9, atol=1e-12)
