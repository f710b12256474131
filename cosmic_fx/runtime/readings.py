"""The readings a runtime decides from: each parameter's efficiency ``E(p)`` (measured every
``efficiency_every`` steps and reused in between) and the model output's ``E_out`` of the step.

``E_out`` is that of every training output of the step: the efficiency sums of each forward's
output (:func:`cosmic_fx.quantities.efficiency_sums`) add up over the micro-batches of a step with
gradient accumulation, so that it equals ``E_out`` of the whole batch.

``E(p)`` is a softmax over the whole parameter: measuring it costs about one pass over the weights,
so between measurements the last reading — its value and its low/high verdict against ``E_out`` —
is reused. The seed preset measures every step, as the text does.
"""

from __future__ import annotations

import math
import warnings

import torch

from .. import policy
from ..quantities import efficiency, efficiency_from_sums

__all__ = ["Readings", "output_sums"]


def output_sums(t: torch.Tensor) -> torch.Tensor:
    """:func:`cosmic_fx.quantities.efficiency_sums` along the last dim, in a form a compiled graph
    keeps symbolic: the element count is a 0-d tensor made from the (symbolic) ``numel``, never a
    Python float of it (which would add a shape guard and recompile for every new batch size).

    Example:
        >>> from cosmic_fx.quantities import efficiency_sums
        >>> t = torch.randn(3, 5)
        >>> torch.allclose(output_sums(t), efficiency_sums(t, -1))
        True
    """
    x = t.detach()
    x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    if x.dim() == 0:
        x = x.reshape(1)
    log_p = torch.log_softmax(x, -1)
    count = torch.full((), x.numel(), dtype=torch.float64, device=x.device)
    return torch.stack([x.abs().sum().double(), (-(log_p.exp() * log_p).sum()).double(), count])


class Readings:
    """Per-parameter ``E(p)`` readings (indexed by the runtime's parameter index) and ``E_out``.

    Args:
        n: the number of parameters.
        eps: the epsilon of the efficiency.
        every: measure ``E(p)`` every this many steps (``CosmicConfig.efficiency_every``).
    """

    def __init__(self, n: int, eps: float, every: int) -> None:
        self.eps, self.every = eps, every
        self.value: list[float] = [math.nan] * n  # the last E(p) measured
        self.low: list[bool | None] = [None] * n  # its verdict against that step's E_out
        self.has: list[bool] = [False] * n
        self.version = 0  # bumped with every change of `value` (CCE's multipliers are cached on it)
        self.out_sums: torch.Tensor | None = None  # this step's efficiency sums of the outputs
        self._e_out_value: float | None = None
        self._warned_non_finite = False

    # ------------------------------------------------------------------ E_out
    def add_output(self, sums: torch.Tensor) -> None:
        """Add one forward's ``efficiency_sums`` of the model output to this step's."""
        sums = sums.detach()
        self.out_sums = sums if self.out_sums is None else self.out_sums + sums
        self._e_out_value = None  # read on the first measurement of the step

    def e_out_value(self) -> float | None:
        """``E_out`` as a float, read from the device once per step (a sync on CUDA), not per parameter."""
        if self.out_sums is not None and self._e_out_value is None:
            self._e_out_value = float(efficiency_from_sums(self.out_sums, self.eps))
        return self._e_out_value

    def end_step(self) -> None:
        """Start the next step's ``E_out`` afresh."""
        self.out_sums, self._e_out_value = None, None

    # ------------------------------------------------------------------ E(p)
    def due(self, i: int, step: int) -> bool:
        """Whether parameter ``i`` is measured in step ``step`` (0-based count of completed steps)."""
        return not self.has[i] or step % self.every == 0

    def any_due(self, indices: list[int], step: int) -> bool:
        """Whether any of the parameters ``indices`` is measured in step ``step`` (:meth:`due`)."""
        return step % self.every == 0 or not all(self.has[i] for i in indices)

    def measure(self, i: int, p: torch.Tensor, step: int, name: str) -> tuple[float, bool | None]:
        """Measure ``E(p)`` now and store it with its verdict; warn once about non-finite readings."""
        with torch.no_grad():
            value = float(efficiency(p.detach(), 0, self.eps))
        e_out = self.e_out_value()
        low = policy.is_low(value, e_out)
        self.value[i], self.low[i], self.has[i] = value, low, True
        self.version += 1
        if not self._warned_non_finite and not (math.isfinite(value) and (e_out is None or math.isfinite(e_out))):
            self._warned_non_finite = True
            what = f"E({name}) = {value}" if not math.isfinite(value) else f"E(output) = {e_out}"
            warnings.warn(
                f"cosmic_fx: non-finite efficiency reading at step {step}: {what} (a NaN/Inf loss or "
                "weights make every reading NaN). CDG takes no freezing or skipping decision and CCE "
                "applies no scaling from such readings; check the loss and learning rate. (Warned once "
                "per model.)",
                RuntimeWarning,
                stacklevel=2,
            )
        return value, low

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "readings.value": torch.tensor(self.value, dtype=torch.float64),
            "readings.low": torch.tensor([-1 if v is None else int(v) for v in self.low], dtype=torch.int8),
            "readings.has": torch.tensor(self.has, dtype=torch.bool),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.value = [float(v) for v in state["readings.value"].tolist()]
        self.low = [None if v < 0 else bool(v) for v in state["readings.low"].tolist()]
        self.has = [bool(v) for v in state["readings.has"].tolist()]
        self.version += 1
