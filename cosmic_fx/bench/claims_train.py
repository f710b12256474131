"""One training run of ``cosmic-fx bench claims``: one task, one arm, one seed, and what it measured."""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from ..training import Arm, _optimizer, build
from .tasks import Task

__all__ = ["Run", "gradient_mismatch", "train_run"]


@dataclasses.dataclass
class Run:
    """What one run measured.

    Attributes:
        final: the validation metric after the last step.
        curve: ``(step, validation metric)`` at every evaluation.
        steps_to_target: the first evaluated step at which the metric reached the task's target
            (nan when never reached).
        time_to_target: training seconds up to that step (compile steps count as a median step;
            nan when never reached).
        median_step: median training-step seconds (compile steps excluded).
        compile_time: seconds of the steps that compiled (first call, recompiles).
        peak_memory_mb: peak of the CPU allocator's running total during one training step.
        frozen_fraction / scaled_fraction: mean share of parameter tensors CDG froze / CCE rescaled.
        gradient_check: for a plain ``torch.compile`` arm, whether its gradients on the first batch
            equal eager PyTorch's (``"match"``, or which parameters differ); ``"-"`` for other arms.
        note: what a peer arm did (:mod:`cosmic_fx.bench.peers`): blocks frozen, LoRA layers, cache hits.
        step_seconds: every training step's seconds, a compile step counted as the median (as in
            ``time_to_target``): the time to another target is ``sum(step_seconds[:steps])``.
    """

    final: float
    curve: list[tuple[int, float]]
    steps_to_target: float
    time_to_target: float
    median_step: float
    compile_time: float
    peak_memory_mb: float
    frozen_fraction: float
    scaled_fraction: float
    gradient_check: str = "-"
    note: str = ""
    step_seconds: list[float] = dataclasses.field(default_factory=list)


def _frames_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["frames"]["ok"])


def _peak_step_memory(step) -> float:
    """Peak of the CPU allocator's running total during one training step (torch.profiler), in MiB."""
    from torch.profiler import ProfilerActivity, profile

    from ..scoped import quiet_native_stderr

    with quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    running = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        running += event.self_cpu_memory_usage
        peak = max(peak, running)
    return peak / 2**20


def gradient_mismatch(model: nn.Module, compiled: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor,
                      rtol: float = 1e-3) -> str:
    """Compare ``compiled``'s gradients on one batch with eager PyTorch's on a copy of ``model``
    (the parameters ``compiled`` updates), each within ``rtol`` of the reference's norm; leave no
    gradient behind. A compiler bug (README: zero convolution gradients under Inductor) would
    otherwise make a baseline silently wrong.

    Returns:
        ``"match"``, or ``"ZERO: a, b"`` / ``"differ: a, b"`` naming the parameters.

    Example:
        >>> m = nn.Linear(3, 2)
        >>> gradient_mismatch(m, m, lambda o, y: o.sum(), torch.ones(1, 3), None)
        'match'
    """
    reference = copy.deepcopy(model)
    loss_fn(reference(x), y).backward()
    loss_fn(compiled(x), y).backward()
    zero, differ = [], []
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        if q.grad is not None:
            got = p.grad if p.grad is not None else torch.zeros_like(q.grad)
            # relative to the whole tensor: robust to the last-bit differences of fused kernels
            if (got - q.grad).norm() > rtol * q.grad.norm() + 1e-12:
                (zero if not got.any() and q.grad.any() else differ).append(name)
        p.grad = None
    if zero:
        return "ZERO: " + ", ".join(zero) + (f"; differ: {', '.join(differ)}" if differ else "")
    return "differ: " + ", ".join(differ) if differ else "match"


def _optimizer_for(arm: Arm, params) -> torch.optim.Optimizer | None:
    """The arm's optimizer, or ``None`` where the cosmic hooks apply the update inside backward
    (stepping another optimizer over those parameters would update them twice). A LoRA arm's
    optimizer holds only the parameters that train (the adapters and the head), as peft users do."""
    if arm.config is not None and arm.config.cce_fused_lr is not None:
        return None
    if arm.peer == "lora":
        params = [p for p in params if p.requires_grad]
    return _optimizer(arm, params)


def _peer_setup(task: Task, arm: Arm, model: nn.Module, batches: list) -> tuple[nn.Module, list[str], str, int]:
    """Prepare a peer arm (:mod:`cosmic_fx.bench.peers`): the model to build, a freeze schedule's
    parameter names and the 0-based step they are frozen from (:func:`~cosmic_fx.bench.peers.freeze_schedule`),
    and a note.

    Raises:
        PeerSkipped: the arm does not apply to this task, or peft is missing.
    """
    from . import peers

    if arm.peer == "lora":
        return peers.lora_model(model), [], f"LoRA r={peers.LORA_RANK} on the nn.Linear layers but the head", 0
    if arm.peer is not None and arm.peer.partition(":")[0] == "freezeout":
        units = peers.freeze_units(model, batches[0][0])
        k, at = peers.freeze_schedule(arm.peer, units, task.steps)
        names = [n for u in units[:k] for n in u]
        return model, names, f"{k} of {len(units)} blocks frozen from step {at}", at
    if arm.peer == "cache":
        share = peers.repeat_fraction(batches)
        if share < peers.MIN_REPEAT:
            raise peers.PeerSkipped(f"not applicable: inputs do not repeat "
                                    f"({100 * share:.1f}% of the samples come back)")
        return model, [], f"{100 * share:.0f}% of the samples come back", 0
    if arm.peer is not None:
        raise ValueError(f"unknown peer {arm.peer!r}; valid: freezeout (or freezeout:K@S), lora, cache")
    return model, [], "", 0


