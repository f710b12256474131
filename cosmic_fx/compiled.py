"""The face of a :func:`cosmic_fx.compile` result: it answers like the model it compiles.

``torch.compile`` wraps a module in an ``OptimizedModule``, which differs from the model in three ways
that break training code written for the model itself (the Hugging Face ``Trainer`` among them):

* its ``forward`` is ``(*args, **kwargs)`` and its class is ``OptimizedModule``: code that reads the
  signature (the Trainer's ``remove_unused_columns`` keeps only the batch keys ``forward`` names) sees no
  parameter at all, and code that reads the class (the Trainer's ``find_labels``: without ``labels``
  there, ``evaluate()`` computes no loss) sees neither the name nor the labels of the model;
* its ``state_dict()`` keys start with ``_orig_mod.``: a checkpoint of the compiled model does not
  load into the model, and ``save_pretrained(state_dict=compiled.state_dict())`` cannot match the
  tied weights it knows by their own names;
* nothing else, but loading a checkpoint restores calibrated CDG's frozen set at once
  (``requires_grad_(False)``), and an optimizer built after loading from the parameters that require
  grad (the Trainer's ``create_optimizer`` does this when it resumes) would leave the frozen
  parameters out for good, while the uninterrupted run's optimizer holds them.

:func:`present_as_model` fixes the three on the wrapper only (the model is untouched): the wrapper's
``forward`` reports the model's signature, its class is a subclass of ``OptimizedModule`` named after
the model's class whose ``forward`` has that signature too, its ``state_dict`` has the model's own keys
(``load_state_dict`` takes both those and ``_orig_mod.`` keys), and a checkpoint loaded through it thaws
the parameters CDG holds frozen until the next forward, when they are frozen again, so that an optimizer
built in between holds every parameter, as it did before the checkpoint.
"""

from __future__ import annotations

import inspect
import weakref
from typing import Any

from torch import nn

__all__ = ["ORIG_MOD", "is_cosmic_compiled", "present_as_model"]

ORIG_MOD = "_orig_mod"
_MARK = "_cosmic_compiled"


def is_cosmic_compiled(model: nn.Module) -> bool:
    """Whether ``model`` is a :func:`cosmic_fx.compile` result (not a plain ``torch.compile`` one)."""
    return bool(model.__dict__.get(_MARK, False))


def present_as_model(compiled: nn.Module, model: nn.Module) -> nn.Module:
    """Make the ``OptimizedModule`` ``compiled`` answer like ``model`` (its transformed model): the
    forward signature, the state-dict keys, and the frozen set of a loaded checkpoint (see the module
    docstring). Returns ``compiled``.

    Args:
        compiled: what ``torch.compile`` returned.
        model: the model it compiles, with the ``forward`` to present (the transformed model; the module
            inside a DDP wrapper).

    Example:
        >>> import inspect, torch, cosmic_fx
        >>> cm = cosmic_fx.compile(torch.nn.Linear(4, 16), cosmic_fx.CosmicConfig(lower="aot_eager"))
        >>> str(inspect.signature(cm.forward)), list(cm.state_dict())[:2]
        ('(input: torch.Tensor) -> torch.Tensor', ['weight', 'bias'])
    """
    signature = inspect.signature(model.forward)
    forward = compiled.__dict__.get("forward")
    if inspect.isfunction(forward):  # dynamo's wrapper of the model's __call__: (*args, **kwargs)
        forward.__signature__ = signature
    compiled.__dict__["__signature__"] = signature  # inspect.signature(compiled) too
    compiled.__class__ = _face_class(type(compiled), type(model), signature)
    compiled.__dict__[_MARK] = True
    compiled.register_state_dict_post_hook(_strip_orig_mod)
    compiled.register_load_state_dict_pre_hook(_add_orig_mod)
    freezer = _FrozenUntilForward(model)
    compiled.register_load_state_dict_post_hook(freezer.thaw)  # adds the pre-hook only while needed
    return compiled


