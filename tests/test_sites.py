"""The table of site kinds: every kind is recognised as a module and as a call, in symbolic_trace,
dynamo and ATen graphs, with the same name, kind and width; what is not a site says why."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

import cosmic_fx
from cosmic_fx import CosmicConfig
from cosmic_fx.modules import QuantumClassicalInterface
from cosmic_fx.sites import NOT_SITES, SITE_KINDS, kind_by_name, module_sites
from cosmic_fx.tracer import find_sites, output_layer_params, site_value, sites_in_forward_order, symbolic_trace

from .test_tracer_passes import aten_graph, dynamo_graphs


class HandConv1D(nn.Module):
    """Hugging Face's Conv1D, written here: weight (in, out), forward addmm(bias, x.view(-1, in), weight)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class FunctionalNet(nn.Module):
    """Linear layers written as F.linear / torch.addmm calls on the model's own parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(24, 8) * 0.2)
        self.b1 = nn.Parameter(torch.zeros(24))
        self.w2 = nn.Parameter(torch.randn(24, 16) * 0.2)  # stored (in, out), used through addmm
        self.b2 = nn.Parameter(torch.zeros(16))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = torch.relu(F.linear(x, self.w1, self.b1))
        h = torch.relu(torch.addmm(self.b2, h, self.w2))
        return self.head(h)


class ConvAndConv1D(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, padding=1)
        self.proj = HandConv1D(20, 12)
        self.out = nn.Linear(20, 4)

    def forward(self, x):
        h = torch.relu(self.conv(x)).mean((2, 3))
        return self.out(self.proj(h.unsqueeze(1))).squeeze(1)


class WithMHA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc = nn.Linear(16, 12)

    def forward(self, x):
        h, _ = self.attn(x, x, x, need_weights=False)
        return self.fc(h)


# (model factory, input maker, expected sites [(name, kind, width)] in forward order)
CASES = {
    "conv2d+conv1d": (ConvAndConv1D, lambda: torch.rand(2, 3, 6, 6),
                      [("conv", "conv2d", 12), ("proj", "hf_conv1d", 20), ("out", "linear", 4)]),
    "functional": (FunctionalNet, lambda: torch.rand(4, 8),
                   [("w1", "linear", 24), ("w2", "hf_conv1d", 16), ("head", "linear", 3)]),
}


def test_table_names_every_kind_once_and_documents_the_non_sites():
    names = [k.name for k in SITE_KINDS]
    assert names == ["linear", "conv2d", "hf_conv1d", "mha_out_proj", "mha_in_proj"]
    assert kind_by_name("hf_conv1d").feature_dim == -1 and kind_by_name("conv2d").feature_dim == -3
    with pytest.raises(ValueError, match="unknown site kind 'conv3d'; the kinds are linear, conv2d"):
        kind_by_name("conv3d")
    assert set(NOT_SITES) == {nn.Embedding, nn.Conv1d, nn.Conv3d}
    model = nn.Sequential(nn.Embedding(10, 16), nn.Conv1d(16, 16, 1), nn.Conv3d(2, 16, 1))
    assert module_sites(model) == []
    with pytest.raises(ValueError, match=r"has no site.*It has Conv1d, Conv3d, Embedding, which are not sites"):
        cosmic_fx.transform(model)


def test_embedding_is_not_a_site_because_a_qci_after_it_is_a_new_table():
    """Measured reason in NOT_SITES[nn.Embedding]: qci(E[ids]) == qci(E)[ids] for any QCI."""
    torch.manual_seed(0)
    emb, qci = nn.Embedding(10, 16), QuantumClassicalInterface(16, init="seed")
    ids = torch.randint(0, 10, (3, 5))
    assert_close(qci(emb(ids)), qci(emb.weight)[ids])


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_kind_in_symbolic_dynamo_and_aten_graphs(case):
    factory, make_input, expected = CASES[case]
    torch.manual_seed(0)
    model = factory()
    got_sym = [(s.name, s.kind.name, s.width) for s in find_sites(symbolic_trace(model))]
    assert got_sym == expected
    (gm,) = dynamo_graphs(model, make_input())
    sites = find_sites(gm)
    assert [(s.name, s.kind.name, s.width) for s in sites] == expected
    for site in sites:  # the value a QCI would follow: features where the kind says, at the layer's full shape
        value = site_value(site).meta["example_value"]
        assert value.shape[site.feature_dim] == site.width
        if site.kind.name == "hf_conv1d" and case == "conv2d+conv1d":
            assert value.dim() == 3 and site.node.target is torch.addmm  # through the layer's own view back
    aten = [(s.kind.name, s.width) for s in find_sites(aten_graph(model, make_input()))]
    assert aten == [(k, w) for _, k, w in expected]


def test_module_sites_agree_with_the_graph():
    torch.manual_seed(0)
    model = ConvAndConv1D()
    assert [(s.name, s.kind.name, s.width) for s in module_sites(model)] == CASES["conv2d+conv1d"][2]
    assert [s.params for s in module_sites(model)] == [("conv.weight", "conv.bias"), ("proj.weight", "proj.bias"),
                                                        ("out.weight", "out.bias")]


def test_real_hf_conv1d_is_recognised_by_structure():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    model = nn.Sequential(Conv1D(24, 8), nn.ReLU(), Conv1D(4, 24))
    found = [(s.name, s.kind.name, s.width) for s in module_sites(model)]
    assert found == [("0", "hf_conv1d", 24), ("2", "hf_conv1d", 4)]
    tm = cosmic_fx.transform(model, CosmicConfig(csc="none"))
    x = torch.rand(2, 5, 8)
    assert cosmic_fx.transform_info(tm).rewritten == ["0"] and torch.equal(tm(x), model(x))


def test_multihead_attention_sites_and_what_is_not_rewritten():
    torch.manual_seed(0)
    model = WithMHA()
    sites = module_sites(model)
    assert [(s.name, s.kind.name, s.width, s.qualifies) for s in sites] == [
        ("attn.out_proj", "mha_out_proj", 16, True), ("attn.in_proj_weight", "mha_in_proj", 48, False),
        ("fc", "linear", 12, True)]
    assert sites[1].reason.startswith("not rewritable: read inside F.multi_head_attention_forward")
    (gm,) = dynamo_graphs(model, torch.rand(2, 5, 16))
    assert [(s.name, s.kind.name, s.width) for s in find_sites(gm)] == [
        ("attn.out_proj", "mha_out_proj", 16), ("attn.in_proj_weight", "mha_in_proj", 48), ("fc", "linear", 12)]
    tm = cosmic_fx.transform(model, CosmicConfig(csc="none", qci_init="seed"))
    info = cosmic_fx.transform_info(tm)
    assert info.path == "symbolic_trace" and info.rewritten == ["attn.out_proj", "fc"]
    x = torch.rand(2, 5, 16)
    h = tm.cosmic_qci.attn.out_proj(model.attn(x, x, x, need_weights=False)[0])  # QCI on out_proj's output
    assert_close(tm(x), tm.cosmic_qci.fc(model.fc(h)))


def test_conv1d_like_layer_with_a_non_2d_weight_is_refused():
    class Bad(HandConv1D):
        def __init__(self):
            super().__init__(8, 4)
            self.weight = nn.Parameter(torch.randn(4, 8, 1))

        def forward(self, x):
            return torch.addmm(self.bias, x, self.weight.view(4, 8))

    with pytest.raises(ValueError, match=r"Bad computes torch\.addmm\(bias, x, weight\).*shape \(4, 8, 1\).*2-D"):
        cosmic_fx.transform(nn.Sequential(Bad()))


def test_lazy_module_asks_for_a_forward_first():
    model = nn.Sequential(nn.LazyLinear(16), nn.ReLU())
    with pytest.raises(ValueError, match=r"0 \(LazyLinear\) has parameters that are not materialised.*Run one forward"):
        cosmic_fx.transform(model)
    model(torch.rand(2, 3))
    assert cosmic_fx.transform_info(cosmic_fx.transform(model)).rewritten == ["0"]


def test_regexes_that_match_nothing_warn_with_the_site_names():
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 12))
    with pytest.warns(UserWarning, match=r"targets pattern\(s\) \['fc1'\] match no site; the sites are: 0, 2"):
        tm = cosmic_fx.transform(model, CosmicConfig(targets=["0", "fc1"]))
    assert cosmic_fx.transform_info(tm).rewritten == ["0"]
    with pytest.warns(UserWarning, match=r"exclude pattern\(s\) \['head'\] match no site"):
        cosmic_fx.transform(model, CosmicConfig(exclude=["head"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cosmic_fx.transform(model, CosmicConfig(targets=["0"], exclude=["2"]))  # all match: no warning


@pytest.mark.parametrize("bad, expected", [
    ({"csc": "none"}, r"got a dict\. Pass CosmicConfig\.from_options\(your_dict\)"),
    ("seed", r"got a str\. Pass CosmicConfig\.from_options\(\{'preset': 'seed'\}\)"),
])
def test_config_must_be_a_cosmic_config(bad, expected):
    model = nn.Sequential(nn.Linear(4, 16))
    with pytest.raises(TypeError, match=r"cosmic_fx\.transform: config must be a CosmicConfig; " + expected):
        cosmic_fx.transform(model, bad)
    with pytest.raises(TypeError, match=r"cosmic_fx\.compile: config must be a CosmicConfig; " + expected):
        cosmic_fx.compile(model, bad)


def test_forward_order_and_output_layer_params():
    torch.manual_seed(0)
    model = FunctionalNet()
    order = sites_in_forward_order(symbolic_trace(model))
    assert [(s.name, s.kind, s.params) for s in order] == [
        ("w1", "linear", ("w1", "b1")), ("w2", "hf_conv1d", ("w2", "b2")),
        ("head", "linear", ("head.weight", "head.bias"))]
    (gm,) = dynamo_graphs(model, torch.rand(4, 8))
    assert [s.params for s in sites_in_forward_order(gm)] == [s.params for s in order]
    assert output_layer_params(gm) == ["head.weight", "head.bias"]
    seq = nn.Sequential(nn.Linear(4, 16), nn.Linear(16, 12), nn.LayerNorm(12))
    (gm,) = dynamo_graphs(seq, torch.rand(2, 4))
    assert output_layer_params(gm) == ["1.weight", "1.bias", "2.weight", "2.bias"]
