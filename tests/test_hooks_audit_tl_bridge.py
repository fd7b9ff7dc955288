"""Hooks of models converted with ``pypattern.from_hf`` against TransformerLens 4.x's ``TransformerBridge`` of the
same Hugging Face model in compatibility mode without weight processing (its TransformerLens hook names): every
hook's name, shape and values, grouped-query key/value heads, masked scores, ``run_with_cache`` options, the
forward's ``stop_at_layer`` / ``start_at_layer`` / ``loss_per_token``, hooks that edit in place, replace or raise,
and backward hooks.

Runs in the bench venv of ``bench/envs/tl.sh`` (``OMP_NUM_THREADS=1 PYTHONPATH=. .bench-venvs/tl/bin/python -m
pytest -q -p no:cacheprovider tests/test_hooks_audit_tl_bridge.py``); skipped where TransformerLens 4.x is not
installed."""

import sys
import warnings
from pathlib import Path

import pytest
import torch

import pypattern

tl = pytest.importorskip("transformer_lens")
pytest.importorskip("transformers")
try:
    import transformer_lens.model_bridge as bridge_mod
except ImportError:
    pytest.skip("TransformerLens without TransformerBridge", allow_module_level=True)

pytestmark = pytest.mark.usefixtures("one_thread")

# one case per family: GPT-2, GPT-NeoX (parallel, partial rotary), Llama (grouped-query), Qwen2, Gemma (multi-query)
CASES = [
    "gpt2-tied",
    "neox-parallel-rot0.25",
    "llama-gqa2-biases-tied-headdim",
    "qwen2-gqa4-tied",
    "gemma-mqa-tied",
]
# names only the bridge has: its rotary tables, the attention's input, the logits, each module's input and output
BRIDGE_ONLY = ("hook_cos", "hook_sin", "hook_hidden_states", "hook_unembed", "hook_in", "hook_out")
# the bridge's compatibility mode computes RMSNorms in the model's dtype, Hugging Face (and the converted model) in
# float32: the float64 models agree to float32 rounding
TOL = 1e-6


def _test_convert():
    sys.path.insert(0, str(Path(__file__).parent))
    import test_convert

    return test_convert


_MODELS: dict = {}


def models(case, tmp_path_factory):
    """``(converted model, bridge)`` of one random float64 Hugging Face model of ``case``."""
    if case not in _MODELS:
        tc = _test_convert()
        hf = tc.hf_model(case, torch.float64)
        ours = pypattern.from_hf(hf)
        hf.config.architectures = [type(hf).__name__]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            br = bridge_mod.TransformerBridge.boot_transformers(
                case,
                hf_model=hf,
                dtype=torch.float64,
                device="cpu",
                tokenizer=tc._local_tokenizer(tmp_path_factory.mktemp("tok")),
            )
            br.enable_compatibility_mode(disable_warnings=True, no_processing=True)
        _MODELS.clear()  # one pair kept at a time
        _MODELS[case] = (ours, br.eval())
    return _MODELS[case]


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def tokens(n=3, t=12):
    return torch.randint(0, _test_convert().V, (n, t), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("case", CASES)
def test_every_hook_name_shape_and_value_equals_the_bridges(case, tmp_path_factory):
    ours, br = models(case, tmp_path_factory)
    x = tokens()
    with torch.no_grad():
        lt, theirs = br.run_with_cache(x)
        lo, mine = ours.run_with_cache(x)
    assert rel(lo, lt) <= TOL
    only_ours = set(mine) - set(theirs)
    only_theirs = {k for k in set(theirs) - set(mine) if not k.endswith(BRIDGE_ONLY)}
    # the bridge's GPT-NeoX attention has no hook on the rotated queries and keys; every other name is shared
    assert all(k.endswith(("hook_rot_q", "hook_rot_k")) for k in only_ours), only_ours
    assert case.startswith("neox") or not only_ours
    assert not only_theirs, only_theirs
    cfg = ours.cfg
    for k in sorted(set(mine) & set(theirs)):
        a, b = theirs[k], mine[k]
        assert a.shape == b.shape, (k, a.shape, b.shape)
        if k.endswith("hook_normalized"):
            continue  # README: pypattern's is the norm's output after its weight
        # masked scores: -inf in both, pattern 0 there
        assert torch.equal(torch.isfinite(a), torch.isfinite(b)), k
        keep = torch.isfinite(a)
        assert rel(b[keep], a[keep]) <= TOL, (k, rel(b[keep], a[keep]))
    # grouped-query keys and values: n_key_value_heads in both (not repeated per query head)
    for w in ("k", "v"):
        assert theirs[f"blocks.0.attn.hook_{w}"].shape[2] == cfg.n_key_value_heads
    scores = mine["blocks.1.attn.hook_attn_scores"]
    upper = torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1)
    assert bool(torch.isneginf(scores[..., upper]).all())
    assert bool((mine["blocks.1.attn.hook_pattern"][..., upper] == 0).all())
    assert mine["ln_final.hook_scale"].shape == (*x.shape, 1)


