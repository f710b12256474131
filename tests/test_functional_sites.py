"""Functional sites (F.linear / torch.addmm on the model's own parameters) get their QCI, and
TransformInfo.rewritten lists exactly what the passes inserted."""

import pytest
import torch
import torch.nn.functional as F
from cosmic_fx.passes import InsertCSC, InsertQCI
from torch._dynamo.utils import counters
from torch.testing import assert_close

import cosmic_fx
from cosmic_fx import CosmicConfig, QuantumClassicalInterface
from cosmic_fx.tracer import symbolic_trace

from .test_sites import FunctionalNet


def test_functional_sites_get_their_qci():
    torch.manual_seed(0)
    model = FunctionalNet()
    tm = cosmic_fx.transform(model, CosmicConfig(csc="none", qci_init="seed"))
    info = cosmic_fx.transform_info(tm)
    assert info.path == "symbolic_trace" and info.rewritten == ["w1", "w2"]
    assert [(s.name, s.form, s.qualifies) for s in info.sites] == [
        ("w1", "call", True), ("w2", "call", True), ("head", "module", False)]
    x = torch.rand(4, 8)
    # independent reference: the model's formulas with the QCIs applied by hand
    h = torch.relu(tm.cosmic_qci.w1(F.linear(x, model.w1, model.b1)))
    h = torch.relu(tm.cosmic_qci.w2(torch.addmm(model.b2, h, model.w2)))
    assert_close(tm(x), model.head(h))
    loss = tm(x).pow(2).mean()
    loss.backward()
    assert tm.cosmic_qci.w1.weight.grad is not None and model.w1.grad is not None


def test_insert_qci_counts_functional_sites_and_is_idempotent():
    gm = symbolic_trace(FunctionalNet())
    n_before = len(gm.graph.nodes)
    counters.clear()
    assert InsertQCI(CosmicConfig())(gm).modified
    assert len(gm.graph.nodes) == n_before + 2 and counters["cosmic_fx"]["insert_qci"] == 2
    qcis = [n for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), QuantumClassicalInterface)]
    assert [n.args[0].target for n in qcis] == [F.linear, torch.addmm]
    assert not InsertQCI(CosmicConfig())(gm).modified and len(gm.graph.nodes) == n_before + 2


@pytest.mark.parametrize("config, rewritten", [
    (CosmicConfig(csc="none"), ["w1", "w2"]),
    (CosmicConfig(qci=False, csc="none"), []),          # nothing inserted: nothing rewritten
    (CosmicConfig(qci=False, csc="sites"), ["w1", "w2"]),  # CSC alone after each site
    (CosmicConfig(csc="none", exclude=["w2"]), ["w1"]),
])
def test_rewritten_is_what_was_inserted(config, rewritten):
    tm = cosmic_fx.transform(FunctionalNet(), config)
    info = cosmic_fx.transform_info(tm)
    assert info.rewritten == rewritten
    inserted = {n.meta["cosmic_fx"]["site"] for n in info.graph_module.graph.nodes if "cosmic_fx" in n.meta}
    assert inserted == set(rewritten)


def test_a_layer_called_twice_shares_one_qci():
    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(16, 16)

        def forward(self, x):
            return self.fc(torch.relu(self.fc(x)))

    torch.manual_seed(0)
    model = Twice()
    tm = cosmic_fx.transform(model, CosmicConfig(csc="none", qci_init="seed"))
    info = cosmic_fx.transform_info(tm)
    assert [s.name for s in info.sites] == ["fc", "fc"] and info.rewritten == ["fc"]
    assert sum(isinstance(m, QuantumClassicalInterface) for m in tm.modules()) == 1
    x = torch.rand(2, 16)
    q = tm.cosmic_qci.fc
    assert_close(tm(x), q(model.fc(torch.relu(q(model.fc(x))))))


def test_csc_sites_after_a_multihead_attention_output():
    from .test_sites import WithMHA

    torch.manual_seed(0)
    model = WithMHA()
    gm = symbolic_trace(model)
    InsertQCI(CosmicConfig())(gm)
    n = len(gm.graph.nodes)
    assert InsertCSC(CosmicConfig(csc="sites"))(gm).modified
    assert len(gm.graph.nodes) == n + 2  # after the MHA item's QCI and after fc's QCI
    assert not InsertCSC(CosmicConfig(csc="sites"))(gm).modified
    x = torch.rand(2, 5, 16)
    csc = cosmic_fx.cosmic_state_compression
    h = csc(gm.cosmic_qci.attn.out_proj(model.attn(x, x, x, need_weights=False)[0]))
    assert_close(gm(x), csc(gm.cosmic_qci.fc(model.fc(h))))


def test_explain_shows_functional_sites_with_shapes():
    torch.manual_seed(0)
    report = cosmic_fx.explain(FunctionalNet(), torch.rand(4, 8))
    rows = [(r.name, r.kind, r.input_shape, r.output_shape, r.inserted) for r in report.sites]
    assert rows == [("w1", "linear", (4, 8), (4, 24), ["cosmic_qci.w1"]),
                    ("w2", "hf_conv1d", (4, 24), (4, 16), ["cosmic_qci.w2"]),
                    ("head", "linear", (4, 16), (4, 3), [])]
    assert report.totals["sites_rewritten"] == 2 and "cosmic_qci_w1 = self.cosmic_qci.w1(linear)" in report.graph_after
