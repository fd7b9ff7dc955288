"""The README's sections run as a user would on their own models: Hugging Face families built from configs with
random weights (GPT-2, Llama with grouped-query attention, GPT-NeoX with partial rotary, Qwen2, Mistral with a
sliding window, Phi, Gemma), float32 and float64, a model trained briefly on the library's tasks, the user's own
metrics and losses, dict batches with padding, saved results and the command line on a saved model directory.

Each check compares against an independent computation (a masked loss written out, one forward per patched cell,
closed-form CKA and Procrustes, the inversion's defining equation) or a second documented route to the same number.
"""

import json
import warnings

import numpy as np
import pytest
import torch

import pypattern as pp
from pypattern import circuits

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)


def _padded_dicts(n, vocab, seed, lengths=(10, 7, 10, 5)):
    """Right-padded Hugging Face dict batches (pad id 0, labels -100 at padding)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, vocab, (len(lengths), max(lengths)), generator=g)
        am = torch.zeros_like(ids)
        for i, L in enumerate(lengths):
            am[i, :L] = 1
        ids = ids * am
        out.append({"input_ids": ids, "attention_mask": am, "labels": ids.masked_fill(am == 0, -100)})
    return out


def _masked_next_token_loss(logits, batch):
    """Mean next-token cross-entropy over targets that are real and predicted from a real token."""
    ids, am = batch["input_ids"], batch["attention_mask"]
    lp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    keep = (am[:, 1:] * am[:, :-1]).bool()
    return -(lp[keep]).mean()


# ----------------------------------------------------------------------------------------------- sampling, LLC


def test_llc_on_padded_dict_batches_reads_the_masked_loss_unconverted_and_converted():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=50, n_embd=24, n_layer=2, n_head=3, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    hf = transformers.GPT2LMHeadModel(cfg).eval().double()
    conv = pp.from_hf(hf)
    batches = _padded_dicts(3, 50, seed=1)
    kw = dict(num_chains=2, num_draws=3, num_burnin_steps=0, step_size=1e-5, localization=100.0, quiet=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r_hf = pp.estimate_llc(hf, batches, **kw)
        r_cv = pp.estimate_llc(conv, batches, **kw)
    with torch.no_grad():
        expected = np.mean([_masked_next_token_loss(hf(b["input_ids"]).logits, b).item() for b in batches])
    assert r_hf.init_loss == pytest.approx(expected, rel=1e-12)
    assert r_cv.init_loss == pytest.approx(expected, rel=1e-12)
    # llc_per_chain is nbeta * (mean trace - init_loss), and llc_se is the spread over chains (whole epoch read)
    np.testing.assert_allclose(
        r_hf.llc_per_chain, r_hf.nbeta * (r_hf.loss_trace.mean(1) - r_hf.init_loss), rtol=1e-10
    )
    assert r_hf.llc_se == pytest.approx(r_hf.llc_std / np.sqrt(2), rel=1e-10)


def test_llc_float32_and_float64_of_a_trained_model_agree():
    task = pp.InductionTask(d_vocab=12, seq_len=9)
    m32 = pp.Transformer(task.model_config(d_model=16, n_heads=2, seed=3))
    pp.tasks.train(m32, task, steps=20, seed=0, log_every=0, quiet=True)
    m64 = pp.Transformer(task.model_config(d_model=16, n_heads=2, seed=3))
    m64.load_state_dict(m32.state_dict())
    m64 = m64.double()
    data = [task.sample(16, seed=s).tokens for s in range(3)]
    kw = dict(num_chains=2, num_draws=8, num_burnin_steps=4, step_size=1e-3, localization=50.0, quiet=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = pp.estimate_llc(m32, data, **kw), pp.estimate_llc(m64, data, **kw)
    np.testing.assert_allclose(a.llc_per_chain, b.llc_per_chain, rtol=1e-4, atol=1e-5)
    assert a.init_loss == pytest.approx(b.init_loss, rel=1e-6)


def test_own_loss_twice_as_large_at_half_nbeta_is_the_same_posterior():
    """A user's loss function drives the chains: 2 L at nbeta / 2 has the same drift and the same LLC."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=30,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    llama = pp.from_hf(transformers.LlamaForCausalLM(cfg).eval().double())
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 30, (4, 8), generator=g) for _ in range(3)]

    def loss(model, batch):
        lg = model(batch)
        return torch.nn.functional.cross_entropy(lg[:, :-1].reshape(-1, 30), batch[:, 1:].reshape(-1))

    def double_loss(model, batch):
        return 2 * loss(model, batch)

    kw = dict(num_chains=2, num_draws=5, num_burnin_steps=2, step_size=1e-3, localization=10.0, quiet=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = pp.estimate_llc(llama, data, loss_fn=loss, nbeta=6.0, **kw)
        b = pp.estimate_llc(llama, data, loss_fn=double_loss, nbeta=3.0, **kw)
        c = pp.estimate_llc(llama, data, nbeta=6.0, **kw)  # the default loss is the same function
        # a component by mask and by parameter-name prefix: the same run
        m1 = pp.estimate_llc(llama, data, masks=pp.component_masks(llama, "blocks.1.mlp"), nbeta=6.0, **kw)
        m2 = pp.estimate_llc(llama, data, restrict_to="blocks.1.mlp", nbeta=6.0, **kw)
    np.testing.assert_allclose(a.llc_per_chain, b.llc_per_chain, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(a.llc_per_chain, c.llc_per_chain, rtol=1e-9, atol=1e-12)
    assert b.init_loss == pytest.approx(2 * a.init_loss, rel=1e-12)
    np.testing.assert_array_equal(m1.loss_trace, m2.loss_trace)


def test_samplers_sequential_threads_and_default_agree_on_padded_gemma():
    torch.manual_seed(0)
    cfg = transformers.GemmaConfig(
        vocab_size=30,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=16,
    )
    hf = transformers.GemmaForCausalLM(cfg).eval().double()
    data = _padded_dicts(2, 30, seed=0, lengths=(8, 5, 8, 8))
    for sampler, okw in [("sgld", None), ("sgnht", {"diffusion_factor": 0.01})]:
        kw = dict(
            num_chains=2,
            num_draws=3,
            num_burnin_steps=1,
            step_size=1e-4,
            localization=10.0,
            quiet=True,
            sampler=sampler,
            optimizer_kwargs=okw,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a = pp.estimate_llc(hf, data, **kw)
            b = pp.estimate_llc(hf, data, batched=False, cores=2, **kw)
        np.testing.assert_array_equal(a.loss_trace, b.loss_trace)


# ----------------------------------------------------------------------------------- susceptibilities and BIF


def test_susceptibilities_and_bif_leave_probe_padding_out_and_pca_matches_svd(tmp_path):
    torch.manual_seed(0)
    hf = (
        transformers.PhiForCausalLM(transformers.PhiConfig(**SMALL, partial_rotary_factor=0.5))
        .eval()
        .double()
    )
    m = pp.from_hf(hf)
    train = [{k: v for k, v in b.items() if k != "labels"} for b in _padded_dicts(2, 40, seed=3)]
    probe = _padded_dicts(1, 40, seed=4)[0]
    n_real = int((probe["attention_mask"][:, 1:] * probe["attention_mask"][:, :-1]).sum())
    kw = dict(num_chains=2, num_draws=4, num_burnin_steps=1, step_size=1e-4, localization=10.0, quiet=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        chi = pp.susceptibilities(
            m, train, probe, ["blocks.0.mlp", "blocks.1.mlp", "blocks.1.attn.head.0"], **kw
        )
        b = pp.bif(m, train, probe, **kw)
    counted = np.asarray(chi.probe_counted)
    assert counted.sum() == n_real and np.asarray(b.probe_counted).sum() == n_real
    p = chi.pca()
    x = chi.chi.T[counted]
    s = np.linalg.svd(x - x.mean(0), compute_uv=False)
    np.testing.assert_allclose(p.explained_variance_ratio, s**2 / (s**2).sum(), rtol=1e-8)
    chi.save(tmp_path / "chi.npz")
    np.testing.assert_array_equal(type(chi).load(tmp_path / "chi.npz").chi, chi.chi)


# ------------------------------------------------------------------------------------------------- patterning


def test_invert_reaches_the_target_and_reweight_draws_by_weight():
    rng = np.random.default_rng(0)
    chi = rng.normal(size=(3, 6))
    target = np.array([0.1, -0.2, 0.05])
    for method in ["pinv", "constrained"]:
        plan = pp.invert(chi, target=target, method=method)
        w = np.asarray(plan.weights)
        assert w.mean() == pytest.approx(1.0, abs=1e-12)
        np.testing.assert_allclose(chi @ (w - 1) / len(w), target, atol=1e-9)  # h = (w - 1) / N
    data = torch.utils.data.TensorDataset(torch.arange(4.0)[:, None])
    dl = pp.reweight(
        data,
        torch.tensor([1.0, 0.0, 3.0, 0.0]),
        batch_size=4000,
        num_samples=4000,
        generator=torch.Generator().manual_seed(0),
    )
    counts = torch.bincount(torch.cat([b[0] for b in dl]).flatten().long(), minlength=4).double() / 4000
    assert counts[1] == 0 and counts[3] == 0
    assert counts[2].item() == pytest.approx(0.75, abs=0.03)


# ------------------------------------------------------------------------------------------------------ patching


@pytest.mark.parametrize(
    "family",
    [
        lambda: transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**SMALL, rotary_pct=0.5)),
        lambda: transformers.MistralForCausalLM(
            transformers.MistralConfig(**SMALL, num_key_value_heads=1, sliding_window=4)
        ),
    ],
    ids=["neox-partial-rotary", "mistral-sliding-window"],
)
def test_exact_patching_unconverted_converted_and_one_forward_per_cell_agree(family):
    torch.manual_seed(0)
    hf = family().eval().double()
    cv = pp.from_hf(hf)
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 40, (3, 8), generator=g)
    corr = clean.clone()
    corr[:, 2] = (corr[:, 2] + 7) % 40
    ans = torch.randint(0, 40, (3,), generator=g)
    metric = pp.LogitDiff(ans, (ans + 1) % 40)
    gh = pp.activation_patching(hf, "resid_pre", clean, corr, metric=metric, quiet=True)
    gc = pp.activation_patching(cv, "resid_pre", clean, corr, metric=metric, quiet=True)
    _, cache = cv.run_with_cache(clean)
    naive = torch.zeros(2, 8, dtype=torch.float64)
    for layer in range(2):
        name = f"blocks.{layer}.hook_resid_pre"
        for pos in range(8):

            def hook(x, hook=None, name=name, pos=pos):
                x = x.clone()
                x[:, pos] = cache[name][:, pos]
                return x

            logits = cv.run_with_hooks(corr, fwd_hooks=[(name, hook)])[:, -1]
            naive[layer, pos] = (
                logits[torch.arange(3), ans] - logits[torch.arange(3), (ans + 1) % 40]
            ).mean()
    torch.testing.assert_close(gh.mean(normalized=False), gc.mean(normalized=False), rtol=0, atol=1e-12)
    torch.testing.assert_close(gc.mean(normalized=False), naive, rtol=0, atol=1e-12)


def test_right_padded_prompts_read_at_last_real_token_equal_each_prompt_alone():
    torch.manual_seed(0)
    hf = (
        transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SMALL, num_key_value_heads=2))
        .eval()
        .double()
    )
    g = torch.Generator().manual_seed(0)
    lengths = [9, 6, 9, 4]
    ids = torch.randint(1, 40, (4, 9), generator=g)
    am = (torch.arange(9)[None] < torch.tensor(lengths)[:, None]).long()
    ids = ids * am
    corr = ids.clone()
    corr[:, 1] = (corr[:, 1] + 5) % 40
    corr = corr * am
    ans = torch.randint(0, 40, (4,), generator=g)
    wrong = (ans + 2) % 40
    grid = pp.activation_patching(
        hf, "z", ids, corr, metric=pp.LogitDiff(ans, wrong, position=am.sum(1) - 1), quiet=True
    )
    effect = grid.mean(normalized=False)  # (layer, head, pos)
    alone = torch.zeros(2, 4, 4, dtype=torch.float64)
    for i, L in enumerate(lengths):
        one = pp.activation_patching(
            hf,
            "z",
            ids[i : i + 1, :L],
            corr[i : i + 1, :L],
            metric=pp.LogitDiff(ans[i : i + 1], wrong[i : i + 1]),
            quiet=True,
        )
        alone += one.mean(normalized=False)[..., :4] / 4
    torch.testing.assert_close(effect[..., :4], alone, rtol=0, atol=1e-12)


