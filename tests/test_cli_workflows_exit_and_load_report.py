"""The command line's ends: a signal while a finished command's interpreter shuts down leaves its exit status, and
a model folder whose config.json and weights disagree ends in one error line (transformers' LOAD REPORT table is
not printed before it)."""

import json
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from pypattern.cli import main  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# An object of the script's own module is deleted while the interpreter shuts down, after the command has returned
# and after Python has put the default signal actions back in place of its handlers (torch and the rest unload then,
# for a second or more): it sends the signal to its own process then, as `kill` or a scheduler may as the command
# ends.
_LATE_SIGNAL = textwrap.dedent(
    """
    import os, signal, sys, time

    class Late:
        def __del__(self):
            os.kill(os.getpid(), signal.{sig})
            time.sleep(0.3)

    late = Late()
    from pypattern.cli import main
    sys.argv = ["pypattern", "backends", "--op", "sgld_step_"]
    sys.exit(main())
    """
)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_during_shutdown_keeps_the_commands_status(sig):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(
        [sys.executable, "-c", _LATE_SIGNAL.format(sig=sig)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    # the command's output is whole and its status is its own (0), not that of a process killed by the signal
    assert p.returncode == 0, (p.returncode, p.stderr[-2000:])
    assert '"reference"' in p.stdout and "Traceback" not in p.stderr


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _llama(path, **changes):
    cfg = transformers.LlamaConfig(
        vocab_size=19,
        hidden_size=8,
        intermediate_size=12,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))
    return path


def _drop_tensor(path, name):
    from safetensors.torch import load_file, save_file

    f = path / "model.safetensors"
    state = load_file(f)
    del state[name]
    save_file(state, f, metadata={"format": "pt"})
    return path


@pytest.mark.parametrize(
    "case, names",
    [
        # config.json's sizes disagree with the weights' shapes
        ("mismatch", ["model.embed_tokens.weight", "[19, 8]", "[23, 8]"]),
        # weights config.json has no place for (fewer layers than the checkpoint holds)
        ("unexpected", ["model.layers.1."]),
        # a tensor missing from the checkpoint
        ("missing", ["model.layers.1.mlp.up_proj.weight"]),
    ],
)
def test_config_and_weights_that_disagree_end_in_one_line(case, names, tmp_path, capfd):
    d = tmp_path / "model"
    if case == "mismatch":
        _llama(d, vocab_size=23)
    elif case == "unexpected":
        _llama(d, num_hidden_layers=1)
    else:
        _drop_tensor(_llama(d), "model.layers.1.mlp.up_proj.weight")
    data = tmp_path / "tokens.npy"
    np.save(data, np.random.default_rng(0).integers(0, 19, size=(4, 6)))
    records = _Records()
    logger = logging.getLogger(
        "transformers"
    )  # where transformers' handlers are, which its loggers propagate to
    logger.addHandler(records)
    capfd.readouterr()
    try:
        with pytest.raises(SystemExit) as e:
            main(["patch", "--model", str(d), "--data", str(data), "--out", str(tmp_path / "out"), "--quiet"])
    finally:
        logger.removeHandler(records)
    assert e.value.code == 2
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    # one line, the command's error naming the option and the tensors; no table of transformers' logged before it
    assert len(err) == 1, err
    assert err[0].startswith(f"pypattern patch: error: --model {str(d)!r}")
    for name in names:
        assert name in err[0], (name, err[0])
    assert not [m for m in records.messages if "LOAD REPORT" in m], records.messages


def test_mismatch_on_the_command_line_prints_one_line(tmp_path):
    """The whole stderr of the program, transformers' own handler included."""
    d = _llama(tmp_path / "model", vocab_size=23)
    data = tmp_path / "tokens.npy"
    np.save(data, np.random.default_rng(0).integers(0, 19, size=(4, 6)))
    cmd = ["patch", "--model", str(d), "--data", str(data), "--out", str(tmp_path / "out"), "--quiet"]
    p = subprocess.run(
        [sys.executable, "-m", "pypattern", *cmd],
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        timeout=120,
    )
    assert p.returncode == 2
    err = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("pypattern patch: error: --model"), err
    assert "model.embed_tokens.weight" in err[0]


def test_a_complete_folder_loads_and_logs_no_report(tmp_path, capfd):
    """The filter holding the report is removed after the load: transformers' logging works as before."""
    from pypattern import from_pretrained

    d = _llama(tmp_path / "model")
    model = from_pretrained(d)
    assert model.cfg.d_vocab == 19
    assert not logging.getLogger("transformers.modeling_utils").filters
    assert "LOAD REPORT" not in capfd.readouterr().err
