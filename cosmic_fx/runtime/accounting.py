"""What ran inside compiled graphs, and what did not.

The backend tells the runtime each time one of its compiled graphs runs a training forward, and
which of the runtime's parameters that graph reads. At the end of each backward the runtime knows:

* whether the step ran without any compiled graph (dynamo's ``recompile_limit`` hit, then eager
  fallback): a warning, :attr:`CompileAccounting.uncompiled_steps`;
* which parameters received gradients from code outside every compiled graph (the eager regions
  after a graph break: an LSTM, ``nn.Transformer``'s mask check): :attr:`outside_graphs`. They are
  hooked like the rest; this only says where their gradients came from.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection

import torch

__all__ = ["CompileAccounting"]

_NONE: frozenset[int] = frozenset()


def _dynamo_hit_recompile_limit() -> bool:
    """Whether dynamo has recorded a recompile-limit hit in this process (since its last reset)."""
    from torch._dynamo.utils import counters

    return any(str(k).startswith("Dynamo recompile limit exceeded") for k in counters.get("unimplemented", {}))


class CompileAccounting:
    """Per-step bookkeeping of compiled forwards, for one runtime."""

    def __init__(self) -> None:
        self.compiled = False  # a compiled cosmic graph has run for this model
        self.uncompiled_steps = 0
        self.recompile_limit_hit = False
        self.outside_graphs: set[int] = set()  # parameter indices ever trained outside compiled graphs
        self._forwards = 0
        self._covered: frozenset[int] = _NONE  # the parameters read by this step's compiled forwards

    def note_forward(self, covered: frozenset[int]) -> None:
        self.compiled = True
        self._forwards += 1
        covered = covered if type(covered) is frozenset else frozenset(covered)
        self._covered = covered if self._covered is _NONE else self._covered | covered  # (no copy for one graph)

    def one_graph_reads(self, i: int) -> bool:
        """Whether this step's training forwards so far were one compiled graph's, which reads parameter
        ``i``, and no step has trained a parameter outside compiled graphs: then that graph's backward
        (one autograd node) wrote every gradient of the step."""
        return self._forwards == 1 and not self.outside_graphs and i in self._covered

    def end_of_step(self, step: int, with_grads: Collection[int], sets_used: int, max_sets: int) -> list[int]:
        """Close a step (``with_grads``: the indices that received gradients in it); returns, sorted,
        those whose gradients came from outside compiled graphs."""
        outside: list[int] = []
        if self.compiled:
            if self._forwards == 0:
                self._report_uncompiled(step, sets_used, max_sets)
            else:
                covered = self._covered
                outside = [i for i in with_grads if i not in covered]
                if outside:
                    outside.sort()
                    self.outside_graphs.update(outside)
        self._forwards = 0
        self._covered = _NONE
        return outside

    def _report_uncompiled(self, step: int, sets_used: int, max_sets: int) -> None:
        self.uncompiled_steps += 1
        hit = _dynamo_hit_recompile_limit()
        self.recompile_limit_hit = self.recompile_limit_hit or hit
        if self.uncompiled_steps > 1:
            return
        limit = torch._dynamo.config.recompile_limit
        why = (f"dynamo hit torch._dynamo.config.recompile_limit ({limit}) and ran the model eagerly"
               if hit else "the model ran outside its compiled graph")
        warnings.warn(
            f"cosmic_fx: training step {step} ran without the compiled cosmic graph: {why}. This run has "
            f"used {sets_used} distinct frozen sets (counting none; cdg_max_sets={max_sets}), and each one is "
            "a compiled graph. Raise torch._dynamo.config.recompile_limit or lower cdg_max_sets; "
            "TORCH_LOGS=recompiles lists every recompilation. CosmicRuntime.uncompiled_steps counts the steps "
            "affected.",
            RuntimeWarning,
            stacklevel=3,
        )
