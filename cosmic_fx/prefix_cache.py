"""``cosmic_fx.PrefixCache``: reuse the frozen prefix's output for samples that come back.

Prefix CDG (``cdg="prefix"``) freezes the blocks on the input side for good; from then on their
output for a given sample never changes (AutoFreeze, PipeTransformer's AutoCache). When the same
samples come back (several epochs over one dataset, without random augmentation) the cache keeps
each sample's prefix output and runs the prefix's forward on the samples of a batch it has not
cached only: a batch whose samples are all cached runs only the rest of the model, neither the
prefix's forward nor (it is frozen) its backward.

How it works. The model must come from :func:`cosmic_fx.transform` on its traced path (its forward
is a graph). At each freeze event the cache cuts that graph in two: the *prefix* (every node the
frozen parameters' nodes depend on) and the *suffix* (the rest), which takes the model's inputs plus
the values that cross the cut (the residual stream, say). The prefix runs under ``torch.no_grad``;
for a model compiled by :func:`cosmic_fx.compile` the suffix is compiled on its own with the same
backend and runtime (one more graph per freeze event; freeze events are bounded by
``cdg_max_sets``).

* **Keys.** ``cache(x, keys=...)`` takes one key per sample (``PrefixCache.keyed(dataset)`` makes a
  dataset yield its indices); without keys, a content key is computed per sample from every batched
  input tensor (two 64-bit hashes of its bits: token ids and float inputs alike). With user keys the
  content key is kept too and checked on every hit: a sample that comes back with another input
  (random augmentation, keys that do not name samples) turns the cache off for the rest of the run,
  with one warning.
* **Memory.** Entries are bounded by ``max_mib``; when the next one does not fit the cache stops
  adding (one warning) and the samples left out run the prefix every step. ``dtype=torch.bfloat16``
  halves float32 entries, at the price of exactness (the suffix then sees bfloat16-rounded inputs).
* **Exactness.** With ``dtype=None`` an entry is a copy of the prefix's output: training with the cache
  equals training without it, bit for bit, when the batches are the same from epoch to epoch (tests);
  with reshuffled batches a sample's prefix output was computed in another batch, equal up to the
  float rounding of batch-size-dependent kernels.
* **Invalidation.** The entries belong to one prefix length: a freeze event clears them.
* **Refused.** Dropout, BatchNorm in training mode or a random op in the part of the model that can
  freeze (``cdg_prefix_max`` of the blocks) make the prefix's output differ between visits: an error
  when the cache is built (evaluate the model without them, or put ``p=0``). In ``eval()`` mode the
  cache is bypassed (the model runs as it is).
* **Checkpoints.** The entries are not saved: after a resume the first visit of each sample refills
  them (they are a function of the frozen weights, which the model's checkpoint holds).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Hashable, Sequence
from typing import Any

import torch
from torch import fx, nn

from .checks import check_module
from .config import CDGMode

__all__ = ["KeyedDataset", "PrefixCache"]

_RANDOM_OPS = ("dropout", "rand", "bernoulli", "normal", "multinomial", "randperm")
_STORE_DTYPES = (None, torch.bfloat16, torch.float16)
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


class KeyedDataset(torch.utils.data.Dataset):
    """A map-style dataset that yields ``(index, sample)``: the index is the sample's cache key.

    Example:
        >>> data = KeyedDataset([torch.zeros(2), torch.ones(2)])
        >>> data[1]
        (1, tensor([1., 1.]))
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return index, self.dataset[index]


@functools.lru_cache(maxsize=32)
def _hash_weights(n: int, device: torch.device, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)  # a private generator: the user's RNG state is not touched
    w = torch.randint(-(2 ** 62), 2 ** 62, (n,), generator=g, dtype=torch.int64)
    return (w * 2 + 1).to(device)  # odd weights


