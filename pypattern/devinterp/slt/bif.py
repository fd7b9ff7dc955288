"""``from devinterp.slt.bif import bif`` (devinterp 2.x) on pypattern."""

from .. import bif, compute_bif

__all__ = ["bif", "compute_bif"]