@pytest.mark.parametrize("case", ["gpt2-tied", "llama-gqa2-biases-tied-headdim"])
def test_stop_and_start_at_layer_and_loss_per_token_equal_the_bridges(case, tmp_path_factory):
    ours, br = models(case, tmp_path_factory)
    x = tokens()
    n = ours.cfg.n_layers
    with torch.no_grad():
        _, cache = br.run_with_cache(x)
        for k in range(-n, n):
            assert rel(ours(x, stop_at_layer=k), br(x, stop_at_layer=k)) <= TOL, k
            resid = cache[f"blocks.{k % n}.hook_resid_pre"]
            assert rel(ours(resid, start_at_layer=k), br(resid, start_at_layer=k)) <= TOL, k
        resid = cache["blocks.0.hook_resid_pre"]
        torch.testing.assert_close(
            ours(resid, start_at_layer=0, stop_at_layer=1), cache["blocks.1.hook_resid_pre"], rtol=0, atol=TOL
        )
        # a cache stopped at layer 1: block 0 and the embedding only, as the bridge's
        _, mine = ours.run_with_cache(x, stop_at_layer=1)
        _, theirs = br.run_with_cache(x, stop_at_layer=1)
        assert set(mine) == {k for k in theirs if not k.endswith(BRIDGE_ONLY)} - {
            k for k in mine if k.endswith(("hook_rot_q", "hook_rot_k")) and k not in theirs
        }
        assert not any(k.startswith(("blocks.1.", "ln_final")) for k in mine)
        per_tok = br(x, return_type="loss", loss_per_token=True)
        assert rel(ours(x, return_type="loss", loss_per_token=True), per_tok) <= TOL
        logits, loss = ours(x, return_type="both", loss_per_token=True)
        assert loss.shape == (3, 11) and rel(loss, per_tok) <= TOL
        assert ours(x, return_type=None) is None and br(x, return_type=None) is None


def test_run_with_cache_options_equal_the_bridges(tmp_path_factory):
    ours, br = models("llama-gqa2-biases-tied-headdim", tmp_path_factory)
    x = tokens(1, 9)
    keep = lambda name: name.endswith(("hook_v", "hook_pattern", "hook_resid_post", "hook_z"))  # noqa: E731
    # (an int pos_slice: TransformerLens keeps the position axis, of length 1, pypattern drops it)
    for pos_slice in (None, (2, 7), [0, 4, 8]):
        with torch.no_grad():
            _, theirs = br.run_with_cache(x, names_filter=keep, remove_batch_dim=True, pos_slice=pos_slice)
            _, mine = ours.run_with_cache(x, names_filter=keep, remove_batch_dim=True, pos_slice=pos_slice)
        theirs = {k: v for k, v in theirs.items() if not k.endswith(BRIDGE_ONLY)}
        assert set(mine) == set(theirs) and len(mine) == 8
        for k in mine:
            assert mine[k].shape == theirs[k].shape, (pos_slice, k)
            assert rel(mine[k], theirs[k]) <= TOL, (pos_slice, k)


