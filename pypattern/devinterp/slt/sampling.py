"""``from devinterp.slt.sampling import sample`` (devinterp 2.x) on pypattern."""

from .. import sample

__all__ = ["sample"]
