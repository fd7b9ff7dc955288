"""``from devinterp.slt.callback import SamplerCallback`` (devinterp 1.x) on pypattern."""

from ..v1 import SamplerCallback

__all__ = ["SamplerCallback"]
