"""Resume and stop review (2): checkpoint paths of the circuit searches checked before any work; SIGTERM writes
the finished work as Ctrl-C does; a resume under another backend or batching warns; a changed batch size is named,
not the nbeta it resolves to; the command line's exit status on Ctrl-C; `pypattern patch --quiet --checkpoint`
and `pypattern circuit --checkpoint`."""

import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest
import torch

import pypattern as pp
from pypattern import io

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")


# ---------------------------------------------------------------------------------------- circuit checkpoint paths
def _circuit_setup():
    from pypattern.models import Transformer, TransformerConfig
    from pypattern.patching import LogitDiff

    model = Transformer(
        TransformerConfig(
            n_layers=1, d_model=8, n_heads=2, d_mlp=16, d_vocab=12, n_ctx=8, dtype=torch.float64
        )
    )
    g = torch.Generator().manual_seed(0)
    clean, corr = torch.randint(0, 12, (2, 5), generator=g), torch.randint(0, 12, (2, 5), generator=g)
    return model, clean, corr, LogitDiff([1, 2], [3, 4])


@pytest.mark.parametrize("search", ["exact", "acdc"])
def test_a_circuit_checkpoint_path_that_cannot_be_a_file_is_refused_before_any_work(
    tmp_path, monkeypatch, search
):
    from pypattern.circuits import acdc, api, edge_attribution

    model, clean, corr, metric = _circuit_setup()
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    monkeypatch.setattr(
        api, "prepare_runs", lambda *a, **k: pytest.fail("work began before the path was checked")
    )

    def call(path):
        if search == "exact":
            return edge_attribution(
                model, clean, corr, metric=metric, method="exact", checkpoint=path, quiet=True
            )
        return acdc(model, clean, corr, metric=metric, threshold=0.01, checkpoint=path, quiet=True)

    with pytest.raises(ValueError, match="which is a file, not a folder"):
        call(str(tmp_path / "afile" / "ck.npz"))
    with pytest.raises(ValueError, match="is a folder; give a file path"):
        call(str(tmp_path / "adir"))


# -------------------------------------------------------------------------------------------------------- SIGTERM
def test_sigterm_as_interrupt_restores_the_handler_and_leaves_others_alone():
    from pypattern._progress import Terminated, sigterm_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    assert before is signal.SIG_DFL
    with sigterm_as_interrupt():
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        with pytest.raises(KeyboardInterrupt) as e:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1.0)  # the handler raises in the main thread
        assert isinstance(e.value, Terminated)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

    def mine(signum, frame):
        pass

    signal.signal(signal.SIGTERM, mine)
    try:
        with sigterm_as_interrupt():
            assert signal.getsignal(signal.SIGTERM) is mine  # a handler the program installed is kept
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


_PATCH_SETUP = """
import torch
from pypattern.models import Transformer, TransformerConfig
from pypattern.patching import LogitDiff, activation_patching
model = Transformer(TransformerConfig(n_layers=2, d_model=16, n_heads=2, d_mlp=32, d_vocab=12, n_ctx=8,
                                      dtype=torch.float64, seed=5))
g = torch.Generator().manual_seed(1)
clean = torch.randint(0, 12, (3, 6), generator=g)
corr = clean.clone(); corr[:, 1] = (clean[:, 1] + 3) % 12
metric = LogitDiff(torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]))
"""


