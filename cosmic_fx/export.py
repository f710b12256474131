"""Ship a transformed model: ``.pt2`` (``torch.export``), ONNX, or adapter files (QCI weights + config).

* ``.pt2`` files load with plain ``torch.export.load`` in a process without cosmic_fx, and take any
  batch size. :func:`load_program` loads one after checking that nothing in it needs unpickling
  beyond plain tensors.
* ONNX files (extra ``export``: onnx, onnxscript) run in onnxruntime with a dynamic batch;
  :func:`load_onnx` opens one with clear errors.
* Adapter files are a directory with ``adapter_model.safetensors`` (the QCI parameters, no pickle)
  and ``adapter_config.json`` (the config and what the adapter fits); :func:`load_adapter` rebuilds
  the transformed model from a fresh copy of the base model.

The loaders live in :mod:`cosmic_fx.loading` and :mod:`cosmic_fx.adapter` and are importable from
here too. ``cosmic-fx export`` (:mod:`cosmic_fx.cli.export`) is the command line.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, _save_adapter, load_adapter
from .config import CosmicConfig
from .loading import CorruptFileError, load_onnx, load_program
from .scoped import eval_no_grad, quiet_torch_logs

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "CorruptFileError",
    "ExportError",
    "export",
    "load_adapter",
    "load_onnx",
    "load_program",
]

FORMATS = ("pt2", "onnx", "adapter")
_TORCH_DIR = os.path.dirname(torch.__file__)


class ExportError(RuntimeError):
    """The model could not be exported; the message names the failing op or line and what to do.

    ``torch_output`` holds what torch printed while it failed (e.g. the partial graph), if anything.
    """

    torch_output: str = ""


def export(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    format: str = "pt2",
    *,
    config: CosmicConfig | None = None,
    dynamic_batch: bool = True,
) -> Path:
    """Export the cosmic-transformed ``model`` for inference, or save its adapter files.

    A model not yet transformed is transformed first with ``config`` (default ``CosmicConfig()``);
    a transformed one (from :func:`cosmic_fx.transform`, or compiled from one) is exported as it is.
    ``.pt2`` and ONNX are traced in eval mode under ``torch.no_grad()``; the model's modes are restored.
    A Hugging Face model whose config has ``use_cache=True`` is traced with ``use_cache`` off (its
    config is restored afterwards): the key/value cache it would return (a ``DynamicCache``) is no
    tensor that ``torch.export`` can output, and a single inference forward does not need it.

    Args:
        model: the model (original, transformed, or ``torch.compile``'d).
        example_inputs: a tensor or a tuple of tensors for ``forward``.
        path: the file to write (``pt2``, ``onnx``) or the directory (``adapter``).
        format: ``"pt2"``, ``"onnx"`` or ``"adapter"``.
        config: the cosmic config for a model not yet transformed.
        dynamic_batch: make dimension 0 of every input dynamic (the example batch must be >= 2).

    Returns:
        the path written.

    Raises:
        ExportError: the forward cannot be exported (the message names the op or line).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        >>> cosmic_fx.export(model, torch.randn(4, 8), "model.pt2")   # doctest: +SKIP
        >>> torch.export.load("model.pt2").module()(torch.randn(9, 8)).shape   # doctest: +SKIP
        torch.Size([9, 4])
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(map(repr, FORMATS))}; got {format!r}")
    tm = _transformed(model, config)
    path = Path(path)
    inputs = _as_tuple(example_inputs)
    if format == "adapter":
        return _save_adapter(tm, path)
    program = _export_program(tm, inputs, dynamic_batch)
    path.parent.mkdir(parents=True, exist_ok=True)
    if format == "pt2":
        torch.export.save(program, path)
        return path
    return _save_onnx(program, inputs, path)


