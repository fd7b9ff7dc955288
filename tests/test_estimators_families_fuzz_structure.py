"""What the estimators read from converted Hugging Face families other than GPT-2, against independent
computations: a per-head component's mask moves exactly that head's z (a key/value head's, exactly its group's;
Falcon's multi-query head, every head), an MLP's mask only that MLP's write and one expert's only the tokens
routed to it; right padding leaves the real tokens' per-token losses unchanged; representations of the
converted and the native model are the same, and similarity measures score a representation against itself
(or an orthogonal rotation of it) as identical; concept flags train and steer on the converted model."""

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_estimators_families_fuzz import ARCHS, V, _hf  # noqa: E402

import pypattern as pp  # noqa: E402
from pypattern import equivalence as eq  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

GROUPS = {
    "llama": 2,
    "qwen2": 2,
    "gemma2": 2,
    "mixtral": 2,
    "falcon": 1,
    "glm4": 2,
    "arcee": 2,
    "nemotron": 2,
}  # key/value heads (4 query heads)


def _tokens(b: int = 3, t: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


def _cache(tf, tokens, names):
    with torch.no_grad():
        _, cache = tf.run_with_cache(tokens, names_filter=names)
    return {n: cache[n].clone() for n in names}


def _moved(tf, masks, tokens, names):
    """The activations at ``names`` after adding noise to the masked entries only (weights restored after)."""
    saved = {n: p.detach().clone() for n, p in tf.named_parameters()}
    g = torch.Generator().manual_seed(1)
    assert set(masks) <= set(saved) and sum(int(m.sum()) for m in masks.values()) > 0
    with torch.no_grad():
        for n, p in tf.named_parameters():
            if n in masks:
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype) * masks[n].to(p.dtype))
    try:
        return _cache(tf, tokens, names)
    finally:
        with torch.no_grad():
            for n, p in tf.named_parameters():
                p.copy_(saved[n])


@pytest.mark.parametrize("arch", ARCHS)
def test_component_masks_move_exactly_their_part(arch):
    tf = pp.from_hf(_hf(arch))
    tokens = _tokens()
    z, attn_out, mlp_out = "blocks.1.attn.hook_z", "blocks.1.hook_attn_out", "blocks.1.hook_mlp_out"
    names = [z, attn_out, mlp_out, "blocks.0.hook_resid_post", "hook_embed"]
    base = _cache(tf, tokens, names)
    for h in (0, 3):
        moved = _moved(tf, pp.component_masks(tf, f"blocks.1.attn.head.{h}"), tokens, names)
        diff = (moved[z] - base[z]).abs().amax(dim=(0, 1, 3))  # per head
        assert diff[h] > 1e-5
        assert diff[[g for g in range(4) if g != h]].max() == 0  # the other heads' z bit for bit
        assert torch.equal(moved["blocks.0.hook_resid_post"], base["blocks.0.hook_resid_post"])
    n_kv = GROUPS.get(arch)
    if n_kv is not None:
        for g in range(n_kv):
            moved = _moved(tf, pp.component_masks(tf, f"blocks.1.attn.kv_head.{g}"), tokens, names)
            diff = (moved[z] - base[z]).abs().amax(dim=(0, 1, 3))
            group = [h for h in range(4) if h // (4 // n_kv) == g]
            assert (diff[group] > 1e-4).all(), (g, diff)
            assert all(diff[h] == 0 for h in range(4) if h not in group)
    else:
        with pytest.raises(ValueError, match="kv_head"):
            pp.component_masks(tf, "blocks.1.attn.kv_head.0")
    # an MLP's mask moves its write only; the attention of its layer (parallel blocks too) stays bit for bit
    moved = _moved(tf, pp.component_masks(tf, "blocks.1.mlp"), tokens, names)
    assert torch.equal(moved[attn_out], base[attn_out]) and torch.equal(moved[z], base[z])
    assert (moved[mlp_out] - base[mlp_out]).abs().max() > 1e-4
    moved = _moved(tf, pp.component_masks(tf, "embed"), tokens, names)
    assert (moved["hook_embed"] - base["hook_embed"]).abs().max() > 1e-4
    if arch == "mixtral":  # one expert: exactly the tokens the router sends to it (the router is not moved)
        idx_name = "blocks.1.mlp.hook_expert_indices"
        routed = (_cache(tf, tokens, [idx_name])[idx_name] == 2).any(-1)
        moved = _moved(tf, pp.component_masks(tf, "blocks.1.mlp.expert.2"), tokens, names)
        d = (moved[mlp_out] - base[mlp_out]).abs().amax(-1)
        assert routed.any() and (~routed).any()
        assert (d[routed] > 1e-5).all() and (d[~routed] == 0).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_right_padding_leaves_real_per_token_losses(arch):
    """Per-token losses of the real tokens: the converted model on right-padded rows (no mask) equals each row
    run alone, and equals the native model given the attention mask (float32 here, where HF's Gemma 2 is
    finite on padded rows too)."""
    hf = _hf(arch, torch.float32)
    tf = pp.from_hf(hf)
    tokens = _tokens(3, 10, seed=3)
    lengths = [10, 6, 3]
    am = (torch.arange(10)[None] < torch.tensor(lengths)[:, None]).long()
    padded = torch.where(am.bool(), tokens, 1)
    with torch.no_grad():
        ours = tf(padded, return_type="per_token_loss")
        theirs = hf(input_ids=padded, attention_mask=am).logits
        for i, n in enumerate(lengths):
            alone = tf(tokens[i : i + 1, :n], return_type="per_token_loss")[0]
            torch.testing.assert_close(ours[i, : n - 1], alone, rtol=1e-5, atol=1e-6)
            lp = torch.log_softmax(theirs[i, : n - 1], -1)
            native = -lp.gather(-1, tokens[i, 1:n, None])[:, 0]
            torch.testing.assert_close(ours[i, : n - 1], native, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "falcon", "mixtral", "opt"])