def test_sigterm_keeps_the_finished_cells_of_a_patching_grid_and_the_resume_completes_it(tmp_path):
    ck = str(tmp_path / "grid.npz")
    script = _PATCH_SETUP + textwrap.dedent(
        """
        import sys, time
        from pypattern.patching import api
        from pypattern.patching.engine import ExactEngine
        ExactEngine.UNEMBED_ROWS = 1  # blocks of one position
        api._Grid.EVERY_S = 1e9  # no timed save: only the stop writes
        run = api._Grid.run
        def slow_run(self, blocks, compute, done=()):
            def slow(idx):
                out = compute(idx)
                print("block", flush=True)
                time.sleep(0.4)
                return out
            return run(self, blocks, slow, done)
        api._Grid.run = slow_run
        print("start", flush=True)
        activation_patching(model, "resid_pre", clean, corr, metric=metric, checkpoint=sys.argv[1], quiet=True)
        print("finished", flush=True)
        """
    )
    p = subprocess.Popen(
        [sys.executable, "-c", script, ck], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert p.stdout.readline().strip() == "start"
        for _ in range(3):
            assert p.stdout.readline().strip() == "block"
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert "finished" not in out
    assert p.returncode != 0
    assert os.path.exists(ck), f"SIGTERM left no checkpoint (exit {p.returncode}): {err[-500:]}"
    arrays, _ = io.load(ck)
    kept = int(arrays["done"].sum())
    # the two blocks finished before the third's, stopped by the signal (a block: 2 layers at one position)
    assert 2 * 2 <= kept < arrays["done"].size
    ns = {}
    exec(_PATCH_SETUP, ns)
    kw = dict(metric=ns["metric"], quiet=True)
    resumed = ns["activation_patching"](
        ns["model"], "resid_pre", ns["clean"], ns["corr"], checkpoint=ck, **kw
    )
    ref = ns["activation_patching"](ns["model"], "resid_pre", ns["clean"], ns["corr"], **kw)
    torch.testing.assert_close(resumed.values, ref.values, rtol=0, atol=1e-12)


_CIRCUIT_SETUP = """
import torch
from pypattern.circuits import acdc, edge_attribution
from pypattern.models import Transformer, TransformerConfig
from pypattern.patching import LogitDiff
model = Transformer(TransformerConfig(n_layers=2, d_model=8, n_heads=2, d_mlp=16, d_vocab=12, n_ctx=8,
                                      dtype=torch.float64, seed=3))
g = torch.Generator().manual_seed(0)
clean, corr = torch.randint(0, 12, (2, 5), generator=g), torch.randint(0, 12, (2, 5), generator=g)
metric = LogitDiff([1, 2], [3, 4])
def search(kind, checkpoint=None):
    if kind == "exact":
        r = edge_attribution(model, clean, corr, metric=metric, method="exact", max_batch=2, quiet=True,
                             checkpoint=checkpoint)
        return r.values
    return acdc(model, clean, corr, metric=metric, threshold=0.01, max_batch=2, quiet=True,
                checkpoint=checkpoint).mask
"""


@pytest.mark.parametrize("kind", ["exact", "acdc"])
def test_sigterm_writes_the_circuit_searches_checkpoint_and_the_resume_completes_it(tmp_path, kind):
    ck = str(tmp_path / "search.npz")
    script = _CIRCUIT_SETUP + textwrap.dedent(
        """
        import sys, time
        from pypattern.circuits import api
        from pypattern.circuits.engine import EdgeEngine
        api._CHECKPOINT_EVERY_S = 1e9  # no timed save: only the stop writes
        run = EdgeEngine.run
        def slow_run(self, masks):
            out = run(self, masks)
            print("run", flush=True)
            time.sleep(0.3)
            return out
        EdgeEngine.run = slow_run
        print("start", flush=True)
        search(sys.argv[1], sys.argv[2])
        print("finished", flush=True)
        """
    )
    p = subprocess.Popen(
        [sys.executable, "-c", script, kind, ck],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout.readline().strip() == "start"
        for _ in range(8):
            assert p.stdout.readline().strip() == "run"
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert "finished" not in out and p.returncode != 0
    assert os.path.exists(ck), f"SIGTERM left no checkpoint (exit {p.returncode}): {err[-500:]}"
    ns = {}
    exec(_CIRCUIT_SETUP, ns)
    resumed = ns["search"](kind, ck)
    ref = ns["search"](kind)
    torch.testing.assert_close(resumed, ref, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------- backend / batched on resume
def _llc_setup(batch_size=64):
    from pypattern import truth

    torch.manual_seed(0)
    mlp, data = truth.make_teacher_task((4, 8, 2), n=128, seed=0)
    return mlp, torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True)


_LLC = dict(
    num_chains=2, num_draws=8, step_size=1e-3, localization=100.0, quiet=True, warn_nonstationary=False
)


class _Stop(Exception):
    pass


def _stop_at(at):
    def cb(draw):
        if draw == at:
            raise _Stop

    return cb


def _settings_warnings(caught):
    return [
        str(w.message) for w in caught if "resuming; the values computed after the resume" in str(w.message)
    ]


@pytest.mark.parametrize("change", [{"backend": "reference"}, {"batched": False}])
def test_a_resume_under_another_backend_or_batching_warns_naming_it(tmp_path, change):
    path = str(tmp_path / "ck.npz")
    with pytest.raises(_Stop):
        pp.estimate_llc(*_llc_setup(), checkpoint=path, callbacks=[_stop_at(3)], **_LLC)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = pp.estimate_llc(*_llc_setup(), checkpoint=path, **_LLC, **change)
    got = _settings_warnings(caught)
    ((name, value),) = change.items()
    assert len(got) == 1 and f"{name}={value!r}" in got[0] and path in got[0], got
    assert [w.filename for w in caught if str(w.message) == got[0]] == [__file__]  # at the caller's line
    assert np.isfinite(res.llc_mean)
    # the same settings: no warning
    with pytest.raises(_Stop):
        pp.estimate_llc(*_llc_setup(), checkpoint=str(tmp_path / "b.npz"), callbacks=[_stop_at(3)], **_LLC)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pp.estimate_llc(*_llc_setup(), checkpoint=str(tmp_path / "b.npz"), **_LLC)
    assert not _settings_warnings(caught)


def test_an_old_checkpoint_without_the_settings_resumes_without_a_warning(tmp_path):
    from pypattern.sampling.checkpoint import CHECKPOINT_KIND

    path = str(tmp_path / "ck.npz")
    with pytest.raises(_Stop):
        pp.estimate_llc(*_llc_setup(), checkpoint=path, callbacks=[_stop_at(3)], **_LLC)
    arrays, meta = io.load(path, kind=CHECKPOINT_KIND)
    fp = meta["checkpoint"]["fingerprint"]
    assert "backend" in fp and "batched" in fp  # stored with the checkpoint
    meta["checkpoint"]["fingerprint"] = {k: v for k, v in fp.items() if k not in ("backend", "batched")}
    io.save(path, arrays, meta, kind=CHECKPOINT_KIND)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pp.estimate_llc(*_llc_setup(), checkpoint=path, **_LLC, backend="reference")
    assert not _settings_warnings(caught)


def test_susceptibility_rows_read_back_under_another_batching_warn_once(tmp_path):
    from pypattern.models import Transformer, TransformerConfig

    model = Transformer(
        TransformerConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=None, d_vocab=11, n_ctx=8, seed=0)
    )
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 11, (16, 6), generator=g)
    loader = [data[i : i + 8] for i in range(0, 16, 8)]

    def lm_loss(m, batch):
        return m(batch, return_type="loss")

    kw = dict(loss_fn=lm_loss, num_chains=2, num_draws=4, step_size=1e-4, nbeta=20.0, localization=100.0)
    comps = ["blocks.0.attn.head.0", "blocks.0.attn.head.1"]
    ck = str(tmp_path / "chi")
    first = pp.susceptibilities(model, loader, data[:2], comps, checkpoint=ck, quiet=True, **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = pp.susceptibilities(
            model, loader, data[:2], comps, checkpoint=ck, quiet=True, batched=False, **kw
        )
    got = _settings_warnings(caught)
    assert len(got) == 1 and "batched=False" in got[0], got
    np.testing.assert_array_equal(again.chi, first.chi)  # the rows read back


# ------------------------------------------------------------------------------------ batch size on resume
def test_a_resume_with_another_batch_size_says_the_default_nbeta_follows_it(tmp_path):
    path = str(tmp_path / "ck.npz")
    pp.estimate_llc(*_llc_setup(64), checkpoint=path, **_LLC)
    with pytest.raises(io.FingerprintMismatch) as e:
        pp.estimate_llc(*_llc_setup(32), checkpoint=path, **_LLC)
    msg = str(e.value)
    assert e.value.item == "nbeta" and "another DataLoader batch_size" in msg
    assert "the default nbeta is m / ln m of the batch size" in msg and msg.endswith("start afresh.")
    with pytest.raises(io.FingerprintMismatch) as e:
        pp.estimate_llc(*_llc_setup(64), checkpoint=path, grad_accum_steps=2, **_LLC)
    assert "grad_accum_steps = 1 there, 2 now: the default nbeta" in str(e.value)
    with pytest.raises(io.FingerprintMismatch) as e:  # nbeta itself changed, the batches not: no hint
        pp.estimate_llc(*_llc_setup(64), checkpoint=path, nbeta=3.0, **_LLC)
    assert e.value.item == "nbeta" and "batch size" not in str(e.value)


# ------------------------------------------------------------------------------------- the CLI and Ctrl-C
def _cli_script(body: str) -> subprocess.CompletedProcess:
    script = "import os, signal, sys, time\nimport pypattern.cli as cli\n" + textwrap.dedent(body)
    return subprocess.run(
        [sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=120
    )


def test_a_second_ctrl_c_while_the_first_is_handled_still_exits_130():
    r = _cli_script(
        """
        def interrupted(args):
            raise KeyboardInterrupt

        class Stderr:  # a second SIGINT arrives as the 'interrupted' line is written
            def write(self, s):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)
                return sys.__stderr__.write(s)

            def flush(self):
                sys.__stderr__.flush()

        cli._run = interrupted
        sys.stderr = Stderr()
        sys.exit(cli.main(["backends"]))
        """
    )
    assert r.returncode == 130, (r.returncode, r.stderr[-800:])
    assert "pypattern backends: interrupted" in r.stderr


def test_a_ctrl_c_as_a_finished_command_exits_is_not_a_crash():
    r = _cli_script(
        """
        def done(args):
            print("done")
            return 0

        cli._run = done
        sys.argv = ["pypattern", "backends"]
        code = cli.main()
        os.kill(os.getpid(), signal.SIGINT)  # as the interpreter winds down
        time.sleep(0.2)
        sys.exit(code)
        """
    )
    assert r.returncode == 0, (r.returncode, r.stderr[-800:])
    assert r.stdout.strip() == "done"


def test_ctrl_c_during_the_programs_shutdown_is_not_a_kill():
    """The interpreter's shutdown puts SIGINT's default action (kill) back while torch unloads: a Ctrl-C then
    ended a finished command with status -2."""
    p = subprocess.Popen(
        [sys.executable, "-m", "pypattern.cli", "backends"],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        while p.stdout.readline().rstrip() != "}":  # the JSON's last line: the command's work is done
            pass
        while p.poll() is None:
            p.send_signal(signal.SIGINT)
            time.sleep(0.005)
        p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode in (0, 130), p.returncode  # (130: a Ctrl-C before the command ended)


def test_sigterm_ends_a_command_with_its_message():
    r = _cli_script(
        """
        def terminated(args):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)

        cli._run = terminated
        sys.exit(cli.main(["backends"]))
        """
    )
    assert r.returncode == 143, (r.returncode, r.stderr[-800:])
    assert "pypattern backends: terminated (SIGTERM)" in r.stderr


# ------------------------------------------------------------------------ patch --quiet/--checkpoint, circuit
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=23, n_positions=16)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(d, safe_serialization=True)
    return str(d)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokens")
    rng = np.random.default_rng(0)
    t = rng.integers(0, 23, size=(4, 6))
    np.save(d / "tokens.npy", t)
    c = t.copy()
    c[:, 2] = (c[:, 2] + 5) % 23
    np.save(d / "corrupted.npy", c)
    return str(d / "tokens.npy"), str(d / "corrupted.npy")


def test_patch_quiet_and_checkpoint(model_dir, tokens, tmp_path, capsys, monkeypatch):
    from pypattern.cli import main
    from pypattern.patching import api

    monkeypatch.setattr(api._Grid, "EVERY_S", 0.0)
    ck = str(tmp_path / "ck")
    argv = ["patch", "--model", model_dir, "--data", tokens[0], "--corrupted", tokens[1], "--sites",
            "resid_pre,z", "--max-prompts", "2"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "a"), "--checkpoint", ck, "--quiet"]) == 0
    assert sorted(os.listdir(ck)) == ["patch_resid_pre.npz", "patch_z.npz"]
    capsys.readouterr()
    # a finished checkpoint gives the same tables without patching again
    monkeypatch.setattr(
        api._Grid, "run", lambda *a, **k: pytest.fail("a finished checkpoint patches nothing")
    )
    assert main([*argv, "--out", str(tmp_path / "b"), "--checkpoint", ck, "--quiet"]) == 0
    for site in ("resid_pre", "z"):
        a = (tmp_path / "a" / f"patch_{site}.csv").read_text()
        assert a == (tmp_path / "b" / f"patch_{site}.csv").read_text()
    with pytest.raises(SystemExit):
        main(["patch", "--checkpoint", ck])  # without --model: refused
    assert "--checkpoint applies only with --model" in capsys.readouterr().err


