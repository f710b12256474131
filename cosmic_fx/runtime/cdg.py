"""Cosmic dynamic graph (CDG) state: which parameters get no update.

* **seed** (the text): in a step where ``E(p) < E_out``, ``p``'s gradient is dropped.
* **calibrated** (the default): consecutive low readings are counted; every ``cdg_interval`` steps
  :func:`cosmic_fx.policy.choose_frozen_set` picks the set to hold frozen (``requires_grad_(False)``:
  backward then skips their gradient work), and the previous set is thawed.

The decisions are :mod:`cosmic_fx.policy`'s; this class keeps the counters and sets between steps
(and in checkpoints) and applies a decision to the parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from .. import policy
from ..config import CosmicConfig

__all__ = ["CDGState"]


class CDGState:
    """Calibrated CDG's counters and sets, indexed by the runtime's parameter index.

    Args:
        n: the number of parameters.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.low_count: list[int] = [0] * n
        self.last_e: list[float] = [math.nan] * n
        self.frozen: frozenset[int] = frozenset()
        self.sets_used: list[frozenset[int]] = [frozenset()]
        self.since_decision = 0
        self.events: list[tuple[int, tuple[int, ...]]] = []  # (step, indices frozen from then on)

    def note_reading(self, i: int, value: float, low: bool | None) -> None:
        self.low_count[i] = policy.next_low_count(self.low_count[i], low)
        if low is not None:
            self.last_e[i] = value

    def decide(self, protected: set[int], config: CosmicConfig) -> frozenset[int]:
        """The set to hold frozen from now on (:func:`cosmic_fx.policy.choose_frozen_set`)."""
        candidates = {i: c for i, c in enumerate(self.low_count) if c}
        wanted, new = policy.choose_frozen_set(
            candidates, dict(enumerate(self.last_e)), self.frozen, protected, self.n, self.sets_used, config
        )
        if new:
            self.sets_used.append(wanted)
        return wanted

    def apply(self, wanted: frozenset[int], step: int, params: Sequence[torch.Tensor | None],
              on_change: Callable[[], None] | None = None) -> bool:
        """Freeze ``wanted``, thaw the rest of the previous set; returns whether anything changed."""
        if wanted == self.frozen:
            return False
        for i in self.frozen - wanted:
            if params[i] is not None:
                params[i].requires_grad_(True)
            self.low_count[i] = 0
        for i in wanted - self.frozen:
            if params[i] is not None:
                params[i].requires_grad_(False)
        self.frozen = wanted
        self.events.append((step, tuple(sorted(wanted))))
        if on_change is not None:
            on_change()
        return True

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, torch.Tensor]:
        def mask(s: frozenset[int]) -> list[bool]:
            return [i in s for i in range(self.n)]

        return {
            "cdg.low_count": torch.tensor(self.low_count, dtype=torch.int64),
            "cdg.last_e": torch.tensor(self.last_e, dtype=torch.float64),
            "cdg.frozen": torch.tensor(mask(self.frozen), dtype=torch.bool),
            "cdg.sets_used": torch.tensor([mask(s) for s in self.sets_used], dtype=torch.bool).reshape(-1, self.n),
            "cdg.since_decision": torch.tensor(self.since_decision, dtype=torch.int64),
            "cdg.event_steps": torch.tensor([s for s, _ in self.events], dtype=torch.int64),
            "cdg.event_sets": torch.tensor([mask(frozenset(f)) for _, f in self.events],
                                           dtype=torch.bool).reshape(-1, self.n),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> frozenset[int]:
        """Restore the counters and sets; returns the frozen set (the caller applies it)."""
        def unmask(row: torch.Tensor) -> frozenset[int]:
            return frozenset(int(i) for i in row.nonzero().flatten().tolist())

        self.low_count = [int(v) for v in state["cdg.low_count"].tolist()]
        self.last_e = [float(v) for v in state["cdg.last_e"].tolist()]
        self.sets_used = [unmask(row) for row in state["cdg.sets_used"]]
        self.since_decision = int(state["cdg.since_decision"])
        self.events = [(int(s), tuple(sorted(unmask(row)))) for s, row in zip(state["cdg.event_steps"].tolist(),
                                                                               state["cdg.event_sets"])]
        return unmask(state["cdg.frozen"])