def _face_class(base: type, model_class: type, signature: inspect.Signature) -> type:
    """A subclass of ``OptimizedModule`` named after the model's class, whose class-level ``forward`` has
    the model's signature: the Trainer reads ``model.__class__`` (``find_labels`` for the label names
    that make ``evaluate()`` compute a loss, ``can_return_loss``, the class name for causal-LM label
    smoothing). The instance's own ``forward`` (dynamo's) shadows the class one, which only forwards."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.__dict__["forward"](*args, **kwargs)

    this = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    forward.__signature__ = signature.replace(parameters=[this, *signature.parameters.values()])
    name = model_class.__name__
    return type(name, (base,), {"forward": forward, "__module__": __name__, "__qualname__": name,
                                "__doc__": f"torch.compile wrapper presenting itself as {model_class.__qualname__}."})


def _rename(mapping: dict, old_prefix: str, new_prefix: str) -> None:
    """Rename, in place and in order, the keys of ``mapping`` under ``old_prefix`` to ``new_prefix``."""
    moved = [(k, mapping.pop(k)) for k in list(mapping) if k.startswith(old_prefix)]
    for k, v in moved:
        mapping[new_prefix + k[len(old_prefix):]] = v


def _strip_orig_mod(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """State-dict post hook: ``<prefix>_orig_mod.<key>`` -> ``<prefix><key>`` (the model's own keys)."""
    _rename(state_dict, f"{prefix}{ORIG_MOD}.", prefix)
    meta = getattr(state_dict, "_metadata", None)
    if meta is not None:  # module versions, keyed by the module path without the trailing dot
        own = prefix[:-1]
        inner = f"{prefix}{ORIG_MOD}"
        if inner in meta:
            meta[own] = meta.pop(inner)
        _rename(meta, inner + ".", prefix)


def _add_orig_mod(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any, strict: bool,
                  missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    """Load-state-dict pre hook: the model's own keys (and ``_orig_mod.`` ones, as before) load."""
    inner = f"{prefix}{ORIG_MOD}."
    ours = [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]
    moved = [(k, state_dict.pop(k)) for k in ours]
    for k, v in moved:
        state_dict[inner + k[len(prefix):]] = v
    meta = getattr(state_dict, "_metadata", None)
    if meta is not None:
        for k in [k for k in meta if (k == prefix[:-1] or k.startswith(prefix)) and not k.startswith(inner[:-1])]:
            rest = k[len(prefix):] if k != prefix[:-1] else ""
            meta.setdefault(inner[:-1] + (f".{rest}" if rest else ""), meta[k])


class _FrozenUntilForward:
    """Thaws, after a checkpoint is loaded through the wrapper, the cosmic-trained parameters that do
    not require grad (those CDG holds frozen), and freezes them again at the next forward.

    The forward pre-hook that refreezes is registered only while parameters are pending and removed by
    its own call: a module with a forward pre-hook takes ``nn.Module``'s slower hook path on every call."""

    def __init__(self, model: nn.Module) -> None:
        self._model = weakref.ref(model)
        self._pending: list[weakref.ref] = []
        self._handle: Any = None

    def thaw(self, module: nn.Module, incompatible_keys: Any) -> None:
        from .runtime import runtime_of

        model = self._model()
        rt = runtime_of(model) if model is not None else None
        if rt is None:
            return
        frozen = [p for n, p in model.named_parameters() if rt.index_of(n) is not None and not p.requires_grad]
        for p in frozen:
            p.requires_grad_(True)
        self._pending = [weakref.ref(p) for p in frozen]
        if frozen and self._handle is None:
            self._handle = module.register_forward_pre_hook(self.refreeze)

    def refreeze(self, module: nn.Module, args: Any) -> None:
        from .runtime import runtime_of

        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if not self._pending:
            return
        model = self._model()
        rt = runtime_of(model) if model is not None else None
        if rt is None or (rt.mode is None and not rt.num_hooked):  # detached since: it thawed everything
            self._pending = []
            return
        for ref in self._pending:
            p = ref()
            if p is not None:
                p.requires_grad_(False)
        self._pending = []