def test_attribution_patching_matches_exact_for_a_small_noise_with_own_metric():
    torch.manual_seed(0)
    hf = (
        transformers.LlamaForCausalLM(
            transformers.LlamaConfig(**SMALL, num_key_value_heads=2, max_position_embeddings=32)
        )
        .eval()
        .double()
    )
    m = pp.from_hf(hf)
    clean = torch.randint(0, 40, (4, 8))

    def own_metric(logits):  # (..., batch, vocab) -> (..., batch)
        lp = logits.log_softmax(-1)
        return lp[..., 3] - lp[..., 5]

    noise = pp.GaussianNoise(std=1e-4, seed=1)
    for site in ["resid_pre", "z", "v"]:
        exact = pp.activation_patching(m, site, clean, metric=own_metric, corruption=noise, quiet=True)
        atp = pp.attribution_patching(m, clean, metric=own_metric, corruption=noise, sites=[site])[site]
        scale = exact.effect.abs().max()
        assert ((atp.effect - exact.effect).abs().max() / scale).item() < 5e-3, site


# ------------------------------------------------------------------------------------ representation similarity


def _hsic_unbiased(k, l_):
    n = k.shape[0]
    k, l_ = k.clone(), l_.clone()
    k.fill_diagonal_(0)
    l_.fill_diagonal_(0)
    return (
        (k * l_).sum() + k.sum() * l_.sum() / ((n - 1) * (n - 2)) - 2 * (k.sum(0) @ l_.sum(0)) / (n - 2)
    ) / (n * (n - 3))


