"""CDG and CCE as parameter hooks (``Tensor.register_post_accumulate_grad_hook``).

One :class:`CosmicHooks` object holds the state of one training run: the efficiency of the latest
model output ``E_out`` (set by the backend's compiled graph, or by a forward hook in eager mode), and
per-parameter readings. Each parameter's hook runs as soon as its gradient is accumulated:

* **CDG, seed** (the source text): if ``E(p, dim 0) < E_out`` the gradient is dropped
  (``p.grad = None``), so no optimizer updates ``p`` this step.
* **CDG, calibrated** (the default): a reading is *low* when ``E(p) < E_out``. At the end of every
  ``cdg_interval``-th backward, the parameters with at least ``cdg_patience`` consecutive low readings
  are frozen (``requires_grad_(False)``: backward then skips their weight-gradient work entirely),
  lowest efficiency first, at most ``cdg_max_frozen`` of the parameter tensors, never the output
  layer; the previous frozen set is thawed at the same moment. At most ``cdg_max_sets`` distinct
  frozen sets are used per run (each is one recompilation under ``torch.compile``); after that the
  closest set already used is chosen again.
* **CCE, seed** (the source text's code): ``grad <- E(p) * grad``, i.e. ``p <- p - lr * E(p) * grad``
  with plain SGD.
* **CCE, relative** (the default): ``grad <- m(p) * grad`` with
  ``m(p) = clamp(1 + gamma * (E(p) - mean E), cce_min, cce_max)``, a positive learning-rate
  multiplier relative to the mean efficiency over all hooked parameters (of the previous step).
* **CCE fused into backward** (``cce_fused_lr`` set): after the above, the hook itself applies
  ``p <- p - lr * grad`` and frees ``p.grad`` at once, so no two gradients need to exist together.

Under ``torch.compile`` each distinct frozen set is one compiled graph. If a training step runs
without the compiled graph (dynamo's ``recompile_limit`` hit, then eager fallback) the hooks say so:
a warning, and :attr:`CosmicHooks.uncompiled_steps` / :attr:`CosmicHooks.recompile_limit_hit`.

A parameter is hooked once, by one :class:`CosmicHooks`, however often dynamo calls the backend.
"""

from __future__ import annotations

import logging
import math
import warnings
import weakref
from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from .config import CCEMode, CDGMode, CosmicConfig
from .quantities import efficiency

__all__ = ["CosmicHooks", "attach_hooks", "detach_hooks", "hooks_of"]

log = logging.getLogger(__name__)

_OWNER: WeakIdKeyDictionary = WeakIdKeyDictionary()  # tensors compare elementwise: key by identity
_RUNTIMES: dict[CosmicConfig, CosmicHooks] = {}


def _queue_end_of_backward(fn) -> None:
    torch.autograd.Variable._execution_engine.queue_callback(fn)


