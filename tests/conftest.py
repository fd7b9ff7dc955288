# Triton kernels run compiled on CUDA tensors where a GPU is visible, and only in the interpreter (on CPU tensors)
# where none is. TRITON_INTERPRET must be set before the first `import triton` (else every launch fails with
# "0 active drivers" and tl.rand/tl.randn break), so it is decided here, before any test module imports triton.
# Importing torch first is fine: it does not import triton.
import os
import signal

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# A shell starts a background job (``cmd &`` without job control, ``nohup``) with SIGINT ignored, and Python then
# installs no KeyboardInterrupt handler. The tests of Ctrl-C (a run stopped mid-step writes its state and resumes)
# send SIGINT to their own process: give it Python's handler, as in a terminal, however the suite was started.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): on tiny tensors
    extra threads only contend with each other and with other processes (measured 20x slower on 2 cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# The property-based suites (tests/test_properties_*.py) run under one bounded, reproducible hypothesis profile:
# derandomized (the same examples on every run, so CI is deterministic), no example database, no deadline (the
# machine may be shared), a fixed number of examples per test. HYPOTHESIS_PROFILE=pypattern-long runs more.
try:
    from hypothesis import HealthCheck, Phase, settings
except ImportError:  # pragma: no cover - hypothesis is a test dependency (pyproject.toml, Makefile)
    pass
else:
    _common = dict(
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=True,
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],  # no slow "explain"
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    settings.register_profile("pypattern", max_examples=25, **_common)
    settings.register_profile("pypattern-long", max_examples=500, **_common)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "pypattern"))