def _edits():
    """Hook functions TransformerLens users write: edit in place, return a new tensor, on a GQA value head."""

    def zero_head_in_place(t, hook):
        t[:, 1] = 0.0  # pattern (batch, head, q, k): head 1 attends nowhere

    def scale_resid(t, hook):
        return t * 0.5

    def kv_head(t, hook):
        t = t.clone()
        t[:, :, 0] = 3.0
        return t

    def scale(t, hook):
        return t * 2.0  # (the bridge's RMSNorm ignores an in-place edit of its scale; pypattern applies it)

    return [
        ("blocks.0.attn.hook_pattern", zero_head_in_place),
        ("blocks.1.hook_resid_pre", scale_resid),
        ("blocks.1.attn.hook_v", kv_head),
        ("blocks.0.ln2.hook_scale", scale),
    ]


@pytest.mark.parametrize("case", ["gpt2-tied", "llama-gqa2-biases-tied-headdim"])
def test_hooks_that_edit_replace_or_raise_act_as_on_the_bridge(case, tmp_path_factory):
    ours, br = models(case, tmp_path_factory)
    x = tokens()
    with torch.no_grad():
        plain = ours(x)
        for name, fn in _edits():
            got = ours.run_with_hooks(x, fwd_hooks=[(name, fn)])
            want = br.run_with_hooks(x, fwd_hooks=[(name, fn)])
            assert rel(got, want) <= TOL, name
            assert rel(got, plain) > 1e-3, name  # the edit changed something

    def boom(t, hook):
        raise RuntimeError("boom")

    for model in (ours, br):
        with pytest.raises(RuntimeError, match="boom"):
            model.run_with_hooks(x, fwd_hooks=[("blocks.0.hook_attn_out", boom)])
    assert not [n for n, hp in ours.hook_dict.items() if hp._fns]
    with torch.no_grad():
        assert torch.equal(ours(x), plain)  # nothing left behind

    # a hook added with add_hook stays until reset_hooks(), on both
    for model in (ours, br):
        model.add_hook("blocks.1.hook_resid_pre", _edits()[1][1])
    with torch.no_grad():
        assert rel(ours(x), br(x)) <= TOL and rel(ours(x), plain) > 1e-3
    for model in (ours, br):
        model.reset_hooks()
    with torch.no_grad():
        assert torch.equal(ours(x), plain) and rel(br(x), plain) <= TOL


@pytest.mark.parametrize("case", ["gpt2-tied", "llama-gqa2-biases-tied-headdim"])
def test_backward_hooks_and_cached_gradients_equal_the_bridges(case, tmp_path_factory):
    ours, br = models(case, tmp_path_factory)
    x = tokens()
    # (the bridge's backward hook on hook_resid_mid sees the gradient through ln2 only, and its hook_resid_pre
    # backward hooks do not fire: those are checked against autograd alone)
    names = ["blocks.1.attn.hook_z", "blocks.0.attn.hook_v", "blocks.1.hook_mlp_out"]
    own = ["blocks.0.hook_resid_mid", "blocks.1.hook_resid_pre"]
    grads = {}
    for tag, model, where in (("ours", ours, names + own), ("theirs", br, names)):

        def save(g, hook, tag=tag):
            grads[tag, hook.name] = g.detach().clone()

        loss = model.run_with_hooks(x, return_type="loss", bwd_hooks=[(n, save) for n in where])
        loss.backward()
        model.zero_grad(set_to_none=True)
    for n in names:
        assert grads["ours", n].shape == grads["theirs", n].shape, n
        assert rel(grads["ours", n], grads["theirs", n]) <= TOL, n
    # autograd on the activations themselves (kept in the graph with detach=False)
    loss, cache = ours.run_with_cache(x, return_type="loss", names_filter=names + own, detach=False)
    want = torch.autograd.grad(loss, [cache[n] for n in names + own])
    for n, w in zip(names + own, want):
        assert rel(grads["ours", n], w) <= 1e-12, n
    _, cache = ours.run_with_cache(x, return_type="loss", names_filter=names + own, incl_bwd=True)
    ours.zero_grad(set_to_none=True)
    for n, w in zip(names + own, want):
        assert rel(cache[n + "_grad"], w) <= 1e-12, n
