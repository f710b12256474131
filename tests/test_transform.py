import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import cosmic_fx
from cosmic_fx import CosmicConfig, QuantumClassicalInterface, transform, transform_info


def qci_modules(model):
    return [m for m in model.modules() if isinstance(m, QuantumClassicalInterface)]


def test_one_qci_per_qualifying_site_and_identity_outputs(model_case):
    name, model, make_input, expected = model_case
    before = copy.deepcopy(model.state_dict())
    x = make_input()
    ref = model(x)
    tm = transform(model, CosmicConfig(csc="none"))
    info = transform_info(tm)
    assert info.path == ("module_swap" if name == "untraceable" else "symbolic_trace")
    assert sorted(info.rewritten) == sorted(expected)
    assert len(qci_modules(tm)) == len(expected)
    assert torch.equal(tm(x), ref)  # identity init: exactly the same outputs
    # the original model is untouched, and the transformed one shares its weights
    assert qci_modules(model) == []
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    shared = {id(p) for p in model.parameters()}
    assert shared <= {id(p) for p in tm.parameters()}


def test_qci_parameters_are_owned_and_trainable(model_case):
    _, model, make_input, expected = model_case
    tm = transform(model, CosmicConfig())
    new = [n for n, p in tm.named_parameters() if id(p) not in {id(q) for q in model.parameters()}]
    assert len(new) == 3 * len(expected)  # beta, weight, bias per QCI
    assert all(k in tm.state_dict() for k in new)
    opt = torch.optim.SGD(tm.parameters(), lr=0.1)
    out = tm(make_input())
    out.float().pow(2).mean().backward()
    opt.step()
    assert all(p.grad is not None for n, p in tm.named_parameters() if n in new and n.endswith("weight"))


def test_csc_output_and_sites_change_outputs_as_the_formula_says():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 12))
    x = torch.randn(3, 4)
    tm = transform(model, CosmicConfig(csc="output", csc_alpha=50.0))
    assert_close(tm(x), cosmic_fx.cosmic_state_compression(model(x), 50.0))
    tm2 = transform(model, CosmicConfig(csc="sites", csc_alpha=50.0))
    h = cosmic_fx.cosmic_state_compression(model[0](x), 50.0)
    assert_close(tm2(x), cosmic_fx.cosmic_state_compression(model[2](model[1](h)), 50.0))


def test_module_swap_path_matches_traced_path_numerically():
    from .conftest import Untraceable

    torch.manual_seed(0)
    model = Untraceable()
    tm = transform(model, CosmicConfig(qci_init="seed", csc="sites"))
    info = transform_info(tm)
    assert info.path == "module_swap" and info.trace_error
    # the layer keeps its class and its weight; its QCI is registered beside it and applied by a hook
    assert type(tm.fc1) is nn.Linear and tm.fc1 is not model.fc1 and tm.fc1.weight is model.fc1.weight
    assert not model.fc1._forward_hooks and len(tm.fc1._forward_hooks) == 1
    x = torch.rand(2, 8)
    h = cosmic_fx.cosmic_state_compression(tm.cosmic_qci.fc1(model.fc1(x)))
    h = torch.relu(h)
    h = h * 2 if h.sum() > 0 else h
    h = cosmic_fx.cosmic_state_compression(tm.cosmic_qci.fc2(model.fc2(h)))
    assert_close(tm(x), model.head(torch.relu(h)))


def test_training_mode_is_preserved():
    model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5)).eval()
    tm = transform(model)
    assert not tm.training and not model.training
    model.train()
    assert transform(model).training


def test_errors():
    with pytest.raises(ValueError, match=r"Sequential has no site: .* The site kinds are linear: nn\.Linear"):
        transform(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match=r"no site matched targets=\['fc.\*'\].*the model has: 0 \(16\), 2 \(3\)"):
        transform(nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)), CosmicConfig(targets=["fc.*"]))
    with pytest.raises(TypeError, match="expects an nn.Module"):
        transform(lambda x: x)
    tm = transform(nn.Sequential(nn.Linear(4, 16)))
    with pytest.raises(ValueError, match="already transformed"):
        transform(tm)


class ModeDependent(nn.Module):
    """Branches on self.training outside any leaf module (as timm's BatchNormAct2d does)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 32), nn.Linear(32, 4)

    def forward(self, x):
        h = self.a(x)
        if self.training:
            h = h * 0.5
        return self.b(h)


def test_a_forward_that_reads_self_training_is_not_frozen_in_one_mode():
    torch.manual_seed(0)
    model = ModeDependent()
    tm = cosmic_fx.transform(model, CosmicConfig(csc="none"))
    info = cosmic_fx.transform_info(tm)
    assert info.path == "module_swap" and "depends on self.training" in info.trace_error
    x = torch.randn(3, 8)
    for mode in (False, True, False):
        model.train(mode)
        tm.train(mode)
        assert torch.equal(tm(x), model(x)), mode  # identity init: the model's own function in each mode
    # leaf modules that read self.training (Dropout, BatchNorm) do not stop tracing
    seq = nn.Sequential(nn.Linear(8, 32), nn.Dropout(0.1), nn.BatchNorm1d(32), nn.Linear(32, 4))
    assert cosmic_fx.transform_info(cosmic_fx.transform(seq)).path == "symbolic_trace"
