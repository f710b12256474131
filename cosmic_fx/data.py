"""Real data that ships inside installed packages (no download at run time).

* :func:`load_digits` — scikit-learn's bundled 8x8 handwritten digits (1,797 images).
* :func:`load_stdlib_text` — the running interpreter's own standard library source (``Lib/``,
  tests excluded), as a character corpus.
"""

from __future__ import annotations

import dataclasses
import os
import sysconfig

import torch

__all__ = ["ClassificationData", "load_digits", "load_stdlib_text"]


@dataclasses.dataclass
class ClassificationData:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    name: str


def load_digits(image: bool = False, test_fraction: float = 0.2, seed: int = 0) -> ClassificationData:
    """scikit-learn's digits, scaled to [0, 1], split stratified into train/test (fixed by ``seed``).

    Args:
        image: ``(N, 1, 8, 8)`` tensors for CNNs instead of ``(N, 64)``.
        test_fraction: held-out share.
        seed: the split's seed (the same split for every arm of a benchmark).
    """
    try:
        from sklearn.datasets import load_digits as _load
        from sklearn.model_selection import train_test_split
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError("the digits data needs scikit-learn: pip install 'cosmic-fx[data]'") from err
    bunch = _load()
    x = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    idx = torch.arange(len(y)).numpy()
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=y.numpy())
    tr, te = torch.as_tensor(tr), torch.as_tensor(te)
    if image:
        x = x.reshape(-1, 1, 8, 8)
    return ClassificationData(x[tr], y[tr], x[te], y[te], 10, "digits")


def load_stdlib_text(max_chars: int | None = 2_000_000) -> str:
    """The interpreter's own standard-library ``.py`` sources (tests, idlelib, site-packages excluded).

    Files are read in sorted order so the corpus is the same on every run of one Python build.
    """
    root = sysconfig.get_paths()["stdlib"]
    skip = {"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__", "turtledemo"}
    parts, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("test"))
        for name in sorted(filenames):
            if not name.endswith(".py") or name.startswith("test_"):
                continue
            try:
                with open(os.path.join(dirpath, name), encoding="utf-8") as fh:
                    text = fh.read()
            except (UnicodeDecodeError, OSError):
                continue
            parts.append(text)
            total += len(text)
            if max_chars is not None and total >= max_chars:
                return "".join(parts)[:max_chars]
    if not parts:
        raise FileNotFoundError(f"no standard-library sources found under {root}")
    return "".join(parts)
