"""The default losses and the covariance estimators on batches as users hold them, against independent answers.

Labels shifted by the user in a Hugging Face style mapping are refused (read as unshifted they would score each
position against the token after the next one), while unshifted labels with -100 prompts or padding, and the
pair form the message names, are read and give an independent next-token loss. On converted grouped-query and
parallel-residual models fed padded mappings (``-100`` labels on both sides of the real tokens, boolean masks):
each component's chain moves exactly that component's weights, ``chi`` equals ``-nβ Cov(φ, l_z - L̄)`` computed
here from the same draws with losses of our own, the BIF equals minus the covariance of the draws' probe losses,
and the per-sample gradient Gram equals a loop of one ``autograd.grad`` per sample."""

import numpy as np
import pytest
import torch

import pypattern as pp
import pypattern.susceptibility as S
from pypattern.gram import per_sample_grad_gram
from pypattern.losses import batch_loss, check_batch, sample_losses, token_losses

transformers = pytest.importorskip("transformers")

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::pypattern.sampling.diagnostics.StepBiasWarning"),
    pytest.mark.filterwarnings("ignore::pypattern.sampling.diagnostics.NonStationaryWarning"),
]

V = 40


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        intermediate_size=48,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def _neox():
    torch.manual_seed(1)
    cfg = transformers.GPTNeoXConfig(
        vocab_size=V,
        hidden_size=32,
        num_attention_heads=4,
        num_hidden_layers=2,
        intermediate_size=48,
        max_position_embeddings=64,
        use_parallel_residual=True,
    )
    return transformers.GPTNeoXForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def llama():
    return _llama()


