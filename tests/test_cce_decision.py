"""One decision for "does CCE act?" (``cce_skip_adaptive``): the watched optimizer, the fused user
optimizer and :func:`cosmic_fx.explain` agree (issue 17 follow-ups)."""

import re

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import cosmic_fx
from cosmic_fx import CosmicConfig
from cosmic_fx.runtime.cce import cce_skipped_for, cce_status

from .conftest import mlp_batches, small_mlp

# prefix CDG off: nothing freezes, so the only difference from torch.optim can be CCE's multiplier; CCE on
# (the fast preset turns it off since it lost accuracy under SGD; cce_skip_adaptive decides it under Adam)
FAST = dict(cdg="off", cce="relative")


def _adamw(params):
    return torch.optim.AdamW(params, lr=0.01, weight_decay=0.05)


def _reference(batches):
    model = small_mlp()
    opt = _adamw(model.parameters())
    for x, y in batches:
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return model


def _fused(config, batches, compiled=False):
    tm = cosmic_fx.transform(small_mlp(), config)
    run = cosmic_fx.compile(tm) if compiled else tm
    fopt = cosmic_fx.fused_optimizer(run, _adamw(tm.parameters()))
    for x, y in batches:
        fopt.backward(nn.functional.cross_entropy(run(x), y))
        fopt.step()
    return tm


@pytest.mark.parametrize("compiled", [False, True])
def test_fused_adamw_under_the_fast_preset_is_torch_adamw(compiled):
    """Exactly torch.optim.AdamW eagerly; to rounding through compiled autograd (as the fused tests)."""
    batches = mlp_batches(6, scale=3)
    ref = _reference(batches)
    tm = _fused(CosmicConfig.fast(lower="aot_eager", **FAST), batches, compiled)
    rt = cosmic_fx.runtime_of(tm)
    assert rt._cce_skipped and rt.last_step["scale"] == {} and rt.fused.scale is None
    assert len(list(tm.parameters())) == len(list(ref.parameters()))  # no QCI on this narrow MLP
    tol = dict(rtol=1e-5, atol=1e-6) if compiled else dict(rtol=0, atol=0)
    for (n, p), q in zip(tm.named_parameters(), ref.parameters(), strict=True):
        assert_close(p, q, **tol, msg=n)


def test_fused_adamw_keeps_cce_when_cce_skip_adaptive_is_false():
    batches = mlp_batches(6, scale=3)
    ref = _reference(batches)
    tm = _fused(CosmicConfig.fast(cce_skip_adaptive=False, **FAST), batches)
    scale = cosmic_fx.runtime_of(tm).last_step["scale"]
    assert scale and any(v != 1.0 for v in scale.values())
    assert any(not torch.equal(p, q) for p, q in zip(tm.parameters(), ref.parameters(), strict=True))


def test_after_remove_the_next_optimizer_decides_cce_again():
    tm = cosmic_fx.transform(small_mlp(), CosmicConfig.fast(**FAST))
    x, y = mlp_batches(1, scale=3)[0]
    fopt = cosmic_fx.fused_optimizer(tm, _adamw(tm.parameters()))
    assert cosmic_fx.runtime_of(tm)._cce_skipped
    fopt.remove()
    sgd = torch.optim.SGD(tm.parameters(), lr=0.05)
    cosmic_fx.watch_optimizer(tm, sgd)
    nn.functional.cross_entropy(tm(x), y).backward()
    sgd.step()
    assert any(v != 1.0 for v in cosmic_fx.runtime_of(tm).last_step["scale"].values())


def test_fused_sgd_under_the_fast_preset_keeps_cce():
    tm = cosmic_fx.transform(small_mlp(), CosmicConfig.fast(**FAST))
    fopt = cosmic_fx.fused_optimizer(tm, torch.optim.SGD(tm.parameters(), lr=0.05))
    x, y = mlp_batches(1, scale=3)[0]
    fopt.backward(nn.functional.cross_entropy(tm(x), y))
    fopt.step()
    assert any(v != 1.0 for v in cosmic_fx.runtime_of(tm).last_step["scale"].values())


