"""Edge counts against their closed form, the KL metric against per-edge hooks on the plain model, and the
``circuit`` command's exact scores on a saved Hugging Face GPT-NeoX (parallel residual) against the reference."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from _circuits_reference import ARCHS, at_pos, naive_first_order, naive_patch, prompts, tiny

from pypattern.circuits import edge_attribution, edges, patch_edges
from pypattern.patching import KL


def _closed_form_count(L, H, Hk, mlp, parallel, n_pos=1):
    """Edges of a model by counting: every destination input reads every node of an earlier stage."""
    m = 1 if mlp else 0
    total = 0
    for lay in range(L):
        before = 1 + lay * (H + m)  # the embedding and the earlier layers' nodes
        total += (H + 2 * Hk) * before  # query per head, key and value per key/value head
        if mlp:
            total += before if parallel else before + H  # a parallel MLP reads the block's input
    total += 1 + L * (H + m)  # the logits
    return total * n_pos


@pytest.mark.parametrize(
    "opts, L, H, Hk, mlp, parallel",
    [
        ({}, 2, 4, 4, True, False),
        (dict(attn_only=True), 2, 4, 4, False, False),
        (dict(parallel_attn_mlp=True), 2, 4, 4, True, True),
        (dict(n_key_value_heads=2), 2, 4, 2, True, False),
        (dict(n_key_value_heads=1, parallel_attn_mlp=True, layers=3), 3, 4, 1, True, True),
    ],
)
def test_edge_counts_follow_the_closed_form(opts, L, H, Hk, mlp, parallel):
    model = tiny(**opts)
    g = edges(model)
    assert len(g) == _closed_form_count(L, H, Hk, mlp, parallel)
    assert len(edges(model, per_position=True, seq_len=5)) == _closed_form_count(L, H, Hk, mlp, parallel, 5)
    names = {str(e) for e in g}
    if parallel:  # no edge from a head into the MLP of its own layer
        assert not any(
            n.startswith(f"L{lay}H") and n.endswith(f"->MLP{lay}") for lay in range(L) for n in names
        )
    if mlp and not parallel:
        assert "L0H0->MLP0" in names
    if opts == {}:
        assert len(g) == 110


def _bound_kl(model, clean, position):
    ref = KL(position=position)
    pos = position if isinstance(position, torch.Tensor) else torch.tensor(position % clean.shape[1])
    with torch.no_grad():
        ref.bind(at_pos(model(clean), pos))
    ref.position = pos
    return ref


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("mode", ["noise", "denoise"])
def test_kl_metric_patches_and_attributes_as_per_edge_hooks(arch, mode):
    model = tiny(**ARCHS[arch])
    clean, corr, _, _ = prompts(model, B=3)
    position = torch.tensor([1, 5, 3])
    ref_metric = _bound_kl(model, clean, position)
    all_edges = list(edges(model))
    sets = [all_edges[:40], all_edges[40:], all_edges[::3]]
    for ablation in ("resample", "mean", "zero"):
        other = None if (mode, ablation) == ("noise", "zero") else corr  # read only when not zeros into clean
        got = patch_edges(
            model, sets, clean, other, metric=KL(position=position), mode=mode, ablation=ablation
        )
        want = torch.stack([naive_patch(model, s, clean, other, ref_metric, mode, ablation) for s in sets])
        assert torch.allclose(got, want, atol=1e-9, rtol=0), ablation
    sc = edge_attribution(
        model, clean, corr, metric=KL(position=position), method="eap-ig", steps=3, mode=mode, ablation="mean"
    )
    want = naive_first_order(
        model, edges(model), clean, corr, ref_metric, mode, "mean", alphas=(1 / 3, 2 / 3, 1)
    )
    assert torch.allclose(sc.values, want, atol=1e-9, rtol=0)


def test_circuit_command_exact_scores_of_a_saved_parallel_neox_match_the_reference(tmp_path):
    transformers = pytest.importorskip("transformers")
    import pypattern as pp
    from pypattern.cli import main
    from pypattern.patching import LogProb

    torch.manual_seed(0)
    cfg = transformers.GPTNeoXConfig(
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_size=16,
        intermediate_size=32,
        vocab_size=20,
        max_position_embeddings=16,
        use_parallel_residual=True,
        rotary_pct=0.5,
    )
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    hf.save_pretrained(tmp_path / "model")
    rng = np.random.default_rng(0)
    clean, corr = rng.integers(0, 20, (4, 6)), rng.integers(0, 20, (4, 6))
    np.save(tmp_path / "clean.npy", clean)
    np.savetxt(tmp_path / "corr.txt", corr, fmt="%d")
    out = tmp_path / "out"
    argv = ["circuit", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "clean.npy")]
    argv += ["--corrupted", str(tmp_path / "corr.txt"), "--methods", "exact", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    with open(out / "edge_scores.csv") as f:
        got = {r["name"]: float(r["score"]) for r in csv.DictReader(f)}
    model = pp.from_hf(hf.double())
    g = edges(model)
    assert len(got) == len(g) == _closed_form_count(2, 4, 4, True, True)
    clean_t, corr_t = torch.from_numpy(clean), torch.from_numpy(corr)
    with torch.no_grad():
        metric = LogProb(model(clean_t)[:, -1].argmax(-1))
    base = naive_patch(model, [], clean_t, corr_t, metric, "noise", "resample")
    for e in g:
        want = float((naive_patch(model, [e], clean_t, corr_t, metric, "noise", "resample") - base).mean())
        assert got[str(e)] == pytest.approx(want, abs=1e-5), str(e)


@pytest.mark.parametrize("method", ["patch", "eap", "eap-ig", "exact", "faithfulness", "acdc"])
@pytest.mark.parametrize("mode", ["noise", "denoise"])
def test_a_metric_of_complex_values_is_refused_by_name(method, mode):
    from pypattern.circuits import acdc, faithfulness

    model = tiny(layers=1)
    clean, corr, _, _ = prompts(model, B=3)

    def metric(logits):
        return logits[..., 0] + 1j * logits[..., 1]

    kw = dict(metric=metric, mode=mode)
    calls = {
        "patch": lambda: patch_edges(model, ["embed->logits"], clean, corr, **kw),
        "eap": lambda: edge_attribution(model, clean, corr, method="eap", **kw),
        "eap-ig": lambda: edge_attribution(model, clean, corr, method="eap-ig", steps=2, **kw),
        "exact": lambda: edge_attribution(model, clean, corr, method="exact", quiet=True, **kw),
        "faithfulness": lambda: faithfulness(model, ["embed->logits"], clean, corr, **kw),
        "acdc": lambda: acdc(model, clean, corr, threshold=0.1, quiet=True, **kw),
    }
    with pytest.raises(ValueError, match=r"metric returned complex"):
        calls[method]()
