"""What a runtime needs under ``torch.distributed``: the process group, identical decisions on every
rank, and a DistributedDataParallel reducer that survives CDG's freeze events.

* ``E_out`` differs per rank (each rank sees its own shard of the batch): before ``E(p)`` is measured
  against it, it is averaged over the process group (one scalar all-reduce, right after the forward,
  outside any graph and before DDP's gradient all-reduces start).
* ``E(p)`` is computed from parameters that DDP keeps identical on every rank, but the freeze
  decision itself is broadcast from rank 0 (a mask of one byte per parameter, every
  ``cdg_interval`` steps), so that the frozen sets cannot diverge.
* DDP's reducer is built for the parameters that required grad when DDP was constructed; a
  parameter that stops requiring grad would never be marked ready ("Expected to have finished
  reduction in the prior iteration ..."). At each freeze event the runtime rebuilds the reducer for
  the parameters that require grad now, as ``DistributedDataParallel.__setstate__`` does.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DistributedContext", "active_ddp", "check_not_wrapped", "rebuild_reducer"]


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def active_ddp() -> nn.Module | None:
    """The ``DistributedDataParallel`` wrapper whose forward is running now, if any."""
    try:
        from torch.nn.parallel import DistributedDataParallel
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    getter = getattr(DistributedDataParallel, "_get_active_ddp_module", None)
    return getter() if getter is not None else None


def _wrapper_kind(model: nn.Module) -> str | None:
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return "DistributedDataParallel"
    if isinstance(model, DataParallel):
        return "DataParallel"
    if any(type(m).__name__.startswith("FSDP") or type(m).__name__ == "FullyShardedDataParallel"
           for m in model.modules()):
        return "FSDP"
    return None


def check_not_wrapped(model: nn.Module, what: str) -> None:
    """Refuse a model already wrapped for data parallelism: its wrapper would not know the new
    parameters (QCIs) and would never all-reduce them."""
    kind = _wrapper_kind(model)
    if kind is None:
        return
    raise TypeError(
        f"{what} got a model wrapped in {kind}. Transform first, then wrap: "
        "tm = cosmic_fx.transform(model, config); ddp = DistributedDataParallel(tm); "
        "compiled = cosmic_fx.compile(ddp) (or torch.compile(ddp, backend='cosmic')). A wrapper built "
        "before the transform does not know the QCI parameters, so they would never be all-reduced and "
        "would drift apart across ranks."
    )


def rebuild_reducer(ddp: nn.Module) -> None:
    """Rebuild a DDP wrapper's reducer (and its buckets) for the parameters that require grad now."""
    parameters, expect_sparse_gradient = ddp._build_params_for_reducer()
    mapping = ddp._build_debug_param_to_name_mapping(parameters)
    ddp._ddp_init_helper(parameters, expect_sparse_gradient, mapping, ddp.static_graph)
    if ddp.static_graph:
        ddp.reducer._set_static_graph()


class DistributedContext:
    """The process group a runtime reduces over (the default one), or nothing outside distributed runs."""

    def __init__(self) -> None:
        dist = _dist()
        self.world_size = dist.get_world_size() if dist is not None else 1
        self.rank = dist.get_rank() if dist is not None else 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a 0-d tensor over the ranks (gloo has no AVG: sum, then divide)."""
        dist = _dist()
        out = value.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out / self.world_size

    def broadcast_set(self, chosen: frozenset[int], n: int, device: torch.device) -> frozenset[int]:
        """Rank 0's ``chosen`` on every rank."""
        dist = _dist()
        mask = torch.zeros(n, dtype=torch.uint8, device=device)
        if chosen:
            mask[list(chosen)] = 1
        dist.broadcast(mask, src=0)
        return frozenset(int(i) for i in mask.nonzero().flatten().tolist())
