"""Converter edge cases: checkpoints whose index sends a tensor to a pickle file, deep 16-bit models whose rounding
exceeds the check's 16-bit tolerance, models of no layers, config.json's architectures given as one string, and
the converters' error at the top level of the package."""

import copy
import json
import math
import threading

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_convert import CASES, hf_model  # noqa: E402

import pypattern  # noqa: E402
import pypattern.models.convert as convert  # noqa: E402
from pypattern import from_hf, from_pretrained  # noqa: E402
from pypattern.models.convert import UnsupportedModelError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_llama():
    cfg = transformers.LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


def _pickle_behind_an_index(d):
    """A directory whose model.safetensors.index.json maps every tensor to pytorch_model.bin (a pickle), with an
    unrelated .safetensors file beside it."""
    from safetensors.torch import save_file

    hf = _tiny_llama()
    hf.config.save_pretrained(d)
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    torch.save(sd, d / "pytorch_model.bin")
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: "pytorch_model.bin" for k in sd}})
    )
    save_file({"dummy": torch.zeros(1)}, str(d / "extra.safetensors"))
    return list(sd)


@pytest.fixture
def torch_load_spy(monkeypatch):
    """torch.load and torch.serialization.load replaced by spies that record their calls and load nothing."""
    calls = []

    def spy(f, *args, **kwargs):
        calls.append(f)
        raise AssertionError(f"torch.load({f!r}) was called")

    monkeypatch.setattr(torch, "load", spy)
    monkeypatch.setattr(torch.serialization, "load", spy)
    return spy, calls


def test_an_index_that_maps_tensors_to_a_pickle_file_is_refused_naming_the_entry(tmp_path, torch_load_spy):
    spy, calls = torch_load_spy
    first = _pickle_behind_an_index(tmp_path)[0]
    with pytest.raises(UnsupportedModelError) as e:
        from_pretrained(tmp_path)
    assert str(e.value).startswith(
        f"path={str(tmp_path)!r}: model.safetensors.index.json maps weight_map[{first!r}] to 'pytorch_model.bin', "
        "not a .safetensors file"
    )
    assert calls == []
    # an entry naming a .safetensors file the directory does not hold
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: "extra.safetensors" for k in index["weight_map"]}
    index["weight_map"][first] = "model-00002-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        UnsupportedModelError, match=r"weight_map\[.*\] to 'model-00002-of-00002.safetensors', "
    ):
        from_pretrained(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["pytorch_model.bin"]}))
    with pytest.raises(UnsupportedModelError, match="index.json has no weight_map object"):
        from_pretrained(tmp_path)
    assert calls == [] and torch.load is spy and torch.serialization.load is spy


def test_torch_load_refuses_while_transformers_loads_a_checkpoint(tmp_path, torch_load_spy, monkeypatch):
    """Past the index check, any torch.load transformers calls while it loads the checkpoint raises (in the
    loading thread only), so no other path of transformers' unpickles; torch.load is put back after."""
    spy, calls = torch_load_spy
    _pickle_behind_an_index(tmp_path)
    monkeypatch.setattr(convert, "_check_index", lambda path: None)
    with pytest.raises(UnsupportedModelError) as e:
        from_pretrained(tmp_path)
    assert str(e.value) == (
        f"path={str(tmp_path)!r}: loading the checkpoint would unpickle {str(tmp_path / 'pytorch_model.bin')!r} "
        "(torch.load); pypattern reads only safetensors weights: re-save it as safetensors with transformers, "
        "model = AutoModelForCausalLM.from_pretrained(dir) then model.save_pretrained(new_dir), and give new_dir"
    )
    assert calls == [] and torch.load is spy and torch.serialization.load is spy
    # other threads keep the function it replaced
    other = []
    blocked = []
    with convert._no_unpickling("/dir", blocked):
        t = threading.Thread(
            target=lambda: other.append(pytest.raises(AssertionError, torch.load, "elsewhere"))
        )
        t.start()
        t.join()
        with pytest.raises(UnsupportedModelError, match="would unpickle 'here'"):
            torch.load("here")
    assert calls == ["elsewhere"] and blocked == ["here"] and torch.load is spy