def content_keys(tensors: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
    """One key per sample (row of dim 0) of the given batched tensors: two 64-bit hashes of their bits.

    Args:
        tensors: tensors with the same size of dim 0 (the batch).

    Example:
        >>> a = torch.tensor([[1, 2, 3], [1, 2, 3], [3, 2, 1]])
        >>> k = content_keys([a])
        >>> k[0] == k[1], k[0] == k[2]
        (True, False)
    """
    rows = []
    for t in tensors:
        flat = t.detach().reshape(t.shape[0], -1)
        if flat.dtype.is_floating_point or flat.dtype.is_complex or flat.element_size() > 4 \
                or flat.dtype is torch.bool:
            # the bits as integers of at most 32 bits (a float32 is one int32, not four bytes widened to
            # int64 each: a quarter of the work; 64-bit values are two int32s, see the bound below)
            as_int = _INT_OF_SIZE[min(flat.element_size(), 4)]
            flat = flat.contiguous().view(as_int).reshape(t.shape[0], -1)
        rows.append(flat.to(torch.int64))
    flat = torch.cat(rows, dim=1) if len(rows) > 1 else rows[0]
    n = flat.shape[1]
    # int64 arithmetic wraps: a random linear form with odd weights modulo 2**64, twice. Two rows that
    # differ collide with probability about 2**-(64 - 31) per form: their difference's largest power of
    # 2 is at most 2**31 for values of at most 32 bits (with 64-bit values two sign bits that differ
    # would cancel for any odd weights)
    h1 = (flat * _hash_weights(n, flat.device, 1)).sum(1)
    h2 = (flat * _hash_weights(n, flat.device, 2)).sum(1)
    return list(zip(h1.tolist(), h2.tolist()))


def _node_params(node: fx.Node, root: nn.Module) -> list[str]:
    """The parameter names a graph node reads (its module's, or the attribute it fetches)."""
    if node.op == "call_module":
        mod = root.get_submodule(str(node.target))
        return [f"{node.target}.{n}" for n, _ in mod.named_parameters()]
    if node.op == "get_attr":
        try:
            obj = root.get_parameter(str(node.target))
        except AttributeError:
            return []
        return [str(node.target)] if obj is not None else []
    return []


def _not_repeatable(node: fx.Node, root: nn.Module) -> str | None:
    """Why a prefix node's output can differ between two visits of a sample (training mode), else None."""
    if node.op == "call_module":
        mod = root.get_submodule(str(node.target))
        if isinstance(mod, nn.modules.dropout._DropoutNd) and mod.training and mod.p > 0:
            return f"{node.target} ({type(mod).__name__}, p={mod.p}, training mode)"
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.training:
            return f"{node.target} ({type(mod).__name__} in training mode: batch statistics)"
        return None
    if node.op in ("call_function", "call_method"):
        name = getattr(node.target, "__name__", str(node.target)).lower()
        if any(op in name for op in _RANDOM_OPS):
            if "dropout" in name and (node.kwargs.get("training") is False or node.kwargs.get("p") == 0):
                return None
            return f"{node.name} ({name})"
    return None


_SHAPE_METHODS = ("size", "dim", "numel", "shape", "dtype", "device", "ndim")


def _shape_like(nodes: list[fx.Node]) -> set[fx.Node]:
    """Nodes that compute shapes and other Python values (``x.size(-1) // heads``), not tensors: kept
    out of the cached part, since a cache entry holds per-sample tensors."""
    out: set[fx.Node] = set()
    for n in nodes:
        if n.op == "call_method" and n.target in _SHAPE_METHODS:
            out.add(n)
        elif n.op == "call_function" and n.target is getattr and len(n.args) > 1 and n.args[1] in _SHAPE_METHODS:
            out.add(n)
        elif n.op == "call_function" and getattr(n.target, "__module__", None) in ("_operator", "operator") \
                and n.all_input_nodes and all(m in out for m in n.all_input_nodes):
            out.add(n)
    return out


class _Split:
    """The transformed model's graph cut after a frozen prefix: ``prefix(*inputs) -> crossing`` and
    ``suffix(*inputs, *crossing) -> output``."""

    def __init__(self, root: nn.Module, graph: fx.Graph, frozen: set[str], trainable: set[str]) -> None:
        nodes = list(graph.nodes)
        placeholders = [n for n in nodes if n.op == "placeholder"]
        seeds = [n for n in nodes if (ps := _node_params(n, root)) and all(p in frozen for p in ps)]
        region: set[fx.Node] = set()
        stack = list(seeds)
        while stack:
            n = stack.pop()
            if n in region or n.op == "placeholder":
                continue
            region.add(n)
            stack.extend(n.all_input_nodes)
        # and the parameter-free, repeatable work that follows from the prefix alone (the last block's
        # residual add, an activation): fewer and smaller values cross the cut, so entries take less memory
        shape_like = _shape_like(nodes)
        for n in nodes:
            if n in region or n.op not in ("call_function", "call_method", "call_module") or not n.all_input_nodes:
                continue
            if n not in shape_like and all(m in region for m in n.all_input_nodes) and not _node_params(n, root) \
                    and _not_repeatable(n, root) is None:
                region.add(n)
        self.region = [n for n in nodes if n in region]
        self.reads_trainable = [p for n in self.region for p in _node_params(n, root) if p in trainable]
        self.not_repeatable = [why for n in self.region if (why := _not_repeatable(n, root)) is not None]
        self.crossing = [n for n in self.region if any(u not in region for u in n.users)]
        self.ok = bool(self.region) and not self.reads_trainable and not self.not_repeatable and bool(self.crossing)
        if not self.ok:
            return
        self.prefix = self._module(root, placeholders, self.region, None)
        rest = [n for n in nodes if n not in region and n.op != "placeholder"]
        self.suffix = self._module(root, placeholders, rest, self.crossing)

    @staticmethod
    def _module(root: nn.Module, placeholders: list[fx.Node], body: list[fx.Node],
                crossing: list[fx.Node] | None) -> fx.GraphModule:
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for p in placeholders:
            env[p] = g.node_copy(p, lambda n: env[n])
        if crossing is not None:  # the suffix: the crossing values come in after the model's inputs
            for i, c in enumerate(crossing):
                env[c] = g.placeholder(f"cosmic_crossing_{i}")
        outputs = []
        for n in body:
            if n.op == "output":
                outputs.append(g.node_copy(n, lambda m: env[m]))
                continue
            env[n] = g.node_copy(n, lambda m: env[m])
        if crossing is None:  # the prefix: return the values the suffix needs
            g.output(tuple(env[c] for c in _Split._crossing_of(body)))
        g.lint()
        return fx.GraphModule(root, g)

    @staticmethod
    def _crossing_of(region: list[fx.Node]) -> list[fx.Node]:
        inside = set(region)
        return [n for n in region if any(u not in inside for u in n.users)]


class PrefixCache:
    """Run a model through a cache of its frozen prefix's outputs (see the module docstring).

    Args:
        model: a model from :func:`cosmic_fx.transform` (traced path) or :func:`cosmic_fx.compile`, with
            ``cdg="prefix"``.
        max_mib: the most memory the entries may take, in MiB (> 0).
        dtype: ``None`` (keep the prefix's dtype: exact) or ``torch.bfloat16`` / ``torch.float16``.

    Attributes:
        hits / misses: samples served from the cache / that ran the prefix.
        prefix_runs: batches that ran the prefix's forward (its length > 0).

    Example:
        >>> cm = cosmic_fx.compile(model, cosmic_fx.CosmicConfig.fast())             # doctest: +SKIP
        >>> cache = cosmic_fx.PrefixCache(cm, max_mib=512)                            # doctest: +SKIP
        >>> loader = DataLoader(PrefixCache.keyed(train_set), batch_size=32)          # doctest: +SKIP
        >>> for epoch in range(5):                                                    # doctest: +SKIP
        ...     for keys, (x, y) in loader:
        ...         loss = loss_fn(cache(x, keys=keys), y)   # all cached: the prefix does not run
        ...         loss.backward(); opt.step(); opt.zero_grad()
    """

    keyed = staticmethod(KeyedDataset)

    def __init__(self, model: nn.Module, *, max_mib: float = 1024.0, dtype: torch.dtype | None = None) -> None:
        from .runtime import _unwrap, runtime_of
        from .transform import transform_info

        check_module(model, "cosmic_fx.PrefixCache")
        if isinstance(max_mib, bool) or not isinstance(max_mib, (int, float)) or not math.isfinite(max_mib) \
                or max_mib <= 0:
            raise ValueError(f"PrefixCache: max_mib must be a finite number of MiB > 0; got {max_mib!r}")
        if dtype not in _STORE_DTYPES:
            raise ValueError(f"PrefixCache: dtype must be None (exact), torch.bfloat16 or torch.float16; got {dtype!r}")
        if any(type(m).__name__ in ("DistributedDataParallel", "DataParallel") for m in (model, _orig(model))):
            raise ValueError("PrefixCache runs the model's suffix itself, outside the DistributedDataParallel "
                             "wrapper's forward, which its gradient all-reduce needs. Train a DDP model without the "
                             "cache.")
        inner = _unwrap(model)
        info = transform_info(inner)
        rt = runtime_of(inner)
        if info is None or rt is None:
            raise ValueError(f"PrefixCache needs a model from cosmic_fx.transform or cosmic_fx.compile (it reads the "
                             f"frozen prefix from the model's cosmic runtime); {type(inner).__name__} has none")
        if rt.config.cdg is not CDGMode.PREFIX:
            raise ValueError(f"PrefixCache caches the prefix that cdg='prefix' freezes; this model's config has "
                             f"cdg={rt.config.cdg.value!r}. Use CosmicConfig.fast() or cdg='prefix'.")
        if info.path != "symbolic_trace":
            raise ValueError(f"PrefixCache cuts the model's traced graph after the frozen prefix; "
                             f"{type(inner).__name__} did not trace (cosmic_fx.transform used module_swap), so there "
                             "is no graph to cut. Train it without the cache.")
        self.model = model
        self.max_bytes = int(max_mib * 2 ** 20)
        self.dtype = dtype
        self._inner, self._graph, self._rt = inner, info.graph_module.graph, rt
        self._compiled = isinstance(model, torch._dynamo.eval_frame.OptimizedModule)
        self._check_freezable_region()
        self.hits = self.misses = self.prefix_runs = 0
        self._length = 0
        self._split: _Split | None = None
        self._suffix: Any = None
        self._entries: dict[Hashable, tuple[tuple[torch.Tensor, ...], Any]] = {}
        self._bytes = 0
        self._full = False
        self._off: str | None = None  # why the cache was turned off for good (None: on)

    # ------------------------------------------------------------------ checks
    def _names(self, indices) -> set[str]:
        rt = self._rt
        return {n for n in _all_names(self._inner) if rt.index_of(n) in indices}

    def _check_freezable_region(self) -> None:
        rt = self._rt
        units = rt.prefix.units
        if not rt.prefix.known or not units:
            return
        # the blocks prefix CDG may freeze at most (policy.prefix_decision's cap)
        cap = min(len(units), math.floor(rt.config.cdg_prefix_max * len(units)))
        frozen = {int(i) for u in units[:cap] for i in u.params}
        split = _Split(self._inner, self._graph, self._names(frozen), set())
        if split.not_repeatable:
            raise ValueError(
                f"PrefixCache: the blocks that prefix CDG may freeze hold {', '.join(split.not_repeatable[:3])}: their "
                "output differs from one visit of a sample to the next, so a cached output would be wrong. Set p=0 "
                "(or use eval-mode BatchNorm / no random op) in those blocks, or train without the cache."
            )

    def _resplit(self, length: int) -> None:
        rt = self._rt
        self.clear()
        self._length = length
        frozen = {int(i) for u in rt.prefix.units[:length] for i in u.params}
        trainable = set(range(len(rt.names))) - frozen
        split = _Split(self._inner, self._graph, self._names(frozen), self._names(trainable))
        if not split.ok:
            why = ("it reads trainable parameters " + ", ".join(split.reads_trainable[:3]) if split.reads_trainable
                   else "it holds " + ", ".join(split.not_repeatable[:3]) if split.not_repeatable
                   else "no value of it reaches the rest of the model")
            self._turn_off(f"the frozen prefix ({length} blocks) cannot be cut from the model: {why}")
            return
        self._split = split
        suffix = split.suffix
        if self._compiled:
            from .backend import cosmic_backend

            backend = functools.partial(cosmic_backend, runtime=rt, options=rt.config)
            suffix = torch.compile(suffix, backend=backend)
        self._suffix = suffix

    def _turn_off(self, why: str) -> None:
        self._off = why
        self.clear()
        warnings.warn(f"cosmic_fx.PrefixCache: {why}. The cache is off for the rest of the run; the model runs "
                      "as it is.", RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------------ use
    def clear(self) -> None:
        """Drop every entry (the cache refills on the next visits)."""
        self._entries.clear()
        self._bytes = 0
        self._full = False

    @property
    def entries(self) -> int:
        """How many samples are cached."""
        return len(self._entries)

    @property
    def mib(self) -> float:
        """The memory the entries take, in MiB."""
        return self._bytes / 2 ** 20

    def __call__(self, *inputs: Any, keys: Sequence[Hashable] | torch.Tensor | None = None) -> Any:
        """The model's output for ``inputs``, its frozen prefix served from the cache where it can be.

        Args:
            *inputs: the model's positional inputs, batched on dim 0.
            keys: one key per sample (ints, strings, ... or a tensor of ints); ``None``: content keys.
        """
        rt = self._rt
        if self._off is not None or not self._inner.training or not torch.is_grad_enabled():
            return self.model(*inputs)
        length = rt.prefix.length
        if length == 0:
            return self.model(*inputs)
        if length != self._length:
            self._resplit(length)
            if self._off is not None:
                return self.model(*inputs)
        batched = [t for t in inputs if isinstance(t, torch.Tensor) and t.dim() > 0]
        if not batched:
            raise TypeError("PrefixCache: the model's inputs hold no batched tensor (dim 0 = batch) to key samples by")
        n = batched[0].shape[0]
        content = content_keys([t for t in batched if t.shape[0] == n])
        if keys is None:
            keys = content
        elif isinstance(keys, torch.Tensor):
            keys = keys.tolist()
        keys = list(keys)
        if len(keys) != n:
            raise ValueError(f"PrefixCache: {len(keys)} keys for a batch of {n} samples; give one key per sample")
        found = [self._entries.get(k) for k in keys]
        for k, entry, c in zip(keys, found, content):
            if entry is not None and entry[1] != c:
                self._turn_off(f"sample key {k!r} came back with another input (random augmentation, or keys that "
                               "do not name samples), so its cached prefix output would be wrong")
                return self.model(*inputs)
        missing = [j for j, e in enumerate(found) if e is None]
        self.hits += n - len(missing)
        if not missing:
            crossing = [torch.stack([e[0][j] for e in found]).to(dtype) for j, dtype in enumerate(self._dtypes)]
            return self._suffix(*inputs, *crossing)
        self.misses += len(missing)
        self.prefix_runs += 1
        if len(missing) < n:  # the prefix runs on the samples not cached only
            rows = torch.tensor(missing, device=batched[0].device)
            part = [t.index_select(0, rows) if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == n else t
                    for t in inputs]
        else:
            part = inputs
        with torch.no_grad():
            ran = list(self._split.prefix(*part))
        if not all(isinstance(c, torch.Tensor) and c.dim() > 0 and c.shape[0] == len(missing) for c in ran):
            self._turn_off("a value that crosses from the frozen prefix to the rest of the model is not a tensor "
                           "batched on dim 0, so it cannot be kept per sample")
            return self.model(*inputs)
        self._dtypes = [c.dtype for c in ran]
        self._store([keys[j] for j in missing], [content[j] for j in missing], ran)
        if len(missing) == n:
            return self._suffix(*inputs, *ran)
        hit = [j for j, e in enumerate(found) if e is not None]
        new_rows, hit_rows = rows.to(ran[0].device), torch.tensor(hit, device=ran[0].device)
        crossing = []
        for j, c in enumerate(ran):
            whole = c.new_empty((n, *c.shape[1:]))
            whole[new_rows] = c
            whole[hit_rows] = torch.stack([found[i][0][j] for i in hit]).to(c.dtype)
            crossing.append(whole)
        return self._suffix(*inputs, *crossing)

    def _store(self, keys, content, crossing) -> None:
        """Keep row ``j`` of ``crossing`` for ``keys[j]`` (samples not cached yet; a key twice in one
        batch is kept once)."""
        if self._full:
            return
        for j, k in enumerate(keys):
            if k in self._entries:
                continue
            rows = tuple(c[j].to(self.dtype if self.dtype is not None and c.is_floating_point() else c.dtype,
                                 copy=True) for c in crossing)
            size = sum(r.numel() * r.element_size() for r in rows)
            if self._bytes + size > self.max_bytes:
                self._full = True
                warnings.warn(
                    f"cosmic_fx.PrefixCache: the cap of {self.max_bytes / 2 ** 20:g} MiB is reached with "
                    f"{self.entries} samples cached; the others run the frozen prefix every step. Raise max_mib, or "
                    "store dtype=torch.bfloat16 entries (half the size). (Warned once.)",
                    RuntimeWarning, stacklevel=3)
                return
            self._entries[k] = (rows, content[j])
            self._bytes += size

    def __repr__(self) -> str:
        state = f"off: {self._off}" if self._off else f"prefix={self._length} blocks"
        return (f"PrefixCache({state}, entries={self.entries}, mib={self.mib:.1f}/{self.max_bytes / 2 ** 20:g}, "
                f"hits={self.hits}, misses={self.misses})")


def _orig(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)


def _all_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters(remove_duplicate=False)]
