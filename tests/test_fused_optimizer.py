"""``cosmic_fx.fused_optimizer(model, optimizer)``: a user's torch.optim SGD / Adam / AdamW inside backward.

The reference is written here: the same optimizer class, built the same way, stepping after a plain
``loss.backward()``. Eagerly the fused update must equal it to the bit (it is torch's single-tensor
math, the one torch runs on CPU), LR scheduler and param groups included; under ``torch.compile``
(``aot_eager``, backward by compiled autograd, every hyperparameter a 0-d tensor) to float32 rounding
(``rtol=1e-5, atol=1e-6``), with one compiled-autograd capture while the scheduler moves the lr.
"""

import copy
import io

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import cosmic_fx
from cosmic_fx import CosmicConfig

from .conftest import mlp_batches, small_mlp

TOL = dict(rtol=1e-5, atol=1e-6)
EXACT = dict(rtol=0, atol=0)

# name -> optimizer factory over param groups (each a different option set of the class)
OPTIMIZERS = {
    "sgd-momentum-dampening": lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9, dampening=0.2, weight_decay=1e-3),
    "sgd-nesterov-maximize": lambda g: torch.optim.SGD(g, lr=0.05, momentum=0.5, nesterov=True, maximize=True),
    "sgd-plain": lambda g: torch.optim.SGD(g, lr=0.1),
    "adam-l2-amsgrad": lambda g: torch.optim.Adam(g, lr=0.01, weight_decay=0.01, amsgrad=True),
    "adam-decoupled": lambda g: torch.optim.Adam(g, lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
    "adamw": lambda g: torch.optim.AdamW(g, lr=0.01, weight_decay=0.05, betas=(0.8, 0.99)),
}

SCHEDULERS = {
    "step": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    "lambda": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s)),
}


def _groups(model):
    """Two groups with their own lr and weight decay: the first layer, then the rest."""
    first = list(model[0].parameters())
    rest = [p for p in model.parameters() if all(p is not q for q in first)]
    return [{"params": first, "lr": 0.02, "weight_decay": 0.2}, {"params": rest}]


def _loss(run, x, y):
    return nn.functional.cross_entropy(run(x), y)


def _reference(make_opt, make_sched, batches):
    """torch.optim stepping after backward: the parameters after every step, and the optimizer."""
    model = small_mlp()
    opt = make_opt(_groups(model))
    sched = make_sched(opt)
    for x, y in batches:
        _loss(model, x, y).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return model, opt


@pytest.mark.parametrize("sched", sorted(SCHEDULERS))
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_eager_fused_optimizer_equals_torch_optim_with_a_scheduler_and_param_groups(name, sched):
    batches = mlp_batches(6, scale=3)
    ref, ref_opt = _reference(OPTIMIZERS[name], SCHEDULERS[sched], batches)
    model = cosmic_fx.transform(small_mlp(), CosmicConfig.off())
    opt = OPTIMIZERS[name](_groups(model))
    scheduler = SCHEDULERS[sched](opt)
    fopt = cosmic_fx.fused_optimizer(model, opt)
    for x, y in batches:
        fopt.backward(_loss(model, x, y))
        assert all(p.grad is None for p in model.parameters())  # each gradient used and freed inside backward
        fopt.step()
        scheduler.step()
    assert opt.param_groups[0]["lr"] < 0.02  # the scheduler moved the lr the fused update read
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert_close(p, q, **EXACT, msg=n)
    # the state is torch's own, in the optimizer: same keys, same tensors
    mine, theirs = opt.state_dict(), ref_opt.state_dict()
    assert mine["param_groups"] == theirs["param_groups"]
    assert mine["state"].keys() == theirs["state"].keys()
    for k in theirs["state"]:
        assert mine["state"][k].keys() == theirs["state"][k].keys()
        for key, t in theirs["state"][k].items():
            assert_close(mine["state"][k][key], t, **EXACT)


