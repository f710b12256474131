"""``cosmic_fx.compile``: transform a model and ``torch.compile`` it with the ``cosmic`` backend bound to
its runtime (re-exported as :func:`cosmic_fx.compile`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .backend import cosmic_backend
from .config import CosmicConfig
from .runtime import runtime_of
from .transform import as_config, transform, transform_info

__all__ = ["compile"]


def compile(model: nn.Module, config: CosmicConfig | None = None, **compile_kwargs: Any) -> nn.Module:
    """Transform ``model`` (QCI + CSC) and ``torch.compile`` it with the ``cosmic`` backend bound to
    the model's runtime.

    Args:
        model: the model (left untouched); or a model returned by :func:`cosmic_fx.transform`, also
            wrapped in ``DistributedDataParallel`` (then compiled as it is, with its runtime: e.g.
            after loading a checkpoint into it).
        config: a :class:`CosmicConfig` (default preset when omitted; for a transformed model, omit
            it or pass the transform's, with any ``lower``).
        **compile_kwargs: passed to ``torch.compile`` (``dynamic=``, ``fullgraph=``, ...).

    Returns:
        the ``torch.compile`` wrapper (an ``OptimizedModule``; the transformed model is its ``_orig_mod``),
        made to answer like the model (:mod:`cosmic_fx.compiled`): ``inspect.signature(result.forward)``
        is the model's, ``result.state_dict()`` has the model's own keys (no ``_orig_mod.`` prefix), and
        a checkpoint loaded through it restores calibrated CDG's frozen set at the next forward.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        >>> cm = cosmic_fx.compile(model, cosmic_fx.CosmicConfig(lower="aot_eager"))
        >>> cm(torch.randn(2, 8)).shape   # doctest: +SKIP
        torch.Size([2, 4])
    """
    import functools

    from .compiled import present_as_model
    from .runtime import _unwrap
    from .runtime.distributed import check_not_wrapped

    if config is not None:
        config = as_config(config, "cosmic_fx.compile")
    for key in ("backend", "options", "mode"):
        if key in compile_kwargs:
            raise TypeError(f"cosmic_fx.compile sets torch.compile's {key!r} itself; put settings in the CosmicConfig")
    check_not_wrapped(model, "cosmic_fx.compile")
    inner = _unwrap(model)
    if transform_info(inner) is not None:
        # transform(model), or DDP(transform(model)): compile it as it is, with its runtime
        target, runtime = model, runtime_of(inner)
    else:
        target = transform(model, config or CosmicConfig())
        runtime = runtime_of(target)
    options = runtime.config if config is None else config
    if runtime.config.hooks_enabled:
        runtime.activate("compiled")  # now, so that eager regions after a graph break are treated alike
    backend = functools.partial(cosmic_backend, runtime=runtime, options=options)
    compiled = torch.compile(target, backend=backend, **compile_kwargs)
    # training code written for the model (the Hugging Face Trainer) reads its forward signature and
    # state-dict keys, and builds its optimizer after loading a checkpoint: see cosmic_fx.compiled
    return present_as_model(compiled, _unwrap(target))
