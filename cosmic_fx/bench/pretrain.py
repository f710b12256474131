"""Deterministic pretraining for the benchmark's fine-tuning and transfer tasks, done once per seed.

Every arm of a seed starts from the same pretrained weights: :class:`PretrainCache` trains them the
first time a seed asks (plain eager PyTorch, the pretraining's own optimizer and batches), keeps them
in memory for the other arms and, given a folder, on disk for later runs. The cache key is a hash of
everything that decides the weights (the pretraining's description, a digest of its data, the seed,
the torch version and the number of intra-op threads), so a stale file is never used: a file whose
stored key differs is retrained and overwritten.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["Pretraining", "PretrainCache", "digest"]


def digest(*tensors: torch.Tensor) -> str:
    """SHA-256 of the tensors' bytes (the data a pretraining reads goes into its cache key).

    Example:
        >>> digest(torch.arange(3)) == digest(torch.arange(3))
        True
    """
    h = hashlib.sha256()
    for t in tensors:
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class Pretraining:
    """How to pretrain one model family; the same for every arm and every seed.

    Attributes:
        name: a label, also the cache file's prefix (letters, digits, ``-``).
        build: a fresh, randomly initialised model (called after ``torch.manual_seed(seed)``).
        batches: ``seed -> iterable of (x, y)``: exactly ``steps`` batches.
        loss: ``(output, y) -> scalar``.
        optimizer: ``"momentum"`` (SGD, momentum 0.9) or ``"adamw"``.
        lr: learning rate.
        steps: number of optimizer steps.
        fingerprint: everything else that decides the weights (model hyper-parameters, a
            :func:`digest` of the data, the split); part of the cache key.
        evaluate: optional ``model -> metric`` recorded after pretraining (reported, not used).

    Example:
        >>> pre = Pretraining("toy", lambda: nn.Linear(2, 2), lambda s: [(torch.ones(1, 2), torch.zeros(1).long())],
        ...                   nn.functional.cross_entropy, "adamw", 1e-3, 1, {"data": "ones"})
        >>> state, info = PretrainCache().get(pre, seed=0)
        >>> sorted(state), info["cached"]
        (['bias', 'weight'], 'no')
    """

    name: str
    build: Callable[[], nn.Module]
    batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    optimizer: str
    lr: float
    steps: int
    fingerprint: dict[str, Any]
    evaluate: Callable[[nn.Module], float] | None = None

    def __post_init__(self) -> None:
        if self.optimizer not in ("momentum", "adamw"):
            raise ValueError(f"Pretraining {self.name!r}: optimizer must be 'momentum' or 'adamw', "
                             f"got {self.optimizer!r}")
        if self.steps < 1:
            raise ValueError(f"Pretraining {self.name!r}: steps must be >= 1, got {self.steps}")
        if not self.name or not all(c.isalnum() or c == "-" for c in self.name):
            raise ValueError(f"Pretraining name must be letters, digits and '-', got {self.name!r}")

    def key(self, seed: int) -> str:
        """The cache key of this pretraining for ``seed`` (hex SHA-256)."""
        spec = {
            "name": self.name, "optimizer": self.optimizer, "lr": self.lr, "steps": self.steps,
            "fingerprint": self.fingerprint, "seed": seed, "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        }
        return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()

    def train(self, seed: int, tick: Callable[[int], object] | None = None
              ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Pretrain from scratch (eager, deterministic for one build and thread count). The global RNG
        state is restored afterwards, so a caller's seeded initialisation does not depend on whether
        the weights came from the cache. ``tick(1)`` is called after each step (a progress bar)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self._train(seed, tick)

    def _train(self, seed: int, tick: Callable[[int], object] | None
               ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        model = self.build()
        params = model.parameters()
        opt = (torch.optim.SGD(params, lr=self.lr, momentum=0.9) if self.optimizer == "momentum"
               else torch.optim.AdamW(params, lr=self.lr))
        t0, done = time.perf_counter(), 0
        model.train()
        for x, y in self.batches(seed):
            loss = self.loss(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            if tick is not None:
                tick(1)
        if done != self.steps:
            raise RuntimeError(f"Pretraining {self.name!r}: batches({seed}) gave {done} batches, expected {self.steps}")
        info = {"seconds": time.perf_counter() - t0,
                "metric": self.evaluate(model) if self.evaluate is not None else float("nan")}
        return {k: v.detach().clone() for k, v in model.state_dict().items()}, info


class PretrainCache:
    """Pretrained weights by (pretraining, seed): in memory, and in ``folder`` when one is given.

    Args:
        folder: where ``<name>-seed<seed>-<key>.pt`` files go (``None``: memory only).

    Example:
        >>> cache = PretrainCache("results/claims/pretrained")       # doctest: +SKIP
        >>> state, info = cache.get(pretraining, seed=0)             # doctest: +SKIP
    """

    def __init__(self, folder: str | None = None) -> None:
        self.folder = folder
        self._memory: dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]] = {}

    def path(self, pre: Pretraining, seed: int) -> str | None:
        if self.folder is None:
            return None
        return os.path.join(self.folder, f"{pre.name}-seed{seed}-{pre.key(seed)[:16]}.pt")

    def get(self, pre: Pretraining, seed: int, tick: Callable[[int], object] | None = None
            ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``(state_dict, info)``; ``info["cached"]`` is ``"memory"``, ``"disk"`` or ``"no"`` (trained now,
        calling ``tick(1)`` after each pretraining step)."""
        key = pre.key(seed)
        if key in self._memory:
            state, info = self._memory[key]
            return state, {**info, "cached": "memory"}
        path = self.path(pre, seed)
        if path is not None and os.path.exists(path):
            stored = torch.load(path, weights_only=True)
            if stored.get("key") == key:  # a file from another spec (a prefix collision, an edit) is retrained
                self._memory[key] = (stored["state"], stored["info"])
                return stored["state"], {**stored["info"], "cached": "disk"}
        state, info = pre.train(seed, tick)
        self._memory[key] = (state, info)
        if path is not None:
            os.makedirs(self.folder, exist_ok=True)
            tmp = path + ".tmp"
            torch.save({"key": key, "state": state, "info": info}, tmp)
            os.replace(tmp, path)  # never leave a half-written file under the final name
        return state, {**info, "cached": "no"}
