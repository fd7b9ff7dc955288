"""pypattern's estimators on TransformerLens models built from a config with random weights, checked against
TransformerLens' own computation: the bridge's forward logits and loss, a patch made with its own
``run_with_hooks``, gradients read through its hook points, and its loss under the LLC's ``L_n(w*)``.

TransformerLens 4.x builds a model from a config with ``TransformerBridge.boot_native`` (its ``NativeModel``;
``HookedTransformer`` / ``HookedTransformerConfig`` are gone from 4.x). Skipped where TransformerLens is not
installed.
"""

from __future__ import annotations

import warnings

import pytest
import torch

tl = pytest.importorskip("transformer_lens")

import pypattern as pp  # noqa: E402
from pypattern import circuits  # noqa: E402
from pypattern.models.convert import UnsupportedModelError  # noqa: E402

try:
    from transformer_lens import TransformerBridge, TransformerBridgeConfig
    from transformer_lens.model_bridge.sources import native as _native  # noqa: F401  (attaches boot_native)
except ImportError:  # TransformerLens 2.x / 3.x: no native bridge
    pytest.skip("TransformerLens without TransformerBridge.boot_native", allow_module_level=True)

VOCAB = 23
BASE = dict(
    n_layers=2, d_model=16, n_heads=4, d_head=4, d_mlp=32, d_vocab=VOCAB, n_ctx=12, act_fn="gelu", seed=0
)

# every option of the native model pypattern converts (float64: the conversion is exact to float64 rounding)
CONFIGS = {
    "layernorm_gelu": {},
    "rms_relu": dict(normalization_type="RMS", act_fn="relu"),
    "gated_silu_rms": dict(gated_mlp=True, act_fn="silu", normalization_type="RMS"),
    "gated_gelu_ln": dict(gated_mlp=True, act_fn="gelu"),
    "rotary_partial": dict(positional_embedding_type="rotary", rotary_dim=2, rotary_base=100),
    "grouped_query": dict(n_key_value_heads=2),
    "grouped_query_rotary_rms": dict(
        n_key_value_heads=1, positional_embedding_type="rotary", rotary_dim=2, normalization_type="RMS"
    ),
    # the native model computes its blocks sequentially whatever parallel_attn_mlp says: the converted model
    # must compute what the bridge computes
    "parallel_flag": dict(parallel_attn_mlp=True),
    "attn_only": dict(attn_only=True),
    "no_norm": dict(normalization_type=None),
    "hook_flags": dict(use_attn_result=True, use_split_qkv_input=True),
}


def _bridge(kw: dict, dtype=torch.float64):
    cfg = TransformerBridgeConfig(**{**BASE, **kw})
    b = TransformerBridge.boot_native(cfg, dtype=dtype)
    # non-trivial biases and norm weights (the native init sets them to 0 / 1)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in b.original_model.named_parameters():
            if n.endswith("bias") or ".ln" in n or n.startswith("ln"):
                p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return b.eval()


def _tokens(batch: int, pos: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, pos), generator=torch.Generator().manual_seed(seed))


def _convert(b):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pp.from_hf(b)


def _metric_at_last(logits: torch.Tensor, answer: torch.Tensor, wrong: torch.Tensor) -> torch.Tensor:
    last = logits[:, -1]
    return last.gather(1, answer[:, None])[:, 0] - last.gather(1, wrong[:, None])[:, 0]


ANSWER, WRONG = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_converted_logits_and_loss_equal_the_bridges_own(name):
    b = _bridge(CONFIGS[name])
    conv = _convert(b)
    toks = _tokens(3, 10, 0)
    with torch.no_grad():
        ref = b(toks, return_type="logits")
        mine = conv(toks)
        assert mine.shape == ref.shape
        torch.testing.assert_close(mine, ref, rtol=0, atol=1e-10 * ref.abs().max().item())
        loss_tl = b(toks, return_type="loss")
        per_tok = conv(toks, return_type="per_token_loss")
        torch.testing.assert_close(per_tok.mean(), loss_tl, rtol=1e-12, atol=0)


@pytest.mark.parametrize("norm", ["LNPre", "RMSPre"])
def test_parameter_free_norms_convert_in_float32_and_are_refused_by_name_in_float64(norm):
    b = _bridge(dict(normalization_type=norm), dtype=torch.float32)
    toks = _tokens(2, 9, 1)
    with torch.no_grad():
        ref = b(toks, return_type="logits")
        torch.testing.assert_close(_convert(b)(toks), ref, rtol=0, atol=1e-5 * ref.abs().max().item())
    with pytest.raises(UnsupportedModelError, match="normalization_type"):
        pp.from_hf(_bridge(dict(normalization_type=norm)))


