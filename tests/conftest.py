# TRITON_INTERPRET must be set before the first `import triton`, or every launch fails on a machine with no GPU
# ("0 active drivers") and tl.rand/tl.randn break. Setting it here covers the whole test session.
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): on tiny tensors
    extra threads only contend on the shared 2-core machines (measured 20x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
