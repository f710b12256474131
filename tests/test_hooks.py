"""CDG/CCE hooks: the seed preset step by step against hand-computed values, and the default preset."""

import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import cosmic_fx
from cosmic_fx import CosmicConfig, attach_hooks, transform

from .conftest import mlp_batches, small_mlp


def hand_efficiency(t: torch.Tensor, dim: int, eps: float = 1e-8) -> float:
    """E = (I - S) / (I + S + eps), written out in float64 with an explicit softmax."""
    x = t.detach().double()
    if x.dim() == 0:
        x = x.reshape(1)
    z = x - x.max(dim=dim, keepdim=True).values
    p = z.exp() / z.exp().sum(dim=dim, keepdim=True)
    s = (-(p * torch.log(p))).nan_to_num(0.0).mean().item()
    i = x.abs().mean().item()
    return (i - s) / (i + s + eps)


def make_mlp():
    return small_mlp()


def batches(n):
    # inputs scaled so that E(output) sits among the parameters' efficiencies: both CDG branches occur
    return mlp_batches(n, scale=20)


def expected_seed_step(model: nn.Module, ref: nn.Module, x, y, lr):
    """What the source text's rules do to every parameter of ``model`` in one plain-SGD step.

    ``ref`` is a hook-free copy, first synced to ``model``'s current parameters, so every step is
    checked from the state the real run is in.
    """
    with torch.no_grad():
        for p, q in zip(ref.parameters(), model.parameters()):
            p.copy_(q)
    out = ref(x)
    e_out = hand_efficiency(out, -1)
    ref.zero_grad()
    nn.functional.cross_entropy(out, y).backward()
    expected, skipped = {}, set()
    for name, p in ref.named_parameters():
        e_p = hand_efficiency(p, 0)
        if e_p < e_out:
            expected[name] = p.detach().clone()
            skipped.add(name)
        else:
            expected[name] = p.detach() - lr * e_p * p.grad
    return expected, skipped


@pytest.mark.parametrize("engine", ["eager", "compile"])
def test_seed_preset_step_by_step(engine):
    cfg = CosmicConfig.seed(lower="aot_eager")
    tm = transform(make_mlp(), cfg)
    ref = copy.deepcopy(tm)
    if engine == "eager":
        hooks = attach_hooks(tm, cfg)
        run = tm
    else:
        run = torch.compile(tm, backend="cosmic", options={"config": cfg})
    opt = torch.optim.SGD(tm.parameters(), lr=0.1)
    all_skipped = []
    for x, y in batches(4):
        expected, skipped = expected_seed_step(tm, ref, x, y, 0.1)
        out = run(x)
        opt.zero_grad()
        nn.functional.cross_entropy(out, y).backward()
        opt.step()
        if engine == "compile":
            hooks = cosmic_fx.hooks_of(tm)
        assert set(hooks.last_step["skipped"]) == skipped
        for name, p in tm.named_parameters():
            if name in skipped:
                assert torch.equal(p.detach(), expected[name]), name  # exactly unchanged
            else:
                assert_close(p.detach(), expected[name], rtol=1e-5, atol=1e-6, msg=name)
        all_skipped.append(skipped)
    # the literal rules do skip something and update something: the test exercises both branches
    assert any(all_skipped) and not all(s == {n for n, _ in tm.named_parameters()} for s in all_skipped)
    hooks.remove()
    assert cosmic_fx.hooks_of(tm) is None


def test_relative_cce_scales_gradients_by_the_documented_multiplier():
    cfg = CosmicConfig.off(cce="relative", cce_gamma=2.0, cce_min=0.5, cce_max=1.5)
    model = make_mlp()
    ref = copy.deepcopy(model)
    hooks = attach_hooks(model, cfg)
    x, y = batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    nn.functional.cross_entropy(ref(x), y).backward()
    effs = {n: hand_efficiency(p, 0) for n, p in ref.named_parameters()}
    mean = sum(effs.values()) / len(effs)
    changed = 0
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        scale = min(max(1 + 2.0 * (effs[name] - mean), 0.5), 1.5)
        assert_close(p.grad, q.grad * scale, rtol=1e-5, atol=1e-7)
        assert hooks.last_step["scale"][name] == pytest.approx(scale, rel=1e-5)
        changed += scale != 1.0
    assert changed >= 1
    hooks.remove()