def test_a_plain_training_loop_over_a_fused_optimizer_is_unchanged():
    """After fused_optimizer(model, opt), ``loss.backward(); opt.step(); opt.zero_grad()`` still trains
    the same: the hooks update inside backward and opt.step() has nothing left to step."""
    batches = mlp_batches(5, scale=3)
    ref, _ = _reference(OPTIMIZERS["adamw"], SCHEDULERS["lambda"], batches)
    model = cosmic_fx.transform(small_mlp(), CosmicConfig.off())
    opt = OPTIMIZERS["adamw"](_groups(model))
    sched = SCHEDULERS["lambda"](opt)
    cosmic_fx.fused_optimizer(model, opt)
    for x, y in batches:
        _loss(model, x, y).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert_close(p, q, **EXACT)


@pytest.mark.parametrize("name, sched", [("adamw", "lambda"), ("sgd-momentum-dampening", "step")])
def test_compiled_fused_optimizer_equals_torch_optim_with_one_capture(name, sched):
    from torch._dynamo.utils import counters

    batches = mlp_batches(6, scale=3)
    ref, _ = _reference(OPTIMIZERS[name], SCHEDULERS[sched], batches)
    tm = cosmic_fx.transform(small_mlp(), CosmicConfig.off(lower="aot_eager"))
    run = cosmic_fx.compile(tm)
    opt = OPTIMIZERS[name](_groups(tm))
    scheduler = SCHEDULERS[sched](opt)
    fopt = cosmic_fx.fused_optimizer(run, opt)
    counters.clear()
    for x, y in batches:
        fopt.backward(_loss(run, x, y))
        assert all(p.grad is None for p in tm.parameters())
        fopt.step()
        scheduler.step()
    # the first step creates torch's state lazily (a plain backward); one capture serves the others,
    # whatever lr the scheduler sets
    assert counters["compiled_autograd"]["captures"] == 1
    for (n, p), q in zip(tm.named_parameters(), ref.parameters()):
        assert_close(p, q, **TOL, msg=n)


