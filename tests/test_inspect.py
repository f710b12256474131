"""cosmic_fx.explain / Report, and the backend watch (what the cosmic backend did)."""

import json
import math
import re

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import cosmic_fx
from cosmic_fx import CosmicConfig
from cosmic_fx.inspect import watch_backend

from .conftest import MODELS, Untraceable

THREE = ["mlp", "cnn", "transformer"]


def tree_sites(model):
    """(name, kind, in features, out features) from the module tree, independent of the tracer."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            out.append((name, "conv2d", m.in_channels, m.out_channels))
        elif isinstance(m, nn.Linear):
            out.append((name, "linear", m.in_features, m.out_features))
    return out


def ref_efficiency(t, dim, eps=1e-8):
    """E = (I - S) / (I + S + eps), written out independently of cosmic_fx.quantities."""
    t = t.detach().double()
    if t.dim() == 0:
        t = t.reshape(1)
    p = torch.softmax(t, dim)
    i = t.abs().mean()
    s = (-p * torch.log(p)).mean()
    return float((i - s) / (i + s + eps))


def build(name, seed=0):
    factory, make_input, _ = MODELS[name]
    torch.manual_seed(seed)
    return factory(), make_input


@pytest.mark.parametrize("csc", ["output", "sites"])
@pytest.mark.parametrize("name", THREE)
def test_table_lists_every_site_with_correct_counts(name, csc):
    model, make_input = build(name)
    x = make_input(4)
    report = cosmic_fx.explain(model, x, CosmicConfig(csc=csc))
    expected = tree_sites(model)
    assert [(s.name, s.kind) for s in report.sites] == [(n, k) for n, k, _, _ in expected]
    rewritten = 0
    for row, (n, kind, fan_in, width) in zip(report.sites, expected):
        feature = -1 if kind == "linear" else 1
        assert row.input_shape[feature] == fan_in and row.output_shape[feature] == width
        assert row.qualifies == (width > 10)
        if not row.qualifies:
            assert row.reason == f"width {width} <= 10"
            assert row.inserted == [] and row.params_added == 0 and row.flops_added == 0
            continue
        rewritten += 1
        assert row.reason == ""
        assert row.inserted == [f"cosmic_qci.{n}"] + ([f"cosmic_csc.{n}"] if csc == "sites" else [])
        assert row.params_added == (width + 1) * width + (width + 1) + 1  # P and h weights, biases, beta
        vectors = math.prod(row.output_shape) // width
        assert row.flops_added == 2 * vectors * width * (width + 1)  # one (width+1) x width matmul per vector
    t = report.totals
    assert t["sites_found"] == len(expected) and t["sites_rewritten"] == rewritten > 0
    assert t["params_before"] == sum(p.numel() for p in model.parameters())
    assert t["params_after"] - t["params_before"] == sum(r.params_added for r in report.sites)
    assert t["flops_after"] - t["flops_before"] == sum(r.flops_added for r in report.sites)
    table = report.site_table()
    for row in report.sites:
        assert re.search(rf"^\| {re.escape(row.name)} +\| {row.kind}", table, re.M)
    assert len(table.splitlines()) == 2 + len(expected)


def diff_names(diff):
    """Variable names on the added / removed lines of a unified diff of forward code."""
    added, removed = [], []
    for line in diff.splitlines():
        if line.startswith(("+++", "---")) or not line.startswith(("+", "-")):
            continue
        body = line[1:].strip()
        name = "return" if body.startswith("return") else body.split(" = ")[0]
        (added if line[0] == "+" else removed).append(name)
    return added, removed


@pytest.mark.parametrize("csc", ["output", "sites", "none"])
@pytest.mark.parametrize("name", THREE)
def test_diff_shows_exactly_the_inserted_nodes(name, csc):
    model, make_input = build(name)
    report = cosmic_fx.explain(model, make_input(2), CosmicConfig(csc=csc))
    qualifying = [n for n, _, _, w in tree_sites(model) if w > 10]
    expected = []
    for n in qualifying:
        expected.append(f"cosmic_qci_{n.replace('.', '_')}")
        if csc == "sites":
            expected.append(f"cosmic_csc_{n.replace('.', '_')}")
    if csc == "output":
        expected.append("cosmic_csc_output")
    added, removed = diff_names(report.diff)
    # every removed line comes back rewired; the only new names are the inserted nodes
    assert sorted(set(added) - set(removed)) == sorted(expected)
    assert len(added) == len(removed) + len(expected)
    assert set(removed) <= set(added)
    assert sorted(report.inserted_nodes) == sorted(expected)
    assert "cosmic" not in report.graph_before
    assert len(re.findall(r"self\.cosmic_(?:qci|csc)\b", report.graph_after)) == len(expected)
    assert report.diff.startswith(f"--- {type(model).__name__} (before)\n+++ {type(model).__name__} (cosmic)\n")


def test_dot_highlights_exactly_the_inserted_nodes():
    model, make_input = build("cnn")
    report = cosmic_fx.explain(model, make_input(2), CosmicConfig(csc="sites"))
    dot = report.dot
    assert dot.startswith('digraph "DigitsCNN" {') and dot.rstrip().endswith("}")
    filled = dict(re.findall(r'^  "(\w+)" \[label="[^"]*", fillcolor="(#\w+)"', dot, re.M))
    qci = sorted(n for n, c in filled.items() if c == "#ffd54f")
    csc = sorted(n for n, c in filled.items() if c == "#81d4fa")
    assert qci == ["cosmic_qci_conv1", "cosmic_qci_conv2", "cosmic_qci_fc1"]
    assert csc == ["cosmic_csc_conv1", "cosmic_csc_conv2", "cosmic_csc_fc1"]
    edges = re.findall(r'^  "(\w+)" -> "(\w+)"', dot, re.M)
    assert ("conv1", "cosmic_qci_conv1") in edges and ("cosmic_csc_conv1", "relu") in edges
    assert ("conv1", "relu") not in edges
    assert "\n" not in re.search(r'label="([^"]*)"', dot).group(1)  # labels escape their line breaks


def test_svg_needs_graphviz_and_says_so(monkeypatch):
    import cosmic_fx.report as report_mod

    model, make_input = build("mlp")
    report = cosmic_fx.explain(model, make_input(2))
    monkeypatch.setattr(report_mod.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match=r"Graphviz's `dot` program was not found on PATH.*report\.dot"):
        report.svg()
    html = report._repr_html_()
    assert "report.plot()" in html and "<table>" in html and "cosmic_qci" in html


def test_svg_with_graphviz():
    import shutil

    if shutil.which("dot") is None:
        pytest.skip("Graphviz is not installed")
    model, make_input = build("mlp")
    svg = cosmic_fx.explain(model, make_input(2)).svg()
    assert "<svg" in svg and "cosmic_qci_0" in svg


def test_plot_draws_every_node():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model, make_input = build("cnn")
    report = cosmic_fx.explain(model, make_input(2))
    ax = report.plot()
    labels = [t.get_text() for t in ax.texts if t.get_text()]  # arrows are empty annotations
    assert len(labels) == len(report._nodes)
    assert {"cosmic_qci_conv1", "cosmic_csc_output", "head"} <= set(labels)
    plt.close("all")


@pytest.mark.parametrize("preset", ["seed", "default"])
def test_efficiencies_and_cdg_prediction(preset):
    model, make_input = build("cnn")
    x = make_input(8)
    config = CosmicConfig.preset(preset)
    report = cosmic_fx.explain(model, x, config)
    tm = cosmic_fx.transform(model, config)
    with torch.no_grad():
        for (name, p), row in zip(tm.named_parameters(), report.params):
            assert row.name == name
            assert row.efficiency == pytest.approx(ref_efficiency(p, 0), abs=1e-6)
        out = tm.eval()(x)
    # seed QCIs are random: compare E_out through the report's own parameters, not tm's
    if preset == "default":
        assert report.e_out == pytest.approx(ref_efficiency(out, -1), abs=1e-6)
    low = {r.name for r in report.params if r.efficiency < report.e_out}
    if preset == "seed":
        assert set(report.cdg_would_freeze) == low
        assert all(r.cce_scale == r.efficiency for r in report.params)
    else:
        frozen = set(report.cdg_would_freeze)
        assert frozen <= low
        assert len(frozen) <= math.ceil(config.cdg_max_frozen * len(report.params))
        assert not any(n.startswith(("head.", "cosmic_qci.head.")) for n in frozen)  # output layer protected
        unprotected = [r for r in report.params if r.name in low and "protected" not in r.cdg]
        lowest = sorted(unprotected, key=lambda r: r.efficiency)[: len(frozen)]
        assert {r.name for r in lowest} == frozen
        assert all(config.cce_min <= r.cce_scale <= config.cce_max for r in report.params)
    assert report.params[-1].added and not report.params[0].added


def test_explain_leaves_the_model_its_modes_and_the_rng_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(), nn.Dropout(0.5),
                          nn.Linear(16 * 36, 12)).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(4, 1, 8, 8)
    rng = torch.get_rng_state()
    report = cosmic_fx.explain(model, x, CosmicConfig.seed())
    assert all(m.training for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # BatchNorm stats untouched
    assert torch.equal(torch.get_rng_state(), rng)
    assert [s.name for s in report.sites] == ["0", "5"]


def test_explain_of_a_transformed_model_reports_the_same_rewrite():
    model, make_input = build("transformer")
    x = make_input(2)
    direct = cosmic_fx.explain(model, x)
    tm = cosmic_fx.transform(model)
    with torch.no_grad():
        tm.cosmic_qci.head.weight.add_(0.5)  # as if trained: E(p) must come from tm's own parameters
    via_tm = cosmic_fx.explain(tm, x)
    assert via_tm.diff == direct.diff and via_tm.site_table() == direct.site_table()
    row = next(r for r in via_tm.params if r.name == "cosmic_qci.head.weight")
    assert row.efficiency == pytest.approx(ref_efficiency(tm.cosmic_qci.head.weight, 0), abs=1e-6)
    with pytest.raises(ValueError, match="already transformed with another config"):
        cosmic_fx.explain(tm, x, CosmicConfig.seed())


def test_untraceable_model_gets_a_module_call_view():
    torch.manual_seed(0)
    model = Untraceable()
    report = cosmic_fx.explain(model, torch.rand(4, 8))
    assert report.path == "module_swap"
    assert re.match(r"path: module swap \(forward hooks on each site\), because this model's forward branches on "
                    r"tensor values \(data-dependent control flow\), which torch\.fx\.symbolic_trace cannot follow; "
                    r"nothing is lost", report.note)
    assert [(s.name, s.qualifies) for s in report.sites] == [("fc1", True), ("fc2", True), ("head", False)]
    added, removed = diff_names(report.diff)
    assert sorted(set(added) - set(removed)) == ["cosmic_csc_output", "cosmic_qci_fc1", "cosmic_qci_fc2"]
    assert "fc2 = self.fc2(...)" in report.graph_before  # its input came through torch.relu / h * 2
    assert report.totals["params_after"] - report.totals["params_before"] == 33 * 32 + 33 + 1 + 17 * 16 + 17 + 1
    with pytest.raises(ValueError, match="needs the original model.*module swap"):
        cosmic_fx.explain(cosmic_fx.transform(model), torch.rand(4, 8))


def test_json_and_text_forms():
    model, make_input = build("mlp")
    report = cosmic_fx.explain(model, make_input(3), CosmicConfig(csc="sites"))
    data = json.loads(report.to_json())
    assert data["model"] == "DigitsMLP" and data["input_shapes"] == [[3, 64]]
    assert data["config"] == CosmicConfig(csc="sites").to_options()
    assert [s["name"] for s in data["sites"]] == ["0", "2", "4"]
    assert data["sites"][0]["output_shape"] == [3, 128] and data["sites"][0]["inserted"] == ["cosmic_qci.0", "cosmic_csc.0"]
    assert data["totals"] == report.totals and data["diff"] == report.diff
    assert len(data["parameters"]) == len(list(cosmic_fx.transform(model).parameters()))
    text = str(report)
    assert "3 found, 2 rewritten" in text and f"{report.totals['params_after']:,}" in text
    assert "no: width 10 <= 10" in text and "E_out = " in text
    assert repr(report) == f"<cosmic_fx.Report DigitsMLP: 2/3 sites rewritten, +{report.totals['params_after'] - report.totals['params_before']:,} params>"


def test_bad_inputs_are_explained():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(ValueError, match=r"cannot run on example inputs of shape \(4, 3\).*first layer 0 is Linear.*\(\.\.\., 8\)"):
        cosmic_fx.explain(model, torch.rand(4, 3))
    with pytest.raises(TypeError, match="cosmic_fx.explain expects an nn.Module; got function"):
        cosmic_fx.explain(lambda x: x, torch.rand(4, 8))
    with pytest.raises(ValueError, match="example_inputs is empty"):
        cosmic_fx.explain(model, ())


# ----------------------------------------------------------------------------- the backend's view
def test_watch_backend_reports_graphs_hooks_and_recompiles():
    torch.manual_seed(0)
    model = MODELS["mlp"][0]()
    cfg = CosmicConfig(lower="eager")
    tm = cosmic_fx.transform(model, cfg)
    compiled = torch.compile(tm, backend="cosmic", options={"config": cfg})
    with watch_backend(tm) as watch:
        compiled(torch.rand(8, 64)).logsumexp(-1).mean().backward()
    report = watch.report
    assert len(report.graphs) == 1 and report.graph_breaks == 0 and report.recompiles == 0
    (graph,) = report.graphs
    assert [s.name for s in graph.sites] == ["0", "2", "4"] and graph.missing_qci == []
    assert "cosmic_qci" in graph.graph_before and graph.graph_after != graph.graph_before  # E_out output added
    n_params = len(list(tm.parameters()))
    assert report.hooked_params == n_params == graph.hooked_params
    assert report.last_step["step"] == 1 and len(report.last_step["efficiency"]) == n_params
    with watch_backend(tm) as again:
        compiled(torch.rand(5, 64)).sum().backward()  # a new batch size: dynamo recompiles
    assert again.report.recompiles == len(again.report.graphs) >= 1
    with watch_backend(tm) as quiet:
        compiled(torch.rand(5, 64))
    assert quiet.report.graphs == []  # cached: the backend was not called
    text = str(again.report)
    assert "recompile(s)" in text and f"{n_params} parameter(s) hooked" in text


def test_watch_backend_counts_graph_breaks():
    torch.manual_seed(0)
    cfg = CosmicConfig(lower="eager", csc="none")
    tm = cosmic_fx.transform(Untraceable(), cfg)
    compiled = torch.compile(tm, backend="cosmic", options={"config": cfg})
    x = torch.rand(4, 8)
    with watch_backend(tm) as watch:
        out = compiled(x)
    assert_close(out, tm(x))
    report = watch.report
    assert report.graph_breaks == 1 and len(report.graphs) >= 2
    assert any("conftest.py:" in r and "ata-dependent" in r for r in report.break_reasons)
    assert report.to_dict()["graph_breaks"] == 1
    assert "graph break reasons:" in str(report) and "<table>" in report._repr_html_()


@pytest.mark.parametrize("name, preset", [("transformer", "seed"), ("cnn", "default")])
def test_cdg_prediction_agrees_with_the_hooks(name, preset):
    """What explain says CDG would do now is what CosmicHooks does on a step with the same weights."""
    model, make_input = build(name)  # no dropout / batch norm: train and eval outputs agree
    x = make_input(8)
    config = CosmicConfig.preset(preset, cdg_patience=1, cdg_interval=1)
    tm = cosmic_fx.transform(model, config)
    report = cosmic_fx.explain(tm, x)
    hooks = cosmic_fx.attach_hooks(tm, config)
    try:
        tm(x).logsumexp(-1).mean().backward()
        step = hooks.last_step
        assert step["e_out"] == pytest.approx(report.e_out, abs=1e-6)
        assert step["efficiency"] == pytest.approx({p.name: p.efficiency for p in report.params}, abs=1e-6)
        acted = step["skipped"] if preset == "seed" else hooks.frozen
        assert sorted(acted) == sorted(report.cdg_would_freeze) and acted
        if preset == "seed":
            assert step["scale"] == pytest.approx({p.name: p.cce_scale for p in report.params if p.cdg != "skip"})
    finally:
        hooks.remove()
