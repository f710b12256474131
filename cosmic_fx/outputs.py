"""The primary tensor of a model's output, and replacing it while keeping the output's type.

The primary tensor is the model's prediction. Output CSC acts on the output layer's output (the
prediction of a model that returns its head's output, as Hugging Face models do); it acts on the
primary tensor itself only in a dynamo graph without a site, and :func:`cosmic_fx.explain` compares
the two. For a tensor output that is the output;
in a ``ModelOutput`` (Hugging Face), ``dict``, tuple or list it is the ``"logits"`` entry if there is
one, else the first floating-point tensor with at least one dimension that is not the ``"loss"`` (a
0-d loss first in a tuple is skipped). The container comes back as the same type, so ``out.loss``
and ``out.logits`` keep working. The same rule picks the value in a graph's output node
(:func:`primary_path` takes a predicate for that).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.fx.immutable_collections import immutable_dict

__all__ = ["map_primary", "primary_path", "replace_at_path"]

_SKIP_KEYS = ("loss",)
_PREFERRED_KEYS = ("logits",)


def _is_prediction(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() >= 1


def primary_path(out: Any, is_candidate: Callable[[Any], bool] = _is_prediction) -> tuple | None:
    """The keys/indices that lead to ``out``'s primary tensor, ``()`` for a bare value, ``None`` if none.

    Args:
        out: a tensor, or a (nested) mapping / tuple / list of values.
        is_candidate: whether a leaf can be the primary value (default: a floating-point tensor
            with at least one dimension).

    Example:
        >>> primary_path({"loss": torch.tensor(1.0), "logits": torch.zeros(2, 3)})
        ('logits',)
        >>> primary_path((torch.tensor(1.0), torch.zeros(2, 3)))
        (1,)
    """
    if not isinstance(out, (Mapping, tuple, list)):
        return ()
    return _search(out, is_candidate)


def _search(out: Any, is_candidate: Callable[[Any], bool]) -> tuple | None:
    if isinstance(out, Mapping):
        keys = [k for k in _PREFERRED_KEYS if k in out] + [k for k in out if k not in _PREFERRED_KEYS]
        items = [(k, out[k]) for k in keys if k not in _SKIP_KEYS]
    elif isinstance(out, (tuple, list)):
        items = list(enumerate(out))
    else:
        return () if is_candidate(out) else None
    for key, value in items:
        found = _search(value, is_candidate)
        if found is not None:
            return (key, *found)
    return None


def replace_at_path(out: Any, path: tuple, value: Any) -> Any:
    """``out`` with the leaf at ``path`` replaced by ``value``, containers of the same types.

    Tuples, lists and plain dicts are rebuilt; other mappings (``ModelOutput``, ``OrderedDict``
    subclasses) are updated in place, which keeps their class and attribute access.
    """
    if not path:
        return value
    key, rest = path[0], path[1:]
    new = replace_at_path(out[key], rest, value)
    if isinstance(out, Mapping):
        if type(out) is dict or isinstance(out, immutable_dict) or not hasattr(out, "__setitem__"):
            return type(out)({**out, key: new})
        out[key] = new
        return out
    items = list(out)
    items[key] = new
    if type(out) in (tuple, list) or not isinstance(out, tuple):
        return type(out)(items)
    return type(out)(*items)  # a namedtuple


def map_primary(out: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to ``out``'s primary tensor and return ``out`` with it replaced (same type).

    Example:
        >>> out = map_primary((torch.tensor(2.0), torch.ones(2)), lambda t: t * 3)
        >>> out[0].item(), out[1].tolist()
        (2.0, [3.0, 3.0])
    """
    path = primary_path(out)
    if path is None:
        return out
    leaf = out
    for key in path:
        leaf = leaf[key]
    if not isinstance(leaf, torch.Tensor):
        return out
    return replace_at_path(out, path, fn(leaf))
