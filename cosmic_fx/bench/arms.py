"""The arms of ``cosmic-fx bench claims``: baselines, the cosmic presets, and each mechanism alone.

Adding a preset to the benchmark is one line in :data:`PRESETS`, e.g.
``PresetArm("fast", targets=True)``: it then trains on every task (arm ``"cosmic fast"``), gets two
columns in the claims table, a row per task in the accuracy-budget table and, with ``targets=True``,
its rows in the issue-10 targets table.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..config import CosmicConfig
from ..training import Arm
from .tasks import Task

__all__ = ["ABLATIONS", "BASELINES", "PEERS", "PRESETS", "PresetArm", "arms_for", "eager_arm_name"]


@dataclasses.dataclass(frozen=True)
class PresetArm:
    """A cosmic preset trained as one arm (``cosmic_fx.compile``, the task's optimizer and lr).

    Attributes:
        preset: the name :meth:`CosmicConfig.preset` knows (``"default"``, ``"seed"``, ...).
        targets: evaluate issue 10's targets (against ``torch.compile``) for this preset.
        overrides: ``CosmicConfig`` fields set on top of the preset, as ``(name, value)`` pairs.
        name: the name in tables (default: the preset's); give one to a variant with overrides.

    Example:
        >>> PresetArm("seed").label
        'cosmic seed'
        >>> arm = PresetArm("default", overrides=(("cdg", "off"),), name="default, no CDG")
        >>> arm.label, arm.config("aot_eager").cdg.value
        ('cosmic default, no CDG', 'off')
    """

    preset: str
    targets: bool = False
    overrides: tuple[tuple[str, Any], ...] = ()
    name: str | None = None

    @property
    def short(self) -> str:
        return self.name or self.preset

    @property
    def label(self) -> str:
        return f"cosmic {self.short}"

    def config(self, lower: str) -> CosmicConfig:
        return CosmicConfig.preset(self.preset, **{"lower": lower, **dict(self.overrides)})


# The presets every task trains, in table order. The issue-10 targets table covers those with
# targets=True: the fast preset the targets are for, and the default beside it for comparison.
PRESETS: list[PresetArm] = [
    PresetArm("default", targets=True),
    PresetArm("seed"),
    PresetArm("fast", targets=True),
    # the same preset freezing sooner and more (the trade-off the fast defaults were chosen on)
    PresetArm("fast", targets=True, overrides=(("cdg_prefix_window", 10), ("cdg_prefix_max", 0.75)),
              name="fast, freeze more"),
]

# Plain PyTorch arms, by name. "torch.compile" is the speed/memory baseline (the lowering the cosmic
# arms use); the eager arm with the task's optimizer joins it for iterations and generalization.
BASELINES = ("eager SGD+momentum", "eager AdamW", "torch.compile")

# Each mechanism alone (default forms, eager engine): only on tasks with ``ablations=True``.
ABLATIONS: dict[str, CosmicConfig] = {
    "QCI alone": CosmicConfig.off(qci=True),
    "CSC alone": CosmicConfig.off(csc="output"),
    "CDG alone": CosmicConfig.off(cdg="calibrated"),
    "CCE alone": CosmicConfig.off(cce="relative"),
}


# The peers (issue 17, item 5; cosmic_fx.bench.peers): only on tasks tagged "fine-tune".
PEERS = ("torch.compile, best optimizer", "FreezeOut schedule", "peft LoRA r=8", "cosmic fast + cache")


def peer_arms(task: Task, lower: str) -> dict[str, Arm]:
    """The peer arms of a fine-tuning / transfer task (none on other tasks), by name.

    Example:
        >>> from cosmic_fx.bench.tasks import make_tasks
        >>> list(peer_arms(make_tasks(["digits-mlp"], quick=True)[0], "aot_eager"))
        []
    """
    from .peers import BEST_IMPL

    if "fine-tune" not in task.tags:
        return {}
    opt, lr = task.optimizer, task.lr
    fast = CosmicConfig.preset("fast", lower=lower)
    return {
        PEERS[0]: Arm(PEERS[0], None, "compile", opt, lr, lower=lower, impl=BEST_IMPL[opt]),
        PEERS[1]: Arm(PEERS[1], None, "compile", opt, lr, lower=lower, peer="freezeout"),
        PEERS[2]: Arm(PEERS[2], None, "compile", opt, lr, lower=lower, peer="lora"),
        PEERS[3]: Arm(PEERS[3], fast, "compile", opt, lr, peer="cache"),
    }


def eager_arm_name(task: Task) -> str:
    """The eager baseline that uses the task's own optimizer."""
    return "eager SGD+momentum" if task.optimizer == "momentum" else "eager AdamW"


def arms_for(task: Task, lower: str, quick: bool = False, only: list[str] | None = None) -> dict[str, Arm]:
    """The arms of one task, by name, in table order.

    Args:
        task: the task (its optimizer, learning rates and whether it runs the ablations).
        lower: the lowering of every compiled arm (``"inductor"``; ``"aot_eager"`` in quick runs).
        quick: leave out the other-optimizer eager baseline and the ablations.
        only: keep just these arm names (``--arms``); the names must exist (see :func:`arm_names`).

    Example:
        >>> from cosmic_fx.bench.tasks import make_tasks
        >>> list(arms_for(make_tasks(["digits-mlp"], quick=True)[0], "aot_eager", quick=True))  # doctest: +SKIP
        ['eager SGD+momentum', 'torch.compile', 'cosmic default', 'cosmic seed', 'cosmic fast']
    """
    opt, lr = task.optimizer, task.lr
    arms = {
        "eager SGD+momentum": Arm("eager SGD+momentum", None, "eager", "momentum", lr if opt == "momentum" else 0.05),
        "eager AdamW": Arm("eager AdamW", None, "eager", "adamw", task.adamw_lr),
        "torch.compile": Arm("torch.compile", None, "compile", opt, lr, lower=lower),
    }
    if quick or not task.ablations:  # the other optimizer's eager run is context, not a baseline
        del arms["eager AdamW" if opt == "momentum" else "eager SGD+momentum"]
    for p in PRESETS:
        arms[p.label] = Arm(p.label, p.config(lower), "compile", opt, lr)
    arms.update(peer_arms(task, lower))
    if task.ablations and not quick:
        arms.update({name: Arm(name, cfg, "eager", opt, lr) for name, cfg in ABLATIONS.items()})
    if only is not None:
        arms = {k: v for k, v in arms.items() if k in only or k in _required(task)}
    return arms


def _required(task: Task) -> tuple[str, ...]:
    """Arms every verdict needs: the baselines the presets are compared with."""
    return ("torch.compile", eager_arm_name(task))


def arm_names() -> list[str]:
    """Every arm name a task can have (for validating ``--arms``)."""
    return [*BASELINES, *(p.label for p in PRESETS), *PEERS, *ABLATIONS]