def _transformed(model: nn.Module, config: CosmicConfig | None) -> nn.Module:
    from .transform import transform, transform_info

    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        model = model._orig_mod
    if not isinstance(model, nn.Module):
        raise TypeError(f"cosmic_fx.export expects an nn.Module; got {type(model).__name__}")
    info = transform_info(model)
    if info is None:
        with torch.random.fork_rng(devices=[]):
            return transform(model, config or CosmicConfig())
    if config is not None and config != info.config:
        raise ValueError("this model was already transformed with another config; pass config=None to export "
                         "it as it is, or transform the original model with the new config")
    return model


def _as_tuple(example_inputs: Any) -> tuple[Any, ...]:
    if isinstance(example_inputs, list):
        example_inputs = tuple(example_inputs)
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def _dynamic_shapes(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    from torch.export import Dim

    batches = {x.shape[0] for x in inputs if isinstance(x, torch.Tensor) and x.dim() >= 1}
    if any(b < 2 for b in batches):
        raise ExportError(
            "the example inputs have batch size 1 (or 0): torch.export treats size-1 dimensions as constants, so "
            "the batch cannot be made dynamic. Use an example batch of 2 or more, or dynamic_batch=False (cosmic-fx export: --static-batch)."
        )
    dims = {b: Dim(f"batch{i}" if len(batches) > 1 else "batch", min=1) for i, b in enumerate(sorted(batches))}
    return tuple({0: dims[x.shape[0]]} if isinstance(x, torch.Tensor) and x.dim() >= 1 else None for x in inputs)


def _export_program(tm: nn.Module, inputs: tuple[Any, ...], dynamic_batch: bool):
    dynamic_shapes = _dynamic_shapes(inputs) if dynamic_batch else None
    # torch prints the partial graph of a failed export straight to stderr: hold stderr back, and
    # pass it on only when the export succeeds (on failure our error says what matters)
    held = io.StringIO()
    try:
        with eval_no_grad(tm), _without_kv_cache(tm), contextlib.redirect_stderr(held), \
                quiet_torch_logs("torch.fx.experimental.symbolic_shapes", "torch._export", "torch.export"):
            program = torch.export.export(tm, inputs, dynamic_shapes=dynamic_shapes)
    except Exception as err:
        # an input the model cannot run at all (wrong shape or dtype) fails inside torch.export's tracer,
        # far from the user's code: say so plainly instead of blaming the forward
        mismatch = _inputs_do_not_fit(tm, inputs)
        failure = ExportError(mismatch or _explain_export_failure(tm, err, dynamic_batch))
        failure.torch_output = held.getvalue()
        raise failure from err
    sys.stderr.write(held.getvalue())
    return program


@contextlib.contextmanager
def _without_kv_cache(tm: nn.Module):
    """Turn off a Hugging Face model's ``config.use_cache`` for the duration (every submodule's config,
    which is usually the same object), and restore it."""
    configs = {id(c): c for m in tm.modules() if (c := getattr(m, "config", None)) is not None
               and getattr(c, "use_cache", None) is True and type(c).__module__.startswith("transformers.")}
    for c in configs.values():
        c.use_cache = False
    try:
        yield
    finally:
        for c in configs.values():
            c.use_cache = True


def _describe_input(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"shape ({', '.join(map(str, x.shape))}) {str(x.dtype).replace('torch.', '')}"
    return type(x).__name__


def _inputs_do_not_fit(tm: nn.Module, inputs: tuple[Any, ...]) -> str | None:
    """The error message when the model does not run on ``inputs`` even eagerly, else ``None``."""
    from .inspect import _first_layer_hint

    try:
        with eval_no_grad(tm):
            tm(*inputs)
    except Exception as err:  # noqa: BLE001 - the model fails without torch.export: that is the error to show
        given = "; ".join(f"input {i}: {_describe_input(x)}" for i, x in enumerate(inputs))
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
        head = (f"cannot export {type(tm).__name__}: it does not run on the example inputs ({given}) even without "
                f"torch.export, so there is nothing to trace: {type(err).__name__}: {first}")
        # shape and dtype mismatches surface as these; anything else is a failure of the forward itself
        if isinstance(err, (RuntimeError, ValueError, IndexError)):
            return (f"{head}{_first_layer_hint(tm)}. Pass example inputs of the shape and dtype the model takes.")
        where = _failure_location(err)
        return f"{head}{f' at {where}' if where else ''}. Make the forward run on these inputs first."
    return None


_CALL_SITE = re.compile(r'The following call raised this error:\s*\n\s*File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)')


def _failure_location(err: BaseException) -> str | None:
    """``file:line in function: code`` of the user's code that failed, if it can be found."""
    match = _CALL_SITE.search(str(err))
    if match:
        file, line, func, code = match.groups()
        return f"{file}:{line} in {func}: `{code.strip()}`"
    here = os.path.abspath(__file__)
    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if not os.path.abspath(f.filename).startswith(_TORCH_DIR) and os.path.abspath(f.filename) != here]
    if frames:
        f = frames[-1]
        return f"{f.filename}:{f.lineno} in {f.name}: `{(f.line or '').strip()}`"
    return None


def _explain_export_failure(tm: nn.Module, err: BaseException, dynamic_batch: bool) -> str:
    from .transform import transform_info

    info = transform_info(tm)
    name = type(tm).__name__
    text = str(err)
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(err).__name__)
    where = _failure_location(err)
    at = f" at {where}" if where else ""
    if "data-dependent" in text or "GuardOnDataDependent" in type(err).__name__:
        what = (f"its forward needs the value of a tensor to decide what to compute{at} (data-dependent "
                "control flow). torch.export records one graph for every input, so rewrite that code "
                "without a Python branch on tensor values (torch.where, or torch.cond for two different "
                "computations), or export a submodule that has none.")
    elif "cache_utils" in text or "Cache'> in output" in text:
        what = (f"its forward returns a key/value cache (a Hugging Face Cache object){at}, which is not a tensor "
                "torch.export can output. Export it with the cache turned off: a model whose forward takes "
                "use_cache, called with use_cache=False, or config.use_cache = False.")
    elif dynamic_batch and ("Constraints violated" in text or "specializ" in text or "batch" in text and "Dim" in text):
        const = re.search(r"specialized it to be a constant \((\d+)\)", text)
        fixed = f" to {const.group(1)}" if const else ""
        what = (f"its forward fixes the batch size{fixed}{at}, so the batch cannot be dynamic. Remove the batch-size "
                "dependency (e.g. use x.shape[0] or -1 in reshape), or export with dynamic_batch=False.")
    else:
        what = (f"torch.export could not trace the forward{at}. Make that code traceable (see "
                "https://pytorch.org/docs/stable/export.html), or export a submodule without it.")
    if info is not None and info.path == "module_swap":
        what += f" (cosmic_fx.transform could not symbolic-trace it either: {info.trace_error})"
    return f"cannot export {name}: {what}\ntorch.export said: {type(err).__name__}: {first}"


def _save_onnx(program, inputs: tuple[Any, ...], path: Path) -> Path:
    missing = []
    for module in ("onnx", "onnxscript"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ModuleNotFoundError(
            f"ONNX export needs the {' and '.join(missing)} package(s): pip install 'cosmic-fx[export]' "
            "(or pip install onnx onnxscript)"
        )
    large = sum(t.numel() * t.element_size() for t in program.state_dict.values()) > 1_500_000_000
    try:
        with warnings.catch_warnings(), quiet_torch_logs("torch.onnx"):
            warnings.simplefilter("ignore", FutureWarning)
            onnx_program = torch.onnx.export(program, inputs, dynamo=True, verbose=False, external_data=large)
        onnx_program.save(str(path), external_data=large)
    except Exception as err:
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
        raise ExportError(f"cannot convert {type(program.module()).__name__} to ONNX: {type(err).__name__}: {first}. "
                          "The .pt2 format (format='pt2') supports every op torch.export does.") from err
    return path
