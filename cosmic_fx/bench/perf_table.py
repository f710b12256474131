"""One row of the ``cosmic-fx bench perf`` table: a measured ratio against its goal."""

from __future__ import annotations

import dataclasses
import math

__all__ = ["COLUMNS", "Row"]

COLUMNS = ["#", "target", "measured", "goal", "status", "reference arms"]


@dataclasses.dataclass
class Row:
    """One line of the table: ``measured`` passes when it is at most ``goal`` (``None``: report only)."""

    item: str
    target: str
    measured: float
    goal: float | None
    references: str = ""
    unit: str = "x"

    @property
    def status(self) -> str:
        if self.goal is None:
            return "info"
        if not math.isfinite(self.measured):
            return "error"
        return "pass" if self.measured <= self.goal else "short"

    def cells(self) -> list[str]:
        goal = "—" if self.goal is None else f"≤ {self.goal:g}{self.unit}"
        return [self.item, self.target, f"{self.measured:.3g}{self.unit}", goal, self.status, self.references]
