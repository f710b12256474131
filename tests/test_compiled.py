"""A cosmic_fx.compile result answers like its model: forward signature, state-dict keys, and a
checkpoint loaded through it keeps CDG's frozen parameters trainable until the next forward (so an
optimizer built in between holds them, as before the checkpoint)."""

import inspect

import torch
from torch import nn

import cosmic_fx
from cosmic_fx import CosmicConfig

from .conftest import mlp_batches, small_mlp


class Named(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 24)
        self.head = nn.Linear(24, 5)

    def forward(self, features: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.head(torch.relu(self.fc(features))) * scale


def test_signature_and_keys_are_the_models():
    torch.manual_seed(0)
    cm = cosmic_fx.compile(Named(), CosmicConfig(lower="eager"))
    tm = cm._orig_mod
    assert list(inspect.signature(cm.forward).parameters) == ["features", "scale"]
    assert inspect.signature(cm) == inspect.signature(tm.forward)
    # the class too (code that reads model.__class__.forward), still an OptimizedModule
    assert type(cm).__name__ == "Named" and isinstance(cm, torch._dynamo.eval_frame.OptimizedModule)
    assert list(inspect.signature(type(cm).forward).parameters) == ["self", "features", "scale"]
    assert list(cm.state_dict()) == list(tm.state_dict())
    assert list(torch.compile(tm).state_dict())[0].startswith("_orig_mod.")  # what torch.compile alone gives
    nested = nn.ModuleDict({"enc": cm}).state_dict()
    assert list(nested) == [f"enc.{k}" for k in tm.state_dict()]
    cosmic_fx.detach_hooks(tm)


def test_both_key_styles_load_into_the_compiled_model():
    cfg = CosmicConfig(lower="eager", qci_init="seed")
    torch.manual_seed(0)
    src = cosmic_fx.transform(small_mlp(), cfg)
    for state in (src.state_dict(), {f"_orig_mod.{k}": v for k, v in src.state_dict().items()}):
        torch.manual_seed(1)
        cm = cosmic_fx.compile(nn.Sequential(nn.Linear(6, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(),
                                             nn.Linear(16, 5)), cfg)
        result = cm.load_state_dict(state)
        assert not result.missing_keys and not result.unexpected_keys
        for k, v in src.state_dict().items():
            if not k.startswith("cosmic_state."):
                assert torch.equal(cm.state_dict()[k], v), k
        cosmic_fx.detach_hooks(cm)


def test_frozen_parameters_stay_trainable_until_the_next_forward():
    cfg = CosmicConfig(lower="eager", cdg_patience=1, cdg_interval=2, cdg_max_frozen=0.5, efficiency_every=1)
    tm = cosmic_fx.transform(small_mlp(), cfg)
    cosmic_fx.attach_hooks(tm)
    batches = mlp_batches(2, scale=20)  # E(output) among the parameters' efficiencies: some read low
    for x, y in batches:
        nn.functional.cross_entropy(tm(x), y).backward()
    frozen = cosmic_fx.runtime_of(tm).frozen
    assert frozen  # the checkpoint holds a frozen set
    state = tm.state_dict()
    cosmic_fx.detach_hooks(tm)

    cm = cosmic_fx.compile(small_mlp(), cfg)
    assert not cm._forward_pre_hooks  # no hook on the wrapper's calls while nothing waits to refreeze
    cm.load_state_dict(state)
    named = dict(cm._orig_mod.named_parameters())
    assert all(named[n].requires_grad for n in frozen)  # an optimizer built now holds them all
    assert cosmic_fx.runtime_of(cm).frozen == frozen
    assert len(cm._forward_pre_hooks) == 1
    cm(batches[0][0])  # the next forward freezes them again, before dynamo traces it
    assert sorted(n for n, p in named.items() if not p.requires_grad) == frozen
    assert not cm._forward_pre_hooks  # the hook removed itself
    # detached between the load and the forward: detach_hooks thaws everything, and nothing freezes again
    cm.load_state_dict(state)
    cosmic_fx.detach_hooks(cm)
    cm(batches[0][0])
    assert all(p.requires_grad for p in named.values())
