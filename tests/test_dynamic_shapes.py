"""Shapes stay symbolic: over many batch sizes (and sequence lengths) the cosmic backend compiles no
more graphs than plain torch.compile with the same lowering, and no step runs eagerly."""

import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend

import cosmic_fx
from cosmic_fx import CosmicConfig
from cosmic_fx.backend import cosmic_backend
from cosmic_fx.models import DigitsMLP, TinyTransformerLM

BATCHES = (3, 5, 8, 13, 2, 21, 34, 7, 9, 17, 30)  # 11 distinct sizes
LENGTHS = (4, 6, 8, 5, 9, 3, 16, 7, 12, 10, 11)

CASES = {
    "mlp": (DigitsMLP, [(b, 64) for b in BATCHES], lambda shape: torch.rand(shape)),
    "lm": (lambda: TinyTransformerLM(24, 16, 2, 1, 16), list(zip(BATCHES, LENGTHS)),
           lambda shape: torch.randint(0, 24, shape)),
}


class Counting:
    """A backend wrapper that counts the graphs compiled and, per training step, the graphs run."""

    def __init__(self, inner) -> None:
        self.inner, self.graphs, self.runs = inner, 0, 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        compiled = self.inner(gm, example_inputs)

        def run(*args):
            self.runs += 1
            return compiled(*args)

        return run


def train_steps(backend, case, dynamic, config):
    factory, shapes, make = CASES[case]
    torch._dynamo.reset()
    torch.manual_seed(0)
    tm = cosmic_fx.transform(factory(), config)
    compiled = torch.compile(tm, backend=backend, dynamic=dynamic)
    eager_steps = 0
    for shape in shapes:
        before = backend.runs
        compiled(make(shape)).float().pow(2).mean().backward()
        eager_steps += backend.runs == before
    cosmic_fx.detach_hooks(tm)
    return backend.graphs, eager_steps


def compare(case, dynamic, lowering):
    config = CosmicConfig(lower=lowering)
    plain_graphs, plain_eager = train_steps(Counting(lookup_backend(lowering)), case, dynamic, config)
    cosmic_graphs, cosmic_eager = train_steps(
        Counting(lambda gm, inputs: cosmic_backend(gm, inputs, options=config)), case, dynamic, config)
    assert plain_eager == cosmic_eager == 0
    assert cosmic_graphs <= plain_graphs <= 3  # dynamo makes the varying sizes dynamic at the first change


@pytest.mark.parametrize("dynamic", [None, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_cosmic_compiles_no_more_graphs_than_plain_torch_compile(case, dynamic):
    """Guards come from dynamo and the backend's passes, not from the lowering: eager keeps it fast."""
    compare(case, dynamic, "eager")


@pytest.mark.slow
def test_same_with_aot_eager_lowering():
    compare("lm", None, "aot_eager")  # batch sizes and sequence lengths
