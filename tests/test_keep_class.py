"""transform returns the user's class, whole, on both paths, and never modifies the user's model."""

import copy

import pytest
import torch
from torch import nn

import cosmic_fx
from cosmic_fx import CosmicConfig, transform, transform_info

from .conftest import Untraceable


class Encoder(nn.Module):
    """A user class with a method, a plain attribute, a buffer and a constant created in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = 2.0
        self.fc1 = nn.Linear(8, 32)
        self.fc2 = nn.Linear(32, 16)
        self.register_buffer("offset", torch.zeros(16))

    def encode(self, x):
        return self.fc1(x).relu()

    def forward(self, x):
        return self.fc2(self.encode(x)) * self.scale + self.offset + torch.tensor(1.0)


class UntraceableEncoder(Untraceable):
    def describe(self) -> str:
        return f"{type(self).__name__} with {self.fc1.out_features} hidden units"


CASES = {"traced": (Encoder, "symbolic_trace"), "untraceable": (UntraceableEncoder, "module_swap")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_result_is_the_users_class_with_its_keys_and_hooks(case):
    factory, path = CASES[case]
    torch.manual_seed(0)
    model = factory()
    seen = []
    model.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    before_keys = list(model.state_dict())
    before_hooks = {name: dict(m._forward_hooks) for name, m in model.named_modules()}
    x = torch.rand(3, 8)
    ref = model(x)
    tm = transform(model, CosmicConfig(csc="none"))
    info = transform_info(tm)
    assert info.path == path and type(tm) is factory
    assert torch.equal(tm(x), ref)  # identity init
    assert len(seen) == 2  # the user's forward hook ran on the transformed model too
    added = [k for k in tm.state_dict() if k not in before_keys]
    assert list(tm.state_dict())[: len(before_keys)] == before_keys
    qci_keys = [f"cosmic_qci.{s}.{p}" for s in info.rewritten for p in ("beta", "weight", "bias")]
    # then the CDG/CCE runtime's state (tests/test_runtime.py checks what it holds)
    assert added == qci_keys + [k for k in added if k.startswith("cosmic_state.")]
    tm.load_state_dict(tm.state_dict())
    if case == "traced":
        assert tm.encode(x).shape == (3, 32) and tm.scale == 2.0 and torch.equal(tm.offset, model.offset)
    else:
        assert tm.describe() == "UntraceableEncoder with 32 hidden units"
    # the user's model: same hooks, no new attributes, no bound forward, no QCI
    assert {name: dict(m._forward_hooks) for name, m in model.named_modules()} == before_hooks
    assert "forward" not in vars(model) and not hasattr(model, "cosmic_qci")
    assert list(model.state_dict()) == before_keys


def test_hooks_on_a_non_leaf_submodule_choose_the_module_swap_path():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 16)

        def forward(self, x):
            return self.fc(x).relu()

    torch.manual_seed(0)
    model = nn.Sequential(Block(), nn.Linear(16, 12))
    calls = []
    model[0].register_forward_pre_hook(lambda m, a: calls.append(1))
    tm = transform(model, CosmicConfig(csc="none"))
    info = transform_info(tm)
    assert info.path == "module_swap" and "submodule 0 has forward hooks" in info.trace_error
    tm(torch.rand(2, 8))
    assert calls == [1] and info.rewritten == ["0.fc", "1"]


def test_deepcopy_of_a_transformed_model_is_independent():
    torch.manual_seed(0)
    for factory in (Encoder, UntraceableEncoder):
        tm = transform(factory(), CosmicConfig(csc="none", qci_init="seed"))
        twin = copy.deepcopy(tm)
        x = torch.rand(2, 8)
        assert torch.equal(twin(x), tm(x))
        with torch.no_grad():
            twin.cosmic_qci.fc1.weight.add_(1.0)
        assert not torch.equal(twin(x), tm(x))  # the copy runs its own QCI, not the original's


def test_compiled_transformed_model_keeps_the_class():
    torch.manual_seed(0)
    tm = transform(Encoder(), CosmicConfig(lower="aot_eager"))
    compiled = torch.compile(tm, backend="cosmic", options={"config": transform_info(tm).config})
    x = torch.rand(4, 8)
    torch.testing.assert_close(compiled(x), tm(x))
    assert isinstance(compiled._orig_mod, Encoder)
    cosmic_fx.detach_hooks(tm)


@pytest.mark.parametrize("case", sorted(CASES))
def test_adapter_round_trip_on_both_paths(case, tmp_path):
    from safetensors.torch import load_file

    factory, _ = CASES[case]
    torch.manual_seed(0)
    base = factory()
    tm = transform(base, CosmicConfig(csc="none", qci_init="seed"))
    cosmic_fx.export(tm, torch.rand(2, 8), tmp_path / "adapter", format="adapter")
    names = set(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    assert names == {k for k in tm.state_dict() if k.startswith("cosmic_qci.")}
    torch.manual_seed(1)  # another random QCI init: the adapter must bring tm's back
    again = cosmic_fx.load_adapter(base, tmp_path / "adapter")
    x = torch.rand(3, 8)
    assert torch.equal(again(x), tm(x))
