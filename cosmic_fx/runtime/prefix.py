"""Prefix CDG (``cdg="prefix"``): freeze a growing prefix of blocks, from the input side, for good.

The model's trainable parameters are grouped into blocks in forward order
(:func:`cosmic_fx.policy.prefix_units`, from :func:`param_blocks` and the order of first use that the
traced graph, the compiled graph or the first eager forward gives). Each step the runtime reads a
settle signal for every block that still trains — its gradient norm (``cdg_prefix_signal="grad"``,
read in the gradient hooks) or its numel-weighted ``E(p)`` (``"efficiency"``, from the readings every
``efficiency_every`` steps) — or, with ``"drift"``, reads the weight drift of the next block to freeze
every ``cdg_prefix_window`` steps, and :func:`cosmic_fx.policy.prefix_decision` says whether the next
blocks have settled.

**Drift** (``"drift"``): at the end of a step (before the optimizer updates) the state keeps a copy
of the next candidate block's weights; ``W = cdg_prefix_window`` steps later it reads
``||w_t - w_{t-W}|| / ||w_t||`` over that block (one ``torch._foreach_sub`` and one
``torch._foreach_norm``, one host sync per window) and takes a new copy. Memory: one copy of one
block (plus a same-sized temporary during the reading); nothing is read on the other steps, and no
gradient is touched. A QCI's (or CSC's) parameters in the block are left out of its drift: they start
at the identity and move by design, so they neither keep a block from freezing nor count as the
block learning; they freeze with it. A checkpoint keeps the drift readings; the copy is taken again
after a resume (one window later the readings go on).

A frozen block gets ``requires_grad_(False)`` on every parameter and its gradient
dropped; since the prefix starts at the input (embeddings, stem), nothing before the first trainable
block requires grad, so autograd records nothing for the prefix: no weight gradients, no input
gradients, no saved activations, in eager mode and in the graphs AOTAutograd compiles (one recompile
per freeze event). A frozen block never thaws, and the output layer never freezes.

This class keeps the blocks, the signal history and the frozen length between steps (and in
checkpoints); the decisions are :mod:`cosmic_fx.policy`'s.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import torch
from torch import nn

from .. import policy
from ..config import CosmicConfig, PrefixSignal

__all__ = ["PREFIX_STATE_KEYS", "PrefixState", "check_has_sites", "param_blocks"]

PREFIX_STATE_KEYS = ("prefix.units", "prefix.length", "prefix.history", "prefix.history_len", "prefix.last_event")

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def param_blocks(model: nn.Module) -> tuple[dict[str, str | None], set[str]]:
    """The block of every parameter name of ``model`` (aliases too), and the blocks that hold a site.

    A block is a child module at the level where the model's sites spread out: containers
    (``Sequential``, ``ModuleList``, ``ModuleDict``) and a child that holds more than half of the
    model's sites (a trunk such as Hugging Face's ``transformer``) are opened; any other child is one
    block; a parameter held directly by an opened module is a block of its own (a positional
    embedding). Parameters of cosmic's own modules (``cosmic_qci``, ``cosmic_csc``) get ``None``: they
    join the block of the site they follow.

    Example:
        >>> model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> blocks, with_site = param_blocks(model)
        >>> blocks["0.weight"], blocks["3.bias"], sorted(with_site)
        ('0', '3', ['1', '3'])
    """
    from ..site_hooks import CSC_ROOT, QCI_ROOT
    from ..sites import site_module_kinds
    from . import STATE_NAME

    site_ids = set(site_module_kinds(model))
    total = sum(1 for m in model.modules() if id(m) in site_ids)
    blocks: dict[str, str | None] = {}
    with_site: set[str] = set()

    def n_sites(m: nn.Module) -> int:
        return sum(1 for x in m.modules() if id(x) in site_ids)

    def visit(module: nn.Module, prefix: str) -> None:
        for name, p in module._parameters.items():
            if p is not None:
                blocks[prefix + name] = prefix + name
        for name, child in module._modules.items():
            if child is None:
                continue
            full = prefix + name
            if not prefix and name in (QCI_ROOT, CSC_ROOT, STATE_NAME):
                for pname, _ in child.named_parameters(remove_duplicate=False):
                    blocks[f"{full}.{pname}"] = None
                continue
            opens = id(child) not in site_ids and any(True for _ in child.children()) and (
                isinstance(child, _CONTAINERS) or 2 * n_sites(child) > total)
            if opens:
                visit(child, full + ".")
                continue
            for pname, _ in child.named_parameters(remove_duplicate=False):
                blocks.setdefault(f"{full}.{pname}", full)
            if n_sites(child):
                with_site.add(full)

    visit(model, "")
    return blocks, with_site


def check_has_sites(model: nn.Module) -> None:
    """Prefix CDG orders blocks by the sites they hold: a model without any cannot be split."""
    from ..sites import describe_kinds, site_module_kinds

    if not site_module_kinds(model):
        raise ValueError(
            f"cdg='prefix' freezes {type(model).__name__} block by block from the input side, and finds the "
            f"blocks by the sites they hold; it has no site (site kinds: {describe_kinds()}). Use cdg='off' or "
            "cdg='calibrated' for this model."
        )


class PrefixState:
    """Prefix CDG's blocks, signal history and frozen length, indexed by the runtime's parameter index.

    Args:
        n: the number of parameters the runtime covers.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.units: list[policy.PrefixUnit] = []
        self.known = False  # whether the blocks are known (the forward order was seen)
        self.length = 0  # blocks frozen
        self.history: list[list[float]] = []  # per block: the signal readings since the last event
        self.last_event: int | None = None  # the step of the last freeze event
        self.events = 0  # freeze events so far
        self.reason = "the forward order is not known yet (no traced graph, compiled graph or eager forward seen)"
        self._unit_of: dict[int, int] = {}
        self._numel: list[int] = []
        self._acc: dict[int, torch.Tensor] = {}
        self._vec: torch.Tensor | None = None  # note_grads' per-block sums when it was the step's only reading
        self._vec_units: list[int] = []  # the blocks that have a sum in _vec
        self._acc_traced: dict[int, torch.Tensor] = {}  # per block, summed inside a traced backward
        self._traced_units: list[int] = []
        self._batch_units: tuple[int, ...] = ()  # note_grads' last block-per-gradient list, and its tensor
        self._batch_index: torch.Tensor | None = None
        self._cosmic: frozenset[int] = frozenset()  # cosmic's own parameters (QCI, CSC): not in the drift
        self._snap: list[torch.Tensor] | None = None  # drift: the candidate block's weights W steps ago
        self._snap_unit: int | None = None
        self._snap_step = 0
        self._appended = 0  # readings appended so far: the decision below changes only with them
        self._memo: tuple | None = None  # (key, wanted, reason) of the last decision outside a cool-down
        self._quiet_until: tuple | None = None  # quiet_end's last True: (memo, config, last step, snapshot, its step)

    # ------------------------------------------------------------------ blocks
    def build(self, model: nn.Module, order: Sequence[int], index: dict[str, int], protected: set[int],
              params: Sequence[torch.Tensor | None]) -> None:
        """Find the blocks (:func:`param_blocks`, :func:`cosmic_fx.policy.prefix_units`).

        Args:
            model: the model.
            order: parameter indices in order of first use in the forward pass.
            index: every parameter name (aliases too) -> index.
            protected: the output layer's indices.
            params: the parameters by index (for their sizes).
        """
        blocks, with_site = param_blocks(model)
        block_of: dict[int, str | None] = {}
        for name, i in index.items():  # the block of a parameter's first name that has one
            if block_of.get(i) is None:
                block_of[i] = blocks.get(name)
        units = policy.prefix_units(order, block_of, with_site, protected)
        own = {i for name, i in index.items() if name in blocks and blocks[name] is None}
        self.set_units(units, [p.numel() if p is not None else 0 for p in params], own)

    def set_units(self, units: list[policy.PrefixUnit], numel: Sequence[int], cosmic: Sequence[int] = ()) -> None:
        """Set the blocks (``cosmic``: the indices of cosmic's own parameters, left out of the drift)."""
        self.units = list(units)
        self.known = True
        self.history = [[] for _ in self.units]
        self._memo = None
        self._numel = list(numel)
        self._cosmic = frozenset(int(i) for i in cosmic)
        self._snap = None
        self._index()
        if not self.units:
            self.reason = "no freezable block: the first block that has a site holds the output layer (or tied weights)"

    def _index(self) -> None:
        self._unit_of = {int(i): u for u, unit in enumerate(self.units) for i in unit.params}

    @property
    def frozen_params(self) -> frozenset[int]:
        return frozenset(int(i) for unit in self.units[: self.length] for i in unit.params)

    def length_of(self, frozen: frozenset[int]) -> int:
        """How many blocks, from the first, are wholly in ``frozen``."""
        k = 0
        while k < len(self.units) and all(int(i) in frozen for i in self.units[k].params):
            k += 1
        return k

    # ------------------------------------------------------------------ readings
    def note_grad(self, i: int, grad: torch.Tensor) -> None:
        """Add ``|grad|^2`` of parameter ``i`` to its block's reading of this step (a block that trains)."""
        u = self._unit_of.get(i)
        if u is None or u < self.length or grad is None:
            return  # no gradient yet: before a traced backward, which reads it itself (note_traced_grad)
        self._flush_vec()
        sq = torch.linalg.vector_norm(grad.detach(), dtype=torch.float32).square()  # no gradient-sized temporary
        self._acc[u] = self._acc[u] + sq if u in self._acc else sq

    def note_grads(self, indices: Sequence[int], grads: Sequence[torch.Tensor | None]) -> None:
        """:meth:`note_grad` for many parameters at once (in index order, as the per-parameter calls
        would add them): one ``torch._foreach_norm`` and one ``index_add_`` instead of a Python call and
        two tensor ops per parameter. The sums equal :meth:`note_grad`'s bit for bit on one device."""
        unit_of, length = self._unit_of, self.length
        picked = [(u, g) for i, g in zip(indices, grads, strict=True)
                  if g is not None and (u := unit_of.get(i)) is not None and u >= length]
        if not picked:
            return
        units, gs = zip(*picked, strict=True)
        device = gs[0].device
        self._flush_vec()
        if any(g.device != device for g in gs):  # a model spread over devices: per parameter
            for u, g in picked:
                sq = torch.linalg.vector_norm(g.detach(), dtype=torch.float32).square()
                self._acc[u] = self._acc[u] + sq if u in self._acc else sq
            return
        sq = torch.stack(torch._foreach_norm([g.detach() for g in gs], 2, dtype=torch.float32)).square()
        if self._batch_units != units or self._batch_index is None or self._batch_index.device != device:
            self._batch_units = units
            self._batch_index = torch.tensor(units, dtype=torch.long, device=device)
        sums = torch.zeros(len(self.units), dtype=torch.float32, device=device).index_add_(0, self._batch_index, sq)
        if not self._acc:  # the step's first reading (the usual case): kept as one tensor, read at its end
            self._vec, self._vec_units = sums, sorted(set(units))
            return
        for u in sorted(set(units)):
            self._acc[u] = self._acc[u] + sums[u] if u in self._acc else sums[u]

    def _flush_vec(self) -> None:
        """Move :meth:`note_grads`' pending per-block sums into the per-block dict (before another
        reading adds to them, in the order the readings came)."""
        if self._vec is not None:
            vec, self._vec = self._vec, None
            for u in self._vec_units:
                self._acc[u] = self._acc[u] + vec[u] if u in self._acc else vec[u]

    # a backward traced by compiled autograd frees each gradient inside it, so the block readings are
    # taken there, into 0-d tensors that persist between steps (one compiled graph serves every step)
    def begin_traced(self, reached: set[int], device: torch.device) -> None:
        """Before a traced backward that reaches the parameters ``reached``: zero the blocks' sums."""
        units = (self._unit_of.get(i) for i in reached)
        self._traced_units = sorted({u for u in units if u is not None and u >= self.length})
        for u in self._traced_units:
            t = self._acc_traced.get(u)
            if t is None or t.device != device:
                self._acc_traced[u] = torch.zeros((), dtype=torch.float32, device=device)
            else:
                t.zero_()

    def note_traced_grad(self, i: int, grad: torch.Tensor) -> None:
        """Inside a traced backward: add ``|grad|^2`` of parameter ``i`` to its block's sum."""
        u = self._unit_of.get(i)
        if u is not None and u >= self.length and u in self._acc_traced:
            self._acc_traced[u].add_(torch.linalg.vector_norm(grad.detach(), dtype=torch.float32).square())

    def end_traced(self) -> None:
        """After a traced backward: its sums become this step's readings, as :meth:`note_grad`'s."""
        self._flush_vec()
        for u in self._traced_units:
            self._acc[u] = self._acc_traced[u].clone()
        self._traced_units = []

    @staticmethod
    def reads_grads_at(step: int, config: CosmicConfig) -> bool:
        """Whether step ``step`` (0-based) reads the blocks' gradient norms (``"grad"`` signal, every
        ``cdg_prefix_every``-th step)."""
        return config.cdg_prefix_signal is PrefixSignal.GRAD and step % config.cdg_prefix_every == 0

    def end_of_step(self, step: int, efficiencies: Sequence[float], config: CosmicConfig,
                    params: Sequence[torch.Tensor | None] = ()) -> int:
        """Record this step's readings and decide; returns the wanted prefix length.

        Args:
            step: the 0-based index of the step that just ended.
            efficiencies: the latest ``E(p)`` per parameter (the runtime's readings).
            config: the run's config.
            params: the parameters by index (the drift signal reads them).
        """
        vec, units = self._vec, self._vec_units
        if vec is not None and self._acc:
            self._flush_vec()
            vec = None
        acc, self._acc, self._vec = self._acc, {}, None
        if not self.known:
            return self.length
        window = config.cdg_prefix_window
        if config.cdg_prefix_signal is PrefixSignal.GRAD:
            if step % config.cdg_prefix_every:
                return self.length  # not a reading step: nothing read, nothing decided
            window = max(1, window // config.cdg_prefix_every)
            if vec is not None:
                values = vec.sqrt().tolist()  # one sync per step
                for u in units:
                    self._append(u, values[u], 2 * window)
            elif acc:
                values = torch.stack([acc[u] for u in sorted(acc)]).sqrt().tolist()  # one sync per step
                for u, v in zip(sorted(acc), values):
                    self._append(u, v, 2 * window)
        elif config.cdg_prefix_signal is PrefixSignal.DRIFT:
            self._read_drift(step, params, config)
        elif step % config.efficiency_every == 0:
            window = max(1, window // config.efficiency_every)
            for u in range(self.length, len(self.units)):
                self._append(u, self._unit_efficiency(u, efficiencies), 2 * window)
        since = None if self.last_event is None else step - self.last_event
        # outside a cool-down the step count plays no part in the decision: on a step that read nothing
        # new it is the last one (the drift signal reads once per window, "grad" every k-th step)
        key = None
        if since is None or since >= config.cdg_prefix_window:
            key = self._memo_key(window, config)
            if self._memo is not None and self._memo[0] == key:
                self.reason = self._memo[2]
                return self._memo[1]
        changes = self._changes(config, window)
        wanted, self.reason = policy.prefix_decision(self.length, changes, len(self.units), self.events, since, config)
        self._memo = None if key is None else (key, wanted, self.reason)
        return wanted

    def _memo_key(self, window: int, config: CosmicConfig) -> tuple:
        """What a decision outside a cool-down depends on (the step count does not enter it)."""
        return (self._appended, self.length, self.events, len(self.units), window, id(config))

    def quiet_end(self, step: int, config: CosmicConfig) -> bool:
        """For the drift signal: whether :meth:`end_of_step` at the end of step ``step`` would read
        nothing and return its last decision unchanged (inside the candidate's window, or nothing more
        may freeze; outside a cool-down; no gradient sums pending). Then it does what that call would
        (the reason of the last decision) and returns ``True``; otherwise ``False``, doing nothing,
        and the caller calls :meth:`end_of_step`. ``tests/test_prefix_signal.py`` checks that runs
        taking this path equal runs that never do, step by step."""
        memo = self._memo
        until = self._quiet_until  # the answer stays True, without the checks below, until one of these moves
        if (until is not None and until[0] is memo and until[1] is config and step <= until[2]
                and until[3] is self._snap and until[4] == self._snap_step and not self._acc and self._vec is None):
            self.reason = memo[2]
            return True
        if (memo is None or not self.known or self._acc or self._vec is not None
                or config.cdg_prefix_signal is not PrefixSignal.DRIFT or memo[1] != self.length):
            return False
        window = config.cdg_prefix_window  # (no cool-down: a freeze event drops the memo, and a
        u = self.length                     # decision inside one is not memoised)
        if u >= policy.prefix_cap(len(self.units), config) or self.events >= config.cdg_max_sets:
            if self._snap is not None:
                return False  # (end_of_step drops the snapshot)
            last = math.inf
        elif self._snap is None or self._snap_unit != u or step - self._snap_step >= window:
            return False  # a reading (or a first snapshot) is due
        else:
            last = self._snap_step + window - 1
        if memo[0] != self._memo_key(window, config):
            return False
        self._quiet_until = (memo, config, last, self._snap, self._snap_step)
        self.reason = memo[2]
        return True

    def preview(self, config: CosmicConfig, step: int) -> tuple[int, str]:
        """What the decision at the end of step ``step`` would say on the readings so far (for
        :func:`cosmic_fx.explain`)."""
        if not self.known:
            return self.length, self.reason
        window = config.cdg_prefix_window
        if config.cdg_prefix_signal is PrefixSignal.EFFICIENCY:
            window = max(1, window // config.efficiency_every)
        elif config.cdg_prefix_signal is PrefixSignal.GRAD:
            window = max(1, window // config.cdg_prefix_every)
        changes = self._changes(config, window)
        since = None if self.last_event is None else step - self.last_event
        return policy.prefix_decision(self.length, changes, len(self.units), self.events, since, config)

    def _changes(self, config: CosmicConfig, window: int) -> list[float | None]:
        todo = range(self.length, len(self.units))
        if config.cdg_prefix_signal is PrefixSignal.DRIFT:
            return [policy.drift_change(self.history[u]) for u in todo]
        return [policy.settle_change(self.history[u], window) for u in todo]

    def drift_params(self, u: int) -> list[int]:
        """The parameters whose drift is block ``u``'s: its own, without cosmic's (QCI, CSC); all of
        them for a block that holds only cosmic's."""
        params = [int(i) for i in self.units[u].params]
        return [i for i in params if i not in self._cosmic] or params

    def _read_drift(self, step: int, params: Sequence[torch.Tensor | None], config: CosmicConfig) -> None:
        """Every window: the next block's ``||w - w_snapshot|| / ||w||``, then a new snapshot (only
        while a block may still freeze)."""
        window = config.cdg_prefix_window
        u = self.length
        if (u >= policy.prefix_cap(len(self.units), config) or self.events >= config.cdg_max_sets
                or not params):
            self._snap = None  # nothing more may freeze: no copy, no reading
            return
        snap = self._snap
        if snap is not None and self._snap_unit == u and step - self._snap_step < window:
            return  # inside the window: nothing to read (a changed parameter is seen at its end)
        ws = [params[i].detach() for i in self.drift_params(u) if params[i] is not None]
        if (snap is None or self._snap_unit != u or len(snap) != len(ws)
                or any(a.shape != b.shape or a.device != b.device for a, b in zip(snap, ws))):
            self._snap = [w.clone() for w in ws]
            self._snap_unit, self._snap_step = u, step
            return
        n = len(ws)
        norms = torch._foreach_norm([*torch._foreach_sub(ws, snap), *ws], 2, dtype=torch.float32)
        if any(t.device != norms[0].device for t in norms):
            norms = [t.cpu() for t in norms]
        sq = torch.stack(norms).square()
        value = (sq[:n].sum() / sq[n:].sum()).sqrt().item()  # one host sync per window
        torch._foreach_copy_(snap, ws)
        self._snap_step = step
        self._append(u, value if math.isfinite(value) else math.nan, 4)

    def _append(self, u: int, value: float, keep: int) -> None:
        self._appended += 1
        h = self.history[u]
        h.append(value)
        del h[: max(0, len(h) - keep)]

    def _unit_efficiency(self, u: int, efficiencies: Sequence[float]) -> float:
        params = [int(i) for i in self.units[u].params]
        total = sum(self._numel[i] for i in params)
        if total == 0:
            return math.nan
        return sum(efficiencies[i] * self._numel[i] for i in params) / total

    def advance(self, length: int, step: int) -> None:
        """Record a freeze event that made the prefix ``length`` blocks long (the caller freezes them)."""
        if length < self.length:
            raise RuntimeError(f"prefix CDG is monotone: {self.length} blocks are frozen, asked for {length}")
        if length == self.length:
            return
        self.length = length
        self.last_event = step
        self.events += 1
        self._memo = None
        self._snap = None  # the drift of the next candidate starts from a new snapshot
        for h in self.history:  # readings taken while earlier blocks trained describe another regime
            h.clear()

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, torch.Tensor]:
        units = [[u.name, [int(i) for i in u.params]] for u in self.units] if self.known else None
        blob = json.dumps({"units": units, "numel": self._numel, "events": self.events,
                           "cosmic": sorted(self._cosmic)}).encode("utf-8")
        return {
            "prefix.units": torch.tensor(list(blob), dtype=torch.uint8),
            "prefix.length": torch.tensor(self.length, dtype=torch.int64),
            "prefix.history": torch.tensor([v for h in self.history for v in h], dtype=torch.float64),
            "prefix.history_len": torch.tensor([len(h) for h in self.history], dtype=torch.int64),
            "prefix.last_event": torch.tensor(-1 if self.last_event is None else self.last_event, dtype=torch.int64),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        blob = json.loads(bytes(state["prefix.units"].to(torch.uint8).tolist()).decode("utf-8"))
        if blob["units"] is None:
            self.__init__(self.n)
        else:
            self.units = [policy.PrefixUnit(name, tuple(params)) for name, params in blob["units"]]
            self.known = True
            self._numel = list(blob["numel"])
            self._cosmic = frozenset(int(i) for i in blob.get("cosmic", ()))
            self._index()
        self.events = int(blob["events"])
        self.length = int(state["prefix.length"])
        flat = state["prefix.history"].tolist()
        self.history, start = [], 0
        for n in state["prefix.history_len"].tolist():
            self.history.append([float(v) for v in flat[start:start + n]])
            start += n
        if self.known and len(self.history) != len(self.units):
            self.history = [[] for _ in self.units]
        last = int(state["prefix.last_event"])
        self.last_event = None if last < 0 else last
        self._acc, self._vec = {}, None
        self._memo = None
        self._snap = None  # drift: the snapshot is taken again (the readings go on one window later)
