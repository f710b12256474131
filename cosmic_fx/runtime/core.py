"""`CosmicRuntime`: the CDG/CCE state of one model's training run and the hooks on its parameters.

A runtime belongs to one model. :func:`cosmic_fx.transform` creates it (in the ``cosmic_state``
submodule of the model it returns, so the state travels with ``model.state_dict()``) and hooks every
trainable parameter at once (the hooks go again once an optimizer step ends each step, see
:mod:`cosmic_fx.runtime.step`); the hooks do nothing until the runtime is *activated*: by
:func:`cosmic_fx.attach_hooks` for eager training (a forward hook reads ``E_out`` from the output),
or by the ``cosmic`` backend / :func:`cosmic_fx.compile` (the compiled graph returns ``E_out``).
Parameters that run in eager regions after a graph break are hooked like the rest.

This module binds a runtime to its model, activates it and checkpoints it; what happens in each
step is :mod:`cosmic_fx.runtime.step`'s (:class:`~cosmic_fx.runtime.step.StepMixin`). A step is an
optimizer step: with gradient accumulation the runtime reads ``E(p)``
(:class:`~cosmic_fx.runtime.readings.Readings`), applies seed CDG's skip, counts calibrated CDG's low
readings (:class:`~cosmic_fx.runtime.cdg.CDGState`) and scales the gradient by CCE's multiplier once,
on the accumulated gradient, before the optimizer updates; without a known optimizer, and with the
fused update (:class:`~cosmic_fx.runtime.fused.FusedUpdate`), each backward is a step and the hooks do
that work as each gradient is accumulated. Under ``torch.compile``,
:func:`~cosmic_fx.runtime.fused_optimizer.traced_backward` runs the backward through compiled
autograd: the readings and multipliers are taken just before it, and the hooks, traced into the
compiled backward, only apply the fused update. When a step ends the runtime updates the relative-CCE
mean, compile accounting (:class:`~cosmic_fx.runtime.accounting.CompileAccounting`) and, every
``cdg_interval`` steps, the frozen set. Every decision is a function of :mod:`cosmic_fx.policy`.

Ownership is explicit: the runtime holds its parameters and model weakly, the model (or, for a
plain model compiled without ``transform``, its parameters' hooks) holds the runtime, so a model
that is garbage-collected frees its runtime and two models never share one.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from ..config import CCEFused, CDGMode, CosmicConfig
from .accounting import CompileAccounting
from .cce import CCEState
from .cdg import CDGState
from .distributed import DistributedContext, check_not_sharded, rebuild_reducer
from .fused import FusedUpdate
from .prefix import PrefixState, check_has_sites
from .readings import Readings
from .step import StepMixin, _wait_for_optimizer

__all__ = ["CosmicRuntime", "runtimes_of_param"]

log = logging.getLogger(__name__)

# parameter -> [(runtime, index)] of the runtimes that registered it, weakly on both sides (as torch's
# apply_optimizer_in_backward keeps per-parameter state): the entry-point backend finds a model's
# runtime through the parameters of the graph it is given. Tensors compare elementwise: key by identity.
_OWNERS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def runtimes_of_param(p: torch.Tensor) -> list[CosmicRuntime]:
    """The live runtimes that registered ``p`` (two transforms of one base model share its weights)."""
    return [rt for ref, _ in _OWNERS.get(p, ()) if (rt := ref()) is not None]


def _remove_handles(handles: list) -> None:
    for h in handles:
        h.remove()
    handles.clear()


class CosmicRuntime(StepMixin):
    """The CDG/CCE state of one training run of one model, and the hooks on its parameters.

    Create one with :func:`cosmic_fx.transform` (``cosmic_fx.runtime_of(tm)``) or
    :func:`cosmic_fx.attach_hooks`; it is not meant to be built by hand.

    Attributes:
        config: the rules it applies.
        steps: completed training steps: optimizer steps (see :attr:`step_boundary`).
        last_step: what CDG/CCE did in the latest step: ``step``, ``e_out``, ``efficiency``
            (``E(p)`` of the parameters measured), ``skipped`` (seed CDG), ``scale`` (CCE multipliers),
            ``frozen`` (calibrated CDG) and ``outside_graphs`` (parameters whose gradients came from
            code outside every compiled graph).

    Example:
        >>> tm = cosmic_fx.transform(model)               # doctest: +SKIP
        >>> rt = cosmic_fx.attach_hooks(tm)               # eager training: activates tm's runtime
        >>> loss_fn(tm(x), y).backward(); opt.step()      # doctest: +SKIP
        >>> rt.last_step["frozen"], rt.steps              # doctest: +SKIP
        >>> torch.save(tm.state_dict(), "ckpt.pt")        # the runtime's state is in it
    """

    def __init__(self, config: CosmicConfig, *, transformed: bool) -> None:
        self.config = config
        self.transformed = transformed
        self.steps = 0
        self._last_step: dict[str, Any] = {}
        self._last_record: tuple | None = None  # the latest step's record, made a dict when read
        self.mode: str | None = None  # None (inactive), "eager" or "compiled"
        self._names: list[str] = []
        self._refs: list[weakref.ref] = []
        self._index: dict[str, int] = {}  # every name of a parameter (tied aliases too) -> index
        self._model: weakref.ref | None = None
        self._bound = False
        self._handles: list = []
        self._finalizer = weakref.finalize(self, _remove_handles, self._handles)
        self._strong_hooks = False
        self._tracker = None
        self._protected: set[int] = set()
        self._protected_known = False
        self._ddp: weakref.ref | None = None
        self._dist: DistributedContext | None = None
        self._pending_state: dict[str, torch.Tensor] | None = None
        self.readings = Readings(0, config.eps, config.efficiency_every)
        self.cdg = CDGState(0)
        self.prefix = PrefixState(0)
        self.cce = CCEState(config)
        self.fused = FusedUpdate(config, 0)
        self._traced = False  # inside traced_backward: the hooks only apply the fused update
        self._warned_untraced = False
        self.backwards_since_step = 0  # for FusedOptimizer.step's gradient-accumulation check
        self.accounting = CompileAccounting()
        self._in_backward = False
        self._e_out_seen = False
        self._init_steps()

    @property
    def last_step(self) -> dict[str, Any]:
        """What CDG/CCE did in the latest step (see the class docstring); built when read, so a step
        that nobody inspects does not pay for the names."""
        rec = self._last_record
        if rec is not None:
            self._last_record = None
            step, e_out, efficiency, skipped, scale, frozen, outside, prefix = rec
            names = self._names
            self._last_step = {
                "step": step,
                "e_out": e_out,
                "efficiency": {names[k]: v for k, v in efficiency.items()},
                "skipped": [names[k] for k in skipped],
                "scale": {names[k]: v for k, v in scale.items()},
                "frozen": sorted(names[i] for i in frozen),
                "outside_graphs": [names[k] for k in outside],
                "prefix": prefix,
            }
        return self._last_step

    # ------------------------------------------------------------------ binding
    @property
    def bound(self) -> bool:
        return self._bound

    def bind(self, model: nn.Module, params: Iterable[tuple[str, torch.Tensor]] | None = None,
             *, hold_by_params: bool = False) -> None:
        """Register the model's trainable parameters (in ``named_parameters`` order) and hook them.

        Args:
            model: the model the runtime belongs to (held weakly).
            params: ``(name, parameter)`` pairs to take instead of the model's trainable ones.
            hold_by_params: the hooks hold the runtime strongly (a plain model compiled by the
                backend: nothing else owns the runtime).
        """
        named = list(params) if params is not None else [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        ids = {id(p): i for i, (_, p) in enumerate(named)}
        index = {n: i for i, (n, _) in enumerate(named)}
        for n, p in model.named_parameters(remove_duplicate=False):
            if id(p) in ids:
                index.setdefault(n, ids[id(p)])
        self._bind(model, named, index, hold_by_params)

    def _bind(self, model: nn.Module, named: list[tuple[str, torch.Tensor]], index: dict[str, int],
              hold_by_params: bool = False) -> None:
        if self._bound:
            raise RuntimeError("this CosmicRuntime is already bound to a model")
        self._model = weakref.ref(model)
        self._names = [n for n, _ in named]
        self._refs = [weakref.ref(p) for _, p in named]
        self._index = dict(index)
        n = len(named)
        self.readings = Readings(n, self.config.eps, self.config.efficiency_every)
        self.cdg = CDGState(n)
        self.fused = FusedUpdate(self.config, n)
        self.prefix = PrefixState(n)
        if self.config.cdg is CDGMode.PREFIX and not isinstance(model, torch.fx.GraphModule):
            check_has_sites(model)
        self._bound = True
        self._strong_hooks = hold_by_params
        me = weakref.ref(self)
        for i, (_, p) in enumerate(named):
            _OWNERS.setdefault(p, []).append((me, i))
        if self.config.hooks_enabled:
            self._attach_hooks()
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self.load_state_dict(state)

    def _attach_hooks(self) -> None:
        if self._handles:
            return
        strong = self if self._strong_hooks else None
        me = weakref.ref(self)
        for i, ref in enumerate(self._refs):
            p = ref()
            if p is None:
                continue

            def hook(param: torch.Tensor, i: int = i, me=me, strong=strong) -> None:
                rt = strong if strong is not None else me()
                if rt is not None and rt.mode is not None:
                    if rt._traced:  # traced into a compiled backward: tensor work only
                        rt._traced_update(i, param)
                    else:
                        rt._on_grad(i, param)

            frozen_by_us = not p.requires_grad and i in self.cdg.frozen
            if frozen_by_us:
                p.requires_grad_(True)  # hooks need requires_grad; it is frozen again below
            if p.requires_grad:
                self._handles.append(p.register_post_accumulate_grad_hook(hook))
            if frozen_by_us:
                p.requires_grad_(False)

    @property
    def model(self) -> nn.Module | None:
        """The model this runtime belongs to (``None`` once it was garbage-collected)."""
        return self._model() if self._model is not None else None

    def _params(self) -> list[torch.Tensor | None]:
        return [ref() for ref in self._refs]

    def _check_alive(self, what: str) -> None:
        if self._bound and self.model is None and all(ref() is None for ref in self._refs):
            raise RuntimeError(
                f"CosmicRuntime.{what}: the model this runtime belonged to was garbage-collected, so there "
                "is nothing to act on. Keep a reference to the model (its runtime is cosmic_fx.runtime_of(model))."
            )

    def index_of(self, name: str) -> int | None:
        """The runtime's index of a parameter name (any alias of a tied parameter), else ``None``."""
        return self._index.get(name)

    def indices_of(self, params: Iterable[torch.Tensor]) -> set[int]:
        """Indices of the given parameter objects that this runtime covers."""
        return {i for p in params for ref, i in _OWNERS.get(p, ()) if ref() is self}

    @property
    def names(self) -> list[str]:
        """The names of the parameters this runtime covers, in its index order."""
        return list(self._names)

    # ------------------------------------------------------------------ hook point: fused updates
    @property
    def fuses_update(self) -> bool:
        """Whether the hooks apply an update inside backward: the config's ``cce_fused``, or a
        ``torch.optim`` optimizer that :func:`cosmic_fx.fused_optimizer` put in ``self.fused``."""
        return self.config.cce_fused is not CCEFused.OFF or self.fused.external

    # ------------------------------------------------------------------ activation
    def activate(self, mode: str) -> None:
        """Start applying CDG/CCE: ``"eager"`` (``attach_hooks``) or ``"compiled"`` (the backend)."""
        self._check_alive("activate")
        if mode not in ("eager", "compiled"):
            raise ValueError(f"mode must be 'eager' or 'compiled'; got {mode!r}")
        if self.mode is not None and self.mode != mode:
            raise RuntimeError(
                f"this model's cosmic runtime is already active in {self.mode} mode; call "
                "cosmic_fx.detach_hooks(model) before switching between eager hooks (attach_hooks) and "
                "torch.compile with the cosmic backend"
            )
        for i, p in enumerate(self._params()):
            owners = runtimes_of_param(p) if p is not None else []
            others = [rt for rt in owners if rt is not self and rt.mode is not None]
            if others:
                raise RuntimeError(
                    f"parameter {self._names[i]!r} is already trained by another active cosmic runtime (two "
                    "models that share weights, e.g. two cosmic_fx.transform results of one base model, are "
                    "being trained at once). Call cosmic_fx.detach_hooks() on the other model first."
                )
        model = self.model
        if model is not None:
            check_not_sharded(model, self.config)
        if self.config.cdg is CDGMode.PREFIX and self.prefix.length and not self.cdg.frozen:
            # remove() thawed the prefix; prefix CDG never thaws it while it runs
            self.cdg.frozen = self.prefix.frozen_params
            for i, p in enumerate(self._params()):
                if p is not None and i in self.cdg.frozen:
                    p.requires_grad_(False)
        self.mode = mode
        self._sync_hooks()
        if self.fuses_update:
            from .fused_optimizer import watch_double_updates

            watch_double_updates(self)
        else:
            _wait_for_optimizer(self)

    def remove(self) -> None:
        """Detach every hook, thaw every parameter CDG froze, and deactivate (the state is kept)."""
        if self._tracker is not None:
            self._tracker.close()
            self._tracker = None
        params = self._params()
        for i in self.cdg.frozen:
            if params[i] is not None:
                params[i].requires_grad_(True)
        self.cdg.frozen = frozenset()
        _remove_handles(self._handles)
        self._unwatch()
        self.mode = None
        if not self.transformed:
            # a plain model's runtime ends here; a transformed model keeps its (state-carrying) runtime
            for p in params:
                if p is not None and p in _OWNERS:
                    _OWNERS[p] = [(ref, i) for ref, i in _OWNERS[p] if ref() is not self]
            model = self.model
            if model is not None and model.__dict__.get("_cosmic_runtime") is self:
                del model.__dict__["_cosmic_runtime"]

    def _sync_hooks(self) -> None:
        """Hook the parameters when per-gradient work must run inside backward, unhook them when not.

        The hooks are needed by the fused update (it updates inside backward) and while a step ends
        with each backward (no optimizer known yet: seed CDG's skip and the readings happen there).
        With an optimizer (or explicit) boundary every decision is taken once per step in the
        optimizer's step pre-hook, from the gradients it finds: no hook runs Python per parameter.
        """
        if self.mode is None:
            return  # bind's hooks wait, inert, for activate
        if self.fuses_update or self.step_boundary == "backward":
            if self.config.hooks_enabled or self.fuses_update:
                self._attach_hooks()
        elif self._handles and not self._in_backward:
            _remove_handles(self._handles)
            self._mark_grads_seen()  # the hooks saw these: they belong to steps already counted
            model = self.model
            if self._strong_hooks and model is not None:
                # the hooks held this runtime (a plain model compiled through the entry point): now the
                # model does, as attach_hooks' plain models do (remove() lets go of it)
                from . import _PLAIN_ATTR

                model.__dict__.setdefault(_PLAIN_ATTR, self)

    @property
    def num_hooked(self) -> int:
        """How many parameters this runtime's per-step work covers: those with a gradient hook, or, once
        an optimizer's step pre-hook does that work (see :attr:`num_grad_hooks`), every live parameter."""
        if self._handles:
            return len(self._handles)
        if self.mode is not None and self.config.hooks_enabled and self.step_boundary != "backward":
            return sum(1 for ref in self._refs if ref() is not None)
        return 0

    @property
    def num_grad_hooks(self) -> int:
        """How many parameters carry a post-accumulate-grad hook of this runtime now (0 with an optimizer
        or explicit step boundary and no fused update: the step pre-hook does the work, batched)."""
        return len(self._handles)

    @property
    def frozen(self) -> list[str]:
        """Names of the parameters calibrated CDG holds frozen now."""
        return sorted(self._names[i] for i in self.cdg.frozen)

    @property
    def freeze_events(self) -> list[tuple[int, tuple[str, ...]]]:
        """``(step, names)`` for every change of the frozen set."""
        return [(step, tuple(sorted(self._names[i] for i in s))) for step, s in self.cdg.events]

    @property
    def compiled(self) -> bool:
        """Whether a compiled cosmic graph has run a training forward for this model."""
        return self.accounting.compiled

    @property
    def uncompiled_steps(self) -> int:
        return self.accounting.uncompiled_steps

    @property
    def recompile_limit_hit(self) -> bool:
        return self.accounting.recompile_limit_hit

    @property
    def outside_graphs(self) -> list[str]:
        """Names of the parameters whose gradients ever came from code outside compiled graphs."""
        return sorted(self._names[i] for i in self.accounting.outside_graphs)

    @property
    def protected(self) -> list[str]:
        """The output layer's parameters (calibrated CDG never freezes them), once known."""
        return sorted(self._names[i] for i in self._protected)

    @property
    def prefix_units(self) -> list[tuple[str, tuple[str, ...]]]:
        """Prefix CDG's freezable blocks in forward order, as ``(name, parameter names)`` (empty until
        the forward order is known)."""
        return [(u.name, tuple(self._names[i] for i in u.params)) for u in self.prefix.units]

    def freeze_prefix(self, length: int) -> None:
        """Freeze the first ``length`` blocks of :attr:`prefix_units` now, as a decision of prefix CDG
        would (a fixed schedule, a benchmark); the prefix only grows.

        Example:
            >>> rt = cosmic_fx.runtime_of(cosmic_fx.transform(model, cosmic_fx.CosmicConfig.fast()))  # doctest: +SKIP
            >>> rt.freeze_prefix(2); rt.frozen   # doctest: +SKIP
        """
        if self.config.cdg is not CDGMode.PREFIX:
            raise ValueError("freeze_prefix needs cdg='prefix'; this runtime's config has "
                             f"cdg={self.config.cdg.value!r}")
        if not self.prefix.known:
            raise RuntimeError("freeze_prefix: the blocks are not known until the forward order is (run one training "
                               "forward first, or transform a model that symbolic-traces)")
        n = len(self.prefix.units)
        if isinstance(length, bool) or not isinstance(length, int) or not self.prefix.length <= length <= n:
            raise ValueError(f"freeze_prefix: length must be an int from {self.prefix.length} (frozen now; the prefix "
                             f"never shrinks) to {len(self.prefix.units)} (the freezable blocks); got {length!r}")
        wanted = frozenset(i for u in self.prefix.units[:length] for i in u.params)
        if wanted != self.cdg.frozen:
            self._finish_step(self.steps, [], wanted, self._ddp() if self._ddp is not None else None)

    def set_forward_order(self, names: Iterable[str]) -> None:
        """Record the order in which the forward pass first reads each parameter, and build prefix
        CDG's blocks from it (first source wins: the traced graph, a compiled graph that reads every
        parameter, or the first eager forward). Call :meth:`set_protected` first."""
        if self.config.cdg is not CDGMode.PREFIX or self.prefix.known:
            return
        model = self.model
        if model is None:
            return
        order = [i for n in names if (i := self.index_of(str(n))) is not None]
        self.prefix.build(model, order, self._index, self._protected, self._params())
        log.debug("cosmic prefix CDG blocks: %s", [u.name for u in self.prefix.units])

    def set_protected(self, names: Iterable[str]) -> None:
        """Record the output layer (first source wins: the traced graph, a returning compiled graph,
        or the first eager forward)."""
        if self._protected_known:
            return
        self._protected = {i for n in names if (i := self.index_of(str(n))) is not None}
        self._protected_known = True

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The runtime's state as tensors (what ``model.state_dict()`` holds under ``cosmic_state.``).

        Example:
            >>> state = cosmic_fx.runtime_of(tm).state_dict()   # doctest: +SKIP
            >>> sorted(state)[:3]   # doctest: +SKIP
            ['cce.mean_e', 'cdg.event_sets', 'cdg.event_steps']
        """
        from .state import encode_meta

        self._check_alive("state_dict")
        out = {"meta": encode_meta(self), "steps": torch.tensor(self.steps, dtype=torch.int64),
               "protected": torch.tensor([i in self._protected for i in range(len(self._names))], dtype=torch.bool),
               "protected_known": torch.tensor(self._protected_known)}
        out.update(self.readings.state_dict())
        out.update(self.cdg.state_dict())
        out.update(self.prefix.state_dict())
        out.update(self.cce.state_dict())
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> tuple[list[str], list[str]]:
        """Restore the state saved by :meth:`state_dict` (a model rebuilt the same way, same config).

        Raises a ``RuntimeError`` naming the mismatch for state saved with another config, other
        parameters or a newer format. With ``strict`` (PyTorch's semantics) missing or unexpected
        keys are an error too; otherwise they are returned as ``(missing, unexpected)`` and nothing
        is loaded when keys are missing.
        """
        from .state import STATE_KEYS, check_meta

        if not self._bound:
            self._pending_state = dict(state)
            return [], []
        missing = [k for k in STATE_KEYS if k not in state]
        unexpected = sorted(k for k in state if k not in STATE_KEYS)
        if strict and (missing or unexpected):
            raise RuntimeError(
                f"Error(s) in loading the cosmic runtime state: missing keys {missing}, unexpected keys "
                f"{unexpected}. Save it with model.state_dict() (or runtime.state_dict()) of a cosmic_fx "
                "transformed model."
            )
        if missing:
            return missing, unexpected
        check_meta(self, state["meta"])
        self.steps = int(state["steps"])
        self._protected = {int(i) for i in state["protected"].nonzero().flatten().tolist()}
        self._protected_known = bool(state["protected_known"])
        self.readings.load_state_dict(state)
        self.prefix.load_state_dict(state)
        self.cce.load_state_dict(state)
        before = self.cdg.frozen
        frozen = self.cdg.load_state_dict(state)
        for i, p in enumerate(self._params()):
            if p is not None and (i in before) != (i in frozen):
                p.requires_grad_(i not in frozen)
        self.cdg.frozen = frozen
        ddp = self._ddp() if self._ddp is not None else None
        if ddp is not None:
            rebuild_reducer(ddp)
        return [], unexpected

