"""The per-model CDG/CCE runtime: ownership, readings, CDG, CCE, compile accounting, checkpoints,
distributed training. The public entry points are re-exported by :mod:`cosmic_fx`."""

from __future__ import annotations

import torch
from torch import nn

from ..checks import check_module
from ..config import CosmicConfig
from .core import CosmicRuntime, runtimes_of_param
from .distributed import check_not_wrapped
from .eager import OutputTracker
from .fused_optimizer import FusedOptimizer, fused_optimizer
from .state import CosmicState

__all__ = ["STATE_NAME", "CosmicRuntime", "CosmicState", "FusedOptimizer", "attach_hooks", "detach_hooks",
           "fused_optimizer", "hooks_of", "runtime_of", "runtimes_of_param", "watch_optimizer"]

STATE_NAME = "cosmic_state"
_PLAIN_ATTR = "_cosmic_runtime"  # the runtime of a plain (not transformed) model given to attach_hooks


def _unwrap(model: nn.Module) -> nn.Module:
    import torch

    while True:
        if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod
        elif type(model).__name__ in ("DistributedDataParallel", "DataParallel") and hasattr(model, "module"):
            model = model.module
        else:
            return model


def runtime_of(obj: nn.Module | torch.Tensor) -> CosmicRuntime | None:  # noqa: F821
    """The :class:`CosmicRuntime` of a model (transformed, compiled, DDP-wrapped) or of a parameter.

    Returns ``None`` when the model has none (neither transformed nor given to ``attach_hooks`` /
    the backend).

    Example:
        >>> tm = cosmic_fx.transform(model)                # doctest: +SKIP
        >>> cosmic_fx.runtime_of(tm).steps                # doctest: +SKIP
        0
    """
    import torch

    if isinstance(obj, torch.Tensor):
        found = runtimes_of_param(obj)
        active = [rt for rt in found if rt.mode is not None]
        return (active or found or [None])[-1]
    check_module(obj, "cosmic_fx.runtime_of")
    model = _unwrap(obj)
    for m in model.modules():
        if isinstance(m, CosmicState):
            rt = m.runtime
            if not rt.bound:
                rt.bind(model)
            return rt
    rt = model.__dict__.get(_PLAIN_ATTR)
    if rt is not None:
        return rt
    # a plain model compiled through the entry point: its runtime is held by its parameters' hooks
    for p in model.parameters():
        for rt in runtimes_of_param(p):
            if not rt.transformed or rt.model is model:
                return rt
    return None


def hooks_of(obj: nn.Module | torch.Tensor) -> CosmicRuntime | None:  # noqa: F821
    """The runtime whose CDG/CCE hooks are active on a model's (or a parameter's) parameters, else ``None``."""
    import torch

    if not isinstance(obj, torch.Tensor):
        check_module(obj, "cosmic_fx.hooks_of")
    rt = runtime_of(obj)
    return rt if rt is not None and rt.mode is not None else None


def attach_hooks(model: nn.Module, config: CosmicConfig | None = None) -> CosmicRuntime:
    """Activate CDG/CCE on a model for eager training (no ``torch.compile`` needed).

    A model returned by :func:`cosmic_fx.transform` already has its runtime (its state is in
    ``model.state_dict()``); ``config`` may then be omitted (it must equal the transform's, but for
    ``lower``). A plain model gets a new runtime, kept on the model itself. ``E_out`` is taken from
    each training forward's output (its first floating-point tensor). ``detach_hooks(model)`` (or
    ``.remove()`` on the result) detaches everything.

    Args:
        model: a transformed model, or any ``nn.Module``.
        config: the rules to apply (default: the transform's, or ``CosmicConfig()``).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        >>> rt = attach_hooks(model, cosmic_fx.CosmicConfig.seed())   # doctest: +SKIP
        >>> rt.num_hooked   # doctest: +SKIP
        4
    """
    check_module(model, "cosmic_fx.attach_hooks")
    if config is not None and not isinstance(config, CosmicConfig):
        raise TypeError(f"attach_hooks expects a CosmicConfig as config; got {type(config).__name__}")
    check_not_wrapped(model, "cosmic_fx.attach_hooks")
    model = _unwrap(model)  # DDP(transform(model)): its runtime is the transformed model's
    rt = runtime_of(model)
    if rt is not None and rt.transformed:
        _check_same_config(rt, config)
    elif rt is not None and rt.mode is not None:
        raise RuntimeError(
            f"{type(model).__name__} already has active cosmic hooks (from attach_hooks or the cosmic backend); "
            "call cosmic_fx.detach_hooks(model) first"
        )
    if rt is None or not rt.transformed:
        rt = CosmicRuntime(config or CosmicConfig(), transformed=False)
        rt.bind(model)
        model.__dict__[_PLAIN_ATTR] = rt
    rt.activate("eager")
    if rt._tracker is None:
        rt._tracker = OutputTracker(model, rt)
    return rt