class CosmicHooks:
    """The CDG/CCE state of one training run and the hooks on its parameters.

    Args:
        config: which CDG/CCE rules to apply.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Linear(16, 3))
        >>> hooks = attach_hooks(model, cosmic_fx.CosmicConfig.seed())   # doctest: +SKIP
        >>> loss = model(torch.randn(8, 4)).logsumexp(-1).mean(); loss.backward()   # doctest: +SKIP
        >>> hooks.last_step   # what CDG/CCE did in that backward   # doctest: +SKIP
        >>> hooks.remove()   # doctest: +SKIP
    """

    def __init__(self, config: CosmicConfig) -> None:
        self.config = config
        self.e_out: torch.Tensor | None = None
        self._e_out_value: float | None = None
        self.steps = 0  # completed backward passes
        self._params: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
        self._names: dict[int, str] = {}
        self._handles: dict[int, torch.utils.hooks.RemovableHandle] = {}
        self._protected: set[int] = set()
        self._in_backward = False
        # per-step bookkeeping, exposed as `last_step` after each backward
        self._step_e: dict[int, float] = {}
        self._step_skipped: list[int] = []
        self._step_scale: dict[int, float] = {}
        self.last_step: dict[str, object] = {}
        # relative CCE: mean efficiency over parameters of the previous step
        self._mean_e: float | None = None
        # calibrated CDG
        self._low: dict[int, int] = {}
        self._last_e: dict[int, float] = {}
        self._frozen: frozenset[int] = frozenset()
        self._sets_used: list[frozenset[int]] = [frozenset()]
        self._since_decision = 0
        self.freeze_events: list[tuple[int, tuple[str, ...]]] = []  # (step, names frozen)
        self._tracker: _OutputTracker | None = None  # eager mode only
        # pid -> (E(p) tensor, E(p) float, E(p) < E_out) of the last measurement (efficiency_every)
        self._reading: dict[int, tuple[torch.Tensor, float, bool]] = {}
        # torch.compile: the backend's graphs report each training forward (note_compiled_forward)
        self.compiled = False
        self._compiled_forwards = 0
        self.uncompiled_steps = 0  # backward passes with no compiled forward before them
        self.recompile_limit_hit = False  # dynamo reported its recompile limit during this run

    # ------------------------------------------------------------------ attaching
    def attach(self, params: Iterable[tuple[str, torch.Tensor]], protected: Iterable[torch.Tensor] = ()) -> int:
        """Hook ``(name, parameter)`` pairs; returns how many were newly hooked.

        A parameter already hooked by this object is skipped; one hooked by another
        :class:`CosmicHooks` is left to it (with a one-time warning).
        """
        added = 0
        for name, p in params:
            if not isinstance(p, torch.Tensor) or not p.requires_grad:
                continue
            owner = _OWNER.get(p)
            if owner is self:
                continue
            if owner is not None:
                _warn_once(
                    "cosmic_fx: a parameter already has CDG/CCE hooks from another cosmic config; it keeps "
                    "those. Call cosmic_fx.detach_hooks(model) before compiling with new options."
                )
                continue
            self._handles[id(p)] = p.register_post_accumulate_grad_hook(self._on_grad)
            self._params[id(p)] = p
            self._names[id(p)] = name
            _OWNER[p] = self
            added += 1
        self._protected.update(id(p) for p in protected)
        return added

    def remove(self) -> None:
        """Detach every hook and thaw every parameter this object froze."""
        if self._tracker is not None:
            self._tracker.close()
            self._tracker = None
        for pid in list(self._frozen):
            p = self._params.get(pid)
            if p is not None:
                p.requires_grad_(True)
        self._frozen = frozenset()
        for pid, handle in self._handles.items():
            handle.remove()
            p = self._params.get(pid)
            if p is not None:
                _OWNER.pop(p, None)
        self._handles.clear()
        self._params.clear()
        for key, value in list(_RUNTIMES.items()):
            if value is self:
                del _RUNTIMES[key]

    @property
    def num_hooked(self) -> int:
        return len(self._handles)

    @property
    def frozen(self) -> list[str]:
        """Names of the parameters calibrated CDG holds frozen now."""
        return sorted(self._names[pid] for pid in self._frozen)

    # ------------------------------------------------------------------ per step
    def set_output(self, out: torch.Tensor) -> None:
        """Record the model output of the current step (its efficiency along the last dim)."""
        self.set_output_efficiency(efficiency(out.detach(), -1, self.config.eps))

    def set_output_efficiency(self, e_out: torch.Tensor) -> None:
        """Record ``E_out`` computed elsewhere (inside a compiled graph)."""
        self.e_out = e_out.detach()
        self._e_out_value = None  # read once per step, on the first measurement

    def _e_out_float(self) -> float | None:
        # one host read per step (a device sync on CUDA), not one per parameter
        if self.e_out is not None and self._e_out_value is None:
            self._e_out_value = float(self.e_out)
        return self._e_out_value

    def note_compiled_forward(self) -> None:
        """Called by the backend each time one of its compiled graphs runs with grad enabled."""
        self.compiled = True
        self._compiled_forwards += 1

    def _on_grad(self, p: torch.Tensor) -> None:
        cfg = self.config
        pid = id(p)
        if not self._in_backward:
            self._in_backward = True
            _queue_end_of_backward(self._end_of_backward)
        if p.grad is None:
            return
        reading = self._reading.get(pid)
        if reading is None or self.steps % cfg.efficiency_every == 0:
            with torch.no_grad():
                e_p = efficiency(p, 0, cfg.eps)
            e_val = float(e_p)
            e_out = self._e_out_float()
            low = e_out is not None and e_val < e_out
            self._reading[pid] = reading = (e_p, e_val, low)
            self._step_e[pid] = e_val
            fresh = True
        else:
            fresh = False  # between measurements: reuse the last verdict and multiplier
        e_p, e_val, low = reading
        if cfg.cdg is CDGMode.SEED and low:
            p.grad = None
            self._step_skipped.append(pid)
            return
        if cfg.cdg is CDGMode.CALIBRATED and fresh:
            self._low[pid] = self._low.get(pid, 0) + 1 if low else 0
            self._last_e[pid] = e_val
        if cfg.cce is CCEMode.SEED:
            p.grad.mul_(e_p.to(p.grad.dtype) if p.grad.dtype != e_p.dtype else e_p)
            self._step_scale[pid] = e_val
        elif cfg.cce is CCEMode.RELATIVE:
            scale = self._relative_scale(e_val)
            if scale != 1.0:
                p.grad.mul_(scale)
            self._step_scale[pid] = scale
        if cfg.cce_fused_lr is not None:
            with torch.no_grad():
                p.add_(p.grad, alpha=-cfg.cce_fused_lr)
            p.grad = None  # freed now: the next layer's gradient can reuse the memory

    def _relative_scale(self, e_val: float) -> float:
        cfg = self.config
        if self._mean_e is None:
            # first step: the mean over every hooked parameter, computed once
            with torch.no_grad():
                values = [float(efficiency(q, 0, cfg.eps)) for q in self._params.values()]
            self._mean_e = sum(values) / max(len(values), 1)
        return min(max(1.0 + cfg.cce_gamma * (e_val - self._mean_e), cfg.cce_min), cfg.cce_max)

    def _end_of_backward(self) -> None:
        self._in_backward = False
        self.steps += 1
        if self._step_e and self.config.cce is CCEMode.RELATIVE:
            self._mean_e = sum(self._step_e.values()) / len(self._step_e)
        names = self._names
        self.last_step = {
            "step": self.steps,
            "e_out": self._e_out_float(),
            "efficiency": {names[k]: v for k, v in self._step_e.items()},
            "skipped": [names[k] for k in self._step_skipped],
            "scale": {names[k]: v for k, v in self._step_scale.items()},
            "frozen": self.frozen,
        }
        self._step_e, self._step_skipped, self._step_scale = {}, [], {}
        if self.compiled and self._compiled_forwards == 0:
            self._report_uncompiled_step()
        self._compiled_forwards = 0
        if self.config.cdg is CDGMode.CALIBRATED:
            self._since_decision += 1
            if self._since_decision >= self.config.cdg_interval:
                self._since_decision = 0
                self._decide_frozen_set()

    def _report_uncompiled_step(self) -> None:
        self.uncompiled_steps += 1
        limit = torch._dynamo.config.recompile_limit
        hit = _dynamo_hit_recompile_limit()
        self.recompile_limit_hit = self.recompile_limit_hit or hit
        if self.uncompiled_steps > 1:
            return
        why = (
            f"dynamo hit torch._dynamo.config.recompile_limit ({limit}) and ran the model eagerly"
            if hit else "the model ran outside its compiled graph"
        )
        warnings.warn(
            f"cosmic_fx: training step {self.steps} ran without the compiled cosmic graph: {why}. "
            f"This run has used {len(self._sets_used)} distinct frozen sets (counting none; "
            f"cdg_max_sets={self.config.cdg_max_sets}), and each one is a compiled graph. Raise "
            "torch._dynamo.config.recompile_limit or lower cdg_max_sets; TORCH_LOGS=recompiles lists "
            "every recompilation. CosmicHooks.uncompiled_steps counts the steps affected.",
            RuntimeWarning,
            stacklevel=2,
        )

    def _decide_frozen_set(self) -> None:
        cfg = self.config
        candidates = [
            pid for pid, n in self._low.items()
            if n >= cfg.cdg_patience and pid in self._params and pid not in self._frozen
            and not (cfg.cdg_protect_output and pid in self._protected)
        ]
        candidates.sort(key=lambda pid: self._last_e.get(pid, 0.0))
        # round up: on a small model a cap below one tensor would silently switch CDG off
        limit = math.ceil(cfg.cdg_max_frozen * len(self._params))
        wanted = frozenset(candidates[:limit])
        if wanted not in self._sets_used:
            if len(self._sets_used) > cfg.cdg_max_sets:  # the empty set does not count
                wanted = max(self._sets_used, key=lambda s: _jaccard(s, wanted))
            else:
                self._sets_used.append(wanted)
        for pid in self._frozen - wanted:
            self._params[pid].requires_grad_(True)
            self._low[pid] = 0
        for pid in wanted - self._frozen:
            self._params[pid].requires_grad_(False)
        if wanted != self._frozen:
            log.debug("cosmic CDG step %d: frozen %s", self.steps, [self._names[p] for p in wanted])
            self.freeze_events.append((self.steps, tuple(sorted(self._names[p] for p in wanted))))
        self._frozen = wanted


