"""The argument check every public entry point runs first: the model must be an ``nn.Module``."""

from __future__ import annotations

import inspect

from torch import nn

__all__ = ["check_module"]


def check_module(obj: object, where: str) -> None:
    """Raise a ``TypeError`` naming what to pass when ``obj`` is not an ``nn.Module`` instance.

    Called before anything else reads the argument (``model.modules()``, ``model._orig_mod``), so
    that a function, a class or a tensor gets this message rather than an ``AttributeError``.

    Args:
        obj: what the user passed as the model.
        where: the public function, as the user called it (``"cosmic_fx.compile"``).

    Example:
        >>> check_module(nn.Linear(2, 2), "cosmic_fx.transform")
        >>> check_module(lambda x: x * 2, "cosmic_fx.compile")
        Traceback (most recent call last):
        ...
        TypeError: cosmic_fx.compile expects an nn.Module; got function <lambda>. ...
    """
    if isinstance(obj, nn.Module):
        return
    if inspect.isclass(obj):
        got = f"the class {obj.__name__}"
        hint = f"Pass an instance: {obj.__name__}(...)." if issubclass(obj, nn.Module) else _WRAP
    elif callable(obj) and hasattr(obj, "__name__"):
        got = f"{type(obj).__name__} {obj.__name__}"
        hint = _WRAP + " To compile a plain function, use torch.compile(fn)."
    else:
        got = type(obj).__name__
        hint = _WRAP
    raise TypeError(f"{where} expects an nn.Module; got {got}. {hint}")


_WRAP = ("Pass the model itself (an nn.Module instance, e.g. nn.Sequential(...) or a Hugging Face model), or wrap "
         "the computation in an nn.Module whose forward calls it.")