@pytest.mark.parametrize(
    "kw, option",
    [
        (dict(d_vocab_out=19), "d_vocab_out"),
        (dict(final_rms=True), "final_rms"),
        (dict(act_fn="solu_ln"), "act_fn"),
    ],
)
def test_options_the_model_cannot_represent_are_refused_by_name(kw, option):
    b = _bridge(kw)
    with pytest.raises(UnsupportedModelError, match=option):
        pp.from_hf(b)
    clean, corrupted = _tokens(3, 6, 2), _tokens(3, 6, 3)
    with pytest.raises(UnsupportedModelError, match=option):  # the estimators convert on the way in
        pp.activation_patching(b, "z", clean, corrupted, metric=pp.KL(), quiet=True)


@pytest.mark.parametrize("name", ["layernorm_gelu", "grouped_query_rotary_rms"])
def test_processed_weights_convert_to_the_bridges_processed_forward(name):
    """process_weights() folds the norms, centres the writing weights and the unembedding and folds the value
    biases in place: the converted model computes the processed bridge's forward, and the estimators that convert on
    the way in score the processed function (edge attribution's metrics are the bridge's own; its scores those of
    the unprocessed bridge, which computes the same function up to the processing's rounding)."""
    plain, b = _bridge(CONFIGS[name]), _bridge(CONFIGS[name])
    b.process_weights()
    toks = _tokens(3, 10, 0)
    with torch.no_grad():
        ref = b(toks, return_type="logits")
        assert not torch.allclose(ref, plain(toks, return_type="logits"), rtol=0, atol=1e-8)  # centred logits
        torch.testing.assert_close(_convert(b)(toks), ref, rtol=0, atol=1e-10 * ref.abs().max().item())
    clean, corrupted = _tokens(3, 6, 2), _tokens(3, 6, 3)
    metric = pp.LogitDiff(ANSWER, WRONG)
    scores = circuits.edge_attribution(b, clean, corrupted, metric=metric)
    with torch.no_grad():
        torch.testing.assert_close(
            scores.m_clean, _metric_at_last(b(clean), ANSWER, WRONG), rtol=1e-9, atol=1e-9
        )
    unprocessed = circuits.edge_attribution(plain, clean, corrupted, metric=metric)
    assert scores.values.abs().max() > 1e-2  # edges with weight: the comparison below is not of zeros
    torch.testing.assert_close(scores.values, unprocessed.values, rtol=0, atol=1e-6)


PATCH_CONFIGS = ["layernorm_gelu", "grouped_query_rotary_rms", "gated_silu_rms", "attn_only", "no_norm"]


