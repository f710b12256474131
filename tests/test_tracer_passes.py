import pytest
import torch
from cosmic_fx.passes import InsertCSC, InsertQCI
from torch import nn
from torch._dynamo.utils import counters

from cosmic_fx import CosmicConfig
from cosmic_fx.modules import QuantumClassicalInterface
from cosmic_fx.tracer import find_sites, symbolic_trace

from .conftest import MODELS


def module_sites(model):
    """Expected sites from the module tree: (name, kind, width)."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            out.append((name, "conv2d", m.out_channels))
        elif isinstance(m, nn.Linear):
            out.append((name, "linear", m.out_features))
    return sorted(out)


def dynamo_graphs(model, *inputs):
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(model, backend=capture)(*inputs)
    return graphs


def aten_graph(model, *inputs):
    from torch._functorch.aot_autograd import aot_module_simplified

    graphs = []

    def capture(gm, example_inputs):
        def fw(g, _):
            graphs.append(g)
            return g.forward

        return aot_module_simplified(gm, example_inputs, fw_compiler=fw)

    torch.compile(model, backend=capture)(*inputs)
    return graphs[0]


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer", "tied"])
def test_sites_in_symbolic_dynamo_and_aten_graphs(name):
    factory, make_input, expected = MODELS[name]
    model = factory()
    want = module_sites(model)
    got_sym = sorted((s.name, s.kind.name, s.width) for s in find_sites(symbolic_trace(model)))
    assert got_sym == want
    (gm,) = dynamo_graphs(model, make_input())
    got_dyn = sorted((s.name, s.kind.name, s.width) for s in find_sites(gm))
    assert got_dyn == want
    got_aten = sorted((s.kind.name, s.width) for s in find_sites(aten_graph(model, make_input())))
    assert got_aten == sorted((k, w) for _, k, w in want)
    assert sorted(s.name for s in find_sites(gm) if s.qualifies) == sorted(expected)


def test_qualification_rules():
    model = MODELS["cnn"][0]()
    sites = {s.name: s for s in find_sites(symbolic_trace(model), CosmicConfig(targets=["conv.*"], exclude=["conv2"]))}
    assert sites["conv1"].qualifies
    assert sites["conv2"].reason == "excluded"
    assert sites["fc1"].reason == "not in targets"
    assert sites["head"].reason == "width 10 <= 10"


def test_insert_qci_counts_modified_and_idempotent():
    model = MODELS["cnn"][0]()
    gm = symbolic_trace(model)
    n_before = len(gm.graph.nodes)
    counters.clear()
    result = InsertQCI(CosmicConfig())(gm)
    assert result.modified
    assert len(result.graph_module.graph.nodes) == n_before + 3
    assert counters["cosmic_fx"]["insert_qci"] == 3
    qcis = [n for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), QuantumClassicalInterface)]
    assert [n.target for n in qcis] == ["cosmic_qci.conv1", "cosmic_qci.conv2", "cosmic_qci.fc1"]
    assert [n.args[0].target for n in qcis] == ["conv1", "conv2", "fc1"]
    assert gm.get_submodule("cosmic_qci.conv1").feature_dim == -3
    again = InsertQCI(CosmicConfig())(gm)
    assert not again.modified and len(gm.graph.nodes) == n_before + 3
    assert counters["cosmic_fx"]["insert_qci"] == 3


@pytest.mark.parametrize("placement,expected_new", [("sites", 3), ("output", 1), ("none", 0)])
def test_insert_csc(placement, expected_new):
    gm = symbolic_trace(MODELS["cnn"][0]())
    InsertQCI(CosmicConfig())(gm)
    n_before = len(gm.graph.nodes)
    result = InsertCSC(CosmicConfig(csc=placement))(gm)
    assert result.modified == (expected_new > 0)
    assert len(gm.graph.nodes) == n_before + expected_new
    if placement == "sites":
        inserted = [n for n in gm.graph.nodes if n.meta.get("cosmic_fx", {}).get("inserted_by") == "insert_csc"]
        # CSC follows the QCI of each site, with the channel dim for convolutions
        assert [n.args[0].target for n in inserted] == ["cosmic_qci.conv1", "cosmic_qci.conv2", "cosmic_qci.fc1"]
        assert [gm.get_submodule(n.target).dim for n in inserted] == [-3, -3, -1]
    again = InsertCSC(CosmicConfig(csc=placement))(gm)
    assert not again.modified and len(gm.graph.nodes) == n_before + expected_new


def test_insert_csc_in_dynamo_graph_is_idempotent_and_skips_graph_breaks():
    model = MODELS["untraceable"][0]()
    graphs = dynamo_graphs(model, torch.rand(2, 8))
    assert len(graphs) == 2  # the data-dependent branch breaks the graph
    first, last = graphs
    assert not InsertCSC(CosmicConfig(csc="output"))(first).modified  # ends in a graph break
    assert InsertCSC(CosmicConfig(csc="output"))(last).modified
    assert not InsertCSC(CosmicConfig(csc="output"))(last).modified


def test_pass_on_graph_without_sites_changes_nothing():
    gm = symbolic_trace(nn.Sequential(nn.ReLU()))
    assert not InsertQCI(CosmicConfig())(gm).modified
    assert not InsertCSC(CosmicConfig(csc="sites"))(gm).modified
