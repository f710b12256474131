"""`FusedOptimizer`: the handle of a model's fused update (backward, step check, checkpoints).

The update of every parameter happens inside backward, from one of two sources:

* ``cosmic_fx.fused_optimizer(model, optimizer)``: the user's own ``torch.optim`` SGD, Adam or
  AdamW (:mod:`.optim_update`): its param groups and hyperparameters, read live (LR schedulers keep
  working), its state in ``optimizer.state`` (``optimizer.state_dict()`` checkpoints the run).
  ``optimizer.step()`` stays callable: it steps only what the hooks did not (parameters of the
  optimizer that the runtime does not cover), and LR schedulers see it as usual;
* ``CosmicConfig.cce_fused`` (``"sgd"`` / ``"adamw"`` with ``cce_fused_lr``, see :mod:`.fused`):
  ``cosmic_fx.fused_optimizer(model)``.

:func:`fused_optimizer` returns the handle a training loop uses in place of an optimizer:

* ``opt.backward(loss)`` — eagerly it is ``loss.backward()``. For a model compiled by
  :func:`cosmic_fx.compile` (or ``torch.compile(..., backend="cosmic")``) it runs the backward through
  *compiled autograd* with the model's lowering: the post-accumulate-grad hooks are traced into the
  compiled backward, so each gradient is used and freed as soon as it is computed. A plain
  ``loss.backward()`` still updates inside the hooks, but the compiled backward returns every
  gradient at once first, so it saves no memory (measured: ``cosmic-fx bench perf --sections memory``).
* ``opt.step()`` — the update already happened; it checks that exactly one backward ran since the
  previous ``step()``: two mean gradient accumulation, which cannot work when every backward updates.
  With a user optimizer it then calls ``optimizer.step()`` (the same check runs there, as a step
  pre-hook, so a loop that calls ``optimizer.step()`` itself is checked too).
* ``opt.zero_grad()`` — nothing to do for the fused parameters (their gradients were freed); with a
  user optimizer it is ``optimizer.zero_grad()``.
* ``opt.state_dict()`` / ``opt.load_state_dict()`` — the update state (momentum buffers, Adam
  moments and step counts): the user optimizer's own ``state_dict()``, or the config update's,
  kept apart from ``model.state_dict()`` as ``torch.optim`` keeps it; the runtime's own state (step
  count, readings) travels in ``model.state_dict()``. Save both to resume a run bit for bit.

Stepping another ``torch.optim`` optimizer over parameters that a fused runtime updates would update
them twice: a global optimizer step pre-hook (installed with the first fused runtime) raises instead.
Clipping by global norm cannot work either: no moment holds every gradient, and nothing can see a
call to ``torch.nn.utils.clip_grad_norm_`` — after a fused backward it finds no gradient and returns
0, clipping nothing. To clip, train without the fused update (``loss.backward()``,
``clip_grad_norm_``, ``optimizer.step()``); the Hugging Face callback refuses ``max_grad_norm > 0``
with a fused update for that reason.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ..checks import check_module
from ..config import CCEFused, CDGMode, CosmicConfig, PrefixSignal
from .fused import FusedUpdate
from .optim_update import OptimizerUpdate, check_optimizer

__all__ = ["FusedOptimizer", "compiled_autograd_compiler", "fused_optimizer", "traced_backward",
           "watch_double_updates"]


@functools.cache
def _compiler(lower: str) -> Any:
    import torch._dynamo

    return torch._dynamo.optimize({"inductor": "inductor", "aot_eager": "aot_eager", "eager": "eager"}[lower])


def compiled_autograd_compiler(config: CosmicConfig) -> Any:
    """What compiled autograd hands its backward graph to: dynamo with the config's lowering."""
    return _compiler(config.lower.value)


