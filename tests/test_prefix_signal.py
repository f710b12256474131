"""The weight-drift settle signal of prefix CDG (``cdg_prefix_signal="drift"``): the reading against a
hand computation, a still block freezes and a moving one does not, a block's QCI parameters are left
out of its drift, bad values are refused, and the readings are kept in checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import cosmic_fx
from cosmic_fx import CosmicConfig, policy
from cosmic_fx.runtime.prefix import PrefixState

X = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 4, (16,), generator=torch.Generator().manual_seed(1))


def drift_cfg(**kw) -> CosmicConfig:
    return CosmicConfig.fast(**{"cdg_prefix_signal": "drift", "cdg_prefix_window": 3, "cdg_prefix_threshold": 1e-3,
                                "cdg_prefix_max": 0.75, "lower": "aot_eager", **kw})


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 4))


def train(tm: nn.Module, steps: int, lr_of) -> None:
    """AdamW with a learning rate per parameter name (``lr_of(name)``)."""
    groups = [{"params": [p], "lr": lr_of(n)} for n, p in tm.named_parameters()]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(tm(X), Y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def runtime(cfg: CosmicConfig):
    tm = cosmic_fx.transform(mlp(), cfg)
    cosmic_fx.attach_hooks(tm)
    return tm, cosmic_fx.runtime_of(tm)


def test_drift_change_needs_two_finite_readings_and_takes_the_larger():
    assert policy.drift_change([]) is None and policy.drift_change([0.1]) is None
    assert policy.drift_change([0.5, 0.01, 0.02]) == 0.02
    assert policy.drift_change([0.01, float("nan")]) is None


def test_the_drift_reading_is_the_relative_weight_change_over_a_window():
    """PrefixState alone: a snapshot at step 0, a reading at step 3 (window 3), by hand."""
    cfg = CosmicConfig(cdg="prefix", cdg_prefix_signal="drift", cdg_prefix_window=3)
    g = torch.Generator().manual_seed(2)
    params = [torch.randn(4, 3, generator=g), torch.randn(4, generator=g), torch.randn(5, generator=g)]
    state = PrefixState(3)
    state.set_units([policy.PrefixUnit("a", (0, 1)), policy.PrefixUnit("b", (2,))], [p.numel() for p in params])
    start = [p.clone() for p in params]
    for step in range(4):
        state.end_of_step(step, [], cfg, params)
        for p in params:
            p.add_(0.1 * (step + 1))
    # the reading at step 3 compares the weights at step 3 with those at step 0 (block "a" only)
    moved = [p - 0.1 * 4 for p in params]  # the weights as they were when step 3 ended
    want = (((moved[0] - start[0]).square().sum() + (moved[1] - start[1]).square().sum())
            / (moved[0].square().sum() + moved[1].square().sum())).sqrt().item()
    assert state.history[0] == [pytest.approx(want, rel=1e-6)] and state.history[1] == []


def test_a_block_whose_weights_do_not_move_freezes_and_a_moving_one_does_not():
    tm, rt = runtime(drift_cfg(qci=False))
    train(tm, 12, lambda n: 0.0 if n.startswith("0.") else 1e-2)  # block 0 still, the rest learning
    assert rt.prefix.length == 1, rt.prefix.reason
    assert all(not p.requires_grad for p in tm[0].parameters()) and tm[2].weight.requires_grad
    tm, rt = runtime(drift_cfg(qci=False))
    train(tm, 12, lambda n: 1e-2)  # every block moves ~1e-2 per element and step: drift >> 1e-3
    assert rt.prefix.length == 0 and "has not" in rt.prefix.reason
    assert all(v > 1e-3 for v in rt.prefix.history[0])


def test_a_blocks_qci_is_left_out_of_its_drift():
    """A diagonal QCI on every site: a block whose own weights are still freezes though its QCI
    moves; a block whose weights move does not freeze though its QCI is still."""
    cfg = drift_cfg(qci=True, qci_min_width=0)
    tm, rt = runtime(cfg)
    names = [n for n, _ in tm.named_parameters()]
    assert any("cosmic_qci" in n for n in names)
    unit0 = [rt._names[i] for i in rt.prefix.units[0].params]
    drift0 = [rt._names[i] for i in rt.prefix.drift_params(0)]
    assert any("cosmic_qci" in n for n in unit0) and not any("cosmic_qci" in n for n in drift0)
    assert set(drift0) == {"0.weight", "0.bias"}
    train(tm, 12, lambda n: 5e-2 if "cosmic_qci" in n else 0.0 if n.startswith("0.") else 1e-2)
    assert rt.prefix.length == 1, rt.prefix.reason
    assert not any(p.requires_grad for n, p in tm.named_parameters() if n in unit0)  # its QCI froze with it
    tm, rt = runtime(cfg)
    train(tm, 12, lambda n: 0.0 if "cosmic_qci" in n else 1e-2)
    assert rt.prefix.length == 0, rt.prefix.reason


def test_drift_reads_no_gradient_and_measures_no_efficiency():
    """Between drift readings nothing is read: no E(p) measured on any step, no gradient accumulated
    (CCE off: before the runtime learns that the optimizer is AdamW, fast's CCE measures E(p) itself)."""
    tm, rt = runtime(drift_cfg(qci=False, cce="off"))
    calls = []
    measure = rt.readings.measure
    rt.readings.measure = lambda *a, **k: calls.append(a) or measure(*a, **k)
    train(tm, 7, lambda n: 1e-2)
    assert calls == [] and rt.prefix._acc == {}
    assert len(rt.prefix.history[0]) == 2  # readings at steps 3 and 6 (snapshot at step 0)


def test_a_bad_signal_is_refused_with_the_choices():
    with pytest.raises(ValueError,
                       match=r"cdg_prefix_signal must be one of 'grad', 'efficiency', 'drift'; got 'drfit'"):
        CosmicConfig(cdg="prefix", cdg_prefix_signal="drfit")
    assert CosmicConfig(cdg_prefix_signal="drift").cdg_prefix_signal is cosmic_fx.PrefixSignal.DRIFT


def test_drift_readings_and_the_qci_exclusion_survive_a_checkpoint():
    cfg = drift_cfg(qci=True, qci_min_width=0, cdg_prefix_threshold=1e-9)
    a, ra = runtime(cfg)
    train(a, 7, lambda n: 1e-2)
    assert len(ra.prefix.history[0]) == 2 and ra.prefix.length == 0
    state = {k: v.clone() for k, v in a.state_dict().items()}
    b, rb = runtime(cfg)
    b.load_state_dict(state)
    assert rb.prefix.history == ra.prefix.history
    assert rb.prefix.drift_params(0) == ra.prefix.drift_params(0) != list(ra.prefix.units[0].params)
    # the snapshot is taken again after the load: the next reading comes one window later
    train(b, 4, lambda n: 1e-2)
    assert len(rb.prefix.history[0]) == 3


def test_once_the_cap_is_reached_drift_keeps_no_copy_and_reads_nothing():
    tm, rt = runtime(drift_cfg(qci=False, cdg_prefix_max=0.34))  # 3 freezable blocks: a cap of 1
    train(tm, 12, lambda n: 0.0 if n.startswith(("0.", "2.")) else 1e-2)
    assert rt.prefix.length == 1, rt.prefix.reason
    train(tm, 8, lambda n: 0.0)
    assert rt.prefix.length == 1 and rt.prefix._snap is None and all(h == [] for h in rt.prefix.history)


@pytest.mark.parametrize("signal", ["drift", "grad"])
def test_the_decision_of_a_step_that_read_nothing_new_is_the_policys_own(signal):
    """PrefixState reuses its last decision on steps that added no reading (outside a cool-down): each
    deciding step's length and reason equal ``policy.prefix_decision`` called afresh, across freeze events
    and the cool-downs after them."""
    cfg = CosmicConfig(cdg="prefix", cdg_prefix_signal=signal, cdg_prefix_window=3, cdg_prefix_every=2,
                       cdg_prefix_threshold=0.5, cdg_prefix_max=0.75, cdg_max_sets=3)
    g = torch.Generator().manual_seed(3)
    params = [torch.randn(4, 3, generator=g), torch.randn(5, generator=g), torch.randn(6, generator=g)]
    state = PrefixState(3)
    state.set_units([policy.PrefixUnit(str(u), (u,)) for u in range(3)], [p.numel() for p in params])
    seen_memo = 0
    for step in range(40):
        if signal == "grad" and state.reads_grads_at(step, cfg):
            state.note_grads([0, 1, 2], [torch.full_like(p, 1.0 + 0.01 * step) for p in params])
        for p in params:
            p.mul_(1.0001)  # barely moving: the blocks settle, one event per cool-down
        appended = state._appended
        got = state.end_of_step(step, [], cfg, params)
        seen_memo += state._appended == appended and state.last_event is None
        window = cfg.cdg_prefix_window // (cfg.cdg_prefix_every if signal == "grad" else 1)
        since = None if state.last_event is None else step - state.last_event
        want = policy.prefix_decision(state.length, state._changes(cfg, max(1, window)), 3, state.events, since, cfg)
        if signal == "drift" or state.reads_grads_at(step, cfg):  # ("grad" decides on its reading steps only)
            assert (got, state.reason) == want, step
        if got != state.length:
            state.advance(got, step)
    assert state.events >= 1 and seen_memo > 0


def _run_recorded(compiled: bool, quiet: bool, opt_cls=torch.optim.AdamW, *, set_to_none: bool = True,
                  idle_steps: frozenset[int] = frozenset(), micro: int = 1, **cfg):
    """30 steps of the drift preset on :func:`mlp` (blocks 0 and 2 still, the rest moving), with the
    runtime's quiet-step path on or off; returns what each step left and how often the path was taken.
    At the steps of ``idle_steps`` a forward and a second ``opt.step()`` follow, with no backward;
    each step accumulates the gradients of ``micro`` backward passes."""
    tm = cosmic_fx.transform(mlp(), drift_cfg(qci=False, **cfg))
    if compiled:
        run = cosmic_fx.compile(tm)
    else:
        cosmic_fx.attach_hooks(tm)
        run = tm
    rt = cosmic_fx.runtime_of(tm)
    taken = [0]
    inner = rt._quiet_step

    def counted() -> bool:
        done = inner() if quiet else False
        taken[0] += done
        return done

    rt._quiet_step = counted  # the optimizer pre-hook calls it through the instance
    groups = [{"params": [p], "lr": 0.0 if n.startswith(("0.", "2.")) else 1e-2} for n, p in tm.named_parameters()]
    opt = opt_cls(groups)
    cosmic_fx.watch_optimizer(tm, opt)
    steps = []
    for step in range(30):
        opt.zero_grad(set_to_none=set_to_none)
        for _ in range(micro):
            nn.functional.cross_entropy(run(X), Y).backward()
        opt.step()
        if step in idle_steps:  # a forward with no backward (a loss logged), then another step()
            run(X)
            opt.step()  # (AdamW moves the weights again on the old gradients; the runtime counts no step)
        steps.append((rt.steps, rt.last_step, sorted(rt.frozen), rt.prefix.reason, rt.prefix.length))
    return steps, {k: v.clone() for k, v in tm.state_dict().items()}, taken[0]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "aot_eager"])
