"""``from devinterp.slt.weight_restrictions import create_param_masks`` (devinterp 2.x) on pypattern."""

from .. import create_param_masks

__all__ = ["create_param_masks"]
