"""Bring-your-own-model review: estimators on a Hugging Face model left in train() mode with dropout (the quantities
at w* read the same eval-mode forward as the draws), norm and layer-index component names meaning the same on the
HF model and its converted copy, pp.tasks.train on an unconverted HF model, and devinterp's None masks."""

import warnings

import numpy as np
import pytest
import torch

import pypattern as pp
from pypattern.models.hf import HAS_TRANSFORMERS

pytestmark = [
    pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed"),
    pytest.mark.usefixtures("one_thread"),
]

V = 64


def _gpt2_with_dropout():
    import transformers as tr

    torch.manual_seed(0)
    cfg = tr.GPT2Config(
        vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
    )  # dropout 0.1 by default
    return tr.GPT2LMHeadModel(cfg).double()


_SETTINGS = dict(num_chains=2, num_draws=6, step_size=1e-5, localization=1e3, nbeta=10.0, seed=1, quiet=True)


@pytest.mark.parametrize("convention", ["devinterp", "physics"])
def test_chi_of_a_train_mode_model_with_dropout_equals_the_eval_mode_models_bit_for_bit(convention):
    # phi(w*) and the probe losses at w* were computed with dropout on (before the sampler's switch to eval mode):
    # the devinterp chi (which subtracts phi(w*)) came out several times too large, with flipped signs, and depended
    # on torch's global random state
    hf = _gpt2_with_dropout()
    data = torch.randint(0, V, (8, 10), generator=torch.Generator().manual_seed(0))
    comps = ["blocks.0.attn.head.1", "blocks.1.mlp"]

    def chi(train: bool, rng: int) -> tuple[np.ndarray, np.ndarray]:
        hf.train(train)
        torch.manual_seed(rng)  # only dropout reads torch's global random state
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = pp.susceptibilities(hf, [data], data[:2], comps, convention=convention, **_SETTINGS)
        dropout = [w for w in caught if "has dropout" in str(w.message)]
        assert len(dropout) == (1 if train else 0), [
            str(w.message) for w in dropout
        ]  # warned once, not twice
        assert hf.training == train  # the mode is restored
        return res.chi, res.phi_mean

    e = chi(False, 0)
    for rng in (0, 1):
        got = chi(True, rng)
        np.testing.assert_array_equal(got[0], e[0])
        np.testing.assert_array_equal(
            got[1], e[1]
        )  # phi(w*) added back: bit for bit only when it is the same


def test_bif_of_a_train_mode_model_with_dropout_equals_the_eval_mode_models():
    hf = _gpt2_with_dropout()
    data = torch.randint(0, V, (8, 10), generator=torch.Generator().manual_seed(0))
    out = {}
    for train in (False, True):
        hf.train(train)
        torch.manual_seed(int(train))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out[train] = pp.bif(hf, [data], data[:2], **_SETTINGS)
    np.testing.assert_array_equal(out[True].bif, out[False].bif)
    np.testing.assert_array_equal(out[True].loss_mean, out[False].loss_mean)


def _norm_models():
    import transformers as tr

    small = dict(
        vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24
    )
    none = dict(eos_token_id=None, bos_token_id=None, pad_token_id=None)
    return {
        "phi": lambda: tr.PhiForCausalLM(tr.PhiConfig(**small)),
        "gptj": lambda: tr.GPTJForCausalLM(
            tr.GPTJConfig(vocab_size=V, n_embd=16, n_layer=2, n_head=2, rotary_dim=4)
        ),
        "stablelm_parallel": lambda: tr.StableLmForCausalLM(
            tr.StableLmConfig(**small, num_key_value_heads=2, use_parallel_residual=True)
        ),
        "olmo2": lambda: tr.Olmo2ForCausalLM(tr.Olmo2Config(**small, **none)),
        "gemma2": lambda: tr.Gemma2ForCausalLM(tr.Gemma2Config(**small, head_dim=8, num_key_value_heads=1)),
        "llama": lambda: tr.LlamaForCausalLM(tr.LlamaConfig(**small)),
    }


# the norms each block has, by the converted model's names
_NORMS = {
    "phi": ["ln1"],
    "gptj": ["ln1"],
    "stablelm_parallel": ["ln1"],
    "olmo2": ["ln1_post", "ln2_post"],
    "gemma2": ["ln1", "ln2", "ln1_post", "ln2_post"],
    "llama": ["ln1", "ln2"],
}


