"""The `cosmic` torch.compile backend."""

import copy
import importlib.metadata
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import cosmic_fx
from cosmic_fx import CosmicConfig
from cosmic_fx.inspect import watch_backend
from cosmic_fx.notices import _WARNED

from .conftest import MODELS


def grads_after_step(model, x):
    out = model(x)
    out.float().pow(2).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_entry_point_is_registered():
    eps = importlib.metadata.entry_points(group="torch_dynamo_backends")
    (ep,) = [e for e in eps if e.name == "cosmic"]
    assert ep.value == "cosmic_fx.backend:cosmic_backend"
    assert ep.load() is cosmic_fx.cosmic_backend


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_all_off_equals_the_lowering_alone(name):
    factory, make_input, _ = MODELS[name]
    torch.manual_seed(0)
    a = factory()
    b = copy.deepcopy(a)
    x = make_input()
    ca = torch.compile(a, backend="cosmic", options={"preset": "off", "lower": "aot_eager"})
    cb = torch.compile(b, backend="aot_eager")
    out_a, grads_a = grads_after_step(ca, x)
    out_b, grads_b = grads_after_step(cb, x)
    assert_close(out_a, out_b, rtol=0, atol=0)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for k in grads_a:
        assert_close(grads_a[k], grads_b[k], rtol=0, atol=0)


@pytest.mark.slow
def test_all_off_equals_inductor_alone():
    torch.manual_seed(0)
    a = MODELS["mlp"][0]()
    b = copy.deepcopy(a)
    x = torch.rand(8, 64)
    out_a, grads_a = grads_after_step(torch.compile(a, backend="cosmic", options={"preset": "off"}), x)
    out_b, grads_b = grads_after_step(torch.compile(b, backend="inductor"), x)
    assert_close(out_a, out_b)
    for k in grads_a:
        assert_close(grads_a[k], grads_b[k])


@pytest.mark.parametrize("csc", ["sites", "output"])
def test_transformed_model_compiles_to_the_same_function(model_case, csc):
    name, model, make_input, _ = model_case
    cfg = CosmicConfig(qci_init="seed", csc=csc, lower="aot_eager")
    tm = cosmic_fx.transform(model, cfg)
    x = make_input()
    compiled = torch.compile(tm, backend="cosmic", options={"config": cfg})
    # CSC is already in the transformed model: the backend must not apply it a second time
    with watch_backend(tm) as watch:
        out = compiled(x)
    assert_close(out, tm(x))
    records = watch.report.graphs
    assert records and all(not r.missing_qci for r in records)
    assert sum(r.csc_inserted for r in records) == 0


def test_untransformed_model_warns_once_and_still_applies_csc():
    _WARNED.clear()
    torch.manual_seed(0)
    model = MODELS["untraceable"][0]()
    x = torch.rand(4, 8)
    compiled = torch.compile(model, backend="cosmic", options={"lower": "aot_eager", "csc": "sites", "csc_alpha": 0.3})
    with pytest.warns(UserWarning, match=r"was not transformed.*cosmic_fx\.compile\(model\)") as record:
        out = compiled(x)
    assert sum("was not transformed" in str(w.message) for w in record) == 1  # two graphs, one warning
    h = cosmic_fx.cosmic_state_compression(model.fc1(x), 0.3).relu()
    h = h * 2 if h.sum() > 0 else h
    h = cosmic_fx.cosmic_state_compression(model.fc2(h), 0.3).relu()
    assert_close(out, model.head(h))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compiled(x)  # no second warning
    cosmic_fx.detach_hooks(model)


def test_cosmic_compile_trains_and_hooks_each_parameter_once():
    torch.manual_seed(0)
    model = MODELS["mlp"][0]()
    cfg = CosmicConfig(lower="aot_eager", cdg_interval=5, cdg_max_frozen=0.5)
    cm = cosmic_fx.compile(model, cfg)
    opt = torch.optim.SGD(cm.parameters(), lr=0.1)
    x, y = torch.rand(32, 64), torch.randint(0, 10, (32,))
    losses = []
    with watch_backend(cm) as watch:
        for step in range(30):
            xb = x if step % 2 else x[:16]  # two batch sizes: a dynamic-shape recompile
            loss = nn.functional.cross_entropy(cm(xb), y[: len(xb)])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    hooks = cosmic_fx.hooks_of(cm)
    assert hooks is not None and hooks.num_hooked == len(list(cm.parameters()))
    assert hooks.steps == 30
    assert hooks.freeze_events  # calibrated CDG acted under torch.compile
    assert len(watch.report.graphs) >= 2
    assert losses[-1] < losses[0]
    cosmic_fx.detach_hooks(cm)


def test_bad_options_are_clear_errors():
    model = nn.Linear(4, 16)
    with pytest.raises(Exception, match=r"unknown cosmic option\(s\) \['bogus'\]; valid keys: config, preset, cce"):
        torch.compile(model, backend="cosmic", options={"bogus": 1})(torch.randn(2, 4))
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"CosmicConfig.csc_alpha must be finite and in \[0.0, inf\]; got -1.0"):
        torch.compile(model, backend="cosmic", options={"csc_alpha": -1.0})(torch.randn(2, 4))
    torch._dynamo.reset()
    with pytest.raises(Exception,
                       match="CosmicConfig.lower must be one of 'inductor', 'aot_eager', 'eager'; got 'tvm'"):
        torch.compile(model, backend="cosmic", options={"lower": "tvm"})(torch.randn(2, 4))
    with pytest.raises(TypeError, match="sets torch.compile's 'backend' itself"):
        cosmic_fx.compile(model, backend="inductor")


TRAIN_WITHOUT_IMPORT = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    cnn = nn.Sequential(nn.Conv2d(1, 12, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(12 * 64, 10))
    x = torch.rand(64, 64); y = x[:, :10].argmax(1)  # a learnable rule
    assert "cosmic_fx" not in sys.modules  # the backend is found through its entry point alone
    for model, inp in ((mlp, x), (cnn, x.reshape(64, 1, 8, 8))):
        compiled = torch.compile(model, backend="cosmic")
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        losses = []
        for _ in range(40):
            loss = nn.functional.cross_entropy(compiled(inp), y)
            opt.zero_grad(); loss.backward(); opt.step(); losses.append(loss.item())
        print(type(model[0]).__name__, losses[0], losses[-1])
        assert sum(losses[-3:]) < 0.9 * sum(losses[:3]), losses
    print("OK")
    """
)


@pytest.mark.slow
def test_backend_by_name_in_a_process_that_never_imports_cosmic_fx(tmp_path):
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", TRAIN_WITHOUT_IMPORT], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("OK")


@pytest.mark.slow
def test_default_cnn_under_inductor_has_the_eager_gradients():
    """Guards the product against the upstream Inductor bug documented in README (zero convolution
    gradients for DigitsCNN under plain torch.compile on CPU): the cosmic path must match eager."""
    torch.manual_seed(0)
    cfg = CosmicConfig(cdg="off", cce="off")
    tm = cosmic_fx.transform(MODELS["cnn"][0](), cfg)
    ref = copy.deepcopy(tm)
    x = torch.rand(32, 1, 8, 8)
    ref(x).pow(2).mean().backward()
    torch.compile(tm, backend="cosmic", options={"config": cfg})(x).pow(2).mean().backward()
    for (name, p), q in zip(tm.named_parameters(), ref.parameters()):
        assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
        if not name.startswith("cosmic_qci"):  # identity-init QCIs have zero gate gradients at step 0
            assert q.grad.abs().sum() > 0, name
