"""Every QCI form (dense, low-rank, diagonal): the identity at insertion, the text's formula and its
gradients against an unfused reference written here, the config knobs, and the whole product path
(transform, compile, explain, .pt2 / ONNX / adapter export)."""

import itertools
import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import cosmic_fx
from cosmic_fx import CosmicConfig, DiagonalQCI, LowRankQCI, QCIForm, QuantumClassicalInterface
from cosmic_fx.modules import make_qci

from .conftest import MODELS

FORMS = ["dense", "lowrank", "diagonal"]
SHAPES = [(-1, (5, 12)), (-1, (2, 3, 12)), (-3, (2, 12, 4, 4)), (-3, (12, 3, 3))]
RANK = 4


def build(form, dim=12, init="seed", feature_dim=-1, **kwargs):
    return make_qci(dim, feature_dim, CosmicConfig(qci_form=form, qci_rank=RANK, qci_init=init, **kwargs), None)


def reference_projector(qci):
    """P's weight built from the form's raw parameters, independently of the module's own code."""
    d = qci.dim
    if isinstance(qci, LowRankQCI):
        return torch.eye(d) + qci.up @ qci.down
    if isinstance(qci, DiagonalQCI):
        return torch.diag(qci.scale)
    return qci.weight[:d]


def reference_estimator(qci):
    return qci.h_weight if isinstance(qci, (LowRankQCI, DiagonalQCI)) else qci.weight[qci.dim :]


def reference_qci(qci, x):
    """The source text's QCI, unfused: P and h as two separate linear maps, the gate as written."""
    fd, d, eps = qci.feature_dim, qci.dim, qci.eps
    xl = x if fd == -1 else x.movedim(fd, -1)
    p = xl @ reference_projector(qci).T + qci.bias[:d]
    h = xl @ reference_estimator(qci).T + qci.bias[d:]
    gate = torch.sigmoid(qci.beta * (p.abs().mean(-1, keepdim=True) / (torch.sigmoid(h) + eps)))
    out = gate * p + (1 - gate) * xl
    return out if fd == -1 else out.movedim(-1, fd)