def _prefix_config(**kw):
    # blocks 0, 2 (and the output layer 4): a window of 2 steps and a threshold nothing misses freeze
    # block 0 at the end of step 3 (0-based), after four readings
    return CosmicConfig.off(cdg="prefix", cdg_prefix_window=2, cdg_prefix_threshold=100.0, cdg_prefix_max=0.5, **kw)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_frozen_prefix_is_neither_updated_nor_stepped(compiled):
    """Reference: torch.optim after backward, block 0 frozen by hand after the step at whose end prefix
    CDG freezes it. (The fused update has applied that step's gradient of the block before the decision;
    the runtime drops it for an optimizer that steps after backward, so there the block gets one update
    less.)"""
    batches = mlp_batches(8, scale=3)
    tm = cosmic_fx.transform(small_mlp(), _prefix_config(lower="aot_eager"))
    run = cosmic_fx.compile(tm) if compiled else tm
    if not compiled:
        cosmic_fx.attach_hooks(tm)
    rt = cosmic_fx.runtime_of(tm)
    opt = OPTIMIZERS["adamw"](_groups(tm))
    sched = SCHEDULERS["step"](opt)
    fopt = cosmic_fx.fused_optimizer(run, opt)
    ref = small_mlp()
    ref_opt = OPTIMIZERS["adamw"](_groups(ref))
    ref_sched = SCHEDULERS["step"](ref_opt)
    frozen_at = None
    for step, (x, y) in enumerate(batches):
        _loss(ref, x, y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        ref_sched.step()
        before = {n: p.detach().clone() for n, p in tm.named_parameters()}
        steps_before = {n: float(opt.state[p]["step"]) for n, p in tm.named_parameters() if p in opt.state}
        fopt.backward(_loss(run, x, y))
        fopt.step()
        sched.step()
        if frozen_at is not None:  # frozen before this step: not moved, not stepped
            for n, p in tm.named_parameters():
                moved = not torch.equal(p, before[n])
                stepped = float(opt.state[p]["step"]) == steps_before[n] + 1
                assert moved == stepped == (not n.startswith("0.")), n
        if rt.frozen and frozen_at is None:
            frozen_at = step
            ref[0].requires_grad_(False)
    assert rt.frozen == ["0.bias", "0.weight"] and frozen_at == 3
    tol = TOL if compiled else EXACT
    for (n, p), q in zip(tm.named_parameters(), ref.parameters()):
        assert_close(p, q, **tol, msg=n)


def test_the_optimizer_state_dict_checkpoints_the_run_both_ways():
    """optimizer.state_dict() from a fused run resumes a plain torch.optim run, and the other way
    round, to the bit."""
    batches = mlp_batches(6, scale=3)
    ref, _ = _reference(OPTIMIZERS["adam-l2-amsgrad"], SCHEDULERS["step"], batches)

    def run(fused: bool, model=None, ckpt=None, steps=batches):
        model = model or cosmic_fx.transform(small_mlp(), CosmicConfig.off())
        opt = OPTIMIZERS["adam-l2-amsgrad"](_groups(model))
        sched = SCHEDULERS["step"](opt)
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optim"])
            sched.load_state_dict(ckpt["sched"])
        fopt = cosmic_fx.fused_optimizer(model, opt) if fused else None
        for x, y in steps:
            if fused:
                fopt.backward(_loss(model, x, y))
            else:
                _loss(model, x, y).backward()
            opt.step()
            opt.zero_grad()
            sched.step()
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "sched": sched.state_dict()}, buf)
        return model, torch.load(io.BytesIO(buf.getvalue()), weights_only=True)

    for first, second in ((True, False), (False, True)):
        _, ckpt = run(first, steps=batches[:3])
        resumed, _ = run(second, ckpt=ckpt, steps=batches[3:])
        for p, q in zip(resumed.parameters(), ref.parameters()):
            assert_close(p, q, **EXACT)