def _padded(seed, b=3, t=7, mask_dtype=torch.bool):
    """Right padding in rows 0 and 1, -100 labels at the padding, inside row 0 and at the start of the last row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (b, t), generator=g)
    am = torch.ones(b, t, dtype=torch.long)
    am[0, t - 2 :] = 0
    am[1, t - 1 :] = 0
    labels = ids.clone()
    labels[am == 0] = -100
    labels[0, 2] = -100
    labels[b - 1, 1] = -100
    return {"input_ids": ids, "attention_mask": am.to(mask_dtype), "labels": labels}


def _my_token_losses(logits, batch):
    """Next-token losses (float64) and the counted mask, computed here: label t + 1 not -100, both tokens real."""
    lab, am = batch["labels"], batch["attention_mask"].bool()
    counted = (lab[:, 1:] != -100) & am[:, 1:] & am[:, :-1]
    lp = torch.log_softmax(logits[:, :-1].double(), -1)
    nll = -lp.gather(-1, lab[:, 1:].clamp(min=0)[..., None])[..., 0]
    return torch.where(counted, nll, torch.zeros_like(nll)), counted


# ----- labels shifted by the user --------------------------------------------------------------------------


def _preshifted(ids):
    return torch.cat([ids[:, 1:], torch.full((ids.shape[0], 1), -100)], 1)


def test_labels_shifted_by_the_user_are_refused_by_every_default_loss_and_estimator(llama):
    ids = torch.randint(0, V, (3, 8), generator=torch.Generator().manual_seed(4))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": _preshifted(ids)}
    for f in (batch_loss, sample_losses, lambda m, b: token_losses(m, b)):
        with pytest.raises(ValueError, match=r"input_ids shifted left by one .* labels are unshifted"):
            f(llama, batch)
    with pytest.raises(ValueError, match=r"^probe: batch\['labels'\] equals input_ids shifted left"):
        check_batch(llama, batch, "probe")
    kw = dict(num_chains=1, num_draws=2, num_burnin_steps=0, step_size=1e-5, localization=10.0, quiet=True)
    with pytest.raises(ValueError, match="shifted left by one"):
        pp.bif(llama, [batch], batch, **kw)
    # a prompt labelled -100 and the answer shifted: refused as well
    prompt = batch["labels"].clone()
    prompt[:, :3] = -100
    with pytest.raises(ValueError, match="shifted left by one"):
        batch_loss(llama, {**batch, "labels": prompt})


@torch.no_grad()
def test_unshifted_labels_and_the_named_pair_form_are_read_and_match_an_independent_loss(llama):
    b = _padded(5, b=3, t=8)
    with torch.no_grad():
        logits = llama(input_ids=b["input_ids"], attention_mask=b["attention_mask"].long()).logits
    nll, counted = _my_token_losses(logits, b)
    want = float(nll.sum() / counted.sum())
    assert float(batch_loss(llama, b)) == pytest.approx(want, rel=1e-5)
    check_batch(llama, b, "batch")
    # a sequence of one repeated token: its labels equal both the ids and the ids shifted, and are read as they are
    rep = torch.full((2, 6), 7)
    assert float(batch_loss(llama, {"input_ids": rep, "labels": rep.clone()})) == pytest.approx(
        float(batch_loss(llama, rep)), rel=1e-6
    )
    # the pair the refusal names, (input_ids[:, :-1], labels[:, :-1]), scores the next token
    ids = torch.randint(0, V, (3, 8), generator=torch.Generator().manual_seed(6))
    y = _preshifted(ids)
    pair = batch_loss(llama, (ids[:, :-1], y[:, :-1]))
    assert float(pair) == pytest.approx(float(batch_loss(llama, ids)), rel=1e-5)
    # one label differing from its id (a single coincidence) is not enough to refuse
    one = ids.clone()
    one[0, 3] = ids[0, 4] if ids[0, 4] != ids[0, 3] else (ids[0, 3] + 1) % V
    batch_loss(llama, {"input_ids": ids, "labels": one})


# ----- estimators on converted models, against the same draws ------------------------------------------------


def _recording(records, extra_observable):
    """A stand-in for the sampler susceptibilities/bif call that also records ``extra_observable`` and the
    parameters that moved from w*, per draw."""
    orig = S.sample

    def wrapped(model, loader, **kw):
        w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
        run = {"draws": [], "moved": {n: torch.zeros_like(p, dtype=torch.bool) for n, p in w0.items()}}
        records.append(run)

        def me(m, batch):
            for n, p in m.named_parameters():
                run["moved"][n] |= p.detach() != w0[n]
            return extra_observable(m).reshape(-1)

        kw["observables"] = {**dict(kw["observables"]), "_me": me}
        kw["callbacks"] = [
            *kw["callbacks"],
            lambda chain, observables: run["draws"].append(observables["_me"]),
        ]
        return orig(model, loader, **kw)

    return wrapped


RUN = dict(
    num_chains=2, num_draws=8, num_burnin_steps=3, step_size=1e-4, localization=100.0, seed=3, quiet=True
)


@pytest.mark.parametrize("arch", ["llama", "neox"])
@pytest.mark.parametrize("per_token", [True, False])
def test_component_chi_on_converted_models_equals_the_covariance_of_the_same_draws(
    monkeypatch, arch, per_token
):
    hf = _llama() if arch == "llama" else _neox()
    model = pp.from_hf(hf)
    loader = [_padded(s, mask_dtype=torch.bool if s % 2 else torch.float32) for s in range(3)]
    probe = _padded(9, b=3, t=6, mask_dtype=torch.int32)
    comps = ["blocks.0.attn.head.1", "blocks.1.mlp", "embed"]
    comps += ["blocks.1.attn.kv_head.0"] if arch == "llama" else []

    def mine(m):  # probe token losses and phi (the sampling batch's mean next-token loss), computed here
        tl, _ = _my_token_losses(m(probe["input_ids"]), probe)
        sl, sc = _my_token_losses(m(loader[0]["input_ids"]), loader[0])
        return torch.cat([tl.reshape(-1), (sl.sum() / sc.sum()).reshape(1)])

    records = []
    monkeypatch.setattr(S, "sample", _recording(records, mine))
    res = pp.susceptibilities(
        model, loader, probe, comps, sampling_batch=loader[0], per_token=per_token, batched=False,
        group_size=1, **RUN,
    )  # fmt: skip
    assert len(records) == len(comps)
    _, counted = _my_token_losses(model(probe["input_ids"]), probe)
    counted = counted.numpy()
    for i, (comp, run) in enumerate(zip(comps, records)):
        masks = model.component_masks(comp)
        for n, moved in run["moved"].items():
            want = masks[n] if n in masks else torch.zeros_like(moved)
            assert torch.equal(moved, want), (comp, n)  # exactly the component's weights move
        x = torch.stack(run["draws"]).numpy()
        assert x.shape[0] == RUN["num_chains"] * RUN["num_draws"]
        phi, tok = x[:, -1], x[:, :-1].reshape(len(x), *counted.shape)
        if per_token:
            cols, keep = tok.reshape(len(x), -1), counted.reshape(-1)
        else:
            cols, keep = tok.sum(-1) / counted.sum(-1), np.ones(counted.shape[0], bool)
        lbar = cols[:, keep].mean(1)
        chi = np.array(
            [
                -res.nbeta * np.cov(phi, cols[:, j] - lbar)[0, 1] if keep[j] else 0.0
                for j in range(cols.shape[1])
            ]
        )
        assert np.abs(chi).max() > 0
        np.testing.assert_allclose(res.chi[i], chi, rtol=0, atol=1e-4 * np.abs(chi).max())


def test_bif_of_a_padded_probe_equals_minus_the_covariance_of_the_same_draws(monkeypatch, llama):
    model = pp.from_hf(llama)
    loader = [_padded(s) for s in range(2)]
    probe = _padded(7, b=2, t=6)
    records = []
    monkeypatch.setattr(
        S, "sample", _recording(records, lambda m: _my_token_losses(m(probe["input_ids"]), probe)[0])
    )
    res = pp.bif(model, loader, probe, **RUN)
    x = torch.stack(records[0]["draws"]).numpy()
    want = -np.cov(x.T)
    np.testing.assert_allclose(res.bif, want, rtol=0, atol=1e-4 * np.abs(want).max())
    # padding and -100 entries: constant losses, no covariance
    _, counted = _my_token_losses(model(probe["input_ids"]), probe)
    off = ~counted.reshape(-1).numpy()
    assert off.any() and np.all(res.bif[off] == 0)


@pytest.mark.parametrize("arch", ["llama", "neox"])
def test_gram_of_padded_mappings_on_converted_models_equals_per_sample_autograd(arch):
    model = pp.from_hf(_llama() if arch == "llama" else _neox()).double()
    b = _padded(11, b=4, t=7, mask_dtype=torch.float32)
    for lf in (sample_losses, lambda m, x: token_losses(m, x, fill=0.0)[0]):
        got = per_sample_grad_gram(model, lf, b)
        params = [p for p in model.parameters() if p.requires_grad]
        logits = model(b["input_ids"])
        nll, counted = _my_token_losses(logits, b)
        per = nll.sum(-1) / counted.sum(-1) if lf is sample_losses else nll.sum(-1)
        rows = []
        for i in range(per.shape[0]):
            gs = torch.autograd.grad(per[i], params, retain_graph=True, allow_unused=True)
            rows.append(
                torch.cat(
                    [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(gs, params)]
                )
            )
        grads = torch.stack(rows)
        torch.testing.assert_close(got, grads @ grads.T, rtol=1e-10, atol=1e-12)


def test_gram_over_container_modules_of_an_unconverted_model_equals_per_sample_autograd(llama):
    """``modules=`` naming an attention or MLP of a Hugging Face model covers the nn.Linear weights inside it; a
    block covers its RMSNorm weights too, and so do the norms named alone."""
    b = _padded(12, b=3, t=6)
    for mods in (
        ["model.layers.0.mlp"],
        ["model.layers.1.self_attn", "model.layers.1.self_attn.q_proj"],
        ["model.layers.0"],
        ["model.norm", "model.layers.1.post_attention_layernorm"],
    ):
        names = list(pp.gram.gram_parameters(llama, modules=mods))
        prefixes = [m + "." for m in mods]
        want_names = [n for n, _ in llama.named_parameters() if any(n.startswith(p) for p in prefixes)]
        assert sorted(names) == sorted(want_names)
        got = per_sample_grad_gram(llama, sample_losses, b, modules=mods)
        params = [dict(llama.named_parameters())[n] for n in want_names]
        logits = llama(input_ids=b["input_ids"], attention_mask=b["attention_mask"].long()).logits
        nll, counted = _my_token_losses(logits, b)
        per = nll.sum(-1) / counted.sum(-1)
        rows = [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(per[i], params, retain_graph=True)])
            for i in range(3)
        ]
        grads = torch.stack(rows).double()
        torch.testing.assert_close(got, grads @ grads.T, rtol=2e-5, atol=1e-7)
