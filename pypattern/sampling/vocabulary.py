"""One vocabulary for the SGLD hyperparameters, and the one place devinterp's names are translated.

Inside pypattern every SGLD hyperparameter has the fused op's name (:func:`pypattern.ops.sgld.sgld_step_`):

============== ============================================= =========================
name           meaning                                       devinterp's name
============== ============================================= =========================
step_size      ``eps`` > 0                                   ``lr``
nbeta          ``n * beta`` > 0                              ``nbeta`` (``temperature``)
localization   ``gamma`` >= 0                                ``localization``
weight_decay   ``lambda_wd`` >= 0                            ``weight_decay``
noise_scale    multiplies the noise (1 = Langevin)           ``noise_level``
bounding_box   half-width of the box around ``w*`` or None   ``bounding_box_size``
============== ============================================= =========================

:func:`translate` maps devinterp's names to these at every public entry point (:class:`SGLD`, :func:`sample`,
:func:`estimate_llc`, :func:`estimate_learning_coeff`, :func:`estimate_learning_coeff_with_summary`,
:func:`pypattern.susceptibilities`, :func:`pypattern.bif`). ``temperature`` is devinterp's older name for
``nbeta`` and is translated to it. Two names of one hyperparameter given together must have equal values: a
conflict raises ``ValueError`` naming both.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["DEVINTERP_NAMES", "HYPERPARAMETERS", "translate"]

HYPERPARAMETERS = ("step_size", "nbeta", "localization", "weight_decay", "noise_scale", "bounding_box")
DEVINTERP_NAMES = {
    "lr": "step_size",
    "noise_level": "noise_scale",
    "bounding_box_size": "bounding_box",
    "temperature": "nbeta",
}


def translate(given: Mapping[str, Any], *, where: str, drop_none: bool = True) -> dict[str, Any]:
    """``given`` with devinterp's hyperparameter names replaced by pypattern's.

    Parameters
    ----------
    given : mapping
        Hyperparameters under either name (other keys pass through unchanged).
    where : str
        What holds them (``"optimizer_kwargs"``, ``"sample()"``, ...), for error messages.
    drop_none : bool
        Leave out entries whose value is None (an argument not given).

    Raises
    ------
    ValueError
        Two names of one hyperparameter with different values (e.g. ``temperature`` and ``nbeta``).
    """
    out: dict[str, Any] = {}
    source: dict[str, str] = {}
    for key, value in given.items():
        if drop_none and value is None:
            continue
        name = DEVINTERP_NAMES.get(key, key)
        if name in out and not _same(out[name], value):
            raise ValueError(
                f"{where} gives {source[name]}={out[name]!r} and {key}={value!r}: both set {name}"
                + (
                    " (temperature is devinterp's older name for nbeta)"
                    if "temperature" in (key, source[name])
                    else ""
                )
                + "; give one"
            )
        out[name], source[name] = value, key
    return out


def _same(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - values that do not compare (tensors) count as different
        return a is b