def test_cka_procrustes_and_minibatch_cka_against_closed_forms():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 10, generator=g, dtype=torch.float64)
    y = x @ torch.randn(10, 7, generator=g, dtype=torch.float64) + 0.5 * torch.randn(
        60, 7, generator=g, dtype=torch.float64
    )
    k, l_ = x @ x.T, y @ y.T
    unb = _hsic_unbiased(k, l_) / (_hsic_unbiased(k, k) * _hsic_unbiased(l_, l_)).sqrt()
    assert pp.linear_cka(x, y) == pytest.approx(unb.item(), rel=1e-10)
    assert pp.linear_cka(x.float(), y.float()) == pytest.approx(unb.item(), rel=1e-5)
    xc, yc = x - x.mean(0), y - y.mean(0)
    biased = (xc.T @ yc).norm() ** 2 / ((xc.T @ xc).norm() * (yc.T @ yc).norm())
    assert pp.linear_cka(x, y, debiased=False) == pytest.approx(biased.item(), rel=1e-10)
    xn, yn = xc / xc.norm(), yc / yc.norm()
    nuc = torch.linalg.svdvals(xn.T @ yn).sum()
    assert pp.procrustes(x, y) == pytest.approx((2 - 2 * nuc).sqrt().item(), rel=1e-8)
    acc = pp.MinibatchCKA(num_x=1, num_y=1)
    parts = [slice(0, 20), slice(20, 40), slice(40, 60)]
    for s in parts:
        acc.update([x[s]], [y[s]])
    hs = [[_hsic_unbiased(a[s] @ a[s].T, b[s] @ b[s].T) for s in parts] for a, b in [(x, y), (x, x), (y, y)]]
    expected = sum(hs[0]) / (sum(hs[1]) * sum(hs[2])).sqrt()
    assert acc.compute().item() == pytest.approx(expected.item(), rel=1e-10)


