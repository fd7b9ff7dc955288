# Triton kernels run compiled on CUDA tensors where a GPU is visible, and only in the interpreter (on CPU tensors)
# where none is. TRITON_INTERPRET must be set before the first `import triton` (else every launch fails with
# "0 active drivers" and tl.rand/tl.randn break), so it is decided here, before any test module imports triton.
# Importing torch first is fine: it does not import triton.
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


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
