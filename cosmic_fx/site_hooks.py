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

from torch import nn

from .modules import CosmicStateCompression, QuantumClassicalInterface, make_csc, make_qci
from .sites import Site, apply_at

__all__ = ["SiteHook", "attach_output_csc", "attach_sites", "register_nested"]

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


def attach_output_csc(root: nn.Module, sites: list[Site], config) -> str:
    """Output CSC on the module-swap path, as ``cosmic_csc.output``: a forward hook on the output
    layer that applies it after the layer's QCI; returns the site's name.

    The output layer is :func:`cosmic_fx.policy.output_site`'s, the last site, read here from the
    module order (``sites`` are in ``named_modules()`` order), since no forward has run yet: for
    Hugging Face models and most others that is the head the forward runs last (``lm_head``,
    ``classifier``). On the layer's output, every use inside the forward sees the compressed value:
    the loss a Hugging Face model computes from its logits is the loss of the logits it returns.
    :func:`cosmic_fx.explain` notes a model whose forward runs another site last, or computes its
    output from the head's by further ops.

    Example:
        >>> from cosmic_fx import CosmicConfig
        >>> from cosmic_fx.sites import module_sites
        >>> model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> attach_output_csc(model, module_sites(model), CosmicConfig())
        '2'
    """
    site = sites[-1]
    csc = make_csc(config, passthrough=True)
    register_nested(root, f"{CSC_ROOT}.output", csc)
    layer = root.get_submodule(site.module) if site.module else root
    # registered after the site's own hook (attach_sites runs first): CSC follows the QCI
    layer.register_forward_hook(SiteHook(None, csc, site.output_index))
    return site.name
