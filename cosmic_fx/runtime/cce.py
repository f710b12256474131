"""Cosmic classical efficiency (CCE) state: how each parameter's efficiency scales its update.

The multiplier is :func:`cosmic_fx.policy.cce_multiplier`; relative CCE measures it against the mean
efficiency of the parameters, refreshed at the end of every step in which ``E(p)`` was measured
(the first step uses the mean over every hooked parameter, computed once). With ``cce_fused`` the
update itself happens inside the parameter's hook, on the scaled gradient: see :mod:`.fused`.

Between measurements every multiplier is constant (it is a function of the last ``E(p)`` and of the
mean), so :meth:`CCEState.multipliers` keeps them in one list, rebuilt only when a reading or the mean
changes; a step where nothing is measured scales every gradient with one ``torch._foreach_mul_``.

Under Adam and AdamW a constant per-parameter multiplier ``c`` on the gradient does nothing: ``m``
scales by ``c`` and ``sqrt(v)`` by ``|c|``, so the update is unchanged up to ``eps`` (it differs only
for a while after the multiplier changes, every ``efficiency_every`` steps).
:func:`scale_invariant_optimizer` says when that holds; with ``cce_skip_adaptive`` (the fast preset)
the runtime then turns CCE off.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from .. import policy
from ..config import CCEMode, CosmicConfig

__all__ = ["CCEState", "cce_skipped_for", "cce_status", "scale_invariant_optimizer"]


def scale_invariant_optimizer(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer``'s update ignores a constant positive multiplier on a parameter's gradient:
    ``torch.optim.AdamW``, or ``torch.optim.Adam`` whose groups have no weight decay or a decoupled one
    (Adam's coupled decay adds ``weight_decay * p`` to the gradient, after the multiplier: not invariant).

    Args:
        optimizer: a ``torch.optim`` optimizer.

    Example:
        >>> w = torch.zeros(2, requires_grad=True)
        >>> scale_invariant_optimizer(torch.optim.AdamW([w])), scale_invariant_optimizer(torch.optim.SGD([w], lr=0.1))
        (True, False)
        >>> scale_invariant_optimizer(torch.optim.Adam([w], weight_decay=0.1))
        False
    """
    if isinstance(optimizer, torch.optim.AdamW):
        return True
    if not isinstance(optimizer, torch.optim.Adam):
        return False
    return all(not g.get("weight_decay", 0) or g.get("decoupled_weight_decay", False) for g in optimizer.param_groups)


def cce_skipped_for(config: CosmicConfig, optimizer: torch.optim.Optimizer | None) -> bool:
    """Whether ``config``'s CCE is turned off for a run stepped by ``optimizer``: CCE is on in the
    config, ``cce_skip_adaptive`` is set (the fast preset's setting, for when CCE is turned on there)
    and :func:`scale_invariant_optimizer` holds.
    The one decision, used by the runtime when it watches an optimizer, by
    :func:`cosmic_fx.fused_optimizer` when it fuses one, and by :func:`cosmic_fx.explain`.

    Args:
        config: the model's :class:`~cosmic_fx.CosmicConfig`.
        optimizer: the ``torch.optim`` optimizer that steps the model (``None``: not known; ``False``).

    Example:
        >>> w = torch.zeros(2, requires_grad=True)
        >>> adamw = torch.optim.AdamW([w])
        >>> cce_skipped_for(CosmicConfig.fast(cce="relative"), adamw), cce_skipped_for(CosmicConfig(), adamw)
        (True, False)
    """
    if optimizer is None or config.cce is CCEMode.OFF or not config.cce_skip_adaptive:
        return False
    return scale_invariant_optimizer(optimizer)


def cce_status(config: CosmicConfig, optimizer: torch.optim.Optimizer | None = None) -> str:
    """One line on whether CCE acts, for reports: on, off, off for ``optimizer`` (and why), or, with
    ``cce_skip_adaptive`` and no optimizer known yet, that it depends on the optimizer.

    Example:
        >>> with_cce = CosmicConfig.fast(cce="relative")
        >>> cce_status(with_cce).startswith("CCE (relative): depends on the optimizer: off under Adam")
        True
        >>> w = torch.zeros(2, requires_grad=True)
        >>> cce_status(with_cce, torch.optim.SGD([w], lr=0.1)), cce_status(CosmicConfig.fast())
        ('CCE (relative): on under SGD', "CCE: off (cce='off')")
    """
    mode = config.cce.value
    if config.cce is CCEMode.OFF:
        return "CCE: off (cce='off')"
    if optimizer is None:
        if config.cce_skip_adaptive:
            return (f"CCE ({mode}): depends on the optimizer: off under Adam/AdamW, which divide each parameter's "
                    "gradient by its own running RMS, so CCE's per-parameter multiplier would be normalised away "
                    "(cce_skip_adaptive=True); on under SGD or Adam with coupled weight decay")
        return f"CCE ({mode}): on"
    name = type(optimizer).__name__
    if cce_skipped_for(config, optimizer):
        return (f"CCE ({mode}): off for this {name}: it divides each parameter's gradient by its own running RMS, "
                "so CCE's per-parameter multiplier would be normalised away (cce_skip_adaptive=True; set it False "
                "to keep CCE)")
    return f"CCE ({mode}): on under {name}"


class CCEState:
    """The relative-CCE reference point."""

    def __init__(self, config: CosmicConfig) -> None:
        self.config = config
        self.mean_e: float | None = None
        self._cache: list[float] | None = None
        self._cache_key: tuple | None = None

    def multiplier(self, e_p: float, initial_mean: Callable[[], Iterable[float]]) -> float:
        """The factor for a gradient with efficiency ``e_p`` this step."""
        if self.config.cce is CCEMode.RELATIVE and self.mean_e is None:
            self.mean_e = policy.mean_efficiency(initial_mean())
        return policy.cce_multiplier(e_p, self.mean_e, self.config)

    def multipliers(self, values: list[float], version: int,
                    initial_mean: Callable[[], Iterable[float]]) -> list[float]:
        """Every parameter's factor for the readings ``values`` (version ``version``), as
        :meth:`multiplier` gives each; computed once per (readings, mean) pair."""
        if self.config.cce is CCEMode.RELATIVE and self.mean_e is None:
            self.mean_e = policy.mean_efficiency(initial_mean())
        key = (version, self.mean_e)
        if self._cache is None or self._cache_key != key:
            self._cache = [policy.cce_multiplier(v, self.mean_e, self.config) for v in values]
            self._cache_key = key
        return self._cache

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
        self._cache = None