class FusedOptimizer:
    """A model's fused update, seen as an optimizer (see the module docstring).

    Get it with :func:`fused_optimizer`; it holds no state of its own (the model's runtime, or the
    user's optimizer, does).

    Example:
        >>> cm = cosmic_fx.compile(model, cosmic_fx.CosmicConfig.fast())                # doctest: +SKIP
        >>> opt = torch.optim.AdamW(cm.parameters(), lr=1e-3, weight_decay=0.01)         # doctest: +SKIP
        >>> sched = torch.optim.lr_scheduler.StepLR(opt, step_size=100, gamma=0.5)      # doctest: +SKIP
        >>> fopt = cosmic_fx.fused_optimizer(cm, opt)                                   # doctest: +SKIP
        >>> for x, y in batches:                                                        # doctest: +SKIP
        ...     fopt.backward(loss_fn(cm(x), y))  # update + free each gradient inside backward
        ...     fopt.step()                       # checks: one backward per step
        ...     sched.step()                      # the next update reads the new group["lr"]
        >>> torch.save({"model": cm.state_dict(), "optim": opt.state_dict()}, "ckpt.pt")  # doctest: +SKIP
    """

    def __init__(self, runtime, optimizer: torch.optim.Optimizer | None = None) -> None:
        self._runtime = weakref.ref(runtime)
        self.optimizer = optimizer

    @property
    def runtime(self):
        rt = self._runtime()
        if rt is None:
            raise RuntimeError("the model of this FusedOptimizer was garbage-collected")
        return rt

    @property
    def kind(self) -> str:
        """``"sgd"`` / ``"adamw"`` (the config's update), or the user optimizer's class name, lower case."""
        if self.optimizer is not None:
            return type(self.optimizer).__name__.lower()
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
        self._check_bound(rt)
        if rt.mode == "compiled":
            traced_backward(rt, loss, **kwargs)
        else:
            loss.backward(**kwargs)

    def _check_bound(self, rt) -> None:
        if self.optimizer is None:
            return
        if not isinstance(rt.fused, OptimizerUpdate) or rt.fused.optimizer is not self.optimizer:
            raise RuntimeError(f"this FusedOptimizer's {type(self.optimizer).__name__} is no longer fused into the "
                               "model's backward (remove() was called); call cosmic_fx.fused_optimizer(model, "
                               "optimizer) again, or train with optimizer.step() as usual")
        _check_no_ddp(rt)

    def step(self) -> None:
        """Check that one backward (one update) ran since the previous ``step()``; the update is done.
        With a user optimizer, then ``optimizer.step()`` (it steps what the hooks did not, and LR
        schedulers see the step)."""
        if self.optimizer is not None:
            self._check_bound(self.runtime)
            self.optimizer.step()  # the step pre-hook checks one backward per step
            return
        _check_one_backward(self.runtime, self.kind)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do for the fused parameters (their gradients were freed inside backward); with a
        user optimizer, ``optimizer.zero_grad(set_to_none)``."""
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The update state: the user optimizer's ``state_dict()``; for the config's update ``kind``,
        parameter ``names``, and ``state`` (per parameter index)."""
        if self.optimizer is not None:
            return self.optimizer.state_dict()
        rt = self.runtime
        return rt.fused.state_dict(rt.names)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (a model built and configured as for the run that saved it)."""
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state_dict)
            return
        rt = self.runtime
        rt.fused.load_state_dict(state_dict, rt.names, rt._params())

    def remove(self) -> None:
        """Stop fusing the user optimizer into backward: from the next backward ``loss.backward();
        optimizer.step()`` trains as usual (its state is kept). Nothing to do for the config's update."""
        rt = self._runtime()
        if self.optimizer is None or rt is None:
            return
        if isinstance(rt.fused, OptimizerUpdate) and rt.fused.optimizer is self.optimizer:
            rt.fused.close()
            rt.fused = FusedUpdate(rt.config, len(rt.names))
            rt._cce_skipped = False  # decided again by the optimizers the runtime watches from now on
            for opt in list(rt._watched.keys()):
                rt._note_optimizer_kind(opt)

    def __repr__(self) -> str:
        rt = self._runtime()
        if rt is None:
            return "FusedOptimizer(<model collected>)"
        if self.optimizer is not None:
            return (f"FusedOptimizer(optimizer={type(self.optimizer).__name__}, "
                    f"groups={len(self.optimizer.param_groups)}, params={len(rt.names)})")
        cfg = rt.config
        return f"FusedOptimizer(kind={cfg.cce_fused.value!r}, lr={cfg.cce_fused_lr}, params={len(rt.names)})"