@pytest.mark.parametrize("arch", list(_NORMS))
def test_norm_component_names_mean_the_same_on_the_hf_model_and_its_converted_copy(arch):
    # Phi-1/2 and GPT-J's HF 'ln2' selected ln1's weights (two identical chi rows); OLMo 2's HF 'ln1' / 'ln2'
    # selected the norms after the attention / MLP, which the converted model calls ln1_post / ln2_post
    hf = _norm_models()[arch]().eval()
    conv = pp.from_hf(hf)
    hf_params = dict(hf.named_parameters())
    for norm in ("ln1", "ln2", "ln1_post", "ln2_post"):
        comp = f"blocks.1.{norm}"
        if norm in _NORMS[arch]:
            got, want = pp.component_masks(hf, comp), pp.component_masks(conv, comp)
            assert sorted(int(m.sum()) for m in got.values()) == sorted(int(m.sum()) for m in want.values())
            assert all(".layers.1." in n or ".h.1." in n for n in got)
            if arch == "olmo2":  # the norm after the attention / after the MLP
                which = "post_attention_layernorm" if norm == "ln1_post" else "post_feedforward_layernorm"
                assert list(got) == [f"model.layers.1.{which}.weight"]
            if arch == "gemma2":
                which = {"ln1": "input", "ln2": "pre_feedforward", "ln1_post": "post_attention"}
                which = which.get(norm, "post_feedforward")
                assert list(got) == [f"model.layers.1.{which}_layernorm.weight"]
            # a norm's weights are selected by one name only
            others = [pp.component_masks(hf, f"blocks.1.{o}") for o in _NORMS[arch] if o != norm]
            assert all(not set(got) & set(o) for o in others)
            assert set(got) <= set(hf_params)
            continue
        msgs = []
        for m in (hf, conv):
            with pytest.raises(ValueError, match="matches no parameter") as e:
                pp.component_masks(m, comp)
            msgs.append(str(e.value))
        assert msgs[0] == msgs[1]  # the same refusal on both forms
        if _NORMS[arch] == ["ln1"] and norm == "ln2":
            assert "one norm, ln1" in msgs[0] and "'blocks.1.ln1'" in msgs[0]
        if arch == "olmo2":
            assert "'blocks.1.ln1_post'" in msgs[0] and "'blocks.1.ln2_post'" in msgs[0]


def _llama():
    import transformers as tr

    cfg = tr.LlamaConfig(
        vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=24,
    )  # fmt: skip
    return tr.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize(
    "comp, canonical",
    [
        ("blocks.00.attn.head.1", "blocks.0.attn.head.1"),
        ("blocks.1.attn.head.001", "blocks.1.attn.head.1"),
        ("blocks.01.attn.kv_head.01", "blocks.1.attn.kv_head.1"),
        ("blocks.00.mlp", "blocks.0.mlp"),
        ("blocks.01", "blocks.1"),
        ("blocks.0.ln01", None),
    ],
)
def test_indices_with_leading_zeros_are_refused_on_both_forms_naming_the_canonical_spelling(comp, canonical):
    # 'blocks.00.attn.head.1' was layer 0 on the HF model and "no parameter blocks.00.attn.W_Q" on the converted
    # one; 'head.001' was head 1 on both
    hf = _llama()
    for m in (hf, pp.from_hf(hf)):
        if canonical is None:  # digits inside a word are no index
            with pytest.raises(ValueError, match="matches no parameter"):
                pp.component_masks(m, comp)
            continue
        with pytest.raises(ValueError, match="leading zeros") as e:
            pp.component_masks(m, comp)
        assert repr(canonical) in str(e.value) and repr(comp) in str(e.value)
        pp.component_masks(m, canonical)  # the canonical spelling is accepted


def test_a_parameter_name_of_ones_own_with_a_zero_padded_part_is_still_a_prefix():
    net = torch.nn.Module()
    net.layers = torch.nn.ModuleDict({"00": torch.nn.Linear(2, 2), "01": torch.nn.Linear(2, 2)})
    assert sorted(pp.component_masks(net, "layers.01")) == ["layers.01.bias", "layers.01.weight"]


