"""The benchmark tasks: real data that ships with installed packages, fixed splits, fixed budgets.

* ``digits-mlp`` / ``digits-cnn``: scikit-learn's digits, test split as validation, metric = error %.
* ``stdlib-lm``: a character-level transformer trained on the interpreter's own standard-library
  sources (tests excluded); the last 10% of the corpus is held out; metric = bits per character.

The larger workloads (a 6-block LM, two fine-tuning tasks and an image transfer task) are in
:mod:`cosmic_fx.bench.workloads`; :func:`make_tasks` builds any of them by name. The tasks of
:data:`LONG_TASK_NAMES` (``docs-finetune-big``) run only when named.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..data import load_digits, load_stdlib_text
from ..models import DigitsCNN, DigitsMLP, TinyTransformerLM

__all__ = ["LONG_TASK_NAMES", "TASK_NAMES", "Task", "make_tasks"]


@dataclasses.dataclass
class Task:
    """A training problem with its budget.

    Attributes:
        name: table label.
        factory: ``seed -> model``: the model every arm of that seed starts from (called after
            ``torch.manual_seed(seed)``; a fine-tuning task loads its pretrained weights here).
        batches: ``seed -> iterator of (x, y)``; the same sequence for every arm with that seed.
        loss: ``(output, y) -> scalar``.
        evaluate: ``model -> metric`` on the validation split (lower is better).
        metric: its name (``"error %"`` or ``"bits/char"``).
        target: the validation metric counted as "converged" for steps-to-target.
        steps: training steps per run; eval_every: validation interval in steps.
        optimizer / lr: the task's primary optimizer (used by the Inductor and cosmic arms).
        adamw_lr: learning rate of the AdamW baseline.
        tolerance: the issue's accuracy budget for the default preset (1 point / 0.05 bpc).
        tags: what kind of workload it is, for the targets that apply to some tasks only
            (``"transformer"``, ``"fine-tune"``).
        ablations: also run each mechanism alone on this task (the small tasks only: they are cheap).
        prepare: ``(seed, tick) -> info``: work done once per seed before any arm (pretraining), or
            ``None``; it calls ``tick(1)`` after each of its ``prepare_steps`` steps (a progress bar).
        prepare_steps: the steps ``prepare`` takes when it trains (0 without ``prepare``).
    """

    name: str
    factory: Callable[[int], nn.Module]
    batches: Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    evaluate: Callable[[nn.Module], float]
    metric: str
    target: float
    steps: int
    eval_every: int
    optimizer: str
    lr: float
    adamw_lr: float
    tolerance: float
    tags: frozenset[str] = frozenset()
    ablations: bool = False
    prepare: Callable[..., dict[str, Any]] | None = None
    prepare_steps: int = 0


def _classification_batches(x: torch.Tensor, y: torch.Tensor, batch: int, steps: int):
    def make(seed: int):
        gen = torch.Generator().manual_seed(seed)
        n, done = len(y), 0
        while True:
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n - batch + 1, batch):
                if done == steps:
                    return
                idx = perm[i : i + batch]
                yield x[idx], y[idx]
                done += 1

    return make


def _error_of(x: torch.Tensor, y: torch.Tensor) -> Callable[[nn.Module], float]:
    @torch.no_grad()
    def evaluate(model: nn.Module) -> float:
        was = model.training
        model.eval()
        try:
            return 100.0 * (model(x).argmax(-1) != y).float().mean().item()
        finally:
            model.train(was)

    return evaluate


def _digits_task(name: str, image: bool, steps: int) -> Task:
    data = load_digits(image=image)
    return Task(
        name=name,
        factory=lambda seed: DigitsCNN() if image else DigitsMLP(),
        batches=_classification_batches(data.x_train, data.y_train, 32, steps),
        loss=nn.functional.cross_entropy,
        evaluate=_error_of(data.x_test, data.y_test),
        metric="error %",
        target=5.0 if image else 6.0,
        steps=steps,
        eval_every=max(steps // 30, 10),
        optimizer="momentum",
        lr=0.05,
        adamw_lr=1e-3,
        tolerance=1.0,
        ablations=True,
    )


_PRINTABLE = [chr(c) for c in range(32, 127)] + ["\n", "\t"]


def _encode(text: str) -> torch.Tensor:
    table = {c: i + 1 for i, c in enumerate(_PRINTABLE)}  # 0 = any other character
    return torch.tensor([table.get(c, 0) for c in text], dtype=torch.long)


def encode_text(text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Character ids of ``text``, split 90% / 10% by position: ``(train, held_out)``."""
    tokens = _encode(text)
    split = int(0.9 * len(tokens))
    return tokens[:split], tokens[split:]


