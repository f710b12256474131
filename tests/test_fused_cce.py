"""Fused CCE: SGD (momentum, nesterov, weight decay) and AdamW applied inside backward.

References written here: ``torch.optim`` stepping after backward (eagerly: SGD to the bit, AdamW to
float32 rounding, ``rtol=1e-5, atol=1e-6``: the fused AdamW computes its bias corrections from a
float32 step tensor, torch's default in double precision); the compiled path (``aot_eager``,
backward by compiled autograd) against the eager fused update, same tolerance. Then the checkpoint
round trip (bit for bit) and every user-facing error.
"""

import copy
import io
import json

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import cosmic_fx
from cosmic_fx import CosmicConfig

from .conftest import mlp_batches, small_mlp

TOL = dict(rtol=1e-5, atol=1e-6)

# name -> (cce_fused_* fields, the same update as a torch.optim optimizer, exact in eager?)
KINDS = {
    "sgd": (dict(cce_fused="sgd", cce_fused_lr=0.1, cce_fused_momentum=0.9, cce_fused_weight_decay=0.01),
            lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01), True),
    "nesterov": (dict(cce_fused="sgd", cce_fused_lr=0.1, cce_fused_momentum=0.5, cce_fused_nesterov=True),
                 lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.5, nesterov=True), True),
    "adamw": (dict(cce_fused="adamw", cce_fused_lr=0.01, cce_fused_weight_decay=0.05, cce_fused_betas=(0.8, 0.99)),
              lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.05, betas=(0.8, 0.99)), False),
}


def _batches(n=4):
    return mlp_batches(n, scale=3)


