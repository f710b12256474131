"""Command-line arguments shared by ``cosmic-fx inspect`` and ``cosmic-fx export``: the model
(``FILE.py:FACTORY``), its example inputs, weights and cosmic config, and how to build them.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .errors import CLIError

if TYPE_CHECKING:  # torch and the library load when a command runs, not for `--help`
    import torch
    from torch import nn

    from ..config import CosmicConfig

__all__ = ["add_model_arguments", "add_model_command", "load_factory", "load_weights", "make_inputs",
           "model_and_inputs", "parse_shape"]


def add_model_command(subparsers, name: str, *, help: str, description: str, epilog: str) -> argparse.ArgumentParser:
    """A subcommand that takes the model/input arguments (:func:`add_model_arguments`)."""
    parser = subparsers.add_parser(name, help=help, description=description, epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    return parser


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model/input arguments shared by ``inspect`` and ``export``."""
    parser.add_argument("model", metavar="FILE.py:FACTORY",
                        help="a Python file (or an importable module) and a function or class in it that "
                             "returns the nn.Module, called without arguments")
    parser.add_argument("--input-shape", dest="input_shapes", action="append", type=parse_shape, required=True,
                        metavar="N,C,...", help="shape of an example input (repeat for several inputs)")
    parser.add_argument("--input-dtype", choices=["float32", "float64", "int64"], default="float32",
                        help="dtype of the example inputs (int64: random token ids in [0, --int-high))")
    parser.add_argument("--int-high", type=int, default=2, help="upper bound (exclusive) of int64 inputs (default 2)")
    parser.add_argument("--preset", choices=["default", "fast", "seed", "off"], default="default",
                        help="cosmic config preset (default: the measured default)")
    parser.add_argument("--csc", choices=["output", "sites", "none"], default=None, help="override the CSC placement")
    parser.add_argument("--seed", type=int, default=0, help="torch.manual_seed before building the model")
    parser.add_argument("--weights", default=None, metavar="FILE",
                        help="a state_dict for the model the factory builds (.safetensors, or a torch.save file "
                             "loaded with weights_only=True)")


def parse_shape(text: str) -> tuple[int, ...]:
    """``"8,1,8,8"`` -> ``(8, 1, 8, 8)``; an ``argparse`` type (bad input is a usage error)."""
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a shape; expected comma-separated sizes like 8,1,8,8") from None
    if not shape or any(s < 1 for s in shape):
        raise argparse.ArgumentTypeError(f"{text!r}: every size must be a positive integer")
    return shape


def model_and_inputs(args: argparse.Namespace) -> tuple[nn.Module, tuple[torch.Tensor, ...], CosmicConfig]:
    """Build the model, example inputs and config from the shared arguments (errors as ``CLIError``)."""
    import torch
    from torch import nn

    from ..config import CosmicConfig
    from ..inspect import _first_layer_hint
    from ..scoped import eval_no_grad

    torch.manual_seed(args.seed)
    model = load_factory(args.model)()
    if not isinstance(model, nn.Module):
        raise CLIError(f"{args.model} returned {type(model).__name__}, not an nn.Module")
    if args.weights:
        load_weights(model, args.weights)
    inputs = make_inputs(args, args.input_shapes)
    overrides = {} if args.csc is None else {"csc": args.csc}
    config = CosmicConfig.preset(args.preset, **overrides)
    shapes = " ".join(f"--input-shape {','.join(map(str, s))}" for s in args.input_shapes)
    with eval_no_grad(model):
        try:
            model(*inputs)
        except Exception as err:
            raise CLIError(f"{shapes} does not fit {type(model).__name__}: {type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''}{_first_layer_hint(model)}") from None
    return model, inputs, config


def make_inputs(args: argparse.Namespace, shapes: Sequence[tuple[int, ...]]) -> tuple[torch.Tensor, ...]:
    """Random example inputs of ``shapes`` as the arguments ask: ``--input-dtype``, ``--int-high``."""
    import torch

    if args.input_dtype == "int64":
        return tuple(torch.randint(0, max(args.int_high, 1), s) for s in shapes)
    return tuple(torch.rand(s, dtype=getattr(torch, args.input_dtype)) for s in shapes)


def load_weights(model: nn.Module, file: str) -> None:
    """Load a state_dict file into ``model`` without unpickling objects (errors as ``CLIError``)."""
    import torch

    try:
        if file.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(file)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CLIError(f"--weights {file}: no such file") from None
    except Exception as err:
        raise CLIError(f"--weights {file} is not a readable state_dict ({type(err).__name__}: "
                       f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}); it may be corrupt") from None
    if not isinstance(state, dict):
        raise CLIError(f"--weights {file} holds a {type(state).__name__}, not a state_dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CLIError(f"--weights {file} does not fit {type(model).__name__}: {err}") from None


def load_factory(spec: str):
    """``"path/to/file.py:make"`` or ``"package.module:make"`` -> the callable (errors as ``CLIError``)."""
    import importlib
    import importlib.util
    import os
    import sys

    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr:
        raise CLIError(f"{spec!r}: expected FILE.py:FACTORY (e.g. model.py:build) or package.module:FACTORY")
    if where.endswith(".py") or os.sep in where or os.path.exists(where):
        if not os.path.isfile(where):
            raise CLIError(f"{where}: no such file")
        name = f"_cosmic_user_{abs(hash(os.path.abspath(where)))}"
        module_spec = importlib.util.spec_from_file_location(name, where)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # dataclasses and pickling look modules up here
        try:
            module_spec.loader.exec_module(module)
        except Exception as err:
            sys.modules.pop(name, None)
            raise CLIError(f"{where} failed to import: {type(err).__name__}: {err}") from None
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as err:
            raise CLIError(f"cannot import {where!r}: {err}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        available = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                           and getattr(v, "__module__", None) == module.__name__)
        raise CLIError(f"{where} has no callable {attr!r}; it defines: {', '.join(available) or 'nothing callable'}")

    def build():
        try:
            return factory()
        except Exception as err:
            raise CLIError(f"{spec}() failed: {type(err).__name__}: {err}") from None

    return build