def test_tasks_train_reads_the_logits_of_an_unconverted_hf_model():
    # failed deep inside with "'CausalLMOutputWithPast' object has no attribute 'transpose'"
    import copy

    import transformers as tr

    topics = pp.TopicTask(num_topics=2, tokens_per_topic=8, seq_len=12)
    d_vocab = topics.model_config(n_layers=1, d_model=16, n_heads=2, d_mlp=32, seed=0).d_vocab
    cfg = tr.LlamaConfig(
        vocab_size=d_vocab, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = tr.LlamaForCausalLM(cfg)
    hooked = pp.hooked_hf(copy.deepcopy(hf))
    got = pp.tasks.train(hf, topics, steps=4, batch_size=8, seed=0, log_every=1)
    want = pp.tasks.train(hooked, topics, steps=4, batch_size=8, seed=0, log_every=1)
    assert got.losses == want.losses  # the same training as through the hooked wrapper (logits in a tensor)
    batch = topics.sample(8, seed=3)
    assert topics.accuracy(hf, batch) == topics.accuracy(hooked, batch)


def test_a_devinterp_none_mask_is_refused_saying_what_none_means_and_what_to_give():
    # was "must be boolean (or 0/1 values); it has other values" for a value that is None
    from pypattern.devinterp import create_param_masks

    hf = _llama()
    data = torch.randint(0, V, (4, 6), generator=torch.Generator().manual_seed(0))
    masks = create_param_masks(hf, "l1 mlp")
    assert set(masks.values()) == {None}
    for call in (
        lambda: pp.susceptibilities(hf, [data], data[:2], {"mlp": masks}, **_SETTINGS),
        lambda: pp.estimate_llc(hf, [data], masks=masks, **_SETTINGS),  # refused there too: the rules agree
    ):
        with pytest.raises((ValueError, TypeError), match="None") as e:
            call()
        assert "other values" not in str(e.value)
    with pytest.raises(ValueError, match="create_param_masks writes for 'the whole parameter'") as e:
        pp.susceptibilities(hf, [data], data[:2], {"mlp": masks}, **_SETTINGS)
    assert "list of parameter names" in str(e.value) and "torch.ones_like" in str(e.value)
    # what the message says to give is taken: the parameters' names, or all-True masks
    names = list(masks)
    ones = {n: torch.ones_like(p, dtype=torch.bool) for n, p in hf.named_parameters() if n in masks}
    a = pp.susceptibilities(hf, [data], data[:2], {"mlp": names}, **_SETTINGS).chi
    b = pp.susceptibilities(hf, [data], data[:2], {"mlp": ones}, **_SETTINGS).chi
    np.testing.assert_array_equal(a, b)


def test_not_a_mask_says_why():
    from pypattern._masks import not_a_mask, zero_one_mask

    assert zero_one_mask(None) is None and "None" in not_a_mask(None)
    assert zero_one_mask("all") is None and not_a_mask("all") == "it is a str, not a mask"
    assert (
        zero_one_mask(torch.full((2,), 0.5)) is None
        and not_a_mask(torch.full((2,), 0.5)) == "it has other values"
    )


def test_llc_estimators_explain_a_devinterp_none_mask():
    """estimate_llc and refined_llc, given devinterp's None for a whole parameter, say what None means there and
    what to pass, as susceptibilities does."""
    import torch.nn as nn
    from torch.utils.data import DataLoader, TensorDataset

    model = nn.Linear(2, 1)
    data = DataLoader(TensorDataset(torch.randn(8, 2), torch.randn(8, 1)), batch_size=4)
    with pytest.raises(TypeError, match="create_param_masks writes for 'the whole parameter'"):
        pp.estimate_llc(model, data, masks={"weight": None}, num_chains=1, num_draws=2, quiet=True)
    with pytest.raises(ValueError, match="create_param_masks writes for 'the whole parameter'"):
        pp.refined_llc(model, data, components={"w": {"weight": None}}, num_chains=1, num_draws=2, quiet=True)


@pytest.mark.parametrize("cores", [1, 2])
def test_chains_batched_over_sdpa_attention_give_no_batching_rule_warning_other_warnings_show(cores):
    # Hugging Face's default sdpa attention has no batching rule under vmap on the CPU: torch runs it chain by
    # chain and warned at every call (every trial of step_size="auto" again); the run leaves that warning out,
    # in every group's thread, and only while it runs
    import transformers as tr

    from pypattern.sampling import NonStationaryWarning, sample
    from pypattern.sampling.runner import _NO_BATCHING_RULE

    torch.manual_seed(0)
    cfg = tr.GPTNeoXConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32, rotary_pct=0.5, attn_implementation="sdpa",
    )  # fmt: skip
    hf = tr.GPTNeoXForCausalLM(cfg).eval()
    assert hf.config._attn_implementation == "sdpa"
    data = [torch.randint(0, V, (4, 8)) for _ in range(2)]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        r = sample(hf, data, num_chains=4, num_draws=4, num_burnin_steps=0, step_size=1e-5, localization=1e3,
                   seed=1, cores=cores, quiet=True)  # fmt: skip
        warnings.warn(_NO_BATCHING_RULE + "aten::an_op_of_ones_own", UserWarning, stacklevel=1)  # shown
    assert all(res.batched for res in (r if isinstance(r, list) else [r]))
    texts = [str(w.message) for w in seen]
    assert [t for t in texts if "batching rule" in t] == [_NO_BATCHING_RULE + "aten::an_op_of_ones_own"]
    # the run's own warnings still reach the caller: 4 draws of 4 chains are too few to call stationary
    assert any(issubclass(w.category, NonStationaryWarning) for w in seen), texts
