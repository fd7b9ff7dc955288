"""``from devinterp.slt.susceptibilities import susceptibilities`` (devinterp 2.x) on pypattern."""

from .. import compute_susceptibilities, susceptibilities

__all__ = ["compute_susceptibilities", "susceptibilities"]