def _dynamo_hit_recompile_limit() -> bool:
    """Whether dynamo has recorded a recompile-limit hit in this process (since its last reset)."""
    from torch._dynamo.utils import counters

    return any(str(k).startswith("Dynamo recompile limit exceeded") for k in counters.get("unimplemented", {}))


def _jaccard(a: frozenset[int], b: frozenset[int]) -> float:
    union = len(a | b)
    return 1.0 if union == 0 else len(a & b) / union


_WARNED: set[str] = set()


def _warn_once(message: str, key: str | None = None) -> None:
    """Warn once per process for each ``key`` (the message itself when no key is given)."""
    key = key or message
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, stacklevel=3)


def runtime_for(config: CosmicConfig) -> CosmicHooks:
    """The shared :class:`CosmicHooks` of a backend config (one per distinct config)."""
    hooks = _RUNTIMES.get(config)
    if hooks is None:
        hooks = _RUNTIMES[config] = CosmicHooks(config)
    return hooks


def hooks_of(param_or_model: torch.Tensor | nn.Module) -> CosmicHooks | None:
    """The :class:`CosmicHooks` attached to a parameter (or to any parameter of a model)."""
    if isinstance(param_or_model, nn.Module):
        for p in param_or_model.parameters():
            if p in _OWNER:
                return _OWNER[p]
        return None
    return _OWNER.get(param_or_model)


