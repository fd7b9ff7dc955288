"""Settings both patterning experiments share: how chi is estimated at the checkpoint."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class ChiSettings:
    """SGLD settings of the susceptibility estimate (``nbeta`` None: the sampler's default)."""

    chi_num_chains: int = 2
    chi_num_draws: int = 60
    chi_num_burnin_steps: int = 30
    chi_step_size: float = 1e-4
    chi_localization: float = 100.0
    chi_nbeta: float | None = None

    def chi_sampler(self, seed: int) -> dict:
        """The keyword arguments of :func:`pypattern.sample` / :func:`pypattern.susceptibilities`."""
        return dict(
            num_chains=self.chi_num_chains,
            num_draws=self.chi_num_draws,
            num_burnin_steps=self.chi_num_burnin_steps,
            step_size=self.chi_step_size,
            localization=self.chi_localization,
            nbeta=self.chi_nbeta,
            seed=seed,
            warn_nonstationary=False,
        )
