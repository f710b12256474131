"""A small, honest training harness shared by the demo and the benchmarks.

Every arm trains the same model (same init seed) on the same data order; only the cosmic
configuration, the engine and the optimizer differ.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from .config import CosmicConfig
from .data import ClassificationData
from .runtime import attach_hooks

__all__ = ["Arm", "RunResult", "train_classifier"]


@dataclasses.dataclass(frozen=True)
class Arm:
    """One way to train a model.

    Attributes:
        name: label in tables.
        config: the cosmic config, or ``None`` for plain PyTorch.
        engine: ``"eager"`` (transform + eager hooks), ``"compile"`` (``cosmic_fx.compile``; for a
            plain arm, ``torch.compile`` with Inductor).
        optimizer: ``"sgd"``, ``"momentum"`` (SGD, momentum 0.9) or ``"adamw"``.
        lr: learning rate.
        lower: the lowering of a plain ``"compile"`` arm (``torch.compile(model, backend=lower)``);
            cosmic arms take theirs from ``config.lower``.
        impl: the torch.optim implementation: ``"default"`` (torch's choice: the per-parameter loop on
            CPU), ``"foreach"`` (``foreach=True``) or ``"fused"`` (``fused=True``).
        peer: a peer method of ``cosmic-fx bench claims`` applied on top (``"freezeout"``, ``"lora"``,
            ``"cache"``; :mod:`cosmic_fx.bench.peers`), or ``None``.
    """

    name: str
    config: CosmicConfig | None = None
    engine: str = "eager"
    optimizer: str = "sgd"
    lr: float = 0.1
    lower: str = "inductor"
    impl: str = "default"
    peer: str | None = None


_IMPLS = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}


@dataclasses.dataclass
class RunResult:
    arm: str
    seed: int
    test_error: list[float]  # after each epoch, in percent
    train_loss: list[float]  # mean over each epoch
    step_times: list[float]  # seconds, every step after the first
    first_step_time: float  # includes compilation for compiled arms
    wall_times: list[float]  # training seconds elapsed at the end of each epoch (evaluation excluded)
    frozen_fraction: float = 0.0  # mean share of parameter tensors frozen/skipped per step (CDG)
    scaled_fraction: float = 0.0  # mean share of hooked parameters whose update CCE changed per step

    @property
    def final_error(self) -> float:
        return self.test_error[-1]

    @property
    def median_step(self) -> float:
        return statistics.median(self.step_times) if self.step_times else float("nan")


def _optimizer(arm: Arm, params) -> torch.optim.Optimizer:
    if arm.impl not in _IMPLS:
        raise ValueError(f"unknown optimizer implementation {arm.impl!r}; valid: {', '.join(_IMPLS)}")
    kw = _IMPLS[arm.impl]
    if arm.optimizer == "sgd":
        return torch.optim.SGD(params, lr=arm.lr, **kw)
    if arm.optimizer == "momentum":
        return torch.optim.SGD(params, lr=arm.lr, momentum=0.9, **kw)
    if arm.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=arm.lr, **kw)
    raise ValueError(f"unknown optimizer {arm.optimizer!r}; valid: sgd, momentum, adamw")


def build(arm: Arm, model: nn.Module):
    """Return ``(train_module, eval_module, hooks)`` for an arm."""
    import cosmic_fx

    if arm.config is None:
        if arm.engine == "compile":
            return torch.compile(model, backend=arm.lower), model, None
        return model, model, None
    if arm.engine == "compile":
        compiled = cosmic_fx.compile(model, arm.config)
        tm = compiled._orig_mod
        return compiled, tm, None  # hooks attach inside the backend, on the first call
    tm = cosmic_fx.transform(model, arm.config)
    hooks = attach_hooks(tm, arm.config) if arm.config.hooks_enabled else None
    return tm, tm, hooks


@torch.no_grad()
def _error(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    try:
        pred = model(x).argmax(-1)
    finally:
        model.train(was_training)
    return 100.0 * (pred != y).float().mean().item()


def train_classifier(
    factory: Callable[[], nn.Module],
    data: ClassificationData,
    arm: Arm,
    *,
    epochs: int = 30,
    batch_size: int = 32,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> RunResult:
    """Train ``factory()`` on ``data`` the way ``arm`` says; evaluate after every epoch.

    Example:
        >>> from cosmic_fx.data import load_digits
        >>> from cosmic_fx.models import DigitsMLP
        >>> r = train_classifier(DigitsMLP, load_digits(), Arm("plain"), epochs=1)   # doctest: +SKIP
    """
    import cosmic_fx

    torch.manual_seed(seed)
    model = factory()
    train_mod, eval_mod, hooks = build(arm, model)
    opt = _optimizer(arm, train_mod.parameters())
    gen = torch.Generator().manual_seed(seed)
    n = len(data.y_train)
    errors, losses, step_times, walls = [], [], [], []
    first, elapsed = float("nan"), 0.0
    frozen_sum = scaled_sum = 0.0
    steps = 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        total, count = 0.0, 0
        for i in range(0, n - batch_size + 1, batch_size):  # drop the ragged last batch
            idx = perm[i : i + batch_size]
            t0 = time.perf_counter()
            out = train_mod(data.x_train[idx])
            loss = nn.functional.cross_entropy(out, data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            dt = time.perf_counter() - t0
            elapsed += dt
            if steps == 0:
                first = dt
            else:
                step_times.append(dt)
            steps += 1
            total += loss.item()
            count += 1
            h = hooks or cosmic_fx.hooks_of(eval_mod)
            if h is not None and h.last_step:
                n_params = max(h.num_hooked, 1)
                frozen_sum += (len(h.last_step["skipped"]) + len(h.last_step["frozen"])) / n_params
                scaled_sum += sum(1 for v in h.last_step["scale"].values() if v != 1.0) / n_params
        losses.append(total / max(count, 1))
        errors.append(_error(eval_mod, data.x_test, data.y_test))
        walls.append(elapsed)
        if progress is not None:
            progress(1)
    h = hooks or cosmic_fx.hooks_of(eval_mod)
    if h is not None:
        h.remove()
    return RunResult(
        arm=arm.name, seed=seed, test_error=errors, train_loss=losses, step_times=step_times,
        first_step_time=first, wall_times=walls,
        frozen_fraction=frozen_sum / max(steps, 1), scaled_fraction=scaled_sum / max(steps, 1),
    )
