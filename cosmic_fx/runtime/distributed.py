"""What a runtime needs under ``torch.distributed``: the process group, identical decisions on every
rank, and a DistributedDataParallel reducer that survives CDG's freeze events.

* ``E_out`` differs per rank (each rank sees its own shard of the batch): the runtime all-reduces
  the sums it is made of (``sum |T|``, ``sum -p log p``, ``numel``), so every rank gets ``E_out`` of
  the full batch, right after the forward (a root forward hook run outside dynamo; on the first step
  of compiled DDP, before that hook exists, each bucket's graph returns its output's sums) and before
  DDP's gradient all-reduces start. Every training forward all-reduces them, on every rank: no
  collective the runtime calls depends on per-rank state (which parameters got a gradient, which
  readings are due), only on step counts, so no rank can wait in a collective the other skipped.
* ``E(p)`` is computed from parameters that DDP keeps identical on every rank, but the freeze
  decision itself is broadcast from rank 0 (a mask of one byte per parameter, every
  ``cdg_interval`` steps, at the optimizer step every rank takes), so that the frozen sets cannot
  diverge.
* DDP's reducer is built for the parameters that required grad when DDP was constructed; a
  parameter that stops requiring grad would never be marked ready ("Expected to have finished
  reduction in the prior iteration ..."). At each freeze event the runtime rebuilds the reducer for
  the parameters that require grad now, as ``DistributedDataParallel.__setstate__`` does, after DDP's
  own end-of-backward work (a callback queued from the runtime's callback runs after DDP's).
* Seed CDG's dropped gradient must still take part in the all-reduce: it is dropped after it.
* The fused update (``cce_fused``) would step on a gradient not yet all-reduced: refused.
* FSDP2 shards dim 0, the dimension ``E(p)``'s softmax runs over: CDG/CCE are refused on sharded
  parameters (the QCI/CSC rewrite itself trains under FSDP2 with ``cdg="off", cce="off"``).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

__all__ = ["DistributedContext", "active_ddp", "check_not_sharded", "check_not_wrapped", "rebuild_reducer",
           "why_not_rebuildable"]


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def active_ddp() -> nn.Module | None:
    """The ``DistributedDataParallel`` wrapper whose forward is running now, if any."""
    getter = _active_ddp_getter()
    return getter() if getter is not None else None


@functools.cache
def _active_ddp_getter():
    """``DistributedDataParallel._get_active_ddp_module`` (looked up once: it is read on every forward)."""
    try:
        from torch.nn.parallel import DistributedDataParallel
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return getattr(DistributedDataParallel, "_get_active_ddp_module", None)


def _wrapper_kind(model: nn.Module) -> str | None:
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return "DistributedDataParallel"
    if isinstance(model, DataParallel):
        return "DataParallel"
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    if any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules()):
        return "FSDP"
    return None


def check_not_wrapped(model: nn.Module, what: str) -> None:
    """Refuse a model wrapped for data parallelism before it was transformed: its wrapper would not
    know the new parameters (QCIs) and would never all-reduce them. A transformed model wrapped
    afterwards (``DistributedDataParallel(cosmic_fx.transform(model))``) is fine."""
    from ..transform import transform_info

    inner = getattr(model, "module", model) if type(model).__name__ in ("DistributedDataParallel",
                                                                         "DataParallel") else model
    if transform_info(inner) is not None:
        return
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


_REQUIRED = ("_build_params_for_reducer", "_build_debug_param_to_name_mapping", "_ddp_init_helper", "reducer",
             "static_graph", "_comm_hooks", "logger")


def why_not_rebuildable(ddp: nn.Module) -> str | None:
    """``None`` when calibrated CDG can rebuild this wrapper's reducer; else the reason.

    The rebuild relies on DistributedDataParallel internals (those ``__setstate__`` uses); a torch
    version without them, or a DDP feature whose state lives outside them, is refused up front
    rather than trained with wrong gradients.
    """
    missing = [a for a in _REQUIRED if not hasattr(ddp, a)]
    if missing:
        return f"torch {torch.__version__}'s DistributedDataParallel lacks {missing}"
    if getattr(ddp, "_use_python_reducer", False):
        return "the Python reducer (optimize_ddp='python_reducer', compiled autograd) is not supported"
    if getattr(ddp, "mixed_precision", None) is not None:
        return "DDP's mixed_precision (a built-in comm hook, parameter casts) is not supported"
    if getattr(ddp, "_delay_all_reduce_all_params", False):
        return "delay_all_reduce_named_params covering every parameter is not supported"
    if any(hasattr(p, "_in_backward_optimizers") for p in ddp.module.parameters()):
        return "an optimizer applied in backward (_apply_optimizer_in_backward) is not supported"
    try:  # a built-in comm hook is named in the logging data but cannot be re-registered
        name = ddp._get_ddp_logging_data().get("comm_hook")
    except Exception:  # noqa: BLE001 - logging data is diagnostic only
        name = None
    if name and not ddp._comm_hooks:
        return f"a built-in comm hook ({name}) cannot be registered again after a rebuild"
    return None


def rebuild_reducer(ddp: nn.Module) -> None:
    """Rebuild a DDP wrapper's reducer (and its buckets) for the parameters that require grad now.

    Call it on every rank with the same frozen set, after the step's gradient reduction finished.
    What ``DistributedDataParallel.__setstate__`` does, plus what a live wrapper also holds: the
    user's comm hooks (they live on the reducer) and the static-graph state.
    """
    import torch.distributed as dist

    ddp.reducer._remove_autograd_hooks()  # do not rely on the old reducer being garbage-collected
    parameters, expect_sparse_gradient = ddp._build_params_for_reducer()
    mapping = ddp._build_debug_param_to_name_mapping(parameters)
    ddp._ddp_init_helper(parameters, expect_sparse_gradient, mapping, ddp.static_graph)
    if ddp.static_graph:
        ddp.reducer._set_static_graph()
        ddp.logger._set_static_graph()
        ddp._static_graph_delay_allreduce_enqueued = False
    for hook, state in ddp._comm_hooks:
        ddp.logger._set_comm_hook_name(hook.__qualname__)
        dist._register_comm_hook(ddp.reducer, state, hook)
    ddp._has_rebuilt_buckets = False


def check_not_sharded(model: nn.Module, config) -> None:
    """Refuse CDG/CCE on FSDP2-sharded parameters: ``E(p)`` of a dim-0 shard is not ``E(p)``."""
    if not config.hooks_enabled:
        return
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return
    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise TypeError(
            "cosmic_fx: CDG and CCE need each parameter whole, but this model's parameters are sharded "
            "(FSDP2 fully_shard / DTensor): E(p) takes a softmax over dim 0, which is the dimension FSDP "
            "shards, so a shard's efficiency is not the parameter's (measured: 0.08 vs 0.32). Use "
            "DistributedDataParallel, or CosmicConfig(cdg='off', cce='off') to train the QCI/CSC rewrite "
            "under FSDP2."
        )


class DistributedContext:
    """The process group a runtime reduces over (the default one), or nothing outside distributed runs."""

    def __init__(self) -> None:
        dist = _dist()
        self.world_size = dist.get_world_size() if dist is not None else 1
        self.rank = dist.get_rank() if dist is not None else 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of a tensor over the ranks."""
        dist = _dist()
        out = value.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def broadcast_set(self, chosen: frozenset[int], n: int, device: torch.device) -> frozenset[int]:
        """Rank 0's ``chosen`` on every rank."""
        dist = _dist()
        mask = torch.zeros(n, dtype=torch.uint8, device=device)
        if chosen:
            mask[list(chosen)] = 1
        dist.broadcast(mask, src=0)
        return frozenset(int(i) for i in mask.nonzero().flatten().tolist())
