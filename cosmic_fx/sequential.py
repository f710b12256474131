"""An ``nn.Sequential`` root keeps its face after the QCIs are registered on it.

``transform`` registers ``cosmic_qci`` (and ``cosmic_csc``) as children of the result; an
``nn.Sequential`` would then count them in ``len``, return them from ``[-1]`` and call them in its
forward. The result's class becomes a subclass of the model's own whose ``__iter__``, ``__len__`` and
``__getitem__`` see only the model's layers (``isinstance`` and the class name still hold).
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

__all__ = ["keep_sequential_face"]

COSMIC_CHILDREN = ("cosmic_qci", "cosmic_csc", "cosmic_state")


class _LayersOnly:
    """Mixin for a ``nn.Sequential`` that holds cosmic children besides its layers."""

    def _layers(self) -> list[tuple[str, nn.Module]]:
        return [(k, m) for k, m in self._modules.items() if k not in COSMIC_CHILDREN and m is not None]

    def __iter__(self):
        return iter(m for _, m in self._layers())

    def __len__(self) -> int:
        return len(self._layers())

    def __getitem__(self, idx):
        layers = self._layers()
        if isinstance(idx, slice):
            return nn.Sequential(OrderedDict(layers[idx]))
        return layers[idx.__index__()][1]


def keep_sequential_face(module: nn.Module) -> None:
    """If ``module`` is an ``nn.Sequential``, make it see only its layers (changes its class in place).

    Example:
        >>> seq = nn.Sequential(nn.Linear(2, 3))
        >>> seq.add_module("cosmic_qci", nn.Module()); keep_sequential_face(seq)
        >>> len(seq), isinstance(seq, nn.Sequential)
        (1, True)
    """
    cls = type(module)
    if not isinstance(module, nn.Sequential) or issubclass(cls, _LayersOnly):
        return
    module.__class__ = type(cls.__name__, (_LayersOnly, cls), {"__module__": cls.__module__,
                                                               "__qualname__": cls.__qualname__})