def test_the_decision_function():
    w = nn.Parameter(torch.zeros(2))
    fast = CosmicConfig.fast(cce="relative")
    assert cce_skipped_for(fast, torch.optim.AdamW([w]))
    assert not cce_skipped_for(fast, torch.optim.SGD([w], lr=0.1))
    assert not cce_skipped_for(fast, None)  # not known: nothing is turned off yet
    assert not cce_skipped_for(CosmicConfig.fast(cce="relative", cce_skip_adaptive=False), torch.optim.AdamW([w]))
    assert not cce_skipped_for(CosmicConfig(), torch.optim.AdamW([w]))
    assert cce_status(CosmicConfig.off()) == "CCE: off (cce='off')"


def _explain(config, optimizer=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = optimizer(model.parameters()) if optimizer is not None else None
    return cosmic_fx.explain(model, torch.randn(2, 8), config, optimizer=opt)


def test_explain_says_cce_is_off_under_adamw_with_the_fast_preset():
    report = _explain(CosmicConfig.fast(cce="relative"), _adamw)
    assert report.cce.startswith("CCE (relative): off for this AdamW: it divides each parameter's gradient"), report.cce
    assert "cce_skip_adaptive=True" in report.cce
    assert all(p.cce_scale == 1.0 for p in report.params)
    text = str(report)
    assert report.cce in text and "CCE x (off for AdamW)" in text
    assert report.to_dict()["cce"] == report.cce


def test_explain_says_it_depends_on_the_optimizer_before_one_is_known():
    report = _explain(CosmicConfig.fast(cce="relative"))
    assert report.cce.startswith("CCE (relative): depends on the optimizer: off under Adam/AdamW")
    assert any(p.cce_scale != 1.0 for p in report.params)  # what it does under SGD
    assert "CCE x (relative; 1 under Adam/AdamW)" in str(report)


@pytest.mark.parametrize("config, optimizer, expected", [
    (CosmicConfig.fast(cce="relative"), lambda ps: torch.optim.SGD(ps, lr=0.1), r"^CCE \(relative\): on under SGD$"),
    (CosmicConfig.fast(cce="relative", cce_skip_adaptive=False), _adamw, r"^CCE \(relative\): on under AdamW$"),
    (CosmicConfig(), None, r"^CCE \(relative\): on$"),
])
def test_explain_reports_cce_on_where_it_acts(config, optimizer, expected):
    report = _explain(config, optimizer)
    assert re.fullmatch(expected, report.cce), report.cce
    assert any(p.cce_scale != 1.0 for p in report.params)


def test_explain_reads_the_optimizer_the_runtime_fuses():
    tm = cosmic_fx.transform(small_mlp(), CosmicConfig.fast(**FAST))
    cosmic_fx.fused_optimizer(tm, _adamw(tm.parameters()))
    assert "off for this AdamW" in cosmic_fx.explain(tm, torch.randn(2, 6)).cce


def test_explain_refuses_an_optimizer_that_is_not_one():
    with pytest.raises(TypeError, match=r"optimizer must be a torch.optim.Optimizer .* got str"):
        _explain(CosmicConfig.fast(cce="relative"), lambda ps: "adamw")


def test_the_fast_preset_runs_no_cce_and_explain_says_so():
    """CCE lost accuracy under SGD on mnist-transfer (benchmarks/experiments/fast_cce_sgd_experiment.py) and
    is normalised away under Adam/AdamW: the fast preset has it off, for every optimizer."""
    assert CosmicConfig.fast().cce.value == "off"
    report = _explain(CosmicConfig.fast(), lambda ps: torch.optim.SGD(ps, lr=0.1))
    assert report.cce == "CCE: off (cce='off')", report.cce
    assert all(p.cce_scale == 1.0 for p in report.params)