def test_similarity_of_a_model_with_itself(arch):
    hf = _hf(arch, torch.float32)
    tf = pp.from_hf(hf)
    tokens = _tokens(24, 8, seed=5)
    rep = eq.representations(tf, tokens)  # every block's resid_post, positions flattened: (24, 2 * 8 * 16)
    assert rep.shape == (24, 256)
    if arch not in ("falcon", "opt"):  # the native adapter reads the same residual stream
        torch.testing.assert_close(eq.representations(pp.hooked_hf(hf), tokens), rep, rtol=1e-5, atol=1e-5)
    x = rep.double()
    q, _ = torch.linalg.qr(
        torch.randn(256, 256, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    )
    for y in (x, x @ q):
        assert pp.linear_cka(x, y) == pytest.approx(1.0, abs=1e-12)
        assert pp.linear_cka(x, y, debiased=False) == pytest.approx(1.0, abs=1e-12)
        assert pp.procrustes(x, y) == pytest.approx(0.0, abs=1e-10)
    names = [f"blocks.{layer}.hook_resid_post" for layer in range(2)]
    cache = _cache(tf, tokens, names)
    acts = [cache[n].flatten(0, 1) for n in names]
    np.testing.assert_allclose(np.diag(np.asarray(pp.cka_matrix(acts, acts))), 1.0, atol=1e-6)
    # the CCA family on a slice with fewer features than samples: every canonical correlation 1
    small, q16 = x[:, -16:], torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))[0]
    assert eq.cca(small, small @ q16).min() == pytest.approx(1.0, abs=1e-9)
    assert eq.svcca(small, small @ q16) == pytest.approx(1.0, abs=1e-9)
    assert eq.pwcca(small, small @ q16) == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(ValueError, match="ridge"):  # 256 features, 24 samples: refused unless regularised
        eq.cca(x, x @ q)
    # every token's residual (192 samples; the ridge grid is absolute, so scaled to unit variance): the held-out
    # R^2 of a rotation is about 1 (with 24 samples, 2 held out, the per-column R^2 is too noisy to say)
    z = acts[1].double()
    z = (z - z.mean(0)) / z.std()
    assert eq.ridge_similarity_cv(z, z @ q16) > 0.95
    # interpretive equivalence as documented: the model against its own implementations scores 0 with CKA
    sample = eq.resample_implementations(tf, tokens, [("blocks.0.attn.hook_z", 1)])
    res = pp.interpretive_equivalence(rep, rep, sample, sample, num_trials=4, similarity="cka")
    assert res.score == 0.0


@pytest.mark.parametrize("arch", ["gemma2", "falcon", "mixtral", "opt"])
def test_flags_train_and_steer_on_converted_families(arch):
    task = pp.TopicTask(num_topics=2, tokens_per_topic=8, seq_len=12)
    tf = pp.from_hf(_hf(arch, torch.float32))
    spec = pp.FlagSpec("blocks.1.hook_resid_pre", dims=(0, 1, 2, 3), num_concepts=2)
    res = pp.train_flags(tf, task, spec, stage1_steps=40, stage2_steps=10, batch_size=32, lr=1e-2, quiet=True)
    assert res.flag_losses[-1] < 0.25 * res.flag_losses[0]
    tokens = task.sample(4, seed=3).tokens
    clean = _cache(tf, tokens, [spec.hook])[spec.hook]
    with pp.steer(tf, spec, concept=1):
        steered = _cache(tf, tokens, [spec.hook])[spec.hook]
    torch.testing.assert_close(steered[..., :4], spec.code()[1].expand_as(steered[..., :4]))
    assert torch.equal(steered[..., 4:], clean[..., 4:])
