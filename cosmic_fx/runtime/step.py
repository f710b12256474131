"""The training step of a :class:`~cosmic_fx.runtime.CosmicRuntime`: what each gradient hook does, what
the end of a backward does, and where a step ends.

**A step is an optimizer step.** With gradient accumulation several backward passes (micro-batches)
feed one optimizer step; the runtime then takes its readings and CCE's multipliers once per step, on
the accumulated gradients, with ``E_out`` of every output of the step (the efficiency sums of the
micro-batches' outputs add up: ``E_out`` is that of the whole batch), and takes CDG's and prefix CDG's
decisions between optimizer steps. ``cdg_interval``, ``efficiency_every`` and ``cdg_prefix_window``
count optimizer steps. N micro-batches of B/N (each loss divided by N) train like one batch of B.

Where a step ends (:attr:`StepMixin.step_boundary`):

* ``"optimizer"``: at the ``step()`` of a ``torch.optim`` optimizer over the model's parameters — in
  that optimizer's own step pre-hook, so before it updates. The runtime learns of the optimizer from
  :func:`cosmic_fx.watch_optimizer` (or :class:`~cosmic_fx.integrations.hf.CosmicCallback`, for the
  Trainer's), or by itself on the optimizer's first ``step()`` (one process-wide step pre-hook, which
  only finds optimizers; a step that accumulated several backwards before that first ``step()`` was
  counted per backward, with a warning).
* ``"explicit"``: at :meth:`StepMixin.optimizer_step` (``cosmic_fx.watch_optimizer(model, None)``), for
  loops that update the parameters themselves.
* ``"backward"``: at the end of every backward, until an optimizer is known; always with the fused
  update (``cce_fused``), which updates inside each backward and so cannot accumulate.

**Costs nothing until it acts.** Only the ``"backward"`` boundary needs per-parameter work inside
backward (a post-accumulate-grad hook per parameter): the fused update, and any runtime before its
optimizer is known. With the ``"optimizer"`` or ``"explicit"`` boundary the runtime removes its hooks
and does a step's work in the optimizer's step pre-hook, from the gradients it finds there (those new
or changed in place since the last step: a gradient kept from an earlier step is not this step's). A
step that measures ``E(p)`` (every ``efficiency_every`` steps; every step with seed CDG) decides each
parameter as before; any other step is batched: one ``torch._foreach_norm`` for prefix CDG's block
readings and one ``torch._foreach_mul_`` for CCE's multipliers (cached between measurements), with no
Python call per parameter, and the same results bit for bit.
"""

from __future__ import annotations

import logging
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ..config import CCEFused, CCEMode, CDGMode, PrefixSignal
from .distributed import DistributedContext, active_ddp, check_not_sharded, rebuild_reducer, why_not_rebuildable

__all__ = ["StepMixin"]

log = logging.getLogger(__name__)


def _queue_callback(fn: Callable[[], None]) -> None:
    torch.autograd.Variable._execution_engine.queue_callback(fn)


# ---------------------------------------------------------------------------------------------- finding optimizers
# Runtimes that do not know an optimizer yet (and train without the fused update). One process-wide
# step pre-hook, installed with the first of them, finds the optimizers over their parameters on the
# first step() of each; the per-optimizer hooks it registers then do the work.
_WAITING: weakref.WeakSet = weakref.WeakSet()
_SEEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> (generation, number of params)
_GENERATION = [0]
_DISCOVERY: list = []


def _wait_for_optimizer(runtime: StepMixin) -> None:
    _WAITING.add(runtime)
    _GENERATION[0] += 1
    if not _DISCOVERY:
        _DISCOVERY.append(register_optimizer_step_pre_hook(_discover))