def train_run(task: Task, arm: Arm, seed: int, tick: Callable[[], None] | None = None) -> Run:
    """Train ``task.factory(seed)`` with ``arm`` on ``task.batches(seed)``; evaluate every
    ``task.eval_every`` steps; then profile one more step for the peak memory. ``tick`` is called
    after every training step (a progress bar).

    Example:
        >>> from cosmic_fx.bench.tasks import make_tasks
        >>> task = make_tasks(["digits-mlp"], quick=True)[0]
        >>> r = train_run(task, Arm("eager", None, "eager", "momentum", 0.05), seed=0)   # doctest: +SKIP
    """
    import cosmic_fx

    torch._dynamo.reset()
    torch.manual_seed(seed)
    model = task.factory(seed)
    batches = list(task.batches(seed))
    model, schedule, note, freeze_from = _peer_setup(task, arm, model, batches)
    train_mod, eval_mod, hooks = build(arm, model)
    opt = _optimizer_for(arm, train_mod.parameters())
    step_times, compile_time = [], 0.0
    curve, frozen_sum, scaled_sum, n = [], 0.0, 0.0, 0
    check = "-"
    forward = train_mod
    if arm.peer == "cache":
        from ..prefix_cache import PrefixCache

        forward = PrefixCache(train_mod)  # content keys: the task's batches carry no sample ids
    frozen_at = freeze_from + 1 if schedule else None  # 1-based step number
    by_name = dict(model.named_parameters())
    if arm.config is None and arm.engine == "compile":
        frames, t0 = _frames_compiled(), time.perf_counter()
        check = gradient_mismatch(model, train_mod, task.loss, *batches[0])
        if _frames_compiled() != frames:
            compile_time += time.perf_counter() - t0  # the compile happened here, not in step 1

    fused = arm.config is not None and arm.config.cce_fused.value != "off"

    def one_step(x, y):
        loss = task.loss(forward(x), y)
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        if fused:  # compiled: the backward through compiled autograd, each gradient freed at its update
            cosmic_fx.fused_optimizer(train_mod).backward(loss)
        else:
            loss.backward()
        if opt is not None:
            opt.step()

    for i, (x, y) in enumerate(batches, start=1):
        if i == frozen_at:  # FreezeOut: the first blocks stop training (one recompile, or none from step 0)
            for name in schedule:
                by_name[name].requires_grad_(False)
                by_name[name].grad = None
        frames = _frames_compiled()
        t0 = time.perf_counter()
        one_step(x, y)
        dt = time.perf_counter() - t0
        if _frames_compiled() != frames:
            compile_time += dt  # this step compiled (first call or a recompile): kept apart
            step_times.append(float("nan"))
        else:
            step_times.append(dt)
        # main keys the runtime on the transformed module (eval_mod); the old one on the model
        h = hooks or cosmic_fx.hooks_of(eval_mod) or cosmic_fx.hooks_of(model)
        if h is not None and h.last_step:
            k = max(h.num_hooked, 1)
            frozen_sum += (len(h.last_step["skipped"]) + len(h.last_step["frozen"])) / k
            scaled_sum += sum(1 for v in h.last_step["scale"].values() if v != 1.0) / k
            n += 1
        if i % task.eval_every == 0 or i == len(batches):
            curve.append((i, task.evaluate(eval_mod)))
        if tick is not None:
            tick()
    if schedule:  # FreezeOut: the share of parameter tensors frozen, averaged over the steps
        share = len(schedule) / max(len(by_name), 1)
        frozen_sum, n = share * (len(batches) - frozen_at + 1), len(batches)
    valid = [t for t in step_times if not math.isnan(t)]
    median = statistics.median(valid) if valid else float("nan")
    steps_to = next((s for s, m in curve if m <= task.target), float("nan"))
    seconds = [median if math.isnan(t) else t for t in step_times]
    time_to = float("nan") if math.isnan(steps_to) else sum(seconds[: int(steps_to)])
    peak = _peak_step_memory(lambda: one_step(*batches[-1]))
    h = hooks or cosmic_fx.hooks_of(eval_mod) or cosmic_fx.hooks_of(model)
    if h is not None:
        h.remove()
    return Run(
        final=curve[-1][1], curve=curve, steps_to_target=steps_to, time_to_target=time_to,
        median_step=median, compile_time=compile_time, peak_memory_mb=peak,
        frozen_fraction=frozen_sum / max(n, 1), scaled_fraction=scaled_sum / max(n, 1), gradient_check=check,
        note=_note(note, forward), step_seconds=seconds,
    )


def _note(note: str, forward) -> str:
    """A peer arm's note, with the cache's hit rate for the cache arm."""
    hits, misses = getattr(forward, "hits", None), getattr(forward, "misses", None)
    if hits is None:
        return note
    rate = f"cache hits {100 * hits / max(hits + misses, 1):.0f}% of samples once a prefix froze"
    return f"{note}; {rate}" if note else rate