def test_a_sharded_safetensors_checkpoint_still_loads(tmp_path):
    hf = hf_model("llama-mqa", dtype=torch.float32)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    x = torch.randint(0, 37, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(from_pretrained(tmp_path)(x), hf(x).logits, atol=1e-5, rtol=0)


def _deep(family: str, dtype: torch.dtype) -> torch.nn.Module:
    """A 16-layer model with random weights of std 4 / sqrt(fan_in): its 16-bit logits round far from any other
    16-bit computation of the same function."""
    cfg = getattr(transformers, f"{family}Config")(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=16, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    m = getattr(transformers, f"{family}ForCausalLM")(cfg).double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 4 / math.sqrt(p.shape[-1]))
            else:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return m.to(dtype).eval()


_CHECK_TOKENS = torch.randint(
    0, 64, (1, 8), generator=torch.Generator().manual_seed(0)
)  # the tokens from_hf runs


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize(
    "family,src,dtype",
    [
        ("Llama", torch.bfloat16, None),  # equal to its eager forward
        (
            "Qwen2",
            torch.bfloat16,
            None,
        ),  # its biased projections round otherwise than in the eager forward too
        ("Llama", torch.float32, torch.bfloat16),  # a float32 model converted to bfloat16
    ],
)
def test_a_deep_16bit_sdpa_model_left_unchanged_verifies(family, src, dtype):
    """The 16-bit check's tolerance (5e-2) is below the rounding of a deep model with sdpa attention: the
    conversion is checked against the model's eager forward, then against float32 copies of both models."""
    hf = _deep(family, src)
    assert hf.config._attn_implementation == "sdpa"
    unchecked = from_hf(hf, dtype=dtype, verify=False)
    with torch.no_grad():
        own = hf(input_ids=_CHECK_TOKENS).logits
        err = _rel(unchecked(_CHECK_TOKENS), own)
    assert (
        err > 2 * convert._VERIFY_TOL_16BIT
    )  # the premise: the model's own forward is farther than the tolerance
    model = from_hf(hf, dtype=dtype)
    assert hf.config._attn_implementation == "sdpa" and hf.model.config._attn_implementation == "sdpa"
    for p, q in zip(model.parameters(), unchecked.parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_deep_16bit_model_changed_after_it_was_built_is_still_refused():
    hf = _deep("Llama", torch.bfloat16)
    for layer in hf.model.layers:
        layer.mlp.act_fn = torch.nn.GELU()
    with pytest.raises(UnsupportedModelError) as e:
        from_hf(hf)
    msg = str(e.value)
    assert "in 16 bits (relative to their largest), and by " in msg
    assert (
        "when float32 copies of both run on the same weights (rounding would be below 0.001): the model "
        in msg
    )
    assert "differs from what its configuration builds" in msg
    assert hf.config._attn_implementation == "sdpa"
    with pytest.raises(UnsupportedModelError, match="differ from the model's own"):  # float32 as before
        from_hf(copy.deepcopy(hf).float())


def test_a_deep_16bit_model_without_float32_copies_is_refused_saying_it_may_be_rounding(monkeypatch):
    monkeypatch.setattr(
        convert, "_float32_copies_error", lambda *a: (None, "OutOfMemoryError: no room for the copies")
    )
    with pytest.raises(UnsupportedModelError) as e:
        from_hf(_deep("Qwen2", torch.bfloat16))
    msg = str(e.value)
    assert msg.startswith(
        "model class 'Qwen2ForCausalLM': the converted model's (bfloat16) logits differ from "
    )
    assert "16-bit rounding is usually below 0.05 but grows with depth" in msg
    assert "could not be run: OutOfMemoryError: no room for the copies). Either this is rounding or " in msg
    assert msg.endswith(
        "Pass verify=False to convert a model built from its configuration and left unchanged"
    )


def _zero_layers(case):
    family, kw = CASES[case]
    kw = dict(kw)
    for k in ("n_layer", "num_hidden_layers", "num_layers"):
        if k in kw:
            kw[k] = 0
            key = k
    for k in ("layer_types", "no_rope_layers"):
        if k in kw:
            kw[k] = []
    if family == "GPTNeo":
        kw["attention_types"] = [[["global"], 0]]
    return hf_model(case, **kw), key


_ONE_PER_FAMILY = list({fam: case for case, (fam, _) in reversed(CASES.items())}.values())


@pytest.mark.parametrize("case", _ONE_PER_FAMILY)
def test_a_model_of_no_layers_is_refused_naming_the_config_key(case):
    hf, key = _zero_layers(case)
    with torch.no_grad():
        assert hf(torch.arange(5)[None]).logits.shape[-1] == 37  # Hugging Face builds and runs it
    with pytest.raises(UnsupportedModelError) as e:
        from_hf(hf)
    assert str(e.value) == (
        f"{key}=0 is not supported: pypattern's Transformer has at least one layer (a model of none is its "
        "embedding and unembedding alone); give a model of one layer or more"
    )


def test_no_layers_cases_cover_gpt2_neox_and_llama():
    assert {CASES[c][0] for c in _ONE_PER_FAMILY} >= {"GPT2", "GPTNeoX", "Llama"}
    assert _zero_layers("gpt2-tied")[1] == "n_layer"


def test_architectures_given_as_one_class_name_loads(tmp_path):
    hf = _tiny_llama()
    hf.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    config["architectures"] = "LlamaForCausalLM"
    path.write_text(json.dumps(config))
    x = torch.randint(0, 50, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(from_pretrained(tmp_path)(x), hf(x).logits, atol=1e-5, rtol=0)
    for bad in (7, {"LlamaForCausalLM": 1}, ["LlamaForCausalLM", 3]):
        config["architectures"] = bad
        path.write_text(json.dumps(config))
        with pytest.raises(ValueError) as e:
            from_pretrained(tmp_path)
        assert str(e.value) == (
            f"path={str(tmp_path)!r}: config.json's architectures={bad!r} is not valid; a list of class names such "
            "as ['LlamaForCausalLM'] was expected"
        )


def test_unsupported_model_error_is_exported_at_the_top_level():
    assert pypattern.UnsupportedModelError is pypattern.models.UnsupportedModelError
    assert pypattern.UnsupportedModelError is UnsupportedModelError
    assert "UnsupportedModelError" in pypattern.__all__
