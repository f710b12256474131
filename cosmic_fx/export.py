"""Ship a transformed model: ``.pt2`` (``torch.export``), ONNX, or adapter files (QCI weights + config).

* ``.pt2`` files load with plain ``torch.export.load`` in a process without cosmic_fx, and take any
  batch size. :func:`load_program` loads one after checking that nothing in it needs unpickling
  beyond plain tensors.
* ONNX files (extra ``export``: onnx, onnxscript) run in onnxruntime with a dynamic batch;
  :func:`load_onnx` opens one with clear errors.
* Adapter files are a directory with ``adapter_model.safetensors`` (the QCI parameters, no pickle)
  and ``adapter_config.json`` (the config and what the adapter fits); :func:`load_adapter` rebuilds
  the transformed model from a fresh copy of the base model.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import re
import sys
import traceback
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import CosmicConfig

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

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FORMAT = "cosmic_fx.adapter"
ADAPTER_VERSION = 1
FORMATS = ("pt2", "onnx", "adapter")
_TORCH_DIR = os.path.dirname(torch.__file__)


class ExportError(RuntimeError):
    """The model could not be exported; the message names the failing op or line and what to do.

    ``torch_output`` holds what torch printed while it failed (e.g. the partial graph), if anything.
    """

    torch_output: str = ""


class CorruptFileError(ValueError):
    """A file to load is truncated, corrupt, of the wrong kind, or would need unsafe unpickling."""


# ----------------------------------------------------------------------------- export
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


@contextlib.contextmanager
def _quiet_torch_logs(*names: str) -> Iterator[None]:
    """Silence torch's own warnings (graph dumps, optional-package notes) that our error replaces."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _export_program(tm: nn.Module, inputs: tuple[Any, ...], dynamic_batch: bool):
    dynamic_shapes = _dynamic_shapes(inputs) if dynamic_batch else None
    modes = [(m, m.training) for m in tm.modules()]
    tm.eval()
    # torch prints the partial graph of a failed export straight to stderr: hold stderr back, and
    # pass it on only when the export succeeds (on failure our error says what matters)
    held = io.StringIO()
    try:
        with torch.no_grad(), contextlib.redirect_stderr(held), \
                _quiet_torch_logs("torch.fx.experimental.symbolic_shapes", "torch._export", "torch.export"):
            program = torch.export.export(tm, inputs, dynamic_shapes=dynamic_shapes)
    except Exception as err:
        failure = ExportError(_explain_export_failure(tm, err, dynamic_batch))
        failure.torch_output = held.getvalue()
        raise failure from err
    finally:
        for m, training in modes:
            m.training = training
    sys.stderr.write(held.getvalue())
    return program


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
        with warnings.catch_warnings(), _quiet_torch_logs("torch.onnx"):
            warnings.simplefilter("ignore", FutureWarning)
            onnx_program = torch.onnx.export(program, inputs, dynamo=True, verbose=False, external_data=large)
        onnx_program.save(str(path), external_data=large)
    except Exception as err:
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
        raise ExportError(f"cannot convert {type(program.module()).__name__} to ONNX: {type(err).__name__}: {first}. "
                          "The .pt2 format (format='pt2') supports every op torch.export does.") from err
    return path


