"""refined_llc against independent estimate_llc runs: on pypattern's Transformer (components given as names, masks
and lists of parameter names) and on an unconverted grouped-query Llama (components="heads"), every row's numbers
(per chain, mean, std, standard error, L_n(w*), R-hat, ESS) equal estimate_llc restricted to that component's
masks with the same seed, and num_params is the component's entry count; batched and sequential chains agree;
a seed reproduces its numbers; bad component lists are refused naming the argument."""

import warnings

import numpy as np
import pytest
import torch

from pypattern.models.transformer import Transformer, TransformerConfig, component_masks
from pypattern.sampling import estimate_llc, refined_llc

KW = dict(
    num_chains=2,
    num_draws=6,
    step_size=1e-3,
    localization=100.0,
    nbeta=10.0,
    seed=7,
    quiet=True,
    warn_nonstationary=False,
)
FIELDS = ("llc_mean", "llc_std", "llc_se", "init_loss", "r_hat", "ess")


def _transformer():
    cfg = TransformerConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=16, d_vocab=11, n_ctx=6, seed=0)
    model = Transformer(cfg)
    g = torch.Generator().manual_seed(0)
    return model, [torch.randint(0, 11, (4, 6), generator=g) for _ in range(3)]


def _check_rows_against_estimate_llc(model, loader, res, masks_of, batched, exact):
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for i, name in enumerate(res.component):
        mk = None if name == "full" else masks_of[name]
        alone = estimate_llc(
            model, loader, restrict_to=None if mk is None else list(mk), masks=mk, batched=batched, **KW
        )
        tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(res.llc_per_chain[i], alone.llc_per_chain, **tol, err_msg=name)
        for f in FIELDS:
            np.testing.assert_allclose(getattr(res, f)[i], getattr(alone, f), **tol, err_msg=f"{name} {f}")
        # the fields are those of the chains: mean and std (ddof=1) over the per-chain estimates
        assert res.llc_mean[i] == pytest.approx(res.llc_per_chain[i].mean(), rel=1e-12, abs=1e-12)
        assert res.llc_std[i] == pytest.approx(res.llc_per_chain[i].std(ddof=1), rel=1e-9, abs=1e-12)
        want_n = total if mk is None else sum(int(torch.as_tensor(v).bool().sum()) for v in mk.values())
        assert res.num_params[i] == want_n, name


def test_transformer_rows_equal_estimate_llc_for_names_masks_and_parameter_lists():
    model, loader = _transformer()
    params = dict(model.named_parameters())
    half = torch.zeros_like(params["blocks.0.mlp.W_in"], dtype=torch.bool)
    half[:, :3] = True  # 3 of the 16 hidden units' input weights
    comps = {
        "head0": "blocks.0.attn.head.0",
        "mlp_in_part": {"blocks.0.mlp.W_in": half},
        "unembed_and_ln": ["unembed.W_U", "ln_final.w"],
    }
    masks_of = {
        "head0": component_masks(model, "blocks.0.attn.head.0"),
        "mlp_in_part": {"blocks.0.mlp.W_in": half},
        "unembed_and_ln": {k: torch.ones_like(params[k], dtype=torch.bool) for k in comps["unembed_and_ln"]},
    }
    assert sum(int(v.sum()) for v in masks_of["head0"].values()) < sum(
        params[k].numel() for k in masks_of["head0"]
    )  # a head is a slice of its layer's weights, not whole tensors
    out = {}
    for batched in (True, False):
        res = refined_llc(model, loader, components=comps, batched=batched, **KW)
        assert res.component == ["full", *comps] and res.data == ["train"] * 4
        assert list(res.num_params[2:]) == [
            8 * 3,
            8 * 11 + 8,
        ]  # mask entries; W_U (8, 11) and ln_final.w (8,)
        _check_rows_against_estimate_llc(model, loader, res, masks_of, batched, exact=not batched)
        out[batched] = res
    # batched and sequential chains: the same numbers up to float32 summation order
    np.testing.assert_allclose(out[True].llc_per_chain, out[False].llc_per_chain, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out[True].init_loss, out[False].init_loss, rtol=1e-12)


def test_unconverted_grouped_query_llama_heads_equal_estimate_llc_with_their_masks():
    transformers = pytest.importorskip("transformers")
    from pypattern.models.hf_masks import hf_component_masks, hf_components

    cfg = transformers.LlamaConfig(
        vocab_size=13,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(0)
    loader = [torch.randint(0, 13, (2, 6), generator=g) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = refined_llc(m, loader, components="heads", batched=False, **KW)
    names = hf_components(m, heads=True)
    assert res.component == ["full", *names]
    assert {"blocks.0.attn.head.3", "blocks.0.attn.kv_head.1"} <= set(names)
    masks_of = {c: hf_component_masks(m, c) for c in names}
    # a query head: its 4 rows of q_proj (16 wide) and 4 columns of o_proj; a key/value head: 4 rows of k and v
    assert sum(int(v.sum()) for v in masks_of["blocks.0.attn.head.3"].values()) == 2 * 4 * 16
    assert sum(int(v.sum()) for v in masks_of["blocks.0.attn.kv_head.1"].values()) == 2 * 4 * 16
    _check_rows_against_estimate_llc(m, loader, res, masks_of, batched=False, exact=True)


def test_a_seed_reproduces_its_numbers_and_another_seed_differs():
    model, loader = _transformer()
    kw = dict(KW, num_draws=4)
    kw.pop("seed")
    comps = ["embed", "blocks.0.attn.head.1"]
    a = refined_llc(model, loader, components=comps, seed=1, **kw)
    b = refined_llc(model, loader, components=comps, seed=1, **kw)
    c = refined_llc(model, loader, components=comps, seed=2, **kw)
    np.testing.assert_array_equal(a.llc_per_chain, b.llc_per_chain)
    assert not np.allclose(a.llc_per_chain, c.llc_per_chain)
    # the model is left at w*
    fresh, _ = _transformer()
    for (n, p), q in zip(model.named_parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q), n


@pytest.mark.parametrize(
    ("components", "error", "match"),
    [
        ([], ValueError, "components is empty"),
        ({}, ValueError, "components is empty"),
        (iter([]), ValueError, "components is empty"),
        (["blocks.0.nosuch"], ValueError, r"component='blocks.0.nosuch' matches no parameter"),
        (["blocks.0.attn.head.7"], ValueError, r"component='blocks.0.attn.head.7': head 7 is out of range"),
        (["embed", "embed"], ValueError, "components must have distinct names"),
        ({"full": "embed"}, ValueError, "components must have distinct names other than 'full'"),
        ([None], TypeError, "component 'component_0': expected a name"),
        (3, TypeError, "components=3 is not valid"),
        ("head", ValueError, "components='head'"),
    ],
)
def test_bad_component_lists_are_refused_naming_the_argument(components, error, match):
    model, loader = _transformer()
    with pytest.raises(error, match=match):
        refined_llc(model, loader, components=components, **KW)


@pytest.mark.parametrize("key", ["runs", "restrict_to", "masks"])
def test_sampler_restrictions_are_refused_as_components_set_them(key):
    model, loader = _transformer()
    with pytest.raises(ValueError, match=f"{key} is set by refined_llc"):
        refined_llc(model, loader, components=["embed"], **{key: None}, **KW)
