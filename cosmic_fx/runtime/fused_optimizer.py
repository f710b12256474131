"""`FusedOptimizer`: the handle of a model's fused CCE update (backward, step check, checkpoints).

With ``CosmicConfig.cce_fused`` the update of every parameter happens inside backward (see
:mod:`.fused`). :func:`fused_optimizer` returns the handle a training loop uses in place of an
optimizer:

* ``opt.backward(loss)`` — eagerly it is ``loss.backward()``. For a model compiled by
  :func:`cosmic_fx.compile` (or ``torch.compile(..., backend="cosmic")``) it runs the backward through
  *compiled autograd* with the model's lowering: the post-accumulate-grad hooks are traced into the
  compiled backward, so each gradient is used and freed as soon as it is computed. A plain
  ``loss.backward()`` still updates inside the hooks, but the compiled backward returns every
  gradient at once first, so it saves no memory (measured: ``cosmic-fx bench perf --sections memory``).
* ``opt.step()`` — the update already happened; it checks that exactly one backward ran since the
  previous ``step()``: two mean gradient accumulation, which cannot work when every backward updates.
* ``opt.zero_grad()`` — nothing to do (the gradients were freed); there for drop-in loops.
* ``opt.state_dict()`` / ``opt.load_state_dict()`` — the update state (momentum buffers, Adam
  moments and step counts), kept apart from ``model.state_dict()`` as ``torch.optim`` keeps it;
  the runtime's own state (step count, readings) travels in ``model.state_dict()``. Save both to
  resume a run bit for bit.

Stepping a ``torch.optim`` optimizer over parameters that a fused runtime updates would update them
twice: a global optimizer step pre-hook (installed with the first fused runtime) raises instead.
Clipping by global norm cannot work either (no moment holds every gradient); torch's
``clip_grad_norm_`` would find no gradients and return 0.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ..checks import check_module
from ..config import CCEFused, CCEMode, CDGMode, CosmicConfig

__all__ = ["FusedOptimizer", "compiled_autograd_compiler", "fused_optimizer", "traced_backward", "watch_double_updates"]


@functools.lru_cache(maxsize=None)
def _compiler(lower: str) -> Any:
    import torch._dynamo

    return torch._dynamo.optimize({"inductor": "inductor", "aot_eager": "aot_eager", "eager": "eager"}[lower])


def compiled_autograd_compiler(config: CosmicConfig) -> Any:
    """What compiled autograd hands its backward graph to: dynamo with the config's lowering."""
    return _compiler(config.lower.value)


class FusedOptimizer:
    """The fused CCE update of one model, seen as an optimizer (see the module docstring).

    Get it with :func:`fused_optimizer`; it holds no state of its own (the model's runtime does).

    Example:
        >>> cfg = cosmic_fx.CosmicConfig(cce_fused="adamw", cce_fused_lr=1e-3)   # doctest: +SKIP
        >>> cm = cosmic_fx.compile(model, cfg)                                      # doctest: +SKIP
        >>> opt = cosmic_fx.fused_optimizer(cm)                                     # doctest: +SKIP
        >>> for x, y in batches:                                                    # doctest: +SKIP
        ...     opt.backward(loss_fn(cm(x), y))   # update + free each gradient inside backward
        ...     opt.step()                        # checks: one backward per step
        >>> torch.save({"model": cm.state_dict(), "fused": opt.state_dict()}, "ckpt.pt")  # doctest: +SKIP
    """

    def __init__(self, runtime) -> None:
        self._runtime = weakref.ref(runtime)

    @property
    def runtime(self):
        rt = self._runtime()
        if rt is None:
            raise RuntimeError("the model of this FusedOptimizer was garbage-collected")
        return rt

    @property
    def kind(self) -> str:
        return self.runtime.config.cce_fused.value

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        """Run the backward of ``loss``, updating every parameter inside it (see the module docstring).

        Args:
            loss: a scalar tensor from the model's forward.
            **kwargs: passed to ``loss.backward`` (``retain_graph=...``).
        """
        rt = self.runtime
        if not isinstance(loss, torch.Tensor) or loss.grad_fn is None:
            got = type(loss).__name__ if not isinstance(loss, torch.Tensor) else "a tensor without grad_fn"
            raise TypeError(f"FusedOptimizer.backward expects a loss tensor with a graph (grad_fn); got {got}")
        if rt.mode is None:
            raise RuntimeError(
                "FusedOptimizer.backward: the model's cosmic hooks are not active, so nothing would update it. "
                "Compile it with cosmic_fx.compile(model, config) or call cosmic_fx.attach_hooks(model) first."
            )
        if rt.mode == "compiled":
            traced_backward(rt, loss, **kwargs)
        else:
            loss.backward(**kwargs)

    def step(self) -> None:
        """Check that one backward (one update) ran since the previous ``step()``; the update is done."""
        rt = self.runtime
        n, rt.backwards_since_step = rt.backwards_since_step, 0
        if n > 1:
            raise RuntimeError(
                f"cosmic fused update: {n} backward passes since the last step(). Gradient accumulation cannot "
                f"work with cce_fused={self.kind!r}: every backward already updated the parameters, with its own "
                "gradient. Use one backward per step (a larger batch), or cce_fused='off' with your optimizer."
            )

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do: the fused update freed every gradient inside backward."""

    def state_dict(self) -> dict[str, Any]:
        """The update state: ``kind``, parameter ``names``, and ``state`` (per parameter index)."""
        rt = self.runtime
        return rt.fused.state_dict(rt.names)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (a model built and configured as for the run that saved it)."""
        rt = self.runtime
        rt.fused.load_state_dict(state_dict, rt.names, rt._params())

    def __repr__(self) -> str:
        rt = self._runtime()
        if rt is None:
            return "FusedOptimizer(<model collected>)"
        cfg = rt.config
        return f"FusedOptimizer(kind={cfg.cce_fused.value!r}, lr={cfg.cce_fused_lr}, params={len(rt.names)})"


