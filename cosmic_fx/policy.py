"""CDG and CCE decisions as pure functions of readings and state.

One definition, three users: the per-model runtime (:mod:`cosmic_fx.runtime`) calls them on every
step, :func:`cosmic_fx.explain` calls them to say what would happen now, and the benchmarks call them
to label what happened. Nothing here touches a tensor or a model: the inputs are Python numbers,
sets of keys (parameter indices or names) and the :class:`~cosmic_fx.config.CosmicConfig`.

Non-finite readings never decide anything: a NaN/Inf ``E(p)`` or ``E_out`` (a NaN loss makes every
reading NaN) is *undecided* — no skip, no change of a low-reading counter, no freezing, and a CCE
multiplier of 1.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import TypeVar

from .config import CCEMode, CosmicConfig

__all__ = [
    "Call",
    "cce_multiplier",
    "cdg_seed_skips",
    "choose_frozen_set",
    "is_low",
    "mean_efficiency",
    "next_low_count",
    "output_layer",
]

K = TypeVar("K", bound=Hashable)


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def is_low(e_p: float, e_out: float | None) -> bool | None:
    """Whether a reading is *low* (``E(p) < E_out``); ``None`` when it cannot be decided.

    Example:
        >>> is_low(-0.5, -0.2), is_low(0.1, -0.2), is_low(float("nan"), -0.2), is_low(0.1, None)
        (True, False, None, None)
    """
    if not (_finite(e_p) and _finite(e_out)):
        return None
    return e_p < e_out


def cdg_seed_skips(e_p: float, e_out: float | None) -> bool:
    """The source text's CDG: drop this step's update of ``p`` when ``E(p) < E_out``.

    Example:
        >>> cdg_seed_skips(-0.5, -0.2), cdg_seed_skips(float("nan"), -0.2)
        (True, False)
    """
    return is_low(e_p, e_out) is True


def next_low_count(count: int, low: bool | None) -> int:
    """Calibrated CDG's counter of consecutive low readings after one more reading.

    A low reading adds one, a high one resets to 0, an undecided (non-finite) one leaves it as it is.

    Example:
        >>> next_low_count(2, True), next_low_count(2, False), next_low_count(2, None)
        (3, 0, 2)
    """
    if low is None:
        return count
    return count + 1 if low else 0


def freeze_cap(config: CosmicConfig, n_params: int) -> int:
    """How many parameter tensors calibrated CDG may hold frozen at once.

    Rounded up: on a small model a cap below one tensor would silently switch CDG off.
    """
    return math.ceil(config.cdg_max_frozen * n_params)


def _jaccard(a: frozenset, b: frozenset) -> float:
    union = len(a | b)
    return 1.0 if union == 0 else len(a & b) / union


def choose_frozen_set(
    low_counts: Mapping[K, int],
    last_e: Mapping[K, float],
    frozen: frozenset[K],
    protected: Iterable[K],
    n_params: int,
    sets_used: Sequence[frozenset[K]],
    config: CosmicConfig,
) -> tuple[frozenset[K], bool]:
    """Calibrated CDG's decision: the set of parameters to hold frozen from now on.

    Candidates are the parameters with at least ``cdg_patience`` consecutive low readings whose last
    reading is finite, not frozen now (a frozen parameter produces no reading, so it is thawed at
    the next decision) and not in the output layer when ``cdg_protect_output``; the lowest
    efficiency first, at most :func:`freeze_cap` of them. The run may use at most ``cdg_max_sets``
    distinct non-empty sets (each is one recompilation under ``torch.compile``); after that the set
    already used that is closest (Jaccard) to the wanted one is chosen again.

    Args:
        low_counts: consecutive low readings per key.
        last_e: the latest finite-or-not ``E(p)`` per key.
        frozen: the set frozen now.
        protected: the output layer's keys.
        n_params: the number of hooked parameter tensors (for the cap).
        sets_used: the distinct sets used so far, the empty set first.
        config: the run's config.

    Returns:
        ``(wanted, is_new)``: the set to hold frozen and whether it is a set not used before (the
        caller appends it to ``sets_used``).

    Example:
        >>> cfg = CosmicConfig(cdg_patience=2, cdg_max_frozen=0.5)
        >>> choose_frozen_set({"a": 3, "b": 2, "c": 0}, {"a": -0.9, "b": -0.5, "c": 0.1}, frozenset(),
        ...                   protected={"b"}, n_params=3, sets_used=[frozenset()], config=cfg)
        (frozenset({'a'}), True)
    """
    guarded = set(protected) if config.cdg_protect_output else set()
    candidates = [
        k for k, n in low_counts.items()
        if n >= config.cdg_patience and k not in frozen and k not in guarded and _finite(last_e.get(k))
    ]
    candidates.sort(key=lambda k: last_e[k])
    wanted = frozenset(candidates[: freeze_cap(config, n_params)])
    if wanted in sets_used:
        return wanted, False
    if len(sets_used) > config.cdg_max_sets:  # the empty set does not count
        return max(sets_used, key=lambda s: _jaccard(s, wanted)), False
    return wanted, True


def mean_efficiency(values: Iterable[float]) -> float | None:
    """The mean of the finite readings (relative CCE's reference point); ``None`` if there is none."""
    finite = [v for v in values if _finite(v)]
    return sum(finite) / len(finite) if finite else None


def cce_multiplier(e_p: float, mean_e: float | None, config: CosmicConfig) -> float:
    """The factor CCE applies to ``p.grad``.

    * ``cce="seed"`` (the text's code): ``E(p)`` itself.
    * ``cce="relative"``: ``clamp(1 + cce_gamma * (E(p) - mean E), cce_min, cce_max)``.
    * ``cce="off"``, or an undecided reading: 1.

    Example:
        >>> cfg = CosmicConfig(cce="relative", cce_gamma=1.0, cce_min=0.5, cce_max=2.0)
        >>> cce_multiplier(-0.2, -0.5, cfg), cce_multiplier(-3.0, 0.0, cfg)
        (1.3, 0.5)
    """
    if config.cce is CCEMode.OFF or not _finite(e_p):
        return 1.0
    if config.cce is CCEMode.SEED:
        return e_p
    if not _finite(mean_e):
        return 1.0
    return min(max(1.0 + config.cce_gamma * (e_p - mean_e), config.cce_min), config.cce_max)


@dataclasses.dataclass(frozen=True)
class Call:
    """One step of a forward pass in execution order, for :func:`output_layer`.

    Attributes:
        is_site: whether it is a linear-like site (a Linear/Conv2d layer or its functional call).
        params: the parameter keys (names) it reads directly.
    """

    is_site: bool
    params: tuple[Hashable, ...] = ()


def output_layer(calls: Sequence[Call]) -> list[Hashable]:
    """The output layer: parameters read by the last site executed and by every call after it.

    Calibrated CDG never freezes them (``cdg_protect_output``): the classifier head and anything
    applied after it (a final norm, a bias) decide the output directly. The one rule used by the
    eager runtime (module calls), the backend (nodes of the graph that returns the output),
    :func:`cosmic_fx.transform` (the traced graph) and :func:`cosmic_fx.explain`.

    Example:
        >>> output_layer([Call(True, ("fc1.weight",)), Call(False, ("ln.weight",)),
        ...               Call(True, ("head.weight", "head.bias")), Call(False, ("scale",))])
        ['head.weight', 'head.bias', 'scale']
    """
    last = max((i for i, c in enumerate(calls) if c.is_site), default=None)
    if last is None:
        return []
    return list(dict.fromkeys(p for c in calls[last:] for p in c.params))
