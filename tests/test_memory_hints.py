"""The large-block memory hint (:func:`pypattern._memory.huge_pages_hint`)."""

from __future__ import annotations

import os

import pytest
import torch

from pypattern import _memory


def test_huge_pages_hint_advises_the_aligned_inside_of_a_large_block(monkeypatch):
    calls = []
    monkeypatch.setattr(_memory, "_MADVISE", lambda addr, n, advice: calls.append((addr, n, advice)) or 0)
    t = torch.empty(2**24 + 3, dtype=torch.float32)  # just over 64 MiB
    assert _memory.huge_pages_hint(t) is t
    ((addr, n, advice),) = calls
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * 4
    assert advice == 14 and addr % 2**21 == 0 and n % 2**21 == 0 and n > 0
    assert start <= addr and addr + n <= end and addr - start < 2**21 and end - (addr + n) < 2**21
    calls.clear()
    for small in (torch.empty(2**24 - 1), torch.empty(0), torch.empty(2**20, dtype=torch.float64)):
        assert _memory.huge_pages_hint(small) is small
    meta = torch.empty(2**25, device="meta")
    assert _memory.huge_pages_hint(meta) is meta
    assert calls == []


@pytest.mark.skipif(os.uname().sysname != "Linux", reason="madvise is looked up on Linux only")
def test_huge_pages_hint_on_this_system_leaves_the_values_alone():
    t = _memory.huge_pages_hint(torch.empty(2**24 + 5, dtype=torch.float32))
    t.copy_(torch.arange(t.numel(), dtype=torch.float32))
    assert t[-1] == t.numel() - 1 and t[0] == 0 and t[2**23] == 2**23