# ---------------------------------------------------------------------------------------------------- circuits


def test_edge_scores_equal_patch_edges_and_a_hand_patched_direct_path():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=30,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    m = pp.from_hf(transformers.LlamaForCausalLM(cfg).eval().double())
    g = torch.Generator().manual_seed(0)
    clean, corr = torch.randint(0, 30, (6, 7), generator=g), torch.randint(0, 30, (6, 7), generator=g)
    ans = torch.randint(0, 30, (6,), generator=g)
    metric = pp.LogitDiff(ans, (ans + 3) % 30)
    scores = circuits.edge_attribution(m, clean, corr, metric=metric, method="exact", quiet=True)
    names = [str(e) for e in scores.graph.edges]
    i = names.index("embed->logits")
    patched = circuits.patch_edges(m, [[scores.graph.edges[i]]], clean, corr, metric=metric)
    base = metric(m(clean)[:, -1])
    assert np.asarray(scores.scores)[i] == pytest.approx((patched[0] - base).mean().item(), rel=1e-10)
    # by hand: swap the embedding's direct write into the final residual stream for the corrupted one
    _, c_clean = m.run_with_cache(clean, names_filter=["hook_embed"])
    _, c_corr = m.run_with_cache(corr, names_filter=["hook_embed"])
    delta = c_corr["hook_embed"] - c_clean["hook_embed"]
    logits = m.run_with_hooks(clean, fwd_hooks=[("blocks.1.hook_resid_post", lambda x, hook: x + delta)])[
        :, -1
    ]
    assert np.asarray(scores.scores)[i] == pytest.approx((metric(logits) - base).mean().item(), rel=1e-10)


