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
    "PrefixUnit",
    "cce_multiplier",
    "cdg_seed_skips",
    "choose_frozen_set",
    "drift_change",
    "is_low",
    "mean_efficiency",
    "next_low_count",
    "output_layer",
    "output_site",
    "prefix_cap",
    "prefix_decision",
    "prefix_units",
    "settle_change",
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


def output_site(is_site: Sequence[bool]) -> int | None:
    """Index of the output layer's site among a forward's calls in execution order: the last site
    executed (``None``: no site).

    The one rule for "the output layer": calibrated CDG protects its parameters (:func:`output_layer`)
    and output CSC acts on its output (after its QCI), before the forward computes anything from it
    (the loss of a Hugging Face model), so the loss a forward returns sees the CSC its logits got.

    Example:
        >>> output_site([True, False, True, False]), output_site([False])
        (2, None)
    """
    return max((i for i, s in enumerate(is_site) if s), default=None)


def output_layer(calls: Sequence[Call]) -> list[Hashable]:
    """The output layer: parameters read by the last site executed (:func:`output_site`) and by every
    call after it.

    Calibrated CDG never freezes them (``cdg_protect_output``): the classifier head and anything
    applied after it (a final norm, a bias) decide the output directly. The one rule used by the
    eager runtime (module calls), the backend (nodes of the graph that returns the output),
    :func:`cosmic_fx.transform` (the traced graph) and :func:`cosmic_fx.explain`.

    Example:
        >>> output_layer([Call(True, ("fc1.weight",)), Call(False, ("ln.weight",)),
        ...               Call(True, ("head.weight", "head.bias")), Call(False, ("scale",))])
        ['head.weight', 'head.bias', 'scale']
    """
    last = output_site([c.is_site for c in calls])
    if last is None:
        return []
    return list(dict.fromkeys(p for c in calls[last:] for p in c.params))


# ----------------------------------------------------------------------------- prefix CDG
@dataclasses.dataclass(frozen=True)
class PrefixUnit:
    """One block of prefix CDG: the parameters that freeze together.

    Attributes:
        name: the blocks it is made of, joined by ``+`` (``"tok+pos+blocks.0"``).
        params: their keys, in forward order.
    """

    name: str
    params: tuple[Hashable, ...]


def prefix_units(order: Sequence[K], block_of: Mapping[K, str | None], site_blocks: Iterable[str],
                 protected: Iterable[K]) -> list[PrefixUnit]:
    """The blocks prefix CDG may freeze, from the input side, in forward order.

    Parameters are grouped by block (a key with block ``None``, such as a QCI's parameter, joins the
    block of the parameter used just before it); the blocks are ordered by their first use; a block
    without a site merges into the next block that has one (an embedding freezes with the first
    block: while it trains, autograd runs through every block after it). The list stops before the
    first block that holds an output-layer key: the output layer and everything after it never
    freezes.

    Args:
        order: parameter keys in order of first use in the forward pass.
        block_of: the block of each key (``None``: the block of the key before it).
        site_blocks: the blocks that hold a site.
        protected: the output layer's keys.

    Example:
        >>> order = ["tok", "pos", "b0.w", "qci0", "b1.w", "head.w"]
        >>> blocks = {"tok": "tok", "pos": "pos", "b0.w": "b0", "qci0": None, "b1.w": "b1", "head.w": "head"}
        >>> [(u.name, u.params) for u in prefix_units(order, blocks, {"b0", "b1", "head"}, {"head.w"})]
        [('tok+pos+b0', ('tok', 'pos', 'b0.w', 'qci0')), ('b1', ('b1.w',))]
    """
    blocks: dict[str, list[K]] = {}
    previous: str | None = None
    for key in dict.fromkeys(order):
        block = block_of.get(key)
        if block is None:
            block = previous
        if block is None:
            continue
        blocks.setdefault(block, []).append(key)
        previous = block
    with_site, guarded = set(site_blocks), set(protected)
    units: list[PrefixUnit] = []
    names: list[str] = []
    keys: list[K] = []
    for block, members in blocks.items():
        if any(k in guarded for k in members):
            break
        names.append(block)
        keys.extend(members)
        if block in with_site:
            units.append(PrefixUnit("+".join(names), tuple(keys)))
            names, keys = [], []
    return units


def settle_change(readings: Sequence[float], window: int) -> float | None:
    """How much a block's signal still moves: ``|mean(last window) - mean(window before)| / |mean(window before)|``.

    ``None`` (undecided) before ``2 * window`` readings, when a reading in them is not finite, or
    when the earlier mean is 0.

    Example:
        >>> settle_change([4.0, 4.0, 3.0, 3.0], 2), settle_change([4.0, 3.0, 3.0], 2)
        (0.25, None)
    """
    if window < 1 or len(readings) < 2 * window:
        return None
    recent = readings[len(readings) - 2 * window:]
    if not all(_finite(v) for v in recent):
        return None
    before = sum(recent[:window]) / window
    now = sum(recent[window:]) / window
    if before == 0.0:
        return None
    return abs(now - before) / abs(before)


