"""``from devinterp.slt.llc import llc`` (devinterp 2.x) as ``from pypattern.devinterp.slt.llc import llc``."""

from .. import compute_llc, llc

__all__ = ["compute_llc", "llc"]