def test_the_quiet_step_path_leaves_what_the_full_step_leaves(compiled):
    """On steps where nothing acts (drift inside its window, no CCE under AdamW) the optimizer pre-hook
    takes a short path; step by step it leaves the same step count, record, frozen set, decision and
    reason as the full path, and the same weights and runtime state, across freeze events."""
    full, full_state, none_taken = _run_recorded(compiled, quiet=False)
    fast, fast_state, taken = _run_recorded(compiled, quiet=True)
    assert none_taken == 0 and 15 <= taken < 30  # most steps, not the reading / cool-down ones
    assert full[-1][4] >= 1, full[-1][3]  # a block froze on the way
    assert fast == full
    torch.testing.assert_close(fast_state, full_state, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("set_to_none", [True, False], ids=["set_to_none", "zeroed"])
def test_the_quiet_step_path_counts_no_step_without_a_backward(set_to_none):
    """A second ``step()`` with a forward but no backward before it is no step, on the quiet path as on
    the full one, whether it falls inside the drift window (where the compiled path looks at one
    gradient only) or on the reading step after it, and whether the gradients are new tensors or
    zeroed in place."""
    idle = frozenset({4, 7, 8, 12, 20})
    full, full_state, _ = _run_recorded(True, quiet=False, set_to_none=set_to_none, idle_steps=idle)
    fast, fast_state, taken = _run_recorded(True, quiet=True, set_to_none=set_to_none, idle_steps=idle)
    assert taken >= 15 and full[-1][0] == 30
    assert fast == full
    torch.testing.assert_close(fast_state, full_state, rtol=0, atol=0, equal_nan=True)


def test_the_quiet_step_path_with_gradient_accumulation_leaves_what_the_full_step_leaves():
    """Two backward passes per step (two compiled forwards): the quiet path scans every gradient, as
    the full step does, and leaves the same."""
    full, full_state, _ = _run_recorded(True, quiet=False, micro=2)
    fast, fast_state, taken = _run_recorded(True, quiet=True, micro=2)
    assert taken >= 15 and full[-1][0] == 30
    assert fast == full
    torch.testing.assert_close(fast_state, full_state, rtol=0, atol=0, equal_nan=True)


def test_a_quiet_compiled_step_looks_at_one_gradient(monkeypatch):
    """On a quiet step of a model compiled as one graph, the runtime reads one parameter's gradient,
    not every parameter's (``CosmicRuntime._new_grads`` is the loop over all of them)."""
    from cosmic_fx.runtime import CosmicRuntime

    loops, quiet = [], []
    inner_new, inner_quiet = CosmicRuntime._new_grads, CosmicRuntime._quiet_step

    def counted_new(self, params):
        loops.append(self.steps)
        return inner_new(self, params)

    def counted_quiet(self):
        done = inner_quiet(self)
        if done:
            quiet.append(self.steps)
        return done

    monkeypatch.setattr(CosmicRuntime, "_new_grads", counted_new)
    monkeypatch.setattr(CosmicRuntime, "_quiet_step", counted_quiet)
    tm = cosmic_fx.transform(mlp(), drift_cfg(qci=False))
    run = cosmic_fx.compile(tm)
    opt = torch.optim.AdamW(tm.parameters(), lr=1e-2)
    cosmic_fx.watch_optimizer(tm, opt)
    for _ in range(30):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(run(X), Y).backward()
        opt.step()
    assert len(quiet) >= 15  # most steps are quiet (window 3: two of every three)
    assert len(loops) <= 30 - len(quiet) + 1, (loops, quiet)  # the loop ran on the other steps only


def test_the_quiet_step_path_is_not_taken_while_cce_scales_gradients():
    sgd = lambda groups: torch.optim.SGD(groups, momentum=0.9)  # noqa: E731
    assert _run_recorded(False, quiet=True, opt_cls=sgd)[2] > 0  # the preset's CCE is off
    assert _run_recorded(False, quiet=True, opt_cls=sgd, cce="relative")[2] == 0