def fused_optimizer(model: nn.Module) -> FusedOptimizer:
    """The :class:`FusedOptimizer` of a model whose config sets ``cce_fused``.

    Args:
        model: a model from :func:`cosmic_fx.transform` / :func:`cosmic_fx.compile`, or one given
            to :func:`cosmic_fx.attach_hooks` (also compiled or DDP-wrapped).

    Example:
        >>> import cosmic_fx
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> cfg = cosmic_fx.CosmicConfig.off(cce_fused="sgd", cce_fused_lr=0.1, cce_fused_momentum=0.9)
        >>> opt = cosmic_fx.fused_optimizer(cosmic_fx.transform(model, cfg))
        >>> opt
        FusedOptimizer(kind='sgd', lr=0.1, params=4)
    """
    from . import runtime_of

    check_module(model, "cosmic_fx.fused_optimizer")
    rt = runtime_of(model)
    if rt is None:
        raise ValueError(
            f"{type(model).__name__} has no cosmic runtime: build it with cosmic_fx.transform / cosmic_fx.compile "
            "(or attach_hooks) and a CosmicConfig with cce_fused='sgd' or 'adamw' and cce_fused_lr"
        )
    if rt.config.cce_fused is CCEFused.OFF:
        raise ValueError(
            "this model's CosmicConfig has cce_fused='off': there is no fused update to drive. Set cce_fused='sgd' "
            "or 'adamw' with cce_fused_lr, or use a torch.optim optimizer as usual."
        )
    return FusedOptimizer(rt)


# ---------------------------------------------------------------------------------------------- compiled backward
def _leaves_reached(loss: torch.Tensor) -> list[torch.Tensor]:
    """The leaf tensors whose gradients ``loss.backward()`` accumulates (its graph's AccumulateGrad nodes)."""
    seen, stack, leaves = set(), [loss.grad_fn], []
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)
        if var is not None:
            leaves.append(var)
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return leaves


def traced_backward(rt, loss: torch.Tensor, **backward_kwargs: Any) -> None:
    """``loss.backward()`` through compiled autograd, the fused update traced into it.

    Called by :meth:`FusedOptimizer.backward` for a compiled model (``rt``: its runtime). Every
    decision (``E(p)`` readings, CDG, the CCE multiplier) is taken here, before the backward, for
    the parameters the backward will reach: they read only the parameters, which
    are not updated before their own hook, so the decisions equal the eager hooks'. The hooks,
    traced into the compiled backward, then scale each gradient by its 0-d multiplier tensor,
    apply the update and free the gradient; one compiled graph serves every step.
    """
    if rt.config.cdg is CDGMode.SEED:
        raise RuntimeError(
            "cosmic fused backward: cdg='seed' skips another set of parameters every step, which a compiled "
            "backward cannot follow without recompiling each time. Use cdg='off' or 'calibrated', or call "
            "loss.backward() (the update still happens inside backward, without the memory saving under "
            "torch.compile)."
        )
    reached = rt.indices_of(_leaves_reached(loss))
    params = rt._params()
    rt.fused.allocate(params, with_scale=rt.config.cce is not CCEMode.OFF)
    for i in sorted(reached):
        p = params[i]
        if p is not None and p.requires_grad:
            rt._decide(i, p)
    from torch._dynamo import compiled_autograd

    compiler = compiled_autograd_compiler(rt.config)
    rt._traced = True
    try:
        with compiled_autograd._enable(compiler):
            loss.backward(**backward_kwargs)
    finally:
        rt._traced = False
    rt._end_of_backward()


# ---------------------------------------------------------------------------------------------- double updates
_FUSED_RUNTIMES: weakref.WeakSet = weakref.WeakSet()
_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> (generation, param refs)
_GENERATION = [0]
_HOOK: list = []


def watch_double_updates(runtime) -> None:
    """Make every ``torch.optim`` step check that it does not step this runtime's parameters."""
    _FUSED_RUNTIMES.add(runtime)
    _GENERATION[0] += 1
    if not _HOOK:
        _HOOK.append(register_optimizer_step_pre_hook(_check_optimizer))


def _check_optimizer(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    active = [rt for rt in list(_FUSED_RUNTIMES) if rt.mode is not None]
    if not active:
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    key = (_GENERATION[0], tuple(weakref.ref(p) for p in params))  # never an id() a new tensor could reuse
    if _CHECKED.get(optimizer) == key:
        return  # nothing changed since this optimizer's last (clean) step
    for rt in active:
        hit = sorted(rt.indices_of(params))
        if hit:
            names = [rt.names[i] for i in hit]
            raise RuntimeError(
                f"{type(optimizer).__name__}.step() would update {len(hit)} parameter(s) that the cosmic fused update "
                f"(cce_fused={rt.config.cce_fused.value!r}) already updates inside backward, e.g. {names[:3]}: they "
                "would be updated twice. Drop them from this optimizer (use cosmic_fx.fused_optimizer(model) for "
                "the step, state_dict and checks), or set cce_fused='off' to train with this optimizer."
            )
    _CHECKED[optimizer] = key
