"""Adapter files: the QCI parameters of a transformed model (``adapter_model.safetensors``, no pickle)
and its config and what the adapter fits (``adapter_config.json``). ``cosmic_fx.export(...,
format="adapter")`` writes them; :func:`load_adapter` rebuilds the transformed model from a fresh copy
of the base model.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checks import check_module
from .config import CosmicConfig
from .loading import CorruptFileError

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "load_adapter"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FORMAT = "cosmic_fx.adapter"
ADAPTER_VERSION = 1


def _adapter_tensors(tm: nn.Module) -> dict[str, torch.Tensor]:
    from .modules import QuantumClassicalInterface

    out = {}
    for mname, module in tm.named_modules():
        if isinstance(module, QuantumClassicalInterface):
            for pname, p in module.named_parameters():
                out[f"{mname}.{pname}"] = p
    return out


def _sha256(tensors) -> str:
    """sha256 over (name, dtype, shape, bytes) of each ``(name, tensor)`` pair, in the order given."""
    h = hashlib.sha256()
    for name, t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # a 0-d tensor (QCI beta) has no byte view
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def _base_fingerprint(tm: nn.Module) -> str:
    """sha256 of the base model's weights and buffers (everything but the adapter), in a fixed order."""
    from .runtime import STATE_NAME

    adapter = set(_adapter_tensors(tm))
    # QCIs and the CDG/CCE training state (cosmic_state.*) are not the base model
    return _sha256((name, t) for name, t in tm.state_dict().items()
                   if name not in adapter and not name.startswith(STATE_NAME + "."))


def _tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the adapter's own tensors (sorted by name), stored in the config to catch corrupt weights."""
    return _sha256(sorted(tensors.items()))


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
        "sites": [[s.name, s.kind, s.width] for s in info.sites],
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                    for k, v in tensors.items()},
        "base_fingerprint": _base_fingerprint(tm),
        "tensors_sha256": _tensors_checksum(tensors),
    }
    save_file(tensors, str(path / ADAPTER_WEIGHTS),
              metadata={"format": "pt", "cosmic_fx": f"{ADAPTER_FORMAT} v{ADAPTER_VERSION}"})
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


def _verify_checksum(folder: Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Compare the loaded tensors with the sha256 the exporter stored (safetensors has no checksum of its own:
    flipped bits in the data load silently)."""
    expected = meta.get("tensors_sha256")
    if expected is None:
        warnings.warn(
            f"{folder / ADAPTER_CONFIG} has no 'tensors_sha256' (it was exported by an older cosmic_fx), so the "
            f"integrity of {ADAPTER_WEIGHTS} cannot be checked; export the adapter again to add the checksum.",
            stacklevel=3,
        )
        return
    actual = _tensors_checksum(tensors)
    if actual != expected:
        raise CorruptFileError(
            f"{folder / ADAPTER_WEIGHTS} fails its checksum: its tensors' sha256 is {actual}, but "
            f"{ADAPTER_CONFIG} recorded {expected} when the adapter was exported. The file was changed or corrupted "
            "after export (e.g. bit flips in storage or transfer); copy it again from its source or export the "
            "adapter again."
        )


def load_adapter(base_model: nn.Module, path: str | os.PathLike, *, check_base: bool = True) -> nn.Module:
    """Rebuild a transformed model from a fresh base model and adapter files.

    The base model is transformed with the adapter's config (it stays untouched; the result shares its
    weights) and the QCI parameters are loaded from the safetensors file (no pickle), after checking them
    against the sha256 stored in ``adapter_config.json`` (``tensors_sha256``). Adapters exported before
    that field existed still load, with a warning that their weights cannot be verified.

    Args:
        base_model: a model built by the same code as the one the adapter was exported from.
        path: the adapter directory (or either of its two files).
        check_base: warn when the base weights differ from those the adapter was exported with
            (then outputs differ from the exported model's).

    Returns:
        the transformed model, as :func:`cosmic_fx.transform` returns it.

    Raises:
        CorruptFileError: the files are missing, truncated, corrupt (including a weights file whose
            tensors fail the stored checksum) or not an adapter.
        ValueError: the adapter does not fit ``base_model`` (other sites, shapes or parameter names).

    Example:
        >>> cosmic_fx.export(tm, x, "adapter_dir", format="adapter")   # doctest: +SKIP
        >>> tm2 = cosmic_fx.load_adapter(DigitsCNN(), "adapter_dir")   # doctest: +SKIP
    """
    from .transform import transform, transform_info

    check_module(base_model, "cosmic_fx.load_adapter")
    folder = Path(path)
    if folder.is_file():
        folder = folder.parent
    elif not folder.exists():
        raise CorruptFileError(f"{folder}: no such adapter directory")
    if transform_info(base_model) is not None:
        raise ValueError("load_adapter needs the base model, not a transformed one (it would get two QCIs per site)")
    meta = _read_adapter_config(folder)
    try:
        config = CosmicConfig.from_options(meta["config"])
    except (ValueError, TypeError) as err:
        raise CorruptFileError(f"{folder / ADAPTER_CONFIG} holds an invalid config: {err}") from None
    tensors = _read_adapter_weights(folder)
    _verify_checksum(folder, meta, tensors)
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

