"""The peers of ``cosmic-fx bench claims`` (issue 17, item 5): what a user would pick instead of ``fast``.

On the tasks tagged ``"fine-tune"`` (docs-finetune, mnist-transfer), beside ``torch.compile`` and
``cosmic fast``:

* ``"torch.compile, best optimizer"``: ``torch.compile`` with the fastest torch.optim implementation
  of the task's optimizer on this CPU (:data:`BEST_IMPL`, measured by
  ``benchmarks/experiments/optimizer_impl_experiment.py``): AdamW on AdamW tasks, SGD momentum on
  momentum tasks (the task's optimizer is kept: an arm with another optimizer would not be the same
  training).
* ``"FreezeOut schedule"``: ``torch.compile``, the task's optimizer; from step ``int(0.3 * steps)`` on,
  the first third of the blocks (:func:`freeze_units`: prefix CDG's blocks, the output layer never
  among them) get ``requires_grad_(False)`` (one recompile). A fixed schedule, not a signal.
* ``"peft LoRA r=8"``: peft's LoRA (r=8, alpha=16, no dropout) on every ``nn.Linear`` except the
  output head, base weights frozen; the head (new classes in a transfer task) and nothing else
  trains fully; then ``torch.compile``. peft is an optional extra (``pip install cosmic-fx[peers]``);
  without it the arm is skipped with one line (:class:`PeerSkipped`).
* ``"cosmic fast + cache"``: the fast preset with :class:`cosmic_fx.PrefixCache` (content keys) in
  front: "not applicable" (skipped) on a task whose inputs do not come back (random windows of a
  text), measured by :func:`repeat_fraction` on the task's own batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

__all__ = ["BEST_IMPL", "LORA_RANK", "PeerSkipped", "freeze_schedule", "freeze_units", "freezeout_count",
           "freezeout_step", "lora_model",
           "repeat_fraction"]

# The fastest torch.optim implementation under torch.compile on this CPU, per optimizer, from
# `python benchmarks/experiments/optimizer_impl_experiment.py` (docs/guide/claims.md, section "Peers").
BEST_IMPL = {"adamw": "fused", "momentum": "fused", "sgd": "fused"}

LORA_RANK = 8
# a task whose samples come back less often than this is "not applicable" for the cache arm
MIN_REPEAT = 0.2


class PeerSkipped(Exception):
    """A peer arm that cannot run on this task or in this environment; the message says why (one line)."""


def freeze_units(model: nn.Module, example: torch.Tensor) -> list[list[str]]:
    """The blocks of a plain model that prefix CDG would freeze, in forward order, as parameter names.

    The same definition as prefix CDG (:func:`cosmic_fx.runtime.prefix.param_blocks`,
    :func:`cosmic_fx.policy.prefix_units`, the output layer of :func:`cosmic_fx.policy.output_layer`),
    read from one forward of ``example`` (under ``no_grad``).

    Example:
        >>> from cosmic_fx.bench.workloads import MnistCNN
        >>> freeze_units(MnistCNN(), torch.zeros(1, 1, 28, 28))[0]
        ['conv1.weight', 'conv1.bias']
    """
    from .. import policy
    from ..inspect import _run_recording_output_layer
    from ..runtime.prefix import param_blocks

    with torch.no_grad():
        _, protected, order, _ = _run_recording_output_layer(model, (example,))
    names = {id(p): n for n, p in model.named_parameters()}
    blocks, with_site = param_blocks(model)
    keys = [names[id(p)] for p in order if id(p) in names]
    units = policy.prefix_units(keys, {n: blocks.get(n) for n in keys}, with_site,
                                {names[id(p)] for p in protected if id(p) in names})
    return [list(u.params) for u in units]


def freezeout_step(steps: int) -> int:
    """The 0-based training step from which the FreezeOut schedule's blocks are frozen: 30% of the budget.

    Example:
        >>> freezeout_step(300)
        90
    """
    return int(0.3 * steps)


def freezeout_count(units: Sequence[Sequence[str]]) -> int:
    """How many blocks the schedule freezes: the first third (at least one when there is a block).

    Example:
        >>> freezeout_count([["a.w"], ["b.w"], ["c.w"], ["d.w"]]), freezeout_count([["a.w"]]), freezeout_count([])
        (1, 1, 0)
    """
    return max(1, len(units) // 3) if units else 0


def freeze_schedule(peer: str, units: Sequence[Sequence[str]], steps: int) -> tuple[int, int]:
    """``(blocks, step)`` of a fixed freeze schedule: how many of the first ``units`` it freezes, from
    which 0-based training step. ``"freezeout"`` is the FreezeOut arm (:func:`freezeout_count` from
    :func:`freezeout_step`); ``"freezeout:K@S"`` freezes the first ``K`` blocks from step ``S`` (the
    schedules of ``benchmarks/experiments/prefix_ceiling_experiment.py``).

    Example:
        >>> units = [["a.w"], ["b.w"], ["c.w"], ["d.w"], ["e.w"], ["f.w"]]
        >>> freeze_schedule("freezeout", units, 300), freeze_schedule("freezeout:3@0", units, 300)
        ((2, 90), (3, 0))
    """
    if peer == "freezeout":
        return freezeout_count(units), freezeout_step(steps)
    head, _, spec = peer.partition(":")
    k, _, at = spec.partition("@")
    if head != "freezeout" or not k.isdigit() or not at.isdigit():
        raise ValueError(f"unknown freeze schedule {peer!r}; valid: 'freezeout', or 'freezeout:K@S' (the first K "
                         "blocks from the 0-based step S, e.g. 'freezeout:3@0')")
    if not 1 <= int(k) <= len(units) or int(at) >= steps:
        raise ValueError(f"freeze schedule {peer!r}: K must be 1..{len(units)} (the model's blocks) and S below the "
                         f"task's {steps} steps")
    return int(k), int(at)


def lora_model(model: nn.Module) -> nn.Module:
    """``model`` with peft LoRA adapters (r=:data:`LORA_RANK`, alpha 16, no dropout) on every ``nn.Linear``
    except the output head (the last ``nn.Linear`` in registration order), its base weights frozen
    and the head trainable.

    Raises:
        PeerSkipped: peft is not installed.

    Example:
        >>> from cosmic_fx.bench.workloads import MnistCNN
        >>> m = lora_model(MnistCNN())                                   # doctest: +SKIP
        >>> sorted(n for n, p in m.named_parameters() if p.requires_grad)  # doctest: +SKIP
        ['fc.lora_A.default.weight', 'fc.lora_B.default.weight', 'head.bias', 'head.weight']
    """
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:
        raise PeerSkipped(f"peft LoRA arm skipped: peft is not installed ({e}); pip install 'cosmic-fx[peers]'") from e
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if len(linears) < 2:
        raise PeerSkipped(f"peft LoRA arm skipped: {type(model).__name__} has no nn.Linear besides its head")
    head, targets = linears[-1], linears[:-1]
    config = LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.0, target_modules=targets, bias="none")
    model = inject_adapter_in_model(config, model)  # freezes every non-LoRA parameter
    for p in model.get_submodule(head).parameters():
        p.requires_grad_(True)
    return model


def repeat_fraction(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """The share of samples (rows of ``x``) in ``batches`` whose input was already seen earlier (content keys).

    Example:
        >>> x = torch.tensor([[1.0], [2.0]])
        >>> repeat_fraction([(x, None), (x, None)])
        0.5
    """
    from ..prefix_cache import content_keys

    seen: set = set()
    total = repeated = 0
    for x, _ in batches:
        for k in content_keys([x]):
            repeated += k in seen
            seen.add(k)
            total += 1
    return repeated / total if total else 0.0