def _discover(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    if not _WAITING:
        return
    key = (_GENERATION[0], sum(len(g["params"]) for g in optimizer.param_groups))
    if _SEEN.get(optimizer) == key:
        return  # checked already, and neither it nor the waiting runtimes changed since
    _SEEN[optimizer] = key
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for rt in list(_WAITING):
        if rt.mode is not None and rt.indices_of(params):
            rt._watch(optimizer, discovered=True)


def _seen(record: tuple[weakref.ref, int] | None, grad: torch.Tensor) -> bool:
    """Whether ``grad`` is the gradient a ``_seen_grads`` record names, unchanged since (same tensor,
    same version)."""
    return record is not None and record[0]() is grad and record[1] == grad._version


class StepMixin:
    """The per-step half of :class:`~cosmic_fx.runtime.CosmicRuntime` (see the module docstring)."""

    def _init_steps(self) -> None:
        self._watched: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> hook handle
        self._explicit = False
        self._window = 0  # backward passes in the step still open (optimizer / explicit boundary)
        self._unstepped = 0  # backward passes since the last optimizer step (any boundary)
        self._warned_accumulation = False
        self._warned_batchnorm = False
        self._seen_grads: dict[int, tuple[weakref.ref, int]] = {}  # without hooks: the grads of closed steps
        self._cce_skipped = False  # cce_skip_adaptive and a scale-invariant optimizer (Adam, AdamW)
        self._quiet_config = None  # _quiet_step: the config its two flags were read from
        self._sentinel: int | None = None  # _quiet_new_grads: the parameter whose gradient stands for the step's
        self._seen_lazy = False  # _seen_grads is behind by quiet steps that looked at the sentinel only
        self._piece_sums: torch.Tensor | None = None
        self._reset_step()

    # ------------------------------------------------------------------ where a step ends
    @property
    def step_boundary(self) -> str:
        """Where this runtime's steps end now: ``"optimizer"``, ``"explicit"`` or ``"backward"`` (module
        docstring)."""
        if self.fuses_update:
            return "backward"
        if self._explicit:
            return "explicit"
        return "optimizer" if len(self._watched) else "backward"

    def watch_optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        """End each step at ``optimizer.step()`` (before it updates), or with ``None`` only at
        :meth:`optimizer_step`. See :func:`cosmic_fx.watch_optimizer`."""
        if self.fuses_update:
            how = (f"cce_fused={self.config.cce_fused.value!r}" if self.config.cce_fused is not CCEFused.OFF
                   else "cosmic_fx.fused_optimizer")
            raise ValueError(
                f"cosmic_fx.watch_optimizer: this model is updated inside each backward ({how}), so every backward "
                "is a step and gradients cannot be accumulated over several. Use one backward per step (a larger "
                "batch), or train with cce_fused='off' and your optimizer's own step()."
            )
        if optimizer is None:
            self._explicit = True
            self._sync_hooks()
            return
        while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
            optimizer = optimizer.optimizer  # a wrapper (accelerate's AcceleratedOptimizer): its step() steps this
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError("cosmic_fx.watch_optimizer expects a torch.optim.Optimizer (or None for explicit "
                            f"runtime.optimizer_step() calls); got {type(optimizer).__name__}")
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if not self.indices_of(params):
            raise ValueError(
                f"cosmic_fx.watch_optimizer: this {type(optimizer).__name__} steps none of the parameters this "
                "model's cosmic runtime covers; pass the optimizer built over this model's parameters "
                "(torch.optim.SGD(model.parameters(), ...))."
            )
        self._watch(optimizer, discovered=False)

    def _watch(self, optimizer: torch.optim.Optimizer, *, discovered: bool) -> None:
        if optimizer in self._watched:
            return
        me = weakref.ref(self)

        def pre_step(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            rt = me()
            if rt is not None and rt.mode is not None:
                rt._at_optimizer_step()

        self._watched[optimizer] = optimizer.register_step_pre_hook(pre_step)
        if discovered and self._unstepped > 1 and not self._warned_accumulation:
            self._warned_accumulation = True
            warnings.warn(
                f"cosmic_fx: {self._unstepped} backward passes ran before the first {type(optimizer).__name__}.step() "
                f"the runtime saw (gradient accumulation); it counted them as {self._unstepped} steps. From now on "
                "a step is an optimizer step. To count optimizer steps from the first, call "
                "cosmic_fx.watch_optimizer(model, optimizer) before training (CosmicCallback does it for the "
                "Hugging Face Trainer). (Warned once per model.)",
                UserWarning,
                stacklevel=4,
            )
        if discovered:  # pre_step may not be in this step's list of hooks yet
            self._at_optimizer_step()
        self._note_optimizer_kind(optimizer)
        self._sync_hooks()  # the step pre-hook does the work now: the per-parameter hooks go

    def _note_optimizer_kind(self, optimizer: torch.optim.Optimizer) -> None:
        from .cce import cce_skipped_for

        if self._cce_skipped:
            return
        if cce_skipped_for(self.config, optimizer):
            self._cce_skipped = True
            log.info(
                "cosmic_fx: CCE is off for this model from step %d: its optimizer is %s, which divides each "
                "parameter's gradient by its own running RMS, so CCE's per-parameter multiplier would be normalised "
                "away and only cost work (CosmicConfig.cce_skip_adaptive=True, the fast preset's setting; set it "
                "False to keep CCE, or train with SGD).", self.steps, type(optimizer).__name__)

    def _unwatch(self) -> None:
        for handle in list(self._watched.values()):
            handle.remove()
        self._watched = weakref.WeakKeyDictionary()
        self._cce_skipped = False
        _WAITING.discard(self)

    def optimizer_step(self) -> None:
        """End the current step now (``"explicit"`` boundary): call it after the last backward of the
        step and before the parameters are updated; from then on only these calls end steps.

        Example:
            >>> rt = cosmic_fx.runtime_of(tm)                       # doctest: +SKIP
            >>> for xs in micro_batches: loss_fn(tm(xs)).backward() # doctest: +SKIP
            >>> rt.optimizer_step(); my_update(tm)                  # doctest: +SKIP
        """
        if self._in_backward:
            raise RuntimeError("CosmicRuntime.optimizer_step() was called inside a backward pass; call it after "
                               "the last backward of the step, before the parameters are updated")
        self.watch_optimizer(None)
        self._at_optimizer_step()

    def _at_optimizer_step(self) -> None:
        self._unstepped = 0
        if self._quiet_step():
            return
        if self.step_boundary == "backward":
            return
        params = self._params()  # once per step: the methods below take it
        got = None
        if not self.num_grad_hooks:
            got = self._collect_step(params)
        if self._window:
            self._close_window(params, got)

    def _quiet_step(self) -> bool:
        """The whole step, when it is one on which nothing acts: prefix CDG with the drift signal
        inside the candidate block's window (or with nothing left to freeze), no CCE, no hooks, no
        DDP, nothing pending. It counts the step, keeps the compile accounting and the step's record,
        and returns ``True``; it does what :meth:`_collect_step`, :meth:`_close_window` and
        :meth:`_end_step` would do on such a step, without their calls, and it looks at one gradient where
        one answers for all (:meth:`_quiet_new_grads`): the pre-hook went from 33 to 7 µs a step on a
        CPU (docs/guide/performance.md, "The quiet step looks at one gradient"). Otherwise it returns
        ``False`` having done nothing."""
        cfg = self.config
        if self._quiet_config is not cfg:  # what the config alone says, once per config
            self._quiet_config = cfg
            self._quiet_by_config = cfg.cdg is CDGMode.PREFIX and cfg.cce_fused is CCEFused.OFF
            self._quiet_cce_off = cfg.cce is CCEMode.OFF
        if (not self._quiet_by_config or self._handles or self._window or self._explicit or self._ddp is not None
                or self._piece_sums is not None or self.fused.external or self._step_grads
                or not (self._quiet_cce_off or self._cce_skipped) or (self._dist is not None and self._dist.active)
                or not self.prefix.quiet_end(self.steps, cfg)):
            return False
        got = self._quiet_new_grads()
        if not got:
            return True  # no backward since the last step (as _collect_step: nothing to close)
        self._e_out_seen = False
        self.steps += 1
        outside = self.accounting.end_of_step(self.steps, got, len(self.cdg.sets_used), cfg.cdg_max_sets)
        self._last_record = (self.steps, self.readings.e_out_value(), {}, [], {}, self.cdg.frozen, outside,
                             self.prefix.reason)
        self.readings.end_step()
        return True

    def _quiet_new_grads(self) -> list[int]:
        """:meth:`_new_grads` for :meth:`_quiet_step`, without a loop over the parameters where one
        gradient answers for all of them: when the only training forward since the last step was one
        compiled graph's and nothing has trained outside compiled graphs, the step's gradients came from
        that graph's backward, one autograd node that writes the gradients of all its trainable inputs
        at once. One of them (the sentinel, picked by a step that looked at all) then has a new gradient
        exactly when that backward ran; the step's other records are brought up to date by the next
        :meth:`_new_grads` (``_seen_lazy``). Returns ``[sentinel]`` or ``[]`` then; otherwise
        :meth:`_new_grads` of every parameter.

        What this cannot see, and the loop would: a parameter trained outside compiled graphs for the
        first time on such a step (it enters ``outside_graphs`` at the next step that loops), and a
        gradient edited by hand between two ``step()`` calls with no backward between them."""
        i = self._sentinel
        if i is not None and self.accounting.one_graph_reads(i):
            p = self._refs[i]()
            g = p.grad if p is not None and p.requires_grad else None
            if g is not None:
                if _seen(self._seen_grads.get(i), g):
                    return []  # that backward did not run since the last step
                self._seen_grads[i] = (weakref.ref(g), g._version)
                self._seen_lazy = True
                return [i]
        got = self._new_grads(self._params())
        self._sentinel = got[-1] if got else None  # (the last block's: prefix CDG freezes from the first)
        return got

    def _collect_step(self, params: list[torch.Tensor | None]) -> list[int] | None:
        """Without per-parameter hooks: find this step's gradients at the optimizer step, and do what the
        end of each backward would have done (once per step: the backwards of a step are not seen).
        Returns them (:meth:`_new_grads`), or ``None`` when nothing is decided."""
        if not self.config.hooks_enabled:
            return None  # nothing to decide (no CDG, no CCE): the steps are not counted, as with no hooks
        got = self._new_grads(params)
        if not got:
            return None  # no backward since the last step
        self._commit_piece_sums()
        if self.mode == "compiled" and not self._e_out_seen and self.config.reads_e_out:
            self.use_output_hook()  # no compiled graph returned the model output (see _end_of_backward)
        self._e_out_seen = False
        self._step_grads.update(got)
        self._window = max(self._window, 1)
        return got

    # ------------------------------------------------------------------ E_out
    def set_output(self, out: torch.Tensor) -> None:
        """Record a training forward's model output (its efficiency along the last dim). In a
        distributed run the efficiency is that of the whole batch: its sums are all-reduced over the
        ranks, on every forward (a collective no rank may skip)."""
        from ..quantities import efficiency_sums

        self._note_ddp()
        with torch.no_grad():
            self._add_output_sums(efficiency_sums(out.detach(), -1))

    def set_output_sums(self, sums: torch.Tensor) -> None:
        """Record a compiled graph's ``efficiency_sums`` of the model output (all-reduced under DDP)."""
        self._note_ddp()
        self._add_output_sums(sums)

    def set_piece_sums(self, sums: torch.Tensor) -> None:
        """Record the output sums of one piece of a compiled DDP forward (one graph per bucket) on the
        first step, before the runtime's forward hook exists: the last piece run holds the model output.
        Every rank runs every piece, so the all-reduce here is entered by all of them."""
        if self._tracker is not None:
            return  # the forward hook reads E_out (the same on every rank: it is installed at one step)
        self._note_ddp()
        dist = self._distributed()
        self._piece_sums = dist.sum(sums) if dist.active else sums.detach()

    def _commit_piece_sums(self) -> None:
        if self._piece_sums is not None:
            self.readings.add_output(self._piece_sums)
            self._piece_sums = None
            self._e_out_seen = True
            self.use_output_hook()  # from the next forward on, on every rank

    def _add_output_sums(self, sums: torch.Tensor) -> None:
        dist = self._distributed()
        if dist.active and self.config.reads_e_out:
            sums = dist.sum(sums)
        self.readings.add_output(sums)
        self._e_out_seen = True

    def _distributed(self) -> DistributedContext:
        if self._dist is None:
            self._dist = DistributedContext()
        return self._dist

    def _note_ddp(self) -> None:
        """On the first forward under a DistributedDataParallel wrapper: check what cosmic supports."""
        ddp = active_ddp()
        if ddp is None or (self._ddp is not None and self._ddp() is ddp):
            return
        if self.config.cce_fused is not CCEFused.OFF:
            raise RuntimeError(
                f"cosmic_fx: cce_fused={self.config.cce_fused.value!r} cannot be used under DistributedDataParallel: "
                "the fused update would run on each rank's local gradient before DDP all-reduces it, and the ranks "
                "would drift apart. Use cce_fused='off' and cce_fused_lr=None (CCE then scales the gradient and your "
                "optimizer steps after the all-reduce)."
            )
        why = why_not_rebuildable(ddp) if self.config.cdg in (CDGMode.CALIBRATED, CDGMode.PREFIX) else None
        if why is not None:
            raise RuntimeError(
                f"cosmic_fx: {self.config.cdg.value} CDG freezes parameters, so it rebuilds DistributedDataParallel's "
                "reducer "
                f"at each freeze event, and this wrapper cannot be rebuilt: {why}. Use cdg='off' or cdg='seed', "
                "or wrap without that feature."
            )
        self._ddp = weakref.ref(ddp)

    def use_output_hook(self) -> None:
        """Take ``E_out`` from a forward hook on the model (run outside dynamo) from the next forward
        on: when the code that returns the output ran outside compiled graphs."""
        model = self.model
        if self._tracker is None and model is not None and self.config.reads_e_out:
            from .eager import OutputTracker

            self._tracker = OutputTracker(model, self, probe=False)

    def note_compiled_forward(self, covered: frozenset[int] = frozenset()) -> None:
        """Called by the backend each time one of its compiled graphs runs with grad enabled;
        ``covered`` are the indices of the parameters that graph reads."""
        if not self.accounting.compiled:
            model = self.model
            if model is not None:
                check_not_sharded(model, self.config)
        self._note_ddp()
        self.accounting.note_forward(covered)

    # ------------------------------------------------------------------ gradient hooks
    def _reset_step(self) -> None:
        self._step_e: dict[int, float] = {}
        self._step_skipped: list[int] = []
        self._step_scale: dict[int, float] = {}
        self._step_grads: set[int] = set()

    def _on_grad(self, i: int, p: torch.Tensor) -> None:
        if not self._in_backward:
            self._in_backward = True
            self._commit_piece_sums()
            _queue_callback(self._end_of_backward)
        if p.grad is None:
            return
        if self.step_boundary != "backward":
            self._step_grads.add(i)  # decided once, on the accumulated gradient, when the step ends
            return
        if self._decide(i, p) and self.fuses_update:
            if self.mode == "compiled" and not self._warned_untraced:
                self._warned_untraced = True
                warnings.warn(
                    "cosmic_fx: the fused update ran after a plain loss.backward() on a compiled model: it is "
                    "correct, but the compiled backward returned every gradient before the first update, so no "
                    "memory is saved. Call cosmic_fx.fused_optimizer(model).backward(loss) instead (compiled "
                    "autograd; README, 'Fused updates'). (Warned once per model.)",
                    UserWarning,
                    stacklevel=2,
                )
            if not self.fused.allocated:
                self.fused.allocate(self._params(), with_scale=False)
            self.fused.apply(i, p, p.grad)
            p.grad = None  # freed now: the next layer's gradient can reuse the memory

    def _decide(self, i: int, p: torch.Tensor) -> bool:
        """This step's reading, CDG and CCE for parameter ``i`` (its gradient is scaled in place when
        it exists); ``False`` when seed CDG skips it (no update)."""
        cfg = self.config
        self._step_grads.add(i)
        cce_on = self._cce_on
        if cfg.cdg is CDGMode.PREFIX:
            if self.prefix.reads_grads_at(self.steps, cfg):
                self.prefix.note_grad(i, p.grad)
            if not cce_on and cfg.cdg_prefix_signal in (PrefixSignal.GRAD, PrefixSignal.DRIFT):
                return True  # nothing reads E(p): do not measure it (a fused update still applies)
        r = self.readings
        fresh = r.due(i, self.steps)
        if fresh:
            value, low = r.measure(i, p, self.steps, self._names[i])
            self._step_e[i] = value
        else:  # between measurements: reuse the last verdict and multiplier
            value, low = r.value[i], r.low[i]
        if cfg.cdg is CDGMode.SEED and low is True:
            self._step_skipped.append(i)
            if self._ddp is None or self._window:
                p.grad = None  # (in a backward under DDP the gradient must take part in the all-reduce first)
            return False
        if cfg.cdg is CDGMode.CALIBRATED and fresh:
            self.cdg.note_reading(i, value, low)
        if cce_on:
            scale = self.cce.multiplier(value, self._initial_efficiencies)
            if p.grad is not None and scale != 1.0:
                p.grad.mul_(scale)
            if self.fused.scale is not None:
                self.fused.scale[i].fill_(scale)
            self._step_scale[i] = scale
        return True

    # ------------------------------------------------------------------ compiled fused backward
    def _traced_update(self, i: int, p: torch.Tensor) -> None:
        grad = p.grad
        if self.fused.scale is not None:
            grad = grad * self.fused.scale[i]
        self.fused.apply(i, p, grad)
        p.grad = None

    def _initial_efficiencies(self) -> list[float]:
        from ..quantities import efficiency

        with torch.no_grad():
            return [float(efficiency(p, 0, self.config.eps)) for p in self._params() if p is not None]

    # ------------------------------------------------------------------ closing a step
    def _end_of_backward(self) -> None:
        self._in_backward = False
        self._commit_piece_sums()
        self.backwards_since_step += 1
        self._unstepped += 1
        if self.mode == "compiled" and not self._e_out_seen and self.config.reads_e_out:
            # no compiled graph returned the model output (its last part ran eagerly): read E_out
            # from a forward hook from now on
            self.use_output_hook()
        self._e_out_seen = False
        if self.step_boundary == "backward":
            self._end_step(in_backward=True)
        else:
            self._window += 1

    def _close_window(self, params: list[torch.Tensor | None] | None = None, got: list[int] | None = None) -> None:
        """End a step of the optimizer / explicit boundary: decide every parameter that received a
        gradient in it, once, on the accumulated gradient (in index order: the same on every rank).
        ``got``: this step's new gradients when :meth:`_collect_step` found them (no hooks)."""
        if params is None:
            params = self._params()
        under_ddp = self._ddp is not None
        if got is not None and not under_ddp and len(got) == len(self._step_grads):
            todo = got  # (what the scan below finds: the step's gradients are exactly these)
        else:
            todo = [i for i, p in enumerate(params) if p is not None and p.requires_grad and p.grad is not None
                    and (i in self._step_grads or under_ddp)]
        if self._measures_now(todo):
            for i in todo:
                self._decide(i, params[i])
        else:
            self._decide_unmeasured(todo, params)
        self._window = 0
        self._end_step(in_backward=False, params=params)
        if not self.num_grad_hooks and self._cce_on:
            self._mark_grads_seen(params)  # CCE scaled gradients in place: their versions moved

    def _new_grads(self, params: list[torch.Tensor | None]) -> list[int]:
        """The parameters whose ``.grad`` is new or changed in place since the last step closed: what
        the hooks would have seen (a gradient kept from an earlier step is not this step's). Records
        them as seen: a later step finds them again only if they change."""
        seen, got = self._seen_grads, []
        if self._seen_lazy:  # quiet steps looked at the sentinel only (_quiet_new_grads)
            self._seen_lazy = False
            i = self._sentinel
            p = params[i] if i is not None else None
            if p is not None and p.grad is not None and _seen(seen.get(i), p.grad):
                self._mark_grads_seen(params)  # no backward since the last of them: these are its gradients
        for i, p in enumerate(params):
            if p is None or not p.requires_grad or (g := p.grad) is None:
                continue
            old = seen.get(i)  # (_seen, inline: once per parameter on every step that scans)
            if old is None or old[0]() is not g or old[1] != g._version:
                got.append(i)
                seen[i] = (weakref.ref(g), g._version)
        return got

    def _mark_grads_seen(self, params: list[torch.Tensor | None] | None = None) -> None:
        """Record every current ``.grad`` (and its version) as belonging to a closed step."""
        seen = self._seen_grads
        seen.clear()
        self._seen_lazy = False
        for i, p in enumerate(self._params() if params is None else params):
            if p is not None and (g := p.grad) is not None:
                seen[i] = (weakref.ref(g), g._version)

    @property
    def _cce_on(self) -> bool:
        """Whether CCE scales gradients now (``cce_skip_adaptive`` turns it off under Adam/AdamW)."""
        return self.config.cce is not CCEMode.OFF and not self._cce_skipped

    def _measures_now(self, todo: list[int]) -> bool:
        """Whether this step reads any ``E(p)`` of ``todo`` (or needs seed CDG's per-parameter skip):
        then each parameter is decided by :meth:`_decide`; otherwise by :meth:`_decide_unmeasured`."""
        cfg = self.config
        if cfg.cdg is CDGMode.SEED:
            return True
        if (cfg.cdg is CDGMode.PREFIX and cfg.cdg_prefix_signal in (PrefixSignal.GRAD, PrefixSignal.DRIFT)
                and not self._cce_on):
            return False  # nothing reads E(p)
        return self.readings.any_due(todo, self.steps)

    def _decide_unmeasured(self, todo: list[int], params: list[torch.Tensor | None]) -> None:
        """:meth:`_decide` for every parameter of ``todo`` on a step that measures no ``E(p)``, batched:
        one ``torch._foreach_norm`` for prefix CDG's block readings and one ``torch._foreach_mul_`` for
        CCE's multipliers (those of the last readings), no Python call per parameter."""
        cfg = self.config
        self._step_grads.update(todo)
        grads = [params[i].grad for i in todo]
        if cfg.cdg is CDGMode.PREFIX and self.prefix.reads_grads_at(self.steps, cfg):
            self.prefix.note_grads(todo, grads)
        if self._cce_on:
            r = self.readings
            scales = self.cce.multipliers(r.value, r.version, self._initial_efficiencies)
            picked = [(g, scales[i]) for i, g in zip(todo, grads, strict=True) if scales[i] != 1.0]
            if picked:
                gs, factors = zip(*picked, strict=True)
                torch._foreach_mul_(list(gs), list(factors))
            self._step_scale = {i: scales[i] for i in todo}

    def _end_step(self, *, in_backward: bool, params: list[torch.Tensor | None] | None = None) -> None:
        step = self.steps
        self.steps += 1
        self.cce.end_of_step(self._step_e.values())
        if self._step_e and self._cce_on and self.step_boundary != "backward":
            # the next steps' multipliers, computed now, on a step that measured anyway
            self.cce.multipliers(self.readings.value, self.readings.version, self._initial_efficiencies)
        outside = self.accounting.end_of_step(self.steps, self._step_grads, len(self.cdg.sets_used),
                                              self.config.cdg_max_sets)
        skipped = list(self._step_skipped)
        record = [self.steps, self.readings.e_out_value(), self._step_e, skipped, self._step_scale, self.cdg.frozen,
                  outside, None]
        self._reset_step()
        self.readings.end_step()
        wanted = None
        # every collective below runs on every rank at every step end: its condition is a step count
        if self.config.cdg is CDGMode.CALIBRATED:
            self.cdg.since_decision += 1
            if self.cdg.since_decision >= self.config.cdg_interval:
                self.cdg.since_decision = 0
                wanted = self.cdg.decide(self._protected, self.config)
                if self._distributed().active:  # rank 0 decides for every rank
                    wanted = self._distributed().broadcast_set(wanted, len(self._names), self._device())
        elif self.config.cdg is CDGMode.PREFIX:
            if params is None:
                params = self._params()
            length = self.prefix.end_of_step(step, self.readings.value, self.config, params)
            if length != self.prefix.length or self._distributed().active:
                wanted = frozenset(i for u in self.prefix.units[:length] for i in u.params)
                if self._distributed().active:  # rank 0 decides for every rank
                    wanted = self._distributed().broadcast_set(wanted, len(self._names), self._device())
                if wanted == self.cdg.frozen:
                    wanted = None
        if self.config.cdg is CDGMode.PREFIX:
            record[-1] = self.prefix.reason
        self._last_record = tuple(record)  # CosmicRuntime.last_step makes it a dict, with names, when read
        if self.config.cdg is CDGMode.PREFIX and not self.prefix.known and step == 0:
            warnings.warn(
                "cosmic_fx: cdg='prefix' does not know the order in which the forward pass reads the parameters "
                "(no traced graph, no compiled graph that reads every parameter, no eager forward with "
                "attach_hooks), so it cannot find the blocks and freezes nothing. Transform a model that "
                "symbolic-traces, remove the graph breaks, or train eagerly with cosmic_fx.attach_hooks.",
                RuntimeWarning, stacklevel=2)
        ddp = self._ddp() if self._ddp is not None else None
        if ddp is None or not in_backward:
            if skipped or wanted is not None:
                self._finish_step(step, skipped, wanted, ddp, params)
        elif skipped or wanted is not None:
            # DDP's own end-of-backward callback (copying the all-reduced buckets into .grad) was
            # queued after this one; a callback queued now runs after it
            _queue_callback(lambda: self._finish_step(step, skipped, wanted, ddp))

    def _finish_step(self, step: int, skipped: list[int], wanted: frozenset[int] | None, ddp,
                     params: list[torch.Tensor | None] | None = None) -> None:
        if params is None:
            params = self._params()
        if ddp is not None:
            for i in skipped:
                if params[i] is not None:
                    params[i].grad = None
        if wanted is not None:
            if self.config.cdg is CDGMode.PREFIX:
                # the prefix grows only (a rank that received rank 0's set follows it); this step's
                # gradients of the newly frozen blocks are dropped, so no optimizer moves them again
                wanted = wanted | self.cdg.frozen
                before = self.prefix.length
                self.prefix.advance(self.prefix.length_of(wanted), step)
                self._warn_frozen_batchnorm(before)
                for i in wanted - self.cdg.frozen:
                    if params[i] is not None:
                        params[i].grad = None
            if wanted not in self.cdg.sets_used:
                self.cdg.sets_used.append(wanted)
            changed = self.cdg.apply(wanted, self.steps, params,
                                     on_change=(lambda: rebuild_reducer(ddp)) if ddp is not None else None)
            if changed:
                log.debug("cosmic CDG step %d: frozen %s", self.steps, self.frozen)

    def _warn_frozen_batchnorm(self, before: int) -> None:
        """Once per model: the blocks frozen from ``before`` on hold BatchNorm layers in training mode,
        whose running statistics a frozen weight does not stop."""
        model = self.model
        if self._warned_batchnorm or model is None:
            return
        found = []
        for unit in self.prefix.units[before:self.prefix.length]:
            for block in unit.name.split("+"):
                try:
                    sub = model.get_submodule(block)
                except AttributeError:
                    continue  # a parameter held directly (a positional embedding)
                found += [f"{block}.{n}" if n else block for n, m in sub.named_modules()
                          if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training
                          and m.track_running_stats]
        if found:
            self._warned_batchnorm = True
            shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
            warnings.warn(
                f"cosmic_fx: prefix CDG froze blocks that hold BatchNorm layers in training mode ({shown}): their "
                "weights are frozen, but their running statistics keep updating from every batch. To freeze those "
                "too, put the layers in eval mode (model.get_submodule(name).eval()) after the freeze; to let them "
                "adapt, nothing to do. (Warned once per model.)", UserWarning, stacklevel=2)

    def _device(self) -> torch.device:
        p = next((p for p in self._params() if p is not None), None)
        return p.device if p is not None else torch.device("cpu")
