"""Module-swap path: the output CSC runs inside the model's forward, as a hook on the output layer (not
as a root forward hook, which torch.compile compiled as a frame of its own and recompiled at every new
batch size), and the transformed model still copies, pickles and exposes its forward's signature."""

import copy
import inspect
import io

import torch
from torch import nn

import cosmic_fx
from cosmic_fx import CosmicConfig, transform, transform_info


class TrainingBranch(nn.Module):
    """Reads self.training in forward: transform takes the module-swap path; dynamo traces it whole."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 32)
        self.fc2 = nn.Linear(32, 16)

    def forward(self, x, scale: float = 1.0):
        h = self.fc1(x).relu()
        if self.training:
            h = h * 1.5
        return self.fc2(h) * scale


class CountGraphs:
    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def graphs_over_batches(model: nn.Module) -> int:
    torch._dynamo.reset()
    backend = CountGraphs()
    compiled = torch.compile(model, backend=backend)
    for batch in (4, 3, 6, 5):
        compiled(torch.rand(batch, 8)).sum().backward()
    return backend.graphs


def test_output_csc_is_applied_inside_forward_and_compiles_no_extra_graph():
    torch.manual_seed(0)
    model = TrainingBranch()
    tm = transform(model, CosmicConfig())  # default: QCI at identity init, CSC on the output
    assert transform_info(tm).path == "module_swap" and not tm._forward_hooks
    x = torch.rand(3, 8)
    # independent reference: the CSC formula on the original model's output
    torch.testing.assert_close(tm(x), cosmic_fx.cosmic_state_compression(model(x), alpha=0.5))
    plain = graphs_over_batches(model)
    assert plain == 2  # the first batch size, then one dynamic-batch graph
    assert graphs_over_batches(tm) == plain  # was 4: forward and the root hook, each compiled twice
    torch._dynamo.reset()


def test_forward_keeps_its_signature_and_follows_copies():
    torch.manual_seed(0)
    tm = transform(TrainingBranch(), CosmicConfig(qci_init="seed"))
    assert inspect.signature(tm.forward) == inspect.signature(TrainingBranch().forward)
    x = torch.rand(2, 8)
    twin = copy.deepcopy(tm)
    assert torch.equal(twin(x, scale=2.0), tm(x, scale=2.0))
    with torch.no_grad():
        twin.fc2.weight.add_(1.0)
    assert not torch.equal(twin(x), tm(x))  # the copy's forward runs the copy's layers
    buf = io.BytesIO()
    torch.save(tm, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    assert torch.equal(back(x), tm(x)) and len(back.fc2._forward_hooks) == 2  # its QCI's and the output CSC's


def test_export_traces_the_forward_with_its_output_csc(tmp_path):
    torch.manual_seed(0)
    tm = transform(TrainingBranch(), CosmicConfig(qci_init="seed")).eval()
    path = cosmic_fx.export(tm, torch.rand(4, 8), tmp_path / "m.pt2", format="pt2")
    x = torch.rand(7, 8)
    with torch.no_grad():
        torch.testing.assert_close(torch.export.load(str(path)).module()(x), tm(x))
