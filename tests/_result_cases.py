"""Results built by hand and the raw archive bytes of their files, shared by the result-file tests."""

import io as _bytes_io

import numpy as np

from pypattern.susceptibility import BIFResult, SusceptibilityResult


def npy(a) -> bytes:
    """The bytes of ``a`` as an ``.npy`` member of an archive."""
    b = _bytes_io.BytesIO()
    np.save(b, a)
    return b.getvalue()


def susceptibility_result(rng: np.random.Generator, **fields) -> SusceptibilityResult:
    """Two components by four probe entries, three chains of ten draws; ``fields`` replace the defaults."""
    return SusceptibilityResult(
        **{
            "chi": rng.normal(size=(2, 4)),
            "chi_se": rng.random((2, 4)),
            "chi_chains": rng.normal(size=(2, 3, 4)),
            "components": ["blocks.0.attn", "embed"],
            "probe_sample": np.arange(4),
            "probe_position": -np.ones(4, dtype=np.int64),
            "probe_token": -np.ones(4, dtype=np.int64),
            "phi_mean": rng.normal(size=2),
            "loss_mean": rng.normal(size=(2, 4)),
            "convention": "physics",
            "nbeta": 5.0,
            "num_chains": 3,
            "num_draws": 10,
            "settings": {"seed": 0},
            **fields,
        }
    )


def bif_result(rng: np.random.Generator) -> BIFResult:
    """Four probe entries, two chains of five draws."""
    return BIFResult(
        bif=rng.normal(size=(4, 4)),
        corr=rng.normal(size=(4, 4)),
        loss_mean=rng.normal(size=4),
        probe_sample=np.arange(4),
        probe_position=np.arange(4),
        probe_token=np.arange(4),
        num_chains=2,
        num_draws=5,
        settings={},
    )