def perturb(module, scale=0.1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


# ----------------------------------------------------------------------------- the module
@pytest.mark.parametrize("form,case,dtype", list(itertools.product(FORMS, SHAPES, [torch.float32, torch.bfloat16])))
def test_every_form_is_exactly_the_identity_at_insertion(form, case, dtype):
    feature_dim, shape = case
    qci = make_qci(12, feature_dim, CosmicConfig(qci_form=form, qci_rank=RANK), torch.empty(0, dtype=dtype))
    assert qci.form is QCIForm(form)
    x = torch.randn(shape, dtype=dtype) * 10
    out = qci(x)
    assert out.dtype == dtype and torch.equal(out, x)


@pytest.mark.parametrize("form,case", list(itertools.product(FORMS, SHAPES)))
@pytest.mark.parametrize("init", ["seed", "identity"])
def test_forward_and_every_gradient_match_the_unfused_reference(form, case, init):
    feature_dim, shape = case
    torch.manual_seed(0)
    qci = build(form, init=init, feature_dim=feature_dim)
    perturb(qci)  # away from the identity: a trained state, where every term of the formula matters
    x = torch.randn(shape, requires_grad=True)
    g = torch.randn(shape)
    out = qci(x)
    ref = reference_qci(qci, x)
    assert_close(out, ref)
    assert not torch.allclose(out, x)
    params = [x, *qci.parameters()]
    got = torch.autograd.grad(out, params, g)
    want = torch.autograd.grad(ref, params, g)
    for (name, _), a, b in zip([("input", x), *qci.named_parameters()], got, want):
        assert_close(a, b, msg=lambda m, name=name: f"gradient of {name}: {m}")


@pytest.mark.parametrize("form", FORMS)
def test_identity_init_learns_away_from_the_identity(form):
    torch.manual_seed(0)
    qci = build(form, init="identity")
    x = torch.randn(16, 12)
    opt = torch.optim.SGD(qci.parameters(), lr=0.5)
    (qci(x) * torch.randn(16, 12)).sum().backward()
    # the projector's own parameters get a gradient at once (low-rank: B, since A is random)
    moving = {"dense": "weight", "lowrank": "up", "diagonal": "scale"}[form]
    assert dict(qci.named_parameters())[moving].grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(qci(x), x)


@pytest.mark.parametrize("form,expected", [
    ("dense", 12 * 13 + 13 + 1),  # P and h: (dim + 1) x dim, bias dim + 1, beta
    ("lowrank", RANK * 12 + 12 * RANK + 12 + 13 + 1),  # A, B, h, bias, beta
    ("diagonal", 12 + 12 + 13 + 1),  # scale, h, bias, beta
])
def test_parameter_counts(form, expected):
    assert sum(p.numel() for p in build(form).parameters()) == expected


@pytest.mark.parametrize("form", FORMS)
def test_projector_and_estimator_views_mean_what_the_text_means(form):
    torch.manual_seed(0)
    qci = build(form)
    perturb(qci)
    x = torch.randn(3, 12)
    with torch.no_grad():
        p = x @ qci.projector_weight.T + qci.projector_bias
        h = x @ qci.estimator_weight.T + qci.estimator_bias
        gate = torch.sigmoid(qci.beta * p.abs().mean(-1, keepdim=True) / (torch.sigmoid(h) + qci.eps))
        assert_close(qci(x), gate * p + (1 - gate) * x)
    assert qci.projector_weight.shape == (12, 12) and qci.estimator_weight.shape == (1, 12)
    assert qci.projector_bias.shape == (12,) and qci.estimator_bias.shape == (1,)


def test_dense_constructor_and_layout_unchanged():
    qci = QuantumClassicalInterface(10, 0.5, init="seed", feature_dim=-3)
    assert type(qci) is QuantumClassicalInterface and qci.form is QCIForm.DENSE
    assert [n for n, _ in qci.named_parameters()] == ["beta", "weight", "bias"]
    assert qci.weight.shape == (11, 10) and qci.beta.item() == 0.5
    assert qci.projector_weight.data_ptr() == qci.weight.data_ptr()  # still a view


def test_cheap_forms_are_qcis_with_their_own_parameters():
    low, diag = LowRankQCI(20, rank=3), DiagonalQCI(20)
    assert isinstance(low, QuantumClassicalInterface) and isinstance(diag, QuantumClassicalInterface)
    assert {n: tuple(p.shape) for n, p in low.named_parameters()} == {
        "beta": (), "bias": (21,), "down": (3, 20), "up": (20, 3), "h_weight": (1, 20)}
    assert {n: tuple(p.shape) for n, p in diag.named_parameters()} == {
        "beta": (), "bias": (21,), "scale": (20,), "h_weight": (1, 20)}
    assert torch.equal(low.up, torch.zeros(20, 3)) and torch.equal(diag.scale, torch.ones(20))
    assert "rank=3" in repr(low) and "form=diagonal" in repr(diag)


# ----------------------------------------------------------------------------- config and errors
@pytest.mark.parametrize("bad", ["full", "LoRA", 3, None])
def test_bad_qci_form_is_refused_with_the_valid_values(bad):
    with pytest.raises(ValueError, match=r"CosmicConfig.qci_form must be one of 'dense', 'lowrank', 'diagonal'; got"):
        CosmicConfig(qci_form=bad)


@pytest.mark.parametrize("bad", [0, -4, 2.5, True, "8"])
def test_bad_qci_rank_is_refused(bad):
    with pytest.raises(ValueError, match=r"CosmicConfig.qci_rank must be an int >= 1; got"):
        CosmicConfig(qci_rank=bad)


@pytest.mark.parametrize("bad", [0, 13, 2.0, True])
def test_low_rank_module_rank_must_fit_the_width(bad):
    with pytest.raises(ValueError, match=r"LowRankQCI rank must be an int in \[1, dim=12\]; got"):
        LowRankQCI(12, rank=bad)


def test_config_round_trips_and_narrow_sites_use_their_width_as_rank():
    cfg = CosmicConfig.from_options({"qci_form": "LowRank", "qci_rank": 32})
    assert cfg.qci_form is QCIForm.LOWRANK and cfg.qci_rank == 32
    assert CosmicConfig.from_options(cfg.to_options()) == cfg
    assert CosmicConfig().qci_form is QCIForm.DENSE  # the default stays the text's form
    assert make_qci(12, -1, cfg, None).rank == 12
    assert make_qci(64, -1, cfg, None).rank == 32
    like = torch.empty(0, dtype=torch.float64)
    assert make_qci(64, -3, cfg, like).down.dtype == torch.float64


def test_wrong_feature_count_names_the_form():
    with pytest.raises(ValueError, match=r"DiagonalQCI\(dim=4\) expects 4 features on the channel dimension"):
        DiagonalQCI(4, feature_dim=-3)(torch.randn(2, 5, 3, 3))


# ----------------------------------------------------------------------------- the product path
def form_config(form, **kwargs):
    return CosmicConfig.off(qci=True, qci_form=form, qci_rank=RANK, **kwargs)


@pytest.mark.parametrize("form,name", list(itertools.product(FORMS, ["mlp", "cnn", "transformer", "untraceable"])))
def test_transform_inserts_the_form_as_an_exact_identity(form, name):
    factory, make_input, expected = MODELS[name]
    torch.manual_seed(0)
    model = factory().eval()
    tm = cosmic_fx.transform(model, form_config(form)).eval()
    qcis = [m for m in tm.modules() if isinstance(m, QuantumClassicalInterface)]
    assert len(qcis) == len(expected) and all(q.form is QCIForm(form) for q in qcis)
    x = make_input(3)
    with torch.no_grad():
        assert torch.equal(tm(x), model(x))


@pytest.mark.parametrize("name", ["mlp", "transformer", "untraceable"])
def test_qci_min_width_puts_qcis_only_on_wider_sites(name):
    """qci_min_width (the fast preset: 511) keeps QCIs off narrow sites on both rewrite paths; the
    sites still qualify (CSC on sites, CDG and CCE cover them)."""
    factory, make_input, expected = MODELS[name]
    torch.manual_seed(0)
    model = factory().eval()
    widths = {n: m.out_features for n, m in model.named_modules() if n in expected}
    cut = sorted(widths.values())[(len(widths) - 1) // 2]  # about half the sites are wider than this
    tm = cosmic_fx.transform(model, form_config("diagonal", qci_min_width=cut, csc="sites"))
    with_qci = {n for n, m in tm.cosmic_qci.named_modules() if isinstance(m, QuantumClassicalInterface)}
    assert with_qci == {n for n, w in widths.items() if w > cut} and with_qci != set(expected)
    with_csc = {n for n, m in tm.cosmic_csc.named_modules() if type(m).__name__ == "CosmicStateCompression"}
    assert with_csc == set(expected)
    report = cosmic_fx.explain(model, make_input(2), form_config("diagonal", qci_min_width=cut))
    assert all(s.qualifies for s in report.sites if s.name in expected)
    notes = {s.name: s.reason for s in report.sites if s.name in expected}
    assert notes == {n: "" if w > cut else f"no QCI: width {w} <= qci_min_width={cut}" for n, w in widths.items()}
    assert "yes (no QCI: width" in report.site_table()
    x = make_input(3)
    with torch.no_grad():
        reference = cosmic_fx.transform(model, form_config("diagonal", csc="sites")).eval()
        torch.testing.assert_close(tm.eval()(x), reference(x))


def test_fast_preset_puts_no_qci_and_with_qci_on_only_above_width_511():
    model = nn.Sequential(nn.Linear(8, 600), nn.ReLU(), nn.Linear(600, 64), nn.ReLU(), nn.Linear(64, 4))

    def gated(cfg):
        tm = cosmic_fx.transform(model, cfg)
        qci = getattr(tm, "cosmic_qci", None)
        if qci is None:
            return []
        return sorted(n for n, m in qci.named_modules() if isinstance(m, QuantumClassicalInterface))

    assert gated(CosmicConfig.fast()) == []  # the gate never stops acting: off in the fast preset
    assert gated(CosmicConfig.fast(qci=True)) == ["0"]  # put back: the diagonal form on sites wider than 511
    assert CosmicConfig.fast().qci_min_width == 511
    # two freezable blocks and a cap of a third: none may freeze, and explain says so
    report = cosmic_fx.explain(model, torch.rand(2, 8), CosmicConfig.fast())
    assert "the cap allows no block: floor(cdg_prefix_max=0.34 x 2 freezable blocks) = 0" in str(report)
    with pytest.raises(ValueError, match="qci_min_width must be an int >= 0"):
        CosmicConfig(qci_min_width=-1)


@pytest.mark.parametrize("form", FORMS)
def test_compiled_training_step_matches_eager(form):
    factory, make_input, _ = MODELS["cnn"]
    torch.manual_seed(0)
    tm = cosmic_fx.transform(factory(), form_config(form, qci_init="seed"))
    perturb(tm, 0.02)
    compiled = torch.compile(tm, backend="aot_eager")
    x = make_input(4)
    grads = []
    for run in (tm, compiled):
        tm.zero_grad()
        run(x).pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in tm.named_parameters()})
    for n in grads[0]:
        assert_close(grads[1][n], grads[0][n], msg=lambda m, n=n: f"{n}: {m}")