def _check_one_backward(rt, kind: str) -> None:
    n, rt.backwards_since_step = rt.backwards_since_step, 0
    if n > 1:
        what = f"cce_fused={kind!r}" if rt.config.cce_fused is not CCEFused.OFF else f"a fused {kind!r} update"
        raise RuntimeError(
            f"cosmic fused update: {n} backward passes since the last step(). Gradient accumulation cannot "
            f"work with {what}: every backward already updated the parameters, with its own "
            "gradient. Use one backward per step (a larger batch), or train without the fused update "
            "(cce_fused='off'; loss.backward() and your optimizer's step())."
        )


def _check_no_ddp(rt) -> None:
    ddp = rt._ddp() if rt._ddp is not None else None
    if ddp is not None:
        raise RuntimeError(
            "cosmic_fx.fused_optimizer cannot fuse an optimizer into backward under DistributedDataParallel: each "
            "rank would update on its local gradient before DDP all-reduces it, and the ranks would drift apart. "
            "Train with loss.backward() and optimizer.step() (without fused_optimizer)."
        )


def fused_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> FusedOptimizer:
    """Fuse an optimizer's update into the backward of a cosmic model; returns its :class:`FusedOptimizer`.

    With ``optimizer`` (a ``torch.optim.SGD``, ``Adam`` or ``AdamW`` over the model's parameters)
    every parameter it holds is stepped by its rule inside the parameter's post-accumulate-grad
    hook, with its param group's hyperparameters read at that moment (LR schedulers keep working)
    and its state in ``optimizer.state`` (``optimizer.state_dict()`` checkpoints it). Every option of
    those classes is supported (momentum, dampening, nesterov, weight decay, ``amsgrad``,
    ``maximize``, ``decoupled_weight_decay``; ``foreach`` / ``fused`` are accepted and the math is
    that of the single-tensor implementation) but ``differentiable`` and ``capturable``. Parameters
    that CDG froze get no gradient, so they are not stepped, as ``torch.optim`` skips them (a block
    that prefix CDG freezes at the end of a step has had that step's update: the decision follows
    the backward; with ``optimizer.step()`` after backward the runtime drops that gradient). The
    model's config must keep ``cce_fused="off"``. Without ``optimizer`` it returns the handle of the
    config's own fused update (``cce_fused="sgd"`` / ``"adamw"``).

    Not possible inside backward: gradient accumulation (an error at ``step()``), clipping by global
    norm (``clip_grad_norm_`` after a fused backward finds no gradient: train without the fused
    update to clip), DistributedDataParallel (an error).

    Args:
        model: a model from :func:`cosmic_fx.transform` / :func:`cosmic_fx.compile`, or one given
            to :func:`cosmic_fx.attach_hooks` (also compiled). With ``optimizer``, also any plain
            ``nn.Module`` trained eagerly: it gets a runtime that only fuses (``CosmicConfig.off()``;
            ``cosmic_fx.detach_hooks(model)`` removes it).
        optimizer: the optimizer to fuse; it must hold every parameter the model trains (for a
            transformed or compiled model, build it from that model's ``parameters()``, which include
            the QCIs the transform adds) and no parameter of another model.

    Example:
        >>> import cosmic_fx
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> tm = cosmic_fx.transform(model, cosmic_fx.CosmicConfig.off())
        >>> cosmic_fx.fused_optimizer(tm, torch.optim.AdamW(tm.parameters(), lr=1e-3))
        FusedOptimizer(optimizer=AdamW, groups=1, params=4)
        >>> cfg = cosmic_fx.CosmicConfig.off(cce_fused="sgd", cce_fused_lr=0.1, cce_fused_momentum=0.9)
        >>> cosmic_fx.fused_optimizer(cosmic_fx.transform(model, cfg))
        FusedOptimizer(kind='sgd', lr=0.1, params=4)
    """
    from . import runtime_of

    check_module(model, "cosmic_fx.fused_optimizer")
    if optimizer is not None:
        check_optimizer(optimizer)  # before anything else: the error names the supported classes
    rt = runtime_of(model)
    if rt is None and optimizer is not None:
        rt = _plain_runtime(model)
        try:
            return _fuse(model, rt, optimizer)
        except Exception:
            rt.remove()  # the model is left as it was given
            raise
    if rt is None:
        raise ValueError(
            f"{type(model).__name__} has no cosmic runtime: build it with cosmic_fx.transform / cosmic_fx.compile "
            "(or attach_hooks), then pass it with your optimizer: cosmic_fx.fused_optimizer(model, optimizer) "
            "(or use a CosmicConfig with cce_fused='sgd' or 'adamw' and cce_fused_lr)"
        )
    if optimizer is None:
        if rt.config.cce_fused is CCEFused.OFF:
            if isinstance(rt.fused, OptimizerUpdate):
                return FusedOptimizer(rt, rt.fused.optimizer)
            raise ValueError(
                "this model's CosmicConfig has cce_fused='off': there is no fused update to drive. Pass your "
                "optimizer (cosmic_fx.fused_optimizer(model, torch.optim.AdamW(model.parameters(), ...))), set "
                "cce_fused='sgd' or 'adamw' with cce_fused_lr, or use a torch.optim optimizer as usual."
            )
        return FusedOptimizer(rt)
    return _fuse(model, rt, optimizer)


