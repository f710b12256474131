"""Measurements behind ``cosmic-fx bench zoo`` (:mod:`cosmic_fx.bench.zoo`): the linear-like layers a
forward uses, the output tensor a check reads, and one compiled training run with its dynamo counters.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["TrainRun", "count_qcis", "linear_like_layers", "primary_tensor", "reason", "train_run"]


def reason(err: BaseException, width: int = 160) -> str:
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    text = f"{type(err).__name__}: {first}" if first else type(err).__name__
    return text if len(text) <= width else text[: width - 1] + "…"


def primary_tensor(out: Any) -> torch.Tensor:
    """The output tensor a loss or a comparison reads: the output itself, or the first floating tensor of a
    ``ModelOutput`` / dict / tuple (``logits`` for HF models, since ``loss`` is absent without labels)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "to_tuple"):
        values: Sequence[Any] = out.to_tuple()
    elif isinstance(out, Mapping):
        values = list(out.values())
    elif isinstance(out, (tuple, list)):
        values = out
    else:
        raise TypeError(f"no tensor in an output of type {type(out).__name__}")
    for value in values:
        with contextlib.suppress(TypeError):
            t = primary_tensor(value)
            if t.is_floating_point():
                return t
    raise TypeError(f"no floating-point tensor in an output of type {type(out).__name__}")


class _LinearLike(TorchFunctionMode):
    """Records every model parameter used as the weight of a linear-like call (name -> output width)."""

    def __init__(self, params: dict[int, str]) -> None:
        super().__init__()
        self.params = params
        self.found: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        weight, width = None, None
        if func in (F.linear, torch._C._nn.linear):
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            width = weight.shape[0] if isinstance(weight, torch.Tensor) else None
        elif func in (torch.addmm, torch.Tensor.addmm):
            weight = args[2] if len(args) > 2 else kwargs.get("mat2")
            width = weight.shape[-1] if isinstance(weight, torch.Tensor) else None
        elif func in (F.conv2d, torch.conv2d):
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            width = weight.shape[0] if isinstance(weight, torch.Tensor) else None
        elif func is F.multi_head_attention_forward:
            # a Python function that dispatches here first: its own F.linear calls run with this mode off
            bound = inspect.signature(func).bind(*args, **kwargs).arguments
            for key in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj_weight"):
                if isinstance(bound.get(key), torch.Tensor):
                    self._record(bound[key], bound[key].shape[0])
        if isinstance(weight, torch.Tensor):
            self._record(weight, width)
        return func(*args, **kwargs)

    def _record(self, weight: torch.Tensor, width: int) -> None:
        base = weight if id(weight) in self.params else weight._base  # a view (a chunk of a packed weight)
        name = self.params.get(id(base)) if base is not None else None
        if name is not None and name not in self.found:
            self.found[name] = int(width)


def linear_like_layers(model: nn.Module, inputs: tuple[Any, ...]) -> dict[str, int]:
    """Every linear-like layer one forward uses: its weight's name (without ``.weight``) -> output width.

    Eval mode with grad enabled: the fused inference paths of ``MultiheadAttention`` and
    ``TransformerEncoderLayer`` (which bypass ``F.linear``) are off when parameters require grad.
    """
    params = {id(p): re.sub(r"[._]weight$", "", name) for name, p in model.named_parameters()}
    mode = _LinearLike(params)
    training = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.enable_grad(), mode:
            model(*inputs)
    finally:
        for m, was in training.items():
            m.training = was
    return mode.found


def count_qcis(model: nn.Module) -> int:
    from .. import QuantumClassicalInterface

    return sum(isinstance(m, QuantumClassicalInterface) for _, m in model.named_modules())


# ----------------------------------------------------------------------------- training runs
@dataclasses.dataclass
class TrainRun:
    """One compiled training run: its losses, the error that stopped it, and dynamo's counts."""

    losses: list[float] = dataclasses.field(default_factory=list)
    error: str | None = None
    graphs: int = 0
    recompiles: int = 0
    breaks: int = 0
    eager_calls: int = 0  # forwards in which some layer ran outside a compiled graph
    limit_hits: int = 0
    forwards: int = 0


class _LimitLog(logging.Handler):
    """Counts dynamo's "hit config.recompile_limit" warnings (each one means frames now run eagerly)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.hits = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "recompile_limit" in record.getMessage():
            self.hits += 1


def _graph_count() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _graph_breaks() -> int:
    """Graph breaks since the last ``torch._dynamo.reset()`` (which clears dynamo's list of their reasons;
    ``counters["graph_break"]`` misses some kinds, such as a data-dependent branch)."""
    from torch._dynamo import utils

    return len(getattr(utils, "graph_break_reasons", ()))


def _recompiles() -> int:
    """Compilations beyond the first of each frame since the last ``torch._dynamo.reset()``."""
    from torch._dynamo import convert_frame

    per_frame = getattr(convert_frame, "FRAME_COMPILE_COUNTER", {})
    return int(sum(max(0, n - 1) for n in per_frame.values()))


def train_run(base: nn.Module, make: Callable[[nn.Module], nn.Module], batches: list[tuple[Any, ...]], *,
              lr: float, seed: int) -> TrainRun:
    """Train a fresh copy of ``base`` compiled by ``make`` on ``batches``; every counter is this run's alone."""
    torch._dynamo.reset()
    run = TrainRun()
    model = copy.deepcopy(base).train()
    targets: dict[tuple[int, ...], torch.Tensor] = {}
    ran_eagerly = [False]

    def note_eager(module, args, output) -> None:
        # dynamo inlines this hook into the graph it traces, where is_compiling() is True: it only fires
        # when the layer runs outside a compiled graph. (The root module's own hooks would not do: dynamo
        # calls them outside the compiled frame, and may compile the hook function as a frame of its own.)
        if not torch.compiler.is_compiling():
            ran_eagerly[0] = True

    limit_log = _LimitLog()
    dynamo_log = logging.getLogger("torch._dynamo")
    dynamo_log.addHandler(limit_log)
    graphs_before = _graph_count()
    try:
        torch.manual_seed(seed)
        compiled = make(model)
        inner = getattr(compiled, "_orig_mod", compiled)
        for module in inner.modules():
            if module is not inner and next(module.children(), None) is None:
                module.register_forward_hook(note_eager)
        opt = torch.optim.Adam(compiled.parameters(), lr=lr)
        for inputs in batches:
            opt.zero_grad(set_to_none=True)
            ran_eagerly[0] = False
            out = primary_tensor(compiled(*inputs)).float()
            run.forwards += 1
            run.eager_calls += ran_eagerly[0]
            if out.shape not in targets:
                gen = torch.Generator().manual_seed(hash(tuple(out.shape)) % 2**31)
                targets[out.shape] = torch.randn(out.shape, generator=gen)
            loss = F.mse_loss(out, targets[out.shape])
            loss.backward()
            opt.step()
            run.losses.append(float(loss.detach()))
    except Exception as err:  # noqa: BLE001 - the run's failure is reported in its cells
        run.error = reason(err)
    finally:
        dynamo_log.removeHandler(limit_log)
    run.graphs, run.breaks = _graph_count() - graphs_before, _graph_breaks()
    run.recompiles, run.limit_hits = _recompiles(), limit_log.hits
    torch._dynamo.reset()
    return run