def _loss(run, x, y):
    return nn.functional.cross_entropy(run(x), y)


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("cce", ["off", "relative"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_eager_fused_update_equals_torch_optim_after_backward(kind, cce):
    fields, make_opt, exact = KINDS[kind]
    base = CosmicConfig.off(cce=cce)
    ref = small_mlp()
    ref_hooks = cosmic_fx.attach_hooks(ref, base)  # CCE (if on) scales p.grad; torch.optim steps after
    opt = make_opt(ref.parameters())
    fused = small_mlp()
    cosmic_fx.attach_hooks(fused, base.replace(**fields))
    fopt = cosmic_fx.fused_optimizer(fused)
    for x, y in _batches():
        _loss(ref, x, y).backward()
        opt.step()
        opt.zero_grad()
        fopt.backward(_loss(fused, x, y))
        fopt.step()
        assert all(p.grad is None for p in fused.parameters())  # every gradient freed inside backward
    ref_hooks.remove()
    tol = dict(rtol=0, atol=0) if exact else TOL
    for (name, p), q in zip(fused.named_parameters(), ref.parameters()):
        assert_close(p, q, **tol, msg=name)
    assert not any(torch.equal(p, q) for p, q in zip(fused.parameters(), small_mlp().parameters()))


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_fused_update_under_compile_equals_the_eager_fused_update(kind):
    from torch._dynamo.utils import counters

    fields, _, _ = KINDS[kind]
    # the hooks' decisions (relative CCE, calibrated CDG's readings) every 2 steps; no QCI/CSC: they
    # would only make the graphs (and the test) longer
    cfg = CosmicConfig.off(lower="aot_eager", cce="relative", cdg="calibrated", efficiency_every=2, **fields)
    start = cosmic_fx.transform(small_mlp(), cfg)
    eager, compiled = copy.deepcopy(start), copy.deepcopy(start)
    cosmic_fx.attach_hooks(eager)
    run = cosmic_fx.compile(compiled)
    eopt, copt = cosmic_fx.fused_optimizer(eager), cosmic_fx.fused_optimizer(run)
    torch._dynamo.reset()
    counters.clear()
    for x, y in _batches(4):
        eopt.backward(_loss(eager, x, y))
        copt.backward(_loss(run, x, y))
        assert all(p.grad is None for p in compiled.parameters())
        e_step, c_step = (cosmic_fx.runtime_of(m).last_step for m in (eager, compiled))
        assert c_step["scale"].keys() == e_step["scale"].keys() and c_step["scale"]  # the same CCE decisions
        assert_close(c_step["scale"], e_step["scale"], **TOL)
    # one compiled-autograd capture served every step, those that measured E(p) and those that reused it
    assert counters["compiled_autograd"]["captures"] == 1
    for (name, p), q in zip(compiled.named_parameters(), eager.parameters()):
        assert_close(p, q, **TOL, msg=name)
    assert not any(torch.equal(p, q) for p, q in zip(compiled.parameters(), start.parameters()))


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_checkpoint_round_trip_resumes_bit_for_bit(kind):
    fields, _, _ = KINDS[kind]
    cfg = CosmicConfig(lower="aot_eager", efficiency_every=2, **fields)
    start = cosmic_fx.transform(small_mlp(), cfg)
    batches = _batches(6)

    def train(model, opt, steps):
        for x, y in steps:
            opt.backward(_loss(model, x, y))
            opt.step()

    a = copy.deepcopy(start)
    cosmic_fx.attach_hooks(a)
    aopt = cosmic_fx.fused_optimizer(a)
    train(a, aopt, batches[:3])
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "fused": aopt.state_dict()}, buf)
    train(a, aopt, batches[3:])

    def resumed(load_fused: bool):
        b = copy.deepcopy(start)
        ckpt = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
        b.load_state_dict(ckpt["model"])
        cosmic_fx.attach_hooks(b)
        bopt = cosmic_fx.fused_optimizer(b)
        if load_fused:
            bopt.load_state_dict(ckpt["fused"])
        train(b, bopt, batches[3:])
        return b

    b = resumed(True)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert cosmic_fx.runtime_of(b).steps == cosmic_fx.runtime_of(a).steps == 6
    # loaded into a run whose state already exists (copied into the tensors a compiled backward holds)
    ckpt = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    a.load_state_dict(ckpt["model"])
    aopt.load_state_dict(ckpt["fused"])
    train(a, aopt, batches[3:])
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    # the update state matters: resuming without it is another run
    c = resumed(False)
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_a_checkpoint_written_before_the_fused_fields_still_loads():
    tm = cosmic_fx.transform(small_mlp(), CosmicConfig.off(cce="relative"))
    state = tm.state_dict()
    meta = json.loads(bytes(state["cosmic_state.meta"].tolist()).decode())
    meta["config"] = {k: v for k, v in meta["config"].items() if not k.startswith("cce_fused")}
    meta["config"]["cce_fused_lr"] = None  # the one fused field that existed before
    state["cosmic_state.meta"] = torch.tensor(list(json.dumps(meta, sort_keys=True).encode()), dtype=torch.uint8)
    copy.deepcopy(tm).load_state_dict(state)
    fused = cosmic_fx.transform(small_mlp(), CosmicConfig.off(cce="relative", cce_fused="adamw", cce_fused_lr=0.1))
    with pytest.raises(RuntimeError, match="cce_fused='off' in the checkpoint vs 'adamw' here"):
        fused.load_state_dict(state)


# ---------------------------------------------------------------- config
def test_cce_fused_lr_alone_keeps_its_meaning_plain_sgd():
    cfg = CosmicConfig(cce_fused_lr=0.5)
    assert cfg.cce_fused.value == "sgd" and cfg.cce_fused_momentum == 0.0 and cfg.fused_weight_decay == 0.0
    assert CosmicConfig(cce_fused="adamw", cce_fused_lr=1e-3).fused_weight_decay == 0.01  # torch's default
    assert CosmicConfig.from_options(cfg.to_options()) == cfg
    adamw = CosmicConfig(cce_fused="adamw", cce_fused_lr=1e-3, cce_fused_betas=[0.8, 0.9])
    assert adamw.cce_fused_betas == (0.8, 0.9) and CosmicConfig.from_options(adamw.to_options()) == adamw