def _fuse(model: nn.Module, rt, optimizer: torch.optim.Optimizer) -> FusedOptimizer:
    from . import _unwrap, attach_hooks

    if rt.config.cce_fused is not CCEFused.OFF:
        raise ValueError(
            f"this model's CosmicConfig sets cce_fused={rt.config.cce_fused.value!r}: its runtime already fuses that "
            f"update, so {type(optimizer).__name__} cannot be fused as well. Use cosmic_fx.fused_optimizer(model) "
            "alone, or a config with cce_fused='off' (and cce_fused_lr=None) to fuse your optimizer."
        )
    if type(model).__name__ in ("DistributedDataParallel", "DataParallel"):
        raise RuntimeError(
            f"cosmic_fx.fused_optimizer cannot fuse an optimizer into backward under {type(model).__name__}: each "
            "rank would update on its local gradient before the all-reduce. Train with loss.backward() and "
            "optimizer.step() (without fused_optimizer)."
        )
    if isinstance(rt.fused, OptimizerUpdate):
        if rt.fused.optimizer is optimizer:
            return FusedOptimizer(rt, optimizer)
        raise RuntimeError(
            f"this model already fuses a {type(rt.fused.optimizer).__name__} into its backward; one optimizer per "
            "model. Call .remove() on the FusedOptimizer of the first one before fusing another."
        )
    group_of = _groups_of(rt, _unwrap(model), optimizer)
    rt.fused = OptimizerUpdate(optimizer, group_of)
    rt._note_optimizer_kind(optimizer)  # CCE off under Adam/AdamW with cce_skip_adaptive, as when it is watched
    rt.fused.hook_step(functools.partial(_step_pre_hook, weakref.ref(rt)))
    if rt.mode is not None:
        rt.activate(rt.mode)  # the hooks now update (a config without CDG/CCE had attached none)
    elif isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        rt.activate("compiled")  # cosmic_fx.compile leaves a runtime without CDG/CCE inactive
    elif not rt.transformed:
        rt.activate("eager")  # a plain model's fusing-only runtime: nothing reads its outputs
    else:
        attach_hooks(_unwrap(model))
    return FusedOptimizer(rt, optimizer)


def _plain_runtime(model: nn.Module):
    """A runtime that only fuses (``CosmicConfig.off()``) for a plain eager model: no CDG, no CCE, no
    forward hook; ``cosmic_fx.detach_hooks(model)`` ends it."""
    from ..config import CosmicConfig
    from . import _PLAIN_ATTR
    from .core import CosmicRuntime
    from .distributed import check_not_wrapped

    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise ValueError(
            f"{type(model).__name__} was compiled by torch.compile without the cosmic backend, so no cosmic hook can "
            "take the update into its backward. Compile the model with cosmic_fx.compile(model, "
            "cosmic_fx.CosmicConfig.off()) (or a preset), then call cosmic_fx.fused_optimizer(compiled, optimizer)."
        )
    check_not_wrapped(model, "cosmic_fx.fused_optimizer")
    rt = CosmicRuntime(CosmicConfig.off(), transformed=False)
    rt.bind(model)
    model.__dict__[_PLAIN_ATTR] = rt
    return rt