VOCAB = len(_PRINTABLE) + 1


def lm_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def lm_batches(train: torch.Tensor, steps: int, context: int, batch: int):
    """``seed -> iterator`` of ``steps`` random windows of ``train`` (inputs, next characters)."""

    def batches(seed: int):
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            s = torch.randint(0, len(train) - context - 1, (batch,), generator=gen)
            idx = s[:, None] + torch.arange(context)
            yield train[idx], train[idx + 1]

    return batches


def lm_evaluator(held: torch.Tensor, context: int, windows: int = 128) -> Callable[[nn.Module], float]:
    """Bits per character on ``windows`` evenly spaced windows of the held-out text."""
    starts = torch.linspace(0, len(held) - context - 2, windows).long()
    vx = torch.stack([held[s : s + context] for s in starts])
    vy = torch.stack([held[s + 1 : s + context + 1] for s in starts])

    @torch.no_grad()
    def evaluate(model: nn.Module) -> float:
        was = model.training
        model.eval()
        try:
            return lm_loss(model(vx), vy).item() / math.log(2)
        finally:
            model.train(was)

    return evaluate


def _lm_task(steps: int, context: int = 64, batch: int = 32, max_chars: int = 1_500_000) -> Task:
    train, held = encode_text(load_stdlib_text(max_chars))
    return Task(
        name="stdlib-lm",
        factory=lambda seed: TinyTransformerLM(VOCAB, dim=64, heads=4, layers=2, context=context),
        batches=lm_batches(train, steps, context, batch), loss=lm_loss,
        evaluate=lm_evaluator(held, context), metric="bits/char",
        target=3.0, steps=steps, eval_every=max(steps // 20, 10),
        optimizer="adamw", lr=2e-3, adamw_lr=2e-3, tolerance=0.05,
        tags=frozenset({"transformer"}), ablations=True,
    )


# tasks that ``bench claims`` runs only when named (one arm is ~20 minutes on 2 cores)
LONG_TASK_NAMES = ("docs-finetune-big",)
TASK_NAMES = ("digits-mlp", "digits-cnn", "stdlib-lm", "stdlib-lm-deep", "docs-finetune", "mnist-transfer",
              *LONG_TASK_NAMES)


def make_tasks(names: list[str], quick: bool, cache_dir: str | None = None) -> list[Task]:
    """The tasks by name (see :data:`TASK_NAMES`), with quick or full budgets.

    Args:
        names: task names, in the order wanted.
        quick: the smoke-test budgets.
        cache_dir: folder for the pretrained weights of the fine-tuning tasks (``None``: memory only).

    Example:
        >>> [t.name for t in make_tasks(["digits-mlp"], quick=True)]     # doctest: +SKIP
        ['digits-mlp']
    """
    from . import workloads
    from .pretrain import PretrainCache

    unknown = [n for n in names if n not in TASK_NAMES]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; valid: {', '.join(TASK_NAMES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"task(s) named twice in {names}")
    cache = PretrainCache(cache_dir)
    builders = {
        "digits-mlp": lambda: _digits_task("digits-mlp", False, 60 if quick else 900),
        "digits-cnn": lambda: _digits_task("digits-cnn", True, 60 if quick else 900),
        "stdlib-lm": lambda: _lm_task(30 if quick else 600, max_chars=300_000 if quick else 1_500_000),
        "stdlib-lm-deep": lambda: workloads.deep_lm_task(quick),
        "docs-finetune": lambda: workloads.docs_finetune_task(quick, cache),
        "mnist-transfer": lambda: workloads.mnist_transfer_task(quick, cache),
        "docs-finetune-big": lambda: workloads.big_finetune_task(quick, cache),
    }
    return [builders[n]() for n in names]
