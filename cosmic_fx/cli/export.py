"""``cosmic-fx export``: transform a model and write it as ``.pt2``, ONNX or adapter files
(:func:`cosmic_fx.export`), then load the file back and check it against the in-memory model."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import CLIError
from .model_args import add_model_command, make_inputs, model_and_inputs

if TYPE_CHECKING:  # torch and the library load when the command runs, not for `cosmic-fx --help`
    from torch import nn

__all__ = ["HELP", "NAME", "add_parser", "run"]

NAME = "export"
HELP = "export the transformed model: .pt2, ONNX, or adapter files"

_EPILOG = """\
examples:
  cosmic-fx export cosmic_fx.models:DigitsCNN --input-shape 8,1,8,8 --format pt2 -o digits.pt2
  cosmic-fx export my_model.py:build --input-shape 4,64 --format onnx -o model.onnx
  cosmic-fx export my_model.py:build --input-shape 4,64 --weights trained.safetensors --format adapter -o adapter/

After writing, the file is loaded back and checked against the in-memory model at another batch size.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``export`` to ``subparsers``."""
    from ..export import FORMATS

    p = add_model_command(
        subparsers, NAME, help=HELP,
        description="Transform a model with cosmic_fx and export it (cosmic_fx.export).",
        epilog=_EPILOG,
    )
    p.add_argument("--format", choices=FORMATS, required=True, help="pt2 (torch.export), onnx, or adapter (directory)")
    p.add_argument("-o", "--output", required=True, help="the file (pt2, onnx) or directory (adapter) to write")
    p.add_argument("--static-batch", action="store_true", help="keep the example's batch size fixed")
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from ..export import ExportError, export
    from ..transform import transform, transform_info

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
    print(_verify(tm, model, inputs, written, args))
    return 0


def _verify(tm: nn.Module, model: nn.Module, inputs: tuple, written: Path, args: argparse.Namespace) -> str:
    """Load what was written and compare with the in-memory model (another batch size when dynamic)."""
    import torch

    from ..adapter import load_adapter
    from ..loading import CorruptFileError, load_onnx, load_program
    from ..scoped import eval_no_grad

    batch = inputs[0].shape[0] + 3 if inputs and inputs[0].dim() >= 1 and not args.static_batch else None
    if batch is not None:
        torch.manual_seed(args.seed + 1)
        inputs = make_inputs(args, [(batch, *x.shape[1:]) for x in inputs])
    try:
        with eval_no_grad(tm):
            expected = tm(*inputs)
            if args.format == "pt2":
                got, how = load_program(written).module()(*inputs), "torch.export.load"
            elif args.format == "onnx":
                try:
                    session = load_onnx(written)
                except ModuleNotFoundError:
                    return "not checked: onnxruntime is not installed"
                feed = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs, strict=False)}
                got, how = torch.from_numpy(session.run(None, feed)[0]), "onnxruntime"
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    reloaded = load_adapter(model, written).eval()
                got, how = reloaded(*inputs), "load_adapter on the base model"
    except CorruptFileError as err:
        raise CLIError(f"the written file does not load back: {err}") from None
    expected = expected[0] if isinstance(expected, (tuple, list)) else expected
    got = got[0] if isinstance(got, (tuple, list)) else got
    diff = (got.float() - expected.float()).abs().max().item()
    shape = "x".join(map(str, inputs[0].shape))
    if diff > 1e-4:
        raise CLIError(f"the written file does not reproduce the model: max |difference| {diff:.3g} on input {shape}")
    return f"checked: reloaded with {how}, input {shape}: max |difference| vs the in-memory model = {diff:.3g}"