def _groups_of(rt, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, int]:
    """The runtime's parameter index -> the optimizer's param group; refuses what would go wrong."""
    mine = {id(p) for p in model.parameters()}
    name = type(optimizer).__name__
    group_of: dict[int, int] = {}
    for g, group in enumerate(optimizer.param_groups):
        for k, p in enumerate(group["params"]):
            if id(p) not in mine:
                raise ValueError(
                    f"{name} holds a parameter that is not one of {type(model).__name__}'s (param group {g}, index "
                    f"{k}, shape {tuple(p.shape)}): it was built over another model's parameters. Build it from the "
                    "parameters of the model you pass: torch.optim.AdamW(model.parameters(), ...)."
                )
            for i in rt.indices_of([p]):
                group_of[i] = g
    params = rt._params()
    missing = [rt.names[i] for i, p in enumerate(params)
               if p is not None and p.requires_grad and i not in group_of and i not in rt.cdg.frozen]
    if missing:
        raise ValueError(
            f"{name} does not hold {len(missing)} parameter(s) that this model trains, e.g. {missing[:3]}: fused into "
            "backward, their gradients would be freed without an update. Build the optimizer from the transformed "
            "or compiled model's parameters (cm.parameters(): they include the QCIs that cosmic_fx.transform adds), "
            "or freeze those parameters (requires_grad_(False)) before transforming the model."
        )
    return group_of


def _step_pre_hook(rt_ref, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Before the fused optimizer's own step(): one backward per step, and no DDP."""
    rt = rt_ref()
    if rt is None or not isinstance(rt.fused, OptimizerUpdate) or rt.fused.optimizer is not optimizer:
        return
    _check_no_ddp(rt)
    _check_one_backward(rt, type(optimizer).__name__.lower())


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
    update = rt.fused
    if not update.ready_for_trace(reached, params):
        _first_backward(rt, loss, **backward_kwargs)
        return
    update.allocate(params, with_scale=rt._cce_on)
    for i in sorted(reached):
        p = params[i]
        if p is not None and p.requires_grad:
            rt._decide(i, p)
    update.before_trace()
    reads_grads = rt.config.cdg is CDGMode.PREFIX and rt.config.cdg_prefix_signal is PrefixSignal.GRAD
    if reads_grads:  # the blocks' gradient norms are read inside the backward, where the gradients live
        rt.prefix.begin_traced(reached, loss.device)
        update.observer = rt.prefix.note_traced_grad
    from torch._dynamo import compiled_autograd

    compiler = compiled_autograd_compiler(rt.config)
    rt._traced = update.traced = True
    try:
        with compiled_autograd._enable(compiler):
            loss.backward(**backward_kwargs)
    finally:
        rt._traced = update.traced = False
        update.observer = None
    if reads_grads:
        rt.prefix.end_traced()
    rt._end_of_backward()


def _first_backward(rt, loss: torch.Tensor, **backward_kwargs: Any) -> None:
    """A plain backward (eager hooks) for the step that creates a user optimizer's state lazily, as
    ``torch.optim`` does; the steps after it are traced. It is not the misuse the hooks warn about."""
    warned = rt._warned_untraced
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="cosmic_fx: the fused update ran after a plain loss.backward")
        loss.backward(**backward_kwargs)
    rt._warned_untraced = warned


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
        external = isinstance(rt.fused, OptimizerUpdate)
        if external and rt.fused.optimizer is optimizer:
            continue  # the fused optimizer itself: its step() only steps what the hooks did not
        hit = sorted(rt.indices_of(params))
        if hit and (external or rt.config.cce_fused is not CCEFused.OFF):
            names = [rt.names[i] for i in hit]
            what = (f"fused {type(rt.fused.optimizer).__name__}" if external
                    else f"cce_fused={rt.config.cce_fused.value!r}")
            fix = ("call .remove() on its FusedOptimizer to train with this optimizer" if external
                   else "set cce_fused='off' to train with this optimizer")
            raise RuntimeError(
                f"{type(optimizer).__name__}.step() would update {len(hit)} parameter(s) that the cosmic fused update "
                f"({what}) already updates inside backward, e.g. {names[:3]}: they "
                "would be updated twice. Drop them from this optimizer (use cosmic_fx.fused_optimizer(model) for "
                f"the step, state_dict and checks), or {fix}."
            )
    _CHECKED[optimizer] = key
