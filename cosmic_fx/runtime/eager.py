"""Eager training: forward hooks that give a runtime ``E_out`` from each training forward's output
and, on the first forward, the output layer (for ``cdg_protect_output``)."""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .. import policy
from ..config import CDGMode
from ..sites import is_site_module

__all__ = ["OutputTracker", "first_float_tensor"]


def first_float_tensor(out: Any) -> torch.Tensor | None:
    """The first floating-point tensor of a model output (tensor, tuple, list, dict or ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return out if out.is_floating_point() else None
    if isinstance(out, dict):  # includes Hugging Face ModelOutput (an OrderedDict)
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        for item in out:
            found = first_float_tensor(item)
            if found is not None:
                return found
    return None


def _check_output_csc(model: nn.Module, head: nn.Module) -> None:
    """Warn when the module-swap output CSC (placed on the last site in module order, before any
    forward ran) is not on the site the first forward ran last."""
    from ..transform import transform_info

    info = transform_info(model)
    if info is None or info.output_csc is None or info.path != "module_swap":
        return
    name = next((n for n, m in model.named_modules() if m is head), None)
    if name is not None and name != info.output_csc:
        warnings.warn(
            f"output CSC acts on {info.output_csc}, the last site in {type(model).__name__}'s module order, but "
            f"its forward runs {name} last: the output is computed from a compressed intermediate, and is not "
            "compressed itself. Register the output layer last in __init__ (or use csc='sites' or csc='none'); "
            "cosmic_fx.explain shows where CSC acts.", UserWarning, stacklevel=2)


class _ParamOrder(TorchFunctionMode):
    """Records the parameters every torch call of one forward reads, in order of first read."""

    def __init__(self) -> None:
        super().__init__()
        self.order: list[torch.Tensor] = []
        self._seen: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, nn.Parameter) and id(t) not in self._seen:
                self._seen.add(id(t))
                self.order.append(t)
        return func(*args, **kwargs)


class OutputTracker:
    """Forward hooks on a model that give its runtime ``E_out`` from each training forward's output
    (eager mode; under torch.compile where no compiled graph returns it) and, with ``probe``, the
    output layer from the first forward."""

    def __init__(self, model: nn.Module, runtime, probe: bool = True) -> None:
        self._runtime = weakref.ref(runtime)
        self._order: list[nn.Module] = []
        # the root's own hook fires after every child's, so its direct parameters (a positional
        # embedding, say) would look like the output layer: leave the root out, as the backend does
        # prepend: on the module-swap path a site's QCI is a forward hook on its layer, and the layer
        # must be recorded before the QCI's modules it runs
        self._probe = [] if runtime._protected_known or not probe else [
            m.register_forward_hook(self._record, prepend=True)
            for m in model.modules()
            if m is not model and any(True for _ in m.parameters(recurse=False))
        ]
        self._names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        self._order_mode: _ParamOrder | None = None
        self._order_hooks = [] if not probe or runtime.config.cdg is not CDGMode.PREFIX or runtime.prefix.known else [
            model.register_forward_pre_hook(self._start_order),
            model.register_forward_hook(self._stop_order, always_call=True),
        ]
        self.handle = model.register_forward_hook(self._on_output)

    def close(self) -> None:
        self._stop_order()
        for h in [self.handle, *self._probe, *self._order_hooks]:
            h.remove()
        self._probe = []
        self._order_hooks = []

    # prefix CDG: the order in which the first forward reads the parameters
    def _start_order(self, module: nn.Module, args: Any) -> None:
        if self._order_mode is None:
            self._order_mode = _ParamOrder()
            self._order_mode.__enter__()

    def _stop_order(self, *args: Any) -> None:
        mode, self._order_mode = self._order_mode, None
        if mode is None:
            return
        mode.__exit__(None, None, None)
        for h in self._order_hooks:
            h.remove()
        self._order_hooks = []
        runtime = self._runtime()
        if runtime is not None:
            self._pending_order = [self._names[id(p)] for p in mode.order if id(p) in self._names]

    _pending_order: list[str] | None = None

    def _record(self, module: nn.Module, args: Any, out: Any) -> None:
        self._order.append(module)

    @torch._dynamo.disable  # under torch.compile: runs eagerly, on real tensors, once per forward
    def _on_output(self, module: nn.Module, args: Any, out: Any) -> None:
        runtime = self._runtime()
        if runtime is None:
            return
        if self._probe:
            for h in self._probe:
                h.remove()
            self._probe = []
            calls = [policy.Call(is_site_module(m), tuple(self._names[id(p)] for p in m.parameters(recurse=False)))
                     for m in self._order]
            runtime.set_protected(policy.output_layer(calls))
            last = policy.output_site([c.is_site for c in calls])
            if last is not None:
                _check_output_csc(module, self._order[last])
            self._order = []
        if self._pending_order is not None:  # after set_protected: the blocks stop at the output layer
            runtime.set_forward_order(self._pending_order)
            self._pending_order = None
        tensor = first_float_tensor(out)
        if tensor is not None and torch.is_grad_enabled():
            runtime.set_output(tensor)