def prefix_cap(n_units: int, config: CosmicConfig) -> int:
    """How many of ``n_units`` freezable blocks prefix CDG may freeze: ``floor(cdg_prefix_max * n_units)``.

    Example:
        >>> prefix_cap(6, CosmicConfig(cdg_prefix_max=0.34))
        2
    """
    return min(n_units, math.floor(config.cdg_prefix_max * n_units))


def drift_change(readings: Sequence[float], need: int = 2) -> float | None:
    """How much a block's weights still move, from its drift readings (``cdg_prefix_signal="drift"``,
    each ``||w_t - w_{t-W}|| / ||w_t||`` over one window): the largest of the last ``need`` readings, so
    that the block freezes only once it moved little in each of them.

    ``None`` (undecided) before ``need`` readings or when one of them is not finite.

    Example:
        >>> drift_change([0.3, 0.004, 0.006]), drift_change([0.004])
        (0.006, None)
    """
    if need < 1 or len(readings) < need:
        return None
    recent = readings[len(readings) - need:]
    if not all(_finite(v) for v in recent):
        return None
    return max(recent)


def prefix_decision(n_frozen: int, changes: Sequence[float | None], n_units: int, events: int,
                    since_event: int | None, config: CosmicConfig) -> tuple[int, str]:
    """Prefix CDG's decision: the new length of the frozen prefix (never shorter) and why.

    The next blocks freeze, in order, while each one's change (:func:`settle_change` of its
    gradient-norm or efficiency readings, or :func:`drift_change` of its weight-drift readings) is
    below ``cdg_prefix_threshold``; at most ``floor(cdg_prefix_max * n_units)`` blocks in all, at most
    ``cdg_max_sets`` freeze events (each one recompiles under ``torch.compile``), and at most one
    event per ``cdg_prefix_window`` steps.

    Args:
        n_frozen: blocks frozen now.
        changes: the settle change of each block from ``n_frozen`` on, in order (``None``: undecided).
        n_units: the freezable blocks (:func:`prefix_units`).
        events: freeze events so far.
        since_event: steps since the last event (``None`` before the first).
        config: the run's config.

    Example:
        >>> cfg = CosmicConfig(cdg="prefix", cdg_prefix_threshold=0.05, cdg_prefix_max=0.75)
        >>> prefix_decision(0, [0.01, 0.02, 0.2], 4, 0, None, cfg)
        (2, 'blocks 0-1 settled (change 0.01, 0.02 < 0.05); block 2 has not (change 0.2)')
        >>> prefix_decision(2, [0.01], 4, 1, 300, cfg)[0]
        3
    """
    cap = prefix_cap(n_units, config)
    tau = config.cdg_prefix_threshold
    if n_units == 0:
        return n_frozen, "no freezable block (every block holds or follows the output layer)"
    if cap == 0:
        return n_frozen, (f"the cap allows no block: floor(cdg_prefix_max={config.cdg_prefix_max} x {n_units} "
                          "freezable blocks) = 0; raise cdg_prefix_max to freeze any")
    if n_frozen >= cap:
        return n_frozen, (f"the cap is reached: {n_frozen} of {n_units} blocks frozen "
                          f"(cdg_prefix_max={config.cdg_prefix_max})")
    if events >= config.cdg_max_sets:
        return n_frozen, f"the {events} freeze events cdg_max_sets allows have happened"
    if since_event is not None and since_event < config.cdg_prefix_window:
        return n_frozen, (f"{since_event} steps since the last freeze event; the next may come after "
                          f"cdg_prefix_window={config.cdg_prefix_window}")
    k = n_frozen
    settled: list[float] = []
    for change in changes:
        if k >= cap or change is None or not change < tau:
            break
        settled.append(change)
        k += 1
    nxt = changes[len(settled)] if len(settled) < len(changes) else None
    if k >= cap:
        tail = f"; the cap of {cap} blocks is reached"
    elif nxt is None:
        tail = (f"; block {k} is undecided (not read over 2 x cdg_prefix_window={config.cdg_prefix_window} "
                "steps since the start or the last event yet)")
    else:
        tail = f"; block {k} has not (change {nxt:.3g})"
    if not settled:
        return n_frozen, f"no block settled (change < {tau:g})" + tail.replace("; block", ": block", 1)
    which = f"block {n_frozen}" if k == n_frozen + 1 else f"blocks {n_frozen}-{k - 1}"
    return k, f"{which} settled (change {', '.join(f'{c:.3g}' for c in settled)} < {tau:g}){tail}"
