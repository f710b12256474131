"""`CosmicState`: the submodule through which a runtime's state travels with ``model.state_dict()``.

:func:`cosmic_fx.transform` registers one as ``cosmic_state`` on the model it returns. Its entries are
plain tensors (``cosmic_state.steps``, ``cosmic_state.cdg.frozen``, ...; ``cosmic_state.meta`` is the
JSON of the format version, the config and the parameter names as bytes), so
``safetensors.torch.save_file(model.state_dict(), ...)`` and Hugging Face ``save_pretrained`` work
on a transformed model. Loading checks the state against the model: another config, other
parameters or a newer format are errors that name the mismatch; missing or unexpected ``cosmic_state``
keys follow PyTorch's ``strict`` semantics.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import torch
from torch import nn

from ..config import CosmicConfig
from .prefix import PREFIX_STATE_KEYS

__all__ = ["STATE_KEYS", "CosmicState", "check_meta", "encode_meta", "saved_config"]

FORMAT = "cosmic_fx.runtime"
FORMAT_VERSION = 2  # 2: prefix CDG's keys
STATE_KEYS = (
    "meta", "steps", "protected", "protected_known",
    "readings.value", "readings.low", "readings.has",
    "cdg.low_count", "cdg.last_e", "cdg.frozen", "cdg.sets_used", "cdg.since_decision", "cdg.event_steps",
    "cdg.event_sets",
    *PREFIX_STATE_KEYS,
    "cce.mean_e",
)
_NOT_STATE = ("lower",)  # the lowering is the backend's business: a checkpoint resumes under any


def _config_options(config: CosmicConfig) -> dict[str, Any]:
    return {k: v for k, v in config.to_options().items() if k not in _NOT_STATE}


def encode_meta(runtime) -> torch.Tensor:
    from .. import __version__

    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "cosmic_fx_version": __version__,
            "config": _config_options(runtime.config), "params": runtime.names}
    return torch.tensor(list(json.dumps(meta, sort_keys=True).encode("utf-8")), dtype=torch.uint8)


def _decode_meta(tensor: torch.Tensor) -> dict[str, Any]:
    try:
        meta = json.loads(bytes(tensor.to(torch.uint8).cpu().tolist()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise RuntimeError(f"cosmic_state.meta is not valid cosmic runtime metadata ({err}); the checkpoint "
                           "may be corrupt") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise RuntimeError("cosmic_state.meta is not cosmic runtime metadata (expected format "
                           f"{FORMAT!r}); was this checkpoint written by cosmic_fx?")
    return meta


def saved_config(tensor: torch.Tensor) -> dict[str, Any]:
    """The config options saved in a ``cosmic_state.meta`` tensor (every field but ``lower``), for
    ``CosmicConfig.from_options``."""
    config = _decode_meta(tensor).get("config")
    if not isinstance(config, dict):
        raise RuntimeError("cosmic_state.meta holds no config; the checkpoint may be corrupt")
    return dict(config)


def check_meta(runtime, tensor: torch.Tensor) -> None:
    """Raise a ``RuntimeError`` naming what differs between saved state and this runtime."""
    meta = _decode_meta(tensor)
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise RuntimeError(
            f"the cosmic runtime state was written in format version {version!r} by cosmic_fx "
            f"{meta.get('cosmic_fx_version', '?')}; this cosmic_fx reads version {FORMAT_VERSION}. Upgrade "
            "cosmic_fx to resume it."
        )
    mine, saved = _config_options(runtime.config), dict(meta.get("config", {}))
    # a field added after the checkpoint was written: the run that wrote it had the field's default
    for k, default in _config_options(CosmicConfig()).items():
        saved.setdefault(k, default)
    diff = [f"{k}={saved.get(k)!r} in the checkpoint vs {mine.get(k)!r} here"
            for k in sorted(set(mine) | set(saved)) if mine.get(k) != saved.get(k)]
    if diff:
        raise RuntimeError(
            "the checkpoint's cosmic state was saved with another CosmicConfig: " + "; ".join(diff) + ". "
            "Transform the model with the checkpoint's config (CosmicConfig.from_options(...) of those values) "
            "to resume the run, or drop the 'cosmic_state.' keys from the state dict to start CDG/CCE afresh."
        )
    names = list(meta.get("params", []))
    if names != runtime.names:
        missing = [n for n in runtime.names if n not in names]
        extra = [n for n in names if n not in runtime.names]
        detail = f"missing in the checkpoint: {missing[:5]}; not in this model: {extra[:5]}" if missing or extra \
            else "same names in another order"
        raise RuntimeError(
            f"the checkpoint's cosmic state covers other parameters than this model ({detail}). Rebuild and "
            "transform the model exactly as for the run that saved it (same architecture, same config)."
        )


class CosmicState(nn.Module):
    """Holds a model's :class:`~cosmic_fx.runtime.CosmicRuntime` and saves/loads its state.

    It has no parameters or buffers of its own; ``model.state_dict()`` gets the runtime's tensors
    under ``cosmic_state.`` and ``model.load_state_dict()`` restores them (frozen parameters
    included), so a resumed run continues the run that was interrupted.
    """

    def __init__(self, runtime) -> None:
        super().__init__()
        self.runtime = runtime

    def forward(self, *args: Any) -> None:  # pragma: no cover - never called
        raise RuntimeError("CosmicState holds state only; it is not part of the forward pass")

    def extra_repr(self) -> str:
        rt = self.runtime
        return f"steps={rt.steps}, mode={rt.mode}, params={len(rt.names)}, frozen={len(rt.cdg.frozen)}"

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        for key, value in self.runtime.state_dict().items():
            destination[prefix + key] = value

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        mine = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if not mine:
            missing_keys.extend(prefix + k for k in STATE_KEYS)
            return
        try:
            missing, unexpected = self.runtime.load_state_dict(mine, strict=False)
        except RuntimeError as err:
            error_msgs.append(str(err))
            return
        missing_keys.extend(prefix + k for k in missing)
        unexpected_keys.extend(prefix + k for k in unexpected)

    # copies and pickles get their own runtime (same config and state), bound to the copy's parameters
    def __deepcopy__(self, memo: dict) -> CosmicState:
        from .core import CosmicRuntime

        rt = self.runtime
        new = CosmicRuntime(rt.config, transformed=rt.transformed)
        params = rt._params()
        model = rt.model
        copied_model = memo.get(id(model)) if model is not None else None
        if rt.bound and all(p is not None and id(p) in memo for p in params) and copied_model is not None:
            new._bind(copied_model, [(n, memo[id(p)]) for n, p in zip(rt.names, params)], rt._index)
            new.load_state_dict(rt.state_dict())
            new.set_protected(rt.protected)
        elif rt.bound:
            new._pending_state = rt.state_dict()
        out = self.__class__.__new__(self.__class__)
        memo[id(self)] = out
        out.__dict__.update(copy.deepcopy({k: v for k, v in self.__dict__.items() if k != "runtime"}, memo))
        out.runtime = new
        return out

    def __getstate__(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k != "runtime"}
        rt = self.runtime
        state["_cosmic_runtime"] = {"config": rt.config, "transformed": rt.transformed,
                                    "state": rt.state_dict() if rt.bound else rt._pending_state}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        from .core import CosmicRuntime

        saved = state.pop("_cosmic_runtime")
        self.__dict__.update(state)
        self.runtime = CosmicRuntime(saved["config"], transformed=saved["transformed"])
        self.runtime._pending_state = saved["state"]