def test_calibrated_cdg_freezes_on_a_schedule_never_the_output_layer():
    cfg = CosmicConfig.off(cdg="calibrated", cdg_patience=2, cdg_interval=3, cdg_max_frozen=0.5, cdg_max_sets=2,
                           efficiency_every=1)
    model = make_mlp()
    hooks = attach_hooks(model, cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen_sets, frozen_steps = set(), 0
    for step, (x, y) in enumerate(batches(30)):
        frozen_now = {n for n, p in model.named_parameters() if not p.requires_grad}
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        for n, p in model.named_parameters():
            if n in frozen_now:  # frozen before backward: no gradient computed at all, no update
                assert p.grad is None and torch.equal(p.detach(), before[n])
        assert "4.weight" not in frozen_now and "4.bias" not in frozen_now
        assert len(frozen_now) <= 0.5 * 6
        seen_sets.add(frozenset(frozen_now))
        frozen_steps += bool(frozen_now)
        if step < 2:
            assert not frozen_now  # nothing before the first decision
    assert frozen_steps > 0
    assert len(seen_sets - {frozenset()}) <= 2  # cdg_max_sets bounds the distinct frozen sets
    hooks.remove()
    assert all(p.requires_grad for p in model.parameters())  # remove() thaws


def test_default_preset_keeps_both_mechanisms_active():
    from cosmic_fx.data import load_digits
    from cosmic_fx.models import DigitsMLP
    from cosmic_fx.training import Arm, train_classifier

    result = train_classifier(DigitsMLP, load_digits(), Arm("default", CosmicConfig()), epochs=3)
    assert result.frozen_fraction > 0  # CDG froze something in a typical step
    assert result.scaled_fraction > 0.5  # CCE changed most updates
    assert result.train_loss[-1] < result.train_loss[0]


def test_hooks_attach_once_and_detach():
    model = make_mlp()
    ref = copy.deepcopy(model)
    rt = attach_hooks(model, CosmicConfig.seed())
    assert rt.num_hooked == 6 and cosmic_fx.hooks_of(model) is rt
    with pytest.raises(RuntimeError, match="already has active cosmic hooks"):
        attach_hooks(model, CosmicConfig())
    assert cosmic_fx.detach_hooks(model) == 1
    assert cosmic_fx.hooks_of(model) is None and cosmic_fx.runtime_of(model) is None
    assert cosmic_fx.detach_hooks(model) == 0
    # the hooks are really gone: gradients are those of a model that never had any
    x, y = batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    nn.functional.cross_entropy(ref(x), y).backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_eager_and_backend_protect_the_same_output_layer():
    from cosmic_fx.models import TinyTransformerLM

    torch.manual_seed(0)
    model = TinyTransformerLM(vocab=24, dim=16, heads=2, layers=1, context=8)
    x = torch.randint(0, 24, (2, 8))
    eager = attach_hooks(model, CosmicConfig())
    model(x)
    eager_protected = eager.protected
    eager.remove()
    torch.compile(model, backend="cosmic", options={"lower": "aot_eager", "qci": False})(x)
    compiled = cosmic_fx.hooks_of(model)
    assert compiled is not eager
    compiled_protected = compiled.protected
    cosmic_fx.detach_hooks(model)
    # the head and what runs after it; not the root's own `pos`, though the root's hook fires last
    assert eager_protected == compiled_protected == ["head.bias", "head.weight"]


def test_efficiency_every_reuses_readings_between_measurements():
    cfg = CosmicConfig.off(cce="relative", efficiency_every=3)
    model = make_mlp()
    hooks = attach_hooks(model, cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    measured, scales = [], []
    for x, y in batches(7):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        measured.append(bool(hooks.last_step["efficiency"]))
        scales.append(dict(hooks.last_step["scale"]))
    assert measured == [True, False, False, True, False, False, True]
    assert scales[1] == scales[0] and scales[2] == scales[0]  # multipliers reused in between
    assert scales[3] != scales[0]  # and refreshed at the next measurement
    hooks.remove()
