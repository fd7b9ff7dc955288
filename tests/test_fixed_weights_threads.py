"""Blocks of fixed weights opened on one model from two threads: the attention layouts live while either block is
open and are gone when both have ended, whichever ends first, so a weight changed later is read as it is."""

from __future__ import annotations

import threading

import torch

from pypattern.models import Transformer, TransformerConfig


def _model() -> Transformer:
    cfg = TransformerConfig(n_layers=2, d_model=32, n_heads=4, d_mlp=64, d_vocab=50, n_ctx=16, seed=0)
    return Transformer(cfg)


def _run_overlapping_blocks(m: Transformer, toks: torch.Tensor, first_ends_first: bool) -> None:
    opened, other_opened, release = threading.Event(), threading.Event(), threading.Event()

    def second() -> None:
        opened.wait()
        with m.fixed_weights(max_pack_bytes=None), torch.no_grad():
            m(toks)
            other_opened.set()
            if not first_ends_first:
                return
            release.wait()

    t = threading.Thread(target=second)
    t.start()
    with m.fixed_weights(max_pack_bytes=None), torch.no_grad():
        m(toks)
        opened.set()
        other_opened.wait()
        if not first_ends_first:
            t.join()
    release.set()
    t.join()


def test_layouts_end_with_the_last_block_of_either_thread():
    toks = torch.randint(0, 50, (3, 10), generator=torch.Generator().manual_seed(0))
    for first_ends_first in (True, False):
        m = _model()
        _run_overlapping_blocks(m, toks, first_ends_first)
        assert not any("_layouts" in blk.attn.__dict__ for blk in m.blocks)
        with torch.no_grad():
            m.blocks[0].attn.W_Q.data.mul_(2)  # outside any block a .data edit must be read
            got = m(toks)
            fresh = Transformer(m.cfg)
            fresh.load_state_dict(m.state_dict())
            torch.testing.assert_close(got, fresh(toks), rtol=0, atol=0)


def test_a_nested_block_shares_the_layouts_and_the_outer_keeps_them():
    m = _model()
    toks = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1))
    with m.fixed_weights(), torch.no_grad():
        m(toks)
        outer = m.blocks[0].attn.__dict__["_layouts"]
        with m.fixed_weights():
            assert m.blocks[0].attn.__dict__["_layouts"] is outer
        assert m.blocks[0].attn.__dict__["_layouts"] is outer
    assert "_layouts" not in m.blocks[0].attn.__dict__
