"""Load exported files with clear errors: :func:`load_program` (``.pt2``, refusing anything that
needs unpickling beyond plain tensors) and :func:`load_onnx` (an onnxruntime session). Both raise
:class:`CorruptFileError` for a file that is missing, truncated, corrupt, of the wrong kind or unsafe.
"""

from __future__ import annotations

import io
import json
import os
import warnings
import zipfile
from pathlib import Path

import torch

from .scoped import quiet_torch_logs

__all__ = ["CorruptFileError", "load_onnx", "load_program"]


class CorruptFileError(ValueError):
    """A file to load is truncated, corrupt, of the wrong kind, or would need unsafe unpickling."""


def load_program(path: str | os.PathLike):
    """Load a ``.pt2`` file with ``torch.export.load``, refusing anything that needs unpickling.

    ``torch.export.load`` may unpickle some entries with ``weights_only=False``; this function first
    checks every pickled entry of the archive with ``torch.load(weights_only=True)`` (plain tensors
    only) and refuses Python objects, so a crafted file cannot run code.

    Args:
        path: a ``.pt2`` file written by :func:`cosmic_fx.export` or ``torch.export.save``.

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
        with warnings.catch_warnings(), quiet_torch_logs("torch.export", "torch._export"):
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
        path: a ``.onnx`` file written by :func:`cosmic_fx.export`.

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