@pytest.mark.parametrize("name", PATCH_CONFIGS)
def test_patching_grid_entries_equal_a_patch_through_the_bridges_hooks(name):
    b = _bridge(CONFIGS[name])
    clean, corrupted = _tokens(3, 6, 2), _tokens(3, 6, 3)
    metric = pp.LogitDiff(ANSWER, WRONG)
    z = pp.activation_patching(b, "z", clean, corrupted, metric=metric, quiet=True)
    resid = pp.activation_patching(b, "resid_pre", clean, corrupted, metric=metric, quiet=True)
    kv = pp.activation_patching(b, "v", clean, corrupted, metric=metric, quiet=True)
    assert z.axes == ("layer", "head", "pos") and resid.axes == ("layer", "pos")
    with torch.no_grad():
        _, cache = b.run_with_cache(clean)
        m_clean = _metric_at_last(b(clean), ANSWER, WRONG)
        m_corr = _metric_at_last(b(corrupted), ANSWER, WRONG)
    torch.testing.assert_close(z.clean, m_clean, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(z.corrupted, m_corr, rtol=1e-9, atol=1e-9)

    def patched(hook_name, index):
        def fn(act, hook):
            act = act.clone()
            act[index] = cache[hook_name][index]
            return act

        with torch.no_grad():
            out = b.run_with_hooks(corrupted, fwd_hooks=[(hook_name, fn)])
        return _metric_at_last(out, ANSWER, WRONG)

    n_kv = CONFIGS[name].get("n_key_value_heads", BASE["n_heads"])
    for layer, head, pos in [(0, 1, 2), (1, 3, 5), (1, 0, 0)]:
        want = patched(f"blocks.{layer}.attn.hook_z", (slice(None), pos, head))
        torch.testing.assert_close(z.values[:, layer, head, pos], want, rtol=1e-9, atol=1e-9)
        want = patched(f"blocks.{layer}.hook_resid_pre", (slice(None), pos))
        torch.testing.assert_close(resid.values[:, layer, pos], want, rtol=1e-9, atol=1e-9)
        kv_head = head % n_kv  # the key/value heads (as in TransformerLens' hook_v)
        want = patched(f"blocks.{layer}.attn.hook_v", (slice(None), pos, kv_head))
        torch.testing.assert_close(kv.values[:, layer, kv_head, pos], want, rtol=1e-9, atol=1e-9)


def _grads_through_hooks(b, tokens, names):
    """Activations at ``names`` on a run of ``tokens`` and the gradient of the summed metric with respect to them,
    read through the bridge's own hook points."""
    acts = {}

    def keep(name):
        def fn(act, hook):
            act = act.clone()  # the gradient of what reads the hook point's output only
            act.retain_grad()
            acts[name] = act
            return act

        return fn

    logits = b.run_with_hooks(tokens, fwd_hooks=[(n, keep(n)) for n in names])
    _metric_at_last(logits, ANSWER, WRONG).sum().backward()
    return {n: (acts[n].detach(), acts[n].grad.detach()) for n in names}


@pytest.mark.parametrize("name", ["layernorm_gelu", "grouped_query_rotary_rms", "gated_gelu_ln"])
def test_attribution_patching_equals_activation_difference_dot_gradient_through_the_bridge(name):
    b = _bridge(CONFIGS[name])
    clean, corrupted = _tokens(3, 6, 2), _tokens(3, 6, 3)
    atp = pp.attribution_patching(
        b, clean, corrupted, metric=pp.LogitDiff(ANSWER, WRONG), sites=["z", "resid_pre", "mlp_out"]
    )
    L = BASE["n_layers"]
    names = (
        [f"blocks.{i}.attn.hook_z" for i in range(L)]
        + [f"blocks.{i}.hook_resid_pre" for i in range(L)]
        + [f"blocks.{i}.hook_mlp_out" for i in range(L)]
    )
    with torch.no_grad():
        _, clean_cache = b.run_with_cache(clean)
    got = _grads_through_hooks(b, corrupted, names)  # denoising: the gradient on the corrupted run
    with torch.no_grad():
        m_corr = _metric_at_last(b(corrupted), ANSWER, WRONG)
    for i in range(L):
        act, grad = got[f"blocks.{i}.attn.hook_z"]
        want = m_corr[:, None, None] + ((clean_cache[f"blocks.{i}.attn.hook_z"] - act) * grad).sum(
            -1
        ).transpose(1, 2)
        torch.testing.assert_close(atp["z"].values[:, i], want, rtol=1e-8, atol=1e-10)
        for site, hook in (("resid_pre", "hook_resid_pre"), ("mlp_out", "hook_mlp_out")):
            act, grad = got[f"blocks.{i}.{hook}"]
            want = m_corr[:, None] + ((clean_cache[f"blocks.{i}.{hook}"] - act) * grad).sum(-1)
            torch.testing.assert_close(atp[site].values[:, i], want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", ["layernorm_gelu", "gated_silu_rms", "grouped_query_rotary_rms"])
def test_eap_scores_into_mlps_and_logits_equal_a_computation_through_the_bridges_hooks(name):
    """EAP (mode="noise": the gradient at the clean run) of every edge into an MLP or the logits against
    ``(A_u(corrupted) - A_u(clean)) . dM/d(input of v)``, with the outputs ``A_u`` read at the bridge's hooks
    (a head's from its ``hook_z`` and its slice of the output projection) and the input gradients at the norms'
    inputs, which only that destination reads."""
    b = _bridge(CONFIGS[name])
    clean, corrupted = _tokens(3, 6, 2), _tokens(3, 6, 3)
    es = circuits.edge_attribution(b, clean, corrupted, metric=pp.LogitDiff(ANSWER, WRONG), method="eap")
    L, H, dh = BASE["n_layers"], BASE["n_heads"], BASE["d_head"]
    src_hooks = ["blocks.0.hook_resid_pre"] + [
        f"blocks.{i}.{h}" for i in range(L) for h in ("attn.hook_z", "hook_mlp_out")
    ]
    # the bridge's ln2.hook_in is its hook_resid_mid (the residual stream itself): an MLP's input gradient is the
    # gradient at its norm's output taken back through the bridge's own norm module
    dst_hooks = [f"blocks.{i}.ln2.{h}" for i in range(L) for h in ("hook_in", "hook_out")] + [
        "ln_final.hook_in"
    ]
    clean_run = _grads_through_hooks(b, clean, src_hooks + dst_hooks)
    with torch.no_grad():
        _, corr_cache = b.run_with_cache(corrupted)

    def outputs(get):  # node name -> its output (batch, pos, d_model)
        out = {"embed": get("blocks.0.hook_resid_pre")}
        for i in range(L):
            w_o = b.original_model.layers[i].attn.o.weight.detach()  # (d_model, H * d_head)
            z = get(f"blocks.{i}.attn.hook_z")
            for h in range(H):
                out[f"L{i}H{h}"] = z[:, :, h] @ w_o[:, h * dh : (h + 1) * dh].T
            out[f"MLP{i}"] = get(f"blocks.{i}.hook_mlp_out")
        return out

    a_clean = outputs(lambda n: clean_run[n][0])
    a_corr = outputs(lambda n: corr_cache[n])
    grads = {}
    for i in range(L):
        x = clean_run[f"blocks.{i}.ln2.hook_in"][0].clone().requires_grad_(True)
        (grads[f"MLP{i}"],) = torch.autograd.grad(
            b.blocks[i].ln2(x), x, clean_run[f"blocks.{i}.ln2.hook_out"][1]
        )
    grads["logits"] = clean_run["ln_final.hook_in"][1]
    # the native RMSNorm takes its mean square in float32 (so does the converted model): float32 rounding there
    rms = CONFIGS[name].get("normalization_type") == "RMS"
    rtol, atol = (1e-6, 1e-7) if rms else (1e-8, 1e-10)
    g = es.graph
    checked = 0
    for e in range(es.values.shape[1]):
        src, dst = g.src_names[int(g.src_idx[e])], g.dst_names[int(g.dst_idx[e])]
        if dst not in grads:
            continue
        want = ((a_corr[src] - a_clean[src]) * grads[dst]).sum((-1, -2))
        torch.testing.assert_close(es.values[:, e], want, rtol=rtol, atol=atol)
        checked += 1
    assert checked == (1 + H) + (1 + 2 * H + 1) + (1 + 2 * H + 2)  # into MLP0, MLP1 and the logits


@pytest.mark.parametrize("name", ["layernorm_gelu", "grouped_query_rotary_rms"])
def test_llc_initial_loss_equals_the_bridges_loss(name):
    b = _bridge(CONFIGS[name])
    data = _tokens(16, 8, 4)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = pp.estimate_llc(
            b,
            loader,
            num_chains=1,
            num_draws=2,
            num_burnin_steps=0,
            step_size=1e-7,
            localization=100.0,
            quiet=True,
        )
    with torch.no_grad():
        want = b(data, return_type="loss").item()  # equal batches: the mean of the batch means
    assert res.init_loss == pytest.approx(want, rel=1e-10)
    with torch.no_grad():  # the bridge's weights are left as they were
        assert b(data, return_type="loss").item() == want


def test_gram_of_the_converted_model_equals_per_sample_gradients_of_the_bridge():
    b = _bridge(CONFIGS["gated_silu_rms"])
    toks = _tokens(3, 6, 5)
    conv = _convert(b)
    G = pp.per_sample_grad_gram(conv, lambda m, t: m(t, return_type="per_token_loss").sum(-1), toks)
    params = [p for p in b.parameters() if p.requires_grad]
    rows = []
    for i in range(toks.shape[0]):
        loss = b(toks[i : i + 1], return_type="loss", loss_per_token=True).sum()
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    R = torch.stack(rows)
    torch.testing.assert_close(G, R @ R.T, rtol=1e-10, atol=1e-12)


def test_gram_of_a_bridge_given_directly_is_right_or_refused_naming_from_hf():
    b = _bridge(CONFIGS["layernorm_gelu"])
    toks = _tokens(3, 6, 5)

    def loss_fn(m, t):
        return m(t, return_type="loss", loss_per_token=True).sum(-1)

    try:
        G = pp.per_sample_grad_gram(b, loss_fn, toks)
    except (ValueError, TypeError, UnsupportedModelError) as e:
        assert "from_hf" in str(e), str(e)
        return
    params = [p for p in b.parameters() if p.requires_grad]
    R = torch.stack(
        [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss_fn(b, toks[i : i + 1]).sum(), params)])
            for i in range(3)
        ]
    )
    torch.testing.assert_close(G, R @ R.T, rtol=1e-10, atol=1e-12)


SUSC_KW = dict(
    num_chains=1, num_draws=3, num_burnin_steps=0, step_size=1e-4, localization=100.0, quiet=True, seed=0
)


@pytest.mark.parametrize("component", ["blocks.0.attn.head.1", "blocks.1.mlp"])
def test_susceptibilities_of_a_bridge_take_transformer_lens_component_names(component):
    b = _bridge(CONFIGS["layernorm_gelu"])
    train = [_tokens(8, 6, s) for s in (6, 7)]
    probe = _tokens(3, 6, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = pp.susceptibilities(_convert(b), train, probe, [component], **SUSC_KW)
        try:
            got = pp.susceptibilities(b, train, probe, [component], **SUSC_KW)
        except (ValueError, UnsupportedModelError) as e:
            assert "from_hf" in str(e), str(e)
            return
    torch.testing.assert_close(torch.as_tensor(got.chi), torch.as_tensor(want.chi), rtol=1e-8, atol=1e-12)
