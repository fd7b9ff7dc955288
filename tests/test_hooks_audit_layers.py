"""The forward's ``stop_at_layer``, ``start_at_layer`` and ``loss_per_token`` (TransformerLens' arguments) against a
loop over the blocks written out by hand, and their refusals by name."""

import pytest
import torch
import torch.nn.functional as F

from pypattern.models import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")


def model(**kw):
    base = dict(n_layers=3, d_model=16, n_heads=4, d_mlp=32, d_vocab=11, n_ctx=8, seed=0, dtype=torch.float64)
    return Transformer(**{**base, **kw}).eval()


def naive(m, x, start=0, stop=None, resid=None):
    """Embedding, blocks[start:stop] and (without stop) ln_final and unembedding, module by module."""
    h = m.embed.W_E[x] + (m.pos_embed.W_pos[: x.shape[1]] if m.cfg.positional_embedding else 0)
    h = h if resid is None else resid
    for blk in m.blocks[start:stop]:
        h = blk(h)
    return h if stop is not None else m.unembed(m.ln_final(h))


@pytest.mark.parametrize(
    "kw", [{}, dict(positional_embedding_type="rotary", n_key_value_heads=2, gated_mlp=True)]
)
def test_stop_and_start_at_layer_equal_the_blocks_run_by_hand(kw):
    m = model(**kw)
    x = torch.randint(0, 11, (2, 8), generator=torch.Generator().manual_seed(0))
    n = m.cfg.n_layers
    with torch.no_grad():
        for k in range(-n, n + 1):
            torch.testing.assert_close(m(x, stop_at_layer=k), naive(m, x, stop=k + n if k < 0 else k))
        _, cache = m.run_with_cache(x)
        for k in range(-n, n):
            resid = cache[f"blocks.{k % n}.hook_resid_pre"]
            torch.testing.assert_close(m(resid, start_at_layer=k), naive(m, x, start=k % n, resid=resid))
            torch.testing.assert_close(m(resid[0], start_at_layer=k), m(resid[:1], start_at_layer=k))
        r = m(cache["blocks.0.hook_resid_pre"], start_at_layer=0, stop_at_layer=2)
        torch.testing.assert_close(r, cache["blocks.2.hook_resid_pre"])
        # hooks of the blocks not run do not fire
        _, c = m.run_with_cache(x, stop_at_layer=1)
        assert "blocks.0.hook_resid_post" in c and not any(k.startswith(("blocks.1", "ln_final")) for k in c)
        _, c = m.run_with_cache(cache["blocks.2.hook_resid_pre"], start_at_layer=2)
        assert "hook_embed" not in c and not any(k.startswith(("blocks.0", "blocks.1")) for k in c)


def test_loss_per_token_is_the_cross_entropy_of_each_next_token():
    m = model()
    x = torch.randint(0, 11, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = m(x)
        want = F.cross_entropy(logits[:, :-1].reshape(-1, 11), x[:, 1:].reshape(-1), reduction="none").view(
            2, 7
        )
        torch.testing.assert_close(m(x, return_type="loss", loss_per_token=True), want)
        got_logits, got = m(x, return_type="both", loss_per_token=True)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got_logits, logits)
        torch.testing.assert_close(m(x, return_type="loss"), want.mean())


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(stop_at_layer=4), "stop_at_layer=4"),
        (dict(stop_at_layer=-4), "stop_at_layer=-4"),
        (dict(start_at_layer=3), "start_at_layer=3"),
        (dict(stop_at_layer=1.0), "stop_at_layer=1.0"),
        (dict(start_at_layer=True), "start_at_layer=True"),
        (dict(start_at_layer=2, stop_at_layer=1), "stop_at_layer=1 is before start_at_layer=2"),
        (dict(start_at_layer=1), "residual stream"),  # token ids given where a residual stream is expected
        (dict(loss_per_token=1), "loss_per_token"),
    ],
)
def test_bad_layer_arguments_are_refused_by_name(kw, match):
    m = model()
    x = torch.randint(0, 11, (2, 8))
    with pytest.raises((ValueError, TypeError), match=match):
        m(x, **kw)
    with pytest.raises(ValueError, match="return_type='loss' with start_at_layer"):
        m(torch.zeros(2, 8, 16, dtype=torch.float64), start_at_layer=1, return_type="loss")