def _check_same_config(rt: CosmicRuntime, config: CosmicConfig | None) -> None:
    if config is None or config.replace(lower=rt.config.lower) == rt.config:
        return
    mine, given = rt.config.to_options(), config.to_options()
    diff = ", ".join(f"{k}: {mine[k]!r} (transform) vs {given[k]!r}"
                     for k in mine if k != "lower" and mine[k] != given[k])
    raise ValueError(
        f"this model was transformed with another CosmicConfig ({diff}); its runtime applies the transform's "
        "config. Pass config=None, or transform the original model with the config you want."
    )


def detach_hooks(model: nn.Module) -> int:
    """Remove the cosmic hooks from a model's parameters (its state is kept); returns how many runtimes
    were detached (0 or 1).

    Example:
        >>> cosmic_fx.detach_hooks(tm)   # doctest: +SKIP
        1
    """
    check_module(model, "cosmic_fx.detach_hooks")
    rt = runtime_of(model)
    if rt is None or (rt.mode is None and not rt.num_hooked):
        return 0
    rt.remove()
    _unwrap(model).__dict__.pop(_PLAIN_ATTR, None)
    return 1


def watch_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> CosmicRuntime:
    """End each of the model's cosmic steps at ``optimizer.step()``: with gradient accumulation, one
    step per optimizer step (not per backward), decided on the accumulated gradients.

    The runtime also finds an optimizer over the model's parameters by itself, on that optimizer's
    first ``step()``; calling this before training makes the first step count too. With
    ``optimizer=None`` a step ends only at ``runtime_of(model).optimizer_step()`` (loops that update
    the parameters themselves). Refused with the fused update (``cce_fused``): it updates inside
    every backward, so every backward is a step.

    Args:
        model: a transformed, compiled or DDP-wrapped model with a cosmic runtime.
        optimizer: a ``torch.optim`` optimizer over the model's parameters, or ``None``.

    Example:
        >>> tm = cosmic_fx.transform(model)                        # doctest: +SKIP
        >>> opt = torch.optim.SGD(tm.parameters(), lr=0.1)         # doctest: +SKIP
        >>> cm = cosmic_fx.compile(tm)                             # doctest: +SKIP
        >>> rt = cosmic_fx.watch_optimizer(cm, opt)                # doctest: +SKIP
        >>> for xs, ys in micro_batches:                           # doctest: +SKIP
        ...     (loss_fn(cm(xs), ys) / len(micro_batches)).backward()
        >>> opt.step(); rt.steps                                   # doctest: +SKIP
        1
    """
    check_module(model, "cosmic_fx.watch_optimizer")
    rt = runtime_of(model)
    if rt is None:
        raise ValueError(
            f"{type(model).__name__} has no cosmic runtime, so there are no steps to count: build it with "
            "cosmic_fx.transform / cosmic_fx.compile, or call cosmic_fx.attach_hooks(model) first"
        )
    rt.watch_optimizer(optimizer)
    return rt
