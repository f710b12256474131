"""torchvision and timm models for ``cosmic-fx bench zoo``, imported from an isolated folder.

Why isolated (measured, torch 2.13.0+cpu): the torchvision wheel the registry serves is built against
the CUDA torch. Installed next to the CPU torch, ``import torchvision`` fails (``operator
torchvision::nms does not exist``, raised by its ``_meta_registrations`` module, which registers fake
kernels for compiled ops that did not load), and ``import transformers`` / ``import timm`` fail with
it (both import torchvision when it is installed). Its classification models are pure Python, and
so is timm.

So ``make zoo-vendor`` installs both with ``pip install --no-deps --target .zoo-vendor`` (outside
``sys.path``), and this module imports them without running ``torchvision/__init__.py``: it places
package stubs for ``torchvision`` and ``torchvision.models`` whose search path is the vendored folder,
so ``import torchvision.models.resnet`` loads that file and the pure-Python helpers it needs
(``torchvision.ops`` layers, ``torchvision.transforms`` presets), never the op registrations. timm is
imported with the folder on ``sys.path`` for that one import. When no vendored folder exists, an
installed torchvision / timm is used if it imports; otherwise the rows say why they were skipped.

The folder is ``$COSMIC_FX_ZOO_VENDOR``, else ``.zoo-vendor`` in the working directory or in the
source checkout.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from .zoo_models import LibraryMissing, ZooModel, images

__all__ = ["TIMM_MODELS", "TORCHVISION_MODELS", "import_timm", "import_torchvision_models", "vendor_dir"]

VENDOR_ENV = "COSMIC_FX_ZOO_VENDOR"
_HINT = "run `make zoo-vendor` (pip install --no-deps --target .zoo-vendor torchvision timm)"


def vendor_dir() -> Path | None:
    """The folder holding the isolated torchvision / timm, if there is one."""
    env = os.environ.get(VENDOR_ENV)
    here = Path(__file__).resolve().parents[2]
    candidates = [Path(env)] if env else [Path.cwd() / ".zoo-vendor", here / ".zoo-vendor"]
    return next((p.resolve() for p in candidates if p.is_dir()), None)


def _package_stub(name: str, path: Path) -> ModuleType:
    """A package module with no ``__init__`` code: importing ``name.sub`` loads ``path/sub.py``."""
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [str(path)]
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    return module


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"


def import_torchvision_models(*names: str) -> list[ModuleType]:
    """Import ``torchvision.models.<name>`` for each name, isolated when a vendored copy exists.

    Raises:
        LibraryMissing: torchvision is not available, or does not import here.
    """
    import importlib

    vendor = vendor_dir()
    root = vendor / "torchvision" if vendor else None
    if root is not None and root.is_dir():
        if not getattr(sys.modules.get("torchvision"), "__cosmic_zoo_stub__", False):
            if "torchvision" in sys.modules:
                raise LibraryMissing("torchvision was imported from the environment before the vendored copy")
            stub = _package_stub("torchvision", root)
            stub.__cosmic_zoo_stub__ = True
            stub.__version__ = _vendored_version(vendor, "torchvision")
            _package_stub("torchvision.models", root / "models")
    elif importlib.util.find_spec("torchvision") is None:
        raise LibraryMissing(f"torchvision not installed; {_HINT}")
    try:
        return [importlib.import_module(f"torchvision.models.{n}") for n in names]
    except Exception as err:  # noqa: BLE001 - a broken install is a skip with its reason
        raise LibraryMissing(f"torchvision does not import here ({_first_line(err)}); {_HINT}") from None


def import_timm() -> ModuleType:
    """Import timm (from the vendored folder when there is one; it needs torchvision, imported isolated first)."""
    if "timm" in sys.modules:
        return sys.modules["timm"]
    vendor = vendor_dir()
    if vendor is not None and (vendor / "timm").is_dir():
        import_torchvision_models()  # the stubs, so timm's `import torchvision` finds the isolated copy
        sys.path.insert(0, str(vendor))
        try:
            import timm
        except Exception as err:  # noqa: BLE001
            raise LibraryMissing(f"timm does not import from {vendor} ({_first_line(err)})") from None
        finally:
            sys.path.remove(str(vendor))
        return timm
    if importlib.util.find_spec("timm") is None:
        raise LibraryMissing(f"timm not installed; {_HINT}")
    try:
        import timm
    except Exception as err:  # noqa: BLE001
        raise LibraryMissing(f"timm does not import here ({_first_line(err)}); {_HINT}") from None
    return timm


def _vendored_version(vendor: Path, dist: str) -> str:
    found = sorted(vendor.glob(f"{dist}-*.dist-info"))
    return found[-1].name[len(dist) + 1:-len(".dist-info")] if found else "unknown"


# ----------------------------------------------------------------------------- torchvision
def _resnet() -> nn.Module:
    (m,) = import_torchvision_models("resnet")
    return m.ResNet(m.BasicBlock, [1, 1, 1, 1], num_classes=10)


def _mobilenet_v3() -> nn.Module:
    (m,) = import_torchvision_models("mobilenetv3")
    setting, last_channel = m._mobilenet_v3_conf("mobilenet_v3_small", width_mult=0.5)
    return m.MobileNetV3(setting, last_channel, num_classes=10)


def _mobilenet_v2() -> nn.Module:
    (m,) = import_torchvision_models("mobilenetv2")
    return m.MobileNetV2(num_classes=10, width_mult=0.25)


def _efficientnet() -> nn.Module:
    (m,) = import_torchvision_models("efficientnet")
    c = m.MBConvConfig
    setting = [c(1, 3, 1, 16, 16, 1), c(6, 3, 2, 16, 24, 1), c(6, 5, 2, 24, 40, 1), c(6, 3, 2, 40, 80, 1)]
    return m.EfficientNet(setting, dropout=0.2, num_classes=10, last_channel=128)


def _vit() -> nn.Module:
    (m,) = import_torchvision_models("vision_transformer")
    return m.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                               num_classes=10)


def _convnext() -> nn.Module:
    (m,) = import_torchvision_models("convnext")
    blocks = [m.CNBlockConfig(16, 32, 1), m.CNBlockConfig(32, None, 1)]
    return m.ConvNeXt(blocks, stochastic_depth_prob=0.1, num_classes=10)


def _densenet() -> nn.Module:
    (m,) = import_torchvision_models("densenet")
    return m.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, bn_size=2, num_classes=10)


def _regnet() -> nn.Module:
    (m,) = import_torchvision_models("regnet")
    params = m.BlockParams.from_init_params(depth=4, w_0=16, w_a=8.0, w_m=2.0, group_width=8, se_ratio=0.25)
    return m.RegNet(params, num_classes=10)


def _shufflenet() -> nn.Module:
    (m,) = import_torchvision_models("shufflenetv2")
    return m.ShuffleNetV2([2, 2, 2], [16, 32, 64, 128, 256], num_classes=10)


def _squeezenet() -> nn.Module:
    (m,) = import_torchvision_models("squeezenet")
    return m.SqueezeNet("1_1", num_classes=10)


def _swin() -> nn.Module:
    (m,) = import_torchvision_models("swin_transformer")
    return m.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=[4, 4],
                             num_classes=10)


TORCHVISION_MODELS = [
    ZooModel("tv-resnet", "torchvision", _resnet, images),
    ZooModel("tv-mobilenet-v3", "torchvision", _mobilenet_v3, images),
    ZooModel("tv-mobilenet-v2", "torchvision", _mobilenet_v2, images),
    ZooModel("tv-efficientnet", "torchvision", _efficientnet, images),
    ZooModel("tv-vit", "torchvision", _vit, images),
    ZooModel("tv-convnext", "torchvision", _convnext, images),
    ZooModel("tv-densenet", "torchvision", _densenet, images),
    ZooModel("tv-regnet", "torchvision", _regnet, images),
    ZooModel("tv-shufflenet-v2", "torchvision", _shufflenet, images),
    ZooModel("tv-squeezenet", "torchvision", _squeezenet, images),
    ZooModel("tv-swin", "torchvision", _swin, images),
]


# ----------------------------------------------------------------------------- timm
def _timm(name: str, **kwargs: Any):
    def build() -> nn.Module:
        return import_timm().create_model(name, pretrained=False, num_classes=10, **kwargs)

    return build


TIMM_MODELS = [
    ZooModel("timm-resnet10t", "timm", _timm("resnet10t"), images),
    ZooModel("timm-mobilenetv3", "timm", _timm("mobilenetv3_small_050"), images),
    ZooModel("timm-vit-tiny", "timm", _timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2), images),
    ZooModel("timm-convnext-atto", "timm", _timm("convnext_atto"), images),
]