def test_remove_gives_the_optimizer_back_to_a_plain_loop():
    model = cosmic_fx.transform(small_mlp(), CosmicConfig.off())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fopt = cosmic_fx.fused_optimizer(model, opt)
    x, y = mlp_batches(1, scale=3)[0]
    fopt.remove()
    before = [p.detach().clone() for p in model.parameters()]
    _loss(model, x, y).backward()
    assert all(p.grad is not None for p in model.parameters())  # kept: nothing fused any more
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    opt.step()
    assert not any(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    with pytest.raises(RuntimeError, match=r"no longer fused into the model's backward \(remove\(\) was called\)"):
        fopt.step()


# ---------------------------------------------------------------- bad input
class MyAdamW(torch.optim.AdamW):
    pass


@pytest.mark.parametrize("make, message", [
    (lambda ps: torch.optim.RMSprop(ps, lr=0.1),
     r"cannot fuse RMSprop into backward: the supported optimizers are torch.optim.SGD, torch.optim.Adam and "
     r"torch.optim.AdamW"),
    (lambda ps: MyAdamW(ps, lr=0.1), r"cannot fuse MyAdamW into backward: the supported optimizers are"),
    (lambda ps: torch.optim.Adam(ps, lr=0.1, differentiable=True),
     r"param group 0 of Adam has differentiable=True .* Build the optimizer with differentiable=False"),
    (lambda ps: torch.optim.AdamW(ps, lr=0.1, capturable=True),
     r"param group 0 of AdamW has capturable=True .* Build the optimizer with capturable=False"),
])
def test_unsupported_optimizers_and_options_are_refused(make, message):
    model = cosmic_fx.transform(small_mlp(), CosmicConfig.off())
    with pytest.raises(ValueError, match=message):
        cosmic_fx.fused_optimizer(model, make(model.parameters()))
    assert cosmic_fx.runtime_of(model).mode is None  # nothing was bound


def test_an_optimizer_over_another_models_parameters_is_refused():
    model, other = cosmic_fx.transform(small_mlp(), CosmicConfig.off()), small_mlp()
    with pytest.raises(ValueError, match=r"AdamW holds a parameter that is not one of Sequential's \(param group 0, "
                                         r"index 0, shape \(24, 6\)\): it was built over another model's parameters"):
        cosmic_fx.fused_optimizer(model, torch.optim.AdamW(other.parameters()))


def test_an_optimizer_missing_trained_parameters_is_refused_with_the_qci_hint():
    base = small_mlp()
    tm = cosmic_fx.transform(base, CosmicConfig.off(qci=True))  # QCIs after the 24- and 16-wide layers
    with pytest.raises(ValueError, match=r"AdamW does not hold \d+ parameter\(s\) that this model trains, e.g. "
                                         r"\['cosmic_qci.*they include the QCIs that cosmic_fx.transform adds"):
        cosmic_fx.fused_optimizer(tm, torch.optim.AdamW(base.parameters()))
    cosmic_fx.fused_optimizer(tm, torch.optim.AdamW(tm.parameters()))  # the transformed model's: fine


def test_fusing_twice_or_over_a_config_update_is_refused():
    model = cosmic_fx.transform(small_mlp(), CosmicConfig.off())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = cosmic_fx.fused_optimizer(model, opt)
    assert cosmic_fx.fused_optimizer(model, opt).optimizer is opt  # the same one again: its handle
    assert cosmic_fx.fused_optimizer(model).optimizer is opt
    with pytest.raises(RuntimeError, match=r"already fuses a SGD into its backward; one optimizer per model"):
        cosmic_fx.fused_optimizer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    first.remove()
    cosmic_fx.fused_optimizer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    fused_cfg = cosmic_fx.transform(small_mlp(), CosmicConfig.off(cce_fused="sgd", cce_fused_lr=0.1))
    with pytest.raises(ValueError, match=r"sets cce_fused='sgd': its runtime already fuses that update, so AdamW "
                                         r"cannot be fused as well"):
        cosmic_fx.fused_optimizer(fused_cfg, torch.optim.AdamW(fused_cfg.parameters()))
    with pytest.raises(TypeError, match=r"expects a torch.optim optimizer as its second argument; got list"):
        cosmic_fx.fused_optimizer(model, list(model.parameters()))


def test_gradient_accumulation_and_a_second_optimizer_are_refused():
    model = cosmic_fx.transform(small_mlp(), CosmicConfig.off())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fopt = cosmic_fx.fused_optimizer(model, opt)
    (x, y), (x2, y2) = mlp_batches(2, scale=3)
    fopt.backward(_loss(model, x, y))
    fopt.step()
    _loss(model, x, y).backward()
    _loss(model, x2, y2).backward()
    # checked in optimizer.step() itself (a step pre-hook), so a loop that never calls fopt.step() is too
    with pytest.raises(RuntimeError, match=r"2 backward passes since the last step\(\). Gradient accumulation cannot "
                                           r"work with a fused 'adamw' update"):
        opt.step()
    other = torch.optim.SGD(model[2].parameters(), lr=0.1)
    for p in model[2].parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match=r"SGD.step\(\) would update 2 parameter\(s\) that the cosmic fused update "
                                           r"\(fused AdamW\) already updates inside backward"):
        other.step()


def test_a_deep_copy_of_a_fused_model_trains_without_its_optimizer():
    """copy.deepcopy of the model copies its runtime; the copy's hooks must not step the original's
    optimizer (it holds other tensors)."""
    model = cosmic_fx.transform(small_mlp(), CosmicConfig.off())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cosmic_fx.fused_optimizer(model, opt)
    twin = copy.deepcopy(model)
    x, y = mlp_batches(1, scale=3)[0]
    before = [p.detach().clone() for p in model.parameters()]
    _loss(twin, x, y).backward()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("source", ["optimizer", "config"])
