"""The module-swap path of :func:`cosmic_fx.transform`: QCI and CSC applied by forward hooks.

For a model that does not symbolic-trace, each site's layer stays where it is, as the object it
was (in a structural copy of the model that shares its parameters), and a forward hook applies the
site's QCI (then its CSC) to the layer's output. The QCIs are registered once, under
``cosmic_qci.<site>`` on the result, as on the traced path, so the ``state_dict`` keys are the
model's own plus the QCIs'.

Why hooks rather than a wrapper around the layer (peft's ``base_layer``)? Measured on tiny HF
GPT-2, T5, ViT and ``nn.TransformerEncoder`` (docs/module_swap.md): a wrapper renames every
wrapped weight (``fc1.base_layer.weight``), breaks ``tie_weights()`` of GPT-2 and T5 (``KeyError:
attribute 'weight' already exists``) and ``isinstance(..., nn.Linear)`` checks, and in
``nn.TransformerEncoder`` runs 4 of 6 QCIs in training (``nn.MultiheadAttention`` never calls its
``out_proj``) and 0 of 6 in eval under ``no_grad`` (the fused fast path skips the layers). Hooks
keep the names and classes, run 6 of 6 in both modes (``TransformerEncoderLayer`` leaves its fast
path when hooks are attached; the MHA's QCI is a hook on the MHA itself, applied to its output
item 0, which is ``out_proj``'s output), and compile to the same graphs as the plain model.
"""

from __future__ import annotations

import inspect
import types

from torch import nn

from .modules import CosmicStateCompression, QuantumClassicalInterface, make_csc, make_qci
from .outputs import map_primary
from .sites import Site, apply_at

__all__ = ["OutputCSCForward", "SiteHook", "attach_output_csc", "attach_sites", "register_nested"]

QCI_ROOT = "cosmic_qci"
CSC_ROOT = "cosmic_csc"


class SiteHook:
    """Forward hook that applies a site's QCI, then its CSC, to the layer's output (or to item
    ``output_index`` of it).

    Args:
        qci: the site's QCI, or ``None``.
        csc: the site's CSC, or ``None``.
        output_index: the layer returns a tuple whose item ``output_index`` is the site's output.
    """

    def __init__(self, qci: QuantumClassicalInterface | None, csc: CosmicStateCompression | None,
                 output_index: int | None = None) -> None:
        self.qci, self.csc, self.output_index = qci, csc, output_index

    def _apply(self, x):
        if self.qci is not None:
            x = self.qci(x)
        if self.csc is not None:
            x = self.csc(x)
        return x

    def __call__(self, module: nn.Module, args, output):
        return apply_at(output, self.output_index, self._apply)


class OutputCSCForward:
    """The model's ``forward`` on the module-swap path: the model's own forward, then CSC on the
    primary tensor of its output (same type).

    Installed as the instance's ``forward``, not as a forward hook: ``torch.compile(model)`` compiles
    ``forward`` and runs the model's own hooks outside that frame, so a hook became a compiled frame of
    its own, recompiled at every new batch size that ``forward``'s frame had already made dynamic (2
    recompiles where plain ``torch.compile`` has 1, in every module-swap model of the zoo). Inside
    ``forward`` the CSC is part of the model's graph, as on the traced path, and runs before every
    forward hook. An object rather than a closure, so that ``copy.deepcopy`` and pickling give the
    copy a forward that calls the copy; ``inspect.signature`` sees the model's own parameters and
    ``__code__`` is the model's forward's (Hugging Face ``generate()`` and ``torch.export`` read them).
    """

    def __init__(self, module: nn.Module, csc: CosmicStateCompression) -> None:
        self.module, self.csc = module, csc
        self.inner = module.__dict__.get("forward")  # a forward the instance already had, else the class's
        self.__signature__ = inspect.signature(module.forward)

    def _base(self):
        return self.inner if self.inner is not None else types.MethodType(type(self.module).forward, self.module)

    @property
    def __code__(self):
        """The model's own forward's code (``torch.export`` reads ``forward.__code__`` for source locations)."""
        return self._base().__code__

    def __call__(self, *args, **kwargs):
        module = self.module
        out = self.inner(*args, **kwargs) if self.inner is not None else type(module).forward(module, *args, **kwargs)
        return map_primary(out, self.csc)


def register_nested(root: nn.Module, target: str, module: nn.Module) -> None:
    """Register ``module`` at dotted path ``target`` under ``root``, creating empty parents.

    Example:
        >>> root = nn.Module(); register_nested(root, "cosmic_qci.blocks.0.fc", nn.Identity())
        >>> [name for name, _ in root.named_modules()][-1]
        'cosmic_qci.blocks.0.fc'
    """
    *parents, leaf = target.split(".")
    holder = root
    for part in parents:
        child = getattr(holder, part, None)
        if not isinstance(child, nn.Module):
            child = nn.Module()
            child.train(root.training)
            holder.add_module(part, child)
        holder = child
    module.train(root.training)
    holder.add_module(leaf, module)


def attach_sites(root: nn.Module, sites: list[Site], config) -> list[str]:
    """Give every qualifying site of ``root`` its QCI (and CSC when ``config.csc == "sites"``) through
    a forward hook on the layer; returns the names of the sites rewritten, in order.

    Args:
        root: the structural copy that will be returned (modified in place).
        sites: its module sites (:func:`cosmic_fx.sites.module_sites`).
        config: the :class:`~cosmic_fx.CosmicConfig`.

    Example:
        >>> from cosmic_fx import CosmicConfig
        >>> from cosmic_fx.sites import module_sites
        >>> model = nn.Sequential(nn.Linear(4, 16))
        >>> attach_sites(model, module_sites(model), CosmicConfig())
        ['0']
        >>> type(model[0]).__name__, type(model.cosmic_qci.get_submodule("0")).__name__
        ('Linear', 'QuantumClassicalInterface')
    """
    from .config import CSCPlacement

    rewritten = []
    for site in sites:
        if not site.qualifies or not (config.qci_at(site.width) or config.csc is CSCPlacement.SITES):
            continue
        layer = root.get_submodule(site.module) if site.module else root
        like = next(layer.parameters(), None)
        qci = make_qci(site.width, site.feature_dim, config, like, site.name) if config.qci_at(site.width) else None
        csc = make_csc(config, site.feature_dim) if config.csc is CSCPlacement.SITES else None
        if qci is not None:
            register_nested(root, f"{QCI_ROOT}.{site.name}", qci)
        if csc is not None:
            register_nested(root, f"{CSC_ROOT}.{site.name}", csc)
        layer.register_forward_hook(SiteHook(qci, csc, site.output_index))
        rewritten.append(site.name)
    return rewritten


def attach_output_csc(root: nn.Module, config) -> None:
    """CSC on the primary tensor of ``root``'s output, as ``cosmic_csc.output``, inside ``root``'s
    ``forward`` (:class:`OutputCSCForward`): before any forward hook the user registered on the model,
    as in a traced forward."""
    csc = make_csc(config, passthrough=True)
    register_nested(root, f"{CSC_ROOT}.output", csc)
    root.forward = OutputCSCForward(root, csc)
