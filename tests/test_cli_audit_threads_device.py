"""``--threads N`` and ``--device DEV`` of every command that computes: the computation runs on N threads and on
the device named, and a device that does not exist here is refused naming ``--device``."""

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from pypattern.cli import main  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

V = 23


class Reached(Exception):
    """Raised by a recording stand-in: the command got as far as its computation (not an error it reports)."""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_threads")
    cfg = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d / "llama", safe_serialization=True)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, V, size=(4, 5))
    np.save(d / "tokens.npy", tokens)
    corrupted = tokens.copy()
    corrupted[:, 1] = (corrupted[:, 1] + 3) % V
    np.savez(d / "prompts.npz", clean=tokens, corrupted=corrupted, answer=tokens[:, 0])
    return d


#: per command: the module attribute it computes through (looked up at call time), and the arguments of a run on
#: the local model
COMPUTES = {
    "llc": ("pypattern.sampling", "estimate_llc", ["--num-chains", "1", "--num-draws", "2"]),
    "chi": ("pypattern.susceptibility", "susceptibilities", ["--num-chains", "1", "--num-draws", "2"]),
    "patch": ("pypattern.patching", "activation_patching", ["--sites", "resid_pre"]),
    "circuit": ("pypattern.circuits.api", "edge_attribution", ["--methods", "eap"]),
}


def _record(monkeypatch, module: str, name: str) -> dict:
    """Replace ``module.name`` by a stand-in recording torch's thread count and the model's device, then stopping
    the command."""
    import importlib

    seen = {}

    def stand_in(model, *args, **kwargs):
        seen["threads"] = torch.get_num_threads()
        seen["device"] = next(model.parameters()).device
        raise Reached

    monkeypatch.setattr(importlib.import_module(module), name, stand_in)
    return seen


def _model_run(files, cmd, tmp_path, *extra):
    data = files / ("prompts.npz" if cmd == "circuit" else "tokens.npy")
    args = [cmd, "--model", str(files / "llama"), "--data", str(data), "--out", str(tmp_path / "out")]
    return [*args, "--quiet", *COMPUTES[cmd][2], *extra]


@pytest.mark.parametrize("cmd", sorted(COMPUTES))
def test_threads_reach_the_computation(files, tmp_path, monkeypatch, cmd):
    before = torch.get_num_threads()
    seen = _record(monkeypatch, *COMPUTES[cmd][:2])
    with pytest.raises(Reached):
        main(_model_run(files, cmd, tmp_path, "--threads", "2"))
    assert seen["threads"] == 2
    assert torch.get_num_threads() == before  # the caller's count back after the command


@pytest.mark.parametrize("cmd", sorted(COMPUTES))
def test_default_threads_are_torchs_own(files, tmp_path, monkeypatch, cmd):
    """Without --threads a run on a local model keeps torch's count (it was pinned to 1 by ``circuit``)."""
    seen = _record(monkeypatch, *COMPUTES[cmd][:2])
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(Reached):
            main(_model_run(files, cmd, tmp_path))
    finally:
        torch.set_num_threads(old)
    assert seen["threads"] == 2


@pytest.mark.parametrize(
    "argv, module, name",
    [
        (["llc", "--quick"], "pypattern.experiments.llc_demo", "estimate_llc"),
        (["patch", "--quick"], "pypattern.patching", "activation_patching"),
        (["circuit", "--quick"], "pypattern.circuits.experiments", "run_induction_circuit"),
        (["demo", "--quick"], "pypattern.experiments.llc_demo", "estimate_llc"),
    ],
)
def test_threads_override_the_demos_own_count(tmp_path, monkeypatch, argv, module, name):
    """The built-in demos pin one thread of their own; --threads N runs them on N."""
    import importlib

    seen = {}

    def stand_in(*args, **kwargs):
        seen["threads"] = torch.get_num_threads()
        raise Reached

    monkeypatch.setattr(importlib.import_module(module), name, stand_in)
    with pytest.raises(Reached):
        main([*argv, "--out", str(tmp_path / "out"), "--threads", "2"])
    assert seen["threads"] == 2


def test_bad_thread_counts_are_refused(capsys):
    for bad in ("0", "-1", "two", "1.5"):
        with pytest.raises(SystemExit):
            main(["llc", "--threads", bad])
        assert f"argument --threads: must be an integer >= 1, got '{bad}'" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", sorted(COMPUTES))
def test_device_cpu_and_cuda(files, tmp_path, monkeypatch, cmd):
    seen = _record(monkeypatch, *COMPUTES[cmd][:2])
    with pytest.raises(Reached):
        main(_model_run(files, cmd, tmp_path, "--device", "cpu"))
    assert seen["device"].type == "cpu"
    if torch.cuda.is_available():
        with pytest.raises(Reached):
            main(_model_run(files, cmd, tmp_path, "--device", "cuda"))
        assert seen["device"].type == "cuda"


@pytest.mark.parametrize("cmd", sorted(COMPUTES))
def test_device_reaches_the_model(files, tmp_path, monkeypatch, cmd):
    """Whatever device --device names is where the model computes: here a stand-in device (meta) that the check
    lets through, since a second real device need not exist."""
    import pypattern.circuits.cli as circuits_cli

    monkeypatch.setattr(circuits_cli, "check_device", lambda device, argument="device": torch.device("meta"))
    seen = _record(monkeypatch, *COMPUTES[cmd][:2])
    with pytest.raises(Reached):
        main(_model_run(files, cmd, tmp_path, "--device", "elsewhere"))
    assert seen["device"].type == "meta"


@pytest.mark.parametrize("cmd", sorted(COMPUTES))
def test_unknown_device_is_refused_by_name(files, tmp_path, capsys, cmd):
    bad = ["nodevice", "cuda:x", "mps", "meta", "cuda:99"]
    if not torch.cuda.is_available():
        bad += ["cuda", "cuda:0"]
    for device in bad:
        with pytest.raises(SystemExit) as e:
            main(_model_run(files, cmd, tmp_path, "--device", device))
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"argument --device: {device!r}" in err, err
        assert "give cpu" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # refused before any work


@pytest.mark.parametrize("cmd", ["llc", "patch", "circuit"])
def test_device_applies_with_model_only(tmp_path, capsys, cmd):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--device", "cpu", "--out", str(tmp_path)])
    assert e.value.code == 2
    assert "--device applies only with --model DIR --data FILE" in capsys.readouterr().err