# ------------------------------------------------------------------------------------------ saving and resuming


def test_checkpointed_llc_interrupted_by_a_callback_resumes_to_the_uninterrupted_run(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=30, n_embd=16, n_layer=2, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    m = pp.from_hf(transformers.GPT2LMHeadModel(cfg).eval())
    data = [torch.randint(0, 30, (4, 8), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    kw = dict(
        num_chains=2, num_draws=8, num_burnin_steps=2, step_size=1e-3, localization=100.0, quiet=True, seed=5
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = pp.estimate_llc(m, data, checkpoint=tmp_path / "a.npz", **kw)
        calls = {"n": 0}

        def stop(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 5:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            pp.estimate_llc(m, data, checkpoint=tmp_path / "b.npz", callbacks=[stop], **kw)
        resumed = pp.estimate_llc(m, data, checkpoint=tmp_path / "b.npz", **kw)
        with pytest.raises(pp.io.FingerprintMismatch, match="localization"):
            pp.estimate_llc(m, data, checkpoint=tmp_path / "b.npz", **dict(kw, localization=50.0))
    np.testing.assert_array_equal(resumed.loss_trace, full.loss_trace)
    assert resumed.llc_mean == full.llc_mean
    resumed.save(tmp_path / "llc.npz")
    assert pp.LLCResult.load(tmp_path / "llc.npz").llc_mean == full.llc_mean
    pp.invert(np.eye(2), target=np.array([0.1, 0.0]), method="pinv").save(tmp_path / "plan.npz")
    with pytest.raises(pp.io.FormatError, match="Intervention"):
        pp.LLCResult.load(tmp_path / "plan.npz")


# -------------------------------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("user_model")
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(**SMALL, num_key_value_heads=2, max_position_embeddings=16)
    transformers.Qwen2ForCausalLM(cfg).eval().save_pretrained(d / "qwen")
    rng = np.random.default_rng(0)
    np.save(d / "toks.npy", rng.integers(0, 40, (16, 10)))
    np.save(d / "corr.npy", rng.integers(0, 40, (16, 10)))
    return d


@pytest.mark.filterwarnings("ignore")
def test_cli_llc_and_patch_equal_the_library_calls(saved_model, capsys):
    from pypattern import cli

    d = saved_model
    out = d / "llc_out"
    rc = cli.main(
        ["llc", "--model", str(d / "qwen"), "--data", str(d / "toks.npy"), "--step-size", "1e-3",
         "--num-draws", "6", "--num-burnin-steps", "2", "--num-chains", "2", "--out", str(out), "--quiet"]
    )  # fmt: skip
    assert rc == 0
    summary = json.loads((out / "llc_summary.json").read_text())
    model = pp.from_pretrained(str(d / "qwen"))
    tokens = torch.as_tensor(np.load(d / "toks.npy"))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens), batch_size=8, shuffle=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = pp.estimate_llc(
            model,
            loader,
            loss_fn=pp.losses.batch_loss,
            num_chains=2,
            num_draws=6,
            num_burnin_steps=2,
            step_size=1e-3,
            localization=100.0,
            seed=0,
            quiet=True,
        )
    np.testing.assert_allclose(summary["llc_per_chain"], res.llc_per_chain, rtol=1e-12)
    assert summary["llc_se"] == pytest.approx(summary["llc_std"] / np.sqrt(2), rel=1e-12)

    out = d / "patch_out"
    rc = cli.main(
        ["patch", "--model", str(d / "qwen"), "--data", str(d / "toks.npy"), "--corrupted", str(d / "corr.npy"),
         "--sites", "resid_pre", "--out", str(out), "--quiet"]
    )  # fmt: skip
    assert rc == 0
    corr = torch.as_tensor(np.load(d / "corr.npy"))
    grid = pp.activation_patching(model, "resid_pre", tokens[:8], corr[:8], metric=pp.KL(), quiet=True).mean()
    import csv

    rows = list(csv.DictReader((out / "patch_resid_pre.csv").open()))
    table = {(int(r["layer"]), int(r["pos"])): float(r["mean"]) for r in rows}
    for (layer, pos), v in table.items():
        assert v == pytest.approx(grid[layer, pos].item(), abs=1e-6)


def test_cli_refuses_bad_token_files_naming_the_option(saved_model, capsys):
    from pypattern import cli

    d = saved_model
    np.save(d / "oov.npy", np.full((4, 10), 60))
    with pytest.raises(SystemExit) as info:
        cli.main(["llc", "--model", str(d / "qwen"), "--data", str(d / "oov.npy"), "--out", str(d / "o")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert info.value.code == 2
    assert err.startswith("pypattern llc: error: --data") and "[0, 40)" in err


# --------------------------------------------------------------------------------------- problems (fail now)


def _tiny_induction():
    task = pp.InductionTask(d_vocab=12, seq_len=9)
    return pp.Transformer(task.model_config(d_model=16, n_heads=2, seed=3)), task.sample(4, seed=1).tokens


_SHORT_CALIBRATION = {
    "calibration_steps": 20,
    "calibration_chains": 2,
    "max_step_size": 1e-3,
    "min_step_size": 1e-4,
}


@pytest.mark.parametrize("entry", ["bif", "susceptibilities"])
def test_conflicting_nbeta_is_refused_before_the_step_calibration(entry):
    model, t = _tiny_induction()
    call = {
        "bif": lambda **k: pp.bif(model, [t], t, **k),
        "susceptibilities": lambda **k: pp.susceptibilities(model, [t], t, ["embed"], **k),
    }[entry]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="both set nbeta"):
            call(
                num_chains=1,
                num_draws=2,
                nbeta=2.0,
                optimizer_kwargs={"nbeta": 3.0},
                quiet=True,
                auto_step_options=_SHORT_CALIBRATION,
            )


def test_conflicting_nbeta_is_refused_up_front_by_estimate_llc():
    model, t = _tiny_induction()
    with pytest.raises(ValueError, match=r"nbeta=2.0 and optimizer_kwargs\['nbeta'\]=3.0"):
        pp.estimate_llc(model, [t], num_chains=1, num_draws=2, nbeta=2.0, optimizer_kwargs={"nbeta": 3.0})


@pytest.mark.parametrize("entry", ["bif", "susceptibilities"])
def test_step_conflict_names_the_key_the_user_gave(entry):
    model, t = _tiny_induction()
    call = {
        "bif": lambda **k: pp.bif(model, [t], t, **k),
        "susceptibilities": lambda **k: pp.susceptibilities(model, [t], t, ["embed"], **k),
    }[entry]
    with pytest.raises(ValueError, match=r"optimizer_kwargs\['lr'\]"):
        call(num_chains=1, num_draws=2, step_size=1e-4, optimizer_kwargs={"lr": 1e-3}, quiet=True)


def test_step_name_conflict_names_the_function_called():
    model, t = _tiny_induction()
    with pytest.raises(ValueError) as info:
        pp.estimate_llc(model, [t], num_chains=1, num_draws=2, step_size=1e-3, lr=1e-4, quiet=True)
    assert "sample()" not in str(info.value)


def test_cli_warnings_mark_library_only_advice(saved_model):
    import os
    import subprocess
    import sys

    d = saved_model
    run = subprocess.run(
        [sys.executable, "-m", "pypattern", "llc", "--model", str(d / "qwen"), "--data", str(d / "toks.npy"),
         "--num-chains", "1", "--num-draws", "20", "--num-burnin-steps", "5", "--step-size", "1e-4",
         "--out", str(d / "one"), "--quiet"],
        capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "pypattern llc: warning: the loss trace is not stationary: split R-hat" in run.stderr
    unmarked = [
        line for line in run.stderr.splitlines() if "calibrate_step_size" in line and "[a library" not in line
    ]
    assert not unmarked, unmarked


def test_generate_on_a_hugging_face_model_runs_or_names_the_argument():
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**SMALL, num_key_value_heads=2, max_position_embeddings=32)
    ).eval()
    prompt = torch.randint(0, 40, (2, 4))
    try:
        out = pp.generate(hf, prompt, steps=3, greedy=True)
    except (TypeError, ValueError) as e:
        assert "model" in str(e), str(e)
    else:
        torch.testing.assert_close(out, pp.generate(pp.from_hf(hf), prompt, steps=3, greedy=True))