def test_prefix_readings_in_a_compiled_fused_backward_equal_the_eager_ones(source):
    """A traced backward frees each gradient inside it: the blocks' gradient norms are read there. (They
    were read before the backward, from gradients that did not exist yet: an AttributeError.)"""
    fields = {} if source == "optimizer" else dict(cce_fused="sgd", cce_fused_lr=0.1, cce_fused_momentum=0.9)
    eager, compiled = (cosmic_fx.transform(small_mlp(), _prefix_config(lower="aot_eager", **fields)) for _ in "ab")
    cosmic_fx.attach_hooks(eager)
    run = cosmic_fx.compile(compiled)
    handles = []
    for model, target in ((eager, eager), (compiled, run)):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if source == "optimizer" else None
        handles.append(cosmic_fx.fused_optimizer(target, opt) if opt is not None else cosmic_fx.fused_optimizer(target))
    for x, y in mlp_batches(6, scale=3):
        for fopt, target in zip(handles, (eager, run)):
            fopt.backward(_loss(target, x, y))
            fopt.step()
    e_rt, c_rt = cosmic_fx.runtime_of(eager), cosmic_fx.runtime_of(compiled)
    assert c_rt.frozen == e_rt.frozen == ["0.bias", "0.weight"]
    assert len(c_rt.prefix.history) == len(e_rt.prefix.history) and any(c_rt.prefix.history)
    for c, e in zip(c_rt.prefix.history, e_rt.prefix.history):
        assert_close(c, e, **TOL)
    for p, q in zip(compiled.parameters(), eager.parameters()):
        assert_close(p, q, **TOL)


def test_ddp_is_refused(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        tm = cosmic_fx.transform(small_mlp(), CosmicConfig.off(cdg="prefix"))
        ddp = DistributedDataParallel(tm)
        with pytest.raises(RuntimeError, match=r"cannot fuse an optimizer into backward under DistributedDataParallel: "
                                               r"each rank would update on its local gradient"):
            cosmic_fx.fused_optimizer(ddp, torch.optim.AdamW(tm.parameters()))
        from cosmic_fx import PrefixCache

        with pytest.raises(ValueError, match=r"PrefixCache runs the model's suffix itself, outside the "
                                             r"DistributedDataParallel wrapper's forward"):
            PrefixCache(ddp)
    finally:
        dist.destroy_process_group()


def test_a_plain_model_gets_a_runtime_that_only_fuses():
    batches = mlp_batches(4, scale=3)
    ref, _ = _reference(OPTIMIZERS["sgd-momentum-dampening"], SCHEDULERS["step"], batches)
    model = small_mlp()
    opt = OPTIMIZERS["sgd-momentum-dampening"](_groups(model))
    sched = SCHEDULERS["step"](opt)
    fopt = cosmic_fx.fused_optimizer(model, opt)
    rt = cosmic_fx.runtime_of(model)
    assert rt.config == CosmicConfig.off() and rt.mode == "eager" and rt._tracker is None  # no forward hook
    for x, y in batches:
        fopt.backward(_loss(model, x, y))
        fopt.step()
        sched.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert_close(p, q, **EXACT)
    assert cosmic_fx.detach_hooks(model) == 1 and cosmic_fx.runtime_of(model) is None
    # a refused optimizer leaves a plain model as it was
    other = small_mlp()
    with pytest.raises(ValueError, match="built over another model's parameters"):
        cosmic_fx.fused_optimizer(other, torch.optim.SGD(model.parameters(), lr=0.1))
    assert cosmic_fx.runtime_of(other) is None
    with pytest.raises(ValueError, match=r"compiled by torch.compile without the cosmic backend"):
        cosmic_fx.fused_optimizer(torch.compile(other), torch.optim.SGD(other.parameters(), lr=0.1))