# ----------------------------------------------------------------------------- loading exported files
def load_program(path: str | os.PathLike):
    """Load a ``.pt2`` file with ``torch.export.load``, refusing anything that needs unpickling.

    ``torch.export.load`` may unpickle some entries with ``weights_only=False``; this function first
    checks every pickled entry of the archive with ``torch.load(weights_only=True)`` (plain tensors
    only) and refuses Python objects, so a crafted file cannot run code.

    Args:
        path: a ``.pt2`` file written by :func:`export` or ``torch.export.save``.

    Returns:
        the ``torch.export.ExportedProgram`` (call ``.module()`` to run it).

    Raises:
        CorruptFileError: the file is missing, truncated, corrupt, not a ``.pt2`` archive, or unsafe.

    Example:
        >>> from cosmic_fx.export import load_program
        >>> program = load_program("model.pt2")   # doctest: +SKIP
        >>> program.module()(torch.randn(3, 8))   # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise CorruptFileError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise CorruptFileError(f"{path} is not a .pt2 archive (not a zip file): it may be truncated or corrupt; "
                               "export it again")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
            if bad is not None:
                raise CorruptFileError(f"{path} is corrupt: the entry {bad} fails its checksum; export it again")
            _check_no_unsafe_pickles(archive, path)
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise CorruptFileError(f"{path} is a damaged .pt2 archive ({err}); export it again") from None
    try:
        with warnings.catch_warnings(), _quiet_torch_logs("torch.export", "torch._export"):
            warnings.simplefilter("ignore")
            return torch.export.load(path)
    except Exception as err:
        raise CorruptFileError(f"{path} could not be loaded as an exported program ({type(err).__name__}: "
                               f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}); it may be corrupt "
                               "or written by an incompatible torch version") from None


def _check_no_unsafe_pickles(archive: zipfile.ZipFile, path: Path) -> None:
    names = archive.namelist()
    pickled: list[str] = []
    for name in names:
        if name.endswith((".pt", ".pkl", ".pickle")) or "/data.pkl" in name:
            pickled.append(name)
        if name.endswith("_config.json") and ("/data/weights/" in name or "/data/constants/" in name):
            folder = name.rsplit("/", 1)[0]
            try:
                config = json.loads(archive.read(name)).get("config", {})
            except (ValueError, AttributeError):
                raise CorruptFileError(f"{path}: {name} is not valid JSON; the archive is corrupt") from None
            for fqn, meta in config.items():
                file = meta.get("path_name", "")
                if file.startswith(("custom_obj", "opaque_obj")):
                    raise CorruptFileError(f"{path} holds a pickled Python object ({fqn}); cosmic_fx refuses to "
                                           "unpickle it. Load it with torch.export.load only if you trust its source.")
                if meta.get("use_pickle"):
                    pickled.append(f"{folder}/{file}")
    for name in pickled:
        if name not in names:
            raise CorruptFileError(f"{path}: the entry {name} is missing; the archive is incomplete")
        try:
            torch.load(io.BytesIO(archive.read(name)), weights_only=True)
        except Exception as err:
            raise CorruptFileError(f"{path}: the entry {name} is not plain tensor data ({type(err).__name__}); "
                                   "cosmic_fx refuses to unpickle it") from None


def load_onnx(path: str | os.PathLike):
    """Open an ONNX file in an onnxruntime ``InferenceSession`` (CPU), with clear errors.

    Args:
        path: a ``.onnx`` file written by :func:`export`.

    Raises:
        CorruptFileError: the file is missing, truncated or not an ONNX model.

    Example:
        >>> from cosmic_fx.export import load_onnx
        >>> session = load_onnx("model.onnx")   # doctest: +SKIP
        >>> session.run(None, {session.get_inputs()[0].name: x.numpy()})   # doctest: +SKIP
    """
    try:
        import onnxruntime
    except ImportError:
        raise ModuleNotFoundError("running ONNX files needs onnxruntime: pip install 'cosmic-fx[export]'") from None
    path = Path(path)
    if not path.is_file():
        raise CorruptFileError(f"{path}: no such file")
    try:
        return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CorruptFileError(f"{path} is not a loadable ONNX model ({first}); it may be truncated or corrupt, "
                               "export it again") from None


# ----------------------------------------------------------------------------- adapters
def _adapter_tensors(tm: nn.Module) -> dict[str, torch.Tensor]:
    from .modules import QuantumClassicalInterface

    out = {}
    for mname, module in tm.named_modules():
        if isinstance(module, QuantumClassicalInterface):
            for pname, p in module.named_parameters():
                out[f"{mname}.{pname}"] = p
    return out


def _base_fingerprint(tm: nn.Module) -> str:
    """sha256 of the base model's weights and buffers (everything but the adapter), in a fixed order."""
    adapter = set(_adapter_tensors(tm))
    h = hashlib.sha256()
    for name, t in tm.state_dict().items():
        if name in adapter:
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def _save_adapter(tm: nn.Module, path: Path) -> Path:
    from safetensors.torch import save_file

    from . import __version__
    from .transform import transform_info

    info = transform_info(tm)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in _adapter_tensors(tm).items()}
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory; adapter files go into a directory")
    path.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": ADAPTER_FORMAT,
        "format_version": ADAPTER_VERSION,
        "cosmic_fx_version": __version__,
        "torch_version": torch.__version__.split("+")[0],
        "base_model_class": type(tm).__name__,
        "transform_path": info.path,
        "config": info.config.to_options(),
        "rewritten": list(info.rewritten),
        "sites": [[name, kind, width] for name, kind, width, _, _ in info.sites],
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in tensors.items()},
        "base_fingerprint": _base_fingerprint(tm),
    }
    save_file(tensors, str(path / ADAPTER_WEIGHTS), metadata={"format": "pt", "cosmic_fx": f"{ADAPTER_FORMAT} v{ADAPTER_VERSION}"})
    (path / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return path


def _read_adapter_config(folder: Path) -> dict[str, Any]:
    file = folder / ADAPTER_CONFIG
    if not file.is_file():
        raise CorruptFileError(f"{folder}: no {ADAPTER_CONFIG} there; pass the directory written by "
                               "cosmic_fx.export(..., format='adapter')")
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise CorruptFileError(f"{file} is not valid JSON ({err}); it may be truncated or corrupt, export the "
                               "adapter again") from None
    if not isinstance(meta, dict) or meta.get("format") != ADAPTER_FORMAT:
        raise CorruptFileError(f"{file} is not a cosmic_fx adapter config (expected \"format\": \"{ADAPTER_FORMAT}\")")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > ADAPTER_VERSION:
        raise CorruptFileError(f"{file} has adapter format version {version!r}; this cosmic_fx reads version "
                               f"{ADAPTER_VERSION} (upgrade cosmic_fx to load it)")
    for key in ("config", "transform_path", "rewritten", "tensors"):
        if key not in meta:
            raise CorruptFileError(f"{file} lacks the {key!r} entry; it is incomplete, export the adapter again")
    return meta


def _read_adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = folder / ADAPTER_WEIGHTS
    if not file.is_file():
        raise CorruptFileError(f"{folder}: no {ADAPTER_WEIGHTS} there; the adapter is incomplete")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise CorruptFileError(f"{file} is not a valid safetensors file ({err}); it may be truncated or corrupt, "
                               "export the adapter again") from None


def load_adapter(base_model: nn.Module, path: str | os.PathLike, *, check_base: bool = True) -> nn.Module:
    """Rebuild a transformed model from a fresh base model and adapter files.

    The base model is transformed with the adapter's config (it stays untouched; the result shares its
    weights) and the QCI parameters are loaded from the safetensors file (no pickle).

    Args:
        base_model: a model built by the same code as the one the adapter was exported from.
        path: the adapter directory (or either of its two files).
        check_base: warn when the base weights differ from those the adapter was exported with
            (then outputs differ from the exported model's).

    Returns:
        the transformed model, as :func:`cosmic_fx.transform` returns it.

    Raises:
        CorruptFileError: the files are missing, truncated, corrupt or not an adapter.
        ValueError: the adapter does not fit ``base_model`` (other sites, shapes or parameter names).

    Example:
        >>> cosmic_fx.export(tm, x, "adapter_dir", format="adapter")   # doctest: +SKIP
        >>> tm2 = cosmic_fx.load_adapter(DigitsCNN(), "adapter_dir")   # doctest: +SKIP
    """
    from .transform import transform, transform_info

    folder = Path(path)
    if folder.is_file():
        folder = folder.parent
    elif not folder.exists():
        raise CorruptFileError(f"{folder}: no such adapter directory")
    if not isinstance(base_model, nn.Module):
        raise TypeError(f"cosmic_fx.load_adapter expects an nn.Module; got {type(base_model).__name__}")
    if transform_info(base_model) is not None:
        raise ValueError("load_adapter needs the base model, not a transformed one (it would get two QCIs per site)")
    meta = _read_adapter_config(folder)
    try:
        config = CosmicConfig.from_options(meta["config"])
    except (ValueError, TypeError) as err:
        raise CorruptFileError(f"{folder / ADAPTER_CONFIG} holds an invalid config: {err}") from None
    tensors = _read_adapter_weights(folder)
    with torch.random.fork_rng(devices=[]):
        tm = transform(base_model, config)
    info = transform_info(tm)
    if info.path != meta["transform_path"] or list(info.rewritten) != list(meta["rewritten"]):
        raise ValueError(
            f"this adapter does not fit {type(base_model).__name__}: it was exported for a "
            f"{meta.get('base_model_class', '?')} whose rewritten sites are {meta['rewritten']} "
            f"({meta['transform_path']}), this model's are {info.rewritten} ({info.path}). Pass a model built by "
            "the same code."
        )
    params = _adapter_tensors(tm)
    if set(params) != set(tensors):
        missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        raise ValueError(f"the adapter's tensors do not match the model's QCI parameters (missing: {missing}, "
                         f"unexpected: {extra})")
    with torch.no_grad():
        for name, p in params.items():
            t = tensors[name]
            if t.shape != p.shape:
                raise ValueError(f"adapter tensor {name} has shape {tuple(t.shape)}; the model's parameter has "
                                 f"{tuple(p.shape)} (was the base model built with other sizes?)")
            p.copy_(t)
    if check_base and meta.get("base_fingerprint") and meta["base_fingerprint"] != _base_fingerprint(tm):
        warnings.warn(
            f"the base model's weights differ from those the adapter at {folder} was exported with, so outputs "
            "differ from the exported model's. That is expected when the base is a different checkpoint; if the "
            "base weights were trained together with the adapter, load those weights first.",
            stacklevel=2,
        )
    return tm


# ----------------------------------------------------------------------------- CLI
_EXPORT_EPILOG = """\
examples:
  cosmic-fx export cosmic_fx.models:DigitsCNN --input-shape 8,1,8,8 --format pt2 -o digits.pt2
  cosmic-fx export my_model.py:build --input-shape 4,64 --format onnx -o model.onnx
  cosmic-fx export my_model.py:build --input-shape 4,64 --weights trained.safetensors --format adapter -o adapter/

After writing, the file is loaded back and checked against the in-memory model at another batch size.
"""


def _cmd_export(args: argparse.Namespace) -> int:
    from .cli import CLIError
    from .inspect import model_and_inputs
    from .transform import transform, transform_info

    model, inputs, config = model_and_inputs(args)
    try:
        with torch.random.fork_rng(devices=[]):
            tm = transform(model, config)
        written = export(tm, inputs, args.output, args.format, dynamic_batch=not args.static_batch)
    except (ExportError, ValueError, TypeError, ModuleNotFoundError, OSError) as err:
        raise CLIError(str(err)) from None
    info = transform_info(tm)
    size = sum(f.stat().st_size for f in ([written] if written.is_file() else written.iterdir()) if f.is_file())
    print(f"wrote {written} ({args.format}, {size:,} bytes): {type(model).__name__} with cosmic "
          f"({len(info.rewritten)} of {len(info.sites)} sites rewritten: {', '.join(info.rewritten) or 'none'})")
    check = _verify(tm, model, inputs, written, args)
    print(check)
    return 0


def _verify(tm: nn.Module, model: nn.Module, inputs: tuple, written: Path, args: argparse.Namespace) -> str:
    """Load what was written and compare with the in-memory model (another batch size when dynamic)."""
    from .cli import CLIError

    batch = inputs[0].shape[0] + 3 if inputs and inputs[0].dim() >= 1 and not args.static_batch else None
    if batch is not None:
        torch.manual_seed(args.seed + 1)
        inputs = tuple(torch.randint(0, max(args.int_high, 1), (batch, *x.shape[1:])) if args.input_dtype == "int64"
                       else torch.rand((batch, *x.shape[1:]), dtype=x.dtype) for x in inputs)
    modes = [(m, m.training) for m in tm.modules()]
    tm.eval()
    try:
        with torch.no_grad():
            expected = tm(*inputs)
            if args.format == "pt2":
                got, how = load_program(written).module()(*inputs), "torch.export.load"
            elif args.format == "onnx":
                try:
                    session = load_onnx(written)
                except ModuleNotFoundError:
                    return "not checked: onnxruntime is not installed"
                feed = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)}
                got, how = torch.from_numpy(session.run(None, feed)[0]), "onnxruntime"
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    reloaded = load_adapter(model, written).eval()
                got, how = reloaded(*inputs), "load_adapter on the base model"
    except CorruptFileError as err:
        raise CLIError(f"the written file does not load back: {err}") from None
    finally:
        for m, training in modes:
            m.training = training
    expected = expected[0] if isinstance(expected, (tuple, list)) else expected
    got = got[0] if isinstance(got, (tuple, list)) else got
    diff = (got.float() - expected.float()).abs().max().item()
    shape = "x".join(map(str, inputs[0].shape))
    if diff > 1e-4:
        raise CLIError(f"the written file does not reproduce the model: max |difference| {diff:.3g} on input {shape}")
    return f"checked: reloaded with {how}, input {shape}: max |difference| vs the in-memory model = {diff:.3g}"


def register_cli(subparsers) -> None:
    """Add ``cosmic-fx export``."""
    from .inspect import add_model_arguments

    p = subparsers.add_parser(
        "export", help="export the transformed model: .pt2, ONNX, or adapter files",
        description="Transform a model with cosmic_fx and export it (cosmic_fx.export).",
        epilog=_EXPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(p)
    p.add_argument("--format", choices=FORMATS, required=True, help="pt2 (torch.export), onnx, or adapter (directory)")
    p.add_argument("-o", "--output", required=True, help="the file (pt2, onnx) or directory (adapter) to write")
    p.add_argument("--static-batch", action="store_true", help="keep the example's batch size fixed")
    p.set_defaults(func=_cmd_export)