@pytest.mark.parametrize("fields, message", [
    (dict(cce_fused="adamw"), r"cce_fused='adamw' needs cce_fused_lr"),
    (dict(cce_fused="lion", cce_fused_lr=0.1), r"cce_fused must be one of 'off', 'sgd', 'adamw'; got 'lion'"),
    (dict(cce_fused="sgd", cce_fused_lr=0.1, cce_fused_momentum=1.0),
     r"cce_fused_momentum must be a number in \[0, 1\)"),
    (dict(cce_fused="sgd", cce_fused_lr=0.1, cce_fused_nesterov=True),
     r"cce_fused_nesterov needs cce_fused_momentum > 0"),
    (dict(cce_fused="sgd", cce_fused_lr=0.1, cce_fused_nesterov="yes"), r"cce_fused_nesterov must be a bool"),
    (dict(cce_fused="sgd", cce_fused_lr=0.1, cce_fused_weight_decay=-1),
     r"cce_fused_weight_decay must be a number in \[0, inf\)"),
    (dict(cce_fused="adamw", cce_fused_lr=0.1, cce_fused_eps=0), r"cce_fused_eps must be a number in \(0, 1\)"),
    (dict(cce_fused="adamw", cce_fused_lr=0.1, cce_fused_betas=(0.9,)), r"cce_fused_betas must be two numbers"),
    (dict(cce_fused="adamw", cce_fused_lr=0.1, cce_fused_betas=(0.9, 1.0)), r"each in \[0, 1\); got \(0.9, 1.0\)"),
    (dict(cce_fused="adamw", cce_fused_lr=0.1, cce_fused_momentum=0.9),
     r"cce_fused_momentum set, but cce_fused='adamw' does not use it"),
    (dict(cce_fused="sgd", cce_fused_lr=0.1, cce_fused_betas=(0.8, 0.9), cce_fused_eps=1e-6),
     r"cce_fused_betas, cce_fused_eps set, but cce_fused='sgd' does not use them"),
    (dict(cce_fused_momentum=0.9), r"cce_fused_momentum set, but cce_fused='off' does not use it"),
])
def test_bad_fused_settings_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        CosmicConfig(**fields)


# ---------------------------------------------------------------- what cannot work
def _fused_eager(kind="sgd"):
    model = small_mlp()
    cosmic_fx.attach_hooks(model, CosmicConfig.off(**KINDS[kind][0]))
    return model, cosmic_fx.fused_optimizer(model)


def test_an_optimizer_stepping_fused_parameters_is_refused_before_it_updates():
    model, fopt = _fused_eager()
    x, y = _batches(1)[0]
    fopt.backward(_loss(model, x, y))
    other = torch.optim.SGD(model[2].parameters(), lr=0.1)
    for p in model[2].parameters():
        p.grad = torch.ones_like(p)
    before = _params(model)
    with pytest.raises(RuntimeError, match=r"SGD.step\(\) would update 2 parameter\(s\) that the cosmic fused update "
                                           r"\(cce_fused='sgd'\) already updates inside backward, e.g. \['2.weight', "
                                           r"'2.bias'\]: they would be updated twice"):
        other.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # an optimizer over other tensors steps as usual, and so does this one once the hooks are detached
    free = nn.Parameter(torch.ones(3))
    free.grad = torch.ones(3)
    torch.optim.SGD([free], lr=0.5).step()
    assert torch.equal(free.detach(), torch.full((3,), 0.5))
    cosmic_fx.detach_hooks(model)
    other.step()
    assert not torch.equal(model[2].weight, before["2.weight"])


def test_gradient_accumulation_is_refused_at_step():
    model, fopt = _fused_eager("adamw")
    (x, y), (x2, y2) = _batches(2)
    fopt.backward(_loss(model, x, y))
    fopt.step()  # one backward per step: fine
    fopt.backward(_loss(model, x, y) / 2)
    fopt.backward(_loss(model, x2, y2) / 2)
    with pytest.raises(RuntimeError, match=r"2 backward passes since the last step\(\). Gradient accumulation cannot "
                                           r"work with cce_fused='adamw'"):
        fopt.step()


