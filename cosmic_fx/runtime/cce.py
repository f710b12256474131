"""Cosmic classical efficiency (CCE) state: how each parameter's efficiency scales its update.

The multiplier is :func:`cosmic_fx.policy.cce_multiplier`; relative CCE measures it against the mean
efficiency of the parameters, refreshed at the end of every step in which ``E(p)`` was measured
(the first step uses the mean over every hooked parameter, computed once). With ``cce_fused`` the
update itself happens inside the parameter's hook, on the scaled gradient: see :mod:`.fused`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from .. import policy
from ..config import CCEMode, CosmicConfig

__all__ = ["CCEState"]


class CCEState:
    """The relative-CCE reference point."""

    def __init__(self, config: CosmicConfig) -> None:
        self.config = config
        self.mean_e: float | None = None

    def multiplier(self, e_p: float, initial_mean: Callable[[], Iterable[float]]) -> float:
        """The factor for a gradient with efficiency ``e_p`` this step."""
        if self.config.cce is CCEMode.RELATIVE and self.mean_e is None:
            self.mean_e = policy.mean_efficiency(initial_mean())
        return policy.cce_multiplier(e_p, self.mean_e, self.config)

    def end_of_step(self, measured: Iterable[float]) -> None:
        """Refresh the mean from the readings measured in this step (if any)."""
        if self.config.cce is CCEMode.RELATIVE:
            mean = policy.mean_efficiency(measured)
            if mean is not None:
                self.mean_e = mean

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"cce.mean_e": torch.tensor(math.nan if self.mean_e is None else self.mean_e, dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        value = float(state["cce.mean_e"])
        self.mean_e = None if math.isnan(value) else value