def test_patch_progress_is_quiet_with_quiet(model_dir, tokens, tmp_path, capsys, monkeypatch):
    from pypattern import _progress
    from pypattern.cli import main

    seen = []
    real = _progress.progress_bar

    def spy(quiet, **bar):
        seen.append(quiet)
        return real(quiet, **bar)

    monkeypatch.setattr("pypattern.patching.api.progress_bar", spy)
    argv = ["patch", "--model", model_dir, "--data", tokens[0], "--sites", "resid_pre", "--max-prompts", "2"]
    assert main([*argv, "--out", str(tmp_path / "a"), "--quiet"]) == 0
    assert seen and all(seen)
    seen.clear()
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    assert seen and not any(seen)


def test_circuit_checkpoint(model_dir, tokens, tmp_path, capsys, monkeypatch):
    from pypattern.circuits import api
    from pypattern.cli import main

    monkeypatch.setattr(api, "_CHECKPOINT_EVERY_S", 0.0)
    ck = str(tmp_path / "ck")
    argv = ["circuit", "--model", model_dir, "--data", tokens[0], "--methods", "eap,exact", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "a"), "--checkpoint", ck]) == 0
    assert sorted(os.listdir(ck)) == ["exact_edge_scores.npz", "pruning_curve.npz"]
    _, meta = io.load(os.path.join(ck, "exact_edge_scores.npz"), kind="ExactEdgeScoresCheckpoint")
    assert meta["done"] > 0
    with pytest.raises(SystemExit):
        main(["circuit", "--checkpoint", ck])
    assert "--checkpoint applies only with --model" in capsys.readouterr().err
    # --checkpoint also keeps the pruning curve: with eap only, the curve of other scores is refused by name
    with pytest.raises(SystemExit):
        main(["circuit", "--model", model_dir, "--data", tokens[0], "--methods", "eap", "--quiet", "--out",
              str(tmp_path / "b"), "--checkpoint", ck])  # fmt: skip
    assert "pruning_curve.npz' was written by a different run: scores" in capsys.readouterr().err
