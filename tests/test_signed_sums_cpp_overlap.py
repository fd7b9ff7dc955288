"""The C++ signed-sums kernel, called directly, refuses an output whose strides fold it onto itself (a layout
ATen's overlap test calls too hard to decide) and takes one whose strides do not nest but whose elements are
apart."""

import pytest
import torch

import pypattern

pytestmark = pytest.mark.skipif(
    not pypattern.backends("signed_sums_")["cpp"]["available"], reason="C++ kernel not built"
)


def _op():
    return torch.ops.pypattern.signed_sums_


def test_a_self_folding_output_is_refused_by_the_kernel():
    op = _op()
    o = torch.zeros(7).as_strided((3, 3), (2, 1))
    b = torch.arange(9.0).reshape(3, 3)
    t = torch.full((3, 3), 100.0)
    with pytest.raises(
        ValueError, match=r"out\[0\] has elements that share memory \(its strides \(2, 1\) fold"
    ):
        op([o], [b], [t], [0, 1], [1])


def test_strides_that_do_not_nest_but_keep_elements_apart_are_taken():
    op = _op()
    store = torch.zeros(8)
    o = store.as_strided((3, 2), (2, 3))  # offsets 0, 3, 2, 5, 4, 7: all apart
    b = torch.arange(6.0).reshape(3, 2)
    t = torch.full((3, 2), 10.0)
    op([o], [b], [t], [0, 1], [-1])
    assert torch.equal(o, b - t)