class _OutputTracker:
    """Eager-mode forward hooks: E_out from the model output, and the output layer's parameters."""

    def __init__(self, model: nn.Module, hooks: CosmicHooks) -> None:
        self.hooks = hooks
        self._order: list[nn.Module] = []
        # the root's own hook fires after every child's, so its direct parameters (a positional
        # embedding, say) would look like the output layer: leave the root out, as the backend does
        self._probe = [
            m.register_forward_hook(self._record)
            for m in model.modules()
            if m is not model and any(True for _ in m.parameters(recurse=False))
        ]
        self.handle = model.register_forward_hook(self._on_output)

    def close(self) -> None:
        for h in [self.handle, *self._probe]:
            h.remove()
        self._probe = []

    def _record(self, module, args, out) -> None:
        self._order.append(module)

    def _on_output(self, module, args, out) -> None:
        if self._probe:
            for h in self._probe:
                h.remove()
            self._probe = []
            self.hooks.attach((), protected=_output_layer_params(self._order))
        tensor = _first_float_tensor(out)
        if tensor is not None and torch.is_grad_enabled():
            self.hooks.set_output(tensor)


def _output_layer_params(order: list[nn.Module]) -> list[torch.Tensor]:
    """Parameters of the last site module executed (:mod:`cosmic_fx.sites`) and of every module
    executed after it."""
    from .sites import is_site_module

    last = max((i for i, m in enumerate(order) if is_site_module(m)), default=None)
    if last is None:
        return []
    return [p for m in order[last:] for p in m.parameters(recurse=False)]


def _first_float_tensor(out) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out if out.is_floating_point() else None
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        for item in out:
            found = _first_float_tensor(item)
            if found is not None:
                return found
    return None


def attach_hooks(model: nn.Module, config: CosmicConfig | None = None) -> CosmicHooks:
    """Attach CDG/CCE hooks to an eager model's parameters (no ``torch.compile`` needed).

    ``E_out`` is taken from each training forward's output (the first floating-point tensor of it).
    Returns the :class:`CosmicHooks`; ``.remove()`` detaches everything.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        >>> hooks = attach_hooks(model, cosmic_fx.CosmicConfig.seed())   # doctest: +SKIP
        >>> hooks.num_hooked   # doctest: +SKIP
        4
    """
    config = config or CosmicConfig()
    hooks = CosmicHooks(config)
    hooks.attach(model.named_parameters())
    hooks._tracker = _OutputTracker(model, hooks)
    return hooks


def detach_hooks(model: nn.Module) -> int:
    """Remove every cosmic hook from a model's parameters; returns how many hook sets were removed."""
    owners = {id(h): h for p in model.parameters() if (h := _OWNER.get(p)) is not None}
    for h in owners.values():
        h.remove()
    return len(owners)
