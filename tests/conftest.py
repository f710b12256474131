"""Shared fixtures: the table of small models every generic check runs on."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cosmic_fx.models import DigitsCNN, DigitsMLP, TinyTransformerLM

# The suite checks behaviour, never speed: one intra-op thread keeps it from stalling in OpenMP
# barriers when the 2-core machine is busy with other work.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test starts with one thread: some libraries change it (the Hugging Face Trainer, through
    accelerate, sets 2 here), and the bit-identical checks against fresh processes need one."""
    torch.set_num_threads(1)
    yield


class TiedLM(nn.Module):
    """Embedding and output head share one weight."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.mid = nn.Linear(16, 16)
        self.head = nn.Linear(16, 20, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(torch.relu(self.mid(self.emb(idx))))


class Untraceable(nn.Module):
    """Data-dependent control flow: symbolic_trace fails, dynamo handles it with a guard."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 32)
        self.fc2 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        if h.sum() > 0:  # a Python branch on a tensor value
            h = h * 2
        return self.head(torch.relu(self.fc2(h)))


def _lm():
    return TinyTransformerLM(vocab=24, dim=16, heads=2, layers=1, context=8)


def small_mlp() -> nn.Module:
    """The 6 -> 24 -> 16 -> 5 MLP of the hook tests (seeded)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 5))


def mlp_batches(n: int, scale: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` fixed batches for :func:`small_mlp`. ``scale`` sets the inputs' size, and with it where
    E(output) sits among the parameters' efficiencies (how many the literal CDG skips)."""
    g = torch.Generator().manual_seed(1)
    return [(scale * torch.randn(8, 6, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(n)]


# name -> (factory, example input maker, expected qualifying site names)
MODELS = {
    "mlp": (DigitsMLP, lambda b=4: torch.rand(b, 64), ["0", "2"]),
    "cnn": (DigitsCNN, lambda b=4: torch.rand(b, 1, 8, 8), ["conv1", "conv2", "fc1"]),
    "transformer": (
        _lm,
        lambda b=4: torch.randint(0, 24, (b, 8)),
        ["blocks.0.qkv", "blocks.0.proj", "blocks.0.fc1", "blocks.0.fc2", "head"],
    ),
    "tied": (TiedLM, lambda b=4: torch.randint(0, 20, (b, 5)), ["mid", "head"]),
    "untraceable": (Untraceable, lambda b=4: torch.rand(b, 8), ["fc1", "fc2"]),
}


@pytest.fixture(params=sorted(MODELS))
def model_case(request):
    torch.manual_seed(0)
    factory, make_input, expected = MODELS[request.param]
    return request.param, factory(), make_input, expected


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def literal_csc(t, alpha=0.5, dim=-1, eps=1e-8):
    """The source text's CSC, verbatim, in float64 (autograd differentiates it)."""
    x = t.double()
    s = -(x.softmax(dim) * x.log_softmax(dim))
    return x * torch.sigmoid(x.abs() / (s + eps) - alpha)


def assert_double_backward_matches(fn, reference, t: torch.Tensor) -> None:
    """First and second derivatives of ``sum(fn(t)^2)`` equal those of ``reference`` (create_graph)."""
    grads = []
    for f in (fn, reference):
        x = t.clone().requires_grad_()
        (g,) = torch.autograd.grad(f(x).pow(2).sum(), x, create_graph=True)
        (gg,) = torch.autograd.grad(g.sum(), x)
        grads.append((g, gg))
    (gx, ggx), (gr, ggr) = grads
    torch.testing.assert_close(gx, gr)
    torch.testing.assert_close(ggx, ggr)
