"""Cosmic classical efficiency (CCE) state: how each parameter's efficiency scales its update.

The multiplier is :func:`cosmic_fx.policy.cce_multiplier`; relative CCE measures it against the mean
efficiency of the parameters, refreshed at the end of every step in which ``E(p)`` was measured
(the first step uses the mean over every hooked parameter, computed once). With ``cce_fused_lr`` the
update itself (plain SGD) happens inside the parameter's hook and the gradient is freed at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from .. import policy
from ..config import CCEMode, CosmicConfig

__all__ = ["CCEState"]


class CCEState:
    """The relative-CCE reference point and the fused update."""

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

    def fused_update(self, p: torch.Tensor) -> None:
        """``p <- p - lr * grad`` inside backward, then free ``p.grad`` (``cce_fused_lr``)."""
        with torch.no_grad():
            p.add_(p.grad, alpha=-self.config.cce_fused_lr)
        p.grad = None  # freed now: the next layer's gradient can reuse the memory

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"cce.mean_e": torch.tensor(math.nan if self.mean_e is None else self.mean_e, dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        value = float(state["cce.mean_e"])
        self.mean_e = None if math.isnan(value) else value