def test_fused_optimizer_bad_input():
    with pytest.raises(ValueError, match="has no cosmic runtime"):
        cosmic_fx.fused_optimizer(small_mlp())
    with pytest.raises(ValueError, match="cce_fused='off': there is no fused update to drive"):
        cosmic_fx.fused_optimizer(cosmic_fx.transform(small_mlp(), CosmicConfig.off(cce="relative")))
    with pytest.raises(TypeError, match="fused_optimizer expects an nn.Module; got str"):
        cosmic_fx.fused_optimizer("model")
    tm = cosmic_fx.transform(small_mlp(), CosmicConfig.off(**KINDS["sgd"][0]))
    opt = cosmic_fx.fused_optimizer(tm)
    x, y = _batches(1)[0]
    with pytest.raises(RuntimeError, match="hooks are not active, so nothing would update it"):
        opt.backward(_loss(tm, x, y))
    cosmic_fx.attach_hooks(tm)
    with pytest.raises(TypeError, match="expects a loss tensor with a graph"):
        opt.backward(1.0)
    adamw = cosmic_fx.fused_optimizer(cosmic_fx.transform(small_mlp(), CosmicConfig.off(**KINDS["adamw"][0])))
    with pytest.raises(RuntimeError, match="saved for cce_fused='adamw'; this model uses cce_fused='sgd'"):
        opt.load_state_dict(adamw.state_dict())
    with pytest.raises(RuntimeError, match="not a cosmic fused-optimizer state dict"):
        opt.load_state_dict({"state": {}})


def test_seed_cdg_cannot_run_in_a_compiled_fused_backward_and_a_plain_backward_warns():
    cfg = CosmicConfig.seed(lower="aot_eager", cce_fused_lr=0.1)
    run = cosmic_fx.compile(cosmic_fx.transform(small_mlp(), cfg))
    x, y = _batches(1)[0]
    with pytest.raises(RuntimeError, match="cdg='seed' skips another set of parameters every step"):
        cosmic_fx.fused_optimizer(run).backward(_loss(run, x, y))
    # a plain backward still updates, and says that it saves no memory on a compiled model
    with pytest.warns(UserWarning, match="no memory is saved. Call cosmic_fx.fused_optimizer"):
        _loss(run, x, y).backward()


def test_parameters_frozen_by_cdg_get_no_fused_update_and_keep_their_state():
    cfg = CosmicConfig.off(cdg="calibrated", cdg_patience=1, cdg_interval=1, cdg_max_frozen=0.5, efficiency_every=1,
                           **KINDS["adamw"][0])
    model = small_mlp()
    rt = cosmic_fx.attach_hooks(model, cfg)
    opt = cosmic_fx.fused_optimizer(model)
    batches = _batches(6)
    for x, y in batches[:3]:
        opt.backward(_loss(model, x, y))
        opt.step()
        if rt.frozen:
            break
    frozen = rt.frozen
    assert frozen, "the schedule above should freeze some parameters"
    before, steps = _params(model), {n: float(opt.state_dict()["state"][rt.index_of(n)]["step"]) for n in rt.names}
    x, y = batches[4]
    opt.backward(_loss(model, x, y))
    after = {n: float(opt.state_dict()["state"][rt.index_of(n)]["step"]) for n in rt.names}
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, before[name]) and after[name] == steps[name], name
        else:
            assert not torch.equal(p, before[name]) and after[name] == steps[name] + 1, name


def test_fused_update_with_prefix_cdg_and_cce_off_steps_like_torch_optim():
    """Prefix CDG with CCE off reads no E(p): the hook returns early, and the fused step must still run."""
    fields, make_opt, _ = KINDS["sgd"]
    ref = small_mlp()
    opt = make_opt(ref.parameters())
    fused = small_mlp()
    cosmic_fx.attach_hooks(fused, CosmicConfig.off(cdg="prefix", **fields))
    fopt = cosmic_fx.fused_optimizer(fused)
    for x, y in _batches():  # far fewer steps than a settle window: nothing freezes
        _loss(ref, x, y).backward()
        opt.step()
        opt.zero_grad()
        fopt.backward(_loss(fused, x, y))
        fopt.step()
        assert all(p.grad is None for p in fused.parameters())
    for (name, p), q in zip(fused.named_parameters(), ref.parameters()):
        assert_close(p, q, rtol=0, atol=0, msg=name)