def expected_flops(form, rows, d, channels):
    """Matmul FLOPs of one QCI on ``rows`` feature vectors (torch.utils.flop_counter's 2*m*n*k). The
    diagonal form's h is a GEMV on Linear outputs, a product and a sum (no matmul) on channels."""
    return {"dense": 2 * rows * (d + 1) * d,
            "lowrank": 2 * rows * (RANK + 1) * d + 2 * rows * RANK * d,
            "diagonal": 0 if channels else 2 * rows * d}[form]


def expected_params(form, d):
    return {"dense": d * (d + 1) + d + 2, "lowrank": 2 * RANK * d + 2 * d + 2, "diagonal": 3 * d + 2}[form]


@pytest.mark.parametrize("form", FORMS)
def test_explain_counts_each_forms_parameters_and_flops(form):
    factory, make_input, _ = MODELS["cnn"]
    torch.manual_seed(0)
    report = cosmic_fx.explain(factory(), (make_input(8),), config=form_config(form))
    rows = {s.name: s for s in report.sites}
    for name, d in (("conv1", 16), ("conv2", 32), ("fc1", 64)):
        out = rows[name].output_shape
        assert rows[name].params_added == expected_params(form, d), name
        assert rows[name].flops_added == expected_flops(form, math.prod(out) // d, d, name != "fc1"), name
    assert rows["head"].params_added == 0


def _trained_cnn(form):
    factory, make_input, _ = MODELS["cnn"]
    torch.manual_seed(0)
    base = factory()
    tm = cosmic_fx.transform(base, form_config(form, qci_init="seed")).eval()
    perturb(tm, 0.02)
    return factory, base, tm, make_input


@pytest.mark.parametrize("form", FORMS)
def test_pt2_export_round_trips_every_form(form, tmp_path):
    _, _, tm, make_input = _trained_cnn(form)
    path = cosmic_fx.export(tm, make_input(4), tmp_path / f"{form}.pt2")
    program = torch.export.load(path).module()
    for b in (1, 5):
        x = make_input(b)
        with torch.no_grad():
            assert_close(program(x), tm(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("form", ["lowrank", "diagonal"])  # dense: tests/test_export.py
def test_onnx_export_runs_the_cheap_forms(form, tmp_path):
    pytest.importorskip("onnxscript")
    from cosmic_fx.export import load_onnx

    _, _, tm, make_input = _trained_cnn(form)
    session = load_onnx(cosmic_fx.export(tm, make_input(4), tmp_path / f"{form}.onnx", format="onnx"))
    (inp,) = session.get_inputs()
    x = make_input(3)
    (got,) = session.run(None, {inp.name: x.numpy()})
    with torch.no_grad():
        assert_close(torch.from_numpy(got), tm(x), rtol=0, atol=1e-4)


@pytest.mark.parametrize("form", FORMS)
def test_adapter_round_trips_every_form(form, tmp_path):
    from safetensors.torch import load_file

    factory, base, tm, make_input = _trained_cnn(form)
    folder = cosmic_fx.export(tm, make_input(4), tmp_path / "adapter", format="adapter")
    saved = load_file(str(folder / "adapter_model.safetensors"))
    own = {n: p for n, p in tm.named_parameters() if n.startswith("cosmic_qci.")}
    assert saved.keys() == own.keys() and all(torch.equal(saved[n], p.detach()) for n, p in own.items())
    same = factory()
    same.load_state_dict(base.state_dict())
    loaded = cosmic_fx.load_adapter(same, folder).eval()
    assert all(q.form is QCIForm(form) for q in loaded.modules() if isinstance(q, QuantumClassicalInterface))
    x = make_input(5)
    with torch.no_grad():
        assert torch.equal(loaded(x), tm(x))


def test_docstring_examples_of_the_modules_run():
    import doctest

    from cosmic_fx import csc, qci

    for module in (qci, csc):
        result = doctest.testmod(module, extraglobs={"torch": torch}, optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0 and result.failed == 0, module.__name__
